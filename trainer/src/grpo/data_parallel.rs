//! Data parallelism over the devices of one trainer (one worker per GPU, DESIGN.md "GPU
//! trainer pods"): the trainer that samples (rank 0) keeps a replica of its weights and
//! optimiser state on every other device. An update splits the batch by whole groups over
//! the workers, each runs forward and backward on its shard on its own thread, the token
//! count and the gradients are all-reduced ([`AllReduce`]), and every worker applies the same
//! AdamW update, so the replicas stay identical and rank 0 alone checkpoints and samples.
//!
//! The collectives are [`InProcessAllReduce`] when the devices are CPUs (what the tests run)
//! and NCCL between CUDA devices (`nccl`, in the `cuda` build).

use std::collections::BTreeMap;

use candle_core::Device;

use super::GrpoError;
use super::parallel::{AllReduce, InProcessAllReduce};
use super::sample::Sample;
use super::trainer::{GrpoTrainer, StepStats};

/// The other workers of a data-parallel trainer, and rank 0's handle on the group.
pub(crate) struct DataParallel {
    reduce: Box<dyn AllReduce>,
    workers: Vec<Worker>,
}

struct Worker {
    trainer: GrpoTrainer,
    reduce: Box<dyn AllReduce>,
}

/// The collectives joining workers on `devices` (rank i on `devices[i]`): in-process for
/// CPUs, NCCL for CUDA devices.
pub fn collectives(devices: &[Device]) -> Result<Vec<Box<dyn AllReduce>>, GrpoError> {
    if devices.iter().all(Device::is_cpu) {
        return Ok(InProcessAllReduce::group(devices.len())
            .into_iter()
            .map(|h| Box::new(h) as Box<dyn AllReduce>)
            .collect());
    }
    cuda_collectives(devices)
}

#[cfg(feature = "cuda")]
fn cuda_collectives(devices: &[Device]) -> Result<Vec<Box<dyn AllReduce>>, GrpoError> {
    Ok(super::nccl::NcclAllReduce::group(devices)?
        .into_iter()
        .map(|h| Box::new(h) as Box<dyn AllReduce>)
        .collect())
}

#[cfg(not(feature = "cuda"))]
fn cuda_collectives(_: &[Device]) -> Result<Vec<Box<dyn AllReduce>>, GrpoError> {
    Err(GrpoError::Reduce(
        "data parallelism over CUDA devices needs the `cuda` build (NCCL)".into(),
    ))
}

impl DataParallel {
    /// Replicas of `primary` on `devices[1..]` (`devices[0]` is the primary's), joined by
    /// `group` (one handle per device, rank order).
    pub(crate) fn new(
        primary: &GrpoTrainer,
        devices: &[Device],
        mut group: Vec<Box<dyn AllReduce>>,
    ) -> Result<Self, GrpoError> {
        if group.len() != devices.len() || devices.len() < 2 {
            return Err(GrpoError::Reduce(format!(
                "{} collective handles for {} devices (at least 2)",
                group.len(),
                devices.len()
            )));
        }
        let reduce = group.remove(0);
        let mut workers = Vec::with_capacity(devices.len() - 1);
        for (device, reduce) in devices[1..].iter().zip(group) {
            workers.push(Worker {
                trainer: primary.replica_on(device)?,
                reduce,
            });
        }
        Ok(Self { reduce, workers })
    }

    pub(crate) fn world_size(&self) -> usize {
        self.workers.len() + 1
    }

    /// One update over `samples`: rank 0 (`primary`) on this thread, every other worker on
    /// its own, each on its shard. A worker that fails still takes part in the reductions, so
    /// no worker waits for ever; all then return the error and none applies the update. (A
    /// worker that panicked would leave the others waiting in a collective: the update path
    /// returns its errors as values, so a panic there is a bug, not an input.)
    pub(crate) fn train_step(
        &mut self,
        primary: &mut GrpoTrainer,
        samples: &[Sample],
    ) -> Result<StepStats, GrpoError> {
        let shards = shard_by_group(samples, self.world_size());
        let (first, rest) = shards.split_first().ok_or_else(|| {
            GrpoError::Reduce("no shard for rank 0 (a world of no workers)".into())
        })?;
        let reduce = self.reduce.as_ref();
        let (mine, theirs) = std::thread::scope(|scope| {
            let joins: Vec<_> = self
                .workers
                .iter_mut()
                .zip(rest)
                .map(|(w, shard)| {
                    scope.spawn(move || w.trainer.train_step_shard(shard, w.reduce.as_ref()))
                })
                .collect();
            let mine = primary.train_step_shard(first, reduce);
            let theirs: Vec<_> = joins
                .into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(GrpoError::Reduce("a data-parallel worker panicked".into()))
                    })
                })
                .collect();
            (mine, theirs)
        });
        let stats = mine?;
        for (rank, r) in theirs.into_iter().enumerate() {
            let s = r?;
            // Every worker applied the same reduced update: its step and version say so.
            if (s.step, s.policy_version) != (stats.step, stats.policy_version) {
                return Err(GrpoError::Reduce(format!(
                    "worker {} is at step {} (v{}), rank 0 at step {} (v{})",
                    rank + 1,
                    s.step,
                    s.policy_version,
                    stats.step,
                    stats.policy_version
                )));
            }
        }
        Ok(stats)
    }
}

/// Splits `samples` over `workers` by whole groups (a group's advantages and its
/// zero-advantage drop need all its members), balancing policy tokens: the largest groups
/// first, each to the least loaded worker. Deterministic; samples keep their order.
pub fn shard_by_group(samples: &[Sample], workers: usize) -> Vec<Vec<Sample>> {
    let workers = workers.max(1);
    let mut tokens: BTreeMap<u64, usize> = BTreeMap::new();
    for s in samples {
        *tokens.entry(s.group).or_default() += s.tokens.len();
    }
    let mut groups: Vec<(u64, usize)> = tokens.into_iter().collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut load = vec![0usize; workers];
    let mut owner: BTreeMap<u64, usize> = BTreeMap::new();
    for (g, n) in groups {
        let w = (0..workers).min_by_key(|&w| (load[w], w)).unwrap_or(0);
        load[w] += n;
        owner.insert(g, w);
    }
    let mut shards = vec![Vec::new(); workers];
    for s in samples {
        shards[owner.get(&s.group).copied().unwrap_or(0)].push(s.clone());
    }
    shards
}

impl GrpoTrainer {
    /// Makes this trainer the rank 0 of a data-parallel group over `devices` (its own device
    /// first): replicas of its weights and optimiser state on the others, joined by
    /// [`collectives`]. [`GrpoTrainer::train_step`] then splits every update over them.
    pub fn with_data_parallel(mut self, devices: &[Device]) -> Result<Self, GrpoError> {
        if devices.len() < 2 {
            return Ok(self);
        }
        if !devices[0].same_device(self.policy().model().device()) {
            return Err(GrpoError::Reduce(
                "the first data-parallel device must be the trainer's own".into(),
            ));
        }
        let group = collectives(devices)?;
        self.set_data_parallel(DataParallel::new(&self, devices, group)?);
        Ok(self)
    }

    /// A trainer on `device` with this one's weights, optimiser state, step and settings.
    fn replica_on(&self, device: &Device) -> Result<GrpoTrainer, GrpoError> {
        let policy = self.policy().replica_on(device)?;
        let mut t = GrpoTrainer::new(std::sync::Arc::new(policy), self.settings().clone())?;
        let opt = self.optimizer();
        let to = |v: &[candle_core::Var]| {
            v.iter()
                .map(|m| m.as_tensor().to_device(device))
                .collect::<candle_core::Result<Vec<_>>>()
        };
        t.restore(self.step(), opt.t, to(&opt.m)?, to(&opt.v)?)?;
        Ok(t)
    }
}
