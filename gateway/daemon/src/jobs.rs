//! The job runner: runs the operations queued in the catalog, a bounded number at a time.
//!
//! The queue is the catalog's `job_queue` table, so a job accepted by the API (202 and its
//! id) survives a stop or a crash: at start, jobs left running are queued again
//! ([`Catalog::requeue_interrupted_jobs`]) and run from their start — every job body is
//! written to be safe to run twice. Runners take the oldest queued job in a transaction
//! ([`Catalog::take_queued_job`]); a notification wakes them when the API queues one, and
//! they also look every few seconds, so no wake-up can be lost.
//!
//! On shutdown the runners take no new job and the current ones get a grace period to end;
//! one still running after it is left `running` in the catalog and queued again at the next
//! start.
//!
//! What each operation does here is the control role's part: `enable` checks the vault
//! (reachable, and whether it already holds points of the item: then the item is protected
//! at once), `disable` removes the item (its points stay in the vault), `resync` marks the
//! item for the agent's checksum resync. Replication and failover themselves belong to the
//! process and target roles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_store::Vault;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::catalog::{Catalog, CatalogError, Job};
use crate::item::{Event, Operation};

/// How often idle runners look at the queue even without a notification.
const POLL: Duration = Duration::from_secs(5);

/// Handle of the running job runners.
#[derive(Debug, Clone)]
pub struct JobRunner {
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
}

/// What a job body needs.
#[derive(Debug)]
struct Ctx {
    catalog: Arc<Catalog>,
    vaults: Arc<BTreeMap<String, Vault>>,
}

impl JobRunner {
    /// Queues again the jobs a previous run left running and starts `workers` runners.
    /// Returns the handle and the set of runner tasks (joined by [`JobRunner::shutdown`]).
    pub fn start(
        catalog: Arc<Catalog>,
        vaults: Arc<BTreeMap<String, Vault>>,
        workers: usize,
    ) -> Result<(JobRunner, JoinSet<()>), CatalogError> {
        let requeued = catalog.requeue_interrupted_jobs(ferry_store::point::now_ms())?;
        if requeued > 0 {
            eprintln!("ferryd: {requeued} job(s) interrupted by the last stop are queued again");
        }
        let wake = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(false);
        let ctx = Arc::new(Ctx { catalog, vaults });
        let mut set = JoinSet::new();
        for _ in 0..workers.max(1) {
            let (ctx, wake, mut stopped) = (ctx.clone(), wake.clone(), stopped.clone());
            set.spawn(async move {
                loop {
                    if *stopped.borrow() {
                        return;
                    }
                    let c = ctx.catalog.clone();
                    let taken = tokio::task::spawn_blocking(move || {
                        c.take_queued_job(ferry_store::point::now_ms())
                    })
                    .await;
                    match taken {
                        Ok(Ok(Some(job))) => run(&ctx, job).await,
                        Ok(Ok(None)) => {
                            tokio::select! {
                                () = wake.notified() => {}
                                () = tokio::time::sleep(POLL) => {}
                                _ = stopped.changed() => {}
                            }
                        }
                        Ok(Err(e)) => {
                            eprintln!("ferryd: job runner: {e}");
                            tokio::time::sleep(POLL).await;
                        }
                        Err(e) => {
                            eprintln!("ferryd: job runner: {e}");
                            return;
                        }
                    }
                }
            });
        }
        Ok((JobRunner { wake, stop }, set))
    }

    /// Wakes a runner: a job was queued.
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Stops taking jobs and waits up to `grace` for the running ones; returns how many
    /// runners were still busy (their jobs are queued again at the next start).
    pub async fn shutdown(&self, mut set: JoinSet<()>, grace: Duration) -> usize {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        while !set.is_empty() {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let busy = set.len();
        set.abort_all();
        busy
    }
}

/// Runs one job to its end and records the outcome.
async fn run(ctx: &Arc<Ctx>, job: Job) {
    let id = job.id.clone();
    let outcome = body(ctx, &job).await;
    let c = ctx.catalog.clone();
    let ended = tokio::task::spawn_blocking(move || {
        c.finish_job(&id, outcome, ferry_store::point::now_ms())
    })
    .await;
    match ended {
        Ok(Ok(j)) => eprintln!(
            "ferryd: job {} ({} {}): {}",
            j.id,
            j.kind,
            j.item,
            j.state.as_str()
        ),
        Ok(Err(e)) => eprintln!("ferryd: job {}: recording its end: {e}", job.id),
        Err(e) => eprintln!("ferryd: job {}: {e}", job.id),
    }
}

/// Appends a line to the job's log (on the blocking pool: one catalog commit).
async fn log(ctx: &Arc<Ctx>, job: &Job, msg: String) {
    let (c, id) = (ctx.catalog.clone(), job.id.clone());
    let _ = tokio::task::spawn_blocking(move || c.log_job(&id, ferry_store::point::now_ms(), &msg))
        .await;
}

/// What the operation does; `Ok(event)` applies `event` to the item after the success
/// transition.
async fn body(ctx: &Arc<Ctx>, job: &Job) -> Result<Option<Event>, String> {
    let c = ctx.catalog.clone();
    let name = job.item.clone();
    let item = tokio::task::spawn_blocking(move || c.item(&name))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("protected item `{}` is gone", job.item))?;
    match job.kind {
        Operation::Enable => {
            log(ctx, job, format!("checking vault `{}`", item.vault)).await;
            let vault = ctx.vaults.get(&item.vault).ok_or_else(|| {
                format!(
                    "vault `{}` is in the catalog but not open on this appliance",
                    item.vault
                )
            })?;
            let points = vault
                .point_names(Some(&item.name))
                .await
                .map_err(|e| format!("vault `{}`: {e}", item.vault))?;
            if let Some(last) = points.last() {
                log(
                    ctx,
                    job,
                    format!(
                        "vault `{}` already holds {} recovery point(s) of `{}` (newest `{}`): the item is protected from them",
                        item.vault,
                        points.len(),
                        item.name,
                        last
                    ),
                )
                .await;
                Ok(Some(Event::PointCommitted))
            } else {
                log(
                    ctx,
                    job,
                    format!(
                        "enabled with policy `{}`, {} disk(s); waiting for the agent's initial replication",
                        item.policy,
                        item.disks.len()
                    ),
                )
                .await;
                Ok(None)
            }
        }
        Operation::Disable => {
            let kept = match ctx.vaults.get(&item.vault) {
                Some(v) => v
                    .point_names(Some(&item.name))
                    .await
                    .map(|p| p.len().to_string())
                    .unwrap_or_else(|e| format!("(cannot count: {e})")),
                None => "(vault not open)".into(),
            };
            log(
                ctx,
                job,
                format!(
                    "protection removed; the item's {kept} recovery point(s) stay in vault `{}`",
                    item.vault
                ),
            )
            .await;
            Ok(None)
        }
        Operation::Resync => {
            log(
                ctx,
                job,
                "resync requested: the agent compares source and replica chunk digests at its next cycle and sends only what differs".into(),
            )
            .await;
            Ok(None)
        }
        Operation::Failover | Operation::Commit | Operation::Reprotect => Err(format!(
            "`{}` is carried out by the target role, which this appliance does not run yet",
            job.kind
        )),
    }
}
