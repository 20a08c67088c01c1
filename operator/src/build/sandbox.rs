//! The sandbox pod: the repository image running the sandbox sidecar as its entrypoint.
//!
//! The pod itself is described once, in [`selfplay_crds::sandbox_pod`], because `trainer
//! local` runs the very same pod as Docker containers; here the operator supplies what only
//! it knows: its labels, the owner, the sidecar image and the token Secret.

use k8s_openapi::api::core::v1::Pod;
use selfplay_crds::Environment;
use selfplay_crds::environments::spec_for;
use selfplay_crds::sandbox_pod::{SandboxPodInput, SidecarImage};

use crate::config::OperatorConfig;
use crate::names::{
    LABEL_ENVIRONMENT, LABEL_TEMPLATE_HASH, common_labels, pool_token_secret, sandbox_pod_prefix,
    sandbox_selector_labels,
};
use crate::validate::{ValidPool, template_hash};

/// One sandbox pod of `pool` (named by the API server from `generateName`).
pub fn sandbox_pod(pool: &ValidPool<'_>, cfg: &OperatorConfig) -> Pod {
    pod_of(pool, pool.spec, &pool.template_hash, None, cfg)
}

/// One sandbox pod of `environment` of `pool`: the pool's template with the environment's
/// image, working directory and activation, labelled with the environment.
pub fn environment_sandbox_pod(
    pool: &ValidPool<'_>,
    environment: &Environment,
    cfg: &OperatorConfig,
) -> Pod {
    let spec = spec_for(pool.spec, environment);
    let hash = template_hash(&spec, cfg);
    pod_of(pool, &spec, &hash, Some(&environment.name), cfg)
}

/// The template hash of `environment`'s sandboxes (what their `template-hash` label says).
pub fn environment_template_hash(
    pool: &ValidPool<'_>,
    environment: &Environment,
    cfg: &OperatorConfig,
) -> String {
    template_hash(&spec_for(pool.spec, environment), cfg)
}

fn pod_of(
    pool: &ValidPool<'_>,
    spec: &selfplay_crds::SandboxPoolSpec,
    hash: &str,
    environment: Option<&str>,
    cfg: &OperatorConfig,
) -> Pod {
    let mut labels = common_labels("selfplay-sandbox");
    labels.extend(sandbox_selector_labels(&pool.name));
    labels.insert(LABEL_TEMPLATE_HASH.to_string(), hash.to_string());
    if let Some(env) = environment {
        labels.insert(LABEL_ENVIRONMENT.to_string(), env.to_string());
    }
    selfplay_crds::sandbox_pod::sandbox_pod(&SandboxPodInput {
        pool: &pool.name,
        namespace: &pool.namespace,
        spec,
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
