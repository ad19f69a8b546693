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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::digest::Digest;

/// How old a file's last change must be before its digest is cached.
pub const RACY_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

    /// The latest of its change and modification times.
    fn last_change_ns(&self) -> i128 {
        self.ctime_ns.max(self.mtime_ns)
    }
}

/// One file's digest as of one stat of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// The file's path relative to the source ("" for a zip).
    pub rel: String,
    pub stat: StatKey,
    pub digest: Digest,
}

/// The file's first bytes; the version follows. A file of another format (version 1 was
/// JSON, whose parse took 150 ms of a 100,000-file tree's 600 ms) is a miss.
const MAGIC: &[u8; 16] = b"renv-hash-cache\n";
const VERSION: u32 = 2;
/// path length (u32), then dev, ino, size (u64), mode (u32), mtime, ctime (i128 ns) and
/// the digest, all little-endian; the path's bytes follow the fixed part.
const FIXED: usize = 4 + 8 * 3 + 4 + 16 * 2 + 32;

/// Digests known for the files of one tree (or one zip), keyed by relative path.
#[derive(Debug, Default)]
pub struct HashCache {
    known: HashMap<String, (StatKey, Digest)>,
    started_ns: i128,
}

impl HashCache {
    /// An empty cache (hash everything, remember nothing).
    pub fn disabled() -> HashCache {
        HashCache::default()
    }

    /// Where the cache for `source` (a tree root or a zip, by absolute path) lives in `dir`.
    /// (The name is version 1's: an upgrade replaces the old file rather than strand it.)
    pub fn path_for(dir: &Path, source: &Path) -> std::path::PathBuf {
        use std::os::unix::ffi::OsStrExt;
        dir.join(format!("{}.json", Digest::of(source.as_os_str().as_bytes())))
    }

    /// Loads the cache at `path` if it is trusted (see `read_trusted`); anything
    /// missing, unreadable, untrusted or malformed is an empty cache, never an error.
    pub fn load(path: &Path) -> HashCache {
        let known = read_trusted(path)
            .and_then(|bytes| decode(&bytes))
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.rel, (e.stat, e.digest)))
            .collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        HashCache {
            known,
            started_ns: now.as_nanos() as i128,
        }
    }

    /// How many files the loaded cache knows.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Whether the cache has an entry for `rel` at all (if not, there is no need to stat it).
    pub fn knows(&self, rel: &str) -> bool {
        self.known.contains_key(rel)
    }

    /// The cached digest of `rel`, if `meta` (an lstat or fstat of it) still matches.
    pub fn lookup(&self, rel: &str, meta: &std::fs::Metadata) -> Option<Digest> {
        let (cached_key, digest) = self.known.get(rel)?;
        (*cached_key == StatKey::of(meta)).then_some(*digest)
    }

    /// True when two stats of a file show it unchanged (same inode, size, mode, times).
    pub fn same_state(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
        StatKey::of(a) == StatKey::of(b)
    }

    /// An entry for a freshly computed digest, unless the file changed too recently to
    /// trust its stat (see the module docs) or the cache is disabled.
    pub fn entry(&self, rel: &str, stat: &StatKey, digest: Digest) -> Option<CacheEntry> {
        (self.started_ns != 0 && !self.is_racy(stat)).then(|| CacheEntry {
            rel: rel.to_string(),
            stat: *stat,
            digest,
        })
    }

    /// True when a change to the file within the same clock tick as this stat might not
    /// show in its times: it changed less than [`RACY_MARGIN`] before this cache was
    /// loaded. Such a file's digest is not cached, and a single read of it is checked by
    /// a second one.
    pub fn is_racy(&self, stat: &StatKey) -> bool {
        let started = match self.started_ns {
            0 => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as i128,
            started => started,
        };
        stat.last_change_ns() > started - RACY_MARGIN.as_nanos() as i128
    }

    /// Writes `entries` (what a scan saw) to `path`, unless they are exactly what was
    /// loaded (`fresh`: how many of them were not cache hits).
    pub fn save(&self, path: &Path, entries: &[CacheEntry], fresh: usize) -> std::io::Result<()> {
        if self.started_ns == 0 || (fresh == 0 && entries.len() == self.known.len()) {
            return Ok(());
        }
        let dir = path.parent().expect("cache files live in a directory");
        // Ours alone (`load` trusts nothing else): a fresh 0600 file, renamed into place.
        let tmp = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)?;
        let mut out = std::io::BufWriter::new(tmp);
        std::io::Write::write_all(&mut out, &encode(entries))?;
        out.into_inner()
            .map_err(|e| e.into_error())?
            .persist(path)
            .map_err(|e| e.error)?;
        Ok(())
    }
}

/// The bytes of a cache file holding `entries`.
pub fn encode(entries: &[CacheEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(28 + entries.iter().map(|e| FIXED + e.rel.len()).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&(e.rel.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.stat.dev.to_le_bytes());
        out.extend_from_slice(&e.stat.ino.to_le_bytes());
        out.extend_from_slice(&e.stat.size.to_le_bytes());
        out.extend_from_slice(&e.stat.mode.to_le_bytes());
        out.extend_from_slice(&e.stat.mtime_ns.to_le_bytes());
        out.extend_from_slice(&e.stat.ctime_ns.to_le_bytes());
        out.extend_from_slice(e.digest.as_bytes());
        out.extend_from_slice(e.rel.as_bytes());
    }
    out
}

/// The entries of a cache file's bytes; None if they are not a whole, well-formed file.
pub fn decode(bytes: &[u8]) -> Option<Vec<CacheEntry>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = bytes.split_at_checked(n)?;
        *bytes = tail;
        Some(head)
    }
    fn int<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
        take(bytes, N)?.try_into().ok()
    }
    let mut rest = bytes;
    if take(&mut rest, MAGIC.len())? != MAGIC || u32::from_le_bytes(int(&mut rest)?) != VERSION {
        return None;
    }
    let count = u64::from_le_bytes(int(&mut rest)?) as usize;
    // Each entry takes FIXED bytes at least: a count the file cannot hold is malformed.
    let mut entries = Vec::with_capacity(count.min(rest.len() / FIXED));
    for _ in 0..count {
        let len = u32::from_le_bytes(int(&mut rest)?) as usize;
        let stat = StatKey {
            dev: u64::from_le_bytes(int(&mut rest)?),
            ino: u64::from_le_bytes(int(&mut rest)?),
            size: u64::from_le_bytes(int(&mut rest)?),
            mode: u32::from_le_bytes(int(&mut rest)?),
            mtime_ns: i128::from_le_bytes(int(&mut rest)?),
            ctime_ns: i128::from_le_bytes(int(&mut rest)?),
        };
        let digest = Digest::from_bytes(int(&mut rest)?);
        let rel = std::str::from_utf8(take(&mut rest, len)?).ok()?.to_string();
        entries.push(CacheEntry { rel, stat, digest });
    }
    rest.is_empty().then_some(entries)
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
        let entry = CacheEntry {
            rel: "f".to_string(),
            stat: StatKey::of(&meta),
            digest,
        };
        std::fs::write(&path, encode(&[entry])).unwrap();
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
        let entry = cache
            .entry("f", &StatKey::of(&meta), Digest::of(b"x"))
            .expect("old enough to cache");
        cache.save(&path, &[entry], 1).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(HashCache::load(&path).lookup("f", &meta), Some(Digest::of(b"x")));
        drop(src);
    }

    #[test]
    fn a_just_changed_file_is_not_cached() {
        let (_src, meta) = source();
        let cache = HashCache::load(Path::new("/nonexistent/cache.json"));
        assert_eq!(cache.entry("f", &StatKey::of(&meta), Digest::of(b"x")), None);
    }

    #[test]
    fn truncated_or_foreign_files_are_misses() {
        let (src, meta) = source();
        let entry = CacheEntry {
            rel: "dir/f".to_string(),
            stat: StatKey::of(&meta),
            digest: Digest::of(b"x"),
        };
        let bytes = encode(std::slice::from_ref(&entry));
        assert_eq!(decode(&bytes), Some(vec![entry]));
        for cut in [0, 10, 20, 28, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), None);
        assert_eq!(decode(br#"{"version":1,"entries":{}}"#), None);
        drop(src);
    }
}
