//! The training loop shared by the single-machine and the cluster mode (DESIGN.md, "The flow
//! of one training step"), and what it reports to.

pub mod cluster;
pub mod config;
pub mod device;
pub mod driver;
pub mod local;
pub mod metrics;
pub mod report;
pub mod step;
pub mod tensorboard;
