//! baton's KV wire protocol: fixed-size frame headers, each followed by a payload.
//!
//! ```text
//! offset size field
//!      0    4 magic "BTKV"
//!      4    2 protocol version (1)
//!      6    1 kind: 1 hello, 2 kv data, 3 ack, 4 close
//!      7    1 flags (0; anything else is refused)
//!      8    8 handoff id
//!     16    4 layer
//!     20    4 first block (index in the sequence's block table)
//!     24    4 block count
//!     28    4 tokens (filled slots the payload carries)
//!     32    4 first kv head
//!     36    4 kv head count
//!     40    2 sender's tp rank
//!     42    2 sender's pp stage
//!     44    4 payload length
//!     48    4 crc32c of the payload
//!     52    4 crc32c of bytes 0..52
//! ```
//!
//! All integers little-endian. Payloads: hello carries the sender's [`LayoutDescriptor`]
//! ([`encode_descriptor`], itself versioned); kv data carries K then V, each
//! `(kv heads, tokens, head dim)` row-major, as the engine's `KvChunk`; ack carries nothing;
//! close carries a [`CloseCode`] and a short message.
//!
//! Decoding trusts nothing: the header checksum is verified before any field is used, the payload
//! length is bounded by [`FrameLimits`] before anything is allocated, and no input panics.

use std::ops::Range;

use baton_core::{Fingerprint, KvDType, LayoutDescriptor};

use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"BTKV";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes in every frame header.
pub const HEADER_LEN: usize = 56;
/// Version of the descriptor encoding inside a hello payload.
pub const DESCRIPTOR_VERSION: u8 = 1;
/// Bytes of an encoded descriptor.
pub const DESCRIPTOR_LEN: usize = 1 + 32 + 1 + 8 * 4;
/// Longest message a close frame carries; longer ones are cut at a char boundary.
pub const MAX_CLOSE_MESSAGE: usize = 1024;

pub use baton_core::HandoffId;

/// Which engine of a sharded worker sent a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shard {
    pub tp_rank: u16,
    pub pp_stage: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// First frame each way on a connection: the sender's layout descriptor.
    Hello,
    /// One layer's KV for a run of blocks and a range of kv heads.
    KvData,
    /// The receiver holds a handoff complete and verified.
    Ack,
    /// The sender is closing the connection, saying why.
    Close,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Hello => 1,
            FrameKind::KvData => 2,
            FrameKind::Ack => 3,
            FrameKind::Close => 4,
        }
    }

    fn from_code(code: u8) -> Result<Self> {
        Ok(match code {
            1 => FrameKind::Hello,
            2 => FrameKind::KvData,
            3 => FrameKind::Ack,
            4 => FrameKind::Close,
            got => return Err(Error::UnknownFrameKind { got }),
        })
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
}

impl CloseCode {
    fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::Incompatible => 1,
            CloseCode::Corrupt => 2,
            CloseCode::Malformed => 3,
            CloseCode::Unexpected => 4,
            CloseCode::Internal => 5,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            0 => CloseCode::Normal,
            1 => CloseCode::Incompatible,
            2 => CloseCode::Corrupt,
            3 => CloseCode::Malformed,
            4 => CloseCode::Unexpected,
            5 => CloseCode::Internal,
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
            R::PeerClosed | R::Refused | R::Timeout | R::Io => CloseCode::Internal,
        }
    }
}

/// Bounds a decoder enforces on what a peer sends (the `limits` table of a transport's config).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, default)]
pub struct FrameLimits {
    /// Largest payload accepted, in bytes. A kv data frame is one layer of a run of blocks, so
    /// senders keep frames under this by splitting block runs. Default 67108864 (64 MiB).
    #[serde(rename = "max_payload_bytes")]
    #[schemars(rename = "max_payload_bytes")]
    pub max_payload: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        // One layer of 8k tokens of an 8-kv-head, 128-dim f16 model is 32 MiB.
        Self {
            max_payload: 64 << 20,
        }
    }
}

/// A decoded frame header. The payload checksum is checked separately, once the payload has
/// been read ([`FrameHeader::verify_payload`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub handoff: HandoffId,
    pub layer: u32,
    pub first_block: u32,
    pub num_blocks: u32,
    pub tokens: u32,
    /// Global kv-head indices the payload carries.
    pub kv_heads: Range<u32>,
    pub shard: Shard,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl FrameHeader {
    /// A header of `kind` for `payload`, every other field zero.
    pub fn new(kind: FrameKind, payload: &[u8]) -> Result<Self> {
        Self::summed(kind, payload.len(), crc32c::crc32c(payload))
    }

    /// A header of `kind` for a payload of `len` bytes whose crc32c is already known.
    pub fn summed(kind: FrameKind, len: usize, payload_crc: u32) -> Result<Self> {
        let payload_len = u32::try_from(len).map_err(|_| Error::PayloadTooLarge {
            len: len as u64,
            max: u32::MAX,
        })?;
        Ok(Self {
            kind,
            handoff: HandoffId(0),
            layer: 0,
            first_block: 0,
            num_blocks: 0,
            tokens: 0,
            kv_heads: 0..0,
            shard: Shard::default(),
            payload_len,
            payload_crc,
        })
    }

    /// The header's wire bytes, header checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[6] = self.kind.code();
        b[7] = 0;
        b[8..16].copy_from_slice(&self.handoff.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.layer.to_le_bytes());
        b[20..24].copy_from_slice(&self.first_block.to_le_bytes());
        b[24..28].copy_from_slice(&self.num_blocks.to_le_bytes());
        b[28..32].copy_from_slice(&self.tokens.to_le_bytes());
        b[32..36].copy_from_slice(&self.kv_heads.start.to_le_bytes());
        let count = self.kv_heads.end.saturating_sub(self.kv_heads.start);
        b[36..40].copy_from_slice(&count.to_le_bytes());
        b[40..42].copy_from_slice(&self.shard.tp_rank.to_le_bytes());
        b[42..44].copy_from_slice(&self.shard.pp_stage.to_le_bytes());
        b[44..48].copy_from_slice(&self.payload_len.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: magic, version, checksum, kind, flags, head range and the
    /// payload length bound, in that order.
    pub fn decode(b: &[u8; HEADER_LEN], limits: &FrameLimits) -> Result<Self> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(Error::BadMagic { got: magic });
        }
        let version = u16_at(b, 4);
        if version != PROTOCOL_VERSION {
            return Err(Error::UnsupportedVersion {
                got: version,
                supported: PROTOCOL_VERSION,
            });
        }
        let expected = u32_at(b, 52);
        let computed = crc32c::crc32c(&b[..52]);
        if expected != computed {
            return Err(Error::HeaderCorrupt { expected, computed });
        }
        let kind = FrameKind::from_code(b[6])?;
        if b[7] != 0 {
            return Err(Error::MalformedFrame {
                kind,
                reason: format!("unknown flags {:#04x}", b[7]),
            });
        }
        let head_start = u32_at(b, 32);
        let head_end =
            head_start
                .checked_add(u32_at(b, 36))
                .ok_or_else(|| Error::MalformedFrame {
                    kind,
                    reason: "kv head range overflows".into(),
                })?;
        let payload_len = u32_at(b, 44);
        if payload_len > limits.max_payload {
            return Err(Error::PayloadTooLarge {
                len: u64::from(payload_len),
                max: limits.max_payload,
            });
        }
        Ok(Self {
            kind,
            handoff: HandoffId(u64::from_le_bytes([
                b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15],
            ])),
            layer: u32_at(b, 16),
            first_block: u32_at(b, 20),
            num_blocks: u32_at(b, 24),
            tokens: u32_at(b, 28),
            kv_heads: head_start..head_end,
            shard: Shard {
                tp_rank: u16_at(b, 40),
                pp_stage: u16_at(b, 42),
            },
            payload_len,
            payload_crc: u32_at(b, 48),
        })
    }

    /// Checks a payload read for this header against its length and checksum.
    pub fn verify_payload(&self, payload: &[u8]) -> Result<()> {
        self.verify_summed(payload.len(), crc32c::crc32c(payload))
    }

    /// Checks the length and crc32c of a payload, computed while it was read, against this
    /// header.
    pub fn verify_summed(&self, len: usize, computed: u32) -> Result<()> {
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

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// What [`decode_frame`] found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The buffer holds a prefix of a frame; at least `needed` bytes in all are required.
    NeedMore { needed: usize },
    /// A whole, verified frame occupying the first `len` bytes.
    Frame {
        header: FrameHeader,
        payload: &'a [u8],
        len: usize,
    },
}

/// Decodes the frame at the start of `buf`, verifying both checksums.
pub fn decode_frame<'a>(buf: &'a [u8], limits: &FrameLimits) -> Result<Decoded<'a>> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        // A prefix that is already not ours is refused without waiting for more.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut got = [0u8; 4];
            got[..n].copy_from_slice(&buf[..n]);
            return Err(Error::BadMagic { got });
        }
        return Ok(Decoded::NeedMore { needed: HEADER_LEN });
    };
    let header = FrameHeader::decode(head, limits)?;
    let len = HEADER_LEN + header.payload_len as usize;
    let Some(payload) = buf.get(HEADER_LEN..len) else {
        return Ok(Decoded::NeedMore { needed: len });
    };
    header.verify_payload(payload)?;
    Ok(Decoded::Frame {
        header,
        payload,
        len,
    })
}

/// A whole frame's bytes: header then payload. For tests and small control frames; kv data is
/// written with the header and the engine's buffer side by side, not joined.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
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
        kind: FrameKind::Hello,
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

/// A close payload: code, then a message cut to [`MAX_CLOSE_MESSAGE`] bytes.
pub fn encode_close(code: CloseCode, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_CLOSE_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = Vec::with_capacity(2 + end);
    out.extend_from_slice(&code.code().to_le_bytes());
    out.extend_from_slice(&message.as_bytes()[..end]);
    out
}

/// Decodes a close payload; an unknown code or a message that is not UTF-8 is malformed.
pub fn decode_close(b: &[u8]) -> Result<(CloseCode, String)> {
    let malformed = |reason: String| Error::MalformedFrame {
        kind: FrameKind::Close,
        reason,
    };
    let (code, message) = b
        .split_first_chunk::<2>()
        .ok_or_else(|| malformed("close payload shorter than its code".into()))?;
    let code = u16::from_le_bytes(*code);
    let code = CloseCode::from_code(code).ok_or_else(|| malformed(format!("close code {code}")))?;
    if message.len() > MAX_CLOSE_MESSAGE {
        return Err(malformed(format!("message of {} bytes", message.len())));
    }
    let message = std::str::from_utf8(message)
        .map_err(|e| malformed(format!("message is not utf-8: {e}")))?;
    Ok((code, message.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Hello),
            Just(FrameKind::KvData),
            Just(FrameKind::Ack),
            Just(FrameKind::Close),
        ]
    }

    prop_compose! {
        fn frame()(
            kind in kind(),
            handoff in any::<u64>(),
            layer in any::<u32>(),
            first_block in any::<u32>(),
            num_blocks in any::<u32>(),
            tokens in any::<u32>(),
            head_start in 0..u32::MAX / 2,
            head_count in 0..u32::MAX / 2,
            tp_rank in any::<u16>(),
            pp_stage in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) -> (FrameHeader, Vec<u8>) {
            let mut h = FrameHeader::new(kind, &payload).expect("small payload");
            h.handoff = HandoffId(handoff);
            h.layer = layer;
            h.first_block = first_block;
            h.num_blocks = num_blocks;
            h.tokens = tokens;
            h.kv_heads = head_start..head_start + head_count;
            h.shard = Shard { tp_rank, pp_stage };
            (h, payload)
        }
    }

    prop_compose! {
        fn descriptor()(
            fp in any::<[u8; 32]>(),
            f16 in any::<bool>(),
            block_size in 1..1024u32,
            num_layers in 1..200u32,
            num_kv_heads in 1..64u32,
            head_dim in 1..512u32,
            cuts in any::<[u32; 4]>(),
        ) -> LayoutDescriptor {
            let (a, b) = (cuts[0] % (num_layers + 1), cuts[1] % (num_layers + 1));
            let (c, d) = (cuts[2] % (num_kv_heads + 1), cuts[3] % (num_kv_heads + 1));
            LayoutDescriptor {
                fingerprint: Fingerprint(fp),
                dtype: if f16 { KvDType::F16 } else { KvDType::F32 },
                block_size,
                num_layers,
                layers: a.min(b)..a.max(b),
                num_kv_heads,
                kv_heads: c.min(d)..c.max(d),
                head_dim,
            }
        }
    }

    fn limits() -> FrameLimits {
        FrameLimits { max_payload: 1024 }
    }

    fn decoded(bytes: &[u8]) -> Result<(FrameHeader, Vec<u8>, usize)> {
        match decode_frame(bytes, &limits())? {
            Decoded::Frame {
                header,
                payload,
                len,
            } => Ok((header, payload.to_vec(), len)),
            Decoded::NeedMore { needed } => panic!("need {needed} bytes of {}", bytes.len()),
        }
    }

    proptest! {
        #[test]
        fn frame_round_trips((header, payload) in frame(), trailing in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = encode_frame(&header, &payload);
            let len = bytes.len();
            bytes.extend_from_slice(&trailing);
            let (h, p, n) = decoded(&bytes).expect("valid frame");
            prop_assert_eq!(h, header);
            prop_assert_eq!(p, payload);
            prop_assert_eq!(n, len);
        }

        #[test]
        fn every_flipped_byte_is_rejected((header, payload) in frame(), mask in 1..=255u8) {
            let bytes = encode_frame(&header, &payload);
            for i in 0..bytes.len() {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                prop_assert!(
                    decode_frame(&bad, &limits()).is_err(),
                    "flip of byte {} by {:#04x} accepted", i, mask
                );
            }
        }

        #[test]
        fn truncated_frame_needs_more((header, payload) in frame()) {
            let bytes = encode_frame(&header, &payload);
            for cut in 0..bytes.len() {
                match decode_frame(&bytes[..cut], &limits()) {
                    Ok(Decoded::NeedMore { needed }) => prop_assert!(needed > cut && needed <= bytes.len()),
                    other => prop_assert!(false, "prefix of {} bytes gave {:?}", cut, other),
                }
            }
        }

        /// Fuzz-style: random bytes, bare or behind a valid magic and version, never panic, and
        /// whatever decodes re-encodes to the same bytes.
        #[test]
        fn random_bytes_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..400),
            prefixed in any::<bool>(),
            fix_crc in any::<bool>(),
        ) {
            if prefixed && bytes.len() >= HEADER_LEN {
                bytes[..4].copy_from_slice(&MAGIC);
                bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
                if fix_crc {
                    let crc = crc32c::crc32c(&bytes[..52]);
                    bytes[52..56].copy_from_slice(&crc.to_le_bytes());
                }
            }
            if let Ok(Decoded::Frame { header, payload, len }) = decode_frame(&bytes, &limits()) {
                prop_assert_eq!(encode_frame(&header, payload), bytes[..len].to_vec());
            }
            let _ = decode_descriptor(&bytes);
            let _ = decode_close(&bytes);
        }

        #[test]
        fn descriptor_round_trips(d in descriptor()) {
            prop_assert_eq!(decode_descriptor(&encode_descriptor(&d)).expect("valid"), d);
        }

        #[test]
        fn close_round_trips(message in ".{0,40}") {
            let (code, m) = decode_close(&encode_close(CloseCode::Incompatible, &message)).expect("valid");
            prop_assert_eq!(code, CloseCode::Incompatible);
            prop_assert_eq!(m, message);
        }
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut h = FrameHeader::new(FrameKind::KvData, &[]).expect("empty");
        h.payload_len = u32::MAX;
        let bytes = h.encode();
        // Only the header is present: the refusal comes before any payload is awaited.
        let err = decode_frame(&bytes, &limits()).expect_err("too large");
        assert!(
            matches!(err, Error::PayloadTooLarge { len, max: 1024 } if len == u64::from(u32::MAX)),
            "{err}"
        );
    }

    #[test]
    fn unknown_version_and_kind_are_typed_errors() {
        let h = FrameHeader::new(FrameKind::Ack, &[]).expect("empty");
        let mut bytes = h.encode();
        bytes[4..6].copy_from_slice(&2u16.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&bytes, &limits()),
            Err(Error::UnsupportedVersion {
                got: 2,
                supported: 1
            })
        ));

        let mut bytes = h.encode();
        bytes[6] = 9;
        let crc = crc32c::crc32c(&bytes[..52]);
        bytes[52..56].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&bytes, &limits()),
            Err(Error::UnknownFrameKind { got: 9 })
        ));
    }

    #[test]
    fn foreign_bytes_are_refused_before_a_whole_header() {
        assert!(matches!(
            decode_frame(b"GET / HTTP/1.1", &limits()),
            Err(Error::BadMagic { got }) if &got == b"GET "
        ));
        assert_eq!(
            decode_frame(b"BT", &limits()).expect("prefix of magic"),
            Decoded::NeedMore { needed: HEADER_LEN }
        );
    }

    #[test]
    fn descriptor_with_unknown_version_or_dtype_is_refused() {
        let d = LayoutDescriptor {
            fingerprint: Fingerprint([1; 32]),
            dtype: KvDType::F16,
            block_size: 16,
            num_layers: 4,
            layers: 0..4,
            num_kv_heads: 2,
            kv_heads: 0..2,
            head_dim: 64,
        };
        let mut b = encode_descriptor(&d);
        b[0] = 2;
        assert!(decode_descriptor(&b).is_err());
        let mut b = encode_descriptor(&d);
        b[33] = 7;
        assert!(decode_descriptor(&b).is_err());
        let mut b = encode_descriptor(&d).to_vec();
        b.push(0);
        assert!(decode_descriptor(&b).is_err());
    }
}
