//! Exact check of the engine against candle-transformers' `quantized_llama` with every weight
//! dequantized to f32 (no activation is quantized, so float noise cannot be amplified): the
//! prefill logits agree within 1e-3 and 64 free-running greedy tokens are identical, with
//! baton's CPU kernels and with candle's (`cpu_kernels = candle`, the path a GPU takes).
//!
//! A file of its own because the reference is switched to f32 through the process-wide
//! `CANDLE_DEQUANTIZE_ALL` variable.

mod common;

use baton_engine::{Engine, EngineConfig, Kernels, Phase, Role, SeqId, WeightsSetting};
use candle_core::{Device, Tensor};
use common::{PROMPTS, argmax, dev_model_path, max_abs_diff, step_logits};

const GREEDY_TOKENS: usize = 64;

#[test]
fn gguf_dequantized_greedy_tokens_equal_candle_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    // SAFETY: set before any thread of this test binary reads the environment; this file holds
    // this one test.
    unsafe { std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1") };
    let path = dev_model_path();
    // Both kernel sets: baton's, and candle's (the path a GPU takes).
    let mut engines = [Kernels::Baton, Kernels::Candle].map(|kernels| {
        let mut cfg = EngineConfig::new(&path, Role::Colocated);
        cfg.weights = WeightsSetting::F32;
        cfg.cpu_kernels = kernels;
        cfg.kv_cache_bytes = 64 << 20;
        Engine::load(cfg).expect("engine loads")
    });

    for (i, prompt) in PROMPTS.iter().enumerate() {
        let mut file = std::fs::File::open(&path).expect("open model");
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
        let mut reference =
            ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("reference loads");
        let input = Tensor::new(*prompt, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("t");
        let ref_first = reference
            .forward(&input, 0)
            .and_then(|l| l.squeeze(0)?.to_vec1::<f32>())
            .expect("reference prefill");
        let mut ref_tokens = vec![argmax(&ref_first)];
        while ref_tokens.len() < GREEDY_TOKENS {
            let pos = prompt.len() + ref_tokens.len() - 1;
            let x = Tensor::new(&[*ref_tokens.last().expect("t")], &Device::Cpu)
                .and_then(|t| t.unsqueeze(0))
                .expect("t");
            let l = reference
                .forward(&x, pos)
                .and_then(|l| l.squeeze(0)?.to_vec1::<f32>())
                .expect("reference decode");
            ref_tokens.push(argmax(&l));
        }

        let id = SeqId(i as u64);
        for ours in &mut engines {
            let kernels = ours.config().cpu_kernels;
            ours.add_sequence(id, prompt.to_vec())
                .expect("sequence added");
            let first = step_logits(ours, id, prompt.len(), Phase::Prefill);
            let diff = max_abs_diff(&first, &ref_first);
            assert!(
                diff < 1e-3,
                "{kernels:?} kernels, prompt {i}: prefill logits differ by {diff}"
            );
            let mut tokens = vec![argmax(&first)];
            while tokens.len() < GREEDY_TOKENS {
                ours.push_token(id, *tokens.last().expect("t"))
                    .expect("push");
                tokens.push(argmax(&step_logits(ours, id, 1, Phase::Decode)));
            }
            assert_eq!(
                tokens, ref_tokens,
                "{kernels:?} kernels, prompt {i}: greedy tokens differ"
            );
            ours.release(id);
        }
    }
    for ours in &engines {
        assert_eq!(ours.free_blocks(), ours.total_blocks());
    }
}
