//! One GRPO update: select the samples, accumulate the objective's gradient over
//! micro-batches, check it, clip it, apply AdamW, bump the policy version.
//!
//! Mixed precision: the forward runs in the model's compute dtype (bf16 on GPUs) against
//! copies of the f32 master weights; each micro-batch's gradient is cast to f32 before it is
//! summed, AdamW updates the f32 masters and moments, and the compute copies are refreshed
//! under the weights write lock.
//!
//! Behaviour log-probs: π_old in the ratio is the trainer's own forward at the weights before
//! the update, not the sampler's (sampling and training kernels differ, and in bf16 by more
//! than the clip range's resolution). The sampler's log-probs only weight each token's loss by
//! the truncated importance ratio min(exp(log π_old − log π_sampler), C) (verl's and SkyRL's
//! "TIS"), which also covers samples from older policy versions.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{D, DType, Tensor};

use crate::engine::policy::Policy;
use crate::policy::CandlePolicy;

use super::data_parallel::DataParallel;
use super::micro_batches::micro_batches;
use super::objective::weighted_token_terms;
use super::optimizer::{AdamW, clip_factor, global_grad_norm};
use super::parallel::{AllReduce, SingleWorker};
use super::sample::Sample;
use super::schedule::learning_rate;
use super::{GrpoError, GrpoSettings};

/// What one update did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Updates applied so far, this one included.
    pub step: u64,
    /// The policy version after the update.
    pub policy_version: u64,
    /// Σ token losses / policy tokens of the global batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub samples: usize,
    pub tokens: usize,
    /// Groups whose advantages were all zero, dropped.
    pub dropped_zero_advantage_groups: usize,
    /// Samples more than `max_staleness` versions old, not trained on.
    pub stale_samples: usize,
    /// Fraction of policy tokens whose gradient the clip (or dual clip) removed.
    pub clip_fraction: f64,
    /// Mean entropy of the policy's distribution over the trained tokens.
    pub entropy: f64,
    /// Mean k3 KL to the reference (0 without a KL term).
    pub kl: f64,
    pub ratio_mean: f64,
    pub staleness_mean: f64,
    pub staleness_max: u64,
    /// Mean |log π_old − log π_sampler| over the trained tokens: how far the trainer's
    /// forward is from the sampler's (kernels, precision, stale weights).
    pub logprob_mismatch_mean: f64,
    /// The largest such difference.
    pub logprob_mismatch_max: f64,
    /// Fraction of trained tokens whose importance weight was truncated at the cap.
    pub is_truncated_fraction: f64,
}

/// Where π_old, the denominator of the ratio, comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BehaviourLogprobs {
    /// The trainer's forward at the weights before the update; the samples' log-probs (the
    /// sampler's) give the truncated importance weight. What [`GrpoTrainer::train_step`] uses.
    #[default]
    Trainer,
    /// The samples' log-probs are π_old and no importance weight is applied: the objective
    /// exactly as written in the method, against given behaviour log-probs.
    Sample,
}

/// The samples of one update after filtering, and the global token count the loss divides by.
#[derive(Clone, Debug)]
pub struct Batch {
    pub samples: Vec<Sample>,
    /// Fresh enough samples dropped with their zero-advantage group.
    pub dropped_samples: usize,
    pub global_tokens: usize,
    pub dropped_zero_advantage_groups: usize,
    pub stale_samples: usize,
    pub staleness_mean: f64,
    pub staleness_max: u64,
}

/// Gradients and statistics summed over the micro-batches of one update.
#[derive(Default)]
pub struct Accumulator {
    grads: Option<Vec<Tensor>>,
    loss: f64,
    tokens: usize,
    clipped: usize,
    entropy: f64,
    kl: f64,
    ratio: f64,
    mismatch_sum: f64,
    mismatch_max: f64,
    truncated: usize,
}

impl Accumulator {
    /// The loss accumulated so far (Σ token losses / global tokens).
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Policy tokens seen so far.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The summed gradients, in the order of the model's parameters.
    pub fn grads(&self) -> Option<&[Tensor]> {
        self.grads.as_deref()
    }

    /// Adds a micro-batch whose loss is not the GRPO objective (supervised fine-tuning's
    /// negative log-likelihood), so that [`GrpoTrainer::apply`] checks, clips and applies it
    /// exactly as it does GRPO's: `loss` is the micro-batch's share of the batch loss,
    /// `entropy_sum` the summed entropy over its `tokens`, `grads` the gradient of `loss` in
    /// the order of the model's parameters.
    pub fn add_external(
        &mut self,
        loss: f64,
        tokens: usize,
        entropy_sum: f64,
        grads: Vec<Tensor>,
    ) -> Result<(), GrpoError> {
        self.loss += loss;
        self.tokens += tokens;
        self.entropy += entropy_sum;
        self.grads = Some(match self.grads.take() {
            None => grads,
            Some(sum) => {
                if sum.len() != grads.len() {
                    return Err(GrpoError::Input(format!(
                        "{} gradients added to {} accumulated ones",
                        grads.len(),
                        sum.len()
                    )));
                }
                sum.iter()
                    .zip(&grads)
                    .map(|(a, b)| a + b)
                    .collect::<candle_core::Result<_>>()?
            }
        });
        Ok(())
    }
}

/// The learner: owns the optimiser state and updates the shared policy in place.
pub struct GrpoTrainer {
    policy: Arc<CandlePolicy>,
    settings: GrpoSettings,
    opt: AdamW,
    step: u64,
    nonfinite_steps: u64,
    /// The other workers when this trainer is rank 0 of a data-parallel group.
    parallel: Option<DataParallel>,
}

impl GrpoTrainer {
    pub fn new(policy: Arc<CandlePolicy>, settings: GrpoSettings) -> Result<Self, GrpoError> {
        // Moments are made like the parameters they follow: the f32 masters.
        let opt = AdamW::new(
            policy.model().parameters(),
            settings.adam_beta1,
            settings.adam_beta2,
            settings.adam_eps,
            settings.weight_decay,
        )?;
        Ok(Self {
            policy,
            settings,
            opt,
            step: 0,
            nonfinite_steps: 0,
            parallel: None,
        })
    }

    pub fn policy(&self) -> &Arc<CandlePolicy> {
        &self.policy
    }

    pub fn settings(&self) -> &GrpoSettings {
        &self.settings
    }

    /// Updates applied so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Updates refused because the loss or a gradient was NaN or infinite.
    pub fn nonfinite_steps(&self) -> u64 {
        self.nonfinite_steps
    }

    pub(crate) fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub(crate) fn set_data_parallel(&mut self, parallel: DataParallel) {
        self.parallel = Some(parallel);
    }

    /// Workers that share each update: 1, or the devices of [`GrpoTrainer::with_data_parallel`].
    pub fn data_parallel_workers(&self) -> usize {
        self.parallel.as_ref().map_or(1, DataParallel::world_size)
    }

    pub(crate) fn restore(
        &mut self,
        step: u64,
        adam_t: u64,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
    ) -> Result<(), GrpoError> {
        if m.len() != self.opt.m.len() || v.len() != self.opt.v.len() {
            return Err(GrpoError::Checkpoint(
                "optimizer state does not match the model's parameters".into(),
            ));
        }
        for (dst, src) in self.opt.m.iter().zip(&m).chain(self.opt.v.iter().zip(&v)) {
            if dst.shape() != src.shape() {
                return Err(GrpoError::Checkpoint(format!(
                    "optimizer state of shape {:?}, expected {:?}",
                    src.dims(),
                    dst.dims()
                )));
            }
            dst.set(&src.to_device(dst.device())?.to_dtype(dst.dtype())?)?;
        }
        self.opt.t = adam_t;
        self.step = step;
        Ok(())
    }

    /// A full update over `samples`, in micro-batches of at most `micro_batch_size`
    /// sequences and `micro_batch_tokens` tokens, each packed end to end.
    /// With data-parallel workers the update is split over them (`data_parallel.rs`).
    pub fn train_step(&mut self, samples: &[Sample]) -> Result<StepStats, GrpoError> {
        match self.parallel.take() {
            None => self.train_step_shard(samples, &SingleWorker),
            Some(mut dp) => {
                let r = dp.train_step(self, samples);
                self.parallel = Some(dp);
                r
            }
        }
    }

    /// This worker's part of a data-parallel update: `shard` is its share of the global batch
    /// (split by whole groups, so that dropping all-zero-advantage groups sees every member),
    /// `reduce` joins it to the other workers. Every worker must call this once per update;
    /// all end with the same weights. The loss divides by the global token count and the
    /// gradients are summed, so N workers make the update one worker makes on the whole batch.
    ///
    /// A worker whose shard is invalid or whose forward or backward fails (a GPU out of
    /// memory) still makes every collective call, with a failure flag: all workers then
    /// return an error and none applies the update, instead of the others waiting for ever.
    pub fn train_step_shard(
        &mut self,
        shard: &[Sample],
        reduce: &dyn AllReduce,
    ) -> Result<StepStats, GrpoError> {
        let parallel = reduce.world_size() > 1;
        let (mut batch, mut failure) = match self.select(shard) {
            Ok(b) => (b, None),
            Err(e) if parallel => (self.select(&[])?, Some(e)),
            Err(e) => return Err(e),
        };
        let mut counts = [
            f64::from(u8::from(failure.is_some())),
            batch.global_tokens as f64,
            batch.samples.len() as f64,
            batch.dropped_zero_advantage_groups as f64,
            batch.stale_samples as f64,
            batch.staleness_mean * (batch.samples.len() + batch.dropped_samples) as f64,
            (batch.samples.len() + batch.dropped_samples) as f64,
        ];
        reduce.sum(&mut counts)?;
        let mut st_max = [batch.staleness_max as f64];
        reduce.max(&mut st_max)?;
        if counts[0] > 0.0 {
            return Err(failure.unwrap_or_else(|| failed_elsewhere(counts[0])));
        }
        let counts = &counts[1..];
        let global_tokens = counts[0] as usize;
        // Forward and backward on a rayon worker, so their parallel ops fork in place (see
        // `Policy::generate`). The reductions and the update run from this thread: they wait
        // for other workers or for the weights' write lock, which must never be waited for on
        // a worker of the pool.
        let local = rayon::scope(|_| {
            let mut acc = Accumulator::default();
            let s = &self.settings;
            for mb in micro_batches(&batch.samples, s.micro_batch_size, s.micro_batch_tokens) {
                let mb = &batch.samples[mb];
                self.accumulate_with(&mut acc, mb, global_tokens, BehaviourLogprobs::Trainer)?;
            }
            Ok::<_, GrpoError>(acc)
        });
        let mut acc = match local {
            Ok(acc) => acc,
            Err(e) if parallel => {
                failure = Some(e);
                Accumulator::default()
            }
            Err(e) => return Err(e),
        };
        if parallel {
            let failed = self.reduce_accumulator(&mut acc, reduce, failure.is_some())?;
            if failed > 0.0 {
                return Err(failure.unwrap_or_else(|| failed_elsewhere(failed)));
            }
        }
        batch.global_tokens = global_tokens;
        batch.dropped_zero_advantage_groups = counts[2] as usize;
        batch.stale_samples = counts[3] as usize;
        batch.staleness_mean = if counts[5] > 0.0 {
            counts[4] / counts[5]
        } else {
            0.0
        };
        batch.staleness_max = st_max[0] as u64;
        let mut stats = self.apply(acc, &batch)?;
        stats.samples = counts[1] as usize;
        Ok(stats)
    }

    /// Sums the gradients and statistics of every worker into each worker's `acc`. A worker
    /// with nothing to train on still takes part (with zero gradients): every worker must make
    /// the same calls in the same order. Returns how many workers failed (`failed` is this
    /// one's flag).
    fn reduce_accumulator(
        &self,
        acc: &mut Accumulator,
        reduce: &dyn AllReduce,
        failed: bool,
    ) -> Result<f64, GrpoError> {
        let mut scalars = [
            f64::from(u8::from(failed)),
            acc.loss,
            acc.tokens as f64,
            acc.clipped as f64,
            acc.entropy,
            acc.kl,
            acc.ratio,
            acc.mismatch_sum,
            acc.truncated as f64,
            f64::from(u8::from(acc.grads.is_some())),
        ];
        reduce.sum(&mut scalars)?;
        let mut max = [acc.mismatch_max];
        reduce.max(&mut max)?;
        let local = match acc.grads.take() {
            Some(g) => g,
            None => self
                .policy
                .model()
                .parameters()
                .iter()
                .map(|(_, p)| p.zeros_like())
                .collect::<candle_core::Result<_>>()?,
        };
        let summed = reduce.sum_tensors(&local)?;
        let (failed, scalars) = (scalars[0], &scalars[1..]);
        acc.loss = scalars[0];
        acc.tokens = scalars[1] as usize;
        acc.clipped = scalars[2] as usize;
        acc.entropy = scalars[3];
        acc.kl = scalars[4];
        acc.ratio = scalars[5];
        acc.mismatch_sum = scalars[6];
        acc.truncated = scalars[7] as usize;
        acc.mismatch_max = max[0];
        acc.grads = (scalars[8] > 0.0).then_some(summed);
        Ok(failed)
    }

    /// Validates `samples`, drops stale ones and groups whose advantages are all zero.
    pub fn select(&self, samples: &[Sample]) -> Result<Batch, GrpoError> {
        for (i, s) in samples.iter().enumerate() {
            s.validate()
                .map_err(|e| GrpoError::Input(format!("sample {i}: {e}")))?;
        }
        let version = self.policy.version();
        let mut by_group: BTreeMap<u64, Vec<&Sample>> = BTreeMap::new();
        let (mut stale, mut st_sum, mut st_max) = (0, 0u64, 0u64);
        for s in samples {
            let age = version.saturating_sub(s.policy_version);
            if age > self.settings.max_staleness {
                stale += 1;
                continue;
            }
            st_sum += age;
            st_max = st_max.max(age);
            by_group.entry(s.group).or_default().push(s);
        }
        let kept_before = by_group.values().map(Vec::len).sum::<usize>();
        let mut dropped_groups = 0;
        let mut kept = Vec::new();
        // Samples keep their input order within the batch.
        let keep: std::collections::HashSet<u64> = by_group
            .iter()
            .filter_map(|(g, members)| {
                if members.iter().all(|s| s.advantage == 0.0) {
                    dropped_groups += 1;
                    None
                } else {
                    Some(*g)
                }
            })
            .collect();
        for s in samples {
            if keep.contains(&s.group)
                && version.saturating_sub(s.policy_version) <= self.settings.max_staleness
            {
                kept.push(s.clone());
            }
        }
        let global_tokens = kept.iter().map(Sample::policy_tokens).sum();
        Ok(Batch {
            dropped_samples: kept_before - kept.len(),
            samples: kept,
            global_tokens,
            dropped_zero_advantage_groups: dropped_groups,
            stale_samples: stale,
            staleness_mean: if kept_before > 0 {
                st_sum as f64 / kept_before as f64
            } else {
                0.0
            },
            staleness_max: st_max,
        })
    }

    /// Adds one micro-batch's share of the loss (Σ token losses / `global_tokens`) and of its
    /// gradient to `acc`, with the samples' log-probs as π_old ([`BehaviourLogprobs::Sample`]).
    pub fn accumulate(
        &self,
        acc: &mut Accumulator,
        micro_batch: &[Sample],
        global_tokens: usize,
    ) -> Result<(), GrpoError> {
        self.accumulate_with(acc, micro_batch, global_tokens, BehaviourLogprobs::Sample)
    }

    /// [`GrpoTrainer::accumulate`] with π_old from `behaviour`.
    ///
    /// With [`BehaviourLogprobs::Trainer`], π_old is the value of this very forward: the
    /// update is applied only after every micro-batch has been through it, so this forward
    /// runs at the pre-update weights, and its detached log-probs are what a separate
    /// no-gradient pass before the update would compute, without a second forward.
    pub fn accumulate_with(
        &self,
        acc: &mut Accumulator,
        micro_batch: &[Sample],
        global_tokens: usize,
        behaviour: BehaviourLogprobs,
    ) -> Result<(), GrpoError> {
        let picks: Vec<(usize, usize)> = micro_batch
            .iter()
            .enumerate()
            .flat_map(|(s, smp)| {
                smp.policy_mask
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m)
                    .map(move |(i, _)| (s, i))
            })
            .collect();
        if picks.is_empty() || global_tokens == 0 {
            return Ok(());
        }
        let seqs: Vec<Vec<u32>> = micro_batch.iter().map(|s| s.tokens.clone()).collect();
        let model = self.policy.model();
        let scores = model.score_positions(&seqs, &picks, true)?;
        let logp = scores.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let values = scores.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let norm = global_tokens as f64;
        let mut coef = Vec::with_capacity(picks.len());
        for (k, &(s, i)) in picks.iter().enumerate() {
            let smp = &micro_batch[s];
            let logp = values[k][0];
            let sampler = smp.old_logprobs[i] as f64;
            let (old, weight) = match behaviour {
                BehaviourLogprobs::Sample => (sampler, 1.0),
                BehaviourLogprobs::Trainer => {
                    let delta = logp - sampler;
                    acc.mismatch_sum += delta.abs();
                    acc.mismatch_max = acc.mismatch_max.max(delta.abs());
                    let w = delta.exp();
                    if w > self.settings.is_cap {
                        acc.truncated += 1;
                    }
                    (logp, w.min(self.settings.is_cap))
                }
            };
            let t = weighted_token_terms(
                logp,
                old,
                weight,
                smp.advantage,
                smp.ref_logprobs.as_ref().map(|r| r[i] as f64),
                &self.settings,
            );
            acc.loss += t.loss / norm;
            acc.clipped += usize::from(t.clipped);
            acc.entropy += values[k][1];
            acc.kl += t.kl;
            acc.ratio += t.ratio;
            coef.push(t.dloss_dlogp / norm);
        }
        acc.tokens += picks.len();
        // Σ coef·logp has the objective's gradient; its value is reported from `acc.loss`.
        let coef = Tensor::from_vec(coef, picks.len(), model.device())?.to_dtype(logp.dtype())?;
        let surrogate = (logp * coef)?.sum_all()?;
        let grads = surrogate.backward()?;
        let params = model.parameters();
        let mut mb_grads = Vec::with_capacity(params.len());
        // Gradients are taken in the compute dtype and summed in the masters' (f32): bf16
        // sums of many micro-batches would drop the small ones.
        for ((name, master), p) in params.iter().zip(model.compute_parameters()) {
            match grads.get(p.as_tensor()) {
                Some(g) => mb_grads.push(g.to_dtype(master.dtype())?),
                None => {
                    return Err(GrpoError::Input(format!(
                        "parameter `{name}` got no gradient"
                    )));
                }
            }
        }
        acc.grads = Some(match acc.grads.take() {
            None => mb_grads,
            Some(sum) => sum
                .iter()
                .zip(&mb_grads)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
        });
        Ok(())
    }

    /// Checks the accumulated loss and gradient, clips, applies AdamW and bumps the version.
    /// A NaN or infinite loss or gradient refuses the update (counted) and leaves the weights
    /// and the optimiser state untouched.
    pub fn apply(&mut self, acc: Accumulator, batch: &Batch) -> Result<StepStats, GrpoError> {
        let n = acc.tokens.max(1) as f64;
        let mut stats = StepStats {
            loss: acc.loss,
            samples: batch.samples.len(),
            tokens: acc.tokens,
            dropped_zero_advantage_groups: batch.dropped_zero_advantage_groups,
            stale_samples: batch.stale_samples,
            clip_fraction: acc.clipped as f64 / n,
            entropy: acc.entropy / n,
            kl: acc.kl / n,
            ratio_mean: acc.ratio / n,
            staleness_mean: batch.staleness_mean,
            staleness_max: batch.staleness_max,
            logprob_mismatch_mean: acc.mismatch_sum / n,
            logprob_mismatch_max: acc.mismatch_max,
            is_truncated_fraction: acc.truncated as f64 / n,
            step: self.step,
            policy_version: self.policy.version(),
            ..StepStats::default()
        };
        let Some(grads) = acc.grads else {
            // Every group was dropped (equal rewards) or masked: nothing to learn from. The
            // step's summary says so; it is not a fault.
            tracing::debug!("GRPO step with no policy tokens to train on; no update");
            return Ok(stats);
        };
        let norm = global_grad_norm(&grads)?;
        stats.grad_norm = norm;
        if !acc.loss.is_finite() || !norm.is_finite() {
            self.nonfinite_steps += 1;
            return Err(GrpoError::NonFinite {
                step: self.step + 1,
                loss: acc.loss,
                grad_norm: norm,
            });
        }
        let lr = learning_rate(&self.settings, self.step);
        let scale = clip_factor(norm, self.settings.max_grad_norm);
        let model = self.policy.model();
        let opt = &mut self.opt;
        self.policy.with_weights_locked(|| {
            opt.step(model.parameters(), &grads, lr, scale)?;
            model.refresh_compute()?;
            Ok::<_, GrpoError>(())
        })?;
        self.step += 1;
        self.policy.set_version(self.policy.version() + 1);
        stats.step = self.step;
        stats.policy_version = self.policy.version();
        stats.learning_rate = lr;
        Ok(stats)
    }
}

fn failed_elsewhere(workers: f64) -> GrpoError {
    GrpoError::Reduce(format!(
        "{workers} other data-parallel worker(s) failed this update; it was not applied"
    ))
}
