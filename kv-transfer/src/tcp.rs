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
//!
//! The receiver touches a payload once after the kernel's copy: it reads it a piece at a time
//! into a buffer the consumer handed back ([`KvReceiver::recycle`]) when there is one, and
//! computes the crc32c of each piece while it is still in cache. A fresh buffer would cost
//! zeroing or faulting in its pages, and a checksum after the whole payload a second pass over
//! memory; each was as large a cost here as the copy out of the socket.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use baton_core::LayoutDescriptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;

use crate::error::{Error, FailureReason, Result};
use crate::frame::{
    FrameHeader, FrameKind, FrameLimits, HEADER_LEN, HandoffId, Shard, decode_close,
    decode_descriptor, encode_descriptor, encode_frame,
};
use crate::stream::{io_err, read_control, read_full, read_hello_reply, read_payload, send_close};
use crate::transport::{
    BufferPool, Delivery, Expectation, Inbound, KvReceiver, KvSegment, KvSender, ReceiverCore,
    Stats, kv_data_header,
};

/// Settings of both ends of the TCP transport (`[decode.tcp]`, `[prefill.link.tcp]` in a config
/// file; a missing key keeps its default).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Streams a sender opens to one receiver; frames are spread over them round robin.
    /// Default 4.
    pub streams: usize,
    /// Bounds on what a peer may send.
    pub limits: FrameLimits,
    /// Deliveries the receiver's channel holds before its streams stop reading. Default 64.
    pub delivery_capacity: usize,
    /// Socket send and receive buffer sizes, in bytes (`SO_SNDBUF`, `SO_RCVBUF`); part of the
    /// in-flight bound. Default: unset, the OS defaults.
    #[serde(rename = "socket_buffer_bytes")]
    #[schemars(rename = "socket_buffer_bytes")]
    pub socket_buffer: Option<u32>,
    /// Longest a connection may take to exchange hellos (a duration: "5s", "500ms").
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub handshake_timeout: Duration,
    /// Read buffering per receiving stream, in bytes; at least a frame header (56). Default
    /// 65536.
    #[serde(rename = "read_buffer_bytes")]
    #[schemars(rename = "read_buffer_bytes")]
    pub read_buffer: usize,
    /// Payload buffers the consumer hands back ([`KvReceiver::recycle`]) that the receiver keeps
    /// to read later frames into; each is as large as the frame it last held. Default 16.
    pub recycled_buffers: usize,
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
            recycled_buffers: 16,
        }
    }
}

impl TcpConfig {
    /// Errors name the config key (`read_buffer_bytes`, not the field).
    pub fn validate(&self) -> Result<()> {
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
            return invalid("read_buffer_bytes", "must hold a frame header");
        }
        Ok(())
    }
}

struct ReceiverShared {
    config: TcpConfig,
    core: ReceiverCore,
    buffers: BufferPool,
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
        let (core, rx) = ReceiverCore::new(local, config.delivery_capacity);
        let buffers = BufferPool::new(config.recycled_buffers);
        let shared = Arc::new(ReceiverShared {
            config,
            core,
            buffers,
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
        &self.shared.core.local
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
        self.shared.core.handoffs.expect(handoff, expectation)
    }

    fn cancel(&self, handoff: HandoffId) -> bool {
        self.shared.core.handoffs.cancel(handoff)
    }

    fn stats(&self) -> &Stats {
        &self.shared.core.stats
    }

    fn recycle(&self, data: Vec<u8>) {
        self.shared.buffers.put(data);
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
                    shared.core.stats.failure(FailureReason::Io);
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
            shared.core.stats.failure(e.reason());
            let _ = send_close(&mut wr, &e).await;
            return;
        }
    };
    let mut stream = ReceivingStream {
        shared: &shared,
        inbound: Inbound::new(&shared.core, shard),
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
    let local = &shared.core.local;
    local.check_compatible(&remote)?;
    let hello = encode_descriptor(local);
    let reply = FrameHeader::new(FrameKind::Hello, &hello)?;
    wr.write_all(&encode_frame(&reply, &hello))
        .await
        .map_err(io_err("write hello"))?;
    Ok(header.shard)
}

struct ReceivingStream<'a> {
    shared: &'a ReceiverShared,
    inbound: Inbound<'a>,
}

impl ReceivingStream<'_> {
    /// Reads frames until a clean close (Ok) or an error that ends the stream. Every error
    /// returned has been counted.
    async fn run(&mut self, rd: &mut BufReader<OwnedReadHalf>) -> Result<()> {
        let shared = self.shared;
        let stats = &shared.core.stats;
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
                    self.inbound.fail_touched(closed).await;
                    return Err(self.inbound.counted(closed()));
                }
                Err(e) => {
                    self.inbound.fail_touched(closed).await;
                    return Err(self.inbound.counted(io_err("read frame header")(e)));
                }
            }
            stats.add_received(HEADER_LEN);
            let header = match FrameHeader::decode(&head, &shared.config.limits) {
                Ok(h) => h,
                // The framing cannot be trusted past a bad header: end the stream.
                Err(e) => return Err(self.inbound.unreadable(e).await),
            };
            match header.kind {
                FrameKind::KvData => self.kv_data(rd, header).await?,
                FrameKind::Close => {
                    let closing = async {
                        let payload = read_payload(rd, &header).await?;
                        header.verify_payload(&payload)?;
                        decode_close(&payload)
                    };
                    let (code, message) = closing.await.map_err(|e| self.inbound.counted(e))?;
                    tracing::info!(?code, %message, "kv receiver: peer closed the stream");
                    return Ok(());
                }
                got => {
                    return Err(self.inbound.counted(Error::UnexpectedFrame {
                        expected: FrameKind::KvData,
                        got,
                    }));
                }
            }
        }
    }

    async fn kv_data(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        header: FrameHeader,
    ) -> Result<()> {
        let stats = &self.shared.core.stats;
        let id = header.handoff;
        if let Err(e) = self.inbound.admit(&header) {
            // Skip the payload without buffering it; the header was verified, so the framing
            // holds.
            let skipped = skip(rd, u64::from(header.payload_len)).await;
            stats.add_received(skipped as usize);
            if skipped < u64::from(header.payload_len) {
                return Err(self.inbound.counted(Error::PeerClosed {
                    during: "inside a rejected frame",
                    handoff: Some(id),
                }));
            }
            return self
                .inbound
                .reject(Some(id), e)
                .await
                .map_err(|e| self.inbound.counted(e));
        }
        let buf = self.shared.buffers.take(header.payload_len as usize);
        let (payload, crc) = match read_payload_summed(rd, &header, buf).await {
            Ok(read) => read,
            Err(e) => {
                // Counted once, as the handoff's failure.
                self.inbound.fail(id, e).await?;
                return Err(Error::PeerClosed {
                    during: "inside a frame payload",
                    handoff: Some(id),
                });
            }
        };
        stats.add_received(payload.len());
        stats.frame_received();
        self.inbound.deliver_summed(header, payload, crc).await
    }
}

/// Bytes of a payload read (and checksummed) at a time: small enough that a piece is still in
/// the core's cache when its crc32c is computed.
const SUM_PIECE: usize = 128 << 10;

/// Reads a frame's payload, whose length the verified header bounds, into `buf` (empty; a
/// recycled buffer or a fresh one), computing its crc32c a piece at a time as it arrives.
/// Returns the payload and its crc32c.
async fn read_payload_summed<R: AsyncRead + Unpin>(
    rd: &mut R,
    header: &FrameHeader,
    mut buf: Vec<u8>,
) -> Result<(Vec<u8>, u32)> {
    let len = header.payload_len as usize;
    buf.clear();
    buf.reserve_exact(len);
    let mut crc = 0;
    while buf.len() < len {
        let at = buf.len();
        let piece = (len - at).min(SUM_PIECE) as u64;
        // Reads into the buffer's spare capacity: nothing is zeroed first.
        let n = (&mut *rd)
            .take(piece)
            .read_buf(&mut buf)
            .await
            .map_err(io_err("read frame payload"))?;
        if n == 0 {
            return Err(Error::PeerClosed {
                during: "inside a frame payload",
                handoff: Some(header.handoff),
            });
        }
        crc = crc32c::crc32c_append(crc, &buf[at..]);
    }
    Ok((buf, crc))
}

/// Reads and drops `len` bytes; returns how many there were before the stream ended.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> u64 {
    tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink())
        .await
        .unwrap_or(0)
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
    let remote = read_hello_reply(&mut stream, local, &config.limits).await?;
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
        let head = kv_data_header(&self.local, self.shard, segment)?.encode();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.streams.len();
        let mut wr = self.streams[i].lock().await;
        write_frame(&mut wr, &head, &segment.chunk.data, &self.stats)
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
