//! Errors of the daemon library.
//!
//! Error policy (as in `ferry-store`): every variant names what failed and on what (a file,
//! a configuration key, a table and key of the catalog), so the one line an operator sees on
//! stderr is enough to act on. Variants are grouped by what the operator can do:
//!
//! - `Config*`: the configuration is wrong; `ferryd config check` shows the same error.
//! - `UnsafePermissions`, `Inconsistent`: files under the data directory are not what the
//!   appliance left there. Nothing is regenerated behind the operator's back: the message says
//!   which file and what to do.
//! - `Io`, `Tls`, `Listen`: the system refused an operation; retrying may help.
//! - `Catalog`, `Vault`: errors of the catalog and the vault, with their own policies.
//!
//! Secrets never appear in an error: only the file they live in.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::catalog::CatalogError;

/// Shorthand for results of this crate.
pub type Result<T, E = DaemonError> = std::result::Result<T, E>;

/// Everything that can stop the daemon from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration sources could not be read or merged (figment's message names the
    /// key and the file or environment variable it came from).
    #[error("configuration: {0}")]
    Config(String),
    /// A configuration value is out of range or contradicts another.
    #[error("configuration: `{key}`: {reason}")]
    ConfigValue {
        /// Dotted key (`api.limits.max_body_bytes`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("cannot {action} `{path}`: {source}")]
    Io {
        /// What was attempted ("create", "read", "write", …).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file holding state or secrets is readable or writable by others, or not ours.
    #[error("unsafe permissions on `{path}`: {reason}")]
    UnsafePermissions {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Files under the data directory contradict each other (a partial copy, a key that does
    /// not match its certificate, a token file the catalog does not know, …).
    #[error("inconsistent data directory: `{path}`: {reason}")]
    Inconsistent {
        /// The file that does not fit.
        path: PathBuf,
        /// What does not fit, and what to do.
        reason: String,
    },
    /// Creating or loading certificates and keys failed.
    #[error("TLS: {what} `{path}`: {reason}")]
    Tls {
        /// What was being done ("load certificate", "generate CA", …).
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A vault could not be created or opened.
    #[error("vault `{name}`: {source}")]
    Vault {
        /// The vault's name in the catalog.
        name: String,
        /// The store's error (never contains the secret).
        #[source]
        source: ferry_store::StoreError,
    },
    /// An appliance snapshot cannot be used.
    #[error("appliance snapshot `{name}`: {reason}")]
    Snapshot {
        /// Its object name in the vault.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl DaemonError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        DaemonError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn unsafe_perms(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DaemonError::UnsafePermissions {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn inconsistent(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DaemonError::Inconsistent {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
