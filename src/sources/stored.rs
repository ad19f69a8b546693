//! `pkg://<digest>`: a package already in the store (built here, or uploaded), or else in
//! the shared package store (`--remote`), fetched and checked against its digest.

use super::SourceError;
use crate::digest::PackageDigest;
use crate::progress::Progress;
use crate::remote::Remotes;
use crate::store::{PackageEntry, Store};

pub fn ensure(
    store: &Store,
    remotes: &Remotes,
    digest: PackageDigest,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    if let Some(hit) = store.find(digest)? {
        return Ok(hit);
    }
    super::remote::fetch_shared(store, remotes, digest, progress)?.ok_or_else(|| SourceError::NotFound {
        digest,
        remote: remotes.shared.as_ref().map(|r| r.as_str().to_string()),
    })
}
