//! Key material and every cryptographic operation of the vault.
//!
//! Kept in one module so that the whole crypto design can be reviewed on one screen:
//!
//! - Two 256-bit master keys per vault, made at `init`: the *data key* (encryption) and the
//!   *id key* (chunk ids). They are stored only wrapped, under a key-encryption key (KEK) from a
//!   passphrase (Argon2id) or a key file (HKDF-SHA256).
//! - Chunk id = HMAC-SHA256(id key, plaintext): equal chunks dedup vault-wide, and the bucket
//!   never shows a plain content hash. Tree pages use a domain-separated HMAC.
//! - Each pack and each sealed object has its own AES-256-GCM key, HKDF-SHA256(data key, random
//!   32-byte salt, label). Within a pack the nonce is the blob's byte offset in the pack, which
//!   is unique per blob, so no nonce repeats under one key.
//! - AAD binds the format version, the pack id or object path, the chunk id and the blob kind,
//!   so no blob can be moved or replayed elsewhere without failing authentication.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ChunkId;

/// Length of an AES-GCM tag.
pub const TAG_LEN: usize = 16;

/// A 256-bit secret key, wiped on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// A fresh random key.
    pub fn random() -> Self {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        Self(k)
    }
}

/// Random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// The unwrapped master keys of an open vault.
#[derive(Debug, Clone)]
pub struct MasterKeys {
    pub(crate) data: SecretKey,
    pub(crate) id: SecretKey,
}

impl MasterKeys {
    /// New random keys for a new vault.
    pub fn generate() -> Self {
        Self {
            data: SecretKey::random(),
            id: SecretKey::random(),
        }
    }

    /// Chunk id of a data chunk: HMAC-SHA256(id key, plaintext).
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.id.0)
            .expect("HMAC takes any key length");
        mac.update(plaintext);
        ChunkId(mac.finalize().into_bytes().into())
    }

    /// Id of a tree page: HMAC-SHA256(id key, "ferry.page.v1\0" || page).
    pub fn page_id(&self, page: &[u8]) -> ChunkId {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.id.0)
            .expect("HMAC takes any key length");
        mac.update(b"ferry.page.v1\0");
        mac.update(page);
        ChunkId(mac.finalize().into_bytes().into())
    }

    /// The AES-256-GCM cipher for one pack or sealed object.
    pub fn derive_cipher(&self, salt: &[u8; 32], label: &[u8]) -> ObjectCipher {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), &self.data.0);
        let mut okm = [0u8; 32];
        hk.expand(label, &mut okm)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let cipher = Aes256Gcm::new(&okm.into());
        okm.zeroize();
        ObjectCipher { cipher }
    }

    /// The 64 bytes stored wrapped in the vault config.
    pub(crate) fn to_plain(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.data.0);
        out[32..].copy_from_slice(&self.id.0);
        out
    }

    /// Keys from the 64 bytes `data key || id key` (as stored wrapped in the config).
    pub fn from_plain(b: &[u8]) -> Option<Self> {
        if b.len() != 64 {
            return None;
        }
        let mut data = [0u8; 32];
        let mut id = [0u8; 32];
        data.copy_from_slice(&b[..32]);
        id.copy_from_slice(&b[32..]);
        Some(Self {
            data: SecretKey(data),
            id: SecretKey(id),
        })
    }
}

/// An AES-256-GCM key bound to one pack or object.
#[derive(Clone)]
pub struct ObjectCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for ObjectCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ObjectCipher(<redacted>)")
    }
}

/// The nonce for a blob at `offset` in its pack (offsets are unique within a pack).
pub fn offset_nonce(offset: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&offset.to_le_bytes());
    n
}

/// The authentication failed: the ciphertext, its tag or its context was altered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailed;

impl ObjectCipher {
    /// A cipher straight from a key (used for key wrapping).
    pub fn from_key(key: &SecretKey) -> Self {
        Self {
            cipher: Aes256Gcm::new(&key.0.into()),
        }
    }

    /// Encrypts `buf` in place and appends the tag.
    pub fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>) {
        self.cipher
            .encrypt_in_place(&Nonce::from(*nonce), aad, buf)
            .expect("AES-GCM encrypts messages of any size a pack can hold");
    }

    /// Encrypts `buf[start..]` in place and appends the tag.
    pub fn seal_tail(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>, start: usize) {
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(*nonce), aad, (&mut buf[start..]).into())
            .expect("AES-GCM encrypts messages of any size a pack can hold");
        buf.extend_from_slice(&tag);
    }

    /// Checks the tag at the end of `data` and decrypts the rest in place; returns the
    /// plaintext part.
    pub fn open_slice<'a>(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        data: &'a mut [u8],
    ) -> Result<&'a mut [u8], AuthFailed> {
        if data.len() < TAG_LEN {
            return Err(AuthFailed);
        }
        let (msg, tag) = data.split_at_mut(data.len() - TAG_LEN);
        let tag = aes_gcm::Tag::try_from(&*tag).map_err(|_| AuthFailed)?;
        self.cipher
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, msg.into(), &tag)
            .map_err(|_| AuthFailed)?;
        Ok(msg)
    }

    /// Checks the tag and decrypts `buf` in place (tag removed).
    pub fn open(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut Vec<u8>) -> Result<(), AuthFailed> {
        self.cipher
            .decrypt_in_place(&Nonce::from(*nonce), aad, buf)
            .map_err(|_| AuthFailed)
    }
}

/// Parameters of the Argon2id passphrase KDF, stored in the vault config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for Argon2Params {
    /// OWASP's recommended minimum for Argon2id (19 MiB, 2 passes, 1 lane): strong enough for a
    /// passphrase-protected wrapped key, and light enough that every CLI call stays fast.
    fn default() -> Self {
        Self {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

/// The secret that unlocks a vault.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub enum Secret {
    /// A passphrase (from a file or the environment).
    Passphrase(Vec<u8>),
    /// The bytes of a key file.
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Passphrase(_) => f.write_str("Secret::Passphrase(<redacted>)"),
            Secret::KeyFile(_) => f.write_str("Secret::KeyFile(<redacted>)"),
        }
    }
}

impl Secret {
    /// "passphrase" or "key file", for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Passphrase(_) => "passphrase",
            Secret::KeyFile(_) => "key file",
        }
    }
}

/// Derives the key-encryption key with Argon2id.
pub fn kek_from_passphrase(
    pass: &[u8],
    salt: &[u8; 32],
    p: Argon2Params,
) -> Result<SecretKey, String> {
    let params = argon2::Params::new(p.m_kib, p.t, p.p, Some(32))
        .map_err(|e| format!("bad Argon2id parameters: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(pass, salt, &mut out)
        .map_err(|e| format!("Argon2id failed: {e}"))?;
    Ok(SecretKey(out))
}

/// Derives the key-encryption key from a key file with HKDF-SHA256.
pub fn kek_from_keyfile(file: &[u8], salt: &[u8; 32]) -> SecretKey {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), file);
    let mut out = [0u8; 32];
    hk.expand(b"ferry.kek.keyfile.v1", &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    SecretKey(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ids_are_keyed_and_domain_separated() {
        let a = MasterKeys::generate();
        let b = MasterKeys::generate();
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), a.page_id(b"x"));
    }

    #[test]
    fn seal_open_and_tamper() {
        let k = MasterKeys::generate();
        let c = k.derive_cipher(&[1; 32], b"l");
        let mut buf = b"hello".to_vec();
        c.seal(&offset_nonce(5), b"aad", &mut buf);
        assert_eq!(buf.len(), 5 + TAG_LEN);
        let mut copy = buf.clone();
        c.open(&offset_nonce(5), b"aad", &mut copy).unwrap();
        assert_eq!(copy, b"hello");
        let mut wrong_aad = buf.clone();
        assert!(c.open(&offset_nonce(5), b"aaX", &mut wrong_aad).is_err());
        let mut wrong_nonce = buf.clone();
        assert!(c.open(&offset_nonce(6), b"aad", &mut wrong_nonce).is_err());
        buf[0] ^= 1;
        assert!(c.open(&offset_nonce(5), b"aad", &mut buf).is_err());
        // Another salt gives another key.
        let c2 = k.derive_cipher(&[2; 32], b"l");
        let mut m = b"hello".to_vec();
        c2.seal(&offset_nonce(5), b"aad", &mut m);
        assert!(c.open(&offset_nonce(5), b"aad", &mut m).is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::Passphrase(b"hunter2".to_vec());
        assert!(!format!("{s:?}").contains("hunter2"));
        let k = SecretKey([7; 32]);
        assert!(format!("{k:?}").contains("redacted"));
    }
}
