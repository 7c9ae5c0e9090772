//! Reading usage out of an upstream's responses. Streams are cut into
//! events on bytes (so a character split across network chunks is never
//! decoded half-way), and only the usage chunk is ever re-encoded: it is
//! dropped or stripped when the client did not ask for usage.

use serde_json::Value;

/// Usage as an upstream reports it (OpenAI's fields and copyhold-node's
/// `energy_joules`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub energy_joules: f64,
}

/// More tokens than one request can hold in any model's context: an
/// upstream that reports them is broken.
pub const ABSURD_TOKENS: i64 = 1 << 32;
/// More energy than a node draws in a day (10 kW for 24 h is 8.6e8 J).
pub const ABSURD_JOULES: f64 = 1e10;

/// The `usage` object of a response or chunk, if it has a usable one.
/// Negative or absurd figures are refused (and logged): the request is
/// then charged its reservation, and no sum downstream can overflow.
pub fn usage_of(v: &Value) -> Option<UpstreamUsage> {
    let u = v.get("usage")?.as_object()?;
    let prompt_tokens = u.get("prompt_tokens")?.as_i64()?;
    let completion_tokens = u.get("completion_tokens")?.as_i64()?;
    let energy = u.get("energy_joules").and_then(Value::as_f64);
    let tokens_ok = |t: i64| (0..=ABSURD_TOKENS).contains(&t);
    let energy_ok = energy.is_none_or(|e| e.is_finite() && (0.0..=ABSURD_JOULES).contains(&e));
    if !tokens_ok(prompt_tokens) || !tokens_ok(completion_tokens) || !energy_ok {
        tracing::warn!(
            prompt_tokens, completion_tokens, energy_joules = ?energy,
            "an upstream reported impossible usage; refusing it and charging the reservation"
        );
        return None;
    }
    let energy_joules = energy.unwrap_or(0.0);
    Some(UpstreamUsage {
        prompt_tokens,
        completion_tokens,
        energy_joules,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Filters an SSE stream of chat or completion chunks.
#[derive(Debug)]
pub struct SseFilter {
    buf: Vec<u8>,
    client_wants_usage: bool,
    pub usage: Option<UpstreamUsage>,
    pub saw_done: bool,
}

impl SseFilter {
    pub fn new(client_wants_usage: bool) -> Self {
        Self {
            buf: Vec::new(),
            client_wants_usage,
            usage: None,
            saw_done: false,
        }
    }

    /// Feed upstream bytes; returns the bytes to send to the client.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.buf.len());
        loop {
            let end = match (find(&self.buf, b"\n\n"), find(&self.buf, b"\r\n\r\n")) {
                (Some(a), Some(b)) if b < a => Some((b, 4)),
                (Some(a), _) => Some((a, 2)),
                (None, Some(b)) => Some((b, 4)),
                (None, None) => None,
            };
            let Some((pos, sep)) = end else { break };
            let event: Vec<u8> = self.buf.drain(..pos + sep).collect();
            self.event(&event, &mut out);
        }
        out
    }

    /// The stream ended: pass on whatever partial event is left.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let text = event
            .strip_suffix(b"\r\n\r\n")
            .or(event.strip_suffix(b"\n\n"))
            .unwrap_or(event);
        let data = text
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .find_map(|l| l.strip_prefix(b"data:"))
            .map(|d| d.strip_prefix(b" ").unwrap_or(d));
        let Some(data) = data else {
            out.extend_from_slice(event);
            return;
        };
        if data == b"[DONE]" {
            self.saw_done = true;
            out.extend_from_slice(event);
            return;
        }
        // Only a chunk with a usage object is parsed; `"usage":null` chunks
        // pass through untouched.
        if find(data, b"\"usage\"").is_none() {
            out.extend_from_slice(event);
            return;
        }
        let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
            out.extend_from_slice(event);
            return;
        };
        let Some(u) = usage_of(&v) else {
            out.extend_from_slice(event);
            return;
        };
        self.usage = Some(u);
        if self.client_wants_usage {
            out.extend_from_slice(event);
            return;
        }
        let has_choices = v
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(|c| !c.is_empty());
        if !has_choices {
            return;
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("usage");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(v.to_string().as_bytes());
        out.extend_from_slice(b"\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"h\u{e9}llo\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7,\"energy_joules\":1.5}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn usage_is_read_and_passed_on_when_asked() {
        let mut f = SseFilter::new(true);
        let out = f.push(STREAM.as_bytes());
        assert_eq!(out, STREAM.as_bytes());
        assert_eq!(
            f.usage,
            Some(UpstreamUsage {
                prompt_tokens: 5,
                completion_tokens: 2,
                energy_joules: 1.5
            })
        );
        assert!(f.saw_done);
    }

    #[test]
    fn the_usage_chunk_is_dropped_when_not_asked() {
        let mut f = SseFilter::new(false);
        let out = String::from_utf8(f.push(STREAM.as_bytes())).unwrap();
        assert!(!out.contains("prompt_tokens"));
        assert!(out.contains("h\u{e9}llo"));
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(f.usage.unwrap().completion_tokens, 2);
    }

    #[test]
    fn a_character_split_across_chunks_survives() {
        let bytes = STREAM.as_bytes();
        // Cut inside the two bytes of 'é' and everywhere else too.
        for cut in 1..bytes.len() {
            let mut f = SseFilter::new(true);
            let mut out = f.push(&bytes[..cut]);
            out.extend(f.push(&bytes[cut..]));
            out.extend(f.finish());
            assert_eq!(out, bytes, "cut at {cut}");
            assert!(f.usage.is_some());
        }
    }

    #[test]
    fn usage_riding_on_a_content_chunk_is_stripped_not_dropped() {
        let mut f = SseFilter::new(false);
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\r\n\r\n";
        let out = String::from_utf8(f.push(s.as_bytes())).unwrap();
        assert!(out.contains("\"content\":\"x\""));
        assert!(!out.contains("usage"));
        assert_eq!(f.usage.unwrap().prompt_tokens, 1);
    }

    #[test]
    fn absurd_usage_is_refused_and_never_wraps() {
        for usage in [
            r#"{"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":1}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":4611686018427387904}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":1,"energy_joules":1e300}}"#,
        ] {
            let v: Value = serde_json::from_str(usage).expect("json");
            assert_eq!(usage_of(&v), None, "{usage}");
        }
    }

    #[test]
    fn nonsense_usage_is_not_usage() {
        let v: Value =
            serde_json::from_str(r#"{"usage":{"prompt_tokens":-1,"completion_tokens":3}}"#)
                .unwrap();
        assert!(usage_of(&v).is_none());
        let v: Value =
            serde_json::from_str(r#"{"usage":{"prompt_tokens":"3","completion_tokens":3}}"#)
                .unwrap();
        assert!(usage_of(&v).is_none());
    }

    #[test]
    fn tool_call_and_structured_output_streams_are_passed_on_whole_and_metered_by_usage() {
        let s = "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":9}}\n\n\
data: [DONE]\n\n";
        let mut f = SseFilter::new(false);
        let out = String::from_utf8(f.push(s.as_bytes())).unwrap();
        assert!(out.contains("\"tool_calls\":[{\"index\":0"));
        assert!(out.contains("\"finish_reason\":\"tool_calls\""));
        assert!(!out.contains("prompt_tokens"));
        let u = f.usage.unwrap();
        assert_eq!((u.prompt_tokens, u.completion_tokens), (40, 9));
    }
}
