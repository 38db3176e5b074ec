//! Packs: the objects that hold encrypted blobs.
//!
//! A pack is built in memory up to a target size and uploaded create-only. Blobs are appended
//! one after another; an encrypted trailer lists them, so that the index can be rebuilt from
//! packs alone; a plain footer at the very end says where the trailer is and carries the pack's
//! key salt. Layout (all integers little-endian; see `docs/vault-format.md`):
//!
//! ```text
//! header   32 B  "FERRYPAK" | version u16 | kind u8 | 0u8 | 0u32 | pack id [16]
//! blobs          ciphertext of the (maybe zstd-compressed) plaintext || tag,
//!                nonce = blob offset in the pack
//! trailer        ciphertext of (pack id [16] | kind u8 | count u32 | entries) || tag,
//!                nonce = trailer offset
//! footer   52 B  salt [32] | trailer len u32 | blob count u32 | version u16 | kind u8 | 0u8 |
//!                "FERRYEND"
//! ```

use bytes::Bytes;

use crate::codec::{DecodeError, Reader, Writer};
use crate::crypto::{MasterKeys, ObjectCipher, TAG_LEN, offset_nonce, random_bytes};
use crate::{ChunkId, FORMAT_VERSION};

/// Magic at the start of a pack.
pub const PACK_MAGIC: &[u8; 8] = b"FERRYPAK";
/// Magic at the very end of a pack.
pub const PACK_END_MAGIC: &[u8; 8] = b"FERRYEND";
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Footer length.
pub const FOOTER_LEN: usize = 52;
/// Bytes of one trailer entry.
pub const TRAILER_ENTRY_LEN: usize = 32 + 8 + 4 + 4 + 1;
/// Largest plaintext blob (the largest chunk size).
pub const MAX_BLOB: usize = 4 << 20;

/// What a blob holds; packs hold one kind only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// A data chunk of a disk.
    Data,
    /// A disk-tree page.
    Meta,
}

impl BlobKind {
    /// Byte in the format.
    pub fn to_byte(self) -> u8 {
        match self {
            BlobKind::Data => 0,
            BlobKind::Meta => 1,
        }
    }

    /// Parses the format byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Meta),
            _ => None,
        }
    }

    /// Directory under `packs/`.
    pub fn dir(self) -> &'static str {
        match self {
            BlobKind::Data => "data",
            BlobKind::Meta => "meta",
        }
    }
}

/// How a blob's plaintext was stored before encryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// As is (compression did not help).
    None,
    /// zstd frame.
    Zstd,
}

impl Compression {
    /// Byte in the format.
    pub fn to_byte(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
        }
    }

    /// Parses the format byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// A pack's random 128-bit id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PackId(pub [u8; 16]);

impl PackId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(random_bytes())
    }

    /// Object path of the pack.
    pub fn object_name(&self, kind: BlobKind) -> String {
        let h = hex::encode(self.0);
        format!("packs/{}/{}/{}", kind.dir(), &h[..2], h)
    }

    /// Parses `packs/<kind>/<xx>/<hex>`.
    pub fn parse_object_name(name: &str) -> Option<(PackId, BlobKind)> {
        let mut it = name.split('/');
        if it.next()? != "packs" {
            return None;
        }
        let kind = match it.next()? {
            "data" => BlobKind::Data,
            "meta" => BlobKind::Meta,
            _ => return None,
        };
        let _fan = it.next()?;
        let h = it.next()?;
        if it.next().is_some() {
            return None;
        }
        let mut id = [0u8; 16];
        hex::decode_to_slice(h, &mut id).ok()?;
        Some((PackId(id), kind))
    }
}

impl std::fmt::Display for PackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// One blob's place in its pack, as listed in the trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// Chunk or page id.
    pub id: ChunkId,
    /// Offset of the ciphertext in the pack.
    pub offset: u64,
    /// Ciphertext length including the tag.
    pub stored_len: u32,
    /// Plaintext length.
    pub plain_len: u32,
    /// How the plaintext was stored.
    pub compression: Compression,
}

impl PackEntry {
    /// Appends the 49-byte encoding.
    pub fn encode(&self, w: &mut Writer) {
        w.id(&self.id)
            .u64(self.offset)
            .u32(self.stored_len)
            .u32(self.plain_len)
            .u8(self.compression.to_byte());
    }

    /// Reads the 49-byte encoding.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = r.id("entry id")?;
        let offset = r.u64("entry offset")?;
        let stored_len = r.u32("entry stored length")?;
        let plain_len = r.u32("entry plain length")?;
        let c = r.u8("entry compression")?;
        let compression = Compression::from_byte(c).ok_or(DecodeError::Bad {
            field: "entry compression",
            reason: format!("unknown compression {c}"),
        })?;
        if plain_len as usize > MAX_BLOB {
            return Err(DecodeError::Bad {
                field: "entry plain length",
                reason: format!("{plain_len} exceeds {MAX_BLOB}"),
            });
        }
        Ok(Self {
            id,
            offset,
            stored_len,
            plain_len,
            compression,
        })
    }
}

/// AAD of a blob.
pub fn blob_aad(pack: &PackId, kind: BlobKind, e: &PackEntry) -> [u8; 66] {
    let mut a = [0u8; 66];
    a[..10].copy_from_slice(b"ferry.blob");
    a[10..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    a[12..28].copy_from_slice(&pack.0);
    a[28] = kind.to_byte();
    a[29..61].copy_from_slice(&e.id.0);
    a[61] = e.compression.to_byte();
    a[62..66].copy_from_slice(&e.plain_len.to_le_bytes());
    a
}

fn trailer_aad(pack: &PackId, kind: BlobKind, count: u32) -> Vec<u8> {
    let mut w = Writer::with_capacity(40);
    w.raw(b"ferry.trailer")
        .u16(FORMAT_VERSION)
        .raw(&pack.0)
        .u8(kind.to_byte())
        .u32(count);
    w.into_inner()
}

/// HKDF label of a pack key.
pub fn pack_key_label(pack: &PackId) -> Vec<u8> {
    let mut l = b"ferry.pack.v1".to_vec();
    l.extend_from_slice(&pack.0);
    l
}

/// A pack being filled.
#[derive(Debug)]
pub struct PackBuilder {
    id: PackId,
    kind: BlobKind,
    salt: [u8; 32],
    cipher: ObjectCipher,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A sealed pack, ready to upload.
#[derive(Debug, Clone)]
pub struct FinishedPack {
    /// Its id.
    pub id: PackId,
    /// Its kind.
    pub kind: BlobKind,
    /// Key salt.
    pub salt: [u8; 32],
    /// Every byte of the object.
    pub bytes: Bytes,
    /// Its blobs.
    pub entries: Vec<PackEntry>,
}

/// Reusable compression state of one pipeline worker.
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    /// Compresses `plain` when that saves at least 1/64 of it; returns how it is stored and
    /// the bytes to store (borrowed from the scratch buffer or from `plain`).
    pub fn compress<'a>(&'a mut self, plain: &'a [u8]) -> (Compression, &'a [u8]) {
        let bound = zstd::zstd_safe::compress_bound(plain.len());
        self.scratch.resize(bound, 0);
        let compressed = self
            .zstd
            .compress_to_buffer(plain, &mut self.scratch[..])
            .ok()
            .filter(|&n| n < plain.len() - plain.len() / 64);
        match compressed {
            Some(n) => (Compression::Zstd, &self.scratch[..n]),
            None => (Compression::None, plain),
        }
    }

    /// A compressor at zstd `level`.
    pub fn new(level: i32) -> Self {
        Self {
            zstd: zstd::bulk::Compressor::new(level).expect("zstd accepts levels 1..=19"),
            scratch: Vec::new(),
        }
    }
}

impl PackBuilder {
    /// A new, empty pack with room for `capacity` bytes (plus room for the trailer, so a pack
    /// closed at its target never reallocates).
    pub fn new(keys: &MasterKeys, kind: BlobKind, capacity: usize) -> Self {
        let id = PackId::random();
        let salt = random_bytes();
        let cipher = keys.derive_cipher(&salt, &pack_key_label(&id));
        let mut buf = Vec::with_capacity(capacity + (64 << 10));
        let mut w = Writer::with_capacity(HEADER_LEN);
        w.raw(PACK_MAGIC)
            .u16(FORMAT_VERSION)
            .u8(kind.to_byte())
            .u8(0)
            .u32(0)
            .raw(&id.0);
        buf.extend_from_slice(&w.into_inner());
        Self {
            id,
            kind,
            salt,
            cipher,
            buf,
            entries: Vec::new(),
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Compresses (when it helps) and encrypts `plain` as blob `id`. Returns the stored length.
    pub fn add(&mut self, id: ChunkId, plain: &[u8], comp: &mut Compressor) -> u32 {
        let (compression, body) = comp.compress(plain);
        #[allow(clippy::cast_possible_truncation)] // blobs are at most MAX_BLOB
        self.append(id, plain.len() as u32, compression, body)
    }

    /// Encrypts and appends a blob already compressed by [`Compressor::compress`]. Returns the
    /// stored length.
    pub fn append(
        &mut self,
        id: ChunkId,
        plain_len: u32,
        compression: Compression,
        body: &[u8],
    ) -> u32 {
        let start = self.buf.len();
        let offset = start as u64;
        #[allow(clippy::cast_possible_truncation)] // blobs are at most MAX_BLOB (+ zstd bound)
        let entry = PackEntry {
            id,
            offset,
            stored_len: (body.len() + TAG_LEN) as u32,
            plain_len,
            compression,
        };
        self.buf.extend_from_slice(body);
        let aad = blob_aad(&self.id, self.kind, &entry);
        self.cipher
            .seal_tail(&offset_nonce(offset), &aad, &mut self.buf, start);
        self.entries.push(entry);
        entry.stored_len
    }

    /// Writes trailer and footer.
    pub fn finish(mut self) -> FinishedPack {
        #[allow(clippy::cast_possible_truncation)] // a pack holds far fewer than 2^32 blobs
        let count = self.entries.len() as u32;
        let start = self.buf.len();
        let mut w = Writer::with_capacity(self.entries.len() * TRAILER_ENTRY_LEN + 32);
        w.raw(&self.id.0).u8(self.kind.to_byte()).u32(count);
        for e in &self.entries {
            e.encode(&mut w);
        }
        self.buf.extend_from_slice(&w.into_inner());
        let aad = trailer_aad(&self.id, self.kind, count);
        self.cipher
            .seal_tail(&offset_nonce(start as u64), &aad, &mut self.buf, start);
        #[allow(clippy::cast_possible_truncation)] // trailer of < 2^32 entries × 49 bytes
        let trailer_len = (self.buf.len() - start) as u32;
        let mut f = Writer::with_capacity(FOOTER_LEN);
        f.raw(&self.salt)
            .u32(trailer_len)
            .u32(count)
            .u16(FORMAT_VERSION)
            .u8(self.kind.to_byte())
            .u8(0)
            .raw(PACK_END_MAGIC);
        self.buf.extend_from_slice(&f.into_inner());
        FinishedPack {
            id: self.id,
            kind: self.kind,
            salt: self.salt,
            bytes: Bytes::from(self.buf),
            entries: self.entries,
        }
    }
}

/// The parsed footer of a pack.
#[derive(Debug, Clone, Copy)]
pub struct Footer {
    /// Key salt.
    pub salt: [u8; 32],
    /// Trailer ciphertext length.
    pub trailer_len: u32,
    /// Number of blobs.
    pub count: u32,
    /// Kind.
    pub kind: BlobKind,
}

/// Parses the last [`FOOTER_LEN`] bytes of a pack.
pub fn parse_footer(b: &[u8]) -> Result<Footer, String> {
    if b.len() != FOOTER_LEN {
        return Err(format!(
            "footer is {} bytes, expected {FOOTER_LEN}",
            b.len()
        ));
    }
    let mut r = Reader::new(b);
    let salt = r.array::<32>("salt").map_err(|e| e.to_string())?;
    let trailer_len = r.u32("trailer length").map_err(|e| e.to_string())?;
    let count = r.u32("blob count").map_err(|e| e.to_string())?;
    let version = r.u16("version").map_err(|e| e.to_string())?;
    let kind = r.u8("kind").map_err(|e| e.to_string())?;
    let _ = r.u8("reserved").map_err(|e| e.to_string())?;
    let magic = r.bytes(8, "magic").map_err(|e| e.to_string())?;
    if magic != PACK_END_MAGIC {
        return Err("bad footer magic (not a pack, or truncated)".into());
    }
    if version != FORMAT_VERSION {
        return Err(format!("unsupported pack version {version}"));
    }
    let kind = BlobKind::from_byte(kind).ok_or(format!("unknown pack kind {kind}"))?;
    Ok(Footer {
        salt,
        trailer_len,
        count,
        kind,
    })
}

/// Decrypts and parses a trailer. `trailer` is the ciphertext, `offset` where it starts.
pub fn open_trailer(
    keys: &MasterKeys,
    pack: &PackId,
    footer: &Footer,
    offset: u64,
    trailer: &mut [u8],
) -> Result<Vec<PackEntry>, String> {
    let cipher = keys.derive_cipher(&footer.salt, &pack_key_label(pack));
    let aad = trailer_aad(pack, footer.kind, footer.count);
    let plain = cipher
        .open_slice(&offset_nonce(offset), &aad, trailer)
        .map_err(|_| "trailer failed authentication".to_string())?;
    let mut r = Reader::new(plain);
    let id = r.array::<16>("pack id").map_err(|e| e.to_string())?;
    if id != pack.0 {
        return Err("trailer names another pack".into());
    }
    let _kind = r.u8("kind").map_err(|e| e.to_string())?;
    let n = r
        .count("count", usize::MAX, TRAILER_ENTRY_LEN)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(PackEntry::decode(&mut r).map_err(|e| e.to_string())?);
    }
    r.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Why a blob could not be returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// GCM authentication failed.
    #[error("authentication failed")]
    Auth,
    /// zstd could not decompress, or the size is not the recorded one.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The recomputed id differs.
    #[error("content does not match its id")]
    IdMismatch,
}

/// Decrypts, decompresses (capped at the recorded size) and checks one blob.
pub fn open_blob(
    keys: &MasterKeys,
    cipher: &ObjectCipher,
    pack: &PackId,
    kind: BlobKind,
    e: &PackEntry,
    ciphertext: &mut [u8],
) -> Result<Vec<u8>, BlobError> {
    let mut out = Vec::new();
    open_blob_into(keys, cipher, pack, kind, e, ciphertext, &mut out)?;
    Ok(out)
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// [`open_blob`] into a caller's buffer (replaced), reusing this thread's zstd context, so a
/// restore does not allocate and fault in fresh memory for every chunk. `ciphertext` is
/// decrypted in place.
pub fn open_blob_into(
    keys: &MasterKeys,
    cipher: &ObjectCipher,
    pack: &PackId,
    kind: BlobKind,
    e: &PackEntry,
    ciphertext: &mut [u8],
    out: &mut Vec<u8>,
) -> Result<(), BlobError> {
    let aad = blob_aad(pack, kind, e);
    let body = cipher
        .open_slice(&offset_nonce(e.offset), &aad, ciphertext)
        .map_err(|_| BlobError::Auth)?;
    out.clear();
    match e.compression {
        Compression::None => out.extend_from_slice(body),
        Compression::Zstd => {
            let cap = (e.plain_len as usize).min(MAX_BLOB);
            out.reserve(cap);
            DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                let d = match d.as_mut() {
                    Some(d) => d,
                    None => d.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|err| BlobError::Decompress(err.to_string()))?,
                    ),
                };
                d.decompress_to_buffer(body, out)
                    .map_err(|err| BlobError::Decompress(err.to_string()))
            })?;
            if out.len() != e.plain_len as usize {
                return Err(BlobError::Decompress(format!(
                    "got {} bytes, expected {}",
                    out.len(),
                    e.plain_len
                )));
            }
        }
    }
    let id = match kind {
        BlobKind::Data => keys.chunk_id(out),
        BlobKind::Meta => keys.page_id(out),
    };
    if id != e.id {
        return Err(BlobError::IdMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_trailer_and_blobs() {
        let keys = MasterKeys::generate();
        let mut comp = Compressor::new(3);
        let mut p = PackBuilder::new(&keys, BlobKind::Data, 1 << 20);
        let a = vec![7u8; 65536];
        let b: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let ia = keys.chunk_id(&a);
        let ib = keys.chunk_id(&b);
        p.add(ia, &a, &mut comp);
        p.add(ib, &b, &mut comp);
        let f = p.finish();
        assert_eq!(f.entries[0].compression, Compression::Zstd);
        let bytes = f.bytes.to_vec();
        let footer = parse_footer(&bytes[bytes.len() - FOOTER_LEN..]).unwrap();
        assert_eq!(footer.count, 2);
        let t_end = bytes.len() - FOOTER_LEN;
        let t_start = t_end - footer.trailer_len as usize;
        let mut t = bytes[t_start..t_end].to_vec();
        let entries = open_trailer(&keys, &f.id, &footer, t_start as u64, &mut t).unwrap();
        assert_eq!(entries, f.entries);
        let cipher = keys.derive_cipher(&footer.salt, &pack_key_label(&f.id));
        for (e, want) in entries.iter().zip([&a, &b]) {
            let mut ct =
                bytes[e.offset as usize..e.offset as usize + e.stored_len as usize].to_vec();
            let got = open_blob(&keys, &cipher, &f.id, BlobKind::Data, e, &mut ct).unwrap();
            assert_eq!(&got, want);
            // One flipped bit anywhere in the blob is caught.
            let mut bad =
                bytes[e.offset as usize..e.offset as usize + e.stored_len as usize].to_vec();
            bad[3] ^= 0x10;
            assert_eq!(
                open_blob(&keys, &cipher, &f.id, BlobKind::Data, e, &mut bad),
                Err(BlobError::Auth)
            );
        }
        // Wrong kind in the AAD is caught too.
        let e = entries[0];
        let mut ct = bytes[e.offset as usize..e.offset as usize + e.stored_len as usize].to_vec();
        assert_eq!(
            open_blob(&keys, &cipher, &f.id, BlobKind::Meta, &e, &mut ct),
            Err(BlobError::Auth)
        );
    }

    #[test]
    fn object_names_roundtrip() {
        let id = PackId([0xab; 16]);
        let n = id.object_name(BlobKind::Meta);
        assert_eq!(PackId::parse_object_name(&n), Some((id, BlobKind::Meta)));
        assert_eq!(PackId::parse_object_name("packs/data/ab/zz"), None);
    }

    #[test]
    fn bad_footers_are_refused() {
        assert!(parse_footer(&[0u8; 10]).is_err());
        assert!(parse_footer(&[0u8; FOOTER_LEN]).is_err());
    }
}
