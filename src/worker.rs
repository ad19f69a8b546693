//! Starting a command in a built env's context.
//!
//! argv only, never a shell: `argv[0]` is looked up on the *worker's* `PATH`, so `python`
//! means the venv's. GPUs become `CUDA_VISIBLE_DEVICES` (sorted, comma-joined) with
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`, the order `nvidia-smi` numbers devices in.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::Command;

use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

use crate::context::Context;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no command given; put it after `--`")]
    NoCommand,
    #[error("{0}: command not found on the env's PATH")]
    NotFound(String),
    #[error("cannot start {program}: {source}", program = .program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The variables that hand GPUs to a worker.
pub fn gpu_env(gpus: &[u32]) -> Vec<(String, String)> {
    let mut ids = gpus.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    vec![
        ("CUDA_VISIBLE_DEVICES".into(), list),
        ("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()),
    ]
}

/// A command ready to start: absolute program, its argv, full environment, cwd. Plain
/// data, so a worker's supervisor can be handed it (see [`crate::supervisor`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Launch {
    pub program: PathBuf,
    /// `argv[0]` as given, then the arguments.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
}

impl Launch {
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg0(&self.argv[0])
            .args(&self.argv[1..])
            .env_clear()
            .envs(&self.env);
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    }
}

/// What starting `argv` in `context` runs: `argv[0]` found on the worker's `PATH`, the
/// environment `base_env` with the context's variables (and the GPUs') applied.
pub fn launch(
    context: &Context,
    base_env: &BTreeMap<String, String>,
    argv: &[String],
    gpus: Option<&[u32]>,
) -> Result<Launch, WorkerError> {
    let program = argv.first().ok_or(WorkerError::NoCommand)?;
    let mut env = context.worker_env(base_env);
    if let Some(gpus) = gpus {
        env.extend(gpu_env(gpus));
    }
    let program_path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        // Relative PATH entries mean the worker's directory, where it is started.
        let path = env.get("PATH").map(String::as_str).unwrap_or("");
        let mut search = which::WhichConfig::new()
            .binary_name(program.into())
            .custom_path_list(path.into());
        if let Some(cwd) = &context.cwd {
            search = search.custom_cwd(cwd.clone());
        }
        search
            .first_result()
            .map_err(|_| WorkerError::NotFound(program.clone()))?
    };
    Ok(Launch {
        program: program_path,
        argv: argv.to_vec(),
        env,
        cwd: context.cwd.clone(),
    })
}

/// A command ready to start (see [`launch`]).
pub fn command(
    context: &Context,
    base_env: &BTreeMap<String, String>,
    argv: &[String],
    gpus: Option<&[u32]>,
) -> Result<Command, WorkerError> {
    Ok(launch(context, base_env, argv, gpus)?.command())
}

/// Runs `cmd` in the foreground and returns its exit code (128 + signal when killed).
///
/// It stays in renv's process group, so a terminal's Ctrl-C reaches it directly; signals
/// sent to renv itself by another process (a scheduler's SIGTERM, `kill -INT`) are
/// forwarded. Terminal-generated ones are not, or the command would get them twice.
pub fn run_foreground(mut cmd: Command) -> Result<u8, WorkerError> {
    // Handlers go in before the spawn, so a signal sent meanwhile is held for the loop
    // below. exec resets handled signals to their defaults in the child; a signal this
    // process ignores (nohup, a background job) is left alone, so the child inherits that.
    let forwarded: Vec<_> = [SIGINT, SIGTERM, SIGHUP, SIGQUIT]
        .into_iter()
        .filter(|&sig| !crate::sys::is_ignored(sig))
        .collect();
    let mut signals = SignalsInfo::<WithOrigin>::new(&forwarded)?;
    let program = PathBuf::from(cmd.get_program());
    let mut child = cmd
        .spawn()
        .map_err(|source| WorkerError::Spawn { program, source })?;
    let pid = child.id() as i32;
    std::thread::spawn(move || {
        for origin in signals.forever() {
            // Sent by a process (kill, tkill, sigqueue) rather than by the kernel, as a
            // terminal's Ctrl-C is: that one already reached the child in our group.
            if let Cause::Sent(_) = origin.cause {
                let _ = crate::sys::kill(pid, origin.signal);
            }
        }
    });
    let status = child.wait()?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn argv0_is_the_first_executable_regular_file_on_the_workers_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            d
        };
        let (plain, subdir, exec, wd) = (dir("plain"), dir("subdir"), dir("exec"), dir("wd"));
        std::fs::write(plain.join("tool"), "").unwrap();
        std::fs::create_dir(subdir.join("tool")).unwrap();
        std::fs::write(exec.join("tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(exec.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(wd.join("rel")).unwrap();
        std::fs::write(wd.join("rel/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(wd.join("rel/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();

        let path = |dirs: &[&Path]| {
            let base = [(
                "PATH".to_string(),
                std::env::join_paths(dirs).unwrap().into_string().unwrap(),
            )];
            BTreeMap::from(base)
        };
        let context = Context::new(&[], None, &BTreeMap::new());
        let argv = ["tool".to_string(), "x".to_string()];
        let cmd = command(&context, &path(&[&plain, &subdir, &exec]), &argv, None).unwrap();
        assert_eq!(cmd.get_program(), exec.join("tool"));

        // A relative entry is the worker's directory's, and the result is absolute.
        let context = Context::new(
            &[(crate::context::PackageRole::WorkingDir, wd.as_path())],
            None,
            &BTreeMap::new(),
        );
        let cmd = command(&context, &path(&[&plain, Path::new("rel")]), &argv, None).unwrap();
        assert_eq!(cmd.get_program(), wd.join("rel/tool"));

        let err = command(&context, &path(&[&plain, &subdir]), &argv, None).unwrap_err();
        assert_eq!(err.to_string(), "tool: command not found on the env's PATH");
    }
}
