//! The per-pool NetworkPolicy: sandboxes reach nothing, and only the trainer pods of the
//! runs that use the pool reach them, on the sidecar port.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::names::{
    COMPONENT_TRAINER, LABEL_COMPONENT, LABEL_POOL, LABEL_RUN, common_labels, pool_network_policy,
    sandbox_selector_labels,
};
use crate::validate::ValidPool;

/// `runs`: names of the runs in the pool's namespace whose `spec.pools` names this pool.
/// With none, no ingress is allowed at all.
pub fn sandbox_network_policy(pool: &ValidPool<'_>, runs: &[String]) -> NetworkPolicy {
    let mut runs: Vec<String> = runs.to_vec();
    runs.sort();
    runs.dedup();
    let ingress = if runs.is_empty() {
        Vec::new()
    } else {
        vec![NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        LABEL_COMPONENT.to_string(),
                        COMPONENT_TRAINER.to_string(),
                    )])),
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: LABEL_RUN.to_string(),
                        operator: "In".to_string(),
                        values: Some(runs),
                    }]),
                }),
                ..Default::default()
            }]),
            ports: Some(vec![NetworkPolicyPort {
                protocol: Some("TCP".to_string()),
                port: Some(IntOrString::Int(pool.spec.sidecar_port)),
                end_port: None,
            }]),
        }]
    };
    let mut labels = common_labels("selfplay-sandbox");
    labels.insert(LABEL_COMPONENT.into(), "sandbox-policy".into());
    labels.insert(LABEL_POOL.into(), pool.name.clone());
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(pool_network_policy(&pool.name)),
            namespace: Some(pool.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![pool.owner.clone()]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(sandbox_selector_labels(&pool.name)),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".to_string(), "Egress".to_string()]),
            ingress: Some(ingress),
            egress: Some(Vec::new()),
        }),
    }
}
