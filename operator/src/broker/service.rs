//! The broker's gRPC service.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use selfplay_crds::{Checkpoint, CheckpointSpec, ProgressSnapshot, SandboxPool, SelfPlayRun};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::broker::backend::{Backend, Claim, ClaimOutcome, Released};
use crate::broker_proto as pb;
use crate::decide::pool::Sandbox;
use crate::decide::seconds_between;
use crate::metrics::Metrics;
use crate::names::{
    ANNOTATION_REGISTERED_AT, ANNOTATION_SIZE_BYTES, COMPONENT_SANDBOX, LABEL_COMPONENT,
    LABEL_POOL, LABEL_RUN, checkpoint_name, common_labels, pool_token_secret, run_token_secret,
};

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Wait for a Ready sandbox when the request names none.
    pub default_wait: Duration,
    /// Longest wait a request may ask for.
    pub max_wait: Duration,
    /// A sandbox with less life left than this is not handed out.
    pub min_life: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            default_wait: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
            min_life: Duration::from_secs(60),
        }
    }
}

/// The broker: stores from the controllers, a backend for writes, metrics.
pub struct Broker<B: Backend> {
    backend: Arc<B>,
    sandboxes: Store<Pod>,
    pools: Store<SandboxPool>,
    runs: Store<SelfPlayRun>,
    changed: Arc<Notify>,
    metrics: Metrics,
    settings: BrokerSettings,
    /// Pods this broker claimed, by uid, with the claiming run: the cache lags the claim,
    /// and a pod claimed here must not be tried again nor refused on release meanwhile.
    recently_claimed: Mutex<HashMap<String, (String, Instant)>>,
    progress: Mutex<HashMap<(String, String), ProgressSnapshot>>,
}

fn grpc_err(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("Kubernetes API: {e}"))
}

/// Equal-time comparison of two tokens.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn finite(x: Option<f64>, field: &str) -> Result<Option<f64>, Status> {
    match x {
        Some(v) if !v.is_finite() => {
            Err(Status::invalid_argument(format!("{field} is not finite")))
        }
        other => Ok(other),
    }
}

/// `host:port` of a sidecar; an IPv6 pod IP is bracketed, or the port would read as part of it.
pub fn sidecar_address(pod_ip: &str, port: i32) -> String {
    match (pod_ip.parse::<std::net::IpAddr>(), u16::try_from(port)) {
        (Ok(ip), Ok(port)) => std::net::SocketAddr::new(ip, port).to_string(),
        _ => format!("{pod_ip}:{port}"),
    }
}

/// Converts the wire progress into the bounded snapshot kept in status.
pub fn snapshot_from_proto(p: &pb::Progress, now: Timestamp) -> Result<ProgressSnapshot, Status> {
    if p.step < 0 || p.policy_version < 0 || p.sandbox_errors < 0 {
        return Err(Status::invalid_argument(
            "step, policy_version and sandbox_errors must not be negative",
        ));
    }
    let rate = |x: Option<f64>, f: &str| -> Result<Option<f64>, Status> {
        match finite(x, f)? {
            Some(v) if !(0.0..=1.0).contains(&v) => Err(Status::invalid_argument(format!(
                "{f} must be within [0, 1]"
            ))),
            other => Ok(other),
        }
    };
    let check = p.top_failed_check.clone();
    if check.as_ref().is_some_and(|c| c.len() > 128) {
        return Err(Status::invalid_argument(
            "top_failed_check is longer than 128 bytes",
        ));
    }
    Ok(ProgressSnapshot {
        step: p.step,
        policy_version: p.policy_version,
        solve_rate: rate(p.solve_rate, "solve_rate")?,
        injector_validity_rate: rate(p.injector_validity_rate, "injector_validity_rate")?,
        top_failed_check: check,
        mean_reward_solver: finite(p.mean_reward_solver, "mean_reward_solver")?,
        mean_reward_injector: finite(p.mean_reward_injector, "mean_reward_injector")?,
        tokens_per_second: finite(p.tokens_per_second, "tokens_per_second")?,
        sandbox_errors: p.sandbox_errors,
        loss: finite(p.loss, "loss")?,
        last_update_time: Some(Time(now)),
    })
}

/// Counts a waiting acquire while it lives.
struct Waiting<'a>(&'a Metrics, [String; 2]);
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .acquire_waiting
            .with_label_values(&[&self.1[0], &self.1[1]])
            .dec();
    }
}

impl<B: Backend> Broker<B> {
    pub fn new(
        backend: Arc<B>,
        sandboxes: Store<Pod>,
        pools: Store<SandboxPool>,
        runs: Store<SelfPlayRun>,
        changed: Arc<Notify>,
        metrics: Metrics,
        settings: BrokerSettings,
    ) -> Self {
        Self {
            backend,
            sandboxes,
            pools,
            runs,
            changed,
            metrics,
            settings,
            recently_claimed: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
        }
    }

    /// The latest progress a run reported to this broker.
    pub fn latest_progress(&self, namespace: &str, run: &str) -> Option<ProgressSnapshot> {
        self.progress
            .lock()
            .ok()?
            .get(&(namespace.to_string(), run.to_string()))
            .cloned()
    }

    /// Checks the caller's token against the run's Secret and returns the run.
    async fn authenticate<T>(
        &self,
        req: &Request<T>,
        run: Option<&pb::RunRef>,
    ) -> Result<Arc<SelfPlayRun>, Status> {
        let run = run.ok_or_else(|| Status::invalid_argument("run is required"))?;
        if run.namespace.is_empty() || run.name.is_empty() {
            return Err(Status::invalid_argument(
                "run.namespace and run.name are required",
            ));
        }
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
        let secret = run_token_secret(&run.name);
        let mut expected = self
            .backend
            .secret_token(&run.namespace, &secret, None)
            .await
            .map_err(grpc_err)?;
        if !expected.as_deref().is_some_and(|e| same_token(given, e)) {
            // The run may have been recreated with a new token since the cache read it.
            expected = self
                .backend
                .secret_token(
                    &run.namespace,
                    &secret,
                    Some(expected.as_deref().unwrap_or("")),
                )
                .await
                .map_err(grpc_err)?;
        }
        if !expected.as_deref().is_some_and(|e| same_token(given, e)) {
            return Err(Status::unauthenticated("unknown run or wrong token"));
        }
        self.runs
            .get(&ObjectRef::new(&run.name).within(&run.namespace))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "run {}/{} is not known (yet)",
                    run.namespace, run.name
                ))
            })
    }

    fn recently_claimed_by(&self, uid: &str) -> Option<String> {
        let mut m = self.recently_claimed.lock().ok()?;
        m.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(120));
        m.get(uid).map(|(run, _)| run.clone())
    }

    /// Ready, unclaimed sandboxes of a pool, oldest first, from the cache.
    fn candidates(&self, namespace: &str, pool: &SandboxPool, now: Timestamp) -> Vec<Arc<Pod>> {
        let ttl = pool.spec.sandbox_ttl_seconds;
        let min_life = self.settings.min_life.as_secs() as i64;
        let mut pods: Vec<(Timestamp, Arc<Pod>)> = self
            .sandboxes
            .state()
            .into_iter()
            .filter(|p| p.namespace().as_deref() == Some(namespace))
            .filter(|p| {
                let l = p.labels();
                l.get(LABEL_COMPONENT).map(String::as_str) == Some(COMPONENT_SANDBOX)
                    && l.get(LABEL_POOL) == pool.metadata.name.as_ref()
            })
            .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
            .filter_map(|p| {
                let s = Sandbox::from_pod(&p)?;
                let usable = s.ready
                    && !s.finished
                    && !s.terminating
                    && s.claimed_by.is_none()
                    && ttl - seconds_between(s.created, now) >= min_life;
                let uid = p.uid().unwrap_or_default();
                (usable && self.recently_claimed_by(&uid).is_none()).then_some((s.created, p))
            })
            .collect();
        pods.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.name_any().cmp(&b.1.name_any()))
        });
        pods.into_iter().map(|(_, p)| p).collect()
    }

    pub async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let start = Instant::now();
        let run = self.authenticate(&req, req.get_ref().run.as_ref()).await?;
        let body = req.get_ref();
        let ns = run.namespace().unwrap_or_default();
        let labels = [ns.clone(), body.pool.clone()];
        let outcome = |o: &str| {
            self.metrics
                .acquire_total
                .with_label_values(&[&labels[0], &labels[1], o])
                .inc()
        };

        if run
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(selfplay_crds::RunPhase::is_terminal)
        {
            return Err(Status::failed_precondition("the run has finished"));
        }
        if !run.spec.pools.iter().any(|p| p.name == body.pool) {
            return Err(Status::permission_denied(format!(
                "pool {:?} is not in the run's spec.pools",
                body.pool
            )));
        }
        let pool = self
            .pools
            .get(&ObjectRef::new(&body.pool).within(&ns))
            .ok_or_else(|| {
                Status::not_found(format!("SandboxPool {ns}/{} not found", body.pool))
            })?;
        let token = self
            .backend
            .secret_token(&ns, &pool_token_secret(&body.pool), None)
            .await
            .map_err(grpc_err)?
            .ok_or_else(|| Status::unavailable("the pool's token Secret does not exist yet"))?;

        let wait = match body.wait_timeout_ms {
            0 => self.settings.default_wait,
            ms => Duration::from_millis(ms).min(self.settings.max_wait),
        };
        let deadline = start + wait;
        self.metrics
            .acquire_waiting
            .with_label_values(&[&labels[0], &labels[1]])
            .inc();
        let _waiting = Waiting(&self.metrics, labels.clone());
        let claim = Claim {
            run_namespace: ns.clone(),
            run_name: run.name_any(),
            run_uid: run.uid(),
            attempt: run.status.as_ref().map_or(0, |s| s.restarts),
            at: Timestamp::now(),
        };

        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            for pod in self.candidates(&ns, &pool, Timestamp::now()) {
                match self.backend.claim(&pod, &claim).await {
                    Ok(ClaimOutcome::Claimed(claimed)) => {
                        let uid = claimed.uid().unwrap_or_default();
                        if let Ok(mut m) = self.recently_claimed.lock() {
                            m.insert(uid, (claim.run_name.clone(), Instant::now()));
                        }
                        let ip = claimed
                            .status
                            .as_ref()
                            .and_then(|s| s.pod_ip.clone())
                            .or_else(|| pod.status.as_ref().and_then(|s| s.pod_ip.clone()));
                        let Some(ip) = ip else { continue };
                        outcome("ok");
                        self.metrics
                            .acquire_duration
                            .with_label_values(&[&labels[0], &labels[1]])
                            .observe(start.elapsed().as_secs_f64());
                        tracing::info!(run = %claim.run_name, namespace = %ns, pool = %body.pool, sandbox = %claimed.name_any(), "sandbox acquired");
                        return Ok(Response::new(pb::AcquireResponse {
                            sandbox: claimed.name_any(),
                            address: sidecar_address(&ip, pool.spec.sidecar_port),
                            token,
                            workdir: pool.spec.template.workdir.clone(),
                            command_timeout_seconds: pool.spec.command_timeout_seconds.max(0)
                                as u32,
                            test_timeout_seconds: pool.spec.test_timeout_seconds.max(0) as u32,
                            pool: body.pool.clone(),
                        }));
                    }
                    Ok(ClaimOutcome::Lost) => continue,
                    Err(e) => {
                        outcome("error");
                        return Err(grpc_err(e));
                    }
                }
            }

            let now = Instant::now();
            if now >= deadline {
                outcome("timeout");
                return Err(Status::deadline_exceeded(format!(
                    "no Ready sandbox in pool {} within {} ms",
                    body.pool,
                    wait.as_millis()
                )));
            }
            let nap = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    pub async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let run = self.authenticate(&req, req.get_ref().run.as_ref()).await?;
        let ns = run.namespace().unwrap_or_default();
        let name = &req.get_ref().sandbox;
        if name.is_empty() {
            return Err(Status::invalid_argument("sandbox is required"));
        }
        match self
            .backend
            .release_sandbox(&ns, name, &run.name_any())
            .await
            .map_err(grpc_err)?
        {
            Released::NotHeld(why) => return Err(Status::permission_denied(why)),
            Released::Deleted | Released::Gone => {}
        }
        tracing::info!(run = %run.name_any(), namespace = %ns, sandbox = %name, "sandbox released");
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    pub async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let run = self.authenticate(&req, req.get_ref().run.as_ref()).await?;
        let ns = run.namespace().unwrap_or_default();
        let p = req
            .get_ref()
            .progress
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("progress is required"))?;
        let snapshot = snapshot_from_proto(p, Timestamp::now())?;
        self.backend
            .write_progress(&ns, &run.name_any(), &snapshot)
            .await
            .map_err(grpc_err)?;
        self.metrics
            .run_step
            .with_label_values(&[&ns, &run.name_any()])
            .set(snapshot.step);
        if let Ok(mut m) = self.progress.lock() {
            m.insert((ns, run.name_any()), snapshot);
        }
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    pub async fn register_checkpoint(
        &self,
        req: Request<pb::RegisterCheckpointRequest>,
    ) -> Result<Response<pb::RegisterCheckpointResponse>, Status> {
        let run = self.authenticate(&req, req.get_ref().run.as_ref()).await?;
        let body = req.get_ref();
        if body.step < 0 || body.policy_version < 0 {
            return Err(Status::invalid_argument(
                "step and policy_version must not be negative",
            ));
        }
        if body.location.is_empty() {
            return Err(Status::invalid_argument("location is required"));
        }
        let now = Timestamp::now();
        let metrics = body
            .metrics
            .as_ref()
            .map(|m| snapshot_from_proto(m, now))
            .transpose()?;
        let ckpt = checkpoint_object(
            &run,
            body.step,
            body.policy_version,
            &body.location,
            body.size_bytes,
            metrics,
            now,
        );
        self.backend
            .create_checkpoint(&ckpt)
            .await
            .map_err(grpc_err)?;
        Ok(Response::new(pb::RegisterCheckpointResponse {
            checkpoint: ckpt.name_any(),
        }))
    }
}

/// The Checkpoint object for a registered checkpoint, owned by its run.
pub fn checkpoint_object(
    run: &SelfPlayRun,
    step: i64,
    policy_version: i64,
    location: &str,
    size_bytes: i64,
    metrics: Option<ProgressSnapshot>,
    now: Timestamp,
) -> Checkpoint {
    let name = run.name_any();
    let mut labels = common_labels("selfplay-trainer");
    labels.insert(LABEL_RUN.to_string(), name.clone());
    let mut annotations = BTreeMap::from([(ANNOTATION_REGISTERED_AT.to_string(), now.to_string())]);
    if size_bytes > 0 {
        annotations.insert(ANNOTATION_SIZE_BYTES.to_string(), size_bytes.to_string());
    }
    let mut ckpt = Checkpoint::new(
        &checkpoint_name(&name, step),
        CheckpointSpec {
            run_name: name,
            step,
            policy_version,
            location: location.to_string(),
            pvc: run.spec.checkpoint.storage.pvc.clone(),
            metrics,
        },
    );
    ckpt.metadata = ObjectMeta {
        namespace: run.namespace(),
        labels: Some(labels),
        annotations: Some(annotations),
        owner_references: run.controller_owner_ref(&()).map(|o| vec![o]),
        ..ckpt.metadata
    };
    ckpt
}

#[tonic::async_trait]
impl<B: Backend> pb::broker_server::Broker for Arc<Broker<B>> {
    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        Broker::acquire(self, req).await
    }
    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        Broker::release(self, req).await
    }
    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        Broker::report_progress(self, req).await
    }
    async fn register_checkpoint(
        &self,
        req: Request<pb::RegisterCheckpointRequest>,
    ) -> Result<Response<pb::RegisterCheckpointResponse>, Status> {
        Broker::register_checkpoint(self, req).await
    }
}

/// The tonic service of a broker, ready for `tonic::transport::Server::add_service`.
pub fn service<B: Backend>(
    broker: Arc<Broker<B>>,
) -> pb::broker_server::BrokerServer<Arc<Broker<B>>> {
    pb::broker_server::BrokerServer::new(broker)
}
