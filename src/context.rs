//! The context a worker runs in: interpreter, working directory and environment.
//! A pure function of the resolved parts; nothing here touches the disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Context {
    /// The venv's interpreter; `None` until the env has packages (then the worker's own).
    pub python: Option<PathBuf>,
    /// The unpacked working_dir, if the env has one.
    pub cwd: Option<PathBuf>,
    /// Variables renv adds to or changes in the worker's base environment. Values may hold
    /// `${VAR}`, expanded against that base environment when the worker starts (as in Ray).
    pub env: BTreeMap<String, String>,
}

impl Context {
    pub fn new(
        working_dir: Option<&Path>,
        python: Option<&Path>,
        env_vars: &BTreeMap<String, String>,
    ) -> Context {
        let mut env = env_vars.clone();
        if let Some(wd) = working_dir {
            // The working_dir comes first on PYTHONPATH, then whatever the user asked for.
            let wd = wd.display().to_string();
            let value = match env_vars.get("PYTHONPATH") {
                Some(user) if !user.is_empty() => format!("{wd}:{user}"),
                _ => wd,
            };
            env.insert("PYTHONPATH".into(), value);
        }
        Context {
            python: python.map(Path::to_path_buf),
            cwd: working_dir.map(Path::to_path_buf),
            env,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_dir_goes_first_on_pythonpath() {
        let vars = BTreeMap::from([
            ("PYTHONPATH".to_string(), "/opt/lib".to_string()),
            ("A".into(), "b".into()),
        ]);
        let ctx = Context::new(Some(Path::new("/store/pkgs/x")), None, &vars);
        assert_eq!(ctx.env["PYTHONPATH"], "/store/pkgs/x:/opt/lib");
        assert_eq!(ctx.env["A"], "b");
        assert_eq!(ctx.cwd.as_deref(), Some(Path::new("/store/pkgs/x")));
        let bare = Context::new(None, None, &vars);
        assert_eq!(bare.env, vars);
    }
}
