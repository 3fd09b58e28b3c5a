//! KV transfer: moves a sequence's KV from one worker's pool into another's, layer by layer,
//! verified on arrival. It knows layouts and bytes, never the model: the engine depends on it
//! (for its pool memory and geometry), not the reverse.
//!
//! prefill engine --layer ready--> [agent: Peer::write / write_direct] --> decode worker's agent
//!     --admitted, crc-checked, in place--> decode engine's pool
//!
//! - [`memory`]: registered memory (the KV pool as a region of bytes), its geometry, and the
//!   byte copies that move one layer of a sequence between two pools.
//! - [`plan`]: which (layers x kv heads x blocks) each source shard sends to each destination
//!   shard (TP/PP); pure code.
//! - [`agent`]: the transfer agent every worker runs (in NIXL's spirit): it registers the pool,
//!   listens per backend (`tcp`, `shm`), claims, writes, reads and notifies; receivers admit
//!   every write against a live handoff's reserved blocks before a byte lands.
//! - [`wire`]: the framed protocol the backends speak (versioned header with the destination
//!   offset, crc32c of header and payload, typed messages).
//! - [`endpoint`]: where an agent is reached.
//! - `copy`: the copy that computes a payload's crc32c in the same pass.
//!
//! Invariants: bytes are used only after their checksum and their place in an expected handoff
//! are verified; reserved blocks stay reserved while any writer may still write them; every
//! buffer between an engine and the wire is bounded, so a slow peer slows its sender instead of
//! growing memory.

pub mod agent;
mod copy;
pub mod endpoint;
mod error;
pub mod memory;
pub mod plan;
pub mod wire;

pub use baton_core::HandoffId;
pub use copy::checksummed_copy;
pub use endpoint::Endpoint;
pub use error::{Error, ErrorClass, FailureReason, Result, Side};
pub use plan::{PlannedCopy, TransferPlan, plan, split_range};
