//! The cluster's greedy output equals one process's, token for token, for prompts from 5 to
//! 1,500 tokens, in push and pull shape, over TCP and shared memory; and the KV bytes the
//! prefill worker sent and the decode worker received both equal the bytes the KV of the
//! prompt tokens the decode worker did not already hold occupies (a transfer happened; nothing
//! was silently recomputed). The first round finds nothing cached and moves every prompt's whole
//! KV; the later ones find earlier rounds' blocks in the decode worker's prefix cache and move
//! the rest.

use baton_coordinator::{HandoffShape, TransportChoice};
use baton_e2e::{Coordinator, LIMIT, Workers, prompt_of, reference};
use baton_proto::v1;

const MAX_TOKENS: u32 = 12;
const LENGTHS: [usize; 8] = [5, 37, 100, 256, 513, 800, 1024, 1500];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_output_equals_single_process_in_every_shape_and_transport() {
    let prompts: Vec<Vec<u32>> = LENGTHS
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt_of(n, i as u32))
        .collect();
    let expected = {
        let prompts = prompts.clone();
        tokio::task::spawn_blocking(move || reference(&prompts, MAX_TOKENS))
            .await
            .expect("reference")
    };
    let workers = Workers::start(128).await;
    for (round, (shape, transport, name)) in [
        (HandoffShape::Push, TransportChoice::Tcp, "push/tcp"),
        (HandoffShape::Push, TransportChoice::Shm, "push/shm"),
        (HandoffShape::Pull, TransportChoice::Tcp, "pull/tcp"),
        (HandoffShape::Pull, TransportChoice::Shm, "pull/shm"),
    ]
    .into_iter()
    .enumerate()
    {
        let coordinator = Coordinator::start(&workers, shape, transport, |_| {}).await;
        for (i, prompt) in prompts.iter().enumerate() {
            let (tokens, finish) = tokio::time::timeout(
                LIMIT,
                coordinator.generate(prompt, MAX_TOKENS, v1::PdMode::Force),
            )
            .await
            .expect("within the limit")
            .unwrap_or_else(|s| panic!("{name}, prompt {i}: {s}"));
            assert_eq!(
                tokens,
                expected[i],
                "{name}: prompt {i} ({} tokens) differs from one process",
                prompt.len()
            );
            let placement = finish.placement.expect("placement");
            assert_eq!(placement.mode, "disaggregated", "{name}, prompt {i}");
            let kv = placement.kv.expect("kv stats");
            if round == 0 {
                assert_eq!(
                    kv.cached_tokens, 0,
                    "{name}, prompt {i}: nothing cached yet"
                );
            }
            assert!(
                (kv.cached_tokens as usize) < prompt.len(),
                "{name}, prompt {i}: the last token's block always moves"
            );
            let moved = prompt.len() as u64 - u64::from(kv.cached_tokens);
            let occupied = workers.kv_bytes_per_token * moved;
            assert_eq!(
                kv.bytes, occupied,
                "{name}, prompt {i}: bytes the prefill worker sent"
            );
            assert_eq!(
                placement.kv_bytes_received, occupied,
                "{name}, prompt {i}: bytes the decode worker received"
            );
            assert_eq!(
                kv.cached_bytes,
                workers.kv_bytes_per_token * u64::from(kv.cached_tokens),
                "{name}, prompt {i}: bytes the decode worker's cache spared"
            );
            let want = match transport {
                TransportChoice::Shm => v1::Transport::Shm,
                _ => v1::Transport::Tcp,
            };
            assert_eq!(kv.transport, want as i32, "{name}, prompt {i}: transport");
        }
        workers
            .await_pools_full(std::time::Duration::from_secs(5))
            .await;
    }
}
