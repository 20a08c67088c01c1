//! `trainer score` as a user runs it: the binary, a model directory, token ids.

mod policy_util;

use std::process::Command;

use policy_util::{Reference, fixture, max_abs_diff};

fn score(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("score")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn prints_pytorch_logprobs_as_json() {
    for name in ["qwen2-tied", "qwen2-untied"] {
        let r = Reference::load(name);
        let seq = &r.sequences()[1];
        let ids = seq.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let dir = fixture(name);
        let out = score(&[
            "--model",
            dir.to_str().unwrap(),
            "--token-ids",
            &ids,
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let lps: Vec<f64> = serde_json::from_value(v["logprobs"].clone()).unwrap();
        assert_eq!(lps.len(), seq.len() - 1);
        let err = max_abs_diff(&lps, &r.vec("logprobs.1"));
        assert!(err < 1e-4, "{name}: {err}");
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = fixture("qwen2-tied");
    let d = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--model", d, "--token-ids", "1,99999", "--json"],
            "outside the vocabulary",
        ),
        (
            &["--model", d, "--token-ids", "5", "--json"],
            "at least two",
        ),
        (
            &["--model", "/nonexistent/model", "--token-ids", "1,2"],
            "config.json",
        ),
        (&["--model", d, "--token-ids", "1,x"], "invalid digit"),
    ];
    for (args, want) in cases {
        let out = score(args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
