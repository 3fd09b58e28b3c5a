//! Prefill worker: runs prompts' forward passes in chunked batches and hands each prompt's KV
//! to the decode worker the coordinator chose, layer by layer as it is computed (push), or keeps
//! it under a lease for the decode worker to read (pull).
//!
//! coordinator --Prefill--> [prefill-worker] --KV blocks--> decode-worker
//!
//! Invariants: only the engine thread touches the engine; a pinned block set is freed exactly
//! once (push: when its prompt is done; pull: on release or lease expiry).

mod config;
mod engine_loop;
mod error;
mod metrics;
mod queue;
mod service;

pub use config::PrefillConfig;
pub use error::{Error, ErrorClass, Result};
pub use service::{run, serve, serve_with_metrics};
