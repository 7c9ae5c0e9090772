//! GGUF (v2/v3) files, as llama.cpp and Ollama ship models: the header's
//! metadata becomes a [`ModelConfig`] (through the same normalization as a
//! `config.json`) and a Hugging Face tokenizer; the tensors stay in the
//! memory map under their Hugging Face names, in their stored format (f32,
//! f16, bf16 or a block format of [`QType`]).
//!
//! llama.cpp's converter permutes the rows of Llama's q/k projections for
//! its interleaved rotary layout; those two tensors are put back into
//! Hugging Face's rotate-half order once at load (whole rows move, so a
//! quantized row stays exact).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::quant::QType;
use crate::model::weights::{Bytes, DType, Tensor, WeightStore, mmap};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Meta::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Meta::Float(f) => Some(*f),
            Meta::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Meta]> {
        match self {
            Meta::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous (input) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// From the start of the data section.
    pub offset: u64,
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub meta: HashMap<String, Meta>,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data starts in the file.
    pub data_start: usize,
}

/// The stored type of a ggml type number, if copyhold reads it.
pub fn dtype_of(ggml_type: u32) -> Option<DType> {
    match ggml_type {
        0 => Some(DType::F32),
        1 => Some(DType::F16),
        30 => Some(DType::BF16),
        t => QType::from_ggml_type(t).map(DType::Q),
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| format!("truncated header at byte {}", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        // Every element takes at least a byte: a larger count is corrupt.
        if n > (self.b.len() - self.at) as u64 {
            return Err(format!("length {n} at byte {} exceeds the file", self.at));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.len()?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| format!("string at byte {} is not UTF-8", self.at))
    }
    fn value(&mut self, ty: u32) -> std::result::Result<Meta, String> {
        let mut fixed = |n: usize| -> std::result::Result<[u8; 8], String> {
            let mut a = [0u8; 8];
            a[..n].copy_from_slice(self.take(n)?);
            Ok(a)
        };
        Ok(match ty {
            0 => Meta::Int(fixed(1)?[0] as i64),
            1 => Meta::Int(fixed(1)?[0] as i8 as i64),
            2 => Meta::Int(u16::from_le_bytes(fixed(2)?[..2].try_into().unwrap_or([0; 2])) as i64),
            3 => Meta::Int(i16::from_le_bytes(fixed(2)?[..2].try_into().unwrap_or([0; 2])) as i64),
            4 => Meta::Int(u32::from_le_bytes(fixed(4)?[..4].try_into().unwrap_or([0; 4])) as i64),
            5 => Meta::Int(i32::from_le_bytes(fixed(4)?[..4].try_into().unwrap_or([0; 4])) as i64),
            6 => {
                Meta::Float(f32::from_le_bytes(fixed(4)?[..4].try_into().unwrap_or([0; 4])) as f64)
            }
            7 => Meta::Bool(fixed(1)?[0] != 0),
            8 => Meta::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner)?);
                }
                Meta::Array(v)
            }
            10 => Meta::Int(u64::from_le_bytes(fixed(8)?) as i64),
            11 => Meta::Int(i64::from_le_bytes(fixed(8)?)),
            12 => Meta::Float(f64::from_le_bytes(fixed(8)?)),
            t => return Err(format!("unknown metadata type {t}")),
        })
    }
}

/// Parses the header of a GGUF file from its first bytes (the whole file,
/// or as much as a range request fetched: a short read says so).
pub fn parse_header(b: &[u8]) -> std::result::Result<Header, String> {
    let mut r = Reader { b, at: 0 };
    if r.take(4)? != b"GGUF" {
        return Err("not a GGUF file (magic is not \"GGUF\")".into());
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} (supported: 2 and 3)"));
    }
    let n_tensors = r.len()?;
    let n_kv = r.len()?;
    let mut meta = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        meta.insert(key, r.value(ty)?);
    }
    let mut tensors = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let nd = r.u32()? as usize;
        if nd > 4 {
            return Err(format!("tensor {name:?} has {nd} dimensions"));
        }
        let dims = (0..nd)
            .map(|_| r.u64())
            .collect::<std::result::Result<_, _>>()?;
        let ggml_type = r.u32()?;
        let offset = r.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let align = meta
        .get("general.alignment")
        .and_then(Meta::as_u64)
        .unwrap_or(32)
        .max(1) as usize;
    Ok(Header {
        version,
        meta,
        tensors,
        data_start: r.at.div_ceil(align) * align,
    })
}

/// Whether `path` names a GGUF model: a `.gguf` file, or a directory
/// holding exactly one.
pub fn find(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return (path.extension().and_then(|e| e.to_str()) == Some("gguf")).then(|| path.into());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    // A directory with safetensors too is a safetensors model.
    if found.len() != 1 || path.join("config.json").exists() {
        return None;
    }
    found.pop()
}

/// An opened GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    map: Bytes,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let map = mmap(path)?;
        let header = parse_header(&map).map_err(|m| bad(path, m))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            map: Arc::new(map),
        })
    }

    fn meta(&self, key: &str) -> Option<&Meta> {
        self.header.meta.get(key)
    }

    fn arch(&self) -> Result<&str> {
        self.meta("general.architecture")
            .and_then(Meta::as_str)
            .ok_or_else(|| bad(&self.path, "general.architecture is missing"))
    }

    /// The metadata as the `config.json` a Hugging Face checkpoint of the
    /// same model would have.
    pub fn config_json(&self) -> Result<Value> {
        let arch = self.arch()?.to_string();
        let (hf_arch, model_type) = match arch.as_str() {
            "llama" => ("LlamaForCausalLM", "llama"),
            "mistral" => ("MistralForCausalLM", "mistral"),
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: self.path.clone(),
                    arch: other.to_string(),
                });
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| self.meta(&key(k)).and_then(Meta::as_u64);
        let need =
            |k: &str| int(k).ok_or_else(|| bad(&self.path, format!("{} is missing", key(k))));
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let vocab = match int("vocab_size") {
            Some(v) => v,
            None => self
                .meta("tokenizer.ggml.tokens")
                .and_then(Meta::as_array)
                .map(|a| a.len() as u64)
                .ok_or_else(|| bad(&self.path, "neither vocab_size nor tokenizer.ggml.tokens"))?,
        };
        let mut c = json!({
            "architectures": [hf_arch],
            "model_type": model_type,
            "hidden_size": hidden,
            "intermediate_size": need("feed_forward_length")?,
            "num_hidden_layers": need("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": int("attention.head_count_kv").unwrap_or(heads),
            "head_dim": int("attention.key_length").unwrap_or(hidden / heads.max(1)),
            "vocab_size": vocab,
            "hidden_act": "silu",
            "rms_norm_eps": self.meta(&key("attention.layer_norm_rms_epsilon")).and_then(Meta::as_f64).unwrap_or(1e-5),
            "max_position_embeddings": int("context_length").unwrap_or(4096),
            "rope_theta": self.meta(&key("rope.freq_base")).and_then(Meta::as_f64).unwrap_or(10000.0),
            "tie_word_embeddings": !self.header.tensors.iter().any(|t| t.name == "output.weight"),
            "attention_bias": self.header.tensors.iter().any(|t| t.name == "blk.0.attn_output.bias"),
        });
        if let Some(id) = self
            .meta("tokenizer.ggml.bos_token_id")
            .and_then(Meta::as_u64)
        {
            c["bos_token_id"] = json!(id);
        }
        if let Some(id) = self
            .meta("tokenizer.ggml.eos_token_id")
            .and_then(Meta::as_u64)
        {
            c["eos_token_id"] = json!(id);
        }
        if let Some(w) = int("attention.sliding_window") {
            c["sliding_window"] = json!(w);
            if arch == "qwen2" {
                c["use_sliding_window"] = json!(true);
            }
        }
        let scaling = self.meta(&key("rope.scaling.type")).and_then(Meta::as_str);
        match scaling {
            None | Some("none") => {}
            Some("linear") => {
                let f = self
                    .meta(&key("rope.scaling.factor"))
                    .and_then(Meta::as_f64);
                c["rope_scaling"] = json!({"type": "linear", "factor": f.unwrap_or(1.0)});
            }
            Some(other) => {
                return Err(bad(
                    &self.path,
                    format!("rope scaling {other:?} is not supported"),
                ));
            }
        }
        if self
            .header
            .tensors
            .iter()
            .any(|t| t.name == "rope_freqs.weight")
        {
            return Err(bad(
                &self.path,
                "rope_freqs.weight (Llama 3.1 frequency factors) is not supported yet",
            ));
        }
        Ok(c)
    }

    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::from_value(&self.path, self.config_json()?)
    }

    /// Every tensor under its Hugging Face name, shapes in HF order.
    pub fn store(&self, cfg: &ModelConfig) -> Result<WeightStore> {
        let permuted = matches!(self.arch()?, "llama" | "mistral");
        let mut out = Vec::with_capacity(self.header.tensors.len());
        for info in &self.header.tensors {
            let Some(name) = hf_name(&info.name) else {
                continue;
            };
            let mut t = self.view(info, name.clone())?;
            if permuted && (name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight")) {
                let heads = if name.ends_with("q_proj.weight") {
                    cfg.num_heads
                } else {
                    cfg.num_kv_heads
                };
                t = unpermute_rows(&t, heads);
            }
            out.push(t);
        }
        Ok(WeightStore::from_tensors(out, &self.path))
    }

    /// The tensor stored as `gguf_name`, as stored (no renaming or row
    /// reordering), shape in row-major order.
    pub fn tensor(&self, gguf_name: &str) -> Result<Tensor> {
        let info = self
            .header
            .tensors
            .iter()
            .find(|t| t.name == gguf_name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: gguf_name.to_string(),
            })?;
        self.view(info, gguf_name.to_string())
    }

    /// A checked view of one tensor's bytes in the map.
    fn view(&self, info: &TensorInfo, name: String) -> Result<Tensor> {
        let dtype = dtype_of(info.ggml_type).ok_or_else(|| Error::TensorDtype {
            path: self.path.clone(),
            tensor: info.name.clone(),
            found: format!("ggml type {}", info.ggml_type),
        })?;
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let k = shape.last().copied().unwrap_or(0);
        let rows: usize = shape[..shape.len().saturating_sub(1)].iter().product();
        if let DType::Q(q) = dtype
            && !k.is_multiple_of(q.block_elems())
        {
            return Err(bad(
                &self.path,
                format!("{}: rows of {k} are not whole {q:?} blocks", info.name),
            ));
        }
        let len = rows * dtype.row_bytes(k);
        let start = self.header.data_start + info.offset as usize;
        if start
            .checked_add(len)
            .is_none_or(|e| e > (*self.map).as_ref().len())
        {
            return Err(bad(
                &self.path,
                format!("{}: data runs past the end of the file", info.name),
            ));
        }
        Ok(Tensor::new(name, dtype, shape, self.map.clone(), start, len).from_file())
    }

    /// The dominant stored format of the 2-D weights (for /v1/models).
    pub fn file_type(&self) -> Option<DType> {
        let mut n: HashMap<&'static str, (u64, DType)> = HashMap::new();
        for t in &self.header.tensors {
            if let (Some(d), 2) = (dtype_of(t.ggml_type), t.dims.len()) {
                n.entry(d.name()).or_insert((0, d)).0 += t.dims.iter().product::<u64>();
            }
        }
        n.values().max_by_key(|(c, _)| *c).map(|(_, d)| *d)
    }
}

/// llama.cpp's tensor names → Hugging Face's.
pub fn hf_name(g: &str) -> Option<String> {
    let fixed = match g {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (base, suffix) = part.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Row `r` of Hugging Face's q/k layout is row `gguf_row(r)` of llama.cpp's
/// (whose convert script interleaves the two rotary halves of each head).
pub fn gguf_row(r: usize, head_dim: usize) -> usize {
    let half = head_dim / 2;
    let (h, within) = (r / head_dim, r % head_dim);
    let (j, i) = (within / half, within % half);
    h * head_dim + 2 * i + j
}

/// A copy of `t` with its rows in Hugging Face's order.
fn unpermute_rows(t: &Tensor, heads: usize) -> Tensor {
    let n = t.shape[0];
    let k = t.shape.get(1).copied().unwrap_or(1);
    let rb = t.dtype.row_bytes(k);
    let src = t.bytes();
    let head_dim = n / heads.max(1);
    let mut out = Vec::with_capacity(src.len());
    for r in 0..n {
        let g = gguf_row(r, head_dim);
        out.extend_from_slice(&src[g * rb..(g + 1) * rb]);
    }
    let len = out.len();
    Tensor::new(
        t.name.clone(),
        t.dtype,
        t.shape.clone(),
        Arc::new(out),
        0,
        len,
    )
}
