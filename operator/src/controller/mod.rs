//! The controllers: kube-runtime reconcilers for SandboxPool, SelfPlayRun and Checkpoint,
//! sharing one [`Context`]. Each reconcile validates, observes, decides (pure, in
//! [`crate::decide`]), applies, and writes status by server-side apply.

pub mod apply;
pub mod checkpoint;
pub mod http;
pub mod leader;
pub mod pool;
pub mod run;

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use selfplay_crds::{SandboxPool, SelfPlayRun};
use tokio::sync::Notify;

use crate::config::OperatorConfig;
use crate::metrics::Metrics;

/// Everything the reconcilers and the broker share.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Sandbox pods (label `selfplay.dev/component=sandbox`), from the pool controller's reflector.
    pub sandboxes: Store<Pod>,
    /// Pools, from the pool controller's reflector.
    pub pools: Store<SandboxPool>,
    /// Runs, from the run controller's reflector.
    pub runs: Store<SelfPlayRun>,
    /// Notified whenever the sandbox reflector sees a change; wakes waiting acquires.
    pub sandboxes_changed: Arc<Notify>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: OperatorConfig,
        metrics: Metrics,
        reporter: Reporter,
        sandboxes: Store<Pod>,
        pools: Store<SandboxPool>,
        runs: Store<SelfPlayRun>,
        sandboxes_changed: Arc<Notify>,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            metrics,
            sandboxes,
            pools,
            runs,
            sandboxes_changed,
        }
    }

    /// Publishes an Event on `obj`. Failing to record an event never fails a reconcile.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), reason, error = %e, "cannot publish event");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("cannot serialise: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("{0} has no namespace")]
    MissingNamespace(String),
}

impl Error {
    /// Low-cardinality label for `selfplay_operator_reconcile_errors_total{error}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if s.is_conflict() => "api_conflict",
            Self::Kube(kube::Error::Api(s)) if s.is_not_found() => "api_not_found",
            Self::Kube(kube::Error::Api(s)) if s.is_forbidden() => "api_forbidden",
            Self::Kube(kube::Error::Api(s)) if s.is_invalid() => "api_invalid",
            Self::Kube(kube::Error::Api(_)) => "api_error",
            Self::Kube(_) => "api_transport",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Self::Serialize(_) | Self::Yaml(_) => "serialize",
            Self::MissingNamespace(_) => "missing_namespace",
        }
    }
}

/// Counts a reconcile and its duration when dropped.
pub(crate) struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl<'a> ReconcileTimer<'a> {
    pub(crate) fn start(metrics: &'a Metrics, kind: &'static str) -> Self {
        metrics.reconciliations.with_label_values(&[kind]).inc();
        Self {
            metrics,
            kind,
            start: Instant::now(),
        }
    }
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .with_label_values(&[self.kind])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// The `error_policy` of every controller: count the error by label and retry soon.
pub fn on_error(
    kind: &'static str,
    err: &Error,
    metrics: &Metrics,
) -> kube::runtime::controller::Action {
    tracing::warn!(kind, error = %err, "reconcile failed");
    metrics
        .reconcile_errors
        .with_label_values(&[kind, err.metric_label()])
        .inc();
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10))
}
