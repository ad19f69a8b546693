//! The content-addressed store.
//!
//! ```text
//! <store>/store-v1/             the layout version is the directory name: a new format is
//!   pkgs/<digest>/              a new directory, never a migration
//!                               unpacked working_dir trees, read-only once committed
//!   meta/pkg-<digest>.json      the completion marker and metadata of a package
//!   meta/zip-<zip digest>.json  which package a zip (by the blake3 of its bytes) unpacked to
//!   locks/pkg-<digest>.lock     exclusive while building or deleting that entry
//!   locks/zip-<zip digest>.lock exclusive while unpacking that zip
//!   locks/staging.lock          shared while creating a staging dir, exclusive to sweep
//!   staging/<id>/ + <id>.lock   builds in progress; the .lock is held by the live builder
//!   trash/                      entries being deleted
//!   cache/hashes/<digest>.json  stat caches of local sources (see `package::hash_cache`)
//!   cache/probes/               cached `python -c …` / `uv --version` answers
//!   envs/<key>/                 virtualenvs, directories read-only once committed
//!   meta/env-<key>.json         the completion marker and description of an env
//!   pycache/<abs path>/…        bytecode written by workers (PYTHONPYCACHEPREFIX: one tree
//!                               mirroring source paths; an env's part goes with the env)
//!   tools/uv-<version>/         the bootstrapped installer
//!   uv-cache/                   the installer's wheel cache, on this filesystem so installs hardlink
//!   logs/                       build and worker logs
//! ```
//!
//! # Publishing an entry (the protocol `ensure_*` implements)
//!
//! 1. Fast path: marker and directory both present → hit, no lock taken. Committed entries
//!    never change, so this read is safe.
//! 2. Take `locks/pkg-<digest>.lock` exclusively (with the spec's deadline), then re-check:
//!    another process may have published while we waited.
//! 3. Clear leftovers: a `pkgs/<digest>` without its marker is a crashed publish and goes
//!    to trash; a marker without its directory is removed.
//! 4. Build in a fresh `staging/<id>` (same filesystem, so the final step is a rename).
//!    The staging dir's own lock is held for the whole build, so a sweep never takes it.
//! 5. fdatasync the staged files and fsync its directories, rename `staging/<id>` → `pkgs/<digest>`, fsync `pkgs/`,
//!    make the root read-only, then write the marker (tmp file, fsync, rename, fsync
//!    `meta/`). The marker is last: a directory without it is garbage, never served.
//!
//! Lock order is zip lock, then package lock; nothing takes them the other way round.
//! In-process, a [`SingleFlight`] per key makes concurrent callers share one build.
//!
//! # Sweeping
//!
//! [`Store::open`] sweeps: with `staging.lock` exclusive (non-blocking — if someone is
//! creating a staging dir right now, sweep next time), every staging dir whose `<id>.lock`
//! can be taken belongs to a dead builder and is removed. Trash is emptied. Removal never
//! follows a symlink and only touches names this module created.

mod envs;
pub mod gc;
mod lock;
mod single_flight;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use envs::{EnvBuildDirs, EnvEntry, Lease};
pub use lock::{LockFile, LockMode};
pub use single_flight::SingleFlight;

use crate::digest::{Digest, PackageDigest};
use crate::package::hash_cache::HashCache;
use crate::package::zip_read::{ArchiveError, UnpackLimits};
use crate::package::{self, PackageError, ScannedTree};
use crate::progress::Progress;

/// Threads that fsync a staged tree. fsync waits on the disk, not the CPU, and concurrent
/// fsyncs share journal commits, so this is more than the core count.
pub(crate) const SYNC_THREADS: usize = 32;

/// The layout version; bump it (and the directory name) for any on-disk format change.
pub const LAYOUT_DIR: &str = "store-v1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "timed out after {}s waiting for the lock {}; is another renv process building the same entry? \
         Raise config.setup_timeout_seconds to wait longer",
        waited.as_secs(), path.display()
    )]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("pkg://{0} is not in the store; upload or build it first")]
    PackageNotFound(PackageDigest),
    #[error("the uploaded zip unpacks to package {actual}, not {expected}; nothing was kept")]
    DigestMismatch {
        expected: PackageDigest,
        actual: PackageDigest,
    },
    #[error("{0}")]
    Busy(String),
    #[error("the store at {path} is unusable: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Venv(#[from] Box<crate::venv::VenvError>),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The same failure, shared by every caller that waited on one build.
    #[error(transparent)]
    Shared(Arc<StoreError>),
}

impl StoreError {
    pub fn is_user_error(&self) -> bool {
        match self {
            StoreError::PackageNotFound(_) | StoreError::DigestMismatch { .. } => true,
            StoreError::Package(e) => e.is_user_error(),
            StoreError::Venv(e) => e.is_user_error(),
            StoreError::Archive(e) => matches!(e, ArchiveError::Rejected { .. }),
            StoreError::Shared(e) => e.is_user_error(),
            _ => false,
        }
    }
}

/// A committed package, and what ensuring it cost.
#[derive(Debug, Clone)]
pub struct PackageEntry {
    pub digest: PackageDigest,
    pub path: PathBuf,
    pub files: u64,
    pub bytes: u64,
    /// False when the entry was already there (nothing was copied or unpacked).
    pub created: bool,
    /// Milliseconds per step, for `renv build`'s report.
    pub timings_ms: BTreeMap<&'static str, u64>,
}

/// The completion marker of a package entry (`meta/pkg-<digest>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PackageMeta {
    kind: String,
    digest: String,
    files: u64,
    bytes: u64,
    created_unix: u64,
    /// What it was built from (`dir:/abs/path` or `zip:<blake3 of the zip>`), for `renv ls`.
    source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ZipAlias {
    package: String,
}

/// Tunables of a store handle.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long to wait for another process's build of the same entry (None: forever).
    pub lock_timeout: Option<Duration>,
    pub threads: usize,
    pub unpack_limits: UnpackLimits,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            lock_timeout: Some(Duration::from_secs(
                crate::spec::DEFAULT_SETUP_TIMEOUT_SECONDS as u64,
            )),
            threads: package::worker_threads(),
            unpack_limits: UnpackLimits::default(),
        }
    }
}

type Flight = Result<PackageEntry, Arc<StoreError>>;

pub struct Store {
    root: PathBuf,
    options: StoreOptions,
    flights: SingleFlight<String, Flight>,
    env_flights: SingleFlight<String, Result<EnvEntry, Arc<StoreError>>>,
}

impl Store {
    /// Opens (creating if needed) the store under `dir` and sweeps dead staging and trash.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        // Absolute, so paths handed to installers (which run in their own cwd) hold.
        fs_err::create_dir_all(dir).map_err(|e| StoreError::Unusable {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let root = fs_err::canonicalize(dir)?.join(LAYOUT_DIR);
        for sub in [
            "pkgs",
            "meta",
            "locks",
            "staging",
            "trash",
            "logs",
            "cache/hashes",
            "cache/probes",
            "envs",
            "tools",
            "uv-cache",
        ] {
            fs_err::create_dir_all(root.join(sub)).map_err(|e| StoreError::Unusable {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        let store = Store {
            root,
            options,
            flights: SingleFlight::default(),
            env_flights: SingleFlight::default(),
        };
        store.sweep()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Where cached answers of `python -c …` / `uv --version` live.
    pub fn probe_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("probes")
    }

    /// The installer's own wheel cache: on the store's filesystem, so installs hardlink.
    pub fn uv_cache_dir(&self) -> PathBuf {
        self.root.join("uv-cache")
    }

    /// Where stat caches of local sources live.
    pub fn hash_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("hashes")
    }

    pub fn package_path(&self, digest: PackageDigest) -> PathBuf {
        self.root.join("pkgs").join(digest.to_string())
    }

    fn package_marker(&self, digest: PackageDigest) -> PathBuf {
        self.root.join("meta").join(format!("pkg-{digest}.json"))
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }

    /// The committed entry for `digest`, if there is one.
    pub fn find_package(&self, digest: PackageDigest) -> Result<Option<PackageEntry>, StoreError> {
        let meta: PackageMeta = match read_json(&self.package_marker(digest))? {
            Some(meta) => meta,
            None => return Ok(None),
        };
        let path = self.package_path(digest);
        if !path.is_dir() {
            return Ok(None);
        }
        self.touch(&self.package_marker(digest));
        Ok(Some(PackageEntry {
            digest,
            path,
            files: meta.files,
            bytes: meta.bytes,
            created: false,
            timings_ms: BTreeMap::new(),
        }))
    }

    /// `pkg://<digest>`: the entry must already be committed.
    pub fn lookup_package(&self, digest: PackageDigest) -> Result<PackageEntry, StoreError> {
        self.find_package(digest)?
            .ok_or(StoreError::PackageNotFound(digest))
    }

    /// Ensures the scanned local tree is committed, copying it only if it is new.
    pub fn ensure_package_from_tree(
        &self,
        tree: &ScannedTree,
        progress: &Progress,
    ) -> Result<PackageEntry, StoreError> {
        let digest = tree.manifest.digest();
        self.single_flight(format!("pkg-{digest}"), || {
            if let Some(hit) = self.find_package(digest)? {
                return Ok(hit);
            }
            let _lock = self.lock_exclusive(&format!("pkg-{digest}"))?;
            if let Some(hit) = self.find_package(digest)? {
                return Ok(hit);
            }
            let mut timings = BTreeMap::new();
            let staging = self.new_staging()?;
            let start = Instant::now();
            package::tree::copy_into(tree, staging.path(), self.options.threads, progress)
                .map_err(during("copying", &tree.root.display().to_string()))?;
            timings.insert("copy", ms(start));
            let source = format!("dir:{}", tree.root.display());
            self.publish(staging, digest, &tree.manifest, source, timings, progress)
                .map_err(during("publishing", &format!("pkg://{digest}")))
        })
    }

    /// Ensures the tree in the zip at `zip_path` is committed. A zip seen before (same
    /// bytes) is recognized by its own digest and not unpacked again.
    pub fn ensure_package_from_zip(
        &self,
        zip_path: &Path,
        progress: &Progress,
    ) -> Result<PackageEntry, StoreError> {
        let start = Instant::now();
        let (zip_digest, zip_meta) = self.hash_zip(zip_path)?;
        let hash_ms = ms(start);
        let alias_path = self.root.join("meta").join(format!("zip-{zip_digest}.json"));
        let find_by_alias = || -> Result<Option<PackageEntry>, StoreError> {
            let Some(alias) = read_json::<ZipAlias>(&alias_path)? else {
                return Ok(None);
            };
            let Ok(digest) = alias.package.parse() else {
                return Ok(None);
            };
            self.find_package(digest)
        };
        let mut entry = self.single_flight(format!("zip-{zip_digest}"), || {
            if let Some(hit) = find_by_alias()? {
                return Ok(hit);
            }
            let _zip_lock = self.lock_exclusive(&format!("zip-{zip_digest}"))?;
            if let Some(hit) = find_by_alias()? {
                return Ok(hit);
            }
            let mut timings = BTreeMap::new();
            let staging = self.new_staging()?;
            let start = Instant::now();
            let manifest = package::zip_read::unpack(
                zip_path,
                staging.path(),
                self.options.unpack_limits,
                self.options.threads,
                progress,
            )
            .map_err(during("unpacking", &zip_path.display().to_string()))?;
            timings.insert("unpack", ms(start));
            // The alias below vouches that these zip bytes give this tree: the file must
            // not have changed between hashing and unpacking.
            if !HashCache::same_state(&zip_meta, &fs_err::metadata(zip_path)?) {
                return Err(PackageError::Changed(zip_path.to_path_buf()).into());
            }
            let digest = manifest.digest();
            let _pkg_lock = self.lock_exclusive(&format!("pkg-{digest}"))?;
            let entry = match self.find_package(digest)? {
                // Same tree, different zip bytes: keep the committed one.
                Some(hit) => hit,
                None => {
                    let source = format!("zip:{zip_digest}");
                    self.publish(staging, digest, &manifest, source, timings, progress)
                        .map_err(during("publishing", &format!("pkg://{digest}")))?
                }
            };
            write_json_atomic(
                &alias_path,
                &ZipAlias {
                    package: digest.to_string(),
                },
            )?;
            Ok(entry)
        })?;
        entry.timings_ms.insert("hash_zip", hash_ms);
        Ok(entry)
    }

    /// Commits an uploaded zip that claims to be package `expected`: unpacked in staging,
    /// and published only if its manifest digest is exactly that (else nothing is kept).
    pub fn ensure_uploaded_package(
        &self,
        zip_path: &Path,
        expected: PackageDigest,
    ) -> Result<PackageEntry, StoreError> {
        self.single_flight(format!("pkg-{expected}"), || {
            if let Some(hit) = self.find_package(expected)? {
                return Ok(hit);
            }
            let mut timings = BTreeMap::new();
            let staging = self.new_staging()?;
            let start = Instant::now();
            let progress = Progress::hidden();
            let manifest = package::zip_read::unpack(
                zip_path,
                staging.path(),
                self.options.unpack_limits,
                self.options.threads,
                &progress,
            )
            .map_err(during("unpacking", &zip_path.display().to_string()))?;
            timings.insert("unpack", ms(start));
            let digest = manifest.digest();
            if digest != expected {
                return Err(StoreError::DigestMismatch {
                    expected,
                    actual: digest,
                });
            }
            let _lock = self.lock_exclusive(&format!("pkg-{digest}"))?;
            match self.find_package(digest)? {
                Some(hit) => Ok(hit),
                None => self.publish(staging, digest, &manifest, "upload".into(), timings, &progress),
            }
        })
    }

    /// blake3 of a zip's bytes, from the stat cache when the file is unchanged, and the
    /// file's metadata at that moment.
    fn hash_zip(&self, zip_path: &Path) -> std::io::Result<(Digest, std::fs::Metadata)> {
        let zip_path = fs_err::canonicalize(zip_path)?;
        let cache_path = HashCache::path_for(&self.hash_cache_dir(), &zip_path);
        let cache = HashCache::load(&cache_path);
        let mut file = fs_err::File::open(&zip_path)?;
        let meta = file.metadata()?;
        if let Some(digest) = cache.lookup("", &meta) {
            return Ok((digest, meta));
        }
        let mut buf = vec![0u8; 1 << 20];
        let (_, digest) = package::copy_hashing(&mut file, &mut std::io::sink(), &zip_path, &mut buf)?;
        cache.record("", &meta, digest);
        let _ = cache.save(&cache_path);
        Ok((digest, meta))
    }

    fn single_flight(
        &self,
        key: String,
        work: impl FnOnce() -> Result<PackageEntry, StoreError>,
    ) -> Result<PackageEntry, StoreError> {
        run_flight(&self.flights, key, work)
    }

    fn lock_exclusive(&self, name: &str) -> Result<LockFile, StoreError> {
        LockFile::acquire(
            &self.lock_path(name),
            LockMode::Exclusive,
            self.options.lock_timeout,
        )
    }

    /// Steps 3 and 5 of the protocol; the caller holds the package lock.
    fn publish(
        &self,
        staging: Staging,
        digest: PackageDigest,
        manifest: &package::Manifest,
        source: String,
        mut timings: BTreeMap<&'static str, u64>,
        progress: &Progress,
    ) -> Result<PackageEntry, StoreError> {
        let path = self.package_path(digest);
        let marker = self.package_marker(digest);
        // A directory without a marker is a crashed publish; a marker alone is stale.
        if path.symlink_metadata().is_ok() {
            self.discard(&path, &format!("pkg-{digest}"))?;
        }
        if marker.exists() {
            fs_err::remove_file(&marker)?;
        }

        let start = Instant::now();
        sync_tree(staging.path(), manifest, SYNC_THREADS, progress)?;
        timings.insert("sync", ms(start));
        let start = Instant::now();
        fs_err::rename(staging.path(), &path)?;
        staging.committed();
        fsync_dir(&self.root.join("pkgs"))?;
        fs_err::set_permissions(&path, std::fs::Permissions::from_mode(package::tree::DIR_MODE))?;
        let meta = PackageMeta {
            kind: "package".into(),
            digest: digest.to_string(),
            files: manifest.file_count() as u64,
            bytes: manifest.content_bytes(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source,
        };
        write_json_atomic(&marker, &meta)?;
        timings.insert("publish", ms(start));
        Ok(PackageEntry {
            digest,
            path,
            files: meta.files,
            bytes: meta.bytes,
            created: true,
            timings_ms: timings,
        })
    }

    /// Creates a staging directory owned (locked) by this process.
    pub fn new_staging(&self) -> Result<Staging, StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let _creating = LockFile::acquire(
            &self.lock_path("staging"),
            LockMode::Shared,
            self.options.lock_timeout,
        )?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = format!(
            "{}-{nanos:09}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let staging_dir = self.root.join("staging");
        let lock = LockFile::acquire(
            &staging_dir.join(format!("{id}.lock")),
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )?;
        let path = staging_dir.join(&id);
        fs_err::create_dir(&path)?;
        Ok(Staging {
            path,
            lock: Some(lock),
            trash: self.root.join("trash"),
            committed: false,
        })
    }

    /// Moves `path` (inside the store) to trash under a unique name, then deletes it.
    fn discard(&self, path: &Path, name: &str) -> std::io::Result<()> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let target = self
            .root
            .join("trash")
            .join(format!("{name}-{}-{nanos}", std::process::id()));
        // Moving a directory to another parent rewrites its `..`: a sealed (0555) entry must
        // be made writable first. lstat: a symlink is never followed.
        if let Ok(meta) = path.symlink_metadata()
            && meta.is_dir()
        {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
        }
        match fs_err::rename(path, &target) {
            // Another sweeper got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        remove_tree(&target)
    }

    /// Removes dead builders' staging dirs and empties the trash (see the module doc).
    pub fn sweep(&self) -> Result<(), StoreError> {
        if let Some(_sweeping) = LockFile::try_acquire(&self.lock_path("staging"), LockMode::Exclusive)? {
            let staging_dir = self.root.join("staging");
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
        for entry in fs_err::read_dir(self.root.join("trash"))? {
            match remove_tree(&entry?.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }
}

fn is_staging_id(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

/// A build in progress. Dropped without [`Staging::committed`], it goes to trash.
pub struct Staging {
    path: PathBuf,
    lock: Option<LockFile>,
    trash: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn committed(mut self) {
        self.committed = true;
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let name = self.path.file_name().expect("staging dirs have names").to_owned();
            let target = self.trash.join(name);
            if std::fs::rename(&self.path, &target).is_ok() {
                let _ = remove_tree(&target);
            }
        }
        if let Some(lock) = self.lock.take() {
            let _ = lock.remove();
        }
    }
}

/// Names the step and entry in an I/O failure (disk full, permissions), so the error says
/// what renv was doing; the input's own errors (a bad archive, a changed file) pass through.
fn during<E: Into<StoreError>>(step: &'static str, entry: &str) -> impl FnOnce(E) -> StoreError {
    let entry = entry.to_string();
    move |e| {
        let e = e.into();
        let io = match &e {
            StoreError::Io(io) => Some(io),
            StoreError::Package(PackageError::Io(io)) => Some(io),
            StoreError::Archive(ArchiveError::Io(io)) => Some(io),
            _ => None,
        };
        match io {
            Some(io) => StoreError::Io(std::io::Error::new(io.kind(), format!("{step} {entry}: {io}"))),
            None => e,
        }
    }
}

/// Runs `work` once per key in this process; every caller gets its result, a failure as
/// the same shared error.
fn run_flight<V: Clone>(
    flights: &SingleFlight<String, Result<V, Arc<StoreError>>>,
    key: String,
    work: impl FnOnce() -> Result<V, StoreError>,
) -> Result<V, StoreError> {
    let (result, _leader) = flights.run(key, || work().map_err(Arc::new));
    result.map_err(|e| match Arc::try_unwrap(e) {
        Ok(e) => e,
        Err(shared) => StoreError::Shared(shared),
    })
}

fn ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        // A marker that does not parse was never completely written: treat it as absent.
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{e} (while reading {})", path.display()),
        )),
    }
}

/// Writes `value` to `path` durably: tmp file, fsync, rename, fsync the directory.
fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().expect("store files live in a directory");
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let mut file = fs_err::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value).expect("serializable"))?;
    file.sync_all()?;
    fs_err::rename(&tmp, path)?;
    fsync_dir(dir)
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
    match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => {
            make_writable(path)?;
            std::fs::remove_dir_all(path)
        }
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Makes a staged tree durable before it is published: fdatasync every file (writeback
/// was started as each was written, so this mostly waits for I/O already under way) and
/// fsync every directory, in parallel. Per-file rather than `syncfs`, so the cost is our
/// own data, never whatever else is dirty on a busy node's filesystem.
fn sync_tree(
    root: &Path,
    manifest: &package::Manifest,
    threads: usize,
    progress: &Progress,
) -> std::io::Result<()> {
    let entries = manifest.entries();
    let phase = progress.phase("syncing", entries.len() as u64);
    package::parallel_map(entries.len(), threads, |i| {
        let entry = &entries[i];
        phase.inc(1);
        match entry.kind {
            package::EntryKind::File { .. } => fs_err::File::open(root.join(&entry.path))?.sync_data(),
            package::EntryKind::Dir => fsync_dir(&root.join(&entry.path)),
            package::EntryKind::Symlink { .. } => Ok(()),
        }
    })?;
    phase.finish();
    fsync_dir(root)
}
