//! What the controller does with a model that already runs, on the real
//! control plane: the controller and the kubelet stand-in as real
//! processes, the real scheduler binding the serving Pods to the simulated
//! GPU nodes of `e2e/nodes.yaml` (the Pods run the upstream stand-in).
//!
//! - An EnergyBudget's shedding reaches the Deployment even when the model
//!   can no longer be placed (issue 19, item 2).
//! - A running model stays on its card when a better one frees up, and
//!   moves when its owner asks (issue 19, item 7).

use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use copyhold::resources::{ModelDeployment, ModelDeploymentStatus};
use copyhold_e2e::{ChildGuard, FleetLock, KubeletGuard, TestNamespace, eventually, install_crds};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// The image the kubelet stand-in runs as the upstream stand-in.
const STANDIN_IMAGE: &str = "copyhold-standin";

/// A namespace with the controller (resync every 2 s) and the kubelet
/// stand-in, and the simulated fleet to itself.
struct Scene {
    ns: TestNamespace,
    client: kube::Client,
    _processes: (KubeletGuard, ChildGuard),
    _fleet: FleetLock,
}

impl Scene {
    async fn new(prefix: &str, ip_prefix: &str) -> Result<Scene> {
        let fleet = FleetLock::acquire()?;
        install_crds().await?;
        let ns = TestNamespace::create(prefix)?;
        let client = copyhold_e2e::client().await?;
        let kubelet = copyhold_e2e::start_kubelet_for(
            std::path::Path::new(env!("CARGO_BIN_EXE_copyhold-kubelet")),
            &[&ns.name],
            ip_prefix,
            &[(
                STANDIN_IMAGE,
                std::path::Path::new(env!("CARGO_BIN_EXE_copyhold-upstream-standin")),
            )],
            &ns.name,
        )?;
        let controller =
            copyhold_e2e::start_controller(&ns.name, &["--budget-selector", "copyhold-test=none"])?;
        Ok(Scene {
            ns,
            client,
            _processes: (kubelet, controller),
            _fleet: fleet,
        })
    }

    /// A small ModelDeployment `name` (fits every card) run by the
    /// upstream stand-in; `placement` is its `spec.placement`.
    async fn model(&self, name: &str, replicas: i32, placement: Value) -> Result<()> {
        let md = json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/none"}},
                          "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
                "engine": {"image": format!("{STANDIN_IMAGE}:test")},
                "replicas": replicas,
                "placement": placement,
                "serving": {"contextLength": 256},
            }
        });
        self.mds()
            .patch(
                name,
                &PatchParams::apply("copyhold-e2e").force(),
                &Patch::Apply(&md),
            )
            .await?;
        Ok(())
    }

    fn mds(&self) -> Api<ModelDeployment> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Wait until `name`'s status satisfies `ok`; the status then.
    async fn status_until(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&ModelDeploymentStatus) -> bool,
    ) -> Result<ModelDeploymentStatus> {
        let mds = self.mds();
        eventually(timeout, || async {
            let st = mds.get(name).await?.status.unwrap_or_default();
            if ok(&st) {
                Ok(st)
            } else {
                bail!("waiting for {what}: {st:?}")
            }
        })
        .await
    }

    /// Nodes of `name`'s Pods that are not being deleted.
    async fn pod_nodes(&self, name: &str) -> Result<Vec<String>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns.name);
        let list = pods
            .list(&ListParams::default().labels(&format!("copyhold.dev/model-deployment={name}")))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.spec?.node_name)
            .collect())
    }
}

/// A condition of `st`: status, reason, message.
fn condition(st: &ModelDeploymentStatus, type_: &str) -> Option<(String, String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The GPU products the Deployment's Pods are required to run on.
fn required_products(d: &Deployment) -> Vec<String> {
    let terms = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == "nvidia.com/gpu.product")
        .flat_map(|e| e.values.clone().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shed_reaches_the_deployment_even_when_the_model_can_no_longer_be_placed() -> Result<()> {
    let s = Scene::new("kept-shed", "127.0.121").await?;
    s.model("shed", 2, json!({})).await?;
    s.status_until("shed", Duration::from_secs(60), "two ready", |st| {
        st.ready_replicas == 2
    })
    .await?;

    // Its owner asks for a card the fleet does not have: placement fails,
    // and the running Deployment is kept.
    s.mds()
        .patch(
            "shed",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"placement": {"gpuProducts": ["Tesla-H100-no-such-card"]}}}),
            ),
        )
        .await?;
    s.status_until("shed", Duration::from_secs(30), "Placed=False", |st| {
        condition(st, "Placed").is_some_and(|c| c.0 == "False")
    })
    .await?;
    ensure!(
        s.deployments()
            .get("shed")
            .await?
            .spec
            .and_then(|d| d.replicas)
            == Some(2),
        "the kept Deployment was scaled before any shedding"
    );

    // An EnergyBudget sheds it to one replica, as the energy controller
    // writes it (its own field manager, server-side apply).
    s.mds()
        .patch(
            "shed",
            &PatchParams::apply(copyhold::controller::energy_budget::SHED_FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "shed", "namespace": s.ns.name, "annotations": {
                    "copyhold.dev/shed-to": "1", "copyhold.dev/shed-by": "solar-test"}}
            })),
        )
        .await?;
    let deployments = s.deployments();
    let scaled = eventually(Duration::from_secs(20), || async {
        let r = deployments.get("shed").await?.spec.and_then(|d| d.replicas);
        ensure!(r == Some(1), "the Deployment still runs {r:?} replicas");
        Ok(())
    })
    .await;
    let st = s
        .status_until("shed", Duration::from_secs(20), "one replica", |st| {
            st.replicas == 1
        })
        .await;
    scaled?;
    let st = st?;
    let (placed, reason, message) = condition(&st, "Placed").context("no Placed")?;
    println!("while unplaceable and shed: Placed={placed} {reason}: {message}");
    ensure!(placed == "False" && reason == "NoCompatibleGPU", "{st:?}");
    ensure!(message.contains("kept running at 1 replica"), "{message}");
    let shed = condition(&st, "Shed").context("no Shed")?;
    ensure!(
        shed.0 == "True" && shed.2.contains("solar-test"),
        "{shed:?}"
    );
    ensure!(st.shed_by.as_deref() == Some("solar-test"), "{st:?}");
    s.status_until("shed", Duration::from_secs(30), "one ready", |st| {
        st.ready_replicas == 1
    })
    .await?;

    // The budget gives the replica back: the Deployment runs the two its
    // last placement found room for, still without a new placement.
    s.mds()
        .patch(
            "shed",
            &PatchParams::apply(copyhold::controller::energy_budget::SHED_FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": "shed", "namespace": s.ns.name}
            })),
        )
        .await?;
    let st = s
        .status_until("shed", Duration::from_secs(20), "two again", |st| {
            st.replicas == 2
        })
        .await?;
    ensure!(
        condition(&st, "Shed").is_some_and(|c| c.0 == "False"),
        "{st:?}"
    );
    Ok(())
}

/// A Pod holding one GPU of `product` (in a namespace no kubelet stand-in
/// runs, so it stays bound and holds the card until deleted).
fn blocker(product: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "blocker"},
        "spec": {"nodeSelector": {"nvidia.com/gpu.product": product},
                 "containers": [{"name": "c", "image": "copyhold/none:0",
                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
    }))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_model_stays_on_its_card_when_a_better_one_frees_up_and_moves_when_asked()
-> Result<()> {
    let s = Scene::new("kept-sticky", "127.0.122").await?;
    // The T4 (the most efficient card for a small model) is taken.
    let other = TestNamespace::create("kept-blocker")?;
    let blockers: Api<Pod> = Api::namespaced(s.client.clone(), &other.name);
    eventually(Duration::from_secs(30), || async {
        copyhold_e2e::kubectl_ok(&["get", "serviceaccount", "default", "-n", &other.name])
            .map(|_| ())
    })
    .await?;
    blockers
        .create(&PostParams::default(), &blocker("Tesla-T4")?)
        .await?;
    eventually(Duration::from_secs(30), || async {
        let node = blockers
            .get("blocker")
            .await?
            .spec
            .and_then(|s| s.node_name);
        ensure!(node.as_deref() == Some("gpu-t4"), "blocker on {node:?}");
        Ok(())
    })
    .await?;

    s.model("sticky", 1, json!({})).await?;
    s.status_until("sticky", Duration::from_secs(60), "one ready", |st| {
        st.ready_replicas == 1
    })
    .await?;
    let deployments = s.deployments();
    let before = deployments.get("sticky").await?;
    ensure!(
        required_products(&before) == ["Tesla-V100-SXM2-32GB"],
        "{:?}",
        required_products(&before)
    );
    ensure!(s.pod_nodes("sticky").await? == ["gpu-v100"]);

    // The better card frees up; the controller looks again every 2 s.
    blockers
        .delete("blocker", &DeleteParams::default().grace_period(0))
        .await?;
    eventually(Duration::from_secs(30), || async {
        ensure!(
            blockers.get_opt("blocker").await?.is_none(),
            "blocker still there"
        );
        Ok(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = deployments.get("sticky").await?;
    let replica_sets: Api<ReplicaSet> = Api::namespaced(s.client.clone(), &s.ns.name);
    let templates = replica_sets
        .list(&ListParams::default().labels("copyhold.dev/model-deployment=sticky"))
        .await?
        .items
        .len();
    println!(
        "after the T4 freed up: generation {:?} -> {:?}, {templates} template(s), products {:?}",
        before.metadata.generation,
        after.metadata.generation,
        required_products(&after)
    );
    ensure!(
        templates == 1,
        "the Pod template changed: {templates} ReplicaSets"
    );
    ensure!(
        after.spec.as_ref().map(|s| &s.template) == before.spec.as_ref().map(|s| &s.template),
        "the template changed: {:?}",
        required_products(&after)
    );
    ensure!(s.pod_nodes("sticky").await? == ["gpu-v100"]);

    // Its owner asks for a new placement: it moves to the T4.
    s.mds()
        .patch(
            "sticky",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"copyhold.dev/replace": "1"}}})),
        )
        .await?;
    eventually(Duration::from_secs(30), || async {
        let d = deployments.get("sticky").await?;
        ensure!(
            required_products(&d) == ["Tesla-T4"],
            "{:?}",
            required_products(&d)
        );
        Ok(())
    })
    .await?;
    let st = s
        .status_until("sticky", Duration::from_secs(60), "ready on the T4", |st| {
            st.ready_replicas == 1 && st.nodes == ["gpu-t4"]
        })
        .await?;
    println!(
        "after copyhold.dev/replace: {:?} on {:?}",
        st.gpu_class, st.nodes
    );
    // And stays there: asking is once per new value.
    let moved = deployments.get("sticky").await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    ensure!(
        deployments.get("sticky").await?.metadata.generation == moved.metadata.generation,
        "replaced again without a new request"
    );
    Ok(())
}
