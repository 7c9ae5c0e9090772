//! `y = x · Wᵀ` for weights stored as f32/f16/bf16 rows, computed in f32.
//!
//! With few activation rows (decode), output rows of W are split into
//! L2-sized tiles spread over rayon threads; with many (prefill), each thread
//! takes bands of activation rows that sweep W tile by tile. Every tile is
//! multiplied by the fused kernel in [`kernel`], which reads the weights
//! in their stored dtype straight from the memory map and widens them in
//! registers (AVX-512 or AVX2 + F16C, chosen at run time, with a portable
//! fallback). Every output element is one dot product whose arithmetic does
//! not depend on `m`, the tiling or the other rows of the batch (see the
//! kernel's module comment), so batching never changes a result.
//!
//! `unsafe` lives only in [`kernel`].

pub mod amx;
pub mod kernel;
pub mod qdot;
#[cfg(target_arch = "x86_64")]
mod qdot_x86;
pub mod repack;
#[cfg(target_arch = "x86_64")]
mod repack_x86;

use std::cell::RefCell;

use rayon::prelude::*;

use crate::model::weights::Tensor;
use crate::model::weights::WRows;
use kernel::dot_block;

thread_local! {
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Bytes (as stored) of one weight tile: every block of activation rows
/// sweeps the tile, so it should stay in L2; with many rows each tile also
/// re-reads all of `x`, so larger tiles mean less traffic.
fn tile_budget(m: usize) -> usize {
    static B: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    let (small, large) = *B.get_or_init(|| {
        let get = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        (
            get("COPYHOLD_TILE_KIB_SMALL", 256) << 10,
            get("COPYHOLD_TILE_KIB_LARGE", 1024) << 10,
        )
    });
    if m >= 32 { large } else { small }
}

/// `x` is `m × k` row-major, `w` is `n × k`; returns `m × n`.
pub fn matmul_wt(x: &[f32], m: usize, w: &Tensor) -> Vec<f32> {
    matmul_wt_many(x, m, &[w]).pop().unwrap_or_default()
}

/// [`matmul_wt`] for several weights sharing the input (q/k/v, gate/up) in
/// one parallel region, so the threads meet once instead of once per
/// weight. Each result is exactly what `matmul_wt` would return.
pub fn matmul_wt_many(x: &[f32], m: usize, ws: &[&Tensor]) -> Vec<Vec<f32>> {
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; m * w.shape[0]]).collect();
    let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
    matmul_wt_into(x, m, ws, &mut outs);
    ys
}

/// Rows of activations per parallel job when there are many: the jobs
/// write disjoint bands of the outputs, and each sweeps the weights tile
/// by tile with its band's rows.
fn band_rows(m: usize, threads: usize) -> usize {
    // Two bands per thread for balance, in whole register blocks (6 rows).
    (m.div_ceil(threads * 2)).div_ceil(6) * 6
}

/// [`matmul_wt_many`] into caller-owned outputs (`outs[i]` is `m × n_i`),
/// so a forward pass reuses its buffers from layer to layer.
pub fn matmul_wt_into(x: &[f32], m: usize, ws: &[&Tensor], outs: &mut [&mut [f32]]) {
    assert_eq!(ws.len(), outs.len(), "one output per weight");
    if split_quantized(x, m, ws, outs) {
        return;
    }
    for (w, o) in ws.iter().zip(outs.iter()) {
        assert_eq!(
            x.len(),
            m * w.shape[1],
            "activation shape does not match {}",
            w.name
        );
        assert_eq!(
            o.len(),
            m * w.shape[0],
            "output shape does not match {}",
            w.name
        );
    }
    let threads = rayon::current_num_threads().max(1);
    if m >= 8 * threads * 6 {
        // Prefill: row bands. Every element is still one `dot_block` dot
        // product, so the split changes no bit.
        let band = band_rows(m, threads);
        let mut jobs: Vec<Vec<&mut [f32]>> = Vec::new();
        for (wi, (o, w)) in outs.iter_mut().zip(ws).enumerate() {
            for (b, chunk) in o.chunks_mut(band * w.shape[0]).enumerate() {
                if wi == 0 {
                    jobs.push(Vec::with_capacity(ws.len()));
                }
                jobs[b].push(chunk);
            }
        }
        jobs.into_par_iter().enumerate().for_each(|(b, mut bands)| {
            let (r0, rows) = (b * band, band.min(m - b * band));
            for (w, y) in ws.iter().zip(bands.iter_mut()) {
                let k = w.shape[1];
                band_product(&x[r0 * k..(r0 + rows) * k], rows, w, y);
            }
        });
        return;
    }
    let total: usize = ws.iter().map(|w| w.shape[0]).sum();
    // (weight, first row, rows) for every tile of every weight.
    let mut jobs = Vec::new();
    for (wi, w) in ws.iter().enumerate() {
        let (n, k) = (w.shape[0], w.shape[1]);
        // Enough tiles for load balance, each a multiple of the kernel's 4
        // weight rows and within the L2 budget. The tiling only decides who
        // computes which element, never how, so it may depend on anything.
        let tile = (total / (threads * 4))
            .min(tile_budget(m) / (k * w.dtype.size()).max(1))
            .max(4)
            / 4
            * 4;
        for t in 0..n.div_ceil(tile) {
            jobs.push((wi, t * tile, tile.min(n - t * tile)));
        }
    }
    let product = |&(wi, r0, rows): &(usize, usize, usize)| {
        let mut out = vec![0.0f32; m * rows];
        tile_product(x, m, ws[wi], r0, rows, &mut out, rows);
        out
    };
    let tiles: Vec<Vec<f32>> = if m < crate::cpu::team::MAX_ROWS {
        // Decode: on the spinning team, as the quantized products.
        let done: Vec<std::sync::OnceLock<Vec<f32>>> =
            jobs.iter().map(|_| std::sync::OnceLock::new()).collect();
        crate::cpu::team::Team::global().run(jobs.len(), &|i| {
            let _ = done[i].set(product(&jobs[i]));
        });
        done.into_iter()
            .map(|t| t.into_inner().expect("Team::run runs every part"))
            .collect()
    } else {
        jobs.par_iter().map(product).collect()
    };
    for (&(wi, r0, rows), out) in jobs.iter().zip(tiles) {
        let n = ws[wi].shape[0];
        let y = &mut outs[wi];
        for i in 0..m {
            y[i * n + r0..i * n + r0 + rows].copy_from_slice(&out[i * rows..(i + 1) * rows]);
        }
    }
}

/// [`matmul_wt_into`] with the row ranges in `wide` (sorted, disjoint) on
/// AMX when [`amx::enabled`], and the rows between them on the FMA
/// kernels. Each range is its own product over its slice of rows; every
/// output element still depends only on its own row.
pub fn matmul_wt_rows_into(
    x: &[f32],
    m: usize,
    wide: &[std::ops::Range<usize>],
    ws: &[&Tensor],
    outs: &mut [&mut [f32]],
) {
    if wide.is_empty() || !amx::enabled() || ws.iter().any(|w| w.qrows().is_some()) {
        return matmul_wt_into(x, m, ws, outs);
    }
    let k = ws[0].shape[1];
    let mut runs: Vec<(std::ops::Range<usize>, bool)> = Vec::new();
    let mut at = 0;
    for r in wide {
        if r.start > at {
            runs.push((at..r.start, false));
        }
        runs.push((r.clone(), true));
        at = r.end;
    }
    if at < m {
        runs.push((at..m, false));
    }
    for (r, on_amx) in runs {
        let xs = &x[r.start * k..r.end * k];
        let mut os: Vec<&mut [f32]> = outs
            .iter_mut()
            .zip(ws)
            .map(|(o, w)| &mut o[r.start * w.shape[0]..r.end * w.shape[0]])
            .collect();
        if on_amx {
            amx::product(xs, r.len(), ws, &mut os);
        } else {
            matmul_wt_into(xs, r.len(), ws, &mut os);
        }
    }
}

/// Sends block-quantized weights to [`qdot`]; returns whether `ws` had
/// any (then every output is written).
fn split_quantized(x: &[f32], m: usize, ws: &[&Tensor], outs: &mut [&mut [f32]]) -> bool {
    let quantized = ws.iter().filter(|w| w.qrows().is_some()).count();
    if quantized == 0 {
        return false;
    }
    if quantized == ws.len() {
        qdot::matmul_q_into(x, m, ws, outs);
        return true;
    }
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        matmul_wt_into(x, m, &[*w], &mut [&mut **o]);
    }
    true
}

/// `y (rows × n) = x · Wᵀ` for one band of rows, tile by tile of `W` so
/// each tile stays in L2 while the band's rows sweep it.
fn band_product(x: &[f32], rows: usize, w: &Tensor, y: &mut [f32]) {
    let (n, k) = (w.shape[0], w.shape[1]);
    let tile = (tile_budget(rows.max(32)) / (k * w.dtype.size()).max(1)).max(4) / 4 * 4;
    let mut r0 = 0;
    while r0 < n {
        let cols = tile.min(n - r0);
        tile_product(x, rows, w, r0, cols, &mut y[r0..], n);
        r0 += cols;
    }
}

/// `out[i*ldo + j] = x[i] · W[r0 + j]` for `i < m`, `j < rows`.
fn tile_product(
    x: &[f32],
    m: usize,
    w: &Tensor,
    r0: usize,
    rows: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let k = w.shape[1];
    match w.rows() {
        Some(WRows::F32(s)) => dot_block(x, m, k, WRows::F32(&s[r0 * k..]), rows, k, out, ldo),
        Some(WRows::F16(s)) => dot_block(x, m, k, WRows::F16(&s[r0 * k..]), rows, k, out, ldo),
        Some(WRows::BF16(s)) => dot_block(x, m, k, WRows::BF16(&s[r0 * k..]), rows, k, out, ldo),
        // Unaligned data: widen the tile first. The widening is exact, so
        // the kernel computes the same bits as above.
        None => WIDE.with(|buf| {
            let mut wbuf = buf.borrow_mut();
            if wbuf.len() < rows * k {
                wbuf.resize(rows * k, 0.0);
            }
            let wbuf = &mut wbuf[..rows * k];
            w.read_f32(r0 * k, wbuf);
            dot_block(x, m, k, WRows::F32(wbuf), rows, k, out, ldo);
        }),
    }
}

/// `out (m × n) = a (m × k) · bᵀ` with `b` `n × k`, all row-major f32.
pub fn gemm_abt(a: &[f32], b: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n);
    dot_block(a, m, k, WRows::F32(&b[..n * k]), n, k, out, n);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_abt_matches_naive_product() {
        let (m, n, k) = (5, 7, 13);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut out = vec![0.0; m * n];
        gemm_abt(&a, &b, &mut out, m, n, k);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|kk| a[i * k + kk] * b[j * k + kk]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
