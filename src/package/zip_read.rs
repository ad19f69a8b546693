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
//! Files are created with [`create_file`] (`O_EXCL | O_NOFOLLOW`, renv's modes), so
//! setuid/setgid/world-write bits never reach the disk. The caller owns `dest` and
//! removes it on error, so a rejected archive leaves no trace.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use zip::ZipArchive;

use super::manifest::{EntryKind, Manifest, ManifestEntry};
use super::tree::{create_file, seal_dirs};
use super::{parallel_map, symlink};
use crate::digest::Digest;
use crate::progress::Progress;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const MAX_SYMLINK_TARGET: u64 = 4096;

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

fn reject(entry: Option<&str>, reason: impl Into<String>) -> ArchiveError {
    ArchiveError::Rejected {
        entry: entry.map(str::to_string),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Planned {
    Dir,
    File { executable: bool },
    Symlink,
}

/// Unpacks the zip at `zip_path` into the existing, empty directory `dest` and returns
/// the manifest of what was written.
pub fn unpack(
    zip_path: &Path,
    dest: &Path,
    limits: UnpackLimits,
    threads: usize,
    progress: &Progress,
) -> Result<Manifest, ArchiveError> {
    let open = || -> Result<ZipArchive<BufReader<std::fs::File>>, ArchiveError> {
        let file = fs_err::File::open(zip_path)?.into_parts().0;
        ZipArchive::new(BufReader::new(file)).map_err(|e| reject(None, format!("not a readable zip: {e}")))
    };
    let mut archive = open()?;
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
    let plan = plan(&mut archive, limits)?;

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
    let phase = progress.phase("unpacking", files.len() as u64);
    let chunks: Vec<&[(&String, usize, bool)]> = files
        .chunks(files.len().div_ceil(threads.max(1)).max(1))
        .collect();
    let digests = parallel_map(chunks.len(), chunks.len(), |c| {
        let mut archive = open()?;
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
            super::tree::start_writeback(&file);
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
/// directories that files imply, sorted by path.
fn plan<R: Read + std::io::Seek>(
    archive: &mut ZipArchive<R>,
    limits: UnpackLimits,
) -> Result<Vec<(String, Planned, Option<usize>)>, ArchiveError> {
    let mut explicit: HashMap<String, (Planned, Option<usize>)> = HashMap::with_capacity(archive.len());
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
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

fn check_name(name: &str, path: &str) -> Result<(), ArchiveError> {
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
