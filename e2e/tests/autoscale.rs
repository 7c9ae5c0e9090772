//! The autoscaler on the real control plane: the controller, the gateway
//! and the kubelet stand-in as real processes; the serving Pods run the
//! upstream stand-in (an OpenAI server whose answers take a set time), so a
//! burst of clients keeps requests in flight for as long as the test wants.
//! The gateway publishes what it has in flight and held in its demand
//! Lease, the controller scales the Deployment, the real scheduler binds the
//! new Pods to simulated GPU nodes, and the stand-in kubelet runs them.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use copyhold::resources::ModelDeployment;
use copyhold_e2e::{
    ChildGuard, FleetLock, KubeletGuard, TestNamespace, create_secret, eventually, install_crds,
    kubeconfig, kubectl_ok, workspace_bin,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

/// The image the kubelet stand-in runs as the upstream stand-in.
const STANDIN_IMAGE: &str = "copyhold-standin";

/// A namespace with a keyed member, the controller, one gateway and the
/// kubelet stand-in, all for this test alone.
struct Scene {
    ns: TestNamespace,
    client: kube::Client,
    key: String,
    gateway: String,
    /// The gateway's metrics port (never the public one).
    metrics: String,
    http: reqwest::Client,
    _processes: (KubeletGuard, ChildGuard, ChildGuard),
    _fleet: FleetLock,
}

/// Start a process that prints `... listening on ADDR ...`; its address.
fn listening(cmd: Command) -> Result<(ChildGuard, String, String)> {
    let l = copyhold_e2e::processes::spawn_listening(cmd)?;
    Ok((l.guard, l.addr, l.line))
}

/// The label that puts an EnergyBudget under one scene's controller.
const SCENE_LABEL: &str = "copyhold.dev/e2e-scene";

/// A cluster-scoped EnergyBudget, deleted when dropped.
struct BudgetGuard(String);

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let _ = copyhold_e2e::kubectl(&["delete", "energybudget", &self.0, "--wait=false"]);
    }
}

impl Scene {
    async fn new(prefix: &str, ip_prefix: &str) -> Result<Scene> {
        let fleet = FleetLock::acquire()?;
        install_crds().await?;
        let ns = TestNamespace::create(prefix)?;
        let client = copyhold_e2e::client().await?;
        let key = format!("sk-ada-{}", ns.name);
        create_secret(&ns.name, "key-ada", "api-key", &key)?;
        kubectl_apply(&json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
            "metadata": {"name": "commons", "namespace": ns.name},
            "spec": {"period": {"type": "calendar", "unit": "month"},
                     "members": [{"name": "ada", "apiKeySecret": {"name": "key-ada"}}]}
        }))?;
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
        // Only budgets labelled for this scene (the cap test's).
        let controller = copyhold_e2e::start_controller(
            &ns.name,
            &["--budget-selector", &format!("{SCENE_LABEL}={}", ns.name)],
        )?;
        let bin = workspace_bin("copyhold", "copyhold")?;
        let mut gw = Command::new(&bin);
        gw.args(["gateway", "--listen", "127.0.0.1:0"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--watch-namespace", &ns.name, "--identity", "gw0"])
            .env("KUBECONFIG", kubeconfig()?)
            .env("RUST_LOG", "warn");
        let (gateway, addr, line) = listening(gw)?;
        let metrics = format!("http://{}", copyhold_e2e::gateway_metrics_addr(&line)?);
        Ok(Scene {
            ns,
            client,
            key,
            gateway: format!("http://{addr}"),
            metrics,
            http: reqwest::Client::new(),
            _processes: (kubelet, controller, gateway),
            _fleet: fleet,
        })
    }

    /// A ModelDeployment `name` (served under the same name) run by the
    /// upstream stand-in, each answer taking `answer_ms`.
    async fn model(
        &self,
        name: &str,
        replicas: i32,
        autoscaling: Value,
        answer_ms: u64,
    ) -> Result<()> {
        self.apply_model(&self.model_json(name, replicas, autoscaling, answer_ms))
            .await
    }

    /// The ModelDeployment [`Scene::model`] applies.
    fn model_json(&self, name: &str, replicas: i32, autoscaling: Value, answer_ms: u64) -> Value {
        json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/none"}},
                          "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
                "engine": {"image": format!("{STANDIN_IMAGE}:test"),
                           "env": {"STANDIN_ANSWER_DELAY_MS": answer_ms.to_string()}},
                "replicas": replicas,
                "autoscaling": autoscaling,
                "serving": {"contextLength": 256},
                "stintQuota": "commons",
            }
        })
    }

    /// Apply a ModelDeployment through the API (no client-side schema: the
    /// API server's OpenAPI lags a CRD update by seconds).
    async fn apply_model(&self, md: &Value) -> Result<()> {
        let name = md["metadata"]["name"].as_str().context("name")?;
        self.mds()
            .patch(
                name,
                &PatchParams::apply("copyhold-e2e").force(),
                &Patch::Apply(md),
            )
            .await?;
        Ok(())
    }

    fn mds(&self) -> Api<ModelDeployment> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// One chat completion through the gateway: status, Retry-After, body.
    async fn chat(&self, model: &str) -> Result<(u16, Option<String>, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.gateway))
            .bearer_auth(&self.key)
            .json(&json!({"model": model, "max_tokens": 4,
                          "messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await?;
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((status, retry, r.json().await.unwrap_or(Value::Null)))
    }

    /// Wait until `name`'s status satisfies `ok`; the status then.
    async fn status_until(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&copyhold::resources::ModelDeploymentStatus) -> bool,
    ) -> Result<copyhold::resources::ModelDeploymentStatus> {
        let mds = self.mds();
        eventually(timeout, || async {
            let st = mds.get(name).await?.status.unwrap_or_default();
            if ok(&st) {
                Ok(st)
            } else {
                bail!(
                    "waiting for {what}: desired {:?}, {}/{} ready, in flight {:?}, {:?}",
                    st.desired_replicas,
                    st.ready_replicas,
                    st.replicas,
                    st.in_flight,
                    st.scale_reason
                )
            }
        })
        .await
    }

    async fn deployment_replicas(&self, name: &str) -> Result<i32> {
        let d = Api::<Deployment>::namespaced(self.client.clone(), &self.ns.name)
            .get(name)
            .await?;
        Ok(d.spec.and_then(|s| s.replicas).unwrap_or(0))
    }

    /// Reasons of the Events on `name`.
    async fn event_reasons(&self, name: &str) -> Result<Vec<String>> {
        let evs = Api::<Event>::namespaced(self.client.clone(), &self.ns.name)
            .list(&ListParams::default())
            .await?;
        Ok(evs
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .filter_map(|e| e.reason)
            .collect())
    }
}

/// One series of the gateway's /metrics.
async fn gateway_metric(s: &Scene, series: &str) -> Result<f64> {
    let text = s
        .http
        .get(format!("{}/metrics", s.metrics))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{series} not in\n{text}"))
}

fn kubectl_apply(v: &Value) -> Result<()> {
    copyhold_e2e::kubectl_apply(None, &serde_json::to_string(v)?)
}

/// `clients` concurrent clients sending requests one after the other
/// until `stop` is set; the status codes they got.
fn burst(
    scene: &Scene,
    model: &str,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..clients)
        .map(|_| {
            let (http, base, key, model, stop) = (
                scene.http.clone(),
                scene.gateway.clone(),
                scene.key.clone(),
                model.to_string(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut codes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let r = http
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&json!({"model": model, "max_tokens": 4,
                                      "messages": [{"role": "user", "content": "hi"}]}))
                        .send()
                        .await;
                    let code = match r {
                        Ok(r) if r.status() != 200 => {
                            let code = r.status().as_u16();
                            eprintln!("{code}: {}", r.text().await.unwrap_or_default());
                            code
                        }
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    codes.push(code);
                }
                codes
            })
        })
        .collect()
}

async fn stop_burst(
    stop: &std::sync::atomic::AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
) -> Result<BTreeMap<u16, usize>> {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut codes = BTreeMap::new();
    for t in tasks {
        for c in t.await? {
            *codes.entry(c).or_insert(0) += 1;
        }
    }
    Ok(codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_clients_scales_the_model_up_and_back_down_after_the_window() -> Result<()> {
    let s = Scene::new("as-burst", "127.0.111").await?;
    s.model(
        "burst",
        1,
        json!({"minReplicas": 1, "maxReplicas": 3, "targetInFlightPerReplica": 2,
               "scaleDownStabilization": "6s"}),
        1500,
    )
    .await?;
    s.status_until(
        "burst",
        Duration::from_secs(40),
        "one ready replica",
        |st| st.ready_replicas == 1 && st.desired_replicas == Some(1),
    )
    .await?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = burst(&s, "burst", 6, stop.clone());
    let up = s
        .status_until("burst", Duration::from_secs(30), "three ready", |st| {
            st.desired_replicas == Some(3) && st.ready_replicas == 3
        })
        .await;
    let codes = stop_burst(&stop, tasks).await?;
    let up = up?;
    let calm = Instant::now();
    println!("scaled up: {:?}; answers {codes:?}", up.scale_reason);
    ensure!(
        up.in_flight.unwrap_or(0) >= 5,
        "the demand was read: {up:?}"
    );
    // Scaling up adds Pods and never replaces the serving ones (the Pod
    // template is the same at every replica count): every answer is a 200.
    ensure!(
        codes.keys().all(|c| *c == 200) && codes[&200] >= 6,
        "{codes:?}"
    );
    ensure!(s.deployment_replicas("burst").await? == 3);

    let down = s
        .status_until("burst", Duration::from_secs(30), "back to one", |st| {
            st.desired_replicas == Some(1) && st.replicas == 1
        })
        .await?;
    let after = calm.elapsed();
    println!(
        "scaled down {:.1} s after the burst: {:?}",
        after.as_secs_f64(),
        down.scale_reason
    );
    ensure!(
        after >= Duration::from_secs(5),
        "scaled down before the 6 s window: {after:?}"
    );
    let reasons = s.event_reasons("burst").await?;
    ensure!(
        reasons.iter().any(|r| r == "ScaledUp") && reasons.iter().any(|r| r == "ScaledDown"),
        "{reasons:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_at_zero_answers_its_first_request_once_a_replica_starts() -> Result<()> {
    let s = Scene::new("as-zero", "127.0.112").await?;
    s.model(
        "sleepy",
        0,
        json!({"minReplicas": 0, "maxReplicas": 2, "scaleFromZeroTimeout": "45s",
               "scaleDownStabilization": "2s", "scaleToZeroAfter": "3s"}),
        0,
    )
    .await?;
    s.status_until("sleepy", Duration::from_secs(30), "at zero", |st| {
        st.desired_replicas == Some(0) && st.state.is_some()
    })
    .await?;
    ensure!(s.deployment_replicas("sleepy").await? == 0);

    let asked = Instant::now();
    let (code, _, body) = s.chat("sleepy").await?;
    let waited = asked.elapsed();
    println!(
        "the first request to a model at zero waited {:.2} s for a replica",
        waited.as_secs_f64()
    );
    ensure!(code == 200, "{code}: {body}");
    ensure!(
        body["usage"]["completion_tokens"].as_i64() == Some(4),
        "{body}"
    );
    let reasons = s.event_reasons("sleepy").await?;
    ensure!(reasons.iter().any(|r| r == "ScaledUp"), "{reasons:?}");
    let metrics = s
        .http
        .get(format!("{}/metrics", s.metrics))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        metrics.contains(
            r#"copyhold_gateway_hold_wait_seconds_count{model="sleepy",outcome="ready"} 1"#
        ),
        "{metrics}"
    );

    // scaleToZeroAfter: idle again, back to zero.
    let st = s
        .status_until("sleepy", Duration::from_secs(30), "back at zero", |st| {
            st.desired_replicas == Some(0) && st.replicas == 0
        })
        .await?;
    println!("idle: {:?}", st.scale_reason);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_request_gets_503_with_retry_after_when_no_replica_comes() -> Result<()> {
    let s = Scene::new("as-timeout", "127.0.113").await?;
    // An image the kubelet stand-in cannot run: the replica never turns Ready.
    s.apply_model(&json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "stuck", "namespace": s.ns.name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/none"}},
                      "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
            "engine": {"image": "no-such-image:1"},
            "replicas": 0,
            "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleFromZeroTimeout": "4s"},
            "serving": {"contextLength": 256},
            "stintQuota": "commons",
        }
    }))
    .await?;
    // And one no node can take: refused as soon as the controller says so.
    s.apply_model(&json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "nowhere", "namespace": s.ns.name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/none"}},
                      "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
            "engine": {"image": format!("{STANDIN_IMAGE}:test")},
            "replicas": 0,
            "placement": {"gpuProducts": ["Tesla-H100-no-such-card"]},
            "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleFromZeroTimeout": "40s"},
            "serving": {"contextLength": 256},
            "stintQuota": "commons",
        }
    }))
    .await?;
    for m in ["stuck", "nowhere"] {
        s.status_until(m, Duration::from_secs(30), "at zero", |st| {
            st.desired_replicas == Some(0)
        })
        .await?;
    }

    // A held request holds the member's place like any other: with one
    // request allowed at a time, a second is refused while the first is
    // held; a client that gives up while held frees its place.
    kubectl_apply(&json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
        "metadata": {"name": "commons", "namespace": s.ns.name},
        "spec": {"period": {"type": "calendar", "unit": "month"},
                 "limits": {"concurrentRequests": 1},
                 "members": [{"name": "ada", "apiKeySecret": {"name": "key-ada"}}]}
    }))?;
    eventually(Duration::from_secs(20), || async {
        let impatient = s
            .http
            .post(format!("{}/v1/chat/completions", s.gateway))
            .bearer_auth(&s.key)
            .timeout(Duration::from_millis(1500))
            .json(&json!({"model": "stuck", "max_tokens": 4,
                          "messages": [{"role": "user", "content": "hello"}]}))
            .send();
        let second = async {
            tokio::time::sleep(Duration::from_millis(600)).await;
            s.chat("stuck").await
        };
        let (first, second) = tokio::join!(impatient, second);
        ensure!(
            first.is_err(),
            "the impatient client was answered: {first:?}"
        );
        let (code, _, body) = second?;
        ensure!(code == 429, "while one is held: {code} {body}");
        Ok(())
    })
    .await?;
    // The gateway learns of the hang-up from its connection, a moment
    // after the client's timeout: the place is freed within a few seconds.
    eventually(Duration::from_secs(5), || async {
        let held = gateway_metric(&s, r#"copyhold_gateway_held_requests{model="stuck"}"#).await?;
        ensure!(
            held == 0.0,
            "the gone client's request is still held: {held}"
        );
        Ok(())
    })
    .await?;

    let asked = Instant::now();
    let (code, retry, body) = s.chat("stuck").await?;
    let waited = asked.elapsed();
    println!(
        "held {:.1} s, then {code} Retry-After {retry:?}: {body}",
        waited.as_secs_f64()
    );
    ensure!(code == 503, "{code}: {body}");
    ensure!(retry.is_some(), "no Retry-After");
    ensure!(body["error"]["code"] == "model_not_ready", "{body}");
    ensure!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    // The held request was counted as demand: the controller scaled up.
    ensure!(s.deployment_replicas("stuck").await? == 1);

    let asked = Instant::now();
    let (code, retry, body) = s.chat("nowhere").await?;
    println!(
        "unplaceable: {code} after {:.1} s, Retry-After {retry:?}: {body}",
        asked.elapsed().as_secs_f64()
    );
    ensure!(code == 503 && retry.is_some(), "{code}: {body}");
    ensure!(body["error"]["code"] == "model_unplaceable", "{body}");
    ensure!(asked.elapsed() < Duration::from_secs(30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_energy_budget_shedding_step_caps_the_autoscaler() -> Result<()> {
    let s = Scene::new("as-cap", "127.0.114").await?;
    // Deferrable: the budget's shedding rung is for it.
    let mut md = s.model_json(
        "capped",
        1,
        json!({"minReplicas": 1, "maxReplicas": 3, "targetInFlightPerReplica": 1,
               "scaleDownStabilization": "2s"}),
        1500,
    );
    md["spec"]["priority"] = json!("deferrable");
    s.apply_model(&md).await?;
    s.status_until("capped", Duration::from_secs(40), "one ready", |st| {
        st.ready_replicas == 1
    })
    .await?;
    // A real EnergyBudget over the fleet, acted on by this scene's
    // controller only: plenty of supply, then almost none, so its ladder
    // walks to the shedding rung and writes the cap on the model.
    let budget = format!("{}-solar", s.ns.name);
    let _guard = BudgetGuard(budget.clone());
    let supply = |watts: f64| json!({"static": {"watts": watts}, "maxAge": "5m"});
    kubectl_apply(&json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
        "metadata": {"name": budget, "labels": {SCENE_LABEL: s.ns.name}},
        "spec": {"nodeSelector": {"nvidia.com/gpu.present": "true"},
                 "ceilingWatts": 100000, "marginPercent": 10,
                 "supply": supply(100_000.0),
                 "policy": {"powerCap": {"enabled": false}, "shed": ["deferrable"],
                            "defer": false, "dwell": "2s"},
                 "evaluationInterval": "1s"}
    }))?;
    let set_supply = |watts: f64| {
        kubectl_ok(&[
            "patch",
            "energybudget",
            &budget,
            "--type=merge",
            "-p",
            &json!({"spec": {"supply": supply(watts)}}).to_string(),
        ])
    };
    set_supply(1.0)?;
    // The budget's shedding rung writes its cap on the model, though the
    // model runs only its minimum: demand must not scale it up now.
    eventually(Duration::from_secs(60), || async {
        let md = s.mds().get("capped").await?;
        let a = md.metadata.annotations.unwrap_or_default();
        ensure!(
            a.get("copyhold.dev/shed-by") == Some(&budget)
                && a.get("copyhold.dev/shed-to").map(String::as_str) == Some("1"),
            "not capped by the budget yet: {a:?}"
        );
        Ok(())
    })
    .await?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = burst(&s, "capped", 3, stop.clone());
    let capped = s
        .status_until(
            "capped",
            Duration::from_secs(20),
            "capped with demand",
            |st| {
                st.in_flight.unwrap_or(0) >= 3
                    && st
                        .scale_reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with("CappedByEnergyBudget"))
            },
        )
        .await;
    let held_at_one = s.deployment_replicas("capped").await;
    // The sun returns: the ladder steps back, the cap goes, the same
    // demand now scales up.
    set_supply(100_000.0)?;
    let freed = s
        .status_until(
            "capped",
            Duration::from_secs(60),
            "scaled once freed",
            |st| st.desired_replicas == Some(3),
        )
        .await;
    stop_burst(&stop, tasks).await?;
    let capped = capped?;
    println!("while shed: {:?}", capped.scale_reason);
    ensure!(capped.desired_replicas == Some(1), "{capped:?}");
    ensure!(
        capped.shed_by.as_deref() == Some(budget.as_str()),
        "{capped:?}"
    );
    ensure!(held_at_one? == 1);
    println!("once freed: {:?}", freed?.scale_reason);
    Ok(())
}
