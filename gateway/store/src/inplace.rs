//! In-place restore: writing a recovery point's disk onto an existing disk, only the blocks
//! that differ (the data path of failback).
//!
//! After a failover the machine runs at the recovery site and its original disk at home is
//! stale, but mostly still right: only the blocks written since (on either side) differ.
//! Bringing it home with a full export would rewrite the whole disk and read the whole point
//! from the vault; [`Vault::restore_in_place`] finds the differing chunks without reading the
//! point's data, and writes only the 4 KiB blocks of them that differ.
//!
//! How, in three passes:
//! 1. **Compare** (no vault data read): each chunk of the target is read with a positioned
//!    read and given its keyed chunk id, exactly as ingest computes it (HMAC-SHA256 with the
//!    vault's id key over the chunk, the short last chunk padded with zeros to the chunk
//!    size; an all-zero chunk is the tree's zero id). The point's id of that chunk comes from
//!    its tree (a few pages through a [`PointReader`]'s page cache). Equal ids: the chunk is
//!    already right. The indexes of the differing chunks go to a temporary file in the
//!    vault's cache directory (8 bytes each, read back sequentially), not to memory.
//! 2. **Verify**: every differing chunk that the point holds as data is fetched once and
//!    authenticated (discarded). A damaged or missing chunk fails the operation here, naming
//!    the point, disk, target and chunk, before anything is written: bad vault data changes no
//!    byte of the target.
//! 3. **Write**: each differing chunk is read again from the target and fetched from the vault
//!    (or taken as zeros when the point holds zeros there), compared 4 KiB block by block, and
//!    only the runs of differing blocks are written, with positioned writes.
//!
//! Cost: vault reads are twice the differing chunks (passes 2 and 3; a small chunk cache
//! sometimes saves the second) plus the tree pages; target reads are the whole disk once plus
//! the differing chunks again; target writes are the differing blocks. A 100 KiB change costs
//! about 100 KiB of writes, whatever the chunk size.
//!
//! Guarantees:
//! - The target must exist and be a regular file or a block device; anything else, or a
//!   missing target, is refused before anything is read or written. A block device is opened
//!   with `O_EXCL` (Linux refuses it while mounted or held by another driver) and must be at
//!   least the disk's size; a smaller regular file is extended to it (after the verify pass,
//!   so a damaged vault leaves the file untouched). A larger target keeps its tail.
//! - Afterwards the target's first `disk.size` bytes equal a restore of the point byte for
//!   byte.
//! - Not atomic: a failure in the write pass (the backend unreachable, a chunk damaged after
//!   it was verified, a write error) stops the operation with a typed error naming the
//!   target, point, disk and chunk index; what was written before stays written. The operator
//!   re-runs it: since only the blocks that still differ are written, running it again
//!   converges (a second run on an unchanged target writes nothing).
//! - Memory is independent of the disk's size: [`in_flight`] chunks are being read, hashed,
//!   fetched or written at once (twice the vault's `fetch_concurrency`), each holding at most
//!   two chunk buffers, plus a chunk cache of as many chunks and a small page cache in the
//!   reader, and 64 KiB buffers on the index file.
//!
//! Progress: `total` starts at the disk's size (the compare pass) and grows by twice the
//! differing chunks' bytes once they are known (verify and write); `done` advances through
//! all three, and `stored` counts the bytes written to the target.

use std::fs::{File, OpenOptions as FsOpen};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt;

use crate::crypto::MasterKeys;
use crate::error::{Result, StoreError};
use crate::ingest::Progress;
use crate::point::{DiskRecord, PointRecord};
use crate::reader::{PointReader, ReaderOptions};
use crate::vault::{PointSelector, Vault};

/// What to restore in place, and onto what.
#[derive(Debug, Clone)]
pub struct InPlaceOptions {
    /// Item.
    pub item: String,
    /// Which point.
    pub point: PointSelector,
    /// Which disk (may be omitted when the point has one).
    pub disk: Option<String>,
    /// The existing disk written: a regular file or a block device.
    pub target: PathBuf,
    /// `fdatasync` the target at the end.
    pub sync: bool,
}

/// What [`Vault::restore_in_place`] did.
#[derive(Debug, Clone)]
pub struct InPlaceReport {
    /// The point restored.
    pub point: PointRecord,
    /// The disk restored.
    pub disk: DiskRecord,
    /// Chunks of the target compared with the point (all of the disk's).
    pub chunks_compared: u64,
    /// Chunks that differed: some of their blocks were written.
    pub chunks_written: u64,
    /// Bytes written: the differing 4 KiB blocks (the disk's last block may be shorter).
    pub bytes_written: u64,
    /// Whether the target (a regular file smaller than the disk) was extended.
    pub target_grown: bool,
}

/// Chunks being read, hashed, fetched or written at once: twice the vault's fetch
/// concurrency, so reading and hashing the target overlaps fetching and writing.
pub fn in_flight(tuning: &crate::Tuning) -> usize {
    2 * tuning.fetch_concurrency.max(1)
}

/// The unit compared and written inside a differing chunk: 4 KiB, the block size of every
/// file system and disk a failback writes to.
pub const BLOCK: usize = 4096;

/// Buffer of the temporary index file (64 KiB).
const INDEX_BUF: usize = 64 << 10;

/// Tree pages the in-place reader keeps (each about 8 KiB); the chunks are visited in order,
/// so a few suffice.
const PAGE_CACHE_PAGES: usize = 64;

/// The target, open for reading and writing.
struct Target {
    file: File,
    path: PathBuf,
    block_device: bool,
    size: u64,
}

/// Opens the target: it must exist and be a regular file or a block device.
fn open_target(path: &Path) -> Result<Target> {
    let io = |source| StoreError::OutputIo {
        path: path.to_path_buf(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(io(std::io::Error::new(
                e.kind(),
                "does not exist (an in-place restore writes into an existing disk)",
            )));
        }
        Err(e) => return Err(io(e)),
    };
    let block_device = meta.file_type().is_block_device();
    if !meta.is_file() && !block_device {
        return Err(io(std::io::Error::other(
            "is not a regular file or a block device",
        )));
    }
    let mut open = FsOpen::new();
    open.read(true).write(true);
    if block_device {
        // Linux: refuse a device that is mounted or held (LVM, md, another opener with O_EXCL).
        let excl = i32::try_from(rustix::fs::OFlags::EXCL.bits())
            .map_err(|_| io(std::io::Error::other("O_EXCL does not fit the open flags")))?;
        open.custom_flags(excl);
    }
    let mut file = open.open(path).map_err(io)?;
    // Check again on the open file: the path may have changed in between.
    let meta = file.metadata().map_err(io)?;
    if meta.file_type().is_block_device() != block_device || (!block_device && !meta.is_file()) {
        return Err(io(std::io::Error::other("changed type while being opened")));
    }
    let size = if block_device {
        file.seek(SeekFrom::End(0)).map_err(io)?
    } else {
        meta.len()
    };
    Ok(Target {
        file,
        path: path.to_path_buf(),
        block_device,
        size,
    })
}

/// Removes the temporary index file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A unique name for the index file in `dir`.
fn temp_index_path(dir: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    dir.join(format!(
        "inplace-{}-{nanos}-{}.differing",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Adds `ctx` to an error, keeping its variant (so callers still tell damage from an
/// unreachable backend).
fn in_context(e: StoreError, ctx: &str) -> StoreError {
    match e {
        StoreError::Tampered { object, what } => StoreError::Tampered {
            object,
            what: format!("{what}, {ctx}"),
        },
        StoreError::Corrupt { object, reason } => StoreError::Corrupt {
            object,
            reason: format!("{reason} ({ctx})"),
        },
        StoreError::MissingChunk { id, context } => StoreError::MissingChunk {
            id,
            context: format!("{context}; {ctx}"),
        },
        StoreError::Backend { object, source } => StoreError::Backend {
            object: format!("{object}` for `{ctx}"),
            source,
        },
        StoreError::Pipeline(m) => StoreError::Pipeline(format!("{m} ({ctx})")),
        other => other,
    }
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeros (a target
/// smaller than the disk, before it is grown).
fn read_padded(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// The runs of `BLOCK`-sized blocks where `have` and `want` differ, merged, as byte ranges.
fn differing_runs(have: &[u8], want: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, (h, w)) in have.chunks(BLOCK).zip(want.chunks(BLOCK)).enumerate() {
        if h == w {
            continue;
        }
        let (start, end) = (i * BLOCK, i * BLOCK + w.len());
        match runs.last_mut() {
            Some(r) if r.end == start => r.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// The chunk indexes written by the compare pass, read back in order; stops early once
/// `stop` is set.
struct Indexes {
    file: BufReader<File>,
    path: PathBuf,
    left: u64,
    stop: Arc<AtomicBool>,
}

impl Iterator for Indexes {
    type Item = Result<u64>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.stop.load(Ordering::Relaxed) {
            return None;
        }
        self.left -= 1;
        let mut b = [0u8; 8];
        Some(
            self.file
                .read_exact(&mut b)
                .map(|()| u64::from_le_bytes(b))
                .map_err(|source| StoreError::InputIo {
                    path: self.path.clone(),
                    source,
                }),
        )
    }
}

/// What the passes over the target share between chunks.
struct Pass {
    file: Arc<File>,
    target: PathBuf,
    reader: PointReader,
    keys: Arc<MasterKeys>,
    size: u64,
    cs: u64,
    /// Context of errors: point, disk, target.
    ctx: String,
}

impl Pass {
    fn chunk_len(&self, index: u64) -> u64 {
        self.size.saturating_sub(index * self.cs).min(self.cs)
    }

    fn len_usize(&self, index: u64) -> Result<usize> {
        usize::try_from(self.chunk_len(index)).map_err(|_| {
            StoreError::InvalidArgument(format!("chunk size does not fit memory ({})", self.ctx))
        })
    }

    fn chunk_io(&self, index: u64, what: &str, e: &std::io::Error) -> std::io::Error {
        std::io::Error::new(
            e.kind(),
            format!("{what} chunk {index} ({}): {e}", self.ctx),
        )
    }

    fn restoring(&self) -> String {
        format!("restoring onto `{}`", self.target.display())
    }

    /// Reads chunk `index` of the target into a buffer of `pad_to` bytes (at least its
    /// length); the rest is zeros.
    async fn read_target(self: &Arc<Self>, index: u64, pad_to: usize) -> Result<Vec<u8>> {
        let len = self.len_usize(index)?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; pad_to.max(len)];
            read_padded(&me.file, &mut buf[..len], index * me.cs).map_err(|e| {
                StoreError::InputIo {
                    path: me.target.clone(),
                    source: me.chunk_io(index, "reading", &e),
                }
            })?;
            Ok(buf)
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("target reader panicked: {e}")))?
    }

    /// Pass 1: whether chunk `index` of the target differs from the point's, by keyed id.
    async fn differs(self: Arc<Self>, index: u64) -> Result<bool> {
        let id = self
            .reader
            .chunk_id(index)
            .await
            .map_err(|e| in_context(e, &self.restoring()))?;
        // Ingest computes a chunk's id over the whole chunk size, the disk's last chunk
        // padded with zeros: so does this.
        let cs = usize::try_from(self.cs).map_err(|_| {
            StoreError::InvalidArgument(format!("chunk size does not fit memory ({})", self.ctx))
        })?;
        let buf = self.read_target(index, cs).await?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if id.is_zero() {
                !crate::is_all_zero(&buf)
            } else {
                me.keys.chunk_id(&buf) != id
            }
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("chunk hasher panicked: {e}")))
    }

    /// Fetches chunk `index` of the point: its bytes within the disk, authenticated.
    async fn fetch(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        self.reader
            .read_at(index * self.cs, buf)
            .await
            .map_err(|e| in_context(e, &self.restoring()))
    }

    /// Pass 2: fetches and authenticates chunk `index` of the point (nothing is kept).
    async fn verify(self: Arc<Self>, index: u64) -> Result<()> {
        let mut buf = vec![0u8; self.len_usize(index)?];
        self.fetch(index, &mut buf).await
    }

    /// Pass 3: brings chunk `index` of the target to the point's content, writing only the
    /// blocks that differ. Returns the bytes written.
    async fn write(self: Arc<Self>, index: u64) -> Result<u64> {
        let len = self.len_usize(index)?;
        let have = self.read_target(index, len).await?;
        let mut want = vec![0u8; len];
        // A zero chunk in the point reads as zeros without a fetch.
        self.fetch(index, &mut want).await?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let off = index * me.cs;
            let mut written = 0u64;
            for run in differing_runs(&have, &want) {
                me.file
                    .write_all_at(&want[run.clone()], off + run.start as u64)
                    .map_err(|e| StoreError::OutputIo {
                        path: me.target.clone(),
                        source: me.chunk_io(index, "writing", &e),
                    })?;
                written += run.len() as u64;
            }
            Ok(written)
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("target writer panicked: {e}")))?
    }
}

impl Vault {
    /// Restores one disk of a point onto the existing disk `opts.target` (a regular file or a
    /// block device), writing only the blocks whose content differs from the point's (see the
    /// module documentation for what is guaranteed: damage is found before anything is
    /// written; not atomic otherwise; re-running converges).
    pub async fn restore_in_place(
        &self,
        opts: InPlaceOptions,
        progress: Arc<Progress>,
    ) -> Result<InPlaceReport> {
        let target = open_target(&opts.target)?;
        let point = self.point(&opts.item, &opts.point).await?;
        let disk = point.disk(opts.disk.as_deref())?.clone();
        let ctx = format!(
            "point {} disk `{}`, target `{}`",
            point.id,
            disk.name,
            target.path.display()
        );
        if target.block_device && target.size < disk.size {
            return Err(StoreError::InvalidArgument(format!(
                "target `{}` is a block device of {} bytes, smaller than point {} disk `{}` \
                 ({} bytes); nothing was written",
                target.path.display(),
                target.size,
                point.id,
                disk.name,
                disk.size
            )));
        }
        progress.total.fetch_add(disk.size, Ordering::Relaxed);
        let target_io = |source| StoreError::OutputIo {
            path: target.path.clone(),
            source,
        };
        let target_grown = !target.block_device && target.size < disk.size;
        if disk.size == 0 {
            return Ok(InPlaceReport {
                point,
                disk,
                chunks_compared: 0,
                chunks_written: 0,
                bytes_written: 0,
                target_grown: false,
            });
        }

        let cs = u64::from(disk.chunk_size);
        let count = disk.chunks();
        let conc = in_flight(&self.tuning);
        let reader = PointReader::new(
            self.clone(),
            point.clone(),
            disk.clone(),
            ReaderOptions {
                cache_bytes: conc * disk.chunk_size as usize,
                page_cache_pages: PAGE_CACHE_PAGES,
                read_ahead: 0,
                fetch_concurrency: 1,
            },
        )?;
        let pass = Arc::new(Pass {
            file: Arc::new(target.file),
            target: target.path.clone(),
            reader,
            keys: self.keys.clone(),
            size: disk.size,
            cs,
            ctx: ctx.clone(),
        });

        // Pass 1: compare, the differing indexes into a temporary file in the cache directory.
        let dir = self
            .index_path()
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let index_path = TempFile(temp_index_path(&dir));
        let index_io = |source| StoreError::OutputIo {
            path: index_path.0.clone(),
            source,
        };
        let mut out = BufWriter::with_capacity(
            INDEX_BUF,
            FsOpen::new()
                .write(true)
                .create_new(true)
                .open(&index_path.0)
                .map_err(index_io)?,
        );
        let mut compared = futures::stream::iter(0..count)
            .map(|index| {
                let pass = pass.clone();
                async move { Ok::<_, StoreError>((index, pass.differs(index).await?)) }
            })
            .buffered(conc);
        let (mut differing, mut differing_bytes) = (0u64, 0u64);
        while let Some(r) = compared.next().await {
            let (index, differs) = r?;
            progress
                .done
                .fetch_add(pass.chunk_len(index), Ordering::Relaxed);
            if differs {
                out.write_all(&index.to_le_bytes()).map_err(index_io)?;
                differing += 1;
                differing_bytes += pass.chunk_len(index);
            }
        }
        drop(compared);
        out.flush().map_err(index_io)?;
        drop(out);
        progress
            .total
            .fetch_add(differing_bytes.saturating_mul(2), Ordering::Relaxed);
        let indexes = |stop: &Arc<AtomicBool>| -> Result<Indexes> {
            Ok(Indexes {
                file: BufReader::with_capacity(
                    INDEX_BUF,
                    File::open(&index_path.0).map_err(|source| StoreError::InputIo {
                        path: index_path.0.clone(),
                        source,
                    })?,
                ),
                path: index_path.0.clone(),
                left: differing,
                stop: stop.clone(),
            })
        };

        // Pass 2: every differing chunk the point holds as data is fetched and authenticated
        // before the target is touched.
        let stop = Arc::new(AtomicBool::new(false));
        let mut verified = futures::stream::iter(indexes(&stop)?)
            .map(|i| {
                let pass = pass.clone();
                async move {
                    let index = i?;
                    pass.clone().verify(index).await?;
                    Ok::<_, StoreError>(pass.chunk_len(index))
                }
            })
            .buffer_unordered(conc);
        while let Some(r) = verified.next().await {
            match r {
                Ok(len) => {
                    progress.done.fetch_add(len, Ordering::Relaxed);
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        drop(verified);

        // The target now: grown to the disk's size if it is a smaller regular file.
        if target_grown {
            pass.file.set_len(disk.size).map_err(target_io)?;
        }

        // Pass 3: write the differing blocks.
        let stop = Arc::new(AtomicBool::new(false));
        let mut chunks = futures::stream::iter(indexes(&stop)?)
            .map(|i| {
                let pass = pass.clone();
                async move {
                    let index = i?;
                    let written = pass.clone().write(index).await?;
                    Ok::<_, StoreError>((pass.chunk_len(index), written))
                }
            })
            .buffer_unordered(conc);
        let (mut written, mut bytes) = (0u64, 0u64);
        let mut failed = None;
        // On an error no new chunk is started, but those in flight are drained: nothing is
        // written to the target after this returns.
        while let Some(r) = chunks.next().await {
            match r {
                Ok((len, w)) => {
                    progress.done.fetch_add(len, Ordering::Relaxed);
                    if w > 0 {
                        written += 1;
                        bytes += w;
                        progress.stored.fetch_add(w, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failed.get_or_insert(e);
                }
            }
        }
        drop(chunks);
        if let Some(e) = failed {
            return Err(e);
        }
        if opts.sync {
            pass.file.sync_data().map_err(target_io)?;
        }
        Ok(InPlaceReport {
            point,
            disk,
            chunks_compared: count,
            chunks_written: written,
            bytes_written: bytes,
            target_grown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImportOptions;

    const CS: u64 = 64 << 10;

    async fn vault(dir: &Path) -> Vault {
        crate::formats::testkit::vault(dir, u32::try_from(CS).unwrap()).await
    }

    /// 10 chunks of 64 KiB, the last one of 1000 bytes: data, a zero chunk written as zeros,
    /// a hole, two equal chunks, noise, a hole, data in the short tail.
    fn image() -> Vec<u8> {
        let size = CS * 9 + 1000;
        let mut img = vec![0u8; size as usize];
        img[..CS as usize].fill(1);
        img[5 * CS as usize..7 * CS as usize].fill(7);
        let mut x = 0x1234_5678_9abc_def1u64;
        for b in &mut img[7 * CS as usize..8 * CS as usize] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        img[9 * CS as usize..9 * CS as usize + 500].fill(9);
        img
    }

    /// A vault holding `image()` as the latest point of `web`, and the image.
    async fn setup(dir: &Path) -> (Vault, Vec<u8>) {
        let v = vault(dir).await;
        let img = image();
        let src = dir.join("disk.img");
        std::fs::write(&src, &img).unwrap();
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        (v, img)
    }

    fn opts(target: &Path) -> InPlaceOptions {
        InPlaceOptions {
            item: "web".into(),
            point: PointSelector::Latest,
            disk: None,
            target: target.to_path_buf(),
            sync: true,
        }
    }

    fn chunk(i: u64) -> std::ops::Range<usize> {
        (i * CS) as usize..((i + 1) * CS) as usize
    }

    #[tokio::test]
    async fn a_target_equal_to_the_point_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (v, img) = setup(dir.path()).await;
        let t = dir.path().join("target.img");
        std::fs::write(&t, &img).unwrap();
        let before = std::fs::metadata(&t).unwrap().modified().unwrap();
        let r = v.restore_in_place(opts(&t), Arc::default()).await.unwrap();
        assert_eq!(
            (r.chunks_compared, r.chunks_written, r.bytes_written),
            (10, 0, 0)
        );
        assert!(!r.target_grown);
        assert_eq!(std::fs::read(&t).unwrap(), img);
        assert_eq!(std::fs::metadata(&t).unwrap().modified().unwrap(), before);
    }

    #[tokio::test]
    async fn only_the_differing_chunks_are_written_and_a_second_run_writes_none() {
        let dir = tempfile::tempdir().unwrap();
        let (v, img) = setup(dir.path()).await;
        let mut target = img.clone();
        // Chunk 0: one byte differs. Chunk 3 (zeros in the point): data. Chunk 7 (noise in
        // the point): zeros. Chunk 9 (the short last one): one byte differs. A tail past the
        // disk's end that must be kept.
        target[100] ^= 0xFF;
        target[chunk(3)].fill(3);
        target[chunk(7)].fill(0);
        let last = img.len() - 1;
        target[last] = 0x42;
        let tail = vec![0xABu8; 5000];
        target.extend_from_slice(&tail);
        let t = dir.path().join("target.img");
        std::fs::write(&t, &target).unwrap();
        let progress = Arc::new(Progress::default());
        let r = v
            .restore_in_place(opts(&t), progress.clone())
            .await
            .unwrap();
        assert_eq!((r.chunks_compared, r.chunks_written), (10, 4));
        // Chunk 0: one 4 KiB block; chunks 3 and 7: whole; chunk 9: its one short block.
        assert_eq!(r.bytes_written, 4096 + 2 * CS + 1000);
        assert!(!r.target_grown);
        let after = std::fs::read(&t).unwrap();
        assert_eq!(after.len(), img.len() + tail.len());
        assert!(
            after[..img.len()] == img[..],
            "the disk differs from the point"
        );
        assert_eq!(after[img.len()..], tail[..]);
        let size = img.len() as u64;
        // Compare the disk, then verify and write the four differing chunks.
        let want_total = size + 2 * (3 * CS + 1000);
        assert_eq!(progress.total.load(Ordering::Relaxed), want_total);
        assert_eq!(progress.done.load(Ordering::Relaxed), want_total);
        assert_eq!(
            progress.stored.load(Ordering::Relaxed),
            4096 + 2 * CS + 1000
        );
        // The index file is gone.
        let leftovers = std::fs::read_dir(v.index_path().parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".differing")
            })
            .count();
        assert_eq!(leftovers, 0);
        // Again: it converged, nothing to write.
        let r = v.restore_in_place(opts(&t), Arc::default()).await.unwrap();
        assert_eq!((r.chunks_written, r.bytes_written), (0, 0));
        assert_eq!(std::fs::read(&t).unwrap(), after);
    }

    #[tokio::test]
    async fn a_smaller_file_grows() {
        let dir = tempfile::tempdir().unwrap();
        let (v, img) = setup(dir.path()).await;
        let t = dir.path().join("target.img");
        // Chunks 0..=4 whole, 100 bytes of chunk 5.
        std::fs::write(&t, &img[..(5 * CS + 100) as usize]).unwrap();
        let r = v.restore_in_place(opts(&t), Arc::default()).await.unwrap();
        assert!(r.target_grown);
        // Chunks 5, 6, 7 and 9 hold data; chunk 8 is zeros, as the grown file reads.
        assert_eq!(r.chunks_written, 4);
        assert_eq!(r.bytes_written, 3 * CS + 1000);
        assert_eq!(std::fs::read(&t).unwrap(), img);
    }

    #[tokio::test]
    async fn a_missing_target_or_a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (v, _img) = setup(dir.path()).await;
        let missing = dir.path().join("nope.img");
        let e = v
            .restore_in_place(opts(&missing), Arc::default())
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::OutputIo { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("nope.img") && msg.contains("does not exist"),
            "{msg}"
        );
        assert!(!missing.exists());
        let d = dir.path().join("adir");
        std::fs::create_dir(&d).unwrap();
        let e = v
            .restore_in_place(opts(&d), Arc::default())
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::OutputIo { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("adir") && msg.contains("not a regular file or a block device"),
            "{msg}"
        );
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_corrupted_blob_fails_naming_it_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (v, img) = setup(dir.path()).await;
        let damaged = crate::formats::testkit::damage_data_packs(&v).await;
        let mut target = img.clone();
        target[chunk(7)].fill(0);
        target[chunk(0)].fill(2);
        let t = dir.path().join("target.img");
        std::fs::write(&t, &target[..(8 * CS) as usize]).unwrap();
        let e = v
            .restore_in_place(opts(&t), Arc::default())
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Tampered { .. } | StoreError::Corrupt { .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(damaged.iter().any(|n| msg.contains(n.as_str())), "{msg}");
        assert!(
            msg.contains("target.img") && msg.contains("disk0") && msg.contains("point "),
            "{msg}"
        );
        // Met in the verify pass: nothing written, not even grown.
        assert_eq!(std::fs::read(&t).unwrap(), target[..(8 * CS) as usize]);

        // Met while fetching a differing chunk (damaged after the comparison): the error
        // names the chunk, and the chunk is not written.
        let point = v.point("web", &PointSelector::Latest).await.unwrap();
        let disk = point.disk(None).unwrap().clone();
        let reader = PointReader::new(
            v.clone(),
            point.clone(),
            disk.clone(),
            ReaderOptions::default(),
        )
        .unwrap();
        let file = Arc::new(FsOpen::new().read(true).write(true).open(&t).unwrap());
        file.set_len(disk.size).unwrap();
        let pass = Arc::new(Pass {
            file,
            target: t.clone(),
            reader,
            keys: v.keys.clone(),
            size: disk.size,
            cs: CS,
            ctx: String::new(),
        });
        let mut failed = None;
        for index in 0..disk.chunks() {
            let before = std::fs::read(&t).unwrap();
            if let Err(e) = pass.clone().write(index).await {
                assert_eq!(std::fs::read(&t).unwrap(), before);
                failed = Some((index, e));
                break;
            }
        }
        let (index, e) = failed.expect("a damaged chunk fails");
        let msg = e.to_string();
        assert!(
            matches!(e, StoreError::Tampered { .. } | StoreError::Corrupt { .. }),
            "{e}"
        );
        assert!(
            msg.contains(&format!("chunk {index}"))
                && msg.contains("disk0")
                && msg.contains(&point.id)
                && msg.contains("target.img"),
            "{msg}"
        );
    }

    /// The compare pass reads no chunk data: with every data pack damaged, a target equal to
    /// the point is found equal (tree pages only) and nothing is written.
    #[tokio::test]
    async fn an_equal_target_is_compared_without_reading_chunk_data() {
        let dir = tempfile::tempdir().unwrap();
        let (v, img) = setup(dir.path()).await;
        crate::formats::testkit::damage_data_packs(&v).await;
        let t = dir.path().join("target.img");
        std::fs::write(&t, &img).unwrap();
        let r = v.restore_in_place(opts(&t), Arc::default()).await.unwrap();
        assert_eq!(
            (r.chunks_compared, r.chunks_written, r.bytes_written),
            (10, 0, 0)
        );
        assert_eq!(std::fs::read(&t).unwrap(), img);
    }

    #[test]
    fn differing_blocks_merge_into_runs() {
        let want = vec![0u8; 5 * BLOCK + 10];
        let mut have = want.clone();
        assert!(differing_runs(&have, &want).is_empty());
        have[BLOCK + 1] = 1;
        have[2 * BLOCK] = 1;
        have[5 * BLOCK + 9] = 1;
        assert_eq!(
            differing_runs(&have, &want),
            vec![BLOCK..3 * BLOCK, 5 * BLOCK..5 * BLOCK + 10]
        );
    }
}
