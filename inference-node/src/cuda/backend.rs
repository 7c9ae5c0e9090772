//! The forward pass on NVIDIA GPUs, step for step the CPU engine's
//! (`models::Decoder::forward`, `layers::DecoderLayer::forward`), over the
//! same block tables.
//!
//! Per step: embedding gather → per layer [RMSNorm (fused with the
//! previous residual add) → q/k/v → RoPE → KV write → paged attention
//! (decode: split-K; prefill: tiled online softmax) → o → residual add +
//! RMSNorm → gate/up → SwiGLU → down] → final norm → LM head → logits or
//! tokens chosen on the device. Activations are f32; projections with up to
//! 8 rows use our GEMV kernel, bigger ones cuBLAS (see [`GemmMode`]).
//!
//! Layers are split across the GPUs of the node when one is too small
//! ([`plan::place`]); the hidden state moves between them through the host.
//!
//! `unsafe` here: kernel launches (argument types must match the `.cu`
//! signatures, written next to each launch) and raw cuBLAS calls.
#![allow(unsafe_code)]

mod graph;
mod quant;

use std::ffi::c_void;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as bres, sys as bsys};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    result as dres, sys as dsys,
};

use super::CudaError;
use super::convert::{self, HostBits};
use super::graph_plan::{self, GraphLimits};
use super::kernels::Kernels;
use super::nvrtc::{self, Nvrtc, Source};
use super::plan::{self, ArchPath, GEMV_MAX_ROWS, GemmMode, KvDtype, Placement, Sizes, StepLayout};
use super::scratch::Reuse;
use crate::engine::backend::{Backend, BackendError, Batch, RowOut, RowWant};
use crate::model::Decoder;
use crate::model::config::ModelConfig;
use crate::model::layers::Linear;
use crate::model::quant::QType;
use crate::model::weights::{DType, Tensor};

/// Options of `--device cuda`.
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Share of each GPU's memory this process may use.
    pub gpu_memory_utilization: f64,
    /// CUBIN cache folder (`None`: the default; see `nvrtc::default_cache_dir`).
    pub kernel_cache: Option<PathBuf>,
    /// Folders holding `cuda_fp16.h` (see `nvrtc::include_dirs`).
    pub include_dirs: Vec<PathBuf>,
    pub block_size: usize,
    /// Tokens per step and sequences per step the scratch is sized for.
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub kv_dtype: KvDtype,
    pub gemm: GemmMode,
    /// Exactly this many KV blocks instead of all the memory allows.
    pub num_blocks: Option<usize>,
    /// Use at most this many GPUs (default: all the driver shows).
    pub max_devices: Option<usize>,
    /// The GPU ordinals to use, in order (default: 0..max_devices). An
    /// ordinal may repeat: with `max_layers_per_gpu`, tests split a model
    /// across "GPUs" that are one card.
    pub devices: Option<Vec<usize>>,
    pub max_layers_per_gpu: Option<usize>,
    /// Longest sequence served (`--max-model-len`); `None`: the model's
    /// `max_position_embeddings`. Sizes the KV pool and the attention
    /// partials.
    pub max_context: Option<usize>,
    /// At most this many bytes of KV pool (`--kv-cache-mib`).
    pub kv_bytes: Option<u64>,
    /// Replay decode steps of up to 8 rows from CUDA graphs captured per
    /// row bucket (`--cuda-graphs`; see `graph_plan`). Needs the model on
    /// one GPU; costs one KV block (the padding rows' own).
    pub cuda_graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            gpu_memory_utilization: 0.9,
            kernel_cache: None,
            include_dirs: Vec::new(),
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 64,
            kv_dtype: KvDtype::F16,
            gemm: GemmMode::Fast,
            num_blocks: None,
            max_devices: None,
            devices: None,
            max_layers_per_gpu: None,
            max_context: None,
            kv_bytes: None,
            cuda_graphs: false,
        }
    }
}

/// What the driver reported.
#[derive(Debug, Clone)]
pub struct DriverInfo {
    /// CUDA version the driver supports, e.g. 12080 for 12.8.
    pub version: i32,
    pub devices: usize,
}

/// Oldest driver the CUBINs of NVRTC 12 load on.
pub const MIN_DRIVER: i32 = 12000;

/// Finds the driver and a device, or says clearly why not. Nothing here
/// panics when the library is absent (cudarc would).
pub fn probe() -> Result<DriverInfo, CudaError> {
    let present = std::panic::catch_unwind(|| unsafe { dsys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err(CudaError::LibraryMissing {
            lib: "libcuda (the NVIDIA driver)",
            hint: "no NVIDIA driver on this machine; run on a GPU node or use --device cpu".into(),
        });
    }
    let r = std::panic::catch_unwind(|| {
        dres::init()?;
        let mut v = 0i32;
        unsafe { dsys::cuDriverGetVersion(&mut v) }.result()?;
        let n = CudaContext::device_count()?;
        Ok::<_, cudarc::driver::DriverError>((v, n))
    });
    let (version, n) = match r {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            if format!("{e:?}").contains("NO_DEVICE") {
                return Err(CudaError::NoDevice);
            }
            return Err(CudaError::driver("initializing the driver", e));
        }
        Err(_) => {
            return Err(CudaError::DriverTooOld {
                found: "unknown (the driver library lacks basic entry points)".into(),
                need: "12.0".into(),
            });
        }
    };
    if version < MIN_DRIVER {
        return Err(CudaError::DriverTooOld {
            found: format!("{}.{}", version / 1000, version % 1000 / 10),
            need: "12.0".into(),
        });
    }
    if n <= 0 {
        return Err(CudaError::NoDevice);
    }
    Ok(DriverInfo {
        version,
        devices: n as usize,
    })
}

/// A weight matrix on the device in its device dtype.
enum DevW {
    F32(CudaSlice<f32>),
    /// f16 bits.
    F16(CudaSlice<u16>),
    /// bf16 bits (sm_80+ only).
    BF16(CudaSlice<u16>),
    /// GGUF blocks as stored in the file (Q8_0: 34 bytes per 32 values;
    /// Q4_0, Q4_K, Q5_K, Q6_K): `gemv_<fmt>` for decode,
    /// `dequant_<fmt>_f16` into a scratch buffer before cuBLAS for prefill
    /// (backend/quant.rs).
    Q(QType, CudaSlice<u8>),
}

struct DevLinear {
    w: DevW,
    bias: Option<CudaSlice<f32>>,
    n: usize,
    k: usize,
    /// This projection's flag in the shard's `overflow` buffer.
    slot: usize,
    /// Set once its activations overflowed f16: from then on it runs with
    /// f32 activations (the GEMV kernel) instead of the f16 cast + cuBLAS.
    exact: std::sync::atomic::AtomicBool,
}

struct DevLayer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    q: DevLinear,
    k: DevLinear,
    v: DevLinear,
    o: DevLinear,
    gate: DevLinear,
    up: DevLinear,
    down: DevLinear,
    window: usize,
}

enum KvBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
}

enum Head {
    Own(DevLinear),
    /// Tied to the embedding, which lives on this GPU.
    Embedding,
}

/// One GPU's share of the model.
struct Shard {
    ordinal: usize,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    blas: Option<CudaBlas>,
    layers: Range<usize>,
    dev_layers: Vec<DevLayer>,
    embed: Option<DevLinear>,
    norm: Option<CudaSlice<f32>>,
    head: Option<Head>,
    k_cache: Vec<KvBuf>,
    v_cache: Vec<KvBuf>,
    inv_freq: CudaSlice<f64>,
    /// One flag per projection (`DevLinear::slot`): its f16 cast overflowed.
    overflow: CudaSlice<i32>,
    /// Temporary buffers kept between steps.
    scratch: std::sync::Mutex<StepScratch>,
}

/// A shard's per-step buffers, reused while big enough (scratch.rs).
#[derive(Default)]
struct StepScratch {
    cast: Reuse<CudaSlice<u16>>,
    /// f16 copy of one block weight (any GGUF format) for a prefill GEMM.
    dequant: Reuse<CudaSlice<u16>>,
    part_out: Reuse<CudaSlice<f32>>,
    part_max: Reuse<CudaSlice<f32>>,
    part_sum: Reuse<CudaSlice<f32>>,
}

impl Shard {
    fn scratch(&self) -> Result<std::sync::MutexGuard<'_, StepScratch>, CudaError> {
        self.scratch.lock().map_err(|_| {
            CudaError::Unsupported("a step panicked holding the scratch buffers".into())
        })
    }
}

/// The CUDA backend.
pub struct CudaBackend {
    cfg: ModelConfig,
    opts: CudaOptions,
    shards: Vec<Shard>,
    num_blocks: usize,
    part_size: usize,
    tile: (usize, usize),
    /// Captured decode graphs (`--cuda-graphs`, one GPU).
    graphs: Option<graph::Graphs>,
}

fn drv(what: &str) -> impl Fn(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::driver(what, e)
}

fn bytes_of(t: &Tensor, d: DType) -> u64 {
    plan::device_bytes(&t.shape, d)
}

fn linear_bytes(l: &Linear, path: ArchPath) -> u64 {
    bytes_of(&l.w, plan::device_dtype(l.w.dtype, path, 0.0))
        + l.bias.as_ref().map_or(0, |b| 4 * b.len() as u64)
}

/// How a weight's device dtype is chosen: [`plan::device_dtype`] for
/// linears, [`plan::embedding_dtype`] for the embedding table.
type DtypeRule = fn(DType, ArchPath, f32) -> DType;

/// Upload-time conversion of a stored tensor to the device dtype `rule`
/// gives it.
fn upload_w(
    stream: &Arc<CudaStream>,
    t: &Tensor,
    path: ArchPath,
    rule: DtypeRule,
) -> Result<DevW, CudaError> {
    let what = format!("uploading {}", t.name);
    let oom = |e: cudarc::driver::DriverError| {
        if format!("{e:?}").contains("OUT_OF_MEMORY") {
            let free = stream.context().mem_get_info().map_or(0, |(f, _)| f as u64);
            CudaError::OutOfMemory {
                what: what.clone(),
                needed: (t.numel() * t.dtype.size()) as u64,
                free,
            }
        } else {
            CudaError::driver(what.clone(), e)
        }
    };
    if let DType::Q(_) = t.dtype {
        // Linears go up in the blocks the file stores; the embedding table
        // is dequantized once on the host (its gather has no block kernel).
        let device = rule(t.dtype, path, 0.0);
        if let DType::Q(q) = device {
            return Ok(DevW::Q(q, stream.clone_htod(t.bytes()).map_err(oom)?));
        }
        let wide = t.to_f32();
        return Ok(match device {
            DType::F32 => DevW::F32(stream.clone_htod(&wide).map_err(oom)?),
            _ => {
                let bits: Vec<u16> = wide
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                DevW::F16(stream.clone_htod(&bits).map_err(oom)?)
            }
        });
    }
    // Never an f32 copy of a tensor the device keeps in 16 bits (convert.rs).
    let raw = t.bytes();
    let max_abs = if t.dtype == DType::BF16 && !path.bf16_native() {
        convert::bf16_max_abs(raw)
    } else {
        0.0
    };
    let device = rule(t.dtype, path, max_abs);
    Ok(match (device, convert::device_bits(raw, t.dtype, device)) {
        (_, HostBits::F32(v)) => DevW::F32(stream.clone_htod(&v[..]).map_err(oom)?),
        (DType::BF16, HostBits::Half(h)) => DevW::BF16(stream.clone_htod(&h[..]).map_err(oom)?),
        (_, HostBits::Half(h)) => DevW::F16(stream.clone_htod(&h[..]).map_err(oom)?),
    })
}

fn upload_f32(
    stream: &Arc<CudaStream>,
    v: &[f32],
    what: &str,
) -> Result<CudaSlice<f32>, CudaError> {
    stream.clone_htod(v).map_err(drv(what))
}

fn upload_linear(
    stream: &Arc<CudaStream>,
    l: &Linear,
    path: ArchPath,
    slots: &mut usize,
) -> Result<DevLinear, CudaError> {
    *slots += 1;
    Ok(DevLinear {
        w: upload_w(stream, &l.w, path, plan::device_dtype)?,
        bias: match &l.bias {
            Some(b) => Some(upload_f32(stream, b, &l.w.name)?),
            None => None,
        },
        n: l.w.shape[0],
        k: l.w.shape[1],
        slot: *slots - 1,
        exact: false.into(),
    })
}

fn cfg1d(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Bytes of per-step buffers at the largest step.
fn scratch_bytes(cfg: &ModelConfig, opts: &CudaOptions, part_size: usize) -> u64 {
    let m = opts.max_batch_tokens.max(1) as u64;
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let qd = (cfg.num_heads * cfg.head_dim) as u64;
    let kvd = (cfg.num_kv_heads * cfg.head_dim) as u64;
    let rows = opts.max_running.max(1) as u64;
    let context = opts.max_context.map_or(cfg.max_position_embeddings, |c| {
        c.min(cfg.max_position_embeddings)
    });
    let parts = (context / part_size.max(1) + 1) as u64;
    let acts = m * (3 * h + 2 * qd + 2 * kvd + h + 3 * i + cfg.head_dim as u64);
    let half_cast = m * h.max(i).max(qd) / 2;
    let logits = rows * (h + 2 * cfg.vocab_size as u64);
    let partials = rows * cfg.num_heads as u64 * parts * (cfg.head_dim as u64 + 2);
    4 * (acts + half_cast + logits + partials) + (96 << 20)
}

impl CudaBackend {
    /// Uploads `model` to the GPUs: compiles (or loads cached) kernels for
    /// each GPU's exact architecture, places layers, sizes the KV pool.
    pub fn new(model: &Decoder, opts: CudaOptions) -> Result<CudaBackend, CudaError> {
        let info = probe()?;
        let cfg = model.cfg.clone();
        let group = cfg.num_heads / cfg.num_kv_heads.max(1);
        let part_size = plan::decode_part_size(group, cfg.head_dim)?;
        let tile = plan::prefill_tile(cfg.head_dim);
        let nvrtc = Nvrtc::open()?;
        let includes = nvrtc::include_dirs(&opts.include_dirs)?;
        let cache = opts.kernel_cache.clone().or_else(nvrtc::default_cache_dir);
        let devs = open_devices(&opts, &info)?;
        // One path for the whole model (the oldest GPU decides dtypes).
        let path = devs
            .iter()
            .map(|d| d.2)
            .min_by_key(|p| *p as u8)
            .unwrap_or(ArchPath::Pascal);
        let kv_per_block_layer =
            (2 * opts.block_size * cfg.num_kv_heads * cfg.head_dim * opts.kv_dtype.size()) as u64;
        let layer_sizes: Vec<u64> = model
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|x| linear_bytes(x, path))
                    .sum::<u64>()
                    + 8 * cfg.hidden_size as u64
            })
            .collect();
        let embed_bytes = bytes_of(
            &model.embed,
            plan::embedding_dtype(model.embed.dtype, path, 0.0),
        );
        let head_bytes = 4 * cfg.hidden_size as u64
            + match &model.lm_head {
                Some(h) => linear_bytes(h, path),
                None => 0,
            };
        let sizes = Sizes {
            embed: embed_bytes,
            head: head_bytes,
            layers: layer_sizes,
            kv_per_block_layer,
            min_blocks: opts
                .num_blocks
                .unwrap_or(opts.max_batch_tokens.div_ceil(opts.block_size) + 2)
                as u64,
            scratch: scratch_bytes(&cfg, &opts, part_size) + quant::dequant_bytes(model),
            max_layers_per_gpu: opts.max_layers_per_gpu,
        };
        let budgets: Vec<u64> = devs.iter().map(|d| d.3).collect();
        let mut placements = plan::place(&sizes, &budgets)?;
        // A tied head on another GPU than the embedding needs its own copy.
        if model.lm_head.is_none()
            && placements.len() > 1
            && let Some(last) = placements.last_mut()
        {
            last.bytes += embed_bytes;
            if last.bytes > budgets[last.device] {
                return Err(CudaError::OutOfMemory {
                    what: "placing the tied LM head".into(),
                    needed: last.bytes,
                    free: budgets[last.device],
                });
            }
        }
        let fit = plan::kv_blocks(&placements, &budgets, kv_per_block_layer)?;
        // Graphs' padding rows write into a block of their own, after the
        // engine's.
        let pad_blocks = usize::from(opts.cuda_graphs);
        let fit = fit.saturating_sub(pad_blocks);
        let num_blocks = match opts.num_blocks {
            Some(n) if n > fit => {
                return Err(CudaError::OutOfMemory {
                    what: format!("allocating {n} KV blocks"),
                    needed: n as u64 * kv_per_block_layer * cfg.num_layers as u64,
                    free: fit as u64 * kv_per_block_layer * cfg.num_layers as u64,
                });
            }
            Some(n) => n,
            // What the running sequences can use at the served context, no
            // more (nor more than --kv-cache-mib): the rest of the GPU stays
            // free for others.
            None => {
                let per_block = kv_per_block_layer * cfg.num_layers as u64;
                plan::kv_pool_blocks(
                    fit.min(plan::kv_cap_blocks(opts.kv_bytes, per_block)),
                    opts.max_running,
                    opts.max_context.unwrap_or(cfg.max_position_embeddings),
                    opts.block_size,
                )
            }
        };
        tracing::info!(
            gpus = placements.len(),
            context = opts.max_context.unwrap_or(cfg.max_position_embeddings),
            max_running = opts.max_running,
            num_blocks,
            kv_mib = (num_blocks as u64 * kv_per_block_layer * cfg.num_layers as u64) >> 20,
            "CUDA placement"
        );
        let inv_freq: Vec<f64> = cfg.inv_freq();
        let mut shards = Vec::new();
        for p in placements.drain(..) {
            let (ctx, sm, _, _) = &devs[p.device];
            shards.push(Self::load_shard(
                model,
                &cfg,
                &opts,
                &p,
                ctx,
                *sm,
                path,
                num_blocks + pad_blocks,
                &nvrtc,
                &includes,
                cache.as_deref(),
                &inv_freq,
            )?);
        }
        let graphs = graph::Graphs::for_backend(&opts, &cfg, shards.len(), num_blocks, part_size);
        Ok(CudaBackend {
            cfg,
            opts,
            shards,
            num_blocks,
            part_size,
            tile,
            graphs,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn load_shard(
        model: &Decoder,
        cfg: &ModelConfig,
        opts: &CudaOptions,
        p: &Placement,
        ctx: &Arc<CudaContext>,
        sm: u32,
        path: ArchPath,
        num_blocks: usize,
        nvrtc: &Nvrtc,
        includes: &[PathBuf],
        cache: Option<&std::path::Path>,
        inv_freq: &[f64],
    ) -> Result<Shard, CudaError> {
        let t0 = std::time::Instant::now();
        let cubins = nvrtc::build_all(nvrtc, sm, includes, cache)?;
        let cached = cubins.iter().filter(|c| c.1 == Source::Cache).count();
        tracing::info!(
            gpu = p.device,
            sm,
            cached,
            compiled = cubins.len() - cached,
            secs = t0.elapsed().as_secs_f64(),
            "kernels ready"
        );
        let kernels = Kernels::load(ctx, cubins.into_iter().map(|c| c.0).collect())?;
        check_static_smem(&kernels)?;
        let stream = shard_stream(ctx, opts.cuda_graphs)?;
        let blas =
            if std::panic::catch_unwind(|| unsafe { bsys::is_culib_present() }).unwrap_or(false) {
                match CudaBlas::new(stream.clone()) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::warn!(error = %e, "cuBLAS unusable; GEMMs use the GEMV kernel");
                        None
                    }
                }
            } else {
                tracing::warn!("libcublas not found; GEMMs use the GEMV kernel (slower prefill)");
                None
            };
        let mut dev_layers = Vec::new();
        let mut slots = 0usize;
        for l in p.layers.clone() {
            let src = &model.layers[l];
            dev_layers.push(DevLayer {
                input_norm: upload_f32(&stream, &src.input_norm.w, "input norm")?,
                post_norm: upload_f32(&stream, &src.post_norm.w, "post norm")?,
                q: upload_linear(&stream, &src.q, path, &mut slots)?,
                k: upload_linear(&stream, &src.k, path, &mut slots)?,
                v: upload_linear(&stream, &src.v, path, &mut slots)?,
                o: upload_linear(&stream, &src.o, path, &mut slots)?,
                gate: upload_linear(&stream, &src.gate, path, &mut slots)?,
                up: upload_linear(&stream, &src.up, path, &mut slots)?,
                down: upload_linear(&stream, &src.down, path, &mut slots)?,
                window: src.window.unwrap_or(0),
            });
        }
        let embed_lin =
            |stream: &Arc<CudaStream>, slots: &mut usize| -> Result<DevLinear, CudaError> {
                *slots += 1;
                Ok(DevLinear {
                    w: upload_w(stream, &model.embed, path, plan::embedding_dtype)?,
                    bias: None,
                    n: cfg.vocab_size,
                    k: cfg.hidden_size,
                    slot: *slots - 1,
                    exact: false.into(),
                })
            };
        let embed = if p.embed {
            Some(embed_lin(&stream, &mut slots)?)
        } else {
            None
        };
        let (norm, head) = if p.head {
            let head = match &model.lm_head {
                Some(h) => Head::Own(upload_linear(&stream, h, path, &mut slots)?),
                None if p.embed => Head::Embedding,
                None => Head::Own(embed_lin(&stream, &mut slots)?),
            };
            (
                Some(upload_f32(&stream, &model.norm.w, "final norm")?),
                Some(head),
            )
        } else {
            (None, None)
        };
        let per_layer = num_blocks * opts.block_size * cfg.num_kv_heads * cfg.head_dim;
        let kv_oom = |e: cudarc::driver::DriverError| {
            let free = ctx.mem_get_info().map_or(0, |(f, _)| f as u64);
            if format!("{e:?}").contains("OUT_OF_MEMORY") {
                CudaError::OutOfMemory {
                    what: format!("allocating the KV cache on GPU {}", p.device),
                    needed: (per_layer * opts.kv_dtype.size()) as u64,
                    free,
                }
            } else {
                CudaError::driver("allocating the KV cache", e)
            }
        };
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in p.layers.clone() {
            for cache in [&mut k_cache, &mut v_cache] {
                cache.push(match opts.kv_dtype {
                    KvDtype::F32 => KvBuf::F32(stream.alloc_zeros(per_layer).map_err(kv_oom)?),
                    KvDtype::F16 => KvBuf::F16(stream.alloc_zeros(per_layer).map_err(kv_oom)?),
                });
            }
        }
        let inv_freq = stream.clone_htod(inv_freq).map_err(drv("uploading RoPE"))?;
        let overflow = stream
            .alloc_zeros::<i32>(slots.max(1))
            .map_err(drv("allocating the overflow flags"))?;
        stream.synchronize().map_err(drv("uploading weights"))?;
        Ok(Shard {
            ordinal: ctx.ordinal(),
            stream,
            ctx: ctx.clone(),
            kernels,
            blas,
            layers: p.layers.clone(),
            dev_layers,
            embed,
            norm,
            head,
            k_cache,
            v_cache,
            inv_freq,
            overflow,
            scratch: Default::default(),
        })
    }

    /// Reads every shard's f16 overflow flags; marks the projections whose
    /// activations overflowed as exact (f32) from now on and clears the
    /// flags. True if any did.
    fn mark_overflowed(&mut self) -> Result<bool, CudaError> {
        let mut any = false;
        for sh in &mut self.shards {
            let flags = sh
                .stream
                .clone_dtoh(&sh.overflow)
                .map_err(drv("reading the overflow flags"))?;
            if flags.iter().all(|&f| f == 0) {
                continue;
            }
            let head = match &sh.head {
                Some(Head::Own(l)) => Some(l),
                _ => None,
            };
            let lins = sh
                .dev_layers
                .iter()
                .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
                .chain(sh.embed.as_ref())
                .chain(head);
            for lin in lins {
                if flags.get(lin.slot).copied().unwrap_or(0) != 0 {
                    lin.exact.store(true, std::sync::atomic::Ordering::Relaxed);
                    any = true;
                }
            }
            tracing::warn!(
                gpu = sh.ordinal,
                "activations beyond f16's range: those projections now run with f32 activations"
            );
            sh.stream
                .memset_zeros(&mut sh.overflow)
                .map_err(drv("clearing the overflow flags"))?;
        }
        Ok(any)
    }

    /// KV blocks of the pool (the engine's `num_blocks`).
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// (GPU ordinal, layers) per shard, for logs and tests.
    pub fn placement(&self) -> Vec<(usize, Range<usize>)> {
        self.shards
            .iter()
            .map(|s| (s.ordinal, s.layers.clone()))
            .collect()
    }

    fn run(&mut self, batch: &Batch, wants: &[RowWant]) -> Result<Vec<RowOut>, CudaError> {
        let layout = StepLayout::new(batch, self.opts.block_size, self.tile.0)?;
        let m = layout.ids.len();
        if m == 0 {
            return Ok(Vec::new());
        }
        if m > self.opts.max_batch_tokens.max(1) {
            return Err(CudaError::Unsupported(format!(
                "a step of {m} tokens exceeds --max-batch-tokens {}",
                self.opts.max_batch_tokens
            )));
        }
        if let Some(key) = self
            .graphs
            .as_ref()
            .and_then(|g| graph_plan::key_for(batch, &layout, &g.limits))
        {
            return self.run_graph(batch, &layout, key, wants);
        }
        let h = self.cfg.hidden_size;
        let shape = StepShape::of(&layout);
        let mut x_host: Option<Vec<f32>> = None;
        let nshards = self.shards.len();
        for si in 0..nshards {
            let sh = &self.shards[si];
            sh.ctx
                .bind_to_thread()
                .map_err(drv("binding the context"))?;
            let st = &sh.stream;
            let dev = DevStep::upload(st, &layout)?;
            let mut x = alloc(st, m * h, "activations")?;
            match (&sh.embed, x_host.take()) {
                (Some(e), _) => embedding(sh, e, &dev, m, h, &mut x)?,
                (None, Some(host)) => st
                    .memcpy_htod(&host, &mut x)
                    .map_err(drv("moving activations"))?,
                (None, None) => {
                    return Err(CudaError::Unsupported("a shard without input".into()));
                }
            };
            let mut acts = Acts::alloc(st, &self.cfg, m)?;
            let pending = forward_layers(self, si, &mut x, &mut acts, None, &dev, &shape)?;
            if si + 1 < nshards {
                if pending {
                    launch_pair(sh, "add_inplace", &mut x, &acts.d, m * h)?;
                }
                x_host = Some(
                    st.clone_dtoh(&x.slice(0..m * h))
                        .map_err(drv("moving activations"))?,
                );
                continue;
            }
            let pending = pending.then_some(&acts.d);
            let out = finish(self, si, &mut x, pending, &dev, &layout, wants);
            // Every step ends here, with logits rows or without: an
            // asynchronous fault surfaces in the step that caused it and
            // fails only its sequences, never the next step's.
            sh.stream.synchronize().map_err(drv("running the step"))?;
            if m > GEMV_MAX_ROWS && self.mark_overflowed()? {
                // Writing this step's K/V again is idempotent: run it again
                // with the overflowed projections in f32.
                return self.run(batch, wants);
            }
            return out;
        }
        Err(CudaError::Unsupported("no GPU holds the LM head".into()))
    }
}

/// A GPU as the backend uses it: its context, `sm` (e.g. 61), the path
/// its architecture takes, and the bytes this process may use on it.
type OpenDevice = (Arc<CudaContext>, u32, ArchPath, u64);

/// Contexts, architectures and memory budgets of the GPUs `opts` names.
fn open_devices(opts: &CudaOptions, info: &DriverInfo) -> Result<Vec<OpenDevice>, CudaError> {
    let ndev = opts
        .max_devices
        .map_or(info.devices, |m| m.clamp(1, info.devices));
    // Contexts, architectures and budgets of every GPU.
    let ordinals = opts.devices.clone().unwrap_or_else(|| (0..ndev).collect());
    if let Some(&bad) = ordinals.iter().find(|&&o| o >= info.devices) {
        return Err(CudaError::Unsupported(format!(
            "GPU {bad} does not exist ({} visible)",
            info.devices
        )));
    }
    let mut devs = Vec::new();
    for &d in &ordinals {
        let ctx = CudaContext::new(d).map_err(drv("creating a context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("reading the compute capability"))?;
        let path = ArchPath::of(major, minor)?;
        let (free, total) = ctx.mem_get_info().map_err(drv("reading free memory"))?;
        let name = ctx.name().unwrap_or_default();
        tracing::info!(gpu = d, %name, sm = format!("{major}{minor}"), ?path, free_mib = free >> 20, total_mib = total >> 20, "CUDA device");
        devs.push((
            ctx,
            (major * 10 + minor) as u32,
            path,
            plan::budget(free as u64, total as u64, opts.gpu_memory_utilization),
        ));
    }
    Ok(devs)
}

/// The stream a shard's work runs on: the context's default stream, or,
/// for CUDA graphs (which cannot capture the legacy default stream), a
/// stream of its own. Each step ends with the stream synchronized and a
/// shard uses one stream only, so cudarc's per-buffer events (kept for
/// work spread over streams) are turned off there: recorded inside a
/// capture they would tie the graph to events outside it.
fn shard_stream(ctx: &Arc<CudaContext>, graphs: bool) -> Result<Arc<CudaStream>, CudaError> {
    if !graphs {
        return Ok(ctx.default_stream());
    }
    // SAFETY: every buffer of this context is used on this one stream.
    unsafe { ctx.disable_event_tracking() };
    ctx.new_stream().map_err(drv("creating a stream"))
}

/// The attention launches size their dynamic shared memory against the
/// plan's static sizes; a kernel that declares more (its real size, from
/// the driver) would fail every launch at the largest groups, so refuse it
/// at load with the numbers.
fn check_static_smem(kernels: &Kernels) -> Result<(), CudaError> {
    let budgets = [
        ("attention_decode_f32", plan::DECODE_STATIC_SMEM),
        ("attention_decode_f16", plan::DECODE_STATIC_SMEM),
        ("attention_prefill_f32", plan::PREFILL_STATIC_SMEM),
        ("attention_prefill_f16", plan::PREFILL_STATIC_SMEM),
    ];
    for (entry, budget) in budgets {
        let used = kernels
            .get(entry)?
            .shared_size_bytes()
            .map_err(drv("reading a kernel's shared memory size"))?;
        if used as usize > budget {
            return Err(CudaError::Unsupported(format!(
                "{entry} declares {used} B of static shared memory; the launch plan reserves {budget} B (plan.rs)"
            )));
        }
    }
    Ok(())
}

/// One step's metadata on one GPU.
struct DevStep {
    ids: CudaSlice<u32>,
    pos: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    tok_table: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    decode: Option<CudaSlice<i32>>,
    tiles: Option<CudaSlice<i32>>,
    logits_rows: Option<CudaSlice<i32>>,
}

impl DevStep {
    fn upload(st: &Arc<CudaStream>, l: &StepLayout) -> Result<DevStep, CudaError> {
        let up = |v: &[i32]| -> Result<Option<CudaSlice<i32>>, CudaError> {
            if v.is_empty() {
                Ok(None)
            } else {
                st.clone_htod(v)
                    .map(Some)
                    .map_err(drv("uploading the step"))
            }
        };
        let e = drv("uploading the step");
        Ok(DevStep {
            ids: st.clone_htod(&l.ids).map_err(&e)?,
            pos: st.clone_htod(&l.pos).map_err(&e)?,
            slots: st.clone_htod(&l.slots).map_err(&e)?,
            tok_table: st.clone_htod(&l.tok_table).map_err(&e)?,
            tables: st.clone_htod(&l.tables).map_err(&e)?,
            decode: up(&l.decode)?,
            tiles: up(&l.tiles)?,
            logits_rows: up(&l.logits_rows)?,
        })
    }
}

fn alloc(st: &Arc<CudaStream>, n: usize, what: &str) -> Result<CudaSlice<f32>, CudaError> {
    // Every element is written by a kernel before it is read.
    unsafe { st.alloc::<f32>(n.max(1)) }.map_err(|e| {
        if format!("{e:?}").contains("OUT_OF_MEMORY") {
            let free = st.context().mem_get_info().map_or(0, |(f, _)| f as u64);
            CudaError::OutOfMemory {
                what: format!("allocating {what} for a step"),
                needed: 4 * n as u64,
                free,
            }
        } else {
            CudaError::driver(format!("allocating {what}"), e)
        }
    })
}

const NULL: u64 = 0;

fn launch_err(kernel: &'static str) -> impl Fn(cudarc::driver::DriverError) -> CudaError {
    move |e| CudaError::driver(format!("launching {kernel}"), e)
}

/// Gathers the step's token rows of the embedding into `x`.
fn embedding(
    sh: &Shard,
    e: &DevLinear,
    dev: &DevStep,
    m: usize,
    h: usize,
    x: &mut CudaSlice<f32>,
) -> Result<(), CudaError> {
    let (name, vocab) = match &e.w {
        DevW::F32(_) => ("embedding_f32", e.n),
        DevW::F16(_) => ("embedding_f16", e.n),
        DevW::BF16(_) => ("embedding_bf16", e.n),
        DevW::Q(..) => {
            return Err(CudaError::Unsupported(
                "an embedding table in GGUF blocks (it is uploaded as f16)".into(),
            ));
        }
    };
    let f = sh.kernels.get(name)?;
    let (mi, hi, vi) = (m as i32, h as i32, vocab as i32);
    let mut b = sh.stream.launch_builder(f);
    match &e.w {
        DevW::F32(w) => b.arg(w),
        DevW::F16(w) | DevW::BF16(w) => b.arg(w),
        DevW::Q(_, w) => b.arg(w),
    };
    // embedding_*(const W* table, const unsigned* ids, float* out, int m, int hidden, int vocab)
    b.arg(&dev.ids).arg(x).arg(&mi).arg(&hi).arg(&vi);
    unsafe { b.launch(cfg1d(m * h, 256)) }.map_err(launch_err("embedding"))?;
    Ok(())
}

/// An elementwise kernel `name(float* a, const float* b, size_t n)`:
/// `add_inplace` (a += b), `silu_mul` (a = silu(a) · b).
fn launch_pair(
    sh: &Shard,
    name: &'static str,
    a: &mut CudaSlice<f32>,
    b: &CudaSlice<f32>,
    n: usize,
) -> Result<(), CudaError> {
    let f = sh.kernels.get(name)?;
    let nn = n as u64;
    unsafe {
        sh.stream
            .launch_builder(f)
            .arg(a)
            .arg(b)
            .arg(&nn)
            .launch(cfg1d(n, 256))
    }
    .map_err(launch_err(name))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn add_rmsnorm(
    sh: &Shard,
    x: &mut CudaSlice<f32>,
    delta: Option<&CudaSlice<f32>>,
    w: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    m: usize,
    d: usize,
    eps: f32,
) -> Result<(), CudaError> {
    let f = sh.kernels.get("add_rmsnorm")?;
    let di = d as i32;
    let mut b = sh.stream.launch_builder(f);
    b.arg(x);
    match delta {
        Some(dl) => b.arg(dl),
        None => b.arg(&NULL),
    };
    // add_rmsnorm(float* x, const float* delta, const float* w, float* out, int d, float eps)
    b.arg(w).arg(out).arg(&di).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.map_err(launch_err("add_rmsnorm"))?;
    Ok(())
}

/// `y (m × n) = x (m × k) · Wᵀ + b`.
fn linear(
    be: &CudaBackend,
    sh: &Shard,
    lin: &DevLinear,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    m: usize,
) -> Result<(), CudaError> {
    let (n, k) = (lin.n, lin.k);
    let use_blas = m > GEMV_MAX_ROWS
        && sh.blas.is_some()
        && match lin.w {
            DevW::F32(_) => true,
            _ => {
                be.opts.gemm == GemmMode::Fast
                    && !lin.exact.load(std::sync::atomic::Ordering::Relaxed)
            }
        };
    if !use_blas {
        return gemv(sh, lin, x, y, m);
    }
    let Some(blas) = &sh.blas else {
        return gemv(sh, lin, x, y, m);
    };
    let st = &sh.stream;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let op_t = bsys::cublasOperation_t::CUBLAS_OP_T;
    let op_n = bsys::cublasOperation_t::CUBLAS_OP_N;
    let r32 = bsys::cudaDataType::CUDA_R_32F;
    let compute = bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    let cublas_err = |e: bres::CublasError| CudaError::Cublas {
        what: format!("GEMM {m}x{n}x{k}"),
        message: format!("{e:?}"),
    };
    // Row-major y = x·Wᵀ is column-major yᵀ (n × m) = W (col-major k × n)ᵀ · xᵀ (k × m).
    let (yp, _gy) = y.device_ptr_mut(st);
    match &lin.w {
        DevW::F32(w) => {
            let (wp, _gw) = w.device_ptr(st);
            let (xp, _gx) = x.device_ptr(st);
            unsafe {
                bres::gemm_ex(
                    *blas.handle(),
                    op_t,
                    op_n,
                    n as i32,
                    m as i32,
                    k as i32,
                    &alpha as *const f32 as *const c_void,
                    wp as *const c_void,
                    r32,
                    k as i32,
                    xp as *const c_void,
                    r32,
                    k as i32,
                    &beta as *const f32 as *const c_void,
                    yp as *mut c_void,
                    r32,
                    n as i32,
                    compute,
                    algo,
                )
            }
            .map_err(cublas_err)?;
        }
        DevW::F16(_) | DevW::BF16(_) | DevW::Q(..) => {
            let f16_acts = !matches!(lin.w, DevW::BF16(_));
            let (cast, ty) = if f16_acts {
                ("cast_f32_f16", bsys::cudaDataType::CUDA_R_16F)
            } else {
                ("cast_f32_bf16", bsys::cudaDataType::CUDA_R_16BF)
            };
            let mut guard = sh.scratch()?;
            let scratch = &mut *guard;
            let xh = scratch.cast.get(m * k, |c| {
                // Every element read is written by the cast first.
                unsafe { st.alloc::<u16>(c) }.map_err(drv("allocating the cast buffer"))
            })?;
            let f = sh.kernels.get(cast)?;
            let nn = (m * k) as u64;
            let flag = sh.overflow.slice(lin.slot..lin.slot + 1);
            let mut b = st.launch_builder(f);
            // cast_f32_f16(const float* x, h16* y, size_t n, int* overflow)
            // cast_f32_bf16(const float* x, b16* y, size_t n)
            b.arg(x).arg(&mut *xh).arg(&nn);
            if f16_acts {
                b.arg(&flag);
            }
            unsafe { b.launch(cfg1d(m * k, 256)) }.map_err(launch_err("cast"))?;
            // Block weights go through the f16 buffer a chunk of rows at a
            // time (backend/quant.rs); each chunk fills columns r0.. of y.
            let chunk = match &lin.w {
                DevW::Q(..) => quant::chunk_rows(n, k),
                _ => n,
            };
            for r0 in (0..n).step_by(chunk.max(1)) {
                let rows = chunk.min(n - r0);
                let w = half_weights(sh, &lin.w, &mut scratch.dequant, r0..r0 + rows, k)?;
                let (wp, _gw) = w.device_ptr(st);
                let (xp, _gx) = xh.device_ptr(st);
                let yc = yp + (r0 * std::mem::size_of::<f32>()) as u64;
                unsafe {
                    bres::gemm_ex(
                        *blas.handle(),
                        op_t,
                        op_n,
                        rows as i32,
                        m as i32,
                        k as i32,
                        &alpha as *const f32 as *const c_void,
                        wp as *const c_void,
                        ty,
                        k as i32,
                        xp as *const c_void,
                        ty,
                        k as i32,
                        &beta as *const f32 as *const c_void,
                        yc as *mut c_void,
                        r32,
                        n as i32,
                        compute,
                        algo,
                    )
                }
                .map_err(cublas_err)?;
            }
        }
    }
    drop(_gy);
    if let Some(bias) = &lin.bias {
        let f = sh.kernels.get("add_bias")?;
        let (mi, ni) = (m as i32, n as i32);
        // add_bias(float* y, const float* bias, int m, int n)
        unsafe {
            st.launch_builder(f)
                .arg(y)
                .arg(bias)
                .arg(&mi)
                .arg(&ni)
                .launch(cfg1d(m * n, 256))
        }
        .map_err(launch_err("add_bias"))?;
    }
    Ok(())
}

/// The 16-bit weights of rows `rows` (of `k` values) a half-precision GEMM
/// reads: the uploaded f16/bf16 bits (all rows), or those rows of a block
/// weight dequantized to f16 into `dequant` (one buffer reused by every
/// projection; the stream orders its uses).
fn half_weights<'a>(
    sh: &Shard,
    w: &'a DevW,
    dequant: &'a mut Reuse<CudaSlice<u16>>,
    rows: Range<usize>,
    k: usize,
) -> Result<&'a CudaSlice<u16>, CudaError> {
    let (qt, q) = match w {
        DevW::F16(h) | DevW::BF16(h) => return Ok(h),
        DevW::Q(qt, q) => (*qt, q),
        DevW::F32(_) => {
            return Err(CudaError::Unsupported(
                "an f32 weight has no 16-bit copy".into(),
            ));
        }
    };
    let st = &sh.stream;
    let elems = rows.len() * k;
    let wh = dequant.get(elems, |c| {
        // Every element the GEMM reads is written by the dequantization.
        unsafe { st.alloc::<u16>(c) }.map_err(drv("allocating the dequantization buffer"))
    })?;
    let name = quant::block_kernels(qt).dequant;
    let f = sh.kernels.get(name)?;
    let rb = qt.row_bytes(k);
    let blocks = q.slice(rows.start * rb..rows.end * rb);
    let nn = elems as u64;
    // dequant_<fmt>_f16(const unsigned char* w, h16* y, size_t n)
    unsafe {
        st.launch_builder(f)
            .arg(&blocks)
            .arg(&mut *wh)
            .arg(&nn)
            .launch(cfg1d(elems, 256))
    }
    .map_err(launch_err(name))?;
    Ok(wh)
}

/// Up to three projections of the same input (q/k/v, gate/up): one fused
/// GEMV launch (`gemv3_*`) when every one takes the GEMV path (at most 8
/// rows) with the same weight dtype and width; else one [`linear`] each.
fn linear_many(
    be: &CudaBackend,
    sh: &Shard,
    outs: &mut [(&DevLinear, &mut CudaSlice<f32>)],
    x: &CudaSlice<f32>,
    m: usize,
) -> Result<(), CudaError> {
    let first = match outs.first() {
        Some((l, _)) => *l,
        None => return Ok(()),
    };
    let fusable = m <= GEMV_MAX_ROWS
        && outs.len() <= 3
        && outs
            .iter()
            .all(|(l, _)| l.k == first.k && same_kind(&l.w, &first.w));
    if !fusable {
        for (l, y) in outs.iter_mut() {
            linear(be, sh, l, x, y, m)?;
        }
        return Ok(());
    }
    let name = match first.w {
        DevW::F32(_) => "gemv3_f32",
        DevW::F16(_) => "gemv3_f16",
        DevW::BF16(_) => "gemv3_bf16",
        DevW::Q(q, _) => quant::block_kernels(q).gemv3,
    };
    let f = sh.kernels.get(name)?;
    let mut ns = [0i32; 3];
    for (n, (l, _)) in ns.iter_mut().zip(outs.iter()) {
        *n = l.n as i32;
    }
    let rows: usize = outs.iter().map(|(l, _)| l.n).sum();
    let (mi, ki) = (m as i32, first.k as i32);
    let cfg = LaunchConfig {
        // One warp per output row of all the projections, 8 warps per block.
        grid_dim: ((rows as u32).div_ceil(8), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let used = outs.len();
    let mut b = sh.stream.launch_builder(f);
    // gemv3_*(const float* x, const W* w0, const float* b0, float* y0, int n0,
    //   w1, b1, y1, n1, w2, b2, y2, n2, int m, int k)
    b.arg(x);
    for ((l, y), n) in outs.iter_mut().zip(ns.iter()) {
        match &l.w {
            DevW::F32(w) => b.arg(w),
            DevW::F16(w) | DevW::BF16(w) => b.arg(w),
            DevW::Q(_, w) => b.arg(w),
        };
        match &l.bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&NULL),
        };
        b.arg(&mut **y).arg(n);
    }
    for n in &ns[used..] {
        b.arg(&NULL).arg(&NULL).arg(&NULL).arg(n);
    }
    b.arg(&mi).arg(&ki);
    unsafe { b.launch(cfg) }.map_err(launch_err("gemv3"))?;
    Ok(())
}

/// Whether two weights take the same GEMV kernel (dtype, and block format).
fn same_kind(a: &DevW, b: &DevW) -> bool {
    match (a, b) {
        (DevW::Q(qa, _), DevW::Q(qb, _)) => qa == qb,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// The GEMV kernel over chunks of up to 8 rows.
fn gemv(
    sh: &Shard,
    lin: &DevLinear,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    m: usize,
) -> Result<(), CudaError> {
    let (n, k) = (lin.n, lin.k);
    let name = match lin.w {
        DevW::F32(_) => "gemv_f32",
        DevW::F16(_) => "gemv_f16",
        DevW::BF16(_) => "gemv_bf16",
        DevW::Q(q, _) => quant::block_kernels(q).gemv,
    };
    let f = sh.kernels.get(name)?;
    let cfg = LaunchConfig {
        // One warp per output row, 8 warps per block.
        grid_dim: ((n as u32).div_ceil(8), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut r0 = 0;
    while r0 < m {
        let rows = (m - r0).min(GEMV_MAX_ROWS);
        let xv = x.slice(r0 * k..(r0 + rows) * k);
        let mut yv = y.slice_mut(r0 * n..(r0 + rows) * n);
        let (ri, ni, ki) = (rows as i32, n as i32, k as i32);
        let mut b = sh.stream.launch_builder(f);
        b.arg(&xv);
        match &lin.w {
            DevW::F32(w) => b.arg(w),
            DevW::F16(w) | DevW::BF16(w) => b.arg(w),
            DevW::Q(_, w) => b.arg(w),
        };
        match &lin.bias {
            Some(bias) => b.arg(bias),
            None => b.arg(&NULL),
        };
        // gemv_*(const float* x, const W* w, const float* bias, float* y, int m, int n, int k)
        b.arg(&mut yv).arg(&ri).arg(&ni).arg(&ki);
        unsafe { b.launch(cfg) }.map_err(launch_err("gemv"))?;
        r0 += rows;
    }
    Ok(())
}

/// What a step's launches need of its layout besides the device copy:
/// sizes. A captured graph's launches see its bucket's sizes.
#[derive(Debug, Clone, Copy)]
struct StepShape {
    /// Rows (tokens) of the step.
    m: usize,
    /// Decode rows and prefill tiles.
    decode: usize,
    tiles: usize,
    /// The longest decode context (`pos + 1`).
    longest: usize,
    /// Split-K partitions fixed by a graph (`None`: what each layer's
    /// window needs).
    parts: Option<usize>,
}

impl StepShape {
    fn of(layout: &StepLayout) -> StepShape {
        StepShape {
            m: layout.ids.len(),
            decode: layout.decode.len(),
            tiles: layout.tiles.len() / 2,
            longest: layout
                .decode
                .iter()
                .map(|&t| layout.pos[t as usize] as usize + 1)
                .max()
                .unwrap_or(1),
            parts: None,
        }
    }

    /// Split-K partitions of `part` positions under `window` (0 = none):
    /// `StepLayout::decode_parts`, from the longest context alone.
    fn decode_parts(&self, window: usize, part: usize) -> usize {
        self.parts.unwrap_or_else(|| {
            let len = if window > 0 {
                self.longest.min(window)
            } else {
                self.longest
            };
            len.div_ceil(part.max(1)).max(1)
        })
    }
}

/// One step's activations on one GPU, reused by every layer (and, in a
/// captured graph, by every replay).
struct Acts {
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    hn: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    o: CudaSlice<f32>,
    g: CudaSlice<f32>,
    u: CudaSlice<f32>,
    /// The last MLP output, added to the residual by the next RMSNorm.
    d: CudaSlice<f32>,
}

impl Acts {
    fn alloc(st: &Arc<CudaStream>, cfg: &ModelConfig, m: usize) -> Result<Acts, CudaError> {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        Ok(Acts {
            cos: alloc(st, m * hd / 2, "RoPE")?,
            sin: alloc(st, m * hd / 2, "RoPE")?,
            hn: alloc(st, m * h, "activations")?,
            q: alloc(st, m * qd, "queries")?,
            k: alloc(st, m * kvd, "keys")?,
            v: alloc(st, m * kvd, "values")?,
            attn: alloc(st, m * qd, "attention output")?,
            o: alloc(st, m * h, "activations")?,
            g: alloc(st, m * inter, "MLP")?,
            u: alloc(st, m * inter, "MLP")?,
            d: alloc(st, m * h, "activations")?,
        })
    }
}

/// Split-K attention partials of fixed size (a graph's); eager steps use
/// the shard's [`StepScratch`].
struct Partials {
    out: CudaSlice<f32>,
    max: CudaSlice<f32>,
    sum: CudaSlice<f32>,
}

impl Partials {
    fn alloc(st: &Arc<CudaStream>, n: usize, head_dim: usize) -> Result<Partials, CudaError> {
        let what = "attention partials";
        Ok(Partials {
            out: alloc(st, n * head_dim, what)?,
            max: alloc(st, n, what)?,
            sum: alloc(st, n, what)?,
        })
    }
}

/// The RoPE table for this step's positions.
fn rope_table(
    sh: &Shard,
    dev: &DevStep,
    acts: &mut Acts,
    m: usize,
    half: usize,
) -> Result<(), CudaError> {
    let f = sh.kernels.get("rope_table")?;
    let (mi, hi) = (m as i32, half as i32);
    // rope_table(const int* pos, const double* inv_freq, float* cos, float* sin, int m, int half)
    unsafe {
        sh.stream
            .launch_builder(f)
            .arg(&dev.pos)
            .arg(&sh.inv_freq)
            .arg(&mut acts.cos)
            .arg(&mut acts.sin)
            .arg(&mi)
            .arg(&hi)
            .launch(cfg1d(m * half, 256))
    }
    .map_err(launch_err("rope_table"))?;
    Ok(())
}

/// Rotates `heads` heads of every row of `buf`.
fn rope_apply(
    sh: &Shard,
    buf: &mut CudaSlice<f32>,
    acts_cs: (&CudaSlice<f32>, &CudaSlice<f32>),
    m: usize,
    heads: usize,
    hd: usize,
) -> Result<(), CudaError> {
    let f = sh.kernels.get("rope_apply")?;
    let (mi, hh, hdi, inter_flag) = (m as i32, heads as i32, hd as i32, 0i32);
    // rope_apply(float* x, const float* cos, const float* sin, int m, int heads, int head_dim, int interleaved)
    unsafe {
        sh.stream
            .launch_builder(f)
            .arg(buf)
            .arg(acts_cs.0)
            .arg(acts_cs.1)
            .arg(&mi)
            .arg(&hh)
            .arg(&hdi)
            .arg(&inter_flag)
            .launch(cfg1d(m * heads * (hd / 2), 256))
    }
    .map_err(launch_err("rope_apply"))?;
    Ok(())
}

/// Runs this shard's layers over `x`, in `acts`; true when the last MLP
/// output is left in `acts.d`, its residual add fused into the next RMSNorm.
/// Copies nothing to or from the host, and with `partials` given
/// allocates nothing, so a graph can capture it.
fn forward_layers(
    be: &CudaBackend,
    si: usize,
    x: &mut CudaSlice<f32>,
    acts: &mut Acts,
    partials: Option<&Partials>,
    dev: &DevStep,
    shape: &StepShape,
) -> Result<bool, CudaError> {
    let sh = &be.shards[si];
    let cfg = &be.cfg;
    let m = shape.m;
    let (h, hd, nh, nkv) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
    );
    let eps = cfg.rms_norm_eps as f32;
    rope_table(sh, dev, acts, m, hd / 2)?;
    let mut pending = false;
    for (li, layer) in sh.dev_layers.iter().enumerate() {
        let a = &mut *acts;
        let delta = pending.then_some(&a.d);
        add_rmsnorm(sh, x, delta, &layer.input_norm, &mut a.hn, m, h, eps)?;
        linear_many(
            be,
            sh,
            &mut [
                (&layer.q, &mut a.q),
                (&layer.k, &mut a.k),
                (&layer.v, &mut a.v),
            ],
            &a.hn,
            m,
        )?;
        rope_apply(sh, &mut a.q, (&a.cos, &a.sin), m, nh, hd)?;
        rope_apply(sh, &mut a.k, (&a.cos, &a.sin), m, nkv, hd)?;
        let qkv = (&a.q, &a.k, &a.v);
        attention(
            be,
            sh,
            li,
            qkv,
            &mut a.attn,
            partials,
            dev,
            shape,
            layer.window,
        )?;
        linear(be, sh, &layer.o, &a.attn, &mut a.o, m)?;
        add_rmsnorm(sh, x, Some(&a.o), &layer.post_norm, &mut a.hn, m, h, eps)?;
        linear_many(
            be,
            sh,
            &mut [(&layer.gate, &mut a.g), (&layer.up, &mut a.u)],
            &a.hn,
            m,
        )?;
        launch_pair(sh, "silu_mul", &mut a.g, &a.u, m * cfg.intermediate_size)?;
        linear(be, sh, &layer.down, &a.g, &mut a.d, m)?;
        pending = true;
    }
    Ok(pending)
}

/// K/V of this step written to the cache, then paged attention: the
/// decode kernel (split-K) for rows alone of their sequence, the tiled
/// prefill kernel for runs of prompt tokens.
#[allow(clippy::too_many_arguments)]
fn attention(
    be: &CudaBackend,
    sh: &Shard,
    li: usize,
    (q, k, v): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
    out: &mut CudaSlice<f32>,
    fixed: Option<&Partials>,
    dev: &DevStep,
    shape: &StepShape,
    window: usize,
) -> Result<(), CudaError> {
    kv_write(be, sh, li, (k, v), dev, shape.m)?;
    let scale = 1.0f32 / (be.cfg.head_dim as f32).sqrt();
    if let Some(decode) = &dev.decode {
        let a = AttnLaunch {
            be,
            sh,
            li,
            q,
            dev,
            window,
            scale,
        };
        decode_attention(&a, decode, out, fixed, shape)?;
    }
    if let Some(tiles) = &dev.tiles {
        let a = AttnLaunch {
            be,
            sh,
            li,
            q,
            dev,
            window,
            scale,
        };
        prefill_attention(&a, tiles, out, shape)?;
    }
    Ok(())
}

/// What both attention kernels take besides their own buffers.
struct AttnLaunch<'a> {
    be: &'a CudaBackend,
    sh: &'a Shard,
    li: usize,
    q: &'a CudaSlice<f32>,
    dev: &'a DevStep,
    window: usize,
    scale: f32,
}

impl AttnLaunch<'_> {
    /// The kernel for an f16 or an f32 KV cache, as the layer's is.
    fn kernel(
        &self,
        f16: &'static str,
        f32: &'static str,
    ) -> Result<&cudarc::driver::CudaFunction, CudaError> {
        let half = matches!(self.sh.k_cache[self.li], KvBuf::F16(_));
        self.sh.kernels.get(if half { f16 } else { f32 })
    }
}

/// Pushes layer `li`'s K and V caches as kernel arguments.
fn push_kv<'b>(
    b: &mut cudarc::driver::LaunchArgs<'b>,
    sh: &'b Shard,
    li: usize,
) -> Result<(), CudaError> {
    match (&sh.k_cache[li], &sh.v_cache[li]) {
        (KvBuf::F32(kc), KvBuf::F32(vc)) => b.arg(kc).arg(vc),
        (KvBuf::F16(kc), KvBuf::F16(vc)) => b.arg(kc).arg(vc),
        _ => return Err(CudaError::Unsupported("mixed KV dtypes".into())),
    };
    Ok(())
}

/// This step's K/V rows into their cache slots.
fn kv_write(
    be: &CudaBackend,
    sh: &Shard,
    li: usize,
    (k, v): (&CudaSlice<f32>, &CudaSlice<f32>),
    dev: &DevStep,
    m: usize,
) -> Result<(), CudaError> {
    let row = be.cfg.num_kv_heads * be.cfg.head_dim;
    let f16 = matches!(sh.k_cache[li], KvBuf::F16(_));
    let f = sh
        .kernels
        .get(if f16 { "kv_write_f16" } else { "kv_write_f32" })?;
    let (mi, rowi) = (m as i32, row as i32);
    let mut b = sh.stream.launch_builder(f);
    b.arg(k).arg(v);
    // kv_write_*(const float* k, const float* v, KV* kc, KV* vc, const int* slots, int m, int row)
    push_kv(&mut b, sh, li)?;
    b.arg(&dev.slots).arg(&mi).arg(&rowi);
    unsafe { b.launch(cfg1d(m * row, 256)) }.map_err(launch_err("kv_write"))?;
    Ok(())
}

/// Decode rows: split-K over the context (`fixed` partials in a graph, the
/// shard's reused ones otherwise), reduced when split.
fn decode_attention(
    a: &AttnLaunch,
    decode: &CudaSlice<i32>,
    out: &mut CudaSlice<f32>,
    fixed: Option<&Partials>,
    shape: &StepShape,
) -> Result<(), CudaError> {
    let (be, sh, dev, q) = (a.be, a.sh, a.dev, a.q);
    let cfg = &be.cfg;
    let st = &sh.stream;
    let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let group = nh / nkv;
    let (nhi, nkvi, hdi, bsi, wi) = (
        nh as i32,
        nkv as i32,
        hd as i32,
        be.opts.block_size as i32,
        a.window as i32,
    );
    let scale = a.scale;
    let nd = shape.decode;
    let part = be.part_size;
    let nparts = shape.decode_parts(a.window, part);
    let mut scratch = sh.scratch()?;
    let StepScratch {
        part_out,
        part_max,
        part_sum,
        ..
    } = &mut *scratch;
    let parts = match (nparts > 1, fixed) {
        (false, _) => None,
        (true, Some(p)) => Some((&p.out, &p.max, &p.sum)),
        (true, None) => {
            let n = nd * nh * nparts;
            let what = |c| alloc(st, c, "attention partials");
            Some((
                &*part_out.get(n * hd, what)?,
                &*part_max.get(n, what)?,
                &*part_sum.get(n, what)?,
            ))
        }
    };
    let f = a.kernel("attention_decode_f16", "attention_decode_f32")?;
    let parti = part as i32;
    let mut b = st.launch_builder(f);
    b.arg(q);
    push_kv(&mut b, a.sh, a.li)?;
    // attention_decode_*(q, kc, vc, out, tokens, tok_pos, tok_table, tables, heads, kv_heads,
    //   head_dim, block_size, window, part_size, scale, part_out, part_max, part_sum)
    b.arg(&mut *out)
        .arg(decode)
        .arg(&dev.pos)
        .arg(&dev.tok_table)
        .arg(&dev.tables)
        .arg(&nhi)
        .arg(&nkvi)
        .arg(&hdi)
        .arg(&bsi)
        .arg(&wi)
        .arg(&parti)
        .arg(&scale);
    match parts {
        Some((po, pm, ps)) => b.arg(po).arg(pm).arg(ps),
        None => b.arg(&NULL).arg(&NULL).arg(&NULL),
    };
    let cfg = LaunchConfig {
        grid_dim: (nd as u32, nkv as u32, nparts as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: plan::decode_smem(group, hd, part) as u32,
    };
    unsafe { b.launch(cfg) }.map_err(launch_err("attention_decode"))?;
    if let Some((po, pm, ps)) = parts {
        let f = sh.kernels.get("attention_reduce")?;
        let npi = nparts as i32;
        // attention_reduce(part_out, part_max, part_sum, out, tokens, heads, head_dim, nparts)
        let cfg = LaunchConfig {
            grid_dim: (nd as u32, nh as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe {
            st.launch_builder(f)
                .arg(po)
                .arg(pm)
                .arg(ps)
                .arg(&mut *out)
                .arg(decode)
                .arg(&nhi)
                .arg(&hdi)
                .arg(&npi)
                .launch(cfg)
        }
        .map_err(launch_err("attention_reduce"))?;
    }
    Ok(())
}

/// Prefill tiles: runs of one sequence's prompt tokens, online softmax.
fn prefill_attention(
    a: &AttnLaunch,
    tiles: &CudaSlice<i32>,
    out: &mut CudaSlice<f32>,
    shape: &StepShape,
) -> Result<(), CudaError> {
    let (be, sh, dev, q) = (a.be, a.sh, a.dev, a.q);
    let cfg = &be.cfg;
    let st = &sh.stream;
    let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
    let (nhi, nkvi, hdi, bsi, wi) = (
        nh as i32,
        nkv as i32,
        hd as i32,
        be.opts.block_size as i32,
        a.window as i32,
    );
    let scale = a.scale;
    let nt = shape.tiles;
    let (tq, tk) = be.tile;
    let f = a.kernel("attention_prefill_f16", "attention_prefill_f32")?;
    let (tqi, tki) = (tq as i32, tk as i32);
    let mut b = st.launch_builder(f);
    b.arg(q);
    push_kv(&mut b, a.sh, a.li)?;
    // attention_prefill_*(q, kc, vc, out, tiles, tok_pos, tok_table, tables, heads, kv_heads,
    //   head_dim, block_size, window, tq, tk, scale)
    b.arg(&mut *out)
        .arg(tiles)
        .arg(&dev.pos)
        .arg(&dev.tok_table)
        .arg(&dev.tables)
        .arg(&nhi)
        .arg(&nkvi)
        .arg(&hdi)
        .arg(&bsi)
        .arg(&wi)
        .arg(&tqi)
        .arg(&tki)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (nt as u32, nh as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: plan::prefill_smem(hd, tq, tk) as u32,
    };
    unsafe { b.launch(cfg) }.map_err(launch_err("attention_prefill"))?;
    Ok(())
}

/// The final norm's and the LM head's buffers: `m` rows of activations,
/// `n` rows of logits.
struct HeadBufs {
    hn: CudaSlice<f32>,
    sel: CudaSlice<f32>,
    logits: CudaSlice<f32>,
}

impl HeadBufs {
    fn alloc(
        st: &Arc<CudaStream>,
        cfg: &ModelConfig,
        m: usize,
        n: usize,
    ) -> Result<HeadBufs, CudaError> {
        Ok(HeadBufs {
            hn: alloc(st, m * cfg.hidden_size, "activations")?,
            sel: alloc(st, n * cfg.hidden_size, "logits rows")?,
            logits: alloc(st, n * cfg.vocab_size, "logits")?,
        })
    }
}

/// Final norm, LM head and the rows' results, on the last shard.
fn finish(
    be: &CudaBackend,
    si: usize,
    x: &mut CudaSlice<f32>,
    pending: Option<&CudaSlice<f32>>,
    dev: &DevStep,
    layout: &StepLayout,
    wants: &[RowWant],
) -> Result<Vec<RowOut>, CudaError> {
    let sh = &be.shards[si];
    let (m, n) = (layout.ids.len(), layout.logits_rows.len());
    if sh.norm.is_none() || sh.head.is_none() || dev.logits_rows.is_none() {
        return Ok(Vec::new());
    }
    let mut bufs = HeadBufs::alloc(&sh.stream, &be.cfg, m, n)?;
    head_logits(be, sh, x, pending, dev, m, n, &mut bufs)?;
    pick_rows(sh, &bufs.logits, n, be.cfg.vocab_size, wants)
}

/// Final norm of `m` rows, the `n` logits rows gathered, the LM head into
/// `bufs.logits`. Launches only: a graph can capture it.
#[allow(clippy::too_many_arguments)]
fn head_logits(
    be: &CudaBackend,
    sh: &Shard,
    x: &mut CudaSlice<f32>,
    pending: Option<&CudaSlice<f32>>,
    dev: &DevStep,
    m: usize,
    n: usize,
    bufs: &mut HeadBufs,
) -> Result<(), CudaError> {
    let st = &sh.stream;
    let cfg = &be.cfg;
    let h = cfg.hidden_size;
    let (Some(norm), Some(head), Some(rows)) = (&sh.norm, &sh.head, &dev.logits_rows) else {
        return Err(CudaError::Unsupported(
            "the LM head is on another GPU".into(),
        ));
    };
    let eps = cfg.rms_norm_eps as f32;
    add_rmsnorm(sh, x, pending, norm, &mut bufs.hn, m, h, eps)?;
    {
        let f = sh.kernels.get("gather_rows")?;
        let (ni, hi) = (n as i32, h as i32);
        // gather_rows(const float* src, const int* rows, float* dst, int nrows, int d)
        unsafe {
            st.launch_builder(f)
                .arg(&bufs.hn)
                .arg(rows)
                .arg(&mut bufs.sel)
                .arg(&ni)
                .arg(&hi)
                .launch(cfg1d(n * h, 256))
        }
        .map_err(launch_err("gather_rows"))?;
    }
    let head_lin = match head {
        Head::Own(l) => l,
        Head::Embedding => sh
            .embed
            .as_ref()
            .ok_or_else(|| CudaError::Unsupported("tied head without embedding".into()))?,
    };
    linear(be, sh, head_lin, &bufs.sel, &mut bufs.logits, n)
}

/// Each of the first `n` logits rows as its want says: a token chosen on
/// the device (greedy or sampled), or the logits copied to the host.
fn pick_rows(
    sh: &Shard,
    logits: &CudaSlice<f32>,
    n: usize,
    vocab: usize,
    wants: &[RowWant],
) -> Result<Vec<RowOut>, CudaError> {
    let st = &sh.stream;
    let mut out: Vec<Option<RowOut>> = vec![None; n];
    let any = |f: fn(&RowWant) -> bool| wants.iter().any(f);
    let vi = vocab as i32;
    let row_cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    if any(|w| matches!(w, RowWant::Greedy)) {
        let mut ids: CudaSlice<i32> = unsafe { st.alloc(n) }.map_err(drv("allocating"))?;
        let f = sh.kernels.get("argmax_rows")?;
        // argmax_rows(const float* logits, int vocab, int* out)
        unsafe {
            st.launch_builder(f)
                .arg(logits)
                .arg(&vi)
                .arg(&mut ids)
                .launch(row_cfg)
        }
        .map_err(launch_err("argmax_rows"))?;
        let ids = st.clone_dtoh(&ids).map_err(drv("reading tokens"))?;
        for (i, w) in wants.iter().enumerate() {
            if matches!(w, RowWant::Greedy) {
                out[i] = Some(RowOut::Token(ids[i].max(0) as u32));
            }
        }
    }
    if any(|w| matches!(w, RowWant::Sample { .. })) {
        let (mut t, mut kk, mut p, mut mp, mut u) = (
            vec![1.0f32; n],
            vec![0i32; n],
            vec![1.0f32; n],
            vec![0.0f32; n],
            vec![0.0f64; n],
        );
        for (i, w) in wants.iter().enumerate() {
            if let RowWant::Sample {
                temperature,
                top_k,
                top_p,
                min_p,
                uniform,
            } = *w
            {
                (t[i], p[i], mp[i], u[i]) = (temperature, top_p, min_p, uniform);
                kk[i] = top_k.min(i32::MAX as u32) as i32;
            }
        }
        let e = drv("uploading sampling settings");
        let kk = st.clone_htod(&kk).map_err(&e)?;
        let (t, p, mp, u) = (
            st.clone_htod(&t).map_err(&e)?,
            st.clone_htod(&p).map_err(&e)?,
            st.clone_htod(&mp).map_err(&e)?,
            st.clone_htod(&u).map_err(&e)?,
        );
        let mut ids: CudaSlice<i32> = unsafe { st.alloc(n) }.map_err(drv("allocating"))?;
        let f = sh.kernels.get("sample_rows")?;
        // sample_rows(logits, vocab, temperature, top_k, top_p, min_p, uniform, out)
        unsafe {
            st.launch_builder(f)
                .arg(logits)
                .arg(&vi)
                .arg(&t)
                .arg(&kk)
                .arg(&p)
                .arg(&mp)
                .arg(&u)
                .arg(&mut ids)
                .launch(row_cfg)
        }
        .map_err(launch_err("sample_rows"))?;
        let ids = st.clone_dtoh(&ids).map_err(drv("reading tokens"))?;
        for (i, w) in wants.iter().enumerate() {
            if matches!(w, RowWant::Sample { .. }) {
                out[i] = Some(RowOut::Token(ids[i].max(0) as u32));
            }
        }
    }
    if out.iter().any(Option::is_none) {
        let host = st
            .clone_dtoh(&logits.slice(0..n * vocab))
            .map_err(drv("reading logits"))?;
        for (i, o) in out.iter_mut().enumerate() {
            if o.is_none() {
                *o = Some(RowOut::Logits(host[i * vocab..(i + 1) * vocab].to_vec()));
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn forward(&mut self, batch: &Batch) -> Result<Vec<Vec<f32>>, BackendError> {
        let wants = vec![RowWant::Logits; batch.logits_for.len()];
        Ok(self
            .forward_rows(batch, &wants)?
            .into_iter()
            .map(|r| match r {
                RowOut::Logits(l) => l,
                RowOut::Token(_) => Vec::new(),
            })
            .collect())
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn forward_rows(
        &mut self,
        batch: &Batch,
        wants: &[RowWant],
    ) -> Result<Vec<RowOut>, BackendError> {
        self.run(batch, wants).map_err(|e| BackendError {
            fatal: e.is_fatal(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::BatchToken;

    #[test]
    fn a_steps_shape_needs_the_partitions_its_layout_needs_under_every_window() {
        let mut rng = crate::engine::sampling::Rng::new(7);
        for _ in 0..200 {
            let n = 1 + (rng.next_f64() * 6.0) as usize;
            let mut b = Batch::default();
            for seq in 0..n {
                let pos = (rng.next_f64() * 500.0) as usize;
                b.block_tables.push((0..=(pos / 16) as u32).collect());
                b.tokens.push(BatchToken {
                    token: 1,
                    pos,
                    seq,
                    wide: false,
                });
            }
            let l = StepLayout::new(&b, 16, 8).unwrap();
            let shape = StepShape::of(&l);
            for window in [0, 1, 37, 64, 256, 1000] {
                for part in [1, 32, 64, 100] {
                    assert_eq!(
                        shape.decode_parts(window, part),
                        l.decode_parts(window, part),
                        "window {window} part {part}"
                    );
                }
            }
            let fixed = StepShape {
                parts: Some(8),
                ..shape
            };
            assert_eq!(fixed.decode_parts(37, 32), 8);
        }
    }
}
