//! The selfplay API, group `selfplay.dev`, version `v1alpha1`.
//!
//! Three kinds: [`SelfPlayRun`] (one training run), [`SandboxPool`] (warm sandboxes of one
//! repository environment) and [`Checkpoint`] (one saved model). The CRD YAML under
//! `crds/generated/` is generated from these types with `cargo run -p selfplay-crds --bin crdgen`;
//! a test fails when the committed YAML drifts from the types.

// `#[kube(printcolumn(type_ = "string", ...))]` repeats the same key for every column, which
// clippy mistakes for a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod checkpoint;
pub mod conditions;
pub mod environments;
pub mod pool;
pub mod run;
pub mod sandbox_pod;
pub mod validate;

pub use checkpoint::{Checkpoint, CheckpointSpec, CheckpointStatus};
pub use conditions::{Condition, ConditionStatus, ConditionType};
pub use pool::{
    Environment, EnvironmentsSource, SandboxPool, SandboxPoolSpec, SandboxPoolStatus,
    SandboxProfile, SandboxTemplate,
};
pub use run::{ProgressSnapshot, RunPhase, SelfPlayRun, SelfPlayRunSpec, SelfPlayRunStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every selfplay kind.
pub const GROUP: &str = "selfplay.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The API version string (`group/version`).
pub const API_VERSION: &str = "selfplay.dev/v1alpha1";

/// All CRDs of the API, in a stable order (the order `crdgen` writes them).
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![SelfPlayRun::crd(), SandboxPool::crd(), Checkpoint::crd()]
}

/// The file name a CRD is written to under `crds/generated/` (and the chart's `crds/`).
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Renders a CRD as the YAML `crdgen` writes, with a header saying where it came from.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated from the Rust types in crds/src by `cargo run -p selfplay-crds --bin crdgen`.\n# Do not edit by hand.\n{body}"
    ))
}
