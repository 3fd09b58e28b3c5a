//! `QuantLinear` on SmolLM2-135M's real weights: every matrix of the model is handled, the
//! fastest kernel this CPU has (AVX2 or VNNI) agrees with the scalar kernel, and both agree with
//! candle's dequantize-then-matmul within the bound that Q8 activation quantization allows.
//!
//! Tolerance for output (i, j), dequantized weights w, `S = sum_c |w_jc| |x_ic|`:
//! against candle, `sum_b (amax_b(x_i) / 254) * sum_{c in b} |w_jc| + 2 k eps S` (each activation
//! is off by at most half its block's step, plus f32 rounding); SIMD against scalar,
//! `4 (k / 32 + 1) eps S` (FMA versus separate multiply and add, per block).

use std::fs::File;
use std::path::PathBuf;

use baton_engine::kernels::{Kernel, QuantLinear};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BATCH_SIZES: [usize; 5] = [1, 2, 3, 8, 17];

fn model_path() -> PathBuf {
    let path = match std::env::var_os("BATON_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    assert!(
        path.exists(),
        "model {} not found: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

/// Loads the named tensors from the development model.
fn load(names: &[&str]) -> Vec<(String, QTensor)> {
    let path = model_path();
    let mut file = File::open(&path).expect("open model: run scripts/fetch-model.sh");
    let content = gguf_file::Content::read(&mut file).expect("gguf header");
    names
        .iter()
        .map(|name| {
            let t = content
                .tensor(&mut file, name, &Device::Cpu)
                .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
            (name.to_string(), t)
        })
        .collect()
}

/// Hidden-state-like activations: mostly unit scale, a few large outliers.
fn activations(m: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..m * k)
        .map(|i| {
            let v = rng.random_range(-1.0f32..1.0);
            if i % 53 == 0 { v * 30.0 } else { v }
        })
        .collect()
}

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

#[test]
fn every_model_matrix_is_handled() {
    let path = model_path();
    let mut file = File::open(&path).expect("open model");
    let content = gguf_file::Content::read(&mut file).expect("gguf header");
    let mut handled = 0;
    for (name, info) in &content.tensor_infos {
        if info.shape.rank() != 2 {
            continue;
        }
        let t = content
            .tensor(&mut file, name, &Device::Cpu)
            .expect("tensor");
        assert!(
            QuantLinear::from_qtensor(&t).is_some(),
            "{name} ({:?}) is not handled",
            t.dtype()
        );
        handled += 1;
    }
    // 30 layers x 7 matrices, and token_embd (the tied output head).
    assert_eq!(handled, 211);
}

#[test]
fn real_weights_match_candle_and_scalar_kernel() {
    // One tensor per distinct shape, from the first and last layers, and the Q8_0 head.
    let tensors = load(&[
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.29.attn_v.weight",
        "blk.29.attn_output.weight",
        "blk.0.ffn_gate.weight",
        "blk.29.ffn_up.weight",
        "blk.0.ffn_down.weight",
        "token_embd.weight",
    ]);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for (name, w) in &tensors {
        let (n, k) = w.shape().dims2().expect("2-d");
        let expected = if name.starts_with("token_embd") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q4_1
        };
        assert_eq!(w.dtype(), expected, "{name}");
        let fast = QuantLinear::from_qtensor(w).expect("handled");
        let scalar = QuantLinear::from_qtensor(w)
            .and_then(|l| l.with_kernel(Kernel::Scalar))
            .expect("scalar always available");
        for m in BATCH_SIZES {
            let x = activations(m, k, &mut rng);
            let r = reference(w, &x, m).expect("reference");
            let got = run(&fast, &x);
            let what = format!("{name} ({k}->{n}) m={m} {:?}", fast.kernel());
            let eps = 2.0 * k as f32 * f32::EPSILON;
            assert_close(&what, &got, &r.y, |i| {
                r.act_bound[i] * 1.001 + eps * r.magnitude[i]
            });
            let eps = 4.0 * (k / 32 + 1) as f32 * f32::EPSILON;
            assert_close(&what, &got, &run(&scalar, &x), |i| {
                eps * r.magnitude[i] * 1.01
            });
        }
    }
}

#[test]
fn forward_on_hidden_state_tensor_matches_matmul() {
    let tensors = load(&["blk.3.ffn_down.weight"]);
    let lin = QuantLinear::from_qtensor(&tensors[0].1).expect("handled");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // hidden: (batch, seq, k)
    let x = activations(2 * 5, 1536, &mut rng);
    let xt = Tensor::from_slice(&x, (2, 5, 1536), &Device::Cpu).expect("tensor");
    let y = lin.forward(&xt).expect("forward");
    assert_eq!(y.dims(), &[2, 5, 576]);
    let y: Vec<f32> = y.flatten_all().and_then(|y| y.to_vec1()).expect("vec");
    assert_eq!(y, run(&lin, &x));
}
