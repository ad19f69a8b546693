//! Kernel file locks (`flock` through std's `File::lock`): released by the kernel when the
//! holder exits or crashes, so a killed build never wedges the store.

use std::fs::{File, TryLockError};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;

/// A held lock; released on drop.
#[derive(Debug)]
pub struct LockFile {
    file: File,
    path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

impl LockFile {
    fn open(path: &Path) -> Result<File, StoreError> {
        Ok(fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?
            .into_parts()
            .0)
    }

    /// Waits for the lock until `timeout` (None: forever). Polls with backoff rather than
    /// blocking in `flock`, so the wait has a deadline.
    pub fn acquire(path: &Path, mode: LockMode, timeout: Option<Duration>) -> Result<LockFile, StoreError> {
        match Self::acquire_unless(path, mode, timeout, || Ok(None::<std::convert::Infallible>))? {
            Ok(lock) => Ok(lock),
            Err(never) => match never {},
        }
    }

    /// As [`Self::acquire`], but `settled` is asked before each attempt, and the wait ends
    /// with its answer if it gives one (what the lock was wanted for happened meanwhile).
    pub fn acquire_unless<T>(
        path: &Path,
        mode: LockMode,
        timeout: Option<Duration>,
        mut settled: impl FnMut() -> Result<Option<T>, StoreError>,
    ) -> Result<Result<LockFile, T>, StoreError> {
        let file = Self::open(path)?;
        let start = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(answer) = settled()? {
                return Ok(Err(answer));
            }
            match try_lock(&file, mode) {
                Ok(()) => {
                    return Ok(Ok(LockFile {
                        file,
                        path: path.to_path_buf(),
                    }));
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(e.into()),
            }
            if let Some(timeout) = timeout
                && start.elapsed() >= timeout
            {
                return Err(StoreError::LockTimeout {
                    path: path.to_path_buf(),
                    waited: timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Takes the lock only if it is free right now.
    pub fn try_acquire(path: &Path, mode: LockMode) -> Result<Option<LockFile>, StoreError> {
        let file = Self::open(path)?;
        match try_lock(&file, mode) {
            Ok(()) => Ok(Some(LockFile {
                file,
                path: path.to_path_buf(),
            })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e.into()),
        }
    }

    /// As [`Self::try_acquire`], for the lock file `name` in `dir`, a directory the caller
    /// opened once for many locks (prune takes one per entry): no walk of the store's path
    /// per lock. `path` is the file's full path, for errors and [`Self::remove`].
    pub fn try_acquire_in(
        dir: BorrowedFd<'_>,
        name: &str,
        path: PathBuf,
        mode: LockMode,
    ) -> Result<Option<LockFile>, StoreError> {
        use rustix::fs::{Mode, OFlags};
        // As `open` above: created if missing, read-write for its owner as umask allows.
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o666),
        )
        .map_err(|e| {
            let e = std::io::Error::from(e);
            std::io::Error::new(e.kind(), format!("failed to open file `{}`: {e}", path.display()))
        })?;
        let file = File::from(fd);
        match try_lock(&file, mode) {
            Ok(()) => Ok(Some(LockFile { file, path })),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(e.into()),
        }
    }

    /// Removes the lock file while still holding it (for staging locks, whose name is
    /// never reused), then releases it.
    pub fn remove(self) -> std::io::Result<()> {
        fs_err::remove_file(&self.path)
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

fn try_lock(file: &File, mode: LockMode) -> Result<(), TryLockError> {
    match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    }
}
