//! The simulated fleet of reused GPUs: Nodes carry GPU Feature Discovery's
//! labels and `nvidia.com/gpu` capacity, and the real scheduler binds Pods
//! that ask for GPUs to them.

use std::time::Duration;

use anyhow::{Result, bail};
use copyhold_e2e::{TestNamespace, eventually};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

#[tokio::test]
async fn the_fleet_has_gfd_labels_gpu_capacity_and_no_taints() -> Result<()> {
    let client = copyhold_e2e::client().await?;
    let nodes: Api<Node> = Api::all(client);
    let expected = [
        ("gpu-p100", "Tesla-P100-PCIE-16GB", "2", "6", "0"),
        ("gpu-p40", "Tesla-P40", "1", "6", "1"),
        ("gpu-v100", "Tesla-V100-SXM2-32GB", "4", "7", "0"),
        ("gpu-t4", "Tesla-T4", "1", "7", "5"),
        ("gpu-p4", "Tesla-P4", "1", "6", "1"),
    ];
    for (name, product, count, major, minor) in expected {
        let n = nodes.get(name).await?;
        let labels = n.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("nvidia.com/gpu.product").map(String::as_str),
            Some(product),
            "{name}"
        );
        assert_eq!(
            labels.get("nvidia.com/gpu.count").map(String::as_str),
            Some(count),
            "{name}"
        );
        assert_eq!(
            labels
                .get("nvidia.com/gpu.compute.major")
                .map(String::as_str),
            Some(major),
            "{name}"
        );
        assert_eq!(
            labels
                .get("nvidia.com/gpu.compute.minor")
                .map(String::as_str),
            Some(minor),
            "{name}"
        );
        assert!(labels.contains_key("nvidia.com/gpu.memory"), "{name}");
        let status = n.status.clone().unwrap_or_default();
        let gpus = status
            .allocatable
            .unwrap_or_default()
            .get("nvidia.com/gpu")
            .map(|q| q.0.clone());
        assert_eq!(gpus.as_deref(), Some(count), "{name} allocatable GPUs");
        let ready = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(ready, "{name} is Ready");
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        assert!(taints.is_empty(), "{name} still tainted: {taints:?}");
    }
    let cpu = nodes.get("cpu-only").await?;
    assert!(
        !cpu.status
            .unwrap_or_default()
            .capacity
            .unwrap_or_default()
            .contains_key("nvidia.com/gpu")
    );
    Ok(())
}

fn gpu_pod(name: &str, gpus: u32, product: Option<&str>) -> Result<Pod> {
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "copyhold/none:0",
            "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}
    });
    if let Some(p) = product {
        pod["spec"]["nodeSelector"] = serde_json::json!({"nvidia.com/gpu.product": p});
    }
    Ok(serde_json::from_value(pod)?)
}

async fn bound_node(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(Duration::from_secs(60), || async {
        let p = pods.get(name).await?;
        match p.spec.and_then(|s| s.node_name) {
            Some(n) => Ok(n),
            None => bail!("{name} not yet bound"),
        }
    })
    .await
}

#[tokio::test]
async fn the_real_scheduler_binds_gpu_pods_to_simulated_nodes() -> Result<()> {
    let _fleet = copyhold_e2e::FleetLock::acquire()?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("fleet")?;
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    // The pods' ServiceAccount must exist before admission lets pods in.
    eventually(Duration::from_secs(30), || async {
        copyhold_e2e::kubectl_ok(&["get", "serviceaccount", "default", "-n", &ns.name]).map(|_| ())
    })
    .await?;
    pods.create(
        &PostParams::default(),
        &gpu_pod("on-t4", 1, Some("Tesla-T4"))?,
    )
    .await?;
    pods.create(&PostParams::default(), &gpu_pod("three-gpus", 3, None)?)
        .await?;
    assert_eq!(bound_node(&pods, "on-t4").await?, "gpu-t4");
    // Only the V100 node has three GPUs free.
    assert_eq!(bound_node(&pods, "three-gpus").await?, "gpu-v100");
    Ok(())
}
