//! Per-token log-probs and entropies of given token sequences.

use std::sync::Arc;

use candle_core::{D, DType, Tensor};

use super::ModelError;
use super::model::{BatchInput, Qwen2Model};
use super::ops::{self, AttentionMask, KeyRanges};

/// Scores of one sequence: entry `i` belongs to token `i + 1` given the tokens before it.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceScores {
    pub logprobs: Vec<f32>,
    pub entropy: Vec<f32>,
}

/// Tokens per forward pass when scoring without gradients.
const SCORE_BATCH_TOKENS: usize = 8192;

impl Qwen2Model {
    /// `(n, 2)`: log π(seqs[s][i] | seqs[s][..i]) and the entropy of π(· | seqs[s][..i]) for
    /// every `(s, i)` of `picks` (`i ≥ 1`), in order. With `grad`, differentiable in the weights.
    pub fn score_positions(
        &self,
        seqs: &[Vec<u32>],
        picks: &[(usize, usize)],
        grad: bool,
    ) -> Result<Tensor, ModelError> {
        // The sequences go end to end into one row: no padding, each sequence attending only
        // to itself with positions from 0, so the scores are those of separate rows.
        let (ids, starts) = self.pack(seqs)?;
        let t = ids.dim(1)?;
        let mut rows = Vec::with_capacity(picks.len());
        let mut targets = Vec::with_capacity(picks.len());
        for &(s, i) in picks {
            let seq = seqs
                .get(s)
                .ok_or_else(|| ModelError::Input(format!("no sequence {s}")))?;
            if i == 0 || i >= seq.len() {
                return Err(ModelError::Input(format!(
                    "token {i} of sequence {s} (length {}) has no prefix to score",
                    seq.len()
                )));
            }
            rows.push((starts[s] + i - 1) as u32);
            targets.push(seq[i]);
        }
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let positions: Vec<u32> = lens.iter().flat_map(|&n| 0..n as u32).collect();
        let input = BatchInput {
            ids: &ids,
            positions: Arc::new(positions),
            mask: AttentionMask::causal(1, t),
        };
        let hidden = self.hidden_in(&input, KeyRanges::packed(&lens), None, grad)?;
        let dev = self.device();
        let picked = hidden.index_select(&Tensor::from_vec(rows, picks.len(), dev)?, 0)?;
        let targets = Tensor::from_vec(targets, picks.len(), dev)?;
        Ok(ops::lm_head_logprobs(
            &picked,
            self.head_weight(grad),
            &targets,
            self.ops_mode(),
        )?)
    }

    /// The sequences end to end as a `(1, Σ len)` id tensor, and where each starts.
    fn pack(&self, seqs: &[Vec<u32>]) -> Result<(Tensor, Vec<usize>), ModelError> {
        if seqs.iter().all(Vec::is_empty) {
            return Err(ModelError::Input("empty batch or empty sequence".into()));
        }
        let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if longest > self.rope().max_positions() {
            return Err(ModelError::Input(format!(
                "sequence of {longest} tokens exceeds the model's {} positions",
                self.rope().max_positions()
            )));
        }
        let vocab = self.config().vocab_size as u32;
        let mut ids = Vec::with_capacity(seqs.iter().map(Vec::len).sum());
        let mut starts = Vec::with_capacity(seqs.len());
        for s in seqs {
            if let Some(bad) = s.iter().find(|&&id| id >= vocab) {
                return Err(ModelError::Input(format!(
                    "token id {bad} is outside the vocabulary of {vocab}"
                )));
            }
            starts.push(ids.len());
            ids.extend_from_slice(s);
        }
        let t = ids.len();
        Ok((Tensor::from_vec(ids, (1, t), self.device())?, starts))
    }

    /// Scores every token after the first of each sequence (no gradient), a few thousand
    /// tokens per forward pass.
    pub fn score_sequences(&self, seqs: &[Vec<u32>]) -> Result<Vec<SequenceScores>, ModelError> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start + 1;
            let mut tokens = seqs[start].len();
            while end < seqs.len() && tokens + seqs[end].len() <= SCORE_BATCH_TOKENS {
                tokens += seqs[end].len();
                end += 1;
            }
            let chunk = &seqs[start..end];
            let picks: Vec<(usize, usize)> = chunk
                .iter()
                .enumerate()
                .flat_map(|(s, seq)| (1..seq.len()).map(move |i| (s, i)))
                .collect();
            if picks.is_empty() {
                out.extend(chunk.iter().map(|_| SequenceScores {
                    logprobs: vec![],
                    entropy: vec![],
                }));
            } else {
                let scores = self
                    .score_positions(chunk, &picks, false)?
                    .to_dtype(DType::F32)?;
                let lp = scores
                    .narrow(D::Minus1, 0, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let ent = scores
                    .narrow(D::Minus1, 1, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mut k = 0;
                for seq in chunk {
                    let n = seq.len().saturating_sub(1);
                    out.push(SequenceScores {
                        logprobs: lp[k..k + n].to_vec(),
                        entropy: ent[k..k + n].to_vec(),
                    });
                    k += n;
                }
            }
            start = end;
        }
        Ok(out)
    }
}
