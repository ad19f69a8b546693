//! Where packages come from. Each source fills a staging dir of the store its own way and
//! the store commits it: through a transaction (`Store::begin`) when the source knows the
//! package's digest before it writes anything, or `Store::stage` + `Store::commit_staged`
//! when it learns the digest by unpacking. Adding a source (an object store, an https URL)
//! is one new module here and one variant of [`PackageSource`], not an edit of the store
//! or the pipeline.
//!
//! - [`tree`]: a local directory, walked by `package::scan`, then hashed and copied.
//! - [`zip`]: a zip file on this machine, recognized by the digest of its bytes.
//! - [`stored`]: `pkg://<digest>`: committed already, or fetched from the shared package
//!   store (`--remote`) and checked against its digest.
//! - [`remote`]: a zip in remote storage (`s3://`, `gs://`, `https://`, shared `file://`),
//!   known by its URI and revision.
//! - [`wheel`]: a `py_modules` wheel, kept as the one file of a package.
//! - [`upload`]: a zip streamed to the daemon, claiming a digest it must unpack to. Not a
//!   [`PackageSource`]: nothing in a `runtime_env` names it; the daemon's upload route
//!   calls it.

pub mod remote;
pub mod stored;
pub mod tree;
pub mod upload;
pub mod wheel;
pub mod zip;

use std::path::PathBuf;

use crate::digest::PackageDigest;
use crate::package::PackageError;
use crate::package::scan::WalkedTree;
use crate::package::zip_read::ArchiveError;
use crate::progress::Progress;
use crate::remote::{RemoteError, RemoteUri, Remotes};
use crate::store::{PackageEntry, Store, StoreError};

/// A package as a request named it, resolved to something the store can ensure.
#[derive(Debug)]
pub enum PackageSource {
    /// A local directory, walked: its digest is known once its files are read.
    Tree(WalkedTree),
    /// A zip on this machine; its digest is known once unpacked (or from a previous unpack).
    Zip(PathBuf),
    /// An entry in the store, or in the shared package store.
    Stored(PackageDigest),
    /// A zip in remote storage.
    Remote(RemoteUri),
}

impl PackageSource {
    /// Ensures the package is committed, building it only if it is new.
    pub fn ensure(
        &self,
        store: &Store,
        remotes: &Remotes,
        progress: &Progress,
    ) -> Result<PackageEntry, SourceError> {
        match self {
            PackageSource::Tree(tree) => tree::ensure(store, tree, progress),
            PackageSource::Zip(path) => zip::ensure(store, path, progress),
            PackageSource::Stored(digest) => stored::ensure(store, remotes, *digest, progress),
            PackageSource::Remote(uri) => remote::ensure(store, remotes, uri, progress),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "pkg://{digest} is not in the store{}; upload or build it first",
        remote.as_ref().map(|r| format!(" nor in the shared remote {r}")).unwrap_or_default()
    )]
    NotFound {
        digest: PackageDigest,
        /// The shared package store that was asked too.
        remote: Option<String>,
    },
    #[error("{what} unpacks to package {actual}, not {expected}; nothing was kept")]
    DigestMismatch {
        what: String,
        expected: PackageDigest,
        actual: PackageDigest,
    },
    #[error("package upload exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// The upload's body could not be read (the client went away, a bad chunk).
    #[error("reading the upload: {0}")]
    Body(String),
    #[error(transparent)]
    Package(#[from] PackageError),
    /// A zip that cannot be used (named by its path; an upload has none).
    #[error("{}{source}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Archive {
        path: Option<PathBuf>,
        source: ArchiveError,
    },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl SourceError {
    /// True when the input is at fault (exit code 2), false for an internal failure.
    pub fn is_user_error(&self) -> bool {
        match self {
            SourceError::NotFound { .. }
            | SourceError::DigestMismatch { .. }
            | SourceError::TooLarge { .. }
            | SourceError::Body(_) => true,
            SourceError::Package(e) => e.is_user_error(),
            SourceError::Archive { source, .. } => matches!(source, ArchiveError::Rejected { .. }),
            SourceError::Remote(e) => e.is_user_error(),
            SourceError::Store(_) | SourceError::Io(_) => false,
        }
    }
}

/// Names the step and entry in an I/O failure (disk full, permissions), so the error says
/// what renv was doing; the input's own errors (a bad archive, a changed file) pass through.
fn during(step: &'static str, entry: &str) -> impl FnOnce(SourceError) -> SourceError {
    let entry = entry.to_string();
    move |e| {
        let io = match &e {
            SourceError::Io(io) | SourceError::Store(StoreError::Io(io)) => Some(io),
            SourceError::Package(PackageError::Io(io)) => Some(io),
            SourceError::Archive {
                source: ArchiveError::Io(io),
                ..
            } => Some(io),
            _ => None,
        };
        match io {
            Some(io) => SourceError::Io(std::io::Error::new(io.kind(), format!("{step} {entry}: {io}"))),
            None => e,
        }
    }
}
