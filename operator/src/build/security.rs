//! The restricted security settings every pod the operator creates runs with
//! (Pod Security Standard "restricted"); shared with the sandbox pod's description.

use k8s_openapi::api::core::v1::{PodSecurityContext, SecurityContext};

pub fn pod_security(user: i64) -> PodSecurityContext {
    selfplay_crds::sandbox_pod::restricted_pod_security(user)
}

pub fn container_security() -> SecurityContext {
    selfplay_crds::sandbox_pod::restricted_container_security()
}
