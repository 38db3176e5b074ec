//! Per-disk replication state: what the gateway holds of each disk, as this agent knows it,
//! so that the next cycle sends only what changed, and a crash or a lost connection never makes
//! the agent believe the gateway holds something it does not.
//!
//! A delta is computed against one digest (SHA-256) per chunk of the disk *as the gateway
//! holds it* after the last cycle whose `EndOfCycle` it acknowledged. Those digests are the
//! committed `digests` file; a cycle in progress writes its own (`cycle/digests`), which
//! becomes the committed one, by a single rename, only once the gateway acknowledged that
//! cycle's `EndOfCycle` (or a later `Welcome` said it holds it). Everything is laid out, byte
//! by byte, in `docs/agent-state.md`; the committed fixture `tests/fixtures/disk-state-v1/` is
//! read back by the tests.
//!
//! ```text
//! <state>/disks/<item>/<disk>/     0700
//!     lock                          flock'd while a process replicates the disk
//!     digests                       committed digests (absent: no usable base)
//!     floor                         highest cycle number put in a Hello for the disk
//!     cycle/                        the cycle in progress, if any
//!         record                    what the cycle is (number, kind, frames, view, tags)
//!         plan                      its data frames, one fixed-size record per seq
//!         digests                   its digests, pending
//!         view                      the reflink clone read (snapshot `reflink` only)
//!         replica-digests           the gateway's digests of its replica, while a resync
//!                                   is planned against them (`crate::resync`)
//! ```
//!
//! Memory stays bounded whatever the disk's size: digests and plan records are streamed
//! through buffered readers and writers (64 KiB), or read and written one at a time by
//! position; nothing holds a disk's worth of them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_proto::frame::{Consistency, CycleKind, Snapshot};
use rustix::fs::FlockOperation;
use sha2::{Digest, Sha256};

/// The version of every file of this module this agent writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The directory of the disks' states, in the state directory.
pub const DISKS_DIR: &str = "disks";
/// Length of one chunk digest (SHA-256).
pub const DIGEST_LEN: usize = 32;
/// A chunk digest.
pub type ChunkDigest = [u8; DIGEST_LEN];

const LOCK_FILE: &str = "lock";
const DIGESTS_FILE: &str = "digests";
const FLOOR_FILE: &str = "floor";
/// The cycle in progress.
pub const CYCLE_DIR: &str = "cycle";
const RECORD_FILE: &str = "record";
const PLAN_FILE: &str = "plan";
/// The reflink clone of a cycle, in the cycle directory.
pub const VIEW_FILE: &str = "view";
/// The replica's digest list downloaded for a checksum-based resync, in the cycle directory
/// (`ferry_proto::digests` format, kept only while the cycle is planned).
pub const REPLICA_DIGESTS_FILE: &str = "replica-digests";

const DIGESTS_MAGIC: [u8; 8] = *b"FERRYDGS";
const RECORD_MAGIC: [u8; 8] = *b"FERRYCYC";
const PLAN_MAGIC: [u8; 8] = *b"FERRYPLN";
const FLOOR_MAGIC: [u8; 8] = *b"FERRYFLR";

const DH: usize = 112;
const PH: usize = 96;
const PR: usize = 17;
/// Length of the digests file's header; digest `i` is at `DIGESTS_HEADER + 32 × i`.
pub const DIGESTS_HEADER: u64 = DH as u64;
/// Length of the plan file's header.
pub const PLAN_HEADER: u64 = PH as u64;
/// Length of one plan record.
pub const PLAN_RECORD: u64 = PR as u64;
const FLOOR_LEN: usize = 56;
/// Largest cycle record read (tags included).
const MAX_RECORD: u64 = 64 << 10;
/// Attempts at the disk's lock, 10 ms apart, before it is reported held.
const LOCK_TRIES: u32 = 10;
/// Buffers of the streaming readers and writers.
const BUF: usize = 64 << 10;

/// What can go wrong with a disk's replication state. Every variant names the file or disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrackingError {
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A file is damaged or not what it should be.
    #[error("{}: {reason}", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file of a format version this agent does not read.
    #[error(
        "{}: format version {found}, but this ferry-agent reads version {FORMAT_VERSION} (written by another ferry-agent version)",
        path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// Another process replicates the disk.
    #[error(
        "disk {item}/{disk} is being replicated by another ferry-agent process ({} is locked); at most one session per disk",
        path.display()
    )]
    Locked {
        /// The item.
        item: String,
        /// The disk.
        disk: String,
        /// The lock file.
        path: PathBuf,
    },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> TrackingError + 'a {
    move |source| TrackingError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, reason: impl Into<String>) -> TrackingError {
    TrackingError::Damaged {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn sha256(bytes: &[u8]) -> ChunkDigest {
    Sha256::digest(bytes).into()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Checks magic and version of a header.
fn check_magic(path: &Path, b: &[u8], magic: &[u8; 8], what: &str) -> Result<(), TrackingError> {
    if b.len() < 12 || &b[..8] != magic {
        return Err(damaged(path, format!("not a ferry-agent {what} file")));
    }
    let v = u32_at(b, 8);
    if v != FORMAT_VERSION {
        if v == 0 {
            return Err(damaged(path, "version 0"));
        }
        return Err(TrackingError::Version {
            path: path.to_path_buf(),
            found: v,
        });
    }
    Ok(())
}

/// Number of chunks of a disk.
pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(chunk_size))
}

// --- digests -----------------------------------------------------------------------------------

/// The header of a digests file (`docs/agent-state.md` §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestsHeader {
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Disk size, bytes.
    pub disk_size: u64,
    /// The cycle the digests describe the disk after.
    pub cycle: u64,
    /// Number of digests (`ceil(disk_size / chunk_size)`).
    pub chunks: u64,
    /// Whether the file is final (its content checksum is set).
    pub fin: bool,
    /// SHA-256 of the digest bytes (zeros unless final).
    pub content_sha256: ChunkDigest,
}

impl DigestsHeader {
    /// A header being written (not final).
    pub fn new(chunk_size: u32, disk_size: u64, cycle: u64) -> Self {
        Self {
            chunk_size,
            disk_size,
            cycle,
            chunks: chunk_count(disk_size, chunk_size),
            fin: false,
            content_sha256: [0; 32],
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; DH] {
        let mut b = [0u8; DH];
        b[..8].copy_from_slice(&DIGESTS_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.cycle.to_le_bytes());
        b[32..40].copy_from_slice(&self.chunks.to_le_bytes());
        b[40] = u8::from(self.fin);
        b[48..80].copy_from_slice(&self.content_sha256);
        let h = sha256(&b[..80]);
        b[80..112].copy_from_slice(&h);
        b
    }

    /// Reads a header (of `path`, for messages); checks magic, version, checksum, fields.
    pub fn decode(path: &Path, b: &[u8]) -> Result<Self, TrackingError> {
        check_magic(path, b, &DIGESTS_MAGIC, "digests")?;
        if b.len() < DH {
            return Err(damaged(path, "header cut short"));
        }
        if sha256(&b[..80]) != b[80..112] {
            return Err(damaged(path, "header checksum mismatch"));
        }
        let h = Self {
            chunk_size: u32_at(b, 12),
            disk_size: u64_at(b, 16),
            cycle: u64_at(b, 24),
            chunks: u64_at(b, 32),
            fin: match b[40] {
                0 => false,
                1 => true,
                s => return Err(damaged(path, format!("unknown state {s}"))),
            },
            content_sha256: b[48..80].try_into().expect("32 bytes"),
        };
        if b[41..48].iter().any(|&x| x != 0) {
            return Err(damaged(path, "reserved bytes are not zero"));
        }
        if !h.chunk_size.is_power_of_two()
            || h.disk_size == 0
            || h.cycle == 0
            || h.chunks != chunk_count(h.disk_size, h.chunk_size)
        {
            return Err(damaged(path, "inconsistent geometry"));
        }
        Ok(h)
    }

    /// The file's length.
    pub fn file_len(&self) -> u64 {
        DIGESTS_HEADER + self.chunks * DIGEST_LEN as u64
    }
}

/// Reads the header of the digests file at `path` and checks the file's length.
pub fn read_digests_header(path: &Path) -> Result<DigestsHeader, TrackingError> {
    let mut f = File::open(path).map_err(io_err("read", path))?;
    let mut b = [0u8; DH];
    f.read_exact(&mut b).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => damaged(path, "header cut short"),
        _ => io_err("read", path)(e),
    })?;
    let h = DigestsHeader::decode(path, &b)?;
    let len = f.metadata().map_err(io_err("inspect", path))?.len();
    if len != h.file_len() {
        return Err(damaged(
            path,
            format!(
                "{len} bytes long; {} chunks need {}",
                h.chunks,
                h.file_len()
            ),
        ));
    }
    Ok(h)
}

/// Writes a new (pending) digests file sequentially: header, then one digest per chunk.
#[derive(Debug)]
pub struct DigestWriter {
    path: PathBuf,
    out: BufWriter<File>,
    header: DigestsHeader,
    written: u64,
}

impl DigestWriter {
    /// Creates (replaces) `path` with `header` (not final).
    pub fn create(path: &Path, header: DigestsHeader) -> Result<Self, TrackingError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("create", path))?;
        let mut out = BufWriter::with_capacity(BUF, f);
        let mut h = header;
        h.fin = false;
        h.content_sha256 = [0; 32];
        out.write_all(&h.encode()).map_err(io_err("write", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            header: h,
            written: 0,
        })
    }

    /// Appends the next chunk's digest.
    pub fn push(&mut self, d: &ChunkDigest) -> Result<(), TrackingError> {
        self.out.write_all(d).map_err(io_err("write", &self.path))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes; refuses a file without exactly one digest per chunk. Not final yet
    /// ([`finalize_digests`] seals it before the `EndOfCycle` is sent).
    pub fn finish(self) -> Result<(), TrackingError> {
        if self.written != self.header.chunks {
            return Err(damaged(
                &self.path,
                format!(
                    "{} digests written for {} chunks",
                    self.written, self.header.chunks
                ),
            ));
        }
        let f = self
            .out
            .into_inner()
            .map_err(|e| io_err("write", &self.path)(e.into_error()))?;
        f.sync_data().map_err(io_err("sync", &self.path))?;
        Ok(())
    }
}

/// Overwrites digest `index` of the digests file `f` (at `path`, for messages).
pub fn write_digest_at(
    f: &File,
    path: &Path,
    index: u64,
    d: &ChunkDigest,
) -> Result<(), TrackingError> {
    f.write_all_at(d, DIGESTS_HEADER + index * DIGEST_LEN as u64)
        .map_err(io_err("write", path))
}

/// SHA-256 of the digest bytes of `f`, read in order.
fn content_hash(f: &File, path: &Path, chunks: u64) -> Result<ChunkDigest, TrackingError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let total = chunks * DIGEST_LEN as u64;
    let mut off = 0u64;
    while off < total {
        let n = usize::try_from((total - off).min(BUF as u64)).expect("at most BUF");
        f.read_exact_at(&mut buf[..n], DIGESTS_HEADER + off)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => damaged(path, "cut short"),
                _ => io_err("read", path)(e),
            })?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().into())
}

/// Seals a digests file: its content checksum computed and written, the header marked final,
/// the file fsynced. Done before each `EndOfCycle` is sent (again after a resend changed a
/// digest).
pub fn finalize_digests(f: &File, path: &Path) -> Result<DigestsHeader, TrackingError> {
    let mut b = [0u8; DH];
    f.read_exact_at(&mut b, 0).map_err(io_err("read", path))?;
    let mut h = DigestsHeader::decode(path, &b)?;
    h.content_sha256 = content_hash(f, path, h.chunks)?;
    h.fin = true;
    f.write_all_at(&h.encode(), 0)
        .map_err(io_err("write", path))?;
    f.sync_data().map_err(io_err("sync", path))?;
    Ok(h)
}

/// Checks a whole digests file: header, length, final, content checksum.
pub fn verify_digests(path: &Path) -> Result<DigestsHeader, TrackingError> {
    let h = read_digests_header(path)?;
    if !h.fin {
        return Err(damaged(
            path,
            "not final (its cycle never sent its EndOfCycle)",
        ));
    }
    let f = File::open(path).map_err(io_err("read", path))?;
    if content_hash(&f, path, h.chunks)? != h.content_sha256 {
        return Err(damaged(path, "content checksum mismatch"));
    }
    Ok(h)
}

/// Reads a final digests file in order, checking its content checksum at the end.
#[derive(Debug)]
pub struct DigestReader {
    path: PathBuf,
    input: BufReader<File>,
    header: DigestsHeader,
    read: u64,
    hash: Sha256,
}

impl DigestReader {
    /// Opens `path`; refuses a file that is not final.
    pub fn open(path: &Path) -> Result<Self, TrackingError> {
        let header = read_digests_header(path)?;
        if !header.fin {
            return Err(damaged(
                path,
                "not final (its cycle never sent its EndOfCycle)",
            ));
        }
        let mut f = File::open(path).map_err(io_err("read", path))?;
        let mut skip = [0u8; DH];
        f.read_exact(&mut skip).map_err(io_err("read", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(BUF, f),
            header,
            read: 0,
            hash: Sha256::new(),
        })
    }

    /// Its header.
    pub fn header(&self) -> &DigestsHeader {
        &self.header
    }

    /// The next chunk's digest.
    pub fn next_digest(&mut self) -> Result<ChunkDigest, TrackingError> {
        if self.read >= self.header.chunks {
            return Err(damaged(&self.path, "read past the last chunk"));
        }
        let mut d = [0u8; DIGEST_LEN];
        self.input
            .read_exact(&mut d)
            .map_err(io_err("read", &self.path))?;
        self.hash.update(d);
        self.read += 1;
        Ok(d)
    }

    /// After every digest was read: whether the content checksum matches.
    pub fn finish(self) -> Result<(), TrackingError> {
        if self.read != self.header.chunks {
            return Err(damaged(
                &self.path,
                format!("{} of {} digests read", self.read, self.header.chunks),
            ));
        }
        let got: ChunkDigest = self.hash.finalize().into();
        if got != self.header.content_sha256 {
            return Err(damaged(&self.path, "content checksum mismatch"));
        }
        Ok(())
    }
}

// --- plan --------------------------------------------------------------------------------------

/// One planned data frame (besides the `EndOfCycle`, which is always the last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// `Chunk` of chunk `index`, read from the view when sent.
    Chunk(u64),
    /// `Zero` of chunks `first .. first + count`.
    Zero {
        /// First chunk.
        first: u64,
        /// Chunks.
        count: u64,
    },
}

impl Planned {
    fn encode(self) -> [u8; PR] {
        let mut b = [0u8; PR];
        let (t, i, c) = match self {
            Planned::Chunk(i) => (2u8, i, 1u64),
            Planned::Zero { first, count } => (3u8, first, count),
        };
        b[0] = t;
        b[1..9].copy_from_slice(&i.to_le_bytes());
        b[9..17].copy_from_slice(&c.to_le_bytes());
        b
    }

    fn decode(path: &Path, seq: u64, b: &[u8]) -> Result<Self, TrackingError> {
        let (i, c) = (u64_at(b, 1), u64_at(b, 9));
        match (b[0], c) {
            (2, 1) => Ok(Planned::Chunk(i)),
            (3, c) if c >= 1 && i.checked_add(c).is_some() => {
                Ok(Planned::Zero { first: i, count: c })
            }
            _ => Err(damaged(
                path,
                format!("record of seq {seq} is not a plan record"),
            )),
        }
    }
}

/// The plan header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanHeader {
    /// The cycle.
    pub cycle: u64,
    /// Number of data frames (`Chunk` and `Zero`); the `EndOfCycle` is `frames + 1`.
    pub frames: u64,
    /// SHA-256 of the records.
    pub records_sha256: ChunkDigest,
}

impl PlanHeader {
    fn encode(&self) -> [u8; PH] {
        let mut b = [0u8; PH];
        b[..8].copy_from_slice(&PLAN_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.cycle.to_le_bytes());
        b[24..32].copy_from_slice(&self.frames.to_le_bytes());
        b[32..64].copy_from_slice(&self.records_sha256);
        let h = sha256(&b[..64]);
        b[64..96].copy_from_slice(&h);
        b
    }

    fn decode(path: &Path, b: &[u8]) -> Result<Self, TrackingError> {
        check_magic(path, b, &PLAN_MAGIC, "plan")?;
        if b.len() < PH {
            return Err(damaged(path, "header cut short"));
        }
        if sha256(&b[..64]) != b[64..96] {
            return Err(damaged(path, "header checksum mismatch"));
        }
        if b[12..16].iter().any(|&x| x != 0) {
            return Err(damaged(path, "reserved bytes are not zero"));
        }
        Ok(Self {
            cycle: u64_at(b, 16),
            frames: u64_at(b, 24),
            records_sha256: b[32..64].try_into().expect("32 bytes"),
        })
    }
}

/// Writes a plan sequentially.
#[derive(Debug)]
pub struct PlanWriter {
    path: PathBuf,
    out: BufWriter<File>,
    cycle: u64,
    frames: u64,
    hash: Sha256,
}

impl PlanWriter {
    /// Creates (replaces) the plan at `path` for `cycle`.
    pub fn create(path: &Path, cycle: u64) -> Result<Self, TrackingError> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("create", path))?;
        let mut out = BufWriter::with_capacity(BUF, f);
        let placeholder = PlanHeader {
            cycle,
            frames: 0,
            records_sha256: [0; 32],
        };
        out.write_all(&placeholder.encode())
            .map_err(io_err("write", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            out,
            cycle,
            frames: 0,
            hash: Sha256::new(),
        })
    }

    /// Appends the next data frame; returns its `seq`.
    pub fn push(&mut self, p: Planned) -> Result<u64, TrackingError> {
        let b = p.encode();
        self.out
            .write_all(&b)
            .map_err(io_err("write", &self.path))?;
        self.hash.update(b);
        self.frames += 1;
        Ok(self.frames)
    }

    /// Writes the header (frame count, checksum) and fsyncs.
    pub fn finish(self) -> Result<PlanHeader, TrackingError> {
        let h = PlanHeader {
            cycle: self.cycle,
            frames: self.frames,
            records_sha256: self.hash.finalize().into(),
        };
        let f = self
            .out
            .into_inner()
            .map_err(|e| io_err("write", &self.path)(e.into_error()))?;
        f.write_all_at(&h.encode(), 0)
            .map_err(io_err("write", &self.path))?;
        f.sync_all().map_err(io_err("sync", &self.path))?;
        Ok(h)
    }
}

/// A written plan, read by position.
#[derive(Debug)]
pub struct PlanFile {
    path: PathBuf,
    file: File,
    header: PlanHeader,
}

impl PlanFile {
    /// Opens the plan at `path`: header checked, length checked. With `verify`, the records'
    /// checksum too (a plan found after a restart).
    pub fn open(path: &Path, verify: bool) -> Result<Self, TrackingError> {
        let file = File::open(path).map_err(io_err("read", path))?;
        let mut b = [0u8; PH];
        file.read_exact_at(&mut b, 0).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged(path, "header cut short"),
            _ => io_err("read", path)(e),
        })?;
        let header = PlanHeader::decode(path, &b)?;
        let len = file.metadata().map_err(io_err("inspect", path))?.len();
        let want = header
            .frames
            .checked_mul(PLAN_RECORD)
            .and_then(|n| n.checked_add(PLAN_HEADER));
        if want != Some(len) {
            return Err(damaged(
                path,
                format!("{len} bytes long for {} records", header.frames),
            ));
        }
        if verify {
            let mut h = Sha256::new();
            let mut r = BufReader::with_capacity(BUF, &file);
            let mut skip = [0u8; PH];
            r.read_exact(&mut skip).map_err(io_err("read", path))?;
            let mut rec = [0u8; PR];
            for seq in 1..=header.frames {
                r.read_exact(&mut rec).map_err(io_err("read", path))?;
                Planned::decode(path, seq, &rec)?;
                h.update(rec);
            }
            let got: ChunkDigest = h.finalize().into();
            if got != header.records_sha256 {
                return Err(damaged(path, "records checksum mismatch"));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    /// Its header.
    pub fn header(&self) -> &PlanHeader {
        &self.header
    }

    /// The data frame of `seq` (1 ..= frames).
    pub fn get(&self, seq: u64) -> Result<Planned, TrackingError> {
        if seq == 0 || seq > self.header.frames {
            return Err(damaged(
                &self.path,
                format!("no seq {seq} (the plan has {} frames)", self.header.frames),
            ));
        }
        let mut b = [0u8; PR];
        self.file
            .read_exact_at(&mut b, PLAN_HEADER + (seq - 1) * PLAN_RECORD)
            .map_err(io_err("read", &self.path))?;
        Planned::decode(&self.path, seq, &b)
    }
}

// --- cycle record ------------------------------------------------------------------------------

/// Where a cycle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The view is being taken or the plan written: nothing was sent; abandoned after a crash.
    Preparing = 1,
    /// The plan and the pending digests are written: frames may have been sent.
    Planned = 2,
}

/// The in-progress record of a cycle (`cycle/record`, `docs/agent-state.md` §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleRecord {
    /// Chunk size.
    pub chunk_size: u32,
    /// Disk size.
    pub disk_size: u64,
    /// The cycle number.
    pub cycle: u64,
    /// The committed cycle the plan was computed against (0: none, every chunk sent).
    pub base_cycle: u64,
    /// Data frames planned (`EndOfCycle` is `data_frames + 1`); 0 while preparing.
    pub data_frames: u64,
    /// The highest `Ack` received for the cycle (a lower bound: saved when a session ends).
    pub last_acked_seq: u64,
    /// Bytes of the planned `Chunk` frames' chunks.
    pub chunk_bytes: u64,
    /// The cycle's kind.
    pub kind: CycleKind,
    /// The `EndOfCycle`'s consistency.
    pub consistency: Consistency,
    /// The `EndOfCycle`'s snapshot method.
    pub snapshot: Snapshot,
    /// Where the cycle is.
    pub phase: Phase,
    /// The view's handle: empty (the live path), `view` (the reflink clone in the cycle
    /// directory) or `VG/LV` (the LVM snapshot volume).
    pub view: String,
    /// The pending digests' file name in the cycle directory.
    pub digests: String,
    /// The `EndOfCycle`'s tags.
    pub tags: Vec<(String, String)>,
}

impl CycleRecord {
    /// The `EndOfCycle`'s `seq`.
    pub fn end_seq(&self) -> u64 {
        self.data_frames + 1
    }

    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(&RECORD_MAGIC);
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&self.cycle.to_le_bytes());
        b.extend_from_slice(&self.base_cycle.to_le_bytes());
        b.extend_from_slice(&self.data_frames.to_le_bytes());
        b.extend_from_slice(&self.last_acked_seq.to_le_bytes());
        b.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        b.push(self.kind.code());
        b.push(self.consistency.code());
        b.push(self.snapshot.code());
        b.push(self.phase as u8);
        b.extend_from_slice(&[0; 4]);
        text16(&mut b, &self.view);
        text16(&mut b, &self.digests);
        b.push(u8::try_from(self.tags.len()).expect("at most 255 tags"));
        for (k, v) in &self.tags {
            b.push(u8::try_from(k.len()).expect("a tag key is at most 128 bytes"));
            b.extend_from_slice(k.as_bytes());
            text16(&mut b, v);
        }
        let h = sha256(&b);
        b.extend_from_slice(&h);
        b
    }

    /// Reads a record (of `path`).
    pub fn decode(path: &Path, b: &[u8]) -> Result<Self, TrackingError> {
        check_magic(path, b, &RECORD_MAGIC, "cycle record")?;
        if b.len() < 72 + 32 {
            return Err(damaged(path, "cut short"));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if sha256(body) != sum {
            return Err(damaged(path, "checksum mismatch"));
        }
        let bad = |what: &str| damaged(path, format!("bad {what}"));
        let kind = CycleKind::from_code(body[64]).ok_or_else(|| bad("kind"))?;
        let consistency = Consistency::from_code(body[65]).ok_or_else(|| bad("consistency"))?;
        let snapshot = Snapshot::from_code(body[66]).ok_or_else(|| bad("snapshot"))?;
        let phase = match body[67] {
            1 => Phase::Preparing,
            2 => Phase::Planned,
            _ => return Err(bad("phase")),
        };
        if body[68..72].iter().any(|&x| x != 0) {
            return Err(damaged(path, "reserved bytes are not zero"));
        }
        let mut r = Cursor { b: body, at: 72 };
        let view = r.text16().ok_or_else(|| bad("view"))?;
        let digests = r.text16().ok_or_else(|| bad("digests"))?;
        let n = r.byte().ok_or_else(|| bad("tag count"))?;
        let mut tags = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let klen = r.byte().ok_or_else(|| bad("tag key"))?;
            let k = r.take(usize::from(klen)).ok_or_else(|| bad("tag key"))?;
            let k = String::from_utf8(k.to_vec()).map_err(|_| bad("tag key"))?;
            let v = r.text16().ok_or_else(|| bad("tag value"))?;
            tags.push((k, v));
        }
        if r.at != body.len() {
            return Err(damaged(path, "trailing bytes"));
        }
        Ok(Self {
            chunk_size: u32_at(body, 12),
            disk_size: u64_at(body, 16),
            cycle: u64_at(body, 24),
            base_cycle: u64_at(body, 32),
            data_frames: u64_at(body, 40),
            last_acked_seq: u64_at(body, 48),
            chunk_bytes: u64_at(body, 56),
            kind,
            consistency,
            snapshot,
            phase,
            view,
            digests,
            tags,
        })
    }
}

fn text16(b: &mut Vec<u8>, s: &str) {
    let n = u16::try_from(s.len()).expect("at most 65535 bytes");
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn text16(&mut self) -> Option<String> {
        let n = self.take(2)?;
        let n = usize::from(u16::from_le_bytes([n[0], n[1]]));
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

// --- floor -------------------------------------------------------------------------------------

fn encode_floor(cycle: u64) -> [u8; FLOOR_LEN] {
    let mut b = [0u8; FLOOR_LEN];
    b[..8].copy_from_slice(&FLOOR_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&cycle.to_le_bytes());
    let h = sha256(&b[..24]);
    b[24..56].copy_from_slice(&h);
    b
}

fn decode_floor(path: &Path, b: &[u8]) -> Result<u64, TrackingError> {
    check_magic(path, b, &FLOOR_MAGIC, "cycle floor")?;
    if b.len() != FLOOR_LEN {
        return Err(damaged(
            path,
            format!("{} bytes long, not {FLOOR_LEN}", b.len()),
        ));
    }
    if sha256(&b[..24]) != b[24..56] || b[12..16].iter().any(|&x| x != 0) {
        return Err(damaged(path, "checksum mismatch"));
    }
    Ok(u64_at(b, 16))
}

// --- the disk's directory ----------------------------------------------------------------------

/// The replication state directory of one disk, locked for this process while it exists.
#[derive(Debug)]
pub struct DiskState {
    dir: PathBuf,
    item: String,
    disk: String,
    _lock: File,
}

/// Writes `bytes` to `dir/name` atomically: a temporary file written and fsynced, renamed
/// over the name, the directory fsynced.
fn atomic_write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), TrackingError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), TrackingError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn read_small(path: &Path) -> Result<Option<Vec<u8>>, TrackingError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let mut b = Vec::new();
    f.take(MAX_RECORD + 1)
        .read_to_end(&mut b)
        .map_err(io_err("read", path))?;
    if b.len() as u64 > MAX_RECORD {
        return Err(damaged(path, format!("larger than {MAX_RECORD} bytes")));
    }
    Ok(Some(b))
}

/// The file in a disk's directory saying its final cycle for planned failover job `<id>`
/// was acknowledged (its text: the job id). Read without the disk's lock: another disk's
/// loop checks it before stopping the source.
pub const FINAL_CYCLE_FILE: &str = "final-cycle";

/// Whether disk `item/disk` sent its final cycle for planned failover `job`.
pub fn final_cycle_sent(state_dir: &Path, item: &str, disk: &str, job: &str) -> bool {
    fs::read_to_string(
        state_dir
            .join(DISKS_DIR)
            .join(item)
            .join(disk)
            .join(FINAL_CYCLE_FILE),
    )
    .is_ok_and(|t| t.trim() == job)
}

impl DiskState {
    /// Records that this disk's final cycle for planned failover `job` was acknowledged
    /// (written under a temporary name, synced, renamed).
    pub fn mark_final_cycle(&self, job: &str) -> Result<(), TrackingError> {
        let path = self.dir.join(FINAL_CYCLE_FILE);
        let tmp = self.dir.join(format!("{FINAL_CYCLE_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, format!("{job}\n").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(io_err("write", &path))
    }

    /// Opens (creating, 0700) `<state_dir>/disks/<item>/<disk>/` and locks it; refused when
    /// another process holds the lock.
    pub fn open(state_dir: &Path, item: &str, disk: &str) -> Result<Self, TrackingError> {
        let dir = state_dir.join(DISKS_DIR).join(item).join(disk);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create the directory", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("create", &lock_path))?;
        // A child forked by this process (a snapshot command) holds a copy of every open
        // file description until its exec closes it, lock included: a few short retries
        // tell that moment from another agent process holding the disk.
        let mut tries = 0;
        loop {
            match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) if tries < LOCK_TRIES => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(TrackingError::Locked {
                        item: item.to_string(),
                        disk: disk.to_string(),
                        path: lock_path,
                    });
                }
                Err(e) => return Err(io_err("lock", &lock_path)(e.into())),
            }
        }
        Ok(Self {
            dir,
            item: item.to_string(),
            disk: disk.to_string(),
            _lock: lock,
        })
    }

    /// The disk's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `item/disk`.
    pub fn label(&self) -> String {
        format!("{}/{}", self.item, self.disk)
    }

    /// The committed digests file.
    pub fn digests_path(&self) -> PathBuf {
        self.dir.join(DIGESTS_FILE)
    }

    /// The cycle directory.
    pub fn cycle_dir(&self) -> PathBuf {
        self.dir.join(CYCLE_DIR)
    }

    /// The plan of the cycle in progress.
    pub fn plan_path(&self) -> PathBuf {
        self.cycle_dir().join(PLAN_FILE)
    }

    /// The replica's digest list of the cycle being planned (a checksum-based resync).
    pub fn replica_digests_path(&self) -> PathBuf {
        self.cycle_dir().join(REPLICA_DIGESTS_FILE)
    }

    /// The pending digests of the cycle in progress (as its record names them).
    pub fn pending_digests_path(&self, rec: &CycleRecord) -> PathBuf {
        self.cycle_dir().join(&rec.digests)
    }

    /// The committed digests' header, if there is a committed cycle. A damaged file is an
    /// error (the caller drops it and resynchronises).
    pub fn committed(&self) -> Result<Option<DigestsHeader>, TrackingError> {
        let p = self.digests_path();
        match fs::symlink_metadata(&p) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("inspect", &p)(e)),
            Ok(_) => {}
        }
        let h = read_digests_header(&p)?;
        if !h.fin {
            return Err(damaged(&p, "committed digests that are not final"));
        }
        Ok(Some(h))
    }

    /// Drops the committed digests (the gateway's replica is no longer what they describe:
    /// `bad_session`, damage): the next cycle sends every chunk.
    pub fn drop_tracking(&self) -> Result<(), TrackingError> {
        let p = self.digests_path();
        match fs::remove_file(&p) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &p)(e)),
        }
    }

    /// The highest cycle number put in a `Hello` for this disk (0: none recorded).
    pub fn floor(&self) -> Result<u64, TrackingError> {
        let p = self.dir.join(FLOOR_FILE);
        match read_small(&p)? {
            None => Ok(0),
            Some(b) => decode_floor(&p, &b),
        }
    }

    /// Records `cycle` as the highest cycle number used (never lowers it).
    pub fn raise_floor(&self, cycle: u64) -> Result<(), TrackingError> {
        if self.floor().unwrap_or(0) >= cycle {
            return Ok(());
        }
        atomic_write(&self.dir, FLOOR_FILE, &encode_floor(cycle))
    }

    /// The record of the cycle in progress, if any.
    pub fn in_progress(&self) -> Result<Option<CycleRecord>, TrackingError> {
        let p = self.cycle_dir().join(RECORD_FILE);
        match read_small(&p)? {
            None => Ok(None),
            Some(b) => CycleRecord::decode(&p, &b).map(Some),
        }
    }

    /// Starts a cycle: any previous cycle directory is removed, the floor raised to the
    /// cycle's number, a fresh cycle directory made and its record written.
    pub fn begin_cycle(&self, rec: &CycleRecord) -> Result<(), TrackingError> {
        self.discard_cycle()?;
        self.raise_floor(rec.cycle)?;
        let d = self.cycle_dir();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .map_err(io_err("create the directory", &d))?;
        sync_dir(&self.dir)?;
        self.write_record(rec)
    }

    /// Replaces the cycle record atomically.
    pub fn write_record(&self, rec: &CycleRecord) -> Result<(), TrackingError> {
        atomic_write(&self.cycle_dir(), RECORD_FILE, &rec.encode())
    }

    /// Removes the cycle directory (the cycle is abandoned or promoted).
    pub fn discard_cycle(&self) -> Result<(), TrackingError> {
        let d = self.cycle_dir();
        match fs::remove_dir_all(&d) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &d)(e)),
        }
    }

    /// The cycle's `EndOfCycle` is acknowledged: its pending digests (checked whole) become
    /// the committed ones by one rename, then the cycle directory goes. A crash between the
    /// two leaves a cycle record whose number is the committed cycle's, which
    /// [`Self::settle`] removes.
    pub fn promote(&self, rec: &CycleRecord) -> Result<DigestsHeader, TrackingError> {
        let pending = self.pending_digests_path(rec);
        let h = verify_digests(&pending)?;
        if h.cycle != rec.cycle {
            return Err(damaged(
                &pending,
                format!("digests of cycle {}, not {}", h.cycle, rec.cycle),
            ));
        }
        let target = self.digests_path();
        fs::rename(&pending, &target).map_err(io_err("rename into place", &target))?;
        sync_dir(&self.dir)?;
        self.discard_cycle()?;
        Ok(h)
    }

    /// Cleans up after a crash during [`Self::promote`]: a cycle directory whose cycle is
    /// the committed one is removed. Returns the cycle record still in progress, if any.
    pub fn settle(&self) -> Result<Option<CycleRecord>, TrackingError> {
        let rec = match self.in_progress() {
            Ok(r) => r,
            Err(TrackingError::Damaged { .. } | TrackingError::Version { .. }) => {
                // A record that cannot be read cannot be resumed; its cycle is abandoned.
                self.discard_cycle()?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let Some(rec) = rec else {
            if fs::symlink_metadata(self.cycle_dir()).is_ok() {
                self.discard_cycle()?;
            }
            return Ok(None);
        };
        let committed = self.committed().ok().flatten().map(|h| h.cycle);
        if committed.is_some_and(|c| c >= rec.cycle) {
            self.discard_cycle()?;
            return Ok(None);
        }
        Ok(Some(rec))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record() -> CycleRecord {
        CycleRecord {
            chunk_size: 65536,
            disk_size: 200_000,
            cycle: 7,
            base_cycle: 6,
            data_frames: 3,
            last_acked_seq: 2,
            chunk_bytes: 65536 + 3392,
            kind: CycleKind::Delta,
            consistency: Consistency::App,
            snapshot: Snapshot::Reflink,
            phase: Phase::Planned,
            view: VIEW_FILE.into(),
            digests: "digests".into(),
            tags: vec![
                ("ferry.agent_version".into(), "0.1.0".into()),
                ("ferry.host".into(), "web-01".into()),
            ],
        }
    }

    /// Digest `i` of the fixture: 32 bytes of `i + 1`.
    fn fixture_digest(i: u64) -> ChunkDigest {
        [u8::try_from(i + 1).unwrap(); 32]
    }

    /// Writes the version-1 fixture into `dir` (see `docs/agent-state.md` §7).
    fn write_fixture(dir: &Path) {
        let st = DiskState::open(dir, "web", "sda").unwrap();
        // Committed: cycle 6, 4 chunks of 64 KiB over 200000 bytes.
        let p = st.digests_path();
        let mut w = DigestWriter::create(&p, DigestsHeader::new(65536, 200_000, 6)).unwrap();
        for i in 0..4 {
            w.push(&fixture_digest(i)).unwrap();
        }
        w.finish().unwrap();
        finalize_digests(
            &OpenOptions::new().read(true).write(true).open(&p).unwrap(),
            &p,
        )
        .unwrap();
        let rec = record();
        st.begin_cycle(&rec).unwrap();
        let mut pw = PlanWriter::create(&st.plan_path(), 7).unwrap();
        pw.push(Planned::Chunk(1)).unwrap();
        pw.push(Planned::Zero { first: 2, count: 1 }).unwrap();
        pw.push(Planned::Chunk(3)).unwrap();
        pw.finish().unwrap();
        let pp = st.pending_digests_path(&rec);
        let mut w = DigestWriter::create(&pp, DigestsHeader::new(65536, 200_000, 7)).unwrap();
        for i in 0..4 {
            w.push(&fixture_digest(i + 10)).unwrap();
        }
        w.finish().unwrap();
    }

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/disk-state-v1");
    const FIXTURE_FILES: [&str; 5] = [
        "digests",
        "floor",
        "cycle/record",
        "cycle/plan",
        "cycle/digests",
    ];

    /// The committed fixture reads back, and this build writes exactly its bytes.
    #[test]
    fn v1_fixture_reads_back() {
        // Read the files directly: opening a `DiskState` would create its lock file in the tree.
        let dir = Path::new(FIXTURE).join("disks/web/sda");
        let h = verify_digests(&dir.join("digests")).unwrap();
        assert_eq!(
            h,
            DigestsHeader {
                chunk_size: 65536,
                disk_size: 200_000,
                cycle: 6,
                chunks: 4,
                fin: true,
                content_sha256: h.content_sha256,
            }
        );
        let mut r = DigestReader::open(&dir.join("digests")).unwrap();
        for i in 0..4 {
            assert_eq!(r.next_digest().unwrap(), fixture_digest(i));
        }
        r.finish().unwrap();
        let floor = fs::read(dir.join("floor")).unwrap();
        assert_eq!(decode_floor(&dir.join("floor"), &floor).unwrap(), 7);
        let rb = fs::read(dir.join("cycle/record")).unwrap();
        assert_eq!(
            CycleRecord::decode(&dir.join("cycle/record"), &rb).unwrap(),
            record()
        );
        let plan = PlanFile::open(&dir.join("cycle/plan"), true).unwrap();
        assert_eq!(plan.header().cycle, 7);
        assert_eq!(plan.header().frames, 3);
        assert_eq!(plan.get(1).unwrap(), Planned::Chunk(1));
        assert_eq!(plan.get(2).unwrap(), Planned::Zero { first: 2, count: 1 });
        assert_eq!(plan.get(3).unwrap(), Planned::Chunk(3));
        let ph = read_digests_header(&dir.join("cycle/digests")).unwrap();
        assert!(!ph.fin);
        assert_eq!(ph.cycle, 7);

        // This build writes the same bytes.
        let t = tempfile::tempdir().unwrap();
        write_fixture(t.path());
        for f in FIXTURE_FILES {
            let ours = fs::read(t.path().join("disks/web/sda").join(f)).unwrap();
            let theirs = fs::read(dir.join(f)).unwrap();
            assert!(ours == theirs, "{f} differs from the fixture");
        }
    }

    /// Regenerates the fixture: `FERRY_WRITE_FIXTURE=1 cargo test -p ferry-agent
    /// write_v1_fixture -- --ignored`. Only for a new format version's fixture, never to
    /// make the v1 test pass.
    #[test]
    #[ignore = "writes the committed fixture"]
    fn write_v1_fixture() {
        if std::env::var_os("FERRY_WRITE_FIXTURE").is_none() {
            return;
        }
        let root = Path::new(FIXTURE);
        let _ = fs::remove_dir_all(root);
        write_fixture(root);
        fs::remove_file(root.join("disks/web/sda/lock")).unwrap();
    }

    #[test]
    fn record_round_trip_and_damage() {
        let r = record();
        let b = r.encode();
        let p = Path::new("record");
        assert_eq!(CycleRecord::decode(p, &b).unwrap(), r);
        for i in [0, 9, 40, 70, b.len() - 1] {
            let mut d = b.clone();
            d[i] ^= 1;
            assert!(CycleRecord::decode(p, &d).is_err(), "byte {i}");
        }
        let mut v2 = b.clone();
        v2[8] = 2;
        assert!(matches!(
            CycleRecord::decode(p, &v2),
            Err(TrackingError::Version { found: 2, .. })
        ));
        assert!(CycleRecord::decode(p, &b[..50]).is_err());
    }

    #[test]
    fn digests_round_trip_and_checks() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("d");
        let mut w = DigestWriter::create(&p, DigestsHeader::new(65536, 3 * 65536 + 1, 2)).unwrap();
        for i in 0..4 {
            w.push(&fixture_digest(i)).unwrap();
        }
        w.finish().unwrap();
        // Not final: refused as a base.
        assert!(
            DigestReader::open(&p)
                .unwrap_err()
                .to_string()
                .contains("not final")
        );
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        write_digest_at(&f, &p, 2, &[9; 32]).unwrap();
        let h = finalize_digests(&f, &p).unwrap();
        assert_eq!(h.chunks, 4);
        assert!(h.fin);
        let mut r = DigestReader::open(&p).unwrap();
        let got: Vec<ChunkDigest> = (0..4).map(|_| r.next_digest().unwrap()).collect();
        assert_eq!(got[2], [9; 32]);
        assert_eq!(got[3], fixture_digest(3));
        r.finish().unwrap();
        verify_digests(&p).unwrap();
        // A changed digest after sealing is found.
        write_digest_at(&f, &p, 0, &[7; 32]).unwrap();
        assert!(
            verify_digests(&p)
                .unwrap_err()
                .to_string()
                .contains("content checksum")
        );
        let mut r = DigestReader::open(&p).unwrap();
        for _ in 0..4 {
            r.next_digest().unwrap();
        }
        assert!(r.finish().is_err());
        // Too few digests.
        let w = DigestWriter::create(&p, DigestsHeader::new(65536, 65536, 2)).unwrap();
        assert!(
            w.finish()
                .unwrap_err()
                .to_string()
                .contains("0 digests written for 1")
        );
        // A truncated file.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(DIGESTS_HEADER + 10).unwrap();
        assert!(
            read_digests_header(&p)
                .unwrap_err()
                .to_string()
                .contains("bytes long")
        );
    }

    /// Pending digests become committed only at promotion; until then a crash leaves the
    /// previous cycle's digests as the base.
    #[test]
    fn pending_digests_are_promoted_only_when_acknowledged() {
        let t = tempfile::tempdir().unwrap();
        let st = DiskState::open(t.path(), "web", "sda").unwrap();
        assert_eq!(st.committed().unwrap(), None);
        assert_eq!(st.settle().unwrap(), None);

        let mut rec = record();
        rec.cycle = 1;
        rec.base_cycle = 0;
        st.begin_cycle(&rec).unwrap();
        assert_eq!(st.floor().unwrap(), 1);
        let pp = st.pending_digests_path(&rec);
        let mut w = DigestWriter::create(&pp, DigestsHeader::new(65536, 200_000, 1)).unwrap();
        for i in 0..4 {
            w.push(&fixture_digest(i)).unwrap();
        }
        w.finish().unwrap();
        // Not sealed (EndOfCycle never sent): cannot be promoted.
        assert!(st.promote(&rec).is_err());
        let f = OpenOptions::new().read(true).write(true).open(&pp).unwrap();
        finalize_digests(&f, &pp).unwrap();
        // "Crash" before the ack: reopening finds the cycle in progress and no base.
        drop(st);
        let st = DiskState::open(t.path(), "web", "sda").unwrap();
        assert_eq!(st.committed().unwrap(), None);
        assert_eq!(st.settle().unwrap(), Some(rec.clone()));
        // Acknowledged: promoted.
        let h = st.promote(&rec).unwrap();
        assert_eq!(h.cycle, 1);
        assert_eq!(st.committed().unwrap().unwrap().cycle, 1);
        assert!(!st.cycle_dir().exists());

        // A crash between the rename and the removal of the cycle directory.
        let mut rec2 = rec.clone();
        rec2.cycle = 2;
        st.begin_cycle(&rec2).unwrap();
        let mut rec1 = rec.clone();
        rec1.cycle = 1;
        st.write_record(&rec1).unwrap();
        assert_eq!(st.settle().unwrap(), None);
        assert!(!st.cycle_dir().exists());
        assert_eq!(st.floor().unwrap(), 2);
        st.raise_floor(1).unwrap();
        assert_eq!(st.floor().unwrap(), 2);

        // A second process cannot take the disk.
        let e = DiskState::open(t.path(), "web", "sda").unwrap_err();
        assert!(matches!(e, TrackingError::Locked { .. }), "{e}");
        assert!(
            e.to_string().contains("at most one session per disk"),
            "{e}"
        );

        st.drop_tracking().unwrap();
        assert_eq!(st.committed().unwrap(), None);
    }

    #[test]
    fn plans_are_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("plan");
        let mut w = PlanWriter::create(&p, 3).unwrap();
        assert_eq!(w.push(Planned::Zero { first: 0, count: 5 }).unwrap(), 1);
        assert_eq!(w.push(Planned::Chunk(5)).unwrap(), 2);
        w.finish().unwrap();
        let f = PlanFile::open(&p, true).unwrap();
        assert_eq!(f.get(2).unwrap(), Planned::Chunk(5));
        assert!(f.get(3).is_err());
        assert!(f.get(0).is_err());
        let mut b = fs::read(&p).unwrap();
        // The last record's index.
        let at = b.len() - 16;
        b[at] ^= 1;
        fs::write(&p, &b).unwrap();
        PlanFile::open(&p, false).unwrap();
        assert!(
            PlanFile::open(&p, true)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        fs::write(&p, &b[..b.len() - 1]).unwrap();
        assert!(
            PlanFile::open(&p, false)
                .unwrap_err()
                .to_string()
                .contains("bytes long")
        );
    }
}
