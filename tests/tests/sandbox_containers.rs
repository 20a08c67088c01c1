//! Sandboxes as the containers they are on a cluster, with a repository image laid out like
//! SWE-bench's (built here from Debian's packages, nothing pulled: `images/sample-env/build.sh`):
//! root user, root-owned `/testbed` with history, the package installed in development mode
//! into an environment outside the repository, activated from root's start-up file.
//!
//! 1. The operator renders a sandbox pod for it; the `docker run` arguments are derived from
//!    that Pod object by the trainer's translator (`engine::docker::plan`), never written
//!    here; the sidecar is driven over the pod's own port: edit, patch, snapshot and reset,
//!    history reset, a test run with a parser.
//! 2. `trainer local`'s Docker provider runs the same pod on one machine: the trainer's
//!    validation of a valid bug and the grading of fixes, then what the sandbox can and
//!    cannot do (network, capabilities, privileges), and that no container outlives its
//!    trainer, even one killed with SIGKILL.
//!
//! Skipped, with the reason printed, only when Docker does not answer or mmdebstrap is
//! missing. The first run builds the Debian root file system (about a minute, cached under
//! `target/`) and a static sidecar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sandbox_sidecar::SidecarClient;
use sandbox_sidecar::client::TestStatus;
use selfplay_crds::SandboxPool;
use selfplay_operator::build::sandbox_pod;
use selfplay_operator::config::OperatorConfig;
use selfplay_operator::validate::validate_pool;
use selfplay_tests::paths::{scratch_dir, target_dir, workspace_root};
use selfplay_trainer::engine::artifacts::Artifacts;
use selfplay_trainer::engine::diffs::reverse_diff;
use selfplay_trainer::engine::docker::plan::{HostVolume, PlanOptions, plan_pod};
use selfplay_trainer::engine::docker::{
    DockerProvider, DockerProviderConfig, OWNER_LABEL, owner_id, remove_plan, start_plan,
};
use selfplay_trainer::engine::ops::Ops;
use selfplay_trainer::engine::sandbox::SandboxProvider as _;
use selfplay_trainer::engine::solver::{BugTask, evaluate_patch, prepare_grading_workspace};
use selfplay_trainer::engine::validation::{ValidationConfig, validate};

const SIDECAR_IMAGE: &str = "selfplay-test/sandbox-sidecar:local";
const TIMEOUT: Duration = Duration::from_secs(120);

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Why these tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if run(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"])).is_err() {
        return Some("the Docker daemon does not answer".to_string());
    }
    if run(Command::new("mmdebstrap").arg("--version")).is_err() {
        return Some("mmdebstrap is not installed (apt-get install mmdebstrap)".to_string());
    }
    None
}

struct Built {
    sidecar: PathBuf,
}

/// Builds the sample environment image, a static sidecar and an image holding it, once.
fn built() -> &'static Result<Built, String> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = workspace_root();
        run(Command::new("bash").arg(root.join("images/sample-env/build.sh")))?;
        let out = run(Command::new("bash").arg(root.join("scripts/build-static-sidecar.sh")))?;
        let sidecar = PathBuf::from(out.lines().last().unwrap_or("").trim());
        // The sidecar image as images/Dockerfile makes it: the static binary on an empty
        // base, run as 65532.
        let ctx = scratch_dir("sidecar-image");
        std::fs::copy(&sidecar, ctx.join("sandbox-sidecar")).map_err(|e| e.to_string())?;
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY sandbox-sidecar /usr/local/bin/sandbox-sidecar\nUSER 65532:65532\n",
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("docker")
            .args(["build", "--quiet", "--network", "none", "-t", SIDECAR_IMAGE])
            .arg(&ctx))?;
        Ok(Built { sidecar })
    })
}

fn setup(test: &str) -> Option<&'static Built> {
    if let Some(why) = missing() {
        eprintln!("\n\n!!!!! SKIPPING {test}: {why}\n\n");
        return None;
    }
    match built() {
        Ok(b) => Some(b),
        Err(e) => panic!("building the sample environment: {e}"),
    }
}

const POOL_YAML: &str = r#"
apiVersion: selfplay.dev/v1alpha1
kind: SandboxPool
metadata:
  name: sample-env
  namespace: default
  uid: 0b7e6c1e-5d7c-4a53-9a51-2b0c4c1f7d10
spec:
  template:
    image: selfplay/sample-env:latest
    imagePullPolicy: Never
    workdir: /testbed
    # SWE-bench's images activate their environment from root's ~/.bashrc, which the
    # sandbox's non-root user cannot read: the pool names the activation.
    shellInit: source /opt/miniconda3/bin/activate && conda activate testbed
    resources:
      limits: {cpu: "1", memory: 1Gi}
  warm: 1
  max: 4
"#;

fn pool() -> SandboxPool {
    serde_yaml::from_str(POOL_YAML).expect("pool fixture")
}

fn artifacts(name: &str) -> Artifacts {
    Artifacts::from_dir(&workspace_root().join("trainer/assets/artifacts").join(name))
        .expect("artifact set")
}

async fn shell(c: &SidecarClient, script: &str) -> (i32, String) {
    let r = c
        .exec_shell(script, Some(Duration::from_secs(60)))
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    (
        r.exit_code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_sandbox_pod_runs_a_swe_bench_style_image() {
    let Some(built) = setup("the_operators_sandbox_pod_runs_a_swe_bench_style_image") else {
        return;
    };
    let pool = pool();
    let cfg = OperatorConfig {
        sidecar_image: SIDECAR_IMAGE.to_string(),
        image_pull_policy: Some("Never".to_string()),
        ..OperatorConfig::default()
    };
    let valid = validate_pool(&pool, &cfg).expect("valid pool");
    let pod = sandbox_pod(&valid, &cfg);

    // The token Secret's content, as the kubelet would project it.
    let dir = scratch_dir("operator-pod");
    let token_dir = dir.join("token");
    std::fs::create_dir_all(&token_dir).unwrap();
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(token_dir.join("token"), token).unwrap();
    set_mode(&dir, 0o755);
    set_mode(&token_dir, 0o755);
    set_mode(&token_dir.join("token"), 0o444);
    // An internal network: the test reaches the pod's port; the pod reaches nothing else.
    let network = format!("selfplay-test-{}", std::process::id());
    let _ = run(Command::new("docker").args(["network", "rm", &network]));
    run(Command::new("docker").args(["network", "create", "--internal", &network])).unwrap();
    let owner = owner_id(std::process::id()).unwrap();
    let opts = PlanOptions {
        name_prefix: format!("selfplay-test-{}", std::process::id()),
        labels: BTreeMap::from([(OWNER_LABEL.to_string(), owner)]),
        network: network.clone(),
        host_volumes: BTreeMap::from([(
            "selfplay-token".to_string(),
            HostVolume {
                path: token_dir.clone(),
                read_only: true,
            },
        )]),
        skip_init: Vec::new(),
        pids_limit: Some(1024),
        holder_binary: Some(built.sidecar.clone()),
        holder_lease: None,
    };
    let plan = plan_pod(&pod, &opts).expect("the pod translates");
    // Every init container runs: the sidecar installs itself, then copies the repository; a
    // holder keeps the pod's volumes mounted in between.
    assert!(plan.holder.is_some());
    assert_eq!(
        plan.init
            .iter()
            .map(|r| r.container.as_str())
            .collect::<Vec<_>>(),
        ["install-sidecar", "copy-repository"]
    );
    let started = Instant::now();
    let result = async {
        start_plan("docker", &plan).await?;
        let ip = run(Command::new("docker").args([
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &plan.main.name,
        ]))?;
        let addr = format!("{}:7070", ip.trim());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match SidecarClient::connect(addr.clone(), token).await {
                Ok(c) => {
                    eprintln!("pod answered {:?} after docker run", started.elapsed());
                    drive(&c).await;
                    return Ok::<(), String>(());
                }
                Err(e) if Instant::now() > deadline => {
                    let logs = run(Command::new("docker").args(["logs", &plan.main.name]));
                    return Err(format!("no sidecar at {addr}: {e}; logs: {logs:?}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    .await;
    remove_plan("docker", &plan);
    let _ = run(Command::new("docker").args(["network", "rm", &network]));
    result.unwrap();
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Everything an episode does to a sandbox, on the SWE-bench-style image.
async fn drive(c: &SidecarClient) {
    let (code, out) = shell(
        c,
        "id -u; echo HOME=$HOME; command -v python3; stat -c '%u %a' /testbed/tinytext/__init__.py /testbed/.git; \
         git status --porcelain; echo status=$?; \
         cd / && python3 -c 'import tinytext; print(tinytext.__file__)'",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65532", "the sandbox's non-root user: {out}");
    assert_eq!(lines[1], "HOME=/selfplay/home", "{out}");
    assert_eq!(
        lines[2], "/opt/miniconda3/envs/testbed/bin/python3",
        "the environment the image activates: {out}"
    );
    assert!(
        lines[3] == "65532 644" && lines[4].starts_with("65532 "),
        "the copy is the user's, modes kept: {out}"
    );
    assert!(
        out.contains("status=0") && !out.contains("dubious"),
        "git works in the copy, with nothing changed: {out}"
    );
    assert_eq!(
        lines.last().copied(),
        Some("/testbed/tinytext/__init__.py"),
        "the development-mode install resolves to the copy at the same path: {out}"
    );

    // Edit, snapshot, reset.
    c.snapshot(Some("before"), &[]).await.expect("snapshot");
    c.write_file("tinytext/extra.py", b"X = 1\n".to_vec())
        .await
        .expect("write a file in the root-owned repository's copy");
    let (code, out) = shell(c, "python3 -c 'import tinytext.extra as e; print(e.X)'").await;
    assert_eq!((code, out.trim()), (0, "1"));
    c.reset(Some("before")).await.expect("reset");
    let (code, out) = shell(c, "test -e tinytext/extra.py; echo $?").await;
    assert_eq!((code, out.trim()), (0, "1"), "reset removes the new file");

    // A patch (the valid bug), then a history reset.
    let a = artifacts("valid");
    c.apply_patch(a.bug_inject_diff.clone().unwrap_or_default(), false, false)
        .await
        .expect("the bug's diff applies");
    c.reset_history().await.expect("history reset");
    let (code, out) = shell(
        c,
        "git log --oneline | wc -l; git status --porcelain | wc -l",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["1", "0"],
        "one commit, nothing uncommitted: {out}"
    );

    // The test script with its parser: the bug fails some tests, most pass.
    let r = Ops::new(c)
        .run_tests(
            a.test_script.as_deref().unwrap_or_default(),
            a.test_parser.as_deref().unwrap_or_default(),
            TIMEOUT,
        )
        .await
        .expect("test run");
    let passed = r
        .statuses
        .values()
        .filter(|s| **s == TestStatus::Passed)
        .count();
    let failed = r.statuses.len() - passed;
    assert!(
        passed >= 20 && failed >= 1 && r.parser_error.is_none(),
        "parsed results: {passed} passed, {failed} not; {}",
        r.output_tail
    );
}

fn docker_provider(built: &Built, dir: &Path, run: &str) -> DockerProvider {
    let spec = pool().spec;
    DockerProvider::new(DockerProviderConfig {
        run: run.to_string(),
        pools: BTreeMap::from([("sample-env".to_string(), spec)]),
        sidecar: built.sidecar.clone(),
        work_dir: dir.to_path_buf(),
        docker: "docker".to_string(),
        pids_limit: 256,
    })
    .expect("docker provider")
}

fn containers_of(owner_pid: u32) -> Vec<String> {
    run(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        &format!("label={OWNER_LABEL}"),
        "--format",
        &format!("{{{{.Names}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}"),
    ]))
    .unwrap_or_default()
    .lines()
    .filter(|l| {
        l.split_once(' ')
            .is_some_and(|(_, o)| o.starts_with(&format!("{owner_pid}-")))
    })
    .map(str::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sandboxes_validate_and_grade_a_bug() {
    let Some(built) = setup("docker_sandboxes_validate_and_grade_a_bug") else {
        return;
    };
    let dir = scratch_dir("docker-provider");
    let p = docker_provider(built, &dir, "docker-validate");

    // What the sandbox can and cannot do.
    let t = Instant::now();
    let sb = p.acquire("sample-env").await.expect("a sandbox");
    eprintln!("docker sandbox answered after {:?}", t.elapsed());
    let (code, out) = shell(
        sb.client(),
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; ls /sys/class/net; \
         python3 -c 'import socket; socket.create_connection((\"10.0.0.1\", 80), timeout=2)' \
           2>&1 | tail -1; cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null; true",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("CapEff:\t0000000000000000"),
        "no capabilities: {out}"
    );
    assert!(out.contains("NoNewPrivs:\t1"), "no privilege gain: {out}");
    assert!(
        out.lines().any(|l| l.trim() == "lo") && !out.contains("eth0"),
        "no network but loopback: {out}"
    );
    assert!(out.contains("256"), "the pids limit: {out}");
    // The agent cannot put a fake sidecar where the trainer connects, nor drop the lease.
    let (_, out) = shell(
        sb.client(),
        "rm -f /selfplay/run/sidecar.sock; echo rm=$?; mv /selfplay/run/lease /tmp/l; echo mv=$?; \
         touch /selfplay/run/x; echo touch=$?",
    )
    .await;
    assert!(
        out.contains("rm=1") && out.contains("mv=1") && out.contains("touch=1"),
        "{out}"
    );
    assert_eq!(sb.external_failure().await, None, "a healthy sandbox");
    // An agent that tries to break its sandbox to escape a failing reward (or to pass for
    // an outside kill, which is masked): its PID 1 cannot be signalled from inside.
    let _ = sb
        .client()
        .exec_shell("kill -9 1; kill -TERM 1; kill -INT 1; kill -9 -1", None)
        .await;
    sb.client()
        .health()
        .await
        .expect("the sidecar survives its agent");
    assert_eq!(sb.external_failure().await, None);
    sb.release().await.unwrap();

    // Killed from outside while in use: not the agent's doing, so masked.
    let sb = p.acquire("sample-env").await.unwrap();
    run(Command::new("docker").args(["kill", sb.id()])).unwrap();
    let why = sb.external_failure().await;
    assert!(
        why.as_deref()
            .is_some_and(|w| w.contains("killed from outside")),
        "{why:?}"
    );
    sb.release().await.unwrap();

    // The trainer's validation of the valid bug, then grading in fresh sandboxes.
    let a = artifacts("valid");
    let sb = p.acquire("sample-env").await.unwrap();
    let report = validate(sb.client(), &a, &ValidationConfig::default())
        .await
        .expect("validation runs");
    sb.release().await.unwrap();
    let task = BugTask::from_validated(&a, &report)
        .unwrap_or_else(|| panic!("the valid set is valid in a container: {report:?}"));
    let fix = reverse_diff(&task.bug_inject_diff).unwrap();
    for (what, patch, solved) in [("the fix", fix.as_str(), true), ("no change", "", false)] {
        let sb = p.acquire("sample-env").await.unwrap();
        prepare_grading_workspace(sb.client(), &task).await.unwrap();
        let e = evaluate_patch(sb.client(), &task, patch, TIMEOUT)
            .await
            .unwrap();
        sb.release().await.unwrap();
        assert_eq!(e.solved, solved, "{what}: {e:?}");
    }
    // Other tests of this process run containers too: look at this provider's run only.
    let left = run(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        "label=selfplay.dev/local-run=docker-validate",
        "--format",
        "{{.Names}}",
    ]))
    .unwrap_or_default();
    assert!(
        left.trim().is_empty(),
        "released sandboxes leave no container: {left}"
    );
    drop(p);
}

/// A trainer killed with SIGKILL leaves no container: the sidecar sees the lease free and
/// stops its container; the next provider removes what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_container_outlives_a_killed_trainer() {
    let Some(built) = setup("no_container_outlives_a_killed_trainer") else {
        return;
    };
    let dir = scratch_dir("docker-killed");
    let run_file = dir.join("run.yaml");
    let pool = POOL_YAML.replace(
        "  namespace: default\n  uid: 0b7e6c1e-5d7c-4a53-9a51-2b0c4c1f7d10\n",
        "",
    );
    std::fs::write(
        &run_file,
        format!(
            "apiVersion: selfplay.dev/v1alpha1\nkind: SelfPlayRun\nmetadata:\n  name: killed\n\
             spec:\n  model:\n    tiny: {{seed: 0}}\n  pools:\n    - name: sample-env\n---{pool}"
        ),
    )
    .unwrap();
    let trainer = target_dir().join("debug/trainer");
    let mut child = Command::new(&trainer)
        .arg("sandbox")
        .arg(&run_file)
        .args(["--", "echo ready; sleep 600"])
        .env("SELFPLAY_STATIC_SIDECAR", &built.sidecar)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trainer sandbox");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(90);
    while containers_of(pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the trainer started no container"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let the sidecar answer and the command start.
    std::thread::sleep(Duration::from_secs(3));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait();
    let killed = Instant::now();
    // The sandbox container stops by itself (the lease); what is stopped is removed by the
    // next provider to start.
    loop {
        let running = run(Command::new("docker").args([
            "ps",
            "--filter",
            &format!("label={OWNER_LABEL}"),
            "--format",
            &format!("{{{{.Label \"{OWNER_LABEL}\"}}}}"),
        ]))
        .unwrap_or_default();
        if !running.lines().any(|o| o.starts_with(&format!("{pid}-"))) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the container still runs {:?} after its trainer was killed",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "container stopped {:?} after the trainer was killed",
        killed.elapsed()
    );
    drop(docker_provider(built, &dir.join("next"), "next"));
    assert!(
        containers_of(pid).is_empty(),
        "the next provider removes the dead trainer's containers"
    );
}
