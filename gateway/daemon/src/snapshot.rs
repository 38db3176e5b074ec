//! Encrypted catalog snapshots in the vault, and rebuilding an appliance from one.
//!
//! The appliance is lost with its site; the bucket is what survives. So the appliance keeps
//! a copy of its catalog in its vault: a sealed object (`appliance/<time>-<hex>`, the vault's
//! own encryption, `docs/vault-format.md` §5.4) holding the JSON document below. A writer
//! task looks every [`SNAPSHOT_EVERY`] and writes a new snapshot when the catalog changed
//! since the last one (so a burst of changes becomes one snapshot), keeps the newest
//! [`KEEP`], and writes a last one at shutdown. `ferryd restore-appliance` reads the newest
//! with the vault key and builds a new data directory from it.
//!
//! The document (`docs/catalog-format.md` §5):
//!
//! ```text
//! {"v":1, "written_ms":…, "catalog_format":1, "vault":"<name>",
//!  "ca":{"cert_pem":…,"key_pem":…} | null,
//!  "records":{"<table>":{"<key>":"<the record's stored JSON, as a string>"}}}
//! ```
//!
//! The CA travels with the catalog so that the restored appliance is the one every client
//! and agent pinned; it is protected by the vault key like the data it guards.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_store::Vault;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::appliance::Layout;
use crate::auth;
use crate::catalog::{AdminToken, Catalog, Records};
use crate::config::Config;
use crate::error::{DaemonError, Result};
use crate::fsutil;
use crate::tls::{self, CaPem};

/// Version of the snapshot document written by this build.
pub const SNAPSHOT_VERSION: u8 = 1;
/// How often the writer looks for changes.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
/// Snapshots kept in the vault.
pub const KEEP: usize = 5;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaV1 {
    cert_pem: String,
    key_pem: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotV1 {
    v: u8,
    written_ms: u64,
    catalog_format: u32,
    vault: String,
    ca: Option<CaV1>,
    records: Records,
}

/// A decoded snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// When it was written.
    pub written_ms: u64,
    /// The vault it was written to (its name in the catalog).
    pub vault: String,
    /// The appliance's CA, when it made its own.
    pub ca: Option<CaPem>,
    /// The catalog's records.
    pub records: Records,
}

/// A snapshot document read from the catalog, not yet serialised: the writer serialises it
/// only when its digest says something changed.
pub struct Built {
    doc: SnapshotV1,
    /// SHA-256 of the document without its time: equal digests, same content.
    pub digest: [u8; 32],
}

impl std::fmt::Debug for Built {
    // The document holds the CA's private key: only the digest is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("digest", &hex::encode(self.digest))
            .finish_non_exhaustive()
    }
}

impl Built {
    /// The document as written to the vault, stamped `written_ms`.
    pub fn into_body(mut self, written_ms: u64) -> Vec<u8> {
        self.doc.written_ms = written_ms;
        serde_json::to_vec(&self.doc).expect("serialises")
    }
}

/// The catalog's content and the CA, as the snapshot document.
pub fn build(catalog: &Catalog, data_dir: &Path, vault: &str) -> Result<Built> {
    let records = catalog.export_records()?;
    let ca = tls::read_ca(data_dir)?;
    let doc = SnapshotV1 {
        v: SNAPSHOT_VERSION,
        written_ms: 0,
        catalog_format: crate::catalog::FORMAT_VERSION,
        vault: vault.to_string(),
        ca: ca.map(|c| CaV1 {
            cert_pem: c.cert,
            key_pem: c.key,
        }),
        records,
    };
    let digest = Sha256::digest(serde_json::to_vec(&doc).expect("serialises")).into();
    Ok(Built { doc, digest })
}

/// Decodes a snapshot document, refusing a newer version or catalog format.
pub fn decode(name: &str, body: &[u8]) -> Result<Snapshot> {
    let bad = |reason: String| DaemonError::Snapshot {
        name: name.to_string(),
        reason,
    };
    let probe: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("not JSON: {e}")))?;
    let v = probe.get("v").and_then(serde_json::Value::as_u64);
    if v != Some(u64::from(SNAPSHOT_VERSION)) {
        return Err(bad(format!(
            "has version {}; this ferryd reads version {SNAPSHOT_VERSION}",
            v.map_or_else(|| "none".to_string(), |v| v.to_string())
        )));
    }
    let doc: SnapshotV1 = serde_json::from_value(probe).map_err(|e| bad(e.to_string()))?;
    if doc.catalog_format > crate::catalog::FORMAT_VERSION {
        return Err(bad(format!(
            "holds a catalog of format {}; this ferryd reads up to {}",
            doc.catalog_format,
            crate::catalog::FORMAT_VERSION
        )));
    }
    Ok(Snapshot {
        written_ms: doc.written_ms,
        vault: doc.vault,
        ca: doc.ca.map(|c| CaPem {
            cert: c.cert_pem,
            key: c.key_pem,
        }),
        records: doc.records,
    })
}

/// Handle of the snapshot writer.
#[derive(Debug)]
pub struct Snapshotter {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Snapshotter {
    /// Starts the writer for `catalog` into `vault` (named `vault_name` in the catalog).
    pub fn start(
        catalog: Arc<Catalog>,
        data_dir: std::path::PathBuf,
        vault_name: String,
        vault: Vault,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Snapshotter {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last: Option<[u8; 32]> = None;
            loop {
                let last_round = *stopped.borrow();
                let (c, d, n) = (catalog.clone(), data_dir.clone(), vault_name.clone());
                match tokio::task::spawn_blocking(move || build(&c, &d, &n)).await {
                    Ok(Ok(built)) if last != Some(built.digest) => {
                        let digest = built.digest;
                        let body = built.into_body(ferry_store::point::now_ms());
                        match vault.put_appliance_snapshot(&body).await {
                            Ok(name) => {
                                last = Some(digest);
                                metrics.snapshot_written(ferry_store::point::now_ms());
                                eprintln!(
                                    "ferryd: catalog snapshot written to vault `{vault_name}` ({name})"
                                );
                                if let Err(e) = vault.prune_appliance_snapshots(KEEP).await {
                                    eprintln!("ferryd: pruning old catalog snapshots: {e}");
                                }
                            }
                            Err(e) => {
                                metrics.snapshot_failed();
                                eprintln!(
                                    "ferryd: warning: writing the catalog snapshot to vault `{vault_name}`: {e} (retried in {} s)",
                                    SNAPSHOT_EVERY.as_secs()
                                );
                            }
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => eprintln!("ferryd: warning: building the catalog snapshot: {e}"),
                    Err(e) => eprintln!("ferryd: warning: building the catalog snapshot: {e}"),
                }
                if last_round {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(SNAPSHOT_EVERY) => {}
                    _ = stopped.changed() => {}
                }
            }
        });
        Snapshotter { stop, task }
    }

    /// Writes a last snapshot (if anything changed) and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// What `restore-appliance` did.
#[derive(Debug)]
pub struct Restored {
    /// The snapshot's object name and time.
    pub snapshot: (String, u64),
    /// Records restored, by table.
    pub counts: BTreeMap<String, usize>,
    /// A new admin token, written to this file (0600).
    pub admin_token_file: std::path::PathBuf,
    /// The restored CA's fingerprint, when the snapshot had one.
    pub ca_fingerprint: Option<String>,
}

/// Builds a new data directory from the newest snapshot in the configured vault: the CA
/// (with a new server certificate it signs), the catalog's records (the vault registered at
/// its configured location), and a new admin token in `<data_dir>/restored-admin-token`
/// (the old tokens keep working: their hashes are restored). Refuses a data directory that
/// already holds a catalog or TLS files, a vault without snapshot, and a snapshot of a vault
/// of another name than the configured one. Nothing is written before the snapshot is read
/// and every record checked.
pub async fn restore_appliance(cfg: &Config) -> Result<Restored> {
    let layout = Layout {
        dir: cfg.data_dir()?,
    };
    for p in [layout.catalog(), tls::TlsPaths::new(&layout.dir).dir] {
        if p.exists() {
            return Err(DaemonError::inconsistent(
                p,
                "exists: restore-appliance builds a new data directory; give an empty one",
            ));
        }
    }
    fsutil::ensure_private_dir(&layout.dir)?;
    let (name, url, vault) = crate::appliance::open_existing_vault(cfg, &layout).await?;
    let (object, body) = vault
        .latest_appliance_snapshot()
        .await
        .map_err(|source| DaemonError::Vault {
            name: name.clone(),
            source,
        })?
        .ok_or_else(|| {
            DaemonError::inconsistent(
                &layout.dir,
                format!(
                    "vault `{name}` at `{url}` holds no appliance snapshot (was it written by ferryd?)"
                ),
            )
        })?;
    let snap = decode(&object, &body)?;
    if snap.vault != name {
        return Err(DaemonError::Snapshot {
            name: object,
            reason: format!(
                "was written for vault `{}`, but the configured vault is named `{name}`: set vault.name = \"{}\"",
                snap.vault, snap.vault
            ),
        });
    }
    if snap.ca.is_none() && cfg.api.tls.cert_file.is_none() {
        return Err(DaemonError::Snapshot {
            name: object,
            reason: "the lost appliance served an operator's certificate: configure api.tls.cert_file and key_file".into(),
        });
    }
    // Check every record before writing anything where the appliance will look.
    let vault_urls = BTreeMap::from([(name.clone(), url.clone())]);
    crate::catalog::check_records(&snap.records, &vault_urls)?;
    let ca_fingerprint = match &snap.ca {
        Some(ca) => {
            tls::create_from_ca(&layout.dir, ca)?;
            tls::pem_fingerprint(&ca.cert)
        }
        None => None,
    };
    let (catalog, _) = Catalog::open(&layout.catalog())?;
    catalog.import_records(&snap.records, &vault_urls)?;
    let now = ferry_store::point::now_ms();
    let (secret, sha256) = auth::generate();
    let admin_token_file = layout.dir.join("restored-admin-token");
    fsutil::write_private_new(
        &admin_token_file,
        format!("{}\n", secret.expose()).as_bytes(),
    )?;
    catalog.insert_token(
        &AdminToken {
            id: ferry_store::point::new_point_id(now),
            name: "restore-appliance".into(),
            sha256,
            created_ms: now,
            revoked_ms: None,
        },
        false,
    )?;
    Ok(Restored {
        snapshot: (object, snap.written_ms),
        counts: snap
            .records
            .iter()
            .map(|(t, m)| (t.clone(), m.len()))
            .collect(),
        admin_token_file,
        ca_fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_round_trip_and_refuse_newer() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&dir.path().join("catalog.redb")).unwrap();
        c.ensure_default_policy(1).unwrap();
        let b = build(&c, dir.path(), "default").unwrap();
        let digest = b.digest;
        let body = b.into_body(1);
        let b2 = build(&c, dir.path(), "default").unwrap();
        let digest2 = b2.digest;
        let body2 = b2.into_body(2);
        assert_eq!(digest, digest2, "the time is not part of the digest");
        let s = decode("appliance/x", &body).unwrap();
        assert_eq!(s.vault, "default");
        assert!(s.ca.is_none());
        assert_eq!(s.records["policies"].len(), 1);
        drop(body2);
        c.create_policy("gold", &crate::policy::PolicySettings::default(), 2)
            .unwrap();
        assert_ne!(build(&c, dir.path(), "default").unwrap().digest, digest);

        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["v"] = 2.into();
        let e = decode("appliance/x", v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        v["v"] = 1.into();
        v["catalog_format"] = 9.into();
        let e = decode("appliance/x", v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("format 9"), "{e}");
        assert!(decode("appliance/x", b"{").is_err());
        // A record that does not decode is refused before anything is written.
        let mut s = decode("appliance/x", &body).unwrap();
        s.records
            .get_mut("policies")
            .unwrap()
            .insert("default".into(), "{\"v\":1}".into());
        let (fresh, _) = Catalog::open(&dir.path().join("fresh.redb")).unwrap();
        assert!(fresh.import_records(&s.records, &BTreeMap::new()).is_err());
        assert_eq!(fresh.policies_page(None, 10).unwrap().items.len(), 0);
    }
}
