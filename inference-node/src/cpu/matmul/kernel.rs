//! Fused dot-product kernel: `out[i][j] = Σₖ x[i][k] · w[j][k]` with `x` in
//! f32 and `w` read in its stored dtype (f32, f16 or bf16) and widened in
//! registers, so decode streams the memory-mapped weights once and never
//! writes a widened copy.
//!
//! **Batch invariance.** Every output element is computed the same way
//! whatever block it falls in: one vector accumulator (16 lanes with
//! AVX-512, 8 with AVX2, 8 in the portable code) walks `k` in order with
//! fused (or, portable, unfused) multiply-adds, the lanes are summed in a
//! fixed tree, and the `k % lanes` tail is added in order after that.
//! Register blocking only decides which elements are computed side by side,
//! never the arithmetic of one element, so a row's result does not depend
//! on how many rows are in the batch or which ones. The instruction set is
//! chosen once per process.
//!
//! This is the only module with `unsafe` for arithmetic: the `std::arch`
//! intrinsics and the raw pointer reads they need. Every pointer is derived
//! from a slice whose length is checked in [`dot_block`] before any kernel
//! runs; the kernels read `x[i*k .. i*k + k]` for `i < m`, `w[j*ldw .. j*ldw + k]`
//! for `j < n` and write `out[i*ldo + j]`, nothing else.

#![allow(unsafe_code)]

use crate::model::weights::WRows;
use std::sync::OnceLock;

/// The instruction set the kernels use in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// Detected once; every call in the process uses the same kernels (results
/// must not change from one step to the next).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("COPYHOLD_PORTABLE_KERNELS").is_some() {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // `COPYHOLD_KERNELS=avx2` runs the AVX2 kernels on an AVX-512
            // machine (to measure what older CPUs get).
            let avx2_only = std::env::var("COPYHOLD_KERNELS").is_ok_and(|v| v == "avx2");
            if std::is_x86_feature_detected!("avx512f") && !avx2_only {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Whether this machine can run `isa`'s kernels.
fn supported(isa: Isa) -> bool {
    match isa {
        Isa::Portable => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// `out[i*ldo + j] = dot(x[i*k..][..k], w[j*ldw..][..k])` for `i < m`, `j < n`.
#[allow(clippy::too_many_arguments)]
pub fn dot_block(
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows<'_>,
    n: usize,
    ldw: usize,
    out: &mut [f32],
    ldo: usize,
) {
    dot_block_on(isa(), x, m, k, w, n, ldw, out, ldo)
}

/// [`dot_block`] with the kernels of `isa` (portable where unsupported).
#[allow(clippy::too_many_arguments)]
fn dot_block_on(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows<'_>,
    n: usize,
    ldw: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let isa = if supported(isa) { isa } else { Isa::Portable };
    assert!(x.len() >= m * k, "activations shorter than m*k");
    assert!(ldw >= k, "weight stride below k");
    assert!(ldo >= n, "output stride below n");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        w.len() >= (n - 1) * ldw + k,
        "weights shorter than their rows"
    );
    assert!(
        out.len() >= (m - 1) * ldo + n,
        "output shorter than its rows"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time (`supported`), and
        // the lengths were checked above as the kernels' contract asks.
        Isa::Avx512 => unsafe { x86::dispatch512(x, m, k, w, n, ldw, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for avx2 + fma + f16c.
        Isa::Avx2 => unsafe { x86::dispatch256(x, m, k, w, n, ldw, out, ldo) },
        _ => portable(x, m, k, w, n, ldw, out, ldo),
    }
}

/// `out[h*hd + d] = Σⱼ s[h*lds + j] · v[offs[j] + d]` for `h < heads`,
/// `d < hd` (attention's probabilities times values; `out` is overwritten).
/// Each output element sums over `j` in order with one accumulator, so its
/// bits do not depend on `heads` or on how the heads are grouped.
pub fn weighted_rows(
    out: &mut [f32],
    heads: usize,
    hd: usize,
    s: &[f32],
    lds: usize,
    v: WRows<'_>,
    offs: &[usize],
) {
    let n = offs.len();
    assert!(out.len() >= heads * hd, "output shorter than heads*hd");
    if heads == 0 || hd == 0 {
        return;
    }
    assert!(
        lds >= n && s.len() >= (heads - 1) * lds + n,
        "scores too short"
    );
    assert!(
        offs.iter().all(|&o| o + hd <= v.len()),
        "value row out of range"
    );
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; every index was checked above.
        Isa::Avx512 if hd.is_multiple_of(16) => unsafe {
            x86::weighted512(out, heads, hd, s, lds, v, offs)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 + fma + f16c detected; every index was checked above.
        Isa::Avx2 if hd.is_multiple_of(8) => unsafe {
            x86::weighted256(out, heads, hd, s, lds, v, offs)
        },
        _ => {
            let fused = isa() != Isa::Portable;
            for h in 0..heads {
                let o = &mut out[h * hd..(h + 1) * hd];
                o.fill(0.0);
                for (j, &off) in offs.iter().enumerate() {
                    let w = s[h * lds + j];
                    for (d, a) in o.iter_mut().enumerate() {
                        let b = v.get(off + d);
                        *a = if fused { w.mul_add(b, *a) } else { *a + w * b };
                    }
                }
            }
        }
    }
}

/// Lanes of one chunk of transposed keys in [`key_scores`].
pub const KEY_CHUNK: usize = 16;

/// Attention scores against keys stored transposed (a cache block keeps
/// dimension `d` of its slots side by side):
/// `out[r*ldo + c*16 + l] = Σ_d q[r*hd + d] · kt[chunks[c] + d*ld + l]` for
/// `r < rows`, `c < chunks.len()`, `l < 16`.
///
/// Each score is one multiply-add chain over `d` in order from zero, in its
/// own vector lane, so there is no horizontal sum (with `hd` = 64 that
/// would cost as much as the products), and a score's bits do not depend on
/// which rows or chunks are computed beside it.
#[allow(clippy::too_many_arguments)]
pub fn key_scores(
    q: &[f32],
    rows: usize,
    hd: usize,
    kt: WRows<'_>,
    chunks: &[usize],
    ld: usize,
    out: &mut [f32],
    ldo: usize,
) {
    key_scores_on(isa(), q, rows, hd, kt, chunks, ld, out, ldo)
}

#[allow(clippy::too_many_arguments)]
fn key_scores_on(
    isa: Isa,
    q: &[f32],
    rows: usize,
    hd: usize,
    kt: WRows<'_>,
    chunks: &[usize],
    ld: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let isa = if supported(isa) { isa } else { Isa::Portable };
    let width = chunks.len() * KEY_CHUNK;
    if rows == 0 || chunks.is_empty() {
        return;
    }
    assert!(q.len() >= rows * hd, "queries shorter than rows*hd");
    assert!(ldo >= width, "output stride below the chunks' width");
    assert!(
        out.len() >= (rows - 1) * ldo + width,
        "output shorter than its rows"
    );
    if hd == 0 {
        for r in 0..rows {
            out[r * ldo..r * ldo + width].fill(0.0);
        }
        return;
    }
    assert!(ld >= KEY_CHUNK, "key stride below one chunk");
    assert!(
        chunks
            .iter()
            .all(|&c| c + (hd - 1) * ld + KEY_CHUNK <= kt.len()),
        "key chunk out of range"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; every index was checked above.
        Isa::Avx512 => unsafe { x86::key_scores512(q, rows, hd, kt, chunks, ld, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 + fma + f16c detected; every index was checked above.
        Isa::Avx2 => unsafe { x86::key_scores256(q, rows, hd, kt, chunks, ld, out, ldo) },
        _ => {
            for r in 0..rows {
                let qr = &q[r * hd..(r + 1) * hd];
                for (c, &base) in chunks.iter().enumerate() {
                    for l in 0..KEY_CHUNK {
                        let mut acc = 0.0f32;
                        for (d, qv) in qr.iter().enumerate() {
                            acc += qv * kt.get(base + d * ld + l);
                        }
                        out[r * ldo + c * KEY_CHUNK + l] = acc;
                    }
                }
            }
        }
    }
}

/// `row = softmax(row · scale)`, in place. Vectorized (with a polynomial
/// `exp`) where AVX-512 or AVX2 is present, scalar otherwise; either way a row's
/// result depends only on the row.
pub fn softmax(row: &mut [f32], scale: f32) {
    softmax_on(isa(), row, scale)
}

fn softmax_on(isa: Isa, row: &mut [f32], scale: f32) {
    let isa = if supported(isa) { isa } else { Isa::Portable };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; the kernel touches only `row`.
        Isa::Avx512 => unsafe { x86::softmax512(row, scale) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 + fma + f16c detected; the kernel touches only `row`.
        Isa::Avx2 => unsafe { x86::softmax256(row, scale) },
        _ => {
            let mut max = f32::NEG_INFINITY;
            for v in row.iter_mut() {
                *v *= scale;
                max = max.max(*v);
            }
            let mut sum = 0.0;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
        }
    }
}

/// `g = silu(g) · u`, elementwise (the gated MLP).
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    silu_mul_on(isa(), g, u)
}

fn silu_mul_on(isa: Isa, g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gate and up differ in length");
    let isa = if supported(isa) { isa } else { Isa::Portable };
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f detected; the lengths are equal.
        Isa::Avx512 => unsafe { x86::silu_mul512(g, u) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx2 + fma + f16c detected; the lengths are equal.
        Isa::Avx2 => unsafe { x86::silu_mul256(g, u) },
        _ => {
            for (gv, uv) in g.iter_mut().zip(u) {
                *gv = *gv / (1.0 + (-*gv).exp()) * uv;
            }
        }
    }
}

const PL: usize = 8;

#[allow(clippy::too_many_arguments)]
fn portable(
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows<'_>,
    n: usize,
    ldw: usize,
    out: &mut [f32],
    ldo: usize,
) {
    let wv = |j: usize, kk: usize| w.get(j * ldw + kk);
    let kv = k / PL * PL;
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let mut acc = [0.0f32; PL];
            for k0 in (0..kv).step_by(PL) {
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += xr[k0 + l] * wv(j, k0 + l);
                }
            }
            // Fixed pairwise tree over the lanes.
            let mut s =
                ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
            for (kk, xv) in xr.iter().enumerate().skip(kv) {
                s += xv * wv(j, kk);
            }
            out[i * ldo + j] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::WRows;
    use std::arch::x86_64::*;

    const F32: u8 = 0;
    const F16: u8 = 1;
    const BF16: u8 = 2;

    /// Rows of activations per register block, and weight rows.
    const MR: usize = 6;
    const NR: usize = 4;

    // ---------------------------------------------------------------- AVX-512

    /// SAFETY (callers): `p` points at 16 readable elements of type `DT`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const DT: u8>(p: *const u8) -> __m512 {
        // SAFETY: the caller guarantees 16 readable elements at `p`;
        // unaligned loads are used throughout.
        unsafe {
            match DT {
                F32 => _mm512_loadu_ps(p as *const f32),
                F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p as *const __m256i),
                ))),
            }
        }
    }

    /// Lanes summed in a fixed tree: halves, quarters, then pairs.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn hsum16(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum8(_mm256_add_ps(lo, hi))
    }

    #[target_feature(enable = "avx")]
    #[inline]
    fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// One `R × C` block. SAFETY (callers): `x` has `R` rows of `k` f32,
    /// `w` has `C` rows of `k` elements of `DT` (`es` bytes each) at
    /// stride `ldw` elements, `out`
    /// has `R` rows of stride `ldo` with `C` writable elements each.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block512<const R: usize, const C: usize, const DT: u8>(
        x: *const f32,
        k: usize,
        w: *const u8,
        es: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let kv = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = 0;
        // SAFETY: every read is at row offset < k (kk + 16 <= kv <= k, and
        // the tail stays below k) inside the rows the caller vouches for.
        unsafe {
            while kk < kv {
                let mut wv = [_mm512_setzero_ps(); C];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = load16::<DT>(w.add((j * ldw + kk) * es));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(i * k + kk));
                    for (aj, wj) in a.iter_mut().zip(&wv) {
                        *aj = _mm512_fmadd_ps(xv, *wj, *aj);
                    }
                }
                kk += 16;
            }
            for (i, a) in acc.iter().enumerate() {
                for (j, aj) in a.iter().enumerate() {
                    let mut s = hsum16(*aj);
                    for t in kv..k {
                        s += *x.add(i * k + t) * scalar::<DT>(w.add((j * ldw + t) * es));
                    }
                    *out.add(i * ldo + j) = s;
                }
            }
        }
    }

    /// SAFETY (callers): the lengths checked by `dot_block`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dispatch512(
        x: &[f32],
        m: usize,
        k: usize,
        w: WRows<'_>,
        n: usize,
        ldw: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        // SAFETY: forwarded contract.
        unsafe { grid_of(x, m, k, w, n, ldw, out, ldo, K512) }
    }

    /// `H` heads × 16 lanes of [`super::weighted_rows`].
    ///
    /// SAFETY (callers): avx512f; `s` has `H` rows of stride `lds` with
    /// `offs.len()` entries; 16 elements of type `DT` (`es` bytes each) at
    /// `v + (off + d0) * es` are in range for every offset; `out` has `H`
    /// rows of stride `hd` past `d0 + 16`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn wr512<const H: usize, const D: usize, const DT: u8>(
        out: *mut f32,
        hd: usize,
        d0: usize,
        s: *const f32,
        lds: usize,
        v: *const u8,
        es: usize,
        offs: &[usize],
    ) {
        let mut acc = [[_mm512_setzero_ps(); D]; H];
        // SAFETY: the caller's ranges.
        unsafe {
            for (j, &off) in offs.iter().enumerate() {
                let vv: [__m512; D] =
                    std::array::from_fn(|c| load16::<DT>(v.add((off + d0 + 16 * c) * es)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*s.add(h * lds + j));
                    for (ac, vc) in a.iter_mut().zip(&vv) {
                        *ac = _mm512_fmadd_ps(p, *vc, *ac);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (c, ac) in a.iter().enumerate() {
                    _mm512_storeu_ps(out.add(h * hd + d0 + 16 * c), *ac);
                }
            }
        }
    }

    /// SAFETY (callers): avx512f; the ranges checked by `weighted_rows`,
    /// and `hd % 16 == 0`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted512(
        out: &mut [f32],
        heads: usize,
        hd: usize,
        s: &[f32],
        lds: usize,
        v: WRows<'_>,
        offs: &[usize],
    ) {
        let (o, sp) = (out.as_mut_ptr(), s.as_ptr());
        let (vp, es) = raw(v);
        macro_rules! go {
            ($h:literal, $d:literal, $oh:expr, $d0:expr, $sh:expr) => {
                match v {
                    WRows::F32(_) => wr512::<$h, $d, F32>($oh, hd, $d0, $sh, lds, vp, es, offs),
                    WRows::F16(_) => wr512::<$h, $d, F16>($oh, hd, $d0, $sh, lds, vp, es, offs),
                    WRows::BF16(_) => wr512::<$h, $d, BF16>($oh, hd, $d0, $sh, lds, vp, es, offs),
                }
            };
        }
        let mut h = 0;
        // SAFETY: heads h..h+c < heads, lanes d0..d0+16*D <= hd.
        unsafe {
            while h < heads {
                // Up to 6 heads × 4 chunks (64 lanes): 24 accumulators,
                // each value row loaded once for all the heads.
                let c = block_of(heads - h, &[6, 4, 2]);
                let (oh, sh) = (o.add(h * hd), sp.add(h * lds));
                let mut d0 = 0;
                while d0 < hd {
                    let d = if hd - d0 >= 64 { 4 } else { 1 };
                    match (c, d) {
                        (6, 4) => go!(6, 4, oh, d0, sh),
                        (4, 4) => go!(4, 4, oh, d0, sh),
                        (2, 4) => go!(2, 4, oh, d0, sh),
                        (1, 4) => go!(1, 4, oh, d0, sh),
                        (6, _) => go!(6, 1, oh, d0, sh),
                        (4, _) => go!(4, 1, oh, d0, sh),
                        (2, _) => go!(2, 1, oh, d0, sh),
                        _ => go!(1, 1, oh, d0, sh),
                    }
                    d0 += 16 * d;
                }
                h += c;
            }
        }
    }

    // ------------------------------------------------------------------ AVX2

    /// As [`wr512`] with 8 lanes.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn wr256<const H: usize, const DT: u8>(
        out: *mut f32,
        hd: usize,
        d0: usize,
        s: *const f32,
        lds: usize,
        v: *const u8,
        es: usize,
        offs: &[usize],
    ) {
        let mut acc = [_mm256_setzero_ps(); H];
        // SAFETY: the caller's ranges.
        unsafe {
            for (j, &off) in offs.iter().enumerate() {
                let vv = load8::<DT>(v.add((off + d0) * es));
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*s.add(h * lds + j)), vv, *a);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(h * hd + d0), *a);
            }
        }
    }

    /// SAFETY (callers): avx2 + fma + f16c; the ranges checked by
    /// `weighted_rows`, and `hd % 8 == 0`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted256(
        out: &mut [f32],
        heads: usize,
        hd: usize,
        s: &[f32],
        lds: usize,
        v: WRows<'_>,
        offs: &[usize],
    ) {
        let (o, sp) = (out.as_mut_ptr(), s.as_ptr());
        let (vp, es) = raw(v);
        macro_rules! go {
            ($h:literal, $oh:expr, $d0:expr, $sh:expr) => {
                match v {
                    WRows::F32(_) => wr256::<$h, F32>($oh, hd, $d0, $sh, lds, vp, es, offs),
                    WRows::F16(_) => wr256::<$h, F16>($oh, hd, $d0, $sh, lds, vp, es, offs),
                    WRows::BF16(_) => wr256::<$h, BF16>($oh, hd, $d0, $sh, lds, vp, es, offs),
                }
            };
        }
        let mut h = 0;
        // SAFETY: heads h..h+c < heads, lanes d0..d0+8 <= hd.
        unsafe {
            while h < heads {
                let c = (heads - h).min(4);
                let c = if c == 3 { 2 } else { c };
                let (oh, sh) = (o.add(h * hd), sp.add(h * lds));
                for d0 in (0..hd).step_by(8) {
                    match c {
                        4 => go!(4, oh, d0, sh),
                        2 => go!(2, oh, d0, sh),
                        _ => go!(1, oh, d0, sh),
                    }
                }
                h += c;
            }
        }
    }

    /// SAFETY (callers): `p` points at 8 readable elements of type `DT`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const DT: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements at `p`.
        unsafe {
            match DT {
                F32 => _mm256_loadu_ps(p as *const f32),
                F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(p as *const __m128i),
                ))),
            }
        }
    }

    /// As [`block512`] with 8-lane vectors.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block256<const R: usize, const C: usize, const DT: u8>(
        x: *const f32,
        k: usize,
        w: *const u8,
        es: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let kv = k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut kk = 0;
        // SAFETY: as in `block512`.
        unsafe {
            while kk < kv {
                let mut wv = [_mm256_setzero_ps(); C];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = load8::<DT>(w.add((j * ldw + kk) * es));
                }
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i * k + kk));
                    for (aj, wj) in a.iter_mut().zip(&wv) {
                        *aj = _mm256_fmadd_ps(xv, *wj, *aj);
                    }
                }
                kk += 8;
            }
            for (i, a) in acc.iter().enumerate() {
                for (j, aj) in a.iter().enumerate() {
                    let mut s = hsum8(*aj);
                    for t in kv..k {
                        s += *x.add(i * k + t) * scalar::<DT>(w.add((j * ldw + t) * es));
                    }
                    *out.add(i * ldo + j) = s;
                }
            }
        }
    }

    /// SAFETY (callers): the lengths checked by `dot_block`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dispatch256(
        x: &[f32],
        m: usize,
        k: usize,
        w: WRows<'_>,
        n: usize,
        ldw: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let (wp, es) = raw(w);
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        // SAFETY: forwarded contract.
        unsafe {
            match w {
                WRows::F16(_) if m >= PACK_MIN_ROWS => {
                    packed256::<F16>(xp, m, k, wp, es, n, ldw, op, ldo)
                }
                WRows::BF16(_) if m >= PACK_MIN_ROWS => {
                    packed256::<BF16>(xp, m, k, wp, es, n, ldw, op, ldo)
                }
                WRows::F16(_) if m == 1 => row256::<F16>(xp, k, wp, es, n, ldw, op),
                WRows::BF16(_) if m == 1 => row256::<BF16>(xp, k, wp, es, n, ldw, op),
                WRows::F32(_) if m == 1 => row256::<F32>(xp, k, wp, es, n, ldw, op),
                _ => grid_of(x, m, k, w, n, ldw, out, ldo, K256),
            }
        }
    }

    /// Bytes ahead of the current position at which [`row_block256`]
    /// prefetches each weight row (0: no prefetch).
    fn prefetch_bytes() -> usize {
        static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *B.get_or_init(|| {
            std::env::var("COPYHOLD_AVX2_PREFETCH")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(1024)
        })
    }

    /// One activation row against `n` weight rows (decode): [`grid`]'s
    /// 1 × 4 and 1 × 1 blocks, with the weight rows prefetched ahead.
    ///
    /// SAFETY (callers): `x` has `k` f32, `w` has `n` rows of `k` elements
    /// of `DT` at stride `ldw`, `out` has `n` writable f32; avx2 + fma +
    /// f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row256<const DT: u8>(
        x: *const f32,
        k: usize,
        w: *const u8,
        es: usize,
        n: usize,
        ldw: usize,
        out: *mut f32,
    ) {
        let pf = prefetch_bytes();
        let mut j = 0;
        // SAFETY: blocks read rows j..j+4 <= n (or j < n) and write
        // out[j..j+4] (or out[j]).
        unsafe {
            while j + NR <= n {
                row_block256::<NR, DT>(x, k, w.add(j * ldw * es), es, ldw, out.add(j), pf);
                j += NR;
            }
            while j < n {
                block256::<1, 1, DT>(x, k, w.add(j * ldw * es), es, ldw, out.add(j), 1);
                j += 1;
            }
        }
    }

    /// [`block256`] with one activation row and `C` weight rows, which
    /// also prefetches each weight row `pf` bytes ahead, once per 64-byte
    /// line (past a row's end, the same row of the next block of `C`).
    /// Decode streams every weight once from memory; the prefetches keep
    /// more lines in flight than the hardware prefetcher alone does for
    /// `C` interleaved streams. The arithmetic is [`block256`]'s: the same
    /// bits.
    ///
    /// SAFETY (callers): as [`block256`] with `R` = 1; the prefetched
    /// addresses need not be valid (a prefetch never faults).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn row_block256<const C: usize, const DT: u8>(
        x: *const f32,
        k: usize,
        w: *const u8,
        es: usize,
        ldw: usize,
        out: *mut f32,
        pf: usize,
    ) {
        let kv = k / 8 * 8;
        // Elements per 64-byte line of weights.
        let line = 64 / es;
        let row_bytes = k * es;
        let mut acc = [_mm256_setzero_ps(); C];
        let mut kk = 0;
        // SAFETY: reads as in `block256`; prefetch addresses are computed
        // with wrapping arithmetic and never dereferenced.
        unsafe {
            while kk < kv {
                if pf > 0 && kk % line == 0 {
                    let ahead = kk * es + pf;
                    let (row_off, at) = if ahead < row_bytes {
                        (0, ahead)
                    } else {
                        (C * ldw * es, ahead - row_bytes)
                    };
                    for j in 0..C {
                        let p = w.wrapping_add(j * ldw * es + row_off + at);
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    }
                }
                let xv = _mm256_loadu_ps(x.add(kk));
                for (j, a) in acc.iter_mut().enumerate() {
                    let wv = load8::<DT>(w.add((j * ldw + kk) * es));
                    *a = _mm256_fmadd_ps(xv, wv, *a);
                }
                kk += 8;
            }
            for (j, a) in acc.iter().enumerate() {
                let mut s = hsum8(*a);
                for t in kv..k {
                    s += *x.add(t) * scalar::<DT>(w.add((j * ldw + t) * es));
                }
                *out.add(j) = s;
            }
        }
    }

    /// Activation rows from which [`packed256`] widens the weights once per
    /// panel instead of in every block: below this the conversion is not
    /// shared by enough rows to pay for the extra pass.
    const PACK_MIN_ROWS: usize = 4;

    /// Bytes of one widened weight panel in [`packed256`]: the panel stays
    /// in L2 while each block of 4 activation rows (in L1) sweeps it.
    fn panel_bytes() -> usize {
        static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *B.get_or_init(|| {
            std::env::var("COPYHOLD_AVX2_PANEL_KIB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(128)
                << 10
        })
    }

    thread_local! {
        static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// `k` elements of type `DT` at `src` widened to f32 at `dst` (exact:
    /// f16 and bf16 values are all f32 values).
    ///
    /// SAFETY (callers): `k` readable elements at `src`, `k` writable f32
    /// at `dst`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen256<const DT: u8>(src: *const u8, k: usize, dst: *mut f32) {
        let kv = k / 8 * 8;
        // SAFETY: every index is below `k`.
        unsafe {
            let mut t = 0;
            while t < kv {
                _mm256_storeu_ps(dst.add(t), load8::<DT>(src.add(t * 2)));
                t += 8;
            }
            for t in kv..k {
                *dst.add(t) = scalar::<DT>(src.add(t * 2));
            }
        }
    }

    /// The AVX2 product for f16/bf16 weights and several activation rows:
    /// the weights are widened to f32 a panel of rows at a time (each
    /// element once, not once per block of activation rows), and the panel
    /// is multiplied with 4 × 3 blocks of f32 fused multiply-adds, which
    /// use 12 of AVX2's 16 registers for accumulators. Widening is exact
    /// and the blocks are [`block256`]'s, so every element is the same
    /// dot product, in the same order, as in [`grid`].
    ///
    /// SAFETY (callers): the ranges of [`grid`]; avx2 + fma + f16c.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn packed256<const DT: u8>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const u8,
        es: usize,
        n: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let np = (panel_bytes() / (4 * k).max(1)).max(3) / 3 * 3;
        PANEL.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < np * k {
                buf.resize(np * k, 0.0);
            }
            let bp = buf.as_mut_ptr();
            let mut j0 = 0;
            // SAFETY: rows j0..j0+rows < n of `w` are read, `rows <= np`
            // rows of the panel written and read, and output columns
            // j0..j0+rows < n written.
            unsafe {
                while j0 < n {
                    let rows = np.min(n - j0);
                    for r in 0..rows {
                        widen256::<DT>(w.add((j0 + r) * ldw * es), k, bp.add(r * k));
                    }
                    grid43(x, m, k, bp, rows, out.add(j0), ldo);
                    j0 += rows;
                }
            }
        });
    }

    /// `m × n` outputs from f32 weight rows packed at stride `k`, in 4 × 3
    /// blocks (edges with smaller ones).
    ///
    /// SAFETY (callers): `x` has `m` rows of `k` f32, `w` has `n` rows of
    /// `k` f32, `out` has `m` rows of stride `ldo` with `n` writable
    /// elements; avx2 + fma + f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn grid43(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const f32,
        n: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        macro_rules! blk {
            ($r:literal, $c:literal, $xi:expr, $wj:expr, $o:expr) => {
                block256::<$r, $c, F32>($xi, k, $wj as *const u8, 4, k, $o, ldo)
            };
        }
        // SAFETY: blocks stay inside rows i..i+r <= m and j..j+c <= n.
        unsafe {
            let mut i = 0;
            while i < m {
                let r = (m - i).min(4);
                let xi = x.add(i * k);
                let mut j = 0;
                while j < n {
                    let c = if n - j >= 3 { 3 } else { 1 };
                    let (wj, o) = (w.add(j * k), out.add(i * ldo + j));
                    match (r, c) {
                        (4, 3) => blk!(4, 3, xi, wj, o),
                        (3, 3) => blk!(3, 3, xi, wj, o),
                        (2, 3) => blk!(2, 3, xi, wj, o),
                        (1, 3) => blk!(1, 3, xi, wj, o),
                        (4, _) => blk!(4, 1, xi, wj, o),
                        (3, _) => blk!(3, 1, xi, wj, o),
                        (2, _) => blk!(2, 1, xi, wj, o),
                        _ => blk!(1, 1, xi, wj, o),
                    }
                    j += c;
                }
                i += r;
            }
        }
    }

    // ------------------------------------------------------- key scores

    /// `R` query rows × `C` chunks of 16 transposed keys.
    ///
    /// SAFETY (callers): avx512f; `q` has `R` rows of `hd` f32; each
    /// `kt + chunks[c] * es` has `hd` rows of 16 elements of `DT` at stride
    /// `ld` elements; `out` has `R` rows of stride `ldo` with `16 * C`
    /// writable elements.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn ks512<const R: usize, const C: usize, const DT: u8>(
        q: *const f32,
        hd: usize,
        kt: *const u8,
        es: usize,
        chunks: &[usize],
        ld: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        // SAFETY: the caller's ranges.
        unsafe {
            let base: [*const u8; C] = std::array::from_fn(|c| kt.add(chunks[c] * es));
            for d in 0..hd {
                let kv: [__m512; C] =
                    std::array::from_fn(|c| load16::<DT>(base[c].add(d * ld * es)));
                for (r, a) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*q.add(r * hd + d));
                    for (ac, kc) in a.iter_mut().zip(&kv) {
                        *ac = _mm512_fmadd_ps(qb, *kc, *ac);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (c, ac) in a.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * ldo + c * 16), *ac);
                }
            }
        }
    }

    /// SAFETY (callers): avx512f; the ranges checked by `key_scores`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn key_scores512(
        q: &[f32],
        rows: usize,
        hd: usize,
        kt: WRows<'_>,
        chunks: &[usize],
        ld: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let (kp, es) = raw(kt);
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        macro_rules! go {
            ($r:literal, $c:literal, $qr:expr, $ch:expr, $o:expr) => {
                match kt {
                    WRows::F32(_) => ks512::<$r, $c, F32>($qr, hd, kp, es, $ch, ld, $o, ldo),
                    WRows::F16(_) => ks512::<$r, $c, F16>($qr, hd, kp, es, $ch, ld, $o, ldo),
                    WRows::BF16(_) => ks512::<$r, $c, BF16>($qr, hd, kp, es, $ch, ld, $o, ldo),
                }
            };
        }
        // SAFETY: rows r..r+R < rows and chunks c..c+C < chunks.len().
        unsafe {
            let mut r = 0;
            while r < rows {
                let rr = block_of(rows - r, &[4, 2]);
                let mut c = 0;
                while c < chunks.len() {
                    let cc = block_of(chunks.len() - c, &[4, 2]);
                    let (qr, ch, o) =
                        (qp.add(r * hd), &chunks[c..c + cc], op.add(r * ldo + c * 16));
                    match (rr, cc) {
                        (4, 4) => go!(4, 4, qr, ch, o),
                        (4, 2) => go!(4, 2, qr, ch, o),
                        (4, _) => go!(4, 1, qr, ch, o),
                        (2, 4) => go!(2, 4, qr, ch, o),
                        (2, 2) => go!(2, 2, qr, ch, o),
                        (2, _) => go!(2, 1, qr, ch, o),
                        (_, 4) => go!(1, 4, qr, ch, o),
                        (_, 2) => go!(1, 2, qr, ch, o),
                        _ => go!(1, 1, qr, ch, o),
                    }
                    c += cc;
                }
                r += rr;
            }
        }
    }

    /// As [`ks512`] with a chunk as two 8-lane vectors, one chunk at a time.
    ///
    /// SAFETY (callers): avx2 + fma + f16c; the ranges of [`ks512`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn ks256<const R: usize, const DT: u8>(
        q: *const f32,
        hd: usize,
        kt: *const u8,
        ld: usize,
        es: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: the caller's ranges.
        unsafe {
            for d in 0..hd {
                let p = kt.add(d * ld * es);
                let kv = [load8::<DT>(p), load8::<DT>(p.add(8 * es))];
                for (r, a) in acc.iter_mut().enumerate() {
                    let qb = _mm256_set1_ps(*q.add(r * hd + d));
                    a[0] = _mm256_fmadd_ps(qb, kv[0], a[0]);
                    a[1] = _mm256_fmadd_ps(qb, kv[1], a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(r * ldo), a[0]);
                _mm256_storeu_ps(out.add(r * ldo + 8), a[1]);
            }
        }
    }

    /// SAFETY (callers): avx2 + fma + f16c; the ranges checked by `key_scores`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn key_scores256(
        q: &[f32],
        rows: usize,
        hd: usize,
        kt: WRows<'_>,
        chunks: &[usize],
        ld: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        let (kp, es) = raw(kt);
        let (qp, op) = (q.as_ptr(), out.as_mut_ptr());
        macro_rules! go {
            ($r:literal, $qr:expr, $k:expr, $o:expr) => {
                match kt {
                    WRows::F32(_) => ks256::<$r, F32>($qr, hd, $k, ld, es, $o, ldo),
                    WRows::F16(_) => ks256::<$r, F16>($qr, hd, $k, ld, es, $o, ldo),
                    WRows::BF16(_) => ks256::<$r, BF16>($qr, hd, $k, ld, es, $o, ldo),
                }
            };
        }
        // SAFETY: rows r..r+R < rows, every chunk checked by the caller.
        unsafe {
            let mut r = 0;
            while r < rows {
                let rr = block_of(rows - r, &[4, 2]);
                for (c, &ch) in chunks.iter().enumerate() {
                    let (qr, k, o) = (qp.add(r * hd), kp.add(ch * es), op.add(r * ldo + c * 16));
                    match rr {
                        4 => go!(4, qr, k, o),
                        2 => go!(2, qr, k, o),
                        _ => go!(1, qr, k, o),
                    }
                }
                r += rr;
            }
        }
    }

    // ------------------------------------------------ softmax and SiLU

    /// ln 2 split in two for the Cody–Waite reduction of [`exp512`] and
    /// [`exp256`] (`hi` exact in f32).
    const EXP_LN2_HI: f32 = 0.693_359_4;
    const EXP_LN2_LO: f32 = -2.121_944_4e-4;
    /// Cephes' polynomial for `(e^r - 1 - r) / r²`, highest degree first.
    const EXP_POLY: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];

    /// `e^x` for 16 lanes: Cody–Waite range reduction and Cephes' degree-6
    /// polynomial (about 1 ulp over the clamped range).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.336_55)),
            _mm512_set1_ps(88.722_83),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_scalef_ps(y, n)
    }

    /// Lanes of `row` from `i` on (fewer than 16 at the end: masked).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn tail_mask(len: usize, i: usize) -> __mmask16 {
        let left = (len - i).min(16);
        if left == 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        }
    }

    /// SAFETY (callers): avx512f. Reads and writes only `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax512(row: &mut [f32], scale: f32) {
        let (p, len) = (row.as_mut_ptr(), row.len());
        // SAFETY: every access is masked to lanes below `len`.
        unsafe {
            let sc = _mm512_set1_ps(scale);
            let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < len {
                let k = tail_mask(len, i);
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p.add(i)), sc);
                _mm512_mask_storeu_ps(p.add(i), k, v);
                vmax = _mm512_mask_max_ps(vmax, k, vmax, v);
                i += 16;
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
            let mut vsum = _mm512_setzero_ps();
            i = 0;
            while i < len {
                let k = tail_mask(len, i);
                let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), max));
                _mm512_mask_storeu_ps(p.add(i), k, e);
                vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
                i += 16;
            }
            let sum = _mm512_set1_ps(hsum16(vsum));
            i = 0;
            while i < len {
                let k = tail_mask(len, i);
                let v = _mm512_div_ps(_mm512_maskz_loadu_ps(k, p.add(i)), sum);
                _mm512_mask_storeu_ps(p.add(i), k, v);
                i += 16;
            }
        }
    }

    /// SAFETY (callers): avx512f; `g.len() == u.len()`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul512(g: &mut [f32], u: &[f32]) {
        let (gp, up, len) = (g.as_mut_ptr(), u.as_ptr(), g.len());
        // SAFETY: every access is masked to lanes below `len`.
        unsafe {
            let one = _mm512_set1_ps(1.0);
            let mut i = 0;
            while i < len {
                let k = tail_mask(len, i);
                let x = _mm512_maskz_loadu_ps(k, gp.add(i));
                let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
                let y = _mm512_mul_ps(
                    _mm512_div_ps(x, _mm512_add_ps(one, e)),
                    _mm512_maskz_loadu_ps(k, up.add(i)),
                );
                _mm512_mask_storeu_ps(gp.add(i), k, y);
                i += 16;
            }
        }
    }

    /// [`exp512`] for 8 lanes. AVX2 has no `scalef`: `2ⁿ` is built in the
    /// exponent bits, so the upper clamp is Cephes' `ln(2¹²⁸) - ½ln 2`,
    /// which keeps `n ≤ 127`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.336_55)),
            _mm256_set1_ps(88.376_26),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(y, pow2)
    }

    /// Lanes of a slice of `len` from `i` on, as a load/store mask (fewer
    /// than 8 at the end).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn tail_mask256(len: usize, i: usize) -> __m256i {
        let left = (len - i).min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(left),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// SAFETY (callers): avx2 + fma + f16c. Reads and writes only `row`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn softmax256(row: &mut [f32], scale: f32) {
        let (p, len) = (row.as_mut_ptr(), row.len());
        // SAFETY: every access is masked to lanes below `len`; masked-off
        // lanes are neither read nor written.
        unsafe {
            let sc = _mm256_set1_ps(scale);
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut vmax = ninf;
            let mut i = 0;
            while i < len {
                let k = tail_mask256(len, i);
                let v = _mm256_mul_ps(_mm256_maskload_ps(p.add(i), k), sc);
                _mm256_maskstore_ps(p.add(i), k, v);
                vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(ninf, v, _mm256_castsi256_ps(k)));
                i += 8;
            }
            let m4 = _mm_max_ps(
                _mm256_castps256_ps128(vmax),
                _mm256_extractf128_ps::<1>(vmax),
            );
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps::<0b01>(m2, m2));
            let max = _mm256_set1_ps(_mm_cvtss_f32(m1));
            let mut vsum = _mm256_setzero_ps();
            i = 0;
            while i < len {
                let k = tail_mask256(len, i);
                let e = exp256(_mm256_sub_ps(_mm256_maskload_ps(p.add(i), k), max));
                let e = _mm256_and_ps(e, _mm256_castsi256_ps(k));
                _mm256_maskstore_ps(p.add(i), k, e);
                vsum = _mm256_add_ps(vsum, e);
                i += 8;
            }
            let sum = _mm256_set1_ps(hsum8(vsum));
            i = 0;
            while i < len {
                let k = tail_mask256(len, i);
                let v = _mm256_div_ps(_mm256_maskload_ps(p.add(i), k), sum);
                _mm256_maskstore_ps(p.add(i), k, v);
                i += 8;
            }
        }
    }

    /// SAFETY (callers): avx2 + fma + f16c; `g.len() == u.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn silu_mul256(g: &mut [f32], u: &[f32]) {
        let (gp, up, len) = (g.as_mut_ptr(), u.as_ptr(), g.len());
        // SAFETY: every access is masked to lanes below `len`.
        unsafe {
            let one = _mm256_set1_ps(1.0);
            let mut i = 0;
            while i < len {
                let k = tail_mask256(len, i);
                let x = _mm256_maskload_ps(gp.add(i), k);
                let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let y = _mm256_mul_ps(
                    _mm256_div_ps(x, _mm256_add_ps(one, e)),
                    _mm256_maskload_ps(up.add(i), k),
                );
                _mm256_maskstore_ps(gp.add(i), k, y);
                i += 8;
            }
        }
    }

    // ---------------------------------------------------------------- common

    /// The largest register block in `sizes` (descending) that fits in the
    /// `left` rows still to do, else 1.
    fn block_of(left: usize, sizes: &[usize]) -> usize {
        sizes.iter().copied().find(|&b| left >= b).unwrap_or(1)
    }

    fn raw(w: WRows<'_>) -> (*const u8, usize) {
        match w {
            WRows::F32(s) => (s.as_ptr() as *const u8, 4),
            WRows::F16(s) | WRows::BF16(s) => (s.as_ptr() as *const u8, 2),
        }
    }

    /// SAFETY (callers): `p` points at one readable element of type `DT`.
    #[inline(always)]
    unsafe fn scalar<const DT: u8>(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees one readable element; unaligned.
        unsafe {
            match DT {
                F32 => (p as *const f32).read_unaligned(),
                F16 => half::f16::from_bits((p as *const u16).read_unaligned()).to_f32(),
                _ => half::bf16::from_bits((p as *const u16).read_unaligned()).to_f32(),
            }
        }
    }

    /// Which vector width the grid's blocks use.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Width {
        K512,
        K256,
    }
    use Width::{K256, K512};

    /// [`grid`] for `w`'s element type. Inlined into each dispatcher, so it
    /// is compiled with that dispatcher's target features.
    ///
    /// SAFETY (callers): the lengths checked by `dot_block`; the features
    /// of `width` are present.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn grid_of(
        x: &[f32],
        m: usize,
        k: usize,
        w: WRows<'_>,
        n: usize,
        ldw: usize,
        out: &mut [f32],
        ldo: usize,
        width: Width,
    ) {
        let (wp, es) = raw(w);
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        // SAFETY: forwarded contract.
        unsafe {
            match w {
                WRows::F32(_) => grid::<F32>(xp, m, k, wp, es, n, ldw, op, ldo, width),
                WRows::F16(_) => grid::<F16>(xp, m, k, wp, es, n, ldw, op, ldo, width),
                WRows::BF16(_) => grid::<BF16>(xp, m, k, wp, es, n, ldw, op, ldo, width),
            }
        }
    }

    /// Tiles `m × n` into `MR × NR` blocks (edges with smaller blocks, whose
    /// per-element arithmetic is the same).
    ///
    /// SAFETY (callers): `x` has `m` rows of `k` f32, `w` has `n` rows of
    /// `k` elements of `es` bytes at stride `ldw` elements, `out` has `m` rows of stride `ldo` with
    /// `n` writable elements each; the features of `width` are present.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn grid<const DT: u8>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const u8,
        es: usize,
        n: usize,
        ldw: usize,
        out: *mut f32,
        ldo: usize,
        width: Width,
    ) {
        macro_rules! blk {
            ($r:literal, $c:literal, $xi:expr, $wj:expr, $o:expr) => {
                match width {
                    K512 => block512::<$r, $c, DT>($xi, k, $wj, es, ldw, $o, ldo),
                    K256 => block256::<$r, $c, DT>($xi, k, $wj, es, ldw, $o, ldo),
                }
            };
        }
        let mut i = 0;
        // SAFETY: each block reads rows i..i+R of x and j..j+C of w and
        // writes out rows i..i+R, columns j..j+C, all inside the caller's
        // ranges since i + R <= m and j + C <= n.
        unsafe {
            while i < m {
                // AVX2 has 16 vector registers: 2 × 4 accumulators, the
                // weights and one activation row fit without spilling.
                let r = (m - i).min(if width == K512 { MR } else { 2 });
                let xi = x.add(i * k);
                let mut j = 0;
                while j < n {
                    let c = if n - j >= NR { NR } else { 1 };
                    let wj = w.add(j * ldw * es);
                    let o = out.add(i * ldo + j);
                    match (r, c) {
                        (6, 4) => blk!(6, 4, xi, wj, o),
                        (5, 4) => blk!(5, 4, xi, wj, o),
                        (4, 4) => blk!(4, 4, xi, wj, o),
                        (3, 4) => blk!(3, 4, xi, wj, o),
                        (2, 4) => blk!(2, 4, xi, wj, o),
                        (1, 4) => blk!(1, 4, xi, wj, o),
                        (6, _) => blk!(6, 1, xi, wj, o),
                        (5, _) => blk!(5, 1, xi, wj, o),
                        (4, _) => blk!(4, 1, xi, wj, o),
                        (3, _) => blk!(3, 1, xi, wj, o),
                        (2, _) => blk!(2, 1, xi, wj, o),
                        _ => blk!(1, 1, xi, wj, o),
                    }
                    j += c;
                }
                i += r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<u16>) {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<u16> = (0..n * k)
            .map(|i| half::f16::from_f32((i as f32 * 0.11).cos() * 0.5).to_bits())
            .collect();
        (x, w)
    }

    #[test]
    fn matches_naive_product_for_every_dtype_and_tail() {
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 13), (9, 10, 40), (4, 8, 64), (3, 5, 37)] {
            let (x, w16) = data(m, n, k);
            let wf: Vec<f32> = w16
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect();
            let wb: Vec<u16> = wf
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let wbf: Vec<f32> = wb
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f32())
                .collect();
            for (w, wref) in [
                (WRows::F32(&wf), &wf),
                (WRows::F16(&w16), &wf),
                (WRows::BF16(&wb), &wbf),
            ] {
                let mut out = vec![0.0; m * n];
                dot_block(&x, m, k, w, n, k, &mut out, n);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|t| x[i * k + t] * wref[j * k + t]).sum();
                        assert!((out[i * n + j] - want).abs() < 1e-4, "{m}x{n}x{k}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_is_bit_identical_whatever_the_batch_on_every_isa() {
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if supported(isa) {
                row_invariance(isa);
            }
        }
    }

    fn row_invariance(isa: Isa) {
        let dot_block = |x: &[f32], m, k, w, n, ldw, out: &mut [f32], ldo| {
            dot_block_on(isa, x, m, k, w, n, ldw, out, ldo)
        };
        let (m, n, k) = (11, 9, 70);
        let (x, w) = data(m, n, k);
        let mut all = vec![0.0; m * n];
        dot_block(&x, m, k, WRows::F16(&w), n, k, &mut all, n);
        for i in 0..m {
            let mut one = vec![0.0; n];
            dot_block(
                &x[i * k..(i + 1) * k],
                1,
                k,
                WRows::F16(&w),
                n,
                k,
                &mut one,
                n,
            );
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                all[i * n..(i + 1) * n]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                "row {i} on {isa:?}"
            );
            // And a column subset of the weights (another tiling).
            let mut part = vec![0.0; n - 3];
            dot_block(
                &x[i * k..(i + 1) * k],
                1,
                k,
                WRows::F16(&w[3 * k..]),
                n - 3,
                k,
                &mut part,
                n - 3,
            );
            for j in 3..n {
                assert_eq!(part[j - 3].to_bits(), all[i * n + j].to_bits());
            }
        }
    }
}

#[cfg(test)]
mod avx2_tests {
    use super::*;

    /// The AVX2 arithmetic of one output element written out in scalar
    /// code: eight lanes of fused multiply-adds over `k` in order, the
    /// lanes summed as `hsum8` does, then the tail unfused in order.
    fn lane_model(x: &[f32], w: &[f32]) -> f32 {
        let k = x.len();
        let kv = k / 8 * 8;
        let mut acc = [0.0f32; 8];
        for k0 in (0..kv).step_by(8) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a = x[k0 + l].mul_add(w[k0 + l], *a);
            }
        }
        let h: [f32; 4] = std::array::from_fn(|l| acc[l] + acc[l + 4]);
        let mut s = (h[0] + h[2]) + (h[1] + h[3]);
        for t in kv..k {
            s += x[t] * w[t];
        }
        s
    }

    #[test]
    fn the_avx2_kernels_give_every_element_the_bits_of_the_lane_model_for_any_row_count() {
        if !supported(Isa::Avx2) {
            return;
        }
        // k = 1003: a tail of 3, and 30-row widened panels, so n = 70
        // crosses two panel edges and ends in a partial 3-column block.
        let (n, k) = (70, 1003);
        let (x, w16) = data(13, n, k);
        let wf: Vec<f32> = w16
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect();
        let wb: Vec<u16> = wf
            .iter()
            .map(|&v| half::bf16::from_f32(v * 3.0).to_bits())
            .collect();
        let wbf: Vec<f32> = wb
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        for (w, wref) in [
            (WRows::F16(&w16), &wf),
            (WRows::BF16(&wb), &wbf),
            (WRows::F32(&wf), &wf),
        ] {
            for m in [1, 2, 3, 4, 5, 9, 13] {
                let mut out = vec![0.0; m * n];
                dot_block_on(Isa::Avx2, &x, m, k, w, n, k, &mut out, n);
                for i in 0..m {
                    for j in 0..n {
                        let want = lane_model(&x[i * k..(i + 1) * k], &wref[j * k..(j + 1) * k]);
                        assert_eq!(
                            out[i * n + j].to_bits(),
                            want.to_bits(),
                            "m {m} row {i} col {j}"
                        );
                    }
                }
            }
        }
    }

    fn data(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<u16>) {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<u16> = (0..n * k)
            .map(|i| half::f16::from_f32((i as f32 * 0.11).cos() * 0.5).to_bits())
            .collect();
        (x, w)
    }
}

#[cfg(test)]
mod weighted_tests {
    use super::*;

    #[test]
    fn weighted_rows_matches_naive_and_ignores_grouping() {
        let (heads, hd, n, row) = (7, 64, 37, 200);
        let s: Vec<f32> = (0..heads * 40).map(|i| (i as f32 * 0.3).sin()).collect();
        let v: Vec<f32> = (0..n * row + hd).map(|i| (i as f32 * 0.07).cos()).collect();
        let offs: Vec<usize> = (0..n).map(|j| (n - 1 - j) * row + 3).collect();
        let mut all = vec![0.0; heads * hd];
        weighted_rows(&mut all, heads, hd, &s, 40, WRows::F32(&v), &offs);
        for h in 0..heads {
            let mut one = vec![0.0; hd];
            weighted_rows(&mut one, 1, hd, &s[h * 40..], 40, WRows::F32(&v), &offs);
            for d in 0..hd {
                assert_eq!(one[d].to_bits(), all[h * hd + d].to_bits());
                let want: f32 = (0..n).map(|j| s[h * 40 + j] * v[offs[j] + d]).sum();
                assert!((one[d] - want).abs() < 1e-4);
            }
        }
    }
}

#[cfg(test)]
mod key_score_tests {
    use super::*;

    #[test]
    fn key_scores_match_naive_and_a_score_ignores_its_neighbours_on_every_isa() {
        let (rows, hd, ld, nblocks) = (7, 64, 32, 5);
        let q: Vec<f32> = (0..rows * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let kt: Vec<u16> = (0..nblocks * hd * ld)
            .map(|i| half::f16::from_f32((i as f32 * 0.011).cos()).to_bits())
            .collect();
        // Chunks out of order and at both halves of a 32-slot block.
        let chunks: Vec<usize> = vec![3 * hd * ld + 16, 0, 4 * hd * ld, hd * ld + 16, 2 * hd * ld];
        let width = chunks.len() * KEY_CHUNK;
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if !supported(isa) {
                continue;
            }
            let mut all = vec![0.0; rows * width];
            key_scores_on(
                isa,
                &q,
                rows,
                hd,
                WRows::F16(&kt),
                &chunks,
                ld,
                &mut all,
                width,
            );
            for r in 0..rows {
                for (c, &base) in chunks.iter().enumerate() {
                    // One row and one chunk alone: the same bits.
                    let mut one = vec![0.0; KEY_CHUNK];
                    key_scores_on(
                        isa,
                        &q[r * hd..],
                        1,
                        hd,
                        WRows::F16(&kt),
                        &[base],
                        ld,
                        &mut one,
                        KEY_CHUNK,
                    );
                    for l in 0..KEY_CHUNK {
                        let got = all[r * width + c * KEY_CHUNK + l];
                        assert_eq!(got.to_bits(), one[l].to_bits(), "{isa:?} r{r} c{c} l{l}");
                        let want: f32 = (0..hd)
                            .map(|d| {
                                q[r * hd + d] * half::f16::from_bits(kt[base + d * ld + l]).to_f32()
                            })
                            .sum();
                        assert!((got - want).abs() < 1e-4, "{isa:?}: {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod elementwise_tests {
    use super::*;

    #[test]
    fn softmax_and_silu_match_the_libm_formulas_on_every_isa() {
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if supported(isa) {
                softmax_and_silu_match(isa);
            }
        }
    }

    fn softmax_and_silu_match(isa: Isa) {
        let softmax = |r: &mut [f32], s| softmax_on(isa, r, s);
        let silu_mul = |g: &mut [f32], u: &[f32]| silu_mul_on(isa, g, u);
        for len in [1usize, 5, 8, 16, 17, 100, 513] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37) as f32 * 0.01).sin() * 30.0)
                .collect();
            let mut got = row.clone();
            softmax(&mut got, 0.125);
            let max = row
                .iter()
                .map(|v| v * 0.125)
                .fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row
                .iter()
                .map(|v| ((v * 0.125 - max) as f64).exp())
                .collect();
            let sum: f64 = e.iter().sum();
            for (g, w) in got.iter().zip(&e) {
                assert!(
                    (*g as f64 - w / sum).abs() < 1e-6,
                    "{isa:?} softmax {len}: {g} vs {}",
                    w / sum
                );
            }
            let u: Vec<f32> = (0..len).map(|i| (i as f32 * 0.3).cos()).collect();
            let mut g = row.clone();
            silu_mul(&mut g, &u);
            for ((gv, x), uv) in g.iter().zip(&row).zip(&u) {
                let want = (*x as f64) / (1.0 + (-*x as f64).exp()) * *uv as f64;
                assert!(
                    (*gv as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                    "{isa:?} silu {x}: {gv} vs {want}"
                );
            }
        }
    }

    #[test]
    fn extreme_inputs_stay_finite_on_every_isa() {
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable] {
            if supported(isa) {
                extremes(isa);
            }
        }
    }

    fn extremes(isa: Isa) {
        let softmax = |r: &mut [f32], s| softmax_on(isa, r, s);
        let silu_mul = |g: &mut [f32], u: &[f32]| silu_mul_on(isa, g, u);
        let mut g = vec![-200.0f32, -90.0, 0.0, 90.0, 200.0];
        silu_mul(&mut g, &[1.0; 5]);
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        assert_eq!(g[4], 200.0);
        let mut row = vec![-1e4f32, 0.0, 1e4];
        softmax(&mut row, 1.0);
        assert_eq!(row[2], 1.0);
        assert!(row[0] >= 0.0 && row[0] < 1e-30);
    }
}
