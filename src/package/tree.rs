//! Materializing a tree in a staging directory: copying a scanned local tree, or a walked
//! one whose files are hashed as they are copied (one read of a new tree), and the
//! file-creation and permission rules the zip reader shares.
//!
//! Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`, so nothing is ever written
//! through a symlink or over an existing name. Modes are renv's, never the source's:
//! `0444`, or `0555` for executables, directories `0555` once filled — no setuid, no
//! world-write, and a committed entry is read-only.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::hash_cache::StatKey;
use super::manifest::{EntryKind, ManifestEntry};
use super::scan::{KnownFile, Origin, ScannedTree, WalkedKind, WalkedTree, is_executable, open_regular};
use super::{PackageError, copy_hashing, parallel_map};
use crate::digest::Digest;
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

/// Copies a walked tree into the empty directory `dest`, reading every file once: a file
/// the stat cache knew is checked against its digest as it is copied (as [`copy_into`]
/// does), any other is hashed as it is copied, and must not change meanwhile (see
/// `copy_once`). Returns the tree as scanned, its digests those of what was written,
/// and updates the stat cache.
pub fn copy_walked(
    tree: &WalkedTree,
    dest: &Path,
    threads: usize,
    progress: &Progress,
) -> Result<ScannedTree, PackageError> {
    let entries = tree.entries();
    if let Some(name) = tree.nested_dir() {
        fs_err::create_dir(dest.join(name))?;
    }
    for entry in entries {
        if let WalkedKind::Dir = entry.kind {
            fs_err::create_dir(dest.join(tree.package_path(&entry.path)))?;
        }
    }
    let phase = progress.phase("copying", tree.files() as u64);
    let writeback = wants_writeback(dest);
    let read = parallel_map(entries.len(), threads, |i| {
        let entry = &entries[i];
        let WalkedKind::File(known) = entry.kind else {
            return Ok(None);
        };
        let source = tree.root.join(&entry.path);
        let (mut input, before) = open_regular(&source)?;
        let executable = is_executable(&before);
        let mut output = create_file(dest, &tree.package_path(&entry.path), executable)?;
        let mut buf = vec![0u8; (before.len() as usize + 1).clamp(4096, 1 << 20)];
        let read = match known {
            Some(known) => {
                let (_, copied) = copy_hashing(&mut input, &mut output, &source, &mut buf)?;
                if copied != known.content || executable != known.executable {
                    return Err(PackageError::Changed(source));
                }
                (known, Origin::Cached)
            }
            None => {
                let racy = tree.cache().is_racy(&StatKey::of(&before));
                let (size, content) = copy_once(
                    &mut input,
                    &before,
                    File::metadata,
                    &mut output,
                    racy,
                    &source,
                    &mut buf,
                )?;
                let file = KnownFile {
                    executable,
                    size,
                    content,
                    stat: StatKey::of(&before),
                };
                (file, Origin::Read)
            }
        };
        if writeback {
            start_writeback(&output);
        }
        phase.inc(1);
        Ok(Some(read))
    })?;
    phase.finish();
    for entry in entries {
        if let WalkedKind::Symlink(target) = &entry.kind {
            fs_err::os::unix::fs::symlink(target, dest.join(tree.package_path(&entry.path)))?;
        }
    }
    let scanned = tree.finish(read);
    seal_dirs(dest, scanned.manifest.entries())?;
    Ok(scanned)
}

/// Copies a file no one has hashed to `output` in a single read, returning its size and
/// the digest of what was written. With one read there is no second to compare it with,
/// so the file must show no change from `before` (its fstat when opened) to `restat`
/// after: any write moves its ctime. Only a write within the clock tick of its last
/// change might not (`racy`: it changed less than a second ago); such a file is read a
/// second time and must hash the same. A changed file is [`PackageError::Changed`], never
/// a digest of bytes it held at no one moment.
pub(crate) fn copy_once<F: Read + Seek>(
    input: &mut F,
    before: &std::fs::Metadata,
    restat: impl FnOnce(&F) -> std::io::Result<std::fs::Metadata>,
    output: &mut impl std::io::Write,
    racy: bool,
    source: &Path,
    buf: &mut [u8],
) -> Result<(u64, Digest), PackageError> {
    let changed = || PackageError::Changed(source.to_path_buf());
    let (size, copied) = copy_hashing(input, output, source, buf)?;
    let after = restat(input).map_err(|e| super::scan::fs_err_io(source, e))?;
    if size != before.len() || StatKey::of(&after) != StatKey::of(before) {
        return Err(changed());
    }
    if racy {
        input.rewind().map_err(|e| super::scan::fs_err_io(source, e))?;
        let (_, again) = copy_hashing(input, &mut std::io::sink(), source, buf)?;
        if again != copied {
            return Err(changed());
        }
    }
    Ok((size, copied))
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::package::scan::tests::{MIXED_TREE_DIGEST, mixed_tree};
    use crate::package::scan::{scan_dir, scan_exact, walk_dir};

    #[test]
    fn a_walked_tree_copied_in_one_read_is_the_scanned_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (root, dest) = (dir.path().join("t"), dir.path().join("copy"));
        mixed_tree(&root);
        let scanned = scan_dir(&root, &[], 2, None, &Progress::hidden()).unwrap();
        for threads in [1, 4] {
            let walked = walk_dir(&root, &[], threads, None).unwrap();
            std::fs::create_dir(&dest).unwrap();
            let copied = copy_walked(&walked, &dest, threads, &Progress::hidden()).unwrap();
            assert_eq!(copied.manifest, scanned.manifest);
            assert_eq!(copied.manifest.digest().to_string(), MIXED_TREE_DIGEST);
            // What was written is what was named.
            assert_eq!(scan_exact(&dest, 2).unwrap().manifest, scanned.manifest);
            make_writable(&dest);
            std::fs::remove_dir_all(&dest).unwrap();
        }
        // Nested under its name, as a py_modules directory.
        let walked = walk_dir(&root, &[], 2, None).unwrap().nested().unwrap();
        std::fs::create_dir(&dest).unwrap();
        let copied = copy_walked(&walked, &dest, 2, &Progress::hidden()).unwrap();
        assert_eq!(copied.manifest, scanned.clone().nested().unwrap().manifest);
        assert_eq!(scan_exact(&dest, 2).unwrap().manifest, copied.manifest);
        make_writable(&dest);
    }

    fn make_writable(dir: &Path) {
        for entry in walkdir(dir) {
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut all = vec![dir.to_path_buf()];
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                all.extend(walkdir(&entry.path()));
            }
        }
        all
    }

    /// A file that a writer changes while it is read: the reader's first read call
    /// returns the old bytes, then the file is rewritten (same size).
    struct ChangedWhileRead {
        file: File,
        path: std::path::PathBuf,
        done: bool,
    }

    impl Read for ChangedWhileRead {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.file.read(buf)?;
            if !self.done {
                self.done = true;
                let mut writer = File::options().write(true).open(&self.path)?;
                writer.write_all(b"NEW CONTENT\n")?;
            }
            Ok(n)
        }
    }

    impl Seek for ChangedWhileRead {
        fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
            self.file.seek(pos)
        }
    }

    fn changed_while_read() -> (tempfile::TempDir, ChangedWhileRead, std::fs::Metadata) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "old content\n").unwrap();
        // Past the clock tick of its creation (10 ms at most), so the rewrite moves ctime.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let file = File::open(&path).unwrap();
        let before = file.metadata().unwrap();
        let input = ChangedWhileRead {
            file,
            path,
            done: false,
        };
        (dir, input, before)
    }

    #[test]
    fn a_file_changed_while_it_is_copied_once_is_refused() {
        let (_dir, mut input, before) = changed_while_read();
        let result = copy_once(
            &mut input,
            &before,
            |f| f.file.metadata(),
            &mut Vec::new(),
            false,
            Path::new("f"),
            &mut [0; 4096],
        );
        assert!(matches!(result, Err(PackageError::Changed(_))), "{result:?}");
    }

    /// A change that leaves the times as they were (a coarse clock, within the tick of
    /// the file's last change) is found by the second read of a racily clean file.
    #[test]
    fn a_racily_clean_file_is_read_twice() {
        let (_dir, mut input, before) = changed_while_read();
        let same = before.clone();
        let result = copy_once(
            &mut input,
            &before,
            |_| Ok(same),
            &mut Vec::new(),
            true,
            Path::new("f"),
            &mut [0; 4096],
        );
        assert!(matches!(result, Err(PackageError::Changed(_))), "{result:?}");

        // Left alone, it is copied, named by what was written.
        let mut file = File::open(&input.path).unwrap();
        let before = file.metadata().unwrap();
        let mut out = Vec::new();
        let (size, digest) = copy_once(
            &mut file,
            &before,
            File::metadata,
            &mut out,
            true,
            Path::new("f"),
            &mut [0; 4096],
        )
        .unwrap();
        assert_eq!((size, digest), (12, Digest::of(b"NEW CONTENT\n")));
        assert_eq!(out, b"NEW CONTENT\n");
    }
}
