//! The ledger's I/O: one writer per StintQuota in each replica. The
//! register is two kinds of object (`commons::ledger_leases`): the
//! StintQuota's status (member lines, written with optimistic concurrency:
//! a replace carrying the resourceVersion it read; a 409 means read again
//! and redo) and one slice Lease per replica (`slice_leases`), written only
//! by its replica. Reservations that fit the local slice need no write;
//! settlements are batched into the status at most every [`fold_every`]
//! (coarser for larger quotas), the Lease is rewritten with every write,
//! which is also this replica's heartbeat; dead replicas' slices are
//! charged and unused slices returned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::Notify;

use crate::commons::ledger::{self, Ask, Book, Fit, Heartbeats, Reservation, Usage};
use crate::commons::ledger_leases::{self, HeldLease, ReplicaSlices};
use crate::commons::stint::{self, MemberStint, PeriodWindow};
use crate::conditions;
use crate::resources::stint_quota::{
    MemberState, MemberUsage, StintQuota, StintQuotaSpec, StintQuotaStatus,
};

use super::metrics::GatewayMetrics;
use super::slice_leases::{self, SliceLeaseError, Wrote};

/// Why the ledger could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("StintQuota {0} is invalid: {1}")]
    Invalid(String, String),
    #[error("serializing the register: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("the register stayed contended after {0} attempts")]
    Contended(u32),
    #[error("the register's writer task failed: {0}")]
    Writer(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Slices(#[from] SliceLeaseError),
}

/// A refusal by the ledger.
#[derive(Debug)]
pub enum Admission {
    Admitted,
    /// The member's stint is spent until the period resets.
    Exhausted {
        retry_after: i64,
    },
}

/// What the last write saw, for standings and headers.
#[derive(Clone, Debug, Default)]
struct View {
    spec: Option<StintQuotaSpec>,
    status: StintQuotaStatus,
    period: Option<PeriodWindow>,
    written_at: Option<std::time::Instant>,
}

/// A member's standing as this replica sees it.
#[derive(Clone, Debug)]
pub struct Standing {
    pub state: MemberState,
    /// Tokens left to the stint (not the ceiling), when the stint is finite.
    pub remaining_tokens: Option<i64>,
    pub seconds_to_reset: i64,
    /// Live gateway replicas listed in the register (this one included).
    pub replicas: usize,
}

/// What one write of the register carried, for what follows it.
struct Written<'a> {
    attempt: u32,
    pending: &'a [(String, Usage)],
    returned: usize,
    granted: (i64, f64),
    refreshed: &'a ledger::Refreshed,
    period: PeriodWindow,
    spec: StintQuotaSpec,
}

/// This replica's slice Lease, as it wrote it last.
#[derive(Debug, Default)]
struct OwnLease {
    beats: i64,
    /// Its resourceVersion; None before the first write or after a reader
    /// deleted it.
    version: Option<String>,
}

/// The register's `Ready` condition while gateways meter it.
fn mark_metering(st: &mut StintQuotaStatus, generation: Option<i64>) {
    st.observed_generation = generation;
    conditions::set(
        &mut st.conditions,
        "Ready",
        true,
        "Metering",
        "gateway replicas are metering this quota",
        generation,
        conditions::now(),
    );
}

/// One StintQuota's ledger in this replica.
pub struct QuotaLedger {
    api: Api<StintQuota>,
    leases: Api<Lease>,
    pub namespace: String,
    pub name: String,
    replica: String,
    book: Mutex<Book>,
    /// Other replicas' heartbeats as this one saw them move.
    heartbeats: Mutex<Heartbeats>,
    write: tokio::sync::Mutex<OwnLease>,
    /// When settlements were last written to the status (read without
    /// waiting for a write in progress).
    folded_at: Mutex<Option<std::time::Instant>>,
    view: Mutex<View>,
    wake: Notify,
    metrics: Arc<GatewayMetrics>,
}

const MAX_ATTEMPTS: u32 = 50;
/// How long a member may be idle before this replica returns its slice.
const IDLE: SignedDuration = SignedDuration::from_secs(10);
/// Settlements wait at least this long before being written (a quota of
/// few members); see [`fold_every`].
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// How often settlements are written into the status of a quota of
/// `members` members: 200 ms plus 2 ms per member (2.2 s at the schema's
/// 1000), so that each replica rewrites a large register at most about
/// once every two seconds. Settled usage waiting here is inside the
/// replica's slice (charged in full if it dies), so waiting longer costs
/// no accuracy, only freshness of the register.
pub fn fold_every(members: usize) -> Duration {
    FLUSH_EVERY + Duration::from_millis(2 * members as u64)
}

impl QuotaLedger {
    fn lock_book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether settlements are due in the status of a quota of `members`.
    fn fold_due(&self, members: usize) -> bool {
        self.folded_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|t| t.elapsed() >= fold_every(members))
    }

    fn slice_config(&self) -> (i64, f64) {
        let v = self.lock_view();
        v.spec
            .as_ref()
            .map(|s| (s.ledger.slice_tokens, s.ledger.slice_energy_wh))
            .unwrap_or((4096, 0.5))
    }

    /// Reserve `r` for `member`: locally when the slice covers it, else
    /// after leasing more; refused when the stint has not that much left.
    /// Only what this replica holds is admitted, so a SIGKILL's reclaim
    /// covers every request it had in flight.
    pub async fn reserve(
        self: &Arc<Self>,
        member: &str,
        r: Reservation,
    ) -> Result<Admission, LedgerError> {
        let _waiting = Waiting::new(self, member);
        for _ in 0..4 {
            let (st, sw) = self.slice_config();
            let need = {
                let mut b = self.lock_book();
                match b.fit(member, r, st, sw) {
                    Fit::Fits => {
                        b.reserve(member, r, Timestamp::now());
                        return Ok(Admission::Admitted);
                    }
                    Fit::NeedLease(ask) => ask,
                }
            };
            let granted = self.sync_detached(member, need).await?;
            {
                let mut b = self.lock_book();
                if b.fit(member, r, st, sw) == Fit::Fits {
                    b.reserve(member, r, Timestamp::now());
                    return Ok(Admission::Admitted);
                }
            }
            if granted.0 == 0 && granted.1 <= 0.0 {
                break;
            }
        }
        let retry_after = self.standing(member).seconds_to_reset;
        Ok(Admission::Exhausted { retry_after })
    }

    /// A request ended with `usage`: settle locally, write soon.
    pub fn settle(&self, member: &str, r: Reservation, usage: &Usage) {
        self.lock_book().settle(member, r, usage, Timestamp::now());
        self.wake.notify_one();
    }

    /// Standing of `member` from the last write plus what is pending here.
    pub fn standing(&self, member: &str) -> Standing {
        let v = self.lock_view();
        let now = Timestamp::now();
        let period = v.period;
        let seconds_to_reset = period.map(|p| p.seconds_to_reset(now)).unwrap_or(60);
        let replicas = v.status.gateways.len().max(1);
        let (Some(spec), Some(p)) = (&v.spec, period) else {
            return Standing {
                state: MemberState::Ok,
                remaining_tokens: None,
                seconds_to_reset,
                replicas,
            };
        };
        let line = v
            .status
            .members
            .iter()
            .find(|u| u.name == member)
            .cloned()
            .unwrap_or_else(|| MemberUsage {
                name: member.into(),
                ..Default::default()
            });
        let pending = self
            .lock_book()
            .members
            .get(member)
            .map(|l| l.pending.clone())
            .unwrap_or_default();
        let pw = p.previous_weight(now);
        let tokens = stint::effective_tokens(&line, pw) + pending.tokens;
        let wh = stint::effective_energy_wh(&line, pw) + pending.energy_wh;
        let s = MemberStint {
            tokens: line.stint_tokens,
            energy_wh: line.stint_energy_wh,
        };
        let state = stint::standing(spec, stint::used_fraction(s, tokens, wh));
        Standing {
            state,
            remaining_tokens: stint::remaining_tokens(s, tokens),
            seconds_to_reset,
            replicas,
        }
    }

    /// The spec as last read.
    pub fn spec(&self) -> Option<StintQuotaSpec> {
        self.lock_view().spec.clone()
    }

    fn due(&self) -> bool {
        let (st, sw) = self.slice_config();
        let (heartbeat, members) = {
            let v = self.lock_view();
            let ttl = v
                .spec
                .as_ref()
                .map(|s| s.ledger.replica_ttl_seconds)
                .unwrap_or(30)
                .max(2) as u64;
            let heartbeat = Duration::from_millis(ttl * 1000 / 4);
            let members = v.spec.as_ref().map(|s| s.members.len()).unwrap_or(0);
            (
                v.written_at.is_none_or(|t| t.elapsed() >= heartbeat),
                members,
            )
        };
        let b = self.lock_book();
        heartbeat
            || (!b.pending().is_empty() && self.fold_due(members))
            || !b.surplus(st, sw, Timestamp::now(), IDLE).is_empty()
    }

    /// A lease write in a task of its own, awaited here. A request whose
    /// client leaves drops this future; the write still runs to its end
    /// and takes what it wrote out of the book. Cut between the API
    /// server's answer and the book, the batch would be written again by
    /// the next write (counted twice), and returns taken out of the book
    /// before the write would never reach the register.
    async fn sync_detached(
        self: &Arc<Self>,
        member: &str,
        ask: Ask,
    ) -> Result<(i64, f64), LedgerError> {
        let me = self.clone();
        let member = member.to_string();
        tokio::spawn(async move { me.sync(Some((&member, ask))).await }).await?
    }

    /// One write of the register: refresh, heartbeat, settlements (when
    /// due), returns and an optional lease. Returns what was granted.
    pub async fn sync(&self, lease: Option<(&str, Ask)>) -> Result<(i64, f64), LedgerError> {
        let mut own = self.write.lock().await;
        for attempt in 1..=MAX_ATTEMPTS {
            // The Leases before the status: a settlement folded between the
            // two reads is then seen twice (in the status and the slice),
            // never missed.
            let leases = slice_leases::list(&self.leases, &self.name).await?;
            let mut obj = self.api.get_status(&self.name).await?;
            self.metrics.ledger_op("read");
            let spec = obj.spec.clone();
            let now = Timestamp::now();
            let period = stint::current_period(&spec, now).map_err(|e| {
                LedgerError::Invalid(format!("{}/{}", self.namespace, self.name), e.to_string())
            })?;
            let read = obj.status.take().unwrap_or_default();
            let (pending, returns) =
                self.take_from_book(&spec, now, self.fold_due(spec.members.len()));
            let mine = ReplicaSlices {
                replica: self.replica.clone(),
                beats: own.beats + 1,
                slices: self.lock_book().leased(),
            };
            let mut st = read.clone();
            let (refreshed, dead) = self.refresh(&spec, &mut st, period, now, &leases, &mine);
            for (m, u) in &pending {
                ledger::settle(&mut st, period, &self.replica, m, u);
            }
            // What follows counts in the register's period, which is ahead
            // of this replica's when its clock is behind.
            let period = refreshed.period.unwrap_or(period);
            let granted = match lease {
                Some((m, ask)) => ledger::grant(&spec, &mut st, period, now, &self.replica, m, ask),
                None => (0, 0.0),
            };
            ledger::prune(&mut st);
            mark_metering(&mut st, obj.metadata.generation);
            let store = !ledger_leases::same_stored(&read, &st);
            if store && granted != (0, 0.0) {
                // The grant is in the Lease before anything is admitted
                // against it; until the status is written the Lease holds
                // the settled usage too (an over-count if killed now).
                let mut upper = mine.clone();
                let e = upper
                    .slices
                    .entry(lease.map(|l| l.0.to_string()).unwrap_or_default())
                    .or_default();
                e.0 += granted.0;
                e.1 += granted.1;
                self.write_own(&mut own, &obj, upper).await?;
            }
            if store {
                obj.status = Some(st.clone());
                match self
                    .api
                    .replace_status(&self.name, &PostParams::default(), &obj)
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(ae)) if ae.code == 409 => {
                        self.metrics.ledger_conflicts.inc();
                        // Returns go back into the book: the next try recomputes them.
                        self.move_leases(&returns, true);
                        if attempt > 3 {
                            tokio::time::sleep(Duration::from_millis(
                                5 * u64::from(attempt.min(20)),
                            ))
                            .await;
                        }
                        continue;
                    }
                    Err(e) => {
                        self.move_leases(&returns, true);
                        return Err(e.into());
                    }
                }
                if !pending.is_empty() {
                    *self.folded_at.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(std::time::Instant::now());
                }
            }
            let granted = self
                .commit_own(&mut own, &obj, &pending, lease.map(|l| l.0), granted)
                .await?;
            for d in &dead {
                slice_leases::delete(&self.leases, &d.name, &d.resource_version).await;
            }
            let written = Written {
                attempt,
                pending: &pending,
                returned: returns.len(),
                granted,
                refreshed: &refreshed,
                period,
                spec,
            };
            self.after_write(st, written);
            return Ok(granted);
        }
        Err(LedgerError::Contended(MAX_ATTEMPTS))
    }

    /// The register brought up to now, with the slices and heartbeats of
    /// every replica's Lease: period rollover, dead replicas' slices charged
    /// (and their Leases marked). Returns what changed and the dead Leases.
    fn refresh(
        &self,
        spec: &StintQuotaSpec,
        st: &mut StintQuotaStatus,
        period: PeriodWindow,
        now: Timestamp,
        leases: &[HeldLease],
        mine: &ReplicaSlices,
    ) -> (
        ledger::Refreshed,
        Vec<crate::resources::stint_quota::ReclaimedLease>,
    ) {
        ledger_leases::assemble(st, leases, mine, now);
        let refreshed = ledger::refresh(
            spec,
            st,
            period,
            now,
            spec.ledger.replica_ttl_seconds,
            &self.replica,
            &mut self.heartbeats.lock().unwrap_or_else(|e| e.into_inner()),
        );
        let dead = ledger_leases::mark_dead(st, leases);
        (refreshed, dead)
    }

    /// After the status took `pending` (or nothing needed writing): the
    /// book and this replica's Lease follow, the grant included. Returns
    /// what was granted (nothing when a reader had found this replica dead
    /// and charged its slices).
    async fn commit_own(
        &self,
        own: &mut OwnLease,
        obj: &StintQuota,
        pending: &[(String, Usage)],
        member: Option<&str>,
        granted: (i64, f64),
    ) -> Result<(i64, f64), LedgerError> {
        let mut held = {
            let mut b = self.lock_book();
            b.folded(pending);
            b.leased()
        };
        if let Some(m) = member.filter(|_| granted != (0, 0.0)) {
            let e = held.entry(m.to_string()).or_default();
            e.0 += granted.0;
            e.1 += granted.1;
        }
        let mine = ReplicaSlices {
            replica: self.replica.clone(),
            beats: own.beats + 1,
            slices: held,
        };
        if !self.write_own(own, obj, mine).await? {
            return Ok((0, 0.0));
        }
        // Only now, with the grant in the Lease, may requests use it.
        if let Some(m) = member {
            self.lock_book().granted(m, granted.0, granted.1);
        }
        Ok(granted)
    }

    /// Write this replica's Lease. False when it was gone: a reader found
    /// this replica dead and charged its slices, so the book holds nothing
    /// now and a new, empty Lease is written.
    async fn write_own(
        &self,
        own: &mut OwnLease,
        obj: &StintQuota,
        mine: ReplicaSlices,
    ) -> Result<bool, LedgerError> {
        own.beats = mine.beats;
        match slice_leases::write(&self.leases, obj, &mine, own.version.as_deref()).await? {
            Wrote::Ok(rv) => {
                own.version = Some(rv);
                Ok(true)
            }
            Wrote::Reclaimed => {
                tracing::warn!(quota = %self.name, replica = %self.replica,
                    "this replica's slices were charged as a dead replica's; starting afresh");
                self.lock_book().lost_slices();
                own.beats += 1;
                let empty = ReplicaSlices {
                    replica: self.replica.clone(),
                    beats: own.beats,
                    slices: Default::default(),
                };
                own.version = match slice_leases::write(&self.leases, obj, &empty, None).await? {
                    Wrote::Ok(rv) => Some(rv),
                    Wrote::Reclaimed => None,
                };
                Ok(false)
            }
        }
    }

    /// Settlements (when `fold`) and returns, taken from the book
    /// pessimistically: returned amounts leave the local slice before the
    /// write.
    #[allow(clippy::type_complexity)]
    fn take_from_book(
        &self,
        spec: &StintQuotaSpec,
        now: Timestamp,
        fold: bool,
    ) -> (Vec<(String, Usage)>, Vec<(String, i64, f64)>) {
        let (pending, returns) = {
            let b = self.lock_book();
            let returns = b.surplus(
                spec.ledger.slice_tokens,
                spec.ledger.slice_energy_wh,
                now,
                IDLE,
            );
            (if fold { b.pending() } else { Vec::new() }, returns)
        };
        self.move_leases(&returns, false);
        (pending, returns)
    }

    /// Take `returns` out of the local leases, or put them back (`back`,
    /// after a conflict).
    fn move_leases(&self, returns: &[(String, i64, f64)], back: bool) {
        let mut b = self.lock_book();
        for (m, t, w) in returns {
            if let Some(l) = b.members.get_mut(m) {
                if back {
                    l.leased_tokens += t;
                    l.leased_wh += w;
                } else {
                    l.leased_tokens -= t;
                    l.leased_wh -= w;
                }
            }
        }
    }

    /// After a write: count it, log reclaimed slices, and take the new
    /// register (every replica's slices filled in) into the view.
    fn after_write(&self, status: StintQuotaStatus, w: Written<'_>) {
        self.metrics.ledger_op("write");
        if w.returned > 0 {
            self.metrics.ledger_op("return");
        }
        if w.granted.0 > 0 || w.granted.1 > 0.0 {
            self.metrics.ledger_op("lease");
        }
        tracing::debug!(
            quota = %self.name, attempt = w.attempt, settled = w.pending.len(), returned = w.returned,
            granted = ?w.granted, gateways = status.gateways.len(),
            "register written"
        );
        for r in &w.refreshed.reclaimed {
            self.metrics.ledger_op("reclaim");
            tracing::warn!(
                quota = %self.name, replica = %r.replica, member = %r.member,
                tokens = r.tokens, energy_wh = r.energy_wh,
                "gateway replica stopped heartbeating; its slice is charged to the member"
            );
        }
        self.metrics
            .observe_register(&self.namespace, &self.name, &status);
        let mut v = self.lock_view();
        v.spec = Some(w.spec);
        v.status = status;
        v.period = Some(w.period);
        v.written_at = Some(std::time::Instant::now());
    }

    /// Clean shutdown: write what is pending into the status, then delete
    /// this replica's Lease (every slice goes back).
    pub async fn leave(&self) -> Result<(), LedgerError> {
        let mut own = self.write.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let mut obj = self.api.get_status(&self.name).await?;
            let period = stint::current_period(&obj.spec, Timestamp::now()).map_err(|e| {
                LedgerError::Invalid(format!("{}/{}", self.namespace, self.name), e.to_string())
            })?;
            let mut st = obj.status.take().unwrap_or_default();
            let pending = self.lock_book().pending();
            if !pending.is_empty() {
                for (m, u) in &pending {
                    ledger::settle(&mut st, period, &self.replica, m, u);
                }
                obj.status = Some(st);
                match self
                    .api
                    .replace_status(&self.name, &PostParams::default(), &obj)
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(ae)) if ae.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            {
                let mut b = self.lock_book();
                b.folded(&pending);
                b.lost_slices();
            }
            if let Some(rv) = own.version.take() {
                let name = slice_leases::lease_name(&self.name, &self.replica);
                slice_leases::delete(&self.leases, &name, &rv).await;
            }
            return Ok(());
        }
        Err(LedgerError::Contended(MAX_ATTEMPTS))
    }

    /// Write settlements, heartbeats and returns in the background.
    async fn run(self: Arc<Self>) {
        let mut backoff = FLUSH_EVERY;
        loop {
            tokio::select! {
                _ = self.wake.notified() => tokio::time::sleep(FLUSH_EVERY).await,
                _ = tokio::time::sleep(backoff) => {}
            }
            if !self.due() {
                continue;
            }
            match self.sync(None).await {
                Ok(_) => backoff = FLUSH_EVERY,
                Err(e) => {
                    tracing::warn!(quota = %self.name, error = %e, "writing the register failed; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// A request waiting in [`QuotaLedger::reserve`]: while it waits, its
/// member's slice is not returned (a fresh grant would go back before the
/// request used it). Released however the wait ends, also when the client
/// leaves.
struct Waiting<'a> {
    ledger: &'a QuotaLedger,
    member: String,
}

impl<'a> Waiting<'a> {
    fn new(ledger: &'a QuotaLedger, member: &str) -> Self {
        ledger
            .lock_book()
            .members
            .entry(member.into())
            .or_default()
            .waiting += 1;
        Self {
            ledger,
            member: member.into(),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(l) = self.ledger.lock_book().members.get_mut(&self.member) {
            l.waiting = l.waiting.saturating_sub(1);
        }
    }
}

/// Every quota's ledger in this replica.
pub struct Ledgers {
    client: kube::Client,
    replica: String,
    metrics: Arc<GatewayMetrics>,
    quotas: Mutex<HashMap<(String, String), Arc<QuotaLedger>>>,
}

impl Ledgers {
    pub fn new(client: kube::Client, replica: String, metrics: Arc<GatewayMetrics>) -> Self {
        Self {
            client,
            replica,
            metrics,
            quotas: Mutex::new(HashMap::new()),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The ledger of one quota, started on first use.
    pub fn get(&self, namespace: &str, name: &str) -> Arc<QuotaLedger> {
        let mut m = self.quotas.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((namespace.to_string(), name.to_string()))
            .or_insert_with(|| {
                let q = Arc::new(QuotaLedger {
                    api: Api::namespaced(self.client.clone(), namespace),
                    leases: Api::namespaced(self.client.clone(), namespace),
                    namespace: namespace.into(),
                    name: name.into(),
                    replica: self.replica.clone(),
                    book: Mutex::new(Book::default()),
                    heartbeats: Mutex::new(Heartbeats::default()),
                    write: tokio::sync::Mutex::new(OwnLease::default()),
                    folded_at: Mutex::new(None),
                    view: Mutex::new(View::default()),
                    wake: Notify::new(),
                    metrics: self.metrics.clone(),
                });
                tokio::spawn(q.clone().run());
                q
            })
            .clone()
    }

    /// Give every slice back (on SIGTERM, after requests drained).
    pub async fn leave_all(&self) {
        let all: Vec<Arc<QuotaLedger>> = self
            .quotas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for q in all {
            if let Err(e) = q.leave().await {
                tracing::warn!(quota = %q.name, error = %e, "could not return slices on shutdown");
            }
        }
    }
}
