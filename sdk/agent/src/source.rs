//! How a cycle reads its view, and where a delta's change list comes from.
//!
//! A disk is either read directly — a raw block device or image file (`format = "raw"`, the
//! default): `pread`, holes found with `SEEK_DATA` / `SEEK_HOLE` — or it is a disk container
//! (`vmdk`, `vhdx`, `vhd`; `ferry-agent disk add --format auto` probes once, [`resolve_auto`],
//! and records what it found) read through the built-in source adapter for its format: the
//! WASM adapters `ferry vault import --format` runs, in the same sandbox (memory cap,
//! deadlines, no access to anything but the opened file and the related files its format
//! names). The adapter says which extents hold data and maps virtual offsets to
//! the container's bytes; the agent replicates the *virtual* disk.
//!
//! A disk may also name a `changes` command. For each delta cycle, once the view is taken, it
//! runs (no shell, no standard input, a timeout, [`MAX_DOCUMENT`] bytes of output at most)
//! and prints the source's change-tracking document for the writes since the base cycle's
//! view — VMware CBT `DiskChangeInfo` for a VMDK, Hyper-V RCT ranges for a VHDX or VHD, a
//! `ferry-checksums v1` list for a raw disk. The disk's adapter validates it and turns it into
//! changed extents ([`Reader::changes`]); the cycle then reads only the chunks they touch,
//! and still sends only those whose digest differs from the base. A chunk the document does
//! not list is taken as unchanged, as with any change tracking: the document must cover every
//! write since the base cycle (the command is told which one in `FERRY_BASE_CYCLE`). A
//! command that fails, or a document the adapter refuses, is logged with the reason and that
//! cycle reads every allocated chunk instead (a checksum scan, always correct).
//!
//! Adapters run in one plugin host per process (the engine and its epoch thread are made on
//! first use; each adapter is compiled once per process).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ferry_builtin_plugins::Builtin;
use ferry_plugin_host::{BlockingDisk, FileSource, HostConfig, PluginHost};

use crate::disks::DiskConfig;
use crate::view::{self, ViewError};

/// Largest change document a `changes` command may print.
pub const MAX_DOCUMENT: usize = 64 << 20;
/// Read requests waiting for an adapter at once.
const ADAPTER_QUEUE: usize = 4;

/// What a cycle reads: the view's file, or the virtual disk an adapter serves from it.
/// Clones share the file or the adapter.
#[derive(Debug, Clone)]
pub enum Reader {
    /// A raw device or image file.
    File(Arc<File>),
    /// A disk container read through a source adapter.
    Adapted(Arc<Adapted>),
}

/// A disk container opened by its source adapter.
#[derive(Debug)]
pub struct Adapted {
    disk: BlockingDisk,
    /// Where the data is, when asked for (the rest reads as zeros).
    data: Option<DataMap>,
}

impl Adapted {
    /// Where the virtual disk holds data (`None`: not mapped, every block may).
    pub fn data(&self) -> Option<&DataMap> {
        self.data.as_ref()
    }
}

/// Which [`DataMap::BLOCK`]-sized blocks of a virtual disk hold data: one bit per 64 KiB
/// (4 MiB for a 2 TiB disk), however fragmented the adapter's extents are. A block that holds
/// any data counts as data.
#[derive(Debug)]
pub struct DataMap {
    bits: Vec<u64>,
}

impl DataMap {
    /// The granule (the smallest chunk size).
    pub const BLOCK: u64 = 64 << 10;

    fn new(size: u64) -> Self {
        let blocks = size.div_ceil(Self::BLOCK);
        Self {
            bits: vec![0; usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX)],
        }
    }

    fn mark(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        for b in r.start / Self::BLOCK..=(r.end - 1) / Self::BLOCK {
            if let Some(w) = self
                .bits
                .get_mut(usize::try_from(b / 64).unwrap_or(usize::MAX))
            {
                *w |= 1 << (b % 64);
            }
        }
    }

    /// Whether any block of `[off, off + len)` holds data.
    pub fn any(&self, off: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        (off / Self::BLOCK..=(off + len - 1) / Self::BLOCK).any(|b| {
            self.bits
                .get(usize::try_from(b / 64).unwrap_or(usize::MAX))
                .is_some_and(|w| w & (1 << (b % 64)) != 0)
        })
    }
}

fn host() -> Result<&'static PluginHost, String> {
    static HOST: OnceLock<Result<PluginHost, String>> = OnceLock::new();
    HOST.get_or_init(|| {
        PluginHost::new(HostConfig::default()).map_err(|e| format!("the plugin host: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn adapter_error(disk: &DiskConfig, path: &Path, message: String) -> ViewError {
    ViewError::Adapter {
        disk: disk.label(),
        path: path.to_path_buf(),
        message,
    }
}

/// The built-in adapter for `disk`'s format (`auto` is resolved when the disk is added).
fn builtin(disk: &DiskConfig, path: &Path) -> Result<Builtin, ViewError> {
    let err = |m: String| adapter_error(disk, path, m);
    ferry_builtin_plugins::for_format(&disk.format)
        .map_err(err)?
        .ok_or_else(|| err("format `auto` must be resolved when the disk is added".into()))
}

/// The format of the disk at `path`, found the way `ferry vault import --format auto` finds
/// it: the first built-in adapter whose probe accepts its first bytes (`raw` when none but
/// the physical one does). Resolved once, when the disk is added: a disk read as `raw` must
/// never turn into a container because its owner wrote a container's signature at its start.
pub async fn resolve_auto(path: &Path) -> Result<&'static str, String> {
    let header = ferry_builtin_plugins::probe_header(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let found = ferry_builtin_plugins::probe(host()?, &header)
        .await
        .map_err(|e| e.to_string())?;
    Ok(match found.map(|b| b.name) {
        Some("vmware") => "vmdk",
        Some("hyperv") if header.starts_with(b"vhdxfile") => "vhdx",
        Some("hyperv") => "vhd",
        _ => "raw",
    })
}

/// Opens `path` with `adapter` (for `changes` on a raw disk, or reading a container).
async fn open_with(
    disk: &DiskConfig,
    path: &Path,
    b: Builtin,
) -> Result<ferry_plugin_host::OpenDisk, ViewError> {
    let err = |m: String| adapter_error(disk, path, m);
    let host = host().map_err(err)?;
    let plugin = host
        .load(b.manifest(), b.wasm)
        .map_err(|e| err(e.to_string()))?;
    let object = FileSource::open(path).map_err(|e| err(format!("cannot open it: {e}")))?;
    host.open_disk(&plugin, Arc::new(object))
        .await
        .map_err(|e| err(e.to_string()))
}

/// The reader of the view at `path` (`file` open on it, `file_size` its length) and the
/// virtual disk's size: the file itself for a raw disk, else the disk its adapter serves. With
/// `map`, a container's data extents are mapped ([`DataMap`], for planning); without, only
/// its size and reads are ready (a resume, or the size alone).
pub async fn open(
    disk: &DiskConfig,
    path: &Path,
    file: File,
    file_size: u64,
    map: bool,
) -> Result<(Reader, u64), ViewError> {
    if disk.format == "raw" {
        return Ok((Reader::File(Arc::new(file)), file_size));
    }
    let b = builtin(disk, path)?;
    let mut opened = open_with(disk, path, b).await?;
    let size = opened.info().virtual_size;
    if size == 0 {
        return Err(ViewError::Empty {
            disk: disk.label(),
            path: path.to_path_buf(),
        });
    }
    let data = if map {
        let mut m = DataMap::new(size);
        opened
            .each_data_extent(|r| m.mark(r))
            .await
            .map_err(|e| adapter_error(disk, path, e.to_string()))?;
        Some(m)
    } else {
        None
    };
    let served = BlockingDisk::serve(
        opened,
        format!("{} ({})", path.display(), b.name),
        ADAPTER_QUEUE,
    )
    .map_err(|e| adapter_error(disk, path, e.to_string()))?;
    Ok((
        Reader::Adapted(Arc::new(Adapted { disk: served, data })),
        size,
    ))
}

impl Reader {
    /// Fills `buf` from the disk at `offset`. Blocks: call it from a blocking thread.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            Self::File(f) => f.read_exact_at(buf, offset),
            Self::Adapted(a) => a
                .disk
                .read_exact_at(buf, offset)
                .map_err(|e| std::io::Error::other(e.to_string())),
        }
    }

    /// `document` translated into the changed ranges of the disk by the disk's adapter
    /// (`physical` for a raw disk, opened on `path` for the call).
    pub async fn changes(
        &self,
        disk: &DiskConfig,
        path: &Path,
        document: Vec<u8>,
    ) -> Result<Vec<Range<u64>>, String> {
        let extents = match self {
            Self::Adapted(a) => a.disk.changes(document).await.map_err(|e| e.to_string())?,
            Self::File(_) => {
                let b = ferry_builtin_plugins::PHYSICAL;
                let mut opened = open_with(disk, path, b).await.map_err(|e| e.to_string())?;
                opened.changes(&document).await.map_err(|e| e.to_string())?
            }
        };
        Ok(extents.iter().map(|e| e.offset..e.end()).collect())
    }
}

/// Where a delta's chunks to read come from, as a cycle reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeList {
    /// No `changes` command: every allocated chunk is read and compared.
    None,
    /// The document's changed ranges (sorted, merged).
    Ranges(Vec<Range<u64>>),
    /// The command or its document failed (the reason): every allocated chunk is read.
    Failed(String),
}

/// The environment a `changes` command runs with.
#[derive(Debug)]
pub struct ChangesContext<'a> {
    /// The disk.
    pub disk: &'a DiskConfig,
    /// What the cycle reads.
    pub view_path: &'a Path,
    /// The cycle being planned.
    pub cycle: u64,
    /// The cycle the delta is against (whose view the document's changes start from).
    pub base_cycle: u64,
}

/// Runs the disk's `changes` command for a delta cycle and translates its document.
pub async fn change_list(reader: &Reader, c: &ChangesContext<'_>) -> ChangeList {
    if c.disk.changes.is_empty() {
        return ChangeList::None;
    }
    let label = c.disk.label();
    let env = [
        ("FERRY_ITEM", c.disk.item.clone()),
        ("FERRY_DISK", c.disk.name.clone()),
        ("FERRY_DISK_PATH", path_string(&c.disk.path)),
        ("FERRY_VIEW", path_string(c.view_path)),
        ("FERRY_FORMAT", c.disk.format.clone()),
        ("FERRY_CYCLE", c.cycle.to_string()),
        ("FERRY_BASE_CYCLE", c.base_cycle.to_string()),
    ];
    let doc =
        match view::command_output(&label, "changes", &c.disk.changes, &env, MAX_DOCUMENT).await {
            Ok(d) => d,
            Err(e) => return ChangeList::Failed(e.to_string()),
        };
    match reader.changes(c.disk, c.view_path, doc).await {
        Ok(r) => ChangeList::Ranges(r),
        Err(e) => ChangeList::Failed(format!(
            "disk {label}: the change document was refused: {e}"
        )),
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map answers per 64 KiB block: a range meeting any block with data is data.
    #[test]
    fn a_data_map_answers_by_block() {
        let b = DataMap::BLOCK;
        let mut m = DataMap::new(100 * b + 5);
        m.mark(3 * b + 10..3 * b + 11);
        m.mark(64 * b..66 * b);
        m.mark(100 * b..100 * b + 5);
        m.mark(7 * b..7 * b);
        assert!(!m.any(0, 3 * b));
        assert!(m.any(0, 3 * b + 1));
        assert!(m.any(3 * b + 4000, 1));
        assert!(!m.any(4 * b, 60 * b));
        assert!(m.any(65 * b, b));
        assert!(!m.any(66 * b, b));
        assert!(!m.any(7 * b, b), "an empty range marks nothing");
        assert!(m.any(100 * b, 5));
        assert!(!m.any(5 * b, 0));
        assert_eq!(m.bits.len(), 2);
    }
}
