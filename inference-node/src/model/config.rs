//! Hugging Face `config.json` → the runtime configuration the engine uses.
//!
//! The serde struct mirrors what real checkpoints write (several spellings of
//! the same thing across transformers versions); `ModelConfig` is the one
//! normalized shape the layers read.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result, read_json};

/// Which decoder family a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    /// The HF class name, as written in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// `model_type` as HF writes it.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// Parses a CLI spelling (`llama`, `qwen2`, `mistral`).
    pub fn from_cli(s: &str) -> Option<Arch> {
        match s {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Normalized model configuration.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections (Qwen2 always, Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama `attention_bias` only).
    pub o_bias: bool,
    /// Per layer: attend only to the last `w` positions.
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `dtype` (transformers v5) or `torch_dtype` as written in config.json.
    pub checkpoint_dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
    #[serde(default)]
    max_window_layers: Option<usize>,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    bos_token_id: Option<Value>,
    #[serde(default)]
    eos_token_id: Option<Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    torch_dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

/// Token ids may be written as a number or a list of numbers.
pub fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Loads `DIR/config.json`.
    pub fn load(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let raw: Value = read_json(&path)?;
        Self::from_value(&path, raw)
    }

    /// Normalizes a parsed `config.json`; `path` is only used in errors.
    pub fn from_value(path: &Path, raw: Value) -> Result<ModelConfig> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = serde_json::from_value(raw).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let arch_name = raw
            .architectures
            .first()
            .cloned()
            .or_else(|| raw.model_type.clone())
            .unwrap_or_default();
        let arch = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "MistralForCausalLM" | "mistral" => Arch::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                });
            }
        };
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(bad(format!(
                "hidden_act {act:?} is not supported (only silu)"
            )));
        }
        if let Some(p) = raw.partial_rotary_factor
            && (p - 1.0).abs() > f64::EPSILON
        {
            return Err(bad(format!("partial_rotary_factor {p} is not supported")));
        }
        if raw.num_attention_heads == 0 || raw.num_hidden_layers == 0 || raw.hidden_size == 0 {
            return Err(bad(
                "hidden_size, num_hidden_layers and num_attention_heads must be > 0".into(),
            ));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if num_kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {num_kv_heads}",
                raw.num_attention_heads
            )));
        }
        let head_dim = match raw.head_dim {
            Some(h) => h,
            None => {
                if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
                    return Err(bad("hidden_size is not a multiple of num_attention_heads and head_dim is not given".into()));
                }
                raw.hidden_size / raw.num_attention_heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {head_dim} must be even for RoPE")));
        }

        // transformers v5 moved rope_theta and the scaling into rope_parameters.
        let rope_params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        // When both are written, rope_parameters is the newer, canonical one.
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(raw.rope_theta)
            .unwrap_or(10_000.0);
        let scaling_src = raw
            .rope_scaling
            .as_ref()
            .filter(|v| v.is_object())
            .or(rope_params);
        let rope_scaling = match scaling_src {
            None => RopeScaling::Default,
            Some(v) => parse_rope_scaling(v, raw.max_position_embeddings).map_err(bad)?,
        };

        let tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(false);
        let attention_bias = raw.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };

        let sliding_window = sliding_windows(arch, &raw).map_err(bad)?;

        Ok(ModelConfig {
            arch,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta,
            rope_scaling,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            sliding_window,
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            checkpoint_dtype: raw.dtype.clone().or(raw.torch_dtype.clone()),
        })
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Inverse rotary frequencies, one per pair of dimensions, after scaling.
    ///
    /// HF keeps these in a module buffer, which `from_pretrained` casts to
    /// the checkpoint's `dtype`/`torch_dtype`: a bf16 or f16 checkpoint runs
    /// with frequencies rounded to that type even when the math is done in
    /// f32. We reproduce that rounding, as HF transformers is the reference
    /// (positions far from 0 otherwise drift by ~1e-3 in the logits).
    pub fn inv_freq(&self) -> Vec<f64> {
        let v = self.inv_freq_exact();
        match self.checkpoint_dtype.as_deref() {
            Some("bfloat16") => v
                .iter()
                .map(|&x| half::bf16::from_f64(x).to_f64())
                .collect(),
            Some("float16") => v.iter().map(|&x| half::f16::from_f64(x).to_f64()).collect(),
            _ => v,
        }
    }

    /// Inverse frequencies in full precision.
    pub fn inv_freq_exact(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => base
                .iter()
                .map(|&freq| {
                    let low_wavelen = old / low_freq_factor;
                    let high_wavelen = old / high_freq_factor;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect(),
        }
    }
}

fn parse_rope_scaling(v: &Value, max_pos: usize) -> Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| v.get(k).and_then(Value::as_f64);
    let need = |k: &str| num(k).ok_or_else(|| format!("rope scaling {kind:?} needs {k}"));
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")
                .unwrap_or(max_pos as f64),
        }),
        other => Err(format!(
            "rope scaling type {other:?} is not supported (default, linear, llama3)"
        )),
    }
}

fn sliding_windows(arch: Arch, raw: &RawConfig) -> Result<Vec<Option<usize>>, String> {
    let n = raw.num_hidden_layers;
    let window = match arch {
        Arch::Llama => None,
        Arch::Mistral => raw.sliding_window,
        Arch::Qwen2 => {
            if raw.use_sliding_window.unwrap_or(false) {
                raw.sliding_window
            } else {
                None
            }
        }
    };
    if let Some(types) = &raw.layer_types {
        if types.len() != n {
            return Err(format!(
                "layer_types has {} entries for {n} layers",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                "full_attention" => Ok(None),
                "sliding_attention" => raw
                    .sliding_window
                    .map(Some)
                    .ok_or_else(|| "sliding_attention layer without sliding_window".to_string()),
                other => Err(format!("layer type {other:?} is not supported")),
            })
            .collect();
    }
    Ok((0..n)
        .map(|i| match (arch, window) {
            (_, None) => None,
            (Arch::Qwen2, Some(w)) => {
                if i >= raw.max_window_layers.unwrap_or(0) {
                    Some(w)
                } else {
                    None
                }
            }
            (_, Some(w)) => Some(w),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 128
        })
    }
    fn load(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(Path::new("config.json"), v)
    }

    #[test]
    fn head_dim_is_derived_and_kv_heads_default_to_heads() {
        let c = load(base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 4);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
    }

    #[test]
    fn rope_theta_is_read_from_rope_parameters() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "default"});
        assert_eq!(load(v).unwrap().rope_theta, 500000.0);
    }

    #[test]
    fn linear_scaling_divides_frequencies() {
        let mut v = base();
        v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        let c = load(v).unwrap();
        let plain = load(base()).unwrap().inv_freq();
        for (a, b) in c.inv_freq().iter().zip(plain) {
            assert!((a * 4.0 - b).abs() < 1e-15);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = load(v).unwrap();
        let f = c.inv_freq();
        assert_eq!(f[0], 1.0); // highest frequency untouched
        let last_plain = 1.0 / 500000f64.powf(14.0 / 16.0);
        assert!((f[7] - last_plain / 8.0).abs() < 1e-18);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_windows_only_above_max_window_layers() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["use_sliding_window"] = json!(true);
        v["sliding_window"] = json!(32);
        v["max_window_layers"] = json!(1);
        v["tie_word_embeddings"] = json!(true);
        let c = load(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.sliding_window, vec![None, Some(32)]);
    }

    #[test]
    fn mistral_windows_every_layer() {
        let mut v = base();
        v["architectures"] = json!(["MistralForCausalLM"]);
        v["sliding_window"] = json!(16);
        v["num_key_value_heads"] = json!(2);
        let c = load(v).unwrap();
        assert_eq!(c.sliding_window, vec![Some(16), Some(16)]);
        assert_eq!(c.group_size(), 2);
    }

    #[test]
    fn rotary_frequencies_are_rounded_to_a_half_precision_checkpoint_dtype() {
        let mut v = base();
        v["dtype"] = json!("bfloat16");
        let c = load(v).unwrap();
        let exact = c.inv_freq_exact();
        let rounded = c.inv_freq();
        assert_ne!(exact, rounded);
        for (a, b) in exact.iter().zip(&rounded) {
            assert_eq!(half::bf16::from_f64(*a).to_f64(), *b);
        }
        let mut v = base();
        v["torch_dtype"] = json!("float32");
        let c = load(v).unwrap();
        assert_eq!(c.inv_freq(), c.inv_freq_exact());
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = load(v).unwrap_err().to_string();
        assert!(
            e.contains("GPT2LMHeadModel") && e.contains("config.json"),
            "{e}"
        );
    }

    #[test]
    fn unknown_rope_type_is_rejected() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 2.0});
        assert!(load(v).unwrap_err().to_string().contains("yarn"));
    }
}
