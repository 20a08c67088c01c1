//! The per-token GRPO objective (method.md, "The GRPO variant"):
//! r = exp(logπθ − logπold); L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)); with dual clip,
//! for A < 0, L = min(L, −A·c); optionally + β·KL(k3) to reference log-probs. Tokens are
//! summed and divided by the policy-token count of the *global* batch, so micro-batching and
//! accumulation leave the loss and its gradient unchanged.

use super::GrpoSettings;

/// The loss of one token and its derivative in log πθ(token).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenTerms {
    pub loss: f64,
    pub dloss_dlogp: f64,
    pub ratio: f64,
    /// The clip (or dual clip) made the gradient zero.
    pub clipped: bool,
    pub kl: f64,
}

/// PPO clip-higher with optional dual clip and KL for one token.
pub fn token_terms(
    logp: f64,
    old_logp: f64,
    advantage: f64,
    ref_logp: Option<f64>,
    s: &GrpoSettings,
) -> TokenTerms {
    weighted_token_terms(logp, old_logp, 1.0, advantage, ref_logp, s)
}

/// [`token_terms`] with the policy-gradient part (not the KL term) multiplied by a constant
/// importance weight `is_weight`: the truncated correction min(exp(log π_old − log π_sampler),
/// C) for tokens sampled by a different implementation or version of the policy (verl's
/// `tis_imp_ratio`, SkyRL's `tis`).
pub fn weighted_token_terms(
    logp: f64,
    old_logp: f64,
    is_weight: f64,
    advantage: f64,
    ref_logp: Option<f64>,
    s: &GrpoSettings,
) -> TokenTerms {
    let a = advantage;
    let ratio = (logp - old_logp).exp();
    let clipped_ratio = ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high);
    let unclipped = -a * ratio;
    let clipped = -a * clipped_ratio;
    let in_range = ratio >= 1.0 - s.eps_low && ratio <= 1.0 + s.eps_high;
    let (mut loss, mut grad, mut was_clipped) = if unclipped >= clipped || in_range {
        (unclipped, -a * ratio, false)
    } else {
        (clipped, 0.0, true)
    };
    if let Some(c) = s.dual_clip
        && a < 0.0
        && -a * c < loss
    {
        loss = -a * c;
        grad = 0.0;
        was_clipped = true;
    }
    loss *= is_weight;
    grad *= is_weight;
    let mut kl = 0.0;
    if s.kl_coef > 0.0
        && let Some(r) = ref_logp
    {
        // k3 = exp(ref − logp) − (ref − logp) − 1, unbiased and non-negative.
        let d = r - logp;
        kl = d.exp() - d - 1.0;
        loss += s.kl_coef * kl;
        grad += s.kl_coef * (1.0 - d.exp());
    }
    TokenTerms {
        loss,
        dloss_dlogp: grad,
        ratio,
        clipped: was_clipped,
        kl,
    }
}
