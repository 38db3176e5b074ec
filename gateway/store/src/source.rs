//! Reading a source disk: a raw image file or a block device, or anything else that exposes
//! a virtual disk through [`DiskSource`] (a source adapter reading VMDK or VHDX, bridged by the
//! caller: the store knows nothing of plugins).
//!
//! Sparse files are read by allocated extents only (`SEEK_DATA`/`SEEK_HOLE`): a hole is known
//! to be zero without reading it. Block devices and file systems without hole reporting are
//! treated as one allocated extent.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

/// What ingest reads a disk from. Reads come from one thread, in increasing offsets.
pub trait DiskSource: Send + Sync + std::fmt::Debug {
    /// The disk as messages name it (a path, or `adapter:file`).
    fn name(&self) -> String;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Extents that hold data, sorted and disjoint; everything else is zero and is not read.
    fn data_extents(&self) -> Result<Vec<Range<u64>>>;
    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the disk read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Advisory read-ahead of `[offset, offset + len)`.
    fn prefetch(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Whether `[offset, offset + len)` is known to be zero without reading it, beyond what
    /// [`DiskSource::data_extents`] said (a source that learns its extents as it goes, like a
    /// replication stream, says so here; ingest then stores a hole without reading). Asked in
    /// the same order as reads, before each.
    fn is_hole(&self, offset: u64, len: u64) -> Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
}

impl DiskSource for SourceDisk {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> u64 {
        SourceDisk::size(self)
    }

    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        SourceDisk::data_extents(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        SourceDisk::read_at(self, buf, offset)
    }

    fn prefetch(&self, offset: u64, len: u64) {
        SourceDisk::prefetch(self, offset, len);
    }
}

/// An open source disk.
#[derive(Debug)]
pub struct SourceDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl SourceDisk {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| StoreError::InputIo {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(io(std::io::Error::other("is a directory, not a disk")));
        }
        let size = file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Allocated extents, sorted and disjoint. Falls back to the whole disk where the file
    /// system or device does not report holes.
    pub fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        use rustix::fs::{SeekFrom as RSeek, seek};
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let start = match seek(&self.file, RSeek::Data(pos)) {
                Ok(s) => s,
                Err(rustix::io::Errno::NXIO) => break,
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOTSUP) if pos == 0 => {
                    #[allow(clippy::single_range_in_vec_init)] // one extent: the whole disk
                    return Ok(vec![0..self.size]);
                }
                Err(e) => {
                    return Err(StoreError::InputIo {
                        path: self.path.clone(),
                        source: e.into(),
                    });
                }
            };
            if start >= self.size {
                break;
            }
            let end = match seek(&self.file, RSeek::Hole(start)) {
                Ok(e) => e.min(self.size),
                Err(e) => {
                    return Err(StoreError::InputIo {
                        path: self.path.clone(),
                        source: e.into(),
                    });
                }
            };
            if end <= start {
                break;
            }
            out.push(start..end);
            pos = end;
        }
        Ok(out)
    }

    /// Asks the kernel to start reading `[offset, offset + len)` now (read-ahead for the
    /// chunks the pipeline will want next). Advisory: errors are ignored.
    pub fn prefetch(&self, offset: u64, len: u64) {
        let _ = rustix::fs::fadvise(
            &self.file,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the disk read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.size.saturating_sub(offset);
        let n = usize::try_from(avail).unwrap_or(usize::MAX).min(buf.len());
        self.file
            .read_exact_at(&mut buf[..n], offset)
            .map_err(|source| StoreError::InputIo {
                path: self.path.clone(),
                source,
            })?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// Expands byte ranges to whole chunks and merges them: sorted, disjoint chunk-index ranges.
pub fn chunk_ranges(ranges: &[Range<u64>], chunk_size: u32, disk_size: u64) -> Vec<Range<u64>> {
    let cs = u64::from(chunk_size);
    let total = disk_size.div_ceil(cs);
    let mut v: Vec<Range<u64>> = ranges
        .iter()
        .filter(|r| r.start < r.end)
        .map(|r| (r.start / cs)..r.end.div_ceil(cs).min(total))
        .filter(|r| r.start < r.end)
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Whether chunk-index range `chunk` (in bytes `[a, b)`) touches any data extent.
pub fn overlaps(extents: &[Range<u64>], a: u64, b: u64) -> bool {
    // Extents are sorted: find the first extent ending after `a`.
    let i = extents.partition_point(|e| e.end <= a);
    extents.get(i).is_some_and(|e| e.start < b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_files_report_only_written_extents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 40 << 20).unwrap();
        drop(f);
        let d = SourceDisk::open(&p).unwrap();
        assert_eq!(d.size(), 64 << 20);
        let ex = d.data_extents().unwrap();
        let total: u64 = ex.iter().map(|r| r.end - r.start).sum();
        assert!(total < 4 << 20, "{ex:?}");
        assert!(overlaps(&ex, 8 << 20, (8 << 20) + 1));
        assert!(overlaps(&ex, 40 << 20, (40 << 20) + 4096));
        assert!(!overlaps(&ex, 20 << 20, 30 << 20));
        let mut b = vec![9u8; 8192];
        d.read_at(&mut b, (64 << 20) - 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn missing_files_name_the_path() {
        let e = SourceDisk::open(Path::new("/nonexistent/disk.img")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/disk.img"), "{e}");
    }

    #[test]
    fn chunk_ranges_merge_and_clip() {
        let r = chunk_ranges(
            &[10..20, 65536..65537, 0..1, 200_000..300_000],
            65536,
            250_000,
        );
        assert_eq!(r, vec![0..2, 3..4]);
    }
}
