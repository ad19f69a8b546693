//! The HTTP API: routes, request and response shapes, and errors.
//!
//! Errors are always `{"error": {"kind", "field", "message"}}` with a status that fits:
//! 400 bad input, 403 peer not allowed, 404, 409, 413 too large, 503 busy, 500 internal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::{Daemon, now};
use super::workers;
use crate::build::BuiltEnv;
use crate::digest::{EnvId, PackageDigest};

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

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::Error;
        use crate::sources::SourceError;
        let message = e.to_string();
        match &e {
            Error::Spec(spec) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_spec",
                Some(spec.field.clone()).filter(|f| !f.is_empty()),
                spec.message.clone(),
            ),
            Error::Source(SourceError::NotFound(_)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                Some("working_dir".into()),
                message,
            ),
            Error::Source(SourceError::Archive { .. }) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_archive",
                Some("working_dir".into()),
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"kind": self.kind, "field": self.field, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;
type AppState = State<Arc<Daemon>>;

pub fn router(daemon: Arc<Daemon>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .route("/metrics", get(metrics))
        .route("/v1/envs", post(create_env).get(list_envs))
        .route("/v1/envs/{env_id}", axum::routing::delete(release_env))
        .route(
            "/v1/packages/{digest}",
            axum::routing::head(has_package).put(put_package),
        )
        .route("/v1/workers", post(workers::start).get(workers::list))
        .route("/v1/workers/{id}", get(workers::inspect).delete(workers::stop))
        .route("/v1/workers/{id}/logs", get(workers::logs))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .with_state(daemon)
}

/// Parses a JSON body, with errors in the API's shape.
pub fn parse_json<T: serde::de::DeserializeOwned>(daemon: &Daemon, body: &Bytes) -> ApiResult<T> {
    if body.len() > daemon.max_json_bytes {
        return Err(ApiError::too_large(format!(
            "request body is {} bytes; the limit is {}",
            body.len(),
            daemon.max_json_bytes
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

pub fn env_json(built: &BuiltEnv, created: bool) -> Value {
    let (working_dir_bytes, venv_bytes) = built.bytes();
    json!({
        "env_id": built.env_id.to_string(),
        "python": built.context.python,
        "cwd": built.context.cwd,
        "env": built.context.env,
        "working_dir": built.working_dir_path(),
        "venv": built.venv.as_ref().map(|e| e.path.clone()),
        "bytes": working_dir_bytes + venv_bytes,
        "created": created,
        "timings_ms": built.timings_ms,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEnv {
    /// Kept as sent: its exact text is the key of the in-memory fast path.
    runtime_env: Box<serde_json::value::RawValue>,
    #[serde(rename = "ref")]
    tag: Option<String>,
}

async fn create_env(State(daemon): AppState, body: Bytes) -> ApiResult<Response> {
    daemon.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let request: CreateEnv = parse_json(&daemon, &body)?;
    let (built, created) = daemon.get_or_create(&request.runtime_env).await?;
    let cached = daemon.hold(built.env_id, request.tag, false)?;
    // The common answer (an existing env) is serialized once per env, not per request.
    let body = if created {
        Bytes::from(env_json(&built, true).to_string())
    } else {
        cached
    };
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn release_env(State(daemon): AppState, Path(env_id): Path<String>) -> ApiResult<Json<Value>> {
    let env_id: EnvId = env_id
        .parse()
        .map_err(|_| ApiError::bad_request("env_id", "expected 64 lowercase hex digits"))?;
    daemon.release(env_id, false)?;
    let refs = daemon.envs.lock().unwrap().get(&env_id).map_or(0, |r| r.refs);
    Ok(Json(json!({"env_id": env_id.to_string(), "refs": refs})))
}

async fn list_envs(State(daemon): AppState) -> Json<Value> {
    let envs = daemon.envs.lock().unwrap();
    let mut list: Vec<Value> = envs
        .values()
        .map(|r| {
            let (working_dir_bytes, venv_bytes) = r.built.bytes();
            json!({
                "env_id": r.built.env_id.to_string(),
                "refs": r.refs,
                "ref_tags": r.ref_tags,
                "workers": r.workers,
                "working_dir": r.built.working_dir_path(),
                "python": r.built.context.python,
                "bytes": working_dir_bytes + venv_bytes,
                "working_dir_bytes": working_dir_bytes,
                "venv_bytes": venv_bytes,
                "last_used": r.last_used,
            })
        })
        .collect();
    list.sort_by(|a, b| a["env_id"].as_str().cmp(&b["env_id"].as_str()));
    Json(json!({"envs": list}))
}

fn parse_digest(digest: &str) -> ApiResult<PackageDigest> {
    digest.parse().map_err(|_| {
        ApiError::bad_request(
            "digest",
            format!("expected 64 lowercase hex digits, got {digest:?}"),
        )
    })
}

async fn has_package(State(daemon): AppState, Path(digest): Path<String>) -> ApiResult<StatusCode> {
    let digest = parse_digest(&digest)?;
    match daemon.store.find(digest) {
        Ok(Some(_)) => Ok(StatusCode::OK),
        Ok(None) => Ok(StatusCode::NOT_FOUND),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

/// Streams the zip into a staging dir (capped), then unpacks and publishes it only if it
/// is the package the URL names.
async fn put_package(
    State(daemon): AppState,
    Path(digest): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let digest = parse_digest(&digest)?;
    if let Ok(Some(entry)) = daemon.store.find(digest) {
        return Ok(Json(
            json!({"digest": digest.to_string(), "created": false, "files": entry.files}),
        ));
    }
    let cap = daemon.store.options().unpack_limits.max_bytes;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > cap) {
        return Err(ApiError::too_large(format!(
            "package upload exceeds the limit of {cap} bytes"
        )));
    }
    let staging = daemon
        .store
        .stage()
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let zip_path = crate::sources::upload::zip_path(&staging);
    let mut file = tokio::fs::File::create(&zip_path)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request("body", format!("reading the upload: {e}")))?;
        received += chunk.len() as u64;
        if received > cap {
            return Err(ApiError::too_large(format!(
                "package upload exceeds the limit of {cap} bytes"
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    file.flush()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    drop(file);
    let store = Arc::clone(&daemon.store);
    let entry = tokio::task::spawn_blocking(move || crate::sources::upload::commit(&store, staging, digest))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| match e {
            crate::sources::SourceError::DigestMismatch { .. } => {
                ApiError::bad_request("digest", e.to_string())
            }
            crate::sources::SourceError::Archive { source, .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_archive", None, source.to_string())
            }
            other => ApiError::from(crate::Error::from(other)),
        })?;
    Ok(Json(
        json!({"digest": digest.to_string(), "created": entry.created, "files": entry.files}),
    ))
}

async fn metrics(State(daemon): AppState) -> impl IntoResponse {
    let m = &daemon.metrics;
    let (refs, envs) = {
        let envs = daemon.envs.lock().unwrap();
        (envs.values().map(|r| r.refs).sum::<u64>(), envs.len())
    };
    let live = daemon
        .workers
        .lock()
        .unwrap()
        .values()
        .filter(|w| w.state == super::state::WorkerState::Running)
        .count();
    let store_bytes = package_bytes(&daemon.store);
    let gauges: BTreeMap<&str, f64> = BTreeMap::from([
        ("renv_builds_total", m.builds.load(Ordering::Relaxed) as f64),
        (
            "renv_build_failures_total",
            m.build_failures.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_build_seconds_total",
            m.build_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        ),
        (
            "renv_cache_hits_total",
            m.cache_hits.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_env_requests_total",
            m.requests.load(Ordering::Relaxed) as f64,
        ),
        ("renv_env_references", refs as f64),
        ("renv_envs_known", envs as f64),
        (
            "renv_workers_started_total",
            m.workers_started.load(Ordering::Relaxed) as f64,
        ),
        ("renv_workers_live", live as f64),
        ("renv_store_package_bytes", store_bytes as f64),
        ("renv_uptime_seconds", now() - daemon.started_at),
    ]);
    let mut text = String::new();
    for (name, value) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        text.push_str(&format!("# TYPE {name} {kind}\n{name} {value}\n"));
    }
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
}

/// Bytes of committed packages, from their markers.
fn package_bytes(store: &crate::store::Store) -> u64 {
    store.bytes_of(crate::store::EntryKind::Package)
}
