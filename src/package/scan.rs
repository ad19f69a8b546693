//! Walking a local working_dir into a [`Manifest`], with Ray's exclude semantics.
//!
//! Excludes are gitignore patterns relative to the root; every directory's `.gitignore`
//! applies to its subtree; [`DEFAULT_EXCLUDES`] come first so a user's `!venv` can undo
//! one. Nothing above the root is consulted (no parent `.gitignore`, no global excludes),
//! so a tree packages the same wherever it lives. The walk only lstat()s; files are opened
//! by the hashing threads with `O_NOFOLLOW | O_NONBLOCK`, so a FIFO swapped in after the
//! walk is reported, never blocked on.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ignore::WalkBuilder;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

use super::hash_cache::HashCache;
use super::manifest::{EntryKind, Manifest, ManifestEntry};
use super::{DEFAULT_EXCLUDES, PackageError, copy_hashing, parallel_map, symlink};
use crate::digest::Digest;
use crate::progress::Progress;

/// A walked and hashed local tree: its manifest, and where each entry was read from.
#[derive(Debug, Clone)]
pub struct ScannedTree {
    pub root: PathBuf,
    pub manifest: Manifest,
    /// The directory every entry is nested under in the package (see [`Self::nested`]).
    nested: Option<String>,
}

impl ScannedTree {
    pub fn source_path(&self, entry: &ManifestEntry) -> PathBuf {
        let path = match &self.nested {
            Some(name) if entry.path == *name => "",
            Some(name) => entry
                .path
                .strip_prefix(name.as_str())
                .and_then(|p| p.strip_prefix('/'))
                .expect("every entry of a nested tree is under its name"),
            None => &entry.path,
        };
        self.root.join(path)
    }

    /// The same tree as a package holding it under its own directory's name, as Ray
    /// packages a `py_modules` directory: unpacked onto `PYTHONPATH`, `import <name>` works.
    pub fn nested(self) -> Result<ScannedTree, PackageError> {
        let name = self
            .root
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && *n != "..")
            .ok_or_else(|| PackageError::NotADirectory(self.root.clone()))?
            .to_string();
        let mut entries = vec![ManifestEntry {
            path: name.clone(),
            kind: crate::package::manifest::EntryKind::Dir,
        }];
        entries.extend(self.manifest.entries().iter().map(|e| ManifestEntry {
            path: format!("{name}/{}", e.path),
            kind: e.kind.clone(),
        }));
        Ok(ScannedTree {
            root: self.root,
            manifest: Manifest::new(entries),
            nested: Some(name),
        })
    }
}

enum Found {
    Dir,
    File,
    Symlink(String),
}

/// Walks `root` and hashes every file on `threads` threads.
///
/// With `cache_dir`, digests of files unchanged since an earlier scan of the same root are
/// reused (see [`HashCache`]) and the cache is updated.
pub fn scan_dir(
    root: &Path,
    excludes: &[String],
    threads: usize,
    cache_dir: Option<&Path>,
    progress: &Progress,
) -> Result<ScannedTree, PackageError> {
    scan(root, Some(excludes), threads, cache_dir, progress)
}

/// Every entry under `root`, no excludes and no `.gitignore`: how `renv verify` re-reads
/// a committed package to check it against its name.
pub fn scan_exact(root: &Path, threads: usize) -> Result<ScannedTree, PackageError> {
    scan(root, None, threads, None, &Progress::hidden())
}

fn scan(
    root: &Path,
    excludes: Option<&[String]>,
    threads: usize,
    cache_dir: Option<&Path>,
    progress: &Progress,
) -> Result<ScannedTree, PackageError> {
    let root = match fs_err::canonicalize(root) {
        Ok(root) => root,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PackageError::NotFound(root.to_path_buf()));
        }
        Err(e) => return Err(e.into()),
    };
    if !root.is_dir() {
        return Err(PackageError::NotADirectory(root));
    }
    let cache_path = cache_dir.map(|dir| HashCache::path_for(dir, &root));
    let cache = cache_path
        .as_deref()
        .map_or_else(HashCache::disabled, HashCache::load);
    let matcher = excludes
        .map(|excludes| exclude_matcher(&root, excludes))
        .transpose()?;
    let found = walk(&root, matcher)?;

    let phase = progress.phase(
        "hashing",
        found.iter().filter(|(_, f)| matches!(f, Found::File)).count() as u64,
    );
    let entries = parallel_map(found.len(), threads, |i| {
        let (path, kind) = &found[i];
        let kind = match kind {
            Found::Dir => EntryKind::Dir,
            Found::Symlink(target) => EntryKind::Symlink {
                target: target.clone(),
            },
            Found::File => {
                let (executable, size, content) = hash_file(&root.join(path), path, &cache)?;
                phase.inc(1);
                EntryKind::File {
                    executable,
                    size,
                    content,
                }
            }
        };
        Ok::<_, PackageError>(ManifestEntry {
            path: path.clone(),
            kind,
        })
    })?;
    phase.finish();
    if let Some(path) = cache_path {
        // Best effort: a cache that cannot be written only costs a re-hash next time.
        let _ = cache.save(&path);
    }
    Ok(ScannedTree {
        root,
        manifest: Manifest::new(entries),
        nested: None,
    })
}

fn exclude_matcher(root: &Path, excludes: &[String]) -> Result<Gitignore, PackageError> {
    let mut builder = GitignoreBuilder::new(root);
    for pattern in DEFAULT_EXCLUDES
        .iter()
        .copied()
        .chain(excludes.iter().map(String::as_str))
    {
        builder
            .add_line(None, pattern)
            .map_err(|e| PackageError::BadExclude {
                pattern: pattern.to_string(),
                reason: e.to_string(),
            })?;
    }
    builder.build().map_err(|e| PackageError::BadExclude {
        pattern: excludes.join(" "),
        reason: e.to_string(),
    })
}

/// With no matcher, every entry (and `.gitignore` files are just files).
fn walk(root: &Path, matcher: Option<Gitignore>) -> Result<Vec<(String, Found)>, PackageError> {
    let gitignore = matcher.is_some();
    let walker = WalkBuilder::new(root)
        .standard_filters(false)
        .git_ignore(gitignore)
        .require_git(false)
        .parents(false)
        .follow_links(false)
        .filter_entry(move |entry| {
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            entry.depth() == 0
                || matcher
                    .as_ref()
                    .is_none_or(|m| !m.matched(entry.path(), is_dir).is_ignore())
        })
        .build();

    let mut found = Vec::new();
    for entry in walker {
        let entry = entry.map_err(|source| PackageError::Walk {
            path: root.to_path_buf(),
            source,
        })?;
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .ok()
            .and_then(Path::to_str)
            .filter(|rel| !rel.contains('\\'))
            .ok_or_else(|| PackageError::BadName(path.to_path_buf()))?
            .to_string();
        let file_type = entry.file_type().expect("only stdin has no file type");
        let kind = if file_type.is_dir() {
            Found::Dir
        } else if file_type.is_file() {
            Found::File
        } else if file_type.is_symlink() {
            let target = fs_err::read_link(path)?;
            let target = target
                .to_str()
                .ok_or_else(|| PackageError::BadName(path.to_path_buf()))?
                .to_string();
            if !symlink::stays_inside(&rel, &target) {
                return Err(PackageError::SymlinkEscapes {
                    path: path.to_path_buf(),
                    target,
                });
            }
            Found::Symlink(target)
        } else {
            return Err(PackageError::SpecialFile {
                path: path.to_path_buf(),
                kind: special_kind(&file_type),
            });
        };
        found.push((rel, kind));
    }
    Ok(found)
}

pub(crate) fn special_kind(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device node"
    } else {
        "a special file"
    }
}

/// Opens a file that the walk saw as regular, refusing anything it has become since.
pub(crate) fn open_regular(path: &Path) -> Result<(File, std::fs::Metadata), PackageError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // ELOOP: it was a regular file during the walk and is a symlink now.
            Some(libc::ELOOP) => PackageError::Changed(path.to_path_buf()),
            _ => PackageError::Io(fs_err_io(path, e)),
        })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(PackageError::SpecialFile {
            path: path.to_path_buf(),
            kind: special_kind(&meta.file_type()),
        });
    }
    Ok((file, meta))
}

pub(crate) fn is_executable(meta: &std::fs::Metadata) -> bool {
    meta.mode() & 0o111 != 0
}

/// Hashes one file: (executable, size, digest), from the cache when it is unchanged,
/// else reading it in 256 KiB chunks.
fn hash_file(path: &Path, rel: &str, cache: &HashCache) -> Result<(bool, u64, Digest), PackageError> {
    // A file the cache knows is looked up by its lstat, not opened: two syscalls and a
    // path walk less per file (half of packaging an unchanged tree of 10,000). Trusting
    // the stat is what the cache does anyway, and whatever reads the bytes later (the
    // store's copy, the zip writer) checks them against this digest.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_file()
        && let Some(digest) = cache.lookup(rel, &meta)
    {
        return Ok((is_executable(&meta), meta.len(), digest));
    }
    let (mut file, meta) = open_regular(path)?;
    if let Some(digest) = cache.lookup(rel, &meta) {
        return Ok((is_executable(&meta), meta.len(), digest));
    }
    let mut buf = vec![0u8; (meta.len() as usize + 1).clamp(4096, 256 << 10)];
    let (size, digest) = copy_hashing(&mut file, &mut std::io::sink(), path, &mut buf)?;
    if size == meta.len() {
        cache.record(rel, &meta, digest);
    }
    Ok((is_executable(&meta), size, digest))
}

/// Attaches the path to an I/O error the way fs-err does.
pub(crate) fn fs_err_io(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{e} (while reading {})", path.display()))
}
