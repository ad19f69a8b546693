//! Materializing a tree in a staging directory: copying a scanned local tree, and the
//! file-creation and permission rules the zip reader shares.
//!
//! Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`, so nothing is ever written
//! through a symlink or over an existing name. Modes are renv's, never the source's:
//! `0444`, or `0555` for executables, directories `0555` once filled — no setuid, no
//! world-write, and a committed entry is read-only.

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::manifest::{EntryKind, ManifestEntry};
use super::scan::{ScannedTree, open_regular};
use super::{PackageError, copy_hashing, parallel_map};
use crate::progress::Progress;

pub const FILE_MODE: u32 = 0o444;
pub const EXEC_MODE: u32 = 0o555;
pub const DIR_MODE: u32 = 0o555;

/// Copies `tree` into the empty directory `dest`, verifying every file against its
/// manifest digest as it is copied (a file edited between scan and copy is an error, so
/// an entry's bytes always match its name).
pub fn copy_into(
    tree: &ScannedTree,
    dest: &Path,
    threads: usize,
    progress: &Progress,
) -> Result<(), PackageError> {
    let entries = tree.manifest.entries();
    for entry in entries {
        if let EntryKind::Dir = entry.kind {
            fs_err::create_dir(dest.join(&entry.path))?;
        }
    }
    let files: Vec<&ManifestEntry> = entries
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::File { .. }))
        .collect();
    let phase = progress.phase("copying", files.len() as u64);
    let writeback = wants_writeback(dest);
    parallel_map(files.len(), threads, |i| {
        let entry = files[i];
        let EntryKind::File {
            executable, content, ..
        } = entry.kind
        else {
            unreachable!()
        };
        let source = tree.source_path(entry);
        let (mut input, meta) = open_regular(&source)?;
        let mut output = create_file(dest, &entry.path, executable)?;
        let mut buf = vec![0u8; (meta.len() as usize + 1).clamp(4096, 1 << 20)];
        let (_, copied) = copy_hashing(&mut input, &mut output, &source, &mut buf)?;
        if writeback {
            start_writeback(&output);
        }
        if copied != content || super::scan::is_executable(&meta) != executable {
            return Err(PackageError::Changed(source));
        }
        phase.inc(1);
        Ok(())
    })?;
    phase.finish();
    for entry in entries {
        if let EntryKind::Symlink { target } = &entry.kind {
            fs_err::os::unix::fs::symlink(target, dest.join(&entry.path))?;
        }
    }
    seal_dirs(dest, entries)?;
    Ok(())
}

/// Creates a new file for an entry; never follows a symlink, never replaces a name.
pub fn create_file(root: &Path, rel: &str, executable: bool) -> std::io::Result<File> {
    let path = root.join(rel);
    let mode = if executable { EXEC_MODE } else { FILE_MODE };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{e} (while creating {})", path.display())))?;
    // The umask may have narrowed the mode; the store's modes are exact. A umask that
    // leaves read and execute bits alone (022, 002) cannot have: a syscall a file saved.
    if crate::sys::umask().is_none_or(|umask| umask & mode != 0) {
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(file)
}

/// Makes every directory of a filled tree read-only, deepest first. The root is left
/// writable until it has been renamed into place (moving a directory to another parent
/// rewrites its `..`).
pub fn seal_dirs(root: &Path, entries: &[ManifestEntry]) -> std::io::Result<()> {
    for entry in entries.iter().rev() {
        if let EntryKind::Dir = entry.kind {
            fs_err::set_permissions(root.join(&entry.path), std::fs::Permissions::from_mode(DIR_MODE))?;
        }
    }
    Ok(())
}

/// Whether files written under `dest` should have their writeback started as they are
/// written: not on tmpfs or ramfs, which have none (a syscall per file saved).
pub fn wants_writeback(dest: &Path) -> bool {
    !crate::sys::is_volatile_fs(dest)
}

/// Starts writing a file's pages to disk without waiting, so the fsync before publishing
/// finds most of the work done (the kernel overlaps it with the rest of the copy).
pub fn start_writeback(file: &File) {
    crate::sys::start_writeback(file);
}
