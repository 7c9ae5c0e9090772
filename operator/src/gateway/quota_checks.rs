//! A StintQuota's own consistency, checked by the gateway, the component
//! that reads it.
//!
//! Kubernetes 1.20 has no CEL, so the API server stores a quota whose
//! sanctions are out of order (`warnAt` above `throttleAt`), whose members
//! have neither a stint nor a pool to share, or whose rolling window is
//! shorter than a minute. And only the gateway sees the members' keys, so
//! only it can tell that two members were given the same one (which then
//! opens for neither: `gateway::keys`). Each gateway replica compares what
//! it finds with the quota's `Valid` condition and, when they differ,
//! writes the condition and a Warning Event. Replicas that agree find the
//! condition already written and do nothing.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource as _, ResourceExt as _};

use super::catalog::Catalog;
use super::keys::KeyTable;
use crate::conditions;
use crate::resources::stint_quota::StintQuota;

/// The condition's type.
pub const CONDITION: &str = "Valid";
/// How often the quotas are looked at (from the watch caches: no API calls
/// unless a condition must change).
const EVERY: Duration = Duration::from_secs(2);

/// What the gateway found wrong with one quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub valid: bool,
    /// `Valid`, `InvalidSpec` or `DuplicateKey` (the first problem's kind).
    pub reason: &'static str,
    pub message: String,
}

/// The verdict on `q`, from its spec and the key table.
pub fn verdict(q: &StintQuota, keys: &KeyTable) -> Verdict {
    let ns = q.namespace().unwrap_or_default();
    let spec_errors = crate::validation::stint_quota(&q.spec);
    let shared = keys.shared_in(&ns, &q.name_any());
    let reason = match (spec_errors.is_empty(), shared.is_empty()) {
        (true, true) => {
            return Verdict {
                valid: true,
                reason: "Valid",
                message: "the spec is consistent and every member's key is its own".into(),
            };
        }
        (false, _) => "InvalidSpec",
        (true, false) => "DuplicateKey",
    };
    let mut problems = spec_errors;
    problems.extend(
        shared
            .into_iter()
            .map(|s| format!("{s}: it opens for none of them until each has a key of its own")),
    );
    Verdict {
        valid: false,
        reason,
        message: problems.join("; "),
    }
}

/// Whether `q`'s status already says `v`.
fn says(q: &StintQuota, v: &Verdict) -> bool {
    q.status.as_ref().is_some_and(|st| {
        st.conditions.iter().any(|c| {
            c.type_ == CONDITION
                && (c.status == "True") == v.valid
                && c.reason == v.reason
                && c.message == v.message
        })
    })
}

/// Keeps every watched quota's `Valid` condition true to what this replica
/// finds, until the process ends.
pub async fn run(client: Client, catalog: Arc<Catalog>, identity: String) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "copyhold-gateway".into(),
            instance: Some(identity),
        },
    );
    loop {
        let keys = catalog.keys();
        for q in catalog.quotas() {
            let v = verdict(&q, &keys);
            if says(&q, &v) {
                continue;
            }
            if let Err(e) = publish(&client, &recorder, &q, &v).await {
                tracing::warn!(quota = %q.name_any(), error = %e, "writing the quota's Valid condition");
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Writes the condition (with the resourceVersion read, retried on a
/// conflict with the ledger's writes), then the Event when it turned false
/// or its message changed.
async fn publish(
    client: &Client,
    recorder: &Recorder,
    q: &StintQuota,
    v: &Verdict,
) -> Result<(), kube::Error> {
    let api: Api<StintQuota> = Api::namespaced(client.clone(), &q.namespace().unwrap_or_default());
    let name = q.name_any();
    for _ in 0..5 {
        let mut obj = api.get_status(&name).await?;
        if says(&obj, v) {
            return Ok(());
        }
        let generation = obj.metadata.generation;
        let st = obj.status.get_or_insert_with(Default::default);
        conditions::set(
            &mut st.conditions,
            CONDITION,
            v.valid,
            v.reason,
            v.message.clone(),
            generation,
            conditions::now(),
        );
        match api
            .replace_status(&name, &PostParams::default(), &obj)
            .await
        {
            Ok(_) => {
                if !v.valid {
                    let ev = Event {
                        type_: EventType::Warning,
                        reason: v.reason.into(),
                        note: Some(v.message.clone()),
                        action: "Check".into(),
                        secondary: None,
                    };
                    recorder.publish(&ev, &q.object_ref(&())).await?;
                }
                return Ok(());
            }
            Err(kube::Error::Api(ae)) if ae.code == 409 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn quota(sanctions: serde_json::Value) -> StintQuota {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
            "metadata": {"name": "commons", "namespace": "town"},
            "spec": {
                "members": [
                    {"name": "ana", "apiKeySecret": {"name": "a"}, "stint": {"tokens": 100}},
                    {"name": "bo", "apiKeySecret": {"name": "b"}, "stint": {"tokens": 100}},
                ],
                "period": {"type": "calendar", "unit": "day"},
                "sanctions": sanctions,
            }
        }))
        .unwrap()
    }

    fn keys(q: &StintQuota, a: &[u8], b: &[u8]) -> KeyTable {
        KeyTable::build([q], |_, name| {
            let k = if name == "a" { a } else { b };
            Some(BTreeMap::from([("api-key".into(), k.to_vec())]))
        })
    }

    #[test]
    fn a_consistent_quota_with_own_keys_is_valid() {
        let q = quota(serde_json::json!({}));
        let v = verdict(&q, &keys(&q, b"k1", b"k2"));
        assert!(v.valid, "{v:?}");
    }

    #[test]
    fn sanctions_out_of_order_are_named() {
        let q = quota(serde_json::json!({"warnAt": 0.9, "throttleAt": 0.5, "suspendAt": 1.0}));
        let v = verdict(&q, &keys(&q, b"k1", b"k2"));
        assert!(!v.valid);
        assert_eq!(v.reason, "InvalidSpec");
        assert!(v.message.contains("spec.sanctions.warnAt"), "{}", v.message);
    }

    #[test]
    fn a_shared_key_names_its_members_and_never_the_key() {
        let q = quota(serde_json::json!({}));
        let v = verdict(&q, &keys(&q, b"sk-secret", b"sk-secret"));
        assert!(!v.valid);
        assert_eq!(v.reason, "DuplicateKey");
        assert!(v.message.contains("ana and bo"), "{}", v.message);
        assert!(!v.message.contains("sk-secret"));
    }
}
