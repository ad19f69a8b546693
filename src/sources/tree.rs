//! A local directory: walked before the store is asked, with its stat cache, so an
//! unchanged tree costs the walk, a hash lookup and no copy.
//!
//! A tree with files the cache does not know is read once. Mostly known (an edit or two):
//! the rest are hashed, and the store asked by the digest, so a tree it holds is not
//! copied; a miss is copied into staging with every file re-hashed as it is copied (a file
//! edited meanwhile is an error). Mostly unknown (a new tree, or a new place for one):
//! hashed while it is copied into staging, named once copied, and the copy dropped if the
//! store holds that digest already (as a zip's unpacked tree is, `Store::commit_staged`).
//! Reading a new tree twice, to hash and then to copy, was most of its cost.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;

use super::{SourceError, during};
use crate::package::scan::WalkedTree;
use crate::package::{self, ScannedTree};
use crate::progress::Progress;
use crate::store::{Begin, Commit, Contents, PackageEntry, Store};

pub fn ensure(store: &Store, tree: &WalkedTree, progress: &Progress) -> Result<PackageEntry, SourceError> {
    let threads = store.options().threads;
    let root = tree.root.display().to_string();
    // Hashing first costs a read of the unknown files on a miss and saves a copy on a hit.
    // Up to half the tree, that is the better bet (a copy costs more than a read).
    if tree.unhashed() * 2 <= tree.files() {
        let start = Instant::now();
        let scanned = tree
            .hash(threads, progress)
            .map_err(|e| during("hashing", &root)(e.into()))?;
        let hashed_ms = start.elapsed().as_millis() as u64;
        let mut entry = ensure_scanned(store, &scanned, progress)?;
        if tree.unhashed() > 0 {
            entry.timings_ms.insert("hash", hashed_ms);
        }
        return Ok(entry);
    }

    let start = Instant::now();
    let staging = store.stage()?;
    let copy = || -> Result<ScannedTree, SourceError> {
        fs_err::create_dir(staging.entry_dir())?;
        Ok(package::tree::copy_walked(
            tree,
            &staging.entry_dir(),
            threads,
            progress,
        )?)
    };
    let scanned = copy().map_err(during("copying", &root))?;
    let digest = scanned.manifest.digest();
    let commit = Commit {
        contents: Contents::Manifest(&scanned.manifest),
        source: source(&scanned),
        description: Value::Null,
        timings_ms: BTreeMap::from([("copy", start.elapsed().as_millis() as u64)]),
    };
    // A tree the store holds already (or that another build committed meanwhile): the
    // committed entry wins, the copy goes with the staging dir.
    store
        .commit_staged(staging, digest, commit, progress)
        .map_err(|e| during("publishing", &format!("pkg://{digest}"))(e.into()))
}

/// A tree whose digest is known: the committed entry, or a copy checked against it.
pub fn ensure_scanned(
    store: &Store,
    tree: &ScannedTree,
    progress: &Progress,
) -> Result<PackageEntry, SourceError> {
    let digest = tree.manifest.digest();
    let tx = match store.begin(digest)? {
        Begin::Committed(hit) => return Ok(hit),
        Begin::Build(tx) => tx,
    };
    let start = Instant::now();
    let copy = || -> Result<(), SourceError> {
        fs_err::create_dir(tx.entry_dir())?;
        package::tree::copy_into(tree, &tx.entry_dir(), store.options().threads, progress)?;
        Ok(())
    };
    copy().map_err(during("copying", &tree.root.display().to_string()))?;
    let commit = Commit {
        contents: Contents::Manifest(&tree.manifest),
        source: source(tree),
        description: Value::Null,
        timings_ms: BTreeMap::from([("copy", start.elapsed().as_millis() as u64)]),
    };
    tx.commit(commit, progress)
        .map_err(|e| during("publishing", &format!("pkg://{digest}"))(e.into()))
}

fn source(tree: &ScannedTree) -> Value {
    Value::String(format!("dir:{}", tree.root.display()))
}
