//! Completion markers (`meta/<entry>.json`) and zip aliases, as types.
//!
//! A marker is written last when an entry is committed and removed first when it is
//! deleted: an entry directory without one is garbage, never served. It also carries what
//! `renv ls`, prune and verify need (size, creation time, what it was built from), so none
//! of them reads the entry itself. A marker that does not parse was never completely
//! written and reads as absent.
//!
//! The id is spelled `digest` in a package's marker and `key` in an env's, as every renv
//! using `store-v1` has written them, so renv versions sharing a store read each other's.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::StoreError;
use super::layout::{EntryId, EntryKind};
use crate::digest::{Digest, PackageDigest};

/// The completion marker of a committed entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub kind: EntryKind,
    /// A package's digest (its directory name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    /// An env's key (its directory name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
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

impl Marker {
    pub fn new(id: EntryId, bytes: u64, files: u64, source: Value, description: Value) -> Marker {
        let digest = Some(id.digest.to_string());
        let (digest, key) = match id.kind {
            EntryKind::Package => (digest, None),
            EntryKind::Env => (None, digest),
        };
        Marker {
            kind: id.kind,
            digest,
            key,
            created_unix: unix_now(),
            bytes,
            files,
            source,
            description,
        }
    }

    /// Whether this is the marker of `id` (a marker renamed to another entry's name is
    /// not that entry's).
    pub fn is_of(&self, id: EntryId) -> bool {
        let named = match self.kind {
            EntryKind::Package => &self.digest,
            EntryKind::Env => &self.key,
        };
        self.kind == id.kind && named.as_ref().is_some_and(|d| *d == id.digest.to_string())
    }
}

/// `meta/zip-<zip digest>.json`: the package a zip's bytes unpacked to. (Prune reads a
/// remote alias as this too: both name their package in `package`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ZipAlias {
    pub package: String,
}

/// `meta/remote-<digest of the URI>.json`: the package a remote object unpacked to, at
/// the revision (version, ETag, or time and size) its `HEAD` gave then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteAlias {
    pub uri: String,
    pub revision: String,
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

    /// The package the remote object `uri` unpacked to, if it was at `revision` then and
    /// the package is still committed.
    pub fn remote_alias(&self, uri: &str, revision: &str) -> Result<Option<PackageDigest>, StoreError> {
        let path = self.layout().remote_alias_path(Digest::of(uri.as_bytes()));
        let Some(alias) = read_json::<RemoteAlias>(&path)? else {
            return Ok(None);
        };
        if alias.uri != uri || alias.revision != revision {
            return Ok(None);
        }
        let Ok(digest) = alias.package.parse() else {
            return Ok(None);
        };
        Ok(self.find(digest)?.map(|entry| entry.id))
    }

    /// Records that the remote object `uri`, at `revision`, unpacks to `package`.
    pub fn record_remote_alias(
        &self,
        uri: &str,
        revision: &str,
        package: PackageDigest,
    ) -> Result<(), StoreError> {
        let alias = RemoteAlias {
            uri: uri.to_string(),
            revision: revision.to_string(),
            package: package.to_string(),
        };
        let path = self.layout().remote_alias_path(Digest::of(uri.as_bytes()));
        Ok(write_json_atomic(&path, &alias)?)
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
    fn markers_read_as_every_store_v1_renv_wrote_them() {
        let old_package = r#"{"kind": "package", "digest": "ab", "files": 2, "bytes": 10,
                              "created_unix": 5, "source": "dir:/x"}"#;
        let marker: Marker = serde_json::from_str(old_package).unwrap();
        assert_eq!(
            (marker.kind, marker.digest.as_deref().unwrap(), marker.files),
            (EntryKind::Package, "ab", 2)
        );
        let old_env = r#"{"kind": "env", "key": "cd", "created_unix": 5, "bytes": 7,
                          "description": {"requirements": ["a"]}}"#;
        let marker: Marker = serde_json::from_str(old_env).unwrap();
        assert_eq!(
            (marker.kind, marker.key.as_deref().unwrap(), marker.bytes),
            (EntryKind::Env, "cd", 7)
        );
        assert_eq!(marker.description["requirements"][0], "a");
        assert!(serde_json::from_str::<Marker>(r#"{"kind": "zip"}"#).is_err());
    }

    #[test]
    fn markers_name_their_entry_in_the_kind_s_own_field() {
        let digest = Digest::of(b"x");
        let package = EntryId::from(PackageDigest(digest));
        let env = EntryId::from(crate::digest::EnvKey(digest));
        let written = serde_json::to_value(Marker::new(package, 1, 1, Value::Null, Value::Null)).unwrap();
        assert_eq!(
            (written["digest"].as_str(), written.get("key")),
            (Some(digest.to_string().as_str()), None)
        );
        let marker: Marker = serde_json::from_value(written).unwrap();
        assert!(marker.is_of(package) && !marker.is_of(env));
        let written = serde_json::to_value(Marker::new(env, 1, 1, Value::Null, Value::Null)).unwrap();
        assert_eq!(written["key"].as_str(), Some(digest.to_string().as_str()));
        let marker: Marker = serde_json::from_value(written).unwrap();
        assert!(marker.is_of(env) && !marker.is_of(package));
        assert!(!marker.is_of(EntryId::from(crate::digest::EnvKey(Digest::of(b"y")))));
    }
}
