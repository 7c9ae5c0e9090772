//! `ModelDeployment`: an open-weight model served by copyhold inference nodes
//! (or vLLM) on the GPUs a community owns.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, Priority};

/// A model served behind an OpenAI-compatible endpoint, placed on GPUs that
/// fit it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "copyhold.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    category = "copyhold",
    namespaced,
    status = "ModelDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".status.servedModelName",
        description = "Name clients put in the request's model field"
    ),
    printcolumn(name = "Engine", type_ = "string", json_path = ".spec.engine.kind"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "GPU", type_ = "string", json_path = ".status.gpuClass"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Download",
        type_ = "string",
        json_path = ".status.download.summary"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Where the weights are and what they are.
    pub model: ModelSpec,

    /// Which engine serves the model.
    #[serde(default)]
    pub engine: EngineSpec,

    /// Desired number of serving replicas; `kubectl scale md/NAME --replicas=N`
    /// sets it. The EnergyBudget ladder may run fewer (never below
    /// `autoscaling.minReplicas`) and says so in the status.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,

    /// Replica bounds and the in-flight target the gateway scales towards.
    /// The operator checks minReplicas <= maxReplicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,

    /// What each replica must be able to hold and run.
    #[serde(default)]
    pub serving: ServingSpec,

    /// Which GPUs may be used. Empty means any GPU that fits.
    #[serde(default)]
    pub placement: PlacementSpec,

    /// Order of shedding when an EnergyBudget must cut draw.
    #[serde(default)]
    pub priority: Priority,

    /// Name of the StintQuota (same namespace) whose members may call this
    /// model through the gateway. Without one, the gateway refuses calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub stint_quota: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

/// The model: its source, format, name and (optionally) its size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Exactly one place the weights are read from, inside the user's own
    /// network: nothing reaches a public hub at run time.
    pub source: ModelSource,

    /// File format of the weights.
    #[serde(default)]
    pub format: ModelFormat,

    /// Name clients use in the request's `model` field. Defaults to the
    /// ModelDeployment's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"), length(max = 128))]
    pub served_name: Option<String>,

    /// Size of the model, when the controller cannot read `config.json` and the
    /// safetensors headers from the source (a PVC it does not mount, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizing: Option<InlineSizing>,
}

/// Exactly one of `hostPath`, `pvc`, `http`, `oci` or `huggingFace`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("minProperties" = 1, "maxProperties" = 1))]
pub struct ModelSource {
    /// A directory on every GPU node (for example a shared NFS mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    /// A PersistentVolumeClaim in the same namespace holding the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    /// An http(s) server inside the user's network serving the model
    /// directory; the controller reads `config.json` and safetensors headers
    /// from it with range requests, the node downloads it at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSource>,
    /// An OCI artifact or image in the user's own registry holding the model
    /// directory, mounted as an image volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<OciSource>,
    /// A repository on the Hugging Face Hub, or on a mirror speaking its
    /// protocol (`copyhold models serve`): fetched by each node Pod's init
    /// container into the node's verified model cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugging_face: Option<HuggingFaceSource>,
}

/// A Hub repository.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HuggingFaceSource {
    /// Repository id, `OWNER/NAME` (e.g. `meta-llama/Llama-3.1-8B-Instruct`).
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"),
        length(max = 200)
    )]
    pub repo: String,
    /// Branch, tag or commit.
    #[serde(default = "default_revision")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"), length(max = 128))]
    pub revision: String,
    /// Glob allow-list over the repo's paths. Empty: config.json,
    /// generation_config.json, tokenizer*, special_tokens_map.json,
    /// *.safetensors and model.safetensors.index.json; for a GGUF model name
    /// its one file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Secret (same namespace) whose key `token` holds a Hugging Face token,
    /// for gated or private repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(max = 253)
    )]
    pub token_secret: Option<String>,
    /// The Hub's address; a local mirror's for air-gapped sites. Default
    /// `https://huggingface.co`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub endpoint: Option<String>,
}

/// The public Hub.
pub const HUGGING_FACE_ENDPOINT: &str = "https://huggingface.co";

fn default_revision() -> String {
    "main".into()
}

impl HuggingFaceSource {
    /// The endpoint, without a trailing slash.
    pub fn endpoint(&self) -> String {
        self.endpoint
            .as_deref()
            .unwrap_or(HUGGING_FACE_ENDPOINT)
            .trim_end_matches('/')
            .to_string()
    }

    /// The base URL of the revision's files (`…/resolve/REV`): what the
    /// controller reads `config.json` and the safetensors headers from.
    pub fn resolve_url(&self) -> String {
        format!(
            "{}/{}/resolve/{}",
            self.endpoint(),
            self.repo,
            self.revision
        )
    }
}

/// A directory on the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute path of the model directory on the node.
    #[schemars(regex(pattern = r"^/"), length(min = 1, max = 4096))]
    pub path: String,
}

/// A PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    /// Name of the claim, in the ModelDeployment's namespace.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub claim_name: String,
    /// Directory inside the volume holding the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub sub_path: Option<String>,
}

/// An http(s) URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSource {
    /// Base URL of the model directory (`…/config.json` must resolve).
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 2048))]
    pub url: String,
}

/// An OCI reference.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OciSource {
    /// Image reference, e.g. `registry.town.local/models/qwen2.5-0.5b:1`.
    #[schemars(length(min = 1, max = 1024))]
    pub reference: String,
}

/// Weight file formats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// Hugging Face safetensors (single or sharded), f32/f16/bf16.
    #[default]
    Safetensors,
    /// llama.cpp GGUF, possibly quantized.
    Gguf,
}

/// Weight element types.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

/// The numbers placement needs, for when the controller cannot read the
/// model. Either all architecture fields are given, or `weightBytes` and
/// `kvBytesPerToken` directly.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InlineSizing {
    /// Bytes of weights as stored (e.g. `16Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_bytes: Option<Quantity>,
    /// Bytes of KV cache per token of context (all layers, K and V).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_bytes_per_token: Option<i64>,
    /// Element type of the weights; bf16 needs compute capability 8.0 unless
    /// the engine converts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Dtype>,
    /// Number of decoder layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub num_layers: Option<i32>,
    /// Number of key/value heads (GQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub num_kv_heads: Option<i32>,
    /// Dimension of one attention head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub head_dim: Option<i32>,
}

/// Engines.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// copyhold's own inference node (`copyhold-node serve`), sm_60 and newer.
    #[default]
    Copyhold,
    /// vLLM's OpenAI server (`vllm serve`), as an alternative image.
    Vllm,
}

/// The engine and its container.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Which engine serves the model.
    #[serde(default)]
    pub kind: EngineKind,
    /// Container image; defaults to the controller's image for the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Extra command-line arguments appended to the engine's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables for the engine container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Replica bounds for autoscaling and shedding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// Fewest replicas: the energy ladder never sheds below this.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: i32,
    /// Most replicas the autoscaler may run.
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// In-flight requests per replica the autoscaler aims for: it runs
    /// ceil(in-flight ÷ this) replicas, between minReplicas and maxReplicas.
    #[serde(default = "default_in_flight")]
    #[schemars(range(min = 1, max = 4096))]
    pub target_in_flight_per_replica: i32,
    /// How long the autoscaler waits before scaling down: it runs the
    /// highest replica count it recommended within this window (the HPA's
    /// `behavior.scaleDown.stabilizationWindowSeconds`). Scaling up is at once.
    #[serde(default = "default_stabilization")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"))]
    pub scale_down_stabilization: String,
    /// How long the gateway holds a request while the model has no ready
    /// replica (scaled to zero, or starting): past it, the client gets 503
    /// with `Retry-After`.
    #[serde(default = "default_scale_from_zero_timeout")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"))]
    pub scale_from_zero_timeout: String,
    /// Scale to zero replicas after this long without a request (only when
    /// minReplicas is 0). Absent: the autoscaler keeps at least one replica
    /// once the model has served, and only a request wakes a model at zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"))]
    pub scale_to_zero_after: Option<String>,
}

fn default_in_flight() -> i32 {
    8
}

fn default_stabilization() -> String {
    "300s".into()
}

fn default_scale_from_zero_timeout() -> String {
    "120s".into()
}

/// What each replica must hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServingSpec {
    /// Longest context (prompt + completion tokens) one sequence may use.
    #[serde(default = "default_context")]
    #[schemars(range(min = 16, max = 1048576))]
    pub context_length: i32,
    /// Sequences served at once per replica; KV cache is sized for
    /// `contextLength × maxConcurrentSequences` tokens unless
    /// `kvCacheMemory` says otherwise.
    #[serde(default = "default_sequences")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_concurrent_sequences: i32,
    /// KV cache memory per replica (e.g. `4Gi`), overriding the size derived
    /// from context and sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_memory: Option<Quantity>,
    /// Fraction of each GPU's memory the engine may use.
    #[serde(default = "default_gpu_util")]
    #[schemars(range(min = 0.1, max = 0.99))]
    pub gpu_memory_utilization: f64,
    /// CPU and memory requests/limits of the engine container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

impl Default for ServingSpec {
    fn default() -> Self {
        Self {
            context_length: default_context(),
            max_concurrent_sequences: default_sequences(),
            kv_cache_memory: None,
            gpu_memory_utilization: default_gpu_util(),
            resources: None,
        }
    }
}

fn default_context() -> i32 {
    4096
}
fn default_sequences() -> i32 {
    4
}
fn default_gpu_util() -> f64 {
    0.9
}

/// Constraints on where replicas go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// GPU products (GPU Feature Discovery's `nvidia.com/gpu.product`, e.g.
    /// `Tesla-P40`) allowed; empty allows all that fit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_products: Vec<String>,
    /// Lowest compute capability allowed, e.g. `7.0`. The controller also
    /// derives one from the model (6.0 for our kernels, 8.0 for bf16 compute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,2}\.[0-9]$"))]
    pub min_compute_capability: Option<String>,
    /// Most GPUs one replica may span (layers split across the GPUs of one
    /// node when one card is too small).
    #[serde(default = "default_max_gpus")]
    #[schemars(range(min = 1, max = 16))]
    pub max_gpus_per_replica: i32,
    /// Extra node labels a node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            gpu_products: Vec::new(),
            min_compute_capability: None,
            max_gpus_per_replica: default_max_gpus(),
            node_selector: BTreeMap::new(),
        }
    }
}

fn default_max_gpus() -> i32 {
    4
}

/// Observed state, written by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Placed`, `Ready`, `Throttled`, `Shed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One word for `kubectl get`: Pending, Placed, Ready, Shed, Unplaceable, Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Name clients put in the request's `model` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
    /// Replicas the Deployment runs (after any shedding).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas passing their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the serving Pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// GPU product chosen by placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_class: Option<String>,
    /// GPUs each replica uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_replica: Option<i32>,
    /// Nodes the replicas were placed on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// In-cluster URL of the OpenAI-compatible endpoint (the Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Memory one replica needs, as derived from the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_memory_bytes: Option<i64>,
    /// Energy the replicas used since creation, in watt-hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_wh: Option<f64>,
    /// The EnergyBudget that shed replicas, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shed_by: Option<String>,
    /// Replicas the autoscaler decided on (after the energy budget's cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Why the autoscaler decided on `desiredReplicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_reason: Option<String>,
    /// Requests in flight or held for this model, summed over the live
    /// gateway replicas, as the autoscaler last read them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<i64>,
    /// The model's download into the node cache (huggingFace sources), as
    /// the fetching init container reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<DownloadStatus>,
}

/// Progress of a model download.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DownloadStatus {
    /// `resolving`, `downloading`, `verifying`, `done`, `failed`.
    pub phase: String,
    /// The commit the revision resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub bytes_done: i64,
    pub bytes_total: i64,
    /// Bytes a second.
    pub rate: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// One line for `kubectl get`: `45% 1.2/2.7 GiB 80 MiB/s ETA 19s`.
    pub summary: String,
}
