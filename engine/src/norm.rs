//! RMSNorm of the step's rows: the attention and MLP input norms of every layer and the final
//! norm, `x / sqrt(mean(x^2) + eps) * w` per row.
//!
//! x (rows, n) --this--> the q|k|v or gate|up kernel call
//!
//! candle's CPU op sums a row's squares in one sequential chain of dependent adds, row after
//! row. Here up to 8 rows' chains advance side by side, so a decode batch's rows overlap where
//! candle waited on each add. Each row still sums in candle's order with candle's roundings
//! (`v * v` added from -0.0 up, as `Iterator::sum` does; then `x / m * w`), so results are
//! bit-identical to candle's and a row's never depends on the other rows in the step.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Tensor};

use crate::kernels::{OutPtr, split_over_pool};

/// Rows whose sums advance together.
const ROWS: usize = 8;

/// Below this many values one thread does every row.
const SERIAL_VALUES: usize = 1 << 15;

/// RMSNorm over the last dimension of `x` with weight `w` (that dimension's length).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let ours = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if ours(&x) && ours(w) && w.rank() == 1 {
        x.apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps })
    } else {
        candle_nn::ops::rms_norm(&x, w, eps)
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "baton-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (x, w) else {
            candle_core::bail!(
                "rms norm: f32 inputs expected, got {:?} and {:?}",
                x.dtype(),
                w.dtype()
            )
        };
        let (Some((x0, x1)), Some((w0, w1))) = (x_l.contiguous_offsets(), w_l.contiguous_offsets())
        else {
            candle_core::bail!("rms norm: {x_l:?} or {w_l:?} is not contiguous")
        };
        let (x, w) = (&x[x0..x1], &w[w0..w1]);
        let n = *x_l.dims().last().unwrap_or(&0);
        if n == 0 || w.len() != n {
            candle_core::bail!("rms norm: weight of {} for rows of {n}", w.len())
        }
        let rows = x.len() / n;
        let mut out = vec![0f32; x.len()];
        let dst = OutPtr::new(&mut out);
        let groups = rows.div_ceil(ROWS);
        split_over_pool(groups, 2, x.len() >= SERIAL_VALUES, &|range| {
            for g in range {
                let r0 = g * ROWS;
                let count = ROWS.min(rows - r0);
                // SAFETY: rows r0 .. r0 + count of the output are written by this call alone,
                // and `out` outlives the split call.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.at(r0 * n), count * n) };
                norm_rows(&x[r0 * n..][..count * n], w, self.eps, o);
            }
        });
        Ok((CpuStorage::F32(out), x_l.shape().clone()))
    }
}

/// Up to [`ROWS`] rows of `w.len()` values: `o = x / sqrt(sum(x^2) / n + eps) * w` per row.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let n = w.len();
    let count = x.len() / n;
    let sums = if count == ROWS {
        sums_side_by_side::<ROWS>(x, n)
    } else {
        let mut sums = [-0.0f32; ROWS];
        for (r, sum) in sums.iter_mut().enumerate().take(count) {
            *sum = sums_side_by_side::<1>(&x[r * n..][..n], n)[0];
        }
        sums
    };
    for (r, sum) in sums.iter().enumerate().take(count) {
        let m = (sum / n as f32 + eps).sqrt();
        for ((o, x), w) in o[r * n..][..n].iter_mut().zip(&x[r * n..][..n]).zip(w) {
            *o = *x / m * *w;
        }
    }
}

/// Sums of squares of `R` rows of `n` values, each in its row's order from -0.0 (the start
/// `Iterator::sum` uses, so an all-zero row sums as candle's does); the `R` chains advance
/// together, one value of each row per turn.
fn sums_side_by_side<const R: usize>(x: &[f32], n: usize) -> [f32; ROWS] {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * n..][..n]);
    let mut sums = [-0.0f32; R];
    for i in 0..n {
        for (sum, row) in sums.iter_mut().zip(&rows) {
            let v = row[i];
            *sum += v * v;
        }
    }
    let mut out = [-0.0f32; ROWS];
    out[..R].copy_from_slice(&sums);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::bits;
    use candle_core::{Device, Result};

    fn data(rows: usize, n: usize) -> Result<(Tensor, Tensor)> {
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919 % 2003) as f32 / 100.0) - 10.0)
            .collect();
        let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 13) as f32 * 0.1).collect();
        Ok((
            Tensor::from_vec(x, (rows, n), &Device::Cpu)?,
            Tensor::from_vec(w, n, &Device::Cpu)?,
        ))
    }

    #[test]
    fn bit_identical_to_candle() -> Result<()> {
        // One row, a decode batch, a partial group, a prefill chunk (groups split over the
        // threads), a 3-D input (the per-head q/k norms).
        for (rows, n) in [(1, 576), (8, 576), (11, 61), (300, 576)] {
            let (x, w) = data(rows, n)?;
            assert_eq!(
                bits(&rms_norm(&x, &w, 1e-5)?)?,
                bits(&candle_nn::ops::rms_norm(&x, &w, 1e-5)?)?,
                "{rows}x{n}"
            );
        }
        let (x, w) = data(12, 16)?;
        let x = x.reshape((3, 4, 16))?;
        let got = rms_norm(&x, &w, 1e-6)?;
        assert_eq!(got.dims(), &[3, 4, 16]);
        assert_eq!(bits(&got)?, bits(&candle_nn::ops::rms_norm(&x, &w, 1e-6)?)?);
        Ok(())
    }

    #[test]
    fn a_weight_of_the_wrong_length_is_an_error() -> Result<()> {
        let (x, _) = data(2, 8)?;
        let w = Tensor::ones(7, DType::F32, &Device::Cpu)?;
        assert!(rms_norm(&x, &w, 1e-5).is_err());
        Ok(())
    }
}
