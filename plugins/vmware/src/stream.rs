//! streamOptimized specifics: the footer and the compressed grains.
//!
//! A streamOptimized VMDK is written front to back (for OVF export), so its header at offset 0
//! may say `gdOffset = GD_AT_END` and the real header is the *footer*, 1024 bytes before the
//! end of the file, framed by a FOOTER marker and the end-of-stream marker. Every grain is a
//! grain marker (`lba: u64`, `size: u32`) followed by `size` bytes of zlib (RFC 1950) data.
//! This module keeps that framing and the inflate call apart from the table walking in
//! [`crate::sparse`], as pure functions over a [`ReadAt`], so it can be fuzzed alone.
//!
//! Inflating is capped at the grain size: a stream that would produce more is refused, so a
//! hostile grain cannot make the adapter allocate more than one grain.

use ferry_plugin_sdk::adapter::Error;
use ferry_plugin_sdk::io::{ReadAt, read_exact_at};

use crate::sparse::{self, Header, SECTOR};

/// End-of-stream marker type.
pub const MARKER_EOS: u32 = 0;
/// Grain table marker type.
pub const MARKER_GT: u32 = 1;
/// Grain directory marker type.
pub const MARKER_GD: u32 = 2;
/// Footer marker type.
pub const MARKER_FOOTER: u32 = 3;

/// Size of a grain marker's header (`lba: u64`, `size: u32`).
pub const GRAIN_MARKER: usize = 12;

/// A metadata marker (`numSectors: u64`, `size: u32` = 0, `type: u32`).
fn marker(b: &[u8]) -> (u64, u32, u32) {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[0..8]);
    let mut s = [0u8; 4];
    s.copy_from_slice(&b[8..12]);
    let mut t = [0u8; 4];
    t.copy_from_slice(&b[12..16]);
    (
        u64::from_le_bytes(v),
        u32::from_le_bytes(s),
        u32::from_le_bytes(t),
    )
}

/// Parse the last 1536 bytes of a streamOptimized file: FOOTER marker, footer header,
/// end-of-stream marker. Returns the footer header.
///
/// # Errors
/// [`Error::Invalid`] naming the file and the marker or field.
pub fn parse_footer(tail: &[u8], name: &str) -> Result<Header, Error> {
    if tail.len() != 1536 {
        return Err(Error::invalid(format!(
            "{name}: footer: expected 1536 bytes of footer markers, got {}",
            tail.len()
        )));
    }
    let (_, size, kind) = marker(&tail[0..16]);
    if size != 0 || kind != MARKER_FOOTER {
        return Err(Error::invalid(format!(
            "{name}: footer: no FOOTER marker 1536 bytes before the end (size {size}, type {kind})"
        )));
    }
    let (val, size, kind) = marker(&tail[1024..1040]);
    if val != 0 || size != 0 || kind != MARKER_EOS {
        return Err(Error::invalid(format!(
            "{name}: footer: no end-of-stream marker in the last 512 bytes"
        )));
    }
    sparse::parse_header(&tail[512..1024], &format!("{name} (footer)"))
}

/// Read and parse the footer of the streamOptimized file behind `r`.
///
/// # Errors
/// As [`parse_footer`], or when the file is too short to hold one.
pub fn read_footer(r: &(impl ReadAt + ?Sized), name: &str) -> Result<Header, Error> {
    let size = r.size();
    if size < 1536 + 512 {
        return Err(Error::invalid(format!(
            "{name}: footer: gdOffset is GD_AT_END but the file ({size} bytes) is too short for \
             a footer"
        )));
    }
    let tail = read_exact_at(r, size - 1536, 1536)?;
    parse_footer(&tail, name)
}

/// Inflate one grain: `marker_and_data` is the grain marker followed by at least its `size`
/// bytes. `lba` is the grain's first sector (the marker must say so); the output is at most
/// `grain_bytes` and at least `needed` bytes (zero-padded to `grain_bytes`).
///
/// # Errors
/// [`Error::Invalid`] for a marker that does not match or a bad or oversized deflate stream.
pub fn inflate_grain(
    marker_and_data: &[u8],
    name: &str,
    lba: u64,
    grain_bytes: usize,
    needed: usize,
) -> Result<Vec<u8>, Error> {
    if marker_and_data.len() < GRAIN_MARKER {
        return Err(Error::invalid(format!(
            "{name}: grain marker of sector {lba}: truncated"
        )));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&marker_and_data[0..8]);
    let mut s = [0u8; 4];
    s.copy_from_slice(&marker_and_data[8..12]);
    let (marker_lba, size) = (u64::from_le_bytes(l), u32::from_le_bytes(s));
    if marker_lba != lba {
        return Err(Error::invalid(format!(
            "{name}: grain marker: lba {marker_lba} where the grain table says {lba}"
        )));
    }
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let Some(data) = marker_and_data.get(GRAIN_MARKER..GRAIN_MARKER.saturating_add(size)) else {
        return Err(Error::invalid(format!(
            "{name}: grain marker of sector {lba}: size {size} runs past the end of the file"
        )));
    };
    let mut out = vec![0u8; grain_bytes];
    let (inflated, rc) =
        zlib_rs::decompress_slice(&mut out, data, zlib_rs::InflateConfig::default());
    let got = inflated.len();
    if rc != zlib_rs::ReturnCode::Ok {
        return Err(Error::invalid(format!(
            "{name}: compressed grain of sector {lba}: {} (over {grain_bytes} bytes or \
             corrupt)",
            rc as i32
        )));
    }
    if got < needed {
        return Err(Error::invalid(format!(
            "{name}: compressed grain of sector {lba}: inflates to {got} bytes, fewer than {needed}"
        )));
    }
    // The rest of `out` is already zero.
    Ok(out)
}

/// Read the grain whose marker is at byte `at` of `r` and inflate it (see [`inflate_grain`]).
///
/// # Errors
/// [`Error::Invalid`] for a marker past the end of the file, an oversized compressed size, or
/// as [`inflate_grain`].
pub fn read_grain(
    r: &(impl ReadAt + ?Sized),
    name: &str,
    at: u64,
    lba: u64,
    grain_bytes: usize,
    needed: usize,
) -> Result<Vec<u8>, Error> {
    let file_size = r.size();
    let past = || {
        Error::invalid(format!(
            "{name}: grain table entry for sector {lba}: the grain marker at byte {at} lies past \
             the end of the file"
        ))
    };
    if at < SECTOR
        || at
            .checked_add(GRAIN_MARKER as u64)
            .is_none_or(|e| e > file_size)
    {
        return Err(past());
    }
    let head = read_exact_at(r, at, GRAIN_MARKER)?;
    let mut s = [0u8; 4];
    s.copy_from_slice(&head[8..12]);
    let size = u64::from(u32::from_le_bytes(s));
    // Deflate never expands by more than a few bytes per 16 KiB block.
    let cap = grain_bytes as u64 + grain_bytes as u64 / 8 + 1024;
    if size == 0 || size > cap {
        return Err(Error::invalid(format!(
            "{name}: grain marker of sector {lba}: compressed size {size} is zero or over \
             {cap} bytes"
        )));
    }
    let total = GRAIN_MARKER as u64 + size;
    if at + total > file_size {
        return Err(past());
    }
    let buf = read_exact_at(r, at, sparse::to_usize(total, name, "grain")?)?;
    inflate_grain(&buf, name, lba, grain_bytes, needed)
}
