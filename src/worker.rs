//! Starting a command in a built env's context.
//!
//! argv only, never a shell: `argv[0]` is looked up on the *worker's* `PATH`, so `python`
//! means the venv's. GPUs become `CUDA_VISIBLE_DEVICES` (sorted, comma-joined) with
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`, the order `nvidia-smi` numbers devices in.

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::context::Context;
use crate::venv::interpreter::search_in;

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

/// A command ready to start: absolute program, full environment, cwd.
pub fn command(
    context: &Context,
    base_env: &BTreeMap<String, String>,
    argv: &[String],
    gpus: Option<&[u32]>,
) -> Result<Command, WorkerError> {
    let (program, args) = argv.split_first().ok_or(WorkerError::NoCommand)?;
    let mut env = context.worker_env(base_env);
    if let Some(gpus) = gpus {
        env.extend(gpu_env(gpus));
    }
    let program_path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        let path = env.get("PATH").map(String::as_str).unwrap_or("");
        search_in(Path::new(program), path.as_ref()).ok_or_else(|| WorkerError::NotFound(program.clone()))?
    };
    let mut cmd = Command::new(&program_path);
    cmd.arg0(program).args(args).env_clear().envs(&env);
    if let Some(cwd) = &context.cwd {
        cmd.current_dir(cwd);
    }
    Ok(cmd)
}

/// Runs `cmd` in the foreground and returns its exit code (128 + signal when killed).
///
/// It stays in renv's process group, so a terminal's Ctrl-C reaches it directly; signals
/// sent to renv itself by another process (a scheduler's SIGTERM, `kill -INT`) are
/// forwarded. Terminal-generated ones are not, or the command would get them twice.
pub fn run_foreground(mut cmd: Command) -> Result<u8, WorkerError> {
    const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
    // SAFETY: plain libc signal-set manipulation on a local set; pthread_sigmask affects
    // only this thread (and the threads it starts), which is what we want.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let program = PathBuf::from(cmd.get_program());
    let mut child = cmd
        .spawn()
        .map_err(|source| WorkerError::Spawn { program, source })?;
    let pid = child.id() as libc::pid_t;
    std::thread::spawn(move || {
        loop {
            // SAFETY: sigwaitinfo on a valid set with a zeroed siginfo to fill.
            let (sig, code) = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                let sig = libc::sigwaitinfo(&set, &mut info);
                (sig, info.si_code)
            };
            // si_code <= 0: sent by a process (kill, sigqueue), not by the terminal.
            if sig > 0 && code <= 0 {
                // SAFETY: signalling our own child; it is not reaped until main waits.
                unsafe {
                    libc::kill(pid, sig);
                }
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
