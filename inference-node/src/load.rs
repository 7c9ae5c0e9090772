//! The one place that picks a backend: a model directory and a [`Device`]
//! become an [`Engine`] over the CPU or the CUDA backend. The engine itself
//! names no device.

use std::sync::Arc;

use crate::cpu::CpuBackend;
use crate::cpu::attention::KvStore;
use crate::cuda::backend::{CudaBackend, CudaOptions, probe};
use crate::engine::{Engine, EngineConfig, EngineOptions};
use crate::metrics::Metrics;
use crate::model::tokenizer::TextModel;
use crate::power::PowerSensor;

/// Which backend [`load_engine`] builds.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    /// NVIDIA GPUs; `block_size`, `max_batch_tokens` and `max_running`
    /// are taken from the engine options.
    Cuda(CudaOptions),
}

/// Loads a model directory into an engine on `device`. For CUDA the KV
/// pool is sized from free GPU memory (`opts.kv_bytes` is not used).
pub fn load_engine(
    dir: &std::path::Path,
    opts: &EngineOptions,
    device: &Device,
    metrics: Arc<Metrics>,
    sensor: Box<dyn PowerSensor>,
) -> crate::Result<(Engine, Arc<TextModel>)> {
    let Device::Cuda(cuda) = device else {
        return load_cpu_engine(dir, opts, metrics, sensor);
    };
    // No driver: say so before spending time on the model.
    probe()?;
    let (model, text) = crate::model::open(dir)?;
    let text = Arc::new(text);
    let max_context = model.cfg.max_position_embeddings;
    let mut c = cuda.clone();
    c.block_size = opts.block_size;
    c.max_batch_tokens = opts.max_batch_tokens.max(1);
    c.max_running = opts.max_running.max(1);
    let backend = CudaBackend::new(&model, c)?;
    // The weights now live on the GPUs; the mapped files can go.
    drop(model);
    let num_blocks = backend.num_blocks();
    let config = engine_config(opts, num_blocks, max_context);
    let engine = Engine::new(Box::new(backend), text.clone(), config, metrics, sensor);
    Ok((engine, text))
}

/// Loads a model directory into a CPU engine; every loading error (config,
/// weights, tokenizer, template) surfaces here, before anything serves.
pub fn load_cpu_engine(
    dir: &std::path::Path,
    opts: &EngineOptions,
    metrics: Arc<Metrics>,
    sensor: Box<dyn PowerSensor>,
) -> crate::Result<(Engine, Arc<TextModel>)> {
    let (model, text) = crate::model::open(dir)?;
    let text = Arc::new(text);
    let per_block = KvStore::bytes_per_block(&model.cfg, opts.block_size, opts.kv_f16);
    let num_blocks = (opts.kv_bytes / per_block.max(1)).max(2);
    let max_context = model.cfg.max_position_embeddings;
    let backend = CpuBackend::with_kv(model, num_blocks, opts.block_size, opts.kv_f16);
    let config = engine_config(opts, num_blocks, max_context);
    let engine = Engine::new(Box::new(backend), text.clone(), config, metrics, sensor);
    Ok((engine, text))
}

/// The engine's sizing from the options, whichever backend holds the KV
/// pool of `num_blocks` blocks.
fn engine_config(opts: &EngineOptions, num_blocks: usize, max_context: usize) -> EngineConfig {
    EngineConfig {
        num_blocks,
        block_size: opts.block_size,
        max_batch_tokens: opts.max_batch_tokens.max(1),
        max_running: opts.max_running.max(1),
        max_context,
    }
}
