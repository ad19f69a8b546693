//! The HTTP API: routes, request and response shapes. Each handler parses its request,
//! calls the state layer ([`super::state`], [`super::workers`], [`super::packages`]) and
//! shapes the JSON answer; errors come back as [`ApiError`] (see [`super::error`]).
//!
//! - `envs`: `POST`/`GET /v1/envs`, `DELETE /v1/envs/{env_id}`, and the cached
//!   get-or-create answers.
//! - `packages`: `HEAD`/`PUT /v1/packages/{digest}`.
//! - `workers`: `/v1/workers`, `/v1/workers/{id}`, `/v1/workers/{id}/logs`.
//! - `metrics`: `/metrics` (Prometheus text); `/healthz` is here.

mod envs;
mod metrics;
mod packages;
mod workers;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::json;

use super::error::ApiError;
use super::state::Daemon;
use super::workers::Workers;

type ApiResult<T> = Result<T, ApiError>;

/// Longest `ref` tag or worker `name`: labels are kept in memory for as long as what
/// they label, so they are bounded.
const MAX_LABEL_BYTES: usize = 256;

/// A label (a reference's tag, a worker's name) within [`MAX_LABEL_BYTES`].
fn check_label(field: &'static str, label: Option<&str>) -> ApiResult<()> {
    match label {
        Some(label) if label.len() > MAX_LABEL_BYTES => Err(ApiError::bad_request(
            field,
            format!("at most {MAX_LABEL_BYTES} bytes, got {}", label.len()),
        )),
        _ => Ok(()),
    }
}
type AppState = State<Arc<App>>;

/// What the handlers share: the daemon's state, and what belongs to HTTP alone.
struct App {
    daemon: Arc<Daemon>,
    workers: Arc<Workers>,
    /// Pre-serialized `POST /v1/envs` answers for existing envs.
    answers: envs::Answers,
    limits: Limits,
}

/// What one request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest JSON request body.
    pub max_json_bytes: usize,
    /// How long a request body may send nothing.
    pub idle: std::time::Duration,
}

pub fn router(daemon: Arc<Daemon>, workers: Arc<Workers>, limits: Limits) -> axum::Router {
    let app = Arc::new(App {
        daemon,
        workers,
        answers: envs::Answers::default(),
        limits,
    });
    axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/envs", post(envs::create).get(envs::list))
        .route("/v1/envs/{env_id}", axum::routing::delete(envs::release))
        .route(
            "/v1/packages/{digest}",
            axum::routing::head(packages::has).put(packages::put),
        )
        .route("/v1/workers", post(workers::start).get(workers::list))
        .route("/v1/workers/{id}", get(workers::inspect).delete(workers::stop))
        .route("/v1/workers/{id}/logs", get(workers::logs))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(app)
}

impl App {
    /// Parses a JSON body, with errors in the API's shape.
    fn parse_json<T: serde::de::DeserializeOwned>(&self, body: &Bytes) -> ApiResult<T> {
        if body.len() > self.limits.max_json_bytes {
            return Err(ApiError::too_large(format!(
                "request body is {} bytes; the limit is {}",
                body.len(),
                self.limits.max_json_bytes
            )));
        }
        serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                None,
                format!("invalid JSON body: {e}"),
            )
        })
    }
}
