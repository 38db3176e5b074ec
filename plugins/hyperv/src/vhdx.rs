//! VHDX (MS-VHDX v1.0): the parser for Hyper-V's current disk format.
//!
//! It exists to turn a VHDX file into a [`Layer`]: which virtual bytes the file stores where
//! (a block allocation table over fixed-size payload blocks, with per-sector bitmaps for
//! partially present blocks of differencing disks), its identity and its parent locator. It
//! reads, in order: the file identifier, the two headers (the valid one with the higher
//! sequence number wins; CRC-32C checked), the log (replayed into an in-memory overlay when the
//! active header says it is not empty, as the spec requires before anything else is read), the
//! region table (CRC-32C), the metadata region and the BAT. Every size read from the file is
//! checked against the file before anything is allocated from it.
//!
//! Leniency: region offsets need not be 1 MiB aligned (only inside the file and past the
//! region tables); payload blocks are addressed in MiB by the format itself.

use std::cell::RefCell;
use std::collections::BTreeMap;

use ferry_plugin_sdk::adapter::{Error, Reader};
use ferry_plugin_sdk::io::ReadAt;

use crate::common::{
    Layer, MAX_VIRTUAL_SIZE, Seg, crc32c_without, guid_at, guid_le, le16, le32, le64,
    normalize_guid, parent_file_name, read_checked, to_usize, utf16,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Offsets of the fixed structures.
const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
const REGION_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
const REGION_TABLE_SIZE: u64 = 64 * KIB;
const HEADER_SIZE: u64 = 4 * KIB;
/// The first byte regions may use.
const FIRST_REGION_BYTE: u64 = 320 * KIB;

/// Most bytes the replayed log may overlay (32 MiB).
pub const MAX_LOG_OVERLAY: u64 = 32 * MIB;
/// Largest log this parser reads (the log is read whole to find its active sequence).
pub const MAX_LOG_SIZE: u64 = 32 * MIB;

/// The region GUIDs (as stored: little-endian fields).
const BAT_REGION: [u8; 16] = guid_bytes(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_REGION: [u8; 16] = guid_bytes(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// The metadata item GUIDs.
pub(crate) const FILE_PARAMETERS: [u8; 16] = guid_bytes(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(crate) const VIRTUAL_DISK_SIZE: [u8; 16] = guid_bytes(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
pub(crate) const VIRTUAL_DISK_ID: [u8; 16] = guid_bytes(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
pub(crate) const LOGICAL_SECTOR_SIZE: [u8; 16] = guid_bytes(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
pub(crate) const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid_bytes(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
pub(crate) const PARENT_LOCATOR: [u8; 16] = guid_bytes(
    0xA8D3_5F2B,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
pub(crate) const VHDX_LOCATOR_TYPE: [u8; 16] = guid_bytes(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);
#[cfg(test)]
pub(crate) const BAT_GUID: [u8; 16] = BAT_REGION;
#[cfg(test)]
pub(crate) const METADATA_GUID: [u8; 16] = METADATA_REGION;

/// A GUID in its on-disk form.
pub(crate) const fn guid_bytes(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// BAT payload block states.
pub(crate) const PAYLOAD_NOT_PRESENT: u64 = 0;
pub(crate) const PAYLOAD_UNDEFINED: u64 = 1;
pub(crate) const PAYLOAD_ZERO: u64 = 2;
pub(crate) const PAYLOAD_UNMAPPED: u64 = 3;
pub(crate) const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub(crate) const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// BAT sector bitmap block state: present.
pub(crate) const SB_PRESENT: u64 = 6;

/// Whether `header` (the first bytes of an object) starts like a VHDX.
pub fn probe(header: &[u8]) -> bool {
    header.starts_with(b"vhdxfile")
}

/// The active header's fields this parser uses.
#[derive(Debug, Clone)]
struct Header {
    sequence: u64,
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
    log_length: u32,
    log_offset: u64,
}

fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < 4096 || &b[..4] != b"head" || le32(b, 4) != crc32c_without(&b[..4096], 4) {
        return None;
    }
    if le16(b, 66) != 1 {
        return None; // Version
    }
    Some(Header {
        sequence: le64(b, 8),
        data_write_guid: guid_at(b, 32),
        log_guid: guid_at(b, 48),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    })
}

/// The parent locator of a differencing VHDX.
#[derive(Debug, Clone)]
pub(crate) struct ParentLocator {
    /// The parent's file name (directory stripped), for `open_related`.
    pub name: String,
    /// `parent_linkage`: the parent's DataWriteGuid.
    pub linkage: Option<String>,
    /// `parent_linkage2`: an alternative DataWriteGuid.
    pub linkage2: Option<String>,
}

/// The replayed log: 4 KiB pages of the file as the log leaves them (`None`: zeros).
#[derive(Debug, Default)]
struct Overlay {
    pages: BTreeMap<u64, Option<Vec<u8>>>,
}

impl Overlay {
    fn end(&self) -> u64 {
        self.pages.keys().next_back().map_or(0, |p| p + 4096)
    }
}

/// The file under the log overlay (the plain file when there is none).
#[derive(Debug)]
struct Source {
    reader: Reader,
    name: String,
    /// Size of the file itself (without the overlay).
    file_size: u64,
    overlay: Option<Overlay>,
}

impl Source {
    /// Size of the file as the log leaves it.
    fn size(&self) -> u64 {
        let size = self.reader.size();
        self.overlay.as_ref().map_or(size, |o| size.max(o.end()))
    }

    fn read(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>, Error> {
        let Some(overlay) = &self.overlay else {
            return read_checked(&self.reader, offset, len, what);
        };
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{}: {what} at offset {offset} ({len} bytes) lies past the end of the file",
                    self.name
                ))
            })?;
        let file_end = end.min(self.reader.size());
        let mut buf = if offset < file_end {
            read_checked(&self.reader, offset, file_end - offset, what)?
        } else {
            Vec::new()
        };
        buf.resize(to_usize(len, &self.name, what)?, 0);
        let first_page = offset / 4096 * 4096;
        for (&page, content) in overlay.pages.range(first_page..end) {
            let from = page.max(offset);
            let to = (page + 4096).min(end);
            // Both within `buf` (at most `len` bytes) and within a 4 KiB page.
            let (b0, b1) = (
                to_usize(from - offset, &self.name, what)?,
                to_usize(to - offset, &self.name, what)?,
            );
            let (p0, p1) = (
                to_usize(from - page, &self.name, what)?,
                to_usize(to - page, &self.name, what)?,
            );
            match content {
                Some(data) => buf[b0..b1].copy_from_slice(&data[p0..p1]),
                None => buf[b0..b1].fill(0),
            }
        }
        Ok(buf)
    }
}

/// An opened VHDX file.
#[derive(Debug)]
pub(crate) struct Vhdx {
    src: Source,
    pub virtual_size: u64,
    pub block_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub disk_id: [u8; 16],
    pub data_write_guid: [u8; 16],
    pub leave_allocated: bool,
    pub parent: Option<ParentLocator>,
    chunk_ratio: u64,
    bat: Vec<u64>,
    /// The last sector bitmap read: payload block index and its bits.
    bitmap: RefCell<Option<(u64, Vec<u8>)>>,
}

impl Vhdx {
    /// Open and validate a VHDX.
    pub(crate) fn open(reader: Reader) -> Result<Vhdx, Error> {
        let name = reader.name();
        let size = reader.size();
        let invalid = |m: String| Error::invalid(format!("{name}: {m}"));
        if size < FIRST_REGION_BYTE {
            return Err(invalid(format!(
                "file of {size} bytes is too small for a VHDX (headers and region tables need {FIRST_REGION_BYTE})"
            )));
        }
        let ident = read_checked(&reader, 0, 8, "file type identifier")?;
        if ident != b"vhdxfile" {
            return Err(invalid(
                "file type identifier is not `vhdxfile`: not a VHDX".into(),
            ));
        }
        let mut header: Option<Header> = None;
        for at in HEADER_OFFSETS {
            let b = read_checked(&reader, at, HEADER_SIZE, "header")?;
            if let Some(h) = parse_header(&b)
                && header.as_ref().is_none_or(|c| h.sequence > c.sequence)
            {
                header = Some(h);
            }
        }
        let header = header.ok_or_else(|| {
            invalid("no valid header (neither at 64 KiB nor at 128 KiB has the `head` signature, version 1 and a good CRC-32C)".into())
        })?;
        let mut src = Source {
            reader,
            name: name.clone(),
            file_size: size,
            overlay: None,
        };
        if header.log_guid != [0; 16] {
            src.overlay = Some(replay_log(&src.reader, &name, &header)?);
        }
        let fsize = src.size();

        // Region table: the first valid copy.
        let mut regions = None;
        for at in REGION_OFFSETS {
            let b = src.read(at, REGION_TABLE_SIZE, "region table")?;
            if &b[..4] == b"regi" && le32(&b, 4) == crc32c_without(&b, 4) {
                regions = Some(b);
                break;
            }
        }
        let regions = regions.ok_or_else(|| {
            invalid("no valid region table (neither at 192 KiB nor at 256 KiB has the `regi` signature and a good CRC-32C)".into())
        })?;
        let count = le32(&regions, 8);
        if count > 2047 {
            return Err(invalid(format!(
                "region table entry count {count} is over 2047"
            )));
        }
        let (mut bat_region, mut meta_region) = (None, None);
        for i in 0..count {
            let e = 16 + 32 * to_usize(u64::from(i), &name, "region entry")?;
            let guid = guid_at(&regions, e);
            let off = le64(&regions, e + 16);
            let len = u64::from(le32(&regions, e + 24));
            let required = le32(&regions, e + 28) & 1 != 0;
            let what = if guid == BAT_REGION {
                "BAT region"
            } else if guid == METADATA_REGION {
                "metadata region"
            } else if required {
                return Err(Error::unsupported(format!(
                    "{name}: required region {} is not one this adapter knows",
                    guid_le(&guid)
                )));
            } else {
                continue;
            };
            if off < FIRST_REGION_BYTE || off.checked_add(len).is_none_or(|e| e > fsize) {
                return Err(invalid(format!(
                    "{what} at offset {off} ({len} bytes) lies outside the file ({fsize} bytes)"
                )));
            }
            if guid == BAT_REGION {
                bat_region = Some((off, len));
            } else {
                meta_region = Some((off, len));
            }
        }
        let (bat_off, bat_len) =
            bat_region.ok_or_else(|| invalid("region table has no BAT region".into()))?;
        let (meta_off, meta_len) =
            meta_region.ok_or_else(|| invalid("region table has no metadata region".into()))?;

        // Metadata.
        if meta_len < 64 * KIB {
            return Err(invalid(format!(
                "metadata region length {meta_len} is under the 64 KiB of its table"
            )));
        }
        let table = src.read(meta_off, 64 * KIB, "metadata table")?;
        if &table[..8] != b"metadata" {
            return Err(invalid("metadata table signature is not `metadata`".into()));
        }
        let entries = le16(&table, 10);
        if entries > 2047 {
            return Err(invalid(format!(
                "metadata table entry count {entries} is over 2047"
            )));
        }
        let mut items: Vec<([u8; 16], Vec<u8>)> = Vec::new();
        for i in 0..usize::from(entries) {
            let e = 32 + 32 * i;
            let id = guid_at(&table, e);
            let off = u64::from(le32(&table, e + 16));
            let len = u64::from(le32(&table, e + 20));
            let flags = le32(&table, e + 24);
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                VIRTUAL_DISK_ID,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .contains(&id);
            if !known {
                if flags & 4 != 0 {
                    return Err(Error::unsupported(format!(
                        "{name}: required metadata item {} is not one this adapter knows",
                        guid_le(&id)
                    )));
                }
                continue;
            }
            if len > 64 * KIB || (len > 0 && off < 64 * KIB) || off + len > meta_len {
                return Err(invalid(format!(
                    "metadata item {} at offset {off} ({len} bytes) lies outside the metadata region ({meta_len} bytes)",
                    guid_le(&id)
                )));
            }
            let data = src.read(meta_off + off, len, "metadata item")?;
            items.push((id, data));
        }
        let item = |id: [u8; 16], what: &str, min: usize| -> Result<Option<&[u8]>, Error> {
            match items.iter().find(|(i, _)| *i == id) {
                Some((_, d)) if d.len() >= min => Ok(Some(d.as_slice())),
                Some((_, d)) => Err(invalid(format!(
                    "metadata item {what} is {} bytes, under {min}",
                    d.len()
                ))),
                None => Ok(None),
            }
        };
        fn need<'a>(v: Option<&'a [u8]>, name: &str, what: &str) -> Result<&'a [u8], Error> {
            v.ok_or_else(|| Error::invalid(format!("{name}: metadata item {what} is missing")))
        }
        let fp = need(
            item(FILE_PARAMETERS, "file parameters", 8)?,
            &name,
            "file parameters",
        )?;
        let block_size = u64::from(le32(fp, 0));
        let leave_allocated = le32(fp, 4) & 1 != 0;
        let has_parent = le32(fp, 4) & 2 != 0;
        let virtual_size = le64(
            need(
                item(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?,
                &name,
                "virtual disk size",
            )?,
            0,
        );
        let disk_id = guid_at(
            need(
                item(VIRTUAL_DISK_ID, "virtual disk id", 16)?,
                &name,
                "virtual disk id",
            )?,
            0,
        );
        let lss = le32(
            need(
                item(LOGICAL_SECTOR_SIZE, "logical sector size", 4)?,
                &name,
                "logical sector size",
            )?,
            0,
        );
        let pss = le32(
            need(
                item(PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?,
                &name,
                "physical sector size",
            )?,
            0,
        );
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(invalid(format!(
                "file parameters block size {block_size} is not a power of two from 1 MiB to 256 MiB"
            )));
        }
        if lss != 512 && lss != 4096 {
            return Err(invalid(format!(
                "logical sector size {lss} is neither 512 nor 4096"
            )));
        }
        if pss != 512 && pss != 4096 {
            return Err(invalid(format!(
                "physical sector size {pss} is neither 512 nor 4096"
            )));
        }
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return Err(invalid(format!(
                "virtual disk size {virtual_size} is outside 1 byte to 64 TiB"
            )));
        }
        if !virtual_size.is_multiple_of(u64::from(lss)) {
            return Err(invalid(format!(
                "virtual disk size {virtual_size} is not a multiple of the logical sector size {lss}"
            )));
        }
        let parent = if has_parent {
            let loc = need(
                item(PARENT_LOCATOR, "parent locator", 20)?,
                &name,
                "parent locator",
            )?;
            Some(parse_parent_locator(&name, loc)?)
        } else {
            None
        };

        // BAT.
        let chunk_ratio = ((1u64 << 23) * u64::from(lss)) / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let total = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else {
            data_blocks + (data_blocks - 1) / chunk_ratio
        };
        // Each entry is 8 bytes of a region that lies within the file.
        if total * 8 > bat_len {
            return Err(invalid(format!(
                "BAT region of {bat_len} bytes is too small for {total} entries (virtual disk size {virtual_size}, block size {block_size})"
            )));
        }
        let raw = src.read(bat_off, total * 8, "BAT")?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let vhdx = Vhdx {
            src,
            virtual_size,
            block_size,
            logical_sector_size: lss,
            physical_sector_size: pss,
            disk_id,
            data_write_guid: header.data_write_guid,
            leave_allocated,
            parent,
            chunk_ratio,
            bat,
            bitmap: RefCell::new(None),
        };
        vhdx.check_bat(data_blocks, fsize)?;
        Ok(vhdx)
    }

    fn check_bat(&self, data_blocks: u64, fsize: u64) -> Result<(), Error> {
        let name = &self.src.name;
        for b in 0..data_blocks {
            let entry = self.entry(b);
            let state = entry & 7;
            let off = file_offset(entry);
            match state {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {}
                PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT => {
                    if state == PAYLOAD_PARTIALLY_PRESENT && self.parent.is_none() {
                        return Err(Error::invalid(format!(
                            "{name}: BAT entry for block {b} is PARTIALLY_PRESENT in a disk without a parent"
                        )));
                    }
                    if off < MIB || off.checked_add(self.block_size).is_none_or(|e| e > fsize) {
                        return Err(Error::invalid(format!(
                            "{name}: BAT entry for block {b}: payload at offset {off} ({} bytes) lies past the end of the file ({fsize} bytes)",
                            self.block_size
                        )));
                    }
                    if state == PAYLOAD_PARTIALLY_PRESENT {
                        let sb = self.bat[self.sb_index(b)];
                        let sb_off = file_offset(sb);
                        if sb & 7 != SB_PRESENT {
                            return Err(Error::invalid(format!(
                                "{name}: BAT entry for block {b} is PARTIALLY_PRESENT but its sector bitmap block is not present"
                            )));
                        }
                        if sb_off < MIB || sb_off + MIB > fsize {
                            return Err(Error::invalid(format!(
                                "{name}: BAT sector bitmap entry for block {b} at offset {sb_off} lies past the end of the file ({fsize} bytes)"
                            )));
                        }
                    }
                }
                s => {
                    return Err(Error::invalid(format!(
                        "{name}: BAT entry for block {b} has unknown state {s}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn entry(&self, block: u64) -> u64 {
        usize::try_from(block + block / self.chunk_ratio)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .unwrap_or(0)
    }

    fn sb_index(&self, block: u64) -> usize {
        let chunk = block / self.chunk_ratio;
        usize::try_from(chunk * (self.chunk_ratio + 1) + self.chunk_ratio).unwrap_or(usize::MAX)
    }

    /// Whether the file is a fixed VHDX (blocks stay allocated).
    pub(crate) fn format(&self) -> &'static str {
        if self.parent.is_some() {
            "vhdx-differencing"
        } else if self.leave_allocated {
            "vhdx-fixed"
        } else {
            "vhdx-dynamic"
        }
    }

    /// The sector bitmap bits of payload block `block` (one bit per logical sector, LSB first).
    fn bitmap(&self, block: u64) -> Result<std::cell::Ref<'_, Vec<u8>>, Error> {
        let cached = matches!(&*self.bitmap.borrow(), Some((b, _)) if *b == block);
        if !cached {
            let sb = self.bat.get(self.sb_index(block)).copied().unwrap_or(0);
            let sectors = self.block_size / u64::from(self.logical_sector_size);
            let start = file_offset(sb) + (block % self.chunk_ratio) * sectors / 8;
            let bits = self.src.read(start, sectors / 8, "sector bitmap")?;
            *self.bitmap.borrow_mut() = Some((block, bits));
        }
        Ok(std::cell::Ref::map(self.bitmap.borrow(), |b| {
            &b.as_ref().expect("filled above").1
        }))
    }
}

fn file_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

/// What a payload state stores, for runs of whole blocks.
fn class(state: u64, fo: u64) -> Option<Seg> {
    match state {
        PAYLOAD_FULLY_PRESENT => Some(Seg::Data(fo)),
        PAYLOAD_ZERO | PAYLOAD_UNMAPPED => Some(Seg::Zero),
        PAYLOAD_PARTIALLY_PRESENT => None,
        _ => Some(Seg::Absent),
    }
}

impl Layer for Vhdx {
    fn name(&self) -> &str {
        &self.src.name
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn segment(&self, offset: u64, end: u64) -> Result<(Seg, u64), Error> {
        let bs = self.block_size;
        let mut block = offset / bs;
        let entry = self.entry(block);
        let in_block = offset - block * bs;
        let Some(first) = class(entry & 7, file_offset(entry)) else {
            // Partially present: a run of sectors of the same bit.
            let lss = u64::from(self.logical_sector_size);
            let bits = self.bitmap(block)?;
            let bit = |s: u64| {
                usize::try_from(s / 8)
                    .ok()
                    .and_then(|i| bits.get(i))
                    .is_some_and(|b| b & (1 << (s % 8)) != 0)
            };
            let block_end = ((block + 1) * bs).min(end);
            let mut s = in_block / lss;
            let set = bit(s);
            let mut pos = (block * bs + (s + 1) * lss).min(block_end);
            s += 1;
            while pos < block_end && bit(s) == set {
                s += 1;
                pos = (block * bs + s * lss).min(block_end);
            }
            let seg = if set {
                Seg::Data(file_offset(entry) + in_block)
            } else {
                Seg::Absent
            };
            return Ok((seg, pos - offset));
        };
        let seg = match first {
            Seg::Data(fo) => Seg::Data(fo + in_block),
            s => s,
        };
        let mut pos = ((block + 1) * bs).min(end);
        while pos < end {
            let prev = self.entry(block);
            block += 1;
            let e = self.entry(block);
            let next = class(e & 7, file_offset(e));
            let same = match (first, next) {
                (Seg::Data(_), Some(Seg::Data(fo))) => fo == file_offset(prev) + bs,
                (a, Some(b)) => a == b,
                _ => false,
            };
            if !same {
                break;
            }
            pos = ((block + 1) * bs).min(end);
        }
        Ok((seg, pos - offset))
    }

    fn read_file(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        self.src.read(offset, len as u64, "payload block")
    }

    fn reader(&self) -> &Reader {
        &self.src.reader
    }

    fn as_is(&self, offset: u64, len: u64) -> (bool, u64) {
        let Some(overlay) = &self.src.overlay else {
            return (true, len);
        };
        let end = offset.saturating_add(len);
        if offset >= self.src.file_size {
            // Zeros or log pages past the end of the file.
            return (false, len);
        }
        // Pages are 4 KiB aligned (the log's file offsets are checked to be).
        let page = offset / 4096 * 4096;
        let mut next = overlay.pages.range(page..end).map(|(&p, _)| p);
        match next.next() {
            Some(p) if p == page => {
                // A run of overlaid pages.
                let mut run_end = page + 4096;
                for p in next {
                    if p != run_end {
                        break;
                    }
                    run_end = p + 4096;
                }
                (false, run_end.min(end) - offset)
            }
            first => {
                let until = first.unwrap_or(end).min(self.src.file_size).min(end);
                (true, until - offset)
            }
        }
    }
}

/// Parse the parent locator item.
fn parse_parent_locator(name: &str, b: &[u8]) -> Result<ParentLocator, Error> {
    let invalid = |m: String| Error::invalid(format!("{name}: parent locator {m}"));
    if guid_at(b, 0) != VHDX_LOCATOR_TYPE {
        return Err(Error::unsupported(format!(
            "{name}: parent locator type {} is not the VHDX one",
            guid_le(&guid_at(b, 0))
        )));
    }
    let count = usize::from(le16(b, 18));
    if 20 + count * 12 > b.len() {
        return Err(invalid(format!(
            "key-value count {count} does not fit in the {} byte item",
            b.len()
        )));
    }
    let mut kv: Vec<(String, String)> = Vec::new();
    for i in 0..count {
        let e = 20 + 12 * i;
        let (ko, vo) = (le32(b, e) as usize, le32(b, e + 4) as usize);
        let (kl, vl) = (usize::from(le16(b, e + 8)), usize::from(le16(b, e + 10)));
        let key = b.get(ko..ko.saturating_add(kl));
        let value = b.get(vo..vo.saturating_add(vl));
        let (Some(key), Some(value)) = (key, value) else {
            return Err(invalid(format!("entry {i} lies outside the item")));
        };
        kv.push((utf16(key, false), utf16(value, false)));
    }
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let name = if let Some(p) = get("relative_path") {
        parent_file_name(name, "relative_path", &p, true)?
    } else if let Some(p) = get("absolute_win32_path") {
        parent_file_name(name, "absolute_win32_path", &p, false)?
    } else if let Some(p) = get("volume_path") {
        parent_file_name(name, "volume_path", &p, false)?
    } else {
        return Err(invalid(
            "has none of relative_path, absolute_win32_path, volume_path".into(),
        ));
    };
    Ok(ParentLocator {
        name,
        linkage: get("parent_linkage").map(|s| normalize_guid(&s)),
        linkage2: get("parent_linkage2").map(|s| normalize_guid(&s)),
    })
}

/// One valid log entry.
#[derive(Debug)]
struct LogEntry {
    pos: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    last_file_offset: u64,
    /// What it writes: file offset, and a 4 KiB page (`None`: zeros) or a zero range length.
    writes: Vec<(u64, Write)>,
}

#[derive(Debug)]
enum Write {
    Page(Vec<u8>),
    Zeros(u64),
}

/// Parse the entry at `pos` of `log`, if it is a valid entry of log `guid`.
fn parse_entry(log: &[u8], pos: u64, guid: &[u8; 16]) -> Option<LogEntry> {
    let log_len = log.len() as u64;
    let at = |p: u64, n: u64| -> Option<Vec<u8>> {
        // Entries wrap around the end of the circular log.
        let mut out = Vec::with_capacity(usize::try_from(n).ok()?);
        let mut p = p % log_len;
        let mut left = n;
        while left > 0 {
            let take = left.min(log_len - p);
            out.extend_from_slice(
                log.get(usize::try_from(p).ok()?..usize::try_from(p + take).ok()?)?,
            );
            left -= take;
            p = (p + take) % log_len;
        }
        Some(out)
    };
    let head = at(pos, 4096)?;
    if &head[..4] != b"loge" {
        return None;
    }
    let length = u64::from(le32(&head, 8));
    let tail = u64::from(le32(&head, 12));
    let sequence = le64(&head, 16);
    let count = u64::from(le32(&head, 24));
    if length < 4096
        || length % 4096 != 0
        || length > log_len
        || tail % 4096 != 0
        || tail >= log_len
    {
        return None;
    }
    if guid_at(&head, 32) != *guid || sequence == 0 {
        return None;
    }
    let entry = at(pos, length)?;
    if le32(&entry, 4) != crc32c_without(&entry, 4) {
        return None;
    }
    let desc_sectors = (64 + 32 * count).div_ceil(4096);
    if desc_sectors * 4096 > length {
        return None;
    }
    let mut data_sector = desc_sectors;
    let mut writes = Vec::new();
    for i in 0..usize::try_from(count).ok()? {
        let d = 64 + 32 * i;
        let sig = entry.get(d..d + 4)?;
        let fo = le64(&entry, d + 16);
        if le64(&entry, d + 24) != sequence || !fo.is_multiple_of(4096) {
            return None;
        }
        if sig == b"zero" {
            let len = le64(&entry, d + 8);
            if !len.is_multiple_of(4096)
                || fo.checked_add(len).is_none_or(|e| e > MAX_VIRTUAL_SIZE * 2)
            {
                return None;
            }
            writes.push((fo, Write::Zeros(len)));
        } else if sig == b"desc" {
            let s = usize::try_from(data_sector * 4096).ok()?;
            let sector = entry.get(s..s + 4096)?;
            data_sector += 1;
            if &sector[..4] != b"data"
                || u64::from(le32(sector, 4)) != sequence >> 32
                || u64::from(le32(sector, 4092)) != sequence & 0xffff_ffff
                || fo > MAX_VIRTUAL_SIZE * 2
            {
                return None;
            }
            let mut page = Vec::with_capacity(4096);
            page.extend_from_slice(&entry[d + 8..d + 16]); // leading bytes
            page.extend_from_slice(&sector[8..4092]);
            page.extend_from_slice(&entry[d + 4..d + 8]); // trailing bytes
            writes.push((fo, Write::Page(page)));
        } else {
            return None;
        }
    }
    if data_sector * 4096 > length {
        return None;
    }
    Some(LogEntry {
        pos,
        length,
        tail,
        sequence,
        last_file_offset: le64(&head, 56),
        writes,
    })
}

/// Find the log's active sequence and replay it into an overlay.
fn replay_log(reader: &Reader, name: &str, h: &Header) -> Result<Overlay, Error> {
    let invalid = |m: String| Error::invalid(format!("{name}: log {m}"));
    let (off, len) = (h.log_offset, u64::from(h.log_length));
    if len == 0 || len % MIB != 0 || off % MIB != 0 || off < MIB {
        return Err(invalid(format!(
            "at offset {off} ({len} bytes) is not a non-empty multiple of 1 MiB at a 1 MiB boundary"
        )));
    }
    if len > MAX_LOG_SIZE {
        return Err(Error::unsupported(format!(
            "{name}: log of {len} bytes is over the {MAX_LOG_SIZE} bytes this adapter replays"
        )));
    }
    let log = read_checked(reader, off, len, "log")?;
    let mut entries: BTreeMap<u64, LogEntry> = BTreeMap::new();
    for pos in (0..len).step_by(4096) {
        if let Some(e) = parse_entry(&log, pos, &h.log_guid) {
            entries.insert(pos, e);
        }
    }
    // Chains of entries with consecutive sequence numbers; keep the one with the highest head
    // whose head's tail lies within it.
    let next_of = |e: &LogEntry| {
        entries
            .get(&((e.pos + e.length) % len))
            .filter(|n| n.sequence == e.sequence + 1)
    };
    let mut best: Option<Vec<u64>> = None;
    let mut best_seq = 0;
    let successors: std::collections::BTreeSet<u64> = entries
        .values()
        .filter_map(|e| next_of(e).map(|n| n.pos))
        .collect();
    for e in entries.values() {
        if successors.contains(&e.pos) {
            continue;
        }
        let mut chain = vec![e.pos];
        let mut cur = e;
        while let Some(n) = next_of(cur) {
            if chain.len() as u64 > len / 4096 {
                break;
            }
            chain.push(n.pos);
            cur = n;
        }
        let Some(start) = chain.iter().position(|&p| p == cur.tail) else {
            continue;
        };
        if cur.sequence > best_seq {
            best_seq = cur.sequence;
            best = Some(chain[start..].to_vec());
        }
    }
    let seq = best.ok_or_else(|| {
        invalid("GUID is set but the log holds no valid sequence of entries".into())
    })?;
    let head = &entries[seq.last().expect("a chain is never empty")];
    if reader.size() < head.last_file_offset {
        return Err(invalid(format!(
            "LastFileOffset {} is past the end of the file ({} bytes): the file was truncated",
            head.last_file_offset,
            reader.size()
        )));
    }
    let mut overlay = Overlay::default();
    let cap = MAX_LOG_OVERLAY / 4096;
    for pos in &seq {
        for (fo, w) in &entries[pos].writes {
            match w {
                Write::Page(p) => {
                    overlay.pages.insert(*fo, Some(p.clone()));
                }
                Write::Zeros(n) => {
                    if n / 4096 > cap {
                        return Err(Error::unsupported(format!(
                            "{name}: log zeroes {n} bytes, over the {MAX_LOG_OVERLAY} bytes this adapter overlays"
                        )));
                    }
                    for p in (*fo..fo + n).step_by(4096) {
                        overlay.pages.insert(p, None);
                    }
                }
            }
            if overlay.pages.len() as u64 > cap {
                return Err(Error::unsupported(format!(
                    "{name}: replaying the log overlays more than {MAX_LOG_OVERLAY} bytes"
                )));
            }
        }
    }
    ferry_plugin_sdk::log::info(&format!(
        "{name}: replayed {} log entries ({} pages) in memory",
        seq.len(),
        overlay.pages.len()
    ));
    Ok(overlay)
}
