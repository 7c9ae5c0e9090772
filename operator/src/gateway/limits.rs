//! Per-member request rates and concurrency, enforced by each replica for
//! its share (the limit divided by the live gateway replicas the register
//! lists). Rates are a sliding estimate over two one-minute windows. Unlike
//! stints, these are flow control, not accounting, so each replica keeps
//! them locally.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Member {
    window_start: Instant,
    previous: u32,
    current: u32,
    in_flight: u32,
}

/// Why a request was held back, and for how long.
#[derive(Debug, PartialEq)]
pub enum Limited {
    Rate { retry_after: i64 },
    Concurrency,
}

/// The limiter shared by the handlers.
#[derive(Default, Clone)]
pub struct Limiter {
    inner: Arc<Mutex<HashMap<String, Member>>>,
}

/// A request's place under the concurrency limit, given back on drop.
pub struct Permit {
    inner: Arc<Mutex<HashMap<String, Member>>>,
    key: String,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = m.get_mut(&self.key) {
            x.in_flight = x.in_flight.saturating_sub(1);
        }
    }
}

/// Sliding-window estimate of requests in the last minute.
fn estimate(m: &Member, now: Instant) -> f64 {
    let elapsed = now.duration_since(m.window_start).as_secs_f64() / WINDOW.as_secs_f64();
    m.previous as f64 * (1.0 - elapsed.min(1.0)) + m.current as f64
}

impl Limiter {
    /// Admit a request of `key` under `rpm` and `concurrent` (already this
    /// replica's share), or say why not.
    pub fn acquire(
        &self,
        key: &str,
        rpm: Option<u32>,
        concurrent: Option<u32>,
        now: Instant,
    ) -> Result<Permit, Limited> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let m = map.entry(key.to_string()).or_insert(Member {
            window_start: now,
            previous: 0,
            current: 0,
            in_flight: 0,
        });
        let since = now.duration_since(m.window_start);
        if since >= WINDOW * 2 {
            m.previous = 0;
            m.current = 0;
            m.window_start = now;
        } else if since >= WINDOW {
            m.previous = m.current;
            m.current = 0;
            m.window_start += WINDOW;
        }
        if let Some(c) = concurrent
            && m.in_flight >= c
        {
            return Err(Limited::Concurrency);
        }
        if let Some(r) = rpm
            && estimate(m, now) + 1.0 > r as f64
        {
            let left = WINDOW.saturating_sub(now.duration_since(m.window_start));
            return Err(Limited::Rate {
                retry_after: left.as_secs().max(1) as i64,
            });
        }
        m.current += 1;
        m.in_flight += 1;
        Ok(Permit {
            inner: self.inner.clone(),
            key: key.to_string(),
        })
    }
}

/// This replica's share of a limit spread over `replicas` replicas.
pub fn share(limit: Option<i32>, replicas: usize) -> Option<u32> {
    limit.map(|l| (l.max(0) as u32).div_ceil(replicas.max(1) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_slide() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(l.acquire("a", Some(3), None, t0).expect("within the rate"));
        }
        assert!(matches!(
            l.acquire("a", Some(3), None, t0),
            Err(Limited::Rate { .. })
        ));
        // Another member is not affected.
        assert!(l.acquire("b", Some(3), None, t0).is_ok());
        // Half a minute into the next window, half the old count remains.
        let t1 = t0 + Duration::from_secs(90);
        assert!(l.acquire("a", Some(3), None, t1).is_ok());
        assert!(matches!(
            l.acquire("a", Some(3), None, t1),
            Err(Limited::Rate { .. })
        ));
    }

    #[test]
    fn concurrency_is_given_back_when_a_request_ends() {
        let l = Limiter::default();
        let now = Instant::now();
        let p = l.acquire("a", None, Some(1), now).unwrap();
        assert_eq!(
            l.acquire("a", None, Some(1), now).err(),
            Some(Limited::Concurrency)
        );
        drop(p);
        assert!(l.acquire("a", None, Some(1), now).is_ok());
    }

    #[test]
    fn limits_are_shared_among_replicas() {
        assert_eq!(share(Some(10), 3), Some(4));
        assert_eq!(share(Some(10), 0), Some(10));
        assert_eq!(share(None, 3), None);
    }
}
