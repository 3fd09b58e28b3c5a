//! The shared-memory transport, for a prefill worker and a decode worker on one host: the prefill
//! worker's frames live in a segment both processes map, a handoff is a copy out of that segment,
//! and a Unix-domain socket carries only the handshake and wake-ups.
//!
//! ```text
//! prefill ShmSender --frames in slots, descriptors in a ring--> ShmReceiver --bounded channel--> decode consumer
//!           <== control socket: hello; wake-ups, only for a side that sleeps ==>
//! ```
//!
//! The sender creates the segment, a file in [`ShmConfig::segment_dir`] (`/dev/shm`, mode 0600)
//! holding a control area and then `slots x slot_bytes` bytes of slots, names it in its hello,
//! and unlinks it once the receiver has mapped it and answered: both keep their mappings and
//! nothing is left in `/dev/shm` if either process dies later. A send takes a free slot, writes
//! the frame into it (the same header and payload bytes a TCP stream carries, see
//! [`crate::frame`]), and publishes it: the slot and the frame's length go into the next entry of
//! a ring in the control area and the published count goes up. The receiver reads the ring in
//! order, checks each entry against its mapping, copies the frame out, hands the slot back by
//! raising the released count, verifies the copy and waits for room in the consumer's bounded
//! channel before it reads the next entry. A stalled consumer therefore stops the releases and
//! the sender waits for a slot: the bytes between sender and consumer are bounded by the slots,
//! the one frame the receiver holds and the channel capacity.
//!
//! Neither side makes a system call per frame while the other is busy. A side with nothing to do
//! (a receiver with an empty ring, a send with no free slot) raises its idle flag, looks once
//! more, and sleeps on the socket; the other side, after publishing or releasing, looks at that
//! flag and, if it is raised, sends a wake-up. (Both sides order the flag and the count with
//! sequentially consistent fences, so either the sleeper sees the new count or the waker sees
//! the flag.) The receiver is one task, whose flag the sender clears when it wakes it; the
//! sender's flag stays raised while any of its sends waits, so every release is announced until
//! none does.
//!
//! Each side touches a payload once: the sender computes its crc32c while copying it into the
//! slot, the receiver while copying it out ([`crate::checksummed_copy`]), into a buffer the
//! consumer handed back ([`KvReceiver::recycle`]) when there is one, so that a frame does not
//! cost a fresh allocation whose pages the kernel faults in and zeroes. The receiver keeps at
//! most [`ShmConfig::recycled_buffers`] of them.
//!
//! A frame (56-byte header and payload) must fit one slot: a larger segment is refused at send
//! with [`Error::SegmentTooLarge`], and the prefill worker splits block runs to stay under
//! [`ShmSender::max_payload`], as it does for [`FrameLimits`].
//!
//! Control area, at the start of the segment, [`CONTROL_ALIGN`]-aligned so that the slots can be
//! mapped on their own (little-endian; the counters never wrap):
//!
//! ```text
//! offset size field
//!      0    8 published: frames the sender has put in the ring (the sender writes it)
//!     64    8 released: frames the receiver has copied out; their slots are free again
//!               (the receiver writes it)
//!    128    4 receiver idle: nonzero while the receiver sleeps on the socket (the receiver
//!               raises it, the sender clears it when it wakes the receiver)
//!    192    4 sender idle: nonzero while a send waits for a slot (the sender raises and clears it)
//!    256 8 x slots ring: frame n's entry at n mod slots: slot (low 32 bits), frame bytes (high 32)
//! ```
//!
//! Control socket, after the hello frames (the sender's hello payload is its layout descriptor
//! followed by a [`SegmentOffer`]; the receiver answers with a hello of its descriptor, or a
//! close frame saying why it refuses): the sender sends single [`WAKE`] bytes; the receiver
//! sends [`Notice`]s of [`NOTICE_LEN`] bytes:
//!
//! ```text
//! offset size field
//!      0    4 magic "BTSH"
//!      4    1 kind: 1 released (frames were released), 2 close (a close payload of `length`
//!               bytes follows)
//!      5    7 zero
//!     12    4 length: 0 (released), close payload bytes (close)
//! ```
//!
//! Invariants: a slot belongs to the sender from the moment a send takes it until it is
//! published, then to the receiver until the released count passes it. The receiver trusts
//! nothing a peer sends or writes: the published count must stay within a ring of the released
//! one, slot indices and lengths are checked against the mapping before any byte is read, headers
//! are decoded and bounded as on TCP, and it never holds a reference into the slots: it copies
//! the bytes out and verifies the copy, so a peer that writes while it reads can only cause a
//! checksum failure. The sender likewise refuses a released count that goes backwards or past
//! what it published. When a link ends, every live handoff it carried fails: the segment was that
//! sender's only path. (A process of the same user that kept a descriptor to the segment could
//! shrink it and make a reader fault; such a process can write our memory anyway.)

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use baton_core::LayoutDescriptor;
use memmap2::{MmapOptions, MmapRaw};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, TryAcquireError, mpsc};
use tokio::task::JoinSet;

use crate::copy::copy_crc32c;
use crate::error::{Error, FailureReason, Result};
use crate::frame::{
    CloseCode, DESCRIPTOR_LEN, FrameHeader, FrameKind, FrameLimits, HEADER_LEN, HandoffId,
    MAX_CLOSE_MESSAGE, Shard, decode_close, decode_descriptor, encode_close, encode_descriptor,
    encode_frame,
};
use crate::stream::{io_err, read_control, read_hello_reply, send_close};
use crate::transport::{
    BufferPool, Delivery, Expectation, Inbound, KvReceiver, KvSegment, KvSender, ReceiverCore,
    Stats, kv_data_header_summed,
};

/// Bytes of every notice the receiver sends.
pub const NOTICE_LEN: usize = 16;
const NOTICE_MAGIC: [u8; 4] = *b"BTSH";
/// The byte a sender sends to wake a sleeping receiver; any other byte ends the link.
pub const WAKE: u8 = b'W';
/// Longest segment path a hello may name.
pub const MAX_SEGMENT_PATH: usize = 1024;
/// The segment layout this build creates and maps: a control area with the ring, then the
/// slots. A receiver refuses an offer of another.
pub const SEGMENT_LAYOUT: u16 = 2;
/// Bytes of a [`SegmentOffer`] before its path.
const OFFER_FIXED_LEN: usize = 2 + 4 + 4 + 2;
/// Largest hello payload a receiver reads: descriptor, offer, longest path.
const MAX_HELLO: usize = DESCRIPTOR_LEN + OFFER_FIXED_LEN + MAX_SEGMENT_PATH;
/// Most slots a segment may have.
pub const MAX_SLOTS: usize = 4096;
/// The control area's size is a multiple of this, a multiple of every page size Linux uses, so
/// that the slots can be mapped apart from it.
pub const CONTROL_ALIGN: usize = 64 << 10;

/// Offset of the published count in the control area (see the module docs).
pub const PUBLISHED_AT: usize = 0;
/// Offset of the released count.
pub const RELEASED_AT: usize = 64;
/// Offset of the receiver's idle flag.
pub const RECEIVER_IDLE_AT: usize = 128;
/// Offset of the sender's idle flag.
pub const SENDER_IDLE_AT: usize = 192;
/// Offset of the ring.
pub const RING_AT: usize = 256;

/// Settings of both ends of the shared-memory transport (`[decode.shm]`, `[prefill.link.shm]` in
/// a config file; a missing key keeps its default).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ShmConfig {
    /// Slots in a sender's segment: frames written and not yet copied out by the receiver. For a
    /// receiver, the most slots it maps of one sender. At most 4096 ([`MAX_SLOTS`]); default 8.
    pub slots: usize,
    /// Bytes of one slot; a frame (56-byte header and payload) must fit one. For a receiver, the
    /// largest slot it maps. Default 8388608 (8 MiB).
    pub slot_bytes: usize,
    /// Directory senders create segments in, a tmpfs so that they are memory, not disk. A
    /// receiver maps segments from this directory only. An absolute path; default "/dev/shm".
    pub segment_dir: PathBuf,
    /// Bounds on what a peer may send.
    pub limits: FrameLimits,
    /// Deliveries the receiver's channel holds before its links stop copying frames out.
    /// Default 16.
    pub delivery_capacity: usize,
    /// Payload buffers the consumer hands back ([`KvReceiver::recycle`]) that the receiver keeps
    /// to copy later frames into; each is as large as the frame it last held. Default 18: one
    /// for every frame the channel, the receiver and the consumer can hold at once.
    pub recycled_buffers: usize,
    /// Longest a connection may take to exchange hellos (a duration: "5s", "500ms").
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub handshake_timeout: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        // 64 MiB per sender: eight frames of up to 8 MiB less the header, each one layer of
        // 127 16-token blocks of an 8-kv-head, 128-dim f16 model. Enough buffers to recycle for
        // every frame the channel, the receiver and the consumer can hold at once.
        Self {
            slots: 8,
            slot_bytes: 8 << 20,
            segment_dir: PathBuf::from("/dev/shm"),
            limits: FrameLimits::default(),
            delivery_capacity: 16,
            recycled_buffers: 18,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

impl ShmConfig {
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return invalid("slots", "must be between 1 and 4096");
        }
        if self.slot_bytes < HEADER_LEN {
            return invalid("slot_bytes", "must hold a frame header (56 bytes)");
        }
        if u32::try_from(self.slot_bytes).is_err() {
            return invalid(
                "slot_bytes",
                "must be below 4 GiB (ring entries carry 32-bit lengths)",
            );
        }
        if self
            .slots
            .checked_mul(self.slot_bytes)
            .and_then(|n| n.checked_add(control_len(self.slots)))
            .is_none_or(|n| n > isize::MAX as usize)
        {
            return invalid("slots", "slots x slot_bytes overflows");
        }
        if !self.segment_dir.is_absolute() {
            return invalid("segment_dir", "must be an absolute path");
        }
        if self.delivery_capacity == 0 {
            return invalid("delivery_capacity", "must be at least 1");
        }
        Ok(())
    }

    fn geometry(&self) -> Geometry {
        // Both fit u32 after `validate`.
        Geometry {
            slots: self.slots as u32,
            slot_bytes: self.slot_bytes as u32,
        }
    }
}

/// The shape of a segment: the control area, then `slots` slots of `slot_bytes` bytes, back to
/// back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    slots: u32,
    slot_bytes: u32,
}

/// Bytes of the control area of a segment of `slots` slots; the slots follow it.
pub fn control_len(slots: usize) -> usize {
    (RING_AT + 8 * slots).next_multiple_of(CONTROL_ALIGN)
}

impl Geometry {
    fn control_len(&self) -> usize {
        control_len(self.slots as usize)
    }

    fn slots_len(&self) -> usize {
        self.slots as usize * self.slot_bytes as usize
    }

    /// Bytes of the whole segment file.
    fn file_len(&self) -> usize {
        self.control_len() + self.slots_len()
    }

    /// Where the frame a ring entry names lies among the slots; refuses a slot outside them and
    /// a length that is shorter than a header or runs past the slot.
    fn locate(&self, slot: u32, len: u32) -> Result<Range<usize>> {
        let malformed = |reason: String| Error::MalformedNotice { reason };
        if slot >= self.slots {
            return Err(malformed(format!(
                "slot {slot} outside the segment's {} slots",
                self.slots
            )));
        }
        if (len as usize) < HEADER_LEN || len > self.slot_bytes {
            return Err(malformed(format!(
                "frame of {len} bytes in a slot of {} (a header is {HEADER_LEN})",
                self.slot_bytes
            )));
        }
        let start = slot as usize * self.slot_bytes as usize;
        Ok(start..start + len as usize)
    }
}

/// A ring entry: the slot a frame is in and the frame's bytes.
pub fn ring_entry(slot: u32, len: u32) -> u64 {
    u64::from(len) << 32 | u64::from(slot)
}

fn split_ring_entry(entry: u64) -> (u32, u32) {
    (entry as u32, (entry >> 32) as u32)
}

/// One side's mapping of a segment's control area. Every field is accessed atomically, by both
/// processes.
struct ControlArea {
    map: MmapRaw,
    slots: u32,
}

impl ControlArea {
    /// Maps the control area of `file`, laid out for `geometry`, read-write.
    fn map(file: &File, geometry: Geometry) -> Result<Self> {
        let map = MmapOptions::new()
            .len(geometry.control_len())
            .map_raw(file)
            .map_err(io_err("map shared-memory control area"))?;
        Ok(Self {
            map,
            slots: geometry.slots,
        })
    }

    fn u64_at(&self, at: usize) -> &AtomicU64 {
        assert!(
            at.is_multiple_of(8) && at + 8 <= self.map.len(),
            "field outside the area"
        );
        // SAFETY: the mapping is page-aligned, so `at` (a multiple of 8, asserted in bounds)
        // is 8-aligned and inside it, and the mapping lives as long as `self`, which the
        // reference borrows. Any bit pattern is a valid `AtomicU64`. The other process reaches
        // this memory only through atomic accesses of its own (or, misbehaving, through writes
        // that can change the value we read, which every reader checks, but nothing else).
        unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU64>() }
    }

    fn u32_at(&self, at: usize) -> &AtomicU32 {
        assert!(
            at.is_multiple_of(4) && at + 4 <= self.map.len(),
            "field outside the area"
        );
        // SAFETY: as in `u64_at`, with 4-byte alignment.
        unsafe { &*self.map.as_ptr().add(at).cast::<AtomicU32>() }
    }

    fn published(&self) -> &AtomicU64 {
        self.u64_at(PUBLISHED_AT)
    }

    fn released(&self) -> &AtomicU64 {
        self.u64_at(RELEASED_AT)
    }

    fn receiver_idle(&self) -> &AtomicU32 {
        self.u32_at(RECEIVER_IDLE_AT)
    }

    fn sender_idle(&self) -> &AtomicU32 {
        self.u32_at(SENDER_IDLE_AT)
    }

    /// The ring entry of frame `n`.
    fn entry(&self, n: u64) -> &AtomicU64 {
        self.u64_at(RING_AT + 8 * (n % u64::from(self.slots)) as usize)
    }
}

/// A message from the receiver on the control socket after the hellos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Frames were released while a send waited for a slot (one notice per release).
    Released,
    /// The link ends; a close payload ([`encode_close`]) of `len` bytes follows.
    Close { len: u32 },
}

impl Notice {
    pub fn encode(&self) -> [u8; NOTICE_LEN] {
        let (kind, len) = match *self {
            Notice::Released => (1u8, 0),
            Notice::Close { len } => (2, len),
        };
        let mut b = [0u8; NOTICE_LEN];
        b[0..4].copy_from_slice(&NOTICE_MAGIC);
        b[4] = kind;
        b[12..16].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Decodes a notice, refusing foreign magic, unknown kinds and nonzero unused fields.
    pub fn decode(b: &[u8; NOTICE_LEN]) -> Result<Self> {
        let malformed = |reason: String| Error::MalformedNotice { reason };
        if b[0..4] != NOTICE_MAGIC {
            return Err(malformed(format!("magic {:02x?}", &b[0..4])));
        }
        if b[5..12].iter().any(|&x| x != 0) {
            return Err(malformed(format!("reserved bytes {:02x?}", &b[5..12])));
        }
        let len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        match b[4] {
            1 if len == 0 => Ok(Notice::Released),
            2 => Ok(Notice::Close { len }),
            1 => Err(malformed(format!("released notice with length {len}"))),
            kind => Err(malformed(format!("unknown kind {kind}"))),
        }
    }
}

/// The part of a sender's hello that names its segment.
///
/// ```text
/// offset size field
///      0    2 segment layout (SEGMENT_LAYOUT)
///      2    4 slots
///      6    4 slot bytes
///     10    2 path length
///     12    n path (bytes of an absolute path, no terminator)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentOffer {
    pub layout: u16,
    pub path: PathBuf,
    pub slots: u32,
    pub slot_bytes: u32,
}

impl SegmentOffer {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let path = self.path.as_os_str().as_bytes();
        if path.len() > MAX_SEGMENT_PATH {
            return Err(Error::InvalidConfig {
                field: "segment_dir",
                reason: format!(
                    "segment path of {} bytes (at most {MAX_SEGMENT_PATH})",
                    path.len()
                ),
            });
        }
        let mut b = Vec::with_capacity(OFFER_FIXED_LEN + path.len());
        b.extend_from_slice(&self.layout.to_le_bytes());
        b.extend_from_slice(&self.slots.to_le_bytes());
        b.extend_from_slice(&self.slot_bytes.to_le_bytes());
        b.extend_from_slice(&(path.len() as u16).to_le_bytes());
        b.extend_from_slice(path);
        Ok(b)
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let malformed = |reason: String| Error::MalformedFrame {
            kind: FrameKind::Hello,
            reason,
        };
        let Some((fixed, path)) = b.split_first_chunk::<OFFER_FIXED_LEN>() else {
            return Err(malformed(format!("segment offer of {} bytes", b.len())));
        };
        let u32_at = |at: usize| {
            u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let path_len = u16::from_le_bytes([fixed[10], fixed[11]]) as usize;
        if path.len() != path_len || path_len > MAX_SEGMENT_PATH {
            return Err(malformed(format!(
                "segment path of {} bytes, offer says {path_len}",
                path.len()
            )));
        }
        Ok(Self {
            layout: u16::from_le_bytes([fixed[0], fixed[1]]),
            path: PathBuf::from(OsStr::from_bytes(path)),
            slots: u32_at(2),
            slot_bytes: u32_at(6),
        })
    }
}

/// A sender's hello payload: its layout descriptor, then its segment offer.
pub fn encode_hello(d: &LayoutDescriptor, offer: &SegmentOffer) -> Result<Vec<u8>> {
    let mut b = encode_descriptor(d).to_vec();
    b.extend_from_slice(&offer.encode()?);
    Ok(b)
}

/// Decodes a sender's hello payload.
pub fn decode_hello(b: &[u8]) -> Result<(LayoutDescriptor, SegmentOffer)> {
    let Some((descriptor, offer)) = b.split_at_checked(DESCRIPTOR_LEN) else {
        return Err(Error::MalformedFrame {
            kind: FrameKind::Hello,
            reason: format!("hello of {} bytes", b.len()),
        });
    };
    Ok((decode_descriptor(descriptor)?, SegmentOffer::decode(offer)?))
}

/// A segment file that is removed from the directory when this drops: once the receiver has
/// mapped it, or when the handshake fails.
struct SegmentFile(PathBuf);

impl Drop for SegmentFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "kv sender: segment not unlinked");
        }
    }
}

/// The sender's mappings of its own segment.
struct SenderSegment {
    control: ControlArea,
    slots: MmapRaw,
    geometry: Geometry,
    // Where the file was created; unlinked once the receiver has mapped it.
    path: PathBuf,
}

impl SenderSegment {
    /// Creates, reserves and maps a fresh segment file in `config.segment_dir`. Blocking.
    fn create(config: &ShmConfig) -> Result<(Self, SegmentFile)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let geometry = config.geometry();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let (file, path) = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = config
                .segment_dir
                .join(format!("baton-kv-{}-{n}-{nanos:08x}", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create shared-memory segment")(e)),
            }
        };
        let guard = SegmentFile(path.clone());
        // Reserve the pages now: on a full tmpfs this fails here, with an error, instead of
        // faulting (SIGBUS) on a later write into the mapping. The file starts zeroed: nothing
        // published, nothing released, nobody idle.
        // SAFETY: `file` is an open, writable descriptor for the duration of the call; the
        // call takes plain integers and touches no Rust memory.
        let rc = unsafe {
            libc::posix_fallocate(file.as_raw_fd(), 0, geometry.file_len() as libc::off_t)
        };
        if rc != 0 {
            return Err(io_err("reserve shared-memory segment")(
                io::Error::from_raw_os_error(rc),
            ));
        }
        let control = ControlArea::map(&file, geometry)?;
        let slots = MmapOptions::new()
            .offset(geometry.control_len() as u64)
            .len(geometry.slots_len())
            .map_raw(&file)
            .map_err(io_err("map shared-memory segment"))?;
        Ok((
            Self {
                control,
                slots,
                geometry,
                path,
            },
            guard,
        ))
    }

    /// Writes a frame's payload into `slot`, which the caller has taken from the pool, after
    /// the room for its header; returns the payload's crc32c, computed in the same pass.
    fn write_payload(&self, slot: u32, payload: &[u8]) -> u32 {
        let dst = self.frame_start(slot, payload.len());
        // SAFETY: `frame_start` checked that the frame lies inside the mapping, which lives as
        // long as `self`. The slot pool hands each slot to one send at a time, so no other
        // thread of this process writes these bytes now, and the receiver reads them only after
        // the frame is published, which follows this write. The source is a local buffer, not
        // the mapping.
        unsafe { copy_crc32c(payload.as_ptr(), dst.add(HEADER_LEN), payload.len()) }
    }

    /// Writes the header of the frame whose payload [`SenderSegment::write_payload`] wrote.
    fn write_header(&self, slot: u32, header: &[u8; HEADER_LEN]) {
        let dst = self.frame_start(slot, 0);
        // SAFETY: as in `write_payload`.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), dst, HEADER_LEN) }
    }

    /// Where the frame in `slot` starts; asserts that a frame of `payload` bytes fits the slot.
    fn frame_start(&self, slot: u32, payload: usize) -> *mut u8 {
        let g = self.geometry;
        assert!(
            slot < g.slots && HEADER_LEN + payload <= g.slot_bytes as usize,
            "frame outside its slot"
        );
        // In bounds: slot < slots, and the mapping is `slots_len()` bytes.
        self.slots
            .as_mut_ptr()
            .wrapping_add(slot as usize * g.slot_bytes as usize)
    }
}

/// The receiver's mappings of a sender's segment: the control area read-write, the slots
/// read-only.
struct MappedSegment {
    control: ControlArea,
    slots: MmapRaw,
    geometry: Geometry,
}

impl MappedSegment {
    /// Maps the segment a hello offers, if it has this build's layout, lies in
    /// `config.segment_dir`, is a regular file at least as long as its geometry, and that
    /// geometry is within `config`.
    fn open(offer: &SegmentOffer, config: &ShmConfig) -> Result<Self> {
        let refused = |reason: String| Error::SegmentRefused { reason };
        if offer.layout != SEGMENT_LAYOUT {
            return Err(refused(format!(
                "segment layout {} (this receiver maps {SEGMENT_LAYOUT})",
                offer.layout
            )));
        }
        if offer.path.parent() != Some(config.segment_dir.as_path()) {
            return Err(refused(format!(
                "{} is not in {}",
                offer.path.display(),
                config.segment_dir.display()
            )));
        }
        if offer.slots == 0 || offer.slots as usize > config.slots {
            return Err(refused(format!(
                "{} slots (this receiver maps 1 to {})",
                offer.slots, config.slots
            )));
        }
        if (offer.slot_bytes as usize) < HEADER_LEN || offer.slot_bytes as usize > config.slot_bytes
        {
            return Err(refused(format!(
                "slots of {} bytes (this receiver maps {HEADER_LEN} to {})",
                offer.slot_bytes, config.slot_bytes
            )));
        }
        let geometry = Geometry {
            slots: offer.slots,
            slot_bytes: offer.slot_bytes,
        };
        // No symlinks, and no blocking on a FIFO a peer might name. Writable for the control
        // area; the slots are mapped read-only.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&offer.path)
            .map_err(io_err("open shared-memory segment"))?;
        let meta = file
            .metadata()
            .map_err(io_err("stat shared-memory segment"))?;
        if !meta.is_file() {
            return Err(refused(format!(
                "{} is not a regular file",
                offer.path.display()
            )));
        }
        if meta.len() < geometry.file_len() as u64 {
            return Err(refused(format!(
                "{} bytes, {} slots of {} need {}",
                meta.len(),
                geometry.slots,
                geometry.slot_bytes,
                geometry.file_len()
            )));
        }
        let control = ControlArea::map(&file, geometry)?;
        let slots = MmapOptions::new()
            .offset(geometry.control_len() as u64)
            .len(geometry.slots_len())
            .map_raw_read_only(&file)
            .map_err(io_err("map shared-memory segment"))?;
        Ok(Self {
            control,
            slots,
            geometry,
        })
    }

    /// Copies `len` bytes at offset `at` of the slots into `dst` (empty, with room for them)
    /// and returns their crc32c, computed in the same pass from the bytes written to `dst`.
    fn copy_out_summed(&self, at: usize, len: usize, dst: &mut Vec<u8>) -> u32 {
        assert!(
            at.checked_add(len)
                .is_some_and(|end| end <= self.slots.len()),
            "copy outside the mapping"
        );
        assert!(
            dst.is_empty() && dst.capacity() >= len,
            "no room to copy into"
        );
        // SAFETY: `at .. at + len` lies inside the mapping (asserted above), which lives as long
        // as `self`, and the file was at least that long when mapped (`open`). It is read
        // through raw pointers only: the sender may be writing these bytes right now, which can
        // change what is copied but not make the copy unsound, and the checksum returned is of
        // the bytes as written to `dst`. `dst` has room for `len` bytes (asserted above) and is
        // our own allocation, so the two do not overlap.
        let crc = unsafe { copy_crc32c(self.slots.as_ptr().add(at), dst.as_mut_ptr(), len) };
        // SAFETY: the copy initialised the first `len` bytes, within the capacity.
        unsafe { dst.set_len(len) };
        crc
    }

    /// Copies `dst.len()` bytes at offset `at` of the slots out of the mapping.
    fn copy_out(&self, at: usize, dst: &mut [u8]) {
        assert!(
            at.checked_add(dst.len())
                .is_some_and(|end| end <= self.slots.len()),
            "copy outside the mapping"
        );
        // SAFETY: `at .. at + dst.len()` lies inside the mapping (asserted above), which lives
        // as long as `self`, and the file was at least that long when mapped (`open`). No
        // reference into the mapping exists: the sender may be writing these bytes right now,
        // which can change what is copied but not make the copy unsound (any byte is a valid
        // `u8`), and callers verify the copy before using it. `dst` is our own buffer, so the
        // two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.slots.as_ptr().add(at), dst.as_mut_ptr(), dst.len());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Taken by a send that has not yet published it.
    Writing,
    /// Published; the receiver owns it until the released count passes it.
    Published,
}

/// Which of a sender's slots are free, being written, or in the ring, and the ring's counts.
/// Pure bookkeeping; [`SenderShared`] adds the shared memory and the waiting.
struct SlotPool {
    state: Vec<SlotState>,
    free: Vec<u32>,
    // Published slots not yet released, in ring order.
    in_ring: VecDeque<u32>,
    published: u64,
    released: u64,
    // Sends waiting for a slot.
    waiting: usize,
}

impl SlotPool {
    fn new(slots: u32) -> Self {
        Self {
            state: vec![SlotState::Free; slots as usize],
            free: (0..slots).rev().collect(),
            in_ring: VecDeque::with_capacity(slots as usize),
            published: 0,
            released: 0,
            waiting: 0,
        }
    }

    fn take(&mut self) -> Option<u32> {
        let slot = self.free.pop()?;
        self.state[slot as usize] = SlotState::Writing;
        Some(slot)
    }

    /// A taken slot goes into the ring; returns its frame number.
    fn publish(&mut self, slot: u32) -> u64 {
        debug_assert_eq!(self.state[slot as usize], SlotState::Writing);
        self.state[slot as usize] = SlotState::Published;
        self.in_ring.push_back(slot);
        let n = self.published;
        self.published += 1;
        n
    }

    /// A taken slot goes back unsent (the send was cancelled or failed before publishing it).
    fn unwritten(&mut self, slot: u32) {
        debug_assert_eq!(self.state[slot as usize], SlotState::Writing);
        self.state[slot as usize] = SlotState::Free;
        self.free.push(slot);
    }

    /// The receiver's released count: the slots of the frames it passes become free. Returns
    /// how many did; refuses a count that goes backwards or past what was published.
    fn release_up_to(&mut self, released: u64) -> Result<usize> {
        if released < self.released || released > self.published {
            return Err(Error::MalformedNotice {
                reason: format!(
                    "released count {released}, after {} of {} published frames",
                    self.released, self.published
                ),
            });
        }
        let n = (released - self.released) as usize;
        for slot in self.in_ring.drain(..n) {
            debug_assert_eq!(self.state[slot as usize], SlotState::Published);
            self.state[slot as usize] = SlotState::Free;
            self.free.push(slot);
        }
        self.released = released;
        Ok(n)
    }
}

/// What a sender's sends and its notice-reading task share: the segment and its slots.
struct SenderShared {
    segment: SenderSegment,
    pool: Mutex<SlotPool>,
    // One permit per free slot; closed when the link ends, which wakes every waiting send.
    free: Semaphore,
    // What the receiver said when it closed the link, if it did.
    closed: OnceLock<(CloseCode, String)>,
}

impl SenderShared {
    fn new(segment: SenderSegment) -> Self {
        let slots = segment.geometry.slots;
        Self {
            segment,
            pool: Mutex::new(SlotPool::new(slots)),
            free: Semaphore::new(slots as usize),
            closed: OnceLock::new(),
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, SlotPool> {
        // Every critical section is a few assignments that cannot panic halfway.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees the slots of the frames the receiver has released since the last look; returns
    /// how many. A count that breaks the protocol ends the link.
    fn reclaim(&self, stats: &Stats) -> usize {
        let released = self.segment.control.released().load(Ordering::Acquire);
        match self.pool().release_up_to(released) {
            Ok(n) => {
                self.free.add_permits(n);
                n
            }
            Err(e) => {
                self.broken(&e, stats);
                0
            }
        }
    }

    /// The receiver broke the protocol: the link ends for every send.
    fn broken(&self, e: &Error, stats: &Stats) {
        tracing::warn!(error = %e, "kv sender: receiver broke the shared-memory protocol");
        stats.failure(e.reason());
        self.free.close();
    }

    /// Waits for a free slot; `None` once the link has ended.
    async fn take(&self, stats: &Stats) -> Option<TakenSlot<'_>> {
        // Looking first keeps the most recently released slot, still in cache, in use.
        self.reclaim(stats);
        let permit = loop {
            match self.free.try_acquire() {
                Ok(permit) => break permit,
                Err(TryAcquireError::Closed) => return None,
                Err(TryAcquireError::NoPermits) => {}
            }
            // Sleep until the receiver releases a frame: raise the flag, then look once more
            // (the receiver raises the count, then looks at the flag).
            let _waiting = Waiting::start(self);
            fence(Ordering::SeqCst);
            if self.reclaim(stats) > 0 {
                continue;
            }
            let _gauge = stats.write_waiting();
            break self.free.acquire().await.ok()?;
        };
        permit.forget();
        let slot = self
            .pool()
            .take()
            .expect("a semaphore permit stands for a free slot");
        Some(TakenSlot {
            shared: self,
            slot,
            published: false,
        })
    }
}

/// A send waiting for a slot: the sender's idle flag stays raised while there is one, so that
/// the receiver says so after every release until each has a slot.
struct Waiting<'a>(&'a SenderShared);

impl<'a> Waiting<'a> {
    fn start(shared: &'a SenderShared) -> Self {
        let mut pool = shared.pool();
        pool.waiting += 1;
        shared
            .segment
            .control
            .sender_idle()
            .store(1, Ordering::SeqCst);
        Waiting(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut pool = self.0.pool();
        pool.waiting -= 1;
        if pool.waiting == 0 {
            self.0
                .segment
                .control
                .sender_idle()
                .store(0, Ordering::Relaxed);
        }
    }
}

/// A slot a send holds; goes back to the pool on drop unless it was published.
struct TakenSlot<'a> {
    shared: &'a SenderShared,
    slot: u32,
    published: bool,
}

impl TakenSlot<'_> {
    /// Puts the frame of `len` bytes written into this slot in the ring. Returns whether the
    /// receiver was asleep and needs waking.
    fn publish(mut self, len: u32) -> bool {
        let control = &self.shared.segment.control;
        {
            // Entry and count under the lock, so that concurrent sends publish in turn.
            let mut pool = self.shared.pool();
            let n = pool.publish(self.slot);
            control
                .entry(n)
                .store(ring_entry(self.slot, len), Ordering::Relaxed);
            control.published().store(n + 1, Ordering::Release);
            self.published = true;
        }
        // The receiver raises its flag, then looks at the count; we raise the count, then look
        // at the flag.
        fence(Ordering::SeqCst);
        control.receiver_idle().swap(0, Ordering::SeqCst) != 0
    }
}

impl Drop for TakenSlot<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.shared.pool().unwritten(self.slot);
            self.shared.free.add_permits(1);
        }
    }
}

struct ReceiverShared {
    config: ShmConfig,
    core: ReceiverCore,
    buffers: BufferPool,
}

/// The decode worker's end: listens on a Unix-domain socket, maps each sender's segment and
/// delivers verified segments of expected handoffs. Dropping it stops accepting, ends every
/// link and removes the socket file.
pub struct ShmReceiver {
    shared: Arc<ReceiverShared>,
    socket_path: PathBuf,
    accept: tokio::task::JoinHandle<()>,
}

impl ShmReceiver {
    /// Listens on `socket_path` (mode 0600; a stale socket file there is replaced, a live one
    /// refused) for senders whose layout maps onto `local`. Deliveries arrive on the returned
    /// channel, which holds at most `config.delivery_capacity` of them.
    pub async fn bind(
        socket_path: &Path,
        local: LayoutDescriptor,
        config: ShmConfig,
    ) -> Result<(Self, mpsc::Receiver<Delivery>)> {
        config.validate()?;
        remove_stale_socket(socket_path)?;
        let listener = UnixListener::bind(socket_path).map_err(io_err("bind control socket"))?;
        std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("restrict control socket"))?;
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
                socket_path: socket_path.to_owned(),
                accept,
            },
            rx,
        ))
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn descriptor(&self) -> &LayoutDescriptor {
        &self.shared.core.local
    }
}

impl Drop for ShmReceiver {
    fn drop(&mut self) {
        // The accept task owns the link tasks; aborting it drops (and aborts) them too.
        self.accept.abort();
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl KvReceiver for ShmReceiver {
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

/// Clears the way for binding `path`: nothing there, or a socket nobody listens on any more.
fn remove_stale_socket(path: &Path) -> Result<()> {
    let in_the_way = |reason: &str| Error::Io {
        during: "bind control socket",
        source: io::Error::new(io::ErrorKind::AddrInUse, reason),
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect control socket path")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(in_the_way("the path exists and is not a socket"));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(in_the_way("a receiver is listening on this socket"));
    }
    std::fs::remove_file(path).map_err(io_err("remove stale control socket"))
}

async fn accept_loop(listener: UnixListener, shared: Arc<ReceiverShared>) {
    let mut links = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    links.spawn(serve_link(stream, shared.clone()));
                }
                Err(e) => {
                    // Per-connection failures must not stop the listener.
                    tracing::warn!(error = %e, "kv receiver: accept failed");
                    shared.core.stats.failure(FailureReason::Io);
                }
            },
            Some(_) = links.join_next(), if !links.is_empty() => {}
        }
    }
}

/// Serves one sender until it goes away or breaks the protocol.
async fn serve_link(stream: UnixStream, shared: Arc<ReceiverShared>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let (shard, segment) = match accept_hello(&mut rd, &mut wr, &shared).await {
        Ok(accepted) => accepted,
        Err(e) => {
            tracing::info!(error = %e, "kv receiver: shared-memory handshake failed");
            shared.core.stats.failure(e.reason());
            let _ = send_close(&mut wr, &e).await;
            return;
        }
    };
    let mut link = ReceivingLink {
        shared: &shared,
        inbound: Inbound::new(&shared.core, shard),
        segment,
        consumed: 0,
    };
    let ended = link.run(&mut rd, &mut wr).await;
    // The segment was this sender's only path: whatever it still owed will not come.
    let _ = link
        .inbound
        .fail_live(|id| Error::PeerClosed {
            during: "before its handoffs completed",
            handoff: Some(id),
        })
        .await;
    if let Err(e) = ended {
        tracing::info!(error = %e, "kv receiver: shared-memory link closed");
        let _ = send_close_notice(&mut wr, &e).await;
    }
}

async fn accept_hello(
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    shared: &ReceiverShared,
) -> Result<(Shard, MappedSegment)> {
    let limit = shared.config.handshake_timeout;
    let limits = FrameLimits {
        max_payload: MAX_HELLO as u32,
    };
    let (header, payload) = tokio::time::timeout(limit, read_control(rd, &limits))
        .await
        .map_err(|_| Error::Timeout {
            during: "handshake",
            limit,
        })??;
    if header.kind != FrameKind::Hello {
        return Err(Error::UnexpectedFrame {
            expected: FrameKind::Hello,
            got: header.kind,
        });
    }
    let (remote, offer) = decode_hello(&payload)?;
    let local = &shared.core.local;
    local.check_compatible(&remote)?;
    let segment = MappedSegment::open(&offer, &shared.config)?;
    let hello = encode_descriptor(local);
    let reply = FrameHeader::new(FrameKind::Hello, &hello)?;
    wr.write_all(&encode_frame(&reply, &hello))
        .await
        .map_err(io_err("write hello"))?;
    Ok((header.shard, segment))
}

/// Tells the sender why the link ends, in a close notice, and shuts the writing side.
async fn send_close_notice(wr: &mut OwnedWriteHalf, error: &Error) -> io::Result<()> {
    let payload = encode_close(CloseCode::for_error(error), &error.to_string());
    let mut bytes = Notice::Close {
        len: payload.len() as u32,
    }
    .encode()
    .to_vec();
    bytes.extend_from_slice(&payload);
    wr.write_all(&bytes).await?;
    wr.shutdown().await
}

struct ReceivingLink<'a> {
    shared: &'a ReceiverShared,
    inbound: Inbound<'a>,
    segment: MappedSegment,
    // Frames taken from the ring; each is released once copied out, so this is also the
    // released count.
    consumed: u64,
}

impl ReceivingLink<'_> {
    /// Copies out every frame the ring holds, and sleeps on the socket when it is empty, until
    /// the sender goes away (Ok) or an error that ends the link. Every error returned has been
    /// counted.
    async fn run(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        wr: &mut OwnedWriteHalf,
    ) -> Result<()> {
        let mut wakes = [0u8; 64];
        loop {
            if self.drain(wr).await? {
                continue;
            }
            // Raise the flag, then look once more (the sender raises the count, then looks at
            // the flag): a frame published meanwhile is either seen here or wakes us.
            let idle = self.segment.control.receiver_idle();
            idle.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.published().await? > self.consumed {
                idle.store(0, Ordering::Relaxed);
                continue;
            }
            let n = match rd.read(&mut wakes).await {
                Ok(0) => {
                    // Whatever the sender published before it went still counts.
                    self.drain(wr).await?;
                    return Ok(());
                }
                Ok(n) => n,
                Err(e) => return Err(self.inbound.counted(io_err("read wake-up")(e))),
            };
            idle.store(0, Ordering::Relaxed);
            if let Some(&b) = wakes[..n].iter().find(|&&b| b != WAKE) {
                let e = Error::MalformedNotice {
                    reason: format!("byte {b:#04x} from a sender, which sends only wake-ups"),
                };
                return Err(self.inbound.unreadable(e).await);
            }
        }
    }

    /// The sender's published count, checked: it may not go backwards, nor run more than a
    /// ring ahead of what was released.
    async fn published(&self) -> Result<u64> {
        let published = self.segment.control.published().load(Ordering::Acquire);
        let ring = u64::from(self.segment.geometry.slots);
        if published < self.consumed || published - self.consumed > ring {
            let e = Error::MalformedNotice {
                reason: format!(
                    "published count {published} with {} frames released of a {ring}-slot ring",
                    self.consumed
                ),
            };
            return Err(self.inbound.unreadable(e).await);
        }
        Ok(published)
    }

    /// Copies out and delivers every frame published so far; returns whether there was any.
    async fn drain(&mut self, wr: &mut OwnedWriteHalf) -> Result<bool> {
        let published = self.published().await?;
        let any = published > self.consumed;
        while self.consumed < published {
            let entry = self
                .segment
                .control
                .entry(self.consumed)
                .load(Ordering::Relaxed);
            self.consumed += 1;
            let (slot, len) = split_ring_entry(entry);
            self.frame(slot, len, wr).await?;
        }
        Ok(any)
    }

    /// Copies out, admits, verifies and delivers the frame a ring entry names, releasing its
    /// slot as soon as it is copied out.
    async fn frame(&mut self, slot: u32, len: u32, wr: &mut OwnedWriteHalf) -> Result<()> {
        let stats = &self.shared.core.stats;
        let at = match self.segment.geometry.locate(slot, len) {
            Ok(at) => at,
            Err(e) => return Err(self.inbound.unreadable(e).await),
        };
        let mut head = [0u8; HEADER_LEN];
        self.segment.copy_out(at.start, &mut head);
        stats.add_received(HEADER_LEN);
        let header = match self.header(&head, at.len()) {
            Ok(header) => header,
            Err(e) => return Err(self.inbound.unreadable(e).await),
        };
        let id = header.handoff;
        if let Err(e) = self.inbound.admit(&header) {
            self.release(wr).await;
            return self
                .inbound
                .reject(Some(id), e)
                .await
                .map_err(|e| self.inbound.counted(e));
        }
        let len = header.payload_len as usize;
        let mut payload = self.shared.buffers.take(len);
        let crc = self
            .segment
            .copy_out_summed(at.start + HEADER_LEN, len, &mut payload);
        stats.add_received(len);
        stats.frame_received();
        // The copy is ours: the sender may reuse the slot while we deliver it.
        self.release(wr).await;
        self.inbound.deliver_summed(header, payload, crc).await
    }

    /// Releases every frame taken from the ring so far, and wakes the sender if a send is
    /// waiting for a slot. A failed write means the sender is gone, which the next read sees.
    async fn release(&self, wr: &mut OwnedWriteHalf) {
        let control = &self.segment.control;
        control.released().store(self.consumed, Ordering::Release);
        // The sender raises its flag, then looks at the count; we raise the count, then look at
        // the flag, which stays raised while any send waits.
        fence(Ordering::SeqCst);
        if control.sender_idle().load(Ordering::SeqCst) != 0
            && let Err(e) = wr.write_all(&Notice::Released.encode()).await
        {
            tracing::debug!(error = %e, "kv receiver: released notice not sent");
        }
    }

    /// Decodes a frame header copied out of a slot holding `len` frame bytes.
    fn header(&self, head: &[u8; HEADER_LEN], len: usize) -> Result<FrameHeader> {
        let header = FrameHeader::decode(head, &self.shared.config.limits)?;
        if header.kind != FrameKind::KvData {
            return Err(Error::UnexpectedFrame {
                expected: FrameKind::KvData,
                got: header.kind,
            });
        }
        if HEADER_LEN + header.payload_len as usize != len {
            return Err(Error::MalformedFrame {
                kind: FrameKind::KvData,
                reason: format!(
                    "ring entry says {len} bytes, header says {} of payload",
                    header.payload_len
                ),
            });
        }
        Ok(header)
    }
}

/// The prefill worker's end: a segment of slots mapped by one decode worker, and the control
/// socket to it.
pub struct ShmSender {
    local: LayoutDescriptor,
    peer: LayoutDescriptor,
    shard: Shard,
    shared: Arc<SenderShared>,
    // Wake-ups for a sleeping receiver; dropping it shuts the socket's writing side, which the
    // receiver reads as the end of the link once it has copied out what was published.
    wr: OwnedWriteHalf,
    stats: Arc<Stats>,
    notices: tokio::task::JoinHandle<()>,
}

impl ShmSender {
    /// Connects to the receiver listening on `socket_path`, creates the segment, offers it in
    /// the hello and unlinks it once the receiver has mapped it. Refused when the receiver's
    /// layout and `local` cannot be mapped, on either side, or the receiver cannot use the
    /// segment.
    pub async fn connect(
        socket_path: &Path,
        local: LayoutDescriptor,
        shard: Shard,
        config: ShmConfig,
    ) -> Result<Self> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let limit = config.handshake_timeout;
        let (stream, peer, segment) =
            tokio::time::timeout(limit, handshake(socket_path, &local, shard, &config))
                .await
                .map_err(|_| Error::Timeout {
                    during: "connect and handshake",
                    limit,
                })?
                .inspect_err(|e| stats.failure(e.reason()))?;
        let shared = Arc::new(SenderShared::new(segment));
        let (rd, wr) = stream.into_split();
        let notices = tokio::spawn(read_notices(rd, shared.clone(), stats.clone()));
        Ok(Self {
            local,
            peer,
            shard,
            shared,
            wr,
            stats,
            notices,
        })
    }

    /// Largest kv data payload one send takes: a slot less the frame header.
    pub fn max_payload(&self) -> usize {
        self.shared.segment.geometry.slot_bytes as usize - HEADER_LEN
    }

    /// Slots in the segment.
    pub fn slots(&self) -> usize {
        self.shared.segment.geometry.slots as usize
    }

    /// The error a send fails with once the link has ended.
    fn gone(&self, handoff: HandoffId) -> Error {
        match self.shared.closed.get() {
            Some((code, message)) => Error::PeerRefused {
                code: *code,
                message: message.clone(),
            },
            None => Error::PeerClosed {
                during: "while sending",
                handoff: Some(handoff),
            },
        }
    }

    /// Wakes the receiver, which raised its idle flag and sleeps on the socket. A full socket
    /// buffer means wake-ups it has not read yet, any of which wakes it, so the byte is not
    /// needed; a failed write means the link is gone.
    fn wake(&self) -> io::Result<()> {
        match self.wr.try_write(&[WAKE]) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for ShmSender {
    fn drop(&mut self) {
        self.notices.abort();
    }
}

async fn handshake(
    socket_path: &Path,
    local: &LayoutDescriptor,
    shard: Shard,
    config: &ShmConfig,
) -> Result<(UnixStream, LayoutDescriptor, SenderSegment)> {
    let mut stream = UnixStream::connect(socket_path)
        .await
        .map_err(io_err("connect"))?;
    let create = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || SenderSegment::create(&config))
    };
    let (segment, file) = create.await.map_err(|e| Error::Io {
        during: "create shared-memory segment",
        source: io::Error::other(e),
    })??;
    let offer = SegmentOffer {
        layout: SEGMENT_LAYOUT,
        path: segment.path.clone(),
        slots: segment.geometry.slots,
        slot_bytes: segment.geometry.slot_bytes,
    };
    let hello = encode_hello(local, &offer)?;
    let mut header = FrameHeader::new(FrameKind::Hello, &hello)?;
    header.shard = shard;
    stream
        .write_all(&encode_frame(&header, &hello))
        .await
        .map_err(io_err("write hello"))?;
    let remote = read_hello_reply(&mut stream, local, &config.limits).await?;
    // The receiver has mapped the segment; from here on only the two mappings hold it.
    drop(file);
    Ok((stream, remote, segment))
}

/// Frees released slots when the receiver says a waiting send may go on, until the receiver
/// goes away, closes the link, or sends something that breaks the protocol; then ends the link
/// for every send.
async fn read_notices(mut rd: OwnedReadHalf, shared: Arc<SenderShared>, stats: Arc<Stats>) {
    let broken = loop {
        let mut b = [0u8; NOTICE_LEN];
        if rd.read_exact(&mut b).await.is_err() {
            break None;
        }
        match Notice::decode(&b) {
            Ok(Notice::Released) => {
                shared.reclaim(&stats);
            }
            Ok(Notice::Close { len }) => {
                if len as usize > 2 + MAX_CLOSE_MESSAGE {
                    break Some(Error::MalformedNotice {
                        reason: format!("close payload of {len} bytes"),
                    });
                }
                let mut payload = vec![0u8; len as usize];
                if rd.read_exact(&mut payload).await.is_err() {
                    break None;
                }
                match decode_close(&payload) {
                    Ok((code, message)) => {
                        tracing::info!(?code, %message, "kv sender: receiver closed the link");
                        stats.failure(FailureReason::Refused);
                        let _ = shared.closed.set((code, message));
                        break None;
                    }
                    Err(e) => break Some(e),
                }
            }
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = broken {
        shared.broken(&e, &stats);
    }
    shared.free.close();
}

impl KvSender for ShmSender {
    fn peer(&self) -> &LayoutDescriptor {
        &self.peer
    }

    async fn send(&self, segment: &KvSegment) -> Result<()> {
        // Checked before a slot is taken; the checksum is filled in once the copy computed it.
        let mut header = kv_data_header_summed(&self.local, self.shard, segment, 0)?;
        let payload = &segment.chunk.data;
        let frame_bytes = HEADER_LEN + payload.len();
        let slot_bytes = self.shared.segment.geometry.slot_bytes;
        if frame_bytes > slot_bytes as usize {
            return Err(Error::SegmentTooLarge {
                handoff: segment.handoff,
                frame_bytes: frame_bytes as u64,
                slot_bytes: u64::from(slot_bytes),
            });
        }
        let Some(slot) = self.shared.take(&self.stats).await else {
            let e = self.gone(segment.handoff);
            self.stats.failure(e.reason());
            return Err(e);
        };
        let segment_map = &self.shared.segment;
        header.payload_crc = segment_map.write_payload(slot.slot, payload);
        segment_map.write_header(slot.slot, &header.encode());
        // `frame_bytes` fits a slot, whose size fits u32.
        if slot.publish(frame_bytes as u32)
            && let Err(e) = self.wake()
        {
            tracing::info!(error = %e, "kv sender: control socket closed");
            let e = self.gone(segment.handoff);
            self.stats.failure(e.reason());
            return Err(e);
        }
        self.stats.add_sent(frame_bytes);
        self.stats.frame_sent();
        Ok(())
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use baton_core::{Fingerprint, KvChunk, KvDType};
    use proptest::prelude::*;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(20);

    fn model() -> LayoutDescriptor {
        LayoutDescriptor {
            fingerprint: Fingerprint([1; 32]),
            dtype: KvDType::F16,
            block_size: 4,
            num_layers: 2,
            layers: 0..2,
            num_kv_heads: 2,
            kv_heads: 0..2,
            head_dim: 8,
        }
    }

    /// Two slots of 4 KiB: a 4-token segment of `model` is a 256-byte payload.
    fn config() -> ShmConfig {
        ShmConfig {
            slots: 2,
            slot_bytes: 4096,
            delivery_capacity: 4,
            ..ShmConfig::default()
        }
    }

    fn socket_path() -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::env::temp_dir().join(format!(
            "baton-kv-unit-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn segment(handoff: u64, layer: u32, tokens: u32) -> KvSegment {
        let d = model();
        let len = 2 * tokens as usize * 2 * d.head_dim as usize * d.dtype.size();
        KvSegment {
            handoff: HandoffId(handoff),
            kv_heads: 0..2,
            chunk: KvChunk {
                layer,
                first_block: 0,
                num_blocks: tokens.div_ceil(d.block_size),
                tokens,
                data: (0..len).map(|i| i as u8).collect(),
            },
        }
    }

    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        match tokio::time::timeout(LIMIT, f).await {
            Ok(v) => v,
            Err(_) => panic!("{what} did not happen within {LIMIT:?}"),
        }
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        within(what, async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
    }

    async fn next(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
        within("a delivery", rx.recv())
            .await
            .expect("delivery channel open")
    }

    async fn pair() -> (ShmReceiver, mpsc::Receiver<Delivery>, ShmSender) {
        let (receiver, rx) = ShmReceiver::bind(&socket_path(), model(), config())
            .await
            .expect("bind");
        let sender =
            ShmSender::connect(receiver.socket_path(), model(), Shard::default(), config())
                .await
                .expect("connect");
        (receiver, rx, sender)
    }

    /// Sends a hello offering `offer` and returns the receiver's answer.
    async fn offer_hello(receiver: &ShmReceiver, offer: &SegmentOffer) -> Result<LayoutDescriptor> {
        let mut stream = UnixStream::connect(receiver.socket_path())
            .await
            .expect("connect");
        let hello = encode_hello(&model(), offer).expect("hello");
        let header = FrameHeader::new(FrameKind::Hello, &hello).expect("hello");
        stream
            .write_all(&encode_frame(&header, &hello))
            .await
            .expect("write hello");
        within(
            "the hello reply",
            read_hello_reply(&mut stream, &model(), &FrameLimits::default()),
        )
        .await
    }

    impl ShmSender {
        /// Publishes a ring entry of the test's choosing, as a misbehaving sender would, and
        /// wakes the receiver.
        fn publish_raw(&self, slot: u32, len: u32) {
            let control = &self.shared.segment.control;
            let mut pool = self.shared.pool();
            let n = pool.published;
            pool.published += 1;
            control
                .entry(n)
                .store(ring_entry(slot, len), Ordering::Relaxed);
            control.published().store(n + 1, Ordering::SeqCst);
            drop(pool);
            self.wake().expect("wake");
        }

        /// Sets the published count, as a misbehaving sender would, and wakes the receiver.
        fn publish_count_raw(&self, count: u64) {
            let control = &self.shared.segment.control;
            control.published().store(count, Ordering::SeqCst);
            self.wake().expect("wake");
        }
    }

    /// Lets `misbehave` break the protocol on a handshaken sender's side, then checks the
    /// receiver ends the link: rejects the frame, counts it malformed, and the sender's sends
    /// fail with its close.
    async fn misbehaving_sender_ends_the_link(misbehave: impl FnOnce(&ShmSender)) {
        let (receiver, mut rx, sender) = pair().await;
        misbehave(&sender);
        match next(&mut rx).await {
            Delivery::Rejected {
                handoff: None,
                error: Error::MalformedNotice { .. },
            } => {}
            other => panic!("expected a rejected notice, got {other:?}"),
        }
        assert_eq!(
            receiver
                .stats()
                .snapshot()
                .failures(FailureReason::Malformed),
            1
        );
        wait_until("the sender sees the close", || {
            sender.shared.free.is_closed()
        })
        .await;
        let err = sender
            .send(&segment(1, 0, 4))
            .await
            .expect_err("link closed");
        assert!(
            matches!(
                err,
                Error::PeerRefused {
                    code: CloseCode::Malformed,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn slot_pool_hands_out_each_slot_once_and_frees_them_in_ring_order() {
        let mut pool = SlotPool::new(3);
        let taken: Vec<u32> = (0..3).map(|_| pool.take().expect("free slot")).collect();
        assert_eq!(taken, [0, 1, 2]);
        assert_eq!(pool.take(), None);
        for &slot in [2, 0, 1].iter() {
            pool.publish(slot);
        }
        assert_eq!(pool.release_up_to(1).expect("published frame"), 1);
        assert_eq!(
            pool.take(),
            Some(2),
            "the first frame published was in slot 2"
        );
        assert_eq!(pool.take(), None);
        assert_eq!(pool.release_up_to(3).expect("published frames"), 2);
        assert_eq!(pool.take(), Some(1));
        assert_eq!(pool.take(), Some(0));
    }

    #[test]
    fn slot_pool_refuses_release_counts_it_has_not_published() {
        let mut pool = SlotPool::new(2);
        let refused = |r: Result<usize>| matches!(r, Err(Error::MalformedNotice { .. }));
        assert!(refused(pool.release_up_to(1)), "nothing was published");
        assert!(refused(pool.release_up_to(u64::MAX)));
        let slot = pool.take().expect("free slot");
        pool.publish(slot);
        assert!(refused(pool.release_up_to(2)), "past what was published");
        assert_eq!(pool.release_up_to(1).expect("published frame"), 1);
        assert_eq!(pool.release_up_to(1).expect("no change"), 0);
        assert!(refused(pool.release_up_to(0)), "the count went backwards");
    }

    #[test]
    fn unwritten_slot_goes_back_to_the_pool() {
        let mut pool = SlotPool::new(1);
        let slot = pool.take().expect("free slot");
        pool.unwritten(slot);
        assert_eq!(pool.take(), Some(slot));
    }

    #[test]
    fn ring_entries_locate_frames_only_inside_their_slot() {
        let g = Geometry {
            slots: 2,
            slot_bytes: 100,
        };
        assert_eq!(g.locate(1, 100).expect("whole slot"), 100..200);
        assert_eq!(g.locate(0, 56).expect("bare header"), 0..56);
        let malformed = |r: Result<Range<usize>>| matches!(r, Err(Error::MalformedNotice { .. }));
        assert!(malformed(g.locate(2, 60)), "slot index out of range");
        assert!(malformed(g.locate(u32::MAX, 60)));
        assert!(malformed(g.locate(0, 101)), "length past the slot");
        assert!(malformed(g.locate(1, u32::MAX)));
        assert!(malformed(g.locate(0, 55)), "shorter than a header");
    }

    #[test]
    fn notices_round_trip_and_bad_ones_are_typed_errors() {
        for n in [Notice::Released, Notice::Close { len: 12 }] {
            assert_eq!(Notice::decode(&n.encode()).expect("valid"), n);
        }
        for (slot, len) in [(0, 0), (7, 4096), (u32::MAX, u32::MAX)] {
            assert_eq!(split_ring_entry(ring_entry(slot, len)), (slot, len));
        }
        let bad = |edit: fn(&mut [u8; NOTICE_LEN])| {
            let mut b = Notice::Released.encode();
            edit(&mut b);
            matches!(Notice::decode(&b), Err(Error::MalformedNotice { .. }))
        };
        assert!(bad(|b| b[0] = b'X'), "foreign magic");
        assert!(bad(|b| b[4] = 9), "unknown kind");
        assert!(bad(|b| b[4] = 0), "kind zero");
        assert!(bad(|b| b[6] = 1), "reserved byte set");
        assert!(bad(|b| b[11] = 1), "reserved byte set");
        assert!(bad(|b| b[12] = 1), "released notice with a length");
    }

    proptest! {
        #[test]
        fn random_notice_bytes_never_panic(bytes in any::<[u8; NOTICE_LEN]>(), slot in any::<u32>(), len in any::<u32>()) {
            if let Ok(n) = Notice::decode(&bytes) {
                prop_assert_eq!(n.encode(), bytes);
            }
            let g = Geometry { slots: 8, slot_bytes: 4096 };
            if let Ok(at) = g.locate(slot, len) {
                prop_assert!(at.end <= g.slots_len() && at.len() >= HEADER_LEN);
            }
        }
    }

    #[test]
    fn segment_offer_round_trips_and_refuses_bad_lengths() {
        let offer = SegmentOffer {
            layout: SEGMENT_LAYOUT,
            path: PathBuf::from("/dev/shm/baton-kv-1"),
            slots: 8,
            slot_bytes: 8 << 20,
        };
        let bytes = encode_hello(&model(), &offer).expect("encode");
        assert_eq!(
            decode_hello(&bytes).expect("decode"),
            (model(), offer.clone())
        );
        assert!(decode_hello(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_hello(&bytes[..DESCRIPTOR_LEN - 1]).is_err());
        let mut long = bytes.clone();
        long.push(b'x');
        assert!(decode_hello(&long).is_err());
        let too_long = SegmentOffer {
            path: PathBuf::from("/".repeat(MAX_SEGMENT_PATH + 1)),
            ..offer
        };
        assert!(too_long.encode().is_err());
    }

    #[test]
    fn invalid_config_names_the_field() {
        let field = |c: ShmConfig| match c.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected an invalid config, got {other:?}"),
        };
        assert_eq!(
            field(ShmConfig {
                slots: 0,
                ..config()
            }),
            "slots"
        );
        assert_eq!(
            field(ShmConfig {
                slot_bytes: HEADER_LEN - 1,
                ..config()
            }),
            "slot_bytes"
        );
        assert_eq!(
            field(ShmConfig {
                slot_bytes: 1 << 32,
                ..config()
            }),
            "slot_bytes"
        );
        assert_eq!(
            field(ShmConfig {
                segment_dir: PathBuf::from("shm"),
                ..config()
            }),
            "segment_dir"
        );
        assert_eq!(
            field(ShmConfig {
                delivery_capacity: 0,
                ..config()
            }),
            "delivery_capacity"
        );
        ShmConfig::default().validate().expect("default is valid");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segment_file_is_unlinked_after_the_handshake() {
        let (_receiver, mut rx, sender) = pair().await;
        assert!(
            !sender.shared.segment.path.exists(),
            "{} left behind",
            sender.shared.segment.path.display()
        );
        // Both mappings outlive the name.
        sender.send(&segment(1, 0, 4)).await.expect("send");
        assert!(matches!(
            next(&mut rx).await,
            Delivery::Rejected {
                error: Error::UnknownHandoff(_),
                ..
            }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segment_larger_than_a_slot_is_refused_at_send() {
        let (_receiver, _rx, sender) = pair().await;
        assert_eq!(sender.max_payload(), 4096 - HEADER_LEN);
        // 64 tokens: 4 KiB of payload, which with its header does not fit a 4 KiB slot.
        let err = sender
            .send(&segment(1, 0, 64))
            .await
            .expect_err("too large");
        assert!(
            matches!(
                err,
                Error::SegmentTooLarge {
                    handoff: HandoffId(1),
                    frame_bytes: 4152,
                    slot_bytes: 4096,
                }
            ),
            "{err}"
        );
        assert_eq!(sender.stats().snapshot().frames_sent, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_sent_before_the_sender_drops_are_delivered() {
        let (receiver, mut rx, sender) = pair().await;
        receiver
            .expect(HandoffId(1), Expectation::whole_sequence(&model(), 4))
            .expect("expect");
        sender.send(&segment(1, 0, 4)).await.expect("send");
        sender.send(&segment(1, 1, 4)).await.expect("send");
        drop(sender);
        assert!(matches!(next(&mut rx).await, Delivery::Segment(_)));
        assert!(matches!(next(&mut rx).await, Delivery::Segment(_)));
        assert!(matches!(
            next(&mut rx).await,
            Delivery::Complete(HandoffId(1))
        ));
        assert_eq!(receiver.stats().snapshot().handoffs_failed, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wake_ups_before_hello_are_refused() {
        let (receiver, _rx) = ShmReceiver::bind(&socket_path(), model(), config())
            .await
            .expect("bind");
        let mut stream = UnixStream::connect(receiver.socket_path())
            .await
            .expect("connect");
        stream.write_all(&[WAKE; 64]).await.expect("write");
        let reply = within(
            "the refusal",
            read_hello_reply(&mut stream, &model(), &FrameLimits::default()),
        )
        .await;
        assert!(
            matches!(
                reply,
                Err(Error::PeerRefused {
                    code: CloseCode::Malformed,
                    ..
                })
            ),
            "{reply:?}"
        );
        assert_eq!(
            receiver
                .stats()
                .snapshot()
                .failures(FailureReason::Malformed),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ring_entry_for_a_slot_out_of_range_ends_the_link() {
        misbehaving_sender_ends_the_link(|s| s.publish_raw(2, 100)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ring_entry_length_past_the_slot_ends_the_link() {
        misbehaving_sender_ends_the_link(|s| s.publish_raw(0, 4097)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_count_past_the_ring_ends_the_link() {
        // Two slots: three frames cannot be published before the receiver released any.
        misbehaving_sender_ends_the_link(|s| s.publish_count_raw(3)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn byte_other_than_a_wake_up_from_a_sender_ends_the_link() {
        misbehaving_sender_ends_the_link(|s| {
            s.wr.try_write(&Notice::Released.encode()).expect("write");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ring_entry_disagreeing_with_its_header_fails_the_live_handoff() {
        let (receiver, mut rx, sender) = pair().await;
        let id = HandoffId(1);
        receiver
            .expect(id, Expectation::whole_sequence(&model(), 4))
            .expect("expect");
        let s = segment(1, 0, 4);
        sender.send(&s).await.expect("send");
        assert!(matches!(next(&mut rx).await, Delivery::Segment(_)));
        // Slot 0 still holds that frame; an entry claiming a longer one is refused.
        let len = (HEADER_LEN + s.chunk.data.len() + 8) as u32;
        sender.publish_raw(0, len);
        match next(&mut rx).await {
            Delivery::Failed { handoff, error } => {
                assert_eq!(handoff, id);
                assert_eq!(error.reason(), FailureReason::Malformed, "{error}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(matches!(
            next(&mut rx).await,
            Delivery::Rejected { handoff: None, .. }
        ));
        assert!(!receiver.cancel(id), "the failed handoff is over");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segment_outside_the_segment_dir_is_refused() {
        let (receiver, _rx) = ShmReceiver::bind(&socket_path(), model(), config())
            .await
            .expect("bind");
        let offer = SegmentOffer {
            layout: SEGMENT_LAYOUT,
            path: std::env::temp_dir().join("baton-kv-elsewhere"),
            slots: 2,
            slot_bytes: 4096,
        };
        let reply = offer_hello(&receiver, &offer).await;
        assert!(
            matches!(
                reply,
                Err(Error::PeerRefused {
                    code: CloseCode::Incompatible,
                    ..
                })
            ),
            "{reply:?}"
        );
        assert_eq!(
            receiver
                .stats()
                .snapshot()
                .failures(FailureReason::Incompatible),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segment_shorter_than_its_offer_or_too_big_is_refused() {
        let (receiver, _rx) = ShmReceiver::bind(&socket_path(), model(), config())
            .await
            .expect("bind");
        let (segment, _file) = SenderSegment::create(&ShmConfig {
            slots: 1,
            ..config()
        })
        .expect("segment");
        for (layout, slots, slot_bytes) in [
            (SEGMENT_LAYOUT, 2, 4096),
            (SEGMENT_LAYOUT, 3, 4096),
            (SEGMENT_LAYOUT, 1, 8192),
            (SEGMENT_LAYOUT, 0, 4096),
            (SEGMENT_LAYOUT, 1, 10),
            (1, 1, 4096),
        ] {
            let offer = SegmentOffer {
                layout,
                path: segment.path.clone(),
                slots,
                slot_bytes,
            };
            let reply = offer_hello(&receiver, &offer).await;
            assert!(
                matches!(
                    reply,
                    Err(Error::PeerRefused {
                        code: CloseCode::Incompatible,
                        ..
                    })
                ),
                "layout {layout}, {slots} x {slot_bytes}: {reply:?}"
            );
        }
        let offer = SegmentOffer {
            layout: SEGMENT_LAYOUT,
            path: segment.path.clone(),
            slots: 1,
            slot_bytes: 4096,
        };
        offer_hello(&receiver, &offer)
            .await
            .expect("a segment that fits");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stale_socket_is_replaced_and_the_socket_removed_on_drop() {
        let path = socket_path();
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale listener"));
        assert!(path.exists(), "a dropped listener leaves its socket file");
        let (receiver, _rx) = ShmReceiver::bind(&path, model(), config())
            .await
            .expect("bind over a stale socket");
        let err = ShmReceiver::bind(&path, model(), config())
            .await
            .err()
            .expect("a live socket is not taken over");
        assert!(matches!(err, Error::Io { .. }), "{err}");
        drop(receiver);
        assert!(!path.exists(), "socket file left behind");

        std::fs::write(&path, b"not a socket").expect("write file");
        assert!(ShmReceiver::bind(&path, model(), config()).await.is_err());
        assert!(path.exists(), "a file that is not a socket was removed");
        std::fs::remove_file(&path).expect("clean up");
    }
}
