//! `copyhold controller` as a real process against the real control plane:
//! the real scheduler binds the Pods of the Deployments it makes to the
//! simulated fleet (2× P100 16 GB, P40 24 GB, 4× V100 32 GB, T4 16 GB).

#[path = "../../e2e/src/lib.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use copyhold::resources::ModelDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use support::{FleetLock, TestNamespace, eventually, install_crds, kubectl_ok};

/// A controller process, killed when dropped.
struct ControllerProcess {
    child: Child,
}

impl ControllerProcess {
    fn start(extra: &[&str]) -> Result<Self> {
        Self::start_with(&support::kubeconfig()?, extra)
    }

    /// Started with its own kubeconfig (e.g. one that reaches the API
    /// server through a [`StallingProxy`]).
    fn start_with(kubeconfig: &std::path::Path, extra: &[&str]) -> Result<Self> {
        let child = Command::new(env!("CARGO_BIN_EXE_copyhold"))
            .arg("controller")
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--node-device",
                "cpu",
                "--resync-seconds",
                "2",
                // These tests own no EnergyBudget: act on none (budgets are
                // cluster-wide; other tests' own theirs).
                "--budget-selector",
                "copyhold-test=none",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting copyhold controller")?;
        Ok(Self { child })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One test's world: the fleet to itself, its own namespace, a client, and
/// (usually) a controller watching that namespace. Fields drop in order: the
/// controller stops before the namespace is cleaned, the fleet lock goes last.
struct Scene {
    _controller: Option<ControllerProcess>,
    client: Client,
    ns: TestNamespace,
    _fleet: FleetLock,
}

impl Scene {
    async fn without_controller(prefix: &str) -> Result<Self> {
        let fleet = FleetLock::acquire()?;
        install_crds().await?;
        Ok(Self {
            _controller: None,
            client: support::client().await?,
            ns: TestNamespace::create(prefix)?,
            _fleet: fleet,
        })
    }

    async fn with_controller(prefix: &str) -> Result<Self> {
        let mut scene = Self::without_controller(prefix).await?;
        scene._controller = Some(one_controller_for(&scene.ns.name)?);
        Ok(scene)
    }
}

fn one_controller_for(ns: &str) -> Result<ControllerProcess> {
    ControllerProcess::start(&["--leader-election=false", "--watch-namespace", ns])
}

/// A model of about `weights_gib` GiB of f16 weights, sized inline.
fn model(name: &str, weights_gib: u32, replicas: i32, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model:
    source: {{hostPath: {{path: /srv/models/{name}}}}}
    sizing: {{weightBytes: {weights_gib}Gi, kvBytesPerToken: 131072, dtype: f16, numLayers: 32}}
  serving: {{contextLength: 2048, maxConcurrentSequences: 1}}
  replicas: {replicas}
{extra_spec}"#
    )
}

fn apply(ns: &str, manifest: &str) -> Result<()> {
    support::kubectl_apply(Some(ns), manifest)
}

async fn condition(
    api: &Api<ModelDeployment>,
    name: &str,
    type_: &str,
) -> Result<(String, String, String)> {
    let md = api.get(name).await?;
    let c = md
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .with_context(|| format!("{name} has no {type_} condition yet"))?;
    Ok((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_condition(
    api: &Api<ModelDeployment>,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<(String, String)> {
    eventually(Duration::from_secs(60), || async {
        let (s, reason, message) = condition(api, name, type_).await?;
        if s == status {
            Ok((reason, message))
        } else {
            bail!("{name} {type_}={s} ({reason}: {message})")
        }
    })
    .await
}

/// Nodes the Pods of `name` were bound to by the scheduler.
async fn bound_nodes(client: &Client, ns: &str, name: &str, count: usize) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(60), || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("copyhold.dev/model-deployment={name}")))
            .await?;
        let nodes: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        if nodes.len() >= count {
            Ok(nodes)
        } else {
            bail!("{}/{count} pods of {name} bound", nodes.len())
        }
    })
    .await
}

fn gpu_limit(d: &Deployment) -> Option<String> {
    d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("nvidia.com/gpu")
        .map(|q| q.0.clone())
}

#[tokio::test]
async fn a_20_gib_model_lands_on_a_v100_or_the_p40_never_the_t4() -> Result<()> {
    let scene = Scene::with_controller("place20").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    apply(&ns.name, &model("big", 18, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let (reason, message) = wait_condition(&mds, "big", "Placed", "True").await?;
    assert_eq!(reason, "Placed");
    assert!(!message.contains("Tesla-T4"), "{message}");
    let d: Deployment = Api::namespaced(client.clone(), &ns.name).get("big").await?;
    assert_eq!(gpu_limit(&d).as_deref(), Some("1"));
    let nodes = bound_nodes(client, &ns.name, "big", 1).await?;
    assert!(
        nodes[0] == "gpu-v100" || nodes[0] == "gpu-p40",
        "bound to {nodes:?}"
    );
    // The owned Service exists and the status names the endpoint and class.
    let _svc: Service = Api::namespaced(client.clone(), &ns.name).get("big").await?;
    let md = eventually(Duration::from_secs(30), || async {
        let md = mds.get("big").await?;
        let st = md.status.clone().context("no status")?;
        if st.nodes.is_empty() {
            bail!("nodes not yet in status")
        } else {
            Ok(md)
        }
    })
    .await?;
    let st = md.status.context("status")?;
    assert_eq!(st.observed_generation, md.metadata.generation);
    assert_eq!(
        st.endpoint.as_deref(),
        Some(format!("http://big.{}.svc:80/v1", ns.name).as_str())
    );
    assert!(
        matches!(
            st.gpu_class.as_deref(),
            Some("Tesla-V100-SXM2-32GB") | Some("Tesla-P40")
        ),
        "{:?}",
        st.gpu_class
    );
    // The decision went out as an Event too.
    let events = kubectl_ok(&[
        "get",
        "events",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.items[*].reason}",
    ])?;
    assert!(events.contains("Placed"), "events: {events}");
    Ok(())
}

#[tokio::test]
async fn the_two_p100s_are_split_across_only_when_no_single_card_that_fits_is_free() -> Result<()> {
    let scene = Scene::without_controller("split").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    // Occupy every card that could hold 20 GiB alone: the V100s and the P40.
    let blockers = r#"apiVersion: v1
kind: Pod
metadata: {name: hold-v100}
spec:
  nodeSelector: {nvidia.com/gpu.product: Tesla-V100-SXM2-32GB}
  containers: [{name: c, image: copyhold/none:0, resources: {limits: {nvidia.com/gpu: "4"}}}]
---
apiVersion: v1
kind: Pod
metadata: {name: hold-p40}
spec:
  nodeSelector: {nvidia.com/gpu.product: Tesla-P40}
  containers: [{name: c, image: copyhold/none:0, resources: {limits: {nvidia.com/gpu: "1"}}}]
"#;
    eventually(Duration::from_secs(30), || async {
        kubectl_ok(&["get", "sa", "default", "-n", &ns.name]).map(|_| ())
    })
    .await?;
    apply(&ns.name, blockers)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for p in ["hold-v100", "hold-p40"] {
        eventually(Duration::from_secs(60), || async {
            let pod = pods.get(p).await?;
            if pod.spec.and_then(|s| s.node_name).is_some() {
                Ok(())
            } else {
                bail!("{p} not bound")
            }
        })
        .await?;
    }
    let _controller = one_controller_for(&ns.name)?;
    apply(&ns.name, &model("split", 18, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let (_, message) = wait_condition(&mds, "split", "Placed", "True").await?;
    let d: Deployment = Api::namespaced(client.clone(), &ns.name)
        .get("split")
        .await?;
    assert_eq!(gpu_limit(&d).as_deref(), Some("2"), "{message}");
    assert_eq!(
        bound_nodes(client, &ns.name, "split", 1).await?,
        vec!["gpu-p100".to_string()]
    );
    Ok(())
}

#[tokio::test]
async fn bf16_compute_is_refused_on_this_fleet_with_no_compatible_gpu() -> Result<()> {
    let scene = Scene::with_controller("bf16").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    let m = model("bf16", 4, 1, "  engine: {kind: vllm}\n").replace("dtype: f16", "dtype: bf16");
    apply(&ns.name, &m)?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let (reason, message) = wait_condition(&mds, "bf16", "Placed", "False").await?;
    assert_eq!(reason, "NoCompatibleGPU", "{message}");
    assert!(
        message.contains("8.0"),
        "the message names the capability needed: {message}"
    );
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    assert!(
        deployments.get_opt("bf16").await?.is_none(),
        "nothing is deployed"
    );
    let state = mds.get("bf16").await?.status.and_then(|s| s.state);
    assert_eq!(state.as_deref(), Some("Unplaceable"));
    let events = kubectl_ok(&[
        "get",
        "events",
        "-n",
        &ns.name,
        "-o",
        "jsonpath={.items[*].reason}",
    ])?;
    assert!(events.contains("NoCompatibleGPU"), "events: {events}");
    Ok(())
}

#[tokio::test]
async fn a_model_too_large_for_any_card_names_the_largest_and_the_bytes_missing() -> Result<()> {
    let scene = Scene::with_controller("huge").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    apply(&ns.name, &model("huge", 400, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let (reason, message) = wait_condition(&mds, "huge", "Placed", "False").await?;
    assert_eq!(reason, "InsufficientVRAM", "{message}");
    assert!(
        message.contains("V100"),
        "names the largest card: {message}"
    );
    Ok(())
}

#[tokio::test]
async fn two_replicas_spread_over_two_nodes() -> Result<()> {
    let scene = Scene::with_controller("spread").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    apply(&ns.name, &model("pair", 18, 2, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "pair", "Placed", "True").await?;
    let nodes: BTreeSet<String> = bound_nodes(client, &ns.name, "pair", 2)
        .await?
        .into_iter()
        .collect();
    assert_eq!(nodes.len(), 2, "replicas share a node: {nodes:?}");
    assert!(
        nodes.iter().all(|n| n == "gpu-v100" || n == "gpu-p40"),
        "{nodes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn drift_is_repaired_and_an_unchanged_object_is_not_rewritten() -> Result<()> {
    let scene = Scene::with_controller("drift").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    apply(&ns.name, &model("steady", 4, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "steady", "Placed", "True").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);

    // Idempotency: let it settle, then several resyncs (every 2 s) and a
    // touch of the object write nothing.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let d0 = deployments.get("steady").await?.resource_version();
    let s0 = services.get("steady").await?.resource_version();
    let m0 = mds.get("steady").await?.resource_version();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        deployments.get("steady").await?.resource_version(),
        d0,
        "Deployment rewritten"
    );
    assert_eq!(
        services.get("steady").await?.resource_version(),
        s0,
        "Service rewritten"
    );
    assert_eq!(
        mds.get("steady").await?.resource_version(),
        m0,
        "status rewritten"
    );

    // Drift of a field we own is restored.
    deployments
        .patch(
            "steady",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
        )
        .await?;
    eventually(Duration::from_secs(30), || async {
        let r = deployments
            .get("steady")
            .await?
            .spec
            .and_then(|s| s.replicas);
        if r == Some(1) {
            Ok(())
        } else {
            bail!("replicas still {r:?}")
        }
    })
    .await?;
    // A deleted Deployment comes back.
    deployments.delete("steady", &Default::default()).await?;
    eventually(Duration::from_secs(30), || async {
        let d = deployments.get("steady").await?;
        if d.metadata.deletion_timestamp.is_none() {
            Ok(())
        } else {
            bail!("still the deleted one")
        }
    })
    .await?;
    Ok(())
}

/// The API server stores quantities in canonical form (`cpu: 0.5` comes
/// back as `500m`, `1.5Gi` as `1536Mi`); the controller compares by value,
/// so a steady Deployment asked with such spellings is never applied again.
#[tokio::test]
async fn a_deployment_whose_quantities_the_server_respelled_is_not_applied_again() -> Result<()> {
    let scene = Scene::with_controller("qty").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    let resources = "    resources:\n      requests: {cpu: \"0.5\", memory: 1.5Gi}\n      limits: {memory: \"2147483648\", cpu: 1000m}\n";
    let manifest = model("respelled", 2, 1, "").replace(
        "  serving: {contextLength: 2048, maxConcurrentSequences: 1}\n",
        &format!("  serving:\n    contextLength: 2048\n    maxConcurrentSequences: 1\n{resources}"),
    );
    apply(&ns.name, &manifest)?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "respelled", "Placed", "True").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let first = deployments.get("respelled").await?;
    let requests = first
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers[0].resources.as_ref())
        .and_then(|r| r.requests.clone())
        .context("the Deployment carries the requests")?;
    // The premise: the server really stored another spelling.
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("500m"));
    // Several resyncs (every 2 s): not one write.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        deployments.get("respelled").await?.resource_version(),
        first.resource_version(),
        "the Deployment was applied again though nothing changed"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_update_keeps_the_previous_deployment() -> Result<()> {
    let scene = Scene::with_controller("keep").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    apply(&ns.name, &model("keep", 4, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "keep", "Placed", "True").await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = deployments.get("keep").await?;
    // Now ask for something no card can hold, and an inconsistent scale.
    apply(
        &ns.name,
        &model(
            "keep",
            400,
            1,
            "  autoscaling: {minReplicas: 3, maxReplicas: 2}\n",
        ),
    )?;
    let (reason, message) = wait_condition(&mds, "keep", "Placed", "False").await?;
    assert_eq!(reason, "InvalidSpec", "{message}");
    assert!(message.contains("minReplicas"), "{message}");
    assert!(message.contains("previous Deployment is kept"), "{message}");
    let after = deployments.get("keep").await?;
    assert_eq!(
        after.resource_version(),
        before.resource_version(),
        "the Deployment was touched"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_scale_reaches_the_deployment() -> Result<()> {
    let scene = Scene::with_controller("kscale").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    apply(&ns.name, &model("small", 2, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "small", "Placed", "True").await?;
    kubectl_ok(&["scale", "-n", &ns.name, "md/small", "--replicas=2"])?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually(Duration::from_secs(30), || async {
        let r = deployments
            .get("small")
            .await?
            .spec
            .and_then(|s| s.replicas);
        if r == Some(2) {
            Ok(())
        } else {
            bail!("replicas {r:?}")
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_standby_controller_takes_over_when_the_leader_is_killed() -> Result<()> {
    let scene = Scene::without_controller("leader").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    let lease_name = format!("copyhold-test-{}", ns.name);
    let args = |id: &'static str| -> Vec<String> {
        [
            "--leader-election=true",
            "--lease-namespace",
            &ns.name,
            "--lease-name",
            &lease_name,
            "--lease-seconds",
            "4",
            "--identity",
            id,
            "--watch-namespace",
            &ns.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a_args = args("controller-a");
    let b_args = args("controller-b");
    let mut a = ControllerProcess::start(&a_args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    eventually(Duration::from_secs(30), || async {
        let h = holder(leases.get(&lease_name).await?);
        if h == "controller-a" {
            Ok(())
        } else {
            bail!("holder {h}")
        }
    })
    .await?;
    let _b = ControllerProcess::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>())?;
    apply(&ns.name, &model("first", 2, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "first", "Placed", "True").await?;
    // Only one acts: the standby still waits.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(holder(leases.get(&lease_name).await?), "controller-a");

    // SIGKILL: no chance to hand the lease back.
    a.kill();
    let killed_at = std::time::Instant::now();
    eventually(Duration::from_secs(30), || async {
        let h = holder(leases.get(&lease_name).await?);
        if h == "controller-b" {
            Ok(())
        } else {
            bail!("holder {h}")
        }
    })
    .await?;
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(4 + 4 + 2),
        "takeover took {took:?} for a 4 s lease"
    );
    apply(&ns.name, &model("second", 2, 1, ""))?;
    wait_condition(&mds, "second", "Placed", "True").await?;
    Ok(())
}

/// A TCP proxy in front of the API server that can stall: once stalled, it
/// holds every byte in both directions on open and new connections, so
/// every call through it hangs without an error (as on a dead link).
struct StallingProxy {
    addr: std::net::SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(upstream: String) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(Self::pump(dr, uw, flag.clone()));
                tokio::spawn(Self::pump(ur, dw, flag.clone()));
            }
        });
        Ok(Self {
            addr,
            stalled,
            task,
        })
    }

    /// Copy `from` to `to`, holding each chunk while stalled.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            while stalled.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    fn stall(&self) {
        self.stalled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A copy of the test kubeconfig whose server is this proxy, at `path`.
    fn kubeconfig(&self, path: &std::path::Path) -> Result<()> {
        let original = std::fs::read_to_string(support::kubeconfig()?)?;
        let server = original
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .context("the kubeconfig names no server")?
            .to_string();
        let proxied = original.replace(&server, &format!("https://{}", self.addr));
        std::fs::write(path, proxied)?;
        Ok(())
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The API server's `host:port` from the test kubeconfig.
fn api_server_address() -> Result<String> {
    let text = std::fs::read_to_string(support::kubeconfig()?)?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .context("the kubeconfig names no server")?;
    Ok(server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string())
}

/// The leader's API connection stalls (every call hangs, nothing fails):
/// it must stop acting, here by exiting, no later than a standby can take
/// the lease over, so two leaders never act at once.
#[tokio::test]
async fn a_leader_whose_api_connection_stalls_stops_before_a_standby_takes_the_lease() -> Result<()>
{
    let scene = Scene::without_controller("stall").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    let lease_name = format!("copyhold-test-{}", ns.name);
    let args = |id: &str| -> Vec<String> {
        [
            "--leader-election=true",
            "--lease-namespace",
            &ns.name,
            "--lease-name",
            &lease_name,
            "--lease-seconds",
            "5",
            "--identity",
            id,
            "--watch-namespace",
            &ns.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let proxy = StallingProxy::start(api_server_address()?).await?;
    let kubeconfig_a = std::env::temp_dir().join(format!("kubeconfig-{}-a", ns.name));
    proxy.kubeconfig(&kubeconfig_a)?;
    let a_args = args("controller-a");
    let mut a = ControllerProcess::start_with(
        &kubeconfig_a,
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    eventually(Duration::from_secs(30), || async {
        let h = holder(leases.get(&lease_name).await?);
        if h == "controller-a" {
            Ok(())
        } else {
            bail!("holder {h}")
        }
    })
    .await?;
    apply(&ns.name, &model("first", 2, 1, ""))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    wait_condition(&mds, "first", "Placed", "True").await?;

    proxy.stall();
    let b_args = args("controller-b");
    let _b = ControllerProcess::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let stalled_at = std::time::Instant::now();
    let mut a_stopped = None;
    let b_leads = loop {
        if a_stopped.is_none() && a.child.try_wait()?.is_some() {
            a_stopped = Some(stalled_at.elapsed());
        }
        if holder(leases.get(&lease_name).await?) == "controller-b" {
            break stalled_at.elapsed();
        }
        if stalled_at.elapsed() > Duration::from_secs(40) {
            bail!("controller-b never took the lease (controller-a stopped: {a_stopped:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = std::fs::remove_file(&kubeconfig_a);
    println!("controller-a stopped after {a_stopped:?}; controller-b leads after {b_leads:?}");
    let a_stopped = a_stopped.with_context(|| {
        format!("controller-a still runs as leader when controller-b took the lease ({b_leads:?} after the stall)")
    })?;
    assert!(a_stopped <= b_leads, "{a_stopped:?} > {b_leads:?}");
    let status = a.child.wait()?;
    assert!(!status.success(), "a lost lease is an error exit: {status}");
    apply(&ns.name, &model("second", 2, 1, ""))?;
    wait_condition(&mds, "second", "Placed", "True").await?;
    Ok(())
}

/// A kubeconfig at `path` for the ServiceAccount `sa` of `ns` (its token
/// in place of the admin's).
async fn service_account_kubeconfig(
    client: &Client,
    ns: &str,
    sa: &str,
    path: &std::path::Path,
) -> Result<()> {
    use k8s_openapi::api::core::v1::Secret;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let token = eventually(Duration::from_secs(30), || async {
        let list = secrets.list(&ListParams::default()).await?;
        list.items
            .iter()
            .filter(|s| {
                s.annotations().get("kubernetes.io/service-account.name") == Some(&sa.to_string())
            })
            .find_map(|s| s.data.as_ref()?.get("token").cloned())
            .context("no token Secret for the ServiceAccount yet")
    })
    .await?;
    let token = String::from_utf8(token.0)?;
    let original = std::fs::read_to_string(support::kubeconfig()?)?;
    let admin = original
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .context("the kubeconfig has no token")?
        .to_string();
    std::fs::write(path, original.replace(&admin, token.trim()))?;
    Ok(())
}

/// A leader whose caches cannot warm (its account may read and write its
/// Lease, nothing else: the Node and Pod lists are refused) keeps renewing
/// while it waits, so a standby never takes a lease that is still held.
#[tokio::test]
async fn a_leader_renews_its_lease_while_its_caches_are_still_warming() -> Result<()> {
    let scene = Scene::without_controller("warm").await?;
    let (client, ns) = (&scene.client, &scene.ns);
    let lease_name = format!("copyhold-test-{}", ns.name);
    support::kubectl_apply(
        Some(&ns.name),
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: lease-only}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: lease-only}
rules:
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: lease-only}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: lease-only}
subjects:
- {kind: ServiceAccount, name: lease-only}
"#,
    )?;
    let kubeconfig_a = std::env::temp_dir().join(format!("kubeconfig-{}-a", ns.name));
    service_account_kubeconfig(client, &ns.name, "lease-only", &kubeconfig_a).await?;
    let args = |id: &str| -> Vec<String> {
        [
            "--leader-election=true",
            "--lease-namespace",
            &ns.name,
            "--lease-name",
            &lease_name,
            "--lease-seconds",
            "4",
            "--identity",
            id,
            "--watch-namespace",
            &ns.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a_args = args("controller-a");
    let mut a = ControllerProcess::start_with(
        &kubeconfig_a,
        &a_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    eventually(Duration::from_secs(30), || async {
        let h = holder(leases.get(&lease_name).await?);
        if h == "controller-a" {
            Ok(())
        } else {
            bail!("holder {h}")
        }
    })
    .await?;
    let b_args = args("controller-b");
    let _b = ControllerProcess::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>())?;
    // Three leases' time: a holder that did not renew would have lost it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let _ = std::fs::remove_file(&kubeconfig_a);
    assert!(
        a.child.try_wait()?.is_none(),
        "controller-a is still running"
    );
    assert_eq!(
        holder(leases.get(&lease_name).await?),
        "controller-a",
        "the standby took the lease of a leader whose caches were warming"
    );
    Ok(())
}

/// Every version of the ModelDeployments of `ns` the API server shows,
/// from the moment this returns until the task is aborted: one per write
/// (only the controller writes them here).
async fn record_versions(
    client: &Client,
    ns: &str,
) -> Result<(
    std::sync::Arc<std::sync::Mutex<Vec<ModelDeployment>>>,
    tokio::task::JoinHandle<()>,
)> {
    use futures::StreamExt;
    use kube::runtime::watcher::{self, Event};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let api: Api<ModelDeployment> = Api::namespaced(client.clone(), ns);
    let into = seen.clone();
    let (listed, is_listed) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut listed = Some(listed);
        let mut stream = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
        while let Some(Ok(event)) = stream.next().await {
            let md = match event {
                Event::InitDone => {
                    if let Some(tx) = listed.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                Event::Apply(md) | Event::InitApply(md) => md,
                _ => continue,
            };
            let mut seen = into.lock().unwrap_or_else(|e| e.into_inner());
            // A relist repeats a version already seen.
            if !seen
                .iter()
                .any(|m: &ModelDeployment| m.resource_version() == md.resource_version())
            {
                seen.push(md);
            }
        }
    });
    is_listed.await.context("the ModelDeployment watch ended")?;
    Ok((seen, task))
}

/// `copyhold bench controller` (issue 19): the API server, not the
/// controller, sets the pace, so placing models asks of it only what
/// changes something. 24 ModelDeployments created at once on six
/// simulated nodes of four T4s each (as in the bench: identical nodes, so
/// which node a replica is expected on is the planner's choice, and the
/// scheduler may bind it elsewhere), each placed, its Pod bound, then left
/// a few resyncs: each has its status written twice at most, once placed
/// and once its Pod is bound to a node. A write that changes nothing is a
/// request, and on this Kubernetes also a new resourceVersion, so another
/// reconcile.
#[tokio::test]
async fn models_placed_at_once_have_their_status_written_at_most_twice_each() -> Result<()> {
    let scene = Scene::with_controller("writes").await?;
    let tag = scene.ns.name.clone();
    let nodes = copyhold::bench::controller::simulated_nodes(&scene.client, &tag, &[4; 6]).await?;
    let result = status_writes_of_models_placed_at_once(&scene, &tag, 24).await;
    copyhold::bench::controller::remove_nodes(&scene.client, &nodes).await;
    result
}

/// Create `count` models at once on the simulated nodes labelled `tag`,
/// wait until each is placed and its node in the status, then a few
/// resyncs; fail when any had its status written more than twice.
async fn status_writes_of_models_placed_at_once(
    scene: &Scene,
    tag: &str,
    count: usize,
) -> Result<()> {
    let (client, ns) = (&scene.client, &scene.ns);
    let (versions, recorder) = record_versions(client, &ns.name).await?;
    let names: Vec<String> = (0..count).map(|i| format!("counted-{i}")).collect();
    let on_the_simulated_nodes =
        format!("  placement: {{nodeSelector: {{copyhold.dev/bench: \"{tag}\"}}}}\n");
    let manifests: Vec<String> = names
        .iter()
        .map(|n| model(n, 4, 1, &on_the_simulated_nodes))
        .collect();
    apply(&ns.name, &manifests.join("---\n"))?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    for name in &names {
        wait_condition(&mds, name, "Placed", "True").await?;
        eventually(Duration::from_secs(60), || async {
            let st = mds.get(name).await?.status.unwrap_or_default();
            if st.nodes.is_empty() {
                bail!("{name}: nodes not yet in status")
            } else {
                Ok(())
            }
        })
        .await?;
    }
    // Several resyncs (every 2 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    recorder.abort();
    let versions = versions.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut report = Vec::new();
    let mut too_many = Vec::new();
    for name in &names {
        let mine: Vec<&ModelDeployment> =
            versions.iter().filter(|m| m.name_any() == *name).collect();
        ensure!(
            mine.first().is_some_and(|m| m.status.is_none()),
            "the first version of {name} seen is not the created one"
        );
        let writes: Vec<String> = mine
            .windows(2)
            .map(|w| {
                format!(
                    "  {} -> {}: {}",
                    w[0].resource_version().unwrap_or_default(),
                    w[1].resource_version().unwrap_or_default(),
                    status_difference(w[0].status.as_ref(), w[1].status.as_ref())
                )
            })
            .collect();
        if writes.len() > 2 {
            too_many.push(format!("{name}: {}", writes.len()));
        }
        report.push(format!("{name}:\n{}", writes.join("\n")));
    }
    println!("status writes after the create:\n{}", report.join("\n"));
    // An error, not a panic: the caller removes the simulated nodes.
    ensure!(
        too_many.is_empty(),
        "more than 2 status writes: {too_many:?}\n{}",
        report.join("\n")
    );
    Ok(())
}

/// What differs between two statuses: the fields, and each condition's
/// fields by type (`Placed.message: … => …`), or `nothing`.
fn status_difference(
    a: Option<&copyhold::resources::ModelDeploymentStatus>,
    b: Option<&copyhold::resources::ModelDeploymentStatus>,
) -> String {
    use serde_json::{Map, Value};
    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
    fn differences(prefix: &str, a: &Map<String, Value>, b: &Map<String, Value>) -> Vec<String> {
        let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                let show = |m: &Map<String, Value>| m.get(k).unwrap_or(&Value::Null).to_string();
                format!("{prefix}{k}: {} => {}", show(a), show(b))
            })
            .collect()
    }
    let by_type = |s: Option<&copyhold::resources::ModelDeploymentStatus>| {
        s.into_iter()
            .flat_map(|s| s.conditions.iter())
            .map(|c| {
                (
                    c.type_.clone(),
                    object(serde_json::to_value(c).unwrap_or_default()),
                )
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let json = |s: Option<&copyhold::resources::ModelDeploymentStatus>| {
        let mut m = object(serde_json::to_value(s).unwrap_or_default());
        m.remove("conditions");
        m
    };
    let mut changed = differences("", &json(a), &json(b));
    let (ca, cb) = (by_type(a), by_type(b));
    let types: BTreeSet<&String> = ca.keys().chain(cb.keys()).collect();
    let none = Map::new();
    for t in types {
        changed.extend(differences(
            &format!("{t}."),
            ca.get(t).unwrap_or(&none),
            cb.get(t).unwrap_or(&none),
        ));
    }
    if changed.is_empty() {
        "nothing".into()
    } else {
        changed.join("; ")
    }
}
