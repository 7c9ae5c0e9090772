//! A StintQuota at the schema's maxima, for size checks (issue 18,
//! "Size"): every string at its longest, every optional field set, 1000
//! members, a full history, and every gateway replica holding a slice of
//! every member. Built through the ledger's own operations, as replicas
//! write it. Used by the size tests (`commons::ledger_size`, the slice
//! Leases' and the e2e test against a real API server).

use jiff::{SignedDuration, Timestamp};
use kube::api::ObjectMeta;

use crate::commons::ledger::{self, Ask, Heartbeats, Usage};
use crate::commons::stint;
use crate::resources::stint_quota::{
    Member, MemberSecretRef, RateLimits, Stint, StintQuota, StintQuotaSpec, StintQuotaStatus,
};

/// etcd's default `--max-request-bytes`.
pub const ETCD_LIMIT: usize = 1_572_864;
/// "Well under" the limit: half of it.
pub const WELL_UNDER: usize = ETCD_LIMIT / 2;
/// `spec.members` maxItems in the CRD.
pub const MAX_MEMBERS: usize = 1000;
/// `register.historyPeriods` maximum in the CRD.
pub const MAX_HISTORY: i32 = 6;

/// A name of `len` characters that the member-name pattern accepts,
/// distinct for each `i`.
pub fn long_name(prefix: &str, i: usize, len: usize) -> String {
    let head = format!("{prefix}{i:05}-");
    format!("{head}{}", "x".repeat(len - head.len()))
}

/// A spec at the schema's maxima: 1000 members with 63-character names,
/// 253-character Secret names and keys, a stint, limits and a priority.
pub fn spec_at_maxima() -> StintQuotaSpec {
    let mut sp: StintQuotaSpec = serde_saphyr::from_str(
        r#"
members: []
period: {type: calendar, unit: day, timeZone: America/Argentina/ComodRivadavia}
sanctions: {warnAt: 80, throttleAt: 100, suspendAt: 120}
"#,
    )
    .expect("spec");
    sp.register.history_periods = MAX_HISTORY;
    sp.members = (0..MAX_MEMBERS)
        .map(|i| Member {
            name: long_name("m", i, 63),
            api_key_secret: MemberSecretRef {
                name: long_name("s", i, 253),
                key: long_name("k", i, 253),
            },
            weight: None,
            stint: Some(Stint {
                tokens: Some(999_999_999_999),
                energy_wh: Some(999_999.999_999),
            }),
            limits: Some(RateLimits {
                requests_per_minute: Some(1_000_000),
                concurrent_requests: Some(100_000),
            }),
            priority: Default::default(),
        })
        .collect();
    sp
}

/// Gateway replica identities as `main` makes them: a Pod name (63
/// characters here) and a per-process suffix.
pub fn replica_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{}-{:08x}",
                long_name("gw", i, 63),
                0xdead_beef_u32 + i as u32
            )
        })
        .collect()
}

fn big_usage(i: usize) -> Usage {
    Usage {
        prompt_tokens: 123_456_789_012 + i as i64,
        completion_tokens: 234_567_890_123 + i as i64,
        tokens: 357_913_578_135 + i as i64,
        energy_wh: 12_345.678_901_234 + i as f64,
        requests: 1_234_567_890 + i as i64,
    }
}

/// The register after `replicas` replicas wrote it for seven days, each
/// holding a slice of every member at the end and settling for every
/// member every day: history full, every line's numbers large.
pub fn register_at_maxima(sp: &StintQuotaSpec, replicas: &[String]) -> StintQuotaStatus {
    let mut st = StintQuotaStatus::default();
    let mut seen: Vec<Heartbeats> = replicas.iter().map(|_| Heartbeats::default()).collect();
    let mut now: Timestamp = "2026-11-16T12:00:00Z".parse().expect("time");
    let ask = Ask {
        want_tokens: 4096,
        need_tokens: 4096,
        want_wh: 0.5,
        need_wh: 0.5,
    };
    for day in 0..=MAX_HISTORY + 1 {
        let period = stint::current_period(sp, now).expect("period");
        for (r, name) in replicas.iter().enumerate() {
            ledger::refresh(sp, &mut st, period, now, 30, name, &mut seen[r]);
            ledger::renew(&mut st, name, now);
            for (i, m) in sp.members.iter().enumerate() {
                if day <= MAX_HISTORY {
                    ledger::settle(&mut st, period, name, &m.name, &big_usage(i));
                }
                ledger::grant(sp, &mut st, period, now, name, &m.name, ask);
            }
            ledger::prune(&mut st);
        }
        now += SignedDuration::from_hours(24);
    }
    st
}

/// The StintQuota as the API server stores it (metadata at its longest).
pub fn stored(sp: &StintQuotaSpec, st: &StintQuotaStatus) -> StintQuota {
    let mut q = StintQuota::new(&long_name("q", 0, 253), sp.clone());
    q.metadata = ObjectMeta {
        name: q.metadata.name.take(),
        namespace: Some(long_name("ns", 0, 63)),
        uid: Some("0b4e7c2a-6f1d-4e8a-9c3b-2d5f7a8e1c40".into()),
        resource_version: Some("18446744073709551615".into()),
        generation: Some(i64::MAX),
        ..Default::default()
    };
    q.status = Some(st.clone());
    q
}
