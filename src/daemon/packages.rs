//! Uploaded packages (`renv package` zips) going into the store, and the bytes the store's
//! packages take. Nothing here knows about HTTP: an upload is a stream of chunks.
//!
//! An upload streams into a staging dir, capped at the store's unpack limit (on the
//! declared length first, then on the bytes actually received), and is unpacked and
//! published only if it is the package its digest names.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;

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

/// Stores the zip that `body` streams, if it is package `digest` and within the limit.
/// `declared` is the length the client announced, if any; a package already stored is
/// answered at once without reading the body.
pub async fn put<B, E>(
    store: &Arc<Store>,
    digest: PackageDigest,
    declared: Option<u64>,
    body: impl Stream<Item = Result<B, E>>,
) -> Result<Uploaded, StateError>
where
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    if let Ok(Some(entry)) = store.find(digest) {
        return Ok(Uploaded {
            created: false,
            files: entry.files,
        });
    }
    let cap = store.options().unpack_limits.max_bytes;
    if declared.is_some_and(|len| len > cap) {
        return Err(StateError::TooLarge(format!(
            "package upload exceeds the limit of {cap} bytes"
        )));
    }
    let staging = store.stage().map_err(|e| StateError::Internal(e.to_string()))?;
    let zip_path = upload::zip_path(&staging);
    let mut file = tokio::fs::File::create(&zip_path)
        .await
        .map_err(|e| StateError::Internal(e.to_string()))?;
    let mut stream = std::pin::pin!(body);
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| StateError::bad_request("body", format!("reading the upload: {e}")))?;
        let chunk = chunk.as_ref();
        received += chunk.len() as u64;
        if received > cap {
            return Err(StateError::TooLarge(format!(
                "package upload exceeds the limit of {cap} bytes"
            )));
        }
        file.write_all(chunk)
            .await
            .map_err(|e| StateError::Internal(e.to_string()))?;
    }
    file.flush()
        .await
        .map_err(|e| StateError::Internal(e.to_string()))?;
    drop(file);
    let store = Arc::clone(store);
    let entry = tokio::task::spawn_blocking(move || upload::commit(&store, staging, digest))
        .await
        .map_err(|e| StateError::Internal(e.to_string()))?
        .map_err(|e| match e {
            SourceError::DigestMismatch { .. } => StateError::bad_request("digest", e.to_string()),
            SourceError::Archive { source, .. } => StateError::BadArchive(source.to_string()),
            other => StateError::from(crate::Error::from(other)),
        })?;
    Ok(Uploaded {
        created: entry.created,
        files: entry.files,
    })
}

/// Bytes of committed packages, from their markers.
pub fn package_bytes(store: &Store) -> u64 {
    store.bytes_of(EntryKind::Package)
}
