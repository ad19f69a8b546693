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
//! end with its first process).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
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

/// How a worker's tree is reached.
#[derive(Debug)]
pub enum Tree {
    Cgroup(WorkerCgroup),
    /// Its process group (the leader's pid).
    Group(i32),
}

impl Tree {
    /// SIGKILL to all of it.
    pub fn kill(&self) {
        match self {
            Tree::Cgroup(cgroup) => {
                let _ = cgroup.kill();
            }
            Tree::Group(pgid) => {
                let _ = crate::sys::kill_group(*pgid, libc::SIGKILL);
            }
        }
    }

    /// After the leader's exit: kills what it left, and returns once nothing is left
    /// (as far as the daemon can tell).
    pub async fn end(&self) {
        match self {
            Tree::Cgroup(cgroup) => cgroup.kill_and_remove().await,
            Tree::Group(pgid) => {
                let _ = crate::sys::kill_group(*pgid, libc::SIGKILL);
            }
        }
    }
}
