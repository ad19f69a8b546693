//! `renv build`: spec → resolved parts → store entries → context.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::context::{Context, PackageRole};
use crate::digest::{Digest, EnvId};
use crate::error::Error;
use crate::progress::Progress;
use crate::remote::Remotes;
use crate::resolve::{self, ModuleSource};
use crate::spec::RuntimeEnvSpec;
use crate::store::{EntryId, EnvEntry, Lease, PackageEntry, Store};
use crate::venv::{self, VenvPolicy};

/// A package an env uses, and what it is to the worker.
#[derive(Debug, Clone)]
pub struct EnvPackage {
    pub role: PackageRole,
    pub entry: PackageEntry,
}

/// A built environment: its identity, the store entries it uses, and the worker context.
#[derive(Debug, Clone)]
pub struct BuiltEnv {
    pub env_id: EnvId,
    /// Packages in the order the worker sees them (the working_dir first).
    pub packages: Vec<EnvPackage>,
    pub venv: Option<EnvEntry>,
    /// The worker context, without what is per user (see [`Self::context_for`]).
    pub context: Context,
    /// Whether workers keep bytecode in their user's cache (a venv built without it).
    pub pycache: bool,
    /// The spec's `env_vars` (part of the env's identity).
    pub env_vars: BTreeMap<String, String>,
    /// [`Self::recipe`], made once (the daemon saves it with every reference).
    recipe: std::sync::OnceLock<String>,
    pub timings_ms: BTreeMap<String, u64>,
}

impl BuiltEnv {
    /// The context the workers of the user `uid` (primary group `gid`) run in: with that
    /// user's own bytecode cache, which no other user can write (a shared one would let
    /// one tenant plant bytecode, even the stdlib's, that another's workers load).
    pub fn context_for(&self, store: &Store, uid: u32, gid: u32) -> std::io::Result<Context> {
        Ok(match self.pycache {
            true => self.context.with_pycache(&store.pycache_for(uid, gid)?),
            false => self.context.clone(),
        })
    }

    /// Whether building it created any store entry (false: everything was there).
    pub fn created(&self) -> bool {
        self.packages.iter().any(|p| p.entry.created) || self.venv.as_ref().is_some_and(|e| e.created)
    }

    /// Bytes on disk: (packages, venv).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.packages.iter().map(|p| p.entry.bytes).sum(),
            self.venv.as_ref().map_or(0, |e| e.bytes),
        )
    }

    pub fn working_dir(&self) -> Option<&PackageEntry> {
        self.packages
            .iter()
            .find(|p| p.role == PackageRole::WorkingDir)
            .map(|p| &p.entry)
    }

    pub fn working_dir_path(&self) -> Option<&Path> {
        self.working_dir().map(|e| e.path.as_path())
    }

    /// Every store entry this env uses.
    pub fn entries(&self) -> impl Iterator<Item = EntryId> + '_ {
        let packages = self.packages.iter().map(|p| EntryId::from(p.entry.id));
        packages.chain(self.venv.iter().map(|e| EntryId::from(e.id)))
    }

    /// Leases every entry this env uses, so none can be deleted while they are held.
    /// Returns `None` if an entry vanished between the build and the lease (build again).
    pub fn lease(&self, store: &Store) -> Result<Option<Vec<Lease>>, Error> {
        let mut leases = Vec::new();
        for package in &self.packages {
            leases.push(store.lease(package.entry.id)?);
            if store.find(package.entry.id)?.is_none() {
                return Ok(None);
            }
        }
        if let Some(env) = &self.venv {
            leases.push(store.lease(env.id)?);
            if venv::find(store, env.id)?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(leases))
    }

    /// What finds this env again in the store without building anything (see
    /// [`Self::restore`]): its packages' digests and roles, its venv's key, its variables.
    pub fn recipe(&self) -> &str {
        self.recipe.get_or_init(|| self.make_recipe())
    }

    fn make_recipe(&self) -> String {
        let recipe = EnvRecipe {
            packages: self
                .packages
                .iter()
                .map(|p| (p.role, p.entry.id.to_string()))
                .collect(),
            venv: self.venv.as_ref().map(|e| e.id.to_string()),
            env_vars: self.env_vars.clone(),
            pycache: self.pycache,
        };
        serde_json::to_string(&recipe).expect("a recipe serializes")
    }

    /// The env a [`Self::recipe`] describes, from what the store holds: `Ok(None)` when an
    /// entry of it is gone. Nothing is built or fetched.
    pub fn restore(store: &Store, recipe: &str) -> Result<Option<BuiltEnv>, Error> {
        let recipe: EnvRecipe = serde_json::from_str(recipe)
            .map_err(|e| Error::Io(std::io::Error::other(format!("a saved env recipe: {e}"))))?;
        let bad = |what: &str| Error::Io(std::io::Error::other(format!("a saved env recipe: bad {what}")));
        let mut packages = Vec::new();
        for (role, digest) in &recipe.packages {
            let id: crate::digest::PackageDigest = digest.parse().map_err(|_| bad("package digest"))?;
            match store.find(id)? {
                Some(entry) => packages.push(EnvPackage { role: *role, entry }),
                None => return Ok(None),
            }
        }
        let venv = match &recipe.venv {
            Some(key) => match venv::find(store, key.parse().map_err(|_| bad("venv key"))?)? {
                Some(entry) => Some(entry),
                None => return Ok(None),
            },
            None => None,
        };
        let context_packages: Vec<(PackageRole, &Path)> = packages
            .iter()
            .map(|p| (p.role, p.entry.path.as_path()))
            .collect();
        let context = Context::new(
            &context_packages,
            venv.as_ref().map(|e| e.path.as_path()),
            &recipe.env_vars,
        );
        Ok(Some(BuiltEnv {
            env_id: env_id(&packages, venv.as_ref(), &recipe.env_vars),
            packages,
            venv,
            context,
            pycache: recipe.pycache,
            env_vars: recipe.env_vars,
            recipe: std::sync::OnceLock::new(),
            timings_ms: BTreeMap::new(),
        }))
    }

    /// Records a use of everything it holds (for hits served from memory).
    pub fn touch(&self, store: &Store) {
        for id in self.entries() {
            store.touch(id);
        }
    }
}

/// What [`BuiltEnv::recipe`] saves.
#[derive(Serialize, serde::Deserialize)]
struct EnvRecipe {
    packages: Vec<(PackageRole, String)>,
    venv: Option<String>,
    env_vars: BTreeMap<String, String>,
    pycache: bool,
}

/// Builds (or finds) everything `spec` needs. Relative paths in the spec are taken from
/// `base_dir`; `policy` is the node's configuration for virtualenvs; packages the store
/// lacks are fetched through `remotes`.
pub fn build_env(
    spec: &RuntimeEnvSpec,
    base_dir: &Path,
    store: &Store,
    policy: &VenvPolicy,
    remotes: &Remotes,
    progress: &Progress,
) -> Result<BuiltEnv, Error> {
    let total = Instant::now();
    let timeout = spec.config.setup_timeout_seconds.map(Duration::from_secs);
    let mut timings = BTreeMap::new();
    let mut record = |entry_timings: &BTreeMap<&'static str, u64>| {
        timings.extend(entry_timings.iter().map(|(k, v)| (k.to_string(), *v)));
    };

    // Requirements first: they fail fast, before any hashing or download.
    let packages = match &spec.packages {
        Some(packages) => resolve::resolve_packages(packages, base_dir)?,
        None => None,
    };
    if let Some(packages) = &packages {
        venv::check_policy(packages, policy)?;
    }

    let mut env_packages = Vec::new();
    let start = Instant::now();
    let hash_cache = store.layout().hash_cache_dir();
    let working_dir =
        resolve::resolve_working_dir(spec, base_dir, store.options().threads, Some(&hash_cache))?;
    if let Some(source) = working_dir {
        if let crate::sources::PackageSource::Tree(_) = source {
            record(&BTreeMap::from([("scan", start.elapsed().as_millis() as u64)]));
        }
        let entry = source
            .ensure(store, remotes, progress)
            .map_err(|source| Error::SourceOf {
                field: "working_dir".into(),
                source,
            })?;
        record(&entry.timings_ms);
        env_packages.push(EnvPackage {
            role: PackageRole::WorkingDir,
            entry,
        });
    }
    let py_modules = resolve::resolve_py_modules(spec, base_dir, store.options().threads, Some(&hash_cache))?;
    let mut wheels = Vec::new();
    for (i, module) in py_modules.into_iter().enumerate() {
        let field = || format!("py_modules[{i}]");
        match module {
            ModuleSource::Package(source) => {
                let entry = source
                    .ensure(store, remotes, progress)
                    .map_err(|source| Error::SourceOf {
                        field: field(),
                        source,
                    })?;
                record(&entry.timings_ms);
                env_packages.push(EnvPackage {
                    role: PackageRole::PyModule,
                    entry,
                });
            }
            ModuleSource::Wheel { source, file_name } => {
                let wheel = crate::sources::wheel::ensure(store, remotes, &source, &file_name, progress)
                    .map_err(|source| Error::SourceOf {
                        field: field(),
                        source,
                    })?;
                record(&wheel.entry.timings_ms);
                wheels.push(wheel);
            }
        }
    }

    // A wheel alone still needs an env to be installed into.
    let packages = match (packages, wheels.is_empty()) {
        (Some(packages), _) => Some(packages),
        (None, false) => Some(resolve::ResolvedPackages::none()),
        (None, true) => None,
    };
    let plan = match &packages {
        Some(packages) => {
            let start = Instant::now();
            let plan = venv::plan(packages, &wheels, policy, store, timeout)?;
            record(&BTreeMap::from([(
                "plan_env",
                start.elapsed().as_millis() as u64,
            )]));
            Some(plan)
        }
        None => None,
    };
    let venv = match &plan {
        None => None,
        Some(plan) => {
            let entry = venv::ensure(plan, store, timeout, progress)?;
            record(&entry.timings_ms);
            Some(entry)
        }
    };

    let env_id = env_id(&env_packages, venv.as_ref(), &spec.env_vars);
    // Bytecode of an env built without it goes to each user's own cache.
    let pycache = matches!((&venv, &plan), (Some(_), Some(plan)) if !plan.compile_bytecode);
    let context_packages: Vec<(PackageRole, &Path)> = env_packages
        .iter()
        .map(|p| (p.role, p.entry.path.as_path()))
        .collect();
    let context = Context::new(
        &context_packages,
        venv.as_ref().map(|e| e.path.as_path()),
        &spec.env_vars,
    );
    timings.insert("total".to_string(), total.elapsed().as_millis() as u64);
    Ok(BuiltEnv {
        env_id,
        packages: env_packages,
        venv,
        context,
        pycache,
        env_vars: spec.env_vars.clone(),
        recipe: std::sync::OnceLock::new(),
        timings_ms: timings,
    })
}

/// What an env id is the digest of: what the worker will see, not how the request spelled
/// it. A struct, so the encoding's field order is fixed; `version` changes with it.
#[derive(Serialize)]
struct EnvIdentity<'a> {
    version: u32,
    /// `[role, "pkg://<digest>"]`, in the order the worker sees them.
    packages: Vec<(PackageRole, String)>,
    venv: Option<String>,
    env_vars: &'a BTreeMap<String, String>,
}

fn env_id(packages: &[EnvPackage], venv: Option<&EnvEntry>, env_vars: &BTreeMap<String, String>) -> EnvId {
    let identity = EnvIdentity {
        version: 2,
        packages: packages
            .iter()
            .map(|p| (p.role, format!("pkg://{}", p.entry.id)))
            .collect(),
        venv: venv.map(|e| e.id.to_string()),
        env_vars,
    };
    EnvId(Digest::of(
        &serde_json::to_vec(&identity).expect("an env identity serializes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{EnvKey, PackageDigest};

    fn entry<Id>(id: Id) -> crate::store::Entry<Id> {
        crate::store::Entry {
            id,
            path: "/unused".into(),
            files: 0,
            bytes: 0,
            created: false,
            timings_ms: BTreeMap::new(),
        }
    }

    /// Pinned: an env id must not change unless its encoding's version does (a change
    /// here means every daemon's cached answers and the Ray plugin's URIs change).
    #[test]
    fn env_ids_are_pinned() {
        let package = EnvPackage {
            role: PackageRole::WorkingDir,
            entry: entry(PackageDigest(Digest::of(b"tree"))),
        };
        let venv = entry(EnvKey(Digest::of(b"venv")));
        let vars = BTreeMap::from([
            ("B".to_string(), "2".to_string()),
            ("A".to_string(), "1".to_string()),
        ]);
        let cases = [
            (
                env_id(&[], None, &BTreeMap::new()),
                "54f056245e3fe07624a8bd1aa64edf33c7015efb653d509fe8fcc864148aae0e",
            ),
            (
                env_id(std::slice::from_ref(&package), None, &BTreeMap::new()),
                "1b7b46cc602f155314cc3b080891b7330ca61bad4d7be78c1393b6e634c53ce2",
            ),
            (
                env_id(std::slice::from_ref(&package), Some(&venv), &vars),
                "25d147ef0be1906556feab9bdee3316e30411aa763bc8c1fd6f3fd3047cb8dd2",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got.to_string(), want);
        }
    }
}
