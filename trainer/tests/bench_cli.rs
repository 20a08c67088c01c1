//! The parts of the GPU check (`trainer/scripts/gpu-check.sh`) that run without a GPU: the
//! parity command on the committed fixtures, the benchmarks' JSON, and clear failures where
//! CUDA or a GPU is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn trainer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .unwrap()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// On the CPU, parity runs the GPU's code path (composite ops) against the CPU kernels on
/// every fixture, in f32 and bf16, and passes.
#[test]
fn parity_on_the_cpu_passes_on_every_fixture() {
    let fixtures = repo_root().join("trainer/fixtures");
    let out = trainer(&[
        "bench",
        "parity",
        "--device",
        "cpu",
        "--fixtures",
        fixtures.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows = json_lines(&out);
    eprintln!("{rows:#?}");
    // qwen2-tied, qwen2-tied-bf16 and qwen2-untied, each in f32 and bf16.
    assert_eq!(rows.len(), 6, "{rows:?}");
    for r in &rows {
        assert_eq!(r["ok"], true, "{r}");
        assert!(r["tokens"].as_u64().unwrap() > 0, "{r}");
        if r["dtype"] == "f32" {
            // The same arithmetic in another order: far inside the f32 bounds.
            assert!(r["logprob_max_abs"].as_f64().unwrap() < 1e-5, "{r}");
            assert!(r["grad_max_rel"].as_f64().unwrap() < 1e-4, "{r}");
        } else {
            // bf16 does differ: a check that compared a model with itself would not.
            assert!(r["logprob_max_abs"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    let with_ref = rows
        .iter()
        .filter(|r| r["logprob_vs_reference_max_abs"].is_number())
        .count();
    assert_eq!(
        with_ref, 6,
        "every fixture has PyTorch log-probs (the bf16 one since it got its GRPO references), in two dtypes"
    );
}

#[test]
fn parity_without_fixtures_fails() {
    let empty = tempfile::tempdir().unwrap();
    let out = trainer(&[
        "bench",
        "parity",
        "--device",
        "cpu",
        "--fixtures",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no fixture"));
}

/// `bench memory --json` on the CPU: one record per length with the documented fields and
/// the times the GPU check matches its memory samples to.
#[test]
fn memory_bench_json_has_the_fields_the_gpu_check_reads() {
    let out = trainer(&["bench", "memory", "--tokens", "32,64", "--warmup", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 2);
    for (r, n) in rows.iter().zip([32, 64]) {
        assert_eq!(r["tokens"], n);
        assert!(r["peak_bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["params"], 5_115_648);
        let (s, e) = (r["started"].as_f64().unwrap(), r["ended"].as_f64().unwrap());
        assert!(s > 1.6e9 && e >= s, "{r}");
    }
}

/// The rollout bench's JSON, and what a common prompt start does to it: with 24 of 40 prompt
/// tokens common, one of two episodes copies them from the other instead of prefilling them
/// (12 an episode); with own prompts nothing is copied. A common start longer than the prompt
/// is refused, naming the flag. A row copies only from a row still running, so each turn is
/// long (400 tokens, some milliseconds of this tiny model) for the second episode's thread to
/// start while the first runs: with 3-token turns, the first episode's whole turn was once
/// over before the second arrived on a loaded machine, and nothing was copied.
#[test]
fn rollout_bench_copies_a_common_prompt_start() {
    let run = |common: &str| {
        let out = trainer(&[
            "bench",
            "rollout",
            "--episodes",
            "1,2",
            "--rounds",
            "1",
            "--turns",
            "1",
            "--prompt-tokens",
            "40",
            "--turn-tokens",
            "400",
            "--observation-tokens",
            "5",
            "--hidden",
            "64",
            "--layers",
            "1",
            "--vocab",
            "300",
            "--no-session",
            "--common-prefix",
            common,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        json_lines(&out)
    };
    for (common, copied) in [("24", 12.0), ("0", 0.0)] {
        let rows = run(common);
        assert_eq!(rows.len(), 2, "{rows:?}");
        for r in &rows {
            assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
            // The ceiling of the base row is its own speedup, 1; the other's is finite.
            let ceiling = r["speedup_ceiling"].as_f64().unwrap_or(f64::NAN);
            assert!(ceiling.is_finite() && ceiling > 0.0, "{r}");
            if r["episodes"] == 1 {
                assert!((ceiling - 1.0).abs() < 1e-9, "{r}");
            }
            let want = if r["episodes"] == 2 { copied } else { 0.0 };
            assert_eq!(
                r["shared_prefix_tokens"].as_f64(),
                Some(want),
                "{common}: {r}"
            );
        }
    }
    let out = trainer(&[
        "bench",
        "rollout",
        "--prompt-tokens",
        "8",
        "--common-prefix",
        "9",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--common-prefix 9"), "{err}");
}

/// A build without CUDA asked for CUDA says so, for every benchmark.
#[test]
#[cfg_attr(feature = "cuda", ignore = "needs a build without CUDA")]
fn benches_refuse_cuda_in_a_cpu_build() {
    for args in [
        &["bench", "memory", "--device", "cuda", "--tokens", "16"][..],
        &["bench", "parity", "--device", "cuda"][..],
        &["bench", "rollout", "--device", "cuda"][..],
    ] {
        let out = trainer(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("CUDA is not available"), "{args:?}: {err}");
    }
}

/// Where there is no GPU the check stops at once with exit 2 and says why; it never hangs
/// or half-runs.
#[test]
fn the_gpu_check_fails_clearly_without_a_gpu() {
    let has_nvidia_smi = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("nvidia-smi").is_file()));
    if has_nvidia_smi {
        eprintln!("skipped: this machine has nvidia-smi");
        return;
    }
    let script = repo_root().join("trainer/scripts/gpu-check.sh");
    let started = Instant::now();
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_trainer"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("gpu-check.sh still running after 60 s without a GPU");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no GPU"), "{err}");
}
