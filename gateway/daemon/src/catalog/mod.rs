//! The appliance catalog: what the control role knows that is not in a vault.
//!
//! One redb file (`<data_dir>/catalog.redb`, mode 0600) with one table per kind of record.
//! Every value is a small JSON object whose first member is its record version `"v"`; the
//! bytes are written from format structs of this module (`*V1`), never by serialising the
//! types the rest of the daemon uses, so a refactoring cannot change the file. Reading
//! dispatches on `"v"`: each older version converts up to the current type (garage's
//! `migrate` pattern), a newer one is refused with a clear error. The layout, byte by byte,
//! is `docs/catalog-format.md`; the committed fixtures in `tests/fixtures/catalog-v1/` (single
//! records and a whole catalog written by version 1) are read back by the tests of this
//! module, and stay when a version 2 appears.
//!
//! The whole file also carries a format number (`meta` / `catalog`): a catalog written by a
//! newer format is refused before anything is read or written.
//!
//! Every operation is one redb transaction, committed durably before it returns. Sizes are
//! bounded: records are at most [`MAX_RECORD_BYTES`], pages at most [`MAX_PAGE`] entries, admin
//! tokens at most [`MAX_ADMIN_TOKENS`] records of which [`MAX_ACTIVE_ADMIN_TOKENS`] active,
//! policies at most [`MAX_POLICIES`].
//!
//! Policies are checked against their rules (`crate::policy`) when written and when read, so
//! nothing invalid is stored or used. Each write of a policy takes the next number of the
//! catalog-wide revision counter (`meta`/`revision`) in the same transaction: a revision only
//! grows, and a client's `If-Match` is compared with it inside the writing transaction.

use std::fs::OpenOptions;
use std::ops::Bound;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::policy::{self, DEFAULT_POLICY, Policy, PolicyError, PolicyPatch, PolicySettings};

mod agents;
mod items;
mod points;
mod transfer;
pub use agents::{
    Agent, CertInfo, EnrollRefusal, EnrollToken, EnrollTokenState, Group, GroupPatch,
    MAX_ENROLL_TOKENS, MAX_MEMBERS, MAX_TOKEN_TTL_SECS, MIN_TOKEN_TTL_SECS,
};
pub use items::{
    Census, ItemPatch, Job, JobLine, JobState, MAX_ITEMS, MAX_JOB_LOG_BYTES, MAX_JOBS,
};
pub use points::{ItemPoints, MAX_POINTS, PointSummary, point_key};
pub use transfer::{Records, check_records};

/// Format of the whole catalog written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Version of every record written by this build.
pub const RECORD_VERSION: u8 = 1;
/// Largest record accepted when reading.
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// Largest page returned by a listing.
pub const MAX_PAGE: usize = 1000;
/// Admin token records kept (active and revoked).
pub const MAX_ADMIN_TOKENS: u64 = 10_000;
/// Admin tokens active at once.
pub const MAX_ACTIVE_ADMIN_TOKENS: usize = 100;
/// Policies kept.
pub const MAX_POLICIES: u64 = 1000;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ADMIN_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("admin_tokens");
const VAULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("vaults");
const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");

const META_CATALOG: &str = "catalog";
const META_BOOTSTRAP: &str = "bootstrap";
const META_REVISION: &str = "revision";

/// Errors of the catalog. Each names the file or the record concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// redb failed (I/O, corruption, a transaction error).
    #[error("catalog `{path}`: {reason}")]
    Db {
        /// The catalog file.
        path: PathBuf,
        /// What redb said.
        reason: String,
    },
    /// Another process holds the catalog open.
    #[error(
        "catalog `{path}` is in use by another process (is another ferryd running on this data directory?)"
    )]
    InUse {
        /// The catalog file.
        path: PathBuf,
    },
    /// The catalog was written by a newer format.
    #[error("catalog `{path}` has format version {found}; this ferryd reads up to {supported}")]
    NewerFormat {
        /// The catalog file.
        path: PathBuf,
        /// Format found.
        found: u32,
        /// Newest format this build reads.
        supported: u32,
    },
    /// A record cannot be decoded.
    #[error("catalog record {table}/{key}: {reason}")]
    BadRecord {
        /// Table name.
        table: &'static str,
        /// Record key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A record was written by a newer version.
    #[error(
        "catalog record {table}/{key} has version {found}; this ferryd reads up to {supported}"
    )]
    NewerRecord {
        /// Table name.
        table: &'static str,
        /// Record key.
        key: String,
        /// Version found.
        found: u64,
        /// Newest version this build reads.
        supported: u8,
    },
    /// No admin token has this id.
    #[error("no admin token `{0}`")]
    TokenNotFound(String),
    /// Revoking this token would leave no active admin token.
    #[error(
        "admin token `{0}` is the last active one: revoking it would lock every administrator out; create another token first"
    )]
    LastActiveToken(String),
    /// A bound on admin tokens was reached.
    #[error("too many admin tokens: at most {limit} {what}")]
    TooManyTokens {
        /// The bound.
        limit: u64,
        /// "active" or "records (active and revoked)".
        what: &'static str,
    },
    /// A vault of that name is already registered.
    #[error("a vault named `{0}` is already in the catalog")]
    VaultExists(String),
    /// No policy has this name.
    #[error("no policy `{0}`")]
    PolicyNotFound(String),
    /// A policy of that name exists.
    #[error("a policy named `{0}` already exists")]
    PolicyExists(String),
    /// [`MAX_POLICIES`] policies exist.
    #[error("too many policies: at most {MAX_POLICIES}; delete one first")]
    TooManyPolicies,
    /// A policy breaks a rule (the error names the field and the rule).
    #[error(transparent)]
    InvalidPolicy(#[from] PolicyError),
    /// The caller's expected revision is not the policy's.
    #[error(
        "policy `{name}` is at revision {current}, not the one expected: read it again and retry"
    )]
    RevisionMismatch {
        /// The policy.
        name: String,
        /// Its revision.
        current: u64,
    },
    /// The default policy cannot be deleted.
    #[error(
        "policy `{0}` is the default policy (items enabled without a policy get it): it can be changed, not deleted"
    )]
    DefaultPolicy(String),
    /// No protected item has this name.
    #[error("no protected item `{0}`")]
    ItemNotFound(String),
    /// A protected item of that name exists.
    #[error("a protected item named `{0}` already exists")]
    ItemExists(String),
    /// [`MAX_ITEMS`] items exist.
    #[error("too many protected items: at most {MAX_ITEMS}")]
    TooManyItems,
    /// An item's settings break a rule.
    #[error("{0}")]
    InvalidItem(String),
    /// A record the item names does not exist.
    #[error("no {what} `{name}` (the item names it)")]
    MissingReference {
        /// "vault" or "policy".
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// A job holds the item.
    #[error("protected item `{name}` is held by job `{job}`; wait for it to end")]
    ItemBusy {
        /// The item.
        name: String,
        /// The job.
        job: String,
    },
    /// The operation is not possible in the item's state (the reason says why).
    #[error("protected item `{name}`: {reason}")]
    IllegalTransition {
        /// The item.
        name: String,
        /// Why, naming the operation and the state.
        reason: String,
    },
    /// The caller's expected revision is not the item's.
    #[error(
        "protected item `{name}` is at revision {current}, not the one expected: read it again and retry"
    )]
    ItemRevisionMismatch {
        /// The item.
        name: String,
        /// Its revision.
        current: u64,
    },
    /// No job has this id.
    #[error("no job `{0}`")]
    JobNotFound(String),
    /// The job is not in a state that allows this.
    #[error("job `{id}` is {state}: {reason}")]
    JobState {
        /// The job.
        id: String,
        /// Its state.
        state: &'static str,
        /// What is not possible.
        reason: &'static str,
    },
    /// A bound on records was reached.
    #[error("too many {what}: at most {limit}")]
    TooMany {
        /// What is bounded.
        what: &'static str,
        /// The bound.
        limit: u64,
    },
    /// A value breaks a rule (the message names it).
    #[error("{0}")]
    Invalid(String),
    /// The caller's expected revision is not the record's.
    #[error(
        "{what} `{name}` is at revision {current}, not the one expected: read it again and retry"
    )]
    StaleRevision {
        /// "agent" or "group".
        what: &'static str,
        /// Its name.
        name: String,
        /// Its revision.
        current: u64,
    },
    /// No agent has this name.
    #[error("no agent `{0}`")]
    AgentNotFound(String),
    /// The agent name is enrolled and active.
    #[error("agent `{0}` is enrolled; revoke it first to enroll it again")]
    AgentExists(String),
    /// No enrollment token has this id.
    #[error("no enrollment token `{0}`")]
    EnrollTokenNotFound(String),
    /// An enrollment was refused because of its token.
    #[error("{0}")]
    EnrollRefused(EnrollRefusal),
    /// The appliance CA could not sign the agent's certificate.
    #[error("signing the agent certificate failed: {0}")]
    Signing(String),
    /// No group has this name.
    #[error("no group `{0}`")]
    GroupNotFound(String),
    /// The group's members changed while a group operation was being prepared.
    #[error("group `{0}` changed while its failover was being prepared: read it again and retry")]
    GroupChanged(String),
    /// A group of that name exists.
    #[error("a group named `{0}` already exists")]
    GroupExists(String),
    /// The item is already in another group.
    #[error(
        "protected item `{item}` is already in group `{group}` (an item is in one group at most)"
    )]
    ItemInGroup {
        /// The item.
        item: String,
        /// The group holding it.
        group: String,
    },
    /// The policy is used and cannot be deleted.
    #[error(
        "policy `{name}` is used by {users} protected item(s): move them to another policy first"
    )]
    PolicyInUse {
        /// The policy.
        name: String,
        /// How many use it.
        users: u64,
    },
}

type Result<T, E = CatalogError> = std::result::Result<T, E>;

/// An admin bearer token. Only the SHA-256 of its secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// Stable id (sortable by creation time).
    pub id: String,
    /// What the operator called it.
    pub name: String,
    /// SHA-256 of the secret.
    pub sha256: [u8; 32],
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Revocation time, Unix ms.
    pub revoked_ms: Option<u64>,
}

impl AdminToken {
    /// Not revoked.
    pub fn is_active(&self) -> bool {
        self.revoked_ms.is_none()
    }
}

/// A vault the appliance uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultEntry {
    /// Name in the API.
    pub name: String,
    /// Location (directory, `s3://…`, `az://…`); never holds credentials.
    pub url: String,
    /// When it was registered, Unix ms.
    pub created_ms: u64,
}

/// The `meta`/`catalog` record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogInfo {
    /// Format of the whole catalog.
    pub format: u32,
    /// When the catalog was created, Unix ms.
    pub created_ms: u64,
}

/// The `meta`/`bootstrap` record: the first admin token was issued (written once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// Id of the first admin token.
    pub token_id: String,
    /// When it was issued, Unix ms.
    pub issued_ms: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The entries, in key order.
    pub items: Vec<T>,
    /// Key of the last entry, when more entries follow it.
    pub next_after: Option<String>,
}

/// Version-tagged encoding of catalog records (see `docs/catalog-format.md`).
pub mod record {
    use super::*;

    /// Only the version member, read first to choose the format struct.
    #[derive(Deserialize)]
    struct Probe {
        v: u64,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CatalogV1 {
        v: u8,
        format: u32,
        created_ms: u64,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct BootstrapV1 {
        v: u8,
        token_id: String,
        issued_ms: u64,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AdminTokenV1 {
        v: u8,
        id: String,
        name: String,
        sha256: String,
        created_ms: u64,
        revoked_ms: Option<u64>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct VaultV1 {
        v: u8,
        name: String,
        url: String,
        created_ms: u64,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RevisionV1 {
        v: u8,
        last: u64,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RetentionV1 {
        keep_all_hours: u32,
        hourly_days: u32,
        every_hours: u32,
        for_days: u32,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PolicyV1 {
        v: u8,
        name: String,
        description: Option<String>,
        rpo_threshold_minutes: u32,
        cycle_interval_seconds: u32,
        retention: RetentionV1,
        app_consistent_frequency_minutes: u32,
        chunk_size: u32,
        compression_level: u32,
        retry_schedule_seconds: Vec<u32>,
        resync_threshold_percent: u32,
        revision: u64,
        created_ms: u64,
        updated_ms: u64,
        /// Added after version 1's first policies: absent when the policy has no resync
        /// window (so older records read unchanged and policies without one are written as
        /// before, byte for byte).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resync_window: Option<ResyncWindowV1>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ResyncWindowV1 {
        from: String,
        to: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        days: Option<Vec<String>>,
    }

    pub(super) fn to_vec<T: Serialize>(r: &T) -> Vec<u8> {
        serde_json::to_vec(r).expect("records serialise")
    }

    /// Parses the version member, refusing oversize and newer records.
    pub(super) fn version(table: &'static str, key: &str, b: &[u8]) -> Result<u64> {
        let bad = |reason: String| CatalogError::BadRecord {
            table,
            key: key.to_string(),
            reason,
        };
        if b.len() > MAX_RECORD_BYTES {
            return Err(bad(format!("{} bytes is too large", b.len())));
        }
        let p: Probe = serde_json::from_slice(b).map_err(|e| bad(e.to_string()))?;
        if p.v == 0 {
            return Err(bad("version 0 does not exist".into()));
        }
        if p.v > u64::from(RECORD_VERSION) {
            return Err(CatalogError::NewerRecord {
                table,
                key: key.to_string(),
                found: p.v,
                supported: RECORD_VERSION,
            });
        }
        Ok(p.v)
    }

    pub(super) fn parse<'a, T: Deserialize<'a>>(
        table: &'static str,
        key: &str,
        b: &'a [u8],
    ) -> Result<T> {
        serde_json::from_slice(b).map_err(|e| CatalogError::BadRecord {
            table,
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    /// Encodes the `meta`/`catalog` record.
    pub fn encode_catalog(c: &CatalogInfo) -> Vec<u8> {
        to_vec(&CatalogV1 {
            v: RECORD_VERSION,
            format: c.format,
            created_ms: c.created_ms,
        })
    }

    /// Decodes the `meta`/`catalog` record.
    pub fn decode_catalog(b: &[u8]) -> Result<CatalogInfo> {
        let (t, k) = ("meta", META_CATALOG);
        // Version 1 is the only one so far; a version 2 turns this into a `match` whose
        // older arms convert up.
        version(t, k, b)?;
        let r: CatalogV1 = parse(t, k, b)?;
        Ok(CatalogInfo {
            format: r.format,
            created_ms: r.created_ms,
        })
    }

    /// Encodes the `meta`/`bootstrap` record.
    pub fn encode_bootstrap(r: &Bootstrap) -> Vec<u8> {
        to_vec(&BootstrapV1 {
            v: RECORD_VERSION,
            token_id: r.token_id.clone(),
            issued_ms: r.issued_ms,
        })
    }

    /// Decodes the `meta`/`bootstrap` record.
    pub fn decode_bootstrap(b: &[u8]) -> Result<Bootstrap> {
        let (t, k) = ("meta", META_BOOTSTRAP);
        // Version 1 is the only one so far; a version 2 turns this into a `match` whose
        // older arms convert up.
        version(t, k, b)?;
        let r: BootstrapV1 = parse(t, k, b)?;
        Ok(Bootstrap {
            token_id: r.token_id,
            issued_ms: r.issued_ms,
        })
    }

    /// Encodes an `admin_tokens` record.
    pub fn encode_admin_token(t: &AdminToken) -> Vec<u8> {
        to_vec(&AdminTokenV1 {
            v: RECORD_VERSION,
            id: t.id.clone(),
            name: t.name.clone(),
            sha256: hex::encode(t.sha256),
            created_ms: t.created_ms,
            revoked_ms: t.revoked_ms,
        })
    }

    /// Decodes an `admin_tokens` record stored under `key`.
    pub fn decode_admin_token(key: &str, b: &[u8]) -> Result<AdminToken> {
        let t = "admin_tokens";
        let bad = |reason: String| CatalogError::BadRecord {
            table: t,
            key: key.to_string(),
            reason,
        };
        // Version 1 is the only one so far; a version 2 turns this into a `match` whose
        // older arms convert up.
        version(t, key, b)?;
        let r: AdminTokenV1 = parse(t, key, b)?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&r.sha256, &mut sha256).map_err(|e| bad(format!("sha256: {e}")))?;
        if r.id != key {
            return Err(bad(format!("holds id `{}`", r.id)));
        }
        Ok(AdminToken {
            id: r.id,
            name: r.name,
            sha256,
            created_ms: r.created_ms,
            revoked_ms: r.revoked_ms,
        })
    }

    /// Encodes a `vaults` record.
    pub fn encode_vault(v: &VaultEntry) -> Vec<u8> {
        to_vec(&VaultV1 {
            v: RECORD_VERSION,
            name: v.name.clone(),
            url: v.url.clone(),
            created_ms: v.created_ms,
        })
    }

    /// Decodes a `vaults` record stored under `key`.
    pub fn decode_vault(key: &str, b: &[u8]) -> Result<VaultEntry> {
        let t = "vaults";
        // Version 1 is the only one so far; a version 2 turns this into a `match` whose
        // older arms convert up.
        version(t, key, b)?;
        let r: VaultV1 = parse(t, key, b)?;
        if r.name != key {
            return Err(CatalogError::BadRecord {
                table: t,
                key: key.to_string(),
                reason: format!("holds name `{}`", r.name),
            });
        }
        Ok(VaultEntry {
            name: r.name,
            url: r.url,
            created_ms: r.created_ms,
        })
    }

    /// Encodes the `meta`/`revision` record: the last revision handed out.
    pub fn encode_revision(last: u64) -> Vec<u8> {
        to_vec(&RevisionV1 {
            v: RECORD_VERSION,
            last,
        })
    }

    /// Decodes the `meta`/`revision` record.
    pub fn decode_revision(b: &[u8]) -> Result<u64> {
        let (t, k) = ("meta", META_REVISION);
        // Version 1 is the only one so far; a version 2 turns this into a `match` whose
        // older arms convert up.
        version(t, k, b)?;
        let r: RevisionV1 = parse(t, k, b)?;
        Ok(r.last)
    }

    /// Encodes a `policies` record.
    pub fn encode_policy(p: &Policy) -> Vec<u8> {
        let s = &p.settings;
        to_vec(&PolicyV1 {
            v: RECORD_VERSION,
            name: p.name.clone(),
            description: s.description.clone(),
            rpo_threshold_minutes: s.rpo_threshold_minutes,
            cycle_interval_seconds: s.cycle_interval_seconds,
            retention: RetentionV1 {
                keep_all_hours: s.retention.keep_all_hours,
                hourly_days: s.retention.hourly_days,
                every_hours: s.retention.every_hours,
                for_days: s.retention.for_days,
            },
            app_consistent_frequency_minutes: s.app_consistent_frequency_minutes,
            chunk_size: s.chunk_size,
            compression_level: s.compression_level,
            retry_schedule_seconds: s.retry_schedule_seconds.clone(),
            resync_threshold_percent: s.resync_threshold_percent,
            revision: p.revision,
            created_ms: p.created_ms,
            updated_ms: p.updated_ms,
            resync_window: s.resync_window.map(|w| ResyncWindowV1 {
                from: w.from_text(),
                to: w.to_text(),
                days: w.day_names(),
            }),
        })
    }

    /// Decodes a `policies` record stored under `key`, checking the policy's rules.
    pub fn decode_policy(key: &str, b: &[u8]) -> Result<Policy> {
        let t = "policies";
        let bad = |reason: String| CatalogError::BadRecord {
            table: t,
            key: key.to_string(),
            reason,
        };
        // Version 1 is the only one so far; a version 2 turns this into a `match` whose
        // older arms convert up.
        version(t, key, b)?;
        let r: PolicyV1 = parse(t, key, b)?;
        if r.name != key {
            return Err(bad(format!("holds name `{}`", r.name)));
        }
        let resync_window = r
            .resync_window
            .map(|w| policy::ResyncWindow::parse(&w.from, &w.to, w.days.as_deref()))
            .transpose()
            .map_err(|e| bad(e.to_string()))?;
        let p = Policy {
            name: r.name,
            settings: PolicySettings {
                description: r.description,
                rpo_threshold_minutes: r.rpo_threshold_minutes,
                cycle_interval_seconds: r.cycle_interval_seconds,
                retention: policy::Retention {
                    keep_all_hours: r.retention.keep_all_hours,
                    hourly_days: r.retention.hourly_days,
                    every_hours: r.retention.every_hours,
                    for_days: r.retention.for_days,
                },
                app_consistent_frequency_minutes: r.app_consistent_frequency_minutes,
                chunk_size: r.chunk_size,
                compression_level: r.compression_level,
                retry_schedule_seconds: r.retry_schedule_seconds,
                resync_threshold_percent: r.resync_threshold_percent,
                resync_window,
            },
            revision: r.revision,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
        };
        policy::check_name(&p.name)
            .and_then(|()| p.settings.validate())
            .map_err(|e| bad(e.to_string()))?;
        if p.revision == 0 {
            return Err(bad("revision 0 is never handed out".into()));
        }
        Ok(p)
    }
}

/// The open catalog.
#[derive(Debug)]
pub struct Catalog {
    db: Database,
    path: PathBuf,
}

impl Catalog {
    /// Opens the catalog at `path`, creating it (mode 0600, current format) if absent.
    /// Returns it and whether it was created.
    pub fn open(path: &Path) -> Result<(Self, bool)> {
        let db_err = |e: &dyn std::fmt::Display| CatalogError::Db {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let created = !path.exists();
        if created {
            // redb creates files with the umask's mode; make it private first (redb
            // initialises an empty file).
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| db_err(&e))?;
        }
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(CatalogError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(db_err(&e)),
        };
        let me = Self {
            db,
            path: path.to_path_buf(),
        };
        let info = {
            let r = me.db.begin_read().map_err(|e| me.err(e))?;
            match r.open_table(META) {
                Ok(t) => t
                    .get(META_CATALOG)
                    .map_err(|e| me.err(e))?
                    .map(|v| v.value().to_vec()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(me.err(e)),
            }
        };
        match info {
            Some(b) => {
                // The format check comes before the record's own version check: a newer
                // catalog may have changed the meta record too.
                if let Ok(probe) = serde_json::from_slice::<serde_json::Value>(&b)
                    && let Some(f) = probe.get("format").and_then(serde_json::Value::as_u64)
                    && f > u64::from(FORMAT_VERSION)
                {
                    return Err(CatalogError::NewerFormat {
                        path: path.to_path_buf(),
                        found: u32::try_from(f).unwrap_or(u32::MAX),
                        supported: FORMAT_VERSION,
                    });
                }
                let info = record::decode_catalog(&b)?;
                if info.format > FORMAT_VERSION {
                    return Err(CatalogError::NewerFormat {
                        path: path.to_path_buf(),
                        found: info.format,
                        supported: FORMAT_VERSION,
                    });
                }
            }
            None => {
                let w = me.db.begin_write().map_err(|e| me.err(e))?;
                {
                    let mut m = w.open_table(META).map_err(|e| me.err(e))?;
                    let info = CatalogInfo {
                        format: FORMAT_VERSION,
                        created_ms: ferry_store::point::now_ms(),
                    };
                    m.insert(META_CATALOG, &record::encode_catalog(&info)[..])
                        .map_err(|e| me.err(e))?;
                    w.open_table(ADMIN_TOKENS).map_err(|e| me.err(e))?;
                    w.open_table(VAULTS).map_err(|e| me.err(e))?;
                    w.open_table(POLICIES).map_err(|e| me.err(e))?;
                    w.open_table(items::ITEMS).map_err(|e| me.err(e))?;
                    w.open_table(items::JOBS).map_err(|e| me.err(e))?;
                    w.open_table(items::JOB_QUEUE).map_err(|e| me.err(e))?;
                    w.open_table(agents::ENROLL_TOKENS).map_err(|e| me.err(e))?;
                    w.open_table(agents::AGENTS).map_err(|e| me.err(e))?;
                    w.open_table(agents::GROUPS).map_err(|e| me.err(e))?;
                    w.open_table(points::POINTS).map_err(|e| me.err(e))?;
                }
                w.commit().map_err(|e| me.err(e))?;
            }
        }
        me.add_missing_tables()?;
        Ok((me, created))
    }

    /// Creates the tables version 1 gained after its first catalogs were written
    /// (`policies`, then `items`, `jobs` and `job_queue`, then `enrollment_tokens`, `agents`,
    /// `groups` and `points`), in one write transaction, only when one is missing.
    fn add_missing_tables(&self) -> Result<()> {
        let later = [
            POLICIES,
            items::ITEMS,
            items::JOBS,
            items::JOB_QUEUE,
            agents::ENROLL_TOKENS,
            agents::AGENTS,
            agents::GROUPS,
            points::POINTS,
        ];
        let mut missing = false;
        {
            let r = self.db.begin_read().map_err(|e| self.err(e))?;
            for t in later {
                match r.open_table(t) {
                    Ok(_) => {}
                    Err(redb::TableError::TableDoesNotExist(_)) => missing = true,
                    Err(e) => return Err(self.err(e)),
                }
            }
        }
        if missing {
            let w = self.db.begin_write().map_err(|e| self.err(e))?;
            for t in later {
                w.open_table(t).map_err(|e| self.err(e))?;
            }
            w.commit().map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// The catalog file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> CatalogError {
        CatalogError::Db {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(META).map_err(|e| self.err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// The catalog's own record.
    pub fn info(&self) -> Result<CatalogInfo> {
        let b = self
            .get_meta(META_CATALOG)?
            .ok_or_else(|| self.err("the meta/catalog record is missing"))?;
        record::decode_catalog(&b)
    }

    /// The bootstrap record, once the first admin token was issued.
    pub fn bootstrap(&self) -> Result<Option<Bootstrap>> {
        self.get_meta(META_BOOTSTRAP)?
            .map(|b| record::decode_bootstrap(&b))
            .transpose()
    }

    /// One admin token.
    pub fn token(&self, id: &str) -> Result<Option<AdminToken>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ADMIN_TOKENS).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        v.map(|v| record::decode_admin_token(id, v.value()))
            .transpose()
    }

    /// Admin tokens with ids after `after`, at most `limit` (capped at [`MAX_PAGE`]).
    pub fn tokens_page(&self, after: Option<&str>, limit: usize) -> Result<Page<AdminToken>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ADMIN_TOKENS).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, record::decode_admin_token, |x| &x.id)
    }

    /// Every active admin token (at most [`MAX_ACTIVE_ADMIN_TOKENS`]).
    pub fn active_tokens(&self) -> Result<Vec<AdminToken>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ADMIN_TOKENS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let tok = record::decode_admin_token(k.value(), v.value())?;
            if tok.is_active() {
                out.push(tok);
            }
        }
        Ok(out)
    }

    /// Adds a new admin token; with `bootstrap`, also records it as the first one (once).
    pub fn insert_token(&self, tok: &AdminToken, bootstrap: bool) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = w.open_table(ADMIN_TOKENS).map_err(|e| self.err(e))?;
            if t.len().map_err(|e| self.err(e))? >= MAX_ADMIN_TOKENS {
                return Err(CatalogError::TooManyTokens {
                    limit: MAX_ADMIN_TOKENS,
                    what: "records (active and revoked)",
                });
            }
            let mut active = 0usize;
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                active +=
                    usize::from(record::decode_admin_token(k.value(), v.value())?.is_active());
            }
            if active >= MAX_ACTIVE_ADMIN_TOKENS {
                return Err(CatalogError::TooManyTokens {
                    limit: MAX_ACTIVE_ADMIN_TOKENS as u64,
                    what: "active",
                });
            }
            if t.get(tok.id.as_str()).map_err(|e| self.err(e))?.is_some() {
                return Err(self.err(format!("admin token id `{}` exists", tok.id)));
            }
            t.insert(tok.id.as_str(), &record::encode_admin_token(tok)[..])
                .map_err(|e| self.err(e))?;
            if bootstrap {
                let mut m = w.open_table(META).map_err(|e| self.err(e))?;
                if m.get(META_BOOTSTRAP).map_err(|e| self.err(e))?.is_some() {
                    return Err(self.err("the first admin token was already issued"));
                }
                let b = Bootstrap {
                    token_id: tok.id.clone(),
                    issued_ms: tok.created_ms,
                };
                m.insert(META_BOOTSTRAP, &record::encode_bootstrap(&b)[..])
                    .map_err(|e| self.err(e))?;
            }
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// Revokes token `id` at `now_ms` and returns it. Revoking a revoked token returns it
    /// unchanged; the last active token cannot be revoked.
    pub fn revoke_token(&self, id: &str, now_ms: u64) -> Result<AdminToken> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let tok = {
            let mut t = w.open_table(ADMIN_TOKENS).map_err(|e| self.err(e))?;
            let mut tok = match t.get(id).map_err(|e| self.err(e))? {
                Some(v) => record::decode_admin_token(id, v.value())?,
                None => return Err(CatalogError::TokenNotFound(id.to_string())),
            };
            if !tok.is_active() {
                return Ok(tok);
            }
            let mut others = 0usize;
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                if k.value() != id && record::decode_admin_token(k.value(), v.value())?.is_active()
                {
                    others += 1;
                }
            }
            if others == 0 {
                return Err(CatalogError::LastActiveToken(id.to_string()));
            }
            tok.revoked_ms = Some(now_ms);
            t.insert(id, &record::encode_admin_token(&tok)[..])
                .map_err(|e| self.err(e))?;
            tok
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(tok)
    }

    /// One vault.
    pub fn vault(&self, name: &str) -> Result<Option<VaultEntry>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(VAULTS).map_err(|e| self.err(e))?;
        let v = t.get(name).map_err(|e| self.err(e))?;
        v.map(|v| record::decode_vault(name, v.value())).transpose()
    }

    /// Vaults named after `after`, at most `limit` (capped at [`MAX_PAGE`]).
    pub fn vaults_page(&self, after: Option<&str>, limit: usize) -> Result<Page<VaultEntry>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(VAULTS).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, record::decode_vault, |x| &x.name)
    }

    /// Registers a vault (create-only).
    pub fn insert_vault(&self, v: &VaultEntry) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = w.open_table(VAULTS).map_err(|e| self.err(e))?;
            if t.get(v.name.as_str()).map_err(|e| self.err(e))?.is_some() {
                return Err(CatalogError::VaultExists(v.name.clone()));
            }
            t.insert(v.name.as_str(), &record::encode_vault(v)[..])
                .map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// One policy.
    pub fn policy(&self, name: &str) -> Result<Option<Policy>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(POLICIES).map_err(|e| self.err(e))?;
        let v = t.get(name).map_err(|e| self.err(e))?;
        v.map(|v| record::decode_policy(name, v.value()))
            .transpose()
    }

    /// Policies named after `after`, at most `limit` (capped at [`MAX_PAGE`]).
    pub fn policies_page(&self, after: Option<&str>, limit: usize) -> Result<Page<Policy>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(POLICIES).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, record::decode_policy, |x| &x.name)
    }

    /// The last revision handed out (0 before the first).
    pub fn last_revision(&self) -> Result<u64> {
        self.get_meta(META_REVISION)?
            .map_or(Ok(0), |b| record::decode_revision(&b))
    }

    /// Takes the next revision in write transaction `w`.
    fn next_revision(&self, w: &WriteTransaction) -> Result<u64> {
        let mut m = w.open_table(META).map_err(|e| self.err(e))?;
        let last = match m.get(META_REVISION).map_err(|e| self.err(e))? {
            Some(v) => record::decode_revision(v.value())?,
            None => 0,
        };
        let next = last
            .checked_add(1)
            .ok_or_else(|| self.err("the revision counter is exhausted"))?;
        m.insert(META_REVISION, &record::encode_revision(next)[..])
            .map_err(|e| self.err(e))?;
        Ok(next)
    }

    /// Creates policy `name` with `settings` at `now_ms` (revision: the next one). Refuses
    /// an invalid name or settings, an existing name and more than [`MAX_POLICIES`].
    pub fn create_policy(
        &self,
        name: &str,
        settings: &PolicySettings,
        now_ms: u64,
    ) -> Result<Policy> {
        policy::check_name(name)?;
        settings.validate()?;
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let p = {
            let mut t = w.open_table(POLICIES).map_err(|e| self.err(e))?;
            if t.get(name).map_err(|e| self.err(e))?.is_some() {
                return Err(CatalogError::PolicyExists(name.to_string()));
            }
            if t.len().map_err(|e| self.err(e))? >= MAX_POLICIES {
                return Err(CatalogError::TooManyPolicies);
            }
            let p = Policy {
                name: name.to_string(),
                settings: settings.clone(),
                revision: self.next_revision(&w)?,
                created_ms: now_ms,
                updated_ms: now_ms,
            };
            t.insert(name, &record::encode_policy(&p)[..])
                .map_err(|e| self.err(e))?;
            p
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(p)
    }

    /// Creates the default policy (default settings) unless a policy of that name exists;
    /// returns it when created. `ferryd up` calls it at every start: it creates the policy
    /// on the first one (or the first after an upgrade from a catalog without policies) and
    /// never touches an existing one, edited or not. Since the default policy cannot be
    /// deleted, it is never re-created either.
    pub fn ensure_default_policy(&self, now_ms: u64) -> Result<Option<Policy>> {
        match self.create_policy(DEFAULT_POLICY, &PolicySettings::default(), now_ms) {
            Ok(p) => Ok(Some(p)),
            Err(CatalogError::PolicyExists(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads policy `name` in `w` and checks `expect` against its revision: `None` expects
    /// nothing; `Some(list)` needs the revision to be in the list (an empty list never
    /// matches).
    fn policy_for_write(
        &self,
        w: &WriteTransaction,
        name: &str,
        expect: Option<&[u64]>,
    ) -> Result<Policy> {
        let t = w.open_table(POLICIES).map_err(|e| self.err(e))?;
        let cur = match t.get(name).map_err(|e| self.err(e))? {
            Some(v) => record::decode_policy(name, v.value())?,
            None => return Err(CatalogError::PolicyNotFound(name.to_string())),
        };
        if let Some(list) = expect
            && !list.contains(&cur.revision)
        {
            return Err(CatalogError::RevisionMismatch {
                name: name.to_string(),
                current: cur.revision,
            });
        }
        Ok(cur)
    }

    /// Applies `patch` to policy `name` at `now_ms`, if its revision is one of `expect`
    /// (when given), and returns the result. The merged settings are validated as a whole;
    /// a refused patch changes nothing. A patch that changes nothing writes nothing and
    /// returns the policy as it is (same revision).
    pub fn update_policy(
        &self,
        name: &str,
        expect: Option<&[u64]>,
        patch: &PolicyPatch,
        now_ms: u64,
    ) -> Result<Policy> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let cur = self.policy_for_write(&w, name, expect)?;
        let settings = patch.apply(&cur.settings)?;
        if settings == cur.settings {
            return Ok(cur);
        }
        let p = Policy {
            settings,
            revision: self.next_revision(&w)?,
            updated_ms: now_ms,
            ..cur
        };
        {
            let mut t = w.open_table(POLICIES).map_err(|e| self.err(e))?;
            t.insert(name, &record::encode_policy(&p)[..])
                .map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(p)
    }

    /// Deletes policy `name`, if its revision is one of `expect` (when given), and returns
    /// what it was. The default policy and a policy in use are
    /// refused (see `policy_users_in`).
    pub fn delete_policy(&self, name: &str, expect: Option<&[u64]>) -> Result<Policy> {
        if name == DEFAULT_POLICY {
            return Err(CatalogError::DefaultPolicy(name.to_string()));
        }
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let cur = self.policy_for_write(&w, name, expect)?;
        let users = self.policy_users_in(&w, name)?;
        if users > 0 {
            return Err(CatalogError::PolicyInUse {
                name: name.to_string(),
                users,
            });
        }
        {
            let mut t = w.open_table(POLICIES).map_err(|e| self.err(e))?;
            t.remove(name).map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(cur)
    }

    /// How many protected items use policy `name`, counted in the write transaction of the
    /// delete, so that no item can be given the policy while it is being deleted.
    fn policy_users_in(&self, w: &WriteTransaction, name: &str) -> Result<u64> {
        let t = w.open_table(items::ITEMS).map_err(|e| self.err(e))?;
        let mut users = 0;
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            if items::decode_item(k.value(), v.value())?.policy == name {
                users += 1;
            }
        }
        Ok(users)
    }

    fn page<T>(
        &self,
        t: &impl ReadableTable<&'static str, &'static [u8]>,
        after: Option<&str>,
        limit: usize,
        decode: fn(&str, &[u8]) -> Result<T>,
        key_of: fn(&T) -> &String,
    ) -> Result<Page<T>> {
        let limit = limit.clamp(1, MAX_PAGE);
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut more = false;
        for item in t
            .range::<&str>((lower, Bound::Unbounded))
            .map_err(|e| self.err(e))?
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(decode(k.value(), v.value())?);
        }
        let next_after = if more {
            items.last().map(|x| key_of(x).clone())
        } else {
            None
        };
        Ok(Page { items, next_after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/catalog-v1");

    /// The values the version-1 fixtures hold.
    fn v1_token() -> AdminToken {
        AdminToken {
            id: "20261126T101112.123Z-0a1b2c3d".into(),
            name: "bootstrap".into(),
            sha256: [0xab; 32],
            created_ms: 1_795_687_872_123,
            revoked_ms: None,
        }
    }
    fn v1_revoked_token() -> AdminToken {
        AdminToken {
            id: "20261126T101500.000Z-deadbeef".into(),
            name: "ci-runner".into(),
            sha256: [0x01; 32],
            created_ms: 1_795_688_100_000,
            revoked_ms: Some(1_795_688_200_000),
        }
    }
    fn v1_vault() -> VaultEntry {
        VaultEntry {
            name: "default".into(),
            url: "/var/lib/ferry/vault".into(),
            created_ms: 1_795_687_872_000,
        }
    }
    fn v1_bootstrap() -> Bootstrap {
        Bootstrap {
            token_id: v1_token().id,
            issued_ms: v1_token().created_ms,
        }
    }
    fn v1_info() -> CatalogInfo {
        CatalogInfo {
            format: 1,
            created_ms: 1_795_687_871_000,
        }
    }
    /// The default policy as version 1 wrote it (1 MiB chunks, zstd 3 were the defaults then;
    /// a record keeps the values it was written with).
    fn v1_default_policy() -> Policy {
        Policy {
            name: "default".into(),
            settings: PolicySettings {
                chunk_size: 1 << 20,
                compression_level: 3,
                ..PolicySettings::default()
            },
            revision: 1,
            created_ms: 1_795_687_872_000,
            updated_ms: 1_795_687_872_000,
        }
    }
    fn v1_policy() -> Policy {
        Policy {
            name: "gold".into(),
            settings: PolicySettings {
                description: Some("Tier 1: web and databases\nreplicated every minute".into()),
                rpo_threshold_minutes: 5,
                cycle_interval_seconds: 60,
                retention: policy::Retention {
                    keep_all_hours: 48,
                    hourly_days: 7,
                    every_hours: 6,
                    for_days: 30,
                },
                app_consistent_frequency_minutes: 30,
                chunk_size: 256 << 10,
                compression_level: 6,
                retry_schedule_seconds: vec![30, 60, 120, 300],
                resync_threshold_percent: 40,
                resync_window: None,
            },
            revision: 3,
            created_ms: 1_795_688_300_000,
            updated_ms: 1_795_688_400_000,
        }
    }

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(FIXTURES).join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Writes the version-1 fixtures that are missing, by hand
    /// (`cargo test -p ferry-daemon -- --ignored write_v1_fixtures`). A file already there is
    /// frozen and never rewritten. Version 1 gained the `policies` table and the
    /// `meta`/`revision` record after its first fixtures were written, so their fixtures were
    /// added later by this writer: `catalog.redb` is a catalog from before policies (kept:
    /// it is what an upgraded appliance opens), `catalog-policies.redb` one with them. A
    /// version 2 adds its own directory and writer.
    #[test]
    #[ignore = "writes the committed fixtures"]
    fn write_v1_fixtures() {
        let dir = Path::new(FIXTURES);
        std::fs::create_dir_all(dir).unwrap();
        let w = |n: &str, b: Vec<u8>| {
            let p = dir.join(n);
            if !p.exists() {
                std::fs::write(p, b).unwrap();
            }
        };
        w("meta-catalog.json", record::encode_catalog(&v1_info()));
        w(
            "meta-bootstrap.json",
            record::encode_bootstrap(&v1_bootstrap()),
        );
        w("admin-token.json", record::encode_admin_token(&v1_token()));
        w(
            "admin-token-revoked.json",
            record::encode_admin_token(&v1_revoked_token()),
        );
        w("vault.json", record::encode_vault(&v1_vault()));
        w("meta-revision.json", record::encode_revision(3));
        w(
            "policy-default.json",
            record::encode_policy(&v1_default_policy()),
        );
        w("policy.json", record::encode_policy(&v1_policy()));
        let whole = |name: &str, policies: bool| {
            let p = dir.join(name);
            if p.exists() {
                return;
            }
            let (c, _) = Catalog::open(&p).unwrap();
            c.insert_token(&v1_token(), true).unwrap();
            c.insert_token(&v1_revoked_token(), false).unwrap();
            c.revoke_token(&v1_revoked_token().id, 1_795_688_200_000)
                .unwrap();
            c.insert_vault(&v1_vault()).unwrap();
            if policies {
                let d = v1_default_policy();
                c.ensure_default_policy(d.created_ms).unwrap();
                let g = v1_policy();
                let mut first = g.settings.clone();
                first.compression_level = 3;
                c.create_policy(&g.name, &first, g.created_ms).unwrap();
                let patch = PolicyPatch {
                    compression_level: Some(6),
                    ..Default::default()
                };
                c.update_policy(&g.name, Some(&[2]), &patch, g.updated_ms)
                    .unwrap();
            }
        };
        whole("catalog.redb", false);
        whole("catalog-policies.redb", true);
    }

    #[test]
    fn v1_records_decode() {
        assert_eq!(
            record::decode_catalog(&fixture("meta-catalog.json")).unwrap(),
            v1_info()
        );
        assert_eq!(
            record::decode_bootstrap(&fixture("meta-bootstrap.json")).unwrap(),
            v1_bootstrap()
        );
        let t = v1_token();
        assert_eq!(
            record::decode_admin_token(&t.id, &fixture("admin-token.json")).unwrap(),
            t
        );
        let r = v1_revoked_token();
        assert_eq!(
            record::decode_admin_token(&r.id, &fixture("admin-token-revoked.json")).unwrap(),
            r
        );
        assert_eq!(
            record::decode_vault("default", &fixture("vault.json")).unwrap(),
            v1_vault()
        );
        assert_eq!(
            record::decode_revision(&fixture("meta-revision.json")).unwrap(),
            3
        );
        assert_eq!(
            record::decode_policy("default", &fixture("policy-default.json")).unwrap(),
            v1_default_policy()
        );
        assert_eq!(
            record::decode_policy("gold", &fixture("policy.json")).unwrap(),
            v1_policy()
        );
    }

    /// While version 1 is current, encoding must reproduce the fixtures byte for byte: a
    /// change of encoding without a new version fails here. When version 2 arrives this test
    /// moves to the v2 fixtures and `v1_records_decode` stays.
    #[test]
    fn current_encoding_is_v1() {
        assert_eq!(RECORD_VERSION, 1);
        assert_eq!(
            record::encode_admin_token(&v1_token()),
            fixture("admin-token.json")
        );
        assert_eq!(record::encode_vault(&v1_vault()), fixture("vault.json"));
        assert_eq!(
            record::encode_catalog(&v1_info()),
            fixture("meta-catalog.json")
        );
        assert_eq!(record::encode_revision(3), fixture("meta-revision.json"));
        assert_eq!(
            record::encode_policy(&v1_default_policy()),
            fixture("policy-default.json")
        );
        assert_eq!(record::encode_policy(&v1_policy()), fixture("policy.json"));
    }

    /// A policy with a resync window (a member added later in version 1) round-trips, its
    /// member last; one without is written as before (above); a record whose window breaks a
    /// rule, or holds an unknown member, is refused naming the table, key and field.
    #[test]
    fn policy_resync_window_round_trips() {
        let mut p = v1_policy();
        p.settings.resync_window =
            Some(policy::ResyncWindow::parse("22:00", "6:00", None).unwrap());
        let b = record::encode_policy(&p);
        let text = String::from_utf8(b.clone()).unwrap();
        assert!(
            text.ends_with(
                r#""updated_ms":1795688400000,"resync_window":{"from":"22:00","to":"06:00"}}"#
            ),
            "{text}"
        );
        assert_eq!(record::decode_policy("gold", &b).unwrap(), p);
        // The fixture's bytes, the member appended: what this build writes.
        let old = String::from_utf8(fixture("policy.json")).unwrap();
        let appended = format!(
            "{},\"resync_window\":{{\"from\":\"22:00\",\"to\":\"06:00\"}}}}",
            old.strip_suffix('}').unwrap()
        );
        assert_eq!(text, appended);

        let days: Vec<String> = ["sat", "sun"].map(String::from).to_vec();
        p.settings.resync_window =
            Some(policy::ResyncWindow::parse("01:00", "05:30", Some(&days)).unwrap());
        let b = record::encode_policy(&p);
        assert!(
            String::from_utf8_lossy(&b).ends_with(
                r#""resync_window":{"from":"01:00","to":"05:30","days":["sat","sun"]}}"#
            ),
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(record::decode_policy("gold", &b).unwrap(), p);

        for (from, to) in [
            (r#""days":["sat","sun"]"#, r#""days":["sat","noday"]"#),
            (r#""from":"01:00""#, r#""from":"01:00","extra":1"#),
            (r#""to":"05:30""#, r#""to":"01:00""#),
        ] {
            let broken = String::from_utf8(b.clone()).unwrap().replace(from, to);
            let e = record::decode_policy("gold", broken.as_bytes()).unwrap_err();
            let m = e.to_string();
            assert!(m.contains("policies/gold"), "{m}");
            assert!(m.contains("resync_window") || m.contains("extra"), "{m}");
        }
    }

    /// A whole catalog written by version 1 opens and reads back (table names, key and value
    /// types, meta records).
    #[test]
    fn v1_catalog_file_opens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.redb");
        std::fs::copy(Path::new(FIXTURES).join("catalog.redb"), &p).unwrap();
        let (c, created) = Catalog::open(&p).unwrap();
        assert!(!created);
        assert_eq!(c.info().unwrap().format, 1);
        assert_eq!(c.bootstrap().unwrap(), Some(v1_bootstrap()));
        assert_eq!(c.token(&v1_token().id).unwrap(), Some(v1_token()));
        assert_eq!(c.active_tokens().unwrap(), vec![v1_token()]);
        let page = c.tokens_page(None, 10).unwrap();
        assert_eq!(page.items, vec![v1_token(), v1_revoked_token()]);
        assert_eq!(c.vault("default").unwrap(), Some(v1_vault()));
        // Written before policies existed: the table is added, empty, and the default
        // policy is created by the first start that opens it.
        assert_eq!(c.policies_page(None, 10).unwrap().items, vec![]);
        assert_eq!(c.last_revision().unwrap(), 0);
        let d = c.ensure_default_policy(7).unwrap().unwrap();
        assert_eq!((d.name.as_str(), d.revision), ("default", 1));
        assert_eq!(c.ensure_default_policy(8).unwrap(), None);
    }

    /// A whole version-1 catalog with policies: the `policies` table, its records and the
    /// revision counter read back, and the counter goes on from where it was.
    #[test]
    fn v1_catalog_with_policies_opens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.redb");
        std::fs::copy(Path::new(FIXTURES).join("catalog-policies.redb"), &p).unwrap();
        let (c, created) = Catalog::open(&p).unwrap();
        assert!(!created);
        assert_eq!(c.vault("default").unwrap(), Some(v1_vault()));
        assert_eq!(c.active_tokens().unwrap(), vec![v1_token()]);
        assert_eq!(
            c.policies_page(None, 10).unwrap().items,
            vec![v1_default_policy(), v1_policy()]
        );
        assert_eq!(c.last_revision().unwrap(), 3);
        assert_eq!(c.ensure_default_policy(9).unwrap(), None);
        let patch = PolicyPatch {
            resync_threshold_percent: Some(45),
            ..Default::default()
        };
        assert_eq!(
            c.update_policy("gold", Some(&[3]), &patch, 10)
                .unwrap()
                .revision,
            4
        );
    }

    #[test]
    fn newer_records_and_formats_are_refused() {
        let e = record::decode_vault("x", br#"{"v":2,"name":"x"}"#).unwrap_err();
        assert!(
            matches!(e, CatalogError::NewerRecord { found: 2, .. }),
            "{e}"
        );
        let e = record::decode_vault(
            "x",
            br#"{"v":1,"name":"x","url":"u","created_ms":1,"extra":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = record::decode_vault("y", &fixture("vault.json")).unwrap_err();
        assert!(e.to_string().contains("holds name"), "{e}");
        assert!(record::decode_vault("x", b"not json").is_err());
        assert!(record::decode_vault("x", &vec![b' '; MAX_RECORD_BYTES + 1]).is_err());

        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.redb");
        {
            let (c, created) = Catalog::open(&p).unwrap();
            assert!(created);
            let w = c.db.begin_write().unwrap();
            {
                let mut m = w.open_table(META).unwrap();
                m.insert(
                    META_CATALOG,
                    &br#"{"v":9,"format":2,"created_ms":1,"new":true}"#[..],
                )
                .unwrap();
            }
            w.commit().unwrap();
        }
        let e = Catalog::open(&p).unwrap_err();
        assert!(
            matches!(e, CatalogError::NewerFormat { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn tokens_lifecycle_pages_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.redb");
        let (c, _) = Catalog::open(&p).unwrap();
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        }
        // A second opener is refused while the first holds it.
        assert!(matches!(Catalog::open(&p), Err(CatalogError::InUse { .. })));
        let mk = |i: u64| AdminToken {
            id: format!("t{i:03}"),
            name: format!("n{i}"),
            sha256: [i.to_le_bytes()[0]; 32],
            created_ms: i,
            revoked_ms: None,
        };
        c.insert_token(&mk(0), true).unwrap();
        assert!(c.insert_token(&mk(0), false).is_err());
        assert!(c.insert_token(&mk(1), true).is_err(), "bootstrap is once");
        for i in 1..5 {
            c.insert_token(&mk(i), false).unwrap();
        }
        let p1 = c.tokens_page(None, 2).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.next_after.as_deref(), Some("t001"));
        let p2 = c.tokens_page(p1.next_after.as_deref(), 2).unwrap();
        assert_eq!(p2.items[0].id, "t002");
        let p3 = c.tokens_page(p2.next_after.as_deref(), 2).unwrap();
        assert_eq!(p3.items.len(), 1);
        assert_eq!(p3.next_after, None);

        let r = c.revoke_token("t002", 99).unwrap();
        assert_eq!(r.revoked_ms, Some(99));
        assert_eq!(c.revoke_token("t002", 100).unwrap().revoked_ms, Some(99));
        assert!(matches!(
            c.revoke_token("nope", 1),
            Err(CatalogError::TokenNotFound(_))
        ));
        for id in ["t000", "t001", "t003"] {
            c.revoke_token(id, 1).unwrap();
        }
        assert!(matches!(
            c.revoke_token("t004", 1),
            Err(CatalogError::LastActiveToken(_))
        ));
        assert_eq!(c.active_tokens().unwrap(), vec![mk(4)]);

        for i in 5..(4 + MAX_ACTIVE_ADMIN_TOKENS as u64) {
            c.insert_token(&mk(i), false).unwrap();
        }
        assert!(matches!(
            c.insert_token(&mk(999), false),
            Err(CatalogError::TooManyTokens { .. })
        ));
        drop(c);
        // Durable across reopen.
        let (c, created) = Catalog::open(&p).unwrap();
        assert!(!created);
        assert_eq!(c.active_tokens().unwrap().len(), MAX_ACTIVE_ADMIN_TOKENS);
        assert_eq!(c.bootstrap().unwrap().unwrap().token_id, "t000");
    }

    #[test]
    fn vaults_are_create_only() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&d.path().join("c.redb")).unwrap();
        let v = v1_vault();
        c.insert_vault(&v).unwrap();
        assert!(matches!(
            c.insert_vault(&v),
            Err(CatalogError::VaultExists(_))
        ));
        assert_eq!(c.vaults_page(None, 10).unwrap().items, vec![v]);
        assert_eq!(c.vault("other").unwrap(), None);
    }

    #[test]
    fn bad_policy_records_are_refused() {
        let good = String::from_utf8(fixture("policy.json")).unwrap();
        // Each a valid record but for one thing.
        for (bad, needle) in [
            (
                good.replace(
                    r#""rpo_threshold_minutes":5"#,
                    r#""rpo_threshold_minutes":0"#,
                ),
                "rpo_threshold_minutes",
            ),
            (
                good.replace(r#""chunk_size":262144"#, r#""chunk_size":262145"#),
                "chunk_size",
            ),
            (
                good.replace(r#""revision":3"#, r#""revision":0"#),
                "revision 0",
            ),
            (
                good.replace(r#""for_days":30"#, r#""for_days":30,"x":1"#),
                "unknown field",
            ),
            (
                good.replace(r#""resync_threshold_percent":40,"#, ""),
                "missing field",
            ),
            (
                good.replace(r#""for_days":30"#, r#""for_days":-30"#),
                "invalid value",
            ),
        ] {
            assert_ne!(bad, good, "{needle}");
            let e = record::decode_policy("gold", bad.as_bytes()).unwrap_err();
            assert!(matches!(e, CatalogError::BadRecord { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
        let e = record::decode_policy("silver", good.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("holds name"), "{e}");
        let e = record::decode_policy(
            "gold",
            &good.replacen(r#""v":1"#, r#""v":2"#, 1).into_bytes(),
        )
        .unwrap_err();
        assert!(
            matches!(e, CatalogError::NewerRecord { found: 2, .. }),
            "{e}"
        );
    }

    #[test]
    fn policies_lifecycle() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.redb");
        let (c, _) = Catalog::open(&path).unwrap();
        assert_eq!(c.last_revision().unwrap(), 0);
        let def = c.ensure_default_policy(100).unwrap().unwrap();
        assert_eq!(def.revision, 1);
        assert_eq!((def.created_ms, def.updated_ms), (100, 100));
        assert_eq!(c.ensure_default_policy(101).unwrap(), None);

        // Create: validated, unique.
        let gold = v1_policy().settings;
        let p = c.create_policy("gold", &gold, 200).unwrap();
        assert_eq!((p.revision, p.created_ms, p.updated_ms), (2, 200, 200));
        assert!(matches!(
            c.create_policy("gold", &gold, 201),
            Err(CatalogError::PolicyExists(_))
        ));
        assert!(matches!(
            c.create_policy("Gold", &gold, 201),
            Err(CatalogError::InvalidPolicy(PolicyError::Name { .. }))
        ));
        let mut bad = gold.clone();
        bad.compression_level = 20;
        assert!(matches!(
            c.create_policy("bronze", &bad, 201),
            Err(CatalogError::InvalidPolicy(PolicyError::OutOfRange {
                field: "compression_level",
                ..
            }))
        ));
        assert_eq!(c.policy("bronze").unwrap(), None);
        assert_eq!(c.last_revision().unwrap(), 2, "refusals take no revision");

        // Update: If-Match, merge, validation as a whole, no-op.
        let patch = PolicyPatch {
            rpo_threshold_minutes: Some(10),
            ..Default::default()
        };
        let e = c
            .update_policy("gold", Some(&[1]), &patch, 300)
            .unwrap_err();
        assert!(
            matches!(&e, CatalogError::RevisionMismatch { current: 2, .. }),
            "{e}"
        );
        assert!(matches!(
            c.update_policy("gold", Some(&[]), &patch, 300),
            Err(CatalogError::RevisionMismatch { .. })
        ));
        let u = c.update_policy("gold", Some(&[5, 2]), &patch, 300).unwrap();
        assert_eq!((u.revision, u.created_ms, u.updated_ms), (3, 200, 300));
        assert_eq!(u.settings.rpo_threshold_minutes, 10);
        assert_eq!(u.settings.retention, gold.retention);
        let same = c.update_policy("gold", None, &patch, 400).unwrap();
        assert_eq!(same, u, "a patch that changes nothing writes nothing");
        let breaks = PolicyPatch {
            cycle_interval_seconds: Some(601),
            ..Default::default()
        };
        assert!(matches!(
            c.update_policy("gold", None, &breaks, 500),
            Err(CatalogError::InvalidPolicy(
                PolicyError::CycleExceedsRpo { .. }
            ))
        ));
        assert_eq!(c.policy("gold").unwrap(), Some(u.clone()));
        assert!(matches!(
            c.update_policy("nope", None, &patch, 1),
            Err(CatalogError::PolicyNotFound(_))
        ));

        // Pages, by name.
        for n in ["a", "b", "c"] {
            c.create_policy(n, &PolicySettings::default(), 600).unwrap();
        }
        let p1 = c.policies_page(None, 3).unwrap();
        let names: Vec<_> = p1.items.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let p2 = c.policies_page(p1.next_after.as_deref(), 3).unwrap();
        let names: Vec<_> = p2.items.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["default", "gold"]);
        assert_eq!(p2.next_after, None);

        // Delete: not the default, If-Match, then gone; a re-created one has a newer
        // revision than any it had.
        assert!(matches!(
            c.delete_policy("default", None),
            Err(CatalogError::DefaultPolicy(_))
        ));
        assert!(matches!(
            c.delete_policy("gold", Some(&[2])),
            Err(CatalogError::RevisionMismatch { current: 3, .. })
        ));
        assert_eq!(c.delete_policy("gold", Some(&[3])).unwrap(), u);
        assert_eq!(c.policy("gold").unwrap(), None);
        assert!(matches!(
            c.delete_policy("gold", None),
            Err(CatalogError::PolicyNotFound(_))
        ));
        let again = c.create_policy("gold", &gold, 700).unwrap();
        assert_eq!(again.revision, 7);
        drop(c);
        // Durable across reopen.
        let (c, _) = Catalog::open(&path).unwrap();
        assert_eq!(c.policy("gold").unwrap(), Some(again));
        assert_eq!(c.policy("default").unwrap(), Some(def));
        assert_eq!(c.last_revision().unwrap(), 7);
    }

    #[test]
    fn policies_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&d.path().join("c.redb")).unwrap();
        // Fill up in one transaction (one commit, not a thousand).
        let w = c.db.begin_write().unwrap();
        {
            let mut t = w.open_table(POLICIES).unwrap();
            for i in 0..MAX_POLICIES {
                let p = Policy {
                    name: format!("p{i:04}"),
                    settings: PolicySettings::default(),
                    revision: i + 1,
                    created_ms: 1,
                    updated_ms: 1,
                };
                t.insert(p.name.as_str(), &record::encode_policy(&p)[..])
                    .unwrap();
            }
        }
        w.commit().unwrap();
        assert!(matches!(
            c.create_policy("one-more", &PolicySettings::default(), 2),
            Err(CatalogError::TooManyPolicies)
        ));
        c.delete_policy("p0000", None).unwrap();
        c.create_policy("one-more", &PolicySettings::default(), 2)
            .unwrap();
    }
}
