//! What every transport (TCP and shared memory now; RDMA, device copies later) offers, and the
//! receiving side's handoff bookkeeping they all share.
//!
//! The prefill side holds a [`KvSender`] connected to one decode worker and sends
//! [`KvSegment`]s: one layer's KV for a run of blocks and a range of kv heads. The decode side
//! holds a [`KvReceiver`], tells it which handoffs to [`expect`](KvReceiver::expect), and reads
//! [`Delivery`]s from a bounded channel: verified segments, then `Complete` once every
//! (layer, block, kv head) of the handoff has been delivered, or `Failed` with a typed error.
//!
//! Every receiver keeps one `ReceiverCore` (expected handoffs, counters, the consumer's
//! channel) and serves each connection from a sender shard as an `Inbound`, which admits, verifies
//! and delivers frames the same way whatever carried their bytes.
//!
//! Invariants: a segment reaches the consumer only after its checksum is verified and its place
//! in an expected handoff is admitted; each unit of a handoff is admitted at most once; a handoff
//! ends exactly once (`Complete` after its last segment was delivered, or `Failed`).

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use baton_core::{KvChunk, LayoutDescriptor};
use tokio::sync::mpsc;

use crate::error::{Error, FailureReason, Result};
use crate::frame::{FrameHeader, FrameKind, HandoffId, Shard};

/// One layer's KV for a run of blocks and a range of kv heads, on its way to a decode worker.
/// `chunk.data` holds K then V, each `(kv_heads, tokens, head_dim)` row-major, for exactly the
/// heads in `kv_heads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSegment {
    pub handoff: HandoffId,
    /// Global kv-head indices the data carries.
    pub kv_heads: Range<u32>,
    pub chunk: KvChunk,
}

/// What a decode worker expects of one handoff: every block in `blocks` of every layer in
/// `layers`, for the kv heads in `kv_heads`, of a sequence of `tokens` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    pub tokens: u32,
    pub layers: Range<u32>,
    pub kv_heads: Range<u32>,
    pub blocks: Range<u32>,
}

impl Expectation {
    /// All of a sequence's KV that a destination shard with layout `d` holds.
    pub fn whole_sequence(d: &LayoutDescriptor, tokens: u32) -> Self {
        Self {
            tokens,
            layers: d.layers.clone(),
            kv_heads: d.kv_heads.clone(),
            blocks: 0..tokens.div_ceil(d.block_size),
        }
    }

    fn units(&self) -> usize {
        self.layers.len() * self.kv_heads.len() * self.blocks.len()
    }
}

/// What the consumer of a receiver reads.
#[derive(Debug)]
pub enum Delivery {
    /// A verified segment of an expected handoff.
    Segment(KvSegment),
    /// Every segment of the handoff has been delivered.
    Complete(HandoffId),
    /// The handoff failed; none of its later frames will be delivered.
    Failed { handoff: HandoffId, error: Error },
    /// A frame that belongs to no live handoff (unknown, ended, or unreadable) was dropped.
    Rejected {
        handoff: Option<HandoffId>,
        error: Error,
    },
}

/// The sending side of a transport, connected to one decode worker.
pub trait KvSender: Send + Sync {
    /// The decode worker's layout, learned at handshake.
    fn peer(&self) -> &LayoutDescriptor;

    /// Sends one segment. Returns once the transport has taken the bytes (for TCP: the kernel
    /// accepted them); waits while the receiver is behind.
    fn send(&self, segment: &KvSegment) -> impl Future<Output = Result<()>> + Send;

    fn stats(&self) -> &Stats;
}

/// The receiving side of a transport, in a decode worker.
pub trait KvReceiver: Send + Sync {
    /// Admits frames of `handoff` as described; frames of handoffs not expected are rejected.
    fn expect(&self, handoff: HandoffId, expectation: Expectation) -> Result<()>;

    /// Stops expecting `handoff` (cancelled or expired); its later frames are rejected.
    /// Returns whether it was live.
    fn cancel(&self, handoff: HandoffId) -> bool;

    fn stats(&self) -> &Stats;

    /// Hands back the data of a delivered segment the consumer is done with (imported), so that
    /// a later frame can be copied into it instead of into a fresh allocation, whose pages the
    /// kernel would have to fault in and zero again. Optional; by default the data is dropped.
    fn recycle(&self, data: Vec<u8>) {
        drop(data);
    }
}

/// Payload buffers consumers handed back ([`KvReceiver::recycle`]), kept for later frames: at
/// most `max` of them, so recycling never holds more than that many frames' worth of memory.
pub(crate) struct BufferPool {
    max: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            free: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // Pushes and pops only; nothing can be left half-done.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty buffer with room for `len` bytes: a recycled one when there is one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.lock().pop().unwrap_or_default();
        buf.clear();
        buf.reserve_exact(len);
        buf
    }

    /// Keeps `buf` for a later [`BufferPool::take`], unless the pool is full.
    pub(crate) fn put(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = self.lock();
        if free.len() < self.max {
            free.push(buf);
        }
    }
}

/// Transfer counters, shared by a transport's tasks. Plain atomics; read with
/// [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    segments_delivered: AtomicU64,
    handoffs_completed: AtomicU64,
    handoffs_failed: AtomicU64,
    frames_rejected: AtomicU64,
    failures: [AtomicU64; FailureReason::ALL.len()],
    writes_waiting: AtomicU64,
    deliveries_waiting: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Frame bytes (header and payload) handed to the transport.
    pub bytes_sent: u64,
    /// Frame bytes read from the transport.
    pub bytes_received: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Verified segments handed to the consumer.
    pub segments_delivered: u64,
    pub handoffs_completed: u64,
    pub handoffs_failed: u64,
    /// Frames dropped because no live handoff owns them.
    pub frames_rejected: u64,
    /// Failures of frames, handoffs or connections, by reason, in [`FailureReason::ALL`] order.
    pub failures: [u64; FailureReason::ALL.len()],
    /// Sends now waiting for the transport to take bytes (the receiver is behind).
    pub writes_waiting: u64,
    /// Receiving streams now waiting for the consumer to take a delivery.
    pub deliveries_waiting: u64,
}

impl StatsSnapshot {
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures[reason.index()]
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            frames_sent: g(&self.frames_sent),
            frames_received: g(&self.frames_received),
            segments_delivered: g(&self.segments_delivered),
            handoffs_completed: g(&self.handoffs_completed),
            handoffs_failed: g(&self.handoffs_failed),
            frames_rejected: g(&self.frames_rejected),
            failures: std::array::from_fn(|i| g(&self.failures[i])),
            writes_waiting: g(&self.writes_waiting),
            deliveries_waiting: g(&self.deliveries_waiting),
        }
    }

    pub(crate) fn add_sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn frame_sent(&self) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn add_received(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn frame_received(&self) {
        self.frames_received.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn segment_delivered(&self) {
        self.segments_delivered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn handoff_completed(&self) {
        self.handoffs_completed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn handoff_failed(&self) {
        self.handoffs_failed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn frame_rejected(&self) {
        self.frames_rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failure(&self, reason: FailureReason) {
        self.failures[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    /// Counts up while a write waits for room; counts down when dropped.
    pub(crate) fn write_waiting(&self) -> Gauge<'_> {
        Gauge::up(&self.writes_waiting)
    }
    pub(crate) fn delivery_waiting(&self) -> Gauge<'_> {
        Gauge::up(&self.deliveries_waiting)
    }
}

/// A gauge increment that undoes itself when dropped, whatever path drops it.
pub(crate) struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(a: &'a AtomicU64) -> Self {
        a.fetch_add(1, Ordering::Relaxed);
        Gauge(a)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The payload size a kv data frame must have: K and V for `tokens` tokens and `heads` heads.
pub(crate) fn segment_bytes(d: &LayoutDescriptor, tokens: u32, heads: u32) -> u64 {
    2 * u64::from(tokens) * u64::from(heads) * u64::from(d.head_dim) * d.dtype.size() as u64
}

/// The kv data header a sender of `shard` holding layout `local` writes for `segment`; refuses
/// heads outside the shard and data whose size does not match them.
pub(crate) fn kv_data_header(
    local: &LayoutDescriptor,
    shard: Shard,
    segment: &KvSegment,
) -> Result<FrameHeader> {
    kv_data_header_summed(local, shard, segment, crc32c::crc32c(&segment.chunk.data))
}

/// [`kv_data_header`] with the payload's crc32c given, for a sender that computes it while it
/// copies the payload (and may fill it in after this check).
pub(crate) fn kv_data_header_summed(
    local: &LayoutDescriptor,
    shard: Shard,
    segment: &KvSegment,
    payload_crc: u32,
) -> Result<FrameHeader> {
    let c = &segment.chunk;
    let heads = &segment.kv_heads;
    let reject = |reason: String| Error::SegmentRejected {
        handoff: segment.handoff,
        reason,
    };
    if heads.is_empty() || heads.start < local.kv_heads.start || heads.end > local.kv_heads.end {
        return Err(reject(format!(
            "kv heads {heads:?} outside this shard's {:?}",
            local.kv_heads
        )));
    }
    let expected = segment_bytes(local, c.tokens, heads.len() as u32);
    if c.data.len() as u64 != expected {
        return Err(reject(format!(
            "{} bytes of data, expected {expected}",
            c.data.len()
        )));
    }
    let mut header = FrameHeader::summed(FrameKind::KvData, c.data.len(), payload_crc)?;
    header.handoff = segment.handoff;
    header.layer = c.layer;
    header.first_block = c.first_block;
    header.num_blocks = c.num_blocks;
    header.tokens = c.tokens;
    header.kv_heads = heads.clone();
    header.shard = shard;
    Ok(header)
}

struct Handoff {
    expectation: Expectation,
    // One bit per (layer, block, kv head) unit admitted, indexed relative to the expectation.
    admitted: Vec<bool>,
    remaining: usize,
    // Segments admitted but not yet handed to the consumer.
    in_flight: usize,
}

/// What the receiver knows about the handoffs it expects. Transports call
/// [`Handoffs::admit`] on a frame header before reading its payload, then
/// [`Handoffs::delivered`] after handing the segment over, or [`Handoffs::fail`].
pub(crate) struct Handoffs {
    local: LayoutDescriptor,
    live: Mutex<HashMap<HandoffId, Handoff>>,
}

impl Handoffs {
    pub(crate) fn new(local: LayoutDescriptor) -> Self {
        Self {
            local,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HandoffId, Handoff>> {
        // Critical sections update one entry at a time; a panic cannot leave one half-written
        // in a way later frames could exploit, so a poisoned map is still usable.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn expect(&self, id: HandoffId, e: Expectation) -> Result<()> {
        let d = &self.local;
        let invalid = |reason: String| Error::InvalidConfig {
            field: "expectation",
            reason,
        };
        if e.layers.is_empty() || e.layers.start < d.layers.start || e.layers.end > d.layers.end {
            return Err(invalid(format!(
                "layers {:?} outside this shard's {:?}",
                e.layers, d.layers
            )));
        }
        if e.kv_heads.is_empty()
            || e.kv_heads.start < d.kv_heads.start
            || e.kv_heads.end > d.kv_heads.end
        {
            return Err(invalid(format!(
                "kv heads {:?} outside this shard's {:?}",
                e.kv_heads, d.kv_heads
            )));
        }
        if e.blocks.is_empty() || e.blocks.end > e.tokens.div_ceil(d.block_size) {
            return Err(invalid(format!(
                "blocks {:?} empty or beyond the {} tokens",
                e.blocks, e.tokens
            )));
        }
        let units = e.units();
        let mut live = self.lock();
        if live.contains_key(&id) {
            return Err(Error::DuplicateHandoff(id));
        }
        live.insert(
            id,
            Handoff {
                expectation: e,
                admitted: vec![false; units],
                remaining: units,
                in_flight: 0,
            },
        );
        Ok(())
    }

    pub(crate) fn cancel(&self, id: HandoffId) -> bool {
        self.lock().remove(&id).is_some()
    }

    /// Checks a kv data header against its handoff's expectation and marks its units admitted.
    pub(crate) fn admit(&self, h: &FrameHeader) -> Result<()> {
        let d = &self.local;
        let mut live = self.lock();
        let handoff = live
            .get_mut(&h.handoff)
            .ok_or(Error::UnknownHandoff(h.handoff))?;
        let e = &handoff.expectation;
        let reject = |reason: String| Error::SegmentRejected {
            handoff: h.handoff,
            reason,
        };
        let blocks = h.first_block..h.first_block.saturating_add(h.num_blocks);
        if !e.layers.contains(&h.layer) {
            return Err(reject(format!("layer {} outside {:?}", h.layer, e.layers)));
        }
        if blocks.is_empty() || blocks.start < e.blocks.start || blocks.end > e.blocks.end {
            return Err(reject(format!("blocks {blocks:?} outside {:?}", e.blocks)));
        }
        if h.kv_heads.is_empty()
            || h.kv_heads.start < e.kv_heads.start
            || h.kv_heads.end > e.kv_heads.end
        {
            return Err(reject(format!(
                "kv heads {:?} outside {:?}",
                h.kv_heads, e.kv_heads
            )));
        }
        let bs = u64::from(d.block_size);
        let seq = u64::from(e.tokens);
        let tokens =
            (u64::from(blocks.end) * bs).min(seq) - (u64::from(blocks.start) * bs).min(seq);
        if u64::from(h.tokens) != tokens {
            return Err(reject(format!(
                "{} tokens, blocks {blocks:?} of a {seq}-token sequence hold {tokens}",
                h.tokens
            )));
        }
        let bytes = segment_bytes(d, h.tokens, h.kv_heads.len() as u32);
        if u64::from(h.payload_len) != bytes {
            return Err(reject(format!(
                "payload of {} bytes, expected {bytes}",
                h.payload_len
            )));
        }
        let (nb, nh) = (e.blocks.len(), e.kv_heads.len());
        let l = (h.layer - e.layers.start) as usize;
        let index = |b: u32, head: u32| {
            (l * nb + (b - e.blocks.start) as usize) * nh + (head - e.kv_heads.start) as usize
        };
        for b in blocks.clone() {
            for head in h.kv_heads.clone() {
                if handoff.admitted[index(b, head)] {
                    return Err(reject(format!(
                        "layer {} block {b} kv head {head} already received",
                        h.layer
                    )));
                }
            }
        }
        for b in blocks {
            for head in h.kv_heads.clone() {
                handoff.admitted[index(b, head)] = true;
            }
        }
        handoff.remaining -= h.num_blocks as usize * h.kv_heads.len();
        handoff.in_flight += 1;
        Ok(())
    }

    /// Records that an admitted segment was handed over; true when that completes the handoff
    /// (which then ends here).
    pub(crate) fn delivered(&self, id: HandoffId) -> bool {
        let mut live = self.lock();
        let Some(h) = live.get_mut(&id) else {
            return false;
        };
        h.in_flight -= 1;
        if h.remaining == 0 && h.in_flight == 0 {
            live.remove(&id);
            return true;
        }
        false
    }

    /// Ends a handoff as failed; true if it was live (so exactly one caller reports it).
    pub(crate) fn fail(&self, id: HandoffId) -> bool {
        self.lock().remove(&id).is_some()
    }

    pub(crate) fn is_live(&self, id: HandoffId) -> bool {
        self.lock().contains_key(&id)
    }
}

/// What a receiver shares between all its links: the expected handoffs, the counters and the
/// consumer's bounded channel.
pub(crate) struct ReceiverCore {
    pub(crate) local: LayoutDescriptor,
    pub(crate) handoffs: Handoffs,
    pub(crate) stats: Stats,
    deliveries: mpsc::Sender<Delivery>,
}

impl ReceiverCore {
    /// A core for a receiver holding `local`, and the consumer's end of its channel, which holds
    /// at most `capacity` deliveries.
    pub(crate) fn new(
        local: LayoutDescriptor,
        capacity: usize,
    ) -> (Self, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(capacity);
        let core = Self {
            handoffs: Handoffs::new(local.clone()),
            local,
            stats: Stats::default(),
            deliveries: tx,
        };
        (core, rx)
    }
}

/// The receiving side of one link (a TCP stream, a shared-memory connection) opened by one
/// sender shard: admits its frames, hands verified segments over, and fails or rejects through
/// the shared core.
pub(crate) struct Inbound<'a> {
    core: &'a ReceiverCore,
    shard: Shard,
    // Live handoffs this link has carried frames of: the ones to fail if it breaks mid-frame
    // before the frame's own handoff is known.
    touched: Vec<HandoffId>,
}

impl<'a> Inbound<'a> {
    pub(crate) fn new(core: &'a ReceiverCore, shard: Shard) -> Self {
        Self {
            core,
            shard,
            touched: Vec::new(),
        }
    }

    /// Counts `e` as a failure and returns it.
    pub(crate) fn counted(&self, e: Error) -> Error {
        self.core.stats.failure(e.reason());
        e
    }

    /// Admits a kv data header read from this link: it must come from the shard that opened the
    /// link and fit an expected handoff.
    pub(crate) fn admit(&mut self, header: &FrameHeader) -> Result<()> {
        if header.shard != self.shard {
            return Err(Error::MalformedFrame {
                kind: FrameKind::KvData,
                reason: format!(
                    "frame from shard {:?} on a link opened by {:?}",
                    header.shard, self.shard
                ),
            });
        }
        let handoffs = &self.core.handoffs;
        handoffs.admit(header)?;
        let id = header.handoff;
        if !self.touched.contains(&id) {
            self.touched.retain(|h| handoffs.is_live(*h));
            self.touched.push(id);
        }
        Ok(())
    }

    /// Verifies the payload of an admitted frame against `computed`, the crc32c taken while it
    /// was read or copied in, and hands the segment to the consumer, then `Complete` if it was
    /// the handoff's last; a payload that fails its checksum fails the handoff instead.
    pub(crate) async fn deliver_summed(
        &self,
        header: FrameHeader,
        payload: Vec<u8>,
        computed: u32,
    ) -> Result<()> {
        let id = header.handoff;
        if let Err(e) = header.verify_summed(payload.len(), computed) {
            return self.fail(id, e).await;
        }
        let segment = KvSegment {
            handoff: id,
            kv_heads: header.kv_heads,
            chunk: KvChunk {
                layer: header.layer,
                first_block: header.first_block,
                num_blocks: header.num_blocks,
                tokens: header.tokens,
                data: payload,
            },
        };
        self.deliver(Delivery::Segment(segment)).await?;
        let stats = &self.core.stats;
        stats.segment_delivered();
        if self.core.handoffs.delivered(id) {
            stats.handoff_completed();
            self.deliver(Delivery::Complete(id)).await?;
        }
        Ok(())
    }

    /// Waits for room in the consumer's channel; this wait is the back-pressure.
    pub(crate) async fn deliver(&self, d: Delivery) -> Result<()> {
        let tx = &self.core.deliveries;
        let d = match tx.try_send(d) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::ConsumerGone),
            Err(mpsc::error::TrySendError::Full(d)) => d,
        };
        let _waiting = self.core.stats.delivery_waiting();
        tx.send(d).await.map_err(|_| Error::ConsumerGone)
    }

    /// Counts `error` and ends `handoff` with it, unless the handoff already ended.
    pub(crate) async fn fail(&self, id: HandoffId, error: Error) -> Result<()> {
        self.core.stats.failure(error.reason());
        if self.core.handoffs.fail(id) {
            self.core.stats.handoff_failed();
            self.deliver(Delivery::Failed { handoff: id, error })
                .await?;
        }
        Ok(())
    }

    /// Fails every handoff this link has carried, with a fresh `error()` each.
    pub(crate) async fn fail_touched(&self, error: impl Fn() -> Error) {
        for id in &self.touched {
            if self.fail(*id, error()).await.is_err() {
                return;
            }
        }
    }

    /// Fails the handoffs this link has carried that are still live, counting only those: for a
    /// link whose end leaves them without a path.
    pub(crate) async fn fail_live(&self, error: impl Fn(HandoffId) -> Error) -> Result<()> {
        for id in &self.touched {
            if self.core.handoffs.fail(*id) {
                let error = error(*id);
                self.core.stats.failure(error.reason());
                self.core.stats.handoff_failed();
                self.deliver(Delivery::Failed {
                    handoff: *id,
                    error,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Drops a frame no live handoff owns, telling the consumer.
    pub(crate) async fn reject(&self, handoff: Option<HandoffId>, error: Error) -> Result<()> {
        let stats = &self.core.stats;
        stats.failure(error.reason());
        stats.frame_rejected();
        self.deliver(Delivery::Rejected { handoff, error }).await
    }

    /// A frame that cannot be read at all (bad header, bad notice): the link cannot be trusted
    /// past it. Fails every handoff the link carried, tells the consumer, and returns the
    /// (counted) error that ends the link.
    pub(crate) async fn unreadable(&self, e: Error) -> Error {
        let copy = UnreadableCopy::of(&e);
        self.fail_touched(|| copy.clone().into_error()).await;
        // Counted before the consumer hears of it, like every other rejection.
        let e = self.counted(e);
        self.core.stats.frame_rejected();
        match self
            .deliver(Delivery::Rejected {
                handoff: None,
                error: copy.into_error(),
            })
            .await
        {
            Ok(()) => e,
            Err(gone) => gone,
        }
    }
}

/// The parts of an unreadable-frame error, kept to build one error per handoff it fails.
#[derive(Clone)]
enum UnreadableCopy {
    Corrupt { expected: u32, computed: u32 },
    Notice(String),
    Other(String),
}

impl UnreadableCopy {
    fn of(e: &Error) -> Self {
        match e {
            Error::HeaderCorrupt { expected, computed } => UnreadableCopy::Corrupt {
                expected: *expected,
                computed: *computed,
            },
            Error::MalformedNotice { reason } => UnreadableCopy::Notice(reason.clone()),
            other => UnreadableCopy::Other(other.to_string()),
        }
    }

    fn into_error(self) -> Error {
        match self {
            UnreadableCopy::Corrupt { expected, computed } => {
                Error::HeaderCorrupt { expected, computed }
            }
            UnreadableCopy::Notice(reason) => Error::MalformedNotice { reason },
            UnreadableCopy::Other(reason) => Error::MalformedFrame {
                kind: FrameKind::KvData,
                reason,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_reuses_buffers_and_keeps_at_most_its_bound() {
        let pool = BufferPool::new(2);
        let fresh = pool.take(100);
        assert!(fresh.is_empty() && fresh.capacity() >= 100);
        let mut used = fresh;
        used.extend_from_slice(&[7; 100]);
        let at = used.as_ptr();
        pool.put(used);
        let again = pool.take(64);
        assert!(again.is_empty(), "a recycled buffer comes back empty");
        assert_eq!(again.as_ptr(), at, "the recycled buffer is reused");
        let grown = pool.take(1000);
        assert!(grown.capacity() >= 1000);
        for _ in 0..3 {
            pool.put(vec![1; 10]);
        }
        pool.put(Vec::new());
        assert_eq!(pool.lock().len(), 2);
    }
}
