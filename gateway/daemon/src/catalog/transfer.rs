//! The whole catalog as records, out and back in: what an appliance snapshot carries
//! (`crate::snapshot`).
//!
//! Records travel as the exact bytes the catalog stores (each a versioned JSON record,
//! `docs/catalog-format.md` §3), so a snapshot written by one build is read by the next like
//! its own catalog file, through the same decoders. Exported: admin tokens (hashes only),
//! vaults, policies, items, the jobs not yet ended, enrollment tokens (hashes only), agents
//! (their certificates' fingerprints: the restored appliance has the same CA, so enrolled
//! agents keep working), groups, and `meta`'s `bootstrap` and `revision`.
//! Ended jobs are history and stay behind.

use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::agents;
use super::items::{self, JOB_QUEUE, JOBS};
use super::{
    ADMIN_TOKENS, Catalog, CatalogError, META, META_BOOTSTRAP, META_REVISION, POLICIES, Result,
    VAULTS, record,
};

/// Records by table, then key: each value the record's stored bytes (UTF-8 JSON).
pub type Records = BTreeMap<String, BTreeMap<String, String>>;

const TABLES: [(&str, TableDefinition<&str, &[u8]>); 8] = [
    ("admin_tokens", ADMIN_TOKENS),
    ("vaults", VAULTS),
    ("policies", POLICIES),
    ("items", items::ITEMS),
    ("jobs", JOBS),
    ("enrollment_tokens", agents::ENROLL_TOKENS),
    ("agents", agents::AGENTS),
    ("groups", agents::GROUPS),
];

/// Checks one record of `table` by decoding it; returns whether it is exported (ended jobs
/// are not).
fn check(table: &str, key: &str, b: &[u8]) -> Result<bool> {
    match table {
        "admin_tokens" => record::decode_admin_token(key, b).map(|_| true),
        "vaults" => record::decode_vault(key, b).map(|_| true),
        "policies" => record::decode_policy(key, b).map(|_| true),
        "items" => items::decode_item(key, b).map(|_| true),
        "jobs" => items::decode_job(key, b).map(|j| !j.state.is_final()),
        "enrollment_tokens" => agents::decode_enroll_token(key, b).map(|_| true),
        "agents" => agents::decode_agent(key, b).map(|_| true),
        "groups" => agents::decode_group(key, b).map(|_| true),
        "meta" if key == META_BOOTSTRAP => record::decode_bootstrap(b).map(|_| true),
        "meta" if key == META_REVISION => record::decode_revision(b).map(|_| true),
        _ => Err(CatalogError::BadRecord {
            table: "snapshot",
            key: format!("{table}/{key}"),
            reason: "not a table or record a snapshot carries".into(),
        }),
    }
}

fn text(table: &str, key: &str, b: &[u8]) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| CatalogError::BadRecord {
        table: "snapshot",
        key: format!("{table}/{key}"),
        reason: "is not UTF-8".into(),
    })
}

/// Checks records for [`Catalog::import_records`] without writing anything: each decodes
/// under its table's rules, and each vault has a location in `vault_urls`.
pub fn check_records(records: &Records, vault_urls: &BTreeMap<String, String>) -> Result<()> {
    for (table, m) in records {
        for (key, v) in m {
            check(table, key, v.as_bytes())?;
            if table == "vaults" && !vault_urls.contains_key(key) {
                return Err(CatalogError::BadRecord {
                    table: "vaults",
                    key: key.clone(),
                    reason: "the snapshot's vault is not the vault being restored from".into(),
                });
            }
        }
    }
    Ok(())
}

impl Catalog {
    /// Every record a snapshot carries, checked, in one read transaction.
    pub fn export_records(&self) -> Result<Records> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut out = Records::new();
        for (name, def) in TABLES {
            let t = r.open_table(def).map_err(|e| self.err(e))?;
            let mut m = BTreeMap::new();
            for entry in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = entry.map_err(|e| self.err(e))?;
                if check(name, k.value(), v.value())? {
                    m.insert(k.value().to_string(), text(name, k.value(), v.value())?);
                }
            }
            out.insert(name.to_string(), m);
        }
        let t = r.open_table(META).map_err(|e| self.err(e))?;
        let mut m = BTreeMap::new();
        for key in [META_BOOTSTRAP, META_REVISION] {
            if let Some(v) = t.get(key).map_err(|e| self.err(e))? {
                check("meta", key, v.value())?;
                m.insert(key.to_string(), text("meta", key, v.value())?);
            }
        }
        out.insert("meta".into(), m);
        Ok(out)
    }

    /// Writes `records` into this catalog, which must be new (no token, vault, policy or
    /// item yet), in one transaction; every record is checked first ([`check_records`]), so a
    /// bad snapshot writes nothing. Vaults are registered at `vault_urls[name]` (where the restored
    /// appliance reaches them) instead of where the lost one did; a vault missing from
    /// `vault_urls` is refused. Queued jobs go back into the queue; jobs that were running
    /// are queued again at the next start.
    pub fn import_records(
        &self,
        records: &Records,
        vault_urls: &BTreeMap<String, String>,
    ) -> Result<()> {
        check_records(records, vault_urls)?;
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        for (name, def) in TABLES {
            let mut t = w.open_table(def).map_err(|e| self.err(e))?;
            if t.len().map_err(|e| self.err(e))? > 0 {
                return Err(self.err(format!(
                    "cannot restore into a catalog that already has {name}"
                )));
            }
            let Some(m) = records.get(name) else {
                continue;
            };
            for (key, v) in m {
                let bytes = if name == "vaults" {
                    let mut entry = record::decode_vault(key, v.as_bytes())?;
                    entry.url = vault_urls
                        .get(key)
                        .ok_or_else(|| {
                            self.err(format!(
                                "the snapshot's vault `{key}` is not the vault being restored from"
                            ))
                        })?
                        .clone();
                    record::encode_vault(&entry)
                } else {
                    v.as_bytes().to_vec()
                };
                t.insert(key.as_str(), &bytes[..])
                    .map_err(|e| self.err(e))?;
                if name == "jobs"
                    && items::decode_job(key, v.as_bytes())?.state == super::JobState::Queued
                {
                    let mut q = w.open_table(JOB_QUEUE).map_err(|e| self.err(e))?;
                    q.insert(key.as_str(), &[][..]).map_err(|e| self.err(e))?;
                }
            }
        }
        if let Some(m) = records.get("meta") {
            let mut t = w.open_table(META).map_err(|e| self.err(e))?;
            for (key, v) in m {
                t.insert(key.as_str(), v.as_bytes())
                    .map_err(|e| self.err(e))?;
            }
        }
        w.commit().map_err(|e| self.err(e))
    }
}
