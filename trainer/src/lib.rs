//! The selfplay trainer: the policy (candle), the self-play engine (roles, validation,
//! rewards), GRPO, checkpoints, and the single-machine mode (`trainer local`).

pub mod cli;
pub mod engine;
pub mod grpo;
pub mod policy;
pub mod sft;
pub mod train;
