//! Protected items and jobs in the catalog.
//!
//! Three tables: `items` (name → item record), `jobs` (id → job record, ids sort by creation
//! time) and `job_queue` (id → empty: the queued jobs, oldest first — the job runner's
//! queue survives restarts because it is the catalog). An item and the job that changes it
//! are written in the same transaction, so an item is never in a transient state without
//! the job that will settle it, and a job never ends without its item landing in the state
//! the state machine (`crate::item`) gives.
//!
//! Bounds: at most [`MAX_ITEMS`] items; at most [`MAX_JOBS`] job records (the oldest
//! finished ones are dropped to make room); a job's log at most [`MAX_JOB_LOG_BYTES`], later
//! lines counted, not kept. An item holds at most one queued or running job, so the queue
//! holds at most one job per item.

use std::ops::Bound;

use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

use super::record::{parse, to_vec, version};
use super::{Catalog, CatalogError, MAX_PAGE, Page, Result};
use crate::item::{
    self, Direction, Disk, Event, FailoverMode, FailoverRecord, FailoverRequest, Item, ItemState,
    Operation,
};

pub(super) const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
pub(super) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Queued job ids; values are empty.
pub(super) const JOB_QUEUE: TableDefinition<&str, &[u8]> = TableDefinition::new("job_queue");

/// Protected items kept.
pub const MAX_ITEMS: u64 = 10_000;
/// Job records kept (finished ones beyond this are dropped, oldest first).
pub const MAX_JOBS: u64 = 10_000;
/// Bytes of log lines kept per job.
pub const MAX_JOB_LOG_BYTES: usize = 16 << 10;
/// Longest log line kept (longer ones are cut).
const MAX_LINE: usize = 1024;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for a runner.
    Queued,
    /// Being run.
    Running,
    /// Done.
    Succeeded,
    /// Ended with an error (in `error`).
    Failed,
    /// Cancelled while queued.
    Cancelled,
}

impl JobState {
    /// The name used in the API and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// One line of a job's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLine {
    /// When, Unix milliseconds.
    pub t_ms: u64,
    /// What happened.
    pub msg: String,
}

/// An operation on a protected item, and its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Id (sorts by creation time).
    pub id: String,
    /// What it does.
    pub kind: Operation,
    /// The item it acts on.
    pub item: String,
    /// Where it stands.
    pub state: JobState,
    /// The item's state before the job (restored if it fails or is cancelled; `None` for
    /// `enable`, whose item did not exist).
    pub from_state: Option<ItemState>,
    /// Creation, start and end times, Unix milliseconds.
    pub created_ms: u64,
    /// When a runner took it.
    pub started_ms: Option<u64>,
    /// When it ended.
    pub ended_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// What it did, in order (bounded by [`MAX_JOB_LOG_BYTES`]).
    pub log: Vec<JobLine>,
    /// Lines not kept because the log was full.
    pub log_dropped: u64,
    /// What a `failover` or `test-failover` job was asked for.
    pub failover: Option<FailoverRequest>,
    /// `reprotect`: the agent that becomes the item's source.
    pub agent: Option<String>,
}

/// A change to an item's settings (`None`: unchanged).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemPatch {
    /// New description (`Some(None)` clears it).
    pub description: Option<Option<String>>,
    /// New policy.
    pub policy: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskV1 {
    name: String,
    size_bytes: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemV1 {
    v: u8,
    name: String,
    description: Option<String>,
    vault: String,
    policy: String,
    disks: Vec<DiskV1>,
    state: String,
    direction: String,
    active_job: Option<String>,
    revision: u64,
    created_ms: u64,
    updated_ms: u64,
    /// Added after version 1's first catalogs: absent when not paused (so older records read
    /// unchanged and unpaused items are written as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    paused: Option<PausedV1>,
    /// Added after version 1's first catalogs, like `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    test_failover: Option<FailoverRecordV1>,
    /// Added after version 1's first catalogs, like `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failover: Option<FailoverRecordV1>,
    /// Added after version 1's first catalogs, like `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source_agent: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverRecordV1 {
    job: String,
    mode: String,
    point: String,
    location: String,
    at_ms: u64,
}

impl FailoverRecordV1 {
    fn of(r: &FailoverRecord) -> Self {
        Self {
            job: r.job.clone(),
            mode: r.mode.as_str().into(),
            point: r.point.clone(),
            location: r.location.clone(),
            at_ms: r.at_ms,
        }
    }

    fn record(self) -> std::result::Result<FailoverRecord, String> {
        Ok(FailoverRecord {
            mode: FailoverMode::parse(&self.mode).ok_or_else(|| format!("mode `{}`", self.mode))?,
            job: self.job,
            point: self.point,
            location: self.location,
            at_ms: self.at_ms,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverRequestV1 {
    mode: String,
    point: String,
    format: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    in_place: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PausedV1 {
    by: String,
    at_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobV1 {
    v: u8,
    id: String,
    kind: String,
    item: String,
    state: String,
    from_state: Option<String>,
    created_ms: u64,
    started_ms: Option<u64>,
    ended_ms: Option<u64>,
    error: Option<String>,
    log: Vec<JobLine>,
    log_dropped: u64,
    /// Added after version 1's first catalogs: present only on failover jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failover: Option<FailoverRequestV1>,
    /// Added after version 1's first catalogs: present only on reprotect jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
}

/// Encodes an `items` record.
pub fn encode_item(i: &Item) -> Vec<u8> {
    to_vec(&ItemV1 {
        v: super::RECORD_VERSION,
        name: i.name.clone(),
        description: i.description.clone(),
        vault: i.vault.clone(),
        policy: i.policy.clone(),
        disks: i
            .disks
            .iter()
            .map(|d| DiskV1 {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
            })
            .collect(),
        state: i.state.as_str().into(),
        direction: i.direction.as_str().into(),
        active_job: i.active_job.clone(),
        revision: i.revision,
        created_ms: i.created_ms,
        updated_ms: i.updated_ms,
        paused: i.paused.as_ref().map(|p| PausedV1 {
            by: p.by.clone(),
            at_ms: p.at_ms,
        }),
        test_failover: i.test_failover.as_ref().map(FailoverRecordV1::of),
        failover: i.failover.as_ref().map(FailoverRecordV1::of),
        source_agent: i.source_agent.clone(),
    })
}

/// Decodes an `items` record stored under `key`, checking its rules.
pub fn decode_item(key: &str, b: &[u8]) -> Result<Item> {
    let t = "items";
    let bad = |reason: String| CatalogError::BadRecord {
        table: t,
        key: key.to_string(),
        reason,
    };
    version(t, key, b)?;
    let r: ItemV1 = parse(t, key, b)?;
    if r.name != key {
        return Err(bad(format!("holds name `{}`", r.name)));
    }
    let i = Item {
        state: ItemState::parse(&r.state).ok_or_else(|| bad(format!("state `{}`", r.state)))?,
        direction: Direction::parse(&r.direction)
            .ok_or_else(|| bad(format!("direction `{}`", r.direction)))?,
        name: r.name,
        description: r.description,
        vault: r.vault,
        policy: r.policy,
        disks: r
            .disks
            .into_iter()
            .map(|d| Disk {
                name: d.name,
                size_bytes: d.size_bytes,
            })
            .collect(),
        active_job: r.active_job,
        revision: r.revision,
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        paused: r.paused.map(|p| item::Paused {
            by: p.by,
            at_ms: p.at_ms,
        }),
        test_failover: r
            .test_failover
            .map(FailoverRecordV1::record)
            .transpose()
            .map_err(|e| bad(format!("test_failover.{e}")))?,
        failover: r
            .failover
            .map(FailoverRecordV1::record)
            .transpose()
            .map_err(|e| bad(format!("failover.{e}")))?,
        source_agent: r.source_agent,
    };
    if i.paused
        .as_ref()
        .is_some_and(|p| p.by.is_empty() || p.by.len() > 128)
    {
        return Err(bad("paused.by is not 1..=128 bytes".into()));
    }
    item::check_name("item", &i.name)
        .and_then(|()| item::check_disks(&i.disks))
        .and_then(|()| {
            i.description
                .as_deref()
                .map_or(Ok(()), item::check_description)
        })
        .map_err(bad)?;
    if i.state.is_transient() && i.active_job.is_none() {
        return Err(bad(format!("is {} without a job", i.state)));
    }
    Ok(i)
}

/// Encodes a `jobs` record.
pub fn encode_job(j: &Job) -> Vec<u8> {
    to_vec(&JobV1 {
        v: super::RECORD_VERSION,
        id: j.id.clone(),
        kind: j.kind.as_str().into(),
        item: j.item.clone(),
        state: j.state.as_str().into(),
        from_state: j.from_state.map(|s| s.as_str().into()),
        created_ms: j.created_ms,
        started_ms: j.started_ms,
        ended_ms: j.ended_ms,
        error: j.error.clone(),
        log: j.log.clone(),
        log_dropped: j.log_dropped,
        failover: j.failover.as_ref().map(|f| FailoverRequestV1 {
            mode: f.mode.as_str().into(),
            point: f.point.clone(),
            format: f.format.clone(),
            in_place: f.in_place.clone(),
        }),
        agent: j.agent.clone(),
    })
}

/// Decodes a `jobs` record stored under `key`.
pub fn decode_job(key: &str, b: &[u8]) -> Result<Job> {
    let t = "jobs";
    let bad = |reason: String| CatalogError::BadRecord {
        table: t,
        key: key.to_string(),
        reason,
    };
    version(t, key, b)?;
    let r: JobV1 = parse(t, key, b)?;
    if r.id != key {
        return Err(bad(format!("holds id `{}`", r.id)));
    }
    let state = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ]
    .into_iter()
    .find(|s| s.as_str() == r.state)
    .ok_or_else(|| bad(format!("state `{}`", r.state)))?;
    let from_state = match r.from_state {
        Some(s) => Some(ItemState::parse(&s).ok_or_else(|| bad(format!("from_state `{s}`")))?),
        None => None,
    };
    let failover = match r.failover {
        Some(f) => Some(FailoverRequest {
            mode: FailoverMode::parse(&f.mode)
                .ok_or_else(|| bad(format!("failover.mode `{}`", f.mode)))?,
            point: f.point,
            format: f.format,
            in_place: f.in_place,
        }),
        None => None,
    };
    Ok(Job {
        failover,
        agent: r.agent,
        kind: Operation::parse(&r.kind).ok_or_else(|| bad(format!("kind `{}`", r.kind)))?,
        id: r.id,
        item: r.item,
        state,
        from_state,
        created_ms: r.created_ms,
        started_ms: r.started_ms,
        ended_ms: r.ended_ms,
        error: r.error,
        log: r.log,
        log_dropped: r.log_dropped,
    })
}

impl Job {
    fn queued(kind: Operation, item: &str, from_state: Option<ItemState>, now_ms: u64) -> Job {
        Job {
            id: ferry_store::point::new_point_id(now_ms),
            kind,
            item: item.to_string(),
            state: JobState::Queued,
            from_state,
            created_ms: now_ms,
            started_ms: None,
            ended_ms: None,
            error: None,
            log: Vec::new(),
            log_dropped: 0,
            failover: None,
            agent: None,
        }
    }

    /// Appends a log line, within [`MAX_JOB_LOG_BYTES`].
    pub fn push_log(&mut self, t_ms: u64, msg: &str) {
        let mut msg: String = msg.chars().filter(|c| !c.is_control()).collect();
        if msg.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push('…');
        }
        let used: usize = self.log.iter().map(|l| l.msg.len() + 32).sum();
        if used + msg.len() + 32 > MAX_JOB_LOG_BYTES {
            self.log_dropped += 1;
            return;
        }
        self.log.push(JobLine { t_ms, msg });
    }
}

impl Catalog {
    /// One item.
    pub fn item(&self, name: &str) -> Result<Option<Item>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ITEMS).map_err(|e| self.err(e))?;
        let v = t.get(name).map_err(|e| self.err(e))?;
        v.map(|v| decode_item(name, v.value())).transpose()
    }

    /// Items named after `after`, at most `limit` (capped at [`MAX_PAGE`]).
    pub fn items_page(&self, after: Option<&str>, limit: usize) -> Result<Page<Item>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(ITEMS).map_err(|e| self.err(e))?;
        self.page(&t, after, limit, decode_item, |x| &x.name)
    }

    fn item_in(&self, w: &WriteTransaction, name: &str) -> Result<Item> {
        let t = w.open_table(ITEMS).map_err(|e| self.err(e))?;
        let v = t.get(name).map_err(|e| self.err(e))?;
        match v {
            Some(v) => decode_item(name, v.value()),
            None => Err(CatalogError::ItemNotFound(name.to_string())),
        }
    }

    fn put_item(&self, w: &WriteTransaction, i: &Item) -> Result<()> {
        let mut t = w.open_table(ITEMS).map_err(|e| self.err(e))?;
        t.insert(i.name.as_str(), &encode_item(i)[..])
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn job_in(&self, w: &WriteTransaction, id: &str) -> Result<Job> {
        let t = w.open_table(JOBS).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        match v {
            Some(v) => decode_job(id, v.value()),
            None => Err(CatalogError::JobNotFound(id.to_string())),
        }
    }

    fn put_job(&self, w: &WriteTransaction, j: &Job) -> Result<()> {
        let mut t = w.open_table(JOBS).map_err(|e| self.err(e))?;
        t.insert(j.id.as_str(), &encode_job(j)[..])
            .map_err(|e| self.err(e))?;
        let mut q = w.open_table(JOB_QUEUE).map_err(|e| self.err(e))?;
        if j.state == JobState::Queued {
            q.insert(j.id.as_str(), &[][..]).map_err(|e| self.err(e))?;
        } else {
            q.remove(j.id.as_str()).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Inserts a new queued job, first dropping the oldest finished jobs beyond
    /// [`MAX_JOBS`]. The id is unique even when two jobs are created in one millisecond.
    fn insert_new_job(&self, w: &WriteTransaction, mut j: Job) -> Result<Job> {
        {
            let mut t = w.open_table(JOBS).map_err(|e| self.err(e))?;
            while t.get(j.id.as_str()).map_err(|e| self.err(e))?.is_some() {
                j.id = ferry_store::point::new_point_id(j.created_ms);
            }
            let mut n = t.len().map_err(|e| self.err(e))?;
            if n >= MAX_JOBS {
                let mut drop = Vec::new();
                for entry in t.iter().map_err(|e| self.err(e))? {
                    if n < MAX_JOBS {
                        break;
                    }
                    let (k, v) = entry.map_err(|e| self.err(e))?;
                    if decode_job(k.value(), v.value())?.state.is_final() {
                        drop.push(k.value().to_string());
                        n -= 1;
                    }
                }
                for k in drop {
                    t.remove(k.as_str()).map_err(|e| self.err(e))?;
                }
            }
        }
        self.put_job(w, &j)?;
        Ok(j)
    }

    /// Enables protection of a new item: writes it in state `enabling` with a queued
    /// `enable` job, in one transaction. Refuses an invalid item, an existing name, a vault or
    /// policy that does not exist, and more than [`MAX_ITEMS`].
    #[allow(
        clippy::too_many_arguments,
        reason = "one item's fields, named at the call"
    )]
    pub fn create_item(
        &self,
        name: &str,
        description: Option<String>,
        vault: &str,
        policy: &str,
        disks: Vec<Disk>,
        now_ms: u64,
    ) -> Result<(Item, Job)> {
        item::check_name("item", name).map_err(CatalogError::InvalidItem)?;
        item::check_disks(&disks).map_err(CatalogError::InvalidItem)?;
        if let Some(d) = &description {
            item::check_description(d).map_err(CatalogError::InvalidItem)?;
        }
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let pair = {
            {
                let t = w.open_table(ITEMS).map_err(|e| self.err(e))?;
                if t.get(name).map_err(|e| self.err(e))?.is_some() {
                    return Err(CatalogError::ItemExists(name.to_string()));
                }
                if t.len().map_err(|e| self.err(e))? >= MAX_ITEMS {
                    return Err(CatalogError::TooManyItems);
                }
            }
            self.check_refs(&w, Some(vault), Some(policy))?;
            let job =
                self.insert_new_job(&w, Job::queued(Operation::Enable, name, None, now_ms))?;
            let it = Item {
                name: name.to_string(),
                description,
                vault: vault.to_string(),
                policy: policy.to_string(),
                disks,
                state: ItemState::Enabling,
                direction: Direction::PrimaryToRecovery,
                active_job: Some(job.id.clone()),
                revision: self.next_revision(&w)?,
                created_ms: now_ms,
                updated_ms: now_ms,
                paused: None,
                test_failover: None,
                failover: None,
                source_agent: None,
            };
            self.put_item(&w, &it)?;
            (it, job)
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(pair)
    }

    fn check_refs(
        &self,
        w: &WriteTransaction,
        vault: Option<&str>,
        policy: Option<&str>,
    ) -> Result<()> {
        if let Some(v) = vault {
            let t = w.open_table(super::VAULTS).map_err(|e| self.err(e))?;
            if t.get(v).map_err(|e| self.err(e))?.is_none() {
                return Err(CatalogError::MissingReference {
                    what: "vault",
                    name: v.to_string(),
                });
            }
        }
        if let Some(p) = policy {
            let t = w.open_table(super::POLICIES).map_err(|e| self.err(e))?;
            if t.get(p).map_err(|e| self.err(e))?.is_none() {
                return Err(CatalogError::MissingReference {
                    what: "policy",
                    name: p.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Changes an item's settings (description, policy), if its revision is one of `expect`
    /// (when given). A patch that changes nothing writes nothing.
    pub fn update_item(
        &self,
        name: &str,
        expect: Option<&[u64]>,
        patch: &ItemPatch,
        now_ms: u64,
    ) -> Result<Item> {
        if let Some(Some(d)) = &patch.description {
            item::check_description(d).map_err(CatalogError::InvalidItem)?;
        }
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let cur = self.item_in(&w, name)?;
        Self::expect_revision(&cur, expect)?;
        let mut next = cur.clone();
        if let Some(d) = &patch.description {
            next.description.clone_from(d);
        }
        if let Some(p) = &patch.policy {
            self.check_refs(&w, None, Some(p))?;
            next.policy.clone_from(p);
        }
        if next == cur {
            return Ok(cur);
        }
        next.revision = self.next_revision(&w)?;
        next.updated_ms = now_ms;
        self.put_item(&w, &next)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(next)
    }

    /// Pauses (`by` given) or resumes (`None`) item `name`'s replication, if its revision
    /// is one of `expect` (when given). Pausing a paused item, or resuming one that is not,
    /// writes nothing.
    pub fn set_paused(
        &self,
        name: &str,
        by: Option<&str>,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<Item> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let cur = self.item_in(&w, name)?;
        Self::expect_revision(&cur, expect)?;
        if cur.paused.is_some() == by.is_some() {
            return Ok(cur);
        }
        let mut next = cur;
        next.paused = by.map(|b| item::Paused {
            by: b.to_string(),
            at_ms: now_ms,
        });
        next.revision = self.next_revision(&w)?;
        next.updated_ms = now_ms;
        self.put_item(&w, &next)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(next)
    }

    fn expect_revision(cur: &Item, expect: Option<&[u64]>) -> Result<()> {
        if let Some(list) = expect
            && !list.contains(&cur.revision)
        {
            return Err(CatalogError::ItemRevisionMismatch {
                name: cur.name.clone(),
                current: cur.revision,
            });
        }
        Ok(())
    }

    /// Starts `op` on item `name`: checks the state machine and that no job holds the item,
    /// moves it to the operation's running state and queues the job, in one transaction.
    pub fn begin_operation(
        &self,
        name: &str,
        op: Operation,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<(Item, Job)> {
        self.begin_operation_with(name, op, None, expect, now_ms)
    }

    /// [`Catalog::begin_operation`] with what a failover job is asked for. Also refuses what
    /// the item's own records forbid: a second test failover before the first is cleaned up,
    /// a cleanup with nothing to clean, a disable while a test failover's copy exists.
    pub fn begin_operation_with(
        &self,
        name: &str,
        op: Operation,
        failover: Option<FailoverRequest>,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<(Item, Job)> {
        self.begin_job(name, op, failover, None, expect, now_ms)
    }

    /// Starts `reprotect` of item `name`: agent `agent` becomes its source.
    pub fn begin_reprotect(
        &self,
        name: &str,
        agent: &str,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<(Item, Job)> {
        self.begin_job(
            name,
            Operation::Reprotect,
            None,
            Some(agent.to_string()),
            expect,
            now_ms,
        )
    }

    fn begin_job(
        &self,
        name: &str,
        op: Operation,
        failover: Option<FailoverRequest>,
        agent: Option<String>,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<(Item, Job)> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let pair = self.begin_job_in(&w, name, op, failover, agent, expect, now_ms)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(pair)
    }

    /// Starts a failover of every member of group `group` in one transaction: each member
    /// gets its job, or (the first refusal naming its item) none does. `members` must be
    /// exactly the group's items, each with its request (the caller resolved the points
    /// against the group as it read it; a group changed since is refused).
    pub fn begin_group_failover(
        &self,
        group: &str,
        members: Vec<(String, FailoverRequest)>,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<Vec<(Item, Job)>> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let g = self.group_for_change(&w, group, expect)?;
        let mut have: Vec<&str> = g.items.iter().map(String::as_str).collect();
        let mut want: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
        have.sort_unstable();
        want.sort_unstable();
        if have != want {
            return Err(CatalogError::GroupChanged(group.to_string()));
        }
        let mut out = Vec::with_capacity(members.len());
        for (name, req) in members {
            let op = if req.mode == FailoverMode::Test {
                Operation::TestFailover
            } else {
                Operation::Failover
            };
            out.push(self.begin_job_in(&w, &name, op, Some(req), None, None, now_ms)?);
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn begin_job_in(
        &self,
        w: &redb::WriteTransaction,
        name: &str,
        op: Operation,
        failover: Option<FailoverRequest>,
        agent: Option<String>,
        expect: Option<&[u64]>,
        now_ms: u64,
    ) -> Result<(Item, Job)> {
        let pair = {
            let mut it = self.item_in(w, name)?;
            Self::expect_revision(&it, expect)?;
            if let Some(job) = &it.active_job {
                return Err(CatalogError::ItemBusy {
                    name: name.to_string(),
                    job: job.clone(),
                });
            }
            op.check(it.state)
                .map_err(|reason| CatalogError::IllegalTransition {
                    name: name.to_string(),
                    reason,
                })?;
            let refusal = match (op, &it.test_failover) {
                (Operation::TestFailover, Some(t)) => Some(format!(
                    "test failover `{}` of point `{}` still exists at {}: clean it up first (test-failover-cleanup)",
                    t.job, t.point, t.location
                )),
                (Operation::Disable, Some(t)) => Some(format!(
                    "test failover `{}` still exists at {}: clean it up first (test-failover-cleanup)",
                    t.job, t.location
                )),
                (Operation::TestFailoverCleanup, None) => {
                    Some("there is no test failover to clean up".to_string())
                }
                _ => None,
            }
            .or_else(|| {
                let f = failover.as_ref()?;
                if f.mode == FailoverMode::Planned && it.paused.is_some() {
                    return Some(
                        "its replication is paused, so its agent cannot send the final cycle: resume it first (or fail over unplanned)"
                            .to_string(),
                    );
                }
                f.in_place
                    .iter()
                    .find(|(d, _)| !it.disks.iter().any(|x| &x.name == d))
                    .map(|(d, _)| format!("it has no disk `{d}` to write in place"))
            });
            if let Some(why) = refusal {
                return Err(CatalogError::IllegalTransition {
                    name: name.to_string(),
                    reason: format!("`{op}` is not possible for this item: {why}"),
                });
            }
            let mut queued = Job::queued(op, name, Some(it.state), now_ms);
            queued.failover = failover;
            queued.agent = agent;
            let job = self.insert_new_job(w, queued)?;
            if let Some(s) = op.during() {
                it.state = s;
            }
            it.active_job = Some(job.id.clone());
            it.revision = self.next_revision(w)?;
            it.updated_ms = now_ms;
            self.put_item(w, &it)?;
            (it, job)
        };
        Ok(pair)
    }

    /// `reprotect` job `job`: the item replicates `direction` from now on, from `agent`.
    pub fn set_source(
        &self,
        name: &str,
        job: &str,
        agent: &str,
        direction: Direction,
        now_ms: u64,
    ) -> Result<Item> {
        self.update_held_item(name, job, now_ms, |it| {
            it.source_agent = Some(agent.to_string());
            it.direction = direction;
        })
    }

    /// Records where failover job `job` put the machine (`test`: the item's test failover;
    /// else its failover), or clears the record (`None`).
    pub fn set_failover_record(
        &self,
        name: &str,
        job: &str,
        test: bool,
        record: Option<FailoverRecord>,
        now_ms: u64,
    ) -> Result<Item> {
        self.update_held_item(name, job, now_ms, |it| {
            if test {
                it.test_failover = record;
            } else {
                it.failover = record;
            }
        })
    }

    /// Changes item `name` with `change`, only while job `job` holds it: a job that lost its
    /// item changes nothing.
    fn update_held_item(
        &self,
        name: &str,
        job: &str,
        now_ms: u64,
        change: impl FnOnce(&mut Item),
    ) -> Result<Item> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut it = self.item_in(&w, name)?;
        if it.active_job.as_deref() != Some(job) {
            return Err(CatalogError::JobState {
                id: job.to_string(),
                state: "running",
                reason: "the job no longer holds its item",
            });
        }
        change(&mut it);
        it.revision = self.next_revision(&w)?;
        it.updated_ms = now_ms;
        self.put_item(&w, &it)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(it)
    }

    /// Applies a replication event to item `name` (see [`ItemState::on_event`]); returns the
    /// item, changed or not. An item held by a job is left alone.
    pub fn apply_event(&self, name: &str, event: Event, now_ms: u64) -> Result<Item> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut it = self.item_in(&w, name)?;
        let Some(next) = it.state.on_event(event).filter(|_| it.active_job.is_none()) else {
            return Ok(it);
        };
        it.state = next;
        it.revision = self.next_revision(&w)?;
        it.updated_ms = now_ms;
        self.put_item(&w, &it)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(it)
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(JOBS).map_err(|e| self.err(e))?;
        let v = t.get(id).map_err(|e| self.err(e))?;
        v.map(|v| decode_job(id, v.value())).transpose()
    }

    /// Jobs, newest first: those created before job `before` (all when `None`), at most
    /// `limit` (capped at [`MAX_PAGE`]), only those of item `item` when given. `next_after`
    /// is the `before` of the next page.
    pub fn jobs_page(
        &self,
        before: Option<&str>,
        limit: usize,
        item: Option<&str>,
    ) -> Result<Page<Job>> {
        let limit = limit.clamp(1, MAX_PAGE);
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(JOBS).map_err(|e| self.err(e))?;
        let upper = match before {
            Some(b) => Bound::Excluded(b),
            None => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut more = false;
        for entry in t
            .range::<&str>((Bound::Unbounded, upper))
            .map_err(|e| self.err(e))?
            .rev()
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let j = decode_job(k.value(), v.value())?;
            if item.is_some_and(|i| i != j.item) {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(j);
        }
        let next_after = if more {
            items.last().map(|j: &Job| j.id.clone())
        } else {
            None
        };
        Ok(Page { items, next_after })
    }

    /// The oldest queued job, moved to `running` (in one transaction, so two runners never
    /// take the same job).
    pub fn take_queued_job(&self, now_ms: u64) -> Result<Option<Job>> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let id = {
            let q = w.open_table(JOB_QUEUE).map_err(|e| self.err(e))?;
            let first = q.first().map_err(|e| self.err(e))?;
            first.map(|(k, _)| k.value().to_string())
        };
        let Some(id) = id else {
            return Ok(None);
        };
        let mut j = self.job_in(&w, &id)?;
        j.state = JobState::Running;
        j.started_ms = Some(now_ms);
        self.put_job(&w, &j)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(Some(j))
    }

    /// Appends a line to a job's log.
    pub fn log_job(&self, id: &str, now_ms: u64, msg: &str) -> Result<()> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut j = self.job_in(&w, id)?;
        j.push_log(now_ms, msg);
        self.put_job(&w, &j)?;
        w.commit().map_err(|e| self.err(e))
    }

    /// Ends running job `id`: on success the item lands where the state machine says (and
    /// `event`, when given, is applied after: an `enable` whose vault already holds points
    /// is `protected` at once), or is removed (`disable`); on failure it returns to its
    /// state before the job (an item whose `enable` failed is removed: it never existed) and
    /// the job's log ends with the error. Job and item are written in one transaction.
    pub fn finish_job(
        &self,
        id: &str,
        outcome: std::result::Result<Option<Event>, String>,
        now_ms: u64,
    ) -> Result<Job> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut j = self.job_in(&w, id)?;
        if j.state != JobState::Running {
            return Err(CatalogError::JobState {
                id: id.to_string(),
                state: j.state.as_str(),
                reason: "only a running job can end",
            });
        }
        let landing = match &outcome {
            _ if j.kind.keeps_state() => j.from_state,
            Ok(event) => j.kind.after_success().map(|s| match event {
                Some(e) => s.on_event(*e).unwrap_or(s),
                None => s,
            }),
            Err(_) => j.from_state,
        };
        self.settle_item(&w, &j, landing, now_ms)?;
        j.state = if outcome.is_ok() {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        if let Err(e) = &outcome {
            j.push_log(now_ms, &format!("failed: {e}"));
        }
        j.error = outcome.err();
        j.ended_ms = Some(now_ms);
        self.put_job(&w, &j)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(j)
    }

    /// Moves job `j`'s item to `landing` and releases it (`None`: removes it).
    fn settle_item(
        &self,
        w: &WriteTransaction,
        j: &Job,
        landing: Option<ItemState>,
        now_ms: u64,
    ) -> Result<()> {
        let mut it = match self.item_in(w, &j.item) {
            Ok(it) => it,
            Err(CatalogError::ItemNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if it.active_job.as_deref() != Some(j.id.as_str()) {
            return Ok(());
        }
        match landing {
            Some(s) => {
                it.state = s;
                it.active_job = None;
                it.revision = self.next_revision(w)?;
                it.updated_ms = now_ms;
                self.put_item(w, &it)?;
            }
            None => {
                {
                    let mut t = w.open_table(ITEMS).map_err(|e| self.err(e))?;
                    t.remove(it.name.as_str()).map_err(|e| self.err(e))?;
                }
                self.forget_item_in(w, &it.name)?;
            }
        }
        Ok(())
    }

    /// Cancels queued job `id`; its item returns to its state before the job (an item whose
    /// `enable` is cancelled is removed). A running or ended job is refused.
    pub fn cancel_job(&self, id: &str, now_ms: u64) -> Result<Job> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut j = self.job_in(&w, id)?;
        if j.state != JobState::Queued {
            return Err(CatalogError::JobState {
                id: id.to_string(),
                state: j.state.as_str(),
                reason: "only a queued job can be cancelled",
            });
        }
        self.settle_item(&w, &j, j.from_state, now_ms)?;
        j.state = JobState::Cancelled;
        j.ended_ms = Some(now_ms);
        j.push_log(now_ms, "cancelled before it started");
        self.put_job(&w, &j)?;
        w.commit().map_err(|e| self.err(e))?;
        Ok(j)
    }

    /// At start: jobs a previous run left `running` (it stopped or crashed mid-job) are
    /// queued again — every job is written to be run again from its start — with a log line
    /// saying so. Returns how many.
    pub fn requeue_interrupted_jobs(&self, now_ms: u64) -> Result<usize> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let running: Vec<Job> = {
            let t = w.open_table(JOBS).map_err(|e| self.err(e))?;
            let mut v = Vec::new();
            for entry in t.iter().map_err(|e| self.err(e))? {
                let (k, val) = entry.map_err(|e| self.err(e))?;
                let j = decode_job(k.value(), val.value())?;
                if j.state == JobState::Running {
                    v.push(j);
                }
            }
            v
        };
        let n = running.len();
        for mut j in running {
            j.state = JobState::Queued;
            j.started_ms = None;
            j.push_log(now_ms, "interrupted by a stop of ferryd; queued again");
            self.put_job(&w, &j)?;
        }
        w.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }
}

/// How many records of each kind, for `/metrics`.
#[derive(Debug, Default)]
pub struct Census {
    /// Items by state.
    pub items_by_state: std::collections::HashMap<ItemState, u64>,
    /// Job records by state name.
    pub jobs_by_state: std::collections::HashMap<&'static str, u64>,
    /// Active admin tokens.
    pub active_tokens: u64,
    /// Policies.
    pub policies: u64,
}

impl Catalog {
    /// Counts items and jobs by state, active tokens and policies, in one read transaction.
    pub fn census(&self) -> Result<Census> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let mut c = Census::default();
        let t = r.open_table(ITEMS).map_err(|e| self.err(e))?;
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            *c.items_by_state
                .entry(decode_item(k.value(), v.value())?.state)
                .or_default() += 1;
        }
        let t = r.open_table(JOBS).map_err(|e| self.err(e))?;
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            *c.jobs_by_state
                .entry(decode_job(k.value(), v.value())?.state.as_str())
                .or_default() += 1;
        }
        let t = r.open_table(super::ADMIN_TOKENS).map_err(|e| self.err(e))?;
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            c.active_tokens +=
                u64::from(super::record::decode_admin_token(k.value(), v.value())?.is_active());
        }
        c.policies = r
            .open_table(super::POLICIES)
            .map_err(|e| self.err(e))?
            .len()
            .map_err(|e| self.err(e))?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::VaultEntry;
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/catalog-v1");

    fn v1_item() -> Item {
        Item {
            name: "web-01".into(),
            description: Some("front end".into()),
            vault: "default".into(),
            policy: "default".into(),
            disks: vec![
                Disk {
                    name: "os".into(),
                    size_bytes: 32 << 30,
                },
                Disk {
                    name: "data".into(),
                    size_bytes: 100 << 30,
                },
            ],
            state: ItemState::Protected,
            direction: Direction::PrimaryToRecovery,
            active_job: None,
            revision: 9,
            created_ms: 1_795_690_000_000,
            updated_ms: 1_795_690_100_000,
            paused: None,
            test_failover: None,
            failover: None,
            source_agent: None,
        }
    }

    fn v1_job() -> Job {
        Job {
            id: "20261126T170000.000Z-0badf00d".into(),
            kind: Operation::Enable,
            item: "web-01".into(),
            state: JobState::Succeeded,
            from_state: None,
            created_ms: 1_795_690_000_000,
            started_ms: Some(1_795_690_000_010),
            ended_ms: Some(1_795_690_000_050),
            error: None,
            log: vec![JobLine {
                t_ms: 1_795_690_000_020,
                msg: "checking vault `default`".into(),
            }],
            log_dropped: 0,
            failover: None,
            agent: None,
        }
    }

    #[test]
    fn failover_members_round_trip_beside_v1_records() {
        // Records without them read as before (the v1 fixtures are read by the test above);
        // records with them round-trip, and a bad mode is refused naming the member.
        let rec = |mode| FailoverRecord {
            job: "20261127T060000.000Z-0badf00d".into(),
            mode,
            point: "20261127T055900.000Z-00c0ffee".into(),
            location: "/var/lib/ferry/target/test/web-01/20261127T060000.000Z-0badf00d".into(),
            at_ms: 1_795_760_000_000,
        };
        let it = Item {
            test_failover: Some(rec(FailoverMode::Test)),
            failover: Some(rec(FailoverMode::Unplanned)),
            ..v1_item()
        };
        let b = encode_item(&it);
        assert_eq!(decode_item("web-01", &b).unwrap(), it);
        let bad =
            String::from_utf8(b)
                .unwrap()
                .replacen(r#""mode":"test""#, r#""mode":"drill""#, 1);
        let e = decode_item("web-01", bad.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("test_failover.mode"), "{e}");
        let j = Job {
            kind: Operation::TestFailover,
            failover: Some(FailoverRequest {
                mode: FailoverMode::Test,
                point: "2026-11-27T05:20:00Z".into(),
                format: "qcow2".into(),
                in_place: Vec::new(),
            }),
            ..v1_job()
        };
        let b = encode_job(&j);
        assert!(
            String::from_utf8_lossy(&b).contains(
                r#""failover":{"mode":"test","point":"2026-11-27T05:20:00Z","format":"qcow2"}"#
            ),
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(decode_job(&j.id, &b).unwrap(), j);
        assert_eq!(encode_item(&v1_item()), encode_item(&Item { ..v1_item() }));
    }

    /// Writes the item and job fixtures when missing (frozen once committed):
    /// `cargo test -p ferry-daemon -- --ignored write_v1_item_fixtures`.
    #[test]
    #[ignore = "writes the committed fixtures"]
    fn write_v1_item_fixtures() {
        let dir = Path::new(FIXTURES);
        for (n, b) in [
            ("item.json", encode_item(&v1_item())),
            ("job.json", encode_job(&v1_job())),
        ] {
            let p = dir.join(n);
            if !p.exists() {
                std::fs::write(p, b).unwrap();
            }
        }
    }

    #[test]
    fn v1_item_and_job_records_decode() {
        let read = |n: &str| std::fs::read(Path::new(FIXTURES).join(n)).unwrap();
        assert_eq!(
            decode_item("web-01", &read("item.json")).unwrap(),
            v1_item()
        );
        assert_eq!(
            decode_job(&v1_job().id, &read("job.json")).unwrap(),
            v1_job()
        );
        // And they are what this build writes.
        assert_eq!(encode_item(&v1_item()), read("item.json"));
        assert_eq!(encode_job(&v1_job()), read("job.json"));
        // A paused item (a member added later in version 1) round-trips; an unpaused one is
        // written as before (above); a paused record with no one who paused it is refused.
        let paused = Item {
            paused: Some(item::Paused {
                by: "20261126T170000.000Z-0badf00d".into(),
                at_ms: 1_795_690_200_000,
            }),
            ..v1_item()
        };
        let b = encode_item(&paused);
        assert!(
            String::from_utf8_lossy(&b).ends_with(
                r#""paused":{"by":"20261126T170000.000Z-0badf00d","at_ms":1795690200000}}"#
            ),
            "{}",
            String::from_utf8_lossy(&b)
        );
        assert_eq!(decode_item("web-01", &b).unwrap(), paused);
        let nobody = String::from_utf8(b)
            .unwrap()
            .replace("20261126T170000.000Z-0badf00d", "");
        let e = decode_item("web-01", nobody.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("paused.by"), "{e}");
        // Damaged records are refused, naming the table and key.
        let e = decode_item("other", &read("item.json")).unwrap_err();
        assert!(e.to_string().contains("items/other"), "{e}");
        let mut v: serde_json::Value = serde_json::from_slice(&read("item.json")).unwrap();
        v["state"] = "flying".into();
        let e = decode_item("web-01", v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("state `flying`"), "{e}");
        v["state"] = "enabling".into();
        let e = decode_item("web-01", v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("without a job"), "{e}");
        let mut v: serde_json::Value = serde_json::from_slice(&read("job.json")).unwrap();
        v["v"] = 2.into();
        assert!(matches!(
            decode_job(&v1_job().id, v.to_string().as_bytes()),
            Err(CatalogError::NewerRecord { .. })
        ));
    }

    fn catalog(dir: &Path) -> Catalog {
        let (c, _) = Catalog::open(&dir.join("catalog.redb")).unwrap();
        c.ensure_default_policy(1).unwrap();
        c.insert_vault(&VaultEntry {
            name: "default".into(),
            url: "memory://".into(),
            created_ms: 1,
        })
        .unwrap();
        c
    }

    fn disks() -> Vec<Disk> {
        vec![Disk {
            name: "os".into(),
            size_bytes: 1 << 30,
        }]
    }

    #[test]
    fn enable_run_finish_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path());
        let (it, job) = c
            .create_item("web-01", None, "default", "default", disks(), 10)
            .unwrap();
        assert_eq!(it.state, ItemState::Enabling);
        assert_eq!(it.active_job.as_deref(), Some(job.id.as_str()));
        assert!(matches!(
            c.create_item("web-01", None, "default", "default", disks(), 11),
            Err(CatalogError::ItemExists(_))
        ));
        assert!(matches!(
            c.create_item("web-02", None, "nope", "default", disks(), 11),
            Err(CatalogError::MissingReference { what: "vault", .. })
        ));
        assert!(matches!(
            c.create_item("web-02", None, "default", "nope", disks(), 11),
            Err(CatalogError::MissingReference { what: "policy", .. })
        ));
        // While enabling, every operation is refused.
        let e = c
            .begin_operation("web-01", Operation::Resync, None, 12)
            .unwrap_err();
        assert!(matches!(e, CatalogError::ItemBusy { .. }), "{e}");

        let taken = c.take_queued_job(13).unwrap().unwrap();
        assert_eq!(
            (taken.id.as_str(), taken.state),
            (job.id.as_str(), JobState::Running)
        );
        assert_eq!(c.take_queued_job(13).unwrap(), None);
        c.log_job(&job.id, 14, "checking").unwrap();
        let done = c.finish_job(&job.id, Ok(None), 15).unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.log.len(), 1);
        let it = c.item("web-01").unwrap().unwrap();
        assert_eq!(
            (it.state, it.active_job),
            (ItemState::InitialReplication, None)
        );
        assert!(matches!(
            c.finish_job(&job.id, Ok(None), 16),
            Err(CatalogError::JobState { .. })
        ));
        // The state machine's refusal, with its reason.
        let e = c
            .begin_operation("web-01", Operation::Resync, None, 17)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("has not produced a recovery point yet"),
            "{e}"
        );
        // A replication event moves it on; a stale revision is refused.
        let it = c.apply_event("web-01", Event::PointCommitted, 18).unwrap();
        assert_eq!(it.state, ItemState::Protected);
        assert!(matches!(
            c.begin_operation("web-01", Operation::Resync, Some(&[it.revision - 1]), 19),
            Err(CatalogError::ItemRevisionMismatch { .. })
        ));
        let (it, resync) = c
            .begin_operation("web-01", Operation::Resync, Some(&[it.revision]), 19)
            .unwrap();
        assert_eq!(it.state, ItemState::Resynchronizing);
        // A failed job puts the item back where it was.
        c.take_queued_job(20).unwrap().unwrap();
        let failed = c
            .finish_job(&resync.id, Err("agent unreachable".into()), 21)
            .unwrap();
        assert_eq!(failed.error.as_deref(), Some("agent unreachable"));
        assert_eq!(
            c.item("web-01").unwrap().unwrap().state,
            ItemState::Protected
        );
    }

    #[test]
    fn policies_in_use_cancel_requeue_and_disable() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path());
        c.create_policy("gold", &crate::policy::PolicySettings::default(), 1)
            .unwrap();
        let (_, enable) = c
            .create_item("db", None, "default", "gold", disks(), 10)
            .unwrap();
        assert!(matches!(
            c.delete_policy("gold", None),
            Err(CatalogError::PolicyInUse { users: 1, .. })
        ));
        // Cancelling a queued enable removes the item it would have created.
        let cancelled = c.cancel_job(&enable.id, 11).unwrap();
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert_eq!(c.item("db").unwrap(), None);
        assert_eq!(c.take_queued_job(12).unwrap(), None);
        assert!(matches!(
            c.cancel_job(&enable.id, 12),
            Err(CatalogError::JobState { .. })
        ));
        c.delete_policy("gold", None).unwrap();

        // A job left running by a stop is queued again, then runs to its end.
        let (_, enable) = c
            .create_item("db", None, "default", "default", disks(), 20)
            .unwrap();
        c.take_queued_job(21).unwrap().unwrap();
        assert_eq!(c.requeue_interrupted_jobs(22).unwrap(), 1);
        let again = c.take_queued_job(23).unwrap().unwrap();
        assert_eq!(again.id, enable.id);
        assert!(again.log.iter().any(|l| l.msg.contains("queued again")));
        // An enable whose vault already holds points lands protected.
        c.finish_job(&enable.id, Ok(Some(Event::PointCommitted)), 24)
            .unwrap();
        assert_eq!(c.item("db").unwrap().unwrap().state, ItemState::Protected);

        let (it, disable) = c
            .begin_operation("db", Operation::Disable, None, 30)
            .unwrap();
        assert_eq!(it.state, ItemState::Disabling);
        c.take_queued_job(31).unwrap().unwrap();
        c.finish_job(&disable.id, Ok(None), 32).unwrap();
        assert_eq!(c.item("db").unwrap(), None);

        // Newest first, filtered by item, paginated.
        let all = c.jobs_page(None, 100, None).unwrap();
        assert_eq!(all.items.len(), 3);
        assert!(all.items.windows(2).all(|w| w[0].id > w[1].id));
        let first = c.jobs_page(None, 1, Some("db")).unwrap();
        let second = c
            .jobs_page(first.next_after.as_deref(), 1, Some("db"))
            .unwrap();
        assert_eq!(second.items[0].id, all.items[1].id);
    }

    #[test]
    fn job_logs_are_bounded() {
        let mut j = v1_job();
        j.log.clear();
        for i in 0..10_000 {
            j.push_log(i, &"x".repeat(2000));
        }
        let bytes: usize = j.log.iter().map(|l| l.msg.len()).sum();
        assert!(bytes <= MAX_JOB_LOG_BYTES, "{bytes}");
        assert!(j.log_dropped > 9_000);
        assert!(
            j.log
                .iter()
                .all(|l| l.msg.len() <= MAX_LINE + '…'.len_utf8())
        );
        assert!(encode_job(&j).len() < super::super::MAX_RECORD_BYTES);
        j.push_log(1, "a\nb\u{1b}[31m");
        assert!(j.log_dropped > 0);
    }
}
