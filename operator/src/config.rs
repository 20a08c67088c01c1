//! What the operator is configured with (flags or environment; see `main.rs`), used by the
//! builders. Kept separate from the CLI so that tests and `render` build it directly.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use std::collections::BTreeMap;

/// Settings that shape the objects the operator creates.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorConfig {
    /// Image holding the static `sandbox-sidecar` binary, run as the sandbox pods' init container.
    pub sidecar_image: String,
    /// Path of the static binary inside `sidecar_image`.
    pub sidecar_binary_path: String,
    /// Trainer image, unless a run names its own.
    pub trainer_image: String,
    /// Address (URL) trainer pods dial to reach the broker, e.g.
    /// `http://selfplay-operator.selfplay-system.svc:7443`.
    pub broker_address: String,
    /// Image pull policy of the sidecar and trainer images; the cluster's default when unset.
    pub image_pull_policy: Option<String>,
    /// Most sandbox pods one namespace may hold, warm and on-demand together (0: no limit
    /// beyond each pool's `max`). Sandboxes started on demand for hundreds of environments
    /// would otherwise be bounded only by the sum of the pools' `max`.
    pub max_sandboxes_per_namespace: u32,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            sidecar_image: "ghcr.io/selfplay-dev/sandbox-sidecar:0.1.0".to_string(),
            sidecar_binary_path: "/usr/local/bin/sandbox-sidecar".to_string(),
            trainer_image: "ghcr.io/selfplay-dev/trainer:0.1.0".to_string(),
            broker_address: "http://selfplay-operator.selfplay-system.svc:7443".to_string(),
            image_pull_policy: None,
            max_sandboxes_per_namespace: 0,
        }
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// Sandbox container resources when the pool sets none (defined with the sandbox pod).
pub use selfplay_crds::sandbox_pod::default_sandbox_resources;

/// Trainer container CPU and memory when the run sets none (GPUs come from `trainer.gpus`).
pub fn default_trainer_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(quantities(&[("cpu", "4"), ("memory", "16Gi")])),
        limits: Some(quantities(&[("memory", "16Gi")])),
        ..Default::default()
    }
}

/// The sidecar-install init container's resources (defined with the sandbox pod).
pub use selfplay_crds::sandbox_pod::init_container_resources;
