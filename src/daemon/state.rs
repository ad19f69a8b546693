//! What the daemon knows about envs: which exist, their references and running workers,
//! and the counters behind `/metrics`. Nothing here knows about HTTP.
//!
//! Get-or-create is single-flight per canonical spec: the first request spawns the build
//! as its own task and every concurrent request for the same spec waits on a watch
//! channel for its result — failure included. A waiter that disconnects cancels only its
//! own wait, never the build. An env's entries stay leased while it has references or
//! running workers.
//!
//! This is the one place the daemon builds envs (`build_env`, `BuiltEnv::lease`,
//! `BuiltEnv::touch`); [`super::workers`] leases an env for a worker's own process and
//! [`super::packages`] holds the package upload's store calls.
//!
//! Errors are [`StateError`]: what went wrong, with the request field at fault where there
//! is one; the HTTP layer ([`super::error`]) turns them into statuses and kinds.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::journal::Journal;
use super::peer::Caller;
use crate::build::{BuiltEnv, build_env};
use crate::digest::EnvId;
use crate::progress::Progress;
use crate::remote::{AllowList, Remotes};
use crate::spec::{Origin, PackageList, PackageSpec, RuntimeEnvSpec};
use crate::store::state_db::{Change, SavedEnv, SavedRef};
use crate::store::{Lease, Store};
use crate::venv::VenvPolicy;

/// Why the daemon's state refused or failed a request. `field` names the request field
/// at fault; [`StateError::Build`] keeps renv's own error (spec, venv, store, archive),
/// shared, as one build's failure is every waiter's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("{message}")]
    BadRequest { field: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this here (what it asks for would need more than its uid).
    #[error("{0}")]
    Forbidden(String),
    /// Out of a resource for now (GPUs): retrying later may succeed.
    #[error("{message}")]
    Busy { field: &'static str, message: String },
    #[error("{0}")]
    TooLarge(String),
    /// An uploaded package is not a valid archive.
    #[error("{0}")]
    BadArchive(String),
    #[error("{0}")]
    Internal(String),
    /// The caller has too much in flight already.
    #[error("{0}")]
    TooMany(String),
    /// Remote storage the daemon depends on failed (the shared package store).
    #[error("{0}")]
    Upstream(String),
    /// Building, validating or storing failed in renv itself.
    #[error(transparent)]
    Build(Arc<crate::Error>),
}

impl StateError {
    pub fn bad_request(field: &'static str, message: impl Into<String>) -> Self {
        StateError::BadRequest {
            field,
            message: message.into(),
        }
    }
}

impl From<crate::Error> for StateError {
    fn from(e: crate::Error) -> Self {
        StateError::Build(Arc::new(e))
    }
}

/// A reference: its id in the state database, its owner and tag.
#[derive(Debug, Clone)]
pub struct Ref {
    id: i64,
    uid: u32,
    tag: Option<String>,
}

/// How often a cached answer looks at the disk for its env.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);

struct EnvRecord {
    built: Arc<BuiltEnv>,
    /// References, in the order they were taken.
    refs: Vec<Ref>,
    /// The owner uid of each running worker.
    workers: Vec<u32>,
    last_used: f64,
    /// Held while there are references or workers.
    leases: Option<Vec<Lease>>,
    /// When a cached answer last looked at the disk (see [`Daemon::cached`]).
    disk_checked: Option<Instant>,
}

impl EnvRecord {
    /// Whether `caller` may see this env: it holds a reference or runs a worker in it.
    fn visible_to(&self, caller: &Caller) -> bool {
        caller.admin || self.refs.iter().any(|r| r.uid == caller.uid) || self.workers.contains(&caller.uid)
    }
}

/// What holds an env: a reference (with its tag) or a running worker.
pub enum Hold {
    Reference(Option<String>),
    Worker,
}

/// References restored at start-up whose env lost an entry while the daemon was down:
/// reported (`GET /v1/envs`, `/metrics`, the log), never silently dropped. Building the
/// same env again gives them their env back; releasing them forgets them.
pub struct LostEnv {
    pub env_id: EnvId,
    pub refs: u64,
    pub ref_tags: Vec<String>,
}

/// One env as `GET /v1/envs` lists it, seen by one caller (its own references and
/// workers, or everyone's for the daemon's user and root).
pub struct EnvInfo {
    pub built: Arc<BuiltEnv>,
    pub refs: u64,
    pub ref_tags: Vec<String>,
    pub workers: u64,
    pub last_used: f64,
}

pub type BuildResult = Result<Arc<BuiltEnv>, StateError>;

#[derive(Default)]
pub struct Metrics {
    pub builds: AtomicU64,
    pub build_failures: AtomicU64,
    pub build_ms: AtomicU64,
    pub cache_hits: AtomicU64,
    pub requests: AtomicU64,
    pub workers_started: AtomicU64,
    /// Builds holding a slot, and builds waiting for one (`--max-concurrent-builds`).
    pub builds_running: AtomicU64,
    pub builds_waiting: AtomicU64,
}

pub struct Daemon {
    pub store: Arc<Store>,
    policy: VenvPolicy,
    /// Where packages this node lacks are fetched from (and uploads pushed to).
    pub remotes: Arc<Remotes>,
    /// Remote URIs requests may name (`--allow-remote`).
    allow_remote: AllowList,
    /// Builds one non-admin uid may have in flight at once (running or waiting for a slot).
    max_builds_per_uid: usize,
    /// Slots for builds running at once (`--max-concurrent-builds`), handed out in arrival
    /// order (tokio's semaphore is fair): 64 builds started together on two cores would
    /// each take as long as all of them, while queued they finish one after another.
    build_slots: tokio::sync::Semaphore,
    pub metrics: Metrics,
    /// Unix time the daemon started (for `renv_uptime_seconds`).
    pub started_at: f64,
    /// Wakes the garbage collector (after builds that created entries).
    pub gc_wakeup: tokio::sync::Notify,
    envs: Mutex<HashMap<EnvId, EnvRecord>>,
    /// References whose env was found incomplete at start-up (see [`LostEnv`]).
    lost: Mutex<HashMap<EnvId, Vec<Ref>>>,
    /// Where references and workers are saved before a request is answered.
    pub journal: Journal,
    builds: Mutex<Builds>,
    /// Canonical spec → the env it built, for the in-memory fast path.
    resolved: Mutex<HashMap<String, EnvId>>,
    /// Envs with no reference and no worker kept in memory (for the fast path); beyond
    /// this, the least recently used are forgotten (the store keeps their entries).
    max_idle_envs: usize,
}

/// How many builds may be in flight: per non-admin uid (`--max-builds-per-uid`, running
/// or waiting) and running at once in all (`--max-concurrent-builds`).
#[derive(Debug, Clone, Copy)]
pub struct BuildLimits {
    pub per_uid: usize,
    pub at_once: usize,
}

/// Builds in flight: by canonical key (requests for one spec share one), and how many each
/// non-admin uid started (`--max-builds-per-uid`: each holds a blocking thread, perhaps
/// a download from a slow server, so one caller must not hold them all).
#[derive(Default)]
struct Builds {
    running: HashMap<String, watch::Receiver<Option<BuildResult>>>,
    by_uid: HashMap<u32, usize>,
}

/// Entries of the fast path's request-text map beyond which it starts over (a cache:
/// many spellings of one spec must not grow memory without bound).
const MAX_RESOLVED: usize = 65_536;

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Daemon {
    pub fn new(
        store: Arc<Store>,
        policy: VenvPolicy,
        remotes: Arc<Remotes>,
        allow_remote: AllowList,
        max_idle_envs: usize,
        limits: BuildLimits,
        journal: Journal,
    ) -> Daemon {
        Daemon {
            journal,
            lost: Mutex::new(HashMap::new()),
            max_builds_per_uid: limits.per_uid,
            build_slots: tokio::sync::Semaphore::new(limits.at_once.max(1)),
            remotes,
            allow_remote,
            max_idle_envs,
            started_at: now(),
            gc_wakeup: tokio::sync::Notify::new(),
            store,
            policy,
            envs: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            builds: Mutex::new(Builds::default()),
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// Builds (or finds) the env for a request's `runtime_env`, sharing one build between
    /// concurrent identical requests.
    /// Returns the env and whether this request's build created any of its entries.
    pub async fn get_or_create(
        self: &Arc<Self>,
        runtime_env: &serde_json::value::RawValue,
        caller: &Caller,
    ) -> Result<(Arc<BuiltEnv>, bool), StateError> {
        // The request's exact text: a repeat skips parsing and validation altogether — but
        // not a request that may name a `file://` zip or a remote URI: who may name one is
        // checked on the parsed spec below, and the object can change under the same text
        // (it is looked at again every time: a zip's hash is cached by its stat, a remote
        // object's by its revision). (A JSON string can spell `file:` or `://` only
        // literally or with a `\` escape; `pkg://` names only a digest.)
        let text = runtime_env.get();
        let may_name_a_file = text.contains("file:")
            || text.contains('\\')
            || text.matches("://").count() != text.matches("pkg://").count();
        // With a build user, envs are per caller (see `EnvDescription::built_for`), and
        // so are the fast paths' keys.
        let for_caller = match self.policy.build_user {
            Some(_) => format!("{}:", caller.uid),
            None => String::new(),
        };
        let raw_key = format!("raw:{for_caller}{text}");
        if !may_name_a_file && let Some(built) = self.cached(&raw_key) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((built, false));
        }
        let runtime_env: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| StateError::bad_request("runtime_env", format!("invalid JSON: {e}")))?;
        let spec =
            RuntimeEnvSpec::from_value(&runtime_env).map_err(|e| StateError::from(crate::Error::from(e)))?;
        let locations = spec
            .working_dir
            .iter()
            .map(|wd| ("working_dir".to_string(), wd))
            .chain(
                spec.py_modules
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (format!("py_modules[{i}]"), m)),
            );
        for (field, location) in locations {
            let field_name = if field == "working_dir" {
                "working_dir"
            } else {
                "py_modules"
            };
            match location.origin() {
                // Read with the daemon's rights, not the caller's: only the daemon's own
                // user and root may name one.
                Origin::File(path) if !caller.admin => {
                    return Err(StateError::Forbidden(format!(
                        "{field}: {:?} would be read with the daemon's rights, not yours; upload it \
                         (renv package -o, then PUT /v1/packages/<digest>) and use pkg://<digest>",
                        path.display().to_string()
                    )));
                }
                Origin::Remote(uri) if !self.allow_remote.allows(uri) => {
                    let allowed = match self.allow_remote.prefixes() {
                        [] => "none is allowed".to_string(),
                        prefixes => format!("allowed: {}", prefixes.join(", ")),
                    };
                    return Err(StateError::BadRequest {
                        field: field_name,
                        message: format!(
                            "{field}: {uri} is not under a remote this daemon may fetch from ({allowed}); \
                             the node's operator allows prefixes with --allow-remote"
                        ),
                    });
                }
                Origin::Local(path) => {
                    return Err(StateError::BadRequest {
                        field: field_name,
                        message: format!(
                            "{field}: {:?} is a local path; the daemon never reads a client's files. \
                             Upload the package (renv package -o, then PUT /v1/packages/<digest>) and use \
                             pkg://<digest> (a wheel: pkg://<digest>/<file>.whl)",
                            path.display().to_string()
                        ),
                    });
                }
                _ => {}
            }
        }
        if let Some(PackageSpec {
            field,
            packages: PackageList::RequirementsFile(file),
            ..
        }) = &spec.packages
        {
            // Read with the daemon's rights, a path would let any caller read any file.
            return Err(StateError::BadRequest {
                field: field.as_str(),
                message: format!(
                    "{:?} is a requirements file path; the daemon never reads a client's files. \
                     List the requirements instead (renv submit reads the file for you)",
                    file.display().to_string()
                ),
            });
        }
        let key = format!("{for_caller}{}", spec.canonical_json());
        let names_a_file = spec
            .working_dir
            .iter()
            .chain(&spec.py_modules)
            .any(|p| matches!(p.origin(), Origin::File(_) | Origin::Remote(_)));
        if !names_a_file && let Some(built) = self.cached(&key) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            // Another spelling of a spec built before (a client that serializes its JSON
            // its own way): its next repeat takes the text's path. It passed every check
            // above, none of which depends on the caller for a request naming no file.
            if !may_name_a_file {
                self.remember(vec![raw_key], built.env_id);
            }
            return Ok((built, false));
        }
        let mut rx = {
            let mut builds = self.builds.lock().unwrap();
            match builds.running.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    // Joining a build in flight costs nothing; starting one counts.
                    let counted = !caller.admin;
                    if counted {
                        let mine = builds.by_uid.entry(caller.uid).or_default();
                        if *mine >= self.max_builds_per_uid {
                            return Err(StateError::TooMany(format!(
                                "uid {} already has {} builds in flight (the daemon's --max-builds-per-uid); \
                                 retry when one ends",
                                caller.uid, *mine
                            )));
                        }
                        *mine += 1;
                    }
                    let (tx, rx) = watch::channel(None);
                    builds.running.insert(key.clone(), rx.clone());
                    let daemon = Arc::clone(self);
                    let keys = [key.clone(), raw_key];
                    let uid = caller.uid;
                    tokio::spawn(async move {
                        let result = daemon.build(spec, keys, uid).await;
                        {
                            let mut builds = daemon.builds.lock().unwrap();
                            builds.running.remove(&key);
                            if counted && let Some(mine) = builds.by_uid.get_mut(&uid) {
                                *mine -= 1;
                                if *mine == 0 {
                                    builds.by_uid.remove(&uid);
                                }
                            }
                        }
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| StateError::Internal("build task vanished".into()))?;
        let built = result.clone().expect("waited for Some")?;
        let created = built.created();
        Ok((built, created))
    }

    /// A spec built before whose entries are still leased cannot have lost them (prune
    /// skips leased entries), so it is served from memory. The disk is looked at once a
    /// second at most per env: the interpreter link (a removed base Python means a
    /// rebuild, from the next second on) and the entries' use times (kept per minute).
    fn cached(&self, key: &str) -> Option<Arc<BuiltEnv>> {
        let env_id = *self.resolved.lock().unwrap().get(key)?;
        let mut envs = self.envs.lock().unwrap();
        let record = envs.get_mut(&env_id)?;
        record.leases.as_ref()?;
        if record
            .disk_checked
            .is_none_or(|at| at.elapsed() >= DISK_CHECK_EVERY)
        {
            if let Some(venv) = &record.built.venv
                && !venv.python().exists()
            {
                return None;
            }
            // On disk too (at most once a minute per entry), so LRU pruning sees the use.
            record.built.touch(&self.store);
            record.disk_checked = Some(Instant::now());
        }
        record.last_used = now();
        Some(Arc::clone(&record.built))
    }

    /// Maps request texts and canonical specs to the env they resolved to, for [`Self::cached`].
    fn remember(&self, keys: Vec<String>, env_id: EnvId) {
        let mut resolved = self.resolved.lock().unwrap();
        if resolved.len() + keys.len() > MAX_RESOLVED {
            resolved.clear();
        }
        for key in keys {
            resolved.insert(key, env_id);
        }
    }

    /// Builds `spec` once a build slot is free. The spec is already in `Builds::running`
    /// while this waits, so identical requests join this build rather than queue their own.
    async fn build(self: &Arc<Self>, spec: RuntimeEnvSpec, keys: [String; 2], caller: u32) -> BuildResult {
        let m = &self.metrics;
        let queued = Instant::now();
        m.builds_waiting.fetch_add(1, Ordering::Relaxed);
        let slot = self.build_slots.acquire().await;
        m.builds_waiting.fetch_sub(1, Ordering::Relaxed);
        let _slot = slot.map_err(|_| StateError::Internal("the build slots were closed".into()))?;
        m.builds_running.fetch_add(1, Ordering::Relaxed);
        let result = self.build_in_slot(spec, keys, caller, queued.elapsed()).await;
        m.builds_running.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn build_in_slot(
        self: &Arc<Self>,
        spec: RuntimeEnvSpec,
        keys: [String; 2],
        caller: u32,
        queued: Duration,
    ) -> BuildResult {
        let daemon = Arc::clone(self);
        let start = Instant::now();
        let policy = VenvPolicy {
            build_for: Some(caller),
            ..self.policy.clone()
        };
        let result = tokio::task::spawn_blocking(move || {
            loop {
                let built = build_env(
                    &spec,
                    Path::new("/"),
                    &daemon.store,
                    &policy,
                    &daemon.remotes,
                    &Progress::hidden(),
                )?;
                if let Some(leases) = built.lease(&daemon.store)? {
                    return Ok::<_, crate::Error>((built, leases));
                }
            }
        })
        .await
        .map_err(|e| StateError::Internal(format!("build panicked: {e}")))?;
        let m = &self.metrics;
        match result {
            Ok((built, leases)) => {
                let created = built.created();
                if created {
                    self.gc_wakeup.notify_one();
                    m.builds.fetch_add(1, Ordering::Relaxed);
                    m.build_ms
                        .fetch_add(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                } else {
                    m.cache_hits.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    env_id = %built.env_id,
                    created,
                    ms = start.elapsed().as_millis() as u64,
                    queued_ms = queued.as_millis() as u64,
                    "env ready"
                );
                let built = Arc::new(built);
                let mut envs = self.envs.lock().unwrap();
                let record = envs.entry(built.env_id).or_insert_with(|| EnvRecord {
                    built: Arc::clone(&built),
                    // References whose env was lost come back with it.
                    refs: self
                        .lost
                        .lock()
                        .unwrap()
                        .remove(&built.env_id)
                        .unwrap_or_default(),
                    workers: Vec::new(),
                    last_used: now(),
                    leases: None,
                    disk_checked: None,
                });
                // A rebuild replaces the record's env: answers cached for the old one are
                // recognised as stale by pointer (see `routes::envs`).
                record.built = Arc::clone(&built);
                if record.leases.is_none() {
                    record.leases = Some(leases);
                }
                let forgotten = forget_idle(&mut envs, self.max_idle_envs, built.env_id);
                drop(envs);
                if !forgotten.is_empty() {
                    self.resolved
                        .lock()
                        .unwrap()
                        .retain(|_, id| !forgotten.contains(id));
                }
                self.remember(keys.into(), built.env_id);
                Ok(built)
            }
            Err(e) => {
                m.build_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "env build failed");
                Err(StateError::from(e))
            }
        }
    }

    /// The env with this id, if the daemon has built it and `caller` may use it (it
    /// holds a reference or runs a worker in it; the daemon's user and root, any env).
    pub fn env(&self, env_id: EnvId, caller: &Caller) -> Option<Arc<BuiltEnv>> {
        self.envs
            .lock()
            .unwrap()
            .get(&env_id)
            .filter(|record| record.visible_to(caller))
            .map(|record| Arc::clone(&record.built))
    }

    /// The envs `caller` may see, with the references and workers it may see.
    pub fn envs(&self, caller: &Caller) -> Vec<EnvInfo> {
        self.envs
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.visible_to(caller))
            .map(|r| {
                let refs: Vec<&Option<String>> = r
                    .refs
                    .iter()
                    .filter(|r| caller.may_see(r.uid))
                    .map(|r| &r.tag)
                    .collect();
                EnvInfo {
                    built: Arc::clone(&r.built),
                    refs: refs.len() as u64,
                    ref_tags: refs.into_iter().flatten().cloned().collect(),
                    workers: r.workers.iter().filter(|uid| caller.may_see(**uid)).count() as u64,
                    last_used: r.last_used,
                }
            })
            .collect()
    }

    /// References whose env is lost (see [`LostEnv`]) that `caller` may see.
    pub fn lost_envs(&self, caller: &Caller) -> Vec<LostEnv> {
        self.lost
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(env_id, refs)| {
                let refs: Vec<&Ref> = refs.iter().filter(|r| caller.may_see(r.uid)).collect();
                (!refs.is_empty()).then(|| LostEnv {
                    env_id: *env_id,
                    refs: refs.len() as u64,
                    ref_tags: refs.iter().filter_map(|r| r.tag.clone()).collect(),
                })
            })
            .collect()
    }

    /// References whose env is lost, in all.
    pub fn lost_reference_count(&self) -> u64 {
        self.lost
            .lock()
            .unwrap()
            .values()
            .map(|refs| refs.len() as u64)
            .sum()
    }

    /// All references held, and the number of envs known.
    pub fn reference_counts(&self) -> (u64, usize) {
        let envs = self.envs.lock().unwrap();
        (
            envs.values().map(|r| r.refs.len() as u64).sum::<u64>(),
            envs.len(),
        )
    }

    /// The change that saves an env (ignored if saved already): every change that adds a
    /// hold carries it, so no saved hold is ever without its env.
    pub fn save_env(built: &BuiltEnv) -> Change {
        Change::PutEnv(SavedEnv {
            env_id: built.env_id.to_string(),
            recipe: built.recipe().to_string(),
            entries: built.entries().collect(),
        })
    }

    /// Adds a reference or a running worker of `owner` to an env. A reference is saved
    /// before it counts, and counts as soon as it is saved, whether or not its client
    /// still waits (a worker's hold is saved by [`super::workers`] with the worker).
    /// If the env's entries are not leased yet, the leases are taken on the blocking pool
    /// (another process may hold an entry's lock for as long as it likes; the event loop
    /// never waits for it, and the wait ends at the store's lock deadline). If they cannot
    /// be taken, the hold is given back and the error returned: nothing is held without
    /// its leases.
    pub async fn hold(self: &Arc<Self>, env_id: EnvId, owner: u32, hold: Hold) -> Result<(), StateError> {
        let built = self
            .envs
            .lock()
            .unwrap()
            .get(&env_id)
            .map(|record| Arc::clone(&record.built))
            .ok_or_else(|| StateError::NotFound(format!("no env {env_id}")))?;
        let leasing = match hold {
            Hold::Reference(tag) => {
                // Counted as soon as it is saved, by whoever commits it: a client that goes
                // away meanwhile must not leave its reference saved and never counted.
                let daemon = Arc::clone(self);
                let runtime = tokio::runtime::Handle::current();
                let changes = vec![
                    Self::save_env(&built),
                    Change::AddRef {
                        env_id: env_id.to_string(),
                        uid: owner,
                        tag: tag.clone(),
                    },
                ];
                self.journal
                    .write_then(changes, move |saved| {
                        let ids =
                            saved.map_err(|e| StateError::Internal(format!("saving the reference: {e}")))?;
                        let taken = Taken::Reference(Ref {
                            id: ids[1],
                            uid: owner,
                            tag,
                        });
                        daemon.count(env_id, taken, &runtime)
                    })
                    .await
                    .map_err(|e| StateError::Internal(format!("saving the reference: {e}")))??
            }
            Hold::Worker => self.count(env_id, Taken::Worker(owner), &tokio::runtime::Handle::current())?,
        };
        match leasing {
            Some(leasing) => leasing
                .await
                .map_err(|e| StateError::Internal(format!("leasing panicked: {e}")))?,
            None => Ok(()),
        }
    }

    /// Counts a hold in its env's record. If the env is not leased yet, its leases are
    /// taken by a task of its own (returned, to wait for), so that happens even if the
    /// request's client goes away meanwhile. An env forgotten meanwhile (it was idle) is
    /// an error, and a reference's saved row is dropped again.
    fn count(
        self: &Arc<Self>,
        env_id: EnvId,
        taken: Taken,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Option<tokio::task::JoinHandle<Result<(), StateError>>>, StateError> {
        let unleased = {
            let mut envs = self.envs.lock().unwrap();
            envs.get_mut(&env_id).map(|record| {
                match &taken {
                    Taken::Worker(owner) => record.workers.push(*owner),
                    Taken::Reference(r) => record.refs.push(r.clone()),
                }
                record.last_used = now();
                record.leases.is_none().then(|| Arc::clone(&record.built))
            })
        };
        let Some(unleased) = unleased else {
            let changes = unsave(&taken, env_id);
            if !changes.is_empty() {
                self.journal
                    .write_detached(changes, "a reference given back stays saved");
            }
            return Err(StateError::Conflict(
                "the env was forgotten meanwhile; ask again".into(),
            ));
        };
        Ok(unleased.map(|built| runtime.spawn(Arc::clone(self).lease_held(env_id, built, taken))))
    }

    /// Leases the entries of an env a hold was just counted in; if they cannot be leased
    /// (and no other hold leased them meanwhile), the hold is given back.
    async fn lease_held(
        self: Arc<Self>,
        env_id: EnvId,
        built: Arc<BuiltEnv>,
        taken: Taken,
    ) -> Result<(), StateError> {
        let store = Arc::clone(&self.store);
        let leased = tokio::task::spawn_blocking(move || built.lease(&store))
            .await
            .map_err(|e| StateError::Internal(format!("leasing panicked: {e}")))
            .and_then(|leased| leased.map_err(StateError::from))
            .and_then(|leases| {
                leases.ok_or_else(|| StateError::Conflict("the env's entries changed; ask again".into()))
            });
        let failed = {
            let mut envs = self.envs.lock().unwrap();
            let record = envs
                .get_mut(&env_id)
                .ok_or_else(|| StateError::Internal(format!("env {env_id} vanished while held")))?;
            match leased {
                Ok(leases) => {
                    if record.leases.is_none() && !(record.refs.is_empty() && record.workers.is_empty()) {
                        record.leases = Some(leases);
                    }
                    None
                }
                // Another hold leased the env meanwhile: this one is protected too.
                Err(_) if record.leases.is_some() => None,
                Err(e) => {
                    record.give_back(&taken);
                    Some(e)
                }
            }
        };
        match failed {
            None => Ok(()),
            Some(e) => {
                self.unsave(&taken, env_id).await;
                Err(e)
            }
        }
    }

    /// Holds an env for a worker a previous daemon started, which its supervisor keeps
    /// leased: counted at once, with no lease of the daemon's to wait for.
    pub fn adopt_worker(&self, env_id: EnvId, owner: u32) {
        match self.envs.lock().unwrap().get_mut(&env_id) {
            Some(record) => record.workers.push(owner),
            None => tracing::warn!(env_id = %env_id, "an adopted worker's env was not found again"),
        }
    }

    /// Removes a saved reference that was given back (a worker's row is its module's).
    async fn unsave(&self, taken: &Taken, env_id: EnvId) {
        let changes = unsave(taken, env_id);
        if !changes.is_empty()
            && let Err(e) = self.journal.write(changes).await
        {
            tracing::warn!(error = %e, "a reference given back stays saved");
        }
    }

    /// Drops the last reference `caller` took (the daemon's user and root: the last one
    /// anyone took), in memory and then in the saved state. Returns the references left
    /// that `caller` may see.
    pub async fn release_reference(&self, env_id: EnvId, caller: &Caller) -> Result<u64, StateError> {
        let pick = |refs: &mut Vec<Ref>| -> Result<Ref, StateError> {
            let at = refs
                .iter()
                .rposition(|r| r.uid == caller.uid)
                .or_else(|| caller.admin.then(|| refs.len().checked_sub(1)).flatten())
                .ok_or_else(|| {
                    StateError::Conflict(format!("env {env_id} has no reference of yours to release"))
                })?;
            Ok(refs.remove(at))
        };
        let visible = |refs: &[Ref]| refs.iter().filter(|r| caller.may_see(r.uid)).count() as u64;
        let (released, left, unheld) = {
            let mut envs = self.envs.lock().unwrap();
            match envs.get_mut(&env_id).filter(|record| record.visible_to(caller)) {
                Some(record) => {
                    let released = pick(&mut record.refs)?;
                    record.last_used = now();
                    record.drop_leases_if_unheld();
                    (released, visible(&record.refs), record.is_unheld())
                }
                None => {
                    drop(envs);
                    let mut lost = self.lost.lock().unwrap();
                    let refs = lost
                        .get_mut(&env_id)
                        .filter(|refs| caller.admin || refs.iter().any(|r| r.uid == caller.uid))
                        .ok_or_else(|| StateError::NotFound(format!("no env {env_id}")))?;
                    let released = pick(refs)?;
                    let left = visible(refs);
                    let unheld = refs.is_empty();
                    if unheld {
                        lost.remove(&env_id);
                    }
                    (released, left, unheld)
                }
            }
        };
        // The env's row goes with its last hold (the database checks again).
        let mut changes = vec![Change::DropRef {
            env_id: env_id.to_string(),
            id: released.id,
        }];
        if unheld {
            changes.push(Change::DropEnvIfUnheld {
                env_id: env_id.to_string(),
            });
        }
        self.journal
            .write(changes)
            .await
            .map_err(|e| StateError::Internal(format!("saving the release: {e}")))?;
        Ok(left)
    }

    /// Drops a running worker of `owner` (its exit was recorded, or it never started).
    pub async fn release_worker(&self, env_id: EnvId, owner: u32) {
        let unheld = {
            let mut envs = self.envs.lock().unwrap();
            envs.get_mut(&env_id).is_none_or(|record| {
                if let Some(at) = record.workers.iter().position(|uid| *uid == owner) {
                    record.workers.remove(at);
                }
                record.last_used = now();
                record.drop_leases_if_unheld();
                record.is_unheld()
            })
        };
        // Still held (a reference, another worker): its row stays, nothing to write.
        if !unheld {
            return;
        }
        let dropped = self
            .journal
            .write(vec![Change::DropEnvIfUnheld {
                env_id: env_id.to_string(),
            }])
            .await;
        if let Err(e) = dropped {
            tracing::warn!(error = %e, "an env no worker holds stays saved");
        }
    }

    /// Takes back what a previous daemon saved: each saved env is found again in the
    /// store (nothing is built) and its references re-leased. References whose env lost
    /// an entry meanwhile are kept as lost and reported. Returns the envs restored.
    pub async fn restore(
        self: &Arc<Self>,
        envs: Vec<SavedEnv>,
        refs: Vec<SavedRef>,
    ) -> Result<usize, StateError> {
        let mut refs_of: HashMap<String, Vec<Ref>> = HashMap::new();
        for r in refs {
            refs_of.entry(r.env_id).or_default().push(Ref {
                id: r.id,
                uid: r.uid,
                tag: r.tag,
            });
        }
        let store = Arc::clone(&self.store);
        // Found by their markers, nothing built or locked: a restart never waits here.
        let found = tokio::task::spawn_blocking(move || {
            envs.into_iter()
                .map(|saved| {
                    let built = BuiltEnv::restore(&store, &saved.recipe);
                    (saved, built)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| StateError::Internal(format!("restoring panicked: {e}")))?;
        let mut restored = Vec::new();
        for (saved, built) in found {
            let refs = refs_of.remove(&saved.env_id).unwrap_or_default();
            let Ok(env_id) = saved.env_id.parse::<EnvId>() else {
                continue;
            };
            match built {
                Ok(Some(built)) => {
                    if built.env_id != env_id {
                        tracing::warn!(saved = %env_id, found = %built.env_id, "a saved env restores to another id");
                    }
                    if !refs.is_empty() {
                        restored.push(env_id);
                    }
                    self.envs.lock().unwrap().insert(
                        env_id,
                        EnvRecord {
                            built: Arc::new(built),
                            leases: None,
                            refs,
                            workers: Vec::new(),
                            last_used: now(),
                            disk_checked: None,
                        },
                    );
                }
                Ok(None) | Err(_) => {
                    let error = built.err().map(|e| e.to_string());
                    if !refs.is_empty() {
                        tracing::warn!(
                            env_id = %env_id,
                            references = refs.len(),
                            tags = ?refs.iter().filter_map(|r| r.tag.as_deref()).collect::<Vec<_>>(),
                            error,
                            "references whose env lost an entry while the daemon was down; they are kept \
                             (GET /v1/envs shows them missing) until released or the env is built again"
                        );
                        self.lost.lock().unwrap().insert(env_id, refs);
                    }
                }
            }
        }
        // Their leases are taken after, off the start-up path: an entry lock someone holds
        // (for up to the lock timeout) delays that env's lease, not the daemon. Meanwhile
        // the saved references keep the entries from prune.
        let count = restored.len();
        let daemon = Arc::clone(self);
        tokio::spawn(async move {
            for env_id in restored {
                let Some(built) = daemon
                    .envs
                    .lock()
                    .unwrap()
                    .get(&env_id)
                    .map(|r| Arc::clone(&r.built))
                else {
                    continue;
                };
                let store = Arc::clone(&daemon.store);
                let leased = tokio::task::spawn_blocking(move || built.lease(&store)).await;
                match leased {
                    Ok(Ok(Some(leases))) => {
                        if let Some(record) = daemon.envs.lock().unwrap().get_mut(&env_id)
                            && record.leases.is_none()
                            && !record.is_unheld()
                        {
                            record.leases = Some(leases);
                        }
                    }
                    Ok(Ok(None)) => {
                        tracing::warn!(env_id = %env_id, "a restored env lost an entry before it was leased")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(env_id = %env_id, error = %e, "a restored env is not leased yet")
                    }
                    Err(e) => tracing::warn!(env_id = %env_id, error = %e, "leasing a restored env panicked"),
                }
            }
        });
        for (env_id, refs) in refs_of {
            // References saved without their env: impossible by construction (every
            // change adding one saves the env too), reported if it happens anyway.
            tracing::warn!(
                env_id,
                references = refs.len(),
                "saved references without a saved env"
            );
            if let Ok(env_id) = env_id.parse::<EnvId>() {
                self.lost.lock().unwrap().insert(env_id, refs);
            }
        }
        Ok(count)
    }
}

/// Forgets the least recently used envs that nothing holds, beyond `max` of them (never
/// `keep`, the one just built). Returns the forgotten ids.
fn forget_idle(envs: &mut HashMap<EnvId, EnvRecord>, max: usize, keep: EnvId) -> Vec<EnvId> {
    let mut idle: Vec<(f64, EnvId)> = envs
        .iter()
        .filter(|(id, r)| **id != keep && r.refs.is_empty() && r.workers.is_empty())
        .map(|(id, r)| (r.last_used, *id))
        .collect();
    if idle.len() <= max {
        return Vec::new();
    }
    idle.sort_by(|a, b| a.0.total_cmp(&b.0));
    let excess = idle.len() - max;
    let forgotten: Vec<EnvId> = idle.into_iter().take(excess).map(|(_, id)| id).collect();
    for id in &forgotten {
        envs.remove(id);
    }
    forgotten
}

/// A hold as [`Daemon::hold`] took it, to give it back.
enum Taken {
    Reference(Ref),
    Worker(u32),
}

/// The changes that remove a hold given back from the saved state: a reference's row
/// (a worker's row is [`super::workers`]'s), and its env's if nothing else holds it.
fn unsave(taken: &Taken, env_id: EnvId) -> Vec<Change> {
    match taken {
        Taken::Reference(r) => vec![
            Change::DropRef {
                env_id: env_id.to_string(),
                id: r.id,
            },
            Change::DropEnvIfUnheld {
                env_id: env_id.to_string(),
            },
        ],
        Taken::Worker(_) => Vec::new(),
    }
}

impl EnvRecord {
    /// Gives back a hold that could not be leased (the newest one that matches).
    fn give_back(&mut self, taken: &Taken) {
        match taken {
            Taken::Reference(taken) => {
                if let Some(at) = self.refs.iter().position(|r| r.id == taken.id) {
                    self.refs.remove(at);
                }
            }
            Taken::Worker(owner) => {
                if let Some(at) = self.workers.iter().rposition(|uid| uid == owner) {
                    self.workers.remove(at);
                }
            }
        }
        self.drop_leases_if_unheld();
    }

    /// Neither a reference nor a worker holds it.
    fn is_unheld(&self) -> bool {
        self.refs.is_empty() && self.workers.is_empty()
    }

    /// The leases go with the last reference or worker.
    fn drop_leases_if_unheld(&mut self) {
        if self.is_unheld() {
            self.leases = None;
        }
    }
}
