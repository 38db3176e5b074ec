//! The control REST API (`/api/v1`): routes, authentication and the shared state.
//!
//! Three classes of endpoint, each with its own credential, and no credential of another
//! class accepted (the authorisation matrix the end-to-end tests walk):
//!
//! - public: `health`, `openapi.json`, and `enroll` (whose credential is the one-time
//!   enrollment token in its body);
//! - admin, with an active admin bearer token: vaults and their points, admin tokens,
//!   replication policies (`policies`), protected items (`items`, whose operations answer
//!   202 with a job), jobs, replication groups, enrollment tokens and agents, metrics. A
//!   request with an agent's certificate and no admin token is 403 `admin_only`;
//! - agent, with the client certificate issued at enrollment (`agent…`): the agent's own
//!   record and items. A revoked agent's certificate is 401 `certificate_revoked` from the
//!   next request on, an expired one 401 `certificate_expired` (even on a connection opened
//!   before it expired); an admin token instead of a certificate is 403 `agent_only`.
//!
//! Every
//! refusal is a JSON [`ApiError`]; every listing is paginated (`?limit=&cursor=`, answered
//! with `items` and `next_cursor`). The served OpenAPI 3.1 document (`openapi.json` beside
//! this file) describes exactly these routes; a test keeps the two in step.
//!
//! Catalog calls run on the blocking pool (each is a redb transaction, a commit fsyncs).
//! Transport concerns (TLS, timeouts, body and connection limits) are `server`'s.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use ferry_store::Vault;
use serde::Serialize;

use crate::agents::{Agents, CertCheck};
use crate::auth::Tokens;
use crate::catalog::{Catalog, CatalogError};
use crate::jobs::JobRunner;
use crate::metrics::Metrics;

mod agents;
pub mod error;
pub mod extract;
mod groups;
mod items;
mod jobs;
mod mounts;
mod policies;
mod tokens;
mod vaults;
mod web;

pub use error::ApiError;

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The routes of the API as (method, path template): what the router serves and the OpenAPI
/// document describes.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/health"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/vaults"),
    ("GET", "/api/v1/vaults/{name}/points"),
    ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/{id}"),
    ("GET", "/api/v1/policies"),
    ("POST", "/api/v1/policies"),
    ("GET", "/api/v1/policies/{name}"),
    ("PATCH", "/api/v1/policies/{name}"),
    ("DELETE", "/api/v1/policies/{name}"),
    ("GET", "/api/v1/items"),
    ("POST", "/api/v1/items"),
    ("GET", "/api/v1/items/{name}"),
    ("PATCH", "/api/v1/items/{name}"),
    ("DELETE", "/api/v1/items/{name}"),
    ("POST", "/api/v1/items/{name}/resync"),
    ("POST", "/api/v1/items/{name}/failover"),
    ("POST", "/api/v1/items/{name}/commit"),
    ("POST", "/api/v1/items/{name}/reprotect"),
    ("POST", "/api/v1/items/{name}/test-failover/cleanup"),
    ("POST", "/api/v1/items/{name}/pause"),
    ("POST", "/api/v1/items/{name}/resume"),
    ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/{id}"),
    ("POST", "/api/v1/jobs/{id}/cancel"),
    ("GET", "/api/v1/metrics"),
    ("GET", "/api/v1/groups"),
    ("POST", "/api/v1/groups"),
    ("GET", "/api/v1/groups/{name}"),
    ("PATCH", "/api/v1/groups/{name}"),
    ("DELETE", "/api/v1/groups/{name}"),
    ("POST", "/api/v1/groups/{name}/failover"),
    ("POST", "/api/v1/items/{name}/mounts"),
    ("GET", "/api/v1/mounts"),
    ("GET", "/api/v1/mounts/{id}"),
    ("DELETE", "/api/v1/mounts/{id}"),
    ("GET", "/api/v1/enrollment-tokens"),
    ("POST", "/api/v1/enrollment-tokens"),
    ("DELETE", "/api/v1/enrollment-tokens/{id}"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/agents/{name}"),
    ("PATCH", "/api/v1/agents/{name}"),
    ("DELETE", "/api/v1/agents/{name}"),
    ("POST", "/api/v1/enroll"),
    ("GET", "/api/v1/agent"),
    ("GET", "/api/v1/agent/items"),
    ("GET", "/api/v1/agent/items/{name}"),
    ("POST", "/api/v1/agent/heartbeat"),
    ("GET", "/api/v1/agent/items/{name}/replication"),
    ("GET", "/api/v1/agent/items/{name}/disks/{disk}/digests"),
];

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState(Arc<StateInner>);

#[derive(Debug)]
struct StateInner {
    metrics: Arc<Metrics>,
    tokens: Tokens,
    agents: Arc<Agents>,
    vaults: Arc<BTreeMap<String, Vault>>,
    jobs: Option<JobRunner>,
    max_body_bytes: usize,
    roles: Vec<&'static str>,
    process: Option<crate::replication::ProcessRole>,
    /// A test failover older than this is flagged stale (`[target]`).
    test_failover_max_age_ms: u64,
    /// Instant-recovery mounts (`None`: this appliance serves none).
    mounts: Option<Arc<crate::mounts::Mounts>>,
}

/// The id of the admin token a request was authenticated with (for the audit lines on
/// stderr).
#[derive(Debug, Clone)]
pub struct AdminId(pub String);

/// The agent a request was authenticated as, and the certificate it presented (handlers
/// check the agent's record still has that certificate: a revocation and re-enrollment
/// racing the request does not lend the new identity to the old certificate).
#[derive(Debug, Clone)]
pub struct AgentId {
    /// Agent name.
    pub name: String,
    /// SHA-256 of the certificate presented.
    pub cert_sha256: [u8; 32],
}

impl ApiState {
    /// State over the tokens (and their catalog), the agents, the opened vaults by name, and
    /// the job runner to wake when a job is queued (`None`: jobs stay queued in the catalog
    /// until a runner looks, as in unit tests).
    pub fn new(
        tokens: Tokens,
        agents: Arc<Agents>,
        vaults: Arc<BTreeMap<String, Vault>>,
        jobs: Option<JobRunner>,
        metrics: Arc<Metrics>,
        max_body_bytes: usize,
        roles: &crate::config::Roles,
    ) -> Self {
        Self(Arc::new(StateInner {
            metrics,
            tokens,
            agents,
            vaults,
            jobs,
            max_body_bytes,
            roles: roles.names(),
            process: None,
            test_failover_max_age_ms: crate::config::TargetConfig::default()
                .test_failover_max_age_hours
                * 3_600_000,
            mounts: None,
        }))
    }

    /// The same state, with the target role's settings (the age past which a test
    /// failover is flagged). Call right after [`ApiState::new`].
    pub fn with_target(mut self, target: &crate::config::TargetConfig) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.test_failover_max_age_ms = target.test_failover_max_age_hours * 3_600_000;
        }
        self
    }

    /// The same state, with the process role whose figures items show and whose plan
    /// agents read. Call right after [`ApiState::new`].
    pub fn with_process(mut self, role: crate::replication::ProcessRole) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.process = Some(role);
        }
        self
    }

    /// The same state, serving instant-recovery mounts. Call right after [`ApiState::new`].
    pub fn with_mounts(mut self, mounts: Arc<crate::mounts::Mounts>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.mounts = Some(mounts);
        }
        self
    }

    /// The mounts, when this appliance serves them.
    fn mounts(&self) -> Option<&crate::mounts::Mounts> {
        self.0.mounts.as_deref()
    }

    /// Age past which a test failover is flagged stale.
    fn test_failover_max_age_ms(&self) -> u64 {
        self.0.test_failover_max_age_ms
    }

    /// The process role, when this appliance runs it.
    fn process(&self) -> Option<&crate::replication::ProcessRole> {
        self.0.process.as_ref()
    }

    /// Wakes a job runner after a job was queued.
    fn jobs_queued(&self) {
        if let Some(j) = &self.0.jobs {
            j.notify();
        }
    }

    /// The vault an item goes to when its request names none: the only one.
    fn default_vault(&self) -> Option<String> {
        let mut names = self.0.vaults.keys();
        match (names.next(), names.next()) {
            (Some(only), None) => Some(only.clone()),
            _ => None,
        }
    }

    /// Largest request body accepted.
    pub fn max_body_bytes(&self) -> usize {
        self.0.max_body_bytes
    }

    fn tokens(&self) -> &Tokens {
        &self.0.tokens
    }

    fn agents(&self) -> &Agents {
        &self.0.agents
    }

    fn agents_arc(&self) -> Arc<Agents> {
        self.0.agents.clone()
    }

    /// Runs `f` on the agents on the blocking pool.
    async fn with_agents<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Agents) -> Result<T, CatalogError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let a = self.agents_arc();
        tokio::task::spawn_blocking(move || f(&a))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }

    fn vault(&self, name: &str) -> Option<&Vault> {
        self.0.vaults.get(name)
    }

    /// Runs `f` on the catalog on the blocking pool.
    async fn catalog<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Catalog) -> Result<T, CatalogError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(s.0.tokens.catalog()))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }

    /// Runs `f` on the tokens on the blocking pool.
    async fn with_tokens<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tokens) -> Result<T, CatalogError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(s.tokens()))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::from)
    }
}

/// A page of a listing.
#[derive(Debug, Serialize)]
pub struct PageJson<T> {
    /// The entries.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The router of the whole API.
pub fn router(state: ApiState) -> Router {
    let admin = Router::new()
        .route("/api/v1/vaults", get(vaults::list))
        .route("/api/v1/vaults/{name}/points", get(vaults::points))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/tokens/{id}", delete(tokens::revoke))
        .route(
            "/api/v1/policies",
            get(policies::list).post(policies::create),
        )
        .route(
            "/api/v1/policies/{name}",
            get(policies::get_one)
                .patch(policies::update)
                .delete(policies::delete),
        )
        .route("/api/v1/items", get(items::list).post(items::create))
        .route(
            "/api/v1/items/{name}",
            get(items::get_one)
                .patch(items::update)
                .delete(items::delete),
        )
        .route("/api/v1/items/{name}/resync", post(items::resync))
        .route("/api/v1/items/{name}/failover", post(items::failover))
        .route("/api/v1/items/{name}/commit", post(items::commit))
        .route("/api/v1/items/{name}/reprotect", post(items::reprotect))
        .route(
            "/api/v1/items/{name}/test-failover/cleanup",
            post(items::cleanup),
        )
        .route("/api/v1/items/{name}/pause", post(items::pause))
        .route("/api/v1/items/{name}/resume", post(items::resume))
        .route("/api/v1/jobs", get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::get_one))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/metrics", get(metrics))
        .route("/api/v1/groups", get(groups::list).post(groups::create))
        .route(
            "/api/v1/groups/{name}",
            get(groups::get_one)
                .patch(groups::update)
                .delete(groups::delete),
        )
        .route("/api/v1/groups/{name}/failover", post(groups::failover))
        .route("/api/v1/items/{name}/mounts", post(mounts::create))
        .route("/api/v1/mounts", get(mounts::list))
        .route(
            "/api/v1/mounts/{id}",
            get(mounts::get_one).delete(mounts::delete),
        )
        .route(
            "/api/v1/enrollment-tokens",
            get(agents::list_tokens).post(agents::create_token),
        )
        .route(
            "/api/v1/enrollment-tokens/{id}",
            delete(agents::revoke_token),
        )
        .route("/api/v1/agents", get(agents::list))
        .route(
            "/api/v1/agents/{name}",
            get(agents::get_one)
                .patch(agents::update)
                .delete(agents::revoke),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let agent = Router::new()
        .route("/api/v1/agent", get(agents::whoami))
        .route("/api/v1/agent/items", get(agents::my_items))
        .route("/api/v1/agent/items/{name}", get(agents::my_item))
        .route(
            "/api/v1/agent/items/{name}/replication",
            get(agents::my_item_plan),
        )
        .route(
            "/api/v1/agent/items/{name}/disks/{disk}/digests",
            get(agents::my_disk_digests),
        )
        .route("/api/v1/agent/heartbeat", post(agents::heartbeat))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_agent));
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/enroll", post(agents::enroll))
        .merge(web::routes())
        .merge(admin)
        .merge(agent)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Counts every answer by status class for `/metrics`.
async fn count(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    s.0.metrics.response(r.status().as_u16());
    r
}

/// `GET /api/v1/metrics`: Prometheus' text exposition format.
async fn metrics(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let m = s.0.metrics.clone();
    let mut text = s.catalog(move |c| m.render(c)).await?;
    if let Some(p) = s.process() {
        text.push_str(&p.render_metrics());
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The admin token id of `req`'s bearer token: `None` without an `Authorization` header,
/// `Some(None)` when it is not an active admin token.
fn admin_of(s: &ApiState, req: &Request) -> Option<Option<String>> {
    let value = req.headers().get(header::AUTHORIZATION)?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    Some(token.and_then(|t| s.tokens().authenticate(t)))
}

/// Who the request's client certificate (verified by TLS) is, if it has one.
fn agent_of(s: &ApiState, req: &Request) -> Option<CertCheck> {
    req.extensions()
        .get::<crate::server::ClientCert>()
        .map(|c| s.agents().check(&c.sha256))
}

/// 401: the certificate of a revoked agent.
pub(crate) fn certificate_revoked() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "certificate_revoked",
        "this agent was revoked: its certificate is no longer accepted; enroll it again with a new token",
    )
}

/// Lets a request through only with an active admin token.
async fn require_admin(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    match admin_of(&s, &req) {
        Some(Some(id)) => {
            req.extensions_mut().insert(AdminId(id));
            next.run(req).await
        }
        Some(None) => ApiError::invalid_token().into_response(),
        None => match agent_of(&s, &req) {
            Some(CertCheck::Agent(_)) => ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_only",
                "this endpoint is for administrators (`Authorization: Bearer <admin token>`); \
                 agents may only use /api/v1/agent",
            )
            .into_response(),
            _ => ApiError::unauthorized().into_response(),
        },
    }
}

/// Lets a request through only with the certificate of an active agent.
async fn require_agent(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let presented = req
        .extensions()
        .get::<crate::server::ClientCert>()
        .map(|c| c.sha256);
    match (agent_of(&s, &req), presented) {
        (Some(CertCheck::Agent(name)), Some(cert_sha256)) => {
            req.extensions_mut().insert(AgentId { name, cert_sha256 });
            next.run(req).await
        }
        (Some(CertCheck::Revoked), _) => certificate_revoked().into_response(),
        (Some(CertCheck::Expired(name)), _) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "certificate_expired",
            format!(
                "the certificate of agent `{name}` has expired; enroll it again with a new token (revoke it first)"
            ),
        )
        .into_response(),
        (Some(CertCheck::Unknown | CertCheck::Agent(_)), _) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unknown_certificate",
            "the client certificate is not an enrolled agent's of this appliance",
        )
        .into_response(),
        (None, _) if matches!(admin_of(&s, &req), Some(Some(_))) => ApiError::new(
            StatusCode::FORBIDDEN,
            "agent_only",
            "this endpoint is for enrolled agents (client certificate); admin tokens are not accepted here",
        )
        .into_response(),
        (None, _) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client_certificate_required",
            "this endpoint needs the client certificate an agent received at enrollment (`ferry-agent enroll`)",
        )
        .into_response(),
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    roles: Vec<&'static str>,
}

async fn health(State(s): State<ApiState>) -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        roles: s.0.roles.clone(),
    })
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint; see /api/v1/openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see /api/v1/openapi.json",
    )
}

/// RFC 3339 of Unix milliseconds.
fn time(ms: u64) -> String {
    ferry_store::point::rfc3339(ms)
}

#[cfg(test)]
mod tests;
