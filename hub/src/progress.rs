//! Download progress: a bar in the log, and a JSON file others can read
//! (bytes done and total, rate, ETA).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// What the progress file holds (camelCase, as the ModelDeployment's
/// `status.download` is).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    /// `resolving`, `downloading`, `verifying`, `done`, `failed`.
    pub phase: String,
    pub repo: String,
    pub commit: Option<String>,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes a second since the download began (bytes found in the cache
    /// do not count).
    pub rate: u64,
    /// Seconds left at that rate.
    pub eta_seconds: Option<u64>,
    pub message: Option<String>,
}

/// Counters shared by the download tasks.
#[derive(Debug)]
pub struct Progress {
    pub repo: String,
    pub commit: std::sync::Mutex<Option<String>>,
    pub done: AtomicU64,
    pub total: AtomicU64,
    /// Bytes already present when the download began (resumed or cached).
    pub present: AtomicU64,
    started: Instant,
    file: Option<PathBuf>,
    last: std::sync::Mutex<Option<ProgressReport>>,
}

impl Progress {
    pub fn new(repo: &str, file: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            repo: repo.to_string(),
            commit: std::sync::Mutex::new(None),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            present: AtomicU64::new(0),
            started: Instant::now(),
            file,
            last: std::sync::Mutex::new(None),
        })
    }

    /// The report as of now.
    pub fn report(&self, phase: &str, message: Option<String>) -> ProgressReport {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let fetched = done.saturating_sub(self.present.load(Ordering::Relaxed));
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = (fetched as f64 / secs) as u64;
        let eta_seconds = (rate > 0).then(|| total.saturating_sub(done) / rate);
        ProgressReport {
            phase: phase.into(),
            repo: self.repo.clone(),
            commit: self
                .commit
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            bytes_done: done,
            bytes_total: total,
            rate,
            eta_seconds,
            message,
        }
    }

    /// Logs a bar and writes the file (atomically: a reader never sees half).
    pub fn publish(&self, phase: &str, message: Option<String>) {
        let r = self.report(phase, message);
        eprintln!("{}", bar(&r));
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
        if let Some(path) = &self.file {
            let tmp = path.with_extension("tmp");
            let written = serde_json::to_vec(&r)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                tracing::warn!(error = %e, path = %path.display(), "progress file");
            }
        }
    }

    /// Publishes every `every` until the returned handle is dropped.
    pub fn tick(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                me.publish("downloading", None);
            }
        })
    }
}

/// The latest published report.
pub fn latest(p: &Progress) -> Option<ProgressReport> {
    p.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Serves the latest report as `GET /progress` (JSON) on `listener` while
/// the fetch runs: the init container listens on the Pod's engine port,
/// which the engine takes only after it, and the controller reads it from
/// the Pod's IP into the ModelDeployment's `status.download`.
pub async fn serve(listener: tokio::net::TcpListener, p: Arc<Progress>) -> std::io::Result<()> {
    use axum::response::IntoResponse as _;
    let app = axum::Router::new().route(
        "/progress",
        axum::routing::get(move || {
            let p = p.clone();
            async move {
                match latest(&p) {
                    Some(r) => axum::Json(r).into_response(),
                    None => axum::http::StatusCode::NO_CONTENT.into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app).await
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `fetch org/model [#######-------]  45%  12.3/27.0 MiB  3.1 MiB/s  ETA 5s`
pub fn bar(r: &ProgressReport) -> String {
    const WIDTH: u64 = 30;
    let filled = (r.bytes_done * WIDTH)
        .checked_div(r.bytes_total)
        .unwrap_or(0)
        .min(WIDTH) as usize;
    let pct = (r.bytes_done * 100).checked_div(r.bytes_total).unwrap_or(0);
    let eta = r
        .eta_seconds
        .map_or_else(|| "-".to_string(), |s| format!("{s}s"));
    format!(
        "fetch {} {} [{}{}] {:>3}% {:.1}/{:.1} MiB {:.1} MiB/s ETA {}{}",
        r.repo,
        r.phase,
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled),
        pct,
        mib(r.bytes_done),
        mib(r.bytes_total),
        mib(r.rate),
        eta,
        r.message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_share_sizes_rate_and_eta() {
        let r = ProgressReport {
            phase: "downloading".into(),
            repo: "town/tiny".into(),
            commit: None,
            bytes_done: 512 * 1024,
            bytes_total: 1024 * 1024,
            rate: 256 * 1024,
            eta_seconds: Some(2),
            message: None,
        };
        assert_eq!(
            bar(&r),
            "fetch town/tiny downloading [###############---------------]  50% 0.5/1.0 MiB 0.2 MiB/s ETA 2s"
        );
    }
}
