//! The run a `trainer local` invocation trains: a `SelfPlayRun` in the same YAML as the custom
//! resource (same types, same validation, same defaults), with the `SandboxPool`s it names in
//! the same file. On one machine a pool's repository comes from `spec.source.localPath`.

use std::path::{Path, PathBuf};

use selfplay_crds::validate::{self, ValidationError};
use selfplay_crds::{SandboxPool, SandboxPoolSpec, SelfPlayRun};
use thiserror::Error;

/// The built-in run: the bundled sample repository and a tiny seeded model.
pub const DEFAULT_RUN_YAML: &str = include_str!("../../assets/default-run.yaml");

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{path}: no SelfPlayRun in the file")]
    NoRun { path: String },
    #[error(
        "spec.pools[{index}]: SandboxPool {name:?} is not defined in {path} (a local run needs each pool in the same file)"
    )]
    MissingPool {
        index: usize,
        name: String,
        path: String,
    },
    #[error(
        "spec.evaluation.pool: SandboxPool {name:?} is not defined in {path} (a local run needs each pool in the same file)"
    )]
    MissingEvaluationPool { name: String, path: String },
    #[error(
        "spec.evaluation.tasks: {path}: a local run reads its task set from `file` (a ConfigMap needs a cluster)"
    )]
    EvaluationTasks { path: String },
    #[error("SandboxPool {name:?}: spec.environmentsFrom: {message}")]
    Environments { name: String, message: String },
    #[error(
        "SandboxPool {name:?}: spec.source.localPath {path} is neither a directory nor a git bundle"
    )]
    NotADirectory { name: String, path: PathBuf },
}

/// A pool with its repository resolved on this machine.
#[derive(Clone, Debug)]
pub struct LocalPool {
    pub name: String,
    pub weight: u32,
    pub spec: SandboxPoolSpec,
    /// The repository on this machine (`spec.source.localPath`): bubblewrap sandboxes. `None`:
    /// the repository is in `spec.template.image`, and sandboxes are Docker containers.
    pub repo_dir: Option<PathBuf>,
    /// `spec.source.toolchain`, resolved.
    pub toolchain: Vec<PathBuf>,
    /// The pool's environments (its list and `environmentsFrom.file`); empty: the template's
    /// image is its one environment.
    pub environments: Vec<selfplay_crds::Environment>,
}

impl LocalPool {
    /// What the pool's local sandboxes see and may use: its toolchain, the template's
    /// environment (plain values; `valueFrom` needs a cluster) and the memory limit of its
    /// resources, with the default limits for the rest.
    pub fn sandbox_settings(&self) -> crate::engine::local::PoolSettings {
        let t = &self.spec.template;
        let mut limits = crate::engine::local::SandboxLimits::default();
        if let Some(mem) = t
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| quantity_bytes(&q.0))
        {
            limits.memory_bytes = mem;
        }
        crate::engine::local::PoolSettings {
            toolchain: (!self.toolchain.is_empty()).then(|| self.toolchain.clone()),
            env: t
                .env
                .iter()
                .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
                .collect(),
            limits,
        }
    }
}

/// Bytes of a Kubernetes quantity (`512Mi`, `4G`, `1073741824`); `None` when it is not one.
pub fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    let mult: f64 = match unit {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    (n >= 0.0 && n.is_finite()).then_some((n * mult) as u64)
}

/// A pool's environments: its list, then those of `environmentsFrom.file` (relative to the
/// run file's directory). A ConfigMap source needs a cluster.
fn environments(
    spec: &SandboxPoolSpec,
    name: &str,
    base: &Path,
) -> Result<Vec<selfplay_crds::Environment>, ConfigError> {
    let err = |message: String| ConfigError::Environments {
        name: name.to_string(),
        message,
    };
    let mut from_file = Vec::new();
    if let Some(src) = &spec.environments_from {
        if src.config_map.is_some() && src.file.is_none() {
            return Err(err(
                "configMap is read by the operator on a cluster; a local run needs file".into(),
            ));
        }
        if let Some(f) = &src.file {
            let path = if Path::new(f).is_absolute() {
                PathBuf::from(f)
            } else {
                base.join(f)
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
            from_file = selfplay_crds::environments::parse_instances(&text, src)
                .map_err(|e| err(format!("{}: {e}", path.display())))?;
        }
    }
    selfplay_crds::environments::all_environments(spec, from_file).map_err(|e| err(e.to_string()))
}

/// A run's held-out evaluation on this machine.
#[derive(Clone, Debug)]
pub struct LocalEvaluation {
    pub pool: LocalPool,
    /// `evaluation.tasks.file`, resolved against the run file's directory.
    pub tasks: PathBuf,
    pub settings: selfplay_crds::run::EvaluationSettings,
}

/// A validated run and its pools.
#[derive(Clone, Debug)]
pub struct LocalRun {
    pub run: SelfPlayRun,
    pub pools: Vec<LocalPool>,
    /// `spec.evaluation` resolved on this machine: its pool (which need not be trained on)
    /// and its task file.
    pub evaluation: Option<LocalEvaluation>,
    /// Where the spec came from (a path, or `<built-in default>`).
    pub source: String,
    /// Things the spec asks for that one machine cannot do; printed at start-up.
    pub warnings: Vec<String>,
}

impl LocalRun {
    pub fn name(&self) -> String {
        self.run
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "local".to_string())
    }
}

/// Loads `path`, or the built-in default when `None`.
pub fn load(path: Option<&Path>) -> Result<LocalRun, ConfigError> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            let base = p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            parse(&text, &p.display().to_string(), &base)
        }
        None => parse(DEFAULT_RUN_YAML, BUILTIN_SOURCE, &assets_dir()),
    }
}

const BUILTIN_SOURCE: &str = "<built-in default>";

/// A `git bundle` file: the repository (with its history) is cloned from it for the run.
pub fn is_bundle(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bundle")
}

/// The trainer crate's `assets/` directory (the bundled sample repository lives there).
pub fn assets_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SELFPLAY_ASSETS_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Parses and validates a run file; relative `localPath`s resolve against `base`.
pub fn parse(text: &str, source: &str, base: &Path) -> Result<LocalRun, ConfigError> {
    let docs = validate::parse_documents(text)?;
    let mut run: Option<SelfPlayRun> = None;
    let mut pools: Vec<SandboxPool> = Vec::new();
    for doc in &docs {
        match doc.get("kind").and_then(|k| k.as_str()) {
            Some("SelfPlayRun") => run = Some(validate::parse_as(doc, None)?),
            Some("SandboxPool") => pools.push(validate::parse_as(doc, None)?),
            _ => {
                // Anything else is validated so that a typo in `kind` is reported, not ignored.
                validate::validate_value(doc, None)?;
            }
        }
    }
    let run = run.ok_or_else(|| ConfigError::NoRun {
        path: source.to_string(),
    })?;

    let resolve = |name: &str,
                   index: Option<usize>,
                   weight: i32|
     -> Result<LocalPool, ConfigError> {
        let pool = pools
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| match index {
                Some(index) => ConfigError::MissingPool {
                    index,
                    name: name.to_string(),
                    path: source.to_string(),
                },
                None => ConfigError::MissingEvaluationPool {
                    name: name.to_string(),
                    path: source.to_string(),
                },
            })?;
        // No local path: the pool's sandboxes are containers of its image (Docker).
        let rel = pool
            .spec
            .source
            .as_ref()
            .and_then(|s| s.local_path.as_deref());
        let repo_dir = match rel {
            None => None,
            Some(rel) => {
                let repo_dir = if Path::new(rel).is_absolute() {
                    PathBuf::from(rel)
                } else {
                    base.join(rel)
                };
                let builtin = source == BUILTIN_SOURCE;
                if !(repo_dir.is_dir() || is_bundle(&repo_dir) && (builtin || repo_dir.is_file())) {
                    return Err(ConfigError::NotADirectory {
                        name: name.to_string(),
                        path: repo_dir,
                    });
                }
                Some(repo_dir)
            }
        };
        let toolchain = pool
            .spec
            .source
            .as_ref()
            .map(|s| {
                s.toolchain
                    .iter()
                    .map(|d| {
                        if Path::new(d).is_absolute() {
                            PathBuf::from(d)
                        } else {
                            base.join(d)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let environments = environments(&pool.spec, name, base)?;
        if repo_dir.is_some() && !environments.is_empty() {
            return Err(ConfigError::Environments {
                name: name.to_string(),
                message: "environments are images; a pool with spec.source.localPath has one \
                          repository"
                    .to_string(),
            });
        }
        Ok(LocalPool {
            name: name.to_string(),
            weight: weight.max(1) as u32,
            spec: pool.spec.clone(),
            repo_dir,
            toolchain,
            environments,
        })
    };
    let mut local = Vec::new();
    for (index, pref) in run.spec.pools.iter().enumerate() {
        local.push(resolve(&pref.name, Some(index), pref.weight)?);
    }
    let evaluation = match &run.spec.evaluation {
        None => None,
        Some(e) => {
            let tasks = match (&e.tasks.file, &e.tasks.config_map) {
                (Some(f), None) => {
                    if Path::new(f).is_absolute() {
                        PathBuf::from(f)
                    } else {
                        base.join(f)
                    }
                }
                _ => {
                    return Err(ConfigError::EvaluationTasks {
                        path: source.to_string(),
                    });
                }
            };
            Some(LocalEvaluation {
                pool: resolve(&e.pool, None, 1)?,
                tasks,
                settings: e.clone(),
            })
        }
    };

    let mut warnings = Vec::new();
    let t = &run.spec.trainer;
    if t.nodes > 1 {
        warnings.push(format!(
            "spec.trainer.nodes is {}: a local run uses this one machine only; multi-node training needs the operator",
            t.nodes
        ));
    }
    if t.gpus > 1 {
        warnings.push(format!(
            "spec.trainer.gpus is {}: data parallelism over several GPUs (NCCL) has not yet been run on a multi-GPU machine",
            t.gpus
        ));
    }
    for p in &local {
        if p.spec.template.runtime_class_name.is_some() {
            warnings.push(format!(
                "SandboxPool {:?}: runtimeClassName applies to pods only; local sandboxes use bubblewrap when available",
                p.name
            ));
        }
    }
    if run.spec.suspend {
        warnings.push("spec.suspend is true: a local run ignores it and trains".to_string());
    }
    Ok(LocalRun {
        run,
        pools: local,
        evaluation,
        source: source.to_string(),
        warnings,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn quantities_in_bytes() {
        assert_eq!(quantity_bytes("512Mi"), Some(512 << 20));
        assert_eq!(quantity_bytes("4G"), Some(4_000_000_000));
        assert_eq!(quantity_bytes("1073741824"), Some(1 << 30));
        assert_eq!(quantity_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(quantity_bytes("-1Gi"), None);
    }

    use super::*;

    #[test]
    fn the_default_run_is_valid_and_points_at_the_sample_repo() {
        let run = load(None).expect("default");
        assert_eq!(run.pools.len(), 1);
        assert!(run.pools[0].repo_dir.as_deref().is_some_and(is_bundle));
        assert!(run.run.spec.model.tiny.is_some());
        assert!(run.warnings.is_empty(), "{:?}", run.warnings);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let text = DEFAULT_RUN_YAML.replace("alpha: 0.8", "alpha: 2.5");
        let err = parse(&text, "x.yaml", &assets_dir()).expect_err("alpha out of range");
        assert!(err.to_string().contains("spec.selfPlay.alpha"), "{err}");
    }

    #[test]
    fn a_missing_pool_is_named() {
        let text = DEFAULT_RUN_YAML.replace("- name: sample", "- name: elsewhere");
        let err = parse(&text, "x.yaml", &assets_dir()).expect_err("missing pool");
        assert!(err.to_string().contains("spec.pools[0]"), "{err}");
    }

    #[test]
    fn multi_node_is_refused_loudly() {
        let text = DEFAULT_RUN_YAML.replace("gpus: 0", "gpus: 8\n    nodes: 4");
        let run = parse(&text, "x.yaml", &assets_dir()).expect("valid spec");
        assert!(
            run.warnings
                .iter()
                .any(|w| w.contains("spec.trainer.nodes")),
            "{:?}",
            run.warnings
        );
    }
}
