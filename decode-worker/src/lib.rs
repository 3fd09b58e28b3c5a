//! Decode worker: reserves blocks for incoming KV, imports and verifies it as it lands, and runs
//! the continuous-batching decode loop that streams tokens back to the coordinator. It can also
//! prefill a prompt itself (aggregated serving).
//!
//! prefill-worker --KV blocks--> [decode-worker] --token stream--> coordinator
//!
//! Invariants: only the engine thread touches the engine; a reservation is pinned under a lease
//! until its decode starts or it is released or expires; a cancelled or disconnected stream
//! frees its blocks before the next step.

mod config;
mod engine_loop;
mod error;
mod metrics;
mod service;

pub use config::{DecodeConfig, KvFailurePolicy, default_host_id};
pub use error::{Error, ErrorClass, Result};
pub use service::{run, serve, serve_with_metrics};
