//! The chart's alert rules (charts/selfplay/files/alerts.yaml) with the real promtool: the
//! rules check, the unit tests pass, every alert has a case where it fires and one where it
//! does not, each alert's firing case really depends on the alert (disabling it fails the
//! unit tests), runbooks exist, and only contract metric names are used.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;

use selfplay_tests::metric_names::{documented_metrics, resolve, selfplay_tokens};
use selfplay_tests::paths::{chart_dir, scratch_dir, workspace_root};
use selfplay_tests::tools::{available, promtool, run, run_ok};
use serde_yaml::Value;

fn rules_path() -> std::path::PathBuf {
    chart_dir().join("files/alerts.yaml")
}

/// The promtool unit-test files: short windows evaluated every minute, long windows (hours
/// of data) every 5 minutes, since promtool's run time grows with the evaluations.
fn test_paths() -> Vec<std::path::PathBuf> {
    ["alerts_test.yaml", "alerts_long_test.yaml"]
        .iter()
        .map(|f| chart_dir().join("tests").join(f))
        .collect()
}

fn load_yaml(path: &std::path::Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (group, rule) pairs of the rules file.
fn alert_rules() -> Vec<Value> {
    let rules = load_yaml(&rules_path());
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            out.push(rule.clone());
        }
    }
    out
}

fn alert_names() -> Vec<String> {
    alert_rules()
        .iter()
        .map(|r| {
            r["alert"]
                .as_str()
                .expect("every rule is an alert")
                .to_string()
        })
        .collect()
}

#[test]
fn promtool_check_rules_passes() {
    let Some(promtool) = available(promtool(), "promtool_check_rules_passes") else {
        return;
    };
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(rules_path()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let n = alert_names().len();
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

#[test]
fn promtool_unit_tests_pass() {
    let Some(promtool) = available(promtool(), "promtool_unit_tests_pass") else {
        return;
    };
    let out = run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .args(test_paths()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.matches("SUCCESS").count(), test_paths().len(), "{out}");
}

/// Per alert: how many evaluations expect it firing, and how many expect it silent.
fn coverage() -> BTreeMap<String, (usize, usize)> {
    let mut cov: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let files: Vec<Value> = test_paths().iter().map(|p| load_yaml(p)).collect();
    for group in files
        .iter()
        .flat_map(|f| f["tests"].as_sequence().expect("tests"))
    {
        for case in group["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let firing = case["exp_alerts"]
                .as_sequence()
                .is_some_and(|s| !s.is_empty());
            let entry = cov.entry(name).or_default();
            if firing {
                entry.0 += 1;
            } else {
                entry.1 += 1;
            }
        }
    }
    cov
}

#[test]
fn every_alert_has_a_firing_and_a_silent_case() {
    let cov = coverage();
    let names = alert_names();
    let mut missing = Vec::new();
    for name in &names {
        match cov.get(name) {
            Some((f, s)) if *f > 0 && *s > 0 => {}
            other => missing.push(format!("{name}: {other:?} (firing, silent)")),
        }
    }
    for tested in cov.keys() {
        assert!(
            names.contains(tested),
            "alerts_test.yaml tests {tested}, which alerts.yaml does not define"
        );
    }
    assert!(
        missing.is_empty(),
        "alerts without both a firing and a silent case:\n{}",
        missing.join("\n")
    );
}

/// Whether a promtool test group expects `alert` to fire at some evaluation.
fn group_expects_firing(group: &Value, alert: &str) -> bool {
    group["alert_rule_test"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|case| {
            case["alertname"].as_str() == Some(alert)
                && case["exp_alerts"]
                    .as_sequence()
                    .is_some_and(|s| !s.is_empty())
        })
}

/// The unit tests notice each alert: with its expression replaced by one that never
/// returns anything, promtool must fail the groups that expect it to fire. Catches a
/// firing case that passes for the wrong reason, and shows the suite can fail at all.
/// (Only those groups are run per alert, to keep this fast.)
#[test]
fn disabling_any_alert_fails_the_unit_tests() {
    let Some(promtool) = available(promtool(), "disabling_any_alert_fails_the_unit_tests") else {
        return;
    };
    let dir = scratch_dir("alerts-mutation");
    fs::create_dir_all(dir.join("files")).expect("mkdir");
    fs::create_dir_all(dir.join("tests")).expect("mkdir");
    let original = load_yaml(&rules_path());
    let test_files: Vec<Value> = test_paths().iter().map(|p| load_yaml(p)).collect();
    let mut survivors = Vec::new();
    for name in alert_names() {
        let mut mutated = original.clone();
        for group in mutated["groups"].as_sequence_mut().expect("groups") {
            for rule in group["rules"].as_sequence_mut().expect("rules") {
                if rule["alert"].as_str() == Some(&name) {
                    rule["expr"] = Value::String("vector(1) == 0".into());
                }
            }
        }
        fs::write(
            dir.join("files/alerts.yaml"),
            serde_yaml::to_string(&mutated).expect("yaml"),
        )
        .expect("write");
        let mut args = Vec::new();
        for (i, file) in test_files.iter().enumerate() {
            let mut only = file.clone();
            let groups: Vec<Value> = file["tests"]
                .as_sequence()
                .expect("tests")
                .iter()
                .filter(|g| group_expects_firing(g, &name))
                .cloned()
                .collect();
            if groups.is_empty() {
                continue;
            }
            only["tests"] = Value::Sequence(groups);
            let path = dir.join(format!("tests/{i}.yaml"));
            fs::write(&path, serde_yaml::to_string(&only).expect("yaml")).expect("write");
            args.push(path);
        }
        assert!(!args.is_empty(), "{name}: no test group expects it to fire");
        let out = run(Command::new(&promtool).args(["test", "rules"]).args(&args))
            .unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !text.contains(&format!("alertname: {name}")) {
            survivors.push(name);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    assert!(
        survivors.is_empty(),
        "unit tests still pass with these alerts disabled: {survivors:?}"
    );
}

#[test]
fn every_alert_has_severity_summary_and_a_runbook() {
    let runbooks =
        fs::read_to_string(workspace_root().join("docs/runbooks.md")).expect("docs/runbooks.md");
    let anchors: BTreeSet<String> = runbooks
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    for rule in alert_rules() {
        let name = rule["alert"].as_str().expect("alert");
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["warning", "critical"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let ann = &rule["annotations"];
        for key in ["summary", "description", "runbook"] {
            assert!(
                ann[key].as_str().is_some_and(|s| !s.trim().is_empty()),
                "{name}: no {key} annotation"
            );
        }
        let url = ann["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no runbook_url"));
        let anchor = url
            .rsplit_once("docs/runbooks.md#")
            .map(|(_, a)| a)
            .unwrap_or_else(|| {
                panic!("{name}: runbook_url {url} does not point into docs/runbooks.md")
            });
        assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
        assert!(
            anchors.contains(anchor),
            "{name}: docs/runbooks.md has no section '## {name}'"
        );
    }
}

/// Metric names are the contract: every `selfplay_*` series the alerts and the dashboard use
/// must be a metric of docs/metrics.md.
///
/// `code_registers_exactly_the_documented_metrics` ties the document to the code.
#[test]
fn alerts_and_dashboard_use_only_documented_metrics() {
    let doc =
        fs::read_to_string(workspace_root().join("docs/metrics.md")).expect("docs/metrics.md");
    let documented = documented_metrics(&doc).unwrap_or_else(|e| panic!("{e}"));
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (what, path) in [
        ("alert rules", rules_path()),
        ("dashboard", chart_dir().join("files/dashboard.json")),
        ("promtool tests", test_paths()[0].clone()),
        ("promtool long-window tests", test_paths()[1].clone()),
    ] {
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tokens = selfplay_tokens(&text);
        assert!(!tokens.is_empty(), "{what}: no selfplay_ metric found");
        for t in tokens {
            match resolve(&t, &documented) {
                Some(m) => {
                    used.insert(m.to_string());
                }
                None => problems.push(format!("{what}: {t} is not in docs/metrics.md")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The dashboard shows every documented metric; nothing exported goes unseen.
    let dashboard =
        fs::read_to_string(chart_dir().join("files/dashboard.json")).expect("dashboard");
    let on_dashboard: BTreeSet<String> = selfplay_tokens(&dashboard)
        .iter()
        .filter_map(|t| resolve(t, &documented))
        .map(str::to_string)
        .collect();
    let unseen: Vec<&String> = documented
        .keys()
        .filter(|m| !on_dashboard.contains(*m))
        .collect();
    assert!(
        unseen.is_empty(),
        "documented metrics missing from the dashboard: {unseen:?}"
    );
    assert!(used.len() >= 10, "suspiciously few metrics used: {used:?}");
}

/// docs/metrics.md is exactly what the three components register (from their collectors'
/// descriptors), so the alerts and the dashboard, checked against the document above, use
/// only metrics the code exports.
#[test]
fn code_registers_exactly_the_documented_metrics() {
    let doc =
        fs::read_to_string(workspace_root().join("docs/metrics.md")).expect("docs/metrics.md");
    let documented: BTreeSet<String> = documented_metrics(&doc)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_keys()
        .collect();
    let mut registered = BTreeSet::new();
    for (component, names) in [
        ("operator", selfplay_operator::metrics::metric_names()),
        ("trainer", selfplay_trainer::train::metrics::metric_names()),
        ("sandbox-sidecar", sandbox_sidecar::metrics::metric_names()),
    ] {
        assert!(!names.is_empty(), "{component} registers no metric");
        registered.extend(names);
    }
    let missing: Vec<_> = documented.difference(&registered).collect();
    let undocumented: Vec<_> = registered.difference(&documented).collect();
    assert!(
        missing.is_empty() && undocumented.is_empty(),
        "documented but not registered: {missing:?}; registered but not documented: {undocumented:?}"
    );
}
