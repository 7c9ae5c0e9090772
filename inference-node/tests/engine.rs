//! The engine on its own: prefix caching, preemption under a tiny KV
//! budget, and power-limit pacing — each checked against a plain run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use copyhold_node::engine::sampling::SamplingParams;
use copyhold_node::engine::{Engine, EngineOptions, Event, GenRequest};
use copyhold_node::load::load_cpu_engine;
use copyhold_node::metrics::Metrics;
use copyhold_node::model::config::Arch;
use copyhold_node::power::{ModeledSensor, PowerModel};
use copyhold_node::synth::{SynthSpec, synth};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

fn model() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "copyhold-engine-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    synth(&SynthSpec::tiny(Arch::Llama), &d).unwrap();
    d
}

fn engine(dir: &Path, kv_bytes: usize, metrics: Arc<Metrics>) -> Engine {
    let opts = EngineOptions {
        kv_bytes: Some(kv_bytes),
        block_size: 4,
        max_batch_tokens: 16,
        max_running: 16,
        kv_f16: false,
        max_context: None,
    };
    let sensor = Box::new(ModeledSensor(PowerModel {
        idle_w: 0.0,
        busy_w: 100.0,
    }));
    load_cpu_engine(dir, &opts, metrics, sensor).unwrap().0
}

fn submit(e: &mut Engine, prompt: Vec<u32>, n: usize) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    let mut params = SamplingParams::greedy(n);
    params.ignore_eos = true;
    e.add(GenRequest {
        prompt,
        params,
        stop: vec![],
        capture_logits: false,
        events: tx,
    });
    rx
}

/// Generated ids and the usage's cached token count.
fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, usize) {
    let (mut ids, mut cached) = (Vec::new(), usize::MAX);
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Done { usage, .. } => cached = usage.cached_tokens,
            Event::Error(e) => panic!("{e}"),
        }
    }
    assert_ne!(cached, usize::MAX, "not finished");
    (ids, cached)
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 31 + salt) % 290 + 5).collect()
}

#[test]
fn a_repeated_prefix_is_served_from_cached_blocks_with_the_same_output() {
    let dir = model();
    let mut e = engine(&dir, 8 << 20, Arc::new(Metrics::new()));
    let p = prompt(30, 1);
    let first = submit(&mut e, p.clone(), 6);
    e.run_to_completion();
    let (a, cached_a) = collect(first);
    let mut q = p[..20].to_vec();
    q.extend(prompt(5, 9));
    let second = submit(&mut e, p.clone(), 6);
    let third = submit(&mut e, q.clone(), 6);
    e.run_to_completion();
    let (b, cached_b) = collect(second);
    let (c_hit, cached_c) = collect(third);
    assert_eq!(cached_a, 0);
    assert_eq!(cached_b, 28, "all full blocks before the last prompt token");
    assert_eq!(cached_c, 20);
    assert_eq!(a, b);
    assert_eq!(e.blocks_in_use(), 0);
    // The same prompt on a fresh engine (no cache) gives the same tokens.
    let mut fresh = engine(&dir, 8 << 20, Arc::new(Metrics::new()));
    let r = submit(&mut fresh, q, 6);
    fresh.run_to_completion();
    let (c_fresh, cached) = collect(r);
    assert_eq!(cached, 0);
    assert_eq!(c_hit, c_fresh);
}

#[test]
fn sequences_preempted_for_lack_of_blocks_finish_with_the_same_tokens() {
    let dir = model();
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(10 + i * 3, i as u32)).collect();
    let run = |kv_bytes: usize| {
        let metrics = Arc::new(Metrics::new());
        let mut e = engine(&dir, kv_bytes, metrics.clone());
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| submit(&mut e, p.clone(), 20))
            .collect();
        e.run_to_completion();
        assert_eq!(e.blocks_in_use(), 0);
        let preempted = metrics.preemptions.get();
        (
            rxs.into_iter().map(|r| collect(r).0).collect::<Vec<_>>(),
            preempted,
        )
    };
    // 12 × 4 KiB is a handful of 4-token blocks for six sequences of up
    // to 45 tokens: they must take turns.
    let (ample, none) = run(8 << 20);
    let (tight, some) = run(12 * 4096);
    assert_eq!(none, 0);
    assert!(some > 0, "the tight budget should have forced preemption");
    assert_eq!(ample, tight);
}

#[test]
fn a_power_limit_paces_steps_so_modeled_power_stays_under_it() {
    let dir = model();
    let metrics = Arc::new(Metrics::new());
    let mut e = engine(&dir, 8 << 20, metrics.clone());
    e.set_pacing_model(PowerModel {
        idle_w: 0.0,
        busy_w: 100.0,
    });
    e.power_limit().set(Some(25.0));
    let rx = submit(&mut e, prompt(8, 2), 40);
    let t0 = Instant::now();
    e.run_to_completion();
    let wall = t0.elapsed().as_secs_f64();
    collect(rx);
    let text = metrics.render();
    let busy: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("copyhold_node_step_duration_seconds_sum "))
        .unwrap()
        .parse()
        .unwrap();
    // Modeled average power = 100 W × busy / wall must be <= 25 W (+ slack
    // for the time spent outside steps, which only lowers it).
    let avg = 100.0 * busy / wall;
    assert!(
        avg <= 25.0 * 1.02,
        "average modeled power {avg} W over a 25 W limit"
    );
    assert!(
        avg > 5.0,
        "pacing should not idle far more than needed: {avg} W"
    );
}

#[test]
fn a_sequence_whose_prompt_and_max_tokens_outgrow_the_kv_pool_is_refused_not_cut_short() {
    let dir = model();
    let metrics = Arc::new(Metrics::new());
    let mut e = engine(&dir, 3 * 4096, metrics.clone());
    let capacity = e.kv_tokens();
    assert!(
        capacity < 6 + 50,
        "the budget must be smaller than the request"
    );
    let (tx, mut rx) = unbounded_channel();
    let mut params = SamplingParams::greedy(50);
    params.ignore_eos = true;
    e.add(GenRequest {
        prompt: prompt(6, 4),
        params,
        stop: vec![],
        capture_logits: false,
        events: tx,
    });
    assert!(e.is_idle(), "an impossible request is not queued");
    match rx.try_recv() {
        Ok(Event::Error(msg)) => assert!(msg.contains("KV cache"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
    // What fits runs to its max_tokens and only then says "length".
    let rx = submit(&mut e, prompt(6, 4), capacity - 6);
    e.run_to_completion();
    let (ids, _) = collect(rx);
    assert_eq!(ids.len(), capacity - 6);
    assert_eq!(e.blocks_in_use(), 0);
}

/// The CPU backend behind a switch: fails chosen steps, and (like the CUDA
/// backend) may answer greedy rows with tokens, recording what it was asked.
struct Flaky {
    inner: copyhold_node::cpu::CpuBackend,
    step: usize,
    fail_at: Option<(usize, bool)>,
    device_sampling: bool,
    wants: Arc<std::sync::Mutex<Vec<copyhold_node::engine::backend::RowWant>>>,
}

impl copyhold_node::engine::backend::Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn config(&self) -> &copyhold_node::model::config::ModelConfig {
        self.inner.config()
    }
    fn forward(
        &mut self,
        batch: &copyhold_node::engine::backend::Batch,
    ) -> Result<Vec<Vec<f32>>, copyhold_node::engine::backend::BackendError> {
        self.step += 1;
        if let Some((at, fatal)) = self.fail_at
            && self.step == at
        {
            return Err(copyhold_node::engine::backend::BackendError {
                message: "CUDA_ERROR_OUT_OF_MEMORY (simulated)".into(),
                fatal,
            });
        }
        self.inner.forward(batch)
    }
    fn samples_on_device(&self) -> bool {
        self.device_sampling
    }
    fn forward_rows(
        &mut self,
        batch: &copyhold_node::engine::backend::Batch,
        wants: &[copyhold_node::engine::backend::RowWant],
    ) -> Result<
        Vec<copyhold_node::engine::backend::RowOut>,
        copyhold_node::engine::backend::BackendError,
    > {
        use copyhold_node::engine::backend::{RowOut, RowWant};
        self.wants.lock().unwrap().extend_from_slice(wants);
        let rows = self.forward(batch)?;
        Ok(rows
            .into_iter()
            .zip(wants)
            .map(|(l, w)| match w {
                RowWant::Greedy => RowOut::Token(copyhold_node::engine::sampling::argmax(&l)),
                _ => RowOut::Logits(l),
            })
            .collect())
    }
}

fn flaky_engine(
    dir: &Path,
    fail_at: Option<(usize, bool)>,
    device_sampling: bool,
) -> (Engine, Wants) {
    let model = copyhold_node::model::load(dir).unwrap();
    let text = Arc::new(
        copyhold_node::model::tokenizer::TextModel::load(dir, &model.cfg.eos_token_ids).unwrap(),
    );
    let max_context = model.cfg.max_position_embeddings;
    let wants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let backend = Flaky {
        inner: copyhold_node::cpu::CpuBackend::new(model, 64, 4),
        step: 0,
        fail_at,
        device_sampling,
        wants: wants.clone(),
    };
    let e = Engine::new(
        Box::new(backend),
        text,
        copyhold_node::engine::EngineConfig {
            num_blocks: 64,
            block_size: 4,
            max_batch_tokens: 16,
            max_running: 16,
            max_context,
        },
        Arc::new(Metrics::new()),
        Box::new(ModeledSensor(PowerModel {
            idle_w: 0.0,
            busy_w: 1.0,
        })),
    );
    (e, wants)
}

type Wants = Arc<std::sync::Mutex<Vec<copyhold_node::engine::backend::RowWant>>>;

fn outcome(mut rx: UnboundedReceiver<Event>) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Done { .. } => return Ok(ids),
            Event::Error(e) => return Err(e),
        }
    }
    Err("not finished".into())
}

#[test]
fn a_failed_step_ends_only_its_requests_with_an_error_and_frees_their_blocks() {
    let dir = model();
    let (mut e, _) = flaky_engine(&dir, Some((2, false)), false);
    let a = submit(&mut e, prompt(6, 1), 4);
    e.run_to_completion();
    let err = outcome(a).unwrap_err();
    assert!(err.contains("OUT_OF_MEMORY"), "{err}");
    assert_eq!(e.blocks_in_use(), 0);
    assert!(e.failed().is_none());
    // The engine goes on serving, with the same output as a clean engine.
    let b = submit(&mut e, prompt(6, 1), 4);
    e.run_to_completion();
    let (mut clean, _) = flaky_engine(&dir, None, false);
    let c = submit(&mut clean, prompt(6, 1), 4);
    clean.run_to_completion();
    assert_eq!(outcome(b).unwrap(), outcome(c).unwrap());
}

#[test]
fn a_fatal_device_error_fails_everything_queued_and_refuses_new_requests() {
    let dir = model();
    let (mut e, _) = flaky_engine(&dir, Some((1, true)), false);
    let rxs: Vec<_> = (0..20).map(|i| submit(&mut e, prompt(6, i), 4)).collect();
    e.run_to_completion();
    for rx in rxs {
        assert!(outcome(rx).is_err());
    }
    assert!(e.failed().is_some() && e.is_idle() && e.blocks_in_use() == 0);
    let late = submit(&mut e, prompt(6, 1), 4);
    assert!(outcome(late).unwrap_err().contains("device failed"));
}

#[test]
fn a_device_sampling_backend_is_asked_for_tokens_only_where_the_host_needs_nothing_else() {
    use copyhold_node::engine::backend::RowWant;
    let dir = model();
    let (mut e, wants) = flaky_engine(&dir, None, true);
    let greedy = submit(&mut e, prompt(6, 1), 4);
    let (tx, with_logprobs) = unbounded_channel();
    let mut p = SamplingParams::greedy(2);
    p.logprobs = Some(2);
    p.ignore_eos = true;
    e.add(GenRequest {
        prompt: prompt(5, 2),
        params: p,
        stop: vec![],
        capture_logits: false,
        events: tx,
    });
    let (tx, sampled) = unbounded_channel();
    let p = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: Some(7),
        max_tokens: 2,
        ignore_eos: true,
        ..Default::default()
    };
    e.add(GenRequest {
        prompt: prompt(5, 3),
        params: p,
        stop: vec![],
        capture_logits: false,
        events: tx,
    });
    e.run_to_completion();
    let w = wants.lock().unwrap().clone();
    assert!(w.iter().any(|w| matches!(w, RowWant::Greedy)));
    assert!(w.iter().any(|w| matches!(w, RowWant::Logits)));
    assert!(w.iter().any(|w| matches!(
        w,
        RowWant::Sample { temperature, top_p, uniform, .. }
            if *temperature == 0.8 && *top_p == 0.9 && (0.0..1.0).contains(uniform)
    )));
    // Greedy tokens chosen "on the device" equal the host's choice.
    let (mut cpu, _) = flaky_engine(&dir, None, false);
    let want = submit(&mut cpu, prompt(6, 1), 4);
    cpu.run_to_completion();
    assert_eq!(outcome(greedy).unwrap(), outcome(want).unwrap());
    assert_eq!(outcome(with_logprobs).unwrap().len(), 2);
    assert_eq!(outcome(sampled).unwrap().len(), 2);
}

#[test]
fn with_f16_kv_a_batch_gives_each_sequence_its_solo_tokens() {
    let dir = model();
    let f16_engine = || {
        let opts = EngineOptions {
            kv_bytes: Some(8 << 20),
            block_size: 4,
            max_batch_tokens: 16,
            max_running: 16,
            kv_f16: true,
            max_context: None,
        };
        let sensor = Box::new(ModeledSensor(PowerModel {
            idle_w: 0.0,
            busy_w: 100.0,
        }));
        load_cpu_engine(&dir, &opts, Arc::new(Metrics::new()), sensor)
            .unwrap()
            .0
    };
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(7 + 5 * i, i as u32 + 3)).collect();
    let solo: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut e = f16_engine();
            let rx = submit(&mut e, p.clone(), 8);
            e.run_to_completion();
            collect(rx).0
        })
        .collect();
    let mut e = f16_engine();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&mut e, p.clone(), 8))
        .collect();
    e.run_to_completion();
    for (rx, want) in rxs.into_iter().zip(&solo) {
        assert_eq!(&collect(rx).0, want);
    }
    assert_eq!(e.blocks_in_use(), 0);
}

/// Long prompts take the wide (AMX) kernels and short ones and generated
/// tokens the FMA kernels; since that follows the sequence, never the
/// batch, every sequence's logits are bit for bit its solo logits when
/// prompts on both sides of `WIDE_MIN_PROMPT` run together.
#[test]
fn prompts_on_both_sides_of_the_wide_threshold_get_their_solo_logits_bit_for_bit() {
    use copyhold_node::engine::WIDE_MIN_PROMPT;
    let dir = model();
    let lens = [
        WIDE_MIN_PROMPT + 6,
        9,
        WIDE_MIN_PROMPT - 1,
        WIDE_MIN_PROMPT,
        2 * WIDE_MIN_PROMPT + 3,
    ];
    let run = |e: &mut Engine, p: &[u32]| {
        let (tx, rx) = unbounded_channel();
        let mut params = SamplingParams::greedy(6);
        params.ignore_eos = true;
        e.add(GenRequest {
            prompt: p.to_vec(),
            params,
            stop: vec![],
            capture_logits: true,
            events: tx,
        });
        rx
    };
    let bits = |mut rx: UnboundedReceiver<Event>| {
        let mut out = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            if let Event::Token {
                logits: Some(l), ..
            } = ev
            {
                out.push(l.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
        assert_eq!(out.len(), 6);
        out
    };
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(n, i as u32 + 1))
        .collect();
    let solo: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut e = engine(&dir, 8 << 20, Arc::new(Metrics::new()));
            let rx = run(&mut e, p);
            e.run_to_completion();
            bits(rx)
        })
        .collect();
    let mut e = engine(&dir, 8 << 20, Arc::new(Metrics::new()));
    let rxs: Vec<_> = prompts.iter().map(|p| run(&mut e, p)).collect();
    e.run_to_completion();
    for (i, (rx, want)) in rxs.into_iter().zip(&solo).enumerate() {
        assert!(bits(rx) == *want, "prompt of {} tokens", lens[i]);
    }
    assert_eq!(e.blocks_in_use(), 0);
}
