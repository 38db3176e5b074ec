//! Request extractors whose every refusal is an [`ApiError`] (axum's own answer with plain
//! text): JSON bodies (content type, size limit, syntax, unknown fields), query strings,
//! path parameters, and pagination.
//!
//! Codes of a refused JSON body: `unsupported_media_type` (415), `payload_too_large` (413),
//! `invalid_json` (400, not JSON), `unknown_field` (400, a member the endpoint does not take,
//! named in `field`), `invalid_request` (400, a member of the wrong type or missing).

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{StatusCode, header, request::Parts};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Visitor};

use super::ApiState;
use super::error::ApiError;

/// Default page size.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest page size.
pub const MAX_LIMIT: usize = 500;
/// Longest cursor accepted (encoded).
const MAX_CURSOR_LEN: usize = 1024;

/// A JSON body of type `T` (which should `deny_unknown_fields`).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

fn payload_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// Whether an error (or one of its sources) is a body-size limit being hit.
pub(crate) fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = x.source();
    }
    false
}

impl<T: DeserializeOwned> FromRequest<ApiState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON with `Content-Type: application/json`",
            ));
        }
        let limit = state.max_body_bytes();
        let body = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                if is_length_limit(&e) {
                    payload_too_large(limit)
                } else {
                    ApiError::bad_request("bad_body", "the request body could not be read")
                }
            })?;
        // Syntax first, then unknown members (named), then the types of the known ones.
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("malformed JSON body: {e}"))
        })?;
        let fields = struct_fields::<T>();
        // serde would also read a struct from an array of its members in order; a body is
        // a JSON object.
        if !fields.is_empty() && !value.is_object() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "the JSON body must be an object",
            ));
        }
        if let Some(obj) = value.as_object()
            && !fields.is_empty()
            && let Some(k) = obj.keys().find(|k| !fields.contains(&k.as_str()))
        {
            return Err(unknown_field(k, fields));
        }
        serde_json::from_slice(&body).map(ApiJson).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("the JSON body does not fit this endpoint: {e}"),
            )
        })
    }
}

/// For a `PATCH` member that may be cleared (with `#[serde(default, deserialize_with)]`):
/// present-but-null becomes `Some(None)` (clear); absent stays `None` (keep).
pub(crate) fn null_clears<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// 400 `unknown_field` for member `name` (a dotted path when nested), listing `accepted`.
pub(crate) fn unknown_field(name: &str, accepted: &[&str]) -> ApiError {
    let shown: String = name.chars().take(100).collect();
    ApiError::bad_field(
        "unknown_field",
        shown.clone(),
        format!(
            "unknown field `{shown}`; this endpoint takes {}",
            accepted
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// The members a derived `Deserialize` struct takes: serde hands them to
/// `deserialize_struct`, which this deserializer records before giving up. Empty for what is
/// not a plain struct (a map, `serde_json::Value`, a struct with flattened members).
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// A query string of type `T` (which should `deny_unknown_fields`).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// Path parameters of type `T`.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| ApiError::bad_request("invalid_path", e.body_text()))
    }
}

/// `?limit=&cursor=` of a listing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Entries per page (1–500, default 100).
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A validated page request: how many, and after which key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Entries wanted.
    pub limit: usize,
    /// Key of the last entry of the previous page.
    pub after: Option<String>,
}

impl PageQuery {
    /// Validates the limit and decodes the cursor.
    pub fn validate(&self) -> Result<PageRequest, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("limit must be 1 to {MAX_LIMIT}"),
            ));
        }
        let after = match &self.cursor {
            None => None,
            Some(c) => Some(decode_cursor(c).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_cursor",
                    "the cursor is not one this appliance returned",
                )
            })?),
        };
        Ok(PageRequest { limit, after })
    }
}

/// Encodes a listing key as an opaque cursor.
pub fn encode_cursor(key: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes())
}

fn decode_cursor(c: &str) -> Option<String> {
    if c.is_empty() || c.len() > MAX_CURSOR_LEN {
        return None;
    }
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    String::from_utf8(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_fields_are_probed() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code, reason = "only probed")]
        struct Two {
            a: u8,
            #[serde(rename = "bee")]
            b: Option<String>,
        }
        assert_eq!(struct_fields::<Two>(), ["a", "bee"]);
        assert!(struct_fields::<serde_json::Value>().is_empty());
        assert!(struct_fields::<std::collections::BTreeMap<String, u8>>().is_empty());
        let e = unknown_field("admin", &["name"]);
        assert_eq!(
            (e.code, e.field.as_deref()),
            ("unknown_field", Some("admin"))
        );
        assert!(e.message.contains("`name`"), "{}", e.message);
    }

    #[test]
    fn pages_validate() {
        let q = PageQuery::default();
        assert_eq!(
            q.validate().unwrap(),
            PageRequest {
                limit: DEFAULT_LIMIT,
                after: None
            }
        );
        for bad in [0, MAX_LIMIT + 1] {
            let q = PageQuery {
                limit: Some(bad),
                cursor: None,
            };
            assert_eq!(q.validate().unwrap_err().code, "invalid_query");
        }
        let q = PageQuery {
            limit: Some(5),
            cursor: Some(encode_cursor("points/a/b")),
        };
        assert_eq!(q.validate().unwrap().after.as_deref(), Some("points/a/b"));
        for bad in ["", "!!!", &"A".repeat(MAX_CURSOR_LEN + 4)] {
            let q = PageQuery {
                limit: None,
                cursor: Some(bad.to_string()),
            };
            assert_eq!(q.validate().unwrap_err().code, "invalid_cursor", "{bad}");
        }
    }
}
