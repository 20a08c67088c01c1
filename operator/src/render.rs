//! `operator render`: the objects the operator would create for the pools and runs of a
//! YAML file, so that users can review them and tests can validate them against the
//! Kubernetes schemas. It runs the same validation and builders as the controllers.

use selfplay_crds::{Checkpoint, SandboxPool, SelfPlayRun};
use serde::Deserialize;

use crate::build::{
    ResumePoint, pool_token_secret, run_token_secret, sandbox_network_policy, sandbox_pod,
    trainer_config_map, trainer_pod,
};
use crate::config::OperatorConfig;
use crate::decide::checkpoint::CheckpointInfo;
use crate::validate::{InvalidSpec, validate_pool, validate_run};

/// Stands in for the API server's uid in the owner references of rendered objects.
pub const PLACEHOLDER_UID: &str = "00000000-0000-0000-0000-000000000000";
/// Stands in for a token the operator generates when it creates a Secret.
pub const PLACEHOLDER_TOKEN: &str = "generated-by-the-operator";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("document {index}: not YAML the operator understands: {source}")]
    Parse {
        index: usize,
        source: serde_yaml::Error,
    },
    #[error("document {index} ({kind} {name}): {source}")]
    Invalid {
        index: usize,
        kind: String,
        name: String,
        source: InvalidSpec,
    },
    #[error("cannot serialise a rendered object: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("no SandboxPool or SelfPlayRun in the input")]
    Empty,
}

/// The output of `render`: objects in creation order, and notes for stderr.
#[derive(Debug, Default)]
pub struct Rendered {
    pub objects: Vec<serde_json::Value>,
    pub notes: Vec<String>,
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(default)]
    kind: String,
}

enum Doc {
    Pool(Box<SandboxPool>),
    Run(Box<SelfPlayRun>),
    Checkpoint(Box<Checkpoint>),
}

fn fill_meta(meta: &mut kube::api::ObjectMeta, default_namespace: &str) {
    if meta.namespace.is_none() {
        meta.namespace = Some(default_namespace.to_string());
    }
    if meta.uid.is_none() {
        meta.uid = Some(PLACEHOLDER_UID.to_string());
    }
}

/// Renders every SandboxPool and SelfPlayRun of a (multi-document) YAML text. Objects without
/// a namespace are put in `default_namespace`. Checkpoints in the same text are used to
/// resolve `resumeFrom`; other kinds are skipped with a note.
pub fn render(
    yaml: &str,
    default_namespace: &str,
    cfg: &OperatorConfig,
) -> Result<Rendered, RenderError> {
    let mut docs = Vec::new();
    let mut out = Rendered::default();
    for (index, de) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = serde_yaml::Value::deserialize(de)
            .map_err(|source| RenderError::Parse { index, source })?;
        if value.is_null() {
            continue;
        }
        let tm: TypeMeta = serde_yaml::from_value(value.clone())
            .map_err(|source| RenderError::Parse { index, source })?;
        let parse_err = |source| RenderError::Parse { index, source };
        match tm.kind.as_str() {
            "SandboxPool" => {
                let mut p: SandboxPool = serde_yaml::from_value(value).map_err(parse_err)?;
                fill_meta(&mut p.metadata, default_namespace);
                docs.push((index, Doc::Pool(Box::new(p))));
            }
            "SelfPlayRun" => {
                let mut r: SelfPlayRun = serde_yaml::from_value(value).map_err(parse_err)?;
                fill_meta(&mut r.metadata, default_namespace);
                docs.push((index, Doc::Run(Box::new(r))));
            }
            "Checkpoint" => {
                let mut c: Checkpoint = serde_yaml::from_value(value).map_err(parse_err)?;
                fill_meta(&mut c.metadata, default_namespace);
                docs.push((index, Doc::Checkpoint(Box::new(c))));
            }
            other => out
                .notes
                .push(format!("document {index}: kind {other:?} skipped")),
        }
    }

    let runs: Vec<&SelfPlayRun> = docs
        .iter()
        .filter_map(|(_, d)| {
            if let Doc::Run(r) = d {
                Some(r.as_ref())
            } else {
                None
            }
        })
        .collect();
    let checkpoints: Vec<&Checkpoint> = docs
        .iter()
        .filter_map(|(_, d)| {
            if let Doc::Checkpoint(c) = d {
                Some(c.as_ref())
            } else {
                None
            }
        })
        .collect();

    for (index, doc) in &docs {
        match doc {
            Doc::Pool(pool) => {
                let v = validate_pool(pool, cfg).map_err(|source| RenderError::Invalid {
                    index: *index,
                    kind: "SandboxPool".into(),
                    name: pool.metadata.name.clone().unwrap_or_default(),
                    source,
                })?;
                let users: Vec<String> = runs
                    .iter()
                    .filter(|r| r.metadata.namespace.as_deref() == Some(v.namespace.as_str()))
                    .filter(|r| r.spec.uses_pool(&v.name))
                    .filter_map(|r| r.metadata.name.clone())
                    .collect();
                out.objects.push(serde_json::to_value(pool_token_secret(
                    &v.name,
                    &v.namespace,
                    &v.owner,
                    PLACEHOLDER_TOKEN,
                ))?);
                out.objects
                    .push(serde_json::to_value(sandbox_network_policy(&v, &users))?);
                // The warm sandboxes, per environment when the pool has them (a ConfigMap
                // source is read on the cluster; here only the listed ones are known).
                let envs = if crate::environments::config_map_source(v.spec).is_some() {
                    out.notes.push(format!(
                        "SandboxPool {}: environmentsFrom.configMap is read on the cluster; only the listed environments are rendered",
                        v.name
                    ));
                    v.spec.environments.clone()
                } else {
                    crate::environments::resolve(v.spec, None).unwrap_or_default()
                };
                if envs.is_empty() {
                    for _ in 0..v.spec.warm {
                        out.objects
                            .push(serde_json::to_value(sandbox_pod(&v, cfg))?);
                    }
                } else {
                    let warm = crate::decide::pool::warm_targets(v.spec.warm, &envs);
                    for (env, n) in envs.iter().zip(warm) {
                        for _ in 0..n {
                            out.objects.push(serde_json::to_value(
                                crate::build::environment_sandbox_pod(&v, env, cfg),
                            )?);
                        }
                    }
                }
            }
            Doc::Run(run) => {
                let v = validate_run(run).map_err(|source| RenderError::Invalid {
                    index: *index,
                    kind: "SelfPlayRun".into(),
                    name: run.metadata.name.clone().unwrap_or_default(),
                    source,
                })?;
                for w in v.warnings.iter().chain(&v.notices) {
                    out.notes.push(format!("SelfPlayRun {}: {w}", v.name));
                }
                let resume: Option<ResumePoint> = v.spec.resume_from.as_ref().and_then(|name| {
                    let found = checkpoints
                        .iter()
                        .find(|c| c.metadata.name.as_deref() == Some(name.as_str()) && c.metadata.namespace.as_deref() == Some(v.namespace.as_str()))
                        .map(|c| CheckpointInfo::from_object(c).resume_point());
                    if found.is_none() {
                        out.notes.push(format!(
                            "SelfPlayRun {}: resumeFrom {name} is looked up when the run starts; rendered without --resume-from",
                            v.name
                        ));
                    }
                    found
                });
                out.objects.push(serde_json::to_value(run_token_secret(
                    &v.name,
                    &v.namespace,
                    &v.owner,
                    PLACEHOLDER_TOKEN,
                ))?);
                out.objects
                    .push(serde_json::to_value(trainer_config_map(&v)?)?);
                out.objects.push(serde_json::to_value(trainer_pod(
                    &v,
                    0,
                    resume.as_ref(),
                    cfg,
                ))?);
            }
            Doc::Checkpoint(_) => {}
        }
    }
    if !docs
        .iter()
        .any(|(_, d)| matches!(d, Doc::Pool(_) | Doc::Run(_)))
    {
        return Err(RenderError::Empty);
    }
    Ok(out)
}

/// Multi-document YAML of the rendered objects.
pub fn to_yaml(objects: &[serde_json::Value]) -> Result<String, serde_yaml::Error> {
    let mut s = String::new();
    for o in objects {
        s.push_str("---\n");
        s.push_str(&serde_yaml::to_string(o)?);
    }
    Ok(s)
}
