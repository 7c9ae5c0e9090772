//! `y = x · Wᵀ` for weights stored as f32/f16/bf16 rows, computed in f32.
//!
//! Output rows of W are split into tiles spread over rayon threads; each tile
//! is widened to f32 once and multiplied with the `gemm` crate (runtime
//! AVX2/AVX-512/NEON dispatch). This module allows `unsafe` only for the
//! `gemm::gemm` call, whose pointer arguments are derived from slices whose
//! lengths are asserted just before.

use std::cell::RefCell;

use rayon::prelude::*;

thread_local! {
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

use crate::weights::Tensor;

/// `x` is `m × k` row-major, `w` is `n × k`; returns `m × n`.
pub fn matmul_wt(x: &[f32], m: usize, w: &Tensor) -> Vec<f32> {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert_eq!(x.len(), m * k, "activation shape does not match {}", w.name);
    let threads = rayon::current_num_threads().max(1);
    // Enough tiles for load balance, each big enough to amortize the
    // widening, and small enough (≤ 256 KiB of f32) that the widened tile
    // stays in L2 while it is multiplied. Depends on the weight shape only,
    // never on `m`, so a row's result does not depend on the batch.
    let tile = (n / (threads * 4))
        .min((64 * 1024) / k.max(1))
        .clamp(8, 256);
    let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(tile))
        .into_par_iter()
        .map(|t| {
            let r0 = t * tile;
            let rows = tile.min(n - r0);
            let mut out = vec![0.0f32; m * rows];
            // One widened tile buffer per thread, reused across calls: the
            // widening overwrites it fully, so it is never re-zeroed.
            WIDE.with(|buf| {
                let mut wbuf = buf.borrow_mut();
                if wbuf.len() < rows * k {
                    wbuf.resize(rows * k, 0.0);
                }
                let wbuf = &mut wbuf[..rows * k];
                w.read_f32(r0 * k, wbuf);
                gemm_abt(x, wbuf, &mut out, m, rows, k);
            });
            (r0, out)
        })
        .collect();
    let mut y = vec![0.0f32; m * n];
    for (r0, out) in tiles {
        let rows = out.len() / m.max(1);
        for i in 0..m {
            y[i * n + r0..i * n + r0 + rows].copy_from_slice(&out[i * rows..(i + 1) * rows]);
        }
    }
    y
}

/// `out (m × n) = a (m × k) · bᵀ` with `b` `n × k`, all row-major.
#[allow(unsafe_code)]
pub fn gemm_abt(a: &[f32], b: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(a.len() >= m * k && b.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    // SAFETY: the three buffers hold at least m*k, n*k and m*n elements
    // (asserted above) and the strides below address exactly those ranges:
    // dst (i, j) at i*n + j, lhs (i, kk) at i*k + kk, rhs (kk, j) at j*k + kk.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
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
