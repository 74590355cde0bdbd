//! The thread policy: whether a kernel spreads its work over rayon's pool. A step's caller
//! decides ([`in_pool`] lets one step spread its products from a pool thread,
//! [`on_one_thread`] keeps everything on the calling thread); kernels ask `may_spread` and
//! `linear_in_parallel`. Which of these a cached forward step uses is
//! `Model::forward_cached_on`'s `StepThreads`; serve's `SplitTuner` measures which is faster.

thread_local! {
    static ONE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static OWNS_STEP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` on one of rayon's own threads, which may then spread each kernel's work over the
/// pool as a caller from outside would (`may_spread` holds there, and only there: work stolen
/// by the other threads stays where it lands). A step's many small hand-offs (several matrix
/// products per layer) then cost a push onto this thread's queue, taken by an idle thread or
/// done here if none is idle, instead of waking the pool and blocking on a lock from outside
/// for each; the calling thread waits once. Called from inside the pool, `f` runs here as is.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if !may_spread() || rayon::current_thread_index().is_some() || rayon::current_num_threads() < 2 {
        return f();
    }
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OWNS_STEP.with(|c| c.set(self.0));
        }
    }
    rayon::scope(|_| {
        let _restore = Restore(OWNS_STEP.with(|c| c.replace(true)));
        f()
    })
}

/// Runs `f` with lmstack's kernels kept on the calling thread: none of them spreads its work
/// over rayon's pool (whose hand-offs cost a thread wake-up each) while `f` runs. For a caller
/// that shares the cores with other work and has measured one thread to be faster (`serve`'s
/// engine, for small models); results are the same either way.
pub fn on_one_thread<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ONE_THREAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ONE_THREAD.with(|c| c.replace(true)));
    f()
}

/// Whether work on this thread may be spread over rayon's pool: not from inside the pool (the
/// caller already splits the work) unless this thread runs a step there ([`in_pool`]), nor
/// inside [`on_one_thread`].
pub(crate) fn may_spread() -> bool {
    (rayon::current_thread_index().is_none() || OWNS_STEP.with(|c| c.get())) && !ONE_THREAD.with(|c| c.get())
}

/// Whether this thread runs inside [`on_one_thread`].
pub(crate) fn kept_on_one_thread() -> bool {
    ONE_THREAD.with(|c| c.get())
}

/// Whether a projection of `rows × inp` by `inp × out` is worth spreading over the thread
/// pool: where [`may_spread`], and only when the weight is large enough that two cores read it
/// faster (1 MiB) or the product is large enough (2M multiply-adds, ~30 µs) to pay for waking
/// the pool and waiting for it.
pub(crate) fn linear_in_parallel(rows: usize, inp: usize, out: usize) -> bool {
    may_spread() && (inp * out * 4 >= 1 << 20 || rows * inp * out >= 1 << 21)
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    #[test]
    fn on_one_thread_keeps_work_here_and_is_undone_after_a_panic() {
        assert!(may_spread());
        on_one_thread(|| {
            assert!(!may_spread());
            assert!(!linear_in_parallel(1 << 12, 1 << 10, 1 << 10), "a large product must stay on this thread");
            on_one_thread(|| assert!(!may_spread()));
            assert!(!may_spread(), "a nested call must not undo the outer one");
        });
        assert!(may_spread());
        assert!(std::panic::catch_unwind(|| on_one_thread(|| panic!("boom"))).is_err());
        assert!(may_spread(), "a panic inside must not leave the thread marked");
        // Inside the pool nothing spreads either (the caller already split the work).
        rayon::scope(|s| s.spawn(|_| assert!(!may_spread())));
    }

    /// A step run by `in_pool` runs on a pool thread that may spread its work; what it hands
    /// to the other threads does not spread again, nor does anything after it returns, and
    /// `on_one_thread` still keeps it where it is.
    #[test]
    fn in_pool_lets_the_owner_alone_spread() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            // From inside the pool in_pool runs as is: nothing spreads.
            assert!(!in_pool(may_spread));
        });
        if rayon::current_num_threads() < 2 {
            eprintln!("skipped the rest: a pool of one thread");
            return;
        }
        let (owner, seen) = in_pool(|| {
            let owner = rayon::current_thread_index().expect("in_pool runs on the pool");
            assert!(may_spread());
            let seen: Vec<(usize, bool)> = (0..256)
                .into_par_iter()
                .map(|_| (rayon::current_thread_index().expect("pool"), may_spread()))
                .collect();
            (owner, seen)
        });
        // Items the owner runs itself may spread; those another thread took may not.
        for (thread, spreads) in seen {
            assert_eq!(spreads, thread == owner, "item on thread {thread} (owner {owner})");
        }
        assert!(may_spread());
        assert!(!on_one_thread(|| in_pool(may_spread)));
        rayon::scope(|s| s.spawn(|_| assert!(!may_spread())));
    }
}
