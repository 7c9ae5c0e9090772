//! Model sizing: how much GPU memory and which compute capability one replica
//! of a model needs, derived from its `config.json` and safetensors headers
//! (or from the numbers a user gave inline when the controller cannot read
//! the model).
//!
//! Pure logic: no I/O. [`crate::serving::model_source`] fetches the inputs.
//!
//! One replica needs, on the GPUs of one node:
//!
//! - the weights, as stored (bytes from the safetensors headers; the config's
//!   shape is only an estimate used when no header is available),
//! - the KV cache: `layers × kv_heads × head_dim × 2 (K and V) × dtype bytes`
//!   per token, times the tokens the user asked for
//!   (`contextLength × maxConcurrentSequences`, or `kvCacheMemory`),
//! - a runtime overhead for activations, CUDA context and allocator slack:
//!   5 % of the weights plus 512 MiB (see [`ModelNeeds::overhead_bytes`]),
//! - split over `N` GPUs ([`ModelNeeds::bytes_on_gpus`]): the 512 MiB on
//!   every GPU, and a tied LM head's copy of the embedding.
//!
//! bf16 weights on cards older than sm_80 cost what they cost on newer
//! ones: `copyhold-node` converts them element by element to f16 (2 bytes,
//! as stored). Only a tensor holding values beyond f16's range (±65504)
//! is kept in f32 there, which no header shows; the node then fails at
//! load with an error naming the bytes rather than serving wrong output.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::resources::model_deployment::{Dtype, EngineKind, InlineSizing, ServingSpec};
use crate::resources::quantity;
use crate::serving::gguf_header::GgufModel;

/// Compute capability our own kernels need (Pascal, sm_60).
pub const COPYHOLD_MIN_CC: (u8, u8) = (6, 0);
/// Compute capability bf16 arithmetic needs (Ampere, sm_80).
pub const BF16_COMPUTE_MIN_CC: (u8, u8) = (8, 0);
/// Fixed part of the per-replica runtime overhead: CUDA context, cuBLAS
/// workspace, allocator slack.
pub const OVERHEAD_FIXED_BYTES: u64 = 512 * 1024 * 1024;
/// Proportional part of the overhead, in percent of the weights: activations
/// and temporary buffers grow with the hidden size, which grows with the
/// weights.
pub const OVERHEAD_WEIGHT_PERCENT: u64 = 5;

/// Why a model could not be sized.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SizingError {
    #[error("config.json is not a usable model config: {0}")]
    BadConfig(String),
    #[error("safetensors header is malformed: {0}")]
    BadHeader(String),
    #[error("inline sizing is incomplete: {0}")]
    IncompleteInline(String),
    #[error("inline sizing is inconsistent: {0}")]
    InconsistentInline(String),
    #[error("serving.kvCacheMemory: {0}")]
    BadKvCacheMemory(String),
    #[error("compute capability `{0}` is not of the form MAJOR.MINOR such as 7.0")]
    BadComputeCapability(String),
    #[error("the model's numbers overflow 64 bits: {0}")]
    Overflow(&'static str),
    #[error(
        "the GGUF file holds {ty} tensors, which copyhold-node does not load (it loads {}); use a file quantized to those, or engine vllm",
        COPYHOLD_GGUF_TYPES.join(", ")
    )]
    GgufTypeUnsupported { ty: String },
}

/// The ggml types `copyhold-node` loads from GGUF files
/// (`inference-node/src/model/gguf.rs`, `dtype_of`).
pub const COPYHOLD_GGUF_TYPES: &[&str] =
    &["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"];
/// Compute capability vLLM's kernels for GGUF block formats need (Volta).
pub const VLLM_GGUF_MIN_CC: (u8, u8) = (7, 0);

/// Bytes one element of a dtype takes.
pub fn dtype_bytes(d: Dtype) -> u64 {
    match d {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::Bf16 => 2,
    }
}

/// The dtype named by a config's `torch_dtype`/`dtype` (`"bfloat16"`) or a
/// safetensors header (`"BF16"`); `None` for anything we cannot serve.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    match s.to_ascii_lowercase().as_str() {
        "float32" | "f32" | "fp32" | "float" => Some(Dtype::F32),
        "float16" | "f16" | "fp16" | "half" => Some(Dtype::F16),
        "bfloat16" | "bf16" => Some(Dtype::Bf16),
        _ => None,
    }
}

/// Parses `"7.0"` into `(7, 0)`.
pub fn parse_compute_capability(s: &str) -> Result<(u8, u8), SizingError> {
    let bad = || SizingError::BadComputeCapability(s.to_string());
    let (major, minor) = s.trim().split_once('.').ok_or_else(bad)?;
    Ok((
        major.parse().map_err(|_| bad())?,
        minor.parse().map_err(|_| bad())?,
    ))
}

/// Whether serving needs bf16 *arithmetic* on the GPU. Our engine converts
/// bf16 weights to f16/f32 on load for cards older than sm_80, so bf16
/// weights alone do not need it; vLLM's bf16 kernels do.
pub fn needs_bf16_compute(engine: EngineKind, weights_dtype: Dtype) -> bool {
    matches!(engine, EngineKind::Vllm) && weights_dtype == Dtype::Bf16
}

/// The lowest compute capability a replica may run on: 6.0 for our kernels,
/// 8.0 when bf16 compute is needed, raised further by
/// `placement.minComputeCapability`.
pub fn min_compute_capability(bf16_compute: bool, placement_min: Option<(u8, u8)>) -> (u8, u8) {
    let base = if bf16_compute {
        BF16_COMPUTE_MIN_CC
    } else {
        COPYHOLD_MIN_CC
    };
    placement_min.map_or(base, |p| p.max(base))
}

/// The fields of a Hugging Face `config.json` sizing needs. Unknown fields
/// are ignored so new model families still parse.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub num_hidden_layers: u32,
    pub num_attention_heads: u32,
    /// Absent in configs without grouped-query attention: then equal to the
    /// number of attention heads.
    #[serde(default)]
    pub num_key_value_heads: Option<u32>,
    /// Absent in most older configs: then `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<u32>,
    pub hidden_size: u64,
    #[serde(default)]
    pub intermediate_size: Option<u64>,
    #[serde(default)]
    pub vocab_size: Option<u64>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// transformers < 5 writes `torch_dtype`.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    /// transformers ≥ 5 writes `dtype`.
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
}

impl HfConfig {
    /// Parses and checks a `config.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SizingError> {
        let c: HfConfig =
            serde_json::from_slice(bytes).map_err(|e| SizingError::BadConfig(e.to_string()))?;
        if c.num_hidden_layers == 0 || c.num_attention_heads == 0 || c.hidden_size == 0 {
            return Err(SizingError::BadConfig(
                "num_hidden_layers, num_attention_heads and hidden_size must be positive".into(),
            ));
        }
        if c.num_key_value_heads == Some(0) || c.head_dim == Some(0) {
            return Err(SizingError::BadConfig(
                "num_key_value_heads and head_dim must be positive".into(),
            ));
        }
        if c.head_dim.is_none()
            && !c
                .hidden_size
                .is_multiple_of(u64::from(c.num_attention_heads))
        {
            return Err(SizingError::BadConfig(
                "hidden_size is not a multiple of num_attention_heads and head_dim is not given"
                    .into(),
            ));
        }
        Ok(c)
    }

    /// Key/value heads (grouped-query attention).
    pub fn kv_heads(&self) -> u64 {
        u64::from(self.num_key_value_heads.unwrap_or(self.num_attention_heads))
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> u64 {
        self.head_dim.map_or_else(
            || self.hidden_size / u64::from(self.num_attention_heads),
            u64::from,
        )
    }

    /// The dtype the config declares, if it declares one we know.
    pub fn declared_dtype(&self) -> Option<Dtype> {
        self.dtype
            .as_deref()
            .or(self.torch_dtype.as_deref())
            .and_then(parse_dtype)
    }

    /// Whether q/k/v projections carry a bias (Qwen2 does without saying so).
    fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(false)
            || self.architectures.iter().any(|a| a.starts_with("Qwen2"))
    }

    /// Parameters of a Llama-family decoder of this shape. Only an estimate
    /// for when no safetensors header can be read: the header is the truth.
    pub fn estimated_parameters(&self) -> Result<u64, SizingError> {
        let of = || SizingError::Overflow("parameter count");
        let h = self.hidden_size;
        let hd = self.head_dim();
        let q = u64::from(self.num_attention_heads)
            .checked_mul(hd)
            .ok_or_else(of)?;
        let kv = self.kv_heads().checked_mul(hd).ok_or_else(of)?;
        let inter = self.intermediate_size.unwrap_or(4 * h);
        let vocab = self.vocab_size.unwrap_or(0);
        let bias = if self.qkv_bias() { q + 2 * kv } else { 0 };
        // q, k, v, o projections + gate/up/down + two RMSNorm weights.
        let per_layer = h
            .checked_mul(q + 2 * kv)
            .and_then(|a| a.checked_add(q.checked_mul(h)?))
            .and_then(|a| a.checked_add(3u64.checked_mul(h)?.checked_mul(inter)?))
            .and_then(|a| a.checked_add(2 * h + bias))
            .ok_or_else(of)?;
        let embeddings = vocab
            .checked_mul(h)
            .and_then(|e| e.checked_mul(if self.tie_word_embeddings { 1 } else { 2 }))
            .ok_or_else(of)?;
        per_layer
            .checked_mul(u64::from(self.num_hidden_layers))
            .and_then(|l| l.checked_add(embeddings))
            .and_then(|t| t.checked_add(h))
            .ok_or_else(of)
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data_offsets: [u64; 2],
}

/// A safetensors file's header: tensor name → dtype, shape and byte range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SafetensorsHeader {
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

/// Bytes per element of a safetensors dtype name, for checking a header's
/// offsets against its shapes.
fn safetensors_dtype_bytes(d: &str) -> Option<u64> {
    Some(match d {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F8_E4M3" | "F8_E5M2" | "I8" | "U8" | "BOOL" => 1,
        _ => return None,
    })
}

impl SafetensorsHeader {
    /// The header's length from a file's first 8 bytes (little-endian u64).
    pub fn header_len(prefix: &[u8]) -> Result<u64, SizingError> {
        let b: [u8; 8] = prefix
            .get(..8)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| SizingError::BadHeader("file is shorter than 8 bytes".into()))?;
        Ok(u64::from_le_bytes(b))
    }

    /// Parses the JSON header (the bytes after the length prefix) and checks
    /// that each tensor's byte range matches its shape and dtype.
    pub fn parse(json: &[u8]) -> Result<Self, SizingError> {
        let bad = |m: String| SizingError::BadHeader(m);
        let raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
        let mut out = SafetensorsHeader::default();
        for (name, v) in raw {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, val) in m {
                        if let Some(s) = val.as_str() {
                            out.metadata.insert(k.clone(), s.to_string());
                        }
                    }
                }
                continue;
            }
            let t: TensorInfo =
                serde_json::from_value(v).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let [start, end] = t.data_offsets;
            if end < start {
                return Err(bad(format!(
                    "tensor `{name}`: data_offsets end before start"
                )));
            }
            if let Some(eb) = safetensors_dtype_bytes(&t.dtype) {
                let expect = t
                    .shape
                    .iter()
                    .try_fold(eb, |a, &d| a.checked_mul(d))
                    .ok_or_else(|| bad(format!("tensor `{name}`: shape overflows")))?;
                if expect != end - start {
                    return Err(bad(format!(
                        "tensor `{name}`: {} bytes by offsets but {expect} by shape {:?} {}",
                        end - start,
                        t.shape,
                        t.dtype
                    )));
                }
            }
            out.tensors.insert(name, t);
        }
        Ok(out)
    }

    /// Bytes of tensor data, by safetensors dtype name.
    pub fn bytes_by_dtype(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for t in self.tensors.values() {
            *m.entry(t.dtype.clone()).or_insert(0) += t.data_offsets[1] - t.data_offsets[0];
        }
        m
    }
}

/// Bytes of the embedding a tied LM head uses: the embedding tensor's own
/// bytes from the headers, else `vocab × hidden` in the weights' dtype; 0
/// when the config does not tie them or the files carry an `lm_head`.
fn tied_head_bytes(
    config: &HfConfig,
    headers: &[SafetensorsHeader],
    dtype: Dtype,
) -> Result<u64, SizingError> {
    let tensors = || headers.iter().flat_map(|h| h.tensors.iter());
    if !config.tie_word_embeddings || tensors().any(|(k, _)| k.ends_with("lm_head.weight")) {
        return Ok(0);
    }
    if let Some((_, t)) = tensors().find(|(k, _)| k.ends_with("embed_tokens.weight")) {
        return Ok(t.data_offsets[1] - t.data_offsets[0]);
    }
    config
        .vocab_size
        .unwrap_or(0)
        .checked_mul(config.hidden_size)
        .and_then(|e| e.checked_mul(dtype_bytes(dtype)))
        .ok_or(SizingError::Overflow("embedding bytes"))
}

/// `GGUF Q4_K+Q6_K, 4.58 GiB in the file, held as stored`.
fn gguf_note(model: &GgufModel, formats: &[&str], on_gpu: &str) -> String {
    let kinds = if formats.is_empty() {
        model.by_type.keys().copied().collect::<Vec<_>>().join("+")
    } else {
        formats.join("+")
    };
    let gib = model.stored_bytes() as f64 / (1u64 << 30) as f64;
    format!("GGUF {kinds}, {gib:.2} GiB in the file, {on_gpu}")
}

/// Most values `copyhold-node` dequantizes to f16 at once for a prefill
/// GEMM on block weights (`DEQUANT_CHUNK_ELEMS` in
/// `inference-node/src/cuda/backend/quant.rs`): larger matrices go a chunk
/// of rows at a time.
pub const COPYHOLD_DEQUANT_CHUNK_ELEMS: u64 = 1 << 26;

/// Bytes `copyhold-node` adds on the GPU to a GGUF file's blocks: a
/// block-format embedding table widened to f16 (its blocks were counted as
/// stored; the row gather has no block kernel), and the f16 buffer its
/// prefill GEMMs dequantize block weights into: whole rows of the largest
/// matrix, taken as vocab × hidden (the embedding's elements), up to
/// [`COPYHOLD_DEQUANT_CHUNK_ELEMS`], at the power-of-two capacity the node
/// allocates.
fn copyhold_block_extra(model: &GgufModel) -> BlockExtra {
    let Some((ty, elements)) = model.embedding else {
        return BlockExtra::default();
    };
    let widened_embedding = if ty.is_block_format() {
        elements
            .saturating_mul(2)
            .saturating_sub(elements / ty.block_elems * ty.block_bytes)
    } else {
        0
    };
    let hidden = model.hidden.max(1);
    let chunk_rows = (COPYHOLD_DEQUANT_CHUNK_ELEMS / hidden).max(1);
    let chunk = elements.min(chunk_rows.saturating_mul(hidden));
    let capacity = chunk
        .max(256)
        .checked_next_power_of_two()
        .unwrap_or(u64::MAX);
    BlockExtra {
        widened_embedding,
        prefill_buffer: capacity.saturating_mul(2),
    }
}

/// What [`copyhold_block_extra`] adds, in its two parts.
#[derive(Debug, Clone, Copy, Default)]
struct BlockExtra {
    widened_embedding: u64,
    prefill_buffer: u64,
}

impl BlockExtra {
    fn total(self) -> u64 {
        self.widened_embedding.saturating_add(self.prefill_buffer)
    }

    /// `held as stored on the GPU, the embedding widened to f16, plus a
    /// 0.1 GiB f16 buffer for prefill`.
    fn note(self) -> String {
        let embedding = if self.widened_embedding > 0 {
            ", the embedding widened to f16"
        } else {
            ""
        };
        let gib = self.prefill_buffer as f64 / (1u64 << 30) as f64;
        format!("held as stored on the GPU{embedding}, plus a {gib:.1} GiB f16 buffer for prefill")
    }
}

/// What the user asked each replica to hold and how it will run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizingInput<'a> {
    pub serving: &'a ServingSpec,
    pub engine: EngineKind,
    /// `placement.minComputeCapability`, parsed.
    pub placement_min_cc: Option<(u8, u8)>,
}

/// What one replica of a model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelNeeds {
    /// Bytes of weights as stored.
    pub weight_bytes: u64,
    /// The dtype most weight bytes are in.
    pub weights_dtype: Dtype,
    /// KV cache bytes per token of context, all layers, K and V.
    pub kv_bytes_per_token: u64,
    /// Tokens of KV cache one replica holds.
    pub context_tokens: u64,
    /// `kv_bytes_per_token × context_tokens`, or `serving.kvCacheMemory`.
    pub kv_cache_bytes: u64,
    /// Decoder layers: a replica never spans more GPUs than layers.
    /// `u32::MAX` when inline sizing did not say.
    pub num_layers: u32,
    /// Lowest compute capability a replica may run on.
    pub min_compute_capability: (u8, u8),
    /// Bytes of the embedding a tied LM head shares with it: a replica
    /// split over GPUs holds a second copy on the last one (as
    /// `copyhold-node` does). 0 when the head is untied or not known.
    pub tied_head_bytes: u64,
    /// How the weights were counted when the GPU does not hold them as
    /// stored (GGUF block formats): for the `Placed` condition.
    pub weights_note: Option<String>,
}

impl ModelNeeds {
    /// Sizes a model from its config and the headers of all its safetensors
    /// files. With no header the weights are estimated from the config's
    /// shape in its declared dtype.
    pub fn from_model(
        config: &HfConfig,
        headers: &[SafetensorsHeader],
        input: &SizingInput<'_>,
    ) -> Result<Self, SizingError> {
        let (weight_bytes, weights_dtype) = if headers.is_empty() {
            let dtype = config.declared_dtype().unwrap_or(Dtype::F16);
            let bytes = config
                .estimated_parameters()?
                .checked_mul(dtype_bytes(dtype))
                .ok_or(SizingError::Overflow("weight bytes"))?;
            (bytes, dtype)
        } else {
            let mut by: BTreeMap<String, u64> = BTreeMap::new();
            for h in headers {
                for (d, b) in h.bytes_by_dtype() {
                    let e = by.entry(d).or_insert(0);
                    *e = e
                        .checked_add(b)
                        .ok_or(SizingError::Overflow("weight bytes"))?;
                }
            }
            let total = by
                .values()
                .try_fold(0u64, |a, &b| a.checked_add(b))
                .ok_or(SizingError::Overflow("weight bytes"))?;
            // The dominant floating dtype; quantized or integer-only files
            // fall back to what the config declares.
            let dominant = by
                .iter()
                .filter_map(|(d, b)| parse_dtype(d).map(|d| (*b, d)))
                .max_by_key(|(b, _)| *b)
                .map(|(_, d)| d);
            let dtype = dominant
                .or_else(|| config.declared_dtype())
                .unwrap_or(Dtype::F16);
            (total, dtype)
        };
        let kv_per_token = config
            .kv_heads()
            .checked_mul(config.head_dim())
            .and_then(|x| x.checked_mul(u64::from(config.num_hidden_layers)))
            .and_then(|x| x.checked_mul(2 * dtype_bytes(weights_dtype)))
            .ok_or(SizingError::Overflow("KV bytes per token"))?;
        let mut needs = Self::assemble(
            weight_bytes,
            weights_dtype,
            kv_per_token,
            config.num_hidden_layers,
            input,
        )?;
        needs.tied_head_bytes = tied_head_bytes(config, headers, weights_dtype)?;
        Ok(needs)
    }

    /// Sizes a GGUF model from its header, counting the weights as the
    /// engine holds them on the GPU:
    ///
    /// - `copyhold`: every block format (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)
    ///   stays in its blocks on the GPU (the node's `gemv_<fmt>` kernels),
    ///   except the embedding table, which is widened to f16
    ///   (`inference-node/src/cuda/plan.rs`, `device_dtype` and
    ///   `embedding_dtype`); a file with blocks also costs the f16 buffer
    ///   prefill GEMMs dequantize into ([`copyhold_block_extra`]). F32,
    ///   F16 and BF16 tensors cost what they store. Types the node does not
    ///   load are refused here.
    /// - `vllm`: the blocks stay as stored; its kernels for them need
    ///   compute capability 7.0.
    ///
    /// The KV cache is f16 (f32 for an all-f32 file), as for safetensors.
    pub fn from_gguf(model: &GgufModel, input: &SizingInput<'_>) -> Result<Self, SizingError> {
        let copyhold = input.engine == EngineKind::Copyhold;
        let mut device = 0u64;
        for (name, t) in &model.by_type {
            if copyhold && !COPYHOLD_GGUF_TYPES.contains(name) {
                return Err(SizingError::GgufTypeUnsupported {
                    ty: (*name).to_string(),
                });
            }
            device = device
                .checked_add(t.bytes)
                .ok_or(SizingError::Overflow("weight bytes"))?;
        }
        let extra = if copyhold && !model.block_formats().is_empty() {
            Some(copyhold_block_extra(model))
        } else {
            None
        };
        device = device
            .checked_add(extra.map_or(0, BlockExtra::total))
            .ok_or(SizingError::Overflow("weight bytes"))?;
        let all_f32 = model.by_type.keys().all(|n| *n == "F32");
        let dtype = if all_f32 { Dtype::F32 } else { Dtype::F16 };
        let kv_per_token = model
            .key_length
            .checked_add(model.value_length)
            .and_then(|x| x.checked_mul(model.kv_heads))
            .and_then(|x| x.checked_mul(u64::from(model.layers)))
            .and_then(|x| x.checked_mul(dtype_bytes(dtype)))
            .ok_or(SizingError::Overflow("KV bytes per token"))?;
        let mut needs = Self::assemble(device, dtype, kv_per_token, model.layers, input)?;
        let formats = model.block_formats();
        if !copyhold && !formats.is_empty() {
            needs.min_compute_capability = needs.min_compute_capability.max(VLLM_GGUF_MIN_CC);
        }
        if model.tied_head {
            needs.tied_head_bytes = model.embedding.map_or(0, |(ty, elements)| {
                if copyhold && ty.is_block_format() {
                    elements.saturating_mul(2)
                } else {
                    elements / ty.block_elems * ty.block_bytes
                }
            });
        }
        let on_gpu = extra.map_or_else(|| "held as stored".to_string(), BlockExtra::note);
        needs.weights_note = Some(gguf_note(model, &formats, &on_gpu));
        Ok(needs)
    }

    /// Sizes a model from the numbers the user gave in `model.sizing`, for
    /// when the controller cannot read the source. Either `kvBytesPerToken`
    /// or all of `numLayers`, `numKvHeads`, `headDim` must be given; a dtype
    /// that is not given is taken as f16.
    pub fn from_inline(
        inline: &InlineSizing,
        input: &SizingInput<'_>,
    ) -> Result<Self, SizingError> {
        let weight_bytes = inline
            .weight_bytes
            .as_ref()
            .ok_or_else(|| SizingError::IncompleteInline("weightBytes is required".into()))
            .and_then(|q| {
                quantity::bytes(&q.0)
                    .map_err(|e| SizingError::IncompleteInline(format!("weightBytes: {e}")))
            })?;
        let dtype = inline.dtype.unwrap_or(Dtype::F16);
        let positive = |v: Option<i32>, name: &str| -> Result<Option<u64>, SizingError> {
            match v {
                None => Ok(None),
                Some(x) if x > 0 => Ok(Some(x as u64)),
                Some(x) => Err(SizingError::IncompleteInline(format!(
                    "{name} must be positive, got {x}"
                ))),
            }
        };
        let layers = positive(inline.num_layers, "numLayers")?;
        let heads = positive(inline.num_kv_heads, "numKvHeads")?;
        let head_dim = positive(inline.head_dim, "headDim")?;
        let derived = match (layers, heads, head_dim) {
            (Some(l), Some(k), Some(d)) => Some(
                l.checked_mul(k)
                    .and_then(|x| x.checked_mul(d))
                    .and_then(|x| x.checked_mul(2 * dtype_bytes(dtype)))
                    .ok_or(SizingError::Overflow("KV bytes per token"))?,
            ),
            _ => None,
        };
        let given = match inline.kv_bytes_per_token {
            None => None,
            Some(x) if x > 0 => Some(x as u64),
            Some(x) => {
                return Err(SizingError::IncompleteInline(format!(
                    "kvBytesPerToken must be positive, got {x}"
                )));
            }
        };
        let kv_per_token = match (given, derived) {
            (Some(g), Some(d)) if g != d => {
                return Err(SizingError::InconsistentInline(format!(
                    "kvBytesPerToken is {g} but numLayers × numKvHeads × headDim × 2 × {} bytes is {d}",
                    dtype_bytes(dtype)
                )));
            }
            (Some(g), _) => g,
            (None, Some(d)) => d,
            (None, None) => {
                return Err(SizingError::IncompleteInline(
                    "give kvBytesPerToken, or numLayers, numKvHeads and headDim".into(),
                ));
            }
        };
        let num_layers = layers.map_or(u32::MAX, |l| u32::try_from(l).unwrap_or(u32::MAX));
        Self::assemble(weight_bytes, dtype, kv_per_token, num_layers, input)
    }

    fn assemble(
        weight_bytes: u64,
        weights_dtype: Dtype,
        kv_bytes_per_token: u64,
        num_layers: u32,
        input: &SizingInput<'_>,
    ) -> Result<Self, SizingError> {
        let (context_tokens, kv_cache_bytes) = match &input.serving.kv_cache_memory {
            Some(q) => {
                let bytes = quantity::bytes(&q.0)
                    .map_err(|e| SizingError::BadKvCacheMemory(e.to_string()))?;
                (bytes / kv_bytes_per_token.max(1), bytes)
            }
            None => {
                let ctx = u64::try_from(input.serving.context_length).unwrap_or(0);
                let seqs = u64::try_from(input.serving.max_concurrent_sequences).unwrap_or(0);
                let tokens = ctx
                    .checked_mul(seqs)
                    .ok_or(SizingError::Overflow("context tokens"))?;
                let bytes = tokens
                    .checked_mul(kv_bytes_per_token)
                    .ok_or(SizingError::Overflow("KV cache bytes"))?;
                (tokens, bytes)
            }
        };
        let bf16 = needs_bf16_compute(input.engine, weights_dtype);
        Ok(ModelNeeds {
            weight_bytes,
            weights_dtype,
            kv_bytes_per_token,
            context_tokens,
            kv_cache_bytes,
            num_layers,
            min_compute_capability: min_compute_capability(bf16, input.placement_min_cc),
            tied_head_bytes: 0,
            weights_note: None,
        })
    }

    /// Activations, CUDA context and allocator slack: 5 % of the weights plus
    /// 512 MiB. Measured engines use 300–700 MiB of context and workspace on
    /// small models and a few percent of the weights for activations at
    /// batch sizes we serve.
    pub fn overhead_bytes(&self) -> u64 {
        (self.weight_bytes / 100)
            .saturating_mul(OVERHEAD_WEIGHT_PERCENT)
            .saturating_add(OVERHEAD_FIXED_BYTES)
    }

    /// GPU memory one replica needs when split over `gpus` GPUs: every GPU
    /// holds its own CUDA context, workspaces and scratch (the fixed
    /// overhead), and a tied LM head gets its own copy of the embedding on
    /// a GPU other than the embedding's. One GPU: [`Self::bytes_per_replica`].
    pub fn bytes_on_gpus(&self, gpus: u32) -> u64 {
        let extra = u64::from(gpus.max(1) - 1);
        let head = if gpus > 1 { self.tied_head_bytes } else { 0 };
        self.bytes_per_replica()
            .saturating_add(extra.saturating_mul(OVERHEAD_FIXED_BYTES))
            .saturating_add(head)
    }

    /// The terms of [`Self::bytes_per_replica`] for the `Placed`
    /// condition: `weights 4.6 GiB (GGUF …) + KV cache 2.0 GiB for 16384
    /// tokens + overhead 0.7 GiB`.
    pub fn breakdown(&self) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let note = self
            .weights_note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        format!(
            "weights {:.1} GiB{note} + KV cache {:.1} GiB for {} tokens + overhead {:.1} GiB",
            gib(self.weight_bytes),
            gib(self.kv_cache_bytes),
            self.context_tokens,
            gib(self.overhead_bytes())
        )
    }

    /// GPU memory one replica needs in all: weights + KV cache + overhead.
    pub fn bytes_per_replica(&self) -> u64 {
        self.weight_bytes
            .saturating_add(self.kv_cache_bytes)
            .saturating_add(self.overhead_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/{name}"))
    }

    fn read_fixture(name: &str) -> (HfConfig, SafetensorsHeader) {
        let dir = fixture(name);
        let cfg = HfConfig::from_json(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let file = std::fs::read(dir.join("model.safetensors")).unwrap();
        let n = SafetensorsHeader::header_len(&file).unwrap() as usize;
        let h = SafetensorsHeader::parse(&file[8..8 + n]).unwrap();
        (cfg, h)
    }

    fn input(serving: &ServingSpec, engine: EngineKind) -> SizingInput<'_> {
        SizingInput {
            serving,
            engine,
            placement_min_cc: None,
        }
    }

    fn config(json: serde_json::Value) -> HfConfig {
        HfConfig::from_json(json.to_string().as_bytes()).unwrap()
    }

    fn llama_3_1_8b() -> HfConfig {
        config(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}
        }))
    }

    fn mistral_7b() -> HfConfig {
        config(serde_json::json!({
            "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16", "sliding_window": 4096
        }))
    }

    fn qwen2_5_0_5b() -> HfConfig {
        config(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
            "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
            "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": true,
            "torch_dtype": "bfloat16"
        }))
    }

    fn qwen2_5_7b() -> HfConfig {
        config(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
            "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": false,
            "torch_dtype": "bfloat16"
        }))
    }

    fn gguf_8b(q4_k_m: bool, weights: u32) -> GgufModel {
        use crate::serving::gguf_header::{Parsed, parse, synth};
        let Ok(Parsed::Header(h)) = parse(&synth::llama_8b(q4_k_m, weights)) else {
            panic!("the synthesized header parses");
        };
        GgufModel::from_header(&h).unwrap()
    }

    #[test]
    fn a_q4_k_m_8b_gguf_costs_its_blocks_on_copyhold_s_gpu_and_under_vllm() {
        let s = ServingSpec::default();
        let q4 = gguf_8b(true, 0);
        let own = ModelNeeds::from_gguf(&q4, &input(&s, EngineKind::Copyhold)).unwrap();
        // The blocks as stored + the Q4_K embedding widened to f16 + the
        // node's 128 MiB f16 prefill buffer.
        let embed = 4096 * 128_256u64;
        assert_eq!(
            own.weight_bytes,
            4_912_898_048 + (embed * 2 - embed / 256 * 144) + (2 << 26)
        );
        assert_eq!(own.kv_bytes_per_token, 131_072, "as the HF config gives");
        assert_eq!(own.num_layers, 32);
        assert_eq!(own.min_compute_capability, (6, 0));
        assert_eq!(
            own.weights_note.as_deref(),
            Some(
                "GGUF Q4_K+Q6_K, 4.58 GiB in the file, held as stored on the GPU, \
                 the embedding widened to f16, plus a 0.1 GiB f16 buffer for prefill"
            )
        );

        let vllm = ModelNeeds::from_gguf(&q4, &input(&s, EngineKind::Vllm)).unwrap();
        assert_eq!(vllm.weight_bytes, 4_912_898_048);
        assert_eq!(vllm.min_compute_capability, VLLM_GGUF_MIN_CC);

        // An f16 file is what it stores on both.
        let f32_elems = 65 * 4096;
        let f16 = gguf_8b(false, crate::serving::gguf_header::synth::F16);
        let n = ModelNeeds::from_gguf(&f16, &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(
            n.weight_bytes,
            (8_030_261_248 - f32_elems) * 2 + f32_elems * 4
        );
        assert_eq!(n.weights_dtype, Dtype::F16);
        assert_eq!(
            n.weights_note.as_deref(),
            Some("GGUF F16+F32, 14.96 GiB in the file, held as stored")
        );
    }

    /// A Tesla P4 as GPU feature discovery labels it (7680 MiB).
    fn p4_node() -> crate::serving::placement::NodeGpus {
        crate::serving::placement::NodeGpus {
            name: "node-p4".into(),
            labels: BTreeMap::from([(
                crate::serving::placement::HOSTNAME_LABEL.to_string(),
                "node-p4".to_string(),
            )]),
            product: "Tesla-P4".into(),
            memory_bytes_per_gpu: 7680 << 20,
            compute_capability: (6, 1),
            allocatable_gpus: 1,
            allocated_gpus: 0,
        }
    }

    fn place_on_p4(
        needs: &ModelNeeds,
        util: f64,
    ) -> Result<crate::serving::placement::Placement, crate::serving::placement::PlacementError>
    {
        let spec = crate::resources::model_deployment::PlacementSpec::default();
        let req = crate::serving::placement::PlacementRequest {
            needs,
            replicas: 1,
            spec: &spec,
            gpu_memory_utilization: util,
        };
        crate::serving::placement::place(&req, &[p4_node()])
    }

    #[test]
    fn a_q4_k_m_8b_gguf_keeps_its_blocks_on_copyhold_s_gpu_and_is_placed_on_a_p4_at_4096_tokens() {
        // One sequence of 4096 tokens: the default 4 × 4096 tokens of f16
        // KV cache (2 GiB) would not fit beside the weights on 8 GB.
        let s = ServingSpec {
            context_length: 4096,
            max_concurrent_sequences: 1,
            ..ServingSpec::default()
        };
        let q4 = gguf_8b(true, 0);
        let own = ModelNeeds::from_gguf(&q4, &input(&s, EngineKind::Copyhold)).unwrap();
        // The blocks as stored; the Q4_K embedding table widened to f16,
        // as the node uploads it; the node's f16 buffer that prefill GEMMs
        // dequantize into (at most 64 Mi elements: larger matrices, the
        // head, are dequantized in chunks of rows).
        let embed = 4096 * 128_256u64;
        assert_eq!(
            own.weight_bytes,
            4_912_898_048 + (embed * 2 - embed / 256 * 144) + (2 << 26)
        );
        assert_eq!(own.min_compute_capability, (6, 0));
        assert_eq!(
            own.breakdown(),
            "weights 5.4 GiB (GGUF Q4_K+Q6_K, 4.58 GiB in the file, held as stored on \
             the GPU, the embedding widened to f16, plus a 0.1 GiB f16 buffer for \
             prefill) + KV cache 0.5 GiB for 4096 tokens + overhead 0.8 GiB"
        );
        // 6.67 GiB of the P4's 6.75 usable at gpuMemoryUtilization 0.9.
        assert_eq!(own.bytes_per_replica(), 7_166_143_283);
        let placed = place_on_p4(&own, 0.9).unwrap();
        assert_eq!(placed.gpu_class(), Some("Tesla-P4"));
        assert_eq!(placed.nodes(), vec!["node-p4".to_string()]);
        // The default four sequences do not fit.
        let four =
            ModelNeeds::from_gguf(&q4, &input(&ServingSpec::default(), EngineKind::Copyhold))
                .unwrap();
        assert!(place_on_p4(&four, 0.9).is_err());
    }

    #[test]
    fn a_q8_0_8b_gguf_costs_its_blocks_on_copyhold_s_gpu_with_an_f16_embedding_and_prefill_buffer()
    {
        let s = ServingSpec::default();
        let q8 = gguf_8b(false, 8);
        let own = ModelNeeds::from_gguf(&q8, &input(&s, EngineKind::Copyhold)).unwrap();
        let f32_elems = 65 * 4096;
        let embed = 4096 * 128_256;
        let blocks = 8_030_261_248 - f32_elems - embed;
        // Projections and head as stored (34 bytes per 32 values); the
        // embedding table widened to f16, as the node uploads it; the f16
        // buffer prefill GEMMs dequantize into, a chunk of at most 64 Mi
        // values (128 MiB); the norms in f32.
        assert_eq!(
            own.weight_bytes,
            blocks / 32 * 34 + embed * 2 + (2 << 26) + f32_elems * 4
        );
        assert!(own.weight_bytes < 11_000_000_000, "{}", own.weight_bytes);
        assert_eq!(own.min_compute_capability, (6, 0));
        assert_eq!(
            own.weights_note.as_deref(),
            Some(
                "GGUF Q8_0, 7.95 GiB in the file, held as stored on the GPU, the \
                 embedding widened to f16, plus a 0.1 GiB f16 buffer for prefill"
            )
        );
    }

    #[test]
    fn a_gguf_type_copyhold_node_does_not_load_is_refused_by_name() {
        let s = ServingSpec::default();
        let iq2 = gguf_8b(false, 17);
        let e = ModelNeeds::from_gguf(&iq2, &input(&s, EngineKind::Copyhold)).unwrap_err();
        assert!(e.to_string().contains("holds IQ2_XS tensors"), "{e}");
        assert!(ModelNeeds::from_gguf(&iq2, &input(&s, EngineKind::Vllm)).is_ok());
    }

    #[test]
    fn the_f32_fixture_is_sized_from_its_header_with_f32_kv() {
        let (cfg, h) = read_fixture("tiny-llama");
        let s = ServingSpec::default();
        let n = ModelNeeds::from_model(
            &cfg,
            std::slice::from_ref(&h),
            &input(&s, EngineKind::Copyhold),
        )
        .unwrap();
        let params = cfg.estimated_parameters().unwrap();
        assert_eq!(
            n.weight_bytes,
            params * 4,
            "header bytes equal the shape's f32 bytes"
        );
        assert_eq!(n.weight_bytes, 859_912 - 8 - 3072);
        assert_eq!(n.weights_dtype, Dtype::F32);
        assert_eq!(n.kv_bytes_per_token, 3 * 2 * 16 * 2 * 4);
        assert_eq!(n.num_layers, 3);
        assert_eq!(n.context_tokens, 4096 * 4);
        assert_eq!(n.kv_cache_bytes, 4096 * 4 * 768);
        assert_eq!(n.min_compute_capability, (6, 0));
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn the_bf16_fixture_needs_8_0_only_under_vllm() {
        let (cfg, h) = read_fixture("tiny-llama-bf16");
        assert_eq!(
            cfg.declared_dtype(),
            Some(Dtype::Bf16),
            "transformers 5 `dtype` key"
        );
        let s = ServingSpec::default();
        let own = ModelNeeds::from_model(
            &cfg,
            std::slice::from_ref(&h),
            &input(&s, EngineKind::Copyhold),
        )
        .unwrap();
        assert_eq!(own.weights_dtype, Dtype::Bf16);
        assert_eq!(own.weight_bytes, 431_520 - 8 - 3096);
        assert_eq!(own.kv_bytes_per_token, 3 * 2 * 16 * 2 * 2);
        assert_eq!(own.min_compute_capability, (6, 0));
        let vllm = ModelNeeds::from_model(&cfg, &[h], &input(&s, EngineKind::Vllm)).unwrap();
        assert_eq!(vllm.min_compute_capability, (8, 0));
    }

    #[test]
    fn llama_3_1_8b_has_131072_kv_bytes_per_token_and_about_16_06_gb() {
        let s = ServingSpec::default();
        let n =
            ModelNeeds::from_model(&llama_3_1_8b(), &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.kv_bytes_per_token, 32 * 8 * 128 * 2 * 2);
        assert_eq!(n.kv_bytes_per_token, 131_072);
        assert_eq!(n.weight_bytes, 8_030_261_248 * 2);
        assert_eq!(n.weight_bytes / 10_000_000, 1606, "≈16.06 GB");
        assert_eq!(
            n.kv_cache_bytes,
            16_384 * 131_072,
            "4096 context × 4 sequences"
        );
    }

    #[test]
    fn mistral_7b_has_the_same_kv_per_token_as_llama_8b_but_fewer_weights() {
        let s = ServingSpec::default();
        let n =
            ModelNeeds::from_model(&mistral_7b(), &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.kv_bytes_per_token, 131_072);
        assert_eq!(n.weight_bytes, 7_241_732_096 * 2);
        assert_eq!(n.num_layers, 32);
    }

    #[test]
    fn qwen2_5_0_5b_counts_tied_embeddings_once_and_qkv_bias() {
        let c = qwen2_5_0_5b();
        assert_eq!(c.head_dim(), 64, "896 / 14");
        assert_eq!(c.estimated_parameters().unwrap(), 494_032_768);
        let s = ServingSpec::default();
        let n = ModelNeeds::from_model(&c, &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.kv_bytes_per_token, 24 * 2 * 64 * 2 * 2);
        assert_eq!(n.kv_bytes_per_token, 12_288);
    }

    #[test]
    fn qwen2_5_7b_has_57344_kv_bytes_per_token() {
        let c = qwen2_5_7b();
        assert_eq!(c.estimated_parameters().unwrap(), 7_615_616_512);
        let s = ServingSpec::default();
        let n = ModelNeeds::from_model(&c, &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.kv_bytes_per_token, 28 * 4 * 128 * 2 * 2);
        assert_eq!(n.kv_bytes_per_token, 57_344);
    }

    #[test]
    fn kv_heads_default_to_attention_heads_without_gqa() {
        let c = config(serde_json::json!({
            "num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512,
            "torch_dtype": "float16"
        }));
        assert_eq!(c.kv_heads(), 8);
        assert_eq!(c.head_dim(), 64);
    }

    #[test]
    fn kv_cache_memory_overrides_context_times_sequences() {
        let s = ServingSpec {
            kv_cache_memory: Some(Quantity("4Gi".into())),
            ..ServingSpec::default()
        };
        let n =
            ModelNeeds::from_model(&llama_3_1_8b(), &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.kv_cache_bytes, 4 << 30);
        assert_eq!(n.context_tokens, (4u64 << 30) / 131_072);
    }

    #[test]
    fn bytes_per_replica_adds_weights_kv_and_documented_overhead() {
        let s = ServingSpec {
            context_length: 1000,
            max_concurrent_sequences: 2,
            ..ServingSpec::default()
        };
        let n =
            ModelNeeds::from_model(&mistral_7b(), &[], &input(&s, EngineKind::Copyhold)).unwrap();
        let w = 7_241_732_096u64 * 2;
        assert_eq!(
            n.bytes_per_replica(),
            w + 2000 * 131_072 + w / 100 * 5 + 512 * 1024 * 1024
        );
    }

    #[test]
    fn a_replica_split_over_gpus_pays_the_fixed_overhead_on_every_gpu() {
        let s = ServingSpec::default();
        let n =
            ModelNeeds::from_model(&mistral_7b(), &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.bytes_on_gpus(1), n.bytes_per_replica());
        assert_eq!(
            n.bytes_on_gpus(3),
            n.bytes_per_replica() + 2 * OVERHEAD_FIXED_BYTES,
            "untied: no head copy"
        );
    }

    #[test]
    fn a_split_model_with_tied_embeddings_counts_the_heads_copy_on_another_gpu() {
        let s = ServingSpec::default();
        let n =
            ModelNeeds::from_model(&qwen2_5_0_5b(), &[], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.tied_head_bytes, 151_936 * 896 * 2);
        assert_eq!(n.bytes_on_gpus(1), n.bytes_per_replica());
        assert_eq!(
            n.bytes_on_gpus(2),
            n.bytes_per_replica() + OVERHEAD_FIXED_BYTES + 151_936 * 896 * 2
        );
        // With headers: the embedding tensor's own bytes (here stored f32).
        let e = 151_936u64 * 896 * 4;
        let h = SafetensorsHeader::parse(
            format!(
                r#"{{"model.embed_tokens.weight":{{"dtype":"F32","shape":[151936,896],"data_offsets":[0,{e}]}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let n = ModelNeeds::from_model(&qwen2_5_0_5b(), &[h], &input(&s, EngineKind::Copyhold))
            .unwrap();
        assert_eq!(n.tied_head_bytes, e);
        // Untied models carry their own head: nothing is copied.
        let (cfg, h) = read_fixture("tiny-llama-bf16");
        assert!(!cfg.tie_word_embeddings);
        let n = ModelNeeds::from_model(&cfg, &[h], &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.tied_head_bytes, 0);
    }

    #[test]
    fn placement_min_compute_capability_raises_the_floor_but_never_lowers_it() {
        assert_eq!(min_compute_capability(false, Some((7, 5))), (7, 5));
        assert_eq!(min_compute_capability(true, Some((7, 0))), (8, 0));
        assert_eq!(min_compute_capability(false, Some((5, 2))), (6, 0));
        assert_eq!(parse_compute_capability("8.9"), Ok((8, 9)));
        assert!(parse_compute_capability("eight").is_err());
    }

    #[test]
    fn inline_sizing_derives_kv_from_the_architecture_fields() {
        let s = ServingSpec::default();
        let inline = InlineSizing {
            weight_bytes: Some(Quantity("16Gi".into())),
            dtype: Some(Dtype::Bf16),
            num_layers: Some(32),
            num_kv_heads: Some(8),
            head_dim: Some(128),
            kv_bytes_per_token: None,
        };
        let n = ModelNeeds::from_inline(&inline, &input(&s, EngineKind::Vllm)).unwrap();
        assert_eq!(n.weight_bytes, 16 << 30);
        assert_eq!(n.kv_bytes_per_token, 131_072);
        assert_eq!(n.num_layers, 32);
        assert_eq!(n.min_compute_capability, (8, 0));
    }

    #[test]
    fn inline_sizing_with_only_bytes_has_no_layer_limit() {
        let s = ServingSpec::default();
        let inline = InlineSizing {
            weight_bytes: Some(Quantity("1G".into())),
            kv_bytes_per_token: Some(4096),
            ..InlineSizing::default()
        };
        let n = ModelNeeds::from_inline(&inline, &input(&s, EngineKind::Copyhold)).unwrap();
        assert_eq!(n.num_layers, u32::MAX);
        assert_eq!(n.weights_dtype, Dtype::F16);
        assert_eq!(n.kv_bytes_per_token, 4096);
    }

    #[test]
    fn inline_sizing_that_contradicts_itself_is_refused() {
        let s = ServingSpec::default();
        let inline = InlineSizing {
            weight_bytes: Some(Quantity("1G".into())),
            kv_bytes_per_token: Some(1),
            dtype: Some(Dtype::F16),
            num_layers: Some(2),
            num_kv_heads: Some(2),
            head_dim: Some(2),
        };
        let e = ModelNeeds::from_inline(&inline, &input(&s, EngineKind::Copyhold)).unwrap_err();
        assert!(matches!(e, SizingError::InconsistentInline(_)), "{e}");
    }

    #[test]
    fn inline_sizing_without_weights_or_kv_is_refused() {
        let s = ServingSpec::default();
        let e = ModelNeeds::from_inline(&InlineSizing::default(), &input(&s, EngineKind::Copyhold))
            .unwrap_err();
        assert!(e.to_string().contains("weightBytes"), "{e}");
        let only_w = InlineSizing {
            weight_bytes: Some(Quantity("1G".into())),
            ..InlineSizing::default()
        };
        let e = ModelNeeds::from_inline(&only_w, &input(&s, EngineKind::Copyhold)).unwrap_err();
        assert!(e.to_string().contains("kvBytesPerToken"), "{e}");
    }

    #[test]
    fn malformed_headers_and_configs_give_errors_not_panics() {
        assert!(SafetensorsHeader::header_len(&[1, 2, 3]).is_err());
        assert!(SafetensorsHeader::parse(b"not json").is_err());
        let lying = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,8]}}"#;
        assert!(SafetensorsHeader::parse(lying).is_err());
        let backwards = br#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#;
        assert!(SafetensorsHeader::parse(backwards).is_err());
        assert!(HfConfig::from_json(b"{}").is_err());
        assert!(
            HfConfig::from_json(
                br#"{"num_hidden_layers":0,"num_attention_heads":1,"hidden_size":1}"#
            )
            .is_err()
        );
    }
}
