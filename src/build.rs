//! `renv build`: spec → resolved parts → store entries → context.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde_json::json;

use crate::context::Context;
use crate::digest::{Digest, EnvId};
use crate::error::Error;
use crate::progress::Progress;
use crate::resolve::{self, ResolvedWorkingDir};
use crate::spec::RuntimeEnvSpec;
use crate::store::{PackageEntry, Store};

/// A built environment: its identity, the store entries it uses, and the worker context.
#[derive(Debug, Clone)]
pub struct BuiltEnv {
    pub env_id: EnvId,
    pub working_dir: Option<PackageEntry>,
    pub context: Context,
    pub timings_ms: BTreeMap<String, u64>,
}

impl BuiltEnv {
    pub fn working_dir_path(&self) -> Option<&Path> {
        self.working_dir.as_ref().map(|e| e.path.as_path())
    }
}

/// Builds (or finds) everything `spec` needs. Relative paths in the spec are taken from
/// `base_dir`.
pub fn build_env(
    spec: &RuntimeEnvSpec,
    base_dir: &Path,
    store: &Store,
    progress: &Progress,
) -> Result<BuiltEnv, Error> {
    let total = Instant::now();
    let mut timings = BTreeMap::new();

    // Fail before any expensive work.
    if let Some(packages) = &spec.packages
        && let Some(resolved) = resolve::resolve_packages(packages, base_dir)?
    {
        return Err(Error::NotBuiltYet {
            field: resolved.field.as_str(),
        });
    }

    let start = Instant::now();
    let cache_dir = store.hash_cache_dir();
    let working_dir = resolve::resolve_working_dir(
        spec,
        base_dir,
        store.options().threads,
        Some(&cache_dir),
        progress,
    )?;
    if let Some(ResolvedWorkingDir::Tree(_)) = working_dir {
        timings.insert("scan".to_string(), start.elapsed().as_millis() as u64);
    }
    let working_dir = match working_dir {
        None => None,
        Some(ResolvedWorkingDir::Tree(tree)) => Some(store.ensure_package_from_tree(&tree, progress)?),
        Some(ResolvedWorkingDir::Zip(path)) => Some(ensure_zip(store, &path, progress)?),
        Some(ResolvedWorkingDir::Package(digest)) => Some(store.lookup_package(digest)?),
    };
    if let Some(entry) = &working_dir {
        timings.extend(entry.timings_ms.iter().map(|(k, v)| (k.to_string(), *v)));
    }

    let env_id = env_id(working_dir.as_ref(), &spec.env_vars);
    let context = Context::new(
        working_dir.as_ref().map(|e| e.path.as_path()),
        None,
        &spec.env_vars,
    );
    timings.insert("total".to_string(), total.elapsed().as_millis() as u64);
    Ok(BuiltEnv {
        env_id,
        working_dir,
        context,
        timings_ms: timings,
    })
}

fn ensure_zip(store: &Store, path: &Path, progress: &Progress) -> Result<PackageEntry, Error> {
    store
        .ensure_package_from_zip(path, progress)
        .map_err(|e| match e {
            crate::store::StoreError::Archive(source) => Error::Archive {
                path: path.to_path_buf(),
                source,
            },
            other => other.into(),
        })
}

/// The env's identity: what the worker will see, not how the request spelled it.
fn env_id(working_dir: Option<&PackageEntry>, env_vars: &BTreeMap<String, String>) -> EnvId {
    let canonical = json!({
        "version": 1,
        "working_dir": working_dir.map(|e| format!("pkg://{}", e.digest)),
        "env_vars": env_vars,
        "packages": null,
    });
    EnvId(Digest::of(canonical.to_string().as_bytes()))
}
