//! Zips in remote storage: a `working_dir`/`py_modules` entry that is `s3://…`, `gs://…`,
//! `https://…` or `file://` on a shared filesystem (the remote side of [`super::zip`]), and
//! `pkg://<digest>` fetched from the shared package store (`--remote`).
//!
//! A remote URI maps to its package through an alias (`meta/remote-<digest of the URI>`)
//! that records the object's revision (version, ETag, or time and size): each use costs
//! one `HEAD`, and an object that changed is fetched again — where Ray keys its cache by
//! URI and keeps serving what it fetched first. A new object is downloaded under the
//! alias's lock, so concurrent requests (threads or processes) download it once; into a
//! staging dir, under the zip size cap, then unpacked with every check a local zip gets.
//! A failed or killed download leaves only staging, which is swept.

use std::os::unix::fs::OpenOptionsExt;

use serde_json::Value;

use super::SourceError;
use crate::digest::{Digest, PackageDigest};
use crate::progress::Progress;
use crate::remote::{ObjectInfo, RemoteUri, Remotes};
use crate::store::{LockMode, LockName, PackageEntry, Store};

/// What a download becomes in the store.
#[derive(Debug, Clone, Copy)]
pub enum Keep<'a> {
    /// The zip's contents (a working_dir, a py_module).
    Unpacked,
    /// The file itself, as the one file of a package, named so (a wheel).
    File(&'a str),
}

/// Ensures the zip at `uri` is committed; one `HEAD` when it is unchanged since last time.
pub fn ensure(
    store: &Store,
    remotes: &Remotes,
    uri: &RemoteUri,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    ensure_as(store, remotes, uri, Keep::Unpacked, progress)
}

/// Ensures the object at `uri` is committed as `keep` says.
pub fn ensure_as(
    store: &Store,
    remotes: &Remotes,
    uri: &RemoteUri,
    keep: Keep<'_>,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    let info = remotes.client.head(uri)?;
    let revision = info.revision();
    let find_by_alias = || -> Result<Option<PackageEntry>, SourceError> {
        match store.remote_alias(uri.as_str(), &revision)? {
            Some(digest) => Ok(store.find(digest)?),
            None => Ok(None),
        }
    };
    if let Some(hit) = find_by_alias()? {
        return Ok(hit);
    }
    let _fetching = store.lock(
        LockName::Remote(Digest::of(uri.as_str().as_bytes())),
        LockMode::Exclusive,
    )?;
    if let Some(hit) = find_by_alias()? {
        return Ok(hit);
    }
    let entry = download_and_commit(store, remotes, uri, &info, None, keep, progress)?;
    store.record_remote_alias(uri.as_str(), &revision, entry.id)?;
    Ok(entry)
}

/// Fetches package `digest` from the shared package store, if one is configured and holds
/// it: what it unpacks to must be `digest`, or nothing is kept. `None` when there is no
/// shared store or it does not hold the package.
pub fn fetch_shared(
    store: &Store,
    remotes: &Remotes,
    digest: PackageDigest,
    progress: &Progress,
) -> Result<Option<PackageEntry>, SourceError> {
    let Some(shared) = &remotes.shared else {
        return Ok(None);
    };
    let uri = shared.package(digest);
    let _fetching = store.lock(
        LockName::Remote(Digest::of(uri.as_str().as_bytes())),
        LockMode::Exclusive,
    )?;
    if let Some(hit) = store.find(digest)? {
        return Ok(Some(hit));
    }
    let info = match remotes.client.head(&uri) {
        Ok(info) => info,
        Err(crate::remote::RemoteError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    download_and_commit(
        store,
        remotes,
        &uri,
        &info,
        Some(digest),
        Keep::Unpacked,
        progress,
    )
    .map(Some)
}

fn download_and_commit(
    store: &Store,
    remotes: &Remotes,
    uri: &RemoteUri,
    info: &ObjectInfo,
    expected: Option<PackageDigest>,
    keep: Keep<'_>,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    if let Keep::Unpacked = keep
        && uri.scheme() != crate::remote::Scheme::File
    {
        let mut attempt = 0;
        loop {
            match unpack_while_downloading(store, remotes, uri, info, expected, progress) {
                Ok(entry) => return Ok(entry),
                Err(Streamed::Failed(e)) => return Err(e),
                Err(Streamed::Broke(e)) if attempt < remotes.client.options().retries => {
                    attempt += 1;
                    tracing::warn!(%uri, attempt, error = %e, "download broke off; starting again");
                    std::thread::sleep(std::time::Duration::from_millis(200 << attempt.min(5)));
                }
                Err(Streamed::Broke(e)) => return Err(e.into()),
                Err(Streamed::Again(why)) => {
                    tracing::info!(%uri, %why, "downloading again into a file, then unpacking");
                    break;
                }
            }
        }
    }
    let start = std::time::Instant::now();
    let staging = store.stage()?;
    let zip_path = staging.work_dir().join("download.zip");
    let mut file = std::fs::OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create_new(true)
        .open(&zip_path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{e} (while creating {})", zip_path.display())))?;
    let limit = store.options().unpack_limits.max_bytes;
    remotes.client.download(uri, info, &mut file, limit)?;
    let download_ms = start.elapsed().as_millis() as u64;
    if let Keep::File(name) = keep {
        drop(file);
        let mut entry = super::wheel::commit_file(store, staging, &zip_path, name, uri.as_str(), progress)?;
        entry.timings_ms.insert("download", download_ms);
        return Ok(entry);
    }
    let mut entry = super::zip::commit_received(
        store,
        staging,
        file,
        &zip_path,
        expected,
        Value::String(uri.to_string()),
        uri.as_str(),
        progress,
    )?;
    entry.timings_ms.insert("download", download_ms);
    Ok(entry)
}

/// Why [`unpack_while_downloading`] did not commit.
enum Streamed {
    /// For good: the object changed, is too large, is not there, or the store failed.
    Failed(SourceError),
    /// The download broke off: try again, as a download into a file would.
    Broke(crate::remote::RemoteError),
    /// Try the other way (download into a file, then unpack): the zip is not one
    /// [`zip_stream`](crate::package::zip_stream) unpacks, or writing the tree failed
    /// (the other way says why in its own words).
    Again(String),
}

/// Unpacks the zip into staging while it downloads, keeping no copy of the zip (see
/// [`crate::package::zip_stream`]), and commits what it unpacked to, as
/// [`super::zip::commit_received`] would. Timings: `download` until the last byte came,
/// `unpack` what the unpack took after that.
fn unpack_while_downloading(
    store: &Store,
    remotes: &Remotes,
    uri: &RemoteUri,
    info: &ObjectInfo,
    expected: Option<PackageDigest>,
    progress: &Progress,
) -> Result<PackageEntry, Streamed> {
    use crate::package::zip_stream::{StreamError, unpack_stream};
    use crate::remote::StreamFailed;
    use std::time::Instant;

    let start = Instant::now();
    let failed = |e: SourceError| Streamed::Failed(e);
    let staging = store.stage().map_err(|e| failed(e.into()))?;
    let dest = staging.entry_dir();
    std::fs::create_dir(&dest).map_err(|e| failed(e.into()))?;
    let limits = store.options().unpack_limits;
    let unpacked = remotes
        .client
        .download_streaming(uri, info, limits.max_bytes, |input| {
            unpack_stream(input, info.size, &dest, limits, progress)
        });
    let (manifest, download) = match unpacked {
        Ok((Ok(manifest), download)) => (manifest, download),
        Ok((Err(StreamError::NotStreamable(why)), _)) => return Err(Streamed::Again(why)),
        Ok((Err(StreamError::Io(e)), _)) => return Err(Streamed::Again(e.to_string())),
        Err(StreamFailed { error, retry: true }) => return Err(Streamed::Broke(error)),
        Err(StreamFailed { error, .. }) => return Err(failed(error.into())),
    };
    let done = start.elapsed();
    let digest = manifest.digest();
    if let Some(expected) = expected
        && digest != expected
    {
        return Err(failed(SourceError::DigestMismatch {
            what: uri.to_string(),
            expected,
            actual: digest,
        }));
    }
    let commit = crate::store::Commit {
        contents: crate::store::Contents::Manifest(&manifest),
        source: Value::String(uri.to_string()),
        description: Value::Null,
        timings_ms: std::collections::BTreeMap::from([
            ("download", download.as_millis() as u64),
            ("unpack", done.saturating_sub(download).as_millis() as u64),
        ]),
    };
    store
        .commit_staged(staging, digest, commit, progress)
        .map_err(|e| failed(super::during("publishing", &format!("pkg://{digest}"))(e.into())))
}

/// Puts package `digest` (committed here) in the shared package store as renv's
/// reproducible zip, unless it is there already. `None` when no shared store is
/// configured, else whether it was sent. The zip is written from the entry (re-hashed on
/// the way, so a damaged entry is never shared).
pub fn push(store: &Store, remotes: &Remotes, digest: PackageDigest) -> Result<Option<bool>, SourceError> {
    let Some(shared) = &remotes.shared else {
        return Ok(None);
    };
    let uri = shared.package(digest);
    if remotes.client.exists(&uri)? {
        return Ok(Some(false));
    }
    let entry = store
        .find(digest)?
        .ok_or(SourceError::NotFound { digest, remote: None })?;
    let tree = crate::package::scan::scan_exact(&entry.path, store.options().threads)?;
    if tree.manifest.digest() != digest {
        return Err(SourceError::DigestMismatch {
            what: format!("the stored package {}", entry.path.display()),
            expected: digest,
            actual: tree.manifest.digest(),
        });
    }
    let staging = store.stage()?;
    let zip_path = staging.work_dir().join("push.zip");
    let file = std::fs::OpenOptions::new()
        .mode(0o600)
        .write(true)
        .create_new(true)
        .open(&zip_path)?;
    let out = crate::package::zip_write::write_zip(
        &tree,
        std::io::BufWriter::with_capacity(1 << 20, file),
        crate::package::zip_write::Compression::Stored,
        &Progress::hidden(),
    )?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(Some(remotes.client.put_file(&uri, &zip_path)?))
}
