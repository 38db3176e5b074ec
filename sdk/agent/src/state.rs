//! The agent's state directory: everything the agent keeps between runs, in one private place
//! (default `/var/lib/ferry-agent`, or `$FERRY_AGENT_DIR`, or `--state-dir`).
//!
//! | file | what | mode |
//! | --- | --- | --- |
//! | `agent.toml` | the enrollment: gateway URL, agent name, when, fingerprints, file names ([`AgentFile`], format version 1, commented) | 0644 |
//! | `agent.key` | the private key, PKCS#8 PEM; never leaves the machine | 0600 |
//! | `agent.crt` | the client certificate the gateway's CA signed, PEM | 0644 |
//! | `ca.pem` | the appliance CA, PEM: the only root the agent trusts | 0644 |
//! | `disks/ITEM/DISK/` | each disk's replication state (`crate::tracking`, `docs/agent-state.md`) | 0700 |
//!
//! `agent.toml` also holds the local disk configuration (`[[disk]]`, `[replication]`,
//! [`crate::disks`]); `ferry-agent disk add | remove` rewrite it atomically
//! ([`StateDir::update_config`]: temporary file, fsync, rename, fsync of the directory, under
//! an exclusive lock so two edits cannot lose one another).
//!
//! The directory is 0700. `agent.toml` is the commit point: an enrollment exists exactly when it
//! does. Enrolling writes each file under a temporary name (created exclusively with its final
//! mode, written, fsynced), then renames the key, the certificates and `agent.toml` last into
//! place, and fsyncs the directory; `--force` first removes the old `agent.toml`, so a crash
//! half-way leaves "not enrolled", never a mix of two identities. Nothing is written before the
//! gateway's answer passed every check, and a failed enrollment removes the directory it
//! created ([`Pending`]). An existing enrollment (any of the four files) is refused unless
//! forced. Loading refuses a private key that group or others may read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ferry_proto::trust::{self, Fingerprint, TrustError};
use rustix::fs::FlockOperation;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::disks::{self, DiskConfig, ReplicationConfig};

/// Where the state lives when neither `--state-dir` nor `$FERRY_AGENT_DIR` says.
pub const DEFAULT_DIR: &str = "/var/lib/ferry-agent";
/// The environment variable naming the state directory.
pub const DIR_ENV: &str = "FERRY_AGENT_DIR";
/// The enrollment record.
pub const CONFIG_FILE: &str = "agent.toml";
/// The private key.
pub const KEY_FILE: &str = "agent.key";
/// The client certificate.
pub const CERT_FILE: &str = "agent.crt";
/// The appliance CA.
pub const CA_FILE: &str = "ca.pem";
/// The version of `agent.toml` this agent writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Largest file of the state directory read.
const MAX_FILE: u64 = 256 << 10;

/// What can go wrong with the state directory. Every variant names the path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// An enrollment is already there.
    #[error(
        "{} already holds an enrollment ({}); `--force` replaces it (with a new token)",
        dir.display(), files.join(", ")
    )]
    Exists {
        /// The state directory.
        dir: PathBuf,
        /// The enrollment files found in it.
        files: Vec<String>,
    },
    /// No enrollment there.
    #[error(
        "{} holds no enrollment (no {CONFIG_FILE}); run `ferry-agent enroll` first",
        dir.display()
    )]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`create the directory`, `read`).
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// A file whose content is refused.
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `agent.toml` of a format version this agent does not read.
    #[error(
        "{}: format version {found}, but this ferry-agent reads version {FORMAT_VERSION} \
         (written by another ferry-agent version)",
        path.display()
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
    /// The private key may be read by group or others.
    #[error(
        "{}: the private key is accessible to group or others (mode {mode:04o}); \
         it must be 0600 (`chmod 600`)",
        path.display()
    )]
    UnsafeKey {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The state path exists and is not a directory.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The state directory is a symbolic link or belongs to another user: whoever controls
    /// it could swap the CA and the identity.
    #[error(
        "{} is {what}: the agent keeps its key and the CA it trusts there, so it must be a real directory owned by the user the agent runs as",
        path.display()
    )]
    NotOwned {
        /// The path.
        path: PathBuf,
        /// "a symbolic link" or "owned by uid N".
        what: String,
    },
    /// The saved identity cannot be used for TLS.
    #[error("the identity saved in {} is unusable: {source}", dir.display())]
    Tls {
        /// The state directory.
        dir: PathBuf,
        /// Why.
        source: TrustError,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// `agent.toml`, format version 1: the enrollment record, and the local disk configuration.
/// Unknown keys are refused; a newer version is refused with a message saying so. `items`,
/// `[[disk]]` and `[replication]` are optional (files written before they existed load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// The gateway's URL (`https://host:port`).
    pub gateway: String,
    /// The agent's name on the gateway (its certificate's common name).
    pub agent: String,
    /// When the enrollment was made, RFC 3339 UTC.
    pub enrolled: String,
    /// The machine's host name at enrollment.
    pub hostname: String,
    /// The appliance CA's fingerprint (`SHA256 AB:CD:…`).
    pub ca_sha256: String,
    /// The client certificate's fingerprint (`SHA256 AB:CD:…`).
    pub certificate_sha256: String,
    /// When the client certificate expires, RFC 3339.
    pub certificate_expires: String,
    /// The identity's files.
    pub files: Files,
    /// The protected items the enrollment listed (absent in files written before the agent
    /// recorded them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<String>>,
    /// The disks to replicate (`[[disk]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk: Vec<DiskConfig>,
    /// Flow control and pacing (`[replication]`).
    #[serde(default, skip_serializing_if = "is_default_replication")]
    pub replication: ReplicationConfig,
    /// What a planned failover does here (`[failover]`).
    #[serde(default, skip_serializing_if = "is_default_failover")]
    pub failover: crate::disks::FailoverConfig,
}

fn is_default_failover(f: &crate::disks::FailoverConfig) -> bool {
    *f == crate::disks::FailoverConfig::default()
}

fn is_default_replication(r: &ReplicationConfig) -> bool {
    *r == ReplicationConfig::default()
}

/// The identity's files, relative to the state directory (or absolute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    /// The private key, PKCS#8 PEM.
    pub key: String,
    /// The client certificate, PEM.
    pub certificate: String,
    /// The appliance CA, PEM.
    pub ca: String,
}

impl Default for Files {
    fn default() -> Self {
        Self {
            key: KEY_FILE.into(),
            certificate: CERT_FILE.into(),
            ca: CA_FILE.into(),
        }
    }
}

const HEADER: &str = "\
# ferry-agent's enrollment with its gateway, and the disks it replicates. Written by
# `ferry-agent enroll` (`--force` replaces the whole enrollment) and `ferry-agent disk add|remove`.
#
# version              format version of this file (1)
# gateway              the gateway's URL
# agent                the agent's name on the gateway (its certificate's common name)
# enrolled             when the enrollment was made (RFC 3339, UTC)
# hostname             this machine's host name at enrollment
# ca_sha256            SHA-256 fingerprint of the appliance CA, the only root trusted
# certificate_sha256   SHA-256 fingerprint of the agent's client certificate
# certificate_expires  when the client certificate expires (RFC 3339)
# [files]              the identity's files, relative to this directory:
#   key                  the private key (PKCS#8 PEM, mode 0600; never leaves this machine)
#   certificate          the client certificate (PEM), signed by the appliance CA
#   ca                   the appliance CA certificate (PEM)
# items                the protected items the enrollment listed
# [[disk]]             one disk to replicate:
#   item, name           the protected item and the disk's name in it
#   path                 the raw block device or image file read
#   snapshot             none (read live), reflink, lvm or quiesce
#   lvm_snapshot_size    lvm: lvcreate size (10%ORIGIN, 20G)
#   pre_snapshot         quiesce: command run before reading (argv)
#   post_snapshot        quiesce: command run after reading, always (argv)
#   app_pre, app_post    app-consistent cycles: commands around taking the view (argv)
# [replication]        window_bytes (16 MiB), ack_timeout_seconds (60),
#                      max_bytes_per_second (none), commit_timeout_seconds (60, `run`)
# [[replication.throttle]]  a rate by local time of day; the first matching window wins over
#                      max_bytes_per_second: days (mon..sun, default every day), from, to
#                      (HH:MM; to < from wraps past midnight), max_bytes_per_second (0: none)
# [failover]           quiesce_command: run once before an item's final cycle for a planned
#                      failover, to stop the workload (argv, e.g. systemctl stop postgresql);
#                      stop_command: run once after it, to stop the source (e.g. poweroff)

";

impl AgentFile {
    /// The file's text: the commented header, then the keys.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).expect("the agent file serialises");
        format!("{HEADER}{body}")
    }

    /// Reads `text` (the content of `path`): the version first, then every key.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, StateError> {
        let format = |reason: String| StateError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| format(e.to_string()))?;
        match table.get("version") {
            Some(toml::Value::Integer(v)) if *v == i64::from(FORMAT_VERSION) => {}
            Some(toml::Value::Integer(v)) => {
                return Err(StateError::Version {
                    path: path.to_path_buf(),
                    found: *v,
                });
            }
            _ => return Err(format("no `version` number".into())),
        }
        let file: Self = toml::from_str(text).map_err(|e| format(e.to_string()))?;
        disks::check_all(&file.disk).map_err(format)?;
        file.replication.check().map_err(format)?;
        Ok(file)
    }
}

/// What an enrollment writes. `Debug` shows no key.
pub struct Enrollment {
    /// `agent.toml`.
    pub file: AgentFile,
    /// `agent.key`.
    pub key_pem: Zeroizing<String>,
    /// `agent.crt`.
    pub certificate_pem: String,
    /// `ca.pem`.
    pub ca_pem: String,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("file", &self.file)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// An enrollment read back, ready for mTLS. `Debug` shows no key (rustls elides it).
#[derive(Debug)]
pub struct Loaded {
    /// The state directory.
    pub dir: PathBuf,
    /// `agent.toml`.
    pub file: AgentFile,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The client certificate chain, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The appliance CA.
    pub cas: Vec<CertificateDer<'static>>,
}

impl Loaded {
    /// TLS for talking to the gateway: the saved CA the only root (webpki host-name checks),
    /// the saved certificate and key as the client identity.
    pub fn tls_config(&self) -> Result<rustls::ClientConfig, StateError> {
        trust::mtls_config(&self.cas, self.chain.clone(), self.key.clone_key()).map_err(|source| {
            StateError::Tls {
                dir: self.dir.clone(),
                source,
            }
        })
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

const ENROLLMENT_FILES: [&str; 4] = [CONFIG_FILE, KEY_FILE, CERT_FILE, CA_FILE];

/// Taken (`flock`, exclusive) while `agent.toml` is rewritten.
const CONFIG_LOCK: &str = ".agent.toml.lock";

fn tmp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

impl StateDir {
    /// The state directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The enrollment files present (even as dangling links).
    pub fn present(&self) -> Vec<String> {
        ENROLLMENT_FILES
            .iter()
            .filter(|n| fs::symlink_metadata(self.dir.join(n)).is_ok())
            .map(|n| (*n).to_string())
            .collect()
    }

    fn refuse_existing(&self, force: bool) -> Result<(), StateError> {
        let files = self.present();
        if force || files.is_empty() {
            return Ok(());
        }
        Err(StateError::Exists {
            dir: self.dir.clone(),
            files,
        })
    }

    /// Checks before enrolling: refuses an existing enrollment unless `force`, creates the
    /// directory (0700) if needed, tightens an existing one to 0700, and checks files can be
    /// created in it, so that a token is not spent on an enrollment that cannot be saved. What
    /// it created is removed again unless [`Pending::commit`] succeeds.
    pub fn prepare(&self, force: bool) -> Result<Pending<'_>, StateError> {
        self.refuse_existing(force)?;
        let created: Vec<PathBuf> = self
            .dir
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_err())
            .map(Path::to_path_buf)
            .collect();
        let pending = Pending {
            state: self,
            created,
            done: false,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err("create the directory", &self.dir))?;
        let meta = self.check_owned()?;
        if meta.permissions().mode() & 0o777 != 0o700 {
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("make private (0700)", &self.dir))?;
        }
        let probe = self.dir.join(tmp_name("probe"));
        let _ = fs::remove_file(&probe);
        create_new(&probe, 0o600).map_err(io_err("create a file in", &self.dir))?;
        fs::remove_file(&probe).map_err(io_err("remove", &probe))?;
        Ok(pending)
    }

    /// The state directory's metadata, refused unless it is a real directory (not a
    /// symbolic link) owned by the effective user.
    fn check_owned(&self) -> Result<fs::Metadata, StateError> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = fs::symlink_metadata(&self.dir).map_err(io_err("inspect", &self.dir))?;
        if meta.file_type().is_symlink() {
            return Err(StateError::NotOwned {
                path: self.dir.clone(),
                what: "a symbolic link".into(),
            });
        }
        if !meta.is_dir() {
            return Err(StateError::NotADirectory {
                path: self.dir.clone(),
            });
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(StateError::NotOwned {
                path: self.dir.clone(),
                what: format!("owned by uid {} (the agent runs as uid {me})", meta.uid()),
            });
        }
        Ok(meta)
    }

    /// Reads the enrollment back: `agent.toml` (its version checked), the key (refused if
    /// group or others may read it), the certificate and the CA (checked against the
    /// fingerprint `agent.toml` recorded).
    pub fn load(&self) -> Result<Loaded, StateError> {
        if fs::symlink_metadata(&self.dir).is_ok() {
            self.check_owned()?;
        }
        let config = self.dir.join(CONFIG_FILE);
        let text = match read_bounded(&config) {
            Err(StateError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotEnrolled {
                    dir: self.dir.clone(),
                });
            }
            r => r?,
        };
        let text = String::from_utf8(text.to_vec()).map_err(|_| StateError::Format {
            path: config.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        let file = AgentFile::from_toml(&text, &config)?;

        let key_path = self.dir.join(&file.files.key);
        let meta = fs::metadata(&key_path).map_err(io_err("read", &key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StateError::UnsafeKey {
                path: key_path,
                mode,
            });
        }
        let key_pem = read_bounded(&key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| StateError::Format {
            path: key_path.clone(),
            reason: "not a PEM private key".into(),
        })?;

        let certs = |name: &str| -> Result<Vec<CertificateDer<'static>>, StateError> {
            let path = self.dir.join(name);
            let pem = read_bounded(&path)?;
            trust::certs_from_pem(&pem, "not a certificate file").map_err(|e| StateError::Format {
                path: path.clone(),
                reason: e.to_string(),
            })
        };
        let chain = certs(&file.files.certificate)?;
        let cas = certs(&file.files.ca)?;
        let ca_path = self.dir.join(&file.files.ca);
        let recorded = Fingerprint::parse(&file.ca_sha256).map_err(|e| StateError::Format {
            path: config.clone(),
            reason: format!("`ca_sha256`: {e}"),
        })?;
        let found = Fingerprint::of(&cas[0]);
        if found != recorded {
            return Err(StateError::Format {
                path: ca_path,
                reason: format!(
                    "the CA has the fingerprint {found}, but {CONFIG_FILE} records {recorded}"
                ),
            });
        }
        Ok(Loaded {
            dir: self.dir.clone(),
            file,
            key,
            chain,
            cas,
        })
    }

    /// `agent.toml` alone (no key or certificate is read): for commands that only look at or
    /// edit the configuration.
    pub fn read_config(&self) -> Result<AgentFile, StateError> {
        if fs::symlink_metadata(&self.dir).is_ok() {
            self.check_owned()?;
        }
        let config = self.dir.join(CONFIG_FILE);
        let text = match read_bounded(&config) {
            Err(StateError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotEnrolled {
                    dir: self.dir.clone(),
                });
            }
            r => r?,
        };
        let text = String::from_utf8(text.to_vec()).map_err(|_| StateError::Format {
            path: config.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        AgentFile::from_toml(&text, &config)
    }

    /// Edits `agent.toml`: under an exclusive lock, reads it, lets `edit` change it (an error
    /// leaves the file untouched), checks the result, and replaces the file atomically (a
    /// temporary file written and fsynced, renamed over it, the directory fsynced).
    pub fn update_config<E: From<StateError>>(
        &self,
        edit: impl FnOnce(&mut AgentFile) -> Result<(), E>,
    ) -> Result<(), E> {
        let lock_path = self.dir.join(CONFIG_LOCK);
        if fs::symlink_metadata(&self.dir).is_ok() {
            self.check_owned()?;
        }
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StateError::NotEnrolled {
                    dir: self.dir.clone(),
                },
                _ => io_err("create", &lock_path)(e),
            })?;
        rustix::fs::flock(&lock, FlockOperation::LockExclusive)
            .map_err(|e| io_err("lock", &lock_path)(e.into()))?;
        let mut file = self.read_config()?;
        edit(&mut file)?;
        let config = self.dir.join(CONFIG_FILE);
        disks::check_all(&file.disk).map_err(|reason| StateError::Format {
            path: config.clone(),
            reason,
        })?;
        let tmp = self.dir.join(tmp_name(CONFIG_FILE));
        let _ = fs::remove_file(&tmp);
        let mut f = create_new(&tmp, 0o644).map_err(io_err("create", &tmp))?;
        f.write_all(file.to_toml().as_bytes())
            .map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &config).map_err(io_err("rename into place", &config))?;
        sync_dir(&self.dir)?;
        drop(lock);
        Ok(())
    }
}

/// A prepared state directory waiting for the enrollment to succeed. Dropped without
/// [`commit`](Self::commit), it removes its temporary files and the directories it created
/// (when empty), so a failed enrollment leaves nothing behind.
#[derive(Debug)]
pub struct Pending<'a> {
    state: &'a StateDir,
    /// Directories that did not exist before, deepest first.
    created: Vec<PathBuf>,
    done: bool,
}

impl Pending<'_> {
    /// Writes the enrollment (see the module documentation for the order). With `force`, an
    /// existing enrollment is replaced; without, one that appeared meanwhile is refused.
    pub fn commit(mut self, e: &Enrollment, force: bool) -> Result<(), StateError> {
        let st = self.state;
        st.refuse_existing(force)?;
        let config = e.file.to_toml();
        let files: [(&str, &[u8], u32); 4] = [
            (KEY_FILE, e.key_pem.as_bytes(), 0o600),
            (CERT_FILE, e.certificate_pem.as_bytes(), 0o644),
            (CA_FILE, e.ca_pem.as_bytes(), 0o644),
            (CONFIG_FILE, config.as_bytes(), 0o644),
        ];
        for (name, bytes, mode) in files {
            let tmp = st.dir.join(tmp_name(name));
            let _ = fs::remove_file(&tmp);
            let mut f = create_new(&tmp, mode).map_err(io_err("create", &tmp))?;
            f.write_all(bytes).map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("sync", &tmp))?;
        }
        let target = st.dir.join(CONFIG_FILE);
        match fs::remove_file(&target) {
            Ok(()) => sync_dir(&st.dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &target)(e)),
        }
        for (name, _, _) in files {
            let (tmp, path) = (st.dir.join(tmp_name(name)), st.dir.join(name));
            fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))?;
        }
        sync_dir(&st.dir)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for name in ENROLLMENT_FILES {
            let _ = fs::remove_file(self.state.dir.join(tmp_name(name)));
        }
        for d in &self.created {
            // Only empty directories go; anything else stays as it is.
            let _ = fs::remove_dir(d);
        }
    }
}

fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

/// `fsync` of a directory, so that renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// A whole small file, refused past [`MAX_FILE`] bytes; wiped from memory when dropped.
fn read_bounded(path: &Path) -> Result<Zeroizing<Vec<u8>>, StateError> {
    let f = File::open(path).map_err(io_err("read", path))?;
    let mut buf = Zeroizing::new(Vec::new());
    f.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    if buf.len() as u64 > MAX_FILE {
        return Err(StateError::Format {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_FILE} bytes"),
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::testkit::TestCa;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A real enrollment signed by a test CA.
    fn enrollment(ca: &TestCa, agent: &str) -> Enrollment {
        let id = Identity::generate().unwrap();
        let resp = ca.answer(agent, &id.csr_pem("host").unwrap(), 30);
        let issued = crate::identity::check_issued(&resp, &id, ca.fingerprint()).unwrap();
        Enrollment {
            file: AgentFile {
                version: FORMAT_VERSION,
                gateway: "https://gw.example:8443".into(),
                agent: agent.into(),
                enrolled: "2026-01-02T03:04:05Z".into(),
                hostname: "host".into(),
                ca_sha256: issued.ca_sha256.to_string(),
                certificate_sha256: issued.certificate_sha256.to_string(),
                certificate_expires: issued.certificate_expires,
                files: Files::default(),
                items: Some(vec!["db".into(), "web".into()]),
                disk: Vec::new(),
                replication: ReplicationConfig::default(),
                failover: crate::disks::FailoverConfig::default(),
            },
            key_pem: id.private_key_pem(),
            certificate_pem: issued.certificate_pem,
            ca_pem: issued.ca_pem,
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_then_load_round_trip_with_private_modes() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a/b/state");
        let st = StateDir::new(&dir);
        let ca = TestCa::new();
        let e = enrollment(&ca, "web-01");
        st.prepare(false).unwrap().commit(&e, false).unwrap();

        assert_eq!(
            listing(&dir),
            ["agent.crt", "agent.key", "agent.toml", "ca.pem"]
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CERT_FILE)) & 0o022, 0);

        let text = fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        assert!(text.starts_with("# ferry-agent's enrollment"), "{text}");
        assert!(text.contains("version = 1\n"), "{text}");
        assert!(text.contains("[files]\nkey = \"agent.key\""), "{text}");

        let l = st.load().unwrap();
        assert_eq!(l.file, e.file);
        assert_eq!(l.cas[0], ca.der());
        assert_eq!(l.chain.len(), 1);
        assert!(matches!(l.key, PrivateKeyDer::Pkcs8(_)));
        // The saved key, certificate and CA make a TLS client identity.
        l.tls_config().unwrap();
        let d = format!("{l:?} {e:?}");
        assert!(
            !d.contains("PRIVATE KEY") && !d.contains(&e.key_pem[30..60]),
            "{d}"
        );
    }

    #[test]
    fn an_existing_enrollment_is_refused_unless_forced() {
        let t = tempfile::tempdir().unwrap();
        let st = StateDir::new(t.path());
        let ca = TestCa::new();
        let first = enrollment(&ca, "web-01");
        st.prepare(false).unwrap().commit(&first, false).unwrap();

        let e = st.prepare(false).unwrap_err();
        assert!(matches!(e, StateError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        // Any one of the files is enough to refuse.
        let t2 = tempfile::tempdir().unwrap();
        fs::write(t2.path().join(KEY_FILE), "x").unwrap();
        let e = StateDir::new(t2.path()).prepare(false).unwrap_err();
        assert!(e.to_string().contains("(agent.key)"), "{e}");

        let second = enrollment(&ca, "web-02");
        st.prepare(true).unwrap().commit(&second, true).unwrap();
        let l = st.load().unwrap();
        assert_eq!(l.file.agent, "web-02");
        assert_eq!(
            fs::read_to_string(t.path().join(KEY_FILE)).unwrap(),
            *second.key_pem
        );
        assert_eq!(
            listing(t.path()),
            ["agent.crt", "agent.key", "agent.toml", "ca.pem"]
        );

        // An enrollment that appeared between prepare and commit is not overwritten.
        let p = st.prepare(true).unwrap();
        let e = p.commit(&first, false).unwrap_err();
        assert!(matches!(e, StateError::Exists { .. }), "{e}");
        assert_eq!(st.load().unwrap().file.agent, "web-02");
    }

    #[test]
    fn an_abandoned_enrollment_leaves_nothing() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("new/state");
        let st = StateDir::new(&dir);
        drop(st.prepare(false).unwrap());
        assert!(!t.path().join("new").exists());
        // An existing directory stays, empty.
        fs::create_dir(t.path().join("there")).unwrap();
        let st = StateDir::new(t.path().join("there"));
        drop(st.prepare(false).unwrap());
        assert!(listing(&t.path().join("there")).is_empty());
    }

    #[test]
    fn an_existing_open_directory_is_made_private() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("s");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let st = StateDir::new(&dir);
        st.prepare(false)
            .unwrap()
            .commit(&enrollment(&TestCa::new(), "a"), false)
            .unwrap();
        assert_eq!(mode(&dir), 0o700);
        // A file where the directory should be.
        let f = t.path().join("file");
        fs::write(&f, "").unwrap();
        assert!(StateDir::new(&f).prepare(false).is_err());
        // A symbolic link to a directory (someone else's, possibly) is refused, for writing
        // and for reading.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            StateDir::new(&link).prepare(true),
            Err(StateError::NotOwned { .. })
        ));
        assert!(matches!(
            StateDir::new(&link).load(),
            Err(StateError::NotOwned { .. })
        ));
    }

    #[test]
    fn load_refuses_what_it_cannot_trust() {
        let t = tempfile::tempdir().unwrap();
        let st = StateDir::new(t.path());
        let e = st.load().unwrap_err();
        assert!(matches!(e, StateError::NotEnrolled { .. }), "{e}");
        assert!(e.to_string().contains("ferry-agent enroll"), "{e}");

        let ca = TestCa::new();
        st.prepare(false)
            .unwrap()
            .commit(&enrollment(&ca, "a"), false)
            .unwrap();
        let key = t.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = st.load().unwrap_err();
        assert!(
            e.to_string().contains("mode 0644") && e.to_string().contains("agent.key"),
            "{e}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();

        // Another CA swapped in.
        let ca_path = t.path().join(CA_FILE);
        let saved_ca = fs::read_to_string(&ca_path).unwrap();
        fs::write(&ca_path, TestCa::new().pem()).unwrap();
        let e = st.load().unwrap_err();
        assert!(e.to_string().contains("records"), "{e}");
        fs::write(&ca_path, &saved_ca).unwrap();

        let config = t.path().join(CONFIG_FILE);
        let text = fs::read_to_string(&config).unwrap();
        fs::write(&config, text.replace("version = 1", "version = 2")).unwrap();
        let e = st.load().unwrap_err();
        assert!(matches!(e, StateError::Version { found: 2, .. }), "{e}");
        fs::write(&config, format!("{text}\nextra = 1\n")).unwrap();
        let e = st.load().unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        fs::write(&config, text.replace("version = 1\n", "")).unwrap();
        let e = st.load().unwrap_err();
        assert!(e.to_string().contains("no `version`"), "{e}");
        fs::write(&config, &text).unwrap();
        st.load().unwrap();

        let saved_key = fs::read(&key).unwrap();
        fs::write(&key, "not a key").unwrap();
        let e = st.load().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: not a PEM private key", key.display())
        );
        fs::write(&key, saved_key).unwrap();
        let cert = t.path().join(CERT_FILE);
        fs::remove_file(&cert).unwrap();
        let e = st.load().unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read {}: ", cert.display())),
            "{e}"
        );
    }

    /// An `agent.toml` written before `items`, `[[disk]]` and `[replication]` existed, as
    /// `ferry-agent enroll` wrote it then.
    const OLD_FILE: &str = "\
# ferry-agent's enrollment with its gateway. Written by `ferry-agent enroll`; do not edit
# (`ferry-agent enroll --force` replaces the whole enrollment).

version = 1
gateway = \"https://gw.example:8443\"
agent = \"web-01\"
enrolled = \"2026-01-02T03:04:05Z\"
hostname = \"host\"
ca_sha256 = \"SHA256 AB:CD\"
certificate_sha256 = \"SHA256 EF:01\"
certificate_expires = \"2027-01-02T03:04:05Z\"

[files]
key = \"agent.key\"
certificate = \"agent.crt\"
ca = \"ca.pem\"
";

    #[test]
    fn an_agent_file_without_disks_still_loads() {
        let f = AgentFile::from_toml(OLD_FILE, Path::new("agent.toml")).unwrap();
        assert_eq!(f.agent, "web-01");
        assert_eq!(f.items, None);
        assert!(f.disk.is_empty());
        assert_eq!(f.replication, ReplicationConfig::default());
        // Written back, it gains nothing it did not have.
        let text = f.to_toml();
        let keys: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            !keys.iter().any(|l| l.starts_with("items")
                || l.starts_with("[[disk]]")
                || l.starts_with("[replication]")),
            "{text}"
        );
        assert_eq!(
            AgentFile::from_toml(&text, Path::new("agent.toml")).unwrap(),
            f
        );
    }

    #[test]
    fn disks_and_replication_settings_round_trip_and_are_checked() {
        let mut f = AgentFile::from_toml(OLD_FILE, Path::new("agent.toml")).unwrap();
        f.items = Some(vec!["web".into()]);
        let mut d = DiskConfig::new("web", "sda", "/img/a.raw");
        d.snapshot = crate::disks::SnapshotMode::Reflink;
        d.app_pre = vec!["/usr/bin/freeze".into(), "--all".into()];
        d.app_post = vec!["/usr/bin/thaw".into()];
        f.disk = vec![d, DiskConfig::new("web", "sdb", "/img/b.raw")];
        f.replication.max_bytes_per_second = Some(1 << 20);
        let text = f.to_toml();
        assert!(text.contains("[[disk]]\nitem = \"web\"\nname = \"sda\"\npath = \"/img/a.raw\"\nsnapshot = \"reflink\""), "{text}");
        assert!(text.contains("[replication]\n"), "{text}");
        assert_eq!(AgentFile::from_toml(&text, Path::new("a")).unwrap(), f);

        let bad = text.replace("name = \"sdb\"", "name = \"sda\"");
        let e = AgentFile::from_toml(&bad, Path::new("/s/agent.toml")).unwrap_err();
        assert!(e.to_string().contains("web/sda is configured twice"), "{e}");
        let bad = format!(
            "{text}\n[[disk]]\nitem = \"web\"\nname = \"c\"\npath = \"/c\"\nsnapshot = \"zfs\"\n"
        );
        let e = AgentFile::from_toml(&bad, Path::new("a")).unwrap_err();
        assert!(e.to_string().contains("zfs"), "{e}");
    }

    #[test]
    fn update_config_replaces_the_file_atomically() {
        let t = tempfile::tempdir().unwrap();
        let st = StateDir::new(t.path());
        st.prepare(false)
            .unwrap()
            .commit(&enrollment(&TestCa::new(), "web-01"), false)
            .unwrap();
        st.update_config(|f| {
            f.disk.push(DiskConfig::new("web", "sda", "/dev/sda"));
            Ok::<_, StateError>(())
        })
        .unwrap();
        assert_eq!(st.read_config().unwrap().disk.len(), 1);
        assert_eq!(st.load().unwrap().file.disk[0].name, "sda");
        // A refused edit changes nothing; a result that fails the checks is not written.
        let before = fs::read(t.path().join(CONFIG_FILE)).unwrap();
        let e = st
            .update_config(|f| {
                f.disk.clear();
                Err(StateError::NotADirectory { path: "x".into() })
            })
            .unwrap_err();
        assert!(matches!(e, StateError::NotADirectory { .. }));
        let e = st
            .update_config(|f| {
                f.disk.push(DiskConfig::new("web", "sda", "/dev/other"));
                Ok::<_, StateError>(())
            })
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        assert_eq!(fs::read(t.path().join(CONFIG_FILE)).unwrap(), before);
        assert!(!t.path().join(tmp_name(CONFIG_FILE)).exists());
        assert_eq!(mode(&t.path().join(CONFIG_FILE)), 0o644);
        // Not enrolled: nothing to edit.
        let t2 = tempfile::tempdir().unwrap();
        let e = StateDir::new(t2.path())
            .update_config(|_| Ok::<_, StateError>(()))
            .unwrap_err();
        assert!(matches!(e, StateError::NotEnrolled { .. }), "{e}");
    }
}
