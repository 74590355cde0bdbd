//! A second thread for splitting one inference step in two, with a fast hand-off.
//!
//! `rayon::join` from outside the pool wakes a sleeping worker, which steals the second half
//! from another and finally wakes the caller: three thread wake-ups per step. On a virtual
//! machine each costs 50–150 µs (a halted virtual CPU must be woken by the hypervisor), as much
//! as the compute of a small model's decode step. The partner is one thread that, after each
//! job, keeps polling for the next one for a while (2 ms), yielding its core to any other
//! runnable thread between polls, before it parks. A caller posts the second half, runs the first
//! itself and then either finds the second done, waits for the partner to finish it, or — when
//! the partner has not picked it up yet — takes it back and runs it too, so a step is never
//! slower than running both halves in turn.
//!
//! Work inside a half stays on its thread (`ops::on_one_core`), as it would inside rayon's pool.

#![allow(unsafe_code)]

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long the partner keeps polling after its last job before it parks.
const SPIN: Duration = Duration::from_millis(2);

type Job = Box<dyn FnOnce() + Send + 'static>;

enum Slot {
    Empty,
    Posted(Job),
    Running,
    Done,
}

const EMPTY: u8 = 0;
const POSTED: u8 = 1;
const DONE: u8 = 2;

struct Partner {
    slot: Mutex<Slot>,
    /// A lock-free mirror of `slot`'s state for polling (`EMPTY`, `POSTED`, `DONE`).
    flag: AtomicU8,
    /// Held for the length of a `join`: one caller at a time.
    busy: Mutex<()>,
    thread: std::thread::Thread,
}

fn partner() -> Option<&'static Partner> {
    static PARTNER: OnceLock<Option<&'static Partner>> = OnceLock::new();
    *PARTNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<&'static Partner>();
        let spawned = std::thread::Builder::new().name("lmstack-partner".into()).spawn(move || {
            let Ok(p) = rx.recv() else { return };
            p.serve();
        });
        let handle = spawned.ok()?;
        let p: &'static Partner = Box::leak(Box::new(Partner {
            slot: Mutex::new(Slot::Empty),
            flag: AtomicU8::new(EMPTY),
            busy: Mutex::new(()),
            thread: handle.thread().clone(),
        }));
        tx.send(p).ok()?;
        Some(p)
    })
}

impl Partner {
    fn serve(&self) {
        let mut idle_since = Instant::now();
        let mut polls = 0u32;
        loop {
            if self.flag.load(Ordering::Acquire) == POSTED {
                let job = {
                    let mut slot = lock(&self.slot);
                    match std::mem::replace(&mut *slot, Slot::Empty) {
                        Slot::Posted(job) => {
                            *slot = Slot::Running;
                            Some(job)
                        }
                        other => {
                            *slot = other;
                            None
                        }
                    }
                };
                if let Some(job) = job {
                    // The job catches its own panics (see `join`).
                    job();
                    *lock(&self.slot) = Slot::Done;
                    self.flag.store(DONE, Ordering::Release);
                }
                idle_since = Instant::now();
                continue;
            }
            polls = polls.wrapping_add(1);
            if polls % 64 == 0 {
                if idle_since.elapsed() > SPIN {
                    // Woken by a post (or spuriously): the loop looks at the flag first.
                    std::thread::park();
                } else {
                    std::thread::yield_now();
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `a` on this thread and `b` on the partner thread when it is free (otherwise `b` after
/// `a` here), and returns both results. A panic in either is resumed here after both are done.
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA,
    B: FnOnce() -> RB + Send,
    RB: Send,
{
    let Some(p) = partner() else { return (a(), b()) };
    let Ok(_busy) = p.busy.try_lock() else { return (a(), b()) };
    let result: Mutex<Option<std::thread::Result<RB>>> = Mutex::new(None);
    {
        let result = &result;
        let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
            let r = catch_unwind(AssertUnwindSafe(b));
            *lock(result) = Some(r);
        });
        // SAFETY: the job borrows `result` and whatever `b` borrows, all of which outlive this
        // block; the block does not end before the job has run to completion or has been taken
        // back unrun (the waiting below cannot be skipped: `a` runs under `catch_unwind`, and the
        // job catches its own panics), so the erased lifetime is never exceeded.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
        *lock(&p.slot) = Slot::Posted(job);
        p.flag.store(POSTED, Ordering::Release);
        p.thread.unpark();
        let ra = catch_unwind(AssertUnwindSafe(a));
        // Take the job back if the partner has not started it; else wait for it.
        let unstarted = {
            let mut slot = lock(&p.slot);
            match std::mem::replace(&mut *slot, Slot::Empty) {
                Slot::Posted(job) => Some(job),
                other => {
                    *slot = other;
                    None
                }
            }
        };
        match unstarted {
            Some(job) => {
                p.flag.store(EMPTY, Ordering::Release);
                job();
            }
            None => {
                let mut polls = 0u32;
                while p.flag.load(Ordering::Acquire) != DONE {
                    polls = polls.wrapping_add(1);
                    if polls % 64 == 0 {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
                *lock(&p.slot) = Slot::Empty;
                p.flag.store(EMPTY, Ordering::Release);
            }
        }
        let rb = lock(result).take().expect("the second half ran");
        match (ra, rb) {
            (Ok(ra), Ok(rb)) => (ra, rb),
            (Err(e), _) | (_, Err(e)) => resume_unwind(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::join;

    #[test]
    fn both_halves_run_and_borrow_the_callers_data() {
        let mut left = vec![0u64; 1000];
        let mut right = vec![0u64; 1000];
        for round in 0..2000u64 {
            let (a, b) = join(
                || {
                    left.iter_mut().for_each(|v| *v += round);
                    left.len()
                },
                || {
                    right.iter_mut().for_each(|v| *v += 2 * round);
                    std::thread::current().name().map(str::to_owned)
                },
            );
            assert_eq!(a, 1000);
            // The second half ran on the partner or, taken back, on this thread.
            let here = std::thread::current().name().map(str::to_owned);
            assert!(b.as_deref() == Some("lmstack-partner") || b == here, "ran on {b:?}");
        }
        let s: u64 = (0..2000).sum();
        assert!(left.iter().all(|&v| v == s));
        assert!(right.iter().all(|&v| v == 2 * s));
    }

    #[test]
    fn a_panic_in_either_half_reaches_the_caller_after_both_finish() {
        let done = std::sync::atomic::AtomicBool::new(false);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            join(
                || panic!("first half"),
                || {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                },
            )
        }));
        assert!(r.is_err());
        assert!(done.load(std::sync::atomic::Ordering::SeqCst), "returned before the second half finished");
        let r = std::panic::catch_unwind(|| join(|| 1, || -> u32 { panic!("second half") }));
        assert!(r.is_err());
        // The partner still serves after a panic.
        assert_eq!(join(|| 1, || 2), (1, 2));
    }

    #[test]
    fn concurrent_callers_share_the_partner_safely() {
        let totals: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|t| {
                    s.spawn(move || {
                        let mut total = 0u64;
                        for i in 0..500u64 {
                            let (a, b) = join(|| i * t, || i + t);
                            total += a + b;
                        }
                        total
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, total) in totals.into_iter().enumerate() {
            let t = t as u64;
            assert_eq!(total, (0..500u64).map(|i| i * t + i + t).sum::<u64>());
        }
    }
}
