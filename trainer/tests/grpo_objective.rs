//! The GRPO pieces as pure functions, and the invariances of the update.

mod policy_util;

use std::sync::Arc;

use candle_core::{DType, Device};
use policy_util::{Reference, fixture, rel_err, to_f64};
use selfplay_crds::run::{
    LrSchedule, StepPenalty, TrainingSettings, TruncationMode, TruncationPolicy,
};
use selfplay_trainer::grpo::{
    EpisodeEnd, GrpoError, GrpoSettings, GrpoTrainer, Sample, group_advantages, learning_rate,
    leave_one_out, shaped_reward, step_penalty, token_terms,
};
use selfplay_trainer::policy::CandlePolicy;

#[test]
fn leave_one_out_advantages_without_std() {
    let a = leave_one_out(&[1.0, -1.0, -1.0, 1.0]);
    // 1 − mean(−1, −1, 1) = 1 + 1/3
    assert_eq!(a, vec![4.0 / 3.0, -4.0 / 3.0, -4.0 / 3.0, 4.0 / 3.0]);
    let b = leave_one_out(&[0.2, 0.5, 2.0]);
    assert!((b[2] - (2.0 - 0.35)).abs() < 1e-12);
    // Scaling rewards scales advantages: nothing is divided by the standard deviation.
    let c = leave_one_out(&[0.4, 1.0, 4.0]);
    for (x, y) in b.iter().zip(&c) {
        assert!((2.0 * x - y).abs() < 1e-12);
    }
    assert_eq!(
        group_advantages(&[0.1, 0.1, 0.1]),
        None,
        "equal rewards: dropped"
    );
    assert_eq!(
        group_advantages(&[1.0]),
        None,
        "a group of one has no baseline"
    );
    assert!(group_advantages(&[1.0, -1.0]).is_some());
}

#[test]
fn clip_higher_and_dual_clip_per_token() {
    let s = GrpoSettings::default();
    assert_eq!(
        (s.eps_low, s.eps_high, s.dual_clip, s.kl_coef),
        (0.2, 0.28, None, 0.0)
    );
    // Inside the range: L = −A·r, gradient −A·r.
    let t = token_terms(0.1f64.ln(), 0.1f64.ln(), 2.0, None, &s);
    assert!((t.loss + 2.0).abs() < 1e-12 && (t.dloss_dlogp + 2.0).abs() < 1e-12 && !t.clipped);
    // A > 0, r above 1 + ε_high: clipped, no gradient.
    let t = token_terms(1.5f64.ln(), 0.0, 1.0, None, &s);
    assert!(t.clipped && t.dloss_dlogp == 0.0 && (t.loss + 1.28).abs() < 1e-12);
    // A > 0, r below 1 − ε_low: the unclipped term is the max, gradient kept.
    let t = token_terms(0.5f64.ln(), 0.0, 1.0, None, &s);
    assert!(!t.clipped && (t.loss + 0.5).abs() < 1e-12);
    // A < 0, r below 1 − ε_low: clipped.
    let t = token_terms(0.5f64.ln(), 0.0, -1.0, None, &s);
    assert!(t.clipped && (t.loss - 0.8).abs() < 1e-12);
    // A < 0, r = 5: unclipped −A·r = 5; the dual clip caps it at −A·c = 3.
    let t = token_terms(5f64.ln(), 0.0, -1.0, None, &s);
    assert!(!t.clipped && (t.loss - 5.0).abs() < 1e-12);
    let dual = GrpoSettings {
        dual_clip: Some(3.0),
        ..s.clone()
    };
    let t = token_terms(5f64.ln(), 0.0, -1.0, None, &dual);
    assert!(t.clipped && t.dloss_dlogp == 0.0 && (t.loss - 3.0).abs() < 1e-12);
    // KL (k3) to a reference, when asked for.
    let kl = GrpoSettings { kl_coef: 0.5, ..s };
    let t = token_terms(-1.0, -1.0, 1.0, Some(-1.2), &kl);
    let k3 = (-0.2f64).exp() + 0.2 - 1.0;
    assert!((t.kl - k3).abs() < 1e-12 && (t.loss - (-1.0 + 0.5 * k3)).abs() < 1e-12);
}

#[test]
fn truncation_policy_and_step_penalty() {
    let mask = TruncationPolicy::default();
    assert_eq!(mask.mode, TruncationMode::Mask);
    let force = TruncationPolicy {
        mode: TruncationMode::ForceSubmit,
        discount: 0.5,
    };
    let pen = StepPenalty {
        after_turns: 10,
        per_turn: 0.01,
    };
    assert_eq!(
        shaped_reward(1.0, EpisodeEnd::Completed, 5, &mask, None),
        Some(1.0)
    );
    assert_eq!(
        shaped_reward(1.0, EpisodeEnd::Truncated, 40, &mask, None),
        None
    );
    assert_eq!(
        shaped_reward(1.0, EpisodeEnd::Truncated, 40, &force, None),
        Some(0.5)
    );
    // Truncation is never better than failing: a negative reward stays as it is.
    for policy in [&mask, &force] {
        assert_eq!(
            shaped_reward(-1.0, EpisodeEnd::Truncated, 40, policy, None),
            Some(-1.0)
        );
        assert_eq!(
            shaped_reward(-0.8, EpisodeEnd::Truncated, 40, policy, None),
            Some(-0.8)
        );
    }
    assert_eq!(
        shaped_reward(-1.0, EpisodeEnd::InfraError, 3, &force, None),
        None,
        "infrastructure errors are masked, never −1"
    );
    assert!((step_penalty(15, Some(&pen)) - 0.05).abs() < 1e-12);
    assert_eq!(step_penalty(8, Some(&pen)), 0.0);
    let r = shaped_reward(1.0, EpisodeEnd::Completed, 20, &mask, Some(&pen)).unwrap();
    assert!((r - 0.9).abs() < 1e-12);
}

#[test]
fn settings_map_from_the_crd_and_lr_schedules() {
    let t = TrainingSettings {
        learning_rate: 1e-3,
        warmup_steps: 4,
        total_steps: 14,
        lr_schedule: LrSchedule::Cosine,
        dual_clip: Some(3.0),
        micro_batch_size: 2,
        ..TrainingSettings::default()
    };
    let s = GrpoSettings::try_from(&t).unwrap();
    assert_eq!(
        (s.micro_batch_size, s.dual_clip, s.max_staleness),
        (2, Some(3.0), 8)
    );
    let lrs: Vec<f64> = (0..16).map(|k| learning_rate(&s, k)).collect();
    assert!(
        (lrs[0] - 0.25e-3).abs() < 1e-15 && (lrs[3] - 1e-3).abs() < 1e-15,
        "{lrs:?}"
    );
    assert!(
        (lrs[4] - 1e-3).abs() < 1e-15 && (lrs[9] - 0.5e-3).abs() < 1e-12 && lrs[14].abs() < 1e-15
    );
    assert!(lrs[5] < lrs[4] && lrs[15] == 0.0);
    let c = GrpoSettings {
        lr_schedule: LrSchedule::Constant,
        ..s
    };
    assert_eq!(learning_rate(&c, 100), 1e-3);
    let bad = TrainingSettings {
        micro_batch_size: 0,
        ..TrainingSettings::default()
    };
    assert!(matches!(
        GrpoSettings::try_from(&bad),
        Err(GrpoError::Settings(_))
    ));
}

fn fixture_trainer(micro: usize) -> GrpoTrainer {
    fixture_trainer_in(micro, DType::F32)
}

fn fixture_trainer_in(micro: usize, dtype: DType) -> GrpoTrainer {
    let policy =
        CandlePolicy::load(&fixture("qwen2-untied"), None, dtype, &Device::Cpu, 0).unwrap();
    GrpoTrainer::new(
        Arc::new(policy),
        GrpoSettings {
            micro_batch_size: micro,
            ..GrpoSettings::default()
        },
    )
    .unwrap()
}

/// In f64 the sums agree to rounding of f64; in f32, micro-batches pad differently, so the
/// products run over different lengths and round differently (a few ulps per op).
#[test]
fn micro_batching_and_accumulation_do_not_change_loss_or_gradient() {
    for (dtype, loss_tol, grad_tol) in [(DType::F64, 1e-12, 1e-10), (DType::F32, 1e-5, 1e-5)] {
        micro_batching_leaves_loss_and_gradient(dtype, loss_tol, grad_tol);
    }
}

fn micro_batching_leaves_loss_and_gradient(dtype: DType, loss_tol: f64, grad_tol: f64) {
    let samples = Reference::load("qwen2-untied").samples();
    let run = |micro: usize| {
        let t = fixture_trainer_in(micro, dtype);
        let batch = t.select(&samples).unwrap();
        let mut acc = Default::default();
        for mb in batch.samples.chunks(micro) {
            t.accumulate(&mut acc, mb, batch.global_tokens).unwrap();
        }
        (
            acc.loss(),
            acc.grads().unwrap().iter().map(to_f64).collect::<Vec<_>>(),
        )
    };
    let (l3, g3) = run(3);
    for micro in [1, 2] {
        let (l, g) = run(micro);
        assert!(
            ((l - l3) / l3).abs() < loss_tol,
            "{dtype:?} micro-batch {micro}: loss {l} vs {l3}"
        );
        for (a, b) in g.iter().zip(&g3) {
            assert!(
                rel_err(a, b) < grad_tol,
                "{dtype:?} micro-batch {micro}: gradient differs by {}",
                rel_err(a, b)
            );
        }
    }
    // And a full step reports the same loss whatever the micro-batch size.
    let s1 = fixture_trainer_in(1, dtype).train_step(&samples).unwrap();
    let s3 = fixture_trainer_in(3, dtype).train_step(&samples).unwrap();
    assert!(((s1.loss - s3.loss) / s3.loss).abs() < loss_tol);
    assert!(((s1.grad_norm - s3.grad_norm) / s3.grad_norm).abs() < grad_tol);
    assert_eq!((s1.step, s1.policy_version, s1.tokens), (1, 1, s3.tokens));
}

#[test]
fn stale_samples_and_zero_advantage_groups_are_dropped_and_counted() {
    let mut samples = Reference::load("qwen2-untied").samples();
    let mut t = fixture_trainer(4);
    // Move the policy 10 versions on: version-0 samples are then 10 > 8 versions old.
    t.policy().set_version(10);
    samples[0].policy_version = 10;
    samples[1].policy_version = 2;
    // A group whose advantages are all zero.
    let mut extra = samples[0].clone();
    extra.advantage = 0.0;
    extra.group = 77;
    let mut extra2 = extra.clone();
    extra2.tokens.reverse();
    samples.extend([extra, extra2]);
    let stats = t.train_step(&samples).unwrap();
    assert_eq!(stats.stale_samples, 1);
    assert_eq!(stats.dropped_zero_advantage_groups, 1);
    assert_eq!(stats.samples, 2);
    assert_eq!(
        stats.tokens,
        samples[0].policy_tokens() + samples[1].policy_tokens()
    );
    assert_eq!(stats.staleness_max, 8);
    assert!(stats.entropy > 0.0);
    // π_old is the trainer's forward before this (only) update, so the ratio is 1 and nothing
    // is clipped; the fixture's behaviour log-probs differ from it and weight the tokens.
    assert_eq!((stats.clip_fraction, stats.ratio_mean), (0.0, 1.0));
    assert!(stats.logprob_mismatch_mean > 0.0 && stats.logprob_mismatch_max > 0.0);
    assert_eq!(stats.policy_version, 11);
}

#[test]
fn bad_samples_get_clear_errors() {
    let t = fixture_trainer(2);
    let good = Reference::load("qwen2-untied").samples().remove(0);
    let mut a = good.clone();
    a.old_logprobs.pop();
    let mut b = good.clone();
    b.advantage = f64::NAN;
    let mut c = good.clone();
    c.policy_mask[0] = true;
    let mut d: Sample = good;
    d.tokens[3] = 100_000;
    for (s, what) in [
        (a, "log-probs"),
        (b, "advantage"),
        (c, "first token"),
        (d, "vocabulary"),
    ] {
        let err = match t.select(std::slice::from_ref(&s)) {
            Err(e) => e.to_string(),
            Ok(batch) => {
                let mut acc = Default::default();
                t.accumulate(&mut acc, &batch.samples, batch.global_tokens)
                    .unwrap_err()
                    .to_string()
            }
        };
        assert!(err.contains(what), "{err}");
    }
}
