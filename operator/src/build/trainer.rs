//! The trainer pod of a run, and the ConfigMap holding the run file it reads.
//!
//! The trainer runs `trainer cluster`: the loop of the single-machine mode with the broker as
//! sandbox provider, progress reporter and checkpoint sink. It needs no RBAC: it talks only to
//! the broker, with the run's token.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, KeyToPath, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, PodSpec,
    SecretKeySelector, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::build::security::{container_security, pod_security};
use crate::config::OperatorConfig;
use crate::names::{
    LABEL_ATTEMPT, MODEL_DIR, TOKEN_KEY, TRAINER_CONFIG_DIR, TRAINER_METRICS_PORT,
    TRAINER_RUN_FILE, common_labels, run_token_secret, trainer_config_map as config_map_name,
    trainer_pod as pod_name, trainer_selector_labels,
};
use crate::validate::ValidRun;

/// The user the trainer runs as; `fsGroup` too, so a checkpoint PVC is writable.
pub const TRAINER_USER: i64 = 65532;

/// A checkpoint the trainer starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// Name of the `Checkpoint` object.
    pub checkpoint: String,
    /// Its directory inside the trainer pod.
    pub location: String,
    pub step: i64,
}

/// Where the model's weights are inside the trainer pod, when `model.path` is set.
pub fn model_dir(run: &ValidRun<'_>) -> Option<String> {
    let path = run.spec.model.path.as_ref()?;
    Some(match run.spec.model.pvc {
        Some(_) => format!("{MODEL_DIR}/{}", path.trim_start_matches('/')),
        None => path.clone(),
    })
}

/// Directory the run's checkpoints are written to (`<storage.path>/<run>`).
pub fn checkpoint_dir(run: &ValidRun<'_>) -> String {
    format!(
        "{}/{}",
        run.spec.checkpoint.storage.path.trim_end_matches('/'),
        run.name
    )
}

fn labels(run: &ValidRun<'_>) -> BTreeMap<String, String> {
    let mut labels = common_labels("selfplay-trainer");
    labels.extend(trainer_selector_labels(&run.name));
    labels
}

/// The run file the trainer reads: the run as the user wrote it (no status).
pub fn trainer_config_map(run: &ValidRun<'_>) -> Result<ConfigMap, serde_yaml::Error> {
    let doc = serde_json::json!({
        "apiVersion": selfplay_crds::API_VERSION,
        "kind": "SelfPlayRun",
        "metadata": { "name": run.name, "namespace": run.namespace },
        "spec": run.spec,
    });
    let yaml = serde_yaml::to_string(&doc)?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&run.name)),
            namespace: Some(run.namespace.clone()),
            labels: Some(labels(run)),
            owner_references: Some(vec![run.owner.clone()]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("run.yaml".to_string(), yaml)])),
        ..Default::default()
    })
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

/// The trainer pod of attempt `attempt` (the run's restart count).
pub fn trainer_pod(
    run: &ValidRun<'_>,
    attempt: i32,
    resume: Option<&ResumePoint>,
    cfg: &OperatorConfig,
) -> Pod {
    let spec = run.spec;
    let ckpt_path = spec.checkpoint.storage.path.clone();

    let mut args = vec![
        "cluster".to_string(),
        "--run-file".to_string(),
        TRAINER_RUN_FILE.to_string(),
        "--checkpoint-dir".to_string(),
        checkpoint_dir(run),
        "--metrics-listen".to_string(),
        // Dual stack: the IPv6 wildcard takes IPv4 too.
        format!("[::]:{TRAINER_METRICS_PORT}"),
    ];
    if let Some(dir) = model_dir(run) {
        args.extend(["--model-dir".to_string(), dir]);
    }
    if let Some(r) = resume {
        args.extend(["--resume-from".to_string(), r.location.clone()]);
    }

    let mut mounts = vec![
        VolumeMount {
            name: "run-config".into(),
            mount_path: TRAINER_CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "checkpoints".into(),
            mount_path: ckpt_path,
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "run-config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(&run.name),
                ..Default::default()
            }),
            ..Default::default()
        },
        match &spec.checkpoint.storage.pvc {
            Some(claim) => Volume {
                name: "checkpoints".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(false),
                }),
                ..Default::default()
            },
            None => Volume {
                name: "checkpoints".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            },
        },
    ];
    if let Some(claim) = &spec.model.pvc {
        mounts.push(VolumeMount {
            name: "model".into(),
            mount_path: MODEL_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Default::default()
        });
    }

    if let Some(cm) = spec
        .evaluation
        .as_ref()
        .and_then(|e| e.tasks.config_map.as_ref())
    {
        let file = std::path::Path::new(selfplay_crds::run::EVALUATION_TASKS_FILE);
        let (dir, name) = (
            file.parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            file.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        mounts.push(VolumeMount {
            name: "evaluation-tasks".into(),
            mount_path: dir,
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "evaluation-tasks".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.name.clone(),
                items: Some(vec![KeyToPath {
                    key: cm.key.clone(),
                    path: name,
                    mode: None,
                }]),
                // A missing ConfigMap or key keeps the pod from starting (an event names it)
                // rather than a run that silently never evaluates.
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    let env = vec![
        env("SELFPLAY_BROKER_ADDR", &cfg.broker_address),
        EnvVar {
            name: "SELFPLAY_BROKER_TOKEN".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: run_token_secret(&run.name),
                    key: TOKEN_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        },
        env("SELFPLAY_RUN_NAME", &run.name),
        EnvVar {
            name: "SELFPLAY_RUN_NAMESPACE".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        },
        env("SELFPLAY_ATTEMPT", &attempt.to_string()),
    ];

    let container = Container {
        name: "trainer".into(),
        image: Some(
            spec.trainer
                .image
                .clone()
                .unwrap_or_else(|| cfg.trainer_image.clone()),
        ),
        image_pull_policy: cfg.image_pull_policy.clone(),
        command: Some(vec!["trainer".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: TRAINER_METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(run.resources.clone()),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    let mut labels = labels(run);
    labels.insert(LABEL_ATTEMPT.into(), attempt.to_string());
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&run.name, attempt)),
            namespace: Some(run.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![run.owner.clone()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            // The operator restarts a failed trainer itself: it counts restarts against
            // backoffLimit and resumes from the latest Ready checkpoint.
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            // Time for the trainer to finish writing a checkpoint on SIGTERM.
            termination_grace_period_seconds: Some(120),
            security_context: Some(pod_security(TRAINER_USER)),
            node_selector: (!spec.trainer.node_selector.is_empty())
                .then(|| spec.trainer.node_selector.clone()),
            tolerations: (!spec.trainer.tolerations.is_empty())
                .then(|| spec.trainer.tolerations.clone()),
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}
