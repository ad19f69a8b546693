//! The content-addressed store: where entries live, how they get in, who uses them, how
//! they go. It stores what its callers build and knows nothing of how they build it: no
//! installer, no sources, no HTTP. Of a package it knows only its manifest (to sync what
//! was written, and to re-hash it in `verify`).
//!
//! Locks are `flock`s: the store must be on a local filesystem (on NFS or Lustre `flock`
//! is emulated per process, and threads of one process would not exclude each other).
//!
//! - [`layout`]: every path and lock name, derived from an entry's kind and digest.
//! - [`marker`]: completion markers and aliases (of zips, of remote objects), as types.
//! - [`transaction`]: the one publish protocol (begin → fill staging → commit or drop).
//! - [`usage`]: last use, leases, holders, and the listing `renv ls` prints.
//! - [`roots`]: entries live processes use (found in `/proc`), which maintenance keeps.
//! - [`state_db`]: the daemon's saved references and workers, which maintenance keeps too.
//! - [`prune`]: LRU / age eviction, orphans, old logs.
//! - [`verify`]: re-checking committed entries.
//! - `lock`: kernel file locks with deadlines; `single_flight`: one build per entry in a
//!   process.
//!
//! # Invariants
//!
//! Nothing is ever written into a committed entry. A directory without its completion
//! marker is garbage, never served. Entries are deleted by rename into `trash/`, never
//! following a symlink, touching only names of the store's own format. Lock order is a
//! source's own lock (a zip's), then an entry's; nothing takes them the other way round.
//!
//! # Sweeping
//!
//! [`Store::open`] sweeps: with `staging.lock` exclusive (non-blocking — if someone is
//! creating a staging dir right now, sweep next time), every staging dir whose `<id>.lock`
//! can be taken belongs to a dead builder and is removed. Trash is emptied.

pub mod layout;
mod lock;
pub mod marker;
pub mod prune;
pub mod pycache;
pub mod record;
pub mod roots;
mod single_flight;
pub mod state_db;
mod synced_inodes;
pub mod transaction;
pub mod usage;
pub mod verify;

use std::any::Any;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use layout::{EntryId, EntryKind, EntryName, LAYOUT_DIR, Layout, LockName};
pub use lock::{LockFile, LockMode};
pub use marker::Marker;
pub use transaction::{Begin, Commit, Contents, Entry, Staging, Transaction};
pub use usage::{EntryInfo, Lease};

use single_flight::SingleFlight;

use crate::digest::{EnvKey, PackageDigest};
use crate::package::zip_read::UnpackLimits;

/// A committed package (a working_dir or py_module tree).
pub type PackageEntry = Entry<PackageDigest>;
/// A committed virtualenv.
pub type EnvEntry = Entry<EnvKey>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "timed out after {}s waiting for the lock {}; is another renv process building the same entry? \
         Raise config.setup_timeout_seconds to wait longer",
        waited.as_secs(), path.display()
    )]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("{0}")]
    Busy(String),
    #[error("the store at {path} is unusable: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Tunables of a store handle.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long to wait for another process's build of the same entry (None: forever).
    pub lock_timeout: Option<Duration>,
    /// Threads for hashing, copying and unpacking into the store.
    pub threads: usize,
    /// Caps on what one zip may unpack to.
    pub unpack_limits: UnpackLimits,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            lock_timeout: Some(Duration::from_secs(
                crate::spec::DEFAULT_SETUP_TIMEOUT_SECONDS as u64,
            )),
            threads: crate::package::worker_threads(),
            unpack_limits: UnpackLimits::default(),
        }
    }
}

pub struct Store {
    layout: Layout,
    options: StoreOptions,
    /// In-process builds by entry; values are the builders' own result types.
    flights: SingleFlight<EntryId, Arc<dyn Any + Send + Sync>>,
}

impl Store {
    /// Opens (creating if needed) the store under `dir` and sweeps dead staging and trash.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let unusable = |reason: String| StoreError::Unusable {
            path: dir.to_path_buf(),
            reason,
        };
        // Nothing is created inside a directory that could be turned against us.
        let absolute = std::path::absolute(dir)?;
        if let Some(existing) = absolute.ancestors().find(|p| p.symlink_metadata().is_ok()) {
            // The real path: everything after works on it (a root-owned link such as
            // /var/run → /run is no weakness).
            layout::check_ancestors(&fs_err::canonicalize(existing)?).map_err(unusable)?;
        }
        fs_err::create_dir_all(dir).map_err(|e| unusable(e.to_string()))?;
        // Absolute, so paths handed to installers (which run in their own cwd) hold.
        let layout = Layout::new(&fs_err::canonicalize(dir)?);
        layout.create().map_err(unusable)?;
        let store = Store {
            layout,
            options,
            flights: SingleFlight::default(),
        };
        store.sweep()?;
        Ok(store)
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// `<store>/store-v1`.
    pub fn root(&self) -> &Path {
        self.layout.root()
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Waits (up to the store's deadline) for a lock of the store.
    pub fn lock(&self, name: LockName<'_>, mode: LockMode) -> Result<LockFile, StoreError> {
        LockFile::acquire(&self.layout.lock_path(name), mode, self.options.lock_timeout)
    }

    /// Takes a lock only if it is free right now.
    pub fn try_lock(&self, name: LockName<'_>, mode: LockMode) -> Result<Option<LockFile>, StoreError> {
        LockFile::try_acquire(&self.layout.lock_path(name), mode)
    }

    fn lock_exclusive(&self, name: LockName<'_>) -> Result<LockFile, StoreError> {
        self.lock(name, LockMode::Exclusive)
    }

    /// Runs `build` for `id` unless this process is already building it, in which case
    /// it waits for that build and returns its result — failure included (see
    /// `single_flight`). Each caller for an entry kind uses one result type.
    pub fn single_flight<V: Clone + Send + Sync + 'static>(
        &self,
        id: impl Into<EntryId>,
        build: impl FnOnce() -> V,
    ) -> V {
        let (value, _leader) = self
            .flights
            .run(id.into(), || Arc::new(build()) as Arc<dyn Any + Send + Sync>);
        value
            .downcast_ref::<V>()
            .expect("every caller for an entry kind uses one result type")
            .clone()
    }

    /// The bytecode cache of the user `uid` (see [`Layout::pycache_of_uid`]), created on
    /// demand: a real directory owned by that user, 0700. Anything else found at its name
    /// (a symlink, another owner's directory) is discarded first, never followed.
    pub fn pycache_for(&self, uid: u32, gid: u32) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let dir = self.layout.pycache_of_uid(uid);
        for _ in 0..2 {
            match dir.symlink_metadata() {
                Ok(meta) if meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0 => return Ok(dir),
                Ok(_) => self.discard(&dir, &format!("pycache-{uid}"))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                other => other?,
            }
            if uid != crate::sys::geteuid() {
                // Made by root for another user; it is only ever handed to that user.
                rustix::fs::chown(
                    &dir,
                    Some(rustix::process::Uid::from_raw(uid)),
                    Some(rustix::process::Gid::from_raw(gid)),
                )?;
            }
            return Ok(dir);
        }
        Err(std::io::Error::other(format!(
            "{}: keeps changing; cannot set up the bytecode cache of uid {uid}",
            dir.display()
        )))
    }

    /// Removes the directory `name` directly in `store-v1` (never a path: a name of the
    /// store's own, checked), whoever wrote inside it: renamed to trash, then removed
    /// without following a link.
    pub fn discard_named(&self, name: &str) -> std::io::Result<()> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(std::io::Error::other(format!(
                "{name:?} is not a name in the store"
            )));
        }
        self.discard(&self.layout.root().join(name), name)
    }

    /// Removes the venv template `key` (see [`Layout::template_dir`]): renamed to trash,
    /// then deleted. The caller holds its lock (`LockName::Template`).
    pub fn discard_template(&self, key: crate::digest::Digest) -> std::io::Result<()> {
        self.discard(&self.layout.template_dir(key), &format!("template-{key}"))
    }

    /// Lets exactly the users `uids` and groups `gids` (besides the owner and root) reach
    /// the store's entries, as the workers of a daemon's callers must: `store-v1` becomes
    /// 0700 with a POSIX ACL granting them search (`x`) and nothing else. Everything inside
    /// is read-only to them; everyone else cannot even look. Where the filesystem has no
    /// ACLs, a single group is granted by group ownership (0710); more is refused.
    pub fn grant_traverse(&self, uids: &[u32], gids: &[u32]) -> Result<(), StoreError> {
        let root = self.layout.root();
        let unusable = |reason: String| StoreError::Unusable {
            path: root.to_path_buf(),
            reason,
        };
        if uids.is_empty() && gids.is_empty() {
            match rustix::fs::removexattr(root, "system.posix_acl_access") {
                Ok(()) | Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP) => {}
                Err(e) => return Err(unusable(format!("cannot remove its ACL: {e}"))),
            }
            fs_err::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
            return Ok(());
        }
        match crate::sys::grant_access(root, 0o7, 0o1, uids, gids) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) && uids.is_empty() && gids.len() == 1 => {
                std::os::unix::fs::lchown(root, None, Some(gids[0]))?;
                fs_err::set_permissions(root, std::fs::Permissions::from_mode(0o710))?;
                Ok(())
            }
            Err(e) => Err(unusable(format!(
                "cannot grant the allowed users and groups access through an ACL ({e}); put the \
                 store on a filesystem with POSIX ACLs, or allow a single group (--allow-gid) only"
            ))),
        }
    }

    /// Removes `rel` beneath `base`, a directory someone else may write (a user's bytecode
    /// cache): resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a symlink
    /// planted anywhere on the way cannot send the removal elsewhere, then renamed by its
    /// directory's descriptor into trash.
    fn discard_beneath(&self, base: &Path, rel: &Path, name: &str) -> std::io::Result<()> {
        use rustix::fs::{Mode, ResolveFlags};
        let (Some(parent), Some(leaf)) = (rel.parent(), rel.file_name()) else {
            return Ok(());
        };
        let dir_flags = crate::sys::DIR_NO_FOLLOW;
        let base = match rustix::fs::open(base, dir_flags, Mode::empty()) {
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            other => other?,
        };
        let parent = if parent.as_os_str().is_empty() {
            base
        } else {
            let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&base, parent, dir_flags, Mode::empty(), resolve) {
                // Not there, or not reachable without a symlink: nothing of ours to remove.
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::XDEV) => {
                    return Ok(());
                }
                other => other?,
            }
        };
        let trash = rustix::fs::open(self.layout.trash_dir(), dir_flags, Mode::empty())?;
        let target = trash_name(name);
        match rustix::fs::renameat(&parent, leaf, &trash, target.as_str()) {
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            other => other?,
        }
        remove_tree(&self.layout.trash_dir().join(target))
    }

    /// Moves `path` (inside the store) to trash under a unique name, then deletes it.
    fn discard(&self, path: &Path, name: &str) -> std::io::Result<()> {
        match self.move_to_trash(path, name)? {
            Some(target) => remove_tree(&target),
            // Another sweeper got there first.
            None => Ok(()),
        }
    }

    /// Moves `path` (inside the store) to trash under a unique name, and says where (None:
    /// it was gone already). A symlink is moved, never followed.
    fn move_to_trash(&self, path: &Path, name: &str) -> std::io::Result<Option<PathBuf>> {
        let target = self.layout.trash_dir().join(trash_name(name));
        match std::fs::rename(path, &target) {
            Ok(()) => return Ok(Some(target)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // Moving a directory to another parent rewrites its `..`: a sealed (0555) entry
            // must be made writable first, unless we are root (checked by trying: one
            // call for root, whose renames need no write bit).
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => unseal_to_move(path),
            Err(e) => return Err(with_path(e, "moving", path)),
        }
        match std::fs::rename(path, &target) {
            Ok(()) => Ok(Some(target)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(with_path(e, "moving", path)),
        }
    }

    /// Removes dead builders' staging dirs and empties the trash (see the module doc).
    pub fn sweep(&self) -> Result<(), StoreError> {
        if let Some(_sweeping) = self.try_lock(LockName::Staging, LockMode::Exclusive)? {
            let staging_dir = self.layout.staging_dir();
            for entry in fs_err::read_dir(&staging_dir)? {
                let name = entry?.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(id) = name.strip_suffix(".lock") {
                    if !is_staging_id(id) {
                        continue;
                    }
                    if let Some(dead) = LockFile::try_acquire(&staging_dir.join(name), LockMode::Exclusive)? {
                        let dir = staging_dir.join(id);
                        if dir.symlink_metadata().is_ok() {
                            self.discard(&dir, &format!("staging-{id}"))?;
                        }
                        dead.remove()?;
                    }
                } else if is_staging_id(name) && !staging_dir.join(format!("{name}.lock")).exists() {
                    self.discard(&staging_dir.join(name), &format!("staging-{name}"))?;
                }
            }
        }
        for entry in fs_err::read_dir(self.layout.trash_dir())? {
            match remove_tree(&entry?.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Makes the directory `path` (never a symlink: lstat) writable by its owner, so that it
/// can be moved to another parent (which rewrites its `..`).
fn unseal_to_move(path: &Path) {
    if let Ok(meta) = path.symlink_metadata()
        && meta.is_dir()
    {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    }
}

/// A name in trash no one else uses: `<name>-<pid>-<nanoseconds>-<count>` (the count
/// tells apart names one process makes within a clock tick).
fn trash_name(name: &str) -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let count = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{name}-{}-{nanos}-{count}", std::process::id())
}

fn with_path(e: std::io::Error, doing: &str, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{e} ({doing} {})", path.display()))
}

fn is_staging_id(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    fs_err::File::open(dir)?.sync_all()
}

/// Deletes a tree the store owns. Read-only directories are made writable first (walking
/// with lstat, never following a symlink); `remove_dir_all` itself does not follow links.
pub(crate) fn remove_tree(path: &Path) -> std::io::Result<()> {
    fn make_writable(dir: &Path) -> std::io::Result<()> {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                make_writable(&entry.path())?;
            }
        }
        Ok(())
    }
    // Root needs no write bits, and must not chmod by path in a tree another user may
    // still reach through an open descriptor (a bytecode cache moved to trash). Nor does
    // it need a look first: `remove_dir_all` removes a symlink without following it, and
    // says when `path` is a file.
    if crate::sys::geteuid() == 0 {
        return match std::fs::remove_dir_all(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => std::fs::remove_file(path),
            other => other,
        };
    }
    match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => {
            make_writable(path)?;
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}
