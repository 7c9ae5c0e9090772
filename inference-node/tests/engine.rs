//! The engine on its own: prefix caching, preemption under a tiny KV
//! budget, and power-limit pacing — each checked against a plain run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use copyhold_node::config::Arch;
use copyhold_node::engine::{Engine, EngineOptions, Event, GenRequest, load_cpu_engine};
use copyhold_node::metrics::Metrics;
use copyhold_node::power::{ModeledSensor, PowerModel};
use copyhold_node::sampling::SamplingParams;
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
        kv_bytes,
        block_size: 4,
        max_batch_tokens: 16,
        max_running: 16,
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
fn a_lone_sequence_that_outgrows_the_kv_budget_ends_with_length_instead_of_looping() {
    let dir = model();
    let metrics = Arc::new(Metrics::new());
    let mut e = engine(&dir, 3 * 4096, metrics.clone());
    let capacity = e.config().num_blocks * e.config().block_size;
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
    for _ in 0..200 {
        if e.is_idle() {
            break;
        }
        e.step();
    }
    assert!(e.is_idle(), "the engine kept stepping");
    assert_eq!(e.blocks_in_use(), 0);
    let mut done = None;
    while let Ok(ev) = rx.try_recv() {
        if let Event::Done {
            finish_reason,
            usage,
            ..
        } = ev
        {
            done = Some((finish_reason, usage.completion_tokens));
        }
    }
    let (reason, tokens) = done.expect("finished");
    assert_eq!(reason, copyhold_node::engine::FinishReason::Length);
    // Every slot holds a token; the last one is sampled from the full cache
    // without being stored.
    assert_eq!(tokens, capacity - 6 + 1);
}
