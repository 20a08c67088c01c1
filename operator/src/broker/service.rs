//! The broker's gRPC service.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use selfplay_crds::environments::{spec_for, split_key};
use selfplay_crds::{
    Checkpoint, CheckpointSpec, Environment, ProgressSnapshot, SandboxPool, SelfPlayRun,
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::broker::backend::{Backend, Claim, ClaimOutcome, Released, claim_at_creation};
use crate::broker_proto as pb;
use crate::config::OperatorConfig;
use crate::decide::pool::Sandbox;
use crate::decide::seconds_between;
use crate::environments::{EnvironmentCache, has_environments};
use crate::metrics::Metrics;
use crate::names::{
    ANNOTATION_REGISTERED_AT, ANNOTATION_SIZE_BYTES, COMPONENT_SANDBOX, LABEL_COMPONENT,
    LABEL_ENVIRONMENT, LABEL_POOL, LABEL_RUN, checkpoint_name, common_labels, pool_token_secret,
    run_token_secret,
};

#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Wait for a Ready sandbox when the request names none.
    pub default_wait: Duration,
    /// Longest wait a request may ask for.
    pub max_wait: Duration,
    /// A sandbox with less life left than this is not handed out.
    pub min_life: Duration,
    /// Start a sandbox on demand when none of the requested pool (environment) is warm or
    /// on its way; off: wait for the pool's warm sandboxes only.
    pub cold_start: bool,
    /// What sandbox pods are made from (the sidecar image, the namespace-wide limit), as
    /// the pool controller has it.
    pub pods: OperatorConfig,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            default_wait: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
            min_life: Duration::from_secs(60),
            cold_start: true,
            pods: OperatorConfig::default(),
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
    environments: Arc<EnvironmentCache>,
    cold: Mutex<ColdStarts>,
}

/// Sandboxes this broker is starting on demand: counted together with the cache (which
/// sees a new pod only after its watch event) against `max` and the namespace limit.
#[derive(Default)]
struct ColdStarts {
    /// (namespace, pool) → pods created and not yet handed out or given up.
    inflight: HashMap<(String, String), BTreeSet<String>>,
    /// (namespace, pool) → creates under way, whose names the API server has not given yet.
    reserved: HashMap<(String, String), u32>,
}

/// Why a cold start found no room.
fn no_room(pool: &str, count: usize, max: i32, what: &str) -> String {
    format!("{what}: {count} sandbox(es) of pool {pool} exist, its max is {max}")
}

/// How a sandbox started on demand failed to become usable.
enum ColdFailure {
    Failed(String),
    Gone,
    Timeout(Option<String>),
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
        heldout_solve_rate: rate(p.heldout_solve_rate, "heldout_solve_rate")?,
        heldout_step: match p.heldout_step {
            Some(s) if s < 0 => {
                return Err(Status::invalid_argument(
                    "heldout_step must not be negative",
                ));
            }
            s => s,
        },
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
            environments: Arc::default(),
            cold: Mutex::default(),
        }
    }

    /// Shares the pool controller's resolved environments (those read from ConfigMaps);
    /// without it only environments listed in a pool's spec are known.
    pub fn with_environments(mut self, environments: Arc<EnvironmentCache>) -> Self {
        self.environments = environments;
        self
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

    /// Keeps the pods of `pods` that this broker has not claimed in the last two minutes.
    /// Expired entries are dropped once per call and the map is read under one lock: per
    /// pod, a scan of a pool of hundreds of sandboxes cost milliseconds per acquire (the
    /// broker bench showed it).
    fn not_recently_claimed<T>(&self, pods: Vec<(T, Arc<Pod>)>) -> Vec<(T, Arc<Pod>)> {
        let Ok(mut m) = self.recently_claimed.lock() else {
            return pods;
        };
        m.retain(|_, (_, at)| at.elapsed() < Duration::from_secs(120));
        pods.into_iter()
            .filter(|(_, p)| !m.contains_key(p.uid().as_deref().unwrap_or_default()))
            .collect()
    }

    /// Ready, unclaimed sandboxes of a pool, oldest first, from the cache.
    fn candidates(
        &self,
        namespace: &str,
        pool: &SandboxPool,
        environment: Option<&str>,
        now: Timestamp,
    ) -> Vec<Arc<Pod>> {
        let ttl = pool.spec.sandbox_ttl_seconds;
        let min_life = self.settings.min_life.as_secs() as i64;
        let pods: Vec<(Timestamp, Arc<Pod>)> = self
            .sandboxes
            .state()
            .into_iter()
            .filter(|p| p.namespace().as_deref() == Some(namespace))
            .filter(|p| {
                let l = p.labels();
                l.get(LABEL_COMPONENT).map(String::as_str) == Some(COMPONENT_SANDBOX)
                    && l.get(LABEL_POOL) == pool.metadata.name.as_ref()
                    && l.get(LABEL_ENVIRONMENT).map(String::as_str) == environment
            })
            .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
            .filter_map(|p| {
                let s = Sandbox::from_pod(&p)?;
                let usable = s.ready
                    && !s.finished
                    && !s.terminating
                    && s.claimed_by.is_none()
                    && ttl - seconds_between(s.created, now) >= min_life;
                usable.then_some((s.created, p))
            })
            .collect();
        let mut pods = self.not_recently_claimed(pods);
        pods.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| a.1.name_any().cmp(&b.1.name_any()))
        });
        pods.into_iter().map(|(_, p)| p).collect()
    }

    /// Whether a sandbox of the pool (environment) is unclaimed and on its way to Ready (not
    /// stuck): an acquire waits for it rather than start another.
    fn one_coming(&self, namespace: &str, pool: &str, environment: Option<&str>) -> bool {
        let coming: Vec<((), Arc<Pod>)> = self
            .sandboxes
            .state()
            .into_iter()
            .filter(|p| {
                let l = p.labels();
                p.namespace().as_deref() == Some(namespace)
                    && l.get(LABEL_COMPONENT).map(String::as_str) == Some(COMPONENT_SANDBOX)
                    && l.get(LABEL_POOL).map(String::as_str) == Some(pool)
                    && l.get(LABEL_ENVIRONMENT).map(String::as_str) == environment
                    && Sandbox::from_pod(p).is_some_and(|s| {
                        !s.ready
                            && !s.finished
                            && !s.terminating
                            && s.claimed_by.is_none()
                            && s.stuck.is_none()
                    })
            })
            .map(|p| ((), p))
            .collect();
        !self.not_recently_claimed(coming).is_empty()
    }

    /// Reserves room for one sandbox started on demand, or says why there is none: the
    /// pool's `max` and the namespace limit, counting the cache, the sandboxes this broker
    /// created that the cache may not show yet, and creates under way.
    fn reserve_cold(&self, namespace: &str, pool: &SandboxPool) -> Result<(), String> {
        let pool_name = pool.name_any();
        let mut cold = self
            .cold
            .lock()
            .map_err(|_| "cold-start state poisoned".to_string())?;
        let mut in_pool: BTreeSet<String> = BTreeSet::new();
        let mut in_ns: BTreeSet<String> = BTreeSet::new();
        for p in self.sandboxes.state() {
            if p.namespace().as_deref() != Some(namespace)
                || p.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            if p.labels().get(LABEL_POOL) == Some(&pool_name) {
                in_pool.insert(p.name_any());
            }
            in_ns.insert(p.name_any());
        }
        let mut reserved_ns = 0u32;
        for ((ns, pl), names) in &cold.inflight {
            if ns == namespace {
                in_ns.extend(names.iter().cloned());
                if *pl == pool_name {
                    in_pool.extend(names.iter().cloned());
                }
            }
        }
        for ((ns, _), n) in &cold.reserved {
            if ns == namespace {
                reserved_ns += n;
            }
        }
        let key = (namespace.to_string(), pool_name.clone());
        let reserved_pool = cold.reserved.get(&key).copied().unwrap_or(0);
        let pool_count = in_pool.len() + reserved_pool as usize;
        if pool_count >= pool.spec.max.max(0) as usize {
            return Err(no_room(
                &pool_name,
                pool_count,
                pool.spec.max,
                "pool at max",
            ));
        }
        let limit = self.settings.pods.max_sandboxes_per_namespace;
        let ns_count = in_ns.len() + reserved_ns as usize;
        if limit > 0 && ns_count >= limit as usize {
            return Err(format!(
                "namespace {namespace} holds {ns_count} sandbox(es), the operator's limit is {limit}"
            ));
        }
        *cold.reserved.entry(key).or_default() += 1;
        Ok(())
    }

    /// Turns a reservation into a created pod (`Some`) or gives it up (`None`).
    fn cold_created(&self, namespace: &str, pool: &str, name: Option<&str>) {
        if let Ok(mut cold) = self.cold.lock() {
            let key = (namespace.to_string(), pool.to_string());
            if let Some(n) = cold.reserved.get_mut(&key) {
                *n = n.saturating_sub(1);
            }
            if let Some(name) = name {
                cold.inflight
                    .entry(key)
                    .or_default()
                    .insert(name.to_string());
            }
        }
    }

    fn cold_done(&self, namespace: &str, pool: &str, name: &str) {
        if let Ok(mut cold) = self.cold.lock() {
            let key = (namespace.to_string(), pool.to_string());
            if let Some(set) = cold.inflight.get_mut(&key) {
                set.remove(name);
            }
        }
    }

    /// Waits for a sandbox started on demand to be Ready (as the watch reports it).
    async fn wait_ready(
        &self,
        namespace: &str,
        name: &str,
        deadline: Instant,
    ) -> Result<Arc<Pod>, ColdFailure> {
        let at = ObjectRef::new(name).within(namespace);
        let mut seen = false;
        let mut stuck = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.sandboxes.get(&at) {
                Some(p) => {
                    seen = true;
                    if let Some(s) = Sandbox::from_pod(&p) {
                        let has_ip = p
                            .status
                            .as_ref()
                            .and_then(|st| st.pod_ip.as_ref())
                            .is_some();
                        if s.ready && has_ip && !s.terminating {
                            return Ok(p);
                        }
                        if s.finished || s.terminating {
                            let why = p
                                .status
                                .as_ref()
                                .and_then(|st| st.reason.clone().or(st.message.clone()))
                                .unwrap_or_else(|| "its pod stopped".to_string());
                            return Err(ColdFailure::Failed(why));
                        }
                        stuck = s.stuck.or(stuck);
                    }
                }
                None if seen => return Err(ColdFailure::Gone),
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ColdFailure::Timeout(stuck));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep((deadline - now).min(Duration::from_secs(1))) => {}
            }
        }
    }

    /// Starts a sandbox of `environment` claimed for `claim` and waits until it is Ready;
    /// gives it up (deleted) when it fails or the deadline passes.
    async fn cold_start(
        &self,
        pool: &SandboxPool,
        environment: Option<&Environment>,
        claim: &Claim,
        deadline: Instant,
    ) -> Result<Arc<Pod>, Status> {
        let ns = claim.run_namespace.as_str();
        let pool_name = pool.name_any();
        let built = crate::validate::validate_pool(pool, &self.settings.pods)
            .map(|valid| match environment {
                Some(env) => {
                    crate::build::environment_sandbox_pod(&valid, env, &self.settings.pods)
                }
                None => crate::build::sandbox_pod(&valid, &self.settings.pods),
            })
            .map_err(|e| Status::failed_precondition(format!("pool {pool_name}: {e}")));
        let mut pod = match built {
            Ok(p) => p,
            Err(e) => {
                self.cold_created(ns, &pool_name, None);
                return Err(e);
            }
        };
        claim_at_creation(&mut pod, claim);
        let created = match self.backend.create_sandbox(&pod).await {
            Ok(p) => p,
            Err(e) => {
                self.cold_created(ns, &pool_name, None);
                return Err(Status::unavailable(format!(
                    "cannot start a sandbox of pool {pool_name}: {e}"
                )));
            }
        };
        let name = created.name_any();
        self.cold_created(ns, &pool_name, Some(&name));
        if let Ok(mut m) = self.recently_claimed.lock() {
            m.insert(
                created.uid().unwrap_or_default(),
                (claim.run_name.clone(), Instant::now()),
            );
        }
        tracing::info!(run = %claim.run_name, namespace = %ns, pool = %pool_name, environment = environment.map(|e| e.name.as_str()), sandbox = %name, "sandbox started on demand");
        let result = self.wait_ready(ns, &name, deadline).await;
        self.cold_done(ns, &pool_name, &name);
        let why = match result {
            Ok(p) => return Ok(p),
            Err(ColdFailure::Failed(why)) => {
                format!("sandbox {name} started on demand failed: {why}")
            }
            Err(ColdFailure::Gone) => format!("sandbox {name} started on demand was deleted"),
            Err(ColdFailure::Timeout(stuck)) => format!(
                "sandbox {name} started on demand was not Ready in time{}",
                stuck.map(|s| format!(" ({s})")).unwrap_or_default()
            ),
        };
        // Nobody else can use it (it is claimed): give it back now rather than at its TTL.
        if let Err(e) = self.backend.delete_sandbox(ns, &name).await {
            tracing::warn!(sandbox = %name, error = %e, "cannot delete a sandbox started on demand");
        }
        Err(Status::deadline_exceeded(why))
    }

    /// The pool and environment a request names: `pool` may be `POOL/ENVIRONMENT`, or the
    /// environment given apart.
    fn requested(body: &pb::AcquireRequest) -> Result<(&str, Option<&str>), Status> {
        let (pool, in_key) = split_key(&body.pool);
        let env = match (in_key, body.environment.as_str()) {
            (Some(k), e) if !e.is_empty() && e != k => {
                return Err(Status::invalid_argument(format!(
                    "pool {:?} names environment {k:?} but environment is {e:?}",
                    body.pool
                )));
            }
            (Some(k), _) => Some(k),
            (None, "") => None,
            (None, e) => Some(e),
        };
        Ok((pool, env))
    }

    /// The environment of `pool` a request asks for: `None` for a pool without environments.
    fn environment_of(
        &self,
        pool: &SandboxPool,
        asked: Option<&str>,
    ) -> Result<Option<Environment>, Status> {
        let name = pool.name_any();
        if !has_environments(&pool.spec) {
            return match asked {
                Some(e) => Err(Status::not_found(format!(
                    "pool {name} has no environments (asked for {e:?})"
                ))),
                None => Ok(None),
            };
        }
        let envs = self.environments.get(pool).ok_or_else(|| {
            Status::unavailable(format!(
                "the environments of pool {name} have not been read yet (see its Degraded condition)"
            ))
        })?;
        match asked {
            None if envs.is_empty() => Ok(None),
            None => Err(Status::invalid_argument(format!(
                "pool {name} has environments: acquire POOL/ENVIRONMENT (ListEnvironments names them)"
            ))),
            Some(e) => envs
                .iter()
                .find(|x| x.name == e)
                .cloned()
                .map(Some)
                .ok_or_else(|| Status::not_found(format!("pool {name} has no environment {e:?}"))),
        }
    }

    pub async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let start = Instant::now();
        let run = self.authenticate(&req, req.get_ref().run.as_ref()).await?;
        let body = req.get_ref();
        let (pool_name, asked_env) = Self::requested(body)?;
        let ns = run.namespace().unwrap_or_default();
        let labels = [ns.clone(), pool_name.to_string()];
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
        if !run.spec.uses_pool(pool_name) {
            return Err(Status::permission_denied(format!(
                "pool {pool_name:?} is neither in the run's spec.pools nor its evaluation pool"
            )));
        }
        let pool = self
            .pools
            .get(&ObjectRef::new(pool_name).within(&ns))
            .ok_or_else(|| Status::not_found(format!("SandboxPool {ns}/{pool_name} not found")))?;
        let environment = self.environment_of(&pool, asked_env)?;
        let env_name = environment.as_ref().map(|e| e.name.as_str());
        let workdir = match &environment {
            Some(e) => spec_for(&pool.spec, e).template.workdir,
            None => pool.spec.template.workdir.clone(),
        };
        let token = self
            .backend
            .secret_token(&ns, &pool_token_secret(pool_name), None)
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
        let respond = |pod: &Pod, fallback_ip: Option<String>, cold: bool| {
            let ip = pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.clone())
                .or(fallback_ip)?;
            outcome(if cold { "cold" } else { "ok" });
            self.metrics
                .acquire_duration
                .with_label_values(&[&labels[0], &labels[1]])
                .observe(start.elapsed().as_secs_f64());
            tracing::info!(run = %claim.run_name, namespace = %ns, pool = %pool_name, environment = env_name, sandbox = %pod.name_any(), cold, "sandbox acquired");
            Some(Response::new(pb::AcquireResponse {
                sandbox: pod.name_any(),
                address: sidecar_address(&ip, pool.spec.sidecar_port),
                token: token.clone(),
                workdir: workdir.clone(),
                command_timeout_seconds: pool.spec.command_timeout_seconds.max(0) as u32,
                test_timeout_seconds: pool.spec.test_timeout_seconds.max(0) as u32,
                pool: pool_name.to_string(),
                environment: env_name.unwrap_or_default().to_string(),
                cold_start: cold,
            }))
        };

        let mut waiting_for_room = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            for pod in self.candidates(&ns, &pool, env_name, Timestamp::now()) {
                match self.backend.claim(&pod, &claim).await {
                    Ok(ClaimOutcome::Claimed(claimed)) => {
                        let uid = claimed.uid().unwrap_or_default();
                        if let Ok(mut m) = self.recently_claimed.lock() {
                            m.insert(uid, (claim.run_name.clone(), Instant::now()));
                        }
                        let fallback = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
                        match respond(&claimed, fallback, false) {
                            Some(r) => return Ok(r),
                            None => continue,
                        }
                    }
                    Ok(ClaimOutcome::Lost) => continue,
                    Err(e) => {
                        outcome("error");
                        return Err(grpc_err(e));
                    }
                }
            }

            // Nothing warm, and nothing on its way: start one for this caller.
            if self.settings.cold_start && !self.one_coming(&ns, pool_name, env_name) {
                match self.reserve_cold(&ns, &pool) {
                    Ok(()) => {
                        let pod = self
                            .cold_start(&pool, environment.as_ref(), &claim, deadline)
                            .await
                            .inspect_err(|_| outcome("error"))?;
                        return respond(&pod, None, true).ok_or_else(|| {
                            outcome("error");
                            Status::unavailable("the sandbox started on demand has no IP")
                        });
                    }
                    Err(why) => waiting_for_room = Some(why),
                }
            }

            let now = Instant::now();
            if now >= deadline {
                outcome("timeout");
                return Err(Status::deadline_exceeded(format!(
                    "no Ready sandbox in pool {}{} within {} ms{}",
                    pool_name,
                    env_name
                        .map(|e| format!(", environment {e},"))
                        .unwrap_or_default(),
                    wait.as_millis(),
                    waiting_for_room
                        .map(|w| format!(" (none started on demand: {w})"))
                        .unwrap_or_default()
                )));
            }
            let nap = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    pub async fn list_environments(
        &self,
        req: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        let run = self.authenticate(&req, req.get_ref().run.as_ref()).await?;
        let ns = run.namespace().unwrap_or_default();
        let pool_name = req.get_ref().pool.as_str();
        if !run.spec.uses_pool(pool_name) {
            return Err(Status::permission_denied(format!(
                "pool {pool_name:?} is neither in the run's spec.pools nor its evaluation pool"
            )));
        }
        let pool = self
            .pools
            .get(&ObjectRef::new(pool_name).within(&ns))
            .ok_or_else(|| Status::not_found(format!("SandboxPool {ns}/{pool_name} not found")))?;
        let environments = if has_environments(&pool.spec) {
            self.environments.get(&pool).ok_or_else(|| {
                Status::unavailable(format!(
                    "the environments of pool {pool_name} have not been read yet (see its Degraded condition)"
                ))
            })?
        } else {
            Arc::default()
        };
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments: environments
                .iter()
                .map(|e| pb::EnvironmentInfo {
                    name: e.name.clone(),
                })
                .collect(),
        }))
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
// On the broker itself, not on an `Arc` of it: the trait is the `selfplay-broker` crate's, and
// the orphan rule wants a local type.
impl<B: Backend> pb::broker_server::Broker for Broker<B> {
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
    async fn list_environments(
        &self,
        req: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        Broker::list_environments(self, req).await
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
pub fn service<B: Backend>(broker: Arc<Broker<B>>) -> pb::broker_server::BrokerServer<Broker<B>> {
    pb::broker_server::BrokerServer::from_arc(broker)
}
