//! The prompt kernels on [`super::repack`]'s eight-row layout: up to eight
//! activation rows with VNNI (four without) against a group of eight
//! weight rows, the rows in chunks that stay in L2. A 512-bit vector
//! holds eight bytes of each weight row; eight activation bytes,
//! broadcast, meet them, so each pair of `i32` lanes accumulates one
//! (weight row, activation row) output, and one add per block folds the
//! pair into the eight lanes of a 256-bit result: no horizontal sums.
//!
//! Q4_K: `vpdpbusd` (AVX-512 VNNI) per eight bytes, the 6-bit scale by
//! `vpmaddwd` on each lane's sum of 16 values (which fits in `i16`).
//! Q5_K: the same with each nibble's fifth bit or-ed in from `qh`; a
//! lane's sum of 16 (`≤ 16·31·127`) no longer fits in `i16`, so the scale
//! goes on with `vpmulld`. Q4_0: `vpdpbusd` on the nibbles (`q + 8`), less
//! `8·Σ a` per block. Q6_K: `vpmaddubsw` (values `+ 32` ≤ 63, no saturation) then `vpmaddwd`
//! against the scales. Q8_0: `vpdpbusd` on the stored `q + 128`, less
//! `128·Σ a` per block. Without AVX-512 VNNI the same layout runs as two
//! 256-bit halves with `vpmaddubsw` + `vpmaddwd`. The mins (Q4_K) and
//! Q6_K's `−32` offset go through the activations' sums of 16 with
//! `vpmaddwd`, from pairs of them that [`QActs::pairs`] packs once per
//! row. The float step per block is the portable expression per lane, in
//! the same order, without fused multiply-adds. The products go straight
//! into the caller's output (a [`Dst`]), each job its own columns.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use super::qdot::{PAIRS, QActs};
use super::repack::{Dst, Packed, ROWS, q4k, q5k, q6k, q8, q40};
use crate::model::quant::{QK_K, QType};

/// 32 bytes at `p` (unaligned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    unsafe { _mm256_loadu_si256(p.cast()) }
}

/// Bytes ahead of the current block from which [`prefetch_block`]
/// fetches, rounded up to whole blocks (`COPYHOLD_REPACK_PREFETCH`, 0:
/// none). Measured, 284M, AVX2, 2 threads, decode: Q4_K_M 52 → 64 tok/s
/// one block (≈1.2 KiB) ahead; Q8_0 42 → 48 four blocks (1.1 KiB) ahead,
/// 42 one block ahead.
fn prefetch_bytes() -> usize {
    static B: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        std::env::var("COPYHOLD_REPACK_PREFETCH")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1024)
    })
}

/// With one or two activation rows (decode) each weight block is used
/// once, straight from memory: the block [`prefetch_bytes`] ahead of
/// `blk` (the groups lie one after another, so past a group's end this
/// is the next group's) is prefetched line by line. Prompts reuse each
/// group from L2 and skip this.
#[inline(always)]
fn prefetch_block<const R: usize>(blk: *const u8, stride: usize) {
    if R > 2 {
        return;
    }
    let ahead = prefetch_bytes().div_ceil(stride) * stride;
    if ahead == 0 {
        return;
    }
    let at = blk.wrapping_add(ahead);
    let mut off = 0;
    while off < stride {
        // SAFETY: a prefetch never faults, whatever the address; the
        // address is computed with wrapping arithmetic.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(off).cast()) };
        off += 64;
    }
}

/// Eight f16 at `p`, widened to f32 (exactly, as `f16_at` does).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_ph(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
}

/// Q4_K sub-block `s`'s scales of the eight rows, each byte twice (the
/// two 32-bit lanes of a row).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_scales(blk: *const u8, s: usize) -> __m128i {
    let v = unsafe { _mm_loadl_epi64(blk.add(q4k::SC + 8 * s).cast()) };
    _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
    )
}

/// Q4_K (Q5_K if `FIVE`) block `b`'s `Σ sc·(Σ q·a)` of the eight rows
/// (lanes) against `R` activation rows, with 512-bit `vpdpbusd`: lanes
/// `2i`, `2i + 1` hold row `i`'s halves until the end of the block. A
/// Q4_K lane's sum over one sub-block (16 values, `|Σ| ≤ 16·15·127`) fits
/// in `i16`, so `vpmaddwd` against the scale (high half 0) applies it;
/// Q5_K's (`≤ 16·31·127`) takes `vpmulld`.
#[inline(always)]
unsafe fn q45k_sumi_512<const R: usize, const FIVE: bool>(
    blk: *const u8,
    a: [&QActs; R],
    b: usize,
) -> [__m256i; R] {
    // SAFETY: the VNNI entry point's features; `tile` checked the lengths.
    unsafe {
        let (m4, sixteen) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(16));
        let qs = if FIVE { q5k::QS } else { q4k::QS };
        let mut acc = [_mm512_setzero_si512(); R];
        for s in 0..8 {
            let (j, high) = (s / 2, s % 2 == 1);
            let mut sub = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let q = _mm512_loadu_si512(blk.add(qs + 64 * (4 * j + c)).cast());
                let mut w = if high {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4)
                } else {
                    _mm512_and_si512(q, m4)
                };
                if FIVE {
                    // `+ 16` where bit `s` of the `qh` byte is set: a
                    // mask test and a masked add, off the port that
                    // `vpdpbusd` and the shifts share.
                    let h = _mm512_loadu_si512(blk.add(q5k::QH + 64 * c).cast());
                    let k = _mm512_test_epi8_mask(h, _mm512_set1_epi8(1 << s));
                    w = _mm512_mask_add_epi8(w, k, w, sixteen);
                }
                for r in 0..R {
                    let at = a[r].q.as_ptr().add(QK_K * b + 32 * s + 8 * c);
                    let av = _mm512_set1_epi64(at.cast::<i64>().read_unaligned());
                    sub[r] = _mm512_dpbusd_epi32(sub[r], w, av);
                }
            }
            let sc = _mm512_cvtepu8_epi32(q4k_scales(blk, s));
            for r in 0..R {
                let scaled = if FIVE {
                    _mm512_mullo_epi32(sub[r], sc)
                } else {
                    _mm512_madd_epi16(sub[r], sc)
                };
                acc[r] = _mm512_add_epi32(acc[r], scaled);
            }
        }
        // Loops, not `array::from_fn`: a closure lacks the target features,
        // so its intrinsics would not be inlined.
        let mut out = [_mm256_setzero_si256(); R];
        for r in 0..R {
            out[r] =
                _mm512_cvtepi64_epi32(_mm512_add_epi32(acc[r], _mm512_srli_epi64::<32>(acc[r])));
        }
        out
    }
}

/// [`q45k_sumi_512`] with 256-bit `vpmaddubsw` + `vpmaddwd`: rows 0–3 in
/// one vector, rows 4–7 in the other.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `h` picks the half of `sub` and of the bytes
unsafe fn q45k_sumi_256<const R: usize, const FIVE: bool>(
    blk: *const u8,
    a: [&QActs; R],
    b: usize,
) -> [__m256i; R] {
    // SAFETY: AVX2 (every entry point); `tile` checked the lengths.
    unsafe {
        let (m4, sixteen) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(16));
        let qs = if FIVE { q5k::QS } else { q4k::QS };
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for s in 0..8 {
            let (j, high) = (s / 2, s % 2 == 1);
            // `i16` lanes: each the sum of eight `w·a` (`≤ 8·15·128`;
            // Q5_K's `≤ 8·31·128 = 31 744` fits too), so
            // the sub-block needs no `vpmaddwd` per chunk; the one against
            // the scale (in both halves of a lane) adds a lane's two
            // halves, which gives the same `i32` as summing in `i32`.
            let mut sub = [[_mm256_setzero_si256(); 2]; R];
            for c in 0..4 {
                for h in 0..2 {
                    let q = load(blk.add(qs + 64 * (4 * j + c) + 32 * h));
                    let mut w = if high {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4)
                    } else {
                        _mm256_and_si256(q, m4)
                    };
                    if FIVE {
                        // `| 16` where bit `s` of the `qh` byte is set.
                        let hb = load(blk.add(q5k::QH + 64 * c + 32 * h));
                        let bit = _mm256_set1_epi8(1 << s);
                        let set = _mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit);
                        w = _mm256_or_si256(w, _mm256_and_si256(set, sixteen));
                    }
                    for r in 0..R {
                        let at = a[r].q.as_ptr().add(QK_K * b + 32 * s + 8 * c);
                        let av = _mm256_set1_epi64x(at.cast::<i64>().read_unaligned());
                        sub[r][h] = _mm256_add_epi16(sub[r][h], _mm256_maddubs_epi16(w, av));
                    }
                }
            }
            let s8 = q4k_scales(blk, s);
            let (s0, s1) = (
                _mm256_cvtepu8_epi32(s8),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(s8)),
            );
            let sc = [
                _mm256_or_si256(s0, _mm256_slli_epi32::<16>(s0)),
                _mm256_or_si256(s1, _mm256_slli_epi32::<16>(s1)),
            ];
            for (acc, sub) in acc.iter_mut().zip(&sub) {
                for h in 0..2 {
                    acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(sub[h], sc[h]));
                }
            }
        }
        rows_in_order(&acc)
    }
}

/// One Q4_K (Q5_K if `FIVE`) group (`p`, `nb` blocks) against `R`
/// activation rows: lane `i` of result `r` is weight row `i` · `a[r]`.
#[inline(always)]
unsafe fn q45k_group<const R: usize, const VNNI: bool, const FIVE: bool>(
    p: *const u8,
    nb: usize,
    a: [&QActs; R],
) -> [__m256; R] {
    // SAFETY: called from the entry points with their features; `tile`
    // checked the group's and the activations' lengths.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let stride = if FIVE { q5k::STRIDE } else { q4k::STRIDE };
            let blk = p.add(b * stride);
            prefetch_block::<R>(blk, stride);
            let sumi = if VNNI {
                q45k_sumi_512::<R, FIVE>(blk, a, b)
            } else {
                q45k_sumi_256::<R, FIVE>(blk, a, b)
            };
            let mut summ = [_mm256_setzero_si256(); R];
            for t in 0..4 {
                let mn = _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.add(q4k::MN + 16 * t).cast()));
                for r in 0..R {
                    let pair = _mm256_set1_epi32(a[r].pairs[PAIRS * b + t]);
                    summ[r] = _mm256_add_epi32(summ[r], _mm256_madd_epi16(mn, pair));
                }
            }
            let (d, dmin) = (load_ph(blk.add(q4k::D)), load_ph(blk.add(q4k::DMIN)));
            for r in 0..R {
                let da = _mm256_set1_ps(a[r].d[b]);
                let (fd, fm) = (_mm256_mul_ps(d, da), _mm256_mul_ps(dmin, da));
                // Portable: `sum += (d * a.d[b]) * sumi as f32 - (dmin * a.d[b]) * summ as f32`.
                let t = _mm256_sub_ps(
                    _mm256_mul_ps(fd, _mm256_cvtepi32_ps(sumi[r])),
                    _mm256_mul_ps(fm, _mm256_cvtepi32_ps(summ[r])),
                );
                sums[r] = _mm256_add_ps(sums[r], t);
            }
        }
        sums
    }
}

/// Q6_K's part `part` (0–3) of one 32-byte half chunk (rows 0–3 or 4–7):
/// `ql` bits and two `qh` bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_part(chunk: *const u8, part: usize) -> __m256i {
    let (m4, m2) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    let l = unsafe { load(chunk.add(64 * (part % 2))) };
    let h = unsafe { load(chunk.add(128)) };
    let (lo, hi) = match part {
        0 => (l, h),
        1 => (l, _mm256_srli_epi16::<2>(h)),
        2 => (_mm256_srli_epi16::<4>(l), _mm256_srli_epi16::<4>(h)),
        _ => (_mm256_srli_epi16::<4>(l), _mm256_srli_epi16::<6>(h)),
    };
    _mm256_or_si256(
        _mm256_and_si256(lo, m4),
        _mm256_slli_epi16::<4>(_mm256_and_si256(hi, m2)),
    )
}

/// Q6_K group `g`'s i8 scales of the eight rows, each four times (the
/// four `i16` lanes of a row's eight bytes), rows 0–3 in the low 128 bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_scales(blk: *const u8, g: usize) -> __m256i {
    // Pair `g / 2` holds row `i`'s scale at byte `2i + g % 2`.
    let v = unsafe { _mm_loadu_si128(blk.add(q6k::SC + 16 * (g / 2)).cast()) };
    let idx = _mm256_setr_epi8(
        0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6, 8, 8, 8, 8, 10, 10, 10, 10, 12, 12, 12, 12,
        14, 14, 14, 14,
    );
    let idx = _mm256_add_epi8(idx, _mm256_set1_epi8((g % 2) as i8));
    _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), idx)
}

/// 512-bit [`q6_part`] (all eight rows).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q6_part512(chunk: *const u8, part: usize) -> __m512i {
    let (m4, m2) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(3));
    let l = unsafe { _mm512_loadu_si512(chunk.add(64 * (part % 2)).cast()) };
    let h = unsafe { _mm512_loadu_si512(chunk.add(128).cast()) };
    let (lo, hi) = match part {
        0 => (l, h),
        1 => (l, _mm512_srli_epi16::<2>(h)),
        2 => (_mm512_srli_epi16::<4>(l), _mm512_srli_epi16::<4>(h)),
        _ => (_mm512_srli_epi16::<4>(l), _mm512_srli_epi16::<6>(h)),
    };
    _mm512_or_si512(
        _mm512_and_si512(lo, m4),
        _mm512_slli_epi16::<4>(_mm512_and_si512(hi, m2)),
    )
}

/// Q6_K block `b`'s `Σ sc·(Σ (v+32)·a)` of the eight rows against `R`
/// activation rows, 512 bits wide: `vpmaddubsw` (`≤ 2·63·127`, no
/// saturation) then `vpmaddwd` against the scales; lanes `2i`, `2i + 1`
/// hold row `i`'s halves until the end of the block.
#[inline(always)]
unsafe fn q6k_sumi_512<const R: usize>(blk: *const u8, a: [&QActs; R], b: usize) -> [__m256i; R] {
    // SAFETY: the VNNI entry point's features; `tile` checked the lengths.
    unsafe {
        let mut acc = [_mm512_setzero_si512(); R];
        for g in 0..16 {
            let (n, part, half) = (g / 8, (g % 8) / 2, g % 2);
            let sc = _mm512_cvtepi8_epi16(q6_scales(blk, g));
            for c in 2 * half..2 * half + 2 {
                let w = q6_part512(blk.add(q6k::Q + 192 * (4 * n + c)), part);
                for r in 0..R {
                    let at = a[r].q.as_ptr().add(QK_K * b + 128 * n + 32 * part + 8 * c);
                    let av = _mm512_set1_epi64(at.cast::<i64>().read_unaligned());
                    let p = _mm512_madd_epi16(_mm512_maddubs_epi16(w, av), sc);
                    acc[r] = _mm512_add_epi32(acc[r], p);
                }
            }
        }
        // Loops, not `array::from_fn`: a closure lacks the target features,
        // so its intrinsics would not be inlined.
        let mut out = [_mm256_setzero_si256(); R];
        for r in 0..R {
            out[r] =
                _mm512_cvtepi64_epi32(_mm512_add_epi32(acc[r], _mm512_srli_epi64::<32>(acc[r])));
        }
        out
    }
}

/// [`q6k_sumi_512`] with 256-bit vectors: rows 0–3 in one, 4–7 in the other.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `h` picks the half of `acc` and of the bytes
unsafe fn q6k_sumi_256<const R: usize>(blk: *const u8, a: [&QActs; R], b: usize) -> [__m256i; R] {
    // SAFETY: AVX2 (every entry point); `tile` checked the lengths.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..16 {
            let (n, part, half) = (g / 8, (g % 8) / 2, g % 2);
            let s = q6_scales(blk, g);
            let sc = [
                _mm256_cvtepi8_epi16(_mm256_castsi256_si128(s)),
                _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(s)),
            ];
            // The group's two chunks summed in `i16` lanes first (each
            // `≤ 2·2·63·127`, no overflow): one `vpmaddwd` against the
            // scales per group instead of one per chunk, the same `i32`.
            for h in 0..2 {
                let mut t = [_mm256_setzero_si256(); R];
                for c in 2 * half..2 * half + 2 {
                    let w = q6_part(blk.add(q6k::Q + 192 * (4 * n + c) + 32 * h), part);
                    for r in 0..R {
                        let at = a[r].q.as_ptr().add(QK_K * b + 128 * n + 32 * part + 8 * c);
                        let av = _mm256_set1_epi64x(at.cast::<i64>().read_unaligned());
                        t[r] = _mm256_add_epi16(t[r], _mm256_maddubs_epi16(w, av));
                    }
                }
                for r in 0..R {
                    acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(t[r], sc[h]));
                }
            }
        }
        rows_in_order(&acc)
    }
}

/// One Q6_K group against `R` activation rows, as [`q45k_group`]. The
/// values are stored `+ 32`: each group of 16 sums `Σ (v+32)·a`, and
/// `32 · Σ sc·(Σ a)` comes off once per block.
#[inline(always)]
unsafe fn q6k_group<const R: usize, const VNNI: bool>(
    p: *const u8,
    nb: usize,
    a: [&QActs; R],
) -> [__m256; R] {
    // SAFETY: called from the entry points with their features; `tile`
    // checked the group's and the activations' lengths.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            // SAFETY (whole loop): as in `q45k_group`.
            let blk = p.add(b * q6k::STRIDE);
            prefetch_block::<R>(blk, q6k::STRIDE);
            let mut sumi = if VNNI {
                q6k_sumi_512(blk, a, b)
            } else {
                q6k_sumi_256(blk, a, b)
            };
            let mut corr = [_mm256_setzero_si256(); R];
            for t in 0..8 {
                let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(q6k::SC + 16 * t).cast()));
                for r in 0..R {
                    let pair = _mm256_set1_epi32(a[r].pairs[PAIRS * b + 4 + t]);
                    corr[r] = _mm256_add_epi32(corr[r], _mm256_madd_epi16(s16, pair));
                }
            }
            for r in 0..R {
                sumi[r] = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32::<5>(corr[r]));
            }
            let d = load_ph(blk.add(q6k::D));
            for r in 0..R {
                let da = _mm256_set1_ps(a[r].d[b]);
                // Portable: `sum += (d * a.d[b]) * sumi as f32`.
                let t = _mm256_mul_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(sumi[r]));
                sums[r] = _mm256_add_ps(sums[r], t);
            }
        }
        sums
    }
}

/// Q8_0 block `b`'s `Σ q·a` of the eight rows against `R` activation rows:
/// with VNNI, `vpdpbusd` on the stored `q + 128` less `128·Σ a` (the
/// activations' block sums); without, `vpmaddubsw` on `|q|` and `a` signed
/// by `q` (`≤ 2·128·127`, no saturation), two 256-bit halves.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `r` and `h` pick rows and halves of several arrays
unsafe fn q8_0_sumi<const R: usize, const VNNI: bool>(
    blk: *const u8,
    a: [&QActs; R],
    b: usize,
) -> [__m256i; R] {
    // SAFETY: the entry point's features; `tile` checked the lengths.
    unsafe {
        let av = |r: usize, c: usize| {
            a[r].q
                .as_ptr()
                .add(32 * b + 8 * c)
                .cast::<i64>()
                .read_unaligned()
        };
        if VNNI {
            let mut acc = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let w = _mm512_loadu_si512(blk.add(q8::QS + 64 * c).cast());
                for r in 0..R {
                    acc[r] = _mm512_dpbusd_epi32(acc[r], w, _mm512_set1_epi64(av(r, c)));
                }
            }
            // Loops, not `array::from_fn`: intrinsics in a closure are not
            // inlined here (the closure lacks the target features).
            let mut out = [_mm256_setzero_si256(); R];
            for r in 0..R {
                let pair = _mm512_add_epi32(acc[r], _mm512_srli_epi64::<32>(acc[r]));
                let s = _mm512_cvtepi64_epi32(pair);
                out[r] = _mm256_sub_epi32(s, _mm256_set1_epi32(128 * a[r].bsums[b]));
            }
            return out;
        }
        let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for c in 0..4 {
            for h in 0..2 {
                let q = _mm256_xor_si256(load(blk.add(q8::QS + 64 * c + 32 * h)), flip);
                let aq = _mm256_sign_epi8(q, q);
                for r in 0..R {
                    let x = _mm256_sign_epi8(_mm256_set1_epi64x(av(r, c)), q);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, x), ones);
                    acc[r][h] = _mm256_add_epi32(acc[r][h], p);
                }
            }
        }
        rows_in_order(&acc)
    }
}

/// One Q8_0 group against `R` activation rows, as [`q45k_group`].
#[inline(always)]
unsafe fn q8_0_group<const R: usize, const VNNI: bool>(
    p: *const u8,
    nb: usize,
    a: [&QActs; R],
) -> [__m256; R] {
    // SAFETY: as `q45k_group`.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = p.add(b * q8::STRIDE);
            prefetch_block::<R>(blk, q8::STRIDE);
            let sumi = q8_0_sumi::<R, VNNI>(blk, a, b);
            let d = load_ph(blk.add(q8::D));
            for r in 0..R {
                // Portable: `sum += s as f32 * (d_w * a.d[b])`.
                let f = _mm256_mul_ps(d, _mm256_set1_ps(a[r].d[b]));
                sums[r] = _mm256_add_ps(sums[r], _mm256_mul_ps(_mm256_cvtepi32_ps(sumi[r]), f));
            }
        }
        sums
    }
}

/// Q4_0 block `b`'s `Σ q·a` of the eight rows against `R` activation rows:
/// the nibbles (`q + 8`, unsigned) by `vpdpbusd` (with VNNI) or
/// `vpmaddubsw` (two 256-bit halves, the four products of a block summed
/// in `i16`: `≤ 4·2·15·127`) and one `vpmaddwd`, less `8·Σ a` (the
/// activations' block sums). Without VNNI the rows come in `hadd` order
/// (0, 1, 4, 5, 2, 3, 6, 7; [`hadd_order`] puts them back), which
/// [`q4_0_group`] keeps until the group's end.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `r` and `h` pick rows and halves of several arrays
unsafe fn q4_0_sumi<const R: usize, const VNNI: bool>(
    blk: *const u8,
    a: [&QActs; R],
    b: usize,
) -> [__m256i; R] {
    // SAFETY: the entry point's features; `tile` checked the lengths.
    unsafe {
        let av = |r: usize, at: usize| {
            a[r].q
                .as_ptr()
                .add(32 * b + at)
                .cast::<i64>()
                .read_unaligned()
        };
        let mut out = [_mm256_setzero_si256(); R];
        if VNNI {
            let m4 = _mm512_set1_epi8(0xF);
            let mut acc = [_mm512_setzero_si512(); R];
            for c in 0..2 {
                let q = _mm512_loadu_si512(blk.add(q40::QS + 64 * c).cast());
                let lo = _mm512_and_si512(q, m4);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                for r in 0..R {
                    acc[r] = _mm512_dpbusd_epi32(acc[r], lo, _mm512_set1_epi64(av(r, 8 * c)));
                    acc[r] = _mm512_dpbusd_epi32(acc[r], hi, _mm512_set1_epi64(av(r, 16 + 8 * c)));
                }
            }
            // Loops, not `array::from_fn` (see `q45k_sumi_512`).
            for r in 0..R {
                let pair = _mm512_add_epi32(acc[r], _mm512_srli_epi64::<32>(acc[r]));
                out[r] = _mm512_cvtepi64_epi32(pair);
            }
        } else {
            let (m4, ones) = (_mm256_set1_epi8(0xF), _mm256_set1_epi16(1));
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for c in 0..2 {
                for h in 0..2 {
                    let q = load(blk.add(q40::QS + 64 * c + 32 * h));
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    for r in 0..R {
                        let x = _mm256_maddubs_epi16(lo, _mm256_set1_epi64x(av(r, 8 * c)));
                        let y = _mm256_maddubs_epi16(hi, _mm256_set1_epi64x(av(r, 16 + 8 * c)));
                        acc[r][h] = _mm256_add_epi16(acc[r][h], _mm256_add_epi16(x, y));
                    }
                }
            }
            for r in 0..R {
                let (l, h) = (
                    _mm256_madd_epi16(acc[r][0], ones),
                    _mm256_madd_epi16(acc[r][1], ones),
                );
                out[r] = _mm256_hadd_epi32(l, h);
            }
        }
        for r in 0..R {
            out[r] = _mm256_sub_epi32(out[r], _mm256_set1_epi32(8 * a[r].bsums[b]));
        }
        out
    }
}

/// The lane order `vphaddd` leaves two halves' rows in (0, 1, 4, 5, 2, 3,
/// 6, 7), which is its own inverse: a `vpermd` by it puts either order
/// into the other.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hadd_order() -> __m256i {
    _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7)
}

/// Per activation row, the sums of rows 0–3 (`acc[r][0]`) and 4–7
/// (`acc[r][1]`), each lane a pair of partial sums, added pairwise by
/// `vphaddd` and put back in row order.
#[inline(always)]
unsafe fn rows_in_order<const R: usize>(acc: &[[__m256i; 2]; R]) -> [__m256i; R] {
    // SAFETY: AVX2, as every caller.
    unsafe {
        // Loops, not `array::from_fn` (see `q45k_sumi_512`).
        let mut out = [_mm256_setzero_si256(); R];
        for r in 0..R {
            out[r] =
                _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(acc[r][0], acc[r][1]), hadd_order());
        }
        out
    }
}

/// One Q4_0 group against `R` activation rows, as [`q45k_group`].
#[inline(always)]
unsafe fn q4_0_group<const R: usize, const VNNI: bool>(
    p: *const u8,
    nb: usize,
    a: [&QActs; R],
) -> [__m256; R] {
    // SAFETY: as `q45k_group`.
    unsafe {
        let mut sums = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = p.add(b * q40::STRIDE);
            let sumi = q4_0_sumi::<R, VNNI>(blk, a, b);
            let mut d = load_ph(blk.add(q40::D));
            if !VNNI {
                d = _mm256_permutevar8x32_ps(d, hadd_order());
            }
            for r in 0..R {
                // Portable: `sum += s as f32 * (f16_at(blk, 0) * a.d[b])`
                // (lane by lane, so the lanes' order does not matter).
                let f = _mm256_mul_ps(d, _mm256_set1_ps(a[r].d[b]));
                sums[r] = _mm256_add_ps(sums[r], _mm256_mul_ps(_mm256_cvtepi32_ps(sumi[r]), f));
            }
        }
        if !VNNI {
            for s in &mut sums {
                *s = _mm256_permutevar8x32_ps(*s, hadd_order());
            }
        }
        sums
    }
}

/// Group `p` against `R` activation rows, stored to `out[r·rows + j]` for
/// the group's `valid` rows from `j0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group<const R: usize, const VNNI: bool>(
    pk: &Packed,
    p: *const u8,
    a: [&QActs; R],
    out: Dst,
    i0: usize,
    j0: usize,
    valid: usize,
) {
    let v = unsafe {
        match pk.q {
            QType::Q4K => q45k_group::<R, VNNI, false>(p, pk.nb, a),
            QType::Q5K => q45k_group::<R, VNNI, true>(p, pk.nb, a),
            QType::Q6K => q6k_group::<R, VNNI>(p, pk.nb, a),
            QType::Q8_0 => q8_0_group::<R, VNNI>(p, pk.nb, a),
            QType::Q4_0 => q4_0_group::<R, VNNI>(p, pk.nb, a),
        }
    };
    for (r, v) in v.into_iter().enumerate() {
        let mut o = [0.0f32; ROWS];
        // SAFETY: `tile`'s caller promised `out` for these elements.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), v);
            let at = out.ptr.add((i0 + r) * out.ldo + j0);
            std::ptr::copy_nonoverlapping(o.as_ptr(), at, valid);
        }
    }
}

/// The first `R` of `acts` as an array (the kernels' activation rows).
#[inline(always)]
fn first<'a, const R: usize>(acts: &[&'a QActs]) -> [&'a QActs; R] {
    std::array::from_fn(|r| acts[r])
}

/// Every group of the tile against the activation rows, `MAXR` at a
/// time (the rest in one smaller pass). The rows go in chunks of about
/// `chunk` bytes: each group of the tile (64 KiB in all, `qdot`'s
/// `tile_rows`) meets a chunk that stays in L2, where a long prompt's
/// rows (512 of a 1B model's 5632-wide FFN: 3 MiB) would otherwise come
/// from L3 once per group.
#[inline(always)]
unsafe fn tile_body<const VNNI: bool, const MAXR: usize>(
    p: &Packed,
    r0: usize,
    rows: usize,
    acts: &[&QActs],
    out: Dst,
    chunk: usize,
) {
    let gb = p.group_bytes();
    let row_bytes = acts.first().map_or(1, |a| a.bytes()).max(1);
    let chunk = (chunk / row_bytes).max(MAXR) / MAXR * MAXR;
    for c0 in (0..acts.len()).step_by(chunk) {
        let c1 = acts.len().min(c0 + chunk);
        for j0 in (0..rows).step_by(ROWS) {
            let g = (r0 + j0) / ROWS;
            let base = p.bytes[g * gb..(g + 1) * gb].as_ptr();
            let valid = ROWS.min(rows - j0);
            let mut i = c0;
            while i < c1 {
                let a = &acts[i..c1];
                let n = a.len().min(MAXR);
                // SAFETY: `base` is a whole group; `tile` checked the rest.
                unsafe {
                    match n {
                        1 => group::<1, VNNI>(p, base, first(a), out, i, j0, valid),
                        2 => group::<2, VNNI>(p, base, first(a), out, i, j0, valid),
                        3 => group::<3, VNNI>(p, base, first(a), out, i, j0, valid),
                        4 => group::<4, VNNI>(p, base, first(a), out, i, j0, valid),
                        5 => group::<5, VNNI>(p, base, first(a), out, i, j0, valid),
                        6 => group::<6, VNNI>(p, base, first(a), out, i, j0, valid),
                        7 => group::<7, VNNI>(p, base, first(a), out, i, j0, valid),
                        _ => group::<8, VNNI>(p, base, first(a), out, i, j0, valid),
                    }
                }
                i += n;
            }
        }
    }
}

/// Bytes of activation rows per chunk of [`tile_body`]
/// (`COPYHOLD_REPACK_CHUNK_KB`, for measuring; default 512 KiB, a quarter
/// of a 2 MiB L2).
fn chunk_bytes() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("COPYHOLD_REPACK_CHUNK_KB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(512 << 10, |kb| kb << 10)
    })
}

/// Activation rows per weight load with VNNI: 8 for the K-quants (256
/// values a block: their per-sub-block steps are paid once for eight
/// rows), 4 for Q8_0 and Q4_0 (32 values a block: eight rows' float steps
/// per block spill; 1B Q8_0 prompt 158 tok/s with 8, 168 with 4; 284 M
/// Q4_0 420 against 466), or 4 for every format where
/// `COPYHOLD_REPACK_ROWS=4` (for measuring). Q6_K, measured apart: 1B
/// Q4_K_M prompt 171 tok/s with 8, 167 with 4.
fn vnni_rows(q: QType) -> usize {
    static ALL4: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let all4 = *ALL4.get_or_init(|| std::env::var("COPYHOLD_REPACK_ROWS").as_deref() == Ok("4"));
    match q {
        _ if all4 => 4,
        QType::Q4K | QType::Q5K | QType::Q6K => 8,
        QType::Q8_0 | QType::Q4_0 => 4,
    }
}

#[target_feature(enable = "avx512vnni,avx512vl,avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn tile_vnni(p: &Packed, r0: usize, rows: usize, acts: &[&QActs], out: Dst, chunk: usize) {
    unsafe {
        if vnni_rows(p.q) == 4 {
            tile_body::<true, 4>(p, r0, rows, acts, out, chunk)
        } else {
            tile_body::<true, 8>(p, r0, rows, acts, out, chunk)
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2(p: &Packed, r0: usize, rows: usize, acts: &[&QActs], out: Dst, chunk: usize) {
    unsafe { tile_body::<false, 4>(p, r0, rows, acts, out, chunk) }
}

/// Whether the repacked kernels use AVX-512 VNNI (decided once).
fn vnni() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        use_vnni(
            super::kernel::isa(),
            std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512bw"),
        )
    })
}

/// VNNI where the CPU has it (with VL and BW) and the process runs the
/// AVX-512 kernels: `COPYHOLD_KERNELS=avx2` must leave an AVX-512 machine
/// running what an AVX2-only one runs, here as in `kernel` and `qdot`.
fn use_vnni(isa: super::kernel::Isa, cpu_has_vnni: bool) -> bool {
    isa == super::kernel::Isa::Avx512 && cpu_has_vnni
}

/// [`super::repack::tile`] on this CPU (the caller checked the lengths
/// and that AVX2, FMA and F16C are present).
///
/// # Safety
/// As [`super::repack::tile_into`].
pub unsafe fn tile(p: &Packed, r0: usize, rows: usize, acts: &[&QActs], out: Dst) {
    // SAFETY: the caller's promise about `out`.
    unsafe { tile_in_chunks(p, r0, rows, acts, out, chunk_bytes(), vnni()) }
}

/// [`tile`] with activation chunks of `chunk` bytes, with or without
/// VNNI.
///
/// # Safety
/// As [`tile`], and the CPU has VNNI where `with_vnni` says so.
pub unsafe fn tile_in_chunks(
    p: &Packed,
    r0: usize,
    rows: usize,
    acts: &[&QActs],
    out: Dst,
    chunk: usize,
    with_vnni: bool,
) {
    // SAFETY: features detected (`repack::covers`, `vnni`), and the
    // caller's promise about `out`.
    unsafe {
        if with_vnni {
            tile_vnni(p, r0, rows, acts, out, chunk)
        } else {
            tile_avx2(p, r0, rows, acts, out, chunk)
        }
    }
}

/// Whether this CPU has AVX-512 VNNI (for the tests, which run both builds).
#[cfg(test)]
pub fn cpu_has_vnni() -> bool {
    use_vnni(
        super::kernel::Isa::Avx512,
        std::is_x86_feature_detected!("avx512vnni"),
    ) && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bw")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::kernel::Isa;

    /// `COPYHOLD_KERNELS=avx2` (which makes `kernel::isa()` AVX2) is how an
    /// AVX-512 machine measures what an AVX2-only one runs: the repacked
    /// kernels must then leave VNNI off too.
    #[test]
    fn the_repacked_kernels_use_vnni_only_where_the_process_runs_the_avx512_kernels() {
        assert!(use_vnni(Isa::Avx512, true));
        assert!(!use_vnni(Isa::Avx512, false));
        assert!(!use_vnni(Isa::Avx2, true));
        assert!(!use_vnni(Isa::Portable, true));
    }
}
