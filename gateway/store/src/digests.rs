//! Chunk digests: the SHA-256 of every chunk of a point's disk, in chunk order, for the
//! agent's checksum-based resync (compare the source with the replica, send only what
//! differs; `docs/agent-protocol.md` §9).
//!
//! The digests are computed from the vault, not from a cached list, so they describe exactly
//! what a restore of the point would write: the disk is read back with restore's machinery
//! (tree walk, batched coalesced ranged reads, parallel decode; every blob authenticated and
//! re-hashed before it is digested) with a sink that hashes instead of writing. Zero chunks
//! and holes are never read: their digest is that of as many zero bytes. Chunks complete out
//! of order, and a disk has millions of them, so the digests go to a file at `index × 32`
//! (`pwrite`), never to memory: the memory used is restore's, bounded by `Tuning`.
//!
//! The file is raw (32 bytes per chunk, nothing else); wrapping it in the agent protocol's
//! digest-list format is the caller's (the store knows nothing of the protocol).

use std::fs::{File, OpenOptions as FsOpen};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sha2::{Digest, Sha256};

use crate::error::{Result, StoreError};
use crate::ingest::Progress;
use crate::point::{DiskRecord, PointRecord};
use crate::restore::{ChunkSink, chunk_span};
use crate::vault::{PointSelector, Vault};

/// Length of one chunk digest (SHA-256).
pub const DIGEST_LEN: usize = 32;

/// Zero digests written at once by the tree walker.
const ZERO_RUN: usize = 2048;

/// Which disk to digest, and where.
#[derive(Debug, Clone)]
pub struct DigestOptions {
    /// Item.
    pub item: String,
    /// Which point.
    pub point: PointSelector,
    /// Which disk (may be omitted when the point has one).
    pub disk: Option<String>,
    /// The file the digests are written to: created or truncated, then [`DIGEST_LEN`] bytes
    /// per chunk, chunk `i` at `i × 32`. On error its content is undefined; the caller owns
    /// (and removes) it either way.
    pub out: PathBuf,
}

/// What [`Vault::chunk_digests`] did.
#[derive(Debug, Clone)]
pub struct DigestReport {
    /// The point digested.
    pub point: PointRecord,
    /// The disk digested (its `chunks()` digests are in the file).
    pub disk: DiskRecord,
    /// Non-zero chunks read and digested (a deduplicated chunk counts once per index).
    pub chunks_read: u64,
    /// Ranged reads made.
    pub reads: u64,
}

/// SHA-256 of `len` zero bytes.
pub fn zero_digest(len: u64) -> [u8; DIGEST_LEN] {
    let zeros = [0u8; 64 << 10];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(zeros.len() as u64)).expect("at most 64 KiB");
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// The digest sink: SHA-256 of each chunk at its length within the disk, written at
/// `index × 32`.
struct DigestSink {
    file: File,
    path: PathBuf,
    size: u64,
    cs: u64,
    /// Chunks of the disk.
    count: u64,
    /// [`ZERO_RUN`] copies of the digest of a whole zero chunk.
    zero_run: Vec<u8>,
    /// The digest of the last chunk when zero (it may be shorter).
    zero_last: [u8; DIGEST_LEN],
}

impl DigestSink {
    fn new(file: File, path: PathBuf, disk: &DiskRecord) -> Self {
        let cs = u64::from(disk.chunk_size);
        let count = disk.chunks();
        let full = zero_digest(cs);
        let last_len = disk.size - count.saturating_sub(1) * cs;
        let zero_last = if last_len == cs {
            full
        } else {
            zero_digest(last_len)
        };
        Self {
            file,
            path,
            size: disk.size,
            cs,
            count,
            zero_run: full.repeat(ZERO_RUN),
            zero_last,
        }
    }

    fn write(&self, bytes: &[u8], index: u64) -> Result<()> {
        self.file
            .write_all_at(bytes, index * DIGEST_LEN as u64)
            .map_err(|source| StoreError::OutputIo {
                path: self.path.clone(),
                source,
            })
    }

    /// The chunk's length within the disk.
    fn chunk_len(&self, index: u64) -> u64 {
        self.size.saturating_sub(index * self.cs).min(self.cs)
    }
}

impl ChunkSink for DigestSink {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        // A deduplicated chunk is hashed once for all its whole-length indexes.
        let mut whole: Option<[u8; DIGEST_LEN]> = None;
        for &index in indexes {
            let span = chunk_span(self.size, self.cs, index, plain.len());
            let want = self.chunk_len(index);
            let d = if span as u64 == want && span == plain.len() {
                *whole.get_or_insert_with(|| Sha256::digest(plain).into())
            } else {
                // The disk's last chunk, or (never written so, but restored so) a stored chunk
                // shorter than its place: the rest reads as zeros.
                let mut h = Sha256::new();
                h.update(&plain[..span]);
                let zeros = [0u8; 4096];
                let mut left = want - span as u64;
                while left > 0 {
                    let n = usize::try_from(left.min(zeros.len() as u64)).expect("at most 4 KiB");
                    h.update(&zeros[..n]);
                    left -= n as u64;
                }
                h.finalize().into()
            };
            self.write(&d, index)?;
        }
        Ok(())
    }

    fn zeros(&self, chunks: Range<u64>) -> Result<()> {
        let end = chunks.end.min(self.count);
        let mut at = chunks.start;
        // Whole chunks in runs; the last chunk of the disk with its own digest.
        let whole_end = end.min(self.count - 1);
        while at < whole_end {
            let n = (whole_end - at).min(ZERO_RUN as u64);
            let bytes = usize::try_from(n).expect("at most ZERO_RUN") * DIGEST_LEN;
            self.write(&self.zero_run[..bytes], at)?;
            at += n;
        }
        if end == self.count && at < end {
            self.write(&self.zero_last, self.count - 1)?;
        }
        Ok(())
    }
}

impl Vault {
    /// Writes the SHA-256 of every chunk of one disk of a point into `opts.out`, in chunk
    /// order at `index × 32`: the digests of the bytes a restore of that point writes (the
    /// last chunk at its own, possibly shorter, length; a zero chunk or hole has the digest of
    /// that many zeros and is not read). Every blob read is authenticated first; a damaged
    /// one fails the whole call, naming it.
    pub async fn chunk_digests(
        &self,
        opts: DigestOptions,
        progress: Arc<Progress>,
    ) -> Result<DigestReport> {
        let point = self.point(&opts.item, &opts.point).await?;
        let disk = point.disk(opts.disk.as_deref())?.clone();
        let out_io = |source| StoreError::OutputIo {
            path: opts.out.clone(),
            source,
        };
        let file = FsOpen::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&opts.out)
            .map_err(out_io)?;
        file.set_len(disk.chunks() * DIGEST_LEN as u64)
            .map_err(out_io)?;
        if disk.size == 0 {
            return Ok(DigestReport {
                point,
                disk,
                chunks_read: 0,
                reads: 0,
            });
        }
        progress.total.store(disk.size, Ordering::Relaxed);
        let sink = Arc::new(DigestSink::new(file, opts.out.clone(), &disk));
        let (chunks_read, reads) = self.read_disk(&point.id, &disk, sink, &progress).await?;
        Ok(DigestReport {
            point,
            disk,
            chunks_read,
            reads,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::{Backend, ExportOptions, ImportOptions, InitOptions, OpenOptions, Secret};

    async fn vault(dir: &std::path::Path) -> Vault {
        Vault::init(
            Backend::open("memory://", &Vec::new(), false).unwrap(),
            &Secret::KeyFile(vec![5; 32]),
            InitOptions {
                chunk_size: 64 << 10,
                ..InitOptions::default()
            },
            OpenOptions::new(dir.join("cache")),
        )
        .await
        .unwrap()
    }

    /// A disk of 64 KiB chunks, the last one short: data, a zero chunk written as zeros, a
    /// hole, a duplicated chunk, a pseudo-random chunk, data in the short tail.
    fn image(path: &std::path::Path) -> u64 {
        let cs = 64u64 << 10;
        let size = cs * 9 + 1000;
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(&vec![1u8; 65536], 0).unwrap();
        f.write_all_at(&vec![0u8; 65536], cs).unwrap();
        // Chunks 2..=4: a hole.
        f.write_all_at(&vec![7u8; 65536], 5 * cs).unwrap();
        f.write_all_at(&vec![7u8; 65536], 6 * cs).unwrap();
        let mut x = 0x1234_5678_9abc_def1u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        f.write_all_at(&noise, 7 * cs).unwrap();
        // Chunk 8: a hole; chunk 9: 1000 bytes, half of them data.
        f.write_all_at(&[9u8; 500], 9 * cs).unwrap();
        size
    }

    fn read_digests(path: &std::path::Path) -> Vec<[u8; DIGEST_LEN]> {
        std::fs::read(path)
            .unwrap()
            .chunks(DIGEST_LEN)
            .map(|c| c.try_into().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn digests_are_those_of_the_exported_image() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).await;
        let src = dir.path().join("disk.img");
        let size = image(&src);
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        let out = dir.path().join("digests");
        let r = v
            .chunk_digests(
                DigestOptions {
                    item: "web".into(),
                    point: PointSelector::Latest,
                    disk: None,
                    out: out.clone(),
                },
                Arc::default(),
            )
            .await
            .unwrap();
        assert_eq!((r.disk.size, r.disk.chunks()), (size, 10));
        // Data chunks only are read: 0, 5, 6, 7, 9 (chunk 1 of zeros is stored as zero).
        assert_eq!(r.chunks_read, 5);
        let img = dir.path().join("out.img");
        v.export(
            ExportOptions {
                item: "web".into(),
                point: PointSelector::Id(r.point.id.clone()),
                disk: None,
                out: img.clone(),
                overwrite: false,
                sync: false,
            },
            Arc::default(),
        )
        .await
        .unwrap();
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(bytes, std::fs::read(&src).unwrap());
        let want: Vec<[u8; DIGEST_LEN]> = bytes
            .chunks(64 << 10)
            .map(|c| Sha256::digest(c).into())
            .collect();
        let got = read_digests(&out);
        assert_eq!(got.len(), 10);
        assert_eq!(got, want);
        assert_eq!(got[1], zero_digest(64 << 10));
        assert_eq!(got[8], zero_digest(64 << 10));
        assert_eq!(got[5], got[6]);
        assert_ne!(got[9], zero_digest(1000));
    }

    #[tokio::test]
    async fn zero_disk_and_zero_tail_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).await;
        // More chunks than one zero run, with a short last chunk: all a hole.
        let src = dir.path().join("zero.img");
        let cs = 64u64 << 10;
        let chunks = ZERO_RUN as u64 + 3;
        let size = cs * (chunks - 1) + 4096;
        File::create(&src).unwrap().set_len(size).unwrap();
        v.import(ImportOptions::full("zero", &src), Arc::default())
            .await
            .unwrap();
        let out = dir.path().join("d");
        let r = v
            .chunk_digests(
                DigestOptions {
                    item: "zero".into(),
                    point: PointSelector::Latest,
                    disk: Some("disk0".into()),
                    out: out.clone(),
                },
                Arc::default(),
            )
            .await
            .unwrap();
        assert_eq!((r.chunks_read, r.reads), (0, 0));
        let got = read_digests(&out);
        assert_eq!(got.len() as u64, chunks);
        let full = zero_digest(cs);
        assert!(got[..got.len() - 1].iter().all(|d| *d == full));
        assert_eq!(got[got.len() - 1], zero_digest(4096));
        assert_eq!(
            zero_digest(4096),
            <[u8; 32]>::from(Sha256::digest([0u8; 4096]))
        );
    }

    #[tokio::test]
    async fn a_corrupted_blob_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).await;
        let src = dir.path().join("disk.img");
        image(&src);
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        let damaged = crate::formats::testkit::damage_data_packs(&v).await;
        let e = v
            .chunk_digests(
                DigestOptions {
                    item: "web".into(),
                    point: PointSelector::Latest,
                    disk: None,
                    out: dir.path().join("d"),
                },
                Arc::default(),
            )
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, StoreError::Tampered { .. } | StoreError::Corrupt { .. }),
            "{e}"
        );
        assert!(damaged.iter().any(|n| msg.contains(n.as_str())), "{msg}");
    }

    #[tokio::test]
    async fn unknown_disk_or_point_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).await;
        let opts = |item: &str, disk: &str| DigestOptions {
            item: item.into(),
            point: PointSelector::Latest,
            disk: Some(disk.into()),
            out: dir.path().join("d"),
        };
        assert!(matches!(
            v.chunk_digests(opts("web", "disk0"), Arc::default()).await,
            Err(StoreError::NoSuchPoint { .. })
        ));
        let src = dir.path().join("disk.img");
        image(&src);
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        assert!(matches!(
            v.chunk_digests(opts("web", "nope"), Arc::default()).await,
            Err(StoreError::InvalidArgument(_))
        ));
    }
}
