//! `pkg://<digest>`: a package already in the store (built here, or uploaded).

use super::SourceError;
use crate::digest::PackageDigest;
use crate::store::{PackageEntry, Store};

pub fn lookup(store: &Store, digest: PackageDigest) -> Result<PackageEntry, SourceError> {
    store.find(digest)?.ok_or(SourceError::NotFound(digest))
}
