//! The builders, from the YAML fixtures: what a sandbox pod, the pool's NetworkPolicy and
//! Secret, and a trainer pod look like.

mod common;

use common::one;
use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use selfplay_crds::{SandboxPool, SelfPlayRun};
use selfplay_operator::build::{
    ResumePoint, pool_token_secret, sandbox_network_policy, sandbox_pod, trainer_config_map,
    trainer_pod,
};
use selfplay_operator::config::OperatorConfig;
use selfplay_operator::validate::{template_hash, validate_pool, validate_run};

fn cfg() -> OperatorConfig {
    OperatorConfig {
        sidecar_image: "registry.example.com/selfplay/sidecar:1".into(),
        sidecar_binary_path: "/sandbox-sidecar".into(),
        trainer_image: "registry.example.com/selfplay/trainer:1".into(),
        broker_address: "http://selfplay-operator.selfplay.svc:7443".into(),
        image_pull_policy: None,
        ..OperatorConfig::default()
    }
}

fn only_container(pod: &Pod) -> &Container {
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

fn q(c: &Container, which: &str, key: &str) -> Option<String> {
    let r = c.resources.as_ref()?;
    let m = if which == "limits" {
        r.limits.as_ref()?
    } else {
        r.requests.as_ref()?
    };
    m.get(key).map(|q| q.0.clone())
}

fn assert_restricted(c: &Container) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()]),
        "{}",
        c.name
    );
    assert!(
        sc.capabilities
            .as_ref()
            .and_then(|c| c.add.as_ref())
            .is_none()
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
}

#[test]
fn sandbox_pod_runs_the_sidecar_from_the_repository_image_restricted() {
    let pool: SandboxPool = one("pool-full.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let pod = sandbox_pod(&v, &cfg());
    let spec = pod.spec.as_ref().expect("spec");

    // The init container runs the static sidecar of the sidecar image, which installs itself
    // into the emptyDir (the image is `FROM scratch`: there is no `cp`) at the path the
    // sandbox container runs.
    let init = &spec.init_containers.as_ref().expect("init")[0];
    assert_eq!(
        init.image.as_deref(),
        Some("registry.example.com/selfplay/sidecar:1")
    );
    assert_eq!(
        init.command.clone().expect("cmd"),
        ["/sandbox-sidecar", "install", "--to", "/selfplay/bin"]
    );
    assert_eq!(
        init.volume_mounts.as_ref().expect("mounts")[0].mount_path,
        "/selfplay/bin"
    );
    assert_restricted(init);
    assert!(q(init, "limits", "memory").is_some());

    // The repository image runs the sidecar as its entrypoint.
    let c = only_container(&pod);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/envs/rustrepo:0.9")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        c.command.clone().expect("command"),
        [
            "/selfplay/bin/sandbox-sidecar",
            "serve",
            "--listen",
            "[::]:7443",
            "--workspace",
            "/src/repo",
            "--token-file",
            "/var/run/selfplay/token",
            "--scratch-dir",
            "/tmp"
        ]
    );
    assert_eq!(c.working_dir.as_deref(), Some("/src/repo"));
    assert_eq!(c.env.as_ref().expect("env")[0].name, "CARGO_NET_OFFLINE");
    assert_restricted(c);
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.tcp_socket.as_ref())
        .expect("tcp readiness probe");
    assert_eq!(probe.port, IntOrString::Int(7443));
    assert_eq!(c.ports.as_ref().expect("ports")[0].container_port, 7443);
    // Requests given, limits filled from them.
    assert_eq!(q(c, "requests", "cpu").as_deref(), Some("2"));
    assert_eq!(q(c, "limits", "cpu").as_deref(), Some("2"));
    assert_eq!(q(c, "limits", "memory").as_deref(), Some("4Gi"));
    let mounts: Vec<(&str, Option<bool>)> = c
        .volume_mounts
        .as_ref()
        .expect("mounts")
        .iter()
        .map(|m| (m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("/selfplay/bin", Some(true)),
            ("/var/run/selfplay", Some(true)),
            ("/src/repo", None),
            ("/selfplay/home", None)
        ]
    );

    // Pod level: nothing of the cluster reaches the agent — no service-account token, no
    // service environment variables, no host namespaces; the only environment is the
    // template's and git's safe.directory and HOME, the only volumes the sidecar binary, the
    // pool's own token, the repository's copy and the home directory.
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.enable_service_links, Some(false));
    assert!(spec.host_network.is_none() && spec.host_pid.is_none() && spec.host_ipc.is_none());
    assert_eq!(spec.share_process_namespace, None);
    assert_eq!(
        c.env
            .as_ref()
            .map(|e| e.iter().map(|v| v.name.as_str()).collect::<Vec<_>>()),
        Some(vec![
            "CARGO_NET_OFFLINE",
            "GIT_CONFIG_COUNT",
            "GIT_CONFIG_KEY_0",
            "GIT_CONFIG_VALUE_0",
            "HOME"
        ])
    );
    assert!(c.env_from.is_none());
    assert_eq!(spec.volumes.as_ref().map(Vec::len), Some(4));
    assert_eq!(spec.active_deadline_seconds, Some(900));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
    let psc = spec.security_context.as_ref().expect("pod securityContext");
    assert_eq!(psc.run_as_user, Some(1001));
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(
        spec.node_selector
            .as_ref()
            .and_then(|n| n.get("pool"))
            .map(String::as_str),
        Some("sandboxes")
    );
    assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(1));
    assert_eq!(
        spec.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()),
        Some("regcred")
    );
    let volumes = spec.volumes.as_ref().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v.name == "selfplay-bin" && v.empty_dir.is_some())
    );
    let secret = volumes
        .iter()
        .find_map(|v| v.secret.as_ref())
        .expect("token volume");
    assert_eq!(
        secret.secret_name.as_deref(),
        Some("rustrepo-sandbox-token")
    );

    // Metadata: generated name, owner, labels (the operator's win over the template's).
    let meta = &pod.metadata;
    assert_eq!(meta.generate_name.as_deref(), Some("rustrepo-"));
    assert_eq!(meta.namespace.as_deref(), Some("team-a"));
    let owner = &meta.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("SandboxPool", "rustrepo", Some(true))
    );
    assert_eq!(owner.uid, "6f1c2a3e-0000-4000-8000-000000000002");
    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels["selfplay.dev/pool"], "rustrepo");
    assert_eq!(labels["selfplay.dev/component"], "sandbox");
    assert_eq!(labels["selfplay.dev/template-hash"], v.template_hash);
    assert_eq!(labels["team"], "a");
    assert_eq!(
        meta.annotations.as_ref().expect("annotations")["example.com/note"],
        "sandbox"
    );
}

#[test]
fn sandbox_resources_default_to_one_cpu_two_gi_with_limits() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let pod = sandbox_pod(&v, &cfg());
    let c = only_container(&pod);
    for which in ["requests", "limits"] {
        assert_eq!(q(c, which, "cpu").as_deref(), Some("1"));
        assert_eq!(q(c, which, "memory").as_deref(), Some("2Gi"));
    }
    assert_eq!(c.working_dir.as_deref(), Some("/workspace"));
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.active_deadline_seconds),
        Some(3600)
    );
    assert_eq!(
        pod.spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.run_as_user),
        Some(65532)
    );
}

#[test]
fn template_hash_follows_the_template_and_the_sidecar_image_only() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let base = template_hash(&pool.spec, &cfg());
    let mut warmer = pool.spec.clone();
    warmer.warm = 9;
    assert_eq!(
        template_hash(&warmer, &cfg()),
        base,
        "scaling is not a template change"
    );
    let mut new_image = pool.spec.clone();
    new_image.template.image = "registry.example.com/envs/pyrepo:1.3".into();
    assert_ne!(template_hash(&new_image, &cfg()), base);
    let mut c2 = cfg();
    c2.sidecar_image = "registry.example.com/selfplay/sidecar:2".into();
    assert_ne!(
        template_hash(&pool.spec, &c2),
        base,
        "a new sidecar rolls the pool"
    );
    assert_eq!(base.len(), 10);
}

#[test]
fn network_policy_denies_egress_and_admits_only_the_pools_trainers() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let np = sandbox_network_policy(&v, &["qwen-ssr".into(), "smoke".into(), "qwen-ssr".into()]);
    let spec = np.spec.as_ref().expect("spec");
    assert_eq!(
        spec.policy_types.clone().expect("types"),
        ["Ingress", "Egress"]
    );
    assert_eq!(
        spec.egress.as_ref().map(Vec::len),
        Some(0),
        "no egress at all"
    );
    let sel = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.as_ref())
        .expect("selector");
    assert_eq!(sel["selfplay.dev/pool"], "pyrepo");
    assert_eq!(sel["selfplay.dev/component"], "sandbox");
    let rules = spec.ingress.as_ref().expect("ingress");
    assert_eq!(rules.len(), 1);
    let peer = &rules[0].from.as_ref().expect("from")[0];
    assert!(
        peer.namespace_selector.is_none() && peer.ip_block.is_none(),
        "same namespace pods only"
    );
    let ps = peer.pod_selector.as_ref().expect("podSelector");
    assert_eq!(
        ps.match_labels.as_ref().expect("labels")["selfplay.dev/component"],
        "trainer"
    );
    let expr = &ps.match_expressions.as_ref().expect("expressions")[0];
    assert_eq!(
        (expr.key.as_str(), expr.operator.as_str()),
        ("selfplay.dev/run", "In")
    );
    assert_eq!(expr.values.clone().expect("values"), ["qwen-ssr", "smoke"]);
    let port = &rules[0].ports.as_ref().expect("ports")[0];
    assert_eq!(
        (port.port.clone(), port.protocol.as_deref()),
        (Some(IntOrString::Int(7070)), Some("TCP"))
    );

    let closed = sandbox_network_policy(&v, &[]);
    assert_eq!(
        closed
            .spec
            .as_ref()
            .and_then(|s| s.ingress.as_ref())
            .map(Vec::len),
        Some(0),
        "no runs: no ingress"
    );
}

#[test]
fn pool_token_secret_is_owned_and_immutable() {
    let pool: SandboxPool = one("pool-basic.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let s = pool_token_secret(&v.name, &v.namespace, &v.owner, "t0k3n");
    assert_eq!(s.metadata.name.as_deref(), Some("pyrepo-sandbox-token"));
    assert_eq!(s.immutable, Some(true));
    assert_eq!(s.string_data.as_ref().expect("data")["token"], "t0k3n");
    assert_eq!(
        s.metadata.owner_references.as_ref().expect("owner")[0].name,
        "pyrepo"
    );
    let a = selfplay_operator::build::generate_token();
    let b = selfplay_operator::build::generate_token();
    assert_eq!(a.len(), 64);
    assert_ne!(a, b);
}

#[test]
fn trainer_pod_has_gpus_volumes_broker_credentials_and_resumes() {
    let run: SelfPlayRun = one("run-gpu.yaml");
    let v = validate_run(&run).expect("valid");
    let resume = ResumePoint {
        checkpoint: "qwen-ssr-step-30".into(),
        location: "/checkpoints/qwen-ssr/step-30".into(),
        step: 30,
    };
    let pod = trainer_pod(&v, 1, Some(&resume), &cfg());
    assert_eq!(pod.metadata.name.as_deref(), Some("qwen-ssr-trainer-1"));
    let labels = pod.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        (
            labels["selfplay.dev/run"].as_str(),
            labels["selfplay.dev/attempt"].as_str()
        ),
        ("qwen-ssr", "1")
    );
    assert_eq!(labels["selfplay.dev/component"], "trainer");
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let c = only_container(&pod);
    assert_restricted(c);
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/selfplay/trainer:1")
    );
    assert_eq!(c.command.clone().expect("command"), ["trainer"]);
    let args = c.args.clone().expect("args");
    assert_eq!(args[0], "cluster");
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
    };
    assert_eq!(arg("--run-file").as_deref(), Some("/etc/selfplay/run.yaml"));
    assert_eq!(
        arg("--checkpoint-dir").as_deref(),
        Some("/checkpoints/qwen-ssr")
    );
    assert_eq!(
        arg("--model-dir").as_deref(),
        Some("/model/models/qwen2.5-0.5b")
    );
    assert_eq!(
        arg("--resume-from").as_deref(),
        Some("/checkpoints/qwen-ssr/step-30")
    );
    // GPUs: requests equal limits; CPU and memory from the spec, memory limit filled in.
    assert_eq!(q(c, "limits", "nvidia.com/gpu").as_deref(), Some("1"));
    assert_eq!(q(c, "requests", "nvidia.com/gpu").as_deref(), Some("1"));
    assert_eq!(q(c, "requests", "cpu").as_deref(), Some("8"));
    assert_eq!(q(c, "limits", "memory").as_deref(), Some("32Gi"));
    // Broker address and credentials.
    let env = c.env.as_ref().expect("env");
    let find = |n: &str| env.iter().find(|e| e.name == n).expect(n);
    assert_eq!(
        find("SELFPLAY_BROKER_ADDR").value.as_deref(),
        Some("http://selfplay-operator.selfplay.svc:7443")
    );
    let token = find("SELFPLAY_BROKER_TOKEN")
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secret ref");
    assert_eq!(
        (token.name.as_str(), token.key.as_str()),
        ("qwen-ssr-trainer-token", "token")
    );
    assert_eq!(find("SELFPLAY_RUN_NAME").value.as_deref(), Some("qwen-ssr"));
    // Volumes: checkpoints on the PVC (rw), the model PVC read-only at /model, the run file.
    let mounts = c.volume_mounts.as_ref().expect("mounts");
    let mount = |p: &str| mounts.iter().find(|m| m.mount_path == p).expect(p);
    assert_eq!(mount("/model").read_only, Some(true));
    assert_eq!(mount("/checkpoints").read_only, None);
    assert_eq!(mount("/etc/selfplay").read_only, Some(true));
    let volumes = spec.volumes.as_ref().expect("volumes");
    let pvc = |n: &str| {
        volumes
            .iter()
            .find(|v| v.name == n)
            .and_then(|v| v.persistent_volume_claim.clone())
            .expect(n)
    };
    assert_eq!(
        (pvc("model").claim_name.as_str(), pvc("model").read_only),
        ("models", Some(true))
    );
    assert_eq!(pvc("checkpoints").claim_name, "ckpts");
    assert_eq!(
        spec.node_selector.as_ref().expect("nodeSelector")["nvidia.com/gpu.product"],
        "H100"
    );
    assert_eq!(
        pod.metadata.owner_references.as_ref().expect("owner")[0].kind,
        "SelfPlayRun"
    );

    // The run file holds the spec as written.
    let cm = trainer_config_map(&v).expect("configmap");
    let text = &cm.data.as_ref().expect("data")["run.yaml"];
    let back: SelfPlayRun = serde_yaml::from_str(text).expect("run file parses as a SelfPlayRun");
    assert_eq!(back.spec, run.spec);
}

#[test]
fn tiny_run_without_gpu_uses_an_empty_dir_and_no_model_volume() {
    let run: SelfPlayRun = one("run-tiny.yaml");
    let v = validate_run(&run).expect("valid");
    let pod = trainer_pod(&v, 0, None, &cfg());
    let c = only_container(&pod);
    assert_eq!(q(c, "limits", "nvidia.com/gpu"), None);
    let args = c.args.clone().expect("args");
    assert!(
        !args.contains(&"--resume-from".to_string()) && !args.contains(&"--model-dir".to_string())
    );
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v.name == "checkpoints" && v.empty_dir.is_some())
    );
    assert!(!volumes.iter().any(|v| v.name == "model"));
}

#[test]
fn invalid_specs_are_refused_with_every_problem_named() {
    let pool: SandboxPool = one("pool-invalid.yaml");
    let err = validate_pool(&pool, &cfg()).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("workdir"), "{text}");
    assert!(text.contains("exceeds max"), "{text}");
    assert!(text.contains("sandboxTtlSeconds"), "{text}");
    assert_eq!(err.problems.len(), 3, "{text}");

    let mut run: SelfPlayRun = one("run-tiny.yaml");
    run.spec.model.path = Some("/m".into());
    run.metadata.name = Some("x".repeat(64));
    let err = validate_run(&run).expect_err("invalid");
    assert!(
        err.to_string()
            .contains("exactly one of model.path and model.tiny")
    );
    assert!(err.to_string().contains("longer than 63"));

    let mut run: SelfPlayRun = one("run-tiny.yaml");
    run.spec.trainer.nodes = 4;
    assert_eq!(validate_run(&run).expect("still valid").warnings.len(), 1);
}

#[test]
fn more_than_one_gpu_is_refused_naming_the_field() {
    let mut run: SelfPlayRun = one("run-gpu.yaml");
    run.spec.trainer.gpus = 2;
    let err = validate_run(&run).expect_err("refused");
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("spec.trainer.gpus is 2") && p.contains("multi-GPU machine")),
        "{err}"
    );
    run.spec.trainer.gpus = 1;
    assert!(validate_run(&run).is_ok());
}

#[test]
fn checkpoints_without_a_pvc_are_noticed_at_admission() {
    let run: SelfPlayRun = one("run-tiny.yaml"); // no checkpoint PVC, keepLast defaults to 3
    let v = validate_run(&run).expect("valid");
    assert!(v.warnings.is_empty(), "not Degraded: {:?}", v.warnings);
    assert_eq!(v.notices.len(), 1);
    assert!(
        v.notices[0].contains("checkpoint.storage.pvc"),
        "{:?}",
        v.notices
    );

    let run: SelfPlayRun = one("run-gpu.yaml"); // checkpoints on a PVC
    assert!(validate_run(&run).expect("valid").notices.is_empty());
}

fn env_of<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn mount_of<'a>(c: &'a Container, path: &str) -> Option<&'a str> {
    c.volume_mounts
        .as_ref()?
        .iter()
        .find(|m| m.mount_path == path)
        .map(|m| m.name.as_str())
}

#[test]
fn isolated_sandbox_copies_a_root_owned_repository_to_the_same_path() {
    let pool: SandboxPool = one("pool-swebench.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let pod = sandbox_pod(&v, &cfg());
    let spec = pod.spec.as_ref().expect("spec");
    let inits = spec.init_containers.as_ref().expect("init containers");
    assert_eq!(
        inits.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["install-sidecar", "copy-repository"]
    );
    // The repository image's tree is copied by the sidecar itself, as the sandbox's user.
    let copy = &inits[1];
    assert_eq!(copy.image, Some(pool.spec.template.image.clone()));
    assert_eq!(
        copy.command.clone().expect("command"),
        [
            "/selfplay/bin/sandbox-sidecar",
            "copy",
            "--from",
            "/testbed",
            "--to",
            "/selfplay/repo"
        ]
    );
    assert_restricted(copy);
    assert_eq!(mount_of(copy, "/selfplay/repo"), Some("selfplay-repo"));
    assert_eq!(
        mount_of(copy, "/testbed"),
        None,
        "the copy reads the image's own /testbed"
    );

    // The sandbox sees the copy at the image's path, so development-mode installs resolve.
    let c = only_container(&pod);
    assert_restricted(c);
    assert_eq!(mount_of(c, "/testbed"), Some("selfplay-repo"));
    assert_eq!(mount_of(c, "/selfplay/home"), Some("selfplay-home"));
    assert_eq!(env_of(c, "HOME"), Some("/selfplay/home"));
    assert_eq!(env_of(c, "GIT_CONFIG_KEY_0"), Some("safe.directory"));
    assert_eq!(env_of(c, "GIT_CONFIG_VALUE_0"), Some("*"));
    let cmd = c.command.clone().expect("command");
    let i = cmd
        .iter()
        .position(|a| a == "--env-from-shell")
        .expect("the environment's activation");
    assert_eq!(
        cmd[i + 1],
        "source /opt/miniconda3/bin/activate && conda activate testbed"
    );
    let pod_sc = spec.security_context.as_ref().expect("pod security");
    assert_eq!(pod_sc.run_as_user, Some(65532));
    assert_eq!(pod_sc.fs_group, Some(65532));
    let repo = spec
        .volumes
        .as_ref()
        .and_then(|v| v.iter().find(|v| v.name == "selfplay-repo"))
        .and_then(|v| v.empty_dir.as_ref())
        .expect("the repository's emptyDir");
    assert_eq!(repo.size_limit.as_ref().map(|q| q.0.as_str()), Some("4Gi"));
}

#[test]
fn image_user_sandbox_runs_the_images_user_in_place_without_capabilities() {
    let pool: SandboxPool = one("pool-image-user.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let pod = sandbox_pod(&v, &cfg());
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.runtime_class_name.as_deref(), Some("gvisor"));
    assert_eq!(
        spec.init_containers
            .as_ref()
            .map(|i| i.iter().map(|c| c.name.as_str()).collect::<Vec<_>>()),
        Some(vec!["install-sidecar"]),
        "no copy: the repository is used in place"
    );
    let pod_sc = spec.security_context.as_ref().expect("pod security");
    assert_eq!(pod_sc.run_as_user, None);
    assert_eq!(pod_sc.run_as_non_root, None);
    let c = only_container(&pod);
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, None, "the image's user, root included");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_string()])
    );
    assert_eq!(mount_of(c, "/testbed"), None);
    assert_eq!(env_of(c, "HOME"), None, "the image's HOME");
    let cmd = c.command.clone().expect("command");
    assert!(
        cmd.windows(2)
            .any(|w| w[0] == "--env-from-shell" && w[1].contains("$HOME/.bashrc")),
        "the user's own start-up file: {cmd:?}"
    );
}

#[test]
fn image_user_without_a_runtime_class_and_odd_workdirs_are_rejected() {
    let mut pool: SandboxPool = one("pool-image-user.yaml");
    pool.spec.template.runtime_class_name = None;
    let err = validate_pool(&pool, &cfg()).expect_err("root without a sandboxed runtime");
    assert!(err.to_string().contains("runtimeClassName"), "{err}");
    for workdir in ["/", "/selfplay/repo", "/tmp/x", "/var/run/selfplay"] {
        let mut pool: SandboxPool = one("pool-swebench.yaml");
        pool.spec.template.workdir = workdir.to_string();
        let err = validate_pool(&pool, &cfg()).expect_err(workdir);
        assert!(
            err.to_string().contains("template.workdir"),
            "{workdir}: {err}"
        );
    }
}

/// A pool's environment's sandbox: the template with the environment's image, working
/// directory and activation, labelled with the environment and hashed on its own (so that
/// adding an environment rolls no other).
#[test]
fn environment_sandbox_pods_use_the_environments_image_and_carry_its_label() {
    use selfplay_operator::build::{environment_sandbox_pod, environment_template_hash};
    let pool: SandboxPool = common::one("pool-envs.yaml");
    let v = validate_pool(&pool, &cfg()).expect("valid");
    let env = &pool.spec.environments[0];
    let pod = environment_sandbox_pod(&v, env, &cfg());
    let labels = pod.metadata.labels.clone().expect("labels");
    assert_eq!(labels["selfplay.dev/environment"], "astropy-12907");
    assert_eq!(labels["selfplay.dev/pool"], "pyrepo");
    let hash = environment_template_hash(&v, env, &cfg());
    assert_eq!(labels["selfplay.dev/template-hash"], hash);
    assert_ne!(hash, v.template_hash);
    assert_ne!(
        hash,
        environment_template_hash(&v, &pool.spec.environments[1], &cfg())
    );
    let c = only_container(&pod);
    assert_eq!(
        c.image.as_deref(),
        Some("swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest")
    );
    assert_eq!(c.working_dir.as_deref(), Some("/testbed"));
    let cmd = c.command.clone().expect("command").join(" ");
    assert!(
        cmd.contains(
            "--env-from-shell source /opt/miniconda3/bin/activate && conda activate testbed"
        ),
        "{cmd}"
    );
}

#[test]
fn evaluation_tasks_are_mounted_from_their_config_map_and_validated() {
    let mut run: SelfPlayRun = one("run-tiny.yaml");
    run.spec.evaluation = Some(serde_yaml::from_str(
        "tasks: {configMap: {name: heldout, key: swe.jsonl}}\npool: heldout-pool\neverySteps: 5",
    )
    .expect("evaluation"));
    assert!(run.spec.uses_pool("heldout-pool") && run.spec.uses_pool("pyrepo"));
    assert!(!run.spec.uses_pool("other"));
    let v = validate_run(&run).expect("valid");
    let pod = trainer_pod(&v, 0, None, &cfg());
    let c = only_container(&pod);
    let file = std::path::Path::new(selfplay_crds::run::EVALUATION_TASKS_FILE);
    let dir = file.parent().expect("dir").to_str().expect("utf-8");
    assert_eq!(mount_of(c, dir), Some("evaluation-tasks"));
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == dir)
        .expect("mount");
    assert_eq!(mount.read_only, Some(true));
    // Not nested inside the run file's ConfigMap volume: kubelet could not make the mount point.
    assert!(
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.mount_path != dir)
            .all(|m| !dir.starts_with(&format!("{}/", m.mount_path))),
        "{dir} is under another mount"
    );
    let vol = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|vs| vs.iter().find(|v| v.name == "evaluation-tasks"))
        .and_then(|v| v.config_map.clone())
        .expect("configMap volume");
    assert_eq!(vol.name, "heldout");
    assert_eq!(vol.optional, Some(false));
    let item = &vol.items.expect("items")[0];
    assert_eq!(
        (item.key.as_str(), item.path.as_str()),
        (
            "swe.jsonl",
            file.file_name().and_then(|n| n.to_str()).expect("name")
        )
    );

    // A file is `trainer local`'s; the trainer pod has none of the user's files.
    let mut local = run.clone();
    local.spec.evaluation = Some(
        serde_yaml::from_str("tasks: {file: heldout.jsonl}\npool: pyrepo").expect("evaluation"),
    );
    let err = validate_run(&local).expect_err("refused");
    assert!(err.to_string().contains("evaluation.tasks.file"), "{err}");

    // Without an evaluation nothing is mounted.
    let plain: SelfPlayRun = one("run-tiny.yaml");
    let pod = trainer_pod(&validate_run(&plain).expect("valid"), 0, None, &cfg());
    assert_eq!(mount_of(only_container(&pod), dir), None);
}
