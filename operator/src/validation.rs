//! Checks the API server's OpenAPI schema cannot express (cross-field rules,
//! time zones, durations). The controller reports failures as a condition and
//! an Event; `copyhold validate` runs the same checks on files before apply.
//!
//! Messages name the field path the way the API server does, so a person sees
//! one style whichever side refused.

use std::collections::BTreeSet;
use std::path::Path;

use jiff::tz::TimeZone;
use serde::Deserialize;

use crate::resources::quantity::{self, Quantity};
use crate::resources::{
    EnergyBudgetSpec, ModelDeploymentSpec, PeriodType, SchedulePoint, StintQuotaSpec,
    parse_duration,
};

/// Validate a ModelDeployment spec; an empty list means valid.
pub fn model_deployment(spec: &ModelDeploymentSpec) -> Vec<String> {
    let mut errs = Vec::new();
    let src = &spec.model.source;
    let sources = [
        src.host_path.is_some(),
        src.pvc.is_some(),
        src.http.is_some(),
        src.oci.is_some(),
        src.hugging_face.is_some(),
    ];
    match sources.iter().filter(|s| **s).count() {
        0 => errs.push("spec.model.source: Required value: one of hostPath, pvc, http, oci or huggingFace".to_string()),
        1 => {}
        n => errs.push(format!("spec.model.source: Invalid value: {n} sources given, exactly one of hostPath, pvc, http, oci or huggingFace is allowed")),
    }
    if let Some(a) = &spec.autoscaling {
        if a.min_replicas > a.max_replicas {
            errs.push(format!(
                "spec.autoscaling.minReplicas: Invalid value: {}: must not exceed maxReplicas ({})",
                a.min_replicas, a.max_replicas
            ));
        } else if spec.replicas < a.min_replicas || spec.replicas > a.max_replicas {
            errs.push(format!(
                "spec.replicas: Invalid value: {}: must lie between autoscaling.minReplicas ({}) and maxReplicas ({})",
                spec.replicas, a.min_replicas, a.max_replicas
            ));
        }
        let durations = [
            ("scaleDownStabilization", Some(&a.scale_down_stabilization)),
            ("scaleFromZeroTimeout", Some(&a.scale_from_zero_timeout)),
            ("scaleToZeroAfter", a.scale_to_zero_after.as_ref()),
        ];
        for (field, value) in durations {
            if let Some(Err(e)) = value.map(|v| crate::resources::parse_duration(v)) {
                errs.push(format!("spec.autoscaling.{field}: Invalid value: {e}"));
            }
        }
    }
    if let Some(q) = &spec.serving.kv_cache_memory {
        match quantity::bytes(&q.0) {
            Ok(b) if b > 0 => {}
            Ok(_) => errs.push(format!(
                "spec.serving.kvCacheMemory: Invalid value: \"{}\": must be positive",
                q.0
            )),
            Err(e) => errs.push(format!("spec.serving.kvCacheMemory: Invalid value: {e}")),
        }
    }
    resource_quantities(spec, &mut errs);
    if let Some(s) = &spec.model.sizing {
        if let Some(q) = &s.weight_bytes
            && let Err(e) = quantity::bytes(&q.0)
        {
            errs.push(format!("spec.model.sizing.weightBytes: Invalid value: {e}"));
        }
        let arch = s.num_layers.is_some() && s.num_kv_heads.is_some() && s.head_dim.is_some();
        if s.kv_bytes_per_token.is_none() && !arch {
            errs.push(
                "spec.model.sizing: Required value: kvBytesPerToken, or numLayers, numKvHeads and headDim".to_string(),
            );
        }
        if s.weight_bytes.is_none() {
            errs.push(
                "spec.model.sizing.weightBytes: Required value: weight bytes of the model"
                    .to_string(),
            );
        }
    }
    let mut seen = BTreeSet::new();
    for p in &spec.placement.gpu_products {
        if !seen.insert(p) {
            errs.push(format!(
                "spec.placement.gpuProducts: Duplicate value: \"{p}\""
            ));
        }
    }
    errs
}

/// The engine's requests and limits go into its Deployment as they are:
/// one the API server cannot read would fail every apply.
fn resource_quantities(spec: &ModelDeploymentSpec, errs: &mut Vec<String>) {
    let Some(r) = &spec.serving.resources else {
        return;
    };
    for (field, map) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (name, q) in map.iter().flatten() {
            if let Err(e) = Quantity::parse(&q.0) {
                errs.push(format!(
                    "spec.serving.resources.{field}[{name}]: Invalid value: {e}"
                ));
            }
        }
    }
}

/// Validate an EnergyBudget spec.
pub fn energy_budget(spec: &EnergyBudgetSpec) -> Vec<String> {
    let mut errs = Vec::new();
    let s = &spec.supply;
    let n = [
        s.static_.is_some(),
        s.schedule.is_some(),
        s.prometheus.is_some(),
        s.http.is_some(),
        s.config_map.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if n != 1 {
        errs.push(format!(
            "spec.supply: Invalid value: {n} signals given: exactly one of static, schedule, prometheus, http or configMap is required"
        ));
    }
    for (field, value) in [
        ("spec.supply.maxAge", &s.max_age),
        ("spec.supply.failSafeDecay", &s.fail_safe_decay),
        ("spec.policy.dwell", &spec.policy.dwell),
        ("spec.evaluationInterval", &spec.evaluation_interval),
    ] {
        if let Err(e) = parse_duration(value) {
            errs.push(format!("{field}: Invalid value: {e}"));
        }
    }
    if let Some(sch) = &s.schedule {
        if let Err(e) = time_zone(&sch.time_zone) {
            errs.push(format!("spec.supply.schedule.timeZone: {e}"));
        }
        check_points("spec.supply.schedule.points", &sch.points, &mut errs);
        let mut months = BTreeSet::new();
        for (i, c) in sch.months.iter().enumerate() {
            check_points(
                &format!("spec.supply.schedule.months[{i}].points"),
                &c.points,
                &mut errs,
            );
            for m in &c.months {
                if !months.insert(m.0) {
                    errs.push(format!(
                        "spec.supply.schedule.months[{i}].months: Duplicate value: month {} already has a curve",
                        m.0
                    ));
                }
            }
        }
    }
    if s.floor_watts > spec.ceiling_watts {
        errs.push(format!(
            "spec.supply.floorWatts: Invalid value: {}: must not exceed ceilingWatts ({})",
            s.floor_watts, spec.ceiling_watts
        ));
    }
    let mut shed = BTreeSet::new();
    for p in &spec.policy.shed {
        if !shed.insert(format!("{p:?}")) {
            errs.push(format!("spec.policy.shed: Duplicate value: {p:?}"));
        }
    }
    if spec.policy.shed.len() == 2
        && spec.policy.shed[0] != crate::resources::SheddablePriority::Deferrable
    {
        errs.push(
            "spec.policy.shed: Invalid value: deferrable must be shed before standard".to_string(),
        );
    }
    errs
}

fn check_points(field: &str, points: &[SchedulePoint], errs: &mut Vec<String>) {
    let mut last: Option<u32> = None;
    for (i, p) in points.iter().enumerate() {
        match minutes_of_day(&p.time) {
            Some(m) => {
                if let Some(l) = last
                    && m <= l
                {
                    errs.push(format!(
                        "{field}[{i}].time: Invalid value: \"{}\": times must be strictly increasing",
                        p.time
                    ));
                }
                last = Some(m);
            }
            None => errs.push(format!(
                "{field}[{i}].time: Invalid value: \"{}\": must be HH:MM",
                p.time
            )),
        }
    }
}

/// Minutes since midnight of an `HH:MM` time.
pub fn minutes_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

/// Validate a StintQuota spec.
pub fn stint_quota(spec: &StintQuotaSpec) -> Vec<String> {
    let mut errs = Vec::new();
    let p = &spec.period;
    match p.type_ {
        PeriodType::Rolling => match &p.window {
            None => errs.push(
                "spec.period.window: Required value: a rolling period needs a window, e.g. 24h"
                    .into(),
            ),
            Some(w) => match parse_duration(w) {
                Ok(d) if d.as_secs() >= 60 => {}
                Ok(_) => errs.push(format!(
                    "spec.period.window: Invalid value: \"{w}\": must be at least 1m"
                )),
                Err(e) => errs.push(format!("spec.period.window: Invalid value: {e}")),
            },
        },
        PeriodType::Calendar => {
            if p.unit.is_none() {
                errs.push("spec.period.unit: Required value: a calendar period needs a unit (day, week or month)".into());
            }
        }
    }
    if let Err(e) = time_zone(&p.time_zone) {
        errs.push(format!("spec.period.timeZone: {e}"));
    }
    let mut names = BTreeSet::new();
    for (i, m) in spec.members.iter().enumerate() {
        if !names.insert(m.name.as_str()) {
            errs.push(format!(
                "spec.members[{i}].name: Duplicate value: \"{}\"",
                m.name
            ));
        }
        if m.stint.is_none() && spec.pool.is_none() {
            errs.push(format!(
                "spec.members[{i}]: Required value: member \"{}\" has no stint and the quota has no pool to share",
                m.name
            ));
        }
    }
    let s = &spec.sanctions;
    if s.warn_at > s.throttle_at {
        errs.push(format!(
            "spec.sanctions.warnAt: Invalid value: {}: must not exceed throttleAt ({})",
            s.warn_at, s.throttle_at
        ));
    }
    if s.throttle_at > s.suspend_at {
        errs.push(format!(
            "spec.sanctions.throttleAt: Invalid value: {}: must not exceed suspendAt ({})",
            s.throttle_at, s.suspend_at
        ));
    }
    errs
}

/// Parse an IANA time zone name (from the database compiled into the
/// binary, as everything else that reads a zone).
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    crate::resources::time::time_zone(name).map_err(|_| {
        format!(
            "Invalid value: \"{name}\": not a time zone of the IANA database (e.g. Europe/Berlin)"
        )
    })
}

/// The outcome for one object of a manifest file.
#[derive(Debug)]
pub struct Report {
    pub kind: String,
    pub name: String,
    pub errors: Vec<String>,
}

/// Errors reading a manifest file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading: {0}")]
    Read(#[from] std::io::Error),
    /// The file as a whole (the parser's message names line and column).
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    /// A document (counted from 0, empty ones skipped) without a readable
    /// `apiVersion`, `kind` or `metadata.name`.
    #[error("document {index}: {source}")]
    Head {
        index: usize,
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Meta,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
}

/// Validate every copyhold object in a YAML file; other kinds are skipped.
pub fn validate_file(path: &Path) -> Result<Vec<Report>, ManifestError> {
    let text = std::fs::read_to_string(path)?;
    validate_str(&text)
}

/// Validate every copyhold object in a YAML text. Each document is read
/// as JSON, as kubectl sends it to the API server.
pub fn validate_str(text: &str) -> Result<Vec<Report>, ManifestError> {
    let mut out = Vec::new();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)?;
    for (index, value) in docs.into_iter().enumerate() {
        if value.is_null() {
            continue;
        }
        let head: Head = serde_json::from_value(value.clone())
            .map_err(|source| ManifestError::Head { index, source })?;
        if head.api_version != "copyhold.dev/v1alpha1" {
            continue;
        }
        let spec = value
            .get("spec")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let errors = match head.kind.as_str() {
            "ModelDeployment" => typed(spec, model_deployment),
            "EnergyBudget" => typed(spec, energy_budget),
            "StintQuota" => typed(spec, stint_quota),
            other => vec![format!("kind: Unsupported value: \"{other}\"")],
        };
        out.push(Report {
            kind: head.kind,
            name: head.metadata.name,
            errors,
        });
    }
    Ok(out)
}

fn typed<T: serde::de::DeserializeOwned>(
    spec: serde_json::Value,
    check: fn(&T) -> Vec<String>,
) -> Vec<String> {
    match serde_json::from_value::<T>(spec) {
        Ok(s) => check(&s),
        Err(e) => vec![format!("spec: Invalid value: {e}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_binary_and_decimal_suffixes() {
        let parse_quantity_bytes = quantity::bytes;
        assert_eq!(parse_quantity_bytes("16Gi"), Ok(16 * 1024 * 1024 * 1024));
        assert_eq!(parse_quantity_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_quantity_bytes("1.5Ki"), Ok(1536));
        assert!(parse_quantity_bytes("lots").is_err());
        assert!(parse_quantity_bytes("3Zi").is_err());
    }

    #[test]
    fn time_of_day_accepts_only_hh_mm() {
        assert_eq!(minutes_of_day("06:30"), Some(390));
        assert_eq!(minutes_of_day("24:00"), None);
        assert_eq!(minutes_of_day("6:30"), None);
    }

    #[test]
    fn unknown_time_zones_are_named_in_the_message() {
        let e = time_zone("Mars/Olympus_Mons").unwrap_err();
        assert!(e.contains("Mars/Olympus_Mons"), "{e}");
        assert!(time_zone("Europe/Berlin").is_ok());
    }

    #[test]
    fn non_copyhold_documents_are_skipped() {
        let r = validate_str("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap();
        assert!(r.is_empty());
    }
}
