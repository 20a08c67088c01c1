//! SelfPlayRun decisions: the run's lifecycle.
//!
//! Pending → Running → Succeeded, with Suspended in between when `spec.suspend` is set and
//! Failed when the trainer fails more than `backoffLimit` times or `activeDeadlineSeconds`
//! (suspended time excluded) runs out. Succeeded and Failed are sticky: a finished run never
//! gets a trainer again. Every new trainer resumes from the latest Ready checkpoint it can reach
//! (on the run's PVC; an emptyDir dies with its pod). A trainer that exits 0 before the target
//! step counts as a failure. A finished run with `ttlSecondsAfterFinished` is deleted that long
//! after its completion time.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use selfplay_crds::conditions::{ConditionStatus, ConditionType, find_condition, set_condition};
use selfplay_crds::{RunPhase, SelfPlayRunSpec, SelfPlayRunStatus};

use crate::build::ResumePoint;
use crate::decide::{seconds_between, time};
use crate::names::LABEL_ATTEMPT;

/// Backoff before restart number `restart` (1-based): 10 s doubling, at most 5 minutes.
pub fn restart_backoff(restart: i32) -> Duration {
    let exp = (restart.max(1) - 1).min(5) as u32;
    Duration::from_secs((10u64 << exp).min(300))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainerPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// What the run controller needs to know about one trainer pod.
#[derive(Clone, Debug, PartialEq)]
pub struct Trainer {
    pub name: String,
    pub attempt: i32,
    pub phase: TrainerPhase,
    pub terminating: bool,
    /// Why it failed, from the container's termination state or the pod's status.
    pub message: Option<String>,
    /// Why a Pending trainer is stuck (unschedulable GPU, unbound PVC, image pull).
    pub stuck: Option<String>,
}

impl Trainer {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let name = pod.metadata.name.clone()?;
        let attempt = pod
            .metadata
            .labels
            .as_ref()?
            .get(LABEL_ATTEMPT)?
            .parse()
            .ok()?;
        let status = pod.status.as_ref();
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => TrainerPhase::Running,
            Some("Succeeded") => TrainerPhase::Succeeded,
            Some("Failed") => TrainerPhase::Failed,
            _ => TrainerPhase::Pending,
        };
        let terminated = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find_map(|c| c.state.as_ref()?.terminated.as_ref())
            });
        let message = terminated
            .map(|t| {
                format!(
                    "exit code {}{}",
                    t.exit_code,
                    t.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )
            })
            .or_else(|| status.and_then(|s| s.message.clone().or(s.reason.clone())));
        Some(Self {
            name,
            attempt,
            phase,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            message,
            stuck: if phase == TrainerPhase::Pending {
                crate::decide::pool::stuck_reason(pod)
            } else {
                None
            },
        })
    }

    fn active(&self) -> bool {
        !self.terminating && matches!(self.phase, TrainerPhase::Pending | TrainerPhase::Running)
    }
}

/// What became of `spec.resumeFrom`.
#[derive(Clone, Debug, PartialEq)]
pub enum ResumeFrom {
    /// Not set.
    None,
    Ready(ResumePoint),
    /// The Checkpoint does not exist or is not Ready yet.
    NotReady(String),
    /// The Checkpoint is on a volume the trainer does not mount.
    OtherVolume {
        checkpoint: String,
        pvc: String,
    },
}

/// Everything observed for one reconcile of a run.
#[derive(Clone, Debug)]
pub struct RunObservation {
    pub generation: Option<i64>,
    pub trainers: Vec<Trainer>,
    /// The run's own latest Ready checkpoint.
    pub latest_checkpoint: Option<ResumePoint>,
    pub resume_from: ResumeFrom,
    /// Pools in `spec.pools` that do not exist.
    pub missing_pools: Vec<String>,
    /// Problems that do not stop the run (from validation).
    pub warnings: Vec<String>,
    pub now: Timestamp,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RunAction {
    CreateTrainer {
        attempt: i32,
        resume: Option<ResumePoint>,
    },
    DeleteTrainer {
        name: String,
        reason: &'static str,
    },
    /// Delete the run itself: it finished `ttlSecondsAfterFinished` ago. Its children go by
    /// owner references, the trainer first by the finalizer.
    DeleteRun {
        finished_seconds_ago: i64,
    },
}

/// A Kubernetes Event to record on the run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RunPlan {
    pub actions: Vec<RunAction>,
    /// The new status; `progress` is the broker's and is left as it was.
    pub status: SelfPlayRunStatus,
    pub requeue_after: Option<Duration>,
    pub events: Vec<RunEvent>,
}

struct Conds<'a> {
    st: &'a mut SelfPlayRunStatus,
    generation: Option<i64>,
    now: Timestamp,
}

impl Conds<'_> {
    fn set(&mut self, t: ConditionType, on: bool, reason: &str, msg: &str) {
        let s = if on {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        };
        set_condition(
            &mut self.st.conditions,
            t,
            s,
            reason,
            msg,
            self.generation,
            time(self.now),
        );
    }

    /// Degraded as the spec's warnings say: `Unsupported` with them, `Healthy` without.
    fn set_degraded_by(&mut self, warnings: &str) {
        let reason = if warnings.is_empty() {
            "Healthy"
        } else {
            "Unsupported"
        };
        self.set(
            ConditionType::Degraded,
            !warnings.is_empty(),
            reason,
            warnings,
        );
    }
}

fn shorter(a: Option<Duration>, b: Duration) -> Option<Duration> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// Decides the run's next step.
pub fn decide_run(
    spec: &SelfPlayRunSpec,
    previous: Option<&SelfPlayRunStatus>,
    obs: &RunObservation,
) -> RunPlan {
    let now = obs.now;
    let mut st = previous.cloned().unwrap_or_default();
    st.observed_generation = obs.generation;
    if let Some(latest) = &obs.latest_checkpoint {
        st.latest_checkpoint = Some(latest.checkpoint.clone());
    }
    let mut plan = RunPlan {
        actions: Vec::new(),
        status: SelfPlayRunStatus::default(),
        requeue_after: None,
        events: Vec::new(),
    };

    // Trainers of earlier attempts must not run beside the current one.
    for t in obs
        .trainers
        .iter()
        .filter(|t| t.attempt != st.restarts && t.active())
    {
        plan.actions.push(RunAction::DeleteTrainer {
            name: t.name.clone(),
            reason: "Superseded",
        });
    }

    // Terminal states are sticky: stop anything still running and never create anything.
    if st.phase.is_some_and(RunPhase::is_terminal) {
        for t in obs
            .trainers
            .iter()
            .filter(|t| t.attempt == st.restarts && t.active())
        {
            plan.actions.push(RunAction::DeleteTrainer {
                name: t.name.clone(),
                reason: "RunFinished",
            });
        }
        if let Some(ttl) = spec.ttl_seconds_after_finished {
            // A run finished without a completionTime (set by hand, or by an older operator)
            // counts from when this operator first sees it finished, rather than never expiring.
            let completed = st.completion_time.get_or_insert_with(|| time(now)).0;
            match ttl_remaining(ttl, completed, now) {
                None => plan.actions.push(RunAction::DeleteRun {
                    finished_seconds_ago: seconds_between(completed, now),
                }),
                Some(wait) => plan.requeue_after = shorter(plan.requeue_after, wait),
            }
        }
        plan.status = st;
        return plan;
    }

    let current = obs.trainers.iter().find(|t| t.attempt == st.restarts);
    let was_suspended = find_condition(&st.conditions, ConditionType::Suspended)
        .is_some_and(|c| c.status == "True");
    let suspended_since = find_condition(&st.conditions, ConditionType::Suspended)
        .filter(|c| c.status == "True")
        .map(|c| c.last_transition_time.0);

    // A trainer that finished wins over everything else, but only when its work is done: the
    // trainer also exits 0 on SIGTERM (eviction, node drain), so exit code 0 alone proves nothing.
    let target = spec.training.total_steps;
    let reached = reached_step(previous, obs);
    let exited_early = current
        .filter(|t| t.phase == TrainerPhase::Succeeded && !t.terminating)
        .filter(|_| reached < target)
        .map(|t| {
            format!(
                "trainer {} exited with code 0 at step {reached} of {target}",
                t.name
            )
        });
    if let Some(t) = current.filter(|t| t.phase == TrainerPhase::Succeeded && !t.terminating)
        && exited_early.is_none()
    {
        finish(
            &mut st,
            &mut plan,
            obs,
            true,
            "TrainerSucceeded",
            &format!("trainer {} completed", t.name),
        );
        ttl_wake_up(spec, &st, &mut plan, now);
        plan.status = st;
        return plan;
    }

    // activeDeadlineSeconds, suspended time excluded, counted from the trainer's first start.
    if let (Some(deadline), Some(start)) = (spec.active_deadline_seconds, st.start_time.as_ref()) {
        let suspended_now = suspended_since.map_or(0, |since| seconds_between(since, now).max(0));
        let active = seconds_between(start.0, now) - st.suspended_seconds - suspended_now;
        if active >= deadline {
            if let Some(t) = current.filter(|t| t.active()) {
                plan.actions.push(RunAction::DeleteTrainer {
                    name: t.name.clone(),
                    reason: "DeadlineExceeded",
                });
            }
            let msg = format!(
                "the run was active for {active}s, past activeDeadlineSeconds ({deadline}s)"
            );
            finish(&mut st, &mut plan, obs, false, "DeadlineExceeded", &msg);
            ttl_wake_up(spec, &st, &mut plan, now);
            plan.status = st;
            return plan;
        }
    }

    let warnings = obs.warnings.join("; ");
    let mut c = Conds {
        st: &mut st,
        generation: obs.generation,
        now,
    };
    c.set(ConditionType::Succeeded, false, "NotFinished", "");
    c.set(ConditionType::Failed, false, "NotFinished", "");

    if spec.suspend {
        if let Some(t) = current.filter(|t| t.active()) {
            plan.actions.push(RunAction::DeleteTrainer {
                name: t.name.clone(),
                reason: "Suspended",
            });
        }
        if !was_suspended {
            plan.events.push(RunEvent {
                warning: false,
                reason: "Suspended",
                note: "trainer removed".into(),
            });
        }
        c.set(
            ConditionType::Suspended,
            true,
            "Suspended",
            "spec.suspend is true; the trainer is removed",
        );
        c.set(ConditionType::Progressing, false, "Suspended", "");
        c.set_degraded_by(&warnings);
        st.phase = Some(RunPhase::Suspended);
        plan.status = st;
        return plan;
    }
    if was_suspended {
        if let (Some(since), Some(_)) = (suspended_since, c.st.start_time.as_ref()) {
            c.st.suspended_seconds += seconds_between(since, now).max(0);
        }
        c.set(ConditionType::Suspended, false, "Resumed", "");
        plan.events.push(RunEvent {
            warning: false,
            reason: "Resumed",
            note: "spec.suspend is false".into(),
        });
    } else {
        c.set(ConditionType::Suspended, false, "NotSuspended", "");
    }

    match current {
        Some(t) if t.terminating => {
            // An old trainer (suspend, restart) is still shutting down; its name is taken until it is gone.
            c.set(
                ConditionType::Progressing,
                true,
                "WaitingForTrainerExit",
                &format!("{} is terminating", t.name),
            );
            if matches!(c.st.phase, None | Some(RunPhase::Suspended)) {
                c.st.phase = Some(RunPhase::Pending);
            }
            plan.requeue_after = shorter(plan.requeue_after, Duration::from_secs(5));
        }
        Some(t) if t.phase == TrainerPhase::Failed || exited_early.is_some() => {
            let why = exited_early.clone().unwrap_or_else(|| {
                t.message
                    .clone()
                    .unwrap_or_else(|| "the trainer pod failed".into())
            });
            if c.st.restarts < spec.backoff_limit {
                c.st.restarts += 1;
                let wait = restart_backoff(c.st.restarts);
                c.st.next_restart_time = Some(time(
                    Timestamp::from_second(now.as_second() + wait.as_secs() as i64).unwrap_or(now),
                ));
                let msg = format!(
                    "trainer {} failed ({why}); restart {} of {} in {}s",
                    t.name,
                    c.st.restarts,
                    spec.backoff_limit,
                    wait.as_secs()
                );
                c.set(ConditionType::Degraded, true, "TrainerFailed", &msg);
                c.set(ConditionType::Progressing, true, "RestartBackoff", &msg);
                c.st.phase = Some(RunPhase::Pending);
                plan.events.push(RunEvent {
                    warning: true,
                    reason: "TrainerFailed",
                    note: msg,
                });
                plan.requeue_after = shorter(plan.requeue_after, wait);
            } else {
                let msg = format!(
                    "trainer {} failed ({why}) and backoffLimit ({}) is reached",
                    t.name, spec.backoff_limit
                );
                finish(&mut st, &mut plan, obs, false, "BackoffLimitExceeded", &msg);
            }
        }
        Some(t) => {
            let running = t.phase == TrainerPhase::Running;
            if running {
                c.st.start_time.get_or_insert_with(|| time(now));
                c.st.phase = Some(RunPhase::Running);
                c.set(
                    ConditionType::Progressing,
                    true,
                    "Training",
                    &format!("trainer {} is running", t.name),
                );
            } else {
                c.st.phase = Some(RunPhase::Pending);
                c.set(
                    ConditionType::Progressing,
                    true,
                    "TrainerStarting",
                    &format!("trainer {} is starting", t.name),
                );
            }
            if let Some(why) = t.stuck.as_deref().filter(|_| !running) {
                let msg = format!("trainer {} is stuck: {why}", t.name);
                let already = c.st.conditions.iter().any(|x| {
                    x.type_ == ConditionType::Degraded.as_str() && x.reason == "TrainerPending"
                });
                if !already {
                    plan.events.push(RunEvent {
                        warning: true,
                        reason: "TrainerPending",
                        note: msg.clone(),
                    });
                }
                c.set(ConditionType::Degraded, true, "TrainerPending", &msg);
            } else {
                c.set_degraded_by(&warnings);
            }
        }
        None => {
            let restart_at = c.st.next_restart_time.as_ref().map(|t| t.0);
            if let Some(at) = restart_at.filter(|at| *at > now) {
                let wait = seconds_between(now, at).max(1) as u64;
                c.st.phase = Some(RunPhase::Pending);
                c.set(
                    ConditionType::Progressing,
                    true,
                    "RestartBackoff",
                    &format!("restarting the trainer in {wait}s"),
                );
                plan.requeue_after = shorter(plan.requeue_after, Duration::from_secs(wait));
            } else if !obs.missing_pools.is_empty() {
                let msg = format!("SandboxPool(s) not found: {}", obs.missing_pools.join(", "));
                c.st.phase = Some(RunPhase::Pending);
                c.set(ConditionType::Progressing, false, "PoolsNotFound", &msg);
                c.set(ConditionType::Degraded, true, "PoolsNotFound", &msg);
                plan.requeue_after = shorter(plan.requeue_after, Duration::from_secs(30));
            } else {
                // Without a PVC, every checkpoint lives in the emptyDir of the pod that wrote
                // it, which a new pod never sees.
                let persistent = spec.checkpoint.storage.pvc.is_some();
                let mut lost: Option<String> = None;
                let resume = match (&obs.latest_checkpoint, &obs.resume_from) {
                    (Some(own), _) if persistent => Ok(Some(own.clone())),
                    (Some(own), _) => {
                        lost = Some(format!(
                            "restarting from the initial model: checkpoint {} (step {}) was in the emptyDir of an earlier trainer pod; set spec.checkpoint.storage.pvc to resume after a restart",
                            own.checkpoint, own.step
                        ));
                        Ok(None)
                    }
                    (None, ResumeFrom::None) => Ok(None),
                    (None, ResumeFrom::Ready(p)) if persistent => Ok(Some(p.clone())),
                    (None, ResumeFrom::Ready(p)) => Err((
                        "CheckpointUnreachable",
                        format!(
                            "resumeFrom checkpoint {} is not on a PersistentVolumeClaim this run mounts; set spec.checkpoint.storage.pvc to the PVC holding it",
                            p.checkpoint
                        ),
                    )),
                    (None, ResumeFrom::NotReady(name)) => Err((
                        "CheckpointNotReady",
                        format!("resumeFrom checkpoint {name} does not exist or is not Ready"),
                    )),
                    (None, ResumeFrom::OtherVolume { checkpoint, pvc }) => Err((
                        "CheckpointOnOtherVolume",
                        format!(
                            "resumeFrom checkpoint {checkpoint} is on PVC {pvc}, which is not this run's checkpoint storage; copy it there"
                        ),
                    )),
                };
                match resume {
                    Ok(resume) => {
                        let attempt = c.st.restarts;
                        let note = match &resume {
                            Some(r) => format!(
                                "attempt {attempt}, resuming from {} (step {})",
                                r.checkpoint, r.step
                            ),
                            None => match &lost {
                                Some(why) => format!("attempt {attempt}, {why}"),
                                None => format!("attempt {attempt}, from the initial model"),
                            },
                        };
                        if lost.is_some() {
                            plan.events.push(RunEvent {
                                warning: true,
                                reason: "CheckpointsLost",
                                note: note.clone(),
                            });
                        }
                        c.st.next_restart_time = None;
                        c.st.phase = Some(RunPhase::Pending);
                        c.set(ConditionType::Progressing, true, "TrainerCreated", &note);
                        if c.st.restarts == 0 {
                            c.set_degraded_by(&warnings);
                        }
                        plan.events.push(RunEvent {
                            warning: false,
                            reason: "TrainerCreated",
                            note,
                        });
                        plan.actions
                            .push(RunAction::CreateTrainer { attempt, resume });
                    }
                    Err((reason, msg)) => {
                        c.st.phase = Some(RunPhase::Pending);
                        c.set(ConditionType::Progressing, false, reason, &msg);
                        c.set(ConditionType::Degraded, true, reason, &msg);
                        plan.requeue_after = shorter(plan.requeue_after, Duration::from_secs(30));
                    }
                }
            }
        }
    }
    // Wake up when the deadline runs out (the clock may have started in this very reconcile).
    if let (Some(deadline), Some(start), false) = (
        spec.active_deadline_seconds,
        st.start_time.as_ref(),
        spec.suspend,
    ) && !st.phase.is_some_and(RunPhase::is_terminal)
    {
        let active = seconds_between(start.0, now) - st.suspended_seconds;
        plan.requeue_after = shorter(
            plan.requeue_after,
            Duration::from_secs((deadline - active).max(1) as u64),
        );
    }
    ttl_wake_up(spec, &st, &mut plan, now);
    plan.status = st;
    plan
}

/// How long until a run that completed at `completed` is due for deletion; `None` when due.
fn ttl_remaining(ttl: i64, completed: Timestamp, now: Timestamp) -> Option<Duration> {
    let left = ttl.saturating_sub(seconds_between(completed, now));
    (left > 0).then(|| Duration::from_secs(left as u64))
}

/// The run finished in this very reconcile: wake up when its TTL runs out. Deleting it now,
/// even with a TTL of 0, would lose the status and events this reconcile is about to write;
/// the next reconcile deletes it.
fn ttl_wake_up(spec: &SelfPlayRunSpec, st: &SelfPlayRunStatus, plan: &mut RunPlan, now: Timestamp) {
    if let (Some(ttl), Some(completed), true) = (
        spec.ttl_seconds_after_finished,
        st.completion_time.as_ref(),
        st.phase.is_some_and(RunPhase::is_terminal),
    ) {
        let wait = ttl_remaining(ttl, completed.0, now).unwrap_or(Duration::from_secs(1));
        plan.requeue_after = shorter(plan.requeue_after, wait);
    }
}

/// The highest step the run is known to have completed: its last progress report or its
/// latest Ready checkpoint, whichever is further.
fn reached_step(previous: Option<&SelfPlayRunStatus>, obs: &RunObservation) -> i64 {
    let reported = previous
        .and_then(|p| p.progress.as_ref())
        .map_or(0, |p| p.step);
    let saved = obs.latest_checkpoint.as_ref().map_or(0, |c| c.step);
    reported.max(saved)
}

/// Moves the run to Succeeded or Failed.
fn finish(
    st: &mut SelfPlayRunStatus,
    plan: &mut RunPlan,
    obs: &RunObservation,
    success: bool,
    reason: &'static str,
    msg: &str,
) {
    let mut c = Conds {
        st,
        generation: obs.generation,
        now: obs.now,
    };
    c.set(
        ConditionType::Succeeded,
        success,
        reason,
        if success { msg } else { "" },
    );
    c.set(
        ConditionType::Failed,
        !success,
        reason,
        if success { "" } else { msg },
    );
    c.set(ConditionType::Progressing, false, reason, "");
    c.set(ConditionType::Suspended, false, reason, "");
    if success {
        c.set(ConditionType::Degraded, false, reason, "");
    } else {
        c.set(ConditionType::Degraded, true, reason, msg);
    }
    st.phase = Some(if success {
        RunPhase::Succeeded
    } else {
        RunPhase::Failed
    });
    st.completion_time = Some(time(obs.now));
    st.next_restart_time = None;
    plan.events.push(RunEvent {
        warning: !success,
        reason,
        note: msg.to_string(),
    });
}

/// Status of a run whose spec is invalid: Pending and Degraded, no trainer. Not terminal, so
/// fixing the mutable fields lets it start.
pub fn invalid_run_status(
    previous: Option<&SelfPlayRunStatus>,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> SelfPlayRunStatus {
    let mut st = previous.cloned().unwrap_or_default();
    if st.phase.is_some_and(RunPhase::is_terminal) {
        return st;
    }
    st.observed_generation = generation;
    st.phase = Some(RunPhase::Pending);
    let mut c = Conds {
        st: &mut st,
        generation,
        now,
    };
    c.set(ConditionType::Progressing, false, "InvalidSpec", message);
    c.set(ConditionType::Degraded, true, "InvalidSpec", message);
    st
}
