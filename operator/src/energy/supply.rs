//! Reading an EnergyBudget's supply signal: static, schedule, Prometheus,
//! HTTP JSON or a ConfigMap key. Every failure is a [`SupplyError`] whose
//! `reason()` becomes the `SupplyStale` condition's reason; the caller then
//! uses the fail-safe value (`budget::FailSafe`). Nothing here panics on
//! what the outside sends.
//!
//! A reading carries its own time: a Prometheus sample's, or a timestamp
//! the HTTP answer or the ConfigMap gives (`timestampPointer`,
//! `timestampKey`), so a signal that repeats an old value is seen as stale
//! however often it is fetched.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::energy::supply_schedule::{Schedule, ScheduleError};
use crate::resources::{EnergyBudgetSpec, HttpSupply, PrometheusQuery, SecretKeyRef};

/// A reading above this multiple of the ceiling is taken for a broken
/// signal (1 MW for a 10 kW budget), not for a very sunny day.
pub const ABSURD_FACTOR: f64 = 100.0;

/// Why the supply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SupplyError {
    #[error(
        "spec.supply names {0} signals: exactly one of static, schedule, prometheus, http or configMap is needed"
    )]
    Signals(usize),
    #[error("{0}")]
    Schedule(#[from] ScheduleError),
    #[error("{url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url} answered HTTP {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("{source_}: {message}")]
    NotNumeric { source_: String, message: String },
    #[error("{source_}: the query returned no sample")]
    NoSample { source_: String },
    #[error("{source_}: {watts} W is negative")]
    Negative { source_: String, watts: f64 },
    #[error("{source_}: {watts} W is absurd for a ceiling of {ceiling} W (over {ABSURD_FACTOR}×)")]
    Absurd {
        source_: String,
        watts: f64,
        ceiling: f64,
    },
    #[error("ConfigMap {namespace}/{name}: {message}")]
    ConfigMap {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("{source_}: the reading's timestamp {message}")]
    BadTimestamp { source_: String, message: String },
    #[error("Secret {namespace}/{name}: {message}")]
    Secret {
        namespace: String,
        name: String,
        message: String,
    },
}

impl SupplyError {
    /// CamelCase reason for the `SupplyStale` condition and its Event.
    pub fn reason(&self) -> &'static str {
        match self {
            SupplyError::Signals(_) => "NoSingleSignal",
            SupplyError::Schedule(e) => e.reason(),
            SupplyError::Unreachable { .. } => "Unreachable",
            SupplyError::HttpStatus { .. } => "HTTPError",
            SupplyError::NotNumeric { .. } => "NotNumeric",
            SupplyError::NoSample { .. } => "NoSample",
            SupplyError::Negative { .. } => "NegativeReading",
            SupplyError::Absurd { .. } => "AbsurdReading",
            SupplyError::ConfigMap { .. } => "ConfigMapUnreadable",
            SupplyError::Secret { .. } => "SecretUnreadable",
            SupplyError::BadTimestamp { .. } => "BadTimestamp",
        }
    }
}

/// Samples of a Prometheus answer: each series' labels and value.
pub type Samples = Vec<(serde_json::Map<String, serde_json::Value>, f64)>;

/// Samples of a Prometheus answer with each sample's own time.
pub type TimedSamples = Vec<(serde_json::Map<String, serde_json::Value>, f64, Timestamp)>;

/// A supply reading and when it was taken (by the source's own clock,
/// never later than now).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub watts: f64,
    pub at: Timestamp,
}

/// A reading's time from JSON: seconds since the epoch (a number or a
/// numeric string, as Prometheus gives them) or an RFC 3339 text. A time
/// ahead of `now` (a skewed clock) counts as `now`.
pub fn reading_time(
    source: &str,
    v: &serde_json::Value,
    now: Timestamp,
) -> Result<Timestamp, SupplyError> {
    let bad = |message: String| SupplyError::BadTimestamp {
        source_: source.into(),
        message,
    };
    let seconds = |s: f64| {
        if !s.is_finite() {
            return Err(bad(format!("{s} is not a time")));
        }
        // Nanoseconds fit an i128 for any f64 a clock could mean.
        let nanos = (s * 1e9) as i128;
        Timestamp::from_nanosecond(nanos).map_err(|e| bad(format!("{s}: {e}")))
    };
    let at = match v {
        serde_json::Value::Number(n) => seconds(n.as_f64().unwrap_or(f64::NAN))?,
        serde_json::Value::String(t) => match t.trim().parse::<f64>() {
            Ok(s) => seconds(s)?,
            Err(_) => t.trim().parse::<Timestamp>().map_err(|e| {
                bad(format!(
                    "{:?} is neither RFC 3339 nor seconds since the epoch: {e}",
                    truncate(t)
                ))
            })?,
        },
        other => {
            return Err(bad(format!(
                "{} is not a time",
                truncate(&other.to_string())
            )));
        }
    };
    Ok(at.min(now))
}

/// Check a reading: finite, not negative, not absurd for the ceiling.
pub fn sane(source: &str, watts: f64, ceiling: f64) -> Result<f64, SupplyError> {
    if !watts.is_finite() {
        return Err(SupplyError::NotNumeric {
            source_: source.into(),
            message: format!("{watts} is not a finite number"),
        });
    }
    if watts < 0.0 {
        return Err(SupplyError::Negative {
            source_: source.into(),
            watts,
        });
    }
    if watts > ceiling * ABSURD_FACTOR {
        return Err(SupplyError::Absurd {
            source_: source.into(),
            watts,
            ceiling,
        });
    }
    Ok(watts)
}

/// A ConfigMap key's text as watts: a number (surrounding blanks ignored),
/// checked like every reading; anything else is `NotNumeric`.
pub fn config_map_watts(source: &str, text: &str, ceiling: f64) -> Result<f64, SupplyError> {
    let w: f64 = text.trim().parse().map_err(|_| SupplyError::NotNumeric {
        source_: source.into(),
        message: format!("{:?} is not a number", truncate(text)),
    })?;
    sane(source, w, ceiling)
}

/// Parse a number given as a JSON number or a numeric string.
fn number(source: &str, v: &serde_json::Value) -> Result<f64, SupplyError> {
    match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or_else(|| SupplyError::NotNumeric {
            source_: source.into(),
            message: format!("{n} is not a number"),
        }),
        serde_json::Value::String(s) => {
            s.trim()
                .parse::<f64>()
                .map_err(|_| SupplyError::NotNumeric {
                    source_: source.into(),
                    message: format!("{s:?} is not a number"),
                })
        }
        other => Err(SupplyError::NotNumeric {
            source_: source.into(),
            message: format!("{} is not a number", truncate(&other.to_string())),
        }),
    }
}

fn truncate(s: &str) -> String {
    if s.len() > 120 {
        let mut end = 120;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s.to_string()
    }
}

/// Read the supply at `now`, in watts, checked by [`sane`], with the time
/// the reading was taken (`now` for static and schedule signals, and for
/// HTTP and ConfigMap signals that give no timestamp).
pub async fn read(
    spec: &EnergyBudgetSpec,
    now: Timestamp,
    client: &Client,
    http: &reqwest::Client,
) -> Result<Reading, SupplyError> {
    let s = &spec.supply;
    let count = [
        s.static_.is_some(),
        s.schedule.is_some(),
        s.prometheus.is_some(),
        s.http.is_some(),
        s.config_map.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if count != 1 {
        return Err(SupplyError::Signals(count));
    }
    let ceiling = spec.ceiling_watts;
    let now_reading = |watts| Reading { watts, at: now };
    if let Some(st) = &s.static_ {
        return sane("static", st.watts, ceiling).map(now_reading);
    }
    if let Some(sch) = &s.schedule {
        let schedule = Schedule::new(sch)?;
        return sane("schedule", schedule.watts_at(now), ceiling).map(now_reading);
    }
    if let Some(q) = &s.prometheus {
        let source = format!("prometheus {}", q.url);
        let samples = parse_prometheus_timed(&source, &prometheus_answer(http, q).await?, now)?;
        // Several series (e.g. one per inverter) add up; the sum is as old
        // as its oldest sample.
        let Some(at) = samples.iter().map(|s| s.2).min() else {
            return Err(SupplyError::NoSample { source_: source });
        };
        let total: f64 = samples.iter().map(|s| s.1).sum();
        return Ok(Reading {
            watts: sane(&source, total, ceiling)?,
            at,
        });
    }
    if let Some(h) = &s.http {
        let (w, at) = http_json(client, http, h, now).await?;
        return Ok(Reading {
            watts: sane(&h.url, w, ceiling)?,
            at,
        });
    }
    if let Some(cm) = &s.config_map {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &cm.namespace);
        let err = |message: String| SupplyError::ConfigMap {
            namespace: cm.namespace.clone(),
            name: cm.name.clone(),
            message,
        };
        let obj = api.get(&cm.name).await.map_err(|e| err(e.to_string()))?;
        let text = obj
            .data
            .as_ref()
            .and_then(|d| d.get(&cm.key))
            .ok_or_else(|| err(format!("has no key `{}`", cm.key)))?;
        let source = format!("configMap {}/{} key `{}`", cm.namespace, cm.name, cm.key);
        let at = match &cm.timestamp_key {
            None => now,
            Some(key) => {
                let t = obj
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .ok_or_else(|| err(format!("has no key `{key}` (its timestampKey)")))?;
                reading_time(&source, &serde_json::Value::String(t.clone()), now)?
            }
        };
        return Ok(Reading {
            watts: config_map_watts(&source, text, ceiling)?,
            at,
        });
    }
    Err(SupplyError::Signals(0))
}

/// Run a PromQL instant query; return each sample's labels and value.
pub async fn prometheus_query(
    http: &reqwest::Client,
    q: &PrometheusQuery,
) -> Result<Samples, SupplyError> {
    let source = format!("prometheus {}", q.url);
    parse_prometheus(&source, &prometheus_answer(http, q).await?)
}

/// The JSON answer of a PromQL instant query.
async fn prometheus_answer(
    http: &reqwest::Client,
    q: &PrometheusQuery,
) -> Result<serde_json::Value, SupplyError> {
    let url = format!("{}/api/v1/query", q.url.trim_end_matches('/'));
    let source = format!("prometheus {}", q.url);
    let resp = http
        .get(&url)
        .query(&[("query", q.query.as_str())])
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| SupplyError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
    if !resp.status().is_success() {
        return Err(SupplyError::HttpStatus {
            url,
            status: resp.status().as_u16(),
        });
    }
    resp.json().await.map_err(|e| SupplyError::NotNumeric {
        source_: source.clone(),
        message: format!("the answer is not JSON: {e}"),
    })
}

/// Samples of a Prometheus `/api/v1/query` answer (vector or scalar).
pub fn parse_prometheus(source: &str, body: &serde_json::Value) -> Result<Samples, SupplyError> {
    let now = Timestamp::now();
    Ok(parse_prometheus_timed(source, body, now)?
        .into_iter()
        .map(|(labels, w, _)| (labels, w))
        .collect())
}

/// Samples of a Prometheus answer with each sample's own time (`[time,
/// value]`; a time ahead of `now` counts as `now`).
pub fn parse_prometheus_timed(
    source: &str,
    body: &serde_json::Value,
    now: Timestamp,
) -> Result<TimedSamples, SupplyError> {
    let bad = |message: &str| SupplyError::NotNumeric {
        source_: source.into(),
        message: message.into(),
    };
    if body.get("status").and_then(|s| s.as_str()) != Some("success") {
        let why = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("status is not success");
        return Err(bad(&format!("query failed: {}", truncate(why))));
    }
    let data = body.get("data").ok_or_else(|| bad("no `data`"))?;
    let value_of = |v: &serde_json::Value| -> Result<(f64, Timestamp), SupplyError> {
        let s = v.get(1).ok_or_else(|| bad("a sample has no value"))?;
        let t = v.get(0).ok_or_else(|| bad("a sample has no time"))?;
        Ok((number(source, s)?, reading_time(source, t, now)?))
    };
    match data.get("resultType").and_then(|t| t.as_str()) {
        Some("scalar") => {
            let r = data.get("result").ok_or_else(|| bad("no `result`"))?;
            let (w, at) = value_of(r)?;
            Ok(vec![(serde_json::Map::new(), w, at)])
        }
        Some("vector") => {
            let items = data
                .get("result")
                .and_then(|r| r.as_array())
                .ok_or_else(|| bad("`result` is not a list"))?;
            items
                .iter()
                .map(|i| {
                    let labels = i
                        .get("metric")
                        .and_then(|m| m.as_object())
                        .cloned()
                        .unwrap_or_default();
                    let v = i.get("value").ok_or_else(|| bad("a sample has no value"))?;
                    let (w, at) = value_of(v)?;
                    Ok((labels, w, at))
                })
                .collect()
        }
        other => Err(bad(&format!(
            "result type {other:?} is not a vector or scalar"
        ))),
    }
}

/// The watts an HTTP JSON source gives, and when (its `timestampPointer`,
/// else `now`).
async fn http_json(
    client: &Client,
    http: &reqwest::Client,
    h: &HttpSupply,
    now: Timestamp,
) -> Result<(f64, Timestamp), SupplyError> {
    let mut req = http.get(&h.url).timeout(Duration::from_secs(10));
    if let Some(secret) = &h.bearer_token_secret {
        req = req.bearer_auth(read_secret(client, secret, None).await?);
    }
    let resp = req.send().await.map_err(|e| SupplyError::Unreachable {
        url: h.url.clone(),
        message: e.to_string(),
    })?;
    if !resp.status().is_success() {
        return Err(SupplyError::HttpStatus {
            url: h.url.clone(),
            status: resp.status().as_u16(),
        });
    }
    let body: serde_json::Value = resp.json().await.map_err(|e| SupplyError::NotNumeric {
        source_: h.url.clone(),
        message: format!("the answer is not JSON: {e}"),
    })?;
    let watts = json_watts(&h.url, &body, &h.json_pointer, h.scale)?;
    let at = match &h.timestamp_pointer {
        None => now,
        Some(pointer) => {
            let v = body
                .pointer(pointer)
                .ok_or_else(|| SupplyError::BadTimestamp {
                    source_: h.url.clone(),
                    message: format!("is missing: nothing at JSON pointer `{pointer}`"),
                })?;
            reading_time(&h.url, v, now)?
        }
    };
    Ok((watts, at))
}

/// The value at `pointer` in `body`, times `scale`.
pub fn json_watts(
    source: &str,
    body: &serde_json::Value,
    pointer: &str,
    scale: f64,
) -> Result<f64, SupplyError> {
    let v = body
        .pointer(pointer)
        .ok_or_else(|| SupplyError::NotNumeric {
            source_: source.into(),
            message: format!("nothing at JSON pointer `{pointer}`"),
        })?;
    Ok(number(source, v)? * scale)
}

/// The trimmed text of a Secret key. `default_ns` is used when the
/// reference names no namespace (a cluster-scoped referrer has none).
pub async fn read_secret(
    client: &Client,
    r: &SecretKeyRef,
    default_ns: Option<&str>,
) -> Result<String, SupplyError> {
    let ns = r.namespace.as_deref().or(default_ns).unwrap_or_default();
    let err = |message: String| SupplyError::Secret {
        namespace: ns.to_string(),
        name: r.name.clone(),
        message,
    };
    if ns.is_empty() {
        return Err(err(
            "names no namespace (required for a cluster-scoped EnergyBudget)".into(),
        ));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get(&r.name).await.map_err(|e| err(e.to_string()))?;
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .ok_or_else(|| err(format!("has no key `{}`", r.key)))?;
    String::from_utf8(bytes.0.clone())
        .map(|t| t.trim().to_string())
        .map_err(|_| err(format!("key `{}` is not UTF-8", r.key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_map_text_is_read_as_watts_and_refused_by_name() {
        assert_eq!(config_map_watts("cm", " 650\n", 10_000.0).ok(), Some(650.0));
        assert_eq!(config_map_watts("cm", "1.5e3", 10_000.0).ok(), Some(1500.0));
        for bad in ["lots", "", "650 W", "NaN"] {
            assert_eq!(
                config_map_watts("cm", bad, 10_000.0)
                    .map_err(|e| e.reason())
                    .err(),
                Some("NotNumeric"),
                "{bad:?}"
            );
        }
        assert_eq!(
            config_map_watts("cm", "-5", 10_000.0)
                .map_err(|e| e.reason())
                .err(),
            Some("NegativeReading")
        );
        assert_eq!(
            config_map_watts("cm", "2000000", 10_000.0)
                .map_err(|e| e.reason())
                .err(),
            Some("AbsurdReading")
        );
    }

    #[test]
    fn negative_absurd_and_non_finite_readings_are_refused_by_name() {
        assert_eq!(sane("x", 500.0, 10_000.0).ok(), Some(500.0));
        assert_eq!(
            sane("x", -1.0, 10_000.0).map_err(|e| e.reason()).err(),
            Some("NegativeReading")
        );
        let e = sane("inverter", 1_000_001.0, 10_000.0).expect_err("absurd");
        assert_eq!(e.reason(), "AbsurdReading");
        assert!(e.to_string().contains("inverter"), "{e}");
        assert_eq!(
            sane("x", f64::NAN, 1.0).map_err(|e| e.reason()).err(),
            Some("NotNumeric")
        );
    }

    #[test]
    fn a_json_pointer_and_scale_give_watts() {
        let body = json!({"site": {"pv_power": 2.5, "text": "1.5", "bad": "sunny"}});
        assert_eq!(
            json_watts("u", &body, "/site/pv_power", 1000.0).ok(),
            Some(2500.0)
        );
        assert_eq!(json_watts("u", &body, "/site/text", 1.0).ok(), Some(1.5));
        let e = json_watts("u", &body, "/site/bad", 1.0).expect_err("not a number");
        assert_eq!(e.reason(), "NotNumeric");
        assert!(e.to_string().contains("sunny"), "{e}");
        let e = json_watts("u", &body, "/nope", 1.0).expect_err("missing");
        assert!(e.to_string().contains("/nope"), "{e}");
    }

    #[test]
    fn a_reading_time_is_read_from_seconds_or_rfc_3339_and_never_lies_ahead() {
        let now: Timestamp = "2026-06-01T12:00:00Z".parse().expect("time");
        let t = |v: serde_json::Value| reading_time("s", &v, now);
        let hour_ago: Timestamp = "2026-06-01T11:00:00Z".parse().expect("time");
        assert_eq!(t(json!(hour_ago.as_second())).ok(), Some(hour_ago));
        assert_eq!(
            t(json!(hour_ago.as_second().to_string())).ok(),
            Some(hour_ago)
        );
        assert_eq!(t(json!("2026-06-01T13:00:00+02:00")).ok(), Some(hour_ago));
        assert_eq!(t(json!("2099-01-01T00:00:00Z")).ok(), Some(now), "skew");
        for bad in [json!("yesterday"), json!(null), json!([1])] {
            assert_eq!(
                t(bad.clone()).map_err(|e| e.reason()).err(),
                Some("BadTimestamp"),
                "{bad}"
            );
        }
    }

    #[test]
    fn prometheus_samples_carry_their_own_time() {
        let now: Timestamp = "2026-06-01T12:00:00Z".parse().expect("time");
        let v = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [1780311600.5, "120"]}]}});
        let s = parse_prometheus_timed("p", &v, now).expect("parses");
        assert_eq!(s[0].2.as_millisecond(), 1_780_311_600_500);
    }

    #[test]
    fn prometheus_vectors_and_scalars_are_read() {
        let v = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"Hostname": "gpu-a"}, "value": [1.0, "120.5"]},
            {"metric": {"Hostname": "gpu-b"}, "value": [1.0, "80"]}
        ]}});
        let s = parse_prometheus("p", &v).expect("parses");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1, 120.5);
        assert_eq!(s[0].0["Hostname"], "gpu-a");
        let sc =
            json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "42"]}});
        assert_eq!(parse_prometheus("p", &sc).expect("parses")[0].1, 42.0);
        let err = json!({"status": "error", "error": "parse error"});
        assert!(parse_prometheus("p", &err).is_err());
        let nan = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [1.0, "many"]}]}});
        assert_eq!(
            parse_prometheus("p", &nan).map_err(|e| e.reason()).err(),
            Some("NotNumeric")
        );
    }
}
