//! Ingest: turning a disk (or its changed extents) into a recovery point.
//!
//! ```text
//!  reader ──jobs──▶ workers ×N ──results──▶ collector (tree builder) ──▶ record
//!  (pread,          (zero check, HMAC id,    (reorders, applies CoW
//!   SEEK_DATA)       dedup, zstd; AES-GCM     updates, writes pages
//!                    into the shared pack)    into the meta pack)
//!                          └──────full packs──▶ uploader ──▶ index segments ──▶ redb
//! ```
//!
//! Every queue is bounded: at most `window` chunks are between the reader and the collector,
//! one data and one page pack are open, one full pack waits and at most `uploads` are being
//! uploaded, so memory is bounded by
//! [`Tuning::ingest_memory_bound`](crate::Tuning::ingest_memory_bound), never by the disk size.
//!
//! Commit order: packs, then the index segment listing them, then the point record
//! (create-only). A crash anywhere before the record leaves no visible point; packs without a
//! segment are unreferenced garbage, packs with one are reusable by the next import.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use crate::error::{Result, StoreError};
use crate::index::{INDEX_PREFIX, PackInfo, SegmentPack, encode_segment};
use crate::pack::{BlobKind, Compressor, FinishedPack, PackBuilder};
use crate::point::{Consistency, DiskRecord, PointRecord, new_point_id, now_ms};
use crate::sealed::{POINT_MAGIC, SEGMENT_MAGIC};
use crate::source::{DiskSource, SourceDisk, chunk_ranges, overlaps};
use crate::tree::{PageStore, TreeBuilder};
use crate::vault::{PointSelector, Vault};
use crate::{ChunkId, check_name, is_all_zero};

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Protected item.
    pub item: String,
    /// Disk name within the item.
    pub disk_name: String,
    /// Raw image or block device.
    pub disk_path: PathBuf,
    /// Read the disk from this source instead of opening `disk_path` as a raw image (a source
    /// adapter's virtual disk, bridged by the caller). `disk_path` is then only a label.
    pub disk: Option<Arc<dyn DiskSource>>,
    /// Changed byte ranges since the item's latest point (`None`: full read).
    pub changes: Option<Vec<Range<u64>>>,
    /// Chunk size for a disk new to the vault (default: the vault's).
    pub chunk_size: Option<u32>,
    /// Consistency of the new point.
    pub consistency: Consistency,
    /// Free text recorded as the point's source.
    pub source: String,
    /// Tags recorded with the point.
    pub tags: Vec<(String, String)>,
}

impl ImportOptions {
    /// A full import of `disk_path` as disk `disk0` of `item`.
    pub fn full(item: impl Into<String>, disk_path: impl Into<PathBuf>) -> Self {
        let disk_path = disk_path.into();
        Self {
            item: item.into(),
            disk_name: "disk0".into(),
            source: format!("import {}", disk_path.display()),
            disk_path,
            disk: None,
            changes: None,
            chunk_size: None,
            consistency: Consistency::Crash,
            tags: Vec::new(),
        }
    }
}

/// What a point says besides its disks: given to [`Vault::commit_import`].
#[derive(Debug, Clone)]
pub struct PointMeta {
    /// Consistency of the new point.
    pub consistency: Consistency,
    /// Free text recorded as the point's source.
    pub source: String,
    /// Tags recorded with the point.
    pub tags: Vec<(String, String)>,
}

impl PointMeta {
    fn check(&self) -> Result<()> {
        for (k, v) in &self.tags {
            if k.len() > 256 || v.len() > 1024 {
                return Err(StoreError::InvalidArgument("tag too long".into()));
            }
        }
        if self.source.len() > 1024 {
            return Err(StoreError::InvalidArgument("source text too long".into()));
        }
        Ok(())
    }
}

/// A disk whose chunks and tree are in the vault but in no point yet ([`Vault::stage_import`]).
#[derive(Debug, Clone)]
pub struct StagedImport {
    item: String,
    /// The point whose tree an incremental import was built over.
    base_point: Option<String>,
    disk: DiskRecord,
    chunks: u64,
    chunks_zero: u64,
    chunks_new: u64,
    pages_written: u64,
    packs: u64,
}

impl StagedImport {
    /// The staged disk.
    pub fn disk(&self) -> &DiskRecord {
        &self.disk
    }
}

/// Live counters of an import, for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the import will go through (allocated or changed extents).
    pub total: AtomicU64,
    /// Bytes gone through so far.
    pub done: AtomicU64,
    /// Bytes newly stored so far.
    pub stored: AtomicU64,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The new point.
    pub point: PointRecord,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// Bytes newly stored (blobs of data and pages, after compression and encryption).
    pub bytes_stored: u64,
    /// Chunks gone through.
    pub chunks: u64,
    /// Of which zero.
    pub chunks_zero: u64,
    /// Of which new to the vault.
    pub chunks_new: u64,
    /// Tree pages written.
    pub pages_written: u64,
    /// Packs uploaded.
    pub packs: u64,
}

/// Read-ahead granularity of the reader.
const PREFETCH_STEP: u64 = 4 << 20;

struct Shared {
    vault: Vault,
    /// The one open data pack, shared by the workers.
    data_pack: Mutex<Option<PackBuilder>>,
    claimed: Mutex<HashSet<ChunkId>>,
    abort: AtomicBool,
    bytes_read: AtomicU64,
    bytes_stored: AtomicU64,
    chunks_new: AtomicU64,
    chunks_zero: AtomicU64,
    progress: Arc<Progress>,
}

/// A read snapshot of the local index that follows new segments: claims are released once
/// their segment is in the index, so lookups must see what was inserted since.
struct FreshReader {
    reader: crate::index::IndexReader,
    generation: u64,
}

impl FreshReader {
    fn new(vault: &Vault) -> Result<Self> {
        let generation = vault.index_generation.load(Ordering::Acquire);
        Ok(Self {
            reader: vault.index.reader()?,
            generation,
        })
    }

    fn get(&mut self, vault: &Vault) -> Result<&crate::index::IndexReader> {
        let g = vault.index_generation.load(Ordering::Acquire);
        if g != self.generation {
            self.reader = vault.index.reader()?;
            self.generation = g;
        }
        Ok(&self.reader)
    }
}

impl Shared {
    /// Claims `id` for this import: true if it is new and the caller must store it.
    fn claim(&self, fresh: &mut FreshReader, id: &ChunkId) -> Result<bool> {
        if fresh.get(&self.vault)?.lookup(id)?.is_some() {
            return Ok(false);
        }
        let mut c = self.claimed.lock().expect("claim set lock");
        Ok(c.insert(*id))
    }
}

/// A chunk read from the disk, on its way to a worker.
struct Job {
    seq: u64,
    index: u64,
    buf: Vec<u8>,
}

struct Done {
    seq: u64,
    index: u64,
    id: ChunkId,
}

impl Vault {
    /// Imports a disk as a new recovery point of `opts.item`.
    pub async fn import(
        &self,
        opts: ImportOptions,
        progress: Arc<Progress>,
    ) -> Result<ImportReport> {
        let meta = PointMeta {
            consistency: opts.consistency,
            source: opts.source.clone(),
            tags: opts.tags.clone(),
        };
        meta.check()?;
        let staged = self.stage_import(opts, progress).await?;
        self.commit_import(staged, meta).await
    }

    /// The first half of [`Vault::import`]: stores the disk's chunks and tree (durable, but
    /// part of no point yet: garbage until [`Vault::commit_import`] names it). `opts`'
    /// consistency, source and tags are not used; the commit takes them, so a caller may
    /// learn them only once the data is in (a replication cycle's `EndOfCycle`).
    pub async fn stage_import(
        &self,
        opts: ImportOptions,
        progress: Arc<Progress>,
    ) -> Result<StagedImport> {
        check_name("item name", &opts.item)?;
        check_name("disk name", &opts.disk_name)?;
        let disk: Arc<dyn DiskSource> = match &opts.disk {
            Some(d) => d.clone(),
            None => Arc::new(SourceDisk::open(&opts.disk_path)?),
        };
        let size = disk.size();
        let prev = match self.point(&opts.item, &PointSelector::Latest).await {
            Ok(p) => Some(p),
            Err(StoreError::NoSuchPoint { .. }) => None,
            Err(e) => return Err(e),
        };
        let prev_disk = prev
            .as_ref()
            .and_then(|p| p.disks.iter().find(|d| d.name == opts.disk_name).cloned());
        let (chunk_size, base) = match (&opts.changes, &prev_disk) {
            (Some(_), None) => {
                return Err(StoreError::InvalidArgument(format!(
                    "item `{}` has no previous point with disk `{}`: an incremental import \
                     (--changes) needs one; import without --changes first",
                    opts.item, opts.disk_name
                )));
            }
            (Some(_), Some(d)) => {
                if d.size != size {
                    return Err(StoreError::InvalidArgument(format!(
                        "disk `{}` is {size} bytes but was {} bytes in point {}: after a \
                         resize, import without --changes",
                        disk.name(),
                        d.size,
                        prev.as_ref().map_or("", |p| p.id.as_str())
                    )));
                }
                if let Some(cs) = opts.chunk_size
                    && cs != d.chunk_size
                {
                    return Err(StoreError::InvalidArgument(format!(
                        "--chunk-size {cs} differs from the disk's {} in the previous point",
                        d.chunk_size
                    )));
                }
                (d.chunk_size, d.root)
            }
            (None, d) => (
                opts.chunk_size
                    .or(d.as_ref().map(|d| d.chunk_size))
                    .unwrap_or(self.config.chunk_size),
                ChunkId::ZERO,
            ),
        };
        crate::check_chunk_size(chunk_size).map_err(StoreError::InvalidArgument)?;
        let extents = disk.data_extents()?;
        let plan = match &opts.changes {
            Some(c) => {
                if let Some(bad) = c.iter().find(|r| r.end > size || r.start > r.end) {
                    return Err(StoreError::InvalidArgument(format!(
                        "changed range {}..{} is past the end of the {size}-byte disk `{}`",
                        bad.start,
                        bad.end,
                        disk.name()
                    )));
                }
                chunk_ranges(c, chunk_size, size)
            }
            None => chunk_ranges(&extents, chunk_size, size),
        };
        let chunks_planned: u64 = plan.iter().map(|r| r.end - r.start).sum();
        progress
            .total
            .store(chunks_planned * u64::from(chunk_size), Ordering::Relaxed);

        let shared = Arc::new(Shared {
            vault: self.clone(),
            data_pack: Mutex::new(None),
            claimed: Mutex::new(HashSet::new()),
            abort: AtomicBool::new(false),
            bytes_read: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            chunks_new: AtomicU64::new(0),
            chunks_zero: AtomicU64::new(0),
            progress: progress.clone(),
        });
        let (pack_tx, pack_rx) = mpsc::channel::<FinishedPack>(1);
        let uploader = tokio::spawn(upload_packs(shared.clone(), pack_rx));

        let handle = tokio::runtime::Handle::current();
        let sh = shared.clone();
        let chunks = size.div_ceil(u64::from(chunk_size));
        let built = tokio::task::spawn_blocking(move || {
            run_pipeline(
                &sh, handle, disk, extents, plan, chunk_size, chunks, base, pack_tx,
            )
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("pipeline panicked: {e}")));
        // An upload error is the root cause when both fail.
        let uploaded = uploader
            .await
            .map_err(|e| StoreError::Pipeline(format!("uploader panicked: {e}")))?;
        let packs = uploaded?;
        let (root, levels, pages_written) = built??;

        Ok(StagedImport {
            item: opts.item,
            base_point: match &opts.changes {
                Some(_) => prev.as_ref().map(|p| p.id.clone()),
                None => None,
            },
            disk: DiskRecord {
                name: opts.disk_name,
                size,
                chunk_size,
                levels,
                root,
                bytes_read: shared.bytes_read.load(Ordering::Relaxed),
                bytes_stored: shared.bytes_stored.load(Ordering::Relaxed),
            },
            chunks: chunks_planned,
            chunks_zero: shared.chunks_zero.load(Ordering::Relaxed),
            chunks_new: shared.chunks_new.load(Ordering::Relaxed),
            pages_written,
            packs,
        })
    }

    /// The second half of [`Vault::import`]: makes a staged disk a recovery point of its
    /// item. The point holds the item's other disks as its newest point has them now (so
    /// disks staged side by side each land); a disk staged incrementally over a point is
    /// refused if the item gained another point since (its tree would undo that point).
    pub async fn commit_import(
        &self,
        staged: StagedImport,
        meta: PointMeta,
    ) -> Result<ImportReport> {
        meta.check()?;
        let prev = match self.point(&staged.item, &PointSelector::Latest).await {
            Ok(p) => Some(p),
            Err(StoreError::NoSuchPoint { .. }) => None,
            Err(e) => return Err(e),
        };
        if let Some(base) = &staged.base_point
            && prev.as_ref().map(|p| &p.id) != Some(base)
        {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{}` of `{}` was imported over point {base}, but the item's newest point is now {}: import it again",
                staged.disk.name,
                staged.item,
                prev.as_ref().map_or("none", |p| p.id.as_str())
            )));
        }
        let bytes_read = staged.disk.bytes_read;
        let bytes_stored = staged.disk.bytes_stored;
        let disk_name = staged.disk.name.clone();
        let mut disks: Vec<DiskRecord> = prev
            .as_ref()
            .map(|p| {
                p.disks
                    .iter()
                    .filter(|d| d.name != disk_name)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        disks.push(staged.disk);
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        // Point ids sort by time; keep them after the previous one even if the clock stepped
        // back.
        let created_ms = now_ms().max(prev.as_ref().map_or(0, |p| p.created_ms + 1));
        let id = new_point_id(created_ms);
        let record = PointRecord {
            id,
            item: staged.item,
            created_ms,
            consistency: meta.consistency,
            parent: prev.as_ref().map(|p| p.id.clone()),
            source: meta.source,
            disks,
            tags: meta.tags,
        };
        self.commit_point(&record).await?;
        Ok(ImportReport {
            point: record,
            bytes_read,
            bytes_stored,
            chunks: staged.chunks,
            chunks_zero: staged.chunks_zero,
            chunks_new: staged.chunks_new,
            pages_written: staged.pages_written,
            packs: staged.packs,
        })
    }

    /// Writes a point record, create-only, after a durability barrier: everything it refers
    /// to is already durable when it appears.
    pub(crate) async fn commit_point(&self, record: &PointRecord) -> Result<()> {
        let name = record.object_name();
        let sealed = crate::sealed::seal(&self.keys, POINT_MAGIC, &name, &record.encode());
        self.backend.barrier().await?;
        if !self.backend.put_create(&name, Bytes::from(sealed)).await? {
            return Err(StoreError::Pipeline(format!(
                "point record `{name}` already exists"
            )));
        }
        self.backend.barrier().await
    }
}

#[allow(clippy::too_many_arguments)] // one call site; the parts are the pipeline's inputs
fn run_pipeline(
    shared: &Arc<Shared>,
    handle: tokio::runtime::Handle,
    disk: Arc<dyn DiskSource>,
    extents: Vec<Range<u64>>,
    plan: Vec<Range<u64>>,
    chunk_size: u32,
    chunks: u64,
    base: ChunkId,
    pack_tx: mpsc::Sender<FinishedPack>,
) -> Result<(ChunkId, u8, u64)> {
    let tuning = shared.vault.tuning;
    let workers = tuning.workers.max(1);
    // Chunks between the reader and the collector: about 16 MiB, and at least 4 per worker,
    // so one slow chunk does not idle the other workers.
    let cs = chunk_size as usize;
    let window = ((16 << 20) / cs).clamp(4 * workers, 1024);
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(2 * workers);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<Result<Done>>(window);
    let (token_tx, token_rx) = crossbeam_channel::bounded::<()>(window);
    let (pool_tx, pool_rx) = crossbeam_channel::bounded::<Vec<u8>>(window + workers);
    for _ in 0..window {
        token_tx.send(()).expect("fresh channel has room");
    }

    std::thread::scope(|scope| -> Result<(ChunkId, u8, u64)> {
        // Reader.
        let reader_done = done_tx.clone();
        let sh = shared.clone();
        let disk = &*disk;
        let extents = &extents;
        let plan = &plan;
        let reader = scope.spawn(move || -> Result<()> {
            let mut seq = 0u64;
            for r in plan {
                for index in r.clone() {
                    if token_rx.recv().is_err() || sh.abort.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let off = index * u64::from(chunk_size);
                    let hole = !overlaps(extents, off, off + u64::from(chunk_size))
                        || match disk.is_hole(off, u64::from(chunk_size)) {
                            Ok(h) => h,
                            Err(e) => {
                                sh.abort.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        };
                    if hole {
                        // A hole: zero without reading.
                        sh.chunks_zero.fetch_add(1, Ordering::Relaxed);
                        sh.progress
                            .done
                            .fetch_add(u64::from(chunk_size), Ordering::Relaxed);
                        if reader_done
                            .send(Ok(Done {
                                seq,
                                index,
                                id: ChunkId::ZERO,
                            }))
                            .is_err()
                        {
                            return Ok(());
                        }
                    } else {
                        // Keep the disk busy ahead of the readers: every 4 MiB, ask for the
                        // next 16 MiB.
                        if off % PREFETCH_STEP < u64::from(chunk_size) {
                            disk.prefetch(off + PREFETCH_STEP, 4 * PREFETCH_STEP);
                        }
                        let mut buf = pool_rx.try_recv().unwrap_or_else(|_| vec![0u8; cs]);
                        if let Err(e) = disk.read_at(&mut buf, off) {
                            sh.abort.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        sh.bytes_read
                            .fetch_add(u64::from(chunk_size), Ordering::Relaxed);
                        if job_tx.send(Job { seq, index, buf }).is_err() {
                            return Ok(());
                        }
                    }
                    seq += 1;
                }
            }
            Ok(())
        });

        // Workers.
        let mut worker_handles = Vec::new();
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let pool_tx = pool_tx.clone();
            let pack_tx = pack_tx.clone();
            let sh = shared.clone();
            worker_handles.push(scope.spawn(move || -> Result<()> {
                let keys = sh.vault.keys.clone();
                let mut reader = FreshReader::new(&sh.vault)?;
                let mut comp = Compressor::new(tuning.zstd_level);
                for job in job_rx.iter() {
                    let Job { seq, index, buf } = job;
                    let mut full = None;
                    let id = if is_all_zero(&buf) {
                        sh.chunks_zero.fetch_add(1, Ordering::Relaxed);
                        ChunkId::ZERO
                    } else {
                        let id = keys.chunk_id(&buf);
                        if sh.claim(&mut reader, &id)? {
                            // Compress outside the lock; encrypt and append under it (AES-GCM
                            // is an order of magnitude faster than zstd, so the lock is short).
                            let (compression, body) = comp.compress(&buf);
                            #[allow(clippy::cast_possible_truncation)] // chunk ≤ 4 MiB
                            let plain_len = buf.len() as u32;
                            let mut open = sh.data_pack.lock().expect("data pack lock");
                            let p = open.get_or_insert_with(|| {
                                PackBuilder::new(&keys, BlobKind::Data, tuning.pack_target + cs)
                            });
                            let n = p.append(id, plain_len, compression, body);
                            sh.bytes_stored.fetch_add(u64::from(n), Ordering::Relaxed);
                            sh.progress
                                .stored
                                .fetch_add(u64::from(n), Ordering::Relaxed);
                            sh.chunks_new.fetch_add(1, Ordering::Relaxed);
                            if p.len() >= tuning.pack_target {
                                full = open.take();
                            }
                        }
                        id
                    };
                    sh.progress
                        .done
                        .fetch_add(u64::from(chunk_size), Ordering::Relaxed);
                    let _ = pool_tx.try_send(buf);
                    // Hand the result on before possibly waiting for the uploader, so the
                    // collector and the other workers keep going meanwhile.
                    if done_tx.send(Ok(Done { seq, index, id })).is_err() {
                        return Ok(());
                    }
                    if let Some(full) = full
                        && pack_tx.blocking_send(full.finish()).is_err()
                    {
                        sh.abort.store(true, Ordering::Relaxed);
                        return Err(StoreError::Pipeline("uploader stopped".into()));
                    }
                }
                Ok(())
            }));
        }
        drop(job_rx);
        drop(done_tx);
        drop(pool_tx);

        // Collector: reorder, build the tree.
        let mut pages = WritePages {
            shared: shared.clone(),
            handle,
            pack: None,
            comp: Compressor::new(3),
            pack_tx: pack_tx.clone(),
            reader: FreshReader::new(&shared.vault)?,
            written: 0,
        };
        let mut tree = TreeBuilder::new(chunks, base);
        let levels = tree.levels();
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let mut next = 0u64;
        let mut result: Result<()> = Ok(());
        for d in done_rx.iter() {
            match d {
                Ok(d) => {
                    pending.insert(d.seq, d);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            while let Some(d) = pending.remove(&next) {
                next += 1;
                let _ = token_tx.send(());
                if let Err(e) = tree.set(&mut pages, d.index, d.id) {
                    result = Err(e);
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_err() {
            shared.abort.store(true, Ordering::Relaxed);
        }
        drop(done_rx);
        drop(token_tx);
        let reader_res = reader
            .join()
            .map_err(|_| StoreError::Pipeline("reader panicked".into()))?;
        let mut worker_err = None;
        for w in worker_handles {
            let r = w
                .join()
                .map_err(|_| StoreError::Pipeline("worker panicked".into()))?;
            if let Err(e) = r {
                worker_err.get_or_insert(e);
            }
        }
        reader_res?;
        result?;
        if let Some(e) = worker_err {
            return Err(e);
        }
        let expected: u64 = plan.iter().map(|r| r.end - r.start).sum();
        if next != expected {
            return Err(StoreError::Pipeline(format!(
                "pipeline stopped after {next} of {expected} chunks"
            )));
        }
        let last = shared.data_pack.lock().expect("data pack lock").take();
        if let Some(p) = last
            && !p.is_empty()
            && pack_tx.blocking_send(p.finish()).is_err()
        {
            return Err(StoreError::Pipeline("uploader stopped".into()));
        }
        let root = tree.finish(&mut pages)?;
        pages.flush()?;
        drop(pack_tx);
        Ok((root, levels, pages.pages_written()))
    })
}

/// Stores tree pages in metadata packs during an import.
struct WritePages {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    pack: Option<PackBuilder>,
    comp: Compressor,
    pack_tx: mpsc::Sender<FinishedPack>,
    reader: FreshReader,
    written: u64,
}

impl WritePages {
    fn flush(&mut self) -> Result<()> {
        if let Some(p) = self.pack.take()
            && !p.is_empty()
            && self.pack_tx.blocking_send(p.finish()).is_err()
        {
            return Err(StoreError::Pipeline("uploader stopped".into()));
        }
        Ok(())
    }

    fn pages_written(&self) -> u64 {
        self.written
    }
}

impl PageStore for WritePages {
    fn load(&mut self, id: &ChunkId) -> Result<Vec<u8>> {
        self.handle.block_on(
            self.shared
                .vault
                .read_blob(id, "the previous point's disk tree"),
        )
    }

    fn store(&mut self, page: Vec<u8>) -> Result<ChunkId> {
        let keys = &self.shared.vault.keys;
        let id = keys.page_id(&page);
        if self.shared.claim(&mut self.reader, &id)? {
            let target = self.shared.vault.tuning.pack_target;
            let p = self
                .pack
                .get_or_insert_with(|| PackBuilder::new(keys, BlobKind::Meta, target.min(4 << 20)));
            let n = p.add(id, &page, &mut self.comp);
            self.written += 1;
            self.shared
                .bytes_stored
                .fetch_add(u64::from(n), Ordering::Relaxed);
            if p.len() >= target {
                let full = self.pack.take().expect("pack is open").finish();
                if self.pack_tx.blocking_send(full).is_err() {
                    return Err(StoreError::Pipeline("uploader stopped".into()));
                }
            }
        }
        Ok(id)
    }
}

/// Uploads packs as they come, writes index segments, and records them in the local index.
/// Returns the number of packs uploaded.
async fn upload_packs(shared: Arc<Shared>, mut rx: mpsc::Receiver<FinishedPack>) -> Result<u64> {
    let vault = &shared.vault;
    let limit = vault.tuning.uploads.max(1);
    let mut inflight = FuturesUnordered::new();
    let mut batch: Vec<SegmentPack> = Vec::new();
    let mut count = 0u64;
    let mut open = true;
    let upload = |p: FinishedPack| {
        let backend = vault.backend.clone();
        async move {
            let name = p.id.object_name(p.kind);
            let size = p.bytes.len() as u64;
            if !backend.put_create_large(&name, p.bytes).await? {
                return Err(StoreError::Pipeline(format!(
                    "pack `{name}` already exists"
                )));
            }
            Ok::<_, StoreError>(SegmentPack {
                id: p.id,
                info: PackInfo {
                    salt: p.salt,
                    kind: p.kind,
                    size,
                },
                entries: p.entries,
            })
        }
    };
    let result: Result<()> = async {
        loop {
            tokio::select! {
                p = rx.recv(), if open && inflight.len() < limit => match p {
                    Some(p) => inflight.push(upload(p)),
                    None => open = false,
                },
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    batch.push(done?);
                    count += 1;
                    if batch.len() >= vault.tuning.packs_per_segment {
                        write_segment(vault, &shared, std::mem::take(&mut batch)).await?;
                    }
                },
                else => break,
            }
        }
        if !batch.is_empty() {
            write_segment(vault, &shared, std::mem::take(&mut batch)).await?;
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        shared.abort.store(true, Ordering::Relaxed);
        // Dropping the receiver makes blocked senders fail fast.
        rx.close();
    }
    result.map(|()| count)
}

async fn write_segment(vault: &Vault, shared: &Shared, packs: Vec<SegmentPack>) -> Result<()> {
    let packs = vault.write_segment(packs).await?;
    let mut c = shared.claimed.lock().expect("claim set lock");
    for p in &packs {
        for e in &p.entries {
            c.remove(&e.id);
        }
    }
    Ok(())
}

impl Vault {
    /// Writes one index segment listing `packs` (after a durability barrier, so the packs it
    /// lists are durable first), then records them in the local index.
    pub(crate) async fn write_segment(&self, packs: Vec<SegmentPack>) -> Result<Vec<SegmentPack>> {
        let name = format!(
            "{INDEX_PREFIX}{}-{}",
            crate::point::compact_time(now_ms()),
            hex::encode(crate::crypto::random_bytes::<8>())
        );
        let body = encode_segment(&packs);
        let sealed = crate::sealed::seal(&self.keys, SEGMENT_MAGIC, &name, &body);
        self.backend.barrier().await?;
        if !self.backend.put_create(&name, Bytes::from(sealed)).await? {
            return Err(StoreError::Pipeline(format!(
                "segment `{name}` already exists"
            )));
        }
        self.backend.barrier().await?;
        let index = self.index.clone();
        let packs =
            tokio::task::spawn_blocking(move || index.insert(Some(&name), &packs).map(|()| packs))
                .await
                .map_err(|e| StoreError::Pipeline(e.to_string()))??;
        self.index_generation.fetch_add(1, Ordering::Release);
        Ok(packs)
    }
}
