//! An in-memory [`Backend`] with the API server's optimistic-lock semantics: every pod has a
//! resourceVersion that each write bumps, and a claim succeeds only when the version it
//! carries is the current one. Used by tests (many concurrent acquires, several brokers with
//! stale caches) and nowhere else; it is not a substitute for the API server.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use selfplay_crds::{Checkpoint, ProgressSnapshot};

use crate::broker::backend::{
    Backend, BackendError, Claim, ClaimOutcome, Released, release_refusal,
};
use crate::names::LABEL_CLAIMED_BY;

#[derive(Default)]
pub struct MemoryBackend {
    version: AtomicU64,
    /// Off only in the test that shows what goes wrong without the lock.
    check_versions: bool,
    /// Claims refused because the pod had changed since it was read.
    pub conflicts: AtomicU64,
    pods: Mutex<HashMap<(String, String), Pod>>,
    pub secrets: Mutex<HashMap<(String, String), String>>,
    pub progress: Mutex<HashMap<(String, String), ProgressSnapshot>>,
    pub checkpoints: Mutex<HashMap<(String, String), Checkpoint>>,
    pub deleted: Mutex<Vec<(String, String)>>,
    /// Pods created through [`Backend::create_sandbox`], in order (names given here, as the
    /// API server does from `generateName`).
    pub created: Mutex<Vec<Pod>>,
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self {
            version: AtomicU64::new(100),
            check_versions: true,
            ..Default::default()
        }
    }

    /// The same store with the resourceVersion check switched off: what a claim without the
    /// optimistic lock would do. For tests only.
    pub fn without_lock() -> Self {
        Self {
            check_versions: false,
            ..Self::new()
        }
    }

    /// Stores a pod with a fresh resourceVersion and returns it as stored.
    pub fn put_pod(&self, mut pod: Pod) -> Pod {
        pod.metadata.resource_version =
            Some(self.version.fetch_add(1, Ordering::SeqCst).to_string());
        let k = key(&pod.namespace().unwrap_or_default(), &pod.name_any());
        if let Ok(mut pods) = self.pods.lock() {
            pods.insert(k, pod.clone());
        }
        pod
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.pods.lock().ok()?.get(&key(ns, name)).cloned()
    }

    pub fn put_secret(&self, ns: &str, name: &str, token: &str) {
        if let Ok(mut s) = self.secrets.lock() {
            s.insert(key(ns, name), token.to_string());
        }
    }
}

impl Backend for MemoryBackend {
    async fn claim(&self, pod: &Pod, claim: &Claim) -> Result<ClaimOutcome, BackendError> {
        let k = key(&pod.namespace().unwrap_or_default(), &pod.name_any());
        let mut pods = self
            .pods
            .lock()
            .map_err(|_| BackendError::Other("poisoned".into()))?;
        let Some(current) = pods.get_mut(&k) else {
            return Ok(ClaimOutcome::Lost);
        };
        if self.check_versions && current.metadata.resource_version != pod.metadata.resource_version
        {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
            return Ok(ClaimOutcome::Lost);
        }
        current
            .labels_mut()
            .insert(LABEL_CLAIMED_BY.to_string(), claim.run_name.clone());
        current.metadata.resource_version =
            Some(self.version.fetch_add(1, Ordering::SeqCst).to_string());
        Ok(ClaimOutcome::Claimed(Box::new(current.clone())))
    }

    async fn create_sandbox(&self, pod: &Pod) -> Result<Pod, BackendError> {
        let mut pod = pod.clone();
        let n = self.version.fetch_add(1, Ordering::SeqCst);
        if pod.metadata.name.is_none() {
            let prefix = pod.metadata.generate_name.clone().unwrap_or_default();
            pod.metadata.name = Some(format!("{prefix}{n:05x}"));
        }
        pod.metadata.uid = Some(format!("uid-created-{n}"));
        pod.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let stored = self.put_pod(pod);
        if let Ok(mut c) = self.created.lock() {
            c.push(stored.clone());
        }
        Ok(stored)
    }

    async fn delete_sandbox(&self, namespace: &str, name: &str) -> Result<(), BackendError> {
        let mut pods = self
            .pods
            .lock()
            .map_err(|_| BackendError::Other("poisoned".into()))?;
        if pods.remove(&key(namespace, name)).is_some()
            && let Ok(mut d) = self.deleted.lock()
        {
            d.push(key(namespace, name));
        }
        Ok(())
    }

    async fn release_sandbox(
        &self,
        namespace: &str,
        name: &str,
        run: &str,
    ) -> Result<Released, BackendError> {
        let mut pods = self
            .pods
            .lock()
            .map_err(|_| BackendError::Other("poisoned".into()))?;
        let Some(pod) = pods.get(&key(namespace, name)) else {
            return Ok(Released::Gone);
        };
        if let Some(why) = release_refusal(pod, run) {
            return Ok(Released::NotHeld(why));
        }
        pods.remove(&key(namespace, name));
        if let Ok(mut d) = self.deleted.lock() {
            d.push(key(namespace, name));
        }
        Ok(Released::Deleted)
    }

    async fn secret_token(
        &self,
        namespace: &str,
        name: &str,
        _stale: Option<&str>,
    ) -> Result<Option<String>, BackendError> {
        Ok(self
            .secrets
            .lock()
            .ok()
            .and_then(|s| s.get(&key(namespace, name)).cloned()))
    }

    async fn write_progress(
        &self,
        namespace: &str,
        run: &str,
        progress: &ProgressSnapshot,
    ) -> Result<(), BackendError> {
        if let Ok(mut p) = self.progress.lock() {
            p.insert(key(namespace, run), progress.clone());
        }
        Ok(())
    }

    async fn create_checkpoint(&self, ckpt: &Checkpoint) -> Result<bool, BackendError> {
        let mut c = self
            .checkpoints
            .lock()
            .map_err(|_| BackendError::Other("poisoned".into()))?;
        let k = key(&ckpt.namespace().unwrap_or_default(), &ckpt.name_any());
        if c.contains_key(&k) {
            return Ok(false);
        }
        c.insert(k, ckpt.clone());
        Ok(true)
    }
}
