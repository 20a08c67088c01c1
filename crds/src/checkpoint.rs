//! `Checkpoint`: one saved model of a run.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::conditions::Condition;
use crate::run::ProgressSnapshot;

/// One saved model: weights, optimiser state, step and policy version. `Ready` once complete.
/// A run can start from one (`spec.resumeFrom`). The spec is immutable.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "selfplay.dev",
    version = "v1alpha1",
    kind = "Checkpoint",
    namespaced,
    status = "CheckpointStatus",
    shortname = "spckpt",
    category = "selfplay",
    derive = "PartialEq",
    printcolumn(name = "Run", type_ = "string", json_path = ".spec.runName"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".spec.step"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Location",
        type_ = "string",
        json_path = ".spec.location",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Checkpoint's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// The `SelfPlayRun` that wrote this checkpoint.
    #[schemars(length(min = 1, max = 253))]
    pub run_name: String,
    /// Training step the checkpoint was taken after.
    #[schemars(range(min = 0))]
    pub step: i64,
    /// Policy version of the weights.
    #[schemars(range(min = 0))]
    pub policy_version: i64,
    /// Directory holding the checkpoint (`model.safetensors`, `config.json`, `optimizer.safetensors`, `trainer_state.json`).
    #[schemars(length(min = 1))]
    pub location: String,
    /// PersistentVolumeClaim the location is on, when it is on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// Training metrics at that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ProgressSnapshot>,
}

/// Observed state of a checkpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStatus {
    /// Bytes on storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// When the checkpoint was complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
