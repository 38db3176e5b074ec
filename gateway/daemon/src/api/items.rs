//! `/api/v1/items`: protected items, and the operations on them that run as jobs.
//!
//! `POST /items` enables protection: it answers 202 at once with the item (state
//! `enabling`) and its `enable` job; `DELETE /items/{name}` and `POST
//! /items/{name}/resync` likewise answer 202 with their job. An operation the item's state
//! does not allow is 409 `illegal_transition` with the reason (`crate::item`); one while
//! another job holds the item is 409 `item_busy`. `PATCH` changes settings (description,
//! policy) and honours `If-Match` like policies do.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiPath, ApiQuery, PageQuery, encode_cursor};
use super::jobs::JobJson;
use super::policies::{etag, if_match};
use super::{AdminId, ApiError, ApiState, PageJson, time};
use crate::catalog::{Catalog, CatalogError, ItemPatch, ItemPoints};
use crate::item::{self, Disk, Item, Operation};
use crate::policy::DEFAULT_POLICY;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiskJson {
    name: String,
    #[serde(deserialize_with = "whole_u64")]
    size_bytes: u64,
}

/// A non-negative integer member. As in JSON Schema (and the policies' bodies), a number
/// with a zero fraction (`512.0`, `5.12e2`) is an integer.
fn whole_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    // 2^64 as f64: integral floats from 0 up to it convert exactly.
    const LIMIT: f64 = 18_446_744_073_709_551_616.0;
    let n = serde_json::Number::deserialize(d)?;
    if let Some(u) = n.as_u64() {
        return Ok(u);
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && (0.0..LIMIT).contains(&f) =>
        {
            #[allow(
                clippy::cast_possible_truncation,
                reason = "integral and within the range of u64: exact"
            )]
            Ok(f as u64)
        }
        _ => Err(serde::de::Error::custom(format!(
            "invalid value: {n}, expected a whole number from 0 to 2^64 - 1"
        ))),
    }
}

#[derive(Debug, Serialize)]
pub(super) struct ItemJson {
    name: String,
    description: Option<String>,
    vault: String,
    policy: String,
    disks: Vec<DiskJson>,
    state: &'static str,
    direction: &'static str,
    active_job: Option<String>,
    /// Recovery points the catalog's mirror knows in the item's vault.
    points: u64,
    /// The agent whose cycles the item takes (`null`: any agent listed for it).
    source_agent: Option<String>,
    /// What the process role reports (absent without the role).
    #[serde(skip_serializing_if = "Option::is_none")]
    replication: Option<ReplicationJson>,
    /// The newest of them.
    latest_point: Option<LatestPoint>,
    revision: u64,
    created: String,
    updated: String,
    /// Who paused its replication and when (`null`: not paused).
    paused: Option<PausedJson>,
    /// The test failover's copy, until cleaned up (`null`: none).
    test_failover: Option<FailoverJson>,
    /// The failover pending commit or committed (`null`: none).
    failover: Option<FailoverJson>,
}

/// Where a failover put the machine.
#[derive(Debug, Serialize)]
pub(super) struct FailoverJson {
    job: String,
    mode: &'static str,
    point: String,
    location: String,
    at: String,
    /// A test failover older than `[target] test_failover_max_age_hours`: clean it up.
    #[serde(skip_serializing_if = "Option::is_none")]
    stale: Option<bool>,
    #[serde(skip)]
    at_ms: u64,
}

impl FailoverJson {
    fn of(r: crate::item::FailoverRecord, stale: Option<bool>) -> Self {
        Self {
            job: r.job,
            mode: r.mode.as_str(),
            point: r.point,
            location: r.location,
            at: time(r.at_ms),
            stale,
            at_ms: r.at_ms,
        }
    }
}

/// Who paused an item's replication, and when.
#[derive(Debug, Serialize)]
pub(super) struct PausedJson {
    by: String,
    at: String,
}

/// The process role's figures of an item.
#[derive(Debug, Serialize)]
pub(super) struct ReplicationJson {
    backlog_bytes: u64,
    ingest_bytes_per_second: f64,
    upload_bytes_per_second: f64,
    time_to_drain_seconds: Option<f64>,
    sessions: u32,
    last_cycle: Option<u64>,
    last_cycle_point: Option<String>,
    last_error: Option<String>,
    last_error_at: Option<String>,
}

impl ReplicationJson {
    fn of(f: &crate::replication::ItemFigures) -> Self {
        let round = |v: f64| (v * 10.0).round() / 10.0;
        Self {
            backlog_bytes: f.backlog_bytes,
            ingest_bytes_per_second: round(f.ingest.per_second()),
            upload_bytes_per_second: round(f.upload.per_second()),
            time_to_drain_seconds: f.time_to_drain_secs().map(round),
            sessions: f.sessions,
            last_cycle: f.last_cycle.as_ref().map(|c| c.0),
            last_cycle_point: f.last_cycle.as_ref().map(|c| c.1.clone()),
            last_error: f.last_error.as_ref().map(|e| e.1.clone()),
            last_error_at: f.last_error.as_ref().map(|e| time(e.0)),
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct LatestPoint {
    id: String,
    created: String,
}

impl ItemJson {
    /// The item's JSON with what the point mirror knows of it (a catalog read).
    pub(super) fn of(c: &Catalog, it: Item) -> Result<Self, CatalogError> {
        let p = c.item_points(&it.vault, &it.name)?;
        Ok(Self::new(it, p))
    }

    /// [`ItemJson::of`] for a page of items, in one catalog read.
    pub(super) fn of_all(c: &Catalog, items: Vec<Item>) -> Result<Vec<Self>, CatalogError> {
        let keys: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.vault.as_str(), i.name.as_str()))
            .collect();
        let points = c.items_points(&keys)?;
        Ok(items
            .into_iter()
            .zip(points)
            .map(|(i, p)| Self::new(i, p))
            .collect())
    }

    /// Adds the process role's figures, when the appliance runs it, and flags a test
    /// failover older than the target role's limit.
    pub(super) fn with_figures(mut self, s: &ApiState) -> Self {
        if let Some(t) = &mut self.test_failover {
            let age = ferry_store::point::now_ms().saturating_sub(t.at_ms);
            t.stale = Some(age > s.test_failover_max_age_ms());
        }
        if let Some(role) = s.process() {
            self.replication = Some(ReplicationJson::of(&role.figures(&self.name)));
        }
        self
    }

    fn new(i: Item, p: ItemPoints) -> Self {
        Self {
            points: p.count,
            replication: None,
            latest_point: p.latest.map(|(id, t)| LatestPoint {
                id,
                created: time(t),
            }),
            name: i.name,
            description: i.description,
            vault: i.vault,
            policy: i.policy,
            disks: i
                .disks
                .into_iter()
                .map(|d| DiskJson {
                    name: d.name,
                    size_bytes: d.size_bytes,
                })
                .collect(),
            state: i.state.as_str(),
            direction: i.direction.as_str(),
            active_job: i.active_job,
            revision: i.revision,
            created: time(i.created_ms),
            updated: time(i.updated_ms),
            paused: i.paused.map(|p| PausedJson {
                by: p.by,
                at: time(p.at_ms),
            }),
            test_failover: i.test_failover.map(|r| FailoverJson::of(r, Some(false))),
            failover: i.failover.map(|r| FailoverJson::of(r, None)),
            source_agent: i.source_agent,
        }
    }
}

/// An item and the job just queued for it.
#[derive(Debug, Serialize)]
pub(super) struct Accepted {
    item: ItemJson,
    job: JobJson,
}

impl Accepted {
    /// The item and its job as answered.
    pub(super) fn new(item: ItemJson, job: crate::catalog::Job) -> Self {
        Self {
            item,
            job: job.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    name: String,
    description: Option<String>,
    vault: Option<String>,
    policy: Option<String>,
    disks: Vec<DiskJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchBody {
    #[serde(default, deserialize_with = "super::extract::null_clears")]
    description: Option<Option<String>>,
    policy: Option<String>,
}

fn no_item(name: &str) -> ApiError {
    let shown: String = name.chars().take(100).collect();
    CatalogError::ItemNotFound(shown).into()
}

/// A path's item name, or 404 when it cannot name an item.
pub(super) fn path_name(name: String) -> Result<String, ApiError> {
    item::check_name("item", &name).map_err(|_| no_item(&name))?;
    Ok(name)
}

/// 202 with the item, its queued job, and the job's URL in `Location`.
fn accepted(
    it: ItemJson,
    job: crate::catalog::Job,
) -> (StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>) {
    let location = HeaderValue::from_str(&format!("/api/v1/jobs/{}", job.id))
        .expect("job ids are valid in a header");
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(Accepted {
            item: it,
            job: job.into(),
        }),
    )
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<ItemJson>>, ApiError> {
    let page = q.validate()?;
    let (items, next_after) = s
        .catalog(move |c| {
            let p = c.items_page(page.after.as_deref(), page.limit)?;
            Ok((ItemJson::of_all(c, p.items)?, p.next_after))
        })
        .await?;
    let items = items.into_iter().map(|i| i.with_figures(&s)).collect();
    Ok(Json(PageJson {
        items,
        next_cursor: next_after.as_deref().map(encode_cursor),
    }))
}

pub(super) async fn create(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiJson(b): ApiJson<CreateBody>,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    item::check_name("item", &b.name)
        .map_err(|m| ApiError::bad_field("invalid_value", "name", m))?;
    let disks: Vec<Disk> = b
        .disks
        .into_iter()
        .map(|d| Disk {
            name: d.name,
            size_bytes: d.size_bytes,
        })
        .collect();
    item::check_disks(&disks).map_err(|m| ApiError::bad_field("invalid_value", "disks", m))?;
    if let Some(d) = &b.description {
        item::check_description(d)
            .map_err(|m| ApiError::bad_field("invalid_value", "description", m))?;
    }
    let vault = match b.vault {
        Some(v) => v,
        None => s.default_vault().ok_or_else(|| {
            ApiError::bad_field(
                "invalid_value",
                "vault",
                "`vault` is required: this appliance has several vaults",
            )
        })?,
    };
    let policy = b.policy.unwrap_or_else(|| DEFAULT_POLICY.to_string());
    let now = ferry_store::point::now_ms();
    let name = b.name;
    let (it, job) = s
        .catalog(move |c| {
            let (it, job) = c.create_item(&name, b.description, &vault, &policy, disks, now)?;
            Ok((ItemJson::of(c, it)?, job))
        })
        .await?;
    s.jobs_queued();
    eprintln!(
        "ferryd: item {} enabled by token {} (job {})",
        it.name, by.0, job.id
    );
    Ok(accepted(it, job))
}

pub(super) async fn get_one(
    State(s): State<ApiState>,
    ApiPath(name): ApiPath<String>,
) -> Result<([(HeaderName, HeaderValue); 1], Json<ItemJson>), ApiError> {
    let name = path_name(name)?;
    let n = name.clone();
    let it = s
        .catalog(move |c| c.item(&n)?.map(|it| ItemJson::of(c, it)).transpose())
        .await?
        .ok_or_else(|| no_item(&name))?
        .with_figures(&s);
    Ok(([(header::ETAG, etag(it.revision))], Json(it)))
}

pub(super) async fn update(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<PatchBody>,
) -> Result<([(HeaderName, HeaderValue); 1], Json<ItemJson>), ApiError> {
    let name = path_name(name)?;
    let expect = if_match(&headers)?;
    if let Some(Some(d)) = &b.description {
        item::check_description(d)
            .map_err(|m| ApiError::bad_field("invalid_value", "description", m))?;
    }
    let patch = ItemPatch {
        description: b.description,
        policy: b.policy,
    };
    let now = ferry_store::point::now_ms();
    let it = s
        .catalog(move |c| ItemJson::of(c, c.update_item(&name, expect.as_deref(), &patch, now)?))
        .await?;
    eprintln!("ferryd: item {} updated by token {}", it.name, by.0);
    Ok(([(header::ETAG, etag(it.revision))], Json(it)))
}

/// Starts `op` on the item named in the path; 202 with the item and the job.
async fn operation(
    s: &ApiState,
    by: &AdminId,
    name: String,
    headers: &HeaderMap,
    op: Operation,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    operation_with(s, by, name, headers, op, None).await
}

/// [`operation`] with a failover request kept in the job.
async fn operation_with(
    s: &ApiState,
    by: &AdminId,
    name: String,
    headers: &HeaderMap,
    op: Operation,
    failover: Option<item::FailoverRequest>,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    let name = path_name(name)?;
    let expect = if_match(headers)?;
    let now = ferry_store::point::now_ms();
    let (it, job) = s
        .catalog(move |c| {
            let (it, job) = c.begin_operation_with(&name, op, failover, expect.as_deref(), now)?;
            Ok((ItemJson::of(c, it)?, job))
        })
        .await?;
    s.jobs_queued();
    eprintln!(
        "ferryd: {op} of item {} requested by token {} (job {})",
        it.name, by.0, job.id
    );
    Ok(accepted(it, job))
}

pub(super) async fn delete(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    operation(&s, &by, name, &headers, Operation::Disable).await
}

pub(super) async fn resync(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    operation(&s, &by, name, &headers, Operation::Resync).await
}

/// `POST /items/{name}/failover`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FailoverBody {
    /// `test` or `unplanned`.
    #[serde(rename = "type")]
    mode: String,
    /// `latest` (default), `latest-app-consistent`, an RFC 3339 time or a point id.
    point: Option<String>,
    /// Output format of the disks (default `raw`).
    format: Option<String>,
    /// Disks written in place onto existing files or block devices (failback): only the
    /// chunks that differ are written.
    in_place: Option<Vec<InPlaceJson>>,
}

/// One disk of a failover written in place.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InPlaceJson {
    disk: String,
    path: String,
}

/// `POST /items/{name}/reprotect`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReprotectBody {
    /// The agent at the site the machine now runs at: its cycles become the item's.
    agent: String,
}

/// Reprotects a failed-over item: `agent` (listed for the item, at the site the machine now
/// runs at) becomes its source and the direction reverses; the agent's first cycle compares
/// its disks with the vault's newest point and sends only what differs.
pub(super) async fn reprotect(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReprotectBody>,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    let name = path_name(name)?;
    item::check_name("agent", &body.agent)
        .map_err(|m| ApiError::bad_field("invalid_value", "agent", m))?;
    let expect = if_match(&headers)?;
    let now = ferry_store::point::now_ms();
    let agent = body.agent;
    let (it, job) = s
        .catalog(move |c| {
            let (it, job) = c.begin_reprotect(&name, &agent, expect.as_deref(), now)?;
            Ok((ItemJson::of(c, it)?, job))
        })
        .await?;
    s.jobs_queued();
    eprintln!(
        "ferryd: reprotect of item {} requested by token {} (job {})",
        it.name, by.0, job.id
    );
    Ok(accepted(it, job))
}

/// The failover type, point and format of a failover body, checked: the type one of `test`,
/// `planned`, `unplanned`; the format one the API documents (default `raw`); the point
/// (default `latest`) 1 to 128 characters, and none for a planned failover.
pub(super) fn failover_choice(
    mode: &str,
    point: Option<String>,
    format: Option<String>,
) -> Result<(item::FailoverMode, String, String), ApiError> {
    let body_mode = mode;
    let mode = item::FailoverMode::parse(body_mode).ok_or_else(|| {
        ApiError::bad_field(
            "invalid_value",
            "type",
            format!(
                "type `{}`: a failover is `test`, `planned` or `unplanned`",
                body_mode.chars().take(64).collect::<String>()
            ),
        )
    })?;
    let format = format.unwrap_or_else(|| "raw".into());
    // Exactly the names the API documents (the CLI's parser also takes aliases).
    if !ferry_store::ExportFormat::ALL
        .iter()
        .any(|f| f.as_str() == format)
    {
        return Err(ApiError::bad_field(
            "invalid_value",
            "format",
            format!(
                "format `{}`: one of {}",
                format.chars().take(64).collect::<String>(),
                ferry_store::ExportFormat::names()
            ),
        ));
    }
    if mode == item::FailoverMode::Planned && point.as_deref().is_some_and(|p| p != "latest") {
        return Err(ApiError::bad_field(
            "invalid_value",
            "point",
            "a planned failover is made from the agent's final cycle: leave `point` out",
        ));
    }
    Ok((mode, check_point(point)?, format))
}

/// A request's point choice (default `latest`): 1 to 128 characters, no control character.
pub(super) fn check_point(point: Option<String>) -> Result<String, ApiError> {
    let point = point.unwrap_or_else(|| "latest".into());
    if point.is_empty()
        || point.chars().count() > 128
        || point.chars().any(|c| c.is_ascii_control())
    {
        return Err(ApiError::bad_field(
            "invalid_value",
            "point",
            "point: `latest`, `latest-app-consistent`, an RFC 3339 time or a point id (1 to 128 characters)",
        ));
    }
    Ok(point)
}

/// Starts a failover of the item as a job: `test` materialises the chosen point into an
/// isolated directory named after the job while replication goes on (one at a time, until
/// `test-failover/cleanup`); `unplanned` materialises it and leaves the item
/// `failover-pending-commit`, its replication stopped; `planned` first asks the agent for a
/// final cycle (its plan's `final_cycle`) and fails over from that point.
pub(super) async fn failover(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FailoverBody>,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    let (mode, point, format) = failover_choice(&body.mode, body.point, body.format)?;
    let op = match mode {
        item::FailoverMode::Test => Operation::TestFailover,
        item::FailoverMode::Planned | item::FailoverMode::Unplanned => Operation::Failover,
    };
    let in_place = body.in_place.unwrap_or_default();
    if !in_place.is_empty() && mode == item::FailoverMode::Test {
        return Err(ApiError::bad_field(
            "invalid_value",
            "in_place",
            "a test failover never writes onto existing disks: leave `in_place` out",
        ));
    }
    if in_place.len() > item::MAX_DISKS {
        return Err(ApiError::bad_field(
            "invalid_value",
            "in_place",
            format!("at most {} disks", item::MAX_DISKS),
        ));
    }
    for (i, t) in in_place.iter().enumerate() {
        item::check_name("disk", &t.disk)
            .map_err(|m| ApiError::bad_field("invalid_value", "in_place", m))?;
        if in_place[..i].iter().any(|o| o.disk == t.disk) {
            return Err(ApiError::bad_field(
                "invalid_value",
                "in_place",
                format!("disk `{}` is named twice", t.disk),
            ));
        }
        let chars = t.path.chars().count();
        if !t.path.starts_with('/') || !(2..=4096).contains(&chars) || t.path.contains('\0') {
            return Err(ApiError::bad_field(
                "invalid_value",
                "in_place",
                format!(
                    "disk `{}`: the path must be absolute (an existing file or block device on the appliance)",
                    t.disk
                ),
            ));
        }
    }
    // The targets are checked now, before the agent is asked for a final cycle and stops
    // the source: each an existing regular file or block device, none named twice.
    for (i, t) in in_place.iter().enumerate() {
        if in_place[..i].iter().any(|o| o.path == t.path) {
            return Err(ApiError::bad_field(
                "invalid_value",
                "in_place",
                format!("{} is named for two disks", t.path),
            ));
        }
        use std::os::unix::fs::FileTypeExt;
        match tokio::fs::metadata(&t.path).await {
            Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
            Ok(_) => {
                return Err(ApiError::bad_field(
                    "invalid_value",
                    "in_place",
                    format!(
                        "disk `{}`: {} is not a regular file or a block device",
                        t.disk, t.path
                    ),
                ));
            }
            Err(e) => {
                return Err(ApiError::bad_field(
                    "invalid_value",
                    "in_place",
                    format!("disk `{}`: {}: {e}", t.disk, t.path),
                ));
            }
        }
    }
    let req = item::FailoverRequest {
        mode,
        point,
        format,
        in_place: in_place.into_iter().map(|t| (t.disk, t.path)).collect(),
    };
    operation_with(&s, &by, name, &headers, op, Some(req)).await
}

/// Makes a pending failover final: the item becomes `failed-over`.
pub(super) async fn commit(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    operation(&s, &by, name, &headers, Operation::Commit).await
}

/// Removes the item's test failover copy.
pub(super) async fn cleanup(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<Accepted>), ApiError> {
    operation(&s, &by, name, &headers, Operation::TestFailoverCleanup).await
}

pub(super) async fn pause(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<([(HeaderName, HeaderValue); 1], Json<ItemJson>), ApiError> {
    set_paused(&s, &by, name, &headers, true).await
}

pub(super) async fn resume(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<([(HeaderName, HeaderValue); 1], Json<ItemJson>), ApiError> {
    set_paused(&s, &by, name, &headers, false).await
}

/// Pauses or resumes the item's replication: its agents read `paused` in their plan and
/// start no new cycle while it is set (a cycle already running completes). 200 with the item;
/// pausing a paused item (or resuming a running one) changes nothing.
async fn set_paused(
    s: &ApiState,
    by: &AdminId,
    name: String,
    headers: &HeaderMap,
    pause: bool,
) -> Result<([(HeaderName, HeaderValue); 1], Json<ItemJson>), ApiError> {
    let name = path_name(name)?;
    let expect = if_match(headers)?;
    let now = ferry_store::point::now_ms();
    let who = by.0.clone();
    let it = s
        .catalog(move |c| {
            let by = pause.then_some(who.as_str());
            ItemJson::of(c, c.set_paused(&name, by, expect.as_deref(), now)?)
        })
        .await?
        .with_figures(s);
    eprintln!(
        "ferryd: replication of item {} {} by token {}",
        it.name,
        if pause { "paused" } else { "resumed" },
        by.0
    );
    Ok(([(header::ETAG, etag(it.revision))], Json(it)))
}
