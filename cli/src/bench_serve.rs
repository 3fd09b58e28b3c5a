//! `baton bench serve`: the load generator (crate `baton-bench`) against a running server: any
//! OpenAI-compatible `/v1/completions` (baton's coordinator, llama.cpp's server, vLLM) or
//! baton's gRPC API. This file only turns flags into the library's types and writes the output.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use baton_bench::prompts::{self, DatasetEntry};
use baton_bench::report::{self, BenchConfig, PromptSource, Report};
use baton_bench::run::{prompt_rng, run_sweep};
use baton_bench::{
    Arrivals, Bounds, Conversations, GrpcTarget, LengthDist, Load, OpenAiTarget, RequestSpec,
    RunOptions, RunResult, Slo, Synthetic, Target, conversations, run_conversations,
};

/// Which API the benchmark drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// POST {endpoint}/v1/completions, streaming (server-sent events).
    Openai,
    /// baton.v1.Inference/Generate.
    Grpc,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The server: http://HOST:PORT for openai (a trailing /v1 is fine), HOST:PORT for grpc.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    endpoint: String,
    #[arg(long, value_enum, default_value = "openai")]
    api: Api,
    /// Model name to ask for (default: the first the server lists).
    #[arg(long)]
    model: Option<String>,
    /// Mean request rate in req/s (`inf`: all at once); several (comma list or repeated flag)
    /// run one after another as a sweep.
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Most requests in flight. Without --rate: a closed loop at this concurrency. Several run
    /// as a sweep.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<NonZeroUsize>,
    /// Gamma shape of the arrival intervals: 1 is Poisson, below 1 burstier (needs --rate).
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Requests per run, at most (default 100; with --conversations the turns decide).
    #[arg(long)]
    num_requests: Option<usize>,
    /// Multi-turn chat: this many conversations, each --turns turns; turn k's prompt is the
    /// --shared-prefix-len system prompt, the earlier messages and the server's own answers,
    /// then a new --input-len message; --output-len is each answer's max_tokens. --rate and
    /// --concurrency then schedule conversations (each a closed loop of turns).
    #[arg(long)]
    conversations: Option<usize>,
    /// Turns per conversation (with --conversations).
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Mean pause between an answer and the next message (exponential; with --conversations).
    #[arg(long, default_value = "0s", value_parser = duration)]
    think_time: Duration,
    /// Time limit per run: no request is sent after it (600s, 10min, 1500ms; a bare number is
    /// seconds).
    #[arg(long, default_value = "600s", value_parser = duration)]
    duration: Duration,
    /// Prompt tokens per request: N, A..B (uniform) or M~S (normal).
    #[arg(long, default_value = "128")]
    input_len: LengthDist,
    /// max_tokens per request: N, A..B (uniform) or M~S (normal).
    #[arg(long, default_value = "128")]
    output_len: LengthDist,
    /// Prompts from a JSONL file instead (`prompt`, optional `max_tokens` per line).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Tokens of a system prompt every request starts with.
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: u32,
    /// Model file or directory whose tokenizer builds the prompts (default: the development
    /// model). Use the served model's, so prompt lengths are what the server sees.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Seed of the prompts and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Objectives for goodput, e.g. ttft=500ms,tpot=50ms,e2e=10s.
    #[arg(long)]
    slo: Option<Slo>,
    /// Longest a request may take before it counts as a timeout.
    #[arg(long, default_value = "600s", value_parser = duration)]
    timeout: Duration,
    /// Ask for exactly max_tokens tokens (ignore end-of-sequence).
    #[arg(long)]
    ignore_eos: bool,
    /// A JSON object whose keys are added to every OpenAI request body (and override the
    /// generator's own), e.g. '{"logit_bias":{"2":-100}}' for a server without ignore_eos.
    #[arg(long, value_parser = json_object)]
    extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// API key sent as `Authorization: Bearer` (gRPC: `authorization` metadata); default
    /// `$BATON_API_KEY` when set.
    #[arg(long)]
    api_key: Option<String>,
    /// Write results.json and, in a build with the `charts` feature, the charts
    /// (latency_cdf.svg, sweep.svg) into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
}

/// Requests per run without --num-requests.
const DEFAULT_REQUESTS: usize = 100;

/// `--extra-body`: a JSON object, nothing else.
fn json_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("must be a JSON object, not {other}")),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// A time limit: `600s`, `1500ms`, `10min`, or a bare number of seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let secs = if let Ok(x) = t.parse::<f64>() {
        x
    } else if let Some(m) = t.strip_suffix("min") {
        m.trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} is not a duration"))?
            * 60.0
    } else {
        return baton_bench::metrics::parse_duration(t);
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// The loads to run, in order: each rate (crossed with each concurrency cap), or each
/// closed-loop concurrency.
fn loads(args: &ServeArgs) -> anyhow::Result<Vec<Load>> {
    if args.rate.is_empty() {
        if args.concurrency.is_empty() {
            bail!("give --rate R (requests per second) or --concurrency N (a closed loop)");
        }
        if args.burstiness != 1.0 {
            bail!("--burstiness shapes --rate arrivals; give a --rate too");
        }
        return Ok(args
            .concurrency
            .iter()
            .map(|c| Load::closed_loop(*c))
            .collect());
    }
    let caps: Vec<Option<NonZeroUsize>> = if args.concurrency.is_empty() {
        vec![None]
    } else {
        args.concurrency.iter().copied().map(Some).collect()
    };
    let mut out = Vec::new();
    for &rate in &args.rate {
        let arrivals = Arrivals::gamma(rate, args.burstiness)?;
        for &max_concurrency in &caps {
            out.push(Load {
                arrivals,
                max_concurrency,
            });
        }
    }
    Ok(out)
}

pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

/// The requests of every run, and how they were made.
fn requests(args: &ServeArgs) -> anyhow::Result<(Vec<RequestSpec>, PromptSource)> {
    let mut rng = prompt_rng(args.seed);
    let n = args.num_requests.unwrap_or(DEFAULT_REQUESTS);
    if let Some(path) = &args.dataset {
        let entries: Vec<DatasetEntry> = prompts::load_jsonl(path)?;
        let tokenizer = match (&args.tokenizer, args.shared_prefix_len) {
            (None, 0) => None,
            (given, _) => Some(load_tokenizer(given.clone())?.1),
        };
        let prefix = match &tokenizer {
            Some(t) => prompts::shared_prefix(t, args.shared_prefix_len, &mut rng)?,
            None => String::new(),
        };
        let requests = prompts::from_dataset(
            &entries,
            n,
            &args.output_len,
            &prefix,
            tokenizer.as_ref(),
            &mut rng,
        )?;
        let source = PromptSource::Dataset {
            path: path.display().to_string(),
            output: args.output_len,
            shared_prefix_len: args.shared_prefix_len,
        };
        return Ok((requests, source));
    }
    let (path, tokenizer) = load_tokenizer(args.tokenizer.clone())?;
    let spec = Synthetic {
        input: args.input_len,
        output: args.output_len,
        shared_prefix_len: args.shared_prefix_len,
    };
    let requests = prompts::synthetic(&tokenizer, &spec, n, &mut rng)?;
    let source = PromptSource::Synthetic {
        spec,
        tokenizer: path.display().to_string(),
    };
    Ok((requests, source))
}

fn load_tokenizer(path: Option<PathBuf>) -> anyhow::Result<(PathBuf, baton_text::Tokenizer)> {
    let path = crate::model_path::resolve(path)?;
    let tokenizer = baton_text::Tokenizer::load(&path)
        .with_context(|| format!("tokenizer of {}", path.display()))?;
    Ok((path, tokenizer))
}

/// What a run sends: independent requests, or conversations whose turns follow the answers.
enum Workload {
    Requests(Vec<RequestSpec>),
    Conversations {
        codec: Arc<baton_text::Tokenizer>,
        system: String,
        scripts: Vec<conversations::Script>,
    },
}

/// The workload the flags describe, and how it was made.
fn workload(args: &ServeArgs) -> anyhow::Result<(Workload, PromptSource)> {
    let Some(users) = args.conversations else {
        let (requests, source) = requests(args)?;
        return Ok((Workload::Requests(requests), source));
    };
    if args.dataset.is_some() {
        bail!("--conversations synthesizes its messages; it does not take --dataset");
    }
    if args.num_requests.is_some() {
        bail!("--conversations sends --turns requests per conversation; drop --num-requests");
    }
    let (path, tokenizer) = load_tokenizer(args.tokenizer.clone())?;
    let spec = Conversations {
        users,
        turns: args.turns,
        system_len: args.shared_prefix_len,
        message: args.input_len,
        answer: args.output_len,
        think_s: args.think_time.as_secs_f64(),
    };
    let (system, scripts) = conversations::scripts(&tokenizer, &spec, &mut prompt_rng(args.seed))?;
    let source = PromptSource::Conversations {
        spec,
        tokenizer: path.display().to_string(),
    };
    Ok((
        Workload::Conversations {
            codec: Arc::new(tokenizer),
            system,
            scripts,
        },
        source,
    ))
}

/// Runs `workload` at each load in turn.
async fn measure<T: Target>(
    target: T,
    workload: &Workload,
    loads: &[Load],
    options: &RunOptions,
) -> Vec<RunResult> {
    let target = Arc::new(target);
    match workload {
        Workload::Requests(requests) => run_sweep(target, requests, loads, options).await,
        Workload::Conversations {
            codec,
            system,
            scripts,
        } => {
            let mut out = Vec::with_capacity(loads.len());
            for load in loads {
                out.push(
                    run_conversations(
                        target.clone(),
                        codec.clone(),
                        system,
                        scripts,
                        load,
                        options,
                    )
                    .await,
                );
            }
            out
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let loads = loads(&args)?;
    if args.num_requests == Some(0) {
        bail!("--num-requests must be at least 1");
    }
    if args.extra_body.is_some() && matches!(args.api, Api::Grpc) {
        bail!("--extra-body is for --api openai (the gRPC request has no free-form body)");
    }
    let (workload, prompt_source) = workload(&args)?;
    let options = RunOptions {
        bounds: Bounds {
            max_requests: match args.conversations {
                Some(users) => users * args.turns,
                None => args.num_requests.unwrap_or(DEFAULT_REQUESTS),
            },
            max_duration: args.duration,
        },
        timeout: args.timeout,
        slo: args.slo.unwrap_or_default(),
        seed: args.seed,
        progress: !args.no_progress,
    };
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("BATON_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let (model, runs) = rt.block_on(async {
        match args.api {
            Api::Openai => {
                let model = match &args.model {
                    Some(m) => m.clone(),
                    None => OpenAiTarget::served_model(&args.endpoint, api_key.as_deref()).await?,
                };
                let target = OpenAiTarget::new(&args.endpoint, model.clone(), args.ignore_eos)?
                    .with_extra_body(args.extra_body.clone().unwrap_or_default())
                    .with_api_key(api_key.clone());
                let runs = measure(target, &workload, &loads, &options).await;
                anyhow::Ok((model, runs))
            }
            Api::Grpc => {
                let target = GrpcTarget::new(
                    &args.endpoint,
                    args.model.clone().unwrap_or_default(),
                    args.ignore_eos,
                )?
                .with_api_key(api_key.as_deref())?;
                let model = match &args.model {
                    Some(m) => m.clone(),
                    None => target.served_model().await.with_context(|| {
                        format!(
                            "asking {} for its model (is it a baton gRPC endpoint?)",
                            args.endpoint
                        )
                    })?,
                };
                let runs = measure(target, &workload, &loads, &options).await;
                anyhow::Ok((model, runs))
            }
        }
    })?;

    let config = BenchConfig {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        api: match args.api {
            Api::Openai => "openai",
            Api::Grpc => "grpc",
        }
        .into(),
        endpoint: args.endpoint.clone(),
        model,
        prompts: prompt_source,
        bounds: options.bounds,
        timeout_s: args.timeout.as_secs_f64(),
        seed: args.seed,
        slo: options.slo,
        ignore_eos: args.ignore_eos,
        extra_body: args.extra_body.clone().map(serde_json::Value::Object),
        loads,
        machine: machine(),
        started_unix_s,
    };
    println!(
        "baton bench serve: {} {} (model {}), {}",
        config.api, config.endpoint, config.model, config.machine
    );
    println!(
        "{}",
        prompts_line(&config.prompts, args.ignore_eos, args.seed)
    );
    if let Some(extra) = &config.extra_body {
        println!("extra request body: {extra}");
    }
    if !options.slo.is_empty() {
        println!("SLO: {}", slo_line(&options.slo));
    }
    println!();
    print!("{}", report::table(&runs));
    let report = Report { config, runs };
    if let Some(dir) = &args.out {
        write_outputs(&report, dir)?;
    }
    Ok(())
}

fn prompts_line(source: &PromptSource, ignore_eos: bool, seed: u64) -> String {
    let eos = if ignore_eos { ", ignore_eos" } else { "" };
    match source {
        PromptSource::Synthetic { spec, tokenizer } => format!(
            "prompts: synthetic, input {} + shared prefix {} tokens, output {} tokens{eos}, seed {seed} (tokenizer {})",
            spec.input,
            spec.shared_prefix_len,
            spec.output,
            Path::new(tokenizer)
                .file_name()
                .map_or_else(|| tokenizer.clone(), |n| n.to_string_lossy().into_owned())
        ),
        PromptSource::Conversations { spec, tokenizer } => format!(
            "prompts: {} conversations x {} turns, system prompt {} tokens, messages {} tokens, \
             answers {} tokens{eos}, think time {:.1} s, seed {seed} (tokenizer {})",
            spec.users,
            spec.turns,
            spec.system_len,
            spec.message,
            spec.answer,
            spec.think_s,
            Path::new(tokenizer)
                .file_name()
                .map_or_else(|| tokenizer.clone(), |n| n.to_string_lossy().into_owned())
        ),
        PromptSource::Dataset {
            path,
            output,
            shared_prefix_len,
        } => format!(
            "prompts: {path} (shared prefix {shared_prefix_len} tokens, output {output} where unset){eos}"
        ),
    }
}

fn slo_line(slo: &Slo) -> String {
    [("ttft", slo.ttft), ("tpot", slo.tpot), ("e2e", slo.e2e)]
        .iter()
        .filter_map(|(n, d)| d.map(|d| format!("{n} <= {:.0} ms", d.as_secs_f64() * 1e3)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// latency_cdf.svg, and sweep.svg for a sweep.
#[cfg(feature = "charts")]
fn charts(report: &Report, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    use baton_bench::chart;
    let cdf = dir.join("latency_cdf.svg");
    chart::latency_cdfs(&report.runs, &cdf)?;
    written.push(cdf);
    let sweep = dir.join("sweep.svg");
    if chart::sweep(&report.runs, &sweep)? {
        written.push(sweep);
    }
    Ok(())
}

/// The serving binary links no plotting: it says so instead of writing the charts.
#[cfg(not(feature = "charts"))]
fn charts(_: &Report, _: &Path, _: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    eprintln!(
        "charts (latency_cdf.svg, sweep.svg) left out: this build has no plotting; build with \
         `--features charts` to write them"
    );
    Ok(())
}

fn write_outputs(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("results.json");
    report.write_json(&json)?;
    let mut written = vec![json];
    charts(report, dir, &mut written)?;
    println!();
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
