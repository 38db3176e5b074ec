//! What a source adapter reads: objects the host opened, behind the `source` capability.
//!
//! The plugin gets a `reader` handle, never a path: it learns a display name and a size and
//! reads byte ranges. Related files of multi-file formats are opened by the host on the
//! plugin's request, only by plain file name, only next to the object first handed over, only
//! when the name matches the manifest's `grants.source.related` patterns, and only up to a
//! fixed number of open readers.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::manifest::name_matches;

/// Most readers a plugin instance may hold open at once (the disk plus related files).
pub const MAX_OPEN_READERS: usize = 64;

/// An allocation-map entry of a source object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub offset: u64,
    pub length: u64,
    pub allocated: bool,
}

/// A byte-addressable object the host opened for a plugin.
pub trait SourceObject: Send + Sync + std::fmt::Debug {
    /// Display name (a file name, never a path).
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; returns the bytes read (short only at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Read up to `len` bytes at `offset` into a new buffer (short only at the end).
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let n = self.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }
    /// Allocation map of `[offset, offset + length)`, in order, at most `max` entries.
    fn allocation(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Allocation>>;
    /// Open a related object by plain file name (already checked by the caller).
    fn open_related(&self, name: &str) -> io::Result<Arc<dyn SourceObject>>;
    /// The open file behind this object, when it is one: lets the host have the kernel copy
    /// stored-as-is ranges (`copy_file_range`) instead of reading them through a buffer.
    fn file(&self) -> Option<&File> {
        None
    }
}

/// A small object held in memory: what the host hands an adapter whose source is not a file
/// (the snapshot reference of the EBS adapter). It has no related objects.
#[derive(Debug, Clone)]
pub struct BytesSource {
    name: String,
    bytes: Arc<[u8]>,
}

impl BytesSource {
    pub fn new(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> BytesSource {
        BytesSource {
            name: name.into(),
            bytes: bytes.into(),
        }
    }
}

impl SourceObject for BytesSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let n = buf.len().min(self.bytes.len() - start);
        buf[..n].copy_from_slice(&self.bytes[start..start + n]);
        Ok(n)
    }

    fn allocation(&self, offset: u64, length: u64, _max: usize) -> io::Result<Vec<Allocation>> {
        let end = offset.saturating_add(length).min(self.size());
        Ok(if offset < end {
            vec![Allocation {
                offset,
                length: end - offset,
                allocated: true,
            }]
        } else {
            Vec::new()
        })
    }

    fn open_related(&self, name: &str) -> io::Result<Arc<dyn SourceObject>> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} has no related objects (asked for {name:?})", self.name),
        ))
    }
}

/// A local file or block device.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    name: String,
    dir: PathBuf,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        }
        // Block devices report size 0 in metadata: seek to the end instead.
        let size = if meta.is_file() {
            meta.len()
        } else {
            rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)?
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(FileSource {
            file,
            name,
            dir,
            size,
        })
    }
}

impl SourceObject for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Reads into uninitialised capacity: no zero-filling on the data path.
    fn read_vec(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            // `spare_capacity` appends exactly what pread filled.
            match rustix::io::pread(&self.file, rustix::buffer::spare_capacity(&mut buf), at) {
                Ok(0) => break,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(len);
        Ok(buf)
    }

    fn allocation(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Allocation>> {
        use rustix::fs::{SeekFrom, seek};
        let end = offset.saturating_add(length).min(self.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let data = match seek(&self.file, SeekFrom::Data(pos)) {
                Ok(d) => d.min(end),
                // ENXIO: no data at or after pos. EINVAL/EOPNOTSUPP: no sparse support.
                Err(rustix::io::Errno::NXIO) => end,
                Err(_) => {
                    if out.is_empty() && pos == offset {
                        return Ok(vec![Allocation {
                            offset,
                            length: end - offset,
                            allocated: true,
                        }]);
                    }
                    end
                }
            };
            if data > pos {
                out.push(Allocation {
                    offset: pos,
                    length: data - pos,
                    allocated: false,
                });
                pos = data;
                continue;
            }
            let hole = match seek(&self.file, SeekFrom::Hole(pos)) {
                Ok(h) => h.min(end),
                Err(_) => end,
            };
            let hole = hole.max(pos + 1).min(end);
            out.push(Allocation {
                offset: pos,
                length: hole - pos,
                allocated: true,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn open_related(&self, name: &str) -> io::Result<Arc<dyn SourceObject>> {
        Ok(Arc::new(FileSource::open(&self.dir.join(name))?))
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// Why a related-file request was refused (before touching the filesystem).
pub(crate) fn check_related_name(name: &str, patterns: &[String]) -> Result<(), String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.len() > 255
    {
        return Err(format!(
            "related file name {name:?} must be a plain file name (no path)"
        ));
    }
    if !patterns.iter().any(|p| name_matches(p, name)) {
        return Err(if patterns.is_empty() {
            format!(
                "related file {name:?} refused: the plugin has no grants.source.related patterns"
            )
        } else {
            format!(
                "related file {name:?} refused: it matches none of grants.source.related {patterns:?}"
            )
        });
    }
    Ok(())
}

/// The host side of one `reader` resource.
#[derive(Debug, Clone)]
pub struct ReaderHandle {
    pub(crate) object: Arc<dyn SourceObject>,
    /// The instance-unique number `reader.id` answers and `location.related` names.
    pub(crate) id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn allocation_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.img");
        let mut f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let src = FileSource::open(&path).unwrap();
        let map = src.allocation(0, 64 << 20, 1000).unwrap();
        let total: u64 = map.iter().map(|a| a.length).sum();
        assert_eq!(total, 64 << 20);
        let data: u64 = map.iter().filter(|a| a.allocated).map(|a| a.length).sum();
        assert!((1 << 20..16 << 20).contains(&data), "{map:?}");
        let mut buf = vec![0u8; 4096];
        assert_eq!(src.read_at(&mut buf, 8 << 20).unwrap(), 4096);
        assert!(buf.iter().all(|&b| b == 7));
        assert_eq!(src.read_at(&mut buf, (64 << 20) - 100).unwrap(), 100);
    }

    #[test]
    fn related_names_are_plain_and_granted() {
        let pats = vec!["*-flat.vmdk".to_string()];
        assert!(check_related_name("a-flat.vmdk", &pats).is_ok());
        assert!(check_related_name("../a-flat.vmdk", &pats).is_err());
        assert!(check_related_name("x/a-flat.vmdk", &pats).is_err());
        assert!(check_related_name("a.vmdk", &pats).is_err());
        assert!(check_related_name("a-flat.vmdk", &[]).is_err());
    }
}
