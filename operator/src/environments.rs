//! A pool's environments on a cluster: those it lists and those in the ConfigMap its
//! `environmentsFrom.configMap` names, parsed with [`selfplay_crds::environments`], and a
//! cache of the result that the pool controller fills and the broker reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use selfplay_crds::environments::{all_environments, parse_instances};
use selfplay_crds::{Environment, SandboxPool, SandboxPoolSpec};

/// Why a pool's environments cannot be known; the pool is Degraded with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvironmentsUnavailable {
    #[error("environmentsFrom.configMap: ConfigMap {0:?} does not exist")]
    ConfigMapMissing(String),
    #[error("environmentsFrom.configMap: ConfigMap {name:?} has no key {key:?}")]
    KeyMissing { name: String, key: String },
    #[error("environmentsFrom.configMap: ConfigMap {name:?} key {key:?}: {message}")]
    Malformed {
        name: String,
        key: String,
        message: String,
    },
    #[error(
        "environmentsFrom.file names a file on the trainer's machine (trainer local); on a cluster use environmentsFrom.configMap"
    )]
    FileOnCluster,
    #[error("environments: {0}")]
    Invalid(String),
}

/// Whether the pool's environments need a ConfigMap read.
pub fn config_map_source(spec: &SandboxPoolSpec) -> Option<(&str, &str)> {
    let cm = spec.environments_from.as_ref()?.config_map.as_ref()?;
    Some((cm.name.as_str(), cm.key.as_str()))
}

/// The pool's environments, given the ConfigMap its source names as read (`None`: not
/// found). Pure: the controller reads, this decides.
pub fn resolve(
    spec: &SandboxPoolSpec,
    config_map: Option<&ConfigMap>,
) -> Result<Vec<Environment>, EnvironmentsUnavailable> {
    let from_source = match &spec.environments_from {
        None => Vec::new(),
        Some(src) => match &src.config_map {
            Some(key) => {
                let cm = config_map
                    .ok_or_else(|| EnvironmentsUnavailable::ConfigMapMissing(key.name.clone()))?;
                let text = cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&key.key))
                    .ok_or_else(|| EnvironmentsUnavailable::KeyMissing {
                        name: key.name.clone(),
                        key: key.key.clone(),
                    })?;
                parse_instances(text, src).map_err(|e| EnvironmentsUnavailable::Malformed {
                    name: key.name.clone(),
                    key: key.key.clone(),
                    message: e.to_string(),
                })?
            }
            // A cluster cannot read the trainer's files: refuse rather than run without them.
            None if src.file.is_some() => return Err(EnvironmentsUnavailable::FileOnCluster),
            None => Vec::new(),
        },
    };
    all_environments(spec, from_source).map_err(|e| EnvironmentsUnavailable::Invalid(e.to_string()))
}

/// Whether a pool has environments at all (listed or from a source).
pub fn has_environments(spec: &SandboxPoolSpec) -> bool {
    !spec.environments.is_empty() || spec.environments_from.is_some()
}

struct Entry {
    /// The pool's UID and generation the list belongs to: a pool recreated under the same
    /// name, or edited, is read afresh.
    uid: Option<String>,
    generation: Option<i64>,
    /// The ConfigMap's resourceVersion the list was parsed from.
    source_version: Option<String>,
    read_at: Instant,
    environments: Arc<Vec<Environment>>,
}

/// Resolved environments by pool (namespace, name). The pool controller fills it on every
/// reconcile that reads the ConfigMap; the broker reads it to start sandboxes on demand and
/// to answer `ListEnvironments`.
#[derive(Default)]
pub struct EnvironmentCache {
    entries: Mutex<HashMap<(String, String), Entry>>,
}

/// How long a ConfigMap read serves: a large instance list is not fetched and parsed at
/// every pod event of a busy pool; an edit reaches the pool within this time.
pub const SOURCE_MAX_AGE: Duration = Duration::from_secs(60);

impl EnvironmentCache {
    fn key(pool: &SandboxPool) -> (String, String) {
        (pool.namespace().unwrap_or_default(), pool.name_any())
    }

    fn current(e: &Entry, pool: &SandboxPool) -> bool {
        e.uid == pool.metadata.uid && e.generation == pool.metadata.generation
    }

    /// The pool's environments without an API call: computed from the spec when it lists
    /// them all, else as last read for this generation of the pool. `None` when a ConfigMap
    /// must be read first (or could not be).
    pub fn get(&self, pool: &SandboxPool) -> Option<Arc<Vec<Environment>>> {
        if config_map_source(&pool.spec).is_none() {
            return resolve(&pool.spec, None).ok().map(Arc::new);
        }
        let entries = self.entries.lock().ok()?;
        let e = entries.get(&Self::key(pool))?;
        Self::current(e, pool).then(|| e.environments.clone())
    }

    /// Like [`get`](Self::get), but `None` when the read is older than `max_age`.
    pub fn fresh(&self, pool: &SandboxPool, max_age: Duration) -> Option<Arc<Vec<Environment>>> {
        if config_map_source(&pool.spec).is_none() {
            return self.get(pool);
        }
        let entries = self.entries.lock().ok()?;
        let e = entries.get(&Self::key(pool))?;
        (Self::current(e, pool) && e.read_at.elapsed() < max_age).then(|| e.environments.clone())
    }

    /// The ConfigMap version the cached list came from, to skip re-parsing an unchanged one.
    pub fn cached_if_version(
        &self,
        pool: &SandboxPool,
        version: Option<&str>,
    ) -> Option<Arc<Vec<Environment>>> {
        let mut entries = self.entries.lock().ok()?;
        let e = entries.get_mut(&Self::key(pool))?;
        if Self::current(e, pool) && version.is_some() && e.source_version.as_deref() == version {
            e.read_at = Instant::now();
            return Some(e.environments.clone());
        }
        None
    }

    pub fn put(
        &self,
        pool: &SandboxPool,
        source_version: Option<String>,
        environments: Vec<Environment>,
    ) -> Arc<Vec<Environment>> {
        let environments = Arc::new(environments);
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                Self::key(pool),
                Entry {
                    uid: pool.metadata.uid.clone(),
                    generation: pool.metadata.generation,
                    source_version,
                    read_at: Instant::now(),
                    environments: environments.clone(),
                },
            );
        }
        environments
    }

    /// Forgets a pool whose environments could not be read (or that was deleted).
    pub fn forget(&self, pool: &SandboxPool) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(&Self::key(pool));
        }
    }
}
