//! Rotary position embedding fused with the head-major transpose attention reads.
//!
//! q|k|v (one stacked kernel call, rows of `heads * head_dim`) --this--> q, k rotated and v as
//! `(heads, rows, head_dim)` --> K/V cache write, attention
//!
//! candle needs a transpose copy, then its rope op, per tensor; with more than one row its rope
//! splits the rows over rayon, so a decode step of a batch woke the second thread twice a layer
//! for a few microseconds of work. Here one serial pass reads the strided view and writes the
//! rotated, transposed result. Each value takes candle's operations in candle's order (the
//! products `x1 * cos`, `x2 * sin`, then their difference; `x1 * sin`, `x2 * cos`, then their
//! sum; Rust never contracts them into FMAs), so the output is bit-identical to candle's path.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::config::RopeStyle;
use crate::kernels::{OutPtr, split_over_pool};

/// Below this many values one thread does the whole pass.
const SERIAL_VALUES: usize = 1 << 15;

/// The rotation of a step's rows: `cos[r * half + i]`, `sin[r * half + i]` for row `r` and
/// pair `i` (`half = head_dim / 2`).
pub(crate) struct Rotation<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub style: RopeStyle,
}

/// `x` `(rows, heads * head_dim)` (rows contiguous, any row stride) as `(heads, rows,
/// head_dim)`, rotated when `rot` is given. `None` when `x` is not an f32 CPU tensor of that
/// shape (the caller then takes candle's ops).
pub(crate) fn heads_major(
    x: &Tensor,
    heads: usize,
    head_dim: usize,
    rot: Option<&Rotation<'_>>,
) -> candle_core::Result<Option<Tensor>> {
    let fits = x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() == 2
        && x.dim(1)? == heads * head_dim
        && head_dim.is_multiple_of(2)
        && matches!(x.layout().stride(), [_, 1]);
    if !fits {
        return Ok(None);
    }
    x.apply_op1_no_bwd(&HeadsMajor {
        heads,
        head_dim,
        rot,
    })
    .map(Some)
}

struct HeadsMajor<'a> {
    heads: usize,
    head_dim: usize,
    rot: Option<&'a Rotation<'a>>,
}

impl CustomOp1 for HeadsMajor<'_> {
    fn name(&self) -> &'static str {
        "baton-rope-heads-major"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        let (heads, d) = (self.heads, self.head_dim);
        let &[stride, 1] = l.stride() else {
            candle_core::bail!("rope: rows of {l:?} are not contiguous")
        };
        let CpuStorage::F32(src) = s else {
            candle_core::bail!("rope: f32 input expected, got {:?}", s.dtype())
        };
        if width != heads * d
            || (rows > 0 && l.start_offset() + (rows - 1) * stride + width > src.len())
        {
            candle_core::bail!("rope: {l:?} does not hold {heads} heads of {d} in its storage")
        }
        let half = d / 2;
        if let Some(rot) = self.rot
            && (rot.cos.len() < rows * half || rot.sin.len() < rows * half)
        {
            candle_core::bail!(
                "rope: {} rotation rows for {rows} rows",
                rot.cos.len() / half.max(1)
            )
        }
        let mut out = vec![0f32; rows * width];
        let head = |h: usize, dst: &mut [f32]| {
            for (r, dst) in dst.chunks_exact_mut(d).enumerate() {
                let x = &src[l.start_offset() + r * stride + h * d..][..d];
                let Some(rot) = self.rot else {
                    dst.copy_from_slice(x);
                    continue;
                };
                let (cos, sin) = (&rot.cos[r * half..][..half], &rot.sin[r * half..][..half]);
                for i in 0..half {
                    // Halves pairs value i with i + d/2; Interleaved pairs 2i with 2i + 1.
                    let (i1, i2) = match rot.style {
                        RopeStyle::Halves => (i, i + half),
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    };
                    dst[i1] = x[i1] * cos[i] - x[i2] * sin[i];
                    dst[i2] = x[i1] * sin[i] + x[i2] * cos[i];
                }
            }
        };
        let dst = OutPtr::new(&mut out);
        // Heads split over the threads only for prefill-sized inputs; a decode batch's few rows
        // cost less than waking a helper.
        split_over_pool(heads, 1, rows * width >= SERIAL_VALUES, &|hs| {
            for h in hs {
                // SAFETY: head h's output, values h * rows * d .. (h + 1) * rows * d, is
                // written by this call alone, and `out` outlives the split call.
                head(h, unsafe {
                    std::slice::from_raw_parts_mut(dst.at(h * rows * d), rows * d)
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((heads, rows, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use candle_core::{Device, Result};

    #[test]
    fn bit_identical_to_transpose_then_candle_rope_on_a_stacked_view() -> Result<()> {
        // A decode batch (one thread) and a prefill chunk (heads split over the threads).
        for (rows, heads, d) in [(5, 3, 8), (700, 4, 16)] {
            same_as_candle(rows, heads, d, 6)?;
        }
        Ok(())
    }

    fn same_as_candle(rows: usize, heads: usize, d: usize, other: usize) -> Result<()> {
        let data: Vec<f32> = (0..rows * (heads * d + other))
            .map(|i| ((i * 7919 % 2003) as f32 / 100.0) - 10.0)
            .collect();
        let stacked = Tensor::from_vec(data, (rows, heads * d + other), &Device::Cpu)?;
        let x = stacked.narrow(1, 0, heads * d)?;
        let angles: Vec<f32> = (0..rows * d / 2).map(|i| i as f32 * 0.37).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let (ct, st) = (
            Tensor::from_slice(&cos, (rows, d / 2), &Device::Cpu)?,
            Tensor::from_slice(&sin, (rows, d / 2), &Device::Cpu)?,
        );
        let transposed = x.reshape((rows, heads, d))?.transpose(0, 1)?.contiguous()?;
        for style in [RopeStyle::Halves, RopeStyle::Interleaved] {
            let rot = Rotation {
                cos: &cos,
                sin: &sin,
                style,
            };
            let got = heads_major(&x, heads, d, Some(&rot))?.expect("cpu f32");
            let input = transposed.unsqueeze(0)?;
            let want = match style {
                RopeStyle::Halves => candle_nn::rotary_emb::rope(&input, &ct, &st)?,
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&input, &ct, &st)?,
            };
            assert_eq!(bits(&got)?, bits(&want)?, "{style:?}, {rows} rows");
        }
        let plain = heads_major(&x, heads, d, None)?.expect("cpu f32");
        assert_eq!(bits(&plain)?, bits(&transposed)?);
        Ok(())
    }

    #[test]
    fn shapes_it_cannot_read_are_left_to_candle_or_refused() -> Result<()> {
        let x = Tensor::zeros((2, 12), DType::F32, &Device::Cpu)?;
        assert!(
            heads_major(&x, 3, 6, None)?.is_none(),
            "width is not heads * d"
        );
        assert!(heads_major(&x.t()?, 2, 1, None)?.is_none(), "odd head_dim");
        let rot = Rotation {
            cos: &[1.0; 3],
            sin: &[0.0; 3],
            style: RopeStyle::Halves,
        };
        assert!(
            heads_major(&x, 2, 6, Some(&rot)).is_err(),
            "one rotation row for two rows"
        );
        Ok(())
    }
}
