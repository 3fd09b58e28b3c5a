//! baton's inference engine: Llama-family decoders on candle, a paged KV cache whose blocks can
//! leave the process layer by layer, batched execution and sampling.
//!
//! coordinator --tokens--> [engine in prefill worker] --KV blocks--> [engine in decode worker]
//!
//! Invariants: one owner (a task or thread) holds an `Engine` and its block pool; a sequence's
//! blocks return to the pool exactly once, when the sequence is released.

mod error;
pub mod kernels;
pub mod kv;

pub use error::{Error, ErrorClass, Result};

/// Identifies one sequence (one request's token stream) inside an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}
