//! Checksummed copies: a copy that computes the crc32c of the bytes it moves in the same pass,
//! for the shared-memory transport, where a frame is copied once on each side and checksummed
//! once on each side.
//!
//! Copying and then checksumming reads every byte twice; on x86-64 with SSE 4.2 the copy here
//! feeds each 8-byte word it loads to the crc32 instruction on its way to the store, three
//! independent lanes at a time so the instruction's latency hides under the memory traffic.
//! It still runs at about three quarters of a plain `memcpy` here (BENCHMARKS.md, "KV transfer"):
//! its 8-byte stores read each destination line before writing it, which `memcpy`'s string
//! copies avoid (non-temporal 8-byte stores were tried and gained nothing). The checksum is
//! of the words as loaded and stored, so it describes exactly the bytes written to the
//! destination even if another process changes the source meanwhile.

use std::sync::OnceLock;

/// Bytes in each of the three lanes of one block of the fused loop.
const LANE: usize = 8 << 10;

/// Copies `src` into `dst`, which must be as long, and returns the crc32c of the bytes copied,
/// reading each byte once: what each side of the shared-memory transport does with a payload.
pub fn checksummed_copy(src: &[u8], dst: &mut [u8]) -> u32 {
    assert_eq!(
        src.len(),
        dst.len(),
        "checksummed copy between unequal lengths"
    );
    // SAFETY: a shared and a mutable borrow never overlap, and both are `src.len()` bytes.
    unsafe { copy_crc32c(src.as_ptr(), dst.as_mut_ptr(), src.len()) }
}

/// Copies `len` bytes from `src` to `dst` and returns the crc32c of the bytes copied (as
/// [`crc32c::crc32c`] computes it), reading each source byte once.
///
/// # Safety
///
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges must
/// not overlap. Neither needs to be aligned. `src` may be shared memory that another process
/// writes meanwhile: it is read through raw pointers only, and whatever is read is what is
/// stored and checksummed.
pub(crate) unsafe fn copy_crc32c(src: *const u8, dst: *mut u8, len: usize) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2 (checked above); the pointer contract is the caller's.
        return unsafe { !x86::copy_crc(src, dst, len, !0) };
    }
    // SAFETY: the caller's contract, passed on.
    unsafe { copy_crc_staged(src, dst, len) }
}

/// The portable path: through a small local buffer, so that the checksum is of the bytes stored.
///
/// # Safety
///
/// As [`copy_crc32c`].
unsafe fn copy_crc_staged(src: *const u8, dst: *mut u8, len: usize) -> u32 {
    let mut stage = [0u8; 4096];
    let mut crc = 0;
    let mut at = 0;
    while at < len {
        let n = stage.len().min(len - at);
        // SAFETY: `at + n <= len`, so both ranges lie in what the caller vouched for; `stage`
        // is a local array of at least `n` bytes and overlaps neither.
        unsafe {
            std::ptr::copy_nonoverlapping(src.add(at), stage.as_mut_ptr(), n);
            std::ptr::copy_nonoverlapping(stage.as_ptr(), dst.add(at), n);
        }
        crc = crc32c::crc32c_append(crc, &stage[..n]);
        at += n;
    }
    crc
}

/// Advances a raw crc32c register (no pre- or post-inversion) over `LANE` zero bytes, which is a
/// linear map: four table lookups, one per byte of the register.
struct LaneShift([[u32; 256]; 4]);

impl LaneShift {
    fn get() -> &'static Self {
        static TABLE: OnceLock<LaneShift> = OnceLock::new();
        TABLE.get_or_init(|| {
            let zeros = vec![0u8; LANE];
            // The raw register after `LANE` zeros from state `1 << bit`. `crc32c_append`
            // inverts on the way in and out; undo both.
            let basis: [u32; 32] =
                std::array::from_fn(|bit| !crc32c::crc32c_append(!(1u32 << bit), &zeros));
            let mut t = [[0u32; 256]; 4];
            for (k, row) in t.iter_mut().enumerate() {
                for (byte, entry) in row.iter_mut().enumerate() {
                    *entry = (0..8)
                        .filter(|j| byte >> j & 1 == 1)
                        .fold(0, |acc, j| acc ^ basis[8 * k + j]);
                }
            }
            LaneShift(t)
        })
    }

    fn apply(&self, r: u32) -> u32 {
        let t = &self.0;
        t[0][(r & 0xff) as usize]
            ^ t[1][(r >> 8 & 0xff) as usize]
            ^ t[2][(r >> 16 & 0xff) as usize]
            ^ t[3][(r >> 24) as usize]
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};

    use super::{LANE, LaneShift};

    /// The fused loop; takes and returns a raw crc32c register.
    ///
    /// # Safety
    ///
    /// The CPU supports SSE 4.2, and the pointer contract of [`super::copy_crc32c`] holds.
    // Kept out of line: inlined into its caller (which `-C target-cpu=native` allows) the
    // loop ran at 0.56 of memcpy instead of 0.80 (BENCHMARKS.md, "KV transfer", 2026-12-06).
    #[inline(never)]
    #[target_feature(enable = "sse4.2")]
    pub(super) unsafe fn copy_crc(src: *const u8, dst: *mut u8, len: usize, init: u32) -> u32 {
        const WORDS: usize = LANE / 8;
        let shift = LaneShift::get();
        let mut r0 = u64::from(init);
        let mut at = 0;
        // Blocks of three lanes: the first continues the register, the other two start from
        // zero and are folded in by shifting over the lane that follows them.
        while len - at >= 3 * LANE {
            let (s, d) = (
                src.wrapping_add(at).cast::<u64>(),
                dst.wrapping_add(at).cast::<u64>(),
            );
            let (mut r1, mut r2) = (0u64, 0u64);
            for i in 0..WORDS {
                // SAFETY: word `i` of each lane lies in `at .. at + 3 * LANE <= len`, inside
                // both ranges the caller vouched for; unaligned access is allowed.
                unsafe {
                    let a = s.add(i).read_unaligned();
                    let b = s.add(WORDS + i).read_unaligned();
                    let c = s.add(2 * WORDS + i).read_unaligned();
                    d.add(i).write_unaligned(a);
                    d.add(WORDS + i).write_unaligned(b);
                    d.add(2 * WORDS + i).write_unaligned(c);
                    r0 = _mm_crc32_u64(r0, a);
                    r1 = _mm_crc32_u64(r1, b);
                    r2 = _mm_crc32_u64(r2, c);
                }
            }
            // The registers hold 32 bits; the instruction zero-extends them.
            let r = shift.apply(r0 as u32) ^ r1 as u32;
            r0 = u64::from(shift.apply(r) ^ r2 as u32);
            at += 3 * LANE;
        }
        while len - at >= 8 {
            // SAFETY: `at + 8 <= len`.
            unsafe {
                let w = src.add(at).cast::<u64>().read_unaligned();
                dst.add(at).cast::<u64>().write_unaligned(w);
                r0 = _mm_crc32_u64(r0, w);
            }
            at += 8;
        }
        let mut r = r0 as u32;
        while at < len {
            // SAFETY: `at < len`.
            unsafe {
                let b = src.add(at).read();
                dst.add(at).write(b);
                r = _mm_crc32_u8(r, b);
            }
            at += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Copies into a fresh buffer at `skew` bytes past an 8-byte boundary.
    fn copied(src: &[u8], staged: bool, skew: usize) -> (Vec<u8>, u32) {
        let mut buf = vec![0u64; (src.len() + skew).div_ceil(8)];
        // SAFETY: `buf` holds at least `skew + src.len()` bytes, and u64s are valid bytes.
        let dst = unsafe { buf.as_mut_ptr().cast::<u8>().add(skew) };
        // SAFETY: two distinct buffers of `src.len()` bytes.
        let crc = unsafe {
            if staged {
                copy_crc_staged(src.as_ptr(), dst, src.len())
            } else {
                copy_crc32c(src.as_ptr(), dst, src.len())
            }
        };
        // SAFETY: the bytes just written.
        let out = unsafe { std::slice::from_raw_parts(dst, src.len()) }.to_vec();
        (out, crc)
    }

    #[test]
    fn copies_and_checksums_across_lane_boundaries() {
        let src: Vec<u8> = (0..7 * LANE + 13).map(|i| (i * 31 % 251) as u8).collect();
        for len in [
            0,
            1,
            7,
            8,
            9,
            LANE,
            3 * LANE - 1,
            3 * LANE,
            3 * LANE + 1,
            6 * LANE + 8,
            src.len(),
        ] {
            for (staged, skew) in [(false, 0), (false, 3), (true, 0)] {
                let (dst, crc) = copied(&src[..len], staged, skew);
                assert_eq!(
                    dst,
                    &src[..len],
                    "{len} bytes, staged {staged}, skew {skew}"
                );
                assert_eq!(
                    crc,
                    crc32c::crc32c(&src[..len]),
                    "{len} bytes, staged {staged}, skew {skew}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn checksum_matches_crc32c(src in proptest::collection::vec(any::<u8>(), 0..4 * LANE), offset in 0usize..8, skew in 0usize..8) {
            let src = &src[offset.min(src.len())..];
            let (dst, crc) = copied(src, false, skew);
            prop_assert_eq!(&dst[..], src);
            prop_assert_eq!(crc, crc32c::crc32c(src));
        }
    }
}
