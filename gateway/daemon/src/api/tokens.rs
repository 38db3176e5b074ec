//! `POST/GET /api/v1/tokens` and `DELETE /api/v1/tokens/{id}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiPath, ApiQuery, PageQuery, encode_cursor};
use super::{AdminId, ApiError, ApiState, PageJson, time};
use crate::catalog::AdminToken;

/// Longest token id looked up.
const MAX_ID_LEN: usize = 128;

#[derive(Debug, Serialize)]
pub(super) struct TokenJson {
    id: String,
    name: String,
    created: String,
    revoked: Option<String>,
    active: bool,
}

impl From<AdminToken> for TokenJson {
    fn from(t: AdminToken) -> Self {
        Self {
            active: t.is_active(),
            id: t.id,
            name: t.name,
            created: time(t.created_ms),
            revoked: t.revoked_ms.map(time),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    name: String,
}

#[derive(Debug, Serialize)]
pub(super) struct CreatedToken {
    #[serde(flatten)]
    token: TokenJson,
    /// The secret, shown only in this response.
    secret: String,
}

pub(super) async fn create(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiJson(req): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    crate::auth::check_name(&req.name).map_err(|m| ApiError::bad_request("invalid_request", m))?;
    let (tok, secret) = s.with_tokens(move |t| t.create(&req.name)).await?;
    eprintln!("ferryd: admin token {} created by token {}", tok.id, by.0);
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: tok.into(),
            secret: secret.expose().to_string(),
        }),
    ))
}

pub(super) async fn list(
    State(s): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<PageJson<TokenJson>>, ApiError> {
    let page = q.validate()?;
    let p = s
        .catalog(move |c| c.tokens_page(page.after.as_deref(), page.limit))
        .await?;
    Ok(Json(PageJson {
        items: p.items.into_iter().map(TokenJson::from).collect(),
        next_cursor: p.next_after.as_deref().map(encode_cursor),
    }))
}

pub(super) async fn revoke(
    State(s): State<ApiState>,
    Extension(by): Extension<AdminId>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TokenJson>, ApiError> {
    if id.len() > MAX_ID_LEN {
        return Err(ApiError::not_found(
            "token_not_found",
            "no admin token with that id",
        ));
    }
    let tok = s.with_tokens(move |t| t.revoke(&id)).await?;
    eprintln!("ferryd: admin token {} revoked by token {}", tok.id, by.0);
    Ok(Json(tok.into()))
}
