//! `SandboxPool`: warm, use-and-destroy sandboxes of one repository environment.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::conditions::Condition;

/// A pool of sandbox pods for one repository environment. The operator keeps `warm` sandboxes
/// Ready (never more than `max` in all); each is handed to one trainer episode and deleted on
/// release or when its TTL runs out.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "selfplay.dev",
    version = "v1alpha1",
    kind = "SandboxPool",
    namespaced,
    status = "SandboxPoolStatus",
    shortname = "sbp",
    category = "selfplay",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.warm",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.template.image"),
    printcolumn(name = "Warm", type_ = "integer", json_path = ".spec.warm"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.max"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Claimed", type_ = "integer", json_path = ".status.claimed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.warm <= self.max").message("warm must not exceed max").field_path(".warm"))]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolSpec {
    /// The sandbox pod template: the repository's image and where the repository lives in it.
    pub template: SandboxTemplate,

    /// Where the repository comes from when the pool runs on one machine (`trainer local`).
    /// Ignored in a cluster, where the repository is part of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PoolSource>,

    /// Number of Ready, unclaimed sandboxes the operator keeps. Defaults to 2. With
    /// `environments`, the warm sandboxes are spread round-robin over the environments that
    /// set no `warm` of their own (the first `warm % n` get one more); a claim for an
    /// environment with no warm sandbox starts one on demand.
    #[serde(default = "default_warm")]
    #[schemars(range(min = 0, max = 1000))]
    pub warm: i32,

    /// Upper bound on sandboxes of this pool, claimed or not. Defaults to 16.
    #[serde(default = "default_max")]
    #[schemars(range(min = 1, max = 10000))]
    pub max: i32,

    /// A sandbox older than this is deleted, claimed or not. Defaults to 3600 (one hour).
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 60, max = 604800))]
    pub sandbox_ttl_seconds: i64,

    /// Timeout of one agent command (bash call) in a sandbox. Defaults to 120.
    #[serde(default = "default_command_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub command_timeout_seconds: i32,

    /// Timeout of one run of a test script during validation and evaluation. Defaults to 600.
    #[serde(default = "default_test_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub test_timeout_seconds: i32,

    /// Repository environments of this pool, each its own image (and, optionally, working
    /// directory and activation); the template gives everything else. Injector episodes are
    /// spread over them evenly; a bug's solvers run in its environment. Empty: the template's
    /// image is the pool's one environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub environments: Vec<Environment>,

    /// More environments, from a list in SWE-bench's instance format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments_from: Option<EnvironmentsSource>,

    /// Port the sandbox sidecar listens on inside the pod. Defaults to 7070.
    #[serde(default = "default_sidecar_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub sidecar_port: i32,
}

/// The pod template of one repository environment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.profile) || self.profile != 'ImageUser' || has(self.runtimeClassName)").message("profile ImageUser runs the image's own user (root included) and needs a sandboxed runtimeClassName (gVisor, Kata)").field_path(".profile"))]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplate {
    /// Container image with the repository and its dependencies installed.
    #[schemars(length(min = 1))]
    pub image: String,

    /// Image pull policy (`Always`, `IfNotPresent`, `Never`). Defaults to the cluster's rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Absolute path of the repository inside the image; the sidecar's workspace. Defaults to `/workspace`.
    #[serde(default = "default_workdir")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("workdir must be an absolute path"))]
    pub workdir: String,

    /// Environment variables of the sandbox container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Compute resources of the sandbox container. Defaults to 1 CPU and 2Gi of memory, limits included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// RuntimeClass for stronger isolation (gVisor, Kata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,

    /// Node selector of sandbox pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of sandbox pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Extra labels on sandbox pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,

    /// Extra annotations on sandbox pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,

    /// Non-root user the sandbox runs as under the `Isolated` profile. Defaults to 65532.
    #[serde(default = "default_run_as_user")]
    #[schemars(range(min = 1))]
    pub run_as_user: i64,

    /// Who the sandbox runs as and how it gets a writable repository. `Isolated` (the
    /// default): `runAsUser`, never root; an init container copies `workdir` out of the image
    /// into a volume mounted at the same path, owned by that user, so images whose repository
    /// is root-owned (SWE-bench's `/testbed`) work, development-mode installs included.
    /// `ImageUser`: the image's own user, root included, with the repository used in place;
    /// only with a sandboxed `runtimeClassName` (gVisor, Kata), which it requires.
    #[serde(default)]
    pub profile: SandboxProfile,

    /// Shell code that sets up the repository's environment, run once by bash when the
    /// sandbox starts; the environment it leaves is every command's (e.g. `source
    /// /opt/miniconda3/bin/activate testbed` for SWE-bench's images). Unset: under
    /// `ImageUser`, the user's `~/.bashrc` when it is readable; under `Isolated`, nothing
    /// (root's start-up files are not readable to the sandbox's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub shell_init: Option<String>,

    /// Size limit of the volume holding the repository copy (`Isolated`). Defaults to 8Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_size_limit: Option<Quantity>,
}

/// One repository environment of a pool: an image holding the repository and its
/// dependencies, laid out as the template says unless overridden here.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Environment {
    /// Unique in the pool; a label value (sandboxes carry it as `selfplay.dev/environment`).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Where the repository lives in this image; the template's `workdir` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("workdir must be an absolute path"))]
    pub workdir: Option<String>,
    /// This image's environment activation; the template's `shellInit` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub shell_init: Option<String>,
    /// Ready, unclaimed sandboxes kept for this environment alone, instead of a share of the
    /// pool's `warm`. `0` keeps none: every claim starts one on demand (cold start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub warm: Option<i32>,
}

/// Environments listed in SWE-bench's instance format: a JSON array or JSON Lines of objects
/// with `instance_id` and either `image_name` (SWE-smith, SWE-Gym, R2E-Gym) or the image
/// derived from `instance_id` by `imagePattern`; `repo`, `version` and `base_commit` are kept
/// for reference; `FAIL_TO_PASS`, `PASS_TO_PASS`, `problem_statement` and the patches are
/// ignored by self-play (the policy writes its own bugs).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentsSource {
    /// A file on this machine (`trainer local`); relative to the run file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A key of a ConfigMap in the pool's namespace (a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,
    /// Image of an instance without `image_name`; `{id}` is the instance id as SWE-bench
    /// names its images (`__` becomes `_1776_`, lower case). Defaults to
    /// `swebench/sweb.eval.x86_64.{id}:latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pattern: Option<String>,
    /// Working directory of these images. Defaults to `/testbed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Activation of these images. Defaults to SWE-bench's
    /// `source /opt/miniconda3/bin/activate && conda activate testbed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell_init: Option<String>,
}

/// A key of a ConfigMap.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    pub name: String,
    pub key: String,
}

/// Who a sandbox runs as; see [`SandboxTemplate::profile`].
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum SandboxProfile {
    /// A fixed non-root user on a copy of the repository.
    #[default]
    Isolated,
    /// The image's own user on the repository in place; needs a sandboxed runtime class.
    ImageUser,
}

/// `Always`, `IfNotPresent` or `Never`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Where a pool's repository comes from outside a cluster.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PoolSource {
    /// A local directory holding the repository; each sandbox gets a fresh copy of it.
    /// Relative paths are resolved against the run file's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_path: Option<String>,
    /// Host directories a local sandbox sees, read-only, for the repository's tools (an
    /// interpreter environment, a compiler): each directory's `bin` (or the directory
    /// itself) goes on the sandbox's PATH. Empty: the toolchain of the PATH the trainer
    /// runs with. Nothing else of the host is visible but the system directories (/usr,
    /// /etc). Relative paths are resolved against the run file's directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub toolchain: Vec<String>,
}

/// Observed state of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolStatus {
    /// Sandbox pods that exist and are not being deleted.
    #[serde(default)]
    pub replicas: i32,
    /// Sandbox pods that are Ready and unclaimed.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Sandbox pods handed to a trainer.
    #[serde(default)]
    pub claimed: i32,
    /// Label selector of the pool's pods, for the `/scale` subresource.
    #[serde(default)]
    pub selector: String,
    /// Hash of the pod template the current sandboxes were made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

fn default_warm() -> i32 {
    2
}
fn default_max() -> i32 {
    16
}
fn default_ttl() -> i64 {
    3600
}
fn default_command_timeout() -> i32 {
    120
}
fn default_test_timeout() -> i32 {
    600
}
pub fn default_sidecar_port() -> i32 {
    7070
}
fn default_workdir() -> String {
    "/workspace".to_string()
}
fn default_run_as_user() -> i64 {
    65532
}
