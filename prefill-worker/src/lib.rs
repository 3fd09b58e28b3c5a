//! Prefill worker: runs prompts' forward passes in chunked batches and hands each prompt's KV
//! to the decode worker the coordinator chose, writing each layer into its reserved blocks as
//! it is computed (push), or keeping it pinned under a lease for the decode worker to read
//! (pull). The first token goes to the coordinator the moment it is sampled.
//!
//! coordinator --Prefill--> [prefill-worker] --KV into D's blocks, first token--> decode-worker
//!
//! Invariants: only the engine thread touches the engine (and only it copies into another
//! worker's memory); the handoff decisions are pure state machines (`handoff`); pinned blocks
//! return to the pool by ownership, once no reader holds them.

mod config;
mod engine_loop;
mod error;
pub mod handoff;
mod metrics;
mod queue;
mod sender;
mod service;

pub use config::PrefillConfig;
pub use error::{Error, ErrorClass, Result};
pub use service::{run, serve, serve_with_metrics};
