//! Sizing against the fleet on the real control plane (issue 19, item 8):
//! the controller as a real process, Nodes of the test's own created on
//! the API server (no kubelet: the placement decision is what is checked).
//!
//! - A node with a taint the serving Pods do not tolerate is no placement
//!   target.
//! - Two replicas on the slices of one time-sliced card must fit its memory
//!   together.
//! - GGUF 8B models on a local hub (issue 22 item 4) are sized from their
//!   header, read with range requests, and placed where what the engine
//!   holds on the GPU fits; a malformed header is a condition and an Event.

use std::time::Duration;

use anyhow::{Result, bail};
use copyhold::resources::{ModelDeployment, ModelDeploymentStatus};
use copyhold_e2e::{ChildGuard, FleetLock, TestNamespace, eventually, install_crds};
use copyhold_hub::server::{HubOptions, spawn_local};
use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// The label that keeps this test's models on this test's nodes.
const SCENE_LABEL: &str = "copyhold.dev/e2e-scene";
/// An unknown product: ranked after every known card, so no other test's
/// model prefers these nodes while they exist.
const PRODUCT: &str = "Copyhold-E2E-Sizing-16GB";

/// A GPU as GPU feature discovery labels it.
struct Card {
    product: &'static str,
    memory_mib: u32,
    cc: (u8, u8),
}

/// Nodes created for one test, deleted when dropped.
struct Nodes {
    api: Api<Node>,
    names: Vec<String>,
}

impl Nodes {
    /// A Ready node `name` with `gpus` allocatable GPUs of 16 GiB, the
    /// scene's labels plus `labels`, and exactly `taints`.
    async fn add(&mut self, name: &str, gpus: u32, labels: Value, taints: Value) -> Result<()> {
        let card = Card {
            product: PRODUCT,
            memory_mib: 16384,
            cc: (7, 5),
        };
        self.add_card(name, gpus, &card, labels, taints).await
    }

    /// [`Nodes::add`] with GPUs of `card`.
    async fn add_card(
        &mut self,
        name: &str,
        gpus: u32,
        card: &Card,
        labels: Value,
        taints: Value,
    ) -> Result<()> {
        let mut l = json!({
            // No `nvidia.com/gpu.present`: EnergyBudgets of other tests
            // that cover every GPU node leave these out.
            "kubernetes.io/hostname": name,
            "nvidia.com/gpu.product": card.product,
            "nvidia.com/gpu.memory": card.memory_mib.to_string(),
            "nvidia.com/gpu.count": "1",
            "nvidia.com/gpu.compute.major": card.cc.0.to_string(),
            "nvidia.com/gpu.compute.minor": card.cc.1.to_string(),
        });
        if let (Some(l), Some(extra)) = (l.as_object_mut(), labels.as_object()) {
            l.extend(extra.clone());
        }
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": l}}))?;
        self.api.create(&PostParams::default(), &node).await?;
        self.names.push(name.to_string());
        let gpus = gpus.to_string();
        let status = json!({"status": {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": gpus},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": gpus},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "copyhold e2e sizing"}],
        }});
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        // Replaces the not-ready taint admission put on the new Node.
        self.api
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": taints}})),
            )
            .await?;
        Ok(())
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = copyhold_e2e::kubectl(&["delete", "node", n, "--wait=false"]);
        }
    }
}

/// The test's namespace, its controller and its nodes.
struct Scene {
    ns: TestNamespace,
    client: kube::Client,
    nodes: Nodes,
    _controller: ChildGuard,
    _fleet: FleetLock,
}

impl Scene {
    async fn new(prefix: &str) -> Result<Scene> {
        let fleet = FleetLock::acquire()?;
        install_crds().await?;
        let ns = TestNamespace::create(prefix)?;
        let client = copyhold_e2e::client().await?;
        let controller =
            copyhold_e2e::start_controller(&ns.name, &["--budget-selector", "copyhold-test=none"])?;
        Ok(Scene {
            nodes: Nodes {
                api: Api::all(client.clone()),
                names: Vec::new(),
            },
            ns,
            client,
            _controller: controller,
            _fleet: fleet,
        })
    }

    /// A node name unique to this scene.
    fn node_name(&self, role: &str) -> String {
        format!("{}-{role}", self.ns.name)
    }

    /// `replicas` replicas of a model of `weights` (inline sizing, 256
    /// tokens of 1 KiB of KV) kept to the scene's nodes of `role`, one GPU
    /// per replica.
    async fn model(&self, name: &str, replicas: i32, weights: &str, role: &str) -> Result<()> {
        let md = json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": self.ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/none"}},
                          "sizing": {"weightBytes": weights, "kvBytesPerToken": 1024}},
                "replicas": replicas,
                "placement": {"maxGpusPerReplica": 1,
                              "nodeSelector": {SCENE_LABEL: format!("{}-{role}", self.ns.name)}},
                "serving": {"contextLength": 256, "maxConcurrentSequences": 1},
            }
        });
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        api.patch(
            name,
            &PatchParams::apply("copyhold-e2e").force(),
            &Patch::Apply(&md),
        )
        .await?;
        Ok(())
    }

    /// `name`'s status once its `Placed` condition is set.
    async fn placed(&self, name: &str) -> Result<ModelDeploymentStatus> {
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        eventually(Duration::from_secs(60), || async {
            let st = api.get(name).await?.status.unwrap_or_default();
            // A placed model names its node once a Pod of it is bound.
            let bound = !st.nodes.is_empty();
            if placed(&st).is_some_and(|(status, _, _)| status != "True" || bound) {
                Ok(st)
            } else {
                bail!("waiting for the Placed condition of {name}: {st:?}")
            }
        })
        .await
    }

    async fn cleanup(self) -> Result<()> {
        let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &self.ns.name);
        for md in api.list(&Default::default()).await?.items {
            if let Some(n) = md.metadata.name {
                let _ = api.delete(&n, &DeleteParams::default()).await;
            }
        }
        Ok(())
    }
}

/// The `Placed` condition: status, reason, message.
fn placed(st: &ModelDeploymentStatus) -> Option<(String, String, String)> {
    st.conditions
        .iter()
        .find(|c| c.type_ == "Placed")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn a_node_with_a_taint_the_pods_do_not_tolerate_is_no_placement_target() -> Result<()> {
    let mut s = Scene::new("taint").await?;
    let (tainted, gpu_tainted) = (s.node_name("tainted"), s.node_name("gpu-tainted"));
    let (ns, scene) = (s.ns.name.clone(), SCENE_LABEL);
    s.nodes
        .add(
            &tainted,
            1,
            json!({scene: format!("{ns}-tainted")}),
            json!([{"key": "copyhold.dev/dedicated", "value": "other", "effect": "NoSchedule"}]),
        )
        .await?;
    // The taint GPU nodes commonly carry, which the serving Pods tolerate.
    s.nodes
        .add(
            &gpu_tainted,
            1,
            json!({scene: format!("{ns}-gpu-tainted")}),
            json!([{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]),
        )
        .await?;
    s.model("kept-off", 1, "1Gi", "tainted").await?;
    s.model("welcome", 1, "1Gi", "gpu-tainted").await?;
    let off = s.placed("kept-off").await?;
    let (status, reason, message) = placed(&off).unwrap_or_default();
    assert_eq!(
        status, "False",
        "{reason}: {message}; nodes {:?}",
        off.nodes
    );
    assert!(!off.nodes.contains(&tainted), "{:?}", off.nodes);
    let on = s.placed("welcome").await?;
    let (status, reason, message) = placed(&on).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert_eq!(on.nodes, vec![gpu_tainted]);
    s.cleanup().await
}

#[tokio::test]
async fn two_replicas_on_the_slices_of_one_card_must_fit_its_memory_together() -> Result<()> {
    let mut s = Scene::new("slices").await?;
    let sliced = s.node_name("sliced");
    let ns = s.ns.name.clone();
    // One 16 GiB card time-sliced as 2 GPUs (14.4 GiB usable at 0.9).
    s.nodes
        .add(
            &sliced,
            2,
            json!({SCENE_LABEL: format!("{ns}-sliced"), "nvidia.com/gpu.replicas": "2"}),
            json!(null),
        )
        .await?;
    // 9 GiB of weights: about 9.95 GiB a replica. One fits the card; two
    // (19.9 GiB) do not.
    s.model("big-pair", 2, "9Gi", "sliced").await?;
    let big = s.placed("big-pair").await?;
    let (status, reason, message) = placed(&big).unwrap_or_default();
    assert_eq!(
        status, "False",
        "{reason}: {message}; nodes {:?}",
        big.nodes
    );
    // 3 GiB of weights: about 3.65 GiB a replica; two fit together.
    s.model("small-pair", 2, "3Gi", "sliced").await?;
    let small = s.placed("small-pair").await?;
    let (status, reason, message) = placed(&small).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert_eq!(small.nodes, vec![sliced]);
    s.cleanup().await
}

/// GGUF headers of Llama 3.1 8B's shape (no tensor data: the controller
/// reads only the header), as llama.cpp writes them.
mod gguf {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn u32_kv(out: &mut Vec<u8>, k: &str, v: u32) {
        string(out, k);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }

    /// ggml types: (id, elements per block, bytes per block).
    pub const F32: (u32, u64, u64) = (0, 1, 4);
    pub const F16: (u32, u64, u64) = (1, 1, 2);
    pub const Q4_K: (u32, u64, u64) = (12, 256, 144);
    pub const Q6_K: (u32, u64, u64) = (14, 256, 210);

    /// The header; `q4_k_m`: llama.cpp's mix (Q6_K head, and `attn_v`
    /// and `ffn_down` of 16 of the 32 layers), else every matrix F16.
    pub fn llama_8b(q4_k_m: bool) -> Vec<u8> {
        let (n, h, f, v, kv) = (32u64, 4096u64, 14336u64, 128_256u64, 1024u64);
        let more = |i: u64| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let (base, head) = if q4_k_m { (Q4_K, Q6_K) } else { (F16, F16) };
        let mixed = |i: u64| if q4_k_m && more(i) { Q6_K } else { base };
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![h, v], base),
            ("output_norm.weight".to_string(), vec![h], F32),
            ("output.weight".to_string(), vec![h, v], head),
        ];
        for i in 0..n {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            t.extend([
                (name("attn_norm"), vec![h], F32),
                (name("ffn_norm"), vec![h], F32),
                (name("attn_q"), vec![h, h], base),
                (name("attn_k"), vec![h, kv], base),
                (name("attn_v"), vec![h, kv], mixed(i)),
                (name("attn_output"), vec![h, h], base),
                (name("ffn_gate"), vec![h, f], base),
                (name("ffn_up"), vec![h, f], base),
                (name("ffn_down"), vec![f, h], mixed(i)),
            ]);
        }
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(8u64.to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "llama");
        u32_kv(&mut b, "llama.block_count", 32);
        u32_kv(&mut b, "llama.context_length", 131_072);
        u32_kv(&mut b, "llama.embedding_length", 4096);
        u32_kv(&mut b, "llama.feed_forward_length", 14336);
        u32_kv(&mut b, "llama.attention.head_count", 32);
        u32_kv(&mut b, "llama.attention.head_count_kv", 8);
        // The tokenizer: 128 256 strings, what makes real headers large.
        string(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(v.to_le_bytes());
        for i in 0..v {
            string(&mut b, &format!("token-{i}"));
        }
        let mut offset = 0u64;
        for (name, dims, (ty, elems, bytes)) in &t {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (dims.iter().product::<u64>() / elems * bytes).div_ceil(32) * 32;
        }
        b
    }
}

/// A ModelDeployment of `file` from the scene's hub, kept to the nodes
/// labelled `role`: 4096 tokens of context, one sequence.
fn gguf_model(ns: &str, name: &str, hub: &str, file: &str, role: &str, engine: &str) -> Value {
    json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"format": "gguf",
                      "source": {"huggingFace": {"repo": "town/llama-8b-gguf", "endpoint": hub,
                                                 "files": [file]}}},
            "engine": {"kind": engine},
            "placement": {"maxGpusPerReplica": 1,
                          "nodeSelector": {SCENE_LABEL: format!("{ns}-{role}")}},
            "serving": {"contextLength": 4096, "maxConcurrentSequences": 1},
        }
    })
}

#[tokio::test]
async fn gguf_8b_models_are_sized_from_their_header_on_the_hub_and_placed_on_what_holds_them()
-> Result<()> {
    let mut s = Scene::new("gguf").await?;
    let ns = s.ns.name.clone();
    let (p4, p40, t4) = (s.node_name("p4"), s.node_name("p40"), s.node_name("t4"));
    // As GPU feature discovery labels these cards (MiB, compute capability).
    let cards = [
        (
            &p4,
            "p4",
            Card {
                product: "Tesla-P4",
                memory_mib: 7680,
                cc: (6, 1),
            },
        ),
        (
            &p40,
            "p40",
            Card {
                product: "Tesla-P40",
                memory_mib: 24576,
                cc: (6, 1),
            },
        ),
        (
            &t4,
            "t4",
            Card {
                product: "Tesla-T4",
                memory_mib: 15360,
                cc: (7, 5),
            },
        ),
    ];
    for (name, role, card) in &cards {
        let labels = json!({SCENE_LABEL: format!("{ns}-{role}"),
                            "copyhold.dev/e2e-gguf": format!("{ns}-any")});
        s.nodes.add_card(name, 1, card, labels, json!(null)).await?;
    }
    let work = std::env::temp_dir().join(format!("copyhold-e2e-gguf-{}", std::process::id()));
    let repo = work.join("town/llama-8b-gguf");
    std::fs::create_dir_all(&repo)?;
    std::fs::write(repo.join("llama-8b-Q4_K_M.gguf"), gguf::llama_8b(true))?;
    std::fs::write(repo.join("llama-8b-F16.gguf"), gguf::llama_8b(false))?;
    // A header of a version no one writes.
    let mut broken = gguf::llama_8b(true);
    broken[4] = 9;
    std::fs::write(repo.join("broken.gguf"), broken)?;
    let (hub, hub_state) = spawn_local(&work, HubOptions::default()).await?;

    let api: Api<ModelDeployment> = Api::namespaced(s.client.clone(), &ns);
    let apply = |md: Value| {
        let api = api.clone();
        async move {
            let name = md["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            api.patch(
                &name,
                &PatchParams::apply("copyhold-e2e").force(),
                &Patch::Apply(&md),
            )
            .await
        }
    };
    let q4 = "llama-8b-Q4_K_M.gguf";
    apply(gguf_model(&ns, "q4-on-p4", &hub, q4, "p4", "copyhold")).await?;
    apply(gguf_model(
        &ns,
        "f16-on-p4",
        &hub,
        "llama-8b-F16.gguf",
        "p4",
        "copyhold",
    ))
    .await?;
    apply(gguf_model(&ns, "q4-on-p40", &hub, q4, "p40", "copyhold")).await?;
    apply(gguf_model(&ns, "q4-vllm-on-t4", &hub, q4, "t4", "vllm")).await?;
    apply(gguf_model(&ns, "q4-vllm-on-p4", &hub, q4, "p4", "vllm")).await?;

    // copyhold-node keeps the Q4_K/Q6_K blocks on the GPU (its gemv_q4_k
    // and gemv_q6_k kernels), widens only the embedding table to f16 and
    // adds a 128 MiB f16 buffer for prefill: 6.7 GiB a replica at one
    // sequence of 4096 tokens, which the P4's 6.75 usable GiB hold.
    let held = "weights 5.4 GiB (GGUF Q4_K+Q6_K, 4.58 GiB in the file, held as stored on the GPU, the embedding widened to f16, plus a 0.1 GiB f16 buffer for prefill) + KV cache 0.5 GiB for 4096 tokens + overhead 0.8 GiB";
    let st = s.placed("q4-on-p4").await?;
    let (status, reason, message) = placed(&st).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert_eq!(st.nodes, vec![p4.clone()]);
    assert_eq!(st.gpu_class.as_deref(), Some("Tesla-P4"));
    assert_eq!(
        message,
        format!(
            "1 replica(s) of 1 GPU(s) each on Tesla-P4; needs 6.7 GiB per replica: {held}; of 6.8 GiB usable on {p4}'s Tesla-P4"
        )
    );
    // The f16 file: 8.03 G elements × 2 bytes, 16.7 GiB a replica.
    // Refused: InsufficientVRAM, or NoCompatibleGPU when a larger card
    // outside the selector (the P40) would hold it.
    let st = s.placed("f16-on-p4").await?;
    let (status, reason, message) = placed(&st).unwrap_or_default();
    assert_eq!(status, "False", "{reason}: {message}");
    assert!(
        ["InsufficientVRAM", "NoCompatibleGPU"].contains(&reason.as_str()),
        "{reason}: {message}"
    );
    assert!(st.nodes.is_empty(), "{:?}", st.nodes);
    let st = s.placed("q4-on-p40").await?;
    let (status, reason, message) = placed(&st).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert_eq!(st.nodes, vec![p40.clone()]);
    assert_eq!(st.gpu_class.as_deref(), Some("Tesla-P40"));
    let want = format!(
        "1 replica(s) of 1 GPU(s) each on Tesla-P40; needs 6.7 GiB per replica: {held}; of 21.6 GiB usable on {p40}'s Tesla-P40"
    );
    assert_eq!(message, want);

    // vLLM keeps the blocks (4.58 GiB) but needs compute capability 7.0.
    let st = s.placed("q4-vllm-on-t4").await?;
    let (status, reason, message) = placed(&st).unwrap_or_default();
    assert_eq!(status, "True", "{reason}: {message}");
    assert!(message.contains("needs 5.8 GiB per replica: weights 4.6 GiB (GGUF Q4_K+Q6_K, 4.58 GiB in the file, held as stored)"), "{message}");
    assert_eq!(st.nodes, vec![t4]);
    let st = s.placed("q4-vllm-on-p4").await?;
    let (status, reason, message) = placed(&st).unwrap_or_default();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NoCompatibleGPU"),
        "{message}"
    );
    assert!(message.contains("compute capability 7.0"), "{message}");

    // A malformed header: a condition and an Event naming the file.
    apply(gguf_model(
        &ns,
        "broken",
        &hub,
        "broken.gguf",
        "p40",
        "copyhold",
    ))
    .await?;
    let st = s.placed("broken").await?;
    let (status, reason, message) = placed(&st).unwrap_or_default();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ModelUnreadable"),
        "{message}"
    );
    assert!(
        message.contains("broken.gguf") && message.contains("GGUF version 9"),
        "{message}"
    );
    let events: Api<Event> = Api::namespaced(s.client.clone(), &ns);
    let warned = eventually(Duration::from_secs(30), || async {
        let notes: Vec<String> = events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("ModelUnreadable"))
            .filter_map(|e| e.message)
            .collect();
        match notes.is_empty() {
            false => Ok(notes),
            true => bail!("no ModelUnreadable Event yet"),
        }
    })
    .await?;
    assert!(
        warned.iter().any(|m| m.contains("GGUF version 9")),
        "{warned:?}"
    );

    // Only the headers were read, in ranges, through the LFS redirect.
    let log = hub_state.access_log();
    let content: Vec<_> = log.iter().filter(|a| a.path.starts_with("/lfs/")).collect();
    assert!(!content.is_empty(), "{log:?}");
    assert!(content.iter().all(|a| a.status == 206 && a.range.as_deref().is_some_and(|r| r.starts_with("bytes="))), "{log:?}");
    let _ = std::fs::remove_dir_all(&work);
    s.cleanup().await
}
