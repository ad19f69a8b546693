//! `/metrics`: the daemon's counters and gauges in Prometheus' text format.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::IntoResponse;

use super::AppState;
use crate::daemon::packages::package_bytes;
use crate::daemon::state::now;

pub(super) async fn metrics(State(app): AppState) -> impl IntoResponse {
    let daemon = &app.daemon;
    let m = &daemon.metrics;
    let remote = &daemon.remotes.client.stats;
    let (refs, envs) = daemon.reference_counts();
    let live = app.workers.live();
    // Reads every package's marker: on the blocking pool, not the event loop.
    let store = Arc::clone(&daemon.store);
    let store_bytes = tokio::task::spawn_blocking(move || package_bytes(&store))
        .await
        .unwrap_or(0);
    let gauges: BTreeMap<&str, f64> = BTreeMap::from([
        ("renv_builds_total", m.builds.load(Ordering::Relaxed) as f64),
        // Builds holding one of --max-concurrent-builds' slots, and builds queued for one.
        (
            "renv_builds_running",
            m.builds_running.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_builds_waiting",
            m.builds_waiting.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_build_failures_total",
            m.build_failures.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_build_seconds_total",
            m.build_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        ),
        (
            "renv_cache_hits_total",
            m.cache_hits.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_env_requests_total",
            m.requests.load(Ordering::Relaxed) as f64,
        ),
        ("renv_env_references", refs as f64),
        ("renv_env_references_lost", daemon.lost_reference_count() as f64),
        ("renv_envs_known", envs as f64),
        (
            "renv_workers_started_total",
            m.workers_started.load(Ordering::Relaxed) as f64,
        ),
        ("renv_workers_live", live as f64),
        // 1 when each worker gets a cgroup (its whole tree is stopped), 0 when a worker's
        // tree is its process group.
        (
            "renv_worker_cgroups",
            f64::from(u8::from(app.workers.uses_cgroups())),
        ),
        ("renv_store_package_bytes", store_bytes as f64),
        // Objects fetched from remote storage (remote zips, the shared package store) and
        // packages pushed to the shared package store.
        (
            "renv_remote_downloads_total",
            remote.downloads.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_remote_download_bytes_total",
            remote.download_bytes.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_remote_uploads_total",
            remote.uploads.load(Ordering::Relaxed) as f64,
        ),
        // Saved state: writes (each answered only once committed) and the commits that
        // held them (several writes share one when requests come together).
        (
            "renv_state_writes_total",
            daemon.journal.writes.load(Ordering::Relaxed) as f64,
        ),
        (
            "renv_state_commits_total",
            daemon.journal.commits.load(Ordering::Relaxed) as f64,
        ),
        ("renv_uptime_seconds", now() - daemon.started_at),
    ]);
    let mut text = String::new();
    for (name, value) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        text.push_str(&format!("# TYPE {name} {kind}\n{name} {value}\n"));
    }
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
}
