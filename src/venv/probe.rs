//! Asking a binary about itself (`python -c …`, `uv --version`), cached by the binary's
//! stat: a rebuild that reuses an existing env must not start an interpreter (that alone
//! costs more than the whole build), yet an upgraded binary must be noticed. The cache
//! entry is keyed by the binary's inode, size, mode, mtime and ctime, like the hash cache.

use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::VenvError;
use crate::digest::Digest;
use crate::package::hash_cache::StatKey;

#[derive(Serialize, Deserialize)]
struct Probe {
    stamp: StatKey,
    args: Vec<String>,
    output: String,
}

/// Runs `binary args…` (or returns its cached stdout) and returns stdout, trimmed. The
/// binary gets a minimal environment unless `inherit_env` (a shim needs the user's).
pub fn probe(
    cache_dir: Option<&Path>,
    binary: &Path,
    args: &[&str],
    inherit_env: bool,
) -> Result<String, VenvError> {
    use std::os::unix::ffi::OsStrExt;
    let meta = fs_err::metadata(binary)?;
    let stamp = StatKey::of(&meta);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let key = [binary.as_os_str().as_bytes(), b"\0", args.join("\0").as_bytes()].concat();
    let cache_path = cache_dir.map(|dir| dir.join(format!("{}.json", Digest::of(&key))));
    if let Some(path) = &cache_path
        && let Some(cached) = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Probe>(&b).ok())
        && cached.stamp == stamp
        && cached.args == args
    {
        return Ok(cached.output);
    }
    let mut cmd = Command::new(binary);
    cmd.args(&args).stdin(Stdio::null());
    if !inherit_env {
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LC_ALL", "C.UTF-8");
    }
    let out = cmd.output().map_err(|e| VenvError::Probe {
        binary: binary.to_path_buf(),
        reason: e.to_string(),
    })?;
    if !out.status.success() {
        let reason = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(VenvError::Probe {
            binary: binary.to_path_buf(),
            reason,
        });
    }
    let output = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if let Some(path) = cache_path {
        let probe = Probe {
            stamp,
            args,
            output: output.clone(),
        };
        if let Ok(tmp) = tempfile::NamedTempFile::new_in(path.parent().expect("cache dir")) {
            // Best effort: a lost cache entry costs one more probe.
            let _ = serde_json::to_writer(tmp.as_file(), &probe).map(|()| tmp.persist(&path));
        }
    }
    Ok(output)
}
