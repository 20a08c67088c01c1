//! Sandbox start-up, side by side: from asking the provider for a sandbox to its sidecar
//! answering (`health`), then its release, for a bubblewrap sandbox of the sample repository
//! and a Docker sandbox of the sample environment image (the operator's pod: copy init
//! container, tmpfs volumes, the sidecar as PID 1 on a Unix socket). Rounds alternate the two
//! sides; medians and the 90th percentile over the rounds are printed.
//!
//!   images/sample-env/build.sh && scripts/build-static-sidecar.sh
//!   cargo bench -p selfplay-tests --bench sandbox_start [-- ROUNDS]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use selfplay_crds::SandboxPool;
use selfplay_trainer::engine::docker::{DockerProvider, DockerProviderConfig};
use selfplay_trainer::engine::local::{LocalProvider, LocalProviderConfig, SidecarProgram};
use selfplay_trainer::engine::sample::materialize_sample_repo;
use selfplay_trainer::engine::sandbox::SandboxProvider;

const POOL: &str = r#"
apiVersion: selfplay.dev/v1alpha1
kind: SandboxPool
metadata: {name: sample-env}
spec:
  template:
    image: selfplay/sample-env:latest
    imagePullPolicy: Never
    workdir: /testbed
    shellInit: source /opt/miniconda3/bin/activate && conda activate testbed
    resources:
      limits: {cpu: "1", memory: 1Gi}
"#;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn once<P: SandboxProvider>(p: &P, pool: &str) -> (Duration, Duration) {
    let t = Instant::now();
    let sb = p.acquire(pool).await.expect("sandbox");
    sb.client().health().await.expect("health");
    let up = t.elapsed();
    let t = Instant::now();
    sb.release().await.expect("release");
    (up, t.elapsed())
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let sidecar = std::env::var_os("SELFPLAY_STATIC_SIDECAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target.join("static/x86_64-unknown-linux-gnu/debug/sandbox-sidecar"));
    let work = tempfile::tempdir().expect("tempdir");
    let repo = work.path().join("repo");
    materialize_sample_repo(&repo).expect("sample repository");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut local_cfg = LocalProviderConfig::single(&repo);
        local_cfg.work_dir = Some(work.path().join("local"));
        // The same sidecar binary on both sides.
        local_cfg.sidecar = Some(SidecarProgram::standalone(sidecar.clone()));
        std::fs::create_dir_all(work.path().join("local")).expect("dir");
        let local = LocalProvider::new(local_cfg).expect("local provider");
        let pool: SandboxPool = serde_yaml::from_str(POOL).expect("pool");
        let docker = DockerProvider::new(DockerProviderConfig {
            run: "bench".to_string(),
            pools: BTreeMap::from([("sample-env".to_string(), pool.spec)]),
            sidecar: sidecar.clone(),
            work_dir: work.path().join("docker"),
            docker: "docker".to_string(),
            pids_limit: 1024,
        })
        .expect(
            "docker provider (run images/sample-env/build.sh and scripts/build-static-sidecar.sh)",
        );
        // Warm-up: page cache, image layers.
        once(&local, "default").await;
        once(&docker, "sample-env").await;
        let (mut lu, mut lr, mut du, mut dr) = (vec![], vec![], vec![], vec![]);
        for i in 0..rounds {
            let (a, b) = if i % 2 == 0 {
                let l = once(&local, "default").await;
                let d = once(&docker, "sample-env").await;
                (l, d)
            } else {
                let d = once(&docker, "sample-env").await;
                let l = once(&local, "default").await;
                (l, d)
            };
            lu.push(a.0);
            lr.push(a.1);
            du.push(b.0);
            dr.push(b.1);
        }
        let isolation = if local.isolated() {
            "bubblewrap"
        } else {
            "no isolation"
        };
        println!("sandbox start-up, {rounds} rounds alternating (median / p90)");
        println!(
            "{:<40} {:>18} {:>18}",
            "sandbox", "acquire→answer", "release"
        );
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
        for (name, up, rel) in [
            (format!("local ({isolation})"), &mut lu, &mut lr),
            (
                "docker (pod: 1 init copy, sidecar PID 1)".to_string(),
                &mut du,
                &mut dr,
            ),
        ] {
            let (u50, u90) = (percentile(up, 0.5), percentile(up, 0.9));
            let (r50, r90) = (percentile(rel, 0.5), percentile(rel, 0.9));
            println!(
                "{:<40} {:>18} {:>18}",
                name,
                format!("{} / {}", ms(u50), ms(u90)),
                format!("{} / {}", ms(r50), ms(r90))
            );
        }
    });
}
