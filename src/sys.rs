//! The few system calls renv makes beyond `std`, as safe functions.
//!
//! This is the only module allowed `unsafe` (the crate root denies it). Most wrappers are
//! plain rustix calls and need none; what is left is what rustix does not offer
//! (`sync_file_range`, querying a signal's disposition) and `pre_exec` (changing a child's
//! identity between fork and exec), each with its reason.

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::Mode;
use rustix::process::{Pid, Signal};

/// The effective user id of this process.
pub fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The effective group id of this process.
pub fn getegid() -> u32 {
    rustix::process::getegid().as_raw()
}

/// Runs `f` with the process's umask set to `mask`, then puts the previous one back.
///
/// The umask is process-wide: only call this while nothing else creates files.
pub fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
    let previous = rustix::process::umask(Mode::from_raw_mode(mask));
    let result = f();
    rustix::process::umask(previous);
    result
}

/// The process's umask, read once from `/proc/self/status` (reading it through umask(2)
/// means setting it, a race with every thread creating files); `None` where the kernel
/// does not show it. [`with_umask`]'s callers create no files meanwhile, so the value
/// read outside one holds.
pub fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

/// Whether `path` is on a filesystem that keeps nothing across a reboot (tmpfs, ramfs):
/// syncing files there writes nothing anywhere, so it is skipped.
pub fn is_volatile_fs(path: &std::path::Path) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    rustix::fs::statfs(path).is_ok_and(|fs| {
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let kind = fs.f_type as u64;
        kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
    })
}

fn invalid() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn signal(raw: libc::c_int) -> io::Result<Signal> {
    Signal::from_named_raw(raw).ok_or_else(invalid)
}

/// A positive process id (`Pid::from_raw` must not see a negative one).
fn pid(raw: i32) -> io::Result<Pid> {
    if raw > 0 {
        Pid::from_raw(raw).ok_or_else(invalid)
    } else {
        Err(invalid())
    }
}

/// `kill(pid, signal)`: sends `signal` to one process.
pub fn kill(process: i32, sig: libc::c_int) -> io::Result<()> {
    Ok(rustix::process::kill_process(pid(process)?, signal(sig)?)?)
}

/// `kill(-pgid, signal)`: sends `signal` to every process of the group `pgid`.
///
/// `pgid` must be a real group leader's id: 0 and negative ids are refused, and so is 1,
/// for which `kill(-1, …)` would signal every process this user may signal.
pub fn kill_group(pgid: i32, sig: libc::c_int) -> io::Result<()> {
    let group = pid(pgid)?;
    if group.is_init() {
        return Err(invalid());
    }
    Ok(rustix::process::kill_process_group(group, signal(sig)?)?)
}

/// Makes `cmd`'s child run as `uid`, `gid` and exactly the supplementary `groups`, set in
/// the child between fork and exec: groups first, then the gid, then the uid (after which
/// nothing else could be changed), so nothing of this process's identity is left. Needs
/// root; as another user the child fails to start (`EPERM`).
pub fn run_as(cmd: &mut std::process::Command, uid: u32, gid: u32, groups: &[u32]) {
    use rustix::process::{Gid, Uid};
    use rustix::thread::{set_thread_gid, set_thread_groups, set_thread_uid};
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed: it makes three raw system calls (rustix's thread
    // calls, the kernel's per-thread setgroups/setgid/setuid — the child has one thread) on
    // values prepared before the fork, and allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            set_thread_groups(&groups)?;
            set_thread_gid(gid)?;
            set_thread_uid(uid)?;
            Ok(())
        });
    }
}

/// Kills every process of the user `uid` (primary group `gid`), as Nix kills a build
/// user's leftovers: a child made that user sends SIGKILL to all the processes it may
/// signal (`kill(-1)`), which are exactly that user's, itself excepted. Only for a user
/// nothing else runs as. Needs root.
pub fn kill_all_of(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: between fork and _exit the child (one thread) calls only async-signal-safe
    // functions (setgroups, setresgid, setresuid, kill, _exit) on values it already has,
    // as a multithreaded parent's child must; the parent waits for that pid only.
    unsafe {
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                let became = libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(gid, gid, gid) == 0
                    && libc::setresuid(uid, uid, uid) == 0;
                if became {
                    // Again until nothing is left to signal, or a few rounds: one
                    // caught mid-fork may leave a child the first pass missed (killed
                    // processes stay signalable as zombies until reaped, so the count
                    // of rounds is what ends this).
                    let pause = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 1_000_000,
                    };
                    for _ in 0..10 {
                        if libc::kill(-1, libc::SIGKILL) == -1 {
                            break;
                        }
                        libc::nanosleep(&pause, std::ptr::null_mut());
                    }
                }
                libc::_exit(if became { 0 } else { 1 });
            }
            child => {
                let mut status = 0;
                while libc::waitpid(child, &mut status, 0) == -1 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                match libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                    true => Ok(()),
                    false => Err(io::Error::other(format!(
                        "could not become uid {uid} to kill its processes"
                    ))),
                }
            }
        }
    }
}

/// A user's entry in `/etc/passwd`.
#[derive(Debug, Clone)]
pub struct Passwd {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// The first `/etc/passwd` entry `matches` accepts.
pub fn passwd_entry(matches: impl Fn(&Passwd) -> bool) -> Option<Passwd> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    // name:password:uid:gid:gecos:home:shell
    passwd
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() == 7).then(|| {
                Some(Passwd {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                    shell: f[6].to_string(),
                })
            })?
        })
        .find(|entry| matches(entry))
}

/// Whether `/etc/group` lists the user `name` as a member of the group `gid`.
pub fn group_has_member(gid: u32, name: &str) -> bool {
    let Ok(groups) = std::fs::read_to_string("/etc/group") else {
        return false;
    };
    // name:password:gid:member,member
    groups.lines().any(|line| {
        let f: Vec<&str> = line.split(':').collect();
        f.len() == 4 && f[2].parse::<u32>() == Ok(gid) && f[3].split(',').any(|m| m == name)
    })
}

/// Lets `cmd`'s child inherit `fds`, which stay close-on-exec in this process (so no
/// other child, started meanwhile by another thread, gets them): their flag is cleared in
/// the child between fork and exec. They are closed here when `cmd` is dropped.
pub fn inherit_in_child(cmd: &mut std::process::Command, fds: Vec<OwnedFd>) {
    // SAFETY: the closure runs in the forked child before exec and makes one raw fcntl(2)
    // per descriptor, all opened before the fork; it allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for fd in &fds {
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

/// Makes `cmd`'s child the leader of a new session (and process group) with no
/// controlling terminal, between fork and exec.
pub fn new_session(cmd: &mut std::process::Command) {
    // SAFETY: the closure runs in the forked child before exec and makes one raw
    // setsid(2); it allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            rustix::process::setsid()?;
            Ok(())
        });
    }
}

/// Makes `cmd`'s child move itself into the cgroup whose `cgroup.procs` is open as
/// `procs`, between fork and exec (before any identity change: the file is the daemon's),
/// so nothing the child ever starts runs outside it.
pub fn join_cgroup(cmd: &mut std::process::Command, procs: File) {
    // SAFETY: the closure runs in the forked child before exec and makes one raw write(2)
    // to a descriptor opened before the fork (close-on-exec, so the program never sees
    // it); it allocates nothing.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            rustix::io::write(&procs, b"0")?;
            Ok(())
        });
    }
}

/// Grants the users `uids` and the groups `gids` read and write access to `path` through
/// its POSIX access ACL, the owner keeping read and write and everyone else nothing. For a
/// socket, write access is what `connect` needs.
pub fn grant_read_write(path: &std::path::Path, uids: &[u32], gids: &[u32]) -> io::Result<()> {
    grant_access(path, 0o6, 0o6, uids, gids)
}

/// Sets `path`'s POSIX access ACL (`system.posix_acl_access`): the owner gets the
/// permission bits `owner`, the users `uids` and groups `gids` get `named`, the owning
/// group and everyone else nothing.
pub fn grant_access(
    path: &std::path::Path,
    owner: u16,
    named: u16,
    uids: &[u32],
    gids: &[u32],
) -> io::Result<()> {
    // The kernel's xattr form of an ACL: a version, then (tag, permissions, id) entries,
    // sorted by tag and then by id.
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const NO_ID: u32 = u32::MAX;
    let mut value = VERSION.to_le_bytes().to_vec();
    let mut entry = |tag: u16, perm: u16, id: u32| {
        value.extend_from_slice(&tag.to_le_bytes());
        value.extend_from_slice(&perm.to_le_bytes());
        value.extend_from_slice(&id.to_le_bytes());
    };
    let sorted = |ids: &[u32]| {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    entry(USER_OBJ, owner, NO_ID);
    for uid in sorted(uids) {
        entry(USER, named, uid);
    }
    entry(GROUP_OBJ, 0, NO_ID);
    for gid in sorted(gids) {
        entry(GROUP, named, gid);
    }
    entry(MASK, named, NO_ID);
    entry(OTHER, 0, NO_ID);
    Ok(rustix::fs::setxattr(
        path,
        "system.posix_acl_access",
        &value,
        rustix::fs::XattrFlags::empty(),
    )?)
}

/// Starts writing `file`'s dirty pages to disk without waiting for them
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file). Failure is ignored: a
/// later fsync does the work anyway.
pub fn start_writeback(file: &File) {
    // SAFETY: sync_file_range takes no pointers; it only reads the descriptor, which
    // `file` keeps open for the duration of the call. rustix has no binding for it.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Whether `sig`'s disposition in this process is "ignore" (`SIG_IGN`), as `nohup` or a
/// shell's background job leaves SIGHUP or SIGINT. Such a disposition is inherited across
/// exec, a handler is not.
pub fn is_ignored(sig: libc::c_int) -> bool {
    // SAFETY: all-zero is a valid `sigaction`; with a null new action, sigaction(2) changes
    // nothing and only writes the current disposition into `old`, a valid local.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// When the process `pid` started, in clock ticks after boot (`/proc/<pid>/stat` field
/// 22): with the pid, it names that process and no later one that gets the same pid.
pub fn start_time(pid: u32) -> Option<u64> {
    Some(ProcStat::read(pid)?.start_time)
}

/// Opening a directory to work beneath it: never through a symlink, never inherited.
pub const DIR_NO_FOLLOW: rustix::fs::OFlags = rustix::fs::OFlags::DIRECTORY
    .union(rustix::fs::OFlags::NOFOLLOW)
    .union(rustix::fs::OFlags::RDONLY)
    .union(rustix::fs::OFlags::CLOEXEC);

/// The fields of `/proc/<pid>/stat` renv looks at, from one read.
pub struct ProcStat {
    /// Field 3: `R`, `S`, … `Z` (zombie), `X` (dead).
    pub state: char,
    /// Field 22 (see [`start_time`]).
    pub start_time: u64,
}

impl ProcStat {
    pub fn read(pid: u32) -> Option<ProcStat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count from its end.
        let after_name = stat.rsplit_once(") ")?.1;
        Some(ProcStat {
            state: after_name.chars().next()?,
            start_time: after_name.split(' ').nth(19)?.parse().ok()?,
        })
    }
}

/// A descriptor naming the process `process` (`pidfd_open`): signals sent through it
/// reach that process or nobody, never a later one given the same pid.
pub fn pidfd_open(process: u32) -> io::Result<OwnedFd> {
    Ok(rustix::process::pidfd_open(
        pid(process as i32)?,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// `signal` to the process `pidfd` names.
pub fn pidfd_signal(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, signal(sig)?)?)
}

/// Returns once the process `pidfd` names has exited (a pidfd polls readable then).
pub async fn pidfd_exited(pidfd: OwnedFd) {
    // SAFETY: the AsyncFd owns the descriptor, so it stays open, and the same one, for
    // as long as it is registered.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    if let Ok(fd) = registered {
        let _ = fd.readable().await;
    }
}

/// The supplementary groups a Unix socket's peer had when it connected
/// (`SO_PEERGROUPS`, Linux 4.13): like `SO_PEERCRED`, fixed at connect time, so nothing
/// the peer (or a process given its pid later) does afterwards changes them.
pub fn peer_groups(socket: &impl AsRawFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of initialized `gid_t`s that outlive the call;
        // the kernel writes at most `len` bytes and says in `len` how many it wrote (or,
        // with ERANGE, how many it needs).
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) || count <= groups.len() {
            return Err(error);
        }
        groups.resize(count, 0);
    }
}

/// The nice value of the calling thread (on Linux, `PRIO_PROCESS` with pid 0 is the thread).
pub fn thread_nice() -> io::Result<i32> {
    Ok(rustix::process::getpriority_process(None)?)
}

/// Sets the calling thread's nice value (lowering it needs root); what it starts from
/// now on inherits it.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    Ok(rustix::process::setpriority_process(None, nice)?)
}

/// Sets the nice value of the process `process` (its main thread, on Linux).
pub fn set_process_nice(process: u32, nice: i32) -> io::Result<()> {
    Ok(rustix::process::setpriority_process(
        Some(pid(process as i32)?),
        nice,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_umask_is_read_as_the_kernel_shows_it() {
        // A child reports its own, inherited from this process.
        let shown = std::process::Command::new("sh")
            .args(["-c", "umask"])
            .output()
            .unwrap();
        let shown = u32::from_str_radix(String::from_utf8_lossy(&shown.stdout).trim(), 8).unwrap();
        assert_eq!(umask(), Some(shown));
    }

    #[test]
    fn only_memory_filesystems_are_volatile() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let tmpfs = mounts.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(2) == Some(&"tmpfs")).then(|| fields[1].to_string())
        });
        if let Some(tmpfs) = tmpfs {
            assert!(is_volatile_fs(std::path::Path::new(&tmpfs)), "{tmpfs}");
        }
        assert!(!is_volatile_fs(std::path::Path::new("/proc")));
        assert!(!is_volatile_fs(std::path::Path::new("/no/such/path")));
    }

    #[test]
    fn only_the_child_given_a_descriptor_inherits_it() {
        let file = tempfile::tempfile().unwrap();
        let fd: OwnedFd = file.try_clone().unwrap().into();
        let n = fd.as_raw_fd();
        assert!(
            rustix::io::fcntl_getfd(&fd)
                .unwrap()
                .contains(rustix::io::FdFlags::CLOEXEC)
        );
        let has_it = |cmd: &mut std::process::Command| {
            cmd.args(["-c", &format!("test -e /proc/self/fd/{n}")])
                .status()
                .unwrap()
                .success()
        };
        let mut other = std::process::Command::new("sh");
        assert!(!has_it(&mut other), "close-on-exec here");
        let mut given = std::process::Command::new("sh");
        inherit_in_child(&mut given, vec![fd]);
        assert!(has_it(&mut given), "inherited by the child it was given to");
    }

    #[test]
    fn bad_targets_are_refused() {
        for pgid in [-5, 0, 1] {
            let err = kill_group(pgid, libc::SIGTERM).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "pgid {pgid}");
        }
        assert!(kill(0, libc::SIGTERM).is_err());
        assert!(
            kill(std::process::id() as i32, 0).is_err(),
            "0 is not a named signal"
        );
    }

    #[test]
    fn geteuid_matches_metadata_of_a_new_file() {
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile().unwrap();
        assert_eq!(file.metadata().unwrap().uid(), geteuid());
    }

    #[test]
    fn a_default_disposition_is_not_ignored() {
        // Nothing in the test harness touches SIGUSR2.
        assert!(!is_ignored(libc::SIGUSR2));
    }
}
