//! The job-style clients of the daemon: `renv submit / status / logs / stop / ps`
//! (Ray's `ray job submit / status / logs / stop / list`).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{Value, json};

use crate::client::Client;
use crate::env_vars;
use crate::error::Error;
use crate::package::zip_write::{Compression, write_zip};
use crate::package::{ScannedTree, scan_dir, worker_threads};
use crate::progress::Progress;
use crate::spec::{PackageList, RuntimeEnvSpec, WheelSpec, WorkingDirSpec};

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The daemon's socket (default: renv.sock in the store directory).
    #[arg(long, env = env_vars::RENV_SOCKET, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl ClientArgs {
    fn client(&self) -> Client {
        let socket = self.socket.clone().unwrap_or_else(|| {
            std::env::var_os(env_vars::RENV_STORE)
                .map(PathBuf::from)
                .unwrap_or_else(env_vars::default_store_dir)
                .join("renv.sock")
        });
        Client::new(&socket)
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A local directory to use as the working_dir (packaged here, uploaded if the daemon
    /// lacks it).
    #[arg(long, value_name = "DIR")]
    working_dir: Option<PathBuf>,
    /// A runtime_env JSON file.
    #[arg(long, value_name = "FILE", conflicts_with = "runtime_env_json")]
    runtime_env: Option<PathBuf>,
    /// A runtime_env as inline JSON.
    #[arg(long, value_name = "JSON")]
    runtime_env_json: Option<String>,
    /// How many GPUs the daemon should allocate to the job.
    #[arg(long, conflicts_with = "gpus")]
    num_gpus: Option<usize>,
    /// Exactly these GPU ids.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    gpus: Option<Vec<u32>>,
    /// A name for the job.
    #[arg(long)]
    name: Option<String>,
    /// Print the job id and return at once instead of following the output.
    #[arg(long)]
    no_wait: bool,
    /// The entrypoint (no shell).
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// The job (worker) id.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    id: String,
    /// Keep streaming until the job exits.
    #[arg(long, short)]
    follow: bool,
    /// Show stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// Submits a job; returns the exit code to leave with.
pub fn submit(args: SubmitArgs) -> Result<u8, Error> {
    let client = args.client.client();
    let (mut runtime_env, base_dir) = match (&args.runtime_env, &args.runtime_env_json) {
        (Some(file), _) => {
            let (text, base) = super::build::read_spec(file)?;
            (parse_object(&text)?, base)
        }
        (None, Some(text)) => (parse_object(text)?, std::env::current_dir()?),
        (None, None) => (json!({}), std::env::current_dir()?),
    };
    if let Some(dir) = &args.working_dir {
        runtime_env["working_dir"] = Value::String(std::path::absolute(dir)?.display().to_string());
    }
    // Validate here too, so errors name the field before anything is uploaded.
    let spec = RuntimeEnvSpec::from_value(&runtime_env)?;
    // Local directories are packaged here, with the user's rights, and uploaded: the
    // daemon never reads a client's files.
    let progress = Progress::for_stderr();
    let scan = |dir: &Path| scan_dir(dir, &spec.excludes, worker_threads(), None, &progress);
    let mut packaged = false;
    if let Some(WorkingDirSpec::Local(path)) = &spec.working_dir {
        let digest = upload_tree(&client, scan(&base_dir.join(path))?, &progress)?;
        runtime_env["working_dir"] = Value::String(format!("pkg://{digest}"));
        packaged = true;
    }
    for (i, module) in spec.py_modules.iter().enumerate() {
        if let WorkingDirSpec::Wheel(WheelSpec::Local(path)) = module {
            // Sent as a package holding just the wheel, named by the file in it.
            let name = module_file_name(path)?;
            let holder = tempfile::tempdir()?;
            fs_err::copy(base_dir.join(path), holder.path().join(&name))?;
            let tree = crate::package::scan::scan_exact(holder.path(), worker_threads())?;
            let digest = upload_tree(&client, tree, &progress)?;
            runtime_env["py_modules"][i] = Value::String(format!("pkg://{digest}/{name}"));
            packaged = true;
        }
        if let WorkingDirSpec::Local(path) = module {
            let path = base_dir.join(path);
            let uri = match path.extension().is_some_and(|e| e == "zip") {
                // A zip is uploaded as the package it unpacks to.
                true => format!("pkg://{}", upload_zip(&client, &path)?),
                false => {
                    let dir = fs_err::canonicalize(&path)?;
                    format!(
                        "pkg://{}",
                        upload_tree(&client, scan(&dir)?.nested()?, &progress)?
                    )
                }
            };
            runtime_env["py_modules"][i] = Value::String(uri);
            packaged = true;
        }
    }
    if packaged && let Some(map) = runtime_env.as_object_mut() {
        map.remove("excludes");
    }
    // A requirements file is read here, with the user's rights: the daemon never reads a
    // client's files.
    if let Some(packages) = &spec.packages
        && let PackageList::RequirementsFile(_) = packages.packages
    {
        let listed: Vec<String> = crate::resolve::resolve_packages(packages, &base_dir)?
            .map(|resolved| {
                resolved
                    .requirements
                    .iter()
                    .map(|r| r.canonical().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let field = packages.field.as_str();
        match &mut runtime_env[field] {
            Value::Object(options) => {
                options.insert("packages".into(), json!(listed));
            }
            other => *other = json!(listed),
        }
    }
    let mut request = json!({"runtime_env": runtime_env, "argv": args.command, "name": args.name});
    if let Some(n) = args.num_gpus {
        request["num_gpus"] = n.into();
    }
    if let Some(ids) = &args.gpus {
        request["gpus"] = json!(ids);
    }
    let worker = client.json("POST", "/v1/workers", Some(&request))?;
    let id = worker["worker_id"].as_str().unwrap_or_default().to_string();
    if args.no_wait {
        println!("{id}");
        return Ok(0);
    }
    eprintln!(
        "renv: job {id} started (pid {}, gpus {})",
        worker["pid"], worker["gpus"]
    );
    let err_client = client.clone();
    let err_id = id.clone();
    let stderr_follower =
        std::thread::spawn(move || follow(&err_client, &err_id, "stderr", &mut std::io::stderr()));
    follow(&client, &id, "stdout", &mut std::io::stdout())?;
    let _ = stderr_follower.join();
    let info = client.json("GET", &format!("/v1/workers/{id}"), None)?;
    eprintln!("renv: job {id} {}", describe_end(&info));
    Ok(exit_code(&info))
}

fn module_file_name(path: &Path) -> Result<String, Error> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| crate::package::PackageError::NotFound(path.to_path_buf()).into())
}

fn parse_object(text: &str) -> Result<Value, Error> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| crate::spec::SpecError::new("", format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(crate::spec::SpecError::new("", "expected a JSON object").into());
    }
    Ok(value)
}

/// Uploads the package `tree` as `renv package` zips it, unless the daemon has it.
fn upload_tree(client: &Client, tree: ScannedTree, progress: &Progress) -> Result<String, Error> {
    let digest = tree.manifest.digest().to_string();
    let head = client.send("HEAD", &format!("/v1/packages/{digest}"), None)?;
    if head.status == 200 {
        return Ok(digest);
    }
    let mut zip = tempfile::tempfile()?;
    write_zip(
        &tree,
        std::io::BufWriter::new(&mut zip),
        Compression::Stored,
        progress,
    )?;
    put_package(client, &digest, zip)
}

/// Uploads a local zip as the package it unpacks to (its digest, as `renv package` prints).
fn upload_zip(client: &Client, path: &Path) -> Result<String, Error> {
    // Unpacked here with the store's checks, only to learn the digest it unpacks to.
    let unpacked = tempfile::tempdir()?;
    let manifest = crate::package::zip_read::unpack(
        path,
        unpacked.path(),
        crate::package::zip_read::UnpackLimits::default(),
        worker_threads(),
        &Progress::hidden(),
    )
    .map_err(|source| crate::sources::SourceError::Archive {
        path: Some(path.to_path_buf()),
        source,
    })?;
    let digest = manifest.digest().to_string();
    let head = client.send("HEAD", &format!("/v1/packages/{digest}"), None)?;
    if head.status == 200 {
        return Ok(digest);
    }
    put_package(client, &digest, fs_err::File::open(path)?.into_parts().0)
}

/// `PUT /v1/packages/<digest>` with the zip `zip`.
fn put_package(client: &Client, digest: &str, mut zip: std::fs::File) -> Result<String, Error> {
    use std::io::Seek;
    let len = zip.metadata()?.len();
    zip.seek(std::io::SeekFrom::Start(0))?;
    let response = client.send(
        "PUT",
        &format!("/v1/packages/{digest}"),
        Some(("application/zip", len, &mut zip as &mut dyn std::io::Read)),
    )?;
    response.into_json()?;
    Ok(digest.to_string())
}

/// Copies a job's stream to `out` until the job ends.
fn follow(client: &Client, id: &str, stream: &str, out: &mut dyn Write) -> Result<(), Error> {
    let mut response = client.send(
        "GET",
        &format!("/v1/workers/{id}/logs?stream={stream}&follow=true"),
        None,
    )?;
    if response.status != 200 {
        response.into_json()?;
        return Ok(());
    }
    let mut buf = [0u8; 16 << 10];
    loop {
        use std::io::Read;
        let n = response.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        match out.write_all(&buf[..n]).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other?,
        }
    }
}

fn describe_end(info: &Value) -> String {
    match (
        info["state"].as_str(),
        info["exit_code"].as_i64(),
        info["signal"].as_i64(),
    ) {
        (Some(state), Some(code), _) => format!("{state} (exit code {code})"),
        (Some(state), _, Some(signal)) => format!("{state} (signal {signal})"),
        (Some(state), _, _) => state.to_string(),
        _ => info.to_string(),
    }
}

fn exit_code(info: &Value) -> u8 {
    match (info["exit_code"].as_i64(), info["signal"].as_i64()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => (128 + signal) as u8,
        _ => 1,
    }
}

pub fn status(args: IdArgs) -> Result<(), Error> {
    let info = args
        .client
        .client()
        .json("GET", &format!("/v1/workers/{}", args.id), None)?;
    if args.json {
        println!("{info}");
    } else {
        println!("{} {}", args.id, describe_end(&info));
    }
    Ok(())
}

pub fn logs(args: LogsArgs) -> Result<(), Error> {
    let client = args.client.client();
    let stream = if args.stderr { "stderr" } else { "stdout" };
    let mut response = client.send(
        "GET",
        &format!(
            "/v1/workers/{}/logs?stream={stream}&follow={}",
            args.id, args.follow
        ),
        None,
    )?;
    if response.status != 200 {
        response.into_json()?;
        return Ok(());
    }
    let mut out = std::io::stdout();
    match std::io::copy(&mut response, &mut out) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map(|_| ()).map_err(Error::Io),
    }
}

pub fn stop(args: IdArgs) -> Result<(), Error> {
    let info = args
        .client
        .client()
        .json("DELETE", &format!("/v1/workers/{}", args.id), None)?;
    if args.json {
        println!("{info}");
    } else {
        println!("{} stopping (SIGTERM sent to its process group)", args.id);
    }
    Ok(())
}

pub fn ps(args: PsArgs) -> Result<(), Error> {
    let list = args.client.client().json("GET", "/v1/workers", None)?;
    if args.json {
        println!("{list}");
        return Ok(());
    }
    println!(
        "{:<9} {:<10} {:>8} {:<8} {:<12} NAME",
        "ID", "STATE", "PID", "EXIT", "GPUS"
    );
    for w in list["workers"].as_array().into_iter().flatten() {
        let exit = w["exit_code"]
            .as_i64()
            .map(|c| c.to_string())
            .or_else(|| w["signal"].as_i64().map(|s| format!("sig{s}")));
        let gpus: Vec<String> = w["gpus"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| g.to_string())
            .collect();
        println!(
            "{:<9} {:<10} {:>8} {:<8} {:<12} {}",
            w["worker_id"].as_str().unwrap_or("?"),
            w["state"].as_str().unwrap_or("?"),
            w["pid"],
            exit.unwrap_or_else(|| "-".into()),
            if gpus.is_empty() {
                "-".into()
            } else {
                gpus.join(",")
            },
            w["name"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
