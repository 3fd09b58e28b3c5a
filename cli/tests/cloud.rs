//! Cloud spill end to end. The "cloud" is a real OpenAI-compatible server: a second baton
//! (`baton up --colocated` on other ports) that the first one's coordinator is configured to
//! spill to, with prices. Faults come from `MisbehavingUpstream`, a real HTTP server that
//! refuses, stalls or cuts its stream on purpose.
//!
//! - spill happens when local admission is full and not before; the reply streams through the
//!   HTTP frontend, gRPC and the official OpenAI SDK like a local one, equal to the upstream
//!   called directly; an upstream that refuses is retried on the next, once;
//! - the cap holds: 200 concurrent requests against a budget that covers about 50 of them,
//!   spent + reserved (read from the ledger while they run) never passes it;
//! - a coordinator killed with SIGKILL keeps every settled charge and every open reservation;
//! - the API key never shows in logs, `config print`, error bodies or metrics.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use baton_proto::v1::{self, inference_client::InferenceClient};
use common::misbehaving::{Fault, MisbehavingUpstream};
use common::{Cluster, STOP_BOUND, channel, get, post};
use serde_json::{Value, json};

/// The "cloud" baton's API key. Another baton does not check keys; the coordinator sends it
/// all the same, and it must never show anywhere.
const SECRET: &str = "sk-baton-test-4f1d2c8a9e7b6d5c3a2b1908";

/// Prices of the test upstreams, USD per 1M tokens: high, so costs are easy to see.
const INPUT_PRICE: f64 = 100.0;
const OUTPUT_PRICE: f64 = 200.0;

/// A request comes back within this, or the test fails.
const REPLY_LIMIT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-cloud-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// One `[[coordinator.cloud.endpoints]]` table.
struct Endpoint<'a> {
    name: &'a str,
    base_url: String,
    /// served name -> the upstream's name
    models: Vec<(&'a str, &'a str)>,
    key_file: Option<&'a Path>,
    extra: &'a str,
}

impl Endpoint<'_> {
    fn toml(&self) -> String {
        let models: Vec<String> = self
            .models
            .iter()
            .map(|(served, remote)| format!("{served:?} = {remote:?}"))
            .collect();
        let key = self
            .key_file
            .map(|p| format!("api_key_file = {:?}\n", p.display().to_string()))
            .unwrap_or_default();
        format!(
            "[[coordinator.cloud.endpoints]]\nname = {:?}\nbase_url = {:?}\n{key}\
             models = {{ {} }}\ninput_usd_per_mtok = {INPUT_PRICE}\n\
             output_usd_per_mtok = {OUTPUT_PRICE}\n{}\n",
            self.name,
            self.base_url,
            models.join(", "),
            self.extra
        )
    }
}

/// A config file for the spilling cluster: its endpoints and one global daily cap.
fn write_config(dir: &Path, endpoints: &[Endpoint], cap_usd: f64) -> PathBuf {
    let mut text = format!(
        "[coordinator.cloud.budget]\nledger = {:?}\ncaps = [{{ period = \"day\", cap_usd = {cap_usd} }}]\n\n",
        dir.join("ledger.redb").display().to_string()
    );
    for e in endpoints {
        text.push_str(&e.toml());
    }
    let path = dir.join("baton.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn served_model(http: SocketAddr) -> String {
    let (status, body) = get(http, "/v1/models").expect("GET /v1/models");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["data"][0]["id"].as_str().expect("model id").to_string()
}

fn chat(model: &str, content: &str, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (u16, Vec<(String, String)>, Value) {
    let (status, headers, text) = post(addr, path, &body.to_string(), REPLY_LIMIT).expect("POST");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, headers, value)
}

/// A streaming request whose first SSE event has arrived; the rest is left unread.
fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> BufReader<TcpStream> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(REPLY_LIMIT)).expect("timeout");
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read the stream");
        assert!(n > 0, "the stream ended before its first event");
        if line.starts_with("data: ") {
            assert!(!line.contains("\"error\""), "the stream failed: {line}");
            return reader;
        }
    }
}

fn metric(body: &str, name: &str, labels: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn baton_budget(args: &[&str]) -> Value {
    common::baton_json(&[&["budget"], args].concat())
}

fn nanos(v: &Value) -> u64 {
    v.as_u64().expect("nanodollars")
}

/// The cloud baton, one spilling cluster configured to use it, a misbehaving upstream tried
/// first: the spill rules, the retry, three client kinds, the budget report and the secret.
#[test]
fn spills_only_when_local_is_full_and_streams_like_a_local_request() {
    let dir = scratch("spill");
    let mut cloud = Cluster::start(&["--colocated"]);
    let (cloud_http, _) = cloud.endpoints();
    let model = served_model(cloud_http);
    let key_file = dir.join("key");
    std::fs::write(&key_file, format!("{SECRET}\n")).expect("write key");
    let refusing = MisbehavingUpstream::start(Fault::Status(503));
    let config = write_config(
        &dir,
        &[
            Endpoint {
                name: "refusing",
                base_url: refusing.base_url(),
                models: vec![(&model, &model)],
                key_file: None,
                extra: "",
            },
            Endpoint {
                name: "baton-cloud",
                base_url: format!("http://{cloud_http}/v1"),
                models: vec![(&model, &model), ("cloud-smol", &model)],
                key_file: Some(&key_file),
                extra: "",
            },
        ],
        100.0,
    );
    let config_arg = config.to_str().expect("utf-8");
    let mut local = Cluster::start(&[
        "--colocated",
        "--config",
        config_arg,
        "--set",
        "coordinator.max_inflight=1",
    ]);
    let (http, grpc) = local.endpoints();

    // Not saturated: local.
    let (status, _, reply) = post_json(http, "/v1/chat/completions", &chat(&model, "Hi", 4));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["baton"]["mode"], "aggregated", "{reply}");
    assert_eq!(refusing.requests.load(Ordering::Relaxed), 0);

    // One long local request fills local admission (max_inflight = 1).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let in_runtime = rt.enter();
    let mut client = InferenceClient::new(channel(grpc));
    let held = rt.block_on(async {
        let mut s = client
            .generate(v1::GenerateRequest {
                input: Some(v1::generate_request::Input::Prompt(
                    "Once upon a time".into(),
                )),
                sampling: Some(v1::SamplingParams {
                    max_tokens: Some(1000),
                    ignore_eos: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("generate")
            .into_inner();
        s.message()
            .await
            .expect("first message")
            .expect("a message");
        s
    });

    // Full: a chat spills, past the refusing upstream (tried first, once) to the real one,
    // and says the same as the upstream called directly.
    let body = chat(&model, "Name one colour of the rainbow.", 8);
    let (status, _, reply) = post_json(http, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let baton = &reply["baton"];
    assert_eq!(baton["mode"], "cloud", "{reply}");
    assert_eq!(baton["upstream"], "baton-cloud", "{reply}");
    assert_eq!(baton["placement_reason"], "local_full", "{reply}");
    assert!(baton["cost_usd"].as_f64().expect("cost") > 0.0, "{reply}");
    assert_eq!(refusing.requests.load(Ordering::Relaxed), 1);
    let (_, _, direct) = post_json(cloud_http, "/v1/chat/completions", &body);
    assert_eq!(
        reply["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"],
        "through the coordinator vs the upstream directly"
    );
    assert_eq!(
        reply["usage"]["completion_tokens"],
        direct["usage"]["completion_tokens"]
    );

    // Token ids never spill; nor does a request that says no: local is full, so 429.
    let tokens = json!({"model": model, "prompt": [1, 2, 3], "max_tokens": 2});
    let (status, headers, reply) = post_json(http, "/v1/completions", &tokens);
    assert_eq!(status, 429, "{reply}");
    assert!(headers.iter().any(|(k, _)| k == "retry-after"));
    let mut refused = body.clone();
    refused["allow_cloud"] = json!(false);
    let (status, _, reply) = post_json(http, "/v1/chat/completions", &refused);
    assert_eq!(status, 429, "{reply}");
    let mut too_dear = body.clone();
    too_dear["max_cost_usd"] = json!(0.000_001);
    let (status, _, reply) = post_json(http, "/v1/chat/completions", &too_dear);
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["param"], "max_cost_usd", "{reply}");

    // gRPC streams a spilled request delta by delta, and its finish says where and what.
    let (deltas, finish) = rt.block_on(async {
        let mut s = client
            .generate(v1::GenerateRequest {
                input: Some(v1::generate_request::Input::Chat(v1::ChatMessages {
                    messages: vec![v1::ChatMessage {
                        role: "user".into(),
                        content: "Write a short sentence about rivers.".into(),
                    }],
                })),
                sampling: Some(v1::SamplingParams {
                    max_tokens: Some(12),
                    temperature: Some(0.0),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("generate spills")
            .into_inner();
        let mut deltas = 0;
        loop {
            let m = s.message().await.expect("message").expect("a finish");
            if !m.text.is_empty() {
                deltas += 1;
            }
            if let Some(f) = m.finish {
                return (deltas, f);
            }
        }
    });
    let placement = finish.placement.expect("placement");
    assert_eq!(placement.mode, "cloud");
    assert_eq!(placement.upstream, "baton-cloud");
    assert!(placement.cost_usd > 0.0);
    assert!(deltas >= 2, "the text came in {deltas} pieces");
    assert!(finish.usage.expect("usage").completion_tokens > 0);

    // The local stream ends (dropping the runtime closes its connection, which cancels it);
    // the OpenAI SDK drives a model only the cloud serves.
    drop((held, client, in_runtime));
    drop(rt);
    let script = repo_root().join("tests/python/openai_cloud_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([
            &format!("http://{http}/v1"),
            "cloud-smol",
            &format!("http://{cloud_http}/v1"),
            &model,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "openai_cloud_client.py: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));

    // What it cost, from the ledger, through `baton budget` and /metrics.
    let budget = baton_budget(&["--coordinator", &grpc.to_string()]);
    let window = &budget["windows"][0];
    assert_eq!(window["scope"], "global");
    assert!(nanos(&window["spent_nanodollars"]) > 0, "{budget}");
    assert_eq!(nanos(&window["reserved_nanodollars"]), 0, "{budget}");
    assert_eq!(budget["open"].as_array().map(Vec::len), Some(0), "{budget}");
    let (_, metrics) = get(http, "/metrics").expect("metrics");
    let spend = metric(
        &metrics,
        "baton_cloud_spend_dollars_total",
        "endpoint=\"baton-cloud\"",
    );
    assert!(
        (spend * 1e9 - nanos(&window["spent_nanodollars"]) as f64).abs() < 10.0,
        "metrics {spend} vs ledger {window}"
    );
    assert!(
        metric(
            &metrics,
            "baton_cloud_spills_total",
            "reason=\"local_full\""
        ) >= 2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "baton_cloud_upstream_errors_total",
            "endpoint=\"refusing\",kind=\"status\""
        ),
        2.0,
        "{metrics}"
    );

    // The key: never in logs, config print, metrics or errors.
    let printed = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "config",
            "print",
            "--role",
            "coordinator",
            "--config",
            config_arg,
        ])
        // `up` gives its coordinator the worker; printed alone it needs one named.
        .args(["--set", "coordinator.decode_workers=[\"127.0.0.1:9\"]"])
        .output()
        .expect("config print");
    assert!(
        printed.status.success(),
        "config print: {}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(printed.contains("api_key_file"), "{printed}");
    let (_, _, error) = post_json(http, "/v1/completions", &tokens);
    let log = local.log_text();
    for (what, text) in [
        ("the cluster's log", log.as_str()),
        ("config print", printed.as_str()),
        ("/metrics", metrics.as_str()),
        ("an error body", &error.to_string()),
        ("baton budget", &budget.to_string()),
    ] {
        assert!(!text.contains(SECRET), "the API key shows in {what}");
    }
    assert!(local.terminate(STOP_BOUND).is_some());
    assert!(cloud.terminate(STOP_BOUND).is_some());
}

/// 200 concurrent requests, local admission of 2, a cap that covers about 50 worst cases:
/// spent + reserved, read from the ledger while they run, never passes the cap; the rest run
/// locally or are refused with the budget message.
#[test]
fn the_cap_holds_under_200_concurrent_requests() {
    let dir = scratch("cap");
    let mut cloud = Cluster::start(&["--colocated"]);
    let (cloud_http, _) = cloud.endpoints();
    let model = served_model(cloud_http);
    // The coordinator's bound: the prompt's bytes (role and content) + 16 template tokens per
    // message + 16, at the input price, and max_tokens at the output price. Every prompt has
    // the same length.
    let content = |i: usize| format!("Say one thing about the number {i:03}.");
    let max_tokens = 6u32;
    let bound = ("user".len() + content(0).len() + 32) as f64;
    let worst = (bound * INPUT_PRICE + f64::from(max_tokens) * OUTPUT_PRICE) / 1e6;
    let cap = 50.5 * worst;
    let config = write_config(
        &dir,
        &[Endpoint {
            name: "baton-cloud",
            base_url: format!("http://{cloud_http}/v1"),
            models: vec![(&model, &model)],
            key_file: None,
            extra: "max_concurrent = 256\n",
        }],
        cap,
    );
    let mut local = Cluster::start(&[
        "--colocated",
        "--config",
        config.to_str().expect("utf-8"),
        "--set",
        "coordinator.max_inflight=2",
    ]);
    let (http, grpc) = local.endpoints();
    let cap_nanos = (cap * 1e9).ceil() as u64;

    // The sampler reads the ledger (through the Budget RPC) as fast as it answers while the
    // requests run.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _in_runtime = rt.enter();
            let mut client = InferenceClient::new(channel(grpc));
            let (mut samples, mut peak) = (0u32, 0u64);
            while !done.load(Ordering::Relaxed) {
                let b = rt
                    .block_on(client.budget(v1::BudgetRequest {}))
                    .expect("budget")
                    .into_inner();
                let w = &b.windows[0];
                let used = w.spent_nanodollars + w.reserved_nanodollars;
                assert!(
                    used <= w.cap_nanodollars,
                    "spent {} + reserved {} passed the cap {}",
                    w.spent_nanodollars,
                    w.reserved_nanodollars,
                    w.cap_nanodollars
                );
                peak = peak.max(used);
                samples += 1;
            }
            (samples, peak)
        })
    };
    let start = Arc::new(Barrier::new(200));
    let clients: Vec<_> = (0..200)
        .map(|i| {
            let (start, body) = (start.clone(), chat(&model, &content(i), max_tokens));
            std::thread::spawn(move || {
                start.wait();
                post(http, "/v1/chat/completions", &body.to_string(), REPLY_LIMIT).expect("POST")
            })
        })
        .collect();
    let replies: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    done.store(true, Ordering::Relaxed);
    let (samples, peak) = sampler.join().expect("sampler");

    let (mut on_cloud, mut on_local, mut refused, mut charged) = (0, 0, 0, 0.0);
    for (status, headers, body) in &replies {
        match status {
            200 => {
                let v: Value = serde_json::from_str(body).expect("json");
                match v["baton"]["mode"].as_str() {
                    Some("cloud") => {
                        on_cloud += 1;
                        charged += v["baton"]["cost_usd"].as_f64().expect("cost");
                    }
                    _ => on_local += 1,
                }
            }
            429 => {
                refused += 1;
                assert!(
                    body.contains("cloud budget is spent") && body.contains("resets at"),
                    "a refusal without the budget message: {body}"
                );
                assert!(headers.iter().any(|(k, _)| k == "retry-after"));
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    println!(
        "cap ${cap:.6} (worst case ${worst:.6}): {on_cloud} on the cloud, {on_local} local, \
         {refused} refused; {samples} ledger samples, peak spent+reserved {peak} of {cap_nanos} nanodollars"
    );
    assert_eq!(on_cloud + on_local + refused, 200);
    assert!(
        on_cloud >= 45,
        "only {on_cloud} spilled under a cap for ~50"
    );
    assert!(refused > 0, "the budget never ran out");
    assert!(samples > 3, "the ledger was sampled {samples} times");
    let budget = baton_budget(&["--coordinator", &grpc.to_string()]);
    let w = &budget["windows"][0];
    assert_eq!(nanos(&w["reserved_nanodollars"]), 0, "{budget}");
    let spent = nanos(&w["spent_nanodollars"]);
    assert!(spent <= cap_nanos, "{budget}");
    assert!(
        (spent as f64 / 1e9 - charged).abs() < 1e-6,
        "the ledger's ${} vs the replies' ${charged}",
        spent as f64 / 1e9
    );
    assert_eq!(w["settled"].as_u64(), Some(on_cloud as u64), "{budget}");
    assert!(local.terminate(STOP_BOUND).is_some());
    assert!(cloud.terminate(STOP_BOUND).is_some());
}

/// SIGKILL the coordinator with cloud requests in flight, restart it: the ledger shows every
/// settled charge and every open reservation, and nothing is counted twice.
#[test]
fn a_killed_coordinator_keeps_every_charge_and_reservation() {
    let dir = scratch("kill");
    let mut cloud = Cluster::start(&["--colocated"]);
    let (cloud_http, _) = cloud.endpoints();
    let model = served_model(cloud_http);
    let config = write_config(
        &dir,
        &[Endpoint {
            name: "baton-cloud",
            base_url: format!("http://{cloud_http}/v1"),
            models: vec![("cloud-smol", &model)],
            key_file: None,
            extra: "",
        }],
        50.0,
    );
    let config_arg = config.to_str().expect("utf-8");
    let mut local = Cluster::start(&["--colocated", "--config", config_arg]);
    let (http, _) = local.endpoints();

    let mut settled_cost = 0.0;
    for i in 0..3 {
        let (status, _, reply) = post_json(
            http,
            "/v1/chat/completions",
            &chat("cloud-smol", &format!("Count to {i}."), 4),
        );
        assert_eq!(status, 200, "{reply}");
        settled_cost += reply["baton"]["cost_usd"].as_f64().expect("cost");
    }
    let mut long = chat("cloud-smol", "Tell a long story about a lighthouse.", 1500);
    long["stream"] = json!(true);
    let in_flight: Vec<_> = (0..4)
        .map(|_| open_stream(http, "/v1/chat/completions", &long))
        .collect();
    let coordinator = local
        .children()
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).split('\0').nth(1) == Some("coordinator"))
                .unwrap_or(false)
        })
        .expect("the coordinator process");
    common::signal_pid(coordinator, libc::SIGKILL);
    drop(in_flight);
    let _ = local.terminate(STOP_BOUND);

    let offline = baton_budget(&["--offline", "--config", config_arg]);
    let open = offline["open"].as_array().expect("open").clone();
    assert_eq!(open.len(), 4, "{offline}");
    let w = &offline["windows"][0];
    let reserved: u64 = open.iter().map(|r| nanos(&r["amount_nanodollars"])).sum();
    assert_eq!(nanos(&w["reserved_nanodollars"]), reserved, "{offline}");
    assert_eq!(w["settled"].as_u64(), Some(3), "{offline}");
    assert!(
        (nanos(&w["spent_nanodollars"]) as f64 / 1e9 - settled_cost).abs() < 1e-6,
        "{offline} vs ${settled_cost}"
    );
    assert!(open.iter().all(|r| r["from_previous_run"] == json!(true)));

    // Restarted: the same ledger; the dead run's reservations can never be settled, so the
    // start charges them in full (the upstream may have billed them), and new requests settle.
    let mut local = Cluster::start(&["--colocated", "--config", config_arg]);
    let (http, grpc) = local.endpoints();
    // The restarted coordinator logs each leftover it closed (its `Started` applied).
    const CLOSED: &str = "left open when this coordinator last stopped was closed";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while local.log_text().matches(CLOSED).count() < open.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            local.next_line(left).is_some(),
            "the restart closed fewer than {} leftovers:\n{}",
            open.len(),
            local.log_text()
        );
    }
    let online = baton_budget(&["--coordinator", &grpc.to_string()]);
    assert_eq!(online["open"].as_array().map(Vec::len), Some(0), "{online}");
    let charged = nanos(&online["windows"][0]["spent_nanodollars"]);
    assert_eq!(
        charged,
        nanos(&w["spent_nanodollars"]) + reserved,
        "{online}"
    );
    assert_eq!(
        nanos(&online["windows"][0]["reserved_nanodollars"]),
        0,
        "{online}"
    );
    let (status, _, reply) = post_json(
        http,
        "/v1/chat/completions",
        &chat("cloud-smol", "Count to 9.", 4),
    );
    assert_eq!(status, 200, "{reply}");
    let after = baton_budget(&["--coordinator", &grpc.to_string()]);
    let cost = reply["baton"]["cost_usd"].as_f64().expect("cost");
    assert!(
        (nanos(&after["windows"][0]["spent_nanodollars"]) as f64 / 1e9
            - (charged as f64 / 1e9 + cost))
            .abs()
            < 1e-6,
        "{after}"
    );
    assert_eq!(after["open"].as_array().map(Vec::len), Some(0), "{after}");
    assert!(local.terminate(STOP_BOUND).is_some());
    assert!(cloud.terminate(STOP_BOUND).is_some());
}

/// An upstream that never answers is left after its first-token timeout and the next one
/// serves; one that cuts its stream after text reached the client fails that stream, charged
/// its full reservation; a client that goes away cancels the upstream call.
#[test]
fn upstream_faults_retry_once_or_fail_the_stream_and_cancel_reaches_the_upstream() {
    let dir = scratch("faults");
    let mut cloud = Cluster::start(&["--colocated"]);
    let (cloud_http, _) = cloud.endpoints();
    let model = served_model(cloud_http);
    let silent = MisbehavingUpstream::start(Fault::NeverAnswers);
    let cutting = MisbehavingUpstream::start(Fault::DropMidStream);
    let endless = MisbehavingUpstream::start(Fault::Endless);
    let config = write_config(
        &dir,
        &[
            Endpoint {
                name: "silent",
                base_url: silent.base_url(),
                models: vec![("cloud-smol", &model)],
                key_file: None,
                extra: "first_token_timeout = \"500ms\"\n",
            },
            Endpoint {
                name: "baton-cloud",
                base_url: format!("http://{cloud_http}/v1"),
                models: vec![("cloud-smol", &model)],
                key_file: None,
                extra: "",
            },
            Endpoint {
                name: "cutting",
                base_url: cutting.base_url(),
                models: vec![("cut-model", "whatever")],
                key_file: None,
                extra: "",
            },
            Endpoint {
                name: "endless",
                base_url: endless.base_url(),
                models: vec![("endless-model", "whatever")],
                key_file: None,
                extra: "",
            },
        ],
        50.0,
    );
    let mut local = Cluster::start(&["--colocated", "--config", config.to_str().expect("utf-8")]);
    let (http, grpc) = local.endpoints();

    let (status, _, reply) = post_json(
        http,
        "/v1/chat/completions",
        &chat("cloud-smol", "Hello", 4),
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["baton"]["upstream"], "baton-cloud", "{reply}");
    assert_eq!(silent.requests.load(Ordering::Relaxed), 1);

    let mut cut = chat("cut-model", "Hello", 50);
    cut["stream"] = json!(true);
    let (status, _, body) =
        post(http, "/v1/chat/completions", &cut.to_string(), REPLY_LIMIT).expect("POST");
    assert_eq!(status, 200, "the stream started: {body}");
    assert!(
        body.contains("Half"),
        "the text before the cut reached the client: {body}"
    );
    assert!(
        body.contains("\"error\""),
        "the cut stream ends with an error: {body}"
    );
    let budget = baton_budget(&["--coordinator", &grpc.to_string()]);
    let cutting_spend = budget["upstreams"]
        .as_array()
        .expect("upstreams")
        .iter()
        .find(|u| u["endpoint"] == "cutting")
        .map(|u| nanos(&u["spent_nanodollars"]))
        .unwrap_or(0);
    // Charged its full reservation: every prompt byte bound and all 50 output tokens.
    let bound = ("user".len() + "Hello".len() + 32) as f64;
    let worst = ((bound * INPUT_PRICE + 50.0 * OUTPUT_PRICE) / 1e6 * 1e9).ceil() as u64;
    assert!(
        cutting_spend.abs_diff(worst) <= 2,
        "the cut stream was charged {cutting_spend}, its reservation {worst}: {budget}"
    );

    // A client that leaves mid-stream: the upstream's connection is closed (the endless
    // upstream says so on its channel).
    let mut long = chat("endless-model", "Tell a long story.", 1500);
    long["stream"] = json!(true);
    drop(open_stream(http, "/v1/chat/completions", &long));
    assert!(
        endless.closed.recv_timeout(REPLY_LIMIT).is_ok(),
        "the upstream never saw the request cancelled"
    );
    assert!(local.terminate(STOP_BOUND).is_some());
    assert!(cloud.terminate(STOP_BOUND).is_some());
}

/// A coordinator whose only decode worker never answers: requests for the local model go to
/// the cloud, saying why; one that does not allow the cloud gets 503.
#[test]
fn without_a_live_local_worker_requests_spill_and_say_why() {
    let dir = scratch("workerless");
    let mut cloud = Cluster::start(&["--colocated"]);
    let (cloud_http, _) = cloud.endpoints();
    let model = served_model(cloud_http);
    let config = write_config(
        &dir,
        &[Endpoint {
            name: "baton-cloud",
            base_url: format!("http://{cloud_http}/v1"),
            models: vec![(&model, &model)],
            key_file: None,
            extra: "",
        }],
        10.0,
    );
    let coordinator = common::Proc::start(
        &[
            "coordinator",
            "--config",
            config.to_str().expect("utf-8"),
            // Nothing listens on the discard port: the worker never answers.
            "--decode-worker",
            "127.0.0.1:9",
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
        2,
    );
    let http = coordinator.addrs[1];
    let (status, _, reply) = post_json(http, "/v1/chat/completions", &chat(&model, "Hi", 4));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["baton"]["mode"], "cloud", "{reply}");
    assert_eq!(
        reply["baton"]["placement_reason"], "no_local_worker",
        "{reply}"
    );
    let mut local_only = chat(&model, "Hi", 4);
    local_only["allow_cloud"] = json!(false);
    let (status, _, reply) = post_json(http, "/v1/chat/completions", &local_only);
    assert_eq!(status, 503, "{reply}");
    drop(coordinator);
    assert!(cloud.terminate(STOP_BOUND).is_some());
}

/// Bad cloud settings stop start-up with the full key.
#[test]
fn bad_cloud_settings_name_their_key() {
    let dir = scratch("bad-config");
    let cases = [
        (
            "[[coordinator.cloud.endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
             models = { m = \"m\" }\ninput_usd_per_mtok = -1.0\noutput_usd_per_mtok = 1.0\n\
             [coordinator.cloud.budget]\nledger = \"/tmp/l.redb\"\ncaps = [{ period = \"day\", cap_usd = 1.0 }]\n",
            "coordinator.cloud.endpoints[0].input_usd_per_mtok",
        ),
        (
            "[[coordinator.cloud.endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
             models = { m = \"m\" }\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n\
             [coordinator.cloud.budget]\nledger = \"/tmp/l.redb\"\n",
            "coordinator.cloud.budget.caps",
        ),
        (
            "[[coordinator.cloud.endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
             models = { m = \"m\" }\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n\
             [coordinator.cloud.budget]\nledger = \"/tmp/l.redb\"\ntime_zone = \"Mars/Olympus\"\n\
             caps = [{ period = \"day\", cap_usd = 1.0 }]\n",
            "coordinator.cloud.budget.time_zone",
        ),
        (
            "[[coordinator.cloud.endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\n\
             models = { m = \"m\" }\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n\
             [coordinator.cloud.budget]\nledger = \"/tmp/l.redb\"\n\
             caps = [{ period = \"day\", cap_usd = 1.0, endpoint = \"b\" }]\n",
            "coordinator.cloud.budget.caps[0].endpoint",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["config", "print", "--role", "coordinator", "--config"])
            .arg(&path)
            .args(["--set", "coordinator.decode_workers=[\"127.0.0.1:9\"]"])
            .output()
            .expect("config print");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} was accepted");
        assert!(
            stderr.contains(key),
            "case {i}: {stderr} does not name {key}"
        );
    }
}
