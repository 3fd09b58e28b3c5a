//! `baton-lab transfer`: the KV transports on a real prompt's KV, each beside its baseline
//! measured in the same process and the same run, and how much of a push transfer the prefill
//! compute fails to hide.
//!
//! For each prompt length a prefill engine computes the prompt, and its KV is kept in the two
//! segmentations the cluster sends: per layer per prefill step, as `step_with_export` hands it
//! out (push), and per layer in runs of [`max_blocks_per_segment`] blocks, as `export` reads a
//! kept sequence (pull). Each segmentation is then moved, over loopback in this process, by
//!
//! - raw TCP: one tokio `TcpStream` pair, the same bytes in the same chunk sizes, no framing;
//! - memcpy: the same chunks copied into a preallocated buffer on one thread;
//! - baton TCP: `TcpSender` -> `TcpReceiver` (default config: 4 streams), deliveries consumed;
//! - baton shm: `ShmSender` -> `ShmReceiver` (default config: 8 slots of 8 MiB), deliveries
//!   consumed.
//!
//! The consumer hands each segment's data back to its receiver (`KvReceiver::recycle`), as the
//! decode worker does once it has imported it.
//!
//! Throughput is payload bytes over the time from the first byte handed to the transport to the
//! last delivery consumed. The writer runs on the calling thread and the reader on a runtime
//! worker, for every transport alike.
//!
//! Push overlap: the prompt is prefilled again, without export and with each layer sent as it is
//! computed (bounded channel into `send_all`, as the prefill worker does), interleaved.
//! `exposed = max(0, last segment delivered at the receiver - end of compute)`, against the time
//! the same segments take on the same transport when sent after the compute (the median of the
//! throughput runs): the share of the transfer the overlap does not hide. How much the sending
//! slows the compute itself is printed beside it.
//!
//! Beside them, the shm transport's per-byte work measured stage by stage on one thread (the
//! sender's copy into a slot and the receiver's copy out of it into a recycled buffer, each
//! computing the crc32c as it copies): the slower stage bounds what the transport can reach with
//! both sides overlapped on two cores, and the two in sequence what it reaches on one core.
//!
//! Measurements are paired: each of `--repeats` repeats (after one untimed warm-up) moves both
//! segmentations, and each transport right after or right before its baseline (which goes
//! first alternates between repeats). On a shared machine the baseline itself swings several
//! times over between runs, so a ratio is taken within each repeat and the figure is the median
//! of those ratios, printed with their quartiles and extremes; throughputs are the medians of
//! the repeats. Overlap figures are medians of `--overlap-repeats`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_bench::metrics::percentile;
use baton_engine::{Engine, EngineConfig, KvChunk, Phase, Role, SeqId, StepItem};
use baton_kv_transfer::{
    Delivery, Endpoint, Expectation, HandoffId, KvReceiver, KvSegment, Link, LinkConfig, ShmConfig,
    ShmReceiver, TcpConfig, TcpReceiver, checksummed_copy, max_blocks_per_segment, send_all,
};
use baton_prefill_worker::PrefillConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct TransferArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    json: bool,
    /// Timed repeats (after one warm-up). Each repeat moves both segmentations, each transport
    /// back to back with its baseline (raw TCP with baton TCP, memcpy with baton shm; which goes
    /// first alternates); a ratio is the median of the per-repeat ratios, a throughput the
    /// median of the repeats.
    #[arg(long, default_value_t = 21)]
    repeats: usize,
    /// Timed push-overlap runs per prompt length; each prefills the prompt three times (alone,
    /// pushing over TCP, pushing over shm). The prefill that captures the KV is their warm-up.
    /// 0 skips the overlap (for profiling the transports alone).
    #[arg(long, default_value_t = 3)]
    overlap_repeats: usize,
    /// Prompt lengths to measure; a length at or past the model's context is cut to the longest
    /// prompt it accepts.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    prompt_tokens: Vec<usize>,
}

/// Targets from the transport issue, printed beside the measured ratios.
const TARGET_TCP_OVER_RAW: f64 = 0.80;
const TARGET_SHM_OVER_MEMCPY: f64 = 0.50;
const TARGET_EXPOSED_SHARE: f64 = 0.10;

const METHODS: [&str; 4] = ["raw_tcp", "memcpy", "baton_tcp", "baton_shm"];
const RAW_TCP: usize = 0;
const MEMCPY: usize = 1;
const BATON_TCP: usize = 2;
const BATON_SHM: usize = 3;

pub fn run(args: TransferArgs) -> anyhow::Result<()> {
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    ensure!(
        !args.prompt_tokens.is_empty() && !args.prompt_tokens.contains(&0),
        "--prompt-tokens must list positive lengths"
    );
    let model = baton::model_path::resolve(args.model.clone())?;
    // What `baton prefill` runs with: 512-token prefill chunks, 16-token blocks, f32 KV.
    let cfg = EngineConfig::new(&model, Role::Prefill);
    let segment_queue = PrefillConfig::new(cfg.clone()).segment_queue;
    let mut engine = Engine::load(cfg)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let mut links = Links::open(&rt, &engine)?;
    let cpu = cpu_model();
    let mc = engine.model_config();
    let header = json!({
        "model": model.display().to_string(),
        "layers": mc.num_layers,
        "kv_heads": mc.num_kv_heads,
        "head_dim": mc.head_dim,
        "kv_dtype": engine.kv_dtype().name(),
        "block_size": engine.block_size(),
        "prefill_chunk_tokens": engine.config().prefill_chunk_tokens,
        "threads": threads,
        "cpu": cpu,
        "repeats": args.repeats,
        "overlap_repeats": args.overlap_repeats,
        "statistic": "GB/s: median of the repeats; ratios: median (and spread) of the per-repeat ratios of a transport to the baseline it ran beside",
        "targets": {
            "tcp_over_raw_tcp": TARGET_TCP_OVER_RAW,
            "shm_over_memcpy": TARGET_SHM_OVER_MEMCPY,
            "push_exposed_share": TARGET_EXPOSED_SHARE,
        },
    });
    if !args.json {
        println!(
            "baton-lab transfer — {} ({} layers, {} kv heads x {}, {} kv, {}-token blocks, {}-token prefill chunks)",
            model.display(),
            mc.num_layers,
            mc.num_kv_heads,
            mc.head_dim,
            engine.kv_dtype().name(),
            engine.block_size(),
            engine.config().prefill_chunk_tokens
        );
        println!(
            "{threads} threads, {cpu}; medians of {} transfer repeats after a warm-up (each transport beside its baseline; ratios are medians of the per-repeat ratios), {} push-overlap runs",
            args.repeats, args.overlap_repeats
        );
    }
    let mut results = Vec::new();
    for &asked in &args.prompt_tokens {
        let longest = engine.max_context().saturating_sub(1);
        let n = asked.min(longest);
        let repeats = Repeats {
            transfer: args.repeats,
            overlap: args.overlap_repeats,
        };
        let mut result = measure_prompt(&mut engine, &rt, &mut links, n, repeats, segment_queue)?;
        result["prompt_tokens_asked"] = json!(asked);
        if !args.json {
            print_prompt(&result, asked);
        }
        results.push(result);
    }
    if args.json {
        let mut report = header;
        report["prompts"] = json!(results);
        println!("{report}");
    } else {
        println!();
        println!(
            "targets: baton tcp / raw tcp >= {TARGET_TCP_OVER_RAW:.2}, baton shm / memcpy >= {TARGET_SHM_OVER_MEMCPY:.2}, push exposed / transfer <= {TARGET_EXPOSED_SHARE:.2}"
        );
    }
    Ok(())
}

/// A progress line on stderr: the long prompts take minutes per prefill on a small machine.
fn progress(what: &str) {
    eprintln!("bench transfer: {what}");
}

/// The CPU's model name from /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// A transport's throughput over its baseline's, one ratio per repeat: in each repeat both
/// moved the same bytes back to back, so the ratio is the baseline's time over the transport's.
fn paired_ratios(baseline: &[Duration], transport: &[Duration]) -> Vec<f64> {
    baseline
        .iter()
        .zip(transport)
        .map(|(b, t)| b.as_secs_f64() / t.as_secs_f64())
        .collect()
}

/// The median of a sample and how far it spreads: quartiles (linear interpolation, as numpy)
/// and extremes.
#[derive(Debug, Clone, Copy, PartialEq)]
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

#[derive(Clone, Copy)]
struct Repeats {
    transfer: usize,
    overlap: usize,
}

/// One prompt length: capture its KV, move both segmentations by every method, then measure the
/// push overlap.
fn measure_prompt(
    engine: &mut Engine,
    rt: &tokio::runtime::Runtime,
    links: &mut Links,
    n: usize,
    repeats: Repeats,
    segment_queue: usize,
) -> anyhow::Result<serde_json::Value> {
    let prompt = crate::engine::prompt(engine, n)?;
    let layers = engine.model_config().num_layers;
    let kv_bytes = (layers * engine.kv_layer_bytes(n)) as u64;
    let (push, pull, first_compute) = capture(engine, &prompt)?;
    progress(&format!(
        "prompt {n}: kv captured by a {:.1} s prefill",
        first_compute.as_secs_f64()
    ));
    let mut shapes = [("push", push), ("pull", pull)];
    for (shape, segments) in &shapes {
        let bytes: u64 = segments.iter().map(|s| s.chunk.data.len() as u64).sum();
        ensure!(
            bytes == kv_bytes,
            "{shape} segments hold {bytes} B, expected {layers} layers x {} B",
            engine.kv_layer_bytes(n)
        );
    }
    // samples[shape][method], stages[shape][stage]
    let mut samples: [[Vec<Duration>; 4]; 2] = Default::default();
    let mut stages: [[Vec<Duration>; 3]; 2] = Default::default();
    let mut dst = vec![0u8; kv_bytes as usize];
    let mut slot = vec![0u8; ShmConfig::default().slot_bytes];
    let mut recycled = vec![0u8; ShmConfig::default().slot_bytes];
    // Each repeat moves both shapes, and each transport right beside its baseline, the two in
    // alternating order, so that a neighbour's burst of load falls on a pair rather than
    // between the blocks of runs its ratio is taken from.
    for r in 0..=repeats.transfer {
        let baseline_first = r % 2 == 0;
        for (k, (_, segments)) in shapes.iter_mut().enumerate() {
            let (raw, tcp) = if baseline_first {
                let raw = links.raw_tcp(rt, segments)?;
                (raw, links.baton(rt, 0, n, segments)?)
            } else {
                let tcp = links.baton(rt, 0, n, segments)?;
                (links.raw_tcp(rt, segments)?, tcp)
            };
            let (copied, shm) = if baseline_first {
                let copied = memcpy(segments, &mut dst);
                (copied, links.baton(rt, 1, n, segments)?)
            } else {
                let shm = links.baton(rt, 1, n, segments)?;
                (memcpy(segments, &mut dst), shm)
            };
            let (sender, receiver) = shm_stages(segments, &mut slot, &mut recycled);
            // Run 0 warms sockets, slots and page tables; it is not counted.
            if r > 0 {
                for (s, t) in samples[k].iter_mut().zip([raw, copied, tcp, shm]) {
                    s.push(t);
                }
                for (s, t) in stages[k]
                    .iter_mut()
                    .zip([checksum(segments), sender, receiver])
                {
                    s.push(t);
                }
            }
        }
    }
    drop((dst, slot, recycled));
    progress(&format!(
        "prompt {n}: push and pull segments moved by every method"
    ));

    let mut shapes_json = serde_json::Map::new();
    // The push segments' median time on baton tcp and shm, sent after the compute.
    let mut serial = [0.0; 2];
    for (k, (shape, segments)) in shapes.iter().enumerate() {
        let samples = &samples[k];
        let rate =
            |i: usize| -> Vec<f64> { samples[i].iter().map(|t| gbps(kv_bytes, *t)).collect() };
        let med = |i: usize| median(&rate(i));
        let secs = |i: usize| {
            median(
                &samples[i]
                    .iter()
                    .map(Duration::as_secs_f64)
                    .collect::<Vec<_>>(),
            )
        };
        if *shape == "push" {
            serial = [secs(BATON_TCP), secs(BATON_SHM)];
        }
        let tcp_ratios = paired_ratios(&samples[RAW_TCP], &samples[BATON_TCP]);
        let shm_ratios = paired_ratios(&samples[MEMCPY], &samples[BATON_SHM]);
        let tcp = Spread::of(&tcp_ratios);
        let shm = Spread::of(&shm_ratios);
        let sizes = segments.iter().map(|s| s.chunk.data.len());
        let mut gbps_samples = serde_json::Map::new();
        for (i, m) in METHODS.iter().enumerate() {
            gbps_samples.insert((*m).into(), json!(rate(i)));
        }
        let stage = |i: usize| {
            median(
                &stages[k][i]
                    .iter()
                    .map(|t| gbps(kv_bytes, *t))
                    .collect::<Vec<_>>(),
            )
        };
        // With the sender and the receiver each on its own core and perfectly overlapped, the
        // slower of the two stages bounds the transport; on one core, the two add up.
        let shm_bound = stage(1).min(stage(2));
        let shm_one_core = 1.0 / (1.0 / stage(1) + 1.0 / stage(2));
        shapes_json.insert(
            (*shape).into(),
            json!({
                "segments": segments.len(),
                "segment_bytes_min": sizes.clone().min().unwrap_or(0),
                "segment_bytes_max": sizes.max().unwrap_or(0),
                "raw_tcp_gbps": med(RAW_TCP),
                "memcpy_gbps": med(MEMCPY),
                "baton_tcp_gbps": med(BATON_TCP),
                "baton_shm_gbps": med(BATON_SHM),
                "baton_tcp_over_raw_tcp": tcp.median,
                "baton_tcp_over_raw_tcp_spread": tcp.json(),
                "baton_tcp_over_raw_tcp_samples": tcp_ratios,
                "baton_tcp_over_raw_tcp_of_medians": med(BATON_TCP) / med(RAW_TCP),
                "baton_shm_over_memcpy": shm.median,
                "baton_shm_over_memcpy_spread": shm.json(),
                "baton_shm_over_memcpy_samples": shm_ratios,
                "baton_shm_over_memcpy_of_medians": med(BATON_SHM) / med(MEMCPY),
                "baton_tcp_seconds": secs(BATON_TCP),
                "baton_shm_seconds": secs(BATON_SHM),
                "gbps_samples": gbps_samples,
                "stages_one_thread_gbps": {
                    "crc32c": stage(0),
                    "shm_sender": stage(1),
                    "shm_receiver": stage(2),
                    "shm_bound": shm_bound,
                    "shm_bound_over_memcpy": shm_bound / med(MEMCPY),
                    "shm_one_core": shm_one_core,
                    "shm_one_core_over_memcpy": shm_one_core / med(MEMCPY),
                },
            }),
        );
    }
    let shapes = shapes_json;

    let mut result = json!({
        "prompt_tokens": n,
        "kv_bytes": kv_bytes,
        "layers": layers,
        "layer_bytes": engine.kv_layer_bytes(n),
        "capture_prefill_seconds": first_compute.as_secs_f64(),
        "shapes": shapes,
    });
    if repeats.overlap == 0 {
        return Ok(result);
    }
    // Interleaved, so that a neighbour's load falls on all three alike.
    let mut alone = Vec::new();
    let mut pushed: [Vec<PushTiming>; 2] = Default::default();
    for i in 0..repeats.overlap {
        alone.push(prefill_alone(engine, &prompt)?.as_secs_f64());
        pushed[0].push(links.push(rt, 0, engine, &prompt, segment_queue)?);
        pushed[1].push(links.push(rt, 1, engine, &prompt, segment_queue)?);
        progress(&format!(
            "prompt {n}: overlap run {}/{}: prefill alone {:.1} s, pushing over tcp {:.1} s, over shm {:.1} s",
            i + 1,
            repeats.overlap,
            alone[i],
            pushed[0][i].compute,
            pushed[1][i].compute
        ));
    }
    let mut overlap = serde_json::Map::new();
    overlap.insert("compute_alone_seconds".into(), json!(median(&alone)));
    overlap.insert("compute_alone_samples_seconds".into(), json!(alone));
    for (i, name) in ["baton_tcp", "baton_shm"].iter().enumerate() {
        let p = &pushed[i];
        let of = |f: fn(&PushTiming) -> f64| p.iter().map(f).collect::<Vec<_>>();
        let after = of(|t| t.last_delivery_after_compute);
        // Paired with the prefill alone of the same repeat.
        let slowdown: Vec<f64> = p.iter().zip(&alone).map(|(t, a)| t.compute - a).collect();
        let exposed = median(&after).max(0.0);
        overlap.insert(
            (*name).into(),
            json!({
                "compute_seconds": median(&of(|t| t.compute)),
                "compute_minus_alone_seconds": median(&slowdown),
                "last_delivery_after_compute_seconds": median(&after),
                "exposed_seconds": exposed,
                "serial_transfer_seconds": serial[i],
                "exposed_over_transfer": exposed / serial[i],
                "compute_samples_seconds": of(|t| t.compute),
                "last_delivery_after_compute_samples_seconds": after,
            }),
        );
    }
    result["push_overlap"] = json!(overlap);
    Ok(result)
}

fn print_prompt(r: &serde_json::Value, asked: usize) {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let list = |v: &serde_json::Value, scale: f64| -> String {
        let items: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(|x| format!("{:.3}", f(x) * scale)).collect())
            .unwrap_or_default();
        items.join(" ")
    };
    let n = r["prompt_tokens"].as_u64().unwrap_or(0);
    println!();
    let cut = if n as usize != asked {
        format!(" (asked {asked}; the model's context holds {n} prompt tokens at most)")
    } else {
        String::new()
    };
    println!(
        "prompt {n} tokens{cut}: kv {} B = {} layers x {} B",
        r["kv_bytes"], r["layers"], r["layer_bytes"]
    );
    println!(
        "  {:<26} {:>9} {:>9} {:>8} {:>11} {:>9} {:>9} {:>8} {:>11}",
        "segments (GB/s)",
        "raw tcp",
        "baton tcp",
        "tcp/raw",
        "p25-p75",
        "memcpy",
        "baton shm",
        "shm/mem",
        "p25-p75"
    );
    for shape in ["push", "pull"] {
        let s = &r["shapes"][shape];
        let label = format!(
            "{shape}: {} x {}",
            s["segments"],
            if s["segment_bytes_min"] == s["segment_bytes_max"] {
                format!("{} B", s["segment_bytes_max"])
            } else {
                format!("{}-{} B", s["segment_bytes_min"], s["segment_bytes_max"])
            }
        );
        let quartiles = |key: &str| {
            let q = &s[key];
            format!("{:.2}-{:.2}", f(&q["p25"]), f(&q["p75"]))
        };
        println!(
            "  {label:<26} {:>9.2} {:>9.2} {:>8.2} {:>11} {:>9.2} {:>9.2} {:>8.2} {:>11}",
            f(&s["raw_tcp_gbps"]),
            f(&s["baton_tcp_gbps"]),
            f(&s["baton_tcp_over_raw_tcp"]),
            quartiles("baton_tcp_over_raw_tcp_spread"),
            f(&s["memcpy_gbps"]),
            f(&s["baton_shm_gbps"]),
            f(&s["baton_shm_over_memcpy"]),
            quartiles("baton_shm_over_memcpy_spread"),
        );
        for m in METHODS {
            println!(
                "      {m:<10} runs (GB/s): {}",
                list(&s["gbps_samples"][m], 1.0)
            );
        }
        for (name, key) in [
            ("tcp/raw", "baton_tcp_over_raw_tcp"),
            ("shm/memcpy", "baton_shm_over_memcpy"),
        ] {
            let spread = &s[format!("{key}_spread")];
            println!(
                "      {name:<10} per repeat: {} (min {:.2}, max {:.2}; ratio of the medians {:.2})",
                list(&s[format!("{key}_samples")], 1.0),
                f(&spread["min"]),
                f(&spread["max"]),
                f(&s[format!("{key}_of_medians")]),
            );
        }
        let st = &s["stages_one_thread_gbps"];
        println!(
            "      stages on one thread (GB/s): crc32c {:.2}; shm sender (copy into a slot, crc32c in the copy) {:.2}; shm receiver (copy out into a recycled buffer, crc32c in the copy) {:.2}; shm bound on two cores {:.2} = {:.2} of memcpy, on one core {:.2} = {:.2}",
            f(&st["crc32c"]),
            f(&st["shm_sender"]),
            f(&st["shm_receiver"]),
            f(&st["shm_bound"]),
            f(&st["shm_bound_over_memcpy"]),
            f(&st["shm_one_core"]),
            f(&st["shm_one_core_over_memcpy"]),
        );
    }
    let o = &r["push_overlap"];
    if o.is_null() {
        return;
    }
    println!(
        "  push overlap: prefill alone {:.3} s (runs: {})",
        f(&o["compute_alone_seconds"]),
        list(&o["compute_alone_samples_seconds"], 1.0)
    );
    for (name, key) in [("tcp", "baton_tcp"), ("shm", "baton_shm")] {
        let t = &o[key];
        println!(
            "    {name}: prefill with push {:.3} s ({:+.1} ms against alone); last segment delivered {:+.2} ms after the compute ended; exposed {:.2} ms = {:.3} of the {:.2} ms these segments take after the compute",
            f(&t["compute_seconds"]),
            f(&t["compute_minus_alone_seconds"]) * 1e3,
            f(&t["last_delivery_after_compute_seconds"]) * 1e3,
            f(&t["exposed_seconds"]) * 1e3,
            f(&t["exposed_over_transfer"]),
            f(&t["serial_transfer_seconds"]) * 1e3,
        );
        println!(
            "         runs: last segment after compute (ms): {}",
            list(&t["last_delivery_after_compute_samples_seconds"], 1e3)
        );
    }
}

/// Prefills `prompt` exporting every step's layers (the push segmentation), then exports the
/// kept sequence in transport-sized runs (the pull segmentation). Returns both and the compute
/// time of that first prefill.
fn capture(
    engine: &mut Engine,
    prompt: &[u32],
) -> anyhow::Result<(Vec<KvSegment>, Vec<KvSegment>, Duration)> {
    let seq = SeqId(1);
    engine.add_sequence(seq, prompt.to_vec())?;
    let kv_heads = engine.descriptor().kv_heads.clone();
    let segment = |chunk: KvChunk| KvSegment {
        handoff: HandoffId(0),
        kv_heads: kv_heads.clone(),
        chunk,
    };
    let chunk = engine.config().prefill_chunk_tokens;
    let started = Instant::now();
    let mut push = Vec::new();
    while engine.computed(seq)? < prompt.len() {
        let tokens = chunk.min(prompt.len() - engine.computed(seq)?);
        engine.step_with_export(
            &[StepItem {
                seq,
                tokens,
                phase: Phase::Prefill,
            }],
            &[seq],
            &mut |_, c| {
                push.push(segment(c));
                Ok(())
            },
        )?;
    }
    let compute = started.elapsed();
    let d = engine.descriptor();
    let run = max_blocks_per_segment(d.bytes_per_token_half() * 2 * d.block_size as usize);
    let blocks = engine.blocks_held(seq)?;
    let mut pull = Vec::new();
    for layer in 0..engine.model_config().num_layers {
        for first in (0..blocks).step_by(run) {
            pull.push(segment(engine.export(
                seq,
                layer,
                first..(first + run).min(blocks),
            )?));
        }
    }
    engine.release(seq);
    Ok((push, pull, compute))
}

fn memcpy(segments: &[KvSegment], dst: &mut [u8]) -> Duration {
    let started = Instant::now();
    let mut at = 0;
    for s in segments {
        let src = &s.chunk.data;
        dst[at..at + src.len()].copy_from_slice(src);
        at += src.len();
    }
    let t = started.elapsed();
    std::hint::black_box(&dst);
    t
}

/// The checksum every frame carries (crc32c of the payload), over every segment.
fn checksum(segments: &[KvSegment]) -> Duration {
    let started = Instant::now();
    let crc = segments
        .iter()
        .fold(0, |acc, s| acc ^ crc32c::crc32c(&s.chunk.data));
    std::hint::black_box(crc);
    started.elapsed()
}

/// The shm transport's per-byte work per segment, on one thread: the sender's copy into a slot
/// and the receiver's copy out of it into a recycled buffer, each computing the payload's
/// crc32c as it copies. Returns the time of each stage.
fn shm_stages(
    segments: &[KvSegment],
    slot: &mut [u8],
    recycled: &mut [u8],
) -> (Duration, Duration) {
    let (mut sender, mut receiver) = (Duration::ZERO, Duration::ZERO);
    let mut crc = 0;
    for s in segments {
        let src = &s.chunk.data;
        let n = src.len();
        let started = Instant::now();
        crc ^= checksummed_copy(src, &mut slot[..n]);
        let copied_in = Instant::now();
        crc ^= checksummed_copy(&slot[..n], &mut recycled[..n]);
        receiver += copied_in.elapsed();
        sender += copied_in - started;
        std::hint::black_box(&recycled);
    }
    std::hint::black_box(crc);
    (sender, receiver)
}

fn prefill_alone(engine: &mut Engine, prompt: &[u32]) -> anyhow::Result<Duration> {
    let seq = SeqId(2);
    engine.add_sequence(seq, prompt.to_vec())?;
    let chunk = engine.config().prefill_chunk_tokens;
    let started = Instant::now();
    while engine.computed(seq)? < prompt.len() {
        let tokens = chunk.min(prompt.len() - engine.computed(seq)?);
        engine.step(&[StepItem {
            seq,
            tokens,
            phase: Phase::Prefill,
        }])?;
    }
    let t = started.elapsed();
    engine.release(seq);
    Ok(t)
}

/// One push prefill's timings, in seconds.
struct PushTiming {
    /// First step to the last step's return.
    compute: f64,
    /// The handoff's completion at the receiver less the end of compute; negative when the last
    /// segment arrived before the last step returned (the output head runs after the last
    /// layer's export).
    last_delivery_after_compute: f64,
}

/// A baton transport: the prefill side's link and the decode side's receiver, both in this
/// process.
struct BatonPair {
    link: Arc<Link>,
    receiver: Arc<dyn KvReceiver>,
    deliveries: Option<mpsc::Receiver<Delivery>>,
}

/// Every connection the benchmark measures, opened once and reused by every run.
struct Links {
    /// tcp, then shm.
    baton: [BatonPair; 2],
    raw_writer: TcpStream,
    raw_reader: Option<TcpStream>,
    descriptor: baton_engine::LayoutDescriptor,
    next_handoff: u64,
}

/// What a consumer task counted of one handoff.
struct Consumed {
    bytes: u64,
    done: Instant,
}

/// Reads `handoff`'s deliveries until it completes, handing each segment's data back to
/// `receiver` as the decode worker does once it has imported it; hands the channel back.
async fn consume(
    mut rx: mpsc::Receiver<Delivery>,
    receiver: Arc<dyn KvReceiver>,
    handoff: HandoffId,
) -> (mpsc::Receiver<Delivery>, anyhow::Result<Consumed>) {
    let mut bytes = 0;
    let result = loop {
        match rx.recv().await {
            Some(Delivery::Segment(s)) if s.handoff == handoff => {
                bytes += s.chunk.data.len() as u64;
                receiver.recycle(s.chunk.data);
            }
            Some(Delivery::Complete(h)) if h == handoff => {
                break Ok(Consumed {
                    bytes,
                    done: Instant::now(),
                });
            }
            Some(Delivery::Failed { handoff, error }) => {
                break Err(anyhow::anyhow!("{handoff} failed: {error}"));
            }
            Some(Delivery::Rejected { error, .. }) => {
                break Err(anyhow::anyhow!("frame rejected: {error}"));
            }
            Some(_) => break Err(anyhow::anyhow!("a delivery of another handoff")),
            None => break Err(anyhow::anyhow!("the receiver stopped")),
        }
    };
    (rx, result)
}

impl Links {
    fn open(rt: &tokio::runtime::Runtime, engine: &Engine) -> anyhow::Result<Self> {
        let local = engine.descriptor().clone();
        let socket =
            std::env::temp_dir().join(format!("baton-bench-transfer-{}.sock", std::process::id()));
        rt.block_on(async {
            let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            let config = LinkConfig::default();
            let (tcp, tcp_rx) =
                TcpReceiver::bind(loopback, local.clone(), TcpConfig::default()).await?;
            let tcp_link =
                Link::connect(&Endpoint::Tcp(tcp.local_addr()), local.clone(), &config).await?;
            let (shm, shm_rx) =
                ShmReceiver::bind(&socket, local.clone(), ShmConfig::default()).await?;
            let shm_link =
                Link::connect(&Endpoint::Shm(socket.clone()), local.clone(), &config).await?;

            let listener = TcpListener::bind(loopback).await?;
            let raw_writer = TcpStream::connect(listener.local_addr()?).await?;
            let (raw_reader, _) = listener.accept().await?;
            raw_writer.set_nodelay(true)?;
            raw_reader.set_nodelay(true)?;
            Ok(Links {
                baton: [
                    BatonPair {
                        link: Arc::new(tcp_link),
                        receiver: Arc::new(tcp),
                        deliveries: Some(tcp_rx),
                    },
                    BatonPair {
                        link: Arc::new(shm_link),
                        receiver: Arc::new(shm),
                        deliveries: Some(shm_rx),
                    },
                ],
                raw_writer,
                raw_reader: Some(raw_reader),
                descriptor: local,
                next_handoff: 1,
            })
        })
    }

    fn handoff(&mut self) -> HandoffId {
        self.next_handoff += 1;
        HandoffId(self.next_handoff)
    }

    /// The same chunks over a plain stream: written here, read in exact chunk sizes into one
    /// reused buffer by a runtime task.
    fn raw_tcp(
        &mut self,
        rt: &tokio::runtime::Runtime,
        segments: &[KvSegment],
    ) -> anyhow::Result<Duration> {
        let sizes: Vec<usize> = segments.iter().map(|s| s.chunk.data.len()).collect();
        let mut reader = self.raw_reader.take().context("raw reader in use")?;
        let writer = &mut self.raw_writer;
        let (reader, took) = rt.block_on(async {
            let read = tokio::spawn(async move {
                let mut buf = vec![0u8; sizes.iter().copied().max().unwrap_or(0)];
                let mut result = Ok(());
                for n in sizes {
                    if let Err(e) = reader.read_exact(&mut buf[..n]).await {
                        result = Err(e);
                        break;
                    }
                }
                (reader, result.map(|()| Instant::now()))
            });
            let started = Instant::now();
            for s in segments {
                writer.write_all(&s.chunk.data).await?;
            }
            let (reader, done) = read.await?;
            anyhow::Ok((reader, done?.saturating_duration_since(started)))
        })?;
        self.raw_reader = Some(reader);
        Ok(took)
    }

    /// `segments` (of an `n`-token sequence) through baton transport `which`, sent from here,
    /// consumed by a runtime task.
    fn baton(
        &mut self,
        rt: &tokio::runtime::Runtime,
        which: usize,
        n: usize,
        segments: &mut [KvSegment],
    ) -> anyhow::Result<Duration> {
        let handoff = self.handoff();
        for s in segments.iter_mut() {
            s.handoff = handoff;
        }
        let expected: u64 = segments.iter().map(|s| s.chunk.data.len() as u64).sum();
        let pair = &mut self.baton[which];
        pair.receiver.expect(
            handoff,
            Expectation::whole_sequence(&self.descriptor, n as u32),
        )?;
        let rx = pair.deliveries.take().context("deliveries in use")?;
        let link = pair.link.clone();
        let (rx, took) = rt.block_on(async {
            let consumer = tokio::spawn(consume(rx, pair.receiver.clone(), handoff));
            let started = Instant::now();
            for s in segments.iter() {
                if let Err(e) = link.send(s).await {
                    // The handoff will never complete: the consumer would wait forever.
                    consumer.abort();
                    return Err(e.into());
                }
            }
            let (rx, consumed) = consumer.await?;
            let consumed = consumed?;
            ensure!(
                consumed.bytes == expected,
                "{} B delivered, {expected} sent",
                consumed.bytes
            );
            anyhow::Ok((rx, consumed.done.saturating_duration_since(started)))
        })?;
        pair.deliveries = Some(rx);
        Ok(took)
    }

    /// Prefills `prompt` with each step's layers sent over transport `which` as they are
    /// computed, through a bounded channel into `send_all` as the prefill worker does.
    fn push(
        &mut self,
        rt: &tokio::runtime::Runtime,
        which: usize,
        engine: &mut Engine,
        prompt: &[u32],
        segment_queue: usize,
    ) -> anyhow::Result<PushTiming> {
        let handoff = self.handoff();
        let pair = &mut self.baton[which];
        pair.receiver.expect(
            handoff,
            Expectation::whole_sequence(&self.descriptor, prompt.len() as u32),
        )?;
        let rx = pair.deliveries.take().context("deliveries in use")?;
        let consumer = rt.spawn(consume(rx, pair.receiver.clone(), handoff));
        let (tx, segments) = mpsc::channel::<KvSegment>(segment_queue);
        let link = pair.link.clone();
        let send = rt.spawn(async move { send_all(&link, segments).await });

        let seq = SeqId(3);
        engine.add_sequence(seq, prompt.to_vec())?;
        let kv_heads = engine.descriptor().kv_heads.clone();
        let chunk = engine.config().prefill_chunk_tokens;
        let started = Instant::now();
        let mut broken = false;
        let computed = (|| -> anyhow::Result<()> {
            while engine.computed(seq)? < prompt.len() {
                let tokens = chunk.min(prompt.len() - engine.computed(seq)?);
                engine.step_with_export(
                    &[StepItem {
                        seq,
                        tokens,
                        phase: Phase::Prefill,
                    }],
                    &[seq],
                    &mut |_, chunk| {
                        let segment = KvSegment {
                            handoff,
                            kv_heads: kv_heads.clone(),
                            chunk,
                        };
                        if !broken && tx.blocking_send(segment).is_err() {
                            broken = true;
                        }
                        Ok(())
                    },
                )?;
            }
            Ok(())
        })();
        let compute_end = Instant::now();
        drop(tx);
        engine.release(seq);
        let sent = rt.block_on(send)?;
        if computed.is_err() || sent.is_err() || broken {
            // The handoff will never complete: the consumer would wait forever.
            consumer.abort();
            pair.receiver.cancel(handoff);
            computed?;
            sent?;
            bail!("the transport stopped taking kv");
        }
        let report = sent?;
        let (rx, consumed) = rt.block_on(consumer)?;
        pair.deliveries = Some(rx);
        let consumed = consumed?;
        ensure!(
            consumed.bytes == report.bytes,
            "{} B delivered, {} sent",
            consumed.bytes,
            report.bytes
        );
        let signed = |a: Instant, b: Instant| match a.checked_duration_since(b) {
            Some(d) => d.as_secs_f64(),
            None => -b.duration_since(a).as_secs_f64(),
        };
        Ok(PushTiming {
            compute: compute_end.duration_since(started).as_secs_f64(),
            last_delivery_after_compute: signed(consumed.done, compute_end),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(v: &[f64]) -> Vec<Duration> {
        v.iter().copied().map(Duration::from_secs_f64).collect()
    }

    #[test]
    fn paired_ratio_is_baseline_time_over_transport_time_per_repeat() {
        // Repeat 2's baseline ran during a burst (4 s): its pair carries that, not the others.
        let baseline = secs(&[1.0, 2.0, 4.0, 3.0]);
        let transport = secs(&[2.0, 2.0, 2.0, 6.0]);
        assert_eq!(
            paired_ratios(&baseline, &transport),
            vec![0.5, 1.0, 2.0, 0.5]
        );
    }

    #[test]
    fn spread_interpolates_quartiles_like_numpy() {
        // Sorted: 0.5 0.5 1.0 2.0. Median (1.0 + 0.5) / 2; p25 at rank 0.75 between 0.5 and 0.5;
        // p75 at rank 2.25: 1.0 + 0.25 x (2.0 - 1.0).
        let s = Spread::of(&[0.5, 1.0, 2.0, 0.5]);
        assert_eq!(
            s,
            Spread {
                median: 0.75,
                p25: 0.5,
                p75: 1.25,
                min: 0.5,
                max: 2.0,
            }
        );
        // Odd count: the middle value; p25 at rank 1.0, p75 at rank 3.0 exactly.
        let s = Spread::of(&[0.9, 0.7, 1.1, 0.8, 1.0]);
        assert_eq!((s.median, s.p25, s.p75), (0.9, 0.8, 1.0));
        assert_eq!((s.min, s.max), (0.7, 1.1));
    }
}
