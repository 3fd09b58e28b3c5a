//! Synthetic prompts from the development model's real tokenizer: each prompt encodes back to
//! the length asked for, so the server sees the stated prompt length.

use std::path::PathBuf;

use baton_bench::prompts::{TokenCodec, shared_prefix, synthetic};
use baton_bench::{LengthDist, Synthetic, run::prompt_rng};

/// The development model, fetched by `scripts/fetch-model.sh` when missing.
fn dev_model() -> PathBuf {
    if let Some(p) = std::env::var_os("BATON_MODEL") {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-model.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .expect("run scripts/fetch-model.sh");
    assert!(out.status.success(), "scripts/fetch-model.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn synthetic_prompts_share_the_prefix_and_record_their_real_lengths() {
    let tokenizer = baton_text::Tokenizer::load(&dev_model()).expect("tokenizer");
    let spec = Synthetic {
        input: LengthDist::Uniform { min: 16, max: 512 },
        output: LengthDist::Fixed { len: 32 },
        shared_prefix_len: 64,
    };
    let requests = synthetic(&tokenizer, &spec, 24, &mut prompt_rng(5)).expect("prompts");
    let prefix = shared_prefix(&tokenizer, 64, &mut prompt_rng(5)).expect("prefix");
    assert_eq!(
        TokenCodec::encode(&tokenizer, &prefix)
            .expect("encode")
            .len(),
        64
    );
    for r in &requests {
        let len = TokenCodec::encode(&tokenizer, &r.prompt)
            .expect("encode")
            .len() as u32;
        assert_eq!(
            Some(len),
            r.prompt_tokens,
            "the recorded length is the real one"
        );
        assert!((64 + 16..=64 + 512).contains(&len), "{len}");
        assert!(r.prompt.starts_with(&prefix));
        assert_eq!(r.max_tokens, 32);
    }
    let again = synthetic(&tokenizer, &spec, 24, &mut prompt_rng(5)).expect("prompts");
    assert_eq!(requests, again, "same seed, same prompts");
}

#[test]
fn fixed_lengths_are_hit_exactly() {
    let tokenizer = baton_text::Tokenizer::load(&dev_model()).expect("tokenizer");
    for len in [1, 128, 1024] {
        let spec = Synthetic {
            input: LengthDist::Fixed { len },
            output: LengthDist::Fixed { len: 8 },
            shared_prefix_len: 0,
        };
        let requests = synthetic(&tokenizer, &spec, 8, &mut prompt_rng(1)).expect("prompts");
        for r in &requests {
            assert_eq!(r.prompt_tokens, Some(len), "{:?}", &r.prompt);
        }
    }
}
