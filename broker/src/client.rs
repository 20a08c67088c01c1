//! A Rust client of the broker, for the trainer's cluster mode.

use std::time::Duration;

use selfplay_crds::ProgressSnapshot;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::proto as pb;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("environment variable {0} is not set")]
    MissingEnv(&'static str),
    #[error("invalid broker address {addr:?}: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("the token is not valid in a gRPC header")]
    BadToken,
    #[error("broker: {0}")]
    Rpc(#[from] tonic::Status),
}

/// A sandbox handed out by the broker. Release it with [`BrokerClient::release`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxLease {
    /// The sandbox's name (its pod), for `release`.
    pub sandbox: String,
    pub pool: String,
    /// Its environment; empty for a pool without environments.
    pub environment: String,
    /// Started for this acquire (no warm sandbox was there).
    pub cold_start: bool,
    /// `ip:port` of the sandbox sidecar.
    pub address: String,
    /// The sidecar's auth token.
    pub token: String,
    pub workdir: String,
    pub command_timeout: Duration,
    pub test_timeout: Duration,
}

/// How idempotent calls (progress, checkpoint registration, release) are retried: a broker
/// briefly unreachable (a leader hand-over, an operator restart) must not crash the trainer
/// and burn one of its restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Give up once this much time has passed since the first try.
    pub deadline: Duration,
    /// Each try's own gRPC deadline.
    pub per_try: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(60),
            per_try: Duration::from_secs(10),
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// A single try (no retries), as before retries existed.
    pub fn none() -> Self {
        Self {
            deadline: Duration::ZERO,
            ..Self::default()
        }
    }

    /// The wait before try `n + 1` after `n` failed tries: doubling, capped.
    pub fn backoff(&self, tries: u32) -> Duration {
        let exp = tries.saturating_sub(1).min(16);
        self.first_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff)
    }
}

/// Errors worth another try: the broker was unreachable or overloaded, or the try timed out.
/// Refusals (bad token, finished run, invalid request) are final.
pub fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
    )
}

/// Talks to the broker on behalf of one run. Cheap to clone; safe to use from many tasks.
#[derive(Clone)]
pub struct BrokerClient {
    inner: pb::broker_client::BrokerClient<Channel>,
    run: pb::RunRef,
    auth: MetadataValue<tonic::metadata::Ascii>,
    retry: RetryPolicy,
}

/// Environment variables the operator sets in the trainer pod.
pub const ENV_ADDR: &str = "SELFPLAY_BROKER_ADDR";
pub const ENV_TOKEN: &str = "SELFPLAY_BROKER_TOKEN";
pub const ENV_RUN_NAME: &str = "SELFPLAY_RUN_NAME";
pub const ENV_RUN_NAMESPACE: &str = "SELFPLAY_RUN_NAMESPACE";

fn proto_progress(p: &ProgressSnapshot) -> pb::Progress {
    pb::Progress {
        step: p.step,
        policy_version: p.policy_version,
        solve_rate: p.solve_rate,
        injector_validity_rate: p.injector_validity_rate,
        top_failed_check: p.top_failed_check.clone(),
        mean_reward_solver: p.mean_reward_solver,
        mean_reward_injector: p.mean_reward_injector,
        tokens_per_second: p.tokens_per_second,
        sandbox_errors: p.sandbox_errors,
        loss: p.loss,
        heldout_solve_rate: p.heldout_solve_rate,
        heldout_step: p.heldout_step,
    }
}

impl BrokerClient {
    /// A client for `addr` (`http://host:port`). Connects lazily, on the first call.
    pub fn new(addr: &str, namespace: &str, run: &str, token: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(addr.to_string())
            .map_err(|source| ClientError::Address {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        let auth = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadToken)?;
        Ok(Self {
            inner: pb::broker_client::BrokerClient::new(endpoint.connect_lazy()),
            run: pb::RunRef {
                namespace: namespace.to_string(),
                name: run.to_string(),
            },
            auth,
            retry: RetryPolicy::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Runs `call` (one try, given a request with its per-try deadline) until it succeeds,
    /// fails for good, or the policy's deadline passes.
    async fn retrying<B, T, F, Fut>(&self, body: B, mut call: F) -> Result<T, ClientError>
    where
        B: Clone,
        F: FnMut(pb::broker_client::BrokerClient<Channel>, tonic::Request<B>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let start = tokio::time::Instant::now();
        let mut tries = 0u32;
        loop {
            let mut req = self.request(body.clone());
            req.set_timeout(self.retry.per_try);
            tries += 1;
            match call(self.inner.clone(), req).await {
                Ok(v) => return Ok(v),
                Err(status) => {
                    let wait = self.retry.backoff(tries);
                    if !retryable(status.code()) || start.elapsed() + wait > self.retry.deadline {
                        return Err(status.into());
                    }
                    tracing::debug!(code = ?status.code(), tries, ?wait, "broker call failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// A client configured from the trainer pod's environment.
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |k: &'static str| std::env::var(k).map_err(|_| ClientError::MissingEnv(k));
        Self::new(
            &var(ENV_ADDR)?,
            &var(ENV_RUN_NAMESPACE)?,
            &var(ENV_RUN_NAME)?,
            &var(ENV_TOKEN)?,
        )
    }

    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(body);
        req.metadata_mut()
            .insert("authorization", self.auth.clone());
        req
    }

    /// Waits up to `wait` for a Ready sandbox of `pool`: a pool name, or `POOL/ENVIRONMENT`
    /// for one environment of a pool with environments (passed through as given).
    pub async fn acquire(&self, pool: &str, wait: Duration) -> Result<SandboxLease, ClientError> {
        let mut req = self.request(pb::AcquireRequest {
            run: Some(self.run.clone()),
            pool: pool.to_string(),
            wait_timeout_ms: wait.as_millis().min(u128::from(u64::MAX)) as u64,
            environment: String::new(),
        });
        req.set_timeout(wait + Duration::from_secs(10));
        let r = self.inner.clone().acquire(req).await?.into_inner();
        Ok(SandboxLease {
            sandbox: r.sandbox,
            pool: r.pool,
            environment: r.environment,
            cold_start: r.cold_start,
            address: r.address,
            token: r.token,
            workdir: r.workdir,
            command_timeout: Duration::from_secs(u64::from(r.command_timeout_seconds)),
            test_timeout: Duration::from_secs(u64::from(r.test_timeout_seconds)),
        })
    }

    /// The environment names of `pool` (empty for a pool without environments), in the
    /// pool's order.
    pub async fn list_environments(&self, pool: &str) -> Result<Vec<String>, ClientError> {
        let body = pb::ListEnvironmentsRequest {
            run: Some(self.run.clone()),
            pool: pool.to_string(),
        };
        let r = self
            .retrying(
                body,
                |mut c, req| async move { c.list_environments(req).await },
            )
            .await?;
        Ok(r.into_inner()
            .environments
            .into_iter()
            .map(|e| e.name)
            .collect())
    }

    /// Gives a sandbox back; the broker deletes it.
    pub async fn release(&self, sandbox: &str) -> Result<(), ClientError> {
        let body = pb::ReleaseRequest {
            run: Some(self.run.clone()),
            sandbox: sandbox.to_string(),
        };
        // Idempotent: a sandbox released already is gone, which the broker accepts.
        self.retrying(body, |mut c, req| async move { c.release(req).await })
            .await?;
        Ok(())
    }

    /// Reports the run's progress (written to the run's `status.progress`).
    pub async fn report_progress(&self, progress: &ProgressSnapshot) -> Result<(), ClientError> {
        let body = pb::ReportProgressRequest {
            run: Some(self.run.clone()),
            progress: Some(proto_progress(progress)),
        };
        self.retrying(
            body,
            |mut c, req| async move { c.report_progress(req).await },
        )
        .await?;
        Ok(())
    }

    /// Registers a complete checkpoint; returns the name of its Checkpoint object.
    pub async fn register_checkpoint(
        &self,
        step: i64,
        policy_version: i64,
        location: &str,
        size_bytes: i64,
        metrics: Option<&ProgressSnapshot>,
    ) -> Result<String, ClientError> {
        let body = pb::RegisterCheckpointRequest {
            run: Some(self.run.clone()),
            step,
            policy_version,
            location: location.to_string(),
            size_bytes,
            metrics: metrics.map(proto_progress),
        };
        // Idempotent: the Checkpoint's name follows from the step, and one that exists
        // already is accepted.
        let r = self
            .retrying(body, |mut c, req| async move {
                c.register_checkpoint(req).await
            })
            .await?;
        Ok(r.into_inner().checkpoint)
    }
}
