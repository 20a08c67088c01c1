//! The fine-tuning loop: mean negative log-likelihood of the policy tokens of a batch,
//! its gradient summed over micro-batches, then the GRPO learner's own update (gradient
//! check, global-norm clipping, AdamW, warmup then cosine decay) and its checkpoints.
//!
//! The batches are a function of the step alone (each epoch a seeded permutation of the
//! examples, batches taken in order across epoch boundaries), so a run resumed from a
//! checkpoint continues exactly where it stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use selfplay_crds::run::LrSchedule;
use serde::{Deserialize, Serialize};

use crate::grpo::{Accumulator, Batch, GrpoError, GrpoSettings, GrpoTrainer};
use crate::policy::{CandlePolicy, Rng};

use super::SftError;
use super::data::Example;

/// Settings of a fine-tuning run.
#[derive(Clone, Debug, PartialEq)]
pub struct SftOptions {
    pub learning_rate: f64,
    /// Updates of linear warmup before the cosine decay.
    pub warmup_steps: u64,
    /// Updates in all (the cosine reaches zero at the last).
    pub total_steps: u64,
    /// Sequences per update.
    pub batch_size: usize,
    /// Sequences per forward/backward pass.
    pub micro_batch_size: usize,
    /// Global gradient-norm clip; 0 disables it.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// Seeds the order of the examples.
    pub seed: u64,
}

impl SftOptions {
    /// The optimiser settings of the GRPO learner that applies the updates; the objective's
    /// own settings (clip ranges, KL) are never read on this path.
    fn grpo_settings(&self) -> Result<GrpoSettings, SftError> {
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(SftError::Settings(format!(
                "the learning rate must be positive, got {}",
                self.learning_rate
            )));
        }
        if self.batch_size == 0 || self.micro_batch_size == 0 || self.total_steps == 0 {
            return Err(SftError::Settings(
                "batch size, micro-batch size and steps must be positive".into(),
            ));
        }
        if !(self.max_grad_norm >= 0.0 && self.weight_decay >= 0.0) {
            return Err(SftError::Settings(
                "the gradient clip and weight decay must not be negative".into(),
            ));
        }
        Ok(GrpoSettings {
            learning_rate: self.learning_rate,
            lr_schedule: LrSchedule::Cosine,
            warmup_steps: self.warmup_steps,
            total_steps: self.total_steps,
            micro_batch_size: self.micro_batch_size,
            max_grad_norm: self.max_grad_norm,
            weight_decay: self.weight_decay,
            seed: self.seed,
            ..GrpoSettings::default()
        })
    }
}

/// What one update did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SftStepStats {
    /// Updates applied so far, this one included.
    pub step: u64,
    /// Mean negative log-likelihood of the batch's policy tokens, before the update.
    pub loss: f64,
    pub tokens: usize,
    pub sequences: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Mean entropy of the policy's distribution over the trained tokens.
    pub entropy: f64,
}

/// What a checkpoint of a fine-tuning run records beside the learner's own state, to
/// refuse resuming on other data or another batch size (the batches would not continue).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SftState {
    examples: usize,
    batch_size: usize,
    total_steps: u64,
    seed: u64,
}

const SFT_STATE_FILE: &str = "sft_state.json";

/// The fine-tuning learner: the GRPO learner's optimiser and checkpoints, with the
/// supervised loss.
pub struct SftTrainer {
    grpo: GrpoTrainer,
    opts: SftOptions,
}

impl SftTrainer {
    pub fn new(policy: Arc<CandlePolicy>, opts: SftOptions) -> Result<Self, SftError> {
        let grpo = GrpoTrainer::new(policy, opts.grpo_settings()?)?;
        Ok(Self { grpo, opts })
    }

    /// Continues from a checkpoint written by [`Self::save_checkpoint`] for `examples`
    /// examples.
    pub fn resume(
        dir: &Path,
        opts: SftOptions,
        examples: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, SftError> {
        let path = dir.join(SFT_STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| SftError::Io {
            path: path.clone(),
            source,
        })?;
        let saved: SftState = serde_json::from_str(&text)
            .map_err(|e| SftError::Data(format!("{}: {e}", path.display())))?;
        let now = SftState {
            examples,
            batch_size: opts.batch_size,
            total_steps: opts.total_steps,
            seed: opts.seed,
        };
        if saved != now {
            return Err(SftError::Settings(format!(
                "{} was written for {saved:?}, this run has {now:?}: resuming would not continue the same batches",
                dir.display()
            )));
        }
        let grpo = GrpoTrainer::resume(dir, opts.grpo_settings()?, dtype, device)?;
        Ok(Self { grpo, opts })
    }

    pub fn policy(&self) -> &Arc<CandlePolicy> {
        self.grpo.policy()
    }

    /// Updates applied so far.
    pub fn step(&self) -> u64 {
        self.grpo.step()
    }

    pub fn options(&self) -> &SftOptions {
        &self.opts
    }

    /// The examples of update number `step` (0 for the first), as indices into `n` examples.
    pub fn batch_indices(&self, step: u64, n: usize) -> Vec<usize> {
        let b = self.opts.batch_size;
        let first = step as usize * b;
        let mut out = Vec::with_capacity(b);
        let mut epoch = usize::MAX;
        let mut order = Vec::new();
        for k in first..first + b {
            if n == 0 {
                break;
            }
            if k / n != epoch {
                epoch = k / n;
                order = epoch_order(self.opts.seed, epoch as u64, n);
            }
            out.push(order[k % n]);
        }
        out
    }

    /// One update on the next batch of `examples`.
    pub fn train_step(&mut self, examples: &[Example]) -> Result<SftStepStats, SftError> {
        let batch: Vec<&Example> = self
            .batch_indices(self.step(), examples.len())
            .into_iter()
            .map(|i| &examples[i])
            .collect();
        let global_tokens: usize = batch.iter().map(|e| e.policy_tokens()).sum();
        let acc = rayon::scope(|_| {
            let mut acc = Accumulator::default();
            for mb in batch.chunks(self.opts.micro_batch_size) {
                accumulate(self.grpo.policy(), &mut acc, mb, global_tokens)?;
            }
            Ok::<_, SftError>(acc)
        })?;
        let grpo_batch = Batch {
            samples: Vec::new(),
            dropped_samples: 0,
            global_tokens,
            dropped_zero_advantage_groups: 0,
            stale_samples: 0,
            staleness_mean: 0.0,
            staleness_max: 0,
        };
        let s = self.grpo.apply(acc, &grpo_batch)?;
        Ok(SftStepStats {
            step: s.step,
            loss: s.loss,
            tokens: s.tokens,
            sequences: batch.len(),
            grad_norm: s.grad_norm,
            learning_rate: s.learning_rate,
            entropy: s.entropy,
        })
    }

    /// A complete checkpoint at `dir` (which must not exist): the model directory as
    /// `trainer local` and `trainer score` load it, the optimiser state, and what resuming
    /// checks. Written under a hidden name and renamed, so it is complete or absent.
    pub fn save_checkpoint(&self, dir: &Path, examples: usize) -> Result<PathBuf, SftError> {
        if dir.exists() {
            return Err(SftError::Settings(format!(
                "{} already exists",
                dir.display()
            )));
        }
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| SftError::Settings(format!("bad output path {}", dir.display())))?;
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SftError::Io { path, source }
        };
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let inner = staging.join("model");
        let result = (|| {
            self.grpo.save_checkpoint(&inner)?;
            let state = SftState {
                examples,
                batch_size: self.opts.batch_size,
                total_steps: self.opts.total_steps,
                seed: self.opts.seed,
            };
            let bytes =
                serde_json::to_vec_pretty(&state).map_err(|e| SftError::Data(e.to_string()))?;
            let state_path = inner.join(SFT_STATE_FILE);
            std::fs::write(&state_path, bytes).map_err(io(&state_path))?;
            std::fs::rename(&inner, dir).map_err(io(dir))
        })();
        let _ = std::fs::remove_dir_all(&staging);
        result.map(|()| dir.to_path_buf())
    }
}

/// A seeded Fisher–Yates permutation of `0..n` for one epoch.
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = Rng::seed(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The `(sequence, token)` pairs the loss is taken over.
fn picks(examples: &[&Example]) -> Vec<(usize, usize)> {
    examples
        .iter()
        .enumerate()
        .flat_map(|(s, e)| {
            e.mask
                .iter()
                .enumerate()
                .filter(|(_, m)| **m)
                .map(move |(i, _)| (s, i))
        })
        .collect()
}

/// Adds a micro-batch's share of the batch's mean NLL (Σ −log π over its policy tokens /
/// the batch's policy tokens) and its gradient.
fn accumulate(
    policy: &CandlePolicy,
    acc: &mut Accumulator,
    micro_batch: &[&Example],
    global_tokens: usize,
) -> Result<(), SftError> {
    let picks = picks(micro_batch);
    if picks.is_empty() || global_tokens == 0 {
        return Ok(());
    }
    let seqs: Vec<Vec<u32>> = micro_batch.iter().map(|e| e.tokens.clone()).collect();
    let model = policy.model();
    let scores = model.score_positions(&seqs, &picks, true)?;
    let logp = scores.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
    let values = scores.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let norm = global_tokens as f64;
    let nll: f64 = values.iter().map(|v| -v[0]).sum();
    let entropy: f64 = values.iter().map(|v| v[1]).sum();
    let loss: Tensor = (logp.sum_all()? * (-1.0 / norm))?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    // Gradients of the compute copies, summed in the masters' dtype (f32), as GRPO does.
    for ((name, master), p) in model.parameters().iter().zip(model.compute_parameters()) {
        let g = grads.get(p.as_tensor()).ok_or_else(|| {
            SftError::Train(GrpoError::Input(format!(
                "parameter `{name}` got no gradient"
            )))
        })?;
        out.push(g.to_dtype(master.dtype())?);
    }
    acc.add_external(nll / norm, picks.len(), entropy, out)?;
    Ok(())
}

/// Mean negative log-likelihood of every policy token of `examples` under `policy` (no
/// gradient): the figure fine-tuning lowers.
pub fn mean_nll(policy: &CandlePolicy, examples: &[Example]) -> Result<f64, SftError> {
    let seqs: Vec<Vec<u32>> = examples.iter().map(|e| e.tokens.clone()).collect();
    let scores = policy.score(&seqs)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for (e, s) in examples.iter().zip(&scores) {
        for (i, &m) in e.mask.iter().enumerate().skip(1) {
            if m {
                sum -= f64::from(s.logprobs[i - 1]);
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err(SftError::Data("no policy token to score".into()));
    }
    Ok(sum / n as f64)
}
