//! The layers every Llama-family architecture is made of, as stored
//! weights under their Hugging Face names: what a backend computes with,
//! not how. The CPU forward passes are in `crate::cpu::layers`; the CUDA
//! backend uploads the same tensors.

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{Tensor, WeightStore};

/// `y = x Wᵀ (+ b)`, W kept in its stored dtype.
pub struct Linear {
    pub w: Tensor,
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn load(
        store: &WeightStore,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = store.get(&format!("{prefix}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(store.get(&format!("{prefix}.bias"), &[out])?.to_f32())
        } else {
            None
        };
        Ok(Linear { w, bias })
    }

    pub fn out_dim(&self) -> usize {
        self.w.shape[0]
    }
}

/// Root-mean-square norm with a learned scale.
pub struct RmsNorm {
    pub w: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(store: &WeightStore, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            w: store.get(name, &[dim])?.to_f32(),
            eps: eps as f32,
        })
    }
}

/// Gated attention + MLP block with HF weight names.
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub post_norm: RmsNorm,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub window: Option<usize>,
}

impl DecoderLayer {
    pub fn load(store: &WeightStore, cfg: &ModelConfig, i: usize) -> Result<DecoderLayer> {
        let p = format!("model.layers.{i}");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let q_out = cfg.num_heads * hd;
        let kv_out = cfg.num_kv_heads * hd;
        Ok(DecoderLayer {
            input_norm: RmsNorm::load(
                store,
                &format!("{p}.input_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            q: Linear::load(
                store,
                &format!("{p}.self_attn.q_proj"),
                q_out,
                h,
                cfg.qkv_bias,
            )?,
            k: Linear::load(
                store,
                &format!("{p}.self_attn.k_proj"),
                kv_out,
                h,
                cfg.qkv_bias,
            )?,
            v: Linear::load(
                store,
                &format!("{p}.self_attn.v_proj"),
                kv_out,
                h,
                cfg.qkv_bias,
            )?,
            o: Linear::load(
                store,
                &format!("{p}.self_attn.o_proj"),
                h,
                q_out,
                cfg.o_bias,
            )?,
            post_norm: RmsNorm::load(
                store,
                &format!("{p}.post_attention_layernorm.weight"),
                h,
                cfg.rms_norm_eps,
            )?,
            gate: Linear::load(
                store,
                &format!("{p}.mlp.gate_proj"),
                cfg.intermediate_size,
                h,
                false,
            )?,
            up: Linear::load(
                store,
                &format!("{p}.mlp.up_proj"),
                cfg.intermediate_size,
                h,
                false,
            )?,
            down: Linear::load(
                store,
                &format!("{p}.mlp.down_proj"),
                h,
                cfg.intermediate_size,
                false,
            )?,
            window: cfg.sliding_window.get(i).copied().flatten(),
        })
    }
}
