//! What a benchmark leaves behind: a plain-text table (one column per run), and
//! `results.json` with the configuration, each run's summary and every raw sample.
//!
//! The table's latencies are in milliseconds, as vLLM prints them; the JSON keeps samples in
//! seconds and summaries in milliseconds (field names say which).

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arrivals::{Bounds, Load};
use crate::error::{Error, Result};
use crate::metrics::{Distribution, Slo};
use crate::prompts::{LengthDist, Synthetic};
use crate::run::RunResult;

/// Where prompts came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum PromptSource {
    /// Synthesized from the tokenizer at `tokenizer`.
    Synthetic {
        #[serde(flatten)]
        spec: Synthetic,
        tokenizer: String,
    },
    /// Multi-turn conversations synthesized from the tokenizer at `tokenizer`
    /// ([`crate::conversations`]).
    Conversations {
        #[serde(flatten)]
        spec: crate::conversations::Conversations,
        tokenizer: String,
    },
    /// Read from a JSONL file.
    Dataset {
        path: String,
        /// `max_tokens` for lines without one.
        output: LengthDist,
        shared_prefix_len: u32,
    },
}

/// Everything that determines a benchmark's numbers, kept with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// The command line that ran it.
    pub command: String,
    /// `openai` or `grpc`.
    pub api: String,
    pub endpoint: String,
    pub model: String,
    pub prompts: PromptSource,
    pub bounds: Bounds,
    /// Per-request timeout, seconds.
    pub timeout_s: f64,
    pub seed: u64,
    pub slo: Slo,
    pub ignore_eos: bool,
    /// Keys added to every OpenAI request body (`--extra-body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_body: Option<serde_json::Value>,
    /// The loads run, in order.
    pub loads: Vec<Load>,
    /// CPU model and core count of the machine that ran the load generator.
    pub machine: String,
    /// Seconds since the Unix epoch when the benchmark started.
    pub started_unix_s: u64,
}

/// The contents of `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub config: BenchConfig,
    pub runs: Vec<RunResult>,
}

impl Report {
    /// Writes the report as pretty JSON.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// The summary table: a row per metric, a column per run.
pub fn table(runs: &[RunResult]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&RunResult) -> String| {
        rows.push((name.to_string(), runs.iter().map(f).collect()));
    };
    row("requests ok / sent / planned", &|r| {
        let s = &r.summary;
        format!("{} / {} / {}", s.completed, s.sent, s.planned)
    });
    row("failed", &|r| r.summary.failed.to_string());
    row("duration (s)", &|r| format!("{:.2}", r.summary.duration_s));
    row("input tokens (total)", &|r| {
        r.summary.total_input_tokens.to_string()
    });
    row("output tokens (total)", &|r| {
        r.summary.total_output_tokens.to_string()
    });
    row("request throughput (req/s)", &|r| {
        format!("{:.3}", r.summary.request_throughput)
    });
    row("output throughput (tok/s)", &|r| {
        format!("{:.2}", r.summary.output_throughput)
    });
    row("total throughput (tok/s)", &|r| {
        format!("{:.2}", r.summary.total_token_throughput)
    });
    if runs.iter().any(|r| r.summary.goodput.is_some()) {
        row("goodput (req/s)", &|r| match r.summary.goodput {
            Some(g) => format!("{g:.3}"),
            None => "-".into(),
        });
    }
    type Pick = fn(&RunResult) -> &Distribution;
    let metrics: [(&str, Pick); 4] = [
        ("TTFT", |r| &r.summary.ttft),
        ("TPOT", |r| &r.summary.tpot),
        ("ITL", |r| &r.summary.itl),
        ("E2E", |r| &r.summary.e2e),
    ];
    type Stat = fn(&Distribution) -> f64;
    for (name, pick) in metrics {
        let stats: [(&str, Stat); 4] = [
            ("mean", |d| d.mean_ms),
            ("p50", |d| d.median_ms),
            ("p90", |d| d.p90_ms),
            ("p99", |d| d.p99_ms),
        ];
        for (stat, value) in stats {
            row(&format!("{name} {stat} (ms)"), &|r| {
                let d = pick(r);
                if d.count == 0 {
                    "-".into()
                } else {
                    format!("{:.2}", value(d))
                }
            });
        }
    }

    let name_width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let widths: Vec<usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            rows.iter()
                .map(|(_, cells)| cells[i].len())
                .chain([r.label.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:name_width$}", "");
    for (r, w) in runs.iter().zip(&widths) {
        let _ = write!(out, "  {:>w$}", r.label);
    }
    out.push('\n');
    for (name, cells) in &rows {
        let _ = write!(out, "{name:name_width$}");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        out.push('\n');
    }
    for r in runs {
        if !r.summary.errors.is_empty() {
            let kinds: Vec<String> = r
                .summary
                .errors
                .iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect();
            let _ = writeln!(out, "errors ({}): {}", r.label, kinds.join(", "));
        }
        if r.summary.output_tokens_from_chunks > 0 {
            let _ = writeln!(
                out,
                "note ({}): {} completed requests had no usage report; their output tokens are \
                 counted from chunks",
                r.label, r.summary.output_tokens_from_chunks
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::summarize;
    use crate::sample::{ErrorKind, Measured, RequestError, Sample, TokenCountSource};
    use std::num::NonZeroUsize;
    use std::time::Duration;

    fn run() -> RunResult {
        let ok = Sample {
            index: 0,
            scheduled_s: 0.0,
            sent_s: 0.0,
            prompt_tokens: Some(8),
            max_tokens: 4,
            measured: Measured {
                ttft_s: Some(0.25),
                e2e_s: 1.0,
                itl_s: vec![0.25, 0.25, 0.25],
                output_tokens: 4,
                output_tokens_from: TokenCountSource::Chunks,
                server_prompt_tokens: None,
                error: None,
                text: String::new(),
            },
        };
        let mut bad = ok.clone();
        bad.index = 1;
        bad.measured.error = Some(RequestError::new(ErrorKind::Timeout, "late"));
        let samples = vec![ok, bad];
        let load = Load::closed_loop(NonZeroUsize::new(2).expect("2"));
        RunResult {
            label: load.label(),
            load,
            summary: summarize(&samples, 2, Duration::from_secs(2), &Slo::default()),
            samples,
        }
    }

    #[test]
    fn table_has_a_column_per_run_and_lists_errors_and_fallbacks() {
        let t = table(&[run()]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].trim_start().starts_with("concurrency 2"), "{t}");
        let row = |name: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(name))
                .map(|l| l[name.len()..].trim().to_string())
        };
        assert_eq!(
            row("requests ok / sent / planned").as_deref(),
            Some("1 / 2 / 2")
        );
        assert_eq!(row("TTFT p50 (ms)").as_deref(), Some("250.00"));
        assert_eq!(row("E2E p99 (ms)").as_deref(), Some("1000.00"));
        assert!(t.contains("errors (concurrency 2): timeout x1"), "{t}");
        assert!(t.contains("counted from chunks"), "{t}");
        let widths: std::collections::BTreeSet<usize> = lines
            .iter()
            .take_while(|l| !l.starts_with("errors"))
            .map(|l| l.len())
            .collect();
        assert_eq!(widths.len(), 1, "aligned columns:\n{t}");
    }

    #[test]
    fn report_json_round_trips() {
        let report = Report {
            config: BenchConfig {
                command: "baton bench serve".into(),
                api: "openai".into(),
                endpoint: "http://127.0.0.1:8080".into(),
                model: "m".into(),
                prompts: PromptSource::Synthetic {
                    spec: Synthetic {
                        input: LengthDist::Fixed { len: 8 },
                        output: LengthDist::Uniform { min: 1, max: 4 },
                        shared_prefix_len: 0,
                    },
                    tokenizer: "t.gguf".into(),
                },
                bounds: Bounds {
                    max_requests: 2,
                    max_duration: Duration::from_secs(60),
                },
                timeout_s: 30.0,
                seed: 0,
                slo: "ttft=500ms".parse().expect("slo"),
                ignore_eos: true,
                extra_body: None,
                loads: vec![run().load],
                machine: "test".into(),
                started_unix_s: 0,
            },
            runs: vec![run()],
        };
        let text = serde_json::to_string(&report).expect("json");
        let back: Report = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, report);
        let v: serde_json::Value = serde_json::from_str(&text).expect("value");
        assert_eq!(v["runs"][0]["samples"][1]["error"]["kind"], "timeout");
        assert_eq!(v["config"]["slo"]["ttft"], 500.0);
    }
}
