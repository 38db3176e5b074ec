//! The plugin manifest: who a plugin is, what it may touch, and how much it may use.
//!
//! A component alone is just code; the manifest is the operator's decision about it. It pins
//! the component by SHA-256 (a swapped file is refused), grants capabilities (every import the
//! component has must be granted here, WASI is never grantable), sets the per-call limits, and
//! carries the plugin's `[config]`. It is TOML, unknown keys are errors:
//!
//! ```toml
//! name = "webhook"
//! version = "0.1.0"
//! world = "failover-hook"          # or "source-adapter"
//! component = "webhook.wasm"       # relative to the manifest
//! sha256 = "3f1c…"                 # of the component file
//!
//! [grants]
//! log = true
//! config = true
//! clock = true
//! kv = true
//! http = { allow = ["hooks.example.com", "10.0.0.5:8080"] }
//! source = { related = ["*-flat.vmdk"] }   # source adapters: related files it may open
//!
//! [limits]
//! memory-mib = 64
//! deadline-ms = 5000
//! fuel = 10_000_000_000              # optional; needs fuel enabled in the host
//!
//! [config]
//! url = "https://hooks.example.com/ferry"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::PluginError;

/// The two kinds of plugin (WIT worlds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    SourceAdapter,
    FailoverHook,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            World::SourceAdapter => "source-adapter",
            World::FailoverHook => "failover-hook",
        }
    }

    /// The interface the world exports.
    pub fn export_interface(self) -> &'static str {
        match self {
            World::SourceAdapter => "adapter",
            World::FailoverHook => "hook",
        }
    }

    /// Capabilities the world may import at all.
    pub fn importable(self) -> &'static [Capability] {
        match self {
            World::SourceAdapter => &[
                Capability::Log,
                Capability::Config,
                Capability::Clock,
                Capability::Source,
                Capability::Http,
            ],
            World::FailoverHook => &[
                Capability::Log,
                Capability::Config,
                Capability::Clock,
                Capability::Http,
                Capability::Kv,
            ],
        }
    }
}

impl std::fmt::Display for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A grantable capability: one `ferry:plugin` interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Capability {
    Log,
    Config,
    Clock,
    Source,
    Http,
    Kv,
}

impl Capability {
    pub const ALL: [Capability; 6] = [
        Capability::Log,
        Capability::Config,
        Capability::Clock,
        Capability::Source,
        Capability::Http,
        Capability::Kv,
    ];

    pub fn interface(self) -> &'static str {
        match self {
            Capability::Log => "log",
            Capability::Config => "config",
            Capability::Clock => "clock",
            Capability::Source => "source",
            Capability::Http => "http",
            Capability::Kv => "kv",
        }
    }

    pub fn from_interface(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.interface() == name)
    }
}

/// What the operator granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Grants {
    #[serde(default)]
    pub log: bool,
    #[serde(default)]
    pub config: bool,
    #[serde(default)]
    pub clock: bool,
    #[serde(default)]
    pub kv: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpGrant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceGrant>,
}

/// `http = { allow = [...] }`: hosts (`name` or `name:port`) the plugin may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpGrant {
    pub allow: Vec<String>,
}

/// `source = { related = [...] }`: file-name patterns (`*` wildcards) of related files a source
/// adapter may open next to the disk it was handed. Empty: none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SourceGrant {
    #[serde(default)]
    pub related: Vec<String>,
}

impl Grants {
    pub fn has(&self, cap: Capability) -> bool {
        match cap {
            Capability::Log => self.log,
            Capability::Config => self.config,
            Capability::Clock => self.clock,
            Capability::Kv => self.kv,
            Capability::Http => self.http.is_some(),
            Capability::Source => self.source.is_some(),
        }
    }

    /// Everything a world can use, with no related files and no HTTP hosts: what a built-in
    /// source adapter gets.
    pub fn all_for(world: World) -> Grants {
        let mut g = Grants {
            log: true,
            config: true,
            clock: true,
            ..Grants::default()
        };
        match world {
            World::SourceAdapter => g.source = Some(SourceGrant::default()),
            World::FailoverHook => {
                g.kv = true;
                g.http = Some(HttpGrant::default());
            }
        }
        g
    }

    /// Parse one CLI grant: `log`, `config`, `clock`, `kv`, `source`, `http=HOST[,HOST…]`,
    /// `related=PATTERN[,PATTERN…]`.
    pub fn add_cli(&mut self, spec: &str) -> Result<(), PluginError> {
        let (key, value) = match spec.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (spec.trim(), None),
        };
        let list = |v: Option<&str>| -> Vec<String> {
            v.map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
        };
        match (key, value) {
            ("log", None) => self.log = true,
            ("config", None) => self.config = true,
            ("clock", None) => self.clock = true,
            ("kv", None) => self.kv = true,
            ("source", None) => {
                self.source.get_or_insert_with(SourceGrant::default);
            }
            ("http", v) => self
                .http
                .get_or_insert_with(HttpGrant::default)
                .allow
                .extend(list(v)),
            ("related", v) => self
                .source
                .get_or_insert_with(SourceGrant::default)
                .related
                .extend(list(v)),
            _ => {
                return Err(PluginError::Manifest {
                    origin: "--grant".into(),
                    message: format!(
                        "unknown grant {spec:?}; expected log, config, clock, kv, source, http=HOST[,HOST], related=PATTERN[,PATTERN]"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Per-call limits. Defaults suit a source adapter on the data path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Limits {
    /// Linear memory cap, MiB.
    pub memory_mib: u64,
    /// Wall-clock deadline of one call, milliseconds (host imports included).
    pub deadline_ms: u64,
    /// Fuel per call (needs `fuel = true` in the host configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Largest `reader.read` the plugin may ask for, bytes.
    pub max_read_bytes: u32,
    /// Largest HTTP request or response body, bytes.
    pub max_http_body_bytes: u32,
    /// Timeout of one host import (reads, HTTP), milliseconds.
    pub import_timeout_ms: u64,
    /// Log lines per second (burst of twice this); the rest are counted and dropped.
    pub log_lines_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: 64,
            deadline_ms: 30_000,
            fuel: None,
            max_read_bytes: 1 << 20,
            max_http_body_bytes: 1 << 20,
            import_timeout_ms: 10_000,
            log_lines_per_sec: 100,
        }
    }
}

impl Limits {
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1 << 20)
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=4096).contains(&self.memory_mib) {
            return Err(format!(
                "limits.memory-mib must be 1..=4096, not {}",
                self.memory_mib
            ));
        }
        if !(1..=3_600_000).contains(&self.deadline_ms) {
            return Err(format!(
                "limits.deadline-ms must be 1..=3600000, not {}",
                self.deadline_ms
            ));
        }
        if !(4096..=(16 << 20)).contains(&self.max_read_bytes) {
            return Err(format!(
                "limits.max-read-bytes must be 4096..=16777216, not {}",
                self.max_read_bytes
            ));
        }
        if self.max_http_body_bytes > (64 << 20) {
            return Err("limits.max-http-body-bytes must be at most 67108864".into());
        }
        if self.import_timeout_ms == 0 {
            return Err("limits.import-timeout-ms must be positive".into());
        }
        if self.log_lines_per_sec == 0 {
            return Err("limits.log-lines-per-sec must be positive".into());
        }
        Ok(())
    }
}

/// A plugin's manifest. See the module docs for the file format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub world: World,
    /// Component file, relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<PathBuf>,
    /// Lowercase hex SHA-256 of the component. Required in a manifest file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default)]
    pub grants: Grants,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

impl Manifest {
    /// A manifest made in code (built-in plugins, `ferry plugin run`).
    pub fn new(name: impl Into<String>, world: World) -> Manifest {
        Manifest {
            name: name.into(),
            version: "0.0.0".into(),
            world,
            component: None,
            sha256: None,
            grants: Grants::default(),
            limits: Limits::default(),
            config: BTreeMap::new(),
        }
    }

    /// Parse and validate manifest text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, PluginError> {
        let m: Manifest = toml::from_str(text).map_err(|e| PluginError::Manifest {
            origin: origin.into(),
            message: e.message().to_string(),
        })?;
        m.validate().map_err(|message| PluginError::Manifest {
            origin: origin.into(),
            message,
        })?;
        if m.sha256.is_none() {
            return Err(PluginError::Manifest {
                origin: origin.into(),
                message: "sha256 of the component is required".into(),
            });
        }
        Ok(m)
    }

    /// Read a manifest file and the component it names.
    pub fn load(path: &Path) -> Result<(Manifest, Vec<u8>), PluginError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PluginError::Io {
            what: "reading manifest",
            path: path.to_path_buf(),
            source,
        })?;
        let m = Manifest::parse(&text, &origin)?;
        let Some(rel) = m.component.clone() else {
            return Err(PluginError::Manifest {
                origin,
                message: "component (the .wasm file) is required".into(),
            });
        };
        let wasm_path = path.parent().unwrap_or(Path::new(".")).join(rel);
        let wasm = std::fs::read(&wasm_path).map_err(|source| PluginError::Io {
            what: "reading component",
            path: wasm_path,
            source,
        })?;
        Ok((m, wasm))
    }

    /// Check names and limits (also done by [`Manifest::parse`]).
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !name_ok {
            return Err(format!(
                "name {:?} must be 1-64 characters of a-z, 0-9, '-' or '_'",
                self.name
            ));
        }
        if let Some(sha) = &self.sha256
            && (sha.len() != 64
                || !sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(format!(
                "sha256 {sha:?} must be 64 lowercase hex characters"
            ));
        }
        for cap in Capability::ALL {
            if self.grants.has(cap) && !self.world.importable().contains(&cap) {
                return Err(format!(
                    "grants.{} is not a capability of the {} world",
                    cap.interface(),
                    self.world
                ));
            }
        }
        if let Some(http) = &self.grants.http {
            for h in &http.allow {
                if h.is_empty() || h.contains('/') || h.contains('@') || h.contains(' ') {
                    return Err(format!(
                        "grants.http.allow entry {h:?} must be a host name or host:port"
                    ));
                }
            }
        }
        if let Some(src) = &self.grants.source {
            for p in &src.related {
                if p.is_empty() || p.contains('/') || p.contains('\\') || p.contains("..") {
                    return Err(format!(
                        "grants.source.related pattern {p:?} must be a file-name pattern without path separators"
                    ));
                }
            }
        }
        for k in self.config.keys() {
            if k.is_empty() || k.len() > 256 {
                return Err(format!("config key {k:?} must be 1-256 bytes"));
            }
        }
        self.limits.validate()
    }
}

/// `*`-wildcard match of a file name against a pattern.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n
                .split_first()
                .is_some_and(|(d, nr)| c == d && go(rest, nr)),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "webhook"
version = "0.1.0"
world = "failover-hook"
component = "webhook.wasm"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[grants]
log = true
http = { allow = ["hooks.example.com"] }
[limits]
memory-mib = 32
[config]
url = "https://hooks.example.com/x"
"#;

    #[test]
    fn parses_a_manifest() {
        let m = Manifest::parse(GOOD, "t").unwrap();
        assert_eq!(m.world, World::FailoverHook);
        assert!(m.grants.has(Capability::Http));
        assert!(!m.grants.has(Capability::Kv));
        assert_eq!(m.limits.memory_mib, 32);
        assert_eq!(m.limits.deadline_ms, Limits::default().deadline_ms);
    }

    #[test]
    fn refuses_bad_manifests_naming_the_problem() {
        let cases = [
            (GOOD.replace("log = true", "logs = true"), "unknown field"),
            (GOOD.replace("memory-mib = 32", "memory-mib = 0"), "memory-mib"),
            (
                GOOD.replace("log = true", "log = true\nsource = {}"),
                "not a capability of the failover-hook world",
            ),
            (GOOD.replace("\"webhook\"", "\"Web Hook\""), "name"),
            (GOOD.replace("hooks.example.com\"]", "a/b\"]"), "host name"),
            (
                GOOD.replace(
                    "sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
                    "",
                ),
                "sha256",
            ),
        ];
        for (text, needle) in cases {
            let e = Manifest::parse(&text, "t").unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} should mention {needle:?}");
        }
    }

    #[test]
    fn cli_grants() {
        let mut g = Grants::default();
        g.add_cli("log").unwrap();
        g.add_cli("http=a.example,b.example:8080").unwrap();
        g.add_cli("related=*-flat.vmdk").unwrap();
        assert!(g.log && g.has(Capability::Http) && g.has(Capability::Source));
        assert_eq!(g.http.unwrap().allow.len(), 2);
        assert!(Grants::default().add_cli("fs").is_err());
    }

    /// Deterministic mutations of `seed`, fed to `f` (a stable-Rust stand-in for the fuzz
    /// target, run by every `cargo test`).
    fn mutations(seed: &[u8], rounds: usize, mut f: impl FnMut(&[u8])) {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        f(seed);
        for _ in 0..rounds {
            let mut d = seed.to_vec();
            for _ in 0..=next() % 4 {
                let at = |n: u64, len: usize| usize::try_from(n).unwrap_or(0) % len.max(1);
                match next() % 4 {
                    0 if !d.is_empty() => {
                        let i = at(next(), d.len());
                        d[i] ^= 1 << (next() % 8);
                    }
                    1 if !d.is_empty() => {
                        let i = at(next(), d.len());
                        d.remove(i);
                    }
                    2 => {
                        let i = at(next(), d.len() + 1);
                        d.insert(i, (next() & 0xff) as u8);
                    }
                    _ => {
                        let i = at(next(), d.len() + 1);
                        d.truncate(i);
                    }
                }
            }
            f(&d);
        }
    }

    #[test]
    fn mutation_smoke() {
        mutations(GOOD.as_bytes(), 3000, |d| {
            if let Ok(text) = std::str::from_utf8(d) {
                let _ = Manifest::parse(text, "smoke");
            }
        });
    }

    #[test]
    fn wildcards() {
        assert!(name_matches("*-flat.vmdk", "disk-flat.vmdk"));
        assert!(name_matches("*", "x"));
        assert!(!name_matches("*.vmdk", "disk.vhdx"));
        assert!(name_matches("a*b*c", "aXXbYYc"));
    }
}
