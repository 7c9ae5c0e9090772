//! The server over real HTTP on loopback: the binary is started on port 0
//! with a synthesized model and spoken to with reqwest.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use copyhold_node::model::config::Arch;
use copyhold_node::synth::{SynthSpec, synth};
use futures::StreamExt;
use serde_json::{Value, json};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("copyhold-server-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let mut s = SynthSpec::tiny(Arch::Qwen2);
        s.hidden = 96;
        s.heads = 6;
        s.kv_heads = 2;
        s.vocab = 400;
        s.max_position_embeddings = 160;
        s.seed = 42;
        synth(&s, &d).unwrap();
        d
    })
    .clone()
}

async fn start(extra: &[&str]) -> Server {
    start_model(&model_dir(), extra).await
}

async fn start_model(model: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec!["--kv-cache-mib", "16", "--block-size", "8"];
    args.extend_from_slice(extra);
    start_with(model, &args).await
}

/// The node on port 0 with exactly `args` after the model.
async fn start_with(model: &std::path::Path, args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let base = format!("http://{}", v["listening"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/health")).await
            && r.status() == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server { child, base }
}

/// Names the served model in `body` unless it names one (as OpenAI's API,
/// the node requires `model`).
async fn with_model(base: &str, mut body: Value) -> Value {
    if body.get("model").is_none() {
        let m: Value = reqwest::get(format!("{base}/v1/models"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["model"] = m["data"][0]["id"].clone();
    }
    body
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let body = with_model(base, body).await;
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// Concatenated SSE deltas, the finish reason and the usage chunk.
async fn stream(base: &str, path: &str, body: Value) -> (String, String, Option<Value>) {
    let body = with_model(base, body).await;
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let raw = r.text().await.unwrap();
    let (mut text, mut finish, mut usage) = (String::new(), String::new(), None);
    let mut saw_done = false;
    for line in raw.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            saw_done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
        }
        for c in v["choices"].as_array().unwrap() {
            let piece = c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap_or("");
            text.push_str(piece);
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    assert!(saw_done);
    (text, finish, usage)
}

async fn metric(base: &str, name: &str) -> f64 {
    let body = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn streaming_and_non_streaming_answers_are_byte_identical() {
    let s = start(&[]).await;
    for (path, base_body) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Grüße, wörld ✓"}]}),
        ),
        ("/v1/completions", json!({"prompt": "naïve café ✓"})),
    ] {
        for seed in [1, 2, 3] {
            let mut b = base_body.clone();
            b["max_tokens"] = json!(40);
            b["seed"] = json!(seed);
            b["temperature"] = json!(1.0);
            let (st, full) = post(&s.base, path, b.clone()).await;
            assert_eq!(st, 200, "{full}");
            let c = &full["choices"][0];
            let want = c["message"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .unwrap()
                .to_string();
            b["stream"] = json!(true);
            let (got, finish, _) = stream(&s.base, path, b).await;
            assert_eq!(got.as_bytes(), want.as_bytes(), "{path} seed {seed}");
            assert_eq!(finish, c["finish_reason"].as_str().unwrap());
        }
    }
}

#[tokio::test]
async fn incremental_detokenization_never_splits_a_multibyte_character() {
    let dir = model_dir();
    let text = copyhold_node::model::tokenizer::TextModel::load(&dir, &[1]).unwrap();
    let s = "Grüße ✓ 漢字 🦀!";
    let ids = text.tokenizer.encode(s, false).unwrap().get_ids().to_vec();
    assert!(
        ids.len() > s.chars().count(),
        "multi-byte characters span several tokens"
    );
    let mut d = copyhold_node::model::detok::Detokenizer::default();
    let mut out = String::new();
    for id in ids {
        let piece = d.push(&text, id);
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&d.flush(&text));
    assert_eq!(out, s);
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text_and_another_seed_another() {
    let s = start(&[]).await;
    let body = |seed: u64| json!({"prompt": "once upon", "max_tokens": 24, "temperature": 1.0, "seed": seed});
    let a = post(&s.base, "/v1/completions", body(7)).await.1;
    let b = post(&s.base, "/v1/completions", body(7)).await.1;
    let c = post(&s.base, "/v1/completions", body(8)).await.1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    assert_ne!(a["choices"][0]["text"], c["choices"][0]["text"]);
    let n = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": "once upon", "max_tokens": 8, "n": 3, "seed": 5}),
    )
    .await
    .1;
    assert_eq!(n["choices"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn a_stop_string_cuts_the_text_where_it_first_appears() {
    let s = start(&[]).await;
    let body = json!({"prompt": "the stint", "max_tokens": 40, "temperature": 0});
    let full = post(&s.base, "/v1/completions", body.clone()).await.1;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 8, "{text:?}");
    let stop: String = chars[5..7].iter().collect();
    let cut = &text[..text.find(&stop).unwrap()];
    let mut b = body.clone();
    b["stop"] = json!([stop]);
    let r = post(&s.base, "/v1/completions", b.clone()).await.1;
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), cut);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    b["stream"] = json!(true);
    let (streamed, finish, _) = stream(&s.base, "/v1/completions", b).await;
    assert_eq!((streamed.as_str(), finish.as_str()), (cut, "stop"));
}

#[tokio::test]
async fn thirty_two_concurrent_requests_match_their_solo_outputs_and_free_every_block() {
    let s = start(&["--max-batch-tokens", "64"]).await;
    let bodies: Vec<Value> = (0..32)
        .map(|i| {
            let prompt: String = (0..(3 + (i * 7) % 40)).map(|k| char::from(b'a' + ((i + k) % 26) as u8)).collect();
            json!({"prompt": prompt, "max_tokens": 4 + (i % 5) * 6, "temperature": 0, "ignore_eos": true})
        })
        .collect();
    let mut solo = Vec::new();
    for b in &bodies {
        solo.push(
            post(&s.base, "/v1/completions", b.clone()).await.1["choices"][0]["text"].clone(),
        );
    }
    let base = Arc::new(s.base.clone());
    let together = futures::stream::iter(bodies.clone())
        .map(|b| {
            let base = base.clone();
            async move { post(&base, "/v1/completions", b).await }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await;
    for (i, ((st, r), want)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(*st, 200);
        assert_eq!(&r["choices"][0]["text"], want, "request {i}");
        assert_eq!(r["usage"]["completion_tokens"], bodies[i]["max_tokens"]);
    }
    // Gauges are refreshed at the end of the engine step that answered the
    // last request, which may be just after the client has its answer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s.base, "copyhold_node_kv_blocks_in_use").await != 0.0 {
        assert!(Instant::now() < deadline, "KV blocks still in use");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        metric(&s.base, "copyhold_node_running_sequences").await,
        0.0
    );
}

#[tokio::test]
async fn usage_and_energy_add_up_to_the_metrics() {
    let s = start(&["--power-model", "idle=5,busy=100"]).await;
    let (mut prompt, mut generated, mut joules) = (0.0, 0.0, 0.0);
    for i in 0..4 {
        let (st, r) = post(
            &s.base,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": format!("hi {i}")}], "max_tokens": 10}),
        )
        .await;
        assert_eq!(st, 200);
        let u = &r["usage"];
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
        );
        assert!(u["energy_joules"].as_f64().unwrap() > 0.0);
        prompt += u["prompt_tokens"].as_f64().unwrap();
        generated += u["completion_tokens"].as_f64().unwrap();
        joules += u["energy_joules"].as_f64().unwrap();
    }
    let (_, _, usage) = stream(&s.base, "/v1/completions", json!({"prompt": "abc", "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}})).await;
    let u = usage.expect("a usage chunk");
    prompt += u["prompt_tokens"].as_f64().unwrap();
    generated += u["completion_tokens"].as_f64().unwrap();
    joules += u["energy_joules"].as_f64().unwrap();
    assert_eq!(
        metric(&s.base, "copyhold_node_prompt_tokens_total").await,
        prompt
    );
    assert_eq!(
        metric(&s.base, "copyhold_node_generation_tokens_total").await,
        generated
    );
    let total = metric(&s.base, "copyhold_node_energy_joules_total").await;
    assert!(
        (total - joules).abs() <= 1e-6 * total.max(1.0),
        "metrics {total} vs usage {joules}"
    );
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_400s_naming_the_param() {
    let s = start(&[]).await;
    let client = reqwest::Client::new();
    let raw = |body: &'static [u8]| {
        let c = client.clone();
        let url = format!("{}/v1/chat/completions", s.base);
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, e) = raw(b"{\"messages\": [").await;
    assert_eq!(st, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("JSON"));
    assert_eq!(raw(b"{\"messages\": \"\xff\xfe\"}").await.0, 400);
    let long = "word ".repeat(200);
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "n": 1000}),
            "n",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}),
            "messages",
        ),
        ("/v1/completions", json!({"prompt": long}), "prompt"),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "top_p": 0}),
            "top_p",
        ),
    ];
    for (path, body, param) in cases {
        let (st, e) = post(&s.base, path, body.clone()).await;
        assert_eq!(st, 400, "{body}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert!(e["error"].get("code").is_some());
    }
    // The server still answers normally afterwards.
    let (st, _) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2}),
    )
    .await;
    assert_eq!(st, 200);
}

/// What placement sized is what the node serves: a node started as the
/// operator starts it (context 32 of the model's 160, 2 sequences, no
/// `--kv-cache-mib`) holds 2 × 32 tokens of KV, says so in `/v1/models`,
/// and refuses a longer prompt with `context_length_exceeded`.
#[tokio::test]
async fn a_node_started_with_a_small_context_sizes_its_pool_from_it_and_refuses_longer_prompts() {
    let s = start_with(
        &model_dir(),
        &[
            "--max-model-len",
            "32",
            "--max-running",
            "2",
            "--block-size",
            "8",
        ],
    )
    .await;
    let m: Value = reqwest::get(format!("{}/v1/models", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["max_model_len"], 32, "{m}");
    // 2 sequences × 32 tokens / 8 per block.
    assert_eq!(metric(&s.base, "copyhold_node_kv_blocks_total").await, 8.0);
    let long: Vec<u32> = (1..=40).collect();
    let (st, e) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": long, "max_tokens": 1}),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
    assert_eq!(e["error"]["param"], "prompt", "{e}");
    let short: Vec<u32> = (1..=20).collect();
    let (st, e) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": short, "max_tokens": 20}),
    )
    .await;
    assert_eq!(st, 400, "20 + 20 tokens exceed the context of 32: {e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
    let (st, r) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": short, "max_tokens": 8}),
    )
    .await;
    assert_eq!(st, 200, "{r}");
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let s = start(&["--queue-capacity", "1", "--max-running", "1"]).await;
    let client = reqwest::Client::new();
    let model = with_model(&s.base, json!({})).await["model"].clone();
    let reqs = (0..8).map(|_| {
        let model = model.clone();
        let c = client.clone();
        let url = format!("{}/v1/completions", s.base);
        async move {
            c.post(url)
                .json(
                    &json!({"model": model, "prompt": "x", "max_tokens": 120, "ignore_eos": true}),
                )
                .send()
                .await
                .unwrap()
        }
    });
    let rs = futures::future::join_all(reqs).await;
    let rejected: Vec<_> = rs.iter().filter(|r| r.status() == 503).collect();
    assert!(!rejected.is_empty());
    assert!(rs.iter().any(|r| r.status() == 200));
    assert_eq!(rejected[0].headers()["retry-after"], "1");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let s = start(&[]).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.base))
        .json(
            &with_model(
                &s.base,
                json!({"prompt": "abc", "max_tokens": 150, "ignore_eos": true, "stream": true}),
            )
            .await,
        )
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let _first = body.next().await.unwrap().unwrap();
    drop(body);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cancelled = reqwest::get(format!("{}/metrics", s.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("copyhold_node_requests_total{outcome=\"cancelled\"} 1");
        if cancelled && metric(&s.base, "copyhold_node_kv_blocks_in_use").await == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the sequence was not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn models_health_and_the_power_limit_api_work() {
    let token = std::env::temp_dir().join(format!("copyhold-token-{}", std::process::id()));
    std::fs::write(&token, "s3cret\n").unwrap();
    // Asking for NVML where there is none falls back to the model (and to
    // pacing for limits) instead of failing.
    let s = start(&[
        "--admin-token-file",
        token.to_str().unwrap(),
        "--served-model-name",
        "tiny",
        "--power-sensor",
        "nvml",
    ])
    .await;
    let has_nvml = copyhold_node::power::NvmlSensor::open().is_some();
    let m: Value = reqwest::get(format!("{}/v1/models", s.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "tiny");
    let (st, _) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": "x", "model": "other"}),
    )
    .await;
    assert_eq!(st, 404);
    let c = reqwest::Client::new();
    let url = format!("{}/admin/power-limit", s.base);
    assert_eq!(
        c.post(&url)
            .json(&json!({"watts": 50}))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = c
        .post(&url)
        .bearer_auth("s3cret")
        .json(&json!({"watts": 50}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let g: Value = c.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(g["watts"], 50.0);
    if !has_nvml {
        assert_eq!(g["enforcement"], "pacing");
    }
    assert_eq!(
        metric(&s.base, "copyhold_node_power_limit_watts").await,
        50.0
    );
    let r = c
        .post(&url)
        .bearer_auth("s3cret")
        .json(&json!({"watts": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn device_cuda_without_a_driver_fails_at_start_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .args(["serve", "--port", "0", "--device", "cuda", "--model"])
        .arg(model_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    match copyhold_node::cuda::backend::probe() {
        // This machine has no NVIDIA driver (CI): refused before listening.
        Err(copyhold_node::cuda::CudaError::LibraryMissing { .. }) => {
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(
                err.contains("NVIDIA driver") && err.contains("--device cpu"),
                "{err}"
            );
            assert!(out.stdout.is_empty(), "it must not start listening");
        }
        // A GPU machine: the driver check passes and a missing model is
        // what ends it (the GPU tests in tests/cuda.rs cover serving).
        _ => {
            let out = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
                .args(["serve", "--port", "0", "--device", "cuda", "--model"])
                .arg(model_dir().join("absent"))
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(err.contains("config.json"), "{err}");
        }
    }
}

#[tokio::test]
async fn health_is_503_and_requests_are_503_until_the_model_is_loaded() {
    let state = Arc::new(copyhold_node::api::server::AppState::new(
        "m".into(),
        None,
        Arc::new(copyhold_node::metrics::Metrics::new()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(copyhold_node::api::server::serve(
        listener,
        state,
        copyhold_node::api::server::Shutdown::install().unwrap(),
    ));
    assert_eq!(
        reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .status(),
        503
    );
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
}

#[tokio::test]
async fn a_broken_model_ends_serve_with_a_non_zero_exit_naming_the_file() {
    let d = std::env::temp_dir().join(format!("copyhold-server-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    synth(&SynthSpec::tiny(Arch::Llama), &d).unwrap();
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .args(["serve", "--port", "0", "--model"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[tokio::test]
async fn the_golden_chat_comes_back_over_http_with_the_reference_tokens() {
    let dir = support::fixtures().join("tiny-llama");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let chat = &golden["chat"];
    let ids: Vec<u32> = chat["greedy_continuation_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let text = copyhold_node::model::tokenizer::TextModel::load(&dir, &[1]).unwrap();
    let want = text.decode(&ids);
    let mut child = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .args(["serve", "--port", "0", "--model"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    let s = Server {
        child,
        base: format!("http://{}", v["listening"].as_str().unwrap()),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{}/health", s.base))
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = json!({"messages": chat["messages"], "max_tokens": ids.len(), "temperature": 0, "ignore_eos": true});
    let (st, r) = post(&s.base, "/v1/chat/completions", body).await;
    assert_eq!(st, 200);
    assert_eq!(
        r["choices"][0]["message"]["content"].as_str().unwrap(),
        want
    );
    assert_eq!(
        r["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        chat["token_ids"].as_array().unwrap().len()
    );
    assert_eq!(
        r["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        ids.len()
    );
}

/// A GGUF file (the synthesized model converted to Q8_0 by `copyhold-node
/// gguf`) is served: its tokenizer and chat template come from the GGUF
/// metadata, its weights stay quantized.
#[tokio::test]
async fn a_q8_0_gguf_model_answers_completions_and_chats_over_http() {
    let gguf = std::env::temp_dir().join(format!("copyhold-server-{}.gguf", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_copyhold-node"))
        .args(["gguf", "--type", "q8_0", "--from"])
        .arg(model_dir())
        .arg("--out")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = start_model(&gguf, &[]).await;
    let (status, v) = post(
        &s.base,
        "/v1/completions",
        json!({"prompt": "hello world", "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    let (status, v) = post(
        &s.base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    let _ = std::fs::remove_file(&gguf);
}
