//! Held-out evaluation: the solver role alone (no training) on a task set in SWE-bench's
//! instance format, `k` seeded attempts per instance, graded exactly as training grades
//! (a fresh sandbox, the oracle tests, the protected test surface dropped from the patch:
//! [`crate::engine::roles::grade_solver`]).
//!
//! * [`instance`] — the instance format, our `selfplay` fields, the mapping to a `BugTask`.
//! * [`attempts`] — per-attempt seeded policies; sandboxes at an instance's `base_commit`.
//! * [`passk`] — the unbiased pass@k estimator.
//! * [`export`] — a run's valid bugs as instances (`trainer export`).

pub mod attempts;
pub mod export;
pub mod instance;
pub mod passk;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde::Serialize;
use thiserror::Error;

use crate::engine::episode::{Episode, run_episode};
use crate::engine::error::InfraError;
use crate::engine::prompts::PromptError;
use crate::engine::roles::{EngineSettings, SolverResult, absolve, finish_solver, grade_solver};
use crate::engine::sandbox::SandboxProvider;
use crate::engine::solver::prepare_solver_workspace;
use crate::engine::trajectory::Role;
use crate::train::step::MAX_EPISODE_ATTEMPTS;

pub use attempts::{AttemptPolicy, SeededAttempts, SharedAttempts, attempt_seed};
pub use instance::{
    EvalPool, EvalTask, Instance, InstanceError, TestHarness, load_instances, tasks_in_pool,
};

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("the evaluation needs at least one attempt per instance")]
    NoAttempts,
    #[error("pass@k needs k ≥ 1")]
    BadK,
    #[error("no instance to evaluate")]
    NoTasks,
    #[error("instance {id}: the solver prompt: {source}")]
    Prompt { id: String, source: PromptError },
}

/// How an evaluation runs.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Attempts per instance (at least `k`, for pass@k).
    pub attempts: usize,
    /// The k of pass@k.
    pub k: usize,
    /// The evaluation's seed; each attempt samples from a seed derived from it, the
    /// instance's id and the attempt's index ([`attempt_seed`]).
    pub seed: u64,
    /// Attempts in flight at once (each holds one sandbox while it plays, then one to grade).
    pub concurrency: usize,
    pub engine: EngineSettings,
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Graded solved.
    Solved,
    /// Graded unsolved (a patch that fails, does not apply, or touches only tests).
    Unsolved,
    /// The agent broke its sandbox, or its patched code broke grading: unsolved, as in
    /// training.
    AgentFailure,
    /// Sandboxes kept failing where the agent could not have caused it: not graded, left out
    /// of the rates (as training masks it).
    InfraError,
}

impl Outcome {
    pub fn graded(self) -> bool {
        self != Outcome::InfraError
    }
}

/// One attempt of one instance.
#[derive(Clone, Debug, Serialize)]
pub struct AttemptReport {
    pub attempt: usize,
    pub seed: u64,
    pub outcome: Outcome,
    pub end_reason: String,
    pub turns: usize,
    pub policy_tokens: usize,
    /// Tests of the grading set that did not pass.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing: Vec<String>,
    /// Why grading went wrong, or the agent's or the sandboxes' failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Protected test files the solver changed (dropped before grading).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// The code patch grading applied.
    pub patch: String,
    pub seconds: f64,
}

/// One instance's attempts.
#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    pub id: String,
    /// Graded attempts (infrastructure errors left out).
    pub attempts: usize,
    pub solved: usize,
    /// pass@k of this instance; `None` with fewer than k graded attempts.
    pub pass_at_k: Option<f64>,
    pub outcomes: Vec<AttemptReport>,
}

/// The evaluation's result.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    /// Solved attempts over graded attempts, all instances together.
    pub solve_rate: Option<f64>,
    pub k: usize,
    /// Mean pass@k over the instances with at least k graded attempts.
    pub pass_at_k: Option<f64>,
    /// Instances with at least one solved attempt.
    pub tasks_solved: usize,
    pub attempts: usize,
    pub solved: usize,
    /// Attempts left ungraded by infrastructure errors.
    pub infra_errors: usize,
    pub seed: u64,
    pub seconds: f64,
    pub tasks: Vec<TaskReport>,
}

/// Progress callbacks (the CLI prints a line for each).
pub trait EvalProgress: Send + Sync {
    fn attempt_done(&self, _task: &EvalTask, _attempt: &AttemptReport) {}
    fn task_done(&self, _task: &TaskReport, _done: usize, _total: usize) {}
}

/// No progress display.
pub struct Silent;
impl EvalProgress for Silent {}

/// The solver's first message for `task`: the same tools and protocol as in training, the
/// problem statement in place of the reversed test weakening.
pub fn solver_prompt(task: &EvalTask, engine: &EngineSettings) -> Result<String, EvalError> {
    engine
        .prompts
        .solver_issue_task(&task.problem_statement)
        .map_err(|source| EvalError::Prompt {
            id: task.id.clone(),
            source,
        })
}

/// Plays one attempt in a fresh sandbox and grades it in another (as
/// [`crate::engine::roles::run_solver`], with the instance's prompt); `Err` when no sandbox
/// could be had at all.
async fn play_attempt<P: SandboxProvider + ?Sized>(
    policy: Arc<dyn crate::engine::policy::Policy>,
    provider: &P,
    task: &EvalTask,
    prompt: &str,
    engine: &EngineSettings,
) -> Result<SolverResult, InfraError> {
    let sandbox = provider.acquire(&task.pool).await?;
    let mut episode = Episode::new(
        Role::Solver,
        prompt,
        policy.codec(),
        engine.episode.clone(),
        engine.prompts.clone(),
        engine.markup.clone(),
    );
    if let Err(e) = prepare_solver_workspace(sandbox.client(), &task.bug).await {
        episode.fail_infra(&e);
    }
    let trajectory = if episode.is_done() {
        episode.into_trajectory()
    } else {
        run_episode(policy, episode, sandbox.client()).await
    };
    let mut result = finish_solver(sandbox.client(), &task.bug, trajectory).await;
    absolve(&sandbox, &mut result.agent_failure, &mut result.infra_error).await;
    if let Err(e) = sandbox.release().await {
        tracing::warn!(error = %e, "sandbox release failed");
    }
    grade_solver(provider, &task.pool, &task.bug, &mut result, engine).await;
    Ok(result)
}

/// One attempt, retried on fresh sandboxes while infrastructure errors mask it (as training
/// retries an episode).
async fn attempt<P: SandboxProvider + ?Sized>(
    policies: &dyn AttemptPolicy,
    provider: &P,
    task: &EvalTask,
    prompt: &str,
    index: usize,
    opts: &EvalOptions,
) -> AttemptReport {
    let started = Instant::now();
    let seed = attempt_seed(opts.seed, &task.id, index);
    let at_commit = attempts::AtCommit {
        inner: provider,
        commit: task.base_commit.clone(),
    };
    let mut errors: Vec<String> = Vec::new();
    for _ in 0..MAX_EPISODE_ATTEMPTS {
        // The same seed on a retry: a masked try must not change what the attempt samples.
        let policy = policies.for_attempt(seed);
        let r = match play_attempt(policy, &at_commit, task, prompt, &opts.engine).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(instance = %task.id, error = %e, "no sandbox for the attempt; retrying");
                errors.push(e.to_string());
                continue;
            }
        };
        if let Some(e) = &r.infra_error {
            tracing::warn!(instance = %task.id, error = %e, "sandbox failure; the attempt is retried on a fresh sandbox");
            errors.push(e.to_string());
            continue;
        }
        let traj = &r.trajectory;
        let eval = r.evaluation.as_ref();
        let outcome = if r.agent_failure.is_some() {
            Outcome::AgentFailure
        } else if r.solved() {
            Outcome::Solved
        } else {
            Outcome::Unsolved
        };
        let detail = r
            .agent_failure
            .clone()
            .or_else(|| eval.and_then(|e| e.detail.clone()));
        return AttemptReport {
            attempt: index,
            seed,
            outcome,
            end_reason: traj.end_reason.label().to_string(),
            turns: traj.turns.len(),
            policy_tokens: traj.policy_tokens(),
            failing: eval.map(|e| e.failing.clone()).unwrap_or_default(),
            detail,
            dropped: r.patch.dropped.clone(),
            patch: r.patch.code.clone(),
            seconds: started.elapsed().as_secs_f64(),
        };
    }
    AttemptReport {
        attempt: index,
        seed,
        outcome: Outcome::InfraError,
        end_reason: "infra_error".to_string(),
        turns: 0,
        policy_tokens: 0,
        failing: Vec::new(),
        detail: Some(errors.join("; ")),
        dropped: Vec::new(),
        patch: String::new(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Evaluates `policies` on `tasks`: `opts.attempts` attempts per instance, graded as in
/// training. Sandboxes come from `provider` (each task names its pool).
pub async fn evaluate<P: SandboxProvider + ?Sized>(
    policies: &dyn AttemptPolicy,
    provider: &P,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    progress: &dyn EvalProgress,
) -> Result<EvalReport, EvalError> {
    if opts.attempts == 0 {
        return Err(EvalError::NoAttempts);
    }
    if opts.k == 0 {
        return Err(EvalError::BadK);
    }
    if tasks.is_empty() {
        return Err(EvalError::NoTasks);
    }
    let started = Instant::now();
    let prompts = tasks
        .iter()
        .map(|t| solver_prompt(t, &opts.engine))
        .collect::<Result<Vec<_>, _>>()?;
    let jobs: Vec<(usize, usize)> = (0..tasks.len())
        .flat_map(|t| (0..opts.attempts).map(move |a| (t, a)))
        .collect();
    let remaining = Mutex::new(vec![opts.attempts; tasks.len()]);
    let slots: Mutex<Vec<Vec<Option<AttemptReport>>>> =
        Mutex::new(vec![vec![None; opts.attempts]; tasks.len()]);
    let finished = Mutex::new(0usize);
    futures::stream::iter(jobs)
        .map(|(t, a)| {
            let (remaining, slots, finished, prompts) = (&remaining, &slots, &finished, &prompts);
            async move {
                let task = &tasks[t];
                let report = attempt(policies, provider, task, &prompts[t], a, opts).await;
                progress.attempt_done(task, &report);
                let complete = {
                    let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
                    s[t][a] = Some(report);
                    let mut r = remaining.lock().unwrap_or_else(|p| p.into_inner());
                    r[t] -= 1;
                    (r[t] == 0).then(|| task_report(task, &s[t], opts.k))
                };
                if let Some(tr) = complete {
                    let done = {
                        let mut f = finished.lock().unwrap_or_else(|p| p.into_inner());
                        *f += 1;
                        *f
                    };
                    progress.task_done(&tr, done, tasks.len());
                }
            }
        })
        .buffer_unordered(opts.concurrency.max(1))
        .collect::<Vec<()>>()
        .await;
    let slots = slots.into_inner().unwrap_or_else(|p| p.into_inner());
    let reports: Vec<TaskReport> = tasks
        .iter()
        .zip(&slots)
        .map(|(t, s)| task_report(t, s, opts.k))
        .collect();
    Ok(summarise(reports, opts, started.elapsed()))
}

fn task_report(task: &EvalTask, slots: &[Option<AttemptReport>], k: usize) -> TaskReport {
    let outcomes: Vec<AttemptReport> = slots.iter().flatten().cloned().collect();
    let attempts = outcomes.iter().filter(|o| o.outcome.graded()).count();
    let solved = outcomes
        .iter()
        .filter(|o| o.outcome == Outcome::Solved)
        .count();
    TaskReport {
        id: task.id.clone(),
        attempts,
        solved,
        pass_at_k: passk::pass_at_k(attempts, solved, k),
        outcomes,
    }
}

fn summarise(tasks: Vec<TaskReport>, opts: &EvalOptions, elapsed: Duration) -> EvalReport {
    let attempts: usize = tasks.iter().map(|t| t.attempts).sum();
    let solved: usize = tasks.iter().map(|t| t.solved).sum();
    let infra_errors = tasks
        .iter()
        .flat_map(|t| &t.outcomes)
        .filter(|o| !o.outcome.graded())
        .count();
    let pk: Vec<f64> = tasks.iter().filter_map(|t| t.pass_at_k).collect();
    EvalReport {
        solve_rate: (attempts > 0).then(|| solved as f64 / attempts as f64),
        k: opts.k,
        pass_at_k: (!pk.is_empty()).then(|| pk.iter().sum::<f64>() / pk.len() as f64),
        tasks_solved: tasks.iter().filter(|t| t.solved > 0).count(),
        attempts,
        solved,
        infra_errors,
        seed: opts.seed,
        seconds: elapsed.as_secs_f64(),
        tasks,
    }
}
