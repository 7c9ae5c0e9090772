//! Q4_0, Q4_K, Q5_K, Q6_K and Q8_0 weights repacked eight rows at a time
//! for the prompt kernels of [`super::repack_x86`] (llama.cpp's `block_q4_Kx8` idea, in
//! our own layout): per group of eight weight rows and per 256-value
//! block, the eight rows' scales side by side and their quant bytes
//! interleaved four at a time, so one 256-bit vector holds four bytes of
//! each of the eight rows. A broadcast of four activation bytes against it
//! gives, in each 32-bit lane, one (weight row, activation row) pair's
//! partial sum: no horizontal sums, and `vpdpbusd` (VNNI) or
//! `vpmaddubsw` + `vpmaddwd` does the multiply-adds.
//!
//! The integer sums are exact and the float step per block is the
//! portable code's expression per output, in the same block order, so the
//! results have the portable loops' bits, alone or in any batch (the tests
//! below check it).
//!
//! Memory: the repacked copy is made on the first product that meets the
//! tensor (the bench's warm-up, a server's first request) and kept beside
//! the mapped file; Q4_K takes 1184 bytes per 8 rows × 256 values (the
//! file: 1152), Q5_K 1440 (1408), Q6_K and Q8_0 the file's 1680 and 272,
//! Q4_0 the file's 144 per 8 rows × 32 values. Every product then reads the
//! copy, but the file pages read while repacking stay counted in RSS
//! until the kernel reclaims them (they are clean, so it can): peak RSS
//! on the 284 M Q4_K_M file rose from 274 to 503 MiB (`--prompt 16`).

// `tile_into` hands the kernels an output pointer and a row stride: the
// prompt's jobs write their own columns of one output in place.
#![allow(unsafe_code)]

use std::sync::OnceLock;

use rayon::prelude::*;

use super::qdot::QActs;
use crate::model::quant::{QType, scale_min_k4};
use crate::model::weights::Tensor;

/// Weight rows per group.
pub const ROWS: usize = 8;

/// Activation rows from which a product takes the repacked path, unless
/// `COPYHOLD_REPACK_MIN_ROWS` says otherwise: every product, decode too
/// (one row: 54 against 44 tok/s on the 284 M Q4_K_M file with the
/// mapped-block kernels, bench/results/inference-node-gguf.md).
pub const MIN_ROWS: usize = 1;

/// [`MIN_ROWS`] or the environment's figure (decided once).
pub fn min_rows() -> usize {
    static M: OnceLock<usize> = OnceLock::new();
    *M.get_or_init(|| {
        std::env::var("COPYHOLD_REPACK_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MIN_ROWS)
    })
}

/// Q4_K group-block layout, as many bytes as the file's blocks plus 32
/// (decode streams every byte once per token, so the layout is kept
/// tight): `d` and `dmin` as the file's f16 per row, the eight 6-bit
/// scales as bytes (sub-block `s`, row `i` at `8s + i`), the mins as byte
/// pairs (pair `t`, row `i` at `16t + 2i + 0/1`: widened to `i16`, the
/// `vpmaddwd` operands), then the quant bytes eight at a time: pair `j`,
/// chunk `c` (bytes `32j + 8c ..+8` of each row's `qs`) at
/// `64(4j + c) + 8i`, so a row's eight bytes fill two 32-bit lanes and one
/// broadcast of eight activation bytes meets all eight rows.
pub(crate) mod q4k {
    pub const D: usize = 0;
    pub const DMIN: usize = 16;
    pub const SC: usize = 32;
    pub const MN: usize = 96;
    pub const QS: usize = 160;
    pub const STRIDE: usize = QS + 1024;
}

/// Q5_K group-block layout: Q4_K's `d`, `dmin`, scales and mins at the
/// same offsets, then the high bits `qh` eight bytes at a time (chunk `c`,
/// bytes `8c ..+8` of each row's `qh`, at `64c + 8i`: value `l` of
/// sub-block `s` has its fifth bit at bit `s` of `qh[l]`), then the low
/// nibbles as Q4_K's.
pub(crate) mod q5k {
    pub const QH: usize = super::q4k::QS;
    pub const QS: usize = QH + 256;
    pub const STRIDE: usize = QS + 1024;
}

/// Q6_K group-block layout, the file's size: `d` as the file's f16 per
/// row, the sixteen i8 scales as pairs (pair `t`, row `i` at
/// `16t + 2i + 0/1`: widened to `i16`, the `vpmaddwd` operands of the
/// `−32` correction), then per half `n` and chunk `c` three 64-byte
/// vectors: `ql[64n + 8c ..]`, `ql[64n + 32 + 8c ..]` and
/// `qh[32n + 8c ..]` of the eight rows, eight bytes each.
pub(crate) mod q6k {
    pub const D: usize = 0;
    pub const SC: usize = 16;
    pub const Q: usize = 144;
    pub const STRIDE: usize = Q + 2 * 4 * 192;
}

/// Q8_0 group-block layout, the file's size: `d` as the file's f16 per
/// row, then the 32 quants of the eight rows `+ 128` (unsigned, for
/// `vpdpbusd`), eight at a time: chunk `c` (values `8c ..+8`) at `64c + 8i`.
pub(crate) mod q8 {
    pub const D: usize = 0;
    pub const QS: usize = 16;
    pub const STRIDE: usize = QS + 256;
}

/// Q4_0 group-block layout, the file's size: `d` as the file's f16 per
/// row, then the 16 quant bytes of
/// the eight rows, eight at a time: chunk `c` (bytes `8c ..+8`, values
/// `8c ..+8` in the low nibbles and `16 + 8c ..+8` in the high ones) at
/// `64c + 8i`.
pub(crate) mod q40 {
    pub const D: usize = 0;
    pub const QS: usize = 16;
    pub const STRIDE: usize = QS + 128;
}

/// A tensor's rows in the eight-row layout.
#[derive(Debug)]
pub struct Packed {
    pub q: QType,
    /// Weight rows (the last group is padded with zero blocks).
    pub n: usize,
    /// Blocks per row.
    pub nb: usize,
    pub bytes: Vec<u8>,
}

impl Packed {
    /// Bytes of one group's blocks.
    pub fn group_bytes(&self) -> usize {
        self.nb * stride(self.q)
    }
}

fn stride(q: QType) -> usize {
    match q {
        QType::Q4K => q4k::STRIDE,
        QType::Q5K => q5k::STRIDE,
        QType::Q6K => q6k::STRIDE,
        QType::Q8_0 => q8::STRIDE,
        QType::Q4_0 => q40::STRIDE,
    }
}

/// Whether the repacked kernels exist on this machine (for every block
/// format).
pub fn covers() -> bool {
    kernels_available()
}

/// `w`'s repacked rows, made on first call; `None` where not covered.
pub fn packed(w: &Tensor) -> Option<&Packed> {
    let (q, bytes) = w.qrows()?;
    if !covers() || w.shape.len() != 2 {
        return None;
    }
    Some(w.repacked.get_or_init(|| {
        let p = pack(q, bytes, w.shape[0], w.shape[1]);
        w.release_file_pages();
        p
    }))
}

/// Repacks `n` rows of `k` values (`bytes`, the file's blocks).
pub fn pack(q: QType, bytes: &[u8], n: usize, k: usize) -> Packed {
    let (rb, bb) = (q.row_bytes(k), q.block_bytes());
    let nb = rb / bb;
    let mut p = Packed {
        q,
        n,
        nb,
        bytes: Vec::new(),
    };
    let gb = p.group_bytes();
    p.bytes = vec![0u8; n.div_ceil(ROWS) * gb];
    p.bytes.par_chunks_mut(gb).enumerate().for_each(|(g, out)| {
        for i in 0..ROWS.min(n - g * ROWS) {
            let row = &bytes[(g * ROWS + i) * rb..(g * ROWS + i + 1) * rb];
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let o = &mut out[b * stride(q)..(b + 1) * stride(q)];
                match q {
                    QType::Q4K => pack_q4k(blk, i, o),
                    QType::Q5K => pack_q5k(blk, i, o),
                    QType::Q6K => pack_q6k(blk, i, o),
                    QType::Q8_0 => pack_q8_0(blk, i, o),
                    QType::Q4_0 => pack_q4_0(blk, i, o),
                }
            }
        }
    });
    p
}

/// Row `i`'s Q4_K block `blk` into group-block `o`.
fn pack_q4k(blk: &[u8], i: usize, o: &mut [u8]) {
    pack_k_scales(blk, i, o);
    pack_nibbles_k(&blk[16..144], i, &mut o[q4k::QS..]);
}

/// Row `i`'s Q5_K block `blk` into group-block `o`.
fn pack_q5k(blk: &[u8], i: usize, o: &mut [u8]) {
    pack_k_scales(blk, i, o);
    for c in 0..4 {
        let at = q5k::QH + 64 * c + 8 * i;
        o[at..at + 8].copy_from_slice(&blk[16 + 8 * c..][..8]);
    }
    pack_nibbles_k(&blk[48..176], i, &mut o[q5k::QS..]);
}

/// Row `i`'s `d`, `dmin`, scales and mins of a Q4_K or Q5_K block (the
/// same bytes in both) into group-block `o`.
fn pack_k_scales(blk: &[u8], i: usize, o: &mut [u8]) {
    put_f16(o, q4k::D + 2 * i, &blk[0..2]);
    put_f16(o, q4k::DMIN + 2 * i, &blk[2..4]);
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, &blk[4..16]);
        o[q4k::SC + 8 * s + i] = sc;
        o[q4k::MN + 16 * (s / 2) + 2 * i + s % 2] = m;
    }
}

/// Row `i`'s 128 nibble bytes `qs` (Q4_K, Q5_K) into `o`, pair `j`, chunk
/// `c` at `64(4j + c) + 8i`.
fn pack_nibbles_k(qs: &[u8], i: usize, o: &mut [u8]) {
    for j in 0..4 {
        for c in 0..4 {
            let at = 64 * (4 * j + c) + 8 * i;
            o[at..at + 8].copy_from_slice(&qs[32 * j + 8 * c..][..8]);
        }
    }
}

/// Row `i`'s Q6_K block `blk` into group-block `o`.
fn pack_q6k(blk: &[u8], i: usize, o: &mut [u8]) {
    put_f16(o, q6k::D + 2 * i, &blk[208..210]);
    for g in 0..16 {
        o[q6k::SC + 16 * (g / 2) + 2 * i + g % 2] = blk[192 + g];
    }
    for n in 0..2 {
        for c in 0..4 {
            let src = [64 * n + 8 * c, 64 * n + 32 + 8 * c, 128 + 32 * n + 8 * c];
            for (v, s) in src.into_iter().enumerate() {
                let at = q6k::Q + 192 * (4 * n + c) + 64 * v + 8 * i;
                o[at..at + 8].copy_from_slice(&blk[s..s + 8]);
            }
        }
    }
}

/// Row `i`'s Q8_0 block `blk` into group-block `o`.
fn pack_q8_0(blk: &[u8], i: usize, o: &mut [u8]) {
    put_f16(o, q8::D + 2 * i, &blk[0..2]);
    for c in 0..4 {
        for l in 0..8 {
            o[q8::QS + 64 * c + 8 * i + l] = blk[2 + 8 * c + l] ^ 0x80;
        }
    }
}

/// Row `i`'s Q4_0 block `blk` into group-block `o`.
fn pack_q4_0(blk: &[u8], i: usize, o: &mut [u8]) {
    put_f16(o, q40::D + 2 * i, &blk[0..2]);
    for c in 0..2 {
        let at = q40::QS + 64 * c + 8 * i;
        o[at..at + 8].copy_from_slice(&blk[2 + 8 * c..][..8]);
    }
}

/// The file's f16 bits as they are (the kernels widen them with
/// `vcvtph2ps`, exactly as the portable code's `f16_at`).
fn put_f16(o: &mut [u8], at: usize, h: &[u8]) {
    o[at..at + 2].copy_from_slice(h);
}

/// Where a tile's products go: activation row `i`'s, for weight rows
/// `r0..r0 + rows`, at `ptr + i·ldo ..+ rows`.
#[derive(Clone, Copy, Debug)]
pub struct Dst {
    pub ptr: *mut f32,
    pub ldo: usize,
}

/// `out[i·rows + j] = W row (r0 + j) · acts[i]` for `rows` rows from `r0`
/// (`r0` a multiple of [`ROWS`]) on the repacked weights.
pub fn tile(p: &Packed, r0: usize, rows: usize, acts: &[&QActs], out: &mut [f32]) {
    assert!(out.len() >= acts.len() * rows);
    let dst = Dst {
        ptr: out.as_mut_ptr(),
        ldo: rows,
    };
    // SAFETY: `out` holds the `acts.len()` rows of `rows` (checked), and
    // its mutable borrow keeps everything else off them.
    unsafe { tile_into(p, r0, rows, acts, dst) }
}

/// [`tile`] straight into a wider output (the prompt's products, each
/// job its own columns), without a copy through a scratch tile.
///
/// # Safety
/// `dst.ptr + i·dst.ldo + j` must be valid for writes for every
/// `i < acts.len()` and `j < rows`, and nothing else may read or write
/// those elements until this returns.
pub unsafe fn tile_into(p: &Packed, r0: usize, rows: usize, acts: &[&QActs], dst: Dst) {
    assert!(r0.is_multiple_of(ROWS) && r0 + rows <= p.n && (acts.len() < 2 || dst.ldo >= rows));
    let (per_block, sums, pairs) = if p.q.uses_q8k() {
        (256, 16, super::qdot::PAIRS)
    } else {
        (32, 1, 0)
    };
    for a in acts {
        assert!(a.q.len() >= p.nb * per_block && a.d.len() >= p.nb);
        assert!(a.bsums.len() >= p.nb * sums && a.pairs.len() >= p.nb * pairs);
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's promise about `dst`; the lengths checked above.
    unsafe {
        super::repack_x86::tile(p, r0, rows, acts, dst)
    };
}

/// Whether `COPYHOLD_QDOT` (`norepack` or `loops`) turns the repacked
/// path off, to measure it against the kernels on the mapped blocks.
/// Decided once.
pub fn turned_off() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var("COPYHOLD_QDOT").is_ok_and(|v| v == "norepack" || v == "loops")
    })
}

/// Whether this CPU runs [`super::repack_x86`] and the process has not
/// asked for the portable kernels (`COPYHOLD_PORTABLE_KERNELS`).
fn kernels_available() -> bool {
    super::kernel::isa() != super::kernel::Isa::Portable && cpu_runs_kernels()
}

/// Whether this CPU has what [`super::repack_x86`] needs (AVX2, FMA, F16C).
fn cpu_runs_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::kernel::Isa;
    use crate::cpu::matmul::qdot::tests::signal;
    use crate::cpu::matmul::qdot::{quantize_q8_0, quantize_q8_k, tile as qtile};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Rows 0..19 (two groups and a tail of three) against 1..=9 and 17
    /// prompt rows (passes of four or eight and tails), from group 0 and
    /// from group 1: the
    /// repacked kernels give the portable loops' bits, and each prompt row
    /// alone gives the bits it gives in the group.
    #[test]
    fn repacked_kernels_match_the_portable_loops_bit_for_bit_alone_and_in_groups() {
        if !cpu_runs_kernels() {
            eprintln!("no repacked kernels on this machine");
            return;
        }
        let (k, n) = (768, 19);
        for q in [QType::Q4K, QType::Q6K, QType::Q8_0, QType::Q4_0, QType::Q5K] {
            let mut b = Vec::new();
            q.quantize(&signal(n * k, 3.0), &mut b);
            let p = pack(q, &b, n, k);
            let rb = q.row_bytes(k);
            for m in (1..=9).chain([17]) {
                let acts: Vec<QActs> = signal(m * k, 0.7 + m as f32)
                    .chunks(k)
                    .map(if q.uses_q8k() {
                        quantize_q8_k
                    } else {
                        quantize_q8_0
                    })
                    .collect();
                let refs: Vec<&QActs> = acts.iter().collect();
                for (r0, rows) in [(0, n), (8, n - 8), (0, 8)] {
                    let mut want = vec![0.0; m * rows];
                    qtile(
                        q,
                        &b[r0 * rb..(r0 + rows) * rb],
                        rb,
                        &refs,
                        &mut want,
                        Isa::Portable,
                    );
                    let mut got = vec![0.0; m * rows];
                    tile(&p, r0, rows, &refs, &mut got);
                    assert_eq!(bits(&want), bits(&got), "{q:?} m {m} rows {r0}+{rows}");
                    #[cfg(target_arch = "x86_64")]
                    {
                        use super::super::repack_x86::{cpu_has_vnni, tile_in_chunks};
                        // Both builds, with the rows in chunks of one pass
                        // (any byte count under a row's) and of three rows.
                        let row = refs[0].bytes();
                        for vnni in [false, cpu_has_vnni()] {
                            for chunk in [1, 3 * row, usize::MAX] {
                                // Into every other row of a wider output.
                                let ldo = 2 * rows + 1;
                                let mut wide = vec![f32::NAN; m * ldo];
                                let dst = Dst {
                                    ptr: wide.as_mut_ptr(),
                                    ldo,
                                };
                                // SAFETY: `wide` holds `m` rows of `ldo`; VNNI only
                                // where `cpu_has_vnni`.
                                unsafe { tile_in_chunks(&p, r0, rows, &refs, dst, chunk, vnni) };
                                let other: Vec<f32> =
                                    wide.chunks(ldo).flat_map(|r| &r[..rows]).copied().collect();
                                assert!(
                                    wide.chunks(ldo)
                                        .all(|r| r[rows..].iter().all(|v| v.is_nan()))
                                );
                                let how = format!("VNNI {vnni}, chunk {chunk}");
                                assert_eq!(bits(&want), bits(&other), "{q:?} m {m} {how}");
                            }
                        }
                    }
                    for (i, a) in refs.iter().enumerate() {
                        let mut alone = vec![0.0; rows];
                        tile(&p, r0, rows, &[*a], &mut alone);
                        assert_eq!(
                            bits(&alone),
                            bits(&want[i * rows..(i + 1) * rows]),
                            "{q:?} alone {i}"
                        );
                    }
                }
            }
        }
    }
}
