//! The sandbox pod: the repository image running the sandbox sidecar as its entrypoint.
//!
//! The pod itself is described once, in [`selfplay_crds::sandbox_pod`], because `trainer
//! local` runs the very same pod as Docker containers; here the operator supplies what only
//! it knows: its labels, the owner, the sidecar image and the token Secret.

use k8s_openapi::api::core::v1::Pod;
use selfplay_crds::sandbox_pod::{SandboxPodInput, SidecarImage};

use crate::config::OperatorConfig;
use crate::names::{
    LABEL_TEMPLATE_HASH, common_labels, pool_token_secret, sandbox_pod_prefix,
    sandbox_selector_labels,
};
use crate::validate::ValidPool;

/// One sandbox pod of `pool` (named by the API server from `generateName`).
pub fn sandbox_pod(pool: &ValidPool<'_>, cfg: &OperatorConfig) -> Pod {
    let mut labels = common_labels("selfplay-sandbox");
    labels.extend(sandbox_selector_labels(&pool.name));
    labels.insert(LABEL_TEMPLATE_HASH.to_string(), pool.template_hash.clone());
    selfplay_crds::sandbox_pod::sandbox_pod(&SandboxPodInput {
        pool: &pool.name,
        namespace: &pool.namespace,
        spec: pool.spec,
        resources: pool.resources.clone(),
        labels,
        owner: Some(pool.owner.clone()),
        sidecar: SidecarImage {
            image: cfg.sidecar_image.clone(),
            binary_path: cfg.sidecar_binary_path.clone(),
            pull_policy: cfg.image_pull_policy.clone(),
        },
        token_secret: pool_token_secret(&pool.name),
        generate_name: sandbox_pod_prefix(&pool.name),
    })
}
