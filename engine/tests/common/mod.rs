//! Shared test helpers: where the development model lives.

use std::path::PathBuf;

/// The SmolLM2-135M-Instruct GGUF: `BATON_MODEL`, or the cache `scripts/fetch-model.sh` fills.
pub fn dev_model_path() -> PathBuf {
    let path = std::env::var_os("BATON_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        let dir = std::env::var_os("BATON_MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".cache/baton/models"));
        dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(
        path.exists(),
        "development model not found at {}: run scripts/fetch-model.sh (or set BATON_MODEL)",
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
        407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 1890, 8216, 563, 260, 3426, 30, 2,
        198, 1, 520, 9531, 198,
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

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
