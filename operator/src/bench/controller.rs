//! `copyhold bench controller`: how fast one controller places many
//! ModelDeployments, how much memory it needs, and how many API requests it
//! sends per object. A benchmark, not a test: it prints figures.
//!
//! It runs against the cluster `KUBECONFIG` names (the local control plane of
//! `e2e/cluster.sh`), adds its own simulated GPU nodes (labelled so only its
//! objects land there), starts the controller as a child process, creates the
//! objects, waits until every one is decided (`Placed`, or refused with
//! `InsufficientGPUs` when the fleet has less room than objects:
//! `--room`), and removes all it made. It watches the objects' Pods and
//! reports how long the longest waited to be bound: no kubelet runs, so a
//! bound Pod stays `Pending` with its node set, and an unbound one is one
//! whose GPUs went to another model.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::resources::ModelDeployment;

/// What to run.
#[derive(Clone, Debug)]
pub struct ControllerBench {
    pub objects: usize,
    /// GPUs in the simulated fleet, each object asking for one; as many as
    /// objects when `None`.
    pub room: Option<usize>,
    pub gpus_per_node: u32,
    pub concurrency: usize,
    pub json: bool,
}

/// What was measured.
#[derive(Debug, serde::Serialize)]
pub struct ControllerFigures {
    pub objects: usize,
    pub nodes: usize,
    /// GPUs of the simulated fleet.
    pub gpus: usize,
    /// Until every object was `Placed` or refused for want of GPUs.
    pub seconds_until_all_decided: f64,
    pub placed: usize,
    pub insufficient_gpus: usize,
    /// The objects' Pods seen.
    pub pods: usize,
    /// The longest any Pod waited to be bound (until the end of the run
    /// for one never bound).
    pub longest_unbound_seconds: f64,
    /// Pods not bound when the run ended.
    pub pods_unbound: usize,
    pub controller_peak_rss_mb: f64,
    pub api_requests: u64,
    pub api_requests_per_object: f64,
    /// The API requests by `VERB resource` (`PATCH modeldeployments/status`).
    pub api_requests_by_kind: BTreeMap<String, u64>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Peak resident set of a process, from /proc (Linux).
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The controller's API requests so far, by `VERB resource`, from its
/// `copyhold_controller_api_requests_total`.
async fn scrape_requests(port: u16) -> Result<BTreeMap<String, u64>> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    Ok(requests_by_kind(&body))
}

/// `copyhold_controller_api_requests_total{verb="PATCH",resource="services"} 3`
/// lines of a metrics text, summed by `PATCH services`.
fn requests_by_kind(metrics: &str) -> BTreeMap<String, u64> {
    let mut by_kind = BTreeMap::new();
    for line in metrics.lines() {
        let Some(labels) = line.strip_prefix("copyhold_controller_api_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = labels.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        *by_kind
            .entry(format!("{} {}", label("verb"), label("resource")))
            .or_insert(0) += value as u64;
    }
    by_kind
}

/// What was sent between two scrapes, by kind, leaving out kinds with none.
fn requests_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, n)| (k.clone(), n.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Run the benchmark.
pub async fn controller(client: Client, bench: ControllerBench) -> Result<ControllerFigures> {
    // Plainly, before making anything: a cluster without the CRDs.
    crate::crd_check::require_installed(&client, None).await?;
    let tag = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let ns_name = format!("copyhold-bench-{tag}");
    let fleet = fleet_gpus(bench.room.unwrap_or(bench.objects), bench.gpus_per_node);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns_name}}))?,
        )
        .await?;
    let node_names = simulated_nodes(&client, &tag, &fleet).await?;

    let result = run_measured(&client, &bench, &ns_name, &tag, &fleet).await;

    // Clean up whatever happened: without a kubelet, Pods must be removed by force.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns_name);
    let _ = mds
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    for _ in 0..20 {
        let _ = pods
            .delete_collection(
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..Default::default()
                },
                &ListParams::default(),
            )
            .await;
        if pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(true)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = namespaces.delete(&ns_name, &DeleteParams::default()).await;
    remove_nodes(&client, &node_names).await;
    result
}

/// Add simulated GPU nodes `bench-<tag>-<i>`, Ready and untainted, with
/// `fleet[i]` Tesla T4s each and the label `copyhold.dev/bench: <tag>`
/// (select them with it). No kubelet runs on them: the scheduler binds
/// Pods to them, which then stay `Pending`. Returns their names.
pub async fn simulated_nodes(client: &Client, tag: &str, fleet: &[usize]) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node_names: Vec<String> = (0..fleet.len())
        .map(|i| format!("bench-{tag}-{i}"))
        .collect();
    for (name, gpus) in node_names.iter().zip(fleet) {
        let gpus = gpus.to_string();
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "copyhold.dev/bench": tag,
                "kubernetes.io/hostname": name,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "Tesla-T4",
                "nvidia.com/gpu.memory": "15360",
                "nvidia.com/gpu.count": gpus,
                "nvidia.com/gpu.compute.major": "7",
                "nvidia.com/gpu.compute.minor": "5",
            }},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        let status = json!({"status": {
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250", "nvidia.com/gpu": gpus},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250", "nvidia.com/gpu": gpus},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "copyhold bench"}],
        }});
        nodes
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": null}})),
            )
            .await?;
    }
    Ok(node_names)
}

/// Remove the nodes [`simulated_nodes`] added.
pub async fn remove_nodes(client: &Client, names: &[String]) {
    let nodes: Api<Node> = Api::all(client.clone());
    for name in names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
}

/// GPUs per simulated node: `room` in all, `per_node` on each but the last.
fn fleet_gpus(room: usize, per_node: u32) -> Vec<usize> {
    let per_node = per_node.max(1) as usize;
    (0..room.div_ceil(per_node))
        .map(|i| per_node.min(room - i * per_node))
        .collect()
}

/// When each Pod was first seen and first seen bound, by uid.
type PodTimes = Arc<Mutex<HashMap<String, (Instant, Option<Instant>)>>>;

/// Watch the Pods of `ns` into `times` until aborted.
fn watch_pods(client: &Client, ns: &str, times: PodTimes) -> tokio::task::JoinHandle<()> {
    use kube::runtime::{WatchStreamExt, watcher};
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(
            watcher(pods, watcher::Config::default())
                .default_backoff()
                .applied_objects()
        );
        while let Some(Ok(p)) = stream.next().await {
            let now = Instant::now();
            let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
            let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
            let entry = t
                .entry(p.metadata.uid.clone().unwrap_or_default())
                .or_insert((now, None));
            if bound && entry.1.is_none() {
                entry.1 = Some(now);
            }
        }
    })
}

/// Pods seen, the longest wait to be bound (until `end` for those never
/// bound), and how many are unbound.
fn pod_waits(times: &PodTimes, end: Instant) -> (usize, f64, usize) {
    let t = times.lock().unwrap_or_else(|e| e.into_inner());
    let longest = t
        .values()
        .map(|(seen, bound)| bound.unwrap_or(end).duration_since(*seen).as_secs_f64())
        .fold(0.0, f64::max);
    let unbound = t.values().filter(|(_, b)| b.is_none()).count();
    (t.len(), longest, unbound)
}

/// Each object's decision so far: `Some(true)` Placed, `Some(false)`
/// refused with `InsufficientGPUs`, `None` not decided yet.
type Decisions = Arc<Mutex<HashMap<String, Option<bool>>>>;

/// The decision an object's `Placed` condition records.
fn decision(m: &ModelDeployment) -> Option<bool> {
    let c = m
        .status
        .as_ref()
        .and_then(|s| crate::conditions::get(&s.conditions, "Placed"))?;
    match (c.status.as_str(), c.reason.as_str()) {
        ("True", _) => Some(true),
        ("False", "InsufficientGPUs") => Some(false),
        _ => None,
    }
}

/// Watch the ModelDeployments of `mds` into `decisions` until aborted. A
/// watch, not a list of every object every 200 ms: at 500 objects those
/// lists were load on the API server the controller is measured against.
fn watch_decisions(mds: Api<ModelDeployment>, decisions: Decisions) -> tokio::task::JoinHandle<()> {
    use kube::runtime::{WatchStreamExt, watcher};
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(
            watcher(mds, watcher::Config::default())
                .default_backoff()
                .applied_objects()
        );
        while let Some(Ok(m)) = stream.next().await {
            let mut d = decisions.lock().unwrap_or_else(|e| e.into_inner());
            d.insert(m.name_any(), decision(&m));
        }
    })
}

/// Objects `Placed`, and refused with `InsufficientGPUs`.
fn decided(decisions: &Decisions) -> (usize, usize) {
    let d = decisions.lock().unwrap_or_else(|e| e.into_inner());
    let placed = d.values().filter(|v| **v == Some(true)).count();
    let short = d.values().filter(|v| **v == Some(false)).count();
    (placed, short)
}

async fn run_measured(
    client: &Client,
    bench: &ControllerBench,
    ns: &str,
    tag: &str,
    fleet: &[usize],
) -> Result<ControllerFigures> {
    let port = free_port()?;
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "controller",
            "--leader-election=false",
            "--node-device",
            "cpu",
            "--watch-namespace",
            ns,
        ])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the controller")?;
    let pid = child.id().context("controller pid")?;
    // Ready once it serves /readyz.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("controller not ready after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = scrape_requests(port).await?;

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let times: PodTimes = Arc::default();
    let pod_watch = watch_pods(client, ns, times.clone());
    let decisions: Decisions = Arc::default();
    let md_watch = watch_decisions(mds.clone(), decisions.clone());
    let started = Instant::now();
    futures::stream::iter(0..bench.objects)
        .map(|i| {
            let mds = mds.clone();
            let tag = tag.to_owned();
            async move {
                let md: ModelDeployment = serde_json::from_value(json!({
                    "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
                    "metadata": {"name": format!("m{i}")},
                    "spec": {
                        "model": {"source": {"hostPath": {"path": "/srv/models/tiny"}},
                                  "sizing": {"weightBytes": "1Gi", "kvBytesPerToken": 16384, "numLayers": 16}},
                        "serving": {"contextLength": 2048, "maxConcurrentSequences": 4},
                        "placement": {"nodeSelector": BTreeMap::from([("copyhold.dev/bench", tag)])},
                        "replicas": 1,
                    }
                }))?;
                mds.create(&PostParams::default(), &md).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(bench.concurrency.max(1))
        .try_collect::<Vec<_>>()
        .await?;

    let deadline = Instant::now() + Duration::from_secs(600);
    let (placed, short) = loop {
        let (placed, short) = decided(&decisions);
        if placed + short >= bench.objects {
            break (placed, short);
        }
        if Instant::now() > deadline {
            bail!(
                "only {placed}/{} placed and {short} refused after 10 minutes",
                bench.objects
            );
        }
        if !bench.json {
            eprint!(
                "\r  placed {placed}/{}, {short} InsufficientGPUs",
                bench.objects
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    md_watch.abort();
    if !bench.json {
        eprintln!();
    }
    // The Pods of the placed objects: until each is bound, or 15 s (past
    // the 10 s goal) for any that is not.
    let pods_deadline = Instant::now() + Duration::from_secs(15);
    let pods_end = loop {
        let (seen, _, unbound) = pod_waits(&times, Instant::now());
        if (seen >= placed && unbound == 0) || Instant::now() > pods_deadline {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    pod_watch.abort();
    let (pods, longest_unbound_seconds, pods_unbound) = pod_waits(&times, pods_end);
    let after = scrape_requests(port).await?;
    let rss = peak_rss_mb(pid).unwrap_or(f64::NAN);
    let _ = child.kill().await;
    let by_kind = requests_between(&before, &after);
    let requests: u64 = by_kind.values().sum();
    let names: Vec<String> = mds
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|m| m.name_any())
        .collect();
    if names.len() != bench.objects {
        bail!("{} objects found, {} created", names.len(), bench.objects);
    }
    Ok(ControllerFigures {
        objects: bench.objects,
        nodes: fleet.len(),
        gpus: fleet.iter().sum(),
        seconds_until_all_decided: seconds,
        placed,
        insufficient_gpus: short,
        pods,
        longest_unbound_seconds,
        pods_unbound,
        controller_peak_rss_mb: rss,
        api_requests: requests,
        api_requests_per_object: requests as f64 / bench.objects as f64,
        api_requests_by_kind: by_kind,
    })
}

#[cfg(test)]
mod tests {
    use super::{fleet_gpus, requests_between, requests_by_kind};

    #[test]
    fn the_fleet_holds_exactly_the_room_asked_for() {
        assert_eq!(fleet_gpus(40, 8), [8, 8, 8, 8, 8]);
        assert_eq!(fleet_gpus(42, 8), [8, 8, 8, 8, 8, 2]);
        assert_eq!(fleet_gpus(3, 8), [3]);
        assert!(fleet_gpus(0, 8).is_empty());
    }

    #[test]
    fn the_requests_are_told_apart_by_verb_and_resource() {
        let before = requests_by_kind(
            "# TYPE copyhold_controller_api_requests_total counter\n\
             copyhold_controller_api_requests_total{verb=\"GET\",resource=\"pods\"} 4\n",
        );
        let after = requests_by_kind(
            "copyhold_controller_api_requests_total{verb=\"GET\",resource=\"pods\"} 4\n\
             copyhold_controller_api_requests_total{verb=\"PATCH\",resource=\"modeldeployments/status\"} 7\n\
             copyhold_controller_api_requests_created{verb=\"GET\",resource=\"pods\"} 1.7e9\n",
        );
        let between = requests_between(&before, &after);
        assert_eq!(
            between.into_iter().collect::<Vec<_>>(),
            [("PATCH modeldeployments/status".to_string(), 7)]
        );
    }
}
