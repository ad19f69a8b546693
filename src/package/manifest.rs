//! The canonical manifest of a working_dir tree and the digest that names it.
//!
//! Encoding (version 1), hashed with blake3:
//!
//! ```text
//! "renv-manifest-v1\n"
//! for each entry, sorted by relative path bytes:
//!     kind ('d' | 'f' | 'l')  exec ('x' | '-')  content digest (64 hex)  path  '\0'
//! ```
//!
//! The content digest is blake3 of the file's bytes, of a symlink's target, and all zeros
//! for a directory. Paths are relative, `/`-separated UTF-8 and cannot contain NUL, so the
//! encoding is unambiguous. Nothing else — mtime, owner, walk order, the directory's own
//! location — goes in, so the same tree has the same digest wherever and however it is read.

use crate::digest::{Digest, PackageDigest};

const MANIFEST_HEADER: &[u8] = b"renv-manifest-v1\n";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        executable: bool,
        size: u64,
        content: Digest,
    },
    Symlink {
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Relative, `/`-separated path inside the tree.
    pub path: String,
    pub kind: EntryKind,
}

/// The sorted list of entries in a tree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Builds a manifest from entries in any order.
    pub fn new(mut entries: Vec<ManifestEntry>) -> Self {
        entries.sort_unstable_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        Manifest { entries }
    }

    /// Entries sorted by path: a directory always comes before what it contains.
    pub fn entries(&self) -> &[ManifestEntry] {
        &self.entries
    }

    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. }))
            .count()
    }

    /// Total bytes of regular file content.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                EntryKind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    pub fn digest(&self) -> PackageDigest {
        let mut hasher = blake3::Hasher::new();
        hasher.update(MANIFEST_HEADER);
        for entry in &self.entries {
            let (kind, exec, content) = match &entry.kind {
                EntryKind::Dir => (b'd', b'-', Digest::from(blake3::Hash::from_bytes([0; 32]))),
                EntryKind::File {
                    executable, content, ..
                } => (b'f', if *executable { b'x' } else { b'-' }, *content),
                EntryKind::Symlink { target } => (b'l', b'-', Digest::of(target.as_bytes())),
            };
            hasher.update(&[kind, exec]);
            hasher.update(content.hex().as_ref().as_bytes());
            hasher.update(entry.path.as_bytes());
            hasher.update(b"\0");
        }
        PackageDigest(hasher.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(path: &str, content: &[u8], executable: bool) -> ManifestEntry {
        ManifestEntry {
            path: path.into(),
            kind: EntryKind::File {
                executable,
                size: content.len() as u64,
                content: Digest::of(content),
            },
        }
    }

    #[test]
    fn digest_changes_with_name_content_and_exec_bit() {
        let base = Manifest::new(vec![file("a.py", b"x", false)]).digest();
        assert_ne!(base, Manifest::new(vec![file("b.py", b"x", false)]).digest());
        assert_ne!(base, Manifest::new(vec![file("a.py", b"y", false)]).digest());
        assert_ne!(base, Manifest::new(vec![file("a.py", b"x", true)]).digest());
        let link = ManifestEntry {
            path: "a.py".into(),
            kind: EntryKind::Symlink { target: "x".into() },
        };
        assert_ne!(base, Manifest::new(vec![link]).digest());
    }

    proptest! {
        /// The digest depends on the set of entries, never on the order they were found in.
        #[test]
        fn digest_is_independent_of_entry_order(
            names in prop::collection::btree_set("[a-z]{1,3}(/[a-z]{1,3}){0,2}", 1..20),
            seed in any::<u64>(),
        ) {
            let entries: Vec<_> = names.iter().map(|n| file(n, n.as_bytes(), n.len() % 2 == 0)).collect();
            let mut shuffled = entries.clone();
            let len = shuffled.len();
            for i in (1..len).rev() {
                shuffled.swap(i, (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(Manifest::new(entries).digest(), Manifest::new(shuffled).digest());
        }
    }
}
