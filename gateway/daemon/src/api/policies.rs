//! `GET/POST /api/v1/policies` and `GET/PATCH/DELETE /api/v1/policies/{name}`.
//!
//! Bodies are read member by member (not by a derived `Deserialize`), so that every refusal
//! names its member in `field`: an unknown member (`unknown_field`), one the appliance sets
//! (`read_only_field`: `name` in a PATCH, `revision`, `created`, `updated`,
//! `retention.max_age_hours`), a value of the wrong type or out of its rule
//! (`invalid_value`). Integers are taken as `i64` so that a negative or huge value is
//! refused by its rule, with the rule in the message.
//!
//! `resync_window` (`{"from": "22:00", "to": "06:00", "days": ["fri"]}`, `days` optional) is
//! `null` in a record without one; a body sets it whole, or removes it with `null` (`PATCH`;
//! in a `POST`, `null` is the default: none).
//!
//! Records carry `revision`, also sent as the `ETag` (`"<revision>"`); `PATCH` and `DELETE`
//! honour `If-Match` (a list of such tags, or `*`): the comparison happens in the writing
//! catalog transaction, and a mismatch is 412 `revision_mismatch` with nothing changed.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::{Map, Value};

use super::extract::{ApiJson, ApiPath, ApiQuery, PageQuery, encode_cursor, unknown_field};
use super::{AdminId, ApiError, ApiState, PageJson, time};
use crate::catalog::CatalogError;
use crate::policy::{self, Policy, PolicyPatch, PolicySettings, ResyncWindowPatch, RetentionPatch};

/// Settings members a body may set.
const SETTINGS: &[&str] = &[
    "description",
    "rpo_threshold_minutes",
    "cycle_interval_seconds",
    "retention",
    "app_consistent_frequency_minutes",
    "chunk_size",
    "compression_level",
    "retry_schedule_seconds",
    "resync_threshold_percent",
    "resync_window",
];
/// Members of `retention` a body may set.
const RETENTION: &[&str] = &["keep_all_hours", "hourly_days", "every_hours", "for_days"];
/// Members of `resync_window`.
const RESYNC_WINDOW: &[&str] = &["from", "to", "days"];
/// Members of a record the appliance sets.
const READ_ONLY: &[&str] = &["revision", "created", "updated"];

#[derive(Debug, Serialize)]
pub(super) struct RetentionJson {
    keep_all_hours: u32,
    hourly_days: u32,
    every_hours: u32,
    for_days: u32,
    max_age_hours: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct ResyncWindowJson {
    from: String,
    to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    days: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub(super) struct PolicyJson {
    name: String,
    description: Option<String>,
    rpo_threshold_minutes: u32,
    cycle_interval_seconds: u32,
    retention: RetentionJson,
    app_consistent_frequency_minutes: u32,
    chunk_size: u32,
    compression_level: u32,
    retry_schedule_seconds: Vec<u32>,
    resync_threshold_percent: u32,
    resync_window: Option<ResyncWindowJson>,
    revision: u64,
    created: String,
    updated: String,
}

impl From<Policy> for PolicyJson {
    fn from(p: Policy) -> Self {
        let s = p.settings;
        let r = s.retention;
        Self {
            name: p.name,
            description: s.description,
            rpo_threshold_minutes: s.rpo_threshold_minutes,
            cycle_interval_seconds: s.cycle_interval_seconds,
            retention: RetentionJson {
                max_age_hours: r.max_age_hours(),
                keep_all_hours: r.keep_all_hours,
                hourly_days: r.hourly_days,
                every_hours: r.every_hours,
                for_days: r.for_days,
            },
            app_consistent_frequency_minutes: s.app_consistent_frequency_minutes,
            chunk_size: s.chunk_size,
            compression_level: s.compression_level,
            retry_schedule_seconds: s.retry_schedule_seconds,
            resync_threshold_percent: s.resync_threshold_percent,
            resync_window: s.resync_window.map(|w| ResyncWindowJson {
                from: w.from_text(),
                to: w.to_text(),
                days: w.day_names(),
            }),
            revision: p.revision,
            created: time(p.created_ms),
            updated: time(p.updated_ms),
        }
    }
}

/// The `ETag` of a revision.
pub(super) fn etag(revision: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).expect("digits are a valid header")
}

/// A policy answer: the record, with its `ETag`.
fn one(p: Policy) -> ([(HeaderName, HeaderValue); 1], Json<PolicyJson>) {
    ([(header::ETAG, etag(p.revision))], Json(p.into()))
}

/// The revisions `If-Match` accepts: `None` when absent or `*` (any revision); else those of
/// its strong tags that are revisions (a weak or foreign tag matches nothing, so a list of
/// only such tags always fails with 412).
pub(super) fn if_match(headers: &HeaderMap) -> Result<Option<Vec<u64>>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_header",
            "If-Match must be `*` or a list of entity tags such as `\"7\"` (the record's \
             revision, as in its ETag)",
        )
    };
    let mut any = false;
    let mut tags = 0usize;
    let mut revisions = Vec::new();
    for v in headers.get_all(header::IF_MATCH) {
        let s = v.to_str().map_err(|_| bad())?;
        for tag in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            tags += 1;
            if tag == "*" {
                any = true;
                continue;
            }
            let (weak, rest) = match tag.strip_prefix("W/") {
                Some(r) => (true, r),
                None => (false, tag),
            };
            let opaque = rest
                .strip_prefix('"')
                .and_then(|r| r.strip_suffix('"'))
                .filter(|o| !o.contains('"'))
                .ok_or_else(bad)?;
            // Strong comparison: a weak tag never matches; a revision is written one way.
            if let Ok(n) = opaque.parse::<u64>()
                && !weak
                && n.to_string() == opaque
            {
                revisions.push(n);
            }
        }
    }
    if headers.contains_key(header::IF_MATCH) && tags == 0 {
        return Err(bad());
    }
    Ok((tags > 0 && !any).then_some(revisions))
}

fn no_policy(name: &str) -> ApiError {
    let shown: String = name.chars().take(100).collect();
    CatalogError::PolicyNotFound(shown).into()
}

/// A path's policy name, or 404 when it cannot name a policy.
fn path_name(name: String) -> Result<String, ApiError> {
    policy::check_name(&name).map_err(|_| no_policy(&name))?;
    Ok(name)
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::bad_field("invalid_value", field, message)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// How a body treats an absent member, for the message refusing a `null`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Patch,
}

impl Mode {
    fn null(self, field: &str) -> ApiError {
        let instead = match self {
            Mode::Create => "leave it out to get the default",
            Mode::Patch => "leave it out to keep the current value",
        };
        invalid(field, format!("`{field}` cannot be null: {instead}"))
    }
}

/// An integer member. As in JSON Schema, a number with a zero fraction (`60.0`, `6e1`) is an
/// integer.
fn int(mode: Mode, field: &str, v: &Value) -> Result<i64, ApiError> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                return Ok(i);
            }
            // 2^63 as f64: integral floats below it (and from -2^63) convert exactly.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && (-LIMIT..LIMIT).contains(&f) =>
                {
                    #[allow(
                        clippy::cast_possible_truncation,
                        reason = "integral and within the range of i64: exact"
                    )]
                    Ok(f as i64)
                }
                Some(f) if f.fract() != 0.0 => Err(invalid(
                    field,
                    format!("`{field}` must be a whole number, got {n}"),
                )),
                _ => Err(invalid(
                    field,
                    format!("`{field}` is far out of range, got {n}"),
                )),
            }
        }
        Value::Null => Err(mode.null(field)),
        other => Err(invalid(
            field,
            format!("`{field}` must be an integer, got {}", kind(other)),
        )),
    }
}

/// Refuses members that are not in `accepted`: the appliance's own as `read_only_field`,
/// the others as `unknown_field`; `prefix` is the dotted path of the object.
fn check_members(
    obj: &Map<String, Value>,
    prefix: &str,
    accepted: &[&str],
    read_only: &[&str],
) -> Result<(), ApiError> {
    for k in obj.keys() {
        if accepted.contains(&k.as_str()) {
            continue;
        }
        let path = format!("{prefix}{k}");
        if read_only.contains(&k.as_str()) {
            let why = if path == "name" {
                "a policy's name cannot be changed: create a policy with the new name instead"
            } else {
                "it is set by the appliance"
            };
            return Err(ApiError::bad_field(
                "read_only_field",
                path.clone(),
                format!("`{path}` cannot be set: {why}"),
            ));
        }
        return Err(unknown_field(&path, accepted));
    }
    Ok(())
}

/// `resync_window` of a body: an object with `from`, `to` and optionally `days`, or `null`
/// (none).
fn resync_window(v: &Value) -> Result<Option<ResyncWindowPatch>, ApiError> {
    const F: &str = "resync_window";
    let w = match v {
        Value::Null => return Ok(None),
        Value::Object(w) => w,
        other => {
            return Err(invalid(
                F,
                format!(
                    "`{F}` must be an object such as {{\"from\": \"22:00\", \"to\": \"06:00\"}}, \
                     or null for none, got {}",
                    kind(other)
                ),
            ));
        }
    };
    check_members(w, "resync_window.", RESYNC_WINDOW, &[])?;
    let time = |m: &str| {
        let field = format!("{F}.{m}");
        match w.get(m) {
            Some(Value::String(t)) => Ok(t.clone()),
            None | Some(Value::Null) => Err(invalid(
                &field,
                format!("`{field}` is required: a time of day HH:MM"),
            )),
            Some(other) => Err(invalid(
                &field,
                format!("`{field}` must be a string (HH:MM), got {}", kind(other)),
            )),
        }
    };
    let (from, to) = (time("from")?, time("to")?);
    let days = match w.get("days") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Value::String(d) => Ok(d.clone()),
                    other => {
                        let field = format!("{F}.days[{i}]");
                        Err(invalid(
                            &field,
                            format!("`{field}` must be a day name, got {}", kind(other)),
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(other) => {
            let field = format!("{F}.days");
            return Err(invalid(
                &field,
                format!(
                    "`{field}` must be an array of day names (leave it out for every day), got {}",
                    kind(other)
                ),
            ));
        }
    };
    Ok(Some(ResyncWindowPatch { from, to, days }))
}

/// The settings members of a create or patch body.
fn patch_from(mode: Mode, obj: &Map<String, Value>) -> Result<PolicyPatch, ApiError> {
    let mut p = PolicyPatch::default();
    for (k, v) in obj {
        let f = k.as_str();
        match f {
            "description" => {
                p.description = Some(match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => {
                        return Err(invalid(
                            f,
                            format!("`{f}` must be a string or null, got {}", kind(other)),
                        ));
                    }
                });
            }
            "rpo_threshold_minutes" => p.rpo_threshold_minutes = Some(int(mode, f, v)?),
            "cycle_interval_seconds" => p.cycle_interval_seconds = Some(int(mode, f, v)?),
            "app_consistent_frequency_minutes" => {
                p.app_consistent_frequency_minutes = Some(int(mode, f, v)?);
            }
            "chunk_size" => p.chunk_size = Some(int(mode, f, v)?),
            "compression_level" => p.compression_level = Some(int(mode, f, v)?),
            "resync_threshold_percent" => p.resync_threshold_percent = Some(int(mode, f, v)?),
            "resync_window" => p.resync_window = Some(resync_window(v)?),
            "retry_schedule_seconds" => {
                let Value::Array(a) = v else {
                    return Err(match v {
                        Value::Null => mode.null(f),
                        other => invalid(
                            f,
                            format!("`{f}` must be an array of integers, got {}", kind(other)),
                        ),
                    });
                };
                let delays = a
                    .iter()
                    .enumerate()
                    .map(|(i, d)| int(mode, &format!("{f}[{i}]"), d))
                    .collect::<Result<Vec<_>, _>>()?;
                p.retry_schedule_seconds = Some(delays);
            }
            "retention" => {
                let Value::Object(r) = v else {
                    return Err(match v {
                        Value::Null => mode.null(f),
                        other => {
                            invalid(f, format!("`{f}` must be an object, got {}", kind(other)))
                        }
                    });
                };
                check_members(r, "retention.", RETENTION, &["max_age_hours"])?;
                let get = |m: &str| {
                    r.get(m)
                        .map(|x| int(mode, &format!("retention.{m}"), x))
                        .transpose()
                };
                p.retention = RetentionPatch {
                    keep_all_hours: get("keep_all_hours")?,
                    hourly_days: get("hourly_days")?,
                    every_hours: get("every_hours")?,
                    for_days: get("for_days")?,
                };
            }
            // `check_members` let nothing else through.
            _ => {}
        }
    }
    Ok(p)
}

fn object(body: Value) -> Result<Map<String, Value>, ApiError> {
    match body {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(
            "invalid_request",
            format!("the body must be a JSON object, got {}", kind(&other)),
        )),
    }
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<PolicyJson>>, ApiError> {
    let page = q.validate()?;
    let p = s
        .catalog(move |c| c.policies_page(page.after.as_deref(), page.limit))
        .await?;
    Ok(Json(PageJson {
        items: p.items.into_iter().map(PolicyJson::from).collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

pub(super) async fn create(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, [(HeaderName, HeaderValue); 2], Json<PolicyJson>), ApiError> {
    let mut obj = object(body)?;
    let mut accepted = vec!["name"];
    accepted.extend_from_slice(SETTINGS);
    check_members(&obj, "", &accepted, READ_ONLY)?;
    let name = match obj.remove("name") {
        Some(Value::String(n)) => n,
        Some(Value::Null) | None => {
            return Err(invalid("name", "`name` is required".into()));
        }
        Some(other) => {
            return Err(invalid(
                "name",
                format!("`name` must be a string, got {}", kind(&other)),
            ));
        }
    };
    policy::check_name(&name)?;
    let settings = patch_from(Mode::Create, &obj)?.apply(&PolicySettings::default())?;
    let now = ferry_store::point::now_ms();
    let p = s
        .catalog(move |c| c.create_policy(&name, &settings, now))
        .await?;
    eprintln!("ferryd: {p} created by token {}", by.0);
    let location = HeaderValue::from_str(&format!("/api/v1/policies/{}", p.name))
        .expect("policy names are valid in a header");
    Ok((
        StatusCode::CREATED,
        [
            (header::ETAG, etag(p.revision)),
            (header::LOCATION, location),
        ],
        Json(p.into()),
    ))
}

pub(super) async fn get_one(
    State(s): State<ApiState>,
    ApiPath(name): ApiPath<String>,
) -> Result<([(HeaderName, HeaderValue); 1], Json<PolicyJson>), ApiError> {
    let name = path_name(name)?;
    let n = name.clone();
    let p = s
        .catalog(move |c| c.policy(&n))
        .await?
        .ok_or_else(|| no_policy(&name))?;
    Ok(one(p))
}

pub(super) async fn update(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<([(HeaderName, HeaderValue); 1], Json<PolicyJson>), ApiError> {
    let name = path_name(name)?;
    let expect = if_match(&headers)?;
    let obj = object(body)?;
    let mut read_only = vec!["name"];
    read_only.extend_from_slice(READ_ONLY);
    check_members(&obj, "", SETTINGS, &read_only)?;
    let patch = patch_from(Mode::Patch, &obj)?;
    let now = ferry_store::point::now_ms();
    let p = s
        .catalog(move |c| c.update_policy(&name, expect.as_deref(), &patch, now))
        .await?;
    eprintln!("ferryd: {p} updated by token {}", by.0);
    Ok(one(p))
}

pub(super) async fn delete(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Json<PolicyJson>, ApiError> {
    let name = path_name(name)?;
    let expect = if_match(&headers)?;
    let p = s
        .catalog(move |c| c.delete_policy(&name, expect.as_deref()))
        .await?;
    eprintln!("ferryd: {p} deleted by token {}", by.0);
    Ok(Json(p.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append(header::IF_MATCH, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn if_match_parses() {
        assert_eq!(if_match(&h(&[])).unwrap(), None);
        assert_eq!(if_match(&h(&["*"])).unwrap(), None);
        assert_eq!(if_match(&h(&["\"7\""])).unwrap(), Some(vec![7]));
        assert_eq!(
            if_match(&h(&["\"7\", \"9\"", "\"12\""])).unwrap(),
            Some(vec![7, 9, 12])
        );
        // Tags that are not revisions, weak tags, non-canonical numbers: never match.
        for never in ["W/\"7\"", "\"abc\"", "\"+7\"", "\"07\"", "\"\""] {
            assert_eq!(if_match(&h(&[never])).unwrap(), Some(vec![]), "{never}");
        }
        for bad in ["7", "\"7", "W/7", "\"a\"b\"", "", " , "] {
            assert_eq!(
                if_match(&h(&[bad])).unwrap_err().code,
                "invalid_header",
                "{bad}"
            );
        }
    }

    #[test]
    fn bodies_name_their_members() {
        let obj = |v: Value| object(v).unwrap();
        let e = check_members(&obj(serde_json::json!({"rpo": 5})), "", SETTINGS, READ_ONLY)
            .unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("unknown_field", Some("rpo")));
        let e = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({"retention": {"hourly": 5}})),
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("retention.hourly"))
        );
        let e = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({"retention": {"max_age_hours": 5}})),
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("read_only_field", Some("retention.max_age_hours"))
        );
        for (body, field, needle) in [
            (
                serde_json::json!({"chunk_size": "1M"}),
                "chunk_size",
                "a string",
            ),
            (
                serde_json::json!({"chunk_size": 1.5}),
                "chunk_size",
                "whole number",
            ),
            (
                serde_json::json!({"chunk_size": 1e30}),
                "chunk_size",
                "far out of range",
            ),
            (
                serde_json::json!({"chunk_size": -1e19}),
                "chunk_size",
                "far out of range",
            ),
            (
                serde_json::json!({"chunk_size": u64::MAX}),
                "chunk_size",
                "far out of range",
            ),
            (
                serde_json::json!({"chunk_size": null}),
                "chunk_size",
                "keep the current",
            ),
            (
                serde_json::json!({"retention": 5}),
                "retention",
                "an object",
            ),
            (
                serde_json::json!({"retention": {"for_days": true}}),
                "retention.for_days",
                "a boolean",
            ),
            (
                serde_json::json!({"retry_schedule_seconds": [60, "x"]}),
                "retry_schedule_seconds[1]",
                "a string",
            ),
            (
                serde_json::json!({"retry_schedule_seconds": 60}),
                "retry_schedule_seconds",
                "an array",
            ),
            (
                serde_json::json!({"description": 5}),
                "description",
                "a string or null",
            ),
            (
                serde_json::json!({"resync_window": "22:00-06:00"}),
                "resync_window",
                "an object",
            ),
            (
                serde_json::json!({"resync_window": {"to": "06:00"}}),
                "resync_window.from",
                "is required",
            ),
            (
                serde_json::json!({"resync_window": {"from": "22:00", "to": 6}}),
                "resync_window.to",
                "a number",
            ),
            (
                serde_json::json!({"resync_window": {"from": "22:00", "to": "06:00", "days": "fri"}}),
                "resync_window.days",
                "an array",
            ),
            (
                serde_json::json!({"resync_window": {"from": "22:00", "to": "06:00", "days": ["fri", 5]}}),
                "resync_window.days[1]",
                "a number",
            ),
        ] {
            let e = patch_from(Mode::Patch, &obj(body.clone())).unwrap_err();
            assert_eq!(
                (e.code, e.field.as_deref()),
                ("invalid_value", Some(field)),
                "{body}"
            );
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let p = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({
                "description": null,
                "retention": {"for_days": -1},
                "retry_schedule_seconds": [1, 2]
            })),
        )
        .unwrap();
        assert_eq!(p.description, Some(None));
        assert_eq!(p.retention.for_days, Some(-1));
        assert_eq!(p.retention.hourly_days, None);
        assert_eq!(p.retry_schedule_seconds, Some(vec![1, 2]));
        // Integral numbers written as floats are integers (as in JSON Schema).
        let p = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({"chunk_size": 65536.0, "compression_level": -3.0})),
        )
        .unwrap();
        assert_eq!((p.chunk_size, p.compression_level), (Some(65536), Some(-3)));
        assert_eq!(
            object(serde_json::json!([1])).unwrap_err().code,
            "invalid_request"
        );
        // The resync window: set whole (days optional), removed with null, no other members.
        let p = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({"resync_window": {"from": "22:00", "to": "06:00"}})),
        )
        .unwrap();
        assert_eq!(
            p.resync_window,
            Some(Some(ResyncWindowPatch {
                from: "22:00".into(),
                to: "06:00".into(),
                days: None
            }))
        );
        let p = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({"resync_window": null})),
        )
        .unwrap();
        assert_eq!(p.resync_window, Some(None));
        let e = patch_from(
            Mode::Patch,
            &obj(serde_json::json!({"resync_window": {"from": "1:00", "to": "2:00", "at": 1}})),
        )
        .unwrap_err();
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("resync_window.at"))
        );
    }
}
