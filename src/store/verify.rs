//! `renv verify`: re-checking committed entries after a crash or a disk scare.
//!
//! A package is re-read in full (no excludes) and must hash to its name. What makes an
//! env sound is the installer's business, so the caller passes that check in (see
//! `venv::verify`). With `repair`, a damaged entry that nothing holds is removed the way
//! prune removes one, so the next request rebuilds it; an entry in use is reported only.

use serde::Serialize;

use super::layout::EntryKind;
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
        for entry in self.list_entries()? {
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
            let mut repaired = false;
            if repair && let Some(lock) = self.lock_unused(entry.entry)? {
                self.remove_locked(entry.entry, &lock)?;
                repaired = true;
            }
            report.problems.push(Finding {
                kind: entry.kind,
                id: entry.id,
                problem,
                repaired,
            });
        }
        Ok(report)
    }
}
