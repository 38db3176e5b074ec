//! How a cycle reads its view, and where a delta's change list comes from.
//!
//! A disk is either read directly — a raw block device or image file (`format = "raw"`, the
//! default): `pread`, holes found with `SEEK_DATA` / `SEEK_HOLE` — or it is a disk container
//! (`vmdk`, `vhdx`, `vhd`, or `auto` to probe) read through the built-in source adapter for
//! its format: the WASM adapters `ferry vault import --format` runs, in the same sandbox
//! (memory cap, deadlines, no access to anything but the opened file and the related files
//! its format names). The adapter says which extents hold data and maps virtual offsets to
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
use ferry_plugin_host::{BlockingDisk, FileSource, HostConfig, PROBE_BYTES, PluginHost};

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
    /// The `data` extents, merged (the rest reads as zeros).
    data: Vec<Range<u64>>,
    /// The adapter's name.
    adapter: &'static str,
}

impl Adapted {
    /// The adapter's name (`vmware`, `hyperv`, …).
    pub fn adapter(&self) -> &'static str {
        self.adapter
    }

    /// The virtual disk's data extents.
    pub fn data(&self) -> &[Range<u64>] {
        &self.data
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

/// The built-in adapter for `disk`'s format; `auto` probes the first bytes of `file`.
async fn builtin(disk: &DiskConfig, path: &Path, file: &File) -> Result<Builtin, ViewError> {
    let err = |m: String| adapter_error(disk, path, m);
    if let Some(b) = ferry_builtin_plugins::for_format(&disk.format).map_err(err)? {
        return Ok(b);
    }
    let mut header = vec![0u8; PROBE_BYTES];
    let mut got = 0;
    while got < header.len() {
        match file.read_at(&mut header[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(err(format!("reading its first bytes to probe: {e}"))),
        }
    }
    header.truncate(got);
    ferry_builtin_plugins::probe(host().map_err(err)?, &header)
        .await
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no built-in adapter recognises it".into()))
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
/// virtual disk's size: the file itself for a raw disk, else the disk its adapter serves.
pub async fn open(
    disk: &DiskConfig,
    path: &Path,
    file: File,
    file_size: u64,
) -> Result<(Reader, u64), ViewError> {
    if disk.format == "raw" {
        return Ok((Reader::File(Arc::new(file)), file_size));
    }
    let b = builtin(disk, path, &file).await?;
    if b.name == "physical" {
        return Ok((Reader::File(Arc::new(file)), file_size));
    }
    let mut opened = open_with(disk, path, b).await?;
    let data = opened
        .data_ranges()
        .await
        .map_err(|e| adapter_error(disk, path, e.to_string()))?;
    let size = opened.info().virtual_size;
    if size == 0 {
        return Err(ViewError::Empty {
            disk: disk.label(),
            path: path.to_path_buf(),
        });
    }
    let served = BlockingDisk::serve(
        opened,
        format!("{} ({})", path.display(), b.name),
        ADAPTER_QUEUE,
    );
    Ok((
        Reader::Adapted(Arc::new(Adapted {
            disk: served,
            data,
            adapter: b.name,
        })),
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

    /// The adapter's name, or `None` for a disk read directly.
    pub fn adapter(&self) -> Option<&'static str> {
        match self {
            Self::File(_) => None,
            Self::Adapted(a) => Some(a.adapter),
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
