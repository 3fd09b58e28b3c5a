//! The prefix cache through the whole cluster: a repeated prompt and a follow-up that extends
//! an earlier one start from the prefill worker's cached blocks (disaggregated) or the decode
//! worker's (aggregated), the output equals one process's token for token, the response says
//! how many prompt tokens were cached (`usage.cached_tokens`, and OpenAI's
//! `usage.prompt_tokens_details.cached_tokens` over HTTP), and a handoff moves only the blocks
//! the decode worker does not already hold (`kv.cached_tokens`). With two workers of each
//! role, KV-aware routing sends a conversation's next turn to the workers that hold its
//! earlier turns, where load-only routing would not.

use baton_coordinator::{HandoffShape, Routing, TransportChoice};
use baton_e2e::{Coordinator, LIMIT, Workers, http_get, http_post, prompt_of, reference};
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
    // (prompt, its expected output, tokens the computing worker's cache holds for it by then,
    // pd mode, tokens the decode worker holds already so the handoff skips them)
    let mut steps = vec![
        (&first, &expected[0], 0, v1::PdMode::Force, 0),
        // The decode worker holds every full block of the first handoff but the last token's.
        (
            &first,
            &expected[0],
            cacheable(&first),
            v1::PdMode::Force,
            288,
        ),
        // The first prompt's blocks are all full but its last 12 tokens' block (whose rest the
        // decode steps wrote: not reused, `prefix_reuse = prefill`).
        (&follow_up, &expected[1], 288, v1::PdMode::Force, 288),
        // The decode worker computes this one itself, from the blocks it received for the
        // first prompt (verified imports are cached like its own prefill's).
        (&first, &expected[0], cacheable(&first), v1::PdMode::Off, 0),
    ];
    for (shape, transport, name) in [
        (HandoffShape::Push, TransportChoice::Tcp, "push/tcp"),
        (HandoffShape::Pull, TransportChoice::Shm, "pull/shm"),
    ] {
        let coordinator = Coordinator::start(&workers, shape, transport, |_| {}).await;
        for (i, (prompt, want, cached, mode, decode_cached)) in steps.iter().enumerate() {
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
                let kv = placement.kv.expect("kv stats");
                assert_eq!(
                    kv.cached_tokens, *decode_cached,
                    "{name}, step {i}: the decode worker's cached prefix"
                );
                let moved = prompt.len() as u64 - u64::from(kv.cached_tokens);
                assert_eq!(
                    placement.kv_bytes_received,
                    workers.kv_bytes_per_token * moved,
                    "{name}, step {i}: the decode worker received the blocks it lacked"
                );
                assert_eq!(
                    kv.cached_bytes,
                    workers.kv_bytes_per_token * u64::from(kv.cached_tokens)
                );
                assert_eq!(placement.routing, "kv");
                assert_eq!(
                    placement.expected_decode_cached_tokens, *decode_cached,
                    "{name}, step {i}: placement knew what the decode worker holds"
                );
            }
        }
        workers
            .await_pools_full(std::time::Duration::from_secs(5))
            .await;
        // Everything is cached on both workers from here on: the follow-up's own blocks too.
        for step in &mut steps {
            step.2 = cacheable(step.0);
            if step.3 == v1::PdMode::Force {
                step.4 = (step.0.len() as u32 - 1) / 16 * 16;
            }
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

/// Two workers of each role. A conversation's first turn ran where only the second pair was
/// known (another coordinator); a coordinator that knows both pairs then routes the next turn
/// by KV to the second pair (its prefill worker computes only the new tokens and the handoff
/// moves only the new blocks), while load-only routing sends it to the first, idle pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_turn_follows_the_cache_across_workers() {
    let turn1 = prompt_of(200, 21);
    let workers_a = Workers::start(64).await;
    let workers_b = Workers::start(64).await;
    let only_b =
        Coordinator::start(&workers_b, HandoffShape::Push, TransportChoice::Tcp, |_| {}).await;
    let (answer, _) = tokio::time::timeout(
        LIMIT,
        only_b.generate(&turn1, MAX_TOKENS, v1::PdMode::Force),
    )
    .await
    .expect("within the limit")
    .expect("turn 1");
    drop(only_b);
    let mut turn2 = turn1.clone();
    turn2.extend(&answer);
    turn2.extend(prompt_of(40, 22));
    let expected = {
        let prompts = vec![turn2.clone()];
        tokio::task::spawn_blocking(move || reference(&prompts, MAX_TOKENS))
            .await
            .expect("reference")
    };
    let both = |routing| {
        let (a, b) = (&workers_a, &workers_b);
        move |c: &mut baton_coordinator::CoordinatorConfig| {
            c.prefill_workers = vec![a.prefill.to_string(), b.prefill.to_string()];
            c.decode_workers = vec![a.decode.to_string(), b.decode.to_string()];
            c.routing = routing;
        }
    };
    for (routing, name) in [(Routing::Kv, "kv"), (Routing::Load, "load")] {
        let coordinator = Coordinator::start(
            &workers_a,
            HandoffShape::Push,
            TransportChoice::Tcp,
            both(routing),
        )
        .await;
        // The coordinator learns what each worker caches from their load reports.
        tokio::time::timeout(LIMIT, async {
            loop {
                let (_, metrics) = http_get(coordinator.http, "/metrics").await;
                let warm = metrics
                    .lines()
                    .filter(|l| l.starts_with("baton_worker_cached_blocks{"))
                    .filter(|l| !l.ends_with(" 0"))
                    .count();
                if warm >= 2 {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the coordinator saw both warm workers' caches");
        let (tokens, finish) = tokio::time::timeout(
            LIMIT,
            coordinator.generate(&turn2, MAX_TOKENS, v1::PdMode::Force),
        )
        .await
        .expect("within the limit")
        .expect("turn 2");
        assert_eq!(tokens, expected[0], "{name}: differs from one process");
        let placement = finish.placement.expect("placement");
        let usage = finish.usage.expect("usage");
        let kv = placement.kv.expect("kv stats");
        assert_eq!(placement.routing, name);
        // Turn 1's prompt: 12 full blocks before its last token's block.
        let held = (turn1.len() as u32 - 1) / 16 * 16;
        match routing {
            Routing::Kv => {
                assert_eq!(placement.expected_cached_tokens, held, "prefill expected");
                assert_eq!(usage.cached_tokens, held, "prefill reused turn 1's blocks");
                assert_eq!(placement.expected_decode_cached_tokens, held);
                assert_eq!(
                    kv.cached_tokens, held,
                    "the handoff skipped turn 1's blocks"
                );
                let moved = turn2.len() as u64 - u64::from(held);
                assert_eq!(
                    placement.kv_bytes_received,
                    workers_a.kv_bytes_per_token * moved
                );
            }
            Routing::Load => {
                assert_eq!(usage.cached_tokens, 0, "load routing went to the cold pair");
                assert_eq!(kv.cached_tokens, 0);
            }
        }
        drop(coordinator);
    }
}
