//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it:
//! the holder renews the lease every `renew_every`; a candidate takes it over
//! once the record has not changed for `lease_duration` by the candidate's own
//! clock (so clock skew between machines does not matter). Every write carries
//! the resourceVersion it read, so two candidates cannot both win.
//!
//! Every call to the API server is bounded by a timeout: a stuck call (a
//! dead link that neither answers nor fails) counts as a failed renewal, so
//! the holder gives up at its renew deadline (0.8 × the lease, measured
//! from the start of its last successful renewal), before any candidate can
//! see the record unchanged for a whole lease. The caller stops acting when
//! [`Elector::hold`] returns.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{PostParams, ResourceExt};
use tokio::sync::Mutex;

/// How leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {0}: could not renew it within its duration")]
    Lost(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the lease call did not complete within {0:?}")]
    Timeout(Duration),
}

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_every: Duration,
    pub retry_every: Duration,
    /// The longest one acquire or renew attempt (a read and a write) may
    /// take; a renewal is cut shorter still at the renew deadline.
    pub call_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            retry_every: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// One candidate for one lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The record as last seen (resourceVersion) and when it was first seen.
    observed: Mutex<Option<(String, Instant)>>,
    /// When the last successful acquire or renew attempt started: the
    /// renew deadline runs from there.
    held_since: Mutex<Option<Instant>>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observed: Mutex::new(None),
            held_since: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn now() -> MicroTime {
        MicroTime(jiff::Timestamp::now())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.timing.lease_duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1)
    }

    /// [`Self::try_acquire_or_renew`] bounded by `limit`; a success
    /// records when the attempt started.
    async fn attempt(&self, limit: Duration) -> Result<bool, LeaderError> {
        let started = Instant::now();
        let held = tokio::time::timeout(limit, self.try_acquire_or_renew())
            .await
            .map_err(|_| LeaderError::Timeout(limit))??;
        if held {
            *self.held_since.lock().await = Some(started);
        }
        Ok(held)
    }

    /// How much of the renew deadline is left (zero once past it).
    async fn time_to_deadline(&self) -> Duration {
        let deadline = self.timing.lease_duration.mul_f32(0.8);
        match *self.held_since.lock().await {
            Some(since) => deadline.saturating_sub(since.elapsed()),
            None => Duration::ZERO,
        }
    }

    /// One attempt to take or keep the lease. `Ok(true)` means we hold it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let rv = lease.resource_version().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        if !mine && !holder.is_empty() {
            // Someone else holds it: has the record been still for a whole lease?
            let mut observed = self.observed.lock().await;
            let since = match observed.as_ref() {
                Some((seen_rv, at)) if *seen_rv == rv => *at,
                _ => {
                    *observed = Some((rv.clone(), Instant::now()));
                    return Ok(false);
                }
            };
            let duration = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
                .unwrap_or(self.timing.lease_duration);
            if since.elapsed() < duration {
                return Ok(false);
            }
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(Self::now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(Self::now());
        spec.lease_duration_seconds = Some(self.lease_seconds());
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait until this candidate holds the lease.
    pub async fn acquire(&self) -> Result<(), LeaderError> {
        loop {
            match self.attempt(self.timing.call_timeout).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "leader election attempt failed")
                }
            }
            tokio::time::sleep(self.timing.retry_every).await;
        }
    }

    /// Keep renewing; returns when a renewal has not succeeded by the renew
    /// deadline (0.8 × the lease after the last good one started), a stuck
    /// call included: its attempt is cut at the deadline. A candidate takes
    /// over only a whole lease after it saw our last write, so the caller,
    /// stopping when this returns, is never a second leader acting.
    pub async fn hold(&self) -> LeaderError {
        loop {
            tokio::time::sleep(self.timing.renew_every).await;
            let left = self.time_to_deadline().await;
            if left.is_zero() {
                return LeaderError::Lost(self.name.clone());
            }
            match self.attempt(left.min(self.timing.call_timeout)).await {
                Ok(true) => {}
                Ok(false) => return LeaderError::Lost(self.name.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.name, "renewing the leader lease failed")
                }
            }
            if self.time_to_deadline().await.is_zero() {
                return LeaderError::Lost(self.name.clone());
            }
        }
    }

    /// Hand the lease back on a clean shutdown so a standby takes over at
    /// once; bounded, so a stuck API server does not hold up the shutdown.
    pub async fn release(&self) {
        if tokio::time::timeout(self.timing.call_timeout, self.release_unbounded())
            .await
            .is_err()
        {
            tracing::warn!(lease = %self.name, "releasing the leader lease timed out");
        }
    }

    async fn release_unbounded(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(Self::now());
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(error = %e, "releasing the leader lease failed");
        }
    }
}
