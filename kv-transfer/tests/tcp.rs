//! The TCP transport runs the conformance suite over loopback.

mod conformance;

use std::net::SocketAddr;

use baton_core::LayoutDescriptor;
use baton_kv_transfer::frame::{
    DESCRIPTOR_LEN, FrameHeader, FrameKind, HEADER_LEN, encode_descriptor, encode_frame,
};
use baton_kv_transfer::{Delivery, Result, Shard, TcpConfig, TcpReceiver, TcpSender};
use conformance::{Backend, PairOptions, RawLink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Small socket buffers, so that the in-flight bound is small and known.
const SOCKET_BUFFER: u32 = 64 << 10;
const READ_BUFFER: usize = 64 << 10;

struct Tcp;

fn config(opts: &PairOptions) -> TcpConfig {
    TcpConfig {
        streams: opts.streams,
        delivery_capacity: opts.delivery_capacity,
        socket_buffer: Some(SOCKET_BUFFER),
        read_buffer: READ_BUFFER,
        ..TcpConfig::default()
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

struct RawTcp(TcpStream);

impl RawLink for RawTcp {
    async fn send_frame(&mut self, frame: &[u8]) {
        self.0.write_all(frame).await.expect("raw write");
    }

    async fn die_mid_frame(mut self, frame: &[u8], cut: usize) {
        self.0.write_all(&frame[..cut]).await.expect("raw write");
        drop(self.0);
    }
}

impl Backend for Tcp {
    type Sender = TcpSender;
    type Receiver = TcpReceiver;
    type Raw = RawTcp;

    async fn pair(
        &self,
        src: LayoutDescriptor,
        dst: LayoutDescriptor,
        opts: PairOptions,
    ) -> (TcpReceiver, mpsc::Receiver<Delivery>, Result<TcpSender>) {
        let (receiver, rx) = TcpReceiver::bind(loopback(), dst, config(&opts))
            .await
            .expect("bind");
        let sender =
            TcpSender::connect(receiver.local_addr(), src, Shard::default(), config(&opts)).await;
        (receiver, rx, sender)
    }

    async fn raw(&self, receiver: &TcpReceiver, src: &LayoutDescriptor, shard: Shard) -> RawTcp {
        let mut stream = TcpStream::connect(receiver.local_addr())
            .await
            .expect("connect");
        let hello = encode_descriptor(src);
        let mut header = FrameHeader::new(FrameKind::Hello, &hello).expect("hello");
        header.shard = shard;
        stream
            .write_all(&encode_frame(&header, &hello))
            .await
            .expect("write hello");
        let mut reply = [0u8; HEADER_LEN + DESCRIPTOR_LEN];
        stream.read_exact(&mut reply).await.expect("hello reply");
        RawTcp(stream)
    }

    fn in_flight_bound(&self, opts: &PairOptions, frame_bytes: u64) -> u64 {
        // Per stream: the kernel's send and receive buffers (Linux doubles the sizes set and
        // may round up; allow 4x each), the read buffer, and the frame being read and the one
        // being written.
        let per_stream = 8 * u64::from(SOCKET_BUFFER) + READ_BUFFER as u64 + 2 * frame_bytes;
        opts.streams as u64 * per_stream
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_round_trips_random_block_sets() {
    for seed in 0..3 {
        conformance::round_trip_random_block_sets(&Tcp, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_recycled_buffers_carry_later_frames_intact() {
    conformance::recycled_buffers_carry_later_frames_intact(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_concurrent_handoffs_complete_independently() {
    conformance::concurrent_handoffs_complete_independently(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_stalled_consumer_bounds_in_flight_bytes() {
    conformance::stalled_consumer_bounds_in_flight_bytes(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_peer_closing_mid_frame_fails_the_handoff() {
    conformance::peer_closing_mid_frame_fails_the_handoff(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_flipped_byte_is_rejected() {
    conformance::flipped_byte_is_rejected(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_frame_for_unknown_handoff_is_rejected() {
    conformance::frame_for_unknown_handoff_is_rejected(&Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_descriptor_from_another_model_is_refused_at_handshake() {
    conformance::descriptor_from_another_model_is_refused_at_handshake(&Tcp).await;
}
