//! The CPU forward passes of the model's layers: linear projections,
//! RMSNorm, rotary embeddings, paged attention and the gated SiLU MLP.

use rayon::prelude::*;

use crate::cpu::attention::{KvStore, paged_attention};
use crate::cpu::matmul::kernel;
use crate::cpu::matmul::{matmul_wt, matmul_wt_rows_into};
use crate::engine::backend::Batch;
use crate::model::config::ModelConfig;
use crate::model::layers::{DecoderLayer, Linear, RmsNorm};
use crate::model::weights::Tensor;

impl Linear {
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = matmul_wt(x, m, &self.w);
        self.add_bias(&mut y);
        y
    }

    /// Several projections of the same input, in one parallel region, into
    /// caller-owned outputs; the rows in `wide` (long prompts' tokens) on
    /// the wide prefill kernels where the CPU has them. Each result equals
    /// its own [`Linear::forward`] on the other rows.
    pub fn forward_rows_into(
        lins: &[&Linear],
        x: &[f32],
        m: usize,
        wide: &[std::ops::Range<usize>],
        outs: &mut [&mut [f32]],
    ) {
        let ws: Vec<&Tensor> = lins.iter().map(|l| &l.w).collect();
        matmul_wt_rows_into(x, m, wide, &ws, outs);
        for (l, y) in lins.iter().zip(outs.iter_mut()) {
            l.add_bias(y);
        }
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

impl RmsNorm {
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        self.forward_into(x, &mut y);
        y
    }

    pub fn forward_into(&self, x: &[f32], y: &mut [f32]) {
        let d = self.w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            for ((o, v), w) in yr.iter_mut().zip(xr).zip(&self.w) {
                *o = w * (v * r);
            }
        }
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

/// Activation buffers of one forward pass, sized for its tokens and reused
/// by every layer: no allocation (and no fresh pages to fault in) per layer.
pub struct Scratch {
    hn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
}

impl Scratch {
    pub fn new(cfg: &ModelConfig, m: usize) -> Scratch {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        Scratch {
            hn: vec![0.0; m * h],
            q: vec![0.0; m * qd],
            k: vec![0.0; m * kvd],
            v: vec![0.0; m * kvd],
            attn: vec![0.0; m * qd],
            o: vec![0.0; m * h],
            g: vec![0.0; m * f],
            u: vec![0.0; m * f],
        }
    }
}

impl DecoderLayer {
    /// Runs the block on `x` (`m × hidden`) in place.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        cfg: &ModelConfig,
        layer: usize,
        x: &mut [f32],
        batch: &Batch,
        rope: &[RopeRow],
        kv: &mut KvStore,
        s: &mut Scratch,
    ) {
        let m = batch.tokens.len();
        let wide = batch.wide_runs();
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        self.input_norm.forward_into(x, &mut s.hn);
        Linear::forward_rows_into(
            &[&self.q, &self.k, &self.v],
            &s.hn,
            m,
            &wide,
            &mut [&mut s.q, &mut s.k, &mut s.v],
        );
        for (i, r) in rope.iter().enumerate() {
            apply_rope(&mut s.q[i * nh * hd..(i + 1) * nh * hd], nh, hd, r);
            apply_rope(&mut s.k[i * nkv * hd..(i + 1) * nkv * hd], nkv, hd, r);
        }
        // Write this step's keys and values before anyone reads them.
        let row = nkv * hd;
        for (i, t) in batch.tokens.iter().enumerate() {
            let (kr, vr) = (&s.k[i * row..(i + 1) * row], &s.v[i * row..(i + 1) * row]);
            kv.write(layer, &batch.block_tables[t.seq], t.pos, kr, vr);
        }
        paged_attention(&s.q, batch, kv, layer, nh, self.window, &mut s.attn);
        Linear::forward_rows_into(&[&self.o], &s.attn, m, &wide, &mut [&mut s.o]);
        for (a, b) in x.iter_mut().zip(&s.o) {
            *a += b;
        }
        self.post_norm.forward_into(x, &mut s.hn);
        Linear::forward_rows_into(
            &[&self.gate, &self.up],
            &s.hn,
            m,
            &wide,
            &mut [&mut s.g, &mut s.u],
        );
        silu_mul(&mut s.g, &s.u);
        Linear::forward_rows_into(&[&self.down], &s.g, m, &wide, &mut [&mut s.o]);
        for (a, b) in x.iter_mut().zip(&s.o) {
            *a += b;
        }
    }
}

/// `g = silu(g) · u`, elementwise, in parallel chunks for prefill-sized
/// activations (elementwise, so the split changes nothing).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 1 << 16;
    if g.len() <= CHUNK {
        kernel::silu_mul(g, u);
    } else {
        g.par_chunks_mut(CHUNK)
            .zip(u.par_chunks(CHUNK))
            .for_each(|(g, u)| kernel::silu_mul(g, u));
    }
}
