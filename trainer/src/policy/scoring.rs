//! Per-token log-probs and entropies of given token sequences.

use std::sync::Arc;

use candle_core::{D, DType, Tensor};

use super::ModelError;
use super::model::{BatchInput, Qwen2Model, train_positions};
use super::ops::{self, AttentionMask};

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
        let (ids, t) = self.pad_batch(seqs)?;
        let b = seqs.len();
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
            rows.push((s * t + i - 1) as u32);
            targets.push(seq[i]);
        }
        let input = BatchInput {
            ids: &ids,
            positions: Arc::new(train_positions(b, t)),
            mask: AttentionMask::causal(b, t),
        };
        let hidden = self.hidden(&input, None, grad)?;
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

    /// Scores every token after the first of each sequence (no gradient), a few thousand
    /// tokens per forward pass.
    pub fn score_sequences(&self, seqs: &[Vec<u32>]) -> Result<Vec<SequenceScores>, ModelError> {
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            let mut end = start + 1;
            let mut longest = seqs[start].len();
            while end < seqs.len()
                && longest.max(seqs[end].len()) * (end + 1 - start) <= SCORE_BATCH_TOKENS
            {
                longest = longest.max(seqs[end].len());
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
