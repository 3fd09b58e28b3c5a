//! Element-wise math for the step's non-matmul passes (the MLP's SwiGLU gate, attention's
//! softmax), eight values at a time.
//!
//! [`exp`] and [`exp8`] compute the same f32 operations in the same order (FMAs included:
//! `f32::mul_add` rounds once, as the hardware FMA does), so a value's result never depends on
//! whether it fell in a vector or a tail, or on which CPU path ran. That keeps a sequence's
//! numbers independent of what shares its batch. libm's `expf` is a call per value and was the
//! largest part of both passes.

/// Largest argument whose exponential is finite in f32 (ln(f32::MAX) rounds just above it).
const EXP_HI: f32 = 88.376_26;
/// Smallest argument handled; below it the result is this argument's exponential (about
/// 1.2e-38, the smallest normal f32) rather than a subnormal or zero.
const EXP_LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two: `C1` has few mantissa bits, so `n * C1` is exact for the n that occur.
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
/// Minimax polynomial for `(exp(r) - 1 - r) / r^2` on `|r| <= ln 2 / 2` (Cephes `expf`).
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x`, within 2 ulp of the exact value for `EXP_LO <= x <= EXP_HI`; arguments outside are
/// clamped to that range (NaN stays NaN).
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    // NaN stays NaN through every step below (`n as i32` is 0 for it).
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-C1, x);
    let r = n.mul_add(-C2, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let r2 = r * r;
    let y = p.mul_add(r2, r) + 1.0;
    scale_pow2(y, n as i32)
}

/// `y * 2^n` for n in -126..=128 (the range [`exp`]'s clamp leaves), as `y * 2^(n/2) *
/// 2^(n - n/2)`: each factor is a normal f32 built from its exponent bits, where a single 2^128
/// would not fit the exponent field. [`exp8`] does the same two multiplies.
#[inline]
fn scale_pow2(y: f32, n: i32) -> f32 {
    let half = n >> 1;
    let a = f32::from_bits(((half + 127) as u32) << 23);
    let b = f32::from_bits(((n - half + 127) as u32) << 23);
    y * a * b
}

/// [`exp`] of 8 lanes, bit for bit.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
    // max/min return their second operand when the first is NaN; NaN lanes are restored below.
    let xc = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
        _mm256_set1_ps(EXP_HI),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C1), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(C2), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let ni = _mm256_cvtps_epi32(n);
    let half = _mm256_srai_epi32::<1>(ni);
    let bias = _mm256_set1_epi32(127);
    let a = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
    let b = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_sub_epi32(ni, half),
        bias,
    )));
    let e = _mm256_mul_ps(_mm256_mul_ps(y, a), b);
    _mm256_blendv_ps(e, x, nan)
}

/// True when [`exp8`] may run.
pub(crate) fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst[i] = exp(src[i])` through [`exp8`] where the CPU allows (the tail in a padded vector),
/// else through [`exp`].
#[cfg(test)]
fn map_exp(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        use std::arch::x86_64::*;
        for (s, d) in src.chunks(8).zip(dst.chunks_mut(8)) {
            let mut buf = [0f32; 8];
            buf[..s.len()].copy_from_slice(s);
            // SAFETY: AVX2 and FMA are available; `buf` holds 8 f32.
            unsafe {
                let v = exp8(_mm256_loadu_ps(buf.as_ptr()));
                _mm256_storeu_ps(buf.as_mut_ptr(), v);
            }
            d.copy_from_slice(&buf[..s.len()]);
        }
        return;
    }
    for (s, d) in src.iter().zip(dst) {
        *d = exp(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_the_exact_value_over_the_range() {
        let mut worst = 0;
        let mut x = EXP_LO;
        while x <= EXP_HI {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            worst = worst.max(ulps(got, want));
            x += 0.0137;
        }
        for x in [0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8, 0.5, -0.5, 10.0, -10.0] {
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn out_of_range_arguments_clamp_and_nan_stays_nan() {
        assert!(exp(EXP_HI).is_finite());
        assert_eq!(exp(1000.0), exp(EXP_HI));
        assert_eq!(exp(f32::INFINITY), exp(EXP_HI));
        assert_eq!(exp(-1000.0), exp(EXP_LO));
        assert_eq!(exp(f32::NEG_INFINITY), exp(EXP_LO));
        assert!(exp(EXP_LO) > 0.0 && exp(EXP_LO) < 1.2e-38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn vector_and_scalar_forms_agree_bit_for_bit() {
        let mut src: Vec<f32> = (0..20_000)
            .map(|i| (i as f32 - 10_000.0) * 0.0093)
            .collect();
        src.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            100.0,
            -100.0,
            0.0,
            -0.0,
        ]);
        let mut got = vec![0f32; src.len()];
        map_exp(&src, &mut got);
        for (x, g) in src.iter().zip(&got) {
            let want = exp(*x);
            assert!(
                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                "exp({x}): vector {g}, scalar {want}"
            );
        }
    }
}
