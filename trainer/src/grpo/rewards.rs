//! Reward shaping before advantages: the truncation policy and the step penalty
//! (method.md: masked rather than punished for infrastructure errors and, by default, for
//! truncation — DeepSWE "compact filtering"; SWE-Master's forced submission with a
//! discounted reward; Nebius' penalty growing with the steps past a threshold).

use selfplay_crds::run::{StepPenalty, TruncationMode, TruncationPolicy};

/// How an episode ended, as far as its reward is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpisodeEnd {
    /// The policy submitted.
    Completed,
    /// It ran out of turns or tokens.
    Truncated,
    /// A sandbox or other infrastructure failure cut it.
    InfraError,
}

/// The reward subtracted for `turns` turns.
pub fn step_penalty(turns: u32, penalty: Option<&StepPenalty>) -> f64 {
    match penalty {
        Some(p) => {
            p.per_turn * f64::from(turns.saturating_sub(u32::try_from(p.after_turns).unwrap_or(0)))
        }
        None => 0.0,
    }
}

/// The reward an episode trains with, or `None` when it is masked out of the loss.
///
/// `reward` is the graded reward: for a truncated episode, the reward of its workspace as
/// it was when the budget ran out. Infrastructure errors the agent could not have caused
/// are always masked (never −1). Truncation is never better than failing (a policy that
/// expects to fail would otherwise learn to stall instead of submitting): a truncated
/// episode keeps a negative or zero reward as it is; only a positive one is masked
/// (`Mask`) or multiplied by `discount` (`ForceSubmit`). The step penalty applies to every
/// episode that is not masked. Injectors are never truncated here: their artifacts are
/// validated either way, so the caller passes [`EpisodeEnd::Completed`] for them.
pub fn shaped_reward(
    reward: f64,
    end: EpisodeEnd,
    turns: u32,
    truncation: &TruncationPolicy,
    penalty: Option<&StepPenalty>,
) -> Option<f64> {
    let base = match (end, truncation.mode) {
        (EpisodeEnd::InfraError, _) => return None,
        (EpisodeEnd::Truncated, _) if reward <= 0.0 => reward,
        (EpisodeEnd::Truncated, TruncationMode::Mask) => return None,
        (EpisodeEnd::Truncated, TruncationMode::ForceSubmit) => reward * truncation.discount,
        (EpisodeEnd::Completed, _) => reward,
    };
    Some(base - step_penalty(turns, penalty))
}
