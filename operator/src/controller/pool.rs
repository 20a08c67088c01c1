//! The SandboxPool controller.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use selfplay_crds::SandboxPool;

use crate::build::{
    environment_sandbox_pod, environment_template_hash, generate_token, pool_token_secret,
    sandbox_network_policy, sandbox_pod,
};
use crate::controller::apply::{apply, apply_status, create, delete, ensure_secret};
use crate::controller::{Context, Error, ReconcileTimer};
use crate::decide::pool::{
    DeleteReason, ENVIRONMENTS_UNAVAILABLE, EnvironmentTarget, Holder, Holders, Sandbox,
    decide_pool, decide_pool_environments, environments_unavailable_status, invalid_pool_status,
    mark_stale_claims, pool_status, warm_targets,
};
use crate::decide::{mark_create_failed, seconds_between};
use crate::environments::{
    EnvironmentsUnavailable, SOURCE_MAX_AGE, config_map_source, has_environments,
};
use crate::names::{FINALIZER, MANAGER, sandbox_selector_labels, selector_string};
use crate::validate::validate_pool;

pub const KIND: &str = "SandboxPool";

/// Pools carry no finalizer: all the operator did on deletion was drop metric series, and a
/// finalizer would keep every pool (and so its namespace) from being deleted once the operator
/// is uninstalled. The series go on the watch's delete event instead ([`on_pool_event`]).
pub async fn reconcile(pool: Arc<SandboxPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ReconcileTimer::start(&ctx.metrics, KIND);
    let ns = pool
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(pool.name_any()))?;
    let api: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
    drop_legacy_finalizer(&api, &pool).await?;
    if pool.meta().deletion_timestamp.is_some() {
        ctx.metrics.forget_pool(&ns, &pool.name_any());
        return Ok(Action::await_change());
    }
    let result = apply_pool(&pool, &ctx, Timestamp::now()).await;
    ctx.backoff.settle(KIND, pool.as_ref(), result)
}

/// Removes the finalizer that earlier versions put on pools, conditional on the version read
/// so that finalizers others add meanwhile are not lost.
async fn drop_legacy_finalizer(api: &Api<SandboxPool>, pool: &SandboxPool) -> Result<(), Error> {
    let finalizers = pool.finalizers();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": pool.resource_version(), "finalizers": rest}
    });
    api.patch(
        &pool.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Drops a deleted pool's metric series; called on every event of the pool watch.
pub fn on_pool_event(metrics: &crate::metrics::Metrics, event: &watcher::Event<SandboxPool>) {
    if let watcher::Event::Delete(pool) = event {
        metrics.forget_pool(&pool.namespace().unwrap_or_default(), &pool.name_any());
    }
}

/// Names of the runs in `namespace` that use pool `pool`, from the run reflector.
pub fn runs_using_pool(ctx: &Context, namespace: &str, pool: &str) -> Vec<String> {
    ctx.runs
        .state()
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(namespace) && r.spec.uses_pool(pool))
        .map(|r| r.name_any())
        .collect()
}

/// The runs of `namespace` from the (synced) run cache, to find leaked claims.
pub fn holders(ctx: &Context, namespace: &str) -> Holders {
    ctx.runs
        .state()
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(namespace))
        .map(|r| {
            let st = r.status.as_ref();
            let holder = Holder {
                uid: r.uid(),
                attempt: st.map_or(0, |s| s.restarts),
                finished: st
                    .and_then(|s| s.phase)
                    .is_some_and(selfplay_crds::RunPhase::is_terminal),
            };
            (r.name_any(), holder)
        })
        .collect()
}

fn status_body(status: &selfplay_crds::SandboxPoolStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": selfplay_crds::API_VERSION,
        "kind": KIND,
        "status": status,
    })
}

/// How soon a pool whose environments could not be read tries again: the ConfigMap is not
/// watched (that would take `list`/`watch` on every ConfigMap of the namespace), so its
/// creation or repair is noticed by this retry.
const ENVIRONMENTS_RETRY: Duration = Duration::from_secs(30);

/// The pool's environments: from the spec, or read from its ConfigMap (at most every
/// [`SOURCE_MAX_AGE`], and parsed only when the ConfigMap changed). `Ok(Err(_))`: the
/// ConfigMap is missing or malformed.
pub async fn pool_environments(
    pool: &SandboxPool,
    ctx: &Context,
) -> Result<Result<Arc<Vec<selfplay_crds::Environment>>, EnvironmentsUnavailable>, Error> {
    if let Some(envs) = ctx.environments.fresh(pool, SOURCE_MAX_AGE) {
        return Ok(Ok(envs));
    }
    let Some((cm_name, _)) = config_map_source(&pool.spec) else {
        return Ok(crate::environments::resolve(&pool.spec, None).map(Arc::new));
    };
    let ns = pool.namespace().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let cm = cms.get_opt(cm_name).await?;
    let version = cm.as_ref().and_then(|c| c.resource_version());
    if let Some(envs) = ctx.environments.cached_if_version(pool, version.as_deref()) {
        return Ok(Ok(envs));
    }
    match crate::environments::resolve(&pool.spec, cm.as_ref()) {
        Ok(envs) => Ok(Ok(ctx.environments.put(pool, version, envs))),
        Err(e) => {
            ctx.environments.forget(pool);
            Ok(Err(e))
        }
    }
}

/// How soon a pool reconcile that found the caches unsynced comes back.
const CACHE_WAIT: Duration = Duration::from_secs(1);

/// Whether a reflector store has seen its initial list, without waiting for it.
pub fn cache_synced<K>(store: &kube::runtime::reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

pub async fn apply_pool(
    pool: &SandboxPool,
    ctx: &Context,
    now: Timestamp,
) -> Result<Action, Error> {
    let name = pool.name_any();
    let ns = pool
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let generation = pool.meta().generation;
    let pools: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);

    // Validate.
    let valid = match validate_pool(pool, &ctx.config) {
        Ok(v) => v,
        Err(invalid) => {
            let msg = invalid.to_string();
            let st = invalid_pool_status(pool.status.as_ref(), &msg, generation, now);
            apply_status(&pools, &name, MANAGER, &status_body(&st)).await?;
            if pool.status.as_ref().and_then(|s| s.observed_generation) != generation {
                ctx.event(pool, true, "InvalidSpec", "Validate", msg).await;
            }
            return Ok(Action::await_change());
        }
    };

    // The NetworkPolicy's allow-list comes from the run cache: applied before that cache has
    // synced (every operator start), it would be empty and cut trainers off their sandboxes.
    if !cache_synced(&ctx.runs) {
        tracing::debug!(pool = %name, namespace = %ns, "run cache not synced yet; retrying");
        return Ok(Action::requeue(CACHE_WAIT));
    }

    // Resolve the environments; without them no sandbox of the wrong image is made.
    let environments = if has_environments(valid.spec) {
        match pool_environments(pool, ctx).await? {
            Ok(envs) => Some(envs),
            Err(why) => {
                let msg = why.to_string();
                let already = pool.status.as_ref().is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Degraded"
                            && c.reason == ENVIRONMENTS_UNAVAILABLE
                            && c.message == msg
                    })
                });
                let st =
                    environments_unavailable_status(pool.status.as_ref(), &msg, generation, now);
                apply_status(&pools, &name, MANAGER, &status_body(&st)).await?;
                if !already {
                    ctx.event(
                        pool,
                        true,
                        ENVIRONMENTS_UNAVAILABLE,
                        "ReadEnvironments",
                        msg,
                    )
                    .await;
                }
                return Ok(Action::requeue(ENVIRONMENTS_RETRY));
            }
        }
    } else {
        None
    };
    let environments = environments.filter(|e| !e.is_empty());

    // Build and apply the pool's fixed children.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if ensure_secret(
        &secrets,
        &pool_token_secret(&name, &ns, &valid.owner, &generate_token()),
    )
    .await?
    {
        ctx.event(
            pool,
            false,
            "TokenCreated",
            "CreateSecret",
            "sandbox token Secret created".into(),
        )
        .await;
    }
    let users = runs_using_pool(ctx, &ns, &name);
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    apply(&policies, &sandbox_network_policy(&valid, &users)).await?;

    // Observe the sandboxes (a list, not the cache: decisions must not count stale pods) and decide.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = selector_string(&sandbox_selector_labels(&name));
    let list = pods.list(&ListParams::default().labels(&selector)).await?;
    let mut sandboxes: Vec<Sandbox> = list.items.iter().filter_map(Sandbox::from_pod).collect();
    mark_stale_claims(&mut sandboxes, &holders(ctx, &ns));
    let mut plan = match &environments {
        None => decide_pool(valid.spec, &valid.template_hash, &sandboxes, now),
        Some(envs) => {
            let targets: Vec<EnvironmentTarget> = envs
                .iter()
                .zip(warm_targets(valid.spec.warm, envs))
                .map(|(e, warm)| EnvironmentTarget {
                    name: e.name.clone(),
                    template_hash: environment_template_hash(&valid, e, &ctx.config),
                    warm,
                })
                .collect();
            decide_pool_environments(valid.spec, &targets, &sandboxes, now)
        }
    };
    if ctx.config.max_sandboxes_per_namespace > 0 {
        // The namespace's sandboxes from the cache: the limit is a guard, not a lock, and
        // the broker checks it again before it starts one on demand.
        let in_namespace = ctx
            .sandboxes
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count() as i64;
        let allowed = i64::from(ctx.config.max_sandboxes_per_namespace) - in_namespace
            + plan.delete.len() as i64;
        plan.limit_creates(allowed.clamp(0, i64::from(i32::MAX)) as i32);
    }
    let held = ctx.sandbox_crashes.lock().ok().and_then(|mut m| {
        m.entry(format!("{ns}/{name}")).or_default().observe(
            plan.deleted(DeleteReason::Failed) > 0,
            plan.counts.ready > 0,
            std::time::Instant::now(),
        )
    });
    if held.is_some() {
        plan.hold_creates();
    }

    // Apply the decision.
    let mut deleted = 0;
    for (pod, reason) in &plan.delete {
        // Failed and expired sandboxes go whatever happened to them; the others only if unchanged.
        let rv = match reason {
            DeleteReason::Failed | DeleteReason::Expired => None,
            // A reclaimed sandbox released or re-labelled meanwhile is left alone.
            DeleteReason::Outdated | DeleteReason::ScaleDown | DeleteReason::Reclaimed => {
                plan.versions.get(pod).cloned()
            }
        };
        if delete(&pods, pod, rv).await? {
            deleted += 1;
            tracing::info!(pool = %name, namespace = %ns, pod = %pod, reason = reason.as_str(), "sandbox deleted");
        }
    }
    let mut create_error = None;
    let mut not_created = 0;
    let to_create: Vec<k8s_openapi::api::core::v1::Pod> = match &environments {
        None => (0..plan.create)
            .map(|_| sandbox_pod(&valid, &ctx.config))
            .collect(),
        Some(envs) => plan
            .environment_creates
            .iter()
            .filter_map(|(env, n)| Some((envs.iter().find(|e| &e.name == env)?, *n)))
            .flat_map(|(env, n)| (0..n).map(|_| environment_sandbox_pod(&valid, env, &ctx.config)))
            .collect(),
    };
    for pod in &to_create {
        if create_error.is_some() {
            not_created += 1;
        } else if let Err(e) = create(&pods, pod).await {
            create_error = Some(e);
            not_created += 1;
        }
    }

    // Status.
    let mut st = pool_status(
        &name,
        valid.spec,
        &valid.template_hash,
        &plan,
        pool.status.as_ref(),
        generation,
        now,
    );
    if let Some(e) = create_error {
        // Written before the error goes to the error policy (and its backoff).
        st.replicas -= not_created;
        let msg = e.to_string();
        mark_create_failed(&mut st.conditions, "sandbox pods", &msg, generation, now);
        apply_status(&pools, &name, MANAGER, &status_body(&st)).await?;
        ctx.event(
            pool,
            true,
            "CreateFailed",
            "Scale",
            format!("cannot create sandbox pods: {msg}"),
        )
        .await;
        return Err(e.into());
    }
    apply_status(&pools, &name, MANAGER, &status_body(&st)).await?;
    let c = plan.counts;
    ctx.metrics
        .set_pool_counts(&ns, &name, c.ready, c.claimed, c.pending);

    // Events for state changes.
    if plan.create > 0 {
        ctx.event(
            pool,
            false,
            "SandboxesCreated",
            "Scale",
            format!("created {} sandbox pod(s)", plan.create),
        )
        .await;
    }
    // Once per episode, not every reconcile: only when the pool was not already saying so.
    let was_pending = pool.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == "SandboxPending")
    });
    if let Some((pod, why)) = plan.stuck.first()
        && !was_pending
    {
        ctx.event(
            pool,
            true,
            "SandboxPending",
            "Scale",
            format!("{} sandbox pod(s) stuck; {pod}: {why}", plan.stuck.len()),
        )
        .await;
    }
    let failed = plan.deleted(DeleteReason::Failed);
    if failed > 0 {
        ctx.event(
            pool,
            true,
            "SandboxFailed",
            "Replace",
            format!("{failed} sandbox pod(s) failed; replacing them"),
        )
        .await;
    }
    if deleted > failed {
        let summary: Vec<String> = [
            DeleteReason::Expired,
            DeleteReason::Outdated,
            DeleteReason::ScaleDown,
            DeleteReason::Reclaimed,
        ]
        .iter()
        .filter_map(|r| {
            let n = plan.deleted(*r);
            (n > 0).then(|| format!("{n} {}", r.as_str().to_lowercase()))
        })
        .collect();
        ctx.event(
            pool,
            false,
            "SandboxesDeleted",
            "Scale",
            format!("deleted sandbox pod(s): {}", summary.join(", ")),
        )
        .await;
    }

    // Come back when the next sandbox expires, or soon while the pool is changing.
    let next_expiry = sandboxes
        .iter()
        .filter(|s| !s.terminating)
        .map(|s| valid.spec.sandbox_ttl_seconds - seconds_between(s.created, now))
        .filter(|left| *left > 0)
        .min();
    let mut wait = Duration::from_secs(300);
    if let Some(left) = next_expiry {
        wait = wait.min(Duration::from_secs(left as u64 + 1));
    }
    if !plan.is_steady() {
        wait = wait.min(Duration::from_secs(15));
    }
    if let Some(until) = held {
        wait = wait.min(until.saturating_duration_since(std::time::Instant::now()));
    }
    Ok(Action::requeue(wait))
}
