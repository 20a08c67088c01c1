//! Argo CD health checks (charts/argocd/resource_customizations/selfplay.dev/<Kind>/health.lua)
//! run by a real Lua interpreter on every case of their Argo CD-style `health_test.yaml`; the
//! test objects are valid objects of their kind; docs/gitops.md carries the same scripts.

use std::fs;
use std::path::Path;

use selfplay_tests::lua::{Health, run_health_check};
use selfplay_tests::paths::{argocd_dir, workspace_root};
use selfplay_tests::tools::{available, lua};
use serde_json::Value;

const KINDS: [&str; 3] = ["SelfPlayRun", "SandboxPool", "Checkpoint"];

fn yaml_to_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (inputPath, expected) of a kind's health_test.yaml.
fn cases(kind: &str) -> Vec<(String, Health)> {
    let spec = yaml_to_json(&argocd_dir().join(kind).join("health_test.yaml"));
    spec["tests"]
        .as_array()
        .unwrap_or_else(|| panic!("{kind}/health_test.yaml: no tests"))
        .iter()
        .map(|t| {
            let input = t["inputPath"].as_str().expect("inputPath").to_string();
            let status = t["healthStatus"]["status"]
                .as_str()
                .expect("status")
                .to_string();
            let message = t["healthStatus"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (input, Health { status, message })
        })
        .collect()
}

#[test]
fn health_checks_pass_their_argo_cd_test_cases() {
    let Some(lua) = available(lua(), "health_checks_pass_their_argo_cd_test_cases") else {
        return;
    };
    let mut failures = Vec::new();
    let mut ran = 0;
    for kind in KINDS {
        let dir = argocd_dir().join(kind);
        let script = dir.join("health.lua");
        let mut statuses = std::collections::BTreeSet::new();
        for (input, want) in cases(kind) {
            let object = yaml_to_json(&dir.join(&input));
            match run_health_check(&lua, &script, &object) {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!("{kind}/{input}: want {want:?}, got {got:?}")),
                Err(e) => failures.push(format!("{kind}/{input}: {e}")),
            }
            statuses.insert(want.status);
            ran += 1;
        }
        // Each kind's cases reach Progressing, Healthy and Degraded; runs also Suspended.
        let mut needed = vec!["Progressing", "Healthy", "Degraded"];
        if kind == "SelfPlayRun" {
            needed.push("Suspended");
        }
        for s in needed {
            assert!(statuses.contains(s), "{kind}: no test case expects {s}");
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ran} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every testdata file is used by a case, and is a valid object of its kind (the schema and
/// CEL rules of the CRD, status included), so the checks are tested on what the API server
/// would hold.
#[test]
fn test_objects_are_valid_and_all_used() {
    for kind in KINDS {
        let dir = argocd_dir().join(kind);
        let used: std::collections::BTreeSet<String> =
            cases(kind).into_iter().map(|(i, _)| i).collect();
        let mut files = Vec::new();
        for entry in fs::read_dir(dir.join("testdata")).expect("testdata") {
            let path = entry.expect("entry").path();
            let rel = format!(
                "testdata/{}",
                path.file_name().expect("name").to_string_lossy()
            );
            assert!(
                used.contains(&rel),
                "{kind}/{rel} is not used by health_test.yaml"
            );
            files.push(path);
        }
        assert_eq!(
            files.len(),
            used.len(),
            "{kind}: a case names a missing file"
        );
        for path in files {
            let object = yaml_to_json(&path);
            assert_eq!(object["kind"].as_str(), Some(kind), "{}", path.display());
            if let Err(e) = selfplay_crds::validate::validate_value(&object, None) {
                panic!("{}: not a valid {kind}: {e}", path.display());
            }
        }
    }
}

/// A broken script is reported, not silently passed: the harness itself can fail.
#[test]
fn harness_reports_a_script_that_returns_nothing() {
    let Some(lua) = available(lua(), "harness_reports_a_script_that_returns_nothing") else {
        return;
    };
    let dir = selfplay_tests::paths::scratch_dir("lua-harness");
    let script = dir.join("health.lua");
    fs::write(
        &script,
        "local hs = {}\nif obj.status == nil then return nil end\nreturn hs\n",
    )
    .expect("write");
    let err = run_health_check(&lua, &script, &serde_json::json!({"metadata": {}}))
        .expect_err("nil must be an error");
    assert!(err.contains("returned nil"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

/// docs/gitops.md shows the `resource.customizations.health.<group>_<kind>` entries of
/// argocd-cm; they must be the scripts above, verbatim.
#[test]
fn gitops_doc_carries_the_same_scripts() {
    let doc = fs::read_to_string(workspace_root().join("docs/gitops.md")).expect("docs/gitops.md");
    for kind in KINDS {
        let key = format!("resource.customizations.health.selfplay.dev_{kind}: |");
        let start = doc
            .find(&key)
            .unwrap_or_else(|| panic!("docs/gitops.md has no {key}"));
        let line_start = doc[..start].rfind('\n').map_or(0, |i| i + 1);
        let key_indent = start - line_start;
        let mut block = String::new();
        for line in doc[start..].lines().skip(1) {
            let indent = line.len() - line.trim_start().len();
            if !line.trim().is_empty() && indent <= key_indent {
                break;
            }
            block.push_str(line.get(key_indent + 2..).unwrap_or(""));
            block.push('\n');
        }
        let script =
            fs::read_to_string(argocd_dir().join(kind).join("health.lua")).expect("health.lua");
        let (doc_lines, file_lines): (Vec<&str>, Vec<&str>) = (
            block.trim_end().lines().collect(),
            script.trim_end().lines().collect(),
        );
        if let Some(n) = (0..doc_lines.len().max(file_lines.len()))
            .find(|&n| doc_lines.get(n) != file_lines.get(n))
        {
            panic!(
                "docs/gitops.md's {kind} script differs from health.lua at line {}:\n  doc:  {:?}\n  file: {:?}",
                n + 1,
                doc_lines.get(n),
                file_lines.get(n)
            );
        }
    }
}
