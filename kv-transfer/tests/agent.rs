//! The conformance suite of the transfer agent's backends: every check runs over TCP and over
//! shared memory (`tcp_*` / `shm_*` tests), between two agents in this process with real sockets
//! and real pools. Raw frames, written by hand on a socket that did the handshake, stand in for a
//! misbehaving or dying peer.
//!
//! No check sleeps: progress is observed through events and counters; timeouts are only upper
//! bounds that turn a hang into a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use baton_core::{BlockId, Fingerprint, HandoffId, KvDType, LayoutDescriptor, WorkerId};
use baton_kv_transfer::Endpoint;
use baton_kv_transfer::FailureReason;
use baton_kv_transfer::agent::{
    Agent, Event, Expectation, Guard, HostPool, KvConfig, LinkKey, Peer, Source, Transport,
};
use baton_kv_transfer::memory::{ByteCopy, Half, HostRegion, PoolLayout, SeqBlocks, layer_copies};
use baton_kv_transfer::wire::{self, Header, Hello, Kind, LandedRange, Notice, ReadRequest};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(20);
const LAYERS: u32 = 3;
const BLOCKS: u32 = 16;

fn layout(fingerprint: u8) -> LayoutDescriptor {
    LayoutDescriptor {
        fingerprint: Fingerprint([fingerprint; 32]),
        dtype: KvDType::F32,
        block_size: 4,
        num_layers: LAYERS,
        layers: 0..LAYERS,
        num_kv_heads: 2,
        kv_heads: 0..2,
        head_dim: 8,
    }
}

struct Side {
    agent: Agent,
    events: mpsc::Receiver<Event>,
    region: Arc<HostRegion>,
    pool: PoolLayout,
}

impl Side {
    async fn event(&mut self) -> Event {
        tokio::time::timeout(LIMIT, self.events.recv())
            .await
            .expect("an event within the limit")
            .expect("the agent is alive")
    }

    /// The next event that is not a layer landing or a keepalive.
    async fn outcome(&mut self) -> Event {
        loop {
            match self.event().await {
                Event::LayerLanded { .. } | Event::Keepalive { .. } => continue,
                e => return e,
            }
        }
    }

    fn endpoint(&self, t: Transport) -> Endpoint {
        self.agent
            .endpoints()
            .into_iter()
            .find(|e| {
                matches!(
                    (e, t),
                    (Endpoint::Tcp(_), Transport::Tcp) | (Endpoint::Shm(_), Transport::Shm)
                )
            })
            .expect("an endpoint of that transport")
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        // SAFETY: the test reads after the transfer ended; nothing writes concurrently.
        unsafe { self.region.bytes(offset, len) }
            .expect("inside")
            .to_vec()
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn socket_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "baton-agent-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn side(name: &str, fingerprint: u8, shared: bool, shm: bool) -> Side {
    side_with(name, fingerprint, shared, shm, false, None).await
}

/// A side whose direct copies are checksummed or not (`shm_checksums`), whose links prove
/// `key` or none.
async fn side_with(
    name: &str,
    fingerprint: u8,
    shared: bool,
    shm: bool,
    checksums: bool,
    key: Option<LinkKey>,
) -> Side {
    let pool = PoolLayout {
        layout: layout(fingerprint),
        num_blocks: BLOCKS,
    };
    let len = pool.region_bytes() as usize;
    let region = Arc::new(if shared {
        HostRegion::shared(len, name).expect("memfd")
    } else {
        HostRegion::private(len).expect("memory")
    });
    let config = KvConfig {
        shm_socket: shm.then(socket_path),
        tcp_streams: 3,
        max_write: 100,
        shm_checksums: checksums,
        ..KvConfig::default()
    };
    let memory = Arc::new(HostPool {
        region: region.clone(),
        pool: pool.clone(),
    });
    let (agent, events) = Agent::start(WorkerId::parse(name).expect("id"), memory, config, key)
        .await
        .expect("agent starts");
    Side {
        agent,
        events,
        region,
        pool,
    }
}

/// A prefill side (private pool) and a decode side (shareable pool, so shm writes are direct).
async fn pair(t: Transport) -> (Side, Side) {
    let shm = t == Transport::Shm;
    (
        side("prefill-0", 1, false, shm).await,
        side("decode-0", 1, true, shm).await,
    )
}

/// Distinct rows: every byte of the prefill pool's sequence rows carries a position-dependent
/// value, the rest stays zero.
fn fill(side: &Side, blocks: &[BlockId], tokens: u32) {
    let bs = side.pool.layout.block_size;
    for layer in 0..LAYERS {
        for half in Half::BOTH {
            for head in 0..2 {
                for pos in 0..tokens {
                    let at =
                        side.pool
                            .offset(layer, half, blocks[(pos / bs) as usize], head, pos % bs);
                    let value =
                        (layer * 97 + head * 31 + pos * 7 + u32::from(half == Half::V) * 3 + 1)
                            as u8;
                    // SAFETY: the test owns the pool; nothing else writes it now.
                    unsafe { side.region.bytes_mut(at, side.pool.row_bytes() as usize) }
                        .expect("inside")
                        .fill(value);
                }
            }
        }
    }
}

/// Every filled row of the sequence equal on both sides.
fn assert_moved(p: &Side, pb: &[BlockId], d: &Side, db: &[BlockId], tokens: u32) {
    let bs = p.pool.layout.block_size;
    let row = p.pool.row_bytes() as usize;
    for layer in 0..LAYERS {
        for half in Half::BOTH {
            for head in 0..2 {
                for pos in 0..tokens {
                    let (b, s) = ((pos / bs) as usize, pos % bs);
                    let from = p.bytes(p.pool.offset(layer, half, pb[b], head, s), row);
                    let to = d.bytes(d.pool.offset(layer, half, db[b], head, s), row);
                    assert_eq!(
                        from, to,
                        "layer {layer} {half:?} head {head} position {pos}"
                    );
                }
            }
        }
    }
}

fn blocks(ids: &[u32]) -> Vec<BlockId> {
    ids.iter().copied().map(BlockId).collect()
}

fn guard() -> Guard {
    Arc::new(())
}

fn expectation(tokens: u32, blocks: Vec<BlockId>, guard: Guard) -> Expectation {
    Expectation {
        tokens,
        layers: 0..LAYERS,
        heads: 0..2,
        blocks,
        guard,
    }
}

fn copies(
    p: &Side,
    pb: &[BlockId],
    d: &PoolLayout,
    db: &[BlockId],
    tokens: u32,
    layer: u32,
) -> Vec<ByteCopy> {
    let mut out = Vec::new();
    layer_copies(
        layer,
        &(0..2),
        &(0..tokens.div_ceil(4)),
        tokens,
        SeqBlocks {
            pool: &p.pool,
            blocks: pb,
        },
        SeqBlocks {
            pool: d,
            blocks: db,
        },
        &mut out,
    );
    out
}

/// Pushes every layer as the prefill worker does: owned bytes over TCP, direct copies (after a
/// claim) over shared memory.
async fn push(
    p: &Side,
    peer: &Peer,
    handoff: HandoffId,
    pb: &[BlockId],
    db: &[BlockId],
    tokens: u32,
) {
    if peer.direct() {
        peer.begin(handoff).await.expect("claim granted");
    }
    for layer in 0..LAYERS {
        let cs = copies(p, pb, peer.pool(), db, tokens, layer);
        if peer.direct() {
            let ranges = peer.write_direct(&cs).expect("direct copy");
            peer.landed(handoff, layer, ranges)
                .await
                .expect("landed notice");
        } else {
            let pieces: Vec<(u64, Vec<u8>)> = cs
                .iter()
                .map(|c| (c.dst, p.bytes(c.src, c.len as usize)))
                .collect();
            peer.write(handoff, layer, &pieces).await.expect("write");
        }
    }
}

async fn complete(peer: &Peer, handoff: HandoffId, completion: &[u8]) {
    peer.notify(
        handoff,
        &Notice::Complete {
            bytes: 1,
            transfer_us: 1,
            completion: completion.to_vec(),
        },
    )
    .await
    .expect("complete");
}

async fn push_moves_every_row_once_and_delivers_the_completion(t: Transport) {
    let (p, mut d) = pair(t).await;
    let (pb, db) = (blocks(&[3, 7, 0, 12, 5]), blocks(&[1, 2, 3, 9, 15]));
    let tokens = 18; // the last block holds 2 of 4 rows
    fill(&p, &pb, tokens);
    let handoff = HandoffId(7);
    let reserved = guard();
    d.agent
        .expect(handoff, expectation(tokens, db.clone(), reserved.clone()))
        .expect("expect");
    let peer = p.agent.connect(&d.endpoint(t)).await.expect("connect");
    assert_eq!(peer.worker().as_str(), "decode-0");
    assert_eq!(
        peer.direct(),
        t == Transport::Shm,
        "shm maps the decode pool"
    );
    push(&p, &peer, handoff, &pb, &db, tokens).await;
    let mut landed = Vec::new();
    complete(&peer, handoff, b"first token").await;
    let arrived = loop {
        match d.event().await {
            Event::LayerLanded { handoff: h, layer } if h == handoff => landed.push(layer),
            e => break e,
        }
    };
    landed.sort();
    assert_eq!(landed, vec![0, 1, 2], "every layer lands once");
    let Event::Arrived {
        handoff: h,
        bytes,
        completion,
        ..
    } = arrived
    else {
        panic!("expected arrival, got {arrived:?}");
    };
    assert_eq!(h, handoff);
    assert_eq!(completion, b"first token");
    let expected = u64::from(LAYERS) * 2 * 2 * u64::from(tokens) * p.pool.row_bytes();
    assert_eq!(bytes, expected, "exactly the sequence's rows");
    assert_moved(&p, &pb, &d, &db, tokens);
    // Nothing outside the reserved blocks was touched.
    for b in 0..BLOCKS {
        if db.contains(&BlockId(b)) {
            continue;
        }
        let at = d.pool.offset(0, Half::K, BlockId(b), 0, 0);
        assert!(
            d.bytes(at, d.pool.block_half_bytes() as usize)
                .iter()
                .all(|&x| x == 0)
        );
    }
    assert_eq!(
        d.agent.counts(),
        (0, 0, 0),
        "the arrived handoff is forgotten"
    );
    assert_eq!(
        Arc::strong_count(&reserved),
        1,
        "the agent let go of the blocks"
    );
    let stats = d.agent.stats().snapshot();
    assert_eq!(stats.handoffs_completed, 1);
    assert_eq!(stats.frames_rejected, 0);
}

async fn pull_reads_a_pinned_source_and_tells_the_source_when_done(t: Transport) {
    let (mut p, mut d) = pair(t).await;
    let (pb, db) = (blocks(&[9, 8, 7]), blocks(&[0, 4, 5]));
    let tokens = 12;
    fill(&p, &pb, tokens);
    let handoff = HandoffId(21);
    let pinned = guard();
    p.agent
        .offer(
            handoff,
            Source {
                tokens,
                blocks: pb.clone(),
                completion: b"token 42".to_vec(),
                guard: pinned.clone(),
            },
        )
        .expect("offer");
    d.agent
        .expect(handoff, expectation(tokens, db.clone(), guard()))
        .expect("expect");
    d.agent
        .read(
            &p.endpoint(t),
            handoff,
            ReadRequest {
                tokens,
                layers: 0..LAYERS,
                heads: 0..2,
                source_blocks: pb.clone(),
                dest_blocks: db.clone(),
                first_block: 0,
            },
        )
        .await
        .expect("read requested");
    match d.outcome().await {
        Event::Arrived { completion, .. } => assert_eq!(completion, b"token 42"),
        e => panic!("expected arrival, got {e:?}"),
    }
    assert_moved(&p, &pb, &d, &db, tokens);
    match p.outcome().await {
        Event::ReadStarted { handoff: h } => assert_eq!(h, handoff, "the source hears of the read"),
        e => panic!("expected the read to start, got {e:?}"),
    }
    match p.outcome().await {
        Event::ReadDone {
            handoff: h, bytes, ..
        } => {
            assert_eq!(h, handoff);
            assert_eq!(
                bytes,
                u64::from(LAYERS) * 4 * u64::from(tokens) * p.pool.row_bytes()
            );
        }
        e => panic!("expected the reader's done, got {e:?}"),
    }
    assert!(p.agent.withdraw(handoff));
    assert_eq!(
        Arc::strong_count(&pinned),
        1,
        "no reader holds the source any more"
    );
}

async fn a_read_of_what_is_not_offered_is_refused(t: Transport) {
    let (p, mut d) = pair(t).await;
    let handoff = HandoffId(5);
    d.agent
        .expect(handoff, expectation(4, blocks(&[0]), guard()))
        .expect("expect");
    d.agent
        .read(
            &p.endpoint(t),
            handoff,
            ReadRequest {
                tokens: 4,
                layers: 0..LAYERS,
                heads: 0..2,
                source_blocks: blocks(&[1]),
                dest_blocks: blocks(&[0]),
                first_block: 0,
            },
        )
        .await
        .expect("sent");
    match d.outcome().await {
        Event::Failed { handoff: h, error } => {
            assert_eq!(h, handoff);
            assert!(error.to_string().contains("no source"), "{error}");
        }
        e => panic!("expected a failure, got {e:?}"),
    }
}

async fn an_incompatible_peer_is_refused_at_the_handshake(t: Transport) {
    let shm = t == Transport::Shm;
    let p = side("prefill-x", 2, false, shm).await;
    let d = side("decode-x", 1, true, shm).await;
    let err = match p.agent.connect(&d.endpoint(t)).await {
        Ok(_) => panic!("another model's pool was accepted"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("fingerprint"), "{err}");
}

async fn links_prove_the_cluster_key_and_refuse_a_peer_without_it(t: Transport) {
    let shm = t == Transport::Shm;
    let key = || Some(LinkKey::new([7; 32]));
    let d = side_with("decode-k", 1, true, shm, false, key()).await;
    let endpoint = d.endpoint(t);

    let p = side_with("prefill-k", 1, false, shm, false, key()).await;
    let peer = p.agent.connect(&endpoint).await.expect("same key");
    assert_eq!(peer.worker().as_str(), "decode-k");
    assert_eq!(peer.direct(), shm, "the pool is mapped once authenticated");

    for (name, other) in [
        ("prefill-wrong", Some(LinkKey::new([8; 32]))),
        ("prefill-none", None),
    ] {
        let p = side_with(name, 1, false, shm, false, other).await;
        let err = match p.agent.connect(&endpoint).await {
            Ok(_) => panic!("{name}: a peer without the key was accepted"),
            Err(e) => e,
        };
        assert_eq!(
            err.reason(),
            FailureReason::Unauthenticated,
            "{name}: {err}"
        );
        assert!(err.to_string().contains("cluster"), "{name}: {err}");
        let stats = p.agent.stats().snapshot();
        assert_eq!(
            stats.links_failed(FailureReason::Unauthenticated),
            1,
            "{name}"
        );
    }

    // A hand-written keyless peer: it hears the agent's offer, then its refusal, then the end;
    // never the agent's hello (its layout) nor, over shm, its pool's memfd (which rides with the
    // hello).
    let mut offer = vec![1u8, 0];
    offer.extend_from_slice(&[0x42; 32]);
    let mut sent = wire::frame(Kind::Auth, HandoffId(0), &offer).expect("frame");
    let hello = Hello {
        worker: WorkerId::parse("raw-peer").expect("id"),
        pool: d.pool.clone(),
    };
    sent.extend(wire::frame(Kind::Hello, HandoffId(0), &hello.encode()).expect("frame"));
    let mut got = Vec::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        match &endpoint {
            Endpoint::Tcp(addr) => {
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                s.write_all(&sent).await.expect("send");
                s.read_to_end(&mut got).await
            }
            Endpoint::Shm(path) => {
                let mut s = tokio::net::UnixStream::connect(path)
                    .await
                    .expect("connect");
                s.write_all(&sent).await.expect("send");
                s.read_to_end(&mut got).await
            }
        }
    };
    // The refused peer's writes may meet a closed socket: only what it read matters.
    let _ = tokio::time::timeout(LIMIT, read)
        .await
        .expect("the agent hangs up");
    let mut kinds = Vec::new();
    let mut rest = &got[..];
    while let Some((head, after)) = rest.split_first_chunk::<{ wire::HEADER_LEN }>() {
        let h = Header::decode(head, &wire::Limits::default()).expect("a frame");
        let (body, tail) = after.split_at(h.payload_len as usize);
        if h.kind == Kind::Close {
            let (code, message) = wire::decode_close(body).expect("close");
            assert_eq!(code, wire::CloseCode::Unauthenticated, "{message}");
        }
        kinds.push(h.kind);
        rest = tail;
    }
    assert_eq!(
        kinds,
        vec![Kind::Auth, Kind::Close],
        "what the keyless peer heard"
    );
}

async fn writes_outside_the_reserved_blocks_or_twice_are_refused(t: Transport) {
    let (p, mut d) = pair(t).await;
    let (pb, db) = (blocks(&[0, 1]), blocks(&[6, 7]));
    let tokens = 8;
    fill(&p, &pb, tokens);
    let handoff = HandoffId(9);
    d.agent
        .expect(handoff, expectation(tokens, db.clone(), guard()))
        .expect("expect");
    let peer = p.agent.connect(&d.endpoint(t)).await.expect("connect");
    // Block 8 is not reserved: the frame is dropped, nothing lands there, the handoff goes on.
    let outside = d.pool.offset(0, Half::K, BlockId(8), 0, 0);
    peer.write(handoff, 0, &[(outside, vec![0xee; 32])])
        .await
        .expect("sent");
    let cs = copies(&p, &pb, &d.pool, &db, tokens, 0);
    let first: Vec<(u64, Vec<u8>)> = cs
        .iter()
        .map(|c| (c.dst, p.bytes(c.src, c.len as usize)))
        .collect();
    peer.write(handoff, 0, &first).await.expect("layer 0");
    // Layer 0 again: every frame overlaps what landed.
    peer.write(handoff, 0, &first).await.expect("layer 0 again");
    for layer in 1..LAYERS {
        let cs = copies(&p, &pb, &d.pool, &db, tokens, layer);
        let pieces: Vec<(u64, Vec<u8>)> = cs
            .iter()
            .map(|c| (c.dst, p.bytes(c.src, c.len as usize)))
            .collect();
        peer.write(handoff, layer, &pieces).await.expect("layer");
    }
    complete(&peer, handoff, b"ok").await;
    match d.outcome().await {
        Event::Arrived { .. } => {}
        e => panic!("expected arrival, got {e:?}"),
    }
    assert_moved(&p, &pb, &d, &db, tokens);
    assert!(
        d.bytes(outside, 32).iter().all(|&x| x == 0),
        "block 8 untouched"
    );
    let stats = d.agent.stats().snapshot();
    assert!(stats.frames_rejected > first.len() as u64, "{stats:?}");
}

async fn direct_writes_claimed_by_no_one_or_misplaced_fail_the_handoff(t: Transport) {
    // Only shared memory writes into the peer directly.
    let (p, mut d) = pair(t).await;
    let handoff = HandoffId(11);
    d.agent
        .expect(handoff, expectation(4, blocks(&[2]), guard()))
        .expect("expect");
    let peer = p.agent.connect(&d.endpoint(t)).await.expect("connect");
    if !peer.direct() {
        return;
    }
    // A claim for a handoff nobody expects is refused.
    assert!(peer.begin(HandoffId(999)).await.is_err());
    peer.begin(handoff).await.expect("claim");
    let outside = d.pool.offset(1, Half::V, BlockId(3), 0, 0);
    peer.landed(
        handoff,
        1,
        vec![LandedRange {
            offset: outside,
            len: 32,
            crc: None,
        }],
    )
    .await
    .expect("sent");
    match d.outcome().await {
        Event::Failed { handoff: h, error } => {
            assert_eq!(h, handoff);
            assert!(error.to_string().contains("outside"), "{error}");
        }
        e => panic!("expected a failure, got {e:?}"),
    }
}

/// With `shm_checksums` a writer's direct ranges carry the crc32c of what it copied and the
/// receiver checks each in place: a checksummed push lands exactly, and a range whose bytes
/// differ from its checksum fails the handoff.
async fn checksummed_direct_writes_are_checked_in_place(t: Transport) {
    let shm = t == Transport::Shm;
    let p = side_with("prefill-0", 1, false, shm, true, None).await;
    let mut d = side("decode-0", 1, true, shm).await;
    let peer = p.agent.connect(&d.endpoint(t)).await.expect("connect");
    if !peer.direct() {
        return;
    }
    let (pb, db) = (blocks(&[0, 1]), blocks(&[5, 3]));
    fill(&p, &pb, 6);

    let good = HandoffId(21);
    d.agent
        .expect(good, expectation(6, db.clone(), guard()))
        .expect("expect");
    peer.begin(good).await.expect("claim");
    for layer in 0..LAYERS {
        let cs = copies(&p, &pb, peer.pool(), &db, 6, layer);
        let ranges = peer.write_direct(&cs).expect("direct copy");
        for (r, c) in ranges.iter().zip(&cs) {
            let copied = crc32c::crc32c(&p.bytes(c.src, c.len as usize));
            assert_eq!(r.crc, Some(copied), "the checksum of the bytes copied");
        }
        peer.landed(good, layer, ranges).await.expect("landed");
    }
    complete(&peer, good, b"ok").await;
    match d.outcome().await {
        Event::Arrived { handoff, .. } => assert_eq!(handoff, good),
        e => panic!("expected the arrival, got {e:?}"),
    }
    assert_moved(&p, &pb, &d, &db, 6);

    let bad = HandoffId(22);
    d.agent
        .expect(bad, expectation(6, db.clone(), guard()))
        .expect("expect");
    peer.begin(bad).await.expect("claim");
    let cs = copies(&p, &pb, peer.pool(), &db, 6, 0);
    let mut ranges = peer.write_direct(&cs).expect("direct copy");
    ranges[0].crc = ranges[0].crc.map(|c| c ^ 1);
    peer.landed(bad, 0, ranges).await.expect("landed");
    match d.outcome().await {
        Event::Failed { handoff, error } => {
            assert_eq!(handoff, bad);
            assert!(error.to_string().contains("checksum mismatch"), "{error}");
        }
        e => panic!("expected a failure, got {e:?}"),
    }
}

/// A socket to `d` that did the handshake by hand, as a peer holding `d`'s layout.
enum Raw {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl Raw {
    async fn open(d: &Side, t: Transport) -> Raw {
        let hello = Hello {
            worker: WorkerId::parse("raw-peer").expect("id"),
            pool: d.pool.clone(),
        }
        .encode();
        // A keyless auth offer (`agent::auth`), the first frame each way; the agent's comes
        // back before the hellos.
        let mut offer = vec![1u8, 0];
        offer.extend_from_slice(&[0x42; 32]);
        let offer = wire::frame(Kind::Auth, HandoffId(0), &offer).expect("frame");
        let mut raw = match d.endpoint(t) {
            Endpoint::Tcp(addr) => {
                let mut payload = hello;
                // The TCP extra: nonce, stream 0 of 1.
                let mut extra = 77u64.to_le_bytes().to_vec();
                extra.extend_from_slice(&0u16.to_le_bytes());
                extra.extend_from_slice(&1u16.to_le_bytes());
                payload.extend_from_slice(&(extra.len() as u32).to_le_bytes());
                payload.extend_from_slice(&extra);
                let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                s.write_all(&offer).await.expect("offer");
                s.write_all(&wire::frame(Kind::Hello, HandoffId(0), &payload).expect("frame"))
                    .await
                    .expect("hello");
                Raw::Tcp(s)
            }
            Endpoint::Shm(path) => {
                let mut payload = hello;
                // The shm extra: no memfd rides with this hello.
                payload.extend_from_slice(&1u32.to_le_bytes());
                payload.push(0);
                let mut s = tokio::net::UnixStream::connect(path)
                    .await
                    .expect("connect");
                s.write_all(&offer).await.expect("offer");
                s.write_all(&wire::frame(Kind::Hello, HandoffId(0), &payload).expect("frame"))
                    .await
                    .expect("hello");
                Raw::Unix(s)
            }
        };
        // The agent's own offer and hello come back; read them off.
        assert_eq!(raw.frame().await.0, Kind::Auth);
        assert_eq!(raw.frame().await.0, Kind::Hello);
        raw
    }

    /// The next frame's kind and payload.
    async fn frame(&mut self) -> (Kind, Vec<u8>) {
        let mut head = [0u8; wire::HEADER_LEN];
        self.read_exact(&mut head).await;
        let h = Header::decode(&head, &wire::Limits::default()).expect("header");
        let mut body = vec![0u8; h.payload_len as usize];
        self.read_exact(&mut body).await;
        (h.kind, body)
    }

    async fn read_exact(&mut self, buf: &mut [u8]) {
        use tokio::io::AsyncReadExt;
        match self {
            Raw::Tcp(s) => s.read_exact(buf).await.map(drop),
            Raw::Unix(s) => s.read_exact(buf).await.map(drop),
        }
        .expect("read");
    }

    async fn send(&mut self, bytes: &[u8]) {
        match self {
            Raw::Tcp(s) => s.write_all(bytes).await,
            Raw::Unix(s) => s.write_all(bytes).await,
        }
        .expect("send");
    }

    fn write_frame(
        handoff: HandoffId,
        layer: u32,
        offset: u64,
        payload: &[u8],
        crc: u32,
    ) -> Vec<u8> {
        let mut h = Header::new(Kind::Write, handoff, payload.len(), crc).expect("header");
        h.layer = layer;
        h.offset = offset;
        let mut f = h.encode().to_vec();
        f.extend_from_slice(payload);
        f
    }
}

async fn a_corrupt_payload_fails_the_handoff(t: Transport) {
    let (_p, mut d) = pair(t).await;
    let handoff = HandoffId(13);
    let db = blocks(&[4]);
    d.agent
        .expect(handoff, expectation(4, db.clone(), guard()))
        .expect("expect");
    let mut raw = Raw::open(&d, t).await;
    let at = d.pool.offset(0, Half::K, db[0], 0, 0);
    let payload = vec![5u8; 32];
    let wrong = crc32c::crc32c(&payload) ^ 1;
    raw.send(&Raw::write_frame(handoff, 0, at, &payload, wrong))
        .await;
    match d.outcome().await {
        Event::Failed { handoff: h, error } => {
            assert_eq!(h, handoff);
            assert!(error.to_string().contains("checksum"), "{error}");
        }
        e => panic!("expected a failure, got {e:?}"),
    }
    assert_eq!(d.agent.counts().0, 0, "the failed handoff is forgotten");
}

async fn a_peer_that_dies_mid_transfer_fails_its_handoffs(t: Transport) {
    let (_p, mut d) = pair(t).await;
    let handoff = HandoffId(17);
    let db = blocks(&[1, 2]);
    let reserved = guard();
    d.agent
        .expect(handoff, expectation(8, db.clone(), reserved.clone()))
        .expect("expect");
    let mut raw = Raw::open(&d, t).await;
    let at = d.pool.offset(2, Half::V, db[0], 0, 0);
    let payload = vec![9u8; 64];
    let frame = Raw::write_frame(handoff, 2, at, &payload, crc32c::crc32c(&payload));
    // The header and half the payload, then the peer is gone.
    raw.send(&frame[..wire::HEADER_LEN + 32]).await;
    drop(raw);
    match d.outcome().await {
        Event::Failed { handoff: h, error } => {
            assert_eq!(h, handoff);
            assert!(error.to_string().contains("closed"), "{error}");
        }
        e => panic!("expected a failure, got {e:?}"),
    }
    assert_eq!(
        Arc::strong_count(&reserved),
        1,
        "no writer holds the blocks"
    );
}

async fn unknown_and_late_frames_are_rejected_and_counted(t: Transport) {
    let (_p, mut d) = pair(t).await;
    let mut raw = Raw::open(&d, t).await;
    let payload = vec![1u8; 16];
    raw.send(&Raw::write_frame(
        HandoffId(404),
        0,
        0,
        &payload,
        crc32c::crc32c(&payload),
    ))
    .await;
    // A handoff that ended: its late frames are rejected the same way.
    let handoff = HandoffId(405);
    d.agent
        .expect(handoff, expectation(4, blocks(&[0]), guard()))
        .expect("expect");
    assert!(d.agent.forget(handoff));
    raw.send(&Raw::write_frame(
        handoff,
        0,
        0,
        &payload,
        crc32c::crc32c(&payload),
    ))
    .await;
    let late = wire::frame(
        Kind::Notice,
        handoff,
        &Notice::Complete {
            bytes: 1,
            transfer_us: 1,
            completion: vec![],
        }
        .encode(),
    )
    .expect("frame");
    raw.send(&late).await;
    // A handoff expected after them still arrives: the link survived the rejections.
    let next = HandoffId(406);
    let db = blocks(&[3]);
    d.agent
        .expect(next, expectation(1, db.clone(), guard()))
        .expect("expect");
    for layer in 0..LAYERS {
        for half in Half::BOTH {
            for head in 0..2 {
                let at = d.pool.offset(layer, half, db[0], head, 0);
                let row = vec![3u8; d.pool.row_bytes() as usize];
                raw.send(&Raw::write_frame(
                    next,
                    layer,
                    at,
                    &row,
                    crc32c::crc32c(&row),
                ))
                .await;
            }
        }
    }
    let done = wire::frame(
        Kind::Notice,
        next,
        &Notice::Complete {
            bytes: 1,
            transfer_us: 1,
            completion: b"after".to_vec(),
        }
        .encode(),
    )
    .expect("frame");
    raw.send(&done).await;
    match d.outcome().await {
        Event::Arrived {
            handoff,
            completion,
            ..
        } => {
            assert_eq!(handoff, next);
            assert_eq!(completion, b"after");
        }
        e => panic!("expected the next handoff to arrive, got {e:?}"),
    }
    let stats = d.agent.stats().snapshot();
    assert!(stats.frames_rejected >= 2, "{stats:?}");
    assert_eq!(stats.handoffs_failed, 0);
}

async fn a_cancel_stops_the_writer_before_the_blocks_are_reused(t: Transport) {
    let (mut p, mut d) = pair(t).await;
    let handoff = HandoffId(31);
    let reserved = guard();
    d.agent
        .expect(handoff, expectation(4, blocks(&[0]), reserved.clone()))
        .expect("expect");
    let peer = p.agent.connect(&d.endpoint(t)).await.expect("connect");
    if peer.direct() {
        peer.begin(handoff).await.expect("claim");
    } else {
        // A TCP writer becomes known with its first frame.
        peer.notify(handoff, &Notice::Keepalive)
            .await
            .expect("keepalive");
        match d.event().await {
            Event::Keepalive { handoff: h } => assert_eq!(h, handoff),
            e => panic!("expected the keepalive, got {e:?}"),
        }
    }
    assert!(d.agent.forget(handoff));
    match p.outcome().await {
        Event::Cancelled { handoff: h } => assert_eq!(h, handoff),
        e => panic!("expected a cancel, got {e:?}"),
    }
    if peer.direct() {
        // The writer may still be copying: the blocks stay reserved until it says it stopped.
        assert_eq!(d.agent.counts().1, 1, "quarantined");
        assert!(Arc::strong_count(&reserved) > 1);
        peer.notify(handoff, &Notice::Stopped)
            .await
            .expect("stopped");
        let deadline = tokio::time::Instant::now() + LIMIT;
        while d.agent.counts().1 != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "quarantine never ended"
            );
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(
        Arc::strong_count(&reserved),
        1,
        "the blocks are free to reuse"
    );
}

/// A handoff the receiver gave up before any of its frames arrived (its lease expired while the
/// writer was stopped) has no known writer to cancel; the writer's first refused write tells it
/// to stop, where a resumed prefill worker used to push every layer into the void (RELIABILITY.md,
/// chaos finding 6). Over shared memory the claim itself is refused.
async fn writes_for_a_handoff_given_up_unseen_are_cancelled(t: Transport) {
    let (mut p, d) = pair(t).await;
    let handoff = HandoffId(77);
    let db = blocks(&[0]);
    d.agent
        .expect(handoff, expectation(4, db.clone(), guard()))
        .expect("expect");
    assert!(d.agent.forget(handoff));
    let peer = p.agent.connect(&d.endpoint(t)).await.expect("connect");
    if peer.direct() {
        assert!(peer.begin(handoff).await.is_err(), "the claim is refused");
        return;
    }
    let pb = blocks(&[1]);
    for layer in 0..2 {
        let pieces: Vec<(u64, Vec<u8>)> = copies(&p, &pb, peer.pool(), &db, 4, layer)
            .iter()
            .map(|c| (c.dst, p.bytes(c.src, c.len as usize)))
            .collect();
        peer.write(handoff, layer, &pieces).await.expect("write");
    }
    match p.outcome().await {
        Event::Cancelled { handoff: h } => assert_eq!(h, handoff),
        e => panic!("expected the writer to be cancelled, got {e:?}"),
    }
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod tcp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::Transport::Tcp).await
                }
            )*
        }
        mod shm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::$check(super::Transport::Shm).await
                }
            )*
        }
    };
}

conformance!(
    push_moves_every_row_once_and_delivers_the_completion,
    pull_reads_a_pinned_source_and_tells_the_source_when_done,
    a_read_of_what_is_not_offered_is_refused,
    an_incompatible_peer_is_refused_at_the_handshake,
    links_prove_the_cluster_key_and_refuse_a_peer_without_it,
    writes_outside_the_reserved_blocks_or_twice_are_refused,
    direct_writes_claimed_by_no_one_or_misplaced_fail_the_handoff,
    a_corrupt_payload_fails_the_handoff,
    a_peer_that_dies_mid_transfer_fails_its_handoffs,
    unknown_and_late_frames_are_rejected_and_counted,
    a_cancel_stops_the_writer_before_the_blocks_are_reused,
    checksummed_direct_writes_are_checked_in_place,
    writes_for_a_handoff_given_up_unseen_are_cancelled,
);
