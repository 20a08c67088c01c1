//! `trainer cluster`'s loop end to end against the operator's broker, without Kubernetes:
//! the broker (real gRPC on loopback) runs on the in-memory backend, which has the API
//! server's optimistic-lock semantics; its "sandbox pods" are real `sandbox-sidecar`
//! processes, each serving its own clone of the sample repository on its own loopback
//! address (127.0.0.N, the pod IP) and the pool's sidecar port, with the pool's token.
//!
//! Checked: every sandbox the loop used was acquired through the broker and released
//! (deleted, never handed out twice), progress reached the broker (the run's status), and
//! each checkpoint was written to the run's volume and registered as a `Checkpoint`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::runtime::reflector;
use kube::runtime::watcher;
use sandbox_sidecar::spawn::{SpawnOptions, SpawnedSidecar};
use selfplay_crds::{SandboxPool, SelfPlayRun};
use selfplay_operator::broker::client::BrokerClient;
use selfplay_operator::broker::memory::MemoryBackend;
use selfplay_operator::broker::service::service;
use selfplay_operator::broker::{Broker, BrokerSettings};
use selfplay_operator::metrics::Metrics;
use selfplay_trainer::engine::local::find_sidecar;
use selfplay_trainer::engine::sample::materialize_sample_repo;
use selfplay_trainer::train::cluster::{ClusterOptions, run_cluster};
use serde_json::json;
use tokio::sync::Notify;

const NS: &str = "team-a";
const RUN: &str = "cluster-e2e";
const POOL: &str = "sample";
const RUN_TOKEN: &str = "run-token-0123456789";
const POOL_TOKEN: &str = "pool-token-0123456789";
const SANDBOXES: usize = 12;

fn run_yaml() -> String {
    format!(
        r#"apiVersion: selfplay.dev/v1alpha1
kind: SelfPlayRun
metadata:
  name: {RUN}
  namespace: {NS}
  uid: 0b0e2e00-0000-4000-8000-000000000001
spec:
  model:
    tiny:
      seed: 0
      hiddenSize: 64
      numLayers: 2
    dtype: f32
  pools:
    - name: {POOL}
  selfPlay:
    solverGroupSize: 2
    injectorEpisodesPerStep: 2
    minPassingTests: 2
    maxTurns: 2
    maxTokens: 6144
    maxTokensPerTurn: 32
  training:
    totalSteps: 2
    microBatchSize: 2
    seed: 0
  trainer:
    gpus: 0
    concurrency: 2
  checkpoint:
    everySteps: 1
    keepLast: 2
"#
    )
}

fn pool(port: u16) -> SandboxPool {
    serde_json::from_value(json!({
        "apiVersion": "selfplay.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": POOL, "namespace": NS, "uid": "0b0e2e00-0000-4000-8000-000000000002"},
        "spec": {
            "template": {"image": "python:3.12-slim", "workdir": "/workspace"},
            "warm": SANDBOXES, "max": SANDBOXES, "sidecarPort": port
        }
    }))
    .expect("pool")
}

fn sandbox_pod(i: usize) -> Pod {
    let created = k8s_openapi::jiff::Timestamp::now().as_second() - 60;
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{POOL}-{i:03}"), "namespace": NS, "uid": format!("uid-{i}"),
            "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created).expect("time").to_string(),
            "labels": {"selfplay.dev/component": "sandbox", "selfplay.dev/pool": POOL, "selfplay.dev/template-hash": "h"}
        },
        "status": {"phase": "Running", "podIP": pod_ip(i), "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

fn pod_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 2)
}

/// A port free on 127.0.0.1; the sandboxes listen on it at 127.0.0.2 and up.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_loop_trains_through_the_broker() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();

    // The sandbox "pods": real sidecars on 127.0.0.N:port with the pool's token.
    let sidecar =
        find_sidecar().expect("the trainer binary serves as the sidecar (cargo builds it)");
    let mut sidecars = Vec::new();
    for i in 0..SANDBOXES {
        let ws = tmp.path().join(format!("sandbox-{i}"));
        materialize_sample_repo(&ws).expect("the sample repository");
        let mut o = SpawnOptions::new(&ws);
        o.binary = Some(sidecar.program.clone());
        o.binary_args = sidecar
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        o.token = Some(POOL_TOKEN.into());
        o.listen = Some(format!("{}:{port}", pod_ip(i)));
        sidecars.push(SpawnedSidecar::spawn(o).await.expect("sidecar"));
    }

    // The broker, its caches filled as the controllers' reflectors would fill them.
    let backend = Arc::new(MemoryBackend::new());
    backend.put_secret(NS, &format!("{RUN}-trainer-token"), RUN_TOKEN);
    backend.put_secret(NS, &format!("{POOL}-sandbox-token"), POOL_TOKEN);
    let (sandboxes, mut sw) = reflector::store::<Pod>();
    for i in 0..SANDBOXES {
        let stored = backend.put_pod(sandbox_pod(i));
        sw.apply_watcher_event(&watcher::Event::Apply(stored));
    }
    let (pools, mut pw) = reflector::store::<SandboxPool>();
    pw.apply_watcher_event(&watcher::Event::Apply(pool(port)));
    let run: SelfPlayRun = selfplay_crds::validate::parse_run_yaml(&run_yaml()).expect("run");
    let (runs, mut rw) = reflector::store::<SelfPlayRun>();
    rw.apply_watcher_event(&watcher::Event::Apply(run));
    let metrics = Metrics::new();
    let broker = Arc::new(Broker::new(
        backend.clone(),
        sandboxes,
        pools,
        runs,
        Arc::new(Notify::new()),
        metrics.clone(),
        BrokerSettings {
            default_wait: Duration::from_secs(5),
            // The sandboxes are the sidecar processes started above; nothing could start more.
            cold_start: false,
            ..Default::default()
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let svc = service(broker.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    // The trainer pod's part: the run file from the ConfigMap, the run's volume.
    let run_file = tmp.path().join("run.yaml");
    std::fs::write(&run_file, run_yaml()).expect("run file");
    let volume = tmp.path().join("volume");
    let client = BrokerClient::new(&addr, NS, RUN, RUN_TOKEN).expect("broker client");
    let opts = ClusterOptions {
        run_file,
        checkpoint_dir: volume.clone(),
        metrics_listen: None,
        model_dir: None,
        resume_from: None,
    };
    let steps = tokio::time::timeout(Duration::from_secs(600), run_cluster(opts, client))
        .await
        .expect("two steps within 10 minutes")
        .expect("run_cluster");
    assert_eq!(steps, 2);
    // The policy really played in the brokered sandboxes: every injector episode took turns.
    let mut episodes = 0;
    for step in ["step-000001", "step-000002"] {
        let f = volume.join("episodes").join(step).join("episodes.jsonl");
        let text = std::fs::read_to_string(&f).expect("episode records");
        for line in text.lines() {
            let e: serde_json::Value = serde_json::from_str(line).expect("json");
            assert_eq!(e["role"], "injector");
            assert!(e["turns"].as_u64().unwrap_or(0) >= 1, "{line}");
            assert!(
                e["infra_errors"].as_array().is_some_and(|a| a.is_empty()),
                "{line}"
            );
            episodes += 1;
        }
    }
    assert_eq!(episodes, 4);

    // Every sandbox used came from the broker and was deleted after use, each at most once.
    let deleted = backend.deleted.lock().expect("deleted").clone();
    assert!(
        deleted.len() >= 4,
        "2 steps × 2 injector episodes need at least 4 sandboxes: {deleted:?}"
    );
    let unique: HashSet<_> = deleted.iter().collect();
    assert_eq!(unique.len(), deleted.len(), "a sandbox released twice");
    for (ns, name) in &deleted {
        assert_eq!(ns, NS);
        let pod = backend.pod(ns, name);
        assert!(pod.is_none(), "{name} still exists after its release");
    }
    // The claim the broker wrote names this run on every pod it handed out; pods it never
    // handed out are untouched.
    let left: Vec<String> = (0..SANDBOXES)
        .filter_map(|i| backend.pod(NS, &format!("{POOL}-{i:03}")))
        .map(|p| p.name_any())
        .collect();
    assert_eq!(left.len() + deleted.len(), SANDBOXES);

    // Progress reached the run's status; the snapshot says step 2.
    let progress = backend
        .progress
        .lock()
        .expect("progress")
        .get(&(NS.to_string(), RUN.to_string()))
        .cloned()
        .expect("a progress report");
    assert_eq!(progress.step, 2, "{progress:?}");

    // Both checkpoints were written to the volume and registered as Checkpoint objects.
    let ckpts = backend.checkpoints.lock().expect("checkpoints").clone();
    let mut names: Vec<String> = ckpts.keys().map(|(_, n)| n.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        vec![format!("{RUN}-step-1"), format!("{RUN}-step-2")],
        "{ckpts:?}"
    );
    for c in ckpts.values() {
        let dir = Path::new(&c.spec.location);
        assert!(
            dir.starts_with(&volume) && dir.join("model.safetensors").is_file(),
            "{c:?}"
        );
    }

    for s in sidecars {
        s.shutdown(Duration::from_secs(2)).await;
    }
}
