//! `renv package DIR|ZIP [-o OUT.zip] [--exclude PAT]… [--json]`.

use std::io::BufWriter;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{StoreArgs, print_stdout};
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
    /// Print one JSON object on stdout.
    #[arg(long, env = env_vars::RENV_JSON)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
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
    // The store holds the stat cache that spares re-hashing an unchanged tree. Writing a
    // zip does not need the store, so there it is used only if it opens.
    let store = match args.output {
        Some(_) => args.store.open(None).ok(),
        None => Some(args.store.open(None)?),
    };
    let (digest, files, bytes, location) = match &args.output {
        None => {
            let store = store.expect("opened above when there is no -o");
            let source = if is_zip {
                // The store's own path: a checked unpack straight into staging.
                PackageSource::Zip(args.dir.clone())
            } else {
                PackageSource::Tree(scan(Some(&store.layout().hash_cache_dir()))?)
            };
            let entry = source.ensure(&store, &progress)?;
            let location = json!({"path": entry.path, "created": entry.created});
            (entry.id, entry.files, entry.bytes, location)
        }
        Some(out) => {
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
            write_zip_atomically(&tree, out, args.compression, &progress)?;
            let manifest = &tree.manifest;
            (
                manifest.digest(),
                manifest.file_count() as u64,
                manifest.content_bytes(),
                json!({"zip": out}),
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
        let place = match &args.output {
            Some(out) => format!("wrote {}", out.display()),
            None => "in the store".to_string(),
        };
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
