//! Unpacking a zip while its bytes arrive (a download), front to back, without keeping
//! the zip: each entry is written as its local header and data stream past, and the
//! central directory, which comes last, is checked against what was written.
//!
//! Why: a remote package was downloaded into a staging file and then unpacked from it, so
//! the unpack waited for the last byte, and every byte was copied into the file, read
//! back and freed again. Streaming overlaps the two and copies each byte once.
//!
//! The checks are [`super::zip_read`]'s, over the same central directory, with the order
//! turned round: what is written before the directory is seen stays inside `dest`, a
//! fresh directory in the store's private staging, because
//!
//! - names are checked (as `zip_read` checks them) before anything is created: no `..`, no
//!   absolute path, no empty or `.` component;
//! - nothing but regular files and directories is created while streaming: an entry the
//!   directory will call a symlink is first written as a file (its bytes are the target)
//!   and becomes a symlink only once the whole archive has been checked, so no path
//!   component can lead out of `dest`;
//! - files are created `O_EXCL | O_NOFOLLOW` ([`create_file`]), with renv's modes;
//! - the caps hold on the bytes written and the entries seen, as the stream goes.
//!
//! Then the directory must describe exactly the entries streamed (same count, each at the
//! offset its local header was read from, same name, method, sizes and CRC), be where the
//! last entry ended, and pass the same plan as a zip read from a file (duplicates, kinds,
//! a parent that is a file or symlink, the caps). Anything else — an entry whose sizes
//! only follow its data (a data descriptor), a directory that disagrees with the local
//! headers, an archive [`super::zip_read`] would refuse — is [`StreamError::NotStreamable`]:
//! the caller drops the staging dir and reads the zip the other way (download into a
//! file, then [`super::zip_read`]), which accepts or refuses it with its own reasons.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zip::ZipArchive;
use zip::read::{ArchiveOffset, Config};

use super::manifest::{EntryKind, Manifest, ManifestEntry};
use super::symlink;
use super::tree::{EXEC_MODE, create_file, seal_dirs, start_writeback, wants_writeback};
use super::zip_read::{self, ArchiveError, MAX_SYMLINK_TARGET, Planned, UnpackLimits};
use crate::digest::Digest;
use crate::progress::Progress;

const LOCAL_HEADER_SIGNATURE: [u8; 4] = [0x50, 0x4b, 0x03, 0x04];
/// The end of the zip kept in memory as it streams past: the end records are looked for
/// in its last 64 KiB and a little (the longest comment, the ZIP64 records before them).
const KEPT_END: u64 = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Not unpacked this way (see the module doc); read it from a file instead.
    #[error("not unpacked while downloading: {0}")]
    NotStreamable(String),
    /// Reading the input (the download broke off) or writing the tree failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn not_streamable(reason: impl std::fmt::Display) -> StreamError {
    StreamError::NotStreamable(reason.to_string())
}

/// What one local header and its data were, as streamed.
struct Streamed {
    name_raw: Vec<u8>,
    method: zip::CompressionMethod,
    compressed_size: u64,
    size: u64,
    crc32: u32,
    /// A directory entry (name ending in `/`), else written as a file with this digest.
    content: Option<Digest>,
}

/// Unpacks the zip of `len` bytes that `input` yields, front to back, into the existing,
/// empty directory `dest` and returns the manifest of what was written. Read errors of
/// `input` (a download that broke off) come back as [`StreamError::Io`]. On any error
/// `dest` holds a partial tree: the caller discards it.
pub fn unpack_stream(
    input: &mut (impl Read + ?Sized),
    len: u64,
    dest: &Path,
    limits: UnpackLimits,
    progress: &Progress,
) -> Result<Manifest, StreamError> {
    let mut input = Counting {
        inner: input,
        pos: 0,
        keep_from: len.saturating_sub(KEPT_END),
        kept: Vec::new(),
    };
    let mut streamed: HashMap<u64, Streamed> = HashMap::new();
    let mut dirs: HashSet<String> = HashSet::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    let phase = progress.phase("unpacking", 0);
    let writeback = wants_writeback(dest);
    let (tail_start, tail) = loop {
        let offset = input.pos;
        let mut magic = [0u8; 4];
        input.read_exact(&mut magic)?;
        if magic != LOCAL_HEADER_SIGNATURE {
            // The central directory (or, for an empty archive, the end record): kept whole
            // in memory, as parsing it would (its size is held to the caps below).
            let mut tail = magic.to_vec();
            input.read_to_end(&mut tail)?;
            break (offset, tail);
        }
        if streamed.len() >= limits.max_entries {
            return Err(not_streamable(format!(
                "more than the limit of {} entries",
                limits.max_entries
            )));
        }
        let mut header = (&magic[..]).chain(&mut input);
        let mut file = match zip::read::read_zipfile_from_stream(&mut header) {
            Ok(Some(file)) => file,
            Ok(None) => return Err(not_streamable("a local header that is not one")),
            Err(zip::result::ZipError::Io(e)) => return Err(e.into()),
            Err(e) => return Err(not_streamable(e)),
        };
        let name_raw = file.name_raw().to_vec();
        let Ok(name) = std::str::from_utf8(&name_raw) else {
            return Err(not_streamable("a name that is not UTF-8"));
        };
        if file.encrypted() {
            return Err(not_streamable("an encrypted entry"));
        }
        let is_dir = name.ends_with('/');
        let path = name.strip_suffix('/').unwrap_or(name);
        zip_read::check_name(name, path).map_err(not_streamable)?;
        create_parents(dest, path, &mut dirs)?;
        let mut entry = Streamed {
            name_raw: name_raw.clone(),
            method: file.compression(),
            compressed_size: file.compressed_size(),
            size: file.size(),
            crc32: file.crc32(),
            content: None,
        };
        if is_dir {
            if dirs.insert(path.to_string()) {
                create_dir(dest, path)?;
            }
        } else {
            if dirs.contains(path) {
                return Err(not_streamable(format!("{path:?} is both a file and a directory")));
            }
            let mut out = create_file(dest, path, false).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => not_streamable(e),
                _ => StreamError::Io(e),
            })?;
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            loop {
                // Whole buffers: a download arrives in pieces of a few KiB, each one a read.
                let n = read_full(&mut file, &mut buf).map_err(|e| match e.kind() {
                    // The zip reader's own complaints (a bad CRC, bad deflate data).
                    io::ErrorKind::InvalidData | io::ErrorKind::Other => not_streamable(e),
                    _ => StreamError::Io(e),
                })?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                written += n as u64;
                if written > limits.max_bytes {
                    return Err(not_streamable(format!(
                        "unpacks to more than the limit of {} bytes",
                        limits.max_bytes
                    )));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
            if writeback {
                start_writeback(&out);
            }
            if size != entry.size {
                return Err(not_streamable(format!(
                    "{path:?}: {size} bytes, its header says {}",
                    entry.size
                )));
            }
            entry.content = Some(hasher.finalize().into());
            phase.inc(1);
        }
        // Dropping the entry's reader reads past whatever of its data is left.
        drop(file);
        streamed.insert(offset, entry);
    };
    phase.finish();
    if input.pos != len {
        return Err(not_streamable(format!("{} bytes, not {len}", input.pos)));
    }

    // From the directory on, or the last KEPT_END bytes when the directory is shorter.
    let (start, bytes) = if tail_start <= input.keep_from {
        (tail_start, tail)
    } else {
        (input.keep_from, std::mem::take(&mut input.kept))
    };
    let mut reader = Tail { start, bytes, pos: 0 };
    zip_read::check_declared(&mut reader, limits).map_err(not_streamable)?;
    let config = Config {
        archive_offset: ArchiveOffset::Known(0),
    };
    let archive = ZipArchive::with_config(config, reader).map_err(not_streamable)?;
    if archive.len() > limits.max_entries || archive.has_duplicate_names() {
        return Err(not_streamable("the central directory is refused"));
    }
    if archive.central_directory_start() != tail_start || archive.len() != streamed.len() {
        return Err(not_streamable(
            "the central directory does not list the entries streamed",
        ));
    }
    let plan = zip_read::plan(&archive, limits).map_err(not_streamable)?;

    // Each central entry names one streamed entry, by the offset of its local header, and
    // says what it said (counts are equal, so this pairs them all).
    let mut by_index: Vec<Option<Streamed>> = (0..archive.len()).map(|_| None).collect();
    for (i, slot) in by_index.iter_mut().enumerate() {
        let central = archive.by_index_data(i).map_err(not_streamable)?;
        let Some(local) = streamed.remove(&central.header_start()) else {
            return Err(not_streamable(format!(
                "entry {i} is not where a local header was"
            )));
        };
        if local.name_raw != central.name_raw()
            || local.method != central.compression()
            || local.compressed_size != central.compressed_size()
            || local.size != central.size()
            || local.crc32 != central.crc32()
        {
            return Err(not_streamable(format!(
                "entry {i}: its local header and the directory disagree"
            )));
        }
        *slot = Some(local);
    }

    let mut entries = Vec::with_capacity(plan.len());
    let mut symlinks = Vec::new();
    for (path, kind, index) in plan {
        let local = index.map(|i| by_index[i].take().expect("each index once"));
        match (kind, local) {
            (Planned::Dir, None) => entries.push(ManifestEntry {
                path,
                kind: EntryKind::Dir,
            }),
            (Planned::Dir, Some(local)) if local.content.is_none() => entries.push(ManifestEntry {
                path,
                kind: EntryKind::Dir,
            }),
            (Planned::File { executable }, Some(local)) if local.content.is_some() => {
                if executable {
                    // Created 0444 before its mode was known. No symlink exists under `dest`
                    // yet, so the path leads to that file.
                    fs_err::set_permissions(
                        dest.join(&path),
                        std::os::unix::fs::PermissionsExt::from_mode(EXEC_MODE),
                    )?;
                }
                entries.push(ManifestEntry {
                    kind: EntryKind::File {
                        executable,
                        size: local.size,
                        content: local.content.expect("a file"),
                    },
                    path,
                });
            }
            (Planned::Symlink, Some(local))
                if local.content.is_some() && local.size <= MAX_SYMLINK_TARGET =>
            {
                symlinks.push(path)
            }
            _ => return Err(not_streamable(format!("{path:?} was streamed as another kind"))),
        }
    }
    // Last, as a zip read from a file makes them: nothing is written through one.
    for path in symlinks {
        let target = read_target(dest, &path)?;
        if !symlink::stays_inside(&path, &target) {
            return Err(not_streamable(format!(
                "symlink {path:?} to {target:?} leaves the tree"
            )));
        }
        fs_err::remove_file(dest.join(&path))?;
        fs_err::os::unix::fs::symlink(&target, dest.join(&path))?;
        entries.push(ManifestEntry {
            path,
            kind: EntryKind::Symlink { target },
        });
    }
    let manifest = Manifest::new(entries);
    seal_dirs(dest, manifest.entries())?;
    Ok(manifest)
}

/// Creates the directories above `path` not created yet (as a zip read from a file
/// creates the directories its files imply).
fn create_parents(dest: &Path, path: &str, dirs: &mut HashSet<String>) -> Result<(), StreamError> {
    let mut end = 0;
    while let Some(slash) = path[end..].find('/') {
        end += slash;
        let dir = &path[..end];
        if !dirs.contains(dir) {
            create_dir(dest, dir)?;
            dirs.insert(dir.to_string());
        }
        end += 1;
    }
    Ok(())
}

fn create_dir(dest: &Path, dir: &str) -> Result<(), StreamError> {
    fs_err::create_dir(dest.join(dir)).map_err(|e| match e.kind() {
        // A name the archive used for a file already.
        io::ErrorKind::AlreadyExists | io::ErrorKind::NotADirectory => not_streamable(e),
        _ => StreamError::Io(e),
    })
}

/// The bytes of a streamed file that the directory says is a symlink: its target.
fn read_target(dest: &Path, path: &str) -> Result<String, StreamError> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest.join(path))?;
    let mut target = String::new();
    (&mut file)
        .take(MAX_SYMLINK_TARGET + 1)
        .read_to_string(&mut target)
        .map_err(|_| not_streamable(format!("symlink {path:?}: its target is not UTF-8 text")))?;
    Ok(target)
}

/// Reads until `buf` is full or the input ends.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A reader that knows how far it has read (the offset of each local header) and keeps
/// what it reads from `keep_from` on.
struct Counting<'a, R: ?Sized> {
    inner: &'a mut R,
    pos: u64,
    keep_from: u64,
    kept: Vec<u8>,
}

impl<R: Read + ?Sized> Read for Counting<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        let end = self.pos + n as u64;
        if end > self.keep_from {
            let from = self.keep_from.saturating_sub(self.pos) as usize;
            self.kept.extend_from_slice(&out[from..n]);
        }
        self.pos = end;
        Ok(n)
    }
}

/// The zip as far as the central directory reader needs it: its bytes from `start` (the
/// end of the zip, from its directory or the last [`KEPT_END`] bytes) at their offsets.
/// Anything before `start` is gone, and reading it is an error: a directory that points
/// there is not the one streamed past.
struct Tail {
    start: u64,
    bytes: Vec<u8>,
    pos: u64,
}

impl Read for Tail {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let Some(at) = self.pos.checked_sub(self.start) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reads before the central directory",
            ));
        };
        let rest = self.bytes.get(at as usize..).unwrap_or_default();
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Tail {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let len = self.start + self.bytes.len() as u64;
        let pos = match to {
            SeekFrom::Start(pos) => Some(pos),
            SeekFrom::End(delta) => len.checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        self.pos = pos.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl From<ArchiveError> for StreamError {
    fn from(e: ArchiveError) -> Self {
        match e {
            ArchiveError::Io(e) => StreamError::Io(e),
            rejected => not_streamable(rejected),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::os::unix::fs::PermissionsExt;

    use zip::write::SimpleFileOptions;

    use super::*;

    const LIMITS: UnpackLimits = UnpackLimits {
        max_bytes: 1 << 20,
        max_entries: 100,
    };

    /// A directory, an implied one, an executable, a deflated file and a symlink.
    fn mixed_zip() -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let stored = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        writer
            .add_directory("pkg/", stored.unix_permissions(0o755))
            .unwrap();
        writer
            .start_file("pkg/a.py", stored.unix_permissions(0o644))
            .unwrap();
        writer.write_all(b"A = 1\n").unwrap();
        writer
            .start_file("bin/run", stored.unix_permissions(0o755))
            .unwrap();
        writer.write_all(b"#!/bin/sh\n").unwrap();
        let deflated = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        writer.start_file("x/y/big.txt", deflated).unwrap();
        writer.write_all(&b"words ".repeat(10_000)).unwrap();
        writer.add_symlink("link", "pkg/a.py", stored).unwrap();
        writer.finish().unwrap().into_inner()
    }

    fn stream(bytes: &[u8], limits: UnpackLimits) -> (tempfile::TempDir, Result<Manifest, StreamError>) {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        let len = bytes.len() as u64;
        let result = unpack_stream(&mut Cursor::new(bytes), len, &dest, limits, &Progress::hidden());
        (dir, result)
    }

    fn not_streamable(result: Result<Manifest, StreamError>) -> String {
        match result {
            Err(StreamError::NotStreamable(why)) => why,
            other => panic!("expected NotStreamable, got {other:?}"),
        }
    }

    #[test]
    fn unpacks_the_tree_a_zip_read_from_a_file_unpacks() {
        let bytes = mixed_zip();
        let (dir, streamed) = stream(&bytes, LIMITS);
        let streamed = streamed.unwrap();
        let from_file = {
            std::fs::write(dir.path().join("a.zip"), &bytes).unwrap();
            let dest = dir.path().join("classic");
            std::fs::create_dir(&dest).unwrap();
            zip_read::unpack(&dir.path().join("a.zip"), &dest, LIMITS, 2, &Progress::hidden()).unwrap()
        };
        assert_eq!(streamed.entries(), from_file.entries());
        assert_eq!(streamed.digest(), from_file.digest());
        let out = dir.path().join("out");
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            Path::new("pkg/a.py")
        );
        let mode = |p: &str| {
            std::fs::symlink_metadata(out.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!((mode("bin/run"), mode("pkg/a.py")), (0o555, 0o444));
        assert_eq!(
            std::fs::read(out.join("x/y/big.txt")).unwrap(),
            b"words ".repeat(10_000)
        );
    }

    #[test]
    fn an_empty_zip_is_an_empty_tree() {
        let bytes = zip::ZipWriter::new(Cursor::new(Vec::new()))
            .finish()
            .unwrap()
            .into_inner();
        let (_dir, result) = stream(&bytes, LIMITS);
        assert_eq!(result.unwrap().file_count(), 0);
    }

    #[test]
    fn entries_whose_sizes_follow_their_data_are_left_to_the_file_reader() {
        let mut writer = zip::ZipWriter::new_stream(Vec::new());
        writer.start_file("a.txt", SimpleFileOptions::default()).unwrap();
        writer.write_all(b"streamed by its writer").unwrap();
        let bytes = writer.finish().unwrap().into_inner();
        let (_dir, result) = stream(&bytes, LIMITS);
        not_streamable(result);
    }

    #[test]
    fn a_directory_that_names_other_entries_than_the_local_headers_is_refused() {
        let mut bytes = mixed_zip();
        // The central directory's copy of a name (its last occurrence) says another.
        let at = bytes.windows(8).rposition(|w| w == b"pkg/a.py").unwrap();
        bytes[at] = b'q';
        let (_dir, result) = stream(&bytes, LIMITS);
        assert!(not_streamable(result).contains("disagree"));
    }

    #[test]
    fn a_symlink_out_of_the_tree_is_never_made() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .add_symlink("evil", "../outside", SimpleFileOptions::default())
            .unwrap();
        let bytes = writer.finish().unwrap().into_inner();
        let (dir, result) = stream(&bytes, LIMITS);
        assert!(not_streamable(result).contains("leaves the tree"));
        let evil = std::fs::symlink_metadata(dir.path().join("out/evil")).unwrap();
        assert!(!evil.file_type().is_symlink());
    }

    #[test]
    fn a_name_leaving_the_tree_is_refused_before_anything_is_written() {
        let mut bytes = mixed_zip();
        // `pkg/a.py` → `../a.py` in the local header (its first occurrence).
        let at = bytes.windows(8).position(|w| w == b"pkg/a.py").unwrap();
        bytes[at..at + 4].copy_from_slice(b"../a");
        let (dir, result) = stream(&bytes, LIMITS);
        assert!(not_streamable(result).contains("`..`"));
        assert!(!dir.path().join("a.py").exists());
    }

    /// Yields `bytes`, then fails as a download that broke off does.
    struct BreaksOff<'a>(&'a [u8]);

    impl Read for BreaksOff<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "broke off"));
            }
            let n = self.0.len().min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_input_that_breaks_off_is_an_input_error() {
        let bytes = mixed_zip();
        let dir = tempfile::tempdir().unwrap();
        let len = bytes.len() as u64;
        for cut in [10, bytes.len() / 2, bytes.len() - 10] {
            let dest = dir.path().join(cut.to_string());
            std::fs::create_dir(&dest).unwrap();
            match unpack_stream(
                &mut BreaksOff(&bytes[..cut]),
                len,
                &dest,
                LIMITS,
                &Progress::hidden(),
            ) {
                Err(StreamError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted),
                other => panic!("cut at {cut}: expected an input error, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_caps_hold_while_streaming() {
        let bytes = mixed_zip();
        let small = UnpackLimits {
            max_bytes: 1000,
            ..LIMITS
        };
        assert!(not_streamable(stream(&bytes, small).1).contains("limit of 1000 bytes"));
        let few = UnpackLimits {
            max_entries: 2,
            ..LIMITS
        };
        assert!(not_streamable(stream(&bytes, few).1).contains("limit of 2 entries"));
    }
}
