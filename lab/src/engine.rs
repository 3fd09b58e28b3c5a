//! `baton-lab engine`: prefill, decode and batched-decode throughput of the engine on one
//! model, with llama.cpp measured in the same invocation as the baseline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_bench::metrics::percentile;
use baton_engine::{Engine, EngineConfig, KvDType, Phase, Role, SeqId, StepItem, WeightsSetting};
use serde_json::json;

#[derive(clap::Args)]
pub struct EngineArgs {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Baseline measured in the same run: llama-cpp (needs `pip install llama-cpp-python`) or none.
    #[arg(long, value_enum, default_value_t = Baseline::LlamaCpp)]
    baseline: Baseline,
    /// Decode steps timed per measurement.
    #[arg(long, default_value_t = 64, value_parser = positive())]
    decode_tokens: usize,
    /// Each figure is the best of this many runs.
    #[arg(long, default_value_t = 3, value_parser = positive())]
    repeats: usize,
    /// Decode batch sizes to measure (the first is the single-stream figure when it is 1).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    batch_sizes: Vec<usize>,
    /// Rounds of the paired batch-8 / single-stream measurement (0 skips it): each round times a
    /// single stream and batch 8 back to back, so the ratio does not ride on machine drift.
    #[arg(long, default_value_t = 9)]
    paired_rounds: usize,
    /// Prompt lengths whose prefill is timed (in 512-token chunks, as the batcher runs them).
    #[arg(long, value_delimiter = ',', default_value = "128,512", value_parser = positive())]
    prefill_lengths: Vec<usize>,
    /// Skip the prefill measurements (for profiling decode alone).
    #[arg(long)]
    decode_only: bool,
    /// Weights setting for the engine (auto: f32 prefill, quantized decode).
    #[arg(long, default_value = "auto")]
    weights: WeightsSetting,
    /// Element type of the KV cache (f32 or f16; default: the engine's default).
    #[arg(long)]
    kv_dtype: Option<KvDType>,
    /// baton (its own CPU kernels) or candle (candle's ops as they come: the baseline those
    /// kernels were written to beat, and the code a GPU runs).
    #[arg(long, default_value = "baton")]
    cpu_kernels: baton_engine::Kernels,
    /// What prefill attention spans: tile (default), chunk or prompt (engine
    /// `prefill_attention_span`); alternate runs to see what the padding costs.
    #[arg(long, default_value = "tile", value_parser = span)]
    prefill_attention_span: baton_engine::AttentionSpan,
}

fn span(s: &str) -> Result<baton_engine::AttentionSpan, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?} is not tile, chunk or prompt"))
}

/// What `baton-lab engine` measures beside baton in the same invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// llama.cpp through llama-cpp-python, on the same file and thread count.
    LlamaCpp,
    /// baton alone: the ratios are left out.
    None,
}

/// A flag's parser for counts that must be at least 1.
fn positive() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

fn best<F: FnMut() -> anyhow::Result<Duration>>(
    repeats: usize,
    mut f: F,
) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..repeats.max(1) {
        best = best.min(f()?);
    }
    Ok(best)
}

/// A prompt of `n` real tokens: the model's own encoding of English text, repeated.
pub(crate) fn prompt(engine: &Engine, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let base = engine.tokenizer().encode(&text, false)?;
    Ok(base.iter().copied().cycle().take(n).collect())
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn time_prefill(e: &mut Engine, n: usize) -> anyhow::Result<Duration> {
    let tokens = prompt(e, n)?;
    let id = SeqId(1_000_000);
    e.add_sequence(id, tokens)?;
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let chunk = e.config().prefill_chunk_tokens.min(n - done);
        e.step(&[StepItem {
            seq: id,
            tokens: chunk,
            phase: Phase::Prefill,
        }])?;
        done += chunk;
    }
    let dt = t.elapsed();
    e.release(id);
    Ok(dt)
}

/// `batch` sequences decoding together for `steps` steps; returns the time of the decode steps.
fn time_decode(e: &mut Engine, batch: usize, steps: usize) -> anyhow::Result<Duration> {
    let ids: Vec<SeqId> = (0..batch as u64).map(SeqId).collect();
    let base = prompt(e, 16 + batch)?;
    let mut last = Vec::with_capacity(batch);
    for (i, id) in ids.iter().enumerate() {
        e.add_sequence(*id, base[i..i + 16].to_vec())?;
        let out = e.step(&[StepItem {
            seq: *id,
            tokens: 16,
            phase: Phase::Prefill,
        }])?;
        last.push(argmax(out[0].logits.as_ref().context("prefill logits")?));
    }
    let items: Vec<StepItem> = ids
        .iter()
        .map(|id| StepItem {
            seq: *id,
            tokens: 1,
            phase: Phase::Decode,
        })
        .collect();
    let t = Instant::now();
    for _ in 0..steps {
        for (id, tok) in ids.iter().zip(&last) {
            e.push_token(*id, *tok)?;
        }
        let out = e.step(&items)?;
        for (slot, o) in last.iter_mut().zip(out) {
            *slot = argmax(o.logits.as_ref().context("decode logits")?);
        }
    }
    let dt = t.elapsed();
    for id in ids {
        e.release(id);
    }
    Ok(dt)
}

/// Batch 8 over a single stream, one ratio per round: each round times `steps` decode steps of
/// one sequence and of eight back to back, the order alternating between rounds, so a machine
/// that speeds up or slows down between rounds moves both sides of a ratio. The ratio of
/// aggregate tokens/s is `8 t1 / t8`.
fn paired_batch_ratios(e: &mut Engine, rounds: usize, steps: usize) -> anyhow::Result<Vec<f64>> {
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (t1, t8) = if round % 2 == 0 {
            let t1 = time_decode(e, 1, steps)?;
            (t1, time_decode(e, 8, steps)?)
        } else {
            let t8 = time_decode(e, 8, steps)?;
            (time_decode(e, 1, steps)?, t8)
        };
        ratios.push(8.0 * t1.as_secs_f64() / t8.as_secs_f64());
    }
    Ok(ratios)
}

fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The script that measures llama.cpp, beside this crate in the repository.
fn llama_cpp_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_llama_cpp.py")
}

/// Refuses `--baseline llama-cpp` up front when the script or llama-cpp-python is missing.
fn llama_cpp_available() -> anyhow::Result<()> {
    let script = llama_cpp_script();
    if !script.is_file() {
        bail!(
            "--baseline llama-cpp: {} is missing (run from a checkout, or pass --baseline none)",
            script.display()
        );
    }
    let import = std::process::Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output()
        .context("--baseline llama-cpp: running python3")?;
    if !import.status.success() {
        bail!(
            "--baseline llama-cpp needs llama-cpp-python (`pip install llama-cpp-python`, about 10 \
             minutes to build), or pass --baseline none: {}",
            String::from_utf8_lossy(&import.stderr).trim()
        );
    }
    Ok(())
}

fn llama_cpp(
    model: &std::path::Path,
    decode_tokens: usize,
    repeats: usize,
) -> anyhow::Result<serde_json::Value> {
    let script = llama_cpp_script();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args(["--model", &model.to_string_lossy()])
        .args(["--threads", &threads.to_string()])
        .args(["--decode-tokens", &decode_tokens.to_string()])
        .args(["--repeats", &repeats.to_string()])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "llama.cpp baseline failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("llama.cpp baseline output")
}

pub fn run(args: EngineArgs) -> anyhow::Result<()> {
    // Everything that can refuse the run does so before minutes of measuring.
    if args.batch_sizes.is_empty() || args.batch_sizes.contains(&0) {
        bail!("--batch-sizes must list positive batch sizes");
    }
    if args.baseline == Baseline::LlamaCpp {
        llama_cpp_available()?;
    }
    let model = baton::model_path::resolve(args.model)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let mut cfg = EngineConfig::new(&model, Role::Colocated);
    cfg.weights = args.weights;
    cfg.cpu_kernels = args.cpu_kernels;
    if let Some(dtype) = args.kv_dtype {
        cfg.kv_dtype = dtype;
    }
    cfg.prefill_chunk_tokens = 512;
    cfg.prefill_attention_span = args.prefill_attention_span;
    cfg.kv_cache_bytes = 256 << 20;
    let t = Instant::now();
    let mut e = Engine::load(cfg)?;
    let load = t.elapsed();

    let mut prefill = Vec::new();
    let prefill_lens: &[usize] = if args.decode_only {
        &[]
    } else {
        &args.prefill_lengths
    };
    for &n in prefill_lens {
        time_prefill(&mut e, n)?; // warm-up
        let dt = best(args.repeats, || time_prefill(&mut e, n))?;
        prefill.push((n, n as f64 / dt.as_secs_f64()));
    }
    let mut decode = Vec::new();
    for &b in &args.batch_sizes {
        time_decode(&mut e, b, 4)?; // warm-up
        let dt = best(args.repeats, || time_decode(&mut e, b, args.decode_tokens))?;
        decode.push((b, (b * args.decode_tokens) as f64 / dt.as_secs_f64()));
    }
    let paired =
        (args.paired_rounds > 0 && args.batch_sizes.contains(&1) && args.batch_sizes.contains(&8))
            .then(|| paired_batch_ratios(&mut e, args.paired_rounds, args.decode_tokens))
            .transpose()?
            .map(|ratios| Spread::of(&ratios));
    let prefill_at = |n: usize| prefill.iter().find(|(l, _)| *l == n).map(|(_, v)| *v);
    let decode_at = |b: usize| decode.iter().find(|(l, _)| *l == b).map(|(_, v)| *v);
    let single = decode_at(1);
    let batch8_over_single = decode_at(8).zip(single).map(|(b8, s)| b8 / s);
    let matmul_kernel = match args.cpu_kernels {
        baton_engine::Kernels::Baton => format!("{:?}", baton_engine::kernels::Kernel::detect()),
        baton_engine::Kernels::Candle => "candle QMatMul".to_string(),
    };
    let mut report = json!({
        "model": model.display().to_string(),
        "threads": threads,
        "weights": format!("{:?}", e.weight_plan()),
        "kv_dtype": e.kv_dtype().name(),
        // Which quantized-matmul kernel this CPU runs, so figures from different machines are
        // not compared blind.
        "cpu_kernels": args.cpu_kernels.name(),
        "matmul_kernel": matmul_kernel,
        "load_s": load.as_secs_f64(),
        "prefill_128_tok_s": prefill_at(128),
        "prefill_512_tok_s": prefill_at(512),
        "prefill_tok_s": prefill.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "decode_tok_s": single,
        "aggregate_decode_tok_s": decode.iter().map(|(b, v)| (b.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "batch8_over_single": batch8_over_single,
        "batch8_over_single_paired": paired.map(|p| p.json()),
        "paired_rounds": args.paired_rounds,
        "rss_mib": rss_kib("VmRSS:").map(|k| k as f64 / 1024.0),
        "peak_rss_mib": rss_kib("VmHWM:").map(|k| k as f64 / 1024.0),
    });
    drop(e);
    let baseline = match args.baseline {
        Baseline::None => None,
        Baseline::LlamaCpp => Some(llama_cpp(&model, args.decode_tokens, args.repeats)?),
    };
    let base = |key: &str| {
        baseline
            .as_ref()
            .and_then(|b| b.get(key))
            .and_then(|v| v.as_f64())
    };
    if let Some(b) = &baseline {
        let ratio = |ours: Option<f64>, key: &str| ours.zip(base(key)).map(|(o, t)| o / t);
        report["llama_cpp"] = b.clone();
        report["ratio_vs_llama_cpp"] = json!({
            "prefill_128": ratio(prefill_at(128), "prefill_128_tok_s"),
            "prefill_512": ratio(prefill_at(512), "prefill_512_tok_s"),
            "decode": ratio(single, "decode_tok_s"),
        });
    }
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!("baton-lab engine — {} ({threads} threads)", model.display());
    println!(
        "weights: {}, KV cache: {}, CPU kernels: {}, matmul kernel: {}",
        report["weights"].as_str().unwrap_or(""),
        report["kv_dtype"].as_str().unwrap_or(""),
        report["cpu_kernels"].as_str().unwrap_or(""),
        report["matmul_kernel"].as_str().unwrap_or("")
    );
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "measure (higher is better)", "baton", "llama.cpp", "ratio"
    );
    let row = |name: &str, ours: Option<f64>, key: &str| {
        let Some(ours) = ours else { return };
        match base(key) {
            Some(v) => println!("{name:<28} {ours:>12.1} {v:>12.1} {:>7.2}x", ours / v),
            None => println!("{name:<28} {ours:>12.1} {:>12} {:>8}", "-", "-"),
        }
    };
    row("prefill 128 (tok/s)", prefill_at(128), "prefill_128_tok_s");
    row("prefill 512 (tok/s)", prefill_at(512), "prefill_512_tok_s");
    for (n, v) in prefill.iter().filter(|(n, _)| ![128, 512].contains(n)) {
        println!("{:<28} {v:>12.1}", format!("prefill {n} (tok/s)"));
    }
    row("decode, 1 stream (tok/s)", single, "decode_tok_s");
    for (b, v) in &decode {
        println!("{:<28} {v:>12.1}", format!("decode, batch {b} (tok/s)"));
    }
    if let Some(r) = batch8_over_single {
        println!(
            "{:<28} {r:>12.2}x   (of the figures above)",
            "batch 8 / single stream"
        );
    }
    if let Some(p) = paired {
        println!(
            "{:<28} {:>12.2}x   (median of {} paired rounds; quartiles {:.2}-{:.2}, range {:.2}-{:.2})",
            "  paired", p.median, args.paired_rounds, p.p25, p.p75, p.min, p.max
        );
    }
    match base("load_s") {
        Some(v) => println!(
            "{:<28} {:>12.2} {v:>12.2}   (seconds, lower is better)",
            "load",
            load.as_secs_f64()
        ),
        None => println!("{:<28} {:>12.2}   (seconds)", "load", load.as_secs_f64()),
    }
    if let (Some(r), Some(p)) = (report["rss_mib"].as_f64(), report["peak_rss_mib"].as_f64()) {
        println!("{:<28} {r:>12.0} (peak {p:.0})", "resident memory (MiB)");
    }
    Ok(())
}

/// The spread of a set of ratios: median, quartiles, extremes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) p25: f64,
    pub(crate) p75: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    /// `NaN` everywhere for no values.
    pub(crate) fn of(v: &[f64]) -> Self {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let at = |p| percentile(&v, p);
        Self {
            median: at(50.0),
            p25: at(25.0),
            p75: at(75.0),
            min: at(0.0),
            max: at(100.0),
        }
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "median": self.median,
            "p25": self.p25,
            "p75": self.p75,
            "min": self.min,
            "max": self.max,
        })
    }
}
