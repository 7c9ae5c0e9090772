//! Prompt rows on Intel AMX (Sapphire Rapids and later): `y = x · Wᵀ` with
//! the tile unit's bf16 dot products, carrying f32 accuracy.
//!
//! AMX multiplies bf16 (8 significant bits) into f32 sums. Every f32
//! activation is split exactly into three bf16 parts (`a = a₀ + a₁ + a₂`,
//! each a truncation of what is left) and every weight into as many parts
//! as its dtype needs (bf16: one, f16: two, f32: three). A product is the
//! sum of the part products `aᵢ·wⱼ` with `i + j ≤ 2`; the terms left out
//! are below 2⁻²³ of it, the size of f32's own rounding. Each part product
//! is exact in f32, so the result differs from an f32 dot product only in
//! rounding; `check-golden` bounds it like any other path.
//!
//! The weights play AMX's "A" operand (16 output features × 32 inputs per
//! tile, packed tile by tile, no transpose) and the activations its "B"
//! operand (pairs of inputs × 16 tokens, packed once per product), so the
//! tiles of C hold outputs × tokens and are transposed on the way out.
//!
//! Every output element is accumulated in the same order — input blocks of
//! 32 ascending, then weight part, then activation part — whatever the
//! number of rows or how they are grouped, so a prompt row gives the same
//! bits alone as in a batch. Rows the model generated, and short prompts,
//! go through the FMA kernels instead (see
//! [`crate::engine::backend::BatchToken::wide`]): the choice follows the sequence
//! and the token, never the batch.

// The tile instructions (inline asm), the kernel's permission for the tile
// state, and writes of disjoint output columns from parallel jobs.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::model::weights::WRows;
use crate::model::weights::{DType, Tensor};

/// Output features per job, a multiple of 32 (two tiles of 16): as many
/// as keep the job's packed weights (`rows × k × parts × 2` bytes) within
/// about half of L2, since every job streams all the packed activations
/// past them (fewer jobs, fewer sweeps), but at least two jobs per thread.
fn panel_rows(kp: usize, parts: usize, total_n: usize) -> usize {
    static FIXED: OnceLock<Option<usize>> = OnceLock::new();
    let fixed = *FIXED.get_or_init(|| {
        std::env::var("COPYHOLD_AMX_PANEL")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let threads = rayon::current_num_threads().max(1);
    let by_cache = (1usize << 20) / (kp * parts * 2);
    let by_jobs = total_n / (2 * threads);
    let rows = fixed.unwrap_or(by_cache.min(by_jobs)).clamp(32, 512);
    rows / 32 * 32
}

/// Whether prompt rows use AMX in this process: the CPU has AMX-BF16, the
/// kernel grants the tile state, and `COPYHOLD_KERNELS` does not ask for
/// another instruction set. Decided once: results must not change from one
/// step to the next.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let asked = std::env::var("COPYHOLD_KERNELS").ok();
        if asked.as_deref().is_some_and(|v| v != "amx")
            || std::env::var_os("COPYHOLD_PORTABLE_KERNELS").is_some()
        {
            return false;
        }
        imp::request()
    })
}

thread_local! {
    static PANEL_BUF: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Activations split into three bf16 parts in AMX's pair layout: tile
/// `(kb, mt)` of part `p` is 16 rows (input pairs `kb·32 + 2i`, `+1`) ×
/// 16 tokens, 1 KiB, contiguous, at [`x_tile`]. A pair of token tiles
/// keeps all its inputs together, so the tiles one pass of the kernel
/// reads are contiguous: spread a power of two apart they would fall into
/// the same few cache sets and thrash L2.
struct PackedX {
    parts: [Vec<u32>; 3],
    kblocks: usize,
    mtiles: usize,
}

/// Split `v` into bf16 parts whose sum is `v` exactly (for finite `v`
/// whose parts are not bf16 subnormals), as the top 16 bits of f32s.
#[inline]
fn split3(v: f32) -> [u16; 3] {
    let h0 = v.to_bits() & 0xFFFF_0000;
    let r0 = v - f32::from_bits(h0);
    let h1 = r0.to_bits() & 0xFFFF_0000;
    let r1 = r0 - f32::from_bits(h1);
    let h2 = r1.to_bits() & 0xFFFF_0000;
    [(h0 >> 16) as u16, (h1 >> 16) as u16, (h2 >> 16) as u16]
}

fn pack_x(x: &[f32], m: usize, k: usize, mut parts: [Vec<u32>; 3]) -> PackedX {
    let kblocks = k.div_ceil(32);
    let kp = kblocks * 32;
    let mtiles = m.div_ceil(32) * 2;
    let len = kblocks * mtiles * 256;
    // Every element is written below (padding tokens as zeros), so a
    // reused buffer needs no clearing.
    for p in parts.iter_mut() {
        p.resize(len, 0);
    }
    let [p0, p1, p2] = &mut parts;
    let (c0, c1, c2) = (
        by_token_tile(p0, mtiles, kblocks),
        by_token_tile(p1, mtiles, kblocks),
        by_token_tile(p2, mtiles, kblocks),
    );
    // Token tiles in parallel: each writes only its own tiles. The tile's
    // 16 tokens are split as rows (vectorized), then their pairs go down
    // the columns of each tile, one tile at a time.
    c0.into_par_iter()
        .zip(c1)
        .zip(c2)
        .enumerate()
        .for_each(|(mt, ((t0, t1), t2))| {
            SPLIT.with(|b| {
                let mut split = b.borrow_mut();
                split.resize_with(16, || [Vec::new(), Vec::new(), Vec::new()]);
                for (j, sp) in split.iter_mut().enumerate() {
                    for part in sp.iter_mut() {
                        // Inputs k..kp are padding: zero, whatever an earlier,
                        // wider product left in this reused row.
                        part.resize(kp, 0);
                        part[k..].fill(0);
                    }
                    let tok = mt * 16 + j;
                    if tok < m {
                        split_row(&x[tok * k..(tok + 1) * k], 3, sp);
                    } else {
                        sp.iter_mut().for_each(|part| part.fill(0));
                    }
                }
                for (p, mut tiles) in [t0, t1, t2].into_iter().enumerate() {
                    for (kb, tile) in tiles.iter_mut().enumerate() {
                        for (j, sp) in split.iter().enumerate() {
                            let pairs: &[u32] = bytemuck::cast_slice(&sp[p][kb * 32..kb * 32 + 32]);
                            for (i, &v) in pairs.iter().enumerate() {
                                tile[i * 16 + j] = v;
                            }
                        }
                    }
                }
            })
        });
    PackedX {
        parts,
        kblocks,
        mtiles,
    }
}

thread_local! {
    /// The activation parts of the last product on this thread, reused.
    static XBUF: RefCell<[Vec<u32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
    /// One token tile's rows, split.
    static SPLIT: RefCell<Vec<[Vec<u16>; 3]>> = const { RefCell::new(Vec::new()) };
}

/// `out[p][i]` = part `p` of `src[i]` (see [`split3`]) for `p < parts`;
/// entries past `src.len()` are left as they are.
fn split_row(src: &[f32], parts: usize, out: &mut [Vec<u16>; 3]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
        // SAFETY: the features were just detected.
        return unsafe { split_row_avx512(src, parts, out) };
    }
    split_row_plain(src, parts, out)
}

#[inline(always)]
fn split_row_plain(src: &[f32], parts: usize, out: &mut [Vec<u16>; 3]) {
    let [o0, o1, o2] = out;
    if parts == 3 {
        for (((v, a), b), c) in src
            .iter()
            .zip(o0.iter_mut())
            .zip(o1.iter_mut())
            .zip(o2.iter_mut())
        {
            [*a, *b, *c] = split3(*v);
        }
    } else if parts == 2 {
        for ((v, a), b) in src.iter().zip(o0.iter_mut()).zip(o1.iter_mut()) {
            let [x, y, _] = split3(*v);
            (*a, *b) = (x, y);
        }
    } else {
        for (v, a) in src.iter().zip(o0.iter_mut()) {
            *a = (v.to_bits() >> 16) as u16;
        }
    }
}

/// The same loops, compiled for AVX-512 so they vectorize 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn split_row_avx512(src: &[f32], parts: usize, out: &mut [Vec<u16>; 3]) {
    split_row_plain(src, parts, out)
}

/// Index (in tiles) of activation tile `(kb, mt)`.
#[inline]
fn x_tile(kb: usize, mt: usize, kblocks: usize) -> usize {
    ((mt / 2) * kblocks + kb) * 2 + mt % 2
}

/// The tiles of each token tile, in order of `kb`.
fn by_token_tile(p: &mut [u32], mtiles: usize, kblocks: usize) -> Vec<Vec<&mut [u32]>> {
    let mut by_mt: Vec<Vec<&mut [u32]>> = (0..mtiles).map(|_| Vec::new()).collect();
    for (t, tile) in p.chunks_mut(256).enumerate() {
        // Inverse of `x_tile`; ascending t gives ascending kb per mt.
        let mt = t / (2 * kblocks) * 2 + t % 2;
        by_mt[mt].push(tile);
    }
    by_mt
}

/// Parts each weight element needs for an exact split.
fn weight_parts(w: &Tensor) -> usize {
    match w.dtype {
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::F32 => 3,
        // Never reaches AMX: `matmul_wt_rows_into` sends block formats to
        // the quantized kernels first.
        DType::Q(_) => 3,
    }
}

/// Pack weight rows `r0..r0 + rows` (zero rows up to `panel`, zero inputs
/// up to whole blocks of 32) as `parts` bf16 planes of whole tiles: tile
/// `(part, nt, kb)` (16 rows × 32 inputs) is 1 KiB, contiguous, at
/// `((part·ntiles + nt)·kblocks + kb)·512`. Contiguous tiles load without
/// the cache-set conflicts of rows a power of two apart.
fn pack_w(
    w: &Tensor,
    r0: usize,
    rows: usize,
    panel: usize,
    parts: usize,
    kp: usize,
    buf: &mut Vec<u16>,
) {
    let k = w.shape[1];
    let (ntiles, kblocks) = (panel / 16, kp / 32);
    buf.clear();
    buf.resize(parts * panel * kp, 0);
    ROW.with(|b| {
        let mut b = b.borrow_mut();
        let (row, split) = &mut *b;
        row.resize(k, 0.0);
        for s in split.iter_mut() {
            // Inputs k..kp are padding: zero, whatever an earlier, wider
            // product left in this reused row; only the first k are written.
            s.resize(kp, 0);
            s[k..].fill(0);
        }
        for r in 0..rows {
            match (w.rows(), parts) {
                (Some(WRows::F16(src)), 2) => {
                    // The common case, straight from the stored bits.
                    let [s0, s1, _] = &mut *split;
                    imp::split_f16(
                        &src[(r0 + r) * k..(r0 + r + 1) * k],
                        &mut s0[..k],
                        &mut s1[..k],
                    );
                }
                _ => {
                    w.read_f32((r0 + r) * k, row);
                    split_row(row, parts, split);
                }
            }
            let (nt, rr) = (r / 16, r % 16);
            for (p, sp) in split.iter().enumerate().take(parts) {
                for kb in 0..kblocks {
                    let at = ((p * ntiles + nt) * kblocks + kb) * 512 + rr * 32;
                    buf[at..at + 32].copy_from_slice(&sp[kb * 32..kb * 32 + 32]);
                }
            }
        }
    });
}

thread_local! {
    static ROW: RefCell<(Vec<f32>, [Vec<u16>; 3])> = const {
        RefCell::new((Vec::new(), [Vec::new(), Vec::new(), Vec::new()]))
    };
}

/// `outs[i]` (`m × n_i`) `= x · W_iᵀ` on AMX, for `x` `m × k` shared by
/// every weight.
///
/// Panics where [`enabled`] is false. Asking it here also makes sure the
/// process has Linux's permission for the tile state before the first tile
/// instruction (without it they fault).
pub fn product(x: &[f32], m: usize, ws: &[&Tensor], outs: &mut [&mut [f32]]) {
    assert!(enabled(), "amx::product on a process without AMX");
    if m == 0 {
        return;
    }
    let k = ws[0].shape[1];
    let px = pack_x(x, m, k, XBUF.with(|b| b.take()));
    let kp = px.kblocks * 32;
    let total_n: usize = ws.iter().map(|w| w.shape[0]).sum();
    // Jobs: (weight, first row, panel rows) for every panel of every weight.
    let jobs: Vec<(usize, usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(wi, w)| {
            let panel = panel_rows(kp, weight_parts(w), total_n);
            (0..w.shape[0].div_ceil(panel)).map(move |p| (wi, p * panel, panel))
        })
        .collect();
    // Each job's outputs: the column range r0..r0+panel of every token row.
    // Columns of one output are disjoint across jobs; write through a raw
    // view (see `OutView`).
    let views: Vec<OutView> = outs
        .iter_mut()
        .map(|o| OutView(o.as_mut_ptr(), o.len()))
        .collect();
    jobs.par_iter().for_each(|&(wi, r0, panel)| {
        let w = ws[wi];
        let n = w.shape[0];
        let rows = panel.min(n - r0);
        let parts = weight_parts(w);
        PANEL_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            pack_w(w, r0, rows, panel, parts, kp, &mut buf);
            imp::panel(&px, &buf, panel, parts, m, rows, views[wi], n, r0);
        });
    });
    XBUF.with(|b| *b.borrow_mut() = px.parts);
}

/// An output written by several jobs at once, each to its own columns
/// `r0..r0 + rows` of every token row.
#[derive(Clone, Copy)]
struct OutView(*mut f32, usize);
// SAFETY: jobs write disjoint elements (see `OutView`), and the outputs
// outlive the parallel loop that holds the views.
unsafe impl Send for OutView {}
unsafe impl Sync for OutView {}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::asm;

    use super::{OutView, PackedX};

    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    /// AMX-TILE and AMX-BF16 in CPUID leaf 7, and Linux's permission for
    /// this process to use the tile state.
    pub fn request() -> bool {
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = (leaf.edx & (1 << 22) != 0, leaf.edx & (1 << 24) != 0);
        if !(bf16 && tile && std::is_x86_feature_detected!("avx512f")) {
            return false;
        }
        // SAFETY: arch_prctl with an integer argument touches no memory.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    /// f16 bits `src` split into two bf16 parts (exact: an f16 has 11
    /// significant bits, the first part takes 8).
    pub fn split_f16(src: &[u16], hi: &mut [u16], lo: &mut [u16]) {
        assert!(hi.len() == src.len() && lo.len() == src.len());
        // SAFETY: AVX-512F is present wherever AMX is enabled (`request`).
        unsafe { split_f16_avx512(src, hi, lo) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn split_f16_avx512(src: &[u16], hi: &mut [u16], lo: &mut [u16]) {
        use std::arch::x86_64::*;
        let n = src.len() / 16 * 16;
        let mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        for c in (0..n).step_by(16) {
            // SAFETY: c + 16 <= n <= len of all three slices (asserted).
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(c) as *const __m256i);
                let f = _mm512_cvtph_ps(h);
                let top = _mm512_and_si512(_mm512_castps_si512(f), mask);
                let rest = _mm512_sub_ps(f, _mm512_castsi512_ps(top));
                let a = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(top));
                let b = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(rest)));
                _mm256_storeu_si256(hi.as_mut_ptr().add(c) as *mut __m256i, a);
                _mm256_storeu_si256(lo.as_mut_ptr().add(c) as *mut __m256i, b);
            }
        }
        for c in n..src.len() {
            let [a, b, _] = super::split3(half::f16::from_bits(src[c]).to_f32());
            (hi[c], lo[c]) = (a, b);
        }
    }

    /// Every tile 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const fn config() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
            c[48 + t] = 16; // rows
            t += 1;
        }
        Config(c)
    }
    static CONFIG: Config = config();

    macro_rules! tload {
        ($t:literal, $ptr:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}]"),
                 p = in(reg) $ptr, s = in(reg) $stride, options(nostack, readonly))
        };
    }
    macro_rules! tdp {
        ($c:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                options(nostack, nomem)
            )
        };
    }
    macro_rules! tstore {
        ($t:literal, $ptr:expr) => {
            asm!(concat!("tilestored [{p} + {s}], tmm", $t),
                 p = in(reg) $ptr, s = in(reg) 64usize, options(nostack))
        };
    }

    #[repr(C, align(64))]
    struct CTile([f32; 256]);

    /// One panel of `rows` weight rows (packed, `parts` planes of
    /// tiles, see `pack_w`) against every token of `px`, written to
    /// `out[tok·ldo + r0 + row]`.
    #[allow(clippy::too_many_arguments)]
    pub fn panel(
        px: &PackedX,
        w: &[u16],
        panel: usize,
        parts: usize,
        m: usize,
        rows: usize,
        out: OutView,
        ldo: usize,
        r0: usize,
    ) {
        assert!(m * ldo <= out.1 && r0 + rows <= ldo);
        let ntiles = panel / 16;
        let mt_stride = 256usize; // u32s per activation tile
        let mut c = [
            CTile([0.0; 256]),
            CTile([0.0; 256]),
            CTile([0.0; 256]),
            CTile([0.0; 256]),
        ];
        // SAFETY: the CPU has AMX (checked by `request` before any call)
        // and every tile load reads 16 rows of 64 bytes inside `w` or
        // `px.parts` (both padded to whole tiles); stores go to `c`.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const Config, options(nostack, readonly));
            for mp in 0..px.mtiles / 2 {
                for np in 0..rows.div_ceil(32) {
                    tdp_zero();
                    for kb in 0..px.kblocks {
                        for j in 0..parts {
                            let wt = w
                                .as_ptr()
                                .add(((j * ntiles + 2 * np) * px.kblocks + kb) * 512);
                            tload!(4, wt, 64usize);
                            tload!(5, wt.add(px.kblocks * 512), 64usize);
                            for i in 0..3 - j {
                                let xt = px.parts[i]
                                    .as_ptr()
                                    .add(super::x_tile(kb, 2 * mp, px.kblocks) * mt_stride);
                                tload!(6, xt, 64usize);
                                tload!(7, xt.add(mt_stride), 64usize);
                                tdp!(0, 4, 6);
                                tdp!(1, 4, 7);
                                tdp!(2, 5, 6);
                                tdp!(3, 5, 7);
                            }
                        }
                    }
                    tstore!(0, c[0].0.as_mut_ptr());
                    tstore!(1, c[1].0.as_mut_ptr());
                    tstore!(2, c[2].0.as_mut_ptr());
                    tstore!(3, c[3].0.as_mut_ptr());
                    // C tile (nt, mt): 16 outputs × 16 tokens.
                    for (t, ct) in c.iter().enumerate() {
                        let (nt, mt) = (t / 2, t % 2);
                        for jj in 0..16 {
                            let tok = (2 * mp + mt) * 16 + jj;
                            if tok >= m {
                                break;
                            }
                            for ii in 0..16 {
                                let r = np * 32 + nt * 16 + ii;
                                if r < rows {
                                    // In bounds by the assert above; no
                                    // other job writes column r0 + r.
                                    out.0.add(tok * ldo + r0 + r).write(ct.0[ii * 16 + jj]);
                                }
                            }
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    #[inline(always)]
    unsafe fn tdp_zero() {
        // SAFETY: tile registers only.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            )
        };
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::{OutView, PackedX};
    pub fn request() -> bool {
        false
    }
    pub fn split_f16(_: &[u16], _: &mut [u16], _: &mut [u16]) {
        unreachable!("AMX is never enabled off x86_64")
    }
    #[allow(clippy::too_many_arguments)]
    pub fn panel(
        _: &PackedX,
        _: &[u16],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: OutView,
        _: usize,
        _: usize,
    ) {
        unreachable!("AMX is never enabled off x86_64")
    }
}
