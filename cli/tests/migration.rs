//! Streams that outlive their decode worker, with real processes: a prefill worker, two decode
//! workers and a coordinator; one decode worker is SIGKILLed while streams run on it. Every
//! stream continues on the other decode worker (`on_decode_failure = migrate`), the client sees
//! one unbroken stream whose tokens equal an undisturbed run's, the finish names the worker it
//! left, and no block stays pinned anywhere. A prefill worker killed mid-handoff: the request is
//! placed again on the other prefill worker and completes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Proc, START_LIMIT, channel, get, model, worker, worker_info};

use baton_proto::v1::{
    self, LoadRequest, decode_worker_client::DecodeWorkerClient, inference_client::InferenceClient,
    prefill_worker_client::PrefillWorkerClient,
};
use tokio::sync::mpsc;

/// Lease time the tests give handoffs.
const TTL_MS: u32 = 1500;

/// A coordinator over the workers with the tests' lease time; `addrs[0]` is its gRPC address,
/// `addrs[1]` its HTTP one.
fn coordinator(model: &str, prefill: &[SocketAddr], decode: &[SocketAddr], extra: &[&str]) -> Proc {
    let ttl = TTL_MS.to_string();
    let flags: Vec<&str> = ["--lease-ttl-ms", ttl.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    common::coordinator(model, prefill, decode, &flags)
}

/// Until the coordinator's `/ready` answers 200 (its first poll of the workers).
async fn await_ready(http: SocketAddr) {
    let started = Instant::now();
    while !matches!(get(http, "/ready"), Ok((200, _))) {
        assert!(started.elapsed() < START_LIMIT, "coordinator never ready");
        tokio::task::yield_now().await;
    }
}

/// Distinct prompts long enough to run disaggregated (over `min_disaggregated_tokens`).
fn prompts(n: usize) -> Vec<Vec<u32>> {
    const TEXT: &[u32] = &[
        6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 8718, 28, 504, 3575, 282, 4649,
        314, 19161, 253, 1890, 8216, 563, 260, 3426, 30,
    ];
    (0..n)
        .map(|i| {
            TEXT.iter()
                .copied()
                .cycle()
                .skip(i * 3)
                .take(48 + 5 * i)
                .collect()
        })
        .collect()
}

fn request(prompt: &[u32], max_tokens: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: prompt.to_vec(),
        })),
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One stream's tokens and finish; `progress` hears the count of tokens after each message.
async fn run(
    grpc: SocketAddr,
    req: v1::GenerateRequest,
    progress: Option<mpsc::UnboundedSender<usize>>,
) -> Result<(Vec<u32>, v1::GenerateFinish), tonic::Status> {
    let mut stream = InferenceClient::new(channel(grpc))
        .generate(req)
        .await?
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = stream.message().await? {
        tokens.extend(m.token_ids);
        if let Some(p) = &progress {
            let _ = p.send(tokens.len());
        }
        if let Some(f) = m.finish {
            return Ok((tokens, f));
        }
    }
    Err(tonic::Status::internal("the stream ended without a finish"))
}

async fn decode_load(addr: SocketAddr) -> v1::LoadReport {
    DecodeWorkerClient::new(channel(addr))
        .load(LoadRequest::default())
        .await
        .expect("decode load")
        .into_inner()
}

async fn prefill_load(addr: SocketAddr) -> v1::LoadReport {
    PrefillWorkerClient::new(channel(addr))
        .load(LoadRequest::default())
        .await
        .expect("prefill load")
        .into_inner()
}

/// A worker holds nothing for a request any more: no stream, no lease, every block free
/// (cached prefix blocks are idle, hence free).
fn settled(l: &v1::LoadReport) -> bool {
    l.running == 0 && l.waiting == 0 && l.leases == 0 && l.free_blocks == l.total_blocks
}

fn metric(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_continue_on_another_decode_worker_when_theirs_is_killed() {
    const STREAMS: usize = 8;
    const TOKENS: u32 = 160;
    let model = model();
    let prefill = worker("prefill", &model, &[]);
    let mut d1 = worker("decode", &model, &[]);
    let d2 = worker("decode", &model, &[]);
    let (p, a1, a2) = (prefill.addrs[0], d1.addrs[0], d2.addrs[0]);
    worker_info("prefill", p).await;
    let killed = worker_info("decode", a1).await.worker_id;
    let kept = worker_info("decode", a2).await.worker_id;
    let coordinator = coordinator(&model, &[p], &[a1, a2], &[]);
    let (grpc, http) = (coordinator.addrs[0], coordinator.addrs[1]);
    await_ready(http).await;
    let prompts = prompts(STREAMS);

    // Undisturbed, all at once: the reference.
    let undisturbed: Vec<_> = prompts
        .iter()
        .map(|pr| tokio::spawn(run(grpc, request(pr, TOKENS), None)))
        .collect();
    let mut reference = Vec::new();
    for call in undisturbed {
        reference.push(call.await.expect("task").expect("undisturbed stream").0);
    }

    // Again; d1 is killed once every stream has streamed a few tokens.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut calls = Vec::new();
    for (i, pr) in prompts.iter().enumerate() {
        let tx = tx.clone();
        let (req, progress) = (request(pr, TOKENS), mpsc::unbounded_channel());
        let (ptx, mut prx) = progress;
        tokio::spawn(async move {
            while let Some(n) = prx.recv().await {
                let _ = tx.send((i, n));
            }
        });
        calls.push(tokio::spawn(run(grpc, req, Some(ptx))));
    }
    drop(tx);
    let mut seen = [0usize; STREAMS];
    while seen.iter().any(|&n| n < 4) {
        let (i, n) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("streams progress")
            .expect("a stream reports");
        seen[i] = n;
    }
    d1.kill();
    let mut migrated = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let (tokens, finish) = tokio::time::timeout(Duration::from_secs(120), call)
            .await
            .expect("the stream ends instead of hanging")
            .expect("task")
            .unwrap_or_else(|s| panic!("stream {i} failed: {s:?}"));
        assert_eq!(
            tokens, reference[i],
            "stream {i}: one unbroken stream equal to the undisturbed run"
        );
        let usage = finish.usage.expect("usage");
        assert_eq!(usage.completion_tokens, TOKENS);
        let placement = finish.placement.expect("placement");
        if placement.decode_worker == killed {
            // It finished before the kill (its prompt came early, another's late).
            assert!(placement.migrated_from.is_empty(), "{placement:?}");
        } else {
            assert_eq!(placement.decode_worker, kept);
        }
        if !placement.migrated_from.is_empty() {
            assert_eq!(placement.migrated_from, std::slice::from_ref(&killed));
            migrated += 1;
        }
    }
    assert!(migrated > 0, "some streams ran on the killed worker");
    let (_, page) = get(http, "/metrics").expect("metrics");
    assert_eq!(
        metric(
            &page,
            "baton_stream_migrations_total",
            "outcome=\"resumed\""
        ),
        migrated as f64,
        "every migration counted"
    );
    assert_eq!(
        metric(&page, "baton_stream_migrations_total", "outcome=\"failed\""),
        0.0
    );
    eprintln!("{migrated} of {STREAMS} streams migrated");

    // Nothing stays pinned: the survivor and the prefill worker settle.
    let started = Instant::now();
    while !(settled(&decode_load(a2).await) && settled(&prefill_load(p).await)) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "blocks still held: decode {:?} prefill {:?}",
            decode_load(a2).await,
            prefill_load(p).await
        );
        tokio::task::yield_now().await;
    }
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_fails_unavailable_when_migration_is_off() {
    let model = model();
    let prefill = worker("prefill", &model, &[]);
    let mut d1 = worker("decode", &model, &[]);
    let (p, a1) = (prefill.addrs[0], d1.addrs[0]);
    worker_info("prefill", p).await;
    worker_info("decode", a1).await;
    let coordinator = coordinator(
        &model,
        &[p],
        &[a1],
        &["--set", "coordinator.on_decode_failure=fail"],
    );
    let (grpc, http) = (coordinator.addrs[0], coordinator.addrs[1]);
    await_ready(http).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let call = tokio::spawn(run(grpc, request(&prompts(1)[0], 400), Some(tx)));
    while rx.recv().await.expect("progress") < 4 {}
    d1.kill();
    let status = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the stream ends instead of hanging")
        .expect("task")
        .expect_err("the stream fails");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let (_, page) = get(http, "/metrics").expect("metrics");
    assert_eq!(
        metric(&page, "baton_stream_migrations_total", "outcome=\"off\""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_prefill_worker_dies_mid_handoff_is_placed_again() {
    let model = model();
    let mut p1 = worker("prefill", &model, &[]);
    let p2 = worker("prefill", &model, &[]);
    let decode = worker("decode", &model, &[]);
    let (a1, a2, d) = (p1.addrs[0], p2.addrs[0], decode.addrs[0]);
    worker_info("prefill", a1).await;
    worker_info("prefill", a2).await;
    worker_info("decode", d).await;
    let coordinator = coordinator(&model, &[a1, a2], &[d], &[]);
    let (grpc, http) = (coordinator.addrs[0], coordinator.addrs[1]);
    await_ready(http).await;
    // Long enough that its prefill takes a while.
    let prompt: Vec<u32> = prompts(1)[0].iter().copied().cycle().take(600).collect();
    let mut req = request(&prompt, 8);
    req.pd_mode = v1::PdMode::Force as i32;
    let call = tokio::spawn(run(grpc, req.clone(), None));
    // Whichever prefill worker took it dies while computing.
    let started = Instant::now();
    let victim = loop {
        if prefill_load(a1).await.running > 0 {
            break 1;
        }
        if prefill_load(a2).await.running > 0 {
            break 2;
        }
        assert!(started.elapsed() < START_LIMIT, "no prefill started");
        tokio::task::yield_now().await;
    };
    let survivor = if victim == 1 {
        p1.kill();
        a2
    } else {
        drop(p2);
        a1
    };
    let (tokens, finish) = tokio::time::timeout(Duration::from_secs(120), call)
        .await
        .expect("the request ends instead of hanging")
        .expect("task")
        .expect("placed again, the request completes");
    let placement = finish.placement.expect("placement");
    assert_eq!(
        placement.prefill_worker,
        worker_info("prefill", survivor).await.worker_id
    );
    // The survivor's prefix cache now holds the prompt: the reference is that worker again.
    let (again, _) = run(grpc, req, None).await.expect("reference");
    assert_eq!(tokens, again);
    let (_, page) = get(http, "/metrics").expect("metrics");
    assert_eq!(metric(&page, "baton_requests_replaced_total", ""), 1.0);
}
