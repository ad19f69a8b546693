//! The installer's wheel caches (`<store>/store-v1/uv-cache`, and `uv-cache-<uid>` of a
//! build user): builds hold `locks/uv-cache.lock` shared while they use one; pruning
//! takes it exclusively and non-blocking, so a concurrent install never loses a file it is
//! about to link. A build user's cache is pruned by uv running as that user: root never
//! works inside a directory someone else can write.

use std::path::PathBuf;

use super::installer::UV_VERSION;
use crate::store::{LockMode, LockName, Store};

/// `uv cache prune` on the store's uv caches, unless a build is using them. Says what
/// happened, for `renv prune`'s report.
pub fn prune(store: &Store) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut caches = vec![(store.layout().uv_cache_dir(), None)];
    if let Ok(entries) = std::fs::read_dir(store.root()) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(uid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("uv-cache-"))
                .and_then(|u| u.parse().ok())
            else {
                continue;
            };
            // lstat: a real directory of that very user, or it is not one of ours.
            if let Ok(meta) = entry.path().symlink_metadata()
                && meta.is_dir()
                && meta.uid() == uid
            {
                caches.push((entry.path(), Some((uid, meta.gid()))));
            }
        }
    }
    let outcomes: Vec<String> = caches
        .into_iter()
        .filter(|(cache, _)| cache.join("CACHEDIR.TAG").exists())
        .map(|(cache, owner)| prune_one(store, &cache, owner))
        .collect();
    match outcomes.is_empty() {
        true => "empty".into(),
        false => outcomes.join("; "),
    }
}

fn prune_one(store: &Store, cache: &std::path::Path, owner: Option<(u32, u32)>) -> String {
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
    let mut cmd = std::process::Command::new(&uv);
    if let Some((uid, gid)) = owner {
        crate::sys::run_as(&mut cmd, uid, gid, &[]);
    }
    let status = cmd
        .args(["cache", "prune", "--quiet", "--no-config", "--cache-dir"])
        .arg(cache)
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
