//! The process role: the data port agents replicate to (Site Recovery's process server).
//!
//! # Why
//!
//! An agent streams one cycle of one disk per session (`docs/agent-protocol.md`). The gateway
//! must acknowledge a frame only once it would survive a crash, turn every complete cycle
//! into exactly one recovery point, and lose nothing acknowledged whatever happens: the agent,
//! the network or `ferryd` itself may die at any moment. This module ties the pieces that
//! keep those promises together:
//!
//! - [`conn`]: one session on an upgraded data-port connection — the `Hello` checked by the
//!   session rules (`crate::session`), each data frame appended *as received* to the cycle's
//!   journal (`crate::journal`), acknowledged only after the journal's `fsync` (one per read
//!   batch), `Busy` when the cache is over its limits, `Error` with a stable code for
//!   everything refused;
//! - [`drainer`]: complete cycles, oldest first per disk and one item at a time, become
//!   recovery points through the store's pipeline (`crate::drain`); only then is the journal
//!   removed and the agent told `PointCommitted`;
//! - this file: the streams (one per (item, disk)), what each holds (the geometry and the
//!   newest complete cycle, from the vault's points and the journals), recovery at start
//!   (every journal on the cache is reopened, torn tails cut, complete cycles queued for
//!   draining, an incomplete one kept for the agent to resume), the replication plan agents
//!   read, and the per-item figures (backlog, ingest and upload rates, time to drain).
//!
//! # Invariants
//!
//! - A journal's record 0 is the `Hello` that opened its cycle (the agent's frame as
//!   received): it is written and fsynced before the `Welcome`, so every journal on the cache
//!   says which agent, disk geometry and cycle kind it holds. Data frames follow from seq 1.
//! - At most one session writes a stream: a new session for the same (item, disk) ends the
//!   older one (closed without a frame) and takes its place.
//! - A cycle's journal is removed only after its point is in the vault, or when the agent
//!   abandons the cycle (a `Hello` for a newer one), or when its point is found in the vault
//!   at start (a crash between the commit and the removal). Drained points carry the tags
//!   `disk`, `cycle` and `end_seq`, which is how the vault answers for cycles whose journals
//!   are gone.

mod conn;
mod drainer;
mod figures;
mod live;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::enroll::{PlanDisk, ReplicationPlan};
use ferry_proto::frame::{self, AgentFrame, Decoded, Hello};
use ferry_store::Vault;
use tokio::sync::{Notify, Semaphore, watch};

use crate::agents::Agents;
use crate::catalog::Catalog;
use crate::config::{Config, ProcessConfig};
use crate::drain::{CycleInfo, TAG_CYCLE, TAG_DISK, TAG_END_SEQ};
use crate::item::{Item, ItemState};
use crate::journal::{self, CacheGuard, CacheLimits, Journal, JournalError, StreamKey};

pub use conn::router;
pub use figures::ItemFigures;

/// The drains' scratch images, under the cache directory.
const SCRATCH_DIR: &str = "scratch";
/// Damaged journals moved aside at start, under the cache directory.
const DAMAGED_DIR: &str = "damaged";

/// Why the process role could not start or answer. Each names the path or item.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The cache directory or a journal in it.
    #[error("process cache: {0}")]
    Journal(#[from] JournalError),
    /// A journal on the cache is not one this role wrote (its record 0 is not a `Hello`).
    #[error("journal {}: {reason}; move it away to let the gateway start the stream again", dir.display())]
    Foreign {
        /// The journal directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The catalog.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// The vault could not list the item's points.
    #[error("reading the points of `{item}` in vault `{vault}`: {source}")]
    Vault {
        /// The item.
        item: String,
        /// The vault.
        vault: String,
        /// What the store said.
        #[source]
        source: Box<ferry_store::StoreError>,
    },
    /// A configuration path or directory.
    #[error(transparent)]
    Daemon(#[from] crate::DaemonError),
    /// A task of the role failed.
    #[error("process role: {0}")]
    Internal(String),
}

/// (item, disk).
pub(crate) type StreamId = (String, String);

/// What the gateway knows of one (item, disk) without holding its session lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Known {
    /// Disk size and chunk size, from the first cycle on.
    pub geometry: Option<(u64, u32)>,
    /// The newest cycle whose `EndOfCycle` is durable (journal or vault), and its `seq`.
    pub complete: Option<(u64, u64)>,
    /// The newest cycle the vault holds as a point, and the point.
    pub committed: Option<(u64, String)>,
}

/// The cycle a stream is receiving: its journal, with record 0 its `Hello`.
pub(crate) struct Receiving {
    pub hello: Hello,
    pub journal: Journal,
}

/// A complete cycle waiting for (or in) its drain.
pub(crate) struct Pending {
    pub info: CycleInfo,
    pub journal: Journal,
}

/// One (item, disk).
pub(crate) struct Stream {
    pub id: StreamId,
    /// Held by the session writing the stream (and while loading it).
    pub receiving: tokio::sync::Mutex<Option<Receiving>>,
    /// Bumped by each new session: an older one sees it and ends.
    pub generation: watch::Sender<u64>,
    /// Filled once from the vault (and the journals found at start), then kept current.
    pub known: Mutex<Option<Known>>,
    /// Complete cycles not yet in the vault, by cycle.
    pub pending: Mutex<BTreeMap<u64, Pending>>,
    /// The newest (cycle, point) drained, for sessions waiting to tell their agent.
    pub committed: watch::Sender<Option<(u64, String)>>,
    /// The initial cycle being drained while it is received, if any (`live`).
    pub live: tokio::sync::Mutex<Option<live::Live>>,
}

impl Stream {
    fn new(id: StreamId) -> Self {
        Self {
            id,
            receiving: tokio::sync::Mutex::new(None),
            generation: watch::channel(0).0,
            known: Mutex::new(None),
            pending: Mutex::new(BTreeMap::new()),
            committed: watch::channel(None).0,
            live: tokio::sync::Mutex::new(None),
        }
    }

    pub fn known(&self) -> Option<Known> {
        lock(&self.known).clone()
    }

    pub fn update_known(&self, f: impl FnOnce(&mut Known)) {
        let mut k = lock(&self.known);
        let k = k.get_or_insert_with(Known::default);
        f(k);
    }
}

/// Locks a std mutex, taking it over from a panicked holder (the data are plain values).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) struct Inner {
    pub cache_dir: PathBuf,
    pub scratch_dir: PathBuf,
    pub guard: Arc<CacheGuard>,
    pub journal_limits: journal::Limits,
    pub catalog: Arc<Catalog>,
    pub agents: Arc<Agents>,
    pub vaults: Arc<BTreeMap<String, Vault>>,
    pub streams: Mutex<HashMap<StreamId, Arc<Stream>>>,
    pub drain_wake: Notify,
    pub idle: Duration,
    pub data_port: AtomicU16,
    pub sessions: Arc<Semaphore>,
    pub stop: watch::Sender<bool>,
    pub active: AtomicUsize,
    pub idle_notify: Notify,
    pub figures: Mutex<BTreeMap<String, ItemFigures>>,
    pub drain_workers: usize,
    /// Live drains (`live`) running at once: at most `process.drain_workers`, like the
    /// drainer's (a session past them is drained after its cycle, as before).
    pub live_permits: Arc<Semaphore>,
    pub deferred: Mutex<BTreeMap<StreamId, Vec<StreamKey>>>,
}

/// The process role: cheap to clone, shared by the data port, the API and the drainer.
#[derive(Clone)]
pub struct ProcessRole {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRole")
            .field("cache_dir", &self.inner.cache_dir)
            .field("data_port", &self.data_port())
            .finish_non_exhaustive()
    }
}

/// What recovery at start found on the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartReport {
    /// Complete cycles queued for draining.
    pub pending_cycles: usize,
    /// Incomplete cycles kept for their agents to resume.
    pub receiving_cycles: usize,
    /// Journals removed: already in the vault, abandoned, or holding nothing acknowledged.
    pub removed: usize,
    /// Bytes of torn tails cut (never acknowledged).
    pub truncated_bytes: u64,
    /// Damaged journals moved aside (their items need a resync).
    pub damaged: usize,
    /// Streams left for later (their vault could not be read, or a journal not opened).
    pub deferred: usize,
}

impl ProcessRole {
    /// Opens the cache (creating it), recovers every journal on it and starts the drainer.
    /// Returns the role, what recovery found, and the drainer task (ended by
    /// [`ProcessRole::shutdown`]).
    pub async fn start(
        cfg: &Config,
        catalog: Arc<Catalog>,
        agents: Arc<Agents>,
        vaults: Arc<BTreeMap<String, Vault>>,
    ) -> Result<(ProcessRole, StartReport, tokio::task::JoinHandle<()>), ReplicationError> {
        let p: &ProcessConfig = &cfg.process;
        let cache_dir = cfg.process_cache_dir()?;
        crate::fsutil::ensure_private_dir(&cache_dir)?;
        let scratch_dir = cache_dir.join(SCRATCH_DIR);
        crate::fsutil::ensure_private_dir(&scratch_dir)?;
        // Scratch images of drains a crash interrupted are redone from their journals.
        if let Ok(rd) = std::fs::read_dir(&scratch_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let guard = Arc::new(CacheGuard::new(
            &cache_dir,
            CacheLimits {
                warn_free_percent: p.cache.warn_free_percent,
                critical_free_percent: p.cache.critical_free_percent,
                max_journal_bytes: p.cache.max_journal_bytes,
            },
        )?);
        let journal_limits = journal::Limits {
            // A frame: header, chunk header and the largest chunk.
            max_record: frame::MAX_CHUNK_SIZE + 64,
            segment_bytes: 64 << 20,
            max_journal_bytes: p.cache.max_cycle_bytes,
        };
        let role = ProcessRole {
            inner: Arc::new(Inner {
                cache_dir,
                scratch_dir,
                guard,
                journal_limits,
                catalog,
                agents,
                vaults,
                streams: Mutex::new(HashMap::new()),
                drain_wake: Notify::new(),
                idle: Duration::from_secs(p.idle_timeout_secs),
                data_port: AtomicU16::new(0),
                sessions: Arc::new(Semaphore::new(p.max_sessions as usize)),
                stop: watch::channel(false).0,
                active: AtomicUsize::new(0),
                idle_notify: Notify::new(),
                figures: Mutex::new(BTreeMap::new()),
                drain_workers: p.drain_workers as usize,
                live_permits: Arc::new(Semaphore::new(p.drain_workers as usize)),
                deferred: Mutex::new(BTreeMap::new()),
            }),
        };
        let report = role.recover().await?;
        let task = tokio::spawn(drainer::run(role.clone()));
        role.inner.drain_wake.notify_one();
        Ok((role, report, task))
    }

    /// Records the port the data listener was bound to (told to agents in their plan).
    pub fn set_data_port(&self, port: u16) {
        self.inner.data_port.store(port, Ordering::Relaxed);
    }

    /// The data port, once bound.
    pub fn data_port(&self) -> Option<u16> {
        match self.inner.data_port.load(Ordering::Relaxed) {
            0 => None,
            p => Some(p),
        }
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &std::path::Path {
        &self.inner.cache_dir
    }

    /// Ends every session (`Error(shutting_down)` after their last acks), waits up to `grace`
    /// for them and for the drain in progress, then stops the drainer.
    pub async fn shutdown(&self, drainer: tokio::task::JoinHandle<()>, grace: Duration) {
        let _ = self.inner.stop.send(true);
        self.inner.drain_wake.notify_one();
        let wait = async {
            while self.inner.active.load(Ordering::Acquire) > 0 {
                let n = self.inner.idle_notify.notified();
                if self.inner.active.load(Ordering::Acquire) == 0 {
                    break;
                }
                n.await;
            }
            let _ = drainer.await;
        };
        let _ = tokio::time::timeout(grace, wait).await;
    }

    /// Whether disk `disk` of `item` has complete cycles the vault does not hold yet (queued
    /// or draining): the newest point is then not what the gateway holds of the disk.
    pub fn has_undrained(&self, item: &str, disk: &str) -> bool {
        let Some(s) = lock(&self.inner.streams)
            .get(&(item.to_string(), disk.to_string()))
            .cloned()
        else {
            return false;
        };
        if !lock(&s.pending).is_empty() {
            return true;
        }
        s.known().is_some_and(|k| match (k.complete, k.committed) {
            (Some((c, _)), Some((d, _))) => c > d,
            (Some(_), None) => true,
            _ => false,
        })
    }

    pub(crate) fn stream(&self, item: &str, disk: &str) -> Arc<Stream> {
        let id = (item.to_string(), disk.to_string());
        lock(&self.inner.streams)
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Stream::new(id)))
            .clone()
    }

    /// Reopens every journal on the cache (`docs/journal-format.md` §5): complete cycles are
    /// queued for draining, the newest incomplete one per stream is kept for its agent, and
    /// journals the vault already holds or that hold nothing are removed. A stream whose vault
    /// cannot be read now, or whose journals cannot be opened for another reason than damage,
    /// is deferred: its journals stay as they are, its agent is told `Busy`, and the drainer
    /// tries it again.
    async fn recover(&self) -> Result<StartReport, ReplicationError> {
        let mut report = StartReport::default();
        let keys = StreamKey::list(&self.inner.cache_dir)?;
        let mut by_stream: BTreeMap<StreamId, Vec<StreamKey>> = BTreeMap::new();
        for k in keys {
            by_stream
                .entry((k.item.clone(), k.disk.clone()))
                .or_default()
                .push(k);
        }
        for (id, keys) in by_stream {
            if let Err(e) = self.recover_stream(&id, keys.clone(), &mut report).await {
                eprintln!(
                    "ferryd: process role: `{}`/`{}` deferred ({e}); its journals are kept and tried again",
                    id.0, id.1
                );
                lock(&self.inner.deferred).insert(id, keys);
                report.deferred += 1;
            }
        }
        Ok(report)
    }

    /// Retries the deferred streams (the drainer's tick).
    pub(crate) async fn retry_deferred(&self) {
        let deferred: Vec<(StreamId, Vec<StreamKey>)> = lock(&self.inner.deferred)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, keys) in deferred {
            let mut report = StartReport::default();
            if self.recover_stream(&id, keys, &mut report).await.is_ok() {
                lock(&self.inner.deferred).remove(&id);
                eprintln!(
                    "ferryd: process role: `{}`/`{}` recovered: {} complete cycle(s) to drain, {} to resume",
                    id.0, id.1, report.pending_cycles, report.receiving_cycles
                );
                self.inner.drain_wake.notify_one();
            }
        }
    }

    /// Whether the stream waits for its recovery (its agent is told `Busy`).
    pub(crate) fn is_deferred(&self, id: &StreamId) -> bool {
        lock(&self.inner.deferred).contains_key(id)
    }

    /// Recovers one stream's journals, all or nothing: on an error nothing of it is kept open
    /// and nothing was removed that the vault does not hold.
    async fn recover_stream(
        &self,
        id: &StreamId,
        mut keys: Vec<StreamKey>,
        report: &mut StartReport,
    ) -> Result<(), ReplicationError> {
        let inner = &self.inner;
        let (item, disk) = id;
        keys.sort_by_key(|k| k.cycle);
        let stream = self.stream(item, disk);
        // What the vault holds for this disk decides which journals are already drained; it
        // must be known before anything is removed.
        let known = self.load_known(&stream).await?;
        let drained = known.committed.as_ref().map_or(0, |c| c.0);
        let mut pending = Vec::new();
        let mut incomplete: Vec<(Receiving, Option<std::time::SystemTime>)> = Vec::new();
        let mut drop_now = Vec::new();
        for key in keys {
            let dir = key.dir(&inner.cache_dir)?;
            let opened = inner
                .guard
                .open_journal(&key, inner.journal_limits)
                .map_err(ReplicationError::from)
                .and_then(|(journal, rec)| {
                    report.truncated_bytes += rec.truncated_bytes;
                    if key.cycle <= drained || rec.records == 0 {
                        return Ok((journal, None));
                    }
                    let ends = read_ends(&journal, &dir)?;
                    Ok((journal, Some(ends)))
                });
            match opened {
                Ok((journal, None)) => drop_now.push(journal),
                Ok((journal, Some((hello, Some(_))))) => {
                    let info = cycle_info(item, disk, key.cycle, &hello);
                    pending.push((key.cycle, hello, Pending { info, journal }));
                }
                Ok((journal, Some((hello, None)))) => {
                    let t = journal.last_write();
                    incomplete.push((Receiving { hello, journal }, t));
                }
                Err(
                    e @ (ReplicationError::Foreign { .. }
                    | ReplicationError::Journal(JournalError::Corrupt { .. })),
                ) => {
                    // Damage beyond a torn tail: acknowledged frames are lost. The journal is
                    // moved aside for the operator, the item needs a resync (the agent's next
                    // Hello is told its acknowledged frames are gone).
                    let aside = self.set_aside(&key, &dir);
                    eprintln!(
                        "ferryd: process role: {e}; moved to {}; `{item}` needs a resync",
                        aside.display()
                    );
                    let _ = inner.catalog.apply_event(
                        item,
                        crate::item::Event::TrackingLost,
                        ferry_store::point::now_ms(),
                    );
                    report.damaged += 1;
                }
                Err(e) => return Err(e),
            }
        }
        // Everything opened: now change things.
        for j in drop_now {
            // Drained already (a crash between the commit and the removal), or nothing of it
            // was ever acknowledged.
            j.remove()?;
            report.removed += 1;
        }
        for (cycle, hello, p) in pending {
            stream.update_known(|k| {
                k.geometry = Some((hello.disk_size, hello.chunk_size));
                if k.complete.is_none_or(|(c, _)| c < cycle) {
                    let end = p.journal.durable_seq().unwrap_or(0);
                    k.complete = Some((cycle, end));
                }
            });
            lock(&stream.pending).insert(cycle, p);
            report.pending_cycles += 1;
        }
        // The incomplete cycle written last is the one its agent is sending (an agent that
        // lost its state may number below an older one); the others were abandoned.
        incomplete.sort_by_key(|(r, t)| (*t, r.hello.cycle));
        let receiving = incomplete.pop().map(|(r, _)| r);
        for (r, _) in incomplete {
            r.journal.remove()?;
            report.removed += 1;
        }
        if let Some(r) = &receiving {
            stream.update_known(|k| k.geometry = Some((r.hello.disk_size, r.hello.chunk_size)));
            report.receiving_cycles += 1;
        }
        *stream.receiving.lock().await = receiving;
        Ok(())
    }

    /// A journal for `hello`'s cycle on the cache that the stream does not hold (one whose
    /// handle failed and was dropped): adopted as the cycle being received, or queued for
    /// draining when its `EndOfCycle` is durable; removed when it holds nothing acknowledged.
    pub(crate) fn adopt(
        &self,
        stream: &Stream,
        hello: &Hello,
    ) -> Result<Option<Receiving>, ReplicationError> {
        let inner = &self.inner;
        let key = StreamKey::new(&hello.item, &hello.disk, hello.cycle)?;
        let dir = key.dir(&inner.cache_dir)?;
        if !dir.exists() {
            return Ok(None);
        }
        let (journal, rec) = inner.guard.open_journal(&key, inner.journal_limits)?;
        if rec.last_seq.unwrap_or(0) == 0 {
            // Nothing but (at most) the Hello: nothing was acknowledged.
            journal.remove()?;
            return Ok(None);
        }
        let (stored, end) = read_ends(&journal, &dir)?;
        match end {
            Some(end_seq) => {
                let info = cycle_info(&hello.item, &hello.disk, hello.cycle, &stored);
                lock(&stream.pending).insert(hello.cycle, Pending { info, journal });
                stream.update_known(|k| {
                    if k.complete.is_none_or(|(c, _)| c < hello.cycle) {
                        k.complete = Some((hello.cycle, end_seq));
                    }
                });
                inner.drain_wake.notify_one();
                Ok(None)
            }
            None => Ok(Some(Receiving {
                hello: stored,
                journal,
            })),
        }
    }

    /// Moves a damaged journal out of the journal tree, to `<cache>/damaged/`; where it went.
    fn set_aside(&self, key: &StreamKey, dir: &std::path::Path) -> PathBuf {
        let damaged = self.inner.cache_dir.join(DAMAGED_DIR);
        let to = damaged.join(format!(
            "{}-{}-{}-{}",
            key.item,
            key.disk,
            key.cycle,
            ferry_store::point::now_ms()
        ));
        let moved = crate::fsutil::ensure_private_dir(&damaged)
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::rename(dir, &to).map_err(|e| e.to_string()));
        match moved {
            Ok(()) => to,
            Err(e) => {
                eprintln!(
                    "ferryd: process role: cannot move {} aside ({e}); remove it by hand",
                    dir.display()
                );
                dir.to_path_buf()
            }
        }
    }

    /// What the vault holds for `stream`'s disk (loaded once, then kept by sessions and
    /// drains).
    pub(crate) fn load_known<'a>(
        &'a self,
        stream: &'a Stream,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Known, ReplicationError>> + Send + 'a>,
    > {
        // Boxed so that its `Send` is proven here (the store's point listing is otherwise too
        // much for rustc's higher-ranked check in the generic session code).
        Box::pin(self.load_known_inner(stream))
    }

    async fn load_known_inner(&self, stream: &Stream) -> Result<Known, ReplicationError> {
        if let Some(k) = stream.known() {
            return Ok(k);
        }
        let (item, disk) = &stream.id;
        let vault_name = {
            let c = self.inner.catalog.clone();
            let i = item.clone();
            tokio::task::spawn_blocking(move || c.item(&i))
                .await
                .map_err(|e| ReplicationError::Internal(format!("reading item `{item}`: {e}")))??
                .map(|it| it.vault)
        };
        let mut known = Known::default();
        if let Some(vault_name) = vault_name
            && let Some(vault) = self.inner.vaults.get(&vault_name)
        {
            let vault_err = |source| ReplicationError::Vault {
                item: item.clone(),
                vault: vault_name.clone(),
                source: Box::new(source),
            };
            let mut names = vault.point_names(Some(item)).await.map_err(vault_err)?;
            names.sort();
            // Newest first, read one at a time until both facts are known: the newest point
            // that changed this disk says its cycle; any point holding the disk says its
            // geometry.
            for name in names.iter().rev() {
                let v = vault.clone();
                let n = name.clone();
                let p = async move { v.load_point(&n).await }
                    .await
                    .map_err(vault_err)?;
                if known.geometry.is_none()
                    && let Some(d) = p.disks.iter().find(|d| &d.name == disk)
                {
                    known.geometry = Some((d.size, d.chunk_size));
                }
                let tag = |k: &str| p.tags.iter().find(|(t, _)| t == k).map(|(_, v)| v.as_str());
                if known.committed.is_none()
                    && tag(TAG_DISK) == Some(disk.as_str())
                    && let (Some(c), Some(s)) = (
                        tag(TAG_CYCLE).and_then(|v| v.parse::<u64>().ok()),
                        tag(TAG_END_SEQ).and_then(|v| v.parse::<u64>().ok()),
                    )
                {
                    known.committed = Some((c, p.id.clone()));
                    known.complete = Some((c, s));
                }
                if known.geometry.is_some() && known.committed.is_some() {
                    break;
                }
            }
        }
        let mut k = lock(&stream.known);
        // A session or drain may have recorded newer facts meanwhile: keep the newest.
        let merged = match k.take() {
            None => known,
            Some(mut cur) => {
                cur.geometry = cur.geometry.or(known.geometry);
                if cur
                    .complete
                    .is_none_or(|(c, _)| known.complete.is_some_and(|(n, _)| n > c))
                {
                    cur.complete = known.complete.or(cur.complete);
                }
                if cur
                    .committed
                    .as_ref()
                    .is_none_or(|(c, _)| known.committed.as_ref().is_some_and(|(n, _)| n > c))
                {
                    cur.committed = known.committed.or(cur.committed);
                }
                cur
            }
        };
        *k = Some(merged.clone());
        Ok(merged)
    }

    /// The replication plan of `item` for its agent (`GET /api/v1/agent/items/{item}/replication`).
    pub async fn plan(
        &self,
        item: &Item,
        policy: &crate::policy::PolicySettings,
    ) -> Result<ReplicationPlan, ReplicationError> {
        let mut disks = Vec::with_capacity(item.disks.len());
        for d in &item.disks {
            let stream = self.stream(&item.name, &d.name);
            let known = self.load_known(&stream).await?;
            disks.push(PlanDisk {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                chunk_size: known.geometry.map_or(policy.chunk_size, |g| g.1),
                last_complete_cycle: known.complete.map(|c| c.0),
            });
        }
        Ok(ReplicationPlan {
            item: item.name.clone(),
            data_port: self.data_port(),
            paused: !replicating(item.state) || item.paused.is_some(),
            // A reprotect's first cycle compares the new source with the vault's newest point.
            resync_requested: matches!(
                item.state,
                ItemState::ResyncRequired | ItemState::Resynchronizing | ItemState::Reprotecting
            ),
            cycle_interval_seconds: policy.cycle_interval_seconds,
            app_consistent_frequency_minutes: policy.app_consistent_frequency_minutes,
            retry_schedule_seconds: policy.retry_schedule_seconds.clone(),
            resync_threshold_percent: policy.resync_threshold_percent,
            disks,
            resync_window: policy
                .resync_window
                .map(|w| ferry_proto::enroll::ResyncWindow {
                    from: w.from_text(),
                    to: w.to_text(),
                    days: w.day_names(),
                }),
            // Set by the caller, which knows the item's job.
            final_cycle: None,
        })
    }

    /// The per-item figures (backlog, rates, last error) of `item`.
    pub fn figures(&self, item: &str) -> ItemFigures {
        let mut f = lock(&self.inner.figures)
            .get(item)
            .cloned()
            .unwrap_or_default();
        f.backlog_bytes = self.backlog_bytes(item);
        f
    }

    /// Bytes journaled for `item` and not yet in the vault.
    fn backlog_bytes(&self, item: &str) -> u64 {
        let streams: Vec<Arc<Stream>> = lock(&self.inner.streams)
            .iter()
            .filter(|((i, _), _)| i == item)
            .map(|(_, s)| s.clone())
            .collect();
        let mut total = 0;
        for s in streams {
            total += lock(&s.pending)
                .values()
                .map(|p| p.journal.bytes())
                .sum::<u64>();
            if let Ok(r) = s.receiving.try_lock()
                && let Some(r) = r.as_ref()
            {
                total += r.journal.bytes();
            } else {
                total += lock(&self.inner.figures)
                    .get(item)
                    .map_or(0, |f| f.receiving_bytes);
            }
        }
        total
    }

    /// The process role's part of `/api/v1/metrics` (Prometheus text 0.0.4): the cache (free
    /// space, journals, alert level) and each item's backlog and rates.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        if let Ok(c) = self.cache_status() {
            let level = match c.level {
                journal::CacheLevel::Ok => 0,
                journal::CacheLevel::Warn => 1,
                journal::CacheLevel::Critical => 2,
            };
            metric(
                "ferry_process_cache_level",
                "gauge",
                "The process cache's alert: 0 ok, 1 below the warning free space (30% by default), 2 below the critical one (25%: agents are told Busy).",
                &[(String::new(), level.to_string())],
            );
            metric(
                "ferry_process_cache_free_ratio",
                "gauge",
                "Free share of the process cache's filesystem.",
                &[(String::new(), format!("{:.4}", c.free_percent() / 100.0))],
            );
            metric(
                "ferry_process_journal_bytes",
                "gauge",
                "Bytes the process cache's journals hold (not yet in the vault).",
                &[(String::new(), c.journal_bytes.to_string())],
            );
        }
        let items: Vec<String> = {
            let mut v: Vec<String> = lock(&self.inner.streams)
                .keys()
                .map(|(i, _)| i.clone())
                .collect();
            v.extend(lock(&self.inner.figures).keys().cloned());
            v.sort();
            v.dedup();
            v
        };
        let figures: Vec<(String, ItemFigures)> = items
            .into_iter()
            .map(|i| {
                let f = self.figures(&i);
                (i, f)
            })
            .collect();
        let per_item = |f: &dyn Fn(&ItemFigures) -> String| -> Vec<(String, String)> {
            figures
                .iter()
                .map(|(i, fig)| (format!("{{item=\"{i}\"}}"), f(fig)))
                .collect()
        };
        metric(
            "ferry_item_backlog_bytes",
            "gauge",
            "Bytes of the item journaled on the process cache and not yet in the vault.",
            &per_item(&|f| f.backlog_bytes.to_string()),
        );
        metric(
            "ferry_item_ingest_bytes_per_second",
            "gauge",
            "Bytes received from the item's agent per second, over the last minute.",
            &per_item(&|f| format!("{:.1}", f.ingest.per_second())),
        );
        metric(
            "ferry_item_upload_bytes_per_second",
            "gauge",
            "Cycle bytes of the item drained into the vault per second, over the last minute.",
            &per_item(&|f| format!("{:.1}", f.upload.per_second())),
        );
        metric(
            "ferry_item_replication_sessions",
            "gauge",
            "Replication sessions of the item open now.",
            &per_item(&|f| f.sessions.to_string()),
        );
        s
    }

    /// The cache's state: free space, journals, level.
    pub fn cache_status(&self) -> Result<journal::CacheStatus, JournalError> {
        self.inner.guard.status()
    }

    pub(crate) fn with_figures(&self, item: &str, f: impl FnOnce(&mut ItemFigures)) {
        let mut all = lock(&self.inner.figures);
        f(all.entry(item.to_string()).or_default());
    }
}

/// Whether an item in `state` takes replication (the others are paused for the agent).
pub fn replicating(state: ItemState) -> bool {
    matches!(
        state,
        ItemState::InitialReplication
            | ItemState::Protected
            | ItemState::ResyncRequired
            | ItemState::Resynchronizing
            | ItemState::Reprotecting
    )
}

pub(super) fn cycle_info(item: &str, disk: &str, cycle: u64, hello: &Hello) -> CycleInfo {
    CycleInfo {
        item: item.to_string(),
        disk: disk.to_string(),
        cycle,
        kind: hello.cycle_kind,
        disk_size: hello.disk_size,
        chunk_size: hello.chunk_size,
        agent: hello.agent.clone(),
    }
}

/// A journal's `Hello` (record 0) and, if its last record is an `EndOfCycle`, that `seq`.
fn read_ends(j: &Journal, dir: &std::path::Path) -> Result<(Hello, Option<u64>), ReplicationError> {
    let foreign = |reason: String| ReplicationError::Foreign {
        dir: dir.to_path_buf(),
        reason,
    };
    let limits = frame::Limits::protocol();
    let decode = |payload: &[u8]| match frame::decode_agent(payload, &limits) {
        Ok(Decoded::Frame(f, n)) if n == payload.len() => Ok(f),
        Ok(_) => Err("is not exactly one frame".to_string()),
        Err(e) => Err(e.to_string()),
    };
    if j.first_seq() != Some(0) {
        return Err(foreign(format!(
            "its first record is seq {:?}, not the cycle's Hello (seq 0)",
            j.first_seq()
        )));
    }
    let (_, payload) = j
        .replay(0)?
        .next()
        .ok_or_else(|| foreign("holds no record".into()))??;
    let hello = match decode(&payload).map_err(|e| foreign(format!("record 0 {e}")))? {
        AgentFrame::Hello(h) => h,
        _ => return Err(foreign("record 0 is not a Hello".into())),
    };
    let last = j.durable_seq().unwrap_or(0);
    let mut end = None;
    if last > 0 {
        let (seq, payload) = j
            .replay(last)?
            .next()
            .ok_or_else(|| foreign(format!("record {last} cannot be read back")))??;
        if let AgentFrame::EndOfCycle(e) =
            decode(&payload).map_err(|e| foreign(format!("record {seq} {e}")))?
        {
            end = Some(e.seq);
        }
    }
    Ok((hello, end))
}
