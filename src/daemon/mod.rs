//! `renv daemon`: the per-node agent, serving the HTTP API on a Unix socket.
//!
//! The layers go one way, HTTP on top (an arrow is "uses"; no cycles):
//!
//! ```text
//! mod       serve: the accept loop, shutdown; the gc task
//!           → connections, socket, routes, error, workers, state, gpus; crate::store (gc)
//! connections  admission at accept: peer policy, connections per uid and in all, the
//!           immediate answer to a refused connection       → peer
//! routes    axum handlers: parse a request, call the state, shape the JSON; owns the
//!           cached get-or-create answers          → error, workers, packages, state
//! error     ApiError: status, kind, field, message; from StateError and crate::Error
//!                                                 → state (StateError only)
//! workers   worker records and lifecycle: start, reap, stop, stop all
//!                                                 → state, gpus, logs
//! packages  package uploads into the store, package bytes   → state (StateError only)
//! state     envs, references, get-or-create, counters; StateError
//!                                                 → crate::build, crate::store
//! gpus      the node's GPU set and its allocation
//! logs      worker log files, created ahead of time
//! socket    creating the socket safely
//! ```
//!
//! Nothing outside `routes`, `error`, `connections` (a refusal's answer) and this file knows
//! about HTTP.
//!
//! The accept loop is our own (hyper over tokio's `UnixListener`) so that every
//! connection's peer is checked with SO_PEERCRED before a byte is read, connections are
//! capped per uid and in all ([`connections`]), slow clients are dropped (headers within
//! `--header-timeout-seconds`, JSON bodies within `--body-timeout-seconds`, uploads that
//! stall), and running out of file descriptors backs off instead of spinning.

pub mod connections;
pub mod error;
pub mod gpus;
pub mod journal;
pub mod logs;
pub mod packages;
pub mod peer;
pub mod routes;
pub mod socket;
pub mod state;
pub mod workers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tower::ServiceExt;

use crate::store::Store;
use crate::venv::VenvPolicy;
use gpus::{GpuPool, GpuSpec, ZeroGpus};
use state::Daemon;
use workers::Workers;

/// Node policy and limits for one daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub gpus: GpuSpec,
    pub allow_uids: Vec<u32>,
    pub allow_gids: Vec<u32>,
    pub zero_gpus: ZeroGpus,
    pub max_connections: usize,
    /// Most connections one uid may hold at once (root and the daemon's user: exempt).
    pub max_connections_per_uid: usize,
    pub max_json_bytes: usize,
    /// A connection that sends no complete request headers for this long is dropped, and
    /// an upload that sends nothing for this long.
    pub header_timeout: Duration,
    /// A JSON request body must arrive in full within this.
    pub body_timeout: Duration,
    pub stop_grace: Duration,
    /// Keep the store under this size (`--max-store-size`): above it, prune down to 90%.
    pub max_store_size: Option<u64>,
    /// Entries younger than this are never collected (a CLI build holds no lease).
    pub gc_min_age: Duration,
    /// Ended workers remembered for status and logs (the oldest beyond are forgotten).
    pub max_ended_workers: usize,
    /// Envs nothing holds remembered for the fast path (the least recently used beyond
    /// are forgotten; the store keeps them).
    pub max_idle_envs: usize,
    /// Remote URI prefixes requests may name (`--allow-remote`).
    pub allow_remote: crate::remote::AllowList,
    /// Builds one uid (not root or the daemon's user) may have in flight at once.
    pub max_builds_per_uid: usize,
    /// Builds running at once, all callers together; more wait in arrival order.
    pub max_concurrent_builds: usize,
    /// A stopping daemon leaves its workers running (`--live-restore`).
    pub live_restore: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves until SIGTERM or SIGINT, then stops accepting, stops workers (unless
/// `--live-restore`) and removes the socket.
///
/// What it knows that must outlive it is saved in the store's state database before a
/// request is answered (references, workers and their GPUs; see [`journal`]), and taken
/// back when it starts: envs found again and re-leased, running workers adopted from
/// their supervisors ([`crate::supervisor`]).
pub async fn serve(
    config: DaemonConfig,
    store: Store,
    policy: VenvPolicy,
    remotes: crate::remote::Remotes,
) -> Result<(), DaemonError> {
    // Handlers first: a stop that comes as soon as the socket exists still removes it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let access = socket::Access {
        uids: config.allow_uids.clone(),
        gids: config.allow_gids.clone(),
    };
    // The callers' workers run in the store's entries; no one else may look into it.
    // The build user writes its builds there too.
    let reach: Vec<u32> = config
        .allow_uids
        .iter()
        .copied()
        .chain(policy.build_user.map(|user| user.uid))
        .collect();
    // One daemon a store: two would adopt each other's workers and number new ones alike.
    // A daemon that has just exited may still share the lock for a moment (a child it was
    // starting, not yet exec'd, holds a copy of its descriptors): wait a little for it.
    let _serving = crate::store::LockFile::acquire(
        &store.layout().lock_path(crate::store::LockName::Daemon),
        crate::store::LockMode::Exclusive,
        Some(Duration::from_secs(5)),
    )
    .map_err(|e| match e {
        crate::store::StoreError::LockTimeout { .. } => crate::store::StoreError::Busy(format!(
            "another renv daemon serves the store at {}; one store has one daemon",
            store.root().display()
        )),
        e => e,
    })?;
    store.grant_traverse(&reach, &config.allow_gids)?;
    let listener = socket::bind(&config.socket, &access)?;
    let listener = UnixListener::from_std(listener)?;
    let pool = GpuPool::new(&config.gpus);
    // What a previous daemon saved, read before anything new is saved.
    let db = crate::store::state_db::StateDb::open(store.layout())?;
    let saved = db.load()?;
    db.checkpoint_manually()?;
    let daemon = Arc::new(Daemon::new(
        Arc::new(store),
        policy,
        Arc::new(remotes),
        config.allow_remote.clone(),
        config.max_idle_envs,
        state::BuildLimits {
            per_uid: config.max_builds_per_uid,
            at_once: config.max_concurrent_builds,
        },
        journal::Journal::start(db),
    ));
    let restored = daemon
        .restore(saved.envs, saved.refs)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let workers = Arc::new(Workers::new(
        Arc::clone(&daemon),
        pool,
        config.zero_gpus,
        config.stop_grace,
        config.max_ended_workers,
    )?);
    let (adopted, ended_meanwhile) = workers.restore(saved.workers, saved.next_worker).await;
    workers.refill_spares();
    tracing::info!(
        socket = %config.socket.display(),
        gpus = ?workers.all_gpus(),
        restored_envs = restored,
        lost_references = daemon.lost_reference_count(),
        adopted_workers = adopted,
        workers_ended_meanwhile = ended_meanwhile,
        "renv daemon listening"
    );
    if let Some(max) = config.max_store_size {
        tokio::spawn(collect_garbage(Arc::clone(&daemon), max, config.gc_min_age));
    }
    let limits = routes::Limits {
        max_json_bytes: config.max_json_bytes,
        idle: config.header_timeout,
        body_timeout: config.body_timeout,
    };
    let app = routes::router(Arc::clone(&daemon), Arc::clone(&workers), limits);
    let peers = peer::PeerPolicy {
        me: crate::sys::geteuid(),
        uids: config.allow_uids.clone(),
        gids: config.allow_gids.clone(),
    };
    let admission =
        connections::Admission::new(peers, config.max_connections, config.max_connections_per_uid);
    let refusing = Arc::new(connections::Refusals::default());

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off rather than spin on a full table.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cred = peer::PeerCred::of(&stream);
        let uid = cred.as_ref().map_or(u32::MAX, |cred| cred.uid);
        // Before a byte is read: a refused peer, a uid at its cap or a full daemon is
        // answered at once and holds nothing.
        let admitted = match admission.admit(cred) {
            Ok(admitted) => admitted,
            Err(refused) => {
                tracing::debug!(uid, reason = refused.kind(), "connection refused");
                // Answering takes a descriptor for a while: a few at once per uid, a
                // few dozen in all; past that (a flood) a refusal is closed unanswered.
                if let Some(slot) = refusing.take(uid) {
                    tokio::spawn(async move {
                        connections::refuse(stream, refused).await;
                        drop(slot);
                    });
                }
                continue;
            }
        };
        let app = app.clone();
        let timeout = config.header_timeout;
        tokio::spawn(async move {
            let caller = Arc::clone(&admitted.caller);
            let service =
                hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    let caller = caller.clone();
                    async move {
                        let mut request = request.map(axum::body::Body::new);
                        request.extensions_mut().insert(caller);
                        Ok::<_, std::convert::Infallible>(
                            app.oneshot(request).await.unwrap_or_else(|never| match never {}),
                        )
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(timeout)
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
            // The connection's slot and its uid's place go back only now.
            drop(admitted);
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&config.socket);
    if config.live_restore {
        tracing::info!(
            running = workers.live(),
            "shutting down; workers keep running (--live-restore)"
        );
    } else {
        tracing::info!("shutting down: stopping workers");
        workers.stop_all().await;
    }
    Ok(())
}

/// The daemon's own collector (kubelet-style watermarks): after every build that created
/// entries and once a minute, if the store is over `max`, prune it down to 90% of `max`.
/// Entries the daemon references or runs workers in are leased, so prune skips them.
async fn collect_garbage(daemon: Arc<Daemon>, max: u64, min_age: Duration) {
    loop {
        tokio::select! {
            _ = daemon.gc_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        let store = Arc::clone(&daemon.store);
        let result = tokio::task::spawn_blocking(move || {
            // From the markers alone: listing entries also scans /proc for their users.
            let total: u64 = crate::store::EntryKind::ALL
                .iter()
                .map(|&kind| store.bytes_of(kind))
                .sum();
            if total <= max {
                return Ok(None);
            }
            let low = max / 10 * 9;
            let policy = crate::store::prune::PrunePolicy {
                max_size: Some(low),
                min_age,
                ..Default::default()
            };
            crate::maintenance::prune(&store, &policy).map(Some)
        })
        .await;
        match result {
            Ok(Ok(Some(report))) => tracing::info!(
                removed = report.store.removed.len(),
                bytes_freed = report.store.bytes_freed,
                "store over --max-store-size: pruned"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "garbage collection panicked"),
        }
    }
}
