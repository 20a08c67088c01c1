//! Group advantages (method.md, "advantage: leave-one-out within the group, Aᵢ = rᵢ − mean of
//! the other rewards; no division by the standard deviation. Groups with all-equal rewards
//! have zero advantage: drop and count them").

/// Aᵢ = rᵢ − (Σⱼ rⱼ − rᵢ)/(G − 1). A group of one has no baseline: its advantage is 0.
pub fn leave_one_out(rewards: &[f64]) -> Vec<f64> {
    let g = rewards.len();
    if g < 2 {
        return vec![0.0; g];
    }
    let sum: f64 = rewards.iter().sum();
    rewards
        .iter()
        .map(|&r| r - (sum - r) / (g - 1) as f64)
        .collect()
}

/// Leave-one-out advantages of a group, or `None` when the group carries no signal (fewer
/// than two members or all rewards equal) and is to be dropped and counted.
pub fn group_advantages(rewards: &[f64]) -> Option<Vec<f64>> {
    let (lo, hi) = rewards
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        });
    // Equal rewards give zero advantages exactly; summing them in floating point would not.
    if rewards.len() < 2 || hi - lo <= 1e-12 * hi.abs().max(lo.abs()).max(1.0) {
        return None;
    }
    Some(leave_one_out(rewards))
}
