//! A controllable stand-in for an OpenAI-compatible engine, test-only: it
//! answers chat and completion requests (streamed or not) with a known
//! number of tokens at a known pace, and can be told to omit usage or to
//! fail, so the gateway's timing and failure paths can be tested and
//! benchmarked without a model.
//!
//! Prompt tokens are the whitespace-separated words of the prompt (plus one
//! per message); completion tokens are `min(max_tokens, --tokens)`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Clone, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Completion tokens per response (capped by the request's max_tokens).
    #[arg(long, default_value_t = 16)]
    tokens: i64,
    /// Delay before each streamed token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Leave usage out of every response.
    #[arg(long)]
    omit_usage: bool,
    /// Answer every request with this status and an error body.
    #[arg(long)]
    fail_status: Option<u16>,
    /// Joules reported per token.
    #[arg(long, default_value_t = 0.5)]
    joules_per_token: f64,
    /// Delay before answering any request (streamed or not), in
    /// milliseconds: how long a request stays in flight.
    #[arg(long, default_value_t = 0)]
    answer_delay_ms: u64,
    /// Wait this long before answering (before the response headers).
    #[arg(long, default_value_t = 0)]
    header_delay_ms: u64,
    /// In a stream, wait this long after the usage chunk before `[DONE]`.
    #[arg(long, default_value_t = 0)]
    done_delay_ms: u64,
    /// Stream this many tokens, then cut the connection (no usage, no `[DONE]`).
    #[arg(long)]
    cut_after_tokens: Option<i64>,
    /// Answer a stream with this status, after streaming its tokens in the body.
    #[arg(long)]
    stream_status: Option<u16>,
}

/// Run as a serving Pod's engine (the kubelet stand-in maps an image to
/// this binary): `serve … --host H --port P …` as copyhold-node is called,
/// the other flags ignored, the pace from `STANDIN_TOKENS`,
/// `STANDIN_TOKEN_DELAY_MS` and `STANDIN_ANSWER_DELAY_MS`.
fn engine_args(argv: &[String]) -> Option<Args> {
    if argv.get(1).map(String::as_str) != Some("serve") {
        return None;
    }
    let flag = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let host = flag("--host").unwrap_or_else(|| "127.0.0.1".into());
    let port = flag("--port").unwrap_or_else(|| "8000".into());
    Some(Args {
        listen: format!("{host}:{port}").parse().ok()?,
        tokens: env("STANDIN_TOKENS", 4) as i64,
        token_delay_ms: env("STANDIN_TOKEN_DELAY_MS", 0),
        omit_usage: false,
        fail_status: None,
        joules_per_token: 0.5,
        answer_delay_ms: env("STANDIN_ANSWER_DELAY_MS", 0),
        header_delay_ms: 0,
        done_delay_ms: 0,
        cut_after_tokens: None,
        stream_status: None,
    })
}

fn prompt_tokens(v: &Value) -> i64 {
    let words = |s: &str| s.split_whitespace().count() as i64;
    if let Some(ms) = v.get("messages").and_then(Value::as_array) {
        ms.iter()
            .map(|m| {
                1 + m
                    .get("content")
                    .and_then(Value::as_str)
                    .map(words)
                    .unwrap_or(0)
            })
            .sum()
    } else {
        match v.get("prompt") {
            Some(Value::String(s)) => words(s),
            _ => 1,
        }
    }
}

async fn complete(State(a): State<Arc<Args>>, chat: bool, body: Bytes) -> Response {
    if a.header_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(a.header_delay_ms)).await;
    }
    if let Some(code) = a.fail_status {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (code, axum::Json(json!({"error": {"message": "stand-in told to fail", "type": "server_error", "param": null, "code": null}}))).into_response();
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad json").into_response();
    };
    if a.answer_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(a.answer_delay_ms)).await;
    }
    let max = v
        .get("max_tokens")
        .and_then(Value::as_i64)
        .unwrap_or(a.tokens);
    let n = a.tokens.min(max).max(0);
    let p = prompt_tokens(&v);
    let usage = json!({
        "prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
        "energy_joules": (p + n) as f64 * a.joules_per_token,
    });
    let model = v.get("model").cloned().unwrap_or(Value::Null);
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    if !stream {
        let text: String = (0..n).map(|i| format!("t{i} ")).collect();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        let mut out = json!({"id": "standin", "object": object, "created": 0, "model": model, "choices": [choice]});
        if !a.omit_usage {
            out["usage"] = usage;
        }
        return axum::Json(out).into_response();
    }
    let a2 = a.clone();
    let status = a
        .stream_status
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let s = async_stream(a2, chat, n, model, usage, include_usage);
    Response::builder()
        .status(status)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(s))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn async_stream(
    a: Arc<Args>,
    chat: bool,
    n: i64,
    model: Value,
    usage: Value,
    include_usage: bool,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    futures::stream::unfold(0i64, move |i| {
        let a = a.clone();
        let model = model.clone();
        let usage = usage.clone();
        async move {
            if i > n + 1 {
                return None;
            }
            if a.cut_after_tokens.is_some_and(|c| i >= c) {
                // An error ends the body without its last chunk: a cut.
                return Some((Err(std::io::Error::other("stand-in told to cut")), n + 2));
            }
            if i < n {
                if a.token_delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(a.token_delay_ms)).await;
                }
                let choice = if chat {
                    json!({"index": 0, "delta": {"content": format!("t{i} ")}, "finish_reason": if i + 1 == n { json!("length") } else { Value::Null }})
                } else {
                    json!({"index": 0, "text": format!("t{i} "), "finish_reason": if i + 1 == n { json!("length") } else { Value::Null }})
                };
                let mut c = json!({"id": "standin", "object": object, "created": 0, "model": model, "choices": [choice]});
                if include_usage {
                    c["usage"] = Value::Null;
                }
                return Some((Ok(Bytes::from(format!("data: {c}\n\n"))), i + 1));
            }
            if i == n {
                if include_usage && !a.omit_usage {
                    let c = json!({"id": "standin", "object": object, "created": 0, "model": model, "choices": [], "usage": usage});
                    return Some((Ok(Bytes::from(format!("data: {c}\n\n"))), i + 1));
                }
                return Some((Ok(Bytes::new()), i + 1));
            }
            if i == n + 1 {
                if include_usage && a.done_delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(a.done_delay_ms)).await;
                }
                return Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), i + 1));
            }
            None
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let args = Arc::new(engine_args(&argv).unwrap_or_else(Args::parse));
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(|s: State<Arc<Args>>, b: Bytes| complete(s, true, b)),
        )
        .route(
            "/v1/completions",
            post(|s: State<Arc<Args>>, b: Bytes| complete(s, false, b)),
        )
        .route("/health", get(|| async { "ok" }))
        .with_state(args.clone());
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
