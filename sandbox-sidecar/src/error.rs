//! Errors the server refuses requests with, and how they travel as gRPC statuses.
//!
//! The reason travels in the `x-sidecar-error` metadata key so the client can map it back to
//! a typed error without parsing messages.

use tonic::{Code, Status, metadata::MetadataMap};

/// Metadata key holding the machine-readable reason of a refused request.
pub const REASON_KEY: &str = "x-sidecar-error";
/// Metadata key holding the match count of a `multiple_matches` refusal.
pub const MATCHES_KEY: &str = "x-sidecar-matches";

/// Machine-readable reasons, the values of [`REASON_KEY`].
pub mod reason {
    pub const PATH_REFUSED: &str = "path_refused";
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    pub const NOT_FOUND: &str = "not_found";
    pub const ALREADY_EXISTS: &str = "already_exists";
    pub const NO_MATCH: &str = "no_match";
    pub const MULTIPLE_MATCHES: &str = "multiple_matches";
    pub const PATCH_REJECTED: &str = "patch_rejected";
    pub const NO_SNAPSHOT: &str = "no_snapshot";
    pub const NO_SHELL: &str = "no_shell";
    pub const REQUEST_ID_CONFLICT: &str = "request_id_conflict";
    pub const IO: &str = "io";
    pub const WORKSPACE_TOO_LARGE: &str = "workspace_too_large";
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("path refused: {0}")]
    PathRefused(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("no match for old_str in {path}")]
    NoMatch { path: String },
    #[error("old_str occurs {count} times in {path}; it must occur exactly once")]
    MultipleMatches { path: String, count: u64 },
    #[error("patch does not apply: {0}")]
    PatchRejected(String),
    #[error("no snapshot named {0:?}; take one with Snapshot first")]
    NoSnapshot(String),
    #[error("no shell: {0}")]
    NoShell(String),
    #[error("request id {0:?} was already used for a different request")]
    RequestIdConflict(String),
    #[error("workspace too large: {0}")]
    WorkspaceTooLarge(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SidecarError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SidecarError::Io {
            context: context.into(),
            source,
        }
    }

    fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            SidecarError::PathRefused(_) => (Code::InvalidArgument, reason::PATH_REFUSED),
            SidecarError::InvalidArgument(_) => (Code::InvalidArgument, reason::INVALID_ARGUMENT),
            SidecarError::NotFound(_) => (Code::NotFound, reason::NOT_FOUND),
            SidecarError::AlreadyExists(_) => (Code::AlreadyExists, reason::ALREADY_EXISTS),
            SidecarError::NoMatch { .. } => (Code::FailedPrecondition, reason::NO_MATCH),
            SidecarError::MultipleMatches { .. } => {
                (Code::FailedPrecondition, reason::MULTIPLE_MATCHES)
            }
            SidecarError::PatchRejected(_) => (Code::FailedPrecondition, reason::PATCH_REJECTED),
            SidecarError::NoSnapshot(_) => (Code::FailedPrecondition, reason::NO_SNAPSHOT),
            SidecarError::NoShell(_) => (Code::FailedPrecondition, reason::NO_SHELL),
            SidecarError::RequestIdConflict(_) => {
                (Code::InvalidArgument, reason::REQUEST_ID_CONFLICT)
            }
            // Not ResourceExhausted: the client counts that as the sidecar's failure
            // (retryable), while this is the workspace's state, which a retry won't change.
            SidecarError::WorkspaceTooLarge(_) => {
                (Code::FailedPrecondition, reason::WORKSPACE_TOO_LARGE)
            }
            SidecarError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => (Code::NotFound, reason::NOT_FOUND),
                _ => (Code::Internal, reason::IO),
            },
        }
    }
}

impl From<SidecarError> for Status {
    fn from(e: SidecarError) -> Status {
        let (code, why) = e.code_and_reason();
        let mut md = MetadataMap::new();
        if let Ok(v) = why.parse() {
            md.insert(REASON_KEY, v);
        }
        if let SidecarError::MultipleMatches { count, .. } = &e
            && let Ok(v) = count.to_string().parse()
        {
            md.insert(MATCHES_KEY, v);
        }
        Status::with_metadata(code, e.to_string(), md)
    }
}

pub type Result<T, E = SidecarError> = std::result::Result<T, E>;
