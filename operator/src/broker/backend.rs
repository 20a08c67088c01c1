//! What the broker needs from the API server, behind a trait so that its claim logic can be
//! tested with many concurrent callers against an in-memory store with the same
//! optimistic-lock semantics ([`crate::broker::memory`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use selfplay_crds::{Checkpoint, ProgressSnapshot};

use crate::names::{
    ANNOTATION_CLAIM, ANNOTATION_CLAIM_RUN_UID, BROKER_MANAGER, COMPONENT_SANDBOX,
    LABEL_CLAIM_ATTEMPT, LABEL_CLAIMED_BY, LABEL_COMPONENT, TOKEN_KEY,
};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// The outcome of a conditional claim.
#[derive(Debug, Clone)]
pub enum ClaimOutcome {
    /// The pod is ours; the claimed pod as the API server returned it.
    Claimed(Box<Pod>),
    /// The pod changed since it was read (someone else claimed it, or it was deleted).
    Lost,
}

/// Who claims a sandbox, written on the pod.
#[derive(Debug, Clone)]
pub struct Claim {
    pub run_namespace: String,
    pub run_name: String,
    pub run_uid: Option<String>,
    /// The run's current trainer attempt: a later attempt does not inherit the claim.
    pub attempt: i32,
    pub at: k8s_openapi::jiff::Timestamp,
}

pub trait Backend: Send + Sync + 'static {
    /// Marks `pod` as claimed, on condition that it is still at the resourceVersion it was read at.
    fn claim(
        &self,
        pod: &Pod,
        claim: &Claim,
    ) -> impl Future<Output = Result<ClaimOutcome, BackendError>> + Send;
    /// Creates a sandbox pod (already claimed, for a cold start); returns it as created.
    fn create_sandbox(&self, pod: &Pod) -> impl Future<Output = Result<Pod, BackendError>> + Send;
    /// Deletes a sandbox started on demand that never became usable.
    fn delete_sandbox(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Deletes a sandbox that `run` gives back, read fresh from the API server: only a
    /// sandbox pod claimed by that run, and only the very pod checked (UID and
    /// resourceVersion preconditions). Gone already is fine.
    fn release_sandbox(
        &self,
        namespace: &str,
        name: &str,
        run: &str,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send;
    /// The `token` key of a Secret, `None` when the Secret does not exist. `stale` is a
    /// token the caller found wrong (a run recreated under the same name has a new one):
    /// the backend reads the Secret again rather than answer from its cache.
    fn secret_token(
        &self,
        namespace: &str,
        name: &str,
        stale: Option<&str>,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;
    /// Writes a run's `status.progress`.
    fn write_progress(
        &self,
        namespace: &str,
        run: &str,
        progress: &ProgressSnapshot,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Creates a Checkpoint; `Ok(false)` when one of that name exists already.
    fn create_checkpoint(
        &self,
        ckpt: &Checkpoint,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
}

/// The body of the claim patch: a JSON merge patch that carries the resourceVersion the pod
/// was read at. The API server applies it only if the pod is still at that version and
/// answers 409 Conflict otherwise, so of two brokers racing for one pod exactly one wins.
pub fn claim_patch(pod: &Pod, claim: &Claim) -> Result<serde_json::Value, BackendError> {
    let rv = pod.resource_version().ok_or_else(|| {
        BackendError::Other(format!("pod {} has no resourceVersion", pod.name_any()))
    })?;
    Ok(serde_json::json!({
        "metadata": {
            "resourceVersion": rv,
            "labels": {
                LABEL_CLAIMED_BY: claim.run_name,
                LABEL_CLAIM_ATTEMPT: claim.attempt.to_string(),
            },
            "annotations": {
                ANNOTATION_CLAIM: format!("{}/{} at {}", claim.run_namespace, claim.run_name, claim.at),
                ANNOTATION_CLAIM_RUN_UID: claim.run_uid,
            },
        }
    }))
}

/// Puts the claim's labels and annotations (those of [`claim_patch`]) on a pod about to be
/// created: a sandbox started for one caller is claimed from its creation, so no other
/// acquire can take it and the pool never counts it as warm.
pub fn claim_at_creation(pod: &mut Pod, claim: &Claim) {
    let labels = pod.labels_mut();
    labels.insert(LABEL_CLAIMED_BY.to_string(), claim.run_name.clone());
    labels.insert(LABEL_CLAIM_ATTEMPT.to_string(), claim.attempt.to_string());
    let annotations = pod.annotations_mut();
    annotations.insert(
        ANNOTATION_CLAIM.to_string(),
        format!("{}/{} at {}", claim.run_namespace, claim.run_name, claim.at),
    );
    if let Some(uid) = &claim.run_uid {
        annotations.insert(ANNOTATION_CLAIM_RUN_UID.to_string(), uid.clone());
    }
}

/// What became of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    Deleted,
    /// No such pod (released twice, or expired meanwhile).
    Gone,
    /// Not a sandbox this run holds: nothing was deleted.
    NotHeld(String),
}

/// Why `run` may not delete `pod`, if it may not: trainers name the sandbox to release, and
/// the operator's permissions must not delete any other pod on their word.
pub fn release_refusal(pod: &Pod, run: &str) -> Option<String> {
    let labels = pod.labels();
    if labels.get(LABEL_COMPONENT).map(String::as_str) != Some(COMPONENT_SANDBOX) {
        return Some(format!("{} is not a sandbox", pod.name_any()));
    }
    if labels.get(LABEL_CLAIMED_BY).map(String::as_str) != Some(run) {
        return Some(format!(
            "sandbox {} is not held by this run",
            pod.name_any()
        ));
    }
    None
}

/// A token as last read, and when.
type CachedToken = (Option<String>, Instant);

/// The backend on the real API server.
pub struct KubeBackend {
    client: Client,
    /// Token Secrets by (namespace, name). A run or pool deleted and recreated under the same
    /// name gets a new token, so found tokens are re-read after `token_max_age`, and at once
    /// (rate-limited by `TOKEN_MIN_REREAD`, so a wrong token cannot make the broker hammer
    /// the API server) when a caller presents another one.
    tokens: Mutex<HashMap<(String, String), CachedToken>>,
    token_max_age: Duration,
}

const TOKEN_MIN_REREAD: Duration = Duration::from_secs(1);
const TOKEN_MAX_AGE: Duration = Duration::from_secs(30);
/// Deleting a pod that changes under us (status updates) is retried this often.
const RELEASE_TRIES: usize = 3;

impl KubeBackend {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            tokens: Mutex::new(HashMap::new()),
            token_max_age: TOKEN_MAX_AGE,
        }
    }

    /// How long a found token is trusted without reading its Secret again.
    pub fn with_token_max_age(mut self, age: Duration) -> Self {
        self.token_max_age = age;
        self
    }
}

impl Backend for KubeBackend {
    async fn claim(&self, pod: &Pod, claim: &Claim) -> Result<ClaimOutcome, BackendError> {
        let ns = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let patch = claim_patch(pod, claim)?;
        match api
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(p) => Ok(ClaimOutcome::Claimed(Box::new(p))),
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => {
                Ok(ClaimOutcome::Lost)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn create_sandbox(&self, pod: &Pod) -> Result<Pod, BackendError> {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        Ok(api.create(&PostParams::default(), pod).await?)
    }

    async fn delete_sandbox(&self, namespace: &str, name: &str) -> Result<(), BackendError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn release_sandbox(
        &self,
        namespace: &str,
        name: &str,
        run: &str,
    ) -> Result<Released, BackendError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        for _ in 0..RELEASE_TRIES {
            let Some(pod) = api.get_opt(name).await? else {
                return Ok(Released::Gone);
            };
            if let Some(why) = release_refusal(&pod, run) {
                return Ok(Released::NotHeld(why));
            }
            // The pod's own grace period: the sidecar stops its processes cleanly, and a
            // force delete (grace 0) would free the name before the kubelet has killed them.
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod.uid(),
                    resource_version: pod.resource_version(),
                }),
                ..Default::default()
            };
            match api.delete(name, &dp).await {
                Ok(_) => return Ok(Released::Deleted),
                Err(kube::Error::Api(s)) if s.is_not_found() => return Ok(Released::Gone),
                // Changed since read (a status update, a new pod of that name): check again.
                Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BackendError::Other(format!(
            "sandbox {name} kept changing; not released"
        )))
    }

    async fn secret_token(
        &self,
        namespace: &str,
        name: &str,
        stale: Option<&str>,
    ) -> Result<Option<String>, BackendError> {
        let key = (namespace.to_string(), name.to_string());
        if let Ok(cache) = self.tokens.lock()
            && let Some((tok, at)) = cache.get(&key)
        {
            let age = at.elapsed();
            let trusted = match (tok, stale) {
                _ if age < TOKEN_MIN_REREAD => true,
                (Some(t), Some(s)) if t == s => false,
                (Some(_), _) => age < self.token_max_age,
                (None, _) => false,
            };
            if trusted {
                return Ok(tok.clone());
            }
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let tok = api.get_opt(name).await?.and_then(|s| {
            let bytes = s.data.as_ref()?.get(TOKEN_KEY)?.0.clone();
            String::from_utf8(bytes).ok()
        });
        if let Ok(mut cache) = self.tokens.lock() {
            cache.insert(key, (tok.clone(), Instant::now()));
        }
        Ok(tok)
    }

    async fn write_progress(
        &self,
        namespace: &str,
        run: &str,
        progress: &ProgressSnapshot,
    ) -> Result<(), BackendError> {
        let api: Api<selfplay_crds::SelfPlayRun> = Api::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({
            "apiVersion": selfplay_crds::API_VERSION,
            "kind": "SelfPlayRun",
            "status": { "progress": progress },
        });
        api.patch_status(
            run,
            &PatchParams::apply(BROKER_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        Ok(())
    }

    async fn create_checkpoint(&self, ckpt: &Checkpoint) -> Result<bool, BackendError> {
        let api: Api<Checkpoint> =
            Api::namespaced(self.client.clone(), &ckpt.namespace().unwrap_or_default());
        match api.create(&PostParams::default(), ckpt).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
