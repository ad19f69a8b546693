//! The one way an entry gets into the store: the caller builds, the store stores (uv's
//! `Cache::persist`, rustup's `Transaction`, containerd's commit).
//!
//! ```text
//! begin(id) ─┬─ Committed(entry)            marker and directory present: nothing to do
//!            └─ Build(transaction)          entry lock held, a fresh staging dir
//!                 │  caller fills entry_dir() (scratch space: work_dir())
//!                 ├─ commit(Commit) → entry  fsync, rename, read-only, marker last
//!                 └─ drop                    staging goes to trash, lock released
//! ```
//!
//! 1. Fast path: marker and directory both present → hit, no lock taken. Committed entries
//!    never change, so this read is safe.
//! 2. Take the entry's lock exclusively (with the store's deadline), then re-check: another
//!    process may have published while we waited.
//! 3. The caller fills `staging/<id>/entry` (same filesystem, so the final step is a rename).
//!    The staging dir's own lock is held for the whole build, so a sweep never takes it.
//! 4. Commit: clear leftovers (a directory without its marker is a crashed publish, and a
//!    committed entry the caller found unusable — `begin_checked` — is being replaced: the
//!    marker goes first, then the directory to trash), fdatasync the staged files (but
//!    those an earlier commit synced already, see `store::synced_inodes`) and fsync its
//!    directories, rename into place, fsync the parent, make the root read-only, then
//!    write the marker (tmp file, fsync, rename, fsync `meta/`). The marker is last: a
//!    directory without it is garbage, never served.
//!
//! A source that learns the entry's name only once it has filled the staging dir (a zip,
//! an upload: the digest of what it unpacked) calls [`Store::stage`] first and
//! [`Store::commit_staged`] after: the same steps 2 and 4, the committed entry winning if
//! one appeared meanwhile. Lock order: a source's own lock (a zip's), then the entry's.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::layout::{EntryId, EntryName, LockName};
use super::lock::{LockFile, LockMode};
use super::marker::{Marker, write_json_atomic};
use super::record;
use super::{Store, StoreError, fsync_dir, remove_tree, synced_inodes};
use crate::package::{self, Manifest};
use crate::progress::Progress;

/// Threads that fsync a staged tree. fsync waits on the disk, not the CPU, and concurrent
/// fsyncs share journal commits, so this is more than the core count.
const SYNC_THREADS: usize = 32;

/// A committed entry, and what ensuring it cost.
#[derive(Debug, Clone)]
pub struct Entry<Id> {
    pub id: Id,
    pub path: PathBuf,
    pub files: u64,
    pub bytes: u64,
    /// False when the entry was already there (nothing was built).
    pub created: bool,
    /// Milliseconds per step, for `renv build`'s report.
    pub timings_ms: BTreeMap<&'static str, u64>,
}

/// What [`Store::begin`] found.
pub enum Begin<'s, Id> {
    Committed(Entry<Id>),
    Build(Transaction<'s, Id>),
}

/// An entry being built: its lock is held, its staging dir is the caller's to fill.
pub struct Transaction<'s, Id> {
    store: &'s Store,
    id: Id,
    staging: Staging,
    _lock: LockFile,
}

/// How the store finds what it makes durable and read-only when committing.
pub enum Contents<'a> {
    /// The files its writer listed (a copied or unpacked tree, whose writer already gave
    /// every file and directory below the root its final mode).
    Manifest(&'a Manifest),
    /// Unknown (an installer's output): walked without following symlinks, and sealed
    /// here through descriptors opened with `O_NOFOLLOW` (a file the walk found sealed,
    /// synced and vouched for already is recorded as it was found): every file and directory made
    /// read-only (no write, setuid, setgid or sticky bit; a file the installer hardlinked
    /// from its cache is sealed there too, so no one can change it in either place) and
    /// owned by the store's owner. Files of `builder` (the build user an installer ran
    /// as) are taken over; anything owned by anyone else, or that is no regular file,
    /// directory or symlink, refuses the commit. What was sealed is recorded in the entry
    /// ([`super::record`]), with the content hash of every file not in `vouched` (paths
    /// relative to the entry whose content the committer can check another way).
    Walk {
        builder: Option<u32>,
        vouched: &'a HashSet<String>,
    },
}

/// What a caller hands over with its filled staging dir.
pub struct Commit<'a> {
    pub contents: Contents<'a>,
    /// For the marker: see [`Marker::source`] and [`Marker::description`].
    pub source: Value,
    pub description: Value,
    /// The caller's own steps (copy, unpack, install), reported with the store's.
    pub timings_ms: BTreeMap<&'static str, u64>,
}

impl Store {
    /// The committed entry `id`, if there is one (a use: its last-use time is refreshed).
    pub fn find<Id: EntryName>(&self, id: Id) -> Result<Option<Entry<Id>>, StoreError> {
        self.find_usable(id, |_| true)
    }

    /// [`Store::find`], for entries that can go stale outside the store: one that is not
    /// `usable` is absent (and its last use is not refreshed, so it can age out).
    pub fn find_usable<Id: EntryName>(
        &self,
        id: Id,
        usable: impl Fn(&Entry<Id>) -> bool,
    ) -> Result<Option<Entry<Id>>, StoreError> {
        let entry_id: EntryId = id.into();
        let Some(marker) = self.read_marker(entry_id)? else {
            return Ok(None);
        };
        let path = self.layout.entry_path(entry_id);
        if !path.is_dir() {
            return Ok(None);
        }
        let entry = Entry {
            id,
            path,
            files: marker.files,
            bytes: marker.bytes,
            created: false,
            timings_ms: BTreeMap::new(),
        };
        if !usable(&entry) {
            return Ok(None);
        }
        self.touch(entry_id);
        Ok(Some(entry))
    }

    /// Steps 1–3 of the protocol: the committed entry, or a transaction to build it in.
    pub fn begin<Id: EntryName>(&self, id: Id) -> Result<Begin<'_, Id>, StoreError> {
        self.begin_checked(id, |_| true)
    }

    /// [`Store::begin`], for entries that can go stale outside the store (an env whose
    /// base interpreter was removed): a committed entry that is not `usable` is rebuilt,
    /// and the commit replaces it.
    pub fn begin_checked<Id: EntryName>(
        &self,
        id: Id,
        usable: impl Fn(&Entry<Id>) -> bool,
    ) -> Result<Begin<'_, Id>, StoreError> {
        let find = || self.find_usable(id, &usable);
        if let Some(hit) = find()? {
            return Ok(Begin::Committed(hit));
        }
        let lock = self.lock_exclusive(LockName::Entry(id.into()))?;
        if let Some(hit) = find()? {
            return Ok(Begin::Committed(hit));
        }
        Ok(Begin::Build(Transaction {
            store: self,
            id,
            staging: self.stage()?,
            _lock: lock,
        }))
    }

    /// A staging dir for a source that learns its entry's name by filling it; publish
    /// it with [`Store::commit_staged`].
    pub fn stage(&self) -> Result<Staging, StoreError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let _creating = LockFile::acquire(
            &self.layout.lock_path(LockName::Staging),
            LockMode::Shared,
            self.options.lock_timeout,
        )?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = format!(
            "{}-{nanos:09}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let staging_dir = self.layout.staging_dir();
        let lock = LockFile::acquire(
            &staging_dir.join(format!("{id}.lock")),
            LockMode::Exclusive,
            Some(Duration::ZERO),
        )?;
        let dir = staging_dir.join(&id);
        fs_err::create_dir(&dir)?;
        Ok(Staging {
            dir,
            lock: Some(lock),
            trash: self.layout.trash_dir(),
        })
    }

    /// Publishes a filled staging dir as `id` (steps 1, 2 and 4). If `id` is committed
    /// already, or was meanwhile, that entry is returned and the staging dir dropped.
    pub fn commit_staged<Id: EntryName>(
        &self,
        staging: Staging,
        id: Id,
        commit: Commit<'_>,
        progress: &Progress,
    ) -> Result<Entry<Id>, StoreError> {
        // A committed entry may be leased for as long as its users run, and a new zip of
        // the same tree must not wait for them: while the lock is taken, the entry is
        // looked for again, so one committed meanwhile (by a concurrent source of the same
        // tree, whose users lease it at once) ends the wait.
        let lock_path = self.layout.lock_path(LockName::Entry(id.into()));
        let found = || self.find(id);
        let _lock = match super::lock::LockFile::acquire_unless(
            &lock_path,
            super::lock::LockMode::Exclusive,
            self.options.lock_timeout,
            found,
        )? {
            Ok(lock) => lock,
            Err(hit) => return Ok(hit),
        };
        match self.find(id)? {
            Some(hit) => Ok(hit),
            None => self.publish(staging, id, commit, progress),
        }
    }

    /// Step 4; the caller holds the entry's lock.
    fn publish<Id: EntryName>(
        &self,
        staging: Staging,
        id: Id,
        commit: Commit<'_>,
        progress: &Progress,
    ) -> Result<Entry<Id>, StoreError> {
        let entry_id: EntryId = id.into();
        let path = self.layout.entry_path(entry_id);
        let marker_path = self.layout.marker_path(entry_id);
        let mut timings = commit.timings_ms;
        // Marker first, as prune does: from then on nobody serves what was there.
        if marker_path.exists() {
            fs_err::remove_file(&marker_path)?;
        }
        if path.symlink_metadata().is_ok() {
            self.discard(&path, &entry_id.to_string())?;
        }

        let start = Instant::now();
        let staged = staging.entry_dir();
        let builder = match commit.contents {
            Contents::Walk { builder, .. } => builder,
            Contents::Manifest(_) => None,
        };
        let (files, bytes) = match commit.contents {
            Contents::Manifest(manifest) => {
                sync_manifest(&staged, manifest, progress)?;
                (manifest.file_count() as u64, manifest.content_bytes())
            }
            Contents::Walk { builder, vouched } => {
                // The entry itself must be a real directory: a walk would follow a symlink.
                if !fs_err::symlink_metadata(&staged)?.is_dir() {
                    return Err(
                        std::io::Error::other(format!("{}: not a directory", staged.display())).into(),
                    );
                }
                // Nothing to make durable on tmpfs: no inode keys to compute, no syncs.
                let durable = !crate::sys::is_volatile_fs(&staged);
                let walked = walk_tree(&staged, durable)?;
                let synced = self.layout.synced_inodes_path();
                let mut paths = sync_walked(&walked, builder, vouched, &synced, progress)?;
                for (rel, target) in &walked.symlinks {
                    paths.insert(
                        rel.clone(),
                        record::Recorded::Symlink {
                            target: target.clone(),
                        },
                    );
                }
                for dir in &walked.dirs {
                    paths.insert(
                        relative(&walked.root, dir),
                        record::Recorded::Dir {
                            mode: package::tree::DIR_MODE,
                        },
                    );
                }
                write_record(
                    &staged,
                    record::SealedRecord {
                        version: record::VERSION,
                        paths,
                    },
                )?;
                // The root is sealed once it is in place (moving a directory to another
                // parent rewrites its `..`, which needs it writable).
                fsync_dir(&staged)?;
                (walked.files.len() as u64, walked.bytes)
            }
        };
        timings.insert("sync", ms(start));

        let start = Instant::now();
        fs_err::rename(&staged, &path)?;
        fsync_dir(&self.layout.entries_dir(entry_id.kind))?;
        seal(&path, true, builder, FileWork::NONE)?;
        let marker = Marker::new(entry_id, bytes, files, commit.source, commit.description);
        write_json_atomic(&marker_path, &marker)?;
        drop(staging);
        timings.insert("publish", ms(start));
        Ok(Entry {
            id,
            path,
            files,
            bytes,
            created: true,
            timings_ms: timings,
        })
    }
}

impl<Id: EntryName> Transaction<'_, Id> {
    /// The directory that becomes the entry (not created: the caller makes it).
    pub fn entry_dir(&self) -> PathBuf {
        self.staging.entry_dir()
    }

    /// Scratch space beside it, discarded with the staging dir.
    pub fn work_dir(&self) -> &Path {
        self.staging.work_dir()
    }

    /// Makes the filled entry durable, read-only and visible (step 4).
    pub fn commit(self, commit: Commit<'_>, progress: &Progress) -> Result<Entry<Id>, StoreError> {
        let Transaction {
            store, id, staging, ..
        } = self;
        store.publish(staging, id, commit, progress)
    }
}

/// A staging directory owned (locked) by this process. Dropped without being committed,
/// it goes to trash.
pub struct Staging {
    dir: PathBuf,
    lock: Option<LockFile>,
    trash: PathBuf,
}

impl Staging {
    /// The directory that becomes the entry (not created: the caller makes it).
    pub fn entry_dir(&self) -> PathBuf {
        self.dir.join("entry")
    }

    /// Scratch space (an upload's zip, an installer's HOME and TMPDIR).
    pub fn work_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let name = self.dir.file_name().expect("staging dirs have names").to_owned();
        let target = self.trash.join(name);
        // What is left goes: scratch after a commit, the whole build without one.
        if std::fs::rename(&self.dir, &target).is_ok() {
            let _ = remove_tree(&target);
        }
        if let Some(lock) = self.lock.take() {
            let _ = lock.remove();
        }
    }
}

pub(super) fn ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

/// Makes a staged tree durable before it is published: fdatasync every file (writeback
/// was started as each was written, so this mostly waits for I/O already under way) and
/// fsync every directory, in parallel. Per-file rather than `syncfs`, so the cost is our
/// own data, never whatever else is dirty on a busy node's filesystem.
fn sync_manifest(root: &Path, manifest: &Manifest, progress: &Progress) -> std::io::Result<()> {
    if crate::sys::is_volatile_fs(root) {
        // Nothing to make durable (a store on tmpfs): 3 syscalls a file saved.
        return Ok(());
    }
    let entries = manifest.entries();
    let phase = progress.phase("syncing", entries.len() as u64);
    package::parallel_map(entries.len(), SYNC_THREADS, |i| {
        let entry = &entries[i];
        phase.inc(1);
        match entry.kind {
            package::EntryKind::File { .. } => fs_err::File::open(root.join(&entry.path))?.sync_data(),
            package::EntryKind::Dir => fsync_dir(&root.join(&entry.path)),
            package::EntryKind::Symlink { .. } => Ok(()),
        }
    })?;
    phase.finish();
    fsync_dir(root)
}

struct Walked {
    root: PathBuf,
    /// Directories below the root (not the root), parents first.
    dirs: Vec<PathBuf>,
    files: Vec<WalkedFile>,
    /// Relative path and target.
    symlinks: Vec<(String, PathBuf)>,
    bytes: u64,
    /// On a filesystem where syncing makes anything durable (not tmpfs).
    durable: bool,
}

/// What [`seal`] does to a file beyond making it the store owner's and read-only.
#[derive(Clone, Copy)]
struct FileWork {
    /// Hash its content for the record (nothing else vouches for it).
    hash: bool,
    /// fdatasync it (its data may not be on disk yet).
    sync: bool,
}

impl FileWork {
    /// For a directory, or a file that only needs sealing.
    const NONE: FileWork = FileWork {
        hash: false,
        sync: false,
    };
}

/// A regular file of a walked tree.
struct WalkedFile {
    path: PathBuf,
    /// Relative to the root, `/`-separated.
    rel: String,
    /// What the walk's `lstat` saw.
    meta: std::fs::Metadata,
    /// Its [`shared_inode_key`], where the tree is durable.
    key: Option<u128>,
}

/// Makes the file or directory at `path` the store owner's and read-only, through a
/// descriptor that is never a symlink's target (see [`Contents::Walk`]), and does `work`
/// to a file. Returns what was sealed (nothing to undo: a refused commit is discarded
/// whole).
fn seal(
    path: &Path,
    is_dir: bool,
    builder: Option<u32>,
    work: FileWork,
) -> std::io::Result<record::Recorded> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if is_dir {
        flags |= libc::O_DIRECTORY;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let meta = file.metadata()?;
    let me = crate::sys::geteuid();
    refuse_foreign(path, &meta, me, builder)?;
    if meta.uid() != me {
        std::os::unix::fs::fchown(&file, Some(me), Some(crate::sys::getegid()))?;
    }
    let mode = meta.mode() & 0o7777;
    let sealed = sealed_mode(mode, is_dir);
    // After a chown the kernel has cleared setuid/setgid already; set the mode anyway.
    if mode != sealed || meta.uid() != me {
        file.set_permissions(std::fs::Permissions::from_mode(sealed))?;
    }
    if is_dir {
        if work.sync {
            file.sync_all()?;
        }
        return Ok(record::Recorded::Dir { mode: sealed });
    }
    if work.sync {
        file.sync_data()?;
    }
    let blake3 = match work.hash {
        false => None,
        true => {
            let mut hasher = blake3::Hasher::new();
            std::io::copy(&mut &file, &mut hasher)?;
            Some(crate::digest::Digest::from(hasher.finalize()).to_string())
        }
    };
    Ok(record::Recorded::File {
        mode: sealed,
        size: meta.len(),
        blake3,
    })
}

/// The mode a file or directory of mode `mode` is sealed to: read-only, no setuid, setgid
/// or sticky bit.
fn sealed_mode(mode: u32, is_dir: bool) -> u32 {
    if is_dir {
        package::tree::DIR_MODE
    } else {
        mode & 0o555
    }
}

/// Refuses what a build's output must not hold: anything of a third user's, and a file of
/// the store's owner that others may write.
fn refuse_foreign(
    path: &Path,
    meta: &std::fs::Metadata,
    me: u32,
    builder: Option<u32>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    // The store owner's own files in a build user's output are renv's (a record, a
    // relocated script), never writable by others; one that is was linked in from
    // elsewhere, and sealing would change it there.
    if builder.is_some() && meta.uid() == me && meta.mode() & 0o022 != 0 && !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{}: a file of the store's owner writable by others in a build's output; refusing to store it",
            path.display()
        )));
    }
    if meta.uid() != me && Some(meta.uid()) != builder {
        return Err(std::io::Error::other(format!(
            "{}: owned by uid {}, neither the store's owner nor the build user; refusing to store it",
            path.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// `path` relative to `root`, `/`-separated.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .expect("walked below the root")
        .to_string_lossy()
        .into_owned()
}

/// Writes the entry's record at its root: a new file, never through a name the builder
/// left (the walk refused one already there).
fn write_record(staged: &Path, record: record::SealedRecord) -> std::io::Result<()> {
    let mut file = package::tree::create_file(staged, record::FILE_NAME, false)?;
    std::io::Write::write_all(
        &mut file,
        &serde_json::to_vec(&record).map_err(std::io::Error::other)?,
    )?;
    file.sync_data()
}

/// Lists a freshly built tree without following symlinks, a level at a time, each
/// level's directories read on the cores.
fn walk_tree(root: &Path, durable: bool) -> std::io::Result<Walked> {
    let mut walked = Walked {
        root: root.to_path_buf(),
        dirs: Vec::new(),
        files: Vec::new(),
        symlinks: Vec::new(),
        bytes: 0,
        durable,
    };
    let mut level = vec![root.to_path_buf()];
    while !level.is_empty() {
        let listed = package::parallel_map(level.len(), package::worker_threads(), |i| {
            list_dir(root, &level[i], durable)
        })?;
        level = Vec::new();
        for listing in listed {
            walked.bytes += listing.files.iter().map(|file| file.meta.len()).sum::<u64>();
            walked.files.extend(listing.files);
            walked.symlinks.extend(listing.symlinks);
            walked.dirs.extend(listing.dirs.iter().cloned());
            level.extend(listing.dirs);
        }
    }
    walked.dirs.sort();
    Ok(walked)
}

/// What [`list_dir`] found in one directory.
#[derive(Default)]
struct Listing {
    dirs: Vec<PathBuf>,
    files: Vec<WalkedFile>,
    symlinks: Vec<(String, PathBuf)>,
}

fn list_dir(root: &Path, dir: &Path, durable: bool) -> std::io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in fs_err::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let at_record = dir == root && entry.file_name() == record::FILE_NAME;
        if kind.is_dir() {
            listing.dirs.push(entry.path());
        } else if kind.is_file() {
            if at_record {
                return Err(std::io::Error::other(format!(
                    "{}: the build left a file of the store's name; refusing it",
                    entry.path().display()
                )));
            }
            let path = entry.path();
            let meta = entry.metadata()?;
            listing.files.push(WalkedFile {
                rel: relative(root, &path),
                key: durable.then(|| shared_inode_key(&meta)).flatten(),
                path,
                meta,
            });
        } else if kind.is_symlink() {
            if at_record {
                return Err(std::io::Error::other(format!(
                    "{}: the build left a symlink at the store's name; refusing it",
                    entry.path().display()
                )));
            }
            let target = fs_err::read_link(entry.path())?;
            listing.symlinks.push((relative(root, &entry.path()), target));
        } else {
            return Err(std::io::Error::other(format!(
                "{}: not a regular file, directory or symlink; refusing to store it",
                entry.path().display()
            )));
        }
    }
    Ok(listing)
}

/// The [`synced_inodes`] key of a file shared with the installer's cache (more than one
/// link): only those are worth recording, since only those a later entry meets again.
fn shared_inode_key(meta: &std::fs::Metadata) -> Option<u128> {
    use std::os::unix::fs::MetadataExt;
    (meta.nlink() > 1).then(|| synced_inodes::key(meta)).flatten()
}

/// Seals every file of a walked tree and makes the tree durable (fdatasync every file
/// not already on disk, fsync every directory; nothing on tmpfs); returns what each file
/// was sealed as, its content hashed unless `vouched` for.
///
/// Most of an env built by uv is files hardlinked from its cache that an earlier commit
/// sealed and synced already (`synced`, see `store::synced_inodes`): those are recorded
/// from the walk's `lstat` without being opened. No one but the store's owner can change
/// the tree any more (a build user's output was reclaimed), so what the walk saw is what
/// is published.
fn sync_walked(
    walked: &Walked,
    builder: Option<u32>,
    vouched: &HashSet<String>,
    synced: &Path,
    progress: &Progress,
) -> std::io::Result<BTreeMap<String, record::Recorded>> {
    use std::os::unix::fs::MetadataExt;
    let durable = walked.durable;
    let me = crate::sys::geteuid();
    let phase = progress.phase("syncing", (walked.files.len() + walked.dirs.len()) as u64);
    let wanted: HashSet<u128> = walked.files.iter().filter_map(|file| file.key).collect();
    let known = synced_inodes::recorded(synced, &wanted);

    let mut sealed = BTreeMap::new();
    // What is left to open: a file with its path in the record, or a directory.
    let mut left: Vec<(&Path, Option<&String>, FileWork)> = Vec::new();
    let mut newly_synced = Vec::new();
    for WalkedFile { path, rel, meta, key } in &walked.files {
        refuse_foreign(path, meta, me, builder)?;
        let work = FileWork {
            hash: !vouched.contains(rel),
            sync: durable && !key.is_some_and(|key| known.contains(&key)),
        };
        let mode = meta.mode() & 0o7777;
        if meta.uid() == me && mode == sealed_mode(mode, false) && !work.hash && !work.sync {
            phase.inc(1);
            let recorded = record::Recorded::File {
                mode,
                size: meta.len(),
                blake3: None,
            };
            sealed.insert(rel.clone(), recorded);
            continue;
        }
        if work.sync {
            newly_synced.extend(*key);
        }
        left.push((path, Some(rel), work));
    }
    // Directories in any order: sealed, one still lets its owner open what is in it.
    let dir_work = FileWork {
        hash: false,
        sync: durable,
    };
    left.extend(walked.dirs.iter().map(|dir| (dir.as_path(), None, dir_work)));
    // The rest wait on the disk more than on the cores.
    let threads = if durable {
        SYNC_THREADS
    } else {
        package::worker_threads()
    };
    let done = package::parallel_map(left.len(), threads, |i| {
        phase.inc(1);
        let (path, rel, work) = left[i];
        let recorded = seal(path, rel.is_none(), builder, work)?;
        Ok::<_, std::io::Error>(rel.map(|rel| (rel.clone(), recorded)))
    })?;
    sealed.extend(done.into_iter().flatten());
    // Sealing changed no key: a chmod moves neither the mtime nor the size.
    synced_inodes::record(synced, &newly_synced);
    phase.finish();
    Ok(sealed)
}
