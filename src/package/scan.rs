//! Walking a local working_dir into a [`Manifest`], with Ray's exclude semantics.
//!
//! Excludes are gitignore patterns relative to the root; every directory's `.gitignore`
//! applies to its subtree; [`DEFAULT_EXCLUDES`] come first so a user's `!venv` can undo
//! one. Nothing above the root is consulted (no parent `.gitignore`, no global excludes),
//! so a tree packages the same wherever it lives.
//!
//! Two steps. [`walk_dir`] lists the tree on several threads (`ignore`'s parallel walker;
//! the entries are sorted afterwards, so the order threads found them in never shows) and
//! takes each file's digest from the stat cache where it can: the walk only lstat()s, and
//! only files the cache knows. An unchanged tree is done there. The files it leaves
//! unhashed are read once, by [`WalkedTree::hash`] or by the store's copy of the tree
//! (`package::tree::copy_walked`), on the hashing threads, opened with
//! `O_NOFOLLOW | O_NONBLOCK` so a FIFO swapped in after the walk is reported, never
//! blocked on.

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use ignore::{WalkBuilder, WalkState};

use super::hash_cache::{CacheEntry, HashCache, StatKey};
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
        let name = nested_name(&self.root)?;
        let manifest = nested_manifest(Some(&name), self.manifest.entries().to_vec());
        Ok(ScannedTree {
            root: self.root,
            manifest,
            nested: Some(name),
        })
    }
}

/// The name a tree is nested under: its directory's own.
fn nested_name(root: &Path) -> Result<String, PackageError> {
    Ok(root
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "..")
        .ok_or_else(|| PackageError::NotADirectory(root.to_path_buf()))?
        .to_string())
}

/// The manifest of `entries` (paths relative to the root), under `nested` if given.
fn nested_manifest(nested: Option<&str>, entries: Vec<ManifestEntry>) -> Manifest {
    let Some(name) = nested else {
        return Manifest::new(entries);
    };
    let mut all = Vec::with_capacity(entries.len() + 1);
    all.push(ManifestEntry {
        path: name.to_string(),
        kind: EntryKind::Dir,
    });
    all.extend(entries.into_iter().map(|e| ManifestEntry {
        path: format!("{name}/{}", e.path),
        kind: e.kind,
    }));
    Manifest::new(all)
}

/// A walked local tree: every entry, and each file's digest where the stat cache had it.
#[derive(Debug)]
pub struct WalkedTree {
    pub root: PathBuf,
    /// Sorted by path bytes, as a manifest is; paths relative to the root.
    entries: Vec<Walked>,
    nested: Option<String>,
    cache: HashCache,
    cache_path: Option<PathBuf>,
}

#[derive(Debug)]
pub(crate) struct Walked {
    pub path: String,
    pub kind: WalkedKind,
}

#[derive(Debug)]
pub(crate) enum WalkedKind {
    Dir,
    Symlink(String),
    /// A regular file when walked; `None` until something reads it.
    File(Option<KnownFile>),
}

/// Where a file's digest came from, which decides whether the stat cache keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The stat cache (kept as it is).
    Cached,
    /// Read now, the file unchanged meanwhile (cached unless it changed too recently).
    Read,
    /// Read now, but its size changed meanwhile (not cached).
    Unstable,
}

/// A file's digest, and the stat it holds for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KnownFile {
    pub executable: bool,
    pub size: u64,
    pub content: Digest,
    pub stat: StatKey,
}

impl WalkedTree {
    /// The same tree nested under its own name (see [`ScannedTree::nested`]).
    pub fn nested(self) -> Result<WalkedTree, PackageError> {
        Ok(WalkedTree {
            nested: Some(nested_name(&self.root)?),
            ..self
        })
    }

    /// How many regular files the tree has.
    pub fn files(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, WalkedKind::File(_)))
            .count()
    }

    /// How many of them the stat cache did not know: what reading the tree must hash.
    pub fn unhashed(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, WalkedKind::File(None)))
            .count()
    }

    pub(crate) fn entries(&self) -> &[Walked] {
        &self.entries
    }

    pub(crate) fn cache(&self) -> &HashCache {
        &self.cache
    }

    /// The path of an entry (relative to the root) in the package.
    pub(crate) fn package_path(&self, rel: &str) -> String {
        match &self.nested {
            Some(name) => format!("{name}/{rel}"),
            None => rel.to_string(),
        }
    }

    /// The directory every entry is nested under in the package, if any.
    pub(crate) fn nested_dir(&self) -> Option<&str> {
        self.nested.as_deref()
    }

    /// Hashes the files the walk left unhashed, on `threads` threads, and updates the
    /// stat cache.
    pub fn hash(&self, threads: usize, progress: &Progress) -> Result<ScannedTree, PackageError> {
        let phase = progress.phase("hashing", self.unhashed() as u64);
        let known = parallel_map(self.entries.len(), threads, |i| {
            let entry = &self.entries[i];
            let WalkedKind::File(known) = entry.kind else {
                return Ok(None);
            };
            if let Some(known) = known {
                return Ok(Some((known, Origin::Cached)));
            }
            let hashed = hash_file(&self.root.join(&entry.path), &entry.path, &self.cache)?;
            phase.inc(1);
            Ok::<_, PackageError>(Some(hashed))
        })?;
        phase.finish();
        Ok(self.finish(known))
    }

    /// The scanned tree, once every file has been read (`read[i]`: the i-th entry's
    /// digest and where it came from, `None` for anything but a file); saves the stat
    /// cache.
    pub(crate) fn finish(&self, read: Vec<Option<(KnownFile, Origin)>>) -> ScannedTree {
        let mut cached = Vec::with_capacity(read.len());
        let mut fresh = 0;
        let entries = self
            .entries
            .iter()
            .zip(read)
            .map(|(entry, read)| {
                let kind = match (&entry.kind, read) {
                    (WalkedKind::Dir, _) => EntryKind::Dir,
                    (WalkedKind::Symlink(target), _) => EntryKind::Symlink {
                        target: target.clone(),
                    },
                    (WalkedKind::File(_), Some((file, origin))) => {
                        let entry = match origin {
                            Origin::Cached => Some(CacheEntry {
                                rel: entry.path.clone(),
                                stat: file.stat,
                                digest: file.content,
                            }),
                            Origin::Read => self.cache.entry(&entry.path, &file.stat, file.content),
                            Origin::Unstable => None,
                        };
                        if let Some(entry) = entry {
                            fresh += (origin != Origin::Cached) as usize;
                            cached.push(entry);
                        }
                        EntryKind::File {
                            executable: file.executable,
                            size: file.size,
                            content: file.content,
                        }
                    }
                    (WalkedKind::File(_), None) => unreachable!("every file was read"),
                };
                ManifestEntry {
                    path: entry.path.clone(),
                    kind,
                }
            })
            .collect();
        if let Some(path) = &self.cache_path {
            // Best effort: a cache that cannot be written only costs a re-hash next time.
            let _ = self.cache.save(path, &cached, fresh);
        }
        ScannedTree {
            root: self.root.clone(),
            manifest: nested_manifest(self.nested.as_deref(), entries),
            nested: self.nested.clone(),
        }
    }
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
    walk_dir(root, excludes, threads, cache_dir)?.hash(threads, progress)
}

/// Walks `root` on `threads` threads, taking what digests it can from the stat cache in
/// `cache_dir`; the rest are read later (see the module docs).
pub fn walk_dir(
    root: &Path,
    excludes: &[String],
    threads: usize,
    cache_dir: Option<&Path>,
) -> Result<WalkedTree, PackageError> {
    walk_root(root, Some(excludes), threads, cache_dir)
}

/// Every entry under `root`, no excludes and no `.gitignore`: how `renv verify` re-reads
/// a committed package to check it against its name.
pub fn scan_exact(root: &Path, threads: usize) -> Result<ScannedTree, PackageError> {
    walk_root(root, None, threads, None)?.hash(threads, &Progress::hidden())
}

fn walk_root(
    root: &Path,
    excludes: Option<&[String]>,
    threads: usize,
    cache_dir: Option<&Path>,
) -> Result<WalkedTree, PackageError> {
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
    let entries = walk(&root, matcher, threads, &cache)?;
    Ok(WalkedTree {
        root,
        entries,
        nested: None,
        cache,
        cache_path,
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

/// With no matcher, every entry (and `.gitignore` files are just files). Of several bad
/// entries, the error of the first by path is returned, whichever thread met it first.
fn walk(
    root: &Path,
    matcher: Option<Gitignore>,
    threads: usize,
    cache: &HashCache,
) -> Result<Vec<Walked>, PackageError> {
    let gitignore = matcher.is_some();
    let walker = WalkBuilder::new(root)
        .standard_filters(false)
        .git_ignore(gitignore)
        .require_git(false)
        .parents(false)
        .follow_links(false)
        .threads(threads.max(1))
        .filter_entry(move |entry| {
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            entry.depth() == 0
                || matcher
                    .as_ref()
                    .is_none_or(|m| !m.matched(entry.path(), is_dir).is_ignore())
        })
        .build_parallel();

    /// What the walk found: entries, and errors keyed by path.
    #[derive(Default)]
    struct Found {
        entries: Vec<Walked>,
        errors: Vec<(String, PackageError)>,
    }
    /// One walking thread's finds, handed over when the walk drops its visitor.
    struct Batch<'a> {
        found: Found,
        into: &'a Mutex<Found>,
    }
    impl Drop for Batch<'_> {
        fn drop(&mut self) {
            let mut all = self.into.lock().unwrap();
            all.entries.append(&mut self.found.entries);
            all.errors.append(&mut self.found.errors);
        }
    }
    let all = Mutex::new(Found::default());
    walker.run(|| {
        let mut batch = Batch {
            found: Found::default(),
            into: &all,
        };
        Box::new(move |entry| {
            let found = &mut batch.found;
            let entry = match entry {
                Ok(entry) => entry,
                Err(source) => {
                    let error = PackageError::Walk {
                        path: root.to_path_buf(),
                        source,
                    };
                    found.errors.push((error.to_string(), error));
                    return WalkState::Continue;
                }
            };
            if entry.depth() == 0 {
                return WalkState::Continue;
            }
            match visit(root, entry.path(), entry.file_type(), cache) {
                Ok(walked) => found.entries.push(walked),
                Err(e) => {
                    let path = entry.path().to_string_lossy().into_owned();
                    found.errors.push((path, e));
                }
            }
            WalkState::Continue
        })
    });
    let Found { mut entries, errors } = all.into_inner().unwrap();
    if let Some((_, error)) = errors.into_iter().min_by(|a, b| a.0.cmp(&b.0)) {
        return Err(error);
    }
    entries.sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    Ok(entries)
}

/// One entry of the walk: what it is, and a file's digest if the stat cache has it.
fn visit(
    root: &Path,
    path: &Path,
    file_type: Option<std::fs::FileType>,
    cache: &HashCache,
) -> Result<Walked, PackageError> {
    let rel = path
        .strip_prefix(root)
        .ok()
        .and_then(Path::to_str)
        .filter(|rel| !rel.contains('\\'))
        .ok_or_else(|| PackageError::BadName(path.to_path_buf()))?
        .to_string();
    let file_type = file_type.expect("only stdin has no file type");
    let kind = if file_type.is_dir() {
        WalkedKind::Dir
    } else if file_type.is_file() {
        // Only a file the cache knows is stat'ed here; the others are read later anyway.
        // Trusting the stat is what the cache does, and whatever reads the bytes later
        // (the store's copy, the zip writer) checks them against this digest.
        let known = match cache.knows(&rel) {
            false => None,
            true => std::fs::symlink_metadata(path)
                .ok()
                .filter(|meta| meta.file_type().is_file())
                .and_then(|meta| {
                    Some(KnownFile {
                        content: cache.lookup(&rel, &meta)?,
                        executable: is_executable(&meta),
                        size: meta.len(),
                        stat: StatKey::of(&meta),
                    })
                }),
        };
        WalkedKind::File(known)
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
        WalkedKind::Symlink(target)
    } else {
        return Err(PackageError::SpecialFile {
            path: path.to_path_buf(),
            kind: special_kind(&file_type),
        });
    };
    Ok(Walked { path: rel, kind })
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

/// Hashes one file the walk found no digest for, reading it in 256 KiB chunks (unless
/// its open file's fstat is one the cache knows after all): its digest, and whence.
fn hash_file(path: &Path, rel: &str, cache: &HashCache) -> Result<(KnownFile, Origin), PackageError> {
    let (mut file, meta) = open_regular(path)?;
    let stat = StatKey::of(&meta);
    let known = |content, size| KnownFile {
        executable: is_executable(&meta),
        size,
        content,
        stat,
    };
    if let Some(digest) = cache.lookup(rel, &meta) {
        return Ok((known(digest, meta.len()), Origin::Cached));
    }
    let mut buf = vec![0u8; (meta.len() as usize + 1).clamp(4096, 256 << 10)];
    let (size, digest) = copy_hashing(&mut file, &mut std::io::sink(), path, &mut buf)?;
    // A file that grew or shrank while it was read is hashed, never cached.
    let origin = match size == meta.len() {
        true => Origin::Read,
        false => Origin::Unstable,
    };
    Ok((known(digest, size), origin))
}

/// Attaches the path to an I/O error the way fs-err does.
pub(crate) fn fs_err_io(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{e} (while reading {})", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// Nested and empty directories, an executable, symlinks to a file and to a directory,
    /// and enough files (203) for every walking thread to find some.
    pub(crate) fn mixed_tree(root: &Path) {
        let write = |rel: &str, body: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        };
        write("a.py", "print('a')\n");
        write("bin/run.sh", "#!/bin/sh\n");
        std::fs::set_permissions(root.join("bin/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        write("pkg/sub/deep/mod.py", "X = 1\n");
        std::os::unix::fs::symlink("sub/deep/mod.py", root.join("pkg/link.py")).unwrap();
        std::os::unix::fs::symlink("pkg", root.join("lib")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        for i in 0..10 {
            for j in 0..20 {
                write(&format!("d{i}/f{j}.txt"), &format!("{i}-{j}\n"));
            }
        }
    }

    /// What `renv package` printed for [`mixed_tree`] before the walk was parallel: the
    /// digest format, and so every stored name, is unchanged.
    pub(crate) const MIXED_TREE_DIGEST: &str =
        "3ea925a93203f90f67e23da9a70b3769ff79c59242d1574f3e8a15153d818d78";

    #[test]
    fn any_number_of_walking_threads_gives_the_same_manifest() {
        let dir = tempfile::tempdir().unwrap();
        mixed_tree(dir.path());
        let one = scan_dir(dir.path(), &[], 1, None, &Progress::hidden()).unwrap();
        assert_eq!(one.manifest.digest().to_string(), MIXED_TREE_DIGEST);
        for threads in [2, 3, 8] {
            let many = scan_dir(dir.path(), &[], threads, None, &Progress::hidden()).unwrap();
            assert_eq!(many.manifest, one.manifest, "{threads} threads");
        }
    }

    #[test]
    fn of_several_bad_entries_the_first_by_path_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        mixed_tree(dir.path());
        std::os::unix::fs::symlink("../../../out", dir.path().join("d3/escapes")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("d7/escapes")).unwrap();
        for threads in [1, 2, 8] {
            match walk_dir(dir.path(), &[], threads, None) {
                Err(PackageError::SymlinkEscapes { path, .. }) => {
                    assert!(path.ends_with("d3/escapes"), "{threads} threads: {path:?}")
                }
                other => panic!("{threads} threads: {other:?}"),
            }
        }
    }

    #[test]
    fn an_unchanged_tree_is_known_from_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let (root, cache) = (dir.path().join("t"), dir.path().join("cache"));
        std::fs::create_dir(&cache).unwrap();
        mixed_tree(&root);
        // Files younger than the racy margin are not cached; let them age.
        std::thread::sleep(crate::package::hash_cache::RACY_MARGIN + std::time::Duration::from_millis(100));
        let first = walk_dir(&root, &[], 2, Some(&cache)).unwrap();
        assert_eq!((first.files(), first.unhashed()), (203, 203));
        let scanned = first.hash(2, &Progress::hidden()).unwrap();

        let again = walk_dir(&root, &[], 2, Some(&cache)).unwrap();
        assert_eq!(again.unhashed(), 0, "every digest came from the cache");
        assert_eq!(
            again.hash(2, &Progress::hidden()).unwrap().manifest,
            scanned.manifest
        );

        std::fs::write(root.join("d4/f2.txt"), "edited\n").unwrap();
        let edited = walk_dir(&root, &[], 2, Some(&cache)).unwrap();
        assert_eq!(edited.unhashed(), 1);
        assert_ne!(
            edited.hash(2, &Progress::hidden()).unwrap().manifest,
            scanned.manifest
        );
    }
}
