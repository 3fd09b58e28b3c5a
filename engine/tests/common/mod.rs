//! Shared test helpers: where the development model lives.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::PathBuf;

/// The SmolLM2-135M-Instruct GGUF: `BATON_MODEL`, or the cache `scripts/fetch-model.sh` fills
/// (run here when the file is missing; the script is safe to run from several tests at once).
pub fn dev_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(
        out.status.success(),
        "scripts/fetch-model.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.exists(),
        "fetch-model.sh printed {}, which does not exist",
        path.display()
    );
    path
}

/// Prompts tokenized with the Hugging Face tokenizer built from the GGUF's vocabulary.
pub const PROMPTS: &[&[u32]] = &[
    // "The capital of France is"
    &[504, 3575, 282, 4649, 314],
    // SmolLM2 chat template, user: "Write a short poem about the sea."
    &[
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 1890, 8216, 563, 260, 3426, 30, 2, 198,
        1, 520, 9531, 198,
    ],
    // "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    &[
        1604, 3987, 46477, 24, 94, 727, 472, 1620, 14362, 260, 304, 29, 373, 24681, 46477, 1230,
        7996, 198,
    ],
    // "Once upon a time, in a small village by the mountains, there lived"
    &[
        6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 8718, 28, 665, 4161,
    ],
];

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Top-1 minus top-2 logit: how far greedy decoding is from a tie.
pub fn margin(v: &[f32]) -> f32 {
    let best = argmax(v) as usize;
    let second = v
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best)
        .map(|(_, x)| *x)
        .fold(f32::NEG_INFINITY, f32::max);
    v[best] - second
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs one engine step of `tokens` tokens of `seq` and returns its next-token logits.
pub fn step_logits(
    engine: &mut baton_engine::Engine,
    seq: baton_engine::SeqId,
    tokens: usize,
    phase: baton_engine::Phase,
) -> Vec<f32> {
    engine
        .step(&[baton_engine::StepItem { seq, tokens, phase }])
        .expect("step")[0]
        .logits
        .clone()
        .expect("logits at the end of the sequence")
}
