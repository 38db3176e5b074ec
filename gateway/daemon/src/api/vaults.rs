//! `GET /api/v1/vaults` and `GET /api/v1/vaults/{name}/points`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::extract::{ApiPath, ApiQuery, PageQuery, encode_cursor};
use super::{ApiError, ApiState, PageJson, time};
use crate::catalog::VaultEntry;

/// Point records fetched from the vault at once while building a page.
const POINT_FETCH_CONCURRENCY: usize = 8;
/// Longest vault name looked up.
const MAX_NAME_LEN: usize = 128;

#[derive(Debug, Serialize)]
pub(super) struct VaultJson {
    name: String,
    url: String,
    created: String,
}

impl From<VaultEntry> for VaultJson {
    fn from(v: VaultEntry) -> Self {
        Self {
            name: v.name,
            url: v.url,
            created: time(v.created_ms),
        }
    }
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<VaultJson>>, ApiError> {
    let page = q.validate()?;
    let p = s
        .catalog(move |c| c.vaults_page(page.after.as_deref(), page.limit))
        .await?;
    Ok(Json(PageJson {
        items: p.items.into_iter().map(VaultJson::from).collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PointsQuery {
    item: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct DiskJson {
    name: String,
    size: u64,
    chunk_size: u32,
    bytes_read: u64,
    bytes_stored: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct PointJson {
    id: String,
    item: String,
    created: String,
    consistency: &'static str,
    parent: Option<String>,
    source: String,
    disks: Vec<DiskJson>,
    tags: std::collections::BTreeMap<String, String>,
}

impl From<ferry_store::PointRecord> for PointJson {
    fn from(p: ferry_store::PointRecord) -> Self {
        Self {
            id: p.id,
            item: p.item,
            created: time(p.created_ms),
            consistency: p.consistency.as_str(),
            parent: p.parent,
            source: p.source,
            disks: p
                .disks
                .into_iter()
                .map(|d| DiskJson {
                    name: d.name,
                    size: d.size,
                    chunk_size: d.chunk_size,
                    bytes_read: d.bytes_read,
                    bytes_stored: d.bytes_stored,
                })
                .collect(),
            tags: p.tags.into_iter().collect(),
        }
    }
}

pub(super) async fn points(
    State(s): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<PointsQuery>,
) -> Result<Json<PageJson<PointJson>>, ApiError> {
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    }
    .validate()?;
    let no_vault = || ApiError::not_found("vault_not_found", "no vault of that name");
    if name.len() > MAX_NAME_LEN {
        return Err(no_vault());
    }
    let n = name.clone();
    let entry = s
        .catalog(move |c| c.vault(&n))
        .await?
        .ok_or_else(no_vault)?;
    let vault = s.vault(&entry.name).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "vault_unavailable",
            format!("vault `{}` is in the catalog but not open", entry.name),
        )
    })?;
    // Object names sort by (item, id) and ids by time, so a page is a slice after the cursor.
    let names = vault.point_names(q.item.as_deref()).await?;
    let start = match &page.after {
        Some(a) => names.partition_point(|n| n.as_str() <= a.as_str()),
        None => 0,
    };
    let end = names.len().min(start + page.limit);
    let records: Vec<ferry_store::PointRecord> = futures::stream::iter(names[start..end].to_vec())
        .map(|n| {
            let v = vault.clone();
            async move { v.load_point(&n).await }
        })
        .buffered(POINT_FETCH_CONCURRENCY)
        .try_collect()
        .await?;
    let next_cursor = (end < names.len())
        .then(|| names[end - 1].as_str())
        .map(encode_cursor);
    Ok(Json(PageJson {
        items: records.into_iter().map(PointJson::from).collect(),
        next_cursor,
    }))
}
