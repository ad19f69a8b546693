//! What makes a committed env sound, for `renv verify`: its marker's description, its
//! `pyvenv.cfg`, the interpreter it was built with, and every installed file against its
//! wheel's RECORD (size and sha256, PEP 376/627).

use std::path::Path;

use base64::Engine as _;
use serde_json::Value;

use crate::store::EntryInfo;

/// What is wrong with the env `entry`, if anything.
pub fn env_problem(entry: &EntryInfo) -> Option<String> {
    let built_with: &Value = &entry.marker.description["python"]["path"];
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
    let real_env = std::fs::canonicalize(env).ok()?;
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
            if !real.starts_with(env) && !real.starts_with(&real_env) {
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
            // RECORD hashes are unpadded URL-safe base64.
            let actual =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&bytes));
            if actual != expected {
                return Some(format!("{path} does not match the sha256 in its wheel's RECORD"));
            }
        }
    }
    None
}
