//! Virtualenv entries (`envs/<key>`) and leases.
//!
//! The same protocol as packages (see the module doc of [`store`](super)): fast path on
//! the marker, exclusive `locks/env-<key>.lock`, re-check, build in staging, make the tree
//! durable, rename, marker last. The venv is built at `staging/<id>/venv` (uv makes it
//! relocatable; pip scripts are rewritten for the final path), next to the installer's
//! private `home/` and `tmp/`, which are discarded with the staging dir.
//!
//! A lease is a shared lock on an entry's lock file, held while something runs in the
//! entry. Builders and deleters take it exclusively, so a leased entry cannot be pruned,
//! and the kernel drops the lease when its holder dies.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{
    LockFile, LockMode, SYNC_THREADS, Store, StoreError, fsync_dir, ms, read_json, run_flight,
    write_json_atomic,
};
use crate::digest::EnvKey;
use crate::progress::Progress;

/// A committed env.
#[derive(Debug, Clone)]
pub struct EnvEntry {
    pub key: EnvKey,
    pub path: PathBuf,
    /// Bytes of its files, as recorded when it was built.
    pub bytes: u64,
    pub created: bool,
    pub timings_ms: std::collections::BTreeMap<&'static str, u64>,
}

impl EnvEntry {
    pub fn python(&self) -> PathBuf {
        self.path.join("bin").join("python")
    }
}

/// Where an env build happens.
pub struct EnvBuildDirs {
    /// Create the venv here.
    pub venv: PathBuf,
    /// Scratch space (the installer's HOME and TMPDIR go here).
    pub work: PathBuf,
    /// Where the venv will live once published.
    pub final_path: PathBuf,
    /// The build log.
    pub log: PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnvMeta {
    kind: String,
    key: String,
    created_unix: u64,
    /// Bytes of the env's files (hardlinks into the uv cache counted in full).
    #[serde(default)]
    bytes: u64,
    /// What the key is the digest of: requirements, installer, interpreter, index, options.
    description: serde_json::Value,
}

/// A held lease; released on drop (or by the kernel if the holder dies).
#[derive(Debug)]
pub struct Lease {
    lock: LockFile,
}

impl Lease {
    /// A duplicate of the lease's descriptor that a child process will inherit (dup(2)
    /// clears close-on-exec). `flock` belongs to the open file description, so the child
    /// holds the lease too — it outlives this process, e.g. a daemon restart. Close the
    /// duplicate in this process once the child has started.
    pub fn inheritable(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        crate::sys::dup_inheritable(self.lock.file())
    }
}

impl Store {
    pub fn env_path(&self, key: EnvKey) -> PathBuf {
        self.root.join("envs").join(key.to_string())
    }

    /// The node's bytecode cache (`PYTHONPYCACHEPREFIX` for workers of envs built without
    /// bytecode), created on demand, outside the read-only entries. One tree for all envs:
    /// Python mirrors each source's absolute path under it, so the interpreter's own
    /// modules (and a parent venv's: `ray`) are compiled once per node, not once per env.
    pub fn pycache_dir(&self) -> std::io::Result<PathBuf> {
        let dir = self.root.join("pycache");
        fs_err::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Where the bytecode of the files under `dir` (an env entry) lands in the node's
    /// cache, so it goes with the env.
    pub(super) fn pycache_of(&self, dir: &Path) -> PathBuf {
        self.root
            .join("pycache")
            .join(dir.strip_prefix("/").unwrap_or(dir))
    }

    pub(super) fn env_marker(&self, key: EnvKey) -> PathBuf {
        self.root.join("meta").join(format!("env-{key}.json"))
    }

    /// The committed env for `key`. Also the cheap per-hit check: an env whose interpreter
    /// link no longer resolves (base Python removed) is not served.
    pub fn find_env(&self, key: EnvKey) -> Result<Option<EnvEntry>, StoreError> {
        let Some(meta) = read_json::<EnvMeta>(&self.env_marker(key))? else {
            return Ok(None);
        };
        let path = self.env_path(key);
        let entry = EnvEntry {
            key,
            path,
            bytes: meta.bytes,
            created: false,
            timings_ms: Default::default(),
        };
        if !entry.python().exists() {
            return Ok(None);
        }
        self.touch(&self.env_marker(key));
        Ok(Some(entry))
    }

    /// Ensures the env `key` is committed, running `build` in staging if it is new.
    pub fn ensure_env(
        &self,
        key: EnvKey,
        description: &serde_json::Value,
        progress: &Progress,
        build: impl FnOnce(&EnvBuildDirs) -> Result<(), StoreError>,
    ) -> Result<EnvEntry, StoreError> {
        if let Some(hit) = self.find_env(key)? {
            return Ok(hit);
        }
        run_flight(&self.env_flights, format!("env-{key}"), || {
            self.build_env_locked(key, description, progress, build)
        })
    }

    fn build_env_locked(
        &self,
        key: EnvKey,
        description: &serde_json::Value,
        progress: &Progress,
        build: impl FnOnce(&EnvBuildDirs) -> Result<(), StoreError>,
    ) -> Result<EnvEntry, StoreError> {
        let name = format!("env-{key}");
        let _lock = self.lock_exclusive(&name)?;
        if let Some(hit) = self.find_env(key)? {
            return Ok(hit);
        }
        let staging = self.new_staging()?;
        let final_path = self.env_path(key);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dirs = EnvBuildDirs {
            venv: staging.path().join("venv"),
            work: staging.path().to_path_buf(),
            final_path: final_path.clone(),
            log: self
                .root
                .join("logs")
                .join(format!("build-{name}-{}-{nanos}.log", std::process::id())),
        };
        let mut timings = std::collections::BTreeMap::new();
        let start = Instant::now();
        // On failure the log stays (the error names it); staging goes to trash on drop.
        build(&dirs)?;
        timings.insert("install", ms(start));
        // The last successful build's log, under a stable name.
        let _ = fs_err::rename(&dirs.log, self.root.join("logs").join(format!("{name}.log")));

        let start = Instant::now();
        let walked = walk_tree(&dirs.venv)?;
        sync_walked(&walked, SYNC_THREADS, progress)?;
        timings.insert("sync", ms(start));

        let start = Instant::now();
        let marker = self.env_marker(key);
        if final_path.symlink_metadata().is_ok() {
            self.discard(&final_path, &name)?;
        }
        if marker.exists() {
            fs_err::remove_file(&marker)?;
        }
        // Directories read-only, deepest first (files may be hardlinks into the uv cache,
        // shared with other envs: their modes are left alone).
        for dir in walked.dirs.iter().rev() {
            set_mode(dir, 0o555)?;
        }
        fs_err::rename(&dirs.venv, &final_path)?;
        fsync_dir(&self.root.join("envs"))?;
        set_mode(&final_path, 0o555)?;
        let meta = EnvMeta {
            kind: "env".into(),
            key: key.to_string(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            bytes: walked.bytes,
            description: description.clone(),
        };
        write_json_atomic(&marker, &meta)?;
        timings.insert("publish", ms(start));
        drop(staging);
        Ok(EnvEntry {
            key,
            path: final_path,
            bytes: walked.bytes,
            created: true,
            timings_ms: timings,
        })
    }

    /// Takes a lease on the entry `name` (`pkg-<digest>` or `env-<key>`): waits while it is
    /// being built or deleted, then holds it shared until dropped.
    pub fn lease(&self, name: &str) -> Result<Lease, StoreError> {
        let lock = LockFile::acquire(&self.lock_path(name), LockMode::Shared, self.options.lock_timeout)?;
        Ok(Lease { lock })
    }
}

struct Walked {
    /// Directories below the root (not the root), parents first.
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    bytes: u64,
}

/// Lists a freshly built tree without following symlinks.
fn walk_tree(root: &Path) -> std::io::Result<Walked> {
    let mut walked = Walked {
        dirs: Vec::new(),
        files: Vec::new(),
        bytes: 0,
    };
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs_err::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walked.dirs.push(entry.path());
                pending.push(entry.path());
            } else if kind.is_file() {
                walked.bytes += entry.metadata()?.len();
                walked.files.push(entry.path());
            }
        }
    }
    walked.dirs.sort();
    Ok(walked)
}

/// fdatasync every file and fsync every directory of a walked tree, in parallel.
fn sync_walked(walked: &Walked, threads: usize, progress: &Progress) -> std::io::Result<()> {
    let all: Vec<(&PathBuf, bool)> = walked
        .files
        .iter()
        .map(|f| (f, false))
        .chain(walked.dirs.iter().map(|d| (d, true)))
        .collect();
    let phase = progress.phase("syncing", all.len() as u64);
    crate::package::parallel_map(all.len(), threads, |i| {
        let (path, is_dir) = all[i];
        phase.inc(1);
        if is_dir {
            fsync_dir(path)
        } else {
            fs_err::File::open(path)?.sync_data()
        }
    })?;
    phase.finish();
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode))
}
