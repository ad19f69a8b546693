//! Where everything in the store lives: the one module that spells a directory, file or
//! lock name of the on-disk layout (uv's `CacheBucket`, cargo's `GlobalCacheTracker`).
//!
//! ```text
//! <store>/store-v1/             the layout version is the directory name: a new format is
//!                               a new directory, never a migration
//!   pkgs/<digest>/              unpacked packages (working_dir trees), read-only once committed
//!   envs/<key>/                 virtualenvs, directories read-only once committed
//!   meta/pkg-<digest>.json      the completion marker of a package ([`super::Marker`])
//!   meta/env-<key>.json         the completion marker of an env
//!   meta/zip-<zip digest>.json  which package a zip (by the blake3 of its bytes) unpacked to
//!   locks/pkg-<digest>.lock     per entry: exclusive while building or deleting it, shared
//!   locks/env-<key>.lock          while leased (something runs in it)
//!   locks/zip-<zip digest>.lock exclusive while unpacking that zip
//!   locks/staging.lock          shared while creating a staging dir, exclusive to sweep
//!   locks/prune.lock            one prune at a time
//!   locks/uv-cache.lock         shared by builds using the uv cache, exclusive to prune it
//!   locks/tool-<name>.lock      exclusive while bootstrapping a tool into tools/
//!   locks/build-user-<uid>.lock held by the build running as that build user
//!   locks/daemon.lock           held by the one daemon serving the store
//!   staging/<id>/ + <id>.lock   builds in progress; the .lock is held by the live builder
//!   trash/                      entries being deleted
//!   cache/hashes/<digest>.json  stat caches of local sources (see `package::hash_cache`)
//!   cache/probes/               cached `python -c …` / `uv --version` answers
//!   cache/synced-inodes         inodes of the uv cache a commit made durable already
//!   pycache/<uid>/<abs path>/…  bytecode written by the workers of one user, that user's
//!                               own (PYTHONPYCACHEPREFIX: one tree mirroring source paths;
//!                               an env's part goes with the env)
//!   tools/<name>/               bootstrapped tools (the pinned uv)
//!   uv-cache/                   the installer's wheel cache, on this filesystem so installs hardlink
//!   uv-cache-<b>-for-<c>/       the wheel cache of builds as build user <b> for caller <c>
//!   logs/                       build logs; logs/workers/: worker output
//!   state/daemon.db             what the daemon knows that must survive it: references,
//!                               workers, their GPUs (SQLite, see [`super::state_db`])
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, EnvKey, PackageDigest};

/// The layout version; bump it (and the directory name) for any on-disk format change.
pub const LAYOUT_DIR: &str = "store-v1";

/// How the wheel caches of build users' builds are named (see
/// [`Layout::uv_cache_dir_of_build`]).
pub const BUILD_CACHE_PREFIX: &str = "uv-cache-";

/// Empty files kept ready in [`Layout::worker_logs_dir`] to become a worker's logs by
/// rename; always fresh, and never pruned as old logs.
pub const SPARE_LOG_PREFIX: &str = ".spare-";

/// The kinds of committed entry. Everything about an entry's place on disk derives from
/// its kind and digest ([`EntryId`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// An unpacked tree (a working_dir or a py_module), named by its manifest digest.
    Package,
    /// A virtualenv, named by the digest of its description.
    Env,
}

impl EntryKind {
    pub const ALL: [EntryKind; 2] = [EntryKind::Package, EntryKind::Env];

    /// As `renv ls` shows it and markers record it.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Package => "package",
            EntryKind::Env => "env",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            EntryKind::Package => "pkgs",
            EntryKind::Env => "envs",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            EntryKind::Package => "pkg",
            EntryKind::Env => "env",
        }
    }
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One entry of the store: its kind and its full digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    pub kind: EntryKind,
    pub digest: Digest,
}

impl From<PackageDigest> for EntryId {
    fn from(digest: PackageDigest) -> Self {
        EntryId {
            kind: EntryKind::Package,
            digest: digest.0,
        }
    }
}

impl From<EnvKey> for EntryId {
    fn from(key: EnvKey) -> Self {
        EntryId {
            kind: EntryKind::Env,
            digest: key.0,
        }
    }
}

/// `pkg-<digest>` / `env-<key>`: the stem of the entry's marker and lock files.
impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.kind.prefix(), self.digest)
    }
}

/// `pkg-<digest>` / `env-<key>`, as [`EntryId`]'s `Display` writes it.
impl std::str::FromStr for EntryId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (prefix, digest) = s
            .split_once('-')
            .ok_or_else(|| format!("not an entry name: {s:?}"))?;
        let kind = EntryKind::ALL
            .into_iter()
            .find(|kind| kind.prefix() == prefix)
            .ok_or_else(|| format!("not an entry name: {s:?}"))?;
        let digest = digest.parse().map_err(|e| format!("{s:?}: {e}"))?;
        Ok(EntryId { kind, digest })
    }
}

/// A typed name of an entry: [`PackageDigest`] or [`EnvKey`].
pub trait EntryName: Copy + Into<EntryId> + Send + Sync + 'static {}
impl EntryName for PackageDigest {}
impl EntryName for EnvKey {}

/// Every lock file of the store.
#[derive(Debug, Clone, Copy)]
pub enum LockName<'a> {
    Entry(EntryId),
    /// Unpacking the zip with these bytes (lock order: zip lock, then package lock).
    Zip(Digest),
    /// Fetching the remote object whose URI has this digest (then the package lock).
    Remote(Digest),
    Staging,
    Prune,
    UvCache,
    /// Held by the one build running as this build user on the node.
    BuildUser(u32),
    /// Bootstrapping the tool `tools/<name>`.
    Tool(&'a str),
    /// Held by the one daemon serving the store.
    Daemon,
}

/// The paths of one store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// Directories [`Layout::create`] makes.
const SUBDIRS: [&str; 14] = [
    "pkgs",
    "envs",
    "meta",
    "locks",
    "staging",
    "trash",
    "logs",
    "logs/workers",
    "cache/hashes",
    "cache/probes",
    "tools",
    "uv-cache",
    "pycache",
    "state",
];

/// Checks `dir` and every directory above it: anyone who could rename a directory on
/// the way could swap the whole store for one of their own while renv works in it by
/// path. Each must belong to root or to the user running renv, and one writable by
/// others must be sticky (as /tmp is).
pub(super) fn check_ancestors(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = crate::sys::geteuid();
    for dir in dir.ancestors() {
        let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if meta.uid() != me && meta.uid() != 0 {
            return Err(format!(
                "{} belongs to uid {}; a store must be reached only through directories of \
                 root or of its owner (uid {me}), or that user could swap the store under renv",
                dir.display(),
                meta.uid()
            ));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(format!(
                "{} is writable by others without the sticky bit (mode {:o}); anyone could \
                 swap the store under renv",
                dir.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(())
}

impl Layout {
    /// The layout under the store directory `store_dir` (which must be absolute).
    pub fn new(store_dir: &Path) -> Layout {
        Layout {
            root: store_dir.join(LAYOUT_DIR),
        }
    }

    /// Creates what is missing (a new `store-v1` is 0700: who else may reach it is the
    /// owner's decision, see [`super::Store::grant_traverse`]) and checks that the store
    /// cannot be turned against whoever runs this: every directory of the layout is a real
    /// directory (never a symlink, which a command would follow) owned by the current user
    /// and writable by no one else. A store is used directly by its owner only; root never
    /// maintains another user's store (its owner could plant symlinks for root to follow).
    pub(super) fn create(&self) -> Result<(), String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let me = crate::sys::geteuid();
        let check = |dir: &Path| -> Result<(), String> {
            use std::os::unix::fs::MetadataExt;
            let shown = dir.display();
            let meta = match std::fs::symlink_metadata(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mode = if dir == self.root { 0o700 } else { 0o755 };
                    match std::fs::DirBuilder::new().mode(mode).create(dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                            return Err(format!("cannot create {shown}: {e}"));
                        }
                        _ => std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?,
                    }
                }
                other => other.map_err(|e| format!("{shown}: {e}"))?,
            };
            if meta.file_type().is_symlink() {
                return Err(format!(
                    "{shown} is a symlink; a store's directories must be real directories"
                ));
            }
            if !meta.is_dir() {
                return Err(format!("{shown} is not a directory"));
            }
            if meta.uid() != me {
                return Err(format!(
                    "{shown} belongs to uid {}, not to uid {me} running renv; a store is used only by \
                     its owner (run renv as uid {}, or go through the daemon that owns it)",
                    meta.uid(),
                    meta.uid()
                ));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(format!(
                    "{shown} is writable by others (mode {:o}); only the store's owner may write it \
                     (chmod go-w)",
                    meta.mode() & 0o7777
                ));
            }
            Ok(())
        };
        check_ancestors(self.root.parent().unwrap_or(Path::new("/")))?;
        check(&self.root)?;
        for sub in SUBDIRS {
            let mut dir = self.root.clone();
            for part in Path::new(sub) {
                dir.push(part);
                check(&dir)?;
            }
        }
        // What a daemon's callers reach (through `store-v1`'s ACL) they reach by name,
        // never by listing: their workers' envs and packages, their logs, their bytecode
        // cache, and (the build user) its staging dir. The rest is the owner's alone:
        // locks (whoever can open one can hold it and stall the store), markers and
        // caches (which say what others asked for), trash.
        for (sub, mode) in [
            ("pkgs", 0o711),
            ("envs", 0o711),
            ("meta", 0o700),
            ("locks", 0o700),
            ("staging", 0o711),
            ("trash", 0o700),
            ("logs", 0o711),
            ("logs/workers", 0o711),
            ("cache", 0o700),
            ("state", 0o700),
            ("tools", 0o755),
            ("uv-cache", 0o700),
            ("pycache", 0o711),
        ] {
            std::fs::set_permissions(self.root.join(sub), std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", self.root.join(sub).display()))?;
        }
        Ok(())
    }

    /// `<store>/store-v1`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the committed entries of `kind` live (`pkgs/`, `envs/`).
    pub fn entries_dir(&self, kind: EntryKind) -> PathBuf {
        self.root.join(kind.dir())
    }

    pub fn entry_path(&self, id: EntryId) -> PathBuf {
        self.entries_dir(id.kind).join(id.digest.to_string())
    }

    /// The entry named by a directory in [`Self::entries_dir`], if the name is a digest
    /// (anything else there is not the store's and is never touched).
    pub fn entry_named(&self, kind: EntryKind, name: &str) -> Option<EntryId> {
        let digest = name.parse().ok()?;
        Some(EntryId { kind, digest })
    }

    pub fn meta_dir(&self) -> PathBuf {
        self.root.join("meta")
    }

    pub fn marker_path(&self, id: EntryId) -> PathBuf {
        self.meta_dir().join(marker_name(id))
    }

    /// Which package the zip with these bytes unpacked to.
    pub fn zip_alias_path(&self, zip: Digest) -> PathBuf {
        self.meta_dir().join(format!("zip-{zip}.json"))
    }

    /// Which package the remote object whose URI has digest `uri` unpacked to, and at
    /// which revision of the object.
    pub fn remote_alias_path(&self, uri: Digest) -> PathBuf {
        self.meta_dir().join(format!("remote-{uri}.json"))
    }

    /// Whether a file in [`Self::meta_dir`] is an alias (of a zip or a remote object).
    pub fn is_alias(&self, file_name: &str) -> bool {
        let digest = |prefix: &str| {
            file_name
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(".json"))
                .is_some_and(|d| d.parse::<Digest>().is_ok())
        };
        digest("zip-") || digest("remote-")
    }

    pub fn lock_path(&self, lock: LockName<'_>) -> PathBuf {
        self.locks_dir().join(lock_file_name(lock))
    }

    /// Every lock file (`<name>.lock`; an entry's is named by [`EntryId`]'s spelling).
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// Build logs.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// A build's log while it runs (unique per attempt).
    pub fn build_log_path(&self, id: EntryId, attempt: &str) -> PathBuf {
        self.logs_dir().join(format!("build-{id}-{attempt}.log"))
    }

    /// The last successful build's log, under a stable name.
    pub fn last_build_log_path(&self, id: EntryId) -> PathBuf {
        self.logs_dir().join(format!("{id}.log"))
    }

    /// Worker output (`<worker id>.stdout` / `.stderr`).
    pub fn worker_logs_dir(&self) -> PathBuf {
        self.logs_dir().join("workers")
    }

    /// The daemon's state database (see [`super::state_db`]).
    pub fn state_db_path(&self) -> PathBuf {
        self.root.join("state").join("daemon.db")
    }

    /// Stat caches of local sources.
    pub fn hash_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("hashes")
    }

    /// Inodes shared with the installer's cache that a commit made durable (see
    /// `store::synced_inodes`).
    pub fn synced_inodes_path(&self) -> PathBuf {
        self.root.join("cache").join("synced-inodes")
    }

    /// Cached answers of `python -c …` / `uv --version`.
    pub fn probe_cache_dir(&self) -> PathBuf {
        self.root.join("cache").join("probes")
    }

    /// Where the tool `name` (e.g. `uv-0.9.0`) is bootstrapped.
    pub fn tool_dir(&self, name: &str) -> PathBuf {
        self.root.join("tools").join(name)
    }

    /// The installer's wheel cache: on the store's filesystem, so installs hardlink.
    pub fn uv_cache_dir(&self) -> PathBuf {
        self.root.join("uv-cache")
    }

    /// The wheel cache of builds run as the build user `build_uid` for the caller
    /// `caller` (lent to the build user only while such a build runs).
    pub fn uv_cache_dir_of_build(&self, build_uid: u32, caller: u32) -> PathBuf {
        self.root
            .join(format!("{BUILD_CACHE_PREFIX}{build_uid}-for-{caller}"))
    }

    /// The users' bytecode caches, outside the read-only entries.
    pub fn pycache_dir(&self) -> PathBuf {
        self.root.join("pycache")
    }

    /// The bytecode cache (`PYTHONPYCACHEPREFIX`) of the workers of the user `uid`: theirs
    /// alone, so no user loads bytecode another wrote. Python mirrors each source's
    /// absolute path under it, so an env's part goes with the env.
    pub fn pycache_of_uid(&self, uid: u32) -> PathBuf {
        self.pycache_dir().join(uid.to_string())
    }
}

/// The file name of `lock` in [`Layout::locks_dir`].
pub fn lock_file_name(lock: LockName<'_>) -> String {
    let name = match lock {
        LockName::Entry(id) => id.to_string(),
        LockName::Zip(digest) => format!("zip-{digest}"),
        LockName::Remote(digest) => format!("remote-{digest}"),
        LockName::Staging => "staging".into(),
        LockName::Prune => "prune".into(),
        LockName::UvCache => "uv-cache".into(),
        LockName::BuildUser(uid) => format!("build-user-{uid}"),
        LockName::Tool(name) => format!("tool-{name}"),
        LockName::Daemon => "daemon".into(),
    };
    format!("{name}.lock")
}

/// The file name of the entry's marker in [`Layout::meta_dir`].
pub fn marker_name(id: EntryId) -> String {
    format!("{id}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_kind_and_digest() {
        let layout = Layout::new(Path::new("/s"));
        let digest = Digest::of(b"x");
        let pkg = EntryId::from(PackageDigest(digest));
        let env = EntryId::from(EnvKey(digest));
        assert_eq!(
            layout.entry_path(pkg),
            Path::new(&format!("/s/store-v1/pkgs/{digest}"))
        );
        assert_eq!(
            layout.entry_path(env),
            Path::new(&format!("/s/store-v1/envs/{digest}"))
        );
        assert_eq!(
            layout.marker_path(pkg),
            Path::new(&format!("/s/store-v1/meta/pkg-{digest}.json"))
        );
        assert_eq!(
            layout.lock_path(LockName::Entry(env)),
            Path::new(&format!("/s/store-v1/locks/env-{digest}.lock"))
        );
        assert_eq!(layout.entry_named(EntryKind::Env, &digest.to_string()), Some(env));
        assert_eq!(layout.entry_named(EntryKind::Env, "not-a-digest"), None);
        let alias = layout.zip_alias_path(digest);
        let name = alias.file_name().unwrap().to_str().unwrap();
        assert!(layout.is_alias(name));
        let alias = layout.remote_alias_path(digest);
        assert!(layout.is_alias(alias.file_name().unwrap().to_str().unwrap()));
        assert!(!layout.is_alias(&format!("pkg-{digest}.json")));
    }
}
