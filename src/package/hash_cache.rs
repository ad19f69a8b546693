//! A stat cache for content digests, so an unchanged tree is not read again.
//!
//! Like git's index: a file's digest is reused only when its inode, size, mode, mtime and
//! ctime all match what they were when it was hashed. ctime cannot be set from user
//! space, so an edit is always seen — except an edit within the same clock tick as the
//! hashing, which is why entries are recorded only for files whose ctime and mtime are
//! already [`RACY_MARGIN`] old when hashing starts ("racily clean" entries are re-read).
//!
//! The cache is only an optimisation: a missing, stale or unreadable cache file means
//! hashing everything. It is written by rename, so readers never see a torn file.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// How old a file's last change must be before its digest is cached.
pub const RACY_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
/// What identifies a file and its last change: compared, never interpreted.
pub struct StatKey {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl StatKey {
    pub fn of(meta: &std::fs::Metadata) -> StatKey {
        StatKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mode: meta.mode(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    entries: HashMap<String, (StatKey, String)>,
}

const VERSION: u32 = 1;

/// Digests known for the files of one tree (or one zip), keyed by relative path.
#[derive(Debug, Default)]
pub struct HashCache {
    known: HashMap<String, (StatKey, Digest)>,
    /// Entries seen by this scan, to write back (files that are gone drop out).
    seen: Mutex<HashMap<String, (StatKey, Digest)>>,
    started_ns: i128,
    changed: Mutex<bool>,
}

impl HashCache {
    /// An empty cache (hash everything, remember nothing).
    pub fn disabled() -> HashCache {
        HashCache::default()
    }

    /// Where the cache for `source` (a tree root or a zip, by absolute path) lives in `dir`.
    pub fn path_for(dir: &Path, source: &Path) -> std::path::PathBuf {
        use std::os::unix::ffi::OsStrExt;
        dir.join(format!("{}.json", Digest::of(source.as_os_str().as_bytes())))
    }

    /// Loads the cache at `path`; anything unreadable is an empty cache.
    pub fn load(path: &Path) -> HashCache {
        let file: CacheFile = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .filter(|f: &CacheFile| f.version == VERSION)
            .unwrap_or_default();
        let known = file
            .entries
            .into_iter()
            .filter_map(|(rel, (key, hex))| Some((rel, (key, hex.parse().ok()?))))
            .collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        HashCache {
            known,
            started_ns: now.as_nanos() as i128,
            ..HashCache::default()
        }
    }

    /// The cached digest of `rel`, if `meta` (an fstat of the open file) still matches.
    pub fn lookup(&self, rel: &str, meta: &std::fs::Metadata) -> Option<Digest> {
        let key = StatKey::of(meta);
        let (cached_key, digest) = self.known.get(rel)?;
        if *cached_key != key {
            return None;
        }
        self.seen.lock().unwrap().insert(rel.to_string(), (key, *digest));
        Some(*digest)
    }

    /// True when two stats of a file show it unchanged (same inode, size, mode, times).
    pub fn same_state(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
        StatKey::of(a) == StatKey::of(b)
    }

    /// Remembers a freshly computed digest, unless the file changed too recently to trust.
    pub fn record(&self, rel: &str, meta: &std::fs::Metadata, digest: Digest) {
        if self.started_ns == 0 {
            return;
        }
        let key = StatKey::of(meta);
        let margin = RACY_MARGIN.as_nanos() as i128;
        if key.ctime_ns.max(key.mtime_ns) > self.started_ns - margin {
            return;
        }
        self.seen.lock().unwrap().insert(rel.to_string(), (key, digest));
        *self.changed.lock().unwrap() = true;
    }

    /// Writes what this scan saw back to `path` if it differs from what was loaded.
    pub fn save(self, path: &Path) -> std::io::Result<()> {
        let seen = self.seen.into_inner().unwrap();
        let changed = self.changed.into_inner().unwrap() || seen.len() != self.known.len();
        if self.started_ns == 0 || !changed {
            return Ok(());
        }
        let file = CacheFile {
            version: VERSION,
            entries: seen
                .into_iter()
                .map(|(rel, (key, digest))| (rel, (key, digest.to_hex())))
                .collect(),
        };
        let dir = path.parent().expect("cache files live in a directory");
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        let mut out = std::io::BufWriter::new(tmp);
        serde_json::to_writer(&mut out, &file).map_err(std::io::Error::other)?;
        out.into_inner()
            .map_err(|e| e.into_error())?
            .persist(path)
            .map_err(|e| e.error)?;
        Ok(())
    }
}
