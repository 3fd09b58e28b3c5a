//! The group's collectives through one shared-memory segment (a file under /dev/shm, mapped by
//! every rank): a header with a futex barrier, then one slot of `max` f32 per rank. An
//! all-reduce writes this rank's values into its slot, meets the others at the barrier, sums
//! every slot in rank order into its own buffer, and meets them again before any slot is
//! written anew.
//!
//! The barrier counts arrivals; the last rank resets the count, bumps the generation and wakes
//! the sleepers, who wait in `FUTEX_WAIT` on the generation (shared futexes: the word is in a
//! mapping shared between processes). A rank that waits past the time-out marks the group
//! broken and wakes everyone, so one dead rank fails every call instead of hanging them.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use crate::{Collective, Error};

/// Header layout (bytes): arrived u32 @0, generation u32 @4, world u32 @8, max u32 @12,
/// broken u32 @16; the slots start at 64.
const HEADER: usize = 64;
const ARRIVED: usize = 0;
const GENERATION: usize = 4;
const WORLD: usize = 8;
const MAX: usize = 12;
const BROKEN: usize = 16;

/// One rank's handle on the group's segment.
pub struct ShmGroup {
    rank: usize,
    world: usize,
    max: usize,
    timeout: Duration,
    map: MmapMut,
}

impl ShmGroup {
    /// Opens (creating) the segment at `path` as `rank` of `world` ranks whose all-reduces
    /// carry at most `max` values, waiting at most `timeout` for the others at each step. Every
    /// rank opens the same path with the same `world` and `max`; a path is one group's, for one
    /// launch (a leftover file of a crashed group is not reused: the launcher names a new one).
    pub fn open(
        path: &Path,
        rank: usize,
        world: usize,
        max: usize,
        timeout: Duration,
    ) -> Result<ShmGroup, Error> {
        let bad = |field, reason: String| Err(Error::InvalidConfig { field, reason });
        if world == 0 || world > 1024 {
            return bad("world", format!("{world} ranks: must be 1 to 1024"));
        }
        if rank >= world {
            return bad("rank", format!("{rank} is not below world {world}"));
        }
        if max == 0 || max > (1 << 28) {
            return bad("max", format!("{max} values: must be 1 to 2^28"));
        }
        let size = HEADER + world * max * 4;
        let segment = |reason: String| Error::Segment {
            path: path.display().to_string(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| segment(e.to_string()))?;
        let len = file.metadata().map_err(|e| segment(e.to_string()))?.len() as usize;
        if len == 0 {
            // Zero-filled: a fresh barrier (nobody arrived, generation 0, not broken).
            file.set_len(size as u64)
                .map_err(|e| segment(e.to_string()))?;
        } else if len != size {
            return Err(segment(format!(
                "sized for another group ({len} bytes, this one needs {size})"
            )));
        }
        // SAFETY: the file is this group's alone (by its name) and keeps its size while mapped;
        // the ranks share it only through the atomics of the header and the slots, whose reads
        // and writes the barrier orders.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| segment(e.to_string()))?;
        let group = ShmGroup {
            rank,
            world,
            max,
            timeout,
            map,
        };
        group.agree(WORLD, world as u32, "world")?;
        group.agree(MAX, max as u32, "max")?;
        Ok(group)
    }

    /// The header word at `offset`.
    fn word(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `offset` is one of the header's 4-aligned words, inside the mapping (which is
        // page-aligned and at least HEADER long) for as long as `self` lives.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU32) }
    }

    /// The first rank to open records `value`; the others must have the same.
    fn agree(&self, offset: usize, value: u32, field: &'static str) -> Result<(), Error> {
        match self
            .word(offset)
            .compare_exchange(0, value, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(()),
            Err(seen) if seen == value => Ok(()),
            Err(seen) => Err(Error::InvalidConfig {
                field,
                reason: format!("{value}, but the group was opened with {seen}"),
            }),
        }
    }

    fn slot(&self, rank: usize) -> *mut f32 {
        // SAFETY: rank < world, so the slot lies inside the mapping; 64 + 4k is f32-aligned.
        unsafe { (self.map.as_ptr() as *mut u8).add(HEADER + rank * self.max * 4) as *mut f32 }
    }

    fn broken(&self) -> Error {
        Error::Broken {
            waited: self.timeout,
        }
    }

    /// Waits until every rank has arrived here.
    fn barrier(&self) -> Result<(), Error> {
        let (arrived, generation, broken) =
            (self.word(ARRIVED), self.word(GENERATION), self.word(BROKEN));
        if broken.load(Ordering::Acquire) != 0 {
            return Err(self.broken());
        }
        let current = generation.load(Ordering::Acquire);
        if arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.world as u32 {
            // The last one: reset the count before the new generation is visible, so a rank
            // that runs ahead to the next barrier counts from zero.
            arrived.store(0, Ordering::Relaxed);
            generation.fetch_add(1, Ordering::Release);
            futex_wake(generation);
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            // A rank that gives up sets `broken` before it bumps the generation, so a waiter
            // woken by that bump sees the flag.
            if broken.load(Ordering::Acquire) != 0 {
                return Err(self.broken());
            }
            if generation.load(Ordering::Acquire) != current {
                return if broken.load(Ordering::Acquire) != 0 {
                    Err(self.broken())
                } else {
                    Ok(())
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                broken.store(1, Ordering::Release);
                // Wake the others so they fail now rather than at their own deadlines.
                generation.fetch_add(1, Ordering::Release);
                futex_wake(generation);
                return Err(self.broken());
            }
            futex_wait(generation, current, left);
        }
    }
}

impl Collective for ShmGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn capacity(&self) -> usize {
        self.max
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), Error> {
        if data.len() > self.max {
            return Err(Error::TooLarge {
                len: data.len(),
                max: self.max,
            });
        }
        // SAFETY: this rank alone writes its slot, and only between the second barrier of the
        // previous call and the first of this one, while no rank reads it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.slot(self.rank), data.len()) };
        self.barrier()?;
        for (i, out) in data.iter_mut().enumerate() {
            // Rank order, whoever arrived first: every rank computes the same bits.
            let mut sum = 0.0f32;
            for r in 0..self.world {
                // SAFETY: every slot was written before the barrier, and no rank writes again
                // before the next one; i < len <= max.
                sum += unsafe { self.slot(r).add(i).read() };
            }
            *out = sum;
        }
        self.barrier()?;
        // A broken flag set by a rank that gave up after this one passed: say so.
        if self.word(BROKEN).load(Ordering::Acquire) != 0 {
            return Err(self.broken());
        }
        Ok(())
    }
}

/// Sleeps in the kernel while `word` holds `expected`, at most `timeout` (a shared futex: the
/// word may be in a mapping other processes wait on).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT reads the aligned u32 at `word` (alive for the call) and sleeps; the
    // timespec outlives the call. A spurious or early return is handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every rank waiting on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE only uses the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "baton-collective-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ))
    }

    /// What rank `r` contributes in call `call`: values whose sum depends on the order of
    /// addition (large and small magnitudes mixed), so a wrong order shows.
    fn values(r: usize, call: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (r * 7919 + call * 104_729 + i * 31) as f32;
                if (r + i).is_multiple_of(2) {
                    x * 1e6
                } else {
                    1.0 / (x + 1.0)
                }
            })
            .collect()
    }

    fn rank_order_sum(world: usize, call: usize, len: usize) -> Vec<f32> {
        let mut sum = vec![0.0f32; len];
        for r in 0..world {
            for (s, v) in sum.iter_mut().zip(values(r, call, len)) {
                *s += v;
            }
        }
        sum
    }

    #[test]
    fn three_ranks_get_the_same_rank_order_sum_call_after_call() {
        let p = path("threads");
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let g =
                        ShmGroup::open(&p, r, world, 512, Duration::from_secs(10)).expect("open");
                    for call in 0..200 {
                        let len = 1 + (call * 37) % 512;
                        let mut data = values(r, call, len);
                        g.all_reduce_sum(&mut data).expect("all-reduce");
                        let want = rank_order_sum(world, call, len);
                        assert!(
                            data.iter()
                                .zip(&want)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "rank {r}, call {call}: not the rank-order sum"
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("rank thread");
        }
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn ranks_in_separate_processes_agree() {
        // Each rank its own process (fork): the segment and its futexes are shared between
        // processes, as a group's ranks are.
        let p = path("procs");
        let world = 3;
        let groups: Vec<ShmGroup> = (0..world)
            .map(|r| ShmGroup::open(&p, r, world, 256, Duration::from_secs(10)).expect("open"))
            .collect();
        let wants: Vec<Vec<f32>> = (0..50)
            .map(|call| rank_order_sum(world, call, 256))
            .collect();
        let mut children = Vec::new();
        for g in groups.iter().skip(1) {
            let mut data: Vec<Vec<f32>> = (0..50).map(|call| values(g.rank(), call, 256)).collect();
            // SAFETY: the child only calls all_reduce_sum (no allocation, no locks: buffers
            // were made before the fork) and leaves with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork");
            if pid == 0 {
                let ok = data.iter_mut().zip(&wants).all(|(d, want)| {
                    g.all_reduce_sum(d).is_ok()
                        && d.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits())
                });
                // SAFETY: leaves the forked child without running the parent's destructors.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            children.push(pid);
        }
        for (call, want) in wants.iter().enumerate() {
            let mut d = values(0, call, 256);
            groups[0].all_reduce_sum(&mut d).expect("all-reduce");
            assert!(d.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        for pid in children {
            let mut status = 0;
            // SAFETY: waits for a child this test forked.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "rank process {pid} saw another sum (status {status})"
            );
        }
        let _ = std::fs::remove_file(&p);
    }

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: fills `ts`.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn a_missing_rank_breaks_the_group_after_the_time_out_and_the_wait_sleeps() {
        let p = path("missing");
        let g = ShmGroup::open(&p, 0, 2, 8, Duration::from_millis(300)).expect("open");
        let (started, cpu) = (Instant::now(), thread_cpu());
        let err = g
            .all_reduce_sum(&mut [1.0; 8])
            .expect_err("rank 1 never came");
        let (waited, spent) = (started.elapsed(), thread_cpu() - cpu);
        assert!(matches!(err, Error::Broken { .. }), "{err}");
        assert!(
            waited >= Duration::from_millis(300),
            "gave up after {waited:?}"
        );
        assert!(
            spent < Duration::from_millis(50),
            "waiting {waited:?} used {spent:?} of CPU: it spins"
        );
        // Broken for good: rank 1 arriving late fails at once.
        let late = ShmGroup::open(&p, 1, 2, 8, Duration::from_secs(10)).expect("open");
        let started = Instant::now();
        assert!(late.all_reduce_sum(&mut [1.0; 8]).is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn bad_settings_and_sizes_are_refused_naming_the_field() {
        let p = path("bad");
        let field = |r: Result<ShmGroup, Error>| match r {
            Err(Error::InvalidConfig { field, .. }) => field,
            Err(e) => panic!("unexpected {e}"),
            Ok(_) => panic!("accepted"),
        };
        let t = Duration::from_secs(1);
        assert_eq!(field(ShmGroup::open(&p, 3, 3, 8, t)), "rank");
        assert_eq!(field(ShmGroup::open(&p, 0, 0, 8, t)), "world");
        assert_eq!(field(ShmGroup::open(&p, 0, 2, 0, t)), "max");
        let g = ShmGroup::open(&p, 0, 2, 8, t).expect("open");
        assert!(matches!(
            g.all_reduce_sum(&mut [0.0; 9]),
            Err(Error::TooLarge { len: 9, max: 8 })
        ));
        // Another group's shape on the same file.
        assert!(matches!(
            ShmGroup::open(&p, 0, 4, 8, t),
            Err(Error::Segment { .. })
        ));
        drop(g);
        let _ = std::fs::remove_file(&p);
    }
}
