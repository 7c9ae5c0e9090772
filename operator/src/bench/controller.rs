//! `copyhold bench controller`: how fast one controller places many
//! ModelDeployments, how much memory it needs, and how many API requests it
//! sends per object. A benchmark, not a test: it prints figures.
//!
//! It runs against the cluster `KUBECONFIG` names (the local control plane of
//! `e2e/cluster.sh`), adds its own simulated GPU nodes (labelled so only its
//! objects land there), starts the controller as a child process, creates the
//! objects, waits until every one is `Placed`, and removes all it made.

use std::collections::BTreeMap;
use std::process::Stdio;
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
    pub gpus_per_node: u32,
    pub concurrency: usize,
    pub json: bool,
}

/// What was measured.
#[derive(Debug, serde::Serialize)]
pub struct ControllerFigures {
    pub objects: usize,
    pub nodes: usize,
    pub seconds_until_all_placed: f64,
    pub controller_peak_rss_mb: f64,
    pub api_requests: u64,
    pub api_requests_per_object: f64,
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

async fn scrape_requests(port: u16) -> Result<u64> {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let mut total = 0.0;
    for line in body.lines() {
        if line.starts_with("copyhold_controller_api_requests_total")
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            total += v;
        }
    }
    Ok(total as u64)
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
    let nodes_needed = bench.objects.div_ceil(bench.gpus_per_node.max(1) as usize);
    let nodes: Api<Node> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns_name}}))?,
        )
        .await?;
    let node_names: Vec<String> = (0..nodes_needed)
        .map(|i| format!("bench-{tag}-{i}"))
        .collect();
    for name in &node_names {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "copyhold.dev/bench": tag,
                "kubernetes.io/hostname": name,
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "Tesla-T4",
                "nvidia.com/gpu.memory": "15360",
                "nvidia.com/gpu.count": bench.gpus_per_node.to_string(),
                "nvidia.com/gpu.compute.major": "7",
                "nvidia.com/gpu.compute.minor": "5",
            }},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        let status = json!({"status": {
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250", "nvidia.com/gpu": bench.gpus_per_node.to_string()},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250", "nvidia.com/gpu": bench.gpus_per_node.to_string()},
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

    let result = run_measured(&client, &bench, &ns_name, &tag, nodes_needed).await;

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
    for name in &node_names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    result
}

async fn run_measured(
    client: &Client,
    bench: &ControllerBench,
    ns: &str,
    tag: &str,
    nodes: usize,
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
    loop {
        let list = mds.list(&ListParams::default()).await?;
        let placed = list
            .items
            .iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| crate::conditions::is_true(&s.conditions, "Placed"))
            })
            .count();
        if placed >= bench.objects {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {placed}/{} placed after 10 minutes", bench.objects);
        }
        if !bench.json {
            eprint!("\r  placed {placed}/{}", bench.objects);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    if !bench.json {
        eprintln!();
    }
    let after = scrape_requests(port).await?;
    let rss = peak_rss_mb(pid).unwrap_or(f64::NAN);
    let _ = child.kill().await;
    let requests = after.saturating_sub(before);
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
        nodes,
        seconds_until_all_placed: seconds,
        controller_peak_rss_mb: rss,
        api_requests: requests,
        api_requests_per_object: requests as f64 / bench.objects as f64,
    })
}
