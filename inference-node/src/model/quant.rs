//! GGML block formats (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K): their byte layout,
//! dequantization to f32 and quantization from f32, following llama.cpp's
//! reference code (`ggml-quants.c`) and the `gguf` Python package, so the
//! values match those tools exactly. The dot products on these blocks are
//! in `crate::cpu::matmul::qdot`.

use half::f16;

/// A block-quantized element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

impl QType {
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            QType::Q8_0 | QType::Q4_0 => 32,
            QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Bytes of a row of `k` elements (`k` a multiple of the block).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_elems() * self.block_bytes()
    }

    /// llama.cpp's `ggml_type` number.
    pub fn ggml_type(self) -> u32 {
        match self {
            QType::Q4_0 => 2,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q5K => 13,
            QType::Q6K => 14,
        }
    }

    pub fn from_ggml_type(t: u32) -> Option<QType> {
        Some(match t {
            2 => QType::Q4_0,
            8 => QType::Q8_0,
            12 => QType::Q4K,
            13 => QType::Q5K,
            14 => QType::Q6K,
            _ => return None,
        })
    }

    /// Whether activations are quantized to Q8_K (256) for the dot product,
    /// rather than Q8_0 (32), as llama.cpp pairs them.
    pub fn uses_q8k(self) -> bool {
        matches!(self, QType::Q4K | QType::Q5K | QType::Q6K)
    }

    /// Dequantizes whole blocks `b` into `out` (`out.len()` elements).
    pub fn dequantize(self, b: &[u8], out: &mut [f32]) {
        let (be, bb) = (self.block_elems(), self.block_bytes());
        for (blk, o) in b.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
            match self {
                QType::Q8_0 => dequant_q8_0(blk, o),
                QType::Q4_0 => dequant_q4_0(blk, o),
                QType::Q4K => dequant_q4_k(blk, o),
                QType::Q5K => dequant_q5_k(blk, o),
                QType::Q6K => dequant_q6_k(blk, o),
            }
        }
    }

    /// Quantizes `x` (a multiple of the block) into blocks appended to `out`.
    pub fn quantize(self, x: &[f32], out: &mut Vec<u8>) {
        for blk in x.chunks_exact(self.block_elems()) {
            match self {
                QType::Q8_0 => quant_q8_0(blk, out),
                QType::Q4_0 => quant_q4_0(blk, out),
                QType::Q4K => quant_q45_k(blk, 15, out),
                QType::Q5K => quant_q45_k(blk, 31, out),
                QType::Q6K => quant_q6_k(blk, out),
            }
        }
    }
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn dequant_q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in o.iter_mut().zip(&b[2..34]) {
        *y = d * (q as i8) as f32;
    }
}

fn dequant_q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        o[j] = d * ((q & 0xF) as i32 - 8) as f32;
        o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
    }
}

/// Scale and min of sub-block `j` from the 12 packed 6-bit bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn dequant_q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        for l in 0..32 {
            o[64 * j + l] = d1 * (q[l] & 0xF) as f32 - m1;
            o[64 * j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for j in 0..4 {
        let (s1, m1) = scale_min_k4(2 * j, scales);
        let (s2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let q = &qs[32 * j..32 * j + 32];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            o[64 * j + l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            o[64 * j + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// The 6-bit value `l` (0..128) of half `n` of a Q6_K block, minus 32.
pub(crate) fn q6_value(ql: &[u8], qh: &[u8], l: usize) -> i32 {
    // l = 32·part + i, part 0..4 as llama.cpp's q1..q4.
    let (part, i) = (l / 32, l % 32);
    let lo = match part {
        0 => ql[i] & 0xF,
        1 => ql[i + 32] & 0xF,
        2 => ql[i] >> 4,
        _ => ql[i + 32] >> 4,
    };
    let hi = (qh[i] >> (2 * part)) & 3;
    (lo | (hi << 4)) as i32 - 32
}

fn dequant_q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
        for l in 0..128 {
            let s = sc[8 * n + l / 16] as i8;
            o[128 * n + l] = d * s as f32 * q6_value(ql, qh, l) as f32;
        }
    }
}

fn push_f16(out: &mut Vec<u8>, x: f32) {
    out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
}

/// llama.cpp's `quantize_row_q8_0_ref`.
fn quant_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// llama.cpp's `quantize_row_q4_0_ref`.
fn quant_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let max = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    push_f16(out, d);
    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

/// Packs eight 6-bit scales and mins as llama.cpp's Q4_K/Q5_K do.
fn pack_scales(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Q4_K (`levels` 15) or Q5_K (`levels` 31): per 32 elements an affine
/// scale and min (min-max fit), both stored as 6-bit multiples of the
/// block's f16 `d` and `dmin`. Simpler than llama.cpp's iterative search,
/// the same format.
fn quant_q45_k(x: &[f32], levels: u8, out: &mut Vec<u8>) {
    let mut sc = [0f32; 8];
    let mut mn = [0f32; 8];
    for j in 0..8 {
        let s = &x[32 * j..32 * j + 32];
        let lo = s.iter().fold(0.0f32, |m, &v| m.min(v));
        let hi = s.iter().fold(lo, |m, &v| m.max(v));
        sc[j] = (hi - lo) / levels as f32;
        mn[j] = -lo;
    }
    let max_sc = sc.iter().fold(0.0f32, |m, &v| m.max(v));
    let max_mn = mn.iter().fold(0.0f32, |m, &v| m.max(v));
    let d = f16::from_f32(max_sc / 63.0).to_f32();
    let dmin = f16::from_f32(max_mn / 63.0).to_f32();
    let six = |v: f32, u: f32| {
        if u > 0.0 {
            (v / u).round().clamp(0.0, 63.0) as u8
        } else {
            0
        }
    };
    let ls: [u8; 8] = std::array::from_fn(|j| six(sc[j], d));
    let lm: [u8; 8] = std::array::from_fn(|j| six(mn[j], dmin));
    push_f16(out, d);
    push_f16(out, dmin);
    out.extend_from_slice(&pack_scales(&ls, &lm));
    let mut q = [0u8; QK_K];
    for j in 0..8 {
        let (dj, mj) = (d * ls[j] as f32, dmin * lm[j] as f32);
        for l in 0..32 {
            let v = x[32 * j + l];
            q[32 * j + l] = if dj > 0.0 {
                ((v + mj) / dj).round().clamp(0.0, levels as f32) as u8
            } else {
                0
            };
        }
    }
    if levels == 31 {
        let mut qh = [0u8; 32];
        for j in 0..8 {
            for l in 0..32 {
                if q[32 * j + l] > 15 {
                    qh[l] |= 1 << j;
                }
            }
        }
        out.extend_from_slice(&qh);
    }
    for j in 0..4 {
        for l in 0..32 {
            out.push((q[64 * j + l] & 0xF) | ((q[64 * j + 32 + l] & 0xF) << 4));
        }
    }
}

/// Q6_K: per 16 elements an 8-bit scale (multiple of the block's f16 `d`)
/// and 6-bit signed values.
fn quant_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let mut sc = [0f32; 16];
    for (j, s) in sc.iter_mut().enumerate() {
        let amax = x[16 * j..16 * j + 16]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.abs()));
        *s = amax / 31.0;
    }
    let max_sc = sc.iter().fold(0.0f32, |m, &v| m.max(v));
    let d = f16::from_f32(max_sc / 127.0).to_f32();
    let ls: [i8; 16] = std::array::from_fn(|j| {
        if d > 0.0 {
            (sc[j] / d).round().clamp(-128.0, 127.0) as i8
        } else {
            0
        }
    });
    let mut q = [0u8; QK_K];
    for j in 0..16 {
        let u = d * ls[j] as f32;
        for l in 0..16 {
            let v = if u != 0.0 {
                (x[16 * j + l] / u).round().clamp(-32.0, 31.0) as i32
            } else {
                0
            };
            q[16 * j + l] = (v + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for n in 0..2 {
        for i in 0..32 {
            let at = |part: usize| q[128 * n + 32 * part + i];
            ql[64 * n + i] = (at(0) & 0xF) | ((at(2) & 0xF) << 4);
            ql[64 * n + i + 32] = (at(1) & 0xF) | ((at(3) & 0xF) << 4);
            qh[32 * n + i] =
                (at(0) >> 4) | ((at(1) >> 4) << 2) | ((at(2) >> 4) << 4) | ((at(3) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(ls.iter().map(|&s| s as u8));
    push_f16(out, d);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.731 + seed).sin() * 1.7 + (i as f32 * 0.05).cos()) * 0.3)
            .collect()
    }

    #[test]
    fn every_block_format_round_trips_within_its_precision() {
        let x = signal(512, 0.3);
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (q, tol) in [
            (QType::Q8_0, 0.01),
            (QType::Q4_0, 0.15),
            (QType::Q4K, 0.1),
            (QType::Q5K, 0.05),
            (QType::Q6K, 0.03),
        ] {
            let mut b = Vec::new();
            q.quantize(&x, &mut b);
            assert_eq!(b.len(), q.row_bytes(512), "{q:?}");
            let mut y = vec![0.0; 512];
            q.dequantize(&b, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= tol * amax, "{q:?}: max error {err} of {amax}");
        }
    }
}
