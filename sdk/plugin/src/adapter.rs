//! Source adapters: plugins that understand a disk container format.
//!
//! The host opens a source object (an image file, a block device, a snapshot) and hands the
//! plugin a [`Reader`] for it. The plugin implements two traits:
//!
//! - [`SourceAdapter`]: what the plugin is ([`SourceAdapter::info`]), whether it recognises a
//!   header ([`SourceAdapter::probe`]) and how it opens a container
//!   ([`SourceAdapter::open`]).
//! - [`Disk`]: one opened virtual disk: its size and layout, its bytes, and the translation of
//!   the source's change-tracking document into changed extents.
//!
//! and exports them with [`crate::export_source_adapter!`]. Everything here is plain Rust: the
//! same code runs natively over a [`Reader::new`] of a buffer or a file, which is how adapters
//! are unit-tested and fuzzed.
//!
//! Disk methods take `&self` (the host may call them in any order, one at a time); keep caches in
//! a `RefCell` or `Cell`.

use std::fmt;

use crate::io::{Extent, ExtentKind, IoError, ReadAt};

/// Most extents one [`Disk::extents`] call may return; the caller asks again from the end of
/// the last one.
pub const MAX_EXTENTS: usize = 65_536;

/// Most bytes one [`Disk::read`] may be asked for (4 MiB).
pub const MAX_DISK_READ: u32 = 4 << 20;

/// Most bytes of header [`SourceAdapter::probe`] is given (64 KiB; fewer for a smaller object).
pub const MAX_PROBE_HEADER: usize = 64 << 10;

/// Describes the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Short name, for example `vmware`.
    pub name: String,
    /// The plugin's own version (semver); `env!("CARGO_PKG_VERSION")` is the usual value.
    pub version: String,
    /// Formats it reads, for example `["vmdk"]`.
    pub formats: Vec<String>,
    /// One line for humans.
    pub description: String,
}

/// The virtual disk an opened container exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Format name, for example `raw` or `vmdk-monolithic-sparse`.
    pub format: String,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Logical sector size in bytes (usually 512).
    pub logical_sector_size: u32,
    /// Physical sector size in bytes (512 or 4096).
    pub physical_sector_size: u32,
    /// The format's own disk identifier, if it has one.
    pub disk_id: Option<String>,
    /// The name of the parent (differencing disks), as recorded in the container.
    pub parent: Option<String>,
}

/// Where the bytes of a range of the virtual disk are stored (see [`Disk::locate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// In the opened object at this byte offset, stored as is: the host reads them itself.
    Source(u64),
    /// Zeros: nothing to read.
    Zero,
    /// Only [`Disk::read`] can produce them.
    Adapter,
    /// In a related object the adapter holds open ([`crate::io::ReadAt::host_id`] of its
    /// reader), at `offset`, stored as is: the host reads them itself. Only host readers have
    /// an id; answer [`Location::Adapter`] for others.
    Related {
        /// The reader's host id.
        reader: u32,
        /// Byte offset in that object.
        offset: u64,
    },
}

/// One piece of a virtual range and where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Start of the piece in the virtual disk.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u64,
    /// Where its bytes are.
    pub location: Location,
}

impl Mapping {
    /// Whether a piece starting where this one ends and stored at `next` continues it: zeros
    /// after zeros, adapter reads after adapter reads, or the next byte of the same object.
    /// Adapters merge such pieces to keep their `locate` answers short.
    #[must_use]
    pub fn continues_with(&self, next: Location) -> bool {
        match (self.location, next) {
            (Location::Source(a), Location::Source(b)) => a.checked_add(self.length) == Some(b),
            (
                Location::Related {
                    reader: r,
                    offset: a,
                },
                Location::Related {
                    reader: r2,
                    offset: b,
                },
            ) => r == r2 && a.checked_add(self.length) == Some(b),
            (Location::Zero, Location::Zero) | (Location::Adapter, Location::Adapter) => true,
            _ => false,
        }
    }
}

/// Append the extent `[start, start + len)` of `kind` to `out`, merged into the last one when
/// it continues it. `false` (nothing appended) when `out` already holds [`MAX_EXTENTS`]: the
/// answer is full, stop short there.
pub fn push_extent(out: &mut Vec<Extent>, start: u64, len: u64, kind: ExtentKind) -> bool {
    if let Some(last) = out.last_mut()
        && last.kind == kind
        && last.end() == start
    {
        last.length += len;
        return true;
    }
    if out.len() == MAX_EXTENTS {
        return false;
    }
    out.push(Extent::new(start, len, kind));
    true
}

/// An error an adapter returns on purpose (as opposed to a panic, which traps).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The container (or a document) is malformed; the message says where and how.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A valid container using a feature this adapter does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A range outside the virtual disk, or a request over a documented cap.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// A host read failed.
    #[error("reading the source: {0}")]
    Io(#[from] IoError),
}

impl Error {
    /// [`Error::Invalid`] with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    /// [`Error::Unsupported`] with `message`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::Unsupported(message.into())
    }

    /// [`Error::OutOfRange`] with `message`.
    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::OutOfRange(message.into())
    }
}

impl From<crate::config::InvalidConfig> for Error {
    fn from(e: crate::config::InvalidConfig) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// A plugin that reads one kind of source container. The type itself holds no state (the WIT
/// functions are free functions); state lives in the [`Disk`] that [`SourceAdapter::open`]
/// returns.
pub trait SourceAdapter: 'static {
    /// The opened virtual disk.
    type Disk: Disk;

    /// Describes the plugin.
    fn info() -> PluginInfo;

    /// Cheap check: could an object starting with `header` (its first bytes, at most
    /// [`MAX_PROBE_HEADER`], fewer when the object is smaller) be read by this adapter?
    fn probe(header: &[u8]) -> bool;

    /// Open the container behind `reader`: validate what is needed and keep the reader for
    /// later calls.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed container, [`Error::Unsupported`] for a feature the
    /// adapter lacks, [`Error::Io`] when the host read fails.
    fn open(reader: Reader) -> Result<Self::Disk, Error>;
}

/// One opened virtual disk.
pub trait Disk: 'static {
    /// The virtual disk's format, size and identity.
    fn info(&self) -> DiskInfo;

    /// The layout of `[offset, offset + length)`: extents in order, without gaps or overlaps,
    /// at most [`MAX_EXTENTS`] of them (the caller asks again from the end of the last one).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for a range outside the virtual disk; others as the container
    /// fails.
    fn extents(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error>;

    /// Where the bytes of `[offset, offset + length)` are stored: mappings in order and
    /// without gaps from `offset`, possibly stopping short (at most [`MAX_EXTENTS`]). The host
    /// reads [`Location::Source`] ranges itself at native speed and calls [`Disk::read`] only
    /// for [`Location::Adapter`] ones; this is the data path.
    ///
    /// The default maps everything to [`Location::Adapter`] (always correct, slowest).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for a range outside the virtual disk.
    fn locate(&self, offset: u64, length: u64) -> Result<Vec<Mapping>, Error> {
        check_range(self.info().virtual_size, offset, length)?;
        Ok(vec![Mapping {
            offset,
            length,
            location: Location::Adapter,
        }])
    }

    /// Read `len` bytes (at most [`MAX_DISK_READ`]) at `offset`; the range lies within the
    /// virtual size ([`check_read`] checks both).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for a bad range; others as the container fails.
    fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, Error>;

    /// Start translating a source's change-tracking document (its format is the adapter's to
    /// define) into the changed extents of the virtual disk. Validate the document here; hand
    /// the extents out from the returned [`ChangeSet`] ([`ChangeList`] when they are all known
    /// at once).
    ///
    /// The default refuses: an adapter without change tracking forces full reads.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a malformed document, [`Error::Unsupported`] when the adapter
    /// translates none.
    fn changes(&self, document: &[u8]) -> Result<Box<dyn ChangeSet>, Error> {
        let _ = document;
        Err(Error::unsupported(
            "this adapter translates no change-tracking document",
        ))
    }
}

/// The changes found by [`Disk::changes`], handed out in batches. Each `next` call runs under
/// its own deadline, so an adapter that must read the disk to find changes does a bounded
/// amount of work per call.
pub trait ChangeSet: 'static {
    /// The next changed extents, in order and after those already returned, at most `max`.
    /// `None` when there are no more; `Some` of an empty list when this call found none yet.
    ///
    /// # Errors
    /// As the container or the host read fails.
    fn next(&mut self, max: usize) -> Result<Option<Vec<Extent>>, Error>;

    /// Every remaining extent, adjacent ones of the same kind merged as the host merges them
    /// (natively, in tests).
    ///
    /// # Errors
    /// The first error of [`ChangeSet::next`].
    fn drain(&mut self) -> Result<Vec<Extent>, Error> {
        let mut all: Vec<Extent> = Vec::new();
        while let Some(batch) = self.next(MAX_EXTENTS)? {
            for e in batch {
                match all.last_mut() {
                    Some(prev) if prev.offset + prev.length == e.offset && prev.kind == e.kind => {
                        prev.length += e.length;
                    }
                    _ => all.push(e),
                }
            }
        }
        Ok(all)
    }
}

/// A change set whose extents are all known up front (a change-tracking document that lists
/// them).
#[derive(Debug, Clone, Default)]
pub struct ChangeList {
    extents: std::collections::VecDeque<Extent>,
}

impl ChangeList {
    /// The extents, in order.
    pub fn new(extents: Vec<Extent>) -> ChangeList {
        ChangeList {
            extents: extents.into(),
        }
    }

    /// Boxed, as [`Disk::changes`] returns it.
    pub fn boxed(extents: Vec<Extent>) -> Box<dyn ChangeSet> {
        Box::new(ChangeList::new(extents))
    }
}

impl ChangeSet for ChangeList {
    fn next(&mut self, max: usize) -> Result<Option<Vec<Extent>>, Error> {
        if self.extents.is_empty() {
            return Ok(None);
        }
        let n = max.max(1).min(self.extents.len());
        Ok(Some(self.extents.drain(..n).collect()))
    }
}

/// Check that `[offset, offset + length)` lies within a disk of `virtual_size` bytes, and return
/// its end.
///
/// # Errors
/// [`Error::OutOfRange`] naming the range and the size.
pub fn check_range(virtual_size: u64, offset: u64, length: u64) -> Result<u64, Error> {
    match offset.checked_add(length) {
        Some(end) if end <= virtual_size => Ok(end),
        _ => Err(Error::out_of_range(format!(
            "range {offset}+{length} is outside the virtual disk of {virtual_size} bytes"
        ))),
    }
}

/// [`check_range`] for a [`Disk::read`], which also caps `len` at [`MAX_DISK_READ`].
///
/// # Errors
/// [`Error::OutOfRange`] naming the range, the size or the cap.
pub fn check_read(virtual_size: u64, offset: u64, len: u32) -> Result<u64, Error> {
    if len > MAX_DISK_READ {
        return Err(Error::out_of_range(format!(
            "a read of {len} bytes is over the cap of {MAX_DISK_READ} bytes"
        )));
    }
    check_range(virtual_size, offset, u64::from(len))
}

/// The object the host opened for this adapter (or a related file), or natively any
/// [`ReadAt`] wrapped with [`Reader::new`].
///
/// Read it through the [`ReadAt`] trait. Inside the host each call is a host call: prefer few
/// large reads (up to [`crate::io::HOST_READ_CAP`]) over many small ones.
pub struct Reader {
    inner: Inner,
}

enum Inner {
    Host(crate::bindings::adapter::ferry::plugin::source::Reader),
    Local(Box<dyn ReadAt>),
}

impl Reader {
    /// A reader over any [`ReadAt`]: a buffer or a file in native tests, or a decoded buffer
    /// that the plugin itself wants to parse as a nested container.
    pub fn new(inner: impl ReadAt + 'static) -> Self {
        Self {
            inner: Inner::Local(Box::new(inner)),
        }
    }

    pub(crate) fn from_host(r: crate::bindings::adapter::ferry::plugin::source::Reader) -> Self {
        Self {
            inner: Inner::Host(r),
        }
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::Host(_) => "host",
            Inner::Local(_) => "local",
        };
        f.debug_struct("Reader")
            .field("kind", &kind)
            .field("name", &self.name())
            .finish()
    }
}

impl ReadAt for Reader {
    fn name(&self) -> String {
        match &self.inner {
            Inner::Host(r) => r.name(),
            Inner::Local(r) => r.name(),
        }
    }

    fn size(&self) -> u64 {
        match &self.inner {
            Inner::Host(r) => r.size(),
            Inner::Local(r) => r.size(),
        }
    }

    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        match &self.inner {
            Inner::Host(r) => r.read(offset, len).map_err(Into::into),
            Inner::Local(r) => r.read_at(offset, len),
        }
    }

    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
        match &self.inner {
            Inner::Host(r) => r
                .allocation(offset, length)
                .map(|extents| extents.into_iter().map(Into::into).collect())
                .map_err(Into::into),
            Inner::Local(r) => r.allocation(offset, length),
        }
    }

    fn host_id(&self) -> Option<u32> {
        match &self.inner {
            Inner::Host(r) => Some(r.id()),
            Inner::Local(r) => r.host_id(),
        }
    }
}

/// Open a file related to the opened object (a VMDK extent, a VHDX parent) by the name the
/// format records. The host resolves it next to the opened object and checks it against the
/// manifest's `source.related` allow-list; a name with a path separator or `..` is refused.
/// Natively, names registered with `testing::add_related` are found.
///
/// # Errors
/// [`crate::io::IoErrorKind::Denied`] for a name not allowed,
/// [`crate::io::IoErrorKind::NotFound`] for a missing file.
pub fn open_related(name: &str) -> Result<Reader, IoError> {
    crate::host::open_related(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoErrorKind;

    #[test]
    fn range_checks_name_the_range() {
        assert_eq!(check_range(100, 90, 10).unwrap(), 100);
        let e = check_range(100, 90, 11).unwrap_err();
        assert_eq!(
            e.to_string(),
            "out of range: range 90+11 is outside the virtual disk of 100 bytes"
        );
        assert!(check_range(100, u64::MAX, 1).is_err());
        assert!(check_read(u64::MAX, 0, MAX_DISK_READ).is_ok());
        assert!(matches!(
            check_read(u64::MAX, 0, MAX_DISK_READ + 1),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn local_reader_forwards() {
        let r = Reader::new(crate::io::Named::new("x.img", vec![5u8; 10]));
        assert_eq!(r.name(), "x.img");
        assert_eq!(r.size(), 10);
        assert_eq!(r.read_at(8, 4).unwrap(), vec![5, 5]);
        assert!(format!("{r:?}").contains("x.img"));
    }

    #[test]
    fn related_readers_natively() {
        crate::testing::reset();
        crate::testing::add_related("base.vmdk", vec![1u8, 2, 3]);
        let r = open_related("base.vmdk").unwrap();
        assert_eq!(r.read_at(0, 3).unwrap(), vec![1, 2, 3]);
        assert_eq!(
            open_related("other.vmdk").unwrap_err().kind,
            IoErrorKind::NotFound
        );
        assert_eq!(
            open_related("../base.vmdk").unwrap_err().kind,
            IoErrorKind::Denied
        );
    }
}
