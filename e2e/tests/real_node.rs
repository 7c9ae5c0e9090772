//! copyhold's images on a real node: the kubelet and kube-proxy of
//! `e2e/node.sh`, containerd and runc. `make images` builds the images;
//! `helm install` runs the controller and gateway from them as containers
//! under the chart's securityContext (UID 65532, read-only root); a
//! ModelDeployment placed on the real node serves the fixture model from its
//! container with the model's hostPath volume mounted; the official openai
//! client streams an answer through the gateway's Service (kube-proxy's
//! rules, the Service's ClusterIP from this machine); the StintQuota's
//! register counts it.
//!
//! Skips, saying why, where the machine cannot run containers (not root, no
//! runc) or the tests run against a cluster given by `KUBECONFIG` (the node
//! joins only the local control plane). Takes about 2 minutes once the
//! images and the node's binaries are built (first time: the release build
//! and the kubelet, about 15 minutes on 2 cores).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use copyhold::resources::{ModelDeployment, StintQuota};
use copyhold_e2e::{
    FleetLock, TestNamespace, cluster_helm, cluster_helm_ok, eventually, fixtures, install_crds,
    kubectl, kubectl_apply, kubectl_ok, local_cluster, openai_python, workspace_root,
};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

/// The node `e2e/node.sh` starts (its default name) and its label.
const NODE: &str = "copyhold-real-node";
const NODE_LABEL: &str = "copyhold.dev/real-node";
/// containerd's socket of that node.
const CONTAINERD_SOCK: &str = "/run/copyhold-node/containerd.sock";
/// The toleration of the node's taint (`nvidia.com/gpu=real-node:NoSchedule`).
const TOLERATION: &str = r#"[{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}]"#;
/// What the node lends to placement while this test runs: one "GPU" with
/// GPU Feature Discovery's labels, which the engine serves on the CPU
/// (`--device cpu`), as the simulated fleet's nodes do.
const GPU_LABELS: [(&str, &str); 6] = [
    ("nvidia.com/gpu.present", "true"),
    ("nvidia.com/gpu.product", "Real-Node-CPU"),
    ("nvidia.com/gpu.memory", "16384"),
    ("nvidia.com/gpu.count", "1"),
    ("nvidia.com/gpu.compute.major", "8"),
    ("nvidia.com/gpu.compute.minor", "0"),
];

fn script(name: &str) -> PathBuf {
    workspace_root().join(name)
}

/// Why this machine cannot run the real node, if it cannot (`e2e/node.sh can-run`).
fn cannot_run_containers() -> Result<Option<String>> {
    let out = Command::new("bash")
        .arg(script("e2e/node.sh"))
        .arg("can-run")
        .output()
        .context("running e2e/node.sh can-run")?;
    if out.status.success() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// Runs a script of the repository, failing with the end of its output.
fn run_script(args: &[&str], kubeconfig: &std::path::Path) -> Result<String> {
    let mut cmd = Command::new("bash");
    // What cargo and nextest set for a test process would make the cargo
    // build in `images/build.sh` look different from one run by hand, and
    // each would rebuild the other's dependencies.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if (k.starts_with("CARGO_") && k != "CARGO_TARGET_DIR" && k != "CARGO_HOME")
            || k.starts_with("NEXTEST")
            || k.starts_with("__CARGO")
            || k == "OUT_DIR"
            || k == "RUST_TEST_THREADS"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let out = cmd
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "{} failed:\n{}",
            args.join(" "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Stops the node again when this test started it.
struct NodeGuard {
    started: bool,
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if self.started {
            let _ = Command::new("bash")
                .arg(script("e2e/node.sh"))
                .arg("down")
                .status();
        }
    }
}

/// The release, uninstalled when dropped (before the namespaces go).
struct Release {
    name: String,
    namespace: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = cluster_helm(&["uninstall", &self.name, "-n", &self.namespace, "--wait"]);
    }
}

/// The node's borrowed GPU (capacity and labels), taken back when dropped.
struct LentGpu;

impl LentGpu {
    fn lend() -> Result<Self> {
        let labels: Vec<String> = GPU_LABELS.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec!["label", "node", NODE, "--overwrite"];
        args.extend(labels.iter().map(String::as_str));
        kubectl_ok(&args)?;
        // Allocatable too: the kubelet would copy it from capacity only at
        // its next status update.
        let capacity = r#"{"status":{"capacity":{"nvidia.com/gpu":"1"},"allocatable":{"nvidia.com/gpu":"1"}}}"#;
        kubectl_ok(&[
            "patch",
            "node",
            NODE,
            "--subresource=status",
            "--type=merge",
            "-p",
            capacity,
        ])?;
        Ok(Self)
    }
}

impl Drop for LentGpu {
    fn drop(&mut self) {
        let mut args = vec!["label".to_string(), "node".into(), NODE.into()];
        args.extend(GPU_LABELS.iter().map(|(k, _)| format!("{k}-")));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = kubectl(&refs);
        for field in ["capacity", "allocatable"] {
            let _ = kubectl(&[
                "patch",
                "node",
                NODE,
                "--subresource=status",
                "--type=json",
                "-p",
                &format!(r#"[{{"op":"remove","path":"/status/{field}/nvidia.com~1gpu"}}]"#),
            ]);
        }
    }
}

/// The host PID of a Pod's first container, from containerd.
fn container_pid(pod: &Pod) -> Result<u32> {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.container_id.clone())
        .context("no container id yet")?;
    let id = id
        .strip_prefix("containerd://")
        .with_context(|| format!("not a containerd container: {id}"))?;
    let out = Command::new("ctr")
        .args(["--address", CONTAINERD_SOCK, "-n", "k8s.io", "tasks", "ls"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(id)).then(|| f.next().and_then(|p| p.parse().ok()))?
        })
        .with_context(|| format!("containerd runs no task {id}"))
}

/// The user a process runs as, and whether its root filesystem is read-only.
fn process_user_and_root(pid: u32) -> Result<(u32, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no Uid line")?
        .parse()?;
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ...
    let root_ro = mounts
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5))
        .is_some_and(|o| o.split(',').any(|x| x == "ro"));
    Ok((uid, root_ro))
}

/// The Service's ClusterIP and port.
async fn cluster_ip(client: &kube::Client, ns: &str, name: &str) -> Result<String> {
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    let spec = svc.spec.context("Service without spec")?;
    let ip = spec.cluster_ip.context("no ClusterIP")?;
    let port = spec
        .ports
        .unwrap_or_default()
        .first()
        .map(|p| p.port)
        .context("no port")?;
    Ok(format!("http://{ip}:{port}"))
}

fn wide(ns: &str) -> String {
    kubectl_ok(&["get", "pods", "-n", ns, "-o", "wide"]).unwrap_or_else(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chart_serves_from_its_images_in_real_containers_on_a_real_node() -> Result<()> {
    let t0 = Instant::now();
    if let Some(why) = cannot_run_containers()? {
        eprintln!("SKIPPED: this machine cannot run the real node: {why}");
        return Ok(());
    }
    if !local_cluster()? {
        eprintln!(
            "SKIPPED: KUBECONFIG points at another cluster; the real node joins only the local control plane (e2e/cluster.sh)"
        );
        return Ok(());
    }
    let _fleet = FleetLock::acquire()?;
    let kubeconfig = copyhold_e2e::kubeconfig()?;
    install_crds().await?;

    // The images (`make images`) and the node with them loaded.
    run_script(&["images/build.sh", "build"], &kubeconfig).context("make images")?;
    let tags = run_script(&["images/build.sh", "tags"], &kubeconfig)?;
    let tags: Vec<&str> = tags.lines().collect();
    let (copyhold_image, node_image) = (tags[0], tags[1]);
    let was_up = Command::new("bash")
        .arg(script("e2e/node.sh"))
        .arg("status")
        .output()?;
    let was_up = String::from_utf8_lossy(&was_up.stdout).contains(&format!("node {NODE} Ready"));
    let _node = NodeGuard { started: !was_up };
    run_script(&["e2e/node.sh", "up"], &kubeconfig)?;
    run_script(
        &["e2e/node.sh", "load", copyhold_image, node_image],
        &kubeconfig,
    )?;
    eprintln!("images built and node up after {:?}", t0.elapsed());

    let client = copyhold_e2e::client().await?;
    let sys_ns = TestNamespace::create("real-sys")?;
    let town_ns = TestNamespace::create("real-town")?;
    let (sys, town) = (sys_ns.name.clone(), town_ns.name.clone());
    let id = town.rsplit('-').next().unwrap_or("e2e").to_owned();

    // The chart from the built images: nothing pulled, the chart's own
    // securityContext, on the real node only.
    let (repo, tag) = copyhold_image
        .rsplit_once(':')
        .context("image without a tag")?;
    let release = Release {
        name: format!("real-{id}"),
        namespace: sys.clone(),
    };
    let on_node = format!(r#"{{"{NODE_LABEL}":"true"}}"#);
    let out = cluster_helm_ok(&[
        "install",
        &release.name,
        "charts/copyhold",
        "-n",
        &sys,
        "--wait",
        "--timeout",
        "240s",
        "--set",
        &format!("image.repository={repo}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        &format!("controller.engineImages.copyhold={node_image}"),
        "--set",
        "controller.nodeDevice=cpu",
        "--set",
        "controller.replicas=1",
        "--set",
        "gateway.replicas=1",
        "--set",
        &format!("controller.watchNamespace={town}"),
        "--set",
        &format!("gateway.watchNamespace={town}"),
        "--set",
        &format!("controller.budgetSelector=copyhold.dev/e2e={id}"),
        "--set",
        "controller.extraArgs={--resync-seconds=2}",
        "--set-json",
        &format!("controller.nodeSelector={on_node}"),
        "--set-json",
        &format!("gateway.nodeSelector={on_node}"),
        "--set-json",
        &format!("controller.tolerations={TOLERATION}"),
        "--set-json",
        &format!("gateway.tolerations={TOLERATION}"),
    ])
    .with_context(|| format!("helm install\n{}", wide(&sys)))?;
    ensure!(out.contains("STATUS: deployed"), "{out}");

    // Real containers of the chart's images, as the chart's securityContext says.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &sys);
    let chart_pods = pods.list(&ListParams::default()).await?;
    ensure!(chart_pods.items.len() == 2, "{}", wide(&sys));
    for p in &chart_pods.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref().context("Pod without spec")?;
        ensure!(
            spec.node_name.as_deref() == Some(NODE),
            "{name} not on {NODE}"
        );
        ensure!(
            spec.runtime_class_name.is_none(),
            "{name} has a runtime class"
        );
        ensure!(
            spec.containers[0].image.as_deref() == Some(copyhold_image),
            "{name} runs {:?}",
            spec.containers[0].image
        );
        let (uid, ro) = process_user_and_root(container_pid(p)?)?;
        ensure!(uid == 65532, "{name} runs as UID {uid}");
        ensure!(ro, "{name}'s root filesystem is writable");
    }

    // The members, their keys and a model placed on the real node.
    let docs: Vec<Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(
        workspace_root().join("examples/stint-quota.yaml"),
    )?)?;
    kubectl_apply(Some(&town), &serde_saphyr::to_string_multiple(&docs)?)?;
    let _gpu = LentGpu::lend()?;
    let model = std::fs::canonicalize(fixtures().join("tiny-llama"))
        .context("fixtures/tiny-llama")?
        .display()
        .to_string();
    let served = "tiny-llama";
    // The controller runs in a container and cannot read the hostPath: the
    // sizing is given inline (3 layers, 2 KV heads of 16, f32 weights).
    let md = json!({
        "apiVersion": "copyhold.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {
                "source": {"hostPath": {"path": model}},
                "servedName": served,
                "sizing": {"weightBytes": "1Mi", "dtype": "f32", "numLayers": 3, "numKvHeads": 2, "headDim": 16},
            },
            "engine": {"kind": "copyhold", "env": {"COPYHOLD_POWER_MODEL": "idle=40,busy=60"}},
            "replicas": 1,
            "serving": {"contextLength": 256, "maxConcurrentSequences": 4},
            "placement": {"nodeSelector": {NODE_LABEL: "true"}, "maxGpusPerReplica": 1},
            "stintQuota": "coop-members",
        },
    });
    kubectl_apply(Some(&town), &serde_saphyr::to_string(&md)?)?;
    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &town);
    eventually(Duration::from_secs(240), || async {
        let md = mds.get("tiny").await?;
        let st = md.status.clone().context("no status yet")?;
        ensure!(
            st.state.as_deref() == Some("Ready") && st.ready_replicas == 1,
            "not ready: {:?} {} {:?}",
            st.state,
            st.ready_replicas,
            st.conditions
        );
        ensure!(st.nodes == [NODE.to_string()], "placed on {:?}", st.nodes);
        Ok(())
    })
    .await
    .with_context(|| format!("the ModelDeployment did not become Ready\n{}", wide(&town)))?;
    let town_pods: Api<Pod> = Api::namespaced(client.clone(), &town);
    let engines = town_pods
        .list(&ListParams::default().labels("copyhold.dev/model-deployment=tiny"))
        .await?;
    ensure!(engines.items.len() == 1, "{}", wide(&town));
    let engine = &engines.items[0];
    let spec = engine.spec.as_ref().context("Pod without spec")?;
    ensure!(spec.node_name.as_deref() == Some(NODE));
    ensure!(spec.containers[0].image.as_deref() == Some(node_image));
    let pid = container_pid(engine)?;
    let (uid, ro) = process_user_and_root(pid)?;
    ensure!(uid == 65532 && ro, "engine: UID {uid}, read-only root {ro}");
    // The model volume: the fixture, mounted read-only at /models.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    ensure!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/models")),
        "no /models mount in the engine's container"
    );

    // Through the gateway's Service: kube-proxy's rules send its ClusterIP
    // to the gateway's container.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = cluster_ip(&client, &sys, &format!("{}-copyhold-gateway", release.name)).await?;
    eventually(Duration::from_secs(90), || async {
        let r = http
            .get(format!("{base}/v1/models"))
            .bearer_auth("example-bakery-key-change-me")
            .send()
            .await?;
        ensure!(r.status() == 200, "{base}: {}", r.status());
        let models: Value = r.json().await?;
        ensure!(
            models["data"][0]["id"] == served,
            "not listed yet: {models}"
        );
        Ok(())
    })
    .await?;
    let out = Command::new(openai_python()?)
        .arg(workspace_root().join("e2e/tests/python/stream_chat.py"))
        .args([
            &base,
            "example-bakery-key-change-me",
            served,
            "Who keeps the register?",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "openai client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        answer["chunks"].as_u64() > Some(1),
        "not streamed: {answer}"
    );
    let usage = &answer["usage"];
    let prompt = usage["prompt_tokens"].as_f64().context("prompt_tokens")?;
    let completion = usage["completion_tokens"]
        .as_f64()
        .context("completion_tokens")?;
    ensure!(completion > 0.0, "{usage}");

    // The register: prompt tokens weigh 0.5 (rounded up per request).
    let want = (0.5 * prompt + completion).ceil() as i64;
    let sqs: Api<StintQuota> = Api::namespaced(client.clone(), &town);
    eventually(Duration::from_secs(30), || async {
        let sq = sqs.get("coop-members").await?;
        let st = sq.status.context("no register yet")?;
        let bakery = st
            .members
            .iter()
            .find(|m| m.name == "bakery")
            .context("bakery not in the register")?;
        ensure!(
            bakery.tokens == want,
            "bakery has {} tokens, the answer used {want}",
            bakery.tokens
        );
        Ok(())
    })
    .await?;
    eprintln!("kubectl get pods -o wide -n {sys}\n{}", wide(&sys));
    eprintln!("kubectl get pods -o wide -n {town}\n{}", wide(&town));
    eprintln!(
        "kubectl get sq -n {town}\n{}",
        kubectl_ok(&["get", "sq", "-n", &town])?
    );
    eprintln!("answer: {answer}");
    eprintln!("wall time {:?}", t0.elapsed());
    Ok(())
}
