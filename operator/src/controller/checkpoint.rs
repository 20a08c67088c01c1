//! The Checkpoint controller: marks checkpoints registered through the broker Ready and
//! applies their run's keep-last-K retention.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use selfplay_crds::conditions::{ConditionStatus, ConditionType, is_true, set_condition};
use selfplay_crds::{Checkpoint, CheckpointStatus, SelfPlayRun};

use crate::controller::apply::{apply_status, delete};
use crate::controller::run::run_checkpoints;
use crate::controller::{Context, Error, ReconcileTimer};
use crate::decide::checkpoint::retention;
use crate::names::{ANNOTATION_REGISTERED_AT, ANNOTATION_SIZE_BYTES, MANAGER};

pub const KIND: &str = "Checkpoint";

pub async fn reconcile(ckpt: Arc<Checkpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ReconcileTimer::start(&ctx.metrics, KIND);
    let result = reconcile_checkpoint(&ckpt, &ctx, Timestamp::now()).await;
    ctx.backoff.settle(KIND, ckpt.as_ref(), result)
}

/// The Ready status of a checkpoint the trainer registered (it registers only complete ones).
pub fn ready_status(ckpt: &Checkpoint, now: Timestamp) -> CheckpointStatus {
    let annotations = ckpt.annotations();
    let completed = annotations
        .get(ANNOTATION_REGISTERED_AT)
        .and_then(|s| s.parse::<Timestamp>().ok())
        .unwrap_or(now);
    let size = annotations
        .get(ANNOTATION_SIZE_BYTES)
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| *n > 0);
    let generation = ckpt.meta().generation;
    let mut st = ckpt.status.clone().unwrap_or_default();
    st.size_bytes = size.or(st.size_bytes);
    st.completion_time = Some(Time(completed));
    st.observed_generation = generation;
    set_condition(
        &mut st.conditions,
        ConditionType::Ready,
        ConditionStatus::True,
        "Registered",
        &format!("step {} at {}", ckpt.spec.step, ckpt.spec.location),
        generation,
        Time(now),
    );
    st
}

pub async fn reconcile_checkpoint(
    ckpt: &Checkpoint,
    ctx: &Context,
    now: Timestamp,
) -> Result<Action, Error> {
    let name = ckpt.name_any();
    let ns = ckpt
        .namespace()
        .ok_or_else(|| Error::MissingNamespace(name.clone()))?;
    let api: Api<Checkpoint> = Api::namespaced(ctx.client.clone(), &ns);
    if ckpt.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }

    let ready = ckpt
        .status
        .as_ref()
        .is_some_and(|s| is_true(&s.conditions, ConditionType::Ready));
    if !ready {
        let st = ready_status(ckpt, now);
        let body = serde_json::json!({ "apiVersion": selfplay_crds::API_VERSION, "kind": KIND, "status": st });
        apply_status(&api, &name, MANAGER, &body).await?;
        ctx.event(
            ckpt,
            false,
            "Ready",
            "MarkReady",
            format!("checkpoint of step {} is Ready", ckpt.spec.step),
        )
        .await;
    }

    // Retention over the run's checkpoints, this one counted as Ready.
    let run_ref = ObjectRef::<SelfPlayRun>::new(&ckpt.spec.run_name).within(&ns);
    let Some(run) = ctx.runs.get(&run_ref) else {
        return Ok(Action::await_change());
    };
    let mut infos: Vec<_> = run_checkpoints(&ctx.client, &ns, &ckpt.spec.run_name)
        .await?
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    for i in infos.iter_mut().filter(|i| i.name == name) {
        i.ready = true;
    }
    let protected: Vec<&str> = run.spec.resume_from.iter().map(String::as_str).collect();
    let doomed = retention(&infos, run.spec.checkpoint.keep_last, &protected);
    for old in &doomed {
        delete(&api, old, None).await?;
    }
    if !doomed.is_empty() {
        let note = format!(
            "deleted {} (keepLast {})",
            doomed.join(", "),
            run.spec.checkpoint.keep_last
        );
        ctx.event(run.as_ref(), false, "CheckpointsPruned", "Retention", note)
            .await;
    }
    Ok(Action::await_change())
}
