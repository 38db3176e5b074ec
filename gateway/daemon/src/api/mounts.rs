//! `/api/v1/mounts` and `POST /api/v1/items/{name}/mounts`: instant recovery, a recovery
//! point's disk served over NBD by the appliance (see `crate::mounts`). Mounts live in
//! memory until deleted or until `ferryd` stops.

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiPath};
use super::{AdminId, ApiError, ApiState, PageJson, time};
use crate::catalog::CatalogError;
use crate::mounts::{MountError, MountInfo};

#[derive(Debug, Serialize)]
pub(super) struct MountJson {
    id: String,
    item: String,
    point: String,
    disk: String,
    size_bytes: u64,
    writable: bool,
    export: String,
    url: String,
    created: String,
}

impl From<MountInfo> for MountJson {
    fn from(m: MountInfo) -> Self {
        Self {
            id: m.id,
            item: m.item,
            point: m.point,
            disk: m.disk,
            size_bytes: m.size,
            writable: m.writable,
            export: m.export,
            url: m.url,
            created: time(m.created_ms),
        }
    }
}

/// `POST /items/{name}/mounts`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MountBody {
    /// `latest` (default), `latest-app-consistent`, an RFC 3339 time or a point id.
    point: Option<String>,
    /// The disk (may be left out when the point has one).
    disk: Option<String>,
    /// Accept writes into a copy-on-write overlay (default false).
    writable: Option<bool>,
}

impl From<MountError> for ApiError {
    fn from(e: MountError) -> Self {
        match e {
            MountError::TooMany(_) => {
                ApiError::new(StatusCode::CONFLICT, "too_many_mounts", e.to_string())
            }
            MountError::NotFound(_) => ApiError::not_found("mount_not_found", e.to_string()),
            MountError::Store {
                source: ferry_store::StoreError::NoSuchPoint { .. },
                ..
            } => ApiError::new(StatusCode::CONFLICT, "no_point", e.to_string()),
            MountError::Store { source, .. } => ApiError::from(source),
            MountError::Serve { .. } => ApiError::internal(e),
        }
    }
}

fn mounts(s: &ApiState) -> Result<&crate::mounts::Mounts, ApiError> {
    s.mounts().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "mounts_unavailable",
            "this appliance serves no mounts",
        )
    })
}

/// Serves a recovery point's disk of the item over NBD: 201 with the mount and its
/// `nbd://` URL.
pub(super) async fn create(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<MountBody>,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 1], Json<MountJson>), ApiError> {
    // The host the API was reached at, without its port: what the URL names when mounts
    // listen on every address.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .map(|a| a.host().to_string());
    let name = super::items::path_name(name)?;
    let point = super::items::check_point(body.point)?;
    if let Some(d) = &body.disk {
        crate::item::check_name("disk", d)
            .map_err(|m| ApiError::bad_field("invalid_value", "disk", m))?;
    }
    let lookup = name.clone();
    let item = s
        .catalog(move |c| {
            c.item(&lookup)?
                .ok_or_else(|| CatalogError::ItemNotFound(lookup.clone()))
        })
        .await?;
    let vault = s.vault(&item.vault).cloned().ok_or_else(|| {
        ApiError::internal(format!(
            "the vault `{}` of item `{name}` is not open",
            item.vault
        ))
    })?;
    let m = mounts(&s)?
        .start(
            &vault,
            &name,
            &ferry_store::PointSelector::parse(&point),
            body.disk.as_deref(),
            body.writable.unwrap_or(false),
            host.as_deref(),
        )
        .await?;
    eprintln!(
        "ferryd: mount {} of item {name} requested by token {}",
        m.id, by.0
    );
    let location = HeaderValue::from_str(&format!("/api/v1/mounts/{}", m.id))
        .expect("mount ids are valid in a header");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(m.into()),
    ))
}

/// Every mount served (one page: there are at most `[target] max_mounts`).
pub(super) async fn list(State(s): State<ApiState>) -> Result<Json<PageJson<MountJson>>, ApiError> {
    Ok(Json(PageJson {
        items: mounts(&s)?
            .list()
            .into_iter()
            .map(MountJson::from)
            .collect(),
        next_cursor: None,
    }))
}

/// One mount.
pub(super) async fn get_one(
    State(s): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MountJson>, ApiError> {
    Ok(Json(mounts(&s)?.get(&id)?.into()))
}

/// Stops a mount: its server closes every connection; a writable mount's writes are
/// discarded. 200 with the mount as it was.
pub(super) async fn delete(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<MountJson>, ApiError> {
    let m = mounts(&s)?.stop(&id)?;
    eprintln!(
        "ferryd: mount {} of item {} stopped by token {}",
        m.id, m.item, by.0
    );
    Ok(Json(m.into()))
}
