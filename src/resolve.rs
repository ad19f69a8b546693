//! From a spec as written to its canonical, resolved form. Local paths are read here (on
//! the CLI's side): a directory is walked and hashed, a requirements file is read and each
//! line validated. Nothing downstream re-parses or re-validates.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::package::{self, PackageError};
use crate::sources::PackageSource;
use crate::sources::wheel::WheelSource;
use crate::spec::{
    self, InstallerField, PackageList, PackageSpec, Requirement, RuntimeEnvSpec, SpecError, WheelSpec,
    WorkingDirSpec,
};

/// Why a spec's local parts cannot be resolved: the spec itself, or the tree it names.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Package(#[from] PackageError),
}

/// The `pip`/`uv` field with its requirement list read and de-duplicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPackages {
    pub field: InstallerField,
    pub requirements: Vec<Requirement>,
    pub check: bool,
    pub installer_version: Option<String>,
    pub install_options: Vec<String>,
}

impl ResolvedPackages {
    /// No requirements: an env only for what `py_modules` wheels install.
    pub fn none() -> ResolvedPackages {
        ResolvedPackages {
            field: InstallerField::Pip,
            requirements: Vec::new(),
            check: false,
            installer_version: None,
            install_options: Vec::new(),
        }
    }
}

/// Resolves `pip`/`uv`: reads a requirements file (relative to `base_dir`) if given.
/// `None` when the spec asks for no packages.
pub fn resolve_packages(
    spec: &PackageSpec,
    base_dir: &Path,
) -> Result<Option<ResolvedPackages>, ResolveError> {
    let field = spec.field.as_str();
    let requirements = match &spec.packages {
        PackageList::Listed(reqs) => spec::dedup_requirements(reqs),
        PackageList::RequirementsFile(file) => {
            let path = base_dir.join(file);
            let text = fs_err::read_to_string(&path).map_err(|e| {
                SpecError::new(
                    field,
                    format!("cannot read requirements file {}: {e}", path.display()),
                )
            })?;
            let mut reqs = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let line = line.split(" #").next().unwrap_or("").trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let at = format!("{field} ({}:{})", file.display(), n + 1);
                reqs.push(spec::parse_requirement(&Value::String(line.to_string()), &at)?);
            }
            spec::dedup_requirements(&reqs)
        }
    };
    if requirements.is_empty() {
        return Ok(None);
    }
    Ok(Some(ResolvedPackages {
        field: spec.field,
        requirements,
        check: spec.check,
        installer_version: spec.installer_version.clone(),
        install_options: spec.install_options.clone(),
    }))
}

/// Resolves `working_dir`: relative paths are taken from `base_dir`; a directory is
/// walked with its stat cache in `hash_cache_dir` (its files are read when it is ensured).
pub fn resolve_working_dir(
    spec: &RuntimeEnvSpec,
    base_dir: &Path,
    threads: usize,
    hash_cache_dir: Option<&Path>,
) -> Result<Option<PackageSource>, ResolveError> {
    let Some(wd) = &spec.working_dir else {
        return Ok(None);
    };
    Ok(Some(match wd {
        WorkingDirSpec::Package(digest) => PackageSource::Stored(*digest),
        WorkingDirSpec::Remote(uri) => PackageSource::Remote(uri.clone()),
        WorkingDirSpec::FileZip(path) => PackageSource::Zip(existing_file(path)?),
        WorkingDirSpec::Wheel(_) => {
            return Err(SpecError::new("working_dir", "a wheel cannot be the working_dir").into());
        }
        WorkingDirSpec::Local(path) => {
            let path = base_dir.join(path);
            match fs_err::metadata(&path) {
                Err(_) => return Err(PackageError::NotFound(path).into()),
                Ok(meta) if meta.is_dir() => {
                    let tree = package::scan::walk_dir(&path, &spec.excludes, threads, hash_cache_dir)?;
                    PackageSource::Tree(tree)
                }
                Ok(meta) if meta.is_file() && path.extension().is_some_and(|e| e == "zip") => {
                    if !spec.excludes.is_empty() {
                        return Err(SpecError::new(
                            "excludes",
                            "applies only to a local directory working_dir; a zip is used as it is",
                        )
                        .into());
                    }
                    PackageSource::Zip(path)
                }
                Ok(_) => return Err(PackageError::NotADirectory(path).into()),
            }
        }
    }))
}

/// A `py_modules` entry: a package for `PYTHONPATH`, or a wheel to install into the env.
#[derive(Debug)]
pub enum ModuleSource {
    Package(PackageSource),
    Wheel { source: WheelSource, file_name: String },
}

/// Resolves `py_modules`, in order: a local directory is scanned (with the spec's
/// excludes) and packaged under its own name, so `import <name>` works; a zip, a
/// `file://` zip, a remote zip and a `pkg://` digest are used as they are; a wheel is
/// installed into the env.
pub fn resolve_py_modules(
    spec: &RuntimeEnvSpec,
    base_dir: &Path,
    threads: usize,
    hash_cache_dir: Option<&Path>,
) -> Result<Vec<ModuleSource>, ResolveError> {
    spec.py_modules
        .iter()
        .map(|module| {
            Ok(ModuleSource::Package(match module {
                WorkingDirSpec::Wheel(wheel) => {
                    let file_name = wheel.file_name().to_string();
                    let source = match wheel {
                        WheelSpec::Local(path) => WheelSource::Local(existing_file(&base_dir.join(path))?),
                        WheelSpec::File(path) => WheelSource::Local(existing_file(path)?),
                        WheelSpec::Remote(uri) => WheelSource::Remote(uri.clone()),
                        WheelSpec::Stored { package, file } => WheelSource::Stored {
                            package: *package,
                            file: file.clone(),
                        },
                    };
                    return Ok(ModuleSource::Wheel { source, file_name });
                }
                WorkingDirSpec::Package(digest) => PackageSource::Stored(*digest),
                WorkingDirSpec::Remote(uri) => PackageSource::Remote(uri.clone()),
                WorkingDirSpec::FileZip(path) => PackageSource::Zip(existing_file(path)?),
                WorkingDirSpec::Local(path) => {
                    let path = base_dir.join(path);
                    match fs_err::metadata(&path) {
                        Err(_) => return Err(PackageError::NotFound(path).into()),
                        Ok(meta) if meta.is_dir() => {
                            // Its own name, not `.` or a trailing slash's empty one.
                            let path = fs_err::canonicalize(&path)
                                .map_err(|_| PackageError::NotFound(path.clone()))?;
                            let tree =
                                package::scan::walk_dir(&path, &spec.excludes, threads, hash_cache_dir)?;
                            PackageSource::Tree(tree.nested()?)
                        }
                        Ok(meta) if meta.is_file() && path.extension().is_some_and(|e| e == "zip") => {
                            PackageSource::Zip(path)
                        }
                        Ok(_) => return Err(PackageError::NotADirectory(path).into()),
                    }
                }
            }))
        })
        .collect()
}

fn existing_file(path: &Path) -> Result<PathBuf, ResolveError> {
    match fs_err::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(path.to_path_buf()),
        Ok(_) => Err(PackageError::NotADirectory(path.to_path_buf()).into()),
        Err(_) => Err(PackageError::NotFound(path.to_path_buf()).into()),
    }
}
