//! The training loop: steps, updates, status, episode records and checkpoints. Generic over
//! the sandbox provider, the progress reporter and the checkpoint sink (local files, or the
//! operator's broker), so one loop serves both modes.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use selfplay_crds::ProgressSnapshot;
use selfplay_crds::run::SelfPlayRunSpec;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::engine::policy::Policy;
use crate::engine::roles::EngineSettings;
use crate::engine::sandbox::SandboxProvider;
use crate::engine::solver::BugTask;
use crate::grpo::trainer::StepStats;
use crate::grpo::{GrpoError, GrpoTrainer};
use crate::policy::CandlePolicy;

use super::metrics::TrainerMetrics;
use super::report::{
    CheckpointRecord, CheckpointSink, ProgressReporter, ReportError, list_step_dirs, write_atomic,
};
use super::step::{Rollouts, StepContext, StepObserver, rollout};

/// The loop's own state, saved beside the GRPO checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Completed training steps.
    pub step: u64,
    /// Higher-order bugs waiting for solvers.
    pub pending: Vec<(String, BugTask)>,
    /// The latest held-out evaluation (`spec.evaluation`), reported with every step until the
    /// next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout: Option<HeldOut>,
}

/// One held-out evaluation of the policy.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeldOut {
    /// The step after which the policy was evaluated.
    pub step: u64,
    pub solve_rate: f64,
    /// pass@k over the task set (`k` = `evaluation.attempts`).
    pub pass_at_k: f64,
    pub tasks: usize,
}

const LOOP_STATE_FILE: &str = "loop_state.json";
/// Non-finite updates in a row before the run stops.
const MAX_NONFINITE_IN_A_ROW: u32 = 3;

#[derive(Debug, Error)]
pub enum LoopError {
    #[error("training update failed: {0}")]
    Grpo(#[from] GrpoError),
    #[error("{0}")]
    Report(#[from] ReportError),
    #[error("{0} updates in a row had a NaN or infinite loss or gradient; stopping (last: {1})")]
    NonFinite(u32, String),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("the training update panicked or was cancelled")]
    Join,
}

/// A step's summary: the line the user sees and the snapshot reported.
#[derive(Clone, Debug)]
pub struct StepSummary {
    pub snapshot: ProgressSnapshot,
    pub stats: Option<StepStats>,
    pub rollouts_injectors: usize,
    pub valid_bugs: usize,
    pub solver_attempts: usize,
    pub seconds: f64,
    pub nonfinite: Option<String>,
    pub checkpoint: Option<PathBuf>,
}

impl StepSummary {
    /// One line per step: step, policy version, validity (and the most frequent failed
    /// check), solve rate, mean reward by role, tokens/s, sandbox errors, seconds.
    pub fn line(&self) -> String {
        let s = &self.snapshot;
        let pct = |v: Option<f64>| {
            v.map(|x| format!("{:.0}%", x * 100.0))
                .unwrap_or_else(|| "-".into())
        };
        let num = |v: Option<f64>| v.map(|x| format!("{x:+.2}")).unwrap_or_else(|| "-".into());
        format!(
            "step {} | policy v{} | valid {}{} | solve {}{} | reward inj {} sol {} | {:.0} tok/s | sandbox errors {} | loss {} | {:.1}s{}",
            s.step,
            s.policy_version,
            pct(s.injector_validity_rate),
            s.top_failed_check
                .as_deref()
                .map(|c| format!(" (top failure: {c})"))
                .unwrap_or_default(),
            pct(s.solve_rate),
            match (s.heldout_solve_rate, s.heldout_step) {
                (Some(r), Some(at)) => format!(" | held-out {} (step {at})", pct(Some(r))),
                _ => String::new(),
            },
            num(s.mean_reward_injector),
            num(s.mean_reward_solver),
            s.tokens_per_second.unwrap_or(0.0),
            s.sandbox_errors,
            s.loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            self.seconds,
            match (&self.nonfinite, &self.stats) {
                (Some(e), _) => format!(" | update skipped: {e}"),
                (None, Some(st)) if st.tokens == 0 => {
                    " | no update: every group's rewards were equal".to_string()
                }
                _ => String::new(),
            },
        )
    }
}

/// Where a run keeps its files.
#[derive(Clone, Debug)]
pub struct RunDirs {
    pub out: PathBuf,
    pub checkpoints: PathBuf,
    pub episodes: PathBuf,
}

impl RunDirs {
    pub fn new(out: &Path) -> Self {
        Self {
            out: out.to_path_buf(),
            checkpoints: out.join("checkpoints"),
            episodes: out.join("episodes"),
        }
    }
}

/// Builds the sampling view of the policy for a step (the model itself, or a wrapper in tests).
pub type PolicyView = Arc<dyn Fn(Arc<CandlePolicy>) -> Arc<dyn Policy> + Send + Sync>;

/// The loop.
pub struct TrainLoop<P: SandboxProvider, R: ProgressReporter, S: CheckpointSink> {
    pub spec: SelfPlayRunSpec,
    pub engine: EngineSettings,
    pub provider: Arc<P>,
    pub reporter: R,
    pub sink: S,
    pub metrics: TrainerMetrics,
    pub dirs: RunDirs,
    pub pools: Vec<(String, u32)>,
    /// Pool → its environments' names (pools with one environment are absent): injector
    /// episodes of such a pool are spread over them, as `POOL/ENVIRONMENT` sandbox keys.
    pub environments: BTreeMap<String, Vec<String>>,
    pub view: PolicyView,
    grpo: Option<GrpoTrainer>,
    state: LoopState,
    nonfinite_in_a_row: u32,
}

impl<P: SandboxProvider, R: ProgressReporter, S: CheckpointSink> TrainLoop<P, R, S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: SelfPlayRunSpec,
        engine: EngineSettings,
        provider: Arc<P>,
        reporter: R,
        sink: S,
        metrics: TrainerMetrics,
        dirs: RunDirs,
        pools: Vec<(String, u32)>,
        grpo: GrpoTrainer,
        state: LoopState,
    ) -> Self {
        let view: PolicyView = Arc::new(|p: Arc<CandlePolicy>| p as Arc<dyn Policy>);
        metrics.step.set(state.step as f64);
        metrics.policy_version.set(grpo.policy().version() as f64);
        Self {
            spec,
            engine,
            provider,
            reporter,
            sink,
            metrics,
            dirs,
            pools,
            environments: BTreeMap::new(),
            view,
            grpo: Some(grpo),
            state,
            nonfinite_in_a_row: 0,
        }
    }

    pub fn state(&self) -> &LoopState {
        &self.state
    }

    pub fn grpo(&self) -> Option<&GrpoTrainer> {
        self.grpo.as_ref()
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// Runs one full step: rollouts, update, status, records and, when due, a checkpoint.
    pub async fn run_step(
        &mut self,
        observer: &dyn StepObserver,
    ) -> Result<StepSummary, LoopError> {
        let started = Instant::now();
        let step = self.state.step + 1;
        let grpo = self.grpo.take().ok_or(LoopError::Join)?;
        let policy = (self.view)(grpo.policy().clone());
        let mut pending: VecDeque<(String, BugTask)> =
            std::mem::take(&mut self.state.pending).into();
        let ctx = StepContext {
            spec: &self.spec,
            engine: &self.engine,
            provider: self.provider.as_ref(),
            metrics: &self.metrics,
            observer,
            pools: &self.pools,
            environments: &self.environments,
        };
        let rollouts = rollout(&ctx, policy, step, &mut pending).await;
        self.state.pending = pending.into();

        // 6. The GRPO update, off the async threads.
        let samples = rollouts.samples.clone();
        let (grpo, update) = tokio::task::spawn_blocking(move || {
            let mut grpo = grpo;
            let r = if samples.is_empty() {
                Ok(None)
            } else {
                grpo.train_step(&samples).map(Some)
            };
            (grpo, r)
        })
        .await
        .map_err(|_| LoopError::Join)?;
        self.grpo = Some(grpo);
        let (stats, nonfinite) = match update {
            Ok(s) => {
                self.nonfinite_in_a_row = 0;
                (s, None)
            }
            Err(e @ GrpoError::NonFinite { .. }) => {
                self.metrics.nonfinite.inc();
                self.nonfinite_in_a_row += 1;
                tracing::error!(error = %e, "update refused");
                if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW {
                    return Err(LoopError::NonFinite(self.nonfinite_in_a_row, e.to_string()));
                }
                (None, Some(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        self.state.step = step;

        let snapshot = self.snapshot(&rollouts, stats.as_ref());
        self.update_metrics(&rollouts, stats.as_ref(), started.elapsed().as_secs_f64());
        self.write_records(step, &rollouts)?;
        self.reporter.report(&snapshot).await?;

        // 7. Checkpoints every `everySteps` and after the last step.
        let every = self.spec.checkpoint.every_steps.max(1) as u64;
        let last = step >= self.spec.training.total_steps.max(1) as u64;
        let checkpoint = if nonfinite.is_none() && (step.is_multiple_of(every) || last) {
            Some(self.checkpoint(&snapshot).await?)
        } else {
            None
        };
        Ok(StepSummary {
            snapshot,
            stats,
            rollouts_injectors: rollouts.injectors,
            valid_bugs: rollouts.valid_bugs,
            solver_attempts: rollouts.solver_attempts,
            seconds: started.elapsed().as_secs_f64(),
            nonfinite,
            checkpoint,
        })
    }

    fn snapshot(&self, r: &Rollouts, stats: Option<&StepStats>) -> ProgressSnapshot {
        let version = self
            .grpo
            .as_ref()
            .map(|g| g.policy().version())
            .unwrap_or(0);
        ProgressSnapshot {
            step: self.state.step as i64,
            policy_version: version as i64,
            solve_rate: r.solve_rate(),
            injector_validity_rate: r.validity_rate(),
            top_failed_check: r.top_failed_check(),
            mean_reward_solver: r.mean_solver_reward(),
            mean_reward_injector: r.mean_injector_reward(),
            tokens_per_second: (r.rollout_seconds > 0.0)
                .then(|| r.generated_tokens as f64 / r.rollout_seconds),
            sandbox_errors: r.sandbox_errors as i64,
            // No token trained (every group dropped or masked): no loss to report.
            loss: stats.filter(|s| s.tokens > 0).map(|s| s.loss),
            heldout_solve_rate: self.state.heldout.as_ref().map(|h| h.solve_rate),
            heldout_step: self.state.heldout.as_ref().map(|h| h.step as i64),
            last_update_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            )),
        }
    }

    fn update_metrics(&self, r: &Rollouts, stats: Option<&StepStats>, seconds: f64) {
        let m = &self.metrics;
        m.step.set(self.state.step as f64);
        if let Some(g) = &self.grpo {
            m.policy_version.set(g.policy().version() as f64);
        }
        if let Some(s) = stats {
            m.loss.set(s.loss);
            m.policy_entropy.set(s.entropy);
            m.logprob_mismatch
                .with_label_values(&["mean"])
                .set(s.logprob_mismatch_mean);
            m.logprob_mismatch
                .with_label_values(&["max"])
                .set(s.logprob_mismatch_max);
            m.dropped_groups
                .inc_by(s.dropped_zero_advantage_groups as u64);
            m.stale_samples.inc_by(s.stale_samples as u64);
        }
        if let Some(v) = r.mean_injector_reward() {
            m.mean_reward.with_label_values(&["injector"]).set(v);
        }
        if let Some(v) = r.mean_solver_reward() {
            m.mean_reward.with_label_values(&["solver"]).set(v);
        }
        if let Some(v) = r.solve_rate() {
            m.solve_rate.set(v);
        }
        if let Some(v) = r.validity_rate() {
            m.injector_validity_rate.set(v);
        }
        if r.rollout_seconds > 0.0 {
            m.tokens_per_second
                .set(r.generated_tokens as f64 / r.rollout_seconds);
        }
        m.step_duration.observe(seconds);
    }

    fn write_records(&self, step: u64, r: &Rollouts) -> Result<(), LoopError> {
        let dir = self.dirs.episodes.join(format!("step-{step:06}"));
        let mut lines = Vec::new();
        for rec in &r.records {
            lines.extend(serde_json::to_vec(rec).map_err(ReportError::from)?);
            lines.push(b'\n');
        }
        write_atomic(&dir.join("episodes.jsonl"), &lines)?;
        Ok(())
    }

    /// Writes a complete checkpoint or none: staged under a hidden directory, then renamed.
    async fn checkpoint(&mut self, snapshot: &ProgressSnapshot) -> Result<PathBuf, LoopError> {
        let step = self.state.step;
        let final_dir = self.dirs.checkpoints.join(format!("step-{step}"));
        let staging = self.dirs.checkpoints.join(format!(".staging-step-{step}"));
        let ckpt_err = |path: &Path, message: String| LoopError::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| ckpt_err(&staging, e.to_string()))?;
        }
        std::fs::create_dir_all(&staging).map_err(|e| ckpt_err(&staging, e.to_string()))?;
        let inner = staging.join("step");
        let grpo = self.grpo.take().ok_or(LoopError::Join)?;
        let inner2 = inner.clone();
        let (grpo, saved) = tokio::task::spawn_blocking(move || {
            let r = grpo.save_checkpoint(&inner2);
            (grpo, r)
        })
        .await
        .map_err(|_| LoopError::Join)?;
        self.grpo = Some(grpo);
        saved?;
        let state = serde_json::to_vec_pretty(&self.state).map_err(ReportError::from)?;
        write_atomic(&inner.join(LOOP_STATE_FILE), &state)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| ckpt_err(&final_dir, e.to_string()))?;
        }
        std::fs::rename(&inner, &final_dir).map_err(|e| ckpt_err(&final_dir, e.to_string()))?;
        let _ = std::fs::remove_dir_all(&staging);
        let record = CheckpointRecord {
            step,
            policy_version: self
                .grpo
                .as_ref()
                .map(|g| g.policy().version())
                .unwrap_or(0),
            dir: final_dir.clone(),
            size_bytes: dir_size(&final_dir),
            metrics: snapshot.clone(),
        };
        self.sink.register(&record).await?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.metrics.last_checkpoint_timestamp.set(now);
        Ok(final_dir)
    }
}

/// The latest complete checkpoint under `dir` (a `step-N` folder with its loop state).
pub fn latest_checkpoint(dir: &Path) -> Option<(u64, PathBuf)> {
    list_step_dirs(dir)
        .into_iter()
        .rev()
        .find(|(_, p)| p.join(LOOP_STATE_FILE).is_file())
}

/// Reads the loop state saved in a checkpoint.
pub fn read_loop_state(ckpt: &Path) -> Result<LoopState, LoopError> {
    let path = ckpt.join(LOOP_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| LoopError::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| LoopError::Checkpoint {
        path,
        message: e.to_string(),
    })
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
