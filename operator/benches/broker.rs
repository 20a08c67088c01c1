//! The broker bench: Acquire/Release over real gRPC on loopback, with the broker's real
//! Kubernetes backend (`KubeBackend`) talking to an in-process fake API server that counts
//! every request. Warm claims (a Ready sandbox is there: one conditional PATCH) alternate
//! with cold claims (nothing warm: the broker creates the pod, waits for it to be Ready, and
//! hands it out), several rounds each; the table gives the median over rounds of each
//! round's p50 and p99, and the API requests per claim and per release.
//!
//! What it measures is the operator's side only. The fake API server answers at once and
//! its "kubelet" reports a created pod Ready in the same instant, so a cold claim here costs
//! what the broker adds; on a cluster a cold start adds scheduling, the image pull (seconds
//! to minutes for SWE-bench images) and the sandbox's start-up, none of which is measured.
//!
//! The gRPC server here is given `TCP_NODELAY` as the operator's (`serve_with_shutdown`)
//! has by default; without it the p99 is Nagle's and delayed ACK's ~40 ms, not the broker's.
//!
//! `cargo bench -p selfplay-operator --bench broker` (ROUNDS, CLAIMS override the defaults).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use selfplay_crds::{SandboxPool, SelfPlayRun};
use selfplay_operator::broker::client::BrokerClient;
use selfplay_operator::broker::service::service;
use selfplay_operator::broker::{Broker, BrokerSettings, KubeBackend};
use selfplay_operator::metrics::Metrics;
use serde_json::{Value, json};
use tokio::sync::Notify;

const NS: &str = "team-a";
const RUN_TOKEN: &str = "run-token-0123";

/// The fake API server's state: pods by name, and requests counted by kind.
struct Fake {
    pods: Mutex<HashMap<String, Value>>,
    writer: Mutex<Writer<Pod>>,
    changed: Arc<Notify>,
    version: AtomicU64,
    requests: Mutex<BTreeMap<String, u64>>,
}

fn status_error(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code}),
    )
}

fn ready(mut pod: Value, ip: u64) -> Value {
    pod["status"] = json!({"phase": "Running", "podIP": format!("10.{}.{}.{}", (ip >> 16) & 255, (ip >> 8) & 255, ip & 255),
                           "conditions": [{"type": "Ready", "status": "True"}]});
    pod
}

impl Fake {
    fn next_version(&self) -> String {
        self.version.fetch_add(1, Ordering::SeqCst).to_string()
    }

    /// As the watch would report it: into the broker's cache, waking waiting acquires.
    fn watch_event(&self, pod: &Value, deleted: bool) {
        let Ok(p) = serde_json::from_value::<Pod>(pod.clone()) else {
            return;
        };
        if let Ok(mut w) = self.writer.lock() {
            w.apply_watcher_event(&if deleted {
                watcher::Event::Delete(p)
            } else {
                watcher::Event::Apply(p)
            });
        }
        self.changed.notify_waiters();
    }

    fn put(&self, mut pod: Value) -> Value {
        pod["metadata"]["resourceVersion"] = json!(self.next_version());
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Ok(mut pods) = self.pods.lock() {
            pods.insert(name, pod.clone());
        }
        self.watch_event(&pod, false);
        pod
    }

    fn handle(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let kind = match (method, path.split('/').nth(5)) {
            ("PATCH", Some("pods")) => "PATCH pod (claim)",
            ("POST", Some("pods")) => "POST pod (create)",
            ("GET", Some("pods")) => "GET pod",
            ("DELETE", Some("pods")) => "DELETE pod",
            ("GET", Some("secrets")) => "GET secret",
            _ => "other",
        };
        if let Ok(mut r) = self.requests.lock() {
            *r.entry(kind.to_string()).or_default() += 1;
        }
        let name = path.split('/').nth(6).unwrap_or_default().to_string();
        match (method, path.split('/').nth(5)) {
            ("GET", Some("secrets")) => {
                let token = if name.ends_with("-trainer-token") {
                    RUN_TOKEN
                } else {
                    "pool-token"
                };
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
                           "data": {"token": base64_encode(token)}}),
                )
            }
            ("POST", Some("pods")) => {
                let mut pod = body;
                let n = self.version.fetch_add(1, Ordering::SeqCst);
                let prefix = pod["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("pod-")
                    .to_string();
                pod["metadata"]["name"] = json!(format!("{prefix}{n:06x}"));
                pod["metadata"]["uid"] = json!(format!("uid-{n}"));
                pod["metadata"]["creationTimestamp"] =
                    json!(k8s_openapi::jiff::Timestamp::now().to_string());
                // The kubelet, instantly: the pod is Ready as soon as it exists.
                (201, self.put(ready(pod, n)))
            }
            ("PATCH", Some("pods")) => {
                let Some(mut pod) = self.pods.lock().ok().and_then(|p| p.get(&name).cloned())
                else {
                    return status_error(404, "NotFound");
                };
                let rv = body.pointer("/metadata/resourceVersion").cloned();
                if rv.is_some() && rv.as_ref() != pod.pointer("/metadata/resourceVersion") {
                    return status_error(409, "Conflict");
                }
                for field in ["labels", "annotations"] {
                    if let Some(m) = body["metadata"][field].as_object() {
                        for (k, v) in m {
                            pod["metadata"][field][k] = v.clone();
                        }
                    }
                }
                (200, self.put(pod))
            }
            ("GET", Some("pods")) => {
                match self.pods.lock().ok().and_then(|p| p.get(&name).cloned()) {
                    Some(p) => (200, p),
                    None => status_error(404, "NotFound"),
                }
            }
            ("DELETE", Some("pods")) => {
                match self.pods.lock().ok().and_then(|mut p| p.remove(&name)) {
                    Some(p) => {
                        self.watch_event(&p, true);
                        (200, p)
                    }
                    None => status_error(404, "NotFound"),
                }
            }
            _ => status_error(404, "NotFound"),
        }
    }

    fn take_counts(&self) -> BTreeMap<String, u64> {
        self.requests
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }
}

fn base64_encode(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn warm_pod(i: u64) -> Value {
    let created = k8s_openapi::jiff::Timestamp::now().as_second() - 60;
    ready(
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("warm-{i:06}"), "namespace": NS, "uid": format!("uid-warm-{i}"),
                "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created).map(|t| t.to_string()).unwrap_or_default(),
                "labels": {"selfplay.dev/component": "sandbox", "selfplay.dev/pool": "warm", "selfplay.dev/template-hash": "h"}}}),
        i,
    )
}

fn pools() -> Vec<SandboxPool> {
    let warm = json!({"apiVersion": "selfplay.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": "warm", "namespace": NS, "uid": "uid-pool-warm", "generation": 1},
        "spec": {"template": {"image": "example/repo:1"}, "warm": 0, "max": 100000}});
    let cold = json!({"apiVersion": "selfplay.dev/v1alpha1", "kind": "SandboxPool",
        "metadata": {"name": "cold", "namespace": NS, "uid": "uid-pool-cold", "generation": 1},
        "spec": {"template": {"image": "example/unused:1"}, "warm": 0, "max": 100000,
                 "environments": [{"name": "astropy-12907", "image": "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest", "workdir": "/testbed"}]}});
    [warm, cold]
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect()
}

fn run() -> Option<SelfPlayRun> {
    serde_json::from_value(
        json!({"apiVersion": "selfplay.dev/v1alpha1", "kind": "SelfPlayRun",
        "metadata": {"name": "bench", "namespace": NS, "uid": "uid-run"},
        "spec": {"model": {"tiny": {}}, "pools": [{"name": "warm"}, {"name": "cold"}]}}),
    )
    .ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

struct Side {
    p50: Vec<f64>,
    p99: Vec<f64>,
    acquire_calls: Vec<f64>,
    release_calls: Vec<f64>,
    acquire_kinds: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rounds = env("ROUNDS", 5);
    let claims = env("CLAIMS", 200);

    let (sandboxes, writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let fake = Arc::new(Fake {
        pods: Mutex::new(HashMap::new()),
        writer: Mutex::new(writer),
        changed: changed.clone(),
        version: AtomicU64::new(1000),
        requests: Mutex::new(BTreeMap::new()),
    });
    let f = fake.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        let f = f.clone();
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, out) = f.handle(&method, &path, body);
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&out).unwrap_or_default()))
        }
    });
    let client = kube::Client::new(svc, NS);

    let (pool_store, mut pw) = reflector::store::<SandboxPool>();
    for p in pools() {
        pw.apply_watcher_event(&watcher::Event::Apply(p));
    }
    let (run_store, mut rw) = reflector::store::<SelfPlayRun>();
    let Some(r) = run() else {
        eprintln!("bench: the run object does not parse");
        std::process::exit(1);
    };
    rw.apply_watcher_event(&watcher::Event::Apply(r));
    let broker = Arc::new(Broker::new(
        Arc::new(KubeBackend::new(client)),
        sandboxes,
        pool_store,
        run_store,
        changed,
        Metrics::new(),
        BrokerSettings::default(),
    ));
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench: cannot listen on loopback: {e}");
            std::process::exit(1);
        }
    };
    let addr = format!(
        "http://{}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let grpc = service(broker);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(grpc)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
    });
    let Ok(c) = BrokerClient::new(&addr, NS, "bench", RUN_TOKEN) else {
        eprintln!("bench: bad client");
        std::process::exit(1);
    };
    // Warm-up (connections, token cache), not counted.
    for i in 0..20u64 {
        fake.put(warm_pod(900_000 + i));
    }
    for _ in 0..10 {
        for key in ["warm", "cold/astropy-12907"] {
            if let Ok(l) = c.acquire(key, Duration::from_secs(5)).await {
                let _ = c.release(&l.sandbox).await;
            }
        }
    }

    let mut sides: Vec<(&str, &str, Side)> = [("warm", "warm"), ("cold", "cold/astropy-12907")]
        .into_iter()
        .map(|(label, key)| {
            (
                label,
                key,
                Side {
                    p50: Vec::new(),
                    p99: Vec::new(),
                    acquire_calls: Vec::new(),
                    release_calls: Vec::new(),
                    acquire_kinds: BTreeMap::new(),
                },
            )
        })
        .collect();
    let mut next_warm = 0u64;
    for round in 0..rounds {
        // Alternate which side goes first, so that drift favours neither.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for si in order {
            let (label, key, side) = &mut sides[si];
            if *label == "warm" {
                for _ in 0..claims {
                    fake.put(warm_pod(next_warm));
                    next_warm += 1;
                }
            }
            fake.take_counts();
            let mut latencies = Vec::with_capacity(claims);
            let mut leases = Vec::with_capacity(claims);
            for _ in 0..claims {
                let t = Instant::now();
                match c.acquire(key, Duration::from_secs(5)).await {
                    Ok(l) => {
                        latencies.push(t.elapsed().as_secs_f64() * 1e6);
                        if l.cold_start != (*label == "cold") {
                            eprintln!("bench: {label} claim came back cold_start={}", l.cold_start);
                            std::process::exit(1);
                        }
                        leases.push(l.sandbox);
                    }
                    Err(e) => {
                        eprintln!("bench: {label} acquire failed: {e}");
                        std::process::exit(1);
                    }
                }
            }
            let acq = fake.take_counts();
            for l in &leases {
                if let Err(e) = c.release(l).await {
                    eprintln!("bench: release failed: {e}");
                    std::process::exit(1);
                }
            }
            let rel = fake.take_counts();
            latencies.sort_by(|a, b| a.total_cmp(b));
            side.p50.push(percentile(&latencies, 0.5));
            side.p99.push(percentile(&latencies, 0.99));
            side.acquire_calls
                .push(acq.values().sum::<u64>() as f64 / claims as f64);
            side.release_calls
                .push(rel.values().sum::<u64>() as f64 / claims as f64);
            for (k, v) in acq {
                *side.acquire_kinds.entry(k).or_default() += v;
            }
            eprintln!(
                "round {}/{rounds} {label}: p50 {:.0} µs, p99 {:.0} µs",
                round + 1,
                side.p50.last().copied().unwrap_or(f64::NAN),
                side.p99.last().copied().unwrap_or(f64::NAN)
            );
        }
    }

    println!(
        "\nbroker Acquire/Release over gRPC on loopback, KubeBackend against an in-process fake API server;\n{rounds} rounds × {claims} sequential claims per side, sides alternating; medians over rounds\n"
    );
    println!(
        "| claim | acquire p50 (µs) | acquire p99 (µs) | API requests per acquire | API requests per release | acquire requests |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, _, side) in &sides {
        let kinds: Vec<String> = side
            .acquire_kinds
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", *v as f64 / (rounds * claims) as f64))
            .collect();
        println!(
            "| {label} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
            median(side.p50.clone()),
            median(side.p99.clone()),
            median(side.acquire_calls.clone()),
            median(side.release_calls.clone()),
            kinds.join(", ")
        );
    }
    println!(
        "\nA cold claim here is the broker's cost only: the fake kubelet reports the pod Ready at once.\nOn a cluster add scheduling, the image pull and the sandbox's start-up (seconds to minutes)."
    );
}
