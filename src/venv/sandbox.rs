//! Running an installer step as untrusted work: an allowlisted environment (the request's
//! `env_vars` are for the worker, not the installer, and no `PIP_*`/`UV_*` from outside
//! leaks in), a private `HOME` and `TMPDIR` so no user config is read, stdin closed, a
//! neutral cwd, its own process group, all output to the build log, and a deadline at
//! which the whole group is killed. With a [`BuildUser`], every step runs as that
//! unprivileged user (an sdist's build code is anyone's code), and when the build is over
//! everything that user still runs is killed ([`BuildSlot`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::VenvError;
use crate::store::{LockFile, LockMode, LockName, Store};

/// Variables passed through from renv's own environment: where to find programs, and the
/// node's network configuration (proxies, CA bundles). Nothing else.
const PASSED_THROUGH: [&str; 12] = [
    "PATH",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "SOURCE_DATE_EPOCH",
];

/// How many lines of a failed step's output go into the error message.
pub const TAIL_LINES: usize = 40;

/// An unprivileged user installers run as when renv runs as root (`--build-user`), as
/// Nix's `nixbld`: what it makes becomes the store owner's only once the store has
/// checked and sealed it, and nothing else on the node may run as it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildUser {
    pub uid: u32,
    pub gid: u32,
}

/// The build user's, for one build at a time on this node (the store's lock
/// `build-user-<uid>`), with the wheel cache of the user the build is for lent to it.
///
/// Whatever runs as the build user (an sdist's build code, a `.pth` an installed wheel
/// brought) can rewrite that cache, so each caller's builds have their own
/// (`uv-cache-<build uid>-for-<caller>`), root's and 0700 except while one of that
/// caller's builds runs: one tenant's build can never reach another's cache. When the
/// build is over every process of the build user is killed, so no leftover reaches into
/// the next build, the cache it was lent, or what the store is sealing; then the cache is
/// taken back.
pub struct BuildSlot {
    user: BuildUser,
    cache: PathBuf,
    _lock: LockFile,
}

impl BuildSlot {
    pub fn take(store: &Store, user: BuildUser, caller: u32) -> Result<BuildSlot, VenvError> {
        let lock = store.lock(LockName::BuildUser(user.uid), LockMode::Exclusive)?;
        // Whatever still runs as the build user (a daemon killed mid-build never ran
        // its slot's drop) goes before a cache is lent to it.
        crate::sys::kill_all_of(user.uid, user.gid)?;
        let cache = store.layout().uv_cache_dir_of_build(user.uid, caller);
        match std::fs::DirBuilder::new().mode(0o700).create(&cache) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e.into()),
            _ => {}
        }
        let slot = BuildSlot {
            user,
            cache,
            _lock: lock,
        };
        hand_over(&slot.cache, user.uid, user.gid)?;
        Ok(slot)
    }

    pub fn user(&self) -> BuildUser {
        self.user
    }

    /// The wheel cache lent to this build.
    pub fn cache(&self) -> &Path {
        &self.cache
    }
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        if let Err(e) = crate::sys::kill_all_of(self.user.uid, self.user.gid) {
            tracing::warn!(uid = self.user.uid, error = %e, "could not kill the build user's processes");
        }
        if let Err(e) = hand_over(&self.cache, crate::sys::geteuid(), crate::sys::getegid()) {
            tracing::warn!(cache = %self.cache.display(), error = %e, "could not take the wheel cache back");
        }
    }
}

/// Gives the directory `dir` (never a symlink's target) to `uid`:`gid`, 0700.
fn hand_over(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// Takes the staging dir `work` and everything in it back from the build user, once its
/// processes are gone: from here on no one but renv can change the tree it checks,
/// relocates, records and seals.
///
/// Killing the build user's processes is not enough: one may have passed a descriptor to
/// another user's process. So, through descriptors that never follow a symlink, every
/// directory is made root's and 0700 before renv looks inside it (a directory's
/// permissions are checked on every change, so a descriptor held elsewhere can no longer
/// add, remove or rename anything in it), and every file of the build user is replaced by
/// a copy of its own (a file's are checked only at open, so the old inode, which someone
/// may hold open for writing, is left to them, out of the tree).
pub fn reclaim(work: &Path) -> std::io::Result<()> {
    take(work, None)
}

/// [`reclaim`], noting the mode (`0o7777` bits) every directory and regular file below
/// `work` had before it was taken: what the build made, which taking it changes (a venv
/// template records it).
pub fn reclaim_noting_modes(work: &Path) -> std::io::Result<HashMap<PathBuf, u32>> {
    let mut modes = HashMap::new();
    take(work, Some(&mut modes))?;
    Ok(modes)
}

fn take(work: &Path, modes: Option<&mut HashMap<PathBuf, u32>>) -> std::io::Result<()> {
    use rustix::fs::Mode;
    let root = rustix::fs::open(work, crate::sys::DIR_NO_FOLLOW, Mode::empty())
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", work.display())))?;
    take_dir(&root, work, 0, modes)
}

/// Deeper than this, a build's output is refused rather than walked.
const MAX_DEPTH: usize = 256;

fn take_dir(
    dir: &std::os::fd::OwnedFd,
    path: &Path,
    depth: usize,
    mut modes: Option<&mut HashMap<PathBuf, u32>>,
) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode};
    let (me, my_group) = (
        rustix::process::Uid::from_raw(crate::sys::geteuid()),
        rustix::process::Gid::from_raw(crate::sys::getegid()),
    );
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "{}: nested too deep",
            path.display()
        )));
    }
    if let Some(modes) = modes.as_deref_mut() {
        modes.insert(path.to_path_buf(), rustix::fs::fstat(dir)?.st_mode & 0o7777);
    }
    rustix::fs::fchown(dir, Some(me), Some(my_group))?;
    rustix::fs::fchmod(dir, Mode::from_raw_mode(0o700))?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    for name in names {
        let shown = || path.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let stat = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => {
                let child = rustix::fs::openat(dir, &name, crate::sys::DIR_NO_FOLLOW, Mode::empty())?;
                take_dir(&child, &shown(), depth + 1, modes.as_deref_mut())?;
            }
            FileType::RegularFile => {
                if let Some(modes) = modes.as_deref_mut() {
                    modes.insert(shown(), stat.st_mode & 0o7777);
                }
                if stat.st_uid != me.as_raw() {
                    replace_with_copy(dir, &name, stat.st_mode & 0o755)
                        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", shown().display())))?;
                }
            }
            FileType::Symlink => {
                rustix::fs::chownat(dir, &name, Some(me), Some(my_group), AtFlags::SYMLINK_NOFOLLOW)?;
            }
            _ => {
                return Err(std::io::Error::other(format!(
                    "{}: not a regular file, directory or symlink",
                    shown().display()
                )));
            }
        }
    }
    Ok(())
}

/// Replaces the file `name` in `dir` by a copy that is renv's (a new inode, `mode`).
fn replace_with_copy(dir: &std::os::fd::OwnedFd, name: &std::ffi::CStr, mode: u32) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let source = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let temp = format!(
        ".renv-own-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let target = rustix::fs::openat(
        dir,
        temp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    std::io::copy(&mut std::fs::File::from(source), &mut std::fs::File::from(target))?;
    rustix::fs::renameat(dir, temp.as_str(), dir, name)?;
    Ok(())
}

pub struct Sandbox {
    home: PathBuf,
    tmp: PathBuf,
    log: File,
    log_path: PathBuf,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    user: Option<BuildUser>,
}

impl Sandbox {
    /// A sandbox whose scratch dirs live in `work` and whose output goes to `log_path`.
    /// `timeout` bounds every step run in it, together. With a build `user`, `work` and
    /// the scratch dirs become that user's (the installer writes the env under `work`);
    /// the log stays renv's (the steps get it as their output, already open).
    pub fn new(
        work: &Path,
        log_path: PathBuf,
        timeout: Option<Duration>,
        user: Option<BuildUser>,
    ) -> Result<Sandbox, VenvError> {
        let home = work.join("home");
        let tmp = work.join("tmp");
        fs_err::create_dir_all(&home)?;
        fs_err::create_dir_all(&tmp)?;
        for dir in [work, &home, &tmp] {
            lend(dir, user)?;
        }
        // Build logs are the store owner's: they show what was asked for and how.
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", log_path.display())))?;
        Ok(Sandbox {
            home,
            tmp,
            log,
            log_path,
            deadline: timeout.map(|t| Instant::now() + t),
            timeout,
            user,
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Who the steps run as (`None`: renv's own user).
    pub fn user(&self) -> Option<BuildUser> {
        self.user
    }

    /// Gives `dir` to the build user, as the build's own work dir is given to it, for a
    /// step that writes elsewhere (a venv template). Nothing without a build user.
    pub fn lend(&self, dir: &Path) -> std::io::Result<()> {
        lend(dir, self.user)
    }

    /// A line of renv's own in the build log (`# …`): what it did instead of a step.
    pub fn note(&mut self, line: &str) -> std::io::Result<()> {
        use std::io::Write;
        writeln!(self.log, "# {line}")
    }

    /// Runs one step; `step` names it in errors (`uv pip install`).
    pub fn run(
        &mut self,
        step: &str,
        program: &Path,
        args: &[&OsStr],
        env: &[(&str, &OsStr)],
    ) -> Result<(), VenvError> {
        use std::io::Write;
        writeln!(self.log, "$ {} {}", program.display(), shell_words(args))?;
        let log_start = self.log.stream_position()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("HOME", &self.home)
            .env("TMPDIR", &self.tmp)
            .env("LC_ALL", "C.UTF-8")
            .env("LANG", "C.UTF-8")
            .current_dir(&self.tmp)
            .stdin(Stdio::null())
            .stdout(self.log.try_clone()?)
            .stderr(self.log.try_clone()?)
            .process_group(0);
        for name in PASSED_THROUGH {
            if let Some(value) = std::env::var_os(name) {
                cmd.env(name, value);
            }
        }
        for (name, value) in env {
            cmd.env(name, value);
        }
        if let Some(user) = self.user {
            crate::sys::run_as(&mut cmd, user.uid, user.gid, &[]);
        }
        let started = Instant::now();
        let child = cmd.spawn().map_err(|e| VenvError::Spawn {
            program: program.to_path_buf(),
            source: e,
        })?;
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let mut child = child;
            let _ = tx.send(child.wait());
        });
        let remaining = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let status = match remaining {
            Some(left) => rx.recv_timeout(left).ok(),
            None => rx.recv().ok(),
        };
        let status = match status {
            Some(status) => status?,
            None => {
                // The deadline: the whole group goes, grandchildren included. (The child
                // is not reaped yet, so its pid still names this group.)
                kill_group(pid);
                let _ = waiter.join();
                return Err(VenvError::Timeout {
                    step: step.to_string(),
                    secs: self.timeout.map_or(0, |t| t.as_secs()),
                    log: self.log_path.clone(),
                });
            }
        };
        let _ = waiter.join();
        writeln!(self.log, "# {status} after {} ms", started.elapsed().as_millis())?;
        if status.success() {
            return Ok(());
        }
        Err(VenvError::Failed {
            step: step.to_string(),
            status: status
                .code()
                .map_or_else(|| format!("{status}"), |c| format!("exit status {c}")),
            tail: self.tail_since(log_start)?,
            log: self.log_path.clone(),
        })
    }

    /// The last lines this step wrote to the log.
    fn tail_since(&mut self, start: u64) -> std::io::Result<String> {
        const WINDOW: u64 = 256 << 10;
        let mut file = fs_err::File::open(&self.log_path)?;
        let end = file.metadata()?.len();
        file.seek(SeekFrom::Start(start.max(end.saturating_sub(WINDOW))))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        Ok(lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n"))
    }
}

/// The build user's alone while it builds: no other user (an allowed caller reaches
/// `staging/` through the store's ACL) may look in, or hold a descriptor inside, to race
/// what root does with the tree afterwards.
fn lend(dir: &Path, user: Option<BuildUser>) -> std::io::Result<()> {
    if let Some(user) = user {
        std::os::unix::fs::lchown(dir, Some(user.uid), Some(user.gid))?;
        fs_err::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    Ok(())
}

fn kill_group(pid: i32) {
    // A process group we created; ESRCH (already gone) is fine.
    let _ = crate::sys::kill_group(pid, libc::SIGKILL);
}

fn shell_words(args: &[&OsStr]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
