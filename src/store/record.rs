//! What a walked entry held when the store sealed it: written into the entry at commit
//! (`.renv-build.json` at its root, see [`super::Contents::Walk`]) from what the store saw
//! through the descriptors it sealed with, so a later check compares against what was
//! committed rather than against anything inside the entry that could be rewritten with it.
//!
//! Every path has its kind, its sealed mode, and its size or symlink target. A file's
//! content is hashed (blake3) unless the committer vouches for it another way (a venv's
//! files listed with a sha256 in a wheel's RECORD: hashing the bulk of an env at every
//! build would cost more than the install).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The record's name at the entry's root.
pub const FILE_NAME: &str = ".renv-build.json";

/// The encoding's version.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Recorded {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        size: u64,
        /// blake3 of the content, unless the committer vouched for it otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blake3: Option<String>,
    },
    Symlink {
        target: PathBuf,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SealedRecord {
    pub version: u32,
    /// Paths relative to the entry, `/`-separated.
    pub paths: BTreeMap<String, Recorded>,
}
