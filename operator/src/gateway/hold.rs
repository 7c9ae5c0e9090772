//! Holding a request while its model has no ready replica (scaled to zero,
//! or its replicas still starting): the request is already admitted (it
//! holds the member's concurrency permit and its stint reservation) and
//! counted as held in this replica's demand, which makes the autoscaler
//! start a replica. It is forwarded once one is Ready; it gets a 503 with
//! `Retry-After` when `autoscaling.scaleFromZeroTimeout` passes first, or at
//! once when the controller reports that no replica can be placed. A
//! client that leaves while held drops the future, and with it the permit,
//! the reservation and the count.

use std::time::{Duration, Instant};

use super::catalog::{Catalog, Target};
use super::demand::Tracked;
use super::metrics::{GatewayMetrics, HoldLabels, ModelLabels};
use super::openai::ApiError;
use super::router::Replica;

/// How often the watch caches are looked at while holding (memory only:
/// no request to the API server).
const POLL: Duration = Duration::from_millis(200);
/// `Retry-After` of a held request that timed out.
const RETRY_AFTER_TIMEOUT: i64 = 10;
/// `Retry-After` when no replica can be placed.
const RETRY_AFTER_UNPLACEABLE: i64 = 30;

/// Counts the request in the held gauge while it lives.
struct Gauged<'a> {
    metrics: &'a GatewayMetrics,
    model: String,
}

impl Drop for Gauged<'_> {
    fn drop(&mut self) {
        self.metrics
            .held_requests
            .get_or_create(&ModelLabels {
                model: self.model.clone(),
            })
            .dec();
    }
}

/// Wait until `target` has a ready replica, within `timeout`. Returns the
/// ready replicas, or the 503 to answer.
pub async fn until_ready(
    catalog: &Catalog,
    metrics: &GatewayMetrics,
    target: &Target,
    timeout: Duration,
    tracked: &mut Tracked,
) -> Result<Vec<Replica>, ApiError> {
    let started = Instant::now();
    let model = target.served_name.clone();
    metrics
        .held_requests
        .get_or_create(&ModelLabels {
            model: model.clone(),
        })
        .inc();
    let _gauged = Gauged {
        metrics,
        model: model.clone(),
    };
    tracked.hold();
    let (ns, name) = target.key.split_once('/').unwrap_or(("", &target.key));
    let outcome = loop {
        let replicas = catalog.replicas(ns, name);
        if !replicas.is_empty() {
            break Ok(replicas);
        }
        if let Some((reason, message)) = catalog.placement_refusal(ns, name) {
            break Err(ApiError::unavailable(
                "model_unplaceable",
                format!("no replica of {model} can be started: {reason}: {message}"),
                Some(RETRY_AFTER_UNPLACEABLE),
            ));
        }
        if started.elapsed() >= timeout {
            break Err(ApiError::unavailable(
                "model_not_ready",
                format!(
                    "no replica of {model} became ready within {} s",
                    timeout.as_secs()
                ),
                Some(RETRY_AFTER_TIMEOUT),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    tracked.unhold();
    let waited = started.elapsed();
    metrics
        .hold_wait
        .get_or_create(&HoldLabels {
            model,
            outcome: if outcome.is_ok() { "ready" } else { "refused" }.into(),
        })
        .observe(waited.as_secs_f64());
    tracing::info!(model = %target.served_name, waited_ms = waited.as_millis() as u64, ready = outcome.is_ok(), "held request released");
    outcome
}
