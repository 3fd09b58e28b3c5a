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

use crate::kernels::for_each_range;

/// Below this many values one thread does the whole pass: waking a helper costs more.
const SERIAL_VALUES: usize = 4096;

/// Values per chunk handed to a thread.
const CHUNK: usize = 1024;

/// `silu(gate) * up` for two `(rows, width)` tensors; the fused pass on the CPU, candle's ops
/// elsewhere (the CUDA build) or for layouts the pass does not read.
pub(crate) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if rows_of(gate).is_some() && rows_of(up).is_some() && gate.dims() == up.dims() {
        gate.apply_op2_no_bwd(up, &SwiGlu)
    } else {
        candle_nn::ops::silu(gate)? * up
    }
}

/// `(rows, width, row stride)` of a 2-D f32 CPU tensor whose rows are each contiguous (the
/// views `narrow` cuts out of the stacked gate|up output); None otherwise.
fn rows_of(t: &Tensor) -> Option<(usize, usize, usize)> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (rows, width) = t.dims2().ok()?;
    layout_rows(t.layout(), rows, width)
}

fn layout_rows(l: &Layout, rows: usize, width: usize) -> Option<(usize, usize, usize)> {
    match l.stride() {
        [row_stride, 1] => Some((rows, width, *row_stride)),
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
        let (Some((_, _, gate_stride)), Some((_, _, up_stride))) = (
            layout_rows(gate_l, rows, width),
            layout_rows(up_l, rows, width),
        ) else {
            candle_core::bail!("swiglu: rows of {gate_l:?} and {up_l:?} are not contiguous")
        };
        if up_l.shape().dims2()? != (rows, width) {
            candle_core::bail!("swiglu: gate {gate_l:?} and up {up_l:?} differ in shape")
        }
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
        let dst = OutPtr(out.as_mut_ptr());
        let run = |range: std::ops::Range<usize>| {
            for c in range {
                let (first, last) = (c * CHUNK, ((c + 1) * CHUNK).min(total));
                let mut i = first;
                while i < last {
                    let (r, col) = (i / width, i % width);
                    let n = (width - col).min(last - i);
                    let gs = &g[gate_l.start_offset() + r * gate_stride + col..][..n];
                    let us = &u[up_l.start_offset() + r * up_stride + col..][..n];
                    // SAFETY: chunks partition 0..total, so elements i..i + n are written by
                    // this call alone, and `out` holds `total` values while `for_each_range`
                    // runs.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.at(i), n) };
                    for ((o, &g), &u) in o.iter_mut().zip(gs).zip(us) {
                        // candle's `silu`, then its `mul`: the same roundings in the same order.
                        let silu = g / (1.0 + (-g).exp());
                        *o = silu * u;
                    }
                    i += n;
                }
            }
        };
        let chunks = total.div_ceil(CHUNK);
        let threads = rayon::current_num_threads();
        if threads <= 1 || total < SERIAL_VALUES {
            run(0..chunks);
        } else {
            for_each_range(chunks, threads * 2, threads - 1, &run);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, width))))
    }
}

/// Base of the output, shared by the threads of one pass; each writes disjoint chunks.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: dereferenced only inside `SwiGlu::cpu_fwd`, whose threads write disjoint chunks while
// it owns the output vector.
unsafe impl Send for OutPtr {}

impl OutPtr {
    /// Element `i` (a method, so closures capture the whole `Sync` wrapper, not its field).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

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
