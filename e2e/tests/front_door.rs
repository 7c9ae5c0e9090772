//! A property test of the gateway's front door (issue 18): random and
//! mutated requests (methods, paths, headers, bodies) driven through the
//! gateway's own router in-process (`tower::ServiceExt::oneshot`), over a
//! live catalog and ledgers against the real API server and a real
//! stand-in upstream. Every answer is a 2xx or a 4xx, never a 5xx from the
//! gateway and never a panic, and the register grows only by what was
//! served.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request};
use copyhold::resources::stint_quota::StintQuota;
use copyhold_e2e::{ChildGuard, TestNamespace, client, create_secret, eventually, install_crds};
use kube::api::{Api, PostParams};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tower::ServiceExt;

/// How many requests the property sends.
const CASES: u32 = 100_000;

const PATHS: [&str; 12] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/metrics",
    "/healthz",
    "/readyz",
    "/register",
    "/register.json",
    "/register/x/commons",
    "/register/x/commons.json",
    "/v1/chat/completions/",
    "/v1/embeddings",
];

/// A request as generated: which key, method, path, extra header, body.
#[derive(Debug, Clone)]
struct Asked {
    key: usize,
    method: Method,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn methods() -> impl Strategy<Value = Method> {
    prop_oneof![
        6 => Just(Method::POST),
        2 => Just(Method::GET),
        1 => Just(Method::PUT),
        1 => Just(Method::DELETE),
        1 => Just(Method::PATCH),
        1 => Just(Method::OPTIONS),
        1 => Just(Method::HEAD),
    ]
}

fn paths() -> impl Strategy<Value = String> {
    // Mostly the metered endpoints, where the body is read and checked.
    prop_oneof![
        4 => Just("/v1/chat/completions".to_string()),
        2 => Just("/v1/completions".to_string()),
        3 => proptest::sample::select(PATHS.to_vec()).prop_map(String::from),
        1 => "/[a-zA-Z0-9/._%~-]{0,40}",
    ]
}

/// JSON values of any shape, small.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        "[ -~]{0,12}".prop_map(Value::String),
        proptest::sample::select(vec![
            "user",
            "assistant",
            "wizard",
            "tool",
            "system",
            "tiny",
            ""
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid request of either endpoint, small enough to serve quickly.
fn valid_body() -> impl Strategy<Value = Value> {
    (any::<bool>(), any::<bool>(), 1i64..4, "[a-z ]{0,20}").prop_map(|(chat, stream, max, text)| {
        if chat {
            json!({"model": "tiny", "messages": [{"role": "user", "content": text}],
                       "max_tokens": max, "stream": stream})
        } else {
            json!({"model": "tiny", "prompt": text, "max_tokens": max, "stream": stream})
        }
    })
}

/// A valid body with one field replaced, removed or added.
fn mutated_body() -> impl Strategy<Value = Value> {
    let fields = proptest::sample::select(vec![
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stream",
        "stream_options",
        "tools",
        "tool_choice",
        "response_format",
        "temperature",
    ]);
    (valid_body(), fields, prop::option::of(any_json())).prop_map(|(mut v, field, value)| {
        if let Some(o) = v.as_object_mut() {
            match value {
                Some(x) => {
                    o.insert(field.into(), x);
                }
                None => {
                    o.remove(field);
                }
            }
        }
        v
    })
}

fn bodies() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => valid_body().prop_map(|v| v.to_string().into_bytes()),
        4 => mutated_body().prop_map(|v| v.to_string().into_bytes()),
        1 => (valid_body(), any::<prop::sample::Index>())
            .prop_map(|(v, i)| {
                let b = v.to_string().into_bytes();
                b[..i.index(b.len() + 1)].to_vec()
            }),
        1 => (valid_body(), any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(v, i, x)| {
                let mut b = v.to_string().into_bytes();
                let at = i.index(b.len());
                b[at] = x;
                b
            }),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

fn requests(keys: usize) -> impl Strategy<Value = Asked> {
    (
        0..keys + 2,
        methods(),
        paths(),
        prop::option::of(prop_oneof![
            Just("application/json".to_string()),
            Just("text/plain".to_string()),
            "[ -~]{0,20}",
        ]),
        bodies(),
    )
        .prop_map(|(key, method, path, content_type, body)| Asked {
            key,
            method,
            path,
            content_type,
            body,
        })
}

/// The stand-in upstream as a child process, and its address.
fn standin() -> Result<(ChildGuard, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_copyhold-upstream-standin"))
        .args(["--tokens", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line
        .split_whitespace()
        .last()
        .context("no address")?
        .to_string();
    Ok((ChildGuard(child), addr))
}

#[test]
fn a_hundred_thousand_random_requests_get_2xx_or_4xx_and_only_served_ones_are_charged() -> Result<()>
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(install_crds())?;
    let ns = TestNamespace::create("gw-fuzz")?;
    let client = rt.block_on(client())?;
    let members = ["ana", "bo"];
    let mut keys = Vec::new();
    for m in members {
        let key = format!("sk-{m}-{}", ns.name);
        create_secret(&ns.name, &format!("key-{m}"), "api-key", &key)?;
        keys.push(key);
    }
    let sq: StintQuota = serde_json::from_value(json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
        "metadata": {"name": "commons", "namespace": ns.name},
        "spec": {
            "members": [
                {"name": "ana", "apiKeySecret": {"name": "key-ana"}},
                {"name": "bo", "apiKeySecret": {"name": "key-bo"}, "stint": {"tokens": 3000}},
            ],
            "period": {"type": "calendar", "unit": "day"},
            "sanctions": {"throttleAt": 100, "suspendAt": 100},
        }
    }))?;
    rt.block_on(
        Api::<StintQuota>::namespaced(client.clone(), &ns.name).create(&PostParams::default(), &sq),
    )?;
    let md = json!({
        "apiVersion": "copyhold.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "m", "namespace": ns.name},
        "spec": {
            "model": {"source": {"hostPath": {"path": "/models/tiny"}}, "format": "safetensors",
                      "servedName": "tiny",
                      "sizing": {"weightBytes": "1Mi", "kvBytesPerToken": 1024}},
            "engine": {"kind": "copyhold"}, "replicas": 1,
            "placement": {"nodeSelector": {"copyhold.dev/test": "no-such-node"}},
            "serving": {"contextLength": 2048}, "stintQuota": "commons",
        }
    });
    let path = std::env::temp_dir().join(format!("{}-md.json", ns.name));
    std::fs::write(&path, serde_json::to_vec(&md)?)?;
    copyhold_e2e::kubectl_ok(&["apply", "-f", &path.to_string_lossy()])?;
    let _ = std::fs::remove_file(&path);
    let (_up, addr) = standin()?;
    rt.block_on(copyhold_e2e::serving_pod(
        &client, &ns.name, "m", "up-0", &addr,
    ))?;

    let settings = copyhold::gateway::Settings {
        watch_namespace: Some(ns.name.clone()),
        identity: format!("fuzz-{}", ns.name),
        ..Default::default()
    };
    let app = rt.block_on(copyhold::gateway::app(client.clone(), &settings))?;
    // Wait until the watch has seen the serving Pod.
    rt.block_on(eventually(Duration::from_secs(30), || {
        let app = app.clone();
        let key = keys[0].clone();
        async move {
            let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "warm"}], "max_tokens": 1});
            let st = send(&app, &key, Method::POST, "/v1/chat/completions", Some("application/json"), body.to_string().into_bytes()).await?.0;
            anyhow::ensure!(st == 200, "{st}");
            Ok(())
        }
    }))?;

    // The runner takes a `Fn`: the tallies are kept in cells.
    let served = RefCell::new(BTreeMap::from([("ana", 1i64), ("bo", 0)]));
    let statuses: RefCell<BTreeMap<u16, u64>> = RefCell::default();
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let all_keys: Vec<String> = keys
        .iter()
        .cloned()
        .chain(["sk-nobody".to_string(), String::new()])
        .collect();
    let started = std::time::Instant::now();
    let outcome = runner.run(&requests(keys.len()), |a| {
        let key = &all_keys[a.key];
        let (status, body) = rt
            .block_on(send(
                &app,
                key,
                a.method.clone(),
                &a.path,
                a.content_type.as_deref(),
                a.body.clone(),
            ))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        *statuses.borrow_mut().entry(status).or_default() += 1;
        prop_assert!(
            status < 500,
            "{status} from the gateway for {a:?}: {}",
            String::from_utf8_lossy(&body)
        );
        let completion = a.method == Method::POST
            && (a.path == "/v1/chat/completions" || a.path == "/v1/completions");
        if completion && (200..300).contains(&status) && a.key < members.len() {
            *served.borrow_mut().entry(members[a.key]).or_default() += 1;
        }
        if completion && status >= 400 && a.method != Method::HEAD {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{status} not JSON ({e}) for {a:?}")))?;
            prop_assert!(v["error"]["type"].is_string(), "{v}");
        }
        Ok(())
    });
    let took = started.elapsed();
    let (served, statuses) = (served.into_inner(), statuses.into_inner());
    println!("{CASES} requests in {took:?}; statuses {statuses:?}; served {served:?}");
    outcome.map_err(|e| anyhow::anyhow!("{e}"))?;

    // The register holds exactly the served requests.
    let sq_api = Api::<StintQuota>::namespaced(client.clone(), &ns.name);
    rt.block_on(eventually(Duration::from_secs(20), || {
        let sq_api = sq_api.clone();
        let served = served.clone();
        async move {
            let st = sq_api.get("commons").await?.status.unwrap_or_default();
            for (m, n) in &served {
                let got = st
                    .members
                    .iter()
                    .find(|l| l.name == *m)
                    .map(|l| l.requests)
                    .unwrap_or(0);
                anyhow::ensure!(got == *n, "{m}: register {got} requests, served {n}");
            }
            Ok(())
        }
    }))?;
    Ok(())
}

/// One request through the router, as a connection from loopback.
async fn send(
    app: &axum::Router,
    key: &str,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>)> {
    let mut b = Request::builder().method(method).uri(path);
    if !key.is_empty() {
        b = b.header("authorization", format!("Bearer {key}"));
    }
    if let Some(c) = content_type
        && let Ok(v) = axum::http::HeaderValue::from_str(c)
    {
        b = b.header("content-type", v);
    }
    let mut req = b.body(Body::from(body))?;
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    let resp = app.clone().oneshot(req).await?;
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 64 << 20).await?;
    Ok((status, body.to_vec()))
}
