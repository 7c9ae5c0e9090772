//! Reading the covered nodes' draw: `copyhold_node_power_watts` scraped from
//! the `copyhold-node` Pods on each node, or a Prometheus query (DCGM's
//! `DCGM_FI_DEV_POWER_USAGE`, labelled `Hostname`, or any series labelled
//! `node`). A covered node with no reading counts as
//! `draw.missingReadingWatts`, else the rated power of its GPUs: never zero;
//! a covered node with no `copyhold-node` Pod (its model shed, or none
//! placed) counts at its GPUs' idle power.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;

use crate::resources::DrawSpec;
use crate::serving::gpu_catalog;
use crate::serving::workload::ENGINE_PORT;

/// Metric the inference node exports.
pub const NODE_POWER_METRIC: &str = "copyhold_node_power_watts";
/// Labels naming the node in a Prometheus draw query, in order of preference.
pub const NODE_LABELS: [&str; 4] = ["node", "Hostname", "kubernetes_node", "instance"];

/// Power of one GPU of `node`: the catalog's figures for its GFD product
/// label, else the conservative [`gpu_catalog::fallback`] for its memory
/// class (`nvidia.com/gpu.memory`, MiB): never 0 W for an unknown card.
pub fn gpu_power(node: &Node) -> gpu_catalog::GpuPower {
    let labels = node.labels();
    match labels
        .get("nvidia.com/gpu.product")
        .and_then(|p| gpu_catalog::lookup(p))
    {
        Some(g) => gpu_catalog::GpuPower {
            rated_w: g.tdp_w,
            idle_w: g.idle_w,
        },
        None => gpu_catalog::fallback(
            labels
                .get("nvidia.com/gpu.memory")
                .and_then(|m| m.parse::<u64>().ok())
                .and_then(|mib| mib.checked_mul(1024 * 1024)),
        ),
    }
}

/// How many GPUs `node` has: GFD's count label, else its capacity.
fn gpu_count(node: &Node) -> f64 {
    node.labels()
        .get("nvidia.com/gpu.count")
        .and_then(|c| c.parse::<f64>().ok())
        .or_else(|| {
            node.status
                .as_ref()?
                .capacity
                .as_ref()?
                .get("nvidia.com/gpu")?
                .0
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Rated power of a node's GPUs, 0 for a node without GPUs.
pub fn rated_watts(node: &Node) -> f64 {
    gpu_power(node).rated_w * gpu_count(node)
}

/// Idle power of a node's GPUs: what it draws when nothing runs on them.
pub fn idle_watts(node: &Node) -> f64 {
    gpu_power(node).idle_w * gpu_count(node)
}

/// Rated power of one GPU of `node` as the catalog states it; 0 for a
/// product missing from it, so no power limit is computed from a guess.
pub fn rated_per_gpu(node: &Node) -> f64 {
    node.labels()
        .get("nvidia.com/gpu.product")
        .and_then(|p| gpu_catalog::lookup(p))
        .map_or(0.0, |g| g.tdp_w)
}

/// The GPU products of `nodes` missing from the catalog, sorted, once each.
pub fn unknown_products(nodes: &[&Node]) -> Vec<String> {
    let unknown: std::collections::BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| n.labels().get("nvidia.com/gpu.product"))
        .filter(|p| gpu_catalog::lookup(p).is_none())
        .cloned()
        .collect();
    unknown.into_iter().collect()
}

/// Whether `node` is covered by `selector` (empty: GPU nodes).
pub fn covers(selector: &BTreeMap<String, String>, node: &Node) -> bool {
    let labels = node.labels();
    if selector.is_empty() {
        return labels.get("nvidia.com/gpu.present").map(String::as_str) == Some("true");
    }
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A `copyhold-node` Pod that can be scraped.
#[derive(Debug, Clone, PartialEq)]
pub struct EnginePod {
    /// `namespace/name`.
    pub key: String,
    pub node: String,
    /// `http://ip:port`.
    pub base_url: String,
    /// The owning ModelDeployment, `namespace/name`.
    pub model_deployment: Option<String>,
    /// GPUs the Pod's engine container asks for.
    pub gpus: f64,
}

/// The running `copyhold-node` Pods on `nodes`.
pub fn engine_pods<'a>(
    pods: impl Iterator<Item = &'a Pod>,
    nodes: &std::collections::BTreeSet<String>,
) -> Vec<EnginePod> {
    let mut out = Vec::new();
    for p in pods {
        let labels = p.labels();
        if labels.get("app.kubernetes.io/name").map(String::as_str) != Some("copyhold-node")
            || p.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let Some(spec) = p.spec.as_ref() else {
            continue;
        };
        let Some(node) = spec.node_name.clone().filter(|n| nodes.contains(n)) else {
            continue;
        };
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let container = spec.containers.first();
        let port = container
            .and_then(|c| c.ports.as_ref())
            .and_then(|ports| {
                ports
                    .iter()
                    .find(|x| x.name.as_deref() == Some("http"))
                    .or(ports.first())
            })
            .map_or(ENGINE_PORT, |x| x.container_port);
        let gpus = container
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu"))
            .and_then(|q| q.0.parse::<f64>().ok())
            .unwrap_or(0.0);
        let ns = p.namespace().unwrap_or_default();
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        out.push(EnginePod {
            key: format!("{ns}/{}", p.name_any()),
            node,
            base_url: format!("http://{host}:{port}"),
            model_deployment: labels
                .get(crate::serving::workload::MD_LABEL)
                .map(|m| format!("{ns}/{m}")),
            gpus,
        });
    }
    out
}

/// The value of an unlabelled gauge in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let rest = if let Some(r) = rest.strip_prefix('{') {
            r.split_once('}')?.1
        } else {
            rest
        };
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })
}

/// Scrape each Pod's `/metrics`; a Pod that does not answer with a finite,
/// non-negative power has no entry.
pub async fn scrape(http: &reqwest::Client, pods: &[EnginePod]) -> BTreeMap<String, f64> {
    scrape_with_limits(http, pods)
        .await
        .into_iter()
        .map(|(k, r)| (k, r.watts))
        .collect()
}

/// The node's gauge of the power limit in force (0 when none).
pub const NODE_POWER_LIMIT_METRIC: &str = "copyhold_node_power_limit_watts";

/// What one engine Pod's `/metrics` said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PodReading {
    /// `copyhold_node_power_watts`.
    pub watts: f64,
    /// `copyhold_node_power_limit_watts`: `Some(None)` when the node says
    /// it has no limit (0), `None` when it does not say.
    pub limit: Option<Option<f64>>,
}

/// Read one Pod's metrics text: its power (finite, non-negative, or no
/// reading) and the limit it reports.
pub fn pod_reading(text: &str) -> Option<PodReading> {
    let watts = metric_value(text, NODE_POWER_METRIC).filter(|w| w.is_finite() && *w >= 0.0)?;
    let limit = metric_value(text, NODE_POWER_LIMIT_METRIC)
        .filter(|w| w.is_finite() && *w >= 0.0)
        .map(|w| (w > 0.0).then_some(w));
    Some(PodReading { watts, limit })
}

/// [`scrape`], with the power limit each Pod reports.
pub async fn scrape_with_limits(
    http: &reqwest::Client,
    pods: &[EnginePod],
) -> BTreeMap<String, PodReading> {
    let reads = pods.iter().map(|p| async move {
        let url = format!("{}/metrics", p.base_url);
        let text = http
            .get(&url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .ok()?
            .error_for_status()
            .ok()?
            .text()
            .await
            .ok()?;
        pod_reading(&text).map(|r| (p.key.clone(), r))
    });
    futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Per-node watts from a Prometheus answer (summed per node label).
pub fn per_node_from_prometheus(
    samples: &[(serde_json::Map<String, serde_json::Value>, f64)],
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (labels, w) in samples {
        if !(w.is_finite() && *w >= 0.0) {
            continue;
        }
        let node = NODE_LABELS.iter().find_map(|k| labels.get(*k)?.as_str());
        if let Some(n) = node {
            // `instance` is host:port.
            let n = n.split(':').next().unwrap_or(n);
            *out.entry(n.to_string()).or_insert(0.0) += w;
        }
    }
    out
}

/// The covered nodes' draw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draw {
    pub total_watts: f64,
    pub per_node: BTreeMap<String, f64>,
    /// Nodes counted at the assumed power.
    pub without_reading: Vec<String>,
}

/// Sum per-node readings over the covered nodes, filling in the missing: a
/// node with an engine Pod (`engine_nodes`) but no reading at
/// `spec.missingReadingWatts` or its GPUs' rated power, a node without one
/// at its GPUs' idle power.
pub fn total(
    nodes: &[&Node],
    readings: &BTreeMap<String, f64>,
    engine_nodes: &std::collections::BTreeSet<String>,
    spec: &DrawSpec,
) -> Draw {
    let mut d = Draw::default();
    for n in nodes {
        let name = n.name_any();
        let w = match readings.get(&name) {
            Some(w) => *w,
            None => {
                d.without_reading.push(name.clone());
                if engine_nodes.contains(&name) {
                    spec.missing_reading_watts.unwrap_or_else(|| rated_watts(n))
                } else {
                    // Nothing of ours runs there (shed, or never placed):
                    // its GPUs idle, so counting rated power would keep the
                    // ladder from ever stepping back.
                    idle_watts(n)
                }
            }
        };
        d.total_watts += w;
        d.per_node.insert(name, w);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn node(name: &str, product: &str, count: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": product,
                "nvidia.com/gpu.count": count,
            }}
        }))
        .expect("node")
    }

    #[test]
    fn the_power_gauge_is_read_from_prometheus_text() {
        let text = "# HELP copyhold_node_power_watts x\n# TYPE copyhold_node_power_watts gauge\ncopyhold_node_power_watts_other 5\ncopyhold_node_power_watts 123.5\n";
        assert_eq!(metric_value(text, NODE_POWER_METRIC), Some(123.5));
        assert_eq!(
            metric_value(
                "copyhold_node_power_watts{gpu=\"0\"} 7\n",
                NODE_POWER_METRIC
            ),
            Some(7.0)
        );
        assert_eq!(metric_value("nothing 1\n", NODE_POWER_METRIC), None);
        let text = "copyhold_node_power_watts 100\ncopyhold_node_power_limit_watts 150\n";
        assert_eq!(
            pod_reading(text),
            Some(PodReading {
                watts: 100.0,
                limit: Some(Some(150.0))
            })
        );
        let none = "copyhold_node_power_watts 100\ncopyhold_node_power_limit_watts 0\n";
        assert_eq!(pod_reading(none).map(|r| r.limit), Some(Some(None)));
        let silent = "copyhold_node_power_watts 100\n";
        assert_eq!(pod_reading(silent).map(|r| r.limit), Some(None));
        assert_eq!(pod_reading("copyhold_node_power_watts -3\n"), None);
    }

    #[test]
    fn a_node_without_reading_counts_at_rated_power_never_zero() {
        let a = node("a", "Tesla-P100-PCIE-16GB", "2");
        let b = node("b", "Tesla-T4", "1");
        let readings = BTreeMap::from([("a".to_string(), 90.0)]);
        let engines = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let d = total(&[&a, &b], &readings, &engines, &DrawSpec::default());
        assert_eq!(d.without_reading, vec!["b".to_string()]);
        assert_eq!(d.total_watts, 90.0 + 70.0);
        let d = total(
            &[&a, &b],
            &readings,
            &engines,
            &DrawSpec {
                missing_reading_watts: Some(33.0),
                ..Default::default()
            },
        );
        assert_eq!(d.total_watts, 123.0);
    }

    #[test]
    fn a_node_whose_model_was_shed_counts_its_gpus_idle_power_not_rated() {
        // Both nodes ran engines; b's were shed to zero, so it has no Pod.
        let a = node("a", "Tesla-P100-PCIE-16GB", "2");
        let b = node("b", "Tesla-V100-SXM2-32GB", "4");
        let readings = BTreeMap::from([("a".to_string(), 90.0)]);
        let engines = BTreeSet::from(["a".to_string()]);
        let d = total(&[&a, &b], &readings, &engines, &DrawSpec::default());
        assert_eq!(d.per_node.get("b"), Some(&(4.0 * 45.0)));
        assert_eq!(d.total_watts, 90.0 + 4.0 * 45.0);
        assert_eq!(d.without_reading, vec!["b".to_string()]);
    }

    #[test]
    fn a_gpu_product_missing_from_the_catalog_never_counts_as_zero_watts() {
        let mut x = node("x", "Radeon-Instinct-MI50", "2");
        x.labels_mut()
            .insert("nvidia.com/gpu.memory".into(), "16384".into());
        let engines = BTreeSet::from(["x".to_string()]);
        let d = total(&[&x], &BTreeMap::new(), &engines, &DrawSpec::default());
        // The highest rated power of the 16 GB class (300 W), per GPU.
        assert_eq!(d.total_watts, 600.0);
        assert_eq!(rated_watts(&x), 600.0);
        assert_eq!(rated_per_gpu(&x), 0.0, "no power limit from a guess");
        assert_eq!(
            unknown_products(&[&x]),
            vec!["Radeon-Instinct-MI50".to_string()]
        );
    }

    #[test]
    fn dcgm_series_are_summed_per_hostname() {
        let s = vec![
            (
                serde_json::json!({"Hostname": "a", "gpu": "0"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                100.0,
            ),
            (
                serde_json::json!({"Hostname": "a", "gpu": "1"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                50.0,
            ),
            (
                serde_json::json!({"node": "b"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                -3.0,
            ),
        ];
        let m = per_node_from_prometheus(&s);
        assert_eq!(m.get("a"), Some(&150.0));
        assert!(!m.contains_key("b"));
    }

    #[test]
    fn an_empty_selector_covers_gpu_nodes() {
        let a = node("a", "Tesla-T4", "1");
        assert!(covers(&BTreeMap::new(), &a));
        let sel = BTreeMap::from([("kubernetes.io/hostname".to_string(), "x".to_string())]);
        assert!(!covers(&sel, &a));
    }
}
