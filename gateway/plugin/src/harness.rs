//! A host-side harness: run a built source adapter over a disk image exactly as the gateway
//! would (same sandbox, limits and data path) and get back what it exposes.
//!
//! Plugin authors use it from their tests (with a fixture image and the raw disk it must
//! expose), `ferry plugin run` uses it to write the raw virtual disk. Only extents the adapter
//! reports as `data` are read; `zero` and `unallocated` ones are hashed as zeros and left as
//! holes in the output, without a read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::adapter::{DiskInfo, Extent, ExtentKind};
use crate::error::PluginError;
use crate::host::{LoadedPlugin, PluginHost};
use crate::source::{FileSource, SourceObject};

/// What a run of an adapter over a disk exposed.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterRun {
    pub disk: DiskInfo,
    /// Extents of the whole virtual disk, as the adapter reported them.
    pub extents: Vec<Extent>,
    /// SHA-256 (hex) of the whole virtual disk, when asked for.
    pub sha256: Option<String>,
    /// Bytes of `data` extents read through the adapter.
    pub bytes_read: u64,
    /// Bytes of `zero` / `unallocated` extents (never read).
    pub bytes_skipped: u64,
    /// Of `bytes_read`, those the kernel copied from the source files straight into the
    /// output (`copy_file_range`: no digest asked for, and the adapter located them in files).
    pub bytes_copied: u64,
    /// Log lines the host dropped by rate limit.
    pub dropped_log_lines: u64,
}

const PIECE: usize = 1 << 20;

fn host_io(what: &str, path: &Path, e: std::io::Error) -> PluginError {
    PluginError::Host(format!("{what} {}: {e}", path.display()))
}

/// What [`run_adapter_on`] does besides reading.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Hash the whole virtual disk (SHA-256).
    pub hash: bool,
    /// fsync the output before returning (like `qemu-img convert`, the default leaves the
    /// writeback to the kernel).
    pub sync: bool,
    /// Plugin instances reading in parallel (each its own store, memory cap and deadline),
    /// at least 1.
    pub workers: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            hash: false,
            sync: false,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        }
    }
}

/// Open `disk` with `plugin`, read its whole virtual disk through the data path, hash it, and
/// write it to `out` (a sparse raw file) when given.
pub async fn run_adapter(
    host: &PluginHost,
    plugin: &LoadedPlugin,
    disk: &Path,
    out: Option<&Path>,
) -> Result<AdapterRun, PluginError> {
    let object: Arc<dyn SourceObject> =
        Arc::new(FileSource::open(disk).map_err(|e| host_io("opening", disk, e))?);
    let opts = RunOptions {
        hash: true,
        sync: true,
        ..RunOptions::default()
    };
    run_adapter_on(host, plugin, object, out, opts).await
}

/// Pieces each worker may have read ahead of the writer (memory: workers × this × 1 MiB).
const AHEAD: usize = 4;
/// Consecutive data pieces one worker takes in turn (locality for the adapter's metadata).
const SEGMENT: usize = 8;

/// What a worker hands the writer for one data piece.
enum Piece {
    /// The piece's bytes, to hash and write.
    Bytes(Vec<u8>),
    /// Already in the output (copied by the kernel; only when no digest is computed).
    Written,
}

/// One 1 MiB (or shorter) piece of the virtual disk, in disk order.
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u64,
    len: usize,
    data: bool,
}

/// [`run_adapter`] over any source object. `workers` instances of the adapter read the data
/// pieces (runs of [`SEGMENT`] pieces, dealt round-robin), each at most [`AHEAD`] pieces ahead
/// of a writer thread that hashes them in disk order and writes the non-zero ones, so reading,
/// decoding and writing overlap and memory stays bounded.
pub async fn run_adapter_on(
    host: &PluginHost,
    plugin: &LoadedPlugin,
    object: Arc<dyn SourceObject>,
    out: Option<&Path>,
    opts: RunOptions,
) -> Result<AdapterRun, PluginError> {
    let mut first = host.open_disk(plugin, object.clone()).await?;
    let info = first.info().clone();
    let size = info.virtual_size;
    let file = match out {
        Some(p) => {
            if std::fs::metadata(p).is_ok_and(|m| !m.is_file()) {
                return Err(PluginError::Host(format!(
                    "{} exists and is not a regular file",
                    p.display()
                )));
            }
            let f = File::create(p).map_err(|e| host_io("creating", p, e))?;
            f.set_len(size).map_err(|e| host_io("sizing", p, e))?;
            Some((Arc::new(f), p.to_path_buf()))
        }
        None => None,
    };
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let batch = first.extents(pos, size - pos).await?;
        pos = batch.last().map_or(size, Extent::end);
        extents.extend(batch);
    }
    let mut spans = Vec::new();
    let (mut bytes_read, mut bytes_skipped) = (0u64, 0u64);
    for e in &extents {
        let mut at = e.offset;
        while at < e.end() {
            let len = usize::try_from((e.end() - at).min(PIECE as u64)).unwrap_or(PIECE);
            let data = e.kind == ExtentKind::Data;
            if data {
                bytes_read += len as u64;
            } else {
                bytes_skipped += len as u64;
            }
            spans.push(Span { at, len, data });
            at += len as u64;
        }
    }
    // Data piece k (counting data pieces only) belongs to worker (k / SEGMENT) % workers.
    let data_pieces = spans.iter().filter(|s| s.data).count();
    let mut workers = opts
        .workers
        .max(1)
        .min(data_pieces.div_ceil(SEGMENT).max(1));
    // Without a digest to compute, pieces the adapter locates in files are copied by the
    // kernel straight into the output (`OpenDisk::copy_into`), never through a buffer. When
    // the first data piece can be copied so, one worker copies them all: the copy is bound by
    // the disks, not the CPU, and several writers only contend for the output file's lock.
    let mut direct_out = file.as_ref().filter(|_| !opts.hash).map(|(f, _)| f.clone());
    if let Some(out) = &direct_out {
        match spans.iter().find(|s| s.data) {
            Some(s) if first.copy_into(s.at, s.len as u64, out).await? => workers = 1,
            _ => direct_out = None,
        }
    }
    let owner = move |k: usize| (k / SEGMENT) % workers;
    let mut disks = vec![first];
    for _ in 1..workers {
        disks.push(host.open_disk(plugin, object.clone()).await?);
    }
    let spans = Arc::new(spans);

    let mut receivers = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for (w, mut disk) in disks.into_iter().enumerate() {
        let (tx, rx) =
            tokio::sync::mpsc::channel::<(Piece, tokio::sync::mpsc::Sender<Vec<u8>>)>(AHEAD);
        receivers.push(rx);
        let spans = spans.clone();
        let mut direct = direct_out.clone();
        tasks.push(tokio::spawn(async move {
            let (give_back, mut spare) = tokio::sync::mpsc::channel::<Vec<u8>>(AHEAD + 1);
            let mut copied = 0u64;
            for (k, s) in spans.iter().filter(|s| s.data).enumerate() {
                if owner(k) != w {
                    continue;
                }
                let piece = match &direct {
                    // The first data piece was already copied when probing for the kernel copy.
                    Some(_) if k == 0 => {
                        copied += s.len as u64;
                        Piece::Written
                    }
                    Some(out) if disk.copy_into(s.at, s.len as u64, out).await? => {
                        copied += s.len as u64;
                        Piece::Written
                    }
                    _ => {
                        // Once a piece cannot be copied, this worker reads the rest: the
                        // adapter decodes this disk, or the kernel cannot copy these files.
                        direct = None;
                        let mut buf = spare.try_recv().unwrap_or_default();
                        buf.resize(s.len, 0);
                        disk.read_into(s.at, &mut buf).await?;
                        Piece::Bytes(buf)
                    }
                };
                // A closed channel means the writer stopped on an error: it reports it.
                if tx.send((piece, give_back.clone())).await.is_err() {
                    break;
                }
            }
            Ok::<(u64, u64), PluginError>((disk.dropped_log_lines(), copied))
        }));
    }

    let hash = opts.hash;
    let writer_spans = spans.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<Option<String>, PluginError> {
        let mut sha = Sha256::new();
        let zeros = vec![0u8; PIECE];
        let mut k = 0;
        for s in writer_spans.iter() {
            if !s.data {
                if hash {
                    sha.update(&zeros[..s.len]);
                }
                continue;
            }
            let Some((piece, give_back)) = receivers[owner(k)].blocking_recv() else {
                // The worker failed; its error is reported by the caller.
                return Ok(None);
            };
            k += 1;
            let Piece::Bytes(chunk) = piece else {
                continue;
            };
            if hash {
                sha.update(&chunk);
            }
            if let Some((f, p)) = &file
                && chunk.iter().any(|&b| b != 0)
            {
                f.write_all_at(&chunk, s.at)
                    .map_err(|e| host_io("writing", p, e))?;
            }
            let _ = give_back.try_send(chunk);
        }
        if let Some((f, p)) = &file
            && opts.sync
        {
            f.sync_all().map_err(|e| host_io("syncing", p, e))?;
        }
        Ok(hash.then(|| hex::encode(sha.finalize())))
    });
    let written = writer.await;
    let (mut dropped_log_lines, mut bytes_copied) = (0, 0);
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok((d, c))) => {
                dropped_log_lines += d;
                bytes_copied += c;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(PluginError::Host(format!("a reader task failed: {e}")));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let sha256 =
        written.map_err(|e| PluginError::Host(format!("the output writer failed: {e}")))??;
    Ok(AdapterRun {
        disk: info,
        extents,
        sha256,
        bytes_read,
        bytes_skipped,
        bytes_copied,
        dropped_log_lines,
    })
}

/// SHA-256 (hex) of a file: the expected side of a harness comparison.
pub fn sha256_file(path: &Path) -> Result<String, PluginError> {
    let f = File::open(path).map_err(|e| host_io("opening", path, e))?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; PIECE];
    let mut at = 0u64;
    loop {
        let n = f
            .read_at(&mut buf, at)
            .map_err(|e| host_io("reading", path, e))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(sha.finalize()))
}
