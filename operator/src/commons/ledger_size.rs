//! The register's size at the schema's maxima (issue 18, "Size"): every
//! object the ledger writes must stay well under etcd's request limit
//! (`--max-request-bytes`, 1.5 MiB by default; the API server refuses a
//! larger object), whatever the number of gateway replicas. The register is
//! built by [`crate::commons::maxima`].

use crate::commons::maxima::{
    ETCD_LIMIT, MAX_HISTORY, MAX_MEMBERS, WELL_UNDER, register_at_maxima, replica_names,
    spec_at_maxima, stored,
};
use crate::resources::stint_quota::StintQuotaStatus;

fn bytes<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).expect("serializes").len()
}

#[test]
fn a_stint_quotas_status_at_the_schemas_maxima_with_five_replicas_stays_under_half_of_etcds_limit()
{
    let sp = spec_at_maxima();
    let replicas = replica_names(5);
    let st = register_at_maxima(&sp, &replicas);
    assert_eq!(st.members.len(), MAX_MEMBERS);
    assert!(
        st.members
            .iter()
            .all(|u| u.history.len() == MAX_HISTORY as usize),
        "history full"
    );
    assert_eq!(
        st.slices.len(),
        5 * MAX_MEMBERS,
        "every replica holds every member"
    );
    let q = stored(&sp, &st);
    let (total, spec, status) = (bytes(&q), bytes(&q.spec), bytes(&st));
    let members = bytes(&st.members);
    let history: usize = st.members.iter().map(|u| bytes(&u.history)).sum();
    println!(
        "StintQuota at maxima: {total} bytes ({:.1} % of etcd's {ETCD_LIMIT}); spec {spec}; \
         status {status} ({:.1} %): members {members} (history {history})",
        100.0 * total as f64 / ETCD_LIMIT as f64,
        100.0 * status as f64 / ETCD_LIMIT as f64,
    );
    let json = String::from_utf8(serde_json::to_vec(&st).expect("serializes")).expect("utf-8");
    assert!(
        replicas.iter().all(|r| !json.contains(r.as_str())),
        "the stored status names no replica: its size does not grow with them"
    );
    assert!(
        status <= WELL_UNDER,
        "the status is {status} bytes, over half of etcd's {ETCD_LIMIT}"
    );
    assert!(
        total < ETCD_LIMIT,
        "the StintQuota is {total} bytes, over etcd's {ETCD_LIMIT}"
    );
}

#[test]
fn the_register_read_back_has_every_history_lines_period() {
    let mut sp = spec_at_maxima();
    sp.members.truncate(3);
    let st = register_at_maxima(&sp, &replica_names(1));
    let mut back: StintQuotaStatus =
        serde_json::from_slice(&serde_json::to_vec(&st).expect("serializes")).expect("reads");
    back.hydrate_history();
    for (a, b) in st.members.iter().zip(&back.members) {
        assert_eq!(a.history, b.history);
    }
}
