//! baton's shared plain types: what every other crate names and passes around, with no behaviour
//! that needs a model, a runtime or a network.
//!
//! coordinator --RequestId, HandoffId--> workers --LayoutDescriptor, BlockId--> kv-transfer
//!
//! - [`ids`]: newtype ids ([`RequestId`], [`WorkerId`], [`HandoffId`]).
//! - [`layout`]: the KV layout descriptor a receiver checks before it takes bytes, the model
//!   fingerprint, the KV element type and block ids; the engine holds KV in this layout and
//!   kv-transfer moves it, neither depending on the other for it.
//! - [`prefix`]: [`BlockHash`], the name of a full KV block and its prefix, which the engine's
//!   prefix cache, workers' reports and the coordinator's placement share.
//! - [`kv_events`]: the changes to a worker's set of cached blocks, the worker's log of them
//!   and a reader's index, so placement knows what each worker holds.
//! - [`hex`]: lower-case hex of the 32-byte names in configuration and adverts.
//! - [`class`]: the one [`ErrorClass`] every crate's errors map to; the serving edges (gRPC in
//!   `baton-proto`, HTTP in the coordinator) turn it into status codes, once.

pub mod class;
pub mod hex;
pub mod ids;
pub mod kv_events;
pub mod layout;
pub mod prefix;
pub mod tls;

pub use class::ErrorClass;
pub use ids::{HandoffId, RequestId, WorkerId};
pub use kv_events::{KvEvent, KvEventLog, KvEvents, KvIndex};
pub use layout::{BlockId, Fingerprint, KvChunk, KvDType, LayoutDescriptor, LayoutMismatch};
pub use prefix::{BlockHash, block_hashes, extend_block_hashes, reusable_blocks};
