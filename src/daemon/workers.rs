//! Workers: argv in an env's context, in their own process group, output to per-worker
//! log files, GPUs held exclusively and the env leased until they exit.
//!
//! A worker runs as its caller: with the caller's uid, gid and supplementary groups when
//! the daemon is root, as the daemon's own user when that is the caller (or root asks a
//! daemon that is not); any other request would give the worker more than its caller and
//! is refused. Its logs are the caller's alone (0600, owned by the caller), and only its
//! caller (and the daemon's user and root) sees, follows or stops it.
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
use super::peer::Caller;
use super::state::{Daemon, Hold, StateError, now};
use super::tree::{Cgroups, Leader, Tree};
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
    /// Who started it (and whose rights it runs with).
    pub uid: u32,
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
    /// The leader has exited: its tree is being ended (the leader is reaped, and its pid
    /// and process group id let go, only once that is done; see [`Leader`]).
    #[serde(skip)]
    pub leader_exited: bool,
}

/// Variables of the daemon's environment that describe the node, not the daemon's user,
/// and so are passed to other users' workers.
const NODE_VARIABLES: [&str; 6] = [
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_DRIVER_CAPABILITIES",
];

/// The base environment of a worker running as `uid` (not the daemon's user): the node's
/// variables, and `HOME`, `USER`, `LOGNAME`, `SHELL` from `uid`'s passwd entry (`/` and
/// the number when it has none).
fn tenant_env_of(uid: u32, daemon_env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = NODE_VARIABLES
        .iter()
        .filter_map(|name| Some((name.to_string(), daemon_env.get(*name)?.clone())))
        .collect();
    let (name, home, shell) = match crate::sys::passwd_entry(|entry| entry.uid == uid) {
        Some(entry) => (entry.name, entry.home, entry.shell),
        None => (uid.to_string(), "/".to_string(), "/bin/sh".to_string()),
    };
    env.insert("HOME".into(), home);
    env.insert("USER".into(), name.clone());
    env.insert("LOGNAME".into(), name);
    env.insert("SHELL".into(), shell);
    env
}

/// Who a worker of `caller` runs as: `None` for the daemon's own identity, else (uid,
/// gid, groups) to switch to. Never more than the caller has.
fn identity_for(caller: &Caller) -> Result<Option<(u32, u32, Vec<u32>)>, StateError> {
    let me = crate::sys::geteuid();
    if caller.uid == me || (caller.uid == 0 && me != 0) {
        // The daemon's own user, or root asking a daemon that has less than root.
        return Ok(None);
    }
    if me == 0 {
        return Ok(Some((caller.uid, caller.gid, caller.groups.clone())));
    }
    Err(StateError::Forbidden(format!(
        "this daemon runs as uid {me} and cannot start a worker as uid {}: the worker would have \
         the daemon's rights, not yours. Run the daemon as root to serve other users' workers",
        caller.uid
    )))
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
    /// Ended workers kept for `status` and logs; the oldest beyond this are forgotten
    /// (their log files stay until `renv prune` removes old logs).
    max_ended: usize,
    /// Where workers' cgroups are made, if the node allows (see [`super::tree`]).
    cgroups: Option<Cgroups>,
    /// The process trees of workers whose end is not yet complete.
    trees: Mutex<HashMap<String, Arc<Tree>>>,
}

impl Workers {
    pub fn new(
        daemon: Arc<Daemon>,
        gpus: GpuPool,
        zero_gpus: ZeroGpus,
        stop_grace: Duration,
        max_ended: usize,
    ) -> Workers {
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
            max_ended,
            cgroups: match Cgroups::detect() {
                Ok(cgroups) => Some(cgroups),
                Err(reason) => {
                    tracing::warn!(
                        %reason,
                        "no cgroup per worker: a worker's tree is its process group, and processes that leave it \
                         (setsid) outlive a stop"
                    );
                    None
                }
            },
            trees: Mutex::new(HashMap::new()),
        }
    }

    /// Whether workers get a cgroup each (for `/metrics`).
    pub fn uses_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Forgets the oldest ended workers beyond `max_ended`.
    fn forget_ended(&self) {
        let mut workers = self.workers.lock().unwrap();
        let mut ended: Vec<(f64, String)> = workers
            .values()
            .filter_map(|w| w.ended_at.map(|t| (t, w.worker_id.clone())))
            .collect();
        if ended.len() <= self.max_ended {
            return;
        }
        ended.sort_by(|a, b| a.0.total_cmp(&b.0));
        let excess = ended.len() - self.max_ended;
        let mut exits = self.exits.lock().unwrap();
        for (_, id) in ended.into_iter().take(excess) {
            workers.remove(&id);
            exits.remove(&id);
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
    pub async fn start(
        self: &Arc<Self>,
        built: Arc<BuiltEnv>,
        argv: &[String],
        gpus: GpuRequest,
        name: Option<String>,
        caller: &Caller,
    ) -> Result<WorkerInfo, StateError> {
        let run_as = identity_for(caller)?;
        let gpus = {
            let mut pool = self.gpus.lock().unwrap();
            match gpus {
                GpuRequest::Ids(ids) => pool.take_explicit(&ids).map_err(|e| match e {
                    super::gpus::GpuError::Busy { .. } => StateError::Busy {
                        field: "gpus",
                        message: e.to_string(),
                    },
                    e => StateError::bad_request("gpus", e.to_string()),
                })?,
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
        let cgroup = match &self.cgroups {
            Some(cgroups) => match cgroups.create(&worker_id) {
                Ok(cgroup) => Some(cgroup),
                Err(e) => {
                    give_back(self);
                    return Err(StateError::Internal(format!("the worker's cgroup: {e}")));
                }
            },
            None => None,
        };
        let spawn = |leases: Vec<std::os::fd::OwnedFd>| -> Result<tokio::process::Child, StateError> {
            let gpu_env = if gpus.is_empty() && self.zero_gpus == ZeroGpus::Inherit {
                None
            } else {
                Some(gpus.as_slice())
            };
            // Another user's worker starts from a clean environment of its own, never the
            // daemon's (its HOME, its secrets).
            let tenant_env;
            let base_env = match &run_as {
                Some((uid, _, _)) => {
                    tenant_env = tenant_env_of(*uid, &self.base_env);
                    &tenant_env
                }
                None => &self.base_env,
            };
            // The worker's own user's bytecode cache (the daemon's, if it runs as itself).
            let (uid, gid) = run_as
                .as_ref()
                .map_or((crate::sys::geteuid(), crate::sys::getegid()), |(uid, gid, _)| {
                    (*uid, *gid)
                });
            let context = built
                .context_for(&self.daemon.store, uid, gid)
                .map_err(|e| StateError::Internal(format!("the worker's bytecode cache: {e}")))?;
            let mut cmd = crate::worker::command(&context, base_env, argv, gpu_env)
                .map_err(|e| StateError::bad_request("argv", e.to_string()))?;
            // The caller's alone: a worker's output is nobody else's to read.
            let log = |name: String| {
                let file = self.logs.create(&name)?;
                if let Some((uid, gid, _)) = &run_as {
                    std::os::unix::fs::fchown(&file, Some(*uid), Some(*gid))?;
                }
                file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                Ok::<_, std::io::Error>(file)
            };
            let log = |name: String| log(name).map_err(|e| StateError::Internal(format!("worker log: {e}")));
            let out = log(format!("{worker_id}.stdout"))?;
            let err = log(format!("{worker_id}.stderr"))?;
            cmd.stdin(std::process::Stdio::null()).stdout(out).stderr(err);
            // A session of its own (and so a process group: pgid = pid), without a
            // controlling terminal: a worker must never reach the terminal the daemon was
            // started from (TIOCSTI would type into root's shell).
            crate::sys::new_session(&mut cmd);
            // The worker holds its env's leases too: they outlive this daemon.
            crate::sys::inherit_in_child(&mut cmd, leases);
            // Into its cgroup first: the cgroup's files are the daemon's, not the caller's.
            if let Some(cgroup) = &cgroup {
                let procs = cgroup
                    .procs()
                    .map_err(|e| StateError::Internal(format!("the worker's cgroup: {e}")))?;
                crate::sys::join_cgroup(&mut cmd, procs);
            }
            if let Some((uid, gid, groups)) = &run_as {
                crate::sys::run_as(&mut cmd, *uid, *gid, groups);
            }
            tokio::process::Command::from(cmd)
                .kill_on_drop(false)
                .spawn()
                .map_err(|e| StateError::bad_request("argv", format!("cannot start {:?}: {e}", argv[0])))
        };
        // The env stays leased from before the spawn until the worker's exit is recorded, and
        // the worker itself inherits a lease, so its env stays protected even if this daemon
        // dies and restarts while it runs.
        let owner = caller.uid;
        if let Err(e) = daemon.hold(built.env_id, owner, Hold::Worker).await {
            give_back(self);
            if let Some(cgroup) = &cgroup {
                cgroup.kill_and_remove().await;
            }
            return Err(e);
        }
        // Every failure from here on gives back what was taken: GPUs and the hold. The
        // leases are taken on the blocking pool: another process may hold an entry's lock.
        let (store, leasing) = (Arc::clone(&daemon.store), Arc::clone(&built));
        let spawned = tokio::task::spawn_blocking(move || leasing.lease(&store))
            .await
            .map_err(|e| StateError::Internal(format!("leasing panicked: {e}")))
            .and_then(|leased| leased.map_err(StateError::from))
            .and_then(|leases| {
                // An entry that vanished since the build cannot be leased: say so rather
                // than start a worker nothing protects.
                leases.ok_or_else(|| StateError::Conflict("the env's entries changed; ask again".into()))
            })
            .and_then(|own_leases| {
                let inherited = own_leases
                    .iter()
                    .map(|lease| lease.dup())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StateError::Internal(format!("lease: {e}")))?;
                spawn(inherited)
            });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                give_back(self);
                daemon.release_worker(built.env_id, owner);
                if let Some(cgroup) = &cgroup {
                    cgroup.kill_and_remove().await;
                }
                return Err(e);
            }
        };
        self.logs.refill_if_low();
        let pid = child.id().unwrap_or(0);
        let tree = Arc::new(Tree::new(Leader::new(pid as i32), cgroup));
        self.trees
            .lock()
            .unwrap()
            .insert(worker_id.clone(), Arc::clone(&tree));
        let info = WorkerInfo {
            worker_id: worker_id.clone(),
            name,
            uid: owner,
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
            leader_exited: false,
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
            // The leader's exit, not yet reaped: its pid still names the worker's group.
            tree.leader().exited().await;
            if let Some(w) = reaper.workers.lock().unwrap().get_mut(&worker_id) {
                w.leader_exited = true;
            }
            // Whatever the leader left running goes with it. Only then is the worker
            // ended: its state, its GPUs and `?wait=true` all say that nothing is left.
            tree.end().await;
            reaper.trees.lock().unwrap().remove(&worker_id);
            // Only now is the leader reaped, and its pid free to be reused.
            tree.leader().mark_reaped();
            let status = child.wait().await;
            reaper.gpus.lock().unwrap().release(&gpus);
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
            reaper.daemon.release_worker(env_id, owner);
            let _ = exited.send(true);
            reaper.forget_ended();
        });
        Ok(info)
    }

    /// The workers `caller` may see, running or ended, by id.
    pub fn list(&self, caller: &Caller) -> Vec<WorkerInfo> {
        self.workers
            .lock()
            .unwrap()
            .values()
            .filter(|w| caller.may_see(w.uid))
            .cloned()
            .collect()
    }

    /// The worker `id`, if `caller` may see it (another user's is "not found", so its
    /// existence does not leak either).
    pub fn find(&self, id: &str, caller: &Caller) -> Result<WorkerInfo, StateError> {
        self.workers
            .lock()
            .unwrap()
            .get(id)
            .filter(|w| caller.may_see(w.uid))
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
    pub fn stop(self: &Arc<Self>, id: &str, caller: &Caller) -> Result<WorkerInfo, StateError> {
        {
            let mut workers = self.workers.lock().unwrap();
            let w = workers
                .get_mut(id)
                .filter(|w| caller.may_see(w.uid))
                .ok_or_else(|| StateError::NotFound(format!("no worker {id:?}")))?;
            if w.state != WorkerState::Running {
                return Err(StateError::Conflict(format!(
                    "worker {id} is not running ({:?})",
                    w.state
                )));
            }
            w.stop_requested = true;
            if w.leader_exited {
                // Ending already: its tree is being killed.
                drop(workers);
                return self.find(id, caller);
            }
        };
        if let Some(tree) = self.trees.lock().unwrap().get(id) {
            tree.signal_group(libc::SIGTERM);
        }
        let grace = self.stop_grace;
        let watcher = Arc::clone(self);
        let watched = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if watcher.is_running(&watched) {
                watcher.kill_tree(&watched);
            }
        });
        self.find(id, caller)
    }

    /// Stops every running worker (daemon shutdown): SIGTERM, then SIGKILL after the grace.
    pub async fn stop_all(&self) {
        let running: Vec<String> = {
            let mut workers = self.workers.lock().unwrap();
            workers
                .values_mut()
                .filter(|w| w.state == WorkerState::Running && !w.leader_exited)
                .map(|w| {
                    w.stop_requested = true;
                    w.worker_id.clone()
                })
                .collect()
        };
        for id in &running {
            if let Some(tree) = self.trees.lock().unwrap().get(id) {
                tree.signal_group(libc::SIGTERM);
            }
        }
        let deadline = tokio::time::Instant::now() + self.stop_grace;
        while self.live() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Whatever is left after the grace — leaders that ignored SIGTERM, and what any
        // leader left behind — is killed; the reapers end each tree (and remove its
        // cgroup); then the daemon's own cgroup directory goes.
        let left: Vec<Arc<Tree>> = self.trees.lock().unwrap().values().cloned().collect();
        for tree in &left {
            tree.kill();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.trees.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove();
        }
    }

    /// SIGKILL to all of a worker's tree, unless its leader has exited (then the reaper
    /// is ending the tree).
    fn kill_tree(&self, id: &str) {
        let leader_exited = self
            .workers
            .lock()
            .unwrap()
            .get(id)
            .is_none_or(|w| w.leader_exited);
        if leader_exited {
            return;
        }
        if let Some(tree) = self.trees.lock().unwrap().get(id) {
            tree.kill();
        }
    }
}
