//! Frame planning: which data frames one cycle of one disk sends, decided once, written down,
//! and replayed exactly after any reconnect.
//!
//! The gateway accepts a data frame only as the next `seq` after the last durable one
//! (`docs/agent-protocol.md` §7.2), so after a reconnect the agent must send *exactly* the
//! frames `resume_from_seq + 1 ..` of the same sequence. Planning is therefore a pass of its
//! own, before the session: it walks the view chunk by chunk, in order, and writes one record
//! per data frame to the cycle's plan file and one digest per chunk to its pending digests
//! ([`plan`]). The session then reads frames by `seq` from the plan ([`CycleFrames`]),
//! rereading a `Chunk`'s bytes from the view when it is (re)sent. The sequence is a pure
//! function of the view, the base digests and the change list ([`plan`] run twice gives the
//! same file; a resume reads the plan, it does not plan again).
//!
//! The walk, per chunk (the last one may be short):
//! - with a base and a change list (`crate::source`), a chunk no changed range touches is not
//!   read: its base digest stands and it is not sent;
//! - a chunk with no data extent (`SEEK_DATA` / `SEEK_HOLE` in a file, the source adapter's
//!   extents for a container) is not read: it is zeros;
//! - otherwise it is read; an all-zero chunk counts as zeros too;
//! - without a base (initial cycle, or a resync that lost its base) every chunk is sent:
//!   zeros as `Zero` frames (consecutive zero chunks coalesced into one range), data as
//!   `Chunk` frames;
//! - with a base only chunks whose digest differs from the base's are sent, zeros again as
//!   coalesced `Zero` ranges. The base ([`Base`]) is the committed digests of the last
//!   acknowledged cycle (a delta, or a resync forced by the change threshold), or the
//!   replica's own digests fetched from the gateway (a checksum-based resync,
//!   [`crate::resync`]). Both are SHA-256 of each chunk's bytes at its own length, a zero
//!   chunk's being the digest of that many zeros, so one comparison serves both: a source
//!   chunk of zeros goes as (part of) a `Zero` range only when the replica's chunk is not
//!   already zero, and nothing goes where they match.
//!
//! The digest recorded for each chunk is that of what the gateway will hold for it after this
//! cycle: the base's for an unsent chunk, the zero chunk's for a `Zero`, and the digest of the
//! bytes actually sent for a `Chunk` (recomputed at each send, so a live view that changed
//! between planning and sending still leaves true digests). Memory is one chunk plus buffers.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_proto::digests::{DigestsError, Reader as ReplicaDigests};
use ferry_proto::frame::{self, AgentFrame, Consistency, EndOfCycle, Snapshot, Zero};
use sha2::{Digest, Sha256};

use crate::source::Reader;
use crate::tracking::{
    self, ChunkDigest, DigestReader, DigestWriter, DigestsHeader, PlanFile, PlanWriter, Planned,
    TrackingError,
};

/// Why planning or producing a frame failed. Every variant names the file and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Reading the view failed.
    #[error("cannot read {} at byte {offset}: {source}", path.display())]
    Read {
        /// The view.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// The system's error.
        source: io::Error,
    },
    /// The view is not the size the cycle was planned for.
    #[error(
        "{} is {found} bytes now; the cycle was planned for {expected} (the disk changed size mid-cycle)",
        path.display()
    )]
    SizeChanged {
        /// The view.
        path: PathBuf,
        /// The planned size.
        expected: u64,
        /// The size found.
        found: u64,
    },
    /// The cycle's files (plan, digests).
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    /// The base digests turned out damaged while planning against them.
    #[error("the digests of the last acknowledged cycle are damaged: {0}")]
    BaseDamaged(TrackingError),
    /// The replica's digest list turned out unusable while planning against it (damaged
    /// since it was checked, or of another geometry).
    #[error("the replica's digests in {} are unusable: {source}", path.display())]
    ReplicaDigests {
        /// The downloaded list.
        path: PathBuf,
        /// What is wrong.
        source: DigestsError,
    },
    /// A planned frame cannot be encoded (a bug or a damaged plan).
    #[error("cannot encode frame {seq}: {source}")]
    Encode {
        /// Its `seq`.
        seq: u64,
        /// The codec's refusal.
        source: frame::FrameError,
    },
    /// Planning was asked to stop (the agent is shutting down).
    #[error("planning was stopped (the agent is shutting down)")]
    Stopped,
}

/// What a plan holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanSummary {
    /// Chunks in the disk.
    pub chunks: u64,
    /// Data frames (`Chunk` and `Zero`); the `EndOfCycle` is `data_frames + 1`.
    pub data_frames: u64,
    /// `Chunk` frames.
    pub chunk_frames: u64,
    /// Bytes carried by the `Chunk` frames.
    pub chunk_bytes: u64,
    /// Chunks covered by `Zero` frames.
    pub zero_chunks: u64,
    /// Disk bytes the cycle changes (`Chunk` bytes and zeroed chunks' bytes).
    pub changed_bytes: u64,
    /// Chunks found in holes, not read.
    pub hole_chunks: u64,
    /// Chunks read from the view.
    pub read_chunks: u64,
    /// Chunks compared with a base's digest (every chunk with a base, 0 without).
    pub compared_chunks: u64,
    /// Chunks a change list said were unchanged: neither read nor sent.
    pub unlisted_chunks: u64,
}

impl PlanSummary {
    /// Chunks the cycle sends: `Chunk` frames and chunks in `Zero` ranges.
    pub fn sent_chunks(&self) -> u64 {
        self.chunk_frames + self.zero_chunks
    }
}

/// The replica's digest list, read one digest at a time.
pub type ReplicaReader = ReplicaDigests<BufReader<File>>;

/// What a cycle is planned against: the digests of what the gateway holds.
#[derive(Debug)]
pub enum Base {
    /// The committed digests of the last acknowledged cycle (a delta).
    Committed(DigestReader),
    /// The replica's digest list from the gateway, checked whole beforehand (a
    /// checksum-based resync; its trailer is checked again at the end).
    Replica {
        /// The list.
        reader: ReplicaReader,
        /// Where it is, for messages.
        path: PathBuf,
    },
}

impl From<DigestReader> for Base {
    fn from(r: DigestReader) -> Self {
        Self::Committed(r)
    }
}

impl Base {
    /// The replica's digest list at `path`.
    pub fn replica(path: &Path) -> Result<Self, PlanError> {
        let bad = |source| PlanError::ReplicaDigests {
            path: path.to_path_buf(),
            source,
        };
        let f = File::open(path).map_err(|e| bad(DigestsError::Io(e)))?;
        let reader = ReplicaDigests::new(BufReader::with_capacity(64 << 10, f)).map_err(bad)?;
        Ok(Self::Replica {
            reader,
            path: path.to_path_buf(),
        })
    }

    fn check(&self, geo: Geometry, view_path: &Path) -> Result<(), PlanError> {
        let (size, cs) = match self {
            Self::Committed(b) => (b.header().disk_size, b.header().chunk_size),
            Self::Replica { reader, .. } => (reader.header().disk_size, reader.header().chunk_size),
        };
        if (size, cs) == (geo.disk_size, geo.chunk_size) {
            return Ok(());
        }
        let reason = format!(
            "the base digests are for {size} bytes in chunks of {cs}, the disk is {} in chunks of {}",
            geo.disk_size, geo.chunk_size
        );
        Err(match self {
            Self::Committed(_) => PlanError::BaseDamaged(TrackingError::Damaged {
                path: view_path.to_path_buf(),
                reason,
            }),
            Self::Replica { path, .. } => PlanError::ReplicaDigests {
                path: path.clone(),
                source: DigestsError::Invalid(reason),
            },
        })
    }

    fn next_digest(&mut self) -> Result<ChunkDigest, PlanError> {
        match self {
            Self::Committed(b) => b.next_digest().map_err(PlanError::BaseDamaged),
            Self::Replica { reader, path } => match reader.next_digest() {
                Ok(Some(d)) => Ok(d),
                Ok(None) => Err(PlanError::ReplicaDigests {
                    path: path.clone(),
                    source: DigestsError::Invalid("fewer digests than chunks".into()),
                }),
                Err(source) => Err(PlanError::ReplicaDigests {
                    path: path.clone(),
                    source,
                }),
            },
        }
    }

    fn finish(self) -> Result<(), PlanError> {
        match self {
            Self::Committed(b) => b.finish().map_err(PlanError::BaseDamaged),
            Self::Replica { mut reader, path } => match reader.next_digest() {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(PlanError::ReplicaDigests {
                    path,
                    source: DigestsError::Invalid("more digests than chunks".into()),
                }),
                Err(source) => Err(PlanError::ReplicaDigests { path, source }),
            },
        }
    }
}

/// The geometry of a disk for one cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes.
    pub disk_size: u64,
    /// Bytes per chunk (a power of two).
    pub chunk_size: u32,
}

impl Geometry {
    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        tracking::chunk_count(self.disk_size, self.chunk_size)
    }

    /// Offset and length of chunk `i`.
    pub fn span(&self, i: u64) -> (u64, usize) {
        let cs = u64::from(self.chunk_size);
        let off = i * cs;
        let len = (self.disk_size - off).min(cs);
        (off, usize::try_from(len).expect("a chunk fits in memory"))
    }
}

/// Data extents of the view as the walk advances: found with `SEEK_DATA` / `SEEK_HOLE` in a
/// file, or in the map of a source adapter's extents.
enum Extents<'a> {
    Seek {
        f: &'a File,
        size: u64,
        /// The current (or next) data extent: `[start, end)`.
        start: u64,
        end: u64,
    },
    /// A source adapter's map of the virtual disk (`None`: not mapped, all data).
    Map(Option<&'a crate::source::DataMap>),
}

impl<'a> Extents<'a> {
    fn new(view: &'a Reader, size: u64) -> Self {
        match view {
            Reader::File(f) => Self::Seek {
                f,
                size,
                start: 0,
                end: 0,
            },
            Reader::Adapted(a) => Self::Map(a.data()),
        }
    }

    /// Whether `[off, off + len)` holds any data. Asked with increasing `off`.
    fn has_data(&mut self, off: u64, len: u64) -> bool {
        match self {
            Self::Seek {
                f,
                size,
                start,
                end,
            } => {
                if off >= *end {
                    match rustix::fs::seek(*f, rustix::fs::SeekFrom::Data(off)) {
                        Ok(d) => {
                            *start = d;
                            *end = rustix::fs::seek(*f, rustix::fs::SeekFrom::Hole(d))
                                .unwrap_or(*size)
                                .max(d + 1);
                        }
                        // No data at or after `off`.
                        Err(rustix::io::Errno::NXIO) => {
                            *start = u64::MAX;
                            *end = u64::MAX;
                        }
                        // No hole support: everything is data.
                        Err(_) => {
                            *start = 0;
                            *end = u64::MAX;
                        }
                    }
                }
                *start < off + len
            }
            Self::Map(m) => m.is_none_or(|m| m.any(off, len)),
        }
    }
}

/// Whether `[off, off + len)` meets one of `ranges` (sorted, disjoint), advancing `at` past
/// the ranges that end before `off` (so a walk with increasing `off` costs one pass).
fn overlaps(ranges: &[Range<u64>], at: &mut usize, off: u64, len: u64) -> bool {
    while ranges.get(*at).is_some_and(|r| r.end <= off) {
        *at += 1;
    }
    ranges.get(*at).is_some_and(|r| r.start < off + len)
}

/// Whether every byte is 0 (block by block, stopping at the first non-zero block).
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// SHA-256 of `b`.
pub fn digest(b: &[u8]) -> ChunkDigest {
    Sha256::digest(b).into()
}

fn read_at(r: &Reader, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), PlanError> {
    r.read_exact_at(buf, offset)
        .map_err(|source| PlanError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        })
}

/// Plans cycle `cycle` of the view `view` (at `view_path`), against `base` (the digests of
/// what the gateway holds; `None`: every chunk is sent): writes the plan at `plan_out` and
/// the pending digests at `digests_out`. `stop` is checked between chunks.
///
/// `changed` (with a base only: the ranges a change list says were written since the base's
/// view, sorted and disjoint): a chunk none of them touches is not read, its base digest
/// stands and it is not sent.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    view: &Reader,
    view_path: &Path,
    geo: Geometry,
    cycle: u64,
    mut base: Option<Base>,
    changed: Option<&[Range<u64>]>,
    plan_out: &Path,
    digests_out: &Path,
    stop: &AtomicBool,
) -> Result<PlanSummary, PlanError> {
    if let Some(b) = &base {
        b.check(geo, view_path)?;
    }
    let chunks = geo.chunks();
    let mut plan = PlanWriter::create(plan_out, cycle)?;
    let mut digests = DigestWriter::create(
        digests_out,
        DigestsHeader::new(geo.chunk_size, geo.disk_size, cycle),
    )?;
    let full_zero = digest(&vec![0u8; geo.chunk_size as usize]);
    let (_, last_len) = geo.span(chunks - 1);
    let last_zero = digest(&vec![0u8; last_len]);
    let mut extents = Extents::new(view, geo.disk_size);
    let mut buf = vec![0u8; geo.chunk_size as usize];
    let mut s = PlanSummary {
        chunks,
        ..PlanSummary::default()
    };
    let mut zero_run: Option<(u64, u64)> = None;
    let mut listed_at = 0;

    let flush = |run: &mut Option<(u64, u64)>, plan: &mut PlanWriter, s: &mut PlanSummary| {
        if let Some((first, count)) = run.take() {
            plan.push(Planned::Zero { first, count })?;
            s.data_frames += 1;
        }
        Ok::<(), PlanError>(())
    };

    for i in 0..chunks {
        if i % 64 == 0 && stop.load(Ordering::Relaxed) {
            return Err(PlanError::Stopped);
        }
        let (off, len) = geo.span(i);
        let zero_digest = if i + 1 == chunks {
            &last_zero
        } else {
            &full_zero
        };
        let unlisted = changed.is_some_and(|c| !overlaps(c, &mut listed_at, off, len as u64));
        if unlisted && let Some(b) = base.as_mut() {
            // Unchanged since the base, as the change list says: its digest stands.
            let d = b.next_digest()?;
            s.compared_chunks += 1;
            s.unlisted_chunks += 1;
            flush(&mut zero_run, &mut plan, &mut s)?;
            digests.push(&d)?;
            continue;
        }
        let (zero, d) = if base.is_none() && extents.has_data(off, len as u64) {
            // Every allocated chunk is sent when there is no base, and its digest is taken
            // from the bytes that leave (`CycleFrames::frame`, which also sends a chunk of
            // zeros as a zero range): not read here, so sending starts at once.
            (false, [0u8; 32])
        } else if extents.has_data(off, len as u64) {
            s.read_chunks += 1;
            read_at(view, view_path, &mut buf[..len], off)?;
            if is_zero(&buf[..len]) {
                (true, *zero_digest)
            } else {
                (false, digest(&buf[..len]))
            }
        } else {
            s.hole_chunks += 1;
            (true, *zero_digest)
        };
        let send = match base.as_mut() {
            None => true,
            Some(b) => {
                s.compared_chunks += 1;
                b.next_digest()? != d
            }
        };
        if send {
            s.changed_bytes += len as u64;
            if zero {
                s.zero_chunks += 1;
                zero_run = match zero_run {
                    Some((first, count)) => Some((first, count + 1)),
                    None => Some((i, 1)),
                };
            } else {
                flush(&mut zero_run, &mut plan, &mut s)?;
                plan.push(Planned::Chunk(i))?;
                s.data_frames += 1;
                s.chunk_frames += 1;
                s.chunk_bytes += len as u64;
            }
        } else {
            flush(&mut zero_run, &mut plan, &mut s)?;
        }
        digests.push(&d)?;
    }
    flush(&mut zero_run, &mut plan, &mut s)?;
    if let Some(b) = base {
        b.finish()?;
    }
    digests.finish()?;
    plan.finish()?;
    Ok(s)
}

/// What produces a cycle's data frames by `seq`, for the session. Cloned into the thread that
/// reads ahead of the socket; `frame` may block (disk reads).
pub trait FrameSource: Clone + Send + Sync + 'static {
    /// The `seq` of the `EndOfCycle` (the last frame).
    fn last_seq(&self) -> u64;
    /// The encoded frame `seq` (1 ..= `last_seq`).
    fn frame(&self, seq: u64) -> Result<Vec<u8>, PlanError>;
}

/// The `EndOfCycle` a cycle ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    /// Crash or app.
    pub consistency: Consistency,
    /// How the view was taken.
    pub snapshot: Snapshot,
    /// The tags.
    pub tags: Vec<(String, String)>,
}

/// The frames of a planned cycle: the plan, the view, the pending digests.
#[derive(Debug, Clone)]
pub struct CycleFrames {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    plan: PlanFile,
    view: Reader,
    view_path: PathBuf,
    digests: File,
    digests_path: PathBuf,
    geo: Geometry,
    ending: Ending,
}

impl CycleFrames {
    /// The frames of the plan at `plan_path` (its records' checksum checked when `verify`),
    /// reading chunks from `view` and updating the pending digests at `digests_path`.
    pub fn open(
        plan_path: &Path,
        verify: bool,
        view: Reader,
        view_path: &Path,
        digests_path: &Path,
        geo: Geometry,
        ending: Ending,
    ) -> Result<Self, PlanError> {
        let plan = PlanFile::open(plan_path, verify)?;
        let digests = OpenOptions::new()
            .read(true)
            .write(true)
            .open(digests_path)
            .map_err(|source| TrackingError::Io {
                action: "open",
                path: digests_path.to_path_buf(),
                source,
            })?;
        let h = tracking::read_digests_header(digests_path)?;
        if (h.disk_size, h.chunk_size) != (geo.disk_size, geo.chunk_size) {
            return Err(TrackingError::Damaged {
                path: digests_path.to_path_buf(),
                reason: "digests of another geometry than the cycle's".into(),
            }
            .into());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                plan,
                view,
                view_path: view_path.to_path_buf(),
                digests,
                digests_path: digests_path.to_path_buf(),
                geo,
                ending,
            }),
        })
    }

    /// The planned data frame `seq` (not the `EndOfCycle`).
    pub fn planned(&self, seq: u64) -> Result<Planned, PlanError> {
        Ok(self.inner.plan.get(seq)?)
    }
}

impl FrameSource for CycleFrames {
    fn last_seq(&self) -> u64 {
        self.inner.plan.header().frames + 1
    }

    fn frame(&self, seq: u64) -> Result<Vec<u8>, PlanError> {
        let i = &self.inner;
        let f = if seq == self.last_seq() {
            // The pending digests are sealed and durable before the EndOfCycle leaves.
            tracking::finalize_digests(&i.digests, &i.digests_path)?;
            AgentFrame::EndOfCycle(EndOfCycle {
                seq,
                consistency: i.ending.consistency,
                snapshot: i.ending.snapshot,
                tags: i.ending.tags.clone(),
            })
        } else {
            match i.plan.get(seq)? {
                Planned::Chunk(index) => {
                    // Read straight into the frame: no second buffer, no copy.
                    let (off, len) = i.geo.span(index);
                    let mut out = vec![0u8; frame::CHUNK_DATA_OFFSET + len];
                    let data = &mut out[frame::CHUNK_DATA_OFFSET..];
                    read_at(&i.view, &i.view_path, data, off)?;
                    tracking::write_digest_at(&i.digests, &i.digests_path, index, &digest(data))?;
                    if !is_zero(data) {
                        frame::seal_chunk(&mut out, seq, index)
                            .map_err(|source| PlanError::Encode { seq, source })?;
                        return Ok(out);
                    }
                    // Allocated but zero (an initial cycle does not read before it sends).
                    AgentFrame::Zero(Zero {
                        seq,
                        first_index: index,
                        count: 1,
                    })
                }
                Planned::Zero { first, count } => AgentFrame::Zero(Zero {
                    seq,
                    first_index: first,
                    count,
                }),
            }
        };
        let mut out = Vec::new();
        frame::encode_agent(&f, &mut out).map_err(|source| PlanError::Encode { seq, source })?;
        Ok(out)
    }
}

/// Checks that the view still has the planned size.
pub fn check_size(view_path: &Path, expected: u64, found: u64) -> Result<(), PlanError> {
    if expected == found {
        Ok(())
    } else {
        Err(PlanError::SizeChanged {
            path: view_path.to_path_buf(),
            expected,
            found,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    use ferry_proto::frame::{Decoded, Limits};

    use super::*;

    pub(crate) const CS: u32 = 65536;

    /// A reader of the raw file at `p`.
    pub(crate) fn rd(p: &Path) -> Reader {
        Reader::File(Arc::new(File::open(p).unwrap()))
    }

    /// An image of `chunks` chunks (the last `short` bytes shorter) where `data[i]` is the
    /// byte chunk `i` is filled with (0: left as a hole).
    pub(crate) fn image(path: &Path, fill: &[u8], short: u64) -> Geometry {
        let cs = u64::from(CS);
        let size = fill.len() as u64 * cs - short;
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for (i, &b) in fill.iter().enumerate() {
            if b != 0 {
                let off = i as u64 * cs;
                let len = (size - off).min(cs);
                f.write_all_at(&vec![b; usize::try_from(len).unwrap()], off)
                    .unwrap();
            }
        }
        Geometry {
            disk_size: size,
            chunk_size: CS,
        }
    }

    pub(crate) struct Planned1 {
        pub summary: PlanSummary,
        pub frames: Vec<AgentFrame>,
    }

    /// Plans `img` into `dir` (against `base` digests if given), then produces every frame.
    pub(crate) fn plan_and_produce(
        dir: &Path,
        img: &Path,
        geo: Geometry,
        base: Option<&Path>,
        cycle: u64,
    ) -> Planned1 {
        let base = base.map(|p| Base::from(DigestReader::open(p).unwrap()));
        plan_with(dir, img, geo, base, cycle)
    }

    /// Plans `img` into `dir` against `base`, then produces every frame.
    pub(crate) fn plan_with(
        dir: &Path,
        img: &Path,
        geo: Geometry,
        base: Option<Base>,
        cycle: u64,
    ) -> Planned1 {
        plan_listed(dir, img, geo, base, None, cycle)
    }

    /// [`plan_with`] with a change list.
    pub(crate) fn plan_listed(
        dir: &Path,
        img: &Path,
        geo: Geometry,
        base: Option<Base>,
        changed: Option<&[Range<u64>]>,
        cycle: u64,
    ) -> Planned1 {
        let summary = plan(
            &rd(img),
            img,
            geo,
            cycle,
            base,
            changed,
            &dir.join("plan"),
            &dir.join("digests"),
            &AtomicBool::new(false),
        )
        .unwrap();
        let src = CycleFrames::open(
            &dir.join("plan"),
            true,
            rd(img),
            img,
            &dir.join("digests"),
            geo,
            Ending {
                consistency: Consistency::Crash,
                snapshot: Snapshot::None,
                tags: vec![("k".into(), "v".into())],
            },
        )
        .unwrap();
        let frames = (1..=src.last_seq())
            .map(|seq| decode(&src.frame(seq).unwrap()))
            .collect();
        Planned1 { summary, frames }
    }

    pub(crate) fn decode(b: &[u8]) -> AgentFrame {
        match frame::decode_agent(b, &Limits::default()).unwrap() {
            Decoded::Frame(f, n) => {
                assert_eq!(n, b.len());
                f
            }
            Decoded::NeedMore(n) => panic!("need {n} more"),
        }
    }

    /// Frames as short strings: `C3` chunk 3 (seq checked to run 1, 2, …), `Z4+2`, `E`.
    pub(crate) fn shape(frames: &[AgentFrame]) -> Vec<String> {
        frames
            .iter()
            .enumerate()
            .map(|(n, f)| {
                assert_eq!(f.seq(), Some(n as u64 + 1), "seqs run from 1 by 1");
                match f {
                    AgentFrame::Chunk(c) => format!("C{}", c.index),
                    AgentFrame::Zero(z) => format!("Z{}+{}", z.first_index, z.count),
                    AgentFrame::EndOfCycle(_) => "E".into(),
                    AgentFrame::Hello(_) => "H".into(),
                }
            })
            .collect()
    }

    fn holes_supported(dir: &Path) -> bool {
        let p = dir.join("probe");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        f.sync_all().unwrap();
        let r = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0));
        std::fs::remove_file(&p).unwrap();
        matches!(r, Ok(h) if h < 1 << 20)
    }

    #[test]
    fn initial_sends_data_as_chunks_and_holes_and_zeros_as_coalesced_zero_ranges() {
        let t = tempfile::tempdir().unwrap();
        let holes = holes_supported(t.path());
        let img = t.path().join("disk.img");
        // Chunks: data, hole, hole, data, hole; written zeros are a zero chunk read from data.
        let geo = image(&img, &[1, 0, 0, 2, 0, 0, 3], 1000);
        // Chunk 5 is data that is all zeros (allocated: planned as a chunk without being
        // read, found zero when it is sent, and sent as a zero range of one chunk).
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&vec![0u8; CS as usize], 5 * u64::from(CS))
            .unwrap();
        f.sync_all().unwrap();
        let p = plan_and_produce(t.path(), &img, geo, None, 1);
        if holes {
            assert_eq!(
                shape(&p.frames),
                ["C0", "Z1+2", "C3", "Z4+1", "Z5+1", "C6", "E"]
            );
            assert_eq!(p.summary.data_frames, 6);
            assert_eq!(p.summary.chunk_frames, 4);
            assert_eq!(p.summary.zero_chunks, 3);
            assert_eq!(p.summary.chunk_bytes, 4 * u64::from(CS) - 1000);
            // Chunks 1, 2 and 4 are holes; nothing is read before sending.
            assert_eq!(p.summary.hole_chunks, 3, "{:?}", p.summary);
            assert_eq!(p.summary.read_chunks, 0);
        } else {
            // Without hole reporting every chunk is data; the zero ones go as zero ranges.
            assert_eq!(
                shape(&p.frames),
                ["C0", "Z1+1", "Z2+1", "C3", "Z4+1", "Z5+1", "C6", "E"]
            );
        }
        assert_eq!(p.summary.changed_bytes, geo.disk_size);
        // The short last chunk carries exactly the disk's remaining bytes.
        let n = p.frames.len();
        let AgentFrame::Chunk(last) = &p.frames[n - 2] else {
            panic!()
        };
        assert_eq!(last.bytes.len(), CS as usize - 1000);
        assert!(last.bytes.iter().all(|&b| b == 3));
        let AgentFrame::EndOfCycle(e) = &p.frames[n - 1] else {
            panic!()
        };
        assert_eq!(e.tags, [("k".to_string(), "v".to_string())]);
        // The pending digests were sealed with the EndOfCycle, the zero chunk's included.
        let h = tracking::verify_digests(&t.path().join("digests")).unwrap();
        assert_eq!((h.cycle, h.chunks), (1, 7));
    }

    #[test]
    fn a_disk_of_zeros_is_one_zero_range() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[0, 0, 0], 1);
        let p = plan_and_produce(t.path(), &img, geo, None, 1);
        assert_eq!(shape(&p.frames), ["Z0+3", "E"]);
    }

    #[test]
    fn delta_sends_exactly_the_changed_chunks() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[1, 2, 3, 4, 5, 6, 7, 8], 77);
        let c1 = t.path().join("c1");
        std::fs::create_dir(&c1).unwrap();
        let first = plan_and_produce(&c1, &img, geo, None, 1);
        assert_eq!(first.summary.chunk_frames, 8);

        // Change chunks 2 and 7 (the short last one), zero 4 and 5, leave the rest.
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        let cs = u64::from(CS);
        f.write_all_at(b"changed", 2 * cs + 100).unwrap();
        f.write_all_at(b"!", 7 * cs + 5).unwrap();
        f.write_all_at(&vec![0u8; 2 * CS as usize], 4 * cs).unwrap();
        f.sync_all().unwrap();
        let c2 = t.path().join("c2");
        std::fs::create_dir(&c2).unwrap();
        let second = plan_and_produce(&c2, &img, geo, Some(&c1.join("digests")), 2);
        assert_eq!(shape(&second.frames), ["C2", "Z4+2", "C7", "E"]);
        assert_eq!(second.summary.changed_bytes, 4 * cs - 77);
        let AgentFrame::Chunk(c) = &second.frames[0] else {
            panic!()
        };
        assert_eq!(&c.bytes[100..107], b"changed");

        // Nothing changed: only the EndOfCycle.
        let c3 = t.path().join("c3");
        std::fs::create_dir(&c3).unwrap();
        let third = plan_and_produce(&c3, &img, geo, Some(&c2.join("digests")), 3);
        assert_eq!(shape(&third.frames), ["E"]);
        assert_eq!(third.summary.changed_bytes, 0);
    }

    /// A change list limits what a delta reads: only listed chunks are read and compared; an
    /// unlisted chunk keeps its base digest and is not sent, even when it changed (the list is
    /// the source's word); without a base the list is ignored.
    #[test]
    fn a_change_list_reads_only_the_chunks_it_lists() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[1, 2, 3, 4, 5, 6], 0);
        let (c1, c2, c3) = (
            t.path().join("c1"),
            t.path().join("c2"),
            t.path().join("c3"),
        );
        for d in [&c1, &c2, &c3] {
            std::fs::create_dir(d).unwrap();
        }
        let cs = u64::from(CS);
        let listed = [cs + 10..cs + 20, 4 * cs..4 * cs + 1];
        // Ignored without a base: the initial cycle sends everything.
        let first = plan_listed(&c1, &img, geo, None, Some(&listed), 1);
        assert_eq!(first.summary.chunk_frames, 6);
        assert_eq!(first.summary.unlisted_chunks, 0);
        // Chunks 1 and 4 listed, 1 and 3 changed: 1 is sent, 3 is not read, 4 is read and
        // found equal.
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(b"one", cs + 10).unwrap();
        f.write_all_at(b"three", 3 * cs).unwrap();
        let base = Base::from(DigestReader::open(&c1.join("digests")).unwrap());
        let second = plan_listed(&c2, &img, geo, Some(base), Some(&listed), 2);
        assert_eq!(shape(&second.frames), ["C1", "E"]);
        assert_eq!(
            (
                second.summary.read_chunks,
                second.summary.unlisted_chunks,
                second.summary.compared_chunks
            ),
            (2, 4, 6)
        );
        // Chunk 3's digest is still the base's: a later scan without a list finds it.
        let third = plan_and_produce(&c3, &img, geo, Some(&c2.join("digests")), 3);
        assert_eq!(shape(&third.frames), ["C3", "E"]);
        // An empty list: nothing is read, nothing sent.
        let c4 = t.path().join("c4");
        std::fs::create_dir(&c4).unwrap();
        let base = Base::from(DigestReader::open(&c3.join("digests")).unwrap());
        let fourth = plan_listed(&c4, &img, geo, Some(base), Some(&[]), 4);
        assert_eq!(shape(&fourth.frames), ["E"]);
        assert_eq!(fourth.summary.read_chunks, 0);
    }

    #[test]
    fn planning_twice_gives_the_same_frames_and_resumes_at_any_seq() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[1, 0, 2, 2, 0, 0, 9, 4], 3);
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let pa = plan_and_produce(&a, &img, geo, None, 4);
        let pb = plan_and_produce(&b, &img, geo, None, 4);
        assert_eq!(pa.frames, pb.frames);
        assert_eq!(
            std::fs::read(a.join("plan")).unwrap(),
            std::fs::read(b.join("plan")).unwrap()
        );
        // A resume from seq n produces exactly frames n+1.. of the first pass, byte for byte.
        let src = CycleFrames::open(
            &a.join("plan"),
            true,
            rd(&img),
            &img,
            &a.join("digests"),
            geo,
            Ending {
                consistency: Consistency::Crash,
                snapshot: Snapshot::None,
                tags: vec![("k".into(), "v".into())],
            },
        )
        .unwrap();
        for from in 0..src.last_seq() {
            let again: Vec<AgentFrame> = (from + 1..=src.last_seq())
                .map(|s| decode(&src.frame(s).unwrap()))
                .collect();
            assert_eq!(again, pa.frames[usize::try_from(from).unwrap()..]);
        }
    }

    #[test]
    fn a_live_view_that_changed_after_planning_records_what_was_sent() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[1, 2], 0);
        plan(
            &rd(&img),
            &img,
            geo,
            1,
            None,
            None,
            &t.path().join("plan"),
            &t.path().join("digests"),
            &AtomicBool::new(false),
        )
        .unwrap();
        // Chunk 1 changes between planning and sending.
        let w = OpenOptions::new().write(true).open(&img).unwrap();
        w.write_all_at(&[5u8; 10], u64::from(CS)).unwrap();
        let src = CycleFrames::open(
            &t.path().join("plan"),
            false,
            rd(&img),
            &img,
            &t.path().join("digests"),
            geo,
            Ending {
                consistency: Consistency::Crash,
                snapshot: Snapshot::None,
                tags: Vec::new(),
            },
        )
        .unwrap();
        let sent: Vec<AgentFrame> = (1..=src.last_seq())
            .map(|s| decode(&src.frame(s).unwrap()))
            .collect();
        let AgentFrame::Chunk(c) = &sent[1] else {
            panic!()
        };
        let mut r = DigestReader::open(&t.path().join("digests")).unwrap();
        r.next_digest().unwrap();
        assert_eq!(r.next_digest().unwrap(), digest(&c.bytes));
        r.finish().unwrap();
    }

    #[test]
    fn a_damaged_base_or_a_stop_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let img = t.path().join("disk.img");
        let geo = image(&img, &[1, 2, 3], 0);
        let c1 = t.path().join("c1");
        std::fs::create_dir(&c1).unwrap();
        plan_and_produce(&c1, &img, geo, None, 1);
        // Flip a digest byte of the sealed base.
        let base = c1.join("digests");
        let f = OpenOptions::new().write(true).open(&base).unwrap();
        f.write_all_at(&[0xff], tracking::DIGESTS_HEADER + 40)
            .unwrap();
        let run = |stop: bool| {
            plan(
                &rd(&img),
                &img,
                geo,
                2,
                Some(DigestReader::open(&base).unwrap().into()),
                None,
                &t.path().join("plan"),
                &t.path().join("digests"),
                &AtomicBool::new(stop),
            )
        };
        let e = run(false).unwrap_err();
        assert!(matches!(e, PlanError::BaseDamaged(_)), "{e}");
        assert!(e.to_string().contains("content checksum"), "{e}");
        assert!(matches!(run(true), Err(PlanError::Stopped)));
        // A base of another geometry.
        let other = Geometry {
            disk_size: geo.disk_size - 1,
            chunk_size: CS,
        };
        let e = plan(
            &crate::plan::tests::rd(&img),
            &img,
            other,
            2,
            Some(DigestReader::open(&c1.join("digests")).unwrap().into()),
            None,
            &t.path().join("plan"),
            &t.path().join("digests"),
            &AtomicBool::new(false),
        );
        assert!(matches!(e, Err(PlanError::BaseDamaged(_))));
        let mut w = std::fs::OpenOptions::new().append(true).open(&img).unwrap();
        w.write_all(b"x").unwrap();
        assert!(check_size(&img, geo.disk_size, geo.disk_size + 1).is_err());
    }
}
