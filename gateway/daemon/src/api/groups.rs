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

/// `POST /groups/{name}/failover`'s body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FailoverBody {
    /// `test`, `planned` or `unplanned`.
    #[serde(rename = "type")]
    mode: String,
    /// `latest` (default), `latest-app-consistent` or an RFC 3339 time: one time for the
    /// whole group. A point id names one item's point, so it is refused here.
    point: Option<String>,
    /// Output format of the disks (default `raw`).
    format: Option<String>,
}

/// One member of a group failover: its item, the job and the point chosen.
#[derive(Debug, Serialize)]
pub(super) struct MemberJson {
    #[serde(flatten)]
    accepted: super::items::Accepted,
    /// The point id chosen for the member (`null`: a planned failover, from its final cycle).
    point: Option<String>,
}

/// 202 of a group failover.
#[derive(Debug, Serialize)]
pub(super) struct GroupFailoverJson {
    group: String,
    /// The time every member's point is at or before (`null`: a planned failover).
    point_time: Option<String>,
    members: Vec<MemberJson>,
}

/// The group's point time and each member's point, for `sel` (not an id).
///
/// - `latest`: the oldest of the members' newest points gives the group's time; each member
///   fails over from its newest point at or before it, so the members are as close in time
///   as their cycles allow (no member is ahead of the one that replicated last).
/// - a time: each member's newest point at or before it.
/// - `latest-app-consistent`: each member's own newest application-consistent point (an
///   application-consistent point is made on one machine; agents do not coordinate them
///   across machines); the group's time is the newest of them (every member's point is at
///   or before it, as for the others).
async fn group_points(
    s: &ApiState,
    members: &[crate::item::Item],
    sel: &ferry_store::PointSelector,
) -> Result<(u64, Vec<String>), ApiError> {
    use ferry_store::{PointSelector, StoreError};
    let vault_of = |it: &crate::item::Item| {
        s.vault(&it.vault).cloned().ok_or_else(|| {
            ApiError::internal(format!(
                "the vault `{}` of item `{}` is not open",
                it.vault, it.name
            ))
        })
    };
    let no_point = |it: &crate::item::Item, what: String| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no_point",
            format!("group member `{}`: no point {what}", it.name),
        )
    };
    let pick = |it: &crate::item::Item, sel: PointSelector| {
        let vault = vault_of(it);
        let name = it.name.clone();
        async move {
            match vault?.point(&name, &sel).await {
                Ok(p) => Ok(Some(p)),
                Err(StoreError::NoSuchPoint { .. }) => Ok(None),
                Err(e) => Err(ApiError::from(e)),
            }
        }
    };
    let time = match sel {
        PointSelector::Id(_) => {
            return Err(ApiError::bad_field(
                "invalid_value",
                "point",
                "a point id names one item's point: a group fails over from `latest`, `latest-app-consistent` or a time (RFC 3339)",
            ));
        }
        PointSelector::AtOrBefore(ms) => *ms,
        PointSelector::Latest => {
            let mut t = u64::MAX;
            for it in members {
                let p = pick(it, PointSelector::Latest)
                    .await?
                    .ok_or_else(|| no_point(it, "yet".into()))?;
                t = t.min(p.created_ms);
            }
            t
        }
        PointSelector::LatestAppConsistent => {
            // The newest of the chosen points: every member's point is at or before it.
            let mut t = 0;
            let mut ids = Vec::with_capacity(members.len());
            for it in members {
                let p = pick(it, PointSelector::LatestAppConsistent)
                    .await?
                    .ok_or_else(|| no_point(it, "is application-consistent".into()))?;
                t = t.max(p.created_ms);
                ids.push(p.id);
            }
            return Ok((t, ids));
        }
    };
    let mut ids = Vec::with_capacity(members.len());
    for it in members {
        let p = pick(it, PointSelector::AtOrBefore(time))
            .await?
            .ok_or_else(|| {
                let why = format!("at or before {}", ferry_store::point::rfc3339(time));
                if matches!(sel, PointSelector::Latest) {
                    no_point(
                        it,
                        format!(
                            "{why}, the group's time (the oldest of its members' newest points): \
                             its points are all newer; name a time with `point`"
                        ),
                    )
                } else {
                    no_point(it, why)
                }
            })?;
        ids.push(p.id);
    }
    Ok((time, ids))
}

/// Fails over every item of the group, each as its own job, queued together or not at all.
/// `test` and `unplanned` take one point time for the whole group (see [`group_points`]) and
/// pin each member to a point id; `planned` fails each member over from its own agent's final
/// cycle. `If-Match` names the group's revision.
pub(super) async fn failover(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<FailoverBody>,
) -> Result<(StatusCode, Json<GroupFailoverJson>), ApiError> {
    let name = path_name(name)?;
    let (mode, point, format) = super::items::failover_choice(&body.mode, body.point, body.format)?;
    let expect = if_match(&headers)?;
    let lookup = name.clone();
    let (group, members) = s
        .catalog(move |c| {
            let g = c
                .group(&lookup)?
                .ok_or_else(|| CatalogError::GroupNotFound(lookup.clone()))?;
            let mut members = Vec::with_capacity(g.items.len());
            for i in &g.items {
                members.push(
                    c.item(i)?
                        .ok_or_else(|| CatalogError::ItemNotFound(i.clone()))?,
                );
            }
            Ok((g, members))
        })
        .await?;
    if let Some(revs) = expect.as_deref()
        && !revs.contains(&group.revision)
    {
        return Err(CatalogError::StaleRevision {
            what: "group",
            name: group.name.clone(),
            current: group.revision,
        }
        .into());
    }
    if members.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "illegal_transition",
            format!("group `{name}` has no items to fail over"),
        ));
    }
    let (time, points) = if mode == crate::item::FailoverMode::Planned {
        (None, vec![None; members.len()])
    } else {
        let sel = ferry_store::PointSelector::parse(&point);
        let (t, ids) = group_points(&s, &members, &sel).await?;
        (Some(t), ids.into_iter().map(Some).collect())
    };
    let requests: Vec<(String, crate::item::FailoverRequest)> = members
        .iter()
        .zip(&points)
        .map(|(it, p)| {
            (
                it.name.clone(),
                crate::item::FailoverRequest {
                    mode,
                    point: p.clone().unwrap_or_else(|| "latest".into()),
                    format: format.clone(),
                    in_place: Vec::new(),
                },
            )
        })
        .collect();
    let now = ferry_store::point::now_ms();
    let gname = name.clone();
    let started = s
        .catalog(move |c| {
            let pairs = c.begin_group_failover(&gname, requests, expect.as_deref(), now)?;
            pairs
                .into_iter()
                .map(|(it, job)| Ok((super::items::ItemJson::of(c, it)?, job)))
                .collect::<Result<Vec<_>, CatalogError>>()
        })
        .await?;
    s.jobs_queued();
    let jobs: Vec<String> = started.iter().map(|(_, j)| j.id.clone()).collect();
    eprintln!(
        "ferryd: {} failover of group {name} requested by token {} (jobs {})",
        mode.as_str(),
        by.0,
        jobs.join(", ")
    );
    let members = started
        .into_iter()
        .zip(points)
        .map(|((it, job), point)| MemberJson {
            accepted: super::items::Accepted::new(it, job),
            point,
        })
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(GroupFailoverJson {
            group: name,
            point_time: time.map(ferry_store::point::rfc3339),
            members,
        }),
    ))
}
