//! Batching is invisible: sequences that join a running batch at different steps produce,
//! greedy, exactly the tokens each produces alone.

mod common;

use std::collections::HashMap;

use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::sampling::SamplingParams;
use baton_engine::{Engine, EngineConfig, Kernels, KvDType, Role, SeqId};
use common::{PROMPTS, dev_model_path};

const NEW_TOKENS: u32 = 20;

fn batcher(kv_dtype: KvDType, kernels: Kernels) -> Batcher {
    let mut cfg = EngineConfig::new(dev_model_path(), Role::Colocated);
    cfg.kv_dtype = kv_dtype;
    cfg.cpu_kernels = kernels;
    // Small chunks so the long prompts are prefilled over several steps beside running decodes.
    cfg.prefill_chunk_tokens = 32;
    cfg.max_batch_tokens = 128;
    cfg.kv_cache_bytes = 96 << 20;
    Batcher::new(Engine::load(cfg).expect("engine loads"), vec![2])
}

/// Eight prompts of 5 to ~150 tokens, built from the fixed prompts.
fn prompts() -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    for (i, p) in PROMPTS.iter().enumerate() {
        let mut long = Vec::new();
        for j in 0..=i + 1 {
            long.extend_from_slice(PROMPTS[(i + j) % PROMPTS.len()]);
        }
        long.extend_from_slice(p);
        out.push(long);
    }
    out
}

fn request(i: usize, prompt: &[u32]) -> GenerateRequest {
    GenerateRequest {
        id: SeqId(i as u64),
        prompt: prompt.to_vec(),
        params: SamplingParams {
            max_new_tokens: NEW_TOKENS,
            ignore_eos: true,
            ..SamplingParams::default()
        },
    }
}

fn collect(events: Vec<Event>, out: &mut HashMap<SeqId, Vec<u32>>) {
    for e in events {
        match e {
            Event::Token { seq, token, .. } => out.entry(seq).or_default().push(token.id),
            Event::Failed { seq, error } => panic!("{seq} failed: {error}"),
        }
    }
}

#[test]
fn sequences_joining_a_running_batch_match_running_alone() {
    joining_matches_alone(KvDType::F32, Kernels::Baton);
}

/// The f16 cache takes the same paged decode kernel, widening K and V as it reads them.
#[test]
fn with_an_f16_cache_too() {
    joining_matches_alone(KvDType::F16, Kernels::Baton);
}

/// candle's kernels, the path a GPU takes: decode rows share candle's matmuls, and attention
/// runs per sequence on K and V gathered from the blocks (f16 here, widened as it is gathered).
#[test]
fn with_candle_kernels_batched_sequences_match_alone() {
    joining_matches_alone(KvDType::F16, Kernels::Candle);
}

fn joining_matches_alone(kv_dtype: KvDType, kernels: Kernels) {
    let prompts = prompts();
    let mut b = batcher(kv_dtype, kernels);
    let mut alone = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        b.submit(request(i, p)).expect("submit");
        while !b.is_idle() {
            collect(b.step().expect("step"), &mut alone);
        }
    }
    assert_eq!(b.engine().free_blocks(), b.engine().total_blocks());

    // Sequence i joins at step 3 * i, while the earlier ones are mid-prefill or decoding.
    let mut together = HashMap::new();
    let mut step = 0;
    let mut next = 0;
    let mut max_running = 0;
    while next < prompts.len() || !b.is_idle() {
        while next < prompts.len() && step >= 3 * next {
            b.submit(request(next, &prompts[next])).expect("submit");
            next += 1;
        }
        collect(b.step().expect("step"), &mut together);
        max_running = max_running.max(b.num_running());
        step += 1;
    }
    assert!(
        max_running >= 4,
        "the batch never held more than {max_running} sequences"
    );
    for i in 0..prompts.len() {
        let id = SeqId(i as u64);
        assert_eq!(together[&id].len(), NEW_TOKENS as usize);
        assert_eq!(
            together[&id], alone[&id],
            "{kv_dtype:?} cache, {kernels:?} kernels: sequence {i} changed when batched"
        );
    }
    assert_eq!(b.engine().free_blocks(), b.engine().total_blocks());
    assert_eq!(b.stats().preemptions, 0);
}

#[test]
fn cancelled_and_failed_sequences_return_every_block() {
    let mut b = batcher(KvDType::F32, Kernels::Baton);
    let prompts = prompts();
    for (i, p) in prompts.iter().enumerate() {
        b.submit(request(i, p)).expect("submit");
    }
    for _ in 0..6 {
        b.step().expect("step");
    }
    assert!(b.engine().free_blocks() < b.engine().total_blocks());
    // Cancel some mid-prefill or mid-decode, let the rest finish.
    assert!(b.cancel(SeqId(1)));
    assert!(b.cancel(SeqId(6)));
    assert!(!b.cancel(SeqId(99)));
    let mut out = HashMap::new();
    while !b.is_idle() {
        collect(b.step().expect("step"), &mut out);
    }
    assert!(!out.contains_key(&SeqId(6)) || out[&SeqId(6)].len() < NEW_TOKENS as usize);
    assert_eq!(b.engine().free_blocks(), b.engine().total_blocks());
    assert_eq!(b.engine().num_sequences(), 0);
}
