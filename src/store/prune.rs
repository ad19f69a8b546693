//! Evicting entries: `renv prune` and the daemon's collector, safe to run from cron while
//! builds, runs and the daemon are active. One prune at a time (`locks/prune.lock`).
//!
//! An entry a live process uses is kept: one holding a lease, or one using its files
//! without one (see [`super::roots`]); so is one the daemon's saved state holds (a
//! reference or a running worker, see [`super::state_db`]), whether or not a daemon runs. Removal of one entry, under its exclusive lock taken
//! *non-blocking* (a held lease or a build in progress means "in use": skip it): marker first (from then on nobody serves
//! it), then rename into trash, then delete; an env's bytecode in the node's cache goes
//! with it. A crash between the steps leaves a marker-less directory, which is garbage by
//! the store's rules and goes at the next prune or publish. Only names of the store's own
//! format are touched, and nothing is followed through a symlink.
//!
//! Caches that belong to the layers above (the installer's wheel cache) are pruned by
//! their owners, after this.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::layout::{EntryId, EntryKind, LockName, SPARE_LOG_PREFIX};
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
    pub fn prune(&self, _held: &PruneLock, policy: &PrunePolicy) -> Result<PruneReport, StoreError> {
        let now = unix_now();
        let entries = self.list_entries()?;
        let mut report = PruneReport {
            dry_run: policy.dry_run,
            ..PruneReport::default()
        };
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
            let Some(lock) = self.lock_unused(entry.entry)? else {
                let reason = format!("in use (pids {:?})", self.holders(entry.entry));
                report.kept.push(Decision { entry, reason });
                continue;
            };
            if !policy.dry_run {
                self.remove_locked(entry.entry, &lock)?;
            }
            total = total.saturating_sub(entry.bytes);
            report.bytes_freed += entry.bytes;
            report.removed.push(Decision {
                entry,
                reason: reason.into(),
            });
        }
        if !policy.dry_run {
            report.orphans_removed = self.remove_orphans()?;
            let keep = policy.older_than.unwrap_or(Duration::from_secs(7 * 86_400));
            report.logs_removed = self.prune_logs(keep.max(policy.min_age))?;
            report.bytecode_removed = self.prune_bytecode(keep.max(policy.min_age))?;
        }
        Ok(report)
    }

    /// The entry's lock, exclusively, unless something holds it (a lease or a build).
    pub(super) fn lock_unused(&self, id: EntryId) -> Result<Option<LockFile>, StoreError> {
        LockFile::try_acquire(&self.layout.lock_path(LockName::Entry(id)), LockMode::Exclusive)
    }

    /// Removes a committed entry whose lock the caller holds ([`Self::lock_unused`]).
    pub(super) fn remove_locked(&self, id: EntryId, _lock: &LockFile) -> Result<(), StoreError> {
        // No fsync between the steps: if the marker's removal is lost in a crash, a marker
        // without its directory reads as absent, the same as no marker.
        match fs_err::remove_file(self.layout.marker_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let path = self.layout.entry_path(id);
        self.discard(&path, &id.to_string())?;
        if id.kind == EntryKind::Env {
            // The env's part of every user's bytecode cache (each mirrors source paths).
            let rel = path.strip_prefix("/").unwrap_or(&path);
            for user in fs_err::read_dir(self.layout.pycache_dir())? {
                let user = user?;
                self.discard_beneath(&user.path(), rel, &format!("pycache-{}", id.digest))?;
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
    /// package is gone.
    fn remove_orphans(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for kind in EntryKind::ALL {
            for dir_entry in fs_err::read_dir(self.layout.entries_dir(kind))? {
                let name = dir_entry?.file_name();
                let Some(id) = name.to_str().and_then(|n| self.layout.entry_named(kind, n)) else {
                    continue;
                };
                if self.layout.marker_path(id).exists() {
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
