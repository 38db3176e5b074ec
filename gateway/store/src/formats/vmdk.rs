//! VMDK monolithicSparse: one file holding a descriptor and a sparse extent, the format
//! VMware Workstation and `qemu-img` read and ESXi imports (`vmkfstools -i`).
//!
//! Why this layout: it is the layout VMware and qemu write themselves (header, embedded
//! descriptor, grain directory, every grain table contiguous after it, then grains), so
//! readers that assume contiguous grain tables work. The grain tables are reserved up front
//! (2 KiB per 32 MiB of disk) but only the entries of allocated grains are ever written, so
//! the rest of the region stays a hole. Grains are appended in the order chunks complete (an
//! atomic sector counter) and their grain table entries written in place; zero chunks and
//! all-zero grains inside a chunk are never allocated (entry 0: reads as zeros). There is no
//! redundant grain directory: header flag bit 1 is clear and `rgdOffset` is 0, as the
//! specification allows. The header, which makes the file a VMDK, is written last.
//!
//! Memory: nothing proportional to the disk; the grain directory is computed and written
//! at `finish` one 64 KiB piece at a time.
//!
//! File layout, sectors of 512 bytes (integers little-endian):
//!
//! ```text
//! sector 0             SparseExtentHeader (512 bytes):
//!    0  4  magic "KDMV"             4  4  version 1
//!    8  4  flags 0x1 (newline detection bytes valid; no redundant grain table)
//!   12  8  capacity (sectors)      20  8  grain size 128 (64 KiB)
//!   28  8  descriptor offset 1     36  8  descriptor size 20 (sectors)
//!   44  4  grain table entries 512 (each table maps 32 MiB)
//!   48  8  redundant GD offset 0   56  8  GD offset
//!   64  8  overhead: the first grain's sector (a multiple of 128)
//!   72  1  unclean shutdown 0      73  4  "\n", " ", "\r", "\n" (newline detection)
//!   77  2  compression 0           79 433 zero
//! sectors 1 .. 21      descriptor: text (createType "monolithicSparse", the extent
//!                      `RW <capacity> SPARSE "<file name>"`, IDE geometry), zero padded
//! sector 21 ..         grain directory: one u32 per grain table, the table's sector
//! then                 grain tables, 4 sectors each, contiguous: one u32 per grain, the
//!                      grain's sector or 0 (unallocated)
//! overhead ..          grains, 128 sectors each, in the order chunks completed
//! ```

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CLUSTER, FormatWriter, Output, nonzero_runs};
use crate::error::{Result, StoreError};
use crate::restore::{ChunkSink, chunk_span};

/// Sector size.
pub const SECTOR: u64 = 512;
/// Grain size in sectors (64 KiB).
pub const GRAIN_SECTORS: u64 = CLUSTER / SECTOR;
/// Entries of a grain table.
pub const GT_ENTRIES: u64 = 512;
/// Sectors of one grain table.
pub const GT_SECTORS: u64 = GT_ENTRIES * 4 / SECTOR;
/// Length of the SparseExtentHeader (one sector).
pub const HEADER_LEN: usize = 512;
/// Descriptor offset and size, in sectors (as qemu writes them).
pub const DESC_OFFSET: u64 = 1;
/// Descriptor size in sectors.
pub const DESC_SECTORS: u64 = 20;

/// The checked shape of a VMDK export.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Capacity in sectors (the disk's size rounded up to a sector).
    pub capacity: u64,
    /// Grain tables.
    pub gts: u64,
    /// Grain directory sector.
    pub gd: u64,
    /// First grain table's sector.
    pub gt: u64,
    /// First grain's sector.
    pub overhead: u64,
    /// The descriptor (text, at most `DESC_SECTORS` sectors).
    pub descriptor: String,
}

impl Layout {
    /// Refuses a disk whose grains could not all be addressed: a sparse extent's grain
    /// table entries are 32-bit sector numbers (2 TiB).
    pub fn new(size: u64, disk: &str, file_name: &str) -> Result<Self> {
        let capacity = size.div_ceil(SECTOR);
        let gts = capacity.div_ceil(GT_ENTRIES * GRAIN_SECTORS).max(1);
        let gd = DESC_OFFSET + DESC_SECTORS;
        let gt = gd + (gts * 4).div_ceil(SECTOR);
        let overhead = super::round_up(gt + gts * GT_SECTORS, GRAIN_SECTORS);
        let end = overhead + super::round_up(capacity, GRAIN_SECTORS);
        if end > u64::from(u32::MAX) {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is {size} bytes: too large for a monolithicSparse VMDK \
                 (grains are addressed by 32-bit sector numbers, under 2 TiB)"
            )));
        }
        let descriptor = descriptor(
            capacity,
            file_name,
            crate::crypto::random_bytes::<4>(),
            "monolithicSparse",
        );
        debug_assert!(descriptor.len() as u64 <= DESC_SECTORS * SECTOR);
        Ok(Self {
            capacity,
            gts,
            gd,
            gt,
            overhead,
            descriptor,
        })
    }
}

/// The embedded descriptor of a sparse disk of `capacity` sectors in the file named
/// `file_name`, with content id `cid`; `create_type` is `monolithicSparse` or
/// `streamOptimized`.
pub fn descriptor(capacity: u64, file_name: &str, cid: [u8; 4], create_type: &str) -> String {
    // The name is quoted in the descriptor: keep it printable and unquoted, and short
    // enough that the descriptor fits its 20 sectors.
    let name: String = file_name
        .chars()
        .take(1024)
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect();
    let mut cid = u32::from_le_bytes(cid);
    if cid == u32::MAX {
        cid = 1; // ffffffff means "no parent"
    }
    let cylinders = capacity.div_ceil(16 * 63).max(1);
    format!(
        "# Disk DescriptorFile\n\
         version=1\n\
         CID={cid:08x}\n\
         parentCID=ffffffff\n\
         createType=\"{create_type}\"\n\
         \n\
         # Extent description\n\
         RW {capacity} SPARSE \"{name}\"\n\
         \n\
         # The Disk Data Base\n\
         #DDB\n\
         \n\
         ddb.virtualHWVersion = \"4\"\n\
         ddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"ide\"\n"
    )
}

/// The SparseExtentHeader.
pub(crate) fn header(layout: &Layout) -> [u8; HEADER_LEN] {
    sparse_header(&SparseHeader {
        version: 1,
        flags: 1,
        capacity: layout.capacity,
        gd: layout.gd,
        overhead: layout.overhead,
        compression: 0,
    })
}

/// The fields of a SparseExtentHeader that differ between monolithicSparse and
/// streamOptimized (the grain size, descriptor and grain table size are the same).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    /// Capacity in sectors.
    pub capacity: u64,
    /// Grain directory sector (or `GD_AT_END`).
    pub gd: u64,
    /// The first grain's sector.
    pub overhead: u64,
    /// 0 none, 1 deflate.
    pub compression: u16,
}

/// A SparseExtentHeader (one sector); no redundant grain directory.
pub(crate) fn sparse_header(f: &SparseHeader) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&f.version.to_le_bytes());
    h[8..12].copy_from_slice(&f.flags.to_le_bytes());
    h[12..20].copy_from_slice(&f.capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&DESC_OFFSET.to_le_bytes());
    h[36..44].copy_from_slice(&DESC_SECTORS.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes()); // GT_ENTRIES
    h[56..64].copy_from_slice(&f.gd.to_le_bytes());
    h[64..72].copy_from_slice(&f.overhead.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h[77..79].copy_from_slice(&f.compression.to_le_bytes());
    h
}

/// Appends grains in completion order; see the module docs.
#[derive(Debug)]
pub(crate) struct VmdkWriter {
    out: Output,
    size: u64,
    cs: u64,
    layout: Layout,
    /// The next free sector (always on a grain boundary).
    next: AtomicU64,
}

impl VmdkWriter {
    pub fn new(out: Output, size: u64, cs: u64, layout: Layout) -> Result<Self> {
        Ok(Self {
            out,
            size,
            cs,
            next: AtomicU64::new(layout.overhead),
            layout,
        })
    }
}

impl ChunkSink for VmdkWriter {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        for &index in indexes {
            let data = &plain[..chunk_span(self.size, self.cs, index, plain.len())];
            let gbase = index * self.cs / CLUSTER;
            for (first, n) in nonzero_runs(data) {
                let a = usize::try_from(first * CLUSTER).expect("chunk fits memory");
                let b = usize::try_from((first + n) * CLUSTER)
                    .expect("chunk fits memory")
                    .min(data.len());
                let sector = self.next.fetch_add(n * GRAIN_SECTORS, Ordering::Relaxed);
                self.out.write_at(&data[a..b], sector * SECTOR)?;
                // The grain tables are contiguous: grain g's entry is at gt + 4g bytes.
                let entries: Vec<u8> = (0..n)
                    .flat_map(|k| {
                        u32::try_from(sector + k * GRAIN_SECTORS)
                            .expect("checked by Layout::new")
                            .to_le_bytes()
                    })
                    .collect();
                self.out
                    .write_at(&entries, self.layout.gt * SECTOR + (gbase + first) * 4)?;
            }
        }
        Ok(())
    }

    fn zeros(&self, _chunks: Range<u64>) -> Result<()> {
        Ok(())
    }
}

impl FormatWriter for VmdkWriter {
    fn finish(&self) -> Result<()> {
        let l = &self.layout;
        self.out
            .write_at(l.descriptor.as_bytes(), DESC_OFFSET * SECTOR)?;
        // Grain directory: table i at gt + 4i sectors; one 64 KiB piece at a time.
        let per = CLUSTER / 4;
        let mut first = 0;
        while first < l.gts {
            let n = per.min(l.gts - first);
            let piece: Vec<u8> = (first..first + n)
                .flat_map(|i| {
                    u32::try_from(l.gt + i * GT_SECTORS)
                        .expect("checked by Layout::new")
                        .to_le_bytes()
                })
                .collect();
            self.out.write_at(&piece, l.gd * SECTOR + first * 4)?;
            first += n;
        }
        self.out
            .set_len(self.next.load(Ordering::Acquire) * SECTOR)?;
        // The header last: until it is written the file is no VMDK.
        self.out.write_at(&header(l), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, le32, le64};
    use super::super::{ExportFormat, FormatOptions};
    use super::*;

    #[test]
    fn header_and_descriptor_decode() {
        let l = Layout::new((1 << 30) + 1, "d", "web \"1\".vmdk").unwrap();
        assert_eq!(l.capacity, (1 << 21) + 1);
        assert_eq!(l.gts, 33);
        assert_eq!((l.gd, l.gt), (21, 22));
        assert_eq!(l.overhead, 256);
        let h = header(&l);
        assert_eq!(&h[0..4], b"KDMV");
        assert_eq!(le32(&h, 0), 0x564d_444b);
        assert_eq!(le32(&h, 4), 1);
        assert_eq!(le32(&h, 8), 1);
        assert_eq!(le64(&h, 12), (1 << 21) + 1);
        assert_eq!(le64(&h, 20), 128);
        assert_eq!(le64(&h, 28), 1);
        assert_eq!(le64(&h, 36), 20);
        assert_eq!(le32(&h, 44), 512);
        assert_eq!(le64(&h, 48), 0);
        assert_eq!(le64(&h, 56), 21);
        assert_eq!(le64(&h, 64), 256);
        assert_eq!(&h[73..77], b"\n \r\n");
        assert!(l.descriptor.contains("createType=\"monolithicSparse\""));
        assert!(
            l.descriptor
                .contains("RW 2097153 SPARSE \"web _1_.vmdk\"\n"),
            "{}",
            l.descriptor
        );
        assert!(l.descriptor.len() <= 20 * 512);
        // 2 TiB does not fit 32-bit sector numbers.
        assert!(Layout::new(2 << 40, "d", "x").is_err());
    }

    #[tokio::test]
    async fn export_roundtrips_and_skips_zero_grains() {
        let dir = tempfile::tempdir().unwrap();
        let size = (40 << 20) + 1000;
        let (src, out) = testkit::export(
            dir.path(),
            256 << 10,
            size,
            FormatOptions {
                format: ExportFormat::Vmdk,
                vhd_round_up: false,
            },
        )
        .await;
        let f = std::fs::read(&out).unwrap();
        assert_eq!(&f[0..4], b"KDMV");
        let cap = le64(&f, 12) as usize;
        assert_eq!(cap, size.div_ceil(512) as usize);
        let gd = le64(&f, 56) as usize * 512;
        let overhead = le64(&f, 64) as usize * 512;
        let gts = (cap as u64).div_ceil(512 * 128) as usize;
        let mut disk = vec![0u8; cap * 512];
        let mut grains = 0;
        for i in 0..gts {
            let gt = le32(&f, gd + 4 * i) as usize * 512;
            for j in 0..512 {
                let s = le32(&f, gt + 4 * j) as usize * 512;
                if s == 0 {
                    continue;
                }
                assert!(s >= overhead && s % 65536 == overhead % 65536);
                grains += 1;
                let v = (i * 512 + j) * 65536;
                let n = 65536.min(disk.len() - v);
                disk[v..v + n].copy_from_slice(&f[s..s + n]);
            }
        }
        let raw = std::fs::read(&src).unwrap();
        assert_eq!(&disk[..raw.len()], &raw[..]);
        // Grains 0, 2, 9, 20..=23, 513 and the last: the zero grain 1 was skipped.
        assert_eq!(grains, 9);
        assert_eq!(f.len(), overhead + grains * 65536);
    }
}
