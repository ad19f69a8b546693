//! Evicting entries: `renv prune` and the daemon's collector, safe to run from cron while
//! builds, runs and the daemon are active. One prune at a time (`locks/prune.lock`).
//!
//! An entry a live process uses is kept: one holding a lease, or one using its files
//! without one (see [`super::roots`]); so is one the daemon's saved state holds (a
//! reference or a running worker, see [`super::state_db`]), whether or not a daemon runs. Removal of one entry, under its exclusive lock taken
//! *non-blocking* (a held lease or a build in progress means "in use": skip it): marker first (from then on nobody serves
//! it), then rename into trash, then the lock is let go and the tree deleted; an env's bytecode in the node's cache goes
//! with it. A crash between the steps leaves a marker-less directory, which is garbage by
//! the store's rules and goes at the next prune or publish. Only names of the store's own
//! format are touched, and nothing is followed through a symlink.
//!
//! One thread decides, in LRU order, and takes the lock of each entry to remove; it hands
//! the locked entry to a few removing threads, which take the steps above. Deleting an
//! entry's every file and directory is most of a prune's work, and the kernel's work at
//! that: on a few cores, rm -rf's one thread leaves the others idle. The entry is locked
//! before it is handed over, so nothing can lease it in between.
//!
//! Caches that belong to the layers above (the installer's wheel cache) are pruned by
//! their owners, after this. Venv templates (`templates/`) are never pruned: a few
//! kilobytes each, and builds copy from them without a lock: nothing may vanish under one
//! (see `venv::template`).

use std::collections::HashSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use rustix::fs::AtFlags;

use serde::Serialize;

use super::layout::{EntryId, EntryKind, Layout, LockName, SPARE_LOG_PREFIX, lock_file_name, marker_name};
use super::lock::{LockFile, LockMode};
use super::marker::{ZipAlias, read_json, unix_now};
use super::usage::EntryInfo;
use super::{Store, StoreError};

#[derive(Debug, Clone, Default)]
pub struct PrunePolicy {
    pub max_size: Option<u64>,
    pub older_than: Option<Duration>,
    pub min_age: Duration,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    #[serde(flatten)]
    pub entry: EntryInfo,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub removed: Vec<Decision>,
    pub kept: Vec<Decision>,
    pub bytes_before: u64,
    pub bytes_freed: u64,
    pub orphans_removed: usize,
    /// Build and worker logs removed (untouched for longer than `--older-than`, else 7 days).
    pub logs_removed: usize,
    /// Bytecode files keyed by source content that no one loaded for as long.
    pub bytecode_removed: usize,
}

/// `locks/prune.lock`, held for a whole prune (the store's and its owners' caches').
pub struct PruneLock {
    _lock: LockFile,
}

impl Store {
    /// Takes the prune lock, or says another prune holds it.
    pub fn prune_lock(&self) -> Result<PruneLock, StoreError> {
        match LockFile::try_acquire(&self.layout.lock_path(LockName::Prune), LockMode::Exclusive)? {
            Some(lock) => Ok(PruneLock { _lock: lock }),
            None => Err(StoreError::Busy(
                "another renv prune is already running on this store".into(),
            )),
        }
    }

    /// Evicts least-recently-used entries under `policy`. Returns what was removed and
    /// what was kept, and why.
    ///
    /// This thread decides, in LRU order, and takes each evicted entry's lock; a few
    /// threads then take the locked entries out of the store (marker, move to trash, as
    /// the module doc says) and delete their trees. Deleting, every file and directory of
    /// an entry, is most of the work; an entry is already locked when it is handed over,
    /// so nothing can lease it meanwhile.
    pub fn prune(&self, _held: &PruneLock, policy: &PrunePolicy) -> Result<PruneReport, StoreError> {
        let entries = self.list_entries()?;
        let mut report = PruneReport {
            dry_run: policy.dry_run,
            ..PruneReport::default()
        };
        if policy.dry_run {
            self.evict(entries, policy, &mut report, |_| Ok(()))?;
            return Ok(report);
        }
        let dirs = StoreDirs::open(&self.layout)?;
        // A few entries are removed here, one after the other, as threads would not pay.
        let removers = match entries.len() {
            n if n < PARALLEL_FROM => 0,
            _ => removers(self.options.threads),
        };
        let (queue, doomed) = std::sync::mpsc::sync_channel::<Doomed>(REMOVE_QUEUE);
        let doomed = Mutex::new(doomed);
        // The first removal that failed; it stops the prune, as it always has (something
        // in the store is not as the store left it): entries queued after it are let go.
        let failure: Mutex<Option<StoreError>> = Mutex::new(None);
        let failed = AtomicBool::new(false);
        let remove = || {
            loop {
                // The queue's lock only for taking one (a `while let` would hold it
                // through the removal).
                let next = doomed.lock().unwrap().recv();
                let Ok(Doomed { id, lock }) = next else {
                    break;
                };
                if failed.load(Ordering::Relaxed) {
                    continue;
                }
                if let Err(e) = self.remove_locked_in(&dirs, id, lock) {
                    failure.lock().unwrap().get_or_insert(e);
                    failed.store(true, Ordering::Relaxed);
                }
            }
        };
        let evicted = std::thread::scope(|scope| {
            for _ in 0..removers {
                scope.spawn(remove);
            }
            let evicted = self.evict(entries, policy, &mut report, |doomed| {
                if failed.load(Ordering::Relaxed) {
                    return Err(StoreError::Busy("a removal failed".into()));
                }
                if removers == 0 {
                    return self.remove_locked_in(&dirs, doomed.id, doomed.lock);
                }
                queue
                    .send(doomed)
                    .map_err(|_| StoreError::Busy("prune's removing threads stopped".into()))
            });
            drop(queue);
            // This thread helps with what is left.
            remove();
            evicted
        });
        if let Some(e) = failure.into_inner().unwrap() {
            return Err(e);
        }
        evicted?;
        let committed: HashSet<EntryId> = report.kept.iter().map(|d| d.entry.entry).collect();
        report.orphans_removed = self.remove_orphans(&committed)?;
        let keep = policy.older_than.unwrap_or(Duration::from_secs(7 * 86_400));
        report.logs_removed = self.prune_logs(keep.max(policy.min_age))?;
        report.bytecode_removed = self.prune_bytecode(keep.max(policy.min_age))?;
        Ok(report)
    }

    /// Decides entry by entry, least recently used first; each entry to evict is locked
    /// (exclusively, non-blocking: a lease or a build keeps it) and, unless this is a dry
    /// run, handed to `remove` with its lock.
    fn evict(
        &self,
        entries: Vec<EntryInfo>,
        policy: &PrunePolicy,
        report: &mut PruneReport,
        mut remove: impl FnMut(Doomed) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let now = unix_now();
        let locks = open_dir(&self.layout.locks_dir())?;
        report.bytes_before = entries.iter().map(|e| e.bytes).sum();
        let mut total = report.bytes_before;
        for entry in entries {
            let over_size = policy.max_size.is_some_and(|max| total > max);
            let too_old = policy
                .older_than
                .is_some_and(|d| now.saturating_sub(entry.last_used_unix) > d.as_secs());
            if !over_size && !too_old {
                report.kept.push(Decision {
                    entry,
                    reason: "within policy".into(),
                });
                continue;
            }
            if now.saturating_sub(entry.created_unix) < policy.min_age.as_secs() {
                report.kept.push(Decision {
                    entry,
                    reason: "younger than --min-age".into(),
                });
                continue;
            }
            let reason = if too_old {
                "unused for longer than --older-than"
            } else {
                "store over --max-size (LRU)"
            };
            // A reference or a running worker the daemon saved keeps it, daemon up or not.
            if !entry.held_by.is_empty() {
                let reason = format!("held by the daemon's saved state ({})", entry.held_by.join(", "));
                report.kept.push(Decision { entry, reason });
                continue;
            }
            // A live process that uses the entry without a lease (found in /proc when the
            // entries were listed) keeps it, as a lease does.
            if !entry.holders.is_empty() {
                let reason = format!("in use (pids {:?})", entry.holders);
                report.kept.push(Decision { entry, reason });
                continue;
            }
            let id = entry.entry;
            let lock = LockFile::try_acquire_in(
                locks.as_fd(),
                &lock_file_name(LockName::Entry(id)),
                self.layout.lock_path(LockName::Entry(id)),
                LockMode::Exclusive,
            )?;
            let Some(lock) = lock else {
                let reason = format!("in use (pids {:?})", self.holders(id));
                report.kept.push(Decision { entry, reason });
                continue;
            };
            if !policy.dry_run {
                remove(Doomed { id, lock })?;
            }
            total = total.saturating_sub(entry.bytes);
            report.bytes_freed += entry.bytes;
            report.removed.push(Decision {
                entry,
                reason: reason.into(),
            });
        }
        Ok(())
    }

    /// The entry's lock, exclusively, unless something holds it (a lease or a build).
    pub(super) fn lock_unused(&self, id: EntryId) -> Result<Option<LockFile>, StoreError> {
        LockFile::try_acquire(&self.layout.lock_path(LockName::Entry(id)), LockMode::Exclusive)
    }

    /// Removes a committed entry whose lock the caller holds ([`Self::lock_unused`]).
    pub(super) fn remove_locked(&self, id: EntryId, lock: LockFile) -> Result<(), StoreError> {
        self.remove_locked_in(&StoreDirs::open(&self.layout)?, id, lock)
    }

    /// Takes a committed entry whose lock the caller holds out of the store: its marker
    /// first (from then on nobody serves it), then its directory into trash; an env's
    /// bytecode in every user's cache goes with it. Then the lock is let go (whoever waits
    /// for it finds no entry, and may build it again) and the tree in trash deleted.
    fn remove_locked_in(&self, dirs: &StoreDirs, id: EntryId, lock: LockFile) -> Result<(), StoreError> {
        use rustix::io::Errno;
        // No fsync between the steps: if the marker's removal is lost in a crash, a marker
        // without its directory reads as absent, the same as no marker.
        match rustix::fs::unlinkat(&dirs.meta, marker_name(id).as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(io_error(e, "removing", &self.layout.marker_path(id)).into()),
        }
        let name = id.digest.to_string();
        let target = super::trash_name(&id.to_string());
        let from = dirs.entries(id.kind);
        let mut moved = rustix::fs::renameat(from, name.as_str(), &dirs.trash, target.as_str());
        if let Err(Errno::ACCESS | Errno::PERM) = moved {
            // A sealed directory, and we are not root (see `Store::move_to_trash`).
            super::unseal_to_move(&self.layout.entry_path(id));
            moved = rustix::fs::renameat(from, name.as_str(), &dirs.trash, target.as_str());
        }
        let tree = match moved {
            Ok(()) => Some(self.layout.trash_dir().join(&target)),
            // Gone already (a crashed removal's directory swept by someone else).
            Err(Errno::NOENT) => None,
            Err(e) => return Err(io_error(e, "moving to trash", &self.layout.entry_path(id)).into()),
        };
        if id.kind == EntryKind::Env {
            // The env's part of every user's bytecode cache (each mirrors source paths).
            let path = self.layout.entry_path(id);
            let rel = path.strip_prefix("/").unwrap_or(&path);
            for user in fs_err::read_dir(self.layout.pycache_dir())? {
                let user = user?;
                self.discard_beneath(&user.path(), rel, &format!("pycache-{}", id.digest))?;
            }
        }
        drop(lock);
        if let Some(tree) = tree {
            match super::remove_tree(&tree) {
                // `Store::open` empties trash too.
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_error(e, "deleting from trash", &tree).into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes log files not written for longer than `keep` (a running worker's logs are
    /// being written, a spare log file is fresh; neither is old). Regular files only.
    fn prune_logs(&self, keep: Duration) -> Result<usize, StoreError> {
        let now = SystemTime::now();
        let mut removed = 0;
        for dir in [self.layout.logs_dir(), self.layout.worker_logs_dir()] {
            let Ok(entries) = fs_err::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > keep);
                if meta.is_file() && old && !entry.file_name().to_string_lossy().starts_with(SPARE_LOG_PREFIX)
                {
                    fs_err::remove_file(entry.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Marker-less entry directories (crashed publishes or prunes) and zip aliases whose
    /// package is gone. `committed` are entries seen with their marker by this prune,
    /// which need no second look.
    fn remove_orphans(&self, committed: &HashSet<EntryId>) -> Result<usize, StoreError> {
        let mut removed = 0;
        for kind in EntryKind::ALL {
            for dir_entry in fs_err::read_dir(self.layout.entries_dir(kind))? {
                let name = dir_entry?.file_name();
                let Some(id) = name.to_str().and_then(|n| self.layout.entry_named(kind, n)) else {
                    continue;
                };
                if committed.contains(&id) || self.layout.marker_path(id).exists() {
                    continue;
                }
                // Under its lock: a publish renames the directory, then writes the marker.
                if let Some(_lock) =
                    LockFile::try_acquire(&self.layout.lock_path(LockName::Entry(id)), LockMode::Exclusive)?
                    && !self.layout.marker_path(id).exists()
                {
                    self.discard(&self.layout.entry_path(id), &id.to_string())?;
                    removed += 1;
                }
            }
        }
        let packages: HashSet<String> = fs_err::read_dir(self.layout.entries_dir(EntryKind::Package))?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for entry in fs_err::read_dir(self.layout.meta_dir())? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| self.layout.is_alias(n))
                && let Some(alias) = read_json::<ZipAlias>(&entry.path())?
                && !packages.contains(&alias.package)
            {
                fs_err::remove_file(entry.path())?;
            }
        }
        Ok(removed)
    }
}

/// An entry prune decided to remove, with its lock held, on its way to a removing thread.
struct Doomed {
    id: EntryId,
    lock: LockFile,
}

/// Entries listed from which prune removes on threads of its own.
const PARALLEL_FROM: usize = 64;

/// Entries locked and waiting for a removing thread, at most: each holds its lock's
/// descriptor, and a lease waiting for one of them waits until it is removed.
const REMOVE_QUEUE: usize = 64;

/// Removing threads besides the deciding one (which joins them once every entry is
/// decided): twice the store's threads, since a remover also sleeps, on the kernel's locks
/// of the trash directory (every move into it and every deletion from it takes one) and
/// of renames across directories (one per filesystem).
fn removers(threads: usize) -> usize {
    (threads * 2).clamp(2, 8)
}

/// The directories prune takes entries out of and into, opened once (never through a
/// symlink): an entry's steps are then calls relative to them, not walks of the store's
/// path.
struct StoreDirs {
    pkgs: OwnedFd,
    envs: OwnedFd,
    meta: OwnedFd,
    trash: OwnedFd,
}

impl StoreDirs {
    fn open(layout: &Layout) -> std::io::Result<StoreDirs> {
        Ok(StoreDirs {
            pkgs: open_dir(&layout.entries_dir(EntryKind::Package))?,
            envs: open_dir(&layout.entries_dir(EntryKind::Env))?,
            meta: open_dir(&layout.meta_dir())?,
            trash: open_dir(&layout.trash_dir())?,
        })
    }

    fn entries(&self, kind: EntryKind) -> &OwnedFd {
        match kind {
            EntryKind::Package => &self.pkgs,
            EntryKind::Env => &self.envs,
        }
    }
}

fn open_dir(path: &Path) -> std::io::Result<OwnedFd> {
    use rustix::fs::Mode;
    let flags = crate::sys::DIR_NO_FOLLOW;
    rustix::fs::open(path, flags, Mode::empty()).map_err(|e| io_error(e, "opening", path))
}

fn io_error(e: impl Into<std::io::Error>, doing: &str, path: &Path) -> std::io::Error {
    let e = e.into();
    std::io::Error::new(e.kind(), format!("{e} ({doing} {})", path.display()))
}
