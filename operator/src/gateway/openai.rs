//! The OpenAI wire shapes the gateway needs: its errors, and the checks of
//! what it meters itself. A request is validated before anything is
//! reserved or forwarded, so malformed input never reaches an upstream.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An OpenAI-shaped error: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub type_: &'static str,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<i64>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        type_: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            type_,
            code,
            param: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            param,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request_error",
                message,
            )
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided. Send a member's key as `Authorization: Bearer <key>`.",
        )
    }

    /// A key two members were given: it opens for neither (see
    /// `gateway::keys`), and the quota's `Valid` condition names them.
    pub fn key_shared() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "api_key_shared",
            "This API key is given to more than one member, so it opens for none of them. Ask the quota's administrator for a key of your own.",
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: i64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                message,
            )
        }
    }

    pub fn stint_exhausted(message: impl Into<String>, retry_after: i64) -> Self {
        Self {
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "stint_exhausted",
                message,
            )
        }
    }

    pub fn unavailable(
        code: &'static str,
        message: impl Into<String>,
        retry_after: Option<i64>,
    ) -> Self {
        Self {
            retry_after,
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                code,
                message,
            )
        }
    }

    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_error",
            message,
        )
    }

    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
            message,
        )
    }

    /// A known path asked with a method it does not take.
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("this endpoint does not take {method} requests"),
        )
    }

    /// A path the gateway does not serve.
    pub fn no_such_endpoint() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "no such endpoint",
        )
    }

    /// A request body over the limit (sent once the body is drained, so
    /// the client reads it).
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// A request body that did not arrive within `--body-timeout`.
    pub fn body_timeout(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!(
                "the request body did not arrive within {} s",
                after.as_secs_f64()
            ),
        )
    }

    /// A non-streamed upstream answer larger than `--max-response-bytes`.
    pub fn response_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "upstream_response_too_large",
            format!("the model server's answer is larger than {limit} bytes; ask for a stream"),
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.type_,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert("retry-after", v);
        }
        r
    }
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// What the gateway needs to know of a request, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk of a stream.
    pub include_usage: bool,
    /// `max_tokens` as given.
    pub max_tokens: Option<i64>,
    /// Completions per prompt (`n`).
    pub n: i64,
    /// An upper bound on the prompt's tokens (all prompts of a batch, and
    /// the tools and tool calls a chat template renders).
    pub prompt_bound: i64,
    /// Prompts in the request: a batched completions request has several,
    /// and each gets `n` completions.
    pub prompts: i64,
    /// Leading prompt text, for prefix affinity.
    pub affinity_key: String,
}

/// Tokens a chat template may add around each message and in all (a default
/// system prompt included): part of the reservation's prompt bound.
pub const TEMPLATE_TOKENS_PER_MESSAGE: i64 = 8;
pub const TEMPLATE_TOKENS: i64 = 64;
/// Bytes of the prompt that choose a replica for prefix affinity.
pub const AFFINITY_BYTES: usize = 256;
/// Most completions one request may ask for.
pub const MAX_N: i64 = 16;

fn int_field(v: &Value, name: &'static str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(Some(i)),
            _ => Err(ApiError::invalid(
                Some(name),
                format!("`{name}` must be an integer from {min} to {max}, got {n}"),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            Some(name),
            format!("`{name}` must be an integer, got {}", kind(other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Text of a message's `content`: a string, or an array of parts whose
/// `text` parts count.
fn content_text(c: &Value, out: &mut String) -> Result<(), ApiError> {
    match c {
        Value::Null => Ok(()),
        Value::String(s) => {
            out.push_str(s);
            Ok(())
        }
        Value::Array(parts) => {
            for p in parts {
                match p.get("text") {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(_) => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            "a content part's `text` must be a string",
                        ));
                    }
                    None => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            "only text content parts are supported",
                        ));
                    }
                }
            }
            Ok(())
        }
        other => Err(ApiError::invalid(
            Some("messages"),
            format!(
                "a message's `content` must be a string or an array of parts, got {}",
                kind(other)
            ),
        )),
    }
}

const SCHEMA_TYPES: [&str; 7] = [
    "object", "array", "string", "number", "integer", "boolean", "null",
];

/// Why a JSON schema is malformed (`at` names the place), checked deep
/// enough that no upstream is sent a schema it must refuse.
fn schema_fault(s: &Value, at: &str, depth: usize) -> Option<String> {
    if depth > 32 {
        return Some(format!("{at}: the schema nests too deeply"));
    }
    let o = match s {
        Value::Bool(_) => return None,
        Value::Object(o) => o,
        other => {
            return Some(format!(
                "{at}: a schema must be an object, got {}",
                kind(other)
            ));
        }
    };
    let type_ok = |t: &Value| t.as_str().is_some_and(|t| SCHEMA_TYPES.contains(&t));
    match o.get("type") {
        None => {}
        Some(Value::Array(ts)) if !ts.is_empty() && ts.iter().all(type_ok) => {}
        Some(t) if type_ok(t) => {}
        Some(t) => return Some(format!("{at}.type: {t} is not a JSON schema type")),
    }
    if let Some(p) = o.get("properties") {
        let Some(p) = p.as_object() else {
            return Some(format!("{at}.properties: must be an object"));
        };
        for (k, sub) in p {
            if let Some(f) = schema_fault(sub, &format!("{at}.properties.{k}"), depth + 1) {
                return Some(f);
            }
        }
    }
    if let Some(r) = o.get("required") {
        let names = r.as_array().filter(|a| a.iter().all(Value::is_string));
        if names.is_none() {
            return Some(format!("{at}.required: must be a list of names"));
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(sub) = o.get(key)
            && let Some(f) = schema_fault(sub, &format!("{at}.{key}"), depth + 1)
        {
            return Some(f);
        }
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(v) = o.get(key) {
            let Some(a) = v.as_array().filter(|a| !a.is_empty()) else {
                return Some(format!("{at}.{key}: must be a non-empty list"));
            };
            for (i, sub) in a.iter().enumerate() {
                if let Some(f) = schema_fault(sub, &format!("{at}.{key}[{i}]"), depth + 1) {
                    return Some(f);
                }
            }
        }
    }
    if let Some(e) = o.get("enum")
        && e.as_array().is_none_or(|a| a.is_empty())
    {
        return Some(format!("{at}.enum: must be a non-empty list"));
    }
    None
}

/// Checks `tools`: `[{"type": "function", "function": {"name", "parameters"?}}]`
/// with names of 1–64 letters, digits, `_` or `-` and well-formed schemas.
fn check_tools(tools: &Value) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::invalid(Some("tools"), m));
    let Some(list) = tools.as_array() else {
        return bad(format!("`tools` must be an array, got {}", kind(tools)));
    };
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return bad(format!("tools[{i}].type must be \"function\""));
        }
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            return bad(format!("tools[{i}].function must be an object"));
        };
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        let name_ok = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return bad(format!(
                "tools[{i}].function.name must be 1 to 64 letters, digits, `_` or `-`, got {name:?}"
            ));
        }
        if let Some(p) = f.get("parameters") {
            if !p.is_object() {
                return bad(format!(
                    "tools[{i}].function.parameters must be a JSON schema object"
                ));
            }
            if let Some(fault) = schema_fault(p, &format!("tools[{i}].function.parameters"), 0) {
                return bad(fault);
            }
        }
    }
    Ok(())
}

/// Check a parsed request body for `endpoint`. `context_length` is the
/// model's longest sequence; a `max_tokens` beyond it is refused here.
pub fn check(
    endpoint: Endpoint,
    body: &Value,
    context_length: Option<i64>,
) -> Result<Checked, ApiError> {
    let obj = body
        .as_object()
        .ok_or_else(|| ApiError::invalid(None, "the request body must be a JSON object"))?;
    let model = model_field(obj)?;
    let (stream, include_usage) = stream_fields(obj)?;
    let ctx = context_length.unwrap_or(i64::from(i32::MAX));
    let max_tokens = max_tokens_field(body, ctx)?;
    let n = int_field(body, "n", 1, MAX_N)?.unwrap_or(1);
    let mut text = String::new();
    let (messages, prompts) = match endpoint {
        Endpoint::Chat => (chat_text(obj, &mut text)?, 1),
        Endpoint::Completions => {
            let p = prompt_text(obj, &mut text)?;
            (p, p)
        }
    };
    // A byte-level BPE token covers at least one byte, so bytes bound the
    // tokens of the text (tools and tool calls as the JSON a template
    // renders); templates add a bounded number around it.
    let prompt_bound = (text.len() as i64)
        .saturating_add(tool_bytes(obj))
        .saturating_add(TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * messages);
    let mut cut = AFFINITY_BYTES.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Ok(Checked {
        model,
        stream,
        include_usage,
        max_tokens,
        n,
        prompt_bound: prompt_bound.min(ctx.saturating_mul(prompts)),
        prompts,
        affinity_key: text[..cut].to_string(),
    })
}

impl Checked {
    /// Tokens the completions may add: `max_tokens` for each of the `n`
    /// completions of every prompt.
    pub fn completion_bound(&self, max_tokens: i64) -> i64 {
        max_tokens
            .saturating_mul(self.n)
            .saturating_mul(self.prompts)
    }
}

/// Fields a chat template renders besides the messages' text: `tools`
/// (and the older `functions`), and each message's tool calls and names.
fn tool_bytes(obj: &Object) -> i64 {
    let json_len = |v: &Value| serde_json::to_string(v).map_or(0, |s| s.len() as i64);
    let top: i64 = ["tools", "functions", "tool_choice"]
        .iter()
        .filter_map(|k| obj.get(*k))
        .map(json_len)
        .sum();
    let per_message: i64 = obj
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|m| {
            ["tool_calls", "function_call", "name", "tool_call_id"]
                .into_iter()
                .filter_map(|k| m.get(k))
        })
        .map(json_len)
        .sum();
    top.saturating_add(per_message)
}

type Object = serde_json::Map<String, Value>;

/// `model`: a non-empty string.
fn model_field(obj: &Object) -> Result<String, ApiError> {
    match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(ApiError::invalid(
            Some("model"),
            "you must provide a model parameter",
        )),
        Some(other) => Err(ApiError::invalid(
            Some("model"),
            format!("`model` must be a string, got {}", kind(other)),
        )),
    }
}

/// `stream` and `stream_options.include_usage`, both booleans.
fn stream_fields(obj: &Object) -> Result<(bool, bool), ApiError> {
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::invalid(
                Some("stream"),
                format!("`stream` must be a boolean, got {}", kind(other)),
            ));
        }
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("stream_options"),
                    "`stream_options.include_usage` must be a boolean",
                ));
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "`stream_options` must be an object",
            ));
        }
    };
    Ok((stream, include_usage))
}

/// `max_completion_tokens`, else `max_tokens`: at least 1, at most the
/// model's context length `ctx`.
fn max_tokens_field(body: &Value, ctx: i64) -> Result<Option<i64>, ApiError> {
    let max_tokens = match int_field(body, "max_completion_tokens", 1, i64::MAX)? {
        Some(m) => Some(m),
        None => int_field(body, "max_tokens", 1, i64::MAX)?,
    };
    if let Some(m) = max_tokens
        && m > ctx
    {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!("`max_tokens` is {m}, but this model's context length is {ctx} tokens"),
        ));
    }
    Ok(max_tokens)
}

/// The message roles of OpenAI's chat API. Anything else is refused here:
/// a chat template given a role it does not know may fail or render it in
/// ways nobody metered.
const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A chat request's `messages`: their roles and text appended to `text`.
/// Returns how many there are.
fn chat_text(obj: &Object, text: &mut String) -> Result<i64, ApiError> {
    let msgs = match obj.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must not be empty",
            ));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                Some("messages"),
                "missing required parameter: `messages`",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("`messages` must be an array, got {}", kind(other)),
            ));
        }
    };
    for m in msgs {
        let Some(mo) = m.as_object() else {
            return Err(ApiError::invalid(
                Some("messages"),
                "each message must be an object",
            ));
        };
        match mo.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => text.push_str(r),
            Some(Value::String(r)) => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!(
                        "unknown message role `{}`; expected one of {}",
                        r.chars().take(64).collect::<String>(),
                        ROLES.join(", ")
                    ),
                ));
            }
            _ => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "each message needs a string `role`",
                ));
            }
        }
        if let Some(c) = mo.get("content") {
            content_text(c, text)?;
        }
        // An assistant's earlier calls are rendered into the prompt.
        if let Some(calls) = mo.get("tool_calls").filter(|c| !c.is_null()) {
            text.push_str(&calls.to_string());
        }
    }
    // So are the tool definitions: they count toward the prompt.
    if let Some(tools) = obj.get("tools").filter(|t| !t.is_null()) {
        check_tools(tools)?;
        text.push_str(&tools.to_string());
    }
    Ok(msgs.len() as i64)
}

/// A completion request's `prompt` appended to `text` (a byte per token
/// id). Returns how many prompts it holds: a string or one array of token
/// ids is one; an array of strings or of token-id arrays is a batch.
fn prompt_text(obj: &Object, text: &mut String) -> Result<i64, ApiError> {
    let wrong = || {
        ApiError::invalid(
            Some("prompt"),
            "`prompt` must be a string, an array of strings or of token ids",
        )
    };
    let mut prompts = 1;
    match obj.get("prompt") {
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(a)) if !a.is_empty() => {
            let batched = a.iter().filter(|p| !p.is_number()).count() as i64;
            let ids = i64::from(a.iter().any(Value::is_number));
            prompts = batched + ids;
            for p in a {
                match p {
                    Value::String(s) => text.push_str(s),
                    // Token ids: each is one token; count a byte each.
                    Value::Number(_) => text.push(' '),
                    Value::Array(ids) => text.extend(ids.iter().map(|_| ' ')),
                    _ => return Err(wrong()),
                }
            }
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "missing required parameter: `prompt`",
            ));
        }
        Some(_) => return Err(wrong()),
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<Checked, ApiError> {
        check(Endpoint::Chat, &v, Some(2048))
    }

    #[test]
    fn an_unknown_message_role_is_refused_at_the_gateway() {
        let e = chat(json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}))
            .expect_err("wizard is no role");
        assert_eq!((e.status.as_u16(), e.param), (400, Some("messages")));
        assert!(e.message.contains("wizard"), "{}", e.message);
        for role in ROLES {
            chat(json!({"model": "m", "messages": [{"role": role, "content": "x"}]}))
                .unwrap_or_else(|e| panic!("{role}: {e:?}"));
        }
    }

    #[test]
    fn a_good_chat_request_is_measured() {
        let c = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 10, "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert_eq!(c.model, "m");
        assert!(c.stream && c.include_usage);
        assert_eq!(c.max_tokens, Some(10));
        assert_eq!(
            c.prompt_bound,
            4 + 5 + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE
        );
        assert_eq!(c.affinity_key, "userhello");
    }

    #[test]
    fn what_cannot_be_metered_is_refused() {
        for (body, param) in [
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4096}),
                "max_tokens",
            ),
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m"}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": 3, "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "messages",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "messages",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 100}),
                "n",
            ),
        ] {
            let e = chat(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param, Some(param), "{body}");
        }
        assert!(chat(json!([1, 2])).is_err());
    }

    #[test]
    fn completions_take_strings_or_token_ids() {
        let c = check(
            Endpoint::Completions,
            &json!({"model": "m", "prompt": [[1, 2, 3]]}),
            None,
        )
        .unwrap();
        assert_eq!(
            c.prompt_bound,
            3 + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE
        );
        assert!(
            check(
                Endpoint::Completions,
                &json!({"model": "m", "prompt": {}}),
                None
            )
            .is_err()
        );
    }

    #[test]
    fn the_affinity_key_is_cut_on_a_character_boundary() {
        let long = "é".repeat(300);
        let c =
            chat(json!({"model": "m", "messages": [{"role": "system", "content": long}]})).unwrap();
        assert!(c.affinity_key.len() <= AFFINITY_BYTES);
        assert!(c.affinity_key.starts_with("systemé"));
    }

    #[test]
    fn every_prompt_of_a_batched_completions_request_is_reserved_n_times_max_tokens() {
        let completions = |prompt: Value| {
            let body = json!({"model": "m", "prompt": prompt, "n": 2, "max_tokens": 10});
            check(Endpoint::Completions, &body, None).expect("valid")
        };
        assert_eq!(completions(json!("one")).completion_bound(10), 20);
        assert_eq!(completions(json!(["a", "b", "c"])).completion_bound(10), 60);
        assert_eq!(
            completions(json!([[1, 2], [3, 4]])).completion_bound(10),
            40
        );
        // One prompt of token ids is one prompt.
        assert_eq!(completions(json!([1, 2, 3])).completion_bound(10), 20);
    }

    #[test]
    fn tools_and_tool_calls_count_toward_the_prompt_bound() {
        // Within the test model's 2048-token context.
        let long = "x".repeat(1500);
        let tools = json!([{"type": "function", "function": {
            "name": "f", "description": long, "parameters": {"type": "object"}}}]);
        let c = chat(json!({"model": "m", "tools": tools,
            "messages": [{"role": "user", "content": "hi"}]}))
        .expect("valid");
        assert!(c.prompt_bound >= 1500, "tools: bound {}", c.prompt_bound);
        let c = chat(json!({"model": "m", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
                "type": "function", "function": {"name": "f", "arguments": long}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}))
        .expect("valid");
        assert!(
            c.prompt_bound >= 1500,
            "tool_calls: bound {}",
            c.prompt_bound
        );
    }

    #[test]
    fn errors_are_openai_shaped() {
        let e = ApiError::stint_exhausted("spent", 30);
        let b = e.body();
        assert_eq!(b["error"]["code"], "stint_exhausted");
        assert_eq!(b["error"]["type"], "insufficient_quota");
        assert!(b["error"]["param"].is_null());
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["retry-after"], "30");
    }

    #[test]
    fn a_malformed_tool_schema_is_refused_and_tools_count_toward_the_prompt() {
        let msg = json!([{"role": "user", "content": "x"}]);
        let tool = |f: Value| json!({"model": "m", "messages": msg, "tools": [{"type": "function", "function": f}]});
        for f in [
            json!({"name": "bad name"}),
            json!({"name": "f", "parameters": "object"}),
            json!({"name": "f", "parameters": {"type": "strin"}}),
            json!({"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}),
            json!({"name": "f", "parameters": {"type": "object", "required": "a"}}),
            json!({"name": "f", "parameters": {"anyOf": []}}),
        ] {
            let e = chat(tool(f.clone())).expect_err(&f.to_string());
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, Some("tools")),
                "{f}"
            );
        }
        let ok = tool(
            json!({"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": ["string", "null"]}}, "required": ["city"]}}),
        );
        let with = chat(ok.clone()).unwrap();
        let without = chat(json!({"model": "m", "messages": msg})).unwrap();
        assert!(with.prompt_bound >= without.prompt_bound + ok["tools"].to_string().len() as i64);
    }
}
