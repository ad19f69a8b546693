//! The users' bytecode caches (`pycache/<uid>/`): pruning the part keyed by source
//! content (`.renv-by-content/`, see the venv layer's bytecode hook).
//!
//! That part belongs to no env (a file there serves every env with the same source), so
//! it does not go with an env; a file is removed once no one has loaded it for a while,
//! as its access time says (`relatime` updates it at least once a day on every mount
//! Linux makes by default).
//!
//! Each cache is written by its user, and prune may run as root: nothing here follows a
//! symlink. Directories are opened with `O_NOFOLLOW` relative to the one above, and names
//! are looked at and removed relative to their directory's descriptor, so a symlink
//! planted anywhere is at most removed itself, never followed.

use std::os::fd::OwnedFd;
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Mode};

use super::{Store, StoreError};

/// The directory, in each user's cache, of bytecode keyed by source content.
pub const BY_CONTENT: &str = ".renv-by-content";

impl Store {
    /// Removes content-keyed bytecode no one has loaded for longer than `keep`, in every
    /// user's cache. Returns how many files went.
    pub(super) fn prune_bytecode(&self, keep: Duration) -> Result<usize, StoreError> {
        let Some(pycache) = open_dir(None, &self.layout.pycache_dir())? else {
            return Ok(0);
        };
        let cutoff = SystemTime::now()
            .checked_sub(keep)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs() as i64);
        let mut removed = 0;
        for user in subdirs(&pycache)? {
            let Some(user) = open_dir(Some(&pycache), &user)? else {
                continue;
            };
            let owner = rustix::fs::fstat(&user).map_err(std::io::Error::from)?.st_uid;
            let Some(by_content) = open_owned_dir(&user, BY_CONTENT.as_ref(), owner)? else {
                continue;
            };
            for fanout in subdirs(&by_content)? {
                let Some(dir) = open_owned_dir(&by_content, &fanout, owner)? else {
                    continue;
                };
                removed += remove_unread(&dir, cutoff)?;
            }
        }
        Ok(removed)
    }
}

/// `path` as a directory (relative to `at` if given), never through a symlink; `None`
/// if it is not there or not a directory.
fn open_dir(at: Option<&OwnedFd>, path: &std::path::Path) -> Result<Option<OwnedFd>, StoreError> {
    let flags = crate::sys::DIR_NO_FOLLOW;
    let opened = match at {
        Some(at) => rustix::fs::openat(at, path, flags, Mode::empty()),
        None => rustix::fs::open(path, flags, Mode::empty()),
    };
    match opened {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => Ok(None),
        Err(e) => Err(std::io::Error::from(e).into()),
    }
}

/// `path` in `at` as a directory of `owner`'s, never through a symlink. A user can move
/// into their cache any directory they may write, though not their own: say another user's
/// world-writable sticky one, where the sticky bit keeps them from removing that user's
/// files. Prune, as root, would remove them; it only looks in the cache owner's directories.
fn open_owned_dir(at: &OwnedFd, path: &std::path::Path, owner: u32) -> Result<Option<OwnedFd>, StoreError> {
    let Some(dir) = open_dir(Some(at), path)? else {
        return Ok(None);
    };
    let stat = rustix::fs::fstat(&dir).map_err(std::io::Error::from)?;
    Ok((stat.st_uid == owner).then_some(dir))
}

/// The names in `dir` that are directories (as `lstat` sees them).
fn subdirs(dir: &OwnedFd) -> Result<Vec<std::path::PathBuf>, StoreError> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir).map_err(std::io::Error::from)? {
        let entry = entry.map_err(std::io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." && entry.file_type() == rustix::fs::FileType::Directory {
            names.push(std::path::PathBuf::from(
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name),
            ));
        }
    }
    Ok(names)
}

/// Removes the files (and symlinks) in `dir` last read before `cutoff` (seconds since the
/// epoch).
fn remove_unread(dir: &OwnedFd, cutoff: i64) -> Result<usize, StoreError> {
    let mut removed = 0;
    for entry in rustix::fs::Dir::read_from(dir).map_err(std::io::Error::from)? {
        let entry = entry.map_err(std::io::Error::from)?;
        let name = entry.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let Ok(stat) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        let unread = stat.st_atime < cutoff;
        if unread
            && matches!(
                kind,
                rustix::fs::FileType::RegularFile | rustix::fs::FileType::Symlink
            )
        {
            match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) => removed += 1,
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
    }
    Ok(removed)
}
