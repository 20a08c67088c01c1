//! Environments and cold starts in the broker, over real gRPC on loopback with the
//! in-memory backend (the API server's optimistic lock; pods created get names as from
//! `generateName`). A "kubelet" task stands in for the watch: it marks each created pod
//! Running and Ready (or Failed) in the broker's cache. No real API server or kubelet is
//! involved; the Kubernetes backend's create request is checked in `controllers.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::one;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use selfplay_crds::{SandboxPool, SelfPlayRun};
use selfplay_operator::broker::client::{BrokerClient, ClientError};
use selfplay_operator::broker::memory::MemoryBackend;
use selfplay_operator::broker::service::service;
use selfplay_operator::broker::{Broker, BrokerSettings};
use selfplay_operator::config::OperatorConfig;
use selfplay_operator::metrics::Metrics;
use serde_json::json;
use tokio::sync::Notify;

const NS: &str = "team-a";
const RUN_TOKEN: &str = "run-token-0123";

/// What the stand-in kubelet does with each pod the broker creates.
#[derive(Clone, Copy, PartialEq)]
enum Kubelet {
    Ready,
    Fail,
    Nothing,
}

struct Harness {
    backend: Arc<MemoryBackend>,
    addr: String,
    _w: (Writer<SandboxPool>, Writer<SelfPlayRun>),
}

fn warm_pod(name: &str, env: &str, ip: &str) -> Pod {
    let created = k8s_openapi::jiff::Timestamp::now().as_second() - 60;
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": NS, "uid": format!("uid-{name}"),
            "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created).expect("time").to_string(),
            "labels": {"selfplay.dev/component": "sandbox", "selfplay.dev/pool": "pyrepo",
                       "selfplay.dev/template-hash": "h", "selfplay.dev/environment": env}
        },
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

async fn harness(warm: Vec<Pod>, kubelet: Kubelet, limit: u32) -> Harness {
    let backend = Arc::new(MemoryBackend::new());
    backend.put_secret(NS, "qwen-ssr-trainer-token", RUN_TOKEN);
    backend.put_secret(NS, "pyrepo-sandbox-token", "pool-token");
    let (sandboxes, mut sw) = reflector::store::<Pod>();
    for p in warm {
        let p = backend.put_pod(p);
        sw.apply_watcher_event(&watcher::Event::Apply(p));
    }
    let (pools, mut pw) = reflector::store::<SandboxPool>();
    pw.apply_watcher_event(&watcher::Event::Apply(one::<SandboxPool>("pool-envs.yaml")));
    let (runs, mut rw) = reflector::store::<SelfPlayRun>();
    rw.apply_watcher_event(&watcher::Event::Apply(one::<SelfPlayRun>("run-gpu.yaml")));
    let changed = Arc::new(Notify::new());
    let settings = BrokerSettings {
        default_wait: Duration::from_millis(300),
        pods: OperatorConfig {
            max_sandboxes_per_namespace: limit,
            ..OperatorConfig::default()
        },
        ..Default::default()
    };
    let broker = Arc::new(Broker::new(
        backend.clone(),
        sandboxes,
        pools,
        runs,
        changed.clone(),
        Metrics::new(),
        settings,
    ));
    // The kubelet and the watch in one: each created pod shows up in the cache as it
    // becomes Ready (or Failed); a deleted one disappears.
    let b = backend.clone();
    tokio::spawn(async move {
        let mut done = 0;
        let mut deleted = 0;
        loop {
            let created: Vec<Pod> = b.created.lock().expect("lock").clone();
            for (i, pod) in created.iter().enumerate().skip(done) {
                let mut pod = pod.clone();
                match kubelet {
                    Kubelet::Ready => {
                        pod.status = serde_json::from_value(json!({"phase": "Running",
                            "podIP": format!("10.1.0.{}", i + 1),
                            "conditions": [{"type": "Ready", "status": "True"}]}))
                        .ok();
                    }
                    Kubelet::Fail => {
                        pod.status =
                            serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted"}))
                                .ok();
                    }
                    Kubelet::Nothing => {}
                }
                sw.apply_watcher_event(&watcher::Event::Apply(pod));
                done = i + 1;
                changed.notify_waiters();
            }
            let gone: Vec<(String, String)> = b.deleted.lock().expect("lock").clone();
            for (ns, name) in gone.iter().skip(deleted) {
                let mut pod = Pod::default();
                pod.metadata.name = Some(name.clone());
                pod.metadata.namespace = Some(ns.clone());
                sw.apply_watcher_event(&watcher::Event::Delete(pod));
                deleted += 1;
                changed.notify_waiters();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let svc = service(broker);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    Harness {
        backend,
        addr,
        _w: (pw, rw),
    }
}

fn client(h: &Harness) -> BrokerClient {
    BrokerClient::new(&h.addr, NS, "qwen-ssr", RUN_TOKEN).expect("client")
}

fn rpc_err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (tonic::Code, String) {
    match r {
        Err(ClientError::Rpc(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

/// Issue 17, cold start: with `warm: 0` a claim creates a sandbox of the requested
/// environment, claimed for the caller from its creation, and hands it out once Ready.
#[tokio::test]
async fn a_claim_with_nothing_warm_starts_a_sandbox_of_its_environment() {
    let h = harness(Vec::new(), Kubelet::Ready, 0).await;
    let c = client(&h);
    let lease = c
        .acquire("pyrepo/django-11099", Duration::from_secs(5))
        .await
        .expect("acquired by a cold start");
    assert!(lease.cold_start);
    assert_eq!(lease.environment, "django-11099");
    assert_eq!(lease.pool, "pyrepo");
    assert_eq!(lease.workdir, "/testbed");
    assert_eq!(lease.address, "10.1.0.1:7070");

    let created = h.backend.created.lock().expect("lock").clone();
    assert_eq!(created.len(), 1);
    let pod = &created[0];
    assert_eq!(Some(lease.sandbox.as_str()), pod.metadata.name.as_deref());
    let labels = pod.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels["selfplay.dev/environment"], "django-11099");
    assert_eq!(labels["selfplay.dev/claimed-by"], "qwen-ssr");
    assert_eq!(labels["selfplay.dev/claim-attempt"], "0");
    assert_eq!(
        pod.metadata.annotations.as_ref().expect("annotations")["selfplay.dev/claim-run-uid"],
        "6f1c2a3e-0000-4000-8000-0000000000a1"
    );
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("swebench/sweb.eval.x86_64.django_1776_django-11099:latest")
    );

    // The same environment again: another cold start (the first is held), then the pool's
    // `max` of 2 stops a third.
    let second = c
        .acquire("pyrepo/astropy-12907", Duration::from_secs(5))
        .await
        .expect("second");
    assert!(second.cold_start);
    let (code, msg) = rpc_err(
        c.acquire("pyrepo/astropy-12907", Duration::from_millis(400))
            .await,
    );
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    assert!(msg.contains("pool at max"), "{msg}");
    assert_eq!(h.backend.created.lock().expect("lock").len(), 2);

    // Released: room again.
    c.release(&second.sandbox).await.expect("release");
    let third = c
        .acquire("pyrepo/astropy-12907", Duration::from_secs(5))
        .await
        .expect("third, after a release");
    assert!(third.cold_start);
}

#[tokio::test]
async fn the_namespace_limit_bounds_cold_starts() {
    let h = harness(Vec::new(), Kubelet::Ready, 1).await;
    let c = client(&h);
    c.acquire("pyrepo/django-11099", Duration::from_secs(5))
        .await
        .expect("first");
    let (code, msg) = rpc_err(
        c.acquire("pyrepo/django-11099", Duration::from_millis(400))
            .await,
    );
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    assert!(msg.contains("the operator's limit is 1"), "{msg}");
    assert_eq!(h.backend.created.lock().expect("lock").len(), 1);
}

/// Concurrent claims never start more than `max` between them, though the cache has not
/// seen any of the pods yet when they decide.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_starts_stay_within_max() {
    let h = harness(Vec::new(), Kubelet::Nothing, 0).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client(&h);
        tasks.push(tokio::spawn(async move {
            c.acquire("pyrepo/django-11099", Duration::from_millis(1500))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let created = h.backend.created.lock().expect("lock").len();
    assert_eq!(created, 2, "started while the first two live");
    for t in tasks {
        assert!(t.await.expect("task").is_err(), "never Ready");
    }
    // Given up at their deadline: deleted, not left claimed until their TTL.
    let created = h.backend.created.lock().expect("lock").len();
    let deleted = h.backend.deleted.lock().expect("lock").len();
    assert_eq!(deleted, created);
}

#[tokio::test]
async fn a_sandbox_that_fails_to_start_is_deleted_and_reported() {
    let h = harness(Vec::new(), Kubelet::Fail, 0).await;
    let (code, msg) = rpc_err(
        client(&h)
            .acquire("pyrepo/django-11099", Duration::from_secs(5))
            .await,
    );
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    assert!(msg.contains("failed: Evicted"), "{msg}");
    let created = h.backend.created.lock().expect("lock").clone();
    let name = created[0].metadata.name.clone().expect("name");
    assert_eq!(
        h.backend.deleted.lock().expect("lock").clone(),
        vec![(NS.to_string(), name)]
    );
}

/// A warm sandbox of the requested environment is claimed; one of another environment never is.
#[tokio::test]
async fn claims_take_warm_sandboxes_of_their_own_environment_only() {
    let h = harness(
        vec![
            warm_pod("pyrepo-a", "astropy-12907", "10.0.0.1"),
            warm_pod("pyrepo-d", "django-11099", "10.0.0.2"),
        ],
        Kubelet::Ready,
        0,
    )
    .await;
    let c = client(&h);
    let lease = c
        .acquire("pyrepo/django-11099", Duration::from_secs(5))
        .await
        .expect("warm");
    assert_eq!(
        (lease.sandbox.as_str(), lease.cold_start),
        ("pyrepo-d", false)
    );
    // Again: the other environment's warm sandbox is not taken, and with two sandboxes in
    // the pool (its max) none can be started.
    let (code, msg) = rpc_err(
        c.acquire("pyrepo/django-11099", Duration::from_millis(400))
            .await,
    );
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    assert!(msg.contains("pool at max"), "{msg}");
    assert!(h.backend.pod(NS, "pyrepo-a").is_some_and(|p| {
        !p.metadata
            .labels
            .unwrap_or_default()
            .contains_key("selfplay.dev/claimed-by")
    }));
}

#[tokio::test]
async fn environments_are_listed_and_must_be_named() {
    let h = harness(Vec::new(), Kubelet::Ready, 0).await;
    let c = client(&h);
    assert_eq!(
        c.list_environments("pyrepo").await.expect("list"),
        vec!["astropy-12907", "django-11099"]
    );
    let (code, _) = rpc_err(c.acquire("pyrepo", Duration::from_millis(200)).await);
    assert_eq!(code, tonic::Code::InvalidArgument);
    let (code, _) = rpc_err(c.acquire("pyrepo/nope", Duration::from_millis(200)).await);
    assert_eq!(code, tonic::Code::NotFound);
    let (code, _) = rpc_err(c.list_environments("not-in-run").await);
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert!(h.backend.created.lock().expect("lock").is_empty());
}
