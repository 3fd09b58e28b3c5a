//! Operability with real processes: a SIGTERM'd decode worker drains its streams (or, past its
//! deadline, fails them and frees every block) and exits 0; one request is one trace across the
//! coordinator, prefill and decode processes (spans received by an OTLP collector in this test);
//! every metric docs/metrics.md lists is on the role it is listed for, in pages a Prometheus
//! text-format parser accepts.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_proto::v1::{self, inference_client::InferenceClient};
use common::{Proc, START_LIMIT, await_health, channel, get, model};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use tonic_health::pb::health_check_response::ServingStatus;

/// SIGTERM to exit for a worker whose streams finish well inside its drain deadline.
const EXIT_LIMIT: Duration = Duration::from_secs(120);

fn decode_worker(model: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "decode",
        "--model",
        model,
        "--listen",
        "127.0.0.1:0",
        "--kv-cache-mib",
        "256",
    ];
    args.extend_from_slice(extra);
    let announced = if extra.contains(&"--no-metrics") {
        1
    } else {
        2
    };
    Proc::start(&args, announced)
}

fn coordinator(
    model: &str,
    prefill: Option<SocketAddr>,
    decode: SocketAddr,
    extra: &[&str],
) -> Proc {
    common::coordinator(model, prefill.as_slice(), &[decode], extra)
}

async fn await_serving(coordinator: SocketAddr) {
    await_health(coordinator, "baton.v1.Inference", ServingStatus::Serving).await;
}

fn request(prompt: &str, max_tokens: u32) -> v1::GenerateRequest {
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Prompt(prompt.into())),
        sampling: Some(v1::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// How a stream ended: its tokens and finish, or the status that broke it.
type Ended = (usize, Result<v1::GenerateFinish, tonic::Status>);

/// Starts `n` streams and returns once each has its first token; the handles give how each
/// stream ended.
async fn start_streams(
    addr: SocketAddr,
    n: usize,
    max_tokens: u32,
) -> Vec<tokio::task::JoinHandle<Ended>> {
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(n);
    let handles = (0..n)
        .map(|i| {
            let first_tx = first_tx.clone();
            tokio::spawn(async move {
                let mut client = InferenceClient::new(channel(addr));
                let prompt = format!("Stream {i}: list the prime numbers, one per line.");
                let mut stream = client
                    .generate(request(&prompt, max_tokens))
                    .await
                    .expect("stream starts")
                    .into_inner();
                let mut tokens = 0;
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            if tokens == 0 {
                                let _ = first_tx.send(i).await;
                            }
                            tokens += m.token_ids.len();
                            if let Some(f) = m.finish {
                                return (tokens, Ok(f));
                            }
                        }
                        Ok(None) => {
                            return (tokens, Err(tonic::Status::unknown("ended without finish")));
                        }
                        Err(status) => return (tokens, Err(status)),
                    }
                }
            })
        })
        .collect();
    for _ in 0..n {
        tokio::time::timeout(START_LIMIT, first_rx.recv())
            .await
            .expect("every stream produced its first token");
    }
    handles
}

/// The `drained` log line's numbers: (free blocks, total blocks, leases).
fn drained_line(worker: &Proc) -> (u64, u64, u64) {
    let lines = worker.stderr();
    let line = lines
        .iter()
        .find(|l| l.contains("drained"))
        .unwrap_or_else(|| panic!("no `drained` line in:\n{}", lines.join("\n")));
    let field = |name: &str| -> u64 {
        let at = line
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("{name} missing in {line:?}"));
        line[at + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} unreadable in {line:?}"))
    };
    (field("free_blocks"), field("total_blocks"), field("leases"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_eight_streams_finish_and_routes_no_new_work_to_the_draining_worker() {
    let model = model();
    let mut decode = decode_worker(&model, &["--no-metrics", "--drain-timeout-ms", "120000"]);
    let coord = coordinator(&model, None, decode.addrs[0], &[]);
    let grpc = coord.addrs[0];
    await_serving(grpc).await;

    let streams = start_streams(grpc, 8, 48).await;
    decode.signal(libc::SIGTERM);
    await_health(
        decode.addrs[0],
        "baton.v1.DecodeWorker",
        ServingStatus::NotServing,
    )
    .await;

    // New work is refused from the moment the drain starts: the coordinator hears NOT_SERVING on
    // its health watch (or, in the race before that, the worker itself refuses).
    let refused = InferenceClient::new(channel(grpc))
        .generate(request("One more?", 4))
        .await;
    let status = match refused {
        Err(status) => status,
        Ok(stream) => stream
            .into_inner()
            .message()
            .await
            .expect_err("a new request after SIGTERM is refused"),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    for s in streams {
        let (tokens, ended) = s.await.expect("stream task");
        let finish = ended.expect("a stream in flight at SIGTERM completes");
        assert_eq!(finish.reason, v1::FinishReason::Length as i32);
        assert_eq!(tokens, 48, "every token of the stream arrived");
    }
    let status = decode.wait_exit(EXIT_LIMIT);
    assert!(status.success(), "drained worker exits 0: {status:?}");
    let (free, total, leases) = drained_line(&decode);
    assert_eq!((free, leases), (total, 0), "every block back in the pool");
}

/// SIGTERM while the model loads (right after the listeners are announced): each worker drains
/// nothing and exits 0. Its engine thread used to take the Stop from its queue and then wait
/// for a next command that never came, so the process hung after "drained".
#[test]
fn sigterm_while_the_model_loads_exits_at_once() {
    let model = model();
    for role in ["decode", "prefill"] {
        let mut worker = Proc::start(
            &[
                role,
                "--model",
                &model,
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
            2,
        );
        worker.signal(libc::SIGTERM);
        let status = worker.wait_exit(START_LIMIT);
        assert!(status.success(), "{role}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_fails_streams_with_a_clear_error_and_frees_every_block() {
    let model = model();
    let mut decode = decode_worker(&model, &["--no-metrics", "--drain-timeout-ms", "1000"]);
    let coord = coordinator(&model, None, decode.addrs[0], &[]);
    let grpc = coord.addrs[0];
    await_serving(grpc).await;

    // Far longer than the deadline: about a minute of decoding each on this machine.
    let streams = start_streams(grpc, 4, 1500).await;
    decode.signal(libc::SIGTERM);
    for s in streams {
        let (tokens, ended) = s.await.expect("stream task");
        let status = ended.expect_err("a stream past the drain deadline is failed");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("drain deadline"),
            "the error says why: {status:?}"
        );
        assert!(tokens < 1500);
    }
    let status = decode.wait_exit(EXIT_LIMIT);
    assert!(
        status.success(),
        "worker exits 0 after its deadline: {status:?}"
    );
    let (free, total, leases) = drained_line(&decode);
    assert_eq!((free, leases), (total, 0), "every block back in the pool");
}

/// Spans an OTLP collector received: (service name, trace id, span name).
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                spans.push((service.clone(), trace, span.name.clone()));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The metrics docs/metrics.md lists for `role`.
fn documented(role: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .expect("docs/metrics.md");
    doc.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            (name.starts_with("baton_") || name.starts_with("process_")).then_some(())?;
            cells
                .get(3)?
                .split(',')
                .any(|r| r.trim() == role)
                .then(|| name.to_string())
        })
        .collect()
}

/// Scrapes `/metrics`, parses it, and checks every documented metric of `role` is there.
fn check_metrics(role: &str, addr: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = get(addr, "/metrics").expect("scrape");
    assert_eq!(status, 200, "{role} /metrics");
    assert!(
        body.ends_with("# EOF"),
        "{role}: OpenMetrics page ends with # EOF"
    );
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{role} /metrics does not parse: {e}\n{body}"));
    let names: HashSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    let expected = documented(role);
    assert!(
        expected.len() >= 8,
        "docs/metrics.md lists {role}'s metrics"
    );
    for name in expected {
        // A histogram is documented by its base name; its series carry suffixes.
        let present =
            names.contains(name.as_str()) || names.contains(format!("{name}_count").as_str());
        assert!(present, "{role} /metrics lacks documented {name}:\n{body}");
    }
    scrape
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_three_processes_and_every_documented_metric_is_served() {
    let collector = Collector::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", otlp.local_addr().expect("addr"));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
    );

    let model = model();
    let telemetry = [
        "--otlp-endpoint",
        endpoint.as_str(),
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut prefill = Proc::start(
        &[
            &[
                "prefill",
                "--model",
                &model,
                "--listen",
                "127.0.0.1:0",
                "--kv-cache-mib",
                "128",
            ][..],
            &telemetry[..],
        ]
        .concat(),
        2,
    );
    let mut decode = decode_worker(&model, &telemetry);
    let mut coord = coordinator(
        &model,
        Some(prefill.addrs[0]),
        decode.addrs[0],
        &["--otlp-endpoint", &endpoint],
    );
    let (grpc, http) = (coord.addrs[0], coord.addrs[1]);
    await_serving(grpc).await;

    let mut req = request(
        "The history of the printing press begins in the fifteenth century, when Johannes \
         Gutenberg combined movable metal type, oil-based ink and a screw press. Summarize it.",
        6,
    );
    req.pd_mode = v1::PdMode::Force as i32;
    let mut stream = InferenceClient::new(channel(grpc))
        .generate(req)
        .await
        .expect("generate")
        .into_inner();
    let mut placement = None;
    while let Some(m) = stream.message().await.expect("stream") {
        if let Some(f) = m.finish {
            placement = f.placement;
        }
    }
    let placement = placement.expect("finish with placement");
    assert_eq!(placement.mode, "disaggregated");

    for worker in [prefill.addrs[1], decode.addrs[1]] {
        assert_eq!(get(worker, "/health").expect("health").0, 200);
        assert_eq!(get(worker, "/ready").expect("ready").0, 200);
    }
    check_metrics("coordinator", http);
    let p = check_metrics("prefill", prefill.addrs[1]);
    let d = check_metrics("decode", decode.addrs[1]);
    let value = |s: &prometheus_parse::Scrape, name: &str| {
        s.samples
            .iter()
            .find(|x| x.metric == name)
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or(f64::NAN)
    };
    let sent = value(&p, "baton_kv_transfer_bytes_sent_total");
    assert!(sent > 0.0, "the prefill worker counted the KV it sent");
    assert_eq!(sent, value(&d, "baton_kv_transfer_bytes_received_total"));

    // Each process flushes its spans when it exits.
    for proc in [&mut coord, &mut prefill, &mut decode] {
        proc.signal(libc::SIGTERM);
        let status = proc.wait_exit(EXIT_LIMIT);
        assert!(status.success(), "exits 0 on SIGTERM: {status:?}");
    }
    let spans = collector
        .spans
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let request_traces: Vec<&String> = spans
        .iter()
        .filter(|(svc, _, name)| svc == "baton-coordinator" && name == "request")
        .map(|(_, t, _)| t)
        .collect();
    assert_eq!(request_traces.len(), 1, "one request span: {spans:?}");
    let trace = request_traces[0];
    let mut by_service: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (svc, t, name) in &spans {
        if t == trace {
            by_service.entry(svc).or_default().insert(name);
        }
    }
    for stage in [
        "tokenize", "admit", "place", "reserve", "prefill", "decode", "stream",
    ] {
        assert!(
            by_service
                .get("baton-coordinator")
                .is_some_and(|s| s.contains(stage)),
            "coordinator stage {stage} in the trace: {by_service:?}"
        );
    }
    let prefill_spans = by_service
        .get("baton-prefill")
        .expect("prefill spans in the trace");
    assert!(
        prefill_spans.contains("/baton.v1.PrefillWorker/Prefill"),
        "{by_service:?}"
    );
    assert!(prefill_spans.contains("transfer"), "{by_service:?}");
    let decode_spans = by_service
        .get("baton-decode")
        .expect("decode spans in the trace");
    assert!(decode_spans.contains("decode_stream"), "{by_service:?}");
    assert!(
        decode_spans.contains("/baton.v1.DecodeWorker/Decode"),
        "{by_service:?}"
    );
}
