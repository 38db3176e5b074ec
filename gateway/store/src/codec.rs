//! Little-endian binary encoding for persisted records.
//!
//! Persisted formats are written by hand with this codec, never by `derive(Serialize)` of
//! internal types, so that a field rename cannot silently change the bytes in a bucket. Every
//! length the reader accepts is capped, so a hostile object cannot make us allocate without
//! bound. The byte layout of each record is documented in `docs/vault-format.md`.

use crate::ChunkId;

/// Longest string a record may hold.
pub const MAX_STR: usize = 4096;

/// Appends fields to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty writer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
        }
    }

    /// One byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Two bytes, little-endian.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Four bytes, little-endian.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Eight bytes, little-endian.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Raw bytes, no length prefix.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A chunk id (32 bytes).
    pub fn id(&mut self, id: &ChunkId) -> &mut Self {
        self.raw(&id.0)
    }

    /// A string: u16 length, then UTF-8 bytes. Panics on strings over [`MAX_STR`], which
    /// callers validate before they get here.
    pub fn str(&mut self, s: &str) -> &mut Self {
        assert!(s.len() <= MAX_STR, "string longer than MAX_STR");
        #[allow(clippy::cast_possible_truncation)] // checked above
        self.u16(s.len() as u16);
        self.raw(s.as_bytes())
    }

    /// The bytes written so far.
    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record ended before a field.
    #[error("truncated: needed {needed} more bytes for {field}")]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A field holds a value that is not allowed.
    #[error("bad {field}: {reason}")]
    Bad {
        /// Field being read.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// Bytes follow the last field.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
}

/// Reads fields from a byte slice, refusing anything out of bounds.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// `n` raw bytes.
    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                field,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// One byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// Two bytes, little-endian.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    /// Four bytes, little-endian.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// Eight bytes, little-endian.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A chunk id.
    pub fn id(&mut self, field: &'static str) -> Result<ChunkId, DecodeError> {
        Ok(ChunkId(self.array(field)?))
    }

    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = usize::from(self.u16(field)?);
        if n > MAX_STR {
            return Err(DecodeError::Bad {
                field,
                reason: format!("string of {n} bytes exceeds {MAX_STR}"),
            });
        }
        let b = self.bytes(n, field)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Bad {
            field,
            reason: "not UTF-8".into(),
        })
    }

    /// A count that must not exceed `max` nor what the remaining bytes could hold at
    /// `min_item_len` bytes each (so a forged count cannot drive a huge allocation).
    pub fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_item_len: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n > max || n.saturating_mul(min_item_len) > self.remaining() {
            return Err(DecodeError::Bad {
                field,
                reason: format!("count {n} does not fit the record"),
            });
        }
        Ok(n)
    }

    /// Fails if bytes remain.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_field_kinds() {
        let mut w = Writer::new();
        w.u8(7)
            .u16(0x1234)
            .u32(0xdead_beef)
            .u64(u64::MAX)
            .str("héllo");
        w.id(&ChunkId([9; 32]));
        let bytes = w.into_inner();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0x1234);
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("d").unwrap(), u64::MAX);
        assert_eq!(r.str("e").unwrap(), "héllo");
        assert_eq!(r.id("f").unwrap(), ChunkId([9; 32]));
        r.finish().unwrap();
    }

    #[test]
    fn truncation_and_forged_counts_are_refused() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert!(matches!(r.u32("x"), Err(DecodeError::Truncated { .. })));
        let mut w = Writer::new();
        w.u32(1_000_000);
        let b = w.into_inner();
        let mut r = Reader::new(&b);
        assert!(matches!(
            r.count("n", usize::MAX, 32),
            Err(DecodeError::Bad { .. })
        ));
        let mut r = Reader::new(&[1, 2]);
        r.u8("a").unwrap();
        assert_eq!(r.finish(), Err(DecodeError::Trailing(1)));
    }
}
