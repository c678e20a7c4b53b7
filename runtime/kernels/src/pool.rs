//! The kernels' thread pool: low-latency fork/join for the many small operators of an edge model.
//!
//! A rayon `scope` started from the thread that runs the plan hands the whole job to a pool worker (and usually
//! wakes it from sleep) and blocks the caller: two thread switches per operator, tens of microseconds on a VM,
//! which is as long as a small convolution takes. Here the caller runs parts itself and workers that ran a part
//! recently are still spinning, so a hand-off costs an atomic store (onnxruntime's pool does the same). Workers
//! spin for [`SPIN`] after their last part, then sleep on a condition variable until the next job.
//!
//! Parts are claimed dynamically, so callers can split finer than the thread count and a slow or descheduled thread
//! does not hold the others back; but each participant first claims its own contiguous range (the caller the first
//! `parts / P`, worker `w` the `w + 1`-th), and only then the rest of the others' ranges. Callers split their work
//! in address order (a convolution's parts are bands of output rows), so a thread gets the same band of every
//! layer and reads what it wrote itself, from its own core's cache: with one shared counter the two threads of a
//! 2-core machine took alternate parts, and a depthwise layer ran slower on two threads than on one (its input
//! pulled across cores). One job runs at a time: a second caller (another session on another thread, or a nested
//! call) runs its parts inline rather than waiting.
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
pub const SPIN: Duration = Duration::from_micros(500);

type Task = *const (dyn Fn(usize) + Sync);

#[derive(Clone, Copy)]
struct Job {
    epoch: u32,
    task: Task,
    parts: u32,
    workers: usize,
}

/// Participants of one job at most (the caller and `MAX_PARTICIPANTS - 1` workers).
const MAX_PARTICIPANTS: usize = 64;

struct Shared {
    /// `epoch << 32`: a new job is published by a new epoch.
    state: AtomicU64,
    /// Per participant `epoch << 32 | next part to claim` in its range (see [`range`]).
    next: [AtomicU64; MAX_PARTICIPANTS],
    /// The job of the current epoch; written by the caller (holding `busy`) before the epoch is published.
    job: Mutex<Option<Job>>,
    /// Parts of the current job that have finished.
    done: AtomicUsize,
    panicked: AtomicBool,
    busy: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    spawned: Mutex<usize>,
}

// SAFETY: the raw task pointer is only dereferenced by a thread that claimed a part of its epoch, and the caller
// keeps the closure alive until every claimed part has finished.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        state: AtomicU64::new(0),
        next: std::array::from_fn(|_| AtomicU64::new(0)),
        job: Mutex::new(None),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        busy: AtomicBool::new(false),
        sleepers: AtomicUsize::new(0),
        sleep: Mutex::new(()),
        wake: Condvar::new(),
        spawned: Mutex::new(0),
    })
}

/// Runs `f(i)` for every `i in 0..parts` on the calling thread and up to `threads - 1` pool workers; returns when
/// all parts have finished. Panics of `f` are propagated to the caller.
pub fn run(parts: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    let workers = threads.saturating_sub(1).min(parts.saturating_sub(1)).min(MAX_PARTICIPANTS - 1);
    let s = shared();
    if workers == 0 || parts > u32::MAX as usize || s.busy.compare_exchange(false, true, Acquire, Relaxed).is_err() {
        (0..parts).for_each(f);
        return;
    }
    ensure_workers(s, workers);
    // SAFETY (lifetime): the task pointer outlives this call only inside `Job`, and every part that
    // dereferences it finishes before we return (we wait for `done == parts`).
    let task: Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f) };
    let epoch = ((s.state.load(Relaxed) >> 32) as u32).wrapping_add(1);
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job { epoch, task, parts: parts as u32, workers });
    s.done.store(0, Relaxed);
    s.panicked.store(false, Relaxed);
    for (p, next) in s.next.iter().enumerate().take(workers + 1) {
        next.store((epoch as u64) << 32 | range(parts, workers + 1, p).start as u64, Relaxed);
    }
    s.state.store((epoch as u64) << 32, SeqCst);
    if s.sleepers.load(SeqCst) > 0 {
        let _g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    claim(s, epoch, parts as u32, workers + 1, 0, task);
    let mut spins = 0u32;
    while s.done.load(Acquire) < parts {
        spins += 1;
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    let panicked = s.panicked.load(Acquire);
    *s.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
    s.busy.store(false, Release);
    if panicked {
        panic!("a kernel part panicked on a pool worker");
    }
}

/// Parts `p` of `participants` claims first: a contiguous share of `0..parts`.
pub(crate) fn range(parts: usize, participants: usize, p: usize) -> std::ops::Range<usize> {
    let share = |i: usize| (parts as u64 * i as u64 / participants as u64) as usize;
    share(p)..share(p + 1)
}

/// Claims and runs parts of `epoch` until none is left: participant `me`'s own range first, then what is left of
/// the others'. Every part is counted in `done` when it ends, a panicking one too (the panic is recorded and
/// re-raised by the caller once no thread uses the task any more).
///
/// `task` is only dereferenced after a claim of `epoch` succeeded: the caller of that epoch is then still waiting
/// for the claimed part, so the closure is alive.
fn claim(s: &Shared, epoch: u32, parts: u32, participants: usize, me: usize, task: Task) {
    for q in (me..participants).chain(0..me) {
        let end = range(parts as usize, participants, q).end as u32;
        loop {
            let v = s.next[q].load(Acquire);
            if (v >> 32) as u32 != epoch || (v as u32) >= end {
                break;
            }
            if s.next[q].compare_exchange_weak(v, v + 1, AcqRel, Relaxed).is_ok() {
                // SAFETY: see above.
                let f = unsafe { &*task };
                if catch_unwind(AssertUnwindSafe(|| f(v as u32 as usize))).is_err() {
                    s.panicked.store(true, Release);
                }
                s.done.fetch_add(1, AcqRel);
            }
        }
    }
}

fn ensure_workers(s: &'static Shared, n: usize) {
    let mut spawned = s.spawned.lock().unwrap_or_else(|e| e.into_inner());
    while *spawned < n {
        let id = *spawned;
        let ok = std::thread::Builder::new().name(format!("edgepack-kernel-{id}")).spawn(move || worker(s, id)).is_ok();
        if !ok {
            // Without the thread the job still completes: the caller claims every part it leaves.
            break;
        }
        *spawned += 1;
    }
}

fn worker(s: &'static Shared, id: usize) {
    let mut seen = (s.state.load(Acquire) >> 32) as u32;
    loop {
        // Wait for a new epoch: spin, then sleep.
        let start = Instant::now();
        let mut n = 0u32;
        loop {
            if (s.state.load(Acquire) >> 32) as u32 != seen {
                break;
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(256) && start.elapsed() > SPIN {
                let mut g = s.sleep.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while (s.state.load(SeqCst) >> 32) as u32 == seen {
                    g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
            std::hint::spin_loop();
        }
        let Some(job) = *s.job.lock().unwrap_or_else(|e| e.into_inner()) else {
            // The job finished (the caller ran every part) before we looked.
            seen = (s.state.load(Acquire) >> 32) as u32;
            continue;
        };
        seen = job.epoch;
        if id >= job.workers {
            continue;
        }
        claim(s, job.epoch, job.parts, job.workers + 1, id + 1, job.task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_part_runs_once_from_concurrent_and_nested_callers() {
        let threads: Vec<_> = (0..3)
            .map(|t| {
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let parts = 1 + (round * 7 + t) % 13;
                        let hits: Vec<AtomicU64> = (0..parts).map(|_| AtomicU64::new(0)).collect();
                        run(parts, 1 + round % 4, &|i| {
                            hits[i].fetch_add(1, SeqCst);
                            if i == 0 {
                                // A nested call runs inline (the pool is busy) and still completes.
                                let inner = AtomicU64::new(0);
                                run(3, 2, &|_| {
                                    inner.fetch_add(1, SeqCst);
                                });
                                assert_eq!(inner.load(SeqCst), 3);
                            }
                        });
                        assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "round {round}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_nothing_runs_after() {
        let done = AtomicU64::new(0);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run(8, 2, &|i| {
                if i == 3 {
                    panic!("part 3");
                }
                done.fetch_add(1, SeqCst);
            })
        }));
        assert!(r.is_err());
        // On the pool every other part has finished (7); inline (the pool busy with another test) the panic
        // stops the loop. Either way no part runs after `run` returned.
        let seen = done.load(SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(done.load(SeqCst), seen);
        // The pool is usable afterwards.
        let n = AtomicU64::new(0);
        run(4, 2, &|_| {
            n.fetch_add(1, SeqCst);
        });
        assert_eq!(n.load(SeqCst), 4);
    }
}
