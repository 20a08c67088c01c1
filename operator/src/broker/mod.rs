//! The sandbox broker: a gRPC service (tonic) on the operator for trainer pods.
//!
//! Acquire hands out a Ready, unclaimed sandbox from the pool controller's reflector cache,
//! claimed on the API server under an optimistic lock on the pod (its resourceVersion), so
//! two trainers never get the same sandbox even when brokers' caches are stale. Release
//! deletes the sandbox (use-and-destroy). ReportProgress and RegisterCheckpoint carry the
//! trainer's progress and checkpoints into the run's status and Checkpoint objects. Callers
//! authenticate with their run's token; trainer pods need no RBAC on the API server.

pub mod backend;
/// The client, for the operator's tests and bench; the trainer uses `selfplay-broker` directly.
pub use selfplay_broker::client;
pub mod memory;
pub mod service;

pub use backend::{Backend, BackendError, Claim, ClaimOutcome, KubeBackend, Released};
pub use service::{Broker, BrokerSettings};
