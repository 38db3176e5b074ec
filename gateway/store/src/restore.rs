//! Restore: writing a recovery point's disk back out, bit-exact.
//!
//! The disk tree is walked leaf by leaf; chunks are gathered in batches, located in the index,
//! grouped by pack and fetched with coalesced ranged reads (neighbouring blobs of one pack in
//! one request, up to `read_window` bytes), `fetch_concurrency` windows in flight. A window
//! from a local directory is read with one positioned read into a buffer reused from window to
//! window; from a cloud store it is one ranged request. Each window is cut, without copying,
//! into groups of neighbouring blobs (about 512 KiB stored) decoded as separate tasks on the
//! blocking pool, at most `workers + 1` at a time, each into a reused plaintext buffer: every
//! core decrypts, decompresses and re-hashes, up to the last window of the disk, with one
//! pack key derived per window. Zero chunks are never written: the output's holes (or
//! unallocated clusters) read as zero. Every blob is authenticated and its id recomputed
//! before a byte of it is written; the output appears under its final name only when it is
//! complete (and, with `sync`, flushed; off by default, as for `cp` and qemu-img).
//!
//! The walk, the reads and the decoding are shared: decoded chunks go to a [`ChunkSink`], the
//! format writer for an export (raw, VHD fixed, qcow2 or VMDK: `crate::formats`, each
//! written in place as chunks complete, zero clusters never written), the per-chunk digests
//! for [`Vault::chunk_digests`] (`crate::digests`), so every path that reads a disk back keeps
//! the same guarantees (every blob authenticated, memory bounded by the read window, the fetch
//! concurrency and the workers: `fetch_concurrency` window buffers, `workers + 1` plaintext
//! buffers of at most one chunk).

use std::collections::HashMap;
use std::fs::OpenOptions as FsOpen;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetResultPayload, ObjectStore};
use tokio::sync::Semaphore;

use crate::ChunkId;
use crate::crypto::ObjectCipher;
use crate::error::{Result, StoreError};
use crate::formats::{ExportFormat, FormatOptions, Output, Plan};
use crate::index::{Location, PackInfo};
use crate::ingest::Progress;
use crate::pack::{PackId, pack_key_label};
use crate::point::{DiskRecord, PointRecord};
use crate::tree::walk_leaves;
use crate::vault::{PointSelector, Vault};

/// Largest gap between two blobs of a pack read in one request.
const COALESCE_GAP: u64 = 256 << 10;
/// Stored bytes of neighbouring blobs decoded as one task: small enough that a window is
/// spread over every core, large enough that a task is worth scheduling.
const DECODE_GROUP: u64 = 512 << 10;

/// The decode stage of one read: at most as many tasks at once as it has permits (one more
/// than the workers, so that a task blocked in the sink's write or a page fault does not leave
/// a core idle), each decoding into a plaintext buffer taken from `buffers` and put back, so at
/// most one buffer per permit ever exists and none is faulted in afresh per task.
///
/// It also keeps the buffers of windows read from a local directory: each is returned once
/// its window is decoded and reused by a later window, so at most one per window in flight
/// (`fetch_concurrency`) ever exists, and a restore does not fault in and zero fresh memory for
/// every window (with 4 MiB windows that was about a seventh of an export's CPU time).
struct Decoders {
    permits: Arc<Semaphore>,
    buffers: Mutex<Vec<Vec<u8>>>,
    windows: Mutex<Vec<Vec<u8>>>,
}

impl Decoders {
    fn new(workers: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(workers.max(1) + 1)),
            buffers: Mutex::new(Vec::new()),
            windows: Mutex::new(Vec::new()),
        }
    }

    fn take(pool: &Mutex<Vec<Vec<u8>>>) -> Vec<u8> {
        pool.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    fn give(pool: &Mutex<Vec<Vec<u8>>>, buf: Vec<u8>) {
        if buf.capacity() > 0 {
            pool.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(buf);
        }
    }
}

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
        let geometry = (disk.size, u64::from(disk.chunk_size));
        let decoders = Arc::new(Decoders::new(self.tuning.workers));
        let mut decoded = windows
            .map(|wants| {
                self.fetch_window(wants, sink.clone(), geometry, decoders.clone(), progress)
            })
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
    /// on the blocking pool, handing each to `sink`. The window is split into groups of
    /// neighbouring blobs (disjoint parts of the one buffer, no copy) decoded as separate
    /// tasks, as many at a time across all windows as `decoders` allows: every core decodes, the
    /// last window of a disk included.
    /// Returns the chunks decoded.
    async fn fetch_window(
        &self,
        wants: Vec<Want>,
        sink: Arc<dyn ChunkSink>,
        geometry: (u64, u64),
        decoders: Arc<Decoders>,
        progress: &Arc<Progress>,
    ) -> Result<u64> {
        let first = &wants[0].loc;
        let last = &wants[wants.len() - 1].loc;
        let start = first.entry.offset;
        let end = last.entry.offset + u64::from(last.entry.stored_len);
        let name = first.pack.object_name(first.kind);
        let (mut window, pooled) = self.read_window(&name, start..end, &decoders).await?;
        // One key for the whole window: every blob of it is in the same pack.
        let cipher = Arc::new(
            self.keys
                .derive_cipher(&wants[0].info.salt, &pack_key_label(&first.pack)),
        );
        let mut tasks = Vec::new();
        let mut wants = wants.into_iter().peekable();
        let mut at = start;
        while wants.peek().is_some() {
            let mut group = Vec::new();
            let mut len = 0u64;
            while let Some(w) = wants.next_if(|_| group.is_empty() || len < DECODE_GROUP) {
                len = w.loc.entry.offset + u64::from(w.loc.entry.stored_len) - at;
                group.push(w);
            }
            let part = window.split_to(usize::try_from(len).expect("window fits memory"));
            let base = at;
            at += len;
            let permit = decoders
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| StoreError::Pipeline(format!("decoders closed: {e}")))?;
            let me = self.clone();
            let cipher = cipher.clone();
            let sink = sink.clone();
            let progress = progress.clone();
            let decoders = decoders.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let mut plain = Decoders::take(&decoders.buffers);
                let r = me.decode_group(
                    &cipher,
                    &group,
                    part,
                    base,
                    &mut plain,
                    sink.as_ref(),
                    geometry,
                    &progress,
                );
                Decoders::give(&decoders.buffers, plain);
                r
            }));
        }
        let mut n = 0u64;
        let mut failed = None;
        for t in tasks {
            match t.await {
                Ok(Ok(k)) => n += k,
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) => {
                    failed =
                        failed.or(Some(StoreError::Pipeline(format!("decoder panicked: {e}"))));
                }
            }
        }
        if pooled {
            // Every part is dropped with its task: what is left owns the whole buffer again.
            Decoders::give(&decoders.windows, Vec::from(window));
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Reads bytes `range` of pack `name` into a buffer the window may decrypt in place; says
    /// whether the buffer came from `decoders`' pool. A pack in a local directory is read with
    /// one positioned read into a reused buffer; from any other store the bytes are fetched as
    /// [`crate::Backend::get_range`] does (one ranged request, its buffer used as is). Errors
    /// are those of `get_range`: a missing pack, or a short read reported as corruption.
    async fn read_window(
        &self,
        name: &str,
        range: Range<u64>,
        decoders: &Decoders,
    ) -> Result<(bytes::BytesMut, bool)> {
        let failed = |e: &dyn std::fmt::Display| {
            StoreError::corrupt(
                name,
                format!("cannot read bytes {}..{}: {e}", range.start, range.end),
            )
        };
        let short = |got: u64| {
            StoreError::corrupt(
                name,
                format!(
                    "short read: bytes {}..{} gave {got} bytes (truncated?)",
                    range.start, range.end
                ),
            )
        };
        let opts = GetOptions {
            range: Some(range.clone().into()),
            ..GetOptions::default()
        };
        let got = self
            .backend
            .store()
            .get_opts(&ObjectPath::from(name), opts)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => StoreError::MissingObject(name.into()),
                e => failed(&e),
            })?;
        if got.range != range {
            return Err(short(got.range.end.saturating_sub(got.range.start)));
        }
        let len = usize::try_from(range.end - range.start).expect("window fits memory");
        match got.payload {
            GetResultPayload::File(file, _) => {
                let mut buf = Decoders::take(&decoders.windows);
                let start = range.start;
                let read = tokio::task::spawn_blocking(move || {
                    buf.clear();
                    buf.resize(len, 0);
                    file.read_exact_at(&mut buf, start).map(|()| buf)
                })
                .await
                .map_err(|e| StoreError::Pipeline(format!("pack reader panicked: {e}")))?;
                let buf = read.map_err(|e| failed(&e))?;
                Ok((bytes::BytesMut::from(Bytes::from(buf)), true))
            }
            GetResultPayload::Stream(_) => {
                let bytes = got.bytes().await.map_err(|e| failed(&e))?;
                if bytes.len() != len {
                    return Err(short(bytes.len() as u64));
                }
                // Decrypt in place: no copy when the buffer is ours alone.
                let window = bytes
                    .try_into_mut()
                    .unwrap_or_else(|b| bytes::BytesMut::from(&b[..]));
                Ok((window, false))
            }
        }
    }

    /// Authenticates, decompresses and re-hashes the blobs `wants` (with `cipher`, their
    /// pack's key), which lie in `part` from pack offset `base`, decrypting in place, each into
    /// `plain`, and hands each to `sink`. Returns the chunks decoded.
    #[allow(clippy::too_many_arguments)]
    fn decode_group(
        &self,
        cipher: &ObjectCipher,
        wants: &[Want],
        mut part: bytes::BytesMut,
        base: u64,
        plain: &mut Vec<u8>,
        sink: &dyn ChunkSink,
        (size, cs): (u64, u64),
        progress: &Progress,
    ) -> Result<u64> {
        let mut n = 0u64;
        for w in wants {
            let loc = &w.loc;
            let a = usize::try_from(loc.entry.offset - base).expect("window fits memory");
            let b = a + loc.entry.stored_len as usize;
            self.open_with_cipher(cipher, loc, &mut part[a..b], plain)?;
            sink.chunk(plain, &w.indexes)?;
            for &index in &w.indexes {
                let len = chunk_span(size, cs, index, plain.len());
                progress.done.fetch_add(len as u64, Ordering::Relaxed);
                n += 1;
            }
        }
        Ok(n)
    }
}

fn partial_name(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ferry-partial");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use crate::formats::testkit;
    use crate::{
        Backend, ExportOptions, ImportOptions, InitOptions, OpenOptions, PointSelector, Secret,
        StoreError, Vault,
    };

    fn data_packs(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for fan in std::fs::read_dir(dir.join("vault/packs/data")).unwrap() {
            for p in std::fs::read_dir(fan.unwrap().path()).unwrap() {
                out.push(p.unwrap().path());
            }
        }
        assert!(!out.is_empty());
        out
    }

    /// A local directory vault (packs read with positioned reads into reused window
    /// buffers) with small windows, so that a restore reads many of them, a few at a time.
    async fn local(dir: &Path) -> (Vault, PathBuf) {
        let url = dir.join("vault").to_string_lossy().into_owned();
        let mut open = OpenOptions::new(dir.join("cache"));
        open.tuning.read_window = 128 << 10;
        open.tuning.fetch_concurrency = 2;
        open.tuning.workers = 2;
        let v = Vault::init(
            Backend::open(&url, &Vec::new(), true).unwrap(),
            &Secret::KeyFile(vec![3; 32]),
            InitOptions {
                chunk_size: 64 << 10,
                ..InitOptions::default()
            },
            open,
        )
        .await
        .unwrap();
        // The kit's image, plus incompressible data over many chunks (with holes between).
        let src = testkit::image(dir, (700 << 16) + 77);
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for c in (40..640).step_by(3) {
            let noise: Vec<u8> = (0..65536)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 32) as u8
                })
                .collect();
            std::os::unix::fs::FileExt::write_all_at(&f, &noise, c << 16).unwrap();
        }
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        (v, src)
    }

    async fn export(v: &Vault, out: &Path) -> crate::error::Result<crate::ExportReport> {
        v.export(
            ExportOptions {
                item: "web".into(),
                point: PointSelector::Latest,
                disk: None,
                out: out.to_path_buf(),
                overwrite: true,
                sync: false,
            },
            Arc::default(),
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_packs_restore_exactly_and_every_blob_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (v, src) = local(dir.path()).await;
        let out = dir.path().join("out.raw");
        let r = export(&v, &out).await.unwrap();
        assert!(r.reads > 4, "many small windows: {}", r.reads);
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());

        // A flipped byte in a pack fails authentication; no output is left behind.
        std::fs::remove_file(&out).unwrap();
        let packs = data_packs(dir.path());
        let mut b = std::fs::read(&packs[0]).unwrap();
        let saved = b.clone();
        let at = b.len() / 3;
        b[at] ^= 0x40;
        std::fs::write(&packs[0], &b).unwrap();
        let e = export(&v, &out).await.unwrap_err();
        assert!(matches!(e, StoreError::Tampered { .. }), "{e}");
        assert!(!out.exists());

        // A truncated pack is a short read, reported as corruption.
        std::fs::write(&packs[0], &saved[..saved.len() / 2]).unwrap();
        let e = export(&v, &out).await.unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { reason, .. } if reason.contains("bytes")),
            "{e}"
        );
        assert!(!out.exists());

        // Restored, the pack reads again.
        std::fs::write(&packs[0], &saved).unwrap();
        export(&v, &out).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    }
}
