//! `SelfPlayRun`: one self-play training run.
//!
//! Field names follow DESIGN.md and `shared/reference/method.md` (SSR, Wei et al. 2025):
//! α and the solver group size G of the injector reward, the consistency thresholds, and the
//! GRPO settings (ε_low / ε_high clip-higher, `maxStaleness`, truncation policy).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::conditions::Condition;

/// A self-play training run: one policy plays bug injector and bug solver on the
/// repositories of `pools`, trained with GRPO.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "selfplay.dev",
    version = "v1alpha1",
    kind = "SelfPlayRun",
    namespaced,
    status = "SelfPlayRunStatus",
    shortname = "spr",
    category = "selfplay",
    derive = "PartialEq",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.progress.step"),
    printcolumn(
        name = "Solve",
        type_ = "number",
        json_path = ".status.progress.solveRate"
    ),
    printcolumn(
        name = "Valid",
        type_ = "number",
        json_path = ".status.progress.injectorValidityRate"
    ),
    printcolumn(
        name = "Checkpoint",
        type_ = "string",
        json_path = ".status.latestCheckpoint"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SelfPlayRunSpec {
    /// The policy's starting weights and tokenizer. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("model is immutable"))]
    pub model: ModelSource,

    /// The sandbox pools (repositories) the run trains on. Immutable.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("pools is immutable"))]
    pub pools: Vec<PoolRef>,

    /// Self-play settings: rewards, validation thresholds, episode budgets, sampling.
    #[serde(default)]
    pub self_play: SelfPlaySettings,

    /// Optimiser and GRPO settings.
    #[serde(default)]
    pub training: TrainingSettings,

    /// Where and how the trainer runs.
    #[serde(default)]
    pub trainer: TrainerSettings,

    /// When and where checkpoints are written.
    #[serde(default)]
    pub checkpoint: CheckpointPolicy,

    /// A held-out task set the trainer evaluates the policy on every `everySteps` steps (the
    /// solver role only, graded as in training); unset evaluates nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<EvaluationSettings>,

    /// Suspends the run: the trainer is removed and resumes from the latest Ready checkpoint
    /// when set back to false. Defaults to false.
    #[serde(default)]
    pub suspend: bool,

    /// Wall-clock limit of the run in seconds, suspended time excluded; past it the run Fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the run finished (Succeeded or Failed, from `status.completionTime`) at
    /// which the operator deletes it, and with it its trainer pod, ConfigMap, token Secret and
    /// Checkpoint objects (owner references); checkpoint files on a PVC stay. 0 deletes it as
    /// soon as it finished; unset keeps it. Like a Job's field of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Name of a `Checkpoint` in the run's namespace to start from instead of `model`'s weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub resume_from: Option<String>,

    /// Trainer restarts (after a failed trainer pod) before the run Fails. Defaults to 3.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: i32,
}

impl SelfPlayRunSpec {
    /// Whether the run may use sandboxes of pool `name`: one of `pools` (trained on) or the
    /// pool of `evaluation` (evaluated on only).
    pub fn uses_pool(&self, name: &str) -> bool {
        self.pools.iter().any(|p| p.name == name)
            || self.evaluation.as_ref().is_some_and(|e| e.pool == name)
    }
}

/// The policy's weights and tokenizer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("has(self.path) != has(self.tiny)").message("exactly one of model.path and model.tiny must be set"))]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// Directory of a Hugging Face Qwen2-family model (`config.json`, `*.safetensors`,
    /// `tokenizer.json`). In a cluster, a path inside the `pvc` volume (mounted at `/model`);
    /// on one machine, a local directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub path: Option<String>,

    /// PersistentVolumeClaim holding the model, mounted read-only at `/model` in the trainer pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,

    /// Path of `tokenizer.json` when it is not in `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,

    /// Dtype the weights are trained in. Defaults to `bf16`.
    #[serde(default)]
    pub dtype: ModelDtype,

    /// A tiny randomly initialised model instead of `path`, for tests and smoke runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiny: Option<TinyModel>,
}

/// Weight dtype.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum ModelDtype {
    F32,
    #[default]
    Bf16,
}

/// A tiny Qwen2-shaped model built from a seed, with a byte-level vocabulary.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TinyModel {
    /// Seed of the initial weights. Defaults to 0.
    #[serde(default)]
    pub seed: u64,
    /// Hidden size. Defaults to 64.
    #[serde(default = "default_tiny_hidden")]
    #[schemars(range(min = 8, max = 4096))]
    pub hidden_size: i32,
    /// Number of decoder layers. Defaults to 2.
    #[serde(default = "default_tiny_layers")]
    #[schemars(range(min = 1, max = 64))]
    pub num_layers: i32,
}

impl Default for TinyModel {
    fn default() -> Self {
        Self {
            seed: 0,
            hidden_size: default_tiny_hidden(),
            num_layers: default_tiny_layers(),
        }
    }
}

/// A pool the run draws sandboxes from.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRef {
    /// Name of a `SandboxPool` in the run's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Relative share of injector episodes on this pool. Defaults to 1.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
}

/// What the engine does with a tool call it cannot parse.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum FormatErrorPolicy {
    /// Reply with an error observation and go on (the turn still counts).
    #[default]
    Observe,
    /// End the episode with end reason `format_error`.
    EndEpisode,
}

/// Self-play settings (SSR; DESIGN.md steps 1–5).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SelfPlaySettings {
    /// α of the injector reward: −α when the solve rate is 0 or 1, 1 − (1+α)·s otherwise. Defaults to 0.8.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub alpha: f64,

    /// G: solver attempts per valid bug (the GRPO group). Defaults to 8.
    #[serde(default = "default_group_size")]
    #[schemars(range(min = 2, max = 256))]
    pub solver_group_size: i32,

    /// Injector episodes per training step. Defaults to 8.
    #[serde(default = "default_injectors_per_step")]
    #[schemars(range(min = 1, max = 4096))]
    pub injector_episodes_per_step: i32,

    /// Consistency check 3: tests that must pass on the original code. Defaults to 2.
    #[serde(default = "default_min_passing")]
    #[schemars(range(min = 1))]
    pub min_passing_tests: i32,

    /// Consistency check 5: previously passing tests the bug must break. Defaults to 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub min_failing_tests: i32,

    /// Consistency check 4: code files the bug must change. Defaults to 1.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub min_changed_files: i32,

    /// Consistency check 7: at most this many bug files are reverted one by one. Defaults to 8.
    #[serde(default = "default_inverse_files")]
    #[schemars(range(min = 1, max = 256))]
    pub max_inverse_mutation_files: i32,

    /// Turns (tool calls) per episode. Defaults to 40.
    #[serde(default = "default_max_turns")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_turns: i32,

    /// Tokens per episode, prompt and observations included. Defaults to 32768.
    #[serde(default = "default_max_tokens")]
    #[schemars(range(min = 64, max = 1048576))]
    pub max_tokens: i32,

    /// Tokens the policy may write in one turn. Defaults to 2048.
    #[serde(default = "default_max_turn_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_tokens_per_turn: i32,

    /// Turn failed solver patches into order-2 bugs. Defaults to true.
    #[serde(default = "default_true")]
    pub higher_order_bugs: bool,

    /// Sampling temperature. Defaults to 1.0.
    #[serde(default = "default_one_f")]
    #[schemars(range(min = 0.0, max = 4.0))]
    pub temperature: f64,

    /// Nucleus sampling: the smallest token set with this much probability. Defaults to 1.0.
    #[serde(default = "default_one_f")]
    #[schemars(range(min = 0.0, max = 1.0))]
    #[x_kube(validation = Rule::new("self > 0.0").message("topP must be greater than 0"))]
    pub top_p: f64,

    /// What a malformed tool call does. Defaults to `Observe`.
    #[serde(default)]
    pub format_error_policy: FormatErrorPolicy,

    /// Prompt templates in place of the bundled ones (docs/prompts.md); each one left out
    /// keeps the bundled text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<PromptTemplates>,
}

/// The engine's prompt templates, `{{name}}` placeholders filled by the engine. A template
/// must hold the placeholders that carry the task (the solver's test diff, the tool output);
/// an unknown placeholder is refused when the trainer starts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PromptTemplates {
    /// The tool documentation, inserted where another template says `{{tools}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub tools: Option<String>,
    /// The injector's task: `{{tools}}`, `{{artifacts_dir}}`, `{{min_passing_tests}}`,
    /// `{{min_failing_tests}}`, `{{min_changed_files}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('{{artifacts_dir}}')").message("the injector template must name {{artifacts_dir}}, where its artifacts go"))]
    pub injector: Option<String>,
    /// The solver's task in self-play: `{{tools}}`, `{{task_diff}}` (the restored tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('{{task_diff}}')").message("the solver template must show {{task_diff}}, the solver's task"))]
    pub solver: Option<String>,
    /// The solver's task in held-out evaluation: `{{tools}}`, `{{problem_statement}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('{{problem_statement}}')").message("the solverIssue template must show {{problem_statement}}, the task"))]
    pub solver_issue: Option<String>,
    /// A tool result: `{{output}}`, `{{budget}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('{{output}}')").message("the observation template must show {{output}}, the tool's output"))]
    pub observation: Option<String>,
    /// A malformed tool call: `{{error}}`, `{{budget}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('{{error}}')").message("the formatError template must show {{error}}, what was wrong"))]
    pub format_error: Option<String>,
}

impl Default for SelfPlaySettings {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            solver_group_size: default_group_size(),
            injector_episodes_per_step: default_injectors_per_step(),
            min_passing_tests: default_min_passing(),
            min_failing_tests: 1,
            min_changed_files: 1,
            max_inverse_mutation_files: default_inverse_files(),
            max_turns: default_max_turns(),
            max_tokens: default_max_tokens(),
            max_tokens_per_turn: default_max_turn_tokens(),
            higher_order_bugs: true,
            temperature: 1.0,
            top_p: 1.0,
            format_error_policy: FormatErrorPolicy::Observe,
            prompts: None,
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    Cosine,
}

/// What happens to an episode that ran out of turns or tokens.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum TruncationMode {
    /// Masked out of the loss (DeepSWE compact filtering).
    #[default]
    Mask,
    /// The workspace diff is submitted as is and its reward multiplied by `discount` (SWE-Master).
    ForceSubmit,
}

/// Policy for truncated episodes.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TruncationPolicy {
    /// `Mask` or `ForceSubmit`. Defaults to `Mask`.
    #[serde(default)]
    pub mode: TruncationMode,
    /// Reward factor of a force-submitted episode. Defaults to 0.5.
    #[serde(default = "default_half")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub discount: f64,
}

impl Default for TruncationPolicy {
    fn default() -> Self {
        Self {
            mode: TruncationMode::Mask,
            discount: 0.5,
        }
    }
}

/// A penalty that grows with the turns an episode takes past a threshold (Nebius).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepPenalty {
    /// Turns that are free.
    #[schemars(range(min = 0))]
    pub after_turns: i32,
    /// Reward subtracted per turn past `afterTurns`.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub per_turn: f64,
}

/// Optimiser and GRPO settings (method.md, "The GRPO variant").
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.epsHigh >= self.epsLow").message("epsHigh must be at least epsLow").field_path(".epsHigh"))]
#[serde(rename_all = "camelCase")]
pub struct TrainingSettings {
    /// Peak learning rate of AdamW. Defaults to 1e-6.
    #[serde(default = "default_lr")]
    #[schemars(range(min = 0.0, max = 1.0))]
    #[x_kube(validation = Rule::new("self > 0.0").message("learningRate must be greater than 0"))]
    pub learning_rate: f64,

    /// `constant` or `cosine` after warmup. Defaults to `constant`.
    #[serde(default)]
    pub lr_schedule: LrSchedule,

    /// Linear warmup steps. Defaults to 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: i64,

    /// Training steps of the run; the run Succeeds after the last. Defaults to 1000.
    #[serde(default = "default_total_steps")]
    #[schemars(range(min = 1))]
    pub total_steps: i64,

    /// Lower PPO clip ε_low: ratios below 1−ε_low are clipped. Defaults to 0.2.
    #[serde(default = "default_eps_low")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub eps_low: f64,

    /// Upper PPO clip ε_high (clip-higher): ratios above 1+ε_high are clipped. Defaults to 0.28.
    #[serde(default = "default_eps_high")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub eps_high: f64,

    /// Dual-clip constant c for negative advantages (loss ≤ −A·c); off when unset. Typical: 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub dual_clip: Option<f64>,

    /// Coefficient of an optional KL penalty to the initial policy. Defaults to 0 (no KL term).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub kl_coef: f64,

    /// Cap C of the truncated importance weight min(exp(log π_trainer − log π_sampler), C)
    /// that corrects each policy token's loss for the difference between the sampler's
    /// log-prob and the trainer's (different kernels, stale weights). Defaults to 2.
    #[serde(default = "default_is_cap")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub importance_sampling_cap: f64,

    /// Samples more than this many policy versions old are not trained on. Defaults to 8.
    #[serde(default = "default_staleness")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_staleness: i32,

    /// Sequences per forward/backward micro-batch at most. Defaults to 4.
    #[serde(default = "default_micro_batch")]
    #[schemars(range(min = 1, max = 4096))]
    pub micro_batch_size: i32,

    /// Tokens per forward/backward micro-batch at most: its sequences are packed end to end
    /// (no padding); a longer sequence is a micro-batch of its own. Training memory grows
    /// with this, not with the number of sequences. Defaults to 8192.
    #[serde(default = "default_micro_batch_tokens")]
    #[schemars(range(min = 1))]
    pub micro_batch_tokens: i32,

    /// What happens to truncated episodes.
    #[serde(default)]
    pub truncation: TruncationPolicy,

    /// Optional penalty per turn past a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_penalty: Option<StepPenalty>,

    /// Global gradient-norm clip. Defaults to 1.0.
    #[serde(default = "default_one_f")]
    #[schemars(range(min = 0.0))]
    pub max_grad_norm: f64,

    /// AdamW weight decay. Defaults to 0.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,

    /// AdamW β1. Defaults to 0.9.
    #[serde(default = "default_beta1")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub adam_beta1: f64,

    /// AdamW β2. Defaults to 0.999.
    #[serde(default = "default_beta2")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub adam_beta2: f64,

    /// Seed of sampling and of everything random in the trainer. Defaults to 0.
    #[serde(default)]
    pub seed: u64,
}

impl Default for TrainingSettings {
    fn default() -> Self {
        Self {
            learning_rate: default_lr(),
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            total_steps: default_total_steps(),
            eps_low: default_eps_low(),
            eps_high: default_eps_high(),
            dual_clip: None,
            kl_coef: 0.0,
            importance_sampling_cap: default_is_cap(),
            max_staleness: default_staleness(),
            micro_batch_size: default_micro_batch(),
            micro_batch_tokens: default_micro_batch_tokens(),
            truncation: TruncationPolicy::default(),
            step_penalty: None,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: default_beta1(),
            adam_beta2: default_beta2(),
            seed: 0,
        }
    }
}

/// Where the trainer runs.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainerSettings {
    /// Trainer image. Defaults to the operator's configured trainer image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// GPUs of the trainer (`nvidia.com/gpu`). Defaults to 1.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 0, max = 64))]
    pub gpus: i32,
    /// Trainer nodes. Only 1 is supported today; more is refused by `trainer local` and
    /// reported as Degraded by the operator. Defaults to 1.
    #[serde(default = "default_nodes")]
    #[schemars(range(min = 1, max = 1024))]
    pub nodes: i32,
    /// CPU and memory of the trainer container (GPUs come from `gpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the trainer pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the trainer pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Concurrent episodes (sandboxes held at once). Defaults to 8.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 4096))]
    pub concurrency: i32,
}

impl Default for TrainerSettings {
    fn default() -> Self {
        Self {
            image: None,
            gpus: default_gpus(),
            nodes: default_nodes(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            concurrency: default_concurrency(),
        }
    }
}

/// When and where checkpoints are written.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointPolicy {
    /// A checkpoint every this many steps (and after the last). Defaults to 50.
    #[serde(default = "default_every")]
    #[schemars(range(min = 1))]
    pub every_steps: i64,
    /// Checkpoints kept; older ones are deleted. Defaults to 3.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: i32,
    /// Where checkpoints are stored.
    #[serde(default)]
    pub storage: CheckpointStorage,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_steps: default_every(),
            keep_last: default_keep(),
            storage: CheckpointStorage::default(),
        }
    }
}

/// Checkpoint storage.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStorage {
    /// PersistentVolumeClaim mounted at `path` in the trainer pod; an `emptyDir` when unset
    /// (checkpoints then do not survive the pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<String>,
    /// Directory of the checkpoints (`<path>/<run>/step-N`). Defaults to `/checkpoints`.
    #[serde(default = "default_ckpt_path")]
    #[schemars(length(min = 1))]
    pub path: String,
}

impl Default for CheckpointStorage {
    fn default() -> Self {
        Self {
            pvc: None,
            path: default_ckpt_path(),
        }
    }
}

/// Held-out evaluation during a run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.tasks.file) != has(self.tasks.configMap)").message("exactly one of evaluation.tasks.file and evaluation.tasks.configMap must be set").field_path(".tasks"))]
#[serde(rename_all = "camelCase")]
pub struct EvaluationSettings {
    /// The task set, in SWE-bench's instance format (a JSON array or JSON Lines).
    pub tasks: EvaluationTasks,
    /// The SandboxPool the tasks run in (its repository or, for a pool with environments,
    /// the environment of each task's `image_name`). It need not be one of `spec.pools`: a
    /// pool only evaluated on is held out from training.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Evaluate every this many steps (and after the last step). Defaults to 50.
    #[serde(default = "default_eval_every")]
    #[schemars(range(min = 1))]
    pub every_steps: i64,
    /// Attempts per task (`k` of pass@k). Defaults to 1.
    #[serde(default = "default_eval_attempts")]
    #[schemars(range(min = 1, max = 64))]
    pub attempts: i32,
    /// Tasks evaluated each time, the first ones of the set (0: all). Defaults to 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_tasks: i32,
}

/// Where a task set comes from.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationTasks {
    /// A file on this machine (`trainer local`); relative to the run file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A key of a ConfigMap in the run's namespace (a cluster): mounted into the trainer pod at
    /// [`EVALUATION_TASKS_FILE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<crate::pool::ConfigMapKey>,
}

/// Where the trainer pod finds the task set of `evaluation.tasks.configMap`: a directory of its
/// own, not under the run file's ConfigMap volume (a mount point inside another ConfigMap
/// volume would have to be created in a read-only, kubelet-managed directory).
pub const EVALUATION_TASKS_FILE: &str = "/etc/selfplay-evaluation/tasks.jsonl";

fn default_eval_every() -> i64 {
    50
}

fn default_eval_attempts() -> i32 {
    1
}

/// Lifecycle phase of a run.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    Pending,
    Running,
    Suspended,
    Succeeded,
    Failed,
}

impl RunPhase {
    /// Succeeded and Failed are terminal and sticky.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// A bounded snapshot of training progress; history lives in Prometheus and Checkpoints.
/// `trainer local` writes the same object to `status.json`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProgressSnapshot {
    /// Completed training steps.
    pub step: i64,
    /// Policy version (number of optimiser updates applied).
    pub policy_version: i64,
    /// Fraction of solver episodes that solved their bug, last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solve_rate: Option<f64>,
    /// Fraction of injector episodes whose artifacts passed validation, last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injector_validity_rate: Option<f64>,
    /// The consistency check that failed most often, last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_failed_check: Option<String>,
    /// Mean solver reward, last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reward_solver: Option<f64>,
    /// Mean injector reward, last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reward_injector: Option<f64>,
    /// Generated tokens per second, last step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Sandbox (infrastructure) errors, last step.
    #[serde(default)]
    pub sandbox_errors: i64,
    /// Loss of the last update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Solve rate on the held-out task set (`spec.evaluation`), at its latest evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_solve_rate: Option<f64>,
    /// The step after which the held-out solve rate was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heldout_step: Option<i64>,
    /// When the trainer last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Time>,
}

/// Observed state of a run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SelfPlayRunStatus {
    /// `Pending`, `Running`, `Suspended`, `Succeeded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RunPhase>,
    /// Latest progress reported by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ProgressSnapshot>,
    /// Name of the latest Ready `Checkpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_checkpoint: Option<String>,
    /// When the trainer first started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Trainer restarts so far.
    #[serde(default)]
    pub restarts: i32,
    /// When the trainer may be restarted next (backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_restart_time: Option<Time>,
    /// Seconds spent suspended since the trainer first started; not counted against
    /// `activeDeadlineSeconds`.
    #[serde(default)]
    pub suspended_seconds: i64,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Progressing`, `Succeeded`, `Failed`, `Suspended`, `Degraded`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

fn default_backoff_limit() -> i32 {
    3
}
fn default_tiny_hidden() -> i32 {
    64
}
fn default_tiny_layers() -> i32 {
    2
}
fn default_weight() -> i32 {
    1
}
fn default_alpha() -> f64 {
    0.8
}
fn default_group_size() -> i32 {
    8
}
fn default_injectors_per_step() -> i32 {
    8
}
fn default_min_passing() -> i32 {
    2
}
fn default_one() -> i32 {
    1
}
fn default_inverse_files() -> i32 {
    8
}
fn default_max_turns() -> i32 {
    40
}
fn default_max_tokens() -> i32 {
    32768
}
fn default_max_turn_tokens() -> i32 {
    2048
}
fn default_true() -> bool {
    true
}
fn default_one_f() -> f64 {
    1.0
}
fn default_half() -> f64 {
    0.5
}
fn default_lr() -> f64 {
    1e-6
}
fn default_total_steps() -> i64 {
    1000
}
fn default_is_cap() -> f64 {
    2.0
}
fn default_eps_low() -> f64 {
    0.2
}
fn default_eps_high() -> f64 {
    0.28
}
fn default_staleness() -> i32 {
    8
}
fn default_micro_batch_tokens() -> i32 {
    8192
}

fn default_micro_batch() -> i32 {
    4
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_gpus() -> i32 {
    1
}
fn default_nodes() -> i32 {
    1
}
fn default_concurrency() -> i32 {
    8
}
fn default_every() -> i64 {
    50
}
fn default_keep() -> i32 {
    3
}
fn default_ckpt_path() -> String {
    "/checkpoints".to_string()
}
