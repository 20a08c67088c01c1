//! The operational surface: metric names against the contract in `docs/metrics.md`,
//! `/healthz`, `/readyz` and `/metrics` over real HTTP, and a clear error from `operator run`
//! where no cluster is configured.

use std::sync::atomic::Ordering;

use selfplay_operator::controller::http::{Health, serve};
use selfplay_operator::metrics::{Metrics, metric_names};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Metric names of one `## <section>` of docs/metrics.md (first column of its table).
fn documented(section: &str) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
    let text = std::fs::read_to_string(path).expect("docs/metrics.md");
    let mut names: Vec<String> = text
        .split("\n## ")
        .find(|s| s.starts_with(section))
        .expect("section")
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(String::from))
        .collect();
    names.sort();
    names
}

#[test]
fn registered_metrics_are_exactly_the_documented_ones() {
    let documented = documented("operator");
    assert_eq!(documented.len(), 10, "{documented:?}");
    assert_eq!(metric_names(), documented);
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn health_readiness_and_metrics_over_http() {
    let metrics = Metrics::new();
    metrics
        .reconciliations
        .with_label_values(&["SandboxPool"])
        .inc();
    let health = Health::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, metrics.clone(), health.clone()));

    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    health.ready.store(true, Ordering::Relaxed);
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    let m = get(addr, "/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"));
    assert!(
        m.contains(r#"selfplay_operator_reconciliations_total{kind="SandboxPool"} 1"#),
        "{m}"
    );
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
}

#[test]
fn run_without_a_cluster_says_so() {
    let home = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_operator"))
        .args([
            "run",
            "--metrics-listen",
            "127.0.0.1:0",
            "--broker-listen",
            "127.0.0.1:0",
        ])
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no Kubernetes configuration"), "{text}");
}
