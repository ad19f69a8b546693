//! The installer's wheel caches: the store owner's own (`<store>/store-v1/uv-cache`) and
//! those lent to a build user's builds (`uv-cache-<b>-for-<c>`, see
//! [`super::sandbox::BuildSlot`]). Builds hold `locks/uv-cache.lock` shared while they use
//! one; pruning takes it exclusively and non-blocking, so a concurrent install never loses
//! a file it is about to link. The owner's cache is pruned by `uv cache prune`; a build
//! user's caches are written by untrusted code, so root never works inside them: each
//! goes whole (renamed to trash by its name in `store-v1`, removed without following a
//! link), and the next build for that caller starts a new one.

use std::path::PathBuf;

use super::installer::UV_VERSION;
use crate::store::layout::BUILD_CACHE_PREFIX;
use crate::store::{LockMode, LockName, Store};

/// Prunes the store's wheel caches, unless a build is using them. Says what happened, for
/// `renv prune`'s report.
pub fn prune(store: &Store) -> String {
    let Ok(Some(_exclusive)) = store.try_lock(LockName::UvCache, LockMode::Exclusive) else {
        return "skipped: a build is using it".into();
    };
    let mut outcome = Vec::new();
    let build_caches: Vec<String> = std::fs::read_dir(store.root())
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(BUILD_CACHE_PREFIX) && name.contains("-for-"))
        .collect();
    if !build_caches.is_empty() {
        let removed = build_caches
            .iter()
            .filter(|name| store.discard_named(name).is_ok())
            .count();
        outcome.push(format!("removed {removed} build caches"));
    }
    if store.layout().uv_cache_dir().join("CACHEDIR.TAG").exists() {
        outcome.push(prune_own(store));
    }
    match outcome.is_empty() {
        true => "empty".into(),
        false => outcome.join("; "),
    }
}

/// `uv cache prune` on the store owner's cache.
fn prune_own(store: &Store) -> String {
    let pinned = store
        .layout()
        .tool_dir(&format!("uv-{UV_VERSION}"))
        .join("bin/uv");
    let uv = std::env::var_os(crate::env_vars::RENV_UV)
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .or_else(|| pinned.exists().then_some(pinned))
        .or_else(|| which::which("uv").ok());
    let Some(uv) = uv else {
        return "skipped: no uv found (set RENV_UV)".into();
    };
    let status = std::process::Command::new(&uv)
        .args(["cache", "prune", "--quiet", "--no-config", "--cache-dir"])
        .arg(store.layout().uv_cache_dir())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => "pruned".into(),
        Ok(s) => format!("uv cache prune failed ({s})"),
        Err(e) => format!("cannot run {}: {e}", uv.display()),
    }
}
