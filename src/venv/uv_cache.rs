//! The installer's wheel cache (`<store>/store-v1/uv-cache`): builds hold
//! `locks/uv-cache.lock` shared while they use it; pruning takes it exclusively and
//! non-blocking, so a concurrent install never loses a file it is about to link.

use std::path::PathBuf;

use super::installer::UV_VERSION;
use crate::store::{LockMode, LockName, Store};

/// `uv cache prune` on the store's uv cache, unless a build is using it. Says what
/// happened, for `renv prune`'s report.
pub fn prune(store: &Store) -> String {
    let cache = store.layout().uv_cache_dir();
    if !cache.join("CACHEDIR.TAG").exists() {
        return "empty".into();
    }
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
    let Ok(Some(_exclusive)) = store.try_lock(LockName::UvCache, LockMode::Exclusive) else {
        return "skipped: a build is using it".into();
    };
    let status = std::process::Command::new(&uv)
        .args(["cache", "prune", "--quiet", "--no-config", "--cache-dir"])
        .arg(&cache)
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
