//! `renv build`: spec → resolved parts → store entries → context.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::context::Context;
use crate::digest::{Digest, EnvId};
use crate::error::Error;
use crate::progress::Progress;
use crate::resolve::{self, ResolvedWorkingDir};
use crate::spec::RuntimeEnvSpec;
use crate::store::{EnvEntry, Lease, PackageEntry, Store, StoreError};
use crate::venv::{self, Installer, VenvPolicy};

/// A built environment: its identity, the store entries it uses, and the worker context.
#[derive(Debug, Clone)]
pub struct BuiltEnv {
    pub env_id: EnvId,
    pub working_dir: Option<PackageEntry>,
    pub venv: Option<EnvEntry>,
    pub context: Context,
    pub timings_ms: BTreeMap<String, u64>,
}

impl BuiltEnv {
    /// Whether building it created any store entry (false: everything was there).
    pub fn created(&self) -> bool {
        self.working_dir.as_ref().is_some_and(|e| e.created) || self.venv.as_ref().is_some_and(|e| e.created)
    }

    /// Bytes on disk: (working_dir, venv).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.working_dir.as_ref().map_or(0, |e| e.bytes),
            self.venv.as_ref().map_or(0, |e| e.bytes),
        )
    }

    pub fn working_dir_path(&self) -> Option<&Path> {
        self.working_dir.as_ref().map(|e| e.path.as_path())
    }

    /// Leases every entry this env uses, so none can be deleted while they are held.
    /// Returns `None` if an entry vanished between the build and the lease (build again).
    pub fn lease(&self, store: &Store) -> Result<Option<Vec<Lease>>, Error> {
        let mut leases = Vec::new();
        if let Some(pkg) = &self.working_dir {
            leases.push(store.lease(&format!("pkg-{}", pkg.digest))?);
            if store.find_package(pkg.digest)?.is_none() {
                return Ok(None);
            }
        }
        if let Some(env) = &self.venv {
            leases.push(store.lease(&format!("env-{}", env.key))?);
            if store.find_env(env.key)?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(leases))
    }
}

/// Builds (or finds) everything `spec` needs. Relative paths in the spec are taken from
/// `base_dir`; `policy` is the node's configuration for virtualenvs.
pub fn build_env(
    spec: &RuntimeEnvSpec,
    base_dir: &Path,
    store: &Store,
    policy: &VenvPolicy,
    progress: &Progress,
) -> Result<BuiltEnv, Error> {
    let total = Instant::now();
    let timeout = spec.config.setup_timeout_seconds.map(Duration::from_secs);
    let mut timings = BTreeMap::new();

    // Requirements and node policy first: they fail fast, before any hashing.
    let packages = match &spec.packages {
        Some(packages) => resolve::resolve_packages(packages, base_dir)?,
        None => None,
    };
    let plan = match &packages {
        Some(packages) => {
            let start = Instant::now();
            let plan = venv::plan(packages, policy, store, timeout).map_err(Error::from)?;
            timings.insert("plan_env".to_string(), start.elapsed().as_millis() as u64);
            Some(plan)
        }
        None => None,
    };

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

    let venv = match &plan {
        None => None,
        Some(plan) => {
            let entry = store.ensure_env(plan.key, &plan.description, progress, |dirs| {
                venv::build(plan, &dirs.venv, &dirs.work, store, dirs.log.clone(), timeout)
                    .map_err(|e| StoreError::Venv(Box::new(e)))?;
                if let Installer::Pip { .. } = plan.installer {
                    venv::relocate_scripts(&dirs.venv, &dirs.final_path)?;
                }
                Ok(())
            });
            let entry = entry.map_err(|e| match e {
                StoreError::Venv(e) => Error::Venv(*e),
                other => other.into(),
            })?;
            timings.extend(entry.timings_ms.iter().map(|(k, v)| (k.to_string(), *v)));
            Some(entry)
        }
    };

    let env_id = env_id(working_dir.as_ref(), venv.as_ref(), &spec.env_vars);
    // Bytecode of an env built without it goes to the node's writable cache.
    let pycache = match (&venv, &plan) {
        (Some(_), Some(plan)) if !plan.compile_bytecode => Some(store.pycache_dir()?),
        _ => None,
    };
    let context = Context::new(
        working_dir.as_ref().map(|e| e.path.as_path()),
        venv.as_ref().map(|e| e.path.as_path()),
        pycache.as_deref(),
        &spec.env_vars,
    );
    timings.insert("total".to_string(), total.elapsed().as_millis() as u64);
    Ok(BuiltEnv {
        env_id,
        working_dir,
        venv,
        context,
        timings_ms: timings,
    })
}

/// A zip into the store; a rejected archive names the zip.
pub(crate) fn ensure_zip(store: &Store, path: &Path, progress: &Progress) -> Result<PackageEntry, Error> {
    store
        .ensure_package_from_zip(path, progress)
        .map_err(|e| match e {
            StoreError::Archive(source) => Error::Archive {
                path: path.to_path_buf(),
                source,
            },
            other => other.into(),
        })
}

/// The env's identity: what the worker will see, not how the request spelled it.
fn env_id(
    working_dir: Option<&PackageEntry>,
    venv: Option<&EnvEntry>,
    env_vars: &BTreeMap<String, String>,
) -> EnvId {
    let canonical = json!({
        "version": 1,
        "working_dir": working_dir.map(|e| format!("pkg://{}", e.digest)),
        "venv": venv.map(|e| e.key.to_string()),
        "env_vars": env_vars,
    });
    EnvId(Digest::of(canonical.to_string().as_bytes()))
}
