//! A `huggingFace` model's download, as seen from its Pods: while a Pod's
//! `fetch` init container runs, it serves its progress on the Pod's engine
//! port (`GET /progress`), which the controller reads into
//! `status.download`; a fetch that exited with an error leaves its message
//! (the container's termination message) for a condition.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use crate::resources::DownloadStatus;
use crate::serving::model_cache::FETCH_PROGRESS_PORT;

/// What the Pods say about the download.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Observed {
    /// The progress of a running fetch (the first Pod's that answered).
    pub running: Option<DownloadStatus>,
    /// Some Pod's fetch exited 0: the model is in its cache.
    pub done: bool,
    /// A fetch failed: its message.
    pub failure: Option<String>,
}

/// The progress report `copyhold-node fetch` serves.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    phase: String,
    commit: Option<String>,
    bytes_done: u64,
    bytes_total: u64,
    rate: u64,
    eta_seconds: Option<u64>,
}

fn size(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    if b as f64 >= GIB {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

/// `45% 1.2 GiB/2.7 GiB 80.0 MiB/s ETA 19s`, or `done 2.7 GiB`.
pub fn summary(d: &DownloadStatus) -> String {
    let (done, total) = (d.bytes_done.max(0) as u64, d.bytes_total.max(0) as u64);
    if d.phase == "done" {
        return format!("done {}", size(total));
    }
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    let eta = d
        .eta_seconds
        .map_or_else(|| "-".to_string(), |s| format!("{s}s"));
    format!(
        "{pct}% {}/{} {}/s ETA {eta}",
        size(done),
        size(total),
        size(d.rate.max(0) as u64)
    )
}

fn to_status(r: Report) -> DownloadStatus {
    let mut d = DownloadStatus {
        phase: r.phase,
        commit: r.commit,
        bytes_done: i64::try_from(r.bytes_done).unwrap_or(i64::MAX),
        bytes_total: i64::try_from(r.bytes_total).unwrap_or(i64::MAX),
        rate: i64::try_from(r.rate).unwrap_or(i64::MAX),
        eta_seconds: r.eta_seconds.and_then(|s| i64::try_from(s).ok()),
        summary: String::new(),
    };
    d.summary = summary(&d);
    d
}

fn fetch_status(p: &Pod) -> Option<&ContainerStatus> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "fetch")
}

/// Reads the download state of `pods` (the ModelDeployment's own).
pub async fn observe(pods: &[Arc<Pod>], http: &reqwest::Client) -> Observed {
    let mut out = Observed::default();
    for p in pods {
        let Some(cs) = fetch_status(p) else { continue };
        let state = cs.state.as_ref();
        if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
            if t.exit_code == 0 {
                out.done = true;
            } else {
                out.failure = Some(
                    t.message
                        .clone()
                        .unwrap_or_else(|| format!("the fetch exited with code {}", t.exit_code)),
                );
            }
            continue;
        }
        if state.and_then(|s| s.waiting.as_ref()).is_some() {
            if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref())
                && t.exit_code != 0
            {
                out.failure = t.message.clone();
            }
            continue;
        }
        if out.running.is_some() || state.and_then(|s| s.running.as_ref()).is_none() {
            continue;
        }
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.as_deref()) else {
            continue;
        };
        let url = format!("http://{ip}:{FETCH_PROGRESS_PORT}/progress");
        let got = http
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == reqwest::StatusCode::OK);
        if let Some(r) = got
            && let Ok(report) = r.json::<Report>().await
        {
            out.running = Some(to_status(report));
        }
    }
    out
}

/// A 401/403/404 from the hub while sizing, as a reason and a message that
/// names the repository and the fix.
pub fn hub_refusal(
    hf: &crate::resources::HuggingFaceSource,
    err: &crate::serving::model_source::SourceError,
) -> Option<(&'static str, String)> {
    let crate::serving::model_source::SourceError::Status { status, url } = err else {
        return None;
    };
    let at = format!("{}@{} on {}", hf.repo, hf.revision, hf.endpoint());
    match status {
        401 | 403 => Some((
            "HubUnauthorized",
            format!(
                "{at}: HTTP {status} for {url}: the repository is gated or private; put a Hugging Face token with access to it in a Secret (key `token`) and name it in spec.model.source.huggingFace.tokenSecret"
            ),
        )),
        404 => Some((
            "HubNotFound",
            format!(
                "{at}: HTTP 404 for {url}: no such repository, revision or file; check spec.model.source.huggingFace.repo and revision (a private repository without a token also answers 404)"
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_reads_as_a_progress_line() {
        let d = DownloadStatus {
            phase: "downloading".into(),
            bytes_done: 3 << 29,
            bytes_total: 3 << 30,
            rate: 80 << 20,
            eta_seconds: Some(19),
            ..Default::default()
        };
        assert_eq!(summary(&d), "50% 1.5 GiB/3.0 GiB 80.0 MiB/s ETA 19s");
        let done = DownloadStatus {
            phase: "done".into(),
            bytes_total: 900 << 10,
            ..d
        };
        assert_eq!(summary(&done), "done 0.9 MiB");
    }
}
