//! Sizing against the fleet on the real control plane (issue 19, item 8):
//! the controller as a real process, Nodes of the test's own created on
//! the API server (no kubelet: the placement decision is what is checked).
//!
//! - A node with a taint the serving Pods do not tolerate is no placement
//!   target.
//! - Two replicas on the slices of one time-sliced card must fit its memory
//!   together.

use std::time::Duration;

use anyhow::{Result, bail};
use copyhold::resources::{ModelDeployment, ModelDeploymentStatus};
use copyhold_e2e::{ChildGuard, FleetLock, TestNamespace, eventually, install_crds};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// The label that keeps this test's models on this test's nodes.
const SCENE_LABEL: &str = "copyhold.dev/e2e-scene";
/// An unknown product: ranked after every known card, so no other test's
/// model prefers these nodes while they exist.
const PRODUCT: &str = "Copyhold-E2E-Sizing-16GB";

/// Nodes created for one test, deleted when dropped.
struct Nodes {
    api: Api<Node>,
    names: Vec<String>,
}

impl Nodes {
    /// A Ready node `name` with `gpus` allocatable GPUs of 16 GiB, the
    /// scene's labels plus `labels`, and exactly `taints`.
    async fn add(&mut self, name: &str, gpus: u32, labels: Value, taints: Value) -> Result<()> {
        let mut l = json!({
            // No `nvidia.com/gpu.present`: EnergyBudgets of other tests
            // that cover every GPU node leave these out.
            "kubernetes.io/hostname": name,
            "nvidia.com/gpu.product": PRODUCT,
            "nvidia.com/gpu.memory": "16384",
            "nvidia.com/gpu.count": "1",
            "nvidia.com/gpu.compute.major": "7",
            "nvidia.com/gpu.compute.minor": "5",
        });
        if let (Some(l), Some(extra)) = (l.as_object_mut(), labels.as_object()) {
            l.extend(extra.clone());
        }
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": l}}))?;
        self.api.create(&PostParams::default(), &node).await?;
        self.names.push(name.to_string());
        let gpus = gpus.to_string();
        let status = json!({"status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": gpus},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": gpus},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "copyhold e2e sizing"}],
        }});
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        // Replaces the not-ready taint admission put on the new Node.
        self.api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": taints}})),
            )
            .await?;
        Ok(())
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = copyhold_e2e::kubectl(&["delete", "node", n, "--wait=false"]);
        }
    }
}

/// The test's namespace, its controller and its nodes.
struct Scene {
    ns: TestNamespace,
    client: kube::Client,
    nodes: Nodes,
    _controller: ChildGuard,
    _fleet: FleetLock,
}

impl Scene {
    async fn new(prefix: &str) -> Result<Scene> {
        let fleet = FleetLock::acquire()?;
        install_crds().await?;
        let ns = TestNamespace::create(prefix)?;
        let client = copyhold_e2e::client().await?;
        let controller =
            copyhold_e2e::start_controller(&ns.name, &["--budget-selector", "copyhold-test=none"])?;
        Ok(Scene {
            nodes: Nodes {
                api: Api::all(client.clone()),
                names: Vec::new(),
            },
            ns,
            client,
            _controller: controller,
            _fleet: fleet,
        })
    }

    /// A node name unique to this scene.
    fn node_name(&self, role: &str) -> String {
        format!("{}-{role}", self.ns.name)
    }

    /// `replicas` replicas of a model of `weights` (inline sizing, 256
    /// tokens of 1 KiB of KV) kept to the scene's nodes of `role`, one GPU
    /// per replica.
    async fn model(&self, name: &str, replicas: i32, weights: &str, role: &str) -> Result<()> {
        let md = json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/none"}},
                          "sizing": {"weightBytes": weights, "kvBytesPerToken": 1024}},
                "replicas": replicas,
                "placement": {"maxGpusPerReplica": 1,
                              "nodeSelector": {SCENE_LABEL: format!("{}-{role}", self.ns.name)}},
                "serving": {"contextLength": 256, "maxConcurrentSequences": 1},
            }
        });
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        api.patch(
            name,
            &PatchParams::apply("copyhold-e2e").force(),
            &Patch::Apply(&md),
        )
        .await?;
        Ok(())
    }

    /// `name`'s status once its `Placed` condition is set.
    async fn placed(&self, name: &str) -> Result<ModelDeploymentStatus> {
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        eventually(Duration::from_secs(60), || async {
            let st = api.get(name).await?.status.unwrap_or_default();
            if placed(&st).is_some() {
                Ok(st)
            } else {
                bail!("waiting for the Placed condition of {name}: {st:?}")
            }
        })
        .await
    }

    async fn cleanup(self) -> Result<()> {
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        for md in api.list(&Default::default()).await?.items {
            if let Some(n) = md.metadata.name {
                let _ = api.delete(&n, &DeleteParams::default()).await;
            }
        }
        Ok(())
    }
}

/// The `Placed` condition: status, reason, message.
fn placed(st: &ModelDeploymentStatus) -> Option<(String, String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == "Placed")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_node_with_a_taint_the_pods_do_not_tolerate_is_no_placement_target() -> Result<()> {
    let mut s = Scene::new("taint").await?;
    let (tainted, gpu_tainted) = (s.node_name("tainted"), s.node_name("gpu-tainted"));
    let (ns, scene) = (s.ns.name.clone(), SCENE_LABEL);
    s.nodes
        .add(
            &tainted,
            1,
            json!({scene: format!("{ns}-tainted")}),
            json!([{"key": "copyhold.dev/dedicated", "value": "other", "effect": "NoSchedule"}]),
        )
        .await?;
    // The taint GPU nodes commonly carry, which the serving Pods tolerate.
    s.nodes
        .add(
            &gpu_tainted,
            1,
            json!({scene: format!("{ns}-gpu-tainted")}),
            json!([{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]),
        )
        .await?;
    s.model("kept-off", 1, "1Gi", "tainted").await?;
    s.model("welcome", 1, "1Gi", "gpu-tainted").await?;
    let off = s.placed("kept-off").await?;
    let (status, reason, message) = placed(&off).unwrap_or_default();
    assert_eq!(
        status, "False",
        "{reason}: {message}; nodes {:?}",
        off.nodes
    );
    assert!(!off.nodes.contains(&tainted), "{:?}", off.nodes);
    let on = s.placed("welcome").await?;
    let (status, reason, message) = placed(&on).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert_eq!(on.nodes, vec![gpu_tainted]);
    s.cleanup().await
}

#[tokio::test]
async fn two_replicas_on_the_slices_of_one_card_must_fit_its_memory_together() -> Result<()> {
    let mut s = Scene::new("slices").await?;
    let sliced = s.node_name("sliced");
    let ns = s.ns.name.clone();
    // One 16 GiB card time-sliced as 2 GPUs (14.4 GiB usable at 0.9).
    s.nodes
        .add(
            &sliced,
            2,
            json!({SCENE_LABEL: format!("{ns}-sliced"), "nvidia.com/gpu.replicas": "2"}),
            json!(null),
        )
        .await?;
    // 9 GiB of weights: about 9.95 GiB a replica. One fits the card; two
    // (19.9 GiB) do not.
    s.model("big-pair", 2, "9Gi", "sliced").await?;
    let big = s.placed("big-pair").await?;
    let (status, reason, message) = placed(&big).unwrap_or_default();
    assert_eq!(
        status, "False",
        "{reason}: {message}; nodes {:?}",
        big.nodes
    );
    // 3 GiB of weights: about 3.65 GiB a replica; two fit together.
    s.model("small-pair", 2, "3Gi", "sliced").await?;
    let small = s.placed("small-pair").await?;
    let (status, reason, message) = placed(&small).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert_eq!(small.nodes, vec![sliced]);
    s.cleanup().await
}
