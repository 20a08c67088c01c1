//! Errors of the engine. Infrastructure failures (a sidecar that died, a sandbox that could
//! not start, a policy that crashed) are kept apart from everything the policy did wrong:
//! they mask an episode, never reward it −1 or fail a validation.

use thiserror::Error;

/// What kind of machinery failed (the `kind` label of `selfplay_trainer_sandbox_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InfraKind {
    /// The sandbox could not be created (copy, spawn, broker).
    Acquire,
    /// A sidecar call failed in transport or inside the sidecar (it died, it is unreachable).
    Sidecar,
    /// A sidecar call did not answer within its deadline.
    Timeout,
    /// Preparing a validated bug in a fresh sandbox failed (its diffs no longer apply).
    Setup,
    /// The policy failed to generate.
    Policy,
}

impl InfraKind {
    pub fn label(self) -> &'static str {
        match self {
            InfraKind::Acquire => "acquire",
            InfraKind::Sidecar => "sidecar",
            InfraKind::Timeout => "timeout",
            InfraKind::Setup => "setup",
            InfraKind::Policy => "policy",
        }
    }
}

/// A failure of the machinery, not of the policy.
#[derive(Clone, Debug, Error, PartialEq, Eq, serde::Serialize)]
#[error("{} error: {message}", kind.label())]
pub struct InfraError {
    pub kind: InfraKind,
    pub message: String,
}

impl InfraError {
    pub fn new(kind: InfraKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The outcome of one sandbox operation that can be refused: a refusal (path outside the
/// workspace, no match, a patch that does not apply) is the policy's or the artifacts'
/// doing; an infrastructure error is not.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum OpError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Infra(#[from] InfraError),
}

impl From<sandbox_sidecar::client::Error> for OpError {
    fn from(e: sandbox_sidecar::client::Error) -> Self {
        if e.is_infrastructure() {
            OpError::Infra(InfraError::new(InfraKind::Sidecar, e.to_string()))
        } else {
            OpError::Refused(e.to_string())
        }
    }
}
