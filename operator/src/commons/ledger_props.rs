//! Property tests of the pure ledger (issue 18): random interleavings of
//! lease, reserve, settle, return, kill and rollover across three gateway
//! replicas keep the ledger's two promises, for every member:
//!
//! - the register is never below what was served;
//! - the over-count is at most the slices the killed replicas held.
//!
//! Each replica drives its [`Book`] and the register exactly as
//! `gateway::ledger_sync` does; a kill drops a replica's book (its pending
//! usage and in-flight requests with it) and a new incarnation takes its
//! place. A killed replica's in-flight requests count as served in full.

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use crate::commons::ledger::{self, Book, Fit, Heartbeats, Reservation, Usage};
use crate::commons::stint;
use crate::resources::stint_quota::{StintQuotaSpec, StintQuotaStatus};

const TTL: i64 = 30;
const SLICE: i64 = 300;
const MEMBERS: usize = 3;
const IDLE: SignedDuration = SignedDuration::from_secs(10);
/// Live replicas write at least this often (a quarter of the TTL).
const HEARTBEAT_MS: i64 = TTL * 1000 / 4;

/// A small stint (the ceiling matters), a larger one, and an unlimited
/// member, over a rolling 40 s window.
fn spec() -> StintQuotaSpec {
    serde_saphyr::from_str(
        r#"
members:
  - {name: m0, apiKeySecret: {name: m0}, stint: {tokens: 2000}}
  - {name: m1, apiKeySecret: {name: m1}, stint: {tokens: 50000}}
  - {name: m2, apiKeySecret: {name: m2}}
period: {type: rolling, window: 40s}
sanctions: {warnAt: 80, throttleAt: 100, suspendAt: 100}
ledger: {sliceTokens: 300}
"#,
    )
    .expect("spec")
}

#[derive(Clone, Debug)]
enum Op {
    /// Reserve (leasing first when the slice does not cover it).
    Request {
        replica: usize,
        member: usize,
        tokens: i64,
    },
    /// Settle one in-flight request with part of its reservation.
    Finish {
        replica: usize,
        pick: usize,
        used_percent: i64,
    },
    /// Write pending usage and return surplus slices.
    Flush { replica: usize },
    /// SIGKILL, and a new incarnation in its place.
    Kill { replica: usize },
    /// SIGKILL between a write's two halves (`gateway::ledger_sync`): the
    /// status took the batch, the replica's slice Lease still holds what
    /// it held before (with a grant of that write, if any).
    KillMidWrite { replica: usize },
    /// Time passes, live replicas heartbeating (rollovers happen on a
    /// write).
    Tick { millis: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..MEMBERS, 1..1500i64)
            .prop_map(|(replica, member, tokens)| Op::Request { replica, member, tokens }),
        3 => (0..3usize, 0..8usize, 0..=100i64).prop_map(|(replica, pick, used_percent)| {
            Op::Finish { replica, pick, used_percent }
        }),
        2 => (0..3usize).prop_map(|replica| Op::Flush { replica }),
        1 => (0..3usize).prop_map(|replica| Op::Kill { replica }),
        1 => (0..3usize).prop_map(|replica| Op::KillMidWrite { replica }),
        1 => (1..15_000i64).prop_map(|millis| Op::Tick { millis }),
    ]
}

struct Replica {
    name: String,
    incarnation: u32,
    book: Book,
    seen: Heartbeats,
    in_flight: Vec<(String, Reservation)>,
}

impl Replica {
    fn new(i: usize, incarnation: u32) -> Self {
        Self {
            name: format!("r{i}-{incarnation}"),
            incarnation,
            book: Book::default(),
            seen: Heartbeats::default(),
            in_flight: Vec::new(),
        }
    }
}

struct World {
    sp: StintQuotaSpec,
    st: StintQuotaStatus,
    now: Timestamp,
    replicas: Vec<Replica>,
    served: [i64; MEMBERS],
    /// Usage that rollovers moved out of the register's two periods.
    history: [i64; MEMBERS],
    /// Slices the killed replicas held when they died.
    killed_slices: [i64; MEMBERS],
}

fn member_index(m: &str) -> usize {
    m.trim_start_matches('m').parse().expect("member name")
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

impl World {
    fn new() -> Self {
        let now: Timestamp = "2026-11-23T12:00:00Z".parse().expect("time");
        Self {
            sp: spec(),
            st: StintQuotaStatus::default(),
            now,
            replicas: (0..3).map(|i| Replica::new(i, 0)).collect(),
            served: [0; MEMBERS],
            history: [0; MEMBERS],
            killed_slices: [0; MEMBERS],
        }
    }

    fn register(&self) -> [i64; MEMBERS] {
        let mut r = self.history;
        for u in &self.st.members {
            r[member_index(&u.name)] += u.tokens + u.previous_tokens;
        }
        r
    }

    /// One write of the register, as `QuotaLedger::sync` does it.
    fn write(&mut self, ri: usize, lease: Option<(&str, ledger::Ask)>) -> i64 {
        let period = stint::current_period(&self.sp, self.now).expect("period");
        let before = self.register();
        let name = self.replicas[ri].name.clone();
        let seen = &mut self.replicas[ri].seen;
        let refreshed = ledger::refresh(&self.sp, &mut self.st, period, self.now, TTL, &name, seen);
        let mut after = self.register();
        for r in &refreshed.reclaimed {
            after[member_index(&r.member)] -= r.tokens;
        }
        for i in 0..MEMBERS {
            self.history[i] += before[i] - after[i];
        }
        ledger::renew(&mut self.st, &name, self.now);
        let book = &self.replicas[ri].book;
        let returns = book.surplus(SLICE, 0.0, self.now, IDLE);
        let pending = book.pending();
        for (m, u) in &pending {
            ledger::settle(&mut self.st, period, &name, m, u);
        }
        for (m, t, w) in &returns {
            ledger::release(&mut self.st, &name, m, *t, *w);
        }
        let granted = match lease {
            Some((m, ask)) => {
                ledger::grant(&self.sp, &mut self.st, period, self.now, &name, m, ask).0
            }
            None => 0,
        };
        ledger::prune(&mut self.st);
        self.replicas[ri].book.written(&pending, &self.st, &name);
        granted
    }

    /// Admission, as `QuotaLedger::reserve` does it.
    fn request(&mut self, ri: usize, member: &str, tokens: i64) {
        let r = Reservation {
            tokens,
            energy_wh: 0.0,
        };
        for _ in 0..4 {
            let ask = match self.replicas[ri].book.fit(member, r, SLICE, 0.0) {
                Fit::Fits => return self.admit(ri, member, r),
                Fit::NeedLease(ask) => ask,
            };
            let granted = self.write(ri, Some((member, ask)));
            let book = &self.replicas[ri].book;
            if book.fit(member, r, SLICE, 0.0) == Fit::Fits {
                return self.admit(ri, member, r);
            }
            if granted == 0 {
                return;
            }
        }
    }

    fn admit(&mut self, ri: usize, member: &str, r: Reservation) {
        let rep = &mut self.replicas[ri];
        rep.book.reserve(member, r, self.now);
        rep.in_flight.push((member.to_string(), r));
    }

    fn finish(&mut self, ri: usize, pick: usize, used_percent: i64) {
        let rep = &mut self.replicas[ri];
        if rep.in_flight.is_empty() {
            return;
        }
        let (m, r) = rep.in_flight.remove(pick % rep.in_flight.len());
        let used = r.tokens * used_percent / 100;
        rep.book.settle(&m, r, &usage(used), self.now);
        self.served[member_index(&m)] += used;
    }

    /// A write whose status half lands and whose Lease half does not: the
    /// replica's slices in the register are what its Lease held, never
    /// less (the grant is written first), then it dies.
    fn kill_mid_write(&mut self, ri: usize) {
        let name = self.replicas[ri].name.clone();
        let lease_before: Vec<_> = self
            .st
            .slices
            .iter()
            .filter(|s| s.replica == name)
            .cloned()
            .collect();
        self.write(ri, None);
        for before in lease_before {
            let now = self
                .st
                .slices
                .iter_mut()
                .find(|s| s.replica == name && s.member == before.member);
            match now {
                Some(s) => s.tokens = s.tokens.max(before.tokens),
                None => self.st.slices.push(before),
            }
        }
        self.kill(ri);
    }

    fn kill(&mut self, ri: usize) {
        let rep = &self.replicas[ri];
        for (m, r) in &rep.in_flight {
            self.served[member_index(m)] += r.tokens;
        }
        for s in self.st.slices.iter().filter(|s| s.replica == rep.name) {
            self.killed_slices[member_index(&s.member)] += s.tokens;
        }
        let next = rep.incarnation + 1;
        self.replicas[ri] = Replica::new(ri, next);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Request {
                replica,
                member,
                tokens,
            } => self.request(replica, &format!("m{member}"), tokens),
            Op::Finish {
                replica,
                pick,
                used_percent,
            } => self.finish(replica, pick, used_percent),
            Op::Flush { replica } => {
                self.write(replica, None);
            }
            Op::Kill { replica } => self.kill(replica),
            Op::KillMidWrite { replica } => self.kill_mid_write(replica),
            Op::Tick { millis } => self.pass(millis),
        }
    }

    /// Time passes; every live replica writes each heartbeat, as its
    /// background loop does.
    fn pass(&mut self, millis: i64) {
        let mut left = millis;
        while left > 0 {
            let step = left.min(HEARTBEAT_MS);
            self.now += SignedDuration::from_millis(step);
            left -= step;
            for ri in 0..self.replicas.len() {
                self.write(ri, None);
            }
        }
    }

    /// Live replicas finish and write everything; the dead are found dead.
    fn drain(&mut self) {
        for ri in 0..self.replicas.len() {
            while !self.replicas[ri].in_flight.is_empty() {
                self.finish(ri, 0, 100);
            }
        }
        self.pass(2 * (TTL + 2) * 1000);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_interleavings_never_under_count_and_over_count_at_most_the_killed_slices(
        ops in proptest::collection::vec(op(), 1..80)
    ) {
        let mut w = World::new();
        for op in &ops {
            w.apply(op);
        }
        w.drain();
        let register = w.register();
        for (i, ((reg, served), killed)) in
            register.iter().zip(w.served).zip(w.killed_slices).enumerate()
        {
            prop_assert!(*reg >= served, "m{i}: register {reg} below served {served}");
            prop_assert!(
                reg - served <= killed,
                "m{i}: over-count {} above the killed slices {killed}", reg - served
            );
        }
    }
}
