//! The contract between the self-play engine and a policy: tokens in, tokens out.
//!
//! The engine never re-tokenises what the policy wrote (method.md, "Work in tokens end to
//! end"): it keeps the exact sampled ids and their log-probs, and only decodes them to parse
//! the tool call. The candle model (`crate::policy`) and the tests' scripted policies both
//! implement [`Policy`].

use std::sync::Arc;

use thiserror::Error;

/// Turns text into token ids and back. Observations and prompts are encoded with it; the
/// policy's own tokens are only ever decoded.
pub trait TokenCodec: Send + Sync {
    fn encode(&self, text: &str) -> Vec<u32>;
    fn decode(&self, ids: &[u32]) -> String;
}

/// Sampling settings of one generation call.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// Tokens the policy may write in this call.
    pub max_new_tokens: usize,
    /// Generation stops after the first of these strings appears in the decoded output.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 256,
            stop: Vec::new(),
        }
    }
}

/// Why a generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string or the end-of-sequence token.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// What the policy wrote for one context.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The exact sampled token ids.
    pub tokens: Vec<u32>,
    /// log π_old(token | prefix) of each sampled token, under the sampling distribution's
    /// policy (before temperature/top-p), used as the GRPO "old" log-probs.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("policy failed: {0}")]
    Failed(String),
    #[error("context of {len} tokens exceeds the policy's limit of {max}")]
    ContextTooLong { len: usize, max: usize },
}

/// A policy: continues each context in a batch. Implementations may block (CPU/GPU work);
/// the engine calls them from a blocking task.
pub trait Policy: Send + Sync {
    fn codec(&self) -> &dyn TokenCodec;
    /// Continues every context of `contexts` (one generation per context, in order).
    fn generate(
        &self,
        contexts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Generation>, PolicyError>;
    /// The policy version the samples come from (optimiser updates applied so far).
    fn version(&self) -> u64;
    /// A conversation that keeps its state (the model's KV cache) between turns, where the
    /// policy has one; `None` makes [`open_session`] replay the whole context each turn.
    fn open_session(self: Arc<Self>) -> Option<Box<dyn PolicySession>> {
        None
    }
}

/// One conversation with the policy, turn after turn (an episode). Each turn passes the
/// whole context so far: the previous turns' context and generated tokens are its prefix, so
/// a policy that kept them runs only what was appended (the tool output). Dropping the
/// session frees what the policy kept for it. Sessions of one policy used from several
/// threads at once decode together.
pub trait PolicySession: Send {
    fn continue_turn(
        &mut self,
        context: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation, PolicyError>;
}

/// A session of `policy`: its own where it keeps one, else a replay of `generate`.
pub fn open_session(policy: &Arc<dyn Policy>) -> Box<dyn PolicySession> {
    policy
        .clone()
        .open_session()
        .unwrap_or_else(|| Box::new(ReplaySession(policy.clone())))
}

/// A session that sends the whole context to `generate` every turn.
struct ReplaySession(Arc<dyn Policy>);

impl PolicySession for ReplaySession {
    fn continue_turn(
        &mut self,
        context: &[u32],
        params: &SamplingParams,
    ) -> Result<Generation, PolicyError> {
        let mut gens = self.0.generate(&[context.to_vec()], params)?;
        match (gens.pop(), gens.is_empty()) {
            (Some(g), true) => Ok(g),
            _ => Err(PolicyError::Failed(
                "the policy did not return one generation for one context".into(),
            )),
        }
    }
}
