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
use crate::build::BuiltEnv;
use crate::store::state_db::{Change, SavedWorker, StateDb, WorkerEnd};
use crate::supervisor::tree::{Cgroups, WorkerCgroup};
use crate::supervisor::{Spec, StartError, Starting, Supervisor};

/// Supervisors kept started ahead of need.
const SPARE_SUPERVISORS: usize = 2;

pub use crate::supervisor::WorkerState;

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
    seq: i64,
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
    /// The next worker's number: never one given before, by this daemon or an earlier one.
    next_worker: AtomicU64,
    /// Ended workers kept for `status` and logs; the oldest beyond this are forgotten
    /// (their log files stay until `renv prune` removes old logs).
    max_ended: usize,
    /// Where workers' cgroups are made, if the node allows (see [`crate::supervisor::tree`]).
    cgroups: Option<Cgroups>,
    /// The supervisors of running workers.
    supervisors: Mutex<HashMap<String, Arc<Supervisor>>>,
    /// Supervisors started ahead of need, waiting for a worker (see [`crate::supervisor`]).
    spares: Mutex<Vec<Starting>>,
    refilling: std::sync::atomic::AtomicBool,
    /// The daemon's priority, which workers run at (spares start lower).
    nice: i32,
    /// Reads what supervisors recorded (the journal owns the writing connection).
    reader: Arc<Mutex<StateDb>>,
}

/// What a running worker holds, given back when it ends.
struct Held {
    worker_id: String,
    seq: i64,
    env_id: crate::digest::EnvId,
    owner: u32,
    gpus: Vec<u32>,
    cgroup: Option<PathBuf>,
    /// The worker's pid and start time, where known (to end what is left of it if its
    /// supervisor dies).
    leader: Option<(u32, u64)>,
}

fn worker_id(seq: i64) -> String {
    format!("w{seq:06}")
}

impl Workers {
    pub fn new(
        daemon: Arc<Daemon>,
        gpus: GpuPool,
        zero_gpus: ZeroGpus,
        stop_grace: Duration,
        max_ended: usize,
    ) -> Result<Workers, crate::store::StoreError> {
        let logs = LogPool::new(daemon.store.layout().worker_logs_dir())?;
        let reader = StateDb::open(daemon.store.layout())?;
        Ok(Workers {
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
            supervisors: Mutex::new(HashMap::new()),
            spares: Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            nice: crate::sys::thread_nice().unwrap_or(0),
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Whether workers get a cgroup each (for `/metrics`).
    pub fn uses_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    /// The node's GPUs.
    pub fn all_gpus(&self) -> Vec<u32> {
        self.gpus.lock().unwrap().all()
    }

    /// Forgets the oldest ended workers beyond `max_ended`, here and in the saved state.
    async fn forget_ended(&self) {
        let forgotten: Vec<i64> = {
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
            ended
                .into_iter()
                .take(excess)
                .filter_map(|(_, id)| {
                    exits.remove(&id);
                    workers.remove(&id).map(|w| w.seq)
                })
                .collect()
        };
        let changes = forgotten
            .into_iter()
            .map(|seq| Change::ForgetWorker { seq })
            .collect();
        if let Err(e) = self.daemon.journal.write(changes).await {
            tracing::warn!(error = %e, "forgotten workers stay saved");
        }
    }

    /// Tops up the spare log files (see [`LogPool`]) and supervisors; needs the runtime.
    pub fn refill_spares(self: &Arc<Self>) {
        self.logs.refill_if_low();
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let workers = Arc::clone(self);
        // Off the event loop: starting a process blocks until it has exec'd. At a low
        // priority where the daemon may raise it again (root): a spare never competes
        // with the work at hand, and takes the daemon's priority back with its worker.
        tokio::task::spawn_blocking(move || {
            let normal = crate::sys::thread_nice().unwrap_or(0);
            let lowered = crate::sys::geteuid() == 0 && crate::sys::set_thread_nice(19).is_ok();
            while workers.spares.lock().unwrap().len() < SPARE_SUPERVISORS {
                match Supervisor::spawn(&workers.store_dir()) {
                    Ok(spare) => workers.spares.lock().unwrap().push(spare),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a spare supervisor");
                        break;
                    }
                }
            }
            if lowered {
                let _ = crate::sys::set_thread_nice(normal);
            }
            workers.refilling.store(false, Ordering::Release);
        });
    }

    /// A supervisor for the next worker: a spare if there is one, else a new one.
    fn take_supervisor(self: &Arc<Self>) -> std::io::Result<Starting> {
        // A spare someone killed meanwhile is dropped (and reaped by the runtime).
        let spare = {
            let mut spares = self.spares.lock().unwrap();
            std::iter::from_fn(|| spares.pop()).find(|spare| spare.supervisor.is_alive())
        };
        self.refill_spares();
        match spare {
            Some(spare) => Ok(spare),
            None => Supervisor::spawn(&self.store_dir()),
        }
    }

    /// The store directory (as `--store` names it).
    fn store_dir(&self) -> PathBuf {
        let root = self.daemon.store.layout().root();
        root.parent().unwrap_or(root).to_path_buf()
    }

    /// Starts `argv` in `built`'s context with the GPUs asked for, under a supervisor of
    /// its own; the env is held and its GPUs taken until the worker's end is recorded.
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
        let seq = self.next_worker.fetch_add(1, Ordering::Relaxed) as i64;
        let worker_id = worker_id(seq);
        let owner = caller.uid;
        let logs = self.logs.dir();
        let stdout_log = logs.join(format!("{worker_id}.stdout"));
        let stderr_log = logs.join(format!("{worker_id}.stderr"));
        let cgroup = match &self.cgroups {
            Some(cgroups) => match cgroups.create(&worker_id) {
                Ok(cgroup) => Some(cgroup),
                Err(e) => {
                    self.gpus.lock().unwrap().release(&gpus);
                    return Err(StateError::Internal(format!("the worker's cgroup: {e}")));
                }
            },
            None => None,
        };
        let mut held = Held {
            worker_id: worker_id.clone(),
            seq,
            env_id: built.env_id,
            owner,
            gpus: gpus.clone(),
            cgroup: cgroup.as_ref().map(|c| c.dir().to_path_buf()),
            leader: None,
        };
        if let Err(e) = self.daemon.hold(built.env_id, owner, Hold::Worker).await {
            self.give_back(&held, false).await;
            return Err(e);
        }
        // Every failure from here on gives back what was taken: GPUs, the hold, the cgroup.
        let started = self
            .start_supervised(
                &built,
                argv,
                &run_as,
                &held,
                name.clone(),
                &stdout_log,
                &stderr_log,
            )
            .await;
        let (supervisor, (pid, pid_start)) = match started {
            Ok(started) => started,
            Err(e) => {
                self.give_back(&held, true).await;
                return Err(e);
            }
        };
        held.leader = Some((pid, pid_start));
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
            seq,
        };
        self.workers
            .lock()
            .unwrap()
            .insert(worker_id.clone(), info.clone());
        self.daemon
            .metrics
            .workers_started
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(worker_id = %worker_id, pid, gpus = ?gpus, env_id = %built.env_id, "worker started");
        self.watch(held, Arc::new(supervisor));
        Ok(info)
    }

    /// Starts the worker's supervisor, saves the worker, then hands it over: no worker
    /// runs that the saved state does not name. Returns the supervisor and the worker's pid.
    #[allow(clippy::too_many_arguments)]
    async fn start_supervised(
        self: &Arc<Self>,
        built: &BuiltEnv,
        argv: &[String],
        run_as: &Option<(u32, u32, Vec<u32>)>,
        held: &Held,
        name: Option<String>,
        stdout_log: &std::path::Path,
        stderr_log: &std::path::Path,
    ) -> Result<(Supervisor, (u32, u64)), StateError> {
        let gpu_env = if held.gpus.is_empty() && self.zero_gpus == ZeroGpus::Inherit {
            None
        } else {
            Some(held.gpus.as_slice())
        };
        // Another user's worker starts from a clean environment of its own, never the
        // daemon's (its HOME, its secrets).
        let tenant_env;
        let base_env = match run_as {
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
        let launch = crate::worker::launch(&context, base_env, argv, gpu_env)
            .map_err(|e| StateError::bad_request("argv", e.to_string()))?;
        // The caller's alone: a worker's output is nobody else's to read.
        for log in [&held.worker_id, &held.worker_id]
            .iter()
            .zip(["stdout", "stderr"])
        {
            let file = self
                .logs
                .create(&format!("{}.{}", log.0, log.1))
                .and_then(|file| {
                    if let Some((uid, gid, _)) = run_as {
                        std::os::unix::fs::fchown(&file, Some(*uid), Some(*gid))?;
                    }
                    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
                })
                .map_err(|e| StateError::Internal(format!("worker log: {e}")));
            file?;
        }
        let store = self.store_dir();
        let mut starting = self
            .take_supervisor()
            .map_err(|e| StateError::Internal(format!("the worker's supervisor: {e}")))?;
        let supervisor = &starting.supervisor;
        let row = SavedWorker {
            seq: held.seq,
            env_id: held.env_id.to_string(),
            uid: held.owner,
            name,
            pid: 0,
            pid_start: 0,
            gpus: held.gpus.clone(),
            started_at: now(),
            state: WorkerState::Running.as_str().into(),
            exit_code: None,
            signal: None,
            ended_at: None,
            supervisor: (supervisor.pid, supervisor.start),
            cgroup: held.cgroup.clone(),
        };
        let journal = &self.daemon.journal;
        journal
            .write(vec![Daemon::save_env(built), Change::AddWorker(row)])
            .await
            .map_err(|e| StateError::Internal(format!("saving the worker: {e}")))?;
        let spec = Spec {
            seq: held.seq,
            store,
            entries: built.entries().map(|e| e.to_string()).collect(),
            launch,
            run_as: run_as.clone(),
            cgroup: held.cgroup.clone(),
            stdout_log: stdout_log.to_path_buf(),
            stderr_log: stderr_log.to_path_buf(),
            stop_grace_ms: self.stop_grace.as_millis() as u64,
            nice: self.nice,
            lock_timeout_ms: self
                .daemon
                .store
                .options()
                .lock_timeout
                .map(|t| t.as_millis() as u64),
        };
        let handed = starting.hand_over(&spec).await;
        let supervisor = starting.supervisor;
        let pid = match handed {
            Ok(pid) => pid,
            Err(e) => {
                // It records the failure and exits; the row goes, the number stays used.
                supervisor.exited().await;
                let _ = journal.write(vec![Change::ForgetWorker { seq: held.seq }]).await;
                return Err(match e {
                    StartError::Spawn(message) => StateError::bad_request("argv", message),
                    StartError::Setup(message) => StateError::Internal(message),
                });
            }
        };
        // Not waited for: the saved worker is already whole (its supervisor is what finds
        // it again), and a pid lost with the daemon is read back from the supervisor.
        let (daemon, seq) = (Arc::clone(&self.daemon), held.seq);
        tokio::spawn(async move {
            let (pid, start) = pid;
            if let Err(e) = daemon
                .journal
                .write(vec![Change::WorkerPid { seq, pid, start }])
                .await
            {
                tracing::warn!(error = %e, "a worker's pid is not saved");
            }
        });
        Ok((supervisor, pid))
    }

    /// Gives back what a worker that did not start held (`hold`: its env hold was taken).
    async fn give_back(&self, held: &Held, hold: bool) {
        self.gpus.lock().unwrap().release(&held.gpus);
        if hold {
            self.daemon.release_worker(held.env_id, held.owner).await;
        }
        if let Some(dir) = &held.cgroup {
            WorkerCgroup::at(dir.clone()).kill_and_remove().await;
        }
    }

    /// Waits for the supervisor's exit, then records the worker's end and gives back what
    /// it held.
    fn watch(self: &Arc<Self>, held: Held, supervisor: Arc<Supervisor>) {
        let (exited, exit_rx) = watch::channel(false);
        self.exits.lock().unwrap().insert(held.worker_id.clone(), exit_rx);
        self.supervisors
            .lock()
            .unwrap()
            .insert(held.worker_id.clone(), Arc::clone(&supervisor));
        let workers = Arc::clone(self);
        tokio::spawn(async move {
            // Said on its stdout as soon as the worker is gone (saved here too: the first
            // record of an end wins); else, once it has exited, as it recorded it.
            let end = match supervisor.ended().await {
                Some(end) => {
                    let saved = workers
                        .daemon
                        .journal
                        .write(vec![Change::WorkerEnded {
                            seq: held.seq,
                            end: end.clone(),
                        }])
                        .await;
                    match saved {
                        Ok(_) => supervisor.end_saved().await,
                        Err(e) => {
                            tracing::warn!(error = %e, "a worker's end is saved by its supervisor only")
                        }
                    }
                    end
                }
                None => {
                    supervisor.exited().await;
                    workers.end_of(&held).await
                }
            };
            workers.supervisors.lock().unwrap().remove(&held.worker_id);
            // Reaped when it exits, a moment later.
            tokio::spawn(async move { supervisor.exited().await });
            workers.gpus.lock().unwrap().release(&held.gpus);
            {
                let mut all = workers.workers.lock().unwrap();
                if let Some(w) = all.get_mut(&held.worker_id) {
                    w.ended_at = Some(end.ended_at);
                    w.exit_code = end.exit_code;
                    w.signal = end.signal;
                    w.state = WorkerState::parse(&end.state);
                    tracing::info!(worker_id = %held.worker_id, state = ?w.state, exit_code = ?w.exit_code, signal = ?w.signal, "worker ended");
                }
            }
            workers.daemon.release_worker(held.env_id, held.owner).await;
            let _ = exited.send(true);
            workers.forget_ended().await;
        });
    }

    /// The end of a worker whose supervisor has exited, as the supervisor recorded it; if
    /// it recorded none (it was killed), the worker is lost: what is left of it is killed
    /// where its cgroup allows, and that is recorded.
    async fn end_of(&self, held: &Held) -> WorkerEnd {
        let reader = Arc::clone(&self.reader);
        let seq = held.seq;
        let saved = tokio::task::spawn_blocking(move || reader.lock().unwrap().worker(seq))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        if let Some(saved) = saved
            && saved.state != WorkerState::Running.as_str()
        {
            return WorkerEnd {
                state: saved.state,
                exit_code: saved.exit_code,
                signal: saved.signal,
                ended_at: saved.ended_at.unwrap_or_else(now),
            };
        }
        match (&held.cgroup, held.leader) {
            (Some(dir), _) => WorkerCgroup::at(dir.clone()).kill_and_remove().await,
            // Without a cgroup, the tree is the leader's group: killed while the leader is
            // still the process that started (its pid, and so the group id, its own), and
            // its GPUs kept until it is gone.
            (None, Some((pid, start))) => {
                if let Ok(pidfd) = crate::sys::pidfd_open(pid)
                    && crate::sys::start_time(pid) == Some(start)
                {
                    let _ = crate::sys::kill_group(pid as i32, libc::SIGKILL);
                    let _ = crate::sys::pidfd_signal(&pidfd, libc::SIGKILL);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), crate::sys::pidfd_exited(pidfd)).await;
                }
            }
            (None, None) => tracing::warn!(
                worker_id = %held.worker_id,
                "the worker's supervisor died before it said the worker's pid; without a cgroup, what \
                 may be left of the worker cannot be found"
            ),
        }
        let end = WorkerEnd {
            state: WorkerState::Lost.as_str().into(),
            exit_code: None,
            signal: None,
            ended_at: now(),
        };
        let _ = self
            .daemon
            .journal
            .write(vec![Change::WorkerEnded {
                seq: held.seq,
                end: end.clone(),
            }])
            .await;
        end
    }

    /// Takes back the workers a previous daemon saved: running ones whose supervisor is
    /// still there are adopted (their GPUs and env held again, their end awaited), those
    /// whose supervisor is gone get the end it recorded (or are lost), ended ones are
    /// listed again. `next` is the next worker's number.
    pub async fn restore(self: &Arc<Self>, saved: Vec<SavedWorker>, next: i64) -> (usize, usize) {
        self.next_worker.store(next.max(1) as u64, Ordering::Relaxed);
        let (mut adopted, mut ended_meanwhile) = (0, 0);
        let logs = self.logs.dir().to_path_buf();
        for w in saved {
            let Ok(env_id) = w.env_id.parse::<crate::digest::EnvId>() else {
                continue;
            };
            let id = worker_id(w.seq);
            let mut info = WorkerInfo {
                worker_id: id.clone(),
                name: w.name.clone(),
                uid: w.uid,
                env_id: w.env_id.clone(),
                pid: w.pid,
                state: WorkerState::parse(&w.state),
                exit_code: w.exit_code,
                signal: w.signal,
                gpus: w.gpus.clone(),
                started_at: w.started_at,
                ended_at: w.ended_at,
                stdout_log: logs.join(format!("{id}.stdout")),
                stderr_log: logs.join(format!("{id}.stderr")),
                seq: w.seq,
            };
            let held = Held {
                worker_id: id.clone(),
                seq: w.seq,
                env_id,
                owner: w.uid,
                gpus: w.gpus.clone(),
                cgroup: w.cgroup.clone(),
                leader: (w.pid != 0 && w.pid_start != 0).then_some((w.pid, w.pid_start)),
            };
            if info.state == WorkerState::Running {
                // Its GPUs are in use until it is really gone, whatever else happens.
                self.gpus.lock().unwrap().mark_busy(&w.gpus);
                match Supervisor::adopt(w.supervisor.0, w.supervisor.1) {
                    Some(supervisor) => {
                        if info.pid == 0 {
                            // Started just before the last daemon died: its only child.
                            info.pid = supervisor.worker_pid().unwrap_or(0);
                        }
                        // Its env is held at once (its supervisor holds the leases).
                        self.daemon.adopt_worker(env_id, w.uid);
                        adopted += 1;
                        self.workers.lock().unwrap().insert(id.clone(), info);
                        self.watch(held, Arc::new(supervisor));
                        continue;
                    }
                    None => {
                        let end = self.end_of(&held).await;
                        self.gpus.lock().unwrap().release(&w.gpus);
                        ended_meanwhile += 1;
                        info.state = WorkerState::parse(&end.state);
                        info.exit_code = end.exit_code;
                        info.signal = end.signal;
                        info.ended_at = Some(end.ended_at);
                        let _ = self
                            .daemon
                            .journal
                            .write(vec![Change::DropEnvIfUnheld {
                                env_id: env_id.to_string(),
                            }])
                            .await;
                    }
                }
            }
            let (_, ended) = watch::channel(true);
            self.exits.lock().unwrap().insert(id.clone(), ended);
            self.workers.lock().unwrap().insert(id, info);
        }
        self.forget_ended().await;
        (adopted, ended_meanwhile)
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

    /// Asks the worker's supervisor to stop it: SIGTERM to its process group, SIGKILL to
    /// its tree after the grace period.
    pub fn stop(self: &Arc<Self>, id: &str, caller: &Caller) -> Result<WorkerInfo, StateError> {
        let info = self.find(id, caller)?;
        if info.state != WorkerState::Running {
            return Err(StateError::Conflict(format!(
                "worker {id} is not running ({:?})",
                info.state
            )));
        }
        if let Some(supervisor) = self.supervisors.lock().unwrap().get(id) {
            supervisor.signal(libc::SIGTERM);
        }
        Ok(info)
    }

    /// Stops every running worker (daemon shutdown without `--live-restore`), and waits
    /// for their ends (the grace, and a little more for the kills).
    pub async fn stop_all(&self) {
        let supervisors: Vec<Arc<Supervisor>> = self.supervisors.lock().unwrap().values().cloned().collect();
        for supervisor in &supervisors {
            supervisor.signal(libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + self.stop_grace + Duration::from_secs(5);
        while self.live() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove();
        }
    }
}
