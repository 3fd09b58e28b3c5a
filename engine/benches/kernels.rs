//! baton's quantized matmul kernels against candle's `QMatMul`, on SmolLM2-135M's real weights,
//! measured side by side in the same run.
//!
//!     cargo bench -p baton-engine --bench kernels
//!
//! Model: `$BATON_MODEL`, else `~/.cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf`
//! (`scripts/fetch-model.sh`). Prints, for each of the model's matmul shapes and m in {1, 8}:
//! median time per call (candle and baton, alternated so machine noise hits both) with the spread
//! of the repetitions, and the ratio. Then the decode floor: all 30 layers' 7 matmuls and the head
//! in sequence, as one decode step does, so weights stream from DRAM rather than sit in cache.
//! Last, that floor once per SIMD kernel this CPU has (AVX2, and VNNI where AVX-512 VNNI is
//! present), alternated, at m = 1 and 8. Everything runs on a rayon worker, as the engine's
//! steps do.

use std::fs::File;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use baton_engine::kernels::{Kernel, QuantLinear};
use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{Device, Module, Tensor};
use rand::{Rng, SeedableRng};

const LAYERS: usize = 30;
const LAYER_MATRICES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];
/// Alternating repetitions per implementation; the median is reported.
const REPS: usize = 11;
/// Minimum time of one repetition.
const REP_TIME: Duration = Duration::from_millis(60);

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/baton/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    fn from(mut v: Vec<Duration>) -> Stats {
        v.sort();
        Stats {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// Spread of the repetitions, (max - min) / median, in percent.
    fn spread(&self) -> f64 {
        100.0 * (self.max - self.min).as_secs_f64() / self.median.as_secs_f64()
    }
}

/// Mean time per call of `f`, over enough calls to fill [`REP_TIME`].
fn time_rep(f: &mut dyn FnMut() -> Result<()>, calls: usize) -> Result<Duration> {
    let t = Instant::now();
    for _ in 0..calls {
        f()?;
    }
    Ok(t.elapsed() / calls as u32)
}

/// Calls of `f` that fill [`REP_TIME`], after running it that long once as warmup.
fn calibrate(f: &mut dyn FnMut() -> Result<()>) -> Result<usize> {
    let once = time_rep(f, 3)?;
    let calls = (REP_TIME.as_secs_f64() / once.as_secs_f64().max(1e-9)).ceil() as usize;
    time_rep(f, calls)?;
    Ok(calls)
}

/// Times each closure in alternating repetitions after a warmup; returns their stats.
fn compare(fs: &mut [&mut dyn FnMut() -> Result<()>]) -> Result<Vec<Stats>> {
    let mut calls = Vec::new();
    for f in fs.iter_mut() {
        calls.push(calibrate(*f)?);
    }
    let mut times = vec![Vec::new(); fs.len()];
    for _ in 0..REPS {
        for ((f, calls), times) in fs.iter_mut().zip(&calls).zip(&mut times) {
            times.push(time_rep(*f, *calls)?);
        }
    }
    Ok(times.into_iter().map(Stats::from).collect())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn random_input(m: usize, k: usize, seed: u64) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_vec(x, (m, k), &Device::Cpu)?)
}

/// One linear layer in both implementations.
struct Pair {
    candle: QMatMul,
    baton: QuantLinear,
    k: usize,
}

fn main() -> Result<()> {
    // On a pool worker, as the engine runs a step (`Engine::step`): called from outside the
    // pool, every split call would hand its chunks to workers and wait, with the caller
    // competing with both workers for the cores.
    rayon::scope(|_| run())
}

fn run() -> Result<()> {
    let path = model_path();
    let mut file = File::open(&path).with_context(|| {
        format!(
            "model {} missing: run scripts/fetch-model.sh",
            path.display()
        )
    })?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut load =
        |name: &str| -> Result<QTensor> { Ok(content.tensor(&mut file, name, &Device::Cpu)?) };

    let mut pack_time = Duration::ZERO;
    let mut pair = |q: QTensor| -> Result<Pair> {
        let t = Instant::now();
        let baton = QuantLinear::from_qtensor(&q).context("type not handled")?;
        pack_time += t.elapsed();
        let k = baton.in_features();
        Ok(Pair {
            candle: QMatMul::from_qtensor(q)?,
            baton,
            k,
        })
    };
    let mut layers = Vec::new();
    // Per layer: [q|k|v, o, gate|up, down].
    let mut stacked = Vec::new();
    let kernels: Vec<Kernel> = [Kernel::Avx2, Kernel::Vnni]
        .into_iter()
        .filter(|k| k.is_available())
        .collect();
    // The same stacked layers per SIMD kernel, for the last section.
    let mut per_kernel: Vec<Vec<QuantLinear>> = kernels.iter().map(|_| Vec::new()).collect();
    for l in 0..LAYERS {
        let mut qs = Vec::new();
        for name in LAYER_MATRICES {
            qs.push(load(&format!("blk.{l}.{name}.weight"))?);
        }
        let stack = |parts: &[&QTensor]| QuantLinear::from_qtensors(parts).context("stack");
        stacked.push([
            stack(&[&qs[0], &qs[1], &qs[2]])?,
            stack(&[&qs[3]])?,
            stack(&[&qs[4], &qs[5]])?,
            stack(&[&qs[6]])?,
        ]);
        for (kernel, lins) in kernels.iter().zip(&mut per_kernel) {
            for parts in [
                &[&qs[0], &qs[1], &qs[2]][..],
                &[&qs[3]],
                &[&qs[4], &qs[5]],
                &[&qs[6]],
            ] {
                lins.push(stack(parts)?.with_kernel(*kernel).context("available")?);
            }
        }
        layers.push(qs.into_iter().map(&mut pair).collect::<Result<Vec<_>>>()?);
    }
    let head_q = load("token_embd.weight")?;
    for (kernel, lins) in kernels.iter().zip(&mut per_kernel) {
        let head = QuantLinear::from_qtensor(&head_q).context("head")?;
        lins.push(head.with_kernel(*kernel).context("available")?);
    }
    let head = pair(head_q)?;
    println!(
        "model {} | threads: rayon {} | repack of all {} matrices: {:.0} ms",
        path.display(),
        rayon::current_num_threads(),
        LAYERS * LAYER_MATRICES.len() + 1,
        pack_time.as_secs_f64() * 1e3
    );

    println!();
    println!("per call, one matrix repeated (weights cache-resident where they fit);");
    println!("median of {REPS} alternating repetitions, spread = (max - min) / median");
    println!(
        "{:<24} {:>3} {:>12} {:>7} {:>12} {:>7} {:>8}",
        "shape (k->n, type)", "m", "candle us", "spread", "baton us", "spread", "speedup"
    );
    // (label, layer index into LAYER_MATRICES or None for the head)
    let shapes: [(&str, Option<usize>); 5] = [
        ("attn_q", Some(0)),
        ("attn_k", Some(1)),
        ("ffn_gate", Some(4)),
        ("ffn_down", Some(6)),
        ("head", None),
    ];
    let mut m1 = std::collections::HashMap::new();
    for m in [1usize, 8] {
        for (label, idx) in shapes {
            let p = match idx {
                Some(i) => &layers[0][i],
                None => &head,
            };
            let x = random_input(m, p.k, 1)?;
            let stats = compare(&mut [
                &mut || {
                    black_box(p.candle.forward(&x)?);
                    Ok(())
                },
                &mut || {
                    black_box(p.baton.forward(&x)?);
                    Ok(())
                },
            ])?;
            let (c, b) = (&stats[0], &stats[1]);
            let shape = format!(
                "{label} {}->{} {:?}",
                p.k,
                p.baton.out_features(),
                p.baton.dtype()
            );
            println!(
                "{shape:<24} {m:>3} {:>12.1} {:>6.0}% {:>12.1} {:>6.0}% {:>7.2}x",
                us(c.median),
                c.spread(),
                us(b.median),
                b.spread(),
                c.median.as_secs_f64() / b.median.as_secs_f64()
            );
            if m == 1 {
                m1.insert(label, (c.median, b.median));
            }
        }
    }
    let sum = |f: fn(&(Duration, Duration)) -> Duration| -> Duration {
        // q and o share a shape, k and v, gate and up.
        let per_layer = 2 * f(&m1["attn_q"])
            + 2 * f(&m1["attn_k"])
            + 2 * f(&m1["ffn_gate"])
            + f(&m1["ffn_down"]);
        per_layer * LAYERS as u32 + f(&m1["head"])
    };
    let (sc, sb) = (sum(|t| t.0), sum(|t| t.1));
    println!(
        "sum of m=1 medians over 30 layers x 7 + head: candle {:.2} ms ({:.0} tok/s), baton {:.2} ms ({:.0} tok/s)",
        sc.as_secs_f64() * 1e3,
        1.0 / sc.as_secs_f64(),
        sb.as_secs_f64() * 1e3,
        1.0 / sb.as_secs_f64()
    );

    println!();
    println!(
        "decode floor: one step = the matmuls of all 30 layers and the head, in model order, so"
    );
    println!("weights stream from DRAM; baton stacked = q|k|v and gate|up as one QuantLinear each");
    println!("(121 calls instead of 211)");
    println!(
        "{:>3} {:>10} {:>6} {:>7} {:>10} {:>6} {:>7} {:>10} {:>6} {:>7} {:>8}",
        "m",
        "candle ms",
        "spread",
        "tok/s",
        "baton ms",
        "spread",
        "tok/s",
        "stacked",
        "spread",
        "tok/s",
        "speedup"
    );
    let mut m1_tps = (0.0, 0.0);
    for m in [1usize, 8] {
        let x576 = random_input(m, 576, 2)?;
        let x1536 = random_input(m, 1536, 3)?;
        let input = |k: usize| if k == 576 { &x576 } else { &x1536 };
        let stats = compare(&mut [
            &mut || {
                for p in layers.iter().flatten().chain([&head]) {
                    black_box(p.candle.forward(input(p.k))?);
                }
                Ok(())
            },
            &mut || {
                for p in layers.iter().flatten().chain([&head]) {
                    black_box(p.baton.forward(input(p.k))?);
                }
                Ok(())
            },
            &mut || {
                for lin in stacked.iter().flatten().chain([&head.baton]) {
                    black_box(lin.forward(input(lin.in_features()))?);
                }
                Ok(())
            },
        ])?;
        let tps = |s: &Stats| m as f64 / s.median.as_secs_f64();
        let ms = |s: &Stats| s.median.as_secs_f64() * 1e3;
        let (c, b, st) = (&stats[0], &stats[1], &stats[2]);
        println!(
            "{m:>3} {:>10.2} {:>5.0}% {:>7.0} {:>10.2} {:>5.0}% {:>7.0} {:>10.2} {:>5.0}% {:>7.0} {:>7.2}x",
            ms(c),
            c.spread(),
            tps(c),
            ms(b),
            b.spread(),
            tps(b),
            ms(st),
            st.spread(),
            tps(st),
            c.median.as_secs_f64() / b.median.as_secs_f64()
        );
        if m == 1 {
            m1_tps = (tps(b), tps(st));
        } else {
            println!(
                "aggregate tok/s at m={m} over m=1: baton {:.2}x, baton stacked {:.2}x",
                tps(b) / m1_tps.0,
                tps(st) / m1_tps.1
            );
        }
    }

    println!();
    println!("decode floor (stacked) per SIMD kernel, alternated; outputs are bit-identical");
    print!("{:>3}", "m");
    for kernel in &kernels {
        print!(
            " {:>10} {:>6} {:>7}",
            format!("{kernel:?} ms"),
            "spread",
            "tok/s"
        );
    }
    println!();
    let mut m1_ms = vec![0.0; kernels.len()];
    for m in [1usize, 8] {
        let x576 = random_input(m, 576, 2)?;
        let x1536 = random_input(m, 1536, 3)?;
        let input = |k: usize| if k == 576 { &x576 } else { &x1536 };
        let mut steps: Vec<Box<dyn FnMut() -> Result<()> + '_>> = per_kernel
            .iter()
            .map(|lins| {
                Box::new(move || {
                    for lin in lins {
                        black_box(lin.forward(input(lin.in_features()))?);
                    }
                    Ok(())
                }) as Box<dyn FnMut() -> Result<()>>
            })
            .collect();
        let mut refs: Vec<&mut dyn FnMut() -> Result<()>> =
            steps.iter_mut().map(|f| &mut **f as _).collect();
        let stats = compare(&mut refs)?;
        print!("{m:>3}");
        for (i, s) in stats.iter().enumerate() {
            let ms = s.median.as_secs_f64() * 1e3;
            print!(
                " {ms:>10.2} {:>5.0}% {:>7.0}",
                s.spread(),
                m as f64 / ms * 1e3
            );
            if m == 1 {
                m1_ms[i] = ms;
            }
        }
        println!();
        if m > 1 {
            for (kernel, (s, one)) in kernels.iter().zip(stats.iter().zip(&m1_ms)) {
                let ms = s.median.as_secs_f64() * 1e3;
                println!(
                    "aggregate tok/s at m={m} over m=1, {kernel:?}: {:.2}x",
                    m as f64 * one / ms
                );
            }
        }
    }
    Ok(())
}
