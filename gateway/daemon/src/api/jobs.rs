//! `/api/v1/jobs`: the operations the appliance runs, newest first, with their logs;
//! `POST /jobs/{id}/cancel` cancels a job that has not started.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::extract::{ApiPath, ApiQuery, PageQuery, encode_cursor};
use super::{AdminId, ApiError, ApiState, PageJson, time};
use crate::catalog::{CatalogError, Job, JobLine};

#[derive(Debug, Serialize)]
pub(super) struct LineJson {
    time: String,
    message: String,
}

#[derive(Debug, Serialize)]
pub(super) struct JobJson {
    id: String,
    kind: &'static str,
    item: String,
    state: &'static str,
    created: String,
    started: Option<String>,
    ended: Option<String>,
    error: Option<String>,
    log: Vec<LineJson>,
    log_dropped: u64,
}

impl From<Job> for JobJson {
    fn from(j: Job) -> Self {
        Self {
            kind: j.kind.as_str(),
            state: j.state.as_str(),
            created: time(j.created_ms),
            started: j.started_ms.map(time),
            ended: j.ended_ms.map(time),
            log: j
                .log
                .into_iter()
                .map(|JobLine { t_ms, msg }| LineJson {
                    time: time(t_ms),
                    message: msg,
                })
                .collect(),
            id: j.id,
            item: j.item,
            error: j.error,
            log_dropped: j.log_dropped,
        }
    }
}

/// `?limit=&cursor=&item=`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct JobsQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    item: Option<String>,
}

fn no_job(id: &str) -> ApiError {
    let shown: String = id.chars().take(100).collect();
    CatalogError::JobNotFound(shown).into()
}

/// A path's job id, or 404 when it cannot be one.
fn path_id(id: String) -> Result<String, ApiError> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
    {
        return Err(no_job(&id));
    }
    Ok(id)
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<JobsQuery>,
) -> Result<Json<PageJson<JobJson>>, ApiError> {
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .validate()?;
    // As the points listing does: a filter that cannot be an item's name is a client error,
    // not an empty page (the OpenAPI document states the same rule).
    if let Some(i) = &q.item {
        crate::item::check_name("item", i)
            .map_err(|m| ApiError::bad_request("invalid_query", m))?;
    }
    let item = q.item;
    let p = s
        .catalog(move |c| c.jobs_page(page.after.as_deref(), page.limit, item.as_deref()))
        .await?;
    Ok(Json(PageJson {
        items: p.items.into_iter().map(JobJson::from).collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

pub(super) async fn get_one(
    State(s): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobJson>, ApiError> {
    let id = path_id(id)?;
    let i = id.clone();
    let j = s
        .catalog(move |c| c.job(&i))
        .await?
        .ok_or_else(|| no_job(&id))?;
    Ok(Json(j.into()))
}

pub(super) async fn cancel(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<JobJson>, ApiError> {
    let id = path_id(id)?;
    let now = ferry_store::point::now_ms();
    let j = s.catalog(move |c| c.cancel_job(&id, now)).await?;
    eprintln!("ferryd: job {} cancelled by token {}", j.id, by.0);
    Ok(Json(j.into()))
}
