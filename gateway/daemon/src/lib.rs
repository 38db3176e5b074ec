//! `ferryd`, the Ferry appliance daemon: for now its control role's foundation — the data
//! directory, the catalog, TLS, admin tokens, protected items and their jobs, and the REST API
//! over HTTPS.
//!
//! Map of the crate, bottom up:
//! - [`error`]: the typed errors of the library (`main.rs` alone uses `anyhow`);
//! - [`fsutil`]: private files and directories (modes, owners, create-only durable writes);
//! - [`config`]: figment configuration (defaults < file < `FERRY_*` < flags), validation;
//! - [`policy`]: replication policies: settings, defaults, every rule, patches;
//! - [`item`]: protected items and their state machine (which operation may start when);
//! - [`catalog`]: the redb catalog with versioned records (`docs/catalog-format.md`);
//! - [`jobs`]: the job runner (operations queued in the catalog, run a few at a time);
//! - [`tls`]: the generated CA and server certificate, loading and checking them;
//! - [`auth`]: admin bearer tokens (hashed at rest, constant-time checks, revocation);
//! - [`metrics`]: counters and the catalog's gauges in Prometheus' text format;
//! - [`api`]: the axum router of `/api/v1` and its OpenAPI document;
//! - [`server`]: the TLS accept loop with connection, time and size limits, graceful stop;
//! - [`appliance`]: `ferryd up`'s first start and every start after it;
//! - [`snapshot`]: the catalog's encrypted snapshots in the vault, `restore-appliance`.
//!
//! The daemon depends on `ferry-store` (vaults); the store knows nothing of it.

pub mod agents;
pub mod api;
pub mod appliance;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod drain;
pub mod error;
pub mod fsutil;
pub mod item;
pub mod jobs;
pub mod journal;
pub mod metrics;
pub mod mirror;
pub mod mounts;
pub mod policy;
pub mod replication;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod tls;

pub use error::{DaemonError, Result};

/// What the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod testkit {
    use ferry_store::{Backend, InitOptions, OpenOptions, Secret, Vault};

    /// A new in-memory vault (key file of 32 sevens) with its cache under `dir`.
    pub(crate) async fn memory_vault(dir: &std::path::Path) -> Vault {
        Vault::init(
            Backend::open("memory://", &Vec::new(), false).unwrap(),
            &Secret::KeyFile(vec![7; 32]),
            InitOptions::default(),
            OpenOptions::new(dir.join("cache")),
        )
        .await
        .unwrap()
    }
}
