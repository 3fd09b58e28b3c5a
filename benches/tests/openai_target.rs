//! The OpenAI target and the runner against a small axum server in this process, which answers
//! by prompt: a good stream, a 500, a body that is not SSE, an event that is not JSON, a stream
//! cut short, an error event, and a stream that stalls past the timeout. Every request must come
//! back as exactly one sample, failures classified by kind.
//!
//! The server's listener is bound before the runner starts, so no readiness wait is needed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton_bench::{
    Arrivals, Bounds, ErrorKind, Load, OpenAiTarget, RequestSpec, RunOptions, Slo,
    TokenCountSource, run_load,
};
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Default)]
struct Counters {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn chunk(text: &str, finish: Option<&str>) -> String {
    let v = json!({"choices": [{"index": 0, "text": text, "finish_reason": finish}]});
    format!("data: {v}\n\n")
}

const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3,\"total_tokens\":8}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

fn sse(events: Vec<String>) -> Response {
    let stream = futures::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(Bytes::from(e))),
    );
    sse_stream(stream)
}

fn sse_stream(
    stream: impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
) -> Response {
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn completions(State(counters): State<Arc<Counters>>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).expect("the client sends JSON");
    assert_eq!(req["stream"], true);
    assert_eq!(req["stream_options"]["include_usage"], true);
    let prompt = req["prompt"].as_str().expect("prompt").to_string();
    let good = vec![
        chunk("a", None),
        chunk("b", None),
        chunk("c", Some("length")),
        USAGE.to_string(),
        DONE.to_string(),
    ];
    match prompt.as_str() {
        "500" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"error\":{\"message\":\"boom\"}}",
        )
            .into_response(),
        "not-sse" => "hello".into_response(),
        "garbage" => sse(vec!["data: not json\n\n".into()]),
        "cut" => sse(vec![chunk("a", None)]),
        "server-error" => sse(vec![
            chunk("a", None),
            "data: {\"error\":{\"message\":\"decode worker gone\"}}\n\n".into(),
            DONE.into(),
        ]),
        "stall" => {
            let first = futures::stream::iter([Ok::<_, Infallible>(Bytes::from(chunk("a", None)))]);
            sse_stream(first.chain(futures::stream::pending()))
        }
        "no-usage" => sse(vec![
            chunk("a", None),
            chunk("b", None),
            chunk("c", Some("length")),
            DONE.into(),
        ]),
        _ => {
            // In flight from here until the [DONE] event is produced, which is before the
            // client can see it, so a client respecting its cap never sees more than the cap.
            let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let n = good.len();
            let counters = counters.clone();
            let stream = futures::stream::iter(good.into_iter().enumerate()).map(move |(i, e)| {
                if i + 1 == n {
                    counters.in_flight.fetch_sub(1, Ordering::SeqCst);
                }
                Ok::<_, Infallible>(Bytes::from(e))
            });
            sse_stream(stream)
        }
    }
}

/// Serves the fake endpoint on 127.0.0.1:0; the listener is bound when this returns.
async fn serve() -> (SocketAddr, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "fake-model"}]})) }),
        )
        .with_state(counters.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("fake server");
    });
    (addr, counters)
}

fn spec(prompt: &str) -> RequestSpec {
    RequestSpec {
        prompt: prompt.into(),
        prompt_tokens: Some(4),
        max_tokens: 3,
    }
}

fn options(max_requests: usize, max_duration: Duration, timeout: Duration) -> RunOptions {
    RunOptions {
        bounds: Bounds {
            max_requests,
            max_duration,
        },
        timeout,
        slo: Slo::default(),
        seed: 0,
        progress: false,
    }
}

fn at_once() -> Load {
    Load {
        arrivals: Arrivals::Immediate,
        max_concurrency: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_accounted_for_and_failures_are_classified_by_kind() {
    let (addr, _) = serve().await;
    let target = Arc::new(
        OpenAiTarget::new(&format!("http://{addr}"), "fake-model".into(), true).expect("target"),
    );
    let prompts = [
        "good",
        "500",
        "not-sse",
        "garbage",
        "cut",
        "server-error",
        "stall",
        "no-usage",
    ];
    let requests: Vec<RequestSpec> = prompts.iter().map(|p| spec(p)).collect();
    let run = run_load(
        target,
        &requests,
        &at_once(),
        &options(
            prompts.len(),
            Duration::from_secs(60),
            Duration::from_millis(800),
        ),
    )
    .await;

    assert_eq!(run.samples.len(), prompts.len(), "one sample per request");
    let kinds: Vec<Option<ErrorKind>> = run
        .samples
        .iter()
        .map(|s| s.measured.error.as_ref().map(|e| e.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            None,
            Some(ErrorKind::HttpStatus { status: 500 }),
            Some(ErrorKind::BadResponse),
            Some(ErrorKind::BadResponse),
            Some(ErrorKind::StreamBroken),
            Some(ErrorKind::ServerError),
            Some(ErrorKind::Timeout),
            None,
        ]
    );
    let s = &run.summary;
    assert_eq!((s.planned, s.sent, s.completed, s.failed), (8, 8, 2, 6));
    assert_eq!(
        s.errors,
        [
            ("bad response", 2),
            ("http 500", 1),
            ("server error", 1),
            ("stream broken", 1),
            ("timeout", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect()
    );

    let good = &run.samples[0].measured;
    assert_eq!(
        (good.output_tokens, good.output_tokens_from),
        (3, TokenCountSource::Usage)
    );
    assert_eq!(good.server_prompt_tokens, Some(5));
    assert!(good.ttft_s.is_some());
    assert_eq!(good.itl_s.len(), 2);
    assert!(good.e2e_s >= good.ttft_s.unwrap_or(f64::MAX));

    let http500 = run.samples[1].measured.error.as_ref().expect("500");
    assert!(http500.message.contains("boom"), "{}", http500.message);

    let stalled = &run.samples[6].measured;
    assert!(
        stalled.ttft_s.is_some(),
        "the chunk before the stall is kept"
    );
    assert!(
        stalled.e2e_s > 0.7,
        "timed out at the timeout: {}",
        stalled.e2e_s
    );

    let no_usage = &run.samples[7].measured;
    assert_eq!(
        (no_usage.output_tokens, no_usage.output_tokens_from),
        (3, TokenCountSource::Chunks)
    );
    assert_eq!(s.output_tokens_from_chunks, 1);
    assert_eq!(s.total_output_tokens, 6);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error_for_every_request() {
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let target = Arc::new(
        OpenAiTarget::new(&format!("http://127.0.0.1:{port}/v1"), "m".into(), false)
            .expect("target"),
    );
    let run = run_load(
        target,
        &[spec("good")],
        &at_once(),
        &options(3, Duration::from_secs(60), Duration::from_secs(10)),
    )
    .await;
    assert_eq!(run.summary.sent, 3);
    assert_eq!(
        run.summary.errors.get("connect"),
        Some(&3),
        "{:?}",
        run.summary
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_never_exceeds_its_concurrency() {
    let (addr, counters) = serve().await;
    let target = Arc::new(
        OpenAiTarget::new(&format!("http://{addr}"), "fake-model".into(), false).expect("target"),
    );
    let load = Load::closed_loop(NonZeroUsize::new(3).expect("3"));
    let run = run_load(
        target,
        &[spec("good")],
        &load,
        &options(24, Duration::from_secs(60), Duration::from_secs(10)),
    )
    .await;
    assert_eq!(run.summary.completed, 24);
    let max = counters.max_in_flight.load(Ordering::SeqCst);
    assert!((1..=3).contains(&max), "server saw {max} at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_limit_stops_sending_but_awaits_requests_in_flight() {
    let (addr, _) = serve().await;
    let target = Arc::new(
        OpenAiTarget::new(&format!("http://{addr}"), "fake-model".into(), false).expect("target"),
    );
    let load = Load {
        arrivals: Arrivals::poisson(200.0).expect("rate"),
        max_concurrency: None,
    };
    let limit = Duration::from_millis(300);
    let run = run_load(
        target,
        &[spec("good")],
        &load,
        &options(100_000, limit, Duration::from_secs(10)),
    )
    .await;
    let s = &run.summary;
    assert!(
        s.planned < 100_000 && s.planned > 10,
        "planned {}",
        s.planned
    );
    assert_eq!(s.sent, run.samples.len());
    assert_eq!(s.completed, s.sent, "{:?}", s.errors);
    assert!(run.samples.iter().all(|x| x.sent_s < limit.as_secs_f64()));
}

#[tokio::test]
async fn the_model_comes_from_v1_models() {
    let (addr, _) = serve().await;
    let model = OpenAiTarget::served_model(&format!("http://{addr}"), None)
        .await
        .expect("models");
    assert_eq!(model, "fake-model");
}
