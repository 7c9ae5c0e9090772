//! A fork-join team for decode-sized parallel regions: helper threads that
//! spin between regions instead of sleeping.
//!
//! A decode step of a 24-layer model runs about 120 parallel regions (the
//! q/k/v, attention, o, gate/up and down of every layer, and the head),
//! each a few hundred microseconds of streamed weights. On rayon an idle
//! worker sleeps on a futex after a few dozen yields, so most regions began
//! with a wake-up (a syscall and a context switch on each side: about 10 %
//! of decode samples on 2 threads) and lost the worker's share until it
//! ran. The team's helpers spin for [`SPIN`] after each region, so the next
//! region's parts start at once, and park only between requests.
//!
//! A region is open until the caller has run out of parts to take; a
//! helper joins it only while it is open, so the caller waits for the
//! helpers that are computing parts, never for one that the OS has not
//! scheduled yet (on a loaded machine that wait was a time slice per
//! region).
//!
//! Which thread computes a part never changes what the part computes, so
//! results are the same bits as on rayon. `unsafe` here: the region's
//! closure is handed to the helpers as a raw pointer; [`Team::run`]
//! returns only after every helper that joined has left (after a panic
//! too), and a helper that did not join never reads it.

#![allow(unsafe_code)]

use std::cell::UnsafeCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Activation rows below which a product or attention runs on the team
/// (decode and small batches); prompts stay on rayon.
pub const MAX_ROWS: usize = 16;

/// How long an idle helper spins for the next region before it parks.
const SPIN: Duration = Duration::from_millis(1);

/// `state`: the region's number in the high 32 bits, [`CLOSED`], and the
/// count of helpers inside it in the low bits.
const CLOSED: u64 = 1 << 31;
const INSIDE: u64 = CLOSED - 1;

fn region_of(state: u64) -> u64 {
    state >> 32
}

/// The region being run: a closure over part indices and their count.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    parts: usize,
}

/// What the owner and the helpers share.
struct Shared {
    /// Region number, closed flag and helpers inside (see [`CLOSED`]).
    state: AtomicU64,
    /// Written by the owner while no helper is inside (the last region
    /// closed and empty), before it opens the next; read by helpers once
    /// they have joined.
    job: UnsafeCell<Job>,
    /// The next part to take.
    next: AtomicUsize,
    panicked: AtomicBool,
    /// Parked helpers wait here.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the owner (who holds `Team::owner`)
// while the region is closed with no helper inside, and read only by
// helpers that joined the open region that published it.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw closure pointer is only dereferenced inside
// the region whose owner keeps the closure alive.
unsafe impl Send for Shared {}

/// A team of `helpers` spinning threads plus the thread that calls
/// [`Team::run`].
pub struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    /// One region at a time; a second caller (another forward pass, or a
    /// region inside a region) runs on rayon instead.
    owner: Mutex<()>,
}

impl Team {
    /// The process's team, sized by rayon's thread count at first use (the
    /// node's `--threads`).
    pub fn global() -> &'static Team {
        static T: OnceLock<Team> = OnceLock::new();
        T.get_or_init(|| Team::new(rayon::current_num_threads().max(1) - 1))
    }

    fn new(helpers: usize) -> Team {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(CLOSED),
            job: UnsafeCell::new(Job {
                f: &(|_: usize| {}) as &(dyn Fn(usize) + Sync),
                parts: 0,
            }),
            next: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for i in 0..helpers {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("copyhold-team-{i}"))
                .spawn(move || helper(&s));
            if spawned.is_ok() {
                started += 1;
            }
        }
        Team {
            shared,
            helpers: started,
            owner: Mutex::new(()),
        }
    }

    /// Threads that run a region's parts (the caller included).
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Calls `f(i)` for every `i < parts`, spread over the team; returns
    /// when all have returned. A panic in a part is raised here once every
    /// thread has left the region.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers == 0 || parts <= 1 {
            return (0..parts).for_each(f);
        }
        // A poisoned lock only says an earlier region panicked, after
        // every thread had left it: the team is fine.
        let _owner = match self.owner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return (0..parts).into_par_iter().for_each(f),
        };
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only for this region: we return
        // after it is closed with no helper inside.
        let f_static: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        // SAFETY: the last region is closed and empty, so no helper reads
        // `job` now.
        unsafe { *s.job.get() = Job { f: f_static, parts } };
        s.next.store(0, Relaxed);
        let region = (region_of(s.state.load(Relaxed)) + 1) & 0xFFFF_FFFF;
        s.state.store(region << 32, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| take_parts(s, f, parts)));
        // Every part is taken: close, then wait for the helpers inside.
        s.state.fetch_or(CLOSED, AcqRel);
        let mut spins = 0u32;
        while s.state.load(Acquire) & INSIDE != 0 {
            spins = spins.saturating_add(1);
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if s.panicked.swap(false, Relaxed) {
            panic!("a part of a parallel region panicked on a team thread");
        }
    }
}

/// Takes parts until none is left.
fn take_parts(s: &Shared, f: &(dyn Fn(usize) + Sync), parts: usize) {
    loop {
        let i = s.next.fetch_add(1, Relaxed);
        if i >= parts {
            return;
        }
        f(i);
    }
}

/// A helper's life: wait for a new region (spinning, then parked), join
/// it if it is still open, take its parts, leave, repeat.
fn helper(s: &Shared) {
    let mut seen = 0;
    loop {
        seen = wait_for_region(s, seen);
        if !join(s, seen) {
            continue;
        }
        // SAFETY: joined: the owner published `job` before opening the
        // region and keeps it and the closure until we leave.
        let job = unsafe { *s.job.get() };
        // SAFETY: as above.
        let f = unsafe { &*job.f };
        if catch_unwind(AssertUnwindSafe(|| take_parts(s, f, job.parts))).is_err() {
            s.panicked.store(true, Relaxed);
        }
        s.state.fetch_sub(1, Release);
    }
}

/// Enters region `region` if it is still the open one.
fn join(s: &Shared, region: u64) -> bool {
    let mut st = s.state.load(Acquire);
    loop {
        if region_of(st) != region || st & CLOSED != 0 {
            return false;
        }
        match s.state.compare_exchange_weak(st, st + 1, AcqRel, Acquire) {
            Ok(_) => return true,
            Err(now) => st = now,
        }
    }
}

/// Returns the number of the first region after `seen`: spins for
/// [`SPIN`], then parks until the owner wakes it.
fn wait_for_region(s: &Shared, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let r = region_of(s.state.load(Acquire));
        if r != seen {
            return r;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        let mut guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
        s.sleepers.fetch_add(1, SeqCst);
        while region_of(s.state.load(SeqCst)) == seen {
            guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
        s.sleepers.fetch_sub(1, SeqCst);
        return region_of(s.state.load(Acquire));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every part runs exactly once, over many regions, with the helpers
    /// spinning and after they have parked.
    #[test]
    fn every_part_of_every_region_runs_exactly_once() {
        let team = Team::new(2);
        for round in 0..200 {
            if round == 100 {
                std::thread::sleep(SPIN * 3);
            }
            let parts = 1 + round % 37;
            let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            team.run(parts, &|i| {
                hits[i].fetch_add(1, Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "round {round}");
        }
    }

    /// A panic in a part reaches the caller, and the team (not rayon) runs
    /// the regions after it.
    #[test]
    fn a_panicking_part_panics_the_caller_and_the_team_runs_on() {
        let team = Team::new(1);
        let caller = std::thread::current().id();
        for _ in 0..10 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                team.run(8, &|i| {
                    assert!(i != 5, "part 5");
                })
            }));
            assert!(r.is_err());
            let on_team = AtomicUsize::new(0);
            team.run(8, &|_| {
                let t = std::thread::current();
                if t.id() == caller || t.name().is_some_and(|n| n.starts_with("copyhold-team-")) {
                    on_team.fetch_add(1, Relaxed);
                }
            });
            assert_eq!(on_team.load(Relaxed), 8);
        }
    }
}
