//! What the daemon knows: envs with their references, workers, GPUs, counters.
//!
//! Get-or-create is single-flight per canonical spec: the first request spawns the build
//! as its own task and every concurrent request for the same spec waits on a watch
//! channel for its result — failure included. A waiter that disconnects cancels only its
//! own wait, never the build. An env's entries stay leased while it has references or
//! running workers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use super::api::ApiError;
use super::gpus::GpuPool;
use crate::build::{BuiltEnv, build_env};
use crate::digest::EnvId;
use crate::progress::Progress;
use crate::spec::{RuntimeEnvSpec, WorkingDirSpec};
use crate::store::{Lease, Store};
use crate::venv::VenvPolicy;

/// Whether a worker given no GPUs sees `CUDA_VISIBLE_DEVICES=""` or the daemon's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ZeroGpus {
    #[default]
    Hide,
    Inherit,
}

pub struct EnvRecord {
    pub built: Arc<BuiltEnv>,
    pub refs: u64,
    pub ref_tags: Vec<String>,
    pub workers: u64,
    /// The `POST /v1/envs` answer for an existing env, serialized once.
    pub response: axum::body::Bytes,
    pub last_used: f64,
    /// Held while `refs + workers > 0`.
    leases: Option<Vec<Lease>>,
}

pub type BuildResult = Result<Arc<BuiltEnv>, ApiError>;

#[derive(Default)]
pub struct Metrics {
    pub builds: AtomicU64,
    pub build_failures: AtomicU64,
    pub build_ms: AtomicU64,
    pub cache_hits: AtomicU64,
    pub requests: AtomicU64,
    pub workers_started: AtomicU64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Running,
    Succeeded,
    Failed,
    Stopped,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    pub name: Option<String>,
    pub env_id: String,
    pub pid: u32,
    pub state: WorkerState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub gpus: Vec<u32>,
    pub started_at: f64,
    pub ended_at: Option<f64>,
    pub stdout_log: PathBuf,
    pub stderr_log: PathBuf,
    #[serde(skip)]
    pub stop_requested: bool,
}

pub struct Daemon {
    pub store: Arc<Store>,
    pub policy: VenvPolicy,
    pub zero_gpus: ZeroGpus,
    pub stop_grace: std::time::Duration,
    pub base_env: BTreeMap<String, String>,
    pub gpus: Mutex<GpuPool>,
    pub envs: Mutex<HashMap<EnvId, EnvRecord>>,
    pub workers: Mutex<BTreeMap<String, WorkerInfo>>,
    /// Flips to true when a worker's exit has been recorded (for `?wait=true` and log
    /// followers, so they learn of it at once instead of polling).
    pub exits: Mutex<HashMap<String, watch::Receiver<bool>>>,
    pub metrics: Metrics,
    pub max_json_bytes: usize,
    /// Unix time the daemon started (for `renv_uptime_seconds`).
    pub started_at: f64,
    pub logs: Arc<super::logs::LogPool>,
    /// Wakes the garbage collector (after builds that created entries).
    pub gc_wakeup: tokio::sync::Notify,
    builds: Mutex<HashMap<String, watch::Receiver<Option<BuildResult>>>>,
    /// Canonical spec → the env it built, for the in-memory fast path.
    resolved: Mutex<HashMap<String, EnvId>>,
    next_worker: AtomicU64,
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Daemon {
    pub fn new(
        store: Arc<Store>,
        policy: VenvPolicy,
        gpus: GpuPool,
        zero_gpus: ZeroGpus,
        stop_grace: std::time::Duration,
        max_json_bytes: usize,
    ) -> Daemon {
        let logs = super::logs::LogPool::new(store.layout().worker_logs_dir())
            .expect("the store's log directory is writable");
        Daemon {
            logs: Arc::new(logs),
            started_at: now(),
            gc_wakeup: tokio::sync::Notify::new(),
            store,
            policy,
            zero_gpus,
            stop_grace,
            base_env: std::env::vars().collect(),
            gpus: Mutex::new(gpus),
            envs: Mutex::new(HashMap::new()),
            workers: Mutex::new(BTreeMap::new()),
            exits: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            max_json_bytes,
            builds: Mutex::new(HashMap::new()),
            resolved: Mutex::new(HashMap::new()),
            next_worker: AtomicU64::new(1),
        }
    }

    /// Builds (or finds) the env for a request's `runtime_env`, sharing one build between
    /// concurrent identical requests.
    /// Returns the env and whether this request's build created any of its entries.
    pub async fn get_or_create(
        self: &Arc<Self>,
        runtime_env: &serde_json::value::RawValue,
    ) -> Result<(Arc<BuiltEnv>, bool), ApiError> {
        // The request's exact text: a repeat skips parsing and validation altogether.
        let raw_key = format!("raw:{}", runtime_env.get());
        if let Some(built) = self.cached(&raw_key) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((built, false));
        }
        let runtime_env: serde_json::Value = serde_json::from_str(runtime_env.get())
            .map_err(|e| ApiError::bad_request("runtime_env", format!("invalid JSON: {e}")))?;
        let spec =
            RuntimeEnvSpec::from_value(&runtime_env).map_err(|e| ApiError::from(crate::Error::from(e)))?;
        if let Some(WorkingDirSpec::Local(path)) = &spec.working_dir {
            return Err(ApiError::bad_request(
                "working_dir",
                format!(
                    "{:?} is a local path; the daemon never reads a client's directory. Upload the package \
                     (renv package -o, then PUT /v1/packages/<digest>) and use pkg://<digest>",
                    path.display().to_string()
                ),
            ));
        }
        let key = spec.canonical_json().to_string();
        if let Some(built) = self.cached(&key) {
            self.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((built, false));
        }
        let mut rx = {
            let mut builds = self.builds.lock().unwrap();
            match builds.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    builds.insert(key.clone(), rx.clone());
                    let daemon = Arc::clone(self);
                    let keys = [key.clone(), raw_key];
                    tokio::spawn(async move {
                        let result = daemon.build(spec, keys).await;
                        daemon.builds.lock().unwrap().remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ApiError::internal("build task vanished"))?;
        let built = result.clone().expect("waited for Some")?;
        let created = built.created();
        Ok((built, created))
    }

    /// A spec built before whose entries are still leased cannot have lost them (prune
    /// skips leased entries), so it is served from memory; only the interpreter link is
    /// checked, so a removed base Python still means a rebuild.
    fn cached(&self, key: &str) -> Option<Arc<BuiltEnv>> {
        let env_id = *self.resolved.lock().unwrap().get(key)?;
        let mut envs = self.envs.lock().unwrap();
        let record = envs.get_mut(&env_id)?;
        record.leases.as_ref()?;
        if let Some(venv) = &record.built.venv
            && !venv.python().exists()
        {
            return None;
        }
        record.last_used = now();
        // On disk too (at most once a minute per entry), so LRU pruning sees the use.
        record.built.touch(&self.store);
        Some(Arc::clone(&record.built))
    }

    async fn build(self: &Arc<Self>, spec: RuntimeEnvSpec, keys: [String; 2]) -> BuildResult {
        let daemon = Arc::clone(self);
        let start = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            loop {
                let built = build_env(
                    &spec,
                    Path::new("/"),
                    &daemon.store,
                    &daemon.policy,
                    &Progress::hidden(),
                )?;
                if let Some(leases) = built.lease(&daemon.store)? {
                    return Ok::<_, crate::Error>((built, leases));
                }
            }
        })
        .await
        .map_err(|e| ApiError::internal(format!("build panicked: {e}")))?;
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
                    "env ready"
                );
                let built = Arc::new(built);
                let mut envs = self.envs.lock().unwrap();
                let response = axum::body::Bytes::from(super::api::env_json(&built, false).to_string());
                let record = envs.entry(built.env_id).or_insert_with(|| EnvRecord {
                    built: Arc::clone(&built),
                    refs: 0,
                    ref_tags: Vec::new(),
                    workers: 0,
                    response: response.clone(),
                    last_used: now(),
                    leases: None,
                });
                record.built = Arc::clone(&built);
                record.response = response;
                if record.leases.is_none() {
                    record.leases = Some(leases);
                }
                drop(envs);
                let mut resolved = self.resolved.lock().unwrap();
                for key in keys {
                    resolved.insert(key, built.env_id);
                }
                Ok(built)
            }
            Err(e) => {
                m.build_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "env build failed");
                Err(ApiError::from(e))
            }
        }
    }

    /// Adds a reference (`workers: false`) or a running worker (`true`) to an env, and
    /// returns the env's cached answer.
    pub fn hold(
        &self,
        env_id: EnvId,
        tag: Option<String>,
        worker: bool,
    ) -> Result<axum::body::Bytes, ApiError> {
        let mut envs = self.envs.lock().unwrap();
        let record = envs
            .get_mut(&env_id)
            .ok_or_else(|| ApiError::not_found(format!("no env {env_id}")))?;
        if worker {
            record.workers += 1;
        } else {
            record.refs += 1;
            record.ref_tags.extend(tag);
        }
        record.last_used = now();
        if record.leases.is_none() {
            record.leases = record.built.lease(&self.store).ok().flatten();
        }
        Ok(record.response.clone())
    }

    /// Drops a reference or a worker; the leases go with the last of them.
    pub fn release(&self, env_id: EnvId, worker: bool) -> Result<(), ApiError> {
        let mut envs = self.envs.lock().unwrap();
        let record = envs
            .get_mut(&env_id)
            .ok_or_else(|| ApiError::not_found(format!("no env {env_id}")))?;
        if worker {
            record.workers = record.workers.saturating_sub(1);
        } else if record.refs == 0 {
            return Err(ApiError::conflict(format!(
                "env {env_id} has no reference to release"
            )));
        } else {
            record.refs -= 1;
            record.ref_tags.pop();
        }
        record.last_used = now();
        if record.refs == 0 && record.workers == 0 {
            record.leases = None;
        }
        Ok(())
    }

    pub fn new_worker_id(&self) -> String {
        format!("w{:06}", self.next_worker.fetch_add(1, Ordering::Relaxed))
    }
}
