//! A cluster spread over hosts that find each other by mDNS: network namespaces joined by a
//! bridge, each host with its own host id, real `baton` processes in them. Workers started
//! after the coordinator are used within seconds; a SIGKILLed worker leaves placement within
//! the coordinator's `leave_after` and requests route around it; a restarted one rejoins; KV
//! crosses hosts over TCP and stays in shared memory within one; outputs equal the
//! single-process reference. The cluster is the secured one `baton certs` configures (mutual
//! TLS, KV links that prove the cluster key): workers on every interface refuse to start without
//! it. Needs root (namespaces), as the README's test command runs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_discovery::Backend;
use baton_proto::v1::{self, inference_client::InferenceClient};
use common::lan::Lan;
use common::{Proc, START_LIMIT, channel, model};

/// The coordinator's `leave_after` in this test.
const LEAVE_AFTER: Duration = Duration::from_secs(2);

/// What the issue promises: a worker started later is used within this.
const JOIN_LIMIT: Duration = Duration::from_secs(5);

struct Setup {
    lan: Lan,
    /// The cluster key `baton certs` wrote.
    key: std::path::PathBuf,
    /// Its config file: every role's certificate and the cluster key (workers listen on every
    /// interface, so they refuse to start without both).
    security: std::path::PathBuf,
    cluster: String,
    model: String,
    dir: std::path::PathBuf,
}

impl Setup {
    fn discovery(&self) -> Vec<String> {
        vec![
            "--discovery".into(),
            "mdns".into(),
            "--cluster-key-file".into(),
            self.key.display().to_string(),
            "--cluster".into(),
            self.cluster.clone(),
            "--config".into(),
            self.security.display().to_string(),
        ]
    }

    /// A worker on host `host` (its host id `host-<host>`), listening on every interface.
    fn worker(&self, host: usize, role: &str, id: &str) -> Proc {
        let socket = self.dir.join(format!("{id}.sock"));
        let mut args: Vec<String> = vec![
            role.into(),
            "--model".into(),
            self.model.clone(),
            "--listen".into(),
            "0.0.0.0:0".into(),
            "--kv-listen".into(),
            "0.0.0.0:0".into(),
            "--kv-shm-socket".into(),
            socket.display().to_string(),
            "--kv-cache-mib".into(),
            "128".into(),
            "--no-metrics".into(),
            "--worker-id".into(),
            id.into(),
            "--set".into(),
            format!("{role}.host_id=host-{host}"),
        ];
        args.extend(self.discovery());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start_with(&self.lan.exec(host), &args, 1)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn status(grpc: SocketAddr) -> Vec<v1::WorkerStatus> {
    InferenceClient::new(channel(grpc))
        .cluster_status(v1::ClusterStatusRequest {})
        .await
        .map(|r| r.into_inner().workers)
        .unwrap_or_default()
}

/// Waits (bounded) until `check` holds for the coordinator's view; returns how long it took.
async fn wait_for(
    grpc: SocketAddr,
    limit: Duration,
    what: &str,
    check: impl Fn(&[v1::WorkerStatus]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let workers = status(grpc).await;
        if check(&workers) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what} not within {limit:?}; the coordinator sees {workers:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state_of<'a>(workers: &'a [v1::WorkerStatus], id: &str) -> Option<&'a str> {
    workers
        .iter()
        .find(|w| w.worker_id == id)
        .map(|w| w.state.as_str())
}

fn prompt() -> Vec<u32> {
    const TEXT: &[u32] = &[
        6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 411, 260, 8718, 28,
    ];
    TEXT.iter().copied().cycle().take(96).collect()
}

/// One greedy request, forced disaggregated: its tokens and placement.
async fn generate(grpc: SocketAddr, prompt: &[u32]) -> (Vec<u32>, v1::Placement) {
    let mut stream = InferenceClient::new(channel(grpc))
        .generate(v1::GenerateRequest {
            input: Some(v1::generate_request::Input::TokenIds(v1::TokenIds {
                ids: prompt.to_vec(),
            })),
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.0),
                max_tokens: Some(8),
                ..Default::default()
            }),
            pd_mode: v1::PdMode::Force as i32,
            ..Default::default()
        })
        .await
        .expect("generate accepted")
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = stream.message().await.expect("stream") {
        tokens.extend(&m.token_ids);
        if let Some(f) = m.finish {
            return (tokens, f.placement.expect("placement"));
        }
    }
    panic!("the stream ended without a finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_other_hosts_join_leave_and_rejoin_over_mdns() {
    let dir = std::env::temp_dir().join(format!("baton-lan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The secured setup a user makes: certificates and a cluster key from `baton certs`.
    let certs = dir.join("certs");
    common::certs(&certs);
    let setup = Setup {
        lan: Lan::new(2),
        key: certs.join("cluster.key"),
        security: certs.join("tls.toml"),
        cluster: format!("lan{}", std::process::id()),
        model: model(),
        dir,
    };
    let prompt = prompt();
    let reference = tokio::task::spawn_blocking({
        let prompt = prompt.clone();
        move || baton_e2e::reference(&[prompt], 8).remove(0)
    });

    // The coordinator on host 0 (this namespace), on its LAN address.
    let here = setup.lan.addr(0);
    let mut args: Vec<String> = vec![
        "coordinator".into(),
        "--model".into(),
        setup.model.clone(),
        "--grpc".into(),
        format!("{here}:0"),
        "--http".into(),
        format!("{here}:0"),
        // The test LAN is this machine's own namespaces: no API keys.
        "--set".into(),
        "coordinator.auth.insecure_remote=true".into(),
        "--set".into(),
        format!(
            "coordinator.discovery.leave_after={}ms",
            LEAVE_AFTER.as_millis()
        ),
    ];
    args.extend(setup.discovery());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let coordinator = Proc::start(&args, 2);
    let grpc = coordinator.addrs[0];

    // Host 2: a prefill worker. Host 1: a decode worker, started after the coordinator.
    let _prefill = setup.worker(2, "prefill", "prefill-h2");
    let mut decode_a = setup.worker(1, "decode", "decode-h1");
    let joined = wait_for(grpc, JOIN_LIMIT, "decode-h1 joining", |w| {
        state_of(w, "decode-h1") == Some("routable")
    })
    .await;
    eprintln!("decode-h1 was routable {joined:?} after it listened");
    wait_for(grpc, START_LIMIT, "prefill-h2 joining", |w| {
        state_of(w, "prefill-h2") == Some("routable")
    })
    .await;
    let listed = status(grpc).await;
    assert!(
        listed.iter().all(|w| w.discovered_via == "mdns"),
        "{listed:#?}"
    );
    let decode_h1 = listed
        .iter()
        .find(|w| w.worker_id == "decode-h1")
        .expect("listed");
    assert!(
        decode_h1.address.starts_with(&setup.lan.addr(1)),
        "dialled at its LAN address: {decode_h1:?}"
    );

    // Across hosts: TCP; the output equals the single-process reference.
    let reference = reference.await.expect("reference");
    let (tokens, placement) = generate(grpc, &prompt).await;
    assert_eq!(placement.decode_worker, "decode-h1");
    assert_eq!(placement.prefill_worker, "prefill-h2");
    let kv = placement.kv.expect("kv stats");
    assert_eq!(kv.transport, v1::Transport::Tcp as i32, "across hosts");
    assert!(kv.bytes > 0);
    assert_eq!(tokens, reference, "host 2 -> host 1 equals one process");
    let links = InferenceClient::new(channel(grpc))
        .cluster_status(v1::ClusterStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .links;
    let link = links
        .iter()
        .find(|l| l.prefill_worker == "prefill-h2" && l.decode_worker == "decode-h1")
        .expect("the pair is listed");
    assert!(!link.shm, "hosts apart: no shared memory: {link:?}");

    // A second decode worker on host 2, next to the prefill worker.
    let started = Instant::now();
    let _decode_b = setup.worker(2, "decode", "decode-h2");
    let joined = wait_for(grpc, JOIN_LIMIT, "decode-h2 joining", |w| {
        state_of(w, "decode-h2") == Some("routable")
    })
    .await;
    eprintln!(
        "decode-h2 was routable {joined:?} after it listened ({:?} after its start)",
        started.elapsed()
    );

    // SIGKILL host 1's decode worker: it leaves placement, requests go to host 2 (same host
    // as the prefill worker: shared memory), outputs unchanged.
    decode_a.kill();
    let left = wait_for(
        grpc,
        LEAVE_AFTER + Duration::from_secs(2),
        "decode-h1 leaving",
        |w| state_of(w, "decode-h1").is_some_and(|s| s != "routable"),
    )
    .await;
    eprintln!("decode-h1 left placement {left:?} after SIGKILL");
    wait_for(
        grpc,
        LEAVE_AFTER + Duration::from_secs(2),
        "decode-h1 silent",
        |w| state_of(w, "decode-h1") == Some("silent"),
    )
    .await;
    for _ in 0..2 {
        let (tokens, placement) = generate(grpc, &prompt).await;
        assert_eq!(
            placement.decode_worker, "decode-h2",
            "routed around the dead worker"
        );
        let kv = placement.kv.expect("kv stats");
        assert_eq!(kv.transport, v1::Transport::Shm as i32, "within one host");
        assert_eq!(tokens, reference, "host 2 -> host 2 equals one process");
    }

    // Restarted (same id): it rejoins.
    let _decode_a = setup.worker(1, "decode", "decode-h1");
    wait_for(grpc, JOIN_LIMIT, "decode-h1 rejoining", |w| {
        state_of(w, "decode-h1") == Some("routable")
    })
    .await;

    // An advert signed with another key: ignored, counted, never listed.
    let forger = baton_discovery::mdns::MdnsBackend::new(
        setup.cluster.clone(),
        baton_discovery::ClusterKey::new(b"not the cluster's key, 32 bytes!").expect("key"),
        Some(here.clone()),
    )
    .expect("mdns daemon");
    let _forged = forger
        .announce(baton_discovery::Advert {
            cluster: setup.cluster.clone(),
            worker_id: baton_core::WorkerId::parse("decode-forged").expect("id"),
            role: baton_discovery::Role::Decode,
            fingerprint: baton_core::Fingerprint([0; 32]),
            host_id: "host-0".into(),
            grpc_port: 1,
            event_port: 0,
            host: None,
            issued_ms: baton_discovery::advert::now_ms(),
        })
        .await
        .expect("announce");
    let http = coordinator.addrs[1];
    let start = Instant::now();
    loop {
        let (_, metrics) = common::get(http, "/metrics").expect("metrics");
        if metrics.lines().any(|l| {
            l.starts_with("baton_discovery_adverts_refused_total{reason=\"bad_signature\"}")
        }) {
            break;
        }
        assert!(
            start.elapsed() < JOIN_LIMIT,
            "the forged advert was not counted:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        state_of(&status(grpc).await, "decode-forged").is_none(),
        "a forged advert never becomes a worker"
    );
    // Load and KV events arrived on the event plane (signed under the same key).
    let (_, metrics) = common::get(http, "/metrics").expect("metrics");
    let received: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("baton_events_received_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(received > 0.0, "no events were applied:\n{metrics}");
    drop(coordinator);
}
