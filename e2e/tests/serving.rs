//! The whole serving path on the test control plane: a ModelDeployment of a
//! fixture model → the controller's Deployment → the real scheduler binds the
//! Pod to a simulated GPU node → the kubelet stand-in runs `copyhold-node
//! serve` on the Pod's own loopback address → the Pod turns Ready → the
//! ModelDeployment reports Ready → a chat completion to the Pod answers, and
//! the node serves the context and KV pool the spec sized.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use copyhold::resources::ModelDeployment;
use copyhold_e2e::{FleetLock, TestNamespace, eventually, fixtures, install_crds, workspace_bin};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

#[tokio::test]
async fn a_model_deployment_of_a_fixture_model_really_serves() -> Result<()> {
    let _fleet = FleetLock::acquire()?;
    install_crds().await?;
    let client = copyhold_e2e::client().await?;
    let ns = TestNamespace::create("serve")?;
    let node_bin = workspace_bin("copyhold-node", "copyhold-node")?;
    let model_dir =
        std::fs::canonicalize(fixtures().join("tiny-llama")).context("fixtures/tiny-llama")?;

    let _kubelet = copyhold_e2e::start_kubelet(
        std::path::Path::new(env!("CARGO_BIN_EXE_copyhold-kubelet")),
        &ns.name,
        "127.0.101",
        &node_bin,
        "e2e",
    )?;
    // No EnergyBudget is this test's: act on none.
    let _controller = copyhold_e2e::start_controller(
        &ns.name,
        &[
            "--budget-selector",
            "copyhold-test=none",
            "--node-device",
            "cpu",
        ],
    )?;

    let manifest = format!(
        r#"apiVersion: copyhold.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: tiny}}
spec:
  model:
    source: {{hostPath: {{path: {}}}}}
    servedName: tiny-llama
  serving: {{contextLength: 64, maxConcurrentSequences: 2}}
  replicas: 1
"#,
        model_dir.display()
    );
    let path = std::env::temp_dir().join(format!("copyhold-serve-{}.yaml", std::process::id()));
    std::fs::write(&path, manifest)?;
    copyhold_e2e::kubectl_ok(&["apply", "-n", &ns.name, "-f", &path.to_string_lossy()])?;

    let mds: Api<ModelDeployment> = Api::namespaced(client.clone(), &ns.name);
    // The controller read the model's config and headers itself (no inline sizing).
    let md = eventually(Duration::from_secs(120), || async {
        let md = mds.get("tiny").await?;
        let st = md.status.clone().context("no status yet")?;
        if st.ready_replicas >= 1 && st.state.as_deref() == Some("Ready") {
            Ok(md)
        } else {
            bail!(
                "state {:?}, {}/{} ready",
                st.state,
                st.ready_replicas,
                st.replicas
            )
        }
    })
    .await?;
    let st = md.status.context("status")?;
    assert!(
        st.required_memory_bytes.unwrap_or(0) > 0,
        "sized from the files"
    );
    assert_eq!(st.nodes.len(), 1);

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let list = pods
        .list(&ListParams::default().labels("copyhold.dev/model-deployment=tiny"))
        .await?;
    let ip = list
        .items
        .iter()
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .context("the Pod has an IP")?;
    assert!(ip.starts_with("127.0.101."), "{ip}");

    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{ip}:8000/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
            "temperature": 0
        }))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );

    // The engine serves what placement sized (issue 19, item 9): the
    // context of the spec, a KV pool of 2 sequences × 64 tokens (16 per
    // block), and a longer prompt refused.
    let models: serde_json::Value = http
        .get(format!("http://{ip}:8000/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["max_model_len"], 64, "{models}");
    let metrics = http
        .get(format!("http://{ip}:8000/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "copyhold_node_kv_blocks_total 8"),
        "{metrics}"
    );
    let long: Vec<u32> = (1..=80).collect();
    let resp = http
        .post(format!("http://{ip}:8000/v1/completions"))
        .json(&serde_json::json!({"model": "tiny-llama", "prompt": long, "max_tokens": 1}))
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");

    // Scaling to zero stops the process: the address stops answering.
    copyhold_e2e::kubectl_ok(&["scale", "-n", &ns.name, "md/tiny", "--replicas=0"])?;
    eventually(Duration::from_secs(60), || async {
        match http
            .get(format!("http://{ip}:8000/health"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            Err(_) => Ok(()),
            Ok(r) => bail!("still answering: {}", r.status()),
        }
    })
    .await?;
    Ok(())
}
