//! The sandboxes of a run on one machine: bubblewrap sandboxes for pools whose repository is
//! a local directory, Docker containers for pools whose repository is an image.

use futures::future::BoxFuture;

use super::docker::DockerProvider;
use super::error::{InfraError, InfraKind};
use super::local::LocalProvider;
use super::sandbox::{Sandbox, SandboxProvider};

#[derive(Debug, Default)]
pub struct MachineProvider {
    pub local: Option<LocalProvider>,
    pub docker: Option<DockerProvider>,
}

impl MachineProvider {
    /// Whether directory pools' sandboxes are isolated (bubblewrap works here).
    pub fn isolated(&self) -> bool {
        self.local.as_ref().is_none_or(LocalProvider::isolated)
    }

    /// One line on how this machine's sandboxes are made, for the start-up screen.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(l) = &self.local {
            parts.push(if l.isolated() {
                "bubblewrap: no network, only the system and toolchain directories visible"
            } else {
                "plain processes: bubblewrap is not installed or does not work here"
            });
        }
        if self.docker.is_some() {
            parts.push(
                "Docker containers of the pool's image: no network, no capabilities, the pool's \
                 limits, removed after use",
            );
        }
        parts.join("; ")
    }
}

impl SandboxProvider for MachineProvider {
    fn acquire<'a>(&'a self, pool: &'a str) -> BoxFuture<'a, Result<Sandbox, InfraError>> {
        if let Some(l) = &self.local
            && l.pools().iter().any(|p| p == pool)
        {
            return l.acquire(pool);
        }
        match &self.docker {
            Some(d) => d.acquire(pool),
            None => Box::pin(async move {
                Err(InfraError::new(
                    InfraKind::Acquire,
                    format!("no pool named {pool:?}"),
                ))
            }),
        }
    }

    fn pools(&self) -> Vec<String> {
        let mut p: Vec<String> = self.local.iter().flat_map(|l| l.pools()).collect();
        p.extend(self.docker.iter().flat_map(|d| d.pools()));
        p
    }
}
