//! Rewards, exactly as DESIGN.md step 5 and method.md ("Injector reward") give them.

/// α of the paper: the injector's reward when its bug is solved always or never is −α.
pub const DEFAULT_ALPHA: f64 = 0.8;

/// Solver: +1 when every test that passed on the original code passes, else −1.
pub fn solver_reward(solved: bool) -> f64 {
    if solved { 1.0 } else { -1.0 }
}

/// Injector, with solve rate s = `solved / attempts` over the solver attempts:
/// −1 if validation failed; −α if s ∈ {0, 1}; 1 − (1+α)·s otherwise.
///
/// `None` when the bug is valid but no solver attempt produced a grade (all were cut by
/// infrastructure errors): there is no solve rate, and the episode is masked, not punished.
/// s ∈ {0, 1} is decided on the counts, never on a rounded float.
pub fn injector_reward(valid: bool, solved: usize, attempts: usize, alpha: f64) -> Option<f64> {
    if !valid {
        return Some(-1.0);
    }
    if attempts == 0 {
        return None;
    }
    let solved = solved.min(attempts);
    if solved == 0 || solved == attempts {
        return Some(-alpha);
    }
    let s = solved as f64 / attempts as f64;
    Some(1.0 - (1.0 + alpha) * s)
}
