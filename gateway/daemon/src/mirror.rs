//! Keeps the catalog's mirror of recovery points (`catalog::points`) in step with the vaults.
//!
//! Points are written to a vault by whatever makes them (the process role's drainers, an
//! offline `ferry vault import`) and removed by retention; the vault is the truth. One task
//! lists each vault's point objects at start and every [`PERIOD`] (or sooner when woken),
//! loads the records it does not know yet (bounded concurrency), drops the summaries whose
//! objects are gone, and writes both in one catalog transaction. A vault that cannot be
//! listed is logged and tried again next time; the mirror keeps what it had.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_store::Vault;
use ferry_store::point::POINTS_PREFIX;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::{Notify, watch};

use crate::catalog::{Catalog, MAX_POINTS, PointSummary, point_key};

/// How often the vaults are listed.
pub const PERIOD: Duration = Duration::from_secs(15);
/// Point records loaded at once.
const LOAD_CONCURRENCY: usize = 8;
/// Point records loaded per vault per pass (the rest come next pass).
const LOAD_PER_PASS: usize = 10_000;

/// What one pass did to one vault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// Summaries added.
    pub added: usize,
    /// Summaries removed.
    pub removed: usize,
    /// Points left for a later pass (load cap or the mirror's bound).
    pub deferred: usize,
}

/// Brings vault `name`'s mirror in step once.
pub async fn sync_vault(
    catalog: &Arc<Catalog>,
    name: &str,
    vault: &Vault,
) -> Result<Synced, String> {
    let objects = vault
        .point_names(None)
        .await
        .map_err(|e| format!("listing the points of vault `{name}`: {e}"))?;
    // points/<item>/<id> → <vault>/<item>/<id>
    let in_vault: BTreeMap<String, String> = objects
        .into_iter()
        .filter_map(|o| {
            let rest = o.strip_prefix(POINTS_PREFIX)?;
            let (item, id) = rest.split_once('/')?;
            Some((point_key(name, item, id), o))
        })
        .collect();
    let c = catalog.clone();
    let n = name.to_string();
    let known = tokio::task::spawn_blocking(move || c.mirrored_point_keys(&n))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let remove: Vec<String> = known
        .iter()
        .filter(|k| !in_vault.contains_key(*k))
        .cloned()
        .collect();
    let room = MAX_POINTS.saturating_sub(known.len() - remove.len());
    let missing: Vec<&String> = in_vault
        .iter()
        .filter(|(k, _)| !known.contains(*k))
        .map(|(_, o)| o)
        .collect();
    let take = missing.len().min(LOAD_PER_PASS).min(room);
    let deferred = missing.len() - take;
    let add: Vec<PointSummary> = futures::stream::iter(missing.into_iter().take(take).cloned())
        .map(|o| {
            let v = vault.clone();
            async move { v.load_point(&o).await }
        })
        .buffered(LOAD_CONCURRENCY)
        .map_ok(|p| PointSummary {
            vault: name.to_string(),
            consistency: p.consistency.as_str().to_string(),
            disks: u32::try_from(p.disks.len()).unwrap_or(u32::MAX),
            size_bytes: p.disks.iter().map(|d| d.size).sum(),
            item: p.item,
            id: p.id,
            created_ms: p.created_ms,
        })
        .try_collect()
        .await
        .map_err(|e| format!("reading a point record of vault `{name}`: {e}"))?;
    let out = Synced {
        added: add.len(),
        removed: remove.len(),
        deferred,
    };
    if add.is_empty() && remove.is_empty() {
        return Ok(out);
    }
    let c = catalog.clone();
    tokio::task::spawn_blocking(move || c.apply_point_mirror(&add, &remove))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The running mirror task.
#[derive(Debug, Clone)]
pub struct PointMirror {
    wake: Arc<Notify>,
}

impl PointMirror {
    /// Starts the task over `vaults`; it runs until `stop` turns true.
    pub fn start(
        catalog: Arc<Catalog>,
        vaults: Arc<BTreeMap<String, Vault>>,
        mut stop: watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let wake = Arc::new(Notify::new());
        let w = wake.clone();
        let task = tokio::spawn(async move {
            let mut failing: BTreeSet<String> = BTreeSet::new();
            loop {
                for (name, vault) in vaults.iter() {
                    match sync_vault(&catalog, name, vault).await {
                        Ok(s) => {
                            if failing.remove(name) {
                                eprintln!("ferryd: points of vault `{name}` are mirrored again");
                            }
                            if s.deferred > 0 {
                                eprintln!(
                                    "ferryd: {} point(s) of vault `{name}` not mirrored yet (at most {LOAD_PER_PASS} per pass, {MAX_POINTS} in all)",
                                    s.deferred
                                );
                            }
                        }
                        Err(e) => {
                            if failing.insert(name.clone()) {
                                eprintln!(
                                    "ferryd: point mirror: {e} (retrying every {} s)",
                                    PERIOD.as_secs()
                                );
                            }
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(PERIOD) => {}
                    () = w.notified() => {}
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
            }
        });
        (Self { wake }, task)
    }

    /// Asks for a pass now (after a job that may have changed points).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_store::ImportOptions;

    #[tokio::test]
    async fn the_mirror_follows_the_vault() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&dir.path().join("c.redb")).unwrap();
        let c = Arc::new(c);
        let vault = crate::testkit::memory_vault(dir.path()).await;
        let disk = dir.path().join("disk.img");
        for fill in 1..=2u8 {
            std::fs::write(&disk, vec![fill; 64 << 10]).unwrap();
            vault
                .import(ImportOptions::full("web-01", &disk), Default::default())
                .await
                .unwrap();
        }
        // A summary whose point is gone from the vault (retention took it).
        let gone = PointSummary {
            vault: "v".into(),
            item: "web-01".into(),
            id: "20200101T000000.000Z-00000000".into(),
            created_ms: 1,
            consistency: "crash".into(),
            disks: 1,
            size_bytes: 1,
        };
        c.apply_point_mirror(std::slice::from_ref(&gone), &[])
            .unwrap();
        let s = sync_vault(&c, "v", &vault).await.unwrap();
        assert_eq!((s.added, s.removed, s.deferred), (2, 1, 0));
        let ip = c.item_points("v", "web-01").unwrap();
        assert_eq!(ip.count, 2);
        let newest = vault.points(Some("web-01")).await.unwrap().pop().unwrap();
        assert_eq!(ip.latest, Some((newest.id, newest.created_ms)));
        // In step: nothing to do.
        let s = sync_vault(&c, "v", &vault).await.unwrap();
        assert_eq!((s.added, s.removed), (0, 0));
    }
}
