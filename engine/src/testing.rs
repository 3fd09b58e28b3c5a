//! Helpers shared by the engine's unit tests.

use candle_core::Tensor;

/// A tensor's f32 values as bit patterns, for checks that two paths agree bit for bit.
pub(crate) fn bits(t: &Tensor) -> candle_core::Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|x| x.to_bits())
        .collect())
}
