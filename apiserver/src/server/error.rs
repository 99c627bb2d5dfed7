//! The one place that maps the controller's errors to HTTP status codes and bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use manifests::wire::ApiErrorBody;

/// The HTTP layer's name for the controller's error.
pub use super::controller::Error as ApiError;

impl ApiError {
    /// The HTTP status. Exhaustive on purpose: a new error must choose its code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
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
            ApiError::TooManyRequests { hint, .. } | ApiError::Unavailable { hint, .. } => {
                (None, Some(hint.clone()), vec![])
            }
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
        let mut response = (self.status(), Json(self.body())).into_response();
        if let ApiError::TooManyRequests {
            retry_after_seconds,
            ..
        }
        | ApiError::Unavailable {
            retry_after_seconds,
            ..
        } = &self
        {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(*retry_after_seconds),
            );
        }
        response
    }
}
