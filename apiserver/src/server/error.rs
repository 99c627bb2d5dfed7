//! API errors and the one place that maps them to HTTP status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use manifests::wire::ApiErrorBody;
use manifests::Diagnostic;

use crate::store::{StoreError, TxnError};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request could not be read (malformed YAML or JSON, bad query).
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The field at fault.
        field: Option<String>,
        /// What to do.
        hint: Option<String>,
        /// Every problem, when manifests were involved.
        details: Vec<Diagnostic>,
    },
    /// The request was readable but its content is invalid.
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
        /// The field at fault.
        field: Option<String>,
        /// What to do.
        hint: Option<String>,
        /// Every problem.
        details: Vec<Diagnostic>,
    },
    /// No credentials, or unknown ones.
    #[error("{0}")]
    Unauthorized(String),
    /// Known credentials without the right.
    #[error("{0}")]
    Forbidden(String),
    /// No such object.
    #[error("{kind} `{name}` not found")]
    NotFound {
        /// The kind.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A stale resourceVersion or a state that forbids the change.
    #[error("{message}")]
    Conflict {
        /// What is wrong.
        message: String,
        /// What to do.
        hint: String,
    },
    /// The body is over the limit.
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    /// A 400 with a hint.
    pub fn bad_request(message: impl Into<String>, hint: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            field: None,
            hint: Some(hint.into()),
            details: vec![],
        }
    }

    /// A 422 about one field.
    pub fn invalid_field(field: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        ApiError::Invalid {
            message: message.into(),
            field: Some(field.to_string()),
            hint: Some(hint.into()),
            details: vec![],
        }
    }

    /// Manifest problems: 400 when the text could not be read at all, 422 when it is invalid.
    pub fn from_diagnostics(diagnostics: Vec<Diagnostic>) -> Self {
        let first = diagnostics.first().cloned();
        let message = match (&first, diagnostics.len()) {
            (Some(d), 1) => d.to_string(),
            (Some(d), n) => format!("{d} (and {} more problems)", n - 1),
            (None, _) => "invalid input".to_string(),
        };
        let field = first
            .as_ref()
            .filter(|d| !d.field.is_empty())
            .map(|d| d.field.clone());
        let hint = first.and_then(|d| d.hint);
        if diagnostics.iter().any(Diagnostic::is_syntax) {
            ApiError::BadRequest {
                message,
                field,
                hint,
                details: diagnostics,
            }
        } else {
            ApiError::Invalid {
                message,
                field,
                hint,
                details: diagnostics,
            }
        }
    }

    /// The HTTP status. Exhaustive on purpose: a new error must choose its code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> ApiErrorBody {
        let (field, hint, details) = match self {
            ApiError::BadRequest { field, hint, details, .. } | ApiError::Invalid { field, hint, details, .. } => {
                (field.clone(), hint.clone(), details.clone())
            }
            ApiError::Unauthorized(_) => (
                None,
                Some("send `Authorization: Bearer <token>` with a token from the apiserver's tokens file (shoal --token or SHOAL_TOKEN)".into()),
                vec![],
            ),
            ApiError::Forbidden(_) => (None, Some("use a token whose role allows this (viewer reads, operator writes)".into()), vec![]),
            ApiError::NotFound { kind, .. } => (None, Some(format!("list what exists with `shoal get {}s`", kind.to_ascii_lowercase())), vec![]),
            ApiError::Conflict { hint, .. } => (Some("metadata.resourceVersion".into()), Some(hint.clone()), vec![]),
            ApiError::PayloadTooLarge { .. } => (None, Some("split the input into several applies".into()), vec![]),
            ApiError::Store(_) => (None, Some("see the apiserver's log; the change was not stored".into()), vec![]),
        };
        ApiErrorBody {
            error: self.to_string(),
            field,
            hint,
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Store(err) = &self {
            tracing::error!(error = %err, "store failure");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<TxnError<ApiError>> for ApiError {
    fn from(err: TxnError<ApiError>) -> Self {
        match err {
            TxnError::Aborted(e) => e,
            TxnError::Store(e) => ApiError::Store(e),
        }
    }
}

impl From<TxnError<StoreError>> for ApiError {
    fn from(err: TxnError<StoreError>) -> Self {
        match err {
            TxnError::Aborted(e) | TxnError::Store(e) => ApiError::Store(e),
        }
    }
}
