//! Rendering the chart with the real Helm binary, and reading what it rendered.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

use crate::paths::chart_dir;
use crate::tools::{run, run_ok};

/// Values that turn every optional feature of the chart on (and exercise the value
/// plumbing: digests, extra labels, relabelings, disabled alerts, HA).
pub const ALL_FEATURES_VALUES: &str = r#"
replicaCount: 2
clusterWide: true
sandboxes:
  maxPerNamespace: 64
commonLabels:
  team: ml-infra
crds:
  templated: true
  annotations:
    argocd.argoproj.io/sync-options: ServerSideApply=true
image:
  digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
childImagePullPolicy: IfNotPresent
extraArgs: ["--sidecar-binary-path=/usr/local/bin/sandbox-sidecar"]
extraEnv:
  - name: NO_COLOR
    value: "1"
serviceAccount:
  annotations:
    example.com/role: selfplay
service:
  annotations:
    example.com/scrape: "false"
podAnnotations:
  example.com/owner: ml-infra
podLabels:
  example.com/tier: control
priorityClassName: system-cluster-critical
nodeSelector:
  kubernetes.io/os: linux
tolerations:
  - key: CriticalAddonsOnly
    operator: Exists
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              app.kubernetes.io/component: operator
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        app.kubernetes.io/component: operator
networkPolicy:
  enabled: true
  metricsFrom:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: monitoring
serviceMonitor:
  enabled: true
  additionalLabels:
    release: kube-prometheus-stack
  scrapeTimeout: 10s
  metricRelabelings:
    - action: drop
      sourceLabels: [__name__]
      regex: go_.*
podMonitor:
  enabled: true
  additionalLabels:
    release: kube-prometheus-stack
  scrapeTimeout: 10s
  relabelings:
    - action: replace
      targetLabel: cluster
      replacement: gpu-a
prometheusRule:
  enabled: true
  additionalLabels:
    release: kube-prometheus-stack
  additionalRuleLabels:
    team: ml-infra
  disabledAlerts: [SelfPlayOperatorReconcileErrors]
  evaluationInterval: 30s
grafanaDashboard:
  annotations:
    grafana_folder: selfplay
"#;

/// `helm template` of the chart, as release "selfplay" in "selfplay-system", with values
/// files and extra arguments. Errors carry Helm's output.
pub fn template(helm: &Path, values: &[&Path], extra: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "selfplay"])
        .arg(chart_dir())
        .args(["--namespace", "selfplay-system"]);
    for v in values {
        cmd.arg("--values").arg(v);
    }
    cmd.args(extra);
    run_ok(&mut cmd)
}

/// `helm lint --strict` of the chart with values files and extra arguments: `Ok(output)` when
/// it passes, `Err(output)` when it fails.
pub fn lint(helm: &Path, values: &[&Path], extra: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm);
    cmd.args(["lint", "--strict"])
        .arg(chart_dir())
        .args(["--namespace", "selfplay-system"]);
    for v in values {
        cmd.arg("--values").arg(v);
    }
    cmd.args(extra);
    let out = run(&mut cmd)?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// The objects of a multi-document YAML stream (empty documents dropped).
pub fn objects(yaml: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v =
            Value::deserialize(doc).map_err(|e| format!("rendered YAML does not parse: {e}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The one object of `kind` (and `name`, when given); panics with the kinds present otherwise.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let mut hits = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n));
    let Some(first) = hits.next() else {
        let kinds: Vec<String> = objects
            .iter()
            .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
            .collect();
        panic!("no {kind} {name:?} among {kinds:?}");
    };
    assert!(hits.next().is_none(), "more than one {kind} {name:?}");
    first
}
