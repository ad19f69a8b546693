//! Listing and pruning the store: `renv ls` and `renv prune`, safe to run from cron while
//! builds, runs and the daemon are active.
//!
//! Last use is the mtime of an entry's marker, refreshed on hits at most once a minute (no
//! write storm on hot paths). A timestamp in the future — a clock that jumped back — is
//! read as "unknown", which never protects an entry: only leases do.
//!
//! Removal of one entry, under its exclusive lock taken *non-blocking* (a held lease or a
//! build in progress means "in use": skip it):
//! marker first (from then on nobody serves it), then rename into trash, then delete.
//! A crash between the steps leaves a marker-less directory, which is garbage by the
//! store's rules and goes at the next prune or publish. Only names of the store's own
//! format are touched, and nothing is followed through a symlink.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use super::{LockFile, LockMode, Store, StoreError, read_json};

/// One committed entry, as `renv ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EntryInfo {
    pub kind: &'static str,
    pub id: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub created_unix: u64,
    pub last_used_unix: u64,
    /// Processes holding a lease (or building it) right now.
    pub holders: Vec<u32>,
    /// What it was built from: the working_dir source, or the requirement list.
    pub source: Value,
}

#[derive(Debug, Clone, Default)]
pub struct PrunePolicy {
    pub max_size: Option<u64>,
    pub older_than: Option<Duration>,
    pub min_age: Duration,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    #[serde(flatten)]
    pub entry: EntryInfo,
    pub reason: String,
}

#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub removed: Vec<Decision>,
    pub kept: Vec<Decision>,
    pub bytes_before: u64,
    pub bytes_freed: u64,
    pub orphans_removed: usize,
    /// What happened to the installer's wheel cache.
    pub uv_cache: String,
    /// Build and worker logs removed (untouched for longer than `--older-than`, else 7 days).
    pub logs_removed: usize,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Processes holding a `flock` on `path`, from /proc/locks.
fn lock_holders(path: &Path) -> Vec<u32> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let inode = meta.ino();
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = locks
        .lines()
        .filter(|line| line.contains("FLOCK"))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // "1: FLOCK ADVISORY READ 1234 08:01:5678 0 EOF" (a "->" marks a waiter)
            let at = fields.iter().position(|f| *f == "FLOCK")?;
            if fields.get(at.saturating_sub(1)) == Some(&"->") {
                return None;
            }
            let pid: u32 = fields.get(at + 3)?.parse().ok()?;
            let ino: u64 = fields.get(at + 4)?.rsplit(':').next()?.parse().ok()?;
            (ino == inode).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

impl EntryInfo {
    /// `pkg-<digest>` / `env-<key>`: the name of its lock and marker files.
    fn lock_name(&self) -> String {
        let prefix = if self.kind == "package" { "pkg" } else { "env" };
        format!("{prefix}-{}", self.id)
    }
}

impl Store {
    /// Records a use of the entry whose marker is `marker` (at most once a minute).
    pub(crate) fn touch(&self, marker: &Path) {
        let now = SystemTime::now();
        let fresh = std::fs::metadata(marker)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t <= now && now.duration_since(t).unwrap_or_default() < Duration::from_secs(60));
        if !fresh && let Ok(file) = std::fs::File::options().write(true).open(marker) {
            let _ = file.set_modified(now);
        }
    }

    /// Records a use of everything a built env holds (for hits served from memory).
    pub fn touch_built(&self, built: &crate::build::BuiltEnv) {
        if let Some(pkg) = &built.working_dir {
            self.touch(&self.package_marker(pkg.digest));
        }
        if let Some(env) = &built.venv {
            self.touch(&self.env_marker(env.key));
        }
    }

    /// Every committed entry.
    pub fn list_entries(&self) -> Result<Vec<EntryInfo>, StoreError> {
        let now = unix(SystemTime::now());
        let mut out = Vec::new();
        for (kind, dir, prefix) in [("package", "pkgs", "pkg"), ("env", "envs", "env")] {
            for entry in fs_err::read_dir(self.root.join(dir))? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !is_digest(&name) {
                    continue;
                }
                let marker = self.root.join("meta").join(format!("{prefix}-{name}.json"));
                let Some(meta) = read_json::<Value>(&marker)? else {
                    continue;
                };
                let mtime = std::fs::metadata(&marker)
                    .and_then(|m| m.modified())
                    .map(unix)
                    .unwrap_or(0);
                let created = meta["created_unix"].as_u64().unwrap_or(0);
                // A future stamp (the clock went back) says nothing: fall back to creation.
                let last_used = if mtime > now { created.min(now) } else { mtime };
                let source = match kind {
                    "package" => meta["source"].clone(),
                    _ => meta["description"]["requirements"].clone(),
                };
                out.push(EntryInfo {
                    kind,
                    path: self.root.join(dir).join(&name),
                    holders: lock_holders(&self.lock_path(&format!("{prefix}-{name}"))),
                    id: name,
                    bytes: meta["bytes"].as_u64().unwrap_or(0),
                    created_unix: created,
                    last_used_unix: last_used,
                    source,
                });
            }
        }
        out.sort_by(|a, b| (a.last_used_unix, &a.id).cmp(&(b.last_used_unix, &b.id)));
        Ok(out)
    }

    /// Evicts least-recently-used entries under `policy`. Returns what was removed and
    /// what was kept, and why.
    pub fn prune(&self, policy: &PrunePolicy) -> Result<PruneReport, StoreError> {
        let Some(_pruning) = LockFile::try_acquire(&self.lock_path("prune"), LockMode::Exclusive)? else {
            return Err(StoreError::Busy(
                "another renv prune is already running on this store".into(),
            ));
        };
        let now = unix(SystemTime::now());
        let entries = self.list_entries()?;
        let mut report = PruneReport {
            dry_run: policy.dry_run,
            ..PruneReport::default()
        };
        report.bytes_before = entries.iter().map(|e| e.bytes).sum();
        let mut total = report.bytes_before;
        for entry in entries {
            let over_size = policy.max_size.is_some_and(|max| total > max);
            let too_old = policy
                .older_than
                .is_some_and(|d| now.saturating_sub(entry.last_used_unix) > d.as_secs());
            if !over_size && !too_old {
                report.kept.push(Decision {
                    entry,
                    reason: "within policy".into(),
                });
                continue;
            }
            if now.saturating_sub(entry.created_unix) < policy.min_age.as_secs() {
                report.kept.push(Decision {
                    entry,
                    reason: "younger than --min-age".into(),
                });
                continue;
            }
            let lock_name = entry.lock_name();
            let Some(_lock) = LockFile::try_acquire(&self.lock_path(&lock_name), LockMode::Exclusive)? else {
                let reason = format!("in use (pids {:?})", lock_holders(&self.lock_path(&lock_name)));
                report.kept.push(Decision { entry, reason });
                continue;
            };
            let reason = if too_old {
                "unused for longer than --older-than"
            } else {
                "store over --max-size (LRU)"
            };
            if !policy.dry_run {
                let marker = self.root.join("meta").join(format!("{lock_name}.json"));
                // No fsync between the steps: if the marker's removal is lost in a crash, a
                // marker without its directory reads as absent, the same as no marker.
                fs_err::remove_file(&marker)?;
                self.discard(&entry.path, &lock_name)?;
                if entry.kind == "env" {
                    let pycache = self.pycache_of(&entry.path);
                    if pycache.exists() {
                        self.discard(&pycache, &format!("pycache-{}", entry.id))?;
                    }
                }
            }
            total = total.saturating_sub(entry.bytes);
            report.bytes_freed += entry.bytes;
            report.removed.push(Decision {
                entry,
                reason: reason.into(),
            });
        }
        if !policy.dry_run {
            report.orphans_removed = self.remove_orphans()?;
            report.uv_cache = self.prune_uv_cache();
            let keep = policy.older_than.unwrap_or(Duration::from_secs(7 * 86_400));
            report.logs_removed = self.prune_logs(keep.max(policy.min_age))?;
        }
        Ok(report)
    }

    /// Removes log files not written for longer than `keep` (a running worker's logs are
    /// being written, a spare log file is fresh; neither is old). Regular files only.
    fn prune_logs(&self, keep: Duration) -> Result<usize, StoreError> {
        let now = SystemTime::now();
        let mut removed = 0;
        for dir in [self.root.join("logs"), self.root.join("logs").join("workers")] {
            let Ok(entries) = fs_err::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > keep);
                if meta.is_file() && old && !entry.file_name().to_string_lossy().starts_with(".spare-") {
                    fs_err::remove_file(entry.path())?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// `uv cache prune` on the store's uv cache, but only while no build is using it
    /// (builds hold `locks/uv-cache.lock` shared), so a concurrent install never loses a
    /// file it is about to link.
    fn prune_uv_cache(&self) -> String {
        let cache = self.uv_cache_dir();
        if !cache.join("CACHEDIR.TAG").exists() {
            return "empty".into();
        }
        let pinned = self
            .root
            .join("tools")
            .join(format!("uv-{}", crate::venv::UV_VERSION))
            .join("bin/uv");
        let uv = std::env::var_os(crate::env_vars::RENV_UV)
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .or_else(|| pinned.exists().then_some(pinned))
            .or_else(|| which::which("uv").ok());
        let Some(uv) = uv else {
            return "skipped: no uv found (set RENV_UV)".into();
        };
        let Ok(Some(_exclusive)) = LockFile::try_acquire(&self.lock_path("uv-cache"), LockMode::Exclusive)
        else {
            return "skipped: a build is using it".into();
        };
        let status = std::process::Command::new(&uv)
            .args(["cache", "prune", "--quiet", "--no-config", "--cache-dir"])
            .arg(&cache)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => "pruned".into(),
            Ok(s) => format!("uv cache prune failed ({s})"),
            Err(e) => format!("cannot run {}: {e}", uv.display()),
        }
    }

    /// Marker-less entry directories (crashed publishes or prunes) and zip aliases whose
    /// package is gone.
    fn remove_orphans(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (dir, prefix) in [("pkgs", "pkg"), ("envs", "env")] {
            for entry in fs_err::read_dir(self.root.join(dir))? {
                let name = entry?.file_name().to_string_lossy().into_owned();
                if !is_digest(&name)
                    || self
                        .root
                        .join("meta")
                        .join(format!("{prefix}-{name}.json"))
                        .exists()
                {
                    continue;
                }
                // Under its lock: a publish renames the directory, then writes the marker.
                let lock_name = format!("{prefix}-{name}");
                if let Some(_lock) = LockFile::try_acquire(&self.lock_path(&lock_name), LockMode::Exclusive)?
                    && !self.root.join("meta").join(format!("{lock_name}.json")).exists()
                {
                    self.discard(&self.root.join(dir).join(&name), &lock_name)?;
                    removed += 1;
                }
            }
        }
        let packages: HashSet<String> = fs_err::read_dir(self.root.join("pkgs"))?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for entry in fs_err::read_dir(self.root.join("meta"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("zip-")
                && let Some(alias) = read_json::<BTreeMap<String, String>>(&entry.path())?
                && alias.get("package").is_some_and(|p| !packages.contains(p))
            {
                fs_err::remove_file(entry.path())?;
            }
        }
        Ok(removed)
    }
}

fn is_digest(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub id: String,
    pub problem: String,
    /// Removed (`--repair`), so the next request rebuilds it.
    pub repaired: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub checked: usize,
    pub problems: Vec<Finding>,
}

impl Store {
    /// Re-checks every committed entry: a package against its digest (re-read in full, no
    /// excludes), an env for its marker, `pyvenv.cfg` and the interpreter it was built
    /// with. With `repair`, a damaged entry that is not in use is removed.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        for entry in self.list_entries()? {
            report.checked += 1;
            let problem = match entry.kind {
                "package" => match crate::package::scan::scan_exact(&entry.path, self.options.threads) {
                    Ok(tree) if tree.manifest.digest().to_string() == entry.id => None,
                    Ok(tree) => Some(format!(
                        "contents hash to {}, not to its name",
                        tree.manifest.digest()
                    )),
                    Err(e) => Some(format!("cannot be read back: {e}")),
                },
                _ => self.env_problem(&entry),
            };
            let Some(problem) = problem else { continue };
            let name = entry.lock_name();
            let mut repaired = false;
            if repair && let Some(_lock) = LockFile::try_acquire(&self.lock_path(&name), LockMode::Exclusive)?
            {
                fs_err::remove_file(self.root.join("meta").join(format!("{name}.json")))?;
                self.discard(&entry.path, &name)?;
                repaired = true;
            }
            report.problems.push(Finding {
                kind: entry.kind,
                id: entry.id,
                problem,
                repaired,
            });
        }
        Ok(report)
    }

    fn env_problem(&self, entry: &EntryInfo) -> Option<String> {
        let marker = self.root.join("meta").join(format!("env-{}.json", entry.id));
        let built_with = read_json::<Value>(&marker).ok().flatten()?["description"]["python"]["path"].clone();
        if !entry.path.join("pyvenv.cfg").is_file() {
            return Some("pyvenv.cfg is missing".into());
        }
        let python = entry.path.join("bin").join("python");
        match (std::fs::canonicalize(&python), built_with.as_str()) {
            (Err(_), _) => Some("its interpreter is gone (bin/python does not resolve)".into()),
            (Ok(real), Some(expected)) if real != Path::new(expected) => Some(format!(
                "bin/python resolves to {}, built with {expected}",
                real.display()
            )),
            _ => check_records(&entry.path),
        }
    }
}

/// Checks every installed file of an env against its wheel's RECORD (size and sha256).
/// Returns the first mismatch.
fn check_records(env: &Path) -> Option<String> {
    use sha2::Digest as _;
    let lib = env.join("lib");
    let site_packages = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .find(|p| p.is_dir())?;
    for dist in std::fs::read_dir(&site_packages).ok()?.filter_map(Result::ok) {
        let record = dist.path().join("RECORD");
        let Ok(text) = std::fs::read_to_string(&record) else {
            continue;
        };
        for line in text.lines() {
            let mut fields = line.rsplitn(3, ',');
            let (size, hash, path) = (fields.next()?, fields.next()?, fields.next()?);
            let Some(expected) = hash.strip_prefix("sha256=") else {
                continue;
            };
            let file = site_packages.join(path);
            // Only files inside the env are ours to check.
            let Ok(real) = std::fs::canonicalize(&file) else {
                return Some(format!("{path} (listed in {}) is missing", record.display()));
            };
            if !real.starts_with(env) && !real.starts_with(std::fs::canonicalize(env).ok()?) {
                continue;
            }
            let bytes = match std::fs::read(&real) {
                Ok(bytes) => bytes,
                Err(e) => return Some(format!("{path}: {e}")),
            };
            if size.parse::<usize>().is_ok_and(|s| s != bytes.len()) {
                return Some(format!(
                    "{path} is {} bytes, its wheel's RECORD says {size}",
                    bytes.len()
                ));
            }
            let digest = sha2::Sha256::digest(&bytes);
            let actual = base64_url(&digest);
            if actual != expected {
                return Some(format!("{path} does not match the sha256 in its wheel's RECORD"));
            }
        }
    }
    None
}

/// Unpadded URL-safe base64, as wheel RECORD files write hashes.
fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
