//! x86-64 SIMD kernels over the packed tiles: AVX2 + FMA + F16C, and the same with AVX-512 VNNI's
//! 256-bit `vpdpbusd` for the integer dot products.
//!
//! One call computes `MR` activation rows against the 8 weight rows of one tile group. Each tile's
//! weights are loaded (and, for Q4, unpacked) once and reused for all `MR` rows; lane `r` of every
//! vector belongs to weight row `r`, so a block's integer sums land in their rows' lanes and are
//! scaled with one FMA per block and activation row.
//!
//! The two variants compute the same exact integer block sums (no intermediate can saturate, see
//! the comments at each step) and share the float epilogue, so their outputs are bit-identical.
//! VNNI does in one instruction what AVX2 spends three on (`maddubs`, a 16-bit add and, per block,
//! a widening `madd`), which is what bounds a batched decode step's matmuls once the weights are
//! shared by several rows; with AVX-512VL's 32 vector registers it also keeps 8 rows in flight.
//! For Q8 weights the VNNI variant multiplies the activations plus 128 (unsigned bytes, which the
//! quantizer writes in place of the signed ones) by the signed weights and subtracts 128 times
//! the weights' sum once per block, rather than moving every weight's sign onto the activations
//! as the AVX2 variant does.

use std::arch::x86_64::*;

use half::f16;

use super::pack::{BLOCK, Q4Tile, Q8Tile, ROWS};
use super::quant::{BlockScales, Bytes, Row};

/// How many tiles ahead of the one being multiplied the kernels ask for weights: 2.5 KiB (Q4)
/// or 4 KiB (Q8) further along the stream. A batched decode step's matmuls are compute-bound
/// enough that the hardware prefetcher alone let DRAM reads and the multiply-adds take turns;
/// asking ahead cut the batch-8 matmuls by 11-16% at every distance measured (4 to 24 tiles,
/// 16 the best median) and left the memory-bound single stream unchanged (BENCHMARKS.md,
/// session 10).
const PREFETCH_TILES: usize = 16;

/// Asks for the `lines` cache lines from `at` (a tile [`PREFETCH_TILES`] ahead; past the end of
/// the weights the request is dropped, a prefetch never faults).
#[inline(always)]
fn prefetch_lines(at: *const u8, lines: usize) {
    for l in 0..lines {
        // SAFETY: prefetching has no architectural effect and accepts any address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * l).cast()) };
    }
}

/// True when the CPU has every feature the AVX2 variant is compiled for.
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// True when the CPU can also run the VNNI variant (256-bit `vpdpbusd` needs AVX-512 VNNI and VL).
pub(crate) fn vnni_available() -> bool {
    available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// Reads the 4 activation bytes `4 * idx .. 4 * idx + 4` of the current block and broadcasts
/// them to all 8 lanes.
///
/// # Safety
/// `xq.add(4 * idx)` must be valid for reading 4 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast4(xq: *const i8, idx: usize) -> __m256i {
    // SAFETY: the caller guarantees the 4 bytes are readable; the read is unaligned-safe.
    _mm256_set1_epi32(unsafe { xq.add(4 * idx).cast::<i32>().read_unaligned() })
}

/// Dot products of `MR` activation rows with one group of Q4 tiles (one tile per block).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (see [`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4_group<const MR: usize>(
    tiles: &[Q4Tile],
    x: &[Row<'_>; MR],
    scales: BlockScales<'_>,
    out: &mut [[f32; ROWS]; MR],
) {
    // SAFETY: the caller guarantees the features this variant uses.
    unsafe { q4_body::<false, MR>(tiles, x, scales, out) }
}

/// [`q4_group`] with VNNI dot products; bit-identical results.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX-512 VNNI and VL (see [`vnni_available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(crate) unsafe fn q4_group_vnni<const MR: usize>(
    tiles: &[Q4Tile],
    x: &[Row<'_>; MR],
    scales: BlockScales<'_>,
    out: &mut [[f32; ROWS]; MR],
) {
    // SAFETY: the caller guarantees the features either variant uses.
    unsafe { q4_body::<true, MR>(tiles, x, scales, out) }
}

/// The Q4 kernel, inlined into each variant's entry so it compiles with that entry's features.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI and VL when `VNNI`.
#[inline(always)]
unsafe fn q4_body<const VNNI: bool, const MR: usize>(
    tiles: &[Q4Tile],
    x: &[Row<'_>; MR],
    scales: BlockScales<'_>,
    out: &mut [[f32; ROWS]; MR],
) {
    let blocks = tiles.len();
    for row in x {
        assert!(row.qs.len() >= blocks * BLOCK && row.bytes == Bytes::Signed);
    }
    let (d, sums, stride) = (scales.d, scales.s, scales.stride);
    let last = blocks.saturating_sub(1) * stride + MR;
    assert!(MR <= stride && d.len() >= last && sums.len() >= last);
    // SAFETY (all intrinsics below): the caller guarantees the CPU features.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); MR];
        for (b, tile) in tiles.iter().enumerate() {
            // Tiles are 160 bytes and contiguous (the next group's follow this one's), so 3 lines
            // per tile cover the stream.
            prefetch_lines(
                std::ptr::from_ref(tile).wrapping_add(PREFETCH_TILES).cast(),
                3,
            );
            let q = tile.qs.as_ptr().cast::<__m256i>();
            // AVX2: 16-bit partial sums. Each maddubs lane is at most 2 * 15 * 127 = 3810 in
            // magnitude; eight of them sum to at most 30480, so the i16 accumulation cannot
            // saturate. VNNI: 32-bit sums straight away.
            let mut s = [_mm256_setzero_si256(); MR];
            // Register p: low nibbles are values 4p..4p+4, high nibbles 16+4p..16+4p+4 (per row).
            for p in 0..4 {
                // `Q4Tile` is 32-byte aligned with `qs` (128 bytes) at offset 0.
                let w = _mm256_load_si256(q.add(p));
                let lo = _mm256_and_si256(w, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
                for (s, row) in s.iter_mut().zip(x) {
                    // The assert above guarantees `qs` holds `blocks * 32` values, so the block's
                    // 32 bytes at `b * 32` are readable; p and p + 4 address 4 of them each.
                    let xq = row.qs.as_ptr().add(b * BLOCK);
                    let (xl, xh) = (bcast4(xq, p), bcast4(xq, p + 4));
                    *s = if VNNI {
                        _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(*s, lo, xl), hi, xh)
                    } else {
                        let t = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, xl),
                            _mm256_maddubs_epi16(hi, xh),
                        );
                        _mm256_add_epi16(*s, t)
                    };
                }
            }
            // `d`, `m` sit at 16-byte aligned offsets 128 and 144 of the tile.
            let dw = _mm256_cvtph_ps(_mm_load_si128(tile.d.as_ptr().cast()));
            let mw = _mm256_cvtph_ps(_mm_load_si128(tile.m.as_ptr().cast()));
            for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
                // The assert above guarantees block b's scales of rows r < MR are in bounds.
                let (dx, sx) = (
                    *d.get_unchecked(b * stride + r),
                    *sums.get_unchecked(b * stride + r),
                );
                let s = if VNNI {
                    *s
                } else {
                    _mm256_madd_epi16(*s, ones)
                };
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), *acc);
            }
        }
        for (acc, out) in acc.iter().zip(out.iter_mut()) {
            // `out` is 8 f32s, exactly one unaligned 256-bit store.
            _mm256_storeu_ps(out.as_mut_ptr(), *acc);
        }
    }
}

/// Dot products of `MR` activation rows with one group of Q8 tiles and their scales `d`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (see [`available`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_group<const MR: usize>(
    tiles: &[Q8Tile],
    d: &[[f16; ROWS]],
    x: &[Row<'_>; MR],
    scales: BlockScales<'_>,
    out: &mut [[f32; ROWS]; MR],
) {
    // SAFETY: the caller guarantees the features this variant uses.
    unsafe { q8_body::<false, MR>(tiles, d, x, scales, out) }
}

/// [`q8_group`] with VNNI dot products; bit-identical results.
///
/// # Safety
/// The CPU must support AVX2, FMA, F16C, AVX-512 VNNI and VL (see [`vnni_available`]).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(crate) unsafe fn q8_group_vnni<const MR: usize>(
    tiles: &[Q8Tile],
    d: &[[f16; ROWS]],
    x: &[Row<'_>; MR],
    scales: BlockScales<'_>,
    out: &mut [[f32; ROWS]; MR],
) {
    // SAFETY: the caller guarantees the features either variant uses.
    unsafe { q8_body::<true, MR>(tiles, d, x, scales, out) }
}

/// The Q8 kernel, inlined into each variant's entry so it compiles with that entry's features.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI and VL when `VNNI`.
#[inline(always)]
unsafe fn q8_body<const VNNI: bool, const MR: usize>(
    tiles: &[Q8Tile],
    d: &[[f16; ROWS]],
    x: &[Row<'_>; MR],
    scales: BlockScales<'_>,
    out: &mut [[f32; ROWS]; MR],
) {
    let blocks = tiles.len();
    assert!(d.len() >= blocks);
    let (xd, stride) = (scales.d, scales.stride);
    assert!(MR <= stride && xd.len() >= blocks.saturating_sub(1) * stride + MR);
    // VNNI multiplies unsigned activation bytes by the signed weights; AVX2 wants them signed.
    let bytes = if VNNI { Bytes::Unsigned } else { Bytes::Signed };
    for row in x {
        assert!(row.qs.len() >= blocks * BLOCK && row.bytes == bytes);
    }
    // SAFETY (all intrinsics below): the caller guarantees the CPU features.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let bias = _mm256_set1_epi8(0x80u8 as i8);
        let mut acc = [_mm256_setzero_ps(); MR];
        for (b, tile) in tiles.iter().enumerate() {
            prefetch_lines(
                std::ptr::from_ref(tile).wrapping_add(PREFETCH_TILES).cast(),
                4,
            );
            let q = tile.qs.as_ptr().cast::<__m256i>();
            let mut s = [_mm256_setzero_si256(); MR];
            // VNNI: 128 * sum(w) per row lane, subtracted from every row's sum of (x + 128) * w.
            // Each lane's sums stay below 32 * 255 * 128 in magnitude: no overflow, exact.
            let mut shift = _mm256_setzero_si256();
            // One weight register live at a time, reused for every row: keeping all 8 (and, for
            // AVX2, their absolute values) live across the rows spilled to the stack.
            for p in 0..8 {
                // `Q8Tile` is 32-byte aligned and 256 bytes long, so the aligned load of register
                // p < 8 is in bounds.
                let w = _mm256_load_si256(q.add(p));
                if VNNI {
                    shift = _mm256_dpbusd_epi32(shift, bias, w);
                    for (s, row) in s.iter_mut().zip(x) {
                        // The assert above guarantees the block's 32 unsigned bytes are
                        // readable, and p < 8 addresses 4 of them.
                        let xu = bcast4(row.qs.as_ptr().add(b * BLOCK), p);
                        *s = _mm256_dpbusd_epi32(*s, xu, w);
                    }
                } else {
                    // maddubs wants an unsigned operand: use |w| and move w's sign onto x.
                    let aw = _mm256_abs_epi8(w);
                    for (s, row) in s.iter_mut().zip(x) {
                        // The assert above guarantees the block's 32 bytes are readable, and
                        // p < 8 addresses 4 of them.
                        let xp = _mm256_sign_epi8(bcast4(row.qs.as_ptr().add(b * BLOCK), p), w);
                        // |w| <= 128 and |x| <= 127: a maddubs lane is at most 32512, no
                        // saturation.
                        let t = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xp), ones);
                        *s = _mm256_add_epi32(*s, t);
                    }
                }
            }
            if VNNI {
                for s in &mut s {
                    *s = _mm256_sub_epi32(*s, shift);
                }
            }
            // `d[b]` exists (assert above) and is 16 bytes, read unaligned.
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.get_unchecked(b).as_ptr().cast()));
            for (r, (acc, s)) in acc.iter_mut().zip(&s).enumerate() {
                // The assert above guarantees block b's scale of row r < MR is in bounds.
                let dx = *xd.get_unchecked(b * stride + r);
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), scale, *acc);
            }
        }
        for (acc, out) in acc.iter().zip(out.iter_mut()) {
            // `out` is 8 f32s, exactly one unaligned 256-bit store.
            _mm256_storeu_ps(out.as_mut_ptr(), *acc);
        }
    }
}
