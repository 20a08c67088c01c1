//! The "apply" step's API calls, shared by the controllers.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::names::MANAGER;

/// Creates a token Secret unless one exists: an existing token is never replaced, since
/// running sandboxes and trainers hold it.
pub async fn ensure_secret(api: &Api<Secret>, secret: &Secret) -> Result<bool, kube::Error> {
    let name = secret.name_any();
    if api.get_opt(&name).await?.is_some() {
        return Ok(false);
    }
    match api.create(&PostParams::default(), secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Server-side apply of a whole object, owned by the operator's field manager.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
}

/// Server-side apply of `status` (a JSON value holding apiVersion, kind and status).
pub async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    body: &serde_json::Value,
) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(body),
    )
    .await
}

/// Deletes an object; already gone is fine. With `resource_version`, only that version is
/// deleted: a conflict (someone changed it, e.g. the broker claimed the sandbox) is reported
/// as `Ok(false)` and the object stays.
pub async fn delete<K>(
    api: &Api<K>,
    name: &str,
    resource_version: Option<String>,
) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        preconditions: resource_version.map(|rv| Preconditions {
            resource_version: Some(rv),
            uid: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(true),
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates an object; already there is fine (names of trainer pods are deterministic).
pub async fn create<K>(api: &Api<K>, obj: &K) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
        Err(e) => Err(e),
    }
}
