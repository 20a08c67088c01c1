//! A Rust client of the broker, for the trainer's cluster mode.

use std::time::Duration;

use selfplay_crds::ProgressSnapshot;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::broker_proto as pb;

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
    /// `ip:port` of the sandbox sidecar.
    pub address: String,
    /// The sidecar's auth token.
    pub token: String,
    pub workdir: String,
    pub command_timeout: Duration,
    pub test_timeout: Duration,
}

/// Talks to the broker on behalf of one run. Cheap to clone; safe to use from many tasks.
#[derive(Clone)]
pub struct BrokerClient {
    inner: pb::broker_client::BrokerClient<Channel>,
    run: pb::RunRef,
    auth: MetadataValue<tonic::metadata::Ascii>,
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
        })
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

    /// Waits up to `wait` for a Ready sandbox of `pool`.
    pub async fn acquire(&self, pool: &str, wait: Duration) -> Result<SandboxLease, ClientError> {
        let mut req = self.request(pb::AcquireRequest {
            run: Some(self.run.clone()),
            pool: pool.to_string(),
            wait_timeout_ms: wait.as_millis().min(u128::from(u64::MAX)) as u64,
        });
        req.set_timeout(wait + Duration::from_secs(10));
        let r = self.inner.clone().acquire(req).await?.into_inner();
        Ok(SandboxLease {
            sandbox: r.sandbox,
            pool: r.pool,
            address: r.address,
            token: r.token,
            workdir: r.workdir,
            command_timeout: Duration::from_secs(u64::from(r.command_timeout_seconds)),
            test_timeout: Duration::from_secs(u64::from(r.test_timeout_seconds)),
        })
    }

    /// Gives a sandbox back; the broker deletes it.
    pub async fn release(&self, sandbox: &str) -> Result<(), ClientError> {
        let req = self.request(pb::ReleaseRequest {
            run: Some(self.run.clone()),
            sandbox: sandbox.to_string(),
        });
        self.inner.clone().release(req).await?;
        Ok(())
    }

    /// Reports the run's progress (written to the run's `status.progress`).
    pub async fn report_progress(&self, progress: &ProgressSnapshot) -> Result<(), ClientError> {
        let req = self.request(pb::ReportProgressRequest {
            run: Some(self.run.clone()),
            progress: Some(proto_progress(progress)),
        });
        self.inner.clone().report_progress(req).await?;
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
        let req = self.request(pb::RegisterCheckpointRequest {
            run: Some(self.run.clone()),
            step,
            policy_version,
            location: location.to_string(),
            size_bytes,
            metrics: metrics.map(proto_progress),
        });
        Ok(self
            .inner
            .clone()
            .register_checkpoint(req)
            .await?
            .into_inner()
            .checkpoint)
    }
}
