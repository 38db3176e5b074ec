//! The daemon's configuration: what it is, where it comes from, and what is acceptable.
//!
//! Sources, later ones winning (figment):
//!
//! 1. built-in defaults ([`Config::default`]), so `ferryd up` works with no file at all;
//! 2. `--config FILE`, or else `/etc/ferry/ferry.toml` when it exists (TOML);
//! 3. environment variables `FERRY_…`: a double underscore nests
//!    (`FERRY_API__LISTEN`, `FERRY_API__LIMITS__MAX_BODY_BYTES`, `FERRY_VAULT__URL`), plus
//!    `FERRY_DATA_DIR`. Only names containing `__` and `FERRY_DATA_DIR` are read: the other
//!    `FERRY_` variables (`FERRY_PASSPHRASE`, `FERRY_CACHE_DIR`, …) belong to the `ferry` CLI;
//! 4. command-line flags (`--data-dir`, `--listen`).
//!
//! Unknown keys are errors naming the key and its source. Values are validated after merging
//! ([`Config::validate`]), each error naming the dotted key. Secrets are never values: the
//! configuration only holds paths to files (`*_file`), and object-store options whose names
//! look secret must be given through `vault.option_files`. The commented default file is
//! `config/ferry.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::error::{DaemonError, Result};

/// Read when `--config` is not given, if it exists.
pub const SYSTEM_CONFIG_FILE: &str = "/etc/ferry/ferry.toml";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// Name of the vault `ferryd up` creates when none is configured.
pub const DEFAULT_VAULT_NAME: &str = "default";
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the appliance keeps its state (catalog, keys, certificates, the default vault).
    /// Default: `/var/lib/ferry` as root, else `$XDG_DATA_HOME/ferry` or
    /// `~/.local/share/ferry`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// What this appliance does.
    pub roles: Roles,
    /// The HTTPS API.
    pub api: ApiConfig,
    /// The appliance's vault.
    pub vault: VaultConfig,
    /// The process role: the data port agents replicate to, and its cache.
    pub process: ProcessConfig,
    /// The target role: where failovers put machines.
    pub target: TargetConfig,
}

/// `[target]`: where failovers materialise recovery points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetConfig {
    /// Directory failovers write disks and machine definitions into: a test failover into
    /// `<dir>/test/<item>/<job id>/`, a failover into `<dir>/failover/<item>/<job id>/`.
    /// Default: `<data_dir>/target`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// A test failover not cleaned up after this many hours is flagged `stale` in the item's
    /// view (`ferry item show`, `GET /items/{name}`).
    pub test_failover_max_age_hours: u64,
    /// How long a planned failover waits for the agent's final cycle before it fails (the
    /// item stays as it was).
    pub planned_failover_timeout_secs: u64,
    /// Address instant-recovery mounts are served on (NBD, one port per mount, picked by the
    /// kernel). NBD has no authentication: use an address only the hypervisors reach.
    pub nbd_address: std::net::IpAddr,
    /// Mounts served at once (1 to 64).
    pub max_mounts: u32,
    /// Chunk cache of each mount, MiB (1 to 4096).
    pub mount_cache_mib: u32,
    /// Object-store location failovers write to instead of `dir`: `s3://bucket/prefix`,
    /// `az://container/prefix` or `file:///path` (objects under `test/<item>/<job id>/` and
    /// `failover/<item>/<job id>/`; disks are staged under `<dir>/staging` first). Default:
    /// none (failovers go to `dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Object-store options of `location` (`endpoint`, `region`, `allow_http`,
    /// `account_name`, …), on top of the `AWS_*`/`AZURE_*` environment. Secrets are refused
    /// here.
    pub location_options: BTreeMap<String, String>,
    /// Object-store options of `location` read from files (`secret_access_key`, …).
    pub location_option_files: BTreeMap<String, PathBuf>,
}

impl Default for TargetConfig {
    fn default() -> Self {
        Self {
            dir: None,
            test_failover_max_age_hours: 72,
            planned_failover_timeout_secs: 1800,
            nbd_address: std::net::IpAddr::from([127, 0, 0, 1]),
            max_mounts: 4,
            mount_cache_mib: 64,
            location: None,
            location_options: BTreeMap::new(),
            location_option_files: BTreeMap::new(),
        }
    }
}

/// Default address of the data port (`docs/agent-protocol.md` §2).
pub const DEFAULT_DATA_LISTEN: &str = "127.0.0.1:9443";

/// `[process]`: the data port and the cache its journals live on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Address and port agents replicate to (TLS with their enrollment certificate). Port 0:
    /// any free port (printed at start and told to agents in their replication plan).
    pub listen: SocketAddr,
    /// The cache directory: journals of what agents sent, until it is in the vault, and the
    /// drains' scratch images. Put it on a fast local disk. Default: `<data_dir>/process`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// Replication sessions served at once; more agents wait in the kernel's accept queue.
    pub max_sessions: u32,
    /// A session that sends nothing for this long is ended (`stalled`); the agent resumes.
    pub idle_timeout_secs: u64,
    /// Cycles drained into the vault at once (each on its own item).
    pub drain_workers: u32,
    /// Bounds of the cache.
    pub cache: CacheConfig,
}

/// `[process.cache]`: when the cache pushes back (`Busy` to agents) and raises its alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Below this share of free space on the cache's filesystem the cache alert is raised
    /// (Site Recovery: 30%).
    pub warn_free_percent: u8,
    /// Below this share agents are told `Busy` and nothing more is written (Site Recovery:
    /// 25%).
    pub critical_free_percent: u8,
    /// Most bytes all journals together may hold.
    pub max_journal_bytes: u64,
    /// Most bytes one cycle's journal may hold. A cycle is drained once complete, so a larger
    /// one is refused (`too_large`, naming this key; the agent stops the disk): keep it above a
    /// disk's largest cycle.
    pub max_cycle_bytes: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_DATA_LISTEN.parse().expect("valid default address"),
            cache_dir: None,
            max_sessions: 256,
            idle_timeout_secs: 120,
            drain_workers: 2,
            cache: CacheConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            warn_free_percent: 30,
            critical_free_percent: 25,
            max_journal_bytes: 64 << 30,
            max_cycle_bytes: 16 << 30,
        }
    }
}

/// A role of an appliance (Site Recovery's configuration server, process server and master
/// target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The catalog, the REST API, enrollment, jobs and catalog snapshots.
    Control,
    /// Ingests agents' streams into the vault (the data port).
    Process,
    /// Materialises recovery points at failover (failover, commit, reprotect jobs).
    Target,
}

impl Role {
    /// The name used in the configuration and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Process => "process",
            Role::Target => "target",
        }
    }
}

/// `roles`: the roles this appliance takes (all three by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Roles(pub Vec<Role>);

impl Default for Roles {
    fn default() -> Self {
        Self(vec![Role::Control, Role::Process, Role::Target])
    }
}

impl Roles {
    /// Whether `r` is one of them.
    pub fn has(&self, r: Role) -> bool {
        self.0.contains(&r)
    }

    /// Their names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|r| r.as_str()).collect()
    }
}

/// `[api]`: the HTTPS listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address and port to listen on (port 0: any free port, printed at start).
    pub listen: SocketAddr,
    /// Certificate overrides.
    pub tls: TlsConfig,
    /// Hardening limits.
    pub limits: Limits,
}

/// `[api.tls]`: use these instead of the generated CA and server certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (server certificate first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// `[api.limits]`: what one client may cost the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted (bytes); larger requests get 413.
    pub max_body_bytes: u64,
    /// Connections served at once; further clients wait in the kernel's accept queue.
    pub max_connections: u32,
    /// Time a client has to complete the TLS handshake, and then each request head (counted
    /// from when the server starts waiting for it, so it also closes idle keep-alive
    /// connections).
    pub header_read_timeout_secs: u64,
    /// A connection with no request in progress on which no byte moves for this long is
    /// closed (a client that stops reading its response, a silent client once
    /// `header_read_timeout_secs` is longer). At least `request_timeout_secs`.
    pub idle_timeout_secs: u64,
    /// Longest time one request may take, body included (so a stalled upload ends here);
    /// then 503.
    pub request_timeout_secs: u64,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    pub shutdown_grace_secs: u64,
}

/// `[vault]`: the vault the appliance writes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// Its name in the catalog and the API.
    pub name: String,
    /// Location: a directory, `file:///dir`, `s3://bucket/prefix` or `az://container/prefix`.
    /// Default: `<data_dir>/vault`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Key file protecting the vault. Default: `<data_dir>/vault.key`, generated (32 random
    /// bytes, mode 0600) when the vault is created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// File holding a passphrase protecting the vault (instead of a key file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passphrase_file: Option<PathBuf>,
    /// Object-store options (`endpoint`, `region`, `allow_http`, `account_name`, …), on top of
    /// the `AWS_*`/`AZURE_*` environment. Secrets are refused here.
    pub options: BTreeMap<String, String>,
    /// Object-store options read from files (`secret_access_key`, `access_key`, …).
    pub option_files: BTreeMap<String, PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            tls: TlsConfig::default(),
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_connections: 512,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            request_timeout_secs: 30,
            shutdown_grace_secs: 10,
        }
    }
}

impl Default for VaultConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_VAULT_NAME.to_string(),
            url: None,
            key_file: None,
            passphrase_file: None,
            options: BTreeMap::new(),
            option_files: BTreeMap::new(),
        }
    }
}

impl Limits {
    /// [`Self::header_read_timeout_secs`] as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }
    /// [`Self::idle_timeout_secs`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// [`Self::request_timeout_secs`] as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    /// [`Self::shutdown_grace_secs`] as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// Values given on the command line; they win over every other source.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--data-listen` (`process.listen`).
    pub data_listen: Option<SocketAddr>,
    /// `--repo` (`vault.url`).
    pub vault_url: Option<String>,
    /// `--key-file` (`vault.key_file`).
    pub vault_key_file: Option<PathBuf>,
}

/// Object-store option names that carry credentials: only accepted in `option_files`.
const SECRET_OPTION_WORDS: &[&str] = &["secret", "token", "password", "sas", "access_key"];

fn looks_secret(option: &str) -> bool {
    let o = option.to_ascii_lowercase();
    SECRET_OPTION_WORDS.iter().any(|w| o.contains(w))
}

/// Largest file an object-store option is read from.
const MAX_OPTION_FILE: u64 = 64 << 10;

impl Config {
    /// Merges every source (see the module docs) and validates the result. `file` is
    /// `--config`; without it `/etc/ferry/ferry.toml` is read if present.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        let file = match file {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(SYSTEM_CONFIG_FILE)).filter(|p| p.exists()),
        };
        if let Some(p) = &file {
            // A missing file named on the command line is an error (figment would take it as
            // empty), and a huge one is refused before figment reads it.
            let m = std::fs::metadata(p).map_err(|e| DaemonError::io("read", p, e))?;
            if !m.is_file() || m.len() > MAX_CONFIG_BYTES {
                return Err(DaemonError::Config(format!(
                    "`{}` is not a regular file of at most {MAX_CONFIG_BYTES} bytes",
                    p.display()
                )));
            }
            f = f.merge(Toml::file_exact(p));
        }
        f = f.merge(env_provider());
        if let Some(d) = &overrides.data_dir {
            f = f.merge(("data_dir", d));
        }
        if let Some(u) = &overrides.vault_url {
            f = f.merge(("vault.url", u));
        }
        if let Some(k) = &overrides.vault_key_file {
            f = f.merge(("vault.key_file", k));
        }
        if let Some(l) = &overrides.listen {
            f = f.merge(("api.listen", l.to_string()));
        }
        if let Some(l) = &overrides.data_listen {
            f = f.merge(("process.listen", l.to_string()));
        }
        let c: Config = f.extract().map_err(figment_error)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks ranges and combinations; each error names the dotted key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| DaemonError::ConfigValue {
            key: key.to_string(),
            reason,
        };
        let roles = &self.roles.0;
        if roles.is_empty() {
            return Err(bad(
                "roles",
                "an appliance has at least one role (control, process, target)".into(),
            ));
        }
        if let Some(r) = roles
            .iter()
            .enumerate()
            .find_map(|(i, r)| roles[..i].contains(r).then_some(r))
        {
            return Err(bad("roles", format!("`{}` is listed twice", r.as_str())));
        }
        if !self.roles.has(Role::Control) {
            return Err(bad(
                "roles",
                "this build needs the `control` role: a process- or target-only appliance takes \
                 its catalog from a control appliance, and joining one is not supported yet"
                    .into(),
            ));
        }
        let l = &self.api.limits;
        let range = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(key, format!("{v} is out of range ({lo} to {hi})")))
            }
        };
        range(
            "api.limits.max_body_bytes",
            l.max_body_bytes,
            1 << 10,
            64 << 20,
        )?;
        range(
            "api.limits.max_connections",
            u64::from(l.max_connections),
            1,
            65_536,
        )?;
        range(
            "api.limits.header_read_timeout_secs",
            l.header_read_timeout_secs,
            1,
            300,
        )?;
        range(
            "api.limits.request_timeout_secs",
            l.request_timeout_secs,
            1,
            3600,
        )?;
        range("api.limits.idle_timeout_secs", l.idle_timeout_secs, 1, 3600)?;
        range(
            "api.limits.shutdown_grace_secs",
            l.shutdown_grace_secs,
            0,
            600,
        )?;
        if l.idle_timeout_secs < l.request_timeout_secs {
            return Err(bad(
                "api.limits.idle_timeout_secs",
                format!(
                    "{} is shorter than api.limits.request_timeout_secs ({}): a slow request \
                     would be cut as idle",
                    l.idle_timeout_secs, l.request_timeout_secs
                ),
            ));
        }
        match (&self.api.tls.cert_file, &self.api.tls.key_file) {
            (Some(_), None) => {
                return Err(bad(
                    "api.tls.key_file",
                    "missing: cert_file and key_file go together".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(bad(
                    "api.tls.cert_file",
                    "missing: cert_file and key_file go together".into(),
                ));
            }
            _ => {}
        }
        if let Some(d) = &self.data_dir
            && d.as_os_str().is_empty()
        {
            return Err(bad("data_dir", "is empty".into()));
        }
        range(
            "target.test_failover_max_age_hours",
            self.target.test_failover_max_age_hours,
            1,
            24 * 365,
        )?;
        range(
            "target.planned_failover_timeout_secs",
            self.target.planned_failover_timeout_secs,
            10,
            86_400,
        )?;
        if let Some(d) = &self.target.dir
            && d.as_os_str().is_empty()
        {
            return Err(bad("target.dir", "is empty".into()));
        }
        range(
            "target.max_mounts",
            u64::from(self.target.max_mounts),
            1,
            64,
        )?;
        range(
            "target.mount_cache_mib",
            u64::from(self.target.mount_cache_mib),
            1,
            4096,
        )?;
        let p = &self.process;
        range("process.max_sessions", u64::from(p.max_sessions), 1, 65_536)?;
        range("process.idle_timeout_secs", p.idle_timeout_secs, 5, 3600)?;
        range("process.drain_workers", u64::from(p.drain_workers), 1, 64)?;
        range(
            "process.cache.warn_free_percent",
            u64::from(p.cache.warn_free_percent),
            0,
            100,
        )?;
        range(
            "process.cache.critical_free_percent",
            u64::from(p.cache.critical_free_percent),
            0,
            u64::from(p.cache.warn_free_percent),
        )?;
        // A cycle's journal holds at least one largest frame (4 MiB chunk and headers).
        range(
            "process.cache.max_cycle_bytes",
            p.cache.max_cycle_bytes,
            64 << 20,
            1 << 50,
        )?;
        range(
            "process.cache.max_journal_bytes",
            p.cache.max_journal_bytes,
            p.cache.max_cycle_bytes,
            1 << 52,
        )?;
        if let Some(d) = &p.cache_dir
            && d.as_os_str().is_empty()
        {
            return Err(bad("process.cache_dir", "is empty".into()));
        }
        let t = &self.target;
        let has_location_options =
            !(t.location_options.is_empty() && t.location_option_files.is_empty());
        if let Some(u) = &t.location {
            let Some((scheme, rest)) = u.split_once("://") else {
                return Err(bad(
                    "target.location",
                    "not a URL: use s3://bucket/prefix, az://container/prefix or file:///path"
                        .into(),
                ));
            };
            if !["s3", "az", "file"].contains(&scheme) {
                return Err(bad(
                    "target.location",
                    "unsupported scheme (use s3://, az:// or file://)".into(),
                ));
            }
            if rest.is_empty() || rest == "/" {
                return Err(bad(
                    "target.location",
                    "names no bucket or directory".into(),
                ));
            }
            if u.contains(['?', '#']) {
                return Err(bad(
                    "target.location",
                    "must not carry a query or fragment: credentials belong in \
                     target.location_option_files or the AWS_*/AZURE_* environment"
                        .into(),
                ));
            }
            if redact_userinfo(u) != *u {
                return Err(bad(
                    "target.location",
                    "holds credentials (`user:password@`): credentials belong in \
                     target.location_option_files or the AWS_*/AZURE_* environment"
                        .into(),
                ));
            }
            if scheme == "file" && has_location_options {
                return Err(bad(
                    "target.location_options",
                    "a file:// location takes no object-store options".into(),
                ));
            }
        } else if has_location_options {
            return Err(bad(
                "target.location_options",
                "set only with target.location".into(),
            ));
        }
        for k in t.location_options.keys() {
            if looks_secret(k) {
                return Err(bad(
                    &format!("target.location_options.{k}"),
                    format!(
                        "looks like a secret: put it in a file and set \
                         target.location_option_files.{k}"
                    ),
                ));
            }
            if t.location_option_files.contains_key(k) {
                return Err(bad(
                    &format!("target.location_options.{k}"),
                    format!("also set in target.location_option_files.{k}"),
                ));
            }
        }
        let v = &self.vault;
        ferry_store::check_name("vault name", &v.name)
            .map_err(|e| bad("vault.name", e.to_string()))?;
        if v.key_file.is_some() && v.passphrase_file.is_some() {
            return Err(bad(
                "vault.passphrase_file",
                "give either vault.key_file or vault.passphrase_file, not both".into(),
            ));
        }
        if let Some(u) = &v.url {
            if u.is_empty() {
                return Err(bad("vault.url", "is empty".into()));
            }
            if redact_userinfo(u) != *u {
                return Err(bad(
                    "vault.url",
                    "holds credentials (`user:password@`): credentials belong in \
                     vault.option_files or the AWS_*/AZURE_* environment"
                        .into(),
                ));
            }
            let remote = u.starts_with("s3://") || u.starts_with("az://");
            if u.contains("://") && !remote && !u.starts_with("file://") {
                return Err(bad(
                    "vault.url",
                    "unsupported scheme (use a path, file://, s3:// or az://)".into(),
                ));
            }
            let has_options = !(v.options.is_empty() && v.option_files.is_empty());
            if has_options && !remote {
                return Err(bad(
                    "vault.options",
                    "a local directory vault takes no object-store options".into(),
                ));
            }
        } else if !(v.options.is_empty() && v.option_files.is_empty()) {
            return Err(bad(
                "vault.options",
                "the default vault is a local directory and takes no object-store options".into(),
            ));
        }
        for k in v.options.keys() {
            if looks_secret(k) {
                return Err(bad(
                    &format!("vault.options.{k}"),
                    format!("looks like a secret: put it in a file and set vault.option_files.{k}"),
                ));
            }
            if v.option_files.contains_key(k) {
                return Err(bad(
                    &format!("vault.options.{k}"),
                    format!("also set in vault.option_files.{k}"),
                ));
            }
        }
        // Files named explicitly must exist now, so that `config check` catches a typo.
        let files = [
            ("api.tls.cert_file", self.api.tls.cert_file.as_ref()),
            ("api.tls.key_file", self.api.tls.key_file.as_ref()),
            ("vault.key_file", v.key_file.as_ref()),
            ("vault.passphrase_file", v.passphrase_file.as_ref()),
        ];
        let option_files = v
            .option_files
            .iter()
            .map(|(k, p)| (format!("vault.option_files.{k}"), p))
            .chain(
                t.location_option_files
                    .iter()
                    .map(|(k, p)| (format!("target.location_option_files.{k}"), p)),
            );
        for (key, p) in files
            .into_iter()
            .filter_map(|(k, p)| p.map(|p| (k.to_string(), p)))
            .chain(option_files)
        {
            if !p.is_file() {
                return Err(bad(
                    &key,
                    format!("`{}` does not exist or is not a file", p.display()),
                ));
            }
        }
        Ok(())
    }

    /// The process role's cache directory: configured, or `<data_dir>/process`.
    pub fn process_cache_dir(&self) -> Result<PathBuf> {
        match &self.process.cache_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(self.data_dir()?.join("process")),
        }
    }

    /// The target role's directory: configured, or `<data_dir>/target`. Always absolute.
    pub fn target_dir(&self) -> Result<PathBuf> {
        match &self.target.dir {
            Some(d) => std::path::absolute(d).map_err(|e| DaemonError::io("resolve", d, e)),
            None => Ok(self.data_dir()?.join("target")),
        }
    }

    /// `[target] location`'s object-store options, secrets read from their files (a
    /// trailing newline dropped).
    pub fn target_location_options(&self) -> Result<Vec<(String, String)>> {
        let t = &self.target;
        let mut options: Vec<(String, String)> = t.location_options.clone().into_iter().collect();
        for (k, p) in &t.location_option_files {
            crate::fsutil::check_operator_secret_file(p)?;
            let mut b = crate::fsutil::read_bounded(p, MAX_OPTION_FILE)?;
            while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                b.pop();
            }
            let s = String::from_utf8(b).map_err(|_| {
                DaemonError::inconsistent(
                    p,
                    format!("target.location_option_files.{k} is not UTF-8 text"),
                )
            })?;
            options.push((k.clone(), s));
        }
        Ok(options)
    }

    /// The data directory: configured, or the default for this user. Always absolute.
    pub fn data_dir(&self) -> Result<PathBuf> {
        let d = match &self.data_dir {
            Some(d) => d.clone(),
            None => default_data_dir()?,
        };
        std::path::absolute(&d).map_err(|e| DaemonError::io("resolve", &d, e))
    }

    /// The vault URL: configured (a plain path made absolute), or `<data_dir>/vault`.
    pub fn vault_url(&self, data_dir: &Path) -> String {
        match &self.vault.url {
            Some(u) if u.contains("://") => u.clone(),
            Some(p) => std::path::absolute(p)
                .unwrap_or_else(|_| PathBuf::from(p))
                .display()
                .to_string(),
            None => data_dir.join("vault").display().to_string(),
        }
    }

    /// The configuration with defaults that depend on the machine filled in (data directory,
    /// vault location), as `ferryd config show` prints it.
    pub fn effective(&self) -> Result<Self> {
        let mut c = self.clone();
        let d = self.data_dir()?;
        c.vault.url = Some(self.vault_url(&d));
        c.data_dir = Some(d);
        Ok(c)
    }

    /// TOML text of this configuration. Nothing in it is secret (secrets are only file
    /// paths), but URLs and options are redacted of any embedded credentials
    /// (`scheme://user:password@host`) in case one slipped in.
    pub fn to_toml(&self) -> String {
        let mut c = self.clone();
        c.vault.url = c.vault.url.as_deref().map(redact_userinfo);
        for v in c.vault.options.values_mut() {
            *v = redact_userinfo(v);
        }
        c.target.location = c.target.location.as_deref().map(redact_userinfo);
        for v in c.target.location_options.values_mut() {
            *v = redact_userinfo(v);
        }
        toml::to_string(&c).expect("the configuration serialises to TOML")
    }
}

/// `scheme://user:pass@host/…` → `scheme://<redacted>@host/…`.
fn redact_userinfo(s: &str) -> String {
    if let Some((scheme, rest)) = s.split_once("://") {
        let end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            return format!("{scheme}://<redacted>{}", &rest[at..]);
        }
    }
    s.to_string()
}

/// The `FERRY_` environment provider (see the module docs for which names it reads).
fn env_provider() -> Env {
    Env::prefixed("FERRY_")
        .filter(|k| k.as_str().contains("__") || k == "data_dir")
        .split("__")
}

fn figment_error(e: figment::Error) -> DaemonError {
    let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
    DaemonError::Config(all.join("; "))
}

/// `/var/lib/ferry` as root; else `$XDG_DATA_HOME/ferry` or `~/.local/share/ferry`.
pub fn default_data_dir() -> Result<PathBuf> {
    if crate::fsutil::euid() == 0 {
        return Ok(PathBuf::from("/var/lib/ferry"));
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join("ferry"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/ferry")),
        None => Err(DaemonError::ConfigValue {
            key: "data_dir".into(),
            reason: "no default (HOME is not set): pass --data-dir or set FERRY_DATA_DIR".into(),
        }),
    }
}

#[cfg(test)]
#[allow(
    clippy::result_large_err,
    reason = "figment::Jail's closures return figment::Error, whatever its size"
)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &Jail, file: Option<&str>) -> Result<Config> {
        let path = file.map(|f| jail.directory().join(f));
        Config::load(path.as_deref(), &Overrides::default())
    }

    #[test]
    fn defaults_need_no_file() {
        Jail::expect_with(|j| {
            let c = load_in(j, None).unwrap();
            assert_eq!(c, Config::default());
            assert_eq!(c.api.listen.to_string(), DEFAULT_LISTEN);
            Ok(())
        });
    }

    /// `config/ferry.toml` is accepted and says exactly what the built-in defaults are, so
    /// the documentation cannot drift from the code.
    #[test]
    fn shipped_default_file_matches_the_defaults() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/ferry.toml");
        Jail::expect_with(|_| {
            let c = Config::load(Some(&shipped), &Overrides::default()).unwrap();
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn sources_layer_file_then_env_then_flags() {
        Jail::expect_with(|j| {
            j.create_file(
                "f.toml",
                "data_dir = \"/srv/a\"\n[api]\nlisten = \"127.0.0.1:1\"\n[api.limits]\nmax_connections = 7\n",
            )?;
            j.set_env("FERRY_API__LISTEN", "127.0.0.1:2");
            j.set_env("FERRY_API__LIMITS__MAX_BODY_BYTES", "4096");
            j.set_env("FERRY_PASSPHRASE", "belongs to the CLI, ignored");
            let c = load_in(j, Some("f.toml")).unwrap();
            assert_eq!(c.api.listen.to_string(), "127.0.0.1:2");
            assert_eq!(c.api.limits.max_connections, 7);
            assert_eq!(c.api.limits.max_body_bytes, 4096);
            assert_eq!(c.data_dir.as_deref(), Some(Path::new("/srv/a")));
            j.set_env("FERRY_DATA_DIR", "/srv/b");
            let c = load_in(j, Some("f.toml")).unwrap();
            assert_eq!(c.data_dir.as_deref(), Some(Path::new("/srv/b")));
            j.create_file("key", "0123456789abcdef0123456789abcdef")?;
            let o = Overrides {
                data_dir: Some("/srv/c".into()),
                listen: Some("127.0.0.1:3".parse().unwrap()),
                data_listen: Some("127.0.0.1:4".parse().unwrap()),
                vault_url: Some("s3://bucket/ferry".into()),
                vault_key_file: Some(j.directory().join("key")),
            };
            let c = Config::load(Some(&j.directory().join("f.toml")), &o).unwrap();
            assert_eq!(c.data_dir.as_deref(), Some(Path::new("/srv/c")));
            assert_eq!(c.api.listen.to_string(), "127.0.0.1:3");
            assert_eq!(c.process.listen.to_string(), "127.0.0.1:4");
            assert_eq!(c.vault.url.as_deref(), Some("s3://bucket/ferry"));
            assert_eq!(c.vault.key_file, Some(j.directory().join("key")));
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_named() {
        Jail::expect_with(|j| {
            j.create_file("f.toml", "[api]\nlisen = \"127.0.0.1:1\"\n")?;
            let e = load_in(j, Some("f.toml")).unwrap_err().to_string();
            assert!(e.contains("lisen") && e.contains("f.toml"), "{e}");
            Ok(())
        });
        Jail::expect_with(|j| {
            j.set_env("FERRY_API__LIMITS__MAX_BODDY", "1");
            let e = load_in(j, None).unwrap_err().to_string();
            assert!(e.contains("max_boddy") && e.contains("FERRY_"), "{e}");
            Ok(())
        });
        Jail::expect_with(|j| {
            j.create_file("f.toml", "colour = 1\n")?;
            let e = load_in(j, Some("f.toml")).unwrap_err().to_string();
            assert!(e.contains("colour"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("roles = []\n", "roles"),
            ("roles = [\"control\", \"control\"]\n", "roles"),
            ("roles = [\"process\", \"target\"]\n", "roles"),
            (
                "[api.limits]\nmax_body_bytes = 10\n",
                "api.limits.max_body_bytes",
            ),
            (
                "[api.limits]\nmax_connections = 0\n",
                "api.limits.max_connections",
            ),
            (
                "[api.limits]\nidle_timeout_secs = 5\nrequest_timeout_secs = 10\n",
                "api.limits.idle_timeout_secs",
            ),
            (
                "[api.tls]\ncert_file = \"/etc/hostname\"\n",
                "api.tls.key_file",
            ),
            ("[vault]\nname = \"../x\"\n", "vault.name"),
            ("[vault]\nurl = \"ftp://x\"\n", "vault.url"),
            ("[vault]\nurl = \"s3://k:x@b/p\"\n", "vault.url"),
            ("[vault]\nkey_file = \"/nonexistent/k\"\n", "vault.key_file"),
            (
                "[vault]\nurl = \"s3://b\"\noptions = { secret_access_key = \"x\" }\n",
                "vault.options.secret_access_key",
            ),
            (
                "[vault]\noptions = { endpoint = \"http://x\" }\n",
                "vault.options",
            ),
            ("[target]\nlocation = \"bucket/p\"\n", "target.location"),
            ("[target]\nlocation = \"ftp://h/p\"\n", "target.location"),
            (
                "[target]\nlocation = \"az://c/p?sig=x\"\n",
                "target.location",
            ),
            ("[target]\nlocation = \"s3://k:x@b/p\"\n", "target.location"),
            (
                "[target]\nlocation = \"s3://b/p\"\nlocation_options = { secret_access_key = \"x\" }\n",
                "target.location_options.secret_access_key",
            ),
            (
                "[target]\nlocation_options = { region = \"x\" }\n",
                "target.location_options",
            ),
            (
                "[target]\nlocation = \"s3://b/p\"\nlocation_option_files = { access_key_id = \"/nonexistent/k\" }\n",
                "target.location_option_files.access_key_id",
            ),
        ];
        for (text, key) in cases {
            Jail::expect_with(|j| {
                j.create_file("f.toml", text)?;
                let e = load_in(j, Some("f.toml")).unwrap_err();
                assert!(
                    matches!(&e, DaemonError::ConfigValue { key: k, .. } if k == key),
                    "{text}: {e}"
                );
                // The secret value itself is never echoed.
                assert!(!e.to_string().contains("= \"x\""), "{e}");
                Ok(())
            });
        }
        Jail::expect_with(|j| {
            j.create_file("f.toml", "[api]\nlisten = \"nowhere\"\n")?;
            let e = load_in(j, Some("f.toml")).unwrap_err().to_string();
            assert!(e.contains("listen"), "{e}");
            Ok(())
        });
        Jail::expect_with(|j| {
            let e = load_in(j, Some("missing.toml")).unwrap_err().to_string();
            assert!(e.contains("missing.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn show_fills_defaults_and_redacts() {
        Jail::expect_with(|j| {
            j.set_env("FERRY_DATA_DIR", "/srv/ferry");
            let c = load_in(j, None).unwrap().effective().unwrap();
            let t = c.to_toml();
            assert!(t.contains("data_dir = \"/srv/ferry\""), "{t}");
            assert!(t.contains("url = \"/srv/ferry/vault\""), "{t}");
            // What `show` prints, `check` accepts.
            j.create_file("shown.toml", &t)?;
            assert_eq!(load_in(j, Some("shown.toml")).unwrap(), c);
            Ok(())
        });
        assert_eq!(
            redact_userinfo("https://u:p@host:9000/x"),
            "https://<redacted>@host:9000/x"
        );
        assert_eq!(redact_userinfo("s3://bucket/a@b"), "s3://bucket/a@b");
        let mut c = Config::default();
        c.target.location = Some("s3://k:secret@bucket/p".into());
        c.target
            .location_options
            .insert("endpoint".into(), "https://u:pw@minio:9000".into());
        let t = c.to_toml();
        assert!(!t.contains("secret") && !t.contains("pw"), "{t}");
        assert!(t.contains("location = \"s3://<redacted>@bucket/p\""), "{t}");
    }

    #[test]
    fn target_location_options_read_secrets_from_files() {
        Jail::expect_with(|j| {
            j.create_file("secret", "s3cr3t\n")?;
            let p = j.directory().join("secret");
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            j.create_file(
                "f.toml",
                &format!(
                    "[target]\nlocation = \"s3://b/p\"\n[target.location_options]\nregion = \"r\"\n[target.location_option_files]\nsecret_access_key = \"{}\"\n",
                    p.display()
                ),
            )?;
            let c = load_in(j, Some("f.toml")).unwrap();
            let o = c.target_location_options().unwrap();
            assert_eq!(
                o,
                [
                    ("region".to_string(), "r".to_string()),
                    ("secret_access_key".to_string(), "s3cr3t".to_string())
                ]
            );
            // `config show` prints the file's path, never the secret.
            assert!(!c.effective().unwrap().to_toml().contains("s3cr3t"));
            Ok(())
        });
    }
}
