//! The prefix cache through the whole cluster: a repeated prompt and a follow-up that extends
//! an earlier one start from the prefill worker's cached blocks (disaggregated) or the decode
//! worker's (aggregated), the output equals one process's token for token, the response says
//! how many prompt tokens were cached (`usage.cached_tokens`, and OpenAI's
//! `usage.prompt_tokens_details.cached_tokens` over HTTP), and the decode worker still receives
//! every block's KV in a handoff (the handoff does not yet ask what it holds).

use baton_coordinator::{HandoffShape, TransportChoice};
use baton_e2e::{Coordinator, LIMIT, Workers, http_post, prompt_of, reference};
use baton_proto::v1;

const MAX_TOKENS: u32 = 8;

/// Whole 16-token blocks before the prompt's last token, less one when that would leave fewer
/// than 4 tokens to compute (the engine's exactness margin; these prompts stay inside one
/// 512-token chunk).
fn cacheable(prompt: &[u32]) -> u32 {
    cacheable_len(prompt.len() as u64) as u32
}

fn cacheable_len(n: u64) -> u64 {
    let blocks = (n - 1) / 16 * 16;
    if n - blocks < 4 {
        blocks.saturating_sub(16)
    } else {
        blocks
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_follow_up_prompts_start_from_cached_blocks() {
    let first = prompt_of(300, 11);
    let mut follow_up = first.clone();
    follow_up.extend(prompt_of(45, 12));
    let expected = {
        let prompts = vec![first.clone(), follow_up.clone()];
        tokio::task::spawn_blocking(move || reference(&prompts, MAX_TOKENS))
            .await
            .expect("reference")
    };
    let workers = Workers::start(128).await;
    // (prompt, its expected output, tokens the cache holds for it by then, pd mode)
    let mut steps = vec![
        (&first, &expected[0], 0, v1::PdMode::Force),
        (&first, &expected[0], cacheable(&first), v1::PdMode::Force),
        // The first prompt's blocks are all full but its last 12 tokens' block.
        (&follow_up, &expected[1], 288, v1::PdMode::Force),
        // The decode worker computes this one itself, from the blocks it received for the
        // first prompt (verified imports are cached like its own prefill's).
        (&first, &expected[0], cacheable(&first), v1::PdMode::Off),
    ];
    for (shape, transport, name) in [
        (HandoffShape::Push, TransportChoice::Tcp, "push/tcp"),
        (HandoffShape::Pull, TransportChoice::Shm, "pull/shm"),
    ] {
        let coordinator = Coordinator::start(&workers, shape, transport, |_| {}).await;
        for (i, (prompt, want, cached, mode)) in steps.iter().enumerate() {
            let (tokens, finish) =
                tokio::time::timeout(LIMIT, coordinator.generate(prompt, MAX_TOKENS, *mode))
                    .await
                    .expect("within the limit")
                    .unwrap_or_else(|s| panic!("{name}, step {i}: {s}"));
            assert_eq!(&&tokens, want, "{name}, step {i}: differs from one process");
            let usage = finish.usage.expect("usage");
            assert_eq!(
                usage.cached_tokens, *cached,
                "{name}, step {i}: cached tokens"
            );
            assert_eq!(usage.prompt_tokens, prompt.len() as u32);
            let placement = finish.placement.expect("placement");
            if *mode == v1::PdMode::Force {
                let occupied = workers.kv_bytes_per_token * prompt.len() as u64;
                assert_eq!(
                    placement.kv_bytes_received, occupied,
                    "{name}, step {i}: the decode worker received every block"
                );
            }
        }
        workers
            .await_pools_full(std::time::Duration::from_secs(5))
            .await;
        // Everything is cached on both workers from here on.
        for step in &mut steps {
            step.2 = cacheable(step.0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_usage_reports_cached_prompt_tokens() {
    let workers = Workers::start(64).await;
    let coordinator =
        Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |_| {}).await;
    let body = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a careful assistant who answers in one short \
             sentence. You never use lists, you never apologise, and you always name the \
             source of any number you give. Keep every answer under twenty words."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "max_tokens": 4,
        "temperature": 0
    })
    .to_string();
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (status, text) = tokio::time::timeout(
            LIMIT,
            http_post(coordinator.http, "/v1/chat/completions", &body),
        )
        .await
        .expect("within the limit");
        assert_eq!(status, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let usage = &v["usage"];
        let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
        cached.push((
            prompt,
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("cached_tokens"),
        ));
    }
    let (prompt, _) = cached[0];
    assert_eq!(cached[0].1, 0, "nothing cached the first time");
    assert_eq!(
        cached[1].1,
        cacheable_len(prompt),
        "whole blocks the second time"
    );
}
