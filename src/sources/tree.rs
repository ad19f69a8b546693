//! A local directory: scanned (walked and hashed, with its stat cache) before the store is
//! asked, so an unchanged tree costs a hash lookup and no copy. A new one is copied into
//! staging, every file re-hashed as it is copied (a file edited meanwhile is an error).

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;

use super::{SourceError, during};
use crate::package::{self, ScannedTree};
use crate::progress::Progress;
use crate::store::{Begin, Commit, Contents, PackageEntry, Store};

pub fn ensure(store: &Store, tree: &ScannedTree, progress: &Progress) -> Result<PackageEntry, SourceError> {
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
        source: Value::String(format!("dir:{}", tree.root.display())),
        description: Value::Null,
        timings_ms: BTreeMap::from([("copy", start.elapsed().as_millis() as u64)]),
    };
    tx.commit(commit, progress)
        .map_err(|e| during("publishing", &format!("pkg://{digest}"))(e.into()))
}
