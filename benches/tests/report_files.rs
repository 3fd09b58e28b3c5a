//! The files a benchmark writes: results.json with every sample, and SVG charts that render
//! without system fonts (text is left to the viewer).

use std::num::NonZeroUsize;
use std::time::Duration;

use baton_bench::report::{BenchConfig, PromptSource, Report};
use baton_bench::{
    Arrivals, Bounds, LengthDist, Load, Measured, RunResult, Sample, Slo, Synthetic,
    TokenCountSource, chart, summarize,
};

fn run(rate: f64, scale: f64) -> RunResult {
    let samples: Vec<Sample> = (0..20)
        .map(|i| {
            let ttft = scale * (0.05 + 0.01 * f64::from(i));
            Sample {
                index: i as usize,
                scheduled_s: f64::from(i) / rate,
                sent_s: f64::from(i) / rate,
                prompt_tokens: Some(128),
                max_tokens: 16,
                measured: Measured {
                    ttft_s: Some(ttft),
                    e2e_s: ttft + 15.0 * 0.02 * scale,
                    itl_s: vec![0.02 * scale; 15],
                    output_tokens: 16,
                    output_tokens_from: TokenCountSource::Usage,
                    server_prompt_tokens: Some(129),
                    error: None,
                    text: String::new(),
                },
            }
        })
        .collect();
    let load = Load {
        arrivals: Arrivals::poisson(rate).expect("rate"),
        max_concurrency: None,
    };
    let slo: Slo = "ttft=200ms".parse().expect("slo");
    RunResult {
        label: load.label(),
        load,
        summary: summarize(&samples, 20, Duration::from_secs_f64(20.0 / rate), &slo),
        samples,
    }
}

#[test]
fn results_json_and_charts_are_written() {
    let dir = std::env::temp_dir().join(format!("baton-bench-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let runs = vec![run(1.0, 1.0), run(2.0, 1.5), run(4.0, 3.0)];

    let cdf = dir.join("latency_cdf.svg");
    chart::latency_cdfs(&runs, &cdf).expect("cdf chart");
    let svg = std::fs::read_to_string(&cdf).expect("read");
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    for text in [
        "TTFT CDF",
        "TPOT CDF",
        "E2E latency CDF",
        "rate 1/s",
        "rate 4/s",
    ] {
        assert!(svg.contains(text), "{text} missing from the CDF chart");
    }

    let sweep = dir.join("sweep.svg");
    assert!(chart::sweep(&runs, &sweep).expect("sweep chart"));
    let svg = std::fs::read_to_string(&sweep).expect("read");
    for text in [
        "request throughput",
        "goodput",
        "p99 TPOT and ITL",
        "request rate (req/s)",
    ] {
        assert!(svg.contains(text), "{text} missing from the sweep chart");
    }
    assert!(
        !chart::sweep(&runs[..1], &dir.join("none.svg")).expect("one run"),
        "one run is not a sweep"
    );

    let closed: Vec<RunResult> = [1, 8]
        .into_iter()
        .map(|c| {
            let mut r = run(1.0, 1.0);
            r.load = Load::closed_loop(NonZeroUsize::new(c).expect("c"));
            r
        })
        .collect();
    let (axis, xs) = chart::sweep_axis(&closed).expect("concurrency sweep");
    assert_eq!((axis, xs), ("concurrency", vec![1.0, 8.0]));

    let report = Report {
        config: BenchConfig {
            command: "baton bench serve --rate 1,2,4".into(),
            api: "openai".into(),
            endpoint: "http://127.0.0.1:8080".into(),
            model: "m".into(),
            prompts: PromptSource::Synthetic {
                spec: Synthetic {
                    input: LengthDist::Fixed { len: 128 },
                    output: LengthDist::Fixed { len: 16 },
                    shared_prefix_len: 0,
                },
                tokenizer: "m.gguf".into(),
            },
            bounds: Bounds {
                max_requests: 20,
                max_duration: Duration::from_secs(600),
            },
            timeout_s: 600.0,
            seed: 0,
            slo: "ttft=200ms".parse().expect("slo"),
            ignore_eos: true,
            extra_body: None,
            loads: runs.iter().map(|r| r.load).collect(),
            machine: "test".into(),
            started_unix_s: 0,
        },
        runs,
    };
    let json = dir.join("results.json");
    report.write_json(&json).expect("write");
    let back: Report =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read")).expect("parse");
    assert_eq!(back.runs.len(), 3);
    assert_eq!(back.runs[2].samples.len(), 20);
    assert_eq!(
        back.runs[0].summary.good,
        Some(16),
        "ttft 50..240 ms, 16 within 200 ms"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn line_panels_draw_every_panel_and_line_and_refuse_nothing_to_draw() {
    let dir = std::env::temp_dir().join(format!("baton-bench-panels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let line = |name: &str, k: f64| {
        (
            name.to_string(),
            vec![(0.1, k), (0.2, 2.0 * k), (0.4, 5.0 * k)],
        )
    };
    let panels: Vec<chart::LinePanel> = ["TPOT p99", "TTFT p99", "goodput"]
        .iter()
        .map(|title| chart::LinePanel {
            title: (*title).to_string(),
            unit: "ms".into(),
            lines: vec![line("pinned", 1.0), line("colocated", 3.0)],
        })
        .collect();
    let path = dir.join("panels.svg");
    chart::line_panels(&panels, "long prompts (req/s)", &path).expect("draw");
    let svg = std::fs::read_to_string(&path).expect("read");
    assert!(svg.starts_with("<svg"));
    for text in [
        "TPOT p99",
        "TTFT p99",
        "goodput",
        "pinned",
        "colocated",
        "long prompts (req/s)",
    ] {
        assert!(svg.contains(text), "{text} missing from the chart");
    }
    assert!(chart::line_panels(&[], "x", &dir.join("empty.svg")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
