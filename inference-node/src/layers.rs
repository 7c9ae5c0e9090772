//! Layers shared by every Llama-family architecture: linear projections,
//! RMSNorm, rotary embeddings, paged attention and the gated SiLU MLP.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::matmul::kernel::{WRows, dot_block, weighted_rows};
use crate::matmul::{matmul_wt, matmul_wt_many};
use crate::weights::{Tensor, WeightStore};

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

    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = matmul_wt(x, m, &self.w);
        self.add_bias(&mut y);
        y
    }

    /// Several projections of the same input in one parallel region; each
    /// result equals its own [`Linear::forward`].
    pub fn forward_many(lins: &[&Linear], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let ws: Vec<&Tensor> = lins.iter().map(|l| &l.w).collect();
        let mut ys = matmul_wt_many(x, m, &ws);
        for (l, y) in lins.iter().zip(ys.iter_mut()) {
            l.add_bias(y);
        }
        ys
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(b.len()) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
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

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let d = self.w.len();
        let mut y = vec![0.0; x.len()];
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((o, v), w) in yr.iter_mut().zip(xr).zip(&self.w) {
                *o = w * (v * r);
            }
        }
        y
    }
}

/// cos/sin for one position, `head_dim / 2` each.
pub struct RopeRow {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

/// Rotary tables for the positions of one batch.
pub fn rope_rows(inv_freq: &[f64], positions: &[usize]) -> Vec<RopeRow> {
    positions
        .iter()
        .map(|&p| {
            let (cos, sin) = inv_freq
                .iter()
                .map(|f| {
                    let a = p as f64 * f;
                    (a.cos() as f32, a.sin() as f32)
                })
                .unzip();
            RopeRow { cos, sin }
        })
        .collect()
}

/// Rotates each head of `x` in place (HF's rotate-half layout).
pub fn apply_rope(x: &mut [f32], heads: usize, head_dim: usize, rope: &RopeRow) {
    let half = head_dim / 2;
    for h in 0..heads {
        let v = &mut x[h * head_dim..(h + 1) * head_dim];
        for i in 0..half {
            let (a, b) = (v[i], v[i + half]);
            let (c, s) = (rope.cos[i], rope.sin[i]);
            v[i] = a * c - b * s;
            v[i + half] = b * c + a * s;
        }
    }
}

/// Paged K/V storage for the CPU backend: per layer, `[block][slot][kv_head][dim]`.
pub struct KvStore {
    pub block_size: usize,
    pub k: Vec<KvBuf>,
    pub v: Vec<KvBuf>,
    row: usize,
}

/// One layer's keys or values, in f32 (exact) or f16 (half the memory and
/// the memory traffic of attention; each value rounded once when stored).
pub enum KvBuf {
    F32(Vec<f32>),
    /// f16 bits (a `u16` buffer so the zeroed allocation stays lazy: pages
    /// are committed as blocks are first written, as with f32).
    F16(Vec<u16>),
}

impl KvBuf {
    fn new(n: usize, f16: bool) -> KvBuf {
        if f16 {
            KvBuf::F16(vec![0u16; n])
        } else {
            KvBuf::F32(vec![0.0; n])
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            KvBuf::F32(b) => b[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(b) => {
                let dst: &mut [half::f16] = bytemuck::cast_slice_mut(&mut b[at..at + src.len()]);
                dst.convert_from_f32_slice(src)
            }
        }
    }

    fn rows(&self) -> WRows<'_> {
        match self {
            KvBuf::F32(b) => WRows::F32(b),
            KvBuf::F16(b) => WRows::F16(b),
        }
    }
}

impl KvStore {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize, f16: bool) -> KvStore {
        let row = cfg.num_kv_heads * cfg.head_dim;
        let n = num_blocks * block_size * row;
        KvStore {
            block_size,
            k: (0..cfg.num_layers).map(|_| KvBuf::new(n, f16)).collect(),
            v: (0..cfg.num_layers).map(|_| KvBuf::new(n, f16)).collect(),
            row,
        }
    }

    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize, f16: bool) -> usize {
        let es = if f16 { 2 } else { 4 };
        2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * es
    }

    fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

/// One token of a batch: which sequence it belongs to and where.
#[derive(Debug, Clone)]
pub struct BatchToken {
    pub token: u32,
    pub pos: usize,
    /// Index into `Batch::block_tables`.
    pub seq: usize,
}

/// What one engine step hands a backend.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<BatchToken>,
    pub block_tables: Vec<Vec<u32>>,
    /// Indices into `tokens` whose logits are wanted, in order.
    pub logits_for: Vec<usize>,
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

    /// Runs the block on `x` (`m × hidden`) in place.
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        layer: usize,
        x: &mut [f32],
        batch: &Batch,
        rope: &[RopeRow],
        kv: &mut KvStore,
    ) {
        let m = batch.tokens.len();
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let hn = self.input_norm.forward(x);
        let [mut q, mut k, v]: [Vec<f32>; 3] =
            Linear::forward_many(&[&self.q, &self.k, &self.v], &hn, m)
                .try_into()
                .expect("three projections");
        for (i, r) in rope.iter().enumerate() {
            apply_rope(&mut q[i * nh * hd..(i + 1) * nh * hd], nh, hd, r);
            apply_rope(&mut k[i * nkv * hd..(i + 1) * nkv * hd], nkv, hd, r);
        }
        // Write this step's keys and values before anyone reads them.
        let row = kv.row;
        for (i, t) in batch.tokens.iter().enumerate() {
            let s = kv.slot(&batch.block_tables[t.seq], t.pos);
            kv.k[layer].write(s * row, &k[i * row..(i + 1) * row]);
            kv.v[layer].write(s * row, &v[i * row..(i + 1) * row]);
        }
        let (kc, vc) = (kv.k[layer].rows(), kv.v[layer].rows());
        let bs = kv.block_size;
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        // One task per (token, KV head): the `group` query heads sharing a
        // KV head are scored together, so each K/V row is read once. The
        // arithmetic of a token's head depends only on that token's query
        // and its sequence's cache, never on the rest of the batch.
        let mut attn = vec![0.0f32; m * nh * hd];
        attn.par_chunks_mut(group * hd)
            .enumerate()
            .for_each(|(idx, out)| {
                let (i, g) = (idx / nkv, idx % nkv);
                let t = &batch.tokens[i];
                let table = &batch.block_tables[t.seq];
                let qg = &q[(i * nh + g * group) * hd..(i * nh + (g + 1) * group) * hd];
                let start = match self.window {
                    Some(w) => (t.pos + 1).saturating_sub(w),
                    None => 0,
                };
                let npos = t.pos + 1 - start;
                // scores[hh * npos + j] for position start + j.
                let mut scores = vec![0.0f32; group * npos];
                let mut p = start;
                while p <= t.pos {
                    let run = (bs - p % bs).min(t.pos + 1 - p);
                    let s = table[p / bs] as usize * bs + p % bs;
                    dot_block(
                        qg,
                        group,
                        hd,
                        kc.offset(s * row + g * hd),
                        run,
                        row,
                        &mut scores[p - start..],
                        npos,
                    );
                    p += run;
                }
                for sc in scores.chunks_exact_mut(npos) {
                    let mut max = f32::NEG_INFINITY;
                    for v in sc.iter_mut() {
                        *v *= scale;
                        max = max.max(*v);
                    }
                    let mut sum = 0.0;
                    for v in sc.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    for v in sc.iter_mut() {
                        *v /= sum;
                    }
                }
                let offs: Vec<usize> = (start..=t.pos)
                    .map(|p| (table[p / bs] as usize * bs + p % bs) * row + g * hd)
                    .collect();
                weighted_rows(out, group, hd, &scores, npos, vc, &offs);
            });
        let o = self.o.forward(&attn, m);
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        let hn = self.post_norm.forward(x);
        let [mut g, u]: [Vec<f32>; 2] = Linear::forward_many(&[&self.gate, &self.up], &hn, m)
            .try_into()
            .expect("two projections");
        for (gv, uv) in g.iter_mut().zip(&u) {
            *gv = *gv / (1.0 + (-*gv).exp()) * uv;
        }
        let d = self.down.forward(&g, m);
        for (a, b) in x.iter_mut().zip(&d) {
            *a += b;
        }
    }
}
