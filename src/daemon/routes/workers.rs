//! `/v1/workers`: start (in an env given by spec or id), list, inspect (optionally waiting
//! for the exit), stop, and the logs (optionally followed until the worker has exited).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiResult, AppState};
use crate::daemon::error::ApiError;
use crate::daemon::peer::Caller;
use crate::daemon::workers::{GpuRequest, WorkerInfo};
use crate::digest::EnvId;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StartWorker {
    runtime_env: Option<Box<serde_json::value::RawValue>>,
    env_id: Option<String>,
    argv: Vec<String>,
    gpus: Option<Vec<u32>>,
    num_gpus: Option<usize>,
    name: Option<String>,
}

pub(super) async fn start(
    State(app): AppState,
    Extension(caller): Extension<Arc<Caller>>,
    body: super::JsonBody,
) -> ApiResult<Json<Value>> {
    let request: StartWorker = app.parse_json(&body)?;
    super::check_label("name", request.name.as_deref())?;
    if request.argv.is_empty() {
        return Err(ApiError::bad_request(
            "argv",
            "expected the command as a non-empty list of strings",
        ));
    }
    let built = match (&request.runtime_env, &request.env_id) {
        (Some(spec), None) => app.daemon.get_or_create(spec, &caller).await?.0,
        (None, Some(id)) => {
            let id: EnvId = id
                .parse()
                .map_err(|_| ApiError::bad_request("env_id", "expected 64 lowercase hex digits"))?;
            app.daemon
                .env(id, &caller)
                .ok_or_else(|| ApiError::not_found(format!("no env {id}; create it with POST /v1/envs")))?
        }
        _ => {
            return Err(ApiError::bad_request(
                "runtime_env",
                "give exactly one of runtime_env and env_id",
            ));
        }
    };
    let gpus = match (request.gpus, request.num_gpus) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("gpus", "give gpus or num_gpus, not both"));
        }
        (Some(ids), None) => GpuRequest::Ids(ids),
        (None, Some(n)) => GpuRequest::Count(n),
        (None, None) => GpuRequest::None,
    };
    // In a task of its own: a client that goes away mid-start must not leave the GPUs,
    // the hold or the cgroup it took behind (dropping this future would).
    let workers = Arc::clone(&app.workers);
    let info = tokio::spawn(async move {
        workers
            .start(built, &request.argv, gpus, request.name, &caller)
            .await
    })
    .await
    .map_err(|e| ApiError::internal(format!("worker start panicked: {e}")))??;
    Ok(Json(serde_json::to_value(&info).expect("serializable")))
}

/// The caller's workers (the daemon's user and root: everyone's).
pub(super) async fn list(State(app): AppState, Extension(caller): Extension<Arc<Caller>>) -> Json<Value> {
    Json(json!({"workers": app.workers.list(&caller)}))
}

#[derive(Deserialize)]
pub(super) struct InspectQuery {
    /// Answer only once the worker has exited.
    wait: Option<bool>,
}

pub(super) async fn inspect(
    State(app): AppState,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    Query(query): Query<InspectQuery>,
) -> ApiResult<Json<WorkerInfo>> {
    app.workers.find(&id, &caller)?;
    if query.wait.unwrap_or(false) {
        app.workers.wait_exit(&id).await;
    }
    Ok(Json(app.workers.find(&id, &caller)?))
}

/// SIGTERM to the worker's process group, SIGKILL after the grace period.
pub(super) async fn stop(
    State(app): AppState,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
) -> ApiResult<Json<WorkerInfo>> {
    Ok(Json(app.workers.stop(&id, &caller)?))
}

#[derive(Deserialize)]
pub(super) struct LogQuery {
    stream: Option<String>,
    follow: Option<bool>,
}

/// The worker's stdout or stderr; with `follow=true`, streamed until the worker has exited
/// and everything it wrote has been sent.
pub(super) async fn logs(
    State(app): AppState,
    Extension(caller): Extension<Arc<Caller>>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse;
    use tokio::io::AsyncReadExt;
    let info = app.workers.find(&id, &caller)?;
    let path = match query.stream.as_deref().unwrap_or("stdout") {
        "stdout" => info.stdout_log.clone(),
        "stderr" => info.stderr_log.clone(),
        other => {
            return Err(ApiError::bad_request(
                "stream",
                format!("expected stdout or stderr, got {other:?}"),
            ));
        }
    };
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let follow = query.follow.unwrap_or(false);
    let workers = Arc::clone(&app.workers);
    let stream = futures_util::stream::unfold(
        (file, workers, id, false),
        move |(mut file, workers, id, done)| async move {
            if done {
                return None;
            }
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) if follow => {
                        if !workers.is_running(&id) {
                            // One more read after the exit was recorded catches the last bytes.
                            let mut rest = Vec::new();
                            let _ = file.read_to_end(&mut rest).await;
                            return Some((
                                Ok::<_, std::io::Error>(Bytes::from(rest)),
                                (file, workers, id, true),
                            ));
                        }
                        // New output or the exit, whichever comes first.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            _ = workers.wait_exit(&id) => {}
                        }
                    }
                    Ok(0) => return None,
                    Ok(n) => {
                        buf.truncate(n);
                        return Some((Ok(Bytes::from(buf)), (file, workers, id, false)));
                    }
                    Err(e) => return Some((Err(e), (file, workers, id, true))),
                }
            }
        },
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}
