//! The Helm chart (charts/selfplay) with a real Helm 4: lint and render with default values
//! and with every optional feature on, validate every rendered object strictly against the
//! Kubernetes 1.33 schemas (and the Prometheus Operator's for its kinds), and check what the
//! objects say: hardening, probes, leader election, monitoring wiring, CRD handling, the
//! PrometheusRule's alerts, the values schema and README.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use selfplay_tests::helm::{ALL_FEATURES_VALUES, find, lint, objects, template};
use selfplay_tests::paths::{chart_dir, scratch_dir, workspace_root};
use selfplay_tests::tools::{KUBERNETES_VERSION, available, helm, promtool, python_venv, run_ok};
use serde_json::{Value, json};

fn all_features_file(dir: &Path) -> PathBuf {
    let path = dir.join("all-features.yaml");
    fs::write(&path, ALL_FEATURES_VALUES).expect("write values");
    path
}

fn render(helm: &Path, values: &[&Path], extra: &[&str]) -> Vec<Value> {
    let yaml = template(helm, values, extra).unwrap_or_else(|e| panic!("{e}"));
    objects(&yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn kinds(objs: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for o in objs {
        *out.entry(o["kind"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    out
}

#[test]
fn helm_lint_passes_with_defaults_and_all_features() {
    let Some(helm) = available(helm(), "helm_lint_passes_with_defaults_and_all_features") else {
        return;
    };
    let dir = scratch_dir("chart-lint");
    let all = all_features_file(&dir);
    lint(&helm, &[], &[]).unwrap_or_else(|e| panic!("helm lint (defaults) failed:\n{e}"));
    lint(&helm, &[&all], &[]).unwrap_or_else(|e| panic!("helm lint (all features) failed:\n{e}"));
    let _ = fs::remove_dir_all(&dir);
}

/// One line per rendered object, printed to the terminal: what was checked against what.
#[derive(serde::Deserialize)]
struct Verdict {
    file: String,
    kind: String,
    name: String,
    result: String,
    detail: String,
}

fn validate_files(python: &Path, files: &[PathBuf]) -> Vec<Verdict> {
    let script = workspace_root().join("tests/scripts/validate_manifests.py");
    let out = run_ok(
        Command::new(python)
            .arg(script)
            .arg(KUBERNETES_VERSION)
            .args(files),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad verdict line {l}: {e}")))
        .collect()
}

#[test]
fn rendered_objects_are_valid_kubernetes_1_33_objects() {
    let test = "rendered_objects_are_valid_kubernetes_1_33_objects";
    let Some(helm) = available(helm(), test) else {
        return;
    };
    let Some(python) = available(python_venv(), test) else {
        return;
    };
    let dir = scratch_dir("chart-validate");
    let all = all_features_file(&dir);
    let renders: [(&str, Vec<&Path>, Vec<&str>); 3] = [
        // --include-crds: the crds/ directory is validated too.
        ("defaults", vec![], vec!["--include-crds"]),
        ("all-features", vec![&all], vec![]),
        (
            "two-namespaces",
            vec![],
            vec![
                "--set",
                "watchNamespaces={ml,research},grafanaDashboard.enabled=false",
            ],
        ),
    ];
    let mut files = Vec::new();
    let mut expected_kinds = BTreeMap::new();
    for (name, values, extra) in &renders {
        let yaml = template(&helm, values, extra).unwrap_or_else(|e| panic!("{name}: {e}"));
        let path = dir.join(format!("{name}.yaml"));
        fs::write(&path, &yaml).expect("write render");
        expected_kinds.insert(
            path.display().to_string(),
            kinds(&objects(&yaml).expect("parse")),
        );
        files.push(path);
    }
    let verdicts = validate_files(&python, &files);

    let mut stderr = std::io::stderr();
    let _ = writeln!(
        stderr,
        "\nvalidated rendered objects (Kubernetes {KUBERNETES_VERSION}, strict):"
    );
    let mut failures = Vec::new();
    let mut seen: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for v in &verdicts {
        let render = Path::new(&v.file)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(
            stderr,
            "  {:<7} {render:<26} {:<26} {:<40} {}",
            v.result, v.kind, v.name, v.detail
        );
        if v.result != "ok" {
            failures.push(format!(
                "{render}: {} {}: {} ({})",
                v.kind, v.name, v.result, v.detail
            ));
        }
        *seen
            .entry(v.file.clone())
            .or_default()
            .entry(v.kind.clone())
            .or_insert(0) += 1;
    }
    assert!(
        failures.is_empty(),
        "objects that did not validate:\n{}",
        failures.join("\n")
    );
    assert_eq!(seen, expected_kinds, "every rendered object got a verdict");

    let all_kinds = &expected_kinds[&files[1].display().to_string()];
    for kind in [
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "CustomResourceDefinition",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert!(
            all_kinds.contains_key(kind),
            "all-features render lacks a {kind}"
        );
    }
    assert_eq!(
        expected_kinds[&files[0].display().to_string()]["CustomResourceDefinition"],
        3
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The validator is strict: an unknown field in a Kubernetes kind and in a Prometheus
/// Operator kind, and a wrong type, are each reported as errors.
#[test]
fn validation_rejects_unknown_fields_and_wrong_types() {
    let test = "validation_rejects_unknown_fields_and_wrong_types";
    let Some(helm) = available(helm(), test) else {
        return;
    };
    let Some(python) = available(python_venv(), test) else {
        return;
    };
    let dir = scratch_dir("chart-validate-negative");
    let all = all_features_file(&dir);
    let objs = render(&helm, &[&all], &[]);
    let mut deployment = find(&objs, "Deployment", None).clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] =
        json!({"path": "/x"});
    let mut service = find(&objs, "Service", None).clone();
    service["spec"]["ports"][0]["port"] = json!("eighty");
    let mut monitor = find(&objs, "ServiceMonitor", None).clone();
    monitor["spec"]["endpoints"][0]["honorLabel"] = json!(true);
    let mut rule = find(&objs, "PrometheusRule", None).clone();
    rule["spec"]["groups"][0]["rules"][0]["for"] = json!(["15m"]);
    let mut file = String::new();
    for o in [&deployment, &service, &monitor, &rule] {
        file.push_str("---\n");
        file.push_str(&serde_yaml::to_string(o).expect("yaml"));
    }
    let path = dir.join("broken.yaml");
    fs::write(&path, file).expect("write");
    let verdicts = validate_files(&python, std::slice::from_ref(&path));
    assert_eq!(verdicts.len(), 4);
    for v in &verdicts {
        assert_eq!(
            v.result, "error",
            "{} {} passed: {}",
            v.kind, v.name, v.detail
        );
    }
    assert!(
        verdicts[0].detail.contains("httpGett"),
        "{}",
        verdicts[0].detail
    );
    assert!(
        verdicts[2].detail.contains("honorLabel"),
        "{}",
        verdicts[2].detail
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn values_schema_rejects_bad_values() {
    let Some(helm) = available(helm(), "values_schema_rejects_bad_values") else {
        return;
    };
    for (set, field) in [
        ("replicaCount=0", "/replicaCount"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("unknownTopLevel=1", "unknownTopLevel"),
        ("serviceMonitor.interval=soon", "/serviceMonitor/interval"),
        ("metrics.port=70000", "/metrics/port"),
        (
            "prometheusRule.disabledAlerts={NoSuchAlert}",
            "/prometheusRule/disabledAlerts/0",
        ),
        ("logFormat=xml", "/logFormat"),
    ] {
        let err = lint(&helm, &[], &["--set", set])
            .err()
            .unwrap_or_else(|| panic!("--set {set} was accepted"));
        assert!(
            err.contains(field),
            "--set {set}: error does not name {field}:\n{err}"
        );
    }
    let err =
        lint(&helm, &[], &["--set", "watchNamespaces={Not_A_Namespace}"]).expect_err("must fail");
    assert!(err.contains("/watchNamespaces"), "{err}");
}

#[test]
fn deployment_is_hardened_probed_and_leader_elected() {
    let Some(helm) = available(helm(), "deployment_is_hardened_probed_and_leader_elected") else {
        return;
    };
    let objs = render(&helm, &[], &[]);
    let d = find(&objs, "Deployment", Some("selfplay-operator"));
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // Restricted Pod Security Standard.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    // Probes on the metrics port.
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["limits"]["memory"].is_string()
    );
    let ports: BTreeSet<&str> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(ports, BTreeSet::from(["metrics", "broker"]));
    // The operator's `run` subcommand, its Lease named and in the release namespace.
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args.first(), Some(&"run"), "{args:?}");
    for want in [
        "--lease-name=selfplay-operator",
        "--lease-namespace=selfplay-system",
        "--metrics-listen=0.0.0.0:8080",
        "--broker-listen=0.0.0.0:7443",
        "--broker-address=http://selfplay-operator.selfplay-system.svc:7443",
        "--sidecar-image=ghcr.io/selfplay-dev/sandbox-sidecar:0.1.0",
        "--trainer-image=ghcr.io/selfplay-dev/trainer:0.1.0",
        "--log-json",
    ] {
        assert!(args.contains(&want), "operator args lack {want}: {args:?}");
    }
    let env: Vec<&str> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env.contains(&"POD_NAME"),
        "the Lease identity comes from POD_NAME: {env:?}"
    );
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert_eq!(
        kinds(&objs).get("PodDisruptionBudget"),
        None,
        "a PDB on one replica would block drains"
    );

    // HA: two replicas, a PDB, rolling without unavailability.
    let ha = render(&helm, &[], &["--set", "replicaCount=2"]);
    assert_eq!(find(&ha, "Deployment", None)["spec"]["replicas"], 2);
    assert_eq!(
        find(&ha, "PodDisruptionBudget", None)["spec"]["minAvailable"],
        1
    );

    // Namespaced by default: the rules are a Role in the release namespace, and the
    // operator is told to watch only it.
    let args_of = |objs: &[Value]| -> Vec<Value> {
        find(objs, "Deployment", None)["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .clone()
    };
    let default = render(&helm, &[], &[]);
    assert!(
        !default
            .iter()
            .any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding")
    );
    assert_eq!(
        find(&default, "Role", Some("selfplay-operator"))["metadata"]["namespace"],
        "selfplay-system"
    );
    assert!(args_of(&default).contains(&json!("--watch-namespaces=selfplay-system")));

    // Listed namespaces: a Role and RoleBinding in each; the Lease Role stays at home.
    let two = render(&helm, &[], &["--set", "watchNamespaces={ml,research}"]);
    assert!(
        !two.iter()
            .any(|o| o["kind"] == "ClusterRole" || o["kind"] == "ClusterRoleBinding")
    );
    for kind in ["Role", "RoleBinding"] {
        let mut nss: Vec<String> = two
            .iter()
            .filter(|o| o["kind"] == kind && o["metadata"]["name"] == "selfplay-operator")
            .map(|o| {
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        nss.sort();
        assert_eq!(nss, vec!["ml", "research"], "{kind}");
    }
    assert_eq!(
        find(&two, "Role", Some("selfplay-operator-leader-election"))["metadata"]["namespace"],
        "selfplay-system"
    );
    assert!(
        args_of(&two).contains(&json!("--watch-namespaces=ml,research")),
        "{:?}",
        args_of(&two)
    );

    // Cluster-wide only when asked: a ClusterRole, and no namespace flag.
    let wide = render(&helm, &[], &["--set", "clusterWide=true"]);
    assert_eq!(
        find(&wide, "ClusterRole", Some("selfplay-operator"))["kind"],
        "ClusterRole"
    );
    assert!(!args_of(&wide).iter().any(|a| {
        a.as_str()
            .is_some_and(|a| a.starts_with("--watch-namespaces"))
    }));
}

/// The operator binary accepts exactly the arguments the chart gives it: `operator run
/// <args> --help` exits 0 only if every argument before `--help` parses (clap reports an
/// unknown flag or a bad value first). Needs `target/debug/operator`, which `cargo test
/// --workspace` builds.
#[test]
fn operator_accepts_the_rendered_arguments() {
    let test = "operator_accepts_the_rendered_arguments";
    let Some(helm) = available(helm(), test) else {
        return;
    };
    let Some(operator) = operator_binary(test) else {
        return;
    };
    let dir = scratch_dir("chart-operator-args");
    let all = all_features_file(&dir);
    for (name, values, extra) in [
        ("defaults", vec![], vec![]),
        ("all-features", vec![all.as_path()], vec![]),
        (
            "two-namespaces",
            vec![],
            vec![
                "--set",
                "watchNamespaces={ml,research},logFormat=text,sidecar.binaryPath=/bin/sidecar",
            ],
        ),
    ] {
        let objs = render(&helm, &values, &extra);
        let c = &find(&objs, "Deployment", None)["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = c["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_string())
            .collect();
        let out = selfplay_tests::tools::run(Command::new(&operator).args(&args).arg("--help"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{name}: operator rejects the chart's arguments {args:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And the check can fail: a flag the operator does not have is refused.
    let out = selfplay_tests::tools::run(Command::new(&operator).args([
        "run",
        "--no-such-flag",
        "--help",
    ]))
    .expect("run");
    assert!(!out.status.success());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn service_and_monitors_select_what_they_should() {
    let Some(helm) = available(helm(), "service_and_monitors_select_what_they_should") else {
        return;
    };
    let dir = scratch_dir("chart-monitors");
    let all = all_features_file(&dir);
    let objs = render(&helm, &[&all], &[]);
    let d = find(&objs, "Deployment", None);
    let svc = find(&objs, "Service", None);
    let pod_labels = d["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels");
    // Trainers reach only the replica whose broker serves (issue 17 defect 4): the leader
    // labels its pod; standbys, Ready for rolling updates, lack the label.
    assert_eq!(
        svc["spec"]["selector"]["selfplay.dev/broker-serving"], "true",
        "the Service would send trainers to standby replicas"
    );
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        if k == "selfplay.dev/broker-serving" {
            continue;
        }
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "Service selector {k} does not match the operator pods"
        );
    }
    let container_ports: BTreeSet<&str> = d["spec"]["template"]["spec"]["containers"][0]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in svc["spec"]["ports"].as_array().expect("ports") {
        assert!(container_ports.contains(p["targetPort"].as_str().expect("named targetPort")));
    }
    let sm = find(&objs, "ServiceMonitor", None);
    let svc_labels = svc["metadata"]["labels"].as_object().expect("labels");
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            svc_labels.get(k),
            Some(v),
            "ServiceMonitor selector {k} does not match the Service"
        );
    }
    // job="selfplay-operator", which the alert rules select on.
    let job_label = sm["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(svc_labels.get(job_label), Some(&json!("selfplay-operator")));
    assert_eq!(
        sm["spec"]["endpoints"][0]["honorLabels"], true,
        "operator series keep their namespace label"
    );
    assert_eq!(
        sm["metadata"]["labels"]["release"], "kube-prometheus-stack",
        "additionalLabels"
    );

    // The PodMonitor selects the pods the operator creates, by the operator's labels. There is
    // none for sidecars: sandbox pods expose no metrics port, and their NetworkPolicy admits
    // only trainers (issue 17 defect 11).
    assert!(
        objs.iter()
            .all(|o| !(o["kind"] == "PodMonitor" && o["metadata"]["name"] == "selfplay-sidecar")),
        "a sidecar PodMonitor would only report its targets down"
    );
    let pm = find(&objs, "PodMonitor", Some("selfplay-trainer"));
    assert_eq!(
        pm["metadata"]["labels"]["release"], "kube-prometheus-stack",
        "additionalLabels"
    );
    let sel = &pm["spec"]["selector"]["matchLabels"];
    assert_eq!(sel["selfplay.dev/component"], "trainer");
    assert_eq!(sel["app.kubernetes.io/managed-by"], "selfplay-operator");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["namespaceSelector"], json!({"any": true}));
    let _ = fs::remove_dir_all(&dir);
}

/// Helm's crds/ directory and the crds.templated path hold the same CRDs, which are the ones
/// crdgen generated (byte for byte in crds/, equal as objects in the template).
#[test]
fn templated_crds_equal_the_generated_ones() {
    let Some(helm) = available(helm(), "templated_crds_equal_the_generated_ones") else {
        return;
    };
    let generated = workspace_root().join("crds/generated");
    let mut from_files = BTreeMap::new();
    for entry in fs::read_dir(chart_dir().join("crds")).expect("crds/") {
        let path = entry.expect("entry").path();
        let text = fs::read_to_string(&path).expect("read");
        let name = path.file_name().expect("name").to_owned();
        assert_eq!(
            text,
            fs::read_to_string(generated.join(&name)).expect("generated"),
            "{name:?} differs from crds/generated"
        );
        let obj: Value = serde_yaml::from_str(&text).expect("parse");
        from_files.insert(
            obj["metadata"]["name"].as_str().expect("name").to_string(),
            obj,
        );
    }
    assert_eq!(from_files.len(), 3);

    // Default: no CRD among the templates (Helm installs crds/ itself).
    let default = render(&helm, &[], &[]);
    assert!(
        !default
            .iter()
            .any(|o| o["kind"] == "CustomResourceDefinition")
    );

    let templated = render(&helm, &[], &["--set", "crds.templated=true"]);
    let crds: Vec<&Value> = templated
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 3);
    for crd in crds {
        let name = crd["metadata"]["name"].as_str().expect("name");
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
        assert_eq!(
            crd["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm",
            "{name}"
        );
        let mut stripped = crd.clone();
        let meta = stripped["metadata"].as_object_mut().expect("metadata");
        meta.remove("labels");
        meta.remove("annotations");
        assert_eq!(
            &stripped, &from_files[name],
            "{name}: templated CRD differs from crds/"
        );
    }
    let no_keep = render(
        &helm,
        &[],
        &["--set", "crds.templated=true,crds.keep=false"],
    );
    let crd = no_keep
        .iter()
        .find(|o| o["kind"] == "CustomResourceDefinition")
        .expect("crd");
    assert!(
        crd["metadata"].get("annotations").is_none(),
        "{}",
        crd["metadata"]
    );
}

/// The PrometheusRule embeds the promtool-tested rules file: the same alerts (less the
/// disabled ones) with the same expressions, extra labels added, and promtool accepts it.
#[test]
fn prometheus_rule_carries_the_tested_alerts() {
    let test = "prometheus_rule_carries_the_tested_alerts";
    let Some(helm) = available(helm(), test) else {
        return;
    };
    let Some(promtool) = available(promtool(), test) else {
        return;
    };
    let dir = scratch_dir("chart-rules");
    let all = all_features_file(&dir);
    let objs = render(&helm, &[&all], &[]);
    let rule = find(&objs, "PrometheusRule", None);
    let groups = &rule["spec"]["groups"];

    let file: Value = serde_yaml::from_str(
        &fs::read_to_string(chart_dir().join("files/alerts.yaml")).expect("alerts"),
    )
    .expect("parse");
    let mut want = BTreeMap::new();
    for g in file["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            if r["alert"] != "SelfPlayOperatorReconcileErrors" {
                want.insert(r["alert"].as_str().expect("alert").to_string(), r.clone());
            }
        }
    }
    let mut got = BTreeMap::new();
    for g in groups.as_array().expect("groups") {
        assert_eq!(g["interval"], "30s");
        for r in g["rules"].as_array().expect("rules") {
            got.insert(r["alert"].as_str().expect("alert").to_string(), r.clone());
        }
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, r) in &got {
        let w = &want[name];
        assert_eq!(r["expr"], w["expr"], "{name}: expr");
        assert_eq!(r["for"], w["for"], "{name}: for");
        assert_eq!(r["annotations"], w["annotations"], "{name}: annotations");
        assert_eq!(
            r["labels"]["team"], "ml-infra",
            "{name}: additionalRuleLabels"
        );
        assert_eq!(
            r["labels"]["severity"], w["labels"]["severity"],
            "{name}: severity"
        );
    }
    let rules_file = dir.join("rendered-rules.yaml");
    fs::write(
        &rules_file,
        serde_yaml::to_string(&json!({"groups": groups})).expect("yaml"),
    )
    .expect("write");
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&rules_file),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn dashboard_configmap_is_loadable_by_the_grafana_sidecar() {
    let Some(helm) = available(
        helm(),
        "dashboard_configmap_is_loadable_by_the_grafana_sidecar",
    ) else {
        return;
    };
    let objs = render(&helm, &[], &[]);
    let cm = find(&objs, "ConfigMap", Some("selfplay-dashboard"));
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_text = cm["data"]["selfplay.json"].as_str().expect("selfplay.json");
    let dash: Value = serde_json::from_str(json_text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "selfplay-training");
    let file: Value = serde_json::from_str(
        &fs::read_to_string(chart_dir().join("files/dashboard.json")).expect("dashboard"),
    )
    .expect("json");
    assert_eq!(
        dash, file,
        "the ConfigMap carries files/dashboard.json unchanged"
    );
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] != "row" {
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "panel {}",
                    p["title"]
                );
            }
        }
    }
    // Off when asked.
    let off = render(&helm, &[], &["--set", "grafanaDashboard.enabled=false"]);
    assert!(!off.iter().any(|o| o["kind"] == "ConfigMap"));
}

/// Leaf paths of a YAML mapping: a key whose value is a non-empty mapping is descended
/// into; anything else (scalars, lists, empty maps) is a leaf.
fn leaves(v: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_mapping() {
        Some(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = k.as_str().expect("string keys");
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                // Kubernetes-typed values are documented as one value.
                let opaque = [
                    "resources",
                    "podSecurityContext",
                    "securityContext",
                    "livenessProbe",
                    "readinessProbe",
                    "podMonitor.namespaceSelector",
                ];
                if opaque.contains(&path.as_str()) {
                    out.push(path);
                } else {
                    leaves(v, &path, out);
                }
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

fn schema_has(schema: &Value, path: &str) -> bool {
    let mut node = schema;
    for part in path.split('.') {
        match node["properties"].get(part) {
            Some(n) => node = n,
            None => return false,
        }
    }
    true
}

#[test]
fn every_value_is_in_the_schema_and_the_readme() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(chart_dir().join("values.yaml")).expect("values"))
            .expect("parse");
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(chart_dir().join("values.schema.json")).expect("schema"),
    )
    .expect("json");
    let readme =
        fs::read_to_string(chart_dir().join("README.md")).expect("charts/selfplay/README.md");
    let mut paths = Vec::new();
    leaves(&values, "", &mut paths);
    assert!(paths.len() > 50, "{paths:?}");
    let mut problems = Vec::new();
    for p in &paths {
        if !schema_has(&schema, p) {
            problems.push(format!("{p}: not in values.schema.json"));
        }
        if !readme.contains(&format!("| `{p}` |")) {
            problems.push(format!("{p}: not in the README's values table"));
        }
    }
    // And the README documents nothing that does not exist.
    for line in readme.lines() {
        if let Some(rest) = line.strip_prefix("| `")
            && let Some((p, _)) = rest.split_once("` |")
            && !p.contains(' ')
            && !paths.iter().any(|x| x == p)
            && line.matches('|').count() >= 4
        {
            problems.push(format!(
                "README documents {p}, which values.yaml does not have"
            ));
        }
    }
    // The alert names the schema accepts in disabledAlerts are exactly the rules file's.
    let alerts: Value = serde_yaml::from_str(
        &fs::read_to_string(chart_dir().join("files/alerts.yaml")).expect("alerts"),
    )
    .expect("parse");
    let names: BTreeSet<String> = alerts["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| {
            g["rules"]
                .as_array()
                .expect("rules")
                .iter()
                .map(|r| r["alert"].as_str().expect("alert").to_string())
        })
        .collect();
    let allowed: BTreeSet<String> =
        schema["properties"]["prometheusRule"]["properties"]["disabledAlerts"]["items"]["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .map(|v| v.as_str().expect("name").to_string())
            .collect();
    assert_eq!(
        allowed, names,
        "values.schema.json's disabledAlerts enum vs files/alerts.yaml"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Least privilege: no wildcard, no privilege-escalation verb, nothing cluster-scoped beyond
/// the operator's own kinds and children, and exactly the calls `operator/rbac.md` lists.
#[test]
fn rbac_is_least_privilege_and_matches_the_operator() {
    use selfplay_tests::rbac::{from_markdown, from_roles};
    let test = "rbac_is_least_privilege_and_matches_the_operator";
    let Some(helm) = available(helm(), test) else {
        return;
    };
    // Cluster-wide, where a mistake would reach furthest; the namespaced default has the same
    // rules (deployment_is_hardened_probed_and_leader_elected checks where they are bound).
    let objs = render(&helm, &[], &["--set", "clusterWide=true"]);
    let roles: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 2, "one ClusterRole and the Lease Role");
    let namespaced = render(&helm, &[], &[]);
    assert_eq!(
        from_roles(
            namespaced
                .iter()
                .filter(|o| o["kind"] == "Role" && o["metadata"]["name"] == "selfplay-operator")
        ),
        from_roles(roles.iter().copied().filter(|r| r["kind"] == "ClusterRole")),
        "the namespaced Role grants what the ClusterRole does"
    );
    let granted = from_roles(roles.iter().copied());
    for p in &granted {
        assert!(
            p.group != "*" && p.resource != "*" && p.verb != "*",
            "wildcard: {p}"
        );
        assert!(
            !["escalate", "bind", "impersonate", "deletecollection"].contains(&p.verb.as_str()),
            "{p}"
        );
    }
    // Lease rights only in the release namespace's Role, and get/update only by name.
    let cluster = from_roles(roles.iter().copied().filter(|r| r["kind"] == "ClusterRole"));
    assert!(
        !cluster.iter().any(|p| p.resource == "leases"),
        "{cluster:?}"
    );
    let lease_role = find(&objs, "Role", Some("selfplay-operator-leader-election"));
    for rule in lease_role["rules"].as_array().expect("rules") {
        let verbs = &rule["verbs"];
        // The leader labels its own pod (generated name): patch on pods, nothing more.
        if rule["resources"] == json!(["pods"]) {
            assert_eq!(verbs, &json!(["patch"]), "{rule}");
            continue;
        }
        if verbs != &json!(["create"]) {
            assert_eq!(
                rule["resourceNames"],
                json!(["selfplay-operator"]),
                "{rule}"
            );
        }
    }
    // Bound to the chart's ServiceAccount.
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        let b = find(&objs, kind, None);
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": "selfplay-operator", "namespace": "selfplay-system"}])
        );
    }

    let doc_path = workspace_root().join("operator/rbac.md");
    let listed = match fs::read_to_string(&doc_path) {
        Ok(doc) => from_markdown(&doc).unwrap_or_else(|e| panic!("{}: {e}", doc_path.display())),
        Err(e) => {
            let tool: selfplay_tests::tools::Tool = Err(format!(
                "{} is not there ({e}); the chart's RBAC cannot be compared with the operator's list",
                doc_path.display()
            ));
            let _ = available(&tool, test);
            return;
        }
    };
    let missing: Vec<String> = listed.difference(&granted).map(|p| p.to_string()).collect();
    let extra: Vec<String> = granted.difference(&listed).map(|p| p.to_string()).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "chart RBAC vs operator/rbac.md\n  the operator needs, the chart lacks: {missing:?}\n  the chart grants, the operator does not use: {extra:?}"
    );
}

fn operator_binary(test: &str) -> Option<PathBuf> {
    let binary = selfplay_tests::paths::target_dir().join("debug/operator");
    let tool = if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "{} is not built (cargo build -p selfplay-operator; cargo test --workspace builds it)",
            binary.display()
        ))
    };
    available(&tool, test)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The chart's monitors and NetworkPolicy select the pods the operator really creates
/// (`operator render` of the example run and pool), on ports those pods really have.
#[test]
fn monitors_select_the_pods_the_operator_creates() {
    let test = "monitors_select_the_pods_the_operator_creates";
    let Some(helm) = available(helm(), test) else {
        return;
    };
    let Some(operator) = operator_binary(test) else {
        return;
    };
    let mut pods = Vec::new();
    for example in ["selfplayrun.yaml", "sandboxpool-python.yaml"] {
        let file = workspace_root().join("crds/examples").join(example);
        let out = run_ok(Command::new(&operator).arg("render").arg("-f").arg(&file))
            .unwrap_or_else(|e| panic!("{e}"));
        pods.extend(
            objects(&out)
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .filter(|o| o["kind"] == "Pod"),
        );
    }
    let pod_with = |component: &str| -> &Value {
        pods.iter()
            .find(|p| p["metadata"]["labels"]["selfplay.dev/component"] == component)
            .unwrap_or_else(|| panic!("operator render made no {component} pod"))
    };
    let trainer = pod_with("trainer");
    let sandbox = pod_with("sandbox");
    let port_names = |pod: &Value| -> BTreeSet<String> {
        pod["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect()
    };

    let dir = scratch_dir("chart-monitor-pods");
    let all = all_features_file(&dir);
    let objs = render(&helm, &[&all], &[]);
    let pm_trainer = find(&objs, "PodMonitor", Some("selfplay-trainer"));
    assert!(
        labels_match(
            &pm_trainer["spec"]["selector"]["matchLabels"],
            &trainer["metadata"]["labels"]
        ),
        "the trainer PodMonitor does not select the operator's trainer pods: {}",
        trainer["metadata"]["labels"]
    );
    let port = pm_trainer["spec"]["podMetricsEndpoints"][0]["port"]
        .as_str()
        .expect("port");
    assert!(
        port_names(trainer).contains(port),
        "trainer pods have no port {port:?}"
    );

    // Why there is no sidecar PodMonitor: sandbox pods expose no metrics port. Once they do,
    // bring it back together with a pool NetworkPolicy rule for the monitoring namespace.
    assert!(
        !port_names(sandbox).contains(port),
        "sandbox pods now expose {port:?}: add the sidecar PodMonitor and its NetworkPolicy rule"
    );

    // The operator NetworkPolicy admits the trainer pods to the broker.
    let np = find(&objs, "NetworkPolicy", None);
    let peer = &np["spec"]["ingress"][0]["from"][0];
    assert!(labels_match(
        &peer["podSelector"]["matchLabels"],
        &trainer["metadata"]["labels"]
    ));
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "broker");
    let _ = fs::remove_dir_all(&dir);
}
