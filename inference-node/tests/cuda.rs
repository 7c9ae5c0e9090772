//! The CUDA backend.
//!
//! Without a GPU (CI): `--device cuda` refuses to start with a clear
//! message and exit code 2, for every subcommand that takes a device.
//!
//! With an NVIDIA GPU: every test marked `#[ignore = "needs an NVIDIA GPU…"]`
//! — each kernel against the CPU implementation on random inputs of real
//! shapes, odd sizes and long contexts; `check-golden --device cuda` on the
//! fixtures; a served model under 32 concurrent streamed clients equal to
//! the CPU's greedy outputs; a model split over two GPU contexts; out of
//! memory at load; decode replayed from CUDA graphs equal to eager decode,
//! bit for bit. Run them with
//! `cargo nextest run -p copyhold-node --run-ignored only -E 'binary(cuda)'`
//! (or the archived binaries: docs/cuda.md). NVRTC and the CUDA headers must
//! be findable (`LD_LIBRARY_PATH`, `COPYHOLD_CUDA_INCLUDE`).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copyhold_node::cpu::layers::{RopeRow, apply_rope};
use copyhold_node::cuda::CudaError;
use copyhold_node::cuda::backend::{CudaBackend, CudaOptions, probe};
use copyhold_node::cuda::kernels::Kernels;
use copyhold_node::cuda::nvrtc::{Nvrtc, build_all, include_dirs};
use copyhold_node::cuda::plan::{self, GemmMode, KvDtype};
use copyhold_node::engine::backend::{Backend, Batch, BatchToken};
use copyhold_node::engine::sampling::{Rng, SamplingParams, argmax, sample};
use copyhold_node::golden::check_on;
use copyhold_node::load::Device;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use serde_json::{Value, json};

/// The node binary: nextest's run-time variable first (it follows an
/// archive to another machine), then `COPYHOLD_NODE_BIN`, then the build path.
fn bin() -> Command {
    let path = std::env::var_os("NEXTEST_BIN_EXE_copyhold-node")
        .or_else(|| std::env::var_os("COPYHOLD_NODE_BIN"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_copyhold-node")));
    Command::new(path)
}

#[test]
fn without_a_driver_every_device_cuda_command_fails_with_a_clear_message() {
    if !matches!(probe(), Err(CudaError::LibraryMissing { .. })) {
        // A GPU machine: the GPU tests below are the ones that matter.
        // Here the driver is found, so a missing model must be what fails.
        let out = bin()
            .args(["check-golden", "--device", "cuda", "/nonexistent"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        return;
    }
    let model = support::fixtures().join("tiny-llama");
    let runs: [Vec<&str>; 3] = [
        vec!["serve", "--port", "0", "--device", "cuda", "--model"],
        vec!["check-golden", "--device", "cuda"],
        vec![
            "bench", "--device", "cuda", "--prompt", "8", "--gen", "2", "--model",
        ],
    ];
    for args in runs {
        let out = bin().args(&args).arg(&model).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("--device cuda: libcuda (the NVIDIA driver) was not found"),
            "{args:?}: {err}"
        );
    }
}

// ---------------------------------------------------------------- GPU only

struct Gpu {
    st: Arc<CudaStream>,
    k: Kernels,
}

fn gpu() -> Gpu {
    probe().expect("these tests need an NVIDIA GPU and driver");
    let ctx = CudaContext::new(0).unwrap();
    let (major, minor) = ctx.compute_capability().unwrap();
    let nvrtc = Nvrtc::open().unwrap();
    let inc = include_dirs(&[]).unwrap();
    let cubins = build_all(&nvrtc, (major * 10 + minor) as u32, &inc, None).unwrap();
    let k = Kernels::load(&ctx, cubins.into_iter().map(|c| c.0).collect()).unwrap();
    Gpu {
        st: ctx.default_stream(),
        k,
    }
}

fn rand_vec(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
        .collect()
}

/// max |a - b| / max |b|: the normwise relative error.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn cfg1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).max(1), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[derive(Clone, Copy, Debug)]
enum Wd {
    F32,
    F16,
    Bf16,
}

fn round(v: &[f32], d: Wd) -> Vec<f32> {
    match d {
        Wd::F32 => v.to_vec(),
        Wd::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        Wd::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
    }
}

enum DevBuf {
    F32(CudaSlice<f32>),
    U16(CudaSlice<u16>),
}

fn upload(g: &Gpu, v: &[f32], d: Wd) -> DevBuf {
    match d {
        Wd::F32 => DevBuf::F32(g.st.clone_htod(v).unwrap()),
        Wd::F16 => DevBuf::U16(
            g.st.clone_htod(
                &v.iter()
                    .map(|&x| f16::from_f32(x).to_bits())
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
        ),
        Wd::Bf16 => DevBuf::U16(
            g.st.clone_htod(
                &v.iter()
                    .map(|&x| bf16::from_f32(x).to_bits())
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
        ),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn gemv_matches_the_cpu_for_every_weight_dtype_and_odd_sizes() {
    let g = gpu();
    let mut rng = Rng::new(1);
    for d in [Wd::F32, Wd::F16, Wd::Bf16] {
        for (n, k) in [(4096, 4096), (1000, 4095), (33, 7), (32000, 2048)] {
            for m in [1, 3, 8] {
                let w = round(&rand_vec(&mut rng, n * k, 0.05), d);
                let x = rand_vec(&mut rng, m * k, 1.0);
                let bias = rand_vec(&mut rng, n, 0.1);
                let want: Vec<f32> = (0..m * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        let dot: f64 = (0..k)
                            .map(|kk| x[r * k + kk] as f64 * w[j * k + kk] as f64)
                            .sum();
                        (dot + bias[j] as f64) as f32
                    })
                    .collect();
                let wd = upload(&g, &w, d);
                let xd = g.st.clone_htod(&x).unwrap();
                let bd = g.st.clone_htod(&bias).unwrap();
                let mut yd = g.st.alloc_zeros::<f32>(m * n).unwrap();
                let name = match d {
                    Wd::F32 => "gemv_f32",
                    Wd::F16 => "gemv_f16",
                    Wd::Bf16 => "gemv_bf16",
                };
                let (mi, ni, ki) = (m as i32, n as i32, k as i32);
                let mut b = g.st.launch_builder(g.k.get(name).unwrap());
                b.arg(&xd);
                match &wd {
                    DevBuf::F32(w) => b.arg(w),
                    DevBuf::U16(w) => b.arg(w),
                };
                b.arg(&bd).arg(&mut yd).arg(&mi).arg(&ni).arg(&ki);
                let cfg = LaunchConfig {
                    grid_dim: ((n as u32).div_ceil(8), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { b.launch(cfg) }.unwrap();
                let got = g.st.clone_dtoh(&yd).unwrap();
                let e = rel_err(&got, &want);
                assert!(e <= 1e-5, "{d:?} m={m} n={n} k={k}: {e}");
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn embedding_rmsnorm_swiglu_and_rope_match_the_cpu() {
    let g = gpu();
    let mut rng = Rng::new(2);
    // Embedding: exact for every dtype.
    for d in [Wd::F32, Wd::F16, Wd::Bf16] {
        let (vocab, h) = (1001, 96);
        let table = round(&rand_vec(&mut rng, vocab * h, 1.0), d);
        let ids: Vec<u32> = vec![0, 1000, 17, 17, 512];
        let td = upload(&g, &table, d);
        let idd = g.st.clone_htod(&ids).unwrap();
        let mut out = g.st.alloc_zeros::<f32>(ids.len() * h).unwrap();
        let name = match d {
            Wd::F32 => "embedding_f32",
            Wd::F16 => "embedding_f16",
            Wd::Bf16 => "embedding_bf16",
        };
        let (mi, hi, vi) = (ids.len() as i32, h as i32, vocab as i32);
        let mut b = g.st.launch_builder(g.k.get(name).unwrap());
        match &td {
            DevBuf::F32(t) => b.arg(t),
            DevBuf::U16(t) => b.arg(t),
        };
        b.arg(&idd).arg(&mut out).arg(&mi).arg(&hi).arg(&vi);
        unsafe { b.launch(cfg1d(ids.len() * h)) }.unwrap();
        let got = g.st.clone_dtoh(&out).unwrap();
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert_eq!(&got[t * h..(t + 1) * h], &table[id * h..(id + 1) * h]);
        }
    }
    // RMSNorm with and without the fused residual add, odd widths.
    for d in [4096usize, 4095, 64] {
        let m = 5;
        let x = rand_vec(&mut rng, m * d, 2.0);
        let delta = rand_vec(&mut rng, m * d, 1.0);
        let w = rand_vec(&mut rng, d, 1.0);
        for with_delta in [false, true] {
            let xs: Vec<f32> = if with_delta {
                x.iter().zip(&delta).map(|(a, b)| a + b).collect()
            } else {
                x.clone()
            };
            let norm = copyhold_node::model::layers::RmsNorm {
                w: w.clone(),
                eps: 1e-6,
            };
            let want = norm.forward(&xs);
            let mut xd = g.st.clone_htod(&x).unwrap();
            let dd = g.st.clone_htod(&delta).unwrap();
            let wd = g.st.clone_htod(&w).unwrap();
            let mut out = g.st.alloc_zeros::<f32>(m * d).unwrap();
            let (di, eps, null) = (d as i32, 1e-6f32, 0u64);
            let mut b = g.st.launch_builder(g.k.get("add_rmsnorm").unwrap());
            b.arg(&mut xd);
            if with_delta {
                b.arg(&dd);
            } else {
                b.arg(&null);
            }
            b.arg(&wd).arg(&mut out).arg(&di).arg(&eps);
            let cfg = LaunchConfig {
                grid_dim: (m as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(cfg) }.unwrap();
            assert!(rel_err(&g.st.clone_dtoh(&out).unwrap(), &want) <= 1e-5);
            assert!(rel_err(&g.st.clone_dtoh(&xd).unwrap(), &xs) <= 1e-6);
        }
    }
    // SwiGLU.
    let n = 11_008 * 3 + 1;
    let gate = rand_vec(&mut rng, n, 8.0);
    let up = rand_vec(&mut rng, n, 2.0);
    let want: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    let mut gd = g.st.clone_htod(&gate).unwrap();
    let ud = g.st.clone_htod(&up).unwrap();
    let nn = n as u64;
    unsafe {
        g.st.launch_builder(g.k.get("silu_mul").unwrap())
            .arg(&mut gd)
            .arg(&ud)
            .arg(&nn)
            .launch(cfg1d(n))
    }
    .unwrap();
    assert!(rel_err(&g.st.clone_dtoh(&gd).unwrap(), &want) <= 1e-5);
    // RoPE, both layouts, positions up to a long context, scaled frequencies.
    for (head_dim, heads) in [(128usize, 8usize), (64, 3), (16, 4)] {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / 500_000f64.powf(2.0 * i as f64 / head_dim as f64) / 8.0)
            .collect();
        let pos: Vec<i32> = vec![0, 1, 4095, 131_071, 7];
        let m = pos.len();
        let x = rand_vec(&mut rng, m * heads * head_dim, 1.0);
        let rows = copyhold_node::cpu::layers::rope_rows(
            &inv_freq,
            &pos.iter().map(|&p| p as usize).collect::<Vec<_>>(),
        );
        for interleaved in [0i32, 1] {
            let mut want = x.clone();
            for (t, r) in rows.iter().enumerate() {
                let v = &mut want[t * heads * head_dim..(t + 1) * heads * head_dim];
                if interleaved == 0 {
                    apply_rope(v, heads, head_dim, r);
                } else {
                    rope_interleaved(v, heads, head_dim, r);
                }
            }
            let pd = g.st.clone_htod(&pos).unwrap();
            let fd = g.st.clone_htod(&inv_freq).unwrap();
            let mut cd = g.st.alloc_zeros::<f32>(m * half).unwrap();
            let mut sd = g.st.alloc_zeros::<f32>(m * half).unwrap();
            let (mi, hi) = (m as i32, half as i32);
            unsafe {
                g.st.launch_builder(g.k.get("rope_table").unwrap())
                    .arg(&pd)
                    .arg(&fd)
                    .arg(&mut cd)
                    .arg(&mut sd)
                    .arg(&mi)
                    .arg(&hi)
                    .launch(cfg1d(m * half))
            }
            .unwrap();
            let mut xd = g.st.clone_htod(&x).unwrap();
            let (hh, hdi) = (heads as i32, head_dim as i32);
            unsafe {
                g.st.launch_builder(g.k.get("rope_apply").unwrap())
                    .arg(&mut xd)
                    .arg(&cd)
                    .arg(&sd)
                    .arg(&mi)
                    .arg(&hh)
                    .arg(&hdi)
                    .arg(&interleaved)
                    .launch(cfg1d(m * heads * half))
            }
            .unwrap();
            let e = rel_err(&g.st.clone_dtoh(&xd).unwrap(), &want);
            assert!(
                e <= 1e-5,
                "head_dim {head_dim} interleaved {interleaved}: {e}"
            );
        }
    }
}

fn rope_interleaved(x: &mut [f32], heads: usize, head_dim: usize, r: &RopeRow) {
    for h in 0..heads {
        let v = &mut x[h * head_dim..(h + 1) * head_dim];
        for i in 0..head_dim / 2 {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            v[2 * i] = a * r.cos[i] - b * r.sin[i];
            v[2 * i + 1] = b * r.cos[i] + a * r.sin[i];
        }
    }
}

/// Reference paged attention for one query (layers.rs's loop, in f64).
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    table: &[u32],
    pos: usize,
    window: usize,
    kv_heads: usize,
    head_dim: usize,
    block: usize,
    kvh: usize,
) -> Vec<f32> {
    let row = kv_heads * head_dim;
    let start = if window > 0 {
        (pos + 1).saturating_sub(window)
    } else {
        0
    };
    let scale = 1.0 / (head_dim as f64).sqrt();
    let slot = |p: usize| table[p / block] as usize * block + p % block;
    let s: Vec<f64> = (start..=pos)
        .map(|p| {
            let k = &kc[slot(p) * row + kvh * head_dim..][..head_dim];
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut out = vec![0f64; head_dim];
    for (j, p) in (start..=pos).enumerate() {
        let v = &vc[slot(p) * row + kvh * head_dim..][..head_dim];
        for d in 0..head_dim {
            out[d] += e[j] / z * v[d] as f64;
        }
    }
    out.into_iter().map(|x| x as f32).collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn paged_attention_decode_split_k_and_prefill_match_the_cpu() {
    let g = gpu();
    let mut rng = Rng::new(3);
    for (heads, kv_heads, head_dim) in [(32usize, 8usize, 128usize), (4, 2, 16), (12, 4, 64)] {
        for kvd in [KvDtype::F32, KvDtype::F16] {
            for window in [0usize, 700] {
                let block = 16;
                let row = kv_heads * head_dim;
                // Sequence 0 decodes at position 5000 (split-K); sequence 1
                // prefills 70 tokens after a cached prefix of 30; sequence 2
                // decodes its first token.
                let lens = [5001usize, 100, 1];
                let mut next_block = 0u32;
                let mut tables: Vec<Vec<u32>> = Vec::new();
                for &l in &lens {
                    let nb = l.div_ceil(block);
                    let mut t: Vec<u32> = (next_block..next_block + nb as u32).collect();
                    // Not in order: the kernels must follow the table.
                    t.reverse();
                    next_block += nb as u32;
                    tables.push(t);
                }
                let slots_total = next_block as usize * block;
                let kc = round(
                    &rand_vec(&mut rng, slots_total * row, 1.0),
                    if kvd == KvDtype::F16 {
                        Wd::F16
                    } else {
                        Wd::F32
                    },
                );
                let vc = round(
                    &rand_vec(&mut rng, slots_total * row, 1.0),
                    if kvd == KvDtype::F16 {
                        Wd::F16
                    } else {
                        Wd::F32
                    },
                );
                let mut batch = copyhold_node::engine::backend::Batch {
                    block_tables: tables.clone(),
                    ..Default::default()
                };
                let tok = |pos, seq| copyhold_node::engine::backend::BatchToken {
                    token: 0,
                    pos,
                    seq,
                    wide: true,
                };
                batch.tokens.push(tok(5000, 0));
                for p in 30..100 {
                    batch.tokens.push(tok(p, 1));
                }
                batch.tokens.push(tok(0, 2));
                let (tq, tk) = plan::prefill_tile(head_dim);
                let layout = plan::StepLayout::new(&batch, block, tq).unwrap();
                let m = batch.tokens.len();
                let q = rand_vec(&mut rng, m * heads * head_dim, 1.0);
                let kvbuf = |v: &[f32]| {
                    upload(
                        &g,
                        v,
                        if kvd == KvDtype::F16 {
                            Wd::F16
                        } else {
                            Wd::F32
                        },
                    )
                };
                let (kd, vd) = (kvbuf(&kc), kvbuf(&vc));
                let qd = g.st.clone_htod(&q).unwrap();
                let mut out = g.st.alloc_zeros::<f32>(m * heads * head_dim).unwrap();
                let posd = g.st.clone_htod(&layout.pos).unwrap();
                let ttd = g.st.clone_htod(&layout.tok_table).unwrap();
                let tabd = g.st.clone_htod(&layout.tables).unwrap();
                let group = heads / kv_heads;
                let part = plan::decode_part_size(group, head_dim).unwrap();
                let nparts = layout.decode_parts(window, part);
                assert!(window > 0 || nparts > 1, "the long context must split");
                let nd = layout.decode.len();
                let decd = g.st.clone_htod(&layout.decode).unwrap();
                let po =
                    g.st.alloc_zeros::<f32>(nd * heads * nparts * head_dim)
                        .unwrap();
                let pm = g.st.alloc_zeros::<f32>(nd * heads * nparts).unwrap();
                let ps = g.st.alloc_zeros::<f32>(nd * heads * nparts).unwrap();
                let sfx = if kvd == KvDtype::F16 { "f16" } else { "f32" };
                let (hi, kvi, hdi, bsi, wi, pi, scale) = (
                    heads as i32,
                    kv_heads as i32,
                    head_dim as i32,
                    block as i32,
                    window as i32,
                    part as i32,
                    1.0f32 / (head_dim as f32).sqrt(),
                );
                let dec_name: &'static str = if sfx == "f16" {
                    "attention_decode_f16"
                } else {
                    "attention_decode_f32"
                };
                let mut b = g.st.launch_builder(g.k.get(dec_name).unwrap());
                b.arg(&qd);
                match (&kd, &vd) {
                    (DevBuf::F32(k), DevBuf::F32(v)) => b.arg(k).arg(v),
                    (DevBuf::U16(k), DevBuf::U16(v)) => b.arg(k).arg(v),
                    _ => unreachable!(),
                };
                b.arg(&mut out)
                    .arg(&decd)
                    .arg(&posd)
                    .arg(&ttd)
                    .arg(&tabd)
                    .arg(&hi)
                    .arg(&kvi)
                    .arg(&hdi)
                    .arg(&bsi)
                    .arg(&wi)
                    .arg(&pi)
                    .arg(&scale)
                    .arg(&po)
                    .arg(&pm)
                    .arg(&ps);
                let cfg = LaunchConfig {
                    grid_dim: (nd as u32, kv_heads as u32, nparts as u32),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: plan::decode_smem(group, head_dim, part) as u32,
                };
                unsafe { b.launch(cfg) }.unwrap();
                if nparts > 1 {
                    let npi = nparts as i32;
                    let cfg = LaunchConfig {
                        grid_dim: (nd as u32, heads as u32, 1),
                        block_dim: (128, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe {
                        g.st.launch_builder(g.k.get("attention_reduce").unwrap())
                            .arg(&po)
                            .arg(&pm)
                            .arg(&ps)
                            .arg(&mut out)
                            .arg(&decd)
                            .arg(&hi)
                            .arg(&hdi)
                            .arg(&npi)
                            .launch(cfg)
                    }
                    .unwrap();
                }
                let tiles = g.st.clone_htod(&layout.tiles).unwrap();
                let nt = layout.tiles.len() / 2;
                let (tqi, tki) = (tq as i32, tk as i32);
                let pre_name: &'static str = if sfx == "f16" {
                    "attention_prefill_f16"
                } else {
                    "attention_prefill_f32"
                };
                let mut b = g.st.launch_builder(g.k.get(pre_name).unwrap());
                b.arg(&qd);
                match (&kd, &vd) {
                    (DevBuf::F32(k), DevBuf::F32(v)) => b.arg(k).arg(v),
                    (DevBuf::U16(k), DevBuf::U16(v)) => b.arg(k).arg(v),
                    _ => unreachable!(),
                };
                b.arg(&mut out)
                    .arg(&tiles)
                    .arg(&posd)
                    .arg(&ttd)
                    .arg(&tabd)
                    .arg(&hi)
                    .arg(&kvi)
                    .arg(&hdi)
                    .arg(&bsi)
                    .arg(&wi)
                    .arg(&tqi)
                    .arg(&tki)
                    .arg(&scale);
                let cfg = LaunchConfig {
                    grid_dim: (nt as u32, heads as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: plan::prefill_smem(head_dim, tq, tk) as u32,
                };
                unsafe { b.launch(cfg) }.unwrap();
                let got = g.st.clone_dtoh(&out).unwrap();
                let mut want = vec![0f32; got.len()];
                for (t, bt) in batch.tokens.iter().enumerate() {
                    for h in 0..heads {
                        let o = ref_attention(
                            &q[(t * heads + h) * head_dim..][..head_dim],
                            &kc,
                            &vc,
                            &tables[bt.seq],
                            bt.pos,
                            window,
                            kv_heads,
                            head_dim,
                            block,
                            h / group,
                        );
                        want[(t * heads + h) * head_dim..][..head_dim].copy_from_slice(&o);
                    }
                }
                let e = rel_err(&got, &want);
                assert!(
                    e <= 1e-5,
                    "heads {heads}/{kv_heads} dim {head_dim} {kvd:?} window {window}: {e}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn argmax_and_sampling_on_the_device_choose_what_the_cpu_sampler_chooses() {
    let g = gpu();
    let mut rng = Rng::new(4);
    let vocab = 32_003;
    let rows = 64;
    let mut logits = rand_vec(&mut rng, rows * vocab, 6.0);
    // Ties go to the lowest id; NaN and -inf never win.
    logits[5] = 50.0;
    logits[900] = 50.0;
    logits[vocab + 3] = f32::NAN;
    logits[2 * vocab + 7] = f32::NEG_INFINITY;
    let ld = g.st.clone_htod(&logits).unwrap();
    let vi = vocab as i32;
    let mut ids = g.st.alloc_zeros::<i32>(rows).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        g.st.launch_builder(g.k.get("argmax_rows").unwrap())
            .arg(&ld)
            .arg(&vi)
            .arg(&mut ids)
            .launch(cfg)
    }
    .unwrap();
    let got = g.st.clone_dtoh(&ids).unwrap();
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        if r == 1 {
            continue; // NaN at id 3: the CPU's comparison order differs there
        }
        assert_eq!(got[r] as u32, argmax(row), "row {r}");
    }
    // Sampling: the same uniform number gives the same token.
    let settings = [
        (0.7f32, 0.9f32, 0.0f32),
        (1.0, 1.0, 0.0),
        (1.3, 0.5, 0.05),
        (0.2, 0.95, 0.1),
    ];
    let mut agree = 0;
    let mut total = 0;
    for (t, p, mp) in settings {
        let params = SamplingParams {
            temperature: t,
            top_p: p,
            min_p: mp,
            ..Default::default()
        };
        let mut rngs: Vec<Rng> = (0..rows).map(|i| Rng::new(100 + i as u64)).collect();
        let uniform: Vec<f64> = rngs.iter().map(|r| r.clone().next_f64()).collect();
        let want: Vec<u32> = (0..rows)
            .map(|r| {
                sample(
                    &logits[r * vocab..(r + 1) * vocab],
                    &params,
                    &[],
                    &[],
                    &mut rngs[r],
                )
                .0
            })
            .collect();
        let td = g.st.clone_htod(&vec![t; rows]).unwrap();
        let kd = g.st.clone_htod(&vec![0i32; rows]).unwrap();
        let pd = g.st.clone_htod(&vec![p; rows]).unwrap();
        let md = g.st.clone_htod(&vec![mp; rows]).unwrap();
        let ud = g.st.clone_htod(&uniform).unwrap();
        unsafe {
            g.st.launch_builder(g.k.get("sample_rows").unwrap())
                .arg(&ld)
                .arg(&vi)
                .arg(&td)
                .arg(&kd)
                .arg(&pd)
                .arg(&md)
                .arg(&ud)
                .arg(&mut ids)
                .launch(cfg)
        }
        .unwrap();
        let got = g.st.clone_dtoh(&ids).unwrap();
        for r in 0..rows {
            total += 1;
            agree += (got[r] as u32 == want[r]) as usize;
        }
    }
    // Summation order differs (block vs sequential f64): a draw landing
    // within rounding of a boundary may differ; nothing else may.
    assert!(agree * 100 >= total * 99, "{agree}/{total} draws agree");
}

fn exact() -> CudaOptions {
    CudaOptions {
        kv_dtype: KvDtype::F32,
        gemm: GemmMode::Exact,
        ..Default::default()
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn check_golden_on_cuda_matches_both_fixtures() {
    for fixture in ["tiny-llama", "tiny-llama-bf16"] {
        let r = check_on(&support::fixtures().join(fixture), &Device::Cuda(exact())).unwrap();
        eprintln!("{r:?}");
        assert!(
            r.ok && r.greedy_match && r.max_abs_logit_diff <= 1e-3,
            "{r:?}"
        );
        assert_eq!(r.device, "cuda");
        // The serving defaults (f16 KV, tensor-core GEMMs): close, reported.
        let fast = check_on(
            &support::fixtures().join(fixture),
            &Device::Cuda(CudaOptions::default()),
        )
        .unwrap();
        eprintln!("fast: {fast:?}");
        assert!(fast.max_abs_logit_diff <= 5e-2, "{fast:?}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn a_model_split_over_two_gpu_contexts_matches_the_fixtures() {
    let opts = CudaOptions {
        devices: Some(vec![0, 0]),
        max_layers_per_gpu: Some(2),
        ..exact()
    };
    let r = check_on(
        &support::fixtures().join("tiny-llama"),
        &Device::Cuda(opts.clone()),
    )
    .unwrap();
    assert!(r.ok, "{r:?}");
    let model = copyhold_node::model::load(&support::fixtures().join("tiny-llama")).unwrap();
    let b = CudaBackend::new(&model, opts).unwrap();
    assert_eq!(b.placement(), vec![(0, 0..2), (0, 2..3)]);
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn out_of_memory_at_load_names_bytes_needed_and_free() {
    let model = copyhold_node::model::load(&support::fixtures().join("tiny-llama")).unwrap();
    let opts = CudaOptions {
        gpu_memory_utilization: 0.0,
        ..exact()
    };
    let e = CudaBackend::new(&model, opts)
        .err()
        .expect("must not fit in 0 bytes");
    let msg = e.to_string();
    assert!(matches!(e, CudaError::OutOfMemory { .. }), "{msg}");
    assert!(msg.contains("needs") && msg.contains("free"), "{msg}");
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(model: &Path, extra: &[&str]) -> Server {
    let mut child = bin()
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let base = format!("http://{}", v["listening"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/health")).await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server { child, base }
}

/// A streamed chat completion's text.
async fn stream_chat(base: &str, body: Value) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            out.push_str(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
async fn a_served_model_under_32_concurrent_streamed_clients_equals_the_cpu_greedy_outputs() {
    let model = support::fixtures().join("tiny-llama");
    let cpu = start(&model, &["--device", "cpu"]).await;
    let cuda = start(
        &model,
        &[
            "--device",
            "cuda",
            "--cuda-gemm",
            "exact",
            "--kv-cache-dtype",
            "f32",
        ],
    )
    .await;
    let bodies: Vec<Value> = (0..32)
        .map(|i| {
            json!({
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": format!("request {i}: tell me about {}", i * 7)}],
                "max_tokens": 24, "temperature": 0, "stream": true, "ignore_eos": true,
            })
        })
        .collect();
    let run = |base: String| {
        let bodies = bodies.clone();
        async move {
            futures::future::join_all(bodies.into_iter().map(|b| {
                let base = base.clone();
                async move { stream_chat(&base, b).await }
            }))
            .await
        }
    };
    let want = run(cpu.base.clone()).await;
    let got = run(cuda.base.clone()).await;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
}

/// Prompts of the given lengths prefilled, then `steps` decode steps of all
/// of them together; the logits of every decode step.
fn decode_logits(b: &mut CudaBackend, prompts: &[usize], steps: usize) -> Vec<Vec<Vec<f32>>> {
    let bs = 16;
    let tables: Vec<Vec<u32>> = (0..prompts.len())
        .map(|s| (0..8).map(|i| (s * 8 + i) as u32).collect())
        .collect();
    let token = |s: usize, p: usize| ((s * 131 + p * 17) % 200 + 3) as u32;
    for (s, &n) in prompts.iter().enumerate() {
        let batch = Batch {
            tokens: (0..n)
                .map(|p| BatchToken {
                    token: token(s, p),
                    pos: p,
                    seq: s,
                    wide: false,
                })
                .collect(),
            block_tables: tables.clone(),
            logits_for: vec![n - 1],
        };
        b.forward(&batch).unwrap();
    }
    let mut out = Vec::new();
    for step in 0..steps {
        let batch = Batch {
            tokens: prompts
                .iter()
                .enumerate()
                .map(|(s, &n)| BatchToken {
                    token: token(s, n + step),
                    pos: n + step,
                    seq: s,
                    wide: false,
                })
                .collect(),
            block_tables: tables.clone(),
            logits_for: (0..prompts.len()).collect(),
        };
        assert!(prompts.iter().all(|&n| n + step < 8 * bs));
        out.push(b.forward(&batch).unwrap());
    }
    out
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn decode_replayed_from_cuda_graphs_equals_eager_decode_bit_for_bit() {
    let model = copyhold_node::model::load(&support::fixtures().join("tiny-llama")).unwrap();
    // 1, 3 and 5 sequences: buckets 1, 4 and 8 with padding rows; contexts
    // that cross split-K partitions as they grow.
    for prompts in [vec![5usize], vec![3, 40, 17], vec![1, 2, 60, 33, 9]] {
        let opts = CudaOptions {
            num_blocks: Some(64),
            max_context: Some(128),
            ..CudaOptions::default()
        };
        let mut eager = CudaBackend::new(&model, opts.clone()).unwrap();
        let mut graphs = CudaBackend::new(
            &model,
            CudaOptions {
                cuda_graphs: true,
                ..opts
            },
        )
        .unwrap();
        let want = decode_logits(&mut eager, &prompts, 40);
        let got = decode_logits(&mut graphs, &prompts, 40);
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            for (row, (gr, wr)) in g.iter().zip(w).enumerate() {
                let gb: Vec<u32> = gr.iter().map(|v| v.to_bits()).collect();
                let wb: Vec<u32> = wr.iter().map(|v| v.to_bits()).collect();
                assert!(gb == wb, "{prompts:?}: step {step} row {row} differs");
            }
        }
        eprintln!("graphs: {prompts:?} × 40 decode steps bit-identical");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
async fn a_served_model_with_cuda_graphs_under_6_streamed_clients_equals_the_cpu_greedy_outputs() {
    let model = support::fixtures().join("tiny-llama");
    let cpu = start(&model, &["--device", "cpu"]).await;
    let args = [
        "--device",
        "cuda",
        "--cuda-gemm",
        "exact",
        "--kv-cache-dtype",
        "f32",
    ];
    let cuda = start(&model, &[&args[..], &["--cuda-graphs"]].concat()).await;
    let bodies: Vec<Value> = (0..6)
        .map(|i| {
            json!({
                "model": "tiny-llama",
                "messages": [{"role": "user", "content": format!("graph {i}: count to {}", i * 3)}],
                "max_tokens": 32, "temperature": 0, "stream": true, "ignore_eos": true,
            })
        })
        .collect();
    let run = |base: String| {
        let bodies = bodies.clone();
        async move {
            futures::future::join_all(bodies.into_iter().map(|b| {
                let base = base.clone();
                async move { stream_chat(&base, b).await }
            }))
            .await
        }
    };
    let want = run(cpu.base.clone()).await;
    let got = run(cuda.base.clone()).await;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i}");
    }
}

/// The tiny-llama fixture written as a GGUF Q8_0 file by the node's own
/// converter: q/k/v/o/gate/up (rows of 64) are Q8_0 blocks, down (rows of
/// 176, not whole blocks) stays f16, so both kinds run in one model.
fn q8_0_fixture() -> PathBuf {
    let d = std::env::temp_dir().join(format!("copyhold-cuda-q8_0-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let g = d.join("model.gguf");
    copyhold_node::model::gguf_write::convert(
        &support::fixtures().join("tiny-llama"),
        &g,
        copyhold_node::model::gguf_write::Scheme::Q8_0,
    )
    .unwrap();
    g
}

/// max |Δ| over all logits, relative to the range of the CPU's.
fn rel_to_range(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let all = want.iter().flatten();
    let (lo, hi) = all.fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let d = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    d / (hi - lo).max(f32::MIN_POSITIVE)
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn q8_0_gguf_logits_on_cuda_match_the_cpu_backend_for_prefill_and_decode() {
    use copyhold_node::cpu::attention::KvStore;
    use copyhold_node::model::quant::QType;
    use copyhold_node::model::weights::DType;
    let path = q8_0_fixture();
    let (model, _) = copyhold_node::model::open(&path).unwrap();
    assert_eq!(model.layers[0].q.w.dtype, DType::Q(QType::Q8_0));
    let bs = 16;
    let tables = vec![vec![0u32, 1]];
    // 24 prompt tokens (a prefill over 8 rows: cuBLAS on dequantized f16
    // in the fast mode, gemv_q8_0 in chunks of 8 in the exact one), then
    // two decode steps (gemv_q8_0 and the fused gemv3_q8_0).
    let tokens: Vec<u32> = (0..26).map(|i| ((i * 37) % 500 + 3) as u32).collect();
    let steps = prefill_then_two_decodes(&tokens, &tables);
    let mut kv = KvStore::new(&model.cfg, 2, bs, false);
    let want: Vec<Vec<Vec<f32>>> = steps.iter().map(|b| model.forward(b, &mut kv)).collect();
    // Exact mode: the CPU's 8-bit activations and integer sums; only the
    // order of f32 sums differs. Fast mode: f16 activations into cuBLAS
    // for the prefill, so looser there.
    for (opts, prefill_tol, decode_tol) in
        [(exact(), 1e-4, 1e-4), (CudaOptions::default(), 2e-2, 2e-2)]
    {
        let mut b = CudaBackend::new(&model, opts.clone()).unwrap();
        for (i, batch) in steps.iter().enumerate() {
            let got = b.forward(batch).unwrap();
            let e = rel_to_range(&got, &want[i]);
            let tol = if i == 0 { prefill_tol } else { decode_tol };
            eprintln!(
                "q8_0 step {i} gemm {:?}: max |Δ| / range {e:.2e}",
                opts.gemm
            );
            assert!(e <= tol, "step {i} gemm {:?}: {e} > {tol}", opts.gemm);
        }
    }
}

/// A synthesized Llama (hidden 256, FFN 512: rows that whole K-quant
/// blocks divide; the tiny-llama fixture's rows of 64 would fall back to
/// Q8_0) written as GGUF `scheme` by the node's own converter
/// (`copyhold-node gguf --type <scheme>`).
fn block_fixture(scheme: &str) -> PathBuf {
    use copyhold_node::model::config::Arch;
    use copyhold_node::model::gguf_write::{Scheme, convert};
    use copyhold_node::synth::{SynthSpec, synth};
    let d = std::env::temp_dir().join(format!("copyhold-cuda-{scheme}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let spec = SynthSpec {
        hidden: 256,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 512,
        vocab: 320,
        dtype: copyhold_node::model::weights::DType::F32,
        seed: 22,
        max_position_embeddings: 1024,
        ..SynthSpec::tiny(Arch::Llama)
    };
    synth(&spec, &d.join("hf")).unwrap();
    let g = d.join("model.gguf");
    convert(&d.join("hf"), &g, Scheme::parse(scheme).unwrap()).unwrap();
    g
}

#[test]
#[ignore = "needs an NVIDIA GPU: cargo nextest run -p copyhold-node --run-ignored only"]
fn q4_k_m_q5_k_m_and_q4_0_gguf_logits_on_cuda_match_the_cpu_backend_for_prefill_and_decode() {
    use copyhold_node::cpu::attention::KvStore;
    use copyhold_node::model::quant::QType;
    use copyhold_node::model::weights::DType;
    // Each scheme's blocks, as llama.cpp's quantize mixes them: q (Q4_K,
    // Q5_K or Q4_0) and v/down (Q6_K in the K-quant mixes).
    for (scheme, q_type, v_type) in [
        ("q4_k_m", QType::Q4K, QType::Q6K),
        ("q5_k_m", QType::Q5K, QType::Q6K),
        ("q4_0", QType::Q4_0, QType::Q4_0),
    ] {
        let (model, _) = copyhold_node::model::open(&block_fixture(scheme)).unwrap();
        assert_eq!(model.layers[0].q.w.dtype, DType::Q(q_type), "{scheme}");
        assert_eq!(model.layers[0].v.w.dtype, DType::Q(v_type), "{scheme}");
        assert_eq!(model.layers[0].down.w.dtype, DType::Q(v_type), "{scheme}");
        let tables = vec![vec![0u32, 1]];
        // 24 prompt tokens (cuBLAS on dequant_<fmt>_f16 in the fast mode,
        // gemv_<fmt> in chunks of 8 in the exact one), then two decode
        // steps (gemv_<fmt>, and gemv3_<fmt> for gate/up).
        let tokens: Vec<u32> = (0..26).map(|i| ((i * 37) % 300 + 3) as u32).collect();
        let steps = prefill_then_two_decodes(&tokens, &tables);
        let mut kv = KvStore::new(&model.cfg, 2, 16, false);
        let want: Vec<Vec<Vec<f32>>> = steps.iter().map(|b| model.forward(b, &mut kv)).collect();
        // Exact mode: every block GEMV has the CPU's bits (kernels_cpu.rs);
        // attention and norms differ by f32 rounding. Fast mode: f16
        // activations into cuBLAS for the prefill, so looser there.
        for (opts, prefill_tol, decode_tol) in
            [(exact(), 1e-4, 1e-4), (CudaOptions::default(), 2e-2, 2e-2)]
        {
            let mut b = CudaBackend::new(&model, opts.clone()).unwrap();
            for (i, batch) in steps.iter().enumerate() {
                let got = b.forward(batch).unwrap();
                let e = rel_to_range(&got, &want[i]);
                let tol = if i == 0 { prefill_tol } else { decode_tol };
                eprintln!(
                    "{scheme} step {i} gemm {:?}: max |Δ| / range {e:.2e}",
                    opts.gemm
                );
                assert!(
                    e <= tol,
                    "{scheme} step {i} gemm {:?}: {e} > {tol}",
                    opts.gemm
                );
            }
        }
    }
}

/// One sequence's 26 `tokens` as a 24-token prefill and two decode steps,
/// every position's logits asked for.
fn prefill_then_two_decodes(tokens: &[u32], tables: &[Vec<u32>]) -> [Batch; 3] {
    let step = |range: std::ops::Range<usize>| Batch {
        tokens: range
            .clone()
            .map(|pos| BatchToken {
                token: tokens[pos],
                pos,
                seq: 0,
                wide: false,
            })
            .collect(),
        block_tables: tables.to_vec(),
        logits_for: (0..range.len()).collect(),
    };
    [step(0..24), step(24..25), step(25..26)]
}
