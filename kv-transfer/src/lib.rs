//! KV transfer: moves a sequence's KV cache from the prefill worker's engine to the decode
//! worker's engine, layer by layer, verified on arrival.
//!
//! prefill worker --KvChunk frames--> [kv-transfer] --> decode worker
//!
//! - [`plan`]: which (layers x kv heads x blocks) each source shard sends to each destination
//!   shard; pure code.
//! - [`frame`]: the binary wire protocol (versioned header, crc32c of header and payload).
//! - [`transport`]: the [`KvSender`] / [`KvReceiver`] traits every transport implements, and the
//!   receiver's handoff bookkeeping shared by all of them.
//! - [`tcp`]: the TCP transport (tokio), a pool of streams per worker pair.
//! - [`shm`]: the shared-memory transport for two workers on one host: frames in slots of a
//!   segment both map, published through a ring in the segment; a Unix-domain socket for the
//!   handshake and for waking a side that sleeps.
//! - `copy`: the copy that computes a payload's crc32c in the same pass, once on each side.
//! - [`link`]: the run-time choice of transport: endpoints, connections, sending a handoff.
//! - [`memory`]: registered memory (the KV pool as a region of bytes) and the geometry and byte
//!   copies that address it.
//! - [`lease`]: time-to-live bookkeeping for pinned block sets (push reservations, pull sources).
//!
//! Invariants: bytes reach the consumer only after their checksum and their place in an expected
//! handoff are verified; every buffer between the sender and the consumer is bounded, so a slow
//! decode worker slows the prefill worker's sends instead of growing memory.

pub mod agent;
mod copy;
mod error;
pub mod frame;
pub mod lease;
pub mod link;
pub mod memory;
pub mod plan;
pub mod shm;
mod stream;
pub mod tcp;
pub mod transport;
pub mod wire;

pub use copy::checksummed_copy;
pub use error::{Error, ErrorClass, FailureReason, Result, Side};
pub use frame::{FrameLimits, HandoffId, Shard};
pub use lease::{LeaseError, LeaseKind, Leases};
pub use link::{
    Endpoint, Link, LinkConfig, Links, MAX_SEGMENT_BYTES, SendReport, max_blocks_per_segment,
    send_all,
};
pub use plan::{PlannedCopy, TransferPlan, plan, split_range};
pub use shm::{ShmConfig, ShmReceiver, ShmSender};
pub use tcp::{TcpConfig, TcpReceiver, TcpSender};
pub use transport::{Delivery, Expectation, KvReceiver, KvSegment, KvSender, Stats, StatsSnapshot};
