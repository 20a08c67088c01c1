//! The controllers: kube-runtime reconcilers for SandboxPool, SelfPlayRun and Checkpoint,
//! sharing one [`Context`]. Each reconcile validates, observes, decides (pure, in
//! [`crate::decide`]), applies, and writes status by server-side apply.

pub mod apply;
pub mod checkpoint;
pub mod http;
pub mod leader;
pub mod namespaces;
pub mod pool;
pub mod predicates;
pub mod run;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Consecutive failed reconciles per object, for the error policy's backoff.
    pub backoff: ErrorBackoff,
    /// Per pool (namespace/name): sandboxes failing in a row, and until when not to replace them.
    pub sandbox_crashes: Mutex<HashMap<String, crate::decide::pool::CrashBackoff>>,
    /// Pools' resolved environments, shared with the broker (which starts sandboxes of an
    /// environment on demand).
    pub environments: Arc<crate::environments::EnvironmentCache>,
}

/// The error policy's delay after `failures` consecutive failed reconciles of one object:
/// 5 s doubling up to 5 min, so that a quota or admission rejection does not hammer the API
/// server every few seconds while a transient error is still retried soon.
pub fn error_backoff(failures: u32) -> Duration {
    const BASE: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(300);
    let exp = failures.saturating_sub(1).min(16);
    BASE.saturating_mul(1u32 << exp).min(MAX)
}

/// Per-object failure counts, keyed by kind/namespace/name.
#[derive(Debug, Default)]
pub struct ErrorBackoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl ErrorBackoff {
    fn key<K: Resource>(kind: &str, obj: &K) -> String {
        format!(
            "{kind}/{}/{}",
            obj.meta().namespace.as_deref().unwrap_or_default(),
            obj.meta().name.as_deref().unwrap_or_default()
        )
    }

    /// Records a failure and returns how long to wait before the next try.
    pub fn failed<K: Resource>(&self, kind: &str, obj: &K) -> Duration {
        let Ok(mut m) = self.failures.lock() else {
            return error_backoff(1);
        };
        let n = m.entry(Self::key(kind, obj)).or_insert(0);
        *n = n.saturating_add(1);
        error_backoff(*n)
    }

    /// Forgets the failures of an object whose reconcile succeeded.
    pub fn succeeded<K: Resource>(&self, kind: &str, obj: &K) {
        if let Ok(mut m) = self.failures.lock() {
            m.remove(&Self::key(kind, obj));
        }
    }

    /// Passes `result` through, resetting the object's backoff on success.
    pub fn settle<K: Resource, T, E>(
        &self,
        kind: &str,
        obj: &K,
        result: Result<T, E>,
    ) -> Result<T, E> {
        if result.is_ok() {
            self.succeeded(kind, obj);
        }
        result
    }
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
            backoff: ErrorBackoff::default(),
            sandbox_crashes: Mutex::new(HashMap::new()),
            environments: Arc::default(),
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

/// The `error_policy` of every controller: count the error by label and retry `obj` after a
/// backoff that grows with its consecutive failures (reset by its next successful reconcile).
pub fn on_error<K: Resource>(
    kind: &'static str,
    obj: &K,
    err: &Error,
    ctx: &Context,
) -> kube::runtime::controller::Action {
    let wait = ctx.backoff.failed(kind, obj);
    tracing::warn!(kind, object = ?obj.meta().name, error = %err, retry_in = ?wait, "reconcile failed");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[kind, err.metric_label()])
        .inc();
    kube::runtime::controller::Action::requeue(wait)
}
