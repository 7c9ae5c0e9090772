//! Hugging Face model directory → GGUF file (`copyhold-node gguf`), as
//! llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize` would write it:
//! llama.cpp's tensor names and metadata keys, Llama's q/k rows permuted
//! for interleaved rotary embeddings, a byte-level BPE vocabulary as
//! `tokenizer.ggml.model = "gpt2"`. Test models and benchmarks get
//! quantized files this way without a download.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use rayon::prelude::*;
use serde_json::Value;

use crate::error::{Error, Result, read_json};
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::gguf_row;
use crate::model::quant::QType;
use crate::model::weights::{DType, WeightStore};

/// How the 2-D weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    F32,
    F16,
    Q8_0,
    Q4_0,
    /// Q4_K, with Q6_K for `attn_v`, `ffn_down` and the output head (as
    /// llama.cpp's Q4_K_M spends more bits on those).
    Q4KM,
    /// Q5_K, with Q6_K where Q4_K_M has it.
    Q5KM,
}

impl Scheme {
    pub fn parse(s: &str) -> Option<Scheme> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => Scheme::F32,
            "f16" => Scheme::F16,
            "q8_0" => Scheme::Q8_0,
            "q4_0" => Scheme::Q4_0,
            "q4_k_m" => Scheme::Q4KM,
            "q5_k_m" => Scheme::Q5KM,
            _ => return None,
        })
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Scheme::F32 => 0,
            Scheme::F16 => 1,
            Scheme::Q4_0 => 2,
            Scheme::Q8_0 => 7,
            Scheme::Q4KM => 15,
            Scheme::Q5KM => 17,
        }
    }

    /// The type of the 2-D weight `gguf_name` with rows of `k`; a format
    /// whose block does not divide `k` falls back to Q8_0, then F16 (as
    /// llama-quantize does).
    fn pick(self, gguf_name: &str, k: usize) -> DType {
        let wide = gguf_name.contains("attn_v")
            || gguf_name.contains("ffn_down")
            || gguf_name == "output.weight";
        let want = match self {
            Scheme::F32 => return DType::F32,
            Scheme::F16 => return DType::F16,
            Scheme::Q8_0 => QType::Q8_0,
            Scheme::Q4_0 => QType::Q4_0,
            Scheme::Q4KM if wide => QType::Q6K,
            Scheme::Q4KM => QType::Q4K,
            Scheme::Q5KM if wide => QType::Q6K,
            Scheme::Q5KM => QType::Q5K,
        };
        for q in [want, QType::Q8_0] {
            if k.is_multiple_of(q.block_elems()) {
                return DType::Q(q);
            }
        }
        DType::F16
    }
}

/// A metadata value to write.
enum W {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(o: &mut Vec<u8>, s: &str) {
    o.extend_from_slice(&(s.len() as u64).to_le_bytes());
    o.extend_from_slice(s.as_bytes());
}

fn put_kv(o: &mut Vec<u8>, k: &str, v: &W) {
    put_str(o, k);
    match v {
        W::U32(x) => {
            o.extend_from_slice(&4u32.to_le_bytes());
            o.extend_from_slice(&x.to_le_bytes());
        }
        W::F32(x) => {
            o.extend_from_slice(&6u32.to_le_bytes());
            o.extend_from_slice(&x.to_le_bytes());
        }
        W::Bool(x) => {
            o.extend_from_slice(&7u32.to_le_bytes());
            o.push(*x as u8);
        }
        W::Str(s) => {
            o.extend_from_slice(&8u32.to_le_bytes());
            put_str(o, s);
        }
        W::Strs(a) => {
            o.extend_from_slice(&9u32.to_le_bytes());
            o.extend_from_slice(&8u32.to_le_bytes());
            o.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for s in a {
                put_str(o, s);
            }
        }
        W::I32s(a) => {
            o.extend_from_slice(&9u32.to_le_bytes());
            o.extend_from_slice(&5u32.to_le_bytes());
            o.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                o.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// One tensor to write: GGUF name, HF shape, type, data.
struct Out {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<u8>,
}

fn encode(x: &[f32], k: usize, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => x
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::BF16 => x
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        DType::Q(q) => x
            .par_chunks(k)
            .map(|row| {
                let mut b = Vec::with_capacity(q.row_bytes(k));
                q.quantize(row, &mut b);
                b
            })
            .flatten_iter()
            .collect(),
    }
}

/// The model's tokenizer.json as GGUF `gpt2` metadata.
fn tokenizer_meta(dir: &Path, cfg: &ModelConfig, kv: &mut Vec<(String, W)>) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let tj: Value = read_json(&path)?;
    let bad = |m: &str| Error::Tokenizer {
        path: path.clone(),
        message: m.to_string(),
    };
    let model = &tj["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad("only byte-level BPE tokenizers convert to GGUF here"));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab missing"))?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        let i = id
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < tokens.len());
        tokens[i.ok_or_else(|| bad("vocab ids are not 0..n"))?] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        if let Some(i) = a["id"]
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < types.len())
        {
            types[i] = if a["special"].as_bool() == Some(true) {
                3
            } else {
                4
            };
        }
    }
    // The embedding may have more rows than the tokenizer has tokens
    // (padded vocabularies, the synthesized benchmark shapes). llama.cpp
    // wants one token per row; its converter pads with unused tokens.
    for i in tokens.len()..cfg.vocab_size {
        tokens.push(format!("[PAD{i}]"));
        types.push(5);
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    kv.push(("tokenizer.ggml.model".into(), W::Str("gpt2".into())));
    kv.push(("tokenizer.ggml.pre".into(), W::Str("default".into())));
    kv.push(("tokenizer.ggml.tokens".into(), W::Strs(tokens)));
    kv.push(("tokenizer.ggml.token_type".into(), W::I32s(types)));
    kv.push(("tokenizer.ggml.merges".into(), W::Strs(merges)));
    if let Some(b) = cfg.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), W::U32(b)));
        let adds = tj["post_processor"].to_string().contains("SpecialToken");
        kv.push(("tokenizer.ggml.add_bos_token".into(), W::Bool(adds)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        kv.push(("tokenizer.ggml.eos_token_id".into(), W::U32(e)));
    }
    let tc = dir.join("tokenizer_config.json");
    if tc.exists() {
        let tc: Value = read_json(&tc)?;
        if let Some(t) = tc["chat_template"].as_str() {
            kv.push(("tokenizer.chat_template".into(), W::Str(t.to_string())));
        }
    }
    Ok(())
}

fn model_meta(cfg: &ModelConfig, scheme: Scheme) -> (String, Vec<(String, W)>) {
    // llama.cpp runs Mistral checkpoints as "llama".
    let arch = match cfg.arch {
        Arch::Qwen2 => "qwen2",
        Arch::Llama | Arch::Mistral => "llama",
    };
    let k = |s: &str| format!("{arch}.{s}");
    let kv = vec![
        ("general.architecture".into(), W::Str(arch.into())),
        ("general.name".into(), W::Str("copyhold-converted".into())),
        ("general.file_type".into(), W::U32(scheme.file_type())),
        ("general.alignment".into(), W::U32(32)),
        (
            k("context_length"),
            W::U32(cfg.max_position_embeddings as u32),
        ),
        (k("embedding_length"), W::U32(cfg.hidden_size as u32)),
        (k("block_count"), W::U32(cfg.num_layers as u32)),
        (
            k("feed_forward_length"),
            W::U32(cfg.intermediate_size as u32),
        ),
        (k("attention.head_count"), W::U32(cfg.num_heads as u32)),
        (
            k("attention.head_count_kv"),
            W::U32(cfg.num_kv_heads as u32),
        ),
        (k("attention.key_length"), W::U32(cfg.head_dim as u32)),
        (k("attention.value_length"), W::U32(cfg.head_dim as u32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            W::F32(cfg.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), W::F32(cfg.rope_theta as f32)),
        (k("vocab_size"), W::U32(cfg.vocab_size as u32)),
    ];
    (arch.to_string(), kv)
}

/// The tensors to write, GGUF name ← HF name, permuting Llama's q/k.
fn tensors(cfg: &ModelConfig, store: &WeightStore, scheme: Scheme) -> Result<Vec<Out>> {
    let (h, hd, f) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let mut list: Vec<(String, String, Vec<usize>)> = vec![(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![cfg.vocab_size, h],
    )];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        let b = format!("blk.{i}");
        let mut add = |g: &str, hf: &str, s: Vec<usize>| {
            list.push((format!("{b}.{g}"), format!("{p}.{hf}"), s))
        };
        add("attn_norm.weight", "input_layernorm.weight", vec![h]);
        add("attn_q.weight", "self_attn.q_proj.weight", vec![qd, h]);
        add("attn_k.weight", "self_attn.k_proj.weight", vec![kvd, h]);
        add("attn_v.weight", "self_attn.v_proj.weight", vec![kvd, h]);
        add("attn_output.weight", "self_attn.o_proj.weight", vec![h, qd]);
        if cfg.qkv_bias {
            add("attn_q.bias", "self_attn.q_proj.bias", vec![qd]);
            add("attn_k.bias", "self_attn.k_proj.bias", vec![kvd]);
            add("attn_v.bias", "self_attn.v_proj.bias", vec![kvd]);
        }
        if cfg.o_bias {
            add("attn_output.bias", "self_attn.o_proj.bias", vec![h]);
        }
        add(
            "ffn_norm.weight",
            "post_attention_layernorm.weight",
            vec![h],
        );
        add("ffn_gate.weight", "mlp.gate_proj.weight", vec![f, h]);
        add("ffn_up.weight", "mlp.up_proj.weight", vec![f, h]);
        add("ffn_down.weight", "mlp.down_proj.weight", vec![h, f]);
    }
    list.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![h],
    ));
    if !cfg.tie_word_embeddings {
        list.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![cfg.vocab_size, h],
        ));
    }
    let permute = cfg.arch != Arch::Qwen2;
    if permute && cfg.qkv_bias {
        return Err(Error::Unsupported(
            "converting Llama q/k biases to GGUF is not supported".into(),
        ));
    }
    list.into_iter()
        .map(|(g, hf, shape)| {
            let mut x = store.get(&hf, &shape)?.to_f32();
            let k = *shape.last().unwrap_or(&1);
            let heads = if g.ends_with("attn_q.weight") {
                Some(cfg.num_heads)
            } else if g.ends_with("attn_k.weight") {
                Some(cfg.num_kv_heads)
            } else {
                None
            };
            if let (true, Some(heads)) = (permute, heads) {
                x = permute_rows(&x, shape[0], k, shape[0] / heads);
            }
            let dtype = if shape.len() == 1 {
                DType::F32
            } else {
                scheme.pick(&g, k)
            };
            Ok(Out {
                data: encode(&x, k, dtype),
                name: g,
                shape,
                dtype,
            })
        })
        .collect()
}

/// HF rotate-half rows → llama.cpp's interleaved order.
fn permute_rows(x: &[f32], n: usize, k: usize, head_dim: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..n {
        let g = gguf_row(r, head_dim);
        out[g * k..(g + 1) * k].copy_from_slice(&x[r * k..(r + 1) * k]);
    }
    out
}

fn ggml_type(d: DType) -> u32 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 30,
        DType::Q(q) => q.ggml_type(),
    }
}

/// Converts the model directory `dir` into the GGUF file `out`.
pub fn convert(dir: &Path, out: &Path, scheme: Scheme) -> Result<()> {
    let cfg = ModelConfig::load(dir)?;
    let store = WeightStore::open(dir)?;
    let (_, mut kv) = model_meta(&cfg, scheme);
    tokenizer_meta(dir, &cfg, &mut kv)?;
    let tensors = tensors(&cfg, &store, scheme)?;
    write(out, &kv, &tensors)
}

fn write(path: &Path, kv: &[(String, W)], tensors: &[Out]) -> Result<()> {
    const ALIGN: usize = 32;
    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_kv(&mut h, k, v);
    }
    let mut offset = 0usize;
    let mut offsets = HashMap::new();
    for t in tensors {
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        h.extend_from_slice(&ggml_type(t.dtype).to_le_bytes());
        h.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.insert(t.name.as_str(), offset);
        offset = (offset + t.data.len()).div_ceil(ALIGN) * ALIGN;
    }
    h.resize(h.len().div_ceil(ALIGN) * ALIGN, 0);
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(&h).map_err(io)?;
    let mut at = 0usize;
    for t in tensors {
        let pad = offsets[t.name.as_str()] - at;
        f.write_all(&vec![0u8; pad]).map_err(io)?;
        f.write_all(&t.data).map_err(io)?;
        at += pad + t.data.len();
    }
    f.flush().map_err(io)
}
