//! `/api/v1/metrics`: what the appliance is doing, in Prometheus' text format, for the
//! monitoring an operator already runs.
//!
//! Counters live here as atomics, bumped by the parts that do the work (every HTTP answer by
//! class, every catalog snapshot written or failed); gauges are read from the catalog when
//! scraped (items by state, jobs by state, tokens, policies, each item's newest recovery
//! point from the catalog's point mirror and whether its age is over its policy's RPO
//! threshold, the alert Site Recovery raises), so they are never stale and nothing has to
//! keep them in step.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::catalog::{Catalog, CatalogError};
use crate::item::ItemState;

/// The counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// HTTP answers by class: 1xx … 5xx.
    responses: [AtomicU64; 5],
    /// Catalog snapshots written to the vault.
    snapshots_written: AtomicU64,
    /// Catalog snapshots that could not be written.
    snapshot_failures: AtomicU64,
    /// Unix milliseconds of the last snapshot written (0: none yet).
    last_snapshot_ms: AtomicU64,
}

impl Metrics {
    /// Counts one HTTP answer of `status`.
    pub fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a snapshot written at `now_ms`.
    pub fn snapshot_written(&self, now_ms: u64) {
        self.snapshots_written.fetch_add(1, Ordering::Relaxed);
        self.last_snapshot_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Counts a snapshot that failed.
    pub fn snapshot_failed(&self) {
        self.snapshot_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition: these counters and the catalog's gauges.
    pub fn render(&self, catalog: &Catalog) -> Result<String, CatalogError> {
        let c = catalog.census()?;
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        metric(
            "ferry_build_info",
            "gauge",
            "The running ferryd.",
            &[(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1)],
        );
        metric(
            "ferry_items",
            "gauge",
            "Protected items by state.",
            &ItemState::ALL
                .iter()
                .map(|st| {
                    (
                        format!("{{state=\"{}\"}}", st.as_str()),
                        c.items_by_state.get(st).copied().unwrap_or(0),
                    )
                })
                .collect::<Vec<_>>(),
        );
        metric(
            "ferry_jobs",
            "gauge",
            "Job records by state.",
            &["queued", "running", "succeeded", "failed", "cancelled"]
                .iter()
                .map(|st| {
                    (
                        format!("{{state=\"{st}\"}}"),
                        c.jobs_by_state.get(*st).copied().unwrap_or(0),
                    )
                })
                .collect::<Vec<_>>(),
        );
        metric(
            "ferry_admin_tokens_active",
            "gauge",
            "Active admin tokens.",
            &[(String::new(), c.active_tokens)],
        );
        metric(
            "ferry_policies",
            "gauge",
            "Replication policies.",
            &[(String::new(), c.policies)],
        );
        let rpo = rpo_samples(catalog, ferry_store::point::now_ms())?;
        metric(
            "ferry_item_last_point_timestamp_seconds",
            "gauge",
            "When each protected item's newest recovery point was made (items with a point).",
            &rpo.iter()
                .map(|r| (format!("{{item=\"{}\"}}", r.item), r.latest_ms / 1000))
                .collect::<Vec<_>>(),
        );
        metric(
            "ferry_item_rpo_seconds",
            "gauge",
            "Age of each protected item's newest recovery point: its current RPO.",
            &rpo.iter()
                .map(|r| (format!("{{item=\"{}\"}}", r.item), r.age_ms / 1000))
                .collect::<Vec<_>>(),
        );
        metric(
            "ferry_item_rpo_threshold_exceeded",
            "gauge",
            "1 when a replicating item's current RPO is over its policy's RPO threshold.",
            &rpo.iter()
                .map(|r| (format!("{{item=\"{}\"}}", r.item), u64::from(r.exceeded)))
                .collect::<Vec<_>>(),
        );
        metric(
            "ferry_http_responses_total",
            "counter",
            "HTTP answers of the API by status class.",
            &(0..5)
                .map(|i| {
                    (
                        format!("{{class=\"{}xx\"}}", i + 1),
                        self.responses[i].load(Ordering::Relaxed),
                    )
                })
                .collect::<Vec<_>>(),
        );
        metric(
            "ferry_catalog_snapshots_written_total",
            "counter",
            "Catalog snapshots written to the vault.",
            &[(
                String::new(),
                self.snapshots_written.load(Ordering::Relaxed),
            )],
        );
        metric(
            "ferry_catalog_snapshot_failures_total",
            "counter",
            "Catalog snapshots that could not be written (retried every 10 s).",
            &[(
                String::new(),
                self.snapshot_failures.load(Ordering::Relaxed),
            )],
        );
        metric(
            "ferry_catalog_snapshot_last_success_timestamp_seconds",
            "gauge",
            "When the last catalog snapshot was written (0: none since start).",
            &[(
                String::new(),
                self.last_snapshot_ms.load(Ordering::Relaxed) / 1000,
            )],
        );
        Ok(s)
    }
}

/// One item's recovery-point age.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rpo {
    item: String,
    latest_ms: u64,
    age_ms: u64,
    exceeded: bool,
}

/// The RPO of every item with a mirrored point. The threshold applies to items that are
/// replicating (protected, resync required or resynchronizing): an item in initial
/// replication or failed over has no RPO to keep.
fn rpo_samples(catalog: &Catalog, now_ms: u64) -> Result<Vec<Rpo>, CatalogError> {
    let points = catalog.all_item_points()?;
    let mut thresholds = std::collections::BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let p = catalog.policies_page(after.as_deref(), crate::catalog::MAX_PAGE)?;
        for pol in p.items {
            thresholds.insert(
                pol.name,
                u64::from(pol.settings.rpo_threshold_minutes) * 60_000,
            );
        }
        match p.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let p = catalog.items_page(after.as_deref(), crate::catalog::MAX_PAGE)?;
        for it in p.items {
            let Some((_, latest_ms)) = points
                .get(&(it.vault.clone(), it.name.clone()))
                .and_then(|p| p.latest.clone())
            else {
                continue;
            };
            let age_ms = now_ms.saturating_sub(latest_ms);
            let replicating = matches!(
                it.state,
                ItemState::Protected | ItemState::ResyncRequired | ItemState::Resynchronizing
            );
            let exceeded = replicating && thresholds.get(&it.policy).is_some_and(|t| age_ms > *t);
            out.push(Rpo {
                item: it.name,
                latest_ms,
                age_ms,
                exceeded,
            });
        }
        match p.next_after {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&dir.path().join("c.redb")).unwrap();
        c.ensure_default_policy(1).unwrap();
        let m = Metrics::default();
        m.response(200);
        m.response(204);
        m.response(404);
        m.response(503);
        m.snapshot_written(5_000);
        m.snapshot_failed();
        let t = m.render(&c).unwrap();
        for line in [
            "ferry_items{state=\"protected\"} 0",
            "ferry_jobs{state=\"queued\"} 0",
            "ferry_policies 1",
            "ferry_http_responses_total{class=\"2xx\"} 2",
            "ferry_http_responses_total{class=\"4xx\"} 1",
            "ferry_http_responses_total{class=\"5xx\"} 1",
            "ferry_catalog_snapshots_written_total 1",
            "ferry_catalog_snapshot_failures_total 1",
            "ferry_catalog_snapshot_last_success_timestamp_seconds 5",
            "# TYPE ferry_jobs gauge",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line}:\n{t}");
        }
    }

    #[test]
    fn rpo_is_the_age_of_the_newest_point_against_the_policy() {
        use crate::item::Disk;
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = Catalog::open(&dir.path().join("c.redb")).unwrap();
        c.ensure_default_policy(1).unwrap();
        c.insert_vault(&crate::catalog::VaultEntry {
            name: "v".into(),
            url: "/x".into(),
            created_ms: 1,
        })
        .unwrap();
        let disks = || {
            vec![Disk {
                name: "os".into(),
                size_bytes: 1 << 20,
            }]
        };
        for item in ["fresh", "stale", "new"] {
            let (_, job) = c
                .create_item(item, None, "v", "default", disks(), 1)
                .unwrap();
            if item != "new" {
                // enable ends with a point: protected.
                c.take_queued_job(2).unwrap();
                c.finish_job(&job.id, Ok(Some(crate::item::Event::PointCommitted)), 3)
                    .unwrap();
            }
        }
        let pt = |item: &str, t: u64| crate::catalog::PointSummary {
            vault: "v".into(),
            item: item.into(),
            id: format!("{item}-{t}"),
            created_ms: t,
            consistency: "crash".into(),
            disks: 1,
            size_bytes: 1 << 20,
        };
        let now = 100 * 60_000;
        // The default threshold is 15 minutes.
        c.apply_point_mirror(
            &[
                pt("fresh", now - 60_000),
                pt("stale", now - 16 * 60_000),
                pt("new", 0),
            ],
            &[],
        )
        .unwrap();
        let r = rpo_samples(&c, now).unwrap();
        let by: std::collections::BTreeMap<_, _> = r
            .iter()
            .map(|x| (x.item.as_str(), (x.age_ms, x.exceeded)))
            .collect();
        assert_eq!(by["fresh"], (60_000, false));
        assert_eq!(by["stale"], (16 * 60_000, true));
        assert!(!by["new"].1, "an item still enabling has no RPO to keep");
    }
}
