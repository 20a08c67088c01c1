//! Learning rate: linear warmup, then constant or cosine decay to zero at `total_steps`.

use selfplay_crds::run::LrSchedule;

use super::GrpoSettings;

/// The learning rate of update number `step` (0 for the first update).
pub fn learning_rate(s: &GrpoSettings, step: u64) -> f64 {
    if step < s.warmup_steps {
        return s.learning_rate * (step + 1) as f64 / s.warmup_steps as f64;
    }
    match s.lr_schedule {
        LrSchedule::Constant => s.learning_rate,
        LrSchedule::Cosine => {
            let span = s.total_steps.saturating_sub(s.warmup_steps).max(1) as f64;
            let progress = ((step - s.warmup_steps) as f64 / span).min(1.0);
            s.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}
