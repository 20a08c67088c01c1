//! The sandbox pod of a [`SandboxPool`](crate::SandboxPool): the one description of a sandbox.
//!
//! The operator creates it on a cluster; `trainer local` runs the same pod as Docker
//! containers on one machine (the trainer's `engine::docker` translates it), so a sandbox is
//! the same thing in both places.
//!
//! Shape, for the default `Isolated` profile:
//! - init `install-sidecar` (the sidecar image, `FROM scratch`): the static sidecar installs
//!   itself into the `selfplay-bin` volume;
//! - init `copy-repository` (the repository image, as the sandbox's user): the sidecar copies
//!   `workdir` out of the image into the `selfplay-repo` volume. Repository images run as root
//!   with a root-owned repository (SWE-bench's `/testbed`); the copy belongs to the sandbox's
//!   non-root user, so edits, patches, snapshots and history resets work without any
//!   capability;
//! - `sandbox` (the repository image): the sidecar serving the workspace, with `selfplay-repo`
//!   mounted at `workdir` itself, so paths recorded by development-mode installs
//!   (`/testbed` in an environment's `.pth` or egg-link) still resolve. `HOME` is a volume of
//!   its own; git is told every directory is safe (the image's files keep their owner).
//!
//! `ImageUser` runs the image's own user (root included) on the repository in place, under a
//! sandboxed runtime class (validated); capabilities stay dropped. Both profiles: no
//! service-account token, no privilege escalation, RuntimeDefault seccomp, `restartPolicy:
//! Never`, an `activeDeadlineSeconds` of the pool's TTL.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, KeyToPath, Pod,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::pool::{SandboxPoolSpec, SandboxProfile};

/// Key of the token in the pool's token Secret.
pub const TOKEN_KEY: &str = "token";
/// Where a sandbox pod mounts its pool's token Secret.
pub const SANDBOX_TOKEN_DIR: &str = "/var/run/selfplay";
pub const SANDBOX_TOKEN_FILE: &str = "/var/run/selfplay/token";
/// Where the init container puts the sidecar binary.
pub const SIDECAR_BIN_DIR: &str = "/selfplay/bin";
pub const SIDECAR_BIN: &str = "/selfplay/bin/sandbox-sidecar";
/// Where `copy-repository` writes the repository copy (mounted at `workdir` afterwards).
pub const REPO_COPY_DIR: &str = "/selfplay/repo";
/// The sandbox's `HOME` under the `Isolated` profile.
pub const SANDBOX_HOME: &str = "/selfplay/home";
/// Name of the sidecar's port.
pub const SIDECAR_PORT_NAME: &str = "sidecar";

pub const INSTALL_CONTAINER: &str = "install-sidecar";
pub const COPY_CONTAINER: &str = "copy-repository";
pub const SANDBOX_CONTAINER: &str = "sandbox";
pub const BIN_VOLUME: &str = "selfplay-bin";
pub const TOKEN_VOLUME: &str = "selfplay-token";
pub const REPO_VOLUME: &str = "selfplay-repo";
pub const HOME_VOLUME: &str = "selfplay-home";

/// The `shellInit` of `ImageUser` sandboxes that set none: the user's own start-up file, as
/// the image's interactive shell would read it.
pub const IMAGE_USER_SHELL_INIT: &str = r#"if [ -r "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi"#;

/// Where the sidecar comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct SidecarImage {
    pub image: String,
    /// The static binary's path inside `image`.
    pub binary_path: String,
    pub pull_policy: Option<String>,
}

/// Everything a sandbox pod is made from besides the pool's spec.
#[derive(Clone, Debug)]
pub struct SandboxPodInput<'a> {
    pub pool: &'a str,
    pub namespace: &'a str,
    pub spec: &'a SandboxPoolSpec,
    /// The sandbox container's resources, defaults applied.
    pub resources: ResourceRequirements,
    /// Labels that always win over the template's (selector, template hash, …).
    pub labels: BTreeMap<String, String>,
    pub owner: Option<OwnerReference>,
    pub sidecar: SidecarImage,
    /// The Secret holding the sidecar's token under [`TOKEN_KEY`].
    pub token_secret: String,
    /// `generateName` of the pod.
    pub generate_name: String,
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        ..Default::default()
    }
}

/// Pod Security Standard "restricted" at the pod level, as `user`.
pub fn restricted_pod_security(user: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(user),
        run_as_group: Some(user),
        fs_group: Some(user),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

/// Pod Security Standard "restricted" for one container.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default()),
        ..Default::default()
    }
}

/// `ImageUser`: whoever the image says, root included, but still without capabilities or a
/// way to gain privileges.
fn image_user_container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: None,
        ..restricted_container_security()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn empty_dir(name: &str, limit: Quantity) -> Volume {
    Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(limit),
            medium: None,
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// Fills missing CPU and memory limits from the requests, or from `defaults`: every
/// container the operator makes has limits, and a sandbox run by Docker gets the same ones.
pub fn with_limits(
    user: Option<&ResourceRequirements>,
    defaults: ResourceRequirements,
) -> ResourceRequirements {
    let Some(user) = user else { return defaults };
    let mut out = user.clone();
    let requests = out.requests.clone().unwrap_or_default();
    let default_limits = defaults.limits.unwrap_or_default();
    let limits = out.limits.get_or_insert_with(Default::default);
    for key in ["cpu", "memory"] {
        if !limits.contains_key(key)
            && let Some(q) = requests.get(key).or_else(|| default_limits.get(key))
        {
            limits.insert(key.to_string(), q.clone());
        }
    }
    out
}

/// Sandbox container resources when the pool sets none: 1 CPU and 2Gi, limits included.
pub fn default_sandbox_resources() -> ResourceRequirements {
    let q = quantities(&[("cpu", "1"), ("memory", "2Gi")]);
    ResourceRequirements {
        requests: Some(q.clone()),
        limits: Some(q),
        ..Default::default()
    }
}

/// The sandbox container's resources: the template's, limits filled in.
pub fn sandbox_resources(spec: &SandboxPoolSpec) -> ResourceRequirements {
    with_limits(
        spec.template.resources.as_ref(),
        default_sandbox_resources(),
    )
}

/// A small init container's resources.
pub fn init_container_resources() -> ResourceRequirements {
    let q = quantities(&[("cpu", "100m"), ("memory", "64Mi")]);
    ResourceRequirements {
        requests: Some(q.clone()),
        limits: Some(q),
        ..Default::default()
    }
}

/// The sandbox container's environment: the template's, then ours for the names it does
/// not set (the template wins on a clash; no name appears twice).
fn sandbox_env(spec: &SandboxPoolSpec) -> Vec<EnvVar> {
    let t = &spec.template;
    let mut ours = vec![
        // The image's files keep their owner (the repository's too, in place): git must
        // not refuse to work in them. Command-line scope, which git honours for this key.
        env("GIT_CONFIG_COUNT", "1"),
        env("GIT_CONFIG_KEY_0", "safe.directory"),
        env("GIT_CONFIG_VALUE_0", "*"),
    ];
    if t.profile == SandboxProfile::Isolated {
        ours.push(env("HOME", SANDBOX_HOME));
    }
    ours.retain(|e| !t.env.iter().any(|u| u.name == e.name));
    let mut all = t.env.clone();
    all.extend(ours);
    all
}

/// The `shellInit` the sidecar runs, if any.
pub fn effective_shell_init(spec: &SandboxPoolSpec) -> Option<String> {
    match (&spec.template.shell_init, spec.template.profile) {
        (Some(s), _) if !s.trim().is_empty() => Some(s.clone()),
        (Some(_), _) => None,
        (None, SandboxProfile::ImageUser) => Some(IMAGE_USER_SHELL_INIT.to_string()),
        (None, SandboxProfile::Isolated) => None,
    }
}

/// One sandbox pod of the pool.
pub fn sandbox_pod(input: &SandboxPodInput<'_>) -> Pod {
    let spec = input.spec;
    let t = &spec.template;
    let port = spec.sidecar_port;
    let isolated = t.profile == SandboxProfile::Isolated;
    let security = if isolated {
        restricted_container_security()
    } else {
        image_user_container_security()
    };

    // The template's labels first, so that the operator's own labels always win.
    let mut labels: BTreeMap<String, String> = t.labels.clone();
    labels.extend(input.labels.clone());

    let install = Container {
        name: INSTALL_CONTAINER.to_string(),
        image: Some(input.sidecar.image.clone()),
        image_pull_policy: input.sidecar.pull_policy.clone(),
        // The sidecar image is `FROM scratch`: no `cp`, so the binary copies itself (to
        // SIDECAR_BIN_DIR/sandbox-sidecar, written atomically, i.e. to SIDECAR_BIN).
        command: Some(vec![
            input.sidecar.binary_path.clone(),
            "install".to_string(),
            "--to".to_string(),
            SIDECAR_BIN_DIR.to_string(),
        ]),
        resources: Some(init_container_resources()),
        // The sidecar image's own non-root user under both profiles.
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![mount(BIN_VOLUME, SIDECAR_BIN_DIR, false)]),
        ..Default::default()
    };

    // The repository image's file tree, read as the sandbox's user; the copy needs nothing
    // from the image (the sidecar does it), so images without coreutils work too.
    let copy = Container {
        name: COPY_CONTAINER.to_string(),
        image: Some(t.image.clone()),
        image_pull_policy: t.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(vec![
            SIDECAR_BIN.to_string(),
            "copy".to_string(),
            "--from".to_string(),
            t.workdir.clone(),
            "--to".to_string(),
            REPO_COPY_DIR.to_string(),
        ]),
        // The sandbox's own resources: a large repository copies at the speed it may use.
        resources: Some(input.resources.clone()),
        security_context: Some(security.clone()),
        volume_mounts: Some(vec![
            mount(BIN_VOLUME, SIDECAR_BIN_DIR, true),
            mount(REPO_VOLUME, REPO_COPY_DIR, false),
        ]),
        ..Default::default()
    };

    let mut command = vec![
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
    ];
    if let Some(init) = effective_shell_init(spec) {
        command.extend(["--env-from-shell".to_string(), init]);
    }

    let mut mounts = vec![
        mount(BIN_VOLUME, SIDECAR_BIN_DIR, true),
        mount(TOKEN_VOLUME, SANDBOX_TOKEN_DIR, true),
    ];
    if isolated {
        mounts.push(mount(REPO_VOLUME, &t.workdir, false));
        mounts.push(mount(HOME_VOLUME, SANDBOX_HOME, false));
    }

    let sandbox = Container {
        name: SANDBOX_CONTAINER.to_string(),
        image: Some(t.image.clone()),
        image_pull_policy: t.image_pull_policy.map(|p| p.as_str().to_string()),
        command: Some(command),
        working_dir: Some(t.workdir.clone()),
        env: Some(sandbox_env(spec)),
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
        resources: Some(input.resources.clone()),
        security_context: Some(security),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    let mut volumes = vec![
        empty_dir(BIN_VOLUME, Quantity("256Mi".to_string())),
        Volume {
            name: TOKEN_VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(input.token_secret.clone()),
                default_mode: Some(0o440),
                items: Some(vec![KeyToPath {
                    key: TOKEN_KEY.to_string(),
                    path: TOKEN_KEY.to_string(),
                    mode: None,
                }]),
                optional: Some(false),
            }),
            ..Default::default()
        },
    ];
    let mut init_containers = vec![install];
    if isolated {
        init_containers.push(copy);
        volumes.push(empty_dir(
            REPO_VOLUME,
            t.workspace_size_limit
                .clone()
                .unwrap_or_else(|| Quantity("8Gi".to_string())),
        ));
        volumes.push(empty_dir(HOME_VOLUME, Quantity("256Mi".to_string())));
    }

    let pod_security = if isolated {
        restricted_pod_security(t.run_as_user)
    } else {
        PodSecurityContext {
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }
    };

    Pod {
        metadata: ObjectMeta {
            generate_name: Some(input.generate_name.clone()),
            namespace: Some(input.namespace.to_string()),
            labels: Some(labels),
            annotations: (!t.annotations.is_empty()).then(|| t.annotations.clone()),
            owner_references: input.owner.clone().map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            init_containers: Some(init_containers),
            containers: vec![sandbox],
            restart_policy: Some("Never".to_string()),
            active_deadline_seconds: Some(spec.sandbox_ttl_seconds),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(5),
            security_context: Some(pod_security),
            runtime_class_name: t.runtime_class_name.clone(),
            node_selector: (!t.node_selector.is_empty()).then(|| t.node_selector.clone()),
            tolerations: (!t.tolerations.is_empty()).then(|| t.tolerations.clone()),
            image_pull_secrets: (!t.image_pull_secrets.is_empty())
                .then(|| t.image_pull_secrets.clone()),
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}
