//! The sandbox broker's protocol (`proto/broker.proto`) and its Rust client.
//!
//! The broker itself (the gRPC service, its Kubernetes backend) lives in the operator. This
//! crate is what both sides share, so that the trainer, which only calls the broker, does not
//! build the operator's controllers and Kubernetes client.

pub mod client;

pub use client::{BrokerClient, ClientError, RetryPolicy, SandboxLease};

/// Generated gRPC types, client and service trait of `proto/broker.proto`.
pub mod proto {
    tonic::include_proto!("selfplay.broker.v1");
}
