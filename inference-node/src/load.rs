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
/// pool is what the GPUs hold within `--gpu-memory-utilization`, but no
/// more than `max_running` sequences at the served context use, nor more
/// than `opts.kv_bytes` when given.
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
    let max_context = served_context(model.cfg.max_position_embeddings, opts.max_context);
    let mut c = cuda.clone();
    c.block_size = opts.block_size;
    c.max_batch_tokens = opts.max_batch_tokens.max(1);
    c.max_running = opts.max_running.max(1);
    c.max_context = Some(max_context);
    c.kv_bytes = opts.kv_bytes.map(|b| b as u64);
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
    let max_context = served_context(model.cfg.max_position_embeddings, opts.max_context);
    let num_blocks = kv_pool_blocks(
        opts.kv_bytes,
        per_block,
        opts.max_running,
        max_context,
        opts.block_size,
    );
    tracing::info!(
        context = max_context,
        max_running = opts.max_running,
        num_blocks,
        kv_mib = (num_blocks * per_block) >> 20,
        sized_by = if opts.kv_bytes.is_some() {
            "budget (--kv-cache-mib, or 512 MiB without --max-model-len)"
        } else {
            "context x max running"
        },
        "KV pool"
    );
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

/// The context the node serves: what the deployment sized
/// (`--max-model-len`), but never more than the model has positions for
/// (a warning says so when asked for more).
pub fn served_context(model_max: usize, asked: Option<usize>) -> usize {
    match asked {
        Some(a) if a > model_max => {
            tracing::warn!(
                asked = a,
                model_max,
                "--max-model-len is more than the model's max_position_embeddings; serving the model's"
            );
            model_max
        }
        Some(a) => a.max(1),
        None => model_max,
    }
}

/// Blocks of the CPU KV pool: `explicit_bytes` (`--kv-cache-mib`) when
/// given, else enough for `max_running` sequences of `context` tokens each
/// (the `contextLength × maxConcurrentSequences` placement sized); at
/// least 2.
pub fn kv_pool_blocks(
    explicit_bytes: Option<usize>,
    bytes_per_block: usize,
    max_running: usize,
    context: usize,
    block_size: usize,
) -> usize {
    let blocks = match explicit_bytes {
        Some(b) => b / bytes_per_block.max(1),
        None => max_running
            .max(1)
            .saturating_mul(context.div_ceil(block_size.max(1))),
    };
    blocks.max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_holds_every_running_sequence_at_the_full_context() {
        // 4 sequences × ceil(1000 / 16) = 63 blocks each.
        assert_eq!(kv_pool_blocks(None, 768 * 16, 4, 1000, 16), 4 * 63);
        assert_eq!(kv_pool_blocks(None, 1, 1, 16, 16), 2, "at least 2");
    }

    #[test]
    fn an_explicit_kv_size_wins_over_the_sized_one() {
        assert_eq!(kv_pool_blocks(Some(1 << 20), 1 << 14, 64, 4096, 16), 64);
    }

    #[test]
    fn the_served_context_is_the_asked_one_within_the_models_positions() {
        assert_eq!(served_context(256, Some(32)), 32);
        assert_eq!(served_context(256, Some(4096)), 256);
        assert_eq!(served_context(256, None), 256);
    }
}
