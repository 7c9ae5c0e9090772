//! Tool calling: the request's `tools` and `tool_choice` checked, the
//! grammar that forces a call (`required`, a named function), and tool
//! calls read back out of generated text following the chat template's
//! convention — Llama 3.1 (a JSON object with `name` and `parameters`,
//! maybe after `<|python_tag|>`), Qwen2.5/Hermes (`<tool_call>{…}</tool_call>`)
//! or Mistral (`[TOOL_CALLS][{…}]`).

use serde_json::{Value, json};

use crate::api::openai::ApiError;
use crate::engine::constrained::Grammar;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    /// The `tools[i]` entry as given, handed to the chat template.
    pub spec: Value,
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// How a chat template expects tool calls to be written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Convention {
    Llama3Json,
    Hermes,
    Mistral,
}

/// A parsed call: the function and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

/// What a chat request asked about tools, checked.
#[derive(Debug, Clone)]
pub struct ToolMode {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    pub convention: Convention,
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `tools`: each `{"type": "function", "function": {"name",
/// "description"?, "parameters"?}}` with a name of 1–64 letters, digits,
/// `_` or `-`, and parameters that constrained decoding can enforce.
pub fn parse_tools(tools: &Value) -> Result<Vec<Tool>, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::bad("tools", "`tools` must be a list"))?;
    let mut out: Vec<Tool> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad(
                at(".type"),
                "only tools of type \"function\" are supported",
            ));
        }
        let f = t
            .get("function")
            .filter(|f| f.is_object())
            .ok_or_else(|| ApiError::bad(at(".function"), "`function` must be an object"))?;
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        if !valid_name(name) {
            return Err(ApiError::bad(
                at(".function.name"),
                format!(
                    "a function name must be 1 to 64 letters, digits, `_` or `-`. Given: {name:?}"
                ),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::bad(
                at(".function.name"),
                format!("the function name {name:?} is given twice"),
            ));
        }
        let parameters = match f.get("parameters") {
            None => json!({"type": "object", "properties": {}}),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(ApiError::bad(
                    at(".function.parameters"),
                    "`parameters` must be a JSON schema object",
                ));
            }
        };
        Grammar::from_schema(&parameters)
            .map_err(|e| ApiError::bad(at(".function.parameters"), e.to_string()))?;
        out.push(Tool {
            name: name.to_string(),
            spec: t.clone(),
            parameters,
        });
    }
    Ok(out)
}

/// Checks `tool_choice` against the tools given.
pub fn parse_choice(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let c = match choice {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(v @ Value::Object(_)) => {
            let name = v
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::bad(
                        "tool_choice",
                        "`tool_choice` as an object is {\"type\": \"function\", \"function\": {\"name\": …}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("`tool_choice` names {name:?}, which is not among `tools`"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(_) => {
            return Err(ApiError::bad(
                "tool_choice",
                "`tool_choice` must be \"none\", \"auto\", \"required\" or a named function",
            ));
        }
    };
    if matches!(c, ToolChoice::Required | ToolChoice::Auto) && tools.is_empty() {
        return Err(ApiError::bad(
            "tool_choice",
            "`tool_choice` other than \"none\" needs `tools`",
        ));
    }
    Ok(c)
}

/// The tool settings of a chat request; `None` when it offers no tools.
pub fn mode(
    req: &crate::api::openai::ChatRequest,
    template: &str,
) -> Result<Option<ToolMode>, ApiError> {
    let tools = match &req.tools {
        None | Some(Value::Null) => Vec::new(),
        Some(t) => parse_tools(t)?,
    };
    let choice = parse_choice(req.tool_choice.as_ref(), &tools)?;
    if tools.is_empty() {
        return Ok(None);
    }
    Ok(Some(ToolMode {
        tools,
        choice,
        convention: convention(template),
    }))
}

/// The convention a chat template follows, from the markers it writes.
pub fn convention(template: &str) -> Convention {
    if template.contains("<tool_call>") {
        Convention::Hermes
    } else if template.contains("[TOOL_CALLS]") {
        Convention::Mistral
    } else {
        Convention::Llama3Json
    }
}

impl ToolMode {
    /// The grammar a forced call is held to: for `required`, a JSON list
    /// of one or more `{"name", "arguments"}`; for a named function, its
    /// arguments object. `None` when the model chooses freely.
    pub fn grammar(&self) -> Result<Option<Grammar>, ApiError> {
        let g = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return Ok(None),
            ToolChoice::Required => {
                let specs: Vec<(String, Value)> = self
                    .tools
                    .iter()
                    .map(|t| (t.name.clone(), t.parameters.clone()))
                    .collect();
                Grammar::tool_calls(&specs)
            }
            ToolChoice::Named(n) => {
                let t = self.tools.iter().find(|t| &t.name == n);
                Grammar::from_schema(&t.map(|t| t.parameters.clone()).unwrap_or(Value::Null))
            }
        };
        g.map(Some)
            .map_err(|e| ApiError::bad("tools", e.to_string()))
    }

    /// Reads the generated text (special tokens kept): the content, and
    /// the tool calls, if any.
    pub fn parse(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        match &self.choice {
            ToolChoice::None => (Some(text.to_string()), Vec::new()),
            ToolChoice::Named(n) => (
                None,
                vec![ToolCall {
                    name: n.clone(),
                    arguments: text.trim().to_string(),
                }],
            ),
            ToolChoice::Required => {
                let calls = serde_json::from_str::<Value>(text.trim())
                    .ok()
                    .map(|v| self.calls_of(&v))
                    .unwrap_or_default();
                (None, calls)
            }
            ToolChoice::Auto => self.parse_free(text),
        }
    }

    fn parse_free(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let (content, calls) = match self.convention {
            Convention::Hermes => self.parse_hermes(text),
            Convention::Mistral => self.parse_mistral(text),
            Convention::Llama3Json => self.parse_llama3(text),
        };
        if calls.is_empty() {
            return (Some(text.to_string()), Vec::new());
        }
        (content.filter(|c| !c.trim().is_empty()), calls)
    }

    fn parse_hermes(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let Some(first) = text.find("<tool_call>") else {
            return (None, Vec::new());
        };
        let mut calls = Vec::new();
        for part in text[first..].split("<tool_call>").skip(1) {
            let body = part.split("</tool_call>").next().unwrap_or("");
            if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
                calls.extend(self.calls_of(&v));
            }
        }
        (Some(text[..first].trim().to_string()), calls)
    }

    fn parse_mistral(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let Some(at) = text.find("[TOOL_CALLS]") else {
            return (None, Vec::new());
        };
        let rest = text[at + "[TOOL_CALLS]".len()..].trim();
        let calls = first_json(rest)
            .map(|v| self.calls_of(&v))
            .unwrap_or_default();
        (Some(text[..at].trim().to_string()), calls)
    }

    fn parse_llama3(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let t = text.trim();
        let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
        if !t.starts_with('{') {
            return (None, Vec::new());
        }
        let calls: Vec<ToolCall> = t
            .split(';')
            .filter_map(|p| serde_json::from_str::<Value>(p.trim()).ok())
            .flat_map(|v| self.calls_of(&v))
            .collect();
        (None, calls)
    }

    /// Calls in a parsed value: one `{"name", "arguments"|"parameters"}`
    /// object or a list of them; unknown functions are not calls.
    fn calls_of(&self, v: &Value) -> Vec<ToolCall> {
        let one = |o: &Value| -> Option<ToolCall> {
            let name = o.get("name")?.as_str()?;
            if !self.tools.iter().any(|t| t.name == name) {
                return None;
            }
            let args = o
                .get("arguments")
                .or_else(|| o.get("parameters"))
                .cloned()
                .unwrap_or_else(|| json!({}));
            let arguments = match args {
                Value::String(s) => s,
                v => v.to_string(),
            };
            Some(ToolCall {
                name: name.to_string(),
                arguments,
            })
        };
        match v {
            Value::Array(a) => a.iter().filter_map(one).collect(),
            o => one(o).into_iter().collect(),
        }
    }

    /// The tools as the chat template receives them.
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools.iter().map(|t| t.spec.clone()).collect()
    }
}

/// The first JSON value at the start of `s` (text may follow it).
fn first_json(s: &str) -> Option<Value> {
    let mut it = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    it.next()?.ok()
}

/// `tool_calls` of an OpenAI message or delta; `ids` names each call.
pub fn calls_json(calls: &[ToolCall], ids: &[String], with_index: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .zip(ids)
            .enumerate()
            .map(|(i, (c, id))| {
                let mut v = json!({"id": id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}});
                if with_index {
                    v["index"] = json!(i);
                }
                v
            })
            .collect(),
    )
}

/// An assistant message's `tool_calls` as chat templates read them: the
/// OpenAI shape with `arguments` parsed into an object where it is JSON.
pub fn calls_for_template(calls: &Value) -> Value {
    let mut calls = calls.clone();
    if let Some(a) = calls.as_array_mut() {
        for c in a {
            if let Some(args) = c.pointer_mut("/function/arguments")
                && let Some(s) = args.as_str()
                && let Ok(v) = serde_json::from_str::<Value>(s)
            {
                *args = v;
            }
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(choice: ToolChoice, convention: Convention) -> ToolMode {
        let tools = parse_tools(&json!([
            {"type": "function", "function": {"name": "get_weather", "parameters":
                {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}
        ]))
        .unwrap();
        ToolMode {
            tools,
            choice,
            convention,
        }
    }

    #[test]
    fn malformed_tools_name_the_field_at_fault() {
        let bad = [
            (json!({}), "tools"),
            (json!([{"type": "retrieval"}]), "tools[0].type"),
            (json!([{"type": "function"}]), "tools[0].function"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}}]),
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": "object"}}]),
                "tools[0].function.parameters",
            ),
        ];
        for (t, param) in bad {
            let e = parse_tools(&t).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{t}: {}", e.message);
        }
        let tools = mode(ToolChoice::Auto, Convention::Hermes).tools;
        let named = json!({"type": "function", "function": {"name": "nope"}});
        assert!(parse_choice(Some(&named), &tools).is_err());
        assert!(parse_choice(Some(&json!("required")), &[]).is_err());
        assert_eq!(parse_choice(None, &tools).unwrap(), ToolChoice::Auto);
    }

    #[test]
    fn each_template_convention_is_parsed() {
        let want = vec![ToolCall {
            name: "get_weather".into(),
            arguments: r#"{"city":"Oslo"}"#.into(),
        }];
        let m = mode(ToolChoice::Auto, Convention::Hermes);
        let (c, calls) =
            m.parse("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>");
        assert_eq!((c.as_deref(), calls), (Some("Let me check."), want.clone()));
        let m = mode(ToolChoice::Auto, Convention::Mistral);
        let (c, calls) = m.parse(
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]</s>",
        );
        assert_eq!((c, calls), (None, want.clone()));
        let m = mode(ToolChoice::Auto, Convention::Llama3Json);
        let (c, calls) = m.parse(
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
        );
        assert_eq!((c, calls), (None, want));
        // Plain text, or a call to an unknown function, is content.
        let (c, calls) = m.parse("{\"name\": \"rm\", \"parameters\": {}}");
        assert!(calls.is_empty() && c.is_some());
        assert_eq!(convention("{{ '<tool_call>' }}"), Convention::Hermes);
        assert_eq!(convention("[TOOL_CALLS]"), Convention::Mistral);
    }

    #[test]
    fn forced_calls_are_read_from_the_constrained_output() {
        let m = mode(ToolChoice::Required, Convention::Hermes);
        let (_, calls) = m.parse(
            r#"[{"name":"now","arguments":{}},{"arguments":{"city":"x"},"name":"get_weather"}]"#,
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments, r#"{"city":"x"}"#);
        let m = mode(ToolChoice::Named("get_weather".into()), Convention::Hermes);
        let (content, calls) = m.parse(r#"{"city":"x"}"#);
        assert_eq!((content, calls[0].name.as_str()), (None, "get_weather"));
        assert!(m.grammar().unwrap().is_some());
    }
}
