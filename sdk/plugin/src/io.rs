//! Byte access that works the same inside the host and in native tests.
//!
//! A source adapter reads its container through the host's `reader` resource, and calling a
//! host import outside WebAssembly is impossible. Parsers are therefore written against the
//! [`ReadAt`] trait, which the SDK implements for the host reader ([`crate::adapter::Reader`])
//! and natively for [`std::fs::File`], `[u8]` and `Vec<u8>`: the same parser code runs in the
//! host, in `cargo test` and under a fuzzer.
//!
//! The native implementations behave like the host where it matters to a plugin: a read longer
//! than [`HOST_READ_CAP`] is refused with [`IoErrorKind::Denied`], a read past the end is
//! [`IoErrorKind::OutOfRange`], and a read that reaches the end returns fewer bytes.

use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

/// The host's default cap on one `reader.read` (1 MiB, the manifest's `max-read-bytes`).
///
/// Read larger ranges in pieces, for example with [`read_exact_at`].
pub const HOST_READ_CAP: u32 = 1 << 20;

/// What a byte range of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated data: must be read.
    Data,
    /// Known to read as zeros (a zeroed grain, a detected all-zero block).
    Zero,
    /// Not allocated in the container: reads as zeros and need not be read at all.
    Unallocated,
}

impl ExtentKind {
    /// Whether the bytes must be read to be known (only [`ExtentKind::Data`]).
    #[must_use]
    pub fn needs_read(self) -> bool {
        self == Self::Data
    }

    /// The WIT name: `data`, `zero` or `unallocated`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Zero => "zero",
            Self::Unallocated => "unallocated",
        }
    }
}

impl fmt::Display for ExtentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A byte range `[offset, offset + length)` and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub length: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// An extent of `length` bytes at `offset`.
    #[must_use]
    pub fn new(offset: u64, length: u64, kind: ExtentKind) -> Self {
        Self {
            offset,
            length,
            kind,
        }
    }

    /// A [`ExtentKind::Data`] extent.
    #[must_use]
    pub fn data(offset: u64, length: u64) -> Self {
        Self::new(offset, length, ExtentKind::Data)
    }

    /// The first byte after the extent (saturating, so a hostile extent cannot overflow).
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Why a host operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoErrorKind {
    /// The range or name is outside what the host allows (past the end, not allow-listed).
    OutOfRange,
    /// The host refused: a size cap, a missing grant, a disallowed host.
    Denied,
    /// The host operation did not finish within its timeout.
    Timeout,
    /// The underlying object could not be read or reached.
    Io,
    /// The object does not exist.
    NotFound,
}

impl fmt::Display for IoErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfRange => "out of range",
            Self::Denied => "denied",
            Self::Timeout => "timed out",
            Self::Io => "I/O error",
            Self::NotFound => "not found",
        })
    }
}

/// A failed host operation (or its native stand-in). The message is for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct IoError {
    /// The category, for code that reacts to it.
    pub kind: IoErrorKind,
    /// What happened, for humans.
    pub message: String,
}

impl IoError {
    /// An error of `kind` with `message`.
    pub fn new(kind: IoErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<std::io::Error> for IoError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::NotFound => IoErrorKind::NotFound,
            K::PermissionDenied => IoErrorKind::Denied,
            K::TimedOut => IoErrorKind::Timeout,
            _ => IoErrorKind::Io,
        };
        Self::new(kind, e.to_string())
    }
}

/// Random read access to one object: a disk image, a block device, a byte buffer, the host's
/// reader.
///
/// The contract follows the WIT `reader` resource:
/// - [`read_at`](ReadAt::read_at) returns exactly `len` bytes, or fewer only when the range
///   reaches the end of the object; an `offset` past the end is an error.
/// - [`allocation`](ReadAt::allocation) describes `[offset, offset + length)` as `data` and
///   `unallocated` extents in order; it may return fewer extents than cover the range (ask
///   again from the end of the last one).
pub trait ReadAt {
    /// A display name (a file name, never a path), for messages.
    fn name(&self) -> String;

    /// Size in bytes.
    fn size(&self) -> u64;

    /// Read `len` bytes at `offset`.
    ///
    /// # Errors
    /// [`IoErrorKind::OutOfRange`] when `offset` is past the end, [`IoErrorKind::Denied`] when
    /// `len` is over the host's cap ([`HOST_READ_CAP`] by default), others as the object fails.
    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError>;

    /// The allocation map of `[offset, offset + length)`.
    ///
    /// The default is one `data` extent for the whole range, right for objects with no notion
    /// of holes.
    ///
    /// # Errors
    /// [`IoErrorKind::OutOfRange`] when the range ends past the object's end.
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
        check_range(self.size(), offset, length)?;
        Ok(if length == 0 {
            Vec::new()
        } else {
            vec![Extent::data(offset, length)]
        })
    }

    /// The host's id of this object when it is a host reader (see
    /// [`crate::adapter::Location::Related`]): `disk.locate` may then point the host straight
    /// at its bytes. `None` for buffers, files and other native readers.
    fn host_id(&self) -> Option<u32> {
        None
    }
}

/// Checks that `[offset, offset + length)` lies within an object of `size` bytes.
fn check_range(size: u64, offset: u64, length: u64) -> Result<(), IoError> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::new(
            IoErrorKind::OutOfRange,
            format!("range {offset}+{length} is outside the object of {size} bytes"),
        )),
    }
}

/// The checks the native readers share with the host: the read cap and the end of the object.
/// Returns the byte range to copy.
fn native_read_range(size: u64, offset: u64, len: u32) -> Result<(u64, u64), IoError> {
    if len > HOST_READ_CAP {
        return Err(IoError::new(
            IoErrorKind::Denied,
            format!("a read of {len} bytes is over the host's cap of {HOST_READ_CAP} bytes"),
        ));
    }
    if offset > size {
        return Err(IoError::new(
            IoErrorKind::OutOfRange,
            format!("offset {offset} is past the end of the object ({size} bytes)"),
        ));
    }
    Ok((offset, offset + u64::from(len).min(size - offset)))
}

impl ReadAt for [u8] {
    fn name(&self) -> String {
        "memory".to_owned()
    }

    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        let (start, end) = native_read_range(self.size(), offset, len)?;
        // Both bounds are at most `self.len()`, so they fit in usize.
        let (start, end) = (to_usize(start), to_usize(end));
        Ok(self[start..end].to_vec())
    }
}

impl ReadAt for Vec<u8> {
    fn name(&self) -> String {
        self.as_slice().name()
    }

    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        self.as_slice().read_at(offset, len)
    }
}

/// A `u64` known to be at most the length of an in-memory buffer.
fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("bounded by a buffer length")
}

/// A plain file or a block device. The size is the end of the file (so block devices, whose
/// metadata length is 0, report their real size), the allocation map is one `data` extent, and
/// the name is `file` (wrap it in [`Named`] to give it one).
#[cfg(any(unix, windows))]
impl ReadAt for std::fs::File {
    fn name(&self) -> String {
        "file".to_owned()
    }

    fn size(&self) -> u64 {
        use std::io::{Seek, SeekFrom};
        // `Seek` for `&File` moves the shared cursor, which reads here never use (they are
        // positioned reads). A file whose end cannot be found reads as empty.
        let mut file = self;
        file.seek(SeekFrom::End(0))
            .or_else(|_| self.metadata().map(|m| m.len()))
            .unwrap_or(0)
    }

    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        let (start, end) = native_read_range(self.size(), offset, len)?;
        let mut buf = vec![0u8; to_usize(end - start)];
        let mut done = 0;
        while done < buf.len() {
            let n = positioned_read(self, &mut buf[done..], start + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }
}

#[cfg(unix)]
fn positioned_read(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn positioned_read(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn name(&self) -> String {
        (**self).name()
    }
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        (**self).read_at(offset, len)
    }
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
        (**self).allocation(offset, length)
    }
    fn host_id(&self) -> Option<u32> {
        (**self).host_id()
    }
}

macro_rules! forward_read_at {
    ($($ptr:ident),*) => {$(
        impl<T: ReadAt + ?Sized> ReadAt for $ptr<T> {
            fn name(&self) -> String {
                (**self).name()
            }
            fn size(&self) -> u64 {
                (**self).size()
            }
            fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
                (**self).read_at(offset, len)
            }
            fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
                (**self).allocation(offset, length)
            }
            fn host_id(&self) -> Option<u32> {
                (**self).host_id()
            }
        }
    )*};
}
forward_read_at!(Box, Rc, Arc);

/// A reader with a display name of your choosing, for readers that have none (files, buffers).
#[derive(Debug, Clone)]
pub struct Named<R> {
    name: String,
    inner: R,
}

impl<R: ReadAt> Named<R> {
    /// `inner`, reporting `name` as its display name.
    pub fn new(name: impl Into<String>, inner: R) -> Self {
        Self {
            name: name.into(),
            inner,
        }
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: ReadAt> ReadAt for Named<R> {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        self.inner.read_at(offset, len)
    }
    fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>, IoError> {
        self.inner.allocation(offset, length)
    }
    fn host_id(&self) -> Option<u32> {
        self.inner.host_id()
    }
}

/// Read exactly `len` bytes at `offset`, in pieces of at most [`HOST_READ_CAP`] bytes.
///
/// A range that fits in one piece returns the reader's buffer as is (no copy): this is the data
/// path of a raw disk.
///
/// # Errors
/// The reader's error, or [`IoErrorKind::Io`] when the object ends before `offset + len`.
pub fn read_exact_at(
    r: &(impl ReadAt + ?Sized),
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, IoError> {
    let short = |got: usize| {
        IoError::new(
            IoErrorKind::Io,
            format!(
                "short read from {}: {got} of {len} bytes at offset {offset} (the object ended)",
                r.name()
            ),
        )
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let cap = HOST_READ_CAP as usize;
    if len <= cap {
        // `len` is at most the cap, a u32.
        let piece = r.read_at(offset, u32::try_from(len).expect("at most the read cap"))?;
        return if piece.len() == len {
            Ok(piece)
        } else {
            Err(short(piece.len()))
        };
    }
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = (len - out.len()).min(cap);
        let piece = r.read_at(
            offset + out.len() as u64,
            u32::try_from(want).expect("at most the read cap"),
        )?;
        let got = piece.len();
        out.extend_from_slice(&piece);
        if got < want {
            return Err(short(out.len()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_clip_at_the_end_and_refuse_past_it() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(
            data.read_at(250, 10).unwrap(),
            vec![250, 251, 252, 253, 254, 255]
        );
        assert_eq!(data.read_at(256, 10).unwrap(), Vec::<u8>::new());
        let e = data.read_at(257, 1).unwrap_err();
        assert_eq!(e.kind, IoErrorKind::OutOfRange);
        let e = data.read_at(0, HOST_READ_CAP + 1).unwrap_err();
        assert_eq!(e.kind, IoErrorKind::Denied);
    }

    #[test]
    fn default_allocation_is_one_data_extent() {
        let data = vec![1u8; 100];
        assert_eq!(data.allocation(10, 20).unwrap(), vec![Extent::data(10, 20)]);
        assert!(data.allocation(100, 0).unwrap().is_empty());
        assert_eq!(
            data.allocation(90, 11).unwrap_err().kind,
            IoErrorKind::OutOfRange
        );
        assert_eq!(
            data.allocation(u64::MAX, 2).unwrap_err().kind,
            IoErrorKind::OutOfRange
        );
    }

    #[test]
    fn file_reads_like_a_buffer() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("ferry-sdk-io-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[7u8; 5000]).unwrap();
        drop(f);
        let f = std::fs::File::open(&path).unwrap();
        assert_eq!(f.size(), 5000);
        assert_eq!(f.read_at(4990, 100).unwrap(), vec![7u8; 10]);
        assert_eq!(
            f.read_at(5001, 1).unwrap_err().kind,
            IoErrorKind::OutOfRange
        );
        assert_eq!(f.allocation(0, 5000).unwrap(), vec![Extent::data(0, 5000)]);
        let named = Named::new("disk.img", f);
        assert_eq!(named.name(), "disk.img");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn read_exact_splits_at_the_cap_and_reports_short_reads() {
        let len = HOST_READ_CAP as usize * 2 + 17;
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let got = read_exact_at(&data, 3, len - 3).unwrap();
        assert_eq!(got, data[3..]);
        let e = read_exact_at(&data, 3, len).unwrap_err();
        assert_eq!(e.kind, IoErrorKind::Io);
        assert!(e.message.contains("short read from memory"), "{e}");
        assert_eq!(read_exact_at(&data, 0, 10).unwrap(), data[..10]);
    }

    #[test]
    fn io_errors_map_from_std() {
        let e: IoError = std::io::Error::from(std::io::ErrorKind::NotFound).into();
        assert_eq!(e.kind, IoErrorKind::NotFound);
        let e: IoError = std::io::Error::from(std::io::ErrorKind::PermissionDenied).into();
        assert_eq!(e.kind, IoErrorKind::Denied);
    }
}
