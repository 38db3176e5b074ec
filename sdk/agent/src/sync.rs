//! Replication cycles: `ferry-agent sync --once` (one cycle of each selected disk, now) and
//! `ferry-agent run` (the service: a cycle of every disk on the plan's interval, for ever).
//!
//! This module decides; the others do. For one disk, a cycle is:
//!
//! 1. the item's replication plan (`GET /api/v1/agent/items/{item}/replication`): paused, no
//!    data port, or no such disk end it here;
//! 2. a cycle left by an earlier run is settled first (`Cycle::resume_or_settle`): promoted
//!    if the plan says the gateway holds it complete, resumed if its view is still there,
//!    else abandoned (its number stays used: the disk's floor);
//! 3. a new cycle: number `max(committed, gateway's last complete, floor) + 1`; kind
//!    `Initial` when the gateway holds nothing, `Delta` when the committed digests describe the
//!    gateway's last complete cycle with the same geometry (and no resync was asked), else
//!    `Resync`; a delta changing more than the plan's `resync_threshold_percent` of the disk
//!    is sent as `Resync` (same frames: the digests are trusted, so the differing chunks are
//!    exactly what must go);
//! 4. a `Resync` without trusted digests is planned against the replica's own digests, asked
//!    of the gateway ([`crate::resync`]; before the view is taken, so no freeze or snapshot
//!    is held while the gateway reads its point): only the chunks that differ are sent. When
//!    they cannot be had or used, it sends every chunk (`event=resync_digests_unusable`);
//! 5. the view is taken, the frames planned ([`crate::plan`]), the record marked planned;
//! 6. the session ([`crate::session::replicate`]) until the `EndOfCycle` is acknowledged;
//! 7. the view released, the pending digests promoted, and (if asked) a bounded wait for
//!    `PointCommitted`.
//!
//! A resync the agent decides itself (steps 3 and 5: tracking lost or damaged, changed
//! geometry, changes over the threshold) waits for the policy's `resync_window` when the plan
//! has one and the agent's local time ([`Context::clock`], the throttle windows' clock) is
//! outside it: no frame and no `Hello` is sent, the cycle's directory goes (the committed
//! digests stay as they were, so the next attempt plans again), `event=resync_deferred` is
//! logged and the cycle ends as [`CycleOutcome::Deferred`] (`sync --once`: status
//! `deferred`). `run` tries again on its interval, and at the latest when the window opens.
//! A resync the operator asked for (`resync_requested`) is never deferred, nor is a cycle
//! resumed from an earlier run (it began inside its window). When it can be told before the
//! view is taken (the committed digests cannot describe the gateway's cycle at the disk's live
//! size), nothing is taken, fetched or planned at all; a resync by the threshold is known only
//! once planned.
//!
//! Failures are classed as in `docs/agent-protocol.md` §7.6: fatal ones stop the disk (and
//! only that disk in `run`), `bad_session` drops the change tracking (the next cycle is a
//! resync), transient ones are retried on the plan's schedule — a bounded number of times by
//! `sync --once`, for ever by `run`. SIGTERM or ctrl-c stops after the frame being written;
//! the cycle resumes at the next start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ferry_proto::enroll::{PlanDisk, ReplicationPlan};
use ferry_proto::frame::{CycleKind, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use reqwest::Url;
use serde::Serialize;
use tokio::time::Instant;

use crate::disks::{DiskConfig, ReplicationConfig, SnapshotMode, lvm_volume};
use crate::error::{AgentError, EXIT_OTHER, EXIT_STATE};
use crate::gateway::{self, Gateway, GatewayError};
use crate::plan::{self, Base, CycleFrames, Ending, Geometry, PlanError};
use crate::progress::{self, Progress, Style};
use crate::resync::{self, Unusable};
use crate::session::{
    self, Class, Commit, HelloParams, SessionConfig, SessionError, SessionState, Stop, TlsConnector,
};
use crate::source::{self, ChangeList};
use crate::state::{StateDir, StateError};
use crate::throttle::{Clock, Throttle, TimeWindow};
use crate::tracking::{CycleRecord, DigestsHeader, DiskState, Phase, TrackingError, VIEW_FILE};
use crate::view::{self, View, ViewError};

/// Most times a cycle takes a new number because the gateway held frames of the one chosen.
const MAX_RENUMBER: usize = 3;
/// `Busy` waits are clamped to this range (`docs/agent-protocol.md` §7.5).
const BUSY_MIN: Duration = Duration::from_secs(1);
/// See [`BUSY_MIN`].
const BUSY_MAX: Duration = Duration::from_secs(600);
/// How long `run` waits before trying a disk another process holds again.
const LOCKED_RETRY: Duration = Duration::from_secs(60);

/// Why a disk's cycle failed. Every variant names the disk, and the cycle once it has one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The disk's replication state.
    #[error("disk {disk}: {source}")]
    Tracking {
        /// `item/disk`.
        disk: String,
        /// What failed.
        source: TrackingError,
    },
    /// Taking or reopening the view (the message names the disk).
    #[error("cycle {cycle}: {source}")]
    View {
        /// The cycle.
        cycle: u64,
        /// What failed.
        source: ViewError,
    },
    /// Planning the frames.
    #[error("disk {disk} cycle {cycle}: planning failed: {source}")]
    Plan {
        /// `item/disk`.
        disk: String,
        /// The cycle.
        cycle: u64,
        /// What failed.
        source: PlanError,
    },
    /// The session.
    #[error("disk {disk} cycle {cycle}: {source}")]
    Session {
        /// `item/disk`.
        disk: String,
        /// The cycle.
        cycle: u64,
        /// What failed.
        source: SessionError,
    },
    /// Reading the item's replication plan.
    #[error("disk {disk}: cannot read the replication plan of item `{item}`: {source}")]
    PlanFetch {
        /// `item/disk`.
        disk: String,
        /// The item.
        item: String,
        /// What failed.
        source: GatewayError,
    },
    /// The appliance does not have the process role.
    #[error(
        "disk {disk}: the gateway has no process role (the replication plan of item `{item}` has no data port)"
    )]
    NoProcessRole {
        /// `item/disk`.
        disk: String,
        /// The item.
        item: String,
    },
    /// The plan does not list the disk.
    #[error(
        "disk {disk}: the gateway's replication plan of item `{item}` has no disk `{name}` (it has: {known})"
    )]
    UnknownDisk {
        /// `item/disk`.
        disk: String,
        /// The item.
        item: String,
        /// The disk name.
        name: String,
        /// The disks the plan lists.
        known: String,
    },
    /// The plan's chunk size is not one the protocol accepts.
    #[error(
        "disk {disk}: the gateway's plan gives chunk size {chunk_size}, not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
    )]
    BadChunkSize {
        /// `item/disk`.
        disk: String,
        /// The chunk size.
        chunk_size: u32,
    },
    /// The gateway acknowledged the cycle but its digests could not be committed.
    #[error(
        "disk {disk} cycle {cycle}: the gateway acknowledged the cycle, but its digests cannot be committed ({source}); the next cycle resynchronises the disk"
    )]
    Promote {
        /// `item/disk`.
        disk: String,
        /// The cycle.
        cycle: u64,
        /// What failed.
        source: TrackingError,
    },
}

impl SyncError {
    /// What follows (`run`): stop the disk, resync, retry later, or stop quietly.
    pub fn class(&self) -> Class {
        match self {
            Self::Tracking {
                source: TrackingError::Locked { .. },
                ..
            } => Class::Transient { immediate: false },
            Self::Tracking { .. } => Class::Fatal,
            Self::Plan {
                source: PlanError::Stopped,
                ..
            } => Class::Stopped,
            Self::View { .. } | Self::Plan { .. } | Self::NoProcessRole { .. } => {
                Class::Transient { immediate: false }
            }
            Self::Session {
                source: SessionError::Source(_) | SessionError::ForeignCycle { .. },
                ..
            } => Class::Transient { immediate: false },
            Self::Session { source, .. } => source.class(),
            Self::PlanFetch { source, .. } => match source {
                GatewayError::Api { status, .. } | GatewayError::Status { status, .. }
                    if matches!(status, 401 | 403 | 404) =>
                {
                    Class::Fatal
                }
                _ => Class::Transient { immediate: false },
            },
            Self::UnknownDisk { .. } | Self::BadChunkSize { .. } => Class::Fatal,
            Self::Promote { .. } => Class::Resync,
        }
    }

    /// The exit status of `sync --once` for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Tracking { .. } | Self::Promote { .. } => EXIT_STATE,
            Self::Session { source, .. } => source.exit_code(),
            Self::PlanFetch { source, .. } => source.exit_code(),
            _ => EXIT_OTHER,
        }
    }
}

/// What the replication commands share: the enrollment, the gateway, the settings.
#[derive(Debug)]
pub struct Context {
    /// The agent's name.
    pub agent: String,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The gateway's API client (mTLS).
    pub gateway: Gateway,
    /// TLS for the data port (the enrollment's mTLS).
    pub tls: rustls::ClientConfig,
    /// `[replication]`.
    pub replication: ReplicationConfig,
    /// `[failover]`: the source's stop command for planned failovers.
    pub failover: crate::disks::FailoverConfig,
    /// The bandwidth limit by local time of day (`[replication]`'s rates), for the sessions.
    pub throttle: Throttle,
    /// The local time the plan's `resync_window` is read with (the throttle's; tests set
    /// their own).
    pub clock: Clock,
    /// This machine's host name (a tag of every point).
    pub hostname: String,
    /// How progress is shown.
    pub style: Style,
}

impl Context {
    /// Loads the enrollment in `state_dir`; returns the context and the configured disks.
    pub fn load(state_dir: &Path, style: Style) -> Result<(Self, Vec<DiskConfig>), AgentError> {
        let loaded = StateDir::new(state_dir).load()?;
        let config = state_dir.join(crate::state::CONFIG_FILE);
        let schedule = loaded
            .file
            .replication
            .schedule()
            .map_err(|reason| StateError::Format {
                path: config.clone(),
                reason,
            })?;
        let url: Url =
            gateway::parse_base_url(&loaded.file.gateway).map_err(|e| StateError::Format {
                path: config,
                reason: format!("`gateway`: {e}"),
            })?;
        let tls = loaded.tls_config()?;
        let gw = Gateway::new(&url, tls.clone())?;
        let clock = Clock::system();
        Ok((
            Self {
                agent: loaded.file.agent.clone(),
                state_dir: state_dir.to_path_buf(),
                gateway: gw,
                tls,
                replication: loaded.file.replication.clone(),
                failover: loaded.file.failover.clone(),
                throttle: Throttle::new(schedule, clock.clone()),
                clock,
                hostname: crate::hostname(),
                style,
            },
            loaded.file.disk.clone(),
        ))
    }

    async fn plan(&self, disk: &DiskConfig) -> Result<ReplicationPlan, SyncError> {
        self.gateway
            .replication_plan(&disk.item)
            .await
            .map_err(|source| SyncError::PlanFetch {
                disk: disk.label(),
                item: disk.item.clone(),
                source,
            })
    }
}

/// How one cycle runs.
#[derive(Debug, Clone)]
pub struct CycleOptions {
    /// How long to wait for `PointCommitted` after the acknowledgement (0: not at all).
    pub commit_timeout: Duration,
    /// Failed attempts without progress before giving up (`None`: never).
    pub max_failures: Option<usize>,
    /// Take an application-consistent view (if the disk has app commands).
    pub app: bool,
}

/// What a resync compared and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncCount {
    /// Chunks compared with digests of what the gateway holds (the replica's own, or the
    /// committed ones of a delta turned resync by the threshold); 0 when every chunk was sent.
    pub compared_chunks: u64,
    /// Chunks sent: `Chunk` frames and chunks in `Zero` ranges.
    pub sent_chunks: u64,
}

/// What planning a new cycle found, for its outcome (nothing for a resumed cycle).
#[derive(Debug, Default)]
struct Planned {
    resync: Option<ResyncCount>,
    change_list: Option<ChangeListUse>,
}

/// How a delta used its change list (`crate::source`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangeListUse {
    /// Changed ranges the document listed (merged).
    pub ranges: u64,
    /// Chunks read from the view.
    pub read_chunks: u64,
    /// Chunks the document did not touch: neither read nor sent.
    pub unlisted_chunks: u64,
    /// Why the command or its document failed (every allocated chunk was read instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a new cycle is planned against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanBase {
    /// Nothing: every chunk is sent.
    None,
    /// The committed digests (a delta).
    Committed,
    /// The replica's digests in the cycle directory (a checksum-based resync).
    Replica,
}

/// Why a new cycle is a resync the agent decided itself (one the operator asked for is not
/// deferred, so it needs no reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// No committed digests describe the gateway's last cycle (never kept, lost, or dropped
    /// after a failure).
    TrackingLost,
    /// The committed digests are damaged.
    BaseDamaged,
    /// The disk's size or the chunk size changed.
    Geometry,
    /// The changes exceed the plan's `resync_threshold_percent` of the disk.
    Threshold,
}

impl ResyncReason {
    /// The log's and the report's name: `tracking_lost`, `base_damaged`, `geometry_changed`,
    /// `threshold`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TrackingLost => "tracking_lost",
            Self::BaseDamaged => "base_damaged",
            Self::Geometry => "geometry_changed",
            Self::Threshold => "threshold",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::TrackingLost => "change tracking lost",
            Self::BaseDamaged => "change tracking damaged",
            Self::Geometry => "the disk's size or chunk size changed",
            Self::Threshold => "changes over the resync threshold",
        }
    }
}

/// How a cycle ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CycleOutcome {
    /// The operator paused the item: nothing was sent.
    Paused,
    /// A planned failover is under way and this disk already sent its final cycle for it:
    /// nothing was sent.
    FinalCycleSent {
        /// The planned failover's job.
        job: String,
    },
    /// The cycle would be a resync for `reason`, and the local time is outside the plan's
    /// resync window: nothing was sent (no `Hello`); the next attempt plans again.
    Deferred {
        /// Why the cycle would be a resync.
        reason: ResyncReason,
        /// The window, as [`TimeWindow::describe`] shows it (`fri 22:00-06:00`).
        window: String,
        /// When it opens next, local time (`fri 22:00`).
        opens_at: String,
        /// Seconds until then.
        opens_in_seconds: u32,
    },
    /// The cycle's `EndOfCycle` is acknowledged.
    Done {
        /// The cycle.
        cycle: u64,
        /// Its kind.
        kind: CycleKind,
        /// Application-consistent.
        app: bool,
        /// Its data frames.
        data_frames: u64,
        /// Chunk bytes it carried.
        chunk_bytes: u64,
        /// A resync planned by this run: what it compared and sent.
        resync: Option<ResyncCount>,
        /// A delta planned by this run with the disk's `changes` command: what it read.
        change_list: Option<ChangeListUse>,
        /// What became of the point.
        commit: Commit,
    },
}

/// The tag naming how the disk was read (`raw`, `vmdk`, `vhdx`, `vhd`); a cycle recorded
/// without it was read `raw`.
pub const FORMAT_TAG: &str = "ferry.format";

/// The tag of a final cycle before a planned failover (value: the failover's job id); the
/// gateway's failover job waits for a point carrying it.
pub const FINAL_CYCLE_TAG: &str = "ferry.final_cycle";

/// After a disk's final cycle (or a run that found it sent): once every configured disk of
/// `item` sent its final cycle for planned failover `job`, runs `[failover] stop_command`
/// — once per job: a marker written before it runs keeps a restarted agent (or a rebooted
/// source) from running it again.
pub async fn after_final_cycle(ctx: &Context, item: &str, job: &str) {
    let Ok(disks) = crate::disks::list(&ctx.state_dir) else {
        return;
    };
    let all = disks
        .iter()
        .filter(|d| d.item == item)
        .all(|d| crate::tracking::final_cycle_sent(&ctx.state_dir, item, &d.name, job));
    if !all {
        return;
    }
    let argv = &ctx.failover.stop_command;
    if argv.is_empty() {
        progress::log(&[
            ("event", "source_stop_skipped"),
            ("item", item),
            ("job", job),
            (
                "note",
                "every disk sent its final cycle; no [failover] stop_command is configured: stop the source yourself",
            ),
        ]);
        return;
    }
    run_once(ctx, item, job, "source-stopped", "stop_command", argv).await;
}

/// Runs `[failover] <what>` for planned failover `job` of `item` at most once: a marker
/// `disks/<item>/<marker>-<job>` is created exclusively (`O_EXCL`) and made durable before
/// the command runs, so two disk loops finishing together, a restarted agent or a rebooted
/// source never run it twice. Logs `event=<what>_ran` or `<what>_failed`.
async fn run_once(
    ctx: &Context,
    item: &str,
    job: &str,
    marker: &str,
    what: &'static str,
    argv: &[String],
) {
    let dir = ctx.state_dir.join(crate::tracking::DISKS_DIR).join(item);
    let path = dir.join(format!("{marker}-{job}"));
    let created = std::fs::create_dir_all(&dir)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
        })
        .and_then(|f| f.sync_all())
        .and_then(|()| std::fs::File::open(&dir)?.sync_all());
    match created {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return,
        Err(e) => {
            progress::log(&[
                ("event", "failover_command_failed"),
                ("command", what),
                ("item", item),
                ("job", job),
                ("error", &format!("recording it in {}: {e}", path.display())),
            ]);
            return;
        }
    }
    match crate::view::run_command(item, what, argv).await {
        Ok(()) => progress::log(&[
            ("event", "failover_command_ran"),
            ("command", what),
            ("item", item),
            ("job", job),
            ("program", &argv[0]),
        ]),
        Err(e) => progress::log(&[
            ("event", "failover_command_failed"),
            ("command", what),
            ("item", item),
            ("job", job),
            ("error", &e.to_string()),
        ]),
    }
}

fn tracking(disk: &str) -> impl FnOnce(TrackingError) -> SyncError + '_ {
    move |source| SyncError::Tracking {
        disk: disk.to_string(),
        source,
    }
}

/// Runs one cycle of `disk` under `plan` (see the module documentation).
pub async fn run_cycle(
    ctx: &Context,
    disk: &DiskConfig,
    plan: &ReplicationPlan,
    st: &DiskState,
    opts: &CycleOptions,
    stop: &Stop,
) -> Result<CycleOutcome, SyncError> {
    let label = disk.label();
    if plan.paused {
        return Ok(CycleOutcome::Paused);
    }
    if let Some(job) = &plan.final_cycle
        && crate::tracking::final_cycle_sent(&ctx.state_dir, &disk.item, &disk.name, job)
    {
        return Ok(CycleOutcome::FinalCycleSent { job: job.clone() });
    }
    // Before the first final cycle of the item: stop the workload, so the final cycle holds
    // every write (once per job).
    if let Some(job) = &plan.final_cycle
        && !ctx.failover.quiesce_command.is_empty()
    {
        run_once(
            ctx,
            &disk.item,
            job,
            "quiesced",
            "quiesce_command",
            &ctx.failover.quiesce_command,
        )
        .await;
    }
    // The final cycle before a planned failover is application-consistent where it can be.
    let final_opts;
    let opts = if plan.final_cycle.is_some() && disk.app_consistent() && !opts.app {
        final_opts = CycleOptions {
            app: true,
            ..opts.clone()
        };
        &final_opts
    } else {
        opts
    };
    let port = plan.data_port.ok_or_else(|| SyncError::NoProcessRole {
        disk: label.clone(),
        item: disk.item.clone(),
    })?;
    let pd = plan
        .disks
        .iter()
        .find(|d| d.name == disk.name)
        .ok_or_else(|| SyncError::UnknownDisk {
            disk: label.clone(),
            item: disk.item.clone(),
            name: disk.name.clone(),
            known: if plan.disks.is_empty() {
                "none".into()
            } else {
                plan.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;
    let cs = pd.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
        return Err(SyncError::BadChunkSize {
            disk: label,
            chunk_size: cs,
        });
    }
    let mut connector =
        TlsConnector::new(ctx.gateway.host(), port, ctx.tls.clone()).map_err(|source| {
            SyncError::Session {
                disk: label.clone(),
                cycle: 0,
                source,
            }
        })?;
    if let Some(a) = &ctx.replication.data_address
        && let Ok((host, port)) = crate::disks::parse_address(a)
    {
        connector.dial_via(&host, port);
    }
    let c = Cycle {
        ctx,
        disk,
        plan,
        pd,
        st,
        opts,
        stop,
        label,
    };
    if let Some(rec) = st.settle().map_err(tracking(&c.label))? {
        // A final cycle interrupted and resumed is as final as a new one.
        let final_job = plan.final_cycle.as_ref().filter(|j| {
            rec.tags
                .iter()
                .any(|(k, v)| k == FINAL_CYCLE_TAG && v == *j)
        });
        if let Some(done) = c.resume_or_settle(rec, &mut connector).await? {
            if let (CycleOutcome::Done { .. }, Some(job)) = (&done, final_job) {
                st.mark_final_cycle(job).map_err(tracking(&c.label))?;
                progress::log(&[
                    ("event", "final_cycle_sent"),
                    ("disk", &c.label),
                    ("job", job),
                ]);
            }
            return Ok(done);
        }
    }
    let mut renumbered = 0;
    loop {
        match c.new_cycle(&mut connector).await {
            Err(SyncError::Session {
                source:
                    SessionError::ForeignCycle {
                        cycle,
                        resume_from_seq,
                    },
                ..
            }) if renumbered < MAX_RENUMBER => {
                renumbered += 1;
                let (cs, rs) = (cycle.to_string(), resume_from_seq.to_string());
                progress::log(&[
                    ("event", "cycle_renumbered"),
                    ("disk", &c.label),
                    ("cycle", &cs),
                    ("gateway_resume_from_seq", &rs),
                ]);
                st.raise_floor(cycle).map_err(tracking(&c.label))?;
            }
            r => {
                // `new_cycle` tagged it as the final cycle: once acknowledged, it is sent.
                if let (Ok(CycleOutcome::Done { cycle, .. }), Some(job)) = (&r, &plan.final_cycle) {
                    st.mark_final_cycle(job).map_err(tracking(&c.label))?;
                    let cs = cycle.to_string();
                    progress::log(&[
                        ("event", "final_cycle_sent"),
                        ("disk", &c.label),
                        ("cycle", &cs),
                        ("job", job),
                    ]);
                }
                return r;
            }
        }
    }
}

/// One disk's cycle under way.
struct Cycle<'a> {
    ctx: &'a Context,
    disk: &'a DiskConfig,
    plan: &'a ReplicationPlan,
    pd: &'a PlanDisk,
    st: &'a DiskState,
    opts: &'a CycleOptions,
    stop: &'a Stop,
    label: String,
}

impl Cycle<'_> {
    /// Abandons the recorded cycle: its clone or snapshot volume removed, its directory too
    /// (its number stays used: the floor).
    async fn abandon(&self, rec: &CycleRecord, why: &str) -> Result<(), SyncError> {
        let c = rec.cycle.to_string();
        progress::log(&[
            ("event", "cycle_abandoned"),
            ("disk", &self.label),
            ("cycle", &c),
            ("reason", why),
        ]);
        if let Err(e) = view::release_handle(
            &self.label,
            self.disk.snapshot,
            &self.st.cycle_dir(),
            &rec.view,
        )
        .await
        {
            progress::log(&[
                ("event", "view_release_failed"),
                ("disk", &self.label),
                ("error", &e.to_string()),
            ]);
        }
        self.st
            .raise_floor(rec.cycle)
            .map_err(tracking(&self.label))?;
        self.st.discard_cycle().map_err(tracking(&self.label))
    }

    /// A cycle an earlier run left: promoted, resumed, or abandoned. `Some` when it was
    /// resumed to its end.
    async fn resume_or_settle(
        &self,
        rec: CycleRecord,
        connector: &mut TlsConnector,
    ) -> Result<Option<CycleOutcome>, SyncError> {
        let gateway_has = self.pd.last_complete_cycle;
        if rec.phase == Phase::Preparing {
            self.abandon(&rec, "it was never planned (interrupted while preparing)")
                .await?;
            return Ok(None);
        }
        if gateway_has == Some(rec.cycle) {
            // Its EndOfCycle is durable at the gateway: the acknowledgement was lost.
            let _ = view::release_handle(
                &self.label,
                self.disk.snapshot,
                &self.st.cycle_dir(),
                &rec.view,
            )
            .await;
            match self.st.promote(&rec) {
                Ok(_) => {
                    let c = rec.cycle.to_string();
                    progress::log(&[
                        ("event", "cycle_committed_late"),
                        ("disk", &self.label),
                        ("cycle", &c),
                    ]);
                }
                Err(e) => {
                    self.st.drop_tracking().map_err(tracking(&self.label))?;
                    self.abandon(&rec, &format!("its digests cannot be committed: {e}"))
                        .await?;
                }
            }
            return Ok(None);
        }
        if gateway_has.is_some_and(|g| g > rec.cycle) {
            self.abandon(&rec, "the gateway holds a newer cycle")
                .await?;
            return Ok(None);
        }
        if rec.chunk_size != self.pd.chunk_size {
            self.abandon(&rec, "the plan's chunk size changed").await?;
            return Ok(None);
        }
        // The plan was made reading the disk one way; a resume must read it the same way.
        let recorded = rec
            .tags
            .iter()
            .find(|(k, _)| k == FORMAT_TAG)
            .map_or("raw", |(_, v)| v.as_str());
        if recorded != self.disk.format {
            self.abandon(&rec, "the disk's format changed").await?;
            return Ok(None);
        }
        let cycle_dir = self.st.cycle_dir();
        let view = match View::reopen(self.disk, &cycle_dir, &rec.view, rec.consistency).await {
            Ok(Some(v)) if v.size() == rec.disk_size => v,
            Ok(Some(v)) => {
                drop(v);
                self.abandon(&rec, "the disk changed size").await?;
                return Ok(None);
            }
            Ok(None) => {
                self.abandon(&rec, "its point-in-time view is gone").await?;
                return Ok(None);
            }
            Err(e) => {
                self.abandon(&rec, &e.to_string()).await?;
                return Ok(None);
            }
        };
        let geo = Geometry {
            disk_size: rec.disk_size,
            chunk_size: rec.chunk_size,
        };
        let frames = CycleFrames::open(
            &self.st.plan_path(),
            true,
            view.reader(),
            view.path(),
            &self.st.pending_digests_path(&rec),
            geo,
            Ending {
                consistency: rec.consistency,
                snapshot: rec.snapshot,
                tags: rec.tags.clone(),
            },
        )
        .map_err(|e| ViewError::Io {
            disk: self.label.clone(),
            action: "resume the plan in",
            path: self.st.cycle_dir(),
            source: std::io::Error::other(e.to_string()),
        });
        let frames = match frames {
            Ok(f) => f,
            Err(e) => {
                let _ = view.release(&cycle_dir, true).await;
                self.abandon(&rec, &e.to_string()).await?;
                return Ok(None);
            }
        };
        let c = rec.cycle.to_string();
        let a = rec.last_acked_seq.to_string();
        progress::log(&[
            ("event", "cycle_resumed"),
            ("disk", &self.label),
            ("cycle", &c),
            ("last_acked_seq", &a),
        ]);
        self.send(rec, view, frames, connector, false, Planned::default())
            .await
            .map(Some)
    }

    /// Plans and sends a new cycle.
    async fn new_cycle(&self, connector: &mut TlsConnector) -> Result<CycleOutcome, SyncError> {
        let st = self.st;
        let gateway_has = self.pd.last_complete_cycle;
        let mut damaged = false;
        let committed = match st.committed() {
            Ok(h) => h,
            Err(TrackingError::Damaged { .. } | TrackingError::Version { .. }) => {
                st.drop_tracking().map_err(tracking(&self.label))?;
                damaged = true;
                None
            }
            Err(e) => return Err(tracking(&self.label)(e)),
        };
        // A resync known now (the committed digests cannot describe the gateway's cycle at
        // the disk's live size) waits for its window before anything is taken or asked.
        let live = match gateway_has {
            Some(_) => view::disk_size(self.disk).await.ok(),
            None => None,
        };
        let resync_ahead = gateway_has.is_some()
            && live.is_some_and(|l| !committed.as_ref().is_some_and(|h| self.base_fits(h, l)));
        if resync_ahead
            && let Some(d) = self.deferral(self.resync_reason(committed.as_ref(), damaged))
        {
            return Ok(d);
        }
        let floor = st.floor().unwrap_or(0);
        let cycle = committed
            .map_or(0, |h| h.cycle)
            .max(gateway_has.unwrap_or(0))
            .max(floor)
            + 1;
        let app = self.opts.app && self.disk.app_consistent();
        let cycle_dir = st.cycle_dir();
        let mut rec = CycleRecord {
            chunk_size: self.pd.chunk_size,
            disk_size: 0,
            cycle,
            base_cycle: 0,
            data_frames: 0,
            last_acked_seq: 0,
            chunk_bytes: 0,
            kind: CycleKind::Initial,
            consistency: ferry_proto::frame::Consistency::Crash,
            snapshot: self.disk.snapshot.wire(),
            phase: Phase::Preparing,
            view: predicted_handle(self.disk, cycle),
            digests: "digests".into(),
            tags: Vec::new(),
        };
        st.begin_cycle(&rec).map_err(tracking(&self.label))?;
        // A resync is planned against the replica's digests, asked for before the view is
        // taken: the gateway reads its point to answer, and no freeze or snapshot is held
        // meanwhile. The disk's live size stands for the view's (checked again after).
        let mut replica: Option<Option<ferry_proto::digests::Header>> = None;
        if resync_ahead && let Some(live) = live {
            let geo = Geometry {
                disk_size: live,
                chunk_size: self.pd.chunk_size,
            };
            replica = Some(self.fetch_replica(geo).await);
        }
        let view = match View::take(self.disk, &cycle_dir, cycle, app).await {
            Ok(v) => v,
            Err(source) => {
                let _ = st.discard_cycle();
                return Err(SyncError::View { cycle, source });
            }
        };
        let size = view.size();
        if size != self.pd.size_bytes {
            let (a, b) = (size.to_string(), self.pd.size_bytes.to_string());
            progress::log(&[
                ("event", "size_mismatch"),
                ("disk", &self.label),
                ("local_bytes", &a),
                ("declared_bytes", &b),
                ("note", "the local size is sent"),
            ]);
        }
        let geo = Geometry {
            disk_size: size,
            chunk_size: self.pd.chunk_size,
        };
        let base = committed.filter(|h| self.base_fits(h, geo.disk_size));
        let mut kind = match (gateway_has, base) {
            (None, _) => CycleKind::Initial,
            (Some(_), Some(_)) => CycleKind::Delta,
            (Some(_), None) => CycleKind::Resync,
        };
        // Not foreseen above (the live size could not be read, or the view's differs).
        if kind == CycleKind::Resync
            && !resync_ahead
            && let Some(d) = self.deferral(self.resync_reason(committed.as_ref(), damaged))
        {
            return self.defer_taken(view, d).await;
        }
        let replica_path = st.replica_digests_path();
        let mut choice = if base.is_some() {
            PlanBase::Committed
        } else if kind == CycleKind::Resync {
            self.replica_base(geo, replica.take()).await
        } else {
            PlanBase::None
        };
        if choice != PlanBase::Replica {
            resync::remove(&replica_path);
        }
        let changes = match (choice, base) {
            (PlanBase::Committed, Some(b)) => {
                let c = source::ChangesContext {
                    disk: self.disk,
                    view_path: view.path(),
                    cycle,
                    base_cycle: b.cycle,
                };
                source::change_list(&view.reader(), &c).await
            }
            _ => ChangeList::None,
        };
        if let ChangeList::Failed(why) = &changes {
            progress::log(&[
                ("event", "change_list_failed"),
                ("disk", &self.label),
                ("error", why),
                ("note", "every allocated chunk is read and compared instead"),
            ]);
        }
        let summary = loop {
            let listed = match (&changes, choice) {
                (ChangeList::Ranges(r), PlanBase::Committed) => Some(r.clone()),
                _ => None,
            };
            match self.plan_frames(&view, geo, cycle, choice, listed).await {
                Ok(s) => break s,
                Err(PlanError::BaseDamaged(e)) if choice == PlanBase::Committed => {
                    progress::log(&[
                        ("event", "base_damaged"),
                        ("disk", &self.label),
                        ("error", &e.to_string()),
                    ]);
                    st.drop_tracking().map_err(tracking(&self.label))?;
                    if kind == CycleKind::Delta {
                        kind = CycleKind::Resync;
                        if let Some(d) = self.deferral(ResyncReason::BaseDamaged) {
                            return self.defer_taken(view, d).await;
                        }
                    }
                    choice = self.replica_base(geo, None).await;
                }
                Err(PlanError::ReplicaDigests { path, source }) if choice == PlanBase::Replica => {
                    self.unusable(&Unusable::Refused { path, source });
                    resync::remove(&replica_path);
                    choice = PlanBase::None;
                }
                Err(source) => {
                    resync::remove(&replica_path);
                    return Err(self.fail_planning(view, cycle, source).await);
                }
            }
        };
        resync::remove(&replica_path);
        let base_cycle = if kind == CycleKind::Delta {
            base.map_or(0, |h| h.cycle)
        } else {
            0
        };
        if kind == CycleKind::Delta {
            let limit = u128::from(self.plan.resync_threshold_percent.min(100)) * u128::from(size);
            if u128::from(summary.changed_bytes) * 100 > limit {
                kind = CycleKind::Resync;
                let (c, p) = (
                    summary.changed_bytes.to_string(),
                    self.plan.resync_threshold_percent.to_string(),
                );
                progress::log(&[
                    ("event", "resync_threshold"),
                    ("disk", &self.label),
                    ("changed_bytes", &c),
                    ("threshold_percent", &p),
                ]);
                // The committed digests stay: the next attempt plans the delta again.
                if let Some(d) = self.deferral(ResyncReason::Threshold) {
                    return self.defer_taken(view, d).await;
                }
            }
        }
        let resync = (kind == CycleKind::Resync).then(|| ResyncCount {
            compared_chunks: summary.compared_chunks,
            sent_chunks: summary.sent_chunks(),
        });
        // A delta turned resync (its base damaged) planned without the list.
        let changes = if choice == PlanBase::Committed {
            changes
        } else {
            ChangeList::None
        };
        let change_list = match changes {
            ChangeList::None => None,
            ChangeList::Ranges(r) => Some(ChangeListUse {
                ranges: r.len() as u64,
                read_chunks: summary.read_chunks,
                unlisted_chunks: summary.unlisted_chunks,
                error: None,
            }),
            ChangeList::Failed(why) => Some(ChangeListUse {
                ranges: 0,
                read_chunks: summary.read_chunks,
                unlisted_chunks: 0,
                error: Some(why),
            }),
        };
        let mut tags = vec![
            (
                "ferry.agent_version".to_string(),
                crate::VERSION.to_string(),
            ),
            ("ferry.host".to_string(), self.ctx.hostname.clone()),
            ("ferry.kind".to_string(), kind.as_str().to_string()),
            (FORMAT_TAG.to_string(), self.disk.format.clone()),
        ];
        if view.consistency() == ferry_proto::frame::Consistency::App {
            tags.push(("ferry.app_pre".to_string(), self.disk.app_pre[0].clone()));
        }
        if let Some(job) = &self.plan.final_cycle {
            tags.push((FINAL_CYCLE_TAG.to_string(), job.clone()));
        }
        for (_, v) in &mut tags {
            v.truncate(v.floor_char_boundary(1024));
        }
        rec.disk_size = size;
        rec.base_cycle = base_cycle;
        rec.data_frames = summary.data_frames;
        rec.chunk_bytes = summary.chunk_bytes;
        rec.kind = kind;
        rec.consistency = view.consistency();
        rec.phase = Phase::Planned;
        rec.view = view.handle().to_string();
        rec.tags = tags;
        if let Err(e) = st.write_record(&rec) {
            let _ = view.release(&cycle_dir, true).await;
            let _ = st.discard_cycle();
            return Err(tracking(&self.label)(e));
        }
        let opened = CycleFrames::open(
            &st.plan_path(),
            false,
            view.reader(),
            view.path(),
            &st.pending_digests_path(&rec),
            geo,
            Ending {
                consistency: rec.consistency,
                snapshot: rec.snapshot,
                tags: rec.tags.clone(),
            },
        )
        .map_err(|source| SyncError::Plan {
            disk: self.label.clone(),
            cycle,
            source,
        });
        let frames = match opened {
            Ok(f) => f,
            Err(e) => {
                let _ = view.release(&cycle_dir, true).await;
                let _ = st.discard_cycle();
                return Err(e);
            }
        };
        let planned = Planned {
            resync,
            change_list,
        };
        self.send(rec, view, frames, connector, true, planned).await
    }

    /// Why a new cycle with the committed digests `committed` (`damaged`: dropped because they
    /// were) is a resync, the operator not having asked for one.
    fn resync_reason(&self, committed: Option<&DigestsHeader>, damaged: bool) -> ResyncReason {
        match committed {
            _ if damaged => ResyncReason::BaseDamaged,
            Some(h) if Some(h.cycle) == self.pd.last_complete_cycle => ResyncReason::Geometry,
            _ => ResyncReason::TrackingLost,
        }
    }

    /// `Some` (said in the log) when a resync for `reason` must wait: the plan has a resync
    /// window, the operator did not ask for the resync, and the local time is outside the
    /// window. A window this agent cannot read is said and ignored (the resync runs).
    fn deferral(&self, reason: ResyncReason) -> Option<CycleOutcome> {
        // Neither a resync asked for nor a planned failover's final cycle waits.
        if self.plan.resync_requested || self.plan.final_cycle.is_some() {
            return None;
        }
        let w = self.plan.resync_window.as_ref()?;
        let window = match TimeWindow::parse(&w.from, &w.to, w.days.as_deref()) {
            Ok(window) => window,
            Err(e) => {
                progress::log(&[
                    ("event", "resync_window_unusable"),
                    ("disk", &self.label),
                    ("error", &e.to_string()),
                    ("note", "the resync is not deferred"),
                ]);
                return None;
            }
        };
        let now = self.ctx.clock.now();
        let (at, secs) = window.next_opening(now)?;
        let outcome = CycleOutcome::Deferred {
            reason,
            window: window.describe(),
            opens_at: at.describe(),
            opens_in_seconds: secs,
        };
        let (n, i) = (now.describe(), secs.to_string());
        progress::log(&[
            ("event", "resync_deferred"),
            ("disk", &self.label),
            ("reason", reason.as_str()),
            ("window", &window.describe()),
            ("local_time", &n),
            ("opens_at", &at.describe()),
            ("opens_in_seconds", &i),
        ]);
        Some(outcome)
    }

    /// Ends a cycle deferred after its view was taken: the view released, the cycle
    /// directory (record, plan, pending and replica digests) removed. The committed digests
    /// and the floor stay, so the next attempt plans anew with a new number.
    async fn defer_taken(
        &self,
        view: View,
        deferred: CycleOutcome,
    ) -> Result<CycleOutcome, SyncError> {
        let cycle_dir = self.st.cycle_dir();
        if let Err(e) = view.release(&cycle_dir, true).await {
            progress::log(&[
                ("event", "view_release_failed"),
                ("disk", &self.label),
                ("error", &e.to_string()),
            ]);
        }
        resync::remove(&self.st.replica_digests_path());
        self.st.discard_cycle().map_err(tracking(&self.label))?;
        Ok(deferred)
    }

    /// Whether the committed digests `h` describe what the gateway holds of the disk, at
    /// `disk_size` bytes: a delta can be planned against them.
    fn base_fits(&self, h: &DigestsHeader, disk_size: u64) -> bool {
        Some(h.cycle) == self.pd.last_complete_cycle
            && h.chunk_size == self.pd.chunk_size
            && h.disk_size == disk_size
            && !self.plan.resync_requested
    }

    /// Says why the replica's digests are not used (the resync sends every chunk).
    fn unusable(&self, e: &Unusable) {
        progress::log(&[
            ("event", "resync_digests_unusable"),
            ("disk", &self.label),
            ("reason", e.reason()),
            ("error", &e.to_string()),
            ("note", "the resync sends every chunk"),
        ]);
    }

    /// Fetches and checks the replica's digests for `geo` into the cycle directory; `None`
    /// (said why) when they cannot be had.
    async fn fetch_replica(&self, geo: Geometry) -> Option<ferry_proto::digests::Header> {
        let path = self.st.replica_digests_path();
        match resync::fetch(
            &self.ctx.gateway,
            &self.disk.item,
            &self.disk.name,
            geo,
            &path,
            self.stop,
        )
        .await
        {
            Ok(h) => {
                let n = h.count().to_string();
                progress::log(&[
                    ("event", "resync_digests"),
                    ("disk", &self.label),
                    ("point", &h.point),
                    ("chunks", &n),
                ]);
                Some(h)
            }
            Err(e) => {
                resync::remove(&path);
                self.unusable(&e);
                None
            }
        }
    }

    /// The base of a resync of `geo`: the replica's digests (`fetched` before the view was
    /// taken, else fetched now) when they describe `geo`, else nothing.
    async fn replica_base(
        &self,
        geo: Geometry,
        fetched: Option<Option<ferry_proto::digests::Header>>,
    ) -> PlanBase {
        let h = match fetched {
            Some(h) => h,
            None => self.fetch_replica(geo).await,
        };
        match h {
            Some(h) if (h.disk_size, h.chunk_size) == (geo.disk_size, geo.chunk_size) => {
                PlanBase::Replica
            }
            Some(h) => {
                self.unusable(&Unusable::Geometry {
                    point: h.point,
                    found_size: h.disk_size,
                    found_chunk: h.chunk_size,
                    disk_size: geo.disk_size,
                    chunk_size: geo.chunk_size,
                });
                resync::remove(&self.st.replica_digests_path());
                PlanBase::None
            }
            None => PlanBase::None,
        }
    }

    async fn fail_planning(&self, view: View, cycle: u64, source: PlanError) -> SyncError {
        let stopped = matches!(source, PlanError::Stopped);
        let _ = view.release(&self.st.cycle_dir(), true).await;
        if !stopped {
            let _ = self.st.discard_cycle();
        }
        SyncError::Plan {
            disk: self.label.clone(),
            cycle,
            source,
        }
    }

    /// Plans the cycle's frames on a blocking thread.
    async fn plan_frames(
        &self,
        view: &View,
        geo: Geometry,
        cycle: u64,
        base: PlanBase,
        changed: Option<Vec<std::ops::Range<u64>>>,
    ) -> Result<plan::PlanSummary, PlanError> {
        let reader = view.reader();
        let view_path = view.path().to_path_buf();
        let base_path = self.st.digests_path();
        let replica_path = self.st.replica_digests_path();
        let plan_path = self.st.plan_path();
        let digests_path = self.st.cycle_dir().join("digests");
        let flag = Arc::new(AtomicBool::new(self.stop.is_set()));
        let watcher = {
            let (flag, stop) = (flag.clone(), self.stop.clone());
            tokio::spawn(async move {
                stop.wait().await;
                flag.store(true, Ordering::Relaxed);
            })
        };
        let r = tokio::task::spawn_blocking(move || {
            let base = match base {
                PlanBase::None => None,
                PlanBase::Committed => Some(Base::Committed(
                    crate::tracking::DigestReader::open(&base_path)
                        .map_err(PlanError::BaseDamaged)?,
                )),
                PlanBase::Replica => Some(Base::replica(&replica_path)?),
            };
            plan::plan(
                &reader,
                &view_path,
                geo,
                cycle,
                base,
                changed.as_deref(),
                &plan_path,
                &digests_path,
                &flag,
            )
        })
        .await;
        watcher.abort();
        r.unwrap_or_else(|e| {
            Err(PlanError::Read {
                path: view.path().to_path_buf(),
                offset: 0,
                source: std::io::Error::other(format!("the planning thread failed: {e}")),
            })
        })
    }

    /// Sends a planned cycle and settles it by the outcome.
    async fn send(
        &self,
        mut rec: CycleRecord,
        view: View,
        frames: CycleFrames,
        connector: &mut TlsConnector,
        fresh: bool,
        planned: Planned,
    ) -> Result<CycleOutcome, SyncError> {
        let r = &self.ctx.replication;
        let cfg = SessionConfig {
            window_bytes: r.window_bytes,
            ack_timeout: Duration::from_secs(u64::from(r.ack_timeout_seconds)),
            throttle: self.ctx.throttle.clone(),
            retry_schedule: SessionConfig::schedule_from(&self.plan.retry_schedule_seconds),
            max_failures: self.opts.max_failures,
            busy_min: BUSY_MIN,
            busy_max: BUSY_MAX,
            // A frozen file system is never held across a wait.
            retry_in_session: !view.holds_freeze(),
        };
        let hello = HelloParams {
            agent: self.ctx.agent.clone(),
            item: self.disk.item.clone(),
            disk: self.disk.name.clone(),
            disk_size: rec.disk_size,
            chunk_size: rec.chunk_size,
            cycle: rec.cycle,
            kind: rec.kind,
        };
        // Frame bytes: chunks plus about 32 bytes of header per frame.
        let total = rec.chunk_bytes + 32 * rec.end_seq();
        let mut progress =
            Progress::new(self.ctx.style, &self.label, rec.cycle, total, rec.end_seq());
        progress.begin(rec.kind.as_str());
        let mut state = SessionState {
            last_acked: rec.last_acked_seq,
            fresh,
            connections: 0,
        };
        let result = session::replicate(
            connector,
            &frames,
            &hello,
            &cfg,
            &mut state,
            &mut progress,
            self.stop,
        )
        .await;
        drop(frames);
        let cycle_dir = self.st.cycle_dir();
        let cycle = rec.cycle;
        let acked = match result {
            Ok(a) => a,
            Err(source) => {
                progress.end(if matches!(source, SessionError::Stopped) {
                    "stopped"
                } else {
                    "failed"
                });
                rec.last_acked_seq = state.last_acked;
                let class = source.class();
                match (&source, class) {
                    (SessionError::ForeignCycle { .. }, _) | (_, Class::Fatal) => {
                        let _ = view.release(&cycle_dir, true).await;
                        let _ = self.st.discard_cycle();
                    }
                    (_, Class::Resync) => {
                        let _ = view.release(&cycle_dir, true).await;
                        let _ = self.st.discard_cycle();
                        self.st.drop_tracking().map_err(tracking(&self.label))?;
                    }
                    (_, Class::Stopped) => {
                        // The clone or snapshot stays for the resume; a freeze ends.
                        let _ = self.st.write_record(&rec);
                        let _ = view.release(&cycle_dir, false).await;
                    }
                    (_, Class::Transient { .. }) => {
                        // Kept: the record, plan and pending digests (the gateway may hold
                        // the EndOfCycle; the plan will say). A snapshot is not held for
                        // long: it goes, and the cycle resumes only from a live view.
                        let _ = self.st.write_record(&rec);
                        let _ = view.release(&cycle_dir, true).await;
                    }
                }
                return Err(SyncError::Session {
                    disk: self.label.clone(),
                    cycle,
                    source,
                });
            }
        };
        progress.end("acknowledged");
        let consistency = rec.consistency;
        if let Err(e) = view.release(&cycle_dir, true).await {
            progress::log(&[
                ("event", "view_release_failed"),
                ("disk", &self.label),
                ("error", &e.to_string()),
            ]);
        }
        if let Err(source) = self.st.promote(&rec) {
            let _ = self.st.drop_tracking();
            let _ = self.st.discard_cycle();
            return Err(SyncError::Promote {
                disk: self.label.clone(),
                cycle,
                source,
            });
        }
        let commit = if self.opts.commit_timeout.is_zero() {
            Commit::NotConfirmed("not waited for".into())
        } else {
            acked.wait_commit(self.opts.commit_timeout).await
        };
        Ok(CycleOutcome::Done {
            cycle,
            kind: rec.kind,
            app: consistency == ferry_proto::frame::Consistency::App,
            data_frames: rec.data_frames,
            chunk_bytes: rec.chunk_bytes,
            resync: planned.resync,
            change_list: planned.change_list,
            commit,
        })
    }
}

/// The view handle a cycle will record, known before the view is taken (so that a crash
/// while taking it still finds what to remove).
fn predicted_handle(disk: &DiskConfig, cycle: u64) -> String {
    match disk.snapshot {
        SnapshotMode::Reflink => VIEW_FILE.to_string(),
        SnapshotMode::Lvm => lvm_volume(&disk.path)
            .map(|(vg, lv)| format!("{vg}/{lv}-ferry-c{cycle}"))
            .unwrap_or_default(),
        SnapshotMode::None | SnapshotMode::Quiesce => String::new(),
    }
}

// --- sync --once -------------------------------------------------------------------------------

/// What `ferry-agent sync --once` is asked.
#[derive(Debug, Clone)]
pub struct SyncArgs {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Only this item's disks.
    pub item: Option<String>,
    /// Only disks of this name.
    pub disk: Option<String>,
    /// How long to wait for `PointCommitted`.
    pub commit_timeout: Duration,
}

/// One disk's result, as `sync --once` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// The item.
    pub item: String,
    /// The disk.
    pub disk: String,
    /// `committed`, `acknowledged`, `paused`, `deferred` or `failed`.
    pub status: &'static str,
    /// The cycle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cycle: Option<u64>,
    /// Its kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// `crash` or `app`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistency: Option<&'static str>,
    /// The recovery point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub point_id: Option<String>,
    /// Data frames of the cycle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_frames: Option<u64>,
    /// Chunk bytes the cycle carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_bytes: Option<u64>,
    /// A resync: chunks compared with the digests of what the gateway holds (0 when the
    /// replica's digests could not be used and every chunk was sent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_compared_chunks: Option<u64>,
    /// A resync: chunks sent (`Chunk` frames and chunks in `Zero` ranges).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_sent_chunks: Option<u64>,
    /// A delta with a `changes` command: the change list's use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_list: Option<ChangeListUse>,
    /// A deferred resync: why it is needed (`tracking_lost`, `base_damaged`,
    /// `geometry_changed`, `threshold`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_reason: Option<&'static str>,
    /// A deferred resync: seconds until the resync window opens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resync_window_opens_in_seconds: Option<u32>,
    /// Why the point is not confirmed, or why the disk failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The exit status this result asks for (0 unless failed).
    #[serde(skip)]
    pub exit_code: u8,
}

impl DiskReport {
    fn new(disk: &DiskConfig, status: &'static str) -> Self {
        Self {
            item: disk.item.clone(),
            disk: disk.name.clone(),
            status,
            cycle: None,
            kind: None,
            consistency: None,
            point_id: None,
            data_frames: None,
            chunk_bytes: None,
            resync_compared_chunks: None,
            resync_sent_chunks: None,
            change_list: None,
            resync_reason: None,
            resync_window_opens_in_seconds: None,
            message: None,
            exit_code: 0,
        }
    }

    fn from_outcome(disk: &DiskConfig, o: CycleOutcome) -> Self {
        match o {
            CycleOutcome::FinalCycleSent { job } => {
                let mut r = Self::new(disk, "final_cycle_sent");
                r.message = Some(format!(
                    "the final cycle for planned failover {job} was sent; nothing more is sent for the item"
                ));
                r
            }
            CycleOutcome::Paused => {
                let mut r = Self::new(disk, "paused");
                r.message = Some(
                    "replication of the item is paused by the operator; nothing was sent".into(),
                );
                r
            }
            CycleOutcome::Deferred {
                reason,
                window,
                opens_at,
                opens_in_seconds,
            } => {
                let mut r = Self::new(disk, "deferred");
                r.kind = Some(CycleKind::Resync.as_str());
                r.resync_reason = Some(reason.as_str());
                r.resync_window_opens_in_seconds = Some(opens_in_seconds);
                r.message = Some(format!(
                    "the resync ({}) waits for the resync window {window} (local time): it opens \
                     {opens_at}, in {}; nothing was sent",
                    reason.describe(),
                    span(opens_in_seconds)
                ));
                r
            }
            CycleOutcome::Done {
                cycle,
                kind,
                app,
                data_frames,
                chunk_bytes,
                resync,
                change_list,
                commit,
            } => {
                let mut r = match commit {
                    Commit::Committed(p) => {
                        let mut r = Self::new(disk, "committed");
                        r.point_id = Some(p);
                        r
                    }
                    Commit::NotConfirmed(why) => {
                        let mut r = Self::new(disk, "acknowledged");
                        r.message = Some(format!(
                            "the gateway acknowledged the cycle; the point is not confirmed yet ({why})"
                        ));
                        r
                    }
                };
                r.cycle = Some(cycle);
                r.kind = Some(kind.as_str());
                r.consistency = Some(if app { "app" } else { "crash" });
                r.data_frames = Some(data_frames);
                r.chunk_bytes = Some(chunk_bytes);
                r.resync_compared_chunks = resync.map(|c| c.compared_chunks);
                r.resync_sent_chunks = resync.map(|c| c.sent_chunks);
                r.change_list = change_list;
                r
            }
        }
    }

    fn failed(disk: &DiskConfig, e: &SyncError) -> Self {
        let mut r = Self::new(disk, "failed");
        r.message = Some(e.to_string());
        r.exit_code = e.exit_code();
        if let SyncError::Session { cycle, .. } | SyncError::Plan { cycle, .. } = e {
            r.cycle = Some(*cycle).filter(|c| *c > 0);
        }
        r
    }

    /// One line for people: `item/disk cycle N → point ID`, or what happened instead.
    pub fn line(&self) -> String {
        let who = format!("{}/{}", self.item, self.disk);
        match (self.status, self.cycle, &self.point_id) {
            ("committed", Some(c), Some(p)) => format!("{who} cycle {c} → point {p}"),
            ("acknowledged", Some(c), _) => format!(
                "{who} cycle {c} acknowledged; point not yet confirmed ({})",
                self.message.as_deref().unwrap_or("")
            ),
            ("paused", ..) => format!("{who}: paused by the operator, nothing sent"),
            ("final_cycle_sent", ..) => format!(
                "{who}: {}",
                self.message.as_deref().unwrap_or("final cycle sent")
            ),
            ("deferred", ..) => format!(
                "{who}: resync deferred: {}",
                self.message.as_deref().unwrap_or("")
            ),
            _ => format!(
                "{who}: failed: {}",
                self.message.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}

/// `2h 05m`, `7m`, `1d 3h`: a wait for people.
fn span(seconds: u32) -> String {
    let m = seconds.div_ceil(60);
    match (m / 1440, m / 60 % 24, m % 60) {
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m:02}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

/// Chooses the disks `item` / `disk` select; none configured (in `state_dir`) is a state
/// problem.
pub fn select<'a>(
    state_dir: &Path,
    disks: &'a [DiskConfig],
    item: Option<&str>,
    disk: Option<&str>,
) -> Result<Vec<&'a DiskConfig>, AgentError> {
    if disks.is_empty() {
        return Err(StateError::Format {
            path: state_dir.join(crate::state::CONFIG_FILE),
            reason:
                "no disk is configured: `ferry-agent disk add ITEM DISK PATH` (or `enroll --disk`)"
                    .into(),
        }
        .into());
    }
    let chosen: Vec<&DiskConfig> = disks
        .iter()
        .filter(|d| item.is_none_or(|i| d.item == i) && disk.is_none_or(|n| d.name == n))
        .collect();
    if chosen.is_empty() {
        let all: Vec<String> = disks.iter().map(DiskConfig::label).collect();
        return Err(AgentError::Usage(format!(
            "no configured disk matches{}{} (configured: {})",
            item.map(|i| format!(" --item {i}")).unwrap_or_default(),
            disk.map(|d| format!(" --disk {d}")).unwrap_or_default(),
            all.join(", ")
        )));
    }
    Ok(chosen)
}

/// `ferry-agent sync --once`: one cycle of each selected disk, one after the other. A disk's
/// failure is in its report; the others still run.
pub async fn sync_once(args: &SyncArgs, stop: &Stop) -> Result<Vec<DiskReport>, AgentError> {
    let (ctx, disks) = Context::load(&args.state_dir, Style::detect())?;
    let chosen = select(
        &args.state_dir,
        &disks,
        args.item.as_deref(),
        args.disk.as_deref(),
    )?;
    // Plans are read once per item; a failed read is tried again for the next disk.
    let mut plans: HashMap<String, ReplicationPlan> = HashMap::new();
    let mut reports = Vec::new();
    for disk in chosen {
        if stop.is_set() {
            break;
        }
        let plan = match plans.get(&disk.item) {
            Some(p) => p.clone(),
            None => match ctx.plan(disk).await {
                Ok(p) => {
                    plans.insert(disk.item.clone(), p.clone());
                    p
                }
                Err(e) => {
                    reports.push(DiskReport::failed(disk, &e));
                    continue;
                }
            },
        };
        let st = match DiskState::open(&ctx.state_dir, &disk.item, &disk.name) {
            Ok(s) => s,
            Err(e) => {
                reports.push(DiskReport::failed(disk, &tracking(&disk.label())(e)));
                continue;
            }
        };
        let opts = CycleOptions {
            commit_timeout: args.commit_timeout,
            max_failures: Some(SessionConfig::schedule_from(&plan.retry_schedule_seconds).len()),
            app: plan.app_consistent_frequency_minutes > 0,
        };
        let r = run_cycle(&ctx, disk, &plan, &st, &opts, stop).await;
        if let (Some(job), Ok(CycleOutcome::Done { .. } | CycleOutcome::FinalCycleSent { .. })) =
            (&plan.final_cycle, &r)
        {
            after_final_cycle(&ctx, &disk.item, job).await;
        }
        reports.push(match r {
            Ok(o) => DiskReport::from_outcome(disk, o),
            Err(e) => DiskReport::failed(disk, &e),
        });
    }
    Ok(reports)
}

// --- run ---------------------------------------------------------------------------------------

/// `ferry-agent run`: every configured disk, a cycle every `cycle_interval_seconds` (the plan
/// is read again each time), until `stop`. A disk's fatal error stops that disk only; the
/// command fails when every disk stopped that way.
pub async fn run_service(state_dir: &Path, stop: &Stop) -> Result<(), AgentError> {
    let (ctx, disks) = Context::load(state_dir, Style::Log)?;
    let chosen: Vec<DiskConfig> = select(state_dir, &disks, None, None)?
        .into_iter()
        .cloned()
        .collect();
    let ctx = Arc::new(ctx);
    let n = chosen.len().to_string();
    progress::log(&[
        ("event", "service_start"),
        ("agent", &ctx.agent),
        ("disks", &n),
        ("version", crate::VERSION),
    ]);
    let mut tasks = tokio::task::JoinSet::new();
    for disk in chosen {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        tasks.spawn(async move { disk_loop(&ctx, &disk, &stop).await });
    }
    let mut first_fatal = None;
    let mut fatal = 0usize;
    let total = tasks.len();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            fatal += 1;
            first_fatal.get_or_insert(e);
        }
    }
    progress::log(&[("event", "service_stop")]);
    match first_fatal {
        Some(e) if fatal == total && !stop.is_set() => Err(AgentError::Sync(Box::new(e))),
        _ => Ok(()),
    }
}

/// The retry delay after `failures` consecutive failures.
fn retry_delay(plan_seconds: &[u32], failures: usize) -> Duration {
    let s = SessionConfig::schedule_from(plan_seconds);
    s[failures.saturating_sub(1).min(s.len() - 1)]
}

/// How long `run` waits for a resync window opening in `opens_in_seconds` (local times have
/// whole seconds: one more makes sure the next attempt is inside).
fn window_wait(opens_in_seconds: u32) -> Duration {
    Duration::from_secs(u64::from(opens_in_seconds) + 1)
}

async fn sleep_or_stop(d: Duration, stop: &Stop) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stop.wait() => true,
    }
}

/// One disk's cycles until stopped or a fatal error.
async fn disk_loop(ctx: &Context, disk: &DiskConfig, stop: &Stop) -> Result<(), SyncError> {
    let label = disk.label();
    let st = loop {
        match DiskState::open(&ctx.state_dir, &disk.item, &disk.name) {
            Ok(s) => break s,
            Err(e @ TrackingError::Locked { .. }) => {
                progress::log(&[
                    ("event", "disk_busy"),
                    ("disk", &label),
                    ("error", &e.to_string()),
                ]);
                if sleep_or_stop(LOCKED_RETRY, stop).await {
                    return Ok(());
                }
            }
            Err(e) => {
                let e = tracking(&label)(e);
                progress::log(&[
                    ("event", "disk_stopped"),
                    ("disk", &label),
                    ("error", &e.to_string()),
                ]);
                return Err(e);
            }
        }
    };
    let mut failures = 0usize;
    let mut last_app: Option<Instant> = None;
    let mut schedule: Vec<u32> = Vec::new();
    loop {
        if stop.is_set() {
            return Ok(());
        }
        let started = Instant::now();
        let result = match ctx.plan(disk).await {
            Ok(plan) => {
                schedule.clone_from(&plan.retry_schedule_seconds);
                let freq =
                    Duration::from_secs(u64::from(plan.app_consistent_frequency_minutes) * 60);
                let app = disk.app_consistent()
                    && plan.app_consistent_frequency_minutes > 0
                    && last_app.is_none_or(|t| t.elapsed() >= freq);
                let opts = CycleOptions {
                    commit_timeout: Duration::from_secs(u64::from(
                        ctx.replication.commit_timeout_seconds,
                    )),
                    max_failures: None,
                    app,
                };
                let interval = Duration::from_secs(u64::from(plan.cycle_interval_seconds.max(1)));
                let r = run_cycle(ctx, disk, &plan, &st, &opts, stop).await;
                if let (
                    Some(job),
                    Ok(CycleOutcome::Done { .. } | CycleOutcome::FinalCycleSent { .. }),
                ) = (&plan.final_cycle, &r)
                {
                    after_final_cycle(ctx, &disk.item, job).await;
                }
                r.map(|o| (o, interval, app))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((outcome, interval, app)) => {
                failures = 0;
                let mut next = started + interval;
                match &outcome {
                    CycleOutcome::Paused => {
                        progress::log(&[("event", "paused"), ("disk", &label)]);
                    }
                    CycleOutcome::FinalCycleSent { job } => {
                        progress::log(&[
                            ("event", "final_cycle_already_sent"),
                            ("disk", &label),
                            ("job", job),
                        ]);
                    }
                    CycleOutcome::Deferred {
                        opens_in_seconds, ..
                    } => {
                        // Said by `event=resync_deferred`; tried again on the interval, or
                        // as the window opens if that is sooner.
                        next = next.min(Instant::now() + window_wait(*opens_in_seconds));
                    }
                    CycleOutcome::Done {
                        cycle,
                        kind,
                        commit,
                        chunk_bytes,
                        resync,
                        ..
                    } => {
                        if app {
                            last_app = Some(started);
                        }
                        let (c, b) = (cycle.to_string(), chunk_bytes.to_string());
                        let (status, point) = match commit {
                            Commit::Committed(p) => ("committed", p.as_str()),
                            Commit::NotConfirmed(_) => ("acknowledged", "-"),
                        };
                        let mut fields = vec![
                            ("event", "cycle_done"),
                            ("disk", label.as_str()),
                            ("cycle", c.as_str()),
                            ("kind", kind.as_str()),
                            ("status", status),
                            ("point", point),
                            ("chunk_bytes", b.as_str()),
                        ];
                        let counts = resync
                            .map(|r| (r.compared_chunks.to_string(), r.sent_chunks.to_string()));
                        if let Some((compared, sent)) = &counts {
                            fields.push(("resync_compared_chunks", compared));
                            fields.push(("resync_sent_chunks", sent));
                        }
                        progress::log(&fields);
                    }
                }
                if sleep_or_stop(next.saturating_duration_since(Instant::now()), stop).await {
                    return Ok(());
                }
            }
            Err(e) => match e.class() {
                Class::Stopped => return Ok(()),
                Class::Fatal => {
                    progress::log(&[
                        ("event", "disk_stopped"),
                        ("disk", &label),
                        ("error", &e.to_string()),
                        (
                            "note",
                            "replication of this disk stops until the operator acts",
                        ),
                    ]);
                    return Err(e);
                }
                Class::Resync | Class::Transient { .. } => {
                    failures += 1;
                    let wait = retry_delay(&schedule, failures);
                    let w = wait.as_secs().to_string();
                    progress::log(&[
                        (
                            "event",
                            if e.class() == Class::Resync {
                                "resync_needed"
                            } else {
                                "cycle_failed"
                            },
                        ),
                        ("disk", &label),
                        ("error", &e.to_string()),
                        ("retry_in_seconds", &w),
                    ]);
                    if sleep_or_stop(wait, stop).await {
                        return Ok(());
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_names_what_is_configured() {
        let disks = vec![
            DiskConfig::new("web", "sda", "/dev/sda"),
            DiskConfig::new("web", "sdb", "/dev/sdb"),
            DiskConfig::new("db", "sda", "/dev/sdc"),
        ];
        let dir = Path::new("/s");
        assert_eq!(select(dir, &disks, None, None).unwrap().len(), 3);
        assert_eq!(select(dir, &disks, Some("web"), None).unwrap().len(), 2);
        assert_eq!(select(dir, &disks, None, Some("sda")).unwrap().len(), 2);
        let one = select(dir, &disks, Some("db"), Some("sda")).unwrap();
        assert_eq!(one[0].path, PathBuf::from("/dev/sdc"));
        let e = select(dir, &disks, Some("mail"), None).unwrap_err();
        assert!(
            e.to_string().contains(
                "no configured disk matches --item mail (configured: web/sda, web/sdb, db/sda)"
            ),
            "{e}"
        );
        let e = select(dir, &[], None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/s/agent.toml: no disk is configured"),
            "{e}"
        );
        assert_eq!(e.exit_code(), EXIT_STATE);
    }

    #[test]
    fn reports_read_as_promised() {
        let d = DiskConfig::new("web", "sda", "/dev/sda");
        let r = DiskReport::from_outcome(
            &d,
            CycleOutcome::Done {
                cycle: 3,
                kind: CycleKind::Delta,
                app: false,
                data_frames: 4,
                chunk_bytes: 100,
                resync: None,
                change_list: None,
                commit: Commit::Committed("20261126T075405.135Z-1c866aa0".into()),
            },
        );
        assert_eq!(
            r.line(),
            "web/sda cycle 3 → point 20261126T075405.135Z-1c866aa0"
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"item":"web","disk":"sda","status":"committed","cycle":3,"kind":"delta","consistency":"crash","point_id":"20261126T075405.135Z-1c866aa0","data_frames":4,"chunk_bytes":100}"#
        );
        let r = DiskReport::from_outcome(
            &d,
            CycleOutcome::Done {
                cycle: 4,
                kind: CycleKind::Resync,
                app: true,
                data_frames: 1,
                chunk_bytes: 0,
                resync: Some(ResyncCount {
                    compared_chunks: 10,
                    sent_chunks: 1,
                }),
                change_list: None,
                commit: Commit::NotConfirmed("closed".into()),
            },
        );
        assert_eq!(r.exit_code, 0);
        assert!(
            r.line()
                .starts_with("web/sda cycle 4 acknowledged; point not yet confirmed")
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""kind":"resync","consistency":"app""#)
                && json.contains(r#""chunk_bytes":0,"resync_compared_chunks":10,"resync_sent_chunks":1,"message""#),
            "{json}"
        );
        let r = DiskReport::from_outcome(&d, CycleOutcome::Paused);
        assert_eq!(r.line(), "web/sda: paused by the operator, nothing sent");
        let r = DiskReport::from_outcome(
            &d,
            CycleOutcome::Deferred {
                reason: ResyncReason::Threshold,
                window: "22:00-06:00".into(),
                opens_at: "mon 22:00".into(),
                opens_in_seconds: 2 * 3600 + 5 * 60,
            },
        );
        assert_eq!(r.exit_code, 0);
        assert_eq!(
            r.line(),
            "web/sda: resync deferred: the resync (changes over the resync threshold) waits for \
             the resync window 22:00-06:00 (local time): it opens mon 22:00, in 2h 05m; nothing \
             was sent"
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "item": "web", "disk": "sda", "status": "deferred", "kind": "resync",
                "resync_reason": "threshold", "resync_window_opens_in_seconds": 7500,
                "message": r.message.clone().unwrap(),
            })
        );
        assert_eq!(span(1), "1m");
        assert_eq!(span(3600), "1h 00m");
        assert_eq!(span(6 * 86_400 + 3 * 3600), "6d 3h");
        assert_eq!(window_wait(59), Duration::from_secs(60));
        let e = SyncError::NoProcessRole {
            disk: "web/sda".into(),
            item: "web".into(),
        };
        let r = DiskReport::failed(&d, &e);
        assert_eq!(r.exit_code, EXIT_OTHER);
        assert!(
            r.line().contains("the gateway has no process role"),
            "{}",
            r.line()
        );
        assert_eq!(retry_delay(&[], 1), Duration::from_secs(5));
        assert_eq!(retry_delay(&[2, 7], 9), Duration::from_secs(7));
    }

    #[test]
    fn lvm_handles_are_known_before_the_snapshot() {
        let mut d = DiskConfig::new("web", "sda", "/dev/vg0/data");
        d.snapshot = SnapshotMode::Lvm;
        assert_eq!(predicted_handle(&d, 5), "vg0/data-ferry-c5");
        d.snapshot = SnapshotMode::Reflink;
        assert_eq!(predicted_handle(&d, 5), "view");
        d.snapshot = SnapshotMode::None;
        assert_eq!(predicted_handle(&d, 5), "");
    }

    use std::sync::Mutex;

    use crate::testkit::{FakeDataPort, FakeGateway, Reply, TestCa, enroll_into, point_id};
    use crate::throttle::LocalTime;

    /// How the fake gateway answers the replica's digests.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    enum Digests {
        /// The digests of its replica, as the real gateway computes them.
        #[default]
        Serve,
        /// 404 `no_point`.
        NoPoint,
        /// A byte flipped.
        Damaged,
        /// The last 40 bytes missing.
        Truncated,
        /// A list for a disk one byte shorter.
        OtherGeometry,
        /// 200 with an HTML page.
        Html,
        /// 503 `digests_busy`.
        Busy,
    }

    #[derive(Debug, Default)]
    struct Knobs {
        paused: bool,
        resync_requested: bool,
        no_data_port: bool,
        digests: Digests,
        resync_window: Option<ferry_proto::enroll::ResyncWindow>,
        final_cycle: Option<String>,
    }

    const DIGESTS_PATH: &str = "/api/v1/agent/items/web/disks/sda/digests";

    /// The fake gateway's answer to `GET …/digests`: the list of its replica after its
    /// last complete cycle, or what `mode` asks for.
    fn digests_reply(mode: Digests, dp: &crate::testkit::DataPortState) -> Reply {
        use ferry_proto::digests::{CONTENT_TYPE, Header, Writer, digest};
        let json = |status: u16, body: &str| Reply {
            status,
            content_type: "application/json".into(),
            body: body.as_bytes().to_vec(),
        };
        let Some((cycle, _)) = dp.complete else {
            return json(
                404,
                r#"{"code":"no_point","message":"item `web` has no recovery point yet"}"#,
            );
        };
        match mode {
            Digests::NoPoint => {
                return json(404, r#"{"code":"no_point","message":"no point holds sda"}"#);
            }
            Digests::Busy => {
                return json(
                    503,
                    r#"{"code":"digests_busy","message":"retry in a minute"}"#,
                );
            }
            Digests::Html => {
                return Reply {
                    status: 200,
                    content_type: "text/html".into(),
                    body: b"<html>hello</html>".to_vec(),
                };
            }
            _ => {}
        }
        let replica = if mode == Digests::OtherGeometry {
            &dp.replica[..dp.replica.len() - 1]
        } else {
            &dp.replica[..]
        };
        let h = Header {
            chunk_size: u32::try_from(CS).unwrap(),
            disk_size: replica.len() as u64,
            point: point_id(cycle),
        };
        let mut w = Writer::new(Vec::new(), &h).unwrap();
        for c in replica.chunks(usize::try_from(CS).unwrap()) {
            w.push(&digest(c)).unwrap();
        }
        let mut body = w.finish().unwrap();
        match mode {
            Digests::Damaged => {
                let at = body.len() / 2;
                body[at] ^= 0x10;
            }
            Digests::Truncated => body.truncate(body.len() - 40),
            _ => {}
        }
        Reply {
            status: 200,
            content_type: CONTENT_TYPE.into(),
            body,
        }
    }

    struct Setup {
        _ca: Arc<TestCa>,
        dp: FakeDataPort,
        api: FakeGateway,
        knobs: Arc<Mutex<Knobs>>,
        dir: tempfile::TempDir,
        img: PathBuf,
        disk: DiskConfig,
    }

    const CS: u64 = 65536;

    async fn setup() -> Setup {
        let ca = Arc::new(TestCa::new());
        let dp = ca.data_port().await;
        let knobs: Arc<Mutex<Knobs>> = Arc::default();
        let (k, gw_state, port) = (knobs.clone(), dp.state.clone(), dp.port);
        let size = 6 * CS - 123;
        let api = ca
            .serve_raw(true, move |r| {
                if r.target == DIGESTS_PATH {
                    let mode = k.lock().unwrap().digests;
                    return digests_reply(mode, &gw_state.lock().unwrap());
                }
                if r.target != "/api/v1/agent/items/web/replication" {
                    return Reply {
                        status: 404,
                        content_type: "application/json".into(),
                        body: br#"{"code":"not_found","message":"no such item"}"#.to_vec(),
                    };
                }
                let k = k.lock().unwrap();
                let last = gw_state.lock().unwrap().complete.map(|(c, _)| c);
                let plan = ReplicationPlan {
                    item: "web".into(),
                    data_port: (!k.no_data_port).then_some(port),
                    paused: k.paused,
                    resync_requested: k.resync_requested,
                    cycle_interval_seconds: 60,
                    app_consistent_frequency_minutes: 0,
                    retry_schedule_seconds: vec![0],
                    resync_threshold_percent: 50,
                    disks: vec![PlanDisk {
                        name: "sda".into(),
                        size_bytes: size,
                        chunk_size: 65536,
                        last_complete_cycle: last,
                    }],
                    resync_window: k.resync_window.clone(),
                    final_cycle: k.final_cycle.clone(),
                };
                Reply {
                    status: 200,
                    content_type: "application/json".into(),
                    body: serde_json::to_vec(&plan).unwrap(),
                }
            })
            .await;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        enroll_into(&ca, &state, "web-01", &api.url);
        let img = dir.path().join("web-sda.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size).unwrap();
        for (i, b) in [1u8, 0, 2, 3, 0, 4].into_iter().enumerate() {
            if b != 0 {
                write(&img, i as u64 * CS, &vec![b; 1000]);
            }
        }
        let disk = crate::disks::add(&state, DiskConfig::new("web", "sda", &img), false).unwrap();
        Setup {
            _ca: ca,
            dp,
            api,
            knobs,
            dir,
            img,
            disk,
        }
    }

    fn write(img: &Path, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    impl Setup {
        fn state_dir(&self) -> PathBuf {
            self.dir.path().join("state")
        }

        fn ctx(&self) -> Context {
            Context::load(&self.state_dir(), Style::Quiet).unwrap().0
        }

        async fn cycle(&self, max_failures: Option<usize>) -> Result<CycleOutcome, SyncError> {
            self.cycle_with(self.ctx(), max_failures).await
        }

        /// [`Self::cycle`] at the local time `t` (the clock the resync window is read with).
        async fn cycle_at(&self, t: LocalTime) -> Result<CycleOutcome, SyncError> {
            let mut ctx = self.ctx();
            ctx.clock = Clock::from_fn(move || t);
            self.cycle_with(ctx, Some(3)).await
        }

        async fn cycle_with(
            &self,
            ctx: Context,
            max_failures: Option<usize>,
        ) -> Result<CycleOutcome, SyncError> {
            let plan = ctx.plan(&self.disk).await.unwrap();
            let st = DiskState::open(&self.state_dir(), "web", "sda").unwrap();
            let opts = CycleOptions {
                commit_timeout: Duration::from_secs(5),
                max_failures,
                app: false,
            };
            run_cycle(&ctx, &self.disk, &plan, &st, &opts, &Stop::never()).await
        }

        fn replica_matches(&self) {
            let want = std::fs::read(&self.img).unwrap();
            let got = self.dp.state.lock().unwrap().replica.clone();
            assert!(got == want, "the replica differs from the disk");
        }

        fn digests_requests(&self) -> usize {
            self.api
                .requests()
                .iter()
                .filter(|r| r.target == DIGESTS_PATH)
                .count()
        }

        fn last_cycle(&self) -> (u64, CycleKind, u64) {
            *self.dp.state.lock().unwrap().cycles.last().unwrap()
        }

        /// The committed cycle, read without taking the disk's lock.
        fn committed(&self) -> Option<u64> {
            let p = self.state_dir().join("disks/web/sda/digests");
            p.exists()
                .then(|| crate::tracking::read_digests_header(&p).unwrap().cycle)
        }
    }

    /// Runs `tool` (qemu-img, qemu-io: installed by `scripts/install-test-tools.sh`).
    fn qemu(tool: &str, args: &[&str]) {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool} (scripts/install-test-tools.sh installs it): {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A VHDX container replicated through the built-in hyperv adapter: the initial cycle
    /// sends the virtual disk (not the container's bytes); a delta whose `changes` command
    /// prints an RCT document reads only the chunks it lists; a document the adapter refuses
    /// is reported and that cycle reads every allocated chunk instead. After each cycle the
    /// replica equals `qemu-img convert -O raw` of the container.
    #[tokio::test]
    async fn a_vhdx_replicates_through_its_adapter_with_rct_change_lists() {
        let s = setup().await;
        let dir = s.dir.path();
        let (raw, vhdx, doc, now) = (
            dir.join("src.raw"),
            dir.join("disk.vhdx"),
            dir.join("rct.json"),
            dir.join("now.raw"),
        );
        let size = 4u64 << 20;
        std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
        write(&raw, 0, &[7u8; 5000]);
        write(&raw, 2 * CS + 100, &[8u8; 3000]);
        write(&raw, size - 4096, &[9u8; 4096]);
        let (raw_s, vhdx_s, now_s) = (
            raw.to_str().unwrap(),
            vhdx.to_str().unwrap(),
            now.to_str().unwrap(),
        );
        qemu(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "vhdx", raw_s, vhdx_s],
        );
        crate::disks::remove(&s.state_dir(), "web", "sda").unwrap();
        let mut d = DiskConfig::new("web", "sda", &vhdx);
        d.format = "vhdx".into();
        d.changes = vec!["cat".into(), doc.to_str().unwrap().into()];
        let d = crate::disks::add(&s.state_dir(), d, false).unwrap();
        let s = &s;
        let attempt = |d: DiskConfig, max_failures: usize| async move {
            let ctx = s.ctx();
            let plan = ctx.plan(&d).await.unwrap();
            let st = DiskState::open(&s.state_dir(), "web", "sda").unwrap();
            let opts = CycleOptions {
                commit_timeout: Duration::from_secs(5),
                max_failures: Some(max_failures),
                app: false,
            };
            run_cycle(&ctx, &d, &plan, &st, &opts, &Stop::never()).await
        };
        let cycle = |d: DiskConfig| async move { attempt(d, 3).await.unwrap() };
        let matches = || {
            let _ = std::fs::remove_file(&now);
            qemu(
                "qemu-img",
                &["convert", "-f", "vhdx", "-O", "raw", vhdx_s, now_s],
            );
            let want = std::fs::read(&now).unwrap();
            let got = s.dp.state.lock().unwrap().replica.clone();
            assert_eq!(got.len(), want.len());
            assert!(got == want, "the replica differs from the virtual disk");
        };
        let report = |o: CycleOutcome| DiskReport::from_outcome(&d, o);

        let r = report(cycle(d.clone()).await);
        assert_eq!((r.status, r.kind), ("committed", Some("initial")));
        assert_eq!(r.change_list, None);
        matches();

        // 64 KiB written at 1 MiB, and the RCT document saying so.
        qemu(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x5a 1M 64k", vhdx_s],
        );
        std::fs::write(&doc, br#"[{"ByteOffset": 1048576, "ByteLength": 65536}]"#).unwrap();
        let r = report(cycle(d.clone()).await);
        assert_eq!((r.status, r.kind), ("committed", Some("delta")));
        let chunks = size / CS;
        assert_eq!(
            r.change_list,
            Some(ChangeListUse {
                ranges: 1,
                read_chunks: 1,
                unlisted_chunks: chunks - 1,
                error: None,
            })
        );
        assert_eq!(r.data_frames, Some(1));
        matches();

        // A document the adapter refuses (a range past the end): the cycle reads every
        // allocated chunk and still sends the change.
        qemu(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x33 3M 4k", vhdx_s],
        );
        std::fs::write(&doc, br#"[{"ByteOffset": 4194304, "ByteLength": 65536}]"#).unwrap();
        let r = report(cycle(d.clone()).await);
        let used = r.change_list.clone().unwrap();
        assert!(
            used.error.as_deref().is_some_and(|e| e.contains("refused")),
            "{used:?}"
        );
        assert!(used.read_chunks > 1, "{used:?}");
        assert_eq!(r.data_frames, Some(1));
        matches();

        // The command fails: the same fallback, with its reason.
        let mut failing = d.clone();
        failing.changes = vec!["false".into()];
        qemu(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x44 0 4k", vhdx_s],
        );
        let r = report(cycle(failing).await);
        let used = r.change_list.clone().unwrap();
        assert!(
            used.error.as_deref().is_some_and(|e| e.contains("changes")),
            "{used:?}"
        );
        matches();

        // A cycle cut off after its first frame is left pending (the agent gives up at
        // once); read another way since, it is not resumed but abandoned, and a new cycle
        // of the disk as it is now is sent.
        qemu(
            "qemu-io",
            &["-f", "vhdx", "-c", "write -P 0x66 2M 4k", vhdx_s],
        );
        std::fs::write(&doc, br#"[{"ByteOffset": 2097152, "ByteLength": 4096}]"#).unwrap();
        s.dp.state.lock().unwrap().drop_after = Some(1);
        let e = attempt(d.clone(), 0).await.unwrap_err();
        assert!(matches!(e.class(), Class::Transient { .. }), "{e}");
        let pending = s.dp.state.lock().unwrap().hellos.last().unwrap().cycle;
        let rec = DiskState::open(&s.state_dir(), "web", "sda")
            .unwrap()
            .in_progress()
            .unwrap()
            .expect("the cut cycle is pending");
        assert_eq!(rec.cycle, pending);
        assert!(
            rec.tags
                .contains(&(FORMAT_TAG.to_string(), "vhdx".to_string()))
        );
        let mut other = d.clone();
        other.format = "vhd".into();
        let r = report(cycle(other).await);
        assert_eq!((r.status, r.cycle), ("committed", Some(pending + 1)));
        matches();
    }

    fn done(o: CycleOutcome) -> (u64, CycleKind, u64, Commit) {
        match o {
            CycleOutcome::Done {
                cycle,
                kind,
                data_frames,
                commit,
                ..
            } => (cycle, kind, data_frames, commit),
            o => panic!("not done: {o:?}"),
        }
    }

    /// Cycles against a fake data port over real TLS: initial, deltas, a dropped connection,
    /// a lost EndOfCycle ack (learned from the Welcome, or from the plan after giving up), a
    /// requested resync; the gateway's replica equals the disk after each.
    #[tokio::test]
    async fn cycles_keep_the_replica_bit_exact() {
        let s = setup().await;
        let (c, kind, frames, commit) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!((c, kind), (1, CycleKind::Initial));
        // C0 Z1 C2 C3 Z4 C5.
        assert_eq!(frames, 6);
        assert_eq!(commit, Commit::Committed(point_id(1)));
        s.replica_matches();
        assert_eq!(s.committed(), Some(1));

        // A changed chunk and a zeroed one.
        write(&s.img, 3 * CS + 10, b"delta");
        write(&s.img, 5 * CS, &[0; 1000]);
        let (c, kind, frames, _) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!((c, kind, frames), (2, CycleKind::Delta, 2));
        assert_eq!(s.last_cycle(), (2, CycleKind::Delta, 2));
        s.replica_matches();

        // The gateway drops the connection after journaling the first frame, unacknowledged.
        write(&s.img, 10, b"x");
        write(&s.img, 2 * CS + 10, b"y");
        s.dp.state.lock().unwrap().drop_after = Some(1);
        let before = s.dp.state.lock().unwrap().connections;
        let (c, kind, frames, commit) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!((c, kind, frames), (3, CycleKind::Delta, 2));
        assert_eq!(commit, Commit::Committed(point_id(3)));
        assert_eq!(s.dp.state.lock().unwrap().connections, before + 2);
        let hellos = s.dp.state.lock().unwrap().hellos.clone();
        let n = hellos.len();
        assert_eq!((hellos[n - 2].cycle, hellos[n - 1].cycle), (3, 3));
        s.replica_matches();

        // The EndOfCycle's ack is lost: the reconnect's Welcome says the cycle is complete.
        write(&s.img, 4 * CS, b"z");
        s.dp.state.lock().unwrap().lose_end_ack = true;
        let (c, _, _, commit) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!(c, 4);
        assert_eq!(commit, Commit::Committed(point_id(4)));
        assert_eq!(s.committed(), Some(4));
        s.replica_matches();

        // Lost again, and the agent gives up at once: the cycle stays pending (not
        // promoted), and the next run learns from the plan that the gateway holds it.
        write(&s.img, 4 * CS, b"w");
        s.dp.state.lock().unwrap().lose_end_ack = true;
        let e = s.cycle(Some(0)).await.unwrap_err();
        assert!(matches!(e.class(), Class::Transient { .. }), "{e}");
        assert_eq!(s.committed(), Some(4));
        let (c, kind, frames, _) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!(s.committed(), Some(6));
        assert_eq!((c, kind, frames), (6, CycleKind::Delta, 0));
        s.replica_matches();

        // A resync asked by the operator compares with the replica's digests: nothing
        // differs, nothing is sent.
        s.knobs.lock().unwrap().resync_requested = true;
        let (c, kind, frames, _) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!((c, kind, frames), (7, CycleKind::Resync, 0));
        s.replica_matches();
        s.knobs.lock().unwrap().resync_requested = false;
        // Deltas never asked for the replica's digests.
        assert_eq!(s.digests_requests(), 1);

        // Paused: nothing sent. No process role: said so.
        s.knobs.lock().unwrap().paused = true;
        assert_eq!(s.cycle(Some(3)).await.unwrap(), CycleOutcome::Paused);
        s.knobs.lock().unwrap().paused = false;
        s.knobs.lock().unwrap().no_data_port = true;
        let e = s.cycle(Some(3)).await.unwrap_err();
        assert!(e.to_string().contains("no process role"), "{e}");
        s.knobs.lock().unwrap().no_data_port = false;

        // sync --once over every configured disk.
        write(&s.img, 0, b"once");
        let reports = sync_once(
            &SyncArgs {
                state_dir: s.state_dir(),
                item: None,
                disk: None,
                commit_timeout: Duration::from_secs(5),
            },
            &Stop::never(),
        )
        .await
        .unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].line(),
            format!("web/sda cycle 8 → point {}", point_id(8))
        );
        s.replica_matches();
    }

    fn resync_counts(o: &CycleOutcome) -> (u64, u64) {
        match o {
            CycleOutcome::Done {
                kind: CycleKind::Resync,
                resync: Some(r),
                ..
            } => (r.compared_chunks, r.sent_chunks),
            o => panic!("not a resync: {o:?}"),
        }
    }

    /// A resync (tracking lost, or asked by the operator) is planned against the gateway's
    /// digests of its replica: only the chunks that differ are sent, zeros both ways; when
    /// the digests cannot be used (no point, damaged, truncated, another geometry, not a
    /// digest list, the gateway busy) every chunk is sent and the cycle still succeeds.
    #[tokio::test]
    async fn checksum_resync_sends_only_what_differs() {
        let s = setup().await;
        done(s.cycle(Some(3)).await.unwrap());
        assert_eq!(s.digests_requests(), 0, "an initial cycle asks nothing");
        // The state directory loses the disk's tracking; meanwhile the disk changes: chunk
        // 1 (a hole) gets data, chunk 3 changes, chunk 5's data is overwritten with zeros.
        std::fs::remove_file(s.state_dir().join("disks/web/sda/digests")).unwrap();
        write(&s.img, CS + 7, b"new");
        write(&s.img, 3 * CS + 1, b"changed");
        write(&s.img, 5 * CS, &[0; 1000]);
        let o = s.cycle(Some(3)).await.unwrap();
        assert_eq!(resync_counts(&o), (6, 3));
        let (c, kind, frames, _) = done(o);
        assert_eq!((c, kind, frames), (2, CycleKind::Resync, 3));
        s.replica_matches();
        assert_eq!(s.digests_requests(), 1);
        // Only chunks 1 and 3 carried bytes, chunk 5 went as a Zero range.
        let dp = s.dp.state.lock().unwrap().cycles.clone();
        assert_eq!(dp.last(), Some(&(2, CycleKind::Resync, 3)));
        // The list was only kept while planning; the committed digests are the source's:
        // the next cycle is a delta sending nothing.
        assert!(!s.state_dir().join("disks/web/sda/cycle").exists());
        assert_eq!(s.committed(), Some(2));
        let (_, kind, frames, _) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!((kind, frames), (CycleKind::Delta, 0));

        // Unusable digests: every chunk is sent, the replica is right.
        s.knobs.lock().unwrap().resync_requested = true;
        let mut cycle = 3;
        for mode in [
            Digests::NoPoint,
            Digests::Damaged,
            Digests::Truncated,
            Digests::OtherGeometry,
            Digests::Html,
            Digests::Busy,
        ] {
            s.knobs.lock().unwrap().digests = mode;
            write(&s.img, 2 * CS + 3, &[u8::try_from(cycle).unwrap()]);
            let o = s.cycle(Some(3)).await.unwrap();
            cycle += 1;
            assert_eq!(resync_counts(&o), (0, 6), "{mode:?}");
            let (c, kind, frames, _) = done(o);
            // C0 C1 C2 C3, then chunk 4 (zeros) and 5 (zeros) each a zero range: without a
            // base the chunks are not read before sending, so allocated zeros are not merged.
            assert_eq!((c, kind, frames), (cycle, CycleKind::Resync, 6), "{mode:?}");
            s.replica_matches();
        }
        assert_eq!(s.digests_requests(), 7);

        // sync --once reports what the resync compared and sent.
        s.knobs.lock().unwrap().digests = Digests::Serve;
        write(&s.img, 4 * CS + 9, b"four");
        let reports = sync_once(
            &SyncArgs {
                state_dir: s.state_dir(),
                item: None,
                disk: None,
                commit_timeout: Duration::from_secs(5),
            },
            &Stop::never(),
        )
        .await
        .unwrap();
        let json = serde_json::to_value(&reports[0]).unwrap();
        assert_eq!(json["kind"], "resync");
        assert_eq!(json["resync_compared_chunks"], 6);
        assert_eq!(json["resync_sent_chunks"], 1);
        assert_eq!(json["data_frames"], 1);
        s.replica_matches();
    }

    /// A changed disk beyond the plan's threshold is sent as a resync of the same frames, and
    /// a disk the plan does not know is refused.
    #[tokio::test]
    async fn threshold_and_unknown_disks() {
        let s = setup().await;
        done(s.cycle(Some(3)).await.unwrap());
        for i in 0..4 {
            write(&s.img, i * CS + 500, b"changed");
        }
        let (c, kind, frames, _) = done(s.cycle(Some(3)).await.unwrap());
        assert_eq!((c, kind, frames), (2, CycleKind::Resync, 4));
        s.replica_matches();

        let ctx = s.ctx();
        let plan = ctx.plan(&s.disk).await.unwrap();
        let other = DiskConfig::new("web", "sdz", &s.img);
        let st = DiskState::open(&s.state_dir(), "web", "sdz").unwrap();
        let opts = CycleOptions {
            commit_timeout: Duration::ZERO,
            max_failures: Some(1),
            app: false,
        };
        let e = run_cycle(&ctx, &other, &plan, &st, &opts, &Stop::never())
            .await
            .unwrap_err();
        assert_eq!(e.class(), Class::Fatal);
        assert!(
            e.to_string().contains("has no disk `sdz` (it has: sda)"),
            "{e}"
        );
        // A plan for an item the gateway does not know is fatal for the disk.
        let mut d = s.disk.clone();
        d.item = "mail".into();
        let e = ctx.plan(&d).await.unwrap_err();
        assert_eq!(e.class(), Class::Fatal);
    }

    fn deferred(o: &CycleOutcome) -> (ResyncReason, &str, u32) {
        match o {
            CycleOutcome::Deferred {
                reason,
                opens_at,
                opens_in_seconds,
                ..
            } => (*reason, opens_at.as_str(), *opens_in_seconds),
            o => panic!("not deferred: {o:?}"),
        }
    }

    /// With a resync window in the plan, a resync the agent decides itself (tracking lost,
    /// over the threshold) waits outside the window — no Hello, no digest request, the
    /// committed digests as they were, no cycle directory — and runs inside it; a resync
    /// asked for by hand runs at once; deltas and initial cycles never wait.
    #[tokio::test]
    async fn a_final_cycle_is_tagged_sent_once_and_stops_the_source() {
        let s = setup().await;
        assert_eq!(done(s.cycle(None).await.unwrap()).1, CycleKind::Initial);
        write(&s.img, CS + 5, b"last words");
        let job = "20261127T060000.000Z-0badf00d";
        s.knobs.lock().unwrap().final_cycle = Some(job.into());
        // The stop command: touches a file, so its single run is seen.
        let stopped = s.dir.path().join("stopped");
        let mut ctx = s.ctx();
        ctx.failover.stop_command = vec![
            "sh".into(),
            "-c".into(),
            format!("echo run >> {}", stopped.display()),
        ];
        let opts = CycleOptions {
            commit_timeout: Duration::from_secs(5),
            max_failures: Some(3),
            app: false,
        };
        let st = DiskState::open(&ctx.state_dir, "web", "sda").unwrap();
        let disk = DiskConfig::new("web", "sda", &s.img);
        let (_handle, stop) = Stop::new();
        let plan = ctx.plan(&disk).await.unwrap();
        assert_eq!(plan.final_cycle.as_deref(), Some(job));
        let o = run_cycle(&ctx, &disk, &plan, &st, &opts, &stop)
            .await
            .unwrap();
        assert_eq!(done(o).1, CycleKind::Delta);
        s.replica_matches();
        assert!(
            s.dp.state
                .lock()
                .unwrap()
                .last_tags
                .contains(&(FINAL_CYCLE_TAG.to_string(), job.to_string())),
            "the final cycle carries the job"
        );
        assert!(crate::tracking::final_cycle_sent(
            &ctx.state_dir,
            "web",
            "sda",
            job
        ));
        after_final_cycle(&ctx, "web", job).await;
        // Asked again: nothing sent, the stop command not run twice.
        let before = s.dp.state.lock().unwrap().hellos.len();
        write(&s.img, 2 * CS, b"after the end");
        let o = run_cycle(&ctx, &disk, &plan, &st, &opts, &stop)
            .await
            .unwrap();
        assert_eq!(o, CycleOutcome::FinalCycleSent { job: job.into() });
        assert_eq!(s.dp.state.lock().unwrap().hellos.len(), before);
        after_final_cycle(&ctx, "web", job).await;
        assert_eq!(std::fs::read_to_string(&stopped).unwrap(), "run\n");
        let r = DiskReport::from_outcome(&disk, o);
        assert_eq!(r.status, "final_cycle_sent");
        assert!(r.line().contains(job), "{}", r.line());
    }

    #[tokio::test]
    async fn resyncs_wait_for_their_window() {
        const MON: u8 = 0;
        const TUE: u8 = 1;
        let s = setup().await;
        s.knobs.lock().unwrap().resync_window = Some(ferry_proto::enroll::ResyncWindow {
            from: "22:00".into(),
            to: "06:00".into(),
            days: None,
        });
        let noon = LocalTime::new(MON, 12, 0, 0);
        let night = LocalTime::new(MON, 23, 0, 0);
        // An initial cycle and a delta run at noon.
        assert_eq!(done(s.cycle_at(noon).await.unwrap()).1, CycleKind::Initial);
        write(&s.img, CS + 1, b"d");
        assert_eq!(done(s.cycle_at(noon).await.unwrap()).1, CycleKind::Delta);
        assert_eq!(s.committed(), Some(2));
        let sent = |s: &Setup| {
            let dp = s.dp.state.lock().unwrap();
            (dp.hellos.len(), dp.connections)
        };
        let before = sent(&s);
        let cycle_dir = s.state_dir().join("disks/web/sda/cycle");

        // Tracking lost: deferred until 22:00 (10 hours), before anything is asked or sent.
        std::fs::remove_file(s.state_dir().join("disks/web/sda/digests")).unwrap();
        write(&s.img, 3 * CS + 2, b"lost");
        let o = s.cycle_at(noon).await.unwrap();
        assert_eq!(
            deferred(&o),
            (ResyncReason::TrackingLost, "mon 22:00", 10 * 3600)
        );
        assert_eq!(sent(&s), before);
        assert_eq!(s.digests_requests(), 0);
        assert!(!cycle_dir.exists());
        // Again at 21:59:30: still waiting, 30 s.
        let o = s.cycle_at(LocalTime::new(MON, 21, 59, 30)).await.unwrap();
        assert_eq!(deferred(&o).2, 30);
        assert_eq!(sent(&s), before);
        // Inside the window: the resync runs, against the replica's digests.
        let o = s.cycle_at(night).await.unwrap();
        assert_eq!(resync_counts(&o), (6, 1));
        s.replica_matches();
        let committed = s.committed().unwrap();

        // Over the threshold (4 of 6 chunks changed): deferred once planned, the committed
        // digests untouched; past midnight the window (Monday's, wrapping) lets it run.
        for i in 0..4 {
            write(&s.img, i * CS + 700, b"threshold");
        }
        let before = sent(&s);
        let o = s.cycle_at(LocalTime::new(TUE, 6, 0, 0)).await.unwrap();
        assert_eq!(
            deferred(&o),
            (ResyncReason::Threshold, "tue 22:00", 16 * 3600)
        );
        assert_eq!(sent(&s), before);
        assert_eq!(s.committed(), Some(committed));
        assert!(!cycle_dir.exists());
        let (_, kind, frames, _) = done(s.cycle_at(LocalTime::new(TUE, 5, 59, 0)).await.unwrap());
        assert_eq!((kind, frames), (CycleKind::Resync, 4));
        s.replica_matches();

        // Asked for by hand: at once, whatever the time.
        s.knobs.lock().unwrap().resync_requested = true;
        let (_, kind, _, _) = done(s.cycle_at(noon).await.unwrap());
        assert_eq!(kind, CycleKind::Resync);
        s.knobs.lock().unwrap().resync_requested = false;

        // A window only on another day: sync --once (the system clock) reports it deferred.
        let today = LocalTime::now().weekday;
        let other = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][usize::from((today + 2) % 7)];
        s.knobs.lock().unwrap().resync_window = Some(ferry_proto::enroll::ResyncWindow {
            from: "00:00".into(),
            to: "00:01".into(),
            days: Some(vec![other.into()]),
        });
        std::fs::remove_file(s.state_dir().join("disks/web/sda/digests")).unwrap();
        let before = sent(&s);
        let reports = sync_once(
            &SyncArgs {
                state_dir: s.state_dir(),
                item: None,
                disk: None,
                commit_timeout: Duration::from_secs(5),
            },
            &Stop::never(),
        )
        .await
        .unwrap();
        let json = serde_json::to_value(&reports[0]).unwrap();
        assert_eq!(json["status"], "deferred", "{json}");
        assert_eq!(json["resync_reason"], "tracking_lost");
        assert!(
            reports[0]
                .line()
                .contains(&format!("waits for the resync window {other} 00:00-00:01")),
            "{}",
            reports[0].line()
        );
        assert_eq!(sent(&s), before);
        // No window: the resync runs.
        s.knobs.lock().unwrap().resync_window = None;
        let (_, kind, _, _) = done(s.cycle_at(noon).await.unwrap());
        assert_eq!(kind, CycleKind::Resync);
        s.replica_matches();
    }

    /// The service runs cycles until stopped, and stops cleanly.
    #[tokio::test]
    async fn run_cycles_until_stopped() {
        let s = setup().await;
        let (handle, stop) = Stop::new();
        let dir = s.state_dir();
        let svc = tokio::spawn(async move { run_service(&dir, &stop).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s.committed() != Some(1) {
            assert!(
                std::time::Instant::now() < deadline,
                "no cycle was committed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.replica_matches();
        // While the service holds the disk, another process cannot replicate it.
        let e = DiskState::open(&s.state_dir(), "web", "sda").unwrap_err();
        assert!(e.to_string().contains("another ferry-agent process"), "{e}");
        handle.stop();
        tokio::time::timeout(Duration::from_secs(10), svc)
            .await
            .expect("the service stops")
            .unwrap()
            .unwrap();
    }
}
