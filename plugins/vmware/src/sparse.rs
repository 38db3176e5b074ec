//! Hosted sparse extents (`KDMV`): the header, the grain directory and the grain tables.
//!
//! This module exists so that everything that turns untrusted header and table bytes into
//! file offsets lives in one place, as pure functions over `&[u8]` and a [`ReadAt`], and can
//! be fuzzed alone. It serves `monolithicSparse` files, the extent files of a
//! `twoGbMaxExtentSparse` set and `streamOptimized` files (whose compressed grains and footer
//! are in [`crate::stream`]).
//!
//! Every size read from a header is checked before it is used: the capacity (at most 64 TiB),
//! the grain size (a power of two of at most 1 MiB), the grain table size (at most 512
//! entries), the grain directory (within the file and at most [`MAX_GD_ENTRIES`] entries) and
//! every grain table and uncompressed grain (within the file).

use std::cell::RefCell;
use std::rc::Rc;

use ferry_plugin_sdk::adapter::{Error, Reader};
use ferry_plugin_sdk::io::{ReadAt, read_exact_at};

use crate::stream;

/// The magic at offset 0 of a sparse extent ("KDMV" as stored).
pub const MAGIC: &[u8; 4] = b"KDMV";
/// Bytes per sector: every offset and size in a VMDK counts sectors.
pub const SECTOR: u64 = 512;
/// `gdOffset` of a streamOptimized header whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Largest virtual disk accepted (64 TiB).
pub const MAX_CAPACITY_BYTES: u64 = 64 << 40;
/// Largest grain accepted, in sectors (1 MiB; VMware writes 64 KiB grains).
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Most entries in one grain table (VMware always writes 512).
pub const MAX_GTES_PER_GT: u32 = 512;
/// Most grain directory entries (16 MiB of directory; 64 TiB of 64 KiB grains need 2 Mi).
pub const MAX_GD_ENTRIES: u64 = 4 << 20;
/// Largest embedded descriptor accepted, in bytes.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 << 10;
/// Grain tables kept in memory per extent.
const GT_CACHE: usize = 16;

const FLAG_NEWLINE_TEST: u32 = 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;

/// A validated `SparseExtentHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (1, 2 or 3).
    pub version: u32,
    /// Flag bits.
    pub flags: u32,
    /// Virtual size of the extent, in sectors.
    pub capacity: u64,
    /// Grain size, in sectors (a power of two).
    pub grain_size: u64,
    /// Embedded descriptor start, in sectors (0: none).
    pub descriptor_offset: u64,
    /// Embedded descriptor size, in sectors.
    pub descriptor_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Redundant grain directory, in sectors (not used: the primary one is read).
    pub rgd_offset: u64,
    /// Grain directory, in sectors ([`GD_AT_END`]: see the footer).
    pub gd_offset: u64,
    /// Metadata size, in sectors.
    pub overhead: u64,
    /// The extent was not closed cleanly.
    pub unclean_shutdown: bool,
    /// 0: none, 1: deflate (zlib).
    pub compress_algorithm: u16,
}

impl Header {
    /// Grains are compressed and preceded by markers (streamOptimized).
    #[must_use]
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// A grain table entry of 1 means a zeroed grain.
    #[must_use]
    pub fn zero_grains(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Grain size in bytes.
    #[must_use]
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Virtual size in bytes.
    #[must_use]
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity * SECTOR
    }

    /// Number of grain directory entries the capacity needs.
    #[must_use]
    pub fn gd_entries(&self) -> u64 {
        let grains = self.capacity.div_ceil(self.grain_size);
        grains.div_ceil(u64::from(self.gtes_per_gt))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Parse and validate a `SparseExtentHeader` (its first 512 bytes). `name` names the file in
/// errors.
///
/// # Errors
/// [`Error::Invalid`] naming the file and the field; [`Error::Unsupported`] for an unknown
/// compression algorithm or compressed grains without markers.
pub fn parse_header(b: &[u8], name: &str) -> Result<Header, Error> {
    let bad = |what: String| Error::invalid(format!("{name}: sparse header: {what}"));
    if b.len() < 512 {
        return Err(bad(format!(
            "{} bytes, shorter than the 512-byte header",
            b.len()
        )));
    }
    if &b[0..4] != MAGIC {
        return Err(bad("magic is not KDMV".to_owned()));
    }
    let h = Header {
        version: u32_at(b, 4),
        flags: u32_at(b, 8),
        capacity: u64_at(b, 12),
        grain_size: u64_at(b, 20),
        descriptor_offset: u64_at(b, 28),
        descriptor_size: u64_at(b, 36),
        gtes_per_gt: u32_at(b, 44),
        rgd_offset: u64_at(b, 48),
        gd_offset: u64_at(b, 56),
        overhead: u64_at(b, 64),
        unclean_shutdown: b[72] != 0,
        compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
    };
    if !(1..=3).contains(&h.version) {
        return Err(bad(format!("version {} (expected 1, 2 or 3)", h.version)));
    }
    if h.flags & FLAG_NEWLINE_TEST != 0 && &b[73..77] != b"\n \r\n" {
        return Err(bad(
            "newline check bytes are damaged (was the file transferred in text mode?)".to_owned(),
        ));
    }
    if h.capacity == 0 || h.capacity > MAX_CAPACITY_BYTES / SECTOR {
        return Err(bad(format!(
            "capacity {} sectors is zero or over the 64 TiB limit",
            h.capacity
        )));
    }
    if !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS {
        return Err(bad(format!(
            "grainSize {} sectors is not a power of two of at most {MAX_GRAIN_SECTORS}",
            h.grain_size
        )));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
        return Err(bad(format!(
            "numGTEsPerGT {} is not within 1..={MAX_GTES_PER_GT}",
            h.gtes_per_gt
        )));
    }
    if h.descriptor_size > MAX_DESCRIPTOR_BYTES / SECTOR {
        return Err(bad(format!(
            "descriptorSize {} sectors is over the {MAX_DESCRIPTOR_BYTES}-byte limit",
            h.descriptor_size
        )));
    }
    if h.compressed() {
        if h.compress_algorithm != 1 {
            return Err(Error::unsupported(format!(
                "{name}: sparse header: compressAlgorithm {} (only 1, deflate, is supported)",
                h.compress_algorithm
            )));
        }
        if h.flags & FLAG_MARKERS == 0 {
            return Err(Error::unsupported(format!(
                "{name}: sparse header: compressed grains without markers"
            )));
        }
    }
    if h.gd_entries() > MAX_GD_ENTRIES {
        return Err(bad(format!(
            "a grain directory of {} entries is over the limit of {MAX_GD_ENTRIES}",
            h.gd_entries()
        )));
    }
    Ok(h)
}

/// What a byte of a sparse extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// No grain: reads as zeros.
    Unallocated,
    /// A zeroed grain.
    Zero,
    /// Stored as is at this byte offset of the extent file.
    Stored(u64),
    /// Inside this compressed grain (index of the grain in the extent).
    Compressed(u64),
}

/// An opened sparse extent file.
pub struct SparseExtent {
    reader: Rc<Reader>,
    name: String,
    file_size: u64,
    header: Header,
    gd: Vec<u32>,
    /// Most recently used grain tables (directory index, entries), newest last.
    tables: RefCell<Vec<(u64, Rc<Vec<u32>>)>>,
}

impl std::fmt::Debug for SparseExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseExtent")
            .field("name", &self.name)
            .field("header", &self.header)
            .field("gd_entries", &self.gd.len())
            .finish_non_exhaustive()
    }
}

/// A byte count already checked to be at most a small bound (the file size or a cap).
pub(crate) fn to_usize(v: u64, name: &str, what: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("{name}: {what} of {v} bytes")))
}

impl SparseExtent {
    /// Open the sparse extent behind `reader`: parse the header (the footer's copy for a
    /// streamOptimized file) and load the grain directory.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the file and the field; I/O errors as the reader fails.
    pub fn open(reader: Rc<Reader>) -> Result<Self, Error> {
        let name = reader.name();
        let file_size = reader.size();
        if file_size < 512 {
            return Err(Error::invalid(format!(
                "{name}: sparse header: the file has {file_size} bytes, fewer than 512"
            )));
        }
        let first = read_exact_at(&*reader, 0, 512)?;
        let mut header = parse_header(&first, &name)?;
        if header.gd_offset == GD_AT_END {
            let footer = stream::read_footer(&*reader, &name)?;
            if footer.capacity != header.capacity || footer.grain_size != header.grain_size {
                return Err(Error::invalid(format!(
                    "{name}: footer: capacity or grainSize differ from the header's"
                )));
            }
            header = footer;
        }
        if header.gd_offset == GD_AT_END {
            return Err(Error::invalid(format!(
                "{name}: footer: gdOffset is GD_AT_END in the footer too"
            )));
        }
        let entries = header.gd_entries();
        let gd_start = header
            .gd_offset
            .checked_mul(SECTOR)
            .filter(|&s| s > 0)
            .ok_or_else(|| {
                Error::invalid(format!("{name}: gdOffset {} is invalid", header.gd_offset))
            })?;
        let gd_bytes = entries * 4;
        if gd_start
            .checked_add(gd_bytes)
            .is_none_or(|end| end > file_size)
        {
            return Err(Error::invalid(format!(
                "{name}: gdOffset {}: the grain directory ({entries} entries) lies past the end \
                 of the file ({file_size} bytes)",
                header.gd_offset
            )));
        }
        let raw = read_exact_at(
            &*reader,
            gd_start,
            to_usize(gd_bytes, &name, "grain directory")?,
        )?;
        let gd = raw.chunks_exact(4).map(|c| u32_at(c, 0)).collect();
        Ok(Self {
            reader,
            name,
            file_size,
            header,
            gd,
            tables: RefCell::new(Vec::new()),
        })
    }

    /// The validated header in use (the footer's for a streamOptimized file).
    #[must_use]
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The file's display name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The embedded descriptor's bytes, if the header points at one.
    ///
    /// # Errors
    /// [`Error::Invalid`] when it lies past the end of the file.
    pub fn embedded_descriptor(&self) -> Result<Option<Vec<u8>>, Error> {
        let h = &self.header;
        if h.descriptor_offset == 0 || h.descriptor_size == 0 {
            return Ok(None);
        }
        let start = h.descriptor_offset.saturating_mul(SECTOR);
        let len = h.descriptor_size * SECTOR;
        if start.checked_add(len).is_none_or(|e| e > self.file_size) {
            return Err(Error::invalid(format!(
                "{}: descriptorOffset {}: the embedded descriptor lies past the end of the file",
                self.name, h.descriptor_offset
            )));
        }
        Ok(Some(read_exact_at(
            &*self.reader,
            start,
            to_usize(len, &self.name, "descriptor")?,
        )?))
    }

    /// The grain table of directory entry `index` (sector `sector`), cached.
    fn table(&self, index: u64, sector: u32) -> Result<Rc<Vec<u32>>, Error> {
        {
            let mut cache = self.tables.borrow_mut();
            if let Some(i) = cache.iter().position(|(k, _)| *k == index) {
                let hit = cache.remove(i);
                let table = Rc::clone(&hit.1);
                cache.push(hit);
                return Ok(table);
            }
        }
        let start = u64::from(sector) * SECTOR;
        let len = u64::from(self.header.gtes_per_gt) * 4;
        if start + len > self.file_size {
            return Err(Error::invalid(format!(
                "{}: grain directory entry {index} (sector {sector}) points past the end of the \
                 file",
                self.name
            )));
        }
        let raw = read_exact_at(
            &*self.reader,
            start,
            to_usize(len, &self.name, "grain table")?,
        )?;
        let table: Rc<Vec<u32>> = Rc::new(raw.chunks_exact(4).map(|c| u32_at(c, 0)).collect());
        let mut cache = self.tables.borrow_mut();
        if cache.len() == GT_CACHE {
            cache.remove(0);
        }
        cache.push((index, Rc::clone(&table)));
        Ok(table)
    }

    /// What byte `pos` (below the capacity) of the extent is, and how many bytes from `pos`
    /// are the same kind of thing (for `Stored`, contiguous in the file; for `Compressed`, the
    /// rest of the grain).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a grain table or grain past the end of the file.
    pub fn at(&self, pos: u64) -> Result<(Slot, u64), Error> {
        let h = &self.header;
        let cap = h.capacity_bytes();
        if pos >= cap {
            return Err(Error::out_of_range(format!(
                "{}: offset {pos} is past the extent's capacity of {cap} bytes",
                self.name
            )));
        }
        let grain_bytes = h.grain_bytes();
        let grain = pos / grain_bytes;
        let per_gt = u64::from(h.gtes_per_gt);
        let gd_index = grain / per_gt;
        let first_in_gt = gd_index * per_gt;
        let gt_end = ((first_in_gt + per_gt) * grain_bytes).min(cap);
        let Some(&gde) = self.gd.get(to_usize(gd_index, &self.name, "grain index")?) else {
            return Err(Error::invalid(format!(
                "{}: grain {grain} is past the grain directory",
                self.name
            )));
        };
        if gde == 0 {
            return Ok((Slot::Unallocated, gt_end - pos));
        }
        let table = self.table(gd_index, gde)?;
        let e = to_usize(grain - first_in_gt, &self.name, "grain index")?;
        let gte = table[e];
        let grain_start = grain * grain_bytes;
        let grain_end = (grain_start + grain_bytes).min(cap);
        let simple = |v: u32| -> Option<Slot> {
            match v {
                0 => Some(Slot::Unallocated),
                1 if h.zero_grains() => Some(Slot::Zero),
                _ => None,
            }
        };
        if let Some(slot) = simple(gte) {
            // Extend over the following entries of the same kind in this table.
            let same = table[e + 1..]
                .iter()
                .take_while(|&&v| simple(v) == Some(slot))
                .count() as u64;
            let end = (grain_end + same * grain_bytes).min(gt_end);
            return Ok((slot, end - pos));
        }
        if h.compressed() {
            return Ok((Slot::Compressed(grain), grain_end - pos));
        }
        let file_start = u64::from(gte) * SECTOR;
        if file_start + (grain_end - grain_start) > self.file_size {
            return Err(Error::invalid(format!(
                "{}: grain table entry for grain {grain} (sector {gte}) points past the end of \
                 the file",
                self.name
            )));
        }
        Ok((
            Slot::Stored(file_start + (pos - grain_start)),
            grain_end - pos,
        ))
    }

    /// The bytes of compressed grain `grain` (its part below the capacity at least).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad marker or deflate stream, or a grain past the end of the
    /// file.
    pub fn compressed_grain(&self, grain: u64) -> Result<Vec<u8>, Error> {
        let h = &self.header;
        let per_gt = u64::from(h.gtes_per_gt);
        let gd_index = grain / per_gt;
        let gde = self
            .gd
            .get(to_usize(gd_index, &self.name, "grain index")?)
            .copied()
            .unwrap_or(0);
        if gde == 0 {
            return Err(Error::invalid(format!(
                "{}: grain {grain} has no grain table",
                self.name
            )));
        }
        let table = self.table(gd_index, gde)?;
        let gte = table[to_usize(grain - gd_index * per_gt, &self.name, "grain index")?];
        let grain_start = grain * h.grain_bytes();
        let needed = h.grain_bytes().min(h.capacity_bytes() - grain_start);
        stream::read_grain(
            &*self.reader,
            &self.name,
            u64::from(gte) * SECTOR,
            grain * h.grain_size,
            to_usize(h.grain_bytes(), &self.name, "grain")?,
            to_usize(needed, &self.name, "grain")?,
        )
    }
}
