//! VMDK streamOptimized: the compressed, front-to-back VMDK of OVF/OVA packages, the format
//! vSphere exports and imports (OVF deploy, `ovftool`), read by `qemu-img` too.
//!
//! Why this layout: it is the layout of VMware's "Virtual Disk Format 5.0" stream-optimized
//! extent. The header at sector 0 says `gdOffset = GD_AT_END`; grains follow from sector 128,
//! each a grain marker (`lba`, `size`) and its 64 KiB of data deflate-compressed as a zlib
//! stream (RFC 1950, as VMware and qemu write and read them), padded to a sector; then the
//! grain tables, each after a GT marker; the grain directory after a GD marker; the footer
//! (a FOOTER marker, then a copy of the header whose `gdOffset` is the directory's sector);
//! and the end-of-stream marker. Readers find the directory through the footer, the last
//! 1536 bytes of the file.
//!
//! Grains are compressed on restore's decode threads (a deduplicated chunk once, whatever
//! the number of places it appears), then appended: the file offset is reserved with one
//! atomic add (the whole critical section), the write happens outside it. Zero chunks and
//! all-zero grains inside a chunk are never written (grain table entry 0: reads as zeros), and
//! a grain table whose grains are all unallocated is not written either (directory entry 0),
//! as VMware does. The last grain of a disk that is not a whole number of grains is
//! compressed zero-padded to 64 KiB.
//!
//! Grain order: grains are appended in the order chunks complete, mostly but not strictly in
//! increasing LBA order. The specification's random-access readers (VMware Workstation,
//! ESXi's `vmkfstools -i`, qemu) find every grain through the grain tables and do not care;
//! each grain also names its own LBA in its marker, which is what a front-to-back reader
//! uses. VMware's own writers emit grains in increasing LBA order, and a strictly sequential
//! importer may assume it; that is the one property of a VMware-written stream this file
//! does not have (`qemu-img convert -O vmdk -o subformat=streamOptimized` rewrites it in
//! order if an importer refuses it).
//!
//! Grain tables during the export: the table entry of a grain (its marker's sector) is only
//! known once the grain is appended, and the tables are written after every grain. Rather
//! than hold 4 bytes per grain in memory (128 MiB for a 2 TiB disk), the entries are written
//! into a scratch area of the same file at 2 TiB (a hole but for the written entries; grain
//! table entries are 32-bit sector numbers, so the real contents never reach 2 TiB), read
//! back by `finish` one 64 KiB piece at a time and written after the grains; setting the
//! file's length then drops the scratch area. The header, which makes the file a VMDK, is
//! written last.
//!
//! Compression level: 1 (zlib's fastest). An export is a recovery step where time matters
//! more than the last percent of size; level 6 costs several times the CPU for a few
//! percent on disk images.
//!
//! Memory: one compressed chunk per decode thread, and at `finish` the grain directory (4
//! bytes per 32 MiB of disk) and one 64 KiB buffer.
//!
//! File layout, sectors of 512 bytes (integers little-endian):
//!
//! ```text
//! sector 0             SparseExtentHeader: "KDMV", version 3, flags 0x30001 (newline
//!                      detection valid, compressed grains, markers), capacity, grain size
//!                      128, descriptor 1 + 20 sectors, 512 entries per grain table,
//!                      gdOffset GD_AT_END (0xFFFF_FFFF_FFFF_FFFF), overhead 128,
//!                      compression 1 (deflate)
//! sectors 1 .. 21      descriptor: createType "streamOptimized", `RW <capacity> SPARSE
//!                      "<file name>"`
//! sector 128 ..        grains, each: lba u64 (sectors), size u32, zlib data; zero padded
//!                      to a sector
//! then                 per non-empty grain table: marker (numSectors 4, size 0, type 1 GT),
//!                      the table (512 u32: each grain's marker sector, or 0)
//! then                 marker (numSectors, size 0, type 2 GD), the grain directory (one
//!                      u32 per grain table: its sector, or 0), padded to a sector
//! then                 marker (numSectors 1, size 0, type 3 FOOTER), the footer (the header
//!                      with gdOffset = the directory's sector), the end-of-stream marker
//!                      (512 zero bytes: type 0 EOS)
//! ```

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use super::vmdk::{
    DESC_OFFSET, DESC_SECTORS, GRAIN_SECTORS, GT_ENTRIES, GT_SECTORS, SECTOR, SparseHeader,
    descriptor, sparse_header,
};
use super::{CLUSTER, FormatWriter, Output};
use crate::error::{Result, StoreError};
use crate::restore::{ChunkSink, chunk_span};

/// `gdOffset` of a header whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Header flags: newline detection bytes valid (bit 0), compressed grains (bit 16), markers
/// (bit 17).
pub const FLAGS: u32 = 1 | (1 << 16) | (1 << 17);
/// Header `compressAlgorithm`: deflate.
pub const COMPRESSION_DEFLATE: u16 = 1;
/// The first grain's sector (`overHead`), as VMware writes it.
pub const OVERHEAD: u64 = 128;
/// Marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Marker type: grain table.
pub const MARKER_GT: u32 = 1;
/// Marker type: grain directory.
pub const MARKER_GD: u32 = 2;
/// Marker type: footer.
pub const MARKER_FOOTER: u32 = 3;
/// Length of a grain marker (`lba: u64`, `size: u32`) before the compressed data.
pub const GRAIN_MARKER: usize = 12;
/// The byte offset of the scratch grain tables: 2 TiB, the first sector a 32-bit grain table
/// entry cannot address.
const SCRATCH: u64 = 1 << 41;
/// The largest disk: its scratch grain tables (4 bytes per grain) stay under 4 GiB.
pub const MAX_SIZE: u64 = 64 << 40;
/// zlib level.
const LEVEL: u8 = 1;

/// The checked shape of a streamOptimized export.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Capacity in sectors (the disk's size rounded up to a sector).
    pub capacity: u64,
    /// Grain tables (entries of the grain directory).
    pub gts: u64,
    /// The descriptor (text, at most `DESC_SECTORS` sectors).
    pub descriptor: String,
}

impl Layout {
    /// Refuses a disk over 64 TiB. (A disk whose compressed grains outgrow 32-bit sector
    /// numbers, 2 TiB of file, is refused when they do.)
    pub fn new(size: u64, disk: &str, file_name: &str) -> Result<Self> {
        if size > MAX_SIZE {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is {size} bytes: too large for a streamOptimized VMDK (64 TiB at \
                 most)"
            )));
        }
        let capacity = size.div_ceil(SECTOR);
        let descriptor = descriptor(
            capacity,
            file_name,
            crate::crypto::random_bytes::<4>(),
            "streamOptimized",
        );
        debug_assert!(descriptor.len() as u64 <= DESC_SECTORS * SECTOR);
        Ok(Self {
            capacity,
            gts: capacity.div_ceil(GT_ENTRIES * GRAIN_SECTORS).max(1),
            descriptor,
        })
    }
}

/// The header (`gd` = [`GD_AT_END`]) or the footer (`gd` = the directory's sector).
pub(crate) fn header(layout: &Layout, gd: u64) -> [u8; 512] {
    sparse_header(&SparseHeader {
        version: 3,
        flags: FLAGS,
        capacity: layout.capacity,
        gd,
        overhead: OVERHEAD,
        compression: COMPRESSION_DEFLATE,
    })
}

/// A metadata marker sector: `sectors` of metadata of type `kind` follow.
pub(crate) fn marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// A chunk's non-zero grains, compressed: `(grain within the chunk, zlib stream)`.
type Grains = Vec<(u64, Vec<u8>)>;

/// The non-zero grains of `data` (a chunk, starting on a grain boundary), compressed. A short
/// last grain is compressed zero-padded.
fn compress_grains(data: &[u8]) -> Grains {
    let grain = usize::try_from(CLUSTER).expect("64 KiB");
    data.chunks(grain)
        .enumerate()
        .filter(|(_, g)| !crate::is_all_zero(g))
        .map(|(i, g)| {
            let z = if g.len() == grain {
                miniz_oxide::deflate::compress_to_vec_zlib(g, LEVEL)
            } else {
                let mut full = g.to_vec();
                full.resize(grain, 0);
                miniz_oxide::deflate::compress_to_vec_zlib(&full, LEVEL)
            };
            (i as u64, z)
        })
        .collect()
}

/// Appends compressed grains in completion order; see the module docs.
#[derive(Debug)]
pub(crate) struct VmdkStreamWriter {
    out: Output,
    size: u64,
    cs: u64,
    layout: Layout,
    /// The output opened again for reading: the scratch grain tables are read back.
    reader: File,
    /// The next free sector after the grains.
    next: AtomicU64,
}

impl VmdkStreamWriter {
    pub fn new(out: Output, size: u64, cs: u64, layout: Layout) -> Result<Self> {
        let reader = File::open(&out.path).map_err(|e| out.io(e))?;
        // The scratch grain tables, a hole until entries are written: reads of it return
        // zeros (unallocated) wherever no grain landed.
        out.set_len(SCRATCH + layout.gts * GT_SECTORS * SECTOR)?;
        Ok(Self {
            out,
            size,
            cs,
            layout,
            reader,
            next: AtomicU64::new(OVERHEAD),
        })
    }

    /// Reserves `sectors` at the end of the file: their first sector.
    fn reserve(&self, sectors: u64) -> Result<u64> {
        let first = self.next.fetch_add(sectors, Ordering::Relaxed);
        if first + sectors > u64::from(u32::MAX) {
            return Err(self.too_large());
        }
        Ok(first)
    }

    fn too_large(&self) -> StoreError {
        self.out.io(std::io::Error::other(
            "the compressed disk outgrows a streamOptimized VMDK (grains are addressed by \
             32-bit sector numbers, under 2 TiB of file); export it as qcow2 or vhdx",
        ))
    }

    /// Writes grains `grains` of chunk `index` (compressed by [`compress_grains`]) and their
    /// scratch grain table entries.
    fn place(&self, index: u64, grains: &[(u64, Vec<u8>)]) -> Result<()> {
        let (Some(&(lo, _)), Some(&(hi, _))) = (grains.first(), grains.last()) else {
            return Ok(());
        };
        let gbase = index * self.cs / CLUSTER;
        let sector = usize::try_from(SECTOR).expect("512");
        let total: usize = grains
            .iter()
            .map(|(_, z)| (GRAIN_MARKER + z.len()).div_ceil(sector) * sector)
            .sum();
        let first = self.reserve(total as u64 / SECTOR)?;
        let mut buf = Vec::with_capacity(total);
        // Grain table entries lo..=hi of this chunk: 0 for its zero grains.
        let mut entries = vec![0u8; usize::try_from(hi - lo + 1).expect("chunk fits memory") * 4];
        for (g, z) in grains {
            let at = first + buf.len() as u64 / SECTOR;
            let lba = (gbase + g) * GRAIN_SECTORS;
            buf.extend_from_slice(&lba.to_le_bytes());
            let len = u32::try_from(z.len()).expect("a compressed grain is under 4 GiB");
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(z);
            buf.resize(buf.len().div_ceil(sector) * sector, 0);
            let e = usize::try_from(g - lo).expect("chunk fits memory") * 4;
            let at = u32::try_from(at).expect("checked by reserve");
            entries[e..e + 4].copy_from_slice(&at.to_le_bytes());
        }
        self.out.write_at(&buf, first * SECTOR)?;
        self.out.write_at(&entries, SCRATCH + (gbase + lo) * 4)
    }
}

impl ChunkSink for VmdkStreamWriter {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        // A deduplicated chunk is compressed once; only the disk's last chunk can be shorter
        // than the others, so at most two versions.
        let mut done: Option<(usize, Grains)> = None;
        for &index in indexes {
            let span = chunk_span(self.size, self.cs, index, plain.len());
            let grains = match &done {
                Some((s, g)) if *s == span => g,
                _ => &done.insert((span, compress_grains(&plain[..span]))).1,
            };
            self.place(index, grains)?;
        }
        Ok(())
    }

    fn zeros(&self, _chunks: Range<u64>) -> Result<()> {
        Ok(())
    }
}

impl FormatWriter for VmdkStreamWriter {
    fn finish(&self) -> Result<()> {
        let l = &self.layout;
        let mut end = self.next.load(Ordering::Acquire);
        let gt_bytes = usize::try_from(GT_SECTORS * SECTOR).expect("2 KiB");
        // Grain tables, 32 at a time (64 KiB of scratch): each non-empty one after its marker.
        let mut gd: Vec<u32> = Vec::with_capacity(usize::try_from(l.gts).expect("≤ 2 Mi"));
        let per = CLUSTER / (GT_SECTORS * SECTOR);
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        let mut first = 0;
        while first < l.gts {
            let n = per.min(l.gts - first);
            scratch.resize(usize::try_from(n).expect("≤ 32") * gt_bytes, 0);
            self.reader
                .read_exact_at(&mut scratch, SCRATCH + first * GT_SECTORS * SECTOR)
                .map_err(|source| self.out.io(source))?;
            out.clear();
            let start = end;
            for gt in scratch.chunks(gt_bytes) {
                if crate::is_all_zero(gt) {
                    gd.push(0);
                    continue;
                }
                out.extend_from_slice(&marker(GT_SECTORS, MARKER_GT));
                gd.push(u32::try_from(end + 1).map_err(|_| self.too_large())?);
                out.extend_from_slice(gt);
                end += 1 + GT_SECTORS;
            }
            if end > u64::from(u32::MAX) {
                return Err(self.too_large());
            }
            self.out.write_at(&out, start * SECTOR)?;
            first += n;
        }
        // The grain directory after its marker, then the footer and the end of stream.
        let gd_sectors = (l.gts * 4).div_ceil(SECTOR);
        let gd_sector = end + 1;
        out.clear();
        out.extend_from_slice(&marker(gd_sectors, MARKER_GD));
        for e in &gd {
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.resize(
            usize::try_from((1 + gd_sectors) * SECTOR).expect("≤ 8 MiB"),
            0,
        );
        out.extend_from_slice(&marker(1, MARKER_FOOTER));
        out.extend_from_slice(&header(l, gd_sector));
        out.extend_from_slice(&marker(0, MARKER_EOS));
        let total = end + out.len() as u64 / SECTOR;
        if total > u64::from(u32::MAX) {
            return Err(self.too_large());
        }
        self.out.write_at(&out, end * SECTOR)?;
        // Drops the scratch grain tables.
        self.out.set_len(total * SECTOR)?;
        self.out
            .write_at(l.descriptor.as_bytes(), DESC_OFFSET * SECTOR)?;
        // The header last: until it is written the file is no VMDK.
        self.out.write_at(&header(l, GD_AT_END), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, le32, le64};
    use super::super::{ExportFormat, FormatOptions};
    use super::*;

    #[test]
    fn header_and_markers_decode() {
        let l = Layout::new((1 << 30) + 1, "d", "web.vmdk").unwrap();
        assert_eq!((l.capacity, l.gts), ((1 << 21) + 1, 33));
        let h = header(&l, GD_AT_END);
        assert_eq!(&h[0..4], b"KDMV");
        assert_eq!(le32(&h, 4), 3);
        assert_eq!(le32(&h, 8), 0x0003_0001);
        assert_eq!(le64(&h, 12), (1 << 21) + 1);
        assert_eq!(le64(&h, 20), 128);
        assert_eq!((le64(&h, 28), le64(&h, 36)), (1, 20));
        assert_eq!(le32(&h, 44), 512);
        assert_eq!(le64(&h, 48), 0);
        assert_eq!(le64(&h, 56), u64::MAX);
        assert_eq!(le64(&h, 64), 128);
        assert_eq!(&h[73..77], b"\n \r\n");
        assert_eq!(u16::from_le_bytes([h[77], h[78]]), 1);
        assert_eq!(le64(&header(&l, 99), 56), 99);
        assert!(l.descriptor.contains("createType=\"streamOptimized\"\n"));
        assert!(l.descriptor.contains("RW 2097153 SPARSE \"web.vmdk\"\n"));
        let m = marker(4, MARKER_GT);
        assert_eq!((le64(&m, 0), le32(&m, 8), le32(&m, 12)), (4, 0, 1));
        assert!(Layout::new((64 << 40) + 1, "d", "x").is_err());
    }

    #[test]
    fn zero_grains_are_not_compressed() {
        let c = CLUSTER as usize;
        let mut d = vec![0u8; 3 * c + 100];
        d[5] = 1;
        d[3 * c + 99] = 2;
        let g = compress_grains(&d);
        assert_eq!(g.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0, 3]);
        // The short last grain inflates to a whole zero-padded grain.
        let last = miniz_oxide::inflate::decompress_to_vec_zlib(&g[1].1).unwrap();
        assert_eq!(last.len(), c);
        assert_eq!(last[99], 2);
        assert!(last[100..].iter().all(|&b| b == 0));
    }

    /// Reads a streamOptimized file back as a VMware reader does (footer, directory, tables,
    /// markers): the disk and the number of grains.
    fn decode(f: &[u8]) -> (Vec<u8>, usize) {
        let h = &f[0..512];
        assert_eq!(&h[0..4], b"KDMV");
        assert_eq!(le64(h, 56), GD_AT_END);
        assert_eq!(f.len() % 512, 0);
        // Footer marker, footer, end of stream.
        let t = f.len() - 1536;
        assert_eq!((le64(f, t), le32(f, t + 8), le32(f, t + 12)), (1, 0, 3));
        let footer = &f[t + 512..t + 1024];
        assert_eq!(&footer[..56], &h[..56]);
        assert_eq!(&footer[64..], &h[64..]);
        assert!(
            f[t + 1024..].iter().all(|&b| b == 0),
            "end-of-stream marker"
        );
        let cap = le64(footer, 12) as usize;
        let gd = le64(footer, 56) as usize * 512;
        let gts = cap.div_ceil(512 * 128);
        let gd_sectors = (gts * 4).div_ceil(512);
        let m = gd - 512;
        assert_eq!(
            (le64(f, m), le32(f, m + 8), le32(f, m + 12)),
            (gd_sectors as u64, 0, 2)
        );
        assert_eq!(gd + gd_sectors * 512, t, "the footer follows the directory");
        let mut disk = vec![0u8; cap * 512];
        let mut grains = 0;
        for i in 0..gts {
            let gt = le32(f, gd + 4 * i) as usize * 512;
            if gt == 0 {
                continue;
            }
            let m = gt - 512;
            assert_eq!((le64(f, m), le32(f, m + 8), le32(f, m + 12)), (4, 0, 1));
            let mut any = false;
            for j in 0..512 {
                let s = le32(f, gt + 4 * j) as usize * 512;
                if s == 0 {
                    continue;
                }
                any = true;
                assert!(s >= 128 * 512 && s < gd);
                let lba = (i * 512 + j) * 128;
                assert_eq!(le64(f, s), lba as u64, "grain marker's LBA");
                let n = le32(f, s + 8) as usize;
                let g =
                    miniz_oxide::inflate::decompress_to_vec_zlib(&f[s + 12..s + 12 + n]).unwrap();
                assert_eq!(g.len(), 65536);
                grains += 1;
                let v = lba * 512;
                let k = 65536.min(disk.len() - v);
                disk[v..v + k].copy_from_slice(&g[..k]);
            }
            assert!(any, "an empty grain table is not written");
        }
        (disk, grains)
    }

    #[tokio::test]
    async fn export_roundtrips_and_skips_zero_grains() {
        let dir = tempfile::tempdir().unwrap();
        let size = (100 << 20) + 1000;
        let (src, out) = testkit::export(
            dir.path(),
            256 << 10,
            size,
            FormatOptions {
                format: ExportFormat::VmdkStream,
                vhd_round_up: false,
            },
        )
        .await;
        let f = std::fs::read(&out).unwrap();
        let (disk, grains) = decode(&f);
        let raw = std::fs::read(&src).unwrap();
        assert_eq!(disk.len() as u64, size.div_ceil(512) * 512);
        assert_eq!(&disk[..raw.len()], &raw[..]);
        assert!(disk[raw.len()..].iter().all(|&b| b == 0));
        // Grains 0, 2, 9, 20..=23, 513 and the last (9 and 513 are one deduplicated chunk,
        // placed twice with their own LBAs): the zero grain 1 was skipped. Grain tables 0, 1
        // and 3 only: table 2 (64..96 MiB) has no grain.
        assert_eq!(grains, 9);
        let gd = le64(&f, f.len() - 1024 + 56) as usize * 512;
        let present: Vec<usize> = (0..4).filter(|&i| le32(&f, gd + 4 * i) != 0).collect();
        assert_eq!(present, vec![0, 1, 3]);
        // Compressed: smaller than its 9 grains (4 of them random noise).
        assert!(f.len() < 9 * 65536, "{}", f.len());
    }
}
