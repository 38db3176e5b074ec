//! The vault's `config` object: format version, vault id, KDF parameters and wrapped keys.
//!
//! It is the only plaintext object of a vault and the first one written; `init` creates it
//! with a conditional create, so two concurrent `init`s cannot both succeed. It is JSON so an
//! operator can read it (`docs/vault-format.md` lists every field). Its struct is a dedicated
//! format type, not an internal one: renaming a field here is a format change.

use serde::{Deserialize, Serialize};

use crate::crypto::{
    Argon2Params, MasterKeys, ObjectCipher, Secret, kek_from_keyfile, kek_from_passphrase,
    random_bytes,
};
use crate::error::{Result, StoreError};

/// Object name of the config.
pub const CONFIG_OBJECT: &str = "config";
/// Value of the `format` field.
pub const FORMAT_NAME: &str = "ferry-vault";
/// Shortest key file accepted.
pub const MIN_KEYFILE_LEN: usize = 32;

/// The `config` object, version 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// Always `ferry-vault`.
    pub format: String,
    /// Format version of the vault (1).
    pub version: u32,
    /// 128-bit random vault id, hex.
    pub vault_id: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Default chunk size for new disks, bytes.
    pub chunk_size: u32,
    /// How the key-encryption key is derived.
    pub kdf: Kdf,
    /// The master keys wrapped under the KEK.
    pub keys: WrappedKeys,
}

/// Key derivation for the KEK.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "algorithm", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Kdf {
    /// Argon2id over a passphrase.
    Argon2id {
        /// Memory, KiB.
        m_kib: u32,
        /// Passes.
        t: u32,
        /// Lanes.
        p: u32,
        /// 32-byte salt, hex.
        salt: String,
    },
    /// HKDF-SHA256 over the bytes of a key file.
    KeyFile {
        /// 32-byte salt, hex.
        salt: String,
    },
}

/// AES-256-GCM wrapping of the 64 bytes `data key || id key`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WrappedKeys {
    /// 12-byte nonce, hex.
    pub nonce: String,
    /// 64 + 16 bytes, hex.
    pub ciphertext: String,
}

fn wrap_aad(vault_id: &str) -> Vec<u8> {
    let mut a = b"ferry.keys.v1".to_vec();
    a.extend_from_slice(vault_id.as_bytes());
    a
}

fn hex32(s: &str, what: &str) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| StoreError::InvalidConfig(format!("{what} is not 32 bytes of hex")))?;
    Ok(out)
}

impl VaultConfig {
    /// Makes a config for new keys protected by `secret`.
    pub fn create(
        keys: &MasterKeys,
        secret: &Secret,
        argon: Argon2Params,
        chunk_size: u32,
        created: String,
    ) -> Result<Self> {
        let vault_id = hex::encode(random_bytes::<16>());
        let salt = random_bytes::<32>();
        let (kek, kdf) = match secret {
            Secret::Passphrase(p) => (
                kek_from_passphrase(p, &salt, argon).map_err(StoreError::Secret)?,
                Kdf::Argon2id {
                    m_kib: argon.m_kib,
                    t: argon.t,
                    p: argon.p,
                    salt: hex::encode(salt),
                },
            ),
            Secret::KeyFile(k) => {
                check_keyfile(k)?;
                (
                    kek_from_keyfile(k, &salt),
                    Kdf::KeyFile {
                        salt: hex::encode(salt),
                    },
                )
            }
        };
        let nonce = random_bytes::<12>();
        let mut buf = keys.to_plain().to_vec();
        ObjectCipher::from_key(&kek).seal(&nonce, &wrap_aad(&vault_id), &mut buf);
        Ok(Self {
            format: FORMAT_NAME.into(),
            version: u32::from(crate::FORMAT_VERSION),
            vault_id,
            created,
            chunk_size,
            kdf,
            keys: WrappedKeys {
                nonce: hex::encode(nonce),
                ciphertext: hex::encode(buf),
            },
        })
    }

    /// Parses and checks the config object.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let c: VaultConfig = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::InvalidConfig(format!("not a Ferry vault config: {e}")))?;
        if c.format != FORMAT_NAME {
            return Err(StoreError::InvalidConfig(format!(
                "format is `{}`, expected `{FORMAT_NAME}`",
                c.format
            )));
        }
        if c.version != u32::from(crate::FORMAT_VERSION) {
            return Err(StoreError::UnsupportedVersion {
                object: CONFIG_OBJECT.into(),
                found: c.version,
                supported: crate::FORMAT_VERSION.into(),
            });
        }
        crate::check_chunk_size(c.chunk_size).map_err(StoreError::InvalidConfig)?;
        Ok(c)
    }

    /// JSON bytes of the config.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("config serialises");
        v.push(b'\n');
        v
    }

    /// Unwraps the master keys with `secret`.
    pub fn unwrap_keys(&self, secret: &Secret) -> Result<MasterKeys> {
        let kek = match (&self.kdf, secret) {
            (Kdf::Argon2id { m_kib, t, p, salt }, Secret::Passphrase(pass)) => {
                let params = Argon2Params {
                    m_kib: *m_kib,
                    t: *t,
                    p: *p,
                };
                // Refuse parameters that would make us allocate or spin without bound.
                if params.m_kib > 4 << 20 || params.t > 64 || params.p > 64 {
                    return Err(StoreError::InvalidConfig(
                        "Argon2id parameters out of range".into(),
                    ));
                }
                kek_from_passphrase(pass, &hex32(salt, "kdf salt")?, params)
                    .map_err(StoreError::InvalidConfig)?
            }
            (Kdf::KeyFile { salt }, Secret::KeyFile(k)) => {
                check_keyfile(k)?;
                kek_from_keyfile(k, &hex32(salt, "kdf salt")?)
            }
            (Kdf::Argon2id { .. }, Secret::KeyFile(_)) => {
                return Err(StoreError::Secret(format!(
                    "vault {} is protected by a passphrase, not a key file",
                    self.vault_id
                )));
            }
            (Kdf::KeyFile { .. }, Secret::Passphrase(_)) => {
                return Err(StoreError::Secret(format!(
                    "vault {} is protected by a key file, not a passphrase",
                    self.vault_id
                )));
            }
        };
        let mut nonce = [0u8; 12];
        hex::decode_to_slice(&self.keys.nonce, &mut nonce)
            .map_err(|_| StoreError::InvalidConfig("keys.nonce is not 12 bytes of hex".into()))?;
        let mut buf = hex::decode(&self.keys.ciphertext)
            .map_err(|_| StoreError::InvalidConfig("keys.ciphertext is not hex".into()))?;
        ObjectCipher::from_key(&kek)
            .open(&nonce, &wrap_aad(&self.vault_id), &mut buf)
            .map_err(|_| StoreError::WrongSecret {
                kind: secret.kind(),
                vault_id: self.vault_id.clone(),
            })?;
        let keys = MasterKeys::from_plain(&buf)
            .ok_or_else(|| StoreError::InvalidConfig("wrapped keys have the wrong length".into()));
        zeroize::Zeroize::zeroize(&mut buf);
        keys
    }
}

fn check_keyfile(k: &[u8]) -> Result<()> {
    if k.len() < MIN_KEYFILE_LEN {
        return Err(StoreError::Secret(format!(
            "key file holds {} bytes; at least {MIN_KEYFILE_LEN} random bytes are needed",
            k.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weak() -> Argon2Params {
        Argon2Params {
            m_kib: 64,
            t: 1,
            p: 1,
        }
    }

    #[test]
    fn passphrase_wrap_unwrap_and_wrong_secret() {
        let keys = MasterKeys::generate();
        let s = Secret::Passphrase(b"correct horse".to_vec());
        let c = VaultConfig::create(&keys, &s, weak(), 1 << 18, "t".into()).unwrap();
        let parsed = VaultConfig::parse(&c.to_bytes()).unwrap();
        assert_eq!(parsed, c);
        let k = parsed.unwrap_keys(&s).unwrap();
        assert_eq!(k.to_plain(), keys.to_plain());
        let err = parsed
            .unwrap_keys(&Secret::Passphrase(b"wrong".to_vec()))
            .unwrap_err();
        assert!(matches!(err, StoreError::WrongSecret { .. }), "{err}");
        let err = parsed
            .unwrap_keys(&Secret::KeyFile(vec![1; 32]))
            .unwrap_err();
        assert!(err.to_string().contains("passphrase"), "{err}");
    }

    #[test]
    fn keyfile_wrap_unwrap() {
        let keys = MasterKeys::generate();
        let s = Secret::KeyFile(vec![9; 64]);
        let c = VaultConfig::create(&keys, &s, weak(), 1 << 16, "t".into()).unwrap();
        assert_eq!(c.unwrap_keys(&s).unwrap().to_plain(), keys.to_plain());
        assert!(matches!(
            c.unwrap_keys(&Secret::KeyFile(vec![8; 64])),
            Err(StoreError::WrongSecret { .. })
        ));
        assert!(
            VaultConfig::create(
                &keys,
                &Secret::KeyFile(vec![1; 8]),
                weak(),
                1 << 16,
                "t".into()
            )
            .is_err()
        );
    }

    #[test]
    fn unknown_fields_and_versions_are_refused() {
        let keys = MasterKeys::generate();
        let s = Secret::KeyFile(vec![9; 64]);
        let c = VaultConfig::create(&keys, &s, weak(), 1 << 16, "t".into()).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&c.to_bytes()).unwrap();
        v["extra"] = 1.into();
        assert!(VaultConfig::parse(&serde_json::to_vec(&v).unwrap()).is_err());
        let mut v: serde_json::Value = serde_json::from_slice(&c.to_bytes()).unwrap();
        v["version"] = 2.into();
        assert!(matches!(
            VaultConfig::parse(&serde_json::to_vec(&v).unwrap()),
            Err(StoreError::UnsupportedVersion { .. })
        ));
        assert!(VaultConfig::parse(b"{}").is_err());
    }
}
