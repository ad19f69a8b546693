//! Venv templates: `uv venv` run once for each uv, interpreter and set of options, and
//! what it made copied into every new env after that.
//!
//! `uv venv --relocatable` writes the same tree wherever the venv is (its scripts find
//! their venv when they run; `bin/python` points at the interpreter, not into the venv),
//! so the tree one run made is the tree any later run would make. Starting uv to write it
//! costs 15–20 ms of a warm env's build; copying its dozen small files costs well under
//! one.
//!
//! ```text
//! templates/<key>/     published by rename once complete, then read-only
//!   record.json        every path below entry/: its kind, the mode `uv venv` gave it,
//!                      a file's size and blake3, a symlink's target
//!   entry/             the tree `uv venv` made, sealed: the store owner's, no write bits
//! ```
//!
//! - **The key** is the digest of a [`Description`]: the uv binary (path, version, and its
//!   stat, so one replaced in place is noticed), the interpreter (its real path, what the
//!   probe knows of it — version, implementation — and its stat, so an interpreter
//!   upgraded in place at the same path never reuses an old template), whether the env
//!   sees system site-packages, and the umask (which decides the modes uv gives). The env
//!   key does not change: a template is how an env is built, not what it holds.
//! - **Making one**, under `locks/template-<key>.lock` (exclusive; a waiter stops waiting
//!   as soon as the template appears): the very `uv venv` a build would run, through the
//!   build's own [`Sandbox`] (its deadline, its log, its build user when there is one),
//!   into a fresh staging dir lent to that user. The tree is then taken back
//!   ([`sandbox::reclaim_noting_modes`]: what taking it changes, its modes, are noted as
//!   they were made) and checked through descriptors that never follow a symlink:
//!   directories, regular files and symlinks only, all the store owner's, no file with a
//!   second link (sealing it would change it elsewhere), no setuid, setgid or sticky bit,
//!   and nothing that names the place it was made (a tree that does cannot be copied
//!   elsewhere). Every file and directory is made read-only and durable (fsync, except on
//!   tmpfs), the record
//!   written, and the whole renamed into `templates/`. Until that rename it is a staging
//!   dir like any build's, swept if its maker dies: a half-made template is never used.
//! - **Using one** takes no lock (a published template never changes): the record drives
//!   the copy. Every file is opened without following a symlink and must be the store
//!   owner's, read-only, of the recorded size and blake3; every symlink must have its
//!   recorded target. Directories are created, files written with their recorded modes,
//!   symlinks made with the same targets, each given to the build user when there is one,
//!   as `uv venv` run as that user would have left it: the installer steps after it write
//!   into the env.
//! - **Fallback**: a template that cannot be made or used for a reason of its own (a store
//!   error, a failed check) never fails a build: the build log and renv's log say why, and
//!   `uv venv` runs into the env as it did before templates. One that fails its checks
//!   when used is discarded (under its lock), so the next build makes it again. A failure
//!   of `uv venv` itself while making a template is the build's own error: running it
//!   again would fail the same way, and take the deadline twice.
//! - **Prune** never removes templates: they hold a few kilobytes for each uv, interpreter
//!   and set of options the node has built with, and a build copying one can never see it
//!   vanish.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::interpreter::Interpreter;
use super::sandbox::{self, BuildUser, Sandbox};
use super::{VenvError, VenvPlan};
use crate::digest::Digest;
use crate::package::hash_cache::StatKey;
use crate::store::record::Recorded;
use crate::store::{LockFile, LockMode, LockName, Store};
use crate::sys::DIR_NO_FOLLOW;

/// The version of a template's description and format; bump it when either changes.
const VERSION: u32 = 1;

/// The record's name in a template's directory.
const RECORD: &str = "record.json";

/// The tree's name in a template's directory: `entry`, as in a build's staging dir, so
/// `uv venv` sees a venv of the same name whichever it writes.
const TREE: &str = "entry";

/// What a template may hold, at most: a venv skeleton is a few dozen entries and tens of
/// kilobytes; a tree past these is no skeleton to copy into every env.
const MAX_ENTRIES: usize = 1024;
const MAX_BYTES: u64 = 4 << 20;
const MAX_DEPTH: usize = 32;
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// What decides a template's contents; its key is the digest of its JSON encoding.
#[derive(Debug, Serialize)]
pub struct Description<'a> {
    pub version: u32,
    pub uv: Binary<'a>,
    pub python: Binary<'a>,
    pub implementation: &'a str,
    pub system_site_packages: bool,
    /// The modes `uv venv` gives are what its umask leaves (`None`: unknown).
    pub umask: Option<u32>,
}

/// A program as a template's key sees it: where, which version, and its stat (a binary
/// replaced in place has a new one, whatever its version says).
#[derive(Debug, Serialize)]
pub struct Binary<'a> {
    pub path: &'a Path,
    pub version: &'a str,
    pub stat: StatKey,
}

impl Description<'_> {
    pub fn key(&self) -> Digest {
        Digest::of(&serde_json::to_vec(self).expect("a template description serializes"))
    }
}

/// The key of the template `uv venv` would make for `python` with this uv and options,
/// as they are on disk now.
pub fn key(
    uv: &Path,
    uv_version: &str,
    python: &Interpreter,
    system_site_packages: bool,
) -> std::io::Result<Digest> {
    Ok(Description {
        version: VERSION,
        uv: Binary {
            path: uv,
            version: uv_version,
            stat: StatKey::of(&fs_err::metadata(uv)?),
        },
        python: Binary {
            path: &python.path,
            version: &python.version,
            stat: StatKey::of(&fs_err::metadata(&python.path)?),
        },
        implementation: &python.implementation,
        system_site_packages,
        umask: crate::sys::umask(),
    }
    .key())
}

/// `record.json`: what a template holds, as `uv venv` left it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    version: u32,
    /// The mode of the venv's own directory.
    mode: u32,
    /// Every path below it, `/`-separated. A map's order puts a directory before what is
    /// in it (its path is a prefix of theirs).
    paths: BTreeMap<String, Recorded>,
}

/// Why a template was not used.
#[derive(Debug)]
enum Failure {
    /// `uv venv` failed while making it: the build's own error.
    Build(VenvError),
    /// The template is not what it was made as (or not a template at all): discard it.
    Unsound {
        reason: String,
        found: Option<(u64, u64)>,
    },
    /// It could not be made or copied, for a reason that says nothing about it.
    Unusable(String),
}

fn unusable(e: impl std::fmt::Display) -> Failure {
    Failure::Unusable(e.to_string())
}

/// Makes `venv` (a name not yet taken, in the build's staging dir) what `uv venv` would
/// make it: a copy of its template, made first if there is none; or, if the template
/// cannot be made or used, by running `uv venv` into it after all (see the module doc).
pub(super) fn make_venv(
    plan: &VenvPlan,
    uv: &Path,
    venv: &Path,
    store: &Store,
    sandbox: &mut Sandbox,
    env: &[(&str, &OsStr)],
) -> Result<(), VenvError> {
    let uv_version = match &plan.installer {
        super::Installer::Uv { version, .. } => version.as_str(),
        super::Installer::Pip { .. } => unreachable!("templates are for uv-built envs"),
    };
    let reason = match key(uv, uv_version, &plan.python, plan.system_site_packages) {
        Err(e) => format!("cannot tell which template: {e}"),
        Ok(key) => match from_template(key, plan, uv, venv, store, sandbox, env) {
            Ok(()) => return Ok(()),
            Err(Failure::Build(e)) => return Err(e),
            Err(Failure::Unusable(reason)) => reason,
            Err(Failure::Unsound { reason, found }) => {
                discard(store, key, found);
                reason
            }
        },
    };
    tracing::warn!(venv = %venv.display(), %reason, "venv template not used; running uv venv");
    sandbox.note(&format!("venv template not used ({reason}); running uv venv"))?;
    // What a copy that failed half-way left.
    if venv.symlink_metadata().is_ok() {
        crate::store::remove_tree(venv)?;
    }
    super::uv_venv(plan, uv, venv, sandbox, env)
}

/// The template `key`, made if it is missing, copied to `venv`.
fn from_template(
    key: Digest,
    plan: &VenvPlan,
    uv: &Path,
    venv: &Path,
    store: &Store,
    sandbox: &mut Sandbox,
    env: &[(&str, &OsStr)],
) -> Result<(), Failure> {
    ensure(key, plan, uv, store, sandbox, env)?;
    let started = Instant::now();
    copy(&store.layout().template_dir(key), venv, sandbox.user())?;
    let micros = started.elapsed().as_micros();
    sandbox
        .note(&format!("venv copied from template {key} in {micros} µs"))
        .map_err(unusable)
}

/// Makes the template `key` unless it is there, or appears while its lock is awaited.
fn ensure(
    key: Digest,
    plan: &VenvPlan,
    uv: &Path,
    store: &Store,
    sandbox: &mut Sandbox,
    env: &[(&str, &OsStr)],
) -> Result<(), Failure> {
    let dir = store.layout().template_dir(key);
    let made = || dir.symlink_metadata().is_ok();
    if made() {
        return Ok(());
    }
    let lock = LockFile::acquire_unless(
        &store.layout().lock_path(LockName::Template(key)),
        LockMode::Exclusive,
        store.options().lock_timeout,
        || Ok(made().then_some(())),
    )
    .map_err(unusable)?;
    let Ok(_lock) = lock else {
        return Ok(());
    };
    if made() {
        return Ok(());
    }
    make(&dir, plan, uv, store, sandbox, env)
}

/// Runs `uv venv` into a staging dir, checks and seals what it made, and publishes it as
/// `dir`. The caller holds the template's lock.
fn make(
    dir: &Path,
    plan: &VenvPlan,
    uv: &Path,
    store: &Store,
    sandbox: &mut Sandbox,
    env: &[(&str, &OsStr)],
) -> Result<(), Failure> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let staging = store.stage().map_err(unusable)?;
    let top = staging.work_dir().join("template");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&top)
        .map_err(unusable)?;
    sandbox.lend(&top).map_err(unusable)?;
    let tree = top.join(TREE);
    super::uv_venv(plan, uv, &tree, sandbox, env).map_err(Failure::Build)?;
    // The modes the build user's run left, which taking the tree back changes. Nothing
    // but that run (the operator's uv and interpreter) has run as the build user since
    // its slot was taken, and no other user can reach the staging dir.
    let made_modes = match sandbox.user() {
        // From here on only renv can change the tree it checks.
        Some(_) => Some(sandbox::reclaim_noting_modes(&top).map_err(unusable)?),
        None => None,
    };
    let durable = !crate::sys::is_volatile_fs(&top);
    let sealer = Sealer {
        tree: &tree,
        made_at: staging.work_dir().as_os_str().as_bytes(),
        made_modes: made_modes.as_ref(),
        durable,
        paths: BTreeMap::new(),
        bytes: 0,
    };
    let record = sealer
        .seal()
        .map_err(|e| unusable(format!("what uv venv made is no template: {e}")))?;
    let mut file = crate::package::tree::create_file(&top, RECORD, false).map_err(unusable)?;
    file.write_all(&serde_json::to_vec(&record).expect("a record serializes"))
        .map_err(unusable)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o444))
        .map_err(unusable)?;
    let sync = |dir: &Path| match durable {
        true => fs_err::File::open(dir)?.sync_all(),
        false => Ok(()),
    };
    if durable {
        file.sync_data().map_err(unusable)?;
    }
    sync(&top).map_err(unusable)?;
    fs_err::rename(&top, dir).map_err(unusable)?;
    sync(&store.layout().templates_dir()).map_err(unusable)?;
    // Read-only once in place (moving a directory to another parent rewrites its `..`).
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).map_err(unusable)?;
    Ok(())
}

/// Checks a tree `uv venv` made (see the module doc), makes every file and directory in it
/// read-only, and records what it held.
struct Sealer<'a> {
    tree: &'a Path,
    /// The directory it was made in, which no file or link may name.
    made_at: &'a [u8],
    /// The modes it was made with, by path, if they have changed since
    /// ([`sandbox::reclaim_noting_modes`]); else its modes are those.
    made_modes: Option<&'a HashMap<PathBuf, u32>>,
    /// Whether to make it durable too.
    durable: bool,
    paths: BTreeMap<String, Recorded>,
    bytes: u64,
}

impl Sealer<'_> {
    fn seal(mut self) -> std::io::Result<Record> {
        let root = rustix::fs::open(self.tree, DIR_NO_FOLLOW, Mode::empty())?;
        let stat = rustix::fs::fstat(&root)?;
        check_owner(&stat, ".")?;
        let mode = self.made_mode(".", &stat)?;
        self.walk(&root, "", 0)?;
        seal_dir(&root, self.durable)?;
        Ok(Record {
            version: VERSION,
            mode,
            paths: self.paths,
        })
    }

    /// The mode `rel` was made with: no setuid, setgid or sticky bit.
    fn made_mode(&self, rel: &str, stat: &rustix::fs::Stat) -> std::io::Result<u32> {
        let mode = match self.made_modes {
            None => stat.st_mode & 0o7777,
            Some(modes) => *modes
                .get(&match rel {
                    "." => self.tree.to_path_buf(),
                    _ => self.tree.join(rel),
                })
                .ok_or_else(|| refused(rel, "not there when it was taken back"))?,
        };
        if mode & 0o7000 != 0 {
            return Err(refused(rel, "setuid, setgid or sticky"));
        }
        Ok(mode)
    }

    fn walk(&mut self, dir: &OwnedFd, prefix: &str, depth: usize) -> std::io::Result<()> {
        if depth > MAX_DEPTH {
            return Err(refused(prefix, "nested too deep"));
        }
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(entry.file_name().to_owned());
            }
        }
        for name in names {
            let Ok(text) = name.to_str() else {
                return Err(refused(prefix, "a name that is not UTF-8"));
            };
            let rel = match prefix {
                "" => text.to_string(),
                _ => format!("{prefix}/{text}"),
            };
            if self.paths.len() >= MAX_ENTRIES {
                return Err(refused(&rel, "too many entries"));
            }
            let stat = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)?;
            let recorded = match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory => {
                    check_owner(&stat, &rel)?;
                    let mode = self.made_mode(&rel, &stat)?;
                    let child = rustix::fs::openat(dir, &name, DIR_NO_FOLLOW, Mode::empty())?;
                    self.walk(&child, &rel, depth + 1)?;
                    seal_dir(&child, self.durable)?;
                    Recorded::Dir { mode }
                }
                FileType::RegularFile => self.seal_file(dir, &name, &rel)?,
                FileType::Symlink => {
                    check_owner(&stat, &rel)?;
                    let target = rustix::fs::readlinkat(dir, &name, Vec::new())?;
                    if contains(target.to_bytes(), self.made_at) {
                        return Err(refused(&rel, "a symlink to where the venv was made"));
                    }
                    Recorded::Symlink {
                        target: PathBuf::from(OsStr::from_bytes(target.to_bytes())),
                    }
                }
                _ => return Err(refused(&rel, "not a regular file, directory or symlink")),
            };
            self.paths.insert(rel, recorded);
        }
        Ok(())
    }

    fn seal_file(&mut self, dir: &OwnedFd, name: &std::ffi::CStr, rel: &str) -> std::io::Result<Recorded> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        check_owner(&stat, rel)?;
        let mode = self.made_mode(rel, &stat)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(refused(rel, "changed while it was looked at"));
        }
        if stat.st_nlink != 1 {
            return Err(refused(rel, "a file with another link"));
        }
        self.bytes += stat.st_size as u64;
        if self.bytes > MAX_BYTES {
            return Err(refused(rel, "too many bytes"));
        }
        let mut file = std::fs::File::from(fd);
        let mut bytes = Vec::with_capacity(stat.st_size as usize);
        (&mut file).take(MAX_BYTES).read_to_end(&mut bytes)?;
        if contains(&bytes, self.made_at) {
            return Err(refused(rel, "a file that names where the venv was made"));
        }
        rustix::fs::fchmod(&file, Mode::from_raw_mode(mode & 0o555))?;
        if self.durable {
            file.sync_data()?;
        }
        Ok(Recorded::File {
            mode,
            size: bytes.len() as u64,
            blake3: Some(Digest::of(&bytes).to_string()),
        })
    }
}

fn seal_dir(dir: &OwnedFd, durable: bool) -> std::io::Result<()> {
    rustix::fs::fchmod(dir, Mode::from_raw_mode(0o555))?;
    if durable {
        rustix::fs::fsync(dir)?;
    }
    Ok(())
}

/// What `uv venv` made must be the store owner's (the build user's was taken back).
fn check_owner(stat: &rustix::fs::Stat, rel: &str) -> std::io::Result<()> {
    if stat.st_uid != crate::sys::geteuid() {
        return Err(refused(rel, &format!("owned by uid {}", stat.st_uid)));
    }
    Ok(())
}

fn refused(rel: &str, why: &str) -> std::io::Error {
    std::io::Error::other(format!("{rel}: {why}"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Copies the template at `dir` to `venv` (see the module doc), whose parent is the
/// build's staging dir: created, never through a symlink, each entry given to `user`.
fn copy(dir: &Path, venv: &Path, user: Option<BuildUser>) -> Result<(), Failure> {
    let top = match rustix::fs::open(dir, DIR_NO_FOLLOW, Mode::empty()) {
        Ok(top) => top,
        // Discarded since it was found: by another build, which will make it again.
        Err(rustix::io::Errno::NOENT) => return Err(unusable(format!("{}: gone", dir.display()))),
        Err(e) => {
            return Err(Failure::Unsound {
                reason: format!("{}: {e}", dir.display()),
                found: None,
            });
        }
    };
    let stat = rustix::fs::fstat(&top).map_err(unusable)?;
    let found = Some((stat.st_dev, stat.st_ino));
    let unsound = |e: std::io::Error| Failure::Unsound {
        reason: format!("template {}: {e}", dir.display()),
        found,
    };
    let (record, source) = open_template(&top, &stat).map_err(unsound)?;
    let (Some(parent), Some(name)) = (venv.parent(), venv.file_name()) else {
        return Err(unusable(format!("{}: no parent", venv.display())));
    };
    let parent = rustix::fs::open(parent, DIR_NO_FOLLOW, Mode::empty()).map_err(unusable)?;
    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(record.mode)).map_err(unusable)?;
    let target = rustix::fs::openat(&parent, name, DIR_NO_FOLLOW, Mode::empty()).map_err(unusable)?;
    give(&target, user).map_err(unusable)?;
    let mut copier = Copier {
        dirs: HashMap::from([(String::new(), (source, target))]),
        modes: vec![(String::new(), record.mode)],
        user,
    };
    for (rel, recorded) in &record.paths {
        copier.copy(rel, recorded).map_err(|e| match e {
            Side::Template(e) => unsound(std::io::Error::other(format!("{rel}: {e}"))),
            Side::Venv(e) => unusable(format!("{}/{rel}: {e}", venv.display())),
        })?;
    }
    copier
        .set_dir_modes()
        .map_err(|e| unusable(format!("{}: {e}", venv.display())))
}

/// The template's record and its tree, checked to be the store owner's and read-only.
fn open_template(top: &OwnedFd, stat: &rustix::fs::Stat) -> std::io::Result<(Record, OwnedFd)> {
    // Its own mode is not checked: it is made read-only only once renamed into place, and
    // a crash in between leaves it the owner's alone anyway (`templates/` is 0700).
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory || stat.st_uid != crate::sys::geteuid() {
        return Err(refused(".", "not a directory of the store's owner"));
    }
    let fd = rustix::fs::openat(
        top,
        RECORD,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    check_sealed(&rustix::fs::fstat(&fd)?, FileType::RegularFile)
        .map_err(|e| refused(RECORD, &e.to_string()))?;
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_RECORD_BYTES)
        .read_to_end(&mut bytes)?;
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| refused(RECORD, &e.to_string()))?;
    if record.version != VERSION || record.mode & !0o777 != 0 {
        return Err(refused(RECORD, "not a record this renv wrote"));
    }
    let tree = rustix::fs::openat(top, TREE, DIR_NO_FOLLOW, Mode::empty())?;
    check_sealed(&rustix::fs::fstat(&tree)?, FileType::Directory)
        .map_err(|e| refused(TREE, &e.to_string()))?;
    Ok((record, tree))
}

/// A template's file or directory: of `kind`, the store owner's, no write bit (no one
/// else could have put it there, nor change it).
fn check_sealed(stat: &rustix::fs::Stat, kind: FileType) -> std::io::Result<()> {
    if FileType::from_raw_mode(stat.st_mode) != kind {
        return Err(std::io::Error::other("not what the record says"));
    }
    if stat.st_uid != crate::sys::geteuid() {
        return Err(std::io::Error::other(format!("owned by uid {}", stat.st_uid)));
    }
    if stat.st_mode & 0o7222 != 0 {
        return Err(std::io::Error::other("writable"));
    }
    Ok(())
}

/// Which side of a copy failed: the template (it is unsound), or the venv being made.
enum Side {
    Template(std::io::Error),
    Venv(std::io::Error),
}

fn template_side(e: impl Into<std::io::Error>) -> Side {
    Side::Template(e.into())
}

fn venv_side(e: impl Into<std::io::Error>) -> Side {
    Side::Venv(e.into())
}

struct Copier {
    /// Directories copied so far, by path: (the template's, the venv's).
    dirs: HashMap<String, (OwnedFd, OwnedFd)>,
    /// Their modes, set once everything is in them (a mode without the owner's write bit
    /// would stop the copy).
    modes: Vec<(String, u32)>,
    user: Option<BuildUser>,
}

impl Copier {
    fn copy(&mut self, rel: &str, recorded: &Recorded) -> Result<(), Side> {
        let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        if name.is_empty() || name == "." || name == ".." || name.contains('\0') {
            return Err(template_side(std::io::Error::other("not a name")));
        }
        let Some((source, target)) = self.dirs.get(parent) else {
            return Err(template_side(std::io::Error::other(
                "listed before its directory",
            )));
        };
        match recorded {
            Recorded::Dir { mode } => {
                let from =
                    rustix::fs::openat(source, name, DIR_NO_FOLLOW, Mode::empty()).map_err(template_side)?;
                let stat = rustix::fs::fstat(&from).map_err(template_side)?;
                check_sealed(&stat, FileType::Directory).map_err(template_side)?;
                if mode & !0o777 != 0 {
                    return Err(template_side(std::io::Error::other(
                        "a recorded mode with special bits",
                    )));
                }
                rustix::fs::mkdirat(target, name, Mode::from_raw_mode(*mode)).map_err(venv_side)?;
                let to = rustix::fs::openat(target, name, DIR_NO_FOLLOW, Mode::empty()).map_err(venv_side)?;
                give(&to, self.user).map_err(venv_side)?;
                self.dirs.insert(rel.to_string(), (from, to));
                self.modes.push((rel.to_string(), *mode));
            }
            Recorded::File { mode, size, blake3 } => {
                let from = rustix::fs::openat(
                    source,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(template_side)?;
                let stat = rustix::fs::fstat(&from).map_err(template_side)?;
                check_sealed(&stat, FileType::RegularFile).map_err(template_side)?;
                if stat.st_size as u64 != *size || *size > MAX_BYTES || mode & !0o777 != 0 {
                    return Err(template_side(std::io::Error::other(
                        "not the size or mode recorded",
                    )));
                }
                let mut bytes = Vec::with_capacity(*size as usize);
                std::fs::File::from(from)
                    .take(*size)
                    .read_to_end(&mut bytes)
                    .map_err(template_side)?;
                if blake3.as_deref() != Some(Digest::of(&bytes).to_string().as_str()) {
                    return Err(template_side(std::io::Error::other("not the content recorded")));
                }
                let to = rustix::fs::openat(
                    target,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(*mode),
                )
                .map_err(venv_side)?;
                // The umask may have narrowed the mode (see `package::tree::create_file`).
                if crate::sys::umask().is_none_or(|umask| umask & mode != 0) {
                    rustix::fs::fchmod(&to, Mode::from_raw_mode(*mode)).map_err(venv_side)?;
                }
                give(&to, self.user).map_err(venv_side)?;
                std::fs::File::from(to).write_all(&bytes).map_err(venv_side)?;
            }
            Recorded::Symlink { target: link } => {
                let found = rustix::fs::readlinkat(source, name, Vec::new()).map_err(template_side)?;
                if found.to_bytes() != link.as_os_str().as_bytes() {
                    return Err(template_side(std::io::Error::other("not the symlink recorded")));
                }
                rustix::fs::symlinkat(link, target, name).map_err(venv_side)?;
                if let Some(user) = self.user {
                    rustix::fs::chownat(
                        target,
                        name,
                        Some(rustix::process::Uid::from_raw(user.uid)),
                        Some(rustix::process::Gid::from_raw(user.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(venv_side)?;
                }
            }
        }
        Ok(())
    }

    /// Every directory's recorded mode, deepest first.
    fn set_dir_modes(&self) -> std::io::Result<()> {
        for (rel, mode) in self.modes.iter().rev() {
            if crate::sys::umask().is_none_or(|umask| umask & mode != 0) {
                rustix::fs::fchmod(&self.dirs[rel].1, Mode::from_raw_mode(*mode))?;
            }
        }
        Ok(())
    }
}

/// Gives what the copy made to the build user, as `uv venv` run as that user leaves it.
fn give(fd: &OwnedFd, user: Option<BuildUser>) -> std::io::Result<()> {
    if let Some(user) = user {
        rustix::fs::fchown(
            fd,
            Some(rustix::process::Uid::from_raw(user.uid)),
            Some(rustix::process::Gid::from_raw(user.gid)),
        )?;
    }
    Ok(())
}

/// Discards the template `key` that failed its checks, if it is still the one that did
/// (`found`: its device and inode; `None`: whatever is at its name), so the next build
/// makes it again. Never waits: whoever holds its lock is making or discarding it.
fn discard(store: &Store, key: Digest, found: Option<(u64, u64)>) {
    let Ok(Some(_lock)) = store.try_lock(LockName::Template(key), LockMode::Exclusive) else {
        return;
    };
    let dir = store.layout().template_dir(key);
    let same = match (found, rustix::fs::lstat(&dir)) {
        (_, Err(_)) => false,
        (None, Ok(_)) => true,
        (Some(found), Ok(stat)) => found == (stat.st_dev, stat.st_ino),
    };
    if same {
        match store.discard_template(key) {
            Ok(()) => tracing::warn!(template = %dir.display(), "discarded an unsound venv template"),
            Err(e) => {
                tracing::warn!(template = %dir.display(), error = %e, "could not discard a venv template")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A tree like `uv venv`'s: directories, files of two modes, symlinks in and out.
    fn skeleton(root: &Path) {
        fs_err::create_dir_all(root.join("lib/python3.11/site-packages")).unwrap();
        fs_err::create_dir(root.join("bin")).unwrap();
        fs_err::write(root.join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        fs_err::write(root.join("bin/activate"), "# activate\n").unwrap();
        fs_err::set_permissions(root.join("bin/activate"), PermissionsExt::from_mode(0o750)).unwrap();
        fs_err::write(root.join("lib/python3.11/site-packages/_virtualenv.pth"), "").unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3.11", root.join("bin/python")).unwrap();
        std::os::unix::fs::symlink("python", root.join("bin/python3")).unwrap();
        std::os::unix::fs::symlink("lib", root.join("lib64")).unwrap();
    }

    /// Every path below `root`: its mode, symlink target and content.
    type Listing = Vec<(String, u32, Option<PathBuf>, Vec<u8>)>;

    fn listing(root: &Path) -> Listing {
        let mut out = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs_err::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs_err::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                let (target, content) = if meta.is_symlink() {
                    (Some(fs_err::read_link(&path).unwrap()), Vec::new())
                } else if meta.is_dir() {
                    pending.push(path.clone());
                    (None, Vec::new())
                } else {
                    (None, fs_err::read(&path).unwrap())
                };
                out.push((rel, meta.mode(), target, content));
            }
        }
        out.sort();
        out
    }

    fn sealer<'a>(tree: &'a Path, made_at: &'a [u8]) -> Sealer<'a> {
        Sealer {
            tree,
            made_at,
            made_modes: None,
            durable: false,
            paths: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Makes a template of `skeleton` at `<dir>/t` as `make` does (without uv).
    fn template(dir: &Path) -> (PathBuf, Listing) {
        let top = dir.join("t");
        fs_err::create_dir(&top).unwrap();
        skeleton(&top.join(TREE));
        let expected = listing(&top.join(TREE));
        let record = sealer(&top.join(TREE), b"/nowhere").seal().unwrap();
        fs_err::write(top.join(RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        fs_err::set_permissions(top.join(RECORD), PermissionsExt::from_mode(0o444)).unwrap();
        (top, expected)
    }

    #[test]
    fn a_copy_is_the_tree_as_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        let (top, expected) = template(dir.path());
        // Sealed where it lies: nothing in it writable.
        for (rel, mode, target, _) in listing(&top.join(TREE)) {
            assert!(target.is_some() || mode & 0o222 == 0, "{rel} {mode:o}");
        }
        let venv = dir.path().join("copy");
        copy(&top, &venv, None).unwrap();
        assert_eq!(listing(&venv), expected);
        assert_eq!(fs_err::metadata(&venv).unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn what_names_its_place_or_is_special_is_no_template() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        skeleton(&tree);
        fs_err::write(
            tree.join("bin/activate"),
            format!("VIRTUAL_ENV={}\n", tree.display()),
        )
        .unwrap();
        let err = sealer(&tree, tree.as_os_str().as_bytes()).seal().unwrap_err();
        assert!(err.to_string().contains("names where the venv was made"), "{err}");

        let tree = dir.path().join("u");
        skeleton(&tree);
        fs_err::hard_link(tree.join("pyvenv.cfg"), dir.path().join("elsewhere")).unwrap();
        let err = sealer(&tree, b"/nowhere").seal().unwrap_err();
        assert!(err.to_string().contains("another link"), "{err}");
    }

    /// A template changed after it was made is refused, never copied.
    #[test]
    fn a_changed_template_is_refused() {
        type Change = fn(&Path);
        let cases: [(&str, Change, &str); 4] = [
            (
                "writable",
                |tree| {
                    fs_err::set_permissions(tree.join("pyvenv.cfg"), PermissionsExt::from_mode(0o644))
                        .unwrap()
                },
                "writable",
            ),
            (
                "swapped for a symlink",
                |tree| {
                    fs_err::remove_file(tree.join("pyvenv.cfg")).unwrap();
                    std::os::unix::fs::symlink("/etc/passwd", tree.join("pyvenv.cfg")).unwrap();
                },
                "pyvenv.cfg",
            ),
            (
                "other content",
                |tree| {
                    let path = tree.join("bin/activate");
                    fs_err::set_permissions(&path, PermissionsExt::from_mode(0o644)).unwrap();
                    fs_err::write(&path, "# ACTIVATE\n").unwrap();
                    fs_err::set_permissions(&path, PermissionsExt::from_mode(0o444)).unwrap();
                },
                "not the content recorded",
            ),
            (
                "another symlink target",
                |tree| {
                    fs_err::remove_file(tree.join("bin/python")).unwrap();
                    std::os::unix::fs::symlink("/tmp/python", tree.join("bin/python")).unwrap();
                },
                "not the symlink recorded",
            ),
        ];
        for (name, change, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (top, _) = template(dir.path());
            let tree = top.join(TREE);
            for sub in [&tree, &tree.join("bin")] {
                fs_err::set_permissions(sub, PermissionsExt::from_mode(0o755)).unwrap();
            }
            change(&tree);
            for sub in [&tree.join("bin"), &tree] {
                fs_err::set_permissions(sub, PermissionsExt::from_mode(0o555)).unwrap();
            }
            match copy(&top, &dir.path().join("copy"), None) {
                Err(Failure::Unsound { reason, found }) => {
                    assert!(reason.contains(says), "{name}: {reason}");
                    assert!(found.is_some(), "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_key_changes_with_what_decides_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (uv, python_path) = (dir.path().join("uv"), dir.path().join("python3.11"));
        fs_err::write(&uv, "uv").unwrap();
        fs_err::write(&python_path, "python").unwrap();
        let python = Interpreter {
            path: python_path.clone(),
            version: "3.11.7".into(),
            implementation: "cpython".into(),
            parent_site_packages: Vec::new(),
        };
        let base = key(&uv, "0.13.9", &python, false).unwrap();
        assert_eq!(key(&uv, "0.13.9", &python, false).unwrap(), base);
        assert_ne!(key(&uv, "0.13.9", &python, true).unwrap(), base);
        assert_ne!(key(&uv, "0.14.0", &python, false).unwrap(), base);
        let newer = Interpreter {
            version: "3.11.8".into(),
            ..python.clone()
        };
        assert_ne!(key(&uv, "0.13.9", &newer, false).unwrap(), base);
        // Upgraded in place: same path, same version, another file.
        fs_err::write(dir.path().join("new"), "python, rebuilt").unwrap();
        fs_err::rename(dir.path().join("new"), &python_path).unwrap();
        assert_ne!(key(&uv, "0.13.9", &python, false).unwrap(), base);
    }
}
