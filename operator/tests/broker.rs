//! The broker over real gRPC (tonic on loopback) with the in-memory backend, which has the
//! API server's optimistic-lock semantics (a claim carries the resourceVersion it read and
//! fails if the pod changed). The Kubernetes backend's claim request itself is checked
//! against the mocked API server in `controllers.rs`. No real API server is involved.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::one;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use selfplay_crds::{ProgressSnapshot, SandboxPool, SelfPlayRun};
use selfplay_operator::broker::client::BrokerClient;
use selfplay_operator::broker::memory::MemoryBackend;
use selfplay_operator::broker::service::service;
use selfplay_operator::broker::{Broker, BrokerSettings};
use selfplay_operator::metrics::Metrics;
use serde_json::json;
use tokio::sync::Notify;

const NS: &str = "team-a";
const RUN_TOKEN: &str = "run-token-0123";
const POOL_TOKEN: &str = "pool-token-4567";

fn sandbox(i: usize) -> Pod {
    let created = k8s_openapi::jiff::Timestamp::now().as_second() - 60;
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("pyrepo-{i:03}"), "namespace": NS, "uid": format!("uid-{i}"),
            "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created).expect("time").to_string(),
            "labels": {"selfplay.dev/component": "sandbox", "selfplay.dev/pool": "pyrepo", "selfplay.dev/template-hash": "h"}
        },
        "status": {"phase": "Running", "podIP": format!("10.0.0.{i}"), "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

/// One broker: the service, its address, its cache's writer, its change signal.
type BrokerUnderTest = (Arc<Broker<MemoryBackend>>, String, Writer<Pod>, Arc<Notify>);

struct Harness {
    backend: Arc<MemoryBackend>,
    metrics: Metrics,
    brokers: Vec<BrokerUnderTest>,
    _w: Vec<(Writer<SandboxPool>, Writer<SelfPlayRun>)>,
}

/// `brokers` brokers, each with its own cache of `pods` (never updated by claims: as stale
/// as a cache can be), all on one backend.
async fn harness(backend: MemoryBackend, brokers: usize, pods: usize) -> Harness {
    let backend = Arc::new(backend);
    backend.put_secret(NS, "qwen-ssr-trainer-token", RUN_TOKEN);
    backend.put_secret(NS, "pyrepo-sandbox-token", POOL_TOKEN);
    let stored: Vec<Pod> = (0..pods).map(|i| backend.put_pod(sandbox(i))).collect();
    let metrics = Metrics::new();
    let mut h = Harness {
        backend: backend.clone(),
        metrics: metrics.clone(),
        brokers: Vec::new(),
        _w: Vec::new(),
    };
    for _ in 0..brokers {
        let (sandboxes, mut sw) = reflector::store::<Pod>();
        for p in &stored {
            sw.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        }
        let (pools, mut pw) = reflector::store::<SandboxPool>();
        pw.apply_watcher_event(&watcher::Event::Apply(one::<SandboxPool>(
            "pool-basic.yaml",
        )));
        let (runs, mut rw) = reflector::store::<SelfPlayRun>();
        rw.apply_watcher_event(&watcher::Event::Apply(one::<SelfPlayRun>("run-gpu.yaml")));
        let changed = Arc::new(Notify::new());
        // These tests are about warm sandboxes: no cold starts (tests/cold_start.rs has those).
        let settings = BrokerSettings {
            default_wait: Duration::from_millis(300),
            cold_start: false,
            ..Default::default()
        };
        let broker = Arc::new(Broker::new(
            backend.clone(),
            sandboxes,
            pools,
            runs,
            changed.clone(),
            metrics.clone(),
            settings,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = format!("http://{}", listener.local_addr().expect("addr"));
        let svc = service(broker.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        h.brokers.push((broker, addr, sw, changed));
        h._w.push((pw, rw));
    }
    h
}

fn client(addr: &str, token: &str) -> BrokerClient {
    BrokerClient::new(addr, NS, "qwen-ssr", token).expect("client")
}

/// 2 brokers with stale caches, 20 Ready sandboxes, 40 concurrent acquires: returns the
/// sandboxes handed out and the number of timeouts.
async fn storm(backend: MemoryBackend) -> (Vec<String>, usize, Arc<MemoryBackend>, Metrics) {
    let h = harness(backend, 2, 20).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = client(&h.brokers[i % 2].1, RUN_TOKEN);
        tasks.push(tokio::spawn(async move {
            c.acquire("pyrepo", Duration::from_millis(300)).await
        }));
    }
    let mut got = Vec::new();
    let mut timeouts = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(lease) => {
                assert_eq!(lease.token, POOL_TOKEN);
                assert!(lease.address.ends_with(":7070"), "{}", lease.address);
                got.push(lease.sandbox);
            }
            Err(selfplay_operator::broker::client::ClientError::Rpc(s))
                if s.code() == tonic::Code::DeadlineExceeded =>
            {
                timeouts += 1
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    (got, timeouts, h.backend, h.metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acquires_never_hand_out_one_sandbox_twice() {
    let (got, timeouts, backend, metrics) = storm(MemoryBackend::new()).await;
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(got.len(), 20, "every sandbox handed out once");
    assert_eq!(unique.len(), 20, "no sandbox handed out twice: {got:?}");
    assert_eq!(timeouts, 20, "the other 20 requests waited and timed out");
    assert!(
        backend.conflicts.load(Ordering::SeqCst) > 0,
        "the stale caches did collide on the lock"
    );
    for name in &got {
        let pod = backend.pod(NS, name).expect("pod");
        assert_eq!(
            pod.metadata.labels.as_ref().expect("labels")["selfplay.dev/claimed-by"],
            "qwen-ssr"
        );
    }
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"selfplay_broker_acquire_total{namespace="team-a",outcome="ok",pool="pyrepo"} 20"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"selfplay_broker_acquire_total{namespace="team-a",outcome="timeout",pool="pyrepo"} 20"#
    ));
    assert!(text.contains(
        r#"selfplay_broker_acquire_duration_seconds_count{namespace="team-a",pool="pyrepo"} 20"#
    ));
    assert!(
        text.contains(r#"selfplay_broker_acquire_waiting{namespace="team-a",pool="pyrepo"} 0"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_lock_the_same_storm_hands_out_duplicates() {
    // The control for the test above: the very same brokers on a store that ignores the
    // resourceVersion give one sandbox to two trainers.
    let (got, _, _, _) = storm(MemoryBackend::without_lock()).await;
    let unique: HashSet<&String> = got.iter().collect();
    assert!(
        unique.len() < got.len(),
        "expected duplicates without the lock, got {got:?}"
    );
}

#[tokio::test]
async fn acquire_waits_for_a_sandbox_to_become_ready() {
    let mut h = harness(MemoryBackend::new(), 1, 0).await;
    let c = client(&h.brokers[0].1, RUN_TOKEN);
    let waiter = tokio::spawn(async move { c.acquire("pyrepo", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pod = h.backend.put_pod(sandbox(7));
    let (_, _, writer, changed) = &mut h.brokers[0];
    writer.apply_watcher_event(&watcher::Event::Apply(pod));
    changed.notify_waiters();
    let lease = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("in time")
        .expect("task")
        .expect("acquired");
    assert_eq!(
        (lease.sandbox.as_str(), lease.address.as_str()),
        ("pyrepo-007", "10.0.0.7:7070")
    );
    assert_eq!(lease.workdir, "/workspace");
    assert_eq!(
        (
            lease.command_timeout.as_secs(),
            lease.test_timeout.as_secs()
        ),
        (120, 600)
    );
}

#[tokio::test]
async fn callers_must_hold_their_runs_token_and_stay_in_their_pools() {
    let h = harness(MemoryBackend::new(), 1, 2).await;
    let addr = &h.brokers[0].1;
    fn err<T>(r: Result<T, selfplay_operator::broker::client::ClientError>) -> tonic::Code {
        match r {
            Err(selfplay_operator::broker::client::ClientError::Rpc(s)) => s.code(),
            Ok(_) => panic!("expected an error"),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(
        err(client(addr, "wrong")
            .acquire("pyrepo", Duration::from_millis(10))
            .await),
        tonic::Code::Unauthenticated
    );
    let other_run = BrokerClient::new(addr, NS, "someone-else", RUN_TOKEN).expect("client");
    assert_eq!(
        err(other_run.acquire("pyrepo", Duration::from_millis(10)).await),
        tonic::Code::Unauthenticated
    );
    let c = client(addr, RUN_TOKEN);
    assert_eq!(
        err(c.acquire("not-my-pool", Duration::from_millis(10)).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        err(c.release("pyrepo-000").await),
        tonic::Code::PermissionDenied,
        "cannot release an unclaimed sandbox"
    );
}

#[tokio::test]
async fn release_deletes_the_sandbox() {
    let h = harness(MemoryBackend::new(), 1, 1).await;
    let c = client(&h.brokers[0].1, RUN_TOKEN);
    let lease = c
        .acquire("pyrepo", Duration::from_secs(1))
        .await
        .expect("acquired");
    c.release(&lease.sandbox).await.expect("released");
    assert!(h.backend.pod(NS, &lease.sandbox).is_none());
    assert_eq!(
        h.backend.deleted.lock().expect("lock").as_slice(),
        [(NS.to_string(), lease.sandbox.clone())]
    );
}

#[tokio::test]
async fn progress_and_checkpoints_reach_the_run() {
    let h = harness(MemoryBackend::new(), 1, 0).await;
    let c = client(&h.brokers[0].1, RUN_TOKEN);
    let p = ProgressSnapshot {
        step: 12,
        policy_version: 12,
        solve_rate: Some(0.25),
        injector_validity_rate: Some(0.5),
        top_failed_check: Some("inverse_mutation".into()),
        mean_reward_solver: Some(-0.5),
        mean_reward_injector: Some(0.1),
        tokens_per_second: Some(1234.5),
        sandbox_errors: 1,
        loss: Some(0.01),
        heldout_solve_rate: Some(0.3),
        heldout_step: Some(10),
        last_update_time: None,
    };
    c.report_progress(&p).await.expect("reported");
    let stored =
        h.backend.progress.lock().expect("lock")[&(NS.to_string(), "qwen-ssr".to_string())].clone();
    assert_eq!(stored.step, 12);
    assert_eq!(stored.top_failed_check.as_deref(), Some("inverse_mutation"));
    assert_eq!(
        (stored.heldout_solve_rate, stored.heldout_step),
        (Some(0.3), Some(10)),
        "the held-out solve rate reaches status.progress"
    );
    assert!(
        stored.last_update_time.is_some(),
        "the broker stamps lastUpdateTime"
    );
    assert!(
        h.metrics
            .encode()
            .contains(r#"selfplay_run_step{namespace="team-a",run="qwen-ssr"} 12"#)
    );
    assert_eq!(
        h.brokers[0]
            .0
            .latest_progress(NS, "qwen-ssr")
            .map(|p| p.step),
        Some(12)
    );

    let bad = ProgressSnapshot {
        loss: Some(f64::NAN),
        ..p.clone()
    };
    match c.report_progress(&bad).await {
        Err(selfplay_operator::broker::client::ClientError::Rpc(s)) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument)
        }
        other => panic!("NaN accepted: {other:?}"),
    }
    let bad = ProgressSnapshot {
        heldout_solve_rate: Some(1.5),
        ..p.clone()
    };
    match c.report_progress(&bad).await {
        Err(selfplay_operator::broker::client::ClientError::Rpc(s)) => {
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(
                s.message().contains("heldout_solve_rate"),
                "{}",
                s.message()
            );
        }
        other => panic!("a held-out solve rate of 1.5 accepted: {other:?}"),
    }

    let name = c
        .register_checkpoint(20, 20, "/checkpoints/qwen-ssr/step-20", 4096, Some(&p))
        .await
        .expect("registered");
    assert_eq!(name, "qwen-ssr-step-20");
    let ck = h.backend.checkpoints.lock().expect("lock")[&(NS.to_string(), name.clone())].clone();
    assert_eq!(ck.spec.run_name, "qwen-ssr");
    assert_eq!(ck.spec.pvc.as_deref(), Some("ckpts"));
    assert_eq!(ck.spec.metrics.as_ref().map(|m| m.step), Some(12));
    let owner = &ck.metadata.owner_references.as_ref().expect("owned")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        (
            "SelfPlayRun",
            "6f1c2a3e-0000-4000-8000-0000000000a1",
            Some(true)
        )
    );
    assert_eq!(
        ck.metadata.labels.as_ref().expect("labels")["selfplay.dev/run"],
        "qwen-ssr"
    );
    assert_eq!(
        ck.metadata.annotations.as_ref().expect("annotations")["selfplay.dev/size-bytes"],
        "4096"
    );
    // Registering the same step again (a retry) is fine.
    assert_eq!(
        c.register_checkpoint(20, 20, "/checkpoints/qwen-ssr/step-20", 4096, None)
            .await
            .expect("again"),
        name
    );
}

#[tokio::test]
async fn release_never_deletes_a_pod_that_is_not_a_sandbox_held_by_the_run() {
    let h = harness(MemoryBackend::new(), 1, 0).await;
    // A trainer pod, and a sandbox claimed by another run: neither in the broker's cache.
    let trainer: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "qwen-ssr-trainer-0", "namespace": NS, "uid": "uid-t",
                     "labels": {"selfplay.dev/component": "trainer", "selfplay.dev/claimed-by": "qwen-ssr"}}
    }))
    .expect("pod");
    h.backend.put_pod(trainer);
    let mut other = sandbox(7);
    other
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("selfplay.dev/claimed-by".into(), "other-run".into());
    h.backend.put_pod(other);

    let c = client(&h.brokers[0].1, RUN_TOKEN);
    for name in ["qwen-ssr-trainer-0", "pyrepo-007"] {
        match c.release(name).await {
            Err(selfplay_operator::broker::client::ClientError::Rpc(s)) => {
                assert_eq!(s.code(), tonic::Code::PermissionDenied, "{name}: {s:?}")
            }
            other => panic!("{name}: expected PermissionDenied, got {other:?}"),
        }
        assert!(h.backend.pod(NS, name).is_some(), "{name} was deleted");
    }
    assert!(h.backend.deleted.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn ipv6_pod_ips_are_bracketed_in_the_sidecar_address() {
    let mut h = harness(MemoryBackend::new(), 1, 0).await;
    let mut pod = sandbox(0);
    if let Some(s) = pod.status.as_mut() {
        s.pod_ip = Some("fd00:10:244::7".into());
    }
    let stored = h.backend.put_pod(pod);
    let (_, addr, writer, _) = &mut h.brokers[0];
    writer.apply_watcher_event(&watcher::Event::Apply(stored));
    let c = client(addr, RUN_TOKEN);
    let lease = c
        .acquire("pyrepo", Duration::from_secs(1))
        .await
        .expect("acquired");
    assert_eq!(lease.address, "[fd00:10:244::7]:7070");
    assert!(lease.address.parse::<std::net::SocketAddr>().is_ok());
}

/// Issue 17 defect 4: a broker briefly unreachable (leader hand-over, operator restart) does
/// not fail the trainer's progress report: the client retries with backoff within a deadline,
/// and still gives up at once on a refusal.
#[tokio::test]
async fn progress_report_retries_until_the_broker_is_back() {
    // A port with nothing listening yet: the broker "restarts" there a moment later.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);

    let h = harness(MemoryBackend::new(), 1, 0).await;
    let broker = h.brokers[0].0.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        tonic::transport::Server::builder()
            .add_service(service(broker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let c = client(&format!("http://{addr}"), RUN_TOKEN);
    let p = ProgressSnapshot {
        step: 7,
        policy_version: 7,
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(20), c.report_progress(&p))
        .await
        .expect("within the retry deadline")
        .expect("reported once the broker is back");
    assert_eq!(
        h.backend.progress.lock().expect("lock")[&(NS.to_string(), "qwen-ssr".to_string())].step,
        7
    );

    // A refusal is final: no retrying a wrong token for a minute.
    let bad = client(&format!("http://{addr}"), "wrong-token");
    let started = std::time::Instant::now();
    assert!(bad.report_progress(&p).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
}
