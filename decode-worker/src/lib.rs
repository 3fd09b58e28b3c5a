//! Decode worker: reserves blocks for incoming KV (which the prefill worker's agent writes and
//! this worker's agent verifies in place), and runs the continuous-batching decode loop that
//! streams tokens back to the coordinator. It can also prefill a prompt itself (aggregated).
//!
//! prefill-worker --KV into reserved blocks--> [decode-worker] --token stream--> coordinator
//!
//! Invariants: only the engine thread touches the engine; each handoff is one pure state
//! machine (`handoff`) the engine thread drives; reserved blocks return to the pool by
//! ownership, once neither the engine thread nor a transport holds them; a cancelled or
//! disconnected stream frees its blocks before the next step.

mod config;
mod engine_loop;
mod error;
pub mod handoff;
mod metrics;
mod service;

pub use baton_worker::default_host_id;
pub use config::{DecodeConfig, KvFailurePolicy};
pub use error::{Error, ErrorClass, Result};
pub use service::{run, serve, serve_with_metrics};
