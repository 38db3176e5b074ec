//! The replica's chunk digests: what the gateway holds of a disk, one SHA-256 per chunk, for
//! the agent's checksum-based resync (Site Recovery's resync: compare source and replica, send
//! only what differs).
//!
//! The agent asks `GET /api/v1/agent/items/{item}/disks/{disk}/digests`; the gateway reads the
//! item's newest recovery point from the vault and answers a *digest list* in this format
//! (`application/vnd.ferry.digests`), streamed: its size grows with the disk (32 bytes per
//! chunk), so neither side holds it in memory — the gateway writes it to its cache disk, the
//! agent to its state directory, and both read it with [`Reader`], one digest at a time.
//! Layout (version 1), every integer little-endian (also `docs/agent-protocol.md` §9):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `FDGL` |
//! | 4 | 1 | version, 1 |
//! | 5 | 3 | zero |
//! | 8 | 4 | chunk size, bytes |
//! | 12 | 4 | zero |
//! | 16 | 8 | disk size, bytes |
//! | 24 | 8 | digest count, `ceil(disk size / chunk size)` |
//! | 32 | 2 | length `n` of the point id (1..=128) |
//! | 34 | n | the recovery point's id (ASCII, the point the digests describe) |
//! | 34+n | 32 × count | SHA-256 of each chunk's bytes, in chunk order (the last chunk at its own, possibly shorter, length; a zero chunk has the digest of that many zero bytes) |
//! | end | 32 | SHA-256 of everything before it |
//!
//! A list is refused whole if any of it is wrong: bad magic, unknown version, non-zero
//! reserved bytes, a chunk size outside the protocol's, a count that does not match the
//! sizes, a point id that is not printable ASCII, a short body, bytes after the trailer, or a
//! trailer that does not match (a truncated or damaged download is never used as a base).

use std::io::Read;

use sha2::{Digest, Sha256};

/// First bytes of a digest list.
pub const MAGIC: [u8; 4] = *b"FDGL";
/// The version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Length of one digest.
pub const DIGEST_LEN: usize = 32;
/// Length of the fixed part of the header (before the point id).
pub const FIXED_HEADER_LEN: usize = 34;
/// Longest point id.
pub const MAX_POINT_ID: usize = 128;
/// The media type of the answer.
pub const CONTENT_TYPE: &str = "application/vnd.ferry.digests";

/// One chunk's digest.
pub type ChunkDigest = [u8; DIGEST_LEN];

/// What a digest list describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Chunk size, bytes.
    pub chunk_size: u32,
    /// Disk size, bytes.
    pub disk_size: u64,
    /// The recovery point the digests were computed from.
    pub point: String,
}

impl Header {
    /// Number of digests: `ceil(disk_size / chunk_size)`.
    pub fn count(&self) -> u64 {
        self.disk_size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Length of chunk `index` (the last one may be shorter).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let cs = u64::from(self.chunk_size);
        self.disk_size
            .saturating_sub(index.saturating_mul(cs))
            .min(cs)
    }

    /// The encoded header (fixed part and point id).
    pub fn encode(&self) -> Result<Vec<u8>, DigestsError> {
        self.check()?;
        let mut b = Vec::with_capacity(FIXED_HEADER_LEN + self.point.len());
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&self.chunk_size.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.disk_size.to_le_bytes());
        b.extend_from_slice(&self.count().to_le_bytes());
        let n = u16::try_from(self.point.len()).expect("checked: at most 128");
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(self.point.as_bytes());
        Ok(b)
    }

    fn check(&self) -> Result<(), DigestsError> {
        if !(crate::frame::MIN_CHUNK_SIZE..=crate::frame::MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || !self.chunk_size.is_power_of_two()
        {
            return Err(DigestsError::Invalid(format!(
                "chunk size {} is not one the protocol allows (a power of two, {}..={})",
                self.chunk_size,
                crate::frame::MIN_CHUNK_SIZE,
                crate::frame::MAX_CHUNK_SIZE
            )));
        }
        if self.disk_size == 0 {
            return Err(DigestsError::Invalid("disk size is 0".into()));
        }
        if self.point.is_empty()
            || self.point.len() > MAX_POINT_ID
            || !self.point.bytes().all(|c| c.is_ascii_graphic())
        {
            return Err(DigestsError::Invalid(format!(
                "point id is not 1..={MAX_POINT_ID} printable ASCII characters"
            )));
        }
        Ok(())
    }
}

/// The digest of `len` zero bytes (a hole, or a chunk of zeros).
pub fn zero_digest(len: u64) -> ChunkDigest {
    let mut h = Sha256::new();
    let zeros = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(zeros.len() as u64)).expect("at most 64 KiB");
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    h.finalize().into()
}

/// The digest of a chunk's bytes.
pub fn digest(bytes: &[u8]) -> ChunkDigest {
    Sha256::digest(bytes).into()
}

/// Why a digest list was refused.
#[derive(Debug, thiserror::Error)]
pub enum DigestsError {
    /// Reading it failed.
    #[error("reading the digest list: {0}")]
    Io(#[from] std::io::Error),
    /// It is not a valid digest list.
    #[error("digest list: {0}")]
    Invalid(String),
    /// It was written by a newer version.
    #[error("digest list version {0} is newer than this program reads ({VERSION})")]
    FutureVersion(u8),
    /// It ends early.
    #[error("digest list ends after {got} of {want} digests (a truncated download)")]
    Truncated {
        /// Digests read.
        got: u64,
        /// Digests announced.
        want: u64,
    },
    /// Its trailer does not match.
    #[error("digest list is damaged: its SHA-256 trailer does not match")]
    Damaged,
}

/// Writes a digest list: [`Writer::new`] with the header, one [`Writer::push`] per chunk in
/// order, then [`Writer::finish`].
#[derive(Debug)]
pub struct Writer<W: std::io::Write> {
    out: W,
    hash: Sha256,
    want: u64,
    done: u64,
}

impl<W: std::io::Write> Writer<W> {
    /// Starts a list for `header`.
    pub fn new(mut out: W, header: &Header) -> Result<Self, DigestsError> {
        let h = header.encode()?;
        out.write_all(&h)?;
        let mut hash = Sha256::new();
        hash.update(&h);
        Ok(Self {
            out,
            hash,
            want: header.count(),
            done: 0,
        })
    }

    /// Appends the next chunk's digest.
    pub fn push(&mut self, d: &ChunkDigest) -> Result<(), DigestsError> {
        if self.done == self.want {
            return Err(DigestsError::Invalid(format!(
                "more than the {} digests announced",
                self.want
            )));
        }
        self.out.write_all(d)?;
        self.hash.update(d);
        self.done += 1;
        Ok(())
    }

    /// Writes the trailer; every digest must have been pushed.
    pub fn finish(mut self) -> Result<W, DigestsError> {
        if self.done != self.want {
            return Err(DigestsError::Truncated {
                got: self.done,
                want: self.want,
            });
        }
        let t: [u8; 32] = self.hash.finalize().into();
        self.out.write_all(&t)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a digest list one digest at a time; the trailer is checked after the last one (so a
/// caller must not act on the digests before [`Reader::next_digest`] returned `None`, or it
/// should check them all first with [`Reader::verify`]).
#[derive(Debug)]
pub struct Reader<R: Read> {
    input: R,
    header: Header,
    hash: Sha256,
    done: u64,
    finished: bool,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<bool, std::io::Error> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self, DigestsError> {
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        if !read_full(&mut input, &mut fixed)? {
            return Err(DigestsError::Invalid("shorter than its header".into()));
        }
        if fixed[..4] != MAGIC {
            return Err(DigestsError::Invalid(
                "bad magic (not a digest list)".into(),
            ));
        }
        if fixed[4] > VERSION {
            return Err(DigestsError::FutureVersion(fixed[4]));
        }
        if fixed[4] != VERSION {
            return Err(DigestsError::Invalid(format!(
                "version {} is not 1",
                fixed[4]
            )));
        }
        if fixed[5..8] != [0; 3] || fixed[12..16] != [0; 4] {
            return Err(DigestsError::Invalid("reserved bytes are not zero".into()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(fixed[at..at + 8].try_into().expect("8"));
        let chunk_size = u32::from_le_bytes(fixed[8..12].try_into().expect("4"));
        let disk_size = u64_at(16);
        let count = u64_at(24);
        let n = usize::from(u16::from_le_bytes([fixed[32], fixed[33]]));
        if n == 0 || n > MAX_POINT_ID {
            return Err(DigestsError::Invalid(format!(
                "point id length {n} is not 1..={MAX_POINT_ID}"
            )));
        }
        let mut id = vec![0u8; n];
        if !read_full(&mut input, &mut id)? {
            return Err(DigestsError::Invalid("shorter than its header".into()));
        }
        let point = String::from_utf8(id)
            .map_err(|_| DigestsError::Invalid("point id is not ASCII".into()))?;
        let header = Header {
            chunk_size,
            disk_size,
            point,
        };
        header.check()?;
        if count != header.count() {
            return Err(DigestsError::Invalid(format!(
                "{count} digests announced for a {disk_size}-byte disk in {chunk_size}-byte chunks (want {})",
                header.count()
            )));
        }
        let mut hash = Sha256::new();
        hash.update(fixed);
        hash.update(header.point.as_bytes());
        Ok(Self {
            input,
            header,
            hash,
            done: 0,
            finished: false,
        })
    }

    /// What the list describes.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next digest (chunk `index` for the `index`-th call), or `None` after the last one
    /// once the trailer has been checked.
    pub fn next_digest(&mut self) -> Result<Option<ChunkDigest>, DigestsError> {
        if self.finished {
            return Ok(None);
        }
        let want = self.header.count();
        if self.done == want {
            let mut t = [0u8; 32];
            if !read_full(&mut self.input, &mut t)? {
                return Err(DigestsError::Truncated {
                    got: self.done,
                    want,
                });
            }
            let mine: [u8; 32] = self.hash.clone().finalize().into();
            if mine != t {
                return Err(DigestsError::Damaged);
            }
            let mut extra = [0u8; 1];
            if read_full(&mut self.input, &mut extra)? {
                return Err(DigestsError::Invalid("bytes after the trailer".into()));
            }
            self.finished = true;
            return Ok(None);
        }
        let mut d = [0u8; DIGEST_LEN];
        if !read_full(&mut self.input, &mut d)? {
            return Err(DigestsError::Truncated {
                got: self.done,
                want,
            });
        }
        self.hash.update(d);
        self.done += 1;
        Ok(Some(d))
    }

    /// Reads the whole list, checking it, without keeping the digests.
    pub fn verify(mut self) -> Result<Header, DigestsError> {
        while self.next_digest()?.is_some() {}
        Ok(self.header)
    }
}

/// The parser's entry point for the cargo-fuzz target (`fuzz/fuzz_targets/proto_digests.rs`)
/// and the mutation smoke test: any bytes are refused or read, never a panic.
pub mod fuzzing {
    /// Reads `data` as a digest list to its end.
    pub fn decode(data: &[u8]) {
        if let Ok(r) = super::Reader::new(data) {
            let _ = r.verify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(h: &Header) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), h).unwrap();
        for i in 0..h.count() {
            w.push(&digest(&i.to_le_bytes())).unwrap();
        }
        w.finish().unwrap()
    }

    fn header() -> Header {
        Header {
            chunk_size: 64 << 10,
            disk_size: (64 << 10) * 3 + 100,
            point: "20261127T020242.957Z-b3e2bebb".into(),
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = header();
        assert_eq!(h.count(), 4);
        assert_eq!(h.chunk_len(3), 100);
        let b = list(&h);
        assert_eq!(&b[..5], b"FDGL\x01");
        assert_eq!(b.len(), FIXED_HEADER_LEN + h.point.len() + 4 * 32 + 32);
        let mut r = Reader::new(&b[..]).unwrap();
        assert_eq!(r.header(), &h);
        for i in 0u64..4 {
            assert_eq!(r.next_digest().unwrap(), Some(digest(&i.to_le_bytes())));
        }
        assert_eq!(r.next_digest().unwrap(), None);
        assert_eq!(r.next_digest().unwrap(), None);
    }

    #[test]
    fn every_damage_is_refused() {
        let h = header();
        let good = list(&h);
        // Truncated anywhere, or any byte flipped: refused.
        for cut in 0..good.len() {
            assert!(
                Reader::new(&good[..cut]).and_then(Reader::verify).is_err(),
                "cut at {cut}"
            );
        }
        for at in 0..good.len() {
            let mut b = good.clone();
            b[at] ^= 0x40;
            assert!(
                Reader::new(&b[..]).and_then(Reader::verify).is_err(),
                "flip at {at}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        let e = Reader::new(&longer[..])
            .and_then(Reader::verify)
            .unwrap_err();
        assert!(e.to_string().contains("after the trailer"), "{e}");
        let mut future = good.clone();
        future[4] = 2;
        assert!(matches!(
            Reader::new(&future[..]).unwrap_err(),
            DigestsError::FutureVersion(2)
        ));
        let e = Reader::new(&good[..good.len() - 40])
            .and_then(Reader::verify)
            .unwrap_err();
        assert!(
            matches!(e, DigestsError::Truncated { got: 3, want: 4 }),
            "{e}"
        );
    }

    #[test]
    fn writer_checks_its_count_and_header() {
        let h = header();
        let mut w = Writer::new(Vec::new(), &h).unwrap();
        w.push(&[0; 32]).unwrap();
        assert!(matches!(
            w.finish().unwrap_err(),
            DigestsError::Truncated { got: 1, want: 4 }
        ));
        let bad = Header {
            chunk_size: 1000,
            ..h.clone()
        };
        assert!(Writer::new(Vec::new(), &bad).is_err());
        let bad = Header {
            point: "no spaces".into(),
            ..h
        };
        assert!(Writer::new(Vec::new(), &bad).is_err());
    }

    #[test]
    fn zero_digest_is_the_digest_of_zeros() {
        assert_eq!(zero_digest(100), digest(&[0; 100]));
        assert_eq!(zero_digest(200 << 10), digest(&vec![0; 200 << 10]));
    }

    #[test]
    fn mutation_smoke() {
        let good = list(&header());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let mut d = good.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = usize::try_from(x % d.len() as u64).unwrap();
                d[at] = u8::try_from(x >> 56).unwrap();
            }
            fuzzing::decode(&d);
            fuzzing::decode(&d[..usize::try_from(x % d.len() as u64).unwrap()]);
        }
    }
}
