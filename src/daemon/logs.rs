//! Worker log files, created ahead of time.
//!
//! Allocating an inode is the slowest part of starting a worker on some filesystems
//! (measured here: 0.7–1 ms per file on ext4 under writeback, against 20 µs for a
//! rename), and every worker needs two. So the daemon keeps a few empty spare files in the
//! log directory and a worker's logs are spares renamed to their final names; a
//! background task tops the pool up. With no spare left, files are created directly.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::store::layout::SPARE_LOG_PREFIX as SPARE_PREFIX;
const LOW_WATER: usize = 16;
const HIGH_WATER: usize = 64;

pub struct LogPool {
    dir: PathBuf,
    spares: Mutex<Vec<PathBuf>>,
    refilling: AtomicBool,
    counter: AtomicU64,
}

impl LogPool {
    /// A pool in `dir`; spares left by an earlier daemon are reused (they are empty).
    pub fn new(dir: PathBuf) -> std::io::Result<LogPool> {
        fs_err::create_dir_all(&dir)?;
        let spares = fs_err::read_dir(&dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(SPARE_PREFIX))
            .map(|e| e.path())
            .collect();
        Ok(LogPool {
            dir,
            spares: Mutex::new(spares),
            refilling: AtomicBool::new(false),
            counter: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty log file at `dir/name`, opened for writing.
    pub fn create(&self, name: &str) -> std::io::Result<std::fs::File> {
        let path = self.dir.join(name);
        let spare = self.spares.lock().unwrap().pop();
        if let Some(spare) = spare
            && std::fs::rename(&spare, &path).is_ok()
        {
            return std::fs::OpenOptions::new().write(true).truncate(true).open(&path);
        }
        // A new inode, never a reused one (an old log of the same name may be open
        // somewhere), readable by its owner only until the caller's rights are set.
        let _ = std::fs::remove_file(&path);
        new_private_file(&path)
    }

    /// Tops the pool up in the background when it runs low.
    pub fn refill_if_low(self: &std::sync::Arc<Self>) {
        if self.spares.lock().unwrap().len() >= LOW_WATER || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            while pool.spares.lock().unwrap().len() < HIGH_WATER {
                let n = pool.counter.fetch_add(1, Ordering::Relaxed);
                let path = pool.dir.join(format!("{SPARE_PREFIX}{}-{n}", std::process::id()));
                if new_private_file(&path).is_err() {
                    break;
                }
                pool.spares.lock().unwrap().push(path);
            }
            pool.refilling.store(false, Ordering::Release);
        });
    }
}

/// Creates `path` (which must not exist) with mode 0600.
fn new_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}
