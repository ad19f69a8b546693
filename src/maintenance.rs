//! Whole-store maintenance, as `renv prune` / `renv verify` and the daemon's collector run
//! it: the store's own eviction and checks, plus what belongs to the layers above it (the
//! installer's wheel cache, what makes an env sound).

use serde::Serialize;

use crate::store::prune::PrunePolicy;
use crate::store::verify::VerifyReport;
use crate::store::{Store, StoreError};
use crate::venv;

/// What a prune did, as `renv prune --json` prints it.
#[derive(Debug, Serialize)]
pub struct PruneReport {
    #[serde(flatten)]
    pub store: crate::store::prune::PruneReport,
    /// What happened to the installer's wheel cache.
    pub uv_cache: String,
}

/// Evicts entries under `policy`, then prunes the uv cache if no build is using it; one
/// prune at a time.
pub fn prune(store: &Store, policy: &PrunePolicy) -> Result<PruneReport, StoreError> {
    let pruning = store.prune_lock()?;
    let report = store.prune(&pruning, policy)?;
    let uv_cache = if policy.dry_run {
        String::new()
    } else {
        venv::uv_cache::prune(store)
    };
    Ok(PruneReport {
        store: report,
        uv_cache,
    })
}

/// Re-checks every entry: packages against their digests, envs as `venv::verify` says.
pub fn verify(store: &Store, repair: bool) -> Result<VerifyReport, StoreError> {
    store.verify(repair, &venv::verify::env_problem)
}
