//! The controller's error: what an operation on the objects can fail with. It knows nothing
//! of HTTP; the HTTP layer (`server::error`) alone maps each variant to a status code.

use manifests::Diagnostic;

use crate::store::{StoreError, TxnError};

/// Everything an operation on the objects can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The caller holds as much as it may (open watches): try again later.
    #[error("{message}")]
    TooManyRequests {
        /// What is full.
        message: String,
        /// What to do.
        hint: String,
        /// When to try again, seconds (the `Retry-After` header).
        retry_after_seconds: u64,
    },
    /// The server will not take this now (too many connections without a token): try
    /// again later.
    #[error("{message}")]
    Unavailable {
        /// What is full.
        message: String,
        /// What to do.
        hint: String,
        /// When to try again, seconds (the `Retry-After` header).
        retry_after_seconds: u64,
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

impl Error {
    /// A 400 with a hint.
    pub fn bad_request(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::BadRequest {
            message: message.into(),
            field: None,
            hint: Some(hint.into()),
            details: vec![],
        }
    }

    /// A 422 about one field.
    pub fn invalid_field(field: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Invalid {
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
            Error::BadRequest {
                message,
                field,
                hint,
                details: diagnostics,
            }
        } else {
            Error::Invalid {
                message,
                field,
                hint,
                details: diagnostics,
            }
        }
    }
}

impl From<TxnError<Error>> for Error {
    fn from(err: TxnError<Error>) -> Self {
        match err {
            TxnError::Aborted(e) => e,
            TxnError::Store(e) => Error::Store(e),
        }
    }
}

impl From<TxnError<StoreError>> for Error {
    fn from(err: TxnError<StoreError>) -> Self {
        match err {
            TxnError::Aborted(e) | TxnError::Store(e) => Error::Store(e),
        }
    }
}
