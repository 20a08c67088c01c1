//! What an episode leaves behind: per turn the policy's exact tokens and log-probs and the
//! observation's tokens, and why the episode ended. GRPO trains on [`Trajectory::sequence`].

use serde::{Deserialize, Serialize};

use super::policy::FinishReason;

/// The two roles one policy plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Injector,
    Solver,
}

impl Role {
    /// The `role` metric label.
    pub fn label(self) -> &'static str {
        match self {
            Role::Injector => "injector",
            Role::Solver => "solver",
        }
    }
}

/// Why an episode ended (the `end_reason` metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The policy called `submit`.
    Submitted,
    /// The turn budget ran out.
    OutOfTurns,
    /// The token budget (prompt, policy tokens and observations) ran out.
    OutOfTokens,
    /// The sandbox or the policy failed in a way the agent could not have caused; the
    /// episode is masked, never punished.
    InfraError,
    /// The sandbox failed during one of the agent's tool calls (its sidecar gone, a call
    /// past its deadline): the agent may have caused it, so the episode earns the failing
    /// reward instead of a mask.
    SandboxBroken,
    /// A malformed tool call under `FormatErrorPolicy::EndEpisode`.
    FormatError,
}

impl EndReason {
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Submitted => "submitted",
            EndReason::OutOfTurns => "out_of_turns",
            EndReason::OutOfTokens => "out_of_tokens",
            EndReason::InfraError => "infra_error",
            EndReason::SandboxBroken => "sandbox_broken",
            EndReason::FormatError => "format_error",
        }
    }

    /// Ran out of budget: the truncation policy decides what happens to it.
    pub fn is_truncated(self) -> bool {
        matches!(self, EndReason::OutOfTurns | EndReason::OutOfTokens)
    }
}

/// One turn: what the policy wrote and what the engine answered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Turn {
    /// The exact sampled ids.
    pub policy_tokens: Vec<u32>,
    /// log π_old of each sampled id (same length as `policy_tokens`).
    pub policy_logprobs: Vec<f32>,
    #[serde(skip)]
    pub finish: Option<FinishReason>,
    /// The policy version that sampled this turn.
    pub policy_version: u64,
    /// The tool that ran (`bash`, `edit`, `create`, `submit`); `None` for a malformed call.
    pub tool: Option<String>,
    /// Why the call could not be parsed.
    pub format_error: Option<String>,
    /// The tool ran but refused (edit with no match, patch rejected, …).
    pub tool_failed: bool,
    /// The observation's tokens (tool result and chat markup); empty after the last turn.
    pub observation_tokens: Vec<u32>,
}

/// A whole episode.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trajectory {
    pub role: Role,
    /// The task prompt, chat markup included.
    pub prompt_tokens: Vec<u32>,
    pub turns: Vec<Turn>,
    pub end_reason: EndReason,
    /// What failed, when `end_reason` is `InfraError`.
    pub infra_error: Option<super::error::InfraError>,
}

/// A trajectory flattened for training: the tokens, which of them the policy produced
/// (the loss mask), and their old log-probs (0 where masked).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSequence {
    pub tokens: Vec<u32>,
    pub policy_mask: Vec<bool>,
    pub old_logprobs: Vec<f32>,
}

/// An episode's exact token sequence and the spans of it the policy sampled (half-open
/// `[start, end)`, in order): what an episode record keeps so that the episode can be replayed
/// token for token in supervised fine-tuning (`trainer sft`), never re-tokenised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenTranscript {
    pub tokens: Vec<u32>,
    pub policy_spans: Vec<[usize; 2]>,
}

impl TokenTranscript {
    /// Spans from a per-token mask.
    pub fn from_mask(tokens: Vec<u32>, mask: &[bool]) -> Self {
        let mut spans = Vec::new();
        let mut open = None;
        for (i, &m) in mask.iter().enumerate() {
            match (m, open) {
                (true, None) => open = Some(i),
                (false, Some(s)) => {
                    spans.push([s, i]);
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(s) = open {
            spans.push([s, mask.len()]);
        }
        Self {
            tokens,
            policy_spans: spans,
        }
    }

    /// The per-token mask; spans that are empty, overlap, run backwards or past the end are
    /// an error (the record was not written by this code).
    pub fn mask(&self) -> Result<Vec<bool>, String> {
        let n = self.tokens.len();
        let mut mask = vec![false; n];
        let mut prev_end = 0;
        for &[start, end] in &self.policy_spans {
            if start >= end || end > n || start < prev_end {
                return Err(format!(
                    "policy span [{start}, {end}) is empty, out of order or past the {n} tokens"
                ));
            }
            mask[start..end].iter_mut().for_each(|m| *m = true);
            prev_end = end;
        }
        Ok(mask)
    }
}

impl Trajectory {
    /// [`Self::sequence`] as the compact transcript an episode record keeps.
    pub fn token_transcript(&self) -> TokenTranscript {
        let s = self.sequence();
        TokenTranscript::from_mask(s.tokens, &s.policy_mask)
    }

    /// All tokens of the episode, in order.
    pub fn total_tokens(&self) -> usize {
        self.prompt_tokens.len()
            + self
                .turns
                .iter()
                .map(|t| t.policy_tokens.len() + t.observation_tokens.len())
                .sum::<usize>()
    }

    /// Tokens the policy sampled.
    pub fn policy_tokens(&self) -> usize {
        self.turns.iter().map(|t| t.policy_tokens.len()).sum()
    }

    /// The oldest policy version that sampled any turn (for the staleness limit).
    pub fn min_policy_version(&self) -> Option<u64> {
        self.turns.iter().map(|t| t.policy_version).min()
    }

    /// The context the policy saw at the last turn plus what it wrote: prompt, then per turn
    /// its tokens and the observation. Each turn's context is a prefix of this sequence.
    pub fn sequence(&self) -> TokenSequence {
        let n = self.total_tokens();
        let mut s = TokenSequence {
            tokens: Vec::with_capacity(n),
            policy_mask: Vec::with_capacity(n),
            old_logprobs: Vec::with_capacity(n),
        };
        let mut push = |ids: &[u32], lps: Option<&[f32]>| {
            s.tokens.extend_from_slice(ids);
            s.policy_mask
                .extend(std::iter::repeat_n(lps.is_some(), ids.len()));
            match lps {
                Some(l) => s.old_logprobs.extend_from_slice(l),
                None => s.old_logprobs.extend(std::iter::repeat_n(0.0, ids.len())),
            }
        };
        push(&self.prompt_tokens, None);
        for t in &self.turns {
            push(&t.policy_tokens, Some(&t.policy_logprobs));
            push(&t.observation_tokens, None);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcripts_round_trip_their_mask_and_refuse_bad_spans() {
        let mask = [false, true, true, false, false, true];
        let t = TokenTranscript::from_mask((0..6).collect(), &mask);
        assert_eq!(t.policy_spans, vec![[1, 3], [5, 6]]);
        assert_eq!(t.mask().unwrap(), mask);
        for spans in [
            vec![[2, 2]],
            vec![[1, 7]],
            vec![[3, 4], [1, 2]],
            vec![[1, 3], [2, 4]],
        ] {
            let bad = TokenTranscript {
                tokens: (0..6).collect(),
                policy_spans: spans.clone(),
            };
            assert!(bad.mask().is_err(), "{spans:?}");
        }
    }
}
