//! qcow2 (version 3): the format of qemu/KVM, OpenStack and Proxmox.
//!
//! Why this layout: chunks complete out of order, so data clusters are appended to the file
//! in completion order (an atomic cluster counter) and mapped through L2 tables that are
//! allocated the same way, the first time a chunk lands in their 512 MiB. Every cluster of
//! the file is used exactly once, so refcounts are all 1 up to the end of the file: they
//! are written last, after the data, with the refcount table, and the header (which points
//! at them) is written at the very end. Zero chunks, and all-zero clusters inside a chunk,
//! allocate nothing: their L2 entry stays 0 (unallocated, reads as zeros; there is no
//! backing file). A deduplicated chunk is written once per place it appears (refcount 1
//! everywhere keeps `qemu-img check` and every writer of the image simple).
//!
//! Memory: the L1 table (8 bytes per 512 MiB of disk) and one 64 KiB buffer at `finish`;
//! L2 entries are written straight into the file (one `pwrite` per run of clusters).
//!
//! File layout, clusters of 64 KiB (all integers big-endian):
//!
//! ```text
//! cluster 0            header (104 bytes, then zeros: the header-extension end marker)
//!    0  4  magic "QFI\xfb"
//!    4  4  version 3
//!    8  8  backing file offset 0        16  4  backing file size 0
//!   20  4  cluster bits 16              24  8  virtual size (bytes, a multiple of 512)
//!   32  4  encryption 0                 36  4  L1 entries
//!   40  8  L1 table offset (cluster 1)  48  8  refcount table offset
//!   56  4  refcount table clusters      60  4  snapshots 0       64  8  snapshot offset 0
//!   72  8  incompatible features 0      80  8  compatible 0      88  8  autoclear 0
//!   96  4  refcount order 4 (16-bit refcounts)                   100 4  header length 104
//! clusters 1 ..        L1 table: one 8-byte entry per 512 MiB of disk:
//!                      L2 table offset | bit 63 (COPIED: refcount is 1), or 0
//! then, in the order chunks complete:
//!                      data clusters, and L2 tables (8192 entries of 8 bytes:
//!                      data cluster offset | bit 63, or 0 for an unallocated cluster)
//! then, at finish:     refcount blocks (32768 16-bit refcounts each: 1 for every cluster
//!                      of the file, 0 past its end), then the refcount table (one 8-byte
//!                      offset per refcount block)
//! ```

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{CLUSTER, FormatWriter, Output, nonzero_runs};
use crate::error::{Result, StoreError};
use crate::restore::{ChunkSink, chunk_span};

/// `log2(CLUSTER)`.
pub const CLUSTER_BITS: u32 = 16;
/// Entries of an L2 table (one cluster of 8-byte entries).
pub const L2_ENTRIES: u64 = CLUSTER / 8;
/// Refcounts in a refcount block (one cluster of 16-bit refcounts).
pub const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// Entry flag: the cluster's refcount is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// Length of the version 3 header without extensions.
pub const HEADER_LEN: usize = 104;
/// qemu's limit on the L1 table (32 MiB of entries): 2 PiB of disk with 64 KiB clusters.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;

/// The checked shape of a qcow2 export.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Virtual size: the disk's, rounded up to a 512-byte sector.
    pub vsize: u64,
    /// L1 entries.
    pub l1_size: u64,
    /// Clusters of the L1 table (from cluster 1).
    pub l1_clusters: u64,
}

impl Layout {
    pub fn new(size: u64, disk: &str) -> Result<Self> {
        let vsize = super::round_up(size, 512);
        let l1_size = vsize.div_ceil(CLUSTER * L2_ENTRIES).max(1);
        if l1_size > MAX_L1_ENTRIES {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is {size} bytes: too large for qcow2 with 64 KiB clusters"
            )));
        }
        Ok(Self {
            vsize,
            l1_size,
            l1_clusters: (l1_size * 8).div_ceil(CLUSTER),
        })
    }

    /// First cluster after the header and the L1 table.
    fn first_free(&self) -> u64 {
        1 + self.l1_clusters
    }
}

/// The refcount blocks and refcount table clusters that cover a file of `used` clusters
/// plus themselves: the smallest fixed point of `blocks = ⌈(used + blocks + table) /
/// 32768⌉`, `table = ⌈blocks × 8 / 65536⌉`.
pub fn refcount_shape(used: u64) -> (u64, u64) {
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let b = (used + blocks + table).div_ceil(REFCOUNTS_PER_BLOCK);
        let t = (b * 8).div_ceil(CLUSTER);
        if (b, t) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (b, t);
    }
}

/// The version 3 header.
pub(crate) fn header(layout: &Layout, rt_offset: u64, rt_clusters: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
    h[24..32].copy_from_slice(&layout.vsize.to_be_bytes());
    let l1 = u32::try_from(layout.l1_size).expect("L1 size checked by Layout::new");
    h[36..40].copy_from_slice(&l1.to_be_bytes());
    h[40..48].copy_from_slice(&CLUSTER.to_be_bytes());
    h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
    let rt = u32::try_from(rt_clusters).expect("refcount table clusters fit 32 bits");
    h[56..60].copy_from_slice(&rt.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&104u32.to_be_bytes()); // HEADER_LEN
    h
}

/// Appends clusters in completion order; see the module docs.
#[derive(Debug)]
pub(crate) struct Qcow2Writer {
    out: Output,
    size: u64,
    cs: u64,
    layout: Layout,
    /// The next free cluster of the file.
    next: AtomicU64,
    /// The L1 table: the cluster of each L2 table, 0 while it has none.
    l1: Mutex<Vec<u64>>,
}

impl Qcow2Writer {
    pub fn new(out: Output, size: u64, cs: u64, layout: Layout) -> Result<Self> {
        let l1 = vec![0; usize::try_from(layout.l1_size).expect("L1 fits memory")];
        Ok(Self {
            out,
            size,
            cs,
            next: AtomicU64::new(layout.first_free()),
            layout,
            l1: Mutex::new(l1),
        })
    }

    /// The cluster of the L2 table of L1 entry `l1i`, allocated on first use.
    fn l2_table(&self, l1i: u64) -> u64 {
        let mut l1 = self
            .l1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = &mut l1[usize::try_from(l1i).expect("L1 fits memory")];
        if *slot == 0 {
            *slot = self.next.fetch_add(1, Ordering::Relaxed);
        }
        *slot
    }

    /// Maps disk clusters `vfirst..vfirst + n` to file clusters `host..host + n`.
    fn map(&self, mut vfirst: u64, mut n: u64, mut host: u64) -> Result<()> {
        while n > 0 {
            let in_table = vfirst % L2_ENTRIES;
            let k = n.min(L2_ENTRIES - in_table);
            let table = self.l2_table(vfirst / L2_ENTRIES);
            let entries: Vec<u8> = (host..host + k)
                .flat_map(|c| ((c * CLUSTER) | COPIED).to_be_bytes())
                .collect();
            self.out
                .write_at(&entries, table * CLUSTER + in_table * 8)?;
            (vfirst, n, host) = (vfirst + k, n - k, host + k);
        }
        Ok(())
    }
}

impl ChunkSink for Qcow2Writer {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        for &index in indexes {
            let data = &plain[..chunk_span(self.size, self.cs, index, plain.len())];
            let vbase = index * self.cs / CLUSTER;
            for (first, n) in nonzero_runs(data) {
                let a = usize::try_from(first * CLUSTER).expect("chunk fits memory");
                let b = usize::try_from((first + n) * CLUSTER)
                    .expect("chunk fits memory")
                    .min(data.len());
                let host = self.next.fetch_add(n, Ordering::Relaxed);
                self.out.write_at(&data[a..b], host * CLUSTER)?;
                self.map(vbase + first, n, host)?;
            }
        }
        Ok(())
    }

    fn zeros(&self, _chunks: Range<u64>) -> Result<()> {
        Ok(())
    }
}

impl FormatWriter for Qcow2Writer {
    fn finish(&self) -> Result<()> {
        let used = self.next.load(Ordering::Acquire);
        let (blocks, table) = refcount_shape(used);
        let total = used + blocks + table;
        let mut buf = vec![0u8; usize::try_from(CLUSTER).expect("64 KiB")];
        // Refcount blocks, clusters used .. used + blocks: 1 for clusters < total.
        for b in 0..blocks {
            let first = b * REFCOUNTS_PER_BLOCK;
            let live = (total - first).min(REFCOUNTS_PER_BLOCK);
            buf.fill(0);
            for e in buf
                .chunks_exact_mut(2)
                .take(usize::try_from(live).expect("≤ 32768"))
            {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            self.out.write_at(&buf, (used + b) * CLUSTER)?;
        }
        // Refcount table, clusters used + blocks ..: the offset of each block.
        let rt_offset = (used + blocks) * CLUSTER;
        write_table(
            &self.out,
            rt_offset,
            (0..blocks).map(|b| (used + b) * CLUSTER),
        )?;
        // L1 table, from cluster 1.
        let l1 = self
            .l1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_table(
            &self.out,
            CLUSTER,
            l1.iter()
                .map(|&c| if c == 0 { 0 } else { (c * CLUSTER) | COPIED }),
        )?;
        self.out.set_len(total * CLUSTER)?;
        // The header last: until it is written the file is no qcow2 image.
        self.out
            .write_at(&header(&self.layout, rt_offset, table), 0)
    }
}

/// Writes big-endian 8-byte `entries` from `offset`, one cluster at a time.
fn write_table(out: &Output, offset: u64, entries: impl Iterator<Item = u64>) -> Result<()> {
    let per = usize::try_from(CLUSTER / 8).expect("8192");
    let mut buf = Vec::with_capacity(per * 8);
    let mut at = offset;
    let mut entries = entries.peekable();
    while entries.peek().is_some() {
        buf.clear();
        for e in entries.by_ref().take(per) {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        out.write_at(&buf, at)?;
        at += CLUSTER;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::testkit::{self, be32, be64};
    use super::super::{ExportFormat, FormatOptions};
    use super::*;

    #[test]
    fn refcount_shape_covers_itself() {
        assert_eq!(refcount_shape(2), (1, 1));
        // 32766 used + 1 block + 1 table = 32768: one block still covers it.
        assert_eq!(refcount_shape(32766), (1, 1));
        assert_eq!(refcount_shape(32767), (2, 1));
        for used in [1, 100, 32767, 32768, 1 << 20, (1 << 29) + 5] {
            let (b, t) = refcount_shape(used);
            assert!(b * REFCOUNTS_PER_BLOCK >= used + b + t, "{used}");
            assert!(t * CLUSTER >= b * 8, "{used}");
        }
    }

    #[test]
    fn header_decodes() {
        let l = Layout::new((1 << 30) + 100, "d").unwrap();
        assert_eq!((l.vsize, l.l1_size, l.l1_clusters), ((1 << 30) + 512, 3, 1));
        let h = header(&l, 7 * CLUSTER, 1);
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(be32(&h, 4), 3);
        assert_eq!(be32(&h, 20), 16);
        assert_eq!(be64(&h, 24), (1 << 30) + 512);
        assert_eq!(be32(&h, 36), 3);
        assert_eq!(be64(&h, 40), CLUSTER);
        assert_eq!(be64(&h, 48), 7 * CLUSTER);
        assert_eq!(be32(&h, 56), 1);
        assert_eq!(be64(&h, 72), 0);
        assert_eq!(be32(&h, 96), 4);
        assert_eq!(be32(&h, 100), 104);
    }

    /// Reads a qcow2 file back: the disk it describes, and a check that every cluster of the
    /// file is referenced exactly once and has refcount 1 (what `qemu-img check` checks).
    fn decode(file: &[u8]) -> Vec<u8> {
        let c = CLUSTER as usize;
        assert_eq!(&file[0..4], b"QFI\xfb");
        assert_eq!(file.len() % c, 0);
        let clusters = file.len() / c;
        let vsize = be64(file, 24) as usize;
        let l1_size = be32(file, 36) as usize;
        let l1_off = be64(file, 40) as usize;
        let rt_off = be64(file, 48) as usize;
        let rt_clusters = be32(file, 56) as usize;
        let mut refs: BTreeMap<usize, u32> = BTreeMap::new();
        let mut take = |off: usize, n: usize| {
            assert_eq!(off % c, 0);
            for k in 0..n {
                *refs.entry(off / c + k).or_default() += 1;
            }
        };
        take(0, 1);
        take(l1_off, (l1_size * 8).div_ceil(c));
        take(rt_off, rt_clusters);
        let mut disk = vec![0u8; vsize];
        for i in 0..l1_size {
            let e = be64(file, l1_off + i * 8);
            if e == 0 {
                continue;
            }
            assert_ne!(e & COPIED, 0);
            let l2 = (e & !COPIED) as usize;
            take(l2, 1);
            for j in 0..c / 8 {
                let e = be64(file, l2 + j * 8);
                if e == 0 {
                    continue;
                }
                assert_ne!(e & COPIED, 0);
                let host = (e & !COPIED) as usize;
                take(host, 1);
                let v = (i * c / 8 + j) * c;
                let n = c.min(vsize - v);
                disk[v..v + n].copy_from_slice(&file[host..host + n]);
            }
        }
        let mut counted = 0;
        for i in 0..rt_clusters * c / 8 {
            let b = be64(file, rt_off + i * 8) as usize;
            if b == 0 {
                continue;
            }
            take(b, 1);
            for k in 0..c / 2 {
                let cl = i * c / 2 + k;
                let rc = u16::from_be_bytes([file[b + 2 * k], file[b + 2 * k + 1]]);
                let want = u16::from(cl < clusters);
                assert_eq!(rc, want, "refcount of cluster {cl}");
                counted += usize::from(rc);
            }
        }
        assert_eq!(counted, clusters);
        assert_eq!(refs.len(), clusters, "every cluster referenced (no leak)");
        assert!(
            refs.values().all(|&n| n == 1),
            "no cluster referenced twice"
        );
        disk
    }

    async fn roundtrip(chunk_size: u32, size: u64) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = testkit::export(
            dir.path(),
            chunk_size,
            size,
            FormatOptions {
                format: ExportFormat::Qcow2,
                vhd_round_up: false,
            },
        )
        .await;
        let file = std::fs::read(&out).unwrap();
        let disk = decode(&file);
        let raw = std::fs::read(&src).unwrap();
        assert_eq!(&disk[..raw.len()], &raw[..]);
        assert!(disk[raw.len()..].iter().all(|&b| b == 0));
        file.len() / CLUSTER as usize
    }

    #[tokio::test]
    async fn small_disk_roundtrips_and_skips_zero_clusters() {
        // 64 KiB chunks; a size that is not a whole sector.
        let clusters = roundtrip(64 << 10, (40 << 16) + 1001).await;
        // header + L1 + L2 + data (0, 2, 9, 20..=23, the tail 40) + refcount block + table.
        assert_eq!(clusters, 3 + 8 + 2);
    }

    #[tokio::test]
    async fn large_disk_spans_several_l2_tables() {
        // 1 MiB chunks: a zero cluster inside a data chunk (cluster 1) is left unallocated.
        roundtrip(1 << 20, (600 << 20) + 4096).await;
    }
}
