//! The register split in two kinds of object, pure. The StintQuota's status
//! holds what every replica shares (member lines, period, standings); each
//! gateway replica keeps its own slices and heartbeat in a Lease of its own
//! per quota, so the status does not grow with the number of replicas and a
//! replica's frequent writes touch only its own small object.
//!
//! The ledger's arithmetic ([`crate::commons::ledger`]) still runs on one
//! [`StintQuotaStatus`]: [`assemble`] fills its `slices` and `gateways` in
//! from the Leases before, and [`own_slices`] takes this replica's part out
//! after. The order of the writes keeps the ledger's promises
//! (`gateway::ledger_sync`):
//!
//! - a grant is written to the replica's Lease before the replica admits
//!   anything against it;
//! - settled usage is written to the status before the Lease's slice
//!   shrinks by it (a kill in between over-counts, never under-counts);
//! - a dead replica's Lease is charged to the status together with a
//!   [`ReclaimedLease`] mark, then deleted: readers skip marked Leases, so
//!   its slices are charged exactly once.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::resources::stint_quota::{GatewayReplica, ReclaimedLease, Slice, StintQuotaStatus};
use crate::resources::time::time;

/// One replica's part of a quota's register, as its Lease carries it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ReplicaSlices {
    /// The replica's identity.
    pub replica: String,
    /// Writes of this Lease: readers judge the replica dead when the count
    /// stands still for the TTL on their own clock.
    pub beats: i64,
    /// Member → (weighted tokens, watt-hours) held.
    pub slices: BTreeMap<String, (i64, f64)>,
}

/// A replica's Lease as read: its name and resourceVersion, and what it
/// holds.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldLease {
    pub name: String,
    pub resource_version: String,
    /// The Lease's renew time (the writer's clock, for people).
    pub renewed_at: Timestamp,
    pub held: ReplicaSlices,
}

/// Fill `status.slices` and `status.gateways` from the other replicas'
/// Leases (those not yet charged) and this replica's own part, and forget
/// marks of Leases that are gone.
pub fn assemble(
    status: &mut StintQuotaStatus,
    leases: &[HeldLease],
    own: &ReplicaSlices,
    now: Timestamp,
) {
    status.reclaimed.retain(|r| {
        leases
            .iter()
            .any(|l| l.name == r.name && l.resource_version == r.resource_version)
    });
    status.slices.clear();
    status.gateways.clear();
    let others = leases
        .iter()
        .filter(|l| l.held.replica != own.replica && !charged(status, l))
        .map(|l| (&l.held, l.renewed_at))
        .collect::<Vec<_>>();
    for (held, renewed) in others.into_iter().chain(std::iter::once((own, now))) {
        status.gateways.push(GatewayReplica {
            name: held.replica.clone(),
            renewed_at: time(renewed),
            beats: held.beats,
        });
        status
            .slices
            .extend(held.slices.iter().map(|(m, (t, w))| Slice {
                replica: held.replica.clone(),
                member: m.clone(),
                tokens: *t,
                energy_wh: *w,
            }));
    }
}

/// Whether the register already charged this Lease's slices.
fn charged(status: &StintQuotaStatus, l: &HeldLease) -> bool {
    status
        .reclaimed
        .iter()
        .any(|r| r.name == l.name && r.resource_version == l.resource_version)
}

/// After [`crate::commons::ledger::refresh`]: the Leases of replicas it
/// found dead (they left `status.gateways`), marked in the status so that
/// no reader charges them again. Returns them, for deleting.
pub fn mark_dead(status: &mut StintQuotaStatus, leases: &[HeldLease]) -> Vec<ReclaimedLease> {
    let dead: Vec<ReclaimedLease> = leases
        .iter()
        .filter(|l| !charged(status, l))
        .filter(|l| !status.gateways.iter().any(|g| g.name == l.held.replica))
        .map(|l| ReclaimedLease {
            name: l.name.clone(),
            resource_version: l.resource_version.clone(),
        })
        .collect();
    status.reclaimed.extend(dead.iter().cloned());
    dead
}

/// This replica's slices in the register, for its Lease.
pub fn own_slices(status: &StintQuotaStatus, replica: &str) -> BTreeMap<String, (i64, f64)> {
    status
        .slices
        .iter()
        .filter(|s| s.replica == replica && (s.tokens > 0 || s.energy_wh > 1e-12))
        .map(|s| (s.member.clone(), (s.tokens, s.energy_wh)))
        .collect()
}

/// The stored part of two statuses is the same: nothing to write. Compared
/// as stored (JSON), since the in-memory form carries more (slices,
/// heartbeats, each history line's bounds).
pub fn same_stored(a: &StintQuotaStatus, b: &StintQuotaStatus) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, rv: &str, replica: &str, beats: i64, tokens: i64) -> HeldLease {
        HeldLease {
            name: name.into(),
            resource_version: rv.into(),
            renewed_at: Timestamp::UNIX_EPOCH,
            held: ReplicaSlices {
                replica: replica.into(),
                beats,
                slices: BTreeMap::from([("a".to_string(), (tokens, 0.0))]),
            },
        }
    }

    #[test]
    fn a_charged_lease_is_skipped_until_it_is_gone() {
        let mut st = StintQuotaStatus::default();
        let own = ReplicaSlices {
            replica: "me".into(),
            ..Default::default()
        };
        let leases = vec![
            lease("l-dead", "7", "dead", 3, 100),
            lease("l-live", "9", "live", 5, 50),
        ];
        assemble(&mut st, &leases, &own, Timestamp::UNIX_EPOCH);
        assert_eq!(st.slices.len(), 2);
        assert_eq!(st.gateways.len(), 3, "both others and this replica");
        // The reader finds "dead" dead: refresh drops it from the gateways.
        st.gateways.retain(|g| g.name != "dead");
        let marked = mark_dead(&mut st, &leases);
        assert_eq!(marked.len(), 1);
        assert_eq!(marked[0].name, "l-dead");
        // The next reader still lists the Lease (not yet deleted): skipped.
        assemble(&mut st, &leases, &own, Timestamp::UNIX_EPOCH);
        assert_eq!(st.slices.len(), 1);
        assert!(mark_dead(&mut st, &leases).is_empty(), "not charged twice");
        // Once it is gone, its mark goes too.
        assemble(&mut st, &leases[1..], &own, Timestamp::UNIX_EPOCH);
        assert!(st.reclaimed.is_empty());
    }

    #[test]
    fn a_register_read_back_and_refreshed_without_change_needs_no_write() {
        use crate::commons::maxima::{register_at_maxima, replica_names, spec_at_maxima};
        let mut sp = spec_at_maxima();
        sp.members.truncate(3);
        let st = register_at_maxima(&sp, &replica_names(1));
        let read: StintQuotaStatus =
            serde_json::from_slice(&serde_json::to_vec(&st).expect("json")).expect("reads");
        let mut again = read.clone();
        again.hydrate_history();
        assert!(same_stored(&read, &again), "history bounds are not stored");
        again.members[0].tokens += 1;
        assert!(!same_stored(&read, &again));
    }

    #[test]
    fn a_lease_written_again_after_it_was_charged_counts_again() {
        let mut st = StintQuotaStatus::default();
        st.reclaimed.push(ReclaimedLease {
            name: "l".into(),
            resource_version: "7".into(),
        });
        let own = ReplicaSlices {
            replica: "me".into(),
            ..Default::default()
        };
        // The replica was alive after all and wrote its Lease again.
        assemble(
            &mut st,
            &[lease("l", "8", "r", 4, 30)],
            &own,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(st.slices.len(), 1);
        assert!(st.reclaimed.is_empty());
    }
}
