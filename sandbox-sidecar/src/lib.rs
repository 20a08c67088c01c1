//! sandbox-sidecar: the execution server that runs inside every sandbox, and its client.
//!
//! - [`client::SidecarClient`]: the async client the trainer uses.
//! - [`spawn::SpawnedSidecar`]: start a local sidecar process (single-machine mode).
//! - [`server`]: bind and serve (what `sandbox-sidecar serve` runs).
//! - [`metrics::metric_names`]: the Prometheus names it registers (docs/metrics.md).

pub mod proto {
    //! Generated from `proto/sidecar.proto`.
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("selfplay.sidecar.v1");
}

pub mod auth;
pub mod child;
pub mod cleanup;
pub mod cli;
pub mod client;
pub mod confine;
pub mod copy;
pub mod editor;
pub mod error;
pub mod files;
pub mod history;
pub mod idempotency;
pub mod install;
pub mod lease;
pub mod metrics;
pub mod oracle;
pub mod output;
pub mod patch;
pub mod paths;
pub mod perms;
pub mod process;
pub mod server;
pub mod service;
pub mod session;
pub mod shellenv;
pub mod snapshot;
pub mod spawn;
pub mod testparse;

pub use client::SidecarClient;
pub use spawn::{SpawnOptions, SpawnedSidecar};
