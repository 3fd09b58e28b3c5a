//! `baton kv-demo` end to end: the prefill side in the test's child process, the decode side in
//! the grandchild it spawns, KV over both transports in both shapes. The tokens must equal the
//! single-process run and the bytes moved must be exactly the KV of the prompt tokens the
//! decode worker did not already hold (its prefix cache keeps the first run's blocks).
//!
//! The model is the development model `baton` resolves by itself (`scripts/fetch-model.sh`'s
//! cache, or `BATON_MODEL`).

use std::process::Command;

const RUNS: [&str; 4] = ["tcp push", "tcp pull", "shm push", "shm pull"];

/// The first number after `prefix` in a line that starts with it, e.g. `kv sent 2949120 B in ...`.
fn bytes_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = line.strip_prefix(prefix)?.trim_start();
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn kv_demo_decodes_identically_over_both_transports_and_shapes() {
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "kv-demo",
            "--transport",
            "both",
            "--shape",
            "both",
            "--prompt-tokens",
            "64",
            "--max-tokens",
            "8",
        ])
        .output()
        .expect("run baton kv-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kv-demo failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );

    let matches: Vec<&str> = stdout.lines().filter(|l| l.starts_with("MATCH ")).collect();
    assert_eq!(matches.len(), 4, "four MATCH lines expected:\n{stdout}");
    for run in RUNS {
        assert!(
            matches
                .iter()
                .any(|l| l.starts_with(&format!("MATCH {run}:"))),
            "no MATCH for {run}:\n{stdout}"
        );
    }
    assert!(!stdout.contains("MISMATCH"), "{stdout}");

    // Transfer counters: each run sent and received exactly layers x kv_layer_bytes(64).
    let kv_bytes: u64 = stdout
        .lines()
        .find_map(|l| {
            let (_, total) = l.strip_prefix("kv of the prompt: ")?.split_once(" = ")?;
            bytes_after(total, "")
        })
        .expect("the prompt's kv size is printed");
    let sent: Vec<u64> = stdout
        .lines()
        .filter_map(|l| bytes_after(l, "kv sent"))
        .collect();
    let received: Vec<u64> = stdout
        .lines()
        .filter_map(|l| bytes_after(l, "kv received"))
        .collect();
    // The first run moves the whole prompt; the later ones find its full blocks but the last
    // token's (48 of 64 tokens) in the decode worker's prefix cache and move the rest.
    let cached: Vec<u64> = stdout
        .lines()
        .filter_map(|l| bytes_after(l, "kv cached"))
        .collect();
    assert_eq!(cached, vec![0, 48, 48, 48], "{stdout}");
    let expected: Vec<u64> = cached.iter().map(|c| kv_bytes / 64 * (64 - c)).collect();
    assert_eq!(sent, expected, "{stdout}");
    assert_eq!(received, expected, "{stdout}");
}
