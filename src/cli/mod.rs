//! The `renv` command line: argument definitions here, one file per command.

mod build;
mod daemon;
mod gc;
mod jobs;
mod package;
mod run;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::env_vars;
use crate::error::Error;
use crate::package::zip_read::UnpackLimits;
use crate::store::{Store, StoreOptions};
use crate::venv::{IndexConfig, InstallerChoice, VenvPolicy};

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
    /// Build, then run a command in the env, holding it leased until the command exits.
    Run(run::RunArgs),
    /// Serve the API on a Unix socket: envs, packages, workers with GPUs.
    Daemon(daemon::DaemonArgs),
    /// Start a job through the daemon (packaging a local working_dir) and follow it.
    Submit(jobs::SubmitArgs),
    /// Show a job's state.
    Status(jobs::IdArgs),
    /// Print a job's output.
    Logs(jobs::LogsArgs),
    /// Stop a job: SIGTERM to its process group, SIGKILL after a grace period.
    Stop(jobs::IdArgs),
    /// List the daemon's jobs.
    Ps(jobs::PsArgs),
    /// List the store's entries: size, age, last use, who holds them, what they hold.
    Ls(gc::LsArgs),
    /// Evict least-recently-used entries (cron-safe: leased entries are never touched).
    Prune(gc::PruneArgs),
    /// Re-check every entry against its digest / build record; --repair removes damage.
    Verify(gc::VerifyArgs),
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

/// Where packages this node lacks come from.
#[derive(Debug, Args)]
struct RemoteArgs {
    /// The cluster-wide package store: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `file:///shared/dir`. A `pkg://<digest>` missing locally is fetched from
    /// `<remote>/pkgs/<digest>.zip` and checked against its digest. Credentials and
    /// endpoints come from the environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS).
    #[arg(long, env = env_vars::RENV_REMOTE, value_name = "URL")]
    remote: Option<String>,
    /// Seconds a remote request may send nothing before it fails (and is retried); a whole
    /// download may take this plus a second per 256 KiB its object holds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    remote_idle_timeout_seconds: u64,
}

impl RemoteArgs {
    fn remotes(&self) -> Result<crate::remote::Remotes, Error> {
        let shared = self
            .remote
            .as_deref()
            .filter(|r| !r.is_empty())
            .map(crate::remote::SharedRemote::parse)
            .transpose()
            .map_err(|e| crate::spec::SpecError::new("--remote", e.to_string()))?;
        let options = crate::remote::RemoteOptions {
            idle_timeout: std::time::Duration::from_secs(self.remote_idle_timeout_seconds),
            ..Default::default()
        };
        Ok(crate::remote::Remotes::new(shared, options))
    }
}

/// Node policy for virtualenvs: which interpreter and installer, where packages come from.
#[derive(Debug, Args)]
struct VenvArgs {
    /// Base interpreter for virtualenvs (default: `python3` from PATH, resolved to its real path).
    #[arg(long, env = env_vars::RENV_PYTHON, value_name = "PATH")]
    python: Option<PathBuf>,
    /// The uv binary (default: `uv` on PATH if it is the pinned version, else bootstrapped into the store).
    #[arg(long, env = env_vars::RENV_UV, value_name = "PATH")]
    uv: Option<PathBuf>,
    /// `auto`: uv unless a spec sets pip_version; `pip`: python -m venv + pip for every env.
    #[arg(long, env = env_vars::RENV_INSTALLER, value_enum, default_value_t = InstallerChoice::Auto)]
    installer: InstallerChoice,
    /// Package index URL.
    #[arg(long, env = env_vars::RENV_INDEX_URL, value_name = "URL")]
    index_url: Option<String>,
    /// Extra package index URL (repeatable).
    #[arg(long, env = env_vars::RENV_EXTRA_INDEX_URL, value_name = "URL", value_delimiter = ',')]
    extra_index_url: Vec<String>,
    /// A wheel directory or links page (repeatable).
    #[arg(long, env = env_vars::RENV_FIND_LINKS, value_name = "PATH|URL", value_delimiter = ',')]
    find_links: Vec<String>,
    /// Use no index: only --find-links.
    #[arg(long, env = env_vars::RENV_NO_INDEX)]
    no_index: bool,
    /// An install option requests may use in pip_install_options / uv_pip_install_options (repeatable).
    #[arg(long = "allow-install-option", env = env_vars::RENV_ALLOW_INSTALL_OPTIONS, value_name = "OPTION", value_delimiter = ',')]
    allowed_install_options: Vec<String>,
    /// Let `name @ https://…` requirements bypass --no-index / --index-url.
    #[arg(long, env = env_vars::RENV_ALLOW_DIRECT_URLS)]
    allow_direct_urls: bool,
    /// Let venvs see the base interpreter's site-packages (e.g. so Ray workers can import ray).
    #[arg(long, env = env_vars::RENV_SYSTEM_SITE_PACKAGES)]
    system_site_packages: bool,
    /// Compile all bytecode when an env is built, instead of lazily in a per-env cache.
    #[arg(long, env = env_vars::RENV_COMPILE_BYTECODE)]
    compile_bytecode: bool,
}

impl VenvArgs {
    fn policy(&self) -> VenvPolicy {
        VenvPolicy {
            python: self.python.clone(),
            uv: self.uv.clone(),
            installer: self.installer,
            index: IndexConfig {
                index_url: self.index_url.clone(),
                extra_index_urls: self.extra_index_url.clone(),
                // Local wheel directories as absolute paths: the installer runs elsewhere.
                find_links: self
                    .find_links
                    .iter()
                    .map(|link| absolute_unless_url(link))
                    .collect(),
                no_index: self.no_index,
            },
            allowed_install_options: self.allowed_install_options.clone(),
            allow_direct_urls: self.allow_direct_urls,
            system_site_packages: self.system_site_packages,
            compile_bytecode: self.compile_bytecode,
            // The CLI's installers run as whoever runs renv (see `renv daemon --build-user`).
            build_user: None,
            build_for: None,
        }
    }
}

fn absolute_unless_url(link: &str) -> String {
    if link.contains("://") {
        return link.to_string();
    }
    std::path::absolute(link).map_or_else(|_| link.to_string(), |p| p.display().to_string())
}

impl StoreArgs {
    fn threads(&self) -> usize {
        self.threads
            .filter(|n| *n > 0)
            .unwrap_or_else(crate::package::worker_threads)
    }

    /// The store root directory (not yet opened).
    fn dir(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(env_vars::default_store_dir)
    }

    fn unpack_limits(&self) -> UnpackLimits {
        UnpackLimits {
            max_bytes: self.max_unpacked_bytes,
            max_entries: self.max_zip_entries,
        }
    }

    fn open(&self, lock_timeout: Option<std::time::Duration>) -> Result<Store, Error> {
        let dir = self.dir();
        let options = StoreOptions {
            lock_timeout,
            threads: self.threads(),
            unpack_limits: self.unpack_limits(),
        };
        Ok(Store::open(&dir, options)?)
    }
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    // A worker's supervisor, started by the daemon: before any parsing, as it is on the
    // path of every worker start.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == crate::supervisor::ARG)
    {
        return crate::supervisor::main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(args) => build::run(args),
        Command::Package(args) => package::run(args),
        Command::Run(args) => match run::run(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Daemon(args) => daemon::run(args),
        Command::Submit(args) => match jobs::submit(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Status(args) => jobs::status(args),
        Command::Logs(args) => jobs::logs(args),
        Command::Stop(args) => jobs::stop(args),
        Command::Ps(args) => jobs::ps(args),
        Command::Ls(args) => gc::ls(args),
        Command::Prune(args) => gc::prune(args),
        Command::Verify(args) => match gc::verify(args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
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
