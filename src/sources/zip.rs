//! A zip file on this machine (a local `.zip` working_dir, or `file://…zip`).
//!
//! A zip seen before (same bytes, by blake3 — from the stat cache when the file is
//! unchanged) is recognized through its alias (`meta/zip-<digest>.json`) and not unpacked
//! again. A new one is unpacked into staging under the zip's own lock, so concurrent
//! requests for one zip unpack it once; the store then commits it under the digest of
//! what it unpacked to, and the alias is recorded.
//!
//! The alias vouches that the zip with those bytes gives that tree, so the bytes hashed
//! must be the bytes unpacked: the zip is opened once ([`OpenZip`]) and both read that
//! open file, which must not change (by its fstat) until the tree is unpacked.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use super::{SourceError, during};
use crate::digest::{Digest, PackageDigest};
use crate::package::hash_cache::HashCache;
use crate::package::{self, zip_read::OpenZip};
use crate::progress::Progress;
use crate::store::{Commit, Contents, LockMode, LockName, PackageEntry, Staging, Store};

pub fn ensure(store: &Store, zip_path: &Path, progress: &Progress) -> Result<PackageEntry, SourceError> {
    let archive_error = |e: SourceError| match e {
        SourceError::Archive { path: None, source } => SourceError::Archive {
            path: Some(zip_path.to_path_buf()),
            source,
        },
        other => other,
    };
    ensure_inner(store, zip_path, progress).map_err(archive_error)
}

fn ensure_inner(store: &Store, zip_path: &Path, progress: &Progress) -> Result<PackageEntry, SourceError> {
    let start = Instant::now();
    let zip = OpenZip::open(zip_path).map_err(|source| SourceError::Archive { path: None, source })?;
    let zip_digest = hash_zip(store, &zip)?;
    let hash_ms = start.elapsed().as_millis() as u64;
    let with_hash_time = |mut entry: PackageEntry| {
        entry.timings_ms.insert("hash_zip", hash_ms);
        entry
    };
    let find_by_alias = || -> Result<Option<PackageEntry>, SourceError> {
        match store.zip_alias(zip_digest)? {
            Some(digest) => Ok(store.find(digest)?),
            None => Ok(None),
        }
    };
    if let Some(hit) = find_by_alias()? {
        return Ok(with_hash_time(hit));
    }
    let _zip_lock = store.lock(LockName::Zip(zip_digest), LockMode::Exclusive)?;
    if let Some(hit) = find_by_alias()? {
        return Ok(with_hash_time(hit));
    }
    let staging = store.stage()?;
    let start = Instant::now();
    let unpack = || -> Result<package::Manifest, SourceError> {
        fs_err::create_dir(staging.entry_dir())?;
        zip.unpack(
            &staging.entry_dir(),
            store.options().unpack_limits,
            store.options().threads,
            progress,
        )
        .map_err(|source| SourceError::Archive { path: None, source })
    };
    let manifest = unpack().map_err(during("unpacking", &zip_path.display().to_string()))?;
    let unpack_ms = start.elapsed().as_millis() as u64;
    // The alias below vouches that these zip bytes give this tree: the open file must not
    // have been written to between hashing and the end of unpacking.
    zip.check_unchanged()?;
    let digest = manifest.digest();
    let commit = Commit {
        contents: Contents::Manifest(&manifest),
        source: Value::String(format!("zip:{zip_digest}")),
        description: Value::Null,
        timings_ms: BTreeMap::from([("unpack", unpack_ms)]),
    };
    // Same tree from different zip bytes: the committed one wins.
    let entry = store
        .commit_staged(staging, digest, commit, progress)
        .map_err(|e| during("publishing", &format!("pkg://{digest}"))(e.into()))?;
    store.record_zip_alias(zip_digest, digest)?;
    Ok(with_hash_time(entry))
}

/// blake3 of the open zip's bytes: from the stat cache when the open file's fstat is the
/// one recorded, else read through the open file. The zip's path only names the cache
/// file (nothing is opened by it); the fstat decides whether an entry applies.
fn hash_zip(store: &Store, zip: &OpenZip) -> Result<Digest, SourceError> {
    let cache_path = std::path::absolute(zip.path())
        .ok()
        .map(|path| HashCache::path_for(&store.layout().hash_cache_dir(), &path));
    let cache = cache_path
        .as_deref()
        .map_or_else(HashCache::disabled, HashCache::load);
    if let Some(digest) = cache.lookup("", zip.metadata()) {
        return Ok(digest);
    }
    let digest = zip.hash()?;
    let stat = crate::package::hash_cache::StatKey::of(zip.metadata());
    if let Some(path) = cache_path
        && let Some(entry) = cache.entry("", &stat, digest)
    {
        // Best effort: a cache that cannot be written only costs a re-hash next time.
        let _ = cache.save(&path, &[entry], 1);
    }
    Ok(digest)
}

/// Unpacks a zip received into `staging` (written at `zip_path` there, still open as
/// `file`, never reopened by its path) and commits it: as `expected` when the sender
/// claimed a digest (anything else is refused and nothing kept), else as whatever it
/// unpacks to. `what` names the zip in errors.
#[allow(clippy::too_many_arguments)]
pub(super) fn commit_received(
    store: &Store,
    staging: Staging,
    file: std::fs::File,
    zip_path: &Path,
    expected: Option<PackageDigest>,
    source: Value,
    what: &str,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    let start = Instant::now();
    let unpack = || -> Result<package::Manifest, SourceError> {
        let zip = OpenZip::from_file(file, zip_path)
            .map_err(|source| SourceError::Archive { path: None, source })?;
        fs_err::create_dir(staging.entry_dir())?;
        zip.unpack(
            &staging.entry_dir(),
            store.options().unpack_limits,
            store.options().threads,
            progress,
        )
        .map_err(|source| SourceError::Archive { path: None, source })
    };
    let manifest = unpack().map_err(during("unpacking", what))?;
    let unpack_ms = start.elapsed().as_millis() as u64;
    let digest = manifest.digest();
    if let Some(expected) = expected
        && digest != expected
    {
        return Err(SourceError::DigestMismatch {
            what: what.to_string(),
            expected,
            actual: digest,
        });
    }
    let commit = Commit {
        contents: Contents::Manifest(&manifest),
        source,
        description: Value::Null,
        timings_ms: BTreeMap::from([("unpack", unpack_ms)]),
    };
    store
        .commit_staged(staging, digest, commit, progress)
        .map_err(|e| during("publishing", &format!("pkg://{digest}"))(e.into()))
}
