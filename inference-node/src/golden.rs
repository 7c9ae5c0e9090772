//! `check-golden DIR`: runs every case of `DIR/golden.json` through the
//! serving path (tokenizer, chat template, engine with batching, paged KV
//! cache, sampler) and compares with what HF transformers computed.
//! Nothing here knows a fixture by name.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::unbounded_channel;

use crate::api::chat::{Message, render};
use crate::cpu::CpuBackend;
use crate::engine::backend::Backend;
use crate::engine::sampling::SamplingParams;
use crate::engine::{Engine, EngineConfig, Event, GenRequest};
use crate::error::{Error, Result, read_json};
use crate::metrics::Metrics;
use crate::model;
use crate::power::{ModeledSensor, PowerModel};

/// Largest logit difference allowed on the CPU.
pub const LOGIT_TOLERANCE: f32 = 1e-4;

/// Largest logit difference allowed on CUDA (other summation orders, fused
/// multiply-adds; f32 activations and KV in the default golden settings).
pub const CUDA_LOGIT_TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
    chat: Option<ChatCase>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    token_ids: Vec<u32>,
    last_logits: Vec<f32>,
    greedy_continuation_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct ChatCase {
    messages: Vec<Message>,
    rendered: String,
    token_ids: Vec<u32>,
    greedy_continuation_ids: Vec<u32>,
}

/// The one JSON line `check-golden` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub device: &'static str,
    pub cases_run: usize,
    pub chat_run: bool,
    pub max_abs_logit_diff: f32,
    pub greedy_match: bool,
    pub tokens_match: bool,
    pub chat_render_match: bool,
    pub ok: bool,
}

struct Job {
    prompt: Vec<u32>,
    want_tokens: Vec<u32>,
    want_logits: Option<Vec<f32>>,
}

/// Runs the check on the CPU; `Err` only when the inputs cannot be loaded.
pub fn check(dir: &Path) -> Result<Report> {
    check_on(dir, &crate::load::Device::Cpu)
}

/// Runs the check on `device` (CUDA: the pool gets exactly the blocks the
/// cases need; tolerance [`CUDA_LOGIT_TOLERANCE`]).
pub fn check_on(dir: &Path, device: &crate::load::Device) -> Result<Report> {
    let golden: Golden = read_json(&dir.join("golden.json"))?;
    let (model, text) = model::open(dir)?;
    let text = Arc::new(text);
    let mut tokens_match = true;
    let mut jobs = Vec::new();
    for c in &golden.cases {
        let ids = text.encode(&c.prompt)?;
        tokens_match &= ids == c.token_ids;
        jobs.push(Job {
            prompt: ids,
            want_tokens: c.greedy_continuation_ids.clone(),
            want_logits: Some(c.last_logits.clone()),
        });
    }
    let mut chat_render_match = true;
    if let Some(chat) = &golden.chat {
        let template = text.chat_template.as_deref().ok_or_else(|| {
            Error::Golden("golden.json has a chat case but the model has no chat template".into())
        })?;
        let rendered = render(
            template,
            &chat.messages,
            text.bos_token.as_deref(),
            text.eos_token.as_deref(),
            true,
        )?;
        chat_render_match = rendered == chat.rendered;
        let ids = text.encode(&rendered)?;
        tokens_match &= ids == chat.token_ids;
        jobs.push(Job {
            prompt: ids,
            want_tokens: chat.greedy_continuation_ids.clone(),
            want_logits: None,
        });
    }
    let max_context = model.cfg.max_position_embeddings;
    let block_size = 16;
    let num_blocks = jobs
        .iter()
        .map(|j| (j.prompt.len() + j.want_tokens.len()).div_ceil(block_size) + 1)
        .sum::<usize>()
        .max(4);
    let max_batch_tokens = 64;
    let (backend, tolerance): (Box<dyn Backend>, f32) = match device {
        crate::load::Device::Cpu => (
            Box::new(CpuBackend::new(model, num_blocks, block_size)),
            LOGIT_TOLERANCE,
        ),
        crate::load::Device::Cuda(opts) => {
            let mut o = opts.clone();
            o.num_blocks = Some(num_blocks);
            o.block_size = block_size;
            o.max_batch_tokens = max_batch_tokens;
            o.max_running = 64;
            let b = crate::cuda::backend::CudaBackend::new(&model, o)?;
            (Box::new(b), CUDA_LOGIT_TOLERANCE)
        }
    };
    let device_name = backend.name();
    let mut engine = Engine::new(
        backend,
        text,
        EngineConfig {
            num_blocks,
            block_size,
            // Small chunks so long prompts exercise chunked prefill too.
            max_batch_tokens,
            max_running: 64,
            max_context,
        },
        Arc::new(Metrics::new()),
        Box::new(ModeledSensor(PowerModel {
            idle_w: 0.0,
            busy_w: 0.0,
        })),
    );
    let mut receivers = Vec::new();
    for j in &jobs {
        let (tx, rx) = unbounded_channel();
        let mut params = SamplingParams::greedy(j.want_tokens.len());
        params.ignore_eos = true;
        engine.add(GenRequest {
            prompt: j.prompt.clone(),
            params,
            stop: Vec::new(),
            capture_logits: j.want_logits.is_some(),
            events: tx,
        });
        receivers.push(rx);
    }
    engine.run_to_completion();
    let mut max_diff = 0.0f32;
    let mut greedy_match = true;
    for (j, mut rx) in jobs.iter().zip(receivers) {
        let mut got = Vec::new();
        let mut first_logits = None;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Token { id, logits, .. } => {
                    if first_logits.is_none() {
                        first_logits = logits;
                    }
                    got.push(id);
                }
                Event::Done { .. } => {}
                Event::Error(e) => return Err(Error::Golden(e)),
            }
        }
        greedy_match &= got == j.want_tokens;
        if let Some(want) = &j.want_logits {
            match first_logits {
                Some(l) if l.len() == want.len() => {
                    let mut case_diff = 0.0f32;
                    for (a, b) in l.iter().zip(want) {
                        let d = (a - b).abs();
                        // NaN compares false: count it as infinitely wrong.
                        case_diff = if d.is_nan() {
                            f32::INFINITY
                        } else {
                            case_diff.max(d)
                        };
                    }
                    tracing::debug!(prompt_tokens = j.prompt.len(), case_diff, "golden case");
                    if std::env::var_os("COPYHOLD_GOLDEN_VERBOSE").is_some() {
                        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                        eprintln!(
                            "case: {} prompt tokens, max |logit| {scale}, max diff {case_diff}",
                            j.prompt.len()
                        );
                    }
                    max_diff = max_diff.max(case_diff);
                }
                _ => max_diff = f32::INFINITY,
            }
        }
    }
    let ok = max_diff <= tolerance && greedy_match && tokens_match && chat_render_match;
    Ok(Report {
        model: dir.display().to_string(),
        device: device_name,
        cases_run: golden.cases.len(),
        chat_run: golden.chat.is_some(),
        max_abs_logit_diff: max_diff,
        greedy_match,
        tokens_match,
        chat_render_match,
        ok,
    })
}
