//! GRPO and optimiser settings, from a run's `spec.training` (`TrainingSettings`).

use selfplay_crds::run::{LrSchedule, StepPenalty, TrainingSettings, TruncationPolicy};

use super::GrpoError;

/// Settings of the objective (method.md, "The GRPO variant") and of AdamW.
#[derive(Clone, Debug, PartialEq)]
pub struct GrpoSettings {
    pub learning_rate: f64,
    pub lr_schedule: LrSchedule,
    pub warmup_steps: u64,
    pub total_steps: u64,
    /// Ratios below 1 − ε_low are clipped (for A > 0 they stop pulling).
    pub eps_low: f64,
    /// Ratios above 1 + ε_high are clipped (clip-higher: ε_high > ε_low).
    pub eps_high: f64,
    /// Dual clip c: for A < 0 the per-token loss is at most −A·c.
    pub dual_clip: Option<f64>,
    /// Weight of the k3 KL estimate to reference log-probs; 0 disables it.
    pub kl_coef: f64,
    /// Cap C of the truncated importance weight min(exp(log π_old − log π_sampler), C) on
    /// each policy token's loss (π_old from the trainer's forward, π_sampler from sampling).
    pub is_cap: f64,
    pub max_staleness: u64,
    /// Sequences per micro-batch at most.
    pub micro_batch_size: usize,
    /// Tokens per micro-batch at most (packed end to end); a longer sequence goes alone.
    pub micro_batch_tokens: usize,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub seed: u64,
    pub truncation: TruncationPolicy,
    pub step_penalty: Option<StepPenalty>,
}

impl Default for GrpoSettings {
    fn default() -> Self {
        // The CRD defaults are the single source of truth.
        Self::try_from(&TrainingSettings::default())
            .unwrap_or_else(|_| unreachable!("CRD defaults are valid"))
    }
}

impl TryFrom<&TrainingSettings> for GrpoSettings {
    type Error = GrpoError;

    fn try_from(t: &TrainingSettings) -> Result<Self, GrpoError> {
        let bad = |m: String| Err(GrpoError::Settings(m));
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad(format!(
                "learningRate must be positive, got {}",
                t.learning_rate
            ));
        }
        if !(0.0..1.0).contains(&t.eps_low) || t.eps_high < 0.0 || !t.eps_high.is_finite() {
            return bad(format!(
                "epsLow must be in [0, 1) and epsHigh ≥ 0, got {} / {}",
                t.eps_low, t.eps_high
            ));
        }
        if let Some(c) = t.dual_clip
            && !(c > 1.0 && c.is_finite())
        {
            return bad(format!("dualClip must be greater than 1, got {c}"));
        }
        if !(t.importance_sampling_cap >= 1.0 && t.importance_sampling_cap.is_finite()) {
            return bad(format!(
                "importanceSamplingCap must be at least 1, got {}",
                t.importance_sampling_cap
            ));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return bad(format!(
                "adam betas must be in [0, 1), got {} / {}",
                t.adam_beta1, t.adam_beta2
            ));
        }
        if t.max_grad_norm < 0.0 || t.weight_decay < 0.0 || t.kl_coef < 0.0 {
            return bad("maxGradNorm, weightDecay and klCoef must not be negative".into());
        }
        let nonneg = |v: i64, name: &str| {
            u64::try_from(v)
                .map_err(|_| GrpoError::Settings(format!("{name} must not be negative")))
        };
        Ok(Self {
            learning_rate: t.learning_rate,
            lr_schedule: t.lr_schedule,
            warmup_steps: nonneg(t.warmup_steps, "warmupSteps")?,
            total_steps: nonneg(t.total_steps, "totalSteps")?.max(1),
            eps_low: t.eps_low,
            eps_high: t.eps_high,
            dual_clip: t.dual_clip,
            kl_coef: t.kl_coef,
            is_cap: t.importance_sampling_cap,
            max_staleness: nonneg(t.max_staleness.into(), "maxStaleness")?,
            micro_batch_size: usize::try_from(t.micro_batch_size)
                .ok()
                .filter(|&m| m > 0)
                .ok_or_else(|| GrpoError::Settings("microBatchSize must be positive".into()))?,
            micro_batch_tokens: usize::try_from(t.micro_batch_tokens)
                .ok()
                .filter(|&m| m > 0)
                .ok_or_else(|| GrpoError::Settings("microBatchTokens must be positive".into()))?,
            max_grad_norm: t.max_grad_norm,
            weight_decay: t.weight_decay,
            adam_beta1: t.adam_beta1,
            adam_beta2: t.adam_beta2,
            adam_eps: 1e-8,
            seed: t.seed,
            truncation: t.truncation.clone(),
            step_penalty: t.step_penalty.clone(),
        })
    }
}
