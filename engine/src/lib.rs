//! baton's inference engine: Llama-family decoders on candle, a paged KV cache whose blocks can
//! leave the process layer by layer, batched execution and sampling.
//!
//! coordinator --tokens--> [engine in prefill worker] --KV blocks--> [engine in decode worker]
//!
//! Invariants: one owner (a task or thread) holds an `Engine` and its block pool; a sequence's
//! blocks return to the pool exactly once, when the sequence is released.

mod attention;
pub mod batch;
pub mod chat;
pub mod config;
pub mod detokenize;
mod engine;
mod error;
pub mod kernels;
pub mod kv;
mod model;
pub mod sampling;
pub mod stop;
pub mod tokenizer;
mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{
    DeviceSetting, EngineConfig, KvDType, ModelConfig, Role, WeightFormat, WeightPlan,
    WeightsSetting,
};
pub use detokenize::IncrementalDetokenizer;
pub use engine::{Engine, LoadStats, StepItem, StepOutput};
pub use error::{Error, ErrorClass, Result};
pub use kv::{BlockId, Fingerprint, KvChunk, LayoutDescriptor};
pub use sampling::{GREEDY_TEMPERATURE, SampledToken, Sampler, SamplingLimits, SamplingParams};
pub use stop::{FinishReason, StopChecker, StopOutcome, finish_reason_after};
pub use tokenizer::Tokenizer;
pub use weights::Phase;

/// Identifies one sequence (one request's token stream) inside an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}
