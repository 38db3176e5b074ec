//! `hyperv`: the Ferry source adapter for Hyper-V disks, VHDX and VHD.
//!
//! One adapter reads both formats (fixed, dynamic and differencing), follows parent chains
//! through `open_related`, and translates Hyper-V RCT change documents:
//!
//! - [`vhdx`] parses VHDX files (headers, log replay, region table, metadata, BAT, sector
//!   bitmaps); [`vhd`] parses VHD files (footer, dynamic header, BAT, block bitmaps, parent
//!   locators); both present a file as a `Layer` (in `common`): which virtual runs the file
//!   stores where, and which it leaves to its parent.
//! - [`HypervDisk`] stacks the layers of a chain (child first) and answers `extents`, `locate`
//!   and `read` by asking each layer in turn. `locate` points the host at bytes stored as is:
//!   `Location::Source` in the opened file, `Location::Related` in a parent the host opened
//!   (`Location::Adapter` only for pages a replayed VHDX log overlays, and for parents without a
//!   host id natively). `extents` reports the holes of the files under stored bytes as
//!   `unallocated` (`holes`).
//! - [`rct`] validates RCT documents for `changes`.
//! - [`fuzzing`] holds the entry points a fuzzer (and the mutation smoke test) drives.
//!
//! `probe` recognises `vhdxfile` at offset 0 and a VHD footer copy (`conectix`) at offset 0
//! (dynamic and differencing VHDs). A fixed VHD has its only footer at the end of the file,
//! beyond the 64 KiB the host hands to `probe` (except for a tiny one), so `probe` usually says
//! no to it; `open` accepts it all the same (it checks the last 512 bytes), for a host told
//! to use this adapter explicitly.

mod common;
pub mod rct;
pub mod vhd;
pub mod vhdx;

use ferry_plugin_sdk::adapter::{
    ChangeList, ChangeSet, Disk, DiskInfo, Error, Location, MAX_EXTENTS, Mapping, PluginInfo,
    Reader, SourceAdapter, check_range, check_read, open_related,
};
use ferry_plugin_sdk::io::{Extent, ExtentKind, IoError, ReadAt};

use common::{Layer, Seg, guid_le, uuid_be};
use ferry_plugin_sdk::adapter::push_extent;
use ferry_plugin_sdk::holes::{self, Holes};

/// Deepest parent chain followed (the opened file and up to 15 ancestors).
pub const MAX_CHAIN: usize = 16;

/// The adapter.
#[derive(Debug)]
pub struct HyperV;

impl SourceAdapter for HyperV {
    type Disk = HypervDisk;

    fn info() -> PluginInfo {
        PluginInfo {
            name: "hyperv".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            formats: vec!["vhdx".to_owned(), "vhd".to_owned()],
            description:
                "Hyper-V VHDX and VHD disks (fixed, dynamic, differencing chains) and RCT change ranges"
                    .to_owned(),
        }
    }

    fn probe(header: &[u8]) -> bool {
        vhdx::probe(header) || vhd::probe(header)
    }

    fn open(reader: Reader) -> Result<HypervDisk, Error> {
        let head = read_head(&reader)?;
        if vhdx::probe(&head) {
            HypervDisk::open_chain(Image::Vhdx(vhdx::Vhdx::open(reader)?))
        } else {
            HypervDisk::open_chain(Image::Vhd(vhd::Vhd::open(reader)?))
        }
    }
}

fn read_head(reader: &Reader) -> Result<Vec<u8>, Error> {
    let n = reader.size().min(8);
    reader
        .read_at(0, u32::try_from(n).unwrap_or(8))
        .map_err(|e| common::io_context(e, &reader.name(), "file type identifier"))
}

/// One file of a chain.
#[derive(Debug)]
enum Image {
    Vhdx(vhdx::Vhdx),
    Vhd(vhd::Vhd),
}

impl Image {
    fn layer(&self) -> &dyn Layer {
        match self {
            Image::Vhdx(v) => v,
            Image::Vhd(v) => v,
        }
    }

    fn parent_name(&self) -> Option<&str> {
        match self {
            Image::Vhdx(v) => v.parent.as_ref().map(|p| p.name.as_str()),
            Image::Vhd(v) => v.parent.as_ref().map(|p| p.0.as_str()),
        }
    }

    /// What identifies the file in a chain, for loop detection.
    fn key(&self) -> String {
        match self {
            Image::Vhdx(v) => format!("{}/{}", guid_le(&v.disk_id), guid_le(&v.data_write_guid)),
            Image::Vhd(v) => uuid_be(&v.unique_id),
        }
    }

    /// Open `reader` as the parent of `child`, in the child's format, and check it is the
    /// parent the child records.
    fn open_parent(child: &Image, reader: Reader) -> Result<Image, Error> {
        match child {
            Image::Vhdx(c) => {
                let p = vhdx::Vhdx::open(reader)?;
                let loc = c.parent.as_ref().expect("only children have parents");
                let dwg = guid_le(&p.data_write_guid);
                let ok = [&loc.linkage, &loc.linkage2]
                    .iter()
                    .any(|l| l.as_deref() == Some(dwg.as_str()));
                if !ok {
                    return Err(Error::invalid(format!(
                        "{}: parent locator parent_linkage {} does not match DataWriteGuid {dwg} of parent {}",
                        c.layer_name(),
                        loc.linkage.as_deref().unwrap_or("(none)"),
                        p.layer_name()
                    )));
                }
                Ok(Image::Vhdx(p))
            }
            Image::Vhd(c) => {
                let p = vhd::Vhd::open(reader)?;
                if p.unique_id != c.parent_id {
                    return Err(Error::invalid(format!(
                        "{}: dynamic header parent unique id {} does not match unique id {} of parent {}",
                        c.layer_name(),
                        uuid_be(&c.parent_id),
                        uuid_be(&p.unique_id),
                        p.layer_name()
                    )));
                }
                Ok(Image::Vhd(p))
            }
        }
    }
}

/// A layer's name as a String (helper for messages).
trait LayerName {
    fn layer_name(&self) -> String;
}
impl<T: Layer> LayerName for T {
    fn layer_name(&self) -> String {
        self.name().to_owned()
    }
}

/// What the chain stores for a run of the virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Res {
    /// In layer `.0` at file offset `.1`.
    Data(usize, u64),
    Zero,
    Unallocated,
}

/// An opened VHDX or VHD with its parents.
pub struct HypervDisk {
    /// The opened file first, then its parent, grandparent...
    chain: Vec<Image>,
    /// Per file of the chain: its host id (what a `Location::Related` names; the opened
    /// file's is not used), asked once at open.
    ids: Vec<Option<u32>>,
    /// Per file of the chain: the last window of its allocation map.
    holes: Vec<Holes>,
    virtual_size: u64,
}

impl std::fmt::Debug for HypervDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chain: Vec<&str> = self.chain.iter().map(|i| i.layer().name()).collect();
        f.debug_struct("HypervDisk")
            .field("chain", &chain)
            .field("virtual_size", &self.virtual_size)
            .finish()
    }
}

impl HypervDisk {
    fn open_chain(top: Image) -> Result<HypervDisk, Error> {
        let virtual_size = top.layer().virtual_size();
        let mut chain = vec![top];
        loop {
            let last = chain.last().expect("never empty");
            let Some(parent) = last.parent_name().map(str::to_owned) else {
                break;
            };
            let names = || {
                chain
                    .iter()
                    .map(|i| i.layer().name().to_owned())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            };
            if chain.len() >= MAX_CHAIN {
                return Err(Error::invalid(format!(
                    "parent chain {} -> {parent} is deeper than {MAX_CHAIN} files",
                    names()
                )));
            }
            let reader = open_related(&parent).map_err(|e| {
                Error::Io(IoError::new(
                    e.kind,
                    format!(
                        "{}: opening parent `{parent}`: {}",
                        last.layer().name(),
                        e.message
                    ),
                ))
            })?;
            let image = Image::open_parent(last, reader)?;
            if chain.iter().any(|i| i.key() == image.key()) {
                return Err(Error::invalid(format!(
                    "parent chain loops: {} -> {}",
                    names(),
                    image.layer().name()
                )));
            }
            chain.push(image);
        }
        Ok(HypervDisk {
            ids: std::iter::once(None)
                .chain(chain[1..].iter().map(|i| i.layer().reader().host_id()))
                .collect(),
            holes: chain.iter().map(|_| Holes::default()).collect(),
            chain,
            virtual_size,
        })
    }

    /// What the chain stores at `offset` (< `end` <= virtual size), and for how long.
    fn resolve(&self, offset: u64, end: u64) -> Result<(Res, u64), Error> {
        let mut limit = end;
        for (i, image) in self.chain.iter().enumerate() {
            let layer = image.layer();
            if offset >= layer.virtual_size() {
                break;
            }
            let (seg, len) = layer.segment(offset, limit.min(layer.virtual_size()))?;
            let len = len.max(1).min(limit - offset);
            match seg {
                Seg::Data(fo) => return Ok((Res::Data(i, fo), len)),
                Seg::Zero => return Ok((Res::Zero, len)),
                Seg::Absent => limit = offset + len,
            }
        }
        Ok((Res::Unallocated, limit - offset))
    }
}

impl Disk for HypervDisk {
    fn info(&self) -> DiskInfo {
        let (format, lss, pss, disk_id) = match &self.chain[0] {
            Image::Vhdx(v) => (
                v.format(),
                v.logical_sector_size,
                v.physical_sector_size,
                guid_le(&v.disk_id),
            ),
            Image::Vhd(v) => (v.format(), 512, 512, uuid_be(&v.unique_id)),
        };
        DiskInfo {
            format: format.to_owned(),
            virtual_size: self.virtual_size,
            logical_sector_size: lss,
            physical_sector_size: pss,
            disk_id: Some(disk_id),
            parent: self.chain[0].parent_name().map(str::to_owned),
        }
    }

    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        let end = check_range(self.virtual_size, offset, length)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut queries = holes::MAX_QUERIES;
        let mut pos = offset;
        'walk: while pos < end {
            let (res, len) = self.resolve(pos, end)?;
            let (i, fo) = match res {
                Res::Data(i, fo) => (i, fo),
                Res::Zero | Res::Unallocated => {
                    let kind = if res == Res::Zero {
                        ExtentKind::Zero
                    } else {
                        ExtentKind::Unallocated
                    };
                    if !push_extent(&mut out, pos, len, kind) {
                        break;
                    }
                    pos += len;
                    continue;
                }
            };
            // Stored in file `i` from `fo`: where it is the file's own bytes, the file's holes
            // read as zeros.
            let layer = self.chain[i].layer();
            let (start, stop) = (pos, pos + len);
            while pos < stop {
                let at = fo + (pos - start);
                let (as_is, n) = layer.as_is(at, stop - pos);
                let (allocated, n) = if as_is {
                    match self.holes[i].lookup(layer.reader(), at, n, &mut queries) {
                        Some(hit) => hit,
                        None => break 'walk,
                    }
                } else {
                    (true, n)
                };
                let kind = if allocated {
                    ExtentKind::Data
                } else {
                    ExtentKind::Unallocated
                };
                if !push_extent(&mut out, pos, n, kind) {
                    break 'walk;
                }
                pos += n;
            }
        }
        Ok(out)
    }

    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        let end = check_range(self.virtual_size, offset, length)?;
        let mut out: Vec<Mapping> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (res, mut len) = self.resolve(pos, end)?;
            let location = match res {
                Res::Zero | Res::Unallocated => Location::Zero,
                Res::Data(i, fo) => {
                    let (as_is, n) = self.chain[i].layer().as_is(fo, len);
                    len = n;
                    match (as_is, i, self.ids[i]) {
                        (true, 0, _) => Location::Source(fo),
                        (true, _, Some(reader)) => Location::Related { reader, offset: fo },
                        _ => Location::Adapter,
                    }
                }
            };
            if let Some(last) = out.last_mut()
                && last.continues_with(location)
            {
                last.length += len;
            } else if out.len() == MAX_EXTENTS {
                break;
            } else {
                out.push(Mapping {
                    offset: pos,
                    length: len,
                    location,
                });
            }
            pos += len;
        }
        Ok(out)
    }

    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        let end = check_read(self.virtual_size, offset, len)?;
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = offset;
        while pos < end {
            let (res, n) = self.resolve(pos, end)?;
            // `n` is at most `len`, a u32.
            let n_usize = usize::try_from(n).expect("at most MAX_DISK_READ");
            match res {
                Res::Data(i, fo) => {
                    let bytes = self.chain[i].layer().read_file(fo, n_usize)?;
                    out.extend_from_slice(&bytes);
                }
                Res::Zero | Res::Unallocated => out.resize(out.len() + n_usize, 0),
            }
            pos += n;
        }
        Ok(out)
    }

    fn changes(&self, document: &[u8]) -> Result<Box<dyn ChangeSet>, Error> {
        Ok(ChangeList::boxed(rct::parse(document, self.virtual_size)?))
    }
}

ferry_plugin_sdk::export_source_adapter!(HyperV);

/// Fuzz entry points: each opens (or parses) arbitrary bytes and exercises the result. They
/// must never panic; a `cargo fuzz` target is one line calling one of them.
pub mod fuzzing {
    use super::{Disk, HyperV, HypervDisk, Image, SourceAdapter, rct, vhd, vhdx};
    use ferry_plugin_sdk::adapter::Reader;

    fn exercise(disk: &HypervDisk) {
        let size = disk.info().virtual_size;
        let _ = disk.extents(0, size);
        let _ = disk.locate(0, size);
        let n = u32::try_from(size.min(1 << 20)).unwrap_or(0);
        let _ = disk.read(0, n);
        let _ = disk.read(size - u64::from(n), n);
        let _ = disk.read(size / 2, n.min(u32::try_from(size - size / 2).unwrap_or(0)));
        let _ = disk.changes(br#"[{"ByteOffset": 0, "ByteLength": 512}]"#);
    }

    /// Open `data` as a VHDX (and its parents, if registered) and read from it.
    pub fn vhdx(data: &[u8]) {
        let _ = HyperV::probe(&data[..data.len().min(64 << 10)]);
        if let Ok(v) = vhdx::Vhdx::open(Reader::new(data.to_vec()))
            && let Ok(d) = HypervDisk::open_chain(Image::Vhdx(v))
        {
            exercise(&d);
        }
    }

    /// Open `data` as a VHD (and its parents, if registered) and read from it.
    pub fn vhd(data: &[u8]) {
        let _ = HyperV::probe(&data[..data.len().min(64 << 10)]);
        if let Ok(v) = vhd::Vhd::open(Reader::new(data.to_vec()))
            && let Ok(d) = HypervDisk::open_chain(Image::Vhd(v))
        {
            exercise(&d);
        }
    }

    /// Parse `data` as an RCT change document for a 1 GiB disk.
    pub fn rct(data: &[u8]) {
        let _ = rct::parse(data, 1 << 30);
    }
}

#[cfg(test)]
mod tests;
