//! In-place restore: writing a recovery point's disk onto an existing disk, only the chunks
//! that differ (the data path of failback).
//!
//! After a failover the machine runs at the recovery site and its original disk at home is
//! stale, but mostly still right: only the blocks written since (on either side) differ.
//! Bringing it home with a full export would rewrite the whole disk; [`Vault::restore_in_place`]
//! compares the point with the disk chunk by chunk and writes only the chunks that differ, so
//! only those are fetched a second time from the vault and only those hit the target disk.
//!
//! How: the point's per-chunk SHA-256 come from [`Vault::chunk_digests`] (every non-zero blob
//! of the disk read once and authenticated, zero chunks not read), into a temporary file in
//! the vault's cache directory, read back sequentially. Each chunk of the target is read with
//! a positioned read and hashed (the last chunk at its own, possibly shorter, length: what
//! `digests` hashes); a chunk whose digest differs is fetched through a [`PointReader`]
//! (authenticated again, the error naming the point, disk and chunk index) or, when the point
//! holds zeros there, not fetched at all; then written with a positioned write. A target
//! chunk that already equals the point (zeros included) is never written.
//!
//! Cost: the comparison pass reads every non-zero chunk of the point from the vault once
//! (that is what `chunk_digests` does), then the differing ones are read again; what is saved
//! is the writes to the target disk (and, for a target far from the vault, a caller that ships
//! only the digests and the differing chunks). Comparing keyed chunk ids (`crypto::chunk_id`
//! of the target's chunks against the tree's ids) would avoid the first read; it is not done
//! here.
//!
//! Guarantees:
//! - The target must exist and be a regular file or a block device; anything else, or a
//!   missing target, is refused before anything is read or written. A block device is opened
//!   with `O_EXCL` (Linux refuses it while mounted or held by another driver) and must be at
//!   least the disk's size; a smaller regular file is extended to it (after the comparison
//!   pass, so a damaged vault leaves the file untouched). A larger target keeps its tail.
//! - Afterwards the target's first `disk.size` bytes equal a restore of the point byte for
//!   byte.
//! - Not atomic: a failure (a chunk damaged in the vault, the backend unreachable, a write
//!   error) stops the operation with a typed error naming the target, point and disk, and
//!   the chunk (its index when met while fetching a differing chunk or on a target I/O error,
//!   its blob id and pack when met in the comparison pass); what was written before stays
//!   written. The operator re-runs it: since only the
//!   chunks that still differ are written, running it again converges (a second run on an
//!   unchanged target writes nothing). A damaged blob is normally met in the comparison pass,
//!   before anything is written.
//! - Memory is independent of the disk's size: [`in_flight`] chunks are being read, hashed,
//!   fetched or written at once (twice the vault's `fetch_concurrency`), each holding one
//!   chunk buffer, plus a chunk cache of as many chunks and a small page cache in the reader,
//!   a 64 KiB digest buffer, and the comparison pass's memory (restore's, bounded by
//!   `Tuning`).
//!
//! Progress: `total` is twice the disk's size (the comparison pass, then the pass over the
//! target), `done` advances through both, and `stored` counts the bytes written to the
//! target.

use std::fs::{File, OpenOptions as FsOpen};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::digests::{DIGEST_LEN, DigestOptions, zero_digest};
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
    /// Chunks that differed and were written.
    pub chunks_written: u64,
    /// Bytes written: the written chunks' lengths within the disk.
    pub bytes_written: u64,
    /// Whether the target (a regular file smaller than the disk) was extended.
    pub target_grown: bool,
}

/// Chunks being read, hashed, fetched or written at once: twice the vault's fetch
/// concurrency, so reading and hashing the target overlaps fetching and writing.
pub fn in_flight(tuning: &crate::Tuning) -> usize {
    2 * tuning.fetch_concurrency.max(1)
}

/// Digests read from the digest file at once (64 KiB).
const DIGEST_BUF: usize = 2048 * DIGEST_LEN;

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

/// Removes the temporary digest file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A unique name for the digest file in `dir`.
fn temp_digest_path(dir: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    dir.join(format!(
        "inplace-{}-{nanos}-{}.digests",
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

/// The point's digests, one per chunk in order, read sequentially from the digest file;
/// stops early once `stop` is set.
struct Digests {
    file: BufReader<File>,
    path: PathBuf,
    next: u64,
    count: u64,
    stop: Arc<AtomicBool>,
}

impl Iterator for Digests {
    type Item = Result<(u64, [u8; DIGEST_LEN])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.count || self.stop.load(Ordering::Relaxed) {
            return None;
        }
        let index = self.next;
        self.next += 1;
        let mut d = [0u8; DIGEST_LEN];
        Some(
            self.file
                .read_exact(&mut d)
                .map(|()| (index, d))
                .map_err(|source| StoreError::InputIo {
                    path: self.path.clone(),
                    source,
                }),
        )
    }
}

/// What the pass over the target shares between chunks.
struct Pass {
    file: Arc<File>,
    target: PathBuf,
    reader: PointReader,
    size: u64,
    cs: u64,
    count: u64,
    zero_full: [u8; DIGEST_LEN],
    zero_last: [u8; DIGEST_LEN],
    /// Context of errors: point, disk, target.
    ctx: String,
}

impl Pass {
    fn chunk_len(&self, index: u64) -> u64 {
        self.size.saturating_sub(index * self.cs).min(self.cs)
    }

    fn zero_digest(&self, index: u64) -> [u8; DIGEST_LEN] {
        if index + 1 == self.count {
            self.zero_last
        } else {
            self.zero_full
        }
    }

    fn chunk_io(&self, index: u64, what: &str, e: &std::io::Error) -> std::io::Error {
        std::io::Error::new(
            e.kind(),
            format!("{what} chunk {index} ({}): {e}", self.ctx),
        )
    }

    /// Brings chunk `index` of the target to the point's digest `want`. Returns the bytes
    /// written (0 when the chunk already matched).
    async fn chunk(self: Arc<Self>, index: u64, want: [u8; DIGEST_LEN]) -> Result<u64> {
        let off = index * self.cs;
        let len = usize::try_from(self.chunk_len(index)).map_err(|_| {
            StoreError::InvalidArgument(format!("chunk size does not fit memory ({})", self.ctx))
        })?;
        let zero = self.zero_digest(index);
        let me = self.clone();
        let compared = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>> {
            let mut buf = vec![0u8; len];
            me.file
                .read_exact_at(&mut buf, off)
                .map_err(|e| StoreError::InputIo {
                    path: me.target.clone(),
                    source: me.chunk_io(index, "reading", &e),
                })?;
            let have: [u8; DIGEST_LEN] = if crate::is_all_zero(&buf) {
                zero
            } else {
                Sha256::digest(&buf).into()
            };
            Ok((have != want).then_some(buf))
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("target reader panicked: {e}")))??;
        let Some(mut buf) = compared else {
            return Ok(0);
        };
        if want == zero {
            // The point holds zeros here: nothing to fetch.
            buf.fill(0);
        } else {
            self.reader.read_at(off, &mut buf).await.map_err(|e| {
                in_context(e, &format!("restoring onto `{}`", self.target.display()))
            })?;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.file
                .write_all_at(&buf, off)
                .map_err(|e| StoreError::OutputIo {
                    path: me.target.clone(),
                    source: me.chunk_io(index, "writing", &e),
                })
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("target writer panicked: {e}")))??;
        Ok(len as u64)
    }
}

impl Vault {
    /// Restores one disk of a point onto the existing disk `opts.target` (a regular file or a
    /// block device), writing only the chunks whose content differs from the point's (see the
    /// module documentation for what is guaranteed: not atomic, re-running converges).
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
        progress
            .total
            .store(disk.size.saturating_mul(2), Ordering::Relaxed);

        // Pass 1: the point's digests, into a temporary file in the cache directory.
        let dir = self
            .index_path()
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let digests_path = TempFile(temp_digest_path(&dir));
        let inner = Arc::new(Progress::default());
        let digesting = self.chunk_digests(
            DigestOptions {
                item: opts.item.clone(),
                point: PointSelector::Id(point.id.clone()),
                disk: Some(disk.name.clone()),
                out: digests_path.0.clone(),
            },
            inner.clone(),
        );
        futures::pin_mut!(digesting);
        let base = progress.done.load(Ordering::Relaxed);
        let digested = loop {
            tokio::select! {
                r = &mut digesting => break r,
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let d = inner.done.load(Ordering::Relaxed).min(disk.size);
                    progress.done.store(base + d, Ordering::Relaxed);
                }
            }
        };
        digested.map_err(|e| in_context(e, &format!("comparing with {ctx}")))?;
        progress.done.store(base + disk.size, Ordering::Relaxed);

        // The target now: grown to the disk's size if it is a smaller regular file.
        let target_io = |source| StoreError::OutputIo {
            path: target.path.clone(),
            source,
        };
        let target_grown = !target.block_device && target.size < disk.size;
        if target_grown {
            target.file.set_len(disk.size).map_err(target_io)?;
        }

        if disk.size == 0 {
            return Ok(InPlaceReport {
                point,
                disk,
                chunks_compared: 0,
                chunks_written: 0,
                bytes_written: 0,
                target_grown,
            });
        }

        // Pass 2: compare each chunk of the target, fetch and write those that differ.
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
        let last_len = disk.size - count.saturating_sub(1) * cs;
        let zero_full = zero_digest(cs);
        let pass = Arc::new(Pass {
            file: Arc::new(target.file),
            target: target.path.clone(),
            reader,
            size: disk.size,
            cs,
            count,
            zero_full,
            zero_last: if last_len == cs {
                zero_full
            } else {
                zero_digest(last_len)
            },
            ctx: ctx.clone(),
        });
        let digest_file = File::open(&digests_path.0).map_err(|source| StoreError::InputIo {
            path: digests_path.0.clone(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let digests = Digests {
            file: BufReader::with_capacity(DIGEST_BUF, digest_file),
            path: digests_path.0.clone(),
            next: 0,
            count,
            stop: stop.clone(),
        };
        let mut chunks = futures::stream::iter(digests)
            .map(|d| {
                let pass = pass.clone();
                async move {
                    let (index, want) = d?;
                    let written = pass.clone().chunk(index, want).await?;
                    Ok::<_, StoreError>((pass.chunk_len(index), written))
                }
            })
            .buffer_unordered(conc);
        let (mut compared, mut written, mut bytes) = (0u64, 0u64, 0u64);
        let mut failed = None;
        // On an error no new chunk is started, but those in flight are drained: nothing is
        // written to the target after this returns.
        while let Some(r) = chunks.next().await {
            match r {
                Ok((len, w)) => {
                    compared += 1;
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
            chunks_compared: compared,
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
        assert_eq!(r.bytes_written, 3 * CS + 1000);
        assert!(!r.target_grown);
        let after = std::fs::read(&t).unwrap();
        assert_eq!(after.len(), img.len() + tail.len());
        assert!(
            after[..img.len()] == img[..],
            "the disk differs from the point"
        );
        assert_eq!(after[img.len()..], tail[..]);
        let size = img.len() as u64;
        assert_eq!(progress.total.load(Ordering::Relaxed), 2 * size);
        assert_eq!(progress.done.load(Ordering::Relaxed), 2 * size);
        assert_eq!(progress.stored.load(Ordering::Relaxed), 3 * CS + 1000);
        // The digest file is gone.
        let leftovers = std::fs::read_dir(v.index_path().parent().unwrap())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".digests")
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
        // Met in the comparison pass: nothing written, not even grown.
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
            size: disk.size,
            cs: CS,
            count: disk.chunks(),
            zero_full: zero_digest(CS),
            zero_last: zero_digest(1000),
            ctx: String::new(),
        });
        let mut failed = None;
        for index in 0..disk.chunks() {
            let want: [u8; DIGEST_LEN] =
                Sha256::digest(&img[(index * CS) as usize..img.len().min(chunk(index).end)]).into();
            let before = std::fs::read(&t).unwrap();
            if let Err(e) = pass.clone().chunk(index, want).await {
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
}
