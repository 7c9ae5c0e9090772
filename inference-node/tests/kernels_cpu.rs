//! Every CUDA kernel of `inference-node/kernels`, run on the CPU under
//! CUDA's execution model and compared with the CPU backend.
//!
//! The `.cu` files compile as C++ (g++) against `kernels/cpu-sim/cuda_cpu.h`,
//! which runs each block's threads as fibers with real barriers, warps of
//! 32 with shuffles and ballots, block-local shared memory and atomics (see
//! that header). The library is built once per `__CUDA_ARCH__` (600: the
//! Pascal paths, 800: the bf16 and dp4a intrinsics' paths) into the test
//! target folder and loaded with `libloading`; nothing of it is in the node
//! binary.
//!
//! Every launch runs in checking mode (shared memory NaN-filled before each
//! block, threads and blocks in a seeded random order) twice, with two
//! seeds, and the two results must be bit-identical: a read of unwritten
//! shared memory or a missing barrier changes them. Each passing kernel ×
//! shape prints one `PASS` line (nextest shows them: .config/nextest.toml).

use std::collections::HashMap;
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use copyhold_node::cpu::attention::{KvStore, paged_attention};
use copyhold_node::cpu::layers::{apply_rope, rope_rows};
use copyhold_node::cpu::matmul::matmul_wt;
use copyhold_node::cuda::plan::{self, StepLayout};
use copyhold_node::engine::backend::{Batch, BatchToken};
use copyhold_node::engine::sampling::{Rng, SamplingParams, argmax, sample};
use copyhold_node::model::layers::RmsNorm;
use copyhold_node::model::quant::QType;
use copyhold_node::model::weights::{DType, Tensor, WeightStore};
use half::{bf16, f16};

// ---- the simulator library ---------------------------------------------------------

/// `cusim::Cfg` (kernels/cpu-sim/cuda_cpu.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Cfg {
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    smem_limit: u32,
    seed: u64,
    check: u32,
    workers: u32,
}

impl Cfg {
    fn new(grid: (u32, u32, u32), block: u32, dyn_smem: usize) -> Cfg {
        Cfg {
            grid: [grid.0.max(1), grid.1.max(1), grid.2.max(1)],
            block: [block, 1, 1],
            dyn_smem: dyn_smem as u32,
            smem_limit: 48 * 1024,
            seed: 1,
            check: 1,
            workers: 2,
        }
    }
    fn d1(n: usize, threads: u32) -> Cfg {
        Cfg::new(((n as u32).div_ceil(threads).max(1), 1, 1), threads, 0)
    }
}

struct Sim {
    lib: libloading::Library,
    arch: u32,
}

/// What a successful launch reported.
#[derive(Debug, Clone, Copy)]
struct Launched {
    static_smem: u32,
}

const ARCHS: [u32; 2] = [600, 800];

/// The kernels under test: `inference-node/kernels`, or the folder in
/// `COPYHOLD_SIM_KERNELS` (to run these tests against another version of
/// them, e.g. the one before a fix).
fn kernels_dir() -> PathBuf {
    match std::env::var_os("COPYHOLD_SIM_KERNELS") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels"),
    }
}

/// Compiles the simulator library for `arch` unless a build of the same
/// sources exists (keyed by their hash; written under a temporary name and
/// renamed, so concurrent test processes never load a partial file).
fn build(arch: u32) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let dir = kernels_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .chain(std::fs::read_dir(dir.join("cpu-sim")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in &files {
        std::fs::read(f).unwrap().hash(&mut h);
    }
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let out = out_dir.join(format!("cusim-sm{arch}-{:016x}.so", h.finish()));
    if out.exists() {
        return out;
    }
    let tmp = out_dir.join(format!("cusim-sm{arch}-{}.so.tmp", std::process::id()));
    let status = std::process::Command::new(std::env::var("CXX").unwrap_or_else(|_| "g++".into()))
        .args([
            "-std=c++20",
            "-O2",
            "-g",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Wno-sign-compare",
            "-Wno-parentheses",
            "-Wno-unknown-pragmas",
            // CUDA code reinterprets loads (uint4 as __half2[4]); nvcc allows it.
            "-fno-strict-aliasing",
            &format!("-D__CUDA_ARCH__={arch}"),
            "-o",
        ])
        .arg(&tmp)
        .arg(dir.join("cpu-sim/launchers.cpp"))
        .arg("-lpthread")
        .status()
        .expect("g++ runs (the CPU kernel tests compile the .cu files with it)");
    assert!(status.success(), "compiling the kernels for the CPU failed");
    std::fs::rename(&tmp, &out).unwrap();
    out
}

fn sim(arch: u32) -> &'static Sim {
    static SIMS: OnceLock<Mutex<HashMap<u32, &'static Sim>>> = OnceLock::new();
    let mut map = SIMS.get_or_init(Default::default).lock().unwrap();
    map.entry(arch).or_insert_with(|| {
        let path = build(arch);
        // SAFETY: our own library; its initializers only set up statics.
        let lib = unsafe { libloading::Library::new(&path) }.unwrap();
        Box::leak(Box::new(Sim { lib, arch }))
    })
}

impl Sim {
    fn result(&self, name: &str, rc: i32) -> Result<Launched, String> {
        // SAFETY: the symbols exist in every build (launchers.cpp).
        unsafe {
            let err: libloading::Symbol<unsafe extern "C" fn() -> *const std::ffi::c_char> =
                self.lib.get(b"sim_last_error\0").unwrap();
            let st: libloading::Symbol<unsafe extern "C" fn() -> u32> =
                self.lib.get(b"sim_last_static_smem\0").unwrap();
            if rc != 0 {
                let msg = CStr::from_ptr(err()).to_string_lossy().into_owned();
                return Err(format!("{name} (sm_{}): {msg}", self.arch / 10));
            }
            Ok(Launched { static_smem: st() })
        }
    }
}

/// Launches `sim_NAME(cfg, args...)`; the argument types are the `.cu`
/// signature's.
macro_rules! launch {
    ($sim:expr, $name:literal, $cfg:expr; $($arg:expr => $ty:ty),* $(,)?) => {{
        let s: &Sim = $sim;
        let cfg: Cfg = $cfg;
        // SAFETY: the launcher's C signature is (const Cfg*, the listed types).
        let rc = unsafe {
            let f: libloading::Symbol<unsafe extern "C" fn(*const Cfg, $($ty),*) -> i32> =
                s.lib.get(concat!("sim_", $name, "\0").as_bytes()).unwrap();
            f(&cfg, $($arg),*)
        };
        s.result($name, rc)
    }};
}

/// Runs `f(seed)` with two seeds; the results must be bit-identical.
fn twice<T: PartialEq + std::fmt::Debug>(what: &str, f: impl Fn(u64) -> T) -> T {
    let a = f(1);
    let b = f(0x5eed_0002);
    assert!(a == b, "{what}: results depend on thread order");
    a
}

fn pass(kernel: &str, arch: u32, shape: &str, err: f64) {
    println!(
        "PASS {kernel:<24} sm_{:<3} {shape:<44} max err {err:.1e}",
        arch / 10
    );
}

// ---- inputs and references ---------------------------------------------------------

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| ((r.next_f64() * 2.0 - 1.0) as f32) * scale)
        .collect()
}

/// Largest |a - b| / (1 + |b|).
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x - y).abs() / (1.0 + y.abs())) as f64)
        .fold(0.0, f64::max)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) -> f64 {
    let e = max_rel(got, want);
    assert!(e <= tol, "{what}: max relative error {e:e} > {tol:e}");
    e
}

/// A tensor as the CPU backend loads it: written to a safetensors file in
/// `dtype` and mapped back.
fn tensor(dtype: safetensors::Dtype, shape: &[usize], data: &[f32]) -> Tensor {
    let bytes: Vec<u8> = match dtype {
        safetensors::Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        safetensors::Dtype::F16 => data
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        safetensors::Dtype::BF16 => data
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    };
    let dir = tempdir();
    let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), &bytes).unwrap();
    safetensors::serialize_to_file([("w", view)], None, &dir.join("model.safetensors")).unwrap();
    let t = WeightStore::open(&dir).unwrap().get("w", shape).unwrap();
    // The mapping outlives the file.
    std::fs::remove_dir_all(&dir).unwrap();
    t
}

fn tempdir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "kernels-cpu-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The stored 16-bit patterns of `data` in `dtype`.
fn bits16(dtype: safetensors::Dtype, data: &[f32]) -> Vec<u16> {
    match dtype {
        safetensors::Dtype::F16 => data.iter().map(|v| f16::from_f32(*v).to_bits()).collect(),
        safetensors::Dtype::BF16 => data.iter().map(|v| bf16::from_f32(*v).to_bits()).collect(),
        other => panic!("{other:?}"),
    }
}

// ---- elementwise, norm, RoPE, embedding --------------------------------------------

#[test]
fn embedding_gathers_the_rows_the_cpu_backend_reads() {
    use safetensors::Dtype as D;
    for arch in ARCHS {
        let s = sim(arch);
        for (dt, name) in [
            (D::F32, "embedding_f32"),
            (D::F16, "embedding_f16"),
            (D::BF16, "embedding_bf16"),
        ] {
            let (vocab, hidden) = (37, 45);
            let table = values(vocab * hidden, 3, 2.0);
            let t = tensor(dt, &[vocab, hidden], &table);
            let ids: Vec<u32> = vec![0, 36, 5, 5, 17, 1000];
            let m = ids.len();
            let mut want = vec![0.0f32; m * hidden];
            for (r, &id) in ids.iter().enumerate() {
                if (id as usize) < vocab {
                    t.read_f32(
                        id as usize * hidden,
                        &mut want[r * hidden..(r + 1) * hidden],
                    );
                }
            }
            let got = twice(name, |seed| {
                let mut out = vec![f32::NAN; m * hidden];
                let cfg = Cfg {
                    seed,
                    ..Cfg::d1(m * hidden, 256)
                };
                let (mi, hi, vi) = (m as i32, hidden as i32, vocab as i32);
                let r = match dt {
                    D::F32 => {
                        launch!(s, "embedding_f32", cfg; table.as_ptr() => *const f32, ids.as_ptr() => *const u32, out.as_mut_ptr() => *mut f32, mi => i32, hi => i32, vi => i32)
                    }
                    _ => {
                        let b = bits16(dt, &table);
                        if dt == D::F16 {
                            launch!(s, "embedding_f16", cfg; b.as_ptr() => *const u16, ids.as_ptr() => *const u32, out.as_mut_ptr() => *mut f32, mi => i32, hi => i32, vi => i32)
                        } else {
                            launch!(s, "embedding_bf16", cfg; b.as_ptr() => *const u16, ids.as_ptr() => *const u32, out.as_mut_ptr() => *mut f32, mi => i32, hi => i32, vi => i32)
                        }
                    }
                };
                r.unwrap();
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            });
            let got: Vec<f32> = got.into_iter().map(f32::from_bits).collect();
            let e = assert_close(name, &got, &want, 0.0);
            pass(
                name,
                arch,
                &format!("vocab {vocab} hidden {hidden} m {m} (an id past vocab)"),
                e,
            );
        }
    }
}

#[test]
fn add_rmsnorm_matches_the_cpu_residual_add_and_norm() {
    for arch in ARCHS {
        let s = sim(arch);
        for (m, d, with_delta) in [
            (1, 64, false),
            (3, 77, true),
            (2, 1000, true),
            (1, 31, true),
        ] {
            let x0 = values(m * d, 5, 3.0);
            let delta = values(m * d, 6, 1.0);
            let w = values(d, 7, 1.5);
            let norm = RmsNorm {
                w: w.clone(),
                eps: 1e-5,
            };
            let mut x_ref = x0.clone();
            if with_delta {
                for (a, b) in x_ref.iter_mut().zip(&delta) {
                    *a += b;
                }
            }
            let mut want = vec![0.0; m * d];
            norm.forward_into(&x_ref, &mut want);
            let (xg, out) = twice("add_rmsnorm", |seed| {
                let mut x = x0.clone();
                let mut out = vec![f32::NAN; m * d];
                let cfg = Cfg {
                    seed,
                    ..Cfg::new((m as u32, 1, 1), 256, 0)
                };
                let dp = if with_delta {
                    delta.as_ptr()
                } else {
                    std::ptr::null()
                };
                launch!(s, "add_rmsnorm", cfg; x.as_mut_ptr() => *mut f32, dp => *const f32, w.as_ptr() => *const f32, out.as_mut_ptr() => *mut f32, d as i32 => i32, 1e-5f32 => f32).unwrap();
                (bits(&x), bits(&out))
            });
            assert_close("add_rmsnorm residual", &unbits(&xg), &x_ref, 0.0);
            let e = assert_close("add_rmsnorm", &unbits(&out), &want, 2e-6);
            pass(
                "add_rmsnorm",
                arch,
                &format!("m {m} d {d} delta {with_delta}"),
                e,
            );
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
fn unbits(v: &[u32]) -> Vec<f32> {
    v.iter().map(|x| f32::from_bits(*x)).collect()
}

#[test]
fn rope_table_and_rotation_match_the_cpu_rotary_embedding() {
    for arch in ARCHS {
        let s = sim(arch);
        for (heads, hd, positions) in [(3, 64, vec![0usize, 1, 7, 300]), (2, 80, vec![5, 4097, 33])]
        {
            let half = hd / 2;
            let inv_freq: Vec<f64> = (0..half)
                .map(|i| 10000f64.powf(-((2 * i) as f64) / hd as f64))
                .collect();
            let m = positions.len();
            let x0 = values(m * heads * hd, 11, 2.0);
            let rows = rope_rows(&inv_freq, &positions);
            let mut want = x0.clone();
            for (t, r) in rows.iter().enumerate() {
                apply_rope(
                    &mut want[t * heads * hd..(t + 1) * heads * hd],
                    heads,
                    hd,
                    r,
                );
            }
            let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
            let got = twice("rope", |seed| {
                let (mut c, mut sn) = (vec![f32::NAN; m * half], vec![f32::NAN; m * half]);
                let cfg = Cfg {
                    seed,
                    ..Cfg::d1(m * half, 256)
                };
                launch!(s, "rope_table", cfg; pos.as_ptr() => *const i32, inv_freq.as_ptr() => *const f64, c.as_mut_ptr() => *mut f32, sn.as_mut_ptr() => *mut f32, m as i32 => i32, half as i32 => i32).unwrap();
                let mut x = x0.clone();
                let cfg = Cfg {
                    seed,
                    ..Cfg::d1(m * heads * half, 256)
                };
                launch!(s, "rope_apply", cfg; x.as_mut_ptr() => *mut f32, c.as_ptr() => *const f32, sn.as_ptr() => *const f32, m as i32 => i32, heads as i32 => i32, hd as i32 => i32, 0i32 => i32).unwrap();
                bits(&x)
            });
            let e = assert_close("rope", &unbits(&got), &want, 1e-6);
            pass(
                "rope_table+rope_apply",
                arch,
                &format!("heads {heads} head_dim {hd} positions {positions:?}"),
                e,
            );
        }
    }
}

#[test]
fn elementwise_kernels_match_their_cpu_counterparts() {
    for arch in ARCHS {
        let s = sim(arch);
        for n in [1usize, 255, 257, 1000] {
            let g0 = values(n, 21, 6.0);
            let u = values(n, 22, 2.0);
            let mut want = g0.clone();
            copyhold_node::cpu::layers::silu_mul(&mut want, &u);
            let got = twice("silu_mul", |seed| {
                let mut g = g0.clone();
                launch!(s, "silu_mul", Cfg { seed, ..Cfg::d1(n, 256) }; g.as_mut_ptr() => *mut f32, u.as_ptr() => *const f32, n => usize).unwrap();
                bits(&g)
            });
            let e = assert_close("silu_mul", &unbits(&got), &want, 1e-6);
            pass("silu_mul", arch, &format!("n {n}"), e);

            let want: Vec<f32> = g0.iter().zip(&u).map(|(a, b)| a + b).collect();
            let got = twice("add_inplace", |seed| {
                let mut x = g0.clone();
                launch!(s, "add_inplace", Cfg { seed, ..Cfg::d1(n, 256) }; x.as_mut_ptr() => *mut f32, u.as_ptr() => *const f32, n => usize).unwrap();
                bits(&x)
            });
            pass(
                "add_inplace",
                arch,
                &format!("n {n}"),
                assert_close("add_inplace", &unbits(&got), &want, 0.0),
            );

            // Casts: exactly half's round-to-nearest-even, overflow to inf.
            let mut big = g0.clone();
            big[0] = 70000.0;
            if n > 1 {
                big[n - 1] = -1e-8;
            }
            let want16: Vec<u16> = big.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
            let wantb: Vec<u16> = big.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
            let (h, b) = twice("casts", |seed| {
                let (mut h, mut b) = (vec![0u16; n], vec![0u16; n]);
                let mut overflow = 0i32;
                launch!(s, "cast_f32_f16", Cfg { seed, ..Cfg::d1(n, 256) }; big.as_ptr() => *const f32, h.as_mut_ptr() => *mut u16, n => usize, &mut overflow as *mut i32 => *mut i32).unwrap();
                assert_eq!(overflow, 1, "70000 overflows f16");
                launch!(s, "cast_f32_bf16", Cfg { seed, ..Cfg::d1(n, 256) }; big.as_ptr() => *const f32, b.as_mut_ptr() => *mut u16, n => usize).unwrap();
                (h, b)
            });
            assert_eq!(h, want16, "cast_f32_f16");
            assert_eq!(b, wantb, "cast_f32_bf16");
            pass("cast_f32_f16", arch, &format!("n {n} (70000 -> inf)"), 0.0);
            pass("cast_f32_bf16", arch, &format!("n {n}"), 0.0);
        }
        for (m, n, d) in [(3usize, 5usize, 77usize), (1, 1, 1), (9, 4, 300)] {
            let y0 = values(m * n, 31, 1.0);
            let bias = values(n, 32, 1.0);
            let want: Vec<f32> = y0
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias[i % n])
                .collect();
            let got = twice("add_bias", |seed| {
                let mut y = y0.clone();
                launch!(s, "add_bias", Cfg { seed, ..Cfg::d1(m * n, 256) }; y.as_mut_ptr() => *mut f32, bias.as_ptr() => *const f32, m as i32 => i32, n as i32 => i32).unwrap();
                bits(&y)
            });
            pass(
                "add_bias",
                arch,
                &format!("m {m} n {n}"),
                assert_close("add_bias", &unbits(&got), &want, 0.0),
            );
            let src = values(m * d, 33, 1.0);
            let rows: Vec<i32> = (0..m as i32).rev().step_by(2).collect();
            let want: Vec<f32> = rows
                .iter()
                .flat_map(|&r| src[r as usize * d..(r as usize + 1) * d].to_vec())
                .collect();
            let got = twice("gather_rows", |seed| {
                let mut dst = vec![f32::NAN; rows.len() * d];
                launch!(s, "gather_rows", Cfg { seed, ..Cfg::d1(rows.len() * d, 256) }; src.as_ptr() => *const f32, rows.as_ptr() => *const i32, dst.as_mut_ptr() => *mut f32, rows.len() as i32 => i32, d as i32 => i32).unwrap();
                bits(&dst)
            });
            pass(
                "gather_rows",
                arch,
                &format!("rows {rows:?} d {d}"),
                assert_close("gather_rows", &unbits(&got), &want, 0.0),
            );
        }
    }
}

// ---- GEMV --------------------------------------------------------------------------------

#[test]
fn gemv_matches_the_cpu_matmul_for_every_weight_dtype_and_tail_shape() {
    use safetensors::Dtype as D;
    for arch in ARCHS {
        let s = sim(arch);
        // k % 8 == 0 takes the 16-byte path; other k the scalar one. n not a
        // multiple of the 8 rows per block; m from 1 to 8 activation rows.
        for (m, n, k) in [
            (1usize, 13usize, 40usize),
            (3, 9, 37),
            (8, 17, 264),
            (5, 1, 8),
            (2, 33, 1),
            // Through the unrolled body (two 16-byte loads a lane) and its tail.
            (4, 11, 1288),
            (1, 8, 768),
        ] {
            let x = values(m * k, 41, 1.0);
            let w = values(n * k, 42, 0.5);
            let bias = values(n, 43, 0.1);
            for (dt, name) in [
                (D::F32, "gemv_f32"),
                (D::F16, "gemv_f16"),
                (D::BF16, "gemv_bf16"),
            ] {
                let t = tensor(dt, &[n, k], &w);
                let mut want = matmul_wt(&x, m, &t);
                for (i, v) in want.iter_mut().enumerate() {
                    *v += bias[i % n];
                }
                let bits_w = if dt == D::F32 {
                    Vec::new()
                } else {
                    bits16(dt, &w)
                };
                let got = twice(name, |seed| {
                    let mut y = vec![f32::NAN; m * n];
                    let cfg = Cfg {
                        seed,
                        ..Cfg::new(((n as u32).div_ceil(8), 1, 1), 256, 0)
                    };
                    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
                    match dt {
                        D::F32 => launch!(s, "gemv_f32", cfg; x.as_ptr() => *const f32, w.as_ptr() => *const f32, bias.as_ptr() => *const f32, y.as_mut_ptr() => *mut f32, mi => i32, ni => i32, ki => i32),
                        D::F16 => launch!(s, "gemv_f16", cfg; x.as_ptr() => *const f32, bits_w.as_ptr() => *const u16, bias.as_ptr() => *const f32, y.as_mut_ptr() => *mut f32, mi => i32, ni => i32, ki => i32),
                        _ => launch!(s, "gemv_bf16", cfg; x.as_ptr() => *const f32, bits_w.as_ptr() => *const u16, bias.as_ptr() => *const f32, y.as_mut_ptr() => *mut f32, mi => i32, ni => i32, ki => i32),
                    }
                    .unwrap();
                    bits(&y)
                });
                let e = assert_close(name, &unbits(&got), &want, 1e-5);
                pass(name, arch, &format!("m {m} n {n} k {k}"), e);
            }
        }
        // Int8: exact integer sums.
        for (n, k) in [(5usize, 4usize), (13, 132)] {
            let xq: Vec<i8> = (0..k).map(|i| ((i * 37) % 255) as i8).collect();
            let wq: Vec<i8> = (0..n * k).map(|i| ((i * 91 + 7) % 251) as i8).collect();
            let wscale = values(n, 44, 1.0);
            let xscale = 0.03f32;
            let want: Vec<f32> = (0..n)
                .map(|j| {
                    let acc: i32 = (0..k).map(|i| xq[i] as i32 * wq[j * k + i] as i32).sum();
                    acc as f32 * xscale * wscale[j]
                })
                .collect();
            let got = twice("gemv_q8", |seed| {
                let mut y = vec![f32::NAN; n];
                let cfg = Cfg {
                    seed,
                    ..Cfg::new(((n as u32).div_ceil(8), 1, 1), 256, 0)
                };
                launch!(s, "gemv_q8", cfg; xq.as_ptr() as *const i32 => *const i32, xscale => f32, wq.as_ptr() as *const i32 => *const i32, wscale.as_ptr() => *const f32, y.as_mut_ptr() => *mut f32, n as i32 => i32, k as i32 => i32).unwrap();
                bits(&y)
            });
            let e = assert_close("gemv_q8", &unbits(&got), &want, 0.0);
            pass("gemv_q8", arch, &format!("n {n} k {k}"), e);
        }
    }
}

// ---- GGUF Q8_0 blocks ------------------------------------------------------------------

/// `w` (`n × k`) quantized to GGUF Q8_0 blocks by the loader's own
/// quantizer, as a tensor the CPU backend computes on.
fn q8_0_tensor(n: usize, k: usize, w: &[f32]) -> Tensor {
    let mut bytes = Vec::new();
    QType::Q8_0.quantize(w, &mut bytes);
    let len = bytes.len();
    Tensor::new(
        "w".into(),
        DType::Q(QType::Q8_0),
        vec![n, k],
        std::sync::Arc::new(bytes),
        0,
        len,
    )
}

#[test]
fn q8_0_gemv_matches_the_cpu_backends_q8_0_matmul_for_tail_shapes() {
    for arch in ARCHS {
        let s = sim(arch);
        // n not a multiple of the 8 rows per block; m from 1 to 8; k from
        // one block to more blocks than a warp has lanes; with and without
        // a bias.
        for (m, n, k, with_bias) in [
            (1usize, 13usize, 32usize, true),
            (3, 9, 96, true),
            (8, 17, 1088, true),
            (5, 1, 64, false),
            (2, 33, 2048, true),
        ] {
            let x = values(m * k, 51, 1.0);
            let w = values(n * k, 52, 0.5);
            let bias = values(n, 53, 0.1);
            let t = q8_0_tensor(n, k, &w);
            let mut want = matmul_wt(&x, m, &t);
            if with_bias {
                for (i, v) in want.iter_mut().enumerate() {
                    *v += bias[i % n];
                }
            }
            let bias_ptr = if with_bias {
                bias.as_ptr()
            } else {
                std::ptr::null()
            };
            let got = twice("gemv_q8_0", |seed| {
                let mut y = vec![f32::NAN; m * n];
                let cfg = Cfg {
                    seed,
                    ..Cfg::new(((n as u32).div_ceil(8), 1, 1), 256, 0)
                };
                launch!(s, "gemv_q8_0", cfg; x.as_ptr() => *const f32, t.bytes().as_ptr() => *const u8, bias_ptr => *const f32, y.as_mut_ptr() => *mut f32, m as i32 => i32, n as i32 => i32, k as i32 => i32).unwrap();
                bits(&y)
            });
            // The same 8-bit activations, integer sums and per-block
            // products as the CPU; only the order of the f32 sum over
            // blocks differs (lanes, then the warp).
            let e = assert_close("gemv_q8_0", &unbits(&got), &want, 1e-5);
            pass(
                "gemv_q8_0",
                arch,
                &format!("m {m} n {n} k {k} bias {with_bias}"),
                e,
            );
        }
    }
}

#[test]
fn fused_q8_0_gemv_matches_three_separate_cpu_q8_0_projections() {
    for arch in ARCHS {
        let s = sim(arch);
        for (m, k, ns) in [(1usize, 64usize, [13usize, 5, 7]), (6, 1056, [9, 17, 0])] {
            let x = values(m * k, 71, 1.0);
            let ws: Vec<Tensor> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| q8_0_tensor(n, k, &values(n * k, 72 + i as u64, 0.5)))
                .collect();
            let biases: Vec<Vec<f32>> = ns
                .iter()
                .enumerate()
                .map(|(i, &n)| values(n, 75 + i as u64, 0.1))
                .collect();
            let rows: usize = ns.iter().sum();
            let got = twice("gemv3_q8_0", |seed| {
                let mut ys: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; m * n]).collect();
                let cfg = Cfg {
                    seed,
                    ..Cfg::new(((rows as u32).div_ceil(8), 1, 1), 256, 0)
                };
                let (y0, rest) = ys.split_at_mut(1);
                let (y1, y2) = rest.split_at_mut(1);
                launch!(s, "gemv3_q8_0", cfg;
                    x.as_ptr() => *const f32,
                    ws[0].bytes().as_ptr() => *const u8, biases[0].as_ptr() => *const f32, y0[0].as_mut_ptr() => *mut f32, ns[0] as i32 => i32,
                    ws[1].bytes().as_ptr() => *const u8, biases[1].as_ptr() => *const f32, y1[0].as_mut_ptr() => *mut f32, ns[1] as i32 => i32,
                    ws[2].bytes().as_ptr() => *const u8, biases[2].as_ptr() => *const f32, y2[0].as_mut_ptr() => *mut f32, ns[2] as i32 => i32,
                    m as i32 => i32, k as i32 => i32).unwrap();
                ys.iter().map(|y| bits(y)).collect::<Vec<_>>()
            });
            for (i, &n) in ns.iter().enumerate() {
                let mut want = matmul_wt(&x, m, &ws[i]);
                for (j, v) in want.iter_mut().enumerate() {
                    *v += biases[i][j % n.max(1)];
                }
                let e = assert_close("gemv3_q8_0", &unbits(&got[i]), &want, 1e-5);
                pass("gemv3_q8_0", arch, &format!("m {m} k {k} n{i} {n}"), e);
            }
        }
    }
}

#[test]
fn q8_0_dequantization_to_f16_matches_the_cpu_dequantization_bit_for_bit() {
    for arch in ARCHS {
        let s = sim(arch);
        for (n, k) in [(1usize, 32usize), (7, 96), (13, 1056)] {
            let w = values(n * k, 61, 3.0);
            let t = q8_0_tensor(n, k, &w);
            let want: Vec<u16> = t
                .to_f32()
                .iter()
                .map(|v| f16::from_f32(*v).to_bits())
                .collect();
            let got = twice("dequant_q8_0_f16", |seed| {
                let mut y = vec![0xffffu16; n * k];
                let cfg = Cfg {
                    seed,
                    ..Cfg::d1(n * k, 256)
                };
                launch!(s, "dequant_q8_0_f16", cfg; t.bytes().as_ptr() => *const u8, y.as_mut_ptr() => *mut u16, n * k => usize).unwrap();
                y
            });
            assert_eq!(got, want, "dequant_q8_0_f16 n {n} k {k}");
            pass("dequant_q8_0_f16", arch, &format!("n {n} k {k}"), 0.0);
        }
    }
}

// ---- GGUF Q4_0 and K-quant blocks ------------------------------------------------------

/// The block formats Q4_K_M and Q5_K_M files mix, besides Q8_0, with the
/// suffix of their kernels.
const BLOCK_FORMATS: [(QType, &str); 4] = [
    (QType::Q4_0, "q4_0"),
    (QType::Q4K, "q4_k"),
    (QType::Q5K, "q5_k"),
    (QType::Q6K, "q6_k"),
];

/// `w` (`n × k`) quantized to `q` blocks by the loader's own quantizer, as
/// a tensor the CPU backend computes on.
fn block_tensor(q: QType, n: usize, k: usize, w: &[f32]) -> Tensor {
    let mut bytes = Vec::new();
    q.quantize(w, &mut bytes);
    let len = bytes.len();
    Tensor::new(
        "w".into(),
        DType::Q(q),
        vec![n, k],
        std::sync::Arc::new(bytes),
        0,
        len,
    )
}

/// Launches `sim_<name>` with `gemv_f16`'s signature over block weights.
#[allow(clippy::too_many_arguments)]
fn launch_block_gemv(
    s: &Sim,
    name: &str,
    cfg: Cfg,
    x: &[f32],
    w: &[u8],
    bias: *const f32,
    y: &mut [f32],
    (m, n, k): (usize, usize, usize),
) -> Result<Launched, String> {
    type F = unsafe extern "C" fn(
        *const Cfg,
        *const f32,
        *const u8,
        *const f32,
        *mut f32,
        i32,
        i32,
        i32,
    ) -> i32;
    // SAFETY: the launcher's C signature is gemv_q8_0's (gemv_blocks.cu).
    let rc = unsafe {
        let f: libloading::Symbol<F> = s.lib.get(format!("sim_{name}\0").as_bytes()).unwrap();
        f(
            &cfg,
            x.as_ptr(),
            w.as_ptr(),
            bias,
            y.as_mut_ptr(),
            m as i32,
            n as i32,
            k as i32,
        )
    };
    s.result(name, rc)
}

/// Activations with the cases the 8-bit quantization branches on: a block
/// of zeros (scale 0), and a block whose largest magnitude occurs twice
/// with both signs (llama.cpp keeps the first).
fn block_activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut x = values(m * k, seed, 1.0);
    x[..32].fill(0.0);
    if k >= 512 {
        x[256..512].fill(0.0);
        x[300] = 2.0;
        x[301] = -2.0;
    }
    x
}

#[test]
fn block_gemv_matches_the_cpu_backends_quantized_matmul_bit_for_bit_for_q4_0_and_k_quants() {
    for arch in ARCHS {
        let s = sim(arch);
        for (q, sfx) in BLOCK_FORMATS {
            let name = format!("gemv_{sfx}");
            let kb = q.block_elems();
            // k from one block to more blocks than a warp takes at once;
            // m from 1 to 8; n not a multiple of the 8 rows per block.
            for (m, n, k, with_bias) in [
                (1usize, 9usize, kb, true),
                (3, 5, 8 * kb + kb, false),
                (8, 11, 4 * 256, true),
            ] {
                let x = block_activations(m, k, 81);
                let t = block_tensor(q, n, k, &values(n * k, 82, 0.5));
                let bias = values(n, 83, 0.1);
                let mut want = matmul_wt(&x, m, &t);
                if with_bias {
                    for (i, v) in want.iter_mut().enumerate() {
                        *v += bias[i % n];
                    }
                }
                let bias_ptr = if with_bias {
                    bias.as_ptr()
                } else {
                    std::ptr::null()
                };
                let got = twice(&name, |seed| {
                    let mut y = vec![f32::NAN; m * n];
                    let cfg = Cfg {
                        seed,
                        ..Cfg::new(((n as u32).div_ceil(8), 1, 1), 256, 0)
                    };
                    launch_block_gemv(s, &name, cfg, &x, t.bytes(), bias_ptr, &mut y, (m, n, k))
                        .unwrap();
                    bits(&y)
                });
                // The CPU's 8-bit activations, exact integer sums, per-block
                // float products (no FMA contraction: __fmul_rn) and the
                // f32 sum over blocks in the CPU's order: the same bits.
                let e = assert_close(&name, &unbits(&got), &want, 0.0);
                assert_eq!(got, bits(&want), "{name} m {m} n {n} k {k}");
                // Batch invariance: row 0 alone gives the bits it gave in
                // the batch.
                let mut one = vec![f32::NAN; n];
                let cfg = Cfg::new(((n as u32).div_ceil(8), 1, 1), 256, 0);
                launch_block_gemv(
                    s,
                    &name,
                    cfg,
                    &x[..k],
                    t.bytes(),
                    bias_ptr,
                    &mut one,
                    (1, n, k),
                )
                .unwrap();
                assert_eq!(bits(&one), got[..n].to_vec(), "{name}: row 0 alone");
                pass(
                    &name,
                    arch,
                    &format!("m {m} n {n} k {k} bias {with_bias}"),
                    e,
                );
            }
        }
    }
}

#[test]
fn fused_block_gemv_matches_three_separate_cpu_projections_for_q4_0_and_k_quants() {
    type F = unsafe extern "C" fn(
        *const Cfg,
        *const f32,
        *const u8,
        *const f32,
        *mut f32,
        i32,
        *const u8,
        *const f32,
        *mut f32,
        i32,
        *const u8,
        *const f32,
        *mut f32,
        i32,
        i32,
        i32,
    ) -> i32;
    for arch in ARCHS {
        let s = sim(arch);
        for (q, sfx) in BLOCK_FORMATS {
            let name = format!("gemv3_{sfx}");
            for (m, k, ns) in [(1usize, 256usize, [13usize, 5, 7]), (6, 512, [9, 3, 0])] {
                let x = block_activations(m, k, 91);
                let ws: Vec<Tensor> = ns
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| block_tensor(q, n, k, &values(n * k, 92 + i as u64, 0.5)))
                    .collect();
                let bs: Vec<Vec<f32>> = ns
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| values(n, 95 + i as u64, 0.1))
                    .collect();
                let rows: usize = ns.iter().sum();
                let got = twice(&name, |seed| {
                    let mut ys: Vec<Vec<f32>> = ns.iter().map(|&n| vec![f32::NAN; m * n]).collect();
                    let cfg = Cfg {
                        seed,
                        ..Cfg::new(((rows as u32).div_ceil(8), 1, 1), 256, 0)
                    };
                    let [y0, y1, y2] = &mut ys[..] else {
                        unreachable!()
                    };
                    // SAFETY: the launcher's C signature is gemv3_q8_0's.
                    let rc = unsafe {
                        let f: libloading::Symbol<F> =
                            s.lib.get(format!("sim_{name}\0").as_bytes()).unwrap();
                        f(
                            &cfg,
                            x.as_ptr(),
                            ws[0].bytes().as_ptr(),
                            bs[0].as_ptr(),
                            y0.as_mut_ptr(),
                            ns[0] as i32,
                            ws[1].bytes().as_ptr(),
                            bs[1].as_ptr(),
                            y1.as_mut_ptr(),
                            ns[1] as i32,
                            ws[2].bytes().as_ptr(),
                            bs[2].as_ptr(),
                            y2.as_mut_ptr(),
                            ns[2] as i32,
                            m as i32,
                            k as i32,
                        )
                    };
                    s.result(&name, rc).unwrap();
                    ys.iter().map(|y| bits(y)).collect::<Vec<_>>()
                });
                for (i, &n) in ns.iter().enumerate() {
                    let mut want = matmul_wt(&x, m, &ws[i]);
                    for (j, v) in want.iter_mut().enumerate() {
                        *v += bs[i][j % n.max(1)];
                    }
                    assert_eq!(got[i], bits(&want), "{name} m {m} k {k} n{i} {n}");
                    pass(&name, arch, &format!("m {m} k {k} n{i} {n}"), 0.0);
                }
            }
        }
    }
}

#[test]
fn block_dequantization_to_f16_matches_the_cpu_dequantization_bit_for_bit() {
    type F = unsafe extern "C" fn(*const Cfg, *const u8, *mut u16, usize) -> i32;
    for arch in ARCHS {
        let s = sim(arch);
        for (q, sfx) in BLOCK_FORMATS {
            let name = format!("dequant_{sfx}_f16");
            for (n, k) in [(1usize, 256usize), (5, 768)] {
                let t = block_tensor(q, n, k, &values(n * k, 101, 3.0));
                let want: Vec<u16> = t
                    .to_f32()
                    .iter()
                    .map(|v| f16::from_f32(*v).to_bits())
                    .collect();
                let got = twice(&name, |seed| {
                    let mut y = vec![0xffffu16; n * k];
                    let cfg = Cfg {
                        seed,
                        ..Cfg::d1(n * k, 256)
                    };
                    // SAFETY: the launcher's C signature is dequant_q8_0_f16's.
                    let rc = unsafe {
                        let f: libloading::Symbol<F> =
                            s.lib.get(format!("sim_{name}\0").as_bytes()).unwrap();
                        f(&cfg, t.bytes().as_ptr(), y.as_mut_ptr(), n * k)
                    };
                    s.result(&name, rc).unwrap();
                    y
                });
                assert_eq!(got, want, "{name} n {n} k {k}");
                pass(&name, arch, &format!("n {n} k {k}"), 0.0);
            }
        }
    }
}

// ---- attention -------------------------------------------------------------------------

/// One attention case: sequences with a cached context and this step's
/// tokens, over block tables with holes (blocks out of order, unused ones
/// between them).
struct AttnCase {
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    block_size: usize,
    window: usize,
    /// (cached positions before the step, tokens in the step) per sequence.
    seqs: Vec<(usize, usize)>,
    f16: bool,
    /// Split-K partition size (`None`: the plan's).
    part: Option<usize>,
}

struct AttnRun {
    got: Vec<f32>,
    want: Vec<f32>,
    static_decode: u32,
}

fn tables_with_holes(seqs: &[(usize, usize)], block_size: usize) -> (Vec<Vec<u32>>, usize) {
    let mut next = 3u32;
    let mut tables = Vec::new();
    for &(ctx, new) in seqs {
        let blocks = (ctx + new).div_ceil(block_size);
        // Every other block id, backwards: holes, and no order to rely on.
        let t: Vec<u32> = (0..blocks as u32).rev().map(|i| next + 2 * i).collect();
        next += 2 * blocks as u32 + 1;
        tables.push(t);
    }
    (tables, next as usize + 1)
}

fn run_attention(s: &Sim, c: &AttnCase, seed: u64) -> Result<AttnRun, String> {
    let (nkv, hd, bs) = (c.kv_heads, c.head_dim, c.block_size);
    let heads = nkv * c.group;
    let row = nkv * hd;
    let (tables, num_blocks) = tables_with_holes(&c.seqs, bs);
    // Every position's K/V, written by kv_write (the GPU) and KvStore (the CPU).
    let mut kv = KvStore::with_shape((1, nkv, hd), num_blocks, bs, c.f16);
    let cache_len = num_blocks * bs * row;
    let (mut kc32, mut vc32) = (vec![0f32; cache_len], vec![0f32; cache_len]);
    let (mut kc16, mut vc16) = (vec![0u16; cache_len], vec![0u16; cache_len]);
    let mut all_k = Vec::new();
    let mut all_v = Vec::new();
    let mut slots = Vec::new();
    for (si, &(ctx, new)) in c.seqs.iter().enumerate() {
        for p in 0..ctx + new {
            let k = values(row, 1000 + (si * 4096 + p) as u64, 1.0);
            let v = values(row, 9000 + (si * 4096 + p) as u64, 1.0);
            kv.write(0, &tables[si], p, &k, &v);
            all_k.extend_from_slice(&k);
            all_v.extend_from_slice(&v);
            slots.push((tables[si][p / bs] as usize * bs + p % bs) as i32);
        }
    }
    let nw = slots.len();
    let cfg = Cfg {
        seed,
        ..Cfg::d1(nw * row, 256)
    };
    if c.f16 {
        launch!(s, "kv_write_f16", cfg; all_k.as_ptr() => *const f32, all_v.as_ptr() => *const f32, kc16.as_mut_ptr() => *mut u16, vc16.as_mut_ptr() => *mut u16, slots.as_ptr() => *const i32, nw as i32 => i32, row as i32 => i32)?;
    } else {
        launch!(s, "kv_write_f32", cfg; all_k.as_ptr() => *const f32, all_v.as_ptr() => *const f32, kc32.as_mut_ptr() => *mut f32, vc32.as_mut_ptr() => *mut f32, slots.as_ptr() => *const i32, nw as i32 => i32, row as i32 => i32)?;
    }
    // The step: each sequence's new tokens.
    let mut batch = Batch {
        block_tables: tables.clone(),
        ..Default::default()
    };
    for (si, &(ctx, new)) in c.seqs.iter().enumerate() {
        for p in ctx..ctx + new {
            batch.tokens.push(BatchToken {
                token: 1,
                pos: p,
                seq: si,
                wide: false,
            });
        }
    }
    let m = batch.tokens.len();
    let q = values(m * heads * hd, 77, 1.0);
    let window = (c.window > 0).then_some(c.window);
    let mut want = vec![0f32; m * heads * hd];
    paged_attention(&q, &batch, &kv, 0, heads, window, &mut want);

    let (tq, tk) = plan::prefill_tile(hd);
    let layout = StepLayout::new(&batch, bs, tq).map_err(|e| e.to_string())?;
    let part = match c.part {
        Some(p) => p,
        None => plan::decode_part_size(c.group, hd).map_err(|e| e.to_string())?,
    };
    let scale = 1.0f32 / (hd as f32).sqrt();
    let mut out = vec![f32::NAN; m * heads * hd];
    let (hi, kvi, hdi, bsi, wi) = (
        heads as i32,
        nkv as i32,
        hd as i32,
        bs as i32,
        c.window as i32,
    );
    let (kcp, vcp): (*const u8, *const u8) = if c.f16 {
        (kc16.as_ptr().cast(), vc16.as_ptr().cast())
    } else {
        (kc32.as_ptr().cast(), vc32.as_ptr().cast())
    };
    let mut static_decode = 0;
    if !layout.decode.is_empty() {
        let nd = layout.decode.len();
        let nparts = layout.decode_parts(c.window, part);
        let (mut po, mut pm, mut ps) = (
            vec![f32::NAN; nd * heads * nparts * hd],
            vec![f32::NAN; nd * heads * nparts],
            vec![f32::NAN; nd * heads * nparts],
        );
        let (pop, pmp, psp) = if nparts > 1 {
            (po.as_mut_ptr(), pm.as_mut_ptr(), ps.as_mut_ptr())
        } else {
            (
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        let cfg = Cfg {
            seed,
            ..Cfg::new(
                (nd as u32, nkv as u32, nparts as u32),
                128,
                plan::decode_smem(c.group, hd, part),
            )
        };
        let name = if c.f16 {
            "attention_decode_f16"
        } else {
            "attention_decode_f32"
        };
        let r = if c.f16 {
            launch!(s, "attention_decode_f16", cfg; q.as_ptr() => *const f32, kcp => *const u8, vcp => *const u8, out.as_mut_ptr() => *mut f32, layout.decode.as_ptr() => *const i32, layout.pos.as_ptr() => *const i32, layout.tok_table.as_ptr() => *const i32, layout.tables.as_ptr() => *const i32, hi => i32, kvi => i32, hdi => i32, bsi => i32, wi => i32, part as i32 => i32, scale => f32, pop => *mut f32, pmp => *mut f32, psp => *mut f32)
        } else {
            launch!(s, "attention_decode_f32", cfg; q.as_ptr() => *const f32, kcp => *const u8, vcp => *const u8, out.as_mut_ptr() => *mut f32, layout.decode.as_ptr() => *const i32, layout.pos.as_ptr() => *const i32, layout.tok_table.as_ptr() => *const i32, layout.tables.as_ptr() => *const i32, hi => i32, kvi => i32, hdi => i32, bsi => i32, wi => i32, part as i32 => i32, scale => f32, pop => *mut f32, pmp => *mut f32, psp => *mut f32)
        };
        static_decode = r.map_err(|e| format!("{name}: {e}"))?.static_smem;
        if nparts > 1 {
            let cfg = Cfg {
                seed,
                ..Cfg::new((nd as u32, heads as u32, 1), 128, 0)
            };
            launch!(s, "attention_reduce", cfg; po.as_ptr() => *const f32, pm.as_ptr() => *const f32, ps.as_ptr() => *const f32, out.as_mut_ptr() => *mut f32, layout.decode.as_ptr() => *const i32, hi => i32, hdi => i32, nparts as i32 => i32)?;
        }
    }
    if !layout.tiles.is_empty() {
        let nt = layout.tiles.len() / 2;
        let cfg = Cfg {
            seed,
            ..Cfg::new(
                (nt as u32, heads as u32, 1),
                128,
                plan::prefill_smem(hd, tq, tk),
            )
        };
        let (tqi, tki) = (tq as i32, tk as i32);
        if c.f16 {
            launch!(s, "attention_prefill_f16", cfg; q.as_ptr() => *const f32, kcp => *const u8, vcp => *const u8, out.as_mut_ptr() => *mut f32, layout.tiles.as_ptr() => *const i32, layout.pos.as_ptr() => *const i32, layout.tok_table.as_ptr() => *const i32, layout.tables.as_ptr() => *const i32, hi => i32, kvi => i32, hdi => i32, bsi => i32, wi => i32, tqi => i32, tki => i32, scale => f32)?;
        } else {
            launch!(s, "attention_prefill_f32", cfg; q.as_ptr() => *const f32, kcp => *const u8, vcp => *const u8, out.as_mut_ptr() => *mut f32, layout.tiles.as_ptr() => *const i32, layout.pos.as_ptr() => *const i32, layout.tok_table.as_ptr() => *const i32, layout.tables.as_ptr() => *const i32, hi => i32, kvi => i32, hdi => i32, bsi => i32, wi => i32, tqi => i32, tki => i32, scale => f32)?;
        }
    }
    Ok(AttnRun {
        got: out,
        want,
        static_decode,
    })
}

fn check_attention(s: &Sim, c: &AttnCase, label: &str) {
    let a = twice(label, |seed| {
        run_attention(s, c, seed).map(|r| bits(&r.got))
    });
    let got = unbits(&a.unwrap_or_else(|e| panic!("{label}: {e}")));
    let r = run_attention(s, c, 1).unwrap();
    let e = assert_close(label, &got, &r.want, 2e-5);
    let kernel = if c.seqs.iter().all(|s| s.1 == 1) {
        "attention_decode"
    } else {
        "attention_prefill"
    };
    pass(
        &format!("{kernel}_{}", if c.f16 { "f16" } else { "f32" }),
        s.arch,
        label,
        e,
    );
}

#[test]
fn decode_attention_matches_the_cpu_for_gqa_groups_split_k_and_holes() {
    let s = sim(800);
    for f16 in [false, true] {
        for group in 1..=8 {
            for (hd, part) in [(64, None), (80, Some(32))] {
                let c = AttnCase {
                    kv_heads: 2,
                    group,
                    head_dim: hd,
                    block_size: 16,
                    window: 0,
                    seqs: vec![(0, 1), (40, 1), (100, 1)],
                    f16,
                    part,
                };
                let split = if part.is_some() {
                    "split-K 32"
                } else {
                    "one partition"
                };
                check_attention(s, &c, &format!("G {group} hd {hd} ctx 1/41/101 {split}"));
            }
        }
        // A sliding window, with and without split-K; block size 5 (a tail).
        for part in [None, Some(32)] {
            let c = AttnCase {
                kv_heads: 1,
                group: 3,
                head_dim: 64,
                block_size: 5,
                window: 37,
                seqs: vec![(90, 1), (10, 1)],
                f16,
                part,
            };
            check_attention(s, &c, &format!("G 3 hd 64 bs 5 window 37 part {part:?}"));
        }
    }
}

#[test]
fn decode_attention_launches_within_48_kib_at_the_largest_groups() {
    // The review: 512 B static + up to 49,152 B dynamic failed every launch
    // for groups 24..64 at head_dim 128 and 16 at 256. The simulator counts
    // the static shared memory the kernel really declares and refuses a
    // launch over 48 KiB, as the driver does.
    let s = sim(800);
    for (group, hd) in [(24, 128), (32, 128), (48, 128), (64, 128), (16, 256)] {
        let c = AttnCase {
            kv_heads: 1,
            group,
            head_dim: hd,
            block_size: 16,
            window: 0,
            seqs: vec![(300, 1), (7, 1)],
            f16: true,
            part: None,
        };
        let r = run_attention(s, &c, 3).unwrap_or_else(|e| panic!("G {group} hd {hd}: {e}"));
        assert!(
            r.static_decode as usize <= plan::DECODE_STATIC_SMEM,
            "the kernel declares {} B static, the plan reserves {}",
            r.static_decode,
            plan::DECODE_STATIC_SMEM
        );
        let e = assert_close("decode", &r.got, &r.want, 2e-5);
        pass(
            "attention_decode_f16",
            800,
            &format!("G {group} hd {hd} (static {} B + dynamic)", r.static_decode),
            e,
        );
    }
}

#[test]
fn prefill_attention_matches_the_cpu_for_tiles_tails_and_windows() {
    let s = sim(800);
    for f16 in [false, true] {
        for (group, hd, seqs, window) in [
            (1, 64, vec![(0, 19)], 0),
            (4, 64, vec![(23, 40), (0, 3)], 0),
            (8, 128, vec![(5, 17)], 0),
            (2, 80, vec![(50, 33)], 16),
            (3, 256, vec![(0, 9)], 0),
        ] {
            // The second sequence of a mixed step decodes (one token).
            let mut seqs = seqs;
            seqs.push((12, 1));
            let c = AttnCase {
                kv_heads: 2,
                group,
                head_dim: hd,
                block_size: 16,
                window,
                seqs: seqs.clone(),
                f16,
                part: None,
            };
            check_attention(
                s,
                &c,
                &format!("G {group} hd {hd} seqs {seqs:?} window {window}"),
            );
        }
    }
}

// ---- sampling ----------------------------------------------------------------------------

fn logits_rows(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut l = values(rows * vocab, seed, 4.0);
    // Peaked rows: a few tokens hold most of the mass.
    for r in 0..rows {
        for j in 0..(r % 4) {
            l[r * vocab + (j * 131 + r) % vocab] += 9.0 - j as f32;
        }
    }
    l
}

#[test]
fn argmax_rows_matches_the_cpu_argmax() {
    for arch in ARCHS {
        let s = sim(arch);
        for vocab in [1usize, 31, 1025, 5000] {
            let rows = 3;
            let mut l = logits_rows(rows, vocab, 51);
            if vocab > 100 {
                // Ties go to the lowest id; -inf never wins.
                l[70] = 50.0;
                l[90] = 50.0;
                l[vocab + 3] = f32::NEG_INFINITY;
            }
            let want: Vec<i32> = (0..rows)
                .map(|r| argmax(&l[r * vocab..(r + 1) * vocab]) as i32)
                .collect();
            let got = twice("argmax_rows", |seed| {
                let mut out = vec![-7i32; rows];
                launch!(s, "argmax_rows", Cfg { seed, ..Cfg::new((rows as u32, 1, 1), 1024, 0) }; l.as_ptr() => *const f32, vocab as i32 => i32, out.as_mut_ptr() => *mut i32).unwrap();
                out
            });
            assert_eq!(got, want, "argmax_rows vocab {vocab}");
            pass(
                "argmax_rows",
                arch,
                &format!("rows {rows} vocab {vocab}"),
                0.0,
            );
        }
    }
}

/// Runs `sample_rows` over `rows` rows of `l`; returns the tokens and the
/// exp(double) evaluations per token of the row.
#[allow(clippy::too_many_arguments)]
fn sample_on_sim(
    s: &Sim,
    l: &[f32],
    vocab: usize,
    t: &[f32],
    k: &[i32],
    tp: &[f32],
    mp: &[f32],
    u: &[f64],
    seed: u64,
) -> (Vec<i32>, f64) {
    let rows = t.len();
    let mut out = vec![-7i32; rows];
    let cfg = Cfg {
        seed,
        ..Cfg::new((rows as u32, 1, 1), 1024, 0)
    };
    launch!(s, "sample_rows", cfg; l.as_ptr() => *const f32, vocab as i32 => i32, t.as_ptr() => *const f32, k.as_ptr() => *const i32, tp.as_ptr() => *const f32, mp.as_ptr() => *const f32, u.as_ptr() => *const f64, out.as_mut_ptr() => *mut i32).unwrap();
    // SAFETY: defined in every build (launchers.cpp).
    let exps = unsafe {
        let f: libloading::Symbol<unsafe extern "C" fn() -> u64> =
            s.lib.get(b"sim_last_exp_calls\0").unwrap();
        f()
    };
    (out, exps as f64 / (rows * vocab) as f64)
}

#[test]
fn sample_rows_draws_the_token_the_cpu_sampler_draws() {
    let s = sim(800);
    let vocab = 3001;
    // (temperature, top_k, top_p, min_p)
    let settings: [(f32, usize, f32, f32); 9] = [
        (1.0, 0, 1.0, 0.0),
        (0.7, 0, 0.9, 0.0),
        (1.3, 0, 0.5, 0.0),
        (1.0, 0, 1.0, 0.05),
        (0.5, 0, 0.95, 0.1),
        (2.0, 0, 0.2, 0.0),
        (1.0, 40, 1.0, 0.0),
        (0.8, 7, 0.9, 0.0),
        (1.5, 1000, 0.8, 0.02),
    ];
    let rows = settings.len();
    let mut total = 0;
    let mut exps: f64 = 0.0;
    for round in 0..4u64 {
        let mut l = logits_rows(rows, vocab, 60 + round);
        // Ties at the top-k boundary and in the middle of the order.
        for r in 0..rows {
            for j in 0..12 {
                l[r * vocab + 100 + 17 * j] = 5.5;
            }
        }
        let mut rngs: Vec<Rng> = (0..rows)
            .map(|r| Rng::new(round * 100 + r as u64))
            .collect();
        let u: Vec<f64> = rngs.iter().map(|r| r.clone().next_f64()).collect();
        let want: Vec<i32> = (0..rows)
            .map(|r| {
                let (temperature, top_k, top_p, min_p) = settings[r];
                let p = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    ..Default::default()
                };
                sample(&l[r * vocab..(r + 1) * vocab], &p, &[], &[], &mut rngs[r]).0 as i32
            })
            .collect();
        let t: Vec<f32> = settings.iter().map(|s| s.0).collect();
        let k: Vec<i32> = settings.iter().map(|s| s.1 as i32).collect();
        let tp: Vec<f32> = settings.iter().map(|s| s.2).collect();
        let mp: Vec<f32> = settings.iter().map(|s| s.3).collect();
        let (got, e) = twice("sample_rows", |seed| {
            let (out, e) = sample_on_sim(s, &l, vocab, &t, &k, &tp, &mp, &u, seed);
            (out, e.to_bits())
        });
        exps = exps.max(f64::from_bits(e));
        total += rows;
        assert_eq!(
            got, want,
            "sample_rows round {round}: settings {settings:?}"
        );
    }
    pass(
        "sample_rows",
        800,
        &format!("vocab {vocab}, {total} draws, top-k/top-p/min-p, ties"),
        0.0,
    );
    // The review counted up to 67 passes over the row, each with an exp per
    // token; the radix selects need a handful.
    assert!(
        exps <= 8.0,
        "sample_rows evaluates {exps:.1} exponentials per token"
    );
    println!("sample_rows: {exps:.1} exp(double) per token of the row");
}

// ---- fp16 overflow (sm_60..sm_75 fast path) ----------------------------------------------

/// A synthesized bf16 Llama whose layer 0 `up_proj` is scaled up, so its
/// `down_proj` inputs exceed f16's 65504 as bf16-trained models' can.
fn large_activation_model() -> PathBuf {
    use copyhold_node::model::config::Arch;
    use copyhold_node::model::weights::DType;
    use copyhold_node::synth::{SynthSpec, synth};
    let dir = tempdir();
    let mut spec = SynthSpec::tiny(Arch::Llama);
    spec.dtype = DType::BF16;
    synth(&spec, &dir).unwrap();
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "model.layers.0.mlp.up_proj.weight"
            || name == "model.layers.0.mlp.gate_proj.weight"
        {
            for c in data.chunks_exact_mut(2) {
                let v = bf16::from_le_bytes([c[0], c[1]]).to_f32() * 600.0;
                c.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        }
        out.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
    dir
}

#[test]
fn f16_overflow_of_a_synthesized_models_activations_is_flagged_and_the_f32_path_stays_finite() {
    let dir = large_activation_model();
    let store = WeightStore::open(&dir).unwrap();
    let (h, inter, m) = (64usize, 128usize, 5usize);
    let embed = store.get("model.embed_tokens.weight", &[300, h]).unwrap();
    let norm = RmsNorm {
        w: store
            .get("model.layers.0.post_attention_layernorm.weight", &[h])
            .unwrap()
            .to_f32(),
        eps: 1e-5,
    };
    let gate = store
        .get("model.layers.0.mlp.gate_proj.weight", &[inter, h])
        .unwrap();
    let up = store
        .get("model.layers.0.mlp.up_proj.weight", &[inter, h])
        .unwrap();
    let down = store
        .get("model.layers.0.mlp.down_proj.weight", &[h, inter])
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // The MLP of layer 0 on five tokens' embeddings, as the CPU backend computes it.
    let mut x = vec![0f32; m * h];
    for (r, id) in [3usize, 50, 120, 200, 299].iter().enumerate() {
        embed.read_f32(id * h, &mut x[r * h..(r + 1) * h]);
    }
    let mut xn = vec![0f32; m * h];
    norm.forward_into(&x, &mut xn);
    let mut act = matmul_wt(&xn, m, &gate);
    let u = matmul_wt(&xn, m, &up);
    copyhold_node::cpu::layers::silu_mul(&mut act, &u);
    let peak = act.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert!(
        peak > 65504.0,
        "the synthesized activations peak at {peak}, within f16"
    );
    let want = matmul_wt(&act, m, &down);
    assert!(want.iter().all(|v| v.is_finite()));
    // down_proj's weights fit f16 (the device keeps them f16 before sm_80).
    let down_bits: Vec<u16> = down
        .to_f32()
        .iter()
        .map(|v| f16::from_f32(*v).to_bits())
        .collect();
    for arch in ARCHS {
        let s = sim(arch);
        // The fast path's cast: the overflow is seen.
        let n = act.len();
        let mut xh = vec![0u16; n];
        let mut overflow = 0i32;
        launch!(s, "cast_f32_f16", Cfg::d1(n, 256); act.as_ptr() => *const f32, xh.as_mut_ptr() => *mut u16, n => usize, &mut overflow as *mut i32 => *mut i32).unwrap();
        assert_eq!(overflow, 1, "sm_{}: overflow not flagged", arch / 10);
        assert!(
            xh.iter().any(|&b| b & 0x7fff == 0x7c00),
            "the cast made infinities"
        );
        // What the backend falls back to: f32 activations through the GEMV.
        let mut y = vec![f32::NAN; m * h];
        let cfg = Cfg::new(((h as u32).div_ceil(8), 1, 1), 256, 0);
        launch!(s, "gemv_f16", cfg; act.as_ptr() => *const f32, down_bits.as_ptr() => *const u16, std::ptr::null::<f32>() => *const f32, y.as_mut_ptr() => *mut f32, m as i32 => i32, h as i32 => i32, inter as i32 => i32).unwrap();
        // The CPU multiplies the bf16 weights; the device their f16 copies
        // (exact for bf16 values in f16's normal range; tiny ones round).
        let e = assert_close("down_proj in f32", &y, &want, 1e-3);
        pass(
            "cast_f32_f16+gemv_f16",
            arch,
            &format!("synthesized bf16 MLP, activations up to {peak:.0}"),
            e,
        );
    }
}

// ---- the simulator itself ------------------------------------------------------------------

#[test]
fn the_simulator_catches_a_missing_barrier_a_shuffle_after_exit_and_a_divergent_barrier() {
    let s = sim(800);
    // Missing __syncthreads: some thread order reads a partial sum before
    // it is written (NaN from the filled shared memory, or a wrong sum).
    let x = vec![1.0f32; 4 * 128];
    let wrong = (1..=8u64).any(|seed| {
        let mut out = vec![0f32; 4];
        let cfg = Cfg { seed, ..Cfg::new((4, 1, 1), 128, 0) };
        launch!(s, "selftest_missing_barrier", cfg; x.as_ptr() => *const f32, out.as_mut_ptr() => *mut f32).unwrap();
        out.iter().any(|&v| v != 128.0)
    });
    assert!(wrong, "a missing barrier went unnoticed in 8 thread orders");
    let mut out = vec![0f32; 64];
    let e = launch!(s, "selftest_shuffle_after_exit", Cfg::new((1, 1, 1), 64, 0); out.as_mut_ptr() => *mut f32).unwrap_err();
    assert!(e.contains("exited"), "{e}");
    let e = launch!(s, "selftest_divergent_barrier", Cfg::new((1, 1, 1), 64, 0); out.as_mut_ptr() => *mut f32).unwrap_err();
    assert!(e.contains("two places"), "{e}");
    // Blocks on two worker threads, atomics on one counter; ballots.
    let (mut count, mut odd) = (0i32, 0u32);
    launch!(s, "selftest_atomics", Cfg::new((64, 1, 1), 256, 0); &mut count as *mut i32 => *mut i32, &mut odd as *mut u32 => *mut u32).unwrap();
    assert_eq!((count, odd), (64 * 256, 64 * 128));
    // Launch limits as the driver's.
    let e = launch!(s, "selftest_atomics", Cfg::new((1, 1, 1), 2048, 0); &mut count as *mut i32 => *mut i32, &mut odd as *mut u32 => *mut u32).unwrap_err();
    assert!(e.contains("1024"), "{e}");
    println!(
        "simulator self-test: missing barrier, shuffle after exit, divergent barrier caught; atomics and ballots exact"
    );
}

#[test]
fn fused_gemv_matches_three_separate_cpu_projections() {
    use safetensors::Dtype as D;
    for arch in ARCHS {
        let s = sim(arch);
        // q/k/v shapes with GQA (k, v narrower), and gate/up (n2 = 0).
        for (m, ns, k) in [
            (1usize, [13usize, 5, 5], 40usize),
            (8, [9, 3, 3], 37),
            (3, [17, 11, 0], 264),
        ] {
            let x = values(m * k, 51, 1.0);
            let ws: Vec<Vec<f32>> = (0..3)
                .map(|i| values(ns[i] * k, 52 + i as u64, 0.5))
                .collect();
            let bs: Vec<Vec<f32>> = (0..3)
                .map(|i| values(ns[i].max(1), 55 + i as u64, 0.1))
                .collect();
            for (dt, name) in [
                (D::F32, "gemv3_f32"),
                (D::F16, "gemv3_f16"),
                (D::BF16, "gemv3_bf16"),
            ] {
                let want: Vec<Vec<f32>> = (0..3)
                    .map(|i| {
                        if ns[i] == 0 {
                            return Vec::new();
                        }
                        let mut y = matmul_wt(&x, m, &tensor(dt, &[ns[i], k], &ws[i]));
                        for (j, v) in y.iter_mut().enumerate() {
                            *v += bs[i][j % ns[i]];
                        }
                        y
                    })
                    .collect();
                let wbits: Vec<Vec<u16>> = ws
                    .iter()
                    .map(|w| {
                        if dt == D::F32 {
                            Vec::new()
                        } else {
                            bits16(dt, w)
                        }
                    })
                    .collect();
                let got = twice(name, |seed| {
                    let mut ys: Vec<Vec<f32>> = (0..3).map(|i| vec![f32::NAN; m * ns[i]]).collect();
                    let rows: usize = ns.iter().sum();
                    let cfg = Cfg {
                        seed,
                        ..Cfg::new(((rows as u32).div_ceil(8), 1, 1), 256, 0)
                    };
                    let (y0, rest) = ys.split_at_mut(1);
                    let (y1, y2) = rest.split_at_mut(1);
                    let (n0, n1, n2, mi, ki) =
                        (ns[0] as i32, ns[1] as i32, ns[2] as i32, m as i32, k as i32);
                    let w = |i: usize| -> *const u8 {
                        if dt == D::F32 {
                            ws[i].as_ptr().cast()
                        } else {
                            wbits[i].as_ptr().cast()
                        }
                    };
                    let r = match dt {
                        D::F32 => {
                            launch!(s, "gemv3_f32", cfg; x.as_ptr() => *const f32, w(0) => *const u8, bs[0].as_ptr() => *const f32, y0[0].as_mut_ptr() => *mut f32, n0 => i32, w(1) => *const u8, bs[1].as_ptr() => *const f32, y1[0].as_mut_ptr() => *mut f32, n1 => i32, w(2) => *const u8, bs[2].as_ptr() => *const f32, y2[0].as_mut_ptr() => *mut f32, n2 => i32, mi => i32, ki => i32)
                        }
                        D::F16 => {
                            launch!(s, "gemv3_f16", cfg; x.as_ptr() => *const f32, w(0) => *const u8, bs[0].as_ptr() => *const f32, y0[0].as_mut_ptr() => *mut f32, n0 => i32, w(1) => *const u8, bs[1].as_ptr() => *const f32, y1[0].as_mut_ptr() => *mut f32, n1 => i32, w(2) => *const u8, bs[2].as_ptr() => *const f32, y2[0].as_mut_ptr() => *mut f32, n2 => i32, mi => i32, ki => i32)
                        }
                        _ => {
                            launch!(s, "gemv3_bf16", cfg; x.as_ptr() => *const f32, w(0) => *const u8, bs[0].as_ptr() => *const f32, y0[0].as_mut_ptr() => *mut f32, n0 => i32, w(1) => *const u8, bs[1].as_ptr() => *const f32, y1[0].as_mut_ptr() => *mut f32, n1 => i32, w(2) => *const u8, bs[2].as_ptr() => *const f32, y2[0].as_mut_ptr() => *mut f32, n2 => i32, mi => i32, ki => i32)
                        }
                    };
                    r.unwrap();
                    ys.iter().map(|y| bits(y)).collect::<Vec<_>>()
                });
                let mut e: f64 = 0.0;
                for i in 0..3 {
                    e = e.max(assert_close(name, &unbits(&got[i]), &want[i], 1e-5));
                }
                pass(name, arch, &format!("m {m} n {ns:?} k {k}"), e);
            }
        }
    }
}

// ---- CUDA graphs: a padded decode step ---------------------------------------------

/// K/V of the step's rows written, then decode attention (with its
/// reduction when split), over one step's device metadata: what a decode
/// step launches for attention, eagerly or replayed from a graph.
struct DecodeRun<'a> {
    ids_rows: usize,
    pos: &'a [i32],
    slots: &'a [i32],
    tok_table: &'a [i32],
    tables: &'a [i32],
    decode: &'a [i32],
    nparts: usize,
}

#[allow(clippy::too_many_arguments)]
fn run_decode_step(
    s: &Sim,
    r: &DecodeRun,
    kc: &mut [f32],
    vc: &mut [f32],
    k: &[f32],
    v: &[f32],
    q: &[f32],
    (nkv, group, hd, bs, part): (usize, usize, usize, usize, usize),
    seed: u64,
) -> Vec<f32> {
    let heads = nkv * group;
    let row = nkv * hd;
    let m = r.ids_rows;
    let cfg = Cfg {
        seed,
        ..Cfg::d1(m * row, 256)
    };
    launch!(s, "kv_write_f32", cfg; k.as_ptr() => *const f32, v.as_ptr() => *const f32, kc.as_mut_ptr() => *mut f32, vc.as_mut_ptr() => *mut f32, r.slots.as_ptr() => *const i32, m as i32 => i32, row as i32 => i32).unwrap();
    let nd = r.decode.len();
    let mut out = vec![f32::NAN; m * heads * hd];
    let n = nd * heads * r.nparts;
    let (mut po, mut pm, mut ps) = (vec![f32::NAN; n * hd], vec![f32::NAN; n], vec![f32::NAN; n]);
    let (pop, pmp, psp) = if r.nparts > 1 {
        (po.as_mut_ptr(), pm.as_mut_ptr(), ps.as_mut_ptr())
    } else {
        (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    let cfg = Cfg {
        seed,
        ..Cfg::new(
            (nd as u32, nkv as u32, r.nparts as u32),
            128,
            plan::decode_smem(group, hd, part),
        )
    };
    let scale = 1.0f32 / (hd as f32).sqrt();
    launch!(s, "attention_decode_f32", cfg; q.as_ptr() => *const f32, kc.as_ptr() as *const u8 => *const u8, vc.as_ptr() as *const u8 => *const u8, out.as_mut_ptr() => *mut f32, r.decode.as_ptr() => *const i32, r.pos.as_ptr() => *const i32, r.tok_table.as_ptr() => *const i32, r.tables.as_ptr() => *const i32, heads as i32 => i32, nkv as i32 => i32, hd as i32 => i32, bs as i32 => i32, 0i32 => i32, part as i32 => i32, scale => f32, pop => *mut f32, pmp => *mut f32, psp => *mut f32).unwrap();
    if r.nparts > 1 {
        let cfg = Cfg {
            seed,
            ..Cfg::new((nd as u32, heads as u32, 1), 128, 0)
        };
        launch!(s, "attention_reduce", cfg; po.as_ptr() => *const f32, pm.as_ptr() => *const f32, ps.as_ptr() => *const f32, out.as_mut_ptr() => *mut f32, r.decode.as_ptr() => *const i32, heads as i32 => i32, hd as i32 => i32, r.nparts as i32 => i32).unwrap();
    }
    out
}

#[test]
fn a_decode_step_padded_to_its_graph_bucket_gives_the_real_rows_the_same_bits() {
    use copyhold_node::cuda::graph_plan::{GraphLimits, PaddedDecode, key_for};
    let s = sim(800);
    let (nkv, group, hd, bs, part) = (2usize, 4usize, 64usize, 16usize, 32usize);
    let heads = nkv * group;
    let row = nkv * hd;
    // Contexts of 1..=150 positions: one to five partitions of 32, padded
    // to 1/2/4/8 rows and to 1/2/4/8 partitions.
    for ctx in [vec![0usize], vec![40, 3, 150], vec![31, 32, 33, 64, 95]] {
        let seqs: Vec<(usize, usize)> = ctx.iter().map(|&c| (c, 1)).collect();
        let (tables, used_blocks) = tables_with_holes(&seqs, bs);
        let pad_block = used_blocks as u32;
        let num_blocks = used_blocks + 1;
        let mut batch = Batch {
            block_tables: tables.clone(),
            ..Default::default()
        };
        for (si, &c) in ctx.iter().enumerate() {
            batch.tokens.push(BatchToken {
                token: 1,
                pos: c,
                seq: si,
                wide: false,
            });
            batch.logits_for.push(si);
        }
        let m = ctx.len();
        let layout = StepLayout::new(&batch, bs, 8).unwrap();
        let lim = GraphLimits::new(256, bs, part, pad_block);
        let key = key_for(&batch, &layout, &lim).expect("a decode step takes a graph");
        let padded = PaddedDecode::new(&batch, &layout, key, &lim).unwrap();
        // The cached context, in both caches alike.
        let cache_len = num_blocks * bs * row;
        let (kc0, vc0) = (values(cache_len, 5, 1.0), values(cache_len, 6, 1.0));
        // Padding rows all compute token 0 at position 0: the same K/V,
        // written to the same slot of the pad block.
        let same_pad = |mut x: Vec<f32>, w: usize| {
            let first = x[m * w..(m + 1).min(key.rows) * w].to_vec();
            for r in m..key.rows {
                x[r * w..(r + 1) * w].copy_from_slice(&first);
            }
            x
        };
        let k = same_pad(values(key.rows * row, 11, 1.0), row);
        let v = same_pad(values(key.rows * row, 12, 1.0), row);
        let q = same_pad(values(key.rows * heads * hd, 13, 1.0), heads * hd);
        let shape = (nkv, group, hd, bs, part);
        let eager = DecodeRun {
            ids_rows: m,
            pos: &layout.pos,
            slots: &layout.slots,
            tok_table: &layout.tok_table,
            tables: &layout.tables,
            decode: &layout.decode,
            nparts: layout.decode_parts(0, part),
        };
        let graph = DecodeRun {
            ids_rows: key.rows,
            pos: &padded.pos,
            slots: &padded.slots,
            tok_table: &padded.tok_table,
            tables: &padded.tables,
            decode: &padded.decode,
            nparts: key.parts,
        };
        let (mut kc_e, mut vc_e) = (kc0.clone(), vc0.clone());
        let want = run_decode_step(s, &eager, &mut kc_e, &mut vc_e, &k, &v, &q, shape, 1);
        let got = twice("padded decode", |seed| {
            let (mut kc_g, mut vc_g) = (kc0.clone(), vc0.clone());
            let out = run_decode_step(s, &graph, &mut kc_g, &mut vc_g, &k, &v, &q, shape, seed);
            (bits(&out), bits(&kc_g), bits(&vc_g))
        });
        let label = format!(
            "ctx {ctx:?}: {m} rows as {}, {} partitions as {}",
            key.rows, eager.nparts, key.parts
        );
        // The real rows: the same bits.
        let n = m * heads * hd;
        assert_eq!(&got.0[..n], &bits(&want)[..n], "{label}: attention differs");
        // The caches: the same bits outside the pad block.
        let pad_at = pad_block as usize * bs * row;
        assert_eq!(&got.1[..pad_at], &bits(&kc_e)[..pad_at], "{label}: K cache");
        assert_eq!(&got.2[..pad_at], &bits(&vc_e)[..pad_at], "{label}: V cache");
        pass("attention_decode_f32", 800, &format!("graph {label}"), 0.0);
    }
    // The GEMV is batch-invariant: rows computed in a padded launch carry
    // the bits of the unpadded one.
    let (k, n) = (264usize, 17usize);
    let w = values(n * k, 21, 0.5);
    let bias = values(n, 22, 0.1);
    for (m, rows) in [(1usize, 1usize), (3, 4), (5, 8)] {
        let x = values(rows * k, 23, 1.0);
        let gemv = |mm: usize| {
            let mut y = vec![f32::NAN; mm * n];
            let cfg = Cfg::new(((n as u32).div_ceil(8), 1, 1), 256, 0);
            launch!(s, "gemv_f32", cfg; x.as_ptr() => *const f32, w.as_ptr() => *const f32, bias.as_ptr() => *const f32, y.as_mut_ptr() => *mut f32, mm as i32 => i32, n as i32 => i32, k as i32 => i32).unwrap();
            bits(&y)
        };
        assert_eq!(
            &gemv(rows)[..m * n],
            &gemv(m)[..],
            "gemv {m} rows padded to {rows}"
        );
        pass("gemv_f32", 800, &format!("graph {m} rows as {rows}"), 0.0);
    }
}
