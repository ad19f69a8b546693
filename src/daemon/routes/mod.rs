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
    /// How long an upload may send nothing.
    pub idle: std::time::Duration,
    /// How long a JSON body may take to arrive in full.
    pub body_timeout: std::time::Duration,
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

/// A JSON request body, read in full within `--body-timeout-seconds` and
/// `--max-json-bytes`: a client that sends its headers and then trickles (or never sends)
/// the body is answered 408, and its connection (and slot) let go, instead of holding
/// them for as long as it likes.
pub(super) struct JsonBody(Bytes);

impl axum::extract::FromRequest<Arc<App>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, app: &Arc<App>) -> ApiResult<JsonBody> {
        use futures_util::StreamExt;
        let limit = app.limits.max_json_bytes;
        let too_large = |size: String| {
            ApiError::too_large(format!(
                "request body is {size} bytes; the limit is {limit} (--max-json-bytes)"
            ))
        };
        let declared = request
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(declared) = declared.filter(|n| *n > limit as u64) {
            return Err(too_large(declared.to_string()));
        }
        let read = async {
            let mut body = request.into_body().into_data_stream();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|e| ApiError::bad_request("body", format!("reading the request body: {e}")))?;
                if bytes.len() + chunk.len() > limit {
                    return Err(too_large(format!("more than {limit}")));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(Bytes::from(bytes))
        };
        let timeout = app.limits.body_timeout;
        match tokio::time::timeout(timeout, read).await {
            Ok(body) => body.map(JsonBody),
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                Some("body".into()),
                format!(
                    "the request body did not arrive in full within {} s (--body-timeout-seconds); \
                     send the whole body right after the headers",
                    timeout.as_secs()
                ),
            )),
        }
    }
}

impl App {
    /// Parses a JSON body, with errors in the API's shape.
    fn parse_json<T: serde::de::DeserializeOwned>(&self, JsonBody(body): &JsonBody) -> ApiResult<T> {
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
