//! The MLP's gating, `silu(gate) * up`, as one pass over the two halves of the gate|up output.
//!
//! x --norm--> [gate | up] (one stacked kernel call) --this--> h --down--> residual
//!
//! candle computes it as two ops: `silu` over the gate (a strided view of the stacked output, so
//! candle's single-threaded strided path, one libm `expf` call per value) into a new tensor,
//! then a multiply into a third. Here both happen in one pass split over the threads, reading
//! the views in place, 8 values at a time with [`crate::vmath::exp8`]. Every value, wherever it
//! falls in a vector or tail, takes the same operations (`g / (1 + exp(-g)) * u`), so a row's
//! result never depends on the rest of the batch; against candle's ops it differs by the
//! exponential's last-bit rounding.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::kernels::{OutPtr, split_over_pool};

/// Below this many values one thread does the whole pass: waking a helper costs more.
const SERIAL_VALUES: usize = 4096;

/// `silu(gate) * up` for two `(rows, width)` tensors; the fused pass for f32 CPU tensors,
/// candle's ops for any other tensor or a layout the pass does not read. (With
/// `cpu_kernels = candle`, and on a GPU, the model calls candle's ops directly.)
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == DType::F32 && row_stride(t.layout()).is_some()
    };
    if fused(gate) && fused(up) && gate.dims() == up.dims() {
        gate.apply_op2_no_bwd(up, &SwiGlu)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// The row stride of a 2-D layout whose rows are each contiguous (the views `narrow` cuts out of
/// the stacked gate|up output, or a contiguous matrix); None otherwise.
fn row_stride(l: &Layout) -> Option<usize> {
    match l.stride() {
        [row_stride, 1] => Some(*row_stride),
        _ => None,
    }
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "baton-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_l: &Layout,
        up: &CpuStorage,
        up_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, width) = gate_l.shape().dims2()?;
        if up_l.shape().dims2()? != (rows, width) {
            candle_core::bail!("swiglu: gate {gate_l:?} and up {up_l:?} differ in shape")
        }
        let (Some(gate_stride), Some(up_stride)) = (row_stride(gate_l), row_stride(up_l)) else {
            candle_core::bail!("swiglu: rows of {gate_l:?} and {up_l:?} are not contiguous")
        };
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gate, up) else {
            candle_core::bail!(
                "swiglu: f32 inputs expected, got {:?} and {:?}",
                gate.dtype(),
                up.dtype()
            )
        };
        // The last row ends furthest in; with it in bounds, every row is.
        let fits = |s: &[f32], start: usize, stride: usize| {
            rows == 0 || start + (rows - 1) * stride + width <= s.len()
        };
        if !fits(g, gate_l.start_offset(), gate_stride) || !fits(u, up_l.start_offset(), up_stride)
        {
            candle_core::bail!("swiglu: a view reaches outside its storage")
        }
        let total = rows * width;
        let mut out = vec![0f32; total];
        let dst = OutPtr::new(&mut out);
        // Values `range` of the output, row-major, row by row.
        let run = |range: std::ops::Range<usize>| {
            let mut i = range.start;
            while i < range.end {
                let (r, col) = (i / width, i % width);
                let n = (width - col).min(range.end - i);
                let gs = &g[gate_l.start_offset() + r * gate_stride + col..][..n];
                let us = &u[up_l.start_offset() + r * up_stride + col..][..n];
                // SAFETY: the ranges partition 0..total, so values i..i + n are written by this
                // call alone, and `out` holds `total` values while the split call runs.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.at(i), n) };
                silu_mul(gs, us, o);
                i += n;
            }
        };
        split_over_pool(total, 2, total >= SERIAL_VALUES, &run);
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }
}

/// `o = silu(g) * u` over equal-length slices.
fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::vmath::simd_available() {
        // SAFETY: AVX2 and FMA are available.
        unsafe { silu_mul_avx(g, u, o) };
        return;
    }
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + crate::vmath::exp(-g)) * u;
    }
}

/// [`silu_mul`] 8 values at a time; the tail goes through the same vector operations on a padded
/// copy, so its values match the scalar form bit for bit too.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx(g: &[f32], u: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let eight = |g: __m256, u: __m256| {
        // SAFETY: the enclosing function's features are enabled here.
        let e = unsafe { crate::vmath::exp8(_mm256_xor_ps(g, sign)) };
        _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
    };
    let n = o.len().min(g.len()).min(u.len());
    let whole = n - n % 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= whole <= the length of each slice.
        unsafe {
            let v = eight(
                _mm256_loadu_ps(g.as_ptr().add(i)),
                _mm256_loadu_ps(u.as_ptr().add(i)),
            );
            _mm256_storeu_ps(o.as_mut_ptr().add(i), v);
        }
    }
    if whole < n {
        let (mut gb, mut ub, mut ob) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        gb[..n - whole].copy_from_slice(&g[whole..n]);
        ub[..n - whole].copy_from_slice(&u[whole..n]);
        // SAFETY: the buffers hold 8 f32 each.
        unsafe {
            let v = eight(_mm256_loadu_ps(gb.as_ptr()), _mm256_loadu_ps(ub.as_ptr()));
            _mm256_storeu_ps(ob.as_mut_ptr(), v);
        }
        o[whole..n].copy_from_slice(&ob[..n - whole]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Result};

    fn reference(gate: &Tensor, up: &Tensor) -> Result<Vec<Vec<f32>>> {
        (candle_nn::ops::silu(gate)? * up)?.to_vec2()
    }

    fn bits(v: &[Vec<f32>]) -> Vec<u32> {
        v.iter().flatten().map(|x| x.to_bits()).collect()
    }

    /// `rows` rows of the stacked gate|up output, as views.
    fn stacked(rows: usize, width: usize) -> Result<(Tensor, Tensor)> {
        let data: Vec<f32> = (0..rows * 2 * width)
            .map(|i| ((i * 7919 % 2003) as f32 / 100.0) - 10.0)
            .collect();
        let stacked = Tensor::from_vec(data, (rows, 2 * width), &Device::Cpu)?;
        Ok((
            stacked.narrow(1, 0, width)?,
            stacked.narrow(1, width, width)?,
        ))
    }

    fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!(
                (g - w).abs() <= 4.0 * f32::EPSILON * w.abs(),
                "{what}: {g} against candle's {w}"
            );
        }
    }

    #[test]
    fn matches_silu_then_mul_on_stacked_views() -> Result<()> {
        // One row (decode), a batch, widths that do not divide the vector or the chunk size.
        for (rows, width) in [(1, 1536), (8, 1536), (3, 5), (17, 700)] {
            let (gate, up) = stacked(rows, width)?;
            let got: Vec<Vec<f32>> = swiglu(&gate, &up)?.to_vec2()?;
            assert_close(&got, &reference(&gate, &up)?, &format!("{rows}x{width}"));
        }
        Ok(())
    }

    #[test]
    fn a_row_alone_and_in_a_batch_is_bit_identical() -> Result<()> {
        // 17 rows of 700: row starts fall at every offset within a vector and the thread split.
        let (gate, up) = stacked(17, 700)?;
        let batch: Vec<Vec<f32>> = swiglu(&gate, &up)?.to_vec2()?;
        for (r, row) in batch.iter().enumerate() {
            let alone: Vec<Vec<f32>> =
                swiglu(&gate.narrow(0, r, 1)?, &up.narrow(0, r, 1)?)?.to_vec2()?;
            assert_eq!(bits(&alone), bits(std::slice::from_ref(row)), "row {r}");
        }
        Ok(())
    }

    #[test]
    fn vector_pass_matches_the_scalar_form_bit_for_bit() {
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let u: Vec<f32> = (0..1003).map(|i| 1.0 - i as f32 * 0.002).collect();
        let mut got = vec![0f32; g.len()];
        silu_mul(&g, &u, &mut got);
        for ((g, u), o) in g.iter().zip(&u).zip(&got) {
            let want = g / (1.0 + crate::vmath::exp(-g)) * u;
            assert_eq!(o.to_bits(), want.to_bits(), "silu({g}) * {u}");
        }
    }

    #[test]
    fn contiguous_inputs_and_mismatched_shapes() -> Result<()> {
        let gate = Tensor::new(&[[1f32, -2.0, 3.0]], &Device::Cpu)?;
        let up = Tensor::new(&[[0.5f32, 4.0, -1.0]], &Device::Cpu)?;
        let got: Vec<Vec<f32>> = swiglu(&gate, &up)?.to_vec2()?;
        assert_close(&got, &reference(&gate, &up)?, "1x3");
        let short = Tensor::new(&[[0.5f32, 4.0]], &Device::Cpu)?;
        assert!(swiglu(&gate, &short).is_err());
        Ok(())
    }
}
