//! working_dir packages: walking a directory into a manifest, writing and reading zips.
//!
//! - [`scan`]: walk a local directory with Ray's exclude semantics and hash it in parallel.
//! - [`hash_cache`]: digests of unchanged files are reused, so an unchanged tree is not re-read.
//! - [`manifest`]: the canonical manifest and the [`PackageDigest`](crate::digest::PackageDigest).
//! - [`zip_write`]: `renv package` — a byte-reproducible zip of a scanned tree.
//! - [`zip_read`]: unpack an untrusted zip into a staging directory, entry by entry, from
//!   one open file ([`zip_read::OpenZip`]); [`zip_eocd`]: what its end records declare.
//! - [`tree`]: materialize a scanned tree by copying, verifying every byte against its manifest.

pub mod hash_cache;
pub mod manifest;
pub mod scan;
pub mod symlink;
pub mod tree;
pub mod zip_eocd;
pub mod zip_read;
pub mod zip_stream;
pub mod zip_write;

use std::path::PathBuf;

pub use manifest::{EntryKind, Manifest, ManifestEntry};
pub use scan::{ScannedTree, scan_dir};

/// Directories never packaged, whatever the excludes say first (a later `!venv` re-includes).
pub const DEFAULT_EXCLUDES: [&str; 4] = [".git", ".venv", "venv", "__pycache__"];

/// Why a local tree cannot be packaged.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("working_dir {0}: not found")]
    NotFound(PathBuf),
    #[error("working_dir {0}: expected a directory or a .zip file")]
    NotADirectory(PathBuf),
    #[error(
        "{path}: symlink to {target:?} leaves the working_dir; only relative links inside the tree are packaged"
    )]
    SymlinkEscapes { path: PathBuf, target: String },
    #[error("{path}: {kind} cannot be packaged; only files, directories and symlinks can")]
    SpecialFile { path: PathBuf, kind: &'static str },
    #[error("{0}: file names must be UTF-8 without backslashes to be packaged")]
    BadName(PathBuf),
    #[error("excludes: invalid pattern {pattern:?}: {reason}")]
    BadExclude { pattern: String, reason: String },
    #[error("{0}: changed while it was being packaged; try again once it is stable")]
    Changed(PathBuf),
    #[error("walking {path}: {source}")]
    Walk { path: PathBuf, source: ignore::Error },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl PackageError {
    /// True when the input is at fault (exit code 2), false for an internal failure.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, PackageError::Io(_) | PackageError::Walk { .. })
    }
}

/// Copies `input` to `output` (`io::sink()` to only hash) through `buf`, returning the
/// byte count and blake3 digest of what was copied. Read errors name `source`.
pub(crate) fn copy_hashing(
    input: &mut impl std::io::Read,
    output: &mut impl std::io::Write,
    source: &std::path::Path,
    buf: &mut [u8],
) -> std::io::Result<(u64, crate::digest::Digest)> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = input.read(buf).map_err(|e| scan::fs_err_io(source, e))?;
        if n == 0 {
            return Ok((size, hasher.finalize().into()));
        }
        size += n as u64;
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n])?;
    }
}

/// Number of threads for hashing and copying: the machine's parallelism, at most 16.
pub fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(16)
}

/// Runs `f` on every index in `0..len` across `threads` scoped threads, stopping at the
/// first error. Results come back in index order.
pub(crate) fn parallel_map<T: Send, E: Send>(
    len: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..len).map(|_| None).collect());
    let first_error: Mutex<Option<E>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, len.max(1)) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= len {
                        break;
                    }
                    match f(i) {
                        Ok(value) => results.lock().unwrap()[i] = Some(value),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every index ran"))
        .collect())
}
