//! `ferryd up`: bring the appliance up from whatever its data directory holds.
//!
//! With nothing there, it creates, in this order: the data directory (0700), the TLS identity
//! (`tls/`), the catalog (`catalog.redb`) and its `default` replication policy, the vault key
//! (`vault.key`) and the local vault (`vault/`), and the first admin token (`admin-token`,
//! 0600; only its SHA-256 goes to the catalog). With something there, it reuses it and never regenerates a key, a certificate or
//! a token; what does not fit is refused with the file named:
//!
//! - a catalog without `tls/` (the CA clients trust is gone: restore it);
//! - a vault registered in the catalog at another location than configured, or missing;
//! - an `admin-token` file that is not the first admin token the catalog recorded;
//! - any secret file readable by others.
//!
//! Each step is safe to repeat after a crash: the TLS set appears atomically and is made
//! before the catalog exists, a key file left by a crash before the vault was created is
//! reused to create it, and an `admin-token` file written before its hash was committed is
//! adopted rather than replaced.
//!
//! Startup runs a few blocking file operations on the runtime; nothing else is running yet.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_store::{Backend, InitOptions, OpenOptions, Secret, StoreError, Vault};

use crate::agents::Agents;
use crate::auth::{self, Tokens};
use crate::catalog::{AdminToken, Catalog, VaultEntry};
use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::fsutil;
use crate::tls::{self, TlsIdentity};

/// Bytes of a generated vault key file.
const VAULT_KEY_BYTES: usize = 32;
/// Largest key, passphrase, token or option file read.
const MAX_SECRET_FILE: u64 = 64 << 10;

/// Files and directories under the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The data directory (absolute).
    pub dir: PathBuf,
}

impl Layout {
    /// The catalog.
    pub fn catalog(&self) -> PathBuf {
        self.dir.join("catalog.redb")
    }
    /// The first admin token, written once.
    pub fn admin_token(&self) -> PathBuf {
        self.dir.join("admin-token")
    }
    /// The generated key of the default vault.
    pub fn vault_key(&self) -> PathBuf {
        self.dir.join("vault.key")
    }
    /// Local index caches of the vaults.
    pub fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }
}

/// Everything `up` needs to serve.
#[derive(Debug)]
pub struct Prepared {
    /// Where things are.
    pub layout: Layout,
    /// The TLS identity.
    pub tls: TlsIdentity,
    /// The admin tokens (and, through them, the catalog).
    pub tokens: Tokens,
    /// The enrolled agents.
    pub agents: Arc<Agents>,
    /// The roles it takes.
    pub roles: Vec<&'static str>,
    /// Open vaults by name.
    pub vaults: BTreeMap<String, Vault>,
    /// The catalog was created by this start.
    pub first_start: bool,
    /// The first admin token was written by this start.
    pub new_admin_token: bool,
    /// The name and location of the configured vault.
    pub vault: (String, String),
}

/// Prepares the data directory (see the module docs).
pub async fn prepare(cfg: &Config) -> Result<Prepared> {
    let layout = Layout {
        dir: cfg.data_dir()?,
    };
    fsutil::ensure_private_dir(&layout.dir)?;
    remove_stale_temporaries(&layout.dir);

    let catalog_path = layout.catalog();
    let catalog_exists = catalog_path.exists();
    if catalog_exists
        && cfg.api.tls.cert_file.is_none()
        && !tls::TlsPaths::new(&layout.dir).dir.exists()
    {
        return Err(DaemonError::inconsistent(
            tls::TlsPaths::new(&layout.dir).dir,
            "is missing but the catalog exists: clients trust the CA that was in it; restore \
             the directory from a backup (a new CA would be refused by every client)",
        ));
    }
    let tls = tls::load_or_create(&layout.dir, &cfg.api.tls)?;

    if catalog_exists {
        fsutil::check_private_file(&catalog_path)?;
    }
    let (catalog, first_start) = Catalog::open(&catalog_path)?;
    let catalog = Arc::new(catalog);
    // Created once (also on the first start after an upgrade from a catalog without
    // policies); an existing one, edited or not, is left alone.
    if let Some(p) = catalog.ensure_default_policy(ferry_store::point::now_ms())? {
        eprintln!("ferryd: created the default replication {p}");
    }

    let (name, vault) = open_vault(cfg, &layout, &catalog).await?;
    let url = cfg.vault_url(&layout.dir);
    let mut vaults = BTreeMap::new();
    vaults.insert(name.clone(), vault);

    let new_admin_token = bootstrap_token(&layout, &catalog)?;
    let agents = Arc::new(Agents::load(catalog.clone(), tls.agent_ca.clone())?);
    let tokens = Tokens::load(catalog)?;
    Ok(Prepared {
        layout,
        tls,
        tokens,
        agents,
        roles: cfg.roles.names(),
        vaults,
        first_start,
        new_admin_token,
        vault: (name, url),
    })
}

/// Removes temporaries a crash may have left (`.tls.new-*` directories, `.*.tmp-*` files).
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tls.new-") {
            let _ = std::fs::remove_dir_all(e.path());
        } else if name.starts_with('.') && name.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn trim_line(mut b: Vec<u8>) -> Vec<u8> {
    while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
        b.pop();
    }
    b
}

/// The configured vault's object-store options, secrets read from their files.
fn vault_options(cfg: &Config) -> Result<Vec<(String, String)>> {
    let v = &cfg.vault;
    let mut options: Vec<(String, String)> = v.options.clone().into_iter().collect();
    for (k, p) in &v.option_files {
        fsutil::check_operator_secret_file(p)?;
        let b = trim_line(fsutil::read_bounded(p, MAX_SECRET_FILE)?);
        let s = String::from_utf8(b).map_err(|_| {
            DaemonError::inconsistent(p, format!("vault.option_files.{k} is not UTF-8 text"))
        })?;
        options.push((k.clone(), s));
    }
    Ok(options)
}

/// The configured vault secret (`vault.passphrase_file` or `vault.key_file`), if any.
fn configured_secret(cfg: &Config) -> Result<Option<Secret>> {
    let v = &cfg.vault;
    Ok(if let Some(p) = &v.passphrase_file {
        fsutil::check_operator_secret_file(p)?;
        let b = trim_line(fsutil::read_bounded(p, MAX_SECRET_FILE)?);
        if b.is_empty() {
            return Err(DaemonError::inconsistent(p, "the passphrase file is empty"));
        }
        Some(Secret::Passphrase(b))
    } else if let Some(p) = &v.key_file {
        fsutil::check_operator_secret_file(p)?;
        Some(Secret::KeyFile(fsutil::read_bounded(p, MAX_SECRET_FILE)?))
    } else {
        None
    })
}

/// Opens the configured vault, which must exist, with the configured secret (or the key
/// file under the data directory): what `restore-appliance` reads from.
pub async fn open_existing_vault(cfg: &Config, layout: &Layout) -> Result<(String, String, Vault)> {
    let name = cfg.vault.name.clone();
    let url = cfg.vault_url(&layout.dir);
    let store_err = |source: StoreError| DaemonError::Vault {
        name: name.clone(),
        source,
    };
    let backend = Backend::open(&url, &vault_options(cfg)?, false).map_err(store_err)?;
    let secret = match configured_secret(cfg)? {
        Some(s) => s,
        None if layout.vault_key().exists() => {
            Secret::KeyFile(fsutil::read_private(&layout.vault_key(), MAX_SECRET_FILE)?)
        }
        None => {
            return Err(DaemonError::inconsistent(
                &layout.dir,
                "no key for the vault: give --key-file, vault.key_file or vault.passphrase_file",
            ));
        }
    };
    let cache = layout.cache();
    fsutil::ensure_private_dir(&cache)?;
    let vault = Vault::open(backend, &secret, OpenOptions::new(&cache))
        .await
        .map_err(store_err)?;
    Ok((name, url, vault))
}

/// Opens the configured vault, creating it (and its key) on first use, and registers it in
/// the catalog.
async fn open_vault(cfg: &Config, layout: &Layout, catalog: &Catalog) -> Result<(String, Vault)> {
    let v = &cfg.vault;
    let name = v.name.clone();
    let url = cfg.vault_url(&layout.dir);
    let store_err = |source: StoreError| DaemonError::Vault {
        name: name.clone(),
        source,
    };
    let registered = catalog.vault(&name)?;
    if let Some(e) = &registered
        && e.url != url
    {
        return Err(DaemonError::inconsistent(
            layout.catalog(),
            format!(
                "vault `{name}` is registered at `{}` but configured at `{url}`; set vault.url \
                 back, or give the new location another vault.name",
                e.url
            ),
        ));
    }

    let options = vault_options(cfg)?;
    // A local directory is created on first use only: once registered, it must be there.
    let backend = Backend::open(&url, &options, registered.is_none()).map_err(store_err)?;
    let cache = layout.cache();
    fsutil::ensure_private_dir(&cache)?;
    let open_opts = OpenOptions::new(&cache);

    // The secret: a configured file, or the generated key file.
    let configured = configured_secret(cfg)?;
    let key_path = layout.vault_key();
    let default_key = || -> Result<Option<Secret>> {
        if key_path.exists() {
            Ok(Some(Secret::KeyFile(fsutil::read_private(
                &key_path,
                MAX_SECRET_FILE,
            )?)))
        } else {
            Ok(None)
        }
    };
    let existing = configured
        .clone()
        .map_or_else(default_key, |s| Ok(Some(s)))?;

    let opened = match &existing {
        Some(s) => Vault::open(backend.clone(), s, open_opts.clone()).await,
        None => Err(StoreError::NotAVault(url.clone())),
    };
    let vault = match opened {
        Ok(vault) => vault,
        Err(StoreError::NotAVault(_)) if registered.is_some() => {
            return Err(DaemonError::inconsistent(
                layout.catalog(),
                format!(
                    "vault `{name}` is registered at `{url}` but there is no vault there \
                     (moved or deleted?); ferryd does not create a new one in its place"
                ),
            ));
        }
        Err(StoreError::NotAVault(_)) => {
            let secret = match existing {
                Some(s) => s,
                None => {
                    let key: [u8; VAULT_KEY_BYTES] = rand::random();
                    fsutil::write_private_new(&key_path, &key)?;
                    Secret::KeyFile(key.to_vec())
                }
            };
            Vault::init(backend, &secret, InitOptions::default(), open_opts)
                .await
                .map_err(store_err)?
        }
        Err(e) => return Err(store_err(e)),
    };
    for (seg, why) in vault.unreadable_segments() {
        eprintln!("ferryd: warning: vault `{name}`: index segment `{seg}` is unreadable ({why})");
    }
    if registered.is_none() {
        catalog.insert_vault(&VaultEntry {
            name: name.clone(),
            url,
            created_ms: ferry_store::point::now_ms(),
        })?;
    }
    Ok((name, vault))
}

/// Issues the first admin token once, or checks the `admin-token` file against the catalog.
/// Returns whether the token was issued by this start.
fn bootstrap_token(layout: &Layout, catalog: &Catalog) -> Result<bool> {
    let path = layout.admin_token();
    let read_file = || -> Result<String> {
        let b = trim_line(fsutil::read_private(&path, 4096)?);
        String::from_utf8(b)
            .map_err(|_| DaemonError::inconsistent(&path, "is not a token ferryd wrote"))
    };
    match catalog.bootstrap()? {
        Some(b) => {
            if path.exists() {
                let presented = read_file()?;
                let known = catalog.token(&b.token_id)?;
                let matches = known.is_some_and(|t| {
                    subtle::ConstantTimeEq::ct_eq(&t.sha256[..], &auth::hash(&presented)[..]).into()
                });
                if !matches {
                    return Err(DaemonError::inconsistent(
                        &path,
                        "is not the first admin token the catalog recorded; remove it if it \
                         was replaced on purpose",
                    ));
                }
            }
            Ok(false)
        }
        None => {
            let now = ferry_store::point::now_ms();
            let sha256 = if path.exists() {
                // Written by a start that crashed before committing its hash: adopt it.
                auth::hash(&read_file()?)
            } else {
                let (secret, sha256) = auth::generate();
                fsutil::write_private_new(&path, format!("{}\n", secret.expose()).as_bytes())?;
                sha256
            };
            let tok = AdminToken {
                id: ferry_store::point::new_point_id(now),
                name: "bootstrap".into(),
                sha256,
                created_ms: now,
                revoked_ms: None,
            };
            catalog.insert_token(&tok, true)?;
            // Announced now (also when adopted: the crashed start never announced it).
            Ok(true)
        }
    }
}

/// Quotes a path for a POSIX shell when it needs it.
fn sh(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,@%".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The base URL clients use for `addr`.
pub fn base_url(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        std::net::IpAddr::V4(v4) => v4.to_string(),
    };
    format!("https://{host}:{}", addr.port())
}

/// What `up` prints on stdout once listening: where, what to trust, what to run next.
pub fn banner(p: &Prepared, addr: SocketAddr, data: Option<SocketAddr>) -> String {
    let url = base_url(addr);
    let mut s = String::new();
    let _ = writeln!(s, "ferryd {} is up", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "  API:            {url}/api/v1");
    if let Some(d) = data {
        let _ = writeln!(
            s,
            "  data port:      {d} (agents replicate here with their enrollment certificate)"
        );
    }
    let _ = writeln!(s, "  roles:          {}", p.roles.join(", "));
    match &p.tls.ca_cert {
        Some(ca) => {
            let _ = writeln!(s, "  CA certificate: {}", ca.display());
            let _ = writeln!(s, "  CA fingerprint: SHA256 {}", p.tls.fingerprint);
        }
        None => {
            let _ = writeln!(
                s,
                "  TLS:            the configured certificate, SHA256 {}",
                p.tls.fingerprint
            );
        }
    }
    let _ = writeln!(s, "  data directory: {}", p.layout.dir.display());
    let _ = writeln!(s, "  vault `{}`: {}", p.vault.0, p.vault.1);
    let token = p.layout.admin_token();
    if p.new_admin_token {
        let _ = writeln!(
            s,
            "  admin token:    written to {} (readable only by you; it is not shown again)",
            token.display()
        );
    }
    let cacert = p
        .tls
        .ca_cert
        .as_ref()
        .map(|c| format!("--cacert {} ", sh(c)))
        .unwrap_or_default();
    let _ = writeln!(s, "  web console:    {url}/");
    let _ = writeln!(s, "\nNext:");
    let login_token = if token.exists() {
        sh(&token)
    } else {
        "FILE-WITH-AN-ADMIN-TOKEN".to_string()
    };
    let pin = if p.tls.ca_cert.is_some() {
        format!("--ca-fingerprint {}", p.tls.fingerprint)
    } else {
        "--ca-file YOUR-CA.pem".to_string()
    };
    let _ = writeln!(s, "  ferry login {url} --token-file {login_token} {pin}");
    if p.tls.ca_cert.is_some() {
        let _ = writeln!(
            s,
            "  ferry agent token create MACHINE --item ITEM   # prints the `ferry-agent enroll ...` command to run on MACHINE"
        );
    }
    if token.exists() {
        let _ = writeln!(
            s,
            "  curl {cacert}-H \"Authorization: Bearer $(cat {})\" {url}/api/v1/vaults",
            sh(&token)
        );
    } else {
        let _ = writeln!(
            s,
            "  curl {cacert}-H \"Authorization: Bearer $TOKEN\" {url}/api/v1/vaults   # TOKEN: an admin token"
        );
    }
    let _ = writeln!(s, "  curl {cacert}{url}/api/v1/openapi.json");
    if p.tls.ca_cert.is_none() {
        let _ = writeln!(
            s,
            "  (agents cannot enroll: with an operator certificate the appliance has no CA of its own)"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> Config {
        Config {
            data_dir: Some(dir.to_path_buf()),
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn first_start_then_reuse() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        let p = prepare(&cfg(&data)).await.unwrap();
        assert!(p.first_start && p.new_admin_token && p.tls.generated);
        let token = std::fs::read_to_string(p.layout.admin_token()).unwrap();
        assert!(p.tokens.authenticate(token.trim()).is_some());
        let fp = p.tls.fingerprint.clone();
        let key = std::fs::read(p.layout.vault_key()).unwrap();
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let b = banner(&p, addr, None);
        assert!(
            b.contains(&fp) && b.contains("admin-token") && b.contains("--cacert"),
            "{b}"
        );
        let catalog = p.tokens.catalog();
        let default = catalog.policy("default").unwrap().unwrap();
        assert_eq!(default.settings, crate::policy::PolicySettings::default());
        // Edited by the operator: a later start leaves it as it is.
        let edit = crate::policy::PolicyPatch {
            rpo_threshold_minutes: Some(60),
            ..Default::default()
        };
        let edited = catalog.update_policy("default", None, &edit, 5).unwrap();
        drop(p);

        let p = prepare(&cfg(&data)).await.unwrap();
        assert_eq!(
            p.tokens.catalog().policy("default").unwrap(),
            Some(edited.clone())
        );
        assert_eq!(p.tokens.catalog().last_revision().unwrap(), edited.revision);
        drop(p);

        let p = prepare(&cfg(&data)).await.unwrap();
        assert!(!p.first_start && !p.new_admin_token && !p.tls.generated);
        assert_eq!(p.tls.fingerprint, fp);
        assert_eq!(std::fs::read(p.layout.vault_key()).unwrap(), key);
        assert!(p.tokens.authenticate(token.trim()).is_some());
        assert!(!banner(&p, addr, None).contains("written to"));
    }

    #[tokio::test]
    async fn a_token_file_left_by_a_crash_is_adopted() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        fsutil::ensure_private_dir(&data).unwrap();
        let (secret, _) = auth::generate();
        let layout = Layout { dir: data.clone() };
        fsutil::write_private_new(&layout.admin_token(), secret.expose().as_bytes()).unwrap();
        let p = prepare(&cfg(&data)).await.unwrap();
        assert!(p.new_admin_token);
        assert!(p.tokens.authenticate(secret.expose()).is_some());
        assert_eq!(
            std::fs::read_to_string(layout.admin_token()).unwrap(),
            secret.expose()
        );
    }

    #[tokio::test]
    async fn contradictions_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        drop(prepare(&cfg(&data)).await.unwrap());

        // The vault configured elsewhere than registered.
        let mut moved = cfg(&data);
        moved.vault.url = Some(d.path().join("elsewhere").display().to_string());
        let e = prepare(&moved).await.unwrap_err();
        assert!(
            matches!(&e, DaemonError::Inconsistent { .. }) && e.to_string().contains("registered"),
            "{e}"
        );

        // The registered vault is gone: not silently recreated.
        std::fs::rename(data.join("vault"), d.path().join("vault.moved")).unwrap();
        let e = prepare(&cfg(&data)).await.unwrap_err();
        assert!(matches!(&e, DaemonError::Vault { .. }), "{e}");
        assert!(!data.join("vault").exists());
        std::fs::rename(d.path().join("vault.moved"), data.join("vault")).unwrap();

        // The wrong key.
        let key = data.join("vault.key");
        let saved = std::fs::read(&key).unwrap();
        std::fs::remove_file(&key).unwrap();
        fsutil::write_private_new(&key, &[9; 32]).unwrap();
        let e = prepare(&cfg(&data)).await.unwrap_err();
        assert!(e.to_string().contains("wrong key file"), "{e}");
        std::fs::remove_file(&key).unwrap();
        fsutil::write_private_new(&key, &saved).unwrap();

        // The CA gone while the catalog exists.
        std::fs::rename(data.join("tls"), d.path().join("tls.moved")).unwrap();
        let e = prepare(&cfg(&data)).await.unwrap_err();
        assert!(e.to_string().contains("restore"), "{e}");
        assert!(!data.join("tls").exists());
        std::fs::rename(d.path().join("tls.moved"), data.join("tls")).unwrap();

        prepare(&cfg(&data)).await.unwrap();
    }

    #[test]
    fn urls_and_quoting() {
        assert_eq!(
            base_url("127.0.0.1:1".parse().unwrap()),
            "https://127.0.0.1:1"
        );
        assert_eq!(base_url("[::1]:2".parse().unwrap()), "https://[::1]:2");
        assert_eq!(
            base_url("0.0.0.0:3".parse().unwrap()),
            "https://localhost:3"
        );
        assert_eq!(sh(Path::new("/var/lib/ferry")), "/var/lib/ferry");
        assert_eq!(sh(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
