//! The library's top-level error and how it maps to exit codes.

use crate::package::PackageError;
use crate::sources::SourceError;
use crate::spec::SpecError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid runtime_env: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Venv(#[from] crate::venv::VenvError),
    #[error(transparent)]
    Package(#[from] PackageError),
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A package source's failure, with the spec entry that named it (`working_dir`,
    /// `py_modules[2]`).
    #[error("{field}: {source}")]
    SourceOf {
        field: String,
        #[source]
        source: SourceError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<crate::resolve::ResolveError> for Error {
    fn from(e: crate::resolve::ResolveError) -> Self {
        match e {
            crate::resolve::ResolveError::Spec(e) => Error::Spec(e),
            crate::resolve::ResolveError::Package(e) => Error::Package(e),
        }
    }
}

/// Exit codes: 0 success, 1 internal failure, 2 invalid input.
pub const EXIT_INTERNAL: u8 = 1;
pub const EXIT_INVALID_INPUT: u8 = 2;

impl Error {
    /// True when the user's input (spec, path, archive) is at fault.
    pub fn is_user_error(&self) -> bool {
        match self {
            Error::Spec(_) => true,
            Error::Venv(e) => e.is_user_error(),
            Error::Package(e) => e.is_user_error(),
            Error::Source(e) | Error::SourceOf { source: e, .. } => e.is_user_error(),
            Error::Store(_) => false,
            Error::Worker(e) => !matches!(e, crate::worker::WorkerError::Io(_)),
            Error::Client(e) => e.is_user_error(),
            Error::Io(_) => false,
        }
    }

    pub fn exit_code(&self) -> u8 {
        if self.is_user_error() {
            EXIT_INVALID_INPUT
        } else {
            EXIT_INTERNAL
        }
    }
}
