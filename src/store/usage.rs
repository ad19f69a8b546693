//! Who uses what: last use, leases, and the listing `renv ls` prints.
//!
//! Last use is the mtime of an entry's marker, refreshed on hits at most once a minute (no
//! write storm on hot paths). A timestamp in the future — a clock that jumped back — is
//! read as "unknown", which never protects an entry: only leases do.
//!
//! A lease is a shared lock on an entry's lock file, held while something runs in the
//! entry. Builders and deleters take it exclusively, so a leased entry cannot be pruned,
//! and the kernel drops the lease when its holder dies. The holders of a lock are read
//! from `/proc/locks`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use super::layout::{EntryId, EntryKind, LockName};
use super::lock::{LockFile, LockMode};
use super::marker::{Marker, read_json, unix, unix_now};
use super::{Store, StoreError};

/// One committed entry, as `renv ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EntryInfo {
    pub kind: EntryKind,
    /// Its digest.
    pub id: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub created_unix: u64,
    pub last_used_unix: u64,
    /// Processes holding a lease (or building it) right now, or using it without one
    /// (its files open, mapped, or named in their environment: see `roots`).
    pub holders: Vec<u32>,
    /// References and running workers the daemon's saved state holds it for (kept whether
    /// or not a daemon is up to lease it; see `state_db`).
    pub held_by: Vec<String>,
    /// What it was built from: the working_dir source, or the requirement list.
    pub source: Value,
    #[serde(skip)]
    pub entry: EntryId,
    #[serde(skip)]
    pub marker: Marker,
}

/// A held lease; released on drop (or by the kernel if the holder dies).
#[derive(Debug)]
pub struct Lease {
    lock: LockFile,
}

impl Lease {
    /// A duplicate of the lease's descriptor, close-on-exec, for a child that must hold the
    /// lease too (see `sys::inherit_in_child`): `flock` belongs to the open file
    /// description, so the child holds the lease as well, and it outlives this process.
    pub fn dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        Ok(self.lock.file().try_clone()?.into())
    }
}

impl Store {
    pub(super) fn read_marker(&self, id: EntryId) -> std::io::Result<Option<Marker>> {
        Ok(read_json::<Marker>(&self.layout.marker_path(id))?.filter(|m| m.is_of(id)))
    }

    /// Records a use of the entry (at most once a minute).
    pub fn touch(&self, id: impl Into<EntryId>) {
        let marker = self.layout.marker_path(id.into());
        let now = SystemTime::now();
        let fresh = std::fs::metadata(&marker)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t <= now && now.duration_since(t).unwrap_or_default() < Duration::from_secs(60));
        if !fresh && let Ok(file) = std::fs::File::options().write(true).open(&marker) {
            let _ = file.set_modified(now);
        }
    }

    /// Takes a lease on the entry: waits while it is being built or deleted, then holds it
    /// shared until dropped. The caller checks the entry is still there once it holds it.
    pub fn lease(&self, id: impl Into<EntryId>) -> Result<Lease, StoreError> {
        let lock = LockFile::acquire(
            &self.layout.lock_path(LockName::Entry(id.into())),
            LockMode::Shared,
            self.options.lock_timeout,
        )?;
        Ok(Lease { lock })
    }

    /// Processes holding the entry's lock (leases and builders).
    pub fn holders(&self, id: EntryId) -> Vec<u32> {
        lock_holders(&self.layout.lock_path(LockName::Entry(id)))
    }

    /// Every committed entry, least recently used first.
    pub fn list_entries(&self) -> Result<Vec<EntryInfo>, StoreError> {
        self.list_entries_using(&self.runtime_roots())
    }

    /// As [`Self::list_entries`], with the runtime roots already scanned; the saved
    /// state's roots are read here.
    pub(super) fn list_entries_using(
        &self,
        roots: &super::roots::RuntimeRoots,
    ) -> Result<Vec<EntryInfo>, StoreError> {
        let mut saved = super::state_db::roots(&self.layout)?;
        let now = unix_now();
        let mut out = Vec::new();
        for kind in EntryKind::ALL {
            for dir_entry in fs_err::read_dir(self.layout.entries_dir(kind))? {
                let name = dir_entry?.file_name();
                let Some(id) = name.to_str().and_then(|n| self.layout.entry_named(kind, n)) else {
                    continue;
                };
                let Some(marker) = self.read_marker(id)? else {
                    continue;
                };
                let mtime = std::fs::metadata(self.layout.marker_path(id))
                    .and_then(|m| m.modified())
                    .map(unix)
                    .unwrap_or(0);
                // A future stamp (the clock went back) says nothing: fall back to creation.
                let last_used = if mtime > now {
                    marker.created_unix.min(now)
                } else {
                    mtime
                };
                out.push(EntryInfo {
                    kind,
                    id: id.digest.to_string(),
                    path: self.layout.entry_path(id),
                    bytes: marker.bytes,
                    created_unix: marker.created_unix,
                    last_used_unix: last_used,
                    holders: {
                        let mut pids = self.holders(id);
                        pids.extend(roots.pids(id));
                        pids.sort_unstable();
                        pids.dedup();
                        pids
                    },
                    held_by: saved.remove(&id).unwrap_or_default(),
                    source: match (&marker.source, kind) {
                        // Env markers from before `source` was written: their requirements.
                        (Value::Null, EntryKind::Env) => marker.description["requirements"].clone(),
                        (source, _) => source.clone(),
                    },
                    entry: id,
                    marker,
                });
            }
        }
        out.sort_by(|a, b| (a.last_used_unix, &a.id).cmp(&(b.last_used_unix, &b.id)));
        Ok(out)
    }

    /// Bytes of the committed entries of `kind`, from their markers.
    pub fn bytes_of(&self, kind: EntryKind) -> u64 {
        let Ok(dir) = std::fs::read_dir(self.layout.entries_dir(kind)) else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| self.layout.entry_named(kind, e.file_name().to_str()?))
            .filter_map(|id| self.read_marker(id).ok().flatten())
            .map(|m| m.bytes)
            .sum()
    }
}

/// Processes holding a `flock` on `path`, from /proc/locks.
fn lock_holders(path: &Path) -> Vec<u32> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let inode = meta.ino();
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = locks
        .lines()
        .filter(|line| line.contains("FLOCK"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK ADVISORY READ 1234 08:01:5678 0 EOF" (a "->" marks a waiter)
            let at = fields.iter().position(|f| *f == "FLOCK")?;
            if fields.get(at.saturating_sub(1)) == Some(&"->") {
                return None;
            }
            let pid: u32 = fields.get(at + 3)?.parse().ok()?;
            let ino: u64 = fields.get(at + 4)?.rsplit(':').next()?.parse().ok()?;
            (ino == inode).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}
