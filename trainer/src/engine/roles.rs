//! The two roles end to end in one sandbox each: set up, play the episode, and score it
//! (validation for the injector, evaluation for the solver).

use std::sync::Arc;

use sandbox_sidecar::SidecarClient;
use selfplay_crds::run::SelfPlaySettings;
use serde::Serialize;

use super::artifacts::Artifacts;
use super::episode::{AGENT_SESSION, Episode, EpisodeConfig, run_episode};
use super::error::{InfraError, InfraKind, OpError};
use super::ops::Ops;
use super::policy::{Policy, TokenCodec};
use super::prompts::{ARTIFACTS_DIR, ChatMarkup, InjectorPromptValues, PromptError, PromptSet};
use super::rewards;
use super::sandbox::SandboxProvider;
use super::solver::{
    BugTask, Evaluation, SolverPatch, evaluate_patch, prepare_grading_workspace,
    prepare_solver_workspace, solver_patch,
};
use super::trajectory::{EndReason, Role, Trajectory};
use super::validation::{ValidationConfig, ValidationReport, validate};

/// Everything the engine needs besides a policy and sandboxes.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    pub episode: EpisodeConfig,
    pub validation: ValidationConfig,
    pub alpha: f64,
    pub higher_order_bugs: bool,
    pub prompts: Arc<PromptSet>,
    pub markup: ChatMarkup,
}

impl EngineSettings {
    /// Fails when the run's own prompt templates (`spec.selfPlay.prompts`) do not render.
    pub fn from_settings(s: &SelfPlaySettings, markup: ChatMarkup) -> Result<Self, PromptError> {
        Ok(Self {
            episode: EpisodeConfig::from_settings(s),
            validation: ValidationConfig::from_settings(s),
            alpha: s.alpha,
            higher_order_bugs: s.higher_order_bugs,
            prompts: Arc::new(PromptSet::with_templates(s.prompts.as_ref())?),
            markup,
        })
    }
}

/// The injector's workspace before the episode; validation starts from it.
const INJECTOR_START: &str = "selfplay-injector-start";

/// What an injector episode produced.
#[derive(Clone, Debug, Serialize)]
pub struct InjectorResult {
    pub trajectory: Trajectory,
    pub artifacts: Artifacts,
    /// `None` when an infrastructure error stopped the episode or validation.
    pub validation: Option<ValidationReport>,
    /// The first failed check (a metric label); `None` when valid or not validated.
    pub failed_check: Option<&'static str>,
    /// A failure of the machinery the agent could not have caused: the episode is masked.
    pub infra_error: Option<InfraError>,
    /// The sandbox failed during or after the agent's own commands (its sidecar gone, a
    /// snapshot refused, a deadline passed): the agent may have caused it, so it earns the
    /// failing reward. See `docs/reward-integrity.md`.
    pub agent_failure: Option<String>,
}

impl InjectorResult {
    /// The bug for solvers, when valid.
    pub fn bug(&self) -> Option<BugTask> {
        self.validation
            .as_ref()
            .and_then(|v| BugTask::from_validated(&self.artifacts, v))
    }

    pub fn valid(&self) -> bool {
        self.validation.as_ref().is_some_and(|v| v.valid)
    }

    /// The injector's reward given its solvers' results (`solved` of `attempts` graded);
    /// `None` when it must be masked (infrastructure error, or no graded attempt).
    pub fn reward(&self, solved: usize, attempts: usize, alpha: f64) -> Option<f64> {
        if self.infra_error.is_some() {
            return None;
        }
        if self.agent_failure.is_some() {
            return rewards::injector_reward(false, 0, 0, alpha);
        }
        self.validation.as_ref()?;
        rewards::injector_reward(self.valid(), solved, attempts, alpha)
    }
}

/// The injector's episode for a sandbox of the original repository: snapshots the
/// workspace so validation can start from the original code afterwards.
pub async fn start_injector(
    client: &SidecarClient,
    codec: &dyn TokenCodec,
    settings: &EngineSettings,
) -> Result<Episode, InfraError> {
    let task = settings
        .prompts
        .injector_task(&InjectorPromptValues {
            min_passing_tests: settings.validation.min_passing_tests,
            min_failing_tests: settings.validation.min_failing_tests,
            min_changed_files: settings.validation.min_changed_files,
        })
        .map_err(|e| InfraError::new(InfraKind::Setup, e.to_string()))?;
    Ops::new(client).snapshot(INJECTOR_START).await?;
    Ok(Episode::new(
        Role::Injector,
        &task,
        codec,
        settings.episode.clone(),
        settings.prompts.clone(),
        settings.markup.clone(),
    ))
}

/// Whether the agent ran anything in its sandbox: from then on a failure of the sandbox
/// may be its doing.
fn agent_acted(t: &Trajectory) -> bool {
    t.turns
        .iter()
        .any(|turn| turn.tool.as_deref().is_some_and(|n| n != "submit"))
}

/// How an episode that a failure ended is scored, as `(infra_error, agent_failure)`: an
/// infrastructure error is masked, a sandbox broken during the agent's commands earns the
/// failing reward. `None` when the episode ended otherwise.
fn episode_failure(t: &Trajectory) -> Option<(Option<InfraError>, Option<String>)> {
    match t.end_reason {
        EndReason::InfraError => Some((t.infra_error.clone(), None)),
        EndReason::SandboxBroken => Some((
            None,
            Some(
                t.infra_error
                    .as_ref()
                    .map_or_else(|| "the sandbox failed".to_string(), ToString::to_string),
            ),
        )),
        _ => None,
    }
}

/// A sandbox failure scored as the agent's becomes a masked infrastructure error when the
/// provider shows the agent cannot have caused it (its container was killed from outside).
pub async fn absolve(
    sandbox: &super::sandbox::Sandbox,
    agent_failure: &mut Option<String>,
    infra_error: &mut Option<InfraError>,
) {
    if agent_failure.is_none() {
        return;
    }
    if let Some(why) = sandbox.external_failure().await {
        tracing::warn!(sandbox = sandbox.id(), %why, "sandbox failed from outside: episode masked");
        *agent_failure = None;
        *infra_error = Some(InfraError::new(InfraKind::Sidecar, why));
    }
}

/// Sorts a failure after the episode started: the agent's when it had run anything.
fn blame(t: &Trajectory, e: InfraError) -> Result<InfraError, String> {
    if agent_acted(t) {
        Err(e.to_string())
    } else {
        Ok(e)
    }
}

/// After the episode: reads the artifacts, puts the workspace back to the original code and
/// validates them. Any end reason but an infrastructure error is validated, running out of
/// turns or tokens included (the artifacts are what they are either way).
pub async fn finish_injector(
    client: &SidecarClient,
    trajectory: Trajectory,
    settings: &EngineSettings,
) -> InjectorResult {
    let mut result = InjectorResult {
        trajectory,
        artifacts: Artifacts::default(),
        validation: None,
        failed_check: None,
        infra_error: None,
        agent_failure: None,
    };
    if let Some(failure) = episode_failure(&result.trajectory) {
        (result.infra_error, result.agent_failure) = failure;
        return result;
    }
    match finish_injector_inner(client, settings).await {
        Ok((artifacts, report)) => {
            result.failed_check = report.failed_check_name();
            result.artifacts = artifacts;
            result.validation = Some(report);
        }
        Err(e) => match blame(&result.trajectory, e) {
            Ok(e) => result.infra_error = Some(e),
            Err(why) => result.agent_failure = Some(why),
        },
    }
    result
}

async fn finish_injector_inner(
    client: &SidecarClient,
    settings: &EngineSettings,
) -> Result<(Artifacts, ValidationReport), InfraError> {
    let ops = Ops::new(client);
    // Background jobs of the agent must not run on during validation (validation also
    // starts each test run with no process left and a clean /tmp).
    ops.session_close(AGENT_SESSION).await?;
    let artifacts = Artifacts::from_workspace(ops, ARTIFACTS_DIR)
        .await
        .map_err(|e| match e {
            OpError::Infra(i) => i,
            OpError::Refused(m) => InfraError::new(InfraKind::Sidecar, m),
        })?;
    ops.reset(INJECTOR_START).await?;
    let report = validate(client, &artifacts, &settings.validation).await?;
    Ok((artifacts, report))
}

/// One injector episode from start to validation.
pub async fn run_injector(
    policy: Arc<dyn Policy>,
    client: &SidecarClient,
    settings: &EngineSettings,
) -> InjectorResult {
    let episode = match start_injector(client, policy.codec(), settings).await {
        Ok(e) => e,
        Err(e) => {
            let mut ep = Episode::new(
                Role::Injector,
                "",
                policy.codec(),
                settings.episode.clone(),
                settings.prompts.clone(),
                settings.markup.clone(),
            );
            ep.fail_infra(&e);
            return finish_injector(client, ep.into_trajectory(), settings).await;
        }
    };
    let trajectory = run_episode(policy, episode, client).await;
    finish_injector(client, trajectory, settings).await
}

/// What a solver episode produced.
#[derive(Clone, Debug, Serialize)]
pub struct SolverResult {
    pub trajectory: Trajectory,
    pub patch: SolverPatch,
    /// `None` when the episode was not graded (masked, or the agent broke its sandbox).
    pub evaluation: Option<Evaluation>,
    /// A failure of the machinery the agent could not have caused: the episode is masked.
    pub infra_error: Option<InfraError>,
    /// The sandbox failed during or after the agent's own commands, or while its patched
    /// code ran in grading: the failing reward (see `docs/reward-integrity.md`).
    pub agent_failure: Option<String>,
    /// The order of the bug it attempted.
    pub order: u8,
}

impl SolverResult {
    /// ±1, or `None` when masked by an infrastructure error.
    pub fn reward(&self) -> Option<f64> {
        if self.infra_error.is_some() {
            return None;
        }
        if self.agent_failure.is_some() {
            return Some(rewards::solver_reward(false));
        }
        self.evaluation.as_ref().map(Evaluation::reward)
    }

    pub fn solved(&self) -> bool {
        self.agent_failure.is_none() && self.evaluation.as_ref().is_some_and(|e| e.solved)
    }

    /// The higher-order bug this failed attempt makes (order 2 at most).
    pub fn higher_order_bug(&self, task: &BugTask) -> Option<BugTask> {
        match &self.evaluation {
            Some(e) if !e.solved && self.infra_error.is_none() && self.agent_failure.is_none() => {
                task.higher_order(&self.patch.code)
            }
            _ => None,
        }
    }

    fn new(trajectory: Trajectory, task: &BugTask) -> Self {
        Self {
            trajectory,
            patch: SolverPatch::default(),
            evaluation: None,
            infra_error: None,
            agent_failure: None,
            order: task.order,
        }
    }
}

/// Prepares a fresh sandbox of the original repository for `task` and builds the episode.
pub async fn start_solver(
    client: &SidecarClient,
    task: &BugTask,
    codec: &dyn TokenCodec,
    settings: &EngineSettings,
) -> Result<Episode, InfraError> {
    let diff = task.task_diff().map_err(|e| {
        InfraError::new(InfraKind::Setup, format!("reversing test_weaken.diff: {e}"))
    })?;
    let text = settings
        .prompts
        .solver_task(&diff)
        .map_err(|e| InfraError::new(InfraKind::Setup, e.to_string()))?;
    prepare_solver_workspace(client, task).await?;
    Ok(Episode::new(
        Role::Solver,
        &text,
        codec,
        settings.episode.clone(),
        settings.prompts.clone(),
        settings.markup.clone(),
    ))
}

/// After the episode: takes the solver's patch from its sandbox. Grading happens elsewhere
/// ([`grade_solver`], in a fresh sandbox); truncated episodes are graded too, the trainer
/// decides what they count.
pub async fn finish_solver(
    client: &SidecarClient,
    task: &BugTask,
    trajectory: Trajectory,
) -> SolverResult {
    let mut result = SolverResult::new(trajectory, task);
    if let Some(failure) = episode_failure(&result.trajectory) {
        (result.infra_error, result.agent_failure) = failure;
        return result;
    }
    let patch = async {
        Ops::new(client).session_close(AGENT_SESSION).await?;
        solver_patch(client, task).await
    };
    match patch.await {
        Ok(p) => result.patch = p,
        Err(e) => match blame(&result.trajectory, e) {
            Ok(e) => result.infra_error = Some(e),
            Err(why) => result.agent_failure = Some(why),
        },
    }
    result
}

/// Grades a finished solver episode in a fresh sandbox of `pool` (see
/// [`prepare_grading_workspace`]). Acquiring and preparing it cannot be the agent's doing
/// (masked); a failure once its patch is in place can be (the failing reward).
pub async fn grade_solver<P: SandboxProvider + ?Sized>(
    provider: &P,
    pool: &str,
    task: &BugTask,
    result: &mut SolverResult,
    settings: &EngineSettings,
) {
    if result.infra_error.is_some() || result.agent_failure.is_some() {
        return;
    }
    let sandbox = match provider.acquire(pool).await {
        Ok(s) => s,
        Err(e) => {
            result.infra_error = Some(e);
            return;
        }
    };
    match prepare_grading_workspace(sandbox.client(), task).await {
        Err(e) => result.infra_error = Some(e),
        Ok(()) => match evaluate_patch(
            sandbox.client(),
            task,
            &result.patch.full,
            settings.validation.test_timeout,
        )
        .await
        {
            Ok(e) => result.evaluation = Some(e),
            Err(e) => {
                result.agent_failure = Some(format!("grading the solver's patch: {e}"));
            }
        },
    }
    if let Err(e) = sandbox.release().await {
        tracing::warn!(error = %e, "grading sandbox release failed");
    }
}

/// The solver's episode in its own sandbox, up to its patch (not graded).
pub async fn play_solver(
    policy: Arc<dyn Policy>,
    client: &SidecarClient,
    task: &BugTask,
    settings: &EngineSettings,
) -> SolverResult {
    let episode = match start_solver(client, task, policy.codec(), settings).await {
        Ok(e) => e,
        Err(e) => {
            let mut ep = Episode::new(
                Role::Solver,
                "",
                policy.codec(),
                settings.episode.clone(),
                settings.prompts.clone(),
                settings.markup.clone(),
            );
            ep.fail_infra(&e);
            return finish_solver(client, task, ep.into_trajectory()).await;
        }
    };
    let trajectory = run_episode(policy, episode, client).await;
    finish_solver(client, task, trajectory).await
}

/// One solver episode from setup to grade: played in a fresh sandbox of `pool`, which is
/// torn down (every process of the solver with it) before the patch is graded in another.
pub async fn run_solver<P: SandboxProvider + ?Sized>(
    policy: Arc<dyn Policy>,
    provider: &P,
    pool: &str,
    task: &BugTask,
    settings: &EngineSettings,
) -> SolverResult {
    let sandbox = match provider.acquire(pool).await {
        Ok(s) => s,
        Err(e) => {
            let mut r = SolverResult::new(
                Trajectory {
                    role: Role::Solver,
                    prompt_tokens: Vec::new(),
                    turns: Vec::new(),
                    end_reason: EndReason::InfraError,
                    infra_error: Some(e.clone()),
                },
                task,
            );
            r.infra_error = Some(e);
            return r;
        }
    };
    let mut result = play_solver(policy, sandbox.client(), task, settings).await;
    absolve(&sandbox, &mut result.agent_failure, &mut result.infra_error).await;
    if let Err(e) = sandbox.release().await {
        tracing::warn!(error = %e, "sandbox release failed");
    }
    grade_solver(provider, pool, task, &mut result, settings).await;
    result
}
