//! `bench`: prefill and decode throughput, time to first token and peak
//! memory of the engine itself (no HTTP), per batch size.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::unbounded_channel;

use crate::engine::sampling::SamplingParams;
use crate::engine::{EngineOptions, Event, GenRequest};
use crate::error::Result;
use crate::load::{Device, load_engine};
use crate::metrics::Metrics;
use crate::power::{ModeledSensor, PowerModel};

/// One line of results.
#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub device: &'static str,
    pub batch: usize,
    pub prompt: usize,
    pub generate: usize,
    pub threads: usize,
    /// KV cache element type (CPU).
    pub kv_cache: &'static str,
    /// Prompt tokens of the whole batch over the time until every sequence
    /// had its first token.
    pub prefill_tokens_per_s: f64,
    /// Tokens after the first, over the time after the last first token.
    pub decode_tokens_per_s: f64,
    pub ttft_mean_s: f64,
    pub ttft_max_s: f64,
    pub peak_rss_mib: f64,
    pub load_s: f64,
}

/// Peak resident memory (VmHWM) in MiB, if the platform reports it.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs `batch` greedy sequences of `prompt` random tokens for `gen` tokens.
pub fn run(
    dir: &Path,
    batch: usize,
    prompt: usize,
    generate: usize,
    kv_mib: usize,
    kv_f16: bool,
    device: &Device,
) -> Result<BenchResult> {
    let t0 = Instant::now();
    let opts = EngineOptions {
        // The CUDA pool is sized from the GPU's memory, as before.
        kv_bytes: matches!(device, Device::Cpu).then_some(kv_mib << 20),
        max_running: batch.max(1),
        max_batch_tokens: 512.max(batch),
        kv_f16,
        ..Default::default()
    };
    let sensor = Box::new(ModeledSensor(PowerModel {
        idle_w: 0.0,
        busy_w: 0.0,
    }));
    let (mut engine, text) = load_engine(dir, &opts, device, Arc::new(Metrics::new()), sensor)?;
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = text.vocab_size().max(2) as u64;
    // Warm-up, as llama-bench and llama-batched-bench do: one short request
    // faults the mapped weights in and sizes the allocator before timing.
    {
        let (tx, mut rx) = unbounded_channel();
        let mut params = SamplingParams::greedy(2);
        params.ignore_eos = true;
        engine.add(GenRequest {
            prompt: (0..16).map(|i| (i % vocab) as u32).collect(),
            params,
            stop: vec![],
            capture_logits: false,
            events: tx,
        });
        while !engine.is_idle() {
            engine.step();
        }
        while rx.try_recv().is_ok() {}
    }
    let mut rxs = Vec::new();
    for b in 0..batch {
        // Distinct prompts, so the prefix cache does not help.
        let mut rng = crate::engine::sampling::Rng::new(b as u64 + 1);
        let ids: Vec<u32> = (0..prompt)
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let (tx, rx) = unbounded_channel();
        let mut params = SamplingParams::greedy(generate);
        params.ignore_eos = true;
        engine.add(GenRequest {
            prompt: ids,
            params,
            stop: vec![],
            capture_logits: false,
            events: tx,
        });
        rxs.push(rx);
    }
    let start = Instant::now();
    let mut first: Vec<Option<Duration>> = vec![None; batch];
    let mut tokens = 0usize;
    while !engine.is_idle() {
        engine.step();
        for (i, rx) in rxs.iter_mut().enumerate() {
            while let Ok(ev) = rx.try_recv() {
                if let Event::Token { .. } = ev {
                    tokens += 1;
                    first[i].get_or_insert(start.elapsed());
                }
            }
        }
    }
    let end = start.elapsed().as_secs_f64();
    let ttfts: Vec<f64> = first
        .iter()
        .map(|t| t.map_or(end, |d| d.as_secs_f64()))
        .collect();
    let prefill_end = ttfts.iter().cloned().fold(0.0, f64::max);
    let decode_tokens = tokens.saturating_sub(batch);
    Ok(BenchResult {
        device: match device {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        },
        batch,
        prompt,
        generate,
        threads: rayon::current_num_threads(),
        kv_cache: if kv_f16 { "f16" } else { "f32" },
        prefill_tokens_per_s: (batch * prompt) as f64 / prefill_end.max(1e-9),
        decode_tokens_per_s: decode_tokens as f64 / (end - prefill_end).max(1e-9),
        ttft_mean_s: ttfts.iter().sum::<f64>() / batch.max(1) as f64,
        ttft_max_s: prefill_end,
        peak_rss_mib: peak_rss_mib(),
        load_s,
    })
}
pub mod peers;
