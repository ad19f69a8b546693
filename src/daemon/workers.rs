//! Workers: argv in an env's context, in their own process group, output to per-worker
//! log files, GPUs held exclusively and the env leased until they exit.

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{ApiError, parse_json};
use super::state::{Daemon, WorkerInfo, WorkerState, ZeroGpus, now};
use crate::digest::EnvId;

type AppState = State<Arc<Daemon>>;

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

pub async fn start(State(daemon): AppState, body: Bytes) -> Result<Json<Value>, ApiError> {
    let request: StartWorker = parse_json(&daemon, &body)?;
    if request.argv.is_empty() {
        return Err(ApiError::bad_request(
            "argv",
            "expected the command as a non-empty list of strings",
        ));
    }
    let built = match (&request.runtime_env, &request.env_id) {
        (Some(spec), None) => daemon.get_or_create(spec).await?.0,
        (None, Some(id)) => {
            let id: EnvId = id
                .parse()
                .map_err(|_| ApiError::bad_request("env_id", "expected 64 lowercase hex digits"))?;
            let envs = daemon.envs.lock().unwrap();
            let record = envs
                .get(&id)
                .ok_or_else(|| ApiError::not_found(format!("no env {id}; create it with POST /v1/envs")))?;
            Arc::clone(&record.built)
        }
        _ => {
            return Err(ApiError::bad_request(
                "runtime_env",
                "give exactly one of runtime_env and env_id",
            ));
        }
    };
    let gpus = {
        let mut pool = daemon.gpus.lock().unwrap();
        match (&request.gpus, request.num_gpus) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request("gpus", "give gpus or num_gpus, not both"));
            }
            (Some(ids), None) => pool
                .take_explicit(ids)
                .map_err(|e| ApiError::bad_request("gpus", e.to_string()))?,
            (None, Some(n)) => pool
                .allocate(n)
                .map_err(|e| ApiError::busy("num_gpus", e.to_string()))?,
            (None, None) => Vec::new(),
        }
    };
    let give_back = |daemon: &Daemon| daemon.gpus.lock().unwrap().release(&gpus);

    let worker_id = daemon.new_worker_id();
    let logs = daemon.logs.dir();
    let stdout_log = logs.join(format!("{worker_id}.stdout"));
    let stderr_log = logs.join(format!("{worker_id}.stderr"));
    let spawn = || -> Result<tokio::process::Child, ApiError> {
        let gpu_env = if gpus.is_empty() && daemon.zero_gpus == ZeroGpus::Inherit {
            None
        } else {
            Some(gpus.as_slice())
        };
        let mut cmd = crate::worker::command(&built.context, &daemon.base_env, &request.argv, gpu_env)
            .map_err(|e| ApiError::bad_request("argv", e.to_string()))?;
        let log = |name: String| {
            daemon
                .logs
                .create(&name)
                .map_err(|e| ApiError::internal(format!("worker log: {e}")))
        };
        let out = log(format!("{worker_id}.stdout"))?;
        let err = log(format!("{worker_id}.stderr"))?;
        cmd.stdin(std::process::Stdio::null()).stdout(out).stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| ApiError::bad_request("argv", format!("cannot start {:?}: {e}", request.argv[0])))
    };
    // The env stays leased from before the spawn until the worker's exit is recorded, and
    // the worker itself inherits a lease, so its env stays protected even if this daemon
    // dies and restarts while it runs.
    daemon.hold(built.env_id, None, true)?;
    let own_leases = built
        .lease(&daemon.store)
        .map_err(ApiError::from)?
        .unwrap_or_default();
    let inherited = own_leases
        .iter()
        .map(|lease| lease.inheritable())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal(format!("lease: {e}")));
    let spawned = inherited.and_then(|_inherited| spawn());
    drop(own_leases);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            give_back(&daemon);
            let _ = daemon.release(built.env_id, true);
            return Err(e);
        }
    };
    daemon.logs.refill_if_low();
    let pid = child.id().unwrap_or(0);
    let info = WorkerInfo {
        worker_id: worker_id.clone(),
        name: request.name,
        env_id: built.env_id.to_string(),
        pid,
        state: WorkerState::Running,
        exit_code: None,
        signal: None,
        gpus: gpus.clone(),
        started_at: now(),
        ended_at: None,
        stdout_log,
        stderr_log,
        stop_requested: false,
    };
    let response = serde_json::to_value(&info).expect("serializable");
    daemon.workers.lock().unwrap().insert(worker_id.clone(), info);
    let (exited, exit_rx) = tokio::sync::watch::channel(false);
    daemon.exits.lock().unwrap().insert(worker_id.clone(), exit_rx);
    daemon.metrics.workers_started.fetch_add(1, Ordering::Relaxed);
    tracing::info!(worker_id = %worker_id, pid, gpus = ?gpus, env_id = %built.env_id, "worker started");

    let reaper = Arc::clone(&daemon);
    let env_id = built.env_id;
    tokio::spawn(async move {
        let status = child.wait().await;
        {
            let mut workers = reaper.workers.lock().unwrap();
            if let Some(w) = workers.get_mut(&worker_id) {
                w.ended_at = Some(now());
                match status {
                    Ok(status) => {
                        w.exit_code = status.code();
                        w.signal = status.signal();
                        w.state = if w.stop_requested {
                            WorkerState::Stopped
                        } else if status.success() {
                            WorkerState::Succeeded
                        } else {
                            WorkerState::Failed
                        };
                    }
                    Err(_) => w.state = WorkerState::Failed,
                }
            }
        }
        if let Some(w) = reaper.workers.lock().unwrap().get(&worker_id) {
            tracing::info!(worker_id = %worker_id, state = ?w.state, exit_code = ?w.exit_code, signal = ?w.signal, "worker ended");
        }
        reaper.gpus.lock().unwrap().release(&gpus);
        let _ = reaper.release(env_id, true);
        let _ = exited.send(true);
    });
    Ok(Json(response))
}

pub async fn list(State(daemon): AppState) -> Json<Value> {
    let workers: Vec<WorkerInfo> = daemon.workers.lock().unwrap().values().cloned().collect();
    Json(json!({"workers": workers}))
}

fn find(daemon: &Daemon, id: &str) -> Result<WorkerInfo, ApiError> {
    daemon
        .workers
        .lock()
        .unwrap()
        .get(id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no worker {id:?}")))
}

#[derive(Deserialize)]
pub struct InspectQuery {
    /// Answer only once the worker has exited.
    wait: Option<bool>,
}

pub async fn inspect(
    State(daemon): AppState,
    Path(id): Path<String>,
    Query(query): Query<InspectQuery>,
) -> Result<Json<WorkerInfo>, ApiError> {
    if query.wait.unwrap_or(false) {
        wait_exit(&daemon, &id).await;
    }
    find(&daemon, &id).map(Json)
}

/// Returns once the worker's exit is recorded (at once for unknown or ended workers).
async fn wait_exit(daemon: &Daemon, id: &str) {
    let rx = daemon.exits.lock().unwrap().get(id).cloned();
    if let Some(mut rx) = rx {
        let _ = rx.wait_for(|exited| *exited).await;
    }
}

/// SIGTERM to the worker's process group, SIGKILL after the grace period.
pub async fn stop(State(daemon): AppState, Path(id): Path<String>) -> Result<Json<WorkerInfo>, ApiError> {
    let pid = {
        let mut workers = daemon.workers.lock().unwrap();
        let w = workers
            .get_mut(&id)
            .ok_or_else(|| ApiError::not_found(format!("no worker {id:?}")))?;
        if w.state != WorkerState::Running {
            return Err(ApiError::conflict(format!(
                "worker {id} is not running ({:?})",
                w.state
            )));
        }
        w.stop_requested = true;
        w.pid as i32
    };
    signal_group(pid, libc::SIGTERM);
    let grace = daemon.stop_grace;
    let watcher = Arc::clone(&daemon);
    let watched = id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let still_running = watcher
            .workers
            .lock()
            .unwrap()
            .get(&watched)
            .is_some_and(|w| w.state == WorkerState::Running);
        if still_running {
            signal_group(pid, libc::SIGKILL);
        }
    });
    find(&daemon, &id).map(Json)
}

pub fn signal_group(pid: i32, signal: libc::c_int) {
    if pid > 0 {
        let _ = crate::sys::kill_group(pid, signal);
    }
}

#[derive(Deserialize)]
pub struct LogQuery {
    stream: Option<String>,
    follow: Option<bool>,
}

/// The worker's stdout or stderr; with `follow=true`, streamed until the worker has exited
/// and everything it wrote has been sent.
pub async fn logs(
    State(daemon): AppState,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    use tokio::io::AsyncReadExt;
    let info = find(&daemon, &id)?;
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
    let stream = futures_util::stream::unfold(
        (file, daemon, id, false),
        move |(mut file, daemon, id, done)| async move {
            if done {
                return None;
            }
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match file.read(&mut buf).await {
                    Ok(0) if follow => {
                        let running = daemon
                            .workers
                            .lock()
                            .unwrap()
                            .get(&id)
                            .is_some_and(|w| w.state == WorkerState::Running);
                        if !running {
                            // One more read after the exit was recorded catches the last bytes.
                            let mut rest = Vec::new();
                            let _ = file.read_to_end(&mut rest).await;
                            return Some((
                                Ok::<_, std::io::Error>(Bytes::from(rest)),
                                (file, daemon, id, true),
                            ));
                        }
                        // New output or the exit, whichever comes first.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            _ = wait_exit(&daemon, &id) => {}
                        }
                    }
                    Ok(0) => return None,
                    Ok(n) => {
                        buf.truncate(n);
                        return Some((Ok(Bytes::from(buf)), (file, daemon, id, false)));
                    }
                    Err(e) => return Some((Err(e), (file, daemon, id, true))),
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

/// Stops every running worker (daemon shutdown): SIGTERM, then SIGKILL after the grace.
pub async fn stop_all(daemon: &Arc<Daemon>) {
    let running: Vec<i32> = {
        let mut workers = daemon.workers.lock().unwrap();
        workers
            .values_mut()
            .filter(|w| w.state == WorkerState::Running)
            .map(|w| {
                w.stop_requested = true;
                w.pid as i32
            })
            .collect()
    };
    for pid in &running {
        signal_group(*pid, libc::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + daemon.stop_grace;
    while tokio::time::Instant::now() < deadline {
        let any = daemon
            .workers
            .lock()
            .unwrap()
            .values()
            .any(|w| w.state == WorkerState::Running);
        if !any {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in running {
        signal_group(pid, libc::SIGKILL);
    }
}
