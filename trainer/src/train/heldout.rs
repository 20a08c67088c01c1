//! Held-out evaluation during training (`spec.evaluation`): every `everySteps` steps (and
//! before the first, for the baseline) the policy plays the solver on the run's held-out task
//! set, graded as training grades ([`crate::eval::evaluate`]); the solve rate goes to
//! `status.progress`, the metrics and the curves.

use std::sync::Arc;

use selfplay_crds::run::EvaluationSettings;

use crate::engine::roles::EngineSettings;
use crate::engine::sandbox::SandboxProvider;
use crate::eval::{
    EvalOptions, EvalPool, EvalTask, Instance, InstanceError, SeededAttempts, Silent, TestHarness,
    tasks_in_pool,
};
use crate::policy::CandlePolicy;

use super::driver::HeldOut;

/// Attempts of the evaluation in flight at once.
const CONCURRENCY: usize = 4;

/// What to evaluate and when.
#[derive(Clone, Debug)]
pub struct HeldOutPlan {
    pub tasks: Vec<EvalTask>,
    pub every_steps: u64,
    pub opts: EvalOptions,
}

impl HeldOutPlan {
    /// The plan of `settings` over `instances` (the first `maxTasks` of them).
    pub fn new(
        settings: &EvaluationSettings,
        instances: &[Instance],
        pool: EvalPool<'_>,
        engine: EngineSettings,
        seed: u64,
    ) -> Result<Self, InstanceError> {
        let take = match settings.max_tasks {
            n if n > 0 => n as usize,
            _ => instances.len(),
        };
        let tasks = tasks_in_pool(
            &instances[..take.min(instances.len())],
            &TestHarness::default(),
            pool,
        )?;
        let attempts = settings.attempts.max(1) as usize;
        Ok(Self {
            tasks,
            every_steps: settings.every_steps.max(1) as u64,
            opts: EvalOptions {
                attempts,
                k: attempts,
                seed,
                concurrency: CONCURRENCY,
                engine,
            },
        })
    }

    /// Whether the policy after `step` is evaluated: every `everySteps` and after the last.
    pub fn due(&self, step: u64, last: bool) -> bool {
        step.is_multiple_of(self.every_steps) || last
    }

    /// Evaluates `policy` (after `step` steps). Each attempt samples from its own seeded
    /// stream (the same seeds at every evaluation, so the curve follows the weights, not the
    /// draws), leaving the policy's own checkpointed sampling state alone. `None` when no
    /// attempt could be graded (every one lost to sandbox errors): no rate, rather than 0.
    pub async fn run<P: SandboxProvider + ?Sized>(
        &self,
        policy: Arc<CandlePolicy>,
        provider: &P,
        step: u64,
    ) -> Result<Option<HeldOut>, crate::eval::EvalError> {
        let report = crate::eval::evaluate(
            &SeededAttempts(policy),
            provider,
            &self.tasks,
            &self.opts,
            &Silent,
        )
        .await?;
        Ok(report.solve_rate.map(|solve_rate| HeldOut {
            step,
            solve_rate,
            pass_at_k: report.pass_at_k.unwrap_or(0.0),
            tasks: report.tasks.len(),
        }))
    }
}
