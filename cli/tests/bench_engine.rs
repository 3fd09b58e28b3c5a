//! `baton bench engine`: the JSON report carries every figure the table prints, and bad flags
//! are refused before any measuring. Short runs (4 decode steps, batch 1 and 8, no llama.cpp):
//! this checks the command, not the speed, which BENCHMARKS.md records.

mod common;

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["bench", "engine"])
        .args(args)
        .output()
        .expect("run baton bench engine")
}

fn positive(report: &Value, key: &str) -> f64 {
    let v = report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing from {report}"));
    assert!(v > 0.0, "{key} = {v}");
    v
}

#[test]
fn json_report_has_every_figure() {
    let model = common::model();
    let out = bench(&[
        "--model",
        &model,
        "--json",
        "--baseline",
        "none",
        "--repeats",
        "1",
        "--decode-tokens",
        "4",
        "--batch-sizes",
        "1,8",
        "--paired-rounds",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench engine failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for key in [
        "prefill_128_tok_s",
        "prefill_512_tok_s",
        "decode_tok_s",
        "load_s",
        "batch8_over_single",
        "rss_mib",
        "peak_rss_mib",
    ] {
        positive(&report, key);
    }
    for b in ["1", "8"] {
        positive(&report["aggregate_decode_tok_s"], b);
    }
    assert_eq!(
        report["decode_tok_s"], report["aggregate_decode_tok_s"]["1"],
        "the single stream is batch 1"
    );
    positive(&report["batch8_over_single_paired"], "median");
    assert_eq!(report["cpu_kernels"], "baton");
    assert!(
        report.get("llama_cpp").is_none(),
        "--baseline none measures no baseline: {report}"
    );
}

#[test]
fn bad_flags_are_refused_before_measuring() {
    for (args, named) in [
        (&["--batch-sizes", "1,0"][..], "--batch-sizes"),
        (&["--repeats", "0"][..], "--repeats"),
        (&["--decode-tokens", "0"][..], "--decode-tokens"),
        (&["--baseline", "vllm"][..], "--baseline"),
        (&["--cpu-kernels", "avx"][..], "--cpu-kernels"),
    ] {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} measured something");
    }
}
