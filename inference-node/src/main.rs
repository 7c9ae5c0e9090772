//! `copyhold-node`: parses arguments and runs a subcommand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use copyhold_node::api::openai::Limits;
use copyhold_node::api::server::{AppState, Ready, Shutdown};
use copyhold_node::bench::peers::{self, Row};
use copyhold_node::engine::{EngineOptions, spawn};
use copyhold_node::load::{Device as EngineDevice, load_engine};
use copyhold_node::metrics::Metrics;
use copyhold_node::model::config::Arch;
use copyhold_node::model::weights::DType;
use copyhold_node::power::{PowerModel, SensorChoice, open_sensor};
use copyhold_node::synth::{SynthSpec, synth};

#[derive(Parser)]
#[command(name = "copyhold-node", version, about = "copyhold inference node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvDtypeArg {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum GemmArg {
    /// cuBLAS with activations cast to the weight dtype (tensor cores).
    Fast,
    /// f32 activations throughout (matches the CPU engine; slower prefill).
    Exact,
}

/// Settings of `--device cuda` (see docs/cuda.md).
#[derive(clap::Args, Clone)]
struct CudaArgs {
    /// Share of each GPU's memory to use (weights, KV cache, activations).
    #[arg(long, env = "COPYHOLD_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Folder for compiled kernels (default: $XDG_CACHE_HOME/copyhold/cubin).
    #[arg(long, env = "COPYHOLD_KERNEL_CACHE")]
    kernel_cache: Option<PathBuf>,
    /// Folder holding cuda_fp16.h / cuda_bf16.h for NVRTC (repeatable).
    #[arg(long = "cuda-include", env = "COPYHOLD_CUDA_INCLUDE_DIR")]
    cuda_include: Vec<PathBuf>,
    /// KV cache element type (CUDA default: f16 for serve and bench, f32 for
    /// check-golden; CPU default: f32, f16 when asked).
    #[arg(long, env = "COPYHOLD_KV_CACHE_DTYPE", value_enum)]
    kv_cache_dtype: Option<KvDtypeArg>,
    /// GEMMs of more than 8 rows (default: fast for serve and bench, exact for check-golden).
    #[arg(long, env = "COPYHOLD_CUDA_GEMM", value_enum)]
    cuda_gemm: Option<GemmArg>,
    /// Use at most this many GPUs (default: all visible).
    #[arg(long, env = "COPYHOLD_MAX_GPUS")]
    max_gpus: Option<usize>,
    /// Replay decode steps of up to 8 sequences from CUDA graphs, captured
    /// per batch-size bucket (model on one GPU). Off by default until the
    /// GPU tests have run it (docs/cuda.md).
    #[arg(long, env = "COPYHOLD_CUDA_GRAPHS")]
    cuda_graphs: bool,
}

impl CudaArgs {
    /// `exact`: check-golden's defaults (f32 KV, exact GEMMs).
    fn options(&self, exact: bool) -> copyhold_node::cuda::backend::CudaOptions {
        use copyhold_node::cuda::plan::{GemmMode, KvDtype};
        let kv = match self.kv_cache_dtype {
            Some(KvDtypeArg::F32) => KvDtype::F32,
            Some(KvDtypeArg::F16) => KvDtype::F16,
            None if exact => KvDtype::F32,
            None => KvDtype::F16,
        };
        let gemm = match self.cuda_gemm {
            Some(GemmArg::Fast) => GemmMode::Fast,
            Some(GemmArg::Exact) => GemmMode::Exact,
            None if exact => GemmMode::Exact,
            None => GemmMode::Fast,
        };
        copyhold_node::cuda::backend::CudaOptions {
            gpu_memory_utilization: self.gpu_memory_utilization,
            kernel_cache: self.kernel_cache.clone(),
            include_dirs: self.cuda_include.clone(),
            kv_dtype: kv,
            gemm,
            max_devices: self.max_gpus,
            cuda_graphs: self.cuda_graphs,
            ..Default::default()
        }
    }

    fn device(&self, d: Device, exact: bool) -> EngineDevice {
        match d {
            Device::Cpu => EngineDevice::Cpu,
            Device::Cuda => EngineDevice::Cuda(self.options(exact)),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum SensorArg {
    Auto,
    Nvml,
    Rapl,
    Model,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    Llama,
    Qwen2,
    Mistral,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Hugging Face model directory.
    #[arg(long, env = "COPYHOLD_MODEL")]
    model: PathBuf,
    #[arg(long, env = "COPYHOLD_PORT", default_value_t = 8000)]
    port: u16,
    #[arg(long, env = "COPYHOLD_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "COPYHOLD_DEVICE", value_enum, default_value = "cpu")]
    device: Device,
    /// Name clients use in `model` (default: the directory name).
    #[arg(long, env = "COPYHOLD_SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Memory for the paged KV cache, in MiB (default: enough for
    /// `--max-running` sequences of `--max-model-len` tokens; on the CPU
    /// without `--max-model-len`, 512).
    #[arg(long, env = "COPYHOLD_KV_CACHE_MIB")]
    kv_cache_mib: Option<usize>,
    /// Longest prompt + completion, in tokens (default: the model's
    /// `max_position_embeddings`, never more). Longer requests get
    /// `context_length_exceeded`.
    #[arg(long, env = "COPYHOLD_MAX_MODEL_LEN")]
    max_model_len: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, env = "COPYHOLD_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
    /// Tokens per engine step (decodes plus prefill chunks).
    #[arg(long, env = "COPYHOLD_MAX_BATCH_TOKENS", default_value_t = 512)]
    max_batch_tokens: usize,
    /// Sequences in the running batch.
    #[arg(long, env = "COPYHOLD_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Requests allowed to wait; beyond this the server answers 503.
    #[arg(long, env = "COPYHOLD_QUEUE_CAPACITY", default_value_t = 256)]
    queue_capacity: usize,
    /// Largest `n` accepted.
    #[arg(long, env = "COPYHOLD_MAX_N", default_value_t = 8)]
    max_n: usize,
    /// `max_tokens` of requests that leave it out (when the model's
    /// generation_config.json sets no max_new_tokens); always capped by
    /// what the context and the KV cache leave.
    #[arg(long, env = "COPYHOLD_DEFAULT_MAX_TOKENS", default_value_t = copyhold_node::api::openai::DEFAULT_MAX_TOKENS)]
    default_max_tokens: usize,
    /// Declared power draw, used when no sensor exists and for pacing.
    #[arg(long, env = "COPYHOLD_POWER_MODEL", default_value = "idle=10,busy=60")]
    power_model: PowerModel,
    /// Power sensor: auto (RAPL if readable, else the model), nvml, rapl or model.
    #[arg(
        long,
        env = "COPYHOLD_POWER_SENSOR",
        value_enum,
        default_value = "auto"
    )]
    power_sensor: SensorArg,
    /// File holding the bearer token of the admin API (disabled without).
    #[arg(long, env = "COPYHOLD_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long, env = "COPYHOLD_THREADS")]
    threads: Option<usize>,
    #[command(flatten)]
    cuda: CudaArgs,
}

#[derive(clap::Args)]
struct SynthArgs {
    #[arg(long, env = "COPYHOLD_SYNTH_ARCH", value_enum)]
    arch: ArchArg,
    #[arg(long, env = "COPYHOLD_SYNTH_HIDDEN")]
    hidden: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_LAYERS")]
    layers: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_HEADS")]
    heads: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_KV_HEADS")]
    kv_heads: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_INTERMEDIATE")]
    intermediate: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_VOCAB")]
    vocab: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_DTYPE", value_enum, default_value = "f16")]
    dtype: DtypeArg,
    #[arg(long, env = "COPYHOLD_SYNTH_HEAD_DIM")]
    head_dim: Option<usize>,
    #[arg(long, env = "COPYHOLD_SYNTH_TIE_WORD_EMBEDDINGS")]
    tie_word_embeddings: bool,
    /// Number of safetensors shards (0: one per ~2 GB).
    #[arg(long, env = "COPYHOLD_SYNTH_SHARDS", default_value_t = 0)]
    shards: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_MAX_POSITION", default_value_t = 4096)]
    max_position_embeddings: usize,
    #[arg(long, env = "COPYHOLD_SYNTH_SLIDING_WINDOW")]
    sliding_window: Option<usize>,
    #[arg(long, env = "COPYHOLD_SYNTH_SEED", default_value_t = 0)]
    seed: u64,
    #[arg(long, env = "COPYHOLD_SYNTH_OUT")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API.
    Serve(Box<ServeArgs>),
    /// Compare the engine with DIR/golden.json; one JSON line, non-zero exit on mismatch.
    CheckGolden {
        #[arg(env = "COPYHOLD_GOLDEN_DIR")]
        dir: PathBuf,
        #[arg(long, env = "COPYHOLD_DEVICE", value_enum, default_value = "cpu")]
        device: Device,
        #[command(flatten)]
        cuda: CudaArgs,
    },
    /// Write a random-weight model directory.
    Synth(Box<SynthArgs>),
    /// Convert a model directory (safetensors, byte-level BPE tokenizer)
    /// into a GGUF file, quantized as llama.cpp's formats.
    Gguf {
        /// The model directory.
        #[arg(long)]
        from: PathBuf,
        /// The GGUF file to write.
        #[arg(long)]
        out: PathBuf,
        /// f32, f16, q8_0, q4_0, q4_k_m or q5_k_m.
        #[arg(long = "type", default_value = "q8_0")]
        scheme: String,
    },
    /// Fetch a model from the Hugging Face Hub or a mirror into the model
    /// cache (resumable, verified); prints the directory to serve.
    Fetch(Box<copyhold_node::fetch::FetchArgs>),
    /// Compile every CUDA kernel for every target architecture with NVRTC
    /// (no GPU needed) and print a kernel × architecture table; exit 1 if
    /// any cell fails, 2 if NVRTC or the CUDA headers are missing.
    CudaCheck {
        /// Architectures (compute capability without the dot).
        #[arg(
            long,
            env = "COPYHOLD_CUDA_CHECK_ARCH",
            value_delimiter = ',',
            default_values_t = copyhold_node::cuda::check::ARCHS.to_vec()
        )]
        arch: Vec<u32>,
        /// Folder holding cuda_fp16.h / cuda_bf16.h (repeatable).
        #[arg(long = "cuda-include", env = "COPYHOLD_CUDA_INCLUDE_DIR")]
        cuda_include: Vec<PathBuf>,
        /// Also print every entry's registers and shared memory (ptxas -v).
        #[arg(long)]
        resources: bool,
    },
    /// Measure prefill/decode throughput, time to first token and peak memory.
    Bench(Box<BenchArgs>),
}

/// `bench`'s flags (boxed in `Cmd`: they are the largest variant).
#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, env = "COPYHOLD_MODEL")]
    model: PathBuf,
    /// Batch sizes, comma-separated.
    #[arg(
        long,
        env = "COPYHOLD_BENCH_BATCH",
        value_delimiter = ',',
        default_value = "1"
    )]
    batch: Vec<usize>,
    #[arg(long, env = "COPYHOLD_BENCH_PROMPT", default_value_t = 512)]
    prompt: usize,
    #[arg(long = "gen", env = "COPYHOLD_BENCH_GEN", default_value_t = 128)]
    generate: usize,
    #[arg(long, env = "COPYHOLD_KV_CACHE_MIB", default_value_t = 2048)]
    kv_cache_mib: usize,
    #[arg(long, env = "COPYHOLD_THREADS")]
    threads: Option<usize>,
    #[arg(long, env = "COPYHOLD_DEVICE", value_enum, default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    cuda: CudaArgs,
    /// Run every measurement this many times and keep the best of each metric.
    #[arg(long, env = "COPYHOLD_BENCH_REPEAT", default_value_t = 1)]
    repeat: usize,
    #[command(flatten)]
    peers: Box<PeerArgs>,
}

/// Peers measured in the same run (each skipped, with a printed line,
/// when not given). See bench/results/inference-node.md.
#[derive(clap::Args, Clone)]
struct PeerArgs {
    /// llama.cpp's `llama-bench` (batch 1: pp and tg from an empty context, and tg after the prompt).
    #[arg(long, env = "COPYHOLD_BENCH_LLAMA_BENCH")]
    llama_bench: Option<PathBuf>,
    /// llama.cpp's `llama-batched-bench` (every batch size, measured as ours).
    #[arg(long, env = "COPYHOLD_BENCH_LLAMA_BATCHED_BENCH")]
    llama_batched_bench: Option<PathBuf>,
    /// The model written as GGUF f16 (bench/peers/to_gguf.py) for llama.cpp.
    #[arg(long, env = "COPYHOLD_BENCH_GGUF")]
    gguf: Option<PathBuf>,
    /// A Python with torch and transformers, for bench/peers/hf_bench.py.
    #[arg(long, env = "COPYHOLD_BENCH_PYTHON")]
    python: Option<PathBuf>,
    /// The transformers script (default: bench/peers/hf_bench.py of this checkout).
    #[arg(long, env = "COPYHOLD_BENCH_HF_SCRIPT")]
    hf_script: Option<PathBuf>,
    /// Batch sizes for the peers (default: the same as --batch).
    #[arg(long, env = "COPYHOLD_BENCH_PEER_BATCH", value_delimiter = ',')]
    peer_batch: Vec<usize>,
    /// Batch sizes for transformers alone (default: the peers'); PyTorch
    /// takes minutes per large batch on 2 cores.
    #[arg(long, env = "COPYHOLD_BENCH_HF_BATCH", value_delimiter = ',')]
    hf_batch: Vec<usize>,
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    prepare_cuda_libs();
    match cli.cmd {
        Cmd::CheckGolden { dir, device, cuda } => check_golden(&dir, &cuda.device(device, true)),
        Cmd::Gguf { from, out, scheme } => gguf(&from, &out, &scheme),
        Cmd::Synth(a) => synth_command(*a),
        Cmd::Bench(a) => bench(*a),
        Cmd::CudaCheck {
            arch,
            cuda_include,
            resources,
        } => cuda_check(&arch, &cuda_include, resources),
        Cmd::Fetch(a) => exit_code(copyhold_node::fetch::run(&a)),
        Cmd::Serve(a) => exit_code(serve(*a)),
    }
}

/// Logs go to stderr (stdout carries the commands' machine-readable
/// lines), at `info` unless `RUST_LOG` says otherwise.
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// CUDA 13 (or off-path CUDA 12) libraries: linked and re-executed once,
/// before any command opens the driver.
fn prepare_cuda_libs() {
    if copyhold_node::cuda::libs::wants_cuda(std::env::args())
        && let Some(cache) = copyhold_node::cuda::nvrtc::default_cache_dir()
    {
        copyhold_node::cuda::libs::prepare_process(&cache);
    }
}

/// The exit of commands that print nothing on success themselves: 0, or
/// `error: ...` on stderr and 2.
fn exit_code<E: std::fmt::Display>(r: Result<(), E>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `check-golden`: one JSON line; exit 1 on a mismatch so CI fails, 2 when
/// the check could not run at all.
fn check_golden(dir: &Path, device: &EngineDevice) -> ExitCode {
    match copyhold_node::golden::check_on(dir, device) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `gguf`: checks `--type` before reading any weights, then prints the
/// written file's path for scripts to pick up.
fn gguf(from: &Path, out: &Path, scheme: &str) -> ExitCode {
    use copyhold_node::model::gguf_write::{Scheme, convert};
    let Some(scheme) = Scheme::parse(scheme) else {
        eprintln!("error: --type {scheme:?} (one of f32, f16, q8_0, q4_0, q4_k_m, q5_k_m)");
        return ExitCode::from(2);
    };
    match convert(from, out, scheme) {
        Ok(()) => {
            println!("{}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `synth`'s flags as the library's spec (the CLI's enums stay out of the
/// library).
fn synth_spec(a: &SynthArgs) -> SynthSpec {
    SynthSpec {
        arch: match a.arch {
            ArchArg::Llama => Arch::Llama,
            ArchArg::Qwen2 => Arch::Qwen2,
            ArchArg::Mistral => Arch::Mistral,
        },
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        intermediate: a.intermediate,
        vocab: a.vocab,
        dtype: match a.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        },
        head_dim: a.head_dim,
        tie_word_embeddings: a.tie_word_embeddings,
        shards: a.shards,
        max_position_embeddings: a.max_position_embeddings,
        sliding_window: a.sliding_window,
        seed: a.seed,
    }
}

/// `synth`: writes the model and prints each written file, one a line.
fn synth_command(a: SynthArgs) -> ExitCode {
    match synth(&synth_spec(&a), &a.out) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `cuda-check`: the kernel × architecture table on stdout, failures on
/// stderr; exit 1 if a cell fails, 2 if NVRTC or the headers are missing.
fn cuda_check(arch: &[u32], cuda_include: &[PathBuf], resources: bool) -> ExitCode {
    match copyhold_node::cuda::check::run(arch, cuda_include) {
        Ok(report) => {
            println!("NVRTC {}", report.nvrtc);
            print!("{}", report.table());
            if resources {
                print!("{}", report.resources());
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                eprint!("{}", report.failures());
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `bench`: ours first (an error there ends the run with exit 2), then the
/// peers (a failure there only leaves the peer out), then one table of the
/// best of each.
fn bench(a: BenchArgs) -> ExitCode {
    let kv_f16 = matches!(a.cuda.kv_cache_dtype, Some(KvDtypeArg::F16));
    let device = a.cuda.device(a.device, false);
    if let Some(t) = a.threads
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let threads = a.threads.unwrap_or_else(rayon::current_num_threads);
    let repeat = a.repeat.max(1);
    let mut rows = match bench_ours(&a, &device, kv_f16, repeat) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    bench_peers(&a, threads, repeat, &mut rows);
    println!(
        "\n# prompt {}, gen {}, {threads} threads, best of {repeat}\n\n{}",
        a.prompt,
        a.generate,
        peers::table(&rows)
    );
    ExitCode::SUCCESS
}

/// Measures our engine at each `--batch` size, `repeat` times each,
/// printing every run's JSON line and keeping the best row per size.
fn bench_ours(
    a: &BenchArgs,
    device: &EngineDevice,
    kv_f16: bool,
    repeat: usize,
) -> copyhold_node::error::Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    for &b in &a.batch {
        let mut best: Option<Row> = None;
        for _ in 0..repeat {
            let r = copyhold_node::bench::run(
                &a.model,
                b,
                a.prompt,
                a.generate,
                a.kv_cache_mib,
                kv_f16,
                device,
            )?;
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            let row = Row::from_ours(&r);
            best = Some(match best {
                Some(x) => x.best(row),
                None => row,
            });
        }
        rows.extend(best);
    }
    Ok(rows)
}

/// Measures the peers that were given (llama-bench, llama-batched-bench,
/// transformers, in that order) into `rows`; each one missing prints a
/// `# ...: skipped` line saying which flag would enable it.
fn bench_peers(a: &BenchArgs, threads: usize, repeat: usize, rows: &mut Vec<Row>) {
    let (p, prompt, generate) = (&a.peers, a.prompt, a.generate);
    let peer_batch = if p.peer_batch.is_empty() {
        &a.batch
    } else {
        &p.peer_batch
    };
    match (&p.llama_bench, &p.gguf) {
        (Some(bin), Some(gguf)) => measure_peer("llama-bench", repeat, rows, &mut || {
            peers::llama_bench(bin, gguf, prompt, generate, threads, 1)
        }),
        (Some(_), None) => println!("# llama-bench: skipped (no --gguf)"),
        _ => println!("# llama-bench: skipped (no --llama-bench)"),
    }
    match (&p.llama_batched_bench, &p.gguf) {
        (Some(bin), Some(gguf)) => {
            for &b in peer_batch {
                measure_peer("llama-batched-bench", repeat, rows, &mut || {
                    peers::llama_batched(bin, gguf, b, prompt, generate, threads).map(|r| vec![r])
                })
            }
        }
        (Some(_), None) => println!("# llama-batched-bench: skipped (no --gguf)"),
        _ => println!("# llama-batched-bench: skipped (no --llama-batched-bench)"),
    }
    let Some(py) = &p.python else {
        println!("# transformers: skipped (no --python)");
        return;
    };
    let script = p.hf_script.clone().unwrap_or_else(peers::default_hf_script);
    let hf_batch = if p.hf_batch.is_empty() {
        peer_batch
    } else {
        &p.hf_batch
    };
    for &b in hf_batch {
        measure_peer("transformers", repeat, rows, &mut || {
            peers::transformers(py, &script, &a.model, b, prompt, generate, threads)
                .map(|r| vec![r])
        })
    }
}

/// Runs a peer measurement `repeat` times, printing each run's rows and
/// adding the best of each to `rows`; a failure is printed as a `#` line
/// and leaves the peer out of the table (a peer is not ours to fix).
fn measure_peer(
    name: &str,
    repeat: usize,
    rows: &mut Vec<Row>,
    f: &mut dyn FnMut() -> Result<Vec<Row>, String>,
) {
    let mut best: Option<Vec<Row>> = None;
    for _ in 0..repeat {
        match f() {
            Ok(r) => {
                for row in &r {
                    println!("{}", serde_json::to_string(row).unwrap_or_default());
                }
                best = Some(match best {
                    Some(x) => x.into_iter().zip(r).map(|(a, b)| a.best(b)).collect(),
                    None => r,
                });
            }
            Err(e) => {
                println!("# {name}: failed: {e}");
                return;
            }
        }
    }
    rows.extend(best.unwrap_or_default());
}

/// The CPU pool's size when neither `--kv-cache-mib` nor `--max-model-len`
/// says: 512 MiB, not `--max-running` sequences at the model's whole
/// context (64 × 128 K tokens of a Llama 3.1 would be terabytes). On CUDA
/// the GPU's memory bounds the pool instead.
fn cpu_default_kv_mib(device: Device, max_model_len: Option<usize>) -> Option<usize> {
    (matches!(device, Device::Cpu) && max_model_len.is_none()).then_some(512)
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let device = a.cuda.device(a.device, false);
    if let EngineDevice::Cuda(_) = device {
        // Fail at start, before binding the port, when there is no driver.
        let info = copyhold_node::cuda::backend::probe()?;
        tracing::info!(
            driver_cuda = format!("{}.{}", info.version / 1000, info.version % 1000 / 10),
            gpus = info.devices,
            "CUDA driver"
        );
    }
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()?;
    }
    let admin_token = match &a.admin_token_file {
        None => None,
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("{}: cannot read admin token: {e}", p.display()))?;
            let t = t.trim().to_string();
            anyhow::ensure!(
                !t.is_empty(),
                "{}: the admin token file is empty",
                p.display()
            );
            Some(t)
        }
    };
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .canonicalize()
            .unwrap_or_else(|_| a.model.clone())
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into())
    });
    let metrics = Arc::new(Metrics::new());
    let choice = match a.power_sensor {
        // On GPUs the energy is the GPUs' (NVML; the model if it is absent).
        SensorArg::Auto if matches!(a.device, Device::Cuda) => SensorChoice::Nvml,
        SensorArg::Auto => SensorChoice::Auto,
        SensorArg::Nvml => SensorChoice::Nvml,
        SensorArg::Rapl => SensorChoice::Rapl,
        SensorArg::Model => SensorChoice::Model,
    };
    let (sensor, gpu) = open_sensor(
        choice,
        a.power_model,
        std::path::Path::new("/sys/class/powercap"),
    );
    let state = Arc::new(AppState::new(name, admin_token, metrics.clone()).with_gpu(gpu));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", a.host, a.port).parse()?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let shutdown = Shutdown::install()?;
        // One machine-readable line so scripts and tests can find the port;
        // from here on a SIGTERM is caught.
        println!("{}", serde_json::json!({"listening": local.to_string()}));
        tracing::info!(%local, model = %a.model.display(), "listening; loading model");
        let server = tokio::spawn(copyhold_node::api::server::serve(
            listener,
            state.clone(),
            shutdown.clone(),
        ));
        tracing::info!(sensor = sensor.name(), "power sensor");
        let opts = EngineOptions {
            kv_bytes: a
                .kv_cache_mib
                .or(cpu_default_kv_mib(a.device, a.max_model_len))
                .map(|m| m << 20),
            block_size: a.block_size.max(1),
            max_batch_tokens: a.max_batch_tokens,
            max_running: a.max_running,
            kv_f16: matches!(a.cuda.kv_cache_dtype, Some(KvDtypeArg::F16)),
            max_context: a.max_model_len,
        };
        let dir = a.model.clone();
        let m2 = metrics.clone();
        let loading =
            tokio::task::spawn_blocking(move || load_engine(&dir, &opts, &device, m2, sensor));
        // A stop asked for while the weights still load (minutes for a large
        // model on slow storage) is honoured at once, not after the load.
        let (mut engine, text) = tokio::select! {
            loaded = loading => loaded??,
            _ = shutdown.requested() => {
                tracing::info!("stopped while the model was loading");
                return Ok(());
            }
        };
        engine.set_pacing_model(a.power_model);
        let limits = Limits {
            max_context: engine.config().max_context,
            max_n: a.max_n.max(1),
            kv_tokens: engine.kv_tokens(),
            vocab_rows: engine.vocab_rows(),
            default_max_tokens: a.default_max_tokens.max(1),
            ..Default::default()
        };
        let handle = spawn(engine, a.queue_capacity);
        let watched = handle.clone();
        let _ = state.ready.set(Ready {
            handle,
            text,
            limits,
        });
        tracing::info!("model loaded; ready");
        let mut server = server;
        loop {
            tokio::select! {
                r = &mut server => {
                    r??;
                    return Ok(());
                }
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {
                    if let Some(why) = watched.failed() {
                        // /health already says 503; give the failed requests'
                        // answers a moment to reach their clients, then exit
                        // non-zero for Kubernetes to restart the pod.
                        tracing::error!(error = why, "the engine has stopped; exiting");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        std::process::exit(3);
                    }
                }
            }
        }
    });
    // A load cut short by a stop still runs on a blocking thread, which
    // dropping the runtime would wait for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}
