//! The `renv` command line: argument definitions here, one file per command.

mod build;
mod package;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::env_vars;
use crate::error::Error;
use crate::package::zip_read::UnpackLimits;
use crate::store::{Store, StoreOptions};

#[derive(Debug, Parser)]
#[command(
    name = "renv",
    version,
    about = "A runtime-environment agent for Python cluster workers"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build (or find) everything a runtime_env needs and print the worker context.
    Build(build::BuildArgs),
    /// Package a directory: put it in the store, or write a reproducible zip with -o.
    Package(package::PackageArgs),
}

/// Options shared by every command that opens the store.
#[derive(Debug, Args)]
struct StoreArgs {
    /// Store root directory.
    #[arg(long, env = env_vars::RENV_STORE, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Threads for hashing, copying and unpacking.
    #[arg(long, env = env_vars::RENV_THREADS, value_name = "N")]
    threads: Option<usize>,
    /// Most bytes one zip may unpack to.
    #[arg(long, env = env_vars::RENV_MAX_UNPACKED_BYTES, value_name = "BYTES", default_value_t = UnpackLimits::default().max_bytes)]
    max_unpacked_bytes: u64,
    /// Most entries one zip may hold.
    #[arg(long, env = env_vars::RENV_MAX_ZIP_ENTRIES, value_name = "N", default_value_t = UnpackLimits::default().max_entries)]
    max_zip_entries: usize,
}

impl StoreArgs {
    fn threads(&self) -> usize {
        self.threads
            .filter(|n| *n > 0)
            .unwrap_or_else(crate::package::worker_threads)
    }

    fn open(&self, lock_timeout: Option<std::time::Duration>) -> Result<Store, Error> {
        let dir = self.store.clone().unwrap_or_else(env_vars::default_store_dir);
        let options = StoreOptions {
            lock_timeout,
            threads: self.threads(),
            unpack_limits: UnpackLimits {
                max_bytes: self.max_unpacked_bytes,
                max_entries: self.max_zip_entries,
            },
        };
        Ok(Store::open(&dir, options)?)
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => build::run(args),
        Command::Package(args) => package::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Writes to stdout; a closed pipe (`renv … | head`) is not an error.
fn print_stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(Error::Io),
    }
}
