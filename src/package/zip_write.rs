//! `renv package`: a standard zip of a scanned tree, byte-for-byte reproducible.
//!
//! Entries are written in manifest order (sorted paths, each directory before what it
//! holds) with a fixed timestamp (1980-01-01, the zip epoch) and renv's modes (`0644`,
//! `0755` for executables and directories), so the same tree always gives the same bytes.
//! Unpacking it with [`zip_read`](super::zip_read) gives the same manifest digest back.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, mpsc};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

use super::manifest::{EntryKind, ManifestEntry};
use super::scan::{ScannedTree, open_regular};
use super::{PackageError, copy_hashing};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Compression {
    /// No compression: fastest to write and to unpack (like `zip -0`).
    #[default]
    Stored,
    /// Deflate: smaller, for shipping over slow links.
    Deflated,
}

/// Files up to this size are read (and checked against their digest) ahead of the
/// writer by helper threads; larger ones are copied through by the writer itself.
const READ_AHEAD_FILE: u64 = 1 << 20;
/// Consecutive entries read ahead as one piece of work: up to this many bytes...
const BATCH_BYTES: u64 = 4 << 20;
/// ...or this many entries.
const BATCH_ENTRIES: usize = 256;
/// How far ahead of the writer the helpers may read, in batches (memory: at most this
/// many times BATCH_BYTES, plus one batch per helper).
const BATCHES_AHEAD: usize = 8;

/// Writes the zip of `tree` to `out`.
///
/// The zip is written in one order by one thread, but a tree of many small files costs
/// mostly opening and reading them: helper threads read the small files ahead, batch by
/// batch, so the writer only copies bytes. A file's bytes are checked against its
/// manifest digest wherever they are read: the zip holds exactly what the digest names.
pub fn write_zip<W: Write + Seek>(
    tree: &ScannedTree,
    out: W,
    compression: Compression,
    progress: &Progress,
) -> Result<W, PackageError> {
    let method = match compression {
        Compression::Stored => CompressionMethod::Stored,
        Compression::Deflated => CompressionMethod::Deflated,
    };
    let base = SimpleFileOptions::default()
        .compression_method(method)
        .last_modified_time(DateTime::default())
        .large_file(false);
    let entries = tree.manifest.entries();
    let batches = batches(entries);
    let mut zip = ZipWriter::new(out);
    let phase = progress.phase("zipping", tree.manifest.file_count() as u64);
    let mut buf = vec![0u8; 1 << 20];
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    // Batches the writer is done with, and a wake-up for helpers waiting to read ahead.
    let done = (Mutex::new(0usize), Condvar::new());
    let helpers = super::worker_threads().clamp(1, batches.len().max(1));
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..helpers {
            let tx = tx.clone();
            let (next, stop, done, batches) = (&next, &stop, &done, &batches);
            scope.spawn(move || {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches.len() {
                        return;
                    }
                    let mut written = done.0.lock().unwrap();
                    while b >= *written + BATCHES_AHEAD && !stop.load(Ordering::Relaxed) {
                        written = done.1.wait(written).unwrap();
                    }
                    drop(written);
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let read = read_batch(tree, &entries[batches[b].clone()]);
                    if tx.send((b, read)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut write = || -> Result<(), PackageError> {
            let mut arrived = BTreeMap::new();
            for (b, range) in batches.iter().enumerate() {
                let read = loop {
                    if let Some(read) = arrived.remove(&b) {
                        break read;
                    }
                    let (i, read) = rx.recv().expect("a helper sends every batch it takes");
                    arrived.insert(i, read);
                };
                let read: Vec<Option<Vec<u8>>> = read?;
                for (entry, data) in entries[range.clone()].iter().zip(read) {
                    write_entry(&mut zip, tree, entry, data, base, &mut buf)?;
                    if let EntryKind::File { .. } = entry.kind {
                        phase.inc(1);
                    }
                }
                *done.0.lock().unwrap() = b + 1;
                done.1.notify_all();
            }
            Ok(())
        };
        let result = write();
        // Helpers still waiting to read ahead stop (joined as the scope ends).
        stop.store(true, Ordering::Relaxed);
        done.1.notify_all();
        result
    })?;
    phase.finish();
    zip.finish().map_err(zip_err)
}

/// Consecutive entries, in batches of about [`BATCH_BYTES`] or [`BATCH_ENTRIES`].
fn batches(entries: &[ManifestEntry]) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, entry) in entries.iter().enumerate() {
        if let EntryKind::File { size, .. } = entry.kind
            && size <= READ_AHEAD_FILE
        {
            bytes += size;
        }
        if bytes >= BATCH_BYTES || i + 1 - start >= BATCH_ENTRIES {
            batches.push(start..i + 1);
            (start, bytes) = (i + 1, 0);
        }
    }
    if start < entries.len() {
        batches.push(start..entries.len());
    }
    batches
}

/// The bytes of each small file of `entries` (`None` for anything else), checked against
/// its manifest size and digest.
fn read_batch(tree: &ScannedTree, entries: &[ManifestEntry]) -> Result<Vec<Option<Vec<u8>>>, PackageError> {
    entries
        .iter()
        .map(|entry| match entry.kind {
            EntryKind::File { size, content, .. } if size <= READ_AHEAD_FILE => {
                let source = tree.source_path(entry);
                let (mut input, _) = open_regular(&source)?;
                let mut data = Vec::with_capacity(size as usize + 1);
                input
                    .read_to_end(&mut data)
                    .map_err(|e| super::scan::fs_err_io(&source, e))?;
                let digest: crate::digest::Digest = blake3::hash(&data).into();
                if data.len() as u64 != size || digest != content {
                    return Err(PackageError::Changed(source));
                }
                Ok(Some(data))
            }
            _ => Ok(None),
        })
        .collect()
}

fn write_entry<W: Write + Seek>(
    zip: &mut ZipWriter<W>,
    tree: &ScannedTree,
    entry: &ManifestEntry,
    data: Option<Vec<u8>>,
    base: SimpleFileOptions,
    buf: &mut [u8],
) -> Result<(), PackageError> {
    match &entry.kind {
        EntryKind::Dir => {
            zip.add_directory(format!("{}/", entry.path), base.unix_permissions(0o755))
                .map_err(zip_err)?;
        }
        EntryKind::Symlink { target } => {
            zip.add_symlink(&entry.path, target, base.unix_permissions(0o777))
                .map_err(zip_err)?;
        }
        EntryKind::File {
            executable,
            size,
            content,
        } => {
            let mode = if *executable { 0o755 } else { 0o644 };
            let options = base.unix_permissions(mode).large_file(*size >= u32::MAX as u64);
            match data {
                Some(data) => {
                    zip.start_file(&entry.path, options).map_err(zip_err)?;
                    zip.write_all(&data)?;
                }
                None => {
                    let source = tree.source_path(entry);
                    let (mut input, _) = open_regular(&source)?;
                    zip.start_file(&entry.path, options).map_err(zip_err)?;
                    // Re-hash while copying: the zip must hold exactly the bytes the
                    // digest names.
                    let (_, copied) = copy_hashing(&mut input, zip, &source, buf)?;
                    if copied != *content {
                        return Err(PackageError::Changed(source));
                    }
                }
            }
        }
    }
    Ok(())
}

fn zip_err(e: zip::result::ZipError) -> PackageError {
    match e {
        zip::result::ZipError::Io(io) => PackageError::Io(io),
        other => PackageError::Io(std::io::Error::other(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::scan::scan_dir;
    use crate::package::zip_read::{UnpackLimits, unpack};

    fn tree_of_many_files(root: &std::path::Path) {
        for i in 0..700 {
            let dir = root.join(format!("d{}", i % 7));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}")), format!("file {i}\n").repeat(i % 50)).unwrap();
        }
        // Larger than what helpers read ahead: copied through by the writer.
        std::fs::write(root.join("big"), vec![7u8; (READ_AHEAD_FILE + 1) as usize]).unwrap();
        std::os::unix::fs::symlink("big", root.join("link")).unwrap();
    }

    fn zip_of(tree: &ScannedTree) -> Result<Vec<u8>, PackageError> {
        let out = write_zip(
            tree,
            std::io::Cursor::new(Vec::new()),
            Compression::Stored,
            &Progress::hidden(),
        )?;
        Ok(out.into_inner())
    }

    #[test]
    fn batches_read_ahead_give_the_same_bytes_and_the_tree_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree_of_many_files(&root);
        let tree = scan_dir(&root, &[], 2, None, &Progress::hidden()).unwrap();
        assert!(batches(tree.manifest.entries()).len() > 2, "several batches");
        let bytes = zip_of(&tree).unwrap();
        assert_eq!(bytes, zip_of(&tree).unwrap(), "reproducible");
        std::fs::write(dir.path().join("a.zip"), &bytes).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let limits = UnpackLimits::default();
        let manifest = unpack(&dir.path().join("a.zip"), &out, limits, 2, &Progress::hidden()).unwrap();
        assert_eq!(manifest.digest(), tree.manifest.digest());
    }

    #[test]
    fn a_file_changed_after_the_scan_is_never_zipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        tree_of_many_files(&root);
        let tree = scan_dir(&root, &[], 2, None, &Progress::hidden()).unwrap();
        // Same size, other bytes: read ahead by a helper, refused by its digest.
        std::fs::write(root.join("d3/f10"), "FILE 10\n".repeat(10)).unwrap();
        match zip_of(&tree) {
            Err(PackageError::Changed(path)) => assert!(path.ends_with("d3/f10"), "{path:?}"),
            other => panic!("expected Changed, got {:?}", other.map(|b| b.len())),
        }
    }
}
