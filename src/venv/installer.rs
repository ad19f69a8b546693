//! The installer: a pinned uv binary (never uv's crates, which are not a stable library),
//! or pip for specs that ask for it.
//!
//! uv is found, in order: `--uv` / `RENV_UV` (any version: it is part of the env key),
//! `uv` on `PATH` if its version is the pin, or `<store>/tools/uv-<version>/bin/uv`,
//! bootstrapped there once with `python -m pip install --target` under a lock and checked
//! with `uv --version` before it is moved into place.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::VenvError;
use super::interpreter::Interpreter;
use super::probe::probe;
use super::sandbox::Sandbox;
use crate::store::{LockFile, LockMode, LockName, Store};

/// The uv version renv is tested with and bootstraps.
pub const UV_VERSION: &str = "0.13.9";

/// Which installer builds an env; part of the env key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Installer {
    Uv {
        #[serde(skip)]
        path: PathBuf,
        version: String,
    },
    /// `python -m venv` + pip, optionally upgraded to `pip<pip_version>` first.
    Pip { pip_version: Option<String> },
}

/// `uv --version` → `0.13.9`.
pub fn uv_version(uv: &Path, cache_dir: &Path) -> Result<String, VenvError> {
    let out = probe(Some(cache_dir), uv, &["--version"], false)?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| VenvError::Probe {
            binary: uv.to_path_buf(),
            reason: format!("unexpected {out:?}"),
        })
}

/// Finds uv `version` (or the operator's `explicit` one), bootstrapping it if needed.
pub fn find_uv(
    explicit: Option<&Path>,
    version: &str,
    store: &Store,
    python: &Interpreter,
    bootstrap_args: &[String],
    timeout: Option<Duration>,
) -> Result<Installer, VenvError> {
    let cache = store.layout().probe_cache_dir();
    if let Some(uv) = explicit {
        let version = uv_version(uv, &cache)?;
        return Ok(Installer::Uv {
            path: uv.to_path_buf(),
            version,
        });
    }
    if let Ok(uv) = which::which("uv")
        && uv_version(&uv, &cache).is_ok_and(|v| v == version)
    {
        return Ok(Installer::Uv {
            path: uv,
            version: version.to_string(),
        });
    }
    let tool_dir = store.layout().tool_dir(&format!("uv-{version}"));
    let uv = tool_dir.join("bin").join("uv");
    if !uv.exists() {
        bootstrap_uv(version, store, &tool_dir, python, bootstrap_args, timeout)?;
    }
    Ok(Installer::Uv {
        path: uv,
        version: version.to_string(),
    })
}

fn bootstrap_uv(
    version: &str,
    store: &Store,
    tool_dir: &Path,
    python: &Interpreter,
    index_args: &[String],
    timeout: Option<Duration>,
) -> Result<(), VenvError> {
    let lock_path = store.layout().lock_path(LockName::Tool(&format!("uv-{version}")));
    let _lock = LockFile::acquire(&lock_path, LockMode::Exclusive, timeout)?;
    if tool_dir.join("bin").join("uv").exists() {
        return Ok(());
    }
    let work = tempfile::Builder::new()
        .prefix(".uv-bootstrap-")
        .tempdir_in(tool_dir.parent().unwrap())?;
    let target = work.path().join("target");
    let log = store
        .layout()
        .logs_dir()
        .join(format!("bootstrap-uv-{version}.log"));
    let mut sandbox = Sandbox::new(work.path(), log, timeout, None)?;
    let requirement = format!("uv=={version}");
    // `--isolated`: no user config, no PIP_* variables; the node's site-wide config
    // (/etc/pip.conf: CA bundle, mirror) is the operator's and still applies.
    let mut args: Vec<&OsStr> = [
        "-I",
        "-m",
        "pip",
        "install",
        "--isolated",
        "--quiet",
        "--no-input",
        "--disable-pip-version-check",
    ]
    .into_iter()
    .map(OsStr::new)
    .collect();
    args.extend(index_args.iter().map(OsStr::new));
    args.extend([
        OsStr::new("--target"),
        target.as_os_str(),
        OsStr::new(&requirement),
    ]);
    sandbox.run(
        "bootstrapping uv with pip (to use an installed uv instead, set --uv / RENV_UV)",
        &python.path,
        &args,
        &[],
    )?;
    let uv = target.join("bin").join("uv");
    let got = uv_version(&uv, &store.layout().probe_cache_dir())?;
    if got != version {
        return Err(VenvError::Probe {
            binary: uv,
            reason: format!("bootstrapped uv reports {got}, wanted {version}"),
        });
    }
    fs_err::rename(&target, tool_dir)?;
    Ok(())
}
