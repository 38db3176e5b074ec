//! VHD fixed: the format Azure accepts for uploaded disks.
//!
//! Why fixed: Azure takes only fixed VHDs (no dynamic or differencing), with a virtual size
//! that is a whole MiB. A fixed VHD is the raw disk followed by one 512-byte footer, so the
//! data is written exactly as raw (sparse, zero chunks never written, see `super::raw`) and
//! the footer is written by `finish`, at `virtual size`, once every chunk is in.
//!
//! File layout (big-endian), `V` = virtual size (the disk's size, or rounded up to a MiB):
//!
//! ```text
//! 0 .. V          the disk, byte for byte (holes where it is zero)
//! V .. V+512      the footer:
//!   0   8  cookie "conectix"
//!   8   4  features: 2 (the reserved bit, always set)
//!  12   4  file format version 0x0001_0000
//!  16   8  data offset 0xFFFF_FFFF_FFFF_FFFF (fixed disks have no dynamic header)
//!  24   4  timestamp: seconds since 2000-01-01 00:00:00 UTC
//!  28   4  creator application "win " (see below)
//!  32   4  creator version (this crate's major << 16 | minor)
//!  36   4  creator host OS "Wi2k"
//!  40   8  original size V
//!  48   8  current size V
//!  56   2  cylinders
//!  58   1  heads
//!  59   1  sectors per track   (CHS by the VHD specification's algorithm, `geometry`)
//!  60   4  disk type 2 (fixed)
//!  64   4  checksum: one's complement of the sum of the footer's bytes, this field zero
//!  68  16  unique id (a random version 4 UUID)
//!  84   1  saved state 0
//!  85 427  zero
//! ```
//!
//! The creator application is Hyper-V's `win `: readers (qemu among them) take the size of a
//! VHD from `current size` only for creators known to mean it (Hyper-V, disk2vhd, XenServer);
//! for any other creator they multiply out the CHS geometry, which rounds most sizes down and
//! would cut the end of the disk. Azure, like Hyper-V, uses `current size`.

use std::ops::Range;

use super::raw::RawWriter;
use super::{FormatWriter, Output};
use crate::error::{Result, StoreError};
use crate::restore::ChunkSink;

/// Length of the footer.
pub const FOOTER_LEN: usize = 512;
/// Azure's alignment of a VHD's virtual size.
pub const MIB: u64 = 1 << 20;
/// Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC.
const VHD_EPOCH: u64 = 946_684_800;

/// The checked shape of a VHD export.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Virtual size: the disk's, or rounded up to a MiB.
    pub vsize: u64,
}

impl Layout {
    /// Refuses a disk that is not a whole MiB unless `round_up`.
    pub fn new(size: u64, round_up: bool, disk: &str) -> Result<Self> {
        let vsize = super::round_up(size, MIB);
        if vsize != size && !round_up {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is {size} bytes, not a whole number of MiB, which Azure requires \
                 of a VHD; use --vhd-round-up to pad it with zeros to {vsize} bytes"
            )));
        }
        if vsize == 0 {
            return Err(StoreError::InvalidArgument(format!(
                "disk `{disk}` is empty: a VHD cannot be 0 bytes"
            )));
        }
        Ok(Self { vsize })
    }
}

/// CHS geometry of a disk of `size` bytes, by the algorithm of the VHD specification
/// (appendix "CHS calculation"): (cylinders, heads, sectors per track).
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth): (u64, u64, u64);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        (spt, heads, cth) = (s, h, c);
    }
    total = cth / heads;
    (
        u16::try_from(total).expect("at most 65535 cylinders"),
        u8::try_from(heads).expect("at most 16 heads"),
        u8::try_from(spt).expect("at most 255 sectors"),
    )
}

/// One's complement of the byte sum.
pub fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |s, &b| s.wrapping_add(u32::from(b)))
}

/// The footer of a fixed VHD of `vsize` bytes made at `unix_seconds`, with id `uuid`.
pub fn footer(vsize: u64, unix_seconds: u64, uuid: [u8; 16]) -> [u8; FOOTER_LEN] {
    let mut f = [0u8; FOOTER_LEN];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
    // The field is 32 bits: it wraps in 2136.
    let stamp = u32::try_from(unix_seconds.saturating_sub(VHD_EPOCH) % (1 << 32))
        .expect("reduced to 32 bits");
    f[24..28].copy_from_slice(&stamp.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&creator_version().to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&vsize.to_be_bytes());
    f[48..56].copy_from_slice(&vsize.to_be_bytes());
    let (c, h, s) = geometry(vsize);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    f[60..64].copy_from_slice(&2u32.to_be_bytes());
    f[68..84].copy_from_slice(&uuid);
    let sum = checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

fn creator_version() -> u32 {
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    (major << 16) | (minor & 0xFFFF)
}

/// A random version 4 UUID.
fn uuid_v4() -> [u8; 16] {
    let mut u = crate::crypto::random_bytes::<16>();
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// Raw data, then the footer at `vsize`.
#[derive(Debug)]
pub(crate) struct VhdWriter {
    raw: RawWriter,
    vsize: u64,
}

impl VhdWriter {
    pub fn new(out: Output, size: u64, cs: u64, layout: Layout) -> Result<Self> {
        let vsize = layout.vsize;
        let len = vsize + FOOTER_LEN as u64;
        Ok(Self {
            raw: RawWriter::new(out, size, cs, len)?,
            vsize,
        })
    }
}

impl ChunkSink for VhdWriter {
    fn chunk(&self, plain: &[u8], indexes: &[u64]) -> Result<()> {
        self.raw.chunk(plain, indexes)
    }

    fn zeros(&self, chunks: Range<u64>) -> Result<()> {
        self.raw.zeros(chunks)
    }
}

impl FormatWriter for VhdWriter {
    fn finish(&self) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(VHD_EPOCH, |d| d.as_secs());
        self.raw
            .out
            .write_at(&footer(self.vsize, now, uuid_v4()), self.vsize)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::{self, be32, be64};
    use super::super::{ExportFormat, FormatOptions};
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // Values worked through the specification's algorithm by hand (and what Hyper-V and
        // qemu write for these sizes).
        assert_eq!(geometry(10 << 20), (301, 4, 17));
        assert_eq!(geometry(1 << 30), (2080, 16, 63));
        assert_eq!(geometry(127 << 30), (65278, 16, 255));
        assert_eq!(geometry(2 << 40), (65535, 16, 255));
        // 64 MiB: 131072 sectors; 17 spt gives 7710 cylinders × heads, 8 heads; 7710 ≥ 8192?
        // no: so 17 sectors, 8 heads, 963 cylinders.
        assert_eq!(geometry(64 << 20), (963, 8, 17));
    }

    #[test]
    fn footer_fields_and_checksum() {
        let uuid = [0xAB; 16];
        let f = footer(1 << 30, VHD_EPOCH + 1000, uuid);
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(be32(&f, 8), 2);
        assert_eq!(be32(&f, 12), 0x0001_0000);
        assert_eq!(be64(&f, 16), u64::MAX);
        assert_eq!(be32(&f, 24), 1000);
        assert_eq!(&f[28..32], b"win ");
        assert_eq!(be64(&f, 40), 1 << 30);
        assert_eq!(be64(&f, 48), 1 << 30);
        assert_eq!(u16::from_be_bytes([f[56], f[57]]), 2080);
        assert_eq!((f[58], f[59]), (16, 63));
        assert_eq!(be32(&f, 60), 2);
        assert_eq!(&f[68..84], &uuid);
        assert!(f[84..].iter().all(|&b| b == 0));
        let mut zeroed = f;
        zeroed[64..68].fill(0);
        assert_eq!(be32(&f, 64), checksum(&zeroed));
        // The checksum is the one's complement of the byte sum.
        let sum: u32 = zeroed.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(be32(&f, 64), !sum);
    }

    #[test]
    fn whole_mib_or_round_up() {
        let e = Layout::new((1 << 20) + 512, false, "disk0").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("1049088 bytes") && msg.contains("--vhd-round-up"),
            "{msg}"
        );
        assert_eq!(
            Layout::new((1 << 20) + 512, true, "d").unwrap().vsize,
            2 << 20
        );
        assert_eq!(Layout::new(3 << 20, false, "d").unwrap().vsize, 3 << 20);
    }

    #[tokio::test]
    async fn export_is_raw_plus_footer() {
        let dir = tempfile::tempdir().unwrap();
        let size = (5 << 20) + 4096;
        let (src, out) = testkit::export(
            dir.path(),
            64 << 10,
            size,
            FormatOptions {
                format: ExportFormat::Vhd,
                vhd_round_up: true,
            },
        )
        .await;
        let vhd = std::fs::read(&out).unwrap();
        let raw = std::fs::read(&src).unwrap();
        assert_eq!(vhd.len(), (6 << 20) + FOOTER_LEN);
        assert_eq!(&vhd[..raw.len()], &raw[..]);
        assert!(vhd[raw.len()..6 << 20].iter().all(|&b| b == 0));
        let f = &vhd[6 << 20..];
        assert_eq!(&f[0..8], b"conectix");
        assert_eq!(be64(f, 48), 6 << 20);
        assert_eq!(be32(f, 60), 2);
        let mut zeroed = f.to_vec();
        zeroed[64..68].fill(0);
        assert_eq!(be32(f, 64), checksum(&zeroed));
    }
}
