//! Multi-turn token accounting: each turn's context is an exact prefix of the next, the
//! policy's tokens are kept as sampled (never re-tokenised), and scoring the finished
//! episode for training reproduces the sampling log-probs.

use candle_core::{DType, Device};
use selfplay_trainer::engine::policy::{Policy, SamplingParams, TokenCodec};
use selfplay_trainer::grpo::EpisodeTokens;
use selfplay_trainer::policy::{ByteCodec, CandlePolicy};

#[test]
fn episode_tokens_are_prefixes_and_policy_tokens_are_never_retokenised() {
    let policy = CandlePolicy::tiny(21, 32, 2, DType::F32, &Device::Cpu).unwrap();
    let codec = policy.codec();
    let mut ep = EpisodeTokens::new(codec.encode("<task>fix the bug</task>\n"));
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        max_new_tokens: 12,
        stop: vec![],
    };
    let mut contexts: Vec<Vec<u32>> = Vec::new();
    let mut generated = Vec::new();
    for turn in 0..4 {
        let ctx = ep.context().to_vec();
        contexts.push(ctx.clone());
        let g = policy
            .generate(std::slice::from_ref(&ctx), &params)
            .unwrap()
            .remove(0);
        ep.push_policy(&g, policy.version());
        generated.push(g);
        ep.push_observation(&codec.encode(&format!("\n<output turn={turn}>ok</output>\n")));
    }
    for w in contexts.windows(2) {
        assert!(
            w[1].starts_with(&w[0]),
            "a turn's context is not a prefix of the next"
        );
    }
    let sample = ep.into_sample(0.5, 7);
    assert!(sample.tokens.starts_with(contexts.last().unwrap()));
    // The policy tokens of the sample are exactly the sampled ids, with their log-probs.
    let policy_tokens: Vec<u32> = sample
        .tokens
        .iter()
        .zip(&sample.policy_mask)
        .filter(|(_, m)| **m)
        .map(|(t, _)| *t)
        .collect();
    let policy_lps: Vec<f32> = sample
        .old_logprobs
        .iter()
        .zip(&sample.policy_mask)
        .filter(|(_, m)| **m)
        .map(|(l, _)| *l)
        .collect();
    assert_eq!(
        policy_tokens,
        generated
            .iter()
            .flat_map(|g| g.tokens.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        policy_lps,
        generated
            .iter()
            .flat_map(|g| g.logprobs.clone())
            .collect::<Vec<_>>()
    );
    // Observations are masked; the prompt too.
    assert_eq!(
        sample.policy_tokens(),
        generated.iter().map(|g| g.tokens.len()).sum::<usize>()
    );
    assert!(!sample.policy_mask[0]);
    // Scored as one sequence (as training does), the policy tokens get the log-probs they
    // were sampled with: ratio 1 before any update.
    let scores = &policy.score(std::slice::from_ref(&sample.tokens)).unwrap()[0];
    for (i, m) in sample.policy_mask.iter().enumerate() {
        if *m {
            let (a, b) = (scores.logprobs[i - 1], sample.old_logprobs[i]);
            assert!(
                (a - b).abs() < 1e-4,
                "token {i}: training log-prob {a} vs sampling {b}"
            );
        }
    }
    assert_eq!(sample.group, 7);
    // Why ids are kept: decoding and encoding again is lossy (invalid UTF-8, specials).
    let invalid = vec![0xC3u32, 0x28, ByteCodec::EOS];
    assert_ne!(ByteCodec.encode(&ByteCodec.decode(&invalid)), invalid);
}
