//! Uploaded packages (`renv package` zips) going into the store, and the bytes the store's
//! packages take. Nothing here knows about HTTP: an upload is a stream of chunks.
//!
//! An upload is one of the store's package sources (`sources::upload`); this maps its
//! outcomes to the daemon's errors.

use std::sync::Arc;

use futures_util::Stream;

use super::state::StateError;
use crate::digest::PackageDigest;
use crate::sources::{SourceError, upload};
use crate::store::{EntryKind, Store};

/// A package upload's outcome: whether it was new, and its file count.
pub struct Uploaded {
    pub created: bool,
    pub files: u64,
}

/// Whether the store holds the package.
pub fn has(store: &Store, digest: PackageDigest) -> Result<bool, StateError> {
    match store.find(digest) {
        Ok(found) => Ok(found.is_some()),
        Err(e) => Err(StateError::Internal(e.to_string())),
    }
}

/// Stores the zip that `body` streams, if it is package `digest` and within the limit
/// (see [`upload::receive`]).
pub async fn put<B, E>(
    store: &Arc<Store>,
    digest: PackageDigest,
    declared: Option<u64>,
    body: impl Stream<Item = Result<B, E>>,
    idle: std::time::Duration,
) -> Result<Uploaded, StateError>
where
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let entry = upload::receive(store, digest, declared, body, idle)
        .await
        .map_err(|e| match e {
            SourceError::TooLarge { .. } => StateError::TooLarge(e.to_string()),
            SourceError::Body(_) => StateError::bad_request("body", e.to_string()),
            SourceError::DigestMismatch { .. } => StateError::bad_request("digest", e.to_string()),
            SourceError::Archive { source, .. } => StateError::BadArchive(source.to_string()),
            other => StateError::from(crate::Error::from(other)),
        })?;
    Ok(Uploaded {
        created: entry.created,
        files: entry.files,
    })
}

/// Puts package `digest` in the shared package store (`--remote`), if one is configured:
/// `Some(sent)`, or `None` without one. Done before an upload is answered, so a package
/// uploaded to one node can be used on every node.
pub async fn push(
    store: &Arc<Store>,
    remotes: &Arc<crate::remote::Remotes>,
    digest: PackageDigest,
) -> Result<Option<bool>, StateError> {
    if remotes.shared.is_none() {
        return Ok(None);
    }
    let (store, remotes) = (Arc::clone(store), Arc::clone(remotes));
    tokio::task::spawn_blocking(move || crate::sources::remote::push(&store, &remotes, digest))
        .await
        .map_err(|e| StateError::Internal(format!("pushing pkg://{digest}: {e}")))?
        .map_err(|e| StateError::Upstream(format!("pushing pkg://{digest} to the shared remote: {e}")))
}

/// Bytes of committed packages, from their markers.
pub fn package_bytes(store: &Store) -> u64 {
    store.bytes_of(EntryKind::Package)
}
