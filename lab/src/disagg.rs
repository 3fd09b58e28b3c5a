//! `baton-lab disagg`: the disaggregation experiment. It starts one cluster per setup with
//! `baton up` (a child process, stopped before the next setup starts), offers each the same
//! mixed workload at a sweep of rates, and compares them:
//!
//! - steady streams: a closed loop of short prompts with long outputs (the decode-bound work
//!   whose time per output token disaggregation is meant to protect);
//! - long prompts (1-2k tokens, short outputs) arriving as a Poisson process at each rate of the
//!   sweep (the prefill-bound work that, colocated, stalls the streams' decode steps).
//!
//! Setups: `pinned` (1 prefill worker on the first CPU, 1 decode worker on the second, the
//! coordinator unpinned), `pinned-threshold` (the same, with prompts under 512 tokens prefilled
//! by the decode worker), `unpinned` (the same processes, free to use every core) and
//! `colocated` (one worker doing both phases on every core). Output: a table, `disagg.json`
//! with every sample, and `disagg.svg` (TPOT p99 of the streams, TTFT p99 of the long prompts,
//! goodput and output throughput against the long-prompt rate, one line per setup).

use std::io::{BufRead, BufReader};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use baton_bench::chart::{self, LinePanel};
use baton_bench::run::prompt_rng;
use baton_bench::{
    Arrivals, Bounds, LengthDist, Load, OpenAiTarget, RunOptions, RunResult, Slo, Synthetic,
    prompts, run_load,
};
use serde::Serialize;

/// A cluster shape the experiment compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Setup {
    /// 1 prefill worker pinned to CPU 0, 1 decode worker pinned to CPU 1.
    Pinned,
    /// `pinned`, with prompts under 512 tokens prefilled by the decode worker itself
    /// (`coordinator.min_disaggregated_tokens = 512`): only long prompts go to the prefill
    /// worker, so a short prompt never waits behind a long one there.
    PinnedThreshold,
    /// 1 prefill and 1 decode worker, both free to use every core.
    Unpinned,
    /// One colocated worker (prefill and decode in one engine) on every core.
    Colocated,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Pinned => "pinned",
            Setup::PinnedThreshold => "pinned-threshold",
            Setup::Unpinned => "unpinned",
            Setup::Colocated => "colocated",
        }
    }

    /// `baton up`'s flags for this setup.
    fn up_flags(self) -> Vec<&'static str> {
        match self {
            Setup::Pinned => vec![
                "--prefill",
                "1",
                "--decode",
                "1",
                "--prefill-cpus",
                "0",
                "--decode-cpus",
                "1",
            ],
            Setup::PinnedThreshold => {
                let mut flags = Setup::Pinned.up_flags();
                flags.extend(["--set", "coordinator.min_disaggregated_tokens=512"]);
                flags
            }
            Setup::Unpinned => vec!["--prefill", "1", "--decode", "1"],
            Setup::Colocated => vec!["--colocated"],
        }
    }
}

#[derive(clap::Args)]
pub struct DisaggArgs {
    /// A .gguf file or a Hugging Face model directory (default: the development model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Setups to compare, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pinned,colocated"
    )]
    setups: Vec<Setup>,
    /// Arrival rates of the long prompts (req/s), one run each.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.15,0.2")]
    rates: Vec<f64>,
    /// Length of each run: no request is sent after it (requests in flight finish).
    #[arg(long, default_value = "60s", value_parser = baton::bench_serve::duration)]
    duration: Duration,
    /// Steady streams (closed loop) of short prompts.
    #[arg(long, default_value_t = NonZeroUsize::new(2).expect("nonzero"))]
    streams: NonZeroUsize,
    /// Prompt tokens of a stream's request.
    #[arg(long, default_value = "64")]
    short_input: LengthDist,
    /// Output tokens of a stream's request.
    #[arg(long, default_value = "256")]
    short_output: LengthDist,
    /// Prompt tokens of a long prompt.
    #[arg(long, default_value = "1024..2048")]
    long_input: LengthDist,
    /// Output tokens of a long prompt.
    #[arg(long, default_value = "16")]
    long_output: LengthDist,
    /// Objectives every request must meet to count in goodput.
    #[arg(long, default_value = "ttft=15s,tpot=60ms")]
    slo: Slo,
    /// Seed of the prompts and the arrivals.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Loopback ports the clusters' coordinator uses: HTTP on this one, gRPC on the next.
    #[arg(long, default_value_t = 18180)]
    port: u16,
    /// Write disagg.json and disagg.svg into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One run: a setup at one long-prompt rate.
#[derive(Debug, Serialize)]
struct Point {
    setup: Setup,
    long_rate: f64,
    streams: RunResult,
    long: RunResult,
    /// Requests of both kinds meeting every SLO, per second of the longer of the two runs.
    goodput: f64,
    /// Output tokens of both kinds per second of the longer of the two runs.
    output_throughput: f64,
}

impl Point {
    fn new(setup: Setup, long_rate: f64, streams: RunResult, long: RunResult) -> Self {
        let secs = streams.summary.duration_s.max(long.summary.duration_s);
        let per_sec = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let good = streams.summary.good.unwrap_or(0) + long.summary.good.unwrap_or(0);
        let tokens = streams.summary.total_output_tokens + long.summary.total_output_tokens;
        Point {
            setup,
            long_rate,
            goodput: per_sec(good as f64),
            output_throughput: per_sec(tokens as f64),
            streams,
            long,
        }
    }
}

#[derive(Serialize)]
struct Output<'a> {
    command: String,
    machine: String,
    started_unix_s: u64,
    slo: Slo,
    streams: usize,
    short: (String, String),
    long: (String, String),
    duration_s: f64,
    points: &'a [Point],
}

/// A running `baton up`, stopped (SIGTERM, then its own drain) when dropped.
struct Cluster {
    child: Child,
}

impl Cluster {
    /// Starts `baton up` for `setup` and waits for its "baton is up" line, which it prints once
    /// the coordinator reports ready.
    fn start(setup: Setup, model: &std::path::Path, port: u16) -> anyhow::Result<Self> {
        let mut child = Command::new(baton::up::baton_exe()?)
            .arg("up")
            .args(setup.up_flags())
            .arg("--model")
            .arg(model)
            .args(["--http", &format!("127.0.0.1:{port}")])
            .args(["--grpc", &format!("127.0.0.1:{}", port + 1)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start baton up")?;
        let stdout = child.stdout.take().context("baton up's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut up = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !up && line.starts_with("baton is up") {
                    up = true;
                    let _ = tx.send(());
                }
            }
        });
        let cluster = Cluster { child };
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(()) => Ok(cluster),
            Err(_) => bail!("baton up ({}) did not come up within 180 s", setup.name()),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        baton::up::signal(self.child.id(), libc::SIGTERM);
        let _ = self.child.wait();
    }
}

pub fn run(args: DisaggArgs) -> anyhow::Result<()> {
    if args.rates.is_empty() || args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("--rates must be positive request rates");
    }
    if args.setups.is_empty() {
        bail!("--setups names no setup");
    }
    let model = baton::model_path::resolve(args.model.clone())?;
    let tokenizer = baton_text::Tokenizer::load(&model)
        .with_context(|| format!("tokenizer of {}", model.display()))?;
    // Enough requests that the time limit, not the count, ends every run.
    let most = 10_000;
    let mut rng = prompt_rng(args.seed);
    let short_spec = Synthetic {
        input: args.short_input,
        output: args.short_output,
        shared_prefix_len: 0,
    };
    let long_spec = Synthetic {
        input: args.long_input,
        output: args.long_output,
        shared_prefix_len: 0,
    };
    let short = prompts::synthetic(&tokenizer, &short_spec, 64, &mut rng)?;
    let long = prompts::synthetic(&tokenizer, &long_spec, 64, &mut rng)?;
    let options = RunOptions {
        bounds: Bounds {
            max_requests: most,
            max_duration: args.duration,
        },
        timeout: Duration::from_secs(600),
        slo: args.slo,
        seed: args.seed,
        progress: false,
    };
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;

    let mut points = Vec::new();
    for &setup in &args.setups {
        eprintln!("bench disagg: starting {} cluster", setup.name());
        let _cluster = Cluster::start(setup, &model, args.port)?;
        let endpoint = format!("http://127.0.0.1:{}", args.port);
        let target = rt.block_on(async {
            let name = OpenAiTarget::served_model(&endpoint, None).await?;
            anyhow::Ok(Arc::new(OpenAiTarget::new(&endpoint, name, true)?))
        })?;
        // One request of each kind first, so no run pays for first-touch costs.
        rt.block_on(async {
            let once = Load::closed_loop(NonZeroUsize::MIN);
            let warm = RunOptions {
                bounds: Bounds {
                    max_requests: 1,
                    max_duration: Duration::from_secs(600),
                },
                slo: Slo::default(),
                ..options
            };
            run_load(target.clone(), &short, &once, &warm).await;
            run_load(target.clone(), &long, &once, &warm).await;
        });
        for &rate in &args.rates {
            eprintln!(
                "bench disagg: {}: {} streams, long prompts at {rate} req/s, {:?}",
                setup.name(),
                args.streams,
                args.duration
            );
            let streams_load = Load::closed_loop(args.streams);
            let long_load = Load {
                arrivals: Arrivals::poisson(rate)?,
                max_concurrency: None,
            };
            let (s, l) = rt.block_on(async {
                tokio::join!(
                    run_load(target.clone(), &short, &streams_load, &options),
                    run_load(target.clone(), &long, &long_load, &options),
                )
            });
            let point = Point::new(setup, rate, s, l);
            println!("{}", row(&point));
            points.push(point);
        }
    }

    println!();
    println!(
        "baton-lab disagg: {}; {} streams of {} -> {} tokens, long prompts of {} -> {} tokens, {:?} per run; SLO {}",
        baton::bench_serve::machine(),
        args.streams,
        args.short_input,
        args.short_output,
        args.long_input,
        args.long_output,
        args.duration,
        slo_text(&args.slo),
    );
    println!("{}", header());
    for p in &points {
        println!("{}", row(p));
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let output = Output {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: baton::bench_serve::machine(),
            started_unix_s,
            slo: args.slo,
            streams: args.streams.get(),
            short: (args.short_input.to_string(), args.short_output.to_string()),
            long: (args.long_input.to_string(), args.long_output.to_string()),
            duration_s: args.duration.as_secs_f64(),
            points: &points,
        };
        let json = dir.join("disagg.json");
        std::fs::write(&json, serde_json::to_vec_pretty(&output)?)
            .with_context(|| format!("write {}", json.display()))?;
        let svg = dir.join("disagg.svg");
        chart::line_panels(&panels(&args.setups, &points), "long prompts (req/s)", &svg)?;
        println!("wrote {} and {}", json.display(), svg.display());
    }
    Ok(())
}

fn slo_text(slo: &Slo) -> String {
    let mut parts = Vec::new();
    for (name, d) in [("ttft", slo.ttft), ("tpot", slo.tpot), ("e2e", slo.e2e)] {
        if let Some(d) = d {
            parts.push(format!("{name} <= {d:?}"));
        }
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn header() -> String {
    format!(
        "{:<16} {:>6} | {:>5} {:>9} {:>9} {:>9} | {:>5} {:>9} {:>9} | {:>8} {:>8} {:>6}",
        "setup",
        "rate",
        "n",
        "TPOT p50",
        "TPOT p99",
        "TTFT p99",
        "n",
        "TTFT p50",
        "TTFT p99",
        "goodput",
        "tok/s",
        "errors"
    ) + "\n"
        + &format!(
            "{:<16} {:>6} | {:^35} | {:^25} |",
            "", "req/s", "streams (ms)", "long prompts (ms)"
        )
}

fn row(p: &Point) -> String {
    let (s, l) = (&p.streams.summary, &p.long.summary);
    format!(
        "{:<16} {:>6} | {:>5} {:>9.1} {:>9.1} {:>9.0} | {:>5} {:>9.0} {:>9.0} | {:>8.3} {:>8.1} {:>6}",
        p.setup.name(),
        p.long_rate,
        s.completed,
        s.tpot.median_ms,
        s.tpot.p99_ms,
        s.ttft.p99_ms,
        l.completed,
        l.ttft.median_ms,
        l.ttft.p99_ms,
        p.goodput,
        p.output_throughput,
        s.failed + l.failed,
    )
}

/// Lines per setup over the long-prompt rate.
fn panels(setups: &[Setup], points: &[Point]) -> Vec<LinePanel> {
    let line = |f: &dyn Fn(&Point) -> f64| -> chart::Lines {
        setups
            .iter()
            .map(|setup| {
                let pts = points
                    .iter()
                    .filter(|p| p.setup == *setup)
                    .map(|p| (p.long_rate, f(p)))
                    .collect();
                (setup.name().to_string(), pts)
            })
            .collect()
    };
    vec![
        LinePanel {
            title: "streams: TPOT p99".into(),
            unit: "ms".into(),
            lines: line(&|p| p.streams.summary.tpot.p99_ms),
        },
        LinePanel {
            title: "long prompts: TTFT p99".into(),
            unit: "ms".into(),
            lines: line(&|p| p.long.summary.ttft.p99_ms),
        },
        LinePanel {
            title: "goodput (both kinds)".into(),
            unit: "req/s".into(),
            lines: line(&|p| p.goodput),
        },
        LinePanel {
            title: "output throughput (both kinds)".into(),
            unit: "tok/s".into(),
            lines: line(&|p| p.output_throughput),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_bench::{Measured, Sample, TokenCountSource, summarize};

    fn result(n: usize, output_tokens: u32, ttft_s: f64, secs: f64, slo: &Slo) -> RunResult {
        let samples: Vec<Sample> = (0..n)
            .map(|i| Sample {
                index: i,
                scheduled_s: 0.0,
                sent_s: 0.0,
                prompt_tokens: Some(64),
                max_tokens: output_tokens,
                measured: Measured {
                    ttft_s: Some(ttft_s),
                    e2e_s: ttft_s + 0.01 * f64::from(output_tokens - 1),
                    itl_s: vec![0.01; output_tokens as usize - 1],
                    output_tokens,
                    output_tokens_from: TokenCountSource::Usage,
                    server_prompt_tokens: None,
                    error: None,
                    text: String::new(),
                },
            })
            .collect();
        let load = Load::closed_loop(NonZeroUsize::MIN);
        RunResult {
            label: load.label(),
            load,
            summary: summarize(&samples, n, Duration::from_secs_f64(secs), slo),
            samples,
        }
    }

    #[test]
    fn goodput_and_throughput_count_both_kinds_over_the_longer_run() {
        let slo: Slo = "ttft=1s".parse().expect("slo");
        // 10 streams' requests all good over 10 s; 4 long prompts over 20 s, none good (TTFT 2 s).
        let streams = result(10, 100, 0.1, 10.0, &slo);
        let long = result(4, 5, 2.0, 20.0, &slo);
        let p = Point::new(Setup::Pinned, 0.2, streams, long);
        assert!((p.goodput - 10.0 / 20.0).abs() < 1e-9, "{}", p.goodput);
        assert!(
            (p.output_throughput - 1020.0 / 20.0).abs() < 1e-9,
            "{}",
            p.output_throughput
        );
    }

    #[test]
    fn panels_have_one_line_per_setup_in_rate_order() {
        let slo = Slo::default();
        let points: Vec<Point> = [
            (Setup::Pinned, 0.1),
            (Setup::Colocated, 0.1),
            (Setup::Pinned, 0.2),
        ]
        .into_iter()
        .map(|(s, r)| {
            Point::new(
                s,
                r,
                result(2, 10, 0.1, 1.0, &slo),
                result(1, 2, 1.0, 1.0, &slo),
            )
        })
        .collect();
        let panels = panels(&[Setup::Pinned, Setup::Colocated], &points);
        assert_eq!(panels.len(), 4);
        let lines = &panels[0].lines;
        assert_eq!(lines[0].0, "pinned");
        assert_eq!(
            lines[0].1.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![0.1, 0.2]
        );
        assert_eq!(lines[1].1.len(), 1);
    }

    #[test]
    fn only_the_pinned_setup_pins_and_only_colocated_has_no_prefill_worker() {
        assert!(Setup::Pinned.up_flags().contains(&"--prefill-cpus"));
        assert!(!Setup::Unpinned.up_flags().contains(&"--prefill-cpus"));
        assert_eq!(Setup::Colocated.up_flags(), vec!["--colocated"]);
    }
}
