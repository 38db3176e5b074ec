//! VHDX dynamic (MS-VHDX v1.0): the format of Hyper-V (Windows Server 2012 and later) and of
//! Azure Stack HCI, read by `qemu-img` too.
//!
//! Why this layout: it is the layout Hyper-V and qemu write themselves (1 MiB header section,
//! a 1 MiB log, the metadata region, the BAT, then payload blocks), with everything known up
//! front written by [`VhdxWriter::new`]: both headers (CRC-32C, sequence numbers 1 and 2, the
//! log GUID zero: the log is empty and its 1 MiB region a hole), both region tables, the
//! metadata and the whole BAT. Payload blocks are appended at the end of the file as the first
//! non-zero data of a block arrives (state `PAYLOAD_BLOCK_FULLY_PRESENT`, its BAT entry
//! written in place), and the parts of an allocated block no chunk wrote stay file holes,
//! which read as zeros. A block that only ever sees zero chunks or all-zero 64 KiB clusters is
//! never allocated: its BAT entry keeps the state `PAYLOAD_BLOCK_ZERO` it was given up front
//! (the specification leaves the contents of a `NOT_PRESENT` block of a dynamic disk
//! undefined, so `ZERO` is the state that guarantees zeros to every reader). The sector
//! bitmap entries, one after every `chunk ratio` payload entries, stay `SB_BLOCK_NOT_PRESENT`
//! (0), as a disk without a parent requires. The file identifier, which makes the file a
//! VHDX, is written last, by [`FormatWriter::finish`], with the file's length (the end of the
//! last allocated block).
//!
//! Block size: the vault's chunk size, at least 1 MiB (the specification's minimum), so 1, 2
//! or 4 MiB. Small blocks are what Microsoft recommends for Linux guests (a file system that
//! spreads its metadata over the disk allocates far less of a dynamic VHDX than with the
//! 32 MiB default), and with blocks of one or more whole chunks a zero chunk never allocates
//! anything. The BAT (8 bytes per block, written up front: 8 MiB for a 1 TiB disk with 1 MiB
//! blocks, 512 MiB at the 64 TiB maximum) lives in the file only: allocating a block takes a
//! small lock, reads the block's BAT entry back from the file and, if the block is new,
//! reserves the next block at the end of the file and writes the entry. Several chunks share
//! a block when chunks are smaller than 1 MiB; the lock is what keeps them from allocating it
//! twice.
//!
//! Memory: nothing proportional to the disk (one 1 MiB buffer while the BAT is written).
//!
//! File layout (integers little-endian; GUIDs in Microsoft's mixed-endian layout):
//!
//! ```text
//! 0        file type identifier: "vhdxfile", creator (UTF-16LE, 512 bytes)
//! 64 KiB   header 1, 128 KiB header 2 (4 KiB each, CRC-32C over the 4 KiB):
//!    0  4  "head"        4  4  checksum       8  8  sequence number (1, then 2: header 2
//!                                                    is current)
//!   16 16  file write GUID                   32 16  data write GUID
//!   48 16  log GUID 0 (no log entries)       64  2  log version 0    66  2  version 1
//!   68  4  log length 1 MiB                  72  8  log offset 1 MiB
//! 192 KiB  region table 1, 256 KiB region table 2 (64 KiB each, CRC-32C over the 64 KiB):
//!    0  4  "regi"        4  4  checksum       8  4  entries 2
//!   16 32  BAT:      GUID 2DC27766-F623-4200-9D64-115E9BFD4A08, offset 3 MiB, length,
//!                    required
//!   48 32  metadata: GUID 8B7CA206-4790-4B9A-B8FE-575F050F886E, offset 2 MiB, 1 MiB,
//!                    required
//! 1 MiB    log (1 MiB, empty: a hole)
//! 2 MiB    metadata region: table ("metadata", 5 entries of GUID, offset, length, flags),
//!          then at 64 KiB: file parameters (block size, flags 0: dynamic, no parent),
//!          virtual disk size, virtual disk id (SCSI page 83: a random GUID), logical sector
//!          size 512, physical sector size 4096 (what Hyper-V and qemu write)
//! 3 MiB    BAT: one 8-byte entry per payload block, a sector bitmap entry after every
//!          `chunk ratio = 2^23 × 512 / block size` of them; entry = file offset (a multiple
//!          of 1 MiB) | state (2 ZERO, 6 FULLY_PRESENT; 0 for sector bitmap entries);
//!          rounded up to a MiB
//! then     payload blocks, in the order their first data arrived
//! ```

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, PoisonError};

use super::{CLUSTER, FormatWriter, Output, nonzero_runs};
use crate::error::{Result, StoreError};
use crate::restore::{ChunkSink, chunk_span};

/// 1 MiB: the alignment of regions and payload blocks, and the smallest block.
pub const MIB: u64 = 1 << 20;
/// Header 1's offset; header 2 follows 64 KiB later.
pub const HEADER1: u64 = 64 << 10;
/// Header 2's offset.
pub const HEADER2: u64 = 128 << 10;
/// The bytes of a header its checksum covers.
pub const HEADER_LEN: usize = 4 << 10;
/// Region table 1's offset; region table 2 follows 64 KiB later.
pub const REGION1: u64 = 192 << 10;
/// Region table 2's offset.
pub const REGION2: u64 = 256 << 10;
/// The bytes of a region table its checksum covers.
pub const REGION_LEN: usize = 64 << 10;
/// The log's offset and length.
pub const LOG_OFFSET: u64 = MIB;
/// The log's length (empty, its GUID zero).
pub const LOG_LEN: u64 = MIB;
/// The metadata region's offset.
pub const METADATA_OFFSET: u64 = 2 * MIB;
/// The metadata region's length.
pub const METADATA_LEN: u64 = MIB;
/// Offset of the metadata items inside the metadata region (the specification's minimum).
pub const ITEMS_AT: u64 = 64 << 10;
/// The BAT region's offset.
pub const BAT_OFFSET: u64 = 3 * MIB;
/// Logical sector size.
pub const LOGICAL_SECTOR: u64 = 512;
/// Physical sector size.
pub const PHYSICAL_SECTOR: u32 = 4096;
/// The largest virtual disk the specification allows: 64 TiB.
pub const MAX_SIZE: u64 = 64 << 40;
/// The largest block size the specification allows.
const MAX_BLOCK: u64 = 256 * MIB;
/// Payload state: the block reads as zeros; no space in the file.
pub const PAYLOAD_BLOCK_ZERO: u64 = 2;
/// Payload state: the block is in the file at the entry's offset.
pub const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
/// The state bits of a BAT entry.
const STATE_MASK: u64 = 7;
/// The file-offset bits of a BAT entry (FileOffsetMB, bits 20..64).
const OFFSET_MASK: u64 = !(MIB - 1);

/// A GUID in the on-disk layout: `d1`, `d2`, `d3` little-endian, then `d4` as is.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// Region: the block allocation table.
pub const BAT_GUID: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Region: the metadata.
pub const METADATA_GUID: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// Metadata item: file parameters.
pub const FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Metadata item: virtual disk id (SCSI page 83 data).
pub const VIRTUAL_DISK_ID: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);

/// Metadata entry flag: a virtual disk item (not a file item).
const IS_VIRTUAL_DISK: u32 = 2;
/// Metadata entry flag: a reader must understand the item to open the file.
const IS_REQUIRED: u32 = 4;

/// CRC-32C (Castagnoli), as VHDX checksums use it.
pub fn crc32c(data: &[u8]) -> u32 {
    let c = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data);
    u32::try_from(c).expect("a CRC-32 fits 32 bits")
}

/// Fills the checksum field (bytes 4..8) of a header or region table.
fn seal(buf: &mut [u8]) {
    buf[4..8].fill(0);
    let c = crc32c(buf);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
}

/// A random (version 4) GUID.
fn random_guid() -> [u8; 16] {
    let mut g = crate::crypto::random_bytes::<16>();
    g[7] = (g[7] & 0x0F) | 0x40; // the high byte of the little-endian third field
    g[8] = (g[8] & 0x3F) | 0x80;
    g
}

/// The checked shape of a VHDX export.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Virtual size: the disk's, rounded up to a logical sector.
    pub vsize: u64,
    /// Payload block size.
    pub block: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// BAT entries (payload and sector bitmap).
    pub bat_entries: u64,
    /// The BAT region's length (a whole MiB).
    pub bat_len: u64,
}

impl Layout {
    /// Refuses an empty disk and one over 64 TiB. The block size is 1 MiB until
    /// [`Layout::for_chunk_size`] says otherwise.
    pub fn new(size: u64, disk: &str) -> Result<Self> {
        let vsize = super::round_up(size, LOGICAL_SECTOR);
        if vsize == 0 {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is empty: a VHDX cannot be 0 bytes"
            )));
        }
        if vsize > MAX_SIZE {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is {size} bytes: too large for VHDX (64 TiB at most)"
            )));
        }
        Ok(Self::shape(vsize, MIB))
    }

    /// This layout with blocks of `cs` bytes (the vault's chunk size), at least 1 MiB.
    pub fn for_chunk_size(&self, cs: u64) -> Self {
        let block = cs.next_power_of_two().clamp(MIB, MAX_BLOCK);
        Self::shape(self.vsize, block)
    }

    fn shape(vsize: u64, block: u64) -> Self {
        let chunk_ratio = (1 << 23) * LOGICAL_SECTOR / block;
        let blocks = vsize.div_ceil(block);
        // MS-VHDX 2.5: a dynamic disk's BAT ends with its last payload entry.
        let bat_entries = blocks + (blocks - 1) / chunk_ratio;
        Self {
            vsize,
            block,
            chunk_ratio,
            bat_entries,
            bat_len: super::round_up(bat_entries * 8, MIB),
        }
    }

    /// The BAT entry of payload block `b`.
    pub fn bat_index(&self, b: u64) -> u64 {
        b + b / self.chunk_ratio
    }

    /// Whether BAT entry `i` is a sector bitmap entry.
    pub fn is_bitmap_entry(&self, i: u64) -> bool {
        i % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// The offset of the first payload block: after the BAT.
    pub fn first_block(&self) -> u64 {
        BAT_OFFSET + self.bat_len
    }
}

/// The file type identifier: the signature and the creator (UTF-16LE).
pub(crate) fn file_identifier() -> Vec<u8> {
    let mut f = vec![0u8; 8 + 512];
    f[0..8].copy_from_slice(b"vhdxfile");
    let creator = concat!("Ferry ", env!("CARGO_PKG_VERSION"));
    for (i, u) in creator.encode_utf16().take(255).enumerate() {
        f[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    f
}

/// A header with sequence number `seq`.
pub(crate) fn header(seq: u64, file_write: [u8; 16], data_write: [u8; 16]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"head");
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..32].copy_from_slice(&file_write);
    h[32..48].copy_from_slice(&data_write);
    // 48..64 log GUID: zero, the log holds nothing to replay. 64..66 log version 0.
    h[66..68].copy_from_slice(&1u16.to_le_bytes());
    let log_len = u32::try_from(LOG_LEN).expect("1 MiB");
    h[68..72].copy_from_slice(&log_len.to_le_bytes());
    h[72..80].copy_from_slice(&LOG_OFFSET.to_le_bytes());
    seal(&mut h);
    h
}

/// The region table: the BAT and the metadata, both required.
pub(crate) fn region_table(layout: &Layout) -> Vec<u8> {
    let mut r = vec![0u8; REGION_LEN];
    r[0..4].copy_from_slice(b"regi");
    r[8..12].copy_from_slice(&2u32.to_le_bytes());
    let bat_len = u32::try_from(layout.bat_len).expect("a 64 TiB disk's BAT is under 4 GiB");
    let metadata_len = u32::try_from(METADATA_LEN).expect("1 MiB");
    for (i, (id, offset, len)) in [
        (BAT_GUID, BAT_OFFSET, bat_len),
        (METADATA_GUID, METADATA_OFFSET, metadata_len),
    ]
    .into_iter()
    .enumerate()
    {
        let e = &mut r[16 + 32 * i..48 + 32 * i];
        e[0..16].copy_from_slice(&id);
        e[16..24].copy_from_slice(&offset.to_le_bytes());
        e[24..28].copy_from_slice(&len.to_le_bytes());
        e[28..32].copy_from_slice(&1u32.to_le_bytes()); // required
    }
    seal(&mut r);
    r
}

/// The start of the metadata region: the table, then the items from [`ITEMS_AT`].
pub(crate) fn metadata(layout: &Layout, disk_id: [u8; 16]) -> Vec<u8> {
    let block = u32::try_from(layout.block).expect("blocks are at most 256 MiB");
    let items: [([u8; 16], u32, Vec<u8>); 5] = [
        (FILE_PARAMETERS, IS_REQUIRED, {
            // Block size, then flags 0: LeaveBlockAllocated 0 (dynamic), HasParent 0.
            let mut p = block.to_le_bytes().to_vec();
            p.extend_from_slice(&0u32.to_le_bytes());
            p
        }),
        (
            VIRTUAL_DISK_SIZE,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            layout.vsize.to_le_bytes().to_vec(),
        ),
        (
            VIRTUAL_DISK_ID,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            disk_id.to_vec(),
        ),
        (
            LOGICAL_SECTOR_SIZE,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            u32::try_from(LOGICAL_SECTOR)
                .expect("512")
                .to_le_bytes()
                .to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            IS_VIRTUAL_DISK | IS_REQUIRED,
            PHYSICAL_SECTOR.to_le_bytes().to_vec(),
        ),
    ];
    let at = usize::try_from(ITEMS_AT).expect("64 KiB");
    let mut m = vec![0u8; at];
    m[0..8].copy_from_slice(b"metadata");
    m[10..12].copy_from_slice(&5u16.to_le_bytes());
    for (i, (id, flags, data)) in items.iter().enumerate() {
        let offset = u32::try_from(m.len()).expect("items are within 64 KiB + 40 bytes");
        let len = u32::try_from(data.len()).expect("a few bytes");
        let e = &mut m[32 + 32 * i..64 + 32 * i];
        e[0..16].copy_from_slice(id);
        e[16..20].copy_from_slice(&offset.to_le_bytes());
        e[20..24].copy_from_slice(&len.to_le_bytes());
        e[24..28].copy_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(data);
    }
    m
}

/// Writes everything up front and appends payload blocks as data arrives; see the module
/// docs.
#[derive(Debug)]
pub(crate) struct VhdxWriter {
    out: Output,
    size: u64,
    cs: u64,
    layout: Layout,
    /// The output opened again for reading: BAT entries are read back from the file.
    reader: File,
    /// The next free offset of the file (the end of the last block); the lock that
    /// allocates blocks.
    next: Mutex<u64>,
}

impl VhdxWriter {
    /// Writes the headers, the region tables, the metadata and the BAT (every payload block
    /// `ZERO`) into `out`, a new empty file.
    pub fn new(out: Output, size: u64, cs: u64, layout: Layout) -> Result<Self> {
        let layout = layout.for_chunk_size(cs);
        let reader = File::open(&out.path).map_err(|e| out.io(e))?;
        let file_write = random_guid();
        let data_write = random_guid();
        out.write_at(&header(1, file_write, data_write), HEADER1)?;
        out.write_at(&header(2, file_write, data_write), HEADER2)?;
        let rt = region_table(&layout);
        out.write_at(&rt, REGION1)?;
        out.write_at(&rt, REGION2)?;
        out.write_at(&metadata(&layout, random_guid()), METADATA_OFFSET)?;
        // The BAT, 1 MiB at a time: ZERO for payload entries, 0 for sector bitmap entries.
        let per = MIB / 8;
        let mut buf = Vec::with_capacity(usize::try_from(MIB).expect("1 MiB"));
        let mut first = 0;
        while first < layout.bat_entries {
            let n = per.min(layout.bat_entries - first);
            buf.clear();
            for i in first..first + n {
                let e = if layout.is_bitmap_entry(i) {
                    0
                } else {
                    PAYLOAD_BLOCK_ZERO
                };
                buf.extend_from_slice(&e.to_le_bytes());
            }
            out.write_at(&buf, BAT_OFFSET + first * 8)?;
            first += n;
        }
        Ok(Self {
            next: Mutex::new(layout.first_block()),
            out,
            size,
            cs,
            layout,
            reader,
        })
    }

    /// The file offset of payload block `b`, allocated at the end of the file on first use.
    fn block_offset(&self, b: u64) -> Result<u64> {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let at = BAT_OFFSET + self.layout.bat_index(b) * 8;
        let mut e = [0u8; 8];
        self.reader
            .read_exact_at(&mut e, at)
            .map_err(|source| self.out.io(source))?;
        let e = u64::from_le_bytes(e);
        if e & STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT {
            return Ok(e & OFFSET_MASK);
        }
        let host = *next;
        self.out
            .write_at(&(host | PAYLOAD_BLOCK_FULLY_PRESENT).to_le_bytes(), at)?;
        *next += self.layout.block;
        Ok(host)
    }
}

impl ChunkSink for VhdxWriter {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        let block = self.layout.block;
        for &index in indexes {
            let data = &plain[..chunk_span(self.size, self.cs, index, plain.len())];
            let base = index * self.cs;
            for (first, n) in nonzero_runs(data) {
                // Bytes a..end of the chunk, cut at block boundaries.
                let mut a = first * CLUSTER;
                let end = ((first + n) * CLUSTER).min(data.len() as u64);
                while a < end {
                    let v = base + a;
                    let (b, within) = (v / block, v % block);
                    let k = (block - within).min(end - a);
                    let host = self.block_offset(b)?;
                    let from = usize::try_from(a).expect("chunk fits memory");
                    let to = usize::try_from(a + k).expect("chunk fits memory");
                    self.out.write_at(&data[from..to], host + within)?;
                    a += k;
                }
            }
        }
        Ok(())
    }

    fn zeros(&self, _chunks: Range<u64>) -> Result<()> {
        Ok(())
    }
}

impl FormatWriter for VhdxWriter {
    fn finish(&self) -> Result<()> {
        let end = *self.next.lock().unwrap_or_else(PoisonError::into_inner);
        // The file ends with its last block, whole (readers check that it is all there).
        self.out.set_len(end)?;
        // The file identifier last: until it is written the file is no VHDX.
        self.out.write_at(&file_identifier(), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, le32, le64};
    use super::super::{ExportFormat, FormatOptions};
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guids_are_mixed_endian() {
        assert_eq!(
            BAT_GUID,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        let g = random_guid();
        assert_eq!(g[7] >> 4, 4);
        assert_eq!(g[8] >> 6, 2);
    }

    #[test]
    fn layout_interleaves_sector_bitmaps() {
        let l = Layout::new(10 << 30, "d").unwrap();
        assert_eq!((l.block, l.chunk_ratio), (MIB, 4096));
        // Payload entries 0..4096, a bitmap entry, 4096..8192, a bitmap, then 2048 more.
        assert_eq!(l.bat_entries, 10240 + 2);
        assert_eq!(l.bat_index(4095), 4095);
        assert_eq!(l.bat_index(4096), 4097);
        assert!(l.is_bitmap_entry(4096) && l.is_bitmap_entry(8193));
        assert!(!l.is_bitmap_entry(4095) && !l.is_bitmap_entry(4097));
        assert_eq!(l.bat_len, MIB);
        assert_eq!(l.first_block(), 4 * MIB);
        let l = l.for_chunk_size(4 << 20);
        assert_eq!((l.block, l.chunk_ratio), (4 * MIB, 1024));
        assert_eq!(l.bat_entries, 2560 + 2);
        assert_eq!(Layout::new(1, "d").unwrap().vsize, 512);
        assert_eq!(Layout::new(1, "d").unwrap().bat_entries, 1);
        // The 64 TiB maximum: 64 Mi payload entries and their bitmaps fit a 32-bit length.
        let max = Layout::new(MAX_SIZE, "d").unwrap();
        assert_eq!(max.bat_entries, (64 << 20) + (64 << 20) / 4096 - 1);
        assert!(u32::try_from(max.bat_len).is_ok());
        assert!(Layout::new(MAX_SIZE + 1, "d").is_err());
        assert!(Layout::new(0, "d").is_err());
    }

    /// Reads a VHDX file back, checking every checksum and structure on the way: the disk
    /// it describes and the number of allocated blocks.
    fn decode(f: &[u8]) -> (Vec<u8>, usize) {
        assert_eq!(&f[0..8], b"vhdxfile");
        let creator: Vec<u16> = f[8..520]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        assert!(String::from_utf16(&creator).unwrap().starts_with("Ferry "));
        // Headers: both valid, sequence numbers 1 and 2, no log.
        for (at, seq) in [(HEADER1, 1), (HEADER2, 2)] {
            let h = &f[at as usize..at as usize + HEADER_LEN];
            assert_eq!(&h[0..4], b"head");
            let mut z = h.to_vec();
            z[4..8].fill(0);
            assert_eq!(le32(h, 4), crc32c(&z), "header checksum");
            assert_eq!(le64(h, 8), seq);
            assert!(h[48..64].iter().all(|&b| b == 0), "log GUID");
            assert_eq!(u16::from_le_bytes([h[64], h[65]]), 0);
            assert_eq!(u16::from_le_bytes([h[66], h[67]]), 1);
            assert_eq!(u64::from(le32(h, 68)), LOG_LEN);
            assert_eq!(le64(h, 72), LOG_OFFSET);
        }
        assert_eq!(f[HEADER1 as usize + 16..HEADER1 as usize + 48], {
            let h2 = HEADER2 as usize;
            f[h2 + 16..h2 + 48].to_vec()
        });
        // Region tables: identical, valid, BAT and metadata required.
        let rt = &f[REGION1 as usize..REGION1 as usize + REGION_LEN];
        assert_eq!(rt, &f[REGION2 as usize..REGION2 as usize + REGION_LEN]);
        assert_eq!(&rt[0..4], b"regi");
        let mut z = rt.to_vec();
        z[4..8].fill(0);
        assert_eq!(le32(rt, 4), crc32c(&z), "region table checksum");
        assert_eq!(le32(rt, 8), 2);
        let region = |id: [u8; 16]| {
            let e = (0..2)
                .map(|i| &rt[16 + 32 * i..48 + 32 * i])
                .find(|e| e[0..16] == id)
                .unwrap();
            assert_eq!(le32(e, 28), 1);
            (le64(e, 16) as usize, le32(e, 24) as usize)
        };
        let (bat_off, bat_len) = region(BAT_GUID);
        let (md_off, md_len) = region(METADATA_GUID);
        assert_eq!((bat_off % (1 << 20), bat_len % (1 << 20)), (0, 0));
        assert_eq!((md_off % (1 << 20), md_len % (1 << 20)), (0, 0));
        // Metadata.
        let md = &f[md_off..md_off + md_len];
        assert_eq!(&md[0..8], b"metadata");
        assert_eq!(u16::from_le_bytes([md[10], md[11]]), 5);
        let item = |id: [u8; 16], flags: u32| {
            let e = (0..5)
                .map(|i| &md[32 + 32 * i..64 + 32 * i])
                .find(|e| e[0..16] == id)
                .unwrap();
            assert_eq!(le32(e, 24), flags);
            let (o, n) = (le32(e, 16) as usize, le32(e, 20) as usize);
            assert!(o >= 65536);
            &md[o..o + n]
        };
        let params = item(FILE_PARAMETERS, 4);
        let block = le32(params, 0) as usize;
        assert_eq!(le32(params, 4), 0, "dynamic, no parent");
        assert!(block.is_power_of_two() && (1 << 20..=256 << 20).contains(&block));
        let vsize = le64(item(VIRTUAL_DISK_SIZE, 6), 0) as usize;
        assert_eq!(item(VIRTUAL_DISK_ID, 6).len(), 16);
        assert_eq!(le32(item(LOGICAL_SECTOR_SIZE, 6), 0), 512);
        assert_eq!(le32(item(PHYSICAL_SECTOR_SIZE, 6), 0), 4096);
        // BAT.
        let ratio = (1usize << 23) * 512 / block;
        let blocks = vsize.div_ceil(block);
        let entries = blocks + (blocks - 1) / ratio;
        assert!(entries * 8 <= bat_len);
        let mut disk = vec![0u8; vsize];
        let mut used = std::collections::BTreeSet::new();
        for i in 0..entries {
            let e = le64(f, bat_off + 8 * i);
            if i % (ratio + 1) == ratio {
                assert_eq!(e, 0, "sector bitmap entry {i}");
                continue;
            }
            let b = i - i / (ratio + 1);
            match e & 7 {
                2 => assert_eq!(e, 2, "ZERO entries have no offset"),
                6 => {
                    let host = (e & !0xF_FFFF) as usize;
                    assert_eq!(e & 0xF_FFF8, 0, "reserved bits");
                    assert!(host >= bat_off + bat_len, "block {b} after the BAT");
                    assert!(host + block <= f.len(), "block {b} inside the file");
                    assert!(used.insert(host), "block {b}'s space used once");
                    let n = block.min(vsize - b * block);
                    disk[b * block..b * block + n].copy_from_slice(&f[host..host + n]);
                }
                s => panic!("state {s} of payload entry {i}"),
            }
        }
        // Blocks are packed after the BAT; the file ends with the last.
        assert_eq!(f.len(), bat_off + bat_len + used.len() * block);
        (disk, used.len())
    }

    async fn roundtrip(chunk_size: u32, size: u64) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = testkit::export(
            dir.path(),
            chunk_size,
            size,
            FormatOptions {
                format: ExportFormat::Vhdx,
                vhd_round_up: false,
            },
        )
        .await;
        let file = std::fs::read(&out).unwrap();
        let (disk, blocks) = decode(&file);
        let raw = std::fs::read(&src).unwrap();
        assert_eq!(disk.len() as u64, size.div_ceil(512) * 512);
        assert_eq!(&disk[..raw.len()], &raw[..]);
        assert!(disk[raw.len()..].iter().all(|&b| b == 0));
        blocks
    }

    #[tokio::test]
    async fn small_chunks_share_blocks() {
        // 64 KiB chunks, 16 to a 1 MiB block, arriving in any order; a size that is not a
        // whole sector nor a whole block. Data in clusters 0..=9 (block 0), 20..=23 (block 1)
        // and the tail (block 2).
        assert_eq!(roundtrip(64 << 10, (40 << 16) + 1001).await, 3);
    }

    #[tokio::test]
    async fn large_disk_with_zero_blocks() {
        // 1 MiB chunks and blocks, 601 of them: data in blocks 0, 1 (clusters 20..=23), 32
        // (cluster 513), 511 and 512 (clusters 8191..=8193) and the last; the other 595 stay
        // ZERO, and the zero cluster 1 inside block 0 is a hole.
        assert_eq!(roundtrip(1 << 20, (600 << 20) + 4096).await, 6);
    }

    #[tokio::test]
    async fn four_mib_chunks_make_four_mib_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (_, out) = testkit::export(
            dir.path(),
            4 << 20,
            (9 << 20) + 512,
            FormatOptions {
                format: ExportFormat::Vhdx,
                vhd_round_up: false,
            },
        )
        .await;
        let f = std::fs::read(&out).unwrap();
        let (_, blocks) = decode(&f);
        // Block 0 (data at the start) and block 2 (the tail).
        assert_eq!(blocks, 2);
        let md = METADATA_OFFSET as usize + ITEMS_AT as usize;
        assert_eq!(le32(&f, md), 4 << 20);
    }
}
