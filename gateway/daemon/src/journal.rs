//! The process role's durable journal: what an agent sent, on the local cache disk, before
//! anything is acknowledged.
//!
//! # Why
//!
//! The gateway acknowledges a frame to the agent only once the frame would survive a crash of
//! `ferryd` (SIGKILL) or of the machine: the agent then forgets it, so from that moment the
//! journal is the only copy until a drainer has committed it to the vault. The contract this
//! module keeps is therefore:
//!
//! - **Acknowledged means fsynced.** [`Journal::append`] only buffers and writes;
//!   [`Journal::sync`] makes every appended record durable (`fdatasync` of the segment, `fsync`
//!   of the directory when a segment was created) and returns the highest durable sequence
//!   number. Only a number `sync` returned may be acknowledged. One `sync` covers any number of
//!   appends (group commit), so the cost of durability is one flush per batch, not per frame.
//! - **A crash loses nothing acknowledged and invents nothing.** [`Journal::open`] validates
//!   every record (CRC-32C over sequence number and payload, sequence numbers consecutive).
//!   The only damage it repairs is a torn tail: an incomplete or corrupt record at the end of
//!   the last segment, which can only be a write that never completed its `sync` (so was never
//!   acknowledged); it is truncated away and reported in [`Recovered`]. Damage anywhere else —
//!   in an earlier segment, or in the last one but followed by a valid record — is an error
//!   naming the file and the byte offset: the journal never drops data silently.
//! - **Everything is bounded.** A record's length is checked against [`Limits::max_record`]
//!   before a byte is allocated for it; reading (recovery, [`Replay`]) holds one record at a
//!   time; a journal is capped by [`Limits::max_journal_bytes`]; and a [`CacheGuard`] shared
//!   by all journals of the cache refuses appends ([`JournalError::Backpressure`]) when the
//!   cache filesystem runs short of space (Site Recovery's thresholds: a warning below 30%
//!   free, critical below 25%) or the journals together pass their cap, so that the session
//!   layer answers the agent `Busy` instead of writing.
//!
//! The on-disk format (directory layout, segment header, record) is version 1, documented byte
//! by byte in `docs/journal-format.md`; `tests/fixtures/journal-v1/` is a journal written by
//! version 1 and read back by the tests.
//!
//! # What it does not do
//!
//! - It stores opaque records: the agent's encoded frames, with their sequence numbers. It
//!   does not decode them and does not depend on the wire codec.
//! - Sequence and session rules (which number the agent may send, resuming from the last
//!   acknowledgement, refusing forged or duplicated frames with a protocol error) belong to the
//!   session layer. The journal only refuses a number that is not exactly the next one, as a
//!   last line of defence, and writes nothing when it does.
//! - Draining into the vault is elsewhere: a drainer reads records back with
//!   [`Journal::replay`] and, once the vault holds them, frees their space with
//!   [`Journal::release_through`] (whole segments) or [`Journal::remove`] (the whole cycle).
//! - It is synchronous (`std::fs`): callers run it on blocking threads.
//!
//! # Layout
//!
//! One journal per stream (item, disk, cycle), in `<cache>/journal/<item>/<disk>/<cycle>/`
//! ([`StreamKey::dir`]): append-only segment files named by their first sequence number
//! (`00000000000000000001.seg`, 20 digits so that names sort), rolled at
//! [`Limits::segment_bytes`]. A segment is created under a temporary name, its header synced,
//! then linked to its real name, so a segment under its real name always has a whole header;
//! and the previous segment is synced before its successor is created, so only the last
//! segment can ever have a torn tail. The directory is locked (`flock`) while a [`Journal`] is
//! open: two writers on one stream are refused ([`JournalError::InUse`]).

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::DaemonError;
use crate::fsutil;

/// The first 8 bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"FERRYJNL";
/// The segment format version this build writes and the newest it reads.
pub const VERSION: u32 = 1;
/// Length of a segment's header.
pub const HEADER_LEN: u64 = HEADER_SIZE as u64;
/// Length of a record's header (length, CRC, sequence number) before its payload.
pub const RECORD_HEADER_LEN: u64 = RECORD_HEADER_SIZE as u64;
/// The directory under the cache directory that holds every journal.
pub const JOURNAL_DIR: &str = "journal";

const HEADER_SIZE: usize = 32;
const RECORD_HEADER_SIZE: usize = 16;
const SEGMENT_SUFFIX: &str = ".seg";
const SEQ_DIGITS: usize = 20;
/// Appends smaller than this are gathered in memory and written together; larger ones are
/// written straight from the caller's buffer (with whatever was gathered, in one `writev`).
const WRITE_BUFFER: usize = 256 << 10;
const READ_BUFFER: usize = 64 << 10;
/// Window of the forward scan that tells a torn tail from corruption in the middle.
const SCAN_WINDOW: usize = 64 << 10;

/// Shorthand for results of this module.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

/// What went wrong, and on which file or journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// A file or directory operation failed.
    #[error("journal: cannot {action} `{path}`: {source}")]
    Io {
        /// What was attempted ("write", "sync", "read", …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating or checking a private directory or file failed (`fsutil`).
    #[error(transparent)]
    Files(Box<DaemonError>),
    /// A segment was written by a newer format version than this build reads.
    #[error(
        "journal segment `{path}` has format version {version}, but this ferryd reads up to \
         version {VERSION}: run the ferryd that wrote it until the journal is drained"
    )]
    NewerFormat {
        /// The segment file.
        path: PathBuf,
        /// The version in its header.
        version: u32,
    },
    /// A segment is damaged somewhere other than a torn tail, or is not a journal segment.
    #[error("corrupt journal segment `{path}` at byte offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A journal directory holds something the journal does not write, or misses something
    /// it does.
    #[error("journal `{path}`: {reason}")]
    Unexpected {
        /// The file or directory.
        path: PathBuf,
        /// What does not fit, and what to do.
        reason: String,
    },
    /// An append carried another sequence number than the next one. Nothing was written.
    #[error(
        "journal `{dir}`: sequence number {seq} refused, expected {expected}; nothing was written"
    )]
    OutOfOrder {
        /// The journal directory.
        dir: PathBuf,
        /// The sequence number of the append.
        seq: u64,
        /// The only number the journal accepts next.
        expected: u64,
    },
    /// `u64::MAX` has no successor and is never journaled. Nothing was written.
    #[error(
        "journal `{dir}`: sequence number {} refused: it has no successor",
        u64::MAX
    )]
    SeqExhausted {
        /// The journal directory.
        dir: PathBuf,
    },
    /// A payload longer than [`Limits::max_record`]. Nothing was written.
    #[error(
        "journal `{dir}`: record of {len} bytes refused, larger than max_record ({max} bytes); \
         nothing was written"
    )]
    RecordTooLarge {
        /// The journal directory.
        dir: PathBuf,
        /// The payload's length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The journal or the cache is full: answer the agent `Busy` and retry after draining.
    /// Nothing was written.
    #[error("journal `{dir}`: backpressure: {reason}; nothing was written")]
    Backpressure {
        /// The journal directory (or the cache directory, from [`CacheGuard::check`]).
        dir: PathBuf,
        /// Which limit was reached.
        reason: BackpressureReason,
    },
    /// An earlier write or sync of this journal failed, so what its files hold is unknown
    /// (after a failed `fsync`, Linux may have dropped the unwritten pages). Drop the
    /// [`Journal`] and open it again: recovery keeps exactly what is durable.
    #[error("journal `{dir}`: an earlier write or sync failed; reopen the journal to recover")]
    Poisoned {
        /// The journal directory.
        dir: PathBuf,
    },
    /// A replay asked for a sequence number the journal does not hold durably.
    #[error("journal `{dir}`: sequence number {seq} is not held ({})", held(.first, .durable))]
    NotHeld {
        /// The journal directory.
        dir: PathBuf,
        /// The sequence number asked for.
        seq: u64,
        /// The first sequence number held, if any.
        first: Option<u64>,
        /// The highest durable sequence number, if any.
        durable: Option<u64>,
    },
    /// Another [`Journal`] (in this or another process) has the directory open.
    #[error("journal `{dir}` is in use by another writer")]
    InUse {
        /// The journal directory.
        dir: PathBuf,
    },
    /// [`Limits`] or [`CacheLimits`] are out of range.
    #[error("journal limits: {0}")]
    InvalidLimits(String),
    /// An item or disk name that cannot name a journal directory.
    #[error("journal stream: {0}")]
    InvalidKey(String),
}

fn held(first: &Option<u64>, durable: &Option<u64>) -> String {
    match (*first, *durable) {
        (Some(f), Some(d)) if f <= d => format!("durable records are {f}..={d}"),
        _ => "no durable record".into(),
    }
}

impl From<DaemonError> for JournalError {
    fn from(e: DaemonError) -> Self {
        JournalError::Files(Box::new(e))
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Which limit made the journal refuse an append.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackpressureReason {
    /// This journal would pass [`Limits::max_journal_bytes`].
    JournalFull {
        /// Bytes the journal holds.
        bytes: u64,
        /// Bytes the append needs.
        incoming: u64,
        /// The limit.
        limit: u64,
    },
    /// All journals of the cache together would pass [`CacheLimits::max_journal_bytes`].
    CacheJournalsFull {
        /// Bytes all journals hold.
        bytes: u64,
        /// Bytes the append needs.
        incoming: u64,
        /// The limit.
        limit: u64,
    },
    /// The cache filesystem would have less than [`CacheLimits::critical_free_percent`] free.
    LowFreeSpace {
        /// Bytes available to `ferryd` before the append.
        available_bytes: u64,
        /// Size of the filesystem.
        total_bytes: u64,
        /// The threshold.
        critical_percent: u8,
    },
}

impl fmt::Display for BackpressureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackpressureReason::JournalFull {
                bytes,
                incoming,
                limit,
            } => write!(
                f,
                "the journal holds {bytes} bytes; {incoming} more would pass its limit of {limit}"
            ),
            BackpressureReason::CacheJournalsFull {
                bytes,
                incoming,
                limit,
            } => write!(
                f,
                "the cache's journals hold {bytes} bytes; {incoming} more would pass their limit \
                 of {limit}"
            ),
            BackpressureReason::LowFreeSpace {
                available_bytes,
                total_bytes,
                critical_percent,
            } => write!(
                f,
                "the cache filesystem has {available_bytes} of {total_bytes} bytes free, below \
                 the critical {critical_percent}%"
            ),
        }
    }
}

/// Bounds of one journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest payload, in bytes. Checked on append, and on read before anything is
    /// allocated; must not be lowered below what journals on disk already hold.
    pub max_record: u32,
    /// A segment is rolled when the next record would make it longer than this (a segment
    /// holds at least one record, whatever its size).
    pub segment_bytes: u64,
    /// Most bytes (headers included) this journal may hold on disk.
    pub max_journal_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_record: 8 << 20,
            segment_bytes: 64 << 20,
            max_journal_bytes: 8 << 30,
        }
    }
}

impl Limits {
    /// Checks that the limits allow at least one record of `max_record` bytes.
    pub fn validate(&self) -> Result<()> {
        if self.max_record == 0 {
            return Err(JournalError::InvalidLimits(
                "max_record must be at least 1 byte".into(),
            ));
        }
        if self.segment_bytes <= HEADER_LEN + RECORD_HEADER_LEN {
            return Err(JournalError::InvalidLimits(format!(
                "segment_bytes ({}) must be more than a segment header and a record header ({})",
                self.segment_bytes,
                HEADER_LEN + RECORD_HEADER_LEN
            )));
        }
        let one = HEADER_LEN + RECORD_HEADER_LEN + u64::from(self.max_record);
        if self.max_journal_bytes < one {
            return Err(JournalError::InvalidLimits(format!(
                "max_journal_bytes ({}) must hold at least one record of max_record bytes ({one})",
                self.max_journal_bytes
            )));
        }
        Ok(())
    }
}

/// Which journal: one per (item, disk, cycle).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamKey {
    /// The protected item.
    pub item: String,
    /// The item's disk.
    pub disk: String,
    /// The replication cycle.
    pub cycle: u64,
}

impl StreamKey {
    /// A key whose names follow the item naming rule (they become directory names).
    pub fn new(item: impl Into<String>, disk: impl Into<String>, cycle: u64) -> Result<Self> {
        let key = StreamKey {
            item: item.into(),
            disk: disk.into(),
            cycle,
        };
        key.check()?;
        Ok(key)
    }

    fn check(&self) -> Result<()> {
        crate::item::check_name("item", &self.item).map_err(JournalError::InvalidKey)?;
        crate::item::check_name("disk", &self.disk).map_err(JournalError::InvalidKey)
    }

    /// `<cache_dir>/journal/<item>/<disk>/<cycle>`.
    pub fn dir(&self, cache_dir: &Path) -> Result<PathBuf> {
        self.check()?;
        Ok(cache_dir
            .join(JOURNAL_DIR)
            .join(&self.item)
            .join(&self.disk)
            .join(self.cycle.to_string()))
    }

    /// Every journal under `cache_dir`, sorted (what a restart replays). An entry that is not
    /// a journal directory is an error naming it.
    pub fn list(cache_dir: &Path) -> Result<Vec<StreamKey>> {
        let root = cache_dir.join(JOURNAL_DIR);
        let mut out = Vec::new();
        if !root.exists() {
            return Ok(out);
        }
        for (item, item_dir) in subdirs(&root)? {
            for (disk, disk_dir) in subdirs(&item_dir)? {
                for (cycle, cycle_dir) in subdirs(&disk_dir)? {
                    let key = match cycle.parse::<u64>() {
                        Ok(c) if c.to_string() == cycle => StreamKey {
                            item: item.clone(),
                            disk: disk.clone(),
                            cycle: c,
                        },
                        _ => {
                            return Err(JournalError::Unexpected {
                                path: cycle_dir,
                                reason: "not a cycle number: not a directory the journal creates"
                                    .into(),
                            });
                        }
                    };
                    key.check().map_err(|e| JournalError::Unexpected {
                        path: cycle_dir.clone(),
                        reason: e.to_string(),
                    })?;
                    out.push(key);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The sub-directories of `dir` with their names; anything else is an error.
fn subdirs(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("inspect", &path))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(JournalError::Unexpected {
                path,
                reason: "name is not UTF-8: not a directory the journal creates".into(),
            });
        };
        if !kind.is_dir() {
            return Err(JournalError::Unexpected {
                path,
                reason: "not a directory: not an entry the journal creates".into(),
            });
        }
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

/// Bytes of every file of every journal under `cache_dir`.
pub fn journal_usage(cache_dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    for key in StreamKey::list(cache_dir)? {
        let dir = key.dir(cache_dir)?;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let m = entry.metadata().map_err(io_err("inspect", &entry.path()))?;
            if m.is_file() {
                total = total.saturating_add(m.len());
            }
        }
    }
    Ok(total)
}

/// What [`Journal::open`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The lowest sequence number held, if any record is.
    pub first_seq: Option<u64>,
    /// The highest sequence number held: everything up to it is durable.
    pub last_seq: Option<u64>,
    /// The number the next append must carry; `None` for a journal without segments (it
    /// accepts any first number).
    pub next_seq: Option<u64>,
    /// Records held.
    pub records: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes of the segment files, after truncation.
    pub bytes: u64,
    /// Bytes of a torn tail cut from the last segment (0 if none).
    pub truncated_bytes: u64,
    /// Where the torn tail started: the last segment and the byte offset.
    pub truncated_at: Option<(PathBuf, u64)>,
    /// Segments left under their temporary name by a crash during creation, removed.
    pub removed_temp_files: usize,
}

/// What [`Journal::release_through`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Released {
    /// Segment files deleted.
    pub segments: usize,
    /// Their bytes.
    pub bytes: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Length including records still in the write buffer.
    len: u64,
    records: u64,
}

/// A begun sync ([`Journal::begin_sync`]): its records are written out, not yet durable.
#[derive(Debug)]
pub struct SyncTicket {
    file: File,
    path: PathBuf,
    upto: u64,
}

impl SyncTicket {
    /// Makes the records up to [`SyncTicket::upto`] durable (`fdatasync`; blocks). Returns
    /// that number, for [`Journal::end_sync`].
    pub fn run(self) -> Result<u64> {
        self.file.sync_data().map_err(io_err("sync", &self.path))?;
        Ok(self.upto)
    }

    /// The last record it covers.
    pub fn upto(&self) -> u64 {
        self.upto
    }
}

/// One stream's journal. See the module documentation for the contract.
pub struct Journal {
    dir: PathBuf,
    /// The open directory: `flock`ed while the journal is open, and synced through.
    dir_handle: File,
    limits: Limits,
    guard: Option<Arc<CacheGuard>>,
    segments: VecDeque<Segment>,
    /// The last segment, open for writing at its end (on disk, without the buffer).
    file: Option<File>,
    buf: Vec<u8>,
    next_seq: Option<u64>,
    last_seq: Option<u64>,
    durable: Option<u64>,
    /// Bytes written (or buffered) since the last `fdatasync`.
    unsynced: bool,
    /// A segment was created since the last directory sync.
    dir_dirty: bool,
    /// Syncs begun ([`Journal::begin_sync`]) and not ended: until they end, a full sync
    /// cannot tell what they have made durable, so it syncs again.
    inflight: u32,
    poisoned: bool,
    /// Bytes of all segments, buffered bytes included.
    bytes: u64,
    data_syncs: u64,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .field("segments", &self.segments.len())
            .field("next_seq", &self.next_seq)
            .field("durable", &self.durable)
            .field("bytes", &self.bytes)
            .field("buffered", &self.buf.len())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating it if absent, `0700`) the journal in `dir` and recovers it: every
    /// record is validated, a torn tail of the last segment is truncated, and what is held is
    /// made durable before it is reported. No cache-wide guard: only `limits` bound it.
    pub fn open(dir: &Path, limits: Limits) -> Result<(Journal, Recovered)> {
        Self::open_inner(dir, limits, None)
    }

    /// [`Journal::open`] with appends also admitted by `guard` (free space, cache-wide cap).
    pub fn open_guarded(
        dir: &Path,
        limits: Limits,
        guard: Arc<CacheGuard>,
    ) -> Result<(Journal, Recovered)> {
        Self::open_inner(dir, limits, Some(guard))
    }

    fn open_inner(
        dir: &Path,
        limits: Limits,
        guard: Option<Arc<CacheGuard>>,
    ) -> Result<(Journal, Recovered)> {
        limits.validate()?;
        let created = create_dir_durably(dir)?;
        let dir_handle = File::open(dir).map_err(io_err("open directory", dir))?;
        match rustix::fs::flock(
            &dir_handle,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(JournalError::InUse {
                    dir: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(io_err("lock", dir)(e.into())),
        }

        let mut rec = Recovered::default();
        let mut segments = VecDeque::new();
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_str().unwrap_or("");
            if let Some(seq) = parse_segment_name(name) {
                names.push((seq, path));
            } else if name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .and_then(parse_segment_name)
                .is_some()
            {
                // A segment whose creation did not finish: it never held a record.
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                rec.removed_temp_files += 1;
                if let Some(g) = &guard {
                    g.release(len);
                }
            } else {
                return Err(JournalError::Unexpected {
                    path,
                    reason: "not a file the journal writes (segments are named \
                             `<20 digits>.seg`); move it away"
                        .into(),
                });
            }
        }
        names.sort();

        let count = names.len();
        let mut next: Option<u64> = None;
        let mut payload = Vec::new();
        for (i, (first_seq, path)) in names.into_iter().enumerate() {
            let last = i + 1 == count;
            if let Some(expected) = next
                && first_seq != expected
            {
                return Err(corrupt(
                    &path,
                    0,
                    format!(
                        "segment starts at sequence number {first_seq}, but the previous one \
                         ends before {expected}: records are missing"
                    ),
                ));
            }
            fsutil::check_private_file(&path)?;
            let scan = scan_segment(&path, first_seq, limits.max_record, last, &mut payload)?;
            let mut len = scan.valid_len;
            if let Some(torn_at) = scan.torn_at {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                f.set_len(torn_at).map_err(io_err("truncate", &path))?;
                f.sync_all().map_err(io_err("sync", &path))?;
                rec.truncated_bytes = scan.file_len - torn_at;
                rec.truncated_at = Some((path.clone(), torn_at));
                if let Some(g) = &guard {
                    g.release(rec.truncated_bytes);
                }
                len = torn_at;
            }
            next = Some(first_seq + scan.records);
            rec.records += scan.records;
            rec.bytes += len;
            segments.push_back(Segment {
                first_seq,
                path,
                len,
                records: scan.records,
            });
        }

        let file = match segments.back() {
            Some(s) => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .open(&s.path)
                    .map_err(io_err("open", &s.path))?;
                f.seek(SeekFrom::Start(s.len))
                    .map_err(io_err("seek", &s.path))?;
                // What was read may still be only in the page cache (a SIGKILL, not a power
                // cut): make it durable before anyone acknowledges it.
                f.sync_data().map_err(io_err("sync", &s.path))?;
                Some(f)
            }
            None => None,
        };
        if file.is_some() || created || rec.removed_temp_files > 0 {
            dir_handle
                .sync_all()
                .map_err(io_err("sync directory", dir))?;
        }

        let first_held = segments.front().map(|s| s.first_seq);
        let last_seq = next
            .and_then(|n| n.checked_sub(1))
            .filter(|_| rec.records > 0);
        rec.first_seq = first_held.filter(|_| rec.records > 0);
        rec.last_seq = last_seq;
        rec.next_seq = next;
        rec.segments = segments.len();
        let journal = Journal {
            dir: dir.to_path_buf(),
            dir_handle,
            limits,
            guard,
            segments,
            file,
            buf: Vec::new(),
            next_seq: next,
            last_seq,
            durable: last_seq,
            unsynced: false,
            dir_dirty: false,
            inflight: 0,
            poisoned: false,
            bytes: rec.bytes,
            data_syncs: 0,
        };
        Ok((journal, rec))
    }

    /// The journal's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The number the next append must carry (`None`: any, the journal has no segment).
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    /// The highest sequence number appended, durable or not.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The highest sequence number known durable: the only one that may be acknowledged.
    pub fn durable_seq(&self) -> Option<u64> {
        self.durable
    }

    /// The lowest sequence number held (not yet released), if any record is held.
    pub fn first_seq(&self) -> Option<u64> {
        let first = self.segments.front()?;
        (self.last_seq? >= first.first_seq).then_some(first.first_seq)
    }

    /// Bytes the journal holds on disk (headers included), appended but unwritten ones too.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of segment files.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// Whether an I/O failure made this handle unusable (reopen the journal to go on).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The newest modification time of its segments (the journal last written).
    pub fn last_write(&self) -> Option<std::time::SystemTime> {
        self.segments
            .iter()
            .filter_map(|s| fs::metadata(&s.path).and_then(|m| m.modified()).ok())
            .max()
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Appends record `seq` with `payload`. Not durable until [`Journal::sync`] returns a
    /// number ≥ `seq`.
    ///
    /// Refused, with nothing written, when `seq` is not [`Journal::next_seq`] (a journal
    /// without segments accepts any number but `u64::MAX`), when the payload is longer than
    /// [`Limits::max_record`], or on backpressure. Returns the cache's level
    /// ([`CacheLevel::Warn`] when free space is below the warning threshold; never
    /// `Critical`, which refuses instead). An I/O error poisons the journal.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<CacheLevel> {
        self.check_usable()?;
        if let Some(expected) = self.next_seq
            && seq != expected
        {
            return Err(JournalError::OutOfOrder {
                dir: self.dir.clone(),
                seq,
                expected,
            });
        }
        if seq == u64::MAX {
            return Err(JournalError::SeqExhausted {
                dir: self.dir.clone(),
            });
        }
        let len = match u32::try_from(payload.len()) {
            Ok(n) if n <= self.limits.max_record => n,
            _ => {
                return Err(JournalError::RecordTooLarge {
                    dir: self.dir.clone(),
                    len: payload.len() as u64,
                    max: self.limits.max_record,
                });
            }
        };
        let record_bytes = RECORD_HEADER_LEN + u64::from(len);
        let roll = match self.segments.back() {
            None => true,
            Some(s) => s.records > 0 && s.len + record_bytes > self.limits.segment_bytes,
        };
        let need = record_bytes + if roll { HEADER_LEN } else { 0 };
        if self.bytes + need > self.limits.max_journal_bytes {
            return Err(JournalError::Backpressure {
                dir: self.dir.clone(),
                reason: BackpressureReason::JournalFull {
                    bytes: self.bytes,
                    incoming: need,
                    limit: self.limits.max_journal_bytes,
                },
            });
        }
        let level = match &self.guard {
            Some(g) => g
                .admit(need, true)?
                .map_err(|reason| JournalError::Backpressure {
                    dir: self.dir.clone(),
                    reason,
                })?,
            None => CacheLevel::Ok,
        };
        if let Err(e) = self.write_record(roll, seq, len, payload) {
            self.poisoned = true;
            return Err(e);
        }
        Ok(level)
    }

    fn write_record(&mut self, roll: bool, seq: u64, len: u32, payload: &[u8]) -> Result<()> {
        if roll {
            self.roll(seq)?;
        }
        let mut head = [0u8; 16];
        head[0..4].copy_from_slice(&len.to_le_bytes());
        head[4..8].copy_from_slice(&record_crc(seq, payload).to_le_bytes());
        head[8..16].copy_from_slice(&seq.to_le_bytes());
        let total = head.len() + payload.len();
        let seg = self
            .segments
            .back_mut()
            .expect("a segment exists after roll");
        if self.buf.len() + total > WRITE_BUFFER {
            let file = self.file.as_mut().expect("the last segment is open");
            let mut bufs = [
                IoSlice::new(&self.buf),
                IoSlice::new(&head),
                IoSlice::new(payload),
            ];
            write_all_vectored(file, &mut bufs).map_err(io_err("write", &seg.path))?;
            self.buf.clear();
        } else {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(WRITE_BUFFER);
            }
            self.buf.extend_from_slice(&head);
            self.buf.extend_from_slice(payload);
        }
        seg.len += total as u64;
        seg.records += 1;
        self.bytes += total as u64;
        self.next_seq = Some(seq + 1);
        self.last_seq = Some(seq);
        self.unsynced = true;
        Ok(())
    }

    /// Starts a segment whose first record is `seq`.
    fn roll(&mut self, seq: u64) -> Result<()> {
        if !self.segments.is_empty() {
            // The previous segment (and its name) is durable before a successor exists: only
            // the last segment can ever have a torn tail.
            self.sync_inner()?;
        }
        let name = segment_name(seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(&encode_header(seq))
            .and_then(|()| f.sync_all())
            .map_err(io_err("write", &tmp))?;
        fs::hard_link(&tmp, &path).map_err(io_err("create", &path))?;
        fs::remove_file(&tmp).map_err(io_err("remove", &tmp))?;
        self.file = Some(f);
        self.segments.push_back(Segment {
            first_seq: seq,
            path,
            len: HEADER_LEN,
            records: 0,
        });
        self.bytes += HEADER_LEN;
        self.dir_dirty = true;
        Ok(())
    }

    /// Makes every appended record durable and returns the highest durable sequence number
    /// (`None` if the journal holds none): the number to acknowledge. One call covers all
    /// appends since the last (group commit). An I/O error poisons the journal.
    pub fn sync(&mut self) -> Result<Option<u64>> {
        self.check_usable()?;
        if let Err(e) = self.sync_inner() {
            self.poisoned = true;
            return Err(e);
        }
        Ok(self.durable)
    }

    /// The first half of a [`Journal::sync`] that lets appends go on while the disk syncs
    /// (the session keeps reading frames meanwhile): writes the buffered records out (and
    /// makes a new segment's name durable), and returns a ticket whose [`SyncTicket::run`],
    /// on any thread, makes them durable; [`Journal::end_sync`] then records it. `None` when
    /// nothing waits to be synced. An I/O error poisons the journal.
    pub fn begin_sync(&mut self) -> Result<Option<SyncTicket>> {
        self.check_usable()?;
        let r = self.begin_sync_inner();
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn begin_sync_inner(&mut self) -> Result<Option<SyncTicket>> {
        let (Some(file), Some(seg)) = (self.file.as_mut(), self.segments.back()) else {
            return Ok(None);
        };
        if !self.buf.is_empty() {
            file.write_all(&self.buf)
                .map_err(io_err("write", &seg.path))?;
            self.buf.clear();
        }
        if self.dir_dirty {
            self.dir_handle
                .sync_all()
                .map_err(io_err("sync directory", &self.dir))?;
            self.dir_dirty = false;
        }
        if !self.unsynced {
            return Ok(None);
        }
        let Some(upto) = self.last_seq else {
            return Ok(None);
        };
        let file = file.try_clone().map_err(io_err("open", &seg.path))?;
        self.unsynced = false;
        self.inflight += 1;
        Ok(Some(SyncTicket {
            file,
            path: seg.path.clone(),
            upto,
        }))
    }

    /// The second half of [`Journal::begin_sync`]: what the ticket's run returned. Returns
    /// the highest durable sequence number, as [`Journal::sync`] does; a failed run poisons
    /// the journal.
    pub fn end_sync(&mut self, ran: Result<u64>) -> Result<Option<u64>> {
        self.inflight = self.inflight.saturating_sub(1);
        match ran {
            Ok(upto) => {
                self.data_syncs += 1;
                if self.durable.is_none_or(|d| d < upto) {
                    self.durable = Some(upto);
                }
                Ok(self.durable)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    fn sync_inner(&mut self) -> Result<()> {
        if let (Some(file), Some(seg)) = (self.file.as_mut(), self.segments.back()) {
            if !self.buf.is_empty() {
                file.write_all(&self.buf)
                    .map_err(io_err("write", &seg.path))?;
                self.buf.clear();
            }
            if self.unsynced || self.inflight > 0 {
                file.sync_data().map_err(io_err("sync", &seg.path))?;
                self.data_syncs += 1;
                self.unsynced = false;
            }
        }
        if self.dir_dirty {
            self.dir_handle
                .sync_all()
                .map_err(io_err("sync directory", &self.dir))?;
            self.dir_dirty = false;
        }
        self.durable = self.last_seq;
        Ok(())
    }

    /// Reads back the durable records from `from` on, in order, one at a time (memory bounded
    /// by `max_record`). The iterator owns what it needs, so it may run on another thread
    /// while appends go on; it stops at the durable number of the moment it was made. `from`
    /// must be held: from [`Journal::first_seq`] to one past [`Journal::durable_seq`].
    pub fn replay(&self, from: u64) -> Result<Replay> {
        let (Some(durable), Some(first)) = (self.durable, self.first_seq()) else {
            return Ok(Replay::empty(&self.dir));
        };
        if from < first || from > durable.saturating_add(1) {
            return Err(JournalError::NotHeld {
                dir: self.dir.clone(),
                seq: from,
                first: Some(first),
                durable: Some(durable),
            });
        }
        if from > durable {
            return Ok(Replay::empty(&self.dir));
        }
        let start = self
            .segments
            .iter()
            .rposition(|s| s.first_seq <= from)
            .unwrap_or(0);
        let segments = self
            .segments
            .iter()
            .skip(start)
            .take_while(|s| s.first_seq <= durable)
            .map(|s| (s.first_seq, s.path.clone()))
            .collect();
        Ok(Replay {
            dir: self.dir.clone(),
            segments,
            current: None,
            expected: self.segments[start].first_seq,
            from,
            until: durable,
            max_record: self.limits.max_record,
            done: false,
        })
    }

    /// Deletes the segments whose records are all ≤ `seq` (the drainer committed them to the
    /// vault). The last segment is never deleted, so the journal keeps knowing its next
    /// number; [`Journal::remove`] deletes everything. Deletions are durable on return.
    pub fn release_through(&mut self, seq: u64) -> Result<Released> {
        self.check_usable()?;
        let mut out = Released::default();
        while self.segments.len() > 1 && self.segments[1].first_seq <= seq.saturating_add(1) {
            let seg = &self.segments[0];
            fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path))?;
            out.segments += 1;
            out.bytes += seg.len;
            self.bytes -= seg.len;
            if let Some(g) = &self.guard {
                g.release(seg.len);
            }
            self.segments.pop_front();
        }
        if out.segments > 0 {
            self.dir_handle
                .sync_all()
                .map_err(io_err("sync directory", &self.dir))?;
        }
        Ok(out)
    }

    /// Deletes the whole journal (the cycle is in the vault, or abandoned) and its directory.
    /// Returns the bytes freed. Parent directories (item, disk) are left in place. Segments go
    /// last first, so a crash half-way leaves a valid prefix of the journal (its first record
    /// included), never a journal without its beginning.
    pub fn remove(mut self) -> Result<u64> {
        let freed = self.bytes;
        self.buf.clear();
        self.file = None;
        while let Some(seg) = self.segments.back() {
            fs::remove_file(&seg.path).map_err(io_err("remove", &seg.path))?;
            self.bytes -= seg.len;
            if let Some(g) = &self.guard {
                g.release(seg.len);
            }
            self.segments.pop_back();
        }
        if let Some(g) = &self.guard {
            g.release(self.bytes);
        }
        self.bytes = 0;
        fs::remove_dir(&self.dir).map_err(io_err("remove directory", &self.dir))?;
        if let Some(parent) = self.dir.parent() {
            fsutil::sync_dir(parent)?;
        }
        Ok(freed)
    }

    #[cfg(test)]
    fn data_syncs(&self) -> u64 {
        self.data_syncs
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Buffered records never reach the disk: they were never acknowledged either. (After
        // a failed write some of them may have: keep the count high rather than low.)
        if let Some(g) = self.guard.as_ref().filter(|_| !self.poisoned) {
            g.release(self.buf.len() as u64);
        }
    }
}

fn write_all_vectored(file: &mut File, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match file.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates `dir` (private) if absent and makes each new directory's name durable.
/// Returns whether it created it.
fn create_dir_durably(dir: &Path) -> Result<bool> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    fsutil::ensure_private_dir(dir)?;
    for m in missing.iter().rev() {
        if let Some(p) = m.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsutil::sync_dir(p)?;
        }
    }
    Ok(!missing.is_empty())
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn encode_header(first_seq: u64) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    // 12..16 flags, 24..28 reserved: zero in version 1.
    h[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns its first sequence number.
fn decode_header(path: &Path, h: &[u8; HEADER_SIZE]) -> Result<u64> {
    if h[0..8] != MAGIC {
        return Err(corrupt(path, 0, "bad magic: not a Ferry journal segment"));
    }
    let version = le32(&h[8..12]);
    if version > VERSION {
        return Err(JournalError::NewerFormat {
            path: path.to_path_buf(),
            version,
        });
    }
    if version == 0 {
        return Err(corrupt(path, 8, "format version 0 does not exist"));
    }
    let (stored, computed) = (le32(&h[28..32]), crc32c(&h[0..28]));
    if stored != computed {
        return Err(corrupt(
            path,
            28,
            format!("header checksum {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    let flags = le32(&h[12..16]);
    if flags != 0 || h[24..28] != [0; 4] {
        return Err(corrupt(
            path,
            12,
            format!("flags {flags:#x} or reserved bytes set; version 1 has none"),
        ));
    }
    Ok(le64(&h[16..24]))
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// CRC-32C (Castagnoli), hardware-accelerated where available.
fn crc32c(data: &[u8]) -> u32 {
    low32(crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data))
}

/// A record's CRC-32C: over its sequence number (8 bytes LE) then its payload.
fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    let mut d = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    d.update(&seq.to_le_bytes());
    d.update(payload);
    low32(d.finalize())
}

fn low32(v: u64) -> u32 {
    let b = v.to_le_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads until `buf` is full or end of file; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

struct Scan {
    file_len: u64,
    /// End of the last valid record.
    valid_len: u64,
    records: u64,
    /// Start of a torn tail to truncate (last segment only).
    torn_at: Option<u64>,
}

/// Validates every record of a segment. In the last segment, a first invalid record that no
/// valid record follows is a torn tail; anything else invalid is an error.
fn scan_segment(
    path: &Path,
    first_seq: u64,
    max_record: u32,
    last: bool,
    payload: &mut Vec<u8>,
) -> Result<Scan> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let file_len = file.metadata().map_err(io_err("inspect", path))?.len();
    if file_len < HEADER_LEN {
        return Err(corrupt(
            path,
            0,
            format!("{file_len} bytes, shorter than a segment header ({HEADER_LEN})"),
        ));
    }
    let mut h = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut h, 0)
        .map_err(io_err("read", path))?;
    let header_seq = decode_header(path, &h)?;
    if header_seq != first_seq {
        return Err(corrupt(
            path,
            16,
            format!("header says the first sequence number is {header_seq}, the name {first_seq}"),
        ));
    }
    let mut r = BufReader::with_capacity(READ_BUFFER, &file);
    r.seek(SeekFrom::Start(HEADER_LEN))
        .map_err(io_err("seek", path))?;
    let mut pos = HEADER_LEN;
    let mut expected = first_seq;
    let mut records = 0;
    while pos < file_len {
        let bad = match read_record(&mut r, pos, file_len, max_record, payload)
            .map_err(io_err("read", path))?
        {
            Check::Valid { seq, .. } if seq != expected => {
                return Err(corrupt(
                    path,
                    pos,
                    format!("record has sequence number {seq}, expected {expected}"),
                ));
            }
            Check::Valid { len, .. } => {
                pos += RECORD_HEADER_LEN + u64::from(len);
                expected += 1;
                records += 1;
                continue;
            }
            Check::Invalid(reason) => reason,
        };
        if !last {
            return Err(corrupt(
                path,
                pos,
                format!("{bad} (not the last segment, so not a torn write)"),
            ));
        }
        if let Some(at) = find_valid_record(&file, pos + 1, file_len, expected, max_record)
            .map_err(io_err("read", path))?
        {
            return Err(corrupt(
                path,
                pos,
                format!(
                    "{bad}; a valid record follows at offset {at}, so this is not a torn write"
                ),
            ));
        }
        return Ok(Scan {
            file_len,
            valid_len: pos,
            records,
            torn_at: Some(pos),
        });
    }
    Ok(Scan {
        file_len,
        valid_len: pos,
        records,
        torn_at: None,
    })
}

enum Check {
    Valid { seq: u64, len: u32 },
    Invalid(String),
}

/// Reads and checks the record at `pos` (the reader's position). Its length is checked
/// against `max_record` and the file before anything is allocated.
fn read_record(
    r: &mut impl Read,
    pos: u64,
    file_len: u64,
    max_record: u32,
    payload: &mut Vec<u8>,
) -> io::Result<Check> {
    let mut head = [0u8; RECORD_HEADER_SIZE];
    let n = read_full(r, &mut head)?;
    if n < head.len() {
        return Ok(Check::Invalid(format!(
            "{n} bytes left, less than a record header"
        )));
    }
    let len = le32(&head[0..4]);
    let crc = le32(&head[4..8]);
    let seq = le64(&head[8..16]);
    if len > max_record {
        return Ok(Check::Invalid(format!(
            "record length {len} is larger than max_record ({max_record})"
        )));
    }
    let end = pos + RECORD_HEADER_LEN + u64::from(len);
    if end > file_len {
        return Ok(Check::Invalid(format!(
            "record of {len} bytes runs past the end of the file ({file_len} bytes)"
        )));
    }
    payload.clear();
    payload.resize(len as usize, 0);
    r.read_exact(payload)?;
    let computed = record_crc(seq, payload);
    if computed != crc {
        return Ok(Check::Invalid(format!(
            "record checksum {crc:#010x}, computed {computed:#010x}"
        )));
    }
    Ok(Check::Valid { seq, len })
}

/// Looks for a valid record (checksum right, sequence number ≥ `min_seq`) starting anywhere in
/// `start..end`: if there is one, the damage before it is not a torn tail. Bounded memory: a
/// window and one payload.
fn find_valid_record(
    file: &File,
    start: u64,
    end: u64,
    min_seq: u64,
    max_record: u32,
) -> io::Result<Option<u64>> {
    let rh = RECORD_HEADER_SIZE;
    // No more records can follow than fit in the rest of the file.
    let max_seq = min_seq.saturating_add((end.saturating_sub(start)) / RECORD_HEADER_LEN + 1);
    let mut window = vec![0u8; SCAN_WINDOW + rh - 1];
    let mut payload = Vec::new();
    let mut base = start;
    while base + RECORD_HEADER_LEN <= end {
        let n = usize::try_from((end - base).min(window.len() as u64)).unwrap_or(window.len());
        file.read_exact_at(&mut window[..n], base)?;
        for i in 0..=(n - rh) {
            let h = &window[i..i + rh];
            let len = le32(&h[0..4]);
            let seq = le64(&h[8..16]);
            let at = base + i as u64;
            if len > max_record
                || seq < min_seq
                || seq > max_seq
                || at + RECORD_HEADER_LEN + u64::from(len) > end
            {
                continue;
            }
            payload.clear();
            payload.resize(len as usize, 0);
            file.read_exact_at(&mut payload, at + RECORD_HEADER_LEN)?;
            if record_crc(seq, &payload) == le32(&h[4..8]) {
                return Ok(Some(at));
            }
        }
        base += (n - (rh - 1)) as u64;
    }
    Ok(None)
}

/// Durable records of a journal, in order: `(sequence number, payload)`. Made by
/// [`Journal::replay`]. Each record is checked again (length bound, checksum, sequence);
/// after an error the iterator ends.
pub struct Replay {
    dir: PathBuf,
    segments: VecDeque<(u64, PathBuf)>,
    current: Option<SegmentReader>,
    /// The sequence number of the next record read.
    expected: u64,
    from: u64,
    /// The last sequence number to yield.
    until: u64,
    max_record: u32,
    done: bool,
}

struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    pos: u64,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replay")
            .field("dir", &self.dir)
            .field("next", &self.expected)
            .field("from", &self.from)
            .field("until", &self.until)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Replay {
    fn empty(dir: &Path) -> Replay {
        Replay {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            current: None,
            expected: 0,
            from: 0,
            until: 0,
            max_record: 0,
            done: true,
        }
    }

    fn open_next(&mut self) -> Result<SegmentReader> {
        let Some((first_seq, path)) = self.segments.pop_front() else {
            return Err(JournalError::Unexpected {
                path: self.dir.clone(),
                reason: format!(
                    "the segments end before sequence number {}, which was durable",
                    self.expected
                ),
            });
        };
        let file = File::open(&path).map_err(io_err("open", &path))?;
        let mut reader = BufReader::with_capacity(READ_BUFFER, file);
        let mut h = [0u8; HEADER_SIZE];
        reader.read_exact(&mut h).map_err(io_err("read", &path))?;
        let header_seq = decode_header(&path, &h)?;
        if header_seq != first_seq || first_seq != self.expected {
            return Err(corrupt(
                &path,
                16,
                format!(
                    "segment starts at sequence number {header_seq}, expected {}",
                    self.expected
                ),
            ));
        }
        Ok(SegmentReader {
            path,
            reader,
            pos: HEADER_LEN,
        })
    }

    fn step(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        loop {
            if self.current.is_none() {
                self.current = Some(self.open_next()?);
            }
            let cur = self.current.as_mut().expect("just opened");
            let mut head = [0u8; RECORD_HEADER_SIZE];
            let n = read_full(&mut cur.reader, &mut head).map_err(io_err("read", &cur.path))?;
            if n == 0 {
                self.current = None;
                continue;
            }
            if n < head.len() {
                return Err(corrupt(&cur.path, cur.pos, "truncated record header"));
            }
            let len = le32(&head[0..4]);
            let seq = le64(&head[8..16]);
            if len > self.max_record {
                return Err(corrupt(
                    &cur.path,
                    cur.pos,
                    format!(
                        "record length {len} is larger than max_record ({})",
                        self.max_record
                    ),
                ));
            }
            if seq != self.expected {
                return Err(corrupt(
                    &cur.path,
                    cur.pos,
                    format!(
                        "record has sequence number {seq}, expected {}",
                        self.expected
                    ),
                ));
            }
            let at = cur.pos;
            cur.pos += RECORD_HEADER_LEN + u64::from(len);
            self.expected += 1;
            if seq < self.from {
                cur.reader
                    .seek_relative(i64::from(len))
                    .map_err(io_err("seek", &cur.path))?;
                continue;
            }
            let mut payload = vec![0u8; len as usize];
            cur.reader
                .read_exact(&mut payload)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => corrupt(&cur.path, at, "truncated record"),
                    _ => io_err("read", &cur.path)(e),
                })?;
            let computed = record_crc(seq, &payload);
            if computed != le32(&head[4..8]) {
                return Err(corrupt(
                    &cur.path,
                    at,
                    format!(
                        "record checksum {:#010x}, computed {computed:#010x}",
                        le32(&head[4..8])
                    ),
                ));
            }
            if seq >= self.until {
                self.done = true;
            }
            return Ok(Some((seq, payload)));
        }
    }
}

impl Iterator for Replay {
    type Item = Result<(u64, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for Replay {}

/// Thresholds of the cache (Site Recovery's defaults: warn below 30% free, critical below
/// 25%) and the cap on all its journals together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Below this share of free space, appends still go through but report
    /// [`CacheLevel::Warn`] (the alert).
    pub warn_free_percent: u8,
    /// Below this share of free space (after the append), appends are refused.
    pub critical_free_percent: u8,
    /// Most bytes all journals of the cache may hold together.
    pub max_journal_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            warn_free_percent: 30,
            critical_free_percent: 25,
            max_journal_bytes: 64 << 30,
        }
    }
}

impl CacheLimits {
    /// Checks `critical ≤ warn ≤ 100`.
    pub fn validate(&self) -> Result<()> {
        if self.critical_free_percent > self.warn_free_percent || self.warn_free_percent > 100 {
            return Err(JournalError::InvalidLimits(format!(
                "need critical_free_percent ({}) ≤ warn_free_percent ({}) ≤ 100",
                self.critical_free_percent, self.warn_free_percent
            )));
        }
        Ok(())
    }
}

/// Space of the cache filesystem, as `statvfs` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeSpace {
    /// Size of the filesystem (`f_blocks × f_frsize`).
    pub total_bytes: u64,
    /// Bytes `ferryd` may still write (`f_bavail × f_frsize`: without the root reserve).
    pub available_bytes: u64,
}

/// Reads the free space of the filesystem holding `path`.
pub fn statvfs_free_space(path: &Path) -> io::Result<FreeSpace> {
    let s = rustix::fs::statvfs(path)?;
    Ok(FreeSpace {
        total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
        available_bytes: s.f_bavail.saturating_mul(s.f_frsize),
    })
}

/// How full the cache is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLevel {
    /// At or above the warning threshold.
    Ok,
    /// Below the warning threshold: raise the alert.
    Warn,
    /// Below the critical threshold: appends are refused.
    Critical,
}

/// A reading of the cache, for metrics and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStatus {
    /// Free-space level.
    pub level: CacheLevel,
    /// The filesystem.
    pub space: FreeSpace,
    /// Bytes all journals hold.
    pub journal_bytes: u64,
    /// Their cap.
    pub journal_limit: u64,
}

impl CacheStatus {
    /// Free space in percent of the filesystem.
    pub fn free_percent(&self) -> f64 {
        if self.space.total_bytes == 0 {
            return 0.0;
        }
        self.space.available_bytes as f64 * 100.0 / self.space.total_bytes as f64
    }
}

type Probe = Box<dyn Fn(&Path) -> io::Result<FreeSpace> + Send + Sync>;

/// The cache-wide bound shared (in an `Arc`) by every journal of a cache directory: it reads
/// the filesystem's free space on each append and counts the bytes of all journals against a
/// cap. The count starts from what is on disk when the guard is made (at start-up) and
/// follows every journal opened with it; journal files changed behind its back are not seen
/// until the next start. Reservations are atomic, so concurrent journals never pass the cap
/// together.
pub struct CacheGuard {
    cache_dir: PathBuf,
    limits: CacheLimits,
    used: AtomicU64,
    probe: Probe,
}

impl fmt::Debug for CacheGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheGuard")
            .field("cache_dir", &self.cache_dir)
            .field("limits", &self.limits)
            .field("used", &self.used.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CacheGuard {
    /// A guard for `cache_dir` reading free space with `statvfs`.
    pub fn new(cache_dir: &Path, limits: CacheLimits) -> Result<CacheGuard> {
        Self::with_probe(cache_dir, limits, statvfs_free_space)
    }

    /// A guard reading free space with `probe` (tests; other filesystems' notions of space).
    pub fn with_probe(
        cache_dir: &Path,
        limits: CacheLimits,
        probe: impl Fn(&Path) -> io::Result<FreeSpace> + Send + Sync + 'static,
    ) -> Result<CacheGuard> {
        limits.validate()?;
        Ok(CacheGuard {
            cache_dir: cache_dir.to_path_buf(),
            limits,
            used: AtomicU64::new(journal_usage(cache_dir)?),
            probe: Box::new(probe),
        })
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Its limits.
    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    /// Bytes all journals hold (as counted).
    pub fn journal_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Opens the journal of `key` under this cache, guarded.
    pub fn open_journal(
        self: &Arc<Self>,
        key: &StreamKey,
        limits: Limits,
    ) -> Result<(Journal, Recovered)> {
        Journal::open_guarded(&key.dir(&self.cache_dir)?, limits, Arc::clone(self))
    }

    fn space(&self) -> Result<FreeSpace> {
        (self.probe)(&self.cache_dir).map_err(io_err("read free space of", &self.cache_dir))
    }

    fn level(&self, space: FreeSpace) -> CacheLevel {
        let below = |percent: u8| {
            u128::from(space.available_bytes) * 100
                < u128::from(percent) * u128::from(space.total_bytes)
        };
        if space.total_bytes == 0 || below(self.limits.critical_free_percent) {
            CacheLevel::Critical
        } else if below(self.limits.warn_free_percent) {
            CacheLevel::Warn
        } else {
            CacheLevel::Ok
        }
    }

    /// The cache now: free-space level and journal bytes.
    pub fn status(&self) -> Result<CacheStatus> {
        let space = self.space()?;
        Ok(CacheStatus {
            level: self.level(space),
            space,
            journal_bytes: self.journal_bytes(),
            journal_limit: self.limits.max_journal_bytes,
        })
    }

    /// Would `bytes` more journal bytes be admitted now? `Ok` or `Warn`, or
    /// [`JournalError::Backpressure`] when the cache would be below the critical threshold or
    /// the journals past their cap. Reserves nothing (for answering a `Hello` with `Busy`
    /// before any append); journals opened with the guard reserve on every append.
    pub fn check(&self, bytes: u64) -> Result<CacheLevel> {
        self.admit(bytes, false)?
            .map_err(|reason| JournalError::Backpressure {
                dir: self.cache_dir.clone(),
                reason,
            })
    }

    /// Checks free space and the cap for `bytes` more, and with `reserve` counts them.
    fn admit(&self, bytes: u64, reserve: bool) -> Result<Result<CacheLevel, BackpressureReason>> {
        let space = self.space()?;
        let after = FreeSpace {
            total_bytes: space.total_bytes,
            available_bytes: space.available_bytes.saturating_sub(bytes),
        };
        let level = self.level(after);
        if level == CacheLevel::Critical {
            return Ok(Err(BackpressureReason::LowFreeSpace {
                available_bytes: space.available_bytes,
                total_bytes: space.total_bytes,
                critical_percent: self.limits.critical_free_percent,
            }));
        }
        let limit = self.limits.max_journal_bytes;
        let fits = |used: u64| used.checked_add(bytes).filter(|&total| total <= limit);
        let admitted = if reserve {
            self.used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, fits)
        } else {
            let used = self.used.load(Ordering::Acquire);
            fits(used).map(|_| used).ok_or(used)
        };
        Ok(match admitted {
            Ok(_) => Ok(level),
            Err(used) => Err(BackpressureReason::CacheJournalsFull {
                bytes: used,
                incoming: bytes,
                limit,
            }),
        })
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::atomic::AtomicU64;

    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/journal-v1");

    /// Records of 100 bytes are 116 bytes on disk.
    const REC: u64 = RECORD_HEADER_LEN + 100;

    fn limits(segment_bytes: u64) -> Limits {
        Limits {
            max_record: 4096,
            segment_bytes,
            max_journal_bytes: 1 << 30,
        }
    }

    fn payload(seq: u64, len: u64) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((seq * 31 + i * 7) % 251).unwrap())
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    fn replay_all(j: &Journal, from: u64) -> Vec<(u64, Vec<u8>)> {
        j.replay(from).unwrap().map(|r| r.unwrap()).collect()
    }

    /// Writes a private file, as the journal's own would be.
    fn put(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// A journal in `dir` holding `seqs` with 100-byte payloads, synced and closed.
    fn journal_with(dir: &Path, seqs: std::ops::RangeInclusive<u64>, segment_bytes: u64) {
        let (mut j, _) = Journal::open(dir, limits(segment_bytes)).unwrap();
        for s in seqs.clone() {
            j.append(s, &payload(s, 100)).unwrap();
        }
        assert_eq!(j.sync().unwrap(), Some(*seqs.end()));
    }

    #[test]
    fn crc_is_crc32c() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut v = 7u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"abc");
        assert_eq!(record_crc(7, b"abc"), crc32c(&v));
    }

    #[test]
    fn append_sync_reopen_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("journal/web-01/os/1");
        let (mut j, rec) = Journal::open(&dir, limits(1 << 20)).unwrap();
        assert_eq!(rec, Recovered::default());
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(j.sync().unwrap(), None);
        assert_eq!(j.replay(0).unwrap().count(), 0);
        for s in 1..=3 {
            assert_eq!(j.append(s, &payload(s, 100)).unwrap(), CacheLevel::Ok);
        }
        assert_eq!((j.last_seq(), j.durable_seq()), (Some(3), None));
        assert_eq!(j.sync().unwrap(), Some(3));
        assert_eq!(j.durable_seq(), Some(3));
        drop(j);

        let (j, rec) = Journal::open(&dir, limits(1 << 20)).unwrap();
        let seg = dir.join("00000000000000000001.seg");
        assert_eq!(
            rec,
            Recovered {
                first_seq: Some(1),
                last_seq: Some(3),
                next_seq: Some(4),
                records: 3,
                segments: 1,
                bytes: HEADER_LEN + 3 * REC,
                ..Recovered::default()
            }
        );
        assert_eq!(segment_files(&dir), vec![seg.clone()]);
        assert_eq!(fs::metadata(&seg).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&seg).unwrap().len(), HEADER_LEN + 3 * REC);
        assert_eq!(
            replay_all(&j, 1),
            (1..=3).map(|s| (s, payload(s, 100))).collect::<Vec<_>>()
        );
        assert_eq!(
            (j.first_seq(), j.durable_seq(), j.next_seq()),
            (Some(1), Some(3), Some(4))
        );
    }

    #[test]
    fn a_sync_in_two_halves_lets_appends_go_on() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), limits(64 << 20)).unwrap();
        for s in 1..=3 {
            j.append(s, &payload(s, 100)).unwrap();
        }
        let t = j.begin_sync().unwrap().expect("records wait");
        assert_eq!(t.upto(), 3);
        // Appends go on while the ticket runs elsewhere; they are not covered by it.
        j.append(4, &payload(4, 100)).unwrap();
        let ran = std::thread::spawn(move || t.run()).join().unwrap();
        assert_eq!(j.end_sync(ran).unwrap(), Some(3));
        assert_eq!(j.durable_seq(), Some(3));
        // A full sync covers the rest; nothing left, no ticket.
        assert_eq!(j.sync().unwrap(), Some(4));
        assert!(j.begin_sync().unwrap().is_none());
        let got: Vec<u64> = j.replay(1).unwrap().map(|r| r.unwrap().0).collect();
        assert_eq!(got, vec![1, 2, 3, 4]);
        // A failed run poisons the journal.
        j.append(5, &payload(5, 100)).unwrap();
        let t = j.begin_sync().unwrap().unwrap();
        drop(t);
        let e = j.end_sync(Err(JournalError::Poisoned {
            dir: d.path().to_path_buf(),
        }));
        assert!(e.is_err());
        assert!(j.is_poisoned());
    }

    #[test]
    fn sync_is_group_commit() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), limits(64 << 20)).unwrap();
        // Small records are gathered, large ones written straight through; either way, one
        // fdatasync makes all of them durable.
        for s in 1..=1000 {
            let len = if s % 100 == 0 { 4096 } else { 40 };
            j.append(s, &payload(s, len)).unwrap();
        }
        assert_eq!(j.durable_seq(), None);
        assert_eq!(j.data_syncs(), 0);
        assert_eq!(j.sync().unwrap(), Some(1000));
        assert_eq!(j.data_syncs(), 1);
        // Nothing new: nothing to flush.
        assert_eq!(j.sync().unwrap(), Some(1000));
        assert_eq!(j.data_syncs(), 1);
        j.append(1001, b"x").unwrap();
        assert_eq!(j.sync().unwrap(), Some(1001));
        assert_eq!(j.data_syncs(), 2);
        let all = replay_all(&j, 1);
        assert_eq!(all.len(), 1001);
        assert_eq!(all[99], (100, payload(100, 4096)));
    }

    #[test]
    fn refused_appends_write_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), limits(1 << 20)).unwrap();
        // A journal without segments takes any first number but u64::MAX.
        assert!(matches!(
            j.append(u64::MAX, b"x"),
            Err(JournalError::SeqExhausted { .. })
        ));
        assert!(segment_files(d.path()).is_empty());
        j.append(41, b"first").unwrap();
        j.sync().unwrap();
        let seg = segment_files(d.path()).pop().unwrap();
        let before = fs::read(&seg).unwrap();
        for seq in [41, 40, 43, 0] {
            let e = j.append(seq, b"again").unwrap_err();
            assert!(
                matches!(e, JournalError::OutOfOrder { seq: s, expected: 42, .. } if s == seq),
                "{e}"
            );
            assert!(e.to_string().contains("nothing was written"), "{e}");
        }
        let e = j.append(42, &[0; 4097]).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::RecordTooLarge {
                    len: 4097,
                    max: 4096,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(j.sync().unwrap(), Some(41));
        assert_eq!(fs::read(&seg).unwrap(), before);
        // Refusals do not poison: the next number still goes in.
        j.append(42, &[7; 4096]).unwrap();
        assert_eq!(j.sync().unwrap(), Some(42));
    }

    #[test]
    fn torn_tail_is_truncated_at_every_offset() {
        let d = tempfile::tempdir().unwrap();
        let orig = d.path().join("orig");
        journal_with(&orig, 1..=3, 1 << 20);
        let name = "00000000000000000001.seg";
        let full = fs::read(orig.join(name)).unwrap();
        let start3 = HEADER_LEN + 2 * REC;
        assert_eq!(full.len() as u64, start3 + REC);

        let recover = |tag: &str, bytes: &[u8]| {
            let dir = d.path().join(tag);
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            put(&dir.join(name), bytes);
            let (j, rec) = Journal::open(&dir, limits(1 << 20)).unwrap();
            (dir, j, rec)
        };

        // A crash mid-write of record 3: cut anywhere inside it.
        for cut in start3..full.len() as u64 {
            let (dir, mut j, rec) = recover(
                &format!("cut-{cut}"),
                &full[..usize::try_from(cut).unwrap()],
            );
            assert_eq!(rec.last_seq, Some(2), "cut at {cut}");
            assert_eq!(rec.next_seq, Some(3));
            assert_eq!(rec.truncated_bytes, cut - start3, "cut at {cut}");
            let expect_at = (cut > start3).then(|| (dir.join(name), start3));
            assert_eq!(rec.truncated_at, expect_at);
            assert_eq!(fs::metadata(dir.join(name)).unwrap().len(), start3);
            if cut % 29 == 0 {
                // The journal goes on from there.
                j.append(3, b"resent").unwrap();
                assert_eq!(j.sync().unwrap(), Some(3));
                drop(j);
                let (j, rec) = Journal::open(&dir, limits(1 << 20)).unwrap();
                assert_eq!((rec.last_seq, rec.truncated_bytes), (Some(3), 0));
                assert_eq!(replay_all(&j, 3), vec![(3, b"resent".to_vec())]);
            }
        }

        // Garbage or zeros after the last record (a crash after the size grew).
        let mut noise = 0x9E37_79B9_7F4A_7C15u64;
        for (tag, tail) in [
            ("zeros", vec![0u8; 4096]),
            (
                "garbage",
                (0..777)
                    .map(|_| {
                        noise ^= noise << 13;
                        noise ^= noise >> 7;
                        noise ^= noise << 17;
                        noise.to_le_bytes()[0]
                    })
                    .collect(),
            ),
            ("short", vec![1, 2, 3]),
        ] {
            let mut bytes = full.clone();
            bytes.extend_from_slice(&tail);
            let (_, j, rec) = recover(tag, &bytes);
            assert_eq!(rec.last_seq, Some(3), "{tag}");
            assert_eq!(rec.truncated_bytes, tail.len() as u64, "{tag}");
            assert_eq!(replay_all(&j, 1).len(), 3);
        }

        // The last record complete but damaged: nothing follows it, so it is a torn write.
        let mut bytes = full.clone();
        *bytes.last_mut().unwrap() ^= 0x40;
        let (_, _, rec) = recover("last-damaged", &bytes);
        assert_eq!((rec.last_seq, rec.truncated_bytes), (Some(2), REC));
    }

    #[test]
    fn corruption_before_the_tail_is_an_error_naming_file_and_offset() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("j");
        journal_with(&dir, 1..=3, 1 << 20);
        let seg = dir.join("00000000000000000001.seg");
        let full = fs::read(&seg).unwrap();

        // A flipped payload byte in record 1, and a length field of record 2 made huge: both
        // followed by valid records.
        for (at, record_at) in [
            (HEADER_LEN + 16 + 5, HEADER_LEN),
            (HEADER_LEN + REC + 3, HEADER_LEN + REC),
        ] {
            let mut bytes = full.clone();
            bytes[usize::try_from(at).unwrap()] ^= 0x01;
            put(&seg, &bytes);
            let e = Journal::open(&dir, limits(1 << 20)).unwrap_err();
            match &e {
                JournalError::Corrupt { path, offset, .. } => {
                    assert_eq!((path, *offset), (&seg, record_at), "{e}");
                }
                _ => panic!("{e}"),
            }
            let msg = e.to_string();
            assert!(msg.contains("00000000000000000001.seg"), "{msg}");
            assert!(msg.contains(&format!("byte offset {record_at}")), "{msg}");
            assert!(msg.contains("not a torn write"), "{msg}");
            // Nothing was cut.
            assert_eq!(fs::read(&seg).unwrap(), bytes);
        }

        // Damage in a segment that is not the last is never a torn tail, even at its end.
        let d2 = tempfile::tempdir().unwrap();
        journal_with(d2.path(), 1..=4, HEADER_LEN + 2 * REC);
        let segs = segment_files(d2.path());
        assert_eq!(segs.len(), 2);
        let mut bytes = fs::read(&segs[0]).unwrap();
        *bytes.last_mut().unwrap() ^= 0x80;
        put(&segs[0], &bytes);
        let e = Journal::open(d2.path(), limits(HEADER_LEN + 2 * REC)).unwrap_err();
        assert!(
            matches!(&e, JournalError::Corrupt { path, offset, .. } if *path == segs[0] && *offset == HEADER_LEN + REC),
            "{e}"
        );
        // A missing segment is a gap, not a shorter journal.
        let d3 = tempfile::tempdir().unwrap();
        journal_with(d3.path(), 1..=6, HEADER_LEN + 2 * REC);
        fs::remove_file(d3.path().join("00000000000000000003.seg")).unwrap();
        let e = Journal::open(d3.path(), limits(HEADER_LEN + 2 * REC)).unwrap_err();
        assert!(e.to_string().contains("records are missing"), "{e}");
    }

    #[test]
    fn length_fields_are_bounded_before_allocation() {
        let d = tempfile::tempdir().unwrap();
        let lim = limits(HEADER_LEN + 2 * REC);
        journal_with(d.path(), 1..=4, lim.segment_bytes);
        let segs = segment_files(d.path());
        let original: Vec<Vec<u8>> = segs.iter().map(|s| fs::read(s).unwrap()).collect();
        let claim_4gib = |seg: &Path, record_at: u64| {
            let mut b = fs::read(seg).unwrap();
            let at = usize::try_from(record_at).unwrap();
            b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            put(seg, &b);
        };

        // In an earlier segment: an error, not an allocation of 4 GiB.
        claim_4gib(&segs[0], HEADER_LEN);
        let e = Journal::open(d.path(), lim).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("record length 4294967295 is larger than max_record (4096)"),
            "{msg}"
        );
        assert!(msg.contains("byte offset 32"), "{msg}");
        put(&segs[0], &original[0]);

        // At the tail of the last segment: a torn write, cut.
        claim_4gib(&segs[1], HEADER_LEN + REC);
        let (j, rec) = Journal::open(d.path(), lim).unwrap();
        assert_eq!((rec.last_seq, rec.truncated_bytes), (Some(3), REC));

        // A replay checks again: a file damaged after opening is refused, not allocated.
        claim_4gib(&segs[0], HEADER_LEN + REC);
        let mut r = j.replay(1).unwrap();
        assert_eq!(r.next().unwrap().unwrap().0, 1);
        let e = r.next().unwrap().unwrap_err();
        assert!(
            matches!(&e, JournalError::Corrupt { path, offset, .. } if *path == segs[0] && *offset == HEADER_LEN + REC),
            "{e}"
        );
        assert!(r.next().is_none());
    }

    #[test]
    fn segments_roll_and_release_whole_segments_only() {
        let d = tempfile::tempdir().unwrap();
        let lim = limits(HEADER_LEN + 2 * REC); // two records per segment
        let (mut j, _) = Journal::open(d.path(), lim).unwrap();
        for s in 1..=7 {
            j.append(s, &payload(s, 100)).unwrap();
        }
        assert_eq!(j.sync().unwrap(), Some(7));
        let names: Vec<String> = segment_files(d.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "00000000000000000001.seg",
                "00000000000000000003.seg",
                "00000000000000000005.seg",
                "00000000000000000007.seg"
            ]
        );
        assert_eq!(j.bytes(), 4 * HEADER_LEN + 7 * REC);
        // A record larger than a segment still gets one of its own.
        j.append(8, &payload(8, 1000)).unwrap();
        j.append(9, b"small").unwrap();
        j.sync().unwrap();
        assert_eq!(j.segments(), 6);

        let full = HEADER_LEN + 2 * REC;
        assert_eq!(j.release_through(0).unwrap(), Released::default());
        assert_eq!(
            j.release_through(2).unwrap(),
            Released {
                segments: 1,
                bytes: full
            }
        );
        // Segment 3 holds 3 and 4: not released through 3.
        assert_eq!(j.release_through(3).unwrap().segments, 0);
        assert_eq!(j.release_through(6).unwrap().segments, 2);
        assert_eq!(j.first_seq(), Some(7));
        // The last segment is never released.
        assert_eq!(j.release_through(u64::MAX).unwrap().segments, 2);
        assert_eq!(segment_files(d.path()).len(), 1);
        assert_eq!(j.first_seq(), Some(9));
        assert!(matches!(
            j.replay(8),
            Err(JournalError::NotHeld { seq: 8, .. })
        ));
        assert_eq!(replay_all(&j, 9), vec![(9, b"small".to_vec())]);
        drop(j);
        let (j, rec) = Journal::open(d.path(), lim).unwrap();
        assert_eq!(
            (rec.first_seq, rec.last_seq, rec.segments),
            (Some(9), Some(9), 1)
        );
        assert_eq!(j.bytes(), HEADER_LEN + RECORD_HEADER_LEN + 5);

        // `remove` deletes the cycle's directory and nothing above it.
        let sub = d.path().join("item/disk/3");
        let (mut j, _) = Journal::open(&sub, lim).unwrap();
        j.append(1, b"x").unwrap();
        j.sync().unwrap();
        assert_eq!(j.remove().unwrap(), HEADER_LEN + RECORD_HEADER_LEN + 1);
        assert!(!sub.exists());
        assert!(d.path().join("item/disk").is_dir());
    }

    #[test]
    fn replay_from_the_middle_yields_only_durable_records() {
        let d = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(d.path(), limits(HEADER_LEN + 3 * REC)).unwrap();
        for s in 10..=29 {
            j.append(s, &payload(s, 100)).unwrap();
        }
        j.sync().unwrap();
        j.append(30, &payload(30, 100)).unwrap(); // not synced
        assert_eq!(
            replay_all(&j, 17),
            (17..=29).map(|s| (s, payload(s, 100))).collect::<Vec<_>>()
        );
        // Replay owns its state: it can run on another thread while appends go on.
        let r = j.replay(10).unwrap();
        let reader = std::thread::spawn(move || r.map(|x| x.unwrap().0).collect::<Vec<_>>());
        // 31 starts a segment: rolling makes the previous one, and so 30, durable.
        j.append(31, b"more").unwrap();
        assert_eq!(reader.join().unwrap(), (10..=29).collect::<Vec<_>>());
        assert_eq!(j.durable_seq(), Some(30));
        assert_eq!(j.replay(31).unwrap().count(), 0);
        for bad in [9, 32] {
            let e = j.replay(bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    JournalError::NotHeld {
                        first: Some(10),
                        durable: Some(30),
                        ..
                    }
                ),
                "{e}"
            );
            assert!(e.to_string().contains("durable records are 10..=30"), "{e}");
        }
        j.sync().unwrap();
        assert_eq!(replay_all(&j, 29).len(), 3);
    }

    #[test]
    fn recovery_cleans_creation_leftovers_and_refuses_strangers() {
        let d = tempfile::tempdir().unwrap();
        let lim = limits(HEADER_LEN + 2 * REC);
        journal_with(d.path(), 1..=2, lim.segment_bytes);
        // A crash while creating segment 3: its temporary file, then an empty segment 3.
        put(
            &d.path().join(".00000000000000000003.seg.tmp"),
            &encode_header(3)[..10],
        );
        let (j, rec) = Journal::open(d.path(), lim).unwrap();
        assert_eq!(rec.removed_temp_files, 1);
        assert_eq!(rec.last_seq, Some(2));
        drop(j);
        put(
            &d.path().join("00000000000000000003.seg"),
            &encode_header(3),
        );
        let (mut j, rec) = Journal::open(d.path(), lim).unwrap();
        assert_eq!(
            (rec.last_seq, rec.next_seq, rec.segments),
            (Some(2), Some(3), 2)
        );
        j.append(3, b"three").unwrap();
        j.sync().unwrap();
        assert_eq!(j.segments(), 2);
        drop(j);
        assert_eq!(Journal::open(d.path(), lim).unwrap().1.last_seq, Some(3));

        // Something the journal does not write.
        put(&d.path().join("notes.txt"), b"hello");
        let e = Journal::open(d.path(), lim).unwrap_err();
        assert!(
            matches!(e, JournalError::Unexpected { .. }) && e.to_string().contains("notes.txt"),
            "{e}"
        );
        fs::remove_file(d.path().join("notes.txt")).unwrap();

        // Segments are private.
        let seg = d.path().join("00000000000000000001.seg");
        fs::set_permissions(&seg, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Journal::open(d.path(), lim),
            Err(JournalError::Files(_))
        ));
        fs::set_permissions(&seg, fs::Permissions::from_mode(0o600)).unwrap();

        // One writer at a time.
        let (_j, _) = Journal::open(d.path(), lim).unwrap();
        assert!(matches!(
            Journal::open(d.path(), lim),
            Err(JournalError::InUse { .. })
        ));
    }

    #[test]
    fn newer_versions_and_foreign_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        journal_with(d.path(), 1..=1, 1 << 20);
        let seg = d.path().join("00000000000000000001.seg");
        let good = fs::read(&seg).unwrap();

        let mut b = good.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        put(&seg, &b);
        let e = Journal::open(d.path(), limits(1 << 20)).unwrap_err();
        assert!(
            matches!(&e, JournalError::NewerFormat { path, version: 2 } if *path == seg),
            "{e}"
        );
        assert!(e.to_string().contains("00000000000000000001.seg"), "{e}");

        let mut b = good.clone();
        b[0] = b'X';
        put(&seg, &b);
        let e = Journal::open(d.path(), limits(1 << 20)).unwrap_err();
        assert!(e.to_string().contains("not a Ferry journal segment"), "{e}");

        let mut b = good.clone();
        b[20] ^= 1; // first sequence number: the header checksum catches it
        put(&seg, &b);
        let e = Journal::open(d.path(), limits(1 << 20)).unwrap_err();
        assert!(e.to_string().contains("header checksum"), "{e}");

        put(&seg, &good[..20]);
        let e = Journal::open(d.path(), limits(1 << 20)).unwrap_err();
        assert!(
            e.to_string().contains("shorter than a segment header"),
            "{e}"
        );
    }

    #[test]
    fn limits_are_validated() {
        let d = tempfile::tempdir().unwrap();
        for bad in [
            Limits {
                max_record: 0,
                ..Limits::default()
            },
            Limits {
                segment_bytes: HEADER_LEN + RECORD_HEADER_LEN,
                ..Limits::default()
            },
            Limits {
                max_journal_bytes: 1 << 20,
                ..Limits::default()
            },
        ] {
            assert!(matches!(
                Journal::open(d.path(), bad),
                Err(JournalError::InvalidLimits(_))
            ));
        }
        Limits::default().validate().unwrap();
        let bad = CacheLimits {
            warn_free_percent: 20,
            ..CacheLimits::default()
        };
        assert!(matches!(
            CacheGuard::new(d.path(), bad),
            Err(JournalError::InvalidLimits(_))
        ));
    }

    fn fake_guard(
        cache: &Path,
        max_journal_bytes: u64,
        available: &Arc<AtomicU64>,
    ) -> Arc<CacheGuard> {
        let a = Arc::clone(available);
        Arc::new(
            CacheGuard::with_probe(
                cache,
                CacheLimits {
                    max_journal_bytes,
                    ..CacheLimits::default()
                },
                move |_| {
                    Ok(FreeSpace {
                        total_bytes: 1000,
                        available_bytes: a.load(Ordering::Relaxed),
                    })
                },
            )
            .unwrap(),
        )
    }

    #[test]
    fn backpressure_follows_free_space() {
        let d = tempfile::tempdir().unwrap();
        let avail = Arc::new(AtomicU64::new(500));
        let guard = fake_guard(d.path(), 1 << 30, &avail);
        let key = StreamKey::new("web-01", "os", 1).unwrap();
        let (mut j, _) = guard.open_journal(&key, limits(1 << 20)).unwrap();
        // 10-byte payloads: 26 bytes a record, plus 32 for the first segment's header.
        assert_eq!(j.append(1, &[1; 10]).unwrap(), CacheLevel::Ok);
        avail.store(290, Ordering::Relaxed); // 26.4% free after the append
        assert_eq!(j.append(2, &[2; 10]).unwrap(), CacheLevel::Warn);
        assert_eq!(guard.status().unwrap().level, CacheLevel::Warn);
        avail.store(270, Ordering::Relaxed); // 27% now, 24.4% after: critical
        let e = j.append(3, &[3; 10]).unwrap_err();
        assert!(
            matches!(
                &e,
                JournalError::Backpressure {
                    reason: BackpressureReason::LowFreeSpace {
                        available_bytes: 270,
                        total_bytes: 1000,
                        critical_percent: 25
                    },
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("below the critical 25%"), "{e}");
        assert_eq!(j.next_seq(), Some(3));
        assert_eq!(j.sync().unwrap(), Some(2));
        assert_eq!(guard.journal_bytes(), HEADER_LEN + 2 * 26);
        avail.store(240, Ordering::Relaxed);
        let status = guard.status().unwrap();
        assert_eq!(status.level, CacheLevel::Critical);
        assert!((status.free_percent() - 24.0).abs() < 1e-9);
        // Space came back: appends go on.
        avail.store(900, Ordering::Relaxed);
        assert_eq!(j.append(3, &[3; 10]).unwrap(), CacheLevel::Ok);
        assert_eq!(j.sync().unwrap(), Some(3));
        // A filesystem reporting no size at all is not trusted.
        avail.store(0, Ordering::Relaxed);
        assert!(matches!(
            guard.check(1),
            Err(JournalError::Backpressure { .. })
        ));
    }

    #[test]
    fn backpressure_follows_the_journal_caps() {
        let d = tempfile::tempdir().unwrap();
        let avail = Arc::new(AtomicU64::new(1000));
        let lim = limits(HEADER_LEN + 2 * REC);
        let cap = HEADER_LEN + 4 * REC;
        let guard = fake_guard(d.path(), cap, &avail);
        let key = StreamKey::new("web-01", "data", 7).unwrap();
        let (mut j, _) = guard.open_journal(&key, lim).unwrap();
        for s in 1..=3 {
            j.append(s, &payload(s, 100)).unwrap();
        }
        let used = 2 * HEADER_LEN + 3 * REC;
        assert_eq!(guard.journal_bytes(), used);
        let e = j.append(4, &payload(4, 100)).unwrap_err();
        assert!(
            matches!(
                &e,
                JournalError::Backpressure {
                    reason: BackpressureReason::CacheJournalsFull { bytes, incoming: REC, limit },
                    ..
                } if *bytes == used && *limit == cap
            ),
            "{e}"
        );
        assert!(matches!(
            guard.check(REC),
            Err(JournalError::Backpressure { .. })
        ));
        assert_eq!(guard.check(cap - used).unwrap(), CacheLevel::Ok);
        assert_eq!(guard.journal_bytes(), used); // a check reserves nothing
        assert_eq!(j.sync().unwrap(), Some(3));
        // Draining frees space in the cache's count.
        j.release_through(2).unwrap();
        assert_eq!(guard.journal_bytes(), HEADER_LEN + REC);
        j.append(4, &payload(4, 100)).unwrap();
        j.sync().unwrap();
        // A new guard (a restart) counts what is on disk.
        let again = fake_guard(d.path(), cap, &avail);
        assert_eq!(again.journal_bytes(), guard.journal_bytes());
        assert_eq!(j.remove().unwrap(), HEADER_LEN + 2 * REC);
        assert_eq!(guard.journal_bytes(), 0);

        // The journal's own cap, without a guard.
        let one = Limits {
            max_record: 100,
            segment_bytes: 1 << 20,
            max_journal_bytes: 300,
        };
        let (mut j, _) = Journal::open(&d.path().join("solo"), one).unwrap();
        j.append(1, &[1; 100]).unwrap();
        j.append(2, &[2; 100]).unwrap();
        let e = j.append(3, &[3; 100]).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::Backpressure {
                    reason: BackpressureReason::JournalFull {
                        bytes: 264,
                        incoming: 116,
                        limit: 300
                    },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn stream_keys_name_directories_and_are_listed() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            StreamKey::new("web-01", "os", 12)
                .unwrap()
                .dir(d.path())
                .unwrap(),
            d.path().join("journal/web-01/os/12")
        );
        for (item, disk) in [("..", "os"), ("web-01", "a/b"), ("", "os"), ("web", ".x")] {
            assert!(matches!(
                StreamKey::new(item, disk, 1),
                Err(JournalError::InvalidKey(_))
            ));
        }
        assert!(StreamKey::list(d.path()).unwrap().is_empty());
        let keys = [
            StreamKey::new("db", "data", 2).unwrap(),
            StreamKey::new("db", "data", 10).unwrap(),
            StreamKey::new("web-01", "os", 1).unwrap(),
        ];
        for k in &keys {
            Journal::open(&k.dir(d.path()).unwrap(), Limits::default()).unwrap();
        }
        assert_eq!(StreamKey::list(d.path()).unwrap(), keys.to_vec());
        fs::create_dir(d.path().join("journal/db/data/007")).unwrap();
        let e = StreamKey::list(d.path()).unwrap_err();
        assert!(e.to_string().contains("not a cycle number"), "{e}");
        fs::remove_dir(d.path().join("journal/db/data/007")).unwrap();
        put(&d.path().join("journal/db/stray"), b"");
        assert!(matches!(
            StreamKey::list(d.path()),
            Err(JournalError::Unexpected { .. })
        ));
    }

    /// The records of the committed fixture (with `limits(128)`: three segments, one record
    /// larger than a segment, one empty payload).
    fn v1_records() -> Vec<(u64, Vec<u8>)> {
        vec![
            (7, b"ferry journal v1 fixture: first record".to_vec()),
            (8, Vec::new()),
            (9, payload(9, 300)),
            (10, b"last".to_vec()),
        ]
    }

    fn write_v1(dir: &Path) {
        let (mut j, _) = Journal::open(dir, limits(128)).unwrap();
        for (seq, p) in v1_records() {
            j.append(seq, &p).unwrap();
        }
        assert_eq!(j.sync().unwrap(), Some(10));
    }

    /// Writes the version-1 fixture when missing (frozen once committed):
    /// `cargo test -p ferry-daemon --lib -- --ignored write_v1_journal_fixture`.
    #[test]
    #[ignore = "writes the committed fixtures"]
    fn write_v1_journal_fixture() {
        let out = Path::new(FIXTURES);
        if out.exists() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        write_v1(d.path());
        fs::create_dir_all(out).unwrap();
        for seg in segment_files(d.path()) {
            fs::copy(&seg, out.join(seg.file_name().unwrap())).unwrap();
        }
    }

    #[test]
    fn v1_fixture_reads_back() {
        let fixtures = segment_files(Path::new(FIXTURES));
        let names: Vec<String> = fixtures
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "00000000000000000007.seg",
                "00000000000000000009.seg",
                "00000000000000000010.seg"
            ]
        );
        // The first segment, byte by byte (docs/journal-format.md).
        let b = fs::read(&fixtures[0]).unwrap();
        assert_eq!(&b[0..8], b"FERRYJNL");
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 0, 0, 0, 0]); // version 1, no flags
        assert_eq!(le64(&b[16..24]), 7);
        assert_eq!(&b[24..28], &[0; 4]);
        assert_eq!(le32(&b[28..32]), crc32c(&b[0..28]));
        let first = &v1_records()[0].1;
        assert_eq!(le32(&b[32..36]) as usize, first.len());
        assert_eq!(le32(&b[36..40]), crc32c(&b[40..48 + first.len()]));
        assert_eq!(le64(&b[40..48]), 7);
        assert_eq!(&b[48..48 + first.len()], first.as_slice());
        // The empty record 8 ends the segment.
        assert_eq!(b.len(), 48 + first.len() + 16);
        assert_eq!(&b[48 + first.len()..52 + first.len()], &[0; 4]);

        // Opened as a journal (from a copy: recovery may write).
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("j");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        for f in &fixtures {
            put(&dir.join(f.file_name().unwrap()), &fs::read(f).unwrap());
        }
        let (j, rec) = Journal::open(&dir, limits(128)).unwrap();
        assert_eq!(
            (
                rec.first_seq,
                rec.last_seq,
                rec.records,
                rec.segments,
                rec.truncated_bytes
            ),
            (Some(7), Some(10), 4, 3, 0)
        );
        assert_eq!(replay_all(&j, 7), v1_records());
        assert_eq!(replay_all(&j, 9), v1_records()[2..].to_vec());

        // And it is what this build writes.
        let fresh = d.path().join("fresh");
        write_v1(&fresh);
        for f in &fixtures {
            assert_eq!(
                fs::read(fresh.join(f.file_name().unwrap())).unwrap(),
                fs::read(f).unwrap(),
                "{}",
                f.display()
            );
        }
    }
}
