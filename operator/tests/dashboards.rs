//! The Grafana dashboards in `dashboards/` use only metric names some
//! component exports, take their data source from the `datasource`
//! variable, and give every panel a title.
//!
//! The exported names come from the code: the controller's and the
//! gateway's `NAMES` lists (compiled in), and, read from the source so this
//! test builds whether or not they exist yet, any other `*_NAMES` list of
//! `operator/src/metrics.rs` (the energy metrics, `copyhold_energy_…`) and
//! the node's `NAMES` in `inference-node/src/metrics.rs`. Each of those
//! lists is itself checked against the component's real `/metrics` output
//! by that component's unit tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The string entries of every `pub const <NAME>: &[&str] = &[ … ];` in
/// `source`, by constant name.
fn const_str_lists(source: &str) -> Vec<(String, Vec<String>)> {
    let mut lists = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("pub const ") {
        rest = &rest[at + "pub const ".len()..];
        let Some(colon) = rest.find(':') else { break };
        let name = rest[..colon].trim().to_owned();
        let after = &rest[colon + 1..];
        let Some(body) = after.trim_start().strip_prefix("&[&str] = &[") else {
            continue;
        };
        let Some(end) = body.find("];") else { break };
        let entries = body[..end]
            .split(',')
            .filter_map(|e| {
                let e = e.trim();
                e.strip_prefix('"')
                    .and_then(|e| e.strip_suffix('"'))
                    .map(str::to_owned)
            })
            .collect();
        lists.push((name, entries));
        rest = &body[end..];
    }
    lists
}

/// Full names every component exports.
fn exported_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    names.extend(
        copyhold::metrics::NAMES
            .iter()
            .map(|n| format!("copyhold_controller_{n}")),
    );
    names.extend(
        copyhold::gateway::metrics::NAMES
            .iter()
            .map(|n| format!("copyhold_gateway_{n}")),
    );
    let full = |prefix: &str, n: &str| {
        if n.starts_with("copyhold_") {
            n.to_owned()
        } else {
            format!("{prefix}{n}")
        }
    };
    let controller_src =
        std::fs::read_to_string(root().join("operator/src/metrics.rs")).expect("metrics.rs");
    for (list, entries) in const_str_lists(&controller_src) {
        let prefix = match list.as_str() {
            "NAMES" => "copyhold_controller_",
            "ENERGY_NAMES" => "copyhold_energy_",
            other => panic!("operator/src/metrics.rs: no prefix known for {other}"),
        };
        names.extend(entries.iter().map(|n| full(prefix, n)));
    }
    let node_src = std::fs::read_to_string(root().join("inference-node/src/metrics.rs"))
        .expect("inference-node/src/metrics.rs");
    let node: Vec<_> = const_str_lists(&node_src)
        .into_iter()
        .filter(|(l, _)| l == "NAMES")
        .flat_map(|(_, e)| e)
        .collect();
    assert!(
        !node.is_empty(),
        "inference-node/src/metrics.rs has no `pub const NAMES`"
    );
    names.extend(node.iter().map(|n| full("copyhold_node_", n)));
    names
}

/// Identifiers starting with `copyhold_` in a PromQL expression, leaving
/// out quoted strings (label values, regexes).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = expr.char_indices().peekable();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while let Some((i, c)) = chars.next() {
        if c == '"' || c == '\'' || c == '`' {
            let mut escaped = false;
            for (_, d) in chars.by_ref() {
                if escaped {
                    escaped = false;
                } else if d == '\\' {
                    escaped = true;
                } else if d == c {
                    break;
                }
            }
        } else if ident(c) {
            let mut end = i + c.len_utf8();
            while let Some(&(j, d)) = chars.peek() {
                if !ident(d) {
                    break;
                }
                end = j + d.len_utf8();
                chars.next();
            }
            let word = &expr[i..end];
            if word.starts_with("copyhold_") {
                out.push(word.to_owned());
            }
        }
    }
    out
}

/// Whether `name` is an exported series: the name itself, a histogram's
/// `_bucket`/`_sum`/`_count`, or a counter with `_total`.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    if exported.contains(name) {
        return true;
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && exported.contains(base)
        {
            return true;
        }
    }
    exported.contains(&format!("{name}_total"))
        || name
            .strip_suffix("_total")
            .is_some_and(|base| exported.contains(base))
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("dashboards/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("read");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("dashboards/{name} is not JSON: {e}"));
            out.push((name, json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        out.push(p);
        for q in p["panels"].as_array().into_iter().flatten() {
            out.push(q);
        }
    }
    out
}

fn uses_datasource_variable(ds: &Value) -> bool {
    match ds {
        Value::String(s) => s == "${datasource}" || s == "$datasource",
        Value::Object(_) => ds["uid"]
            .as_str()
            .is_some_and(|u| u == "${datasource}" || u == "$datasource"),
        _ => false,
    }
}

#[test]
fn the_four_dashboards_exist() {
    let names: Vec<_> = dashboards().into_iter().map(|(n, _)| n).collect();
    for want in ["commons.json", "energy.json", "fleet.json", "serving.json"] {
        assert!(names.iter().any(|n| n == want), "dashboards/{want} missing");
    }
}

#[test]
fn dashboards_use_only_exported_metric_names() {
    let exported = exported_names();
    let mut unknown = BTreeSet::new();
    let mut used = 0;
    for (file, d) in dashboards() {
        let mut exprs: Vec<String> = Vec::new();
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    exprs.push(e.to_owned());
                }
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            match &v["query"] {
                Value::String(q) if v["type"] == "query" => exprs.push(q.clone()),
                Value::Object(o) => {
                    if let Some(q) = o.get("query").and_then(Value::as_str) {
                        exprs.push(q.to_owned());
                    }
                }
                _ => {}
            }
        }
        for e in &exprs {
            for name in metric_names(e) {
                used += 1;
                if !is_exported(&name, &exported) {
                    unknown.insert(format!("{name} (dashboards/{file})"));
                }
            }
        }
    }
    assert!(used > 0, "no copyhold_ metric in any dashboard");
    assert!(
        unknown.is_empty(),
        "dashboards use metric names no component exports:\n  {}\nexported:\n  {}",
        unknown.into_iter().collect::<Vec<_>>().join("\n  "),
        exported.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn every_panel_has_a_title_and_the_datasource_variable() {
    for (file, d) in dashboards() {
        let version = d["schemaVersion"].as_i64().unwrap_or(0);
        assert!(version >= 36, "{file}: schemaVersion {version} < 36");
        assert!(
            d["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{file}: no uid"
        );
        let vars = d["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            vars.iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            "{file}: no `datasource` template variable"
        );
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert!(
                uses_datasource_variable(&v["datasource"]),
                "{file}: variable {} does not use ${{datasource}}",
                v["name"]
            );
        }
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("");
            assert!(
                !title.trim().is_empty(),
                "{file}: a panel has no title: {p}"
            );
            if let Some(id) = p["id"].as_i64() {
                assert!(ids.insert(id), "{file}: panel id {id} used twice");
            }
            if p["type"] == "row" {
                continue;
            }
            let targets = p["targets"].as_array().cloned().unwrap_or_default();
            assert!(!targets.is_empty(), "{file}: panel {title:?} has no query");
            assert!(
                uses_datasource_variable(&p["datasource"]),
                "{file}: panel {title:?} does not use ${{datasource}}"
            );
            for t in &targets {
                assert!(
                    uses_datasource_variable(&t["datasource"]),
                    "{file}: a query of panel {title:?} does not use ${{datasource}}"
                );
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{file}: panel {title:?} has an empty query"
                );
            }
        }
    }
}

#[test]
fn the_name_scanner_reads_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.9, sum by (le) (rate(copyhold_gateway_request_duration_seconds_bucket{model=~"copyhold_x"}[5m])))"#
        ),
        vec!["copyhold_gateway_request_duration_seconds_bucket"]
    );
    let exported: BTreeSet<String> = ["copyhold_a_seconds".to_owned(), "copyhold_b_total".into()]
        .into_iter()
        .collect();
    assert!(is_exported("copyhold_a_seconds_count", &exported));
    assert!(is_exported("copyhold_b", &exported));
    assert!(!is_exported("copyhold_c", &exported));
    let lists = const_str_lists("pub const X: &[&str] = &[\n    \"a\",\n    \"b\",\n];\n");
    assert_eq!(lists, vec![("X".to_owned(), vec!["a".into(), "b".into()])]);
}
