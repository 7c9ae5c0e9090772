//! Chat templates as HF writes them (Jinja), rendered with minijinja plus
//! the helpers HF templates call: `raise_exception`, `tojson`, Python string
//! methods (`.strip()`, `.startswith()`…), `bos_token`, `eos_token`,
//! `add_generation_prompt`.

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message as the template sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant's calls, OpenAI-shaped with `arguments` parsed (as HF
    /// templates read them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool result's call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Renders `template` for `messages`.
pub fn render(
    template: &str,
    messages: &[Message],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    add_generation_prompt: bool,
) -> Result<String> {
    render_with_tools(
        template,
        messages,
        None,
        bos_token,
        eos_token,
        add_generation_prompt,
    )
}

/// Renders `template` for `messages`, with the request's `tools` (as HF's
/// `apply_chat_template(tools=…)` passes them) when there are any.
pub fn render_with_tools(
    template: &str,
    messages: &[Message],
    tools: Option<&[serde_json::Value]>,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |_fmt: String| -> String {
        // Deterministic output matters more than the date for a model node.
        String::new()
    });
    let mut ctx = serde_json::json!({
        "messages": messages,
        "bos_token": bos_token.unwrap_or(""),
        "eos_token": eos_token.unwrap_or(""),
        "add_generation_prompt": add_generation_prompt,
    });
    if let Some(t) = tools.filter(|t| !t.is_empty()) {
        ctx["tools"] = serde_json::Value::from(t.to_vec());
    }
    env.render_str(template, Value::from(minijinja::value::Serde(&ctx)))
        .map_err(|e| Error::Template(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<Message> {
        vec![
            Message {
                role: "system".into(),
                content: " Be brief. ".into(),
                ..Default::default()
            },
            Message {
                role: "user".into(),
                content: "Hi \"there\"".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn generation_prompt_is_added_only_when_asked() {
        let t = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";
        let with = render(t, &msgs(), Some("<s>"), Some("</s>"), true).unwrap();
        assert_eq!(
            with,
            "<s>[system] Be brief. </s>[user]Hi \"there\"</s>[assistant]"
        );
        let without = render(t, &msgs(), Some("<s>"), Some("</s>"), false).unwrap();
        assert!(!without.ends_with("[assistant]"));
    }

    #[test]
    fn python_string_methods_and_tojson_work() {
        let t = "{{ messages[0].content.strip() }}|{{ messages[1].content | tojson }}|{{ messages[0].role.startswith('sys') }}";
        let out = render(t, &msgs(), None, None, false).unwrap();
        assert_eq!(out, "Be brief.|\"Hi \\\"there\\\"\"|True");
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let e = render(t, &msgs(), None, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Conversation must start with user"), "{e}");
    }

    #[test]
    fn tools_and_tool_messages_reach_the_template() {
        // The shape of Qwen2.5's template, cut down.
        let t = "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}{% for m in messages %}{% if m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>{% elif m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let msgs = vec![
            Message {
                role: "assistant".into(),
                tool_calls: Some(serde_json::json!([{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": {"x": 1}}}])),
                ..Default::default()
            },
            Message {
                role: "tool".into(),
                content: "42".into(),
                tool_call_id: Some("c1".into()),
                ..Default::default()
            },
        ];
        let tools = [serde_json::json!({"type": "function", "function": {"name": "f"}})];
        let out = render_with_tools(t, &msgs, Some(&tools), None, None, false).unwrap();
        assert_eq!(
            out,
            "<tools>f;</tools><tool_call>f {\"x\": 1}</tool_call><tool_response>42</tool_response>"
        );
    }
}
