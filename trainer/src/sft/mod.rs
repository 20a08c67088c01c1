//! Supervised fine-tuning on trajectories (`trainer sft`): the warm start before self-play,
//! and rejection-sampling fine-tuning on a run's own solved episodes.
//!
//! * [`chat`] — a chat-message conversation rendered in the engine's chat markup, with the
//!   loss mask on the assistant's tokens.
//! * [`data`] — JSONL files of chat records or of our own episode records, one example per
//!   line, checked against the model.
//! * [`train`] — the loop: mean negative log-likelihood of the policy tokens, applied by the
//!   GRPO learner's optimiser (AdamW, clipping, warmup/cosine schedule, checkpoints).

pub mod chat;
pub mod data;
pub mod train;

use std::path::PathBuf;

use thiserror::Error;

use crate::grpo::GrpoError;
use crate::policy::ModelError;

pub use chat::{ChatMessage, render_conversation};
pub use data::{Dataset, Example, LoadOptions, load_dataset};
pub use train::{SftOptions, SftStepStats, SftTrainer, mean_nll};

#[derive(Debug, Error)]
pub enum SftError {
    /// A line of a data file that cannot be trained on.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad data: {0}")]
    Data(String),
    #[error("bad fine-tuning settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Train(#[from] GrpoError),
}

impl From<ModelError> for SftError {
    fn from(e: ModelError) -> Self {
        SftError::Train(GrpoError::Model(e))
    }
}

impl From<candle_core::Error> for SftError {
    fn from(e: candle_core::Error) -> Self {
        SftError::Train(GrpoError::from(e))
    }
}
