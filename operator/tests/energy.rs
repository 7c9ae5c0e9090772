//! An EnergyBudget on the real control plane, with a real `copyhold
//! controller` process and the kubelet stand-in running the Pods of a
//! deferrable ModelDeployment as `copyhold-node` processes that serve
//! `/metrics` (their declared power model makes each draw 100 W idle).
//!
//! Supply lowered below draw → the ModelDeployment is shed to its minimum
//! (status, Event, `kubectl get`); supply restored → scaled back after the
//! dwell, with no oscillation; an HTTP supply endpoint that stops answering
//! → `SupplyStale` and the floor used.

#[path = "../../e2e/src/lib.rs"]
#[allow(dead_code)]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use copyhold::resources::{EnergyBudget, ModelDeployment};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use support::{ChildGuard, FleetLock, TestNamespace, eventually, install_crds, kubectl_ok};

/// Deletes the (cluster-scoped) budget when dropped.
struct BudgetGuard(String);

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let _ = support::kubectl(&["delete", "energybudget", &self.0, "--wait=false"]);
    }
}

fn apply(manifest: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!(
        "copyhold-energy-{}-{}.yaml",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::write(&path, manifest)?;
    let r = kubectl_ok(&["apply", "-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
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
    let _fleet = FleetLock::acquire()?;
    install_crds().await?;
    let client = support::client().await?;
    let ns = TestNamespace::create("energy")?;
    let kc = support::kubeconfig()?;
    let node_bin = support::workspace_bin("copyhold-node", "copyhold-node")?;
    let kubelet_bin = support::workspace_bin("copyhold-e2e", "copyhold-kubelet")?;
    let model_dir = std::fs::canonicalize(support::fixtures().join("tiny-llama"))
        .context("fixtures/tiny-llama")?;
    let budget = format!("energy-{}", &ns.name[ns.name.len().saturating_sub(8)..]);
    let _budget_guard = BudgetGuard(budget.clone());

    // Pod IPs of this run only: a Pod process left by an earlier, failed run
    // must not hold our addresses.
    let ip_prefix = format!("127.102.{}", std::process::id() % 250);
    let _kubelet = support::start_kubelet(&kubelet_bin, &ns.name, &ip_prefix, &node_bin, "energy")?;
    let _controller = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_copyhold"))
            .args(["controller", "--metrics-addr", "127.0.0.1:0"])
            .args(["--leader-election=false", "--node-device", "cpu"])
            .args(["--resync-seconds", "2", "--watch-namespace", &ns.name])
            .env("KUBECONFIG", &kc)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .spawn()?,
    );

    // Two replicas, one per P100 of gpu-p100, each drawing 100 W idle.
    let md_manifest = format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: batch, namespace: {ns}}}
spec:
  model:
    source: {{hostPath: {{path: {dir}}}}}
    servedName: tiny-llama
  engine:
    env: {{COPYHOLD_POWER_MODEL: "idle=100,busy=150", COPYHOLD_POWER_SENSOR: model}}
  serving: {{contextLength: 256, maxConcurrentSequences: 2}}
  placement: {{gpuProducts: [Tesla-P100-PCIE-16GB]}}
  priority: deferrable
  replicas: 2
  autoscaling: {{minReplicas: 1, maxReplicas: 2}}
"#,
        ns = ns.name,
        dir = model_dir.display()
    );
    apply(&md_manifest)?;
    let eb_manifest = |supply: &str| {
        format!(
            r#"apiVersion: copyhold.dev/v1alpha1
kind: EnergyBudget
metadata: {{name: {budget}}}
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

    eventually(Duration::from_secs(120), || async {
        let st = mds.get("batch").await?.status.context("no status")?;
        if st.ready_replicas == 2 {
            Ok(())
        } else {
            bail!("{}/2 ready ({:?})", st.ready_replicas, st.state)
        }
    })
    .await?;
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

    // Stop the Pods while the kubelet stand-in still runs, so no process
    // outlives the test.
    kubectl_ok(&["delete", "md", "batch", "-n", &ns.name, "--wait=false"])?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually(Duration::from_secs(60), || async {
        let n = pods.list(&Default::default()).await?.items.len();
        if n == 0 {
            Ok(())
        } else {
            bail!("{n} pods left")
        }
    })
    .await?;
    Ok(())
}
