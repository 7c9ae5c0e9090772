//! The models in use, written where the fetchers can read them.
//!
//! A fetch init container evicts least-recently-used models from the node
//! cache when it is over `--model-cache-max-bytes`, but it has no API
//! credentials to ask which models some ModelDeployment still serves. So the
//! controller keeps a ConfigMap ([`model_cache::IN_USE_CONFIGMAP`]) in every
//! namespace that has a fetched model, naming every fetched model of every
//! ModelDeployment it watches, and the fetch container mounts it. The list
//! is what the controller's ModelDeployment store shows; it is written only
//! once that store has listed everything (an empty list from a cold store
//! would let a fetch evict models in use).

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client};

use super::FIELD_MANAGER;
use crate::metrics::ControllerMetrics;
use crate::resources::ModelDeployment;
use crate::serving::model_cache::{self, IN_USE_CONFIGMAP, IN_USE_KEY};

/// How often the list is compared with what was written.
const PERIOD: Duration = Duration::from_secs(3);
/// Every this many periods everything is written again, in case a
/// ConfigMap was deleted or edited by hand.
const REFRESH_EVERY: u32 = 40;

/// Keeps the in-use ConfigMaps current while this controller leads.
pub async fn publish(client: Client, mds: Store<ModelDeployment>, metrics: &ControllerMetrics) {
    if mds.wait_until_ready().await.is_err() {
        return;
    }
    let mut written: HashMap<String, String> = HashMap::new();
    for round in 0u32.. {
        if round % REFRESH_EVERY == 0 {
            written.clear();
        }
        let state = mds.state();
        let want = model_cache::in_use_by_namespace(state.iter().map(|m| m.as_ref()));
        for (ns, text) in want {
            if written.get(&ns) == Some(&text) {
                continue;
            }
            match write(&client, &ns, &text).await {
                Ok(()) => {
                    metrics
                        .api_writes
                        .get_or_create(&ControllerMetrics::kind("ConfigMap"))
                        .inc();
                    written.insert(ns, text);
                }
                Err(e) => tracing::warn!(namespace = %ns, error = %e, "writing the models in use"),
            }
        }
        tokio::time::sleep(PERIOD).await;
    }
}

/// Server-side applies the ConfigMap of `ns`.
async fn write(client: &Client, ns: &str, text: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(IN_USE_CONFIGMAP.into()),
            namespace: Some(ns.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    "copyhold".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some([(IN_USE_KEY.to_string(), text.to_string())].into()),
        ..Default::default()
    };
    api.patch(
        IN_USE_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(drop)
}
