//! Output formats of an export: the container a recovery point's disk is written into.
//!
//! Why here, and why like this: restore completes chunks out of order and in parallel (see
//! `crate::restore`), and a disk may be far larger than memory, so every format is written
//! by a [`FormatWriter`] that places each decoded chunk as it arrives, with `pwrite`, and
//! keeps in memory only what is proportional to nothing or to a tiny fraction of the disk
//! (the qcow2 L1 table: 8 bytes per 512 MiB; the qcow2 refcount table: 8 bytes per 2 GiB of
//! file; the streamOptimized grain directory at `finish`: 4 bytes per 32 MiB). Zero chunks
//! are never written, and neither is an all-zero 64 KiB cluster or grain inside a non-zero
//! chunk: holes stay holes in raw and VHD, and stay unallocated clusters, grains or blocks in
//! qcow2, VMDK and VHDX. The metadata that can only be known at the end (qcow2 header and
//! refcounts, VMDK header and grain directory, streamOptimized grain tables and footer, VHD
//! footer, VHDX file identifier) is written by [`FormatWriter::finish`], after the last
//! chunk; until then the file has its temporary name.
//!
//! - [`raw`]: the sparse image, byte for byte.
//! - [`vhd`]: VHD fixed (the raw image plus a 512-byte footer), the format Azure accepts.
//! - [`vhdx`]: VHDX dynamic (Hyper-V), blocks of the chunk size (at least 1 MiB) appended as
//!   their first data arrives, the BAT in the file.
//! - [`qcow2`]: qcow2 version 3, 64 KiB clusters, 16-bit refcounts, clusters appended in the
//!   order chunks complete.
//! - [`vmdk`]: VMDK monolithicSparse (embedded descriptor), 64 KiB grains.
//! - [`vmdk_stream`]: VMDK streamOptimized (OVF/OVA, vSphere), 64 KiB grains deflated on the
//!   decode threads and appended in the order chunks complete, tables and footer at the end.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Result, StoreError};
use crate::restore::ChunkSink;

pub mod qcow2;
pub mod raw;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod vmdk_stream;

/// Cluster (qcow2) and grain (VMDK) size: 64 KiB. The smallest chunk size, so every chunk
/// is a whole number of clusters and starts on a cluster boundary.
pub const CLUSTER: u64 = 64 << 10;
/// [`CLUSTER`] as a length in memory.
const CLUSTER_LEN: usize = 64 << 10;

/// An export's output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportFormat {
    /// Raw sparse image (today's default).
    #[default]
    Raw,
    /// VHD fixed.
    Vhd,
    /// qcow2 version 3.
    Qcow2,
    /// VMDK monolithicSparse.
    Vmdk,
    /// VHDX dynamic.
    Vhdx,
    /// VMDK streamOptimized.
    VmdkStream,
}

impl ExportFormat {
    /// Every supported format, by its command-line name.
    pub const ALL: [ExportFormat; 6] = [
        ExportFormat::Raw,
        ExportFormat::Vhd,
        ExportFormat::Vhdx,
        ExportFormat::Qcow2,
        ExportFormat::Vmdk,
        ExportFormat::VmdkStream,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Vhd => "vhd",
            ExportFormat::Qcow2 => "qcow2",
            ExportFormat::Vmdk => "vmdk",
            ExportFormat::Vhdx => "vhdx",
            ExportFormat::VmdkStream => "vmdk-stream",
        }
    }

    /// The supported names, comma-separated (for messages).
    pub fn names() -> String {
        Self::ALL
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(ExportFormat::Raw),
            "vhd" | "vpc" => Ok(ExportFormat::Vhd),
            "qcow2" => Ok(ExportFormat::Qcow2),
            "vmdk" => Ok(ExportFormat::Vmdk),
            "vhdx" => Ok(ExportFormat::Vhdx),
            "vmdk-stream" | "streamoptimized" | "stream-optimized" => Ok(ExportFormat::VmdkStream),
            _ => Err(format!(
                "unknown export format `{s}`; supported: {}",
                Self::names()
            )),
        }
    }
}

/// How to write an export: the format and its options.
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// The container.
    pub format: ExportFormat,
    /// VHD only: Azure requires a virtual size that is a whole MiB. A disk that is not is
    /// refused unless this is set, in which case the VHD's virtual size is rounded up to the
    /// next MiB and the added tail reads as zeros (the guest sees a slightly larger disk; its
    /// partitions and file systems are unchanged).
    pub vhd_round_up: bool,
}

/// The output file being written, under its temporary name.
#[derive(Debug, Clone)]
pub(crate) struct Output {
    pub file: Arc<File>,
    /// The temporary path (named in errors).
    pub path: PathBuf,
}

impl Output {
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| self.io(source))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|source| self.io(source))
    }

    pub fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::OutputIo {
            path: self.path.clone(),
            source,
        }
    }
}

/// A format writer: a restore sink (chunks in any order, concurrently) that completes the
/// container once every chunk is in.
pub(crate) trait FormatWriter: ChunkSink {
    /// Writes the metadata that depends on what was written (headers, tables, footers) and
    /// gives the file its final length. Called once, after the last chunk.
    fn finish(&self) -> Result<()>;
}

/// What an export of `size` bytes in `format` will look like, checked before any file is
/// created (so a refused export leaves nothing behind).
#[derive(Debug, Clone)]
pub(crate) enum Plan {
    Raw,
    Vhd(vhd::Layout),
    Qcow2(qcow2::Layout),
    Vmdk(vmdk::Layout),
    Vhdx(vhdx::Layout),
    VmdkStream(vmdk_stream::Layout),
}

impl Plan {
    /// Checks that a disk of `size` bytes fits `opts`' format; `disk` and `file_name` are for
    /// messages and the VMDK descriptor.
    pub fn new(opts: FormatOptions, size: u64, disk: &str, file_name: &str) -> Result<Self> {
        Ok(match opts.format {
            ExportFormat::Raw => Plan::Raw,
            ExportFormat::Vhd => Plan::Vhd(vhd::Layout::new(size, opts.vhd_round_up, disk)?),
            ExportFormat::Qcow2 => Plan::Qcow2(qcow2::Layout::new(size, disk)?),
            ExportFormat::Vmdk => Plan::Vmdk(vmdk::Layout::new(size, disk, file_name)?),
            ExportFormat::Vhdx => Plan::Vhdx(vhdx::Layout::new(size, disk)?),
            ExportFormat::VmdkStream => {
                Plan::VmdkStream(vmdk_stream::Layout::new(size, disk, file_name)?)
            }
        })
    }

    /// The writer of this plan into `out` (a new, empty file), for a disk of `size` bytes cut
    /// into chunks of `cs` bytes.
    pub fn writer(self, out: Output, size: u64, cs: u64) -> Result<Arc<dyn FormatWriter>> {
        Ok(match self {
            Plan::Raw => Arc::new(raw::RawWriter::new(out, size, cs, size)?),
            Plan::Vhd(l) => Arc::new(vhd::VhdWriter::new(out, size, cs, l)?),
            Plan::Qcow2(l) => Arc::new(qcow2::Qcow2Writer::new(out, size, cs, l)?),
            Plan::Vmdk(l) => Arc::new(vmdk::VmdkWriter::new(out, size, cs, l)?),
            Plan::Vhdx(l) => Arc::new(vhdx::VhdxWriter::new(out, size, cs, l)?),
            Plan::VmdkStream(l) => Arc::new(vmdk_stream::VmdkStreamWriter::new(out, size, cs, l)?),
        })
    }
}

/// Runs of non-zero [`CLUSTER`]s in `data` (which starts on a cluster boundary; its last
/// cluster may be short): `(first cluster, clusters)` in increasing order. All-zero clusters
/// are left out, so they stay unallocated.
pub(crate) fn nonzero_runs(data: &[u8]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, c) in data.chunks(CLUSTER_LEN).enumerate() {
        if crate::is_all_zero(c) {
            continue;
        }
        let i = i as u64;
        match runs.last_mut() {
            Some((first, n)) if *first + *n == i => *n += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

/// `x` rounded up to a multiple of `to` (a power of two).
pub(crate) fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

#[cfg(test)]
pub(crate) mod testkit {
    //! A memory vault holding one disk with data, zero chunks, holes, a duplicated chunk and a
    //! short tail, exported by the format tests.

    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use super::FormatOptions;
    use crate::{
        Backend, ExportOptions, ImportOptions, InitOptions, OpenOptions, PointSelector, Secret,
        Vault,
    };

    /// Flips one byte in the middle of every data pack of `v` (each re-uploaded under its
    /// name), so that reading any of their blobs fails authentication; returns their names.
    pub async fn damage_data_packs(v: &Vault) -> Vec<String> {
        let mut damaged = Vec::new();
        for m in v.backend.list("packs/data/").await.unwrap() {
            let name = m.location.to_string();
            let mut b = v.backend.get(&name).await.unwrap().to_vec();
            let at = b.len() / 2;
            b[at] ^= 0x55;
            v.backend.delete(&name).await.unwrap();
            assert!(
                v.backend
                    .put_create(&name, bytes::Bytes::from(b))
                    .await
                    .unwrap()
            );
            damaged.push(name);
        }
        assert!(!damaged.is_empty(), "the vault has data packs");
        damaged
    }

    pub async fn vault(dir: &Path, chunk_size: u32) -> Vault {
        Vault::init(
            Backend::open("memory://", &Vec::new(), false).unwrap(),
            &Secret::KeyFile(vec![5; 32]),
            InitOptions {
                chunk_size,
                ..InitOptions::default()
            },
            OpenOptions::new(dir.join("cache")),
        )
        .await
        .unwrap()
    }

    fn noise(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Writes a `size`-byte image: data at the start, a zero cluster written as zeros inside
    /// a data run, holes, two equal clusters far apart (dedup), noise, and data in the last
    /// bytes. Returns its path.
    pub fn image(dir: &Path, size: u64) -> PathBuf {
        let path = dir.join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let c = super::CLUSTER;
        f.write_all_at(&vec![1u8; 65536], 0).unwrap();
        f.write_all_at(&[0u8; 65536], c).unwrap();
        f.write_all_at(&vec![2u8; 1000], 2 * c + 5).unwrap();
        f.write_all_at(&vec![7u8; 65536], 9 * c).unwrap();
        // Past the first VMDK grain table (512 grains) and the first qcow2 L2 table (8192
        // clusters), when the disk is that large.
        if size > 600 * c {
            f.write_all_at(&vec![7u8; 65536], 513 * c).unwrap();
        }
        if size > 8200 * c {
            f.write_all_at(&vec![3u8; 3 * 65536], 8191 * c).unwrap();
        }
        f.write_all_at(&noise(3 * 65536 + 17, 42), 20 * c + 3)
            .unwrap();
        f.write_all_at(&[9u8; 300], size - 300).unwrap();
        path
    }

    /// Imports `image(size)` and exports it in `opts`' format; returns (source, export).
    pub async fn export(
        dir: &Path,
        chunk_size: u32,
        size: u64,
        opts: FormatOptions,
    ) -> (PathBuf, PathBuf) {
        let v = vault(dir, chunk_size).await;
        let src = image(dir, size);
        v.import(ImportOptions::full("web", &src), Arc::default())
            .await
            .unwrap();
        let out = dir.join(format!("out.{}", opts.format));
        let r = v
            .export_as(
                ExportOptions {
                    item: "web".into(),
                    point: PointSelector::Latest,
                    disk: None,
                    out: out.clone(),
                    overwrite: false,
                    sync: false,
                },
                opts,
                Arc::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.format, opts.format);
        (src, out)
    }

    pub fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }
    pub fn be32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }
    pub fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    pub fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        for f in ExportFormat::ALL {
            assert_eq!(f.as_str().parse::<ExportFormat>().unwrap(), f);
        }
        assert_eq!("VPC".parse::<ExportFormat>().unwrap(), ExportFormat::Vhd);
        assert_eq!(
            "streamOptimized".parse::<ExportFormat>().unwrap(),
            ExportFormat::VmdkStream
        );
        let e = "zip".parse::<ExportFormat>().unwrap_err();
        assert!(e.contains("unknown") && e.contains("raw, vhd, vhdx, qcow2, vmdk, vmdk-stream"));
    }

    #[test]
    fn runs_skip_zero_clusters() {
        let c = CLUSTER as usize;
        let mut d = vec![0u8; 5 * c + 10];
        d[3] = 1;
        d[c + 7] = 1;
        d[3 * c] = 1;
        d[5 * c + 9] = 1;
        assert_eq!(nonzero_runs(&d), vec![(0, 2), (3, 1), (5, 1)]);
        assert!(nonzero_runs(&vec![0u8; 4 * c]).is_empty());
    }
}
