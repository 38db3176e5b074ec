//! `/api/v1/groups`: replication groups, protected items replicated and failed over
//! together. `PATCH` and `DELETE` honour `If-Match` like policies do; an item is in one
//! group at most (409 `item_in_group`), and every member must exist (404 `item_not_found`).

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiPath, ApiQuery, PageQuery, encode_cursor};
use super::policies::{etag, if_match};
use super::{AdminId, ApiError, ApiState, PageJson, time};
use crate::catalog::{CatalogError, Group, GroupPatch};

#[derive(Debug, Serialize)]
pub(super) struct GroupJson {
    name: String,
    description: Option<String>,
    items: Vec<String>,
    revision: u64,
    created: String,
    updated: String,
}

impl From<Group> for GroupJson {
    fn from(g: Group) -> Self {
        Self {
            name: g.name,
            description: g.description,
            items: g.items,
            revision: g.revision,
            created: time(g.created_ms),
            updated: time(g.updated_ms),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    name: String,
    description: Option<String>,
    #[serde(default)]
    items: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PatchBody {
    #[serde(default, deserialize_with = "super::extract::null_clears")]
    description: Option<Option<String>>,
    items: Option<Vec<String>>,
}

type Tagged = ([(HeaderName, HeaderValue); 1], Json<GroupJson>);

fn tagged(g: Group) -> Tagged {
    ([(header::ETAG, etag(g.revision))], Json(g.into()))
}

fn no_group(name: &str) -> ApiError {
    let shown: String = name.chars().take(100).collect();
    CatalogError::GroupNotFound(shown).into()
}

fn path_name(name: String) -> Result<String, ApiError> {
    crate::item::check_name("group", &name).map_err(|_| no_group(&name))?;
    Ok(name)
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<GroupJson>>, ApiError> {
    let page = q.validate()?;
    let p = s
        .catalog(move |c| c.groups_page(page.after.as_deref(), page.limit))
        .await?;
    Ok(Json(PageJson {
        items: p.items.into_iter().map(GroupJson::from).collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

pub(super) async fn create(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiJson(b): ApiJson<CreateBody>,
) -> Result<(StatusCode, Tagged), ApiError> {
    let now = ferry_store::point::now_ms();
    let g = s
        .catalog(move |c| c.create_group(&b.name, b.description, b.items, now))
        .await?;
    eprintln!("ferryd: group {} created by token {}", g.name, by.0);
    Ok((StatusCode::CREATED, tagged(g)))
}

pub(super) async fn get_one(
    State(s): State<ApiState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Tagged, ApiError> {
    let name = path_name(name)?;
    let n = name.clone();
    let g = s
        .catalog(move |c| c.group(&n))
        .await?
        .ok_or_else(|| no_group(&name))?;
    Ok(tagged(g))
}

pub(super) async fn update(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<PatchBody>,
) -> Result<Tagged, ApiError> {
    let name = path_name(name)?;
    let expect = if_match(&headers)?;
    let patch = GroupPatch {
        description: b.description,
        items: b.items,
    };
    let now = ferry_store::point::now_ms();
    let g = s
        .catalog(move |c| c.update_group(&name, expect.as_deref(), patch, now))
        .await?;
    eprintln!("ferryd: group {} updated by token {}", g.name, by.0);
    Ok(tagged(g))
}

pub(super) async fn delete(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Tagged, ApiError> {
    let name = path_name(name)?;
    let expect = if_match(&headers)?;
    let g = s
        .catalog(move |c| c.delete_group(&name, expect.as_deref()))
        .await?;
    eprintln!("ferryd: group {} deleted by token {}", g.name, by.0);
    Ok(tagged(g))
}
