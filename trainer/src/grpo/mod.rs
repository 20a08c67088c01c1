//! GRPO (DESIGN.md step 6; formulas in `shared/reference/method.md`, "The GRPO variant the
//! seeds share"): advantages, reward shaping, the clipped objective, AdamW with clipping and
//! a warmup/cosine schedule, and atomic checkpoints.

pub mod advantages;
pub mod checkpoint;
pub mod data_parallel;
pub mod micro_batches;
#[cfg(feature = "cuda")]
mod nccl;
pub mod objective;
pub mod optimizer;
pub mod parallel;
pub mod rewards;
pub mod sample;
pub mod schedule;
pub mod settings;
pub mod trainer;

use thiserror::Error;

use crate::policy::ModelError;

pub use advantages::{group_advantages, leave_one_out};
pub use checkpoint::TrainerState;
pub use data_parallel::{collectives, shard_by_group};
pub use objective::{TokenTerms, token_terms, weighted_token_terms};
pub use parallel::{AllReduce, InProcessAllReduce, SingleWorker};
pub use rewards::{EpisodeEnd, shaped_reward, step_penalty};
pub use sample::{EpisodeTokens, Sample};
pub use schedule::learning_rate;
pub use settings::GrpoSettings;
pub use trainer::{Accumulator, Batch, BehaviourLogprobs, GrpoTrainer, StepStats};

#[derive(Debug, Error)]
pub enum GrpoError {
    #[error("bad training settings: {0}")]
    Settings(String),
    #[error("bad training input: {0}")]
    Input(String),
    #[error(
        "update {step} refused: loss {loss} / gradient norm {grad_norm} is not finite (weights unchanged)"
    )]
    NonFinite {
        step: u64,
        loss: f64,
        grad_norm: f64,
    },
    #[error("refusing to checkpoint: the weights or optimizer moments hold NaN or infinite values")]
    NonFiniteState,
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("data-parallel reduction: {0}")]
    Reduce(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<candle_core::Error> for GrpoError {
    fn from(e: candle_core::Error) -> Self {
        GrpoError::Model(ModelError::Candle(e))
    }
}
