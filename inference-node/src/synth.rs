//! `synth`: random-weight model directories at real shapes (config,
//! safetensors — sharded when large —, a byte-level BPE tokenizer and a chat
//! template), for demos, tests of config variants and benchmarks without
//! downloading anything.

use crate::model::tokenizer::byte_to_char;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use serde_json::{Value, json};

use crate::engine::sampling::Rng;
use crate::error::{Error, Result};
use crate::model::config::Arch;
use crate::model::weights::DType;

/// Shape and format of a synthesized model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub dtype: DType,
    /// `None`: hidden / heads.
    pub head_dim: Option<usize>,
    pub tie_word_embeddings: bool,
    /// 0: one file per ~2 GB.
    pub shards: usize,
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
    pub seed: u64,
}

impl SynthSpec {
    /// A small model, handy in tests.
    pub fn tiny(arch: Arch) -> SynthSpec {
        SynthSpec {
            arch,
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            vocab: 300,
            dtype: DType::F32,
            head_dim: None,
            tie_word_embeddings: false,
            shards: 1,
            max_position_embeddings: 512,
            sliding_window: None,
            seed: 1,
        }
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }
}

const SPECIALS: [&str; 5] = [
    "<|begin|>",
    "<|end|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
];
const TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// An unkeyed hash (SipHash with zero keys, as `DefaultHasher::new`), so the
/// same spec always gives the same weights on every machine.
fn stable_hash(ids: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    0u64.hash(&mut h);
    ids.hash(&mut h);
    h.finish()
}

/// A byte-level BPE tokenizer.json: specials, all 256 bytes, then merges of
/// letter pairs (with and without a leading space) until `vocab` is filled.
pub fn tokenizer_json(vocab: usize) -> Value {
    let mut v: BTreeMap<String, usize> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for s in SPECIALS {
        order.push(s.to_string());
    }
    for b in 0..=255u8 {
        order.push(byte_to_char(b).to_string());
    }
    let mut merges = Vec::new();
    let space = byte_to_char(b' ').to_string();
    'outer: for first in std::iter::once(space.clone()).chain(('a'..='z').map(String::from)) {
        for c in 'a'..='z' {
            if order.len() >= vocab {
                break 'outer;
            }
            let merged = format!("{first}{c}");
            merges.push(json!([first, c.to_string()]));
            order.push(merged);
        }
    }
    for (i, t) in order.iter().enumerate() {
        v.insert(t.clone(), i);
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": SPECIALS[0], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {SPECIALS[0]: {"id": SPECIALS[0], "ids": [0], "tokens": [SPECIALS[0]]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": v, "merges": merges}
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    std::fs::write(path, text).map_err(io(path))
}

/// Tensor names and shapes in HF order.
fn tensor_list(s: &SynthSpec) -> Vec<(String, Vec<usize>, bool)> {
    let (h, hd) = (s.hidden, s.head_dim());
    let q = s.heads * hd;
    let kv = s.kv_heads * hd;
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![s.vocab, h],
        false,
    )];
    let qkv_bias = s.arch == Arch::Qwen2;
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h], true));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h], false));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h], false));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h], false));
        if qkv_bias {
            t.push((format!("{p}.self_attn.q_proj.bias"), vec![q], false));
            t.push((format!("{p}.self_attn.k_proj.bias"), vec![kv], false));
            t.push((format!("{p}.self_attn.v_proj.bias"), vec![kv], false));
        }
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q], false));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            true,
        ));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![s.intermediate, h],
            false,
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![s.intermediate, h],
            false,
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![h, s.intermediate],
            false,
        ));
    }
    t.push(("model.norm.weight".to_string(), vec![h], true));
    if !s.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![s.vocab, h], false));
    }
    t
}

fn random_bytes(n: usize, dtype: DType, norm: bool, seed: u64) -> Vec<u8> {
    const CHUNK: usize = 1 << 16;
    let std = if norm { 0.1 } else { 0.05 };
    let mut out = vec![0u8; n * dtype.size()];
    out.par_chunks_mut(CHUNK * dtype.size())
        .enumerate()
        .for_each(|(c, buf)| {
            let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
            for e in buf.chunks_exact_mut(dtype.size()) {
                let u = rng.next_f64() as f32 - 0.5;
                let x = if norm {
                    1.0 + u * std * 3.46
                } else {
                    u * std * 3.46
                };
                match dtype {
                    DType::F32 => e.copy_from_slice(&x.to_le_bytes()),
                    DType::F16 => e.copy_from_slice(&f16::from_f32(x).to_le_bytes()),
                    DType::BF16 => e.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
                    // Refused by `synth` before any tensor is made.
                    DType::Q(_) => {}
                }
            }
        });
    out
}

/// Writes the model directory; returns the files written.
pub fn synth(spec: &SynthSpec, out: &Path) -> Result<Vec<PathBuf>> {
    if spec.heads == 0 || spec.kv_heads == 0 || !spec.heads.is_multiple_of(spec.kv_heads) {
        return Err(Error::Unsupported(
            "--heads must be a multiple of --kv-heads".into(),
        ));
    }
    if spec.vocab < SPECIALS.len() + 256 {
        return Err(Error::Unsupported(format!(
            "--vocab must be at least {}",
            SPECIALS.len() + 256
        )));
    }
    let (dtype_name, st_dtype) = match spec.dtype {
        DType::F32 => ("float32", safetensors::Dtype::F32),
        DType::F16 => ("float16", safetensors::Dtype::F16),
        DType::BF16 => ("bfloat16", safetensors::Dtype::BF16),
        DType::Q(_) => {
            return Err(Error::Unsupported(
                "synth writes f32/f16/bf16 safetensors; quantize with `copyhold-node gguf`".into(),
            ));
        }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut config = json!({
        "architectures": [spec.arch.hf_name()],
        "model_type": spec.arch.model_type(),
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim(),
        "vocab_size": spec.vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": dtype_name,
    });
    match (spec.arch, spec.sliding_window) {
        (Arch::Mistral, w) => config["sliding_window"] = json!(w),
        (Arch::Qwen2, Some(w)) => {
            config["use_sliding_window"] = json!(true);
            config["sliding_window"] = json!(w);
            config["max_window_layers"] = json!(0);
        }
        _ => {}
    }
    let mut files = Vec::new();
    let p = out.join("config.json");
    write_json(&p, &config)?;
    files.push(p);
    let p = out.join("generation_config.json");
    write_json(&p, &json!({"bos_token_id": 0, "eos_token_id": 1}))?;
    files.push(p);
    let p = out.join("tokenizer_config.json");
    write_json(
        &p,
        &json!({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": TEMPLATE,
                "add_bos_token": true, "model_max_length": spec.max_position_embeddings}),
    )?;
    files.push(p);
    let p = out.join("tokenizer.json");
    write_json(&p, &tokenizer_json(spec.vocab))?;
    files.push(p);

    let tensors = tensor_list(spec);
    let total: usize = tensors
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>())
        .sum::<usize>()
        * spec.dtype.size();
    let shards = if spec.shards == 0 {
        total.div_ceil(2 << 30).max(1)
    } else {
        spec.shards
    };
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (si, group) in tensors.chunks(per).enumerate() {
        let name_ids = |n: &str| n.bytes().map(u32::from).collect::<Vec<_>>();
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, shards)
        };
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = group
            .iter()
            .map(|(n, shape, norm)| {
                // Seeded by name, so sharding does not change the weights.
                let seed = spec.seed.wrapping_mul(1_000_003) ^ stable_hash(&name_ids(n));
                (
                    n.clone(),
                    shape.clone(),
                    random_bytes(shape.iter().product(), spec.dtype, *norm, seed),
                )
            })
            .collect();
        let mut views = Vec::new();
        for (n, shape, bytes) in &data {
            let v = TensorView::new(st_dtype, shape.clone(), bytes).map_err(|e| {
                Error::Safetensors {
                    path: out.join(&name),
                    message: e.to_string(),
                }
            })?;
            views.push((n.clone(), v));
            weight_map.insert(n.clone(), json!(name));
        }
        let path = out.join(&name);
        safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::Safetensors {
            path: path.clone(),
            message: e.to_string(),
        })?;
        files.push(path);
    }
    if shards > 1 {
        let p = out.join("model.safetensors.index.json");
        write_json(
            &p,
            &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
        files.push(p);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_map_is_a_bijection_onto_printable_characters() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(!c.is_whitespace() && !c.is_control(), "{b} -> {c:?}");
            assert!(seen.insert(c));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
    }
}
