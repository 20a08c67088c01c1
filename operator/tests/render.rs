//! `operator render` end to end: the real binary renders the fixtures, and every object it
//! prints is validated against the Kubernetes 1.33 OpenAPI schemas by `kubernetes-validate`
//! (PyPI) in strict mode (unknown fields are errors), from a venv under `target/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::fixture_path;

const K8S_VERSION: &str = "1.33.0";

fn operator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_operator"))
}

fn target_dir() -> PathBuf {
    // CARGO_MANIFEST_DIR is operator/; the workspace target dir is beside it.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"))
}

/// The validator's path, installing it into a venv on first use. `None` (with a loud message)
/// only when PyPI cannot be reached.
fn validator() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv = target_dir().join("py-venvs/kubernetes-validate");
        let bin = venv.join("bin/kubernetes-validate");
        if bin.exists() {
            return Some(bin);
        }
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "python3 -m venv failed: install python3-venv");
        let out = Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "kubernetes-validate==1.37.0",
            ])
            .output()
            .expect("pip runs");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Could not find a version")
                || err.contains("NewConnectionError")
                || err.contains("Network is unreachable")
                || err.contains("Temporary failure in name resolution")
            {
                eprintln!("\n\n!!!!! SKIPPING SCHEMA VALIDATION: PyPI is unreachable: {err}\n\n");
                let _ = std::fs::remove_dir_all(&venv);
                return None;
            }
            panic!("pip install kubernetes-validate failed: {err}");
        }
        Some(bin)
    })
    .clone()
}

fn render(files: &[&str]) -> String {
    let mut text = String::new();
    for f in files {
        text.push_str(&std::fs::read_to_string(fixture_path(f)).expect("fixture"));
        text.push_str("\n---\n");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("input.yaml");
    std::fs::write(&input, text).expect("write");
    let out = operator()
        .arg("render")
        .arg("-f")
        .arg(&input)
        .output()
        .expect("operator runs");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs the validator on a file; returns (success, output).
fn validate(file: &Path) -> Option<(bool, String)> {
    let bin = validator()?;
    let out = Command::new(bin)
        .args(["--strict", "-k", K8S_VERSION])
        .arg(file)
        .output()
        .expect("validator runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((
        out.status.success() && !text.contains("ERROR") && !text.contains("WARN"),
        text,
    ))
}

/// kubernetes-validate needs metadata.name to report on an object; sandbox pods carry only
/// generateName (the API server names them). Gives each a name beside it, as the API server
/// would; nothing else is touched.
fn with_names(yaml: &str) -> (String, usize) {
    let mut n = 0;
    let named = yaml
        .lines()
        .map(|l| match l.strip_prefix("  generateName: ") {
            Some(prefix) => {
                n += 1;
                format!("{l}\n  name: {prefix}rendered{n}")
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (named, n)
}

fn kinds(yaml: &str) -> Vec<String> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(d).ok()?;
            v.get("kind")?.as_str().map(String::from)
        })
        .collect()
}

#[test]
fn rendered_objects_pass_the_kubernetes_1_33_schemas_strictly() {
    let yaml = render(&[
        "pool-basic.yaml",
        "pool-full.yaml",
        "run-gpu.yaml",
        "run-tiny.yaml",
    ]);
    // 2 pools: Secret + NetworkPolicy + warm pods (2 and 4); 2 runs: Secret + ConfigMap + Pod.
    let k = kinds(&yaml);
    assert_eq!(k.iter().filter(|k| *k == "Pod").count(), 2 + 4 + 2);
    assert_eq!(k.iter().filter(|k| *k == "Secret").count(), 4);
    assert_eq!(k.iter().filter(|k| *k == "NetworkPolicy").count(), 2);
    assert_eq!(k.iter().filter(|k| *k == "ConfigMap").count(), 2);
    assert!(
        yaml.contains("- qwen-ssr"),
        "the pools' policies admit the runs that use them"
    );

    let (named, n) = with_names(&yaml);
    assert_eq!(n, 6, "six sandbox pods carry generateName");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &named).expect("write");
    let Some((ok, report)) = validate(&file) else {
        return;
    };
    assert!(
        ok,
        "schema validation failed:\n{report}\n--- rendered ---\n{yaml}"
    );
    assert_eq!(
        report.matches(" passed for resource ").count(),
        k.len(),
        "every object validated:\n{report}"
    );
}

#[test]
fn the_validator_rejects_what_it_should() {
    // A rendered pod with an unknown field (strict mode), or with a wrong type, must fail:
    // the check above would catch a builder that produced either.
    let (yaml, _) = with_names(&render(&["pool-basic.yaml"]));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pods.yaml");
    std::fs::write(&file, &yaml).expect("write");
    let Some((ok, report)) = validate(&file) else {
        return;
    };
    assert!(ok, "{report}");
    for (bad, needle) in [
        (
            "automountServiceAccountToken: false\n  notAField: 1",
            "notAField",
        ),
        (
            "automountServiceAccountToken: \"no\"",
            "automountServiceAccountToken",
        ),
    ] {
        let broken = yaml.replacen("automountServiceAccountToken: false", bad, 1);
        assert_ne!(broken, yaml);
        std::fs::write(&file, broken).expect("write");
        let (ok, report) = validate(&file).expect("validator");
        assert!(!ok, "the validator accepted a broken pod:\n{report}");
        assert!(report.contains(needle), "{report}");
    }
}

#[test]
fn render_reports_invalid_specs_and_empty_input_clearly() {
    let out = operator()
        .arg("render")
        .arg("-f")
        .arg(fixture_path("pool-invalid.yaml"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SandboxPool broken") && err.contains("workdir"),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.yaml");
    std::fs::write(
        &empty,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    )
    .expect("write");
    let out = operator()
        .arg("render")
        .arg("-f")
        .arg(&empty)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no SandboxPool or SelfPlayRun"));

    let garbage = dir.path().join("garbage.yaml");
    std::fs::write(&garbage, "kind: SandboxPool\nspec: [1, 2\n").expect("write");
    let out = operator()
        .arg("render")
        .arg("-f")
        .arg(&garbage)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("document 0"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_api_examples_render_to_valid_objects() {
    // Every valid example of the API (crds/examples, not invalid/), rendered together.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("crds/examples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("example") + "\n---\n")
        .collect();
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("examples.yaml");
    std::fs::write(&input, text).expect("write");
    let out = operator()
        .arg("render")
        .arg("-f")
        .arg(&input)
        .output()
        .expect("operator runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).expect("utf-8");
    let k = kinds(&yaml);
    assert!(
        k.iter().any(|k| k == "NetworkPolicy") && k.iter().any(|k| k == "ConfigMap"),
        "{k:?}"
    );
    let (named, _) = with_names(&yaml);
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, named).expect("write");
    let Some((ok, report)) = validate(&file) else {
        return;
    };
    assert!(ok, "{report}");
    assert_eq!(
        report.matches(" passed for resource ").count(),
        k.len(),
        "{report}"
    );
}
