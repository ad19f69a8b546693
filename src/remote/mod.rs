//! Storage the cluster already has: object stores (S3 and S3-compatible, GCS), http(s)
//! servers and shared filesystems, through the `object_store` crate.
//!
//! - [`uri`]: remote URIs as a `runtime_env` names them, and the operator's allow-list.
//! - [`client`]: `HEAD`, download under a cap, upload; blocking, with timeouts and retries.
//!
//! Two uses, both through the sources layer: a `working_dir`/`py_modules` entry that *is*
//! a remote zip (`sources::remote`), and the shared package store ([`SharedRemote`]),
//! where a `pkg://<digest>` missing on this node is looked for (`sources::stored`).
//! Nothing here knows about the local store.

pub mod client;
pub mod uri;

pub use client::{ObjectInfo, RemoteClient, RemoteError, RemoteOptions, StreamFailed};
pub use uri::{AllowList, RemoteUri, Scheme, UriError};

use crate::digest::PackageDigest;

/// The cluster-wide package store (`--remote`): `<base>/pkgs/<digest>.zip` holds renv's
/// reproducible zip of package `<digest>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRemote {
    base: String,
}

impl SharedRemote {
    /// `s3://bucket[/prefix]`, `gs://bucket[/prefix]`, `file:///shared/dir`, `https://…`.
    pub fn parse(text: &str) -> Result<SharedRemote, UriError> {
        let base = text.trim_end_matches('/').to_string();
        let shared = SharedRemote { base };
        // Checked as the URI of a package under it would be.
        shared
            .object("pkgs/x.zip")
            .map_err(|e| UriError::from(format!("--remote {text:?}: {e}")))?;
        Ok(shared)
    }

    pub fn as_str(&self) -> &str {
        &self.base
    }

    /// Where package `digest` is kept.
    pub fn package(&self, digest: PackageDigest) -> RemoteUri {
        self.object(&format!("pkgs/{digest}.zip"))
            .expect("a digest-named object under a checked base parses")
    }

    fn object(&self, relative: &str) -> Result<RemoteUri, UriError> {
        RemoteUri::parse(&format!("{}/{relative}", self.base))
    }
}

/// What the sources fetch with: the client, and the shared package store if configured.
pub struct Remotes {
    pub client: RemoteClient,
    pub shared: Option<SharedRemote>,
}

impl Remotes {
    pub fn new(shared: Option<SharedRemote>, options: RemoteOptions) -> Remotes {
        Remotes {
            client: RemoteClient::new(options),
            shared,
        }
    }

    /// No shared store; remote URIs are still fetched when a spec names one.
    pub fn none() -> Remotes {
        Remotes::new(None, RemoteOptions::default())
    }
}
