//! Memory-saving forms of the training forward give the plain forward's numbers: sequences
//! packed end to end score as they do alone (values and gradients) and as in a padded batch,
//! checkpointed layers give the same gradients, and micro-batches sized in tokens give the
//! same update as any other split.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use selfplay_trainer::grpo::micro_batches::micro_batches;
use selfplay_trainer::grpo::{GrpoSettings, GrpoTrainer, Sample};
use selfplay_trainer::policy::{CandlePolicy, OpsMode};

fn seqs() -> Vec<Vec<u32>> {
    vec![
        (0..37u32).map(|i| (i * 37 + 5) % 256).collect(),
        (0..2u32).map(|i| i + 7).collect(),
        (0..90u32).map(|i| (i * 11 + 3) % 256).collect(),
        (0..19u32).map(|i| (i * 5 + 1) % 256).collect(),
    ]
}

fn all_picks(seqs: &[Vec<u32>]) -> Vec<(usize, usize)> {
    seqs.iter()
        .enumerate()
        .flat_map(|(s, q)| (1..q.len()).map(move |i| (s, i)))
        .collect()
}

fn policy(mode: OpsMode, checkpoint: Option<usize>) -> CandlePolicy {
    let mut p = CandlePolicy::tiny(3, 32, 2, DType::F64, &Device::Cpu).unwrap();
    p.model_mut().set_ops_mode(mode);
    p.model_mut().set_checkpointing(checkpoint);
    p
}

/// Scores `(n, 2)` and the gradient of every parameter of Σ w·logp + Σ u·H (the entropy is
/// detached, so that is the gradient of Σ w·logp).
fn scores_and_grads(
    p: &CandlePolicy,
    seqs: &[Vec<u32>],
    picks: &[(usize, usize)],
) -> (Tensor, Vec<Tensor>) {
    let s = p.model().score_positions(seqs, picks, true).unwrap();
    let n = picks.len();
    let w: Vec<f64> = (0..n).map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.3).collect();
    let u: Vec<f64> = (0..n).map(|i| ((i * 3 % 4) as f64 - 1.5) * 0.2).collect();
    let coef = Tensor::from_vec(
        w.iter()
            .zip(&u)
            .flat_map(|(a, b)| [*a, *b])
            .collect::<Vec<_>>(),
        (n, 2),
        &Device::Cpu,
    )
    .unwrap();
    let grads = (&s * coef).unwrap().sum_all().unwrap().backward().unwrap();
    let g = p
        .model()
        .parameters()
        .iter()
        .map(|(name, v)| {
            grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .clone()
        })
        .collect();
    (s.detach(), g)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Packed: one forward over all sequences end to end. Alone: one forward per sequence. The
/// scores agree, and the summed gradients of the per-sequence losses equal the packed one.
#[test]
fn packed_sequences_score_and_differentiate_as_alone() {
    let seqs = seqs();
    for mode in [OpsMode::Auto, OpsMode::Composite] {
        let p = policy(mode, None);
        let picks = all_picks(&seqs);
        let (packed, packed_g) = scores_and_grads(&p, &seqs, &picks);
        let mut row = 0;
        let mut sum_g: Option<Vec<Tensor>> = None;
        for (s, q) in seqs.iter().enumerate() {
            // This sequence alone, with the loss weights its picks have in the packed loss.
            let (alone, g) = masked_loss_grads(&p, &seqs, &picks, s);
            let n = q.len() - 1;
            let d = max_diff(&alone, &packed.narrow(0, row, n).unwrap());
            assert!(d < 1e-12, "{mode:?}: sequence {s} scores differ by {d}");
            row += n;
            sum_g = Some(match sum_g {
                None => g,
                Some(acc) => acc.iter().zip(&g).map(|(a, b)| (a + b).unwrap()).collect(),
            });
        }
        for ((name, _), (a, b)) in p
            .model()
            .parameters()
            .iter()
            .zip(packed_g.iter().zip(sum_g.unwrap().iter()))
        {
            let d = max_diff(a, b);
            assert!(d < 1e-10, "{mode:?}: gradient of {name} differs by {d}");
        }
    }
}

/// The gradient of the packed loss's terms that belong to sequence `only`, computed on that
/// sequence alone.
fn masked_loss_grads(
    p: &CandlePolicy,
    seqs: &[Vec<u32>],
    picks: &[(usize, usize)],
    only: usize,
) -> (Tensor, Vec<Tensor>) {
    let n = picks.len();
    let w: Vec<f64> = (0..n).map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.3).collect();
    let u: Vec<f64> = (0..n).map(|i| ((i * 3 % 4) as f64 - 1.5) * 0.2).collect();
    let mine: Vec<usize> = (0..n).filter(|&k| picks[k].0 == only).collect();
    let alone_picks: Vec<(usize, usize)> = mine.iter().map(|&k| (0, picks[k].1)).collect();
    let s = p
        .model()
        .score_positions(&[seqs[only].clone()], &alone_picks, true)
        .unwrap();
    let coef: Vec<f64> = mine.iter().flat_map(|&k| [w[k], u[k]]).collect();
    let coef = Tensor::from_vec(coef, (mine.len(), 2), &Device::Cpu).unwrap();
    let grads = (&s * coef).unwrap().sum_all().unwrap().backward().unwrap();
    let g = p
        .model()
        .parameters()
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
        .collect();
    (s.detach(), g)
}

/// The packed scores equal log-softmax of the logits of a right-padded batch.
#[test]
fn packed_scores_match_a_padded_batch() {
    let seqs = seqs();
    let p = policy(OpsMode::Auto, None);
    let picks = all_picks(&seqs);
    let packed = p.model().score_positions(&seqs, &picks, false).unwrap();
    let logits = p.model().forward_logits(&seqs).unwrap();
    let logp = candle_nn_free_log_softmax(&logits);
    for (k, &(s, i)) in picks.iter().enumerate() {
        let want: f64 = logp
            .get(s)
            .unwrap()
            .get(i - 1)
            .unwrap()
            .get(seqs[s][i] as usize)
            .unwrap()
            .to_scalar()
            .unwrap();
        let got: f64 = packed.get(k).unwrap().get(0).unwrap().to_scalar().unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "pick {k}: {got} vs padded {want}"
        );
    }
}

fn candle_nn_free_log_softmax(z: &Tensor) -> Tensor {
    let max = z.max_keepdim(D::Minus1).unwrap();
    let s = z.broadcast_sub(&max).unwrap();
    let lse = s
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    s.broadcast_sub(&lse).unwrap()
}

/// Layers recomputed in the backward give the gradients of layers kept, in both op modes.
#[test]
fn checkpointed_layers_give_the_same_gradients() {
    let seqs = seqs();
    let picks = all_picks(&seqs);
    for mode in [OpsMode::Auto, OpsMode::Composite] {
        let (s0, g0) = scores_and_grads(&policy(mode, None), &seqs, &picks);
        let (s1, g1) = scores_and_grads(&policy(mode, Some(0)), &seqs, &picks);
        assert!(max_diff(&s0, &s1) < 1e-13, "{mode:?}: scores differ");
        let p = policy(mode, None);
        for ((name, _), (a, b)) in p.model().parameters().iter().zip(g0.iter().zip(&g1)) {
            let d = max_diff(a, b);
            let scale = max_diff(a, &a.zeros_like().unwrap()).max(1e-6);
            assert!(
                d / scale < 1e-12,
                "{mode:?}: gradient of {name} differs by {d}"
            );
        }
    }
}

/// Micro-batches of a few tokens (each sequence alone), of a budget that packs some
/// sequences, and of everything: the same loss and accumulated gradient.
#[test]
fn token_budgets_do_not_change_the_update() {
    let seqs = seqs();
    let samples: Vec<Sample> = seqs
        .iter()
        .enumerate()
        .map(|(k, t)| Sample {
            tokens: t.clone(),
            policy_mask: (0..t.len()).map(|i| i > 0).collect(),
            old_logprobs: (0..t.len()).map(|i| -5.0 - 0.01 * i as f32).collect(),
            ref_logprobs: None,
            advantage: if k % 2 == 0 { 1.0 } else { -0.5 },
            policy_version: 0,
            group: 0,
        })
        .collect();
    let run = |tokens: usize| {
        let p = Arc::new(policy(OpsMode::Auto, None));
        let settings = GrpoSettings {
            micro_batch_size: 64,
            micro_batch_tokens: tokens,
            ..GrpoSettings::default()
        };
        let t = GrpoTrainer::new(p, settings).unwrap();
        let batch = t.select(&samples).unwrap();
        let plan = micro_batches(&batch.samples, 64, tokens);
        let mut acc = Default::default();
        for mb in &plan {
            t.accumulate(&mut acc, &batch.samples[mb.clone()], batch.global_tokens)
                .unwrap();
        }
        (plan.len(), acc.loss(), acc.grads().unwrap().to_vec())
    };
    let (n0, l0, g0) = run(1);
    assert_eq!(n0, seqs.len());
    for tokens in [60, 1 << 20] {
        let (n, l, g) = run(tokens);
        assert!(n < n0);
        assert!((l - l0).abs() < 1e-12, "budget {tokens}: loss {l} vs {l0}");
        for (a, b) in g.iter().zip(&g0) {
            let d = max_diff(a, b);
            assert!(d < 1e-12, "budget {tokens}: gradient differs by {d}");
        }
    }
}
