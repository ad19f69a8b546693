//! `renv package DIR|ZIP [-o OUT.zip] [--exclude PAT]… [--json]`.

use std::io::BufWriter;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{RemoteArgs, StoreArgs, print_stdout};
use crate::env_vars;
use crate::error::Error;
use crate::package::scan_dir;
use crate::package::zip_write::{Compression, write_zip};
use crate::progress::Progress;
use crate::sources::{PackageSource, SourceError};

#[derive(Debug, Args)]
pub struct PackageArgs {
    /// The directory to package, or a zip: a zip is unpacked (with the same checks as the
    /// store's) and its contents packaged exactly, so its digest is the one the daemon
    /// names an upload of that zip by.
    dir: PathBuf,
    /// Write a reproducible zip here instead of putting the package in the store.
    #[arg(short, long, value_name = "OUT.zip")]
    output: Option<PathBuf>,
    /// gitignore-style pattern to leave out (repeatable), as `excludes` in a runtime_env.
    #[arg(long = "exclude", value_name = "PAT")]
    excludes: Vec<String>,
    /// Package the directory under its own name, as a `py_modules` directory is (so that
    /// `import <dirname>` works with the package on PYTHONPATH).
    #[arg(long)]
    as_module: bool,
    /// Zip compression.
    #[arg(long, value_enum, default_value_t = Compression::Stored)]
    compression: Compression,
    /// Put the package's zip in the shared package store (`--remote`) as
    /// `<remote>/pkgs/<digest>.zip`, unless it is there already (one HEAD), instead of in
    /// the local store. Every node with that remote can then use its `pkg://` URI.
    #[arg(long)]
    push: bool,
    /// Print one JSON object on stdout.
    #[arg(long, env = env_vars::RENV_JSON)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    remote: RemoteArgs,
}

pub fn run(args: PackageArgs) -> Result<(), Error> {
    let progress = if args.json {
        Progress::hidden()
    } else {
        Progress::for_stderr()
    };
    let is_zip = args.dir.is_file();
    if is_zip && args.as_module {
        return Err(crate::package::PackageError::NotADirectory(args.dir.clone()).into());
    }
    let scan = |cache: Option<&std::path::Path>| -> Result<crate::package::ScannedTree, Error> {
        let dir = match args.as_module {
            // Its own name: not `.`, nor a trailing slash's empty one.
            true => fs_err::canonicalize(&args.dir)?,
            false => args.dir.clone(),
        };
        let tree = scan_dir(&dir, &args.excludes, args.store.threads(), cache, &progress)?;
        Ok(match args.as_module {
            true => tree.nested()?,
            false => tree,
        })
    };
    if is_zip && !args.excludes.is_empty() {
        return Err(crate::package::PackageError::BadExclude {
            pattern: args.excludes[0].clone(),
            reason: "a zip is packaged exactly as it is; unpack it to use excludes".into(),
        }
        .into());
    }
    let remotes = args.remote.remotes()?;
    let shared = match (args.push, &remotes.shared) {
        (false, _) => None,
        (true, Some(shared)) => Some(shared),
        (true, None) => {
            return Err(crate::spec::SpecError::new(
                "--push",
                "needs the shared package store: pass --remote URL or set RENV_REMOTE",
            )
            .into());
        }
    };
    // The store holds the stat cache that spares re-hashing an unchanged tree. Writing a
    // zip does not need the store, so there it is used only if it opens.
    let into_store = args.output.is_none() && !args.push;
    let store = match into_store {
        false => args.store.open(None).ok(),
        true => Some(args.store.open(None)?),
    };
    let (digest, files, bytes, location) = match into_store {
        true => {
            let store = store.expect("opened above when the package goes into the store");
            let source = if is_zip {
                // The store's own path: a checked unpack straight into staging.
                PackageSource::Zip(args.dir.clone())
            } else {
                // Walked only: the store's copy reads each new file once (`sources::tree`).
                let dir = match args.as_module {
                    true => fs_err::canonicalize(&args.dir)?,
                    false => args.dir.clone(),
                };
                let tree = crate::package::scan::walk_dir(
                    &dir,
                    &args.excludes,
                    args.store.threads(),
                    Some(&store.layout().hash_cache_dir()),
                )?;
                PackageSource::Tree(match args.as_module {
                    true => tree.nested()?,
                    false => tree,
                })
            };
            let entry = source.ensure(&store, &remotes, &progress)?;
            let location = json!({"path": entry.path, "created": entry.created});
            (entry.id, entry.files, entry.bytes, location)
        }
        false => {
            // A zip is unpacked (with the store's checks) and re-packed from its contents.
            let unpacked = if is_zip { Some(tempfile::tempdir()?) } else { None };
            let tree = match &unpacked {
                Some(dir) => {
                    crate::package::zip_read::unpack(
                        &args.dir,
                        dir.path(),
                        args.store.unpack_limits(),
                        args.store.threads(),
                        &progress,
                    )
                    .map_err(|source| SourceError::Archive {
                        path: Some(args.dir.clone()),
                        source,
                    })?;
                    crate::package::scan::scan_exact(dir.path(), args.store.threads())?
                }
                None => scan(store.as_ref().map(|s| s.layout().hash_cache_dir()).as_deref())?,
            };
            let manifest = &tree.manifest;
            let digest = manifest.digest();
            let mut location = serde_json::Map::new();
            // HEAD first: a package the remote holds is neither zipped nor sent again.
            let target = shared.map(|shared| shared.package(digest));
            let present = match &target {
                Some(uri) => remotes.client.exists(uri).map_err(SourceError::from)?,
                None => false,
            };
            let scratch = tempfile::tempdir()?;
            let zip = match &args.output {
                Some(out) => Some(out.clone()),
                None if !present => Some(scratch.path().join("package.zip")),
                None => None,
            };
            if let Some(zip) = &zip {
                write_zip_atomically(&tree, zip, args.compression, &progress)?;
                if args.output.is_some() {
                    location.insert("zip".into(), json!(zip));
                }
            }
            if let Some(uri) = &target {
                let pushed = match (&zip, present) {
                    (Some(zip), false) => remotes.client.put_file(uri, zip).map_err(SourceError::from)?,
                    _ => false,
                };
                location.insert("remote".into(), json!(uri.as_str()));
                location.insert("pushed".into(), json!(pushed));
            }
            (
                digest,
                manifest.file_count() as u64,
                manifest.content_bytes(),
                serde_json::Value::Object(location),
            )
        }
    };
    let mut value = json!({
        "digest": digest.to_string(),
        "uri": format!("pkg://{digest}"),
        "files": files,
        "bytes": bytes,
    });
    value
        .as_object_mut()
        .expect("object")
        .extend(location.as_object().expect("object").clone());
    let text = if args.json {
        format!("{value}\n")
    } else {
        let mut place = match &args.output {
            Some(out) => format!("wrote {}", out.display()),
            None if args.push => String::new(),
            None => "in the store".to_string(),
        };
        if let Some(remote) = location["remote"].as_str() {
            let done = match location["pushed"].as_bool() {
                Some(true) => "pushed to",
                _ => "already in",
            };
            place = [place, format!("{done} {remote}")]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join(", ");
        }
        format!(
            "pkg://{digest}\n{files} files, {}, {place}\n",
            super::build::human_bytes(bytes)
        )
    };
    print_stdout(&text)
}

/// Writes beside the target and renames, so a failed run never leaves a partial zip.
fn write_zip_atomically(
    tree: &crate::package::ScannedTree,
    out: &std::path::Path,
    compression: Compression,
    progress: &Progress,
) -> Result<(), Error> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".renv-package-")
        .suffix(".zip")
        .tempfile_in(dir)?;
    let writer = write_zip(
        tree,
        BufWriter::with_capacity(1 << 20, tmp),
        compression,
        progress,
    )?;
    let tmp = writer.into_inner().map_err(|e| e.into_error())?;
    tmp.persist(out).map_err(|e| e.error)?;
    Ok(())
}
