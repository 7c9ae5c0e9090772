//! Placement when things happen at once, on the real control plane: the
//! controller as a real process (resync at its default 300 s, so only the
//! watches can act within a test), the real scheduler binding the Pods to
//! the simulated GPU nodes of `e2e/nodes.yaml`. No kubelet runs here: a
//! bound Pod holds its GPUs in the scheduler's books, which is all these
//! tests need.
//!
//! - Models created at once never plan the same free GPUs (issue 19, item 1).
//! - A model whose Pod is left Pending because its GPU went elsewhere is
//!   placed again within seconds (issue 19, item 1).
//! - A scale-up places the replicas that fit, keeps the running ones, and
//!   says InsufficientGPUs for the rest (issue 23, item 4).
//! - A cluster without the CRDs is told so, with how to install them
//!   (issue 19, "Must be shown").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use copyhold::resources::{ModelDeployment, ModelDeploymentStatus};
use copyhold_e2e::{ChildGuard, FleetLock, TestNamespace, eventually, install_crds};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// The V100 node's GPUs (`e2e/nodes.yaml`).
const V100_GPUS: usize = 4;

/// A namespace with the controller (resync 300 s) and the simulated fleet
/// to itself.
struct Scene {
    ns: TestNamespace,
    client: kube::Client,
    _controller: ChildGuard,
    _fleet: FleetLock,
}

impl Scene {
    async fn new(prefix: &str) -> Result<Scene> {
        let fleet = FleetLock::acquire()?;
        install_crds().await?;
        let ns = TestNamespace::create(prefix)?;
        let client = copyhold_e2e::client().await?;
        let controller = copyhold_e2e::start_controller_resync(
            &ns.name,
            300,
            &["--budget-selector", "copyhold-test=none"],
        )?;
        Ok(Scene {
            ns,
            client,
            _controller: controller,
            _fleet: fleet,
        })
    }

    /// A small ModelDeployment `name` (one GPU of any card holds it) with
    /// `placement` as its `spec.placement`.
    async fn model(
        &self,
        name: &str,
        replicas: i32,
        placement: Value,
        resources: Value,
    ) -> Result<()> {
        let md = json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/none"}},
                          "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
                "engine": {"image": "copyhold-standin:test"},
                "replicas": replicas,
                "placement": placement,
                "serving": {"contextLength": 256, "resources": resources},
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

    fn pods(&self) -> Api<Pod> {
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

    /// `name`'s Pods not being deleted.
    async fn model_pods(&self, name: &str) -> Result<Vec<Pod>> {
        Ok(self
            .pods()
            .list(&ListParams::default().labels(&format!("copyhold.dev/model-deployment={name}")))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }
}

/// The Placed condition of `st`: status, reason, message.
fn placed(st: &ModelDeploymentStatus) -> Option<(String, String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == "Placed")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The GPU products the Deployment's Pods are required to run on.
fn required_products(d: &Deployment) -> Vec<String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default()
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == "nvidia.com/gpu.product")
        .flat_map(|e| e.values.clone().unwrap_or_default())
        .collect()
}

/// GPUs a Deployment's replicas ask for together: replicas × the
/// container's `nvidia.com/gpu` limit.
fn deployment_gpus(d: &Deployment) -> usize {
    let spec = d.spec.as_ref();
    let replicas = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let per_pod: usize = spec
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| {
            p.containers
                .iter()
                .filter_map(|c| c.resources.as_ref()?.limits.as_ref()?.get("nvidia.com/gpu"))
                .filter_map(|q| q.0.parse::<usize>().ok())
                .sum()
        })
        .unwrap_or(0);
    replicas * per_pod
}

/// A Pod `name` in `ns` bound to `node` by hand (no scheduler) asking for
/// `requests` (as limits): the resources go elsewhere, as when another
/// scheduler or a person binds a Pod there. No kubelet runs in its
/// namespace, so it holds them until deleted.
async fn bind_blocker(
    client: &kube::Client,
    ns: &str,
    name: &str,
    node: &str,
    requests: Value,
) -> Result<()> {
    eventually(Duration::from_secs(30), || async {
        copyhold_e2e::kubectl_ok(&["get", "serviceaccount", "default", "-n", ns]).map(|_| ())
    })
    .await?;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node,
                 "containers": [{"name": "c", "image": "copyhold/none:0",
                     "resources": {"limits": requests.clone(), "requests": requests}}]}
    }))?;
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_created_at_once_never_plan_the_same_gpus_and_the_rest_say_insufficient_gpus()
-> Result<()> {
    let s = Scene::new("at-once").await?;
    // Six one-GPU models for the V100 node's four GPUs, created at once.
    let names: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    let on_v100 = json!({"nodeSelector": {"kubernetes.io/hostname": "gpu-v100"}});
    let started = Instant::now();
    futures::future::try_join_all(
        names
            .iter()
            .map(|n| s.model(n, 1, on_v100.clone(), json!({}))),
    )
    .await?;

    // Every one decided (Placed, or refused for want of GPUs).
    let mds = s.mds();
    eventually(Duration::from_secs(30), || async {
        let list = mds.list(&ListParams::default()).await?.items;
        let decided = list
            .iter()
            .filter(|m| placed(&m.status.clone().unwrap_or_default()).is_some())
            .count();
        ensure!(
            decided == names.len(),
            "{decided} of {} decided",
            names.len()
        );
        Ok(())
    })
    .await?;
    let decided_after = started.elapsed();
    // Late reconciles (the Pods' own events) have a moment to change it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut outcome: BTreeMap<String, (String, String)> = BTreeMap::new();
    for m in mds.list(&ListParams::default()).await?.items {
        let st = m.status.clone().unwrap_or_default();
        let (status, reason, _) = placed(&st).context("no Placed condition")?;
        outcome.insert(m.metadata.name.unwrap_or_default(), (status, reason));
    }
    let deployments = s.deployments().list(&ListParams::default()).await?.items;
    let planned: usize = deployments.iter().map(deployment_gpus).sum();
    println!(
        "decided in {:.1} s: {outcome:?}; GPUs the Deployments ask for: {planned}",
        decided_after.as_secs_f64()
    );
    let placed_n = outcome.values().filter(|(s, _)| s == "True").count();
    let refused = outcome
        .values()
        .filter(|(s, r)| s == "False" && r == "InsufficientGPUs")
        .count();
    ensure!(
        planned <= V100_GPUS,
        "the Deployments ask for {planned} GPUs of a node with {V100_GPUS}: GPUs planned twice"
    );
    ensure!(
        placed_n == V100_GPUS && refused == names.len() - V100_GPUS,
        "{placed_n} Placed and {refused} InsufficientGPUs, want {V100_GPUS} and {}",
        names.len() - V100_GPUS
    );

    // Every planned Pod is bound within seconds; none waits for a GPU.
    let pods = s.pods();
    let bound = eventually(Duration::from_secs(10), || async {
        let list = pods.list(&ListParams::default()).await?.items;
        let unbound: Vec<String> = list
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none())
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        ensure!(unbound.is_empty(), "Pods waiting for a node: {unbound:?}");
        ensure!(list.len() == V100_GPUS, "{} Pods", list.len());
        Ok(list.len())
    })
    .await?;
    println!(
        "{bound} Pods bound {:.1} s after the models were created",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_whose_pod_is_left_pending_because_its_gpu_went_elsewhere_is_placed_again_within_seconds()
-> Result<()> {
    let s = Scene::new("went-elsewhere").await?;
    // The T4 node's CPUs are all taken (placement does not weigh CPUs), so
    // the model's Pod, planned for the T4's free GPU, waits unbound.
    let other = TestNamespace::create("went-elsewhere-blocker")?;
    bind_blocker(
        &s.client,
        &other.name,
        "cpu-hog",
        "gpu-t4",
        json!({"cpu": "8"}),
    )
    .await?;
    // A small model for the T4 or the P40: the T4 has the better tokens per
    // joule.
    s.model(
        "moved",
        1,
        json!({"gpuProducts": ["Tesla-T4", "Tesla-P40"]}),
        json!({"requests": {"cpu": "1"}}),
    )
    .await?;
    let deployments = s.deployments();
    eventually(Duration::from_secs(30), || async {
        let d = deployments.get("moved").await?;
        ensure!(
            required_products(&d) == ["Tesla-T4"],
            "{:?}",
            required_products(&d)
        );
        let unschedulable = s.model_pods("moved").await?.iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                })
        });
        ensure!(unschedulable, "the Pod is not yet found unschedulable");
        Ok(())
    })
    .await?;
    // Its reconciles on the Deployment's changes are over.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The T4's GPU goes elsewhere, and its CPUs come free: the scheduler
    // tries the Pod again and now finds no GPU. Nothing of the model's
    // Deployment changes.
    bind_blocker(
        &s.client,
        &other.name,
        "blocker",
        "gpu-t4",
        json!({"nvidia.com/gpu": "1"}),
    )
    .await?;
    Api::<Pod>::namespaced(s.client.clone(), &other.name)
        .delete("cpu-hog", &DeleteParams::default().grace_period(0))
        .await?;
    let started = Instant::now();

    // Within seconds, not at the resync: placed again on the P40, and bound.
    eventually(Duration::from_secs(20), || async {
        let d = deployments.get("moved").await?;
        ensure!(
            required_products(&d) == ["Tesla-P40"],
            "still required on {:?}",
            required_products(&d)
        );
        let nodes: Vec<Option<String>> = s
            .model_pods("moved")
            .await?
            .into_iter()
            .map(|p| p.spec.and_then(|s| s.node_name))
            .collect();
        ensure!(nodes == [Some("gpu-p40".to_string())], "Pods on {nodes:?}");
        Ok(())
    })
    .await?;
    println!(
        "placed again and bound on the P40 {:.1} s after its GPU went elsewhere",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scale_up_places_the_replicas_that_fit_keeps_the_running_ones_and_says_insufficient_gpus_for_the_rest()
-> Result<()> {
    let s = Scene::new("scale-up").await?;
    let on_v100 = json!({"nodeSelector": {"kubernetes.io/hostname": "gpu-v100"}});
    s.model("grow", 2, on_v100.clone(), json!({})).await?;
    let running = eventually(Duration::from_secs(30), || async {
        let pods = s.model_pods("grow").await?;
        let bound: Vec<String> = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-v100"))
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        ensure!(bound.len() == 2, "{} of 2 bound", bound.len());
        Ok(bound)
    })
    .await?;

    // One of the two free V100s goes elsewhere; the model asks for four.
    let other = TestNamespace::create("scale-up-blocker")?;
    bind_blocker(
        &s.client,
        &other.name,
        "blocker",
        "gpu-v100",
        json!({"nvidia.com/gpu": "1"}),
    )
    .await?;
    s.mds()
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await?;
    let started = Instant::now();
    let st = s
        .status_until("grow", Duration::from_secs(20), "3 of 4 placed", |st| {
            st.replicas == 3
                && placed(st)
                    .is_some_and(|(_, r, m)| r == "InsufficientGPUs" && m.contains("3 of 4"))
        })
        .await?;
    let (status, reason, message) = placed(&st).context("no Placed")?;
    println!(
        "after {:.1} s: Placed={status} {reason}: {message}",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        s.deployments()
            .get("grow")
            .await?
            .spec
            .and_then(|d| d.replicas)
            == Some(3),
        "the Deployment does not run the 3 that fit"
    );

    // The two running Pods stay (same Pods, one template); the third is
    // bound beside them.
    eventually(Duration::from_secs(15), || async {
        let pods = s.model_pods("grow").await?;
        let uids: Vec<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        for r in &running {
            ensure!(uids.contains(r), "running Pod {r} was replaced: {uids:?}");
        }
        let on_v100 = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-v100"))
            .count();
        ensure!(
            pods.len() == 3 && on_v100 == 3,
            "{on_v100} of {} bound",
            pods.len()
        );
        Ok(())
    })
    .await?;
    let templates = Api::<ReplicaSet>::namespaced(s.client.clone(), &s.ns.name)
        .list(&ListParams::default().labels("copyhold.dev/model-deployment=grow"))
        .await?
        .items
        .len();
    ensure!(
        templates == 1,
        "the Pod template changed: {templates} ReplicaSets"
    );
    Ok(())
}

#[tokio::test]
async fn a_cluster_without_the_crds_is_told_they_are_missing_and_how_to_install_them() -> Result<()>
{
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    // The installed CRDs pass.
    copyhold::crd_check::require_installed(&client, None).await?;
    // A version the cluster does not serve answers as a missing CRD does:
    // the API server's plain `404 page not found`.
    let absent = kube::discovery::ApiResource {
        group: "copyhold.dev".into(),
        version: "v0absent".into(),
        api_version: "copyhold.dev/v0absent".into(),
        kind: "ModelDeployment".into(),
        plural: "modeldeployments".into(),
    };
    let err = copyhold::crd_check::require_served(&client, &absent)
        .await
        .err()
        .context("a version nobody serves was found")?;
    let text = err.to_string();
    println!("{text}");
    ensure!(
        matches!(err, copyhold::crd_check::CrdError::Missing { .. }),
        "{err:?}"
    );
    ensure!(
        text.contains("modeldeployments.copyhold.dev") && text.contains("kubectl apply"),
        "{text}"
    );
    ensure!(!text.contains("page not found"), "{text}");
    Ok(())
}

/// Publish `in_flight` requests for `model` in a demand Lease of `ns`, as
/// a gateway replica does, rewriting it every second (the controller
/// counts only Leases that move) until the task is dropped.
fn publish_demand(client: &kube::Client, ns: &str, model: &str, in_flight: i64) -> AbortOnDrop {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let demand = json!({model: {"inFlight": in_flight, "held": 0}}).to_string();
    AbortOnDrop(tokio::spawn(async move {
        for beat in 0u64.. {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "gateway-test",
                    "labels": {copyhold::serving::autoscale::DEMAND_LABEL: "test"},
                    "annotations": {copyhold::serving::autoscale::DEMAND_ANNOTATION: demand,
                                    "copyhold-e2e/beat": beat.to_string()}},
            });
            let _ = leases
                .patch(
                    "gateway-test",
                    &PatchParams::apply("copyhold-e2e").force(),
                    &Patch::Apply(&lease),
                )
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }))
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_autoscaler_scale_up_places_the_replicas_that_fit_and_says_insufficient_gpus_for_the_rest()
-> Result<()> {
    let s = Scene::new("auto-up").await?;
    let md = json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "auto", "namespace": s.ns.name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/none"}},
                      "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
            "engine": {"image": "copyhold-standin:test"},
            "replicas": 1,
            "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetInFlightPerReplica": 1},
            "placement": {"nodeSelector": {"kubernetes.io/hostname": "gpu-v100"}},
            "serving": {"contextLength": 256},
        }
    });
    s.mds()
        .patch(
            "auto",
            &PatchParams::apply("copyhold-e2e").force(),
            &Patch::Apply(&md),
        )
        .await?;
    let running = eventually(Duration::from_secs(30), || async {
        let pods = s.model_pods("auto").await?;
        let bound: Vec<String> = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-v100"))
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        ensure!(bound.len() == 1, "{} of 1 bound", bound.len());
        Ok(bound)
    })
    .await?;

    // Two of the V100's three free GPUs go elsewhere; four requests in
    // flight ask for four replicas (one each).
    let other = TestNamespace::create("auto-up-blocker")?;
    bind_blocker(
        &s.client,
        &other.name,
        "blocker",
        "gpu-v100",
        json!({"nvidia.com/gpu": "2"}),
    )
    .await?;
    let _demand = publish_demand(&s.client, &s.ns.name, "auto", 4);
    let started = Instant::now();
    let st = s
        .status_until("auto", Duration::from_secs(30), "2 of 4 placed", |st| {
            st.replicas == 2
                && placed(st)
                    .is_some_and(|(_, r, m)| r == "InsufficientGPUs" && m.contains("2 of 4"))
        })
        .await?;
    let (status, reason, message) = placed(&st).context("no Placed")?;
    println!(
        "after {:.1} s (desired {:?}): Placed={status} {reason}: {message}",
        started.elapsed().as_secs_f64(),
        st.desired_replicas
    );
    ensure!(status == "True", "{status}");
    eventually(Duration::from_secs(15), || async {
        let pods = s.model_pods("auto").await?;
        let uids: Vec<String> = pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        ensure!(
            uids.contains(&running[0]),
            "the running Pod was replaced: {uids:?}"
        );
        let bound = pods
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("gpu-v100"))
            .count();
        ensure!(
            pods.len() == 2 && bound == 2,
            "{bound} of {} bound",
            pods.len()
        );
        Ok(())
    })
    .await?;
    Ok(())
}
