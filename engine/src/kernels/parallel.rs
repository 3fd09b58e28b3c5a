//! Splits one kernel call (or one fused element-wise pass, [`crate::swiglu`]) over the calling
//! thread and rayon's workers.
//!
//! `rayon::join` or a parallel iterator called from outside the pool hands the whole job to a
//! worker and blocks the caller on a condition variable: two thread handoffs per call, and a decode
//! step makes about 200 calls. Here the caller posts helper jobs and then works through the chunks
//! itself, taking them from a shared cursor; a helper that starts late (a sleeping or descheduled
//! worker) finds the cursor exhausted and returns, so a call never waits for a worker that has not
//! begun, only for chunks already being computed.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// State shared between the caller and its helper jobs.
struct Shared {
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
    chunks: usize,
    chunk: usize,
    items: usize,
    /// The caller's closure, lifetime erased. Dereferenced only by whoever claims a chunk index
    /// below `chunks`, and the caller does not return (or unwind) before every claimed chunk has
    /// been counted in `done`.
    f: *const (dyn Fn(Range<usize>) + Sync),
}

// SAFETY: the only non-Send/Sync field is `f`, a pointer to a `Sync` closure that is dereferenced
// under the protocol documented on the field.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    /// Claims and runs chunks until none are left.
    fn work(&self) {
        loop {
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return;
            }
            let start = c * self.chunk;
            let range = start..self.items.min(start + self.chunk);
            // SAFETY: chunk `c < chunks` was claimed here, so the caller is still waiting in
            // `Finish::drop` for `done` to count it and the closure is alive.
            let f = unsafe { &*self.f };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(range))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// Waits, also while unwinding, until no chunk is running; chunks not yet claimed are cancelled.
struct Finish<'a>(&'a Shared);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let s = self.0;
        // Far above `chunks`, and far from overflow for any number of late helpers.
        let claimed = s.next.swap(usize::MAX / 2, Ordering::Relaxed).min(s.chunks);
        let cancelled = s.chunks - claimed;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) + cancelled < s.chunks {
            // A chunk is a few microseconds; yield after that so a descheduled helper can finish.
            if spins < 2000 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `f` over `0..items`: on the calling thread alone when the call is not `worth_splitting`
/// (posting helper jobs would cost more than they save) or the pool has one thread, otherwise in
/// `chunks_per_thread` ranges per pool thread, with every other thread as a helper.
pub(crate) fn split_over_pool(
    items: usize,
    chunks_per_thread: usize,
    worth_splitting: bool,
    f: &(dyn Fn(Range<usize>) + Sync),
) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || !worth_splitting {
        f(0..items);
    } else {
        for_each_range(items, threads * chunks_per_thread, threads - 1, f);
    }
}

/// Base of an output buffer shared by the threads of one split call, each writing its own
/// disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);

// SAFETY: an `OutPtr` is made from a `&mut` output slice that its owner holds for the whole
// split call, and the threads of that call write disjoint elements through it.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// Element `i` (a method, so closures capture the whole `Sync` wrapper, not its field).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Runs `f` over `0..items` in `chunks` contiguous ranges of equal size, on the calling thread
/// and up to `helpers` rayon workers. Returns when every range has been processed.
fn for_each_range(items: usize, chunks: usize, helpers: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    let chunk = items.div_ceil(chunks.max(1)).max(1);
    let chunks = items.div_ceil(chunk);
    if helpers == 0 || chunks <= 1 {
        f(0..items);
        return;
    }
    // SAFETY: only extends the lifetime of the pointer; see `Shared::f` for why every
    // dereference happens while `f` is alive.
    let f: *const (dyn Fn(Range<usize>) + Sync) = unsafe {
        std::mem::transmute::<&(dyn Fn(Range<usize>) + Sync), &'static (dyn Fn(Range<usize>) + Sync)>(
            f,
        )
    };
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        chunks,
        chunk,
        items,
        f,
    });
    for _ in 0..helpers.min(chunks - 1) {
        let shared = Arc::clone(&shared);
        rayon::spawn(move || shared.work());
    }
    {
        let _finish = Finish(&shared);
        shared.work();
    }
    if shared.panicked.load(Ordering::Relaxed) {
        panic!("quant linear: a kernel chunk panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_processed_exactly_once() {
        for (items, chunks, helpers) in [(0, 4, 1), (1, 4, 1), (10, 3, 1), (1000, 16, 3), (7, 7, 0)]
        {
            let seen: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            for_each_range(items, chunks, helpers, &|r: Range<usize>| {
                for i in r {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                "{items} {chunks}"
            );
        }
    }

    #[test]
    fn panic_in_a_chunk_reaches_the_caller_after_all_chunks_stop() {
        let result = std::panic::catch_unwind(|| {
            for_each_range(64, 8, 1, &|r: Range<usize>| {
                if r.contains(&40) {
                    panic!("chunk failure");
                }
            })
        });
        assert!(result.is_err());
    }
}
