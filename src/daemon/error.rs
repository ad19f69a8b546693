//! The HTTP API's error: a status, a kind, the request field at fault and a message.
//!
//! Errors are always `{"error": {"kind", "field", "message"}}` with a status that fits:
//! 400 bad input, 403 peer not allowed, 404, 408 a body too slow to arrive, 409, 413 too
//! large, 429 too many connections of one uid, 503 busy (no free GPUs, no free connection,
//! a store lock another process held too long), 502 remote storage failing, 500 internal.
//!
//! This is the top of the error stack, not the bottom: the state layer ([`super::state`],
//! [`super::workers`], [`super::packages`]) returns its own [`StateError`], which says
//! what went wrong (not found, conflict, busy, bad input naming its field, or renv's own
//! [`crate::Error`]) and nothing about HTTP. Only here does that become a status code and
//! a response. Two reasons for the split rather than one shared type: state code would
//! otherwise carry axum's types and choose status codes, which is the routes' business;
//! and a build's result is shared by every request waiting on it, so it must be
//! cloneable, which `Arc<crate::Error>` allows while keeping the error itself (not a
//! rendering of it) until a response is made. So this module depends on `state` for
//! [`StateError`], and only the HTTP side ([`super::routes`] and the accept loop) depends
//! on this module.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::state::StateError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        field: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            field,
            message: message.into(),
        }
    }
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some(field.into()),
            message,
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", None, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", None, message)
    }
    pub fn busy(field: &str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            Some(field.into()),
            message,
        )
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", None, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", None, message)
    }
}

/// The lock a request gave up waiting for (another process held it past
/// `--lock-timeout-seconds`), wherever in renv's error it was met.
fn lock_timeout(e: &crate::Error) -> Option<(&std::path::Path, std::time::Duration)> {
    use crate::sources::SourceError;
    use crate::store::StoreError;
    use crate::venv::VenvError;
    fn in_venv(e: &VenvError) -> Option<&StoreError> {
        match e {
            VenvError::Store(store) => Some(store),
            VenvError::Shared(shared) => in_venv(shared),
            _ => None,
        }
    }
    let store = match e {
        crate::Error::Store(store)
        | crate::Error::Source(SourceError::Store(store))
        | crate::Error::SourceOf {
            source: SourceError::Store(store),
            ..
        } => store,
        crate::Error::Venv(venv) => in_venv(venv)?,
        _ => return None,
    };
    match store {
        StoreError::LockTimeout { path, waited } => Some((path, *waited)),
        _ => None,
    }
}

impl From<&crate::Error> for ApiError {
    fn from(e: &crate::Error) -> Self {
        use crate::Error;
        use crate::sources::SourceError;
        let message = e.to_string();
        if let Some((lock, waited)) = lock_timeout(e) {
            // `locks/<entry>.lock`: the entry is the lock file's name.
            let entry = lock.file_stem().map_or_else(
                || lock.display().to_string(),
                |s| s.to_string_lossy().into_owned(),
            );
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                None,
                format!(
                    "the store entry {entry} is locked by another process (a build of it, a prune); \
                     gave up after {} s (the daemon's --lock-timeout-seconds, or the spec's \
                     config.setup_timeout_seconds for an installer's lock) and kept nothing of this \
                     request; retry later",
                    waited.as_secs()
                ),
            );
        }
        match e {
            Error::Spec(spec) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_spec",
                Some(spec.field.clone()).filter(|f| !f.is_empty()),
                spec.message.clone(),
            ),
            Error::SourceOf {
                field,
                source: SourceError::NotFound { .. },
            } => ApiError::new(StatusCode::NOT_FOUND, "not_found", Some(field.clone()), message),
            Error::SourceOf {
                field,
                source: SourceError::Archive { .. },
            } => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_archive",
                Some(field.clone()),
                message,
            ),
            Error::SourceOf {
                field,
                source: SourceError::Remote(remote),
            } => match remote.is_user_error() {
                true => ApiError::new(StatusCode::BAD_REQUEST, "remote", Some(field.clone()), message),
                false => ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "remote_unavailable",
                    Some(field.clone()),
                    message,
                ),
            },
            Error::SourceOf { field, .. } if e.is_user_error() => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                Some(field.clone()),
                message,
            ),
            Error::Venv(v) if e.is_user_error() => {
                let field = match v {
                    crate::venv::VenvError::OptionNotAllowed { field, .. }
                    | crate::venv::VenvError::Unsupported { field, .. } => Some(field.clone()),
                    _ => None,
                };
                ApiError::new(StatusCode::BAD_REQUEST, "install_failed", field, message)
            }
            _ if e.is_user_error() => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", None, message),
            _ => ApiError::internal(message),
        }
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        ApiError::from(&e)
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::BadRequest { field, message } => ApiError::bad_request(field, message),
            StateError::NotFound(message) => ApiError::not_found(message),
            StateError::Conflict(message) => ApiError::conflict(message),
            StateError::Forbidden(message) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", None, message)
            }
            StateError::Busy { field, message } => ApiError::busy(field, message),
            StateError::TooLarge(message) => ApiError::too_large(message),
            StateError::BadArchive(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_archive", None, message)
            }
            StateError::Internal(message) => ApiError::internal(message),
            StateError::TooMany(message) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many", None, message)
            }
            StateError::Upstream(message) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "remote_unavailable", None, message)
            }
            StateError::Build(e) => ApiError::from(&*e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"kind": self.kind, "field": self.field, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}
