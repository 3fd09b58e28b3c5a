//! Activation rows quantized to 8 bits per 32-value block, like ggml's Q8_1, with f32 scales.
//!
//! Block `b` of row `i` holds `q` in -127..=127, `d = amax / 127` and `s = d * sum(q)`, so that
//! `x ≈ d * q` with `|x - d * q| <= d / 2`. The scalar and AVX2 quantizers round the same products
//! to nearest-even and so produce identical blocks.

use super::pack::BLOCK;

/// `m` activation rows of `k` values, quantized per 32-value block.
pub(crate) struct QuantizedRows {
    /// Values per row.
    pub(crate) k: usize,
    /// `qs[i * k + c]`: quantized value `c` of row `i`.
    pub(crate) qs: Vec<i8>,
    /// `d[i * blocks + b]`: scale of block `b` of row `i`.
    pub(crate) d: Vec<f32>,
    /// `s[i * blocks + b]`: `d * sum(q)` of block `b` of row `i`.
    pub(crate) s: Vec<f32>,
    /// `qs` plus 128 as unsigned bytes, for the VNNI Q8 kernel; empty until
    /// [`QuantizedRows::add_unsigned`].
    pub(crate) qu: Vec<u8>,
    /// `d` and `s` again, block-major (`[b * m + i]`); empty until
    /// [`QuantizedRows::add_block_major_scales`].
    d_by_block: Vec<f32>,
    s_by_block: Vec<f32>,
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

/// One quantized row, borrowed from [`QuantizedRows`].
#[derive(Clone, Copy)]
pub(crate) struct Row<'a> {
    pub(crate) qs: &'a [i8],
    pub(crate) d: &'a [f32],
    pub(crate) s: &'a [f32],
    /// The row's `qu` (empty when the rows have none).
    pub(crate) qu: &'a [u8],
}

impl QuantizedRows {
    fn zeroed(m: usize, k: usize) -> Self {
        let blocks = k / BLOCK;
        Self {
            k,
            qs: vec![0; m * k],
            d: vec![0.0; m * blocks],
            s: vec![0.0; m * blocks],
            qu: Vec::new(),
            d_by_block: Vec::new(),
            s_by_block: Vec::new(),
        }
    }

    /// Number of rows m.
    fn rows(&self) -> usize {
        self.qs.len().checked_div(self.k).unwrap_or(0)
    }

    /// Row `i`.
    pub(crate) fn row(&self, i: usize) -> Row<'_> {
        let blocks = self.k / BLOCK;
        Row {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * blocks..(i + 1) * blocks],
            s: &self.s[i * blocks..(i + 1) * blocks],
            qu: self
                .qu
                .get(i * self.k..(i + 1) * self.k)
                .unwrap_or_default(),
        }
    }

    /// Fills the block-major copies of `d` and `s` that [`QuantizedRows::block_scales`] reads.
    pub(crate) fn add_block_major_scales(&mut self) {
        let (blocks, m) = (self.k / BLOCK, self.rows());
        let transpose = |v: &[f32]| -> Vec<f32> {
            (0..blocks * m)
                .map(|j| v[(j % m) * blocks + j / m])
                .collect()
        };
        self.d_by_block = transpose(&self.d);
        self.s_by_block = transpose(&self.s);
    }

    /// The block-major scales of rows `i..`; None before
    /// [`QuantizedRows::add_block_major_scales`].
    pub(crate) fn block_scales(&self, i: usize) -> Option<BlockScales<'_>> {
        let m = self.rows();
        if self.d_by_block.len() != self.d.len() || i >= m {
            return None;
        }
        Some(BlockScales {
            d: &self.d_by_block[i..],
            s: &self.s_by_block[i..],
            stride: m,
        })
    }

    /// Fills [`QuantizedRows::qu`]: VNNI multiplies unsigned bytes by signed ones, so the Q8
    /// kernel multiplies `q + 128` by the weights and subtracts `128 * sum(w)` per block, which
    /// is cheaper than moving each weight's sign onto the activation.
    pub(crate) fn add_unsigned(&mut self) {
        self.qu = self.qs.iter().map(|&q| (q as u8) ^ 0x80).collect();
    }

    /// Quantizes `x` (rows of `k` values, `k` a multiple of 32) with the portable code.
    pub(crate) fn quantize_scalar(x: &[f32], k: usize) -> Self {
        let mut out = Self::zeroed(x.len() / k, k);
        for (((x, q), d), s) in x
            .chunks_exact(BLOCK)
            .zip(out.qs.chunks_exact_mut(BLOCK))
            .zip(out.d.iter_mut())
            .zip(out.s.iter_mut())
        {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(x) {
                // |v * id| <= 127 up to rounding of the product, so the clamp never binds.
                *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            *d = amax / 127.0;
            *s = *d * sum as f32;
        }
        out
    }

    /// Quantizes `x` with AVX2; the result equals [`Self::quantize_scalar`]'s.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quantize_avx2(x: &[f32], k: usize) -> Self {
        use std::arch::x86_64::*;
        let mut out = Self::zeroed(x.len() / k, k);
        let abs_mask = _mm256_set1_ps(f32::from_bits(0x7fff_ffff));
        let lo127 = _mm256_set1_ps(-127.0);
        let hi127 = _mm256_set1_ps(127.0);
        // packs interleaves the two 128-bit lanes; this restores value order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (((x, q), d), s) in x
            .chunks_exact(BLOCK)
            .zip(out.qs.chunks_exact_mut(BLOCK))
            .zip(out.d.iter_mut())
            .zip(out.s.iter_mut())
        {
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
                _mm256_storeu_si256(q.as_mut_ptr().cast(), q8);
                *d = amax / 127.0;
                *s = *d * sum as f32;
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
        let q = QuantizedRows::quantize_scalar(&x, 96);
        for i in 0..3 {
            let row = q.row(i);
            for c in 0..96 {
                let d = row.d[c / BLOCK];
                let err = (x[i * 96 + c] - d * row.qs[c] as f32).abs();
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
                assert_eq!(row.s[b], row.d[b] * sum as f32);
            }
        }
    }

    #[test]
    fn unsigned_bytes_are_values_plus_128() {
        let mut q = QuantizedRows::quantize_scalar(&random_rows(2, 64, 5), 64);
        assert!(q.row(1).qu.is_empty());
        q.add_unsigned();
        for i in 0..2 {
            let row = q.row(i);
            for (&v, &u) in row.qs.iter().zip(row.qu) {
                assert_eq!(u as i32, v as i32 + 128);
            }
            assert_eq!(row.qu.len(), 64);
        }
    }

    #[test]
    fn block_major_scales_address_each_rows_blocks() {
        let mut q = QuantizedRows::quantize_scalar(&random_rows(3, 96, 6), 96);
        assert!(q.block_scales(0).is_none());
        q.add_block_major_scales();
        for i in 0..3 {
            let bs = q.block_scales(i).expect("added");
            assert_eq!(bs.stride, 3);
            for r in 0..3 - i {
                for b in 0..3 {
                    assert_eq!(bs.d[b * bs.stride + r], q.row(i + r).d[b]);
                    assert_eq!(bs.s[b * bs.stride + r], q.row(i + r).s[b]);
                }
            }
        }
        assert!(q.block_scales(3).is_none());
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let q = QuantizedRows::quantize_scalar(&[0.0; 32], 32);
        assert_eq!(q.qs, vec![0; 32]);
        assert_eq!((q.d[0], q.s[0]), (0.0, 0.0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_quantization_equals_scalar() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for (m, k, seed) in [(1, 32, 2), (3, 576, 3), (5, 1536, 4)] {
            let x = random_rows(m, k, seed);
            let a = QuantizedRows::quantize_scalar(&x, k);
            // SAFETY: AVX2 support was checked above.
            let b = unsafe { QuantizedRows::quantize_avx2(&x, k) };
            assert_eq!(a.qs, b.qs);
            assert_eq!(a.d, b.d);
            assert_eq!(a.s, b.s);
        }
    }
}
