//! Virtualenvs for the `pip` / `uv` fields, built by a real installer into the store.
//!
//! - [`interpreter`]: the base Python, resolved to its real path and identified.
//! - [`installer`]: the pinned uv (found or bootstrapped), or pip.
//! - [`sandbox`]: how installer steps run (allowlisted env, own process group, deadline).
//! - [`plan`] computes the [`EnvKey`] from everything that decides what the env holds
//!   (an [`EnvDescription`]); [`ensure`] builds the venv in a store transaction's staging
//!   directory and hands it to the store to commit.
//! - [`verify`]: what makes a committed env sound (`renv verify`); [`uv_cache`]: pruning
//!   the installer's wheel cache.
//!
//! A uv build: `uv venv --relocatable` (run once per uv, interpreter and options, and
//! copied from that [`template`] after that), then `uv pip install --offline` against
//! renv's own uv cache in the store (same filesystem, so files are hardlinked, not
//! copied), and only if the cache cannot satisfy it, the same install online.
//!
//! Bytecode: a committed env is read-only, so workers cannot write `__pycache__` into it.
//! By default nothing is compiled at build time (for numpy + pandas that would cost 25×
//! the install itself); workers get `PYTHONPYCACHEPREFIX` pointing at their own user's
//! bytecode cache outside the entries (`BuiltEnv::context_for`), and every env carries a
//! small import hook (`bytecode_hook.py`, loaded by a `.pth` file) that looks the store's
//! modules up there by the digest of their source rather than by their path. So a module
//! is compiled once per node and user for every env that has the same file (a new env
//! with pandas imports it as fast as an old one), and no user loads bytecode another
//! wrote. `--compile-bytecode` compiles everything at build time instead.
//!
//! With a build user (a root daemon's `--build-user`), every installer step runs as that
//! user ([`sandbox`]), the env is its caller's own ([`EnvDescription::built_for`]), and
//! the tree is taken back ([`sandbox::reclaim`]), recorded ([`build_record`]) and sealed
//! by the store before anyone uses it.

pub mod build_record;
pub mod installer;
pub mod interpreter;
mod probe;
pub mod sandbox;
pub mod template;
pub mod uv_cache;
pub mod verify;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

pub use installer::{Installer, UV_VERSION};
pub use interpreter::Interpreter;
pub use sandbox::BuildUser;
use sandbox::Sandbox;

use crate::digest::{Digest, EnvKey};
use crate::progress::Progress;
use crate::resolve::ResolvedPackages;
use crate::sources::wheel::WheelFile;
use crate::spec::InstallerField;
use crate::store::{Begin, Commit, Contents, EntryId, EnvEntry, LockMode, LockName, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    #[error("no Python interpreter at {0}; set --python / RENV_PYTHON")]
    NoInterpreter(PathBuf),
    #[error("{binary}: {reason}", binary = .binary.display())]
    Probe { binary: PathBuf, reason: String },
    #[error("cannot start {program}: {source}", program = .program.display())]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{field}: {option:?} is not allowed on this node; allowed install options: {allowed}")]
    OptionNotAllowed {
        field: String,
        option: String,
        allowed: String,
    },
    #[error("{field}: {message}")]
    Unsupported { field: String, message: String },
    #[error("{step} timed out after {secs}s (config.setup_timeout_seconds); full log: {log}", log = .log.display())]
    Timeout { step: String, secs: u64, log: PathBuf },
    #[error("{step} failed ({status}); full log: {log}\n{tail}", log = .log.display())]
    Failed {
        step: String,
        status: String,
        tail: String,
        log: PathBuf,
    },
    #[error(transparent)]
    Store(#[from] Box<StoreError>),
    /// The same failure, shared by every caller that waited on one build.
    #[error(transparent)]
    Shared(std::sync::Arc<VenvError>),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for VenvError {
    fn from(e: StoreError) -> Self {
        VenvError::Store(Box::new(e))
    }
}

impl VenvError {
    /// Input the request or the operator got wrong (exit 2), versus an internal failure.
    pub fn is_user_error(&self) -> bool {
        match self {
            VenvError::Shared(e) => e.is_user_error(),
            _ => matches!(
                self,
                VenvError::NoInterpreter(_)
                    | VenvError::OptionNotAllowed { .. }
                    | VenvError::Unsupported { .. }
                    | VenvError::Failed { .. }
            ),
        }
    }
}

/// Which installer a node uses for specs that do not insist (`--installer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InstallerChoice {
    /// uv, unless a spec sets `pip_version`.
    #[default]
    Auto,
    /// `python -m venv` + pip for every env.
    Pip,
}

/// Where packages come from: the operator's configuration, never the request's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IndexConfig {
    pub index_url: Option<String>,
    pub extra_index_urls: Vec<String>,
    pub find_links: Vec<String>,
    pub no_index: bool,
}

impl IndexConfig {
    /// The flags pip and `uv pip` both understand.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(url) = &self.index_url {
            args.extend(["--index-url".to_string(), url.clone()]);
        }
        for url in &self.extra_index_urls {
            args.extend(["--extra-index-url".to_string(), url.clone()]);
        }
        for link in &self.find_links {
            args.extend(["--find-links".to_string(), link.clone()]);
        }
        if self.no_index {
            args.push("--no-index".to_string());
        }
        args
    }
}

/// Node policy for building envs (CLI / daemon flags).
#[derive(Debug, Clone, Default)]
pub struct VenvPolicy {
    pub python: Option<PathBuf>,
    pub uv: Option<PathBuf>,
    pub installer: InstallerChoice,
    pub index: IndexConfig,
    /// Install options a request may use (`--allow-install-option`).
    pub allowed_install_options: Vec<String>,
    /// Whether `name @ https://…` requirements may bypass a configured index
    /// (`--no-index` or `--index-url`) (`--allow-direct-urls`).
    pub allow_direct_urls: bool,
    pub system_site_packages: bool,
    /// Compile all bytecode at build time (`--compile-bytecode`), instead of lazily into
    /// the per-env bytecode cache.
    pub compile_bytecode: bool,
    /// Who installers run as (`renv daemon --build-user`); `None`: renv's own user.
    pub build_user: Option<BuildUser>,
    /// The uid a build user's build is for (the daemon's caller): part of the env's
    /// identity, so what one caller's installs made is never another's env.
    pub build_for: Option<u32>,
}

/// Everything that decides what an env holds, and its key.
#[derive(Debug, Clone)]
pub struct VenvPlan {
    pub key: EnvKey,
    pub python: Interpreter,
    pub installer: Installer,
    pub packages: ResolvedPackages,
    /// `py_modules` wheels to install, as files in the store.
    pub wheels: Vec<PathBuf>,
    pub index: IndexConfig,
    pub system_site_packages: bool,
    pub compile_bytecode: bool,
    /// Who the installer runs as; not part of the key (who builds an env does not change
    /// what it holds: the store checks and seals it either way).
    pub build_user: Option<BuildUser>,
    /// What the key is the digest of (kept in the entry's marker).
    pub description: EnvDescription,
}

/// What an env key is the digest of: its JSON encoding, fields in this order (a struct,
/// so no serde_json feature can reorder them). `version` changes whenever what decides an
/// env's contents changes, so old keys are never reused for different envs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvDescription {
    pub version: u32,
    /// Canonical requirement strings, in the request's order, duplicates dropped.
    pub requirements: Vec<String>,
    pub install_options: Vec<String>,
    pub check: bool,
    pub installer: Installer,
    pub python: Interpreter,
    pub index: IndexConfig,
    pub system_site_packages: bool,
    pub compile_bytecode: bool,
    /// Wheels from `py_modules`, installed with the requirements, by name and content.
    /// Absent when there are none, so keys of envs without wheels are unchanged.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub wheels: Vec<WheelIdentity>,
    /// With a build user, the caller the env was built for. An installer run can be
    /// subverted by what it installs (an sdist's build code, a `.pth` file), so what one
    /// caller's installs produced is never served to another. Absent otherwise, so keys
    /// without a build user are unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub built_for: Option<u32>,
}

/// A wheel as an env's identity sees it: its file name (the installer reads name, version
/// and tags from it) and the sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WheelIdentity {
    pub file: String,
    pub sha256: String,
}

impl EnvDescription {
    /// The encoding's current version.
    pub const VERSION: u32 = 2;

    pub fn key(&self) -> EnvKey {
        EnvKey(Digest::of(
            &serde_json::to_vec(self).expect("an env description serializes"),
        ))
    }
}

impl EnvEntry {
    pub fn python(&self) -> PathBuf {
        self.path.join("bin").join("python")
    }
}

/// Checks the request against node policy, finds the interpreter and installer, and
/// computes the env key. Fast when everything was seen before (probes are cached).
pub fn plan(
    packages: &ResolvedPackages,
    wheels: &[WheelFile],
    policy: &VenvPolicy,
    store: &Store,
    timeout: Option<Duration>,
) -> Result<VenvPlan, VenvError> {
    check_policy(packages, policy)?;
    let python = interpreter::find(policy.python.as_deref(), Some(&store.layout().probe_cache_dir()))?;
    let installer = match (packages.field, &packages.installer_version) {
        (InstallerField::Pip, Some(version)) => Installer::Pip {
            pip_version: Some(version.clone()),
        },
        _ if policy.installer == InstallerChoice::Pip => Installer::Pip { pip_version: None },
        (InstallerField::Uv, Some(version)) => {
            let exact = version
                .strip_prefix("==")
                .filter(|v| !v.contains([',', ';', '*', ' ']));
            let Some(exact) = exact else {
                return Err(VenvError::Unsupported {
                    field: "uv.uv_version".into(),
                    message: format!("only an exact version (\"==0.4.0\") is supported, got {version:?}"),
                });
            };
            let bootstrap = policy.index.args();
            installer::find_uv(None, exact, store, &python, &bootstrap, timeout)?
        }
        _ => installer::find_uv(
            policy.uv.as_deref(),
            UV_VERSION,
            store,
            &python,
            &policy.index.args(),
            timeout,
        )?,
    };
    let description = EnvDescription {
        version: EnvDescription::VERSION,
        requirements: packages
            .requirements
            .iter()
            .map(|r| r.canonical().to_string())
            .collect(),
        install_options: packages.install_options.clone(),
        check: packages.check,
        installer: installer.clone(),
        python: python.clone(),
        index: policy.index.clone(),
        system_site_packages: policy.system_site_packages,
        compile_bytecode: policy.compile_bytecode,
        wheels: wheels
            .iter()
            .map(|w| WheelIdentity {
                file: w.file_name.clone(),
                sha256: w.sha256.clone(),
            })
            .collect(),
        // Every build user's build is for someone: the caller, else renv's own user.
        built_for: policy
            .build_user
            .map(|_| policy.build_for.unwrap_or_else(crate::sys::geteuid)),
    };
    let key = description.key();
    Ok(VenvPlan {
        key,
        python,
        installer,
        packages: packages.clone(),
        wheels: wheels.iter().map(WheelFile::path).collect(),
        index: policy.index.clone(),
        system_site_packages: policy.system_site_packages,
        compile_bytecode: policy.compile_bytecode,
        build_user: policy.build_user,
        description,
    })
}

/// The request against node policy (install options, direct URLs): checked before
/// anything is fetched or built.
pub fn check_policy(packages: &ResolvedPackages, policy: &VenvPolicy) -> Result<(), VenvError> {
    check_install_options(packages, policy)?;
    check_direct_urls(packages, policy)
}

/// A direct URL fetches from wherever it points: with an index policy configured (`--no-index`,
/// `--index-url`), it is the operator's to allow.
fn check_direct_urls(packages: &ResolvedPackages, policy: &VenvPolicy) -> Result<(), VenvError> {
    let index_policy = policy.index.no_index || policy.index.index_url.is_some();
    if !index_policy || policy.allow_direct_urls {
        return Ok(());
    }
    match packages.requirements.iter().find(|r| r.is_direct_url()) {
        None => Ok(()),
        Some(requirement) => Err(VenvError::Unsupported {
            field: packages.field.as_str().to_string(),
            message: format!(
                "{:?} names its own URL, which would bypass this node's package index \
                 (--no-index / --index-url); the operator can allow that with --allow-direct-urls",
                requirement.given()
            ),
        }),
    }
}

fn check_install_options(packages: &ResolvedPackages, policy: &VenvPolicy) -> Result<(), VenvError> {
    let key = match packages.field {
        InstallerField::Pip => "pip.pip_install_options",
        InstallerField::Uv => "uv.uv_pip_install_options",
    };
    for (i, option) in packages.install_options.iter().enumerate() {
        // `--opt=value` is allowed when `--opt` is.
        let name = option.split_once('=').map_or(option.as_str(), |(name, _)| name);
        if !policy
            .allowed_install_options
            .iter()
            .any(|allowed| allowed == option || allowed == name)
        {
            let allowed = if policy.allowed_install_options.is_empty() {
                "none (the operator can allow some with --allow-install-option)".to_string()
            } else {
                policy.allowed_install_options.join(", ")
            };
            return Err(VenvError::OptionNotAllowed {
                field: format!("{key}[{i}]"),
                option: option.clone(),
                allowed,
            });
        }
    }
    Ok(())
}

/// The committed env `key`, if it is usable: its interpreter link must still resolve (a
/// removed base Python means a rebuild). The cheap check every hit pays.
pub fn find(store: &Store, key: EnvKey) -> Result<Option<EnvEntry>, StoreError> {
    store.find_usable(key, |entry| entry.python().exists())
}

/// Ensures the planned env is committed: built in a store transaction if it is new, once
/// per process however many callers ask at the same time (they share its failure too).
/// On failure the build log stays (the error names it) and the staging dir goes.
pub fn ensure(
    plan: &VenvPlan,
    store: &Store,
    timeout: Option<Duration>,
    progress: &Progress,
) -> Result<EnvEntry, VenvError> {
    if let Some(hit) = find(store, plan.key)? {
        return Ok(hit);
    }
    store
        .single_flight(plan.key, || {
            ensure_once(plan, store, timeout, progress).map_err(std::sync::Arc::new)
        })
        .map_err(|e| match std::sync::Arc::try_unwrap(e) {
            Ok(e) => e,
            Err(shared) => VenvError::Shared(shared),
        })
}

fn ensure_once(
    plan: &VenvPlan,
    store: &Store,
    timeout: Option<Duration>,
    progress: &Progress,
) -> Result<EnvEntry, VenvError> {
    let tx = match store.begin_checked(plan.key, |entry| entry.python().exists())? {
        Begin::Committed(hit) => return Ok(hit),
        Begin::Build(tx) => tx,
    };
    let id = EntryId::from(plan.key);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let log = store
        .layout()
        .build_log_path(id, &format!("{}-{nanos}", std::process::id()));
    let start = Instant::now();
    let venv = tx.entry_dir();
    {
        // One build at a time per build user; its leftovers are killed when it ends,
        // before the store seals what it made.
        let slot = match (plan.build_user, plan.description.built_for) {
            (Some(user), Some(caller)) => Some(sandbox::BuildSlot::take(store, user, caller)?),
            _ => None,
        };
        let built = build(
            plan,
            &venv,
            tx.work_dir(),
            store,
            log.clone(),
            timeout,
            slot.as_ref(),
        );
        let reclaim = slot.is_some();
        drop(slot);
        if reclaim {
            sandbox::reclaim(tx.work_dir())?;
        }
        built?;
    }
    // Once the tree is the store owner's alone (reclaimed, the build user's processes
    // gone): nothing can swap a directory in it for a symlink meanwhile.
    install_bytecode_hook(plan, &venv)?;
    if let Installer::Pip { .. } = plan.installer {
        relocate_scripts(&venv, &store.layout().entry_path(id))?;
    }
    let vouched = build_record::vouched(&venv)?;
    let install_ms = start.elapsed().as_millis() as u64;
    // The last successful build's log, under a stable name.
    let _ = fs_err::rename(&log, store.layout().last_build_log_path(id));
    let commit = Commit {
        contents: Contents::Walk {
            builder: plan.build_user.map(|user| user.uid),
            vouched: &vouched,
        },
        source: serde_json::to_value(&plan.description.requirements).expect("strings serialize"),
        description: serde_json::to_value(&plan.description).expect("an env description serializes"),
        timings_ms: BTreeMap::from([("install", install_ms)]),
    };
    Ok(tx.commit(commit, progress)?)
}

/// Builds the planned env at `venv` (inside the staging dir `work`), logging to `log`.
fn build(
    plan: &VenvPlan,
    venv: &Path,
    work: &Path,
    store: &Store,
    log: PathBuf,
    timeout: Option<Duration>,
    slot: Option<&sandbox::BuildSlot>,
) -> Result<(), VenvError> {
    let mut sandbox = Sandbox::new(work, log, timeout, slot.map(sandbox::BuildSlot::user))?;
    match &plan.installer {
        Installer::Uv { path: uv, .. } => {
            // A build user's cache stays writable by whatever runs as it, so its files are
            // copied into the env, never shared with it (and sealing an env never changes
            // the cache); the store owner's own cache is hardlinked from.
            let (cache, link_mode) = match slot {
                None => (store.layout().uv_cache_dir(), "hardlink"),
                Some(slot) => (slot.cache().to_path_buf(), "copy"),
            };
            build_with_uv(plan, uv, venv, (&cache, link_mode), store, &mut sandbox)
        }
        Installer::Pip { pip_version } => build_with_pip(plan, pip_version.as_deref(), venv, &mut sandbox),
    }
}

fn build_with_uv(
    plan: &VenvPlan,
    uv: &Path,
    venv: &Path,
    (cache, link_mode): (&Path, &str),
    store: &Store,
    sandbox: &mut Sandbox,
) -> Result<(), VenvError> {
    // Builds share the cache; `renv prune` cleans it only when no build holds this.
    let _cache_in_use = store.lock(LockName::UvCache, LockMode::Shared)?;
    let env: [(&str, &OsStr); 3] = [
        ("UV_PYTHON_DOWNLOADS", OsStr::new("never")),
        ("UV_CACHE_DIR", cache.as_os_str()),
        ("UV_LINK_MODE", OsStr::new(link_mode)),
    ];
    template::make_venv(plan, uv, venv, store, sandbox, &env)?;
    link_parent_site_packages(plan, venv)?;

    let python = venv.join("bin").join("python");
    let mut install: Vec<OsString> = ["pip", "install", "--no-config", "--python"]
        .map(OsString::from)
        .to_vec();
    install.push(python.clone().into());
    if plan.compile_bytecode {
        install.push("--compile-bytecode".into());
    }
    install.extend(plan.index.args().into_iter().map(OsString::from));
    install.extend(plan.packages.install_options.iter().map(OsString::from));
    install.extend(
        plan.packages
            .requirements
            .iter()
            .map(|r| OsString::from(r.canonical())),
    );
    install.extend(plan.wheels.iter().map(OsString::from));
    // Offline first: a warm cache needs no index at all. Only a miss goes online.
    let mut offline = install.clone();
    offline.insert(2, "--offline".into());
    if sandbox
        .run("uv pip install --offline", uv, &as_os(&offline), &env)
        .is_err()
    {
        sandbox.run("uv pip install", uv, &as_os(&install), &env)?;
    }
    if plan.packages.check {
        let check: Vec<OsString> = vec!["pip".into(), "check".into(), "--python".into(), python.into()];
        sandbox.run("uv pip check", uv, &as_os(&check), &env)?;
    }
    Ok(())
}

/// `uv venv` into `target`, as every uv build once ran it: now into a [`template`], and
/// into an env only where its template cannot be made or used.
fn uv_venv(
    plan: &VenvPlan,
    uv: &Path,
    target: &Path,
    sandbox: &mut Sandbox,
    env: &[(&str, &OsStr)],
) -> Result<(), VenvError> {
    let mut args: Vec<OsString> = ["venv", "--relocatable", "--no-config", "--quiet", "--python"]
        .map(OsString::from)
        .to_vec();
    args.push(plan.python.path.clone().into());
    if plan.system_site_packages {
        args.push("--system-site-packages".into());
    }
    args.push(target.into());
    sandbox.run("uv venv", uv, &as_os(&args), env)
}

fn build_with_pip(
    plan: &VenvPlan,
    pip_version: Option<&str>,
    venv: &Path,
    sandbox: &mut Sandbox,
) -> Result<(), VenvError> {
    // pip runs with `--isolated` (no user config, no PIP_* from outside); these are renv's.
    let env: [(&str, &OsStr); 3] = [
        ("PIP_NO_INPUT", OsStr::new("1")),
        ("PIP_DISABLE_PIP_VERSION_CHECK", OsStr::new("1")),
        ("PYTHONNOUSERSITE", OsStr::new("1")),
    ];
    let mut args: Vec<OsString> = vec!["-I".into(), "-m".into(), "venv".into()];
    if plan.system_site_packages {
        args.push("--system-site-packages".into());
    }
    args.push(venv.into());
    sandbox.run("python -m venv", &plan.python.path, &as_os(&args), &env)?;
    link_parent_site_packages(plan, venv)?;

    let python = venv.join("bin").join("python");
    let pip = |extra: &[OsString]| -> Vec<OsString> {
        let mut args: Vec<OsString> = ["-I", "-m", "pip", "install", "--isolated"]
            .map(OsString::from)
            .to_vec();
        args.extend(plan.index.args().into_iter().map(OsString::from));
        args.extend(extra.iter().cloned());
        args
    };
    if let Some(version) = pip_version {
        sandbox.run(
            "pip install (pip_version)",
            &python,
            &as_os(&pip(&[format!("pip{version}").into()])),
            &env,
        )?;
    }
    let mut packages: Vec<OsString> = plan.packages.install_options.iter().map(OsString::from).collect();
    if !plan.compile_bytecode {
        packages.push("--no-compile".into());
    }
    packages.extend(
        plan.packages
            .requirements
            .iter()
            .map(|r| OsString::from(r.canonical())),
    );
    packages.extend(plan.wheels.iter().map(OsString::from));
    sandbox.run("pip install", &python, &as_os(&pip(&packages)), &env)?;
    if plan.packages.check {
        let check: Vec<OsString> = ["-I", "-m", "pip", "check"].map(OsString::from).to_vec();
        sandbox.run("pip check", &python, &as_os(&check), &env)?;
    }
    Ok(())
}

/// With `--system-site-packages` and a virtualenv's interpreter as `--python`, the env also
/// sees that venv's packages: a `.pth` file lists them, so they come after the env's own
/// packages (a requested version wins) and before the base interpreter's.
fn link_parent_site_packages(plan: &VenvPlan, venv: &Path) -> Result<(), VenvError> {
    if !plan.system_site_packages || plan.python.parent_site_packages.is_empty() {
        return Ok(());
    }
    let site_packages = site_packages(venv)?;
    let mut lines = String::new();
    for dir in &plan.python.parent_site_packages {
        lines.push_str(&dir.to_string_lossy());
        lines.push('\n');
    }
    // A new file, never through a name someone left there.
    let mut file = crate::package::tree::create_file(&site_packages, "_renv_parent_venv.pth", false)?;
    std::io::Write::write_all(&mut file, lines.as_bytes())?;
    Ok(())
}

/// The venv's `lib/pythonX.Y/site-packages`.
fn site_packages(venv: &Path) -> std::io::Result<PathBuf> {
    let lib = venv.join("lib");
    fs_err::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages"))
        .find(|path| path.is_dir())
        .ok_or_else(|| std::io::Error::other(format!("no site-packages under {}", lib.display())))
}

/// The module that makes the env's workers share bytecode by source content (see its
/// doc, `bytecode_hook.py`), and the `.pth` line that loads it when Python starts. Not
/// for envs compiled at build time: their bytecode is in the env already.
const BYTECODE_HOOK: &str = include_str!("bytecode_hook.py");

fn install_bytecode_hook(plan: &VenvPlan, venv: &Path) -> Result<(), VenvError> {
    if plan.compile_bytecode {
        return Ok(());
    }
    let site_packages = site_packages(venv)?;
    // The installer made these directories: each must be one, not a symlink to elsewhere.
    for dir in site_packages
        .ancestors()
        .take_while(|dir| dir.starts_with(venv) && *dir != venv)
    {
        if !fs_err::symlink_metadata(dir)?.is_dir() {
            return Err(std::io::Error::other(format!("{}: not a directory", dir.display())).into());
        }
    }
    for (name, text) in [
        ("_renv_bytecode.py", BYTECODE_HOOK),
        ("_renv_bytecode.pth", "import _renv_bytecode\n"),
    ] {
        // New files, never through a name someone left there.
        let mut file = crate::package::tree::create_file(&site_packages, name, false)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
    }
    Ok(())
}

/// `python -m venv` writes absolute paths (script shebangs, activate scripts); point those
/// at where the env will live once published.
pub fn relocate_scripts(venv: &Path, final_path: &Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let from = venv.as_os_str().as_encoded_bytes();
    let to = final_path.as_os_str().as_encoded_bytes();
    // An installer's output is not trusted to be what it seems: `bin` must be a real
    // directory, and each script is opened without following a symlink.
    let bin = venv.join("bin");
    if !fs_err::symlink_metadata(&bin)?.is_dir() {
        return Err(std::io::Error::other(format!(
            "{}: not a directory",
            bin.display()
        )));
    }
    for entry in fs_err::read_dir(&bin)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(entry.path())?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        if let Some(replaced) = replace_all(&bytes, from, to) {
            file.set_len(0)?;
            std::io::Seek::rewind(&mut file)?;
            file.write_all(&replaced)?;
        }
    }
    Ok(())
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    let mut found = false;
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
        found = true;
    }
    out.extend_from_slice(rest);
    found.then_some(out)
}

fn as_os(args: &[OsString]) -> Vec<&OsStr> {
    args.iter().map(OsString::as_os_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn description() -> EnvDescription {
        EnvDescription {
            version: EnvDescription::VERSION,
            requirements: vec!["requests==2.26".into(), "numpy>=1.26".into()],
            install_options: vec![],
            check: false,
            installer: Installer::Uv {
                path: "/ignored/uv".into(),
                version: "0.13.9".into(),
            },
            python: Interpreter {
                path: "/usr/bin/python3.11".into(),
                version: "3.11.7".into(),
                implementation: "cpython".into(),
                parent_site_packages: vec![],
            },
            index: IndexConfig::default(),
            system_site_packages: false,
            compile_bytecode: false,
            wheels: Vec::new(),
            built_for: None,
        }
    }

    /// Pinned: an env key must not change unless `EnvDescription::VERSION` does (a change
    /// here orphans every env in every store).
    #[test]
    fn env_keys_are_pinned() {
        let base = description();
        let mut pip = description();
        pip.installer = Installer::Pip { pip_version: None };
        let mut indexed = description();
        indexed.index.find_links = vec!["/wheels".into()];
        indexed.system_site_packages = true;
        let cases = [
            (
                base.key(),
                "f7c2642fe8237c31cbc4b7fa2fe498bbb48657d1b02d3919fd6531469c7c7571",
            ),
            (
                pip.key(),
                "acac5761ec8e75b494bfa9556350a2c56c632d33b5b2d413f57ea41295bd76de",
            ),
            (
                indexed.key(),
                "5e65f7146f5eb4a80b5b7a187789c6b93e4ff784e581beb63e6a99aceecca553",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got.to_string(), want);
        }
        // Where uv lives is not what the env is.
        let mut moved = description();
        moved.installer = Installer::Uv {
            path: "/elsewhere/uv".into(),
            version: "0.13.9".into(),
        };
        assert_eq!(moved.key(), base.key());
        // A build user's env is its caller's own.
        let mut with_wheel = description();
        with_wheel.wheels.push(WheelIdentity {
            file: "delta-1.0-py3-none-any.whl".into(),
            sha256: "ab".repeat(32),
        });
        assert_ne!(
            with_wheel.key(),
            base.key(),
            "a wheel is part of an env's identity"
        );
        let mut built_for = description();
        built_for.built_for = Some(1000);
        assert_ne!(built_for.key(), base.key());
    }
}
