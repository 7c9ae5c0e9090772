//! `y = x · Wᵀ` for block-quantized weights (GGUF), as llama.cpp computes
//! it: each activation row is quantized per block to 8 bits (Q8_0, 32
//! values and an f16 scale, against Q8_0/Q4_0 weights; Q8_K, 256 values,
//! an f32 scale and sums of 16, against Q4_K/Q5_K/Q6_K), and every output
//! is a sum over blocks of an exact integer dot product times the scales.
//!
//! The integer sums are exact, and the float steps per block run in one
//! fixed order, so the AVX-512, AVX2 and portable builds of the same loops
//! (the wide ones are the compiler's vectorization of the portable code
//! under `target_feature`) give the same bits, and an output never depends
//! on the other rows of the batch.

#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::cpu::matmul::kernel::{Isa, isa};
use crate::model::quant::{QK_K, QType, f16_at, scale_min_k4};
use crate::model::weights::Tensor;

/// One activation row quantized to 8 bits per block.
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub q: Vec<i8>,
    /// Per block: the scale (Q8_0's rounded to f16, as llama.cpp stores it).
    pub d: Vec<f32>,
    /// Sums of each 16 values (Q8_K) or of each block of 32 (Q8_0, for
    /// the repacked kernels' offset weights).
    pub bsums: Vec<i32>,
    /// Q8_K only, [`PAIRS`] per block: the sums of 32 (for the K-quants'
    /// mins) two to an `i32`, then the sums of 16 (Q6_K's `−32`) two to
    /// an `i32`, as `i16` halves: the `vpmaddwd` operands of the repacked
    /// kernels, which would otherwise pack them again for every group of
    /// eight weight rows.
    pub pairs: Vec<i32>,
}

/// Words of [`QActs::pairs`] per Q8_K block: four pairs of sums of 32,
/// then eight pairs of sums of 16.
pub const PAIRS: usize = 12;

impl QActs {
    /// Bytes the kernels read of this row.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.d.len() + self.bsums.len() + self.pairs.len())
    }
}

/// Two sums (each `|Σ| ≤ 32·128`, so they fit in `i16`) as the low and
/// high halves of one `i32`.
#[inline(always)]
fn pack_pair(lo: i32, hi: i32) -> i32 {
    ((lo as u16 as u32) | ((hi as u16 as u32) << 16)) as i32
}

/// [`QActs::pairs`] of one Q8_K block from its sixteen sums of 16.
#[inline(always)]
fn push_pairs(bs: &[i32], pairs: &mut Vec<i32>) {
    for t in 0..4 {
        let at = 4 * t;
        pairs.push(pack_pair(bs[at] + bs[at + 1], bs[at + 2] + bs[at + 3]));
    }
    for t in 0..8 {
        pairs.push(pack_pair(bs[2 * t], bs[2 * t + 1]));
    }
}

/// `x.round() as i32` (halves away from zero) for `|x| < 2³¹`, without
/// libm's `roundf` call per value: `x − trunc(x)` is exact, so comparing
/// it with ±0.5 rounds exactly as `round` does, and the loop vectorizes.
#[inline(always)]
fn round_away(x: f32) -> i32 {
    let t = x as i32;
    let d = x - t as f32;
    t + (d >= 0.5) as i32 - (d <= -0.5) as i32
}

/// `q[i] = round_away(s · x[i]).min(top) as i8` (the `as` keeps the low
/// byte), eight values at a time with AVX2 where the kernels use it: the
/// default build targets baseline x86-64, where `as i32`'s saturation
/// left this loop scalar (4 % of a prompt's time).
fn round_into(x: &[f32], s: f32, top: i32, q: &mut [i8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if wide_isa() != Isa::Portable {
        done = x.len() / 8 * 8;
        // SAFETY: `wide_isa` found AVX2.
        unsafe { super::qdot_x86::round_into(&x[..done], s, top, &mut q[..done]) };
    }
    for (q, v) in q[done..].iter_mut().zip(&x[done..]) {
        *q = round_away(s * v).min(top) as i8;
    }
}

/// llama.cpp's `quantize_row_q8_0`: `d = amax / 127` per 32 values.
pub fn quantize_q8_0(x: &[f32]) -> QActs {
    let mut a = QActs {
        q: Vec::with_capacity(x.len()),
        d: Vec::with_capacity(x.len() / 32),
        bsums: Vec::with_capacity(x.len() / 32),
        pairs: Vec::new(),
    };
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        a.d.push(half::f16::from_f32(d).to_f32());
        let start = a.q.len();
        a.q.resize(start + 32, 0);
        round_into(blk, id, i32::MAX, &mut a.q[start..]);
        a.bsums.push(a.q[start..].iter().map(|&v| v as i32).sum());
    }
    a
}

/// llama.cpp's `quantize_row_q8_K`: scale from the value of largest
/// magnitude (`-127 / max`), and the sums of each 16 for the K-quants' mins.
pub fn quantize_q8_k(x: &[f32]) -> QActs {
    let mut a = QActs {
        q: Vec::with_capacity(x.len()),
        d: Vec::with_capacity(x.len() / QK_K),
        bsums: Vec::with_capacity(x.len() / 16),
        pairs: Vec::with_capacity(x.len() / QK_K * PAIRS),
    };
    for blk in x.chunks_exact(QK_K) {
        let max = largest_magnitude(blk);
        if max == 0.0 {
            a.d.push(0.0);
            a.q.extend(std::iter::repeat_n(0, QK_K));
            a.bsums.extend(std::iter::repeat_n(0, QK_K / 16));
            a.pairs.extend(std::iter::repeat_n(0, PAIRS));
            continue;
        }
        let iscale = -127.0 / max;
        let start = a.q.len();
        a.q.resize(start + QK_K, 0);
        round_into(blk, iscale, 127, &mut a.q[start..]);
        for g in a.q[start..].chunks_exact(16) {
            a.bsums.push(g.iter().map(|&v| v as i32).sum());
        }
        push_pairs(&a.bsums[a.bsums.len() - QK_K / 16..], &mut a.pairs);
        a.d.push(1.0 / iscale);
    }
    a
}

/// The first value of largest magnitude (0 if all are zero): what
/// `fold(0, |m, v| if |v| > |m| { v } else { m })` returns, found by a
/// maximum over sixteen lanes (which vectorizes) and one scan for it.
fn largest_magnitude(blk: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for c in blk.chunks_exact(16) {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0.0f32, |m, &v| m.max(v));
    if amax == 0.0 {
        return 0.0;
    }
    blk.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
}

#[inline(always)]
fn dot_i8(w: &[i8], a: &[i8]) -> i32 {
    w.iter().zip(a).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[inline(always)]
fn dot_q8_0(w: &[u8], a: &QActs) -> f32 {
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let q: &[i8] = bytemuck::cast_slice(&blk[2..34]);
        let s = dot_i8(q, &a.q[32 * b..32 * b + 32]);
        sum += s as f32 * (f16_at(blk, 0) * a.d[b]);
    }
    sum
}

#[inline(always)]
fn dot_q4_0(w: &[u8], a: &QActs) -> f32 {
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let av = &a.q[32 * b..32 * b + 32];
        let qs = &blk[2..18];
        let mut s = 0i32;
        for j in 0..16 {
            s += ((qs[j] & 0xF) as i32 - 8) * av[j] as i32;
            s += ((qs[j] >> 4) as i32 - 8) * av[j + 16] as i32;
        }
        sum += s as f32 * (f16_at(blk, 0) * a.d[b]);
    }
    sum
}

/// Q4_K (`five` false) or Q5_K.
#[inline(always)]
fn dot_q45_k(w: &[u8], a: &QActs, five: bool) -> f32 {
    let bb = if five { 176 } else { 144 };
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales = &blk[4..16];
        let (qh, qs) = if five {
            (&blk[16..48], &blk[48..176])
        } else {
            (&blk[0..0], &blk[16..144])
        };
        let av = &a.q[QK_K * b..QK_K * (b + 1)];
        let bs = &a.bsums[16 * b..16 * (b + 1)];
        let (mut sumi, mut summ) = (0i32, 0i32);
        for j in 0..4 {
            let (s1, m1) = scale_min_k4(2 * j, scales);
            let (s2, m2) = scale_min_k4(2 * j + 1, scales);
            let q = &qs[32 * j..32 * j + 32];
            let (lo_a, hi_a) = (&av[64 * j..64 * j + 32], &av[64 * j + 32..64 * j + 64]);
            let (mut lo, mut hi) = (0i32, 0i32);
            if five {
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                for l in 0..32 {
                    let h1 = ((qh[l] & u1 != 0) as i32) << 4;
                    let h2 = ((qh[l] & u2 != 0) as i32) << 4;
                    lo += ((q[l] & 0xF) as i32 + h1) * lo_a[l] as i32;
                    hi += ((q[l] >> 4) as i32 + h2) * hi_a[l] as i32;
                }
            } else {
                for l in 0..32 {
                    lo += (q[l] & 0xF) as i32 * lo_a[l] as i32;
                    hi += (q[l] >> 4) as i32 * hi_a[l] as i32;
                }
            }
            sumi += s1 as i32 * lo + s2 as i32 * hi;
            summ += m1 as i32 * (bs[4 * j] + bs[4 * j + 1])
                + m2 as i32 * (bs[4 * j + 2] + bs[4 * j + 3]);
        }
        sum += (d * a.d[b]) * sumi as f32 - (dmin * a.d[b]) * summ as f32;
    }
    sum
}

#[inline(always)]
fn dot_q6_k(w: &[u8], a: &QActs) -> f32 {
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let av = &a.q[QK_K * b..QK_K * (b + 1)];
        let mut sumi = 0i32;
        for n in 0..2 {
            let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
            for part in 0..4 {
                let (off, shift) = ([0, 32, 0, 32][part], [0, 0, 4, 4][part]);
                for g in 0..2 {
                    let mut s = 0i32;
                    for i in 16 * g..16 * g + 16 {
                        let lo = (ql[off + i] >> shift) & 0xF;
                        let hi = (qh[i] >> (2 * part)) & 3;
                        let v = (lo | (hi << 4)) as i32 - 32;
                        s += v * av[128 * n + 32 * part + i] as i32;
                    }
                    sumi += (sc[8 * n + 2 * part + g] as i8) as i32 * s;
                }
            }
        }
        sum += (f16_at(blk, 208) * a.d[b]) * sumi as f32;
    }
    sum
}

/// `out[j] = W[row j] · a` for the rows of one tile.
#[inline(always)]
fn tile_dots(q: QType, w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb)) {
        *o = match q {
            QType::Q8_0 => dot_q8_0(row, a),
            QType::Q4_0 => dot_q4_0(row, a),
            QType::Q4K => dot_q45_k(row, a, false),
            QType::Q5K => dot_q45_k(row, a, true),
            QType::Q6K => dot_q6_k(row, a),
        };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile_dots_avx2(q: QType, w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
    tile_dots(q, w, rb, a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn tile_dots_avx512(q: QType, w: &[u8], rb: usize, a: &QActs, out: &mut [f32]) {
    tile_dots(q, w, rb, a, out)
}

/// Which build of the loops this process runs.
fn wide_isa() -> Isa {
    static I: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *I.get_or_init(|| match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512
            if std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl") =>
        {
            Isa::Avx512
        }
        Isa::Avx512 | Isa::Avx2 => Isa::Avx2,
        Isa::Portable => Isa::Portable,
    })
}

/// The dot products of `rows` consecutive weight rows (bytes `w`) with one
/// quantized activation row, on the chosen instruction set.
pub fn dots(q: QType, w: &[u8], rb: usize, a: &QActs, out: &mut [f32], with: Isa) {
    match with {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `wide_isa` chose it after detecting the features.
        Isa::Avx512 => unsafe { tile_dots_avx512(q, w, rb, a, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { tile_dots_avx2(q, w, rb, a, out) },
        _ => tile_dots(q, w, rb, a, out),
    }
}

/// Whether `COPYHOLD_QDOT=loops` asks for the auto-vectorized loops alone
/// (the path before the intrinsic kernels, to measure one against the
/// other in the same build; results are the same). Decided once.
fn loops_only() -> bool {
    static L: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *L.get_or_init(|| std::env::var("COPYHOLD_QDOT").is_ok_and(|v| v == "loops"))
}

/// `out[i·rows + j] = W row j · acts[i]` for the weight rows of one tile
/// (`w`, rows of `rb` bytes) on `with`: the intrinsic kernels of
/// [`super::qdot_x86`] (each weight block unpacked once for several
/// activation rows) where they cover the type, the loops above otherwise.
/// Both give the same bits.
pub fn tile(q: QType, w: &[u8], rb: usize, acts: &[&QActs], out: &mut [f32], with: Isa) {
    #[cfg(target_arch = "x86_64")]
    if super::qdot_x86::covers(q) && !loops_only() {
        match with {
            // SAFETY: `wide_isa` chose it after detecting the features.
            Isa::Avx512 => return unsafe { super::qdot_x86::tile_avx512(q, w, rb, acts, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { super::qdot_x86::tile_avx2(q, w, rb, acts, out) },
            Isa::Portable => {}
        }
    }
    let rows = w.len() / rb;
    for (a, o) in acts.iter().zip(out.chunks_exact_mut(rows)) {
        dots(q, w, rb, a, o, with);
    }
}

/// Activations of `m` rows in both 8-bit forms the weights need.
struct Acts {
    q8_0: Vec<QActs>,
    q8_k: Vec<QActs>,
}

impl Acts {
    fn new(x: &[f32], m: usize, k: usize, ws: &[&Tensor]) -> Acts {
        let need = |k_quant: bool| {
            ws.iter()
                .any(|w| w.qrows().is_some_and(|(q, _)| q.uses_q8k() == k_quant))
        };
        let make = |f: fn(&[f32]) -> QActs, on: bool| -> Vec<QActs> {
            if !on {
                return Vec::new();
            }
            if m >= 16 {
                x.par_chunks(k).take(m).map(f).collect()
            } else {
                x.chunks(k).take(m).map(f).collect()
            }
        };
        Acts {
            q8_0: make(quantize_q8_0, need(false)),
            q8_k: make(quantize_q8_k, need(true)),
        }
    }

    fn row(&self, q: QType, i: usize) -> &QActs {
        if q.uses_q8k() {
            &self.q8_k[i]
        } else {
            &self.q8_0[i]
        }
    }
}

/// Weight rows per job: tiles of about 64 KiB of blocks, at least 4 rows,
/// and enough jobs for every thread.
fn tile_rows(n: usize, rb: usize, threads: usize) -> usize {
    let by_bytes = ((64 << 10) / rb.max(1)).max(4);
    let by_jobs = n.div_ceil(threads * 4).max(4);
    by_bytes.min(by_jobs)
}

thread_local! {
    /// Each worker's tile of outputs, kept between calls: a fresh
    /// allocation per tile (over the allocator's mmap threshold at prompt
    /// sizes) cost page faults on every call.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output matrices, written by the jobs in parallel: the job of weight
/// `wi` and rows `r0..r0 + rows` writes only those columns of each row of
/// output `wi`, which no other job writes.
struct Outs(Vec<(*mut f32, usize)>);

// SAFETY: the jobs write disjoint elements (see `Outs`), and the borrows
// the pointers come from outlive the parallel loop.
unsafe impl Sync for Outs {}

impl Outs {
    /// Columns `r0..r0 + rows` of the `m` rows of output `wi` (`n`
    /// columns), for a job to write in place.
    fn columns(&self, wi: usize, n: usize, m: usize, r0: usize, rows: usize) -> super::repack::Dst {
        let (ptr, len) = self.0[wi];
        assert!(m == 0 || (m - 1) * n + r0 + rows <= len);
        super::repack::Dst {
            // Only dereferenced for the `m` rows checked above.
            ptr: ptr.wrapping_add(r0),
            ldo: n,
        }
    }

    /// Copies a job's tile (`m` rows of `rows`) into columns `r0..` of
    /// output `wi` (`n` columns).
    fn put(&self, wi: usize, n: usize, r0: usize, rows: usize, tile: &[f32]) {
        let (ptr, len) = self.0[wi];
        for (i, src) in tile.chunks_exact(rows).enumerate() {
            assert!(i * n + r0 + rows <= len);
            // SAFETY: in bounds (checked), and no other job writes these
            // elements while this one runs.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), ptr.add(i * n + r0), rows) };
        }
    }
}

/// Each weight's repacked rows ([`super::repack`]) where a prompt of `m`
/// rows takes that path, made on first use.
fn repacked<'a>(m: usize, ws: &[&'a Tensor]) -> Vec<Option<&'a super::repack::Packed>> {
    let on = m >= super::repack::min_rows() && !super::repack::turned_off();
    ws.iter()
        .map(|w| if on { super::repack::packed(w) } else { None })
        .collect()
}

/// [`crate::cpu::matmul::matmul_wt_into`] for block-quantized weights
/// (`ws` all quantized, sharing `k`).
pub fn matmul_q_into(x: &[f32], m: usize, ws: &[&Tensor], outs: &mut [&mut [f32]]) {
    let k = ws[0].shape[1];
    let acts = Acts::new(x, m, k, ws);
    let threads = if m < crate::cpu::team::MAX_ROWS {
        crate::cpu::team::Team::global().threads()
    } else {
        rayon::current_num_threads().max(1)
    };
    let with = wide_isa();
    let packed = repacked(m, ws);
    let mut jobs = Vec::new();
    for (wi, w) in ws.iter().enumerate() {
        let Some((q, _)) = w.qrows() else { continue };
        let n = w.shape[0];
        let mut t = tile_rows(n, q.row_bytes(k), threads);
        if packed[wi].is_some() {
            t = t.next_multiple_of(super::repack::ROWS);
        }
        for r0 in (0..n).step_by(t) {
            jobs.push((wi, r0, t.min(n - r0)));
        }
    }
    let dst = Outs(outs.iter_mut().map(|o| (o.as_mut_ptr(), o.len())).collect());
    let job = |&(wi, r0, rows): &(usize, usize, usize)| {
        let Some((q, bytes)) = ws[wi].qrows() else {
            return;
        };
        let rb = q.row_bytes(k);
        let w = &bytes[r0 * rb..(r0 + rows) * rb];
        let rows_of: Vec<&QActs> = (0..m).map(|i| acts.row(q, i)).collect();
        if let Some(p) = packed[wi] {
            let dst = dst.columns(wi, ws[wi].shape[0], m, r0, rows);
            // SAFETY: `columns` checked the bounds; this job alone
            // writes these columns (see `Outs`).
            unsafe { super::repack::tile_into(p, r0, rows, &rows_of, dst) };
            return;
        }
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < m * rows {
                s.resize(m * rows, 0.0);
            }
            let out = &mut s[..m * rows];
            tile(q, w, rb, &rows_of, out, with);
            dst.put(wi, ws[wi].shape[0], r0, rows, out);
        });
    };
    if m < crate::cpu::team::MAX_ROWS {
        crate::cpu::team::Team::global().run(jobs.len(), &|i| job(&jobs[i]));
    } else {
        jobs.par_iter().for_each(job);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A smooth test signal of `n` values (shared with `repack`'s tests).
    pub(crate) fn signal(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + seed).sin() + (i as f32 * 0.013).cos() * 0.5) * 0.2)
            .collect()
    }

    /// Every `h + 0.5` the quantizers can meet (both signs) and the floats
    /// either side of it: where rounding can go either way.
    fn halves_and_neighbours() -> Vec<f32> {
        (-128..128)
            .map(|h| h as f32 + 0.5)
            .flat_map(|x| {
                [
                    x,
                    f32::from_bits(x.to_bits() - 1),
                    f32::from_bits(x.to_bits() + 1),
                ]
            })
            .collect()
    }

    /// The AVX2 rounding loop gives the scalar loop's bytes: halves and
    /// their neighbours, both signs, the `min(top)` cap, and NaN.
    #[test]
    fn round_into_gives_the_scalar_loops_bytes() {
        let mut xs: Vec<f32> = (-1280..=1280).map(|i| i as f32 * 0.1).collect();
        xs.extend(halves_and_neighbours());
        xs.extend([
            0.0,
            -0.0,
            127.4,
            -127.4,
            127.5,
            -127.5,
            f32::NAN,
            0.49999997,
        ]);
        xs.extend([1.0; 5]); // a tail the wide loop leaves
        for (s, top) in [
            (1.0, 127),
            (-1.0, 127),
            (0.999, i32::MAX),
            (-1.0009, i32::MAX),
        ] {
            let mut got = vec![0i8; xs.len()];
            round_into(&xs, s, top, &mut got);
            let want: Vec<i8> = xs
                .iter()
                .map(|v| round_away(s * v).min(top) as i8)
                .collect();
            assert_eq!(got, want, "scale {s}, top {top}");
        }
    }

    /// `round_away` is `round` on every value the quantizers can meet,
    /// halves (both signs) and their neighbours included.
    #[test]
    fn round_away_rounds_halves_away_from_zero_like_round() {
        let mut xs: Vec<f32> = (-1300..=1300).map(|i| i as f32 * 0.1).collect();
        xs.extend(halves_and_neighbours());
        xs.extend([0.0, -0.0, 127.0, -127.0, 0.49999997, -0.49999997]);
        for x in xs {
            assert_eq!(round_away(x), x.round() as i32, "{x}");
        }
    }

    /// The vectorized search finds the value the scalar fold finds: the
    /// first of largest magnitude, either sign, ties and zeros included.
    #[test]
    fn largest_magnitude_is_the_first_value_of_largest_magnitude() {
        let fold = |b: &[f32]| {
            b.iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
        };
        let mut cases = vec![vec![0.0f32; 256], vec![-0.0f32; 256], signal(256, 1.0)];
        let mut tie = signal(256, 2.0);
        tie[17] = 3.0;
        tie[200] = -3.0;
        let mut neg = tie.clone();
        neg[17] = -3.0;
        neg[200] = 3.0;
        cases.extend([tie, neg]);
        for b in cases {
            assert_eq!(largest_magnitude(&b).to_bits(), fold(&b).to_bits());
        }
    }

    /// The intrinsic kernels, which unpack a weight block once for several
    /// activation rows, give the portable loops' bits for every row of a
    /// tile, and a row gives the same bits alone as in a group.
    #[test]
    fn tile_kernels_match_the_portable_loops_bit_for_bit_alone_and_in_groups() {
        let (k, rows, m) = (768, 5, 7);
        for q in [QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q5K, QType::Q6K] {
            let mut b = Vec::new();
            q.quantize(&signal(rows * k, 3.0), &mut b);
            let x = signal(m * k, 0.7);
            let quant = if q.uses_q8k() {
                quantize_q8_k
            } else {
                quantize_q8_0
            };
            let acts: Vec<QActs> = x.chunks(k).map(quant).collect();
            let refs: Vec<&QActs> = acts.iter().collect();
            let rb = q.row_bytes(k);
            let mut portable = vec![0.0; m * rows];
            tile(q, &b, rb, &refs, &mut portable, Isa::Portable);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            // On an AVX-512 machine the AVX2 build runs too.
            let mut isas = vec![wide_isa()];
            if wide_isa() == Isa::Avx512 {
                isas.push(Isa::Avx2);
            }
            for with in isas {
                let mut wide = vec![0.0; m * rows];
                tile(q, &b, rb, &refs, &mut wide, with);
                assert_eq!(bits(&portable), bits(&wide), "{q:?} {with:?}");
                for (i, a) in refs.iter().enumerate() {
                    let mut alone = vec![0.0; rows];
                    tile(q, &b, rb, &[*a], &mut alone, with);
                    let want = &portable[i * rows..(i + 1) * rows];
                    assert_eq!(bits(&alone), bits(want), "{q:?} {with:?} row {i}");
                }
            }
        }
    }

    /// The quantized dot product is close to the f32 dot product of the
    /// dequantized weights, and every instruction set gives the same bits.
    #[test]
    fn quantized_dots_match_dequantized_weights_on_every_instruction_set() {
        let k = 512;
        let rows = 8;
        let x = signal(k, 0.1);
        for q in [QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q5K, QType::Q6K] {
            let w = signal(rows * k, 2.0);
            let mut b = Vec::new();
            q.quantize(&w, &mut b);
            let mut wd = vec![0.0; rows * k];
            q.dequantize(&b, &mut wd);
            let a = if q.uses_q8k() {
                quantize_q8_k(&x)
            } else {
                quantize_q8_0(&x)
            };
            let mut portable = vec![0.0; rows];
            dots(q, &b, q.row_bytes(k), &a, &mut portable, Isa::Portable);
            let mut wide = vec![0.0; rows];
            dots(q, &b, q.row_bytes(k), &a, &mut wide, wide_isa());
            assert_eq!(
                portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{q:?}"
            );
            for (r, got) in portable.iter().enumerate() {
                let want: f32 = wd[r * k..(r + 1) * k]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| a * b)
                    .sum();
                let scale: f32 = wd[r * k..(r + 1) * k]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!(
                    (got - want).abs() <= 0.02 * scale,
                    "{q:?} row {r}: {got} vs {want}"
                );
            }
        }
    }
}
