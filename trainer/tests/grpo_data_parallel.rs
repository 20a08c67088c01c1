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
    let moved = max_diff(&want, &before);
    assert!(moved > 1e-4, "the updates move the weights ({moved})");
    for workers in [2, 3] {
        let results = run(workers, 2);
        for (rank, (w, stats)) in results.iter().enumerate() {
            let diff = max_diff(w, &want);
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

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f64, f64::max)
}

/// The path a run takes (`trainer.gpus` > 1 builds it over CUDA devices and NCCL): rank 0
/// keeps replicas on the other devices and `train_step` splits every update over them. Here
/// the devices are CPUs, joined in-process. The wrap happens after one plain step, so the
/// replicas must start from rank 0's weights *and* optimiser state (AdamW's moments and count).
#[test]
fn a_data_parallel_trainer_makes_the_updates_of_one_worker() {
    let mut one = trainer();
    for _ in 0..3 {
        one.train_step(&samples()).unwrap();
    }
    let want = weights(&one);
    for workers in [2, 3] {
        let mut t = trainer();
        t.train_step(&samples()).unwrap();
        let mut t = t
            .with_data_parallel(&vec![Device::Cpu; workers])
            .expect("CPU workers");
        assert_eq!(t.data_parallel_workers(), workers);
        let mut stats = StepStats::default();
        for _ in 0..2 {
            stats = t.train_step(&samples()).unwrap();
        }
        let diff = max_diff(&weights(&t), &want);
        assert!(diff < 1e-12, "{workers} workers: weights differ by {diff}");
        assert_eq!((stats.step, stats.policy_version), (3, 3));
        assert_eq!(stats.dropped_zero_advantage_groups, 1);
    }
}

#[test]
fn shards_keep_groups_whole_and_balance_tokens() {
    let all = samples();
    let shards = selfplay_trainer::grpo::shard_by_group(&all, 3);
    assert_eq!(shards.len(), 3);
    assert_eq!(shards.iter().map(Vec::len).sum::<usize>(), all.len());
    for g in 0..4u64 {
        let holders = shards
            .iter()
            .filter(|s| s.iter().any(|x| x.group == g))
            .count();
        assert_eq!(holders, 1, "group {g} is split");
    }
    let tokens: Vec<usize> = shards
        .iter()
        .map(|s| s.iter().map(|x| x.tokens.len()).sum())
        .collect();
    assert!(tokens.iter().all(|&t| t > 0), "an idle worker: {tokens:?}");
    // More workers than groups: the extra workers get nothing and still take part.
    let shards = selfplay_trainer::grpo::shard_by_group(&all, 6);
    assert_eq!(shards.iter().filter(|s| s.is_empty()).count(), 2);
}

/// More workers than groups: idle workers contribute zero gradients and the update is still
/// the one-worker update.
#[test]
fn idle_workers_change_nothing() {
    let mut one = trainer();
    one.train_step(&samples()).unwrap();
    let mut t = trainer().with_data_parallel(&vec![Device::Cpu; 6]).unwrap();
    t.train_step(&samples()).unwrap();
    let diff = max_diff(&weights(&t), &weights(&one));
    assert!(diff < 1e-12, "weights differ by {diff}");
}

/// Runs one update on two in-process workers where worker 1's shard is `bad`; returns each
/// worker's error and whether its weights moved. Fails the test (rather than hanging) when a
/// worker is left waiting in a collective.
fn one_bad_worker(bad: Vec<Sample>) -> Vec<(String, bool)> {
    let good: Vec<Sample> = samples().into_iter().filter(|s| s.group == 0).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (reduce, shard) in InProcessAllReduce::group(2).into_iter().zip([good, bad]) {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut t = trainer();
            let before = weights(&t);
            let r = t.train_step_shard(&shard, &reduce);
            let moved = max_diff(&weights(&t), &before) > 0.0;
            let _ = tx.send((
                reduce.rank(),
                r.err().map(|e| e.to_string()).unwrap_or_default(),
                moved,
            ));
        });
    }
    let mut out = vec![(String::new(), false); 2];
    for _ in 0..2 {
        let (rank, err, moved) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a worker is still waiting in a collective");
        out[rank] = (err, moved);
    }
    out
}

#[test]
fn a_worker_with_an_invalid_shard_fails_the_update_on_every_worker() {
    let mut bad: Vec<Sample> = samples().into_iter().filter(|s| s.group == 1).collect();
    bad[0].policy_mask.pop();
    let out = one_bad_worker(bad);
    assert!(out[1].0.contains("sample 0"), "{:?}", out[1]);
    assert!(
        out[0].0.contains("other data-parallel worker"),
        "{:?}",
        out[0]
    );
    assert!(out.iter().all(|(_, moved)| !moved), "{out:?}");
}

#[test]
fn a_worker_whose_forward_fails_fails_the_update_on_every_worker() {
    let mut bad: Vec<Sample> = samples().into_iter().filter(|s| s.group == 1).collect();
    // A token id outside the vocabulary passes the sample's own checks and fails in the
    // embedding lookup, as a GPU running out of memory would fail in the forward.
    bad[0].tokens[5] = 1_000_000;
    let out = one_bad_worker(bad);
    assert!(!out[1].0.is_empty(), "{:?}", out[1]);
    assert!(
        out[0].0.contains("other data-parallel worker"),
        "{:?}",
        out[0]
    );
    assert!(out.iter().all(|(_, moved)| !moved), "{out:?}");
}
