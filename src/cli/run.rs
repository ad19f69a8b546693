//! `renv run ENV.json [--gpus 0,1] -- CMD…`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{RemoteArgs, StoreArgs, VenvArgs};
use crate::build::build_env;
use crate::error::Error;
use crate::progress::Progress;
use crate::spec::RuntimeEnvSpec;
use crate::worker;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The runtime_env JSON file (`-` for stdin).
    spec: PathBuf,
    /// GPU ids for the command: sets CUDA_VISIBLE_DEVICES (sorted) and CUDA_DEVICE_ORDER.
    /// Without it, CUDA_VISIBLE_DEVICES is left as inherited.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    gpus: Option<Vec<u32>>,
    /// The command and its arguments (no shell).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    venv: VenvArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// Builds, leases, runs; returns the command's exit code.
pub fn run(args: RunArgs) -> Result<u8, Error> {
    let (text, base_dir) = super::build::read_spec(&args.spec)?;
    let spec = RuntimeEnvSpec::from_json(&text)?;
    let timeout = spec.config.setup_timeout_seconds.map(Duration::from_secs);
    let store = args.store.open(timeout)?;
    let remotes = args.remote.remotes()?;
    let policy = args.venv.policy();
    let progress = Progress::for_stderr();
    // An entry pruned between the build and the lease is built again.
    let (built, leases) = loop {
        let built = build_env(&spec, &base_dir, &store, &policy, &remotes, &progress)?;
        if let Some(leases) = built.lease(&store)? {
            break (built, leases);
        }
    };
    // The command inherits the leases too: they hold while it runs even if renv is killed.
    let inherited = leases
        .iter()
        .map(|lease| lease.dup())
        .collect::<Result<Vec<_>, _>>()?;
    let base_env = std::env::vars().collect();
    let context = built.context_for(&store, crate::sys::geteuid(), crate::sys::getegid())?;
    let mut cmd = worker::command(&context, &base_env, &args.command, args.gpus.as_deref())?;
    crate::sys::inherit_in_child(&mut cmd, inherited);
    Ok(worker::run_foreground(cmd)?)
}
