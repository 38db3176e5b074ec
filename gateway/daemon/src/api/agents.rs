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
//! /agent/heartbeat`) need the client certificate issued at enrollment and see only the
//! agent's own items: another item is 403 `forbidden_item` whether it exists or not.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::{Extension, Json};
use ferry_proto::enroll::{EnrollRequest, EnrollResponse, Heartbeat};
use serde::{Deserialize, Serialize};

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
    let (item, policy) = s
        .catalog(move |c| {
            let Some(it) = c.item(&n)? else {
                return Ok(None);
            };
            let policy = c.policy(&it.policy)?;
            Ok(Some((it, policy)))
        })
        .await?
        .ok_or_else(|| forbidden_item(&name))?;
    let settings = policy.map(|p| p.settings).unwrap_or_default();
    let Some(role) = s.process() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_process_role",
            "this appliance does not have the process role: it takes no replication".to_string(),
        ));
    };
    let plan = role
        .plan(&item, &settings)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(plan))
}
