//! Members' API keys. Only SHA-256 digests are kept; a presented key is
//! hashed and compared with every digest in constant time, so neither the
//! comparison nor the table's layout says how close a guess came. Keys are
//! never logged.
//!
//! A key under two members (in one quota or two) opens for neither: there
//! is no "first match wins" that would charge one member's use to another.
//! The members are named (never the key) for the quotas' `Valid` condition.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::resources::common::Priority;
use crate::resources::stint_quota::StintQuota;

/// Who a key belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub namespace: String,
    pub quota: String,
    pub member: String,
    pub priority: Priority,
}

/// The digest table.
#[derive(Clone, Debug, Default)]
pub struct KeyTable {
    entries: Vec<([u8; 32], Owner)>,
    /// Digests found under more than one member, with those members.
    shared: Vec<([u8; 32], Vec<Owner>)>,
    /// Members whose Secret or key is missing, for the log.
    pub missing: Vec<String>,
}

/// Why a presented key opens nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    /// No member has it.
    Unknown,
    /// More than one member has it.
    Shared,
}

pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl KeyTable {
    /// Build from the quotas and a lookup of Secret data
    /// (`namespace`, `name`) → key → bytes.
    pub fn build<'a>(
        quotas: impl IntoIterator<Item = &'a StintQuota>,
        secret: impl Fn(&str, &str) -> Option<BTreeMap<String, Vec<u8>>>,
    ) -> KeyTable {
        let mut t = KeyTable::default();
        for q in quotas {
            let ns = q.metadata.namespace.clone().unwrap_or_default();
            let quota = q.metadata.name.clone().unwrap_or_default();
            for m in &q.spec.members {
                let key = secret(&ns, &m.api_key_secret.name)
                    .and_then(|d| d.get(&m.api_key_secret.key).cloned());
                // Trailing newlines come from `kubectl create secret --from-file`.
                match key.map(|k| trim(&k).to_vec()) {
                    Some(k) if !k.is_empty() => t.entries.push((
                        digest(&k),
                        Owner {
                            namespace: ns.clone(),
                            quota: quota.clone(),
                            member: m.name.clone(),
                            priority: m.priority,
                        },
                    )),
                    _ => t.missing.push(format!("{ns}/{quota}/{}", m.name)),
                }
            }
        }
        t.set_aside_shared();
        t
    }

    /// Moves every digest held by more than one member out of `entries`.
    fn set_aside_shared(&mut self) {
        let mut by_digest: BTreeMap<[u8; 32], Vec<Owner>> = BTreeMap::new();
        for (d, o) in self.entries.drain(..) {
            by_digest.entry(d).or_default().push(o);
        }
        for (d, mut owners) in by_digest {
            if owners.len() == 1 {
                self.entries.extend(owners.pop().map(|o| (d, o)));
            } else {
                self.shared.push((d, owners));
            }
        }
    }

    /// The owner of `key`, or why there is none. Every digest is compared,
    /// in constant time each.
    pub fn owner(&self, key: &[u8]) -> Result<Owner, KeyRefusal> {
        let d = digest(trim(key));
        let mut found: Option<&Owner> = None;
        for (e, owner) in &self.entries {
            if bool::from(e.ct_eq(&d)) && found.is_none() {
                found = Some(owner);
            }
        }
        let mut shared = false;
        for (e, _) in &self.shared {
            shared |= bool::from(e.ct_eq(&d));
        }
        match (found, shared) {
            (Some(o), false) => Ok(o.clone()),
            (_, true) => Err(KeyRefusal::Shared),
            (None, false) => Err(KeyRefusal::Unknown),
        }
    }

    /// For the quota `namespace/quota`: one sentence per key it shares
    /// with another member, naming the members (never the key).
    pub fn shared_in(&self, namespace: &str, quota: &str) -> Vec<String> {
        self.shared
            .iter()
            .filter(|(_, owners)| {
                owners
                    .iter()
                    .any(|o| o.namespace == namespace && o.quota == quota)
            })
            .map(|(_, owners)| describe_sharing(owners))
            .collect()
    }

    /// The owner of `key`, if exactly one member has it.
    pub fn lookup(&self, key: &[u8]) -> Option<Owner> {
        self.owner(key).ok()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn trim(k: &[u8]) -> &[u8] {
    let end = k
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map(|i| i + 1)
        .unwrap_or(0);
    &k[..end]
}

/// "members ana and bo of town/commons share one API key", or with each
/// member's quota when they differ.
fn describe_sharing(owners: &[Owner]) -> String {
    let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for o in owners {
        groups
            .entry((o.namespace.clone(), o.quota.clone()))
            .or_default()
            .push(o.member.clone());
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|((ns, q), mut ms)| {
            ms.sort();
            format!("{} of {ns}/{q}", join_and(&ms))
        })
        .collect();
    format!("members {} share one API key", join_and(&parts))
}

/// "a", "a and b", "a, b and c".
fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(ns: &str, name: &str, members: &[(&str, &str)]) -> StintQuota {
        let ms: Vec<serde_json::Value> = members
            .iter()
            .map(|(m, s)| serde_json::json!({"name": m, "apiKeySecret": {"name": s}}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "copyhold.dev/v1alpha1", "kind": "StintQuota",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"members": ms, "period": {"type": "calendar", "unit": "day"}}
        }))
        .expect("quota")
    }

    #[test]
    fn keys_map_to_their_members_and_nothing_else() {
        let q = quota(
            "town",
            "commons",
            &[("ana", "ana-key"), ("bo", "bo-key"), ("cy", "gone")],
        );
        let t = KeyTable::build([&q], |ns, name| {
            assert_eq!(ns, "town");
            match name {
                "ana-key" => Some(BTreeMap::from([("api-key".into(), b"sk-ana\n".to_vec())])),
                "bo-key" => Some(BTreeMap::from([("api-key".into(), b"sk-bo".to_vec())])),
                _ => None,
            }
        });
        assert_eq!(t.len(), 2);
        assert_eq!(t.missing, vec!["town/commons/cy".to_string()]);
        assert_eq!(t.lookup(b"sk-ana").unwrap().member, "ana");
        assert_eq!(t.lookup(b"sk-bo").unwrap().member, "bo");
        assert!(t.lookup(b"sk-an").is_none());
        assert!(t.lookup(b"").is_none());
        // The table holds digests, not keys.
        assert!(!format!("{t:?}").contains("sk-ana"));
    }

    #[test]
    fn a_key_given_to_two_members_opens_for_neither_and_names_them() {
        let q = quota(
            "town",
            "commons",
            &[("ana", "ana-key"), ("bo", "bo-key"), ("cy", "cy-key")],
        );
        let other = quota("town", "library", &[("dee", "dee-key")]);
        let t = KeyTable::build([&q, &other], |_, name| {
            let key: &[u8] = match name {
                "ana-key" | "bo-key" => b"sk-same",
                "dee-key" => b"sk-cy\n",
                _ => b"sk-cy",
            };
            Some(BTreeMap::from([("api-key".into(), key.to_vec())]))
        });
        assert_eq!(t.owner(b"sk-same"), Err(KeyRefusal::Shared));
        assert_eq!(
            t.owner(b"sk-cy"),
            Err(KeyRefusal::Shared),
            "across quotas too"
        );
        assert_eq!(t.owner(b"sk-nobody"), Err(KeyRefusal::Unknown));
        assert!(t.lookup(b"sk-same").is_none());
        assert_eq!(
            t.shared_in("town", "commons"),
            vec![
                "members ana and bo of town/commons share one API key".to_string(),
                "members cy of town/commons and dee of town/library share one API key".to_string(),
            ]
        );
        assert_eq!(
            t.shared_in("town", "library"),
            vec![
                "members cy of town/commons and dee of town/library share one API key".to_string()
            ]
        );
    }
}
