//! Completion markers (`meta/<entry>.json`) and zip aliases, as types.
//!
//! A marker is written last when an entry is committed and removed first when it is
//! deleted: an entry directory without one is garbage, never served. It also carries what
//! `renv ls`, prune and verify need (size, creation time, what it was built from), so none
//! of them reads the entry itself. A marker that does not parse was never completely
//! written and reads as absent.
//!
//! Markers written before they were typed spelled the id `digest` (packages) or `key`
//! (envs); both still read.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;
use super::layout::EntryKind;
use crate::digest::{Digest, PackageDigest};

/// The completion marker of a committed entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub kind: EntryKind,
    /// The entry's digest (its directory name).
    #[serde(alias = "digest", alias = "key")]
    pub id: String,
    pub created_unix: u64,
    /// Bytes of its files (for envs, hardlinks into the uv cache counted in full).
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub files: u64,
    /// What it was built from, as `renv ls` shows it: `dir:/abs/path`, `zip:<blake3>`,
    /// `upload` for packages; the requirement list for envs.
    #[serde(default)]
    pub source: Value,
    /// What the entry's name is the digest of (an env's description), opaque to the
    /// store; kept for `renv verify` and for people reading the store.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub description: Value,
}

/// `meta/zip-<zip digest>.json`: the package a zip's bytes unpacked to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZipAlias {
    pub package: String,
}

impl super::Store {
    /// The package a zip with these bytes unpacked to, if it is still committed.
    pub fn zip_alias(&self, zip: Digest) -> Result<Option<PackageDigest>, StoreError> {
        let Some(alias) = read_json::<ZipAlias>(&self.layout().zip_alias_path(zip))? else {
            return Ok(None);
        };
        let Ok(digest) = alias.package.parse() else {
            return Ok(None);
        };
        Ok(self.find(digest)?.map(|entry| entry.id))
    }

    /// Records that the zip with these bytes unpacks to `package`.
    pub fn record_zip_alias(&self, zip: Digest, package: PackageDigest) -> Result<(), StoreError> {
        let alias = ZipAlias {
            package: package.to_string(),
        };
        Ok(write_json_atomic(&self.layout().zip_alias_path(zip), &alias)?)
    }
}

pub(super) fn unix_now() -> u64 {
    unix(SystemTime::now())
}

pub(super) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads a JSON file the store wrote; absent or unparsable (never completely written) is
/// `None`.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{e} (while reading {})", path.display()),
        )),
    }
}

/// Writes `value` to `path` durably: tmp file, fsync, rename, fsync the directory.
pub(crate) fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let dir = path.parent().expect("store files live in a directory");
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let mut file = fs_err::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value).expect("serializable"))?;
    file.sync_all()?;
    fs_err::rename(&tmp, path)?;
    super::fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_of_either_spelling_read() {
        let old_package = r#"{"kind": "package", "digest": "ab", "files": 2, "bytes": 10,
                              "created_unix": 5, "source": "dir:/x"}"#;
        let marker: Marker = serde_json::from_str(old_package).unwrap();
        assert_eq!(
            (marker.kind, marker.id.as_str(), marker.files),
            (EntryKind::Package, "ab", 2)
        );
        let old_env = r#"{"kind": "env", "key": "cd", "created_unix": 5, "bytes": 7,
                          "description": {"requirements": ["a"]}}"#;
        let marker: Marker = serde_json::from_str(old_env).unwrap();
        assert_eq!(
            (marker.kind, marker.id.as_str(), marker.bytes),
            (EntryKind::Env, "cd", 7)
        );
        assert_eq!(marker.description["requirements"][0], "a");
        assert!(serde_json::from_str::<Marker>(r#"{"kind": "zip"}"#).is_err());
    }
}
