//! Splitting an update's samples into micro-batches by sequence count and token budget.

use std::ops::Range;

use super::sample::Sample;

/// Consecutive runs of `samples`, each of at most `max_seqs` sequences and `max_tokens`
/// tokens; a sequence longer than `max_tokens` is a micro-batch of its own. The sequences
/// of a micro-batch are packed end to end for the forward, so its memory follows its tokens.
pub fn micro_batches(samples: &[Sample], max_seqs: usize, max_tokens: usize) -> Vec<Range<usize>> {
    let max_seqs = max_seqs.max(1);
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, s) in samples.iter().enumerate() {
        let n = s.tokens.len();
        if i > start && (i - start >= max_seqs || tokens + n > max_tokens) {
            out.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += n;
    }
    if start < samples.len() {
        out.push(start..samples.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of_lengths(lens: &[usize]) -> Vec<Sample> {
        lens.iter()
            .map(|&n| Sample {
                tokens: vec![1; n],
                policy_mask: vec![false; n],
                old_logprobs: vec![0.0; n],
                ref_logprobs: None,
                advantage: 1.0,
                policy_version: 0,
                group: 0,
            })
            .collect()
    }

    #[test]
    fn budgets_split_runs_and_long_sequences_go_alone() {
        let s = of_lengths(&[3, 4, 2, 10, 1, 1, 1, 1]);
        assert_eq!(micro_batches(&s, 8, 8), vec![0..2, 2..3, 3..4, 4..8]);
        assert_eq!(micro_batches(&s, 2, 100), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(micro_batches(&s, 100, 100), vec![0..8]);
        assert_eq!(
            micro_batches(&s, 1, 1),
            (0..8).map(|i| i..i + 1).collect::<Vec<_>>()
        );
        assert!(micro_batches(&[], 4, 4).is_empty());
    }
}
