//! Which inodes a commit has already made durable, so the next entry that links them need
//! not fdatasync them again.
//!
//! Most of a new env is files uv hardlinks from its cache: the same inodes in every env
//! that installs the same wheels. The first commit that finds such an inode fdatasyncs it;
//! every later one would pay a disk cache flush for nothing (about 50 µs a file on a
//! virtio disk, half of what sealing a numpy+pandas env cost on ext4). So a commit records
//! the inodes it synced, and a commit that finds one recorded skips it.
//!
//! An inode is recorded as the hash of its device, number, birth time, mtime and size:
//!
//! - a record is appended only after the fdatasync returned, so a record that is there
//!   (even after a crash) names data that was on disk;
//! - nothing writes these inodes after that: they are sealed read-only and the store
//!   owner's, and uv replaces cache files, never rewrites them; should the owner change
//!   one anyway, its mtime or size would move (up to the clock's tick), and so its key;
//! - an inode number freed and used again has another birth time (nanoseconds), so a new
//!   file never inherits an old one's record; a filesystem that reports no birth time
//!   gets no records, and every commit syncs as before;
//! - the links to the inode in a new entry are directory entries, made durable by the
//!   commit's directory fsyncs like every other.
//!
//! The records are a cache, never a promise: a lost, torn or removed file only costs the
//! next commits their fdatasyncs again. Appends are one `write` to an `O_APPEND` file, so
//! concurrent commits never interleave records; a file that is not whole records (a torn
//! append) is dropped. It is read whole by each commit that may skip something, so it is
//! started afresh when it passes [`MAX_BYTES`] (inodes pruned from the cache only leave
//! dead records behind).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// One record: 128 bits of a BLAKE3 hash.
const RECORD: usize = 16;

/// Past this size (a quarter of a million inodes) the file starts again.
const MAX_BYTES: u64 = 4 << 20;

/// The record of the inode `meta` describes, as it is now; `None` where the filesystem
/// gives no birth time.
pub fn key(meta: &std::fs::Metadata) -> Option<u128> {
    let born = meta.created().ok()?;
    let born = born.duration_since(std::time::UNIX_EPOCH).ok()?;
    let mut hasher = blake3::Hasher::new();
    for word in [
        meta.dev(),
        meta.ino(),
        born.as_secs(),
        u64::from(born.subsec_nanos()),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.len(),
    ] {
        hasher.update(&word.to_le_bytes());
    }
    let bytes: [u8; RECORD] = hasher.finalize().as_bytes()[..RECORD]
        .try_into()
        .expect("a BLAKE3 hash is longer than a record");
    Some(u128::from_le_bytes(bytes))
}

/// Which of `wanted` the file at `path` records (none if it cannot be read).
pub fn recorded(path: &Path, wanted: &HashSet<u128>) -> HashSet<u128> {
    if wanted.is_empty() {
        return HashSet::new();
    }
    let mut bytes = Vec::new();
    let read = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes));
    if read.is_err() || bytes.len() % RECORD != 0 {
        return HashSet::new();
    }
    bytes
        .chunks_exact(RECORD)
        .map(|chunk| u128::from_le_bytes(chunk.try_into().expect("whole records")))
        .filter(|key| wanted.contains(key))
        .collect()
}

/// Appends `keys` to the file at `path`, inodes whose data was just made durable. Best
/// effort: a record not written only costs a later fdatasync.
pub fn record(path: &Path, keys: &[u128]) {
    if keys.is_empty() {
        return;
    }
    let bytes: Vec<u8> = keys.iter().flat_map(|key| key.to_le_bytes()).collect();
    let append = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let len = file.metadata()?.len();
        if len > MAX_BYTES || len % RECORD as u64 != 0 {
            // Started afresh; a commit appending meanwhile loses at most its records.
            file.set_len(0)?;
        }
        file.write_all(&bytes)
    };
    if let Err(e) = append() {
        tracing::debug!(path = %path.display(), error = %e, "could not record synced inodes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_or_a_new_inode_changes_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").unwrap();
        let Some(first) = key(&std::fs::metadata(&path).unwrap()) else {
            panic!("this filesystem gives no birth time; the test needs one")
        };
        assert_eq!(key(&std::fs::metadata(&path).unwrap()), Some(first));
        std::fs::write(&path, b"three").unwrap();
        let written = key(&std::fs::metadata(&path).unwrap()).unwrap();
        assert_ne!(written, first, "a write changes the key");
        // Same name, same bytes, mtime set back: another inode, another key.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"three").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_ne!(key(&std::fs::metadata(&path).unwrap()).unwrap(), written);
    }

    #[test]
    fn records_are_found_and_a_torn_file_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("synced");
        let wanted: HashSet<u128> = [1, 2, 3].into();
        assert!(recorded(&path, &wanted).is_empty(), "no file, no records");
        record(&path, &[1, 7]);
        record(&path, &[3]);
        assert_eq!(recorded(&path, &wanted), HashSet::from([1, 3]));
        // A torn append: not whole records, so nothing is trusted, and the next
        // append starts the file again.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&[0; 5])
            .unwrap();
        assert!(recorded(&path, &wanted).is_empty());
        record(&path, &[2]);
        assert_eq!(recorded(&path, &wanted), HashSet::from([2]));
    }
}
