//! Admin bearer tokens: minting, checking, revoking.
//!
//! A token is 32 random bytes, base64url without padding (43 characters). Only its SHA-256
//! is stored (catalog table `admin_tokens`); the secret is shown once, to whoever created it.
//! Checking a request hashes the presented token and compares it, in constant time, with
//! every active token's hash held in memory. The in-memory set is loaded from the catalog at
//! start and changed only after the catalog commit of a creation or revocation, under one
//! lock, so a revoked token is refused by the very next request.

use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::catalog::{AdminToken, Catalog, CatalogError};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;
/// Longest `Authorization` token looked at; anything longer is refused unhashed.
pub const MAX_PRESENTED_LEN: usize = 256;
/// Longest token name.
pub const MAX_NAME_LEN: usize = 64;

/// A token's secret, as handed to its owner once. `Debug` does not show it.
pub struct TokenSecret(String);

impl TokenSecret {
    /// The secret text (for the one response or file that carries it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

/// A new random token and its SHA-256.
pub fn generate() -> (TokenSecret, [u8; 32]) {
    let raw: [u8; TOKEN_BYTES] = rand::random();
    let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let h = hash(&s);
    (TokenSecret(s), h)
}

/// SHA-256 of a token's text.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks a token name: 1–64 of `A–Z a–z 0–9 . _ -` and space, not blank.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("name must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b' '))
    {
        return Err("name may only hold letters, digits, space, `.`, `_` and `-`".into());
    }
    Ok(())
}

/// The admin tokens of a running appliance.
#[derive(Debug)]
pub struct Tokens {
    catalog: Arc<Catalog>,
    /// (id, sha256) of every active token.
    active: RwLock<Vec<(String, [u8; 32])>>,
    /// Serialises creation and revocation (catalog commit + cache update).
    write: Mutex<()>,
}

impl Tokens {
    /// Loads the active tokens from the catalog.
    pub fn load(catalog: Arc<Catalog>) -> Result<Self, CatalogError> {
        let active = catalog
            .active_tokens()?
            .into_iter()
            .map(|t| (t.id, t.sha256))
            .collect();
        Ok(Self {
            catalog,
            active: RwLock::new(active),
            write: Mutex::new(()),
        })
    }

    /// The id of the active token `presented` is, if any. Every active hash is compared, in
    /// constant time.
    pub fn authenticate(&self, presented: &str) -> Option<String> {
        if presented.is_empty() || presented.len() > MAX_PRESENTED_LEN {
            return None;
        }
        let h = hash(presented);
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        for (id, stored) in active.iter() {
            if bool::from(stored.ct_eq(&h)) {
                found = Some(id.clone());
            }
        }
        found
    }

    /// Creates a token named `name`. Blocking (one catalog commit).
    pub fn create(&self, name: &str) -> Result<(AdminToken, TokenSecret), CatalogError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let now = ferry_store::point::now_ms();
        let (secret, sha256) = generate();
        let tok = AdminToken {
            id: ferry_store::point::new_point_id(now),
            name: name.to_string(),
            sha256,
            created_ms: now,
            revoked_ms: None,
        };
        self.catalog.insert_token(&tok, false)?;
        self.active
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((tok.id.clone(), tok.sha256));
        Ok((tok, secret))
    }

    /// Revokes token `id`; refused from the next request on. Blocking (one catalog commit).
    pub fn revoke(&self, id: &str) -> Result<AdminToken, CatalogError> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let tok = self
            .catalog
            .revoke_token(id, ferry_store::point::now_ms())?;
        self.active
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(i, _)| i != id);
        Ok(tok)
    }

    /// The catalog behind these tokens.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_base64url_and_hashed() {
        let (a, ha) = generate();
        let (b, _) = generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 43);
        assert!(
            a.expose()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(ha, hash(a.expose()));
        assert_eq!(format!("{a:?}"), "TokenSecret(<redacted>)");
    }

    #[test]
    fn create_authenticate_revoke() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&d.path().join("c.redb")).unwrap();
        let t = Tokens::load(Arc::new(c)).unwrap();
        let (one, s1) = t.create("one").unwrap();
        let (two, s2) = t.create("two").unwrap();
        assert_eq!(t.authenticate(s1.expose()), Some(one.id.clone()));
        assert_eq!(t.authenticate(s2.expose()), Some(two.id.clone()));
        assert_eq!(t.authenticate("nope"), None);
        assert_eq!(t.authenticate(""), None);
        assert_eq!(t.authenticate(&"x".repeat(MAX_PRESENTED_LEN + 1)), None);
        t.revoke(&one.id).unwrap();
        assert_eq!(t.authenticate(s1.expose()), None);
        assert!(matches!(
            t.revoke(&two.id),
            Err(CatalogError::LastActiveToken(_))
        ));
        assert_eq!(t.authenticate(s2.expose()), Some(two.id.clone()));
        // A fresh load sees the same.
        let t2 = Tokens::load(t.catalog().clone()).unwrap();
        assert_eq!(t2.authenticate(s1.expose()), None);
        assert_eq!(t2.authenticate(s2.expose()), Some(two.id));
    }

    #[test]
    fn names() {
        assert!(check_name("ci runner-1.x_y").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("  ").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
        assert!(check_name("a\nb").is_err());
        assert!(check_name("é").is_err());
    }
}
