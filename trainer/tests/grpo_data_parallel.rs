//! Data parallelism on the CPU: N workers (threads joined by the in-process all-reduce), each
//! with its own replica and a shard of the batch, make the update one worker makes on the
//! whole batch, and their replicas stay identical.

use std::sync::Arc;

use candle_core::{DType, Device};
use selfplay_crds::run::LrSchedule;
use selfplay_trainer::grpo::{GrpoSettings, GrpoTrainer, InProcessAllReduce, Sample, StepStats};
use selfplay_trainer::policy::CandlePolicy;

fn trainer() -> GrpoTrainer {
    // f64, so that the workers' different summation order (per shard, then across shards)
    // shows only as f64 rounding.
    let policy = CandlePolicy::tiny(5, 32, 2, DType::F64, &Device::Cpu).unwrap();
    let settings = GrpoSettings {
        learning_rate: 1e-3,
        lr_schedule: LrSchedule::Constant,
        warmup_steps: 0,
        micro_batch_size: 2,
        weight_decay: 0.01,
        ..GrpoSettings::default()
    };
    GrpoTrainer::new(Arc::new(policy), settings).unwrap()
}

/// Four groups of three sequences of different lengths; one group has equal rewards (dropped).
fn samples() -> Vec<Sample> {
    let mut out = Vec::new();
    for k in 0..12u32 {
        let n = 10 + (k as usize * 5) % 17;
        let tokens: Vec<u32> = (0..n as u32).map(|i| 32 + (i * (k + 2) + k) % 90).collect();
        let group = u64::from(k / 3);
        let advantage = if group == 2 {
            0.0
        } else {
            [0.8, -0.3, -0.5][k as usize % 3]
        };
        out.push(Sample {
            policy_mask: (0..n).map(|i| i >= 4).collect(),
            old_logprobs: (0..n).map(|i| -2.0 - 0.1 * (i % 7) as f32).collect(),
            ref_logprobs: None,
            advantage,
            policy_version: 0,
            group,
            tokens,
        });
    }
    out
}

fn weights(t: &GrpoTrainer) -> Vec<f64> {
    t.policy()
        .model()
        .parameters()
        .iter()
        .flat_map(|(_, p)| {
            p.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        })
        .collect()
}

/// Runs `steps` updates with `workers` workers, shard i holding the groups g with
/// g % workers == i; returns every worker's weights and stats.
fn run(workers: usize, steps: usize) -> Vec<(Vec<f64>, StepStats)> {
    let all = samples();
    let handles = InProcessAllReduce::group(workers);
    std::thread::scope(|scope| {
        let joins: Vec<_> = handles
            .into_iter()
            .map(|reduce| {
                let shard: Vec<Sample> = all
                    .iter()
                    .filter(|s| s.group as usize % workers == reduce.rank())
                    .cloned()
                    .collect();
                scope.spawn(move || {
                    let mut t = trainer();
                    let mut stats = StepStats::default();
                    for _ in 0..steps {
                        stats = t.train_step_shard(&shard, &reduce).unwrap();
                    }
                    (weights(&t), stats)
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

#[test]
fn n_workers_on_shards_make_the_update_of_one_worker_on_the_whole_batch() {
    let mut one = trainer();
    let before = weights(&one);
    let mut whole = StepStats::default();
    for _ in 0..2 {
        whole = one.train_step(&samples()).unwrap();
    }
    let want = weights(&one);
    assert!(whole.tokens > 0 && whole.dropped_zero_advantage_groups == 1);
    let moved = want
        .iter()
        .zip(&before)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(moved > 1e-4, "the updates move the weights ({moved})");
    for workers in [2, 3] {
        let results = run(workers, 2);
        for (rank, (w, stats)) in results.iter().enumerate() {
            let diff = w
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(
                diff < 1e-12,
                "{workers} workers, worker {rank}: weights differ by {diff}"
            );
            assert_eq!(
                (
                    stats.tokens,
                    stats.samples,
                    stats.step,
                    stats.policy_version
                ),
                (
                    whole.tokens,
                    whole.samples,
                    whole.step,
                    whole.policy_version
                )
            );
            assert_eq!(
                stats.dropped_zero_advantage_groups,
                whole.dropped_zero_advantage_groups
            );
            assert!(((stats.loss - whole.loss) / whole.loss).abs() < 1e-12);
            assert!(((stats.grad_norm - whole.grad_norm) / whole.grad_norm).abs() < 1e-12);
            assert!((stats.entropy - whole.entropy).abs() < 1e-12);
        }
        // The replicas are bit-identical: each adds the contributions in the same order.
        for (w, _) in &results[1..] {
            assert_eq!(w, &results[0].0);
        }
    }
}
