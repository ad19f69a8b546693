//! `renv daemon`: serve the API on a Unix socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{RemoteArgs, StoreArgs, VenvArgs};
use crate::daemon::gpus::{GpuSpec, ZeroGpus};
use crate::daemon::{DaemonConfig, serve};
use crate::env_vars;
use crate::error::Error;
use crate::venv::BuildUser;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The socket to serve on (default: renv.sock in the store directory).
    #[arg(long, env = env_vars::RENV_SOCKET, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The GPUs workers may be given: `auto` (the node's NVIDIA devices), `none`, or ids.
    #[arg(long, env = env_vars::RENV_GPUS, default_value = "auto", value_name = "auto|none|IDS")]
    gpus: GpuSpec,
    /// A uid allowed to use the daemon besides its own and root (repeatable).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// A gid whose members may use the daemon; makes the socket 0660 (repeatable).
    #[arg(long = "allow-gid", value_name = "GID")]
    allow_gids: Vec<u32>,
    /// What a worker given no GPUs sees: CUDA_VISIBLE_DEVICES="" (`hide`) or the daemon's (`inherit`).
    #[arg(long, value_enum, default_value_t = ZeroGpus::Hide)]
    zero_gpus: ZeroGpus,
    /// The user installers (uv, pip: an sdist's build runs its own code) run as, as Nix's
    /// nixbld: a dedicated system user nothing else runs as (its processes are killed
    /// after every build). Required when the daemon runs as root; `root` runs them as
    /// root, for a node only trusted users reach.
    #[arg(long, env = env_vars::RENV_BUILD_USER, value_name = "USER|UID")]
    build_user: Option<String>,
    /// Most simultaneous connections, all users together.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Most simultaneous connections of one uid (default: a quarter of --max-connections,
    /// at least 4); more are answered 429 at once. Root and the daemon's own user are
    /// exempt (they are held to --max-connections only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_uid: Option<u32>,
    /// Builds one uid may have in flight at once (root and the daemon's user: exempt);
    /// more are answered 429. Requests for a spec already building join that build.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    max_builds_per_uid: u32,
    /// Builds run at once, all callers together (default: twice the cores, at least 4);
    /// more wait for a slot in the order they came, so builds started together do not
    /// all crawl on a few cores. A request for a spec already building or waiting joins
    /// it. Waiting builds count toward --max-builds-per-uid.
    #[arg(long, env = env_vars::RENV_MAX_CONCURRENT_BUILDS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_builds: Option<u32>,
    /// On SIGTERM/SIGINT, leave running workers running (their supervisors keep them and
    /// record their ends; the next daemon adopts them), as Docker's live-restore does for
    /// upgrades. Without it, a stopping daemon stops its workers. A daemon that dies
    /// (`kill -9`, OOM) always leaves them running, to be adopted.
    #[arg(long, env = crate::env_vars::RENV_LIVE_RESTORE)]
    live_restore: bool,
    /// Largest JSON request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_json_bytes: usize,
    /// Keep the store under this size (10G, 500MiB): prune least-recently-used entries
    /// not in use down to 90% of it, after builds and once a minute.
    #[arg(long, value_parser = crate::units::parse_size, value_name = "SIZE")]
    max_store_size: Option<u64>,
    /// The daemon's collector never removes entries younger than this.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "10m", value_name = "DURATION")]
    gc_min_age: Duration,
    /// Seconds a connection may take to send a request's headers, or an upload may send
    /// nothing, before it is dropped.
    #[arg(long, default_value_t = 10)]
    header_timeout_seconds: u64,
    /// Seconds a JSON request body (POST /v1/envs, /v1/workers) may take to arrive in
    /// full; a slower one is answered 408 and its connection closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout_seconds: u64,
    /// Seconds a request waits for a store lock another process holds (its build of the
    /// same entry, a prune) before it is answered 503 and gives back what it took.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    lock_timeout_seconds: u64,
    /// Seconds a stopped worker gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 10)]
    stop_grace_seconds: u64,
    /// Ended workers remembered for status and logs; the oldest beyond are forgotten.
    #[arg(long, default_value_t = 1000)]
    max_ended_workers: usize,
    /// Envs with no reference or worker remembered for the fast path; the least recently
    /// used beyond are forgotten (the store keeps them).
    #[arg(long, default_value_t = 4096)]
    max_idle_envs: usize,
    /// A remote URI prefix requests may name in working_dir / py_modules (repeatable):
    /// `s3://team-bucket/`, `https://artifacts.example/ml/`. Any other remote URI is
    /// refused; the daemon fetches with its own credentials, so this is what a caller may
    /// make it read.
    #[arg(long = "allow-remote", env = env_vars::RENV_ALLOW_REMOTE, value_name = "PREFIX", value_delimiter = ',')]
    allow_remote: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    venv: VenvArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub fn run(args: DaemonArgs) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RENV_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut policy = args.venv.policy();
    policy.build_user = build_user(args.build_user.as_deref(), &args.allow_uids, &args.allow_gids)?;
    // Whatever a previous daemon's builds left running (it was killed mid-build) goes.
    if let Some(user) = policy.build_user {
        crate::sys::kill_all_of(user.uid, user.gid)?;
    }
    // Every lock wait a request can reach (leases, builds, staging) ends by this deadline,
    // so waits for a lock that is never released cannot fill the blocking pool.
    let store = args
        .store
        .open(Some(Duration::from_secs(args.lock_timeout_seconds)))?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.store.dir().join("renv.sock"));
    let config = DaemonConfig {
        socket,
        gpus: args.gpus,
        allow_uids: args.allow_uids,
        allow_gids: args.allow_gids,
        zero_gpus: args.zero_gpus,
        max_connections: args.max_connections as usize,
        max_connections_per_uid: args
            .max_connections_per_uid
            .map_or((args.max_connections as usize / 4).max(4), |n| n as usize),
        max_json_bytes: args.max_json_bytes,
        header_timeout: Duration::from_secs(args.header_timeout_seconds),
        body_timeout: Duration::from_secs(args.body_timeout_seconds),
        stop_grace: Duration::from_secs(args.stop_grace_seconds),
        max_store_size: args.max_store_size,
        gc_min_age: args.gc_min_age,
        max_ended_workers: args.max_ended_workers,
        max_idle_envs: args.max_idle_envs,
        max_builds_per_uid: args.max_builds_per_uid as usize,
        max_concurrent_builds: args
            .max_concurrent_builds
            .map_or_else(default_max_concurrent_builds, |n| n as usize),
        live_restore: args.live_restore,
        allow_remote: crate::remote::AllowList::new(&args.allow_remote)
            .map_err(|e| crate::spec::SpecError::new("--allow-remote", e.to_string()))?,
    };
    let remotes = args.remote.remotes()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime
        .block_on(serve(config, store, policy, remotes))
        .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))
}

/// Twice the cores: a build waits on its installer's processes and the disk as well as
/// the CPU, so a core takes about two at once without their slowing each other; at least
/// 4, so a few slow ones (a download from a slow server) leave room for others.
fn default_max_concurrent_builds() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 2)
        .max(4)
}

/// Resolves `--build-user` (a name or a uid) against what the daemon runs as.
fn build_user(arg: Option<&str>, allow_uids: &[u32], allow_gids: &[u32]) -> Result<Option<BuildUser>, Error> {
    let invalid = |message: String| Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, message));
    let me = crate::sys::geteuid();
    let Some(arg) = arg else {
        return match me {
            0 => Err(invalid(
                "renv daemon runs as root, so its installers (uv, pip: an sdist's build runs its own code) \
                 need an unprivileged user: pass --build-user USER, a dedicated system user \
                 (useradd --system --no-create-home renv-build), or --build-user root on a node only \
                 trusted users reach"
                    .into(),
            )),
            _ => Ok(None),
        };
    };
    let entry = crate::sys::passwd_entry(|e| e.name == arg || e.uid.to_string() == arg);
    let (uid, gid) = match &entry {
        Some(entry) => (entry.uid, entry.gid),
        None => match arg.parse::<u32>() {
            Ok(uid) => (uid, uid),
            Err(_) => {
                return Err(invalid(format!(
                    "--build-user {arg}: no such user in /etc/passwd"
                )));
            }
        },
    };
    // `root` (or the daemon's own user): installers run as the daemon itself.
    if uid == me || uid == 0 {
        return Ok(None);
    }
    if me != 0 {
        return Err(invalid(format!(
            "--build-user {arg}: only a daemon running as root can run installers as another user"
        )));
    }
    // A caller of its own (by uid, or as a member of an allowed group) could run workers
    // as the build user: into the builds, and killed after each.
    let in_allowed_group = allow_gids.iter().any(|&allowed| {
        allowed == gid
            || entry
                .as_ref()
                .is_some_and(|e| crate::sys::group_has_member(allowed, &e.name))
    });
    if allow_uids.contains(&uid) || in_allowed_group {
        return Err(invalid(format!(
            "--build-user {arg} (uid {uid}) is also an allowed caller (--allow-uid, or a member of an \
             --allow-gid group); the build user must be one nothing else runs as: its processes are \
             killed after every build"
        )));
    }
    Ok(Some(BuildUser { uid, gid }))
}
