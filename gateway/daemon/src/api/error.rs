//! The API's error responses: JSON `{"code": "...", "message": "..."}` with a 4xx or 5xx
//! status. `code` is stable (clients branch on it); `message` is for people and may change.
//! An error about one member of the request body also carries `field`, the member's dotted
//! name (`retention.hourly_days`, `retry_schedule_seconds[2]`).
//!
//! Client errors say what was wrong with the request. Server errors (5xx) say only that the
//! appliance failed and are logged on stderr with the detail; neither ever carries a secret.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::catalog::CatalogError;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The request member the error is about.
    pub field: Option<String>,
    /// `WWW-Authenticate` value for 401s.
    www_authenticate: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            www_authenticate: None,
        }
    }

    /// 400 with `code` about request member `field`.
    pub fn bad_field(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::bad_request(code, message)
        }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 with `code`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 401: no credentials.
    pub fn unauthorized() -> Self {
        Self {
            www_authenticate: Some("Bearer realm=\"ferry\""),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs `Authorization: Bearer <admin token>`",
            )
        }
    }

    /// 401: credentials that are not an active token.
    pub fn invalid_token() -> Self {
        Self {
            www_authenticate: Some("Bearer realm=\"ferry\", error=\"invalid_token\""),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "the bearer token is not an active admin token",
            )
        }
    }

    /// 500, logging `detail` (which the client does not see).
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        eprintln!("ferryd: internal error: {detail}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the appliance failed to handle the request; see its log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(Body {
                code: self.code,
                message: &self.message,
                field: self.field.as_deref(),
            }),
        )
            .into_response();
        if let Some(v) = self.www_authenticate {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
        }
        r
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::TokenNotFound(_) => ApiError::not_found("token_not_found", e.to_string()),
            CatalogError::LastActiveToken(_) => {
                ApiError::new(StatusCode::CONFLICT, "last_active_token", e.to_string())
            }
            CatalogError::TooManyTokens { .. } => {
                ApiError::new(StatusCode::CONFLICT, "too_many_tokens", e.to_string())
            }
            CatalogError::VaultExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "vault_exists", e.to_string())
            }
            CatalogError::PolicyNotFound(_) => {
                ApiError::not_found("policy_not_found", e.to_string())
            }
            CatalogError::PolicyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "policy_exists", e.to_string())
            }
            CatalogError::TooManyPolicies => {
                ApiError::new(StatusCode::CONFLICT, "too_many_policies", e.to_string())
            }
            CatalogError::DefaultPolicy(_) => {
                ApiError::new(StatusCode::CONFLICT, "default_policy", e.to_string())
            }
            CatalogError::PolicyInUse { .. } => {
                ApiError::new(StatusCode::CONFLICT, "policy_in_use", e.to_string())
            }
            CatalogError::RevisionMismatch { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "revision_mismatch",
                e.to_string(),
            ),
            CatalogError::InvalidPolicy(p) => ApiError::from(p),
            CatalogError::ItemNotFound(_) => ApiError::not_found("item_not_found", e.to_string()),
            CatalogError::JobNotFound(_) => ApiError::not_found("job_not_found", e.to_string()),
            CatalogError::ItemExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "item_exists", e.to_string())
            }
            CatalogError::TooManyItems => {
                ApiError::new(StatusCode::CONFLICT, "too_many_items", e.to_string())
            }
            CatalogError::InvalidItem(_) => ApiError::bad_request("invalid_value", e.to_string()),
            CatalogError::MissingReference { what, .. } => {
                ApiError::bad_field("invalid_value", what, e.to_string())
            }
            CatalogError::ItemBusy { .. } => {
                ApiError::new(StatusCode::CONFLICT, "item_busy", e.to_string())
            }
            CatalogError::IllegalTransition { .. } => {
                ApiError::new(StatusCode::CONFLICT, "illegal_transition", e.to_string())
            }
            CatalogError::ItemRevisionMismatch { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "revision_mismatch",
                e.to_string(),
            ),
            CatalogError::JobState { .. } => {
                ApiError::new(StatusCode::CONFLICT, "job_state", e.to_string())
            }
            CatalogError::TooMany { .. } => {
                ApiError::new(StatusCode::CONFLICT, "too_many", e.to_string())
            }
            CatalogError::Invalid(_) => ApiError::bad_request("invalid_value", e.to_string()),
            CatalogError::StaleRevision { .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "revision_mismatch",
                e.to_string(),
            ),
            CatalogError::AgentNotFound(_) => ApiError::not_found("agent_not_found", e.to_string()),
            CatalogError::AgentExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "agent_exists", e.to_string())
            }
            CatalogError::EnrollTokenNotFound(_) => {
                ApiError::not_found("enrollment_token_not_found", e.to_string())
            }
            CatalogError::GroupNotFound(_) => ApiError::not_found("group_not_found", e.to_string()),
            CatalogError::GroupExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "group_exists", e.to_string())
            }
            CatalogError::GroupChanged(_) => {
                ApiError::new(StatusCode::CONFLICT, "group_changed", e.to_string())
            }
            CatalogError::ItemInGroup { .. } => {
                ApiError::new(StatusCode::CONFLICT, "item_in_group", e.to_string())
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<crate::policy::PolicyError> for ApiError {
    fn from(e: crate::policy::PolicyError) -> Self {
        ApiError::bad_field("invalid_value", e.field(), e.to_string())
    }
}

impl From<ferry_store::StoreError> for ApiError {
    fn from(e: ferry_store::StoreError) -> Self {
        use ferry_store::StoreError as S;
        match e {
            S::InvalidName { .. } | S::InvalidArgument(_) => {
                ApiError::bad_request("invalid_request", e.to_string())
            }
            S::Backend { .. } => {
                eprintln!("ferryd: vault backend: {e}");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "vault_backend_error",
                    e.to_string(),
                )
            }
            S::Corrupt { .. } | S::Tampered { .. } | S::MissingObject(_) => {
                eprintln!("ferryd: vault damaged: {e}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "vault_damaged",
                    e.to_string(),
                )
            }
            e => ApiError::internal(e),
        }
    }
}
