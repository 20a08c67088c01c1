//! The SelfPlayRun controller.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Preconditions, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use selfplay_crds::{Checkpoint, SandboxPool, SelfPlayRun};

use crate::build::{generate_token, run_token_secret, trainer_config_map, trainer_pod};
use crate::controller::apply::{apply, apply_status, create, delete, ensure_secret};
use crate::controller::{Context, Error, ReconcileTimer};
use crate::decide::checkpoint::{CheckpointInfo, latest_ready};
use crate::decide::mark_create_failed;
use crate::decide::run::{
    ResumeFrom, RunAction, RunObservation, Trainer, decide_run, invalid_run_status,
};
use crate::names::{LABEL_RUN, MANAGER, selector_string, trainer_selector_labels};
use crate::validate::validate_run;

pub const KIND: &str = "SelfPlayRun";

pub async fn reconcile(run: Arc<SelfPlayRun>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ReconcileTimer::start(&ctx.metrics, KIND);
    let ns = run
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(run.name_any()))?;
    let api: Api<SelfPlayRun> = Api::namespaced(ctx.client.clone(), &ns);
    let obj = run.clone();
    let result = finalizer(&api, crate::names::FINALIZER, run, |event| async {
        match event {
            Finalizer::Apply(run) => apply_run(&run, &ctx, Timestamp::now()).await,
            Finalizer::Cleanup(run) => cleanup_run(&run, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.backoff.settle(KIND, obj.as_ref(), result)
}

fn status_body(status: &selfplay_crds::SelfPlayRunStatus) -> serde_json::Value {
    // `progress` belongs to the broker's field manager: never part of the controller's apply.
    let mut status = status.clone();
    status.progress = None;
    serde_json::json!({ "apiVersion": selfplay_crds::API_VERSION, "kind": KIND, "status": status })
}

/// Checkpoints of a run (label `selfplay.dev/run`), as the retention and resume logic sees them.
pub async fn run_checkpoints(
    client: &kube::Client,
    ns: &str,
    run: &str,
) -> Result<Vec<(CheckpointInfo, Checkpoint)>, kube::Error> {
    let api: Api<Checkpoint> = Api::namespaced(client.clone(), ns);
    let list = api
        .list(&ListParams::default().labels(&format!("{LABEL_RUN}={run}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|c| c.spec.run_name == run)
        .map(|c| (CheckpointInfo::from_object(&c), c))
        .collect())
}

pub async fn apply_run(run: &SelfPlayRun, ctx: &Context, now: Timestamp) -> Result<Action, Error> {
    let name = run.name_any();
    let ns = run
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let generation = run.meta().generation;
    let runs: Api<SelfPlayRun> = Api::namespaced(ctx.client.clone(), &ns);

    let valid = match validate_run(run) {
        Ok(v) => v,
        Err(invalid) => {
            let msg = invalid.to_string();
            let st = invalid_run_status(run.status.as_ref(), &msg, generation, now);
            apply_status(&runs, &name, MANAGER, &status_body(&st)).await?;
            if run.status.as_ref().and_then(|s| s.observed_generation) != generation {
                ctx.event(run, true, "InvalidSpec", "Validate", msg).await;
            }
            ctx.metrics.set_run_phase(&ns, &name, st.phase);
            return Ok(Action::await_change());
        }
    };

    // Notices once per generation: they need no status of their own, only to be seen.
    if run.status.as_ref().and_then(|s| s.observed_generation) != generation {
        for n in &valid.notices {
            ctx.event(run, true, "NoPersistentCheckpoints", "Validate", n.clone())
                .await;
        }
    }

    // Observe.
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = selector_string(&trainer_selector_labels(&name));
    let trainers: Vec<Trainer> = pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .filter_map(Trainer::from_pod)
        .collect();
    let checkpoints = run_checkpoints(&ctx.client, &ns, &name).await?;
    let infos: Vec<CheckpointInfo> = checkpoints.iter().map(|(i, _)| i.clone()).collect();
    let latest = latest_ready(&infos);
    let resume_from = match (&run.spec.resume_from, latest) {
        (Some(ckpt), None) => {
            let api: Api<Checkpoint> = Api::namespaced(ctx.client.clone(), &ns);
            match api.get_opt(ckpt).await? {
                Some(c) => {
                    let info = CheckpointInfo::from_object(&c);
                    match (&info.pvc, &run.spec.checkpoint.storage.pvc) {
                        _ if !info.ready => ResumeFrom::NotReady(ckpt.clone()),
                        (Some(theirs), ours) if Some(theirs) != ours.as_ref() => {
                            ResumeFrom::OtherVolume {
                                checkpoint: ckpt.clone(),
                                pvc: theirs.clone(),
                            }
                        }
                        _ => ResumeFrom::Ready(info.resume_point()),
                    }
                }
                None => ResumeFrom::NotReady(ckpt.clone()),
            }
        }
        _ => ResumeFrom::None,
    };
    let missing_pools: Vec<String> = run
        .spec
        .pools
        .iter()
        .filter(|p| {
            ctx.pools
                .get(&ObjectRef::<SandboxPool>::new(&p.name).within(&ns))
                .is_none()
        })
        .map(|p| p.name.clone())
        .collect();
    let obs = RunObservation {
        generation,
        trainers,
        latest_checkpoint: latest.map(CheckpointInfo::resume_point),
        resume_from,
        missing_pools,
        warnings: valid.warnings.clone(),
        now,
    };

    // Decide and apply.
    let plan = decide_run(&run.spec, run.status.as_ref(), &obs);
    for action in &plan.actions {
        match action {
            RunAction::DeleteRun {
                finished_seconds_ago,
            } => {
                let note = format!(
                    "finished {finished_seconds_ago}s ago, ttlSecondsAfterFinished is {}",
                    run.spec.ttl_seconds_after_finished.unwrap_or_default()
                );
                // The event first: once the run is gone, so is the object it would name.
                ctx.event(run, false, "TTLExpired", "Delete", note).await;
                return Ok(if delete_expired_run(&runs, run).await? {
                    tracing::info!(run = %name, namespace = %ns, finished_seconds_ago, "finished run deleted (ttlSecondsAfterFinished)");
                    // The deletion comes back as a watch event; the finalizer cleans up then.
                    Action::await_change()
                } else {
                    // Changed since it was read (a longer TTL, a report): decide again on the
                    // new version. Progress reports do not trigger a reconcile by themselves.
                    Action::requeue(Duration::from_secs(5))
                });
            }
            RunAction::DeleteTrainer { name: pod, reason } => {
                delete(&pods, pod, None).await?;
                tracing::info!(run = %name, namespace = %ns, pod = %pod, reason, "trainer deleted");
            }
            RunAction::CreateTrainer { attempt, resume } => {
                let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
                ensure_secret(
                    &secrets,
                    &run_token_secret(&name, &ns, &valid.owner, &generate_token()),
                )
                .await?;
                let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
                apply(&cms, &trainer_config_map(&valid)?).await?;
                let pod = trainer_pod(&valid, *attempt, resume.as_ref(), &ctx.config);
                if let Err(e) = create(&pods, &pod).await {
                    // Say why in status before the error policy retries with backoff.
                    let mut st = plan.status.clone();
                    let msg = e.to_string();
                    mark_create_failed(
                        &mut st.conditions,
                        "the trainer pod",
                        &msg,
                        run.meta().generation,
                        now,
                    );
                    apply_status(&runs, &name, MANAGER, &status_body(&st)).await?;
                    ctx.event(
                        run,
                        true,
                        "CreateFailed",
                        "CreateTrainer",
                        format!("cannot create the trainer pod: {msg}"),
                    )
                    .await;
                    return Err(e.into());
                }
                tracing::info!(run = %name, namespace = %ns, attempt, "trainer created");
            }
        }
    }

    // Status, metrics, events.
    apply_status(&runs, &name, MANAGER, &status_body(&plan.status)).await?;
    ctx.metrics.set_run_phase(&ns, &name, plan.status.phase);
    if let Some((_, c)) = latest.and_then(|l| checkpoints.iter().find(|(i, _)| i.name == l.name))
        && let Some(t) = c.status.as_ref().and_then(|s| s.completion_time.as_ref())
    {
        ctx.metrics
            .run_last_checkpoint
            .with_label_values(&[&ns, &name])
            .set(t.0.as_second() as f64);
    }
    for ev in &plan.events {
        ctx.event(run, ev.warning, ev.reason, "Reconcile", ev.note.clone())
            .await;
    }
    Ok(match plan.requeue_after {
        Some(d) => Action::requeue(d),
        None => Action::requeue(Duration::from_secs(300)),
    })
}

/// Deletes a finished run, but only the version the decision saw: a run recreated under the
/// same name (another UID) or edited meanwhile (say, a longer TTL) is left alone. `Ok(false)`
/// when the preconditions failed; gone already is `Ok(true)`.
async fn delete_expired_run(api: &Api<SelfPlayRun>, run: &SelfPlayRun) -> Result<bool, Error> {
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: run.meta().uid.clone(),
            resource_version: run.meta().resource_version.clone(),
        }),
        // The trainer pod, ConfigMap, token Secret and Checkpoints are garbage-collected by
        // their owner references after the run is gone, without holding its deletion up.
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    match api.delete(&run.name_any(), &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(true),
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// On deletion: stop the trainer first (GPUs are freed at once, and no checkpoint is
/// registered for a run that is going away), drop metric series; the rest is garbage-collected.
pub async fn cleanup_run(run: &SelfPlayRun, ctx: &Context) -> Result<Action, Error> {
    let name = run.name_any();
    let ns = run.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = selector_string(&trainer_selector_labels(&name));
    for p in pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        if p.metadata.deletion_timestamp.is_none() {
            delete(&pods, &p.name_any(), None).await?;
        }
    }
    ctx.metrics.forget_run(&ns, &name);
    Ok(Action::await_change())
}
