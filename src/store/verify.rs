//! `renv verify`: re-checking committed entries after a crash or a disk scare.
//!
//! A package is re-read in full (no excludes) and must hash to its name. What makes an
//! env sound is the installer's business, so the caller passes that check in (see
//! `venv::verify`). With `repair`, a damaged entry that nothing holds is removed the way
//! prune removes one, so the next request rebuilds it; an entry in use is reported only.

use serde::Serialize;

use super::layout::{EntryId, EntryKind};
use super::usage::EntryInfo;
use super::{Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: EntryKind,
    pub id: String,
    pub problem: String,
    /// Removed (`--repair`), so the next request rebuilds it.
    pub repaired: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub checked: usize,
    pub problems: Vec<Finding>,
}

impl Store {
    /// Re-checks every committed entry; `check_env` says what is wrong with an env, if
    /// anything.
    pub fn verify(
        &self,
        repair: bool,
        check_env: &dyn Fn(&EntryInfo) -> Option<String>,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        // One scan of /proc for the whole run: what a live process uses is never repaired.
        let roots = self.runtime_roots();
        // An entry whose marker is there but unreadable is never served (nor listed): a
        // problem, not a pass.
        for kind in EntryKind::ALL {
            for dir_entry in fs_err::read_dir(self.layout.entries_dir(kind))? {
                let name = dir_entry?.file_name();
                let Some(id) = name.to_str().and_then(|n| self.layout.entry_named(kind, n)) else {
                    continue;
                };
                if self.layout.marker_path(id).symlink_metadata().is_err() {
                    continue;
                }
                let problem = match self.read_marker(id) {
                    Ok(Some(_)) => continue,
                    Ok(None) => "its marker is not a valid marker of this entry".to_string(),
                    Err(e) => format!("its marker cannot be read: {e}"),
                };
                report.checked += 1;
                self.found(&mut report, id, problem, repair, &roots)?;
            }
        }
        for entry in self.list_entries_using(&roots)? {
            report.checked += 1;
            let problem = match entry.kind {
                EntryKind::Package => {
                    match crate::package::scan::scan_exact(&entry.path, self.options.threads) {
                        Ok(tree) if tree.manifest.digest().0 == entry.entry.digest => None,
                        Ok(tree) => Some(format!(
                            "contents hash to {}, not to its name",
                            tree.manifest.digest()
                        )),
                        Err(e) => Some(format!("cannot be read back: {e}")),
                    }
                }
                EntryKind::Env => check_env(&entry),
            };
            let Some(problem) = problem else { continue };
            self.found(&mut report, entry.entry, problem, repair, &roots)?;
        }
        Ok(report)
    }

    /// Reports `problem` of `id`, removing the entry first with `repair` unless it is in
    /// use.
    fn found(
        &self,
        report: &mut VerifyReport,
        id: EntryId,
        problem: String,
        repair: bool,
        roots: &super::roots::RuntimeRoots,
    ) -> Result<(), StoreError> {
        let mut repaired = false;
        // Never from under a process that runs from it, with a lease or without.
        if repair
            && roots.pids(id).is_empty()
            && let Some(lock) = self.lock_unused(id)?
        {
            self.remove_locked(id, lock)?;
            repaired = true;
        }
        report.problems.push(Finding {
            kind: id.kind,
            id: id.digest.to_string(),
            problem,
            repaired,
        });
        Ok(())
    }
}
