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

use std::collections::HashMap;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
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
    /// state's roots are read here. Per entry this costs one open, `fstat` and read of its
    /// marker, on the store's threads: who holds entry locks is read once for the whole
    /// listing (`/proc/locks` and one pass over `locks/`), not once per entry.
    pub(super) fn list_entries_using(
        &self,
        roots: &super::roots::RuntimeRoots,
    ) -> Result<Vec<EntryInfo>, StoreError> {
        let mut saved = super::state_db::roots(&self.layout)?;
        let mut locked = self.entry_lock_holders();
        let mut ids = Vec::new();
        for kind in EntryKind::ALL {
            for dir_entry in fs_err::read_dir(self.layout.entries_dir(kind))? {
                let name = dir_entry?.file_name();
                if let Some(id) = name.to_str().and_then(|n| self.layout.entry_named(kind, n)) {
                    ids.push(id);
                }
            }
        }
        let markers = crate::package::parallel_map(ids.len(), self.options.threads, |i| {
            self.read_marker_and_mtime(ids[i])
        })?;
        let now = unix_now();
        let mut out = Vec::with_capacity(ids.len());
        for (id, found) in ids.into_iter().zip(markers) {
            let Some((marker, mtime)) = found else {
                continue;
            };
            let mtime = unix(mtime);
            // A future stamp (the clock went back) says nothing: fall back to creation.
            let last_used = if mtime > now {
                marker.created_unix.min(now)
            } else {
                mtime
            };
            out.push(EntryInfo {
                kind: id.kind,
                id: id.digest.to_string(),
                path: self.layout.entry_path(id),
                bytes: marker.bytes,
                created_unix: marker.created_unix,
                last_used_unix: last_used,
                holders: {
                    let mut pids = locked.remove(&id).unwrap_or_default();
                    pids.extend(roots.pids(id));
                    pids.sort_unstable();
                    pids.dedup();
                    pids
                },
                held_by: saved.remove(&id).unwrap_or_default(),
                source: match (&marker.source, id.kind) {
                    // Env markers from before `source` was written: their requirements.
                    (Value::Null, EntryKind::Env) => marker.description["requirements"].clone(),
                    (source, _) => source.clone(),
                },
                entry: id,
                marker,
            });
        }
        out.sort_by(|a, b| (a.last_used_unix, &a.id).cmp(&(b.last_used_unix, &b.id)));
        Ok(out)
    }

    /// The entry's marker and its mtime (the entry's last use), through one descriptor.
    fn read_marker_and_mtime(&self, id: EntryId) -> std::io::Result<Option<(Marker, SystemTime)>> {
        use std::io::Read;
        let path = self.layout.marker_path(id);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(with_path(e, &path)),
        };
        let meta = file.metadata().map_err(|e| with_path(e, &path))?;
        // Sized from the fstat (`read_to_end` would ask the file for its size again).
        let mut bytes = vec![0; meta.len() as usize + 1];
        let mut filled = 0;
        loop {
            if filled == bytes.len() {
                bytes.resize(bytes.len() * 2, 0);
            }
            match file.read(&mut bytes[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(with_path(e, &path)),
            }
        }
        // Unparsable: never completely written, as absent (see `marker`).
        let Some(marker) = serde_json::from_slice::<Marker>(&bytes[..filled])
            .ok()
            .filter(|m| m.is_of(id))
        else {
            return Ok(None);
        };
        Ok(Some((marker, meta.modified().unwrap_or(std::time::UNIX_EPOCH))))
    }

    /// Processes holding each entry's lock (leases and builders), for every entry whose
    /// lock anyone holds: `/proc/locks` read once, and the lock files' inodes from one
    /// read of `locks/` (a directory entry carries its inode).
    fn entry_lock_holders(&self) -> HashMap<EntryId, Vec<u32>> {
        let by_inode = flock_holders_by_inode();
        if by_inode.is_empty() {
            return HashMap::new();
        }
        let Ok(dir) = std::fs::read_dir(self.layout.locks_dir()) else {
            return HashMap::new();
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| {
                let pids = by_inode.get(&e.ino())?;
                let id = e
                    .file_name()
                    .to_str()?
                    .strip_suffix(".lock")?
                    .parse::<EntryId>()
                    .ok()?;
                Some((id, pids.clone()))
            })
            .collect()
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
    flock_holders_by_inode().remove(&meta.ino()).unwrap_or_default()
}

/// Every `flock` held (not waited for) on the node, by inode, with its holders' pids
/// (sorted, once each), from /proc/locks.
fn flock_holders_by_inode() -> HashMap<u64, Vec<u32>> {
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return HashMap::new();
    };
    let mut by_inode: HashMap<u64, Vec<u32>> = HashMap::new();
    for line in locks.lines().filter(|line| line.contains("FLOCK")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK ADVISORY READ 1234 08:01:5678 0 EOF" (a "->" marks a waiter)
        let Some(at) = fields.iter().position(|f| *f == "FLOCK") else {
            continue;
        };
        if fields.get(at.saturating_sub(1)) == Some(&"->") {
            continue;
        }
        let pid = fields.get(at + 3).and_then(|f| f.parse::<u32>().ok());
        let ino = fields
            .get(at + 4)
            .and_then(|f| f.rsplit(':').next())
            .and_then(|f| f.parse::<u64>().ok());
        if let (Some(pid), Some(ino)) = (pid, ino) {
            by_inode.entry(ino).or_default().push(pid);
        }
    }
    for pids in by_inode.values_mut() {
        pids.sort_unstable();
        pids.dedup();
    }
    by_inode
}

fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{e} (while reading {})", path.display()))
}
