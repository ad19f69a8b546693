//! A zip uploaded to the daemon (`PUT /v1/packages/<digest>`): the body is streamed into
//! a staging dir by the daemon (capped there), then unpacked beside it and committed only
//! if what it unpacks to is exactly the digest the upload claimed; else nothing is kept.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;

use super::{SourceError, during};
use crate::digest::PackageDigest;
use crate::package;
use crate::progress::Progress;
use crate::store::{PackageEntry, Staging, Store};

/// Where in its staging dir the daemon writes the upload's bytes.
pub fn zip_path(staging: &Staging) -> std::path::PathBuf {
    staging.work_dir().join("upload.zip")
}

/// Unpacks the upload in `staging` (written at [`zip_path`]) and commits it as `expected`.
pub fn commit(store: &Store, staging: Staging, expected: PackageDigest) -> Result<PackageEntry, SourceError> {
    if let Some(hit) = store.find(expected)? {
        return Ok(hit);
    }
    let progress = Progress::hidden();
    let zip = zip_path(&staging);
    let start = Instant::now();
    let unpack = || -> Result<package::Manifest, SourceError> {
        fs_err::create_dir(staging.entry_dir())?;
        package::zip_read::unpack(
            &zip,
            &staging.entry_dir(),
            store.options().unpack_limits,
            store.options().threads,
            &progress,
        )
        .map_err(|source| SourceError::Archive { path: None, source })
    };
    let manifest = unpack().map_err(during("unpacking", &format!("the upload of pkg://{expected}")))?;
    let unpack_ms = start.elapsed().as_millis() as u64;
    let digest = manifest.digest();
    if digest != expected {
        return Err(SourceError::DigestMismatch {
            expected,
            actual: digest,
        });
    }
    let commit = crate::store::Commit {
        contents: crate::store::Contents::Manifest(&manifest),
        source: Value::String("upload".into()),
        description: Value::Null,
        timings_ms: BTreeMap::from([("unpack", unpack_ms)]),
    };
    store
        .commit_staged(staging, digest, commit, &progress)
        .map_err(|e| during("publishing", &format!("pkg://{digest}"))(e.into()))
}
