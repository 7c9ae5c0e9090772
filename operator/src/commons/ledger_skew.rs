//! The ledger when gateway replicas' clocks disagree (issue 18, item 1).
//! Each test drives the pure register operations the way
//! `gateway::ledger_sync` does in one write (refresh, renew, settle, prune),
//! with every replica reading its own, skewed clock.

use std::cell::RefCell;
use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};

use crate::commons::ledger::{self, Heartbeats, Usage};
use crate::commons::stint;
use crate::resources::stint_quota::{StintQuotaSpec, StintQuotaStatus};

/// Four members, a rolling 40 s window: the measured setup of the issue.
fn rolling_spec() -> StintQuotaSpec {
    serde_saphyr::from_str(
        r#"
members:
  - {name: m0, apiKeySecret: {name: m0}, stint: {tokens: 100000000}}
  - {name: m1, apiKeySecret: {name: m1}, stint: {tokens: 100000000}}
  - {name: m2, apiKeySecret: {name: m2}, stint: {tokens: 100000000}}
  - {name: m3, apiKeySecret: {name: m3}, stint: {tokens: 100000000}}
period: {type: rolling, window: 40s}
sanctions: {warnAt: 80, throttleAt: 100, suspendAt: 100}
"#,
    )
    .expect("spec")
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

thread_local! {
    /// Each replica's memory of the others' heartbeats (one test, one thread).
    static SEEN: RefCell<HashMap<String, Heartbeats>> = RefCell::new(HashMap::new());
}

/// One write of the register by `replica`, whose clock reads `clock`.
fn write(
    sp: &StintQuotaSpec,
    st: &mut StintQuotaStatus,
    replica: &str,
    clock: Timestamp,
    pending: &[(String, Usage)],
) {
    let period = stint::current_period(sp, clock).expect("period");
    SEEN.with_borrow_mut(|seen| {
        let mine = seen.entry(replica.to_string()).or_default();
        ledger::refresh(sp, st, period, clock, 30, replica, mine);
    });
    ledger::renew(st, replica, clock);
    for (m, u) in pending {
        ledger::settle(st, period, replica, m, u);
    }
    ledger::prune(st);
}

fn period_start(st: &StintQuotaStatus) -> Option<Timestamp> {
    st.period_start.as_ref().map(|t| t.0)
}

fn noon() -> Timestamp {
    "2026-11-23T12:00:00Z".parse().expect("time")
}

/// A time 20 s before a period boundary, and the boundary.
fn before_a_boundary(sp: &StintQuotaSpec) -> (Timestamp, Timestamp) {
    let boundary = stint::current_period(sp, noon()).expect("period").end;
    (boundary - SignedDuration::from_secs(20), boundary)
}

#[test]
fn the_period_in_the_register_never_moves_backwards_when_a_replica_clock_is_behind() {
    let sp = rolling_spec();
    let (_, boundary) = before_a_boundary(&sp);
    let mut st = StintQuotaStatus::default();
    // Real time is one second past the boundary: the replica 3 s ahead has
    // rolled; the one 3 s behind is still in the older period.
    let real = boundary + SignedDuration::from_secs(1);
    write(
        &sp,
        &mut st,
        "ahead",
        real + SignedDuration::from_secs(3),
        &[],
    );
    assert_eq!(period_start(&st), Some(boundary));
    write(
        &sp,
        &mut st,
        "behind",
        real - SignedDuration::from_secs(3),
        &[],
    );
    assert_eq!(period_start(&st), Some(boundary), "periodStart moved back");
    assert_eq!(
        st.resets_at.as_ref().map(|t| t.0),
        Some(boundary + SignedDuration::from_secs(40)),
        "resetsAt moved back"
    );
}

#[test]
fn a_write_from_a_replica_still_in_the_older_period_adds_to_that_periods_history() {
    let sp = rolling_spec();
    let (before, boundary) = before_a_boundary(&sp);
    let mut st = StintQuotaStatus::default();
    write(&sp, &mut st, "ahead", before, &[("m0".into(), usage(100))]);
    let real = boundary + SignedDuration::from_secs(1);
    write(
        &sp,
        &mut st,
        "ahead",
        real + SignedDuration::from_secs(3),
        &[],
    );
    write(
        &sp,
        &mut st,
        "behind",
        real - SignedDuration::from_secs(3),
        &[("m0".into(), usage(30))],
    );
    // And a replica with the right time writes after both.
    write(&sp, &mut st, "exact", real, &[("m0".into(), usage(5))]);
    let m0 = &st.members[0];
    assert_eq!(
        (m0.previous_tokens, m0.tokens),
        (130, 5),
        "the older period's usage (100 + 30) is history; the new one holds 5"
    );
}

#[test]
fn three_replicas_with_skewed_clocks_across_a_boundary_count_every_token() {
    let sp = rolling_spec();
    let (start, _) = before_a_boundary(&sp);
    let skews = [("r-minus3", -3), ("r-zero", 0), ("r-plus3", 3)];
    let mut st = StintQuotaStatus::default();
    let mut served = [0i64; 4];
    let mut backwards = 0;
    let mut last_start = None;
    // 40 s of load in 250 ms steps, the boundary in the middle.
    for step in 0..160 {
        let real = start + SignedDuration::from_millis(250 * step);
        for (i, (replica, skew)) in skews.iter().enumerate() {
            let m = (step as usize + i) % 4;
            served[m] += 10;
            let pending = [(format!("m{m}"), usage(10))];
            write(
                &sp,
                &mut st,
                replica,
                real + SignedDuration::from_secs(*skew),
                &pending,
            );
            let now_start = period_start(&st);
            if last_start.is_some() && now_start < last_start {
                backwards += 1;
            }
            last_start = now_start;
        }
    }
    let registered: Vec<i64> = st
        .members
        .iter()
        .map(|u| u.tokens + u.previous_tokens)
        .collect();
    println!(
        "served {served:?}, registered {registered:?}, periodStart moved back {backwards} times"
    );
    assert_eq!(backwards, 0, "periodStart moved back");
    assert_eq!(registered, served.to_vec(), "the register lost usage");
}

fn lease(sp: &StintQuotaSpec, st: &mut StintQuotaStatus, replica: &str, clock: Timestamp) {
    let period = stint::current_period(sp, clock).expect("period");
    let ask = ledger::Ask {
        want_tokens: 500,
        need_tokens: 500,
        want_wh: 0.0,
        need_wh: 0.0,
    };
    ledger::grant(sp, st, period, clock, replica, "m0", ask);
}

#[test]
fn a_reader_whose_clock_is_ahead_does_not_reclaim_a_live_replicas_slice() {
    // A daily period, so that no rollover muddles the count.
    let mut sp = rolling_spec();
    sp.period =
        serde_saphyr::from_str("{type: calendar, unit: day, timeZone: UTC}").expect("period");
    let real = noon();
    let mut st = StintQuotaStatus::default();
    let slow = real - SignedDuration::from_secs(1);
    let fast = real + SignedDuration::from_secs(31);
    // Both replicas keep writing, well within the 30 s TTL of each other.
    for beat in 0..3 {
        let d = SignedDuration::from_secs(beat);
        write(&sp, &mut st, "slow", slow + d, &[]);
        if beat == 0 {
            lease(&sp, &mut st, "slow", slow);
        }
        write(&sp, &mut st, "fast", fast + d, &[]);
    }
    assert_eq!(ledger::slice_of(&st, "slow", "m0").0, 500);
    assert_eq!(st.members[0].reclaimed_tokens, 0);
}
