//! Unpacking an untrusted zip into a staging directory.
//!
//! Never a one-call extract. The central directory is checked as a whole before a byte is
//! written, and the whole archive is rejected (never "sanitized") if any entry:
//!
//! - has a name that is not UTF-8, is absolute, has `..`, `.` or empty components, a
//!   backslash or a NUL;
//! - repeats a name, or lives under a name that is a file or a symlink in the archive
//!   (that is how "symlink out, then write through it" attacks work);
//! - is a FIFO, socket or device, is encrypted, or is a symlink leaving the tree
//!   (the rule in [`super::symlink`]);
//! - would push the entry count or the bytes *actually written* past the limits
//!   (declared sizes are checked first as a cheap early exit, but headers lie).
//!
//! Before the central directory is parsed at all, the counts its end records declare are
//! held to the same caps ([`super::zip_eocd`]): parsing is what costs memory.
//!
//! Files are created with [`create_file`] (`O_EXCL | O_NOFOLLOW`, renv's modes), so
//! setuid/setgid/world-write bits never reach the disk. The caller owns `dest` and
//! removes it on error, so a rejected archive leaves no trace.
//!
//! A zip is opened once ([`OpenZip`]): hashing it, parsing it and every unpacking thread
//! read that one open file by offset, never its path again. A path can be re-pointed
//! between two opens — a symlink swapped between hashing and unpacking once stored one
//! zip's tree under another zip's digest — an open file cannot.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use zip::ZipArchive;
use zip::read::{ArchiveOffset, Config};

use super::hash_cache::HashCache;
use super::manifest::{EntryKind, Manifest, ManifestEntry};
use super::tree::{create_file, seal_dirs};
use super::{PackageError, copy_hashing, parallel_map, scan, symlink, zip_eocd};
use crate::digest::Digest;
use crate::progress::Progress;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
pub(super) const MAX_SYMLINK_TARGET: u64 = 4096;
/// The most central-directory bytes one entry may need: the 46-byte fixed header, a name
/// up to PATH_MAX (4096) and room for extra fields and a comment.
const MAX_DIRECTORY_BYTES_PER_ENTRY: u64 = 8 << 10;

/// Caps on what one archive may put on disk.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    pub max_bytes: u64,
    pub max_entries: usize,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 2 << 30,
            max_entries: 200_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive is malformed or hostile; nothing from it is kept.
    #[error("{}{reason}", entry.as_ref().map(|e| format!("zip entry {e:?}: ")).unwrap_or_default())]
    Rejected { entry: Option<String>, reason: String },
    /// Writing it failed (disk full, permissions): not the archive's fault.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub(super) fn reject(entry: Option<&str>, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Rejected {
        entry: entry.map(str::to_string),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Planned {
    Dir,
    File { executable: bool },
    Symlink,
}

/// A zip opened once; see the module doc. Everything renv reads of it goes through this
/// one open file, up to the length it had when opened.
#[derive(Debug)]
pub struct OpenZip {
    file: Arc<File>,
    /// For messages only: the path is never opened again.
    path: PathBuf,
    /// The fstat taken when it was opened; [`Self::check_unchanged`] compares against it.
    opened: std::fs::Metadata,
}

impl OpenZip {
    /// Opens the zip at `path` (following a symlink once: the file it names now is the
    /// zip). `O_NONBLOCK`: a FIFO put in its place is refused, never waited on.
    pub fn open(path: &Path) -> Result<OpenZip, ArchiveError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| scan::fs_err_io(path, e))?;
        OpenZip::from_file(file, path)
    }

    /// Takes a zip already open for reading (an upload's staged file), named `path` in
    /// messages.
    pub fn from_file(file: File, path: &Path) -> Result<OpenZip, ArchiveError> {
        let opened = file.metadata().map_err(|e| scan::fs_err_io(path, e))?;
        if !opened.is_file() {
            let kind = scan::special_kind(&opened.file_type());
            let kind = if opened.is_dir() { "a directory" } else { kind };
            return Err(reject(None, format!("expected a zip file, found {kind}")));
        }
        Ok(OpenZip {
            file: Arc::new(file),
            path: path.to_path_buf(),
            opened,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fstat of the open file, as it was when opened.
    pub fn metadata(&self) -> &std::fs::Metadata {
        &self.opened
    }

    /// blake3 of the zip's bytes, read through the open file. Fails if the file changed
    /// while it was read.
    pub fn hash(&self) -> Result<Digest, PackageError> {
        let mut buf = vec![0u8; 1 << 20];
        let (_, digest) = copy_hashing(&mut self.reader(), &mut io::sink(), &self.path, &mut buf)?;
        self.check_unchanged()?;
        Ok(digest)
    }

    /// Fails, naming the file, if its size, mode or times are not what they were when it
    /// was opened: its bytes may then not be the ones hashed or unpacked.
    pub fn check_unchanged(&self) -> Result<(), PackageError> {
        let now = self.file.metadata().map_err(|e| scan::fs_err_io(&self.path, e))?;
        if HashCache::same_state(&self.opened, &now) {
            Ok(())
        } else {
            Err(PackageError::Changed(self.path.clone()))
        }
    }

    fn reader(&self) -> ReadAt {
        ReadAt {
            file: Arc::clone(&self.file),
            len: self.opened.len(),
            pos: 0,
            buf: Vec::new(),
            buf_pos: 0,
        }
    }

    /// Unpacks the zip into the existing, empty directory `dest` and returns the manifest
    /// of what was written.
    pub fn unpack(
        &self,
        dest: &Path,
        limits: UnpackLimits,
        threads: usize,
        progress: &Progress,
    ) -> Result<Manifest, ArchiveError> {
        unpack_from(self.reader(), dest, limits, threads, progress)
    }
}

/// A reader of an [`OpenZip`] with a position and a read-ahead buffer of its own: it
/// reads with `pread(2)`, so readers on many threads share the open file without sharing
/// (or racing on) a file offset. It ends where the file ended when it was opened.
#[derive(Clone)]
struct ReadAt {
    file: Arc<File>,
    len: u64,
    pos: u64,
    /// The file's bytes from `buf_pos`: the zip reader reads headers a few bytes at a time.
    buf: Vec<u8>,
    buf_pos: u64,
}

const READ_AHEAD: usize = 64 << 10;

impl Read for ReadAt {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.len.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let want = out.len().min(left);
        if want == 0 {
            return Ok(0);
        }
        if want >= READ_AHEAD {
            // File contents: straight into the caller's buffer.
            let n = self.file.read_at(&mut out[..want], self.pos)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let in_buf = self.pos >= self.buf_pos && self.pos < self.buf_pos + self.buf.len() as u64;
        if !in_buf {
            self.buf.resize(READ_AHEAD.min(left), 0);
            let n = self.file.read_at(&mut self.buf, self.pos)?;
            self.buf.truncate(n);
            self.buf_pos = self.pos;
        }
        let start = (self.pos - self.buf_pos) as usize;
        let n = want.min(self.buf.len() - start);
        out[..n].copy_from_slice(&self.buf[start..start + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ReadAt {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(pos) => Some(pos),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = pos
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the zip"))?;
        Ok(self.pos)
    }
}

/// Unpacks the zip at `zip_path` (opened once, see [`OpenZip`]) into the existing, empty
/// directory `dest` and returns the manifest of what was written.
pub fn unpack(
    zip_path: &Path,
    dest: &Path,
    limits: UnpackLimits,
    threads: usize,
    progress: &Progress,
) -> Result<Manifest, ArchiveError> {
    OpenZip::open(zip_path)?.unpack(dest, limits, threads, progress)
}

/// Refuses an archive whose end records declare more than the caps allow, before its
/// central directory is parsed.
pub(super) fn check_declared<R: Read + Seek>(
    reader: &mut R,
    limits: UnpackLimits,
) -> Result<(), ArchiveError> {
    let declared = zip_eocd::declared(reader)?;
    if declared.entries > limits.max_entries as u64 {
        return Err(reject(
            None,
            format!(
                "{} entries, more than the limit of {}",
                declared.entries, limits.max_entries
            ),
        ));
    }
    let max_bytes = (limits.max_entries as u64).saturating_mul(MAX_DIRECTORY_BYTES_PER_ENTRY);
    if declared.directory_bytes > max_bytes {
        return Err(reject(
            None,
            format!(
                "a central directory of {} bytes, more than the limit of {max_bytes} \
                 ({} entries of at most {MAX_DIRECTORY_BYTES_PER_ENTRY} bytes)",
                declared.directory_bytes, limits.max_entries
            ),
        ));
    }
    Ok(())
}

fn unpack_from(
    mut reader: ReadAt,
    dest: &Path,
    limits: UnpackLimits,
    threads: usize,
    progress: &Progress,
) -> Result<Manifest, ArchiveError> {
    check_declared(&mut reader, limits)?;
    // Offsets as written: with `Detect` the zip reader would search the file for a
    // directory that fits when the declared one does not, and the check above could not
    // know which one it found. Data prepended to an archive is refused instead.
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    let mut archive = ZipArchive::with_config(config, reader)
        .map_err(|e| reject(None, format!("not a readable zip: {e}")))?;
    if archive.len() > limits.max_entries {
        return Err(reject(
            None,
            format!(
                "{} entries, more than the limit of {}",
                archive.len(),
                limits.max_entries
            ),
        ));
    }
    // The reader keys entries by name, so a repeated name would otherwise go unseen.
    if archive.has_duplicate_names() {
        return Err(reject(None, "duplicate names in the central directory"));
    }
    let plan = plan(&archive, limits)?;

    // Directories first (sorted: parents before children), then files in parallel, each
    // thread with its own reader, then symlinks last so nothing is written through one.
    for (path, kind, _) in &plan {
        if *kind == Planned::Dir {
            fs_err::create_dir(dest.join(path))?;
        }
    }
    let files: Vec<(&String, usize, bool)> = plan
        .iter()
        .filter_map(|(path, kind, index)| match kind {
            Planned::File { executable } => Some((path, index.expect("files are explicit"), *executable)),
            _ => None,
        })
        .collect();
    let written = AtomicU64::new(0);
    let writeback = super::tree::wants_writeback(dest);
    let phase = progress.phase("unpacking", files.len() as u64);
    let chunks: Vec<&[(&String, usize, bool)]> = files
        .chunks(files.len().div_ceil(threads.max(1)).max(1))
        .collect();
    let digests = parallel_map(chunks.len(), chunks.len(), |c| {
        // A clone shares the parsed directory and the open file, with its own position.
        let mut archive = archive.clone();
        let mut buf = vec![0u8; 256 << 10];
        let mut out = Vec::with_capacity(chunks[c].len());
        for &(path, index, executable) in chunks[c] {
            let mut entry = archive
                .by_index(index)
                .map_err(|e| reject(Some(path), e.to_string()))?;
            let mut file = create_file(dest, path, executable)?;
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                let n = entry
                    .read(&mut buf)
                    .map_err(|e| reject(Some(path), format!("cannot read: {e}")))?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                let total = written.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                if total > limits.max_bytes {
                    return Err(reject(
                        Some(path),
                        format!(
                            "archive unpacks to more than the limit of {} bytes",
                            limits.max_bytes
                        ),
                    ));
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
            if writeback {
                super::tree::start_writeback(&file);
            }
            phase.inc(1);
            let content: Digest = hasher.finalize().into();
            out.push(ManifestEntry {
                path: path.clone(),
                kind: EntryKind::File {
                    executable,
                    size,
                    content,
                },
            });
        }
        Ok::<_, ArchiveError>(out)
    })?;
    phase.finish();

    let mut entries: Vec<ManifestEntry> = digests.into_iter().flatten().collect();
    for (path, kind, index) in &plan {
        match kind {
            Planned::Dir => entries.push(ManifestEntry {
                path: path.clone(),
                kind: EntryKind::Dir,
            }),
            Planned::Symlink => {
                let index = index.expect("symlinks are explicit");
                let mut entry = archive
                    .by_index(index)
                    .map_err(|e| reject(Some(path), e.to_string()))?;
                let mut target = String::new();
                (&mut entry)
                    .take(MAX_SYMLINK_TARGET + 1)
                    .read_to_string(&mut target)
                    .map_err(|e| reject(Some(path), format!("symlink target is not UTF-8 text: {e}")))?;
                if !symlink::stays_inside(path, &target) {
                    return Err(reject(
                        Some(path),
                        format!("symlink to {target:?} leaves the tree"),
                    ));
                }
                fs_err::os::unix::fs::symlink(&target, dest.join(path))?;
                entries.push(ManifestEntry {
                    path: path.clone(),
                    kind: EntryKind::Symlink { target },
                });
            }
            Planned::File { .. } => {}
        }
    }
    let manifest = Manifest::new(entries);
    seal_dirs(dest, manifest.entries())?;
    Ok(manifest)
}

/// Validates every central-directory entry and returns the full plan, including the
/// directories that files imply, sorted by path. Reads only the central directory (parsed
/// already), never a local header: [`super::zip_stream`] plans from a directory whose
/// entries' bytes are gone.
pub(super) fn plan<R: Read + std::io::Seek>(
    archive: &ZipArchive<R>,
    limits: UnpackLimits,
) -> Result<Vec<(String, Planned, Option<usize>)>, ArchiveError> {
    let mut explicit: HashMap<String, (Planned, Option<usize>)> = HashMap::with_capacity(archive.len());
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_data(i)
            .map_err(|e| reject(None, format!("entry {i}: {e}")))?;
        let raw = entry.name_raw();
        let Ok(name) = std::str::from_utf8(raw) else {
            return Err(reject(Some(&String::from_utf8_lossy(raw)), "name is not UTF-8"));
        };
        let is_dir_name = name.ends_with('/');
        let path = name.strip_suffix('/').unwrap_or(name);
        check_name(name, path)?;
        if entry.encrypted() {
            return Err(reject(Some(name), "encrypted entries are not supported"));
        }
        let mode = entry.unix_mode().unwrap_or(0);
        let kind = match (mode & S_IFMT, is_dir_name) {
            (S_IFDIR, _) | (0, true) => Planned::Dir,
            (S_IFREG | 0, false) => Planned::File {
                executable: mode & 0o111 != 0,
            },
            (S_IFLNK, false) => Planned::Symlink,
            (S_IFREG | S_IFLNK, true) => {
                return Err(reject(Some(name), "a file or symlink whose name ends in `/`"));
            }
            _ => {
                return Err(reject(
                    Some(name),
                    "special files (FIFO, socket, device) are not allowed",
                ));
            }
        };
        if let Planned::File { .. } = kind {
            declared = declared.saturating_add(entry.size());
            if declared > limits.max_bytes {
                return Err(reject(
                    Some(name),
                    format!(
                        "archive declares more than the limit of {} bytes",
                        limits.max_bytes
                    ),
                ));
            }
        }
        if explicit.insert(path.to_string(), (kind, Some(i))).is_some() {
            return Err(reject(Some(name), "duplicate name"));
        }
    }
    let mut implied = BTreeSet::new();
    for path in explicit.keys() {
        let mut parent = path.as_str();
        while let Some((dir, _)) = parent.rsplit_once('/') {
            match explicit.get(dir) {
                Some((Planned::Dir, _)) => {}
                Some(_) => {
                    return Err(reject(
                        Some(path),
                        format!("its parent {dir:?} is a file or symlink in the archive"),
                    ));
                }
                None => {
                    implied.insert(dir.to_string());
                }
            }
            parent = dir;
        }
    }
    if explicit.len() + implied.len() > limits.max_entries {
        return Err(reject(
            None,
            format!("more than the limit of {} entries", limits.max_entries),
        ));
    }
    let mut plan: Vec<(String, Planned, Option<usize>)> = explicit
        .into_iter()
        .map(|(path, (kind, index))| (path, kind, index))
        .chain(implied.into_iter().map(|dir| (dir, Planned::Dir, None)))
        .collect();
    plan.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(plan)
}

pub(super) fn check_name(name: &str, path: &str) -> Result<(), ArchiveError> {
    let why = if path.is_empty() {
        Some("empty name")
    } else if path.starts_with('/') {
        Some("absolute paths are not allowed")
    } else if path.contains('\\') {
        Some("backslashes are not allowed in names")
    } else if path.contains('\0') {
        Some("NUL bytes are not allowed in names")
    } else if path.split('/').any(|c| c == "..") {
        Some("`..` components are not allowed")
    } else if path.split('/').any(|c| c.is_empty() || c == ".") {
        Some("empty or `.` path components are not allowed")
    } else {
        None
    };
    match why {
        Some(reason) => Err(reject(Some(name), reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    const LIMITS: UnpackLimits = UnpackLimits {
        max_bytes: 1 << 20,
        max_entries: 100,
    };

    fn real_zip(files: usize) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for i in 0..files {
            writer
                .start_file(format!("f{i}.txt"), zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(format!("file {i}").as_bytes()).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    /// The same archive with ZIP64 end records: its EOCD says "see ZIP64", and the ZIP64
    /// record (claiming `entries`) holds the real directory size and offset.
    fn as_zip64(zip: &[u8], entries: u64) -> Vec<u8> {
        let (body, eocd) = zip.split_at(zip.len() - 22);
        let directory_bytes = u32::from_le_bytes(eocd[12..16].try_into().unwrap()) as u64;
        let directory_offset = u32::from_le_bytes(eocd[16..20].try_into().unwrap()) as u64;
        let mut out = body.to_vec();
        let end64 = out.len() as u64;
        out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&entries.to_le_bytes());
        out.extend_from_slice(&directory_bytes.to_le_bytes());
        out.extend_from_slice(&directory_offset.to_le_bytes());
        out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&end64.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        out.extend_from_slice(&[0xff; 8]);
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    /// Unpacks `bytes` (written to a file) with `limits` into a fresh directory.
    fn unpack_bytes(bytes: &[u8], limits: UnpackLimits) -> Result<Manifest, ArchiveError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zip");
        std::fs::write(&path, bytes).unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        unpack(&path, &dest, limits, 2, &Progress::hidden())
    }

    fn rejection(result: Result<Manifest, ArchiveError>) -> String {
        match result {
            Err(ArchiveError::Rejected { entry: None, reason }) => reason,
            other => panic!("expected the whole archive rejected, got {other:?}"),
        }
    }

    #[test]
    fn a_real_zip_under_the_cap_unpacks() {
        let manifest = unpack_bytes(&real_zip(3), LIMITS).unwrap();
        assert_eq!(manifest.file_count(), 3);
    }

    #[test]
    fn a_declared_count_over_the_cap_is_refused_before_parsing() {
        let limits = UnpackLimits {
            max_entries: 2,
            ..LIMITS
        };
        assert_eq!(
            rejection(unpack_bytes(&real_zip(3), limits)),
            "3 entries, more than the limit of 2"
        );
    }

    #[test]
    fn a_directory_claiming_2_pow_32_entries_is_refused() {
        // Only the claim: parsing it would fail (or, were it real, cost hundreds of GB).
        let bytes = as_zip64(&real_zip(1), 1 << 32);
        assert_eq!(
            rejection(unpack_bytes(&bytes, LIMITS)),
            "4294967296 entries, more than the limit of 100"
        );
    }

    #[test]
    fn zip64_end_records_are_read_and_held_to_the_cap() {
        let bytes = as_zip64(&real_zip(3), 3);
        let manifest = unpack_bytes(&bytes, LIMITS).unwrap();
        assert_eq!(manifest.file_count(), 3);
        let limits = UnpackLimits {
            max_entries: 2,
            ..LIMITS
        };
        assert_eq!(
            rejection(unpack_bytes(&bytes, limits)),
            "3 entries, more than the limit of 2"
        );
    }

    #[test]
    fn a_directory_too_large_for_the_cap_is_refused() {
        let mut bytes = real_zip(1);
        let at = bytes.len() - 22 + 12;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let reason = rejection(unpack_bytes(&bytes, LIMITS));
        assert!(
            reason.starts_with("a central directory of 4294967295 bytes, more than the limit of 819200"),
            "{reason}"
        );
    }

    #[test]
    fn data_before_the_archive_is_refused() {
        // Offsets are taken as written; a reader searching for a directory that fits could
        // find one the end records (and so the caps) never declared.
        let mut bytes = b"#!/bin/sh\nexit 0\n".to_vec();
        bytes.extend(real_zip(2));
        assert!(rejection(unpack_bytes(&bytes, LIMITS)).starts_with("not a readable zip"));
    }

    #[test]
    fn readers_see_the_bytes_at_their_own_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let data: Vec<u8> = (0..(3 * READ_AHEAD + 17)).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let zip = OpenZip::open(&path).unwrap();
        let (mut a, mut b) = (zip.reader(), zip.reader());
        let mut small = [0u8; 10];
        b.seek(SeekFrom::Start(READ_AHEAD as u64 - 5)).unwrap();
        b.read_exact(&mut small).unwrap();
        assert_eq!(small[..], data[READ_AHEAD - 5..READ_AHEAD + 5]);
        let mut all = Vec::new();
        a.read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
        b.seek(SeekFrom::End(-3)).unwrap();
        let mut tail = Vec::new();
        b.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, data[data.len() - 3..]);
        assert!(b.seek(SeekFrom::Current(-(data.len() as i64) - 1)).is_err());
    }

    #[test]
    fn the_open_file_is_read_even_after_its_path_names_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.zip");
        std::fs::write(dir.path().join("a.zip"), real_zip(1)).unwrap();
        std::fs::write(dir.path().join("b.zip"), real_zip(2)).unwrap();
        std::os::unix::fs::symlink("a.zip", &path).unwrap();
        let zip = OpenZip::open(&path).unwrap();
        let digest = zip.hash().unwrap();
        // The link re-pointed by rename, as an attacker swapping it would.
        std::os::unix::fs::symlink("b.zip", dir.path().join("new")).unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert_eq!(zip.hash().unwrap(), digest);
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let manifest = zip.unpack(&dest, LIMITS, 2, &Progress::hidden()).unwrap();
        assert_eq!(manifest.file_count(), 1);
    }

    #[test]
    fn a_zip_written_to_while_open_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.zip");
        std::fs::write(&path, real_zip(1)).unwrap();
        let zip = OpenZip::open(&path).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        match zip.hash() {
            Err(PackageError::Changed(named)) => assert_eq!(named, path),
            other => panic!("expected Changed, got {other:?}"),
        }
    }

    #[test]
    fn only_a_regular_file_is_a_zip() {
        let dir = tempfile::tempdir().unwrap();
        let reason = match OpenZip::open(dir.path()) {
            Err(ArchiveError::Rejected { reason, .. }) => reason,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(reason, "expected a zip file, found a directory");
    }
}
