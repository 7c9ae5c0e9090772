//! The engine loop: admits requests into the running batch between steps,
//! runs one forward pass over every scheduled token of every sequence,
//! samples, detokenizes, finishes, and charges each step's energy to the
//! sequences in it by their share of its tokens.

pub mod backend;
pub mod constrained;
pub mod kv_cache;
pub mod sampling;
pub mod scheduler;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use self::backend::{Backend, Batch, BatchToken, RowOut, RowWant};
use self::kv_cache::{BlockManager, SeqBlocks};
use self::sampling::{Rng, SamplingParams, TokenLogprobs, sample};
use self::scheduler::{Pending, plan};
use crate::metrics::Metrics;
use crate::model::detok::{Detokenizer, StopChecker};
use crate::model::tokenizer::TextModel;
use crate::power::{PowerSensor, pacing_delay};

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Tokens per forward pass (decodes + prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    pub max_running: usize,
    /// Longest prompt + generation.
    pub max_context: usize,
}

/// Why a generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token accounting of one finished sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
    pub energy_joules: f64,
}

/// What a request's receiver sees, in order.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: u32,
        /// Text released by this token (may be empty: held back).
        text: String,
        logprobs: Option<TokenLogprobs>,
        /// Full logits at this position, when the request asked for them.
        logits: Option<Vec<f32>>,
    },
    Done {
        /// Text released at the end (held-back tail).
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
    },
    Error(String),
}

/// A generation request.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Send the logits with every token (golden checks).
    pub capture_logits: bool,
    pub events: UnboundedSender<Event>,
}

/// Prompts of at least this many tokens are prefilled on the wide kernels
/// (AMX): below it, packing the weights for so few rows costs more than it
/// saves (measured crossover about 56 tokens on the 284 M model, see
/// `bench/results/inference-node.md`). A property of the sequence, so its
/// results never depend on what it is batched with.
pub const WIDE_MIN_PROMPT: usize = 64;

struct Seq {
    /// Arrival order: when the KV pool runs out, the latest arrival is
    /// preempted (not merely the latest admitted, which after a
    /// re-admission would be an older request, preempted again and again).
    arrival: u64,
    /// Constrained decoding (structured output, forced tool calls).
    guide: Option<crate::engine::constrained::Guide>,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    blocks: SeqBlocks,
    params: SamplingParams,
    rng: Rng,
    detok: Detokenizer,
    stop: StopChecker,
    capture_logits: bool,
    events: UnboundedSender<Event>,
    usage: Usage,
    admitted: bool,
}

/// Power limit shared with the admin API (f64 bits; 0 = none).
#[derive(Debug, Default)]
pub struct PowerLimit(AtomicU64);

impl PowerLimit {
    pub fn get(&self) -> Option<f64> {
        let w = f64::from_bits(self.0.load(Ordering::Relaxed));
        (w > 0.0).then_some(w)
    }
    pub fn set(&self, w: Option<f64>) {
        self.0.store(w.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
    }
}

/// The engine state. Drive it with [`Engine::add`] and [`Engine::step`]
/// (directly, as `check-golden` does, or on a thread via [`spawn`]).
pub struct Engine {
    backend: Box<dyn Backend>,
    text: Arc<TextModel>,
    blocks: BlockManager,
    cfg: EngineConfig,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    metrics: Arc<Metrics>,
    sensor: Box<dyn PowerSensor>,
    limit: Arc<PowerLimit>,
    /// Requests submitted and not yet admitted (the bounded queue).
    queued: Arc<AtomicUsize>,
    seed_counter: u64,
    /// Declared power used to pace steps under a limit (any sensor).
    pacing: Option<crate::power::PowerModel>,
    /// Set when the backend failed beyond recovery (a poisoned GPU
    /// context): every request is refused and the serving loop exits.
    failed: Option<String>,
    arrivals: u64,
}

impl Engine {
    pub fn new(
        backend: Box<dyn Backend>,
        text: Arc<TextModel>,
        cfg: EngineConfig,
        metrics: Arc<Metrics>,
        sensor: Box<dyn PowerSensor>,
    ) -> Engine {
        metrics.kv_blocks_total.set(cfg.num_blocks as i64);
        Engine {
            backend,
            text,
            blocks: BlockManager::new(cfg.num_blocks, cfg.block_size),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            metrics,
            sensor,
            limit: Arc::new(PowerLimit::default()),
            queued: Arc::new(AtomicUsize::new(0)),
            seed_counter: 0,
            pacing: None,
            failed: None,
            arrivals: 0,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Sets the declared power that pacing under a limit assumes.
    pub fn set_pacing_model(&mut self, m: crate::power::PowerModel) {
        self.pacing = Some(m);
    }

    pub fn power_limit(&self) -> Arc<PowerLimit> {
        self.limit.clone()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn blocks_in_use(&self) -> usize {
        self.blocks.blocks_in_use()
    }

    /// Queues a request; an impossible one is answered with an error event.
    pub fn add(&mut self, req: GenRequest) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.enqueue(req);
    }

    /// Why the backend stopped working, if it did.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Tokens the KV pool holds.
    pub fn kv_tokens(&self) -> usize {
        self.cfg.num_blocks * self.cfg.block_size
    }

    /// Rows of the model's embedding (the ids it can take).
    pub fn vocab_rows(&self) -> usize {
        self.backend.config().vocab_size
    }

    /// Why a request can never be served, if it cannot. The server checks
    /// the same first and answers 400s; this guards direct callers.
    fn impossible(&self, req: &GenRequest) -> Option<String> {
        let len = req.prompt.len();
        if let Some(f) = &self.failed {
            Some(format!("the inference device failed: {f}"))
        } else if len == 0 {
            Some("prompt is empty".to_string())
        } else if len >= self.cfg.max_context {
            Some(format!(
                "prompt has {len} tokens; the context is {}",
                self.cfg.max_context
            ))
        } else if len + req.params.max_tokens.max(1) > self.kv_tokens() {
            Some(format!(
                "prompt ({len} tokens) plus max_tokens ({}) do not fit in the KV cache ({} tokens)",
                req.params.max_tokens,
                self.kv_tokens()
            ))
        } else {
            req.prompt
                .iter()
                .find(|&&t| t as usize >= self.vocab_rows())
                .map(|t| {
                    format!(
                        "token id {t} is outside the model's vocabulary ({} rows)",
                        self.vocab_rows()
                    )
                })
        }
    }

    /// Queues a request already counted in `queued` (by the handle).
    fn enqueue(&mut self, req: GenRequest) {
        let reject = self.impossible(&req);
        if let Some(msg) = reject {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.metrics.count("error");
            let _ = req.events.send(Event::Error(msg));
            return;
        }
        let seed = req.params.seed.unwrap_or_else(|| {
            self.seed_counter += 1;
            // Unseeded requests still differ from each other.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ self.seed_counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        let prompt_len = req.prompt.len();
        self.arrivals += 1;
        self.waiting.push_back(Seq {
            arrival: self.arrivals,
            guide: req
                .params
                .constraint
                .as_ref()
                .map(crate::engine::constrained::Guide::new),
            tokens: req.prompt,
            prompt_len,
            computed: 0,
            blocks: SeqBlocks::default(),
            rng: Rng::new(seed),
            params: req.params,
            detok: Detokenizer::default(),
            stop: StopChecker::new(req.stop),
            capture_logits: req.capture_logits,
            events: req.events,
            usage: Usage {
                prompt_tokens: prompt_len,
                ..Default::default()
            },
            admitted: false,
        });
        self.metrics.queue_depth.set(self.waiting.len() as i64);
    }

    fn reap_cancelled(&mut self) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for mut s in self.waiting.drain(..) {
            if s.events.is_closed() {
                if !s.admitted {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                }
                self.blocks.free(&mut s.blocks);
                self.metrics.count("cancelled");
            } else {
                kept.push_back(s);
            }
        }
        self.waiting = kept;
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                let mut s = self.running.remove(i);
                self.blocks.free(&mut s.blocks);
                self.metrics.count("cancelled");
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let Some((blocks, cached)) = self.blocks.allocate_prompt(&front.tokens) else {
                break;
            };
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if !s.admitted {
                // First admission (not a re-admission after preemption).
                s.admitted = true;
                self.queued.fetch_sub(1, Ordering::Relaxed);
                s.usage.cached_tokens = cached;
            }
            s.blocks = blocks;
            s.computed = cached;
            self.running.push(s);
        }
    }

    /// Runs one step; false when there was nothing to do.
    pub fn step(&mut self) -> bool {
        self.reap_cancelled();
        self.admit();
        self.metrics.queue_depth.set(self.waiting.len() as i64);
        if self.running.is_empty() {
            self.update_gauges();
            return false;
        }
        let pend: Vec<Pending> = self
            .running
            .iter()
            .map(|s| Pending {
                computed: s.computed,
                total: s.tokens.len(),
            })
            .collect();
        let mut n = plan(&pend, self.cfg.max_batch_tokens);
        for (s, n) in self.running.iter_mut().zip(n.iter_mut()) {
            if *n > 0 && !self.blocks.grow(&mut s.blocks, s.computed + *n) {
                *n = 0;
            }
        }
        if n.iter().all(|&x| x == 0) {
            if self.running.len() == 1 {
                // Admission keeps prompt + max_tokens within the pool, so
                // a lone sequence always fits; if one does not, say so
                // rather than claim it reached a length limit.
                let mut s = self.running.remove(0);
                self.blocks.free(&mut s.blocks);
                self.metrics.count("error");
                let _ = s.events.send(Event::Error(
                    "the sequence outgrew the KV cache".to_string(),
                ));
                self.update_gauges();
                return true;
            }
            self.preempt_latest();
            return true;
        }
        let mut batch = Batch::default();
        let mut sampled = Vec::new(); // (running index, logits row)
        let mut wants = Vec::new();
        let on_device = self.backend.samples_on_device();
        for (i, (s, &k)) in self.running.iter_mut().zip(&n).enumerate() {
            if k == 0 {
                continue;
            }
            let seq_ix = batch.block_tables.len();
            batch.block_tables.push(s.blocks.table.clone());
            for p in s.computed..s.computed + k {
                batch.tokens.push(BatchToken {
                    token: s.tokens[p],
                    pos: p,
                    seq: seq_ix,
                    wide: p < s.prompt_len && s.prompt_len >= WIDE_MIN_PROMPT,
                });
            }
            if s.computed + k == s.tokens.len() {
                batch.logits_for.push(batch.tokens.len() - 1);
                sampled.push(i);
                wants.push(if on_device {
                    device_want(s)
                } else {
                    RowWant::Logits
                });
            }
        }
        let t0 = Instant::now();
        let rows = if on_device {
            self.backend.forward_rows(&batch, &wants)
        } else {
            self.backend
                .forward(&batch)
                .map(|l| l.into_iter().map(RowOut::Logits).collect())
        };
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                self.fail_step(&n, &e);
                return true;
            }
        };
        let dt = t0.elapsed();
        self.metrics.step_seconds.observe(dt.as_secs_f64());
        let joules = self.sensor.joules(true, dt);
        self.metrics.energy_joules.inc_by(joules);
        if dt > Duration::ZERO {
            self.metrics.power_watts.set(joules / dt.as_secs_f64());
        }
        let total = batch.tokens.len() as f64;
        for (s, &k) in self.running.iter_mut().zip(&n) {
            if k > 0 {
                s.computed += k;
                s.usage.energy_joules += joules * k as f64 / total;
                self.blocks.commit(&mut s.blocks, &s.tokens, s.computed);
            }
        }
        let mut finished = Vec::new();
        for (row, &i) in rows.into_iter().zip(&sampled) {
            if self.emit_token(i, row) {
                finished.push(i);
            }
        }
        for &i in finished.iter().rev() {
            let mut s = self.running.remove(i);
            self.blocks.free(&mut s.blocks);
        }
        self.update_gauges();
        if let (Some(limit), Some(model)) = (self.limit.get(), self.pacing.or(self.sensor.model()))
        {
            // Hold modeled power under the limit by idling after the step;
            // a limit at or below idle power is held as closely as possible.
            let d = pacing_delay(model, limit, dt).unwrap_or(dt * 10);
            if d > Duration::ZERO {
                std::thread::sleep(d);
            }
        }
        true
    }

    /// Out of KV blocks: the latest arrival among the running sequences
    /// gives its blocks back and waits at the head of the queue; it is
    /// recomputed (prompt + what it generated) when room returns. Older
    /// requests thus always progress first, as in arrival order.
    fn preempt_latest(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].arrival) else {
            return;
        };
        let mut s = self.running.remove(i);
        self.metrics.preemptions.inc();
        self.blocks.free(&mut s.blocks);
        s.computed = 0;
        // Keep the waiting queue in arrival order among preempted ones.
        let at = self
            .waiting
            .iter()
            .position(|w| !w.admitted || w.arrival > s.arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, s);
    }

    /// A step failed on the device: its sequences end with an error (the
    /// server answers 5xx), their blocks are freed, and the others go on.
    /// A fatal error also fails everything queued and marks the engine
    /// failed.
    fn fail_step(&mut self, n: &[usize], e: &self::backend::BackendError) {
        tracing::error!(error = %e.message, fatal = e.fatal, "engine step failed");
        let mut i = self.running.len();
        while i > 0 {
            i -= 1;
            if n[i] > 0 || e.fatal {
                let mut s = self.running.remove(i);
                self.blocks.free(&mut s.blocks);
                self.metrics.count("error");
                let _ = s.events.send(Event::Error(format!(
                    "the inference step failed: {}",
                    e.message
                )));
            }
        }
        if e.fatal {
            for mut s in self.waiting.drain(..) {
                if !s.admitted {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                }
                self.blocks.free(&mut s.blocks);
                self.metrics.count("error");
                let _ = s.events.send(Event::Error(format!(
                    "the inference device failed: {}",
                    e.message
                )));
            }
            self.failed = Some(e.message.clone());
        }
        self.update_gauges();
    }

    /// Show the sensor's idle reading over `dt` in the power gauge.
    pub fn idle_tick(&mut self, dt: Duration) {
        if dt > Duration::ZERO {
            let joules = self.sensor.joules(false, dt);
            self.metrics.power_watts.set(joules / dt.as_secs_f64());
        }
    }

    fn update_gauges(&self) {
        self.metrics.running.set(self.running.len() as i64);
        self.metrics
            .kv_blocks_in_use
            .set(self.blocks.blocks_in_use() as i64);
    }

    /// Samples and reports the next token of running sequence `i`; true if
    /// the sequence is finished.
    fn emit_token(&mut self, i: usize, row: RowOut) -> bool {
        let text = self.text.clone();
        let max_context = self.cfg.max_context;
        let s = &mut self.running[i];
        let (tok, lp, logits) = match row {
            RowOut::Token(t) => (t, None, None),
            RowOut::Logits(mut logits) => {
                if let Some(g) = &s.guide {
                    // Tokens left after this one, by max_tokens and context.
                    let left = (s
                        .params
                        .max_tokens
                        .saturating_sub(s.usage.completion_tokens))
                    .min(max_context.saturating_sub(s.tokens.len()));
                    g.mask(&mut logits, left.saturating_sub(1), &text.eos_ids);
                }
                let (prompt, output) = s.tokens.split_at(s.prompt_len);
                let (t, lp) = sample(&logits, &s.params, prompt, output, &mut s.rng);
                (t, lp, Some(logits))
            }
        };
        s.tokens.push(tok);
        s.usage.completion_tokens += 1;
        let mut is_eos = !s.params.ignore_eos && text.eos_ids.contains(&tok);
        if let Some(g) = &mut s.guide {
            // A complete document ends the generation: at its last byte,
            // or at an end-of-sequence token where it may end.
            let complete_eos = text.eos_ids.contains(&tok) && g.can_end();
            is_eos = complete_eos || !g.advance(tok) || g.done();
            if is_eos && !complete_eos {
                let d = s.detok.push(&text, tok);
                let (delta, _) = s.stop.push(&d);
                return self.end_guided(i, tok, delta, lp);
            }
        }
        let (mut delta, mut hit) = (String::new(), false);
        if !is_eos {
            let d = s.detok.push(&text, tok);
            (delta, hit) = s.stop.push(&d);
        }
        let sent = s.events.send(Event::Token {
            id: tok,
            text: delta,
            logprobs: lp,
            logits: if s.capture_logits { logits } else { None },
        });
        let reason = if hit || is_eos {
            Some(FinishReason::Stop)
        } else if s.usage.completion_tokens >= s.params.max_tokens || s.tokens.len() >= max_context
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if sent.is_err() {
            self.metrics.count("cancelled");
            return true;
        }
        let Some(reason) = reason else {
            return false;
        };
        if hit {
            self.send_done(i, String::new(), reason);
        } else {
            self.finish(i, reason);
        }
        true
    }

    /// Reports the token that completed a constrained document (its text
    /// included) and ends the sequence with "stop".
    fn end_guided(&mut self, i: usize, tok: u32, delta: String, lp: Option<TokenLogprobs>) -> bool {
        let s = &self.running[i];
        if s.events
            .send(Event::Token {
                id: tok,
                text: delta,
                logprobs: lp,
                logits: None,
            })
            .is_err()
        {
            self.metrics.count("cancelled");
            return true;
        }
        self.finish(i, FinishReason::Stop);
        true
    }

    /// Releases held-back text (which may still hit a stop string) and
    /// reports the end of running sequence `i`.
    fn finish(&mut self, i: usize, mut reason: FinishReason) {
        let text = self.text.clone();
        let s = &mut self.running[i];
        let d = s.detok.flush(&text);
        let (mut tail, h) = s.stop.push(&d);
        if h {
            reason = FinishReason::Stop;
        } else {
            tail.push_str(&s.stop.finish());
        }
        self.send_done(i, tail, reason);
    }

    fn send_done(&mut self, i: usize, tail: String, reason: FinishReason) {
        let s = &self.running[i];
        self.metrics.count("ok");
        self.metrics
            .prompt_tokens
            .inc_by(s.usage.prompt_tokens as u64);
        self.metrics
            .generation_tokens
            .inc_by(s.usage.completion_tokens as u64);
        let _ = s.events.send(Event::Done {
            text: tail,
            finish_reason: reason,
            usage: s.usage.clone(),
        });
    }

    /// Runs steps until every request has finished (offline use).
    pub fn run_to_completion(&mut self) {
        while !self.is_idle() {
            self.step();
        }
    }
}

/// What a device-sampling backend is asked for a sequence's next token:
/// the token itself when nothing needs the logits on the host (no
/// logprobs, penalties or captured logits), drawing the sequence's
/// random number exactly when `sampling::sample` would.
fn device_want(s: &mut Seq) -> RowWant {
    let p = &s.params;
    let host_only = s.capture_logits
        || s.guide.is_some()
        || p.logprobs.is_some()
        || p.repetition_penalty != 1.0
        || p.presence_penalty != 0.0
        || p.frequency_penalty != 0.0;
    if host_only {
        RowWant::Logits
    } else if p.temperature <= 1e-5 {
        RowWant::Greedy
    } else {
        RowWant::Sample {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: s.rng.next_f64(),
        }
    }
}

/// A running engine thread's front door.
#[derive(Clone)]
pub struct EngineHandle {
    tx: std::sync::mpsc::Sender<GenRequest>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    pub metrics: Arc<Metrics>,
    pub limit: Arc<PowerLimit>,
    /// Set, once, when the engine thread has stopped for good (a panic or
    /// a fatal device error): /health turns 503 and `serve` exits.
    failure: Arc<std::sync::OnceLock<String>>,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq)]
pub enum SubmitError {
    /// The bounded queue is full.
    Overloaded,
    /// The engine has stopped; the reason.
    Failed(String),
}

impl EngineHandle {
    /// Queues a request unless `capacity` requests already wait or the
    /// engine has stopped.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if let Some(why) = self.failed() {
            return Err(SubmitError::Failed(why));
        }
        let q = self.queued.fetch_add(1, Ordering::Relaxed);
        if q >= self.capacity {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.metrics.count("rejected");
            return Err(SubmitError::Overloaded);
        }
        self.metrics.queue_depth.set(q as i64 + 1);
        if self.tx.send(req).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            let why = self
                .failed()
                .unwrap_or_else(|| "the engine thread has stopped".to_string());
            return Err(SubmitError::Failed(why));
        }
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Why the engine stopped, once it has.
    pub fn failed(&self) -> Option<String> {
        self.failure.get().cloned()
    }
}

/// The text of a panic payload.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Starts the engine on its own thread; `capacity` bounds waiting requests.
/// If the thread panics, or the device fails beyond recovery, the handle
/// says so ([`EngineHandle::failed`]) at once: the node must not go on
/// answering /health with 200 while nothing generates.
pub fn spawn(mut engine: Engine, capacity: usize) -> EngineHandle {
    let (tx, rx) = std::sync::mpsc::channel::<GenRequest>();
    let failure = Arc::new(std::sync::OnceLock::new());
    let handle = EngineHandle {
        tx,
        queued: engine.queued.clone(),
        capacity,
        metrics: engine.metrics.clone(),
        limit: engine.limit.clone(),
        failure: failure.clone(),
    };
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| serve_requests(&mut engine, &rx));
            let why = match std::panic::catch_unwind(run) {
                Ok(Some(why)) => format!("the inference device failed: {why}"),
                Ok(None) => return, // every handle is gone: shutting down
                Err(p) => format!("the engine panicked: {}", panic_message(p.as_ref())),
            };
            tracing::error!(error = why, "the engine has stopped");
            let _ = failure.set(why);
            // Dropping the engine (and the queue) answers every request
            // still in it: their channels close.
        })
        .map(|_| handle)
        .unwrap_or_else(|e| panic!("cannot start the engine thread: {e}"))
}

/// The engine thread's loop; returns the device failure that ended it, or
/// `None` when every handle is dropped.
fn serve_requests(
    engine: &mut Engine,
    rx: &std::sync::mpsc::Receiver<GenRequest>,
) -> Option<String> {
    loop {
        if engine.is_idle() {
            // While idle, the power gauge shows the idle draw (an idle
            // node still draws; energy budgets read it).
            let mut since = Instant::now();
            loop {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(r) => {
                        engine.enqueue(r);
                        break;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        engine.idle_tick(since.elapsed());
                        since = Instant::now();
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
                }
            }
        }
        while let Ok(r) = rx.try_recv() {
            engine.enqueue(r);
        }
        engine.step();
        if let Some(why) = engine.failed() {
            // A poisoned GPU context does not recover.
            return Some(why.to_string());
        }
    }
}

/// Options for building an engine from a model directory.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// KV cache budget in bytes; `None`: enough for `max_running`
    /// sequences at the full context (`load::kv_pool_blocks`).
    pub kv_bytes: Option<usize>,
    pub block_size: usize,
    pub max_batch_tokens: usize,
    pub max_running: usize,
    /// CPU backend: keep K/V in f16 (half the memory and attention
    /// traffic; values rounded once). The CUDA backend has its own option.
    pub kv_f16: bool,
    /// Longest prompt + completion (`--max-model-len`, what placement
    /// sized); `None` or more than the model's positions: the model's.
    pub max_context: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            kv_bytes: Some(256 << 20),
            block_size: 16,
            max_batch_tokens: 512,
            max_running: 64,
            kv_f16: false,
            max_context: None,
        }
    }
}
