//! The CPU matmuls and attention of one decoder block at the shapes of the
//! issue's 284 M llama (hidden 1024, FFN 2816, 16 heads, 8 KV heads), f16
//! weights: GFLOP/s for a 512-token prefill chunk and GB/s of weights for
//! one decode token. `cargo bench -p copyhold-node --bench matmul`
//! (`RAYON_NUM_THREADS` sets the threads; `-- DIR` benches another
//! synthesized or real model's first block instead).

use std::time::Instant;

use copyhold_node::cpu::matmul::{amx, matmul_wt_many};
use copyhold_node::model::config::{Arch, ModelConfig};
use copyhold_node::model::weights::{DType, Tensor, WeightStore};
use copyhold_node::synth::{SynthSpec, synth};

fn main() {
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let tmp;
    let dir = match arg {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp =
                std::env::temp_dir().join(format!("copyhold-matmul-bench-{}", std::process::id()));
            let mut spec = SynthSpec::tiny(Arch::Llama);
            (spec.hidden, spec.layers, spec.heads, spec.kv_heads) = (1024, 1, 16, 8);
            (spec.intermediate, spec.vocab, spec.dtype) = (2816, 512, DType::F16);
            synth(&spec, &tmp).expect("synthesize a one-block model");
            tmp.clone()
        }
    };
    let store = WeightStore::open(&dir).expect("open the weights");
    let cfg = ModelConfig::load(&dir).expect("read config.json");
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let get = |n: &str, shape: [usize; 2]| -> Tensor {
        store
            .get(&format!("model.layers.0.{n}.weight"), &shape)
            .expect("a block-0 weight")
    };
    let groups: Vec<(&str, Vec<Tensor>)> = vec![
        (
            "qkv",
            vec![
                get("self_attn.q_proj", [q, h]),
                get("self_attn.k_proj", [kv, h]),
                get("self_attn.v_proj", [kv, h]),
            ],
        ),
        ("o", vec![get("self_attn.o_proj", [h, q])]),
        (
            "gate+up",
            vec![get("mlp.gate_proj", [f, h]), get("mlp.up_proj", [f, h])],
        ),
        ("down", vec![get("mlp.down_proj", [h, f])]),
    ];
    println!("threads {}", rayon::current_num_threads());
    for m in [512usize, 1] {
        for (name, ws) in &groups {
            let refs: Vec<&Tensor> = ws.iter().collect();
            let k = ws[0].shape[1];
            let n: usize = ws.iter().map(|w| w.shape[0]).sum();
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.013).sin()).collect();
            let reps = if m == 1 { 200 } else { 5 };
            let _ = matmul_wt_many(&x, m, &refs);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul_wt_many(&x, m, &refs));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
            let gbs = (n * k * ws[0].dtype.size()) as f64 / s / 1e9;
            println!(
                "m {m:4} {name:8} n {n:5} k {k:5}: {:8.3} ms  {gflops:7.1} GFLOP/s  {gbs:6.2} GB/s of weights",
                s * 1e3
            );
            if amx::enabled() {
                let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0; m * w.shape[0]]).collect();
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                amx::product(&x, m, &refs, &mut outs);
                let t = Instant::now();
                for _ in 0..reps {
                    amx::product(&x, m, &refs, &mut outs);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                let fma = matmul_wt_many(&x, m, &refs);
                let diff = fma
                    .iter()
                    .flatten()
                    .zip(ys.iter().flatten())
                    .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                    .fold(0.0f32, f32::max);
                println!(
                    "  amx (prompt rows)               {:8.3} ms  {gflops:7.1} GFLOP/s  max rel diff vs FMA {diff:.2e}",
                    s * 1e3
                );
            }
        }
    }
    if dir.starts_with(std::env::temp_dir()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
