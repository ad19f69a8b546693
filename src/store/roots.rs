//! Runtime roots: entries that live processes use, whoever started them, found the way
//! Nix's garbage collector finds its runtime roots — by reading, for every process, its
//! executable, working directory, open files, mapped files, environment and command line
//! (`/proc/<pid>/{exe,cwd,fd/*,maps,environ,cmdline}`) for paths into the store.
//!
//! Leases protect what renv starts; this protects the rest (a Ray worker Ray started in
//! an env whose daemon reference died with the daemon, a shell someone left in a
//! working_dir). A process whose `/proc` the reader may not inspect (another user's, for
//! a prune not run as root) is not seen: run maintenance as the store's owner, root on a
//! shared node. A process that starts using an entry after the scan is not seen either;
//! the daemon's own users hold leases, which close that window for them.

use std::collections::{BTreeSet, HashMap};

use super::Store;
use super::layout::{EntryId, EntryKind};

/// Entries in use by live processes, with their pids.
#[derive(Debug, Default)]
pub struct RuntimeRoots {
    by_entry: HashMap<EntryId, BTreeSet<u32>>,
}

impl RuntimeRoots {
    /// Pids using `id` (empty if none was seen).
    pub fn pids(&self, id: EntryId) -> Vec<u32> {
        self.by_entry
            .get(&id)
            .map(|pids| pids.iter().copied().collect())
            .unwrap_or_default()
    }
}

impl Store {
    /// Scans `/proc` for processes using the store's entries (see the module doc).
    pub fn runtime_roots(&self) -> RuntimeRoots {
        let mut roots = RuntimeRoots::default();
        // Paths as processes may spell them: as configured, and resolved.
        let mut prefixes = vec![self.layout.root().to_path_buf()];
        if let Ok(real) = std::fs::canonicalize(self.layout.root())
            && real != prefixes[0]
        {
            prefixes.push(real);
        }
        let needles: Vec<(Vec<u8>, EntryKind)> = prefixes
            .iter()
            .flat_map(|root| {
                EntryKind::ALL.map(|kind| {
                    let dir = self.layout.entries_dir(kind);
                    let rel = dir.strip_prefix(self.layout.root()).unwrap_or(&dir).to_path_buf();
                    let mut needle = root.join(rel).into_os_string().into_encoded_bytes();
                    needle.push(b'/');
                    (needle, kind)
                })
            })
            .collect();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return roots;
        };
        let me = std::process::id();
        for proc in procs.filter_map(Result::ok) {
            let Some(pid) = proc.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let dir = proc.path();
            let mut texts: Vec<Vec<u8>> = Vec::new();
            for link in ["exe", "cwd"] {
                if let Ok(target) = std::fs::read_link(dir.join(link)) {
                    texts.push(target.into_os_string().into_encoded_bytes());
                }
            }
            if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
                for fd in fds.filter_map(Result::ok) {
                    if let Ok(target) = std::fs::read_link(fd.path()) {
                        texts.push(target.into_os_string().into_encoded_bytes());
                    }
                }
            }
            for file in ["maps", "environ", "cmdline"] {
                if let Ok(bytes) = std::fs::read(dir.join(file)) {
                    texts.push(bytes);
                }
            }
            for text in &texts {
                for (needle, kind) in &needles {
                    for id in entries_named_in(text, needle, *kind, &self.layout) {
                        roots.by_entry.entry(id).or_default().insert(pid);
                    }
                }
            }
        }
        roots
    }
}

/// Entries whose directory `text` names: `<needle><64 hex digits>` followed by the end of
/// the text or a byte that cannot continue a file name there (`/`, NUL, `:`, a newline…).
fn entries_named_in<'a>(
    text: &'a [u8],
    needle: &'a [u8],
    kind: EntryKind,
    layout: &'a super::layout::Layout,
) -> impl Iterator<Item = EntryId> + 'a {
    let mut from = 0;
    std::iter::from_fn(move || {
        while from + needle.len() <= text.len() {
            let at = text[from..]
                .windows(needle.len())
                .position(|w| w == needle)
                .map(|i| from + i)?;
            from = at + needle.len();
            let name = text.get(from..from + 64)?;
            let ends = text
                .get(from + 64)
                .is_none_or(|b| !(b.is_ascii_alphanumeric() || b"._-~".contains(b)));
            if ends
                && let Ok(name) = std::str::from_utf8(name)
                && let Some(id) = layout.entry_named(kind, name)
            {
                return Some(id);
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn entries_are_found_in_paths_environments_and_maps() {
        let layout = super::super::layout::Layout::new(Path::new("/s"));
        let digest = "ab".repeat(32);
        let needle = b"/s/store-v1/envs/".to_vec();
        let text = format!(
            "PATH=/s/store-v1/envs/{digest}/bin:/usr/bin\0X=/s/store-v1/envs/{digest}x\0Y=/s/store-v1/envs/short\0"
        );
        let found: Vec<_> = entries_named_in(text.as_bytes(), &needle, EntryKind::Env, &layout).collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].digest.to_string(), digest);
        let map = format!("7f00-7f01 r-xp 0 08:01 12 /s/store-v1/envs/{digest}/lib/x.so\n");
        assert_eq!(
            entries_named_in(map.as_bytes(), &needle, EntryKind::Env, &layout).count(),
            1
        );
    }
}
