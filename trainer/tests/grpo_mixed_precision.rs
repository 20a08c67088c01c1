//! Mixed precision: a bf16-compute model trains f32 master weights. A step at the production
//! learning rate (1e-6) moves the masters as the all-f32 step does, and changes what the next
//! step computes; the same step applied to bf16-stored weights (the old design) is lost to
//! rounding. Also: log-probs come out in f32 whatever the compute dtype, and the trainer's
//! π_old and truncated importance weight behave as documented.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use selfplay_crds::run::LrSchedule;
use selfplay_trainer::grpo::optimizer::AdamW;
use selfplay_trainer::grpo::{BehaviourLogprobs, GrpoSettings, GrpoTrainer, Sample};
use selfplay_trainer::policy::{ByteCodec, CandlePolicy, Qwen2Config, Qwen2Model};

const SEED: u64 = 11;

fn policy(dtype: DType) -> CandlePolicy {
    let cfg = Qwen2Config::tiny(64, 2).unwrap();
    let model = Qwen2Model::random(cfg, SEED, dtype, &Device::Cpu).unwrap();
    CandlePolicy::new(model, Arc::new(ByteCodec), vec![ByteCodec::EOS], SEED)
}

fn settings(lr: f64) -> GrpoSettings {
    GrpoSettings {
        learning_rate: lr,
        lr_schedule: LrSchedule::Constant,
        warmup_steps: 0,
        micro_batch_size: 2,
        ..GrpoSettings::default()
    }
}

/// Two groups of three byte sequences; the last half of each is the policy's turn. The
/// behaviour log-probs are the f32 model's own, so the step is on-policy.
fn samples() -> Vec<Sample> {
    let reference = policy(DType::F32);
    let mut out = Vec::new();
    for k in 0..6u32 {
        let tokens: Vec<u32> = (0..24u32)
            .map(|i| 32 + (i * (k + 3) + k * 7) % 90)
            .collect();
        let scores = reference.score(std::slice::from_ref(&tokens)).unwrap();
        let mut old = vec![0.0f32];
        old.extend(&scores[0].logprobs);
        let n = tokens.len();
        out.push(Sample {
            policy_mask: (0..n).map(|i| i >= n / 2).collect(),
            old_logprobs: old,
            ref_logprobs: None,
            advantage: [1.0, -0.5, -0.5][k as usize % 3],
            policy_version: 0,
            group: u64::from(k / 3),
            tokens,
        });
    }
    out
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn masters(p: &CandlePolicy) -> Vec<Vec<f64>> {
    p.model()
        .parameters()
        .iter()
        .map(|(_, v)| values(v.as_tensor()))
        .collect()
}

fn deltas(after: &[Vec<f64>], before: &[Vec<f64>]) -> Vec<f64> {
    after
        .iter()
        .zip(before)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y))
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn moved(d: &[f64]) -> f64 {
    d.iter().filter(|x| **x != 0.0).count() as f64 / d.len() as f64
}

/// The first AdamW step moves each weight by lr·g/(|g| + ε) ≈ ±lr wherever the gradient is
/// not tiny, whatever its size: bf16 and f32 steps then agree wherever their gradients have
/// the same sign. bf16 rounds activations to 3 significant digits, which flips the sign only
/// of gradients near zero; the two update vectors must point the same way (cosine > 0.95) and
/// the bf16 step must move as many weights as the f32 step (within 1%).
#[test]
fn bf16_step_at_lr_1e6_moves_the_f32_masters_like_the_f32_step() {
    let lr = 1e-6;
    let samples = samples();
    let f32_policy = Arc::new(policy(DType::F32));
    let bf16_policy = Arc::new(policy(DType::BF16));
    assert_eq!(bf16_policy.model().dtype(), DType::BF16);
    for (_, p) in bf16_policy.model().parameters() {
        assert_eq!(p.dtype(), DType::F32, "masters are f32");
    }
    let before = masters(&f32_policy);
    assert_eq!(before, masters(&bf16_policy), "same initial masters");
    let before_scores = bf16_policy.score(&[samples[0].tokens.clone()]).unwrap();

    let mut t32 = GrpoTrainer::new(f32_policy.clone(), settings(lr)).unwrap();
    let mut t16 = GrpoTrainer::new(bf16_policy.clone(), settings(lr)).unwrap();
    let s32 = t32.train_step(&samples).unwrap();
    let s16 = t16.train_step(&samples).unwrap();
    assert_eq!(s32.tokens, s16.tokens);
    assert!(s32.grad_norm > 0.0);
    let d32 = deltas(&masters(&f32_policy), &before);
    let d16 = deltas(&masters(&bf16_policy), &before);
    let cos = cosine(&d32, &d16);
    let (m32, m16) = (moved(&d32), moved(&d16));
    let max16 = d16.iter().fold(0f64, |m, x| m.max(x.abs()));
    eprintln!(
        "f32 step moved {:.4} of the weights, bf16 step {:.4}; cosine {cos:.5}; largest bf16 move {max16:e}; grad norm f32 {} bf16 {}",
        m32, m16, s32.grad_norm, s16.grad_norm
    );
    assert!(m32 > 0.95, "the f32 step moves almost every weight");
    assert!((m16 - m32).abs() < 0.01, "moved {m16} vs {m32}");
    assert!(cos > 0.95, "cosine {cos}");
    // An Adam step is at most lr, plus the rounding of the f32 result (spacing 1.2e-7 near the
    // norms' 1.0).
    assert!(max16 <= lr + 1.2e-7, "an Adam step is at most lr: {max16}");

    // The compute copies are the rounded masters, refreshed by the update ...
    let model = bf16_policy.model();
    for ((name, master), copy) in model.parameters().iter().zip(model.compute_parameters()) {
        let want = values(&master.as_tensor().to_dtype(DType::BF16).unwrap());
        assert_eq!(values(copy.as_tensor()), want, "{name}");
    }
    // ... so the next step's log-probs differ (a few bf16 copies round the other way).
    let after_scores = bf16_policy.score(&[samples[0].tokens.clone()]).unwrap();
    let change = before_scores[0]
        .logprobs
        .iter()
        .zip(&after_scores[0].logprobs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("largest change of a log-prob after one bf16-compute step: {change:e}");
    assert!(change > 0.0, "the update reached the bf16 forward");
}

/// The old design stored the weights (and moments) in bf16: the same update at lr 1e-6 is
/// smaller than half the spacing of bf16 numbers around most weights (N(0, 0.02): spacing
/// 1.2e-4 near 0.02), so it rounds away. Only weights within ~2.6e-4 of zero (about 1% of
/// N(0, 0.02)) and the zero biases can move.
#[test]
fn the_same_update_on_bf16_stored_weights_is_lost() {
    let lr = 1e-6;
    let samples = samples();
    let p = Arc::new(policy(DType::BF16));
    let t = GrpoTrainer::new(p.clone(), settings(lr)).unwrap();
    let batch = t.select(&samples).unwrap();
    let mut acc = Default::default();
    for mb in batch.samples.chunks(2) {
        t.accumulate(&mut acc, mb, batch.global_tokens).unwrap();
    }
    let model = p.model();
    let grads: Vec<Tensor> = acc
        .grads()
        .unwrap()
        .iter()
        .map(|g| g.to_dtype(DType::BF16).unwrap())
        .collect();
    // bf16 "parameters" as the old code had them: the compute copies, with bf16 moments.
    let stored: Vec<(String, candle_core::Var)> = model
        .parameters()
        .iter()
        .zip(model.compute_parameters())
        .map(|((n, _), c)| (n.clone(), c.clone()))
        .collect();
    let before: Vec<Vec<f64>> = stored.iter().map(|(_, v)| values(v.as_tensor())).collect();
    let mut opt = AdamW::new(&stored, 0.9, 0.999, 1e-8, 0.0).unwrap();
    opt.step(&stored, &grads, lr, 1.0).unwrap();
    let after: Vec<Vec<f64>> = stored.iter().map(|(_, v)| values(v.as_tensor())).collect();
    // Weight matrices only: the zero-initialised biases can hold a 1e-6 step even in bf16.
    let matrices: Vec<usize> = stored
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n.ends_with(".weight") && !n.contains("norm"))
        .map(|(i, _)| i)
        .collect();
    let d: Vec<f64> = matrices
        .iter()
        .flat_map(|&i| after[i].iter().zip(&before[i]).map(|(a, b)| a - b))
        .collect();
    let frac = moved(&d);
    eprintln!("bf16-stored update moved {frac:.4} of the weight-matrix entries");
    assert!(frac < 0.03, "moved {frac}");
}

#[test]
fn logprobs_are_f32_when_computing_in_bf16() {
    let p = policy(DType::BF16);
    let seqs = vec![vec![40u32, 41, 42, 43, 44]];
    let s = p
        .model()
        .score_positions(&seqs, &[(0, 2), (0, 4)], true)
        .unwrap();
    assert_eq!(s.dtype(), DType::F32);
    // And they agree with the f32 model to bf16's resolution of the weights and activations.
    let q = policy(DType::F32);
    let r = q
        .model()
        .score_positions(&seqs, &[(0, 2), (0, 4)], false)
        .unwrap();
    let (a, b) = (values(&s), values(&r));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 0.05, "{a:?} vs {b:?}");
    }
}

/// π_old from the trainer: with sampler log-probs equal to the trainer's, the weight is 1 and
/// the loss and gradient are those of the plain objective; with sampler log-probs lower by δ
/// for every token, each token's loss is multiplied by exp(δ), up to the cap C.
#[test]
fn trainer_behaviour_logprobs_weight_tokens_by_the_truncated_ratio() {
    let p = Arc::new(policy(DType::F64));
    let t = GrpoTrainer::new(p.clone(), settings(1e-3)).unwrap();
    let mut exact = samples();
    for s in &mut exact {
        // Advantages that do not cancel over the batch, so that the loss is not ~0.
        s.advantage += 0.3;
        let scores = p.score(std::slice::from_ref(&s.tokens)).unwrap();
        s.old_logprobs = std::iter::once(0.0)
            .chain(scores[0].logprobs.clone())
            .collect();
    }
    let run = |samples: &[Sample], mode: BehaviourLogprobs| {
        let batch = t.select(samples).unwrap();
        let mut acc = Default::default();
        t.accumulate_with(&mut acc, &batch.samples, batch.global_tokens, mode)
            .unwrap();
        let g: Vec<f64> = acc.grads().unwrap().iter().flat_map(values).collect();
        (acc.loss(), g)
    };
    let (l_plain, g_plain) = run(&exact, BehaviourLogprobs::Sample);
    let (l_same, g_same) = run(&exact, BehaviourLogprobs::Trainer);
    // The sampler's f32 log-probs round the f64 model's: weights of 1 ± 1e-7.
    assert!(
        ((l_same - l_plain) / l_plain).abs() < 1e-6,
        "{l_same} vs {l_plain}"
    );
    let off = g_same
        .iter()
        .zip(&g_plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    let scale = g_plain.iter().fold(0f64, |m, x| m.max(x.abs()));
    assert!(off < 1e-6 * scale, "gradient off by {off}");
    let shifted = |delta: f32| {
        let mut s = exact.clone();
        for smp in &mut s {
            smp.old_logprobs.iter_mut().for_each(|x| *x -= delta);
        }
        s
    };
    for (delta, factor) in [(0.3f64, 0.3f64.exp()), (1.0, 2.0)] {
        let (l, g) = run(&shifted(delta as f32), BehaviourLogprobs::Trainer);
        assert!(
            ((l - factor * l_same) / l_same).abs() < 1e-5,
            "δ {delta}: loss {l} vs {factor}·{l_same}"
        );
        let worst = g
            .iter()
            .zip(&g_same)
            .map(|(a, b)| (a - factor * b).abs())
            .fold(0f64, f64::max);
        let scale = g_same.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(worst < 1e-5 * scale, "δ {delta}: gradient off by {worst}");
    }
    // The mismatch is reported: every token off by 1.0, every weight truncated at C = 2.
    let mut tr = GrpoTrainer::new(p, settings(1e-3)).unwrap();
    let stats = tr.train_step(&shifted(1.0)).unwrap();
    assert!(
        (stats.logprob_mismatch_mean - 1.0).abs() < 1e-5,
        "{stats:?}"
    );
    assert!((stats.logprob_mismatch_max - 1.0).abs() < 1e-5, "{stats:?}");
    assert_eq!(stats.is_truncated_fraction, 1.0);
    assert_eq!(
        stats.clip_fraction, 0.0,
        "one update per batch: the ratio is 1"
    );
}
