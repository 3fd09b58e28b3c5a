//! The crate's one error type. Each variant knows its class, so the serving edge maps it to a
//! gRPC status or HTTP code once, and its [`FailureReason`], so counters need no string matching.

use std::ops::Range;

use crate::wire::{CloseCode, Kind as FrameKind};
use baton_core::HandoffId;

pub use baton_core::ErrorClass;

/// Which side of a transfer plan a shard set is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The prefill worker's shards, where the KV is now.
    Source,
    /// The decode worker's shards, where the KV must go.
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Why a frame, a handoff or a connection failed, for the failure counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Layouts cannot be mapped onto each other.
    Incompatible,
    /// A header or payload checksum did not match.
    Corrupt,
    /// Bytes that are not a frame of this protocol, or a frame that breaks its rules.
    Malformed,
    /// A frame for a handoff the receiver was not told to expect, or outside what it expects.
    Unexpected,
    /// The peer closed or reset the connection before a frame or handoff was complete.
    PeerClosed,
    /// The peer refused us.
    Refused,
    /// A peer did not prove it holds the cluster's link key, or refused us for not proving it.
    Unauthenticated,
    /// A deadline passed.
    Timeout,
    /// Socket errors and local failures.
    Io,
}

impl FailureReason {
    /// Every reason, in counter order.
    pub const ALL: [FailureReason; 9] = [
        FailureReason::Incompatible,
        FailureReason::Corrupt,
        FailureReason::Malformed,
        FailureReason::Unexpected,
        FailureReason::PeerClosed,
        FailureReason::Refused,
        FailureReason::Unauthenticated,
        FailureReason::Timeout,
        FailureReason::Io,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The reason as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Incompatible => "incompatible",
            FailureReason::Corrupt => "corrupt",
            FailureReason::Malformed => "malformed",
            FailureReason::Unexpected => "unexpected",
            FailureReason::PeerClosed => "peer_closed",
            FailureReason::Refused => "refused",
            FailureReason::Unauthenticated => "unauthenticated",
            FailureReason::Timeout => "timeout",
            FailureReason::Io => "io",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    LayoutMismatch(#[from] baton_core::LayoutMismatch),
    #[error("{side} shard set is empty")]
    NoShards { side: Side },
    #[error("{side} shard {shard} is invalid: {reason}")]
    InvalidShard {
        side: Side,
        shard: usize,
        reason: String,
    },
    #[error("{side} shards {a} and {b} both hold layers {layers:?} x kv heads {kv_heads:?}")]
    ShardsOverlap {
        side: Side,
        a: usize,
        b: usize,
        layers: Range<u32>,
        kv_heads: Range<u32>,
    },
    #[error("{side} shards leave {missing} of {total} (layer, kv head) pairs unheld")]
    ShardsLeaveGap {
        side: Side,
        missing: u64,
        total: u64,
    },
    #[error("block range {blocks:?} is reversed")]
    InvalidBlocks { blocks: Range<u32> },

    #[error("not a baton kv frame: magic {got:02x?}")]
    BadMagic { got: [u8; 4] },
    #[error("protocol version {got} is not supported (this build speaks {supported})")]
    UnsupportedVersion { got: u16, supported: u16 },
    #[error("unknown frame kind {got}")]
    UnknownFrameKind { got: u8 },
    #[error("frame header checksum mismatch (expected {expected:08x}, computed {computed:08x})")]
    HeaderCorrupt { expected: u32, computed: u32 },
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLarge { len: u64, max: u32 },
    #[error(
        "payload checksum mismatch for {handoff} (expected {expected:08x}, computed {computed:08x})"
    )]
    PayloadCorrupt {
        handoff: HandoffId,
        expected: u32,
        computed: u32,
    },
    #[error("malformed {kind:?} frame: {reason}")]
    MalformedFrame { kind: FrameKind, reason: String },
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedFrame { expected: FrameKind, got: FrameKind },

    #[error("{during}: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("peer closed the connection {during}")]
    PeerClosed {
        during: &'static str,
        handoff: Option<HandoffId>,
    },
    #[error("kv link not authenticated: {reason}")]
    Unauthenticated { reason: String },
    #[error("peer refused: {code:?}: {message}")]
    PeerRefused { code: CloseCode, message: String },
    #[error("{during} took longer than {limit:?}")]
    Timeout {
        during: &'static str,
        limit: std::time::Duration,
    },
    #[error("no handoff {0} is expected")]
    UnknownHandoff(HandoffId),
    #[error("handoff {0} is already expected")]
    DuplicateHandoff(HandoffId),
    #[error("segment of {handoff} rejected: {reason}")]
    SegmentRejected { handoff: HandoffId, reason: String },
    #[error(
        "frame of {frame_bytes} bytes for {handoff} does not fit a shared-memory slot of {slot_bytes} bytes"
    )]
    SegmentTooLarge {
        handoff: HandoffId,
        frame_bytes: u64,
        slot_bytes: u64,
    },
    #[error("malformed shared-memory notice: {reason}")]
    MalformedNotice { reason: String },
    #[error("shared-memory segment refused: {reason}")]
    SegmentRefused { reason: String },
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("the consumer of received kv is gone")]
    ConsumerGone,
}

impl Error {
    /// The class of this error, for the mapping at the serving edge.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::LayoutMismatch(_)
            | Error::NoShards { .. }
            | Error::InvalidShard { .. }
            | Error::ShardsOverlap { .. }
            | Error::ShardsLeaveGap { .. }
            | Error::InvalidBlocks { .. }
            | Error::UnknownHandoff(_)
            | Error::DuplicateHandoff(_)
            | Error::SegmentTooLarge { .. }
            | Error::InvalidConfig { .. } => ErrorClass::InvalidRequest,
            Error::BadMagic { .. }
            | Error::UnsupportedVersion { .. }
            | Error::UnknownFrameKind { .. }
            | Error::HeaderCorrupt { .. }
            | Error::PayloadTooLarge { .. }
            | Error::PayloadCorrupt { .. }
            | Error::MalformedFrame { .. }
            | Error::UnexpectedFrame { .. }
            | Error::SegmentRejected { .. }
            | Error::MalformedNotice { .. }
            | Error::SegmentRefused { .. }
            | Error::Io { .. }
            | Error::PeerClosed { .. }
            | Error::PeerRefused { .. }
            // A link the peers could not authenticate is a cluster's misconfiguration, not the
            // client's: to a request it is a worker it cannot use, like any other refusal.
            | Error::Unauthenticated { .. }
            // A peer that does not answer in time is unavailable; the Deadline class is the
            // caller's own deadline, which transports do not know.
            | Error::Timeout { .. } => ErrorClass::Unavailable,
            Error::ConsumerGone => ErrorClass::Internal,
        }
    }

    /// The failure counter this error feeds.
    pub fn reason(&self) -> FailureReason {
        match self {
            Error::LayoutMismatch(_)
            | Error::NoShards { .. }
            | Error::InvalidShard { .. }
            | Error::ShardsOverlap { .. }
            | Error::ShardsLeaveGap { .. }
            | Error::InvalidBlocks { .. }
            | Error::UnsupportedVersion { .. }
            | Error::SegmentRefused { .. } => FailureReason::Incompatible,
            Error::HeaderCorrupt { .. } | Error::PayloadCorrupt { .. } => FailureReason::Corrupt,
            Error::BadMagic { .. }
            | Error::UnknownFrameKind { .. }
            | Error::PayloadTooLarge { .. }
            | Error::MalformedFrame { .. }
            | Error::UnexpectedFrame { .. }
            | Error::MalformedNotice { .. }
            | Error::SegmentTooLarge { .. } => FailureReason::Malformed,
            Error::UnknownHandoff(_)
            | Error::DuplicateHandoff(_)
            | Error::SegmentRejected { .. } => FailureReason::Unexpected,
            Error::PeerClosed { .. } => FailureReason::PeerClosed,
            Error::Unauthenticated { .. }
            | Error::PeerRefused {
                code: CloseCode::Unauthenticated,
                ..
            } => FailureReason::Unauthenticated,
            Error::PeerRefused { .. } => FailureReason::Refused,
            Error::Timeout { .. } => FailureReason::Timeout,
            Error::Io { .. } | Error::InvalidConfig { .. } | Error::ConsumerGone => {
                FailureReason::Io
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
