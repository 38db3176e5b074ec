//! What the VHDX and VHD parsers share: bounds-checked reads of the container, CRC-32C, GUID
//! formatting, little/big-endian field access that never panics, the parent-name rules, and the
//! [`Layer`] trait through which the disk (in `lib.rs`) walks a parent chain without knowing
//! which format each file is.

use ferry_plugin_sdk::adapter::{Error, Reader};
use ferry_plugin_sdk::io::{IoError, ReadAt, read_exact_at};

/// What one file of a chain stores for a run of its virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg {
    /// Stored in this file, as is, starting at this file offset.
    Data(u64),
    /// Stored as zeros (VHDX `ZERO` / `UNMAPPED` blocks).
    Zero,
    /// Not in this file: in the parent, or unallocated when there is none.
    Absent,
}

/// One file of a parent chain (a VHDX or a VHD).
pub(crate) trait Layer {
    /// The reader's name, for messages.
    fn name(&self) -> &str;
    /// Size of the virtual disk this file describes.
    fn virtual_size(&self) -> u64;
    /// What the file stores at `offset` (< virtual size) and for how many bytes (> 0, never past
    /// `end`, which is at most the virtual size).
    fn segment(&self, offset: u64, end: u64) -> Result<(Seg, u64), Error>;
    /// Read `len` bytes of the file at `offset` (a [`Seg::Data`] offset).
    fn read_file(&self, offset: u64, len: usize) -> Result<Vec<u8>, Error>;
    /// The file: its host id (for `Location::Related`) and its allocation map (holes).
    fn reader(&self) -> &Reader;
    /// Whether the bytes `read_file` returns from `offset` are the file's own bytes at that
    /// offset (which the host may then read itself, and whose holes read as zeros), and for how
    /// many bytes that stays so (at least 1, at most `len`, which is more than 0). False where a
    /// replayed VHDX log overlays the file, or past its end.
    fn as_is(&self, offset: u64, len: u64) -> (bool, u64);
}

/// Largest virtual disk either format may describe here (64 TiB, the VHDX limit).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// `v` as a usize, or an error naming `what`.
pub(crate) fn to_usize(v: u64, file: &str, what: &str) -> Result<usize, Error> {
    usize::try_from(v).map_err(|_| Error::invalid(format!("{file}: {what} ({v}) is too large")))
}

/// Read exactly `len` bytes at `offset` of `r`, after checking the range lies within the file:
/// an error naming the file and `what` otherwise.
pub(crate) fn read_checked(
    r: &(impl ReadAt + ?Sized),
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, Error> {
    let size = r.size();
    match offset.checked_add(len) {
        Some(end) if end <= size => {}
        _ => {
            return Err(Error::invalid(format!(
                "{}: {what} at offset {offset} ({len} bytes) lies past the end of the file ({size} bytes)",
                r.name()
            )));
        }
    }
    let len = to_usize(len, &r.name(), what)?;
    read_exact_at(r, offset, len).map_err(|e| io_context(e, &r.name(), what))
}

/// An I/O error with the file and the structure being read.
pub(crate) fn io_context(e: IoError, file: &str, what: &str) -> Error {
    Error::Io(IoError::new(
        e.kind,
        format!("{file}: reading {what}: {}", e.message),
    ))
}

/// Field readers over a byte slice. Out-of-range fields read as zero: callers size the slices
/// first, so this only keeps malformed input from panicking.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}
pub(crate) fn guid_at(b: &[u8], at: usize) -> [u8; 16] {
    b.get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; 16])
}

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)] // i < 256
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32C: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli), as VHDX checksums its headers, region tables and log entries.
#[cfg(test)]
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        let i = (c ^ u32::from(b)).to_le_bytes()[0];
        c = CRC32C[usize::from(i)] ^ (c >> 8);
    }
    !c
}

/// CRC-32C of `data` with the 4-byte checksum field at `at` taken as zero.
pub(crate) fn crc32c_without(data: &[u8], at: usize) -> u32 {
    let mut c = !0u32;
    for (i, &b) in data.iter().enumerate() {
        let b = if (at..at + 4).contains(&i) { 0 } else { b };
        let x = (c ^ u32::from(b)).to_le_bytes()[0];
        c = CRC32C[usize::from(x)] ^ (c >> 8);
    }
    !c
}

/// A GUID stored Microsoft style (first three fields little-endian), as `xxxxxxxx-xxxx-...`.
pub(crate) fn guid_le(g: &[u8; 16]) -> String {
    let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
    let d2 = u16::from_le_bytes([g[4], g[5]]);
    let d3 = u16::from_le_bytes([g[6], g[7]]);
    format!(
        "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]
    )
}

/// A UUID stored big-endian (VHD), as `xxxxxxxx-xxxx-...`.
pub(crate) fn uuid_be(g: &[u8; 16]) -> String {
    let hex: String = g.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A GUID string as written in a parent locator (`{...}`, any case) in the form
/// [`guid_le`] produces.
pub(crate) fn normalize_guid(s: &str) -> String {
    s.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase()
}

/// UTF-16 text (little- or big-endian), up to the first NUL.
pub(crate) fn utf16(b: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// The file name a parent locator's `path` (stored in `field`) points at, for `open_related`:
/// the last component of the path. A path with a `..` component is refused, and so is an
/// absolute path in a field that must be relative (`relative`); the host only opens files next
/// to the child anyway.
pub(crate) fn parent_file_name(
    file: &str,
    field: &str,
    path: &str,
    relative: bool,
) -> Result<String, Error> {
    let path = path.trim_end_matches('\0').trim();
    let bad = |why: &str| {
        Error::invalid(format!(
            "{file}: parent locator {field} `{path}` {why}; the parent must be a file next to the child"
        ))
    };
    let stripped = path
        .strip_prefix("file://localhost")
        .or_else(|| path.strip_prefix("file://"))
        .unwrap_or(path);
    let comps: Vec<&str> = stripped.split(['\\', '/']).collect();
    if comps.contains(&"..") {
        return Err(bad("goes up a directory (`..`)"));
    }
    let absolute = stripped.starts_with(['\\', '/'])
        || stripped.as_bytes().get(1) == Some(&b':')
        || stripped.len() != path.len();
    if relative && absolute {
        return Err(bad("is an absolute path"));
    }
    let name = comps.last().copied().unwrap_or("");
    if name.is_empty() || name == "." || name.contains(':') || name.contains('\0') {
        return Err(bad("has no usable file name"));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let mut b = b"xxxx123456789".to_vec();
        b[..4].copy_from_slice(&[1, 2, 3, 4]);
        assert_eq!(crc32c_without(&b, 0), crc32c(b"\x00\x00\x00\x00123456789"));
    }

    #[test]
    fn parent_names() {
        let f = |p: &str, rel: bool| parent_file_name("c.vhdx", "relative_path", p, rel);
        assert_eq!(f(".\\base.vhdx", true).unwrap(), "base.vhdx");
        assert_eq!(f("base.vhdx", true).unwrap(), "base.vhdx");
        assert_eq!(f("C:\\vms\\base.vhdx", false).unwrap(), "base.vhdx");
        assert_eq!(
            f("file://localhost/Users/a/base.vhd", false).unwrap(),
            "base.vhd"
        );
        let e = f("..\\base.vhdx", true).unwrap_err().to_string();
        assert!(e.contains("relative_path") && e.contains(".."), "{e}");
        let e = f("C:\\vms\\base.vhdx", true).unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        assert!(f("\\\\server\\share\\", false).is_err());
    }

    #[test]
    fn guids() {
        let g = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(guid_le(&g), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(
            normalize_guid("{00112233-4455-6677-8899-AABBCCDDEEFF}"),
            guid_le(&g)
        );
        assert_eq!(uuid_be(&g), "33221100-5544-7766-8899-aabbccddeeff");
    }
}
