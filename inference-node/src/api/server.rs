//! The OpenAI-compatible HTTP front (axum): chat and text completions with
//! SSE streaming, models, health, metrics and the power-limit admin API.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use subtle::ConstantTimeEq;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::api::http_body::LimitedBody;
use crate::api::openai::{
    self, ApiError, ChatRequest, CompletionRequest, Limits, PromptField, UsageOut, Validated,
};
use crate::api::tools::ToolMode;
use crate::engine::sampling::TokenLogprobs;
use crate::engine::{EngineHandle, Event, GenRequest, SubmitError};
use crate::metrics::Metrics;
use crate::model::tokenizer::TextModel;

/// What exists once the model is loaded.
pub struct Ready {
    pub handle: EngineHandle,
    pub text: Arc<TextModel>,
    pub limits: Limits,
}

/// Shared server state; `ready` is empty while the model loads.
pub struct AppState {
    pub name: String,
    pub ready: OnceLock<Ready>,
    pub admin_token: Option<String>,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    ids: AtomicU64,
    /// GPU power-limit control when the sensor is NVML.
    pub gpu: Option<crate::power::NvmlControl>,
    /// Limit set through NVML (pacing limits live in the engine handle).
    gpu_limit: std::sync::Mutex<Option<f64>>,
}

impl AppState {
    pub fn new(name: String, admin_token: Option<String>, metrics: Arc<Metrics>) -> AppState {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        AppState {
            name,
            ready: OnceLock::new(),
            admin_token,
            metrics,
            created,
            ids: AtomicU64::new(0),
            gpu: None,
            gpu_limit: std::sync::Mutex::new(None),
        }
    }

    /// Adds NVML power-limit control.
    pub fn with_gpu(mut self, gpu: Option<crate::power::NvmlControl>) -> AppState {
        self.gpu = gpu;
        self
    }

    fn id(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}-{}",
            self.created,
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn unavailable(message: &str, code: &'static str) -> ApiError {
    ApiError {
        status: 503,
        message: message.to_string(),
        kind: "service_unavailable",
        param: None,
        code: Some(code),
    }
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: 500,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// All routes; anything else is an OpenAI-shaped 404 or 405.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route(
            "/admin/power-limit",
            get(get_power_limit).post(set_power_limit),
        )
        // After the routes: it applies to those registered before it.
        .method_not_allowed_fallback(crate::api::http_body::method_not_allowed)
        .fallback(crate::api::http_body::not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is requested; running
/// requests and streams finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.requested())
        .await
}

/// SIGTERM (what the kubelet and container runtimes send) or SIGINT,
/// caught from the moment [`Shutdown::install`] returns.
///
/// Why the handlers are installed up front and not when the server is
/// first polled: in a container the node is PID 1, which the kernel gives
/// no default action for SIGTERM. A SIGTERM that came after the node said
/// it listens but before a worker thread polled the server (a loaded
/// machine) was dropped, and the kubelet waited out the grace period.
#[derive(Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    /// Installs the handlers now; call it inside the runtime, before
    /// telling anyone the node is up.
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("shutting down: finishing running requests");
            let _ = tx.send(true);
        });
        Ok(Self(rx))
    }

    /// Resolves once a signal came (or the runtime is going away).
    pub async fn requested(mut self) {
        let _ = self.0.wait_for(|asked| *asked).await;
    }
}

/// 200 while the engine serves; 503 while loading and, for good, once
/// the engine thread has stopped (a panic or a failed device), so
/// Kubernetes restarts the pod instead of routing to a zombie.
async fn health(State(s): State<Arc<AppState>>) -> Response {
    match s.ready.get() {
        None => unavailable("the model is still loading", "model_loading").into_response(),
        Some(r) => match r.handle.failed() {
            Some(why) => unavailable(&why, "engine_failed").into_response(),
            None => (StatusCode::OK, "ok").into_response(),
        },
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let max = s.ready.get().map(|r| r.limits.max_context);
    axum::Json(json!({"object": "list", "data": [{
        "id": s.name, "object": "model", "created": s.created, "owned_by": "copyhold",
        "max_model_len": max,
    }]}))
    .into_response()
}

fn ready(s: &AppState) -> Result<&Ready, ApiError> {
    s.ready
        .get()
        .ok_or_else(|| unavailable("the model is still loading", "model_loading"))
}

fn check_model(s: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError {
            code: Some("missing_required_parameter"),
            ..ApiError::bad(
                "model",
                format!("`model` is required; this node serves `{}`", s.name),
            )
        }),
        Some(m) if m != &s.name => Err(ApiError {
            status: 404,
            message: format!(
                "The model `{m}` does not exist; this node serves `{}`",
                s.name
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// A request turned into what the engine needs.
struct Prepared {
    prompt: Vec<u32>,
    v: Validated,
    id: String,
    tools: Option<Arc<ToolMode>>,
}

/// Runs a request's preparation (template rendering, tokenization,
/// grammar compilation: CPU work proportional to the input) on the
/// blocking pool, so the async workers keep answering everyone else.
async fn prepare(
    s: &Arc<AppState>,
    body: Bytes,
    f: fn(&AppState, &[u8]) -> Result<Prepared, ApiError>,
) -> Result<Prepared, ApiError> {
    let s2 = s.clone();
    tokio::task::spawn_blocking(move || f(&s2, &body))
        .await
        .unwrap_or_else(|e| Err(server_error(format!("preparing the request failed: {e}"))))
}

async fn chat(State(s): State<Arc<AppState>>, LimitedBody(body): LimitedBody) -> Response {
    match prepare(&s, body, chat_inner).await {
        Ok(p) => run(s, p, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

fn chat_inner(s: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let r = ready(s)?;
    let (mut req, common): (ChatRequest, _) = openai::parse_with_common(body)?;
    req.common = common;
    check_model(s, &req.common.model)?;
    let msgs = openai::messages(&req)?;
    let text_bytes: usize = msgs.iter().map(|m| m.content.len()).sum();
    r.limits.check_prompt_bytes("messages", text_bytes)?;
    let template = r.text.chat_template.as_deref().ok_or_else(|| {
        ApiError::bad(
            "messages",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let tools = crate::api::tools::mode(&req, template)?;
    let grammar = match (
        tools.as_ref().map(|t| t.grammar()).transpose()?.flatten(),
        crate::api::openai::response_format(req.response_format.as_ref())?,
    ) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "response_format",
                "`response_format` cannot be combined with a forced `tool_choice`",
            ));
        }
        (a, b) => a.or(b),
    };
    let rendered = crate::api::chat::render_with_tools(
        template,
        &msgs,
        tools.as_ref().map(|t| t.template_tools()).as_deref(),
        r.text.bos_token.as_deref(),
        r.text.eos_token.as_deref(),
        true,
    )
    .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    if rendered.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "the chat template rendered these messages as an empty prompt",
        ));
    }
    r.limits.check_prompt_bytes("messages", rendered.len())?;
    let prompt = r
        .text
        .encode(&rendered)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "the rendered prompt tokenizes to nothing",
        ));
    }
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, k) => Some(k.unwrap_or(0)),
        (false, Some(_)) => {
            return Err(ApiError::bad(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ));
        }
        (false, None) => None,
    };
    let mut v = openai::validate(
        &req.common,
        prompt.len(),
        "messages",
        logprobs,
        &r.text.defaults,
        &r.limits,
    )?;
    if let Some(g) = grammar {
        v.params.constraint = Some(constraint(r, g, v.params.max_tokens)?);
    }
    Ok(Prepared {
        prompt,
        v,
        id: s.id("chatcmpl"),
        tools: tools
            .filter(|t| t.choice != crate::api::tools::ToolChoice::None)
            .map(Arc::new),
    })
}

/// Holds the output to `g`, if `max_tokens` leaves room for its shortest
/// document.
fn constraint(
    r: &Ready,
    g: crate::engine::constrained::Grammar,
    max_tokens: usize,
) -> Result<crate::engine::constrained::Constraint, ApiError> {
    let c = crate::engine::constrained::Constraint {
        grammar: Arc::new(g),
        tokens: r.text.token_bytes(),
    };
    let need = c.min_tokens();
    if need > max_tokens {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "the shortest output this schema allows may take {need} tokens; `max_tokens` is {max_tokens}"
            ),
        ));
    }
    Ok(c)
}

async fn completions(State(s): State<Arc<AppState>>, LimitedBody(body): LimitedBody) -> Response {
    match prepare(&s, body, completion_inner).await {
        Ok(p) => run(s, p, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

fn completion_inner(s: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let r = ready(s)?;
    let (mut req, common): (CompletionRequest, _) = openai::parse_with_common(body)?;
    req.common = common;
    check_model(s, &req.common.model)?;
    if req.echo == Some(true) {
        return Err(ApiError::bad("echo", "`echo` is not supported"));
    }
    if let PromptField::Text(t) = &req.prompt {
        r.limits.check_prompt_bytes("prompt", t.len())?;
    }
    if let PromptField::Texts(t) = &req.prompt {
        r.limits
            .check_prompt_bytes("prompt", t.iter().map(String::len).sum())?;
    }
    let prompt = match &req.prompt {
        PromptField::Text(t) => r.text.encode(t),
        PromptField::Texts(v) if v.len() == 1 => r.text.encode(&v[0]),
        PromptField::Texts(_) => {
            return Err(ApiError::bad(
                "prompt",
                "`prompt` must be one string (batches are not supported)",
            ));
        }
        PromptField::Ids(ids) => Ok(ids.clone()),
    }
    .map_err(|e| ApiError::bad("prompt", e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "`prompt` must not be empty"));
    }
    r.limits.check_token_ids("prompt", &prompt)?;
    let v = openai::validate(
        &req.common,
        prompt.len(),
        "prompt",
        req.logprobs,
        &r.text.defaults,
        &r.limits,
    )?;
    Ok(Prepared {
        prompt,
        v,
        id: s.id("cmpl"),
        tools: None,
    })
}

/// One choice's accumulated result.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<(u32, Option<TokenLogprobs>)>,
    finish: Option<&'static str>,
    usage: crate::engine::Usage,
}

fn submit_all(
    r: &Ready,
    prompt: &[u32],
    v: &Validated,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let mut rxs = Vec::with_capacity(v.n);
    for i in 0..v.n {
        let (tx, rx) = unbounded_channel();
        let mut params = v.params.clone();
        // Choices differ from each other but stay reproducible under a seed.
        params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
        let req = GenRequest {
            prompt: prompt.to_vec(),
            params,
            stop: v.stop.clone(),
            capture_logits: false,
            events: tx,
        };
        // Dropping the receivers cancels the choices already queued.
        match r.handle.submit(req) {
            Ok(()) => {}
            Err(SubmitError::Overloaded) => {
                return Err(unavailable(
                    "the request queue is full; retry later",
                    "queue_full",
                ));
            }
            Err(SubmitError::Failed(why)) => return Err(unavailable(&why, "engine_failed")),
        }
        rxs.push(rx);
    }
    Ok(rxs)
}

async fn run(s: Arc<AppState>, p: Prepared, kind: Kind) -> Response {
    let Prepared {
        prompt,
        v,
        id,
        tools,
    } = p;
    let Some(r) = s.ready.get() else {
        return unavailable("the model is still loading", "model_loading").into_response();
    };
    let rxs = match submit_all(r, &prompt, &v) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if v.stream {
        return stream_response(s.clone(), rxs, v, kind, id, prompt.len(), tools);
    }
    let mut choices = Vec::new();
    for mut rx in rxs {
        let mut c = Choice::default();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Token {
                    id, text, logprobs, ..
                } => {
                    c.text.push_str(&text);
                    c.tokens.push((id, logprobs));
                }
                Event::Done {
                    text,
                    finish_reason,
                    usage,
                } => {
                    c.text.push_str(&text);
                    c.finish = Some(finish_reason.as_str());
                    c.usage = usage;
                }
                Event::Error(e) => return server_error(e).into_response(),
            }
        }
        if c.finish.is_none() {
            return server_error("the engine stopped before the request finished".into())
                .into_response();
        }
        choices.push(c);
    }
    let usage = usage_of(prompt.len(), choices.iter().map(|c| &c.usage));
    let text = &r.text;
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| match kind {
            Kind::Chat => json!({
                "index": i,
                "message": assistant_message(&s, text, tools.as_deref(), c, i),
                "logprobs": v.params.logprobs.map(|_| json!({"content": c.tokens.iter().filter_map(|(t, lp)| lp.as_ref().map(|lp| chat_logprob(text, *t, lp))).collect::<Vec<_>>()})),
                "finish_reason": finish_of(text, tools.as_deref(), c),
            }),
            Kind::Completion => json!({
                "index": i,
                "text": c.text,
                "logprobs": v.params.logprobs.map(|_| completion_logprobs(text, &c.tokens)),
                "finish_reason": c.finish,
            }),
        })
        .collect();
    let object = if kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    axum::Json(json!({
        "id": id, "object": object, "created": s.created, "model": s.name,
        "choices": out, "usage": usage,
    }))
    .into_response()
}

/// The generated text with special tokens kept (tool-call markers such as
/// `[TOOL_CALLS]` are special tokens), end-of-sequence tokens left out.
fn raw_text(text: &TextModel, c: &Choice) -> String {
    let ids: Vec<u32> = c
        .tokens
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| !text.eos_ids.contains(t))
        .collect();
    text.tokenizer.decode(&ids, false).unwrap_or_default()
}

/// The tool calls in a choice, when tools were offered.
fn calls_of(
    text: &TextModel,
    tools: Option<&ToolMode>,
    c: &Choice,
) -> Option<(Option<String>, Vec<crate::api::tools::ToolCall>)> {
    let (content, calls) = tools?.parse(&raw_text(text, c));
    (!calls.is_empty()).then_some((content, calls))
}

fn call_ids(s: &AppState, choice: usize, n: usize) -> Vec<String> {
    let base = s.id("call");
    (0..n).map(|k| format!("{base}-{choice}-{k}")).collect()
}

/// A chat choice's message: text, or tool calls (with any text before).
fn assistant_message(
    s: &AppState,
    text: &TextModel,
    tools: Option<&ToolMode>,
    c: &Choice,
    i: usize,
) -> Value {
    match calls_of(text, tools, c) {
        None => json!({"role": "assistant", "content": c.text}),
        Some((content, calls)) => json!({"role": "assistant", "content": content,
            "tool_calls": crate::api::tools::calls_json(&calls, &call_ids(s, i, calls.len()), false)}),
    }
}

/// "tool_calls" when the model called a tool and was not cut short.
fn finish_of(text: &TextModel, tools: Option<&ToolMode>, c: &Choice) -> Option<&'static str> {
    match (c.finish, calls_of(text, tools, c)) {
        (Some("stop"), Some(_)) => Some("tool_calls"),
        (f, _) => f,
    }
}

fn usage_of<'a>(
    prompt_tokens: usize,
    us: impl Iterator<Item = &'a crate::engine::Usage>,
) -> UsageOut {
    let mut u = UsageOut {
        prompt_tokens,
        ..Default::default()
    };
    for x in us {
        u.completion_tokens += x.completion_tokens;
        u.energy_joules += x.energy_joules;
    }
    u.total_tokens = u.prompt_tokens + u.completion_tokens;
    u
}

fn chat_logprob(text: &TextModel, id: u32, lp: &TokenLogprobs) -> Value {
    let entry = |t: u32, l: f32| {
        let s = text.token_text(t);
        json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
    };
    let mut e = entry(id, lp.logprob);
    e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(t, l)| entry(t, l)).collect());
    e
}

fn completion_logprobs(text: &TextModel, tokens: &[(u32, Option<TokenLogprobs>)]) -> Value {
    let mut toks = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    for (t, lp) in tokens {
        let Some(lp) = lp else { continue };
        toks.push(text.token_text(*t));
        lps.push(lp.logprob);
        let m: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(t, l)| (text.token_text(t), json!(l)))
            .collect();
        tops.push(Value::Object(m));
    }
    json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops})
}

fn stream_response(
    s: Arc<AppState>,
    rxs: Vec<UnboundedReceiver<Event>>,
    v: Validated,
    kind: Kind,
    id: String,
    prompt_len: usize,
    tools: Option<Arc<ToolMode>>,
) -> Response {
    let n = rxs.len();
    let tool_id = id.clone();
    let merged = stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |e| (i, e))
            .boxed()
    }));
    let s2 = s.clone();
    let usage_id = id.clone();
    let chunk = move |i: usize,
                      text: &str,
                      lp: Option<Value>,
                      finish: Option<&str>,
                      first: bool|
          -> SseEvent {
        let choice = match kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if !text.is_empty() || (first && finish.is_none()) {
                    delta["content"] = json!(text);
                }
                json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
            }
        };
        let object = if kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut body = json!({"id": id, "object": object, "created": s2.created, "model": s2.name, "choices": [choice]});
        if v.include_usage {
            body["usage"] = Value::Null;
        }
        SseEvent::default().data(body.to_string())
    };
    let include_usage = v.include_usage;
    let want_lp = v.params.logprobs.is_some();
    let body = async_stream::stream! {
        let mut merged = merged;
        let mut usages = vec![crate::engine::Usage::default(); n];
        let mut done = 0;
        let text = s.ready.get().map(|r| r.text.clone());
        // With tools offered, a choice's text is held until it is known
        // whether it is a tool call (sent as `tool_calls` deltas) or text.
        let mut held: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
        let holding = tools.is_some() && kind == Kind::Chat;
        if kind == Kind::Chat {
            for i in 0..n {
                yield Ok(chunk(i, "", None, None, true));
            }
        }
        while let Some((i, ev)) = merged.next().await {
            match ev {
                Event::Token { id: tok, text: t, logprobs, .. } => {
                    let lp = match (&text, logprobs, want_lp) {
                        (Some(tm), Some(lp), true) => Some(match kind {
                            Kind::Chat => json!({"content": [chat_logprob(tm, tok, &lp)]}),
                            Kind::Completion => completion_logprobs(tm, &[(tok, Some(lp))]),
                        }),
                        _ => None,
                    };
                    if holding {
                        held[i].text.push_str(&t);
                        held[i].tokens.push((tok, None));
                        if lp.is_some() {
                            yield Ok(chunk(i, "", lp, None, false));
                        }
                    } else if !t.is_empty() || lp.is_some() {
                        yield Ok(chunk(i, &t, lp, None, false));
                    }
                }
                Event::Done { text: t, finish_reason, usage } => {
                    let mut finish = finish_reason.as_str();
                    if holding && let Some(tm) = &text {
                        held[i].text.push_str(&t);
                        held[i].finish = Some(finish);
                        match calls_of(tm, tools.as_deref(), &held[i]) {
                            Some((content, calls)) => {
                                let ids: Vec<String> = (0..calls.len()).map(|k| format!("call-{tool_id}-{i}-{k}")).collect();
                                let mut delta = json!({"tool_calls": crate::api::tools::calls_json(&calls, &ids, true)});
                                if let Some(c) = content {
                                    delta["content"] = json!(c);
                                }
                                let body = json!({"id": tool_id, "object": "chat.completion.chunk", "created": s.created, "model": s.name,
                                    "choices": [{"index": i, "delta": delta, "logprobs": null, "finish_reason": null}]});
                                yield Ok(SseEvent::default().data(body.to_string()));
                                if finish == "stop" {
                                    finish = "tool_calls";
                                }
                            }
                            None => {
                                let all = std::mem::take(&mut held[i].text);
                                if !all.is_empty() {
                                    yield Ok(chunk(i, &all, None, None, false));
                                }
                            }
                        }
                    } else if !t.is_empty() {
                        yield Ok(chunk(i, &t, None, None, false));
                    }
                    yield Ok(chunk(i, "", None, Some(finish), false));
                    usages[i] = usage;
                    done += 1;
                }
                Event::Error(e) => {
                    let err = server_error(e).body();
                    yield Ok(SseEvent::default().data(err.to_string()));
                    return;
                }
            }
        }
        if done == n && include_usage {
            let u = usage_of(prompt_len, usages.iter());
            let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            let body = json!({"id": usage_id, "object": object, "created": s.created, "model": s.name, "choices": [], "usage": u});
            yield Ok(SseEvent::default().data(body.to_string()));
        }
        yield Ok(SseEvent::default().data("[DONE]"));
    };
    let body: BoxStream<'static, Result<SseEvent, Infallible>> = body.boxed();
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn authorized(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &s.admin_token else {
        return Err(ApiError {
            status: 403,
            message: "the admin API is disabled (start with --admin-token-file)".into(),
            kind: "permission_error",
            param: None,
            code: None,
        });
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison: the token is a secret.
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError {
            status: 401,
            message: "missing or wrong bearer token".into(),
            kind: "authentication_error",
            param: None,
            code: None,
        })
    }
}

fn limit_body(s: &AppState) -> Value {
    let gpu = s.gpu_limit.lock().map(|g| *g).unwrap_or(None);
    if let Some(w) = gpu {
        return json!({"watts": w, "enforcement": "nvml"});
    }
    let w = s.ready.get().and_then(|r| r.handle.limit.get());
    json!({"watts": w, "enforcement": if w.is_some() { "pacing" } else { "none" }})
}

async fn get_power_limit(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(limit_body(&s)).into_response()
}

async fn set_power_limit(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Response {
    if let Err(e) = authorized(&s, &headers) {
        return e.into_response();
    }
    let r = match ready(&s) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    #[derive(serde::Deserialize)]
    struct Body {
        watts: Option<f64>,
    }
    let b: Body = match openai::parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    match b.watts {
        Some(w) if !(w.is_finite() && w > 0.0) => {
            return ApiError::bad(
                "watts",
                format!("`watts` must be a positive number. Given: {w}"),
            )
            .into_response();
        }
        w => {
            // NVML where permitted; otherwise (no GPU, no permission, or
            // clearing the limit) the engine paces its steps.
            let via_gpu = match (w, &s.gpu) {
                (Some(w), Some(gpu)) => match gpu.set_limit(w) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "NVML refused the power limit; pacing instead");
                        false
                    }
                },
                _ => false,
            };
            if let Ok(mut g) = s.gpu_limit.lock() {
                *g = if via_gpu { w } else { None };
            }
            r.handle.limit.set(if via_gpu { None } else { w });
            s.metrics.power_limit_watts.set(w.unwrap_or(0.0));
        }
    }
    axum::Json(limit_body(&s)).into_response()
}
