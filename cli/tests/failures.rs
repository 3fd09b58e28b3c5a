//! Failure paths with real worker processes (`baton prefill`, `baton decode`, `baton
//! coordinator`), killed with SIGKILL mid-handoff: nothing hangs, the survivor reports a clear
//! error, and every pinned block returns to its pool within the lease's time to live.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Proc, START_LIMIT, channel, model, worker, worker_info};

use baton_proto::v1::{
    self, LoadRequest, decode_worker_client::DecodeWorkerClient, inference_client::InferenceClient,
    prefill_worker_client::PrefillWorkerClient,
};

/// Lease time the tests give handoffs; pools must be full again within this plus a margin.
const TTL_MS: u32 = 1500;

/// A prompt long enough that its prefill takes a while on this machine.
fn long_prompt() -> Vec<u32> {
    const TEXT: &[u32] = &[
        6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 8718, 28,
    ];
    TEXT.iter().copied().cycle().take(1500).collect()
}

fn greedy(max_tokens: u32) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// Asks until `free == total` or `limit` passes; returns how long it took.
async fn await_full(
    load: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = v1::LoadReport> + Send>>,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let l = load().await;
        if l.free_blocks == l.total_blocks {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "pool not full within {limit:?}: {} of {} blocks free",
            l.free_blocks,
            l.total_blocks
        );
        tokio::task::yield_now().await;
    }
}

fn decode_load(
    addr: SocketAddr,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = v1::LoadReport> + Send>> {
    move || {
        Box::pin(async move {
            DecodeWorkerClient::new(channel(addr))
                .load(LoadRequest::default())
                .await
                .expect("decode load")
                .into_inner()
        })
    }
}

fn prefill_load(
    addr: SocketAddr,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = v1::LoadReport> + Send>> {
    move || {
        Box::pin(async move {
            PrefillWorkerClient::new(channel(addr))
                .load(LoadRequest::default())
                .await
                .expect("prefill load")
                .into_inner()
        })
    }
}

/// Waits until the prefill worker reports a prompt in progress.
async fn await_prefilling(addr: SocketAddr) {
    tokio::time::timeout(START_LIMIT, async {
        loop {
            if prefill_load(addr)().await.running > 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("prefill started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_killed_mid_push_fails_the_request_unavailable_and_the_decode_pool_refills() {
    let model = model();
    let mut prefill = worker("prefill", &model, &[]);
    let decode = worker("decode", &model, &[]);
    let (p, d) = (prefill.addrs[0], decode.addrs[0]);
    worker_info("prefill", p).await;
    worker_info("decode", d).await;
    let coordinator = Proc::start(
        &[
            "coordinator",
            "--model",
            &model,
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--prefill-worker",
            &p.to_string(),
            "--decode-worker",
            &d.to_string(),
            "--lease-ttl-ms",
            &TTL_MS.to_string(),
        ],
        2,
    );
    let mut client = InferenceClient::new(channel(coordinator.addrs[0]));
    // The coordinator needs a poll to see its workers; Tokenize answers at once, Generate may
    // briefly say UNAVAILABLE: retry that only.
    let request = v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: long_prompt(),
        })),
        sampling: Some(greedy(8)),
        pd_mode: v1::PdMode::Force as i32,
        ..Default::default()
    };
    let call = tokio::spawn(async move {
        let started = Instant::now();
        loop {
            match client.generate(request.clone()).await {
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && s.message().starts_with("no healthy") =>
                {
                    assert!(
                        started.elapsed() < START_LIMIT,
                        "coordinator never saw its workers"
                    );
                    tokio::task::yield_now().await;
                }
                other => return other.map(|r| r.into_inner()),
            }
        }
    });
    await_prefilling(p).await;
    prefill.kill();
    let result = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the request ends instead of hanging")
        .expect("task");
    let status = match result {
        Err(s) => s,
        Ok(mut stream) => stream.message().await.expect_err("the stream fails"),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let took = await_full(
        decode_load(d),
        Duration::from_millis(u64::from(TTL_MS) + 5000),
    )
    .await;
    eprintln!("decode pool full again {took:?} after the prefill worker died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_killed_mid_push_frees_the_prefill_side() {
    let model = model();
    let prefill = worker("prefill", &model, &[]);
    let mut decode = worker("decode", &model, &[]);
    let (p, d) = (prefill.addrs[0], decode.addrs[0]);
    worker_info("prefill", p).await;
    let dinfo = worker_info("decode", d).await;
    let prompt = long_prompt();
    // The decode stream's first message is the reservation; the stream stays open (holding
    // it) while the prefill worker pushes.
    let mut stream = DecodeWorkerClient::new(channel(d))
        .decode(v1::DecodeRequest {
            sampling: Some(greedy(8)),
            source: Some(v1::decode_request::Source::Push(v1::PushSource {
                handoff_id: 7,
                prompt_token_ids: prompt.clone(),
                transport: v1::Transport::Tcp as i32,
                ttl_ms: TTL_MS,
            })),
            ..Default::default()
        })
        .await
        .expect("reserve")
        .into_inner();
    let reserved = stream
        .message()
        .await
        .expect("first message")
        .and_then(|m| m.reserved)
        .expect("the reserved blocks");
    let endpoint = reserved
        .endpoints
        .iter()
        .find(|e| e.transport == v1::Transport::Tcp as i32)
        .cloned();
    let mut pc = PrefillWorkerClient::new(channel(p));
    pc.connect_peer(v1::ConnectRequest {
        endpoint,
        destination: dinfo.layout.clone(),
    })
    .await
    .expect("link");
    let call = tokio::spawn(async move {
        pc.prefill(v1::PrefillRequest {
            prompt_token_ids: prompt,
            sampling: Some(greedy(8)),
            handoff: Some(v1::prefill_request::Handoff::Push(v1::PushTarget {
                handoff_id: 7,
                destination: Some(reserved),
                transport: v1::Transport::Tcp as i32,
                ttl_ms: TTL_MS,
            })),
            ..Default::default()
        })
        .await
    });
    await_prefilling(p).await;
    decode.kill();
    let status = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("prefill ends instead of hanging")
        .expect("task")
        .expect_err("the push fails");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    drop(stream);
    await_full(
        prefill_load(p),
        Duration::from_millis(u64::from(TTL_MS) + 5000),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_killed_before_a_pull_fails_the_decode_stream_and_refills_its_pool() {
    let model = model();
    let mut prefill = worker("prefill", &model, &[]);
    let decode = worker("decode", &model, &[]);
    let (p, d) = (prefill.addrs[0], decode.addrs[0]);
    worker_info("prefill", p).await;
    worker_info("decode", d).await;
    let prompt: Vec<u32> = long_prompt()[..200].to_vec();
    let prefilled = PrefillWorkerClient::new(channel(p))
        .prefill(v1::PrefillRequest {
            prompt_token_ids: prompt.clone(),
            sampling: Some(greedy(8)),
            handoff: Some(v1::prefill_request::Handoff::Pull(v1::PullLease {
                handoff_id: 9,
                ttl_ms: TTL_MS,
            })),
            ..Default::default()
        })
        .await
        .expect("prefill")
        .into_inner();
    prefill.kill();
    let started = Instant::now();
    let decoded = DecodeWorkerClient::new(channel(d))
        .decode(v1::DecodeRequest {
            sampling: Some(greedy(8)),
            source: Some(v1::decode_request::Source::Pull(v1::PullSource {
                handoff_id: 9,
                source: prefilled.source,
                prompt_token_ids: prompt,
                transport: v1::Transport::Tcp as i32,
                ttl_ms: TTL_MS,
            })),
            ..Default::default()
        })
        .await;
    let status = match decoded {
        Err(s) => s,
        Ok(r) => {
            let mut stream = r.into_inner();
            tokio::time::timeout(
                Duration::from_millis(u64::from(TTL_MS) + 10_000),
                stream.message(),
            )
            .await
            .expect("the stream ends instead of hanging")
            .expect_err("the stream fails")
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("prefill") || status.message().contains("expired"),
        "a clear error: {status:?}"
    );
    await_full(
        decode_load(d),
        Duration::from_millis(u64::from(TTL_MS) + 5000),
    )
    .await;
    eprintln!(
        "decode failed and refilled {:?} after the prefill worker died",
        started.elapsed()
    );
}

/// Every token of a decode stream, and its finish.
async fn drain(
    mut stream: tonic::Streaming<v1::DecodeResponse>,
) -> Result<(Vec<u32>, v1::DecodeFinish), tonic::Status> {
    let mut tokens = Vec::new();
    while let Some(m) = stream.message().await? {
        tokens.extend(m.tokens.iter().map(|t| t.token_id));
        if let Some(f) = m.finish {
            return Ok((tokens, f));
        }
    }
    Err(tonic::Status::internal("no finish"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recompute_policy_continues_a_stream_whose_pull_source_died() {
    let model = model();
    let mut prefill = worker("prefill", &model, &[]);
    let decode = worker("decode", &model, &["--kv-failure-policy", "recompute"]);
    let (p, d) = (prefill.addrs[0], decode.addrs[0]);
    worker_info("prefill", p).await;
    worker_info("decode", d).await;
    let prompt: Vec<u32> = long_prompt()[..120].to_vec();
    // The decode worker alone (aggregated) gives the reference.
    let mut dc = DecodeWorkerClient::new(channel(d));
    let (reference, _) = drain(
        dc.decode(v1::DecodeRequest {
            sampling: Some(greedy(8)),
            source: Some(v1::decode_request::Source::Prompt(v1::Prompt {
                prompt_token_ids: prompt.clone(),
            })),
            ..Default::default()
        })
        .await
        .expect("aggregated decode")
        .into_inner(),
    )
    .await
    .expect("aggregated stream");

    let prefilled = PrefillWorkerClient::new(channel(p))
        .prefill(v1::PrefillRequest {
            prompt_token_ids: prompt.clone(),
            sampling: Some(greedy(8)),
            handoff: Some(v1::prefill_request::Handoff::Pull(v1::PullLease {
                handoff_id: 11,
                ttl_ms: TTL_MS,
            })),
            ..Default::default()
        })
        .await
        .expect("prefill")
        .into_inner();
    let first = prefilled.first_token.clone().expect("first token");
    assert_eq!(
        first.token_id, reference[0],
        "the prefill worker's first token"
    );
    prefill.kill();
    let stream = dc
        .decode(v1::DecodeRequest {
            sampling: Some(greedy(8)),
            source: Some(v1::decode_request::Source::Pull(v1::PullSource {
                handoff_id: 11,
                source: prefilled.source,
                prompt_token_ids: prompt,
                transport: v1::Transport::Tcp as i32,
                ttl_ms: TTL_MS,
            })),
            ..Default::default()
        })
        .await
        .expect("decode accepted")
        .into_inner();
    let (tokens, finish) = tokio::time::timeout(Duration::from_secs(60), drain(stream))
        .await
        .expect("the stream ends")
        .expect("recompute keeps the stream alive");
    assert_eq!(
        tokens,
        reference[1..],
        "recomputed stream equals the intact one"
    );
    assert_eq!(
        finish.kv.map_or(0, |k| k.bytes),
        0,
        "no kv was imported: the prompt was recomputed"
    );
    await_full(decode_load(d), Duration::from_secs(5)).await;
}

/// A decode pool that cannot be allocated as shared memory (here: a file-size limit the memfd's
/// size passes, as a memory-limited or sealed environment refuses shared memory) falls back to
/// private memory, says so in its log and in `baton_kv_pool_shared`, and still takes handoffs
/// over its shared-memory socket: the prefill worker writes through the socket instead of
/// mapping the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_be_shared_falls_back_to_private_memory_and_says_so() {
    let model = model();
    let dir = std::env::temp_dir().join(format!("baton-shm-fallback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (p_sock, d_sock) = (dir.join("p.sock"), dir.join("d.sock"));
    let prefill = worker(
        "prefill",
        &model,
        &["--kv-shm-socket", p_sock.to_str().expect("utf-8")],
    );
    // 1 MiB files at most: the 128 MiB memfd's ftruncate fails (EFBIG; the SIGXFSZ it raises is
    // ignored, and stays ignored across exec).
    let limited = [
        "sh".to_string(),
        "-c".into(),
        "trap '' XFSZ; ulimit -f 1024; exec \"$0\" \"$@\"".into(),
    ];
    let decode = Proc::start_with(
        &limited,
        &[
            "decode",
            "--model",
            &model,
            "--listen",
            "127.0.0.1:0",
            "--kv-cache-mib",
            "128",
            "--metrics-listen",
            "127.0.0.1:0",
            "--kv-shm-socket",
            d_sock.to_str().expect("utf-8"),
        ],
        2,
    );
    let (d, d_metrics) = (decode.addrs[0], decode.addrs[1]);
    worker_info("decode", d).await;
    assert!(
        decode.wait_stderr(START_LIMIT, |l| l.contains("FALLBACK")
            && l.contains("shared memory")),
        "the fallback is logged"
    );
    let (status, page) = common::get(d_metrics, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        page.lines().any(|l| l == "baton_kv_pool_shared 0"),
        "the fallback is in the metrics:\n{page}"
    );

    // Shared memory asked for, not chosen once a link is seen.
    let coordinator = common::coordinator(
        &model,
        &[prefill.addrs[0]],
        &[d],
        &["--set", "coordinator.transport=shm"],
    );
    let grpc = coordinator.addrs[0];
    let mut client = InferenceClient::new(channel(grpc));
    let started = Instant::now();
    let placement = loop {
        match client
            .generate(common::forced((300..364).collect(), 4))
            .await
        {
            Ok(stream) => {
                let (_, finish) = common::to_finish(&mut stream.into_inner()).await;
                break finish.placement.expect("placement");
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(started.elapsed() < START_LIMIT, "never served: {s:?}");
                tokio::task::yield_now().await;
            }
            Err(s) => panic!("generate: {s:?}"),
        }
    };
    assert_eq!(placement.mode, "disaggregated");
    assert_eq!(
        placement.kv.expect("kv stats").transport,
        v1::Transport::Shm as i32,
        "the handoff went over the shm socket"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The coordinator's DisconnectPeer (sent to the peers of a worker that left): the prefill
/// worker closes the link it dialed to the decode worker's agent, says whether there was one,
/// and the next ConnectPeer dials anew. The decode worker answers the same call for links it
/// dialed (none here: it read no pull source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_peer_closes_a_link_and_the_next_connect_dials_anew() {
    let model = model();
    let decode = worker("decode", &model, &[]);
    let prefill = worker("prefill", &model, &[]);
    let (p, d) = (prefill.addrs[0], decode.addrs[0]);
    let dinfo = worker_info("decode", d).await;
    worker_info("prefill", p).await;
    let endpoint = dinfo
        .kv_endpoints
        .iter()
        .find(|e| e.transport == v1::Transport::Tcp as i32)
        .cloned();
    let mut pc = PrefillWorkerClient::new(channel(p));
    let connect = v1::ConnectRequest {
        endpoint: endpoint.clone(),
        destination: dinfo.layout.clone(),
    };
    let first = pc.connect_peer(connect.clone()).await.expect("link");
    assert!(!first.get_ref().already_connected);
    let again = pc.connect_peer(connect.clone()).await.expect("link");
    assert!(again.get_ref().already_connected, "the link is kept");

    let disconnect = v1::DisconnectRequest {
        endpoint: endpoint.clone(),
    };
    let closed = pc
        .disconnect_peer(disconnect.clone())
        .await
        .expect("disconnect");
    assert!(closed.get_ref().was_connected);
    let twice = pc
        .disconnect_peer(disconnect.clone())
        .await
        .expect("disconnect");
    assert!(!twice.get_ref().was_connected, "nothing left to close");
    let anew = pc.connect_peer(connect).await.expect("link again");
    assert!(!anew.get_ref().already_connected, "dialed anew");

    let none = DecodeWorkerClient::new(channel(d))
        .disconnect_peer(v1::DisconnectRequest {
            endpoint: Some(v1::KvEndpoint {
                transport: v1::Transport::Tcp as i32,
                address: p.to_string(),
                ..Default::default()
            }),
        })
        .await
        .expect("disconnect");
    assert!(!none.get_ref().was_connected);
    let missing = pc
        .disconnect_peer(v1::DisconnectRequest { endpoint: None })
        .await
        .expect_err("no endpoint");
    assert_eq!(missing.code(), tonic::Code::InvalidArgument);
    assert!(
        missing.message().contains("endpoint"),
        "{}",
        missing.message()
    );
}
