//! baton's KV wire protocol, version 3: frames that address the receiver's registered memory by
//! offset, and the typed messages (hello, notices, read requests) the two agents of a handoff
//! exchange.
//!
//! ```text
//! offset size field
//!      0    4 magic "BTKV"
//!      4    2 protocol version (3)
//!      6    1 kind: 1 hello, 2 write, 3 notice, 4 read, 5 close, 6 auth
//!      7    1 flags (0; anything else is refused)
//!      8    8 handoff id
//!     16    4 layer (write; 0 otherwise)
//!     20    4 reserved (0)
//!     24    8 destination offset in the receiver's pool region (write; 0 otherwise)
//!     32    4 payload length
//!     36    4 crc32c of the payload
//!     40    4 crc32c of bytes 0..40
//! ```
//!
//! All integers little-endian. Payloads: auth, an offer or a proof (`agent::auth`, the first
//! frames each way, before the hellos); hello, a [`Hello`]; write, the bytes for
//! `offset..offset + length`; notice, a [`Notice`]; read, a [`ReadRequest`]; close, a code and
//! a short message.
//!
//! Decoding trusts nothing: the header checksum is verified before any field is used, every
//! length is bounded before anything is allocated, and no input panics (`tests` feed it
//! truncations and arbitrary bytes).

use std::ops::Range;

use baton_core::{BlockId, Fingerprint, HandoffId, KvDType, LayoutDescriptor, WorkerId};

use crate::error::{Error, Result};
use crate::memory::PoolLayout;

pub const MAGIC: [u8; 4] = *b"BTKV";
/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// Bytes in every frame header.
pub const HEADER_LEN: usize = 44;
/// Longest opaque completion a [`Notice::Complete`] carries (the first token and its finish,
/// encoded by the worker).
pub const MAX_COMPLETION: usize = 4096;
/// Version of the descriptor encoding inside a hello payload.
pub const DESCRIPTOR_VERSION: u8 = 1;
/// Bytes of an encoded descriptor.
pub const DESCRIPTOR_LEN: usize = 1 + 32 + 1 + 8 * 4;
/// Longest reason or message a frame carries; longer ones are cut at a char boundary.
pub const MAX_MESSAGE: usize = 1024;
/// Most byte ranges one [`Notice::Landed`] names.
pub const MAX_RANGES: usize = 65536;
/// Most blocks one [`ReadRequest`] names per side.
pub const MAX_BLOCKS: usize = 1 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// First frame each way on a connection: who the sender is and its pool's layout.
    Hello,
    /// Bytes for the receiver's pool region at `offset`.
    Write,
    /// A [`Notice`] about one handoff.
    Notice,
    /// A [`ReadRequest`]: the reader asks the source to write a leased sequence's KV to it.
    Read,
    /// The sender is closing the connection, saying why.
    Close,
    /// The link's authentication (`agent::auth`): an offer, then a proof, before the hello.
    Auth,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Hello => 1,
            Kind::Write => 2,
            Kind::Notice => 3,
            Kind::Read => 4,
            Kind::Close => 5,
            Kind::Auth => 6,
        }
    }

    fn from_code(code: u8) -> Result<Self> {
        Ok(match code {
            1 => Kind::Hello,
            2 => Kind::Write,
            3 => Kind::Notice,
            4 => Kind::Read,
            5 => Kind::Close,
            6 => Kind::Auth,
            got => return Err(Error::UnknownFrameKind { got }),
        })
    }
}

/// Bounds a decoder enforces on what a peer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 64 << 20,
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub handoff: HandoffId,
    pub layer: u32,
    pub offset: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl Header {
    /// A header of `kind` for `handoff` and a payload of `len` bytes whose crc32c is `crc`.
    pub fn new(kind: Kind, handoff: HandoffId, len: usize, crc: u32) -> Result<Self> {
        let payload_len = u32::try_from(len).map_err(|_| Error::PayloadTooLarge {
            len: len as u64,
            max: u32::MAX,
        })?;
        Ok(Self {
            kind,
            handoff,
            layer: 0,
            offset: 0,
            payload_len,
            payload_crc: crc,
        })
    }

    /// The header's wire bytes, header checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind.code();
        b[8..16].copy_from_slice(&self.handoff.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.layer.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, checksum, kind, flags and reserved bytes,
    /// and the payload bound, in that order.
    pub fn decode(b: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(Error::BadMagic { got: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(Error::UnsupportedVersion {
                got: version,
                supported: VERSION,
            });
        }
        let expected = u32_at(b, 40);
        let computed = crc32c::crc32c(&b[..40]);
        if expected != computed {
            return Err(Error::HeaderCorrupt { expected, computed });
        }
        let kind = Kind::from_code(b[6])?;
        if b[7] != 0 || u32_at(b, 20) != 0 {
            return Err(Error::MalformedFrame {
                kind,
                reason: format!("unknown flags {:#04x} or reserved bytes set", b[7]),
            });
        }
        let payload_len = u32_at(b, 32);
        if payload_len > limits.max_payload {
            return Err(Error::PayloadTooLarge {
                len: u64::from(payload_len),
                max: limits.max_payload,
            });
        }
        Ok(Self {
            kind,
            handoff: HandoffId(u64_at(b, 8)),
            layer: u32_at(b, 16),
            offset: u64_at(b, 24),
            payload_len,
            payload_crc: u32_at(b, 36),
        })
    }

    /// Checks a payload's length and crc32c (computed while it was read) against this header.
    pub fn verify(&self, len: usize, computed: u32) -> Result<()> {
        if len != self.payload_len as usize {
            return Err(Error::MalformedFrame {
                kind: self.kind,
                reason: format!("payload of {len} bytes, header says {}", self.payload_len),
            });
        }
        if computed != self.payload_crc {
            return Err(Error::PayloadCorrupt {
                handoff: self.handoff,
                expected: self.payload_crc,
                computed,
            });
        }
        Ok(())
    }
}

/// A whole small frame (hello, notice, read, close): header and payload joined.
pub fn frame(kind: Kind, handoff: HandoffId, payload: &[u8]) -> Result<Vec<u8>> {
    let header = Header::new(kind, handoff, payload.len(), crc32c::crc32c(payload))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Reads a payload field by field, refusing what runs past its end.
struct Reader<'a> {
    b: &'a [u8],
    kind: Kind,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], kind: Kind) -> Self {
        Self { b, kind }
    }

    fn malformed(&self, reason: impl Into<String>) -> Error {
        Error::MalformedFrame {
            kind: self.kind,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(self.malformed(format!("payload ends {} bytes early", n - self.b.len())));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32_at(self.take(4)?, 0))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64_at(self.take(8)?, 0))
    }

    /// A length-prefixed (u32) byte string of at most `max` bytes.
    fn bytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(self.malformed(format!("field of {n} bytes, at most {max}")));
        }
        self.take(n)
    }

    fn string(&mut self, max: usize) -> Result<String> {
        let b = self.bytes(max)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.malformed("text is not UTF-8"))
    }

    fn range(&mut self) -> Result<Range<u32>> {
        let (start, end) = (self.u32()?, self.u32()?);
        if start > end {
            return Err(self.malformed(format!("range {start}..{end} is reversed")));
        }
        Ok(start..end)
    }

    fn blocks(&mut self) -> Result<Vec<BlockId>> {
        let n = self.u32()? as usize;
        if n > MAX_BLOCKS || n.saturating_mul(4) > self.b.len() {
            return Err(self.malformed(format!("{n} blocks do not fit the payload")));
        }
        (0..n).map(|_| self.u32().map(BlockId)).collect()
    }

    fn end(self) -> Result<()> {
        if !self.b.is_empty() {
            return Err(self.malformed(format!("{} bytes past the end", self.b.len())));
        }
        Ok(())
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// `s` cut to at most `max` bytes at a char boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_range(out: &mut Vec<u8>, r: &Range<u32>) {
    out.extend_from_slice(&r.start.to_le_bytes());
    out.extend_from_slice(&r.end.to_le_bytes());
}

fn put_blocks(out: &mut Vec<u8>, blocks: &[BlockId]) {
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for b in blocks {
        out.extend_from_slice(&b.0.to_le_bytes());
    }
}

/// Who a connection's sender is: its worker id and the pool it registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub worker: WorkerId,
    pub pool: PoolLayout,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + DESCRIPTOR_LEN + self.worker.as_str().len());
        out.extend_from_slice(&encode_descriptor(&self.pool.layout));
        out.extend_from_slice(&self.pool.num_blocks.to_le_bytes());
        put_bytes(&mut out, self.worker.as_str().as_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, Kind::Hello);
        let layout: LayoutDescriptor = decode_descriptor(r.take(DESCRIPTOR_LEN)?)?;
        let num_blocks = r.u32()?;
        let worker = r.string(WorkerId::MAX_LEN)?;
        let worker =
            WorkerId::parse(&worker).map_err(|e| r.malformed(format!("worker id: {e}")))?;
        r.end()?;
        Ok(Self {
            worker,
            pool: PoolLayout { layout, num_blocks },
        })
    }
}

/// One byte range a sender wrote straight into the receiver's memory (shared memory), with
/// the crc32c it computed as it copied when it checksums (`shm_checksums`); the receiver
/// checks a range that carries one in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandedRange {
    pub offset: u64,
    pub len: u64,
    pub crc: Option<u32>,
}

/// A message about one handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The sender still means to send (its prompt is queued or computing): the receiver's
    /// lease on the reserved blocks is renewed.
    Keepalive,
    /// Shared memory: the sender wrote these ranges of `layer` into the receiver's region.
    Landed {
        layer: u32,
        ranges: Vec<LandedRange>,
    },
    /// The sender has sent everything: `bytes` of KV over `transfer_us` microseconds, and the
    /// worker's opaque completion (the first token and its finish).
    Complete {
        bytes: u64,
        transfer_us: u64,
        completion: Vec<u8>,
    },
    /// The sender gives the handoff up; nothing more of it will come.
    Abort { reason: String },
    /// The receiver gave the handoff up (cancelled, expired, failed): the sender should stop.
    Cancel,
    /// The sender acknowledges a cancel: it writes nothing more for this handoff, so the
    /// receiver may reuse the blocks (it matters where the sender writes into them directly).
    Stopped,
    /// A sender that writes straight into the receiver's memory claims the handoff's blocks
    /// before its first write.
    Begin,
    /// The receiver grants a [`Notice::Begin`]: the blocks stay reserved for this sender until
    /// it completes, aborts or answers a cancel.
    Go,
    /// The reader (pull) verified everything it read: the source may free its copy.
    Done,
}

impl Notice {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Notice::Keepalive => out.push(1),
            Notice::Landed { layer, ranges } => {
                out.push(2);
                out.extend_from_slice(&layer.to_le_bytes());
                out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
                for r in ranges {
                    out.extend_from_slice(&r.offset.to_le_bytes());
                    out.extend_from_slice(&r.len.to_le_bytes());
                    match r.crc {
                        Some(crc) => {
                            out.push(1);
                            out.extend_from_slice(&crc.to_le_bytes());
                        }
                        None => out.push(0),
                    }
                }
            }
            Notice::Complete {
                bytes,
                transfer_us,
                completion,
            } => {
                out.push(3);
                out.extend_from_slice(&bytes.to_le_bytes());
                out.extend_from_slice(&transfer_us.to_le_bytes());
                put_bytes(
                    &mut out,
                    &completion[..completion.len().min(MAX_COMPLETION)],
                );
            }
            Notice::Abort { reason } => {
                out.push(4);
                put_bytes(&mut out, cut(reason, MAX_MESSAGE).as_bytes());
            }
            Notice::Cancel => out.push(5),
            Notice::Stopped => out.push(6),
            Notice::Begin => out.push(7),
            Notice::Go => out.push(8),
            Notice::Done => out.push(9),
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, Kind::Notice);
        let notice = match r.u8()? {
            1 => Notice::Keepalive,
            2 => {
                let layer = r.u32()?;
                let n = r.u32()? as usize;
                // Each range is at least 17 bytes (offset, length, and the checksum's flag).
                if n > MAX_RANGES || n.saturating_mul(17) > r.b.len() {
                    return Err(r.malformed(format!("{n} ranges do not fit the payload")));
                }
                let mut ranges = Vec::with_capacity(n);
                for _ in 0..n {
                    let (offset, len) = (r.u64()?, r.u64()?);
                    let crc = match r.u8()? {
                        0 => None,
                        1 => Some(r.u32()?),
                        other => {
                            return Err(r.malformed(format!("checksum flag {other} is not 0 or 1")));
                        }
                    };
                    ranges.push(LandedRange { offset, len, crc });
                }
                Notice::Landed { layer, ranges }
            }
            3 => Notice::Complete {
                bytes: r.u64()?,
                transfer_us: r.u64()?,
                completion: r.bytes(MAX_COMPLETION)?.to_vec(),
            },
            4 => Notice::Abort {
                reason: r.string(MAX_MESSAGE)?,
            },
            5 => Notice::Cancel,
            6 => Notice::Stopped,
            7 => Notice::Begin,
            8 => Notice::Go,
            9 => Notice::Done,
            tag => return Err(r.malformed(format!("unknown notice {tag}"))),
        };
        r.end()?;
        Ok(notice)
    }
}

/// The reader's request (pull shape): write the leased sequence `source_blocks` of the source's
/// pool into `dest_blocks` of mine, for `tokens` tokens, layers `layers` and kv heads `heads`
/// (the rectangle the transfer plan gives this pair of shards), from block `first_block` on:
/// the reader's prefix cache holds the blocks before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub tokens: u32,
    pub layers: Range<u32>,
    pub heads: Range<u32>,
    pub source_blocks: Vec<BlockId>,
    pub dest_blocks: Vec<BlockId>,
    pub first_block: u32,
}

impl ReadRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 8 * self.source_blocks.len());
        out.extend_from_slice(&self.tokens.to_le_bytes());
        put_range(&mut out, &self.layers);
        put_range(&mut out, &self.heads);
        put_blocks(&mut out, &self.source_blocks);
        put_blocks(&mut out, &self.dest_blocks);
        out.extend_from_slice(&self.first_block.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, Kind::Read);
        let req = ReadRequest {
            tokens: r.u32()?,
            layers: r.range()?,
            heads: r.range()?,
            source_blocks: r.blocks()?,
            dest_blocks: r.blocks()?,
            first_block: r.u32()?,
        };
        r.end()?;
        Ok(req)
    }
}

/// Why a connection is being closed, carried by a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// Orderly shutdown.
    Normal,
    /// The layout descriptors cannot be mapped (another model, dtype, block size or shape).
    Incompatible,
    /// A checksum did not match.
    Corrupt,
    /// A frame broke the protocol.
    Malformed,
    /// A frame for a handoff the receiver does not expect.
    Unexpected,
    /// Any other failure on the closing side.
    Internal,
    /// The peer did not prove it holds the cluster's link key (or holds none while this side
    /// requires one).
    Unauthenticated,
}

impl CloseCode {
    pub(crate) fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::Incompatible => 1,
            CloseCode::Corrupt => 2,
            CloseCode::Malformed => 3,
            CloseCode::Unexpected => 4,
            CloseCode::Internal => 5,
            CloseCode::Unauthenticated => 6,
        }
    }

    pub(crate) fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            0 => CloseCode::Normal,
            1 => CloseCode::Incompatible,
            2 => CloseCode::Corrupt,
            3 => CloseCode::Malformed,
            4 => CloseCode::Unexpected,
            5 => CloseCode::Internal,
            6 => CloseCode::Unauthenticated,
            _ => return None,
        })
    }

    /// The code that tells a peer about `error`.
    pub fn for_error(error: &Error) -> Self {
        use crate::error::FailureReason as R;
        match error.reason() {
            R::Incompatible => CloseCode::Incompatible,
            R::Corrupt => CloseCode::Corrupt,
            R::Malformed => CloseCode::Malformed,
            R::Unexpected => CloseCode::Unexpected,
            R::Unauthenticated => CloseCode::Unauthenticated,
            R::PeerClosed | R::Refused | R::Timeout | R::Io => CloseCode::Internal,
        }
    }
}

/// A hello payload: the sender's layout descriptor.
pub fn encode_descriptor(d: &LayoutDescriptor) -> [u8; DESCRIPTOR_LEN] {
    let mut b = [0u8; DESCRIPTOR_LEN];
    b[0] = DESCRIPTOR_VERSION;
    b[1..33].copy_from_slice(&d.fingerprint.0);
    b[33] = match d.dtype {
        KvDType::F32 => 0,
        KvDType::F16 => 1,
    };
    let fields = [
        d.block_size,
        d.num_layers,
        d.layers.start,
        d.layers.end,
        d.num_kv_heads,
        d.kv_heads.start,
        d.kv_heads.end,
        d.head_dim,
    ];
    for (i, v) in fields.into_iter().enumerate() {
        b[34 + 4 * i..38 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Decodes a hello payload, refusing unknown versions and dtypes and ranges outside the model.
pub fn decode_descriptor(b: &[u8]) -> Result<LayoutDescriptor> {
    let malformed = |reason: String| Error::MalformedFrame {
        kind: Kind::Hello,
        reason,
    };
    let b: &[u8; DESCRIPTOR_LEN] = b.try_into().map_err(|_| {
        malformed(format!(
            "descriptor of {} bytes, expected {DESCRIPTOR_LEN}",
            b.len()
        ))
    })?;
    if b[0] != DESCRIPTOR_VERSION {
        return Err(malformed(format!(
            "descriptor version {} (this build reads {DESCRIPTOR_VERSION})",
            b[0]
        )));
    }
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&b[1..33]);
    let dtype = match b[33] {
        0 => KvDType::F32,
        1 => KvDType::F16,
        other => return Err(malformed(format!("unknown kv dtype {other}"))),
    };
    let f = |i: usize| u32_at(b, 34 + 4 * i);
    let d = LayoutDescriptor {
        fingerprint: Fingerprint(fingerprint),
        dtype,
        block_size: f(0),
        num_layers: f(1),
        layers: f(2)..f(3),
        num_kv_heads: f(4),
        kv_heads: f(5)..f(6),
        head_dim: f(7),
    };
    if d.block_size == 0 || d.head_dim == 0 {
        return Err(malformed("zero block size or head dim".into()));
    }
    if d.layers.start > d.layers.end || d.layers.end > d.num_layers {
        return Err(malformed(format!(
            "layers {:?} outside 0..{}",
            d.layers, d.num_layers
        )));
    }
    if d.kv_heads.start > d.kv_heads.end || d.kv_heads.end > d.num_kv_heads {
        return Err(malformed(format!(
            "kv heads {:?} outside 0..{}",
            d.kv_heads, d.num_kv_heads
        )));
    }
    Ok(d)
}

/// A close frame's payload.
pub fn encode_close(code: CloseCode, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&code.code().to_le_bytes());
    put_bytes(&mut out, cut(message, MAX_MESSAGE).as_bytes());
    out
}

/// Decodes a close frame's payload; an unknown code reads as `Internal`.
pub fn decode_close(b: &[u8]) -> Result<(CloseCode, String)> {
    let mut r = Reader::new(b, Kind::Close);
    let code = CloseCode::from_code(r.u16()?).unwrap_or(CloseCode::Internal);
    let message = r.string(MAX_MESSAGE)?;
    r.end()?;
    Ok((code, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{Fingerprint, KvDType};
    use proptest::prelude::*;

    fn pool() -> PoolLayout {
        PoolLayout {
            layout: LayoutDescriptor {
                fingerprint: Fingerprint([9; 32]),
                dtype: KvDType::F16,
                block_size: 16,
                num_layers: 30,
                layers: 0..30,
                num_kv_heads: 3,
                kv_heads: 0..3,
                head_dim: 64,
            },
            num_blocks: 728,
        }
    }

    fn notices() -> Vec<Notice> {
        vec![
            Notice::Keepalive,
            Notice::Landed {
                layer: 7,
                ranges: vec![
                    LandedRange {
                        offset: 1 << 40,
                        len: 4096,
                        crc: Some(0xdead_beef),
                    },
                    LandedRange {
                        offset: 3,
                        len: 1,
                        crc: None,
                    },
                ],
            },
            Notice::Complete {
                bytes: 1_704_960,
                transfer_us: 534,
                completion: vec![1, 2, 3],
            },
            Notice::Abort {
                reason: "compute failed".into(),
            },
            Notice::Cancel,
            Notice::Stopped,
            Notice::Begin,
            Notice::Go,
            Notice::Done,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let hello = Hello {
            worker: WorkerId::parse("decode-0").expect("id"),
            pool: pool(),
        };
        assert_eq!(Hello::decode(&hello.encode()).expect("hello"), hello);
        for n in notices() {
            assert_eq!(Notice::decode(&n.encode()).expect("notice"), n);
        }
        let read = ReadRequest {
            tokens: 37,
            layers: 0..30,
            heads: 1..3,
            source_blocks: vec![BlockId(4), BlockId(9), BlockId(1)],
            dest_blocks: vec![BlockId(0), BlockId(1), BlockId(2)],
            first_block: 2,
        };
        assert_eq!(ReadRequest::decode(&read.encode()).expect("read"), read);
        let close = encode_close(CloseCode::Corrupt, "crc");
        assert_eq!(
            decode_close(&close).expect("close"),
            (CloseCode::Corrupt, "crc".into())
        );
    }

    #[test]
    fn headers_round_trip_and_refuse_what_is_not_theirs() {
        let mut h = Header::new(Kind::Write, HandoffId(42), 100, 7).expect("header");
        h.layer = 29;
        h.offset = (1 << 33) + 5;
        let limits = Limits::default();
        let b = h.encode();
        assert_eq!(Header::decode(&b, &limits).expect("decode"), h);

        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            Header::decode(&bad, &limits),
            Err(Error::BadMagic { .. })
        ));
        let mut bad = b;
        bad[4] = 1;
        assert!(matches!(
            Header::decode(&bad, &limits),
            Err(Error::UnsupportedVersion { got: 1, .. })
        ));
        let mut bad = b;
        bad[17] ^= 1;
        assert!(matches!(
            Header::decode(&bad, &limits),
            Err(Error::HeaderCorrupt { .. })
        ));
        let small = Limits { max_payload: 99 };
        assert!(matches!(
            Header::decode(&b, &small),
            Err(Error::PayloadTooLarge { len: 100, max: 99 })
        ));
        assert!(h.verify(100, 7).is_ok());
        assert!(matches!(
            h.verify(100, 8),
            Err(Error::PayloadCorrupt { .. })
        ));
        assert!(h.verify(99, 7).is_err());
    }

    #[test]
    fn long_texts_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_MESSAGE);
        let Notice::Abort { reason: got } =
            Notice::decode(&Notice::Abort { reason }.encode()).expect("abort")
        else {
            panic!("not an abort");
        };
        assert!(got.len() <= MAX_MESSAGE && got.chars().all(|c| c == 'é'));
    }

    #[test]
    fn every_truncation_of_a_message_is_refused() {
        let hello = Hello {
            worker: WorkerId::parse("p").expect("id"),
            pool: pool(),
        }
        .encode();
        for cut in 0..hello.len() {
            assert!(Hello::decode(&hello[..cut]).is_err(), "hello cut at {cut}");
        }
        let read = ReadRequest {
            tokens: 1,
            layers: 0..1,
            heads: 0..1,
            source_blocks: vec![BlockId(1)],
            dest_blocks: vec![BlockId(2)],
            first_block: 0,
        }
        .encode();
        for cut in 0..read.len() {
            assert!(
                ReadRequest::decode(&read[..cut]).is_err(),
                "read cut at {cut}"
            );
        }
        for n in notices() {
            let b = n.encode();
            for cut in 0..b.len() {
                assert!(Notice::decode(&b[..cut]).is_err(), "{n:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(
                Notice::decode(&longer).is_err(),
                "{n:?} with a byte past its end"
            );
        }
    }

    proptest! {
        /// Arbitrary bytes never panic a decoder.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Notice::decode(&bytes);
            let _ = Hello::decode(&bytes);
            let _ = ReadRequest::decode(&bytes);
            let _ = decode_close(&bytes);
            if let Some(h) = bytes.first_chunk::<HEADER_LEN>() {
                let _ = Header::decode(h, &Limits::default());
            }
        }
    }
}
