//! Where sandboxes come from. A [`SandboxProvider`] hands out [`Sandbox`]es: use-and-destroy
//! workspaces on one repository (a pool), each with a connected sidecar client. The local
//! provider ([`super::local::LocalProvider`]) spawns sidecar processes on this machine; on
//! Kubernetes the operator's broker hands out sandbox pods.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use sandbox_sidecar::SidecarClient;

use super::error::InfraError;

/// Tears one sandbox down. Dropping a lease without [`Lease::release`] must still clean up
/// (synchronously, best effort): an episode that panics leaves no process behind.
pub trait Lease: Send + Sync {
    fn release(self: Box<Self>) -> BoxFuture<'static, Result<(), InfraError>>;

    /// After the sandbox broke: why, when the agent inside cannot have caused it (a container
    /// killed from outside). `None` (the default) leaves the failure to the agent.
    fn external_failure(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}

/// One sandbox: a workspace holding a fresh copy of a repository, served by a sidecar.
pub struct Sandbox {
    id: String,
    pool: String,
    client: SidecarClient,
    workspace: Option<PathBuf>,
    lease: Option<Box<dyn Lease>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("pool", &self.pool)
            .field("addr", &self.client.addr())
            .field("workspace", &self.workspace)
            .finish()
    }
}

impl Sandbox {
    pub fn new(
        id: impl Into<String>,
        pool: impl Into<String>,
        client: SidecarClient,
        workspace: Option<PathBuf>,
        lease: Box<dyn Lease>,
    ) -> Self {
        Self {
            id: id.into(),
            pool: pool.into(),
            client,
            workspace,
            lease: Some(lease),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The connected sidecar client; the engine drives the sandbox only through it.
    pub fn client(&self) -> &SidecarClient {
        &self.client
    }

    /// The workspace on this machine's file system, when the provider is local.
    pub fn workspace_path(&self) -> Option<&Path> {
        self.workspace.as_deref()
    }

    /// Why the sandbox broke, when its agent cannot have caused it (see
    /// [`Lease::external_failure`]).
    pub async fn external_failure(&self) -> Option<String> {
        match &self.lease {
            Some(l) => l.external_failure().await,
            None => None,
        }
    }

    /// Tears the sandbox down (processes, files, or the pod).
    pub async fn release(mut self) -> Result<(), InfraError> {
        match self.lease.take() {
            Some(l) => l.release().await,
            None => Ok(()),
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The lease's own Drop cleans up synchronously.
        drop(self.lease.take());
    }
}

/// Hands out sandboxes. Every error is an infrastructure error: it masks the episode that
/// needed the sandbox, it never punishes the policy.
pub trait SandboxProvider: Send + Sync {
    /// A fresh sandbox on `pool`'s repository.
    fn acquire<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Sandbox, InfraError>>;

    /// The pools this provider serves.
    fn pools(&self) -> Vec<String>;
}
