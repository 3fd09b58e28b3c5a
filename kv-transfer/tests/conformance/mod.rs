//! The conformance suite every KV transport runs: TCP (`tests/tcp.rs`) and shared memory
//! (`tests/shm.rs`) today, device transports later. Each check is a function generic over a
//! [`Backend`], which knows how to connect a sender to a receiver and how to put raw frame bytes
//! on a link.
//!
//! No check sleeps: progress is observed through deliveries and counters; timeouts are only
//! upper bounds that turn a hang into a failure.

#![allow(async_fn_in_trait, dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{Fingerprint, KvChunk, KvDType, LayoutDescriptor};
use baton_kv_transfer::frame::{FrameHeader, FrameKind, encode_frame};
use baton_kv_transfer::{
    Delivery, Error, Expectation, FailureReason, HandoffId, KvReceiver, KvSegment, KvSender,
    Result, Shard,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

/// Upper bound on any single wait; reaching it is a failure, not a pacing device.
pub const LIMIT: Duration = Duration::from_secs(20);

/// How a test wants its pair connected.
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Streams per pair, for transports that open several.
    pub streams: usize,
    pub delivery_capacity: usize,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            streams: 3,
            delivery_capacity: 4,
        }
    }
}

/// A transport under test.
pub trait Backend {
    type Sender: KvSender + 'static;
    type Receiver: KvReceiver + 'static;
    type Raw: RawLink;

    /// A receiver holding layout `dst`, and a sender holding `src` connected to it, or the error
    /// connecting failed with.
    async fn pair(
        &self,
        src: LayoutDescriptor,
        dst: LayoutDescriptor,
        opts: PairOptions,
    ) -> (
        Self::Receiver,
        mpsc::Receiver<Delivery>,
        Result<Self::Sender>,
    );

    /// A link to `receiver` that has done the handshake as a sender holding `src` and `shard`,
    /// on which the test puts arbitrary frame bytes.
    async fn raw(
        &self,
        receiver: &Self::Receiver,
        src: &LayoutDescriptor,
        shard: Shard,
    ) -> Self::Raw;

    /// Most bytes the transport may hold between a sender and a stalled consumer, besides the
    /// deliveries in the consumer's channel, for frames of `frame_bytes`.
    fn in_flight_bound(&self, opts: &PairOptions, frame_bytes: u64) -> u64;
}

/// Raw access to a handshaken link.
pub trait RawLink {
    /// Puts `frame` on the link as the transport carries one whole frame, whatever its bytes.
    async fn send_frame(&mut self, frame: &[u8]);
    /// Puts the first `cut` bytes of `frame` on the link, as far as the transport lets a frame
    /// be partial, then ends the link the way a crashed peer would.
    async fn die_mid_frame(self, frame: &[u8], cut: usize);
}

pub fn model(fingerprint: u8) -> LayoutDescriptor {
    LayoutDescriptor {
        fingerprint: Fingerprint([fingerprint; 32]),
        dtype: KvDType::F16,
        block_size: 4,
        num_layers: 3,
        layers: 0..3,
        num_kv_heads: 2,
        kv_heads: 0..2,
        head_dim: 8,
    }
}

/// Bigger frames, for the back-pressure check: 256 KiB per 4-block segment.
pub fn big_model() -> LayoutDescriptor {
    LayoutDescriptor {
        fingerprint: Fingerprint([3; 32]),
        dtype: KvDType::F16,
        block_size: 16,
        num_layers: 12,
        layers: 0..12,
        num_kv_heads: 8,
        kv_heads: 0..8,
        head_dim: 128,
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not happen within {LIMIT:?}"),
    }
}

pub async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    within("a delivery", rx.recv())
        .await
        .expect("delivery channel open")
}

/// Yields until `cond` holds (counters move on other tasks), failing after [`LIMIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
}

/// A segment of layer `layer`, blocks `blocks`, all heads of `d`, of a `tokens`-token sequence,
/// filled with random bytes.
pub fn segment(
    d: &LayoutDescriptor,
    handoff: HandoffId,
    layer: u32,
    blocks: std::ops::Range<u32>,
    tokens: u32,
    rng: &mut impl Rng,
) -> KvSegment {
    let bs = d.block_size;
    let n = (blocks.end * bs).min(tokens) - (blocks.start * bs).min(tokens);
    let heads = d.kv_heads.len();
    let len = 2 * n as usize * heads * d.head_dim as usize * d.dtype.size();
    let mut data = vec![0u8; len];
    rng.fill(&mut data[..]);
    KvSegment {
        handoff,
        kv_heads: d.kv_heads.clone(),
        chunk: KvChunk {
            layer,
            first_block: blocks.start,
            num_blocks: blocks.len() as u32,
            tokens: n,
            data,
        },
    }
}

/// Every layer of a `tokens`-token sequence, cut into random runs of blocks.
pub fn random_sequence(
    d: &LayoutDescriptor,
    handoff: HandoffId,
    tokens: u32,
    rng: &mut impl Rng,
) -> Vec<KvSegment> {
    let blocks = tokens.div_ceil(d.block_size);
    let mut out = Vec::new();
    for layer in d.layers.clone() {
        let mut b = 0;
        while b < blocks {
            let run = rng.random_range(1..=(blocks - b).min(5));
            out.push(segment(d, handoff, layer, b..b + run, tokens, rng));
            b += run;
        }
    }
    out
}

/// The wire bytes of a kv data frame for `s`, as a sender of `shard` would write them.
pub fn frame_bytes(s: &KvSegment, shard: Shard) -> Vec<u8> {
    let mut h = FrameHeader::new(FrameKind::KvData, &s.chunk.data).expect("small payload");
    h.handoff = s.handoff;
    h.layer = s.chunk.layer;
    h.first_block = s.chunk.first_block;
    h.num_blocks = s.chunk.num_blocks;
    h.tokens = s.chunk.tokens;
    h.kv_heads = s.kv_heads.clone();
    h.shard = shard;
    encode_frame(&h, &s.chunk.data)
}

fn key(s: &KvSegment) -> (HandoffId, u32, u32) {
    (s.handoff, s.chunk.layer, s.chunk.first_block)
}

/// Reads deliveries until every handoff in `sent` has completed; checks each completed only
/// after all its segments arrived, and that what arrived is exactly what was sent.
async fn collect_until_complete(rx: &mut mpsc::Receiver<Delivery>, sent: &[KvSegment]) {
    let mut expected: BTreeMap<_, &KvSegment> = sent.iter().map(|s| (key(s), s)).collect();
    let mut open: HashMap<HandoffId, usize> = HashMap::new();
    for s in sent {
        *open.entry(s.handoff).or_default() += 1;
    }
    while !open.is_empty() {
        match next(rx).await {
            Delivery::Segment(s) => {
                let want = expected.remove(&key(&s)).expect("segment sent once");
                assert_eq!(&s, want, "segment arrived altered");
                *open.get_mut(&s.handoff).expect("handoff still open") -= 1;
            }
            Delivery::Complete(h) => {
                assert_eq!(open.remove(&h), Some(0), "{h} completed early");
            }
            other => panic!("unexpected delivery {other:?}"),
        }
    }
    assert!(expected.is_empty());
}

/// Random block sets of random sequences arrive intact, in any order over several streams, and
/// each handoff completes after its last segment.
pub async fn round_trip_random_block_sets<B: Backend>(backend: &B, seed: u64) {
    let d = model(1);
    let (receiver, mut rx, sender) = backend
        .pair(d.clone(), d.clone(), PairOptions::default())
        .await;
    let sender = sender.expect("connect");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut total_frames = 0u64;
    for round in 0..12 {
        let handoff = HandoffId(seed * 100 + round);
        let tokens = rng.random_range(1..60);
        let mut segments = random_sequence(&d, handoff, tokens, &mut rng);
        segments.shuffle(&mut rng);
        receiver
            .expect(handoff, Expectation::whole_sequence(&d, tokens))
            .expect("expect");
        let (send, check) = tokio::join!(
            async {
                for s in &segments {
                    sender.send(s).await.expect("send");
                }
            },
            collect_until_complete(&mut rx, &segments)
        );
        let ((), ()) = (send, check);
        total_frames += segments.len() as u64;
    }
    let (s, r) = (sender.stats().snapshot(), receiver.stats().snapshot());
    assert_eq!(s.frames_sent, total_frames);
    assert_eq!(r.frames_received, total_frames);
    assert_eq!(r.segments_delivered, total_frames);
    assert_eq!(r.handoffs_completed, 12);
    assert_eq!(r.bytes_received, s.bytes_sent);
    assert_eq!(r.failures, [0; FailureReason::ALL.len()]);
}

/// Payload buffers the consumer hands back ([`KvReceiver::recycle`]) carry later frames intact,
/// whatever a buffer held before and whatever its size, and are reused rather than replaced.
pub async fn recycled_buffers_carry_later_frames_intact<B: Backend>(backend: &B) {
    let d = big_model();
    let (receiver, mut rx, sender) = backend
        .pair(d.clone(), d.clone(), PairOptions::default())
        .await;
    let sender = sender.expect("connect");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let handoff = HandoffId(1);
    // 4 blocks of 16 tokens: 256 KiB per layer, sent whole on even layers and as 64 KiB and
    // 192 KiB on odd ones, so a buffer holds a smaller frame, then a larger one again.
    let tokens = 64;
    receiver
        .expect(handoff, Expectation::whole_sequence(&d, tokens))
        .expect("expect");
    let mut last_buffer = None;
    for layer in d.layers.clone() {
        let cuts: &[u32] = if layer % 2 == 0 { &[0, 4] } else { &[0, 1, 4] };
        for run in cuts.windows(2) {
            let blocks = run[0]..run[1];
            let s = segment(&d, handoff, layer, blocks, tokens, &mut rng);
            sender.send(&s).await.expect("send");
            let Delivery::Segment(got) = next(&mut rx).await else {
                panic!("expected a segment of layer {layer}");
            };
            assert!(
                got.chunk.data == s.chunk.data,
                "layer {layer}: bytes differ"
            );
            if let Some(at) = last_buffer {
                assert_eq!(
                    got.chunk.data.as_ptr(),
                    at,
                    "layer {layer}: the recycled buffer was not reused"
                );
            }
            last_buffer = Some(got.chunk.data.as_ptr());
            receiver.recycle(got.chunk.data);
        }
    }
    assert!(matches!(next(&mut rx).await, Delivery::Complete(h) if h == handoff));
    let r = receiver.stats().snapshot();
    assert_eq!(r.failures, [0; FailureReason::ALL.len()]);
}

/// Several handoffs sent at once from several tasks interleave on the streams; each completes
/// on its own, after all of its own segments.
pub async fn concurrent_handoffs_complete_independently<B: Backend>(backend: &B) {
    let d = model(1);
    let opts = PairOptions {
        streams: 4,
        delivery_capacity: 2,
    };
    let (receiver, mut rx, sender) = backend.pair(d.clone(), d.clone(), opts).await;
    let sender = Arc::new(sender.expect("connect"));
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut all = Vec::new();
    let mut tasks = Vec::new();
    for h in 0..6 {
        let handoff = HandoffId(h);
        let tokens = rng.random_range(20..80);
        let mut segments = random_sequence(&d, handoff, tokens, &mut rng);
        segments.reverse();
        receiver
            .expect(handoff, Expectation::whole_sequence(&d, tokens))
            .expect("expect");
        all.extend(segments.iter().cloned());
        let sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            for s in &segments {
                sender.send(s).await.expect("send");
            }
        }));
    }
    collect_until_complete(&mut rx, &all).await;
    for t in tasks {
        within("sender task", t).await.expect("sender task");
    }
    assert_eq!(receiver.stats().snapshot().handoffs_completed, 6);
}

/// With the consumer stalled, the sender cannot get more than the transport's bound ahead of
/// it; once the consumer reads again, everything arrives.
pub async fn stalled_consumer_bounds_in_flight_bytes<B: Backend>(backend: &B) {
    let d = big_model();
    let opts = PairOptions {
        streams: 2,
        delivery_capacity: 2,
    };
    let tokens = 1024;
    let (receiver, mut rx, sender) = backend.pair(d.clone(), d.clone(), opts.clone()).await;
    let sender = Arc::new(sender.expect("connect"));
    let handoff = HandoffId(1);
    receiver
        .expect(handoff, Expectation::whole_sequence(&d, tokens))
        .expect("expect");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let template = segment(&d, handoff, 0, 0..4, tokens, &mut rng);
    let frame = template.chunk.data.len() as u64 + 56;
    let frames = u64::from(d.num_layers) * 16;
    let total = frames * frame;
    let send_all = {
        let sender = sender.clone();
        tokio::spawn(async move {
            for layer in 0..12 {
                for run in 0..16 {
                    let mut s = template.clone();
                    s.chunk.layer = layer;
                    s.chunk.first_block = run * 4;
                    sender.send(&s).await.expect("send");
                }
            }
        })
    };
    // Stalled: nobody reads `rx`. Wait until a receiving stream is blocked on the consumer and
    // the sender is blocked on the transport.
    wait_until("receiver and sender both blocked", || {
        receiver.stats().snapshot().deliveries_waiting >= 1
            && sender.stats().snapshot().writes_waiting >= 1
    })
    .await;
    let in_flight = sender.stats().snapshot().bytes_sent;
    let bound = opts.delivery_capacity as u64 * frame + backend.in_flight_bound(&opts, frame);
    assert!(
        in_flight <= bound,
        "sender got {in_flight} bytes ahead of a stalled consumer; bound {bound}"
    );
    assert!(bound < total / 4, "test too small to show a bound");
    assert!(
        !send_all.is_finished(),
        "sender finished with the consumer stalled"
    );

    let mut segments = 0;
    loop {
        match next(&mut rx).await {
            Delivery::Segment(_) => segments += 1,
            Delivery::Complete(h) => {
                assert_eq!(h, handoff);
                break;
            }
            other => panic!("unexpected delivery {other:?}"),
        }
    }
    assert_eq!(segments, frames);
    within("sender task", send_all).await.expect("sender task");
    assert_eq!(sender.stats().snapshot().bytes_sent, total);
}

/// A peer that dies inside a frame, past its header or inside it, fails the live handoffs its
/// link carried; the receiver does not wait for the rest.
pub async fn peer_closing_mid_frame_fails_the_handoff<B: Backend>(backend: &B) {
    let d = model(1);
    let (receiver, mut rx, _sender) = backend
        .pair(d.clone(), d.clone(), PairOptions::default())
        .await;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let shard = Shard::default();

    let a = HandoffId(1);
    receiver
        .expect(a, Expectation::whole_sequence(&d, 16))
        .expect("expect");
    let first = frame_bytes(&segment(&d, a, 0, 0..2, 16, &mut rng), shard);
    let second = frame_bytes(&segment(&d, a, 0, 2..4, 16, &mut rng), shard);
    let mut raw = backend.raw(&receiver, &d, shard).await;
    raw.send_frame(&first).await;
    raw.die_mid_frame(&second, second.len() / 2 + 30).await;
    assert!(matches!(next(&mut rx).await, Delivery::Segment(s) if s.handoff == a));
    match next(&mut rx).await {
        Delivery::Failed { handoff, error } => {
            assert_eq!(handoff, a);
            assert_eq!(error.reason(), FailureReason::PeerClosed, "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }

    let b = HandoffId(2);
    receiver
        .expect(b, Expectation::whole_sequence(&d, 16))
        .expect("expect");
    let whole = frame_bytes(&segment(&d, b, 0, 0..2, 16, &mut rng), shard);
    let mut raw = backend.raw(&receiver, &d, shard).await;
    raw.send_frame(&whole).await;
    raw.die_mid_frame(&whole, 20).await;
    assert!(matches!(next(&mut rx).await, Delivery::Segment(s) if s.handoff == b));
    match next(&mut rx).await {
        Delivery::Failed { handoff, error } => {
            assert_eq!(handoff, b);
            assert!(matches!(error, Error::PeerClosed { .. }), "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    assert!(
        !receiver.cancel(a) && !receiver.cancel(b),
        "failed handoffs are over"
    );
    assert_eq!(receiver.stats().snapshot().handoffs_failed, 2);
}

/// A flipped payload byte fails the handoff without delivering the bytes; a flipped header byte
/// is rejected and ends the link.
pub async fn flipped_byte_is_rejected<B: Backend>(backend: &B) {
    let d = model(1);
    let (receiver, mut rx, _sender) = backend
        .pair(d.clone(), d.clone(), PairOptions::default())
        .await;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let shard = Shard::default();

    let a = HandoffId(1);
    receiver
        .expect(a, Expectation::whole_sequence(&d, 8))
        .expect("expect");
    let mut bytes = frame_bytes(&segment(&d, a, 1, 0..2, 8, &mut rng), shard);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    let mut raw = backend.raw(&receiver, &d, shard).await;
    raw.send_frame(&bytes).await;
    match next(&mut rx).await {
        Delivery::Failed { handoff, error } => {
            assert_eq!(handoff, a);
            assert!(matches!(error, Error::PayloadCorrupt { .. }), "{error}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }

    let b = HandoffId(2);
    receiver
        .expect(b, Expectation::whole_sequence(&d, 8))
        .expect("expect");
    let mut bytes = frame_bytes(&segment(&d, b, 1, 0..2, 8, &mut rng), shard);
    bytes[17] ^= 0x01; // the layer field
    let mut raw = backend.raw(&receiver, &d, shard).await;
    raw.send_frame(&bytes).await;
    match next(&mut rx).await {
        Delivery::Rejected {
            handoff: None,
            error,
        } => {
            assert_eq!(error.reason(), FailureReason::Corrupt, "{error}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let r = receiver.stats().snapshot();
    assert_eq!(r.segments_delivered, 0);
    assert_eq!(r.failures(FailureReason::Corrupt), 2);
}

/// Frames of a handoff the receiver does not expect, was never told about or has cancelled
/// (expired), or outside what it expects, are rejected; expected handoffs still complete.
pub async fn frame_for_unknown_handoff_is_rejected<B: Backend>(backend: &B) {
    let d = model(1);
    let (receiver, mut rx, sender) = backend
        .pair(d.clone(), d.clone(), PairOptions::default())
        .await;
    let sender = sender.expect("connect");
    let mut rng = ChaCha8Rng::seed_from_u64(9);

    let unknown = HandoffId(99);
    sender
        .send(&segment(&d, unknown, 0, 0..1, 4, &mut rng))
        .await
        .expect("send");
    match next(&mut rx).await {
        Delivery::Rejected { handoff, error } => {
            assert_eq!(handoff, Some(unknown));
            assert!(
                matches!(error, Error::UnknownHandoff(h) if h == unknown),
                "{error}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }

    let expired = HandoffId(100);
    receiver
        .expect(expired, Expectation::whole_sequence(&d, 4))
        .expect("expect");
    assert!(receiver.cancel(expired));
    sender
        .send(&segment(&d, expired, 0, 0..1, 4, &mut rng))
        .await
        .expect("send");
    assert!(matches!(
        next(&mut rx).await,
        Delivery::Rejected { handoff: Some(h), error: Error::UnknownHandoff(_) } if h == expired
    ));

    let live = HandoffId(101);
    receiver
        .expect(live, Expectation::whole_sequence(&d, 8))
        .expect("expect");
    // Outside the expectation: a block past the sequence, then a duplicate.
    sender
        .send(&segment(&d, live, 0, 2..3, 12, &mut rng))
        .await
        .expect("send");
    assert!(matches!(
        next(&mut rx).await,
        Delivery::Rejected { handoff: Some(h), error: Error::SegmentRejected { .. } } if h == live
    ));
    let segments = random_sequence(&d, live, 8, &mut rng);
    sender.send(&segments[0]).await.expect("send");
    sender.send(&segments[0]).await.expect("send");
    let mut saw_duplicate = false;
    let mut delivered = Vec::new();
    for s in &segments[1..] {
        sender.send(s).await.expect("send");
    }
    loop {
        match next(&mut rx).await {
            Delivery::Segment(s) => delivered.push(s),
            Delivery::Rejected {
                handoff: Some(h),
                error: Error::SegmentRejected { .. },
            } => {
                assert_eq!(h, live);
                saw_duplicate = true;
            }
            Delivery::Complete(h) => {
                assert_eq!(h, live);
                break;
            }
            other => panic!("unexpected delivery {other:?}"),
        }
    }
    assert_eq!(delivered.len(), segments.len());
    // The duplicate may be read on another stream after completion.
    if !saw_duplicate {
        assert!(
            matches!(next(&mut rx).await, Delivery::Rejected { handoff: Some(h), .. } if h == live)
        );
    }
    assert_eq!(receiver.stats().snapshot().frames_rejected, 4);
}

/// A sender holding another model's layout is refused at the handshake, on both sides.
pub async fn descriptor_from_another_model_is_refused_at_handshake<B: Backend>(backend: &B) {
    let (receiver, _rx, sender) = backend
        .pair(model(2), model(1), PairOptions::default())
        .await;
    match sender {
        Err(e) => assert!(
            matches!(
                e.reason(),
                FailureReason::Refused | FailureReason::Incompatible
            ),
            "{e}"
        ),
        Ok(_) => panic!("a sender of another model connected"),
    }
    assert!(
        receiver
            .stats()
            .snapshot()
            .failures(FailureReason::Incompatible)
            >= 1
    );

    let mut other_block_size = model(1);
    other_block_size.block_size = 8;
    let (_receiver, _rx, sender) = backend
        .pair(other_block_size, model(1), PairOptions::default())
        .await;
    assert!(
        sender.is_err(),
        "a sender with another block size connected"
    );
}
