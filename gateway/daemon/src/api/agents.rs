//! Agents: enrollment tokens and agents for administrators, `POST /enroll` for a machine
//! holding a token, and the agent's own endpoints (`/agent…`, mTLS only).
//!
//! Admin: `GET/POST /enrollment-tokens`, `DELETE /enrollment-tokens/{id}` (revoke),
//! `GET /agents`, `GET/PATCH/DELETE /agents/{name}` (`PATCH` sets the items the agent acts
//! for, `DELETE` revokes it: its certificate is refused from the next request on).
//!
//! Enrollment (`POST /enroll`) needs no credential but the one-time token in its body; every
//! refusal (unknown, spent, expired or revoked token; a bad CSR; a name in use) changes
//! nothing. Agent endpoints (`GET /agent`, `GET /agent/items[/{name}]`, `POST
//! /agent/heartbeat`, `GET /agent/items/{name}/replication`, `GET
//! /agent/items/{name}/disks/{disk}/digests`) need the client certificate issued at
//! enrollment and see only the agent's own items: another item is 403 `forbidden_item`
//! whether it exists or not.
//!
//! The digests (`docs/agent-protocol.md` §9) are what a checksum-based resync compares the
//! source with: one SHA-256 per chunk of the replica's newest point, read back from the vault.
//! A list grows with the disk (32 bytes a chunk), so it is computed into a file on the cache
//! disk and streamed from it, never held in memory; and computing one reads a whole disk from
//! the vault, so at most [`MAX_DIGEST_JOBS`] run at once (an agent over the limit is told 503
//! `digests_busy` and retries later).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::{Extension, Json};
use ferry_proto::digests::{DIGEST_LEN, Header as DigestsHeader, Writer as DigestsWriter};
use ferry_proto::enroll::{EnrollRequest, EnrollResponse, Heartbeat};
use ferry_store::{DigestOptions, DiskRecord, PointRecord, PointSelector, StoreError, Vault};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use super::extract::{ApiJson, ApiPath, ApiQuery, PageQuery, encode_cursor};
use super::items::ItemJson;
use super::policies::{etag, if_match};
use super::{AdminId, AgentId, ApiError, ApiState, PageJson, time};
use crate::agents::EnrollError;
use crate::catalog::{Agent, CatalogError, EnrollRefusal, EnrollToken, MAX_TOKEN_TTL_SECS};
use crate::catalog::{MAX_MEMBERS, MIN_TOKEN_TTL_SECS};

/// Default life of an enrollment token, seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 3600;
/// Longest id looked up.
const MAX_ID_LEN: usize = 128;
/// Digest lists computed at once, appliance-wide: each reads a whole disk from the vault.
pub const MAX_DIGEST_JOBS: usize = 2;
/// The permits of [`MAX_DIGEST_JOBS`].
pub(super) static DIGEST_JOBS: Semaphore = Semaphore::const_new(MAX_DIGEST_JOBS);
/// Bytes read from the digest list per body chunk.
const STREAM_CHUNK: usize = 64 << 10;

#[derive(Debug, Serialize)]
pub(super) struct CertJson {
    sha256: String,
    serial: String,
    expires: String,
}

#[derive(Debug, Serialize)]
pub(super) struct AgentJson {
    name: String,
    state: &'static str,
    items: Vec<String>,
    hostname: Option<String>,
    agent_version: Option<String>,
    certificate: CertJson,
    enrolled: String,
    last_seen: Option<String>,
    revoked: Option<String>,
    revision: u64,
}

impl From<Agent> for AgentJson {
    fn from(a: Agent) -> Self {
        Self {
            state: if a.is_active() { "active" } else { "revoked" },
            certificate: CertJson {
                sha256: crate::tls::fingerprint_of_hash(&a.cert.sha256),
                serial: a.cert.serial,
                expires: time(a.cert.expires_ms),
            },
            name: a.name,
            items: a.items,
            hostname: a.hostname,
            agent_version: a.agent_version,
            enrolled: time(a.enrolled_ms),
            last_seen: a.last_seen_ms.map(time),
            revoked: a.revoked_ms.map(time),
            revision: a.revision,
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct EnrollTokenJson {
    id: String,
    agent: String,
    items: Vec<String>,
    state: &'static str,
    created: String,
    expires: String,
    used: Option<String>,
    revoked: Option<String>,
}

impl EnrollTokenJson {
    fn new(t: EnrollToken, now_ms: u64) -> Self {
        Self {
            state: t.state(now_ms).as_str(),
            id: t.id,
            agent: t.agent,
            items: t.items,
            created: time(t.created_ms),
            expires: time(t.expires_ms),
            used: t.used_ms.map(time),
            revoked: t.revoked_ms.map(time),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewEnrollToken {
    agent: String,
    #[serde(default)]
    items: Vec<String>,
    ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize)]
pub(super) struct CreatedEnrollToken {
    #[serde(flatten)]
    token: EnrollTokenJson,
    /// The secret, shown only in this response.
    secret: String,
    /// SHA-256 fingerprint of the appliance CA the agent must pin.
    ca_fingerprint: String,
    /// The command to run on the agent's machine.
    command: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentPatch {
    items: Vec<String>,
}

fn no_agent(name: &str) -> ApiError {
    let shown: String = name.chars().take(100).collect();
    CatalogError::AgentNotFound(shown).into()
}

fn agent_path(name: String) -> Result<String, ApiError> {
    crate::item::check_name("agent", &name).map_err(|_| no_agent(&name))?;
    Ok(name)
}

/// The URL the caller reached this appliance by (for the printed enroll command).
fn gateway_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("APPLIANCE:8443");
    format!("https://{host}")
}

pub(super) async fn create_token(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<NewEnrollToken>,
) -> Result<(StatusCode, Json<CreatedEnrollToken>), ApiError> {
    crate::item::check_name("agent", &b.agent)
        .map_err(|m| ApiError::bad_field("invalid_value", "agent", m))?;
    let ttl = b.ttl_seconds.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if !(MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        return Err(ApiError::bad_field(
            "invalid_value",
            "ttl_seconds",
            format!(
                "ttl_seconds must be {MIN_TOKEN_TTL_SECS} to {MAX_TOKEN_TTL_SECS} (30 days), not {ttl}"
            ),
        ));
    }
    if b.items.len() > MAX_MEMBERS {
        return Err(ApiError::bad_field(
            "invalid_value",
            "items",
            format!("at most {MAX_MEMBERS} items"),
        ));
    }
    let Some(fp) = s.agents().ca_fingerprint() else {
        return Err(enroll_unavailable());
    };
    let (tok, secret) = s
        .with_agents(move |a| a.create_token(&b.agent, b.items, ttl))
        .await?;
    eprintln!(
        "ferryd: enrollment token {} for agent {} created by token {}",
        tok.id, tok.agent, by.0
    );
    // The token goes in the environment, not the arguments: a process's command line is
    // readable by every local user (`/proc/PID/cmdline`), its environment only by its owner.
    let command = format!(
        "FERRY_AGENT_TOKEN={} ferry-agent enroll --gateway {} --ca-fingerprint {fp}",
        secret.expose(),
        gateway_url(&headers),
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollToken {
            token: EnrollTokenJson::new(tok, ferry_store::point::now_ms()),
            secret: secret.expose().to_string(),
            ca_fingerprint: fp,
            command,
        }),
    ))
}

pub(super) async fn list_tokens(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<EnrollTokenJson>>, ApiError> {
    let page = q.validate()?;
    let p = s
        .catalog(move |c| c.enroll_tokens_page(page.after.as_deref(), page.limit))
        .await?;
    let now = ferry_store::point::now_ms();
    Ok(Json(PageJson {
        items: p
            .items
            .into_iter()
            .map(|t| EnrollTokenJson::new(t, now))
            .collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

pub(super) async fn revoke_token(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EnrollTokenJson>, ApiError> {
    if id.len() > MAX_ID_LEN {
        return Err(CatalogError::EnrollTokenNotFound("(too long)".into()).into());
    }
    let now = ferry_store::point::now_ms();
    let t = s.catalog(move |c| c.revoke_enroll_token(&id, now)).await?;
    eprintln!(
        "ferryd: enrollment token {} revoked by token {}",
        t.id, by.0
    );
    Ok(Json(EnrollTokenJson::new(t, now)))
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<AgentJson>>, ApiError> {
    let page = q.validate()?;
    let p = s
        .catalog(move |c| c.agents_page(page.after.as_deref(), page.limit))
        .await?;
    Ok(Json(PageJson {
        items: p.items.into_iter().map(AgentJson::from).collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

type Tagged<T> = ([(HeaderName, HeaderValue); 1], Json<T>);

fn tagged(a: Agent) -> Tagged<AgentJson> {
    ([(header::ETAG, etag(a.revision))], Json(a.into()))
}

pub(super) async fn get_one(
    State(s): State<ApiState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Tagged<AgentJson>, ApiError> {
    let name = agent_path(name)?;
    let n = name.clone();
    let a = s
        .catalog(move |c| c.agent(&n))
        .await?
        .ok_or_else(|| no_agent(&name))?;
    Ok(tagged(a))
}

pub(super) async fn update(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<AgentPatch>,
) -> Result<Tagged<AgentJson>, ApiError> {
    let name = agent_path(name)?;
    let expect = if_match(&headers)?;
    let a = s
        .catalog(move |c| c.set_agent_items(&name, expect.as_deref(), b.items))
        .await?;
    eprintln!(
        "ferryd: agent {} now acts for [{}] (by token {})",
        a.name,
        a.items.join(", "),
        by.0
    );
    Ok(tagged(a))
}

pub(super) async fn revoke(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Tagged<AgentJson>, ApiError> {
    let name = agent_path(name)?;
    let expect = if_match(&headers)?;
    let a = s
        .with_agents(move |x| x.revoke(&name, expect.as_deref()))
        .await?;
    eprintln!("ferryd: agent {} revoked by token {}", a.name, by.0);
    Ok(tagged(a))
}

fn enroll_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "enrollment_unavailable",
        EnrollError::NoCa.to_string(),
    )
}

impl From<EnrollError> for ApiError {
    fn from(e: EnrollError) -> Self {
        match e {
            EnrollError::NoCa => enroll_unavailable(),
            EnrollError::BadCsr(m) => ApiError::bad_field("invalid_csr", "csr", m),
            EnrollError::BadField(m) => ApiError::bad_request("invalid_value", m),
            EnrollError::Catalog(CatalogError::EnrollRefused(r)) => {
                let code = match r {
                    EnrollRefusal::Unknown => "invalid_enrollment_token",
                    EnrollRefusal::Used => "enrollment_token_used",
                    EnrollRefusal::Expired => "enrollment_token_expired",
                    EnrollRefusal::Revoked => "enrollment_token_revoked",
                };
                ApiError::new(StatusCode::FORBIDDEN, code, r.to_string())
            }
            EnrollError::Catalog(c) => c.into(),
        }
    }
}

/// `POST /api/v1/enroll`.
pub(super) async fn enroll(
    State(s): State<ApiState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<(StatusCode, Json<EnrollResponse>), ApiError> {
    let agents = s.agents_arc();
    let (agent, cert) = tokio::task::spawn_blocking(move || agents.enroll(&req))
        .await
        .map_err(ApiError::internal)??;
    eprintln!(
        "ferryd: agent {} enrolled (certificate {})",
        agent.name, cert.serial
    );
    let ca = s.agents().ca_pem().unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(EnrollResponse {
            certificate_sha256: crate::tls::fingerprint_of_hash(&cert.sha256),
            certificate_expires: time(cert.expires_ms),
            certificate: cert.pem,
            ca,
            agent: agent.name,
            items: agent.items,
        }),
    ))
}

/// The calling agent's record (it may have been revoked between the check and now).
async fn me(s: &ApiState, id: &AgentId) -> Result<Agent, ApiError> {
    let n = id.name.clone();
    let sha = id.cert_sha256;
    s.catalog(move |c| c.agent(&n))
        .await?
        .filter(|a| a.is_active() && a.cert.sha256 == sha)
        .ok_or_else(super::certificate_revoked)
}

/// `GET /api/v1/agent`.
pub(super) async fn whoami(
    State(s): State<ApiState>,
    Extension(id): Extension<AgentId>,
) -> Result<Json<AgentJson>, ApiError> {
    Ok(Json(me(&s, &id).await?.into()))
}

/// `POST /api/v1/agent/heartbeat`.
pub(super) async fn heartbeat(
    State(s): State<ApiState>,
    Extension(id): Extension<AgentId>,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<StatusCode, ApiError> {
    let agents = s.agents_arc();
    tokio::task::spawn_blocking(move || agents.heartbeat(&id.name, &id.cert_sha256, hb))
        .await
        .map_err(ApiError::internal)??;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/agent/items`: the agent's items that exist, by name.
pub(super) async fn my_items(
    State(s): State<ApiState>,
    Extension(id): Extension<AgentId>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<ItemJson>>, ApiError> {
    let page = q.validate()?;
    let a = me(&s, &id).await?;
    let mut names = a.items;
    names.sort();
    names.retain(|n| page.after.as_ref().is_none_or(|after| n > after));
    let (items, next_after) = s
        .catalog(move |c| {
            let mut out = Vec::new();
            let mut more = false;
            for n in names {
                if out.len() == page.limit {
                    more = true;
                    break;
                }
                if let Some(it) = c.item(&n)? {
                    out.push(it);
                }
            }
            let last = out.last().map(|i| i.name.clone());
            Ok((ItemJson::of_all(c, out)?, more.then_some(last).flatten()))
        })
        .await?;
    Ok(Json(PageJson {
        items,
        next_cursor: next_after.as_deref().map(encode_cursor),
    }))
}

fn forbidden_item(name: &str) -> ApiError {
    let shown: String = name.chars().take(100).collect();
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden_item",
        format!("this agent does not act for protected item `{shown}`"),
    )
}

/// `GET /api/v1/agent/items/{name}`: one of the agent's items; any other is 403.
pub(super) async fn my_item(
    State(s): State<ApiState>,
    Extension(id): Extension<AgentId>,
    ApiPath(name): ApiPath<String>,
) -> Result<Tagged<ItemJson>, ApiError> {
    let a = me(&s, &id).await?;
    if !a.items.contains(&name) {
        return Err(forbidden_item(&name));
    }
    let n = name.clone();
    let (rev, it) = s
        .catalog(move |c| {
            c.item(&n)?
                .map(|it| Ok((it.revision, ItemJson::of(c, it)?)))
                .transpose()
        })
        .await?
        .ok_or_else(|| forbidden_item(&name))?;
    Ok(([(header::ETAG, etag(rev))], Json(it)))
}

/// `GET /api/v1/agent/items/{name}/replication`: what the agent needs to replicate one of its
/// items (`ferry_proto::enroll::ReplicationPlan`); any other item is 403.
pub(super) async fn my_item_plan(
    State(s): State<ApiState>,
    Extension(id): Extension<AgentId>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ferry_proto::enroll::ReplicationPlan>, ApiError> {
    let a = me(&s, &id).await?;
    if !a.items.contains(&name) {
        return Err(forbidden_item(&name));
    }
    let n = name.clone();
    let (item, policy, final_cycle) = s
        .catalog(move |c| {
            let Some(it) = c.item(&n)? else {
                return Ok(None);
            };
            let policy = c.policy(&it.policy)?;
            // A planned failover holding the item waits for the agent's final cycle.
            let final_cycle = match &it.active_job {
                Some(j) => c.job(j)?.filter(|j| {
                    j.kind == crate::item::Operation::Failover
                        && j.failover
                            .as_ref()
                            .is_some_and(|f| f.mode == crate::item::FailoverMode::Planned)
                }),
                None => None,
            }
            .map(|j| j.id);
            Ok(Some((it, policy, final_cycle)))
        })
        .await?
        .ok_or_else(|| forbidden_item(&name))?;
    let settings = policy.map(|p| p.settings).unwrap_or_default();
    let Some(role) = s.process() else {
        return Err(no_process_role());
    };
    let mut plan = role
        .plan(&item, &settings)
        .await
        .map_err(ApiError::internal)?;
    plan.final_cycle = final_cycle;
    // After a reprotect only the item's source agent replicates it.
    if item
        .source_agent
        .as_deref()
        .is_some_and(|src| src != a.name)
    {
        plan.paused = true;
        plan.final_cycle = None;
    }
    Ok(Json(plan))
}

fn no_process_role() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_process_role",
        "this appliance does not have the process role: it takes no replication".to_string(),
    )
}

fn no_point(message: String) -> ApiError {
    ApiError::not_found("no_point", message)
}

/// Why a digest list could not be made. Each names the item and disk, or the file.
#[derive(Debug, thiserror::Error)]
enum DigestsError {
    /// Reading the disk back from the vault failed.
    #[error("digests of `{item}` disk `{disk}`: {source}")]
    Store {
        /// Item.
        item: String,
        /// Disk.
        disk: String,
        /// What the vault said.
        #[source]
        source: Box<StoreError>,
    },
    /// A temporary file on the cache disk.
    #[error("digest list {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Encoding the list (the point's geometry does not fit the protocol).
    #[error("digest list {}: {source}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What the codec said.
        #[source]
        source: ferry_proto::digests::DigestsError,
    },
    /// The encoding task panicked.
    #[error("digest list {}: encoding task failed: {message}", path.display())]
    Task {
        /// The file.
        path: PathBuf,
        /// The join error.
        message: String,
    },
}

impl From<DigestsError> for ApiError {
    fn from(e: DigestsError) -> Self {
        match e {
            // The store's codes (`vault_damaged`, `vault_backend_error`, …), logged with
            // the item and disk they are about.
            DigestsError::Store { item, disk, source } => {
                eprintln!("ferryd: digests of `{item}` disk `{disk}`: {source}");
                (*source).into()
            }
            other => ApiError::internal(other),
        }
    }
}

/// Temporary files removed when dropped (on every path out, error or panic included).
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Distinguishes the temporary files of concurrent requests.
static DIGEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// Computes the digest list of `disk` of `point` under `dir`; returns it opened for reading
/// with its length. Its name is already gone: the open file is all that is left of it, freed
/// when the response body is dropped, however the download ends.
async fn digest_list(
    vault: &Vault,
    point: &PointRecord,
    disk: &DiskRecord,
    dir: &Path,
) -> Result<(std::fs::File, u64), DigestsError> {
    let n = DIGEST_SEQ.fetch_add(1, Ordering::Relaxed);
    let raw = dir.join(format!(".digests-{}-{n}.raw", std::process::id()));
    let list = dir.join(format!(".digests-{}-{n}.list", std::process::id()));
    let _tmp = TempFiles(vec![raw.clone(), list.clone()]);
    let report = vault
        .chunk_digests(
            DigestOptions {
                item: point.item.clone(),
                point: PointSelector::Id(point.id.clone()),
                disk: Some(disk.name.clone()),
                out: raw.clone(),
            },
            std::sync::Arc::default(),
        )
        .await
        .map_err(|source| DigestsError::Store {
            item: point.item.clone(),
            disk: disk.name.clone(),
            source: Box::new(source),
        })?;
    let header = DigestsHeader {
        chunk_size: report.disk.chunk_size,
        disk_size: report.disk.size,
        point: report.point.id.clone(),
    };
    let count = report.disk.chunks();
    let path = list.clone();
    tokio::task::spawn_blocking(move || encode_list(&raw, &list, &header, count))
        .await
        .map_err(|e| DigestsError::Task {
            path,
            message: e.to_string(),
        })?
}

/// Wraps the raw digests at `raw` (32 bytes per chunk) in the digest-list format at `list`,
/// one digest at a time, and opens the result for reading.
fn encode_list(
    raw: &Path,
    list: &Path,
    header: &DigestsHeader,
    count: u64,
) -> Result<(std::fs::File, u64), DigestsError> {
    use std::io::Read;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DigestsError::Io { path, source }
    };
    let fmt = |source| DigestsError::Format {
        path: list.to_path_buf(),
        source,
    };
    let mut input =
        std::io::BufReader::with_capacity(STREAM_CHUNK, std::fs::File::open(raw).map_err(io(raw))?);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(list)
        .map_err(io(list))?;
    let mut w = DigestsWriter::new(std::io::BufWriter::with_capacity(STREAM_CHUNK, out), header)
        .map_err(fmt)?;
    let mut d = [0u8; DIGEST_LEN];
    for _ in 0..count {
        input.read_exact(&mut d).map_err(io(raw))?;
        w.push(&d).map_err(fmt)?;
    }
    let out = w.finish().map_err(fmt)?;
    out.into_inner().map_err(|e| io(list)(e.into_error()))?;
    let f = std::fs::File::open(list).map_err(io(list))?;
    let len = f.metadata().map_err(io(list))?.len();
    Ok((f, len))
}

/// `GET /api/v1/agent/items/{name}/disks/{disk}/digests`: the digest list
/// (`application/vnd.ferry.digests`, `docs/agent-protocol.md` §9) of disk `disk` in the newest
/// recovery point of one of the agent's items; any other item is 403, a disk no point holds
/// 404 `no_point`.
pub(super) async fn my_disk_digests(
    State(s): State<ApiState>,
    Extension(id): Extension<AgentId>,
    ApiPath((name, disk)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let a = me(&s, &id).await?;
    if !a.items.contains(&name) {
        return Err(forbidden_item(&name));
    }
    let n = name.clone();
    let item = s
        .catalog(move |c| c.item(&n))
        .await?
        .ok_or_else(|| forbidden_item(&name))?;
    let Some(role) = s.process() else {
        return Err(no_process_role());
    };
    let shown: String = disk.chars().take(100).collect();
    if ferry_store::check_name("disk name", &disk).is_err() {
        return Err(no_point(format!(
            "no recovery point of `{name}` holds a disk `{shown}`"
        )));
    }
    if role.has_undrained(&name, &disk) {
        // The newest point is older than what the gateway holds: a resync compared with it
        // would be applied over the newer cycles and could undo them.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cycles_pending",
            format!(
                "complete cycles of `{name}`/`{shown}` are not in the vault yet; the digests would describe an older point"
            ),
        ));
    }
    let vault = s.vault(&item.vault).cloned().ok_or_else(|| {
        ApiError::internal(format!(
            "the vault `{}` of item `{name}` is not open",
            item.vault
        ))
    })?;
    let point = match vault.point(&name, &PointSelector::Latest).await {
        Ok(p) => p,
        Err(StoreError::NoSuchPoint { .. }) => {
            return Err(no_point(format!("item `{name}` has no recovery point yet")));
        }
        Err(e) => return Err(e.into()),
    };
    let Some(d) = point
        .disks
        .iter()
        .find(|d| d.name == disk && d.size > 0)
        .cloned()
    else {
        return Err(no_point(format!(
            "the newest recovery point of `{name}` ({}) holds no disk `{shown}`",
            point.id
        )));
    };
    let Ok(permit) = DIGEST_JOBS.try_acquire() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "digests_busy",
            format!("{MAX_DIGEST_JOBS} digest lists are being computed already; retry in a minute"),
        ));
    };
    // The raw digests and the list, side by side on the cache disk.
    let needed = d.chunks().saturating_mul(2 * DIGEST_LEN as u64);
    match role.inner.guard.check(needed) {
        Ok(_) => {}
        Err(crate::journal::JournalError::Backpressure { reason, .. }) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cache_full",
                format!(
                    "the appliance's cache cannot take a digest list of {needed} bytes now ({reason}); retry later"
                ),
            ));
        }
        Err(e) => return Err(ApiError::internal(e)),
    }
    let (file, len) = digest_list(&vault, &point, &d, &role.inner.scratch_dir).await?;
    drop(permit);
    let body = futures::stream::try_unfold(tokio::fs::File::from_std(file), |mut f| async move {
        let mut buf = bytes::BytesMut::with_capacity(STREAM_CHUNK);
        let n = f.read_buf(&mut buf).await?;
        Ok::<_, std::io::Error>((n > 0).then(|| (buf.freeze(), f)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, ferry_proto::digests::CONTENT_TYPE)
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(body))
        .map_err(ApiError::internal)
}
