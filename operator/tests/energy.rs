//! An EnergyBudget on the real control plane, with a real `copyhold
//! controller` process and the kubelet stand-in running the Pods of a
//! deferrable ModelDeployment as `copyhold-node` processes that serve
//! `/metrics` (their declared power model makes each draw 100 W idle).
//!
//! Supply lowered below draw → the ModelDeployment is shed to its minimum
//! (status, Event, `kubectl get`); supply restored → scaled back after the
//! dwell, with no oscillation; an HTTP supply endpoint that stops answering
//! → `SupplyStale` and the floor used.
//!
//! The power cap: the controller mounts the admin token Secret into the
//! node's Pod; supply lowered below draw → the node's `GET
//! /admin/power-limit` reports the limit the budget set; supply restored →
//! cleared after the dwell; an engine that restarts gets its limit again;
//! a wrong token → a `PowerCapFailed` Event.
//!
//! Deleting a budget that sheds and caps: its finalizer gives the shed
//! replicas back and clears the node's limit before the budget goes.

#[path = "../../e2e/src/lib.rs"]
#[allow(dead_code)]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use copyhold::resources::{EnergyBudget, ModelDeployment};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt as _};
use support::{
    ChildGuard, FleetLock, KubeletGuard, TestNamespace, create_secret, eventually, install_crds,
    kubectl_ok,
};

/// Deletes the (cluster-scoped) budget when dropped. The controller that
/// would remove its finalizer is gone by then (dropped first): the guard
/// removes it, so no budget is left behind deleting for ever.
struct BudgetGuard(String);

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let _ = support::kubectl(&["delete", "energybudget", &self.0, "--wait=false"]);
        let _ = support::kubectl(&[
            "patch",
            "energybudget",
            &self.0,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ]);
    }
}

/// Pods on the simulated fleet, for a scene that runs a model.
struct Fleet {
    /// The second octet of the Pod IPs, one per test.
    ip: u8,
    /// Creates the nodes' admin token Secret, which the controller mounts
    /// into the Pods.
    admin_token: bool,
}

/// One test's namespace and budget name, the kubelet stand-in (with a
/// fleet), and a controller that acts on that budget only. The fields drop
/// in order: the controller first (the budget guard then removes its
/// finalizer), the kubelet stand-in (stopping its Pods), the budget, the
/// namespace, and last the fleet lock.
struct Scene {
    controller: ChildGuard,
    _kubelet: Option<KubeletGuard>,
    _budget_guard: BudgetGuard,
    ns: TestNamespace,
    _fleet: Option<FleetLock>,
    client: kube::Client,
    budget: String,
    metrics_port: u16,
}

impl Scene {
    async fn start(prefix: &str, fleet: Option<Fleet>) -> Result<Self> {
        let fleet_lock = fleet.as_ref().map(|_| FleetLock::acquire()).transpose()?;
        install_crds().await?;
        let client = support::client().await?;
        let ns = TestNamespace::create(prefix)?;
        let budget = format!("{prefix}-{}", &ns.name[ns.name.len().saturating_sub(8)..]);
        let budget_guard = BudgetGuard(budget.clone());
        let metrics_port = free_port()?;
        let mut controller = Command::new(env!("CARGO_BIN_EXE_copyhold"));
        controller
            .arg("controller")
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--leader-election=false", "--node-device", "cpu"])
            .args(["--resync-seconds", "2", "--watch-namespace", &ns.name])
            // Only this test's budget: another on the shared cluster must not
            // shed or cap this test's models, nor get this controller's finalizer.
            .args(["--budget-selector", &format!("copyhold-test={budget}")])
            .env("KUBECONFIG", support::kubeconfig()?)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null());
        let kubelet = match fleet {
            None => None,
            Some(fleet) => {
                if fleet.admin_token {
                    // In the ModelDeployment's namespace, where the Pods mount it.
                    let token = format!(
                        "tok-{}-{}",
                        std::process::id(),
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)?
                            .subsec_nanos()
                    );
                    create_secret(&ns.name, "copyhold-node-admin", "token", &token)?;
                    controller.args(["--node-admin-token-secret", "copyhold-node-admin"]);
                }
                let node_bin = support::workspace_bin("copyhold-node", "copyhold-node")?;
                let kubelet_bin = support::workspace_bin("copyhold-e2e", "copyhold-kubelet")?;
                // Pod IPs of this run only: a Pod process left by an earlier,
                // failed run must not hold our addresses.
                let ip_prefix = format!("127.{}.{}", fleet.ip, std::process::id() % 250);
                Some(support::start_kubelet(
                    &kubelet_bin,
                    &ns.name,
                    &ip_prefix,
                    &node_bin,
                    prefix,
                )?)
            }
        };
        Ok(Self {
            controller: ChildGuard(controller.spawn()?),
            _kubelet: kubelet,
            _budget_guard: budget_guard,
            ns,
            _fleet: fleet_lock,
            client,
            budget,
            metrics_port,
        })
    }

    /// The ModelDeployment `name` of the tiny model on the P100s of
    /// gpu-p100, each replica drawing 100 W idle (declared); `rest` ends its
    /// spec (priority, replicas).
    fn apply_model(&self, name: &str, rest: &str) -> Result<()> {
        apply(&format!(
            r#"apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  model:
    source: {{hostPath: {{path: {dir}}}}}
    servedName: tiny-llama
  engine:
    env: {{COPYHOLD_POWER_MODEL: "idle=100,busy=150", COPYHOLD_POWER_SENSOR: model}}
  serving: {{contextLength: 256, maxConcurrentSequences: 2}}
  placement: {{gpuProducts: [Tesla-P100-PCIE-16GB]}}
{rest}"#,
            ns = self.ns.name,
            dir = std::fs::canonicalize(support::fixtures().join("tiny-llama"))
                .context("fixtures/tiny-llama")?
                .display()
        ))
    }

    /// Waits for `n` ready replicas of the ModelDeployment `name`.
    async fn wait_ready(&self, name: &str, n: i32) -> Result<()> {
        let mds: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        eventually(Duration::from_secs(120), || async {
            let st = mds.get(name).await?.status.context("no status")?;
            if st.ready_replicas == n {
                Ok(())
            } else {
                bail!("{}/{n} ready ({:?})", st.ready_replicas, st.state)
            }
        })
        .await
    }

    /// Deletes the ModelDeployment `name` and waits for its Pods to go,
    /// while the kubelet stand-in still runs, so no process outlives the test.
    async fn delete_model(&self, name: &str) -> Result<()> {
        kubectl_ok(&["delete", "md", name, "-n", &self.ns.name, "--wait=false"])?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns.name);
        eventually(Duration::from_secs(60), || async {
            let n = pods.list(&Default::default()).await?.items.len();
            if n == 0 {
                Ok(())
            } else {
                bail!("{n} pods left")
            }
        })
        .await
    }
}

fn apply(manifest: &str) -> Result<()> {
    support::kubectl_apply(None, manifest)
}

fn condition(eb: &EnergyBudget, type_: &str) -> Option<(String, String)> {
    eb.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

fn deployment_replicas(d: &Deployment) -> i32 {
    d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(-1)
}

/// A JSON endpoint like an inverter's, on loopback, until dropped.
struct Inverter {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Inverter {
    async fn start(kw: f64) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route(
            "/api/site",
            axum::routing::get(move || async move {
                axum::Json(serde_json::json!({"pv": {"power_kw": kw}}))
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{addr}/api/site"),
            task,
        })
    }

    fn stop(self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_budget_sheds_a_deferrable_model_restores_it_after_the_dwell_and_falls_back_to_the_floor()
-> Result<()> {
    let fleet = Fleet {
        ip: 102,
        admin_token: false,
    };
    let scene = Scene::start("energy", Some(fleet)).await?;
    let (client, ns, budget) = (&scene.client, &scene.ns, scene.budget.clone());

    // Two replicas, one per P100, shed down to one.
    scene.apply_model(
        "batch",
        "  priority: deferrable\n  replicas: 2\n  autoscaling: {minReplicas: 1, maxReplicas: 2}\n",
    )?;
    let eb_manifest = |supply: &str| {
        format!(
            r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {budget}, labels: {{copyhold-test: {budget}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: gpu-p100}}
  ceilingWatts: 10000
  marginPercent: 0
  supply:
{supply}
  policy:
    powerCap: {{enabled: false}}
    shed: [deferrable]
    defer: false
    hysteresisPercent: 10
    dwell: 8s
  evaluationInterval: 1s
"#
        )
    };
    let static_supply = |w: u32| format!("    static: {{watts: {w}}}\n    floorWatts: 100");

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let ebs: Api<EnergyBudget> = Api::all(client.clone());
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let key = format!("{}/batch", ns.name);

    scene.wait_ready("batch", 2).await?;
    apply(&eb_manifest(&static_supply(1000)))?;

    // Both replicas measured: 200 W, within the 1000 W allowance.
    eventually(Duration::from_secs(60), || async {
        let eb = ebs.get(&budget).await?;
        let st = eb.status.clone().context("no status")?;
        let draw = st.draw_watts.unwrap_or(0.0);
        if (draw - 200.0).abs() < 1.0
            && st.covered == vec![key.clone()]
            && condition(&eb, "WithinBudget").map(|c| c.0).as_deref() == Some("True")
        {
            Ok(())
        } else {
            bail!(
                "draw {draw}, covered {:?}, unread {:?}",
                st.covered,
                st.nodes_without_reading
            )
        }
    })
    .await?;

    // Supply below draw: the deferrable model is shed to its minimum.
    apply(&eb_manifest(&static_supply(150)))?;
    eventually(Duration::from_secs(60), || async {
        let md = mds.get("batch").await?;
        let st = md.status.clone().context("no status")?;
        let shed = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Shed")
            .map(|c| (c.status.as_str(), c.reason.as_str()));
        let dep = deployment_replicas(&deps.get("batch").await?);
        if shed == Some(("True", "ShedByEnergyBudget"))
            && st.shed_by.as_deref() == Some(budget.as_str())
            && st.state.as_deref() == Some("Shed")
            && dep == 1
        {
            Ok(())
        } else {
            bail!(
                "shed {shed:?}, state {:?}, deployment replicas {dep}",
                st.state
            )
        }
    })
    .await?;
    let eb = ebs.get(&budget).await?;
    let st = eb.status.clone().context("status")?;
    assert_eq!(st.step, 2, "{st:?}");
    assert_eq!(st.shed, vec![key.clone()]);
    assert_eq!(
        condition(&eb, "Shedding"),
        Some(("True".into(), "ShedDeferrable".into()))
    );
    // What a person sees.
    let get_eb = kubectl_ok(&["get", "eb", &budget])?;
    assert!(get_eb.contains("Shedding"), "{get_eb}");
    let get_md = kubectl_ok(&["get", "md", "batch", "-n", &ns.name])?;
    assert!(get_md.contains("Shed"), "{get_md}");
    let events = eventually(Duration::from_secs(30), || async {
        let ev = kubectl_ok(&[
            "get",
            "events",
            "-A",
            "--field-selector",
            &format!("involvedObject.name={budget}"),
        ])?;
        if ev.contains("StepDown") {
            Ok(ev)
        } else {
            bail!("no StepDown event yet: {ev}")
        }
    })
    .await?;
    assert!(events.contains("StepDown"), "{events}");
    let md_events = kubectl_ok(&[
        "get",
        "events",
        "-n",
        &ns.name,
        "--field-selector",
        "involvedObject.name=batch",
    ])?;
    assert!(md_events.contains("Shed"), "{md_events}");

    // Shed, the draw is 100 W under the 150 W allowance, but undoing the
    // shedding would bring back 100 W: the ladder stays (no oscillation).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let st = ebs.get(&budget).await?.status.context("status")?;
    assert_eq!((st.step, st.transitions), (2, 1), "{st:?}");

    // Supply restored: back to both replicas, after the dwell, once.
    apply(&eb_manifest(&static_supply(1000)))?;
    let restored_at = Instant::now();
    eventually(Duration::from_secs(60), || async {
        let st = ebs.get(&budget).await?.status.context("status")?;
        if st.step == 0 {
            Ok(())
        } else {
            bail!("step {}", st.step)
        }
    })
    .await?;
    let waited = restored_at.elapsed();
    assert!(
        waited >= Duration::from_secs(7),
        "climbed back after {waited:?}, before the 8 s dwell"
    );
    eventually(Duration::from_secs(60), || async {
        let md = mds.get("batch").await?;
        let st = md.status.clone().context("status")?;
        let dep = deployment_replicas(&deps.get("batch").await?);
        if dep == 2 && st.shed_by.is_none() && st.ready_replicas == 2 {
            Ok(())
        } else {
            bail!("deployment replicas {dep}, shed by {:?}", st.shed_by)
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let st = ebs.get(&budget).await?.status.context("status")?;
    assert_eq!((st.step, st.transitions), (0, 2), "no oscillation: {st:?}");

    // An inverter's HTTP endpoint: 1 kW, then it goes away.
    let inverter = Inverter::start(1.0).await?;
    let http_supply = format!(
        "    http: {{url: \"{}\", jsonPointer: /pv/power_kw, scale: 1000}}\n    maxAge: 3s\n    failSafeDecay: 4s\n    floorWatts: 120",
        inverter.url
    );
    apply(&eb_manifest(&http_supply))?;
    eventually(Duration::from_secs(30), || async {
        let eb = ebs.get(&budget).await?;
        let st = eb.status.clone().context("status")?;
        if st.supply_watts == Some(1000.0)
            && condition(&eb, "SupplyStale").map(|c| c.0).as_deref() == Some("False")
        {
            Ok(())
        } else {
            bail!(
                "supply {:?}, {:?}",
                st.supply_watts,
                condition(&eb, "SupplyStale")
            )
        }
    })
    .await?;
    inverter.stop();
    let eb = eventually(Duration::from_secs(60), || async {
        let eb = ebs.get(&budget).await?;
        let st = eb.status.clone().context("status")?;
        if st.supply_watts == Some(120.0) {
            Ok(eb)
        } else {
            bail!(
                "supply {:?}, {:?}",
                st.supply_watts,
                condition(&eb, "SupplyStale")
            )
        }
    })
    .await?;
    assert_eq!(
        condition(&eb, "SupplyStale"),
        Some(("True".into(), "Unreachable".into()))
    );
    let st = eb.status.context("status")?;
    assert_eq!(st.allowance_watts, Some(120.0));
    assert_eq!(
        st.last_good_supply_watts,
        Some(1000.0),
        "nothing stored is lost"
    );
    let ev = kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        &format!("involvedObject.name={budget},reason=SupplyStale"),
    ])?;
    assert!(ev.contains("SupplyStale"), "{ev}");
    // The floor is below the draw: the model is shed again.
    eventually(Duration::from_secs(30), || async {
        let dep = deployment_replicas(&deps.get("batch").await?);
        if dep == 1 {
            Ok(())
        } else {
            bail!("deployment replicas {dep}")
        }
    })
    .await?;

    scene.delete_model("batch").await?;
    Ok(())
}

/// The node's `GET /admin/power-limit`: the limit in force and how.
async fn node_limit(http: &reqwest::Client, base: &str) -> Result<(Option<f64>, String)> {
    let v: serde_json::Value = http
        .get(format!("{base}/admin/power-limit"))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((
        v["watts"].as_f64(),
        v["enforcement"].as_str().unwrap_or_default().to_string(),
    ))
}

/// The pid of the engine process the kubelet stand-in runs for the Pod at
/// `ip` (its command line names `node_bin` and `--host ip`).
fn engine_pid(node_bin: &std::path::Path, ip: &str) -> Option<u32> {
    let bin = node_bin.to_string_lossy();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let host = args.windows(2).any(|w| w[0] == "--host" && w[1] == ip);
        (args.first().is_some_and(|a| *a == bin) && host).then_some(pid)
    })
}

/// A free loopback port (for the controller's /metrics).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// This budget's Events of `reason`, as kubectl prints them.
fn budget_events(budget: &str, reason: &str) -> Result<String> {
    kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        &format!("involvedObject.name={budget},reason={reason}"),
    ])
}

#[tokio::test]
async fn a_power_cap_reaches_the_node_with_the_mounted_token_is_lifted_after_the_dwell_and_a_wrong_token_is_an_event()
-> Result<()> {
    let fleet = Fleet {
        ip: 103,
        admin_token: true,
    };
    let mut scene = Scene::start("energycap", Some(fleet)).await?;
    let (client, ns, budget) = (&scene.client, &scene.ns, scene.budget.clone());
    let node_bin = support::workspace_bin("copyhold-node", "copyhold-node")?;
    let metrics_port = scene.metrics_port;

    // A wrong admin token, besides the scene's right one.
    create_secret(&ns.name, "not-the-admin-token", "token", "wrong")?;

    // One replica.
    scene.apply_model("capped", "  priority: standard\n  replicas: 1\n")?;
    let eb_manifest = |watts: u32, token_secret: &str| {
        format!(
            r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {budget}, labels: {{copyhold-test: {budget}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: gpu-p100}}
  ceilingWatts: 10000
  marginPercent: 0
  supply:
    static: {{watts: {watts}}}
    floorWatts: 50
  policy:
    powerCap: {{enabled: true, minPercent: 60{token_secret}}}
    shed: []
    defer: false
    hysteresisPercent: 10
    dwell: 8s
  evaluationInterval: 1s
"#
        )
    };

    let ebs: Api<EnergyBudget> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    scene.wait_ready("capped", 1).await?;
    // The Pod mounts the token Secret read-only and names it to the node.
    let dep = deps.get("capped").await?;
    let pod_spec = dep
        .spec
        .and_then(|s| s.template.spec)
        .context("pod template")?;
    let secret = pod_spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find_map(|v| v.secret)
        .context("no secret volume")?;
    assert_eq!(secret.secret_name.as_deref(), Some("copyhold-node-admin"));
    assert_eq!(secret.default_mode, Some(0o400));
    let args = pod_spec.containers[0].args.clone().unwrap_or_default();
    assert!(
        args.join(" ")
            .contains("--admin-token-file /var/run/copyhold/admin/token"),
        "{args:?}"
    );
    let pod = pods
        .list(&kube::api::ListParams::default().labels("copyhold.dev/model-deployment=capped"))
        .await?
        .items
        .into_iter()
        .next()
        .context("no pod")?;
    let ip = pod.status.and_then(|s| s.pod_ip).context("pod has no IP")?;
    let base = format!("http://{ip}:{}", copyhold::serving::workload::ENGINE_PORT);
    assert_eq!(node_limit(&http, &base).await?, (None, "none".into()));
    let node: k8s_openapi::api::core::v1::Node =
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
            .get("gpu-p100")
            .await?;
    let rated = copyhold::energy::draw::rated_per_gpu(&node);
    assert!(rated > 0.0, "gpu-p100's GPUs have a rated power");

    // Plenty of supply: within budget, no limit.
    apply(&eb_manifest(1000, ""))?;
    eventually(Duration::from_secs(60), || async {
        let eb = ebs.get(&budget).await?;
        let st = eb.status.clone().context("no status")?;
        let draw = st.draw_watts.unwrap_or(0.0);
        if (draw - 100.0).abs() < 1.0
            && st.step == 0
            && condition(&eb, "WithinBudget").map(|c| c.0).as_deref() == Some("True")
        {
            Ok(())
        } else {
            bail!("draw {draw}, step {}", st.step)
        }
    })
    .await?;

    // Supply below draw: step 1, the node is capped with the mounted token.
    apply(&eb_manifest(95, ""))?;
    let (watts, enforcement) = eventually(Duration::from_secs(60), || async {
        let st = ebs.get(&budget).await?.status.context("status")?;
        let (w, how) = node_limit(&http, &base).await?;
        match w {
            Some(w) if st.step == 1 => Ok((w, how)),
            _ => bail!("step {}, node limit {w:?}", st.step),
        }
    })
    .await?;
    assert!(
        watts >= (0.6 * rated).floor() && watts <= rated,
        "limit {watts} W outside [60 %, 100 %] of {rated} W"
    );
    assert_eq!(enforcement, "pacing", "no NVML here: the engine paces");
    let eb = ebs.get(&budget).await?;
    let st = eb.status.clone().context("status")?;
    assert_eq!(
        (st.state.as_deref(), st.transitions),
        (Some("PowerCapped"), 1),
        "{st:?}"
    );
    assert_eq!(
        condition(&eb, "WithinBudget").map(|c| c.1).as_deref(),
        Some("OverAllowance")
    );
    let get_eb = kubectl_ok(&["get", "eb", &budget])?;
    assert!(get_eb.contains("PowerCapped"), "{get_eb}");
    let ev = eventually(Duration::from_secs(30), || async {
        let ev = budget_events(&budget, "StepDown")?;
        if ev.contains("StepDown") {
            Ok(ev)
        } else {
            bail!("no StepDown event yet")
        }
    })
    .await?;
    assert!(ev.contains("StepDown"), "{ev}");
    let metrics = eventually(Duration::from_secs(10), || async {
        let text = http
            .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let line = format!("copyhold_energy_ladder_step{{budget=\"{budget}\"}} 1");
        if text.contains(&line) {
            Ok(text)
        } else {
            bail!("no `{line}`")
        }
    })
    .await?;
    assert!(
        metrics.contains(&format!(
            "copyhold_energy_transitions_total{{budget=\"{budget}\",direction=\"Down\"}} 1"
        )),
        "{metrics}"
    );
    let failed = budget_events(&budget, "PowerCapFailed")?;
    assert!(!failed.contains("PowerCapFailed"), "{failed}");

    // The engine restarts (the kubelet stand-in restarts the killed
    // process as the same Pod): it comes back without a limit, says so in
    // its /metrics, and the budget sets the limit again.
    let pid = engine_pid(&node_bin, &ip).context("the engine's process")?;
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    let again = eventually(Duration::from_secs(90), || async {
        let (w, _) = node_limit(&http, &base).await?;
        match (engine_pid(&node_bin, &ip), w) {
            (Some(new), Some(w)) if new != pid => Ok(w),
            (p, w) => bail!("engine pid {p:?}, limit {w:?}"),
        }
    })
    .await?;
    assert!(
        again >= (0.6 * rated).floor() && again <= rated,
        "limit {again} W"
    );

    // Supply restored: the limit is lifted after the dwell.
    apply(&eb_manifest(1000, ""))?;
    let restored_at = Instant::now();
    eventually(Duration::from_secs(60), || async {
        let st = ebs.get(&budget).await?.status.context("status")?;
        let (w, how) = node_limit(&http, &base).await?;
        if st.step == 0 && w.is_none() && how == "none" {
            Ok(())
        } else {
            bail!("step {}, node limit {w:?} ({how})", st.step)
        }
    })
    .await?;
    let waited = restored_at.elapsed();
    assert!(
        waited >= Duration::from_secs(7),
        "lifted after {waited:?}, before the 8 s dwell"
    );
    let st = ebs.get(&budget).await?.status.context("status")?;
    assert_eq!(st.transitions, 2, "{st:?}");
    assert!(budget_events(&budget, "StepUp")?.contains("StepUp"));

    // A wrong token: the node refuses, a PowerCapFailed Event says so, the
    // limit stays unset, and the controller goes on evaluating.
    apply(&eb_manifest(
        95,
        &format!(
            ", adminTokenSecret: {{name: not-the-admin-token, namespace: {}, key: token}}",
            ns.name
        ),
    ))?;
    let ev = eventually(Duration::from_secs(60), || async {
        // (The engine's restart above may have left one of its own.)
        let ev = budget_events(&budget, "PowerCapFailed")?;
        if ev.contains("401") {
            Ok(ev)
        } else {
            bail!("no PowerCapFailed event for the wrong token yet: {ev}")
        }
    })
    .await?;
    assert!(ev.contains("missing or wrong bearer token"), "{ev}");
    assert_eq!(node_limit(&http, &base).await?.0, None);
    let before = ebs
        .get(&budget)
        .await?
        .status
        .and_then(|s| s.last_evaluated)
        .context("evaluated")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = ebs.get(&budget).await?.status.context("status")?;
    assert!(
        st.last_evaluated.as_ref().is_some_and(|t| t.0 > before.0),
        "{st:?}"
    );
    assert_eq!(st.step, 1, "{st:?}");
    assert!(
        scene.controller.0.try_wait()?.is_none(),
        "the controller is still running"
    );
    assert_eq!(node_limit(&http, &base).await?.0, None);

    scene.delete_model("capped").await?;
    Ok(())
}

#[tokio::test]
async fn a_config_map_supply_follows_its_key_and_falls_back_to_the_floor_on_a_non_numeric_value()
-> Result<()> {
    // Covers no node (its selector matches none), so it acts on nothing of
    // anyone else's and needs no GPUs: only the supply is under test.
    let scene = Scene::start("energycm", None).await?;
    let (client, ns, budget) = (&scene.client, &scene.ns, scene.budget.clone());
    let cm = |watts: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: inverter, namespace: {}}}\ndata: {{watts: {watts:?}}}\n",
            ns.name
        )
    };
    apply(&cm("800"))?;
    apply(&format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {budget}, labels: {{copyhold-test: {budget}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: no-such-node-{budget}}}
  ceilingWatts: 10000
  marginPercent: 20
  supply:
    configMap: {{namespace: {ns}, name: inverter, key: watts}}
    maxAge: 2s
    failSafeDecay: 2s
    floorWatts: 120
  policy:
    powerCap: {{enabled: false}}
    shed: []
    defer: false
    dwell: 8s
  evaluationInterval: 1s
"#,
        ns = ns.name
    ))?;
    let ebs: Api<EnergyBudget> = Api::all(client.clone());
    let supply_is = |watts: f64, stale: &'static str, reason: &'static str| {
        let ebs = ebs.clone();
        let budget = budget.clone();
        async move {
            eventually(Duration::from_secs(60), || async {
                let eb = ebs.get(&budget).await?;
                let st = eb.status.clone().context("no status")?;
                let cond = condition(&eb, "SupplyStale");
                if st.supply_watts == Some(watts)
                    && cond == Some((stale.to_string(), reason.to_string()))
                {
                    Ok(eb)
                } else {
                    bail!("supply {:?}, SupplyStale {cond:?}", st.supply_watts)
                }
            })
            .await
        }
    };

    // The key is read; a patch of it is followed.
    let eb = supply_is(800.0, "False", "Fresh").await?;
    assert_eq!(eb.status.and_then(|s| s.allowance_watts), Some(640.0));
    kubectl_ok(&[
        "patch",
        "configmap",
        "inverter",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"data":{"watts":"650"}}"#,
    ])?;
    supply_is(650.0, "False", "Fresh").await?;

    // Not a number: SupplyStale naming the cause, an Event, the last good
    // reading kept, and the supply decays to the floor.
    kubectl_ok(&[
        "patch",
        "configmap",
        "inverter",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"data":{"watts":"lots"}}"#,
    ])?;
    let eb = supply_is(120.0, "True", "NotNumeric").await?;
    let st = eb.status.context("status")?;
    assert_eq!(
        st.last_good_supply_watts,
        Some(650.0),
        "nothing stored is lost"
    );
    assert_eq!(st.allowance_watts, Some(96.0), "the floor less the margin");
    let ev = eventually(Duration::from_secs(30), || async {
        let ev = budget_events(&budget, "SupplyStale")?;
        if ev.contains("not a number") {
            Ok(ev)
        } else {
            bail!("no SupplyStale event yet: {ev}")
        }
    })
    .await?;
    assert!(ev.contains("lots"), "{ev}");

    // A good value again: fresh at once.
    kubectl_ok(&[
        "patch",
        "configmap",
        "inverter",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"data":{"watts":"700"}}"#,
    ])?;
    supply_is(700.0, "False", "Fresh").await?;

    // The ConfigMap gone: its own reason.
    kubectl_ok(&["delete", "configmap", "inverter", "-n", &ns.name])?;
    supply_is(120.0, "True", "ConfigMapUnreadable").await?;
    Ok(())
}

#[tokio::test]
async fn deleting_a_budget_that_sheds_and_caps_gives_the_replicas_back_and_clears_the_limit()
-> Result<()> {
    let fleet = Fleet {
        ip: 104,
        admin_token: true,
    };
    let scene = Scene::start("energyfin", Some(fleet)).await?;
    let (client, ns, budget) = (&scene.client, &scene.ns, scene.budget.clone());

    // Two replicas, one per P100, shed down to one.
    scene.apply_model(
        "batch",
        "  priority: deferrable\n  replicas: 2\n  autoscaling: {minReplicas: 1, maxReplicas: 2}\n",
    )?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let ebs: Api<EnergyBudget> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    scene.wait_ready("batch", 2).await?;

    // 95 W of supply for 200 W of draw: capped, and shed to one replica.
    apply(&format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {budget}, labels: {{copyhold-test: {budget}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: gpu-p100}}
  ceilingWatts: 10000
  marginPercent: 0
  supply:
    static: {{watts: 95}}
    floorWatts: 50
  policy:
    powerCap: {{enabled: true, minPercent: 60}}
    shed: [deferrable]
    defer: false
    hysteresisPercent: 10
    dwell: 8s
  evaluationInterval: 1s
"#
    ))?;
    let pod_bases = || async {
        let list = pods
            .list(&kube::api::ListParams::default().labels("copyhold.dev/model-deployment=batch"))
            .await?;
        Ok::<_, anyhow::Error>(
            list.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.status.and_then(|s| s.pod_ip))
                .map(|ip| format!("http://{ip}:{}", copyhold::serving::workload::ENGINE_PORT))
                .collect::<Vec<_>>(),
        )
    };
    let capped = eventually(Duration::from_secs(90), || async {
        let st = ebs.get(&budget).await?.status.context("status")?;
        let md = mds.get("batch").await?;
        let ann = md.metadata.annotations.clone().unwrap_or_default();
        let dep = deployment_replicas(&deps.get("batch").await?);
        let bases = pod_bases().await?;
        let mut limited = Vec::new();
        for b in &bases {
            if let (Some(w), _) = node_limit(&http, b).await? {
                limited.push((b.clone(), w));
            }
        }
        if st.step == 2
            && ann.get(copyhold::serving::workload::SHED_BY_ANNOTATION) == Some(&budget)
            && ann.get(copyhold::serving::workload::SHED_TO_ANNOTATION).map(String::as_str) == Some("1")
            && dep == 1
            && bases.len() == 1
            && limited.len() == 1
        {
            Ok(limited.remove(0))
        } else {
            bail!(
                "step {}, annotations {ann:?}, deployment replicas {dep}, pods {bases:?}, limited {limited:?}",
                st.step
            )
        }
    })
    .await?;
    let (base, watts) = capped;
    assert!(watts > 0.0, "limit {watts}");
    let eb = ebs.get(&budget).await?;
    assert!(
        eb.metadata
            .finalizers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|f| f == "copyhold.dev/energy-budget"),
        "{:?}",
        eb.metadata.finalizers
    );

    // A budget the controller's selector does not match is never touched.
    let other = format!("{budget}-other");
    let _other_guard = BudgetGuard(other.clone());
    apply(&format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {other}}}
spec:
  nodeSelector: {{copyhold-test: nothing}}
  ceilingWatts: 1000
  supply:
    static: {{watts: 1000}}
"#
    ))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let untouched = ebs.get(&other).await?;
    assert!(
        untouched.metadata.finalizers.is_none(),
        "{:?}",
        untouched.metadata
    );

    // Deleted: the finalizer undoes both, then lets the budget go.
    kubectl_ok(&["delete", "energybudget", &budget, "--wait=false"])?;
    eventually(Duration::from_secs(60), || async {
        match ebs.get_opt(&budget).await? {
            None => Ok(()),
            Some(eb) => bail!(
                "still there: finalizers {:?}, deleting since {:?}",
                eb.metadata.finalizers,
                eb.metadata.deletion_timestamp
            ),
        }
    })
    .await?;
    let md = mds.get("batch").await?;
    let ann = md.metadata.annotations.clone().unwrap_or_default();
    assert!(
        !ann.contains_key(copyhold::serving::workload::SHED_BY_ANNOTATION)
            && !ann.contains_key(copyhold::serving::workload::SHED_TO_ANNOTATION),
        "{ann:?}"
    );
    assert_eq!(node_limit(&http, &base).await?, (None, "none".into()));
    eventually(Duration::from_secs(120), || async {
        let dep = deployment_replicas(&deps.get("batch").await?);
        let st = mds.get("batch").await?.status.context("no status")?;
        if dep == 2 && st.ready_replicas == 2 && st.shed_by.is_none() {
            Ok(())
        } else {
            bail!(
                "deployment replicas {dep}, {}/2 ready, shed by {:?}",
                st.ready_replicas,
                st.shed_by
            )
        }
    })
    .await?;
    for b in pod_bases().await? {
        assert_eq!(node_limit(&http, &b).await?.0, None, "{b}");
    }
    let released = eventually(Duration::from_secs(30), || async {
        let ev = budget_events(&budget, "Released")?;
        if ev.contains("Released") {
            Ok(ev)
        } else {
            bail!("no Released event yet")
        }
    })
    .await?;
    assert!(
        released.contains(&format!("{}/batch", ns.name)),
        "{released}"
    );
    let failed = budget_events(&budget, "PowerCapFailed")?;
    assert!(!failed.contains("PowerCapFailed"), "{failed}");

    scene.delete_model("batch").await?;
    Ok(())
}

/// A Prometheus and an inverter's JSON endpoint on loopback whose readings
/// (800 W) carry a time `age` seconds before the moment they are fetched.
struct TimedSource {
    url: String,
    age: std::sync::Arc<std::sync::atomic::AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

impl TimedSource {
    async fn start(age_seconds: i64) -> Result<Self> {
        let age = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(age_seconds));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (a1, a2) = (age.clone(), age.clone());
        let app = axum::Router::new()
            .route(
                "/api/v1/query",
                axum::routing::get(move || {
                    let at = taken_at(&a1);
                    async move {
                        axum::Json(serde_json::json!({"status": "success", "data": {
                            "resultType": "vector",
                            "result": [{"metric": {}, "value": [at.as_millisecond() as f64 / 1000.0, "800"]}]
                        }}))
                    }
                }),
            )
            .route(
                "/api/site",
                axum::routing::get(move || {
                    let at = taken_at(&a2);
                    async move {
                        axum::Json(serde_json::json!({"pv": {"power_kw": 0.8, "at": at.to_string()}}))
                    }
                }),
            );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{addr}"),
            age,
            task,
        })
    }

    fn set_age(&self, seconds: i64) {
        self.age
            .store(seconds, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for TimedSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Now less `age` seconds.
fn taken_at(age: &std::sync::atomic::AtomicI64) -> jiff::Timestamp {
    let age = age.load(std::sync::atomic::Ordering::Relaxed);
    jiff::Timestamp::now() - jiff::SignedDuration::from_secs(age)
}

/// An EnergyBudget `name` selected by the scene's controller, covering no
/// node, reading `supply` (800 W when fresh), trusting readings for 30 s.
fn timed_budget(name: &str, selector: &str, supply: &str) -> String {
    format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {name}, labels: {{copyhold-test: {selector}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: no-such-node-{name}}}
  ceilingWatts: 10000
  marginPercent: 20
  supply:
    {supply}
    maxAge: 30s
    failSafeDecay: 2s
    floorWatts: 120
  policy:
    powerCap: {{enabled: false}}
    shed: []
    defer: false
    dwell: 8s
  evaluationInterval: 1s
"#
    )
}

/// Waits until budget `name` uses `watts` with `SupplyStale` = `stale` /
/// `reason`; returns it.
async fn supply_of(
    ebs: &Api<EnergyBudget>,
    name: &str,
    watts: f64,
    stale: &str,
    reason: &str,
) -> Result<EnergyBudget> {
    eventually(Duration::from_secs(60), || async {
        let eb = ebs.get(name).await?;
        let st = eb.status.clone().context("no status")?;
        let cond = condition(&eb, "SupplyStale");
        if st.supply_watts == Some(watts) && cond == Some((stale.to_string(), reason.to_string())) {
            Ok(eb)
        } else {
            bail!("{name}: supply {:?}, SupplyStale {cond:?}", st.supply_watts)
        }
    })
    .await
}

/// Freshness follows the reading's own time (the Prometheus sample's, a
/// timestamp in the JSON or in the ConfigMap), not when it was fetched: an
/// hour-old reading, fetched every second, is stale and the floor is used.
#[tokio::test]
async fn a_supply_reading_with_an_old_timestamp_is_stale_though_just_fetched() -> Result<()> {
    let scene = Scene::start("energyts", None).await?;
    let (client, ns, budget) = (&scene.client, &scene.ns, scene.budget.clone());
    let (http_budget, cm_budget) = (format!("{budget}-http"), format!("{budget}-cm"));
    let _guards = (
        BudgetGuard(http_budget.clone()),
        BudgetGuard(cm_budget.clone()),
    );
    let source = TimedSource::start(3600).await?;
    let ebs: Api<EnergyBudget> = Api::all(client.clone());

    // Prometheus: the sample's time.
    apply(&timed_budget(
        &budget,
        &budget,
        &format!(
            "prometheus: {{url: \"{}\", query: solar_watts}}",
            source.url
        ),
    ))?;
    let eb = supply_of(&ebs, &budget, 120.0, "True", "Stale").await?;
    let observed = eb
        .status
        .and_then(|s| s.supply_observed_at)
        .context("the reading is kept")?;
    let age = jiff::Timestamp::now().duration_since(observed.0);
    assert!(
        age >= jiff::SignedDuration::from_secs(3590),
        "observed at the sample's time, not the fetch: {age:?} old"
    );

    // HTTP JSON (a timestamp at a pointer) and a ConfigMap (a timestamp key).
    let old = taken_at(&std::sync::atomic::AtomicI64::new(3600)).to_string();
    let cm = |at: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: inverter, namespace: {}}}\ndata: {{watts: \"800\", observedAt: {at:?}}}\n",
            ns.name
        )
    };
    apply(&cm(&old))?;
    apply(&timed_budget(
        &http_budget,
        &budget,
        &format!(
            "http: {{url: \"{}/api/site\", jsonPointer: /pv/power_kw, scale: 1000, timestampPointer: /pv/at}}",
            source.url
        ),
    ))?;
    apply(&timed_budget(
        &cm_budget,
        &budget,
        &format!(
            "configMap: {{namespace: {}, name: inverter, key: watts, timestampKey: observedAt}}",
            ns.name
        ),
    ))?;
    supply_of(&ebs, &http_budget, 120.0, "True", "Stale").await?;
    supply_of(&ebs, &cm_budget, 120.0, "True", "Stale").await?;

    // Fresh timestamps: the readings are used.
    source.set_age(0);
    apply(&cm(&jiff::Timestamp::now().to_string()))?;
    for name in [&budget, &http_budget, &cm_budget] {
        supply_of(&ebs, name, 800.0, "False", "Fresh").await?;
    }
    Ok(())
}

/// An EnergyBudget `name` over gpu-p100, selected by the scene's
/// controller, shedding deferrable models when `supply` watts fall short.
fn overlapping_budget(name: &str, selector: &str, supply: u32) -> String {
    format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {name}, labels: {{copyhold-test: {selector}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: gpu-p100}}
  ceilingWatts: 10000
  marginPercent: 0
  supply:
    static: {{watts: {supply}}}
    floorWatts: 100
  policy:
    powerCap: {{enabled: false}}
    shed: [deferrable]
    defer: false
    hysteresisPercent: 10
    dwell: 3s
  evaluationInterval: 1s
"#
    )
}

/// Two budgets over the same nodes and model: one of them governs it (the
/// stricter; between equals the first by name), with no `shed-by`
/// ping-pong between them; both name the overlap in a condition; and when
/// the governing budget lets go while the other still sheds, it hands the
/// model over: the Deployment is never scaled back up in between.
#[tokio::test]
async fn two_budgets_over_one_model_agree_on_one_governor_name_the_overlap_and_hand_over_without_a_gap()
-> Result<()> {
    use copyhold::serving::workload::SHED_BY_ANNOTATION;
    let fleet = Fleet {
        ip: 105,
        admin_token: false,
    };
    let scene = Scene::start("overlap", Some(fleet)).await?;
    let (client, ns, selector) = (&scene.client, &scene.ns, scene.budget.clone());
    let (first, second) = (format!("{selector}-a"), format!("{selector}-b"));
    let _guards = (BudgetGuard(first.clone()), BudgetGuard(second.clone()));
    scene.apply_model(
        "batch",
        "  priority: deferrable\n  replicas: 2\n  autoscaling: {minReplicas: 1, maxReplicas: 2}\n",
    )?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    let ebs: Api<EnergyBudget> = Api::all(client.clone());
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let key = format!("{}/batch", ns.name);
    scene.wait_ready("batch", 2).await?;
    // Both supplies are short of even the shed draw: both budgets shed
    // the model, for as long as the test runs.
    apply(&overlapping_budget(&second, &selector, 50))?;
    apply(&overlapping_budget(&first, &selector, 50))?;

    let shed_by = || async {
        let md = mds.get("batch").await?;
        Ok::<_, anyhow::Error>(md.annotations().get(SHED_BY_ANNOTATION).cloned())
    };
    eventually(Duration::from_secs(60), || async {
        let dep = deployment_replicas(&deps.get("batch").await?);
        let by = shed_by().await?;
        if dep == 1 && by.as_deref() == Some(first.as_str()) {
            Ok(())
        } else {
            bail!("deployment replicas {dep}, shed by {by:?}")
        }
    })
    .await?;
    // Ten seconds, ten evaluations of each: the governor stays put. A
    // watch sees every write, however brief.
    let holders = shed_by_seen(&mds, "batch", Duration::from_secs(10)).await?;
    assert_eq!(
        holders.into_iter().collect::<Vec<_>>(),
        vec![Some(first.clone())],
        "shed-by changed hands"
    );
    for (me, other) in [(&first, &second), (&second, &first)] {
        let eb = ebs.get(me).await?;
        let (value, _) = condition(&eb, "Overlapping").context("no Overlapping condition")?;
        assert_eq!(value, "True", "{me}");
        let c = eb
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let msg = c
            .iter()
            .find(|c| c.type_ == "Overlapping")
            .map(|c| c.message.clone());
        let msg = msg.unwrap_or_default();
        assert!(
            msg.contains(other.as_str()) && msg.contains(&key),
            "{me}: {msg}"
        );
    }

    // The governor's supply comes back; the other still sheds: the model
    // passes to it, and is not scaled up in between.
    apply(&overlapping_budget(&first, &selector, 1000))?;
    let until = Instant::now() + Duration::from_secs(30);
    let mut handed_over = false;
    while Instant::now() < until && !handed_over {
        let dep = deployment_replicas(&deps.get("batch").await?);
        assert_eq!(dep, 1, "scaled up between the two budgets");
        handed_over = shed_by().await?.as_deref() == Some(second.as_str());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(handed_over, "the model never passed to {second}");
    for _ in 0..20 {
        assert_eq!(deployment_replicas(&deps.get("batch").await?), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    scene.delete_model("batch").await?;
    Ok(())
}

/// Every `shed-by` value the ModelDeployment `name` carried during `window`,
/// as a watch delivers each of its versions.
async fn shed_by_seen(
    mds: &Api<ModelDeployment>,
    name: &str,
    window: Duration,
) -> Result<std::collections::BTreeSet<Option<String>>> {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut seen = std::collections::BTreeSet::new();
    let stream = watcher(mds.clone(), config).applied_objects();
    let mut stream = std::pin::pin!(stream);
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(md)) = tokio::time::timeout_at(until, stream.next()).await {
        let md = md?;
        let by = md
            .annotations()
            .get(copyhold::serving::workload::SHED_BY_ANNOTATION);
        seen.insert(by.cloned());
    }
    Ok(seen)
}
