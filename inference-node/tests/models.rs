//! Config variants on synthesized models: the engine (paged KV, chunked
//! prefill, batching) against a plain dense f64 reference written here from
//! the HF modeling code, plus every kind of bad input.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use copyhold_node::engine::sampling::SamplingParams;
use copyhold_node::engine::{EngineOptions, Event, GenRequest};
use copyhold_node::load::load_cpu_engine;
use copyhold_node::metrics::Metrics;
use copyhold_node::model::config::{Arch, ModelConfig};
use copyhold_node::model::weights::{DType, WeightStore};
use copyhold_node::power::{ModeledSensor, PowerModel};
use copyhold_node::synth::{SynthSpec, synth};
use serde_json::json;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("copyhold-models-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// Dense f64 reference forward; returns logits of every position.
fn reference(dir: &Path, tokens: &[u32]) -> Vec<Vec<f64>> {
    let cfg = ModelConfig::load(dir).unwrap();
    let w = WeightStore::open(dir).unwrap();
    let get = |n: &str| -> Vec<f64> {
        let t = w.get(n, &w_shape(&w, n)).unwrap();
        t.to_f32().into_iter().map(f64::from).collect()
    };
    let (h, hd, nh, nkv) = (
        cfg.hidden_size,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
    );
    let n = tokens.len();
    let emb = get("model.embed_tokens.weight");
    let mut x: Vec<Vec<f64>> = tokens
        .iter()
        .map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec())
        .collect();
    let inv = cfg.inv_freq();
    let norm = |v: &[f64], wt: &[f64]| -> Vec<f64> {
        let ms = v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64;
        let r = 1.0 / (ms + cfg.rms_norm_eps).sqrt();
        v.iter().zip(wt).map(|(a, b)| a * r * b).collect()
    };
    let lin = |v: &[f64], wt: &[f64], b: Option<&[f64]>| -> Vec<f64> {
        let inp = v.len();
        (0..wt.len() / inp)
            .map(|o| {
                let s: f64 = (0..inp).map(|i| v[i] * wt[o * inp + i]).sum();
                s + b.map_or(0.0, |b| b[o])
            })
            .collect()
    };
    let rope = |v: &mut [f64], heads: usize, pos: usize| {
        for hh in 0..heads {
            for i in 0..hd / 2 {
                let a = pos as f64 * inv[i];
                let (c, s) = (a.cos(), a.sin());
                let (p, q) = (v[hh * hd + i], v[hh * hd + i + hd / 2]);
                v[hh * hd + i] = p * c - q * s;
                v[hh * hd + i + hd / 2] = q * c + p * s;
            }
        }
    };
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let bias = |n: &str| {
            cfg.qkv_bias
                .then(|| get(&format!("{p}.self_attn.{n}_proj.bias")))
        };
        let (wq, wk, wv, wo) = (
            get(&format!("{p}.self_attn.q_proj.weight")),
            get(&format!("{p}.self_attn.k_proj.weight")),
            get(&format!("{p}.self_attn.v_proj.weight")),
            get(&format!("{p}.self_attn.o_proj.weight")),
        );
        let (bq, bk, bv) = (bias("q"), bias("k"), bias("v"));
        let ln1 = get(&format!("{p}.input_layernorm.weight"));
        let ln2 = get(&format!("{p}.post_attention_layernorm.weight"));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, xi) in x.iter().enumerate() {
            let hn = norm(xi, &ln1);
            let mut q = lin(&hn, &wq, bq.as_deref());
            let mut k = lin(&hn, &wk, bk.as_deref());
            rope(&mut q, nh, pos);
            rope(&mut k, nkv, pos);
            qs.push(q);
            ks.push(k);
            vs.push(lin(&hn, &wv, bv.as_deref()));
        }
        let window = cfg.sliding_window[l];
        for i in 0..n {
            let mut att = vec![0.0; nh * hd];
            for hh in 0..nh {
                let kh = hh / (nh / nkv);
                let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
                let sc: Vec<f64> = (lo..=i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qs[i][hh * hd + d] * ks[j][kh * hd + d])
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (jj, j) in (lo..=i).enumerate() {
                    for d in 0..hd {
                        att[hh * hd + d] += e[jj] / z * vs[j][kh * hd + d];
                    }
                }
            }
            let o = lin(&att, &wo, None);
            for (a, b) in x[i].iter_mut().zip(&o) {
                *a += b;
            }
            let hn = norm(&x[i], &ln2);
            let g = lin(&hn, &get(&format!("{p}.mlp.gate_proj.weight")), None);
            let u = lin(&hn, &get(&format!("{p}.mlp.up_proj.weight")), None);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = lin(&act, &get(&format!("{p}.mlp.down_proj.weight")), None);
            for (a, b) in x[i].iter_mut().zip(&d) {
                *a += b;
            }
        }
    }
    let fnorm = get("model.norm.weight");
    let head = if cfg.tie_word_embeddings {
        emb.clone()
    } else {
        get("lm_head.weight")
    };
    x.iter()
        .map(|xi| lin(&norm(xi, &fnorm), &head, None))
        .collect()
}

fn w_shape(w: &WeightStore, n: &str) -> Vec<usize> {
    // Reference reads whatever shape is stored; the engine is what checks.
    match w.get(n, &[]) {
        Err(copyhold_node::Error::TensorShape { found, .. }) => found,
        Ok(_) => vec![],
        Err(e) => panic!("{e}"),
    }
}

/// Engine logits for the positions that predict `gen` tokens after `prompt`
/// (greedy), with tiny blocks and chunks so paging and chunking are exercised.
fn engine_logits(dir: &Path, prompt: &[u32], n_gen: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let opts = EngineOptions {
        kv_bytes: Some(4 << 20),
        block_size: 4,
        max_batch_tokens: 7,
        max_running: 8,
        kv_f16: false,
        max_context: None,
    };
    let sensor = Box::new(ModeledSensor(PowerModel {
        idle_w: 1.0,
        busy_w: 2.0,
    }));
    let (mut engine, _) = load_cpu_engine(dir, &opts, Arc::new(Metrics::new()), sensor).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut params = SamplingParams::greedy(n_gen);
    params.ignore_eos = true;
    engine.add(GenRequest {
        prompt: prompt.to_vec(),
        params,
        stop: vec![],
        capture_logits: true,
        events: tx,
    });
    engine.run_to_completion();
    assert_eq!(engine.blocks_in_use(), 0);
    let (mut ids, mut logits) = (Vec::new(), Vec::new());
    while let Ok(ev) = rx.try_recv() {
        if let Event::Token {
            id,
            logits: Some(l),
            ..
        } = ev
        {
            ids.push(id);
            logits.push(l);
        }
    }
    (ids, logits)
}

fn assert_matches_reference(dir: &Path) {
    // Longer than `WIDE_MIN_PROMPT`: the prompt takes the wide (AMX) path
    // where the CPU has it.
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 37 + 11) % 290 + 5).collect();
    let (ids, got) = engine_logits(dir, &prompt, 4);
    let mut full = prompt.clone();
    full.extend(&ids[..3]);
    let want = reference(dir, &full);
    let mut max = 0.0f64;
    for (k, g) in got.iter().enumerate() {
        let w = &want[prompt.len() - 1 + k];
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            max = max.max((*a as f64 - b).abs());
        }
    }
    assert!(max < 2e-4, "max logit diff {max} in {}", dir.display());
}

fn synth_dir(name: &str, spec: SynthSpec) -> PathBuf {
    let d = scratch(name);
    synth(&spec, &d).unwrap();
    d
}

#[test]
fn llama_with_gqa_matches_the_reference() {
    let d = synth_dir("llama", SynthSpec::tiny(Arch::Llama));
    assert_matches_reference(&d);
}

#[test]
fn qwen2_with_qkv_bias_and_tied_embeddings_matches_the_reference() {
    let mut s = SynthSpec::tiny(Arch::Qwen2);
    s.tie_word_embeddings = true;
    let d = synth_dir("qwen2", s);
    assert!(!d.join("lm_head.weight").exists());
    assert_matches_reference(&d);
}

#[test]
fn mistral_with_a_sliding_window_shorter_than_the_prompt_matches_the_reference() {
    let mut s = SynthSpec::tiny(Arch::Mistral);
    s.sliding_window = Some(6);
    let d = synth_dir("mistral", s);
    assert_eq!(
        ModelConfig::load(&d).unwrap().sliding_window,
        vec![Some(6), Some(6)]
    );
    assert_matches_reference(&d);
}

#[test]
fn a_given_head_dim_different_from_hidden_over_heads_matches_the_reference() {
    let mut s = SynthSpec::tiny(Arch::Llama);
    s.head_dim = Some(24);
    let d = synth_dir("headdim", s);
    assert_matches_reference(&d);
}

#[test]
fn linear_and_llama3_rope_scaling_match_the_reference() {
    let d = synth_dir("rope", SynthSpec::tiny(Arch::Llama));
    edit_config(&d, |v| {
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0})
    });
    assert_matches_reference(&d);
    edit_config(&d, |v| {
        v["rope_scaling"] = serde_json::Value::Null;
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    });
    let cfg = ModelConfig::load(&d).unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    assert_matches_reference(&d);
}

#[test]
fn f16_and_bf16_weights_match_the_reference_on_their_stored_values() {
    for (name, dt) in [("f16", DType::F16), ("bf16", DType::BF16)] {
        let mut s = SynthSpec::tiny(Arch::Llama);
        s.dtype = dt;
        let d = synth_dir(name, s);
        assert_eq!(WeightStore::open(&d).unwrap().dominant_dtype(), Some(dt));
        assert_matches_reference(&d);
    }
}

#[test]
fn a_sharded_checkpoint_gives_the_same_logits_as_a_single_file() {
    let one = synth_dir("one", SynthSpec::tiny(Arch::Qwen2));
    let mut s = SynthSpec::tiny(Arch::Qwen2);
    s.shards = 3;
    let three = synth_dir("three", s);
    assert!(three.join("model.safetensors.index.json").exists());
    assert!(three.join("model-00003-of-00003.safetensors").exists());
    let prompt = [5, 9, 200, 17, 3, 44];
    assert_eq!(
        engine_logits(&one, &prompt, 3),
        engine_logits(&three, &prompt, 3)
    );
}

fn load_err(dir: &Path) -> String {
    let sensor = Box::new(ModeledSensor(PowerModel {
        idle_w: 1.0,
        busy_w: 2.0,
    }));
    match load_cpu_engine(
        dir,
        &EngineOptions::default(),
        Arc::new(Metrics::new()),
        sensor,
    ) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_safetensors_file_is_named() {
    let d = synth_dir("missing", SynthSpec::tiny(Arch::Llama));
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let d = synth_dir("trunc", SynthSpec::tiny(Arch::Llama));
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let d = synth_dir("shape", SynthSpec::tiny(Arch::Llama));
    edit_config(&d, |v| v["intermediate_size"] = json!(100));
    let e = load_err(&d);
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[100, 64]")
            && e.contains("[128, 64]"),
        "{e}"
    );
}

#[test]
fn a_tensor_of_an_unsupported_dtype_is_named() {
    let d = scratch("dtype");
    synth(&SynthSpec::tiny(Arch::Llama), &d).unwrap();
    let data = vec![0u8; 4 * 64];
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![64], &data).unwrap();
    safetensors::serialize_to_file(
        vec![("model.norm.weight", v)],
        None,
        &d.join("model.safetensors"),
    )
    .unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.norm.weight") && e.contains("I32"), "{e}");
}

#[test]
fn a_missing_tensor_is_named() {
    let d = synth_dir(
        "lmhead",
        SynthSpec {
            tie_word_embeddings: true,
            ..SynthSpec::tiny(Arch::Llama)
        },
    );
    edit_config(&d, |v| v["tie_word_embeddings"] = json!(false));
    let e = load_err(&d);
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}

#[test]
fn an_unsupported_architecture_is_named() {
    let d = synth_dir("arch", SynthSpec::tiny(Arch::Llama));
    edit_config(&d, |v| v["architectures"] = json!(["FalconForCausalLM"]));
    let e = load_err(&d);
    assert!(
        e.contains("FalconForCausalLM") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn a_malformed_tokenizer_is_named() {
    let d = synth_dir("tok", SynthSpec::tiny(Arch::Llama));
    std::fs::write(d.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("tokenizer.json") && e.contains("invalid tokenizer"),
        "{e}"
    );
}

#[test]
fn check_golden_on_a_broken_model_exits_non_zero_with_the_file_named() {
    let d = synth_dir("cli", SynthSpec::tiny(Arch::Llama));
    std::fs::write(d.join("golden.json"), "{\"cases\": []}").unwrap();
    std::fs::write(d.join("model.safetensors"), b"short").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .arg("check-golden")
        .arg(&d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors"), "{err}");
}

/// The bits of `v`, for exact comparisons.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Block 0's `name` projection weight (`mlp.down_proj`, `mlp.gate_proj`…).
fn block0_weight(d: &Path, name: &str, shape: [usize; 2]) -> copyhold_node::model::weights::Tensor {
    WeightStore::open(d)
        .unwrap()
        .get(&format!("model.layers.0.{name}.weight"), &shape)
        .unwrap()
}

/// Prefill-sized products run in row bands, decode-sized ones in weight
/// tiles: every row of a band must come out bit for bit as the same row
/// multiplied alone.
#[test]
fn a_prefill_band_computes_every_row_as_a_lone_row_does() {
    let spec = SynthSpec::tiny(Arch::Llama);
    let d = synth_dir("bands", spec.clone());
    let w = block0_weight(&d, "mlp.down_proj", [spec.hidden, spec.intermediate]);
    let k = spec.intermediate;
    // Well past the band threshold for this machine's thread count.
    let m = 8 * 6 * rayon::current_num_threads() + 5;
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7919) as f32 * 1e-3).sin())
        .collect();
    let all = copyhold_node::cpu::matmul::matmul_wt(&x, m, &w);
    for i in 0..m {
        let one = copyhold_node::cpu::matmul::matmul_wt(&x[i * k..(i + 1) * k], 1, &w);
        let n = spec.hidden;
        assert_eq!(bits(&one), bits(&all[i * n..(i + 1) * n]), "row {i} of {m}");
    }
}

/// Prompt rows on AMX: close to an f64 product for every weight dtype (the
/// bf16 split keeps f32 accuracy), the same bits for a row alone or in any
/// group of rows, and `matmul_wt_rows_into` sends exactly the asked rows
/// there. On a CPU without AMX only the last part applies (all rows FMA).
#[test]
fn prompt_rows_on_amx_are_f32_accurate_and_give_the_same_bits_in_any_grouping() {
    use copyhold_node::cpu::matmul::{amx, matmul_wt, matmul_wt_rows_into};
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let mut spec = SynthSpec::tiny(Arch::Llama);
        // Neither dimension a whole number of tiles.
        (spec.hidden, spec.heads, spec.kv_heads, spec.intermediate) = (104, 4, 2, 150);
        spec.dtype = dtype;
        let d = synth_dir(&format!("amx-{dtype:?}"), spec.clone());
        let w = block0_weight(&d, "mlp.down_proj", [spec.hidden, spec.intermediate]);
        let (n, k, m) = (spec.hidden, spec.intermediate, 37);
        let wf = w.to_f32();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) as f32 * 1e-3).sin() * if i % 5 == 0 { 1e3 } else { 1.0 })
            .collect();
        let wide = [2..9, 20..30];
        let mut y = vec![0.0f32; m * n];
        matmul_wt_rows_into(&x, m, &wide, &[&w], &mut [&mut y]);
        let fma = matmul_wt(&x, m, &w);
        for i in 0..m {
            let row = &y[i * n..(i + 1) * n];
            if !amx::enabled() || !wide.iter().any(|r| r.contains(&i)) {
                assert_eq!(bits(row), bits(&fma[i * n..(i + 1) * n]), "row {i}");
            }
        }
        if !amx::enabled() {
            eprintln!("no AMX on this CPU: only the FMA rows were checked");
            continue;
        }
        let mut all = vec![0.0f32; m * n];
        amx::product(&x, m, &[&w], &mut [&mut all]);
        for i in 0..m {
            for j in 0..n {
                let (exact, scale) = (0..k).fold((0.0f64, 0.0f64), |(s, a), kk| {
                    let p = x[i * k + kk] as f64 * wf[j * k + kk] as f64;
                    (s + p, a + p.abs())
                });
                let got = all[i * n + j] as f64;
                assert!(
                    (got - exact).abs() <= scale * 2f64.powi(-20),
                    "{dtype:?} ({i},{j}): {got} vs {exact} (scale {scale})"
                );
            }
            let mut one = vec![0.0f32; n];
            amx::product(&x[i * k..(i + 1) * k], 1, &[&w], &mut [&mut one]);
            assert_eq!(
                bits(&one),
                bits(&all[i * n..(i + 1) * n]),
                "{dtype:?} row {i} alone"
            );
        }
        // A run starting mid-batch, as a prompt after other sequences' rows.
        for r in wide {
            let rows = &y[r.start * n..r.end * n];
            assert_eq!(
                bits(rows),
                bits(&all[r.start * n..r.end * n]),
                "{dtype:?} run {r:?}"
            );
        }
        // A wider product, then a narrower one on the same threads: the
        // narrower one's padding inputs (104..128) must not see the wider
        // rows' values left in the reused packing buffers. 64 rows: no
        // padding tokens, so every buffer row holds data.
        let g = block0_weight(&d, "mlp.gate_proj", [spec.intermediate, spec.hidden]);
        let (gn, gk, m) = (spec.intermediate, spec.hidden, 64);
        let wx: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).sin() + 2.0).collect();
        amx::product(&wx, m, &[&w], &mut [&mut vec![0.0f32; m * n]]);
        let gx: Vec<f32> = (0..m * gk).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut gy = vec![0.0f32; m * gn];
        amx::product(&gx, m, &[&g], &mut [&mut gy]);
        let gf = g.to_f32();
        for i in 0..m {
            for j in 0..gn {
                let (exact, scale) = (0..gk).fold((0.0f64, 0.0f64), |(s, a), kk| {
                    let p = gx[i * gk + kk] as f64 * gf[j * gk + kk] as f64;
                    (s + p, a + p.abs())
                });
                let got = gy[i * gn + j] as f64;
                assert!(
                    (got - exact).abs() <= scale * 2f64.powi(-20),
                    "{dtype:?} gate ({i},{j}): {got} vs {exact} (scale {scale})"
                );
            }
        }
    }
}
