//! The `runtime_env` JSON, parsed strictly into types.
//!
//! This is the only place raw JSON is looked at. Every error names the field path the
//! user wrote (`env_vars.FOO`, `pip.packages[2]`, `config.setup_timeout_seconds`) and
//! what was expected. Field names and forms follow Ray's `runtime_env`, so a spec that
//! works with Ray either works here or gets an error saying why.

mod requirement;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde_json::{Map, Value};

pub use requirement::Requirement;

use crate::digest::PackageDigest;
use crate::remote::RemoteUri;

/// Top-level fields renv understands, in the order error messages list them.
pub const SUPPORTED_FIELDS: [&str; 8] = [
    "working_dir",
    "py_modules",
    "excludes",
    "env_vars",
    "pip",
    "uv",
    "config",
    "_ray_commit",
];

/// Variables renv sets itself for every worker; a request may not set them.
pub const MANAGED_ENV_VARS: [&str; 3] = [
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
];

/// Caps on the sizes of request fields (hostile input must not cost unbounded memory).
pub mod limits {
    pub const MAX_SPEC_BYTES: usize = 4 << 20;
    pub const MAX_ENV_VARS: usize = 4096;
    pub const MAX_ENV_NAME_BYTES: usize = 256;
    pub const MAX_ENV_VALUE_BYTES: usize = 128 << 10;
    pub const MAX_ENV_TOTAL_BYTES: usize = 1 << 20;
    pub const MAX_EXCLUDES: usize = 10_000;
    pub const MAX_PATTERN_BYTES: usize = 4096;
    pub const MAX_PACKAGES: usize = 1000;
    pub const MAX_REQUIREMENT_BYTES: usize = 4096;
    /// `config.setup_timeout_seconds`: a year; beyond it, deadlines overflow clocks
    /// (`-1` is the way to ask for none).
    pub const MAX_SETUP_TIMEOUT_SECONDS: i64 = 365 * 86_400;
    /// Comparisons in one requirement's environment marker (the marker algebra's cost
    /// grows exponentially with them for some shapes).
    pub const MAX_MARKER_COMPARISONS: usize = 12;
    /// Parenthesis depth in one requirement (the marker parser recurses per level).
    pub const MAX_MARKER_NESTING: usize = 16;
}

/// The default for `config.setup_timeout_seconds`, as in Ray.
pub const DEFAULT_SETUP_TIMEOUT_SECONDS: i64 = 600;

/// A validation failure: which field, and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct SpecError {
    /// Path of the offending field (`env_vars.FOO`), empty for the document itself.
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A `runtime_env`, as the user wrote it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEnvSpec {
    pub working_dir: Option<WorkingDirSpec>,
    /// Ray's `py_modules`: packages put on the worker's `PYTHONPATH` after the
    /// working_dir; a local directory is importable by its name.
    pub py_modules: Vec<WorkingDirSpec>,
    /// gitignore-style patterns, relative to the working_dir root.
    pub excludes: Vec<String>,
    pub env_vars: BTreeMap<String, String>,
    pub packages: Option<PackageSpec>,
    pub config: Config,
}

/// Where a package (the working_dir, a py_module) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkingDirSpec {
    /// A path on the machine running the CLI: a directory or a `.zip` file.
    Local(PathBuf),
    /// `file:///abs/path.zip`.
    FileZip(PathBuf),
    /// `pkg://<digest>`: an entry in the store, or in the shared package store.
    Package(PackageDigest),
    /// A zip in remote storage: `s3://`, `gs://`, `https://`, `http://`.
    Remote(RemoteUri),
    /// A wheel (`py_modules` only): installed into the env, not put on `PYTHONPATH`.
    Wheel(WheelSpec),
}

/// Where a package location is read from, whatever it holds (a tree, a zip, a wheel):
/// what decides who may name it and whether it can change under the same spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// A path on the machine running the CLI.
    Local(&'a std::path::Path),
    /// `file:///…`: a path on the node, read with the reader's rights.
    File(&'a std::path::Path),
    /// Remote storage.
    Remote(&'a RemoteUri),
    /// The store (or the shared package store), by digest: never changes.
    Store,
}

impl WorkingDirSpec {
    pub fn origin(&self) -> Origin<'_> {
        match self {
            WorkingDirSpec::Local(p) | WorkingDirSpec::Wheel(WheelSpec::Local(p)) => Origin::Local(p),
            WorkingDirSpec::FileZip(p) | WorkingDirSpec::Wheel(WheelSpec::File(p)) => Origin::File(p),
            WorkingDirSpec::Remote(uri) | WorkingDirSpec::Wheel(WheelSpec::Remote(uri)) => {
                Origin::Remote(uri)
            }
            WorkingDirSpec::Package(_) | WorkingDirSpec::Wheel(WheelSpec::Stored { .. }) => Origin::Store,
        }
    }
}

/// Where a `py_modules` wheel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WheelSpec {
    /// A `.whl` on the machine running the CLI.
    Local(PathBuf),
    /// `file:///abs/path.whl`.
    File(PathBuf),
    /// `s3://…/x.whl`, `gs://…`, `https://…`.
    Remote(RemoteUri),
    /// `pkg://<digest>/<file>.whl`: the wheel file at the top of a stored package (what
    /// `renv submit` and the SDK upload a local wheel as).
    Stored { package: PackageDigest, file: String },
}

impl WheelSpec {
    /// The wheel's file name (`name-1.0-py3-none-any.whl`): what the installer reads its
    /// name, version and tags from.
    pub fn file_name(&self) -> &str {
        match self {
            WheelSpec::Local(path) | WheelSpec::File(path) => {
                path.file_name().and_then(|n| n.to_str()).unwrap_or_default()
            }
            WheelSpec::Remote(uri) => uri.file_name(),
            WheelSpec::Stored { file, .. } => file,
        }
    }
}

/// Whether `name` looks like a wheel's file name: `{dist}-{version}(-{build})?-{python}-{abi}-{platform}.whl`.
fn is_wheel_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".whl") else {
        return false;
    };
    let parts = stem.split('-').count();
    (5..=6).contains(&parts)
        && stem.split('-').all(|p| !p.is_empty())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

/// Which `runtime_env` field asked for packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallerField {
    Pip,
    Uv,
}

impl InstallerField {
    pub fn as_str(self) -> &'static str {
        match self {
            InstallerField::Pip => "pip",
            InstallerField::Uv => "uv",
        }
    }
}

/// The `pip` or `uv` field, in either its list or dict form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageSpec {
    pub field: InstallerField,
    pub packages: PackageList,
    /// `pip_check` / `uv_check`.
    pub check: bool,
    /// `pip_version` / `uv_version`: a version specifier such as `==23.2.1`.
    pub installer_version: Option<String>,
    /// `pip_install_options` / `uv_pip_install_options`; allowed only by operator policy.
    pub install_options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageList {
    Listed(Vec<Requirement>),
    /// A requirements file on the CLI's machine (Ray's string form).
    RequirementsFile(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// `None` means no deadline (Ray's `-1`).
    pub setup_timeout_seconds: Option<u64>,
    pub eager_install: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            setup_timeout_seconds: Some(DEFAULT_SETUP_TIMEOUT_SECONDS as u64),
            eager_install: true,
        }
    }
}

impl RuntimeEnvSpec {
    /// Parses a JSON document. Key order and whitespace do not matter.
    pub fn from_json(text: &str) -> Result<Self, SpecError> {
        if text.len() > limits::MAX_SPEC_BYTES {
            return Err(SpecError::new(
                "",
                format!(
                    "runtime_env is {} bytes, more than the limit of {}",
                    text.len(),
                    limits::MAX_SPEC_BYTES
                ),
            ));
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| SpecError::new("", format!("invalid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Self, SpecError> {
        let Value::Object(map) = value else {
            return Err(SpecError::new(
                "",
                format!("expected a JSON object, got {}", describe(value)),
            ));
        };
        let mut spec = RuntimeEnvSpec {
            working_dir: None,
            py_modules: Vec::new(),
            excludes: Vec::new(),
            env_vars: BTreeMap::new(),
            packages: None,
            config: Config::default(),
        };
        for (key, value) in map {
            match key.as_str() {
                "working_dir" => spec.working_dir = parse_working_dir(value)?,
                "py_modules" => spec.py_modules = parse_py_modules(value)?,
                "excludes" => spec.excludes = parse_excludes(value)?,
                "env_vars" => spec.env_vars = parse_env_vars(value)?,
                "pip" => spec.packages = parse_packages(value, InstallerField::Pip)?,
                "uv" => spec.packages = parse_packages(value, InstallerField::Uv)?,
                "config" => spec.config = parse_config(value)?,
                "_ray_commit" => {}
                other => {
                    return Err(SpecError::new(
                        other,
                        format!(
                            "unknown field; supported fields are: {}",
                            SUPPORTED_FIELDS.join(", ")
                        ),
                    ));
                }
            }
        }
        if map.get("pip").is_some_and(|v| !v.is_null()) && map.get("uv").is_some_and(|v| !v.is_null()) {
            return Err(SpecError::new(
                "uv",
                "`pip` and `uv` cannot both be given; use one of them",
            ));
        }
        // As in Ray, excludes apply to every local directory packaged (the working_dir
        // and py_modules); with none, they would be silently ignored.
        let local = |p: &WorkingDirSpec| matches!(p, WorkingDirSpec::Local(_));
        if !spec.excludes.is_empty() && !spec.working_dir.iter().chain(&spec.py_modules).any(local) {
            return Err(SpecError::new(
                "excludes",
                "applies only to local directories (working_dir, py_modules); a zip or package is used as it is",
            ));
        }
        Ok(spec)
    }

    /// The canonical JSON form: sorted keys, one spelling for each field
    /// (`{"pip": [..]}` and `{"pip": {"packages": [..]}}` agree, defaults filled in).
    pub fn canonical_json(&self) -> Value {
        let mut out = Map::new();
        if let Some(wd) = &self.working_dir {
            out.insert("working_dir".into(), wd.to_string().into());
        }
        if !self.py_modules.is_empty() {
            let modules: Vec<Value> = self.py_modules.iter().map(|m| m.to_string().into()).collect();
            out.insert("py_modules".into(), modules.into());
        }
        if !self.excludes.is_empty() {
            out.insert("excludes".into(), self.excludes.clone().into());
        }
        if !self.env_vars.is_empty() {
            out.insert(
                "env_vars".into(),
                serde_json::to_value(&self.env_vars).expect("strings"),
            );
        }
        if let Some(p) = &self.packages {
            let packages = match &p.packages {
                PackageList::Listed(reqs) => reqs.iter().map(|r| r.canonical()).collect::<Vec<_>>().into(),
                PackageList::RequirementsFile(path) => Value::from(path.display().to_string()),
            };
            let mut m = Map::new();
            m.insert("packages".into(), packages);
            m.insert("check".into(), p.check.into());
            m.insert("installer_version".into(), p.installer_version.clone().into());
            m.insert("install_options".into(), p.install_options.clone().into());
            out.insert(p.field.as_str().into(), Value::Object(m));
        }
        let mut config = Map::new();
        config.insert(
            "setup_timeout_seconds".into(),
            self.config
                .setup_timeout_seconds
                .map_or(Value::from(-1), Value::from),
        );
        config.insert("eager_install".into(), self.config.eager_install.into());
        out.insert("config".into(), Value::Object(config));
        Value::Object(out)
    }
}

/// How a JSON value reads in an error message: `1`, `true`, `null`, `a list`, `"text"`.
fn describe(value: &Value) -> String {
    match value {
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
        Value::String(s) if s.len() > 60 => {
            format!("{:?}…", s.chars().take(60).collect::<String>())
        }
        other => other.to_string(),
    }
}

fn expected(field: impl Into<String>, what: &str, got: &Value) -> SpecError {
    SpecError::new(field, format!("expected {what}, got {}", describe(got)))
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

impl std::fmt::Display for WorkingDirSpec {
    /// As a spec spells it (the canonical form).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkingDirSpec::Local(p) => write!(f, "{}", p.display()),
            WorkingDirSpec::FileZip(p) => write!(f, "file://{}", p.display()),
            WorkingDirSpec::Package(d) => write!(f, "pkg://{d}"),
            WorkingDirSpec::Remote(uri) => write!(f, "{uri}"),
            WorkingDirSpec::Wheel(WheelSpec::Local(p)) => write!(f, "{}", p.display()),
            WorkingDirSpec::Wheel(WheelSpec::File(p)) => write!(f, "file://{}", p.display()),
            WorkingDirSpec::Wheel(WheelSpec::Remote(uri)) => write!(f, "{uri}"),
            WorkingDirSpec::Wheel(WheelSpec::Stored { package, file: name }) => {
                write!(f, "pkg://{package}/{name}")
            }
        }
    }
}

/// Most `py_modules` one spec may list.
const MAX_PY_MODULES: usize = 64;

fn parse_py_modules(value: &Value) -> Result<Vec<WorkingDirSpec>, SpecError> {
    let items = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => return Err(expected("py_modules", "a list of strings", other)),
    };
    if items.len() > MAX_PY_MODULES {
        return Err(SpecError::new(
            "py_modules",
            format!("at most {MAX_PY_MODULES} modules, got {}", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_location(&format!("py_modules[{i}]"), item, true))
        .collect()
}

fn parse_working_dir(value: &Value) -> Result<Option<WorkingDirSpec>, SpecError> {
    match value {
        Value::Null => Ok(None),
        value => parse_location("working_dir", value, false).map(Some),
    }
}

/// A package location: a local directory or `.zip`, `file:///abs.zip`, `pkg://<digest>`,
/// a remote zip; with `wheels` (py_modules), also a `.whl` at any of those places.
fn parse_location(field: &str, value: &Value, wheels: bool) -> Result<WorkingDirSpec, SpecError> {
    let s = match value {
        Value::String(s) => s.as_str(),
        other => {
            return Err(expected(
                field,
                "a string (a directory, a .zip, file://…zip, pkg://<digest>, or an s3://, gs://, https:// zip)",
                other,
            ));
        }
    };
    if s.is_empty() {
        return Err(SpecError::new(
            field,
            "expected a path or URI, got an empty string",
        ));
    }
    if s.contains('\0') || has_control(s) {
        return Err(SpecError::new(field, "control characters are not allowed"));
    }
    let wheel = |spec: WheelSpec| -> Result<WorkingDirSpec, SpecError> {
        if !wheels {
            return Err(SpecError::new(
                field,
                "a wheel cannot be the working_dir; list it in py_modules (installed into the env)",
            ));
        }
        if !is_wheel_name(spec.file_name()) {
            return Err(SpecError::new(
                field,
                format!(
                    "expected a wheel file name (name-version-python-abi-platform.whl), got {:?}",
                    spec.file_name()
                ),
            ));
        }
        Ok(WorkingDirSpec::Wheel(spec))
    };
    if let Some(rest) = s.strip_prefix("pkg://")
        && let Some((hex, file)) = rest.split_once('/')
        && file.ends_with(".whl")
    {
        let package = hex.parse().map_err(|_| {
            SpecError::new(
                field,
                format!("expected pkg://<64 lowercase hex digits>/<file>.whl, got {s:?}"),
            )
        })?;
        return wheel(WheelSpec::Stored {
            package,
            file: file.to_string(),
        });
    }
    if let Some(hex) = s.strip_prefix("pkg://") {
        let digest = hex.parse().map_err(|_| {
            SpecError::new(
                field,
                format!("expected pkg://<64 lowercase hex digits>, got {s:?}"),
            )
        })?;
        return Ok(WorkingDirSpec::Package(digest));
    }
    if let Some(path) = s.strip_prefix("file://") {
        let path = PathBuf::from(path);
        if path.is_absolute() && path.extension().is_some_and(|e| e == "whl") {
            return wheel(WheelSpec::File(path));
        }
        if !path.is_absolute() || path.extension().is_none_or(|e| e != "zip") {
            return Err(SpecError::new(
                field,
                format!("expected file:///absolute/path.zip, got {s:?}"),
            ));
        }
        return Ok(WorkingDirSpec::FileZip(path));
    }
    if s.contains("://") {
        let uri = RemoteUri::parse(s).map_err(|e| SpecError::new(field, e.to_string()))?;
        if uri.file_name().ends_with(".whl") {
            return wheel(WheelSpec::Remote(uri));
        }
        if !uri.file_name().ends_with(".zip") {
            return Err(SpecError::new(
                field,
                format!("expected a remote .zip (as Ray accepts), got {s:?}"),
            ));
        }
        return Ok(WorkingDirSpec::Remote(uri));
    }
    if s.ends_with(".whl") {
        return wheel(WheelSpec::Local(PathBuf::from(s)));
    }
    Ok(WorkingDirSpec::Local(PathBuf::from(s)))
}

fn parse_excludes(value: &Value) -> Result<Vec<String>, SpecError> {
    let items = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => return Err(expected("excludes", "a list of gitignore patterns", other)),
    };
    if items.len() > limits::MAX_EXCLUDES {
        return Err(SpecError::new(
            "excludes",
            format!("at most {} patterns are allowed", limits::MAX_EXCLUDES),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("excludes[{i}]");
            match item {
                Value::String(s) if s.len() > limits::MAX_PATTERN_BYTES => {
                    Err(SpecError::new(field, "pattern is too long"))
                }
                Value::String(s) if has_control(s) => Err(SpecError::new(
                    field,
                    "control characters are not allowed in patterns",
                )),
                Value::String(s) => Ok(s.clone()),
                other => Err(expected(field, "a string", other)),
            }
        })
        .collect()
}

fn parse_env_vars(value: &Value) -> Result<BTreeMap<String, String>, SpecError> {
    let map = match value {
        Value::Null => return Ok(BTreeMap::new()),
        Value::Object(map) => map,
        other => return Err(expected("env_vars", "an object of string to string", other)),
    };
    if map.len() > limits::MAX_ENV_VARS {
        return Err(SpecError::new(
            "env_vars",
            format!("at most {} variables are allowed", limits::MAX_ENV_VARS),
        ));
    }
    let mut total = 0;
    let mut out = BTreeMap::new();
    for (name, value) in map {
        let field = format!("env_vars.{name}");
        let valid_name = !name.is_empty()
            && name.len() <= limits::MAX_ENV_NAME_BYTES
            && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(SpecError::new(
                field,
                "invalid variable name; expected letters, digits and `_`, not starting with a digit",
            ));
        }
        if MANAGED_ENV_VARS.contains(&name.as_str()) {
            return Err(SpecError::new(
                field,
                "is managed by renv from the GPUs a worker is given; request GPUs instead of setting it",
            ));
        }
        let Value::String(value) = value else {
            return Err(expected(field, "a string", value));
        };
        if value.contains('\0') {
            return Err(SpecError::new(field, "NUL bytes are not allowed in values"));
        }
        if value.len() > limits::MAX_ENV_VALUE_BYTES {
            return Err(SpecError::new(
                field,
                format!("value is longer than {} bytes", limits::MAX_ENV_VALUE_BYTES),
            ));
        }
        total += name.len() + value.len();
        if total > limits::MAX_ENV_TOTAL_BYTES {
            return Err(SpecError::new(
                "env_vars",
                format!("more than {} bytes in all", limits::MAX_ENV_TOTAL_BYTES),
            ));
        }
        out.insert(name.clone(), value.clone());
    }
    Ok(out)
}

fn parse_packages(value: &Value, field: InstallerField) -> Result<Option<PackageSpec>, SpecError> {
    let name = field.as_str();
    let (check_key, version_key, options_key) = match field {
        InstallerField::Pip => ("pip_check", "pip_version", "pip_install_options"),
        InstallerField::Uv => ("uv_check", "uv_version", "uv_pip_install_options"),
    };
    let mut spec = PackageSpec {
        field,
        packages: PackageList::Listed(Vec::new()),
        check: false,
        installer_version: None,
        install_options: Vec::new(),
    };
    match value {
        Value::Null => return Ok(None),
        Value::Array(_) | Value::String(_) => spec.packages = parse_package_list(value, name)?,
        Value::Object(map) => {
            let supported = ["packages", check_key, version_key, options_key];
            if !map.contains_key("packages") {
                return Err(SpecError::new(name, "expected a `packages` key in the dict form"));
            }
            for (key, v) in map {
                let path = format!("{name}.{key}");
                match key.as_str() {
                    "packages" => spec.packages = parse_package_list(v, &path)?,
                    k if k == check_key => {
                        spec.check = match v {
                            Value::Bool(b) => *b,
                            other => return Err(expected(path, "true or false", other)),
                        }
                    }
                    k if k == version_key => {
                        spec.installer_version = parse_installer_version(v, &path, name)?
                    }
                    k if k == options_key => spec.install_options = parse_options(v, &path)?,
                    _ => {
                        return Err(SpecError::new(
                            path,
                            format!("unknown key; supported keys are: {}", supported.join(", ")),
                        ));
                    }
                }
            }
        }
        other => {
            return Err(expected(
                name,
                "a list of requirements, a requirements file path, or an object",
                other,
            ));
        }
    }
    Ok(Some(spec))
}

fn parse_package_list(value: &Value, path: &str) -> Result<PackageList, SpecError> {
    match value {
        Value::String(file) => {
            if file.is_empty() || has_control(file) {
                return Err(SpecError::new(path, "expected a requirements file path"));
            }
            Ok(PackageList::RequirementsFile(PathBuf::from(file)))
        }
        Value::Array(items) => {
            if items.len() > limits::MAX_PACKAGES {
                return Err(SpecError::new(
                    path,
                    format!("at most {} packages are allowed", limits::MAX_PACKAGES),
                ));
            }
            let reqs = items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_requirement(item, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?;
            Ok(PackageList::Listed(reqs))
        }
        other => Err(expected(
            path,
            "a list of requirement strings or a requirements file path",
            other,
        )),
    }
}

/// One requirement string; also used for lines of a requirements file.
pub fn parse_requirement(value: &Value, path: &str) -> Result<Requirement, SpecError> {
    let Value::String(raw) = value else {
        return Err(expected(path, "a requirement string", value));
    };
    if raw.len() > limits::MAX_REQUIREMENT_BYTES {
        return Err(SpecError::new(path, "requirement is too long"));
    }
    Requirement::parse(raw).map_err(|message| SpecError::new(path, message))
}

fn parse_installer_version(value: &Value, path: &str, tool: &str) -> Result<Option<String>, SpecError> {
    let version = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s.trim(),
        other => {
            return Err(expected(path, "a version specifier such as \"==23.2.1\"", other));
        }
    };
    // Ray writes these as a bare specifier (`==22.0.2;python_version=='3.8'`): it is
    // valid exactly when `<tool><specifier>` is a valid requirement with specifiers.
    match requirement::installer_specifier(tool, version) {
        Some(spec) => Ok(Some(spec)),
        None => Err(SpecError::new(
            path,
            format!("expected a version specifier such as \"==23.2.1\", got {version:?}"),
        )),
    }
}

fn parse_options(value: &Value, path: &str) -> Result<Vec<String>, SpecError> {
    let Value::Array(items) = value else {
        return Err(expected(path, "a list of option strings", value));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) if !has_control(s) => Ok(s.clone()),
            Value::String(_) => Err(SpecError::new(
                format!("{path}[{i}]"),
                "control characters are not allowed",
            )),
            other => Err(expected(format!("{path}[{i}]"), "a string", other)),
        })
        .collect()
}

fn parse_config(value: &Value) -> Result<Config, SpecError> {
    let map = match value {
        Value::Null => return Ok(Config::default()),
        Value::Object(map) => map,
        other => return Err(expected("config", "an object", other)),
    };
    let mut config = Config::default();
    for (key, v) in map {
        let path = format!("config.{key}");
        match key.as_str() {
            "setup_timeout_seconds" => {
                config.setup_timeout_seconds = match v.as_i64() {
                    Some(-1) => None,
                    Some(n) if n > limits::MAX_SETUP_TIMEOUT_SECONDS && v.is_i64() => {
                        return Err(SpecError::new(
                            path,
                            format!(
                                "must be at most {} (a year), or -1 for no deadline, got {n}",
                                limits::MAX_SETUP_TIMEOUT_SECONDS
                            ),
                        ));
                    }
                    Some(n) if n > 0 && v.is_i64() => Some(n as u64),
                    _ => {
                        return Err(SpecError::new(
                            path,
                            format!("must be an integer > 0 or -1, got {}", describe(v)),
                        ));
                    }
                }
            }
            "eager_install" => {
                config.eager_install = match v {
                    Value::Bool(b) => *b,
                    other => return Err(expected(path, "true or false", other)),
                }
            }
            _ => {
                return Err(SpecError::new(
                    path,
                    "unknown key; supported keys are: setup_timeout_seconds, eager_install",
                ));
            }
        }
    }
    Ok(config)
}

impl fmt::Display for RuntimeEnvSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical_json().to_string())
    }
}

/// Ray keeps the first of duplicate requirements; so does renv, comparing canonical
/// forms (`requests==2.26` and `Requests == 2.26.0` are duplicates).
pub fn dedup_requirements(reqs: &[Requirement]) -> Vec<Requirement> {
    let mut seen = BTreeSet::new();
    reqs.iter()
        .filter(|r| seen.insert(r.canonical().to_string()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;
