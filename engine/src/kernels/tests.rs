//! Kernels on random weights against the scalar kernels and candle's dequantize-then-matmul.
//!
//! Tolerances, for output (i, j) with dequantized weights w and `S = sum_c |w_jc| |x_ic|`:
//! - against candle on x: `sum_b (amax_b(x_i) / 254) * sum_{c in b} |w_jc|` (activation
//!   quantization error, at most half a step per value) plus `2 k eps S` for f32 rounding;
//! - against candle on the dequantized Q8 activations x̂: `2 k eps S` (rounding only);
//! - AVX2 and VNNI against scalar: `4 (k / 32 + 1) eps S` (FMA vs multiply-add per block);
//! - VNNI against AVX2: bit for bit.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::quant::{Bytes, QuantizedRows};
use super::{Kernel, QuantLinear};

/// (k, n) of SmolLM2-135M's linear layers: q/o, k/v, gate/up, down.
const LAYER_SHAPES: [(usize, usize); 4] = [(576, 576), (576, 192), (576, 1536), (1536, 576)];
/// (k, n) of the Q8_0 output head.
const HEAD_SHAPE: (usize, usize) = (576, 49152);
const BATCH_SIZES: [usize; 5] = [1, 2, 3, 8, 17];

/// GGUF blocks with random contents: every nibble / byte value occurs, scales of model size.
fn random_qtensor(dtype: GgmlDType, n: usize, k: usize, rng: &mut ChaCha8Rng) -> QTensor {
    let mut bytes = Vec::new();
    for _ in 0..n * k / 32 {
        let d = f16::from_f32(rng.random_range(1e-3f32..2e-2));
        bytes.extend_from_slice(&d.to_le_bytes());
        let (extra, quants) = match dtype {
            GgmlDType::Q4_0 => (0, 16),
            GgmlDType::Q4_1 => (1, 16),
            GgmlDType::Q8_0 => (0, 32),
            _ => unreachable!("test covers Q4_0, Q4_1, Q8_0"),
        };
        for _ in 0..extra {
            let m = f16::from_f32(rng.random_range(-0.15f32..0.0));
            bytes.extend_from_slice(&m.to_le_bytes());
        }
        bytes.extend((0..quants).map(|_| rng.random::<u8>()));
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype).expect("storage");
    QTensor::new(storage, (n, k)).expect("qtensor")
}

fn random_activations(m: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let v = rng.random_range(-1.0f32..1.0);
            // A few outliers per row, like real hidden states.
            if i % 61 == 0 { v * 20.0 } else { v }
        })
        .collect()
}

/// Per output: candle's f32 result, the activation-quantization bound, and `S`.
struct Reference {
    y: Vec<f32>,
    act_bound: Vec<f32>,
    magnitude: Vec<f32>,
}

fn reference(w: &QTensor, x: &[f32], m: usize) -> candle_core::Result<Reference> {
    let (n, k) = w.shape().dims2()?;
    let blocks = k / 32;
    let wd = w.dequantize(&Device::Cpu)?;
    let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
    let y = xt.matmul(&wd.t()?)?;
    let magnitude = xt.abs()?.matmul(&wd.abs()?.t()?)?;
    let w_block_abs = wd.abs()?.reshape((n, blocks, 32))?.sum(2)?;
    let half_step = (xt.abs()?.reshape((m, blocks, 32))?.max(2)? / 254.0)?;
    let act_bound = half_step.matmul(&w_block_abs.t()?)?;
    Ok(Reference {
        y: y.flatten_all()?.to_vec1()?,
        act_bound: act_bound.flatten_all()?.to_vec1()?,
        magnitude: magnitude.flatten_all()?.to_vec1()?,
    })
}

fn run(lin: &QuantLinear, x: &[f32]) -> Vec<f32> {
    let mut out = vec![f32::NAN; x.len() / lin.in_features() * lin.out_features()];
    lin.matmul(x, &mut out).expect("matmul");
    out
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: impl Fn(usize) -> f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let t = tol(i);
        assert!(
            (g - w).abs() <= t,
            "{what}: output {i}: got {g}, want {w}, tolerance {t}"
        );
    }
}

fn cases() -> Vec<(GgmlDType, usize, usize)> {
    let mut cases = Vec::new();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
        for (k, n) in LAYER_SHAPES {
            cases.push((dtype, k, n));
        }
    }
    cases.push((GgmlDType::Q8_0, HEAD_SHAPE.0, HEAD_SHAPE.1));
    cases
}

#[test]
fn matches_candle_within_activation_quantization_bound() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (dtype, k, n) in cases() {
        let w = random_qtensor(dtype, n, k, &mut rng);
        let lin = QuantLinear::from_qtensor(&w).expect("supported type");
        for m in BATCH_SIZES {
            let x = random_activations(m, k, &mut rng);
            let r = reference(&w, &x, m).expect("reference");
            let eps = 2.0 * k as f32 * f32::EPSILON;
            assert_close(
                &format!("{dtype:?} {k}->{n} m={m}"),
                &run(&lin, &x),
                &r.y,
                |i| r.act_bound[i] * 1.001 + eps * r.magnitude[i],
            );
        }
    }
}

#[test]
fn equals_candle_on_quantized_activations_up_to_rounding() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (dtype, k, n) in cases() {
        let w = random_qtensor(dtype, n, k, &mut rng);
        let lin = QuantLinear::from_qtensor(&w).expect("supported type");
        for m in [1, 3, 17] {
            let x = random_activations(m, k, &mut rng);
            let x_hat = QuantizedRows::quantize_scalar(&x, k, Bytes::Signed).dequantize();
            let r = reference(&w, &x_hat, m).expect("reference");
            let eps = 2.0 * k as f32 * f32::EPSILON;
            assert_close(
                &format!("{dtype:?} {k}->{n} m={m}"),
                &run(&lin, &x),
                &r.y,
                |i| eps * r.magnitude[i],
            );
        }
    }
}

#[test]
fn simd_kernels_match_scalar_kernel() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let simd: Vec<Kernel> = [Kernel::Avx2, Kernel::Vnni]
        .into_iter()
        .filter(|k| k.is_available())
        .collect();
    for (dtype, k, n) in cases() {
        let w = random_qtensor(dtype, n, k, &mut rng);
        let Some(scalar) =
            QuantLinear::from_qtensor(&w).and_then(|l| l.with_kernel(Kernel::Scalar))
        else {
            panic!("{dtype:?} must pack");
        };
        for m in BATCH_SIZES {
            let x = random_activations(m, k, &mut rng);
            let r = reference(&w, &x, m).expect("reference");
            let want = run(&scalar, &x);
            let eps = 4.0 * (k / 32 + 1) as f32 * f32::EPSILON;
            for &kernel in &simd {
                let lin = QuantLinear::from_qtensor(&w)
                    .and_then(|l| l.with_kernel(kernel))
                    .expect("available kernel");
                assert_close(
                    &format!("{kernel:?} {dtype:?} {k}->{n} m={m}"),
                    &run(&lin, &x),
                    &want,
                    |i| eps * r.magnitude[i] * 1.01,
                );
            }
        }
    }
}

/// The VNNI kernel computes the AVX2 kernel's integer sums with other instructions and shares
/// its float epilogue, so switching kernels never changes a token. Batch sizes cover one full
/// 8-row VNNI pass, a pass of 8 and one of 1, and the partial passes in between.
#[test]
fn vnni_kernel_is_bit_identical_to_avx2() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let kernels = [Kernel::Avx2, Kernel::Vnni];
    let available = kernels.iter().all(|k| k.is_available());
    // Without VNNI on this CPU, `with_kernel` must refuse it rather than run something else.
    if !available {
        let w = random_qtensor(GgmlDType::Q4_1, 8, 32, &mut rng);
        for kernel in kernels {
            let lin = QuantLinear::from_qtensor(&w).and_then(|l| l.with_kernel(kernel));
            assert_eq!(lin.is_some(), kernel.is_available(), "{kernel:?}");
        }
        return;
    }
    for (dtype, k, n) in cases() {
        let w = random_qtensor(dtype, n, k, &mut rng);
        let [avx2, vnni] = kernels.map(|kernel| {
            QuantLinear::from_qtensor(&w)
                .and_then(|l| l.with_kernel(kernel))
                .expect("available kernel")
        });
        for m in [1, 4, 5, 7, 8, 9, 16, 17] {
            let x = random_activations(m, k, &mut rng);
            let (a, v) = (run(&avx2, &x), run(&vnni, &x));
            let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&a) == bits(&v),
                "{dtype:?} {k}->{n} m={m}: outputs differ"
            );
        }
    }
}

#[test]
fn row_count_not_multiple_of_tile_is_clipped() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let (k, n) = (64, 13);
        let w = random_qtensor(dtype, n, k, &mut rng);
        for kernel in [Kernel::Scalar, Kernel::Avx2, Kernel::Vnni] {
            let Some(lin) = QuantLinear::from_qtensor(&w).and_then(|l| l.with_kernel(kernel))
            else {
                continue;
            };
            for m in [1, 5] {
                let x = random_activations(m, k, &mut rng);
                let r = reference(&w, &x, m).expect("reference");
                assert_close(
                    &format!("{dtype:?} {kernel:?} m={m}"),
                    &run(&lin, &x),
                    &r.y,
                    |i| r.act_bound[i] * 1.001 + 1e-5 * r.magnitude[i],
                );
            }
        }
    }
}

#[test]
fn forward_maps_leading_dims_and_matches_matmul() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let w = random_qtensor(GgmlDType::Q4_1, 40, 96, &mut rng);
    let lin = QuantLinear::from_qtensor(&w).expect("q4_1");
    let x = random_activations(6, 96, &mut rng);
    let want = run(&lin, &x);
    let xt = Tensor::from_slice(&x, (2, 3, 96), &Device::Cpu).expect("tensor");
    let y = lin.forward(&xt).expect("forward");
    assert_eq!(y.dims(), &[2, 3, 40]);
    assert_eq!(
        y.flatten_all()
            .and_then(|y| y.to_vec1::<f32>())
            .expect("vec"),
        want
    );

    // A strided (transposed) input is made contiguous first.
    let xt = Tensor::from_slice(&x, (96, 6), &Device::Cpu).expect("tensor");
    let y = lin.forward(&xt.t().expect("t")).expect("forward");
    let want = run(
        &lin,
        &xt.t()
            .and_then(|t| t.contiguous())
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec"),
    );
    assert_eq!(
        y.flatten_all()
            .and_then(|y| y.to_vec1::<f32>())
            .expect("vec"),
        want
    );

    let x1 = Tensor::from_slice(&x[..96], 96, &Device::Cpu).expect("tensor");
    assert_eq!(lin.forward(&x1).expect("forward").dims(), &[40]);
}

#[test]
fn forward_rejects_wrong_width_and_dtype() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let w = random_qtensor(GgmlDType::Q4_1, 8, 64, &mut rng);
    let lin = QuantLinear::from_qtensor(&w).expect("q4_1");
    let x = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    assert!(lin.forward(&x).is_err());
    let x = Tensor::zeros((2, 64), candle_core::DType::F16, &Device::Cpu).expect("tensor");
    assert!(lin.forward(&x).is_err());
}

#[test]
fn from_qtensor_declines_unhandled_types() {
    let x = Tensor::zeros((16, 256), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    for dtype in [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::F32,
        GgmlDType::F16,
    ] {
        let q = QTensor::quantize(&x, dtype).expect("quantize");
        assert!(QuantLinear::from_qtensor(&q).is_none(), "{dtype:?}");
    }
    let q = QTensor::quantize(&x, GgmlDType::Q8_0).expect("quantize");
    assert!(QuantLinear::from_qtensor(&q).is_some());
}

#[test]
fn stacked_layer_equals_its_parts_side_by_side() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        // q, k, v of SmolLM2, the last with a ragged row count.
        let parts: Vec<QTensor> = [576, 192, 189]
            .into_iter()
            .map(|n| random_qtensor(dtype, n, 576, &mut rng))
            .collect();
        let refs: Vec<&QTensor> = parts.iter().collect();
        let stacked = QuantLinear::from_qtensors(&refs).expect("stackable");
        assert_eq!(stacked.out_features(), 576 + 192 + 189);
        for m in [1, 3, 8] {
            let x = random_activations(m, 576, &mut rng);
            let got = run(&stacked, &x);
            let singles: Vec<Vec<f32>> = refs
                .iter()
                .map(|p| run(&QuantLinear::from_qtensor(p).expect("part"), &x))
                .collect();
            for i in 0..m {
                let want: Vec<f32> = singles
                    .iter()
                    .flat_map(|s| {
                        let n = s.len() / m;
                        s[i * n..(i + 1) * n].to_vec()
                    })
                    .collect();
                assert_eq!(
                    &got[i * 957..(i + 1) * 957],
                    &want[..],
                    "{dtype:?} m={m} row {i}"
                );
            }
        }
    }
}

#[test]
fn stacking_declines_mismatched_parts() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let a = random_qtensor(GgmlDType::Q4_1, 16, 64, &mut rng);
    let ragged = random_qtensor(GgmlDType::Q4_1, 12, 64, &mut rng);
    let wide = random_qtensor(GgmlDType::Q4_1, 16, 96, &mut rng);
    let q8 = random_qtensor(GgmlDType::Q8_0, 16, 64, &mut rng);
    assert!(QuantLinear::from_qtensors(&[]).is_none());
    assert!(QuantLinear::from_qtensors(&[&a, &wide]).is_none());
    assert!(QuantLinear::from_qtensors(&[&a, &q8]).is_none());
    assert!(QuantLinear::from_qtensors(&[&ragged, &a]).is_none());
    assert!(QuantLinear::from_qtensors(&[&a, &ragged]).is_some());
}
