//! A worker's supervisor: the small process that is its parent, so the worker outlives
//! the daemon that asked for it (containerd's shim; Docker's `live-restore`).
//!
//! The daemon starts `renv __supervise` (this binary, [`ARG`]) in a session of its own and
//! hands it a [`Spec`] on its stdin. The supervisor leases the env's entries (by name, in
//! the store's lock files: its leases are its own and outlive the daemon), starts the
//! worker exactly as the daemon used to (its identity, cgroup, session, logs), says
//! `started <pid>` on its stdout, and waits. SIGTERM asks it to stop the worker: SIGTERM
//! to the worker's group, SIGKILL to its tree after the grace. When the worker's leader
//! exits, whatever it left is killed ([`tree`]), the leader is reaped, the leases are let
//! go, and the end is said on stdout (`ended <json>`: the daemon that started it hears it
//! at once, saves it and says `saved` on the supervisor's stdin); if no daemon says so (it
//! is gone, or was restarted and adopted this supervisor), the supervisor records the end
//! in the store's state database itself ([`crate::store::state_db`]); then it exits.
//!
//! Starting a process of this size costs more than the worker's own start, so the daemon
//! keeps a spare supervisor or two started ahead of need ([`Supervisor::spawn`] with no
//! spec yet), as it keeps spare log files.
//!
//! A daemon that is (re)started finds each running worker's supervisor by the pid and
//! start time saved with the worker ([`Supervisor::adopt`]); a supervisor's exit is its
//! worker's end, and what the end was is in the database.
//!
//! Handing over is ordered so that no worker runs unrecorded: the daemon saves the worker
//! (with its supervisor's pid) before it hands over the spec, and a supervisor whose
//! stdin closes without a spec (the daemon died in between) exits without starting
//! anything.

pub mod tree;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::store::state_db::{Change, StateDb, WorkerEnd};
use crate::store::{EntryId, Layout, LockFile, LockMode, LockName};
use crate::worker::Launch;
use tree::{Leader, Tree, WorkerCgroup};

/// The hidden first argument that makes `renv` a supervisor.
pub const ARG: &str = "__supervise";

/// A worker's state: running, or how it ended.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Running,
    Succeeded,
    Failed,
    Stopped,
    /// Its supervisor died without recording the end (killed itself): the exit status is
    /// unknown, and what was left of the worker was killed where a cgroup allowed.
    Lost,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Running => crate::store::state_db::RUNNING,
            WorkerState::Succeeded => "succeeded",
            WorkerState::Failed => "failed",
            WorkerState::Stopped => "stopped",
            WorkerState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> WorkerState {
        match s {
            "running" => WorkerState::Running,
            "succeeded" => WorkerState::Succeeded,
            "stopped" => WorkerState::Stopped,
            "lost" => WorkerState::Lost,
            _ => WorkerState::Failed,
        }
    }
}

/// What a supervisor is handed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// The worker's number in the state database.
    pub seq: i64,
    /// The store directory (the one `renv --store` names).
    pub store: PathBuf,
    /// The entries the worker's env uses, leased for as long as the worker runs.
    pub entries: Vec<String>,
    pub launch: Launch,
    /// Who the worker runs as (uid, gid, groups); `None`: as the supervisor.
    pub run_as: Option<(u32, u32, Vec<u32>)>,
    /// The worker's own cgroup, made by the daemon.
    pub cgroup: Option<PathBuf>,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    pub stop_grace_ms: u64,
    pub lock_timeout_ms: Option<u64>,
    /// The priority to run at (a spare was started at a lower one).
    pub nice: i32,
}

/// `renv __supervise`: reads a [`Spec`] on stdin, runs the worker, records its end.
pub fn main() -> ExitCode {
    // A session of its own: nothing sent to the daemon's group or terminal reaches it.
    let _ = rustix::process::setsid();
    // SIGTERM (stop the worker) is caught from the start: one that comes between the
    // worker's start and the wait for it must not kill the supervisor and orphan it.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            report(&format!("failed setup the supervisor's runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let term = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
    };
    // The spec is one line; a line cut short (the daemon died while writing it) is none.
    let mut text = String::new();
    if std::io::stdin().read_line(&mut text).is_err() || !text.ends_with('\n') {
        // The daemon died before handing the worker over: nothing was started.
        return ExitCode::SUCCESS;
    }
    let spec: Spec = match serde_json::from_str(&text) {
        Ok(spec) => spec,
        Err(e) => {
            report(&format!("failed the supervisor's spec: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if crate::sys::thread_nice().is_ok_and(|nice| nice != spec.nice) {
        let _ = crate::sys::set_thread_nice(spec.nice);
    }
    let layout = Layout::new(&spec.store);
    let end = match supervise(&spec, &layout, &runtime, term) {
        Ok(end) => {
            report(&format!(
                "ended {}",
                serde_json::to_string(&end).expect("an end serializes")
            ));
            if saved_by_daemon() {
                return ExitCode::SUCCESS;
            }
            end
        }
        Err(Failure { message, spawn }) => {
            let kind = if spawn { "spawn" } else { "setup" };
            report(&format!("failed {kind} {message}"));
            if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&spec.stderr_log) {
                let _ = writeln!(log, "renv: {message}");
            }
            WorkerEnd {
                state: WorkerState::Failed.as_str().into(),
                exit_code: None,
                signal: None,
                ended_at: now(),
            }
        }
    };
    match StateDb::open(&layout).and_then(|mut db| db.commit(&[Change::WorkerEnded { seq: spec.seq, end }])) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&spec.stderr_log) {
                let _ = writeln!(log, "renv: the worker's end could not be recorded: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// How long a supervisor waits for the daemon to say it saved the end.
const SAVED_WAIT: Duration = Duration::from_secs(30);

/// Whether the daemon that heard the end says it saved it (`saved` on stdin). It has then,
/// and the supervisor need not open the database: a second writer there would only make
/// the daemon's next commit wait for its lock. A daemon that is gone (stdin closes), could
/// not save it, or does not answer in [`SAVED_WAIT`] leaves it to the supervisor.
fn saved_by_daemon() -> bool {
    let (said, heard) = std::sync::mpsc::channel();
    // A thread of its own, so the wait can end (a read of stdin cannot be cut short).
    let reader = std::thread::Builder::new().spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = said.send(line);
    });
    reader.is_ok() && heard.recv_timeout(SAVED_WAIT).is_ok_and(|line| line == "saved\n")
}

/// Says how the start went, once, on stdout (the daemon may be gone: then no one hears).
fn report(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

struct Failure {
    message: String,
    /// The worker's program could not be started (the caller's mistake, not the node's).
    spawn: bool,
}

fn setup(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure {
        message: format!("{what}: {e}"),
        spawn: false,
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Starts the worker, waits for its end (stopping it when asked), and returns the end.
fn supervise(
    spec: &Spec,
    layout: &Layout,
    runtime: &tokio::runtime::Runtime,
    mut term: Option<tokio::signal::unix::Signal>,
) -> Result<WorkerEnd, Failure> {
    let timeout = spec.lock_timeout_ms.map(Duration::from_millis);
    let mut leases = Vec::new();
    for name in &spec.entries {
        let id: EntryId = name.parse().map_err(|e: String| Failure {
            message: e,
            spawn: false,
        })?;
        let lock = LockFile::acquire(&layout.lock_path(LockName::Entry(id)), LockMode::Shared, timeout)
            .map_err(|e| Failure {
                message: format!("leasing {name}: {e}"),
                spawn: false,
            })?;
        // Leased now: the entry must still be there (prune may have won the race).
        if !layout.entry_path(id).is_dir() {
            return Err(Failure {
                message: format!("{name} is gone from the store"),
                spawn: false,
            });
        }
        leases.push(lock);
    }
    let open_log = |path: &PathBuf| {
        std::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(setup("the worker's log"))
    };
    use std::os::unix::fs::OpenOptionsExt;
    let (out, err) = (open_log(&spec.stdout_log)?, open_log(&spec.stderr_log)?);
    let mut cmd = spec.launch.command();
    cmd.stdin(std::process::Stdio::null()).stdout(out).stderr(err);
    // A session of its own (and so a process group: pgid = pid), without a controlling
    // terminal: a worker must never reach a terminal (TIOCSTI would type into it).
    crate::sys::new_session(&mut cmd);
    // The leases are the supervisor's alone: a worker given their descriptors could
    // pass one to a process of its own, which could hold the entry's lock against all.
    let cgroup = spec.cgroup.as_ref().map(|dir| WorkerCgroup::at(dir.clone()));
    // Into its cgroup first: the cgroup's files are root's, not the caller's.
    if let Some(cgroup) = &cgroup {
        crate::sys::join_cgroup(&mut cmd, cgroup.procs().map_err(setup("the worker's cgroup"))?);
    }
    if let Some((uid, gid, groups)) = &spec.run_as {
        crate::sys::run_as(&mut cmd, *uid, *gid, groups);
    }
    let mut child = cmd.spawn().map_err(|e| Failure {
        message: format!("cannot start {:?}: {e}", spec.launch.argv[0]),
        spawn: true,
    })?;
    let pid = child.id();
    // With its start time: the pid names this process and no later one.
    report(&format!(
        "started {pid} {}",
        crate::sys::start_time(pid).unwrap_or(0)
    ));
    let tree = Tree::new(Leader::new(pid as i32), cgroup);
    let grace = Duration::from_millis(spec.stop_grace_ms);
    let stopped = runtime.block_on(async {
        let exited = tree.leader().exited();
        tokio::pin!(exited);
        let mut stopped = false;
        let kill = tokio::time::sleep(Duration::MAX / 4);
        tokio::pin!(kill);
        loop {
            tokio::select! {
                _ = &mut exited => break,
                Some(()) = async { term.as_mut()?.recv().await }, if !stopped => {
                    stopped = true;
                    tree.signal_group(libc::SIGTERM);
                    kill.as_mut().reset(tokio::time::Instant::now() + grace);
                }
                _ = &mut kill => tree.kill(),
            }
        }
        // Whatever the leader left running goes with it; only then is the worker ended.
        tree.end().await;
        stopped
    });
    // Only now is the leader reaped, and its pid free to be reused.
    tree.leader().mark_reaped();
    let status = child.wait();
    // Let go before the end is said: nothing of the worker holds the env any more.
    drop(leases);
    use std::os::unix::process::ExitStatusExt;
    let (state, exit_code, signal) = match status {
        Ok(status) => (
            if stopped {
                WorkerState::Stopped
            } else if status.success() {
                WorkerState::Succeeded
            } else {
                WorkerState::Failed
            },
            status.code(),
            status.signal(),
        ),
        Err(_) => (WorkerState::Failed, None, None),
    };
    Ok(WorkerEnd {
        state: state.as_str().into(),
        exit_code,
        signal,
        ended_at: now(),
    })
}

/// The daemon's handle on a supervisor: started by it, or adopted after a restart.
pub struct Supervisor {
    pub pid: u32,
    /// Its start time (see [`crate::sys::start_time`]).
    pub start: u64,
    pidfd: OwnedFd,
    /// The process, while this daemon is its parent (to reap it).
    child: Mutex<Option<tokio::process::Child>>,
    /// Its stdout, where it says the worker's end, while this daemon started it.
    said: tokio::sync::Mutex<Option<tokio::io::BufReader<tokio::process::ChildStdout>>>,
    /// Its stdin after the spec, while this daemon started it: where the daemon says it
    /// saved the worker's end.
    tell: Mutex<Option<tokio::process::ChildStdin>>,
}

/// A supervisor started and not yet handed its worker.
pub struct Starting {
    pub supervisor: Supervisor,
    /// Where the spec goes (then kept as the supervisor's `tell`).
    stdin: Option<tokio::process::ChildStdin>,
}

/// Why a supervisor did not start its worker.
#[derive(Debug)]
pub enum StartError {
    /// The worker's program could not be started.
    Spawn(String),
    /// Anything else (leases, logs, the supervisor itself).
    Setup(String),
}

impl Supervisor {
    /// Starts a supervisor, which waits for its spec ([`Starting::hand_over`]). `store`
    /// only labels it in `ps` (what it does comes with the spec).
    pub fn spawn(store: &std::path::Path) -> std::io::Result<Starting> {
        // This very binary, even if it was replaced on disk since (an upgrade).
        let mut cmd = tokio::process::Command::new("/proc/self/exe");
        cmd.arg(ARG)
            .arg(store)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false);
        let mut child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the supervisor exited at once"))?;
        // Our unreaped child: the pid is its own, for the pidfd and the start time.
        let pidfd = crate::sys::pidfd_open(pid)?;
        let start =
            crate::sys::start_time(pid).ok_or_else(|| std::io::Error::other("the supervisor vanished"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        Ok(Starting {
            supervisor: Supervisor {
                pid,
                start,
                pidfd,
                child: Mutex::new(Some(child)),
                said: tokio::sync::Mutex::new(Some(tokio::io::BufReader::new(stdout))),
                tell: Mutex::new(None),
            },
            stdin: Some(stdin),
        })
    }

    /// The running supervisor with this pid and start time, if it is still there.
    pub fn adopt(pid: u32, start: u64) -> Option<Supervisor> {
        let pidfd = crate::sys::pidfd_open(pid).ok()?;
        // Opened first, checked after: the descriptor names the process that had the
        // start time we read, or one that has exited (then signals reach nobody).
        (crate::sys::start_time(pid)? == start).then_some(Supervisor {
            pid,
            start,
            pidfd,
            child: Mutex::new(None),
            said: tokio::sync::Mutex::new(None),
            tell: Mutex::new(None),
        })
    }

    /// Whether it is still there (a spare someone killed is not).
    pub fn is_alive(&self) -> bool {
        crate::sys::ProcStat::read(self.pid)
            .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X') && stat.start_time == self.start)
    }

    /// The worker's pid: the supervisor's one child.
    pub fn worker_pid(&self) -> Option<u32> {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid)).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// `signal` to the supervisor (SIGTERM: stop the worker); false if it has exited.
    pub fn signal(&self, signal: libc::c_int) -> bool {
        crate::sys::pidfd_signal(&self.pidfd, signal).is_ok()
    }

    /// The next line the supervisor says, if this daemon started it (`None`: it said
    /// nothing more, or it is adopted).
    async fn said(&self) -> Option<String> {
        let mut said = self.said.lock().await;
        let mut line = String::new();
        match said.as_mut()?.read_line(&mut line).await {
            Ok(n) if n > 0 => Some(line.trim_end().to_string()),
            _ => {
                *said = None;
                None
            }
        }
    }

    /// The worker's end as the supervisor says it, as soon as it does; `None` if it will
    /// not say (adopted, or it died first): then wait for [`Self::exited`] and read the
    /// end it recorded.
    pub async fn ended(&self) -> Option<WorkerEnd> {
        let line = self.said().await?;
        serde_json::from_str(line.strip_prefix("ended ")?).ok()
    }

    /// Tells the supervisor its worker's end is saved (it then leaves the database alone).
    /// Not telling it, or dropping the supervisor, leaves the recording to it.
    pub async fn end_saved(&self) {
        let tell = self.tell.lock().unwrap().take();
        if let Some(mut tell) = tell {
            let _ = tell.write_all(b"saved\n").await;
        }
    }

    /// Returns once the supervisor has exited (and is reaped, if it is our child).
    pub async fn exited(&self) {
        let child = self.child.lock().unwrap().take();
        match child {
            Some(mut child) => {
                let _ = child.wait().await;
            }
            None => {
                // A pidfd polls readable once its process has exited.
                if let Ok(fd) = self.pidfd.try_clone() {
                    crate::sys::pidfd_exited(fd).await;
                }
            }
        }
    }
}

impl Starting {
    /// Hands the supervisor its spec; returns the worker's pid and start time once it
    /// runs.
    pub async fn hand_over(&mut self, spec: &Spec) -> Result<(u32, u64), StartError> {
        // One line (compact JSON has no newline in it).
        let mut text = serde_json::to_vec(spec).map_err(|e| StartError::Setup(e.to_string()))?;
        text.push(b'\n');
        let gone = |e: std::io::Error| StartError::Setup(format!("the supervisor: {e}"));
        // A spare waits at a low priority; woken at it, it would queue behind whatever
        // runs. Raised first (a root daemon can; others never lowered it).
        let _ = crate::sys::set_process_nice(self.supervisor.pid, spec.nice);
        let mut stdin = self
            .stdin
            .take()
            .ok_or_else(|| StartError::Setup("handed over twice".into()))?;
        stdin.write_all(&text).await.map_err(gone)?;
        let line = self.supervisor.said().await.unwrap_or_default();
        let line = line.as_str();
        if let Some(started) = line.strip_prefix("started ") {
            let mut words = started.split(' ').map(str::parse::<u64>);
            return match (words.next(), words.next()) {
                (Some(Ok(pid)), Some(Ok(start))) => {
                    *self.supervisor.tell.lock().unwrap() = Some(stdin);
                    Ok((pid as u32, start))
                }
                _ => Err(StartError::Setup(format!("the supervisor said {line:?}"))),
            };
        }
        Err(match line.split_once(' ') {
            Some(("failed", rest)) => match rest.split_once(' ') {
                Some(("spawn", message)) => StartError::Spawn(message.into()),
                Some((_, message)) => StartError::Setup(message.into()),
                None => StartError::Setup(rest.into()),
            },
            _ => StartError::Setup(format!(
                "the supervisor exited without starting the worker ({line:?})"
            )),
        })
    }
}
