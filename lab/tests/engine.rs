//! `baton-lab engine`: the JSON report carries every figure the table prints, and bad flags
//! are refused before any measuring. Short runs (4 decode steps, batch 1 and 8, no llama.cpp):
//! this checks the command, not the speed, which BENCHMARKS.md records.

use std::process::{Command, Output};

use serde_json::Value;

fn bench(args: &[&str]) -> Output {
    bench_with_path(args, None)
}

/// With `path` first on `PATH` when given (to put a stand-in `python3` there).
fn bench_with_path(args: &[&str], path: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton-lab"));
    cmd.arg("engine").args(args);
    if let Some(dir) = path {
        let old = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![dir.to_path_buf()];
        dirs.extend(std::env::split_paths(&old));
        cmd.env("PATH", std::env::join_paths(dirs).expect("PATH"));
    }
    cmd.output().expect("run baton-lab engine")
}

/// A model path that cannot load: a refusal that names a flag instead of this file came
/// before the engine was loaded, so before anything was measured.
const NO_MODEL: &str = "/nonexistent/baton-bench-test.gguf";

/// The development model (BATON_MODEL, else fetched by scripts/fetch-model.sh).
fn model() -> String {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return p.to_string_lossy().into_owned();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/fetch-model.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("fetch model");
    assert!(out.status.success(), "fetch-model.sh failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
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
    let model = model();
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
fn bad_flags_are_refused_before_loading() {
    // The control: with good flags the run gets to the model and fails naming it.
    let out = bench(&["--model", NO_MODEL, "--baseline", "none"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(NO_MODEL),
        "{stderr}"
    );
    for (args, named) in [
        (&["--batch-sizes", "1,0"][..], "--batch-sizes"),
        (&["--repeats", "0"][..], "--repeats"),
        (&["--decode-tokens", "0"][..], "--decode-tokens"),
        (&["--baseline", "vllm"][..], "--baseline"),
        (&["--cpu-kernels", "avx"][..], "--cpu-kernels"),
    ] {
        let out = bench(&[&["--model", NO_MODEL, "--baseline", "none"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(
            !stderr.contains(NO_MODEL),
            "{args:?} got as far as the model: {stderr}"
        );
    }
}

/// Without llama-cpp-python the default baseline is refused up front, with what to install,
/// instead of after minutes of measuring baton.
#[test]
fn a_missing_llama_cpp_is_refused_before_loading() {
    let dir = std::env::temp_dir().join(format!("baton-bench-nopy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let python = dir.join("python3");
    std::fs::write(
        &python,
        "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'llama_cpp'\" >&2\nexit 1\n",
    )
    .expect("stand-in python3");
    let mut perms = std::fs::metadata(&python).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&python, perms).expect("chmod");
    let out = bench_with_path(&["--model", NO_MODEL], Some(&dir));
    std::fs::remove_dir_all(&dir).ok();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran without llama.cpp");
    assert!(
        stderr.contains("pip install llama-cpp-python") && stderr.contains("--baseline none"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(NO_MODEL),
        "got as far as the model: {stderr}"
    );
}
