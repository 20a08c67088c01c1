//! The `trainer` subcommands; each lives in its own module.

pub mod bench;
pub mod bench_rollout;
pub mod cluster;
pub mod eval;
pub mod evaluate;
pub mod export;
pub mod local;
pub mod sandbox;
pub mod score;
pub mod sft;
pub mod validate;
