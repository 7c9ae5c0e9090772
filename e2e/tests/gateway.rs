//! `copyhold gateway` as real processes against the real API server, with
//! real upstreams on loopback: `copyhold-node` serving a fixture model, and
//! the stand-in upstream for timing and failure cases. Serving Pods are
//! written by the test (Ready, with a loopback Pod IP), so no scheduler or
//! kubelet is involved; the gateway finds them by watching, as in a cluster.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use copyhold::resources::stint_quota::{StintQuota, StintQuotaStatus};
use copyhold_e2e::processes::{Listening, spawn_listening};
use copyhold_e2e::{
    ChildGuard, TestNamespace, client, create_secret, eventually, fixtures, install_crds,
    kubectl_ok, workspace_bin,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// `copyhold gateway` on loopback (API and metrics on ports of their own)
/// with `args`.
fn spawn_gateway(args: &[&str]) -> Result<Listening> {
    let mut c = Command::new(workspace_bin("copyhold", "copyhold")?);
    c.args(["gateway", "--listen", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0", "--eject-seconds", "30"])
        .args(args)
        .env("KUBECONFIG", copyhold_e2e::kubeconfig()?)
        .env(
            "RUST_LOG",
            std::env::var("COPYHOLD_TEST_GATEWAY_LOG")
                .unwrap_or_else(|_| "warn,copyhold=info".into()),
        );
    spawn_listening(c)
}

fn standin(args: &[&str]) -> Result<Listening> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_copyhold-upstream-standin"));
    c.args(args);
    spawn_listening(c)
}

/// A namespace with keyed members, a StintQuota `commons` and a
/// ModelDeployment `m` (served as `tiny`) open to it.
struct Scene {
    ns: TestNamespace,
    client: kube::Client,
    keys: BTreeMap<String, String>,
    gateways: Vec<Listening>,
}

impl Scene {
    async fn new(prefix: &str, quota_spec: Value, priorities: &[(&str, &str)]) -> Result<Scene> {
        install_crds().await?;
        let ns = TestNamespace::create(prefix)?;
        let client = client().await?;
        let mut keys = BTreeMap::new();
        let members = quota_spec["members"].as_array().context("members")?.clone();
        for m in &members {
            let name = m["name"].as_str().context("member name")?;
            let key = format!("sk-{name}-{}", ns.name);
            create_secret(&ns.name, &format!("key-{name}"), "api-key", &key)?;
            keys.insert(name.to_string(), key);
        }
        let mut spec = quota_spec.clone();
        for m in spec["members"].as_array_mut().context("members")? {
            let name = m["name"].as_str().unwrap_or_default().to_string();
            m["apiKeySecret"] = json!({"name": format!("key-{name}")});
            if let Some((_, p)) = priorities.iter().find(|(n, _)| *n == name) {
                m["priority"] = json!(p);
            }
        }
        let sq: StintQuota = serde_json::from_value(json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
            "metadata": {"name": "commons", "namespace": ns.name},
            "spec": spec,
        }))?;
        Api::<StintQuota>::namespaced(client.clone(), &ns.name)
            .create(&PostParams::default(), &sq)
            .await?;
        let md = json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": ns.name},
            "spec": {
                "model": {"source": {"hostPath": {"path": "/models/tiny"}}, "format": "safetensors",
                          "servedName": "tiny",
                          "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
                "engine": {"kind": "copyhold"},
                "replicas": 1,
                "placement": {"nodeSelector": {"copyhold.dev/test": "no-such-node"}},
                "serving": {"contextLength": 2048},
                "stintQuota": "commons",
            }
        });
        let path = std::env::temp_dir().join(format!("{}-md.json", ns.name));
        std::fs::write(&path, serde_json::to_vec(&md)?)?;
        kubectl_ok(&["apply", "-f", &path.to_string_lossy()])?;
        let _ = std::fs::remove_file(&path);
        Ok(Scene {
            ns,
            client,
            keys,
            gateways: Vec::new(),
        })
    }

    /// A Ready serving Pod of `m` whose endpoint is `addr` (`127.0.0.1:port`),
    /// owned through a Deployment `name` as the controller's Pods are.
    async fn serving_pod(&self, name: &str, addr: &str) -> Result<()> {
        copyhold_e2e::serving_pod(&self.client, &self.ns.name, "m", name, addr).await?;
        Ok(())
    }

    async fn gateway(&mut self) -> Result<usize> {
        self.gateway_with(&[]).await
    }

    /// A gateway started with more flags (limits under test).
    async fn gateway_with(&mut self, extra: &[&str]) -> Result<usize> {
        let identity = format!("gw{}", self.gateways.len());
        let mut args = vec!["--watch-namespace", &self.ns.name, "--identity", &identity];
        args.extend_from_slice(extra);
        self.gateways.push(spawn_gateway(&args)?);
        Ok(self.gateways.len() - 1)
    }

    /// A Ready Pod labelled as `m`'s but owned by no Deployment of `m`
    /// (made by hand, as anyone allowed to create Pods could).
    async fn stray_pod(&self, name: &str, addr: &str) -> Result<()> {
        let (ip, port) = addr.rsplit_once(':').context("addr")?;
        let port: i32 = port.parse()?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns.name);
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"copyhold.dev/model-deployment": "m"}},
            "spec": {"schedulerName": "copyhold-test-none",
                     "containers": [{"name": "engine", "image": "stand-in",
                                     "ports": [{"name": "http", "containerPort": port}]}]}
        }))?;
        // The namespace's default ServiceAccount comes a moment after it.
        eventually(Duration::from_secs(30), || async {
            pods.create(&PostParams::default(), &pod).await?;
            Ok(())
        })
        .await?;
        let now = jiff::Timestamp::now().to_string();
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}]
            }})),
        )
        .await?;
        Ok(())
    }

    /// The gateway's metrics port, as a base URL.
    fn metrics_url(&self, g: usize) -> Result<String> {
        Ok(format!(
            "http://{}",
            copyhold_e2e::gateway_metrics_addr(&self.gateways[g].line)?
        ))
    }

    /// Start `n` gateways and wait until each serves m1 (one "warm up"
    /// request each: 3 prompt tokens, 1 completion token).
    async fn replicas(&mut self, n: usize) -> Result<(reqwest::Client, Vec<String>)> {
        for _ in 0..n {
            self.gateway().await?;
        }
        let http = reqwest::Client::new();
        let bases: Vec<String> = (0..n).map(|g| self.url(g)).collect();
        for b in &bases {
            let k = self.keys["m1"].clone();
            eventually(Duration::from_secs(20), || async {
                let x = stream_chat(&http, b, &k, "warm up", 1).await?;
                ensure!(x.status == 200, "{}", x.status);
                Ok(())
            })
            .await?;
        }
        Ok((http, bases))
    }

    fn url(&self, g: usize) -> String {
        format!("http://{}", self.gateways[g].addr)
    }

    /// The register with every replica's slices and heartbeat (from
    /// their slice Leases).
    async fn register(&self) -> Result<StintQuotaStatus> {
        Ok(
            copyhold::gateway::slice_leases::register(&self.client, &self.ns.name, "commons")
                .await?,
        )
    }
}

/// What a client saw of one streamed request.
#[derive(Default, Debug, Clone)]
struct Seen {
    status: u16,
    prompt: i64,
    completion: i64,
    joules: f64,
    text: String,
}

async fn stream_chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    content: &str,
    max_tokens: i64,
) -> Result<Seen> {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": content}],
                      "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await?;
    let mut seen = Seen {
        status: r.status().as_u16(),
        ..Default::default()
    };
    if seen.status != 200 {
        return Ok(seen);
    }
    let mut buf = Vec::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
    }
    for line in String::from_utf8(buf)?.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(t) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            seen.text.push_str(t);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            seen.prompt = u["prompt_tokens"].as_i64().unwrap_or(-1);
            seen.completion = u["completion_tokens"].as_i64().unwrap_or(-1);
            seen.joules = u["energy_joules"].as_f64().unwrap_or(0.0);
        }
    }
    if seen.prompt == 0 && seen.completion == 0 {
        bail!("a streamed answer without usage: {seen:?}");
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_client_is_served_and_metered_through_the_gateway() -> Result<()> {
    let mut s = Scene::new(
        "gw-openai",
        json!({"members": [{"name": "ana"}, {"name": "bo"}], "period": {"type": "calendar", "unit": "month", "timeZone": "Europe/Berlin"}}),
        &[],
    )
    .await?;
    // copyhold-node serving the fixture model.
    let node_bin = workspace_bin("copyhold-node", "copyhold-node")?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let model = std::fs::canonicalize(fixtures().join("tiny-llama"))?;
    let _node = ChildGuard(
        Command::new(node_bin)
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--served-model-name",
                "tiny",
                "--model",
            ])
            .arg(&model)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), || async {
        http.get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    })
    .await?;
    s.serving_pod("node-0", &format!("127.0.0.1:{port}"))
        .await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    // The Pod is seen by watch a moment after the gateway starts.
    eventually(Duration::from_secs(20), || async {
        let r = http
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&s.keys["bo"])
            .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "warm"}], "max_tokens": 1}))
            .send()
            .await?;
        ensure!(r.status() == 200, "status {}", r.status());
        Ok(())
    })
    .await?;

    let out = Command::new(copyhold_e2e::openai_python()?)
        .arg(copyhold_e2e::workspace_root().join("e2e/tests/python/gateway_client.py"))
        .args([&base, &s.keys["ana"]])
        .output()?;
    ensure!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["models"], json!(["tiny"]));
    let calls = v["calls"].as_array().context("calls")?;
    for c in calls {
        assert!(!c["text"].as_str().unwrap_or_default().is_empty(), "{c}");
    }
    // Streamed and not, the same greedy text.
    assert_eq!(calls[0]["text"], calls[1]["text"]);
    assert_eq!(calls[1]["text"], calls[2]["text"]);
    assert_eq!(calls[0]["usage"], calls[1]["usage"]);
    assert_eq!(
        calls[2]["saw_usage"],
        json!(false),
        "usage is shown only when asked for"
    );
    // The register: exactly the usage the upstream reported, including the
    // stream whose client did not ask to see it (greedy: the same as call 1).
    let mut want = (0i64, 0i64);
    for u in [
        &calls[0]["usage"],
        &calls[1]["usage"],
        &calls[1]["usage"],
        &calls[3]["usage"],
    ] {
        want.0 += u[0].as_i64().context("usage")?;
        want.1 += u[1].as_i64().context("usage")?;
    }
    let reg = eventually(Duration::from_secs(10), || async {
        let st = s.register().await?;
        let ana = st
            .members
            .iter()
            .find(|m| m.name == "ana")
            .context("ana")?
            .clone();
        ensure!(ana.requests == 4, "requests {}", ana.requests);
        Ok(ana)
    })
    .await?;
    assert_eq!((reg.prompt_tokens, reg.completion_tokens), want);
    assert_eq!(reg.tokens, want.0 + want.1);
    assert!(
        reg.energy_wh > 0.0,
        "the node's energy_joules reach the register"
    );
    let table = kubectl_ok(&["-n", &s.ns.name, "get", "sq", "commons"])?;
    assert!(table.contains("calendar month (Europe/Berlin)"), "{table}");
    Ok(())
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    body: Value,
) -> Result<(u16, reqwest::header::HeaderMap, Value)> {
    let mut r = http.post(format!("{base}/v1/chat/completions"));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, headers, v))
}

fn chat(content: &str, max_tokens: i64) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_openai_errors_and_never_reach_an_upstream() -> Result<()> {
    let mut s = Scene::new(
        "gw-errors",
        json!({"members": [{"name": "ana", "stint": {"tokens": 400}}, {"name": "bo"}, {"name": "cy"}],
               "period": {"type": "calendar", "unit": "day"},
               "sanctions": {"warnAt": 50, "throttleAt": 100, "suspendAt": 100}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "10"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let bo = s.keys["bo"].clone();
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&bo), chat("hi", 5)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;

    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_string();
    // Keys.
    let (st, _, v) = call(&http, &base, None, chat("hi", 5)).await?;
    assert_eq!((st, code(&v).as_str()), (401, "invalid_api_key"));
    let (st, _, v) = call(&http, &base, Some("sk-wrong"), chat("hi", 5)).await?;
    assert_eq!((st, code(&v).as_str()), (401, "invalid_api_key"));
    // Models.
    let (st, _, v) = call(
        &http,
        &base,
        Some(&bo),
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await?;
    assert_eq!((st, code(&v).as_str()), (404, "model_not_found"));
    // What cannot be metered.
    for body in [
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}),
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4096}),
        json!({"model": "tiny"}),
    ] {
        let (st, _, v) = call(&http, &base, Some(&bo), body.clone()).await?;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&bo)
        .body("{\"model\": \"tiny\", \"messages\": [")
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 400);
    let big = "x".repeat(5 << 20);
    let (st, _, v) = call(&http, &base, Some(&bo), chat(&big, 5)).await?;
    assert_eq!((st, code(&v).as_str()), (413, "request_too_large"), "{v}");
    // None of those reached the register.
    let st = s.register().await?;
    let bo_line = st.members.iter().find(|m| m.name == "bo").context("bo")?;
    assert!(
        bo_line.requests <= 1,
        "refused requests are not charged: {bo_line:?}"
    );

    // A stint runs out: warned, then 429 with Retry-After until the reset.
    let ana = s.keys["ana"].clone();
    let mut warned = false;
    let mut refused = None;
    for _ in 0..40 {
        let (st, h, v) = call(&http, &base, Some(&ana), chat("one two three", 10)).await?;
        if st == 200 {
            warned |= h.contains_key("x-copyhold-stint-remaining");
            continue;
        }
        refused = Some((st, h, v));
        break;
    }
    let (st, h, v) = refused.context("the stint never ran out")?;
    assert_eq!((st, code(&v).as_str()), (429, "stint_exhausted"), "{v}");
    let retry: i64 = h["retry-after"].to_str()?.parse()?;
    assert!(retry > 0 && retry <= 86_400);
    assert!(warned, "x-copyhold-stint-remaining was sent past warnAt");
    let reg = eventually(Duration::from_secs(10), || async {
        let st = s.register().await?;
        let a = st
            .members
            .iter()
            .find(|m| m.name == "ana")
            .context("ana")?
            .clone();
        ensure!(
            st.slices
                .iter()
                .all(|x| x.member != "ana" || x.tokens < 400),
            "slices settle"
        );
        Ok(a)
    })
    .await?;
    assert!(reg.tokens >= 400 - 100, "used most of the stint: {reg:?}");
    // Overshoot is under one reservation (prompt bound + max_tokens).
    assert!(reg.tokens < 400 + 100, "overshoot bounded: {reg:?}");

    // One member's errors do not degrade the others.
    let (st, _, _) = call(&http, &base, Some(&bo), chat("still fine", 5)).await?;
    assert_eq!(st, 200);

    // Failing upstreams: a dead replica is skipped (retried before the
    // first byte), a 500 becomes a 502, usage-less answers are charged the
    // full reservation.
    // A port bound but never listened on refuses every connection, and no
    // other process of the suite can take it while the socket is held.
    let dead = tokio::net::TcpSocket::new_v4()?;
    dead.bind("127.0.0.1:0".parse()?)?;
    let dead_port = dead.local_addr()?.port();
    s.serving_pod("up-dead", &format!("127.0.0.1:{dead_port}"))
        .await?;
    // The gateway learns of the new Pod through its watch, which takes a
    // moment longer on a loaded machine: send until a request has met the
    // dead replica. Every one of them must still succeed.
    let connect_errors = "copyhold_gateway_upstream_errors_total{model=\"tiny\",kind=\"connect\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let (st, _, v) = call(&http, &base, Some(&bo), chat(&format!("retry me {i}"), 5)).await?;
        assert_eq!(st, 200, "request {i} met the dead replica: {v}");
        i += 1;
        let metrics = http
            .get(format!("{}/metrics", s.metrics_url(g)?))
            .send()
            .await?
            .text()
            .await?;
        if metrics.contains(connect_errors) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request met the dead replica in {i} tries: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut s2 = Scene::new(
        "gw-errors2",
        json!({"members": [{"name": "cy"}], "period": {"type": "calendar", "unit": "day"},
               "ledger": {"defaultMaxTokens": 50}}),
        &[],
    )
    .await?;
    let failing = standin(&["--fail-status", "500"])?;
    s2.serving_pod("up-500", &failing.addr).await?;
    let g2 = s2.gateway().await?;
    let base2 = s2.url(g2);
    let cy = s2.keys["cy"].clone();
    let (st, _, v) = eventually(Duration::from_secs(20), || async {
        let r = call(&http, &base2, Some(&cy), chat("x", 5)).await?;
        ensure!(r.0 != 503, "not ready yet");
        Ok(r)
    })
    .await?;
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (502, Some("upstream_error")),
        "{v}"
    );
    // No replica at all: 503.
    Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(s2.client.clone(), &s2.ns.name)
        .delete("up-500", &Default::default())
        .await?;
    let (st, h, _) = eventually(Duration::from_secs(20), || async {
        let r = call(&http, &base2, Some(&cy), chat("x", 5)).await?;
        ensure!(r.0 == 503, "still {}", r.0);
        Ok(r)
    })
    .await?;
    assert_eq!(st, 503);
    assert!(h.contains_key("retry-after"));
    // Usage-less upstream: charged the full reservation (prompt bound + defaultMaxTokens).
    let quiet = standin(&["--omit-usage", "--tokens", "3"])?;
    s2.serving_pod("up-quiet", &quiet.addr).await?;
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(
            &http,
            &base2,
            Some(&cy),
            json!({"model": "tiny", "messages": [{"role": "user", "content": "abc"}]}),
        )
        .await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    let line = eventually(Duration::from_secs(10), || async {
        let st = s2.register().await?;
        let l = st
            .members
            .iter()
            .find(|m| m.name == "cy")
            .context("cy")?
            .clone();
        ensure!(l.requests == 1, "{l:?}");
        Ok(l)
    })
    .await?;
    // "user" + "abc" = 7 bytes, + 64 + 8 template tokens, + 50 completion.
    assert_eq!(line.tokens, 7 + 64 + 8 + 50, "{line:?}");
    drop((up, dead));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_keys_and_deferring_budgets_take_effect_within_seconds() -> Result<()> {
    let mut s = Scene::new(
        "gw-keys",
        json!({"members": [{"name": "ana"}, {"name": "bo"}], "period": {"type": "calendar", "unit": "day"}}),
        &[("bo", "deferrable")],
    )
    .await?;
    let up = standin(&["--tokens", "4"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let old = s.keys["ana"].clone();
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&old), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    // Rotate ana's key.
    put_key(&s, "ana", "sk-rotated")?;
    eventually(Duration::from_secs(10), || async {
        let (a, _, _) = call(&http, &base, Some("sk-rotated"), chat("hi", 2)).await?;
        let (b, _, _) = call(&http, &base, Some(&old), chat("hi", 2)).await?;
        ensure!(a == 200 && b == 401, "new {a}, old {b}");
        Ok(())
    })
    .await?;

    // An EnergyBudget covering the model defers: deferrable bo waits,
    // standard ana does not.
    let eb_name = format!("{}-eb", s.ns.name);
    let eb = json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "EnergyBudget",
        "metadata": {"name": eb_name},
        "spec": {"nodeSelector": {"copyhold.dev/test": eb_name}, "ceilingWatts": 1000, "marginPercent": 10,
                 "supply": {"static": {"watts": 1000}}}
    });
    let p = std::env::temp_dir().join(format!("{eb_name}.json"));
    std::fs::write(&p, eb.to_string())?;
    kubectl_ok(&["apply", "-f", &p.to_string_lossy()])?;
    let ebs: Api<copyhold::resources::EnergyBudget> = Api::all(s.client.clone());
    let key = format!("{}/m", s.ns.name);
    let bo = s.keys["bo"].clone();
    let result = eventually(Duration::from_secs(15), || async {
        let now = jiff::Timestamp::now().to_string();
        ebs.patch_status(
            &eb_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"covered": [key], "retryAfterSeconds": 1234, "step": 3,
                "conditions": [{"type": "Deferring", "status": "True", "reason": "SupplyLow", "message": "test", "lastTransitionTime": now}]}})),
        )
        .await?;
        let (st, h, v) = call(&http, &base, Some(&bo), chat("hi", 2)).await?;
        ensure!(st == 503, "bo got {st}");
        ensure!(v["error"]["code"] == "deferred_by_energy_budget", "{v}");
        ensure!(h.get("retry-after").and_then(|x| x.to_str().ok()) == Some("1234"), "{h:?}");
        let (a, _, _) = call(&http, &base, Some("sk-rotated"), chat("hi", 2)).await?;
        ensure!(a == 200, "ana got {a}");
        Ok(())
    })
    .await;
    let _ = kubectl_ok(&["delete", "energybudget", &eb_name, "--wait=false"]);
    result?;
    Ok(())
}

/// Sum of what clients saw, per member: (prompt, completion, joules, requests).
type Totals = BTreeMap<String, (i64, i64, f64, i64)>;

async fn load(
    http: reqwest::Client,
    bases: Arc<Vec<String>>,
    keys: Arc<Vec<(String, String)>>,
    clients: usize,
    rounds: usize,
) -> Totals {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = http.clone();
        let bases = bases.clone();
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: Vec<(String, Seen)> = Vec::new();
            for r in 0..rounds {
                let (member, key) = &keys[(c + r) % keys.len()];
                let base = &bases[(c + r) % bases.len()];
                let content = format!("client {c} round {r} asks something shared");
                if let Ok(x) = stream_chat(&http, base, key, &content, 12).await
                    && x.status == 200
                {
                    seen.push((member.clone(), x));
                }
            }
            seen
        }));
    }
    let mut totals = Totals::new();
    for t in tasks {
        for (m, x) in t.await.unwrap_or_default() {
            let e = totals.entry(m).or_default();
            e.0 += x.prompt;
            e.1 += x.completion;
            e.2 += x.joules;
            e.3 += 1;
        }
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stint_ledger_exact_under_concurrency() -> Result<()> {
    let mut s = Scene::new(
        "gw-ledger",
        json!({"members": [{"name": "m1"}, {"name": "m2"}, {"name": "m3"}, {"name": "m4"},
                           {"name": "m5", "stint": {"tokens": 500}}],
               "period": {"type": "calendar", "unit": "day"},
               "sanctions": {"throttleAt": 100, "suspendAt": 100},
               "ledger": {"sliceTokens": 300}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "12", "--token-delay-ms", "3"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let up2 = standin(&["--tokens", "12", "--token-delay-ms", "3"])?;
    s.serving_pod("up-1", &up2.addr).await?;
    let (http, bases) = s.replicas(3).await?;
    let keys: Vec<(String, String)> = s.keys.iter().map(|(m, k)| (m.clone(), k.clone())).collect();
    let mut totals = load(http.clone(), Arc::new(bases.clone()), Arc::new(keys), 64, 4).await;
    // The three warm-up requests ("warm up": 3 prompt tokens, 1 completion).
    totals.entry("m1".into()).or_default().3 += 3;

    // Let every replica write what it settled.
    let reg = eventually(Duration::from_secs(20), || async {
        let st = s.register().await?;
        let requests: i64 = st.members.iter().map(|m| m.requests).sum();
        let want: i64 = totals.values().map(|t| t.3).sum();
        ensure!(
            requests == want,
            "register has {requests} requests, clients saw {want}"
        );
        Ok(st)
    })
    .await?;
    let mut checked = 0;
    for line in &reg.members {
        let Some(t) = totals.get(&line.name) else {
            continue;
        };
        let warm = if line.name == "m1" { (9, 3) } else { (0, 0) };
        assert_eq!(
            line.prompt_tokens,
            t.0 + warm.0,
            "{}: prompt tokens",
            line.name
        );
        assert_eq!(
            line.completion_tokens,
            t.1 + warm.1,
            "{}: completion tokens",
            line.name
        );
        assert_eq!(line.tokens, line.prompt_tokens + line.completion_tokens);
        assert_eq!(line.reclaimed_tokens, 0);
        checked += 1;
    }
    assert_eq!(checked, 5);
    // m5's stint ran out; the overshoot is under one reservation (prompt
    // bound + max_tokens) per replica.
    let m5 = reg.members.iter().find(|m| m.name == "m5").context("m5")?;
    let bound_one =
        ("user".len() + "client 63 round 3 asks something shared".len()) as i64 + 64 + 8 + 12;
    // m5 was asked for far more than its stint (about 51 requests of 20
    // tokens) and refused once what was left could not cover a request: a
    // request is admitted only against what its replica holds, so it ends
    // within one reservation per replica of the stint, on either side.
    let attempted = (0..64usize)
        .flat_map(|c| (0..4usize).map(move |r| (c + r) % 5))
        .filter(|m| *m == 4)
        .count() as i64;
    let served = totals.get("m5").map(|t| t.3).unwrap_or(0);
    assert!(
        served < attempted,
        "m5 was never refused: {served} of {attempted}"
    );
    assert!(
        m5.tokens >= 500 - 3 * bound_one,
        "m5 refused too early: {m5:?}"
    );
    assert!(
        m5.tokens <= 500 + 3 * bound_one,
        "overshoot {} > 3 × {bound_one}",
        m5.tokens - 500
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stint_ledger_survives_gateway_kill() -> Result<()> {
    let mut s = Scene::new(
        "gw-kill",
        json!({"members": [{"name": "m1"}, {"name": "m2"}, {"name": "m3"}],
               "period": {"type": "calendar", "unit": "day"},
               "ledger": {"sliceTokens": 500, "replicaTtlSeconds": 6}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "30", "--token-delay-ms", "40"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let (http, bases) = s.replicas(3).await?;
    let victim = s.gateways[0]
        .line
        .split_whitespace()
        .last()
        .context("identity")?
        .to_string();
    let keys: Vec<(String, String)> = s.keys.iter().map(|(m, k)| (m.clone(), k.clone())).collect();
    let run = tokio::spawn(load(
        http.clone(),
        Arc::new(bases.clone()),
        Arc::new(keys),
        24,
        3,
    ));
    // Mid-stream: every client is inside a 1.2 s stream.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.gateways[0].guard.0.kill()?;
    let _ = s.gateways[0].guard.0.wait();
    // Its slices as it left them (the register cannot change them now).
    let at_kill = s.register().await?;
    let mut slice: BTreeMap<String, i64> = BTreeMap::new();
    for x in at_kill.slices.iter().filter(|x| x.replica == victim) {
        *slice.entry(x.member.clone()).or_default() += x.tokens;
    }
    let mut totals = run.await?;
    totals.entry("m1".into()).or_default().3 += 3;
    let reg = eventually(Duration::from_secs(30), || async {
        let st = s.register().await?;
        ensure!(
            !st.gateways.iter().any(|g| g.name == victim),
            "the dead replica is still listed"
        );
        ensure!(
            !st.slices.iter().any(|x| x.replica == victim),
            "its slices are not yet charged"
        );
        Ok(st)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reg = {
        let _ = reg;
        s.register().await?
    };
    let warm_tokens = 3 * (3 + 1); // three "warm up" requests: 3 prompt tokens and 1 completion each
    for line in &reg.members {
        let t = totals.get(&line.name).cloned().unwrap_or_default();
        let returned = t.0 + t.1 + if line.name == "m1" { warm_tokens } else { 0 };
        let held = slice.get(&line.name).copied().unwrap_or(0);
        assert!(
            line.tokens >= returned,
            "{}: register {} below returned {returned}",
            line.name,
            line.tokens
        );
        assert!(
            line.tokens <= returned + held,
            "{}: register {} over returned {returned} by more than the dead slice {held}",
            line.name,
            line.tokens
        );
        assert!(line.reclaimed_tokens <= held, "{line:?}");
    }
    Ok(())
}

/// The line of `member` in the scene's register, once it shows `requests`.
async fn line_after(
    s: &Scene,
    member: &str,
    requests: i64,
) -> Result<copyhold::resources::stint_quota::MemberUsage> {
    eventually(Duration::from_secs(15), || async {
        let st = s.register().await?;
        let l = st
            .members
            .iter()
            .find(|m| m.name == member)
            .context("member")?
            .clone();
        ensure!(l.requests >= requests, "{l:?}");
        Ok(l)
    })
    .await
}

/// Issue 18, item 5: a request future dropped while its replica writes the
/// register (a client leaving while its lease is written) neither loses
/// the settlements that write carried nor applies them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_dropped_while_the_register_is_written_counts_every_settlement_once() -> Result<()>
{
    use copyhold::commons::ledger::{Reservation, Usage};
    use copyhold::gateway::ledger_sync::{Admission, Ledgers};
    use copyhold::gateway::metrics::GatewayMetrics;
    let s = Scene::new(
        "gw-cancel",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"},
               "ledger": {"sliceTokens": 10}}),
        &[],
    )
    .await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(GatewayMetrics::register(&mut registry));
    let ledgers = Ledgers::new(s.client.clone(), "canceller".into(), metrics);
    let ledger = ledgers.get(&s.ns.name, "commons");
    let small = Reservation {
        tokens: 5,
        energy_wh: 0.0,
    };
    let used = Usage {
        prompt_tokens: 2,
        completion_tokens: 3,
        tokens: 5,
        energy_wh: 0.0,
        requests: 1,
    };
    // How long one lease write takes here, to cut the next ones inside it.
    let t0 = std::time::Instant::now();
    let probe = Reservation {
        tokens: 50_000,
        energy_wh: 0.0,
    };
    ensure!(matches!(
        ledger.reserve("ana", probe).await?,
        Admission::Admitted
    ));
    ledger.settle("ana", probe, &Usage::default());
    let write = t0.elapsed();
    let rounds: i64 = 150;
    let mut cancelled = 0;
    for i in 0..rounds {
        let a = ledger.reserve("ana", small).await?;
        ensure!(matches!(a, Admission::Admitted), "{a:?}");
        ledger.settle("ana", small, &used);
        // A request too large for the slice leases more: its write carries
        // the settlement above. Drop it at a different point of the write
        // each round (spread over 0.3 to 1.5 times its usual length).
        let big = Reservation {
            tokens: 100_000 * (i + 1),
            energy_wh: 0.0,
        };
        let spread = ((i * 7919) % 1000) as f64 / 1000.0;
        let cut = write.mul_f64(0.3 + 1.2 * spread);
        match tokio::time::timeout(cut, ledger.reserve("ana", big)).await {
            Ok(r) => {
                ensure!(matches!(r?, Admission::Admitted));
                ledger.settle("ana", big, &Usage::default());
            }
            Err(_) => cancelled += 1,
        }
    }
    println!("one write {write:?}; {cancelled} of {rounds} lease writes cut short");
    let line = line_after(&s, "ana", rounds).await?;
    // Whatever is still pending would show within two flushes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let line = {
        let _ = line;
        line_after(&s, "ana", rounds).await?
    };
    assert_eq!(
        (line.requests, line.tokens),
        (rounds, 5 * rounds),
        "every settlement counted exactly once: {line:?}"
    );
    Ok(())
}

/// Issue 18, item 5: a client that leaves before the upstream's headers
/// frees its replica's load, so a throttled `onlyWhenIdle` member is
/// served again once the model is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_before_the_headers_frees_its_replica_for_idle_only_members()
-> Result<()> {
    let mut s = Scene::new(
        "gw-leave",
        json!({"members": [{"name": "ana", "stint": {"tokens": 1000}}, {"name": "bo"}],
               "period": {"type": "calendar", "unit": "day"},
               "sanctions": {"warnAt": 1, "throttleAt": 1, "suspendAt": 1000,
                             "throttle": {"requestsPerMinute": 1000, "onlyWhenIdle": true}}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "5", "--header-delay-ms", "1000"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    // One request puts ana past throttleAt (1 % of 1000 tokens).
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hello there", 5)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    eventually(Duration::from_secs(10), || async {
        let (st, h, v) = call(&http, &base, Some(&ana), chat("again", 5)).await?;
        ensure!(
            st == 200
                && h.get("x-copyhold-stint-state")
                    .is_some_and(|x| x == "throttled"),
            "{st} {h:?} {v}"
        );
        Ok(())
    })
    .await?;
    // bo gives up before the upstream's headers arrive, three times.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()?;
    for _ in 0..3 {
        let r = call(&impatient, &base, Some(&s.keys["bo"]), chat("slow", 5)).await;
        ensure!(r.is_err(), "bo was meant to leave early: {r:?}");
    }
    // The upstream has long answered; the model is idle.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (st, _, v) = call(&http, &base, Some(&ana), chat("idle now?", 5)).await?;
    assert_eq!(st, 200, "an idle model serves the throttled member: {v}");
    Ok(())
}

/// Read a stream until its usage chunk, then leave; returns that usage.
async fn leave_after_usage(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    max_tokens: i64,
) -> Result<(i64, i64)> {
    let r = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "tiny", "messages": [{"role": "user", "content": "count for me"}],
                      "max_tokens": max_tokens, "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await?;
    ensure!(r.status() == 200, "{}", r.status());
    let mut body = r.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        let text = String::from_utf8_lossy(&buf).to_string();
        for line in text.lines() {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                // Dropping the body closes the connection: the client left.
                return Ok((
                    u["prompt_tokens"].as_i64().context("prompt")?,
                    u["completion_tokens"].as_i64().context("completion")?,
                ));
            }
        }
    }
    bail!("the stream ended without usage")
}

/// Issue 18, item 6: a client that leaves after the final usage chunk (but
/// before `[DONE]`) is charged the usage it saw, not the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_after_the_usage_chunk_is_charged_that_usage() -> Result<()> {
    let mut s = Scene::new(
        "gw-usage-leave",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "4", "--done-delay-ms", "3000"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    let seen = eventually(Duration::from_secs(20), || async {
        leave_after_usage(&http, &base, &ana, 200).await
    })
    .await?;
    let line = line_after(&s, "ana", 1).await?;
    // Give a wrong charge time to arrive.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let line = {
        let _ = line;
        line_after(&s, "ana", 1).await?
    };
    assert_eq!(
        (line.requests, line.prompt_tokens, line.completion_tokens),
        (1, seen.0, seen.1),
        "charged what the client saw: {line:?}"
    );
    Ok(())
}

/// Issue 18, item 9: an upstream that answers 5xx after streaming its
/// tokens is charged what it streamed (its usage), and one that cuts the
/// stream is charged the reservation; never zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_fails_after_streaming_is_charged_never_zero() -> Result<()> {
    let mut s = Scene::new(
        "gw-fail-late",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "6", "--stream-status", "500"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    let status = eventually(Duration::from_secs(20), || async {
        let x = stream_chat(&http, &base, &ana, "one two three", 50).await?;
        ensure!(x.status != 503, "no replica yet");
        Ok(x.status)
    })
    .await?;
    assert_eq!(status, 502, "the engine's 5xx is a 502");
    let line = line_after(&s, "ana", 1).await?;
    // "one two three" is 3 words + 1 per message; 6 completion tokens.
    assert_eq!(
        (line.prompt_tokens, line.completion_tokens),
        (4, 6),
        "charged the usage it streamed: {line:?}"
    );

    let mut s2 = Scene::new(
        "gw-cut-late",
        json!({"members": [{"name": "bo"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let cut = standin(&[
        "--tokens",
        "6",
        "--cut-after-tokens",
        "3",
        "--token-delay-ms",
        "50",
    ])?;
    s2.serving_pod("up-0", &cut.addr).await?;
    let g2 = s2.gateway().await?;
    let base2 = s2.url(g2);
    let bo = s2.keys["bo"].clone();
    eventually(Duration::from_secs(20), || async {
        let r = http
            .post(format!("{base2}/v1/chat/completions"))
            .bearer_auth(&bo)
            .json(
                &json!({"model": "tiny", "messages": [{"role": "user", "content": "abc"}],
                          "max_tokens": 50, "stream": true}),
            )
            .send()
            .await?;
        ensure!(r.status() == 200, "{}", r.status());
        // The body breaks off after three tokens.
        let _ = r.bytes().await;
        Ok(())
    })
    .await?;
    let line = line_after(&s2, "bo", 1).await?;
    // The reservation: "user" + "abc" = 7 bytes, + 64 + 8, + 50 completion.
    assert_eq!(line.tokens, 7 + 64 + 8 + 50, "{line:?}");
    Ok(())
}

/// Send raw bytes on a fresh connection; returns what came back within
/// `wait` (the head and whatever body arrived).
async fn raw(addr: &str, request: &[u8], wait: Duration) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(request).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&out).contains("\"error\"") {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    Ok(String::from_utf8_lossy(&out).to_string())
}

/// Issue 18, front door: wrong methods and unknown paths get OpenAI-shaped
/// JSON, unknown message roles are refused before any upstream, and a
/// request without a valid key is answered before its body is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_front_door_answers_openai_json_and_checks_the_key_before_the_body() -> Result<()> {
    let mut s = Scene::new(
        "gw-door",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "3"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    // Wrong methods: 405 with an OpenAI error body.
    for (method, path) in [
        (reqwest::Method::GET, "/v1/chat/completions"),
        (reqwest::Method::PUT, "/v1/completions"),
        (reqwest::Method::DELETE, "/v1/models"),
    ] {
        let r = http
            .request(method.clone(), format!("{base}{path}"))
            .bearer_auth(&ana)
            .send()
            .await?;
        let st = r.status().as_u16();
        let v: Value = r.json().await.context("a JSON body")?;
        assert_eq!(st, 405, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    // Unknown paths: 404 with an OpenAI error body.
    let r = http.get(format!("{base}/v2/nothing")).send().await?;
    assert_eq!(r.status().as_u16(), 404);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    // Unknown roles never reach an upstream (nothing is charged).
    let (st, _, v) = call(
        &http,
        &base,
        Some(&ana),
        json!({"model": "tiny", "messages": [{"role": "wizard", "content": "abracadabra"}]}),
    )
    .await?;
    assert_eq!(
        (st, v["error"]["param"].as_str()),
        (400, Some("messages")),
        "{v}"
    );
    // A stranger announcing a 10 MB body that never comes is refused at
    // once, from the headers alone.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-nobody\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        10 << 20
    );
    let t0 = std::time::Instant::now();
    let answer = raw(&s.gateways[g].addr, head.as_bytes(), Duration::from_secs(5)).await?;
    assert!(
        answer.starts_with("HTTP/1.1 401") && answer.contains("invalid_api_key"),
        "answered before the body: {answer:?} after {:?}",
        t0.elapsed()
    );
    let line = line_after(&s, "ana", 1).await?;
    assert_eq!(line.requests, 1, "only the warm-up was charged: {line:?}");
    Ok(())
}

/// Sets `member`'s key Secret to `key` (`kubectl apply`, as an admin would).
fn put_key(s: &Scene, member: &str, key: &str) -> Result<()> {
    let y = kubectl_ok(&[
        "-n",
        &s.ns.name,
        "create",
        "secret",
        "generic",
        &format!("key-{member}"),
        &format!("--from-literal=api-key={key}"),
        "--dry-run=client",
        "-o",
        "yaml",
    ])?;
    let p = std::env::temp_dir().join(format!("{}-{member}-key.yaml", s.ns.name));
    std::fs::write(&p, y)?;
    kubectl_ok(&["apply", "-f", &p.to_string_lossy()])?;
    let label = format!("{}=true", copyhold::gateway::catalog::KEY_LABEL);
    let name = format!("key-{member}");
    kubectl_ok(&[
        "-n",
        &s.ns.name,
        "label",
        "--overwrite",
        "secret",
        &name,
        &label,
    ])
    .map(drop)
}

/// The quota's `Valid` condition once it has `status` and `reason`.
async fn valid_condition(s: &Scene, status: &str, reason: &str) -> Result<String> {
    eventually(Duration::from_secs(20), || async {
        let st = s.register().await?;
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Valid")
            .context("no Valid condition yet")?;
        ensure!(
            c.status == status && c.reason == reason,
            "Valid is {} {}: {}",
            c.status,
            c.reason,
            c.message
        );
        Ok(c.message.clone())
    })
    .await
}

/// Reasons of the Warning Events on the quota `commons`.
async fn quota_warnings(s: &Scene) -> Result<Vec<(String, String)>> {
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(s.client.clone(), &s.ns.name);
    Ok(events
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.involved_object.kind.as_deref() == Some("StintQuota")
                && e.involved_object.name.as_deref() == Some("commons")
        })
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_given_to_two_members_opens_for_neither_and_the_quota_says_so() -> Result<()> {
    let mut s = Scene::new(
        "gw-dupkey",
        json!({"members": [{"name": "ana"}, {"name": "bo"}, {"name": "cy"}],
               "pool": {"tokens": 1000000},
               "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "2"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let (ana, cy) = (s.keys["ana"].clone(), s.keys["cy"].clone());
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    valid_condition(&s, "True", "Valid").await?;

    // bo is given ana's key: it opens for neither; cy is not affected.
    put_key(&s, "bo", &ana)?;
    eventually(Duration::from_secs(10), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        ensure!(st == 401, "the shared key still opens: {st} {v}");
        ensure!(v["error"]["code"] == "api_key_shared", "{v}");
        Ok(())
    })
    .await?;
    let (st, _, v) = call(&http, &base, Some(&cy), chat("hi", 2)).await?;
    ensure!(st == 200, "cy: {st} {v}");
    let message = valid_condition(&s, "False", "DuplicateKey").await?;
    ensure!(message.contains("ana and bo"), "{message}");
    ensure!(!message.contains(&ana), "the key is never shown: {message}");
    let warnings = quota_warnings(&s).await?;
    ensure!(
        warnings
            .iter()
            .any(|(r, m)| r == "DuplicateKey" && m.contains("ana and bo")),
        "{warnings:?}"
    );

    // bo gets a key of their own: both open again.
    put_key(&s, "bo", "sk-bo-own")?;
    eventually(Duration::from_secs(10), || async {
        let (a, _, _) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        let (b, _, _) = call(&http, &base, Some("sk-bo-own"), chat("hi", 2)).await?;
        ensure!(a == 200 && b == 200, "ana {a}, bo {b}");
        Ok(())
    })
    .await?;
    valid_condition(&s, "True", "Valid").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quota_with_inconsistent_sanctions_gets_a_condition_and_an_event() -> Result<()> {
    let mut s = Scene::new(
        "gw-sanctions",
        json!({"members": [{"name": "ana", "stint": {"tokens": 1000}}],
               "period": {"type": "calendar", "unit": "day"},
               "sanctions": {"warnAt": 95, "throttleAt": 80, "suspendAt": 100}}),
        &[],
    )
    .await?;
    s.gateway().await?;
    let message = valid_condition(&s, "False", "InvalidSpec").await?;
    ensure!(message.contains("spec.sanctions.warnAt"), "{message}");
    let warnings = quota_warnings(&s).await?;
    ensure!(
        warnings
            .iter()
            .any(|(r, m)| r == "InvalidSpec" && m.contains("spec.sanctions.warnAt")),
        "{warnings:?}"
    );
    Ok(())
}

/// Waits until the gateway serves `ana` a chat (not a 503 for want of a
/// replica yet) and returns the status and body of that answer.
async fn first_answer(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    body: Value,
) -> Result<(u16, Value)> {
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(http, base, Some(key), body.clone()).await?;
        ensure!(st != 503, "no replica yet: {v}");
        Ok((st, v))
    })
    .await
}

/// Issue 18, front door: a non-streamed answer larger than
/// `--max-response-bytes` is not buffered; the client gets an OpenAI-shaped
/// 502, and the member is charged the reservation (the engine did work we
/// cannot measure), as for an answer that broke off: never zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_non_streamed_answer_over_the_response_bound_is_a_502_charged_the_reservation()
-> Result<()> {
    let mut s = Scene::new(
        "gw-big-answer",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    // 50 tokens of "tN " in one JSON answer: several hundred bytes.
    let up = standin(&["--tokens", "50"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway_with(&["--max-response-bytes", "256"]).await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    let (st, v) = first_answer(&http, &base, &ana, chat("abc", 50)).await?;
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["error"]["type"], "upstream_error", "{v}");
    assert_eq!(v["error"]["code"], "upstream_response_too_large", "{v}");
    let line = line_after(&s, "ana", 1).await?;
    // The reservation: "user" + "abc" = 7 bytes, + 64 + 8, + 50 completion.
    assert_eq!(line.tokens, 7 + 64 + 8 + 50, "{line:?}");
    // Within the bound, the same answer is served.
    let mut s2 = Scene::new(
        "gw-big-ok",
        json!({"members": [{"name": "bo"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    s2.serving_pod("up-0", &up.addr).await?;
    let g2 = s2.gateway_with(&["--max-response-bytes", "65536"]).await?;
    let bo = s2.keys["bo"].clone();
    let (st, v) = first_answer(&http, &s2.url(g2), &bo, chat("abc", 50)).await?;
    assert_eq!(st, 200, "{v}");
    Ok(())
}

/// Issue 18, front door: a client that sends its headers and then stalls
/// its body gets an OpenAI-shaped 408 after `--body-timeout`, and nothing
/// is charged to its member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stalls_its_body_gets_a_408_and_is_charged_nothing() -> Result<()> {
    let mut s = Scene::new(
        "gw-slow-body",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "3"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway_with(&["--body-timeout", "1"]).await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    let (st, v) = first_answer(&http, &base, &ana, chat("hi", 2)).await?;
    assert_eq!(st, 200, "{v}");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ana}\r\n\
         content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\": \"ti"
    );
    let t0 = std::time::Instant::now();
    let answer = raw(&s.gateways[g].addr, head.as_bytes(), Duration::from_secs(6)).await?;
    let took = t0.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("\"request_timeout\""),
        "a stalled body is refused: {answer:?} after {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "after the body timeout: {took:?}"
    );
    // Give a wrong charge time to land, then check only the warm-up counts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let line = line_after(&s, "ana", 1).await?;
    assert_eq!(line.requests, 1, "only the warm-up was charged: {line:?}");
    Ok(())
}

/// Opens a connection and sends `bytes`, then holds it open.
async fn stall(addr: &str, bytes: &[u8]) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(bytes).await?;
    Ok(c)
}

/// Reads until the peer closes the connection or `wait` passes; true when
/// it closed.
async fn closed_within(c: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(wait, read).await.is_ok()
}

/// Issue 18, front door: a client that sends part of its request line and
/// headers and then stalls is disconnected after `--header-timeout`
/// (default 10 s), so it cannot hold a connection open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stalls_its_headers_is_disconnected_after_the_header_timeout() -> Result<()> {
    let mut s = Scene::new(
        "gw-slow-head",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    // The default applies: no flag.
    let g = s.gateway().await?;
    let addr = s.gateways[g].addr.clone();
    let t0 = std::time::Instant::now();
    let mut c = stall(
        &addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthoriz",
    )
    .await?;
    let closed = closed_within(&mut c, Duration::from_secs(14)).await;
    let took = t0.elapsed();
    assert!(closed, "still open after {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "not before the timeout: {took:?}"
    );
    // The gateway still serves.
    let r = reqwest::get(format!("http://{addr}/healthz")).await?;
    assert_eq!(r.status().as_u16(), 200);
    Ok(())
}

/// Issue 18, front door: with `--max-connections N`, N stalled connections
/// keep an (N+1)th waiting (it is accepted only when a slot frees: no
/// request on it is served before), and the slot is free again after one
/// of them closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_beyond_the_cap_wait_until_one_closes() -> Result<()> {
    let mut s = Scene::new(
        "gw-conn-cap",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let g = s
        .gateway_with(&["--max-connections", "2", "--header-timeout", "30"])
        .await?;
    let addr = s.gateways[g].addr.clone();
    let partial = b"GET /healthz HTTP/1.1\r\nhost: x\r\n";
    let first = stall(&addr, partial).await?;
    let _second = stall(&addr, partial).await?;
    let ask = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    // The third waits: nothing comes back while two slots are held.
    let waiting = tokio::spawn({
        let addr = addr.clone();
        async move { raw(&addr, ask, Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!waiting.is_finished(), "served beyond the cap");
    drop(first);
    let answer = waiting.await??;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "served once a slot freed: {answer:?}"
    );
    // The third's slot is given back when it closes: a fourth is served.
    let answer = raw(&addr, ask, Duration::from_secs(5)).await?;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "the cap frees again: {answer:?}"
    );
    Ok(())
}

/// `GET url`: status and body.
async fn get_text(http: &reqwest::Client, url: &str) -> Result<(u16, String)> {
    let r = http.get(url).send().await?;
    Ok((r.status().as_u16(), r.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_member_metrics_are_served_on_their_own_port_and_never_on_the_public_one() -> Result<()>
{
    let mut s = Scene::new(
        "gw-metrics-port",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    let up = standin(&["--tokens", "3"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    // The public port: an OpenAI-shaped 404, no metric in it.
    let (st, body) = get_text(&http, &format!("{base}/metrics")).await?;
    assert_eq!(st, 404, "{body}");
    let v: Value = serde_json::from_str(&body).context("a JSON body")?;
    assert_eq!(v["error"]["code"], "not_found", "{v}");
    assert!(!body.contains("copyhold_"), "{body}");
    // The metrics port: the member's series, named by namespace and quota.
    let metrics = s.metrics_url(g)?;
    let (st, body) = get_text(&http, &format!("{metrics}/metrics")).await?;
    assert_eq!(st, 200, "{body}");
    let ns = &s.ns.name;
    let want = format!(
        r#"copyhold_gateway_requests_total{{namespace="{ns}",quota="commons",member="ana",model="tiny",code="200"}} 1"#
    );
    assert!(body.contains(&want), "{want} missing from\n{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_named_members_of_two_tenants_are_two_series_on_the_metrics_port() -> Result<()> {
    let spec =
        || json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}});
    let a = Scene::new("gw-tenant-a", spec(), &[]).await?;
    let b = Scene::new("gw-tenant-b", spec(), &[]).await?;
    let up = standin(&["--tokens", "3"])?;
    a.serving_pod("up-0", &up.addr).await?;
    b.serving_pod("up-0", &up.addr).await?;
    // One gateway for both tenants: every namespace's quotas and models,
    // the keys of these two.
    let served = format!("{},{}", a.ns.name, b.ns.name);
    let gw = spawn_gateway(&["--key-namespaces", &served, "--identity", "gw-two"])?;
    let base = format!("http://{}", gw.addr);
    let metrics = format!("http://{}", copyhold_e2e::gateway_metrics_addr(&gw.line)?);
    let http = reqwest::Client::new();
    for (scene, n) in [(&a, 2), (&b, 1)] {
        let key = scene.keys["ana"].clone();
        eventually(Duration::from_secs(20), || async {
            let (st, _, v) = call(&http, &base, Some(&key), chat("hi", 2)).await?;
            ensure!(st == 200, "{st} {v}");
            Ok(())
        })
        .await?;
        for _ in 1..n {
            let (st, _, v) = call(&http, &base, Some(&key), chat("hi", 2)).await?;
            assert_eq!(st, 200, "{v}");
        }
    }
    let (st, body) = get_text(&http, &format!("{metrics}/metrics")).await?;
    assert_eq!(st, 200, "{body}");
    for (scene, n) in [(&a, 2), (&b, 1)] {
        let ns = &scene.ns.name;
        for want in [
            format!(
                r#"copyhold_gateway_requests_total{{namespace="{ns}",quota="commons",member="ana",model="tiny",code="200"}} {n}"#
            ),
            format!(
                r#"copyhold_gateway_tokens_total{{namespace="{ns}",quota="commons",member="ana",kind="completion"}} "#
            ),
        ] {
            assert!(body.contains(&want), "{want} missing from\n{body}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_in_a_secret_without_the_api_key_label_is_refused_and_a_labelled_one_works()
-> Result<()> {
    let mut s = Scene::new(
        "gw-key-label",
        json!({"members": [{"name": "ana"}, {"name": "bo"}],
               "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    // bo's Secret loses the label before the gateway starts.
    let unlabel = format!("{}-", copyhold::gateway::catalog::KEY_LABEL);
    kubectl_ok(&["-n", &s.ns.name, "label", "secret", "key-bo", &unlabel])?;
    let up = standin(&["--tokens", "3"])?;
    s.serving_pod("up-0", &up.addr).await?;
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let (ana, bo) = (s.keys["ana"].clone(), s.keys["bo"].clone());
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    let (st, _, v) = call(&http, &base, Some(&bo), chat("hi", 2)).await?;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{v}"
    );
    // Labelled, the same Secret opens within seconds.
    let label = format!("{}=true", copyhold::gateway::catalog::KEY_LABEL);
    kubectl_ok(&["-n", &s.ns.name, "label", "secret", "key-bo", &label])?;
    eventually(Duration::from_secs(20), || async {
        let (st, _, v) = call(&http, &base, Some(&bo), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ready_pod_with_the_models_label_but_not_owned_through_its_deployment_gets_no_traffic()
-> Result<()> {
    let mut s = Scene::new(
        "gw-stray",
        json!({"members": [{"name": "ana"}], "period": {"type": "calendar", "unit": "day"}}),
        &[],
    )
    .await?;
    // The strays answer like a model server: only ownership tells them
    // apart. A bare Pod, and a Pod of a ReplicaSet of a Deployment that
    // carries the label but that the ModelDeployment does not own.
    let stray = standin(&["--tokens", "3"])?;
    s.stray_pod("stray-0", &stray.addr).await?;
    copyhold::bench::stand_in::pod_of_deployment(
        &s.client,
        &s.ns.name,
        "m",
        None,
        "impostor",
        &stray.addr,
    )
    .await?;
    // Their first lists are in once the gateway serves.
    let g = s.gateway().await?;
    let base = s.url(g);
    let http = reqwest::Client::new();
    let ana = s.keys["ana"].clone();
    let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (503, Some("model_not_ready")),
        "the stray Pod was served: {v}"
    );
    // A Pod of a Deployment that the ModelDeployment owns is served.
    let up = standin(&["--tokens", "3"])?;
    s.serving_pod("up-0", &up.addr).await?;
    eventually(Duration::from_secs(30), || async {
        let (st, _, v) = call(&http, &base, Some(&ana), chat("hi", 2)).await?;
        ensure!(st == 200, "{st} {v}");
        Ok(())
    })
    .await?;
    Ok(())
}
