//! `copyhold bench gateway`: what the gateway adds to a request, side by
//! side in one run with calling the upstream directly and with LiteLLM's
//! proxy in front of the same upstream. A benchmark, not a test: it prints
//! figures.
//!
//! The upstream is the stand-in engine (`copyhold-upstream-standin`, built
//! beside this binary), so the figures are the proxies' own cost. The
//! gateway meters a real member against a real StintQuota on the cluster
//! `KUBECONFIG` names; LiteLLM runs as PEERS.md says, with no database.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

/// What to run.
#[derive(Clone, Debug)]
pub struct GatewayBench {
    /// Concurrency levels to measure.
    pub clients: Vec<usize>,
    /// Seconds per target and concurrency level.
    pub seconds: f64,
    /// Completion tokens per answer.
    pub tokens: i64,
    /// The stand-in's delay per token (0: the proxies' cost alone).
    pub token_delay_ms: u64,
    pub stream: bool,
    /// The `litellm` executable; LiteLLM is skipped when absent.
    pub litellm: Option<PathBuf>,
    pub json: bool,
}

/// Figures for one target at one concurrency.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub target: String,
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub throughput_rps: f64,
    /// p50 minus the direct p50 at the same concurrency.
    pub added_p50_ms: f64,
    pub added_p99_ms: f64,
    /// Throughput relative to direct.
    pub relative_throughput: f64,
    /// The first failure seen, if any.
    pub first_error: Option<String>,
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found beside {} (build it: cargo build -p copyhold-e2e --bin {name})",
            p.display(),
            me.display()
        );
    }
    Ok(p)
}

/// Start a process printing `... listening on ADDR ...`; return it and ADDR.
fn listening(mut cmd: Command) -> Result<(Proc, String)> {
    // COPYHOLD_BENCH_LOGS=1 shows the gateway's and stand-in's logs.
    let logs = std::env::var("COPYHOLD_BENCH_LOGS").is_ok_and(|v| v == "1");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if logs {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let mut r = BufReader::new(out);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .with_context(|| format!("no address in {line:?}"))?
        .to_string();
    std::thread::spawn(move || {
        let mut s = String::new();
        while r.read_line(&mut s).map(|n| n > 0).unwrap_or(false) {
            s.clear();
        }
    });
    Ok((Proc(child), addr))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Closed-loop load: `clients` callers for `seconds`.
async fn load(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    clients: usize,
    seconds: f64,
    body: serde_json::Value,
    stream: bool,
) -> (Vec<f64>, usize, f64, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let body = Arc::new(body.to_string());
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..clients {
        let http = http.clone();
        let url = url.to_string();
        let key = key.to_string();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut first: Option<String> = None;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.as_ref().clone())
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => {
                        let status = r.status();
                        let b = r.bytes().await;
                        let good = status.is_success()
                            && b.as_ref()
                                .is_ok_and(|b| !stream || b.windows(6).any(|w| w == b"[DONE]"));
                        if !good && first.is_none() {
                            let text = b.map(|b| {
                                String::from_utf8_lossy(&b)
                                    .chars()
                                    .take(200)
                                    .collect::<String>()
                            });
                            first = Some(format!("{status}: {}", text.unwrap_or_default()));
                        }
                        good
                    }
                    Err(e) => {
                        if first.is_none() {
                            first = Some(e.to_string());
                        }
                        false
                    }
                };
                if ok {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
            }
            (lat, errors, first)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first = None;
    for t in tasks {
        if let Ok((l, e, f)) = t.await {
            all.extend(l);
            errors += e;
            first = first.or(f);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    (all, errors, elapsed, first)
}

/// Objects the gateway needs: a namespace with a member, a StintQuota, a
/// ModelDeployment and a Ready Pod pointing at the upstream.
async fn setup(client: &Client, ns: &str, upstream: &str) -> Result<String> {
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(ns, &DeleteParams::default()).await;
    for _ in 0..120 {
        if nss.get_opt(ns).await?.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    let key = format!("sk-bench-{}", rand::random::<u64>());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "bench-key",
                               "labels": {crate::gateway::catalog::KEY_LABEL: "true"}},
                  "stringData": {"api-key": key}}))?,
        )
        .await?;
    let sq: crate::resources::StintQuota = serde_json::from_value(json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
        "metadata": {"name": "bench", "namespace": ns},
        "spec": {"members": [{"name": "bench", "apiKeySecret": {"name": "bench-key"}}],
                 "period": {"type": "calendar", "unit": "day"}}
    }))?;
    Api::<crate::resources::StintQuota>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sq)
        .await?;
    let md: crate::resources::ModelDeployment = serde_json::from_value(json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "tiny", "namespace": ns},
        "spec": {"model": {"source": {"hostPath": {"path": "/models/tiny"}}, "format": "safetensors",
                           "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
                 "engine": {"kind": "copyhold"}, "replicas": 1,
                 "placement": {"nodeSelector": {"copyhold.dev/bench": "none"}},
                 "stintQuota": "bench"}
    }))?;
    Api::<crate::resources::ModelDeployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &md)
        .await?;
    // A new namespace's default ServiceAccount (and token) comes a moment
    // later; the stand-in's Pod waits for it.
    super::stand_in::serving_pod(client, ns, "tiny", "tiny-0", upstream).await?;
    Ok(key)
}

pub async fn run(client: Client, b: GatewayBench) -> Result<Vec<Figures>> {
    let ns = "copyhold-bench-gateway";
    let (_up, upstream) = listening({
        let mut c = Command::new(sibling("copyhold-upstream-standin")?);
        c.args([
            "--tokens",
            &b.tokens.to_string(),
            "--token-delay-ms",
            &b.token_delay_ms.to_string(),
        ]);
        c
    })?;
    let key = setup(&client, ns, &upstream).await?;
    let (_gw, gw_addr) = listening({
        let mut c = Command::new(std::env::current_exe()?);
        c.args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--watch-namespace",
            ns,
        ])
        .env("RUST_LOG", "error");
        c
    })?;
    let mut litellm = None;
    if let Some(bin) = &b.litellm {
        let port = free_port()?;
        let dir = std::env::temp_dir().join("copyhold-bench-litellm");
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("config.yaml");
        std::fs::write(
            &cfg,
            format!(
                "model_list:\n  - model_name: tiny\n    litellm_params:\n      model: openai/tiny\n      api_base: http://{upstream}/v1\n      api_key: dummy\ngeneral_settings:\n  master_key: sk-bench-litellm-master\nlitellm_settings:\n  telemetry: false\n"
            ),
        )?;
        let child = Command::new(bin)
            .args(["--config"])
            .arg(&cfg)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--num_workers",
                "1",
            ])
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        litellm = Some((Proc(child), format!("127.0.0.1:{port}")));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()?;
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "How do we share the pasture fairly?"}],
                          "max_tokens": b.tokens});
    if b.stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    // Wait for each target to answer.
    let mut targets = vec![
        (
            "direct".to_string(),
            format!("http://{upstream}/v1/chat/completions"),
            "none".to_string(),
        ),
        (
            "copyhold".to_string(),
            format!("http://{gw_addr}/v1/chat/completions"),
            key.clone(),
        ),
    ];
    if let Some((_, addr)) = &litellm {
        targets.push((
            "litellm".into(),
            format!("http://{addr}/v1/chat/completions"),
            "sk-bench-litellm-master".into(),
        ));
    }
    for (name, url, k) in &targets {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let r = http.post(url).bearer_auth(k).json(&body).send().await;
            if r.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} at {url} did not answer within 90 s");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut out = Vec::new();
    for &c in &b.clients {
        // Warm every connection pool, then measure the targets one after another.
        let mut direct: Option<(f64, f64, f64)> = None;
        for (name, url, k) in &targets {
            let _ = load(&http, url, k, c, 1.0, body.clone(), b.stream).await;
            let (lat, errors, secs, first_error) =
                load(&http, url, k, c, b.seconds, body.clone(), b.stream).await;
            let p50 = percentile(&lat, 0.5);
            let p99 = percentile(&lat, 0.99);
            let rps = lat.len() as f64 / secs;
            let d = *direct.get_or_insert((p50, p99, rps));
            out.push(Figures {
                target: name.clone(),
                clients: c,
                requests: lat.len(),
                errors,
                p50_ms: p50,
                p99_ms: p99,
                throughput_rps: rps,
                added_p50_ms: p50 - d.0,
                added_p99_ms: p99 - d.1,
                relative_throughput: rps / d.2,
                first_error,
            });
        }
    }
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
    Ok(out)
}

/// The figures as a table.
pub fn table(figs: &[Figures], b: &GatewayBench) -> String {
    let mut s = format!(
        "gateway benchmark: stand-in upstream, {} completion tokens at {} ms each, {}, {} s per cell\n",
        b.tokens,
        b.token_delay_ms,
        if b.stream { "streamed" } else { "not streamed" },
        b.seconds
    );
    s.push_str(&format!(
        "{:<9} {:>7} {:>8} {:>6} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8}\n",
        "target",
        "clients",
        "requests",
        "errors",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "req/s",
        "× direct"
    ));
    for f in figs.iter().filter(|f| f.first_error.is_some()) {
        s.push_str(&format!(
            "{} at {} clients, first failure: {}\n",
            f.target,
            f.clients,
            f.first_error.as_deref().unwrap_or_default()
        ));
    }
    for f in figs {
        s.push_str(&format!(
            "{:<9} {:>7} {:>8} {:>6} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>8.0} {:>8.2}\n",
            f.target,
            f.clients,
            f.requests,
            f.errors,
            f.p50_ms,
            f.p99_ms,
            f.added_p50_ms,
            f.added_p99_ms,
            f.throughput_rps,
            f.relative_throughput
        ));
    }
    s
}
