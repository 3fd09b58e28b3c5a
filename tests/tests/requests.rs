//! Requests through a real cluster: many streams at once, cancellation, and bad input.

use std::time::Duration;

use baton_coordinator::{HandoffShape, TransportChoice};
use baton_e2e::{
    Coordinator, LIMIT, Workers, http_get, http_post, http_post_with, prompt_of, reference,
};
use baton_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_TOKENS: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_equal_the_same_requests_one_at_a_time() {
    // Lengths straddle the 32-token disaggregation threshold: both placements run at once.
    let prompts: Vec<Vec<u32>> = (0..32).map(|i| prompt_of(12 + 2 * i, i as u32)).collect();
    let expected = {
        let prompts = prompts.clone();
        tokio::task::spawn_blocking(move || reference(&prompts, MAX_TOKENS))
            .await
            .expect("reference")
    };
    let workers = Workers::start(128).await;
    let coordinator =
        Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |_| {}).await;
    let runs = prompts.iter().map(|p| async {
        tokio::time::timeout(LIMIT, coordinator.generate(p, MAX_TOKENS, v1::PdMode::Auto))
            .await
            .expect("within the limit")
    });
    let results = futures::future::join_all(runs).await;
    let mut modes = std::collections::BTreeSet::new();
    for (i, r) in results.into_iter().enumerate() {
        let (tokens, finish) = r.unwrap_or_else(|s| panic!("stream {i}: {s}"));
        assert_eq!(tokens, expected[i], "stream {i} differs from running alone");
        modes.insert(finish.placement.expect("placement").mode);
    }
    assert_eq!(
        modes.into_iter().collect::<Vec<_>>(),
        ["aggregated", "disaggregated"],
        "both placements were exercised"
    );
    workers.await_pools_full(Duration::from_secs(1)).await;
}

fn long_request(prompt: &[u32]) -> v1::GenerateRequest {
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
            ids: prompt.to_vec(),
        })),
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(500),
            ignore_eos: true,
            ..Default::default()
        }),
        pd_mode: v1::PdMode::Force as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streams_return_every_block_within_a_second() {
    let workers = Workers::start(64).await;
    for shape in [HandoffShape::Push, HandoffShape::Pull] {
        let coordinator = Coordinator::start(&workers, shape, TransportChoice::Tcp, |_| {}).await;

        // gRPC: read a few tokens, then drop the stream (client disconnect).
        let mut stream = coordinator
            .client()
            .generate(long_request(&prompt_of(100, 1)))
            .await
            .expect("generate")
            .into_inner();
        for _ in 0..3 {
            stream.message().await.expect("message").expect("a token");
        }
        let ((pf, pt), (df, dt)) = workers.pools().await;
        assert!(pf < pt || df < dt, "the stream holds blocks while it runs");
        drop(stream);
        workers.await_pools_full(Duration::from_secs(1)).await;

        // SSE: read two events, then close the connection.
        let body = serde_json::json!({
            "prompt": prompt_of(100, 2),
            "max_tokens": 500,
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "pd_mode": "force",
        })
        .to_string();
        let mut s = tokio::net::TcpStream::connect(coordinator.http)
            .await
            .expect("connect");
        let req = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while seen.matches("data:").count() < 2 {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "stream ended early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        drop(s);
        workers.await_pools_full(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_naming_the_field_and_change_nothing() {
    let workers = Workers::start(64).await;
    let coordinator =
        Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |_| {}).await;
    let too_long: Vec<u32> = prompt_of(9000, 3);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "/v1/completions",
            r#"{"prompt":"","max_tokens":4}"#.into(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            serde_json::json!({"prompt": too_long, "max_tokens": 4}).to_string(),
            400,
            "prompt",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":0}"#.into(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":100000}"#.into(),
            400,
            "max_tokens",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","temperature":-1}"#.into(),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","top_p":0}"#.into(),
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","top_p":1.5}"#.into(),
            400,
            "top_p",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","model":"gpt-9"}"#.into(),
            404,
            "model",
        ),
        ("/v1/completions", r#"{"prompt":"hi","#.into(), 400, "body"),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"wizard","content":"hi"}]}"#.into(),
            400,
            "role",
        ),
        // Fields nothing implements are refused by name, never ignored.
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_object"}}"#.into(),
            400,
            "response_format",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"}],"tools":[]}"#.into(),
            400,
            "tools",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"hi","name":"ann"}]}"#.into(),
            400,
            "messages[0].name",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","logit_bias":{"50256":-100}}"#.into(),
            400,
            "logit_bias",
        ),
        (
            "/v1/completions",
            r#"{"prompt":"hi","stream":true,"stream_options":{"continuous_usage_stats":true}}"#.into(),
            400,
            "stream_options.continuous_usage_stats",
        ),
    ];
    for (path, body, status, field) in &cases {
        let (got, text) = http_post(coordinator.http, path, body).await;
        assert_eq!(got, *status, "{path} {body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json error body");
        let message = v["error"]["message"].as_str().expect("error.message");
        assert!(
            message.contains(field),
            "{body}: message {message:?} names {field}"
        );
        if v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not supported"))
        {
            assert_eq!(v["error"]["param"], *field, "{text}");
        }
        assert!(v["error"]["type"].is_string(), "{text}");
    }

    // The same classes over gRPC.
    let mut client = coordinator.client();
    let bad = |sampling: v1::SamplingParams, ids: Vec<u32>| v1::GenerateRequest {
        input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds { ids })),
        sampling: Some(sampling),
        ..Default::default()
    };
    for (req, field) in [
        (bad(Default::default(), vec![]), "prompt"),
        (
            bad(
                v1::SamplingParams {
                    temperature: Some(-0.5),
                    ..Default::default()
                },
                vec![504, 3575],
            ),
            "temperature",
        ),
        (
            bad(
                v1::SamplingParams {
                    max_tokens: Some(0),
                    ..Default::default()
                },
                vec![504, 3575],
            ),
            "max_tokens",
        ),
    ] {
        let status = client.generate(req).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?} names {field}");
    }

    workers.await_pools_full(Duration::from_secs(1)).await;
    let (tokens, _) = coordinator
        .generate(&prompt_of(40, 4), 4, v1::PdMode::Force)
        .await
        .expect("a good request still works");
    assert!(!tokens.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_with_retry_after() {
    let workers = Workers::start(64).await;
    let coordinator = Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |c| {
        c.max_inflight = 1;
    })
    .await;
    // One long stream holds the only admission slot.
    let mut running = coordinator
        .client()
        .generate(long_request(&prompt_of(40, 5)))
        .await
        .expect("first request admitted")
        .into_inner();
    running.message().await.expect("message").expect("a token");

    let status = coordinator
        .client()
        .generate(long_request(&prompt_of(40, 6)))
        .await
        .expect_err("second request refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.metadata().get("retry-after").is_some(), "{status:?}");

    let (code, body) = http_post(
        coordinator.http,
        "/v1/completions",
        r#"{"prompt":"hi","max_tokens":2}"#,
    )
    .await;
    assert_eq!(code, 429, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"]["type"], "rate_limit_exceeded", "{body}");

    drop(running);
    workers.await_pools_full(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadlines_end_requests_and_reach_the_workers() {
    let workers = Workers::start(64).await;
    let coordinator =
        Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |_| {}).await;

    // gRPC: the client's grpc-timeout ends a stream that would run far longer.
    let mut request = tonic::Request::new(long_request(&prompt_of(100, 3)));
    request.set_timeout(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(LIMIT, async {
        let mut stream = coordinator.client().generate(request).await?.into_inner();
        loop {
            if stream.message().await?.is_none() {
                return Ok::<_, tonic::Status>(());
            }
        }
    })
    .await
    .expect("the deadline ends the stream");
    let status = ended.expect_err("a 500-token stream does not fit in 1.5 s");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    workers.await_pools_full(Duration::from_secs(2)).await;

    // The workers take the deadline from the call itself: a decode stream called directly
    // with a grpc-timeout ends on the worker's side.
    let mut direct = tonic::Request::new(v1::DecodeRequest {
        sampling: long_request(&[]).sampling,
        source: Some(v1::decode_request::Source::Prompt(v1::Prompt {
            prompt_token_ids: prompt_of(40, 4),
        })),
        ..Default::default()
    });
    direct.set_timeout(Duration::from_millis(800));
    let mut stream =
        v1::decode_worker_client::DecodeWorkerClient::new(baton_e2e::channel(workers.decode))
            .decode(direct)
            .await
            .expect("decode starts")
            .into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream finished inside its deadline"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    workers.await_pools_full(Duration::from_secs(2)).await;

    // HTTP: the body's `timeout` field; the reply is 504 with the OpenAI error type.
    let body = serde_json::json!({
        "prompt": prompt_of(100, 5),
        "max_tokens": 500,
        "ignore_eos": true,
        "timeout": 1.0,
    })
    .to_string();
    let (status, reply) = http_post(coordinator.http, "/v1/completions", &body).await;
    assert_eq!(status, 504, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["error"]["type"], "timeout", "{reply}");
    workers.await_pools_full(Duration::from_secs(2)).await;

    // A timeout that is not a positive number of seconds is refused, naming the field.
    let body = serde_json::json!({"prompt": "hi", "max_tokens": 2, "timeout": -1}).to_string();
    let (status, reply) = http_post(coordinator.http, "/v1/completions", &body).await;
    assert_eq!(status, 400, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("json");
    assert_eq!(reply["error"]["param"], "timeout", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_reservations_outlive_a_wait_in_the_prefill_queue() {
    // Three long prompts at once on one prefill worker: the last waits seconds for the first
    // two, far past a 150 ms lease. The coordinator renews each reservation while its prefill
    // waits, so every request completes, with the tokens it has alone.
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt_of(600, 40 + i)).collect();
    let expected = {
        let prompts = prompts.clone();
        tokio::task::spawn_blocking(move || reference(&prompts, 4))
            .await
            .expect("reference")
    };
    let workers = Workers::start(128).await;
    let coordinator = Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |c| {
        c.lease_ttl = Duration::from_millis(150);
    })
    .await;
    let runs = prompts.iter().map(|p| async {
        tokio::time::timeout(LIMIT, coordinator.generate(p, 4, v1::PdMode::Force))
            .await
            .expect("within the limit")
    });
    for (i, r) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        let (tokens, finish) = r.unwrap_or_else(|s| panic!("request {i}: {s}"));
        assert_eq!(
            tokens, expected[i],
            "request {i} differs from running alone"
        );
        let placement = finish.placement.expect("placement");
        assert_eq!(placement.mode, "disaggregated", "request {i}");
    }
    workers.await_pools_full(Duration::from_secs(2)).await;
}

/// API keys: no key or an unknown one is 401 (UNAUTHENTICATED on gRPC) in the OpenAI envelope;
/// a known key is served; a key over its rate or its concurrency gets 429 with Retry-After;
/// the operator endpoints stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_admit_known_callers_within_their_limits() {
    use baton_coordinator::{ApiKeyConfig, key_digest};
    let workers = Workers::start(64).await;
    let hash = |key: &str| {
        key_digest(key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let key = |name: &str, secret: &str, rate: Option<u32>, concurrent: Option<u32>| ApiKeyConfig {
        name: name.into(),
        sha256: hash(secret),
        requests_per_minute: rate,
        max_concurrent: concurrent,
    };
    let coordinator = Coordinator::start(&workers, HandoffShape::Push, TransportChoice::Tcp, |c| {
        c.auth.keys = vec![
            key("open", "sk-open", None, None),
            key("metered", "sk-metered", Some(6), None),
            key("single", "sk-single", None, Some(1)),
        ];
    })
    .await;
    let http = coordinator.http;
    let body = r#"{"prompt":"The sky is","max_tokens":2}"#;
    let bearer = |k: &str| format!("Authorization: Bearer {k}\r\n");

    for headers in [String::new(), bearer("sk-wrong")] {
        let (status, text) = http_post_with(http, "/v1/completions", &headers, body).await;
        assert_eq!(status, 401, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["error"]["type"], "authentication_error", "{text}");
        assert_eq!(v["error"]["code"], "invalid_api_key", "{text}");
        assert!(
            !text.contains("sk-wrong"),
            "the presented key is echoed: {text}"
        );
    }
    let (status, text) = http_post_with(http, "/v1/completions", &bearer("sk-open"), body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(http_get(http, "/health").await.0, 200);
    assert_eq!(http_get(http, "/metrics").await.0, 200);

    // 6 a minute: a burst of one, then the next in 10 s.
    let (status, text) = http_post_with(http, "/v1/completions", &bearer("sk-metered"), body).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = http_post_with(http, "/v1/completions", &bearer("sk-metered"), body).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("requests_per_minute"), "{text}");

    // gRPC: the same keys in `authorization` metadata.
    let mut client = coordinator.client();
    let request = |key: Option<&str>, max_tokens: u32| {
        let mut r = tonic::Request::new(v1::GenerateRequest {
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids: prompt_of(24, 5),
            })),
            sampling: Some(v1::SamplingParams {
                max_tokens: Some(max_tokens),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        if let Some(k) = key {
            r.metadata_mut().insert(
                "authorization",
                format!("Bearer {k}").parse().expect("ascii"),
            );
        }
        r
    };
    let status = client.generate(request(None, 2)).await.expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let mut stream = client
        .generate(request(Some("sk-single"), 40))
        .await
        .expect("a known key")
        .into_inner();
    stream.message().await.expect("first message");
    // One in flight is all "single" may have.
    let (status, text) = http_post_with(http, "/v1/completions", &bearer("sk-single"), body).await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("max_concurrent"), "{text}");
    let (status, text) = http_post_with(http, "/v1/completions", &bearer("sk-open"), body).await;
    assert_eq!(status, 200, "other keys are not held back: {text}");
    while let Some(m) = stream.message().await.expect("the stream") {
        if m.finish.is_some() {
            break;
        }
    }
    drop(stream);
    let (_, metrics) = http_get(http, "/metrics").await;
    for reason in ["missing", "unknown", "rate", "concurrency"] {
        let line = format!("baton_auth_refused_total{{reason=\"{reason}\"}}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&line) && !l.ends_with(" 0")),
            "{line} not counted"
        );
    }
}
