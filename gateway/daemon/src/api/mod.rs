//! The control REST API (`/api/v1`): routes, authentication and the shared state.
//!
//! Every route but `health` and `openapi.json` needs an active admin bearer token: vaults and
//! their points, admin tokens, replication policies (`policies`), protected items (`items`,
//! whose operations answer 202 with a job) and jobs (`jobs`). Every
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

use crate::auth::Tokens;
use crate::catalog::{Catalog, CatalogError};
use crate::jobs::JobRunner;
use crate::metrics::Metrics;

pub mod error;
pub mod extract;
mod items;
mod jobs;
mod policies;
mod tokens;
mod vaults;

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
    ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/{id}"),
    ("POST", "/api/v1/jobs/{id}/cancel"),
    ("GET", "/api/v1/metrics"),
];

/// What handlers share.
#[derive(Debug, Clone)]
pub struct ApiState(Arc<StateInner>);

#[derive(Debug)]
struct StateInner {
    metrics: Arc<Metrics>,
    tokens: Tokens,
    vaults: Arc<BTreeMap<String, Vault>>,
    jobs: Option<JobRunner>,
    max_body_bytes: usize,
}

/// The id of the admin token a request was authenticated with (for the audit lines on
/// stderr).
#[derive(Debug, Clone)]
pub struct AdminId(pub String);

impl ApiState {
    /// State over the tokens (and their catalog), the opened vaults by name, and the job
    /// runner to wake when a job is queued (`None`: jobs stay queued in the catalog until a
    /// runner looks, as in unit tests).
    pub fn new(
        tokens: Tokens,
        vaults: Arc<BTreeMap<String, Vault>>,
        jobs: Option<JobRunner>,
        metrics: Arc<Metrics>,
        max_body_bytes: usize,
    ) -> Self {
        Self(Arc::new(StateInner {
            metrics,
            tokens,
            vaults,
            jobs,
            max_body_bytes,
        }))
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
        .route("/api/v1/jobs", get(jobs::list))
        .route("/api/v1/jobs/{id}", get(jobs::get_one))
        .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/v1/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/openapi.json", get(openapi))
        .merge(admin)
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
    let text = s.catalog(move |c| m.render(c)).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Lets a request through only with an active admin token.
async fn require_admin(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return ApiError::unauthorized().into_response();
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    let Some(id) = token.and_then(|t| s.tokens().authenticate(t)) else {
        return ApiError::invalid_token().into_response();
    };
    req.extensions_mut().insert(AdminId(id));
    next.run(req).await
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
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
