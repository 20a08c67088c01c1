//! The first step of every reconcile: check a spec beyond what the CRD schema can say and
//! resolve its defaults, so that the builders and decisions work on values known to be good.
//! An invalid object gets a condition saying why and no children.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use selfplay_crds::{SandboxPool, SandboxPoolSpec, SelfPlayRun, SelfPlayRunSpec};
use sha2::{Digest, Sha256};

use crate::config::{OperatorConfig, default_trainer_resources};
use crate::names::MAX_LABEL_VALUE;
use selfplay_crds::sandbox_pod::with_limits;

/// Why a spec cannot be acted on; every problem found, not just the first.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid spec: {}", problems.join("; "))]
pub struct InvalidSpec {
    pub problems: Vec<String>,
}

/// A pool that passed validation, with its defaults resolved.
#[derive(Debug, Clone)]
pub struct ValidPool<'a> {
    pub name: String,
    pub namespace: String,
    pub spec: &'a SandboxPoolSpec,
    pub owner: OwnerReference,
    /// Hash of everything that shapes a sandbox pod; a change rolls the pool.
    pub template_hash: String,
    /// Sandbox container resources with limits filled in.
    pub resources: ResourceRequirements,
}

/// A run that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRun<'a> {
    pub name: String,
    pub namespace: String,
    pub spec: &'a SelfPlayRunSpec,
    pub owner: OwnerReference,
    /// Trainer container resources (CPU, memory) with defaults applied, GPUs added.
    pub resources: ResourceRequirements,
    /// Problems that do not stop the run but are reported as Degraded.
    pub warnings: Vec<String>,
    /// Choices that work but that the user should know the cost of: published as Warning
    /// events (and `render` notes) rather than a Degraded condition.
    pub notices: Vec<String>,
}

fn owner_reference<K: Resource<DynamicType = ()>>(obj: &K) -> OwnerReference {
    let meta = obj.meta();
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: meta.name.clone().unwrap_or_default(),
        // Objects read from the API server always have a uid; `render` fills a placeholder.
        uid: meta.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn check_label_value(kind: &str, name: &str, problems: &mut Vec<String>) {
    if name.is_empty() {
        problems.push(format!("{kind} has no metadata.name"));
    } else if name.len() > MAX_LABEL_VALUE {
        problems.push(format!(
            "{kind} name {name:?} is longer than {MAX_LABEL_VALUE} characters (it is used as a label value)"
        ));
    }
}

/// Hash of the sandbox pod shape: the template, the port and TTL, and the sidecar image.
pub fn template_hash(spec: &SandboxPoolSpec, cfg: &OperatorConfig) -> String {
    let shape = serde_json::json!({
        "template": spec.template,
        "sidecarPort": spec.sidecar_port,
        "ttl": spec.sandbox_ttl_seconds,
        "sidecarImage": cfg.sidecar_image,
        "sidecarBinary": cfg.sidecar_binary_path,
    });
    let digest = Sha256::digest(shape.to_string().as_bytes());
    hex::encode(&digest[..5])
}

pub fn validate_pool<'a>(
    pool: &'a SandboxPool,
    cfg: &OperatorConfig,
) -> Result<ValidPool<'a>, InvalidSpec> {
    let spec = &pool.spec;
    let name = pool.name_any();
    let mut problems = Vec::new();
    check_label_value("SandboxPool", &name, &mut problems);
    if spec.template.image.trim().is_empty() {
        problems.push("template.image is empty".to_string());
    }
    if !spec.template.workdir.starts_with('/') {
        problems.push(format!(
            "template.workdir {:?} is not an absolute path",
            spec.template.workdir
        ));
    }
    let workdir = spec.template.workdir.trim_end_matches('/');
    if spec.template.workdir.starts_with('/')
        && (workdir.is_empty()
            || [
                "/selfplay",
                "/var/run/selfplay",
                "/tmp",
                "/proc",
                "/dev",
                "/sys",
            ]
            .iter()
            .any(|d| workdir == *d || workdir.starts_with(&format!("{d}/"))))
    {
        problems.push(format!(
            "template.workdir {:?} is / or where the sandbox mounts its own files; the \
             repository must live elsewhere (e.g. /testbed)",
            spec.template.workdir
        ));
    }
    if spec.template.profile == selfplay_crds::SandboxProfile::ImageUser
        && spec.template.runtime_class_name.is_none()
    {
        problems.push(
            "template.profile ImageUser runs the image's own user (root included) and needs a \
             sandboxed template.runtimeClassName (gVisor, Kata)"
                .to_string(),
        );
    }
    if spec.warm < 0 {
        problems.push(format!("warm is {}; it must be at least 0", spec.warm));
    }
    if spec.max < 1 {
        problems.push(format!("max is {}; it must be at least 1", spec.max));
    }
    if spec.warm > spec.max {
        problems.push(format!("warm ({}) exceeds max ({})", spec.warm, spec.max));
    }
    if spec.sandbox_ttl_seconds < 60 {
        problems.push(format!(
            "sandboxTtlSeconds is {}; it must be at least 60",
            spec.sandbox_ttl_seconds
        ));
    }
    if !(1024..=65535).contains(&spec.sidecar_port) {
        problems.push(format!(
            "sidecarPort {} is outside 1024..=65535",
            spec.sidecar_port
        ));
    }
    if spec.template.run_as_user < 1 {
        problems.push("template.runAsUser must be a non-root user (>= 1)".to_string());
    }
    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }
    Ok(ValidPool {
        namespace: pool.namespace().unwrap_or_else(|| "default".to_string()),
        owner: owner_reference(pool),
        template_hash: template_hash(spec, cfg),
        resources: selfplay_crds::sandbox_pod::sandbox_resources(spec),
        spec,
        name,
    })
}

pub fn validate_run(run: &SelfPlayRun) -> Result<ValidRun<'_>, InvalidSpec> {
    let spec = &run.spec;
    let name = run.name_any();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    check_label_value("SelfPlayRun", &name, &mut problems);
    if spec.pools.is_empty() {
        problems.push("pools is empty".to_string());
    }
    for p in &spec.pools {
        check_label_value("pool reference", &p.name, &mut problems);
    }
    if let Some(e) = &spec.evaluation {
        if e.pool.is_empty() {
            problems.push("evaluation.pool is empty".to_string());
        } else {
            check_label_value("evaluation pool", &e.pool, &mut problems);
        }
        match (&e.tasks.file, &e.tasks.config_map) {
            (Some(_), Some(_)) | (None, None) => problems.push(
                "exactly one of evaluation.tasks.file and evaluation.tasks.configMap must be set"
                    .to_string(),
            ),
            // A file is read by `trainer local`; a trainer pod has no file of the user's.
            (Some(f), None) => problems.push(format!(
                "evaluation.tasks.file {f:?} is for `trainer local`; in a cluster use evaluation.tasks.configMap"
            )),
            (None, Some(cm)) => {
                if cm.name.is_empty() || cm.key.is_empty() {
                    problems.push(
                        "evaluation.tasks.configMap needs a name and a key".to_string(),
                    );
                }
            }
        }
    }
    match (&spec.model.path, &spec.model.tiny) {
        (Some(_), Some(_)) | (None, None) => {
            problems.push("exactly one of model.path and model.tiny must be set".to_string())
        }
        _ => {}
    }
    if spec.model.pvc.is_some() && spec.model.path.is_none() {
        problems.push("model.pvc is set but model.path is not".to_string());
    }
    if !spec.checkpoint.storage.path.starts_with('/') {
        problems.push(format!(
            "checkpoint.storage.path {:?} is not an absolute path",
            spec.checkpoint.storage.path
        ));
    }
    if spec.checkpoint.storage.path == crate::names::MODEL_DIR
        || spec.checkpoint.storage.path == crate::names::TRAINER_CONFIG_DIR
    {
        problems.push(format!(
            "checkpoint.storage.path {:?} is reserved",
            spec.checkpoint.storage.path
        ));
    }
    if spec.trainer.gpus < 0 {
        problems.push("trainer.gpus must be at least 0".to_string());
    }
    // The trainer's data parallelism over several GPUs (NCCL) is built and its reduction
    // tested on the CPU, but it has not run on a multi-GPU machine: until it has, a run does
    // not reserve GPUs it may not use well.
    if spec.trainer.gpus > 1 {
        problems.push(format!(
            "spec.trainer.gpus is {}: training on several GPUs has not yet been run on a multi-GPU machine and is not admitted; set it to 0 or 1",
            spec.trainer.gpus
        ));
    }
    if spec.backoff_limit < 0 {
        problems.push("backoffLimit must be at least 0".to_string());
    }
    if spec.trainer.nodes > 1 {
        warnings.push(format!(
            "trainer.nodes is {}; only 1 trainer node is supported, the run uses 1",
            spec.trainer.nodes
        ));
    }
    let mut notices = Vec::new();
    if spec.checkpoint.keep_last > 0 && spec.checkpoint.storage.pvc.is_none() {
        notices.push(format!(
            "checkpoint.keepLast is {} but checkpoint.storage.pvc is unset: checkpoints are kept in the trainer pod's emptyDir and lost with it, so a restarted trainer starts from the initial model",
            spec.checkpoint.keep_last
        ));
    }
    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }
    let mut resources = with_limits(spec.trainer.resources.as_ref(), default_trainer_resources());
    if spec.trainer.gpus > 0 {
        let gpus =
            k8s_openapi::apimachinery::pkg::api::resource::Quantity(spec.trainer.gpus.to_string());
        // Extended resources must have requests equal to limits.
        resources
            .requests
            .get_or_insert_with(Default::default)
            .insert("nvidia.com/gpu".into(), gpus.clone());
        resources
            .limits
            .get_or_insert_with(Default::default)
            .insert("nvidia.com/gpu".into(), gpus);
    }
    Ok(ValidRun {
        namespace: run.namespace().unwrap_or_else(|| "default".to_string()),
        owner: owner_reference(run),
        resources,
        warnings,
        notices,
        spec,
        name,
    })
}
