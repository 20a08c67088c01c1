//! The sandbox pod: the repository image running the sandbox sidecar as its entrypoint.
//!
//! An init container has the sidecar image's static binary install (copy) itself into
//! an `emptyDir`; the repository image then runs it, so commands run with the repository's
//! own toolchain. Restricted security, no service-account token, an `activeDeadlineSeconds`
//! of the pool's TTL (the kubelet kills a sandbox even when the operator is down), and
//! `restartPolicy: Never`: a sandbox that dies is replaced, never restarted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, Pod, PodSpec, Probe, SecretVolumeSource,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::build::security::{container_security, pod_security};
use crate::config::{OperatorConfig, init_container_resources};
use crate::names::{
    LABEL_TEMPLATE_HASH, SANDBOX_TOKEN_DIR, SANDBOX_TOKEN_FILE, SIDECAR_BIN, SIDECAR_BIN_DIR,
    SIDECAR_PORT_NAME, TOKEN_KEY, common_labels, pool_token_secret, sandbox_pod_prefix,
    sandbox_selector_labels,
};
use crate::validate::ValidPool;

const BIN_VOLUME: &str = "selfplay-bin";
const TOKEN_VOLUME: &str = "selfplay-token";

/// One sandbox pod of `pool` (named by the API server from `generateName`).
pub fn sandbox_pod(pool: &ValidPool<'_>, cfg: &OperatorConfig) -> Pod {
    let t = &pool.spec.template;
    let port = pool.spec.sidecar_port;

    // The template's labels first, so that the operator's own labels always win.
    let mut labels: BTreeMap<String, String> = t.labels.clone();
    labels.extend(common_labels("selfplay-sandbox"));
    labels.extend(sandbox_selector_labels(&pool.name));
    labels.insert(LABEL_TEMPLATE_HASH.to_string(), pool.template_hash.clone());

    let install = Container {
        name: "install-sidecar".to_string(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        // The sidecar image is `FROM scratch`: no `cp`, so the binary copies itself (to
        // SIDECAR_BIN_DIR/sandbox-sidecar, written atomically, i.e. to SIDECAR_BIN).
        command: Some(vec![
            cfg.sidecar_binary_path.clone(),
            "install".to_string(),
            "--to".to_string(),
            SIDECAR_BIN_DIR.to_string(),
        ]),
        resources: Some(init_container_resources()),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![VolumeMount {
            name: BIN_VOLUME.to_string(),
            mount_path: SIDECAR_BIN_DIR.to_string(),
            ..Default::default()
        }]),
        ..Default::default()
    };

    let sandbox = Container {
        name: "sandbox".to_string(),
        image: Some(t.image.clone()),
        image_pull_policy: t.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![
            SIDECAR_BIN.to_string(),
            "serve".to_string(),
            "--listen".to_string(),
            // The IPv6 wildcard takes IPv4 too (dual stack), so single-stack IPv6 pods work.
            format!("[::]:{port}"),
            "--workspace".to_string(),
            t.workdir.clone(),
            "--token-file".to_string(),
            SANDBOX_TOKEN_FILE.to_string(),
            // The container's /tmp is its own: every test run of validation starts with it
            // empty (and no process left), so a test script cannot keep state between runs.
            "--scratch-dir".to_string(),
            "/tmp".to_string(),
        ]),
        working_dir: Some(t.workdir.clone()),
        env: (!t.env.is_empty()).then(|| t.env.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(SIDECAR_PORT_NAME.to_string()),
            container_port: port,
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        // TCP rather than gRPC health: the sidecar is Ready as soon as it accepts connections.
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(port),
                host: None,
            }),
            period_seconds: Some(2),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: Some(pool.resources.clone()),
        security_context: Some(container_security()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: BIN_VOLUME.to_string(),
                mount_path: SIDECAR_BIN_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TOKEN_VOLUME.to_string(),
                mount_path: SANDBOX_TOKEN_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };

    Pod {
        metadata: ObjectMeta {
            generate_name: Some(sandbox_pod_prefix(&pool.name)),
            namespace: Some(pool.namespace.clone()),
            labels: Some(labels),
            annotations: (!t.annotations.is_empty()).then(|| t.annotations.clone()),
            owner_references: Some(vec![pool.owner.clone()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            init_containers: Some(vec![install]),
            containers: vec![sandbox],
            restart_policy: Some("Never".to_string()),
            active_deadline_seconds: Some(pool.spec.sandbox_ttl_seconds),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(5),
            security_context: Some(pod_security(t.run_as_user)),
            runtime_class_name: t.runtime_class_name.clone(),
            node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
            tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
            image_pull_secrets: (!t.image_pull_secrets.is_empty())
                .then(|| t.image_pull_secrets.clone()),
            volumes: Some(vec![
                Volume {
                    name: BIN_VOLUME.to_string(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        size_limit: Some(Quantity("256Mi".to_string())),
                        medium: None,
                    }),
                    ..Default::default()
                },
                Volume {
                    name: TOKEN_VOLUME.to_string(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some(pool_token_secret(&pool.name)),
                        default_mode: Some(0o440),
                        items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                            key: TOKEN_KEY.to_string(),
                            path: TOKEN_KEY.to_string(),
                            mode: None,
                        }]),
                        optional: Some(false),
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}
