//! Restore: writing a recovery point's disk back out, bit-exact.
//!
//! The disk tree is walked leaf by leaf; chunks are gathered in batches, located in the index,
//! grouped by pack and fetched with coalesced ranged reads (neighbouring blobs of one pack in
//! one request, up to `read_window` bytes). Windows are fetched and decoded concurrently
//! (`fetch_concurrency` at a time, decoding on the blocking pool so all cores decrypt and
//! decompress). Zero chunks are never written: the output's holes (or unallocated clusters)
//! read as zero. Every blob is authenticated and its id recomputed before a byte of it is
//! written; the output appears under its final name only when it is complete (and, with
//! `sync`, flushed).
//!
//! The walk, the reads and the decoding are shared: decoded chunks go to a [`ChunkSink`], the
//! format writer for an export (raw, VHD fixed, qcow2 or VMDK: `crate::formats`, each
//! written in place as chunks complete, zero clusters never written), the per-chunk digests
//! for [`Vault::chunk_digests`] (`crate::digests`), so every path that reads a disk back keeps
//! the same guarantees (every blob authenticated, memory bounded by the read window and the
//! fetch concurrency).

use std::collections::HashMap;
use std::fs::OpenOptions as FsOpen;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;

use crate::ChunkId;
use crate::error::{Result, StoreError};
use crate::formats::{ExportFormat, FormatOptions, Output, Plan};
use crate::index::{Location, PackInfo};
use crate::ingest::Progress;
use crate::pack::PackId;
use crate::point::{DiskRecord, PointRecord};
use crate::tree::walk_leaves;
use crate::vault::{PointSelector, Vault};

/// Largest gap between two blobs of a pack read in one request.
const COALESCE_GAP: u64 = 256 << 10;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Item.
    pub item: String,
    /// Which point.
    pub point: PointSelector,
    /// Which disk (may be omitted when the point has one).
    pub disk: Option<String>,
    /// Output file (a raw image, or the container [`Vault::export_as`] is asked for).
    pub out: PathBuf,
    /// Replace an existing file.
    pub overwrite: bool,
    /// Flush the output to stable storage before it takes its final name (`fsync`). Off by
    /// default, like `cp`, restic and borg; failover materialisation turns it on.
    pub sync: bool,
}

/// What an export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The point exported.
    pub point: PointRecord,
    /// The disk exported.
    pub disk: DiskRecord,
    /// Non-zero chunks written.
    pub chunks_written: u64,
    /// Ranged reads made.
    pub reads: u64,
    /// The format written.
    pub format: ExportFormat,
}

/// Where restore's decoded chunks go. Called from the blocking pool, concurrently, and for
/// chunks in any order: a sink writes each chunk at its own offset.
pub(crate) trait ChunkSink: Send + Sync + 'static {
    /// A decoded chunk that chunks `indexes` of the disk hold. `plain` is its bytes as stored:
    /// chunk `i` is `plain[..span(i)]` (see [`chunk_span`]) followed by zeros up to the
    /// chunk's length within the disk.
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()>;
    /// Chunks `chunks` are zero (zero chunks and holes); never read. Called from the tree
    /// walker, in increasing order, each chunk of the disk at most once.
    fn zeros(&self, chunks: Range<u64>) -> Result<()>;
}

/// How many bytes of a stored chunk of `stored` bytes chunk `index` uses: up to the disk's
/// end.
pub(crate) fn chunk_span(size: u64, cs: u64, index: u64, stored: usize) -> usize {
    let off = index * cs;
    usize::try_from(size.saturating_sub(off).min(stored as u64)).expect("chunk fits memory")
}

struct Want {
    loc: Location,
    info: PackInfo,
    /// Chunk indexes that hold this blob.
    indexes: Vec<u64>,
}

impl Vault {
    /// Exports one disk of a point as a raw (sparse) image.
    pub async fn export(
        &self,
        opts: ExportOptions,
        progress: Arc<Progress>,
    ) -> Result<ExportReport> {
        self.export_as(opts, FormatOptions::default(), progress)
            .await
    }

    /// Exports one disk of a point in `format` (raw, VHD fixed, qcow2, VMDK
    /// monolithicSparse; see `crate::formats`). The file is written under a temporary name
    /// (`<out>.ferry-partial`) and renamed to `out` only once complete; on failure the
    /// temporary file is removed and `out` is untouched. A disk the format cannot hold (a
    /// VHD that is not a whole MiB without `vhd_round_up`, a VMDK over 2 TiB) is refused
    /// before any file is created.
    pub async fn export_as(
        &self,
        opts: ExportOptions,
        format: FormatOptions,
        progress: Arc<Progress>,
    ) -> Result<ExportReport> {
        let point = self.point(&opts.item, &opts.point).await?;
        let disk = point.disk(opts.disk.as_deref())?.clone();
        let out = opts.out.clone();
        let partial = partial_name(&out);
        let out_io = |source| StoreError::OutputIo {
            path: out.clone(),
            source,
        };
        match std::fs::symlink_metadata(&out) {
            Ok(m) if !m.is_file() => {
                return Err(out_io(std::io::Error::other(
                    "exists and is not a regular file",
                )));
            }
            Ok(_) if !opts.overwrite => {
                return Err(out_io(std::io::Error::other(
                    "already exists (use --force to replace it)",
                )));
            }
            _ => {}
        }
        let file_name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let plan = Plan::new(format, disk.size, &disk.name, &file_name)?;
        let file = FsOpen::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|source| StoreError::OutputIo {
                path: partial.clone(),
                source,
            })?;
        let output = Output {
            file: Arc::new(file),
            path: partial.clone(),
        };
        progress.total.store(disk.size, Ordering::Relaxed);
        let res = async {
            let writer = plan.writer(output.clone(), disk.size, u64::from(disk.chunk_size))?;
            let sink: Arc<dyn ChunkSink> = writer.clone();
            let done = self.read_disk(&point.id, &disk, sink, &progress).await?;
            writer.finish()?;
            if opts.sync {
                output.file.sync_all().map_err(|e| output.io(e))?;
            }
            Ok(done)
        }
        .await;
        let (chunks_written, reads) = match res {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        drop(output);
        std::fs::rename(&partial, &out).map_err(out_io)?;
        Ok(ExportReport {
            point,
            disk,
            chunks_written,
            reads,
            format: format.format,
        })
    }

    /// Walks the tree on a blocking thread, planning coalesced reads batch by batch, while
    /// this task fetches and decodes the planned windows `fetch_concurrency` at a time: the
    /// walk, the reads and the decoding overlap, with no barrier between batches. Every
    /// non-zero chunk goes to `sink` once decoded, every zero one as a range of zeros.
    /// Returns the non-zero chunks decoded and the ranged reads made.
    pub(crate) async fn read_disk(
        &self,
        point_id: &str,
        disk: &DiskRecord,
        sink: Arc<dyn ChunkSink>,
        progress: &Arc<Progress>,
    ) -> Result<(u64, u64)> {
        let conc = self.tuning.fetch_concurrency.max(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Want>>(2 * conc);
        let me = self.clone();
        let d = disk.clone();
        let context = format!("point {point_id} disk `{}`", disk.name);
        let handle = tokio::runtime::Handle::current();
        let zeros = sink.clone();
        let walker = tokio::task::spawn_blocking(move || {
            me.plan_reads(handle, &d, &context, &tx, zeros.as_ref())
        });
        let windows = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let cs = u64::from(disk.chunk_size);
        let mut decoded = windows
            .map(|wants| self.fetch_window(wants, sink.clone(), disk.size, cs, progress))
            .buffer_unordered(conc);
        let mut written = 0u64;
        let mut failed = None;
        while let Some(r) = decoded.next().await {
            match r {
                Ok(n) => written += n,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Dropping the stream closes the channel, which stops the walker.
        drop(decoded);
        let walked = walker
            .await
            .map_err(|e| StoreError::Pipeline(format!("tree walker panicked: {e}")))?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((written, walked?))
    }

    /// Walks the tree and sends coalesced read windows; tells `sink` of the zero chunks
    /// between them, in order. Returns the number of windows.
    fn plan_reads(
        &self,
        handle: tokio::runtime::Handle,
        disk: &DiskRecord,
        context: &str,
        tx: &tokio::sync::mpsc::Sender<Vec<Want>>,
        sink: &dyn ChunkSink,
    ) -> Result<u64> {
        let cs = u64::from(disk.chunk_size);
        let count = disk.chunks();
        // The first chunk not yet sent for reading nor told to the sink as zero.
        let mut next = 0u64;
        // Chunks per batch: enough to keep every fetch slot busy with full windows.
        let batch_chunks = ((self.tuning.read_window * self.tuning.fetch_concurrency * 2)
            / disk.chunk_size as usize)
            .max(64);
        let mut batch: Vec<(u64, ChunkId)> = Vec::with_capacity(batch_chunks);
        let mut reads = 0u64;
        let mut pages = self.read_pages(handle);
        let mut send = |batch: &mut Vec<(u64, ChunkId)>| -> Result<bool> {
            for w in self.plan_batch(context, batch)? {
                reads += 1;
                if tx.blocking_send(w).is_err() {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let mut open = true;
        walk_leaves(
            &mut pages,
            disk.root,
            disk.levels,
            &mut |_, _| Ok(()),
            &mut |first, entries| {
                if !open {
                    return Ok(());
                }
                for (i, id) in entries.iter().enumerate() {
                    let index = first + i as u64;
                    if !id.is_zero() && index * cs < disk.size {
                        if index > next {
                            sink.zeros(next..index)?;
                        }
                        next = index + 1;
                        batch.push((index, *id));
                    }
                }
                if batch.len() >= batch_chunks {
                    open = send(&mut batch)?;
                }
                Ok(())
            },
        )?;
        if open {
            if count > next {
                sink.zeros(next..count)?;
            }
            send(&mut batch)?;
        }
        Ok(reads)
    }

    /// Locates a batch of chunks and groups them into coalesced per-pack read windows.
    fn plan_batch(&self, context: &str, batch: &mut Vec<(u64, ChunkId)>) -> Result<Vec<Vec<Want>>> {
        let reader = self.index.reader()?;
        let mut by_id: HashMap<ChunkId, Want> = HashMap::new();
        for (index, id) in batch.drain(..) {
            if let Some(w) = by_id.get_mut(&id) {
                w.indexes.push(index);
                continue;
            }
            let loc = reader
                .lookup(&id)?
                .ok_or_else(|| StoreError::MissingChunk {
                    id: id.to_string(),
                    context: format!("{context} chunk {index}"),
                })?;
            let info = reader
                .pack(&loc.pack)?
                .ok_or_else(|| StoreError::MissingChunk {
                    id: id.to_string(),
                    context: format!("{context} chunk {index} (pack {} unknown)", loc.pack),
                })?;
            by_id.insert(
                id,
                Want {
                    loc,
                    info,
                    indexes: vec![index],
                },
            );
        }
        let mut by_pack: HashMap<PackId, Vec<Want>> = HashMap::new();
        for (_, w) in by_id {
            by_pack.entry(w.loc.pack).or_default().push(w);
        }
        let window = self.tuning.read_window as u64;
        let mut windows: Vec<Vec<Want>> = Vec::new();
        for (_, mut wants) in by_pack {
            wants.sort_by_key(|w| w.loc.entry.offset);
            let mut cur: Vec<Want> = Vec::new();
            for w in wants {
                if let (Some(first), Some(last)) = (cur.first(), cur.last()) {
                    let start = first.loc.entry.offset;
                    let end = last.loc.entry.offset + u64::from(last.loc.entry.stored_len);
                    let w_end = w.loc.entry.offset + u64::from(w.loc.entry.stored_len);
                    if w.loc.entry.offset > end + COALESCE_GAP || w_end - start > window {
                        windows.push(std::mem::take(&mut cur));
                    }
                }
                cur.push(w);
            }
            if !cur.is_empty() {
                windows.push(cur);
            }
        }
        Ok(windows)
    }

    /// Fetches one window with a single ranged read, then authenticates and decodes its blobs
    /// on the blocking pool, handing each to `sink`. Returns the chunks decoded.
    async fn fetch_window(
        &self,
        wants: Vec<Want>,
        sink: Arc<dyn ChunkSink>,
        size: u64,
        cs: u64,
        progress: &Arc<Progress>,
    ) -> Result<u64> {
        let first = &wants[0].loc;
        let last = &wants[wants.len() - 1].loc;
        let start = first.entry.offset;
        let end = last.entry.offset + u64::from(last.entry.stored_len);
        let name = first.pack.object_name(first.kind);
        let bytes = self.backend.get_range(&name, start..end).await?;
        let me = self.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || -> Result<u64> {
            // Decrypt in place: no copy when the window's buffer is ours alone.
            let mut window = bytes
                .try_into_mut()
                .unwrap_or_else(|b| bytes::BytesMut::from(&b[..]));
            let mut plain = Vec::new();
            let mut n = 0u64;
            for w in &wants {
                let a = usize::try_from(w.loc.entry.offset - start).expect("window fits memory");
                let b = a + w.loc.entry.stored_len as usize;
                me.open_located_into(&w.loc, &w.info, &mut window[a..b], &mut plain)?;
                sink.chunk(&plain, &w.indexes)?;
                for &index in &w.indexes {
                    let len = chunk_span(size, cs, index, plain.len());
                    progress.done.fetch_add(len as u64, Ordering::Relaxed);
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
        .map_err(|e| StoreError::Pipeline(format!("decoder panicked: {e}")))?
    }
}

fn partial_name(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ferry-partial");
    PathBuf::from(s)
}
