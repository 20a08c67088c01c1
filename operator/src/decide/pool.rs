//! SandboxPool decisions: keep `warm` Ready unclaimed sandboxes, never more than `max` in
//! all; delete failed, expired and outdated ones; report counts and conditions.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use selfplay_crds::conditions::{ConditionStatus, ConditionType, set_condition};
use selfplay_crds::{SandboxPoolSpec, SandboxPoolStatus};

use std::collections::BTreeMap;

use crate::decide::{seconds_between, time};
use crate::names::{
    ANNOTATION_CLAIM_RUN_UID, LABEL_CLAIM_ATTEMPT, LABEL_CLAIMED_BY, LABEL_ENVIRONMENT,
    LABEL_TEMPLATE_HASH,
};

/// What the pool controller needs to know about one sandbox pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sandbox {
    pub name: String,
    /// The version the decision was made on; deletions for scale-down and rolling are
    /// conditional on it, so a sandbox the broker claimed meanwhile is not deleted.
    pub resource_version: Option<String>,
    pub created: Timestamp,
    pub ready: bool,
    /// Phase Failed or Succeeded: the sidecar is gone (crashed, evicted, deadline).
    pub finished: bool,
    pub claimed_by: Option<String>,
    pub template_hash: Option<String>,
    /// Has a deletionTimestamp: already on its way out, counted nowhere.
    pub terminating: bool,
    /// UID of the claiming run (claims made before runs were recorded have none).
    pub claim_run_uid: Option<String>,
    /// The claiming run's trainer attempt at claim time.
    pub claim_attempt: Option<i32>,
    /// Set by [`mark_stale_claims`]: the claim's holder is gone, and the sandbox goes back.
    pub stale_claim: Option<StaleClaim>,
    /// Why a pod that is not Ready is stuck, when the kubelet or scheduler says so
    /// (unschedulable, image pull, missing PVC or Secret): `Reason: message`.
    pub stuck: Option<String>,
    /// The environment it was made for (`selfplay.dev/environment`); none in a pool without
    /// environments.
    pub environment: Option<String>,
}

/// Waiting reasons that do not resolve by themselves; `ContainerCreating` and
/// `PodInitializing` are normal start-up and are not listed.
const STUCK_WAITING: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
];

/// Why a pod is stuck before Ready, from its status: not schedulable (no node fits, an
/// unbound PVC), or a container that cannot start.
pub fn stuck_reason(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return Some(format!(
            "{}: {}",
            c.reason.as_deref().unwrap_or("Unschedulable"),
            c.message.as_deref().unwrap_or_default()
        ));
    }
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|cs| cs.state.as_ref()?.waiting.as_ref())
        .find(|w| {
            w.reason
                .as_deref()
                .is_some_and(|r| STUCK_WAITING.contains(&r))
        })
        .map(|w| {
            format!(
                "{}: {}",
                w.reason.as_deref().unwrap_or_default(),
                w.message.as_deref().unwrap_or_default()
            )
        })
}

/// Why a claim no longer has a holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaleClaim {
    /// No run of that name (deleted), or one of that name with another UID (recreated).
    RunGone,
    /// The run Succeeded or Failed.
    RunFinished,
    /// The trainer attempt that claimed it was replaced by a later one.
    OldAttempt,
}

/// A run as the pool sees it, to tell live claims from leaked ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holder {
    pub uid: Option<String>,
    /// The current trainer attempt (`status.restarts`).
    pub attempt: i32,
    pub finished: bool,
}

/// Runs of the pool's namespace, by name.
pub type Holders = BTreeMap<String, Holder>;

/// Marks the claimed sandboxes whose run was deleted or recreated, has finished, or has moved
/// on to a later trainer attempt: nobody will release them, and until their TTL they would
/// count toward `max`. `runs` must come from a synced cache.
pub fn mark_stale_claims(sandboxes: &mut [Sandbox], runs: &Holders) {
    for s in sandboxes.iter_mut() {
        let Some(run) = s.claimed_by.as_deref() else {
            continue;
        };
        s.stale_claim = match runs.get(run) {
            None => Some(StaleClaim::RunGone),
            Some(h) if s.claim_run_uid.is_some() && h.uid.is_some() && s.claim_run_uid != h.uid => {
                Some(StaleClaim::RunGone)
            }
            Some(h) if h.finished => Some(StaleClaim::RunFinished),
            // Only older: a claim by a later attempt than the cache shows means the cache lags.
            Some(h) if s.claim_attempt.is_some_and(|a| a < h.attempt) => {
                Some(StaleClaim::OldAttempt)
            }
            Some(_) => None,
        };
    }
}

impl Sandbox {
    /// Reads a pod; `None` for a pod without name or creation time (never sent by the API server).
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref();
        let status = pod.status.as_ref();
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
        let ready = phase == "Running"
            && status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Some(Self {
            name: meta.name.clone()?,
            resource_version: meta.resource_version.clone(),
            created: meta.creation_timestamp.as_ref()?.0,
            ready,
            finished: matches!(phase, "Failed" | "Succeeded"),
            claimed_by: labels.and_then(|l| l.get(LABEL_CLAIMED_BY)).cloned(),
            template_hash: labels.and_then(|l| l.get(LABEL_TEMPLATE_HASH)).cloned(),
            terminating: meta.deletion_timestamp.is_some(),
            claim_run_uid: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_CLAIM_RUN_UID))
                .cloned(),
            claim_attempt: labels
                .and_then(|l| l.get(LABEL_CLAIM_ATTEMPT))
                .and_then(|a| a.parse().ok()),
            stale_claim: None,
            stuck: if ready { None } else { stuck_reason(pod) },
            environment: labels.and_then(|l| l.get(LABEL_ENVIRONMENT)).cloned(),
        })
    }
}

/// Why a sandbox is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// Its pod failed or exited.
    Failed,
    /// Older than `sandboxTtlSeconds` (claimed or not).
    Expired,
    /// Unclaimed and made from an older template.
    Outdated,
    /// More unclaimed sandboxes than `warm`.
    ScaleDown,
    /// Claimed by a run that is gone or finished, or by a replaced trainer attempt.
    Reclaimed,
}

impl DeleteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "Failed",
            Self::Expired => "Expired",
            Self::Outdated => "Outdated",
            Self::ScaleDown => "ScaleDown",
            Self::Reclaimed => "Reclaimed",
        }
    }
}

/// Sandboxes per state after the plan is carried out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Sandboxes that exist and are not being deleted, the ones about to be created included.
    pub replicas: i32,
    /// Ready and unclaimed.
    pub ready: i32,
    pub claimed: i32,
    /// Unclaimed and not Ready yet, the ones about to be created included.
    pub pending: i32,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolPlan {
    /// Sandbox pods to create.
    pub create: i32,
    /// Sandbox pods to delete, with the resource version they were seen at.
    pub delete: Vec<(String, DeleteReason)>,
    /// Resource versions of the sandboxes in `delete`, by name.
    pub versions: std::collections::BTreeMap<String, String>,
    pub counts: PoolCounts,
    /// Unclaimed sandboxes from an older template remain (kept for availability) or were deleted.
    pub rolling: bool,
    /// Sandboxes kept that are stuck before Ready, with why.
    pub stuck: Vec<(String, String)>,
    /// With environments: how many of `create` each environment gets, in environment order
    /// (empty for a pool without environments, whose `create` are all of the template).
    pub environment_creates: Vec<(String, i32)>,
}

impl PoolPlan {
    /// Creates nothing this time (sandboxes keep failing): the counts follow.
    pub fn hold_creates(&mut self) {
        self.counts.replicas -= self.create;
        self.counts.pending -= self.create;
        self.create = 0;
        self.environment_creates.clear();
    }

    /// Creates at most `allowed` of the planned sandboxes (a namespace-wide limit), taking
    /// them from the environments in order; the counts follow.
    pub fn limit_creates(&mut self, allowed: i32) {
        let allowed = allowed.max(0);
        if self.create <= allowed {
            return;
        }
        let cut = self.create - allowed;
        self.counts.replicas -= cut;
        self.counts.pending -= cut;
        self.create = allowed;
        let mut left = allowed;
        for (_, n) in self.environment_creates.iter_mut() {
            *n = (*n).min(left);
            left -= *n;
        }
        self.environment_creates.retain(|(_, n)| *n > 0);
    }

    pub fn deleted(&self, reason: DeleteReason) -> usize {
        self.delete.iter().filter(|(_, r)| *r == reason).count()
    }
    pub fn is_steady(&self) -> bool {
        self.create == 0 && self.delete.is_empty() && !self.rolling
    }
}

/// Decides the pool's next step.
pub fn decide_pool(
    spec: &SandboxPoolSpec,
    template_hash: &str,
    sandboxes: &[Sandbox],
    now: Timestamp,
) -> PoolPlan {
    let mut plan = PoolPlan::default();
    let mut claimed = 0i32;
    let mut current_ready: Vec<&Sandbox> = Vec::new();
    let mut current_pending: Vec<&Sandbox> = Vec::new();
    let mut outdated_ready: Vec<&Sandbox> = Vec::new();

    for s in sandboxes.iter().filter(|s| !s.terminating) {
        if let Some(rv) = &s.resource_version {
            plan.versions.insert(s.name.clone(), rv.clone());
        }
        if s.finished {
            plan.delete.push((s.name.clone(), DeleteReason::Failed));
        } else if seconds_between(s.created, now) >= spec.sandbox_ttl_seconds {
            plan.delete.push((s.name.clone(), DeleteReason::Expired));
        } else if s.stale_claim.is_some() {
            plan.delete.push((s.name.clone(), DeleteReason::Reclaimed));
        } else if s.claimed_by.is_some() {
            // A claimed sandbox belongs to a trainer until released or expired, whatever its template.
            claimed += 1;
        } else if s.template_hash.as_deref() != Some(template_hash) {
            if s.ready {
                outdated_ready.push(s);
            } else {
                plan.delete.push((s.name.clone(), DeleteReason::Outdated));
            }
        } else if s.ready {
            current_ready.push(s);
        } else {
            current_pending.push(s);
        }
    }

    let warm = spec.warm.max(0);
    let max = spec.max.max(0);

    // Scale down: pending ones first (they serve nobody yet), then the oldest Ready ones.
    let mut unclaimed_current = current_ready.len() as i32 + current_pending.len() as i32;
    if unclaimed_current > warm {
        let mut excess = (unclaimed_current - warm) as usize;
        let mut victims: Vec<&Sandbox> = Vec::new();
        current_pending.sort_by_key(|s| std::cmp::Reverse(s.created));
        while excess > 0 && !current_pending.is_empty() {
            victims.push(current_pending.remove(0));
            excess -= 1;
        }
        current_ready.sort_by_key(|s| s.created);
        while excess > 0 && !current_ready.is_empty() {
            victims.push(current_ready.remove(0));
            excess -= 1;
        }
        for v in victims {
            plan.delete.push((v.name.clone(), DeleteReason::ScaleDown));
        }
        unclaimed_current = warm;
    }

    // Rolling: keep outdated Ready sandboxes only while they stand in for missing current ones.
    let ready_current = current_ready.len() as i32;
    outdated_ready.sort_by_key(|s| std::cmp::Reverse(s.created));
    let mut keep_outdated = (warm - ready_current).clamp(0, outdated_ready.len() as i32);
    let wanted = (warm - unclaimed_current).max(0);
    let room = max - claimed - unclaimed_current - keep_outdated;
    if room < wanted {
        // At `max`, an outdated sandbox makes room for a current one, or the roll never ends.
        keep_outdated = (keep_outdated - (wanted - room)).max(0);
    }
    for s in outdated_ready.iter().skip(keep_outdated as usize) {
        plan.delete.push((s.name.clone(), DeleteReason::Outdated));
    }
    plan.create = wanted.min((max - claimed - unclaimed_current - keep_outdated).max(0));
    plan.rolling = !outdated_ready.is_empty() || plan.deleted(DeleteReason::Outdated) > 0;

    let deleted: std::collections::BTreeSet<&str> =
        plan.delete.iter().map(|(n, _)| n.as_str()).collect();
    plan.stuck = sandboxes
        .iter()
        .filter(|s| !s.terminating && !deleted.contains(s.name.as_str()))
        .filter_map(|s| Some((s.name.clone(), s.stuck.clone()?)))
        .collect();

    plan.counts = PoolCounts {
        replicas: claimed + unclaimed_current + keep_outdated + plan.create,
        ready: ready_current.min(warm) + keep_outdated,
        claimed,
        pending: (unclaimed_current - ready_current.min(warm)) + plan.create,
    };
    plan
}

/// One environment of a pool as the decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvironmentTarget {
    pub name: String,
    /// Hash of the pod this environment's sandboxes are made from.
    pub template_hash: String,
    /// Ready, unclaimed sandboxes to keep for it.
    pub warm: i32,
}

/// How many warm sandboxes each environment gets: its own `warm` when it sets one; the
/// pool's `warm` spread round-robin over the others (the first `warm % n` get one more), so
/// that hundreds of images never mean a warm pod per image.
pub fn warm_targets(pool_warm: i32, environments: &[selfplay_crds::Environment]) -> Vec<i32> {
    let shared = environments.iter().filter(|e| e.warm.is_none()).count() as i32;
    let pool_warm = pool_warm.max(0);
    let mut i = 0;
    environments
        .iter()
        .map(|e| match e.warm {
            Some(w) => w.max(0),
            None => {
                let w = pool_warm / shared + i32::from(i < pool_warm % shared);
                i += 1;
                w
            }
        })
        .collect()
}

/// Decides the next step of a pool with environments: each environment is kept at its own
/// warm count from its own template (as [`decide_pool`] does for a pool), sandboxes of
/// environments no longer listed go unless claimed, and `max` bounds the pool as a whole.
pub fn decide_pool_environments(
    spec: &SandboxPoolSpec,
    targets: &[EnvironmentTarget],
    sandboxes: &[Sandbox],
    now: Timestamp,
) -> PoolPlan {
    let known: std::collections::BTreeSet<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let mut by_env: BTreeMap<&str, Vec<Sandbox>> = BTreeMap::new();
    let mut orphans = Vec::new();
    for s in sandboxes {
        match s.environment.as_deref().filter(|e| known.contains(e)) {
            Some(e) => by_env.entry(e).or_default().push(s.clone()),
            None => orphans.push(s.clone()),
        }
    }
    // A removed environment (or a sandbox from before the pool had environments): nothing
    // is kept warm for it, its claimed sandboxes stay with their holders.
    let mut orphan_spec = spec.clone();
    orphan_spec.warm = 0;
    let mut plan = decide_pool(&orphan_spec, "", &orphans, now);
    plan.create = 0;
    let mut wanted = Vec::new();
    for t in targets {
        let mut env_spec = spec.clone();
        env_spec.warm = t.warm;
        let sub = by_env.remove(t.name.as_str()).unwrap_or_default();
        let p = decide_pool(&env_spec, &t.template_hash, &sub, now);
        plan.delete.extend(p.delete);
        plan.versions.extend(p.versions);
        plan.stuck.extend(p.stuck);
        plan.rolling |= p.rolling;
        plan.counts.replicas += p.counts.replicas - p.create;
        plan.counts.ready += p.counts.ready;
        plan.counts.claimed += p.counts.claimed;
        plan.counts.pending += p.counts.pending - p.create;
        if p.create > 0 {
            wanted.push((t.name.clone(), p.create));
        }
    }
    // `max` is the pool's, across its environments.
    let mut room = (spec.max.max(0) - plan.counts.replicas).max(0);
    for (name, n) in wanted {
        let n = n.min(room);
        if n > 0 {
            room -= n;
            plan.create += n;
            plan.environment_creates.push((name, n));
        }
    }
    plan.counts.replicas += plan.create;
    plan.counts.pending += plan.create;
    plan
}

/// The pool's status after `plan`; `conditions` carried over from `previous`.
pub fn pool_status(
    pool_name: &str,
    spec: &SandboxPoolSpec,
    template_hash: &str,
    plan: &PoolPlan,
    previous: Option<&SandboxPoolStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> SandboxPoolStatus {
    let mut conditions = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let c = plan.counts;
    let usable = c.ready >= spec.warm.min(1);
    let (status, reason) = if usable {
        (ConditionStatus::True, "SandboxesReady")
    } else {
        (ConditionStatus::False, "WarmingUp")
    };
    let msg = format!(
        "{} of {} warm sandboxes Ready, {} claimed",
        c.ready, spec.warm, c.claimed
    );
    set_condition(
        &mut conditions,
        ConditionType::Ready,
        status,
        reason,
        &msg,
        generation,
        time(now),
    );

    let (status, reason, msg) = if plan.rolling {
        (
            ConditionStatus::True,
            "Rolling",
            format!("replacing sandboxes with template {template_hash}"),
        )
    } else if plan.create > 0 || !plan.delete.is_empty() {
        (
            ConditionStatus::True,
            "Scaling",
            format!("creating {}, deleting {}", plan.create, plan.delete.len()),
        )
    } else {
        (
            ConditionStatus::False,
            "Stable",
            "the pool matches its spec".to_string(),
        )
    };
    set_condition(
        &mut conditions,
        ConditionType::Progressing,
        status,
        reason,
        &msg,
        generation,
        time(now),
    );

    let failed = plan.deleted(DeleteReason::Failed);
    let (status, reason, msg) = if failed > 0 {
        (
            ConditionStatus::True,
            "SandboxFailed",
            format!("{failed} sandbox pod(s) failed and are replaced"),
        )
    } else if let Some((pod, why)) = plan.stuck.first() {
        (
            ConditionStatus::True,
            "SandboxPending",
            format!("{} sandbox pod(s) stuck; {pod}: {why}", plan.stuck.len()),
        )
    } else {
        (ConditionStatus::False, "Healthy", String::new())
    };
    set_condition(
        &mut conditions,
        ConditionType::Degraded,
        status,
        reason,
        &msg,
        generation,
        time(now),
    );

    SandboxPoolStatus {
        replicas: c.replicas,
        ready_replicas: c.ready,
        claimed: c.claimed,
        selector: crate::names::selector_string(&crate::names::sandbox_selector_labels(pool_name)),
        template_hash: Some(template_hash.to_string()),
        observed_generation: generation,
        conditions,
    }
}

/// Status of a pool whose spec is invalid: Degraded, not Ready, and no sandboxes made.
pub fn invalid_pool_status(
    previous: Option<&SandboxPoolStatus>,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> SandboxPoolStatus {
    let mut st = previous.cloned().unwrap_or_default();
    let t = time(now);
    set_condition(
        &mut st.conditions,
        ConditionType::Ready,
        ConditionStatus::False,
        "InvalidSpec",
        message,
        generation,
        t.clone(),
    );
    set_condition(
        &mut st.conditions,
        ConditionType::Progressing,
        ConditionStatus::False,
        "InvalidSpec",
        message,
        generation,
        t.clone(),
    );
    set_condition(
        &mut st.conditions,
        ConditionType::Degraded,
        ConditionStatus::True,
        "InvalidSpec",
        message,
        generation,
        t,
    );
    st.observed_generation = generation;
    st
}

/// The pool's status when its environments cannot be read (a missing or malformed
/// ConfigMap): Degraded, naming the cause; the counts and the rest are left as they were,
/// and the sandboxes alone (claimed ones keep serving).
pub fn environments_unavailable_status(
    previous: Option<&SandboxPoolStatus>,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> SandboxPoolStatus {
    let mut st = previous.cloned().unwrap_or_default();
    set_condition(
        &mut st.conditions,
        ConditionType::Degraded,
        ConditionStatus::True,
        ENVIRONMENTS_UNAVAILABLE,
        message,
        generation,
        time(now),
    );
    set_condition(
        &mut st.conditions,
        ConditionType::Progressing,
        ConditionStatus::False,
        ENVIRONMENTS_UNAVAILABLE,
        message,
        generation,
        time(now),
    );
    st.observed_generation = generation;
    st
}

/// Reason of the Degraded condition and Warning event of a pool whose environments cannot be read.
pub const ENVIRONMENTS_UNAVAILABLE: &str = "EnvironmentsUnavailable";

/// Consecutive reconciles of a pool that found failed sandboxes, and until when replacements
/// are held: a sandbox image that crashes at once would otherwise be deleted and recreated
/// as fast as the watch reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashBackoff {
    pub failures: u32,
    pub hold_until: Option<std::time::Instant>,
}

impl CrashBackoff {
    /// Updates with this reconcile's observation; returns until when creates are held.
    /// `healthy`: a current sandbox is Ready, so the template works and the count resets.
    pub fn observe(
        &mut self,
        failed_now: bool,
        healthy: bool,
        now: std::time::Instant,
    ) -> Option<std::time::Instant> {
        if failed_now {
            self.failures = self.failures.saturating_add(1);
            self.hold_until = Some(now + crate::controller::error_backoff(self.failures));
        } else if healthy {
            *self = Self::default();
        }
        self.hold_until.filter(|t| *t > now)
    }
}
