//! Label keys, annotation keys and object names shared by the builders, the controllers
//! and the broker. Child objects are found by these labels, so they are the contract
//! between the operator's parts (and with the chart's NetworkPolicy and dashboards).

use std::collections::BTreeMap;

/// Field manager of everything the controllers apply, and the finalizer prefix.
pub const MANAGER: &str = "selfplay-operator";
/// Field manager of `status.progress`, written by the broker; distinct from [`MANAGER`]
/// so that server-side apply of the rest of the status never removes it.
pub const BROKER_MANAGER: &str = "selfplay-broker";
/// Finalizer on SelfPlayRuns and SandboxPools.
pub const FINALIZER: &str = "selfplay.dev/cleanup";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `sandbox`, `trainer`, `pool-token`, `run-token`, `trainer-config`, `sandbox-policy`.
pub const LABEL_COMPONENT: &str = "selfplay.dev/component";
pub const LABEL_POOL: &str = "selfplay.dev/pool";
pub const LABEL_RUN: &str = "selfplay.dev/run";
/// On a sandbox pod of a pool with environments: the environment it was made for.
pub const LABEL_ENVIRONMENT: &str = "selfplay.dev/environment";
pub const LABEL_TEMPLATE_HASH: &str = "selfplay.dev/template-hash";
/// Trainer attempt: `status.restarts` when the trainer pod was created.
pub const LABEL_ATTEMPT: &str = "selfplay.dev/attempt";
/// Set on a sandbox pod when the broker hands it out: the claiming run's name.
pub const LABEL_CLAIMED_BY: &str = "selfplay.dev/claimed-by";
/// Set with `claimed-by`: the claiming run's trainer attempt (`status.restarts`).
pub const LABEL_CLAIM_ATTEMPT: &str = "selfplay.dev/claim-attempt";
/// Set with `claimed-by`: the claiming run's UID, so that a run recreated under the same
/// name does not inherit the old one's sandboxes.
pub const ANNOTATION_CLAIM_RUN_UID: &str = "selfplay.dev/claim-run-uid";
/// Namespace/name of the claiming run and the claim time (RFC 3339).
pub const ANNOTATION_CLAIM: &str = "selfplay.dev/claim";
/// On a Checkpoint created by the broker: its size in bytes, as reported by the trainer.
pub const ANNOTATION_SIZE_BYTES: &str = "selfplay.dev/size-bytes";
/// On a Checkpoint created by the broker: when the trainer registered it (RFC 3339).
pub const ANNOTATION_REGISTERED_AT: &str = "selfplay.dev/registered-at";

pub const COMPONENT_SANDBOX: &str = "sandbox";
pub const COMPONENT_TRAINER: &str = "trainer";

/// Key of the token in both token Secrets, and the sandbox pod's paths and names: defined
/// with the sandbox pod in the API crate (the trainer runs the same pod on one machine).
pub use selfplay_crds::sandbox_pod::{
    SANDBOX_TOKEN_DIR, SANDBOX_TOKEN_FILE, SIDECAR_BIN, SIDECAR_BIN_DIR, SIDECAR_PORT_NAME,
    TOKEN_KEY,
};
/// Where the trainer pod finds the run file, and the model PVC.
pub const TRAINER_CONFIG_DIR: &str = "/etc/selfplay";
pub const TRAINER_RUN_FILE: &str = "/etc/selfplay/run.yaml";
pub const MODEL_DIR: &str = "/model";
/// Trainer pod's metrics port.
pub const TRAINER_METRICS_PORT: i32 = 9090;

/// Longest name of a pool or run: both are label values.
pub const MAX_LABEL_VALUE: usize = 63;

pub fn pool_token_secret(pool: &str) -> String {
    format!("{pool}-sandbox-token")
}
pub fn pool_network_policy(pool: &str) -> String {
    format!("{pool}-sandbox")
}
/// Prefix of sandbox pod names (`generateName`).
pub fn sandbox_pod_prefix(pool: &str) -> String {
    format!("{pool}-")
}
pub fn run_token_secret(run: &str) -> String {
    format!("{run}-trainer-token")
}
pub fn trainer_config_map(run: &str) -> String {
    format!("{run}-trainer")
}
pub fn trainer_pod(run: &str, attempt: i32) -> String {
    format!("{run}-trainer-{attempt}")
}
/// Name of the Checkpoint the broker creates for a run's step.
pub fn checkpoint_name(run: &str, step: i64) -> String {
    format!("{run}-step-{step}")
}

/// The labels by which a pool's sandbox pods are selected (also `status.selector`).
pub fn sandbox_selector_labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_COMPONENT.to_string(), COMPONENT_SANDBOX.to_string()),
        (LABEL_POOL.to_string(), pool.to_string()),
    ])
}

/// The labels by which a run's trainer pods are selected.
pub fn trainer_selector_labels(run: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_COMPONENT.to_string(), COMPONENT_TRAINER.to_string()),
        (LABEL_RUN.to_string(), run.to_string()),
    ])
}

/// `k=v,k=v` for list calls and `/scale`.
pub fn selector_string(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels every object the operator creates carries.
pub fn common_labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), app.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
    ])
}
