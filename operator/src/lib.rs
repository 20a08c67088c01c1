//! The selfplay operator: reconciles `SandboxPool`, `SelfPlayRun` and `Checkpoint`, and
//! brokers sandboxes to trainer pods.
//!
//! Every reconcile runs the same four steps (as in Stackable's operators): **validate** the
//! spec ([`validate`]), **build** the desired children ([`build`]), **decide** and **apply**
//! ([`decide`], [`controller`]), and write **status**. The builders and decisions are pure
//! functions, tested from YAML fixtures; `operator render` prints what the builders make.

pub mod broker;
pub mod build;
pub mod config;
pub mod controller;
pub mod decide;
pub mod environments;
pub mod metrics;
pub mod names;
pub mod render;
pub mod validate;

/// Generated gRPC types and service of the broker's protocol (`broker/proto/broker.proto`,
/// compiled in the `selfplay-broker` crate, which the trainer's client shares).
pub use selfplay_broker::proto as broker_proto;
