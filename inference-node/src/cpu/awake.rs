//! Keeps the pool's other threads awake through one forward pass.
//!
//! A decode step is some 120 short parallel regions (every projection,
//! attention, the head), each a few tens of microseconds. Between them
//! rayon's idle workers yield a few dozen times and then sleep on a futex,
//! so nearly every region began with a wake-up (a system call on the
//! thread that splits the work, and a scheduling delay before the helper
//! steals its half): with 2 threads, 120 context switches per token and
//! the pool 12 % idle. llama.cpp's threads spin between its ops instead.
//! Here the other workers run a spinner for the length of the pass: it
//! steals whatever the pass's regions push (`rayon::yield_now`), so a
//! sleeping thread never has to be woken. Which thread runs a job never
//! changes its result (every output element is one fixed dot product).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    /// Whether this worker is already inside a spinner (a nested one, run
    /// as a job the outer one stole, returns at once).
    static SPINNING: Cell<bool> = const { Cell::new(false) };
}

/// Idle polls between two `sched_yield`s of a spinner: the yields let
/// other runnable threads have the core when there are more threads than
/// cores, while a poll reacts to new work within a fraction of a
/// microsecond.
const POLLS_PER_YIELD: u32 = 64;

/// Runs `pass` on a thread of the global pool with the pool's other
/// threads spinning for work until it returns.
pub fn run_awake<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    let done = AtomicBool::new(false);
    let done = &done;
    rayon::scope(move |s| {
        let owner = rayon::current_thread_index();
        for _ in 1..threads {
            s.spawn(move |_| spin_until(done, owner));
        }
        let out = pass();
        done.store(true, Ordering::Release);
        out
    })
}

/// Steals and runs the pool's jobs until `done`. Returns at once on the
/// pass's own thread (it may pop a spinner from its own deque while it
/// waits inside a join, and must get back to that join) and inside another
/// spinner.
fn spin_until(done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner || SPINNING.get() {
        return;
    }
    SPINNING.set(true);
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle.is_multiple_of(POLLS_PER_YIELD) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    SPINNING.set(false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn a_pass_run_awake_returns_its_value_and_its_regions_complete() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        let sums: Vec<u64> = pool.install(|| {
            run_awake(|| {
                (0..200u64)
                    .map(|r| (0..1000u64).into_par_iter().map(|v| v * r).sum())
                    .collect()
            })
        });
        let want: Vec<u64> = (0..200u64).map(|r| r * 999 * 1000 / 2).collect();
        assert_eq!(sums, want);
    }

    #[test]
    fn a_pass_run_awake_on_one_thread_needs_no_spinner() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        assert_eq!(pool.install(|| run_awake(|| 7)), 7);
    }
}
