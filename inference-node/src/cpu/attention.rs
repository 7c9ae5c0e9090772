//! Paged attention for the CPU backend, and the K/V storage it reads.
//!
//! Keys are kept transposed inside a block (`[block][kv_head][dim][slot]`)
//! so that q·K runs along vector lanes, one score per lane, with no
//! horizontal sums (block sizes that are a multiple of [`KEY_CHUNK`], as
//! the default 16; others take a scalar loop); values keep
//! rows of `head_dim` (`[block][slot][kv_head][dim]`), which is what the
//! probabilities × values product wants.
//!
//! Tokens of one sequence at consecutive positions (a prefill chunk) are
//! scored together in tiles, so each key is read once per tile instead of
//! once per token. A score, its softmax and its output row are computed the
//! same way whatever tile they fall in, so batching never changes a result.

use rayon::prelude::*;

use crate::cpu::matmul::kernel::{KEY_CHUNK, key_scores, softmax, weighted_rows};
use crate::engine::backend::Batch;
use crate::model::config::ModelConfig;
use crate::model::weights::WRows;

/// Tokens of one sequence scored together: enough to reuse every key many
/// times, few enough that a tile's scores stay in L2.
const TILE_TOKENS: usize = 16;

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

    /// `self[at + i * stride] = src[i]`.
    fn write(&mut self, at: usize, stride: usize, src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            // Values are rows: one copy (or one SIMD conversion).
            KvBuf::F32(b) if stride == 1 => b[at..at + src.len()].copy_from_slice(src),
            KvBuf::F16(b) if stride == 1 => {
                let dst: &mut [half::f16] = bytemuck::cast_slice_mut(&mut b[at..at + src.len()]);
                dst.convert_from_f32_slice(src)
            }
            KvBuf::F32(b) => {
                for (i, v) in src.iter().enumerate() {
                    b[at + i * stride] = *v;
                }
            }
            KvBuf::F16(b) => {
                for (i, v) in src.iter().enumerate() {
                    b[at + i * stride] = half::f16::from_f32(*v).to_bits();
                }
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

/// Paged K/V storage in host memory, per layer.
pub struct KvStore {
    pub block_size: usize,
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
    kv_heads: usize,
    head_dim: usize,
}

impl KvStore {
    pub fn new(cfg: &ModelConfig, num_blocks: usize, block_size: usize, f16: bool) -> KvStore {
        let shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim);
        KvStore::with_shape(shape, num_blocks, block_size, f16)
    }

    /// `(layers, kv_heads, head_dim)`.
    pub fn with_shape(
        (layers, kv_heads, head_dim): (usize, usize, usize),
        num_blocks: usize,
        block_size: usize,
        f16: bool,
    ) -> KvStore {
        let n = num_blocks * block_size * kv_heads * head_dim;
        KvStore {
            block_size,
            k: (0..layers).map(|_| KvBuf::new(n, f16)).collect(),
            v: (0..layers).map(|_| KvBuf::new(n, f16)).collect(),
            kv_heads,
            head_dim,
        }
    }

    /// Bytes one block takes across all layers (K and V).
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize, f16: bool) -> usize {
        let es = if f16 { 2 } else { 4 };
        2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * es
    }

    /// Stores one token's keys and values (`kv_heads × head_dim` each).
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let (bs, row) = (self.block_size, self.kv_heads * self.head_dim);
        let (block, slot) = (table[pos / bs] as usize, pos % bs);
        self.k[layer].write(block * row * bs + slot, bs, k);
        self.v[layer].write((block * bs + slot) * row, 1, v);
    }
}

/// Attention of every token of `batch` over its sequence's cached keys and
/// values (this step's already written) for `layer`: `q` is
/// `tokens × heads × head_dim`, and so is `attn`, which is overwritten.
pub fn paged_attention(
    q: &[f32],
    batch: &Batch,
    kv: &KvStore,
    layer: usize,
    heads: usize,
    window: Option<usize>,
    attn: &mut [f32],
) {
    let toks = &batch.tokens;
    let (nkv, hd) = (kv.kv_heads, kv.head_dim);
    let group = heads / nkv;
    // Runs of one sequence at consecutive positions, cut into tiles.
    let mut tiles = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let mut j = i + 1;
        while j < toks.len()
            && j - i < TILE_TOKENS
            && toks[j].seq == toks[i].seq
            && toks[j].pos == toks[j - 1].pos + 1
        {
            j += 1;
        }
        tiles.push((i, j));
        i = j;
    }
    let call = Call {
        q,
        batch,
        kv,
        layer,
        heads,
        window,
    };
    let part = |idx: usize| {
        let (i0, i1) = tiles[idx / nkv];
        tile(&call, i0..i1, idx % nkv)
    };
    let outs: Vec<Vec<f32>> = if toks.len() < crate::cpu::team::MAX_ROWS {
        // Decode-sized: on the spinning team, like the projections around it.
        let slots: Vec<std::sync::OnceLock<Vec<f32>>> = (0..tiles.len() * nkv)
            .map(|_| std::sync::OnceLock::new())
            .collect();
        crate::cpu::team::Team::global().run(slots.len(), &|idx| {
            let _ = slots[idx].set(part(idx));
        });
        slots
            .into_iter()
            .map(|s| s.into_inner().unwrap_or_default())
            .collect()
    } else {
        (0..tiles.len() * nkv).into_par_iter().map(part).collect()
    };
    assert_eq!(attn.len(), toks.len() * heads * hd, "attention output size");
    for (idx, out) in outs.iter().enumerate() {
        let ((i0, i1), g) = (tiles[idx / nkv], idx % nkv);
        for (t, i) in (i0..i1).enumerate() {
            let dst = (i * heads + g * group) * hd;
            attn[dst..dst + group * hd].copy_from_slice(&out[t * group * hd..(t + 1) * group * hd]);
        }
    }
}

/// What every tile of one layer's attention reads.
struct Call<'a> {
    q: &'a [f32],
    batch: &'a Batch,
    kv: &'a KvStore,
    layer: usize,
    heads: usize,
    window: Option<usize>,
}

/// One tile (`tokens`, all of one sequence at consecutive positions) for
/// KV head `g`: returns `tokens × group × head_dim`.
fn tile(call: &Call<'_>, tokens: std::ops::Range<usize>, g: usize) -> Vec<f32> {
    let Call {
        q,
        batch,
        kv,
        layer,
        heads,
        window,
    } = *call;
    let toks = &batch.tokens[tokens.clone()];
    let (nkv, hd, bs) = (kv.kv_heads, kv.head_dim, kv.block_size);
    let group = heads / nkv;
    let rows = toks.len() * group;
    let table = &batch.block_tables[toks[0].seq];
    let start_of = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let (lo, hi) = (start_of(toks[0].pos), toks[toks.len() - 1].pos);
    let (b_lo, b_hi) = (lo / bs, hi / bs);
    // Scores are indexed by position - base; lds covers the tile's blocks.
    let base = b_lo * bs;
    let lds = (b_hi - b_lo + 1) * bs;

    let mut qs = Vec::with_capacity(rows * hd);
    for i in tokens.clone() {
        let at = (i * heads + g * group) * hd;
        qs.extend_from_slice(&q[at..at + group * hd]);
    }
    let row = nkv * hd;
    let mut scores = vec![0.0f32; rows * lds];
    let kc = kv.k[layer].rows();
    if bs % KEY_CHUNK == 0 {
        let chunks: Vec<usize> = (b_lo..=b_hi)
            .flat_map(|b| {
                let blk = table[b] as usize * row * bs + g * hd * bs;
                (0..bs / KEY_CHUNK).map(move |c| blk + c * KEY_CHUNK)
            })
            .collect();
        key_scores(&qs, rows, hd, kc, &chunks, bs, &mut scores, lds);
    } else {
        // One multiply-add chain per score over `d` in order, as the
        // kernel does lane by lane.
        for (r, sc) in scores.chunks_exact_mut(lds).enumerate() {
            let qr = &qs[r * hd..(r + 1) * hd];
            for b in b_lo..=b_hi {
                let blk = table[b] as usize * row * bs + g * hd * bs;
                for l in 0..bs {
                    let mut acc = 0.0f32;
                    for (d, qv) in qr.iter().enumerate() {
                        acc += qv * kc.get(blk + d * bs + l);
                    }
                    sc[(b - b_lo) * bs + l] = acc;
                }
            }
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    for (r, sc) in scores.chunks_exact_mut(lds).take(rows).enumerate() {
        let pos = toks[r / group].pos;
        let (a, b) = (start_of(pos) - base, pos - base + 1);
        softmax(&mut sc[a..b], scale);
        // Positions this token does not see weigh exactly zero: adding
        // 0 · v leaves every output bit as if they were not there.
        sc[lo - base..a].fill(0.0);
        sc[b..hi - base + 1].fill(0.0);
    }
    let offs: Vec<usize> = (lo..=hi)
        .map(|p| (table[p / bs] as usize * bs + p % bs) * row + g * hd)
        .collect();
    let mut out = vec![0.0f32; rows * hd];
    weighted_rows(
        &mut out,
        rows,
        hd,
        &scores[lo - base..],
        lds,
        kv.v[layer].rows(),
        &offs,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::BatchToken;

    const HEADS: usize = 4;
    const KVH: usize = 2;
    const HD: usize = 32;

    fn val(seed: usize, i: usize) -> f32 {
        ((seed * 7919 + i * 104_729) as f32 * 1e-3).sin()
    }

    /// Plain softmax attention over positions `start..=pos` of one sequence.
    fn naive(
        q: &[f32],
        ks: &[Vec<f32>],
        vs: &[Vec<f32>],
        pos: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut out = vec![0.0; HEADS * HD];
        for h in 0..HEADS {
            let g = h / (HEADS / KVH);
            let qh = &q[h * HD..(h + 1) * HD];
            let sc: Vec<f64> = (start..=pos)
                .map(|p| {
                    let kr = &ks[p][g * HD..(g + 1) * HD];
                    qh.iter().zip(kr).map(|(a, b)| (a * b) as f64).sum::<f64>() / (HD as f64).sqrt()
                })
                .collect();
            let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..HD {
                out[h * HD + d] = (start..=pos)
                    .zip(&e)
                    .map(|(p, w)| w / sum * vs[p][g * HD + d] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// Two sequences written in chunks through shuffled blocks; every
    /// token's attention matches the naive product, and is bit-identical
    /// whether computed in its chunk, alone, or beside another sequence.
    fn check(block_size: usize, window: Option<usize>, f16: bool) {
        let lens = [37usize, 21];
        let blocks_per = 40usize.div_ceil(block_size);
        let mut kv = KvStore::with_shape((1, KVH, HD), 2 * blocks_per, block_size, f16);
        // Sequence s owns blocks s, s+2, s+4, ... in reverse order.
        let tables: Vec<Vec<u32>> = (0..2)
            .map(|s| (0..blocks_per).rev().map(|b| (2 * b + s) as u32).collect())
            .collect();
        let row = KVH * HD;
        let mut ks = vec![vec![]; 2];
        let mut vs = vec![vec![]; 2];
        for s in 0..2 {
            for p in 0..lens[s] {
                let k: Vec<f32> = (0..row).map(|i| val(s * 1000 + p, i)).collect();
                let v: Vec<f32> = (0..row).map(|i| val(s * 1000 + p + 500, i)).collect();
                kv.write(0, &tables[s], p, &k, &v);
                let round = |x: Vec<f32>| -> Vec<f32> {
                    if f16 {
                        x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect()
                    } else {
                        x
                    }
                };
                ks[s].push(round(k));
                vs[s].push(round(v));
            }
        }
        let q_of = |s: usize, p: usize| -> Vec<f32> {
            (0..HEADS * HD)
                .map(|i| val(s * 1000 + p + 250, i))
                .collect()
        };
        let run = |toks: Vec<BatchToken>| -> Vec<f32> {
            let q: Vec<f32> = toks.iter().flat_map(|t| q_of(t.seq, t.pos)).collect();
            let batch = Batch {
                tokens: toks,
                block_tables: tables.clone(),
                logits_for: vec![],
            };
            let mut out = vec![0.0; batch.tokens.len() * HEADS * HD];
            paged_attention(&q, &batch, &kv, 0, HEADS, window, &mut out);
            out
        };
        let tok = |seq: usize, pos: usize| BatchToken {
            token: 0,
            pos,
            seq,
            wide: true,
        };
        // Sequence 0 as one 30-token chunk (tiles of 16 + 14) after 7 cached
        // positions, beside sequence 1's last token.
        let mut toks: Vec<BatchToken> = (7..37).map(|p| tok(0, p)).collect();
        toks.push(tok(1, 20));
        let together = run(toks.clone());
        let tol = if f16 { 2e-3 } else { 1e-5 };
        for (i, t) in toks.iter().enumerate() {
            let got = &together[i * HEADS * HD..(i + 1) * HEADS * HD];
            let want = naive(&q_of(t.seq, t.pos), &ks[t.seq], &vs[t.seq], t.pos, window);
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < tol,
                    "bs {block_size} w {window:?} f16 {f16}: {a} vs {b}"
                );
            }
            let alone = run(vec![t.clone()]);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "token {} of seq {} differs alone (bs {block_size}, w {window:?})",
                t.pos,
                t.seq
            );
        }
    }

    #[test]
    fn attention_matches_naive_and_a_token_is_bit_identical_in_a_chunk_or_alone() {
        for bs in [16, 32, 4, 5] {
            for window in [None, Some(9)] {
                for f16 in [false, true] {
                    check(bs, window, f16);
                }
            }
        }
    }
}
