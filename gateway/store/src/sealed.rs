//! Sealed objects: small encrypted records stored as objects of their own (index segments,
//! recovery-point records).
//!
//! ```text
//! magic [8] | version u16 | 0u16 | salt [32] | AES-256-GCM(compression u8 || body) || tag
//! ```
//!
//! The key is HKDF(data key, salt, "ferry.object.v1" || magic) and the nonce is zero: each
//! object has a fresh random salt, hence a key of its own used exactly once. The AAD is the
//! magic, the version and the object's path, so a record copied to another path (another item,
//! another point) fails authentication.

use crate::FORMAT_VERSION;
use crate::codec::{Reader, Writer};
use crate::crypto::{MasterKeys, random_bytes};
use crate::error::{Result, StoreError};

/// Magic of an index segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"FERRYSEG";
/// Magic of a recovery-point record.
pub const POINT_MAGIC: &[u8; 8] = b"FERRYPNT";
/// Magic of an appliance catalog snapshot.
pub const APPLIANCE_MAGIC: &[u8; 8] = b"FERRYAPP";

const HEAD_LEN: usize = 8 + 2 + 2 + 32;
/// Largest body a sealed object may decompress to.
pub const MAX_SEALED_BODY: usize = 256 << 20;

fn aad(magic: &[u8; 8], path: &str) -> Vec<u8> {
    let mut w = Writer::with_capacity(16 + path.len());
    w.raw(magic).u16(FORMAT_VERSION).raw(path.as_bytes());
    w.into_inner()
}

fn label(magic: &[u8; 8]) -> Vec<u8> {
    let mut l = b"ferry.object.v1".to_vec();
    l.extend_from_slice(magic);
    l
}

/// Seals `body` as the object at `path`.
pub fn seal(keys: &MasterKeys, magic: &[u8; 8], path: &str, body: &[u8]) -> Vec<u8> {
    let salt = random_bytes::<32>();
    let mut out = Writer::with_capacity(HEAD_LEN + body.len() / 2 + 64);
    out.raw(magic).u16(FORMAT_VERSION).u16(0).raw(&salt);
    let mut out = out.into_inner();
    let start = out.len();
    match zstd::bulk::compress(body, 3) {
        Ok(c) if c.len() < body.len() => {
            out.push(1);
            out.extend_from_slice(&c);
        }
        _ => {
            out.push(0);
            out.extend_from_slice(body);
        }
    }
    keys.derive_cipher(&salt, &label(magic)).seal_tail(
        &[0; 12],
        &aad(magic, path),
        &mut out,
        start,
    );
    out
}

/// Opens the sealed object at `path`, checking its magic and authenticity.
pub fn open(keys: &MasterKeys, magic: &[u8; 8], path: &str, data: &[u8]) -> Result<Vec<u8>> {
    let mut r = Reader::new(data);
    let m = r
        .bytes(8, "magic")
        .map_err(|e| StoreError::corrupt(path, e.to_string()))?;
    if m != magic {
        return Err(StoreError::corrupt(
            path,
            "wrong magic for this kind of object",
        ));
    }
    let version = r
        .u16("version")
        .map_err(|e| StoreError::corrupt(path, e.to_string()))?;
    if version != FORMAT_VERSION {
        return Err(StoreError::UnsupportedVersion {
            object: path.into(),
            found: version.into(),
            supported: FORMAT_VERSION.into(),
        });
    }
    let _ = r
        .u16("reserved")
        .map_err(|e| StoreError::corrupt(path, e.to_string()))?;
    let salt = r
        .array::<32>("salt")
        .map_err(|e| StoreError::corrupt(path, e.to_string()))?;
    let mut ct = data[HEAD_LEN..].to_vec();
    let plain = keys
        .derive_cipher(&salt, &label(magic))
        .open_slice(&[0; 12], &aad(magic, path), &mut ct)
        .map_err(|_| StoreError::Tampered {
            object: path.into(),
            what: "record".into(),
        })?;
    let (&c, body) = plain
        .split_first()
        .ok_or_else(|| StoreError::corrupt(path, "empty body"))?;
    match c {
        0 => Ok(body.to_vec()),
        1 => zstd::bulk::decompress(body, MAX_SEALED_BODY)
            .map_err(|e| StoreError::corrupt(path, format!("cannot decompress: {e}"))),
        c => Err(StoreError::corrupt(
            path,
            format!("unknown compression {c}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_objects_are_bound_to_their_path() {
        let k = MasterKeys::generate();
        let body = vec![5u8; 1000];
        let s = seal(&k, POINT_MAGIC, "points/a/1", &body);
        assert_eq!(open(&k, POINT_MAGIC, "points/a/1", &s).unwrap(), body);
        assert!(matches!(
            open(&k, POINT_MAGIC, "points/b/1", &s),
            Err(StoreError::Tampered { .. })
        ));
        assert!(matches!(
            open(&k, SEGMENT_MAGIC, "points/a/1", &s),
            Err(StoreError::Corrupt { .. })
        ));
        let mut t = s.clone();
        let n = t.len();
        t[n - 20] ^= 1;
        assert!(matches!(
            open(&k, POINT_MAGIC, "points/a/1", &t),
            Err(StoreError::Tampered { .. })
        ));
        assert!(open(&k, POINT_MAGIC, "points/a/1", &s[..20]).is_err());
    }
}
