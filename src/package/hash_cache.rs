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
//!
//! It is also trusted to say what a file contains, so whoever can write it decides what is
//! stored and run: on a store shared with a group, one user renamed a forged cache file
//! over another's, and the victim's next `renv run` ran the forger's tree. A cache file
//! is therefore used only if this process's effective uid wrote it and no one else could
//! have since ([`HashCache::load`]); anything else is a miss. A genuine file moved to
//! another name (all that write access to the directory allows with someone else's
//! file) matches nothing there: entries name files by device, inode and change time.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
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

    /// Loads the cache at `path` if it is trusted (see `read_trusted`); anything
    /// missing, unreadable, untrusted or malformed is an empty cache, never an error.
    pub fn load(path: &Path) -> HashCache {
        let file: CacheFile = read_trusted(path)
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
        // Ours alone (`load` trusts nothing else): a fresh 0600 file, renamed into place.
        let tmp = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)?;
        let mut out = std::io::BufWriter::new(tmp);
        serde_json::to_writer(&mut out, &file).map_err(std::io::Error::other)?;
        out.into_inner()
            .map_err(|e| e.into_error())?
            .persist(path)
            .map_err(|e| e.error)?;
        Ok(())
    }
}

/// The bytes of the cache file at `path`, if this process may trust them: a regular file
/// owned by its effective uid and writable by no one else, in a directory owned by that
/// uid too (the store's owner, who created it with the store; any other user, root
/// included, gets no cache from that store). The directory and then the file are opened
/// with `O_NOFOLLOW` and checked by fstat, so what is checked is what is read.
fn read_trusted(path: &Path) -> Option<Vec<u8>> {
    use rustix::fs::{FileType, Mode, OFlags};

    let ignored = |reason: String| {
        tracing::debug!(path = %path.display(), reason, "hash cache ignored");
        None
    };
    let euid = crate::sys::geteuid();
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let (dir, name) = (path.parent()?, path.file_name()?);
    let dir = match rustix::fs::open(dir, flags | OFlags::DIRECTORY, Mode::empty()) {
        Ok(dir) => dir,
        Err(e) => return ignored(format!("opening its directory: {e}")),
    };
    match rustix::fs::fstat(&dir) {
        Ok(stat) if stat.st_uid == euid => {}
        Ok(stat) => return ignored(format!("its directory is uid {}'s, not {euid}'s", stat.st_uid)),
        Err(e) => return ignored(format!("stat of its directory: {e}")),
    }
    // O_NONBLOCK: a FIFO in its place is refused below, never waited on.
    let file = match rustix::fs::openat(&dir, name, flags | OFlags::NONBLOCK, Mode::empty()) {
        Ok(file) => file,
        Err(rustix::io::Errno::NOENT) => return None,
        Err(e) => return ignored(format!("opening it: {e}")),
    };
    let stat = match rustix::fs::fstat(&file) {
        Ok(stat) => stat,
        Err(e) => return ignored(format!("stat: {e}")),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return ignored("not a regular file".into());
    }
    if stat.st_uid != euid {
        return ignored(format!("owned by uid {}, not {euid}", stat.st_uid));
    }
    if stat.st_mode & 0o022 != 0 {
        return ignored(format!(
            "mode {:o}: writable by group or others",
            stat.st_mode & 0o7777
        ));
    }
    let mut bytes = Vec::new();
    match std::fs::File::from(file).read_to_end(&mut bytes) {
        Ok(_) => Some(bytes),
        Err(e) => ignored(format!("reading it: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::*;

    /// A cache file in a fresh directory, recording `source`'s current stat as `digest`,
    /// written the way `save` writes it (0600, this uid's).
    fn cache_for(source: &Path, digest: Digest) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        let meta = std::fs::metadata(source).unwrap();
        let file = CacheFile {
            version: VERSION,
            entries: HashMap::from([("f".to_string(), (StatKey::of(&meta), digest.to_hex()))]),
        };
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir, path)
    }

    fn source() -> (tempfile::NamedTempFile, std::fs::Metadata) {
        let file = tempfile::NamedTempFile::new().unwrap();
        let meta = file.as_file().metadata().unwrap();
        (file, meta)
    }

    #[test]
    fn a_cache_of_our_own_is_used() {
        let (src, meta) = source();
        let (_dir, path) = cache_for(src.path(), Digest::of(b"x"));
        assert_eq!(HashCache::load(&path).lookup("f", &meta), Some(Digest::of(b"x")));
    }

    #[test]
    fn a_symlink_to_a_good_cache_is_ignored() {
        let (src, meta) = source();
        let (dir, path) = cache_for(src.path(), Digest::of(b"x"));
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(HashCache::load(&link).lookup("f", &meta), None);
    }

    #[test]
    fn a_cache_others_could_write_is_ignored() {
        let (src, meta) = source();
        let (_dir, path) = cache_for(src.path(), Digest::of(b"x"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert_eq!(HashCache::load(&path).lookup("f", &meta), None);
    }

    #[test]
    fn a_cache_another_uid_owns_is_ignored() {
        if crate::sys::geteuid() != 0 {
            eprintln!("skipping: giving a file away needs root");
            return;
        }
        let (src, meta) = source();
        let (dir, path) = cache_for(src.path(), Digest::of(b"x"));
        std::os::unix::fs::chown(&path, Some(1000), None).unwrap();
        assert_eq!(HashCache::load(&path).lookup("f", &meta), None);
        // Ours again, but in a directory another uid owns: not the store owner's cache.
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(1000), None).unwrap();
        assert_eq!(HashCache::load(&path).lookup("f", &meta), None);
    }

    #[test]
    fn saved_caches_are_private_and_load_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.json");
        let (src, meta) = source();
        let cache = HashCache::load(&path);
        // As if the file had been hashed well after its last change.
        let cache = HashCache {
            started_ns: cache.started_ns + 10 * RACY_MARGIN.as_nanos() as i128,
            ..cache
        };
        cache.record("f", &meta, Digest::of(b"x"));
        cache.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(HashCache::load(&path).lookup("f", &meta), Some(Digest::of(b"x")));
        drop(src);
    }
}
