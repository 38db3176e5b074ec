//! The chunk index: chunk id → (pack, offset, lengths).
//!
//! The bucket holds the truth in two forms: index segments (`index/<id>`, sealed objects each
//! listing a batch of packs and their blobs) and the trailers of the packs themselves. The
//! local redb file is only a cache of the segments: it is filled from the bucket when a vault is
//! opened (segments not seen yet are loaded) and `rebuild-index` recreates it from pack
//! trailers alone. During ingest nothing is inserted into redb before the segment that lists it
//! is durable in the bucket, so the cache never points at data that a fresh gateway could not
//! find. (`rebuild-index` inserts packs found only through their trailers, then writes a
//! segment listing them.)

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{DecodeError, Reader, Writer};
use crate::error::{Result, StoreError};
use crate::pack::{BlobKind, Compression, PackEntry, PackId, TRAILER_ENTRY_LEN};

const CHUNKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chunks");
const PACKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("packs");
const SEGMENTS: TableDefinition<&str, u64> = TableDefinition::new("segments");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Version of the local cache schema; a mismatch makes the cache be rebuilt.
const LOCAL_SCHEMA: &[u8] = b"1";
/// Version of the segment body.
const SEGMENT_BODY_VERSION: u8 = 1;
/// Prefix of index segments.
pub const INDEX_PREFIX: &str = "index/";

/// Where one blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Its pack.
    pub pack: PackId,
    /// The pack's kind.
    pub kind: BlobKind,
    /// The blob's trailer entry.
    pub entry: PackEntry,
}

impl Location {
    fn encode(&self) -> [u8; 34] {
        let mut b = [0u8; 34];
        b[..16].copy_from_slice(&self.pack.0);
        b[16..24].copy_from_slice(&self.entry.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.entry.stored_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.entry.plain_len.to_le_bytes());
        b[32] = self.entry.compression.to_byte();
        b[33] = self.kind.to_byte();
        b
    }

    fn decode(id: &[u8], b: &[u8]) -> Option<Self> {
        if b.len() != 34 || id.len() != 32 {
            return None;
        }
        let mut pack = [0u8; 16];
        pack.copy_from_slice(&b[..16]);
        let mut cid = [0u8; 32];
        cid.copy_from_slice(id);
        Some(Self {
            pack: PackId(pack),
            kind: BlobKind::from_byte(b[33])?,
            entry: PackEntry {
                id: crate::ChunkId(cid),
                offset: u64::from_le_bytes(b[16..24].try_into().ok()?),
                stored_len: u32::from_le_bytes(b[24..28].try_into().ok()?),
                plain_len: u32::from_le_bytes(b[28..32].try_into().ok()?),
                compression: Compression::from_byte(b[32])?,
            },
        })
    }
}

/// What the index knows of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackInfo {
    /// Key salt.
    pub salt: [u8; 32],
    /// Kind.
    pub kind: BlobKind,
    /// Object size in bytes.
    pub size: u64,
}

/// One pack as listed in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentPack {
    /// Pack id.
    pub id: PackId,
    /// Its info.
    pub info: PackInfo,
    /// Its blobs.
    pub entries: Vec<PackEntry>,
}

/// Encodes a segment body.
pub fn encode_segment(packs: &[SegmentPack]) -> Vec<u8> {
    let n: usize = packs.iter().map(|p| p.entries.len()).sum();
    let mut w = Writer::with_capacity(8 + packs.len() * 64 + n * TRAILER_ENTRY_LEN);
    #[allow(clippy::cast_possible_truncation)] // segments hold a bounded number of packs
    w.u8(SEGMENT_BODY_VERSION).u32(packs.len() as u32);
    for p in packs {
        #[allow(clippy::cast_possible_truncation)] // a pack holds < 2^32 blobs
        w.raw(&p.id.0)
            .u8(p.info.kind.to_byte())
            .raw(&p.info.salt)
            .u64(p.info.size)
            .u32(p.entries.len() as u32);
        for e in &p.entries {
            e.encode(&mut w);
        }
    }
    w.into_inner()
}

/// Decodes a segment body.
pub fn decode_segment(b: &[u8]) -> Result<Vec<SegmentPack>, DecodeError> {
    let mut r = Reader::new(b);
    let v = r.u8("segment version")?;
    if v != SEGMENT_BODY_VERSION {
        return Err(DecodeError::Bad {
            field: "segment version",
            reason: format!("unsupported {v}"),
        });
    }
    let n = r.count("pack count", usize::MAX, 16 + 1 + 32 + 8 + 4)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let id = PackId(r.array("pack id")?);
        let k = r.u8("pack kind")?;
        let kind = BlobKind::from_byte(k).ok_or(DecodeError::Bad {
            field: "pack kind",
            reason: format!("unknown {k}"),
        })?;
        let salt = r.array("pack salt")?;
        let size = r.u64("pack size")?;
        let m = r.count("entry count", usize::MAX, TRAILER_ENTRY_LEN)?;
        let mut entries = Vec::with_capacity(m);
        for _ in 0..m {
            entries.push(PackEntry::decode(&mut r)?);
        }
        out.push(SegmentPack {
            id,
            info: PackInfo { salt, kind, size },
            entries,
        });
    }
    r.finish()?;
    Ok(out)
}

/// The local redb cache of the index.
#[derive(Debug)]
pub struct LocalIndex {
    db: redb::Database,
    path: PathBuf,
}

impl LocalIndex {
    /// Opens or creates the cache for `vault_id`. A cache of another vault or another schema
    /// is discarded and recreated (it is only a cache).
    pub fn open(path: &Path, vault_id: &str) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::local_index(path, e))?;
        }
        let mut db = redb::Database::builder()
            .set_cache_size(64 << 20)
            .create(path)
            .map_err(|e| StoreError::local_index(path, e))?;
        let ok = {
            let r = db
                .begin_read()
                .map_err(|e| StoreError::local_index(path, e))?;
            match r.open_table(META) {
                Ok(t) => {
                    let id = t.get("vault_id").ok().flatten().map(|v| v.value().to_vec());
                    let schema = t.get("schema").ok().flatten().map(|v| v.value().to_vec());
                    id.as_deref() == Some(vault_id.as_bytes())
                        && schema.as_deref() == Some(LOCAL_SCHEMA)
                }
                Err(_) => false,
            }
        };
        if !ok {
            drop(db);
            std::fs::remove_file(path).map_err(|e| StoreError::local_index(path, e))?;
            db = redb::Database::builder()
                .set_cache_size(64 << 20)
                .create(path)
                .map_err(|e| StoreError::local_index(path, e))?;
        }
        let me = Self {
            db,
            path: path.to_path_buf(),
        };
        if !ok {
            me.init_tables(vault_id)?;
        }
        Ok(me)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::local_index(&self.path, e)
    }

    fn init_tables(&self, vault_id: &str) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut m = w.open_table(META).map_err(|e| self.err(e))?;
            m.insert("vault_id", vault_id.as_bytes())
                .map_err(|e| self.err(e))?;
            m.insert("schema", LOCAL_SCHEMA).map_err(|e| self.err(e))?;
            w.open_table(CHUNKS).map_err(|e| self.err(e))?;
            w.open_table(PACKS).map_err(|e| self.err(e))?;
            w.open_table(SEGMENTS).map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// Drops every entry (for `rebuild-index`).
    pub fn clear(&self, vault_id: &str) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        for t in [CHUNKS, PACKS] {
            w.delete_table(t).map_err(|e| self.err(e))?;
        }
        w.delete_table(SEGMENTS).map_err(|e| self.err(e))?;
        w.commit().map_err(|e| self.err(e))?;
        self.init_tables(vault_id)
    }

    /// Where a blob is, if indexed.
    pub fn lookup(&self, id: &crate::ChunkId) -> Result<Option<Location>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let v = t.get(&id.0[..]).map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| Location::decode(&id.0, v.value())))
    }

    /// A reader that keeps one read transaction for many lookups.
    pub fn reader(&self) -> Result<IndexReader> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let chunks = r.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let packs = r.open_table(PACKS).map_err(|e| self.err(e))?;
        Ok(IndexReader {
            chunks,
            packs,
            path: self.path.clone(),
        })
    }

    /// Whether the segment `name` was loaded.
    pub fn has_segment(&self, name: &str) -> Result<bool> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(SEGMENTS).map_err(|e| self.err(e))?;
        Ok(t.get(name).map_err(|e| self.err(e))?.is_some())
    }

    /// Records the packs of a durable segment `name` (or of trailers read by `rebuild-index`
    /// when `name` is `None`) in one transaction.
    pub fn insert(&self, name: Option<&str>, packs: &[SegmentPack]) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut chunks = w.open_table(CHUNKS).map_err(|e| self.err(e))?;
            let mut pt = w.open_table(PACKS).map_err(|e| self.err(e))?;
            let mut n = 0u64;
            for p in packs {
                let mut info = [0u8; 41];
                info[..32].copy_from_slice(&p.info.salt);
                info[32] = p.info.kind.to_byte();
                info[33..].copy_from_slice(&p.info.size.to_le_bytes());
                pt.insert(&p.id.0[..], &info[..]).map_err(|e| self.err(e))?;
                for e in &p.entries {
                    let loc = Location {
                        pack: p.id,
                        kind: p.info.kind,
                        entry: *e,
                    };
                    chunks
                        .insert(&e.id.0[..], &loc.encode()[..])
                        .map_err(|e| self.err(e))?;
                    n += 1;
                }
            }
            if let Some(name) = name {
                let mut s = w.open_table(SEGMENTS).map_err(|e| self.err(e))?;
                s.insert(name, n).map_err(|e| self.err(e))?;
            }
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// Every pack the index knows.
    pub fn packs(&self) -> Result<Vec<(PackId, PackInfo)>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(PACKS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if let Some(x) = decode_pack(k.value(), v.value()) {
                out.push(x);
            }
        }
        Ok(out)
    }

    /// The blobs the index places in `pack` (a scan of the whole index, streamed: used only
    /// for a pack whose own trailer is unreadable).
    pub fn entries_of_pack(&self, pack: &PackId) -> Result<Vec<PackEntry>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(CHUNKS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if let Some(l) = Location::decode(k.value(), v.value())
                && l.pack == *pack
            {
                out.push(l.entry);
            }
        }
        Ok(out)
    }
}

fn decode_pack(k: &[u8], v: &[u8]) -> Option<(PackId, PackInfo)> {
    if k.len() != 16 || v.len() != 41 {
        return None;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(k);
    let mut salt = [0u8; 32];
    salt.copy_from_slice(&v[..32]);
    Some((
        PackId(id),
        PackInfo {
            salt,
            kind: BlobKind::from_byte(v[32])?,
            size: u64::from_le_bytes(v[33..41].try_into().ok()?),
        },
    ))
}

/// Lookups under one read transaction.
pub struct IndexReader {
    chunks: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    packs: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    path: PathBuf,
}

impl std::fmt::Debug for IndexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexReader")
    }
}

impl IndexReader {
    /// Where a blob is, if indexed.
    pub fn lookup(&self, id: &crate::ChunkId) -> Result<Option<Location>> {
        let v = self
            .chunks
            .get(&id.0[..])
            .map_err(|e| StoreError::local_index(&self.path, e))?;
        Ok(v.and_then(|v| Location::decode(&id.0, v.value())))
    }

    /// What the index knows of a pack.
    pub fn pack(&self, id: &PackId) -> Result<Option<PackInfo>> {
        let v = self
            .packs
            .get(&id.0[..])
            .map_err(|e| StoreError::local_index(&self.path, e))?;
        Ok(v.and_then(|v| decode_pack(&id.0, v.value()).map(|x| x.1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ChunkId;

    fn sample() -> Vec<SegmentPack> {
        vec![SegmentPack {
            id: PackId([1; 16]),
            info: PackInfo {
                salt: [2; 32],
                kind: BlobKind::Data,
                size: 1234,
            },
            entries: vec![PackEntry {
                id: ChunkId([3; 32]),
                offset: 32,
                stored_len: 100,
                plain_len: 65536,
                compression: Compression::Zstd,
            }],
        }]
    }

    #[test]
    fn segment_roundtrip_and_truncation() {
        let s = sample();
        let b = encode_segment(&s);
        assert_eq!(decode_segment(&b).unwrap(), s);
        assert!(decode_segment(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn local_index_insert_lookup_and_vault_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("i.redb");
        {
            let idx = LocalIndex::open(&p, "v1").unwrap();
            idx.insert(Some("index/a"), &sample()).unwrap();
            let l = idx.lookup(&ChunkId([3; 32])).unwrap().unwrap();
            assert_eq!(l.pack, PackId([1; 16]));
            assert_eq!(l.entry.plain_len, 65536);
            assert!(idx.has_segment("index/a").unwrap());
            assert_eq!(idx.packs().unwrap().len(), 1);
            let r = idx.reader().unwrap();
            assert_eq!(r.pack(&PackId([1; 16])).unwrap().unwrap().size, 1234);
        }
        {
            // Same vault: kept.
            let idx = LocalIndex::open(&p, "v1").unwrap();
            assert!(idx.lookup(&ChunkId([3; 32])).unwrap().is_some());
            idx.clear("v1").unwrap();
            assert!(idx.lookup(&ChunkId([3; 32])).unwrap().is_none());
            assert!(!idx.has_segment("index/a").unwrap());
            idx.insert(None, &sample()).unwrap();
        }
        // Another vault: discarded.
        let idx = LocalIndex::open(&p, "v2").unwrap();
        assert!(idx.lookup(&ChunkId([3; 32])).unwrap().is_none());
    }
}
