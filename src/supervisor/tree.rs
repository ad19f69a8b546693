//! A worker is a process tree, not a process: what it starts is stopped with it, and its
//! GPUs go back to the pool only when nothing of it is left.
//!
//! Where the daemon can make cgroups (cgroup v2 mounted, the daemon allowed to create
//! groups below its own), each worker gets one: `<the daemon's cgroup>/renv-workers-<daemon
//! pid>/<worker id>`, joined by the child between fork and exec, so everything it starts
//! stays inside — a process that leaves its process group or session (`setsid`) too.
//! Killing a tree is one write to `cgroup.kill`, and "nothing left" is `populated 0` in
//! `cgroup.events`.
//!
//! Elsewhere the tree is the worker's process group: SIGKILL to the group, which is all
//! that can be reached. Processes that leave the group escape; the daemon says so when it
//! starts.
//!
//! Either way: a stopped worker's tree is killed after the grace whatever its leader did,
//! and when a leader exits, whatever it left running is killed (as a container's processes
//! end with its first process) — before the leader is reaped, so that its pid, which names
//! the group, cannot have been given to another process meanwhile ([`Leader`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Where workers' cgroups are made, if the node allows it.
#[derive(Debug)]
pub struct Cgroups {
    base: PathBuf,
}

impl Cgroups {
    /// A directory for this daemon's workers below its own cgroup, or why there is none.
    pub fn detect() -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        // "36 35 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw": the mount point is
        // the fifth field, the filesystem type the first after " - ".
        let mount = mountinfo
            .lines()
            .find_map(|line| {
                let (fields, rest) = line.split_once(" - ")?;
                (rest.split_whitespace().next()? == "cgroup2").then(|| fields.split_whitespace().nth(4))?
            })
            .ok_or("no cgroup2 filesystem is mounted")?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let own = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or("this process is in no cgroup v2 group")?;
        let parent = Path::new(mount).join(own.trim_start_matches('/'));
        sweep_dead_daemons(&parent);
        let base = parent.join(format!("renv-workers-{}", std::process::id()));
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", base.display())),
        }
        Ok(Cgroups { base })
    }

    /// A new, empty cgroup for one worker.
    pub fn create(&self, worker_id: &str) -> io::Result<WorkerCgroup> {
        let dir = self.base.join(worker_id);
        fs_err::create_dir(&dir)?;
        Ok(WorkerCgroup { dir })
    }

    /// Removes the daemon's (by then empty) directory of worker cgroups.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// Removes the worker cgroups of daemons that died without cleaning up (`kill -9`), where
/// nothing runs in them any more (a cgroup with processes cannot be removed, so a dead
/// daemon's live workers keep theirs).
fn sweep_dead_daemons(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("renv-workers-")) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(workers) = std::fs::read_dir(entry.path()) {
            for worker in workers.filter_map(Result::ok) {
                if worker.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(worker.path());
                }
            }
        }
        let _ = std::fs::remove_dir(entry.path());
    }
}

/// One worker's cgroup.
#[derive(Debug)]
pub struct WorkerCgroup {
    dir: PathBuf,
}

impl WorkerCgroup {
    /// The cgroup at `dir` (made by [`Cgroups::create`], perhaps by another process).
    pub fn at(dir: PathBuf) -> WorkerCgroup {
        WorkerCgroup { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a process writes `0` to, to move itself in (see `sys::join_cgroup`).
    pub fn procs(&self) -> io::Result<File> {
        Ok(fs_err::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))?
            .into_parts()
            .0)
    }

    /// SIGKILL to every process in it.
    pub fn kill(&self) -> io::Result<()> {
        fs_err::write(self.dir.join("cgroup.kill"), "1")
    }

    pub fn is_empty(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|events| events.lines().any(|l| l == "populated 0"))
            .unwrap_or(true)
    }

    /// Kills whatever is left and waits until nothing is, then removes the cgroup.
    pub async fn kill_and_remove(&self) {
        // The kernel empties a killed group within a few milliseconds: poll finely, so
        // the worker's end (and its GPUs) is not delayed by the polling; give up after 5 s.
        for _ in 0..5000 {
            if self.is_empty() {
                break;
            }
            let _ = self.kill();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A worker's leader: the process whose exit ends the worker, and whose pid is its process
/// group's id. Both ids are the worker's only while the leader is unreaped: once it is
/// reaped, the kernel may give the pid — and so the group id — to anyone. So the leader's
/// exit is awaited *without* reaping it (`waitid(WNOWAIT)`), the zombie
/// keeping both ids from being reused while the rest of the tree is killed; then it is
/// marked reaped, under the lock every signal through its pid is sent under, and only
/// then reaped. No signal ever reaches a group that is not the worker's.
#[derive(Debug)]
pub struct Leader {
    pid: i32,
    /// Set just before the leader is reaped.
    reaped: Mutex<bool>,
}

impl Leader {
    /// The leader with this pid: a child of this process that nothing has reaped yet.
    pub fn new(pid: i32) -> Leader {
        Leader {
            pid,
            reaped: Mutex::new(false),
        }
    }

    /// `signal` to the leader's process group, unless the leader has been reaped (then
    /// the group may be someone else's). Returns whether it was sent.
    pub fn signal_group(&self, signal: libc::c_int) -> bool {
        let reaped = self.reaped.lock().unwrap();
        !*reaped && self.pid > 0 && crate::sys::kill_group(self.pid, signal).is_ok()
    }

    /// Returns once the leader has exited, leaving it unreaped: `waitid(WNOWAIT)` after
    /// each SIGCHLD (the listener is in place before the first look, so no exit is missed).
    pub async fn exited(&self) {
        use rustix::process::{WaitId, WaitIdOptions, waitid};
        let Some(pid) = rustix::process::Pid::from_raw(self.pid).filter(|_| self.pid > 0) else {
            return;
        };
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
        // `Ok(None)`: not exited yet; an error (no such child) leaves nothing to wait for.
        while let Ok(None) = waitid(WaitId::Pid(pid), options) {
            match &mut sigchld {
                Some(sigchld) => {
                    sigchld.recv().await;
                }
                // No signal handler to be had: look again a little later.
                None => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// From now on nothing is signalled through the leader's pid: call it just before
    /// reaping the leader.
    pub fn mark_reaped(&self) {
        *self.reaped.lock().unwrap() = true;
    }
}

/// A worker's process tree: its leader, and its cgroup where the node allows one (else
/// the tree is the leader's process group).
#[derive(Debug)]
pub struct Tree {
    leader: Leader,
    cgroup: Option<WorkerCgroup>,
}

impl Tree {
    pub fn new(leader: Leader, cgroup: Option<WorkerCgroup>) -> Tree {
        Tree { leader, cgroup }
    }

    pub fn leader(&self) -> &Leader {
        &self.leader
    }

    /// `signal` to the leader's process group (how a stop asks the worker to end), while
    /// the group is the worker's.
    pub fn signal_group(&self, signal: libc::c_int) {
        self.leader.signal_group(signal);
    }

    /// SIGKILL to all of it.
    pub fn kill(&self) {
        match &self.cgroup {
            Some(cgroup) => {
                let _ = cgroup.kill();
            }
            None => {
                self.leader.signal_group(libc::SIGKILL);
            }
        }
    }

    /// After the leader's exit (and before it is reaped): kills what it left, and returns
    /// once nothing is left (as far as the daemon can tell).
    pub async fn end(&self) {
        match &self.cgroup {
            Some(cgroup) => cgroup.kill_and_remove().await,
            None => {
                self.leader.signal_group(libc::SIGKILL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    /// The leader's exit is seen without reaping it, so its group is killed while its pid
    /// (the group's id) is still held; once marked reaped, nothing is signalled through it.
    #[tokio::test]
    async fn a_group_is_killed_before_its_leader_is_reaped_and_never_after() {
        let left = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 1000 & echo $! > \"$0\"; exit 0"])
            .arg(left.path());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = tokio::process::Command::from(cmd).spawn().unwrap();
        let pid = child.id().unwrap();
        let tree = Tree::new(Leader::new(pid as i32), None);
        tree.leader().exited().await;
        assert_eq!(
            state(pid),
            Some('Z'),
            "exited, and not reaped: the pid is still ours"
        );
        let sleeper: u32 = loop {
            match std::fs::read_to_string(left.path()).unwrap().trim().parse() {
                Ok(pid) => break pid,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        assert_ne!(state(sleeper), None, "what the leader left is running");
        tree.end().await;
        tree.leader().mark_reaped();
        let status = child.wait().await.unwrap();
        assert!(status.success());
        // The sleeper was the shell's child: once killed it is reparented and reaped.
        for _ in 0..500 {
            if matches!(state(sleeper), None | Some('Z')) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(state(sleeper), None | Some('Z')), "the group was killed");
        assert!(
            !tree.leader().signal_group(libc::SIGKILL),
            "a reaped leader's group is never signalled"
        );
    }
}
