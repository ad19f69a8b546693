//! A zip file on this machine (a local `.zip` working_dir, or `file://…zip`).
//!
//! A zip seen before (same bytes, by blake3 — from the stat cache when the file is
//! unchanged) is recognized through its alias (`meta/zip-<digest>.json`) and not unpacked
//! again. A new one is unpacked into staging under the zip's own lock, so concurrent
//! requests for one zip unpack it once; the store then commits it under the digest of
//! what it unpacked to, and the alias is recorded.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use super::{SourceError, during};
use crate::digest::Digest;
use crate::package::hash_cache::HashCache;
use crate::package::{self, PackageError};
use crate::progress::Progress;
use crate::store::{Commit, Contents, LockMode, LockName, PackageEntry, Store};

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
    let (zip_digest, zip_meta) = hash_zip(store, zip_path)?;
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
        package::zip_read::unpack(
            zip_path,
            &staging.entry_dir(),
            store.options().unpack_limits,
            store.options().threads,
            progress,
        )
        .map_err(|source| SourceError::Archive { path: None, source })
    };
    let manifest = unpack().map_err(during("unpacking", &zip_path.display().to_string()))?;
    let unpack_ms = start.elapsed().as_millis() as u64;
    // The alias below vouches that these zip bytes give this tree: the file must not have
    // changed between hashing and unpacking.
    if !HashCache::same_state(&zip_meta, &fs_err::metadata(zip_path)?) {
        return Err(PackageError::Changed(zip_path.to_path_buf()).into());
    }
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

/// blake3 of a zip's bytes, from the stat cache when the file is unchanged, and the file's
/// metadata at that moment.
fn hash_zip(store: &Store, zip_path: &Path) -> std::io::Result<(Digest, std::fs::Metadata)> {
    let zip_path = fs_err::canonicalize(zip_path)?;
    let cache_path = HashCache::path_for(&store.layout().hash_cache_dir(), &zip_path);
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
