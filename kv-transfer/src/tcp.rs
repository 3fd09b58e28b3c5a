//! The TCP transport: a pool of streams from a prefill worker to a decode worker, each opened
//! with a handshake of layout descriptors, then carrying kv data frames one way.
//!
//! prefill [`TcpSender`] ==streams==> [`TcpReceiver`] --bounded channel--> decode consumer
//!
//! Each stream of the receiver is served by one task that reads a header, admits it against the
//! expected handoffs, reads the payload, verifies it and waits for room in the consumer's bounded
//! channel before reading the next frame. A stalled consumer therefore stops the reads, the
//! kernel buffers fill, and the sender's writes wait: the bytes between sender and consumer are
//! bounded by the channel capacity, one frame per stream and the socket buffers.
//!
//! Frames of one handoff may travel on any stream; the receiver does not depend on their order.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use baton_engine::{KvChunk, LayoutDescriptor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

use crate::error::{Error, FailureReason, Result};
use crate::frame::{
    CloseCode, FrameHeader, FrameKind, FrameLimits, HEADER_LEN, HandoffId, Shard, decode_close,
    decode_descriptor, encode_close, encode_descriptor, encode_frame,
};
use crate::transport::{
    Delivery, Expectation, Handoffs, KvReceiver, KvSegment, KvSender, Stats, segment_bytes,
};

/// Settings of both ends of the TCP transport.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Streams a sender opens to one receiver. Frames are spread over them round robin.
    pub streams: usize,
    /// Bounds on what a peer may send.
    pub limits: FrameLimits,
    /// Deliveries the receiver's channel holds before its streams stop reading.
    pub delivery_capacity: usize,
    /// Socket send and receive buffer sizes in bytes (`SO_SNDBUF`, `SO_RCVBUF`); `None` keeps
    /// the OS defaults. Part of the in-flight bound.
    pub socket_buffer: Option<u32>,
    /// Longest a connection may take to exchange hellos.
    pub handshake_timeout: Duration,
    /// Bytes of read buffering per receiving stream.
    pub read_buffer: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            streams: 4,
            limits: FrameLimits::default(),
            delivery_capacity: 64,
            socket_buffer: None,
            handshake_timeout: Duration::from_secs(5),
            read_buffer: 64 << 10,
        }
    }
}

impl TcpConfig {
    fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.streams == 0 {
            return invalid("streams", "must be at least 1");
        }
        if self.delivery_capacity == 0 {
            return invalid("delivery_capacity", "must be at least 1");
        }
        if self.read_buffer < HEADER_LEN {
            return invalid("read_buffer", "must hold a frame header");
        }
        Ok(())
    }
}

struct ReceiverShared {
    local: LayoutDescriptor,
    config: TcpConfig,
    handoffs: Handoffs,
    stats: Stats,
    deliveries: mpsc::Sender<Delivery>,
}

/// The decode worker's end: accepts streams from prefill workers and delivers verified segments
/// of expected handoffs. Dropping it stops accepting and closes every stream.
pub struct TcpReceiver {
    shared: Arc<ReceiverShared>,
    local_addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpReceiver {
    /// Listens on `addr` for senders whose layout maps onto `local`. Deliveries arrive on the
    /// returned channel, which holds at most `config.delivery_capacity` of them.
    pub async fn bind(
        addr: SocketAddr,
        local: LayoutDescriptor,
        config: TcpConfig,
    ) -> Result<(Self, mpsc::Receiver<Delivery>)> {
        config.validate()?;
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(io_err("create listening socket"))?;
        if let Some(size) = config.socket_buffer {
            // Accepted sockets inherit the listener's receive buffer size.
            socket
                .set_recv_buffer_size(size)
                .map_err(io_err("set receive buffer"))?;
            socket
                .set_send_buffer_size(size)
                .map_err(io_err("set send buffer"))?;
        }
        socket
            .set_reuseaddr(true)
            .map_err(io_err("set reuseaddr"))?;
        socket.bind(addr).map_err(io_err("bind"))?;
        let listener = socket.listen(1024).map_err(io_err("listen"))?;
        let local_addr = listener.local_addr().map_err(io_err("local address"))?;
        let (tx, rx) = mpsc::channel(config.delivery_capacity);
        let shared = Arc::new(ReceiverShared {
            handoffs: Handoffs::new(local.clone()),
            local,
            config,
            stats: Stats::default(),
            deliveries: tx,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok((
            Self {
                shared,
                local_addr,
                accept,
            },
            rx,
        ))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn descriptor(&self) -> &LayoutDescriptor {
        &self.shared.local
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        // The accept task owns the stream tasks; aborting it drops (and aborts) them too.
        self.accept.abort();
    }
}

impl KvReceiver for TcpReceiver {
    fn expect(&self, handoff: HandoffId, expectation: Expectation) -> Result<()> {
        self.shared.handoffs.expect(handoff, expectation)
    }

    fn cancel(&self, handoff: HandoffId) -> bool {
        self.shared.handoffs.cancel(handoff)
    }

    fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<ReceiverShared>) {
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    streams.spawn(serve_stream(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // Per-connection failures (a peer resetting before accept, fd pressure)
                    // must not stop the listener.
                    tracing::warn!(error = %e, "kv receiver: accept failed");
                    shared.stats.failure(FailureReason::Io);
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

/// Serves one stream until the peer closes it or breaks the protocol.
async fn serve_stream(stream: TcpStream, peer: SocketAddr, shared: Arc<ReceiverShared>) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(shared.config.read_buffer, rd);
    let shard = match accept_hello(&mut rd, &mut wr, &shared).await {
        Ok(shard) => shard,
        Err(e) => {
            tracing::info!(%peer, error = %e, "kv receiver: handshake failed");
            shared.stats.failure(e.reason());
            let _ = send_close(&mut wr, &e).await;
            return;
        }
    };
    let mut stream = ReceivingStream {
        shared: &shared,
        shard,
        touched: Vec::new(),
    };
    if let Err(e) = stream.run(&mut rd).await {
        tracing::info!(%peer, error = %e, "kv receiver: stream closed");
        let _ = send_close(&mut wr, &e).await;
    }
}

async fn accept_hello(
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    shared: &ReceiverShared,
) -> Result<Shard> {
    let limit = shared.config.handshake_timeout;
    let (header, payload) = tokio::time::timeout(limit, read_control(rd, &shared.config.limits))
        .await
        .map_err(|_| Error::Timeout {
            during: "handshake",
            limit,
        })??;
    let remote = match header.kind {
        FrameKind::Hello => decode_descriptor(&payload)?,
        got => {
            return Err(Error::UnexpectedFrame {
                expected: FrameKind::Hello,
                got,
            });
        }
    };
    shared
        .local
        .check_compatible(&remote)
        .map_err(Error::from_layout)?;
    let hello = encode_descriptor(&shared.local);
    let reply = FrameHeader::new(FrameKind::Hello, &hello)?;
    wr.write_all(&encode_frame(&reply, &hello))
        .await
        .map_err(io_err("write hello"))?;
    Ok(header.shard)
}

struct ReceivingStream<'a> {
    shared: &'a ReceiverShared,
    shard: Shard,
    // Live handoffs this stream has carried frames of: the ones to fail if it breaks mid-frame
    // before the frame's own handoff is known.
    touched: Vec<HandoffId>,
}

impl ReceivingStream<'_> {
    /// Reads frames until a clean close (Ok) or an error that ends the stream. Every error
    /// returned has been counted.
    async fn run(&mut self, rd: &mut BufReader<OwnedReadHalf>) -> Result<()> {
        let shared = self.shared;
        loop {
            let mut head = [0u8; HEADER_LEN];
            let closed = || Error::PeerClosed {
                during: "inside a frame header",
                handoff: None,
            };
            match read_full(rd, &mut head).await {
                Ok(0) => return Ok(()),
                Ok(n) if n == HEADER_LEN => {}
                Ok(_) => {
                    self.fail_touched(closed).await;
                    return Err(self.counted(closed()));
                }
                Err(e) => {
                    self.fail_touched(closed).await;
                    return Err(self.counted(io_err("read frame header")(e)));
                }
            }
            shared.stats.add_received(HEADER_LEN);
            let header = match FrameHeader::decode(&head, &shared.config.limits) {
                Ok(h) => h,
                Err(e) => {
                    // The framing cannot be trusted past a bad header: end the stream.
                    let copy = header_error_copy(&e);
                    self.fail_touched(|| copy.clone().into_error()).await;
                    // Counted before the consumer hears of it, like every other rejection.
                    let e = self.counted(e);
                    shared.stats.frame_rejected();
                    self.deliver(Delivery::Rejected {
                        handoff: None,
                        error: copy.into_error(),
                    })
                    .await?;
                    return Err(e);
                }
            };
            match header.kind {
                FrameKind::KvData => self.kv_data(rd, header).await?,
                FrameKind::Close => {
                    let closing = async {
                        let payload = read_payload(rd, &header).await?;
                        header.verify_payload(&payload)?;
                        decode_close(&payload)
                    };
                    let (code, message) = closing.await.map_err(|e| self.counted(e))?;
                    tracing::info!(?code, %message, "kv receiver: peer closed the stream");
                    return Ok(());
                }
                got => {
                    return Err(self.counted(Error::UnexpectedFrame {
                        expected: FrameKind::KvData,
                        got,
                    }));
                }
            }
        }
    }

    fn counted(&self, e: Error) -> Error {
        self.shared.stats.failure(e.reason());
        e
    }

    async fn kv_data(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        header: FrameHeader,
    ) -> Result<()> {
        let shared = self.shared;
        let id = header.handoff;
        let admitted = if header.shard != self.shard {
            Err(Error::MalformedFrame {
                kind: FrameKind::KvData,
                reason: format!(
                    "frame from shard {:?} on a stream opened by {:?}",
                    header.shard, self.shard
                ),
            })
        } else {
            shared.handoffs.admit(&header)
        };
        if let Err(e) = admitted {
            // Skip the payload without buffering it; the header was verified, so the framing
            // holds.
            let skipped = skip(rd, u64::from(header.payload_len)).await;
            shared.stats.add_received(skipped as usize);
            if skipped < u64::from(header.payload_len) {
                return Err(self.counted(Error::PeerClosed {
                    during: "inside a rejected frame",
                    handoff: Some(id),
                }));
            }
            return self.reject(Some(id), e).await.map_err(|e| self.counted(e));
        }
        if !self.touched.contains(&id) {
            self.touched.retain(|h| shared.handoffs.is_live(*h));
            self.touched.push(id);
        }
        let payload = match read_payload(rd, &header).await {
            Ok(p) => p,
            Err(e) => {
                // Counted once, as the handoff's failure.
                self.fail(id, e).await?;
                return Err(Error::PeerClosed {
                    during: "inside a frame payload",
                    handoff: Some(id),
                });
            }
        };
        shared.stats.add_received(payload.len());
        shared.stats.frame_received();
        if let Err(e) = header.verify_payload(&payload) {
            return self.fail(id, e).await;
        }
        let segment = KvSegment {
            handoff: id,
            kv_heads: header.kv_heads.clone(),
            chunk: KvChunk {
                layer: header.layer,
                first_block: header.first_block,
                num_blocks: header.num_blocks,
                tokens: header.tokens,
                data: payload,
            },
        };
        self.deliver(Delivery::Segment(segment)).await?;
        shared.stats.segment_delivered();
        if shared.handoffs.delivered(id) {
            shared.stats.handoff_completed();
            self.deliver(Delivery::Complete(id)).await?;
        }
        Ok(())
    }

    /// Waits for room in the consumer's channel; this wait is the back-pressure.
    async fn deliver(&self, d: Delivery) -> Result<()> {
        let tx = &self.shared.deliveries;
        let d = match tx.try_send(d) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(Error::ConsumerGone),
            Err(mpsc::error::TrySendError::Full(d)) => d,
        };
        let _waiting = self.shared.stats.delivery_waiting();
        tx.send(d).await.map_err(|_| Error::ConsumerGone)
    }

    async fn fail(&self, id: HandoffId, error: Error) -> Result<()> {
        let stats = &self.shared.stats;
        stats.failure(error.reason());
        if self.shared.handoffs.fail(id) {
            stats.handoff_failed();
            self.deliver(Delivery::Failed { handoff: id, error })
                .await?;
        }
        Ok(())
    }

    async fn fail_touched(&self, error: impl Fn() -> Error) {
        for id in &self.touched {
            if self.fail(*id, error()).await.is_err() {
                return;
            }
        }
    }

    async fn reject(&self, handoff: Option<HandoffId>, error: Error) -> Result<()> {
        let stats = &self.shared.stats;
        stats.failure(error.reason());
        stats.frame_rejected();
        self.deliver(Delivery::Rejected { handoff, error }).await
    }
}

/// The parts of a header error, kept to build one error per handoff it fails.
#[derive(Clone)]
enum HeaderErrorCopy {
    Corrupt { expected: u32, computed: u32 },
    Other(String),
}

impl HeaderErrorCopy {
    fn into_error(self) -> Error {
        match self {
            HeaderErrorCopy::Corrupt { expected, computed } => {
                Error::HeaderCorrupt { expected, computed }
            }
            HeaderErrorCopy::Other(reason) => Error::MalformedFrame {
                kind: FrameKind::KvData,
                reason,
            },
        }
    }
}

fn header_error_copy(e: &Error) -> HeaderErrorCopy {
    match e {
        Error::HeaderCorrupt { expected, computed } => HeaderErrorCopy::Corrupt {
            expected: *expected,
            computed: *computed,
        },
        other => HeaderErrorCopy::Other(other.to_string()),
    }
}

/// Reads until `buf` is full or the peer closes; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match rd.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads a frame's payload, whose length the verified header bounds.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, header: &FrameHeader) -> Result<Vec<u8>> {
    let mut payload = vec![0u8; header.payload_len as usize];
    let n = read_full(rd, &mut payload)
        .await
        .map_err(io_err("read frame payload"))?;
    if n < payload.len() {
        return Err(Error::PeerClosed {
            during: "inside a frame payload",
            handoff: Some(header.handoff),
        });
    }
    Ok(payload)
}

/// Reads and drops `len` bytes; returns how many there were before the stream ended.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> u64 {
    tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink())
        .await
        .unwrap_or(0)
}

/// Reads one whole control frame (hello or close) and verifies it.
async fn read_control<R: AsyncRead + Unpin>(
    rd: &mut R,
    limits: &FrameLimits,
) -> Result<(FrameHeader, Vec<u8>)> {
    let mut head = [0u8; HEADER_LEN];
    let n = read_full(rd, &mut head)
        .await
        .map_err(io_err("read handshake"))?;
    if n < HEADER_LEN {
        return Err(Error::PeerClosed {
            during: "during the handshake",
            handoff: None,
        });
    }
    let header = FrameHeader::decode(&head, limits)?;
    if header.kind == FrameKind::KvData {
        return Err(Error::UnexpectedFrame {
            expected: FrameKind::Hello,
            got: header.kind,
        });
    }
    let payload = read_payload(rd, &header).await?;
    header.verify_payload(&payload)?;
    Ok((header, payload))
}

async fn send_close(wr: &mut OwnedWriteHalf, error: &Error) -> io::Result<()> {
    let payload = encode_close(CloseCode::for_error(error), &error.to_string());
    if let Ok(header) = FrameHeader::new(FrameKind::Close, &payload) {
        wr.write_all(&encode_frame(&header, &payload)).await?;
    }
    wr.shutdown().await
}

fn io_err(during: &'static str) -> impl Fn(io::Error) -> Error {
    move |source| Error::Io { during, source }
}

/// The prefill worker's end: a pool of handshaken streams to one decode worker.
pub struct TcpSender {
    local: LayoutDescriptor,
    peer: LayoutDescriptor,
    shard: Shard,
    streams: Vec<Mutex<OwnedWriteHalf>>,
    next: AtomicUsize,
    stats: Arc<Stats>,
    // Drain what the receiver sends back (close frames) so its writes never block.
    readers: JoinSet<()>,
}

impl TcpSender {
    /// Opens `config.streams` streams to `addr` and exchanges hellos on each. Refused when the
    /// receiver's layout and `local` cannot be mapped, on either side.
    pub async fn connect(
        addr: SocketAddr,
        local: LayoutDescriptor,
        shard: Shard,
        config: TcpConfig,
    ) -> Result<Self> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let mut streams = Vec::with_capacity(config.streams);
        let mut readers = JoinSet::new();
        let mut peer = None;
        for _ in 0..config.streams {
            let limit = config.handshake_timeout;
            let (rd, wr, remote) =
                tokio::time::timeout(limit, open_stream(addr, &local, shard, &config))
                    .await
                    .map_err(|_| Error::Timeout {
                        during: "connect and handshake",
                        limit,
                    })?
                    .inspect_err(|e| stats.failure(e.reason()))?;
            if peer.as_ref().is_some_and(|p| *p != remote) {
                return Err(Error::MalformedFrame {
                    kind: FrameKind::Hello,
                    reason: "streams to one peer reported different layouts".into(),
                });
            }
            peer = Some(remote);
            streams.push(Mutex::new(wr));
            readers.spawn(drain_replies(rd, config.limits, stats.clone()));
        }
        let peer = peer.ok_or(Error::InvalidConfig {
            field: "streams",
            reason: "must be at least 1".into(),
        })?;
        Ok(Self {
            local,
            peer,
            shard,
            streams,
            next: AtomicUsize::new(0),
            stats,
            readers,
        })
    }

    /// Streams in the pool.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

impl Drop for TcpSender {
    fn drop(&mut self) {
        self.readers.abort_all();
    }
}

async fn open_stream(
    addr: SocketAddr,
    local: &LayoutDescriptor,
    shard: Shard,
    config: &TcpConfig,
) -> Result<(OwnedReadHalf, OwnedWriteHalf, LayoutDescriptor)> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(io_err("create socket"))?;
    if let Some(size) = config.socket_buffer {
        socket
            .set_send_buffer_size(size)
            .map_err(io_err("set send buffer"))?;
        socket
            .set_recv_buffer_size(size)
            .map_err(io_err("set receive buffer"))?;
    }
    let mut stream = socket.connect(addr).await.map_err(io_err("connect"))?;
    stream.set_nodelay(true).map_err(io_err("set nodelay"))?;
    let hello = encode_descriptor(local);
    let mut header = FrameHeader::new(FrameKind::Hello, &hello)?;
    header.shard = shard;
    stream
        .write_all(&encode_frame(&header, &hello))
        .await
        .map_err(io_err("write hello"))?;
    let (reply, payload) = read_control(&mut stream, &config.limits).await?;
    let remote = match reply.kind {
        FrameKind::Hello => decode_descriptor(&payload)?,
        FrameKind::Close => {
            let (code, message) = decode_close(&payload)?;
            return Err(Error::PeerRefused { code, message });
        }
        got => {
            return Err(Error::UnexpectedFrame {
                expected: FrameKind::Hello,
                got,
            });
        }
    };
    remote.check_compatible(local).map_err(Error::from_layout)?;
    let (rd, wr) = stream.into_split();
    Ok((rd, wr, remote))
}

async fn drain_replies(mut rd: OwnedReadHalf, limits: FrameLimits, stats: Arc<Stats>) {
    while let Ok((header, payload)) = read_control(&mut rd, &limits).await {
        if header.kind == FrameKind::Close {
            if let Ok((code, message)) = decode_close(&payload) {
                tracing::info!(?code, %message, "kv sender: receiver closed a stream");
            }
            stats.failure(FailureReason::Refused);
            return;
        }
    }
}

impl KvSender for TcpSender {
    fn peer(&self) -> &LayoutDescriptor {
        &self.peer
    }

    async fn send(&self, segment: &KvSegment) -> Result<()> {
        let c = &segment.chunk;
        let heads = &segment.kv_heads;
        let reject = |reason: String| Error::SegmentRejected {
            handoff: segment.handoff,
            reason,
        };
        if heads.is_empty()
            || heads.start < self.local.kv_heads.start
            || heads.end > self.local.kv_heads.end
        {
            return Err(reject(format!(
                "kv heads {heads:?} outside this shard's {:?}",
                self.local.kv_heads
            )));
        }
        let expected = segment_bytes(&self.local, c.tokens, heads.len() as u32);
        if c.data.len() as u64 != expected {
            return Err(reject(format!(
                "{} bytes of data, expected {expected}",
                c.data.len()
            )));
        }
        let mut header = FrameHeader::new(FrameKind::KvData, &c.data)?;
        header.handoff = segment.handoff;
        header.layer = c.layer;
        header.first_block = c.first_block;
        header.num_blocks = c.num_blocks;
        header.tokens = c.tokens;
        header.kv_heads = heads.clone();
        header.shard = self.shard;
        let head = header.encode();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.streams.len();
        let mut wr = self.streams[i].lock().await;
        write_frame(&mut wr, &head, &c.data, &self.stats)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::WriteZero => Error::PeerClosed {
                    during: "while sending",
                    handoff: Some(segment.handoff),
                },
                _ => io_err("send frame")(e),
            })
            .inspect_err(|e| self.stats.failure(e.reason()))?;
        self.stats.frame_sent();
        Ok(())
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// Writes header and payload with vectored writes, without joining them.
async fn write_frame(
    wr: &mut OwnedWriteHalf,
    header: &[u8],
    payload: &[u8],
    stats: &Stats,
) -> io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut slices = &mut bufs[..];
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match wr.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                stats.add_sent(n);
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _waiting = stats.write_waiting();
                wr.writable().await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
