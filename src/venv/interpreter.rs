//! The base interpreter: found, resolved to its real path, and identified.
//!
//! `--python` / `RENV_PYTHON` or `python3` from `PATH`. A symlink is resolved to its
//! target; a script in the way (a pyenv or asdf shim) is asked for `sys.executable`, since
//! the env must point at the interpreter itself, not at a shim whose answer can change.
//! The identity — real path, version, implementation — is part of the env key.
//!
//! `--python` may name a virtualenv's interpreter (`<venv>/bin/python`: a node that runs
//! Ray from a virtualenv). Envs are then built on that venv's base interpreter, and the
//! venv's own site-packages are recorded too: with `--system-site-packages` an env sees
//! them after its own packages (see `super::link_parent_site_packages`), so `ray` stays
//! importable in workers without copying the venv.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::VenvError;
use super::probe::probe;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interpreter {
    /// The real path of the interpreter binary.
    pub path: PathBuf,
    /// `platform.python_version()`, e.g. `3.11.7`.
    pub version: String,
    /// `sys.implementation.name`, e.g. `cpython`.
    pub implementation: String,
    /// The site-packages of the virtualenv `--python` named, if it named one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_site_packages: Vec<PathBuf>,
}

/// The site-packages directories that belong to the venv itself (not its base's).
const VENV_SITE_PACKAGES: &str = "import json, site, sys; print(json.dumps([p for p in site.getsitepackages() if p.startswith(sys.prefix + '/')]))";

const IDENTIFY: &str = "import json, platform, sys; print(json.dumps({'version': platform.python_version(), 'implementation': sys.implementation.name}))";

/// Finds and identifies the base interpreter. `cache_dir` holds probe results.
pub fn find(requested: Option<&Path>, cache_dir: Option<&Path>) -> Result<Interpreter, VenvError> {
    let requested = requested.unwrap_or(Path::new("python3"));
    let found = if requested.components().count() > 1 || requested.is_absolute() {
        requested.to_path_buf()
    } else {
        which::which(requested).map_err(|_| VenvError::NoInterpreter(requested.to_path_buf()))?
    };
    let parent_site_packages = match found.parent().and_then(Path::parent) {
        Some(root) if root.join("pyvenv.cfg").is_file() => {
            probe_json(cache_dir, &found, &["-I", "-c", VENV_SITE_PACKAGES])?
        }
        _ => Vec::new(),
    };
    let mut real = fs_err::canonicalize(&found).map_err(|_| VenvError::NoInterpreter(found.clone()))?;
    if is_script(&real)? {
        // A shim: only running it says which interpreter it means (not cached).
        let exe = probe(
            None,
            &real,
            &["-c", "import os, sys; print(os.path.realpath(sys.executable))"],
            true,
        )?;
        real = fs_err::canonicalize(exe.trim())?;
    }
    #[derive(Deserialize)]
    struct Identity {
        version: String,
        implementation: String,
    }
    let id: Identity = probe_json(cache_dir, &real, &["-I", "-c", IDENTIFY])?;
    Ok(Interpreter {
        path: real,
        version: id.version,
        implementation: id.implementation,
        parent_site_packages,
    })
}

/// A probe whose answer is one JSON value.
fn probe_json<T: serde::de::DeserializeOwned>(
    cache_dir: Option<&Path>,
    binary: &Path,
    args: &[&str],
) -> Result<T, VenvError> {
    let out = probe(cache_dir, binary, args, false)?;
    serde_json::from_str(&out).map_err(|e| VenvError::Probe {
        binary: binary.to_path_buf(),
        reason: format!("unexpected answer {out:?}: {e}"),
    })
}

fn is_script(path: &Path) -> Result<bool, VenvError> {
    let mut head = [0u8; 2];
    let n = fs_err::File::open(path)?.read(&mut head)?;
    Ok(n == 2 && &head == b"#!")
}
