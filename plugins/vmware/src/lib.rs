//! `vmware`: a Ferry source adapter for VMware VMDK disks.
//!
//! One adapter reads every VMDK layout a backup meets (see `README.md`):
//!
//! - a sparse extent opened directly (`KDMV` at offset 0): `monolithicSparse`, or
//!   `streamOptimized` with its deflate-compressed grains and footer;
//! - a text descriptor (`# Disk DescriptorFile`) whose extent lines name `FLAT`, `VMFS`,
//!   `SPARSE` and `ZERO` extents: `monolithicFlat`, `twoGbMaxExtentFlat`,
//!   `twoGbMaxExtentSparse` and ESXi's `vmfs` layout (`-flat.vmdk`). Extent files are opened only
//!   with `open_related` by their plain file name.
//!
//! The disk is a list of *parts* (one per extent line, or one for a sparse file), and every
//! [`Disk`] method walks the same segments: unallocated, zero, stored as is in some file, or in
//! a compressed grain. `locate` answers [`Location::Source`] for bytes stored as is in the
//! opened file (uncompressed grains of a monolithicSparse file), [`Location::Related`] for bytes
//! stored as is in an extent file the host opened (flat extents, uncompressed grains of a
//! twoGbMaxExtentSparse set), so the host reads both itself; only compressed grains (and
//! extent files without a host id, natively) are [`Location::Adapter`]. `extents` reports the
//! holes of the files under stored bytes as `unallocated` ([`holes`]).
//!
//! Differencing disks (a parent) are refused with [`Error::Unsupported`]. `changes` translates a
//! VMware CBT `DiskChangeInfo` document ([`cbt`]).

pub mod cbt;
pub mod descriptor;
pub mod sparse;
pub mod stream;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use ferry_plugin_sdk::adapter::{
    ChangeList, ChangeSet, Disk, DiskInfo, Error, Location, MAX_EXTENTS, Mapping, PluginInfo,
    Reader, SourceAdapter, check_range, check_read, open_related,
};
use ferry_plugin_sdk::io::{Extent, ExtentKind, ReadAt, read_exact_at};

use descriptor::{Descriptor, ExtentType};
use ferry_plugin_sdk::adapter::push_extent;
use ferry_plugin_sdk::holes::{self, Holes};
use sparse::{SECTOR, Slot, SparseExtent};

/// Most segments one `extents` or `locate` call visits before it returns a short answer (the
/// caller asks again from the end of the last one), so a call on a huge, fragmented disk stays
/// within the host's deadline.
pub const WALK_BUDGET: usize = 1 << 20;

/// The adapter.
#[derive(Debug)]
pub struct Vmware;

impl SourceAdapter for Vmware {
    type Disk = VmdkDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "vmware".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["vmdk".to_owned()],
            description: "VMware VMDK: monolithicSparse, streamOptimized, monolithicFlat, \
                          twoGbMaxExtent sets, ESXi flat; CBT change lists"
                .to_owned(),
        }
    }

    fn probe(header: &[u8]) -> bool {
        header.starts_with(sparse::MAGIC) || header.starts_with(descriptor::SIGNATURE)
    }

    fn open(reader: Reader) -> Result<VmdkDisk, Error> {
        VmdkDisk::open(reader)
    }
}

/// Where one part of the virtual disk is stored.
#[derive(Debug)]
enum PartKind {
    Zero,
    Flat { file: usize, offset: u64 },
    Sparse { file: usize, extent: SparseExtent },
}

/// One extent of the virtual disk, `[start, start + len)`.
#[derive(Debug)]
struct Part {
    start: u64,
    len: u64,
    kind: PartKind,
}

/// One piece of a walk over the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Unallocated,
    Zero,
    /// Stored as is in file `file` from byte `offset`.
    Stored {
        file: usize,
        offset: u64,
    },
    /// Inside compressed grain `grain` of part `part`, from byte `within` of the grain.
    Compressed {
        part: usize,
        grain: u64,
        within: u64,
    },
}

impl Seg {
    fn kind(self) -> ExtentKind {
        match self {
            Seg::Unallocated => ExtentKind::Unallocated,
            Seg::Zero => ExtentKind::Zero,
            Seg::Stored { .. } | Seg::Compressed { .. } => ExtentKind::Data,
        }
    }

    /// Whether `next` continues `self` (which is `len` bytes long).
    fn continued_by(self, len: u64, next: Seg) -> bool {
        match (self, next) {
            (Seg::Unallocated, Seg::Unallocated) | (Seg::Zero, Seg::Zero) => true,
            (
                Seg::Stored { file, offset },
                Seg::Stored {
                    file: f2,
                    offset: o2,
                },
            ) => file == f2 && offset.checked_add(len) == Some(o2),
            _ => false,
        }
    }
}

/// A cached inflated grain: (part, grain index, bytes).
type InflatedGrain = (usize, u64, Rc<Vec<u8>>);

/// An opened VMDK.
pub struct VmdkDisk {
    /// Index 0 is the opened object; the others are related files.
    files: Vec<Rc<Reader>>,
    /// Per file: its host id (what a [`Location::Related`] names), asked once at open.
    ids: Vec<Option<u32>>,
    /// Per file: the last window of its allocation map.
    holes: Vec<Holes>,
    parts: Vec<Part>,
    size: u64,
    format: String,
    disk_id: Option<String>,
    /// The most recently inflated grain: (part, grain, bytes).
    grain: RefCell<Option<InflatedGrain>>,
}

impl std::fmt::Debug for VmdkDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkDisk")
            .field("format", &self.format)
            .field("size", &self.size)
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

fn refuse_parent(d: &Descriptor, name: &str) -> Result<(), Error> {
    match d.parent() {
        Some(parent) => Err(Error::unsupported(format!(
            "{name}: differencing VMDK (parent {parent:?}): open the chain's base disk instead"
        ))),
        None => Ok(()),
    }
}

impl VmdkDisk {
    /// Open the VMDK behind `reader` (a sparse extent or a descriptor file).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the file and field or line; [`Error::Unsupported`] for a
    /// differencing disk or an extent type this adapter does not read.
    pub fn open(reader: Reader) -> Result<Self, Error> {
        let name = reader.name();
        let size = reader.size();
        let head = read_exact_at(&reader, 0, usize::try_from(size.min(512)).unwrap_or(512))?;
        let reader = Rc::new(reader);
        if head.starts_with(sparse::MAGIC) {
            Self::open_sparse(reader, &name)
        } else if head.starts_with(descriptor::SIGNATURE) {
            Self::open_descriptor(reader, &name, size)
        } else {
            Err(Error::invalid(format!(
                "{name}: neither a sparse extent (magic KDMV) nor a descriptor \
                 (`# Disk DescriptorFile`)"
            )))
        }
    }

    fn open_sparse(reader: Rc<Reader>, name: &str) -> Result<Self, Error> {
        let extent = SparseExtent::open(Rc::clone(&reader))?;
        let mut disk_id = None;
        if let Some(text) = extent.embedded_descriptor()? {
            let d = descriptor::parse(&text, name)?;
            refuse_parent(&d, name)?;
            disk_id = d.uuid;
        }
        let size = extent.header().capacity_bytes();
        let format = if extent.header().compressed() {
            "vmdk-stream-optimized"
        } else {
            "vmdk-monolithic-sparse"
        };
        Ok(Self {
            ids: vec![None],
            holes: vec![Holes::default()],
            files: vec![reader],
            parts: vec![Part {
                start: 0,
                len: size,
                kind: PartKind::Sparse { file: 0, extent },
            }],
            size,
            format: format.to_owned(),
            disk_id,
            grain: RefCell::new(None),
        })
    }

    fn open_descriptor(reader: Rc<Reader>, name: &str, size: u64) -> Result<Self, Error> {
        if size > descriptor::MAX_DESCRIPTOR as u64 {
            return Err(Error::invalid(format!(
                "{name}: a descriptor file of {size} bytes is over the {}-byte limit",
                descriptor::MAX_DESCRIPTOR
            )));
        }
        let text = read_exact_at(&*reader, 0, usize::try_from(size).unwrap_or(0))?;
        let d = descriptor::parse(&text, name)?;
        refuse_parent(&d, name)?;
        if d.extents.is_empty() {
            return Err(Error::invalid(format!(
                "{name}: descriptor has no extent lines"
            )));
        }
        let mut files = vec![reader];
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut parts = Vec::with_capacity(d.extents.len());
        let mut start = 0u64;
        for (i, line) in d.extents.iter().enumerate() {
            let len = line.sectors * SECTOR;
            let at = |what: String| {
                Error::invalid(format!("{name}: descriptor line {}: {what}", line.line))
            };
            let mut file_index = |file: &str| -> Result<usize, Error> {
                if let Some(&i) = by_name.get(file) {
                    return Ok(i);
                }
                let r = open_related(file)
                    .map_err(|e| at(format!("extent file {file:?} cannot be opened: {e}")))?;
                files.push(Rc::new(r));
                by_name.insert(file.to_owned(), files.len() - 1);
                Ok(files.len() - 1)
            };
            let kind = match (line.kind, &line.file) {
                (ExtentType::Zero, _) => PartKind::Zero,
                (ExtentType::Flat, Some(f)) => {
                    let file = file_index(f)?;
                    let offset = line.offset * SECTOR;
                    let have = files[file].size();
                    if offset + len > have {
                        return Err(at(format!(
                            "flat extent {f:?} needs {} bytes from byte {offset}, the file has \
                             {have}",
                            len
                        )));
                    }
                    PartKind::Flat { file, offset }
                }
                (ExtentType::Sparse, Some(f)) => {
                    let file = file_index(f)?;
                    let extent = SparseExtent::open(Rc::clone(&files[file]))?;
                    if extent.header().capacity < line.sectors {
                        return Err(at(format!(
                            "sparse extent {f:?} has a capacity of {} sectors, the line says {}",
                            extent.header().capacity,
                            line.sectors
                        )));
                    }
                    PartKind::Sparse { file, extent }
                }
                (_, None) => return Err(at(format!("extent {i} has no file name"))),
            };
            parts.push(Part { start, len, kind });
            start += len;
        }
        let format = match d.create_type.as_deref() {
            Some("monolithicFlat") => "vmdk-monolithic-flat",
            Some("twoGbMaxExtentFlat") => "vmdk-2gb-flat",
            Some("twoGbMaxExtentSparse") => "vmdk-2gb-sparse",
            Some("vmfs" | "vmfsThin" | "vmfsPreallocated" | "vmfsEagerZeroedThick") => "vmdk-vmfs",
            _ => "vmdk",
        };
        Ok(Self {
            // The opened file is `Source`: its id is never used.
            ids: std::iter::once(None)
                .chain(files[1..].iter().map(|f| f.host_id()))
                .collect(),
            holes: files.iter().map(|_| Holes::default()).collect(),
            files,
            parts,
            size: start,
            format: format.to_owned(),
            disk_id: d.uuid,
            grain: RefCell::new(None),
        })
    }

    /// Walk `[offset, end)` as segments, adjacent continuing ones merged, calling `f` until it
    /// returns false, the range is covered or `budget` raw segments were visited (at least one
    /// segment is always handed over).
    fn walk(
        &self,
        offset: u64,
        end: u64,
        mut budget: usize,
        f: &mut dyn FnMut(u64, u64, Seg) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let mut pending: Option<(u64, u64, Seg)> = None;
        let mut pos = offset;
        while pos < end {
            let pi = self.parts.partition_point(|p| p.start + p.len <= pos);
            let Some(part) = self.parts.get(pi) else {
                break;
            };
            let part_end = (part.start + part.len).min(end);
            let (seg, n) = match &part.kind {
                PartKind::Zero => (Seg::Zero, part_end - pos),
                PartKind::Flat { file, offset } => (
                    Seg::Stored {
                        file: *file,
                        offset: offset + (pos - part.start),
                    },
                    part_end - pos,
                ),
                PartKind::Sparse { file, extent } => {
                    let within = pos - part.start;
                    let (slot, run) = extent.at(within)?;
                    let seg = match slot {
                        Slot::Unallocated => Seg::Unallocated,
                        Slot::Zero => Seg::Zero,
                        Slot::Stored(offset) => Seg::Stored {
                            file: *file,
                            offset,
                        },
                        Slot::Compressed(grain) => Seg::Compressed {
                            part: pi,
                            grain,
                            within: within - grain * extent.header().grain_bytes(),
                        },
                    };
                    (seg, run.min(part_end - pos))
                }
            };
            match &mut pending {
                Some((_, len, prev)) if prev.continued_by(*len, seg) => *len += n,
                _ => {
                    if let Some((s, l, g)) = pending.take()
                        && !f(s, l, g)?
                    {
                        return Ok(());
                    }
                    pending = Some((pos, n, seg));
                }
            }
            pos += n;
            budget = budget.saturating_sub(1);
            if budget == 0 {
                break;
            }
        }
        if let Some((s, l, g)) = pending {
            f(s, l, g)?;
        }
        Ok(())
    }

    /// The bytes of compressed grain `grain` of part `part`, from a one-grain cache.
    fn inflated(&self, part: usize, grain: u64) -> Result<Rc<Vec<u8>>, Error> {
        if let Some((p, g, bytes)) = &*self.grain.borrow()
            && (*p, *g) == (part, grain)
        {
            return Ok(Rc::clone(bytes));
        }
        let PartKind::Sparse { extent, .. } = &self.parts[part].kind else {
            return Err(Error::invalid("compressed grain outside a sparse extent"));
        };
        let bytes = Rc::new(extent.compressed_grain(grain)?);
        *self.grain.borrow_mut() = Some((part, grain, Rc::clone(&bytes)));
        Ok(bytes)
    }
}

fn to_index(v: u64) -> usize {
    // Only called on offsets within one read of at most MAX_DISK_READ bytes.
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Disk for VmdkDisk {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            format: self.format.clone(),
            virtual_size: self.size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            disk_id: self.disk_id.clone(),
            parent: None,
        }
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let end = check_range(self.size, offset, length)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut queries = holes::MAX_QUERIES;
        self.walk(offset, end, WALK_BUDGET, &mut |start, len, seg| {
            let Seg::Stored { file, offset: at } = seg else {
                return Ok(push_extent(&mut out, start, len, seg.kind()));
            };
            // Stored as is: the file's holes read as zeros.
            let mut done = 0;
            while done < len {
                let Some((allocated, n)) = self.holes[file].lookup(
                    &*self.files[file],
                    at + done,
                    len - done,
                    &mut queries,
                ) else {
                    return Ok(false);
                };
                let kind = if allocated {
                    ExtentKind::Data
                } else {
                    ExtentKind::Unallocated
                };
                if !push_extent(&mut out, start + done, n, kind) {
                    return Ok(false);
                }
                done += n;
            }
            Ok(true)
        })?;
        Ok(out)
    }

    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        let end = check_range(self.size, offset, length)?;
        let mut out: Vec<Mapping> = Vec::new();
        self.walk(offset, end, WALK_BUDGET, &mut |start, len, seg| {
            let location = match seg {
                Seg::Unallocated | Seg::Zero => Location::Zero,
                Seg::Stored { file: 0, offset } => Location::Source(offset),
                Seg::Stored { file, offset } => match self.ids[file] {
                    Some(reader) => Location::Related { reader, offset },
                    None => Location::Adapter,
                },
                Seg::Compressed { .. } => Location::Adapter,
            };
            if let Some(last) = out.last_mut()
                && last.offset + last.length == start
                && last.continues_with(location)
            {
                last.length += len;
                return Ok(true);
            }
            if out.len() == MAX_EXTENTS {
                return Ok(false);
            }
            out.push(Mapping {
                offset: start,
                length: len,
                location,
            });
            Ok(true)
        })?;
        Ok(out)
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        let end = check_read(self.size, offset, len)?;
        let mut buf = vec![0u8; len as usize];
        self.walk(offset, end, usize::MAX, &mut |start, n, seg| {
            let at = to_index(start - offset);
            let dst = &mut buf[at..at + to_index(n)];
            match seg {
                Seg::Unallocated | Seg::Zero => {}
                Seg::Stored { file, offset } => {
                    dst.copy_from_slice(&read_exact_at(&*self.files[file], offset, dst.len())?);
                }
                Seg::Compressed {
                    part,
                    grain,
                    within,
                } => {
                    let bytes = self.inflated(part, grain)?;
                    let w = to_index(within);
                    let src = bytes.get(w..w + dst.len()).ok_or_else(|| {
                        Error::invalid(format!("compressed grain {grain} is too short"))
                    })?;
                    dst.copy_from_slice(src);
                }
            }
            Ok(true)
        })?;
        Ok(buf)
    }

    fn changes(&self, document: &[u8]) -> Result<Box<dyn ChangeSet>, Error> {
        Ok(ChangeList::boxed(cbt::parse(document, self.size)?))
    }
}

ferry_plugin_sdk::export_source_adapter!(Vmware);

/// Entry points for `cargo fuzz` targets (and the native mutation smoke test). None of them
/// may panic on any input.
pub mod fuzzing {
    use super::{Disk, Location, Reader, SourceAdapter, Vmware};
    use ferry_plugin_sdk::io::Named;

    /// Parse `data` as a text descriptor.
    pub fn descriptor(data: &[u8]) {
        let _ = crate::descriptor::parse(data, "fuzz.vmdk");
    }

    /// Open `data` as a (monolithicSparse) VMDK and exercise every `Disk` method on it.
    pub fn sparse(data: &[u8]) {
        exercise(data);
    }

    /// Open `data` as a (streamOptimized) VMDK and exercise every `Disk` method on it.
    pub fn stream(data: &[u8]) {
        exercise(data);
        let _ = crate::stream::parse_footer(data, "fuzz.vmdk");
        let _ = crate::stream::inflate_grain(data, "fuzz.vmdk", 0, 64 << 10, 0);
    }

    /// Parse `data` as a CBT `DiskChangeInfo` document for a 1 GiB disk.
    pub fn cbt(data: &[u8]) {
        let _ = crate::cbt::parse(data, 1 << 30);
    }

    fn exercise(data: &[u8]) {
        let Ok(disk) = Vmware::open(Reader::new(Named::new("fuzz.vmdk", data.to_vec()))) else {
            return;
        };
        let size = disk.info().virtual_size;
        let window = size.min(64 << 20);
        let _ = disk.extents(0, window);
        let _ = disk.extents(size - window, window);
        if let Ok(maps) = disk.locate(0, window) {
            let mut pos = 0;
            for m in maps {
                assert_eq!(m.offset, pos, "locate left a gap");
                pos += m.length;
                if let Location::Source(o) = m.location {
                    assert!(
                        o + m.length <= data.len() as u64,
                        "locate pointed past the file"
                    );
                }
            }
        }
        let n = u32::try_from(size.min(1 << 20)).unwrap_or(0);
        let _ = disk.read(0, n);
        let _ = disk.read(size - u64::from(n), n);
    }
}

#[cfg(test)]
mod tests;
