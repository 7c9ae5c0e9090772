//! What an engine's failed answer (a 5xx) is charged. An engine that
//! refused the request did no work and costs nothing; one that streamed
//! tokens before it failed did, and is charged its usage when the answer
//! carries one, else the reservation (the bound of what it can have done).
//! Never zero once output was produced.

use serde_json::Value;

use super::sse::{self, SseFilter, UpstreamUsage};

/// The charge for a failed answer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Charge {
    /// The answer reported its usage.
    Usage(UpstreamUsage),
    /// Output was produced but its usage is unknown.
    Reservation,
    /// A plain error: the engine did no work we can see.
    Nothing,
}

/// Read a failed answer's body (`content_type` as the engine sent it).
pub fn charge_of(content_type: Option<&str>, body: &[u8]) -> Charge {
    let stream = content_type.is_some_and(|c| c.starts_with("text/event-stream"))
        || body.trim_ascii_start().starts_with(b"data:");
    if stream {
        of_stream(body)
    } else {
        of_json(body)
    }
}

fn produced(v: &Value) -> bool {
    v.get("choices")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty())
}

fn of_json(body: &[u8]) -> Charge {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Charge::Nothing;
    };
    match sse::usage_of(&v) {
        Some(u) => Charge::Usage(u),
        None if produced(&v) => Charge::Reservation,
        None => Charge::Nothing,
    }
}

fn of_stream(body: &[u8]) -> Charge {
    let mut filter = SseFilter::new(true);
    filter.push(body);
    filter.push(b"\n\n");
    if let Some(u) = filter.usage {
        return Charge::Usage(u);
    }
    let streamed = body
        .split(|b| *b == b'\n')
        .filter_map(|l| l.strip_prefix(b"data:"))
        .filter_map(|d| serde_json::from_slice::<Value>(d.trim_ascii()).ok())
        .any(|v| produced(&v));
    if streamed {
        Charge::Reservation
    } else {
        Charge::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = r#"data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    const USAGE: &str = r#"data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":6}}"#;

    #[test]
    fn a_plain_error_costs_nothing() {
        let body = br#"{"error":{"message":"out of memory","type":"server_error"}}"#;
        assert_eq!(charge_of(Some("application/json"), body), Charge::Nothing);
        assert_eq!(charge_of(None, b"Internal Server Error"), Charge::Nothing);
        assert_eq!(charge_of(Some("text/event-stream"), b""), Charge::Nothing);
    }

    #[test]
    fn a_stream_that_failed_after_its_usage_is_charged_that_usage() {
        let body = format!("{TOKEN}\n\n{TOKEN}\n\n{USAGE}\n\n");
        let want = UpstreamUsage {
            prompt_tokens: 4,
            completion_tokens: 6,
            energy_joules: 0.0,
        };
        assert_eq!(
            charge_of(Some("text/event-stream"), body.as_bytes()),
            Charge::Usage(want)
        );
    }

    #[test]
    fn a_stream_that_failed_before_its_usage_is_charged_the_reservation() {
        let body = format!("{TOKEN}\n\n{TOKEN}\n\n");
        assert_eq!(charge_of(None, body.as_bytes()), Charge::Reservation);
    }

    #[test]
    fn a_whole_answer_with_a_5xx_is_charged_its_usage_or_the_reservation() {
        let with = br#"{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert!(matches!(charge_of(None, with), Charge::Usage(_)));
        let without = br#"{"choices":[{"message":{"content":"x"}}]}"#;
        assert_eq!(charge_of(None, without), Charge::Reservation);
    }
}
