//! Choosing a replica: least outstanding requests, with prefix affinity by
//! consistent hashing with bounded load, so requests sharing a system prompt
//! land where its KV prefix is warm without piling onto one replica.
//! Replicas that failed to connect are ejected for a while.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Virtual nodes per replica on the hash ring.
const VNODES: u32 = 64;
/// A replica may carry this factor above the mean load and still take an
/// affine request (the "bounded load" of consistent hashing).
const LOAD_FACTOR: f64 = 1.25;

/// A ready serving Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// Pod name.
    pub name: String,
    /// `http://ip:port`.
    pub base_url: String,
}

fn hash64<T: Hash + ?Sized>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Pick among `replicas` (not ejected, with `load[i]` requests outstanding):
/// the affine replica when its load is within the bound, else the next one
/// around the ring within the bound, else the least loaded. Pure.
pub fn choose(names: &[&str], load: &[u64], key: &str) -> Option<usize> {
    if names.is_empty() {
        return None;
    }
    let least = || (0..names.len()).min_by_key(|&i| (load[i], hash64(&(names[i], key))));
    if key.is_empty() || names.len() == 1 {
        return least();
    }
    let total: u64 = load.iter().sum();
    let bound = (((total + 1) as f64) * LOAD_FACTOR / names.len() as f64).ceil() as u64;
    let mut ring: Vec<(u64, usize)> = names
        .iter()
        .enumerate()
        .flat_map(|(i, n)| (0..VNODES).map(move |v| (hash64(&(n, v)), i)))
        .collect();
    ring.sort_unstable();
    let h = hash64(key);
    let start = ring.partition_point(|&(x, _)| x < h);
    let mut seen = vec![false; names.len()];
    for k in 0..ring.len() {
        let (_, i) = ring[(start + k) % ring.len()];
        if seen[i] {
            continue;
        }
        seen[i] = true;
        if load[i] < bound {
            return Some(i);
        }
    }
    least()
}

/// Outstanding requests and ejections, per replica, shared by the handlers.
#[derive(Default)]
pub struct Loads {
    inner: Mutex<HashMap<String, (u64, Option<Instant>)>>,
}

impl Loads {
    /// Choose a replica of `replicas` for `key`, skipping ejected ones and
    /// those in `exclude`, and count a request on it.
    pub fn acquire(&self, replicas: &[Replica], key: &str, exclude: &[String]) -> Option<Replica> {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let cands: Vec<&Replica> = replicas
            .iter()
            .filter(|r| !exclude.contains(&r.name))
            .filter(|r| {
                m.get(&r.name)
                    .and_then(|e| e.1)
                    .is_none_or(|until| until <= now)
            })
            .collect();
        let names: Vec<&str> = cands.iter().map(|r| r.name.as_str()).collect();
        let load: Vec<u64> = cands
            .iter()
            .map(|r| m.get(&r.name).map(|e| e.0).unwrap_or(0))
            .collect();
        let i = choose(&names, &load, key)?;
        let r = cands[i].clone();
        m.entry(r.name.clone()).or_default().0 += 1;
        Some(r)
    }

    /// [`Loads::acquire`], with the count held by a guard that releases it
    /// when dropped: a request whose client leaves while it waits for the
    /// upstream frees its replica (otherwise the replica never looks idle
    /// again, and `onlyWhenIdle` members are never served).
    pub fn hold(
        self: &Arc<Self>,
        replicas: &[Replica],
        key: &str,
        exclude: &[String],
    ) -> Option<(Replica, Held)> {
        let r = self.acquire(replicas, key, exclude)?;
        let held = Held {
            loads: self.clone(),
            name: r.name.clone(),
        };
        Some((r, held))
    }

    pub fn release(&self, name: &str) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get_mut(name) {
            e.0 = e.0.saturating_sub(1);
        }
    }

    /// Keep requests off `name` for `d`.
    pub fn eject(&self, name: &str, d: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().1 = Some(Instant::now() + d);
    }

    /// Whether some replica of `replicas` has nothing outstanding (for
    /// throttled members served only when idle).
    pub fn any_idle(&self, replicas: &[Replica]) -> bool {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        replicas
            .iter()
            .any(|r| m.get(&r.name).map(|e| e.0).unwrap_or(0) == 0)
    }
}

/// One request counted on a replica until dropped.
pub struct Held {
    loads: Arc<Loads>,
    name: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.loads.release(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_key_the_least_loaded_wins() {
        assert_eq!(choose(&["a", "b", "c"], &[3, 1, 2], ""), Some(1));
        assert_eq!(choose(&[], &[], "x"), None);
    }

    #[test]
    fn the_same_prefix_goes_to_the_same_replica() {
        let names = ["a", "b", "c", "d"];
        let first = choose(&names, &[0, 0, 0, 0], "You are a helpful assistant").unwrap();
        for _ in 0..10 {
            assert_eq!(
                choose(&names, &[0, 0, 0, 0], "You are a helpful assistant"),
                Some(first)
            );
        }
        // Different prefixes spread over the replicas.
        let hit: std::collections::HashSet<usize> = (0..200)
            .filter_map(|i| choose(&names, &[0, 0, 0, 0], &format!("prompt {i}")))
            .collect();
        assert_eq!(hit.len(), 4);
    }

    #[test]
    fn an_overloaded_affine_replica_is_passed_over() {
        let names = ["a", "b", "c"];
        let key = "shared system prompt";
        let first = choose(&names, &[0, 0, 0], key).unwrap();
        let mut load = [1, 1, 1];
        load[first] = 10;
        let second = choose(&names, &load, key).unwrap();
        assert_ne!(second, first);
    }

    #[test]
    fn ejected_replicas_are_skipped_until_they_return() {
        let loads = Loads::default();
        let rs = vec![
            Replica {
                name: "a".into(),
                base_url: "http://a".into(),
            },
            Replica {
                name: "b".into(),
                base_url: "http://b".into(),
            },
        ];
        loads.eject("a", Duration::from_secs(60));
        for _ in 0..5 {
            let r = loads.acquire(&rs, "k", &[]).unwrap();
            assert_eq!(r.name, "b");
        }
        assert!(loads.acquire(&rs, "k", &["b".into()]).is_none());
        loads.eject("a", Duration::ZERO);
        assert_eq!(loads.acquire(&rs, "k", &["b".into()]).unwrap().name, "a");
        assert!(!loads.any_idle(&rs), "both carry requests");
        loads.release("a");
        assert!(loads.any_idle(&rs));
    }

    #[test]
    fn a_held_request_frees_its_replica_when_dropped() {
        let loads = Arc::new(Loads::default());
        let rs = vec![Replica {
            name: "a".into(),
            base_url: "http://a".into(),
        }];
        let (_, held) = loads.hold(&rs, "", &[]).expect("a replica");
        assert!(!loads.any_idle(&rs));
        drop(held);
        assert!(loads.any_idle(&rs));
    }
}
