//! `renv build ENV.json [--json]`.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::{RemoteArgs, StoreArgs, VenvArgs, print_stdout};
use crate::build::{BuiltEnv, build_env};
use crate::context::Context;
use crate::env_vars;
use crate::error::Error;
use crate::progress::Progress;
use crate::spec::RuntimeEnvSpec;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The runtime_env JSON file (`-` for stdin). Relative paths in it are taken from the
    /// file's directory.
    spec: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long, env = env_vars::RENV_JSON)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    venv: VenvArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub fn run(args: BuildArgs) -> Result<(), Error> {
    let (text, base_dir) = read_spec(&args.spec)?;
    let spec = RuntimeEnvSpec::from_json(&text)?;
    let timeout = spec.config.setup_timeout_seconds.map(Duration::from_secs);
    let store = args.store.open(timeout)?;
    let remotes = args.remote.remotes()?;
    let progress = if args.json {
        Progress::hidden()
    } else {
        Progress::for_stderr()
    };
    let built = build_env(&spec, &base_dir, &store, &args.venv.policy(), &remotes, &progress)?;
    let context = built.context_for(&store, crate::sys::geteuid(), crate::sys::getegid())?;
    print_stdout(&if args.json {
        to_json(&built, &context)
    } else {
        to_text(&built, &context)
    })
}

pub(super) fn read_spec(path: &Path) -> Result<(String, PathBuf), Error> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok((text, std::env::current_dir()?));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::spec::SpecError::new("", format!("cannot read {}: {e}", path.display())))?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((text, base.to_path_buf()))
}

fn to_json(built: &BuiltEnv, context: &Context) -> String {
    let package = built.working_dir().map(|e| {
        json!({
            "digest": e.id.to_string(),
            "uri": format!("pkg://{}", e.id),
            "files": e.files,
            "bytes": e.bytes,
            "created": e.created,
        })
    });
    let venv = built
        .venv
        .as_ref()
        .map(|e| json!({"key": e.id.to_string(), "path": e.path, "bytes": e.bytes, "created": e.created}));
    let value = json!({
        "env_id": built.env_id.to_string(),
        "working_dir": built.working_dir_path(),
        "package": package,
        "venv": venv,
        "python": context.python,
        "cwd": context.cwd,
        "env": context.env,
        "timings_ms": built.timings_ms,
    });
    format!("{value}\n")
}

fn to_text(built: &BuiltEnv, context: &Context) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "env_id       {}", built.env_id);
    match built.working_dir() {
        Some(e) => {
            let state = if e.created { "new" } else { "cached" };
            let _ = writeln!(out, "working_dir  {}", e.path.display());
            let _ = writeln!(
                out,
                "package      pkg://{} ({} files, {}, {state})",
                e.id,
                e.files,
                human_bytes(e.bytes)
            );
        }
        None => {
            let _ = writeln!(out, "working_dir  (none)");
        }
    }
    if let Some(e) = &built.venv {
        let state = if e.created { "new" } else { "cached" };
        let _ = writeln!(out, "venv         {} ({state})", e.path.display());
    }
    let python = context
        .python
        .as_ref()
        .map_or("(the worker's own; no packages requested)".into(), |p| {
            p.display().to_string()
        });
    let _ = writeln!(out, "python       {python}");
    let cwd = context
        .cwd
        .as_ref()
        .map_or("(the worker's own)".into(), |p| p.display().to_string());
    let _ = writeln!(out, "cwd          {cwd}");
    let mut label = "env";
    for (k, v) in &context.env {
        let _ = writeln!(out, "{label:<12} {k}={v}");
        label = "";
    }
    let timings: Vec<String> = built
        .timings_ms
        .iter()
        .map(|(k, v)| format!("{k} {v} ms"))
        .collect();
    let _ = writeln!(out, "timings      {}", timings.join(", "));
    out
}

pub(super) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
