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
    /// Log lines the host dropped by rate limit.
    pub dropped_log_lines: u64,
}

const PIECE: usize = 1 << 20;

fn host_io(what: &str, path: &Path, e: std::io::Error) -> PluginError {
    PluginError::Host(format!("{what} {}: {e}", path.display()))
}

/// What [`run_adapter_on`] does besides reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Hash the whole virtual disk (SHA-256).
    pub hash: bool,
    /// fsync the output before returning (like `qemu-img convert`, the default leaves the
    /// writeback to the kernel).
    pub sync: bool,
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
    };
    run_adapter_on(host, plugin, object, out, opts).await
}

/// One piece for the writer thread: data to hash and write, or a run of zeros to hash.
enum Piece {
    Data(u64, Vec<u8>),
    Zeros(usize),
}

/// Pieces in flight between the reading task and the writer thread (memory: this many MiB).
const IN_FLIGHT: usize = 4;

/// [`run_adapter`] over any source object. The adapter is driven on the calling task while a
/// writer thread hashes and writes what it produced, so reading and writing overlap; at most
/// [`IN_FLIGHT`] pieces of 1 MiB are in flight.
pub async fn run_adapter_on(
    host: &PluginHost,
    plugin: &LoadedPlugin,
    object: Arc<dyn SourceObject>,
    out: Option<&Path>,
    opts: RunOptions,
) -> Result<AdapterRun, PluginError> {
    let mut d = host.open_disk(plugin, object).await?;
    let info = d.info().clone();
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
            Some((f, p.to_path_buf()))
        }
        None => None,
    };
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let batch = d.extents(pos, size - pos).await?;
        pos = batch.last().map_or(size, Extent::end);
        extents.extend(batch);
    }

    let (to_writer, mut pieces) = tokio::sync::mpsc::channel::<Piece>(IN_FLIGHT);
    let (recycle, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
    let hash = opts.hash;
    let writer = std::thread::spawn(move || -> Result<Option<String>, PluginError> {
        let mut sha = Sha256::new();
        let zeros = vec![0u8; PIECE];
        while let Some(piece) = pieces.blocking_recv() {
            match piece {
                Piece::Zeros(n) => {
                    if hash {
                        sha.update(&zeros[..n]);
                    }
                }
                Piece::Data(at, chunk) => {
                    if hash {
                        sha.update(&chunk);
                    }
                    if let Some((f, p)) = &file
                        && chunk.iter().any(|&b| b != 0)
                    {
                        f.write_all_at(&chunk, at)
                            .map_err(|e| host_io("writing", p, e))?;
                    }
                    let _ = recycle.try_send(chunk);
                }
            }
        }
        if let Some((f, p)) = &file
            && opts.sync
        {
            f.sync_all().map_err(|e| host_io("syncing", p, e))?;
        }
        Ok(hash.then(|| hex::encode(sha.finalize())))
    });

    let (mut bytes_read, mut bytes_skipped) = (0u64, 0u64);
    let read = async {
        for e in &extents {
            let mut at = e.offset;
            while at < e.end() {
                let n = usize::try_from((e.end() - at).min(PIECE as u64)).unwrap_or(PIECE);
                let piece = if e.kind == ExtentKind::Data {
                    let mut buf = spare.try_recv().unwrap_or_else(|_| vec![0u8; PIECE]);
                    buf.resize(n, 0);
                    d.read_into(at, &mut buf).await?;
                    bytes_read += n as u64;
                    Piece::Data(at, buf)
                } else {
                    bytes_skipped += n as u64;
                    Piece::Zeros(n)
                };
                // A closed channel means the writer failed: its error is reported below.
                if to_writer.send(piece).await.is_err() {
                    return Ok(());
                }
                at += n as u64;
            }
        }
        Ok::<(), PluginError>(())
    };
    let read_result = read.await;
    drop(to_writer);
    let written = writer
        .join()
        .map_err(|_| PluginError::Host("the output writer thread panicked".into()))?;
    read_result?;
    let sha256 = written?;
    Ok(AdapterRun {
        disk: info,
        extents,
        sha256,
        bytes_read,
        bytes_skipped,
        dropped_log_lines: d.dropped_log_lines(),
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
