//! The operator's sandbox pod as Docker commands (`engine::docker::plan`), without a Docker
//! Engine: each security setting of the rendered Pod reaches `docker run`, and what the
//! translation cannot honour is refused rather than dropped.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, Pod};
use selfplay_crds::SandboxPool;
use selfplay_operator::build::sandbox_pod;
use selfplay_operator::config::OperatorConfig;
use selfplay_operator::validate::validate_pool;
use selfplay_trainer::engine::docker::local_pod;
use selfplay_trainer::engine::docker::plan::{HostVolume, PlanError, PlanOptions, plan_pod};

const POOL: &str = r#"
apiVersion: selfplay.dev/v1alpha1
kind: SandboxPool
metadata: {name: astropy, namespace: team-a, uid: 6f1c2a3e-0000-4000-8000-000000000003}
spec:
  template:
    image: swebench/sweb.eval.x86_64.astropy__astropy-12907:latest
    workdir: /testbed
    shellInit: source /opt/miniconda3/bin/activate && conda activate testbed
    resources:
      limits: {cpu: 1500m, memory: 3Gi}
"#;

fn pod() -> Pod {
    let pool: SandboxPool = serde_yaml::from_str(POOL).unwrap();
    let cfg = OperatorConfig::default();
    sandbox_pod(&validate_pool(&pool, &cfg).unwrap(), &cfg)
}

fn opts() -> PlanOptions {
    PlanOptions {
        name_prefix: "sb-1".to_string(),
        labels: BTreeMap::from([("selfplay.dev/local-owner".to_string(), "1-2".to_string())]),
        network: String::new(),
        host_volumes: BTreeMap::from([(
            "selfplay-token".to_string(),
            HostVolume {
                path: "/run/sb-1/token".into(),
                read_only: true,
            },
        )]),
        skip_init: Vec::new(),
        pids_limit: Some(512),
        holder_binary: Some("/opt/selfplay/sandbox-sidecar".into()),
        holder_lease: None,
    }
}

/// The value following `flag` each time it appears.
fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

#[test]
fn every_container_keeps_the_pods_restrictions() {
    let plan = plan_pod(&pod(), &opts()).expect("plan");
    assert_eq!(plan.init.len(), 2);
    for r in plan.init.iter().chain(std::iter::once(&plan.main)) {
        let a = &r.args;
        assert_eq!(values(a, "--user"), ["65532:65532"], "{}", r.container);
        assert_eq!(values(a, "--group-add"), ["65532"], "{}", r.container);
        assert_eq!(values(a, "--cap-drop"), ["ALL"], "{}", r.container);
        assert!(values(a, "--cap-add").is_empty(), "{}", r.container);
        assert_eq!(
            values(a, "--security-opt"),
            ["no-new-privileges"],
            "{}",
            r.container
        );
        assert_eq!(values(a, "--network"), ["none"], "{}", r.container);
        assert_eq!(values(a, "--pids-limit"), ["512"], "{}", r.container);
        assert_eq!(
            values(a, "--label"),
            ["selfplay.dev/local-owner=1-2"],
            "{}",
            r.container
        );
    }
    let main = &plan.main.args;
    assert_eq!(main[1], "--detach");
    assert_eq!(values(main, "--memory"), ["3221225472"]);
    assert_eq!(values(main, "--memory-swap"), ["3221225472"]);
    assert_eq!(values(main, "--cpus"), ["1.5"]);
    assert_eq!(values(main, "--workdir"), ["/testbed"]);
    assert!(values(main, "--env").contains(&"HOME=/selfplay/home"));
    assert_eq!(
        values(main, "--entrypoint"),
        ["/selfplay/bin/sandbox-sidecar"]
    );
    let image_at = main
        .iter()
        .position(|a| a.starts_with("swebench/"))
        .expect("image");
    assert_eq!(main[image_at + 1], "serve");
    let mounts = values(main, "--mount");
    assert!(mounts.contains(&"type=volume,source=sb-1-selfplay-repo,target=/testbed"));
    assert!(mounts.contains(&"type=volume,source=sb-1-selfplay-bin,target=/selfplay/bin,readonly"));
    assert!(mounts.contains(&"type=bind,source=/run/sb-1/token,target=/var/run/selfplay,readonly"));
    // emptyDirs: tmpfs volumes of mode 0777 owned by fsGroup, with the size limit.
    let repo = plan
        .volumes
        .iter()
        .find(|v| v.name == "sb-1-selfplay-repo")
        .expect("repository volume");
    assert!(
        repo.create_args
            .contains(&"o=mode=0777,gid=65532,size=8589934592".to_string()),
        "{:?}",
        repo.create_args
    );
}

#[test]
fn the_local_pod_serves_a_unix_socket_and_holds_the_lease() {
    let pool: SandboxPool = serde_yaml::from_str(POOL).unwrap();
    let pod = local_pod("astropy", &pool.spec);
    let c = &pod.spec.as_ref().unwrap().containers[0];
    let cmd = c.command.clone().unwrap();
    assert!(!cmd.contains(&"--listen".to_string()), "{cmd:?}");
    assert_eq!(
        values(&cmd, "--listen-unix"),
        ["/selfplay/run/sidecar.sock"]
    );
    assert_eq!(values(&cmd, "--lease-file"), ["/selfplay/run/lease"]);
    // Otherwise the operator's pod: same activation, same workspace.
    assert_eq!(
        values(&cmd, "--env-from-shell"),
        ["source /opt/miniconda3/bin/activate && conda activate testbed"]
    );
    assert_eq!(values(&cmd, "--workspace"), ["/testbed"]);
}

#[test]
fn what_cannot_be_honoured_is_refused() {
    let mut p = pod();
    p.spec.as_mut().unwrap().containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .privileged = Some(true);
    assert!(matches!(
        plan_pod(&p, &opts()),
        Err(PlanError::Unsupported { .. })
    ));

    let mut p = pod();
    p.spec.as_mut().unwrap().containers[0]
        .env
        .get_or_insert_with(Vec::new)
        .push(EnvVar {
            name: "NODE".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
    assert!(matches!(
        plan_pod(&p, &opts()),
        Err(PlanError::Unsupported { .. })
    ));

    // The token Secret without a host directory standing in for it.
    let mut o = opts();
    o.host_volumes.clear();
    assert_eq!(
        plan_pod(&pod(), &o),
        Err(PlanError::UnboundVolume("selfplay-token".to_string()))
    );

    // runAsNonRoot with the user taken away: the kubelet would refuse it, so do we.
    let mut p = pod();
    let spec = p.spec.as_mut().unwrap();
    spec.security_context.as_mut().unwrap().run_as_user = None;
    spec.security_context.as_mut().unwrap().run_as_group = None;
    assert!(matches!(
        plan_pod(&p, &opts()),
        Err(PlanError::RootUser { .. })
    ));
}

/// A pool giving only requests gets limits from them on one machine as on a cluster: a
/// Docker sandbox is never unlimited.
#[test]
fn the_local_pod_has_the_operators_limits() {
    let pool: SandboxPool = serde_yaml::from_str(&POOL.replace(
        "limits: {cpu: 1500m, memory: 3Gi}",
        "requests: {cpu: 500m, memory: 1Gi}",
    ))
    .unwrap();
    let mut o = opts();
    o.host_volumes.insert(
        "selfplay-run".to_string(),
        HostVolume {
            path: "/run/sb-1/run".into(),
            read_only: false,
        },
    );
    let plan = plan_pod(&local_pod("astropy", &pool.spec), &o).expect("plan");
    assert_eq!(values(&plan.main.args, "--memory"), ["1073741824"]);
    assert_eq!(values(&plan.main.args, "--cpus"), ["0.5"]);
}
