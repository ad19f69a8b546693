//! Whole-store maintenance, as `renv prune` / `renv verify` and the daemon's collector run
//! it: the store's own eviction and checks, plus what belongs to the layers above it (the
//! installer's wheel cache, what makes an env sound).

use crate::store::prune::{PrunePolicy, PruneReport};
use crate::store::verify::VerifyReport;
use crate::store::{Store, StoreError};
use crate::venv;

/// Evicts entries under `policy`, then prunes the uv cache if no build is using it.
pub fn prune(store: &Store, policy: &PrunePolicy) -> Result<PruneReport, StoreError> {
    let mut report = store.prune(policy)?;
    if !policy.dry_run {
        report.uv_cache = venv::uv_cache::prune(store);
    }
    Ok(report)
}

/// Re-checks every entry: packages against their digests, envs as `venv::verify` says.
pub fn verify(store: &Store, repair: bool) -> Result<VerifyReport, StoreError> {
    store.verify(repair, &venv::verify::env_problem)
}
