//! A serving Pod of a ModelDeployment for a cluster without a kubelet
//! (the gateway benchmark and the end-to-end tests): made the way the
//! controller's are, so the gateway accepts it as an upstream. A Deployment
//! controlled by the ModelDeployment; the cluster's deployment controller
//! makes its ReplicaSet, whose controller makes the Pod; the caller plays
//! the kubelet's part and reports the Pod Ready at a local address.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource as _, ResourceExt as _};
use serde_json::json;

use crate::resources::model_deployment::ModelDeployment;
use crate::serving::workload::MD_LABEL;

/// The label that ties a stand-in Deployment to its Pod.
const STAND_IN_LABEL: &str = "copyhold.dev/stand-in";

/// A Ready Pod of ModelDeployment `md` (in `ns`) whose endpoint is `addr`
/// (`ip:port`), owned through a Deployment named `name`. Returns the Pod's
/// name. Deleting the Deployment `name` takes the Pod away.
pub async fn serving_pod(
    client: &Client,
    ns: &str,
    md: &str,
    name: &str,
    addr: &str,
) -> Result<String> {
    let owner = Api::<ModelDeployment>::namespaced(client.clone(), ns)
        .get(md)
        .await
        .with_context(|| format!("ModelDeployment {ns}/{md}"))?
        .controller_owner_ref(&())
        .context("ModelDeployment without a uid")?;
    pod_of_deployment(client, ns, md, Some(owner), name, addr).await
}

/// A Ready Pod labelled as ModelDeployment `md`'s, at `addr`, made through
/// a Deployment `name` whose controller is `owner` (none: a Deployment
/// anyone allowed to create one could make). Returns the Pod's name.
pub async fn pod_of_deployment(
    client: &Client,
    ns: &str,
    md: &str,
    owner: Option<OwnerReference>,
    name: &str,
    addr: &str,
) -> Result<String> {
    let (ip, port) = addr.rsplit_once(':').context("address without a port")?;
    let port: i32 = port.parse().context("port")?;
    let owners: Vec<OwnerReference> = owner.into_iter().collect();
    let labels = json!({MD_LABEL: md, STAND_IN_LABEL: name});
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "ownerReferences": owners},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {STAND_IN_LABEL: name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    // No scheduler picks this name: the caller plays the kubelet.
                    "schedulerName": "copyhold-stand-in-none",
                    "containers": [{"name": "engine", "image": "stand-in",
                                    "ports": [{"name": "http", "containerPort": port}]}]
                }
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &d)
        .await
        .with_context(|| format!("Deployment {ns}/{name}"))?;
    let pod = made_pod(client, ns, name).await?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(
            &pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True",
                                "lastTransitionTime": jiff::Timestamp::now().to_string()}]
            }})),
        )
        .await
        .with_context(|| format!("Pod {ns}/{pod} status"))?;
    Ok(pod)
}

/// The name of the Pod the ReplicaSet controller made for the stand-in
/// Deployment `name` (a new namespace's default ServiceAccount, which Pods
/// wait for, can take some seconds).
async fn made_pod(client: &Client, ns: &str, name: &str) -> Result<String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{STAND_IN_LABEL}={name}"));
    for _ in 0..240 {
        if let Some(p) = pods.list(&lp).await?.items.first() {
            return Ok(p.name_any());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("no Pod of Deployment {ns}/{name} after 60 s: is kube-controller-manager running?")
}
