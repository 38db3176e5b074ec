//! The saved login (`cli.json`): the appliance's URL, its CA certificate and an admin token,
//! so that commands after `ferry login` need no flags. It holds a secret, so it is kept like
//! one: the directory is made 0700, the file is written 0600 under a temporary name, synced
//! and renamed into place (never half-written), and a file others can read is refused.
//! `FERRY_URL`, `FERRY_TOKEN_FILE` and `FERRY_CA_FILE` override its members, or stand in for
//! it in scripts.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::client::{ClientError, Token};

/// File name of the saved login in the configuration directory.
pub const FILE: &str = "cli.json";
/// Largest profile, CA or token file read.
const MAX_FILE: u64 = 1 << 20;
/// Version of the `cli.json` format written.
const VERSION: u32 = 1;

/// Where the profile lives: `$FERRY_CONFIG_DIR`, `$XDG_CONFIG_HOME/ferry` or
/// `~/.config/ferry`.
pub fn config_dir() -> Result<PathBuf, ClientError> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("FERRY_CONFIG_DIR") {
        return Ok(d);
    }
    if let Some(x) = var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        return Ok(x.join("ferry"));
    }
    match var("HOME") {
        Some(h) => Ok(h.join(".config").join("ferry")),
        None => Err(ClientError::Local(
            "no configuration directory: set FERRY_CONFIG_DIR or HOME".into(),
        )),
    }
}

/// Reads at most [`MAX_FILE`] bytes of `path`; `what` names it in errors.
pub fn read_small(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    let f = std::fs::File::open(path)
        .map_err(|e| ClientError::Local(format!("cannot read {what} `{}`: {e}", path.display())))?;
    let mut buf = Zeroizing::new(Vec::new());
    f.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ClientError::Local(format!("cannot read {what} `{}`: {e}", path.display())))?;
    if buf.len() as u64 > MAX_FILE {
        return Err(ClientError::Local(format!(
            "{what} `{}` is larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

/// What `cli.json` holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    version: u32,
    url: String,
    ca_pem: String,
    token: String,
}

impl Drop for ProfileFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.token);
    }
}

/// Where to connect and with what: the saved login, with the environment's overrides.
#[derive(Debug)]
pub struct Session {
    /// Base URL (`https://host:port`).
    pub url: Url,
    /// The CA certificates (PEM) trusted as the only roots.
    pub ca_pem: Vec<u8>,
    /// Where they come from, for errors.
    pub ca_source: String,
    /// The admin token.
    pub token: Token,
}

/// Checks an appliance URL and returns its base: `https://host[:port]`; a trailing `/api/v1`
/// (as `ferryd up` prints it) is accepted. A clap value parser.
pub fn parse_url(s: &str) -> Result<Url, String> {
    let u = Url::parse(s.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if u.scheme() != "https" {
        return Err("the appliance is reached over https://".into());
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("the URL must not hold credentials (the token goes in a file)".into());
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("the URL must not have a query or fragment".into());
    }
    let path = u.path().trim_end_matches('/');
    if !path.is_empty() && path != "/api/v1" {
        return Err(format!(
            "the URL names the appliance (`https://host:port`), not the path `{}`",
            u.path()
        ));
    }
    let mut base = u;
    base.set_path("/");
    Ok(base)
}

/// The URL as shown: no trailing slash.
pub fn show_url(u: &Url) -> String {
    u.as_str().trim_end_matches('/').to_string()
}

fn profile_path() -> Result<PathBuf, ClientError> {
    Ok(config_dir()?.join(FILE))
}

fn read_profile(path: &Path) -> Result<Option<ProfileFile>, ClientError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ClientError::Local(format!(
                "cannot read the saved login `{}`: {e}",
                path.display()
            )));
        }
    };
    if meta.mode() & 0o077 != 0 {
        return Err(ClientError::Local(format!(
            "the saved login `{}` is readable by others (mode {:o}): it holds a token; \
             run `chmod 600` on it or `ferry login` again",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    let raw = read_small(path, "the saved login")?;
    let p: ProfileFile = serde_json::from_slice(&raw).map_err(|e| {
        // serde_json's message names a position, never the text.
        ClientError::Local(format!(
            "the saved login `{}` is damaged ({e}); run `ferry login` again",
            path.display()
        ))
    })?;
    if p.version != VERSION {
        return Err(ClientError::Local(format!(
            "the saved login `{}` has version {}, this ferry reads {VERSION}",
            path.display(),
            p.version
        )));
    }
    Ok(Some(p))
}

/// The session of every command after login. Each of `FERRY_URL`, `FERRY_TOKEN_FILE` and
/// `FERRY_CA_FILE` replaces the saved member; without a saved login all three are needed.
pub fn session() -> Result<Session, ClientError> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let env_url = var("FERRY_URL");
    let env_token = var("FERRY_TOKEN_FILE").map(PathBuf::from);
    let env_ca = var("FERRY_CA_FILE").map(PathBuf::from);
    let saved = if env_url.is_some() && env_token.is_some() && env_ca.is_some() {
        None
    } else {
        read_profile(&profile_path()?)?
    };
    let url = match (&env_url, &saved) {
        (Some(u), _) => parse_url(&u.to_string_lossy())
            .map_err(|e| ClientError::Local(format!("FERRY_URL: {e}")))?,
        (None, Some(p)) => parse_url(&p.url)
            .map_err(|e| ClientError::Local(format!("the saved login's URL: {e}")))?,
        (None, None) => return Err(not_logged_in()),
    };
    let token = match (&env_token, &saved) {
        (Some(f), _) => {
            let what = format!("FERRY_TOKEN_FILE `{}`", f.display());
            Token::from_bytes(&read_small(f, "FERRY_TOKEN_FILE")?, &what)?
        }
        (None, Some(p)) => Token::from_bytes(p.token.as_bytes(), "the saved login")?,
        (None, None) => return Err(not_logged_in()),
    };
    let (ca_pem, ca_source) = match (&env_ca, &saved) {
        (Some(f), _) => (
            read_small(f, "FERRY_CA_FILE")?.to_vec(),
            format!("FERRY_CA_FILE `{}`", f.display()),
        ),
        (None, Some(p)) => (
            p.ca_pem.as_bytes().to_vec(),
            "the saved login's CA certificate".to_string(),
        ),
        (None, None) => return Err(not_logged_in()),
    };
    Ok(Session {
        url,
        ca_pem,
        ca_source,
        token,
    })
}

fn not_logged_in() -> ClientError {
    ClientError::NotLoggedIn(
        "run `ferry login URL --token-file FILE --ca-fingerprint FP` first \
         (or set FERRY_URL, FERRY_TOKEN_FILE and FERRY_CA_FILE)"
            .into(),
    )
}

/// Saves a login atomically; returns the file's path.
pub fn save(url: &Url, ca_pem: &str, token: &Token) -> Result<PathBuf, ClientError> {
    let dir = config_dir()?;
    let err = |what: &str, p: &Path, e: std::io::Error| {
        ClientError::Local(format!("cannot {what} `{}`: {e}", p.display()))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| err("create the configuration directory", &dir, e))?;
    let body = ProfileFile {
        version: VERSION,
        url: show_url(url),
        ca_pem: ca_pem.to_string(),
        token: token.expose().to_string(),
    };
    let text = Zeroizing::new(serde_json::to_vec_pretty(&body).expect("JSON serialises"));
    drop(body);
    let path = dir.join(FILE);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{FILE}.{}.{nanos}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err("write the saved login", &path, e));
    }
    Ok(path)
}

/// Removes the saved login; `Ok(None)` when there was none.
pub fn remove() -> Result<Option<PathBuf>, ClientError> {
    let path = profile_path()?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClientError::Local(format!(
            "cannot remove the saved login `{}`: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        for (s, want) in [
            ("https://127.0.0.1:8443", "https://127.0.0.1:8443/"),
            ("https://127.0.0.1:8443/", "https://127.0.0.1:8443/"),
            ("https://127.0.0.1:8443/api/v1", "https://127.0.0.1:8443/"),
            ("https://gw.example:443/api/v1/", "https://gw.example/"),
        ] {
            assert_eq!(parse_url(s).unwrap().as_str(), want, "{s}");
        }
        for bad in [
            "http://127.0.0.1:8443",
            "https://u:p@h",
            "https://h/other",
            "https://h/?x=1",
            "nonsense",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
