//! OpenAI request and response types, and their validation. Messages name
//! the field and the limit, so a client can fix its request from the error.

use crate::engine::constrained::Grammar;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::chat::Message;
use crate::engine::sampling::SamplingParams;
use crate::model::tokenizer::GenerationDefaults;

/// An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        serde_json::json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

/// `stop` may be one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// Chat content may be a string or a list of text parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant message's calls (OpenAI shape).
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A `tool` message's answer to a call.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// The roles a chat message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessageIn>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// Checked by `crate::api::tools` (names the entry at fault).
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "text" | "json_object" | "json_schema", …}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Parsed separately from the same object: `serde(flatten)` would
    /// lose the path of a wrongly typed field.
    #[serde(skip)]
    pub common: Common,
}

/// A completions prompt: text, a one-element list of text, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    /// Parsed separately from the same object: `serde(flatten)` would
    /// lose the path of a wrongly typed field.
    #[serde(skip)]
    pub common: Common,
}

/// Parses a JSON body into `T`, reporting the offending field as `param`.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    from_value(body_value(body)?)
}

/// Parses a request that carries the shared fields too.
pub fn parse_with_common<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<(T, Common), ApiError> {
    let v = body_value(body)?;
    Ok((from_value(v.clone())?, from_value(v)?))
}

/// The body as a JSON object.
pub fn body_value(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad("body", format!("request body is not valid UTF-8: {e}")))?;
    let value: Value = serde_json::from_str(text).map_err(|e| ApiError {
        param: None,
        code: Some("invalid_json"),
        ..ApiError::bad("", format!("request body is not valid JSON: {e}"))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad("body", "request body must be a JSON object"));
    }
    Ok(value)
}

fn from_value<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." {
            "body".to_string()
        } else {
            path
        };
        ApiError::bad(param.clone(), format!("`{param}`: {}", e.inner()))
    })
}

/// Longest stop string, in bytes. With at most [`Limits::max_stop`] of
/// them, checking a token's text against them costs a bounded few
/// microseconds on the engine thread however long the generation is.
pub const MAX_STOP_BYTES: usize = 256;

/// `max_tokens` when a request leaves it out (and `generation_config.json`
/// sets no `max_new_tokens`): bounded, so a forgotten field on a long-context
/// model does not hold a sequence (and its KV blocks) for the whole context.
pub const DEFAULT_MAX_TOKENS: usize = 1024;

/// Limits the server enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_context: usize,
    pub max_n: usize,
    pub max_top_logprobs: usize,
    pub max_stop: usize,
    /// Tokens the KV pool holds (blocks × block size): a sequence's prompt
    /// plus `max_tokens` must fit, or it could never finish.
    pub kv_tokens: usize,
    /// Rows of the embedding: token ids at or above are refused.
    pub vocab_rows: usize,
    /// `max_tokens` when the request and the checkpoint leave it out.
    pub default_max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_context: 4096,
            max_n: 8,
            max_top_logprobs: 20,
            max_stop: 4,
            kv_tokens: usize::MAX,
            vocab_rows: usize::MAX,
            default_max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

impl Limits {
    /// Longest prompt text, in bytes, that is rendered and tokenized at all:
    /// 32 bytes per token of context (no tokenizer packs more into a token
    /// of real text), at least 64 KiB. Longer text could not fit anyway.
    pub fn max_prompt_bytes(&self) -> usize {
        self.max_context.saturating_mul(32).max(64 << 10)
    }

    /// Refuses text longer than [`Limits::max_prompt_bytes`].
    pub fn check_prompt_bytes(&self, param: &str, len: usize) -> Result<(), ApiError> {
        let max = self.max_prompt_bytes();
        if len > max {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad(
                    param,
                    format!(
                        "the prompt has {len} bytes of text; at most {max} are accepted for this model's {}-token context",
                        self.max_context
                    ),
                )
            });
        }
        Ok(())
    }

    /// Refuses token ids the model has no embedding row for.
    pub fn check_token_ids(&self, param: &str, ids: &[u32]) -> Result<(), ApiError> {
        match ids.iter().find(|&&t| t as usize >= self.vocab_rows) {
            Some(bad) => Err(ApiError::bad(
                param,
                format!(
                    "token id {bad} is outside the model's vocabulary ({} embedding rows)",
                    self.vocab_rows
                ),
            )),
            None => Ok(()),
        }
    }
}

/// A validated request, ready for the engine.
#[derive(Debug, Clone)]
pub struct Validated {
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), ApiError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(ApiError::bad(
            param,
            format!("`{param}` must be between {lo} and {hi}. Given: {x}"),
        )),
        _ => Ok(()),
    }
}

/// Checks the shared fields and builds sampling settings. `prompt_len` is
/// the tokenized prompt, `prompt_param` the field it came from, and
/// `logprobs` the number of alternatives asked for (if any).
pub fn validate(
    c: &Common,
    prompt_len: usize,
    prompt_param: &str,
    logprobs: Option<i64>,
    defaults: &GenerationDefaults,
    limits: &Limits,
) -> Result<Validated, ApiError> {
    range("temperature", c.temperature, 0.0, 2.0)?;
    range("top_p", c.top_p, 0.0, 1.0)?;
    if c.top_p == Some(0.0) {
        return Err(ApiError::bad("top_p", "`top_p` must be > 0. Given: 0"));
    }
    range("min_p", c.min_p, 0.0, 1.0)?;
    range("presence_penalty", c.presence_penalty, -2.0, 2.0)?;
    range("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?;
    if let Some(r) = c.repetition_penalty
        && !(r > 0.0 && r <= 10.0)
    {
        return Err(ApiError::bad(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 10]. Given: {r}"),
        ));
    }
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("`top_k` must be -1 (off) or >= 1. Given: {k}"),
            ));
        }
    };
    let n = match c.n {
        None => 1,
        Some(n) if n >= 1 && n as usize <= limits.max_n => n as usize,
        Some(n) => {
            return Err(ApiError::bad(
                "n",
                format!("`n` must be between 1 and {}. Given: {n}", limits.max_n),
            ));
        }
    };
    if prompt_len >= limits.max_context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::bad(
                prompt_param,
                format!(
                    "the prompt has {prompt_len} tokens; this model's context is {} tokens",
                    limits.max_context
                ),
            )
        });
    }
    if prompt_len >= limits.kv_tokens {
        return Err(ApiError {
            code: Some("kv_cache_exceeded"),
            ..ApiError::bad(
                prompt_param,
                format!(
                    "the prompt has {prompt_len} tokens; this node's KV cache holds {} tokens (the context is {})",
                    limits.kv_tokens, limits.max_context
                ),
            )
        });
    }
    let room_context = limits.max_context - prompt_len;
    let room = room_context.min(limits.kv_tokens - prompt_len);
    let (mt_param, mt) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, v) => ("max_tokens", v),
    };
    let max_tokens = match mt {
        None => defaults
            .max_new_tokens
            .unwrap_or(limits.default_max_tokens)
            .clamp(1, room),
        Some(v) if v < 1 => {
            return Err(ApiError::bad(
                mt_param,
                format!("`{mt_param}` must be at least 1. Given: {v}"),
            ));
        }
        Some(v) if v as usize > room_context => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad(
                    mt_param,
                    format!(
                        "`{mt_param}` must be <= {room_context} (context {} - prompt {prompt_len}). Given: {v}",
                        limits.max_context
                    ),
                )
            });
        }
        Some(v) if v as usize > room => {
            return Err(ApiError {
                code: Some("kv_cache_exceeded"),
                ..ApiError::bad(
                    mt_param,
                    format!(
                        "`{mt_param}` must be <= {room}: this node's KV cache holds {} tokens and the prompt has {prompt_len}. Given: {v}",
                        limits.kv_tokens
                    ),
                )
            });
        }
        Some(v) => v as usize,
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > limits.max_stop {
        return Err(ApiError::bad(
            "stop",
            format!(
                "`stop` may hold at most {} strings. Given: {}",
                limits.max_stop,
                stop.len()
            ),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad(
            "stop",
            format!(
                "each stop string may have at most {MAX_STOP_BYTES} bytes. Given: {}",
                long.len()
            ),
        ));
    }
    let logprobs = match logprobs {
        None => None,
        Some(k) if k >= 0 && k as usize <= limits.max_top_logprobs => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad(
                "top_logprobs",
                format!(
                    "`top_logprobs` must be between 0 and {}. Given: {k}",
                    limits.max_top_logprobs
                ),
            ));
        }
    };
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::bad(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    Ok(Validated {
        params: SamplingParams {
            temperature: c.temperature.or(defaults.temperature).unwrap_or(1.0),
            top_p: c.top_p.or(defaults.top_p).unwrap_or(1.0),
            top_k: if c.top_k.is_some() {
                top_k
            } else {
                defaults.top_k.unwrap_or(0)
            },
            min_p: c.min_p.unwrap_or(0.0),
            seed: c.seed,
            presence_penalty: c.presence_penalty.unwrap_or(0.0),
            frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
            repetition_penalty: c
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(1.0),
            max_tokens,
            logprobs,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            constraint: None,
        },
        stop,
        n,
        stream,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// Chat messages as the template sees them (text parts joined).
pub fn messages(req: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad("messages", "`messages` must not be empty"));
    }
    req.messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::bad(
                    format!("messages[{i}].role"),
                    format!(
                        "role {:?} is not one of system, user, assistant, tool",
                        m.role
                    ),
                ));
            }
            let tool_calls = match &m.tool_calls {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) if m.role == "assistant" && !a.is_empty() => Some(
                    crate::api::tools::calls_for_template(&Value::Array(a.clone())),
                ),
                Some(_) => {
                    return Err(ApiError::bad(
                        format!("messages[{i}].tool_calls"),
                        "`tool_calls` must be a non-empty list, on an assistant message",
                    ));
                }
            };
            if m.role == "tool" && m.tool_call_id.is_none() {
                return Err(ApiError::bad(
                    format!("messages[{i}].tool_call_id"),
                    "a tool message needs `tool_call_id`",
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        if p.kind != "text" {
                            return Err(ApiError::bad(
                                format!("messages[{i}].content[{j}].type"),
                                format!(
                                    "content part type {:?} is not supported (text only)",
                                    p.kind
                                ),
                            ));
                        }
                        s.push_str(p.text.as_deref().unwrap_or(""));
                    }
                    s
                }
            };
            Ok(Message {
                role: m.role.clone(),
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

/// OpenAI `usage`, with the energy extension.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageOut {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub energy_joules: f64,
}

/// The grammar a chat request's `response_format` asks for: none for
/// `text`, any JSON object for `json_object`, the schema's language for
/// `json_schema` (strict or not: the output always validates).
pub fn response_format(v: Option<&Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::any_object())),
        Some("json_schema") => {
            let schema = v.pointer("/json_schema/schema").ok_or_else(|| {
                ApiError::bad(
                    "response_format.json_schema.schema",
                    "`json_schema` needs a `schema`",
                )
            })?;
            Grammar::from_schema(schema)
                .map(Some)
                .map_err(|e| ApiError::bad("response_format.json_schema.schema", e.to_string()))
        }
        _ => Err(ApiError::bad(
            "response_format.type",
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(body: &str, prompt_len: usize) -> Result<Validated, ApiError> {
        let c: Common = serde_json::from_str(body).unwrap();
        let limits = Limits {
            max_context: 100,
            ..Default::default()
        };
        validate(
            &c,
            prompt_len,
            "prompt",
            None,
            &GenerationDefaults::default(),
            &limits,
        )
    }

    #[test]
    fn a_wrongly_typed_field_is_reported_as_param() {
        let e = parse_with_common::<ChatRequest>(br#"{"messages": [], "temperature": "hot"}"#)
            .unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("temperature")));
        let e = parse::<ChatRequest>(br#"{"messages": [{"role": 3}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn malformed_json_and_invalid_utf8_are_400() {
        let e = parse::<ChatRequest>(b"{\"messages\": [").unwrap_err();
        assert_eq!((e.status, e.code), (400, Some("invalid_json")));
        let e = parse::<ChatRequest>(b"{\"messages\": \"\xff\"}").unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn max_tokens_zero_is_rejected_with_its_name() {
        let e = v(r#"{"max_tokens": 0}"#, 5).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("at least 1"));
    }

    #[test]
    fn a_prompt_as_long_as_the_context_is_rejected_on_the_prompt() {
        let e = v("{}", 100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = v(r#"{"max_tokens": 50}"#, 60).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(v("{}", 60).unwrap().params.max_tokens, 40);
    }

    #[test]
    fn n_too_large_and_bad_ranges_name_their_field() {
        assert_eq!(v(r#"{"n": 9}"#, 1).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(
            v(r#"{"temperature": 3}"#, 1).unwrap_err().param.as_deref(),
            Some("temperature")
        );
        assert_eq!(
            v(r#"{"top_p": 0}"#, 1).unwrap_err().param.as_deref(),
            Some("top_p")
        );
        assert_eq!(
            v(r#"{"stop": ["a","b","c","d","e"]}"#, 1)
                .unwrap_err()
                .param
                .as_deref(),
            Some("stop")
        );
    }

    #[test]
    fn the_default_max_tokens_is_bounded_on_a_long_context() {
        let c: Common = serde_json::from_str("{}").unwrap();
        let limits = Limits {
            max_context: 131_072,
            ..Default::default()
        };
        let out = validate(
            &c,
            5,
            "prompt",
            None,
            &GenerationDefaults::default(),
            &limits,
        )
        .unwrap();
        assert_eq!(out.params.max_tokens, 1024);
    }

    #[test]
    fn defaults_fill_what_the_request_leaves_out() {
        let c: Common = serde_json::from_str(r#"{"top_p": 0.5}"#).unwrap();
        let d = GenerationDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            top_k: Some(20),
            ..Default::default()
        };
        let out = validate(&c, 3, "prompt", None, &d, &Limits::default()).unwrap();
        assert_eq!(
            (out.params.temperature, out.params.top_p, out.params.top_k),
            (0.6, 0.5, 20)
        );
    }
}
