//! Activation rows quantized to 8 bits per 32-value block, like ggml's Q8_1, with f32 scales.
//!
//! Block `b` of row `i` holds `q` in -127..=127, `d = amax / 127` and `s = d * sum(q)`, so that
//! `x ≈ d * q` with `|x - d * q| <= d / 2`. The scalar and AVX2 quantizers round the same products
//! to nearest-even and so produce identical blocks.

use super::pack::BLOCK;

/// Position in [`QuantizedRows`]' `d` and `s` of block `j` of its `m` rows of `blocks` blocks,
/// the rows taken as one sequence (`j = i * blocks + b`).
fn scale_index(j: usize, blocks: usize, m: usize) -> usize {
    j % blocks * m + j / blocks
}

/// How a [`QuantizedRows`] stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bytes {
    /// `q` as signed bytes.
    Signed,
    /// `q + 128` as unsigned bytes, for the VNNI Q8 kernel: VNNI multiplies unsigned bytes by
    /// signed ones, and subtracting `128 * sum(w)` per block is cheaper than moving each
    /// weight's sign onto the activation.
    Unsigned,
}

/// `m` activation rows of `k` values, quantized per 32-value block.
pub(crate) struct QuantizedRows {
    /// Values per row.
    k: usize,
    /// Rows.
    m: usize,
    bytes: Bytes,
    /// `qs[i * k + c]`: quantized value `c` of row `i`, in the form `bytes` names.
    qs: Vec<i8>,
    /// `d[b * m + i]`: scale of block `b` of row `i`. Block-major, so a SIMD pass over several
    /// rows reads them through one pointer (see [`BlockScales`]).
    d: Vec<f32>,
    /// `s[b * m + i]`: `d * sum(q)` of block `b` of row `i`.
    s: Vec<f32>,
}

/// The scales of rows `i..` in block-major order: row `i + r`'s block `b` is at
/// `b * stride + r`. A SIMD pass over several rows reads them through one pointer instead of two
/// per row, which kept 8 rows' pointers from fitting in the general registers (they were
/// reloaded from the stack every block).
#[derive(Clone, Copy)]
pub(crate) struct BlockScales<'a> {
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [f32],
    pub(crate) stride: usize,
}

/// One quantized row's values, borrowed from [`QuantizedRows`].
#[derive(Clone, Copy)]
pub(crate) struct Row<'a> {
    pub(crate) qs: &'a [i8],
    pub(crate) bytes: Bytes,
}

impl QuantizedRows {
    fn zeroed(m: usize, k: usize, bytes: Bytes) -> Self {
        let blocks = k / BLOCK;
        Self {
            k,
            m,
            bytes,
            qs: vec![0; m * k],
            d: vec![0.0; m * blocks],
            s: vec![0.0; m * blocks],
        }
    }

    /// Row `i`'s values.
    pub(crate) fn row(&self, i: usize) -> Row<'_> {
        Row {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            bytes: self.bytes,
        }
    }

    /// The scales of rows `i..`; None when there is no row `i`.
    pub(crate) fn block_scales(&self, i: usize) -> Option<BlockScales<'_>> {
        (i < self.m).then(|| BlockScales {
            d: &self.d[i..],
            s: &self.s[i..],
            stride: self.m,
        })
    }

    /// The values the quantized rows stand for, `d * q`, row-major.
    #[cfg(test)]
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let flip = Self::flip(self.bytes) as i8;
        self.qs
            .iter()
            .enumerate()
            .map(|(c, &q)| {
                (q ^ flip) as f32 * self.d[scale_index(c / BLOCK, self.k / BLOCK, self.m)]
            })
            .collect()
    }

    /// Quantizes `x` (rows of `k` values, `k` a multiple of 32) with the portable code.
    pub(crate) fn quantize_scalar(x: &[f32], k: usize, bytes: Bytes) -> Self {
        let mut out = Self::zeroed(x.len() / k, k, bytes);
        let flip = Self::flip(bytes) as i8;
        let (blocks, m) = (k / BLOCK, out.m);
        let Self { qs, d, s, .. } = &mut out;
        for (j, (x, q)) in x
            .chunks_exact(BLOCK)
            .zip(qs.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(x) {
                // |v * id| <= 127 up to rounding of the product, so the clamp never binds.
                let v = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += v as i32;
                *q = v ^ flip;
            }
            let at = scale_index(j, blocks, m);
            d[at] = amax / 127.0;
            s[at] = d[at] * sum as f32;
        }
        out
    }

    /// The byte every signed value is XORed with to store it as `bytes`: flipping the sign bit
    /// of a two's-complement byte adds 128 to it, read as unsigned.
    fn flip(bytes: Bytes) -> u8 {
        match bytes {
            Bytes::Signed => 0,
            Bytes::Unsigned => 0x80,
        }
    }

    /// Quantizes `x` with AVX2; the result equals [`Self::quantize_scalar`]'s.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quantize_avx2(x: &[f32], k: usize, bytes: Bytes) -> Self {
        use std::arch::x86_64::*;
        let mut out = Self::zeroed(x.len() / k, k, bytes);
        let flip = _mm256_set1_epi8(Self::flip(bytes) as i8);
        let abs_mask = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
        let lo127 = _mm256_set1_ps(-127.0);
        let hi127 = _mm256_set1_ps(127.0);
        // packs interleaves the two 128-bit lanes; this restores value order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let (blocks, m) = (k / BLOCK, out.m);
        let Self { qs, d, s, .. } = &mut out;
        for (j, (x, q)) in x
            .chunks_exact(BLOCK)
            .zip(qs.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let at = scale_index(j, blocks, m);
            // SAFETY: `x` and `q` hold exactly 32 elements each (chunks_exact), so the four
            // 8-float loads and the one 32-byte store stay inside them; unaligned access is used.
            unsafe {
                let v = [
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                    _mm256_loadu_ps(x.as_ptr().add(16)),
                    _mm256_loadu_ps(x.as_ptr().add(24)),
                ];
                let a01 =
                    _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask));
                let a23 =
                    _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask));
                let a = _mm256_max_ps(a01, a23);
                let a = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                let a = _mm_max_ps(a, _mm_movehl_ps(a, a));
                let a = _mm_max_ss(a, _mm_movehdup_ps(a));
                let amax = _mm_cvtss_f32(a);
                let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                let mut qi = [_mm256_setzero_si256(); 4];
                for (qi, v) in qi.iter_mut().zip(v) {
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        _mm256_mul_ps(v, id),
                    );
                    *qi = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo127), hi127));
                }
                let sum = _mm256_add_epi32(
                    _mm256_add_epi32(qi[0], qi[1]),
                    _mm256_add_epi32(qi[2], qi[3]),
                );
                let sum = _mm_add_epi32(
                    _mm256_castsi256_si128(sum),
                    _mm256_extracti128_si256(sum, 1),
                );
                let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
                let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
                let sum = _mm_cvtsi128_si32(sum);
                let q16a = _mm256_packs_epi32(qi[0], qi[1]);
                let q16b = _mm256_packs_epi32(qi[2], qi[3]);
                let q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), order);
                _mm256_storeu_si256(q.as_mut_ptr().cast(), _mm256_xor_si256(q8, flip));
                d[at] = amax / 127.0;
                s[at] = d[at] * sum as f32;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_rows(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..m * k)
            .map(|i| {
                // Mixed magnitudes, exact zeros and a few ties (x.5 after scaling) per row.
                match i % 97 {
                    0 => 0.0,
                    1 => 2.5,
                    _ => rng.random_range(-3.0f32..3.0) * if i % 5 == 0 { 10.0 } else { 1.0 },
                }
            })
            .collect()
    }

    #[test]
    fn scalar_quantization_error_is_at_most_half_a_step() {
        let x = random_rows(3, 96, 1);
        let q = QuantizedRows::quantize_scalar(&x, 96, Bytes::Signed);
        let x_hat = q.dequantize();
        for i in 0..3 {
            let (row, scales) = (q.row(i), q.block_scales(i).expect("row i"));
            for c in 0..96 {
                let d = scales.d[c / BLOCK * scales.stride];
                let err = (x[i * 96 + c] - x_hat[i * 96 + c]).abs();
                assert_eq!(x_hat[i * 96 + c], d * row.qs[c] as f32);
                assert!(
                    err <= d * 0.5 * (1.0 + 1e-5),
                    "row {i} col {c}: err {err} d {d}"
                );
            }
            for b in 0..3 {
                let sum: i32 = row.qs[b * BLOCK..(b + 1) * BLOCK]
                    .iter()
                    .map(|&q| q as i32)
                    .sum();
                let at = b * scales.stride;
                assert_eq!(scales.s[at], scales.d[at] * sum as f32);
            }
        }
    }

    #[test]
    fn unsigned_bytes_are_values_plus_128_with_the_same_scales() {
        let x = random_rows(2, 64, 5);
        let signed = QuantizedRows::quantize_scalar(&x, 64, Bytes::Signed);
        let unsigned = QuantizedRows::quantize_scalar(&x, 64, Bytes::Unsigned);
        for i in 0..2 {
            let (v, u) = (signed.row(i), unsigned.row(i));
            assert_eq!((v.bytes, u.bytes), (Bytes::Signed, Bytes::Unsigned));
            for (&v, &u) in v.qs.iter().zip(u.qs) {
                assert_eq!(u as u8 as i32, v as i32 + 128);
            }
        }
        assert_eq!(
            (signed.d.clone(), signed.s.clone()),
            (unsigned.d.clone(), unsigned.s.clone())
        );
        assert_eq!(signed.dequantize(), unsigned.dequantize());
    }

    #[test]
    fn block_scales_address_each_rows_blocks() {
        let x = random_rows(3, 96, 6);
        let q = QuantizedRows::quantize_scalar(&x, 96, Bytes::Signed);
        for i in 0..3 {
            let bs = q.block_scales(i).expect("row i");
            assert_eq!(bs.stride, 3);
            for r in 0..3 - i {
                for b in 0..3 {
                    // Each row's blocks quantized alone give the same scales.
                    let row = &x[(i + r) * 96 + b * BLOCK..][..BLOCK];
                    let alone = QuantizedRows::quantize_scalar(row, BLOCK, Bytes::Signed);
                    assert_eq!(bs.d[b * bs.stride + r], alone.d[0]);
                    assert_eq!(bs.s[b * bs.stride + r], alone.s[0]);
                }
            }
        }
        assert!(q.block_scales(3).is_none());
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let q = QuantizedRows::quantize_scalar(&[0.0; 32], 32, Bytes::Signed);
        assert_eq!(q.qs, vec![0; 32]);
        assert_eq!((q.d[0], q.s[0]), (0.0, 0.0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_quantization_equals_scalar() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for bytes in [Bytes::Signed, Bytes::Unsigned] {
            for (m, k, seed) in [(1, 32, 2), (3, 576, 3), (5, 1536, 4)] {
                let x = random_rows(m, k, seed);
                let a = QuantizedRows::quantize_scalar(&x, k, bytes);
                // SAFETY: AVX2 support was checked above.
                let b = unsafe { QuantizedRows::quantize_avx2(&x, k, bytes) };
                assert_eq!(a.qs, b.qs);
                assert_eq!(a.d, b.d);
                assert_eq!(a.s, b.s);
            }
        }
    }
}
