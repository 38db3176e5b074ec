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
//! item for the agent's checksum resync. Replication itself belongs to the process role.
//!
//! The target role's part: `test-failover` and `failover` (unplanned) materialise every
//! disk of the chosen recovery point with the store's export (`Vault::export_as`, each file
//! flushed and renamed into place only when complete) into a directory named after the job,
//! then write `machine.json` (the machine's description, see [`MachineDefinition`]) last:
//! a directory without it is not a finished failover, and a failed job removes its directory.
//! `test-failover-cleanup` removes a test failover's directory; `commit` makes a failover
//! final. A job run again after a crash starts over in a fresh directory of the same name.
//!
//! With `[target] location` (an object-store URL) the same layout is made of objects instead:
//! each disk is exported with the store's [`Vault::export_to_backend`] (staged under
//! `<dir>/staging`, uploaded create-only) to `<location>/{test,failover}/<item>/<job id>/`,
//! then `machine.json` is uploaded last; a failed job deletes every object under its prefix,
//! and the cleanup of a test failover recorded there deletes them all. Disks written in
//! place (failback) are local whatever the location.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use std::path::{Path, PathBuf};

use ferry_store::upload::redact_url;
use ferry_store::{
    Backend, BackendOptions, ExportFormat, ExportOptions, FileUploadTuning, FormatOptions,
    LocationExportOptions, PointRecord, PointSelector, Vault,
};
use serde::Serialize;
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
    /// The target role's settings; `None` without the target role.
    target: Option<TargetRole>,
}

/// What the target role's job bodies need from the configuration.
#[derive(Debug, Clone)]
pub struct TargetRole {
    /// `[target] dir`, absolute.
    pub dir: PathBuf,
    /// How long a planned failover waits for the agent's final cycle.
    pub planned_timeout: Duration,
    /// `[target] location`: when set, failovers write objects there instead of into `dir`.
    pub location: Option<TargetLocation>,
}

/// An object-store location failovers are written to (`[target] location`).
#[derive(Clone)]
pub struct TargetLocation {
    /// `s3://bucket/prefix`, `az://container/prefix` or `file:///path`.
    pub url: String,
    /// Object-store options, secrets read from their files included: never printed.
    pub options: BackendOptions,
}

impl std::fmt::Debug for TargetLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Option values may be secrets: only their names are shown.
        let names: Vec<&str> = self.options.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TargetLocation")
            .field("url", &redact_url(&self.url))
            .field("options", &names)
            .finish()
    }
}

impl TargetLocation {
    /// Opens the location (a missing local directory is made).
    fn open(&self) -> Result<Backend, String> {
        let shown = redact_url(&self.url);
        Backend::open(&self.url, &self.options, true).map_err(|e| {
            format!(
                "opening the target location {shown}: {}",
                e.to_string().replace(&self.url, &shown)
            )
        })
    }

    /// `prefix` inside the location as a URL, without credentials (what failover records
    /// hold).
    pub fn url_of(&self, prefix: &str) -> String {
        let loc = redact_url(&self.url);
        if loc.ends_with('/') {
            format!("{loc}{prefix}")
        } else {
            format!("{loc}/{prefix}")
        }
    }
}

/// Where a failover's disks and machine definition go.
enum Dest<'a> {
    /// A directory of the appliance, made fresh.
    Dir(&'a Path),
    /// Objects under `prefix` of a location, each disk staged under `staging` first.
    Objects {
        location: &'a TargetLocation,
        backend: &'a Backend,
        prefix: &'a str,
        staging: PathBuf,
    },
}

impl Dest<'_> {
    /// What the failover record and the log say it is at.
    fn describe(&self) -> String {
        match self {
            Dest::Dir(d) => d.display().to_string(),
            Dest::Objects {
                location, prefix, ..
            } => location.url_of(prefix),
        }
    }
}

/// Deletes every object under `prefix` of `backend`; returns how many there were.
async fn delete_objects(backend: &Backend, prefix: &str) -> Result<usize, String> {
    let objects = backend
        .list(prefix)
        .await
        .map_err(|e| format!("listing the objects under `{prefix}`: {e}"))?;
    for o in &objects {
        let name = o.location.to_string();
        backend
            .delete(&name)
            .await
            .map_err(|e| format!("deleting object `{name}`: {e}"))?;
    }
    Ok(objects.len())
}

/// The tag an agent puts on its final cycle before a planned failover (value: the job id).
pub const TAG_FINAL_CYCLE: &str = "ferry.final_cycle";

impl JobRunner {
    /// Queues again the jobs a previous run left running and starts `workers` runners.
    /// Returns the handle and the set of runner tasks (joined by [`JobRunner::shutdown`]).
    pub fn start(
        catalog: Arc<Catalog>,
        vaults: Arc<BTreeMap<String, Vault>>,
        target: Option<TargetRole>,
        workers: usize,
    ) -> Result<(JobRunner, JoinSet<()>), CatalogError> {
        let requeued = catalog.requeue_interrupted_jobs(ferry_store::point::now_ms())?;
        if requeued > 0 {
            eprintln!("ferryd: {requeued} job(s) interrupted by the last stop are queued again");
        }
        let wake = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            catalog,
            vaults,
            target,
        });
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
        Operation::TestFailover | Operation::Failover => {
            let test = job.kind == Operation::TestFailover;
            let req = job
                .failover
                .clone()
                .ok_or_else(|| format!("job `{}` holds no failover request", job.id))?;
            let vault = ctx.vaults.get(&item.vault).ok_or_else(|| {
                format!(
                    "vault `{}` is in the catalog but not open on this appliance",
                    item.vault
                )
            })?;
            let kind = if test { "test" } else { "failover" };
            let location = ctx.target.as_ref().and_then(|t| t.location.as_ref());
            let record = if let Some(location) = location {
                let prefix = format!("{kind}/{}/{}", item.name, job.id);
                let backend = location.open()?;
                let dest = Dest::Objects {
                    location,
                    backend: &backend,
                    prefix: &prefix,
                    staging: target_dir(ctx)?.join("staging"),
                };
                match materialise(ctx, job, &item, vault, &req, &dest).await {
                    Ok(r) => r,
                    Err(e) => {
                        // Nothing partial is left looking like a machine.
                        if let Err(d) = delete_objects(&backend, &prefix).await {
                            log(ctx, job, format!("cleaning up after the failure: {d}")).await;
                        }
                        return Err(e);
                    }
                }
            } else {
                let dir = target_dir(ctx)?.join(kind).join(&item.name).join(&job.id);
                match materialise(ctx, job, &item, vault, &req, &Dest::Dir(&dir)).await {
                    Ok(r) => r,
                    Err(e) => {
                        // Nothing partial is left looking like a machine.
                        let _ = tokio::fs::remove_dir_all(&dir).await;
                        return Err(e);
                    }
                }
            };
            let (c, name, id) = (ctx.catalog.clone(), item.name.clone(), job.id.clone());
            tokio::task::spawn_blocking(move || {
                c.set_failover_record(&name, &id, test, Some(record), ferry_store::point::now_ms())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(None)
        }
        Operation::TestFailoverCleanup => {
            let Some(t) = item.test_failover.clone() else {
                log(ctx, job, "no test failover to clean up".into()).await;
                return Ok(None);
            };
            // Only ever a directory this appliance made for a test failover, or the objects
            // it made under the configured location.
            let under = target_dir(ctx)?.join("test").join(&item.name);
            let loc = PathBuf::from(&t.location);
            let prefix = format!("test/{}/{}", item.name, t.job);
            let remote = ctx
                .target
                .as_ref()
                .and_then(|r| r.location.as_ref())
                .filter(|l| l.url_of(&prefix) == t.location);
            if let Some(l) = remote {
                let n = delete_objects(&l.open()?, &prefix).await?;
                log(
                    ctx,
                    job,
                    format!("removed {n} object(s) under {}", t.location),
                )
                .await;
            } else if loc.parent() != Some(under.as_path()) {
                // Made under another target directory (moved configuration, a restored
                // appliance): never removed from here; the record goes so the item is free.
                log(
                    ctx,
                    job,
                    format!(
                        "test failover `{}` is recorded at {}, outside {}: not removed (remove it by hand); the record is cleared",
                        t.job,
                        loc.display(),
                        under.display()
                    ),
                )
                .await;
            } else {
                match tokio::fs::remove_dir_all(&loc).await {
                    Ok(()) => log(ctx, job, format!("removed {}", loc.display())).await,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        log(ctx, job, format!("{} was already gone", loc.display())).await;
                    }
                    Err(e) => return Err(format!("removing {}: {e}", loc.display())),
                }
            }
            let (c, name, id) = (ctx.catalog.clone(), item.name.clone(), job.id.clone());
            tokio::task::spawn_blocking(move || {
                c.set_failover_record(&name, &id, true, None, ferry_store::point::now_ms())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(None)
        }
        Operation::Commit => {
            let at = item
                .failover
                .as_ref()
                .map(|f| format!(" (point `{}` at {})", f.point, f.location))
                .unwrap_or_default();
            log(
                ctx,
                job,
                format!(
                    "failover committed{at}: the item is failed over; its older points stay until retention drops them"
                ),
            )
            .await;
            Ok(None)
        }
        Operation::Reprotect => {
            let agent = job
                .agent
                .clone()
                .ok_or_else(|| format!("job `{}` names no agent", job.id))?;
            let (c, a) = (ctx.catalog.clone(), agent.clone());
            let record = tokio::task::spawn_blocking(move || c.agent(&a))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("agent `{agent}` is not enrolled"))?;
            if record.revoked_ms.is_some() {
                return Err(format!("agent `{agent}` is revoked"));
            }
            if !record.items.contains(&item.name) {
                return Err(format!(
                    "agent `{agent}` is not listed for item `{}`: add it first (`ferry agent update {agent} --item {}`)",
                    item.name, item.name
                ));
            }
            // From `failed-over` the direction reverses; naming another agent while
            // `reprotecting` keeps it. Run again after a crash (the source already set), it
            // is not reversed twice.
            let direction = if job.from_state == Some(crate::item::ItemState::FailedOver)
                && item.source_agent.as_deref() != Some(agent.as_str())
            {
                item.direction.reversed()
            } else {
                item.direction
            };
            let (c, name, id, a) = (
                ctx.catalog.clone(),
                item.name.clone(),
                job.id.clone(),
                agent.clone(),
            );
            tokio::task::spawn_blocking(move || {
                c.set_source(&name, &id, &a, direction, ferry_store::point::now_ms())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            log(
                ctx,
                job,
                format!(
                    "reprotecting `{}` {}: agent `{agent}` is its source now; its first cycle compares its disks with the vault's newest point and sends only the chunks that differ",
                    item.name,
                    direction.as_str()
                ),
            )
            .await;
            Ok(None)
        }
    }
}

/// The machine's description written next to its disks (`machine.json`), for the operator
/// and for the plan steps and hooks that run after a failover. Version 1.
#[derive(Debug, Serialize)]
pub struct MachineDefinition {
    /// `1`.
    pub version: u32,
    /// The protected item (machine) name.
    pub name: String,
    /// Its description in the catalog.
    pub description: Option<String>,
    /// `test` or `unplanned`.
    pub failover: &'static str,
    /// The job that wrote it.
    pub job: String,
    /// When, RFC 3339.
    pub created: String,
    /// The recovery point materialised.
    pub point: MachinePoint,
    /// The disks, in the point's order.
    pub disks: Vec<MachineDisk>,
    /// Virtual CPUs, when known (agents do not report them yet: `null`).
    pub cpus: Option<u32>,
    /// Memory in bytes, when known (`null` until agents report it).
    pub memory_bytes: Option<u64>,
    /// The network mapping applied (none is configured yet: empty).
    pub network_mapping: Vec<serde_json::Value>,
}

/// The point a machine definition was made from.
#[derive(Debug, Serialize)]
pub struct MachinePoint {
    /// Point id.
    pub id: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// `crash` or `app`.
    pub consistency: &'static str,
    /// Where its data came from.
    pub source: String,
}

/// One disk of a machine definition.
#[derive(Debug, Serialize)]
pub struct MachineDisk {
    /// Disk name.
    pub name: String,
    /// File name in the machine's directory, or the absolute path of a disk written in
    /// place (failback).
    pub file: String,
    /// Container format (`raw`, `vhd`, `qcow2`, …).
    pub format: String,
    /// Virtual size in bytes.
    pub size_bytes: u64,
}

/// The target role's directory, or why there is none.
fn target_dir(ctx: &Ctx) -> Result<&Path, String> {
    ctx.target.as_ref().map(|t| t.dir.as_path()).ok_or_else(|| {
        "this appliance does not take the target role (`roles` in its configuration)".to_string()
    })
}

/// File extension of a disk exported as `f`.
fn extension(f: ExportFormat) -> &'static str {
    match f.as_str() {
        "raw" => "img",
        "vmdk-stream" => "vmdk",
        other => other,
    }
}

/// Waits for the point made from the agent's final cycle of every disk of `item` (tagged
/// [`TAG_FINAL_CYCLE`] = the job id; the plan tells the agent while this job holds the item)
/// and returns the newest of them: points build on the one before, so it holds every disk's
/// final state.
async fn final_point(
    ctx: &Arc<Ctx>,
    job: &Job,
    item: &crate::item::Item,
    vault: &Vault,
    timeout: Duration,
) -> Result<PointRecord, String> {
    log(
        ctx,
        job,
        format!(
            "planned failover: waiting up to {} s for the agent's final cycle of {} disk(s) (its plan says final_cycle = {})",
            timeout.as_secs(),
            item.disks.len(),
            job.id
        ),
    )
    .await;
    let deadline = tokio::time::Instant::now() + timeout;
    let since = ferry_store::point::compact_time(job.created_ms);
    let prefix = format!("{}{}/", ferry_store::point::POINTS_PREFIX, item.name);
    let mut seen: BTreeMap<String, PointRecord> = BTreeMap::new();
    loop {
        let names = vault
            .point_names(Some(&item.name))
            .await
            .map_err(|e| format!("listing the points of `{}`: {e}", item.name))?;
        for n in names.iter().rev() {
            let id = n.strip_prefix(&prefix).unwrap_or(n);
            if id.get(..since.len()).is_some_and(|t| t < since.as_str()) {
                break; // made before this job
            }
            if seen.contains_key(n) {
                continue;
            }
            let p = vault
                .load_point(n)
                .await
                .map_err(|e| format!("reading point {n}: {e}"))?;
            seen.insert(n.clone(), p);
        }
        let finals: Vec<&PointRecord> = seen
            .values()
            .filter(|p| {
                p.tags
                    .iter()
                    .any(|(k, v)| k == TAG_FINAL_CYCLE && v == &job.id)
            })
            .collect();
        let disks_done: std::collections::BTreeSet<&str> = finals
            .iter()
            .filter_map(|p| {
                p.tags
                    .iter()
                    .find(|(k, _)| k == crate::drain::TAG_DISK)
                    .map(|(_, v)| v.as_str())
            })
            .collect();
        if item
            .disks
            .iter()
            .all(|d| disks_done.contains(d.name.as_str()))
            && let Some(last) = finals.iter().max_by_key(|p| (p.created_ms, p.id.clone()))
        {
            let newest = (*last).clone();
            log(
                ctx,
                job,
                format!(
                    "final cycle received: point `{}` ({}-consistent)",
                    newest.id,
                    newest.consistency.as_str()
                ),
            )
            .await;
            return Ok(newest);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no final cycle from the agent of `{}` within {} s ({} of {} disk(s) sent one): is the agent running, and new enough to know `final_cycle`? The item stays as it was",
                item.name,
                timeout.as_secs(),
                disks_done.len(),
                item.disks.len()
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Writes every disk of the chosen point and then `machine.json` into `dest` (a directory
/// created fresh, or a prefix of a location emptied first).
async fn materialise(
    ctx: &Arc<Ctx>,
    job: &Job,
    item: &crate::item::Item,
    vault: &Vault,
    req: &crate::item::FailoverRequest,
    dest: &Dest<'_>,
) -> Result<crate::item::FailoverRecord, String> {
    let format: ExportFormat = req.format.parse()?;
    let chosen = if req.mode == crate::item::FailoverMode::Planned {
        let timeout = ctx
            .target
            .as_ref()
            .map_or(Duration::from_secs(1800), |t| t.planned_timeout);
        Some(final_point(ctx, job, item, vault, timeout).await?)
    } else {
        None
    };
    // Points may have been written by another writer of the bucket (an offline `ferry vault
    // import`, another appliance): bring the local index up to the bucket first.
    let unreadable = vault.sync_index().await.map_err(|e| {
        format!(
            "bringing the index of vault `{}` up to date: {e}",
            item.vault
        )
    })?;
    for (segment, why) in unreadable {
        log(
            ctx,
            job,
            format!("index segment {segment} unreadable: {why}"),
        )
        .await;
    }
    let point: PointRecord = match chosen {
        Some(p) => p,
        None => vault
            .point(&item.name, &PointSelector::parse(&req.point))
            .await
            .map_err(|e| format!("choosing recovery point `{}`: {e}", req.point))?,
    };
    log(
        ctx,
        job,
        format!(
            "{} failover of `{}` from point `{}` ({}, {}-consistent, asked for `{}`) into {} as {format}",
            req.mode.as_str(),
            item.name,
            point.id,
            ferry_store::point::rfc3339(point.created_ms),
            point.consistency.as_str(),
            req.point,
            dest.describe()
        ),
    )
    .await;
    match dest {
        Dest::Dir(dir) => {
            match tokio::fs::remove_dir_all(dir).await {
                Ok(()) => {
                    log(
                        ctx,
                        job,
                        "removed what an interrupted run of this job left".into(),
                    )
                    .await
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("clearing {}: {e}", dir.display())),
            }
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        Dest::Objects {
            backend, prefix, ..
        } => {
            // Objects are written create-only: what an interrupted run left goes first.
            let n = delete_objects(backend, prefix).await?;
            if n > 0 {
                log(
                    ctx,
                    job,
                    format!("removed {n} object(s) an interrupted run of this job left"),
                )
                .await;
            }
        }
    }
    if let Some((missing, _)) = req
        .in_place
        .iter()
        .find(|(n, _)| !point.disks.iter().any(|d| &d.name == n))
    {
        return Err(format!(
            "point `{}` has no disk `{missing}` to write in place",
            point.id
        ));
    }
    let mut disks = Vec::with_capacity(point.disks.len());
    for d in &point.disks {
        if let Some((_, target)) = req.in_place.iter().find(|(n, _)| n == &d.name) {
            // Failback onto the original disk: only the 4 KiB blocks that differ are written.
            let started = std::time::Instant::now();
            let r = vault
                .restore_in_place(
                    ferry_store::inplace::InPlaceOptions {
                        item: item.name.clone(),
                        point: PointSelector::Id(point.id.clone()),
                        disk: Some(d.name.clone()),
                        target: PathBuf::from(target),
                        sync: true,
                    },
                    Arc::new(ferry_store::Progress::default()),
                )
                .await
                .map_err(|e| {
                    format!(
                        "disk `{}` of point `{}` in place onto {target}: {e} (a damaged vault is found before anything is written; otherwise blocks written before the error stay written: run the failover again to finish)",
                        d.name, point.id
                    )
                })?;
            log(
                ctx,
                job,
                format!(
                    "disk `{}` written in place onto {target}: {} chunks compared, {} differed and were written ({} bytes) in {:.1} s",
                    d.name,
                    r.chunks_compared,
                    r.chunks_written,
                    r.bytes_written,
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
            disks.push(MachineDisk {
                name: d.name.clone(),
                file: target.clone(),
                format: "raw".to_string(),
                size_bytes: d.size,
            });
            continue;
        }
        let file = format!("{}.{}", d.name, extension(format));
        let started = std::time::Instant::now();
        let format_options = FormatOptions {
            format,
            // Azure takes only whole-MiB VHDs: pad rather than refuse.
            vhd_round_up: true,
        };
        let failed = |e| format!("disk `{}` of point `{}`: {e}", d.name, point.id);
        let (chunks_written, reads) = match dest {
            Dest::Dir(dir) => {
                let r = vault
                    .export_as(
                        ExportOptions {
                            item: item.name.clone(),
                            point: PointSelector::Id(point.id.clone()),
                            disk: Some(d.name.clone()),
                            out: dir.join(&file),
                            overwrite: false,
                            sync: true,
                        },
                        format_options,
                        Arc::new(ferry_store::Progress::default()),
                    )
                    .await
                    .map_err(failed)?;
                (r.chunks_written, r.reads)
            }
            Dest::Objects {
                backend,
                prefix,
                staging,
                ..
            } => {
                let r = vault
                    .export_to_backend(
                        backend,
                        LocationExportOptions {
                            item: item.name.clone(),
                            point: PointSelector::Id(point.id.clone()),
                            disk: Some(d.name.clone()),
                            format: format_options,
                            object: format!("{prefix}/{file}"),
                            staging_dir: staging.clone(),
                            upload: FileUploadTuning::default(),
                        },
                        Arc::new(ferry_store::Progress::default()),
                    )
                    .await
                    .map_err(failed)?;
                (r.chunks_written, r.reads)
            }
        };
        log(
            ctx,
            job,
            format!(
                "disk `{}`: {} bytes, {} non-zero chunks in {} ranged reads, written to {file} in {:.1} s",
                d.name,
                d.size,
                chunks_written,
                reads,
                started.elapsed().as_secs_f64()
            ),
        )
        .await;
        disks.push(MachineDisk {
            name: d.name.clone(),
            file,
            format: format.as_str().to_string(),
            size_bytes: d.size,
        });
    }
    let now = ferry_store::point::now_ms();
    let def = MachineDefinition {
        version: 1,
        name: item.name.clone(),
        description: item.description.clone(),
        failover: req.mode.as_str(),
        job: job.id.clone(),
        created: ferry_store::point::rfc3339(now),
        point: MachinePoint {
            id: point.id.clone(),
            created: ferry_store::point::rfc3339(point.created_ms),
            consistency: point.consistency.as_str(),
            source: point.source.clone(),
        },
        disks,
        cpus: None,
        memory_bytes: None,
        network_mapping: Vec::new(),
    };
    let body = serde_json::to_vec_pretty(&def).map_err(|e| e.to_string())?;
    let written = match dest {
        Dest::Dir(dir) => {
            let (tmp, fin) = (dir.join(".machine.json.partial"), dir.join("machine.json"));
            let write = async {
                tokio::fs::write(&tmp, &body).await?;
                tokio::fs::File::open(&tmp).await?.sync_all().await?;
                tokio::fs::rename(&tmp, &fin).await?;
                tokio::fs::File::open(dir).await?.sync_all().await
            };
            write
                .await
                .map_err(|e| format!("writing {}: {e}", fin.display()))?;
            fin.display().to_string()
        }
        Dest::Objects {
            location,
            backend,
            prefix,
            ..
        } => {
            let name = format!("{prefix}/machine.json");
            let url = location.url_of(&name);
            let created = backend
                .put_create(&name, body.into())
                .await
                .map_err(|e| format!("writing {url}: {e}"))?;
            if !created {
                return Err(format!("writing {url}: the object already exists"));
            }
            url
        }
    };
    log(ctx, job, format!("machine definition written: {written}")).await;
    Ok(crate::item::FailoverRecord {
        job: job.id.clone(),
        mode: req.mode,
        point: point.id,
        location: dest.describe(),
        at_ms: now,
    })
}
