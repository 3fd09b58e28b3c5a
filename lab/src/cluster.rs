//! `baton-lab handoff` and `baton-lab overhead`: what disaggregation and the coordinator add
//! to a real request, each against its baseline measured in the same invocation.
//!
//! ```text
//! handoff:  client --Generate(pd_mode)--> coordinator[transport, shape] x4 --> prefill-0, decode-0
//!           baseline: the same prompt with pd_mode = off, prefilled by decode-0 itself (colocated)
//! overhead: client --Generate--> coordinator --Decode--> decode-0
//!           baseline: client --Decode--> decode-0, the same tokens and sampling, alternated
//! ```
//!
//! The workers are real `baton prefill` / `baton decode` processes started with `baton up`'s
//! spawning code ([`baton::up::spawn`]). The handoff benchmark runs one coordinator per
//! (transport, shape) against the same two workers, so every configuration and the aggregated
//! baseline share one pair of engines and are interleaved request by request: drift on a shared
//! machine falls on all of them alike. Prompts are token ids (no tokenizer on the timed path) of
//! exactly the asked length, a different rotation of English text per request so no two
//! requests share a prefix. Summaries and pairing are pure functions, tested below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_bench::metrics::percentile;
use baton_proto::v1::{
    self, decode_worker_client::DecodeWorkerClient, inference_client::InferenceClient,
};
use serde::Serialize;
use tonic::transport::Channel;

use baton::up::{Children, spawn};

/// How long the coordinators may take to see their workers healthy.
const READY_LIMIT: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct HandoffArgs {
    /// A .gguf file or a Hugging Face model directory (default: $BATON_MODEL, else the
    /// development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt lengths in tokens (each must leave room for --max-tokens in the context).
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8190")]
    lengths: Vec<usize>,
    /// Requests per configuration and prompt length.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Requests per configuration for prompts of 4096 tokens or more (each prefill takes tens
    /// of seconds on a small CPU).
    #[arg(long, default_value_t = 2)]
    long_repeats: usize,
    /// Tokens generated per request (at least 2: a pull handoff moves the KV only when the
    /// decode worker decodes, which shows in the second token).
    #[arg(long, default_value_t = 2)]
    max_tokens: u32,
    /// Transports to measure: tcp, shm.
    #[arg(long, value_delimiter = ',', default_value = "tcp,shm")]
    transports: Vec<String>,
    /// Handoff shapes to measure: push, pull.
    #[arg(long, value_delimiter = ',', default_value = "push,pull")]
    shapes: Vec<String>,
    /// KV pool of each worker, MiB (a pull handoff of 8k tokens holds 377 MB on each side).
    #[arg(long, default_value_t = 1024)]
    kv_cache_mib: u32,
    /// Print one JSON object (every request, and the summary) instead of the table.
    #[arg(long)]
    json: bool,
    /// Another `baton` executable (an earlier build) measured in the same run: its own two
    /// workers and coordinators, each request sent to both builds back to back, so a
    /// before/after comparison shares the machine's moment. Its rows are labeled `before`.
    #[arg(long)]
    compare_exe: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct OverheadArgs {
    /// A .gguf file or a Hugging Face model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Measured pairs (one request through the coordinator, one straight to the decode worker).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Unmeasured pairs first (connections, allocator, caches).
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 16)]
    prompt_tokens: usize,
    /// Tokens generated per request (greedy, EOS ignored).
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// Pin the worker to these CPUs (comma list). With the benchmark itself started on the
    /// other CPUs (`taskset -c 1 baton-lab overhead --worker-cpus 0`), the coordinator (which
    /// inherits the benchmark's CPUs) and the client never wait for a core the engine's threads
    /// are spinning on. Default: unpinned.
    #[arg(long, value_delimiter = ',', value_parser = baton::up::cpu_number)]
    worker_cpus: Vec<usize>,
    /// The decode worker both paths call: `engine`, a real `baton decode` process; or
    /// `constant`, a stand-in in this process that answers every request at once with the
    /// prompt's tokens replayed, so the paired difference is the coordinator's own cost without
    /// the engine's request-to-request variation (see `standin.rs`).
    #[arg(long, value_enum, default_value_t = OverheadWorker::Engine)]
    worker: OverheadWorker,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverheadWorker {
    Engine,
    Constant,
}

/// One timed request, client side.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timed {
    pub ttft_s: f64,
    /// When the second token arrived (a pull handoff's transfer lands here); 0 with one token.
    pub second_s: f64,
    pub e2e_s: f64,
    pub tokens: Vec<u32>,
    pub placement: PlacementSeen,
}

/// What the coordinator reported about where the request ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlacementSeen {
    pub mode: String,
    pub kv_bytes: u64,
    pub kv_bytes_received: u64,
    pub transfer_s: f64,
    pub exposed_s: f64,
}

/// Median, min and max of some seconds, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Spread {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub fn of_secs(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(&min_ms), Some(&max_ms)) => Spread {
                median_ms: percentile(&v, 50.0),
                min_ms,
                max_ms,
            },
            _ => Spread::default(),
        }
    }
}

/// Percentiles of some seconds, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Tail {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Tail {
    pub fn of_secs(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let Some(&max_ms) = v.last() else {
            return Tail::default();
        };
        Tail {
            count: v.len(),
            mean_ms: v.iter().sum::<f64>() / v.len() as f64,
            p50_ms: percentile(&v, 50.0),
            p90_ms: percentile(&v, 90.0),
            p99_ms: percentile(&v, 99.0),
            max_ms,
        }
    }
}

/// `a[i] - b[i]` for each pair: the time the measured path adds to its own baseline request.
pub fn paired_differences(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// Whether pair `i` sends its coordinator request first: alternating the order keeps a steady
/// drift (a warming cache, a neighbour starting up) from always favouring one path.
pub fn coordinator_first(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// `len` token ids: `base` cycled from `offset`, so every request's prompt is real text of
/// exactly `len` tokens and two offsets share no prefix.
pub fn synthetic_prompt(base: &[u32], len: usize, offset: usize) -> Vec<u32> {
    if base.is_empty() {
        return Vec::new();
    }
    base.iter()
        .copied()
        .cycle()
        .skip(offset % base.len())
        .take(len)
        .collect()
}

/// Requests per configuration for a prompt of `len` tokens.
pub fn repeats_for(len: usize, repeats: usize, long_repeats: usize) -> usize {
    if len >= 4096 { long_repeats } else { repeats }.max(1)
}

fn tokenizer(model: &Path) -> anyhow::Result<baton_text::Tokenizer> {
    baton_text::Tokenizer::load(model)
        .with_context(|| format!("load the tokenizer of {}", model.display()))
}

fn base_tokens(tokenizer: &baton_text::Tokenizer) -> anyhow::Result<Vec<u32>> {
    let text = "The quick brown fox jumps over the lazy dog while the river runs past an old \
                mill, and the miller counts the sacks of grain that the farmers brought in. ";
    let ids = tokenizer.encode(&text.repeat(8), false)?;
    if ids.is_empty() {
        bail!("the tokenizer made no tokens of English text");
    }
    Ok(ids)
}

fn greedy(max_tokens: u32) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Default::default()
    }
}

/// Quiet children: their per-request log lines would interleave with the table.
fn quiet(role: &str) -> [String; 2] {
    ["--set".into(), format!("{role}.telemetry.log_filter=warn")]
}

fn worker_args(role: &str, name: &str, model: &Path, kv_cache_mib: u32) -> Vec<String> {
    let mut args: Vec<String> = vec![
        role.into(),
        "--model".into(),
        model.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--worker-id".into(),
        name.into(),
        "--kv-cache-mib".into(),
        kv_cache_mib.to_string(),
        "--no-metrics".into(),
    ];
    args.extend(quiet(role));
    args
}

fn coordinator_args(
    model: &Path,
    prefill: Option<SocketAddr>,
    decode: SocketAddr,
    shape: &str,
    transport: &str,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--model".into(),
        model.display().to_string(),
        "--grpc".into(),
        "127.0.0.1:0".into(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--decode-worker".into(),
        decode.to_string(),
        "--handoff".into(),
        shape.into(),
        "--transport".into(),
        transport.into(),
    ];
    if let Some(p) = prefill {
        args.extend(["--prefill-worker".into(), p.to_string()]);
    }
    args.extend(quiet("coordinator"));
    args
}

fn children() -> Children {
    Children {
        procs: Vec::new(),
        grace: Duration::from_secs(10),
    }
}

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?.connect_lazy())
}

/// Waits until the coordinator reports `workers` workers, all healthy.
async fn wait_ready(client: &mut InferenceClient<Channel>, workers: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    loop {
        interval.tick().await;
        if let Ok(status) = client.cluster_status(v1::ClusterStatusRequest {}).await {
            let status = status.into_inner();
            if status.workers.len() == workers && status.workers.iter().all(|w| w.healthy) {
                return Ok(());
            }
        }
        if started.elapsed() > READY_LIMIT {
            bail!(
                "the coordinator did not see its {workers} workers healthy within {READY_LIMIT:?}"
            );
        }
    }
}

/// Accumulates one stream's tokens and times.
struct Clock {
    started: Instant,
    timed: Timed,
}

impl Clock {
    fn start() -> Self {
        Clock {
            started: Instant::now(),
            timed: Timed::default(),
        }
    }

    fn tokens(&mut self, ids: impl IntoIterator<Item = u32>) {
        let now = self.started.elapsed().as_secs_f64();
        for id in ids {
            self.timed.tokens.push(id);
            match self.timed.tokens.len() {
                1 => self.timed.ttft_s = now,
                2 => self.timed.second_s = now,
                _ => {}
            }
        }
    }

    fn finish(mut self) -> Timed {
        self.timed.e2e_s = self.started.elapsed().as_secs_f64();
        self.timed
    }
}

async fn via_coordinator(
    client: &mut InferenceClient<Channel>,
    prompt: &[u32],
    sampling: v1::SamplingParams,
    pd_mode: v1::PdMode,
) -> anyhow::Result<Timed> {
    let request = v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: prompt.to_vec(),
        })),
        sampling: Some(sampling),
        pd_mode: pd_mode as i32,
        ..Default::default()
    };
    let mut clock = Clock::start();
    let mut stream = client
        .generate(request)
        .await
        .map_err(|s| anyhow::anyhow!("Generate: {}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("Generate stream: {}: {}", s.code(), s.message()))?
    {
        clock.tokens(msg.token_ids.iter().copied());
        if let Some(finish) = msg.finish {
            let p = finish.placement.unwrap_or_default();
            let kv = p.kv.unwrap_or_default();
            clock.timed.placement = PlacementSeen {
                mode: p.mode,
                kv_bytes: kv.bytes,
                kv_bytes_received: p.kv_bytes_received,
                transfer_s: kv.transfer_seconds,
                exposed_s: kv.exposed_seconds,
            };
        }
    }
    Ok(clock.finish())
}

async fn direct_decode(
    client: &mut DecodeWorkerClient<Channel>,
    prompt: &[u32],
    sampling: v1::SamplingParams,
) -> anyhow::Result<Timed> {
    let request = v1::DecodeRequest {
        request_id: String::new(),
        sampling: Some(sampling),
        source: Some(v1::decode_request::Source::Prompt(v1::Prompt {
            prompt_token_ids: prompt.to_vec(),
        })),
        generated_token_ids: Vec::new(),
    };
    let mut clock = Clock::start();
    let mut stream = client
        .decode(request)
        .await
        .map_err(|s| anyhow::anyhow!("Decode: {}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| anyhow::anyhow!("Decode stream: {}: {}", s.code(), s.message()))?
    {
        clock.tokens(msg.tokens.iter().map(|t| t.token_id));
    }
    Ok(clock.finish())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    serde_json::json!({ "cpu": model, "cores": cores })
}

// ---------------------------------------------------------------------------------------------
// baton-lab handoff

/// One configuration of the handoff benchmark: the aggregated baseline, or a (transport, shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub name: String,
    /// None for the aggregated baseline.
    pub transport: Option<String>,
    pub shape: Option<String>,
}

/// The summary of one (prompt length, configuration).
#[derive(Debug, Clone, Serialize)]
pub struct HandoffRow {
    pub prompt_tokens: usize,
    pub config: String,
    pub requests: usize,
    pub ttft: Spread,
    pub second_token: Spread,
    pub kv_mb: f64,
    pub transfer: Spread,
    pub exposed: Spread,
    /// Median TTFT over the aggregated baseline's median TTFT at the same length.
    pub ttft_ratio: Option<f64>,
    /// Median TTFT minus the aggregated baseline's median TTFT, in milliseconds: what the
    /// handoff adds to time to first token.
    pub ttft_added_ms: Option<f64>,
    /// Median time to the second token over the baseline's.
    pub second_ratio: Option<f64>,
    /// Whether every request's tokens equal the baseline's for the same prompt.
    pub tokens_match: bool,
}

/// Summarizes the requests of one length: `runs[c][r]` is configuration `c`'s `r`-th request,
/// configuration 0 the baseline, and request `r` of every configuration had the same prompt.
pub fn summarize_handoff(
    prompt_tokens: usize,
    configs: &[Config],
    runs: &[Vec<Timed>],
) -> Vec<HandoffRow> {
    let secs = |ts: &[Timed], f: fn(&Timed) -> f64| ts.iter().map(f).collect::<Vec<_>>();
    let base = runs.first().map(|b| {
        (
            Spread::of_secs(&secs(b, |t| t.ttft_s)).median_ms,
            Spread::of_secs(&secs(b, |t| t.second_s)).median_ms,
        )
    });
    configs
        .iter()
        .zip(runs)
        .map(|(config, ts)| {
            let ttft = Spread::of_secs(&secs(ts, |t| t.ttft_s));
            let second_token = Spread::of_secs(&secs(ts, |t| t.second_s));
            let ratio = |ours: f64, theirs: f64| (theirs > 0.0).then_some(ours / theirs);
            let tokens_match = runs.first().is_some_and(|b| {
                b.len() == ts.len() && b.iter().zip(ts).all(|(x, y)| x.tokens == y.tokens)
            });
            HandoffRow {
                prompt_tokens,
                config: config.name.clone(),
                requests: ts.len(),
                ttft,
                second_token,
                kv_mb: ts
                    .first()
                    .map_or(0.0, |t| t.placement.kv_bytes as f64 / 1e6),
                transfer: Spread::of_secs(&secs(ts, |t| t.placement.transfer_s)),
                exposed: Spread::of_secs(&secs(ts, |t| t.placement.exposed_s)),
                ttft_ratio: base.and_then(|(b, _)| ratio(ttft.median_ms, b)),
                ttft_added_ms: base.map(|(b, _)| ttft.median_ms - b),
                second_ratio: base.and_then(|(_, b)| ratio(second_token.median_ms, b)),
                tokens_match,
            }
        })
        .collect()
}

pub fn handoff(args: HandoffArgs) -> anyhow::Result<()> {
    if args.max_tokens < 2 {
        bail!("--max-tokens must be at least 2 (a pull handoff moves the KV for the second token)");
    }
    let model = baton::model_path::resolve(args.model.clone())?;
    let base = base_tokens(&tokenizer(&model)?)?;
    let mut configs = vec![Config {
        name: "aggregated".into(),
        transport: None,
        shape: None,
    }];
    for t in &args.transports {
        for s in &args.shapes {
            if !matches!(t.as_str(), "tcp" | "shm") || !matches!(s.as_str(), "push" | "pull") {
                bail!("unknown transport {t:?} or shape {s:?} (tcp|shm, push|pull)");
            }
            configs.push(Config {
                name: format!("{t} {s}"),
                transport: Some(t.clone()),
                shape: Some(s.clone()),
            });
        }
    }

    // This build, and the one to compare with: each its own workers and coordinators.
    let mut builds = vec![("after".to_string(), baton::up::baton_exe()?, true)];
    if let Some(exe) = &args.compare_exe {
        // An earlier build's prefill worker may not take a shared-memory socket of its own.
        builds.push(("before".to_string(), exe.clone(), false));
    }
    let mut procs = children();
    let mut sockets = Vec::new();
    // coordinators[b][c - 1] serves configuration c of build b.
    let mut coordinators: Vec<Vec<SocketAddr>> = Vec::new();
    for (label, exe, prefill_shm) in &builds {
        let spawn =
            |name: &str, args: &[String], n: usize| baton::up::spawn_exe(exe, name, args, n, &[]);
        let socket = |role: &str| {
            std::env::temp_dir().join(format!(
                "baton-bench-{}-{label}-{role}.sock",
                std::process::id()
            ))
        };
        let mut decode_args = worker_args("decode", "decode-0", &model, args.kv_cache_mib);
        decode_args.extend([
            "--kv-shm-socket".into(),
            socket("decode").display().to_string(),
        ]);
        sockets.push(socket("decode"));
        let (child, decode) = spawn(&format!("{label} decode-0"), &decode_args, 1)?;
        procs.procs.push((format!("{label} decode-0"), child));
        let mut prefill_args = worker_args("prefill", "prefill-0", &model, args.kv_cache_mib);
        if *prefill_shm {
            prefill_args.extend([
                "--kv-shm-socket".into(),
                socket("prefill").display().to_string(),
            ]);
            sockets.push(socket("prefill"));
        }
        let (child, prefill) = spawn(&format!("{label} prefill-0"), &prefill_args, 1)?;
        procs.procs.push((format!("{label} prefill-0"), child));
        // One coordinator per configuration, all on the same two workers; the baseline goes
        // through the first with pd_mode = off.
        let mut ours = Vec::new();
        for config in configs.iter().skip(1) {
            let name = format!("{label} coordinator ({})", config.name);
            let (child, addrs) = spawn(
                &name,
                &coordinator_args(
                    &model,
                    Some(prefill[0]),
                    decode[0],
                    config.shape.as_deref().unwrap_or("push"),
                    config.transport.as_deref().unwrap_or("auto"),
                ),
                2,
            )?;
            procs.procs.push((name, child));
            ours.push(addrs[0]);
        }
        if ours.is_empty() {
            bail!("no configuration to measure: give --transports and --shapes");
        }
        coordinators.push(ours);
    }

    let rt = runtime()?;
    let labeled = builds.len() > 1;
    let rows = rt.block_on(async {
        // clients[b][k]: build b's coordinator k.
        let mut clients = Vec::new();
        for ours in &coordinators {
            let mut cs = Vec::new();
            for addr in ours {
                let mut c = InferenceClient::new(channel(*addr)?);
                wait_ready(&mut c, 2).await?;
                cs.push(c);
            }
            clients.push(cs);
        }
        // Config 0 (aggregated) through the first coordinator, config c through coordinator c-1.
        let client_of = |c: usize| c.saturating_sub(1);
        let mode_of = |c: usize| {
            if c == 0 {
                v1::PdMode::Off
            } else {
                v1::PdMode::Force
            }
        };
        // Warm-up: links, connections and the engines' first-call costs, unmeasured.
        let warm = synthetic_prompt(&base, 64, 0);
        for build in clients.iter_mut() {
            for c in 0..configs.len() {
                via_coordinator(
                    &mut build[client_of(c)],
                    &warm,
                    greedy(args.max_tokens),
                    mode_of(c),
                )
                .await
                .with_context(|| format!("warm-up of {}", configs[c].name))?;
            }
        }
        let mut rows = Vec::new();
        let mut raw = Vec::new();
        let mut offset = 1;
        for &len in &args.lengths {
            let repeats = repeats_for(len, args.repeats, args.long_repeats);
            // runs[b][c]: build b, configuration c.
            let mut runs: Vec<Vec<Vec<Timed>>> = vec![vec![Vec::new(); configs.len()]; builds.len()];
            for r in 0..repeats {
                let prompt = synthetic_prompt(&base, len, offset);
                offset += 1;
                for (c, config) in configs.iter().enumerate() {
                    // Both builds back to back; which goes first alternates.
                    let order: Vec<usize> = if r % 2 == 0 {
                        (0..builds.len()).collect()
                    } else {
                        (0..builds.len()).rev().collect()
                    };
                    for b in order {
                        let label = &builds[b].0;
                        let t = via_coordinator(
                            &mut clients[b][client_of(c)],
                            &prompt,
                            greedy(args.max_tokens),
                            mode_of(c),
                        )
                        .await
                        .with_context(|| format!("{len} tokens, {label} {}", config.name))?;
                        let expected = if c == 0 {
                            "aggregated"
                        } else {
                            "disaggregated"
                        };
                        if t.placement.mode != expected {
                            bail!(
                                "{label} {} ran {:?}, not {expected}",
                                config.name,
                                t.placement.mode
                            );
                        }
                        if c > 0 && t.placement.kv_bytes == 0 {
                            bail!("{label} {} reported no KV bytes moved", config.name);
                        }
                        eprintln!(
                            "{len:>5} tokens  {label:<6} {:<12} #{r}  ttft {:>9.1} ms  2nd {:>9.1} ms  kv {:>6.1} MB  transfer {:>7.1} ms  exposed {:>7.1} ms",
                            config.name,
                            t.ttft_s * 1e3,
                            t.second_s * 1e3,
                            t.placement.kv_bytes as f64 / 1e6,
                            t.placement.transfer_s * 1e3,
                            t.placement.exposed_s * 1e3,
                        );
                        raw.push(serde_json::json!({
                            "prompt_tokens": len, "build": label, "config": config.name, "repeat": r, "request": t,
                        }));
                        runs[b][c].push(t);
                    }
                }
            }
            for (b, (label, _, _)) in builds.iter().enumerate() {
                let mut these = summarize_handoff(len, &configs, &runs[b]);
                if labeled {
                    for row in &mut these {
                        row.config = format!("{label} {}", row.config);
                    }
                }
                rows.extend(these);
            }
        }
        Ok::<_, anyhow::Error>((rows, raw))
    });
    drop(procs);
    for socket in &sockets {
        let _ = std::fs::remove_file(socket);
    }
    let (rows, raw) = rows?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "model": model.display().to_string(),
                "max_tokens": args.max_tokens,
                "kv_cache_mib": args.kv_cache_mib,
                "summary": rows,
                "requests": raw,
            })
        );
        return Ok(());
    }
    print_handoff(&model, &args, &rows);
    Ok(())
}

fn print_handoff(model: &Path, args: &HandoffArgs, rows: &[HandoffRow]) {
    let m = machine();
    println!(
        "baton-lab handoff — {} ({} cores, {}), {} tokens generated per request",
        model.display(),
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        args.max_tokens
    );
    println!(
        "TTFT and 2nd token: median [min-max] ms over the requests; ratio = median / aggregated median; +TTFT = median - aggregated median (same build)"
    );
    println!(
        "{:>6} {:<19} {:>2} {:>26} {:>7} {:>9} {:>26} {:>7} {:>7} {:>10} {:>10} {:>6}",
        "prompt",
        "config",
        "n",
        "TTFT ms",
        "ratio",
        "+TTFT ms",
        "2nd token ms",
        "ratio",
        "KV MB",
        "transfer",
        "exposed",
        "same"
    );
    for r in rows {
        let spread = |s: Spread| format!("{:.0} [{:.0}-{:.0}]", s.median_ms, s.min_ms, s.max_ms);
        let ratio = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}x"));
        println!(
            "{:>6} {:<19} {:>2} {:>26} {:>7} {:>9} {:>26} {:>7} {:>7.1} {:>10.1} {:>10.1} {:>6}",
            r.prompt_tokens,
            r.config,
            r.requests,
            spread(r.ttft),
            ratio(r.ttft_ratio),
            r.ttft_added_ms.map_or("-".into(), |x| format!("{x:+.1}")),
            spread(r.second_token),
            ratio(r.second_ratio),
            r.kv_mb,
            r.transfer.median_ms,
            r.exposed.median_ms,
            if r.tokens_match { "yes" } else { "NO" }
        );
    }
    println!(
        "transfer, exposed: medians in ms as the prefill worker reports them (exposed = transfer time after its compute ended); same: tokens equal the aggregated run's"
    );
}

// ---------------------------------------------------------------------------------------------
// baton-lab overhead

/// The overhead benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct Overhead {
    pub coordinator_ttft: Tail,
    pub direct_ttft: Tail,
    pub added_ttft: Tail,
    pub coordinator_e2e: Tail,
    pub direct_e2e: Tail,
    pub added_e2e: Tail,
}

/// Summarizes pairs of (through the coordinator, straight to the decode worker).
pub fn summarize_overhead(pairs: &[(Timed, Timed)]) -> Overhead {
    let col = |f: fn(&(Timed, Timed)) -> f64| pairs.iter().map(f).collect::<Vec<_>>();
    let (ct, dt) = (col(|p| p.0.ttft_s), col(|p| p.1.ttft_s));
    let (ce, de) = (col(|p| p.0.e2e_s), col(|p| p.1.e2e_s));
    Overhead {
        coordinator_ttft: Tail::of_secs(&ct),
        direct_ttft: Tail::of_secs(&dt),
        added_ttft: Tail::of_secs(&paired_differences(&ct, &dt)),
        coordinator_e2e: Tail::of_secs(&ce),
        direct_e2e: Tail::of_secs(&de),
        added_e2e: Tail::of_secs(&paired_differences(&ce, &de)),
    }
}

pub fn overhead(args: OverheadArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.prompt_tokens == 0 || args.max_tokens == 0 {
        bail!("--requests, --prompt-tokens and --max-tokens must be positive");
    }
    let model = baton::model_path::resolve(args.model.clone())?;
    let tokenizer = tokenizer(&model)?;
    let base = base_tokens(&tokenizer)?;
    let rt = runtime()?;
    let mut procs = children();
    let decode = match args.worker {
        OverheadWorker::Engine => {
            let (child, decode) = baton::up::spawn_pinned(
                "colocated-0",
                &worker_args("decode", "colocated-0", &model, 128),
                1,
                &args.worker_cpus,
            )?;
            procs.procs.push(("colocated-0".into(), child));
            decode[0]
        }
        OverheadWorker::Constant => {
            if !args.worker_cpus.is_empty() {
                bail!(
                    "--worker-cpus pins a worker process; the constant stand-in runs in this one"
                );
            }
            rt.block_on(
                crate::standin::StandIn {
                    max_context: 2048,
                    block_size: 16,
                    eos_token_ids: tokenizer.eos_token_ids().to_vec(),
                }
                .serve(),
            )?
        }
    };
    let (child, coord) = spawn(
        "coordinator",
        &coordinator_args(&model, None, decode, "push", "auto"),
        2,
    )?;
    procs.procs.push(("coordinator".into(), child));

    let pairs = rt.block_on(async {
        let mut coordinator = InferenceClient::new(channel(coord[0])?);
        wait_ready(&mut coordinator, 1).await?;
        let mut direct = DecodeWorkerClient::new(channel(decode)?);
        let sampling = greedy(args.max_tokens);
        let mut pairs = Vec::with_capacity(args.requests);
        for i in 0..args.warmup + args.requests {
            let prompt = synthetic_prompt(&base, args.prompt_tokens, i);
            let (c, d) = if coordinator_first(i) {
                let c = via_coordinator(
                    &mut coordinator,
                    &prompt,
                    sampling.clone(),
                    v1::PdMode::Auto,
                )
                .await?;
                (
                    c,
                    direct_decode(&mut direct, &prompt, sampling.clone()).await?,
                )
            } else {
                let d = direct_decode(&mut direct, &prompt, sampling.clone()).await?;
                let c = via_coordinator(
                    &mut coordinator,
                    &prompt,
                    sampling.clone(),
                    v1::PdMode::Auto,
                )
                .await?;
                (c, d)
            };
            if c.placement.mode != "aggregated" {
                bail!("the coordinator placed a request {:?}", c.placement.mode);
            }
            if c.tokens != d.tokens {
                bail!(
                    "pair {i}: the coordinator's tokens {:?} differ from the direct call's {:?}",
                    c.tokens,
                    d.tokens
                );
            }
            if i >= args.warmup {
                pairs.push((c, d));
            }
        }
        Ok::<_, anyhow::Error>(pairs)
    });
    drop(procs);
    let pairs = pairs?;
    let o = summarize_overhead(&pairs);
    if args.json {
        let raw: Vec<_> = pairs
            .iter()
            .map(|(c, d)| {
                serde_json::json!({
                    "coordinator": {"ttft_s": c.ttft_s, "e2e_s": c.e2e_s},
                    "direct": {"ttft_s": d.ttft_s, "e2e_s": d.e2e_s},
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "machine": machine(),
                "model": model.display().to_string(),
                "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens,
                "worker_cpus": args.worker_cpus,
                "worker": args.worker,
                "summary": o,
                "pairs": raw,
            })
        );
        return Ok(());
    }
    let m = machine();
    println!(
        "baton-lab overhead — {} ({} cores, {}): {} pairs of {}-token prompts, {} tokens each, greedy",
        model.display(),
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        pairs.len(),
        args.prompt_tokens,
        args.max_tokens
    );
    if args.worker == OverheadWorker::Constant {
        println!(
            "decode worker: the constant-time stand-in (answers at once; the difference is the coordinator's own cost)"
        );
    }
    if !args.worker_cpus.is_empty() {
        println!(
            "worker pinned to CPUs {:?}; coordinator and client on {}",
            args.worker_cpus,
            std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .map(|v| format!("CPUs {}", v.trim())))
                .unwrap_or_else(|| "the CPUs this process may use".into())
        );
    }
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "ms", "mean", "p50", "p90", "p99", "max"
    );
    let row = |name: &str, t: Tail| {
        println!(
            "{name:<34} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            t.mean_ms, t.p50_ms, t.p90_ms, t.p99_ms, t.max_ms
        );
    };
    row("TTFT via coordinator", o.coordinator_ttft);
    row("TTFT direct to decode worker", o.direct_ttft);
    row("TTFT added (paired difference)", o.added_ttft);
    row("E2E via coordinator", o.coordinator_e2e);
    row("E2E direct to decode worker", o.direct_e2e);
    row("E2E added (paired difference)", o.added_e2e);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "target: added p50 <= 1 ms: TTFT {}, E2E {}; added p99 <= 3 ms: TTFT {}, E2E {}",
        verdict(o.added_ttft.p50_ms <= 1.0),
        verdict(o.added_e2e.p50_ms <= 1.0),
        verdict(o.added_ttft.p99_ms <= 3.0),
        verdict(o.added_e2e.p99_ms <= 3.0),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(ttft_s: f64, second_s: f64, tokens: &[u32]) -> Timed {
        Timed {
            ttft_s,
            second_s,
            e2e_s: second_s,
            tokens: tokens.to_vec(),
            placement: PlacementSeen::default(),
        }
    }

    #[test]
    fn synthetic_prompts_have_the_exact_length_and_differ_by_offset() {
        let base = [1, 2, 3, 4, 5];
        assert_eq!(synthetic_prompt(&base, 12, 0).len(), 12);
        assert_eq!(synthetic_prompt(&base, 7, 2), vec![3, 4, 5, 1, 2, 3, 4]);
        assert_eq!(synthetic_prompt(&base, 3, 6), vec![2, 3, 4], "offset wraps");
        assert_ne!(synthetic_prompt(&base, 8, 0), synthetic_prompt(&base, 8, 1));
        assert!(synthetic_prompt(&[], 8, 0).is_empty());
    }

    #[test]
    fn long_prompts_take_the_long_repeat_count() {
        assert_eq!(repeats_for(512, 3, 2), 3);
        assert_eq!(repeats_for(8190, 3, 2), 2);
        assert_eq!(repeats_for(8190, 3, 0), 1, "at least one request");
    }

    #[test]
    fn pairs_alternate_which_path_goes_first() {
        let firsts: Vec<bool> = (0..4).map(coordinator_first).collect();
        assert_eq!(firsts, [true, false, true, false]);
    }

    #[test]
    fn paired_differences_subtract_pair_by_pair() {
        let d = paired_differences(&[1.0, 5.0, 3.0], &[0.5, 5.5, 1.0]);
        assert_eq!(d, vec![0.5, -0.5, 2.0]);
    }

    #[test]
    fn tails_use_linear_interpolation_in_milliseconds() {
        let secs: Vec<f64> = (1..=101).map(|i| f64::from(i) / 1e3).collect();
        let t = Tail::of_secs(&secs);
        assert_eq!(t.count, 101);
        assert!((t.p50_ms - 51.0).abs() < 1e-9);
        assert!((t.p99_ms - 100.0).abs() < 1e-9);
        assert!((t.max_ms - 101.0).abs() < 1e-9);
        assert!((t.mean_ms - 51.0).abs() < 1e-9);
        assert_eq!(Tail::of_secs(&[]), Tail::default());
        let s = Spread::of_secs(&[0.003, 0.001, 0.002, 0.010]);
        assert_eq!((s.min_ms, s.max_ms), (1.0, 10.0));
        assert!((s.median_ms - 2.5).abs() < 1e-9);
    }

    #[test]
    fn overhead_summary_differences_each_pair_not_the_medians() {
        // The coordinator adds 1 ms to each pair while the direct times vary widely: the added
        // time's tail stays 1 ms, which a difference of percentiles would not show.
        let pairs: Vec<(Timed, Timed)> = [10.0, 50.0, 20.0, 90.0]
            .iter()
            .map(|ms| {
                let d = ms / 1e3;
                (timed(d + 0.001, d + 0.001, &[1]), timed(d, d, &[1]))
            })
            .collect();
        let o = summarize_overhead(&pairs);
        assert!((o.added_ttft.p50_ms - 1.0).abs() < 1e-6);
        assert!((o.added_ttft.p99_ms - 1.0).abs() < 1e-6);
        assert!((o.added_e2e.max_ms - 1.0).abs() < 1e-6);
        assert!((o.direct_ttft.max_ms - 90.0).abs() < 1e-6);
    }

    #[test]
    fn handoff_rows_are_ratios_against_the_baseline_at_the_same_length() {
        let configs = [
            Config {
                name: "aggregated".into(),
                transport: None,
                shape: None,
            },
            Config {
                name: "tcp push".into(),
                transport: Some("tcp".into()),
                shape: Some("push".into()),
            },
        ];
        let runs = vec![
            vec![timed(1.0, 1.1, &[7, 8]), timed(3.0, 3.1, &[9, 9])],
            vec![timed(1.5, 1.6, &[7, 8]), timed(2.5, 2.8, &[9, 1])],
        ];
        let rows = summarize_handoff(512, &configs, &runs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ttft_ratio, Some(1.0));
        assert!(rows[0].tokens_match);
        assert_eq!(rows[1].requests, 2);
        assert!((rows[1].ttft.median_ms - 2000.0).abs() < 1e-9);
        assert!((rows[1].ttft_ratio.unwrap_or_default() - 1.0).abs() < 1e-9);
        assert!((rows[1].second_ratio.unwrap_or_default() - 2200.0 / 2100.0).abs() < 1e-9);
        assert!(!rows[1].tokens_match, "the second request's tokens differ");
    }
}
