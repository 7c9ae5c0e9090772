//! The ledger against what the API server does to the register between
//! writes (issue 18): it keeps `Time` fields to the second (item 3), and a
//! member can leave the spec and come back within a period (item 4).

use jiff::{SignedDuration, Timestamp};

use crate::commons::ledger::{self, Book, Heartbeats, Reservation, Usage};
use crate::commons::stint;
use crate::resources::stint_quota::{StintQuotaSpec, StintQuotaStatus};

fn spec(window: &str) -> StintQuotaSpec {
    serde_saphyr::from_str(&format!(
        r#"
members:
  - {{name: a, apiKeySecret: {{name: a}}, stint: {{tokens: 100000}}}}
  - {{name: b, apiKeySecret: {{name: b}}}}
period: {{type: rolling, window: {window}}}
sanctions: {{warnAt: 80, throttleAt: 100, suspendAt: 100}}
"#
    ))
    .expect("spec")
}

fn noon() -> Timestamp {
    "2026-11-23T12:00:00Z".parse().expect("time")
}

/// The register as the API server hands it back: `metav1.Time` is
/// marshalled as RFC 3339 without fractions of a second.
fn through_the_api(st: &StintQuotaStatus) -> StintQuotaStatus {
    let mut back = st.clone();
    let whole = |t: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::Time| {
        *t = crate::resources::time::time(t.0);
    };
    back.period_start.iter_mut().for_each(whole);
    back.resets_at.iter_mut().for_each(whole);
    back.gateways
        .iter_mut()
        .for_each(|g| whole(&mut g.renewed_at));
    back
}

/// One write by replica `r1` at `now`, settling `pending`.
fn write(
    sp: &StintQuotaSpec,
    st: &mut StintQuotaStatus,
    seen: &mut Heartbeats,
    now: Timestamp,
    pending: &[(String, Usage)],
) {
    let period = stint::current_period(sp, now).expect("period");
    ledger::refresh(sp, st, period, now, 30, "r1", seen);
    ledger::renew(st, "r1", now);
    for (m, u) in pending {
        ledger::settle(st, period, "r1", m, u);
    }
    ledger::prune(st);
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
fn a_rolling_window_the_register_cannot_store_to_the_second_is_refused() {
    for window in ["1500ms", "500ms", "2s300ms"] {
        assert!(
            stint::current_period(&spec(window), noon()).is_err(),
            "window {window} accepted"
        );
    }
}

#[test]
fn a_short_whole_second_window_keeps_its_usage_across_writes_through_the_api() {
    let sp = spec("2s");
    let now = noon() + SignedDuration::from_millis(100);
    let mut st = StintQuotaStatus::default();
    let mut seen = Heartbeats::default();
    write(&sp, &mut st, &mut seen, now, &[("a".into(), usage(10))]);
    let mut st = through_the_api(&st);
    let later = now + SignedDuration::from_millis(800);
    write(&sp, &mut st, &mut seen, later, &[("a".into(), usage(10))]);
    assert_eq!(st.members[0].tokens, 20, "rolled over within one window");
}

#[test]
fn a_member_removed_and_re_added_keeps_its_usage_of_the_period() {
    let full = spec("1h");
    let mut only_b = full.clone();
    only_b.members.retain(|m| m.name == "b");
    let now = noon();
    let mut st = StintQuotaStatus::default();
    let mut seen = Heartbeats::default();
    write(&full, &mut st, &mut seen, now, &[("a".into(), usage(100))]);
    // Removed while this replica still holds 50 of a's usage unwritten.
    let mut book = Book::default();
    let r = Reservation {
        tokens: 50,
        energy_wh: 0.0,
    };
    book.reserve("a", r, now);
    book.settle("a", r, &usage(50), now);
    let pending = book.pending();
    write(&only_b, &mut st, &mut seen, now, &pending);
    book.written(&pending, &st, "r1");
    // Re-added: the line and the unwritten usage are both still counted.
    let pending = book.pending();
    write(&full, &mut st, &mut seen, now, &pending);
    book.written(&pending, &st, "r1");
    let a = st.members.iter().find(|u| u.name == "a").expect("a listed");
    assert_eq!(a.tokens, 150);
    assert_eq!(st.member_count, 2);
}
