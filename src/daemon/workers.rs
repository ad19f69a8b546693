//! Workers: argv in an env's context, in their own process group, output to per-worker
//! log files, GPUs held exclusively and the env leased until they exit.
//!
//! [`Workers`] keeps the worker records and runs their lifecycle: start (GPUs, logs, the
//! env's hold and inherited lease, the spawn), the reaper that records each exit and gives
//! everything back, stop (SIGTERM to the group, SIGKILL after the grace) and stop-all at
//! shutdown. It knows nothing about HTTP; [`WorkerInfo`]'s serialization is the API's
//! worker object.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::gpus::{GpuPool, ZeroGpus};
use super::logs::LogPool;
use super::state::{Daemon, StateError, now};
use crate::build::BuiltEnv;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Running,
    Succeeded,
    Failed,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub name: Option<String>,
    pub env_id: String,
    pub pid: u32,
    pub state: WorkerState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub gpus: Vec<u32>,
    pub started_at: f64,
    pub ended_at: Option<f64>,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    #[serde(skip)]
    pub stop_requested: bool,
}

/// The GPUs a worker asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuRequest {
    None,
    /// These ids, as the scheduler decided (they must exist).
    Ids(Vec<u32>),
    /// Any this many free ones.
    Count(usize),
}

/// The node's workers, running and ended, and what they hold.
pub struct Workers {
    daemon: Arc<Daemon>,
    gpus: Mutex<GpuPool>,
    logs: Arc<LogPool>,
    zero_gpus: ZeroGpus,
    stop_grace: Duration,
    base_env: BTreeMap<String, String>,
    workers: Mutex<BTreeMap<String, WorkerInfo>>,
    /// Flips to true when a worker's exit has been recorded (for `?wait=true` and log
    /// followers, so they learn of it at once instead of polling).
    exits: Mutex<HashMap<String, watch::Receiver<bool>>>,
    next_worker: AtomicU64,
}

impl Workers {
    pub fn new(daemon: Arc<Daemon>, gpus: GpuPool, zero_gpus: ZeroGpus, stop_grace: Duration) -> Workers {
        let logs = LogPool::new(daemon.store.layout().worker_logs_dir())
            .expect("the store's log directory is writable");
        Workers {
            daemon,
            gpus: Mutex::new(gpus),
            logs: Arc::new(logs),
            zero_gpus,
            stop_grace,
            base_env: std::env::vars().collect(),
            workers: Mutex::new(BTreeMap::new()),
            exits: Mutex::new(HashMap::new()),
            next_worker: AtomicU64::new(1),
        }
    }

    /// Tops up the spare log files (see [`LogPool`]); needs the runtime.
    pub fn refill_logs(&self) {
        self.logs.refill_if_low();
    }

    fn new_worker_id(&self) -> String {
        format!("w{:06}", self.next_worker.fetch_add(1, Ordering::Relaxed))
    }

    /// Starts `argv` in `built`'s context with the GPUs asked for; the env is held and its
    /// GPUs taken until the worker's exit is recorded.
    pub fn start(
        self: &Arc<Self>,
        built: &BuiltEnv,
        argv: &[String],
        gpus: GpuRequest,
        name: Option<String>,
    ) -> Result<WorkerInfo, StateError> {
        let gpus = {
            let mut pool = self.gpus.lock().unwrap();
            match gpus {
                GpuRequest::Ids(ids) => pool
                    .take_explicit(&ids)
                    .map_err(|e| StateError::bad_request("gpus", e.to_string()))?,
                GpuRequest::Count(n) => pool.allocate(n).map_err(|e| StateError::Busy {
                    field: "num_gpus",
                    message: e.to_string(),
                })?,
                GpuRequest::None => Vec::new(),
            }
        };
        let give_back = |workers: &Workers| workers.gpus.lock().unwrap().release(&gpus);

        let daemon = &self.daemon;
        let worker_id = self.new_worker_id();
        let logs = self.logs.dir();
        let stdout_log = logs.join(format!("{worker_id}.stdout"));
        let stderr_log = logs.join(format!("{worker_id}.stderr"));
        let spawn = || -> Result<tokio::process::Child, StateError> {
            let gpu_env = if gpus.is_empty() && self.zero_gpus == ZeroGpus::Inherit {
                None
            } else {
                Some(gpus.as_slice())
            };
            let mut cmd = crate::worker::command(&built.context, &self.base_env, argv, gpu_env)
                .map_err(|e| StateError::bad_request("argv", e.to_string()))?;
            let log = |name: String| {
                self.logs
                    .create(&name)
                    .map_err(|e| StateError::Internal(format!("worker log: {e}")))
            };
            let out = log(format!("{worker_id}.stdout"))?;
            let err = log(format!("{worker_id}.stderr"))?;
            cmd.stdin(std::process::Stdio::null()).stdout(out).stderr(err);
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            tokio::process::Command::from(cmd)
                .kill_on_drop(false)
                .spawn()
                .map_err(|e| StateError::bad_request("argv", format!("cannot start {:?}: {e}", argv[0])))
        };
        // The env stays leased from before the spawn until the worker's exit is recorded, and
        // the worker itself inherits a lease, so its env stays protected even if this daemon
        // dies and restarts while it runs.
        daemon.hold(built.env_id, None, true)?;
        let own_leases = built.lease(&daemon.store)?.unwrap_or_default();
        let inherited = own_leases
            .iter()
            .map(|lease| lease.inheritable())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StateError::Internal(format!("lease: {e}")));
        let spawned = inherited.and_then(|_inherited| spawn());
        drop(own_leases);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                give_back(self);
                let _ = daemon.release(built.env_id, true);
                return Err(e);
            }
        };
        self.logs.refill_if_low();
        let pid = child.id().unwrap_or(0);
        let info = WorkerInfo {
            worker_id: worker_id.clone(),
            name,
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
        self.workers
            .lock()
            .unwrap()
            .insert(worker_id.clone(), info.clone());
        let (exited, exit_rx) = watch::channel(false);
        self.exits.lock().unwrap().insert(worker_id.clone(), exit_rx);
        daemon.metrics.workers_started.fetch_add(1, Ordering::Relaxed);
        tracing::info!(worker_id = %worker_id, pid, gpus = ?gpus, env_id = %built.env_id, "worker started");

        let reaper = Arc::clone(self);
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
            let _ = reaper.daemon.release(env_id, true);
            let _ = exited.send(true);
        });
        Ok(info)
    }

    /// Every worker, running or ended, by id.
    pub fn list(&self) -> Vec<WorkerInfo> {
        self.workers.lock().unwrap().values().cloned().collect()
    }

    pub fn find(&self, id: &str) -> Result<WorkerInfo, StateError> {
        self.workers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| StateError::NotFound(format!("no worker {id:?}")))
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.workers
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|w| w.state == WorkerState::Running)
    }

    /// How many workers are running.
    pub fn live(&self) -> usize {
        self.workers
            .lock()
            .unwrap()
            .values()
            .filter(|w| w.state == WorkerState::Running)
            .count()
    }

    /// Returns once the worker's exit is recorded (at once for unknown or ended workers).
    pub async fn wait_exit(&self, id: &str) {
        let rx = self.exits.lock().unwrap().get(id).cloned();
        if let Some(mut rx) = rx {
            let _ = rx.wait_for(|exited| *exited).await;
        }
    }

    /// SIGTERM to the worker's process group, SIGKILL after the grace period.
    pub fn stop(self: &Arc<Self>, id: &str) -> Result<WorkerInfo, StateError> {
        let pid = {
            let mut workers = self.workers.lock().unwrap();
            let w = workers
                .get_mut(id)
                .ok_or_else(|| StateError::NotFound(format!("no worker {id:?}")))?;
            if w.state != WorkerState::Running {
                return Err(StateError::Conflict(format!(
                    "worker {id} is not running ({:?})",
                    w.state
                )));
            }
            w.stop_requested = true;
            w.pid as i32
        };
        signal_group(pid, libc::SIGTERM);
        let grace = self.stop_grace;
        let watcher = Arc::clone(self);
        let watched = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if watcher.is_running(&watched) {
                signal_group(pid, libc::SIGKILL);
            }
        });
        self.find(id)
    }

    /// Stops every running worker (daemon shutdown): SIGTERM, then SIGKILL after the grace.
    pub async fn stop_all(&self) {
        let running: Vec<i32> = {
            let mut workers = self.workers.lock().unwrap();
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
        let deadline = tokio::time::Instant::now() + self.stop_grace;
        while tokio::time::Instant::now() < deadline {
            if self.live() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for pid in running {
            signal_group(pid, libc::SIGKILL);
        }
    }
}

pub fn signal_group(pid: i32, signal: libc::c_int) {
    if pid > 0 {
        let _ = crate::sys::kill_group(pid, signal);
    }
}
