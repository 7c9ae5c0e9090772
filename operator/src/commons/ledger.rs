//! The exact ledger, pure. Gateway replicas share a StintQuota's register
//! through the API server: each leases slices of a member's remaining stint
//! into the status (optimistic concurrency on resourceVersion), reserves
//! requests against its slice locally, and writes settled usage back,
//! shrinking the slice by as much. Hence:
//!
//! - the register's usage is the sum of settled usage, exactly;
//! - a request is admitted only against what the replica holds (it leases
//!   more first), so every admitted reservation lies inside a slice;
//! - a dead replica's slices are charged to their members in full, which
//!   covers everything it settled but never wrote and everything it had in
//!   flight: an over-count bounded by the slice, never an under-count.
//!
//! This module holds the two halves of that arithmetic: the register
//! operations on [`StintQuotaStatus`] and the replica's local [`Book`]. The
//! I/O lives in `gateway::ledger_sync`.

use std::collections::{BTreeMap, HashMap, HashSet};

use jiff::{SignedDuration, Timestamp};

use crate::commons::stint::{self, MemberStint, PeriodWindow};
use crate::resources::stint_quota::{
    GatewayReplica, MemberState, MemberUsage, PeriodBounds, PeriodUsage, Slice, StintQuotaSpec,
    StintQuotaStatus,
};
use crate::resources::time::time;

/// Settled usage of one or more requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Weighted tokens (what stints count).
    pub tokens: i64,
    pub energy_wh: f64,
    pub requests: i64,
}

impl Usage {
    pub fn is_empty(&self) -> bool {
        self.requests == 0 && self.tokens == 0 && self.energy_wh == 0.0
    }

    /// Sums saturate: a register pinned at i64::MAX is wrong but never
    /// below what was served, where a wrapped one would be.
    fn add(&mut self, o: &Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.energy_wh += o.energy_wh;
        self.requests = self.requests.saturating_add(o.requests);
    }

    fn sub(&mut self, o: &Usage) {
        self.prompt_tokens -= o.prompt_tokens;
        self.completion_tokens -= o.completion_tokens;
        self.tokens -= o.tokens;
        self.energy_wh -= o.energy_wh;
        self.requests -= o.requests;
    }
}

/// A dead replica's slice, charged to its member.
#[derive(Clone, Debug, PartialEq)]
pub struct Reclaimed {
    pub replica: String,
    pub member: String,
    pub tokens: i64,
    pub energy_wh: f64,
}

/// What [`refresh`] changed that deserves an Event or a log line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Refreshed {
    pub period_rolled: bool,
    pub reclaimed: Vec<Reclaimed>,
    /// The register's period after the refresh: the writer's own, unless
    /// the writer's clock is behind a period the register already entered.
    pub period: Option<PeriodWindow>,
}

/// What this replica has seen of every replica's heartbeat: its beat
/// count and when, on this replica's own clock, the count last moved. A
/// replica is dead once its count has stood still for the TTL as timed
/// here, so liveness never compares two machines' clocks.
#[derive(Clone, Debug, Default)]
pub struct Heartbeats {
    seen: HashMap<String, (i64, Timestamp)>,
}

impl Heartbeats {
    /// The replicas alive at `now` (the reader's clock), the writer always.
    fn live(
        &mut self,
        gateways: &[GatewayReplica],
        now: Timestamp,
        ttl: SignedDuration,
        writer: &str,
    ) -> HashSet<String> {
        self.seen
            .retain(|name, _| gateways.iter().any(|g| &g.name == name));
        let mut live: HashSet<String> = gateways
            .iter()
            .filter(|g| {
                let seen = self.seen.entry(g.name.clone()).or_insert((g.beats, now));
                if seen.0 != g.beats {
                    *seen = (g.beats, now);
                }
                now.duration_since(seen.1) < ttl
            })
            .map(|g| g.name.clone())
            .collect();
        live.insert(writer.to_string());
        live
    }
}

/// Whether a writer in `period` is behind the register: the register has
/// already entered a later period (the writer's clock is behind).
fn behind(status: &StintQuotaStatus, period: PeriodWindow) -> bool {
    status
        .period_start
        .as_ref()
        .map(|t| t.0)
        .is_some_and(|s| period.end <= s)
}

/// Bring the register in line with the spec and the clock: one line per
/// member (in spec order), stints, period rollover, dead replicas' slices
/// charged, standings. Idempotent for the same inputs. The period never
/// moves backwards: a writer whose clock is behind leaves it as it is.
pub fn refresh(
    spec: &StintQuotaSpec,
    status: &mut StintQuotaStatus,
    period: PeriodWindow,
    now: Timestamp,
    ttl_seconds: i64,
    writer: &str,
    heartbeats: &mut Heartbeats,
) -> Refreshed {
    let mut out = Refreshed::default();
    status.hydrate_history();

    // Members: keep usage of those still listed and add new ones; lines of
    // members no longer listed stay as history (a member re-added within
    // the period finds its usage) until they hold nothing.
    let mut old: HashMap<String, MemberUsage> = status
        .members
        .drain(..)
        .map(|m| (m.name.clone(), m))
        .collect();
    let stints = stint::member_stints(spec);
    status.members = spec
        .members
        .iter()
        .zip(&stints)
        .map(|(m, s)| {
            let mut u = old.remove(&m.name).unwrap_or_else(|| MemberUsage {
                name: m.name.clone(),
                ..Default::default()
            });
            u.stint_tokens = s.tokens;
            u.stint_energy_wh = s.energy_wh;
            u
        })
        .collect();
    let mut gone: Vec<MemberUsage> = old
        .into_values()
        .filter(|u| u.tokens != 0 || u.previous_tokens != 0 || u.energy_wh != 0.0)
        .map(|u| MemberUsage {
            stint_tokens: None,
            stint_energy_wh: None,
            ..u
        })
        .collect();
    gone.sort_by(|x, y| x.name.cmp(&y.name));
    status.members.extend(gone);
    let listed: std::collections::HashSet<&str> =
        spec.members.iter().map(|m| m.name.as_str()).collect();
    status.slices.retain(|s| listed.contains(s.member.as_str()));

    let keep = usize::try_from(spec.register.history_periods).unwrap_or(0);
    let period = roll(status, period, keep, &mut out);
    out.period = Some(period);
    reclaim(status, heartbeats, now, ttl_seconds, writer, &mut out);
    restate(spec, status, period, now.max(period.start));
    out
}

/// Period rollover, forwards only: a writer whose clock is behind keeps
/// the register's newer period. Closing a period records each member's
/// use in its bounded history. Returns the register's period.
fn roll(
    status: &mut StintQuotaStatus,
    period: PeriodWindow,
    keep: usize,
    out: &mut Refreshed,
) -> PeriodWindow {
    let prev = status.period_start.as_ref().map(|t| t.0);
    if let Some(start) = prev.filter(|_| behind(status, period)) {
        let len = period.end.duration_since(period.start);
        let end = status
            .resets_at
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(start + len);
        return PeriodWindow {
            start,
            end,
            ..period
        };
    }
    // Compared as the register keeps them: to the second.
    let (start, end) = (time(period.start), time(period.end));
    let prev_start = status.period_start.clone();
    if prev_start.as_ref() != Some(&start) {
        if let Some(prev) = prev {
            out.period_rolled = true;
            let prev_end = status.resets_at.as_ref().map(|t| t.0);
            let consecutive = prev_start.as_ref().is_some_and(|s| s.0 < start.0)
                && status.resets_at.as_ref() == Some(&start);
            status.periods.push(PeriodBounds {
                start: time(prev),
                end: time(prev_end.unwrap_or(period.start)),
            });
            for u in &mut status.members {
                record_period(u, prev, prev_end.unwrap_or(period.start), keep);
                if consecutive {
                    u.previous_tokens = u.tokens;
                    u.previous_energy_wh = u.energy_wh;
                } else {
                    u.previous_tokens = 0;
                    u.previous_energy_wh = 0.0;
                }
                u.tokens = 0;
                u.prompt_tokens = 0;
                u.completion_tokens = 0;
                u.energy_wh = 0.0;
                u.requests = 0;
                u.reclaimed_tokens = 0;
            }
        }
        status.period_start = Some(start);
    }
    status.resets_at = Some(end);
    let extra = status.periods.len().saturating_sub(keep);
    status.periods.drain(..extra);
    for u in &mut status.members {
        bound_history(u, keep);
    }
    period
}

/// Dead replicas (their heartbeat stood still for the TTL, as this reader
/// timed it; the writer is alive whatever the register says of it): charge
/// their slices to the members.
fn reclaim(
    status: &mut StintQuotaStatus,
    heartbeats: &mut Heartbeats,
    now: Timestamp,
    ttl_seconds: i64,
    writer: &str,
    out: &mut Refreshed,
) {
    let ttl = SignedDuration::from_secs(ttl_seconds.max(1));
    let live = heartbeats.live(&status.gateways, now, ttl, writer);
    status.gateways.retain(|g| live.contains(&g.name));
    let mut kept = Vec::with_capacity(status.slices.len());
    for s in status.slices.drain(..) {
        if live.contains(&s.replica) {
            kept.push(s);
            continue;
        }
        if let Some(u) = status.members.iter_mut().find(|u| u.name == s.member) {
            u.tokens += s.tokens;
            u.reclaimed_tokens += s.tokens;
            u.energy_wh += s.energy_wh;
        }
        out.reclaimed.push(Reclaimed {
            replica: s.replica,
            member: s.member,
            tokens: s.tokens,
            energy_wh: s.energy_wh,
        });
    }
    status.slices = kept;
}

/// Close a member's period into its history (oldest first), keeping the
/// last `keep`: the register page shows the trend from these lines.
fn record_period(u: &mut MemberUsage, start: Timestamp, end: Timestamp, keep: usize) {
    u.history.push(PeriodUsage {
        start: time(start),
        end: time(end),
        tokens: u.tokens,
        energy_wh: u.energy_wh,
        requests: u.requests,
    });
    bound_history(u, keep);
}

/// Drop the oldest periods beyond `keep` (also when the bound was lowered).
fn bound_history(u: &mut MemberUsage, keep: usize) {
    let extra = u.history.len().saturating_sub(keep);
    u.history.drain(..extra);
}

/// Standings, the quota's one-word state and the counters `kubectl get`
/// shows.
fn restate(
    spec: &StintQuotaSpec,
    status: &mut StintQuotaStatus,
    period: PeriodWindow,
    now: Timestamp,
) {
    let pw = period.previous_weight(now);
    let mut worst = MemberState::Ok;
    for u in &mut status.members {
        let s = MemberStint {
            tokens: u.stint_tokens,
            energy_wh: u.stint_energy_wh,
        };
        let f = stint::used_fraction(
            s,
            stint::effective_tokens(u, pw),
            stint::effective_energy_wh(u, pw),
        );
        u.state = stint::standing(spec, f);
        worst = worst.max_state(u.state);
    }
    status.member_count = spec.members.len() as i32;
    status.period_description = Some(stint::describe_period(spec));
    status.state = Some(
        match worst {
            MemberState::Ok => "Ok",
            _ => "Warned",
        }
        .into(),
    );
}

impl MemberState {
    fn rank(self) -> u8 {
        match self {
            MemberState::Ok => 0,
            MemberState::Warned => 1,
            MemberState::Throttled => 2,
            MemberState::Suspended => 3,
        }
    }
    /// The worse of two standings.
    pub fn max_state(self, o: MemberState) -> MemberState {
        if o.rank() > self.rank() { o } else { self }
    }
}

/// Record that `replica` is alive: one more beat.
pub fn renew(status: &mut StintQuotaStatus, replica: &str, now: Timestamp) {
    match status.gateways.iter_mut().find(|g| g.name == replica) {
        Some(g) => {
            g.renewed_at = time(now);
            g.beats = g.beats.wrapping_add(1);
        }
        None => status.gateways.push(GatewayReplica {
            name: replica.into(),
            renewed_at: time(now),
            beats: 1,
        }),
    }
}

/// Remove `replica` from the register after returning its slices (clean
/// shutdown).
pub fn leave(status: &mut StintQuotaStatus, replica: &str) {
    status.gateways.retain(|g| g.name != replica);
    status.slices.retain(|s| s.replica != replica);
}

fn slice_mut<'a>(status: &'a mut StintQuotaStatus, replica: &str, member: &str) -> &'a mut Slice {
    let i = match status
        .slices
        .iter()
        .position(|s| s.replica == replica && s.member == member)
    {
        Some(i) => i,
        None => {
            status.slices.push(Slice {
                replica: replica.into(),
                member: member.into(),
                tokens: 0,
                energy_wh: 0.0,
            });
            status.slices.len() - 1
        }
    };
    &mut status.slices[i]
}

/// The slice `replica` holds for `member`: (tokens, Wh).
pub fn slice_of(status: &StintQuotaStatus, replica: &str, member: &str) -> (i64, f64) {
    status
        .slices
        .iter()
        .find(|s| s.replica == replica && s.member == member)
        .map(|s| (s.tokens, s.energy_wh))
        .unwrap_or((0, 0.0))
}

/// Write usage settled by a writer in `period`: the member's line grows by
/// it and the replica's slice shrinks by as much (never below zero: an
/// overshoot is charged in full). A writer still in an older period (its
/// clock is behind) adds to the previous period's history instead. Usage of
/// a member no longer listed is dropped with the member.
pub fn settle(
    status: &mut StintQuotaStatus,
    period: PeriodWindow,
    replica: &str,
    member: &str,
    usage: &Usage,
) {
    let older = behind(status, period);
    let Some(u) = status.members.iter_mut().find(|u| u.name == member) else {
        return;
    };
    if older {
        u.previous_tokens = u.previous_tokens.saturating_add(usage.tokens);
        u.previous_energy_wh += usage.energy_wh;
    } else {
        u.prompt_tokens = u.prompt_tokens.saturating_add(usage.prompt_tokens);
        u.completion_tokens = u.completion_tokens.saturating_add(usage.completion_tokens);
        u.tokens = u.tokens.saturating_add(usage.tokens);
        u.energy_wh += usage.energy_wh;
        u.requests = u.requests.saturating_add(usage.requests);
    }
    if let Some(s) = status
        .slices
        .iter_mut()
        .find(|s| s.replica == replica && s.member == member)
    {
        s.tokens = (s.tokens - usage.tokens).max(0);
        s.energy_wh = (s.energy_wh - usage.energy_wh).max(0.0);
    }
}

/// How much a replica asks to lease: `want` (a full slice) and `need`
/// (what the waiting request lacks).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ask {
    pub want_tokens: i64,
    pub need_tokens: i64,
    pub want_wh: f64,
    pub need_wh: f64,
}

/// Lease more of a member's remaining stint (up to its ceiling, counting
/// every replica's slices as spent) into `replica`'s slice. Near the
/// ceiling a replica gets what its request needs but no more than half its
/// share of the rest, so one replica does not hoard what the others' members
/// need. Unlimited dimensions are granted in full: slices of unlimited
/// members still matter, because they are what a dead replica is charged.
/// Returns what was granted.
pub fn grant(
    spec: &StintQuotaSpec,
    status: &mut StintQuotaStatus,
    period: PeriodWindow,
    now: Timestamp,
    replica: &str,
    member: &str,
    ask: Ask,
) -> (i64, f64) {
    let Ask {
        want_tokens,
        need_tokens,
        want_wh,
        need_wh,
    } = ask;
    let live = status.gateways.len().max(1);
    let Some(u) = status.members.iter().find(|u| u.name == member) else {
        return (0, 0.0);
    };
    let pw = period.previous_weight(now);
    let s = MemberStint {
        tokens: u.stint_tokens,
        energy_wh: u.stint_energy_wh,
    };
    let (held_t, held_wh) = status
        .slices
        .iter()
        .filter(|x| x.member == member)
        .fold((0i64, 0f64), |(t, w), x| (t + x.tokens, w + x.energy_wh));
    let g_t = match stint::ceiling_tokens(spec, s) {
        None => want_tokens.max(0),
        Some(c) => {
            let left = (c - stint::effective_tokens(u, pw) - held_t).max(0);
            let cap = need_tokens.max(left / (2 * live as i64));
            want_tokens.min(cap).clamp(0, left)
        }
    };
    let g_wh = match stint::ceiling_energy_wh(spec, s) {
        None => want_wh.max(0.0),
        Some(c) => {
            let left = (c - stint::effective_energy_wh(u, pw) - held_wh).max(0.0);
            let cap = need_wh.max(left / (2.0 * live as f64));
            want_wh.min(cap).clamp(0.0, left)
        }
    };
    let sl = slice_mut(status, replica, member);
    sl.tokens += g_t;
    sl.energy_wh += g_wh;
    (g_t, g_wh)
}

/// Give back part of a slice.
pub fn release(status: &mut StintQuotaStatus, replica: &str, member: &str, tokens: i64, wh: f64) {
    if let Some(i) = status
        .slices
        .iter()
        .position(|s| s.replica == replica && s.member == member)
    {
        let s = &mut status.slices[i];
        s.tokens = (s.tokens - tokens.max(0)).max(0);
        s.energy_wh = (s.energy_wh - wh.max(0.0)).max(0.0);
    }
}

/// Drop empty slices so the register stays small.
pub fn prune(status: &mut StintQuotaStatus) {
    status
        .slices
        .retain(|s| s.tokens > 0 || s.energy_wh > 1e-12);
}

/// What a request holds against its member until it settles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reservation {
    pub tokens: i64,
    pub energy_wh: f64,
}

/// A replica's local view of one member: its slice as last written, and
/// what is reserved and settled against it since.
#[derive(Clone, Debug, Default)]
pub struct Local {
    pub leased_tokens: i64,
    pub leased_wh: f64,
    pub reserved_tokens: i64,
    pub reserved_wh: f64,
    pub in_flight: u32,
    /// Settled, not yet written to the register.
    pub pending: Usage,
    /// Last reservation or settlement, for returning idle slices.
    pub last_active: Option<Timestamp>,
    /// Requests waiting for a lease for this member: its slice is not
    /// returned meanwhile, or a grant could go back before they use it.
    pub waiting: u32,
}

impl Local {
    pub fn available_tokens(&self) -> i64 {
        self.leased_tokens - self.reserved_tokens - self.pending.tokens
    }
    pub fn available_wh(&self) -> f64 {
        self.leased_wh - self.reserved_wh - self.pending.energy_wh
    }
}

/// Whether a reservation fits the local slice or needs a lease first.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fit {
    Fits,
    /// Lease more, then ask again.
    NeedLease(Ask),
}

/// One replica's local ledger.
#[derive(Debug, Default)]
pub struct Book {
    pub members: BTreeMap<String, Local>,
}

impl Book {
    /// Whether `r` fits what this replica holds for `member`.
    pub fn fit(&self, member: &str, r: Reservation, slice_tokens: i64, slice_wh: f64) -> Fit {
        let l = self.members.get(member).cloned().unwrap_or_default();
        let (at, aw) = (l.available_tokens(), l.available_wh());
        if at >= r.tokens && aw >= r.energy_wh {
            return Fit::Fits;
        }
        let need_tokens = (r.tokens - at).max(0);
        let need_wh = (r.energy_wh - aw).max(0.0);
        Fit::NeedLease(Ask {
            want_tokens: if need_tokens == 0 {
                0
            } else {
                slice_tokens.max(need_tokens)
            },
            need_tokens,
            want_wh: if need_wh <= 0.0 {
                0.0
            } else {
                slice_wh.max(need_wh)
            },
            need_wh,
        })
    }

    pub fn reserve(&mut self, member: &str, r: Reservation, now: Timestamp) {
        let l = self.members.entry(member.into()).or_default();
        l.reserved_tokens += r.tokens;
        l.reserved_wh += r.energy_wh;
        l.in_flight += 1;
        l.last_active = Some(now);
    }

    /// A request ended: its reservation is replaced by its actual usage.
    pub fn settle(&mut self, member: &str, r: Reservation, usage: &Usage, now: Timestamp) {
        let l = self.members.entry(member.into()).or_default();
        l.reserved_tokens -= r.tokens;
        l.reserved_wh -= r.energy_wh;
        l.in_flight = l.in_flight.saturating_sub(1);
        l.pending.add(usage);
        l.last_active = Some(now);
    }

    /// Snapshot of pending usage to write.
    pub fn pending(&self) -> Vec<(String, Usage)> {
        self.members
            .iter()
            .filter(|(_, l)| !l.pending.is_empty())
            .map(|(m, l)| (m.clone(), l.pending.clone()))
            .collect()
    }

    /// After a successful write of `written`: those usages are in the
    /// register, and the slices are what the written status says.
    pub fn written(
        &mut self,
        written: &[(String, Usage)],
        status: &StintQuotaStatus,
        replica: &str,
    ) {
        for (m, u) in written {
            if let Some(l) = self.members.get_mut(m) {
                l.pending.sub(u);
            }
        }
        for s in status.slices.iter().filter(|s| s.replica == replica) {
            self.members.entry(s.member.clone()).or_default();
        }
        for (m, l) in self.members.iter_mut() {
            let (t, w) = slice_of(status, replica, m);
            l.leased_tokens = t;
            l.leased_wh = w;
        }
    }

    /// What this replica holds, member by member, for its slice Lease.
    pub fn leased(&self) -> BTreeMap<String, (i64, f64)> {
        self.members
            .iter()
            .filter(|(_, l)| l.leased_tokens > 0 || l.leased_wh > 1e-12)
            .map(|(m, l)| (m.clone(), (l.leased_tokens, l.leased_wh)))
            .collect()
    }

    /// After the status took `written` (and before the slice Lease shrinks
    /// by it): the usage leaves the pending part and the slice together,
    /// as [`settle`] does in the register, so what is available stays the
    /// same.
    pub fn folded(&mut self, written: &[(String, Usage)]) {
        for (m, u) in written {
            if let Some(l) = self.members.get_mut(m) {
                l.pending.sub(u);
                l.leased_tokens = (l.leased_tokens - u.tokens).max(0);
                l.leased_wh = (l.leased_wh - u.energy_wh).max(0.0);
            }
        }
    }

    /// A grant is in this replica's Lease: it may be reserved against.
    pub fn granted(&mut self, member: &str, tokens: i64, wh: f64) {
        let l = self.members.entry(member.into()).or_default();
        l.leased_tokens += tokens;
        l.leased_wh += wh;
    }

    /// A reader found this replica dead and charged its slices: it holds
    /// nothing any more.
    pub fn lost_slices(&mut self) {
        for l in self.members.values_mut() {
            l.leased_tokens = 0;
            l.leased_wh = 0.0;
        }
    }

    /// Parts of slices to give back: everything above one slice, or all
    /// that is unused once a member has been idle for `idle`.
    pub fn surplus(
        &self,
        slice_tokens: i64,
        slice_wh: f64,
        now: Timestamp,
        idle: SignedDuration,
    ) -> Vec<(String, i64, f64)> {
        self.members
            .iter()
            .filter(|(_, l)| l.waiting == 0)
            .filter_map(|(m, l)| {
                let idle_now = l.in_flight == 0 && l.last_active.is_none_or(|t| t + idle <= now);
                let keep_t = if idle_now { 0 } else { slice_tokens };
                let keep_w = if idle_now { 0.0 } else { slice_wh };
                let t = (l.available_tokens() - keep_t).max(0);
                let w = (l.available_wh() - keep_w).max(0.0);
                let worth =
                    t > keep_t.max(1) || (idle_now && t > 0) || (w > keep_w.max(1e-9) && w > 0.0);
                worth.then(|| (m.clone(), t, w))
            })
            .collect()
    }

    /// Reservations and settlements not yet in the register.
    pub fn quiet(&self) -> bool {
        self.members
            .values()
            .all(|l| l.in_flight == 0 && l.pending.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> StintQuotaSpec {
        serde_saphyr::from_str(
            r#"
members:
  - {name: a, apiKeySecret: {name: a}, stint: {tokens: 1000}}
  - {name: b, apiKeySecret: {name: b}}
period: {type: calendar, unit: day, timeZone: UTC}
sanctions: {warnAt: 80, throttleAt: 100, suspendAt: 100}
"#,
        )
        .expect("spec")
    }

    fn t(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn a_period_read_back_from_the_register_to_the_second_is_still_the_same_period() {
        let mut sp = spec();
        // Windows are whole seconds (shorter parts are refused, see
        // stint::current_period); a 91 s window starts off the minute.
        sp.period = serde_saphyr::from_str("{type: rolling, window: 91s}").expect("period");
        let now = t("2026-11-24T02:00:05Z");
        let p = stint::current_period(&sp, now).expect("period");
        let mut st = StintQuotaStatus::default();
        refresh(&sp, &mut st, p, now, 30, "test", &mut Heartbeats::default());
        st.members[0].tokens = 10;
        // What the API server gives back: its Time is RFC 3339 to the second.
        let json = serde_json::to_value(&st).expect("serializes");
        let mut st: StintQuotaStatus = serde_json::from_value(json).expect("reads back");
        let later = t("2026-11-24T02:00:10Z");
        let p2 = stint::current_period(&sp, later).expect("period");
        assert_eq!(p2, p, "still the same window");
        let r = refresh(
            &sp,
            &mut st,
            p2,
            later,
            30,
            "test",
            &mut Heartbeats::default(),
        );
        assert!(!r.period_rolled, "the period did not roll over");
        assert_eq!(st.members[0].tokens, 10, "usage is kept");
    }

    fn fresh(now: Timestamp) -> (StintQuotaSpec, StintQuotaStatus, PeriodWindow) {
        let sp = spec();
        let p = stint::current_period(&sp, now).expect("period");
        let mut st = StintQuotaStatus::default();
        refresh(&sp, &mut st, p, now, 30, "test", &mut Heartbeats::default());
        (sp, st, p)
    }

    fn ask_t(want: i64, need: i64) -> Ask {
        Ask {
            want_tokens: want,
            need_tokens: need,
            want_wh: 0.0,
            need_wh: 0.0,
        }
    }

    #[test]
    fn near_the_ceiling_a_replica_gets_its_need_but_does_not_hoard() {
        let now = t("2026-11-23T12:00:00Z");
        let (sp, mut st, p) = fresh(now);
        for r in ["r1", "r2"] {
            renew(&mut st, r, now);
        }
        // 1000 left, two replicas: a full slice is capped at 1000 / 4.
        assert_eq!(
            grant(&sp, &mut st, p, now, "r1", "a", ask_t(900, 100)).0,
            250
        );
        // A request needing more than that still gets what it needs.
        assert_eq!(
            grant(&sp, &mut st, p, now, "r2", "a", ask_t(900, 600)).0,
            600
        );
        assert_eq!(
            grant(&sp, &mut st, p, now, "r2", "a", ask_t(900, 600)).0,
            150
        );
    }

    fn usage(tokens: i64) -> Usage {
        Usage {
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
            tokens,
            energy_wh: 0.0,
            requests: 1,
        }
    }

    #[test]
    fn grants_stop_at_the_ceiling_counting_every_replicas_slice() {
        let now = t("2026-11-23T12:00:00Z");
        let (sp, mut st, p) = fresh(now);
        assert_eq!(
            grant(&sp, &mut st, p, now, "r1", "a", ask_t(600, 600)).0,
            600
        );
        assert_eq!(
            grant(&sp, &mut st, p, now, "r2", "a", ask_t(600, 600)).0,
            400
        );
        assert_eq!(grant(&sp, &mut st, p, now, "r3", "a", ask_t(600, 600)).0, 0);
        // Unlimited members are granted what they ask.
        assert_eq!(
            grant(&sp, &mut st, p, now, "r1", "b", ask_t(1 << 40, 1 << 40)).0,
            1 << 40
        );
    }

    #[test]
    fn settling_moves_usage_from_the_slice_to_the_register() {
        let now = t("2026-11-23T12:00:00Z");
        let (sp, mut st, p) = fresh(now);
        renew(&mut st, "r1", now);
        grant(&sp, &mut st, p, now, "r1", "a", ask_t(500, 500));
        settle(&mut st, p, "r1", "a", &usage(120));
        assert_eq!(st.members[0].tokens, 120);
        assert_eq!(slice_of(&st, "r1", "a"), (380, 0.0));
        // Overshoot: usage beyond the slice is charged in full.
        settle(&mut st, p, "r1", "a", &usage(900));
        assert_eq!(st.members[0].tokens, 1020);
        assert_eq!(slice_of(&st, "r1", "a"), (0, 0.0));
        refresh(&sp, &mut st, p, now, 30, "test", &mut Heartbeats::default());
        assert_eq!(st.members[0].state, MemberState::Suspended);
    }

    #[test]
    fn a_dead_replicas_slice_is_charged_in_full() {
        let now = t("2026-11-23T12:00:00Z");
        let (sp, mut st, p) = fresh(now);
        renew(&mut st, "dead", now);
        renew(&mut st, "live", now);
        grant(&sp, &mut st, p, now, "dead", "a", ask_t(300, 300));
        let mut seen = Heartbeats::default();
        refresh(&sp, &mut st, p, now, 30, "live", &mut seen);
        let later = now + SignedDuration::from_secs(30);
        renew(&mut st, "live", later);
        let r = refresh(&sp, &mut st, p, later, 30, "live", &mut seen);
        assert_eq!(r.reclaimed.len(), 1);
        assert_eq!(st.members[0].tokens, 300);
        assert_eq!(st.members[0].reclaimed_tokens, 300);
        assert!(st.slices.is_empty());
        assert_eq!(st.gateways.len(), 1);
        // A writer missing from the list (say, pruned) keeps its own slices.
        grant(&sp, &mut st, p, later, "ghost", "a", ask_t(10, 10));
        refresh(&sp, &mut st, p, later, 30, "ghost", &mut seen);
        assert_eq!(slice_of(&st, "ghost", "a"), (10, 0.0));
    }

    #[test]
    fn a_new_period_resets_usage_and_keeps_slices() {
        let now = t("2026-11-23T23:59:00Z");
        let (sp, mut st, p) = fresh(now);
        renew(&mut st, "r1", now);
        grant(&sp, &mut st, p, now, "r1", "a", ask_t(200, 200));
        settle(&mut st, p, "r1", "a", &usage(50));
        let next = t("2026-11-24T00:00:10Z");
        renew(&mut st, "r1", next);
        let p2 = stint::current_period(&sp, next).unwrap();
        let r = refresh(&sp, &mut st, p2, next, 30, "r1", &mut Heartbeats::default());
        assert!(r.period_rolled);
        assert_eq!(st.members[0].tokens, 0);
        assert_eq!(st.members[0].previous_tokens, 50);
        assert_eq!(slice_of(&st, "r1", "a"), (150, 0.0));
        assert_eq!(st.resets_at, Some(time(t("2026-11-25T00:00:00Z"))));
    }

    #[test]
    fn a_rollover_keeps_each_members_last_periods_bounded() {
        let mut now = t("2026-11-20T12:00:00Z");
        let (mut sp, mut st, _) = fresh(now);
        sp.register.history_periods = 2;
        // Four days, a different usage each day; the register keeps two.
        for used in [10, 20, 30, 40] {
            let p = stint::current_period(&sp, now).expect("period");
            refresh(&sp, &mut st, p, now, 30, "r1", &mut Heartbeats::default());
            settle(&mut st, p, "r1", "a", &usage(used));
            now += SignedDuration::from_hours(24);
        }
        let p = stint::current_period(&sp, now).expect("period");
        refresh(&sp, &mut st, p, now, 30, "r1", &mut Heartbeats::default());
        let h = &st.members[0].history;
        assert_eq!(
            h.iter().map(|x| x.tokens).collect::<Vec<_>>(),
            vec![30, 40],
            "oldest first, bounded"
        );
        assert_eq!(h[1].start, time(t("2026-11-23T00:00:00Z")));
        assert_eq!(h[1].end, time(t("2026-11-24T00:00:00Z")));
        assert_eq!(h[1].requests, 1);
        // b used nothing: its idle periods are kept too, as zeros.
        assert_eq!(st.members[1].history.len(), 2);
        // A smaller bound applies at once, not only at the next rollover.
        sp.register.history_periods = 1;
        refresh(&sp, &mut st, p, now, 30, "r1", &mut Heartbeats::default());
        assert_eq!(st.members[0].history.len(), 1);
        assert_eq!(st.members[0].history[0].tokens, 40);
    }

    #[test]
    fn removed_members_leave_the_register_with_their_slices() {
        let now = t("2026-11-23T12:00:00Z");
        let (mut sp, mut st, p) = fresh(now);
        grant(&sp, &mut st, p, now, "r1", "b", ask_t(10, 10));
        sp.members.truncate(1);
        refresh(&sp, &mut st, p, now, 30, "test", &mut Heartbeats::default());
        assert_eq!(st.members.len(), 1);
        assert!(st.slices.is_empty());
        assert_eq!(st.member_count, 1);
    }

    #[test]
    fn the_book_admits_only_what_the_replica_holds() {
        let now = t("2026-11-23T12:00:00Z");
        let (sp, mut st, p) = fresh(now);
        let mut book = Book::default();
        let r = Reservation {
            tokens: 400,
            energy_wh: 0.0,
        };
        // Ask for a slice of 300: less than one request needs.
        let Fit::NeedLease(ask) = book.fit("a", r, 300, 0.0) else {
            panic!("needs a lease")
        };
        assert_eq!((ask.want_tokens, ask.need_tokens), (400, 400));
        grant(&sp, &mut st, p, now, "r1", "a", ask_t(950, 950));
        book.written(&[], &st, "r1");
        assert_eq!(book.fit("a", r, 300, 0.0), Fit::Fits);
        book.reserve("a", r, now);
        book.reserve("a", r, now);
        // 150 left of 950: not enough, the ceiling has 50 more.
        assert!(matches!(book.fit("a", r, 300, 0.0), Fit::NeedLease(_)));
        let g = grant(&sp, &mut st, p, now, "r1", "a", ask_t(300, 250));
        assert_eq!(g.0, 50);
        book.written(&[], &st, "r1");
        assert!(
            matches!(book.fit("a", r, 300, 0.0), Fit::NeedLease(_)),
            "200 held, 400 asked: no overshoot"
        );
        // Settle both with what they used; write; the register is exact.
        for used in [390, 380] {
            book.settle("a", r, &usage(used), now);
        }
        let pend = book.pending();
        for (m, u) in &pend {
            settle(&mut st, p, "r1", m, u);
        }
        book.written(&pend, &st, "r1");
        assert_eq!(st.members[0].tokens, 770);
        assert!(book.quiet());
        assert_eq!(slice_of(&st, "r1", "a"), (230, 0.0));
    }

    #[test]
    fn idle_members_give_their_slices_back() {
        let now = t("2026-11-23T12:00:00Z");
        let (sp, mut st, p) = fresh(now);
        let mut book = Book::default();
        grant(&sp, &mut st, p, now, "r1", "a", ask_t(900, 900));
        book.written(&[], &st, "r1");
        let r = Reservation {
            tokens: 10,
            energy_wh: 0.0,
        };
        book.reserve("a", r, now);
        // Busy: keep one slice (100), return the rest.
        assert_eq!(
            book.surplus(100, 0.0, now, SignedDuration::from_secs(10)),
            vec![("a".to_string(), 790, 0.0)]
        );
        book.settle("a", r, &usage(10), now);
        let later = now + SignedDuration::from_secs(11);
        assert_eq!(
            book.surplus(100, 0.0, later, SignedDuration::from_secs(10)),
            vec![("a".to_string(), 890, 0.0)]
        );
    }
}
