//! VHD (Microsoft Virtual Hard Disk Image Format Specification): the parser for Hyper-V's and
//! Virtual PC's older format.
//!
//! It exists to turn a VHD into a [`Layer`]. All fields are big-endian. A fixed VHD is the raw
//! disk followed by a 512-byte footer. A dynamic or differencing VHD starts with a copy of the
//! footer, has a dynamic header at the footer's data offset, a BAT of 32-bit sector numbers
//! (`0xFFFFFFFF`: unallocated), and blocks that each begin with a sector bitmap (one bit per
//! 512-byte sector, most significant bit first). In a differencing VHD a set bit means the
//! sector is in the child, a clear one that it is in the parent. Like qemu and Hyper-V, the
//! bitmap of a dynamic (non-differencing) VHD is not consulted: an allocated block is read
//! whole.

use std::cell::RefCell;

use ferry_plugin_sdk::adapter::{Error, Reader};
use ferry_plugin_sdk::io::ReadAt;

use crate::common::{
    Layer, MAX_VIRTUAL_SIZE, Seg, be32, be64, guid_at, parent_file_name, read_checked, utf16,
};

/// Footer and dynamic header disk types.
pub(crate) const TYPE_FIXED: u32 = 2;
pub(crate) const TYPE_DYNAMIC: u32 = 3;
pub(crate) const TYPE_DIFFERENCING: u32 = 4;

/// Parent locator platform codes this parser reads.
pub(crate) const W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub(crate) const W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub(crate) const MACX: u32 = u32::from_be_bytes(*b"MacX");

/// Largest parent locator payload read (a path).
const MAX_LOCATOR: u64 = 64 << 10;

/// Whether `header` (the first bytes of an object) starts like a dynamic or differencing VHD
/// (the footer copy at offset 0), or is a whole small fixed VHD (its footer in the last 512
/// bytes of a header shorter than the probe window). A larger fixed VHD has its footer only at
/// the end, which `probe` cannot see: `open` accepts it anyway.
pub fn probe(header: &[u8]) -> bool {
    if header.starts_with(b"conectix") {
        return true;
    }
    header.len() >= 512
        && header.len() < ferry_plugin_sdk::adapter::MAX_PROBE_HEADER
        && footer_ok(&header[header.len() - 512..])
}

/// The VHD checksum: one's complement of the byte sum, the checksum field taken as zero.
pub(crate) fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

fn footer_ok(b: &[u8]) -> bool {
    b.len() >= 512 && b.starts_with(b"conectix") && be32(b, 64) == checksum(&b[..512], 64)
}

/// An opened VHD file.
#[derive(Debug)]
pub(crate) struct Vhd {
    reader: Reader,
    name: String,
    pub disk_type: u32,
    pub virtual_size: u64,
    pub unique_id: [u8; 16],
    pub parent_id: [u8; 16],
    /// The parent's file name and the field it came from.
    pub parent: Option<(String, &'static str)>,
    block_size: u64,
    /// Bytes of the sector bitmap before each block (rounded up to a sector).
    bitmap_size: u64,
    bat: Vec<u32>,
    bitmap: RefCell<Option<(u64, Vec<u8>)>>,
}

impl Vhd {
    /// Open and validate a VHD.
    pub(crate) fn open(reader: Reader) -> Result<Vhd, Error> {
        let name = reader.name();
        let size = reader.size();
        let invalid = |m: String| Error::invalid(format!("{name}: {m}"));
        if size < 512 {
            return Err(invalid(format!(
                "file of {size} bytes is too small for a VHD footer"
            )));
        }
        let end_footer = read_checked(&reader, size - 512, 512, "footer")?;
        let (footer, at_end) = if footer_ok(&end_footer) {
            (end_footer, true)
        } else {
            let copy = read_checked(&reader, 0, 512, "footer copy")?;
            if !footer_ok(&copy) {
                return Err(invalid(
                    "no valid footer (neither the last 512 bytes nor the copy at offset 0 have the `conectix` cookie and a good checksum)".into(),
                ));
            }
            (copy, false)
        };
        let version = be32(&footer, 12);
        if version >> 16 != 1 {
            return Err(Error::unsupported(format!(
                "{name}: footer file format version {version:#x} is not 1.x"
            )));
        }
        let virtual_size = be64(&footer, 48);
        if virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(512) {
            return Err(invalid(format!(
                "footer current size {virtual_size} is over 64 TiB or not a multiple of 512"
            )));
        }
        let disk_type = be32(&footer, 60);
        let unique_id = guid_at(&footer, 68);
        let mut vhd = Vhd {
            reader,
            name: name.clone(),
            disk_type,
            virtual_size,
            unique_id,
            parent_id: [0; 16],
            parent: None,
            block_size: 0,
            bitmap_size: 0,
            bat: Vec::new(),
            bitmap: RefCell::new(None),
        };
        match disk_type {
            TYPE_FIXED => {
                if !at_end || virtual_size > size - 512 {
                    return Err(invalid(format!(
                        "fixed disk of current size {virtual_size} needs {} bytes, the file has {size}",
                        virtual_size + 512
                    )));
                }
                Ok(vhd)
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => {
                vhd.open_dynamic(&footer, if at_end { size - 512 } else { size })?;
                Ok(vhd)
            }
            t => Err(Error::unsupported(format!(
                "{name}: footer disk type {t} is not fixed (2), dynamic (3) or differencing (4)"
            ))),
        }
    }

    fn open_dynamic(&mut self, footer: &[u8], data_end: u64) -> Result<(), Error> {
        let name = self.name.clone();
        let invalid = |m: String| Error::invalid(format!("{name}: {m}"));
        let at = be64(footer, 16);
        let h = read_checked(&self.reader, at, 1024, "dynamic header")?;
        if !h.starts_with(b"cxsparse") || be32(&h, 36) != checksum(&h, 36) {
            return Err(invalid(format!(
                "dynamic header at footer data offset {at} lacks the `cxsparse` cookie or a good checksum"
            )));
        }
        let table = be64(&h, 16);
        let max_entries = u64::from(be32(&h, 28));
        let bs = u64::from(be32(&h, 32));
        if !bs.is_power_of_two() || !(512..=(256 << 20)).contains(&bs) {
            return Err(invalid(format!(
                "dynamic header block size {bs} is not a power of two from 512 bytes to 256 MiB"
            )));
        }
        let needed = self.virtual_size.div_ceil(bs);
        if max_entries < needed {
            return Err(invalid(format!(
                "dynamic header max table entries {max_entries} is under the {needed} blocks of the disk"
            )));
        }
        // `read_checked` refuses a table past the end of the file before allocating.
        let raw = read_checked(&self.reader, table, needed * 4, "BAT")?;
        self.bat = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        self.block_size = bs;
        self.bitmap_size = (bs / 512).div_ceil(8).div_ceil(512) * 512;
        for (b, &e) in (0u64..).zip(&self.bat) {
            if e == u32::MAX {
                continue;
            }
            let start = u64::from(e) * 512;
            let len = self.bitmap_size + bs.min(self.virtual_size - b * bs);
            if start + len > data_end {
                return Err(invalid(format!(
                    "BAT entry for block {b}: block at offset {start} ({len} bytes) lies past the end of the data ({data_end} bytes)"
                )));
            }
        }
        if self.disk_type == TYPE_DIFFERENCING {
            self.parent_id = guid_at(&h, 40);
            self.parent = Some(self.parent_name(&h)?);
        }
        Ok(())
    }

    /// The parent's file name: from the W2ru locator, else W2ku, else MacX, else the parent
    /// Unicode name of the dynamic header.
    fn parent_name(&self, h: &[u8]) -> Result<(String, &'static str), Error> {
        let mut found: Vec<(u32, String)> = Vec::new();
        for i in 0..8 {
            let e = 576 + 24 * i;
            let code = be32(h, e);
            if ![W2RU, W2KU, MACX].contains(&code) {
                continue;
            }
            let len = u64::from(be32(h, e + 8));
            let off = be64(h, e + 16);
            if len == 0 {
                continue;
            }
            if len > MAX_LOCATOR {
                return Err(Error::invalid(format!(
                    "{}: parent locator {i} data length {len} is over {MAX_LOCATOR}",
                    self.name
                )));
            }
            let data = read_checked(&self.reader, off, len, "parent locator")?;
            let text = if code == MACX {
                String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_owned()
            } else {
                utf16(&data, false)
            };
            found.push((code, text));
        }
        for (code, field, relative) in [
            (W2RU, "W2ru", true),
            (W2KU, "W2ku", false),
            (MACX, "MacX", false),
        ] {
            if let Some((_, path)) = found.iter().find(|(c, _)| *c == code) {
                return Ok((parent_file_name(&self.name, field, path, relative)?, field));
            }
        }
        let unicode = utf16(h.get(64..576).unwrap_or(&[]), true);
        if unicode.is_empty() {
            return Err(Error::invalid(format!(
                "{}: differencing disk has no W2ru, W2ku or MacX parent locator and no parent unicode name",
                self.name
            )));
        }
        Ok((
            parent_file_name(&self.name, "parent unicode name", &unicode, false)?,
            "parent unicode name",
        ))
    }

    pub(crate) fn format(&self) -> &'static str {
        match self.disk_type {
            TYPE_FIXED => "vhd-fixed",
            TYPE_DYNAMIC => "vhd-dynamic",
            _ => "vhd-differencing",
        }
    }

    fn entry(&self, block: u64) -> u32 {
        usize::try_from(block)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .unwrap_or(u32::MAX)
    }

    fn bitmap(&self, block: u64, sector: u32) -> Result<std::cell::Ref<'_, Vec<u8>>, Error> {
        let cached = matches!(&*self.bitmap.borrow(), Some((b, _)) if *b == block);
        if !cached {
            let bits = read_checked(
                &self.reader,
                u64::from(sector) * 512,
                self.bitmap_size,
                "sector bitmap",
            )?;
            *self.bitmap.borrow_mut() = Some((block, bits));
        }
        Ok(std::cell::Ref::map(self.bitmap.borrow(), |b| {
            &b.as_ref().expect("filled above").1
        }))
    }
}

impl Layer for Vhd {
    fn name(&self) -> &str {
        &self.name
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn segment(&self, offset: u64, end: u64) -> Result<(Seg, u64), Error> {
        if self.disk_type == TYPE_FIXED {
            return Ok((Seg::Data(offset), end - offset));
        }
        let bs = self.block_size;
        let mut block = offset / bs;
        let in_block = offset - block * bs;
        let e = self.entry(block);
        if e == u32::MAX {
            let mut pos = ((block + 1) * bs).min(end);
            while pos < end && self.entry(block + 1) == u32::MAX {
                block += 1;
                pos = ((block + 1) * bs).min(end);
            }
            return Ok((Seg::Absent, pos - offset));
        }
        let data = u64::from(e) * 512 + self.bitmap_size;
        let block_end = ((block + 1) * bs).min(end);
        if self.disk_type == TYPE_DYNAMIC {
            return Ok((Seg::Data(data + in_block), block_end - offset));
        }
        let bits = self.bitmap(block, e)?;
        let bit = |s: u64| {
            usize::try_from(s / 8)
                .ok()
                .and_then(|i| bits.get(i))
                .is_some_and(|b| b & (0x80 >> (s % 8)) != 0)
        };
        let mut s = in_block / 512;
        let set = bit(s);
        s += 1;
        let mut pos = (block * bs + s * 512).min(block_end);
        while pos < block_end && bit(s) == set {
            s += 1;
            pos = (block * bs + s * 512).min(block_end);
        }
        let seg = if set {
            Seg::Data(data + in_block)
        } else {
            Seg::Absent
        };
        Ok((seg, pos - offset))
    }

    fn read_file(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        read_checked(&self.reader, offset, len as u64, "data block")
    }

    fn reader(&self) -> &Reader {
        &self.reader
    }

    fn as_is(&self, _offset: u64, len: u64) -> (bool, u64) {
        // No overlay: every stored byte (a fixed disk, the data sectors of a block; never its
        // sector bitmap) is the file's own.
        (true, len)
    }
}
