//! Training samples and the token accounting of multi-turn episodes.
//!
//! An episode is one token sequence: the prompt, then policy turns (trained on) and
//! observations (masked), appended in order. What the policy wrote is kept as the exact
//! sampled ids with their sampling log-probs and is never re-tokenised; each turn's context
//! is therefore an exact prefix of the next (method.md, "Work in tokens end to end").

use crate::engine::policy::Generation;

/// One sequence to train on.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    /// Per token: produced by the policy, so trained on. The first token never is.
    pub policy_mask: Vec<bool>,
    /// Per token: log π_old(token | prefix) from sampling; read where `policy_mask` is set.
    pub old_logprobs: Vec<f32>,
    /// Per token log-probs of a reference policy, for the optional KL term.
    pub ref_logprobs: Option<Vec<f32>>,
    pub advantage: f64,
    /// The policy version that sampled it (the oldest, for a multi-turn episode).
    pub policy_version: u64,
    /// Samples of one group share the id (one task's G attempts).
    pub group: u64,
}

impl Sample {
    /// Tokens the loss is taken over.
    pub fn policy_tokens(&self) -> usize {
        self.policy_mask.iter().filter(|&&m| m).count()
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let n = self.tokens.len();
        if self.policy_mask.len() != n || self.old_logprobs.len() != n {
            return Err(format!(
                "sample has {n} tokens but {} mask entries and {} old log-probs",
                self.policy_mask.len(),
                self.old_logprobs.len()
            ));
        }
        if let Some(r) = &self.ref_logprobs
            && r.len() != n
        {
            return Err(format!(
                "sample has {n} tokens but {} reference log-probs",
                r.len()
            ));
        }
        if self.policy_mask.first() == Some(&true) {
            return Err(
                "the first token of a sample has no prefix and cannot be a policy token".into(),
            );
        }
        if !self.advantage.is_finite() {
            return Err(format!("advantage {} is not finite", self.advantage));
        }
        for (i, m) in self.policy_mask.iter().enumerate() {
            if *m && !self.old_logprobs[i].is_finite() {
                return Err(format!(
                    "old log-prob of policy token {i} is {}",
                    self.old_logprobs[i]
                ));
            }
            if *m
                && let Some(r) = &self.ref_logprobs
                && !r[i].is_finite()
            {
                return Err(format!(
                    "reference log-prob of policy token {i} is {}",
                    r[i]
                ));
            }
        }
        Ok(())
    }
}

/// The growing token sequence of one episode.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EpisodeTokens {
    tokens: Vec<u32>,
    policy_mask: Vec<bool>,
    old_logprobs: Vec<f32>,
    oldest_version: Option<u64>,
}

impl EpisodeTokens {
    /// Starts with the prompt (masked).
    pub fn new(prompt: Vec<u32>) -> Self {
        let n = prompt.len();
        Self {
            tokens: prompt,
            policy_mask: vec![false; n],
            old_logprobs: vec![0.0; n],
            oldest_version: None,
        }
    }

    /// The context of the next policy turn: everything so far.
    pub fn context(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Appends a policy turn exactly as sampled by policy `version`.
    pub fn push_policy(&mut self, generation: &Generation, version: u64) {
        self.tokens.extend_from_slice(&generation.tokens);
        self.policy_mask
            .extend(std::iter::repeat_n(true, generation.tokens.len()));
        self.old_logprobs.extend_from_slice(&generation.logprobs);
        // A generation always carries one log-prob per token; guard the invariant anyway.
        self.old_logprobs.resize(self.tokens.len(), 0.0);
        self.oldest_version = Some(self.oldest_version.map_or(version, |v| v.min(version)));
    }

    /// Appends tokens the policy did not write (tool output, turn markup): masked.
    pub fn push_observation(&mut self, ids: &[u32]) {
        self.tokens.extend_from_slice(ids);
        self.policy_mask
            .extend(std::iter::repeat_n(false, ids.len()));
        self.old_logprobs
            .extend(std::iter::repeat_n(0.0, ids.len()));
    }

    pub fn policy_mask(&self) -> &[bool] {
        &self.policy_mask
    }

    pub fn old_logprobs(&self) -> &[f32] {
        &self.old_logprobs
    }

    /// The finished episode as a sample (a masked-out episode is simply not turned into one).
    pub fn into_sample(self, advantage: f64, group: u64) -> Sample {
        Sample {
            tokens: self.tokens,
            policy_mask: self.policy_mask,
            old_logprobs: self.old_logprobs,
            ref_logprobs: None,
            advantage,
            policy_version: self.oldest_version.unwrap_or(0),
            group,
        }
    }
}
