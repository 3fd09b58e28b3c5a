//! Quantized matrix multiplication for CPU decode. Every linear layer of the engine's forward
//! pass (attention q/k/v/o, MLP gate/up/down, the tied output head) runs through a
//! [`QuantLinear`] when its GGUF type is Q4_0, Q4_1 or Q8_0, and through candle's `QMatMul`
//! otherwise.
//!
//! x (m, k) f32 --Q8 per 32-value block, once per call--> [8-row weight tiles x activation rows,
//! row groups split over the calling thread and rayon's workers] --> y (m, n) f32
//!
//! Weights are repacked at load into tiles holding one 32-value block of 8 output rows; each tile
//! is read once per call and multiplied with up to 4 activation rows (8 with VNNI) while in
//! registers, so a decode step for a batch of m sequences costs far less than m single-sequence
//! steps. Matrices that share their input (q, k, v; gate, up) can be stacked into one layer
//! ([`QuantLinear::from_qtensors`]) to quantize the input and wake the threads once.
//!
//! Invariants: the AVX2, VNNI and scalar kernels compute the same integer block sums from the
//! same quantized activations; results differ only by f32 rounding (FMA vs separate
//! multiply-add), and not at all between AVX2 and VNNI. Against an f32 matmul with the
//! dequantized weights, the only approximation is the activation quantization:
//! `|y - y_f32| <= sum over blocks of (amax_x / 254) * sum |w|`.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod pack;
mod parallel;
mod quant;
mod scalar;

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

pub(crate) use parallel::{OutPtr, split_over_pool};

use pack::{Packed, ROWS};
use quant::{Bytes, QuantizedRows, Row};

/// Most activation rows multiplied with a weight tile while it sits in registers, over all
/// kernels (see [`Kernel::rows_per_pass`]); larger batches take several passes over each
/// (L1-resident) row group.
const MAX_ROWS_PER_PASS: usize = 8;

/// Below this much work (tiles x activation rows, about 5 ns each on one Zen 3 core), a call runs
/// on the calling thread: posting helper jobs costs more than it saves.
const SERIAL_WORK: usize = 1024;

/// Row-group ranges per thread: small enough that a late or preempted helper leaves little
/// imbalance, large enough to keep cursor traffic negligible.
const CHUNKS_PER_THREAD: usize = 4;

/// Which implementation of the inner loops a [`QuantLinear`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust; also the reference the SIMD kernels are tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C intrinsics.
    Avx2,
    /// The AVX2 kernel with AVX-512 VNNI dot products (256-bit, so AVX-512VL too); its results
    /// are bit-identical to [`Kernel::Avx2`]'s.
    Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        [Kernel::Vnni, Kernel::Avx2]
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Scalar)
    }

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => avx2::vnni_available(),
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Vnni => false,
        }
    }

    /// Activation rows one pass multiplies with a tile in registers: AVX2 has 16 vector
    /// registers, which hold 4 rows' accumulators and partial sums beside the weights; the VNNI
    /// kernel has AVX-512VL's 32, enough for 8 (a whole batch-8 decode step in one pass).
    fn rows_per_pass(self) -> usize {
        match self {
            Kernel::Vnni => 8,
            Kernel::Avx2 | Kernel::Scalar => 4,
        }
    }
}

/// A linear layer `y = x W^T` with quantized weights W of shape (n, k), repacked for fast
/// matrix-vector products on the CPU.
pub struct QuantLinear {
    n: usize,
    k: usize,
    dtype: GgmlDType,
    packed: Packed,
    kernel: Kernel,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantLinear")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("dtype", &self.dtype)
            .field("kernel", &self.kernel)
            .finish()
    }
}

impl QuantLinear {
    /// Repacks a CPU `QTensor` of shape (n, k) (GGUF row-major: n output rows of k values).
    ///
    /// None when the tensor is not Q4_0, Q4_1 or Q8_0, not on the CPU, not 2-D, or `k` is not a
    /// multiple of 32; the caller then keeps candle's `QMatMul`.
    pub fn from_qtensor(weights: &QTensor) -> Option<QuantLinear> {
        if !weights.device().is_cpu() {
            return None;
        }
        let (n, k) = weights.shape().dims2().ok()?;
        let dtype = weights.dtype();
        let data = weights.data().ok()?;
        let packed = pack::pack(dtype, &data, n, k)?;
        Some(QuantLinear {
            n,
            k,
            dtype,
            packed,
            kernel: Kernel::detect(),
        })
    }

    /// One layer computing several matrices that share their input, stacked along the output:
    /// for q, k, v (or gate, up) the output is `[q | k | v]` along the last dimension, and a
    /// decode step quantizes the input and wakes the threads once instead of once per matrix.
    ///
    /// None when a part would be declined by [`QuantLinear::from_qtensor`], when the parts differ
    /// in type or input width k, when a part other than the last has a row count that is not a
    /// multiple of 8 (its padding would shift the rows after it), or when `parts` is empty.
    pub fn from_qtensors(parts: &[&QTensor]) -> Option<QuantLinear> {
        let (first, rest) = parts.split_first()?;
        let mut stacked = QuantLinear::from_qtensor(first)?;
        for part in rest {
            let next = QuantLinear::from_qtensor(part)?;
            if !stacked.n.is_multiple_of(ROWS) || next.k != stacked.k || next.dtype != stacked.dtype
            {
                return None;
            }
            if !stacked.packed.append(next.packed) {
                return None;
            }
            stacked.n += next.n;
        }
        Some(stacked)
    }

    /// The same layer running `kernel`; None when this CPU cannot run it.
    pub fn with_kernel(self, kernel: Kernel) -> Option<QuantLinear> {
        kernel
            .is_available()
            .then_some(QuantLinear { kernel, ..self })
    }

    /// Output features n.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features k.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// GGUF type of the weights.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// The kernel this layer runs.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// `x` f32 on the CPU of shape (..., k) to (..., n).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `out = x W^T` on slices: `x` holds m rows of k values, `out` m rows of n values.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) -> candle_core::Result<()> {
        let (n, k) = (self.n, self.k);
        if !x.len().is_multiple_of(k) || out.len() != x.len() / k * n {
            candle_core::bail!(
                "quant linear ({n}x{k}): input of {} values and output of {} values do not match",
                x.len(),
                out.len()
            );
        }
        let m = x.len() / k;
        if m == 0 {
            return Ok(());
        }
        // The VNNI Q8 kernel takes the activations as unsigned bytes (see `Bytes`).
        let bytes = if self.kernel == Kernel::Vnni && matches!(self.packed, Packed::Q8(_)) {
            Bytes::Unsigned
        } else {
            Bytes::Signed
        };
        let acts = match self.kernel {
            // SAFETY: the Avx2 and Vnni kernels are only selected when AVX2 is available
            // (detect, with_kernel).
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => unsafe { QuantizedRows::quantize_avx2(x, k, bytes) },
            _ => QuantizedRows::quantize_scalar(x, k, bytes),
        };
        let groups = n.div_ceil(ROWS);
        let blocks = k / pack::BLOCK;
        let dst = OutPtr::new(out);
        // Borrowed once per call rather than once per group and pass: at batch 8 a step makes
        // about 25 000 group passes, and rebuilding 8 rows' slices for each was a visible share
        // of the small matrices' time.
        let rows: Vec<Row<'_>> = (0..m).map(|i| acts.row(i)).collect();
        let run = |range: Range<usize>| {
            for g in range {
                // SAFETY: each group index is handled by exactly one call of `run` (the ranges
                // partition 0..groups), and `group` writes only columns 8g..8g+8 of each of the
                // m rows of `out`, which holds m * n values (checked above).
                unsafe { self.group(g, blocks, &acts, &rows, dst) };
            }
        };
        split_over_pool(
            groups,
            CHUNKS_PER_THREAD,
            groups * blocks * m >= SERIAL_WORK,
            &run,
        );
        Ok(())
    }

    /// Computes output columns `8g..8g+8` (clipped to n) of all m rows (`acts`, borrowed as
    /// `rows`) into `dst`.
    ///
    /// # Safety
    /// `dst` must point to m * n writable f32 and no other thread may access those columns.
    unsafe fn group(
        &self,
        g: usize,
        blocks: usize,
        acts: &QuantizedRows,
        rows: &[Row<'_>],
        dst: OutPtr,
    ) {
        let m = rows.len();
        let tiles = g * blocks..(g + 1) * blocks;
        let cols = ROWS.min(self.n - g * ROWS);
        let mut i = 0;
        while i < m {
            let pass = self.kernel.rows_per_pass().min(m - i);
            let mut out = [[0f32; ROWS]; MAX_ROWS_PER_PASS];
            match self.kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the Avx2 kernel is only selected when the CPU supports it.
                Kernel::Avx2 => unsafe {
                    match pass {
                        1 => self.group_simd::<false, 1>(tiles.clone(), acts, rows, i, &mut out),
                        2 => self.group_simd::<false, 2>(tiles.clone(), acts, rows, i, &mut out),
                        3 => self.group_simd::<false, 3>(tiles.clone(), acts, rows, i, &mut out),
                        _ => self.group_simd::<false, 4>(tiles.clone(), acts, rows, i, &mut out),
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the Vnni kernel is only selected when the CPU supports it.
                Kernel::Vnni => unsafe {
                    match pass {
                        1 => self.group_simd::<true, 1>(tiles.clone(), acts, rows, i, &mut out),
                        2 => self.group_simd::<true, 2>(tiles.clone(), acts, rows, i, &mut out),
                        3 => self.group_simd::<true, 3>(tiles.clone(), acts, rows, i, &mut out),
                        4 => self.group_simd::<true, 4>(tiles.clone(), acts, rows, i, &mut out),
                        5 => self.group_simd::<true, 5>(tiles.clone(), acts, rows, i, &mut out),
                        6 => self.group_simd::<true, 6>(tiles.clone(), acts, rows, i, &mut out),
                        7 => self.group_simd::<true, 7>(tiles.clone(), acts, rows, i, &mut out),
                        _ => self.group_simd::<true, 8>(tiles.clone(), acts, rows, i, &mut out),
                    }
                },
                _ => {
                    for (r, out) in out.iter_mut().take(pass).enumerate() {
                        let x = rows[i + r];
                        let Some(scales) = acts.block_scales(i + r) else {
                            unreachable!("row i + r < m");
                        };
                        match &self.packed {
                            Packed::Q4(t) => scalar::q4_group(&t[tiles.clone()], x, scales, out),
                            Packed::Q8(w) => scalar::q8_group(
                                &w.tiles[tiles.clone()],
                                &w.d[tiles.clone()],
                                x,
                                scales,
                                out,
                            ),
                        }
                    }
                }
            }
            for (r, out) in out.iter().take(pass).enumerate() {
                // SAFETY: row i + r < m and columns 8g..8g+cols < n lie inside the m * n values
                // the caller handed over for this group's exclusive use.
                unsafe {
                    let at = dst.at((i + r) * self.n + g * ROWS);
                    // A constant length for whole groups: a move of 32 bytes, not a memmove
                    // call.
                    if cols == ROWS {
                        std::ptr::copy_nonoverlapping(out.as_ptr(), at, ROWS);
                    } else {
                        std::ptr::copy_nonoverlapping(out.as_ptr(), at, cols);
                    }
                }
            }
            i += pass;
        }
    }

    /// Runs the AVX2 kernel (the VNNI one when `VNNI`) for activation rows `i..i + MR` over
    /// `tiles`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and AVX-512 VNNI and VL when `VNNI`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn group_simd<const VNNI: bool, const MR: usize>(
        &self,
        tiles: Range<usize>,
        acts: &QuantizedRows,
        rows: &[Row<'_>],
        i: usize,
        out: &mut [[f32; ROWS]; MAX_ROWS_PER_PASS],
    ) {
        let Some(x) = rows[i..].first_chunk::<MR>() else {
            unreachable!("a pass takes at most the rows left");
        };
        let Some(scales) = acts.block_scales(i) else {
            unreachable!("row i < m");
        };
        let Some(out) = out.first_chunk_mut::<MR>() else {
            unreachable!("MR <= MAX_ROWS_PER_PASS");
        };
        // SAFETY: the caller guarantees CPU support; the kernels check slice lengths.
        unsafe {
            match (&self.packed, VNNI) {
                (Packed::Q4(t), false) => avx2::q4_group::<MR>(&t[tiles], x, scales, out),
                (Packed::Q4(t), true) => avx2::q4_group_vnni::<MR>(&t[tiles], x, scales, out),
                (Packed::Q8(w), false) => {
                    avx2::q8_group::<MR>(&w.tiles[tiles.clone()], &w.d[tiles], x, scales, out)
                }
                (Packed::Q8(w), true) => {
                    avx2::q8_group_vnni::<MR>(&w.tiles[tiles.clone()], &w.d[tiles], x, scales, out)
                }
            }
        }
    }
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "baton-quant-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("quant linear: input is not contiguous {layout:?}")
        };
        let x = match storage {
            CpuStorage::F32(x) => &x[start..end],
            other => candle_core::bail!("quant linear: input must be f32, got {:?}", other.dtype()),
        };
        let mut dims = layout.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == self.k => *last = self.n,
            _ => candle_core::bail!(
                "quant linear ({}x{}): input shape {:?} does not end in {}",
                self.n,
                self.k,
                layout.dims(),
                self.k
            ),
        }
        let mut out = vec![0f32; x.len() / self.k * self.n];
        self.matmul(x, &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

impl candle_core::Module for QuantLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        QuantLinear::forward(self, xs)
    }
}

#[cfg(test)]
mod tests;
