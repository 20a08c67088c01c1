//! The API as users meet it: generated CRD YAML in sync with the types, the examples valid,
//! every invalid example rejected with a message naming its field, immutability, defaults.

use std::path::{Path, PathBuf};

use selfplay_crds::validate::{self, FieldError, ValidationError};
use selfplay_crds::{SandboxPool, SelfPlayRun};
use serde_json::Value;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("examples dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read example");
    let mut docs = validate::parse_documents(&text).expect("parse example");
    assert_eq!(docs.len(), 1, "{} holds one object", path.display());
    docs.remove(0)
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let root = crate_dir().join("..");
    for crd in selfplay_crds::all_crds() {
        let expected = selfplay_crds::crd_yaml(&crd).expect("render");
        for dir in ["crds/generated", "charts/selfplay/crds"] {
            let path = root.join(dir).join(selfplay_crds::crd_file_name(&crd));
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == expected,
                "{} is out of date; run `cargo run -p selfplay-crds --bin crdgen`",
                path.display()
            );
        }
    }
}

#[test]
fn crds_have_the_expected_shape() {
    for crd in selfplay_crds::all_crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.group, "selfplay.dev");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["selfplay".to_string()][..]),
            "{name}"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{name} short names"
        );
        let version = &crd.spec.versions[0];
        assert!(version.served && version.storage);
        let sub = version.subresources.as_ref().expect("subresources");
        assert!(sub.status.is_some(), "{name} has the status subresource");
        assert!(
            version
                .additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 4),
            "{name} printer columns"
        );
        let schema = serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref()),
        )
        .expect("schema");
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{name} conditions list-map"
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        let cond_props = &conditions["items"]["properties"];
        assert!(
            cond_props.get("observedGeneration").is_some(),
            "{name} conditions carry observedGeneration"
        );
        if name == "sandboxpools.selfplay.dev" {
            let scale = sub.scale.as_ref().expect("pool has /scale");
            assert_eq!(scale.spec_replicas_path, ".spec.warm");
            assert_eq!(scale.status_replicas_path, ".status.replicas");
            assert_eq!(
                scale.label_selector_path.as_deref(),
                Some(".status.selector")
            );
        }
    }
}

#[test]
fn valid_examples_pass_and_decode() {
    let files = yaml_files(&crate_dir().join("examples"));
    assert!(files.len() >= 4, "a run, two pools and a checkpoint");
    let mut kinds = Vec::new();
    for path in files {
        let object = load(&path);
        match validate::validate_value(&object, None) {
            Ok(kind) => kinds.push(kind),
            Err(e) => panic!("{} should be valid: {e}", path.display()),
        }
    }
    let count = |k: validate::Kind| kinds.iter().filter(|x| **x == k).count();
    assert_eq!(count(validate::Kind::SelfPlayRun), 1);
    assert_eq!(count(validate::Kind::SandboxPool), 3);
    assert_eq!(count(validate::Kind::Checkpoint), 1);

    let run: SelfPlayRun =
        validate::parse_as(&load(&crate_dir().join("examples/selfplayrun.yaml")), None)
            .expect("run");
    assert_eq!(run.spec.pools.len(), 2);
    assert_eq!(run.spec.training.dual_clip, Some(3.0));
    let pool: SandboxPool = validate::parse_as(
        &load(&crate_dir().join("examples/sandboxpool-rust.yaml")),
        None,
    )
    .expect("pool");
    assert_eq!(pool.spec.sidecar_port, 7070, "defaulted");
    assert_eq!(pool.spec.sandbox_ttl_seconds, 3600, "defaulted");
}

fn expected_field(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read");
    text.lines()
        .find_map(|l| l.strip_prefix("# expect-error: "))
        .unwrap_or_else(|| panic!("{} lacks an `# expect-error: <field>` line", path.display()))
        .trim()
        .to_string()
}

fn names_field(errors: &[FieldError], field: &str) -> bool {
    errors.iter().any(|e| {
        e.field == field
            || e.field.starts_with(&format!("{field}."))
            || e.field.starts_with(&format!("{field}["))
    })
}

#[test]
fn every_invalid_example_is_rejected_naming_its_field() {
    let files = yaml_files(&crate_dir().join("examples/invalid"));
    assert!(files.len() >= 10);
    for path in files {
        let field = expected_field(&path);
        let object = load(&path);
        match validate::validate_value(&object, None) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(ValidationError::Invalid { errors, .. }) => {
                assert!(
                    names_field(&errors, &field),
                    "{}: expected an error on {field}, got {errors:?}",
                    path.display()
                );
                let shown = ValidationError::Invalid {
                    kind: String::new(),
                    name: String::new(),
                    errors,
                }
                .to_string();
                assert!(shown.contains(&field), "the message names {field}: {shown}");
            }
            Err(other) => panic!("{}: unexpected error kind {other}", path.display()),
        }
    }
}

#[test]
fn run_model_and_pools_are_immutable() {
    let old = load(&crate_dir().join("examples/selfplayrun.yaml"));
    validate::validate_value(&old, Some(&old)).expect("an unchanged update is fine");

    let mut tuned = old.clone();
    tuned["spec"]["selfPlay"]["temperature"] = serde_json::json!(0.7);
    validate::validate_value(&tuned, Some(&old)).expect("settings may change");

    let mut new_model = old.clone();
    new_model["spec"]["model"]["path"] = serde_json::json!("/model/other");
    let err = validate::validate_value(&new_model, Some(&old)).expect_err("model is immutable");
    assert!(names_field(err.field_errors(), "spec.model"), "{err}");
    assert!(err.to_string().contains("immutable"), "{err}");

    let mut new_pools = old.clone();
    new_pools["spec"]["pools"] = serde_json::json!([{"name": "python-requests"}]);
    let err = validate::validate_value(&new_pools, Some(&old)).expect_err("pools are immutable");
    assert!(names_field(err.field_errors(), "spec.pools"), "{err}");
}

#[test]
fn checkpoint_spec_is_immutable() {
    let old = load(&crate_dir().join("examples/checkpoint.yaml"));
    let mut moved = old.clone();
    moved["spec"]["location"] = serde_json::json!("/elsewhere");
    let err =
        validate::validate_value(&moved, Some(&old)).expect_err("checkpoint spec is immutable");
    assert!(names_field(err.field_errors(), "spec"), "{err}");
}

#[test]
fn minimal_run_gets_the_documented_defaults() {
    let run = validate::parse_run_yaml(
        "apiVersion: selfplay.dev/v1alpha1\nkind: SelfPlayRun\nmetadata: {name: m}\nspec:\n  model: {tiny: {seed: 7}}\n  pools: [{name: p}]\n",
    )
    .expect("minimal run");
    let s = &run.spec;
    assert_eq!(s.self_play.alpha, 0.8);
    assert_eq!(s.self_play.solver_group_size, 8);
    assert_eq!(s.training.eps_low, 0.2);
    assert_eq!(s.training.eps_high, 0.28);
    assert_eq!(s.training.max_staleness, 8);
    assert_eq!(s.training.kl_coef, 0.0, "no KL term by default");
    assert!(s.self_play.higher_order_bugs);
    assert_eq!(s.checkpoint.keep_last, 3);
    assert!(!s.suspend);
    assert_eq!(s.model.tiny.as_ref().map(|t| t.seed), Some(7));
    assert_eq!(s.pools[0].weight, 1);
}

#[test]
fn wrong_api_version_and_kind_are_named() {
    let err = validate::parse_run_yaml(
        "apiVersion: v1\nkind: SelfPlayRun\nmetadata: {name: x}\nspec: {}\n",
    )
    .expect_err("v1");
    assert!(err.to_string().contains("apiVersion"), "{err}");
    let err = validate::parse_run_yaml(
        "apiVersion: selfplay.dev/v1alpha1\nkind: Pod\nmetadata: {name: x}\n",
    )
    .expect_err("Pod");
    assert!(err.to_string().contains("kind"), "{err}");
    let err = validate::parse_run_yaml("spec: [unclosed").expect_err("syntax");
    assert!(matches!(err, ValidationError::Syntax(_)), "{err}");
}
