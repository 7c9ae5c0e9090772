//! Members' API keys. Only SHA-256 digests are kept; a presented key is
//! hashed and compared with every digest in constant time, so neither the
//! comparison nor the table's layout says how close a guess came. Keys are
//! never logged.

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
    /// Members whose Secret or key is missing, for the log.
    pub missing: Vec<String>,
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
        t
    }

    /// The owner of `key`, scanning every entry in constant time per entry.
    pub fn lookup(&self, key: &[u8]) -> Option<Owner> {
        let d = digest(trim(key));
        let mut found: Option<&Owner> = None;
        for (e, owner) in &self.entries {
            if bool::from(e.ct_eq(&d)) && found.is_none() {
                found = Some(owner);
            }
        }
        found.cloned()
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
}
