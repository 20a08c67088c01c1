//! One training step (DESIGN.md, "The flow of one training step"): injector episodes →
//! consistency validation → G solver episodes per valid bug → evaluation → rewards →
//! leave-one-out advantages → the GRPO update. The loop is generic over where sandboxes come
//! from, so the single-machine and the cluster mode run exactly this code.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use selfplay_crds::run::SelfPlayRunSpec;
use serde::Serialize;

use crate::engine::error::InfraError;
use crate::engine::policy::Policy;
use crate::engine::roles::{
    EngineSettings, InjectorResult, SolverResult, absolve, run_injector, run_solver,
};
use crate::engine::sandbox::SandboxProvider;
use crate::engine::solver::BugTask;
use crate::engine::trajectory::{EndReason, Role, TokenTranscript, Trajectory};
use crate::grpo::advantages::group_advantages;
use crate::grpo::rewards::{EpisodeEnd, shaped_reward};
use crate::grpo::sample::Sample;

use super::metrics::TrainerMetrics;

/// Attempts of one episode when its sandbox fails (the first try included).
pub const MAX_EPISODE_ATTEMPTS: usize = 3;
/// Higher-order bugs waiting for solvers, at most.
const MAX_PENDING_HIGHER_ORDER: usize = 64;

/// Progress callbacks of a step (the progress bar).
pub trait StepObserver: Send + Sync {
    fn planned(&self, _episodes: u64) {}
    fn episode_done(&self) {}
}

/// No display.
pub struct Quiet;
impl StepObserver for Quiet {}

/// An episode's outcome as the step records it (`DIR/episodes/`).
#[derive(Clone, Debug, Serialize)]
pub struct EpisodeRecord {
    pub role: Role,
    pub pool: String,
    /// Injector: its index in the step; solver: the index of its task.
    pub index: usize,
    pub end_reason: EndReason,
    pub turns: usize,
    pub policy_tokens: usize,
    /// The reward trained with; `None` when masked.
    pub reward: Option<f64>,
    pub infra_errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub injector: Option<InjectorDetail>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver: Option<SolverDetail>,
    /// What the policy wrote each turn, decoded and capped.
    pub transcript: Vec<String>,
    /// The whole episode as token ids with the policy's spans (`trainer sft` replays it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenTranscript>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InjectorDetail {
    pub valid: bool,
    /// The sandbox failed during or after its commands (failing reward).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_failure: Option<String>,
    pub failed_check: Option<String>,
    pub artifacts: serde_json::Value,
    pub solve_rate: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SolverDetail {
    pub order: u8,
    pub solved: bool,
    /// What grading applied: the patch without the protected test surface.
    pub patch: String,
    /// Files of the protected test surface the solver changed (dropped before grading).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// The sandbox failed during or after its commands (failing reward).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_failure: Option<String>,
    pub failing: Vec<String>,
}

/// What a step produced, before the update.
#[derive(Debug, Default)]
pub struct Rollouts {
    pub samples: Vec<Sample>,
    pub records: Vec<EpisodeRecord>,
    pub injectors: usize,
    pub valid_bugs: usize,
    pub failed_checks: BTreeMap<String, usize>,
    pub solver_attempts: usize,
    pub solved: usize,
    pub injector_rewards: Vec<f64>,
    pub solver_rewards: Vec<f64>,
    pub sandbox_errors: usize,
    pub generated_tokens: usize,
    pub rollout_seconds: f64,
}

impl Rollouts {
    pub fn validity_rate(&self) -> Option<f64> {
        (self.injectors > 0).then(|| self.valid_bugs as f64 / self.injectors as f64)
    }
    pub fn solve_rate(&self) -> Option<f64> {
        (self.solver_attempts > 0).then(|| self.solved as f64 / self.solver_attempts as f64)
    }
    pub fn top_failed_check(&self) -> Option<String> {
        self.failed_checks
            .iter()
            .max_by_key(|(name, n)| (**n, std::cmp::Reverse(*name)))
            .map(|(k, _)| k.clone())
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Rollouts {
    pub fn mean_injector_reward(&self) -> Option<f64> {
        mean(&self.injector_rewards)
    }
    pub fn mean_solver_reward(&self) -> Option<f64> {
        mean(&self.solver_rewards)
    }
}

/// Everything a step needs besides the policy and the sandboxes.
pub struct StepContext<'a, P: SandboxProvider + ?Sized> {
    pub spec: &'a SelfPlayRunSpec,
    pub engine: &'a EngineSettings,
    pub provider: &'a P,
    pub metrics: &'a TrainerMetrics,
    pub observer: &'a dyn StepObserver,
    /// Pools with their weights, in spec order.
    pub pools: &'a [(String, u32)],
    /// Pool → its environments' names, for pools with several.
    pub environments: &'a BTreeMap<String, Vec<String>>,
}

/// The injector episodes' pools for `step`: a weighted round robin, the same for a given step
/// on every run (reproducible, and fair across steps).
pub fn injector_pools(pools: &[(String, u32)], step: u64, count: usize) -> Vec<String> {
    let wheel: Vec<&String> = pools
        .iter()
        .flat_map(|(p, w)| std::iter::repeat_n(p, (*w).max(1) as usize))
        .collect();
    if wheel.is_empty() {
        return Vec::new();
    }
    let start = (step as usize).wrapping_mul(count) % wheel.len();
    (0..count)
        .map(|i| wheel[(start + i) % wheel.len()].clone())
        .collect()
}

/// The sandbox keys of the injector episodes: each pick of a pool with environments becomes
/// `POOL/ENVIRONMENT`, the pool's picks going round its environments, continuing from step to
/// step, so that over a run every environment gets its share.
pub fn spread_environments(
    picked: Vec<String>,
    environments: &BTreeMap<String, Vec<String>>,
    step: u64,
) -> Vec<String> {
    let count = picked.len();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    picked
        .into_iter()
        .map(|pool| match environments.get(&pool) {
            Some(envs) if !envs.is_empty() => {
                let k = seen.entry(pool.clone()).or_insert(0);
                let idx = ((step as usize).wrapping_mul(count) + *k) % envs.len();
                *k += 1;
                selfplay_crds::environments::environment_key(&pool, &envs[idx])
            }
            _ => pool,
        })
        .collect()
}

fn episode_end(t: &Trajectory) -> EpisodeEnd {
    match t.end_reason {
        EndReason::InfraError => EpisodeEnd::InfraError,
        r if r.is_truncated() => EpisodeEnd::Truncated,
        _ => EpisodeEnd::Completed,
    }
}

/// An injector's artifacts are validated however its episode ended, so running out of
/// budget earns exactly what submitting the same workspace would (never a mask, never a
/// discount).
fn injector_end(t: &Trajectory) -> EpisodeEnd {
    match t.end_reason {
        EndReason::InfraError => EpisodeEnd::InfraError,
        _ => EpisodeEnd::Completed,
    }
}

fn transcript(policy: &dyn Policy, t: &Trajectory) -> Vec<String> {
    t.turns
        .iter()
        .map(|turn| {
            let mut s = policy.codec().decode(&turn.policy_tokens);
            if s.len() > 2000 {
                let mut cut = 2000;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push_str(" …[cut]");
            }
            s
        })
        .collect()
}

/// Runs `attempt` until it ends without an infrastructure error or the attempts run out;
/// returns the last result and every infrastructure error met on the way.
async fn with_retries<T, F, Fut>(
    mut attempt: F,
    infra: impl Fn(&T) -> Option<InfraError>,
) -> (T, Vec<InfraError>)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut errors = Vec::new();
    let mut tries = 0;
    loop {
        tries += 1;
        let r = attempt().await;
        match infra(&r) {
            None => return (r, errors),
            Some(e) => {
                tracing::warn!(error = %e, tries, "sandbox failure; the episode is masked and retried on a fresh sandbox");
                errors.push(e);
                if tries >= MAX_EPISODE_ATTEMPTS {
                    return (r, errors);
                }
            }
        }
    }
}

fn failed_trajectory(role: Role, e: &InfraError) -> Trajectory {
    Trajectory {
        role,
        prompt_tokens: Vec::new(),
        turns: Vec::new(),
        end_reason: EndReason::InfraError,
        infra_error: Some(e.clone()),
    }
}

/// One injector episode on a fresh sandbox, retried on sandbox failures.
async fn injector_episode<P: SandboxProvider + ?Sized>(
    ctx: &StepContext<'_, P>,
    policy: Arc<dyn Policy>,
    pool: String,
) -> (InjectorResult, Vec<InfraError>) {
    let attempt = || {
        let policy = policy.clone();
        let pool = pool.clone();
        async move {
            let sandbox = match ctx.provider.acquire(&pool).await {
                Ok(s) => s,
                Err(e) => {
                    return InjectorResult {
                        trajectory: failed_trajectory(Role::Injector, &e),
                        artifacts: Default::default(),
                        validation: None,
                        failed_check: None,
                        infra_error: Some(e),
                        agent_failure: None,
                    };
                }
            };
            let mut r = run_injector(policy, sandbox.client(), ctx.engine).await;
            absolve(&sandbox, &mut r.agent_failure, &mut r.infra_error).await;
            if let Err(e) = sandbox.release().await {
                tracing::warn!(error = %e, "sandbox release failed");
            }
            r
        }
    };
    with_retries(attempt, |r: &InjectorResult| r.infra_error.clone()).await
}

/// One solver episode on a fresh sandbox, graded in another, retried on failures the agent
/// could not have caused.
async fn solver_episode<P: SandboxProvider + ?Sized>(
    ctx: &StepContext<'_, P>,
    policy: Arc<dyn Policy>,
    pool: String,
    task: BugTask,
) -> (SolverResult, Vec<InfraError>) {
    let attempt = || {
        let policy = policy.clone();
        let pool = pool.clone();
        let task = task.clone();
        async move { run_solver(policy, ctx.provider, &pool, &task, ctx.engine).await }
    };
    with_retries(attempt, |r: &SolverResult| r.infra_error.clone()).await
}

/// Plays every episode of one step and turns them into training samples.
pub async fn rollout<P: SandboxProvider + ?Sized>(
    ctx: &StepContext<'_, P>,
    policy: Arc<dyn Policy>,
    step: u64,
    pending: &mut VecDeque<(String, BugTask)>,
) -> Rollouts {
    let started = Instant::now();
    let sp = &ctx.spec.self_play;
    let training = &ctx.spec.training;
    let concurrency = ctx.spec.trainer.concurrency.max(1) as usize;
    let group_size = sp.solver_group_size.max(2) as usize;
    let n_inj = sp.injector_episodes_per_step.max(1) as usize;
    let mut out = Rollouts {
        injectors: n_inj,
        ..Default::default()
    };
    let mut next_group: u64 = step << 20;
    ctx.observer.planned(n_inj as u64);

    // 1–2. Injector episodes and their validation.
    let pools = spread_environments(
        injector_pools(ctx.pools, step, n_inj),
        ctx.environments,
        step,
    );
    let injectors: Vec<(String, (InjectorResult, Vec<InfraError>))> = futures::stream::iter(pools)
        .map(|pool| {
            let policy = policy.clone();
            async move {
                let r = injector_episode(ctx, policy, pool.clone()).await;
                ctx.observer.episode_done();
                (pool, r)
            }
        })
        .buffered(concurrency)
        .collect()
        .await;

    // 3. Solver tasks: this step's valid bugs, then waiting higher-order bugs.
    let mut tasks: Vec<(String, BugTask, Option<usize>)> = Vec::new();
    for (i, (pool, (r, _))) in injectors.iter().enumerate() {
        if let Some(bug) = r.bug() {
            tasks.push((pool.clone(), bug, Some(i)));
        }
    }
    out.valid_bugs = tasks.len();
    if sp.higher_order_bugs {
        let room = out.valid_bugs.max(1);
        for _ in 0..room {
            match pending.pop_front() {
                Some((pool, bug)) => tasks.push((pool, bug, None)),
                None => break,
            }
        }
    }
    ctx.observer
        .planned((n_inj + tasks.len() * group_size) as u64);

    let jobs: Vec<(usize, String, BugTask)> = tasks
        .iter()
        .enumerate()
        .flat_map(|(t, (pool, bug, _))| {
            (0..group_size).map(move |_| (t, pool.clone(), bug.clone()))
        })
        .collect();
    let solvers: Vec<(usize, (SolverResult, Vec<InfraError>))> = futures::stream::iter(jobs)
        .map(|(t, pool, bug)| {
            let policy = policy.clone();
            async move {
                let r = solver_episode(ctx, policy, pool, bug).await;
                ctx.observer.episode_done();
                (t, r)
            }
        })
        .buffered(concurrency)
        .collect()
        .await;

    // 4–5. Rewards per solver group, then per injector.
    let mut solve_counts: Vec<(usize, usize)> = vec![(0, 0); tasks.len()];
    for (t, group) in group_by_task(&solvers, tasks.len()).into_iter().enumerate() {
        let (pool, task, _) = &tasks[t];
        let mut rewards = Vec::new();
        let mut members = Vec::new();
        for (result, errors) in group {
            record_infra(ctx.metrics, &mut out, errors);
            let traj = &result.trajectory;
            out.generated_tokens += traj.policy_tokens();
            ctx.metrics
                .episodes
                .with_label_values(&["solver", traj.end_reason.label()])
                .inc();
            if result.agent_failure.is_some() {
                ctx.metrics
                    .agent_sandbox_failures
                    .with_label_values(&["solver"])
                    .inc();
            }
            let tampering = result.evaluation.as_ref().is_some_and(|e| e.tampering);
            if !result.patch.dropped.is_empty() || tampering {
                ctx.metrics
                    .protected_changes
                    .with_label_values(&["solver"])
                    .inc();
            }
            let graded = result.reward();
            if graded.is_some() {
                solve_counts[t].1 += 1;
                out.solver_attempts += 1;
                if result.solved() {
                    solve_counts[t].0 += 1;
                    out.solved += 1;
                }
            }
            let reward = graded.and_then(|g| {
                shaped_reward(
                    g,
                    episode_end(traj),
                    traj.turns.len() as u32,
                    &training.truncation,
                    training.step_penalty.as_ref(),
                )
            });
            if let Some(r) = reward {
                out.solver_rewards.push(r);
                rewards.push(r);
                members.push(traj);
            }
            if ctx.engine.higher_order_bugs
                && let Some(next) = result.higher_order_bug(task)
            {
                pending.push_back((pool.clone(), next));
                while pending.len() > MAX_PENDING_HIGHER_ORDER {
                    pending.pop_front();
                }
            }
            out.records.push(EpisodeRecord {
                role: Role::Solver,
                pool: pool.clone(),
                index: t,
                end_reason: traj.end_reason,
                turns: traj.turns.len(),
                policy_tokens: traj.policy_tokens(),
                reward,
                infra_errors: errors.iter().map(ToString::to_string).collect(),
                injector: None,
                solver: Some(SolverDetail {
                    order: result.order,
                    solved: result.solved(),
                    patch: result.patch.code.clone(),
                    dropped: result.patch.dropped.clone(),
                    agent_failure: result.agent_failure.clone(),
                    failing: result
                        .evaluation
                        .as_ref()
                        .map(|e| e.failing.to_vec())
                        .unwrap_or_default(),
                }),
                transcript: transcript(policy.as_ref(), traj),
                tokens: Some(traj.token_transcript()),
            });
        }
        push_group(&mut out.samples, &members, &rewards, next_group);
        next_group += 1;
    }

    // Injectors are grouped per pool: one step's injector episodes on one repository.
    let mut by_pool: BTreeMap<&str, (Vec<&Trajectory>, Vec<f64>)> = BTreeMap::new();
    for (i, (pool, (result, errors))) in injectors.iter().enumerate() {
        record_infra(ctx.metrics, &mut out, errors);
        let traj = &result.trajectory;
        out.generated_tokens += traj.policy_tokens();
        ctx.metrics
            .episodes
            .with_label_values(&["injector", traj.end_reason.label()])
            .inc();
        if result.agent_failure.is_some() {
            ctx.metrics
                .agent_sandbox_failures
                .with_label_values(&["injector"])
                .inc();
        }
        if result
            .validation
            .as_ref()
            .is_some_and(|v| v.protected_change)
        {
            ctx.metrics
                .protected_changes
                .with_label_values(&["injector"])
                .inc();
        }
        if let Some(check) = result.failed_check {
            *out.failed_checks.entry(check.to_string()).or_default() += 1;
            ctx.metrics
                .validation_failures
                .with_label_values(&[check])
                .inc();
        }
        let (solved, attempts) = tasks
            .iter()
            .position(|(_, _, src)| *src == Some(i))
            .map(|t| solve_counts[t])
            .unwrap_or((0, 0));
        let graded = result.reward(solved, attempts, ctx.engine.alpha);
        let reward = graded.and_then(|g| {
            shaped_reward(
                g,
                injector_end(traj),
                traj.turns.len() as u32,
                &training.truncation,
                training.step_penalty.as_ref(),
            )
        });
        if let Some(r) = reward {
            out.injector_rewards.push(r);
            let e = by_pool.entry(pool.as_str()).or_default();
            e.0.push(traj);
            e.1.push(r);
        }
        out.records.push(EpisodeRecord {
            role: Role::Injector,
            pool: pool.clone(),
            index: i,
            end_reason: traj.end_reason,
            turns: traj.turns.len(),
            policy_tokens: traj.policy_tokens(),
            reward,
            infra_errors: errors.iter().map(ToString::to_string).collect(),
            injector: Some(InjectorDetail {
                valid: result.valid(),
                agent_failure: result.agent_failure.clone(),
                failed_check: result.failed_check.map(str::to_string),
                artifacts: serde_json::to_value(&result.artifacts).unwrap_or_default(),
                solve_rate: (attempts > 0).then(|| solved as f64 / attempts as f64),
            }),
            solver: None,
            transcript: transcript(policy.as_ref(), traj),
            tokens: Some(traj.token_transcript()),
        });
    }
    for (_, (members, rewards)) in by_pool {
        push_group(&mut out.samples, &members, &rewards, next_group);
        next_group += 1;
    }
    out.rollout_seconds = started.elapsed().as_secs_f64();
    out
}

fn group_by_task(
    solvers: &[(usize, (SolverResult, Vec<InfraError>))],
    n: usize,
) -> Vec<Vec<&(SolverResult, Vec<InfraError>)>> {
    let mut groups: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
    for (t, r) in solvers {
        if let Some(g) = groups.get_mut(*t) {
            g.push(r);
        }
    }
    groups
}

fn record_infra(metrics: &TrainerMetrics, out: &mut Rollouts, errors: &[InfraError]) {
    for e in errors {
        out.sandbox_errors += 1;
        metrics
            .sandbox_errors
            .with_label_values(&[e.kind.label()])
            .inc();
    }
}

/// Leave-one-out advantages of one group (method.md); a group with all-equal rewards gets
/// exactly zero advantages (leave-one-out in floating point would leave ±1e-17), which the
/// GRPO update drops and counts, so it does not dilute the token normalisation.
pub fn push_group(samples: &mut Vec<Sample>, members: &[&Trajectory], rewards: &[f64], group: u64) {
    let advantages = group_advantages(rewards).unwrap_or_else(|| vec![0.0; rewards.len()]);
    for (traj, adv) in members.iter().zip(advantages) {
        if traj.policy_tokens() == 0 {
            continue;
        }
        let seq = traj.sequence();
        samples.push(Sample {
            tokens: seq.tokens,
            policy_mask: seq.policy_mask,
            old_logprobs: seq.old_logprobs,
            ref_logprobs: None,
            advantage: adv,
            policy_version: traj.min_policy_version().unwrap_or(0),
            group,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injector_episodes_go_round_a_pools_environments() {
        let envs = BTreeMap::from([(
            "swe".to_string(),
            vec!["a".to_string(), "b".to_string(), "c".to_string()],
        )]);
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for step in 1..=6 {
            let picked =
                injector_pools(&[("swe".to_string(), 1), ("local".to_string(), 1)], step, 4);
            for k in spread_environments(picked, &envs, step) {
                *count.entry(k).or_default() += 1;
            }
        }
        assert_eq!(count["local"], 12);
        for e in ["swe/a", "swe/b", "swe/c"] {
            assert_eq!(count[e], 4, "{count:?}");
        }
    }

    #[test]
    fn injector_pools_follow_the_weights() {
        let pools = vec![("a".to_string(), 2), ("b".to_string(), 1)];
        let picked = injector_pools(&pools, 0, 6);
        assert_eq!(picked.iter().filter(|p| *p == "a").count(), 4);
        assert_eq!(picked.iter().filter(|p| *p == "b").count(), 2);
        assert_eq!(injector_pools(&pools, 3, 6), injector_pools(&pools, 3, 6));
    }

    fn trajectory(tokens: usize) -> Trajectory {
        Trajectory {
            role: Role::Solver,
            prompt_tokens: vec![1, 2],
            turns: vec![crate::engine::trajectory::Turn {
                policy_tokens: vec![3; tokens],
                policy_logprobs: vec![-0.5; tokens],
                finish: None,
                policy_version: 0,
                tool: None,
                format_error: None,
                tool_failed: false,
                observation_tokens: Vec::new(),
            }],
            end_reason: EndReason::Submitted,
            infra_error: None,
        }
    }

    #[test]
    fn an_injector_out_of_turns_is_rewarded_like_one_that_submitted() {
        use selfplay_crds::run::{TruncationMode, TruncationPolicy};
        for mode in [TruncationMode::Mask, TruncationMode::ForceSubmit] {
            let policy = TruncationPolicy {
                mode,
                discount: 0.5,
            };
            for reward in [-1.0, -0.8, 0.1] {
                let mut t = trajectory(4);
                t.role = Role::Injector;
                let submitted = shaped_reward(reward, injector_end(&t), 3, &policy, None);
                for end in [EndReason::OutOfTurns, EndReason::OutOfTokens] {
                    t.end_reason = end;
                    assert_eq!(
                        shaped_reward(reward, injector_end(&t), 3, &policy, None),
                        submitted,
                        "{mode:?} {reward} {end:?}"
                    );
                }
            }
            let mut t = trajectory(4);
            t.end_reason = EndReason::InfraError;
            assert_eq!(
                shaped_reward(-1.0, injector_end(&t), 3, &policy, None),
                None
            );
        }
    }

    #[test]
    fn a_group_with_equal_rewards_carries_exactly_zero_advantage() {
        let t = trajectory(4);
        let members = [&t, &t, &t];
        let mut samples = Vec::new();
        // 0.1 three times: leave-one-out in floating point gives -1.4e-17, not 0.
        push_group(&mut samples, &members, &[0.1, 0.1, 0.1], 7);
        assert_eq!(samples.len(), 3);
        assert!(
            samples.iter().all(|s| s.advantage == 0.0),
            "{:?}",
            samples.iter().map(|s| s.advantage).collect::<Vec<_>>()
        );
        let mut samples = Vec::new();
        push_group(&mut samples, &members, &[1.0, -1.0, -1.0], 8);
        assert!((samples[0].advantage - 2.0).abs() < 1e-12);
    }
}
