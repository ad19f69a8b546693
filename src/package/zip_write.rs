//! `renv package`: a standard zip of a scanned tree, byte-for-byte reproducible.
//!
//! Entries are written in manifest order (sorted paths, each directory before what it
//! holds) with a fixed timestamp (1980-01-01, the zip epoch) and renv's modes (`0644`,
//! `0755` for executables and directories), so the same tree always gives the same bytes.
//! Unpacking it with [`zip_read`](super::zip_read) gives the same manifest digest back.

use std::io::{Seek, Write};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

use super::manifest::EntryKind;
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

/// Writes the zip of `tree` to `out`.
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
    let mut zip = ZipWriter::new(out);
    let phase = progress.phase("zipping", tree.manifest.file_count() as u64);
    let mut buf = vec![0u8; 1 << 20];
    for entry in tree.manifest.entries() {
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
                let source = tree.source_path(entry);
                let (mut input, _) = open_regular(&source)?;
                let mode = if *executable { 0o755 } else { 0o644 };
                zip.start_file(
                    &entry.path,
                    base.unix_permissions(mode).large_file(*size >= u32::MAX as u64),
                )
                .map_err(zip_err)?;
                // Re-hash while copying: the zip must hold exactly the bytes the digest names.
                let (_, copied) = copy_hashing(&mut input, &mut zip, &source, &mut buf)?;
                if copied != *content {
                    return Err(PackageError::Changed(source));
                }
                phase.inc(1);
            }
        }
    }
    phase.finish();
    zip.finish().map_err(zip_err)
}

fn zip_err(e: zip::result::ZipError) -> PackageError {
    match e {
        zip::result::ZipError::Io(io) => PackageError::Io(io),
        other => PackageError::Io(std::io::Error::other(other)),
    }
}
