//! Continuous batching and sessions: a conversation's samples do not depend on what shares
//! its batch, a session never prefills its conversation again, greedy decoding equals the
//! unbatched path token for token, and evicted caches are rebuilt to the same result.

use std::sync::Arc;

use candle_core::{DType, Device};
use selfplay_trainer::engine::policy::{Generation, Policy, PolicySession, SamplingParams};
use selfplay_trainer::policy::{CandlePolicy, Rng, sampling};

fn tiny() -> Arc<CandlePolicy> {
    // Wide enough that the decoding rows go through the batched matmuls, not row by row.
    Arc::new(CandlePolicy::tiny(7, 64, 2, DType::F32, &Device::Cpu).unwrap())
}

fn params(temperature: f32, top_p: f32, n: usize) -> SamplingParams {
    SamplingParams {
        temperature,
        top_p,
        max_new_tokens: n,
        stop: vec![],
    }
}

fn session(p: &Arc<CandlePolicy>) -> Box<dyn PolicySession> {
    Policy::open_session(p.clone()).expect("the candle policy keeps sessions")
}

/// Plays `turns` turns of a conversation: after each, `obs` tokens are appended.
fn play(
    s: &mut dyn PolicySession,
    prompt: &[u32],
    turns: usize,
    obs: &[u32],
    p: &SamplingParams,
) -> (Vec<u32>, Vec<Generation>) {
    let mut ctx = prompt.to_vec();
    let mut gens = Vec::new();
    for _ in 0..turns {
        let g = s.continue_turn(&ctx, p).unwrap();
        ctx.extend(&g.tokens);
        ctx.extend(obs);
        gens.push(g);
    }
    (ctx, gens)
}

#[test]
fn a_conversation_samples_the_same_alone_or_in_a_shared_batch() {
    let p = params(1.0, 0.9, 20);
    let prompt = vec![72u32, 101, 108, 108, 111];
    // Alone.
    let alone = tiny();
    let mut s = session(&alone);
    let (_, want) = play(s.as_mut(), &prompt, 3, &[10, 11, 12], &p);
    let solo = alone.rollout_stats();
    assert_eq!(
        solo.decode_rows, solo.decode_steps,
        "one row per step alone"
    );

    // The same conversation (first session of a policy with the same seed) while five others
    // of other lengths join and leave the batch from their own threads.
    let shared = tiny();
    let mut first = session(&shared);
    let others: Vec<Box<dyn PolicySession>> = (0..5).map(|_| session(&shared)).collect();
    let barrier = Arc::new(std::sync::Barrier::new(6));
    let got = std::thread::scope(|sc| {
        for (i, mut o) in others.into_iter().enumerate() {
            let barrier = barrier.clone();
            sc.spawn(move || {
                barrier.wait();
                let ctx: Vec<u32> = (0..(3 + 7 * i) as u32).map(|t| 40 + t).collect();
                play(
                    o.as_mut(),
                    &ctx,
                    2 + i % 2,
                    &[33; 9],
                    &params(1.0, 1.0, 8 + 5 * i),
                );
            });
        }
        barrier.wait();
        play(first.as_mut(), &prompt, 3, &[10, 11, 12], &p).1
    });
    let stats = shared.rollout_stats();
    assert!(
        stats.decode_rows > stats.decode_steps,
        "the conversations never shared a decoding step: {stats:?}"
    );
    // Conversations joined and appended while others were decoding: those decoding rows ran
    // in the prefill's forward, not in a second forward of the step.
    assert!(
        stats.mixed_steps > 0,
        "no decoding row rode along with a prefill: {stats:?}"
    );
    for (a, b) in want.iter().zip(&got) {
        assert_eq!(
            a.tokens, b.tokens,
            "batch mates changed a conversation's samples"
        );
        for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }
}

#[test]
fn sessions_prefill_only_what_a_turn_appends_and_match_uncached_scores() {
    let policy = tiny();
    let mut s = session(&policy);
    let prompt: Vec<u32> = (0..30).map(|i| 50 + i).collect();
    let obs = [7u32, 8, 9, 10, 11, 12, 13];
    let p = params(1.0, 1.0, 10);
    let (ctx, gens) = play(s.as_mut(), &prompt, 4, &obs, &p);
    // Turn 1 runs the prompt; every later turn the previous turn's last token (sampled, never
    // run) and the observation. Sampled tokens run in decoding steps, not as prefill.
    let stats = policy.rollout_stats();
    assert_eq!(
        stats.prefill_tokens as usize,
        prompt.len() + 3 * (1 + obs.len()),
        "{stats:?}"
    );
    assert_eq!(stats.evictions, 0);
    // Every sampled log-prob is the model's uncached score of the token given everything
    // before it in the conversation.
    let scored = &policy.score(std::slice::from_ref(&ctx)).unwrap()[0];
    let mut at = prompt.len();
    for g in &gens {
        for (i, (tok, lp)) in g.tokens.iter().zip(&g.logprobs).enumerate() {
            assert_eq!(ctx[at + i], *tok);
            let want = scored.logprobs[at + i - 1];
            assert!((lp - want).abs() < 1e-4, "{lp} vs scored {want}");
        }
        at += g.tokens.len() + obs.len();
    }
}

#[test]
fn greedy_sessions_equal_the_unbatched_path_token_for_token() {
    let policy = tiny();
    let greedy = params(0.0, 1.0, 16);
    let prompts: Vec<Vec<u32>> = vec![vec![3, 4, 5], (0..40).map(|i| 90 + i).collect(), vec![200]];
    let results: Vec<Vec<Generation>> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|pr| {
                let mut s = session(&policy);
                let greedy = greedy.clone();
                sc.spawn(move || play(s.as_mut(), pr, 3, &[65, 66], &greedy).1)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (pr, gens) in prompts.iter().zip(&results) {
        let mut ctx = pr.clone();
        for g in gens {
            // The unbatched path: one context, prefilled whole, logits on the host.
            let want = sampling::generate(
                policy.model(),
                policy.codec(),
                policy.eos_ids(),
                std::slice::from_ref(&ctx),
                &greedy,
                &mut Rng::seed(0),
            )
            .unwrap()
            .remove(0);
            assert_eq!(g.tokens, want.tokens);
            assert_eq!(g.finish, want.finish);
            for (a, b) in g.logprobs.iter().zip(&want.logprobs) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
            ctx.extend(&g.tokens);
            ctx.extend([65, 66]);
        }
    }
}

#[test]
fn caches_over_the_budget_are_evicted_and_rebuilt_to_the_same_result() {
    let greedy = params(0.0, 1.0, 12);
    let prompt_a: Vec<u32> = (0..20).map(|i| 30 + i).collect();
    let prompt_b: Vec<u32> = (0..25).map(|i| 120 + i).collect();
    let run = |budget: Option<usize>| {
        let policy = tiny();
        if let Some(b) = budget {
            policy.set_kv_budget_bytes(b);
        }
        let (mut a, mut b) = (session(&policy), session(&policy));
        // Turn by turn, alternating: each conversation is idle while the other runs.
        let (mut ca, mut cb) = (prompt_a.clone(), prompt_b.clone());
        let mut out = Vec::new();
        for _ in 0..3 {
            for (s, c) in [(&mut a, &mut ca), (&mut b, &mut cb)] {
                let g = s.continue_turn(c, &greedy).unwrap();
                c.extend(&g.tokens);
                c.extend([9, 9, 9]);
                out.push(g.tokens);
            }
        }
        (out, policy.rollout_stats())
    };
    let (roomy, roomy_stats) = run(None);
    let (tight, tight_stats) = run(Some(1));
    assert_eq!(roomy, tight, "a rebuilt cache changed the continuation");
    assert_eq!(roomy_stats.evictions, 0);
    assert!(tight_stats.evictions >= 4, "{tight_stats:?}");
    assert_eq!(
        tight_stats.prefill_tokens,
        roomy_stats.prefill_tokens + tight_stats.reprefill_tokens,
        "prefill beyond the roomy run is exactly the counted rebuilding"
    );
    assert!(tight_stats.reprefill_tokens > 0);
}

#[test]
fn a_session_refuses_bad_input_and_recovers() {
    let policy = tiny();
    let mut s = session(&policy);
    let p = params(1.0, 1.0, 4);
    assert!(s.continue_turn(&[], &p).is_err());
    assert!(
        s.continue_turn(&[999], &p).is_err(),
        "outside the vocabulary"
    );
    assert!(s.continue_turn(&[1], &params(1.0, 0.0, 4)).is_err());
    let g = s.continue_turn(&[1, 2, 3], &p).unwrap();
    assert_eq!(g.tokens.len(), 4);
    // A context that is not an extension of the last one (the engine went back) is handled:
    // the common prefix is kept, the rest recomputed.
    let g2 = s.continue_turn(&[1, 2, 7], &p).unwrap();
    assert_eq!(g2.tokens.len(), 4);
}

/// Every generation's log-probs are the model's uncached scores of its tokens after `ctx`.
fn assert_scores_match(policy: &CandlePolicy, ctx: &[u32], g: &Generation) {
    let mut full = ctx.to_vec();
    full.extend(&g.tokens);
    let scored = &policy.score(std::slice::from_ref(&full)).unwrap()[0];
    for (i, lp) in g.logprobs.iter().enumerate() {
        let want = scored.logprobs[ctx.len() + i - 1];
        assert!((lp - want).abs() < 1e-4, "token {i}: {lp} vs scored {want}");
    }
}

#[test]
fn a_group_sharing_its_prompt_prefills_it_once_and_samples_as_the_model_scores() {
    let policy = tiny();
    let prompt: Vec<u32> = (0..40).map(|i| 60 + i).collect();
    // Four members of a group start from one prompt; a fifth row shares its first 20 tokens.
    let mut other = prompt[..20].to_vec();
    other.extend((0..15).map(|i| 150 + i));
    let contexts = vec![
        prompt.clone(),
        prompt.clone(),
        prompt.clone(),
        prompt.clone(),
        other.clone(),
    ];
    let gens = Policy::generate(policy.as_ref(), &contexts, &params(1.0, 1.0, 12)).unwrap();
    let stats = policy.rollout_stats();
    // One member runs the prompt; the other three copy all of it but its last token (whose
    // logits they need); the fifth copies the 20 tokens it shares.
    assert_eq!(stats.shared_prefix_tokens, 3 * 39 + 20, "{stats:?}");
    assert_eq!(stats.prefill_tokens, 40 + 3 + 15, "{stats:?}");
    for (ctx, g) in contexts.iter().zip(&gens) {
        assert_eq!(g.tokens.len(), 12);
        assert_scores_match(&policy, ctx, g);
    }
    // Each member still draws from its own stream.
    assert!(
        gens[..4].windows(2).any(|w| w[0].tokens != w[1].tokens),
        "the members sampled the same tokens"
    );
}

#[test]
fn short_common_prefixes_are_computed_not_copied() {
    let policy = tiny();
    // 15 tokens in common: fewer than copying is worth.
    let a: Vec<u32> = (0..30).map(|i| 60 + i).collect();
    let mut b = a[..15].to_vec();
    b.extend((0..15).map(|i| 200 + i));
    let gens = Policy::generate(
        policy.as_ref(),
        &[a.clone(), b.clone()],
        &params(1.0, 1.0, 4),
    )
    .unwrap();
    let stats = policy.rollout_stats();
    assert_eq!(stats.shared_prefix_tokens, 0, "{stats:?}");
    assert_eq!(stats.prefill_tokens, 60);
    assert_scores_match(&policy, &a, &gens[0]);
    assert_scores_match(&policy, &b, &gens[1]);
}

#[test]
fn sessions_of_a_group_copy_their_prompt_and_go_on_from_their_own_caches() {
    // Members that joined the batch at different times: the later ones copy from a running
    // member's cache, which by then holds sampled tokens after the prompt too.
    let policy = tiny();
    let prompt: Vec<u32> = (0..48).map(|i| 20 + i).collect();
    let obs = [5u32, 6, 7, 8];
    let p = params(1.0, 1.0, 10);
    let played: Vec<(Vec<u32>, Vec<Generation>)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let mut s = session(&policy);
                let (prompt, p) = (prompt.clone(), p.clone());
                sc.spawn(move || play(s.as_mut(), &prompt, 3, &obs, &p))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (ctx, gens) in &played {
        let mut at = prompt.len();
        for g in gens {
            assert_scores_match(&policy, &ctx[..at], g);
            at += g.tokens.len() + obs.len();
        }
    }
    let stats = policy.rollout_stats();
    // Whatever the threads' timing, every prompt token is either run or copied once per member.
    let later_turns = 4 * 2 * (1 + obs.len()) as u64;
    assert_eq!(
        stats.prefill_tokens + stats.shared_prefix_tokens,
        4 * prompt.len() as u64 + later_turns,
        "{stats:?}"
    );
}

#[test]
fn bf16_sampling_scores_close_to_the_f32_forward() {
    // Hidden 128: products of k = 128 and 352 (the MLP), several 16-row weight blocks.
    let policy = Arc::new(CandlePolicy::tiny(11, 128, 2, DType::F32, &Device::Cpu).unwrap());
    if !policy.set_sampling_bf16(true) {
        eprintln!(
            "no AMX, AVX512-BF16 or AVX-512 on this CPU: bf16 sampling is not exercised here"
        );
        assert!(!policy.sampling_bf16());
        return;
    }
    let mut s = session(&policy);
    let prompt: Vec<u32> = (0..40).map(|i| 30 + i).collect();
    let obs = [5u32, 6, 7, 8, 9];
    let (ctx, gens) = play(s.as_mut(), &prompt, 3, &obs, &params(1.0, 1.0, 12));
    // With AMX or AVX512-BF16 (AMD) every forward multiplies in bf16; with AVX-512 only the
    // decoding steps (up to 16 rows), so the tokens after the first of each turn.
    // The sampled log-probs are the bf16 forward's: close to the f32 scores of the same
    // tokens (bf16 inputs move a log-prob by a few hundredths at most here), never equal to
    // all of them (the products did round), and finite.
    let scored = &policy.score(std::slice::from_ref(&ctx)).unwrap()[0];
    let mut at = prompt.len();
    let mut differ = 0;
    for g in &gens {
        for (i, lp) in g.logprobs.iter().enumerate() {
            let want = scored.logprobs[at + i - 1];
            assert!(lp.is_finite());
            assert!((lp - want).abs() < 0.05, "{lp} vs f32 {want}");
            if (lp - want).abs() > 1e-6 {
                differ += 1;
            }
        }
        at += g.tokens.len() + obs.len();
    }
    assert!(differ > 0, "bf16 sampling gave exactly the f32 log-probs");
    // An update (here: a new version) drops the bf16 copies; turning it off goes back to f32.
    policy.set_version(policy.version() + 1);
    assert!(!policy.set_sampling_bf16(false));
    let mut s = session(&policy);
    let (ctx, gens) = play(s.as_mut(), &prompt, 1, &obs, &params(1.0, 1.0, 6));
    let scored = &policy.score(std::slice::from_ref(&ctx)).unwrap()[0];
    for (i, lp) in gens[0].logprobs.iter().enumerate() {
        let want = scored.logprobs[prompt.len() + i - 1];
        assert!((lp - want).abs() < 1e-4, "f32 again: {lp} vs {want}");
    }
}

#[test]
fn the_spec_dtype_picks_the_sampling_precision_on_the_cpu() {
    use selfplay_crds::run::ModelDtype;
    let policy = CandlePolicy::tiny(11, 64, 1, DType::F32, &Device::Cpu).unwrap();
    let here = CandlePolicy::bf16_products_backend().is_some();
    assert_eq!(policy.sample_in_spec_precision(ModelDtype::Bf16), here);
    assert_eq!(policy.sampling_bf16(), here);
    assert!(!policy.sample_in_spec_precision(ModelDtype::F32));
    assert!(!policy.sampling_bf16(), "model.dtype f32 samples in f32");
}
