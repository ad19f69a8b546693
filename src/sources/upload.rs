//! A zip uploaded to the daemon (`PUT /v1/packages/<digest>`), as a stream of chunks:
//! written into a staging dir, capped at the store's unpack limit (on the declared length
//! first, then on the bytes actually received), then unpacked beside it and committed only
//! if what it unpacks to is exactly the digest the upload claimed; else nothing is kept.
//! The staged file is created once and unpacked through that same open file
//! ([`OpenZip`](crate::package::zip_read::OpenZip)), never reopened by its path.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::SourceError;
use crate::digest::PackageDigest;
use crate::progress::Progress;
use crate::store::{PackageEntry, Staging, Store};

/// Receives an upload that claims to be package `expected`. `declared` is the length the
/// client announced, if any; an upload that sends nothing for `idle` is dropped (a client
/// that stops must not hold its connection and staging dir forever). A package already
/// stored is answered at once, without reading the body.
pub async fn receive<B, E>(
    store: &Arc<Store>,
    expected: PackageDigest,
    declared: Option<u64>,
    body: impl Stream<Item = Result<B, E>>,
    idle: std::time::Duration,
) -> Result<PackageEntry, SourceError>
where
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    if let Some(hit) = store.find(expected)? {
        return Ok(hit);
    }
    let limit = store.options().unpack_limits.max_bytes;
    if declared.is_some_and(|len| len > limit) {
        return Err(SourceError::TooLarge { limit });
    }
    // Off the event loop: a sweep by another process may hold the staging lock.
    let staging = {
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || store.stage())
            .await
            .map_err(|e| SourceError::Io(std::io::Error::other(format!("staging the upload: {e}"))))??
    };
    let zip = zip_path(&staging);
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&zip)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("{e} (while creating {})", zip.display())))?;
    let mut body = std::pin::pin!(body);
    let mut received = 0u64;
    loop {
        let Ok(next) = tokio::time::timeout(idle, body.next()).await else {
            return Err(SourceError::Body(format!(
                "nothing received for {} s",
                idle.as_secs()
            )));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| SourceError::Body(e.to_string()))?;
        let chunk = chunk.as_ref();
        received += chunk.len() as u64;
        if received > limit {
            return Err(SourceError::TooLarge { limit });
        }
        file.write_all(chunk).await?;
    }
    file.flush().await?;
    let file = file.into_std().await;
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || commit(&store, staging, expected, file))
        .await
        .map_err(|e| SourceError::Io(std::io::Error::other(format!("unpacking the upload: {e}"))))?
}

/// Where in its staging dir an upload's bytes are written.
fn zip_path(staging: &Staging) -> std::path::PathBuf {
    staging.work_dir().join("upload.zip")
}

/// Unpacks the upload in `staging` (written at [`zip_path`], still open as `file`) and
/// commits it as `expected`.
fn commit(
    store: &Store,
    staging: Staging,
    expected: PackageDigest,
    file: std::fs::File,
) -> Result<PackageEntry, SourceError> {
    if let Some(hit) = store.find(expected)? {
        return Ok(hit);
    }
    let zip = zip_path(&staging);
    super::zip::commit_received(
        store,
        staging,
        file,
        &zip,
        Some(expected),
        Value::String("upload".into()),
        &format!("the upload of pkg://{expected}"),
        &Progress::hidden(),
    )
}
