//! The block dot products of [`super::qdot`] with explicit x86 intrinsics
//! (`vpmaddubsw` + `vpmaddwd`, as llama.cpp's AVX2 kernels), four outputs
//! at a time: one weight row against four activation rows (prompt rows: a
//! weight block is unpacked once for all four) or four weight rows against
//! one activation row (decode: an activation block is loaded for all four).
//! On AVX-512, Q4_K and Q6_K prompt rows go eight at a time: two weight rows
//! per 512-bit vector against four activation rows.
//!
//! Every block's integer sums are exact, so they equal the portable loops'
//! whatever the order of the additions. The float step per block is the
//! portable code's own expression, computed for the four outputs in the
//! four lanes of one vector: a lane's multiplications and additions are
//! the scalar ones, in the same order, so an output has the same bits as on
//! the portable path, alone or beside any other rows (`qdot`'s tests check
//! both).
//!
//! The same source is compiled twice, under AVX2 and under AVX-512 (where
//! the compiler may use EVEX encodings and 32 registers); both run the same
//! integer operations.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::qdot::QActs;
use crate::model::quant::{QK_K, QType};

/// Outputs computed together (the lanes of the float step).
const LANES: usize = 4;

/// The f16 at `p` as f32 (exact, as `quant::f16_at`).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = unsafe { p.cast::<u16>().read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The sums of the eight `i32` lanes of each of four vectors, in order.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn hsum4(v: &[__m256i; LANES]) -> __m128i {
    let a = _mm256_hadd_epi32(v[0], v[1]);
    let b = _mm256_hadd_epi32(v[2], v[3]);
    let c = _mm256_hadd_epi32(a, b);
    _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c))
}

/// 32 bytes at `p` (unaligned).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load<T>(p: *const T) -> __m256i {
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Σ wᵢ·aᵢ over 32 signed bytes each, as eight partial `i32` sums
/// (`|w| ≤ 128`, `|a| ≤ 127`: no `i16` pair saturates).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dot32_signed(w: __m256i, a: __m256i) -> __m256i {
    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// The four lanes' float factors: lane `wi·R + r` is weight row `wi`'s
/// `f(row)` times activation row `r`'s block scale (the portable code's
/// `d_w * a.d[b]`, one multiplication per lane).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn lane_scales<const W: usize, const R: usize>(dw: [f32; W], da: [f32; R]) -> __m128 {
    // Lane l holds weight row l / R and activation row l % R (W·R ≤ 4;
    // with fewer outputs the last lanes repeat one and are not read).
    let wv = if W == 1 {
        _mm_set1_ps(dw[0])
    } else {
        _mm_setr_ps(dw[0], dw[1 % W], dw[2 % W], dw[3 % W])
    };
    let av = if R == 1 {
        _mm_set1_ps(da[0])
    } else {
        _mm_setr_ps(da[0], da[1 % R], da[2 % R], da[3 % R])
    };
    _mm_mul_ps(wv, av)
}

/// Q8_0 and Q4_0 (`four`) over `nb` blocks: lane `wi·R + r` of the result
/// is weight row `w[wi]` · activation row `a[r]`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q8_0_lanes<const W: usize, const R: usize>(
    w: [*const u8; W],
    a: [&QActs; R],
    nb: usize,
    four: bool,
) -> __m128 {
    let bb = if four { 18 } else { 34 };
    let m4 = _mm256_set1_epi8(0xF);
    let eight = _mm256_set1_epi8(8);
    let mut sums = _mm_setzero_ps();
    for b in 0..nb {
        let mut acc = [_mm256_setzero_si256(); LANES];
        let mut dw = [0.0f32; W];
        for wi in 0..W {
            // SAFETY: the caller checked `nb` blocks of every row.
            let blk = unsafe { w[wi].add(b * bb) };
            dw[wi] = unsafe { f16_at(blk) };
            let wq = if four {
                let qs = unsafe { _mm_loadu_si128(blk.add(2).cast()) };
                let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
                _mm256_sub_epi8(_mm256_and_si256(both, m4), eight)
            } else {
                unsafe { load(blk.add(2)) }
            };
            for r in 0..R {
                let av = unsafe { load(a[r].q.as_ptr().add(32 * b)) };
                acc[wi * R + r] = unsafe { dot32_signed(wq, av) };
            }
        }
        let s = _mm_cvtepi32_ps(unsafe { hsum4(&acc) });
        let da: [f32; R] = std::array::from_fn(|r| a[r].d[b]);
        // Portable: `sum += s as f32 * (d_w * a.d[b])`.
        sums = _mm_add_ps(sums, _mm_mul_ps(s, unsafe { lane_scales::<W, R>(dw, da) }));
    }
    sums
}

/// Q4_K's twelve scale bytes as eight 6-bit scales and eight 6-bit mins
/// (llama.cpp's `utmp` unpacking; the same values as `scale_min_k4`).
#[inline]
fn scales_mins_k4(q: &[u8]) -> ([u8; 8], [u8; 8]) {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let s_lo = u0 & K1;
    let s_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
    let m_lo = u1 & K1;
    let m_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&s_lo.to_le_bytes());
    sc[4..].copy_from_slice(&s_hi.to_le_bytes());
    mn[..4].copy_from_slice(&m_lo.to_le_bytes());
    mn[4..].copy_from_slice(&m_hi.to_le_bytes());
    (sc, mn)
}

/// An activation block's sums of 32 (`bsums` pairs), in the lane order of
/// `_mm256_hadd_epi32`: sub-blocks 0, 1, 4, 5, 2, 3, 6, 7.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn pair_sums(bs: *const i32) -> __m256i {
    unsafe { _mm256_hadd_epi32(load(bs), load(bs.add(8))) }
}

/// Q4_K over `nb` blocks: lane `wi·R + r` of the result is weight row
/// `w[wi]` · activation row `a[r]`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q4_k_lanes<const W: usize, const R: usize>(
    w: [*const u8; W],
    a: [&QActs; R],
    nb: usize,
) -> __m128 {
    let m4 = _mm256_set1_epi8(0xF);
    // Mins in `pair_sums`' lane order.
    let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    let mut sums = _mm_setzero_ps();
    for b in 0..nb {
        let mut acc = [_mm256_setzero_si256(); LANES];
        let mut accm = [_mm256_setzero_si256(); LANES];
        let (mut d, mut dmin) = ([0.0f32; W], [0.0f32; W]);
        let mut pairs = [_mm256_setzero_si256(); R];
        for (p, ar) in pairs.iter_mut().zip(a) {
            *p = unsafe { pair_sums(ar.bsums.as_ptr().add(16 * b)) };
        }
        for wi in 0..W {
            // SAFETY: the caller checked `nb` blocks of every row.
            let blk = unsafe { w[wi].add(b * 144) };
            let (dd, dm) = unsafe { (f16_at(blk), f16_at(blk.add(2))) };
            (d[wi], dmin[wi]) = (dd, dm);
            let (sc, mn) = scales_mins_k4(unsafe { std::slice::from_raw_parts(blk.add(4), 12) });
            let mins = _mm256_permutevar8x32_epi32(
                _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(mn))),
                order,
            );
            for r in 0..R {
                accm[wi * R + r] = _mm256_mullo_epi32(mins, pairs[r]);
            }
            for j in 0..4 {
                let q = unsafe { load(blk.add(16 + 32 * j)) };
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let s1 = _mm256_set1_epi16(sc[2 * j] as i16);
                let s2 = _mm256_set1_epi16(sc[2 * j + 1] as i16);
                for (r, ar) in a.iter().enumerate() {
                    let av = unsafe { ar.q.as_ptr().add(QK_K * b + 64 * j) };
                    let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, unsafe { load(av) }), s1);
                    let ph = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi, unsafe { load(av.add(32)) }),
                        s2,
                    );
                    let l = wi * R + r;
                    acc[l] = _mm256_add_epi32(acc[l], _mm256_add_epi32(pl, ph));
                }
            }
        }
        let sumi = _mm_cvtepi32_ps(unsafe { hsum4(&acc) });
        let summ = _mm_cvtepi32_ps(unsafe { hsum4(&accm) });
        let da: [f32; R] = std::array::from_fn(|r| a[r].d[b]);
        let (fd, fm) = unsafe { (lane_scales::<W, R>(d, da), lane_scales::<W, R>(dmin, da)) };
        // Portable: `sum += (d * a.d[b]) * sumi as f32 - (dmin * a.d[b]) * summ as f32`.
        sums = _mm_add_ps(sums, _mm_sub_ps(_mm_mul_ps(fd, sumi), _mm_mul_ps(fm, summ)));
    }
    sums
}

/// Q6_K's two high bits of each value (the low two of `v`), moved to bits 4–5.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn hbits(v: __m256i, m2: __m256i) -> __m256i {
    _mm256_slli_epi16::<4>(_mm256_and_si256(v, m2))
}

/// Q6_K over `nb` blocks: lane `wi·R + r` of the result is weight row
/// `w[wi]` · activation row `a[r]`. The stored values are `v + 32`, so each
/// group's sum is `Σ v·a − 32·Σ a`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q6_k_lanes<const W: usize, const R: usize>(
    w: [*const u8; W],
    a: [&QActs; R],
    nb: usize,
) -> __m128 {
    let m4 = _mm256_set1_epi8(0xF);
    let m2 = _mm256_set1_epi8(3);
    let m32 = _mm256_set1_epi8(32);
    let mut sums = _mm_setzero_ps();
    for b in 0..nb {
        let mut acc = [_mm256_setzero_si256(); LANES];
        let mut d = [0.0f32; W];
        for wi in 0..W {
            // SAFETY: the caller checked `nb` blocks of every row.
            let blk = unsafe { w[wi].add(b * 210) };
            d[wi] = unsafe { f16_at(blk.add(208)) };
            let sc = unsafe { blk.add(192).cast::<i8>() };
            for n in 0..2 {
                let (l1, l2, h) = unsafe {
                    (
                        load(blk.add(64 * n)),
                        load(blk.add(64 * n + 32)),
                        load(blk.add(128 + 32 * n)),
                    )
                };
                let parts = unsafe {
                    [
                        _mm256_or_si256(_mm256_and_si256(l1, m4), hbits(h, m2)),
                        _mm256_or_si256(
                            _mm256_and_si256(l2, m4),
                            hbits(_mm256_srli_epi16::<2>(h), m2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                            hbits(_mm256_srli_epi16::<4>(h), m2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4),
                            hbits(_mm256_srli_epi16::<6>(h), m2),
                        ),
                    ]
                };
                for (part, &v) in parts.iter().enumerate() {
                    let s = 8 * n + 2 * part;
                    let (g0, g1) = unsafe { (*sc.add(s) as i16, *sc.add(s + 1) as i16) };
                    let scale = _mm256_set_m128i(_mm_set1_epi16(g1), _mm_set1_epi16(g0));
                    for (r, ar) in a.iter().enumerate() {
                        let av = unsafe { load(ar.q.as_ptr().add(QK_K * b + 128 * n + 32 * part)) };
                        let p = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(v, av),
                            _mm256_maddubs_epi16(m32, av),
                        );
                        let l = wi * R + r;
                        acc[l] = _mm256_add_epi32(acc[l], _mm256_madd_epi16(p, scale));
                    }
                }
            }
        }
        let sumi = _mm_cvtepi32_ps(unsafe { hsum4(&acc) });
        let da: [f32; R] = std::array::from_fn(|r| a[r].d[b]);
        // Portable: `sum += (d * a.d[b]) * sumi as f32`.
        sums = _mm_add_ps(
            sums,
            _mm_mul_ps(unsafe { lane_scales::<W, R>(d, da) }, sumi),
        );
    }
    sums
}

/// Lanes `wi·R + r` = weight row `w[wi]` · activation row `a[r]` for the
/// types with kernels here.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn lanes<const W: usize, const R: usize>(
    q: QType,
    w: [*const u8; W],
    a: [&QActs; R],
    nb: usize,
) -> [f32; LANES] {
    let v = unsafe {
        match q {
            QType::Q8_0 => q8_0_lanes(w, a, nb, false),
            QType::Q4_0 => q8_0_lanes(w, a, nb, true),
            QType::Q4K => q4_k_lanes(w, a, nb),
            QType::Q6K => q6_k_lanes(w, a, nb),
            QType::Q5K => _mm_setzero_ps(),
        }
    };
    let mut out = [0.0f32; LANES];
    unsafe { _mm_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// `qdot::round_into` eight lanes at a time: `cvttps2dq` truncates, the
/// exact remainder `x − trunc(x)` against ±0.5 rounds halves away from
/// zero, then `min(top)` and each lane's low byte, as the scalar loop's
/// `as i8`. Values the quantizers scale are within ±127.5, where the
/// truncation is exact; a NaN (a non-finite activation) gives 0 in both.
///
/// # Safety
/// The CPU has AVX2; `x` and `q` are as long, a multiple of 8.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn round_into(x: &[f32], s: f32, top: i32, q: &mut [i8]) {
    assert!(x.len() == q.len() && x.len().is_multiple_of(8));
    let (sv, half, neg_half) = (_mm256_set1_ps(s), _mm256_set1_ps(0.5), _mm256_set1_ps(-0.5));
    let top = _mm256_set1_epi32(top);
    // Byte 0 of each `i32` lane, four per 128-bit half.
    let low = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1,
    );
    for (q, x) in q.chunks_exact_mut(8).zip(x.chunks_exact(8)) {
        // SAFETY: eight values each side (the chunks).
        unsafe {
            let v = _mm256_mul_ps(sv, _mm256_loadu_ps(x.as_ptr()));
            let t = _mm256_cvttps_epi32(v);
            let d = _mm256_sub_ps(v, _mm256_cvtepi32_ps(t));
            // The comparisons give -1 where true: `t - up + down`.
            let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(d, half));
            let down = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(d, neg_half));
            let r = _mm256_min_epi32(_mm256_add_epi32(_mm256_sub_epi32(t, up), down), top);
            let b = _mm256_shuffle_epi8(r, low);
            let eight =
                _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256::<1>(b));
            _mm_storel_epi64(q.as_mut_ptr().cast(), eight);
        }
    }
}

/// Whether [`tile_avx2`] and [`tile_avx512`] compute type `q`.
pub fn covers(q: QType) -> bool {
    !matches!(q, QType::Q5K)
}

/// Two weight rows side by side in one 512-bit vector: `a` in the low
/// half, `b` in the high one.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn pair512(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// 32 activation bytes at `p` in both halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn bcast512(p: *const i8) -> __m512i {
    unsafe { _mm512_broadcast_i64x4(load(p)) }
}

/// The sums of the eight `i32` lanes of each of eight vectors, in order.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn hsum8(v: &[__m256i; 8]) -> __m256i {
    let c0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let c1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(c0, c1),
        _mm256_permute2x128_si256::<0x31>(c0, c1),
    )
}

/// The eight outputs of two row pairs' accumulators (`acc[r]`: row 0 with
/// activation row r in the low half, row 1 in the high one), row 0's four
/// first.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn split8(acc: &[__m512i; LANES]) -> __m256i {
    let v: [__m256i; 8] = std::array::from_fn(|i| {
        if i < LANES {
            _mm512_castsi512_si256(acc[i])
        } else {
            _mm512_extracti64x4_epi64::<1>(acc[i - LANES])
        }
    });
    unsafe { hsum8(&v) }
}

/// Lane factors of two weight rows × four activation rows (row 0's four
/// first): `d_w * a.d[b]`, one multiplication per lane as in
/// [`lane_scales`].
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn lane_scales8(dw: [f32; 2], da: __m128) -> __m256 {
    _mm256_mul_ps(
        _mm256_set_m128(_mm_set1_ps(dw[1]), _mm_set1_ps(dw[0])),
        _mm256_set_m128(da, da),
    )
}

/// The two rows' halves of `v`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn halves(v: __m256) -> [__m128; 2] {
    [_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)]
}

/// Q4_K, two weight rows against four activation rows with 512-bit
/// vectors: the two results are [`q4_k_lanes::<1, 4>`] of each row, to
/// the bit (the same integer sums, the same float step per lane).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn q4_k_2x4(w: [*const u8; 2], a: [&QActs; LANES], nb: usize) -> [__m128; 2] {
    let m4 = _mm512_set1_epi8(0xF);
    let order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    // Lanes of sub-block t's scale: row 0's (t) in the low half, row 1's
    // (8 + t) in the high one.
    let pick: [__m512i; 8] = std::array::from_fn(|t| unsafe {
        pair512(_mm256_set1_epi16(t as i16), _mm256_set1_epi16(8 + t as i16))
    });
    let mut sums = _mm256_setzero_ps();
    for b in 0..nb {
        let mut acc = [_mm512_setzero_si512(); LANES];
        let mut pairs = [_mm256_setzero_si256(); LANES];
        for (p, ar) in pairs.iter_mut().zip(a) {
            *p = unsafe { pair_sums(ar.bsums.as_ptr().add(16 * b)) };
        }
        // SAFETY: the caller checked `nb` blocks of every row.
        let blk = unsafe { [w[0].add(b * 144), w[1].add(b * 144)] };
        let mut sc = [[0u8; 8]; 2];
        let mut accm = [[_mm256_setzero_si256(); LANES]; 2];
        let mut d = [0.0f32; 2];
        let mut dmin = [0.0f32; 2];
        for h in 0..2 {
            (d[h], dmin[h]) = unsafe { (f16_at(blk[h]), f16_at(blk[h].add(2))) };
            let (s, mn) = scales_mins_k4(unsafe { std::slice::from_raw_parts(blk[h].add(4), 12) });
            sc[h] = s;
            let mins = _mm256_permutevar8x32_epi32(
                _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(mn))),
                order,
            );
            for r in 0..LANES {
                accm[h][r] = _mm256_mullo_epi32(mins, pairs[r]);
            }
        }
        // Both rows' sixteen scales as i16, row 0 first.
        let all = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_set_epi64x(
            i64::from_le_bytes(sc[1]),
            i64::from_le_bytes(sc[0]),
        )));
        for j in 0..4 {
            let q =
                unsafe { pair512(load(blk[0].add(16 + 32 * j)), load(blk[1].add(16 + 32 * j))) };
            let lo = _mm512_and_si512(q, m4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
            let s1 = _mm512_permutexvar_epi16(pick[2 * j], all);
            let s2 = _mm512_permutexvar_epi16(pick[2 * j + 1], all);
            for r in 0..LANES {
                let av = unsafe { a[r].q.as_ptr().add(QK_K * b + 64 * j) };
                let (al, ah) = unsafe { (bcast512(av), bcast512(av.add(32))) };
                let pl = _mm512_madd_epi16(_mm512_maddubs_epi16(lo, al), s1);
                let ph = _mm512_madd_epi16(_mm512_maddubs_epi16(hi, ah), s2);
                acc[r] = _mm512_add_epi32(acc[r], _mm512_add_epi32(pl, ph));
            }
        }
        let sumi = _mm256_cvtepi32_ps(unsafe { split8(&acc) });
        let mv: [__m256i; 8] = std::array::from_fn(|i| accm[i / LANES][i % LANES]);
        let summ = _mm256_cvtepi32_ps(unsafe { hsum8(&mv) });
        let da = _mm_setr_ps(a[0].d[b], a[1].d[b], a[2].d[b], a[3].d[b]);
        let (fd, fm) = unsafe { (lane_scales8(d, da), lane_scales8(dmin, da)) };
        // Portable, per lane: `sum += (d * a.d[b]) * sumi as f32 - (dmin * a.d[b]) * summ as f32`.
        sums = _mm256_add_ps(
            sums,
            _mm256_sub_ps(_mm256_mul_ps(fd, sumi), _mm256_mul_ps(fm, summ)),
        );
    }
    unsafe { halves(sums) }
}

/// Q6_K, two weight rows against four activation rows with 512-bit
/// vectors: the two results are [`q6_k_lanes::<1, 4>`] of each row, to
/// the bit.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn q6_k_2x4(w: [*const u8; 2], a: [&QActs; LANES], nb: usize) -> [__m128; 2] {
    let m4 = _mm512_set1_epi8(0xF);
    let m2 = _mm512_set1_epi8(3);
    let m32 = _mm512_set1_epi8(32);
    let hb = |v: __m512i| _mm512_slli_epi16::<4>(_mm512_and_si512(v, m2));
    let mut sums = _mm256_setzero_ps();
    for b in 0..nb {
        let mut acc = [_mm512_setzero_si512(); LANES];
        // SAFETY: the caller checked `nb` blocks of every row.
        let blk = unsafe { [w[0].add(b * 210), w[1].add(b * 210)] };
        let d = unsafe { [f16_at(blk[0].add(208)), f16_at(blk[1].add(208))] };
        for n in 0..2 {
            let both =
                |off: usize| unsafe { pair512(load(blk[0].add(off)), load(blk[1].add(off))) };
            let (l1, l2, h) = (both(64 * n), both(64 * n + 32), both(128 + 32 * n));
            let parts = [
                _mm512_or_si512(_mm512_and_si512(l1, m4), hb(h)),
                _mm512_or_si512(_mm512_and_si512(l2, m4), hb(_mm512_srli_epi16::<2>(h))),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(l1), m4),
                    hb(_mm512_srli_epi16::<4>(h)),
                ),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(l2), m4),
                    hb(_mm512_srli_epi16::<6>(h)),
                ),
            ];
            for (part, &v) in parts.iter().enumerate() {
                let s = 8 * n + 2 * part;
                let g =
                    |h: usize, i: usize| unsafe { *blk[h].add(192 + s + i).cast::<i8>() as i16 };
                let half =
                    |h: usize| _mm256_set_m128i(_mm_set1_epi16(g(h, 1)), _mm_set1_epi16(g(h, 0)));
                let scale = unsafe { pair512(half(0), half(1)) };
                for r in 0..LANES {
                    let av =
                        unsafe { bcast512(a[r].q.as_ptr().add(QK_K * b + 128 * n + 32 * part)) };
                    let p = _mm512_sub_epi16(
                        _mm512_maddubs_epi16(v, av),
                        _mm512_maddubs_epi16(m32, av),
                    );
                    acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(p, scale));
                }
            }
        }
        let sumi = _mm256_cvtepi32_ps(unsafe { split8(&acc) });
        let da = _mm_setr_ps(a[0].d[b], a[1].d[b], a[2].d[b], a[3].d[b]);
        // Portable, per lane: `sum += (d * a.d[b]) * sumi as f32`.
        sums = _mm256_add_ps(sums, _mm256_mul_ps(unsafe { lane_scales8(d, da) }, sumi));
    }
    unsafe { halves(sums) }
}

/// Four activation rows against the weight rows of a tile, two weight rows
/// at a time with 512-bit vectors (Q4_K and Q6_K; `false` for the other
/// types, which the caller computes itself).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,f16c")]
unsafe fn group_512(
    q: QType,
    rows: usize,
    row: impl Fn(usize) -> *const u8,
    group: [&QActs; LANES],
    nb: usize,
    mut put: impl FnMut(usize, [f32; LANES]),
) -> bool {
    if !matches!(q, QType::Q4K | QType::Q6K) {
        return false;
    }
    let mut j = 0;
    while j + 2 <= rows {
        let ws = [row(j), row(j + 1)];
        let v = unsafe {
            match q {
                QType::Q4K => q4_k_2x4(ws, group, nb),
                _ => q6_k_2x4(ws, group, nb),
            }
        };
        for (h, v) in v.into_iter().enumerate() {
            let mut o = [0.0f32; LANES];
            unsafe { _mm_storeu_ps(o.as_mut_ptr(), v) };
            put(j + h, o);
        }
        j += 2;
    }
    if j < rows {
        put(j, unsafe { lanes::<1, 4>(q, [row(j)], group, nb) });
    }
    true
}

/// `out[i·rows + j] = W row j · acts[i]` for the weight rows of one tile
/// (`w`, rows of `rb` bytes) and every activation row: four activation
/// rows per weight row while there are four, then four weight rows per
/// activation row.
/// With `WIDE` (AVX-512), Q4_K and Q6_K take two weight rows per 512-bit
/// vector ([`group_512`]) for the groups of four activation rows.
#[inline(always)]
unsafe fn tile_body<const WIDE: bool>(
    q: QType,
    w: &[u8],
    rb: usize,
    acts: &[&QActs],
    out: &mut [f32],
) {
    let rows = w.len() / rb;
    let nb = rb / q.block_bytes();
    let per_block = q.block_elems();
    // The raw loads below stay within these bounds.
    assert!(nb * q.block_bytes() == rb && out.len() >= acts.len() * rows);
    for a in acts {
        assert!(a.q.len() >= nb * per_block && a.d.len() >= nb);
        assert!(!q.uses_q8k() || a.bsums.len() >= nb * 16);
    }
    let row = |j: usize| w[j * rb..(j + 1) * rb].as_ptr();
    let mut i = 0;
    while i + LANES <= acts.len() {
        let group = [acts[i], acts[i + 1], acts[i + 2], acts[i + 3]];
        let put = |j: usize, s: [f32; LANES]| {
            for (r, v) in s.into_iter().enumerate() {
                out[(i + r) * rows + j] = v;
            }
        };
        if WIDE && unsafe { group_512(q, rows, row, group, nb, put) } {
            i += LANES;
            continue;
        }
        for j in 0..rows {
            let s = unsafe { lanes::<1, 4>(q, [row(j)], group, nb) };
            for (r, v) in s.into_iter().enumerate() {
                out[(i + r) * rows + j] = v;
            }
        }
        i += LANES;
    }
    for (ii, a) in acts.iter().enumerate().skip(i) {
        let mut j = 0;
        while j + LANES <= rows {
            let ws = [row(j), row(j + 1), row(j + 2), row(j + 3)];
            let s = unsafe { lanes::<4, 1>(q, ws, [*a], nb) };
            out[ii * rows + j..ii * rows + j + LANES].copy_from_slice(&s);
            j += LANES;
        }
        for jj in j..rows {
            out[ii * rows + jj] = unsafe { lanes::<1, 1>(q, [row(jj)], [*a], nb) }[0];
        }
    }
}

/// [`tile_body`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2(q: QType, w: &[u8], rb: usize, acts: &[&QActs], out: &mut [f32]) {
    unsafe { tile_body::<false>(q, w, rb, acts, out) }
}

/// [`tile_body`] compiled for AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL, AVX2, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
pub unsafe fn tile_avx512(q: QType, w: &[u8], rb: usize, acts: &[&QActs], out: &mut [f32]) {
    unsafe { tile_body::<true>(q, w, rb, acts, out) }
}
