//! Whether the cluster serves copyhold's CustomResourceDefinitions.
//!
//! Without them the API server answers a list of ModelDeployments with a
//! bare `404 page not found` (the path does not exist), which says nothing
//! about what to do. The controller and `copyhold bench controller` check
//! first and say plainly which CRD is missing and how to install it.

use kube::Client;
use kube::api::{Api, DynamicObject, ListParams};
use kube::discovery::ApiResource;

use crate::resources::{EnergyBudget, ModelDeployment, StintQuota};

/// How to install the CRDs, for the error.
pub const HOW_TO_INSTALL: &str = "install copyhold's CRDs first: `kubectl apply --server-side -f crds/` from a copy of the copyhold repository (`make crds` regenerates that folder from the code), or `copyhold crdgen | kubectl apply --server-side -f -`; the Helm chart (charts/copyhold) installs them too";

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error(
        "the CustomResourceDefinition {plural}.{group} is not installed in this cluster (the API server has no {group}/{version} {plural}): {HOW_TO_INSTALL}"
    )]
    Missing {
        group: String,
        version: String,
        plural: String,
    },
    #[error("checking that {plural}.{group} is served: {source}")]
    Kube {
        plural: String,
        group: String,
        #[source]
        source: kube::Error,
    },
}

/// A failed list of `resource`, as a [`CrdError`]: a 404 means the
/// resource is not served at all (a namespaced list in a namespace that
/// does not exist answers an empty list, not 404), so its CRD is missing.
pub fn classify(resource: &ApiResource, err: kube::Error) -> CrdError {
    match err {
        kube::Error::Api(status) if status.code == 404 => CrdError::Missing {
            group: resource.group.clone(),
            version: resource.version.clone(),
            plural: resource.plural.clone(),
        },
        source => CrdError::Kube {
            plural: resource.plural.clone(),
            group: resource.group.clone(),
            source,
        },
    }
}

/// Check that the cluster serves `resource`: one list of at most one
/// object, in `namespace` when given (what a namespaced install may read).
pub async fn require_served_in(
    client: &Client,
    resource: &ApiResource,
    namespace: Option<&str>,
) -> Result<(), CrdError> {
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    api.list_metadata(&ListParams::default().limit(1))
        .await
        .map(drop)
        .map_err(|e| classify(resource, e))
}

/// [`require_served_in`] across all namespaces.
pub async fn require_served(client: &Client, resource: &ApiResource) -> Result<(), CrdError> {
    require_served_in(client, resource, None).await
}

/// Check copyhold's three CRDs; ModelDeployments and StintQuotas in
/// `namespace` when the caller watches one, EnergyBudgets (cluster-scoped)
/// everywhere.
pub async fn require_installed(client: &Client, namespace: Option<&str>) -> Result<(), CrdError> {
    require_served_in(
        client,
        &ApiResource::erase::<ModelDeployment>(&()),
        namespace,
    )
    .await?;
    require_served_in(client, &ApiResource::erase::<StintQuota>(&()), namespace).await?;
    require_served(client, &ApiResource::erase::<EnergyBudget>(&())).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn model_deployments() -> ApiResource {
        ApiResource::erase::<ModelDeployment>(&())
    }

    #[test]
    fn a_404_on_the_list_says_the_crd_is_missing_and_how_to_install_it() {
        // What kube makes of the API server's plain-text answer.
        let raw =
            Status::failure("404 page not found", "Failed to parse error data").with_code(404);
        let err = classify(&model_deployments(), kube::Error::Api(raw.boxed()));
        assert!(matches!(err, CrdError::Missing { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("modeldeployments.copyhold.dev is not installed"),
            "{text}"
        );
        assert!(
            text.contains("kubectl apply --server-side -f crds/"),
            "{text}"
        );
        assert!(text.contains("make crds"), "{text}");
        assert!(!text.contains("page not found"), "{text}");
    }

    #[test]
    fn other_failures_stay_what_they_are() {
        let forbidden =
            Status::failure("modeldeployments is forbidden", "Forbidden").with_code(403);
        let err = classify(&model_deployments(), kube::Error::Api(forbidden.boxed()));
        assert!(matches!(err, CrdError::Kube { .. }), "{err:?}");
        assert!(err.to_string().contains("forbidden"), "{err}");
    }
}
