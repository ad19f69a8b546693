//! Checking an env against what the store sealed (its record, [`crate::store::record`]),
//! so `renv verify` compares an env with what was built rather than with its wheels'
//! RECORD files alone (which anyone who could change the env could rewrite too).
//!
//! Content is checked two ways, so that building costs no hashing of the bulk of an env:
//! a file a wheel's RECORD lists with a sha256 is checked against that sha256 (the
//! installer vouches for it, see [`vouched`]), and everything else — the RECORD files
//! themselves, `pyvenv.cfg`, scripts, `.pth` files — against the blake3 the store
//! recorded when it sealed the env.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::digest::Digest;
use crate::store::record::{FILE_NAME, Recorded, SealedRecord, VERSION};

/// The files of the env at `env` that a wheel's RECORD lists with a sha256 (relative to
/// the env): the store need not hash them when it seals the env.
pub fn vouched(env: &Path) -> std::io::Result<HashSet<String>> {
    Ok(record_hashes(env)?.into_keys().collect())
}

/// What differs between the env at `env` and its build record, if anything: a path added,
/// missing, of another kind, mode, size or target, or content that matches neither the
/// record's hash nor its wheel's RECORD.
pub fn check(env: &Path) -> Option<String> {
    let text = match std::fs::read(env.join(FILE_NAME)) {
        Ok(text) => text,
        Err(e) => {
            return Some(format!(
                "its build record {FILE_NAME} cannot be read ({e}); rebuild it"
            ));
        }
    };
    let record: SealedRecord = match serde_json::from_slice(&text) {
        Ok(record) => record,
        Err(e) => return Some(format!("its build record {FILE_NAME} is not valid ({e})")),
    };
    if record.version != VERSION {
        return Some(format!(
            "its build record has version {}, expected {VERSION}",
            record.version
        ));
    }
    let found = match walk(env) {
        Ok(found) => found,
        Err(e) => return Some(format!("cannot be read back: {e}")),
    };
    let mut seen = HashSet::new();
    for (rel, meta) in &found {
        if rel == FILE_NAME {
            continue;
        }
        seen.insert(rel.as_str());
        let Some(expected) = record.paths.get(rel) else {
            return Some(format!("{rel} was added after the build"));
        };
        let kind = meta.file_type();
        let problem = match expected {
            Recorded::Symlink { target } => match std::fs::read_link(env.join(rel)) {
                Ok(actual) if kind.is_symlink() && &actual == target => None,
                _ => Some(format!(
                    "{rel} is no longer the symlink to {} it was built as",
                    target.display()
                )),
            },
            Recorded::Dir { mode } if kind.is_dir() => {
                (mode_of(meta) != *mode).then(|| mode_changed(rel, *mode, mode_of(meta)))
            }
            Recorded::File { mode, size, blake3 } if kind.is_file() => {
                if mode_of(meta) != *mode {
                    Some(mode_changed(rel, *mode, mode_of(meta)))
                } else if meta.len() != *size {
                    Some(format!("{rel} is {} bytes, built as {size}", meta.len()))
                } else if let Some(expected) = blake3 {
                    match std::fs::read(env.join(rel)) {
                        Ok(bytes) if Digest::of(&bytes).to_string() == *expected => None,
                        Ok(_) => Some(format!("{rel} changed since the build")),
                        Err(e) => Some(format!("{rel}: {e}")),
                    }
                } else {
                    None
                }
            }
            _ => Some(format!("{rel} is no longer the kind of file it was built as")),
        };
        if problem.is_some() {
            return problem;
        }
    }
    if let Some(missing) = record.paths.keys().find(|p| !seen.contains(p.as_str())) {
        return Some(format!("{missing} is missing"));
    }
    // The RECORD files are as built (hashed above); the files they list must match them.
    check_record_hashes(env)
}

fn mode_changed(rel: &str, built: u32, now: u32) -> String {
    format!("{rel} has mode {now:o}, built as {built:o}")
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

/// Every path below `env` (relative, `/`-separated) with its lstat, never following a
/// symlink.
fn walk(env: &Path) -> std::io::Result<Vec<(String, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let mut pending = vec![env.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs_err::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            let meta = fs_err::symlink_metadata(&path)?;
            if meta.is_dir() {
                pending.push(path.clone());
            }
            let rel = path
                .strip_prefix(env)
                .expect("walked below env")
                .to_string_lossy()
                .into_owned();
            out.push((rel, meta));
        }
    }
    Ok(out)
}

/// The `site-packages` directories of the env (`lib/python*/site-packages`).
fn site_packages(env: &Path) -> Vec<PathBuf> {
    let Ok(lib) = std::fs::read_dir(env.join("lib")) else {
        return Vec::new();
    };
    lib.filter_map(Result::ok)
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir()))
        .collect()
}

/// One line of a wheel's RECORD: the file (relative to the env) and its sha256, if given.
type RecordLine = (String, Option<String>);

/// Every file the env's RECORDs list with a sha256, relative to the env, and that hash.
/// Files a RECORD places outside the env are not the env's to check.
fn record_hashes(env: &Path) -> std::io::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (rel, hash) in record_lines(env)?.map_err(std::io::Error::other)? {
        if let Some(hash) = hash {
            out.insert(rel, hash);
        }
    }
    Ok(out)
}

/// The lines of every RECORD in the env, or the first malformed one (a RECORD that cannot
/// be read in full is a problem, never a pass).
fn record_lines(env: &Path) -> std::io::Result<Result<Vec<RecordLine>, String>> {
    let mut out = Vec::new();
    for site in site_packages(env) {
        for dist in fs_err::read_dir(&site)?.filter_map(Result::ok) {
            let record = dist.path().join("RECORD");
            if !dist.file_name().to_string_lossy().ends_with(".dist-info") || !record.is_file() {
                continue;
            }
            let text = fs_err::read_to_string(&record)?;
            for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
                let mut fields = line.rsplitn(3, ',');
                let (Some(_size), Some(hash), Some(path)) = (fields.next(), fields.next(), fields.next())
                else {
                    return Ok(Err(format!(
                        "{}: line {} is not `path,hash,size`",
                        record.display(),
                        number + 1
                    )));
                };
                let Some(rel) = lexical_join(&site, path)
                    .and_then(|p| p.strip_prefix(env).ok().map(|r| r.to_string_lossy().into_owned()))
                else {
                    continue;
                };
                let hash = hash.strip_prefix("sha256=").map(str::to_string);
                out.push((rel, hash));
            }
        }
    }
    Ok(Ok(out))
}

/// `base/rel` with `..` resolved by name, never by following a symlink.
fn lexical_join(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    for part in Path::new(rel).components() {
        match part {
            std::path::Component::Normal(name) => out.push(name),
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Every file the RECORDs list with a sha256 matches it.
fn check_record_hashes(env: &Path) -> Option<String> {
    use sha2::Digest as _;
    let lines = match record_lines(env) {
        Ok(Ok(lines)) => lines,
        Ok(Err(problem)) => return Some(problem),
        Err(e) => return Some(format!("cannot read its RECORD files: {e}")),
    };
    for (rel, hash) in lines {
        let Some(expected) = hash else { continue };
        let bytes = match std::fs::read(env.join(&rel)) {
            Ok(bytes) => bytes,
            Err(e) => return Some(format!("{rel}: {e}")),
        };
        // RECORD hashes are unpadded URL-safe base64.
        let actual = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&bytes));
        if actual != expected {
            return Some(format!("{rel} does not match the sha256 in its wheel's RECORD"));
        }
    }
    None
}
