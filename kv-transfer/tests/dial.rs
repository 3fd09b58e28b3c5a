//! How the agent dials peers (RELIABILITY.md, "Chaos", finding 4): a peer that accepts and never
//! answers its hello (a stopped process: the kernel still accepts) delays connects to itself
//! only; concurrent connects to one peer share one link; a failed dial is retried by the next
//! connect.
//!
//! Real sockets on 127.0.0.1: real agents, and plain listeners that hold what they accept
//! (silent) or relay it to an agent while counting (a proxy). No check sleeps; timeouts are
//! upper bounds that turn a hang into a failure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_core::{Fingerprint, KvDType, LayoutDescriptor, WorkerId};
use baton_kv_transfer::agent::{Agent, HostPool, KvConfig};
use baton_kv_transfer::memory::{HostRegion, PoolLayout};
use baton_kv_transfer::{Endpoint, Error};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(20);
/// Long enough that a connect stuck behind a silent peer's handshake cannot pass for a quick one.
const HANDSHAKE: Duration = Duration::from_secs(4);
const STREAMS: usize = 2;

async fn agent(name: &str) -> Agent {
    let pool = PoolLayout {
        layout: LayoutDescriptor {
            fingerprint: Fingerprint([1; 32]),
            dtype: KvDType::F32,
            block_size: 4,
            num_layers: 2,
            layers: 0..2,
            num_kv_heads: 2,
            kv_heads: 0..2,
            head_dim: 8,
        },
        num_blocks: 4,
    };
    let region = Arc::new(HostRegion::private(pool.region_bytes() as usize).expect("memory"));
    let config = KvConfig {
        tcp_streams: STREAMS,
        handshake_timeout: HANDSHAKE,
        ..KvConfig::default()
    };
    let memory = Arc::new(HostPool { region, pool });
    let (agent, mut events) =
        Agent::start(WorkerId::parse(name).expect("id"), memory, config, None)
            .await
            .expect("agent starts");
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    agent
}

fn tcp(agent: &Agent) -> Endpoint {
    agent
        .endpoints()
        .into_iter()
        .find(|e| matches!(e, Endpoint::Tcp(_)))
        .expect("a tcp endpoint")
}

/// A listener that accepts and never reads or writes, like a SIGSTOPped worker's; says on the
/// returned channel each time it accepted.
async fn silent() -> (Endpoint, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
            let _ = tx.send(());
        }
    });
    (Endpoint::Tcp(addr), rx)
}

/// A TCP relay in front of `to` that counts the connections it accepted, and closes them at once
/// instead while `refuse` is set.
struct Proxy {
    endpoint: Endpoint,
    accepted: Arc<AtomicUsize>,
    refuse: Arc<AtomicBool>,
}

async fn proxy(to: &Endpoint) -> Proxy {
    let Endpoint::Tcp(to) = *to else {
        panic!("a tcp endpoint")
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(false));
    let (count, refusing) = (accepted.clone(), refuse.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            if refusing.load(Ordering::SeqCst) {
                continue;
            }
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(to).await.expect("relay");
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    Proxy {
        endpoint: Endpoint::Tcp(addr),
        accepted,
        refuse,
    }
}

#[tokio::test]
async fn a_silent_peer_does_not_delay_connects_to_other_peers() {
    let decode = agent("decode-0").await;
    let prefill = agent("prefill-0").await;
    let (stopped, mut accepted) = silent().await;

    let dialer = decode.clone();
    let target = stopped.clone();
    let pending = tokio::spawn(async move {
        let started = Instant::now();
        let result = dialer.connect(&target).await.map(|_| ());
        (result, started.elapsed())
    });
    // Accepted: the dial to the silent peer is in its handshake now.
    tokio::time::timeout(LIMIT, accepted.recv())
        .await
        .expect("the silent peer accepts within the limit")
        .expect("the silent listener is alive");

    let started = Instant::now();
    let peer = tokio::time::timeout(LIMIT, decode.connect(&tcp(&prefill)))
        .await
        .expect("a connect within the limit")
        .expect("the healthy peer connects");
    let took = started.elapsed();
    assert_eq!(peer.worker().as_str(), "prefill-0");
    assert!(
        took < HANDSHAKE / 4,
        "the healthy connect took {took:?}, behind a silent peer's {HANDSHAKE:?} handshake"
    );
    assert!(
        !pending.is_finished(),
        "the silent peer's dial ended before its handshake timed out"
    );
    assert!(decode.is_connected(&tcp(&prefill)).await);
    assert!(!decode.is_connected(&stopped).await);

    let (result, waited) = tokio::time::timeout(LIMIT, pending)
        .await
        .expect("the silent dial ends within the limit")
        .expect("the dial task");
    assert!(
        matches!(result, Err(Error::Timeout { .. })),
        "the silent dial timed out: {result:?}"
    );
    assert!(
        waited >= HANDSHAKE,
        "the silent dial gave up after {waited:?}"
    );
}

#[tokio::test]
async fn concurrent_connects_to_one_peer_share_one_link() {
    let decode = agent("decode-0").await;
    let prefill = agent("prefill-0").await;
    let relay = proxy(&tcp(&prefill)).await;

    let connect = || async {
        tokio::time::timeout(LIMIT, decode.connect(&relay.endpoint))
            .await
            .expect("a connect within the limit")
            .expect("the peer connects")
    };
    let (a, b, c) = tokio::join!(connect(), connect(), connect());
    for p in [&a, &b, &c] {
        assert_eq!(p.worker().as_str(), "prefill-0");
    }
    assert_eq!(
        relay.accepted.load(Ordering::SeqCst),
        STREAMS,
        "one link's streams, dialed once"
    );
    connect().await;
    assert_eq!(relay.accepted.load(Ordering::SeqCst), STREAMS, "reused");
}

#[tokio::test]
async fn a_failed_dial_is_retried_by_the_next_connect() {
    let decode = agent("decode-0").await;
    let prefill = agent("prefill-0").await;
    let relay = proxy(&tcp(&prefill)).await;

    relay.refuse.store(true, Ordering::SeqCst);
    let refused = tokio::time::timeout(LIMIT, decode.connect(&relay.endpoint))
        .await
        .expect("a connect within the limit");
    assert!(refused.is_err(), "a peer that hangs up is not connected");
    assert!(!decode.is_connected(&relay.endpoint).await);

    relay.refuse.store(false, Ordering::SeqCst);
    let peer = tokio::time::timeout(LIMIT, decode.connect(&relay.endpoint))
        .await
        .expect("a connect within the limit")
        .expect("the next connect dials again");
    assert_eq!(peer.worker().as_str(), "prefill-0");
    assert!(decode.is_connected(&relay.endpoint).await);
}
