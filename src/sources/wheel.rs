//! Wheels listed in `py_modules`: installed into the env (Ray runs `pip install` for
//! them), so they are part of the env's identity by content.
//!
//! A wheel is kept in the store as a package holding that one file, under its own name
//! (the installer reads the distribution, version and tags from it): content-addressed
//! like any package, fetched from a remote once per revision, shared by every env that
//! installs it, and readable by a build user, who installs it from there.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::Digest as _;

use super::SourceError;
use crate::digest::PackageDigest;
use crate::package::PackageError;
use crate::progress::Progress;
use crate::remote::{RemoteUri, Remotes};
use crate::store::{Commit, Contents, PackageEntry, Staging, Store};

/// Where a wheel comes from, resolved.
#[derive(Debug, Clone)]
pub enum WheelSource {
    /// A file on this machine.
    Local(PathBuf),
    Remote(RemoteUri),
    /// The file `file` at the top of a stored package.
    Stored {
        package: PackageDigest,
        file: String,
    },
}

/// A wheel in the store, ready to install.
#[derive(Debug, Clone)]
pub struct WheelFile {
    /// The package holding it.
    pub entry: PackageEntry,
    pub file_name: String,
    /// Hex sha256 of the file, as pip's RECORD and hashes spell it: the env's identity.
    pub sha256: String,
}

impl WheelFile {
    pub fn path(&self) -> PathBuf {
        self.entry.path.join(&self.file_name)
    }
}

pub fn ensure(
    store: &Store,
    remotes: &Remotes,
    source: &WheelSource,
    file_name: &str,
    progress: &Progress,
) -> Result<WheelFile, SourceError> {
    let entry = match source {
        WheelSource::Local(path) => {
            let staging = store.stage()?;
            let copy = staging.work_dir().join("wheel");
            fs_err::copy(path, &copy)?;
            commit_file(
                store,
                staging,
                &copy,
                file_name,
                &format!("file:{}", path.display()),
                progress,
            )?
        }
        WheelSource::Remote(uri) => super::remote::ensure_as(
            store,
            remotes,
            uri,
            super::remote::Keep::File(file_name),
            progress,
        )?,
        WheelSource::Stored { package, .. } => super::stored::ensure(store, remotes, *package, progress)?,
    };
    let path = entry.path.join(file_name);
    // The store's own file, but a stored package is anyone's upload: a regular file only.
    match fs_err::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => {}
        _ => {
            return Err(PackageError::NotFound(path).into());
        }
    }
    Ok(WheelFile {
        sha256: sha256_of(&path)?,
        file_name: file_name.to_string(),
        entry,
    })
}

/// Commits the file at `file` (inside `staging`'s work dir) as the one file of a
/// package, named `name`.
pub(super) fn commit_file(
    store: &Store,
    staging: Staging,
    file: &Path,
    name: &str,
    source: &str,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    let entry_dir = staging.entry_dir();
    fs_err::create_dir(&entry_dir)?;
    fs_err::rename(file, entry_dir.join(name))?;
    let tree = crate::package::scan::scan_exact(&entry_dir, store.options().threads)?;
    let digest = tree.manifest.digest();
    let commit = Commit {
        contents: Contents::Manifest(&tree.manifest),
        source: Value::String(source.to_string()),
        description: Value::Null,
        timings_ms: Default::default(),
    };
    Ok(store.commit_staged(staging, digest, commit, progress)?)
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
