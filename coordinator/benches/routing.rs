//! The coordinator's routing step (`coordinator/src/placement.rs`) for a cluster of 64
//! registered workers under KV-aware routing: decide disaggregated or aggregated, pick the
//! prefill worker with the least work ahead of the prompt (its uncached part plus what is
//! queued) and the decode worker caching the longest prefix among those about as busy.
//!
//!     cargo bench -p baton-coordinator --bench routing
//!
//! The candidates are a snapshot of worker load, as `Registry::{prefill,decode}_candidates`
//! builds before every request; building that snapshot (two short `Vec`s read from per-worker
//! atomics and mutexes) is not in these figures. Loads are random but fixed by the seed; a tenth
//! of the workers are unhealthy and some decode workers lack room, so the filters do work.

use std::hint::black_box;

use baton_coordinator::PdMode;
use baton_coordinator::routing::{
    Candidate, LinkCost, Routing, choose_decode, choose_prefill, decide,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};

const NEEDED_BLOCKS: u32 = 33;
const MIN_DISAGGREGATED_TOKENS: usize = 32;

fn candidates(n: usize, rng: &mut impl Rng) -> Vec<Candidate> {
    (0..n)
        .map(|_| Candidate {
            healthy: rng.random_range(0..10) != 0,
            queued: rng.random_range(0..16),
            placed: rng.random_range(0..4),
            placed_tokens: rng.random_range(0..4096),
            free_blocks: rng.random_range(0..4096),
            needed_blocks: NEEDED_BLOCKS,
            cached_tokens: rng.random_range(0..32) * 16,
            cached_blocks: rng.random_range(0..32),
        })
        .collect()
}

/// One request's routing: what `generate::start` computes before calling any worker.
fn route(
    prefill: &[Candidate],
    decode: &[Candidate],
    prompt_tokens: usize,
) -> (Option<usize>, Option<usize>) {
    let p = choose_prefill(prefill, prompt_tokens as u32, Routing::Kv);
    let mode = decide(
        PdMode::Auto,
        prompt_tokens,
        MIN_DISAGGREGATED_TOKENS,
        p.is_some(),
        LinkCost::default(),
    );
    black_box(mode.ok());
    (p, choose_decode(decode, Routing::Kv))
}

fn routing(c: &mut Criterion) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(64);
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    for (name, n_prefill, n_decode) in [
        ("64_workers_32_prefill_32_decode", 32, 32),
        ("64_workers_8_prefill_56_decode", 8, 56),
        ("64_decode_workers_aggregated", 0, 64),
    ] {
        let prefill = candidates(n_prefill, &mut rng);
        let decode = candidates(n_decode, &mut rng);
        group.bench_function(name, |b| {
            b.iter(|| route(black_box(&prefill), black_box(&decode), black_box(512)))
        });
    }
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
