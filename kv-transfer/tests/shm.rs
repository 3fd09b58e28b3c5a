//! The shared-memory transport runs the conformance suite over a Unix-domain socket and segments
//! in `/dev/shm`.

mod conformance;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use baton_core::LayoutDescriptor;
use baton_kv_transfer::frame::{DESCRIPTOR_LEN, FrameHeader, FrameKind, HEADER_LEN, encode_frame};
use baton_kv_transfer::shm::{
    PUBLISHED_AT, RING_AT, SEGMENT_LAYOUT, SegmentOffer, WAKE, control_len, encode_hello,
    ring_entry,
};
use baton_kv_transfer::{Delivery, Result, Shard, ShmConfig, ShmReceiver, ShmSender};
use conformance::{Backend, PairOptions, RawLink};
use memmap2::MmapMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Few, small slots, so that the in-flight bound is small and known; one holds a 256 KiB frame
/// of the back-pressure check.
const SLOTS: usize = 4;
const SLOT_BYTES: usize = 512 << 10;

struct Shm;

fn config(opts: &PairOptions) -> ShmConfig {
    ShmConfig {
        slots: SLOTS,
        slot_bytes: SLOT_BYTES,
        delivery_capacity: opts.delivery_capacity,
        ..ShmConfig::default()
    }
}

/// A socket path no other test (or test process) uses.
fn socket_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "baton-kv-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A handshaken link whose segment the test writes directly: a frame goes into the next unused
/// slot, then its ring entry, the published count and a wake-up.
struct RawShm {
    stream: UnixStream,
    map: MmapMut,
    next_slot: usize,
}

impl RawShm {
    fn write_slot(&mut self, bytes: &[u8]) -> u32 {
        assert!(self.next_slot < SLOTS, "raw link out of slots");
        assert!(bytes.len() <= SLOT_BYTES, "frame larger than a slot");
        let start = control_len(SLOTS) + self.next_slot * SLOT_BYTES;
        self.map[start..start + bytes.len()].copy_from_slice(bytes);
        self.next_slot += 1;
        (self.next_slot - 1) as u32
    }

    /// The control area's 8-byte field at `at`, which the receiver reads concurrently.
    fn field(&self, at: usize) -> &AtomicU64 {
        assert!(at.is_multiple_of(8) && at + 8 <= control_len(SLOTS));
        // SAFETY: the mapping is page-aligned and longer than the control area, so the field is
        // aligned and in bounds, and it lives as long as `self`, which the reference borrows.
        // The receiver accesses it only atomically.
        unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU64>() }
    }
}

impl RawLink for RawShm {
    async fn send_frame(&mut self, frame: &[u8]) {
        let slot = self.write_slot(frame);
        // One frame per slot, never reused: frame n is in slot n.
        let n = u64::from(slot);
        self.field(RING_AT + 8 * slot as usize)
            .store(ring_entry(slot, frame.len() as u32), Ordering::Relaxed);
        self.field(PUBLISHED_AT).store(n + 1, Ordering::SeqCst);
        self.stream.write_all(&[WAKE]).await.expect("raw wake-up");
    }

    /// A frame half written into its slot, and not published: all a crashed sender leaves
    /// behind.
    async fn die_mid_frame(mut self, frame: &[u8], cut: usize) {
        self.write_slot(&frame[..cut]);
        drop(self.stream);
    }
}

impl Backend for Shm {
    type Sender = ShmSender;
    type Receiver = ShmReceiver;
    type Raw = RawShm;

    async fn pair(
        &self,
        src: LayoutDescriptor,
        dst: LayoutDescriptor,
        opts: PairOptions,
    ) -> (ShmReceiver, mpsc::Receiver<Delivery>, Result<ShmSender>) {
        let (receiver, rx) = ShmReceiver::bind(&socket_path(), dst, config(&opts))
            .await
            .expect("bind");
        let sender =
            ShmSender::connect(receiver.socket_path(), src, Shard::default(), config(&opts)).await;
        (receiver, rx, sender)
    }

    async fn raw(&self, receiver: &ShmReceiver, src: &LayoutDescriptor, shard: Shard) -> RawShm {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = ShmConfig::default().segment_dir.join(format!(
            "baton-kv-raw-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("create segment");
        file.set_len((control_len(SLOTS) + SLOTS * SLOT_BYTES) as u64)
            .expect("size segment");
        // SAFETY: the file was created above with a fixed size, and only this process maps it:
        // this link writes it, the receiver under test reads its own mapping of it.
        let map = unsafe { MmapMut::map_mut(&file) }.expect("map segment");
        let offer = SegmentOffer {
            layout: SEGMENT_LAYOUT,
            path: path.clone(),
            slots: SLOTS as u32,
            slot_bytes: SLOT_BYTES as u32,
        };
        let mut stream = UnixStream::connect(receiver.socket_path())
            .await
            .expect("connect");
        let hello = encode_hello(src, &offer).expect("hello");
        let mut header = FrameHeader::new(FrameKind::Hello, &hello).expect("hello");
        header.shard = shard;
        stream
            .write_all(&encode_frame(&header, &hello))
            .await
            .expect("write hello");
        let mut reply = [0u8; HEADER_LEN + DESCRIPTOR_LEN];
        stream.read_exact(&mut reply).await.expect("hello reply");
        std::fs::remove_file(&path).expect("unlink segment");
        RawShm {
            stream,
            map,
            next_slot: 0,
        }
    }

    fn in_flight_bound(&self, _opts: &PairOptions, frame_bytes: u64) -> u64 {
        // A frame in each slot, and the one the receiver has copied out and is waiting to
        // deliver.
        (SLOTS as u64 + 1) * frame_bytes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_round_trips_random_block_sets() {
    for seed in 0..3 {
        conformance::round_trip_random_block_sets(&Shm, seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_recycled_buffers_carry_later_frames_intact() {
    conformance::recycled_buffers_carry_later_frames_intact(&Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_concurrent_handoffs_complete_independently() {
    conformance::concurrent_handoffs_complete_independently(&Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_stalled_consumer_bounds_in_flight_bytes() {
    conformance::stalled_consumer_bounds_in_flight_bytes(&Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_peer_closing_mid_frame_fails_the_handoff() {
    conformance::peer_closing_mid_frame_fails_the_handoff(&Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_flipped_byte_is_rejected() {
    conformance::flipped_byte_is_rejected(&Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_frame_for_unknown_handoff_is_rejected() {
    conformance::frame_for_unknown_handoff_is_rejected(&Shm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shm_descriptor_from_another_model_is_refused_at_handshake() {
    conformance::descriptor_from_another_model_is_refused_at_handshake(&Shm).await;
}
