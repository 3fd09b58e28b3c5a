//! The MLP's gating, `silu(gate) * up`, as one pass over the two halves of the gate|up output.
//!
//! x --norm--> [gate | up] (one stacked kernel call) --this--> h --down--> residual
//!
//! candle computes it as two ops: `silu` over the gate (a strided view of the stacked output, so
//! candle's single-threaded strided path) into a new tensor, then a multiply into a third. Here
//! both happen in one pass split over the threads, reading the views in place. Each value goes
//! through the same f32 operations in the same order as candle's `silu` followed by `mul`
//! (`g / (1 + exp(-g))`, then `* u`; Rust never contracts these into FMAs), so the result is
//! bit-identical and the reference tests do not move.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::kernels::{OutPtr, split_over_pool};

/// Below this many values one thread does the whole pass: waking a helper costs more.
const SERIAL_VALUES: usize = 4096;

/// `silu(gate) * up` for two `(rows, width)` tensors; the fused pass on the CPU, candle's ops
/// elsewhere (the CUDA build) or for layouts the pass does not read.
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
                for ((o, &g), &u) in o.iter_mut().zip(gs).zip(us) {
                    // candle's `silu`, then its `mul`: the same roundings in the same order.
                    let silu = g / (1.0 + (-g).exp());
                    *o = silu * u;
                }
                i += n;
            }
        };
        split_over_pool(total, 2, total >= SERIAL_VALUES, &run);
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
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

    #[test]
    fn bit_identical_to_silu_then_mul_on_stacked_views() -> Result<()> {
        // One row (decode), a batch, widths that do not divide the chunk size.
        for (rows, width) in [(1, 1536), (8, 1536), (3, 5), (17, 700)] {
            let data: Vec<f32> = (0..rows * 2 * width)
                .map(|i| ((i * 7919 % 2003) as f32 / 100.0) - 10.0)
                .collect();
            let stacked = Tensor::from_vec(data, (rows, 2 * width), &Device::Cpu)?;
            let gate = stacked.narrow(1, 0, width)?;
            let up = stacked.narrow(1, width, width)?;
            let got: Vec<Vec<f32>> = swiglu(&gate, &up)?.to_vec2()?;
            assert_eq!(bits(&got), bits(&reference(&gate, &up)?), "{rows}x{width}");
        }
        Ok(())
    }

    #[test]
    fn contiguous_inputs_and_mismatched_shapes() -> Result<()> {
        let gate = Tensor::new(&[[1f32, -2.0, 3.0]], &Device::Cpu)?;
        let up = Tensor::new(&[[0.5f32, 4.0, -1.0]], &Device::Cpu)?;
        let got: Vec<Vec<f32>> = swiglu(&gate, &up)?.to_vec2()?;
        assert_eq!(bits(&got), bits(&reference(&gate, &up)?));
        let short = Tensor::new(&[[0.5f32, 4.0]], &Device::Cpu)?;
        assert!(swiglu(&gate, &short).is_err());
        Ok(())
    }
}
