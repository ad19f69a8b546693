//! The context a worker runs in: interpreter, working directory and environment.
//! A pure function of the resolved parts; nothing here touches the disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// What a package is to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageRole {
    /// The worker's cwd, and first on its `PYTHONPATH`.
    WorkingDir,
    /// On `PYTHONPATH`, after the working_dir (Ray's `py_modules`).
    PyModule,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Context {
    /// The venv's interpreter; `None` when the env has no packages (the worker's own).
    pub python: Option<PathBuf>,
    /// The unpacked working_dir, if the env has one.
    pub cwd: Option<PathBuf>,
    /// Variables renv adds to or changes in the worker's base environment. Values may hold
    /// `${VAR}`, expanded against that base environment when the worker starts (as in
    /// Ray): `PATH` is `<venv>/bin:${PATH}`.
    pub env: BTreeMap<String, String>,
}

impl Context {
    /// `packages`: the env's unpacked packages, in the order the worker sees them.
    pub fn new(
        packages: &[(PackageRole, &Path)],
        venv: Option<&Path>,
        env_vars: &BTreeMap<String, String>,
    ) -> Context {
        let mut env = env_vars.clone();
        let working_dir = packages
            .iter()
            .find(|(role, _)| *role == PackageRole::WorkingDir)
            .map(|(_, path)| *path);
        // The working_dir comes first on PYTHONPATH, then py_modules, then whatever the
        // user asked for.
        let mut python_path: Vec<String> = working_dir.iter().map(|p| p.display().to_string()).collect();
        python_path.extend(
            packages
                .iter()
                .filter(|(role, _)| *role == PackageRole::PyModule)
                .map(|(_, path)| path.display().to_string()),
        );
        if !python_path.is_empty() {
            env.insert(
                "PYTHONPATH".into(),
                prepend(&python_path.join(":"), env_vars.get("PYTHONPATH"), None),
            );
        }
        if let Some(venv) = venv {
            let bin = venv.join("bin").display().to_string();
            env.insert(
                "PATH".into(),
                prepend(&bin, env_vars.get("PATH"), Some("${PATH}")),
            );
            env.insert("VIRTUAL_ENV".into(), venv.display().to_string());
        }
        Context {
            python: venv.map(|v| v.join("bin").join("python")),
            cwd: working_dir.map(Path::to_path_buf),
            env,
        }
    }

    /// This context with the bytecode cache `pycache` (`PYTHONPYCACHEPREFIX`): for the
    /// workers of one user, in an env built without compiled bytecode. The spec's own
    /// `env_vars` still decide.
    pub fn with_pycache(&self, pycache: &Path) -> Context {
        let mut context = self.clone();
        let env = &mut context.env;
        if !env.contains_key("PYTHONPYCACHEPREFIX") {
            env.insert("PYTHONPYCACHEPREFIX".into(), pycache.display().to_string());
            // A node (or container image) sets PYTHONDONTWRITEBYTECODE to keep bytecode out
            // of source trees; renv's cache is no source tree, and without writes every
            // worker start recompiles all it imports (`import ray`: 0.6 s → 2 s). An empty
            // value turns it off.
            env.entry("PYTHONDONTWRITEBYTECODE".into()).or_default();
        }
        context
    }

    /// The worker's full environment: `base` with this context applied, `${VAR}`
    /// expanded against `base`.
    pub fn worker_env(&self, base: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut out = base.clone();
        for (name, value) in &self.env {
            out.insert(name.clone(), expand(value, base));
        }
        out
    }
}

fn prepend(first: &str, user: Option<&String>, default: Option<&str>) -> String {
    match user.map(String::as_str).filter(|v| !v.is_empty()).or(default) {
        Some(rest) => format!("{first}:{rest}"),
        None => first.to_string(),
    }
}

/// Replaces each `${NAME}` with its value in `base` (empty when unset), as Ray does.
pub fn expand(value: &str, base: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        out.push_str(&rest[..start]);
        if valid {
            out.push_str(base.get(name).map_or("", String::as_str));
        } else {
            out.push_str(&rest[start..start + 3 + len]);
        }
        rest = &rest[start + 3 + len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn working_dir_goes_first_on_pythonpath() {
        let vars = map(&[("PYTHONPATH", "/opt/lib"), ("A", "b")]);
        let packages = [
            (PackageRole::PyModule, Path::new("/store/pkgs/m")),
            (PackageRole::WorkingDir, Path::new("/store/pkgs/x")),
        ];
        let ctx = Context::new(&packages, None, &vars);
        assert_eq!(ctx.env["PYTHONPATH"], "/store/pkgs/x:/store/pkgs/m:/opt/lib");
        assert_eq!(ctx.env["A"], "b");
        assert_eq!(ctx.cwd.as_deref(), Some(Path::new("/store/pkgs/x")));
        let bare = Context::new(&[], None, &vars);
        assert_eq!(bare.env, vars);
    }

    #[test]
    fn venv_goes_first_on_path_and_expands_against_the_base() {
        let ctx = Context::new(
            &[],
            Some(Path::new("/store/envs/k")),
            &map(&[("X", "${HOME}/x:${NOPE}")]),
        );
        assert!(!ctx.env.contains_key("PYTHONPYCACHEPREFIX"));
        let mine = ctx.with_pycache(Path::new("/store/pycache/1000"));
        assert_eq!(mine.env["PYTHONPYCACHEPREFIX"], "/store/pycache/1000");
        assert_eq!(mine.env["PYTHONDONTWRITEBYTECODE"], "");
        assert_eq!(ctx.python.as_deref(), Some(Path::new("/store/envs/k/bin/python")));
        assert_eq!(ctx.env["PATH"], "/store/envs/k/bin:${PATH}");
        assert_eq!(ctx.env["VIRTUAL_ENV"], "/store/envs/k");
        let worker = ctx.worker_env(&map(&[("PATH", "/usr/bin"), ("HOME", "/home/u")]));
        assert_eq!(worker["PATH"], "/store/envs/k/bin:/usr/bin");
        assert_eq!(worker["X"], "/home/u/x:");
        assert_eq!(worker["HOME"], "/home/u");
        assert_eq!(
            expand("${bad name} $PLAIN ${", &map(&[])),
            "${bad name} $PLAIN ${"
        );
    }
}
