//! The token Secrets: one per pool (the sandbox sidecars' token, handed to trainers by the
//! broker) and one per run (the trainer's credential for the broker).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use rand::RngCore;

use crate::names::{
    LABEL_COMPONENT, LABEL_POOL, LABEL_RUN, TOKEN_KEY, common_labels,
    pool_token_secret as pool_secret_name, run_token_secret as run_secret_name,
};

/// 32 random bytes, hex: a fresh token. Only ever generated when a Secret is first created.
pub fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn token_secret(
    name: String,
    namespace: &str,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
    token: &str,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), token.to_string())])),
        immutable: Some(true),
        ..Default::default()
    }
}

pub fn pool_token_secret(
    pool: &str,
    namespace: &str,
    owner: &OwnerReference,
    token: &str,
) -> Secret {
    let mut labels = common_labels("selfplay-sandbox");
    labels.insert(LABEL_COMPONENT.into(), "pool-token".into());
    labels.insert(LABEL_POOL.into(), pool.into());
    token_secret(pool_secret_name(pool), namespace, labels, owner, token)
}

pub fn run_token_secret(run: &str, namespace: &str, owner: &OwnerReference, token: &str) -> Secret {
    let mut labels = common_labels("selfplay-trainer");
    labels.insert(LABEL_COMPONENT.into(), "run-token".into());
    labels.insert(LABEL_RUN.into(), run.into());
    token_secret(run_secret_name(run), namespace, labels, owner, token)
}
