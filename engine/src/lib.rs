//! baton's inference engine: Llama-family decoders on candle, a paged KV cache whose blocks can
//! leave the process layer by layer, batched execution and sampling.
//!
//! coordinator --tokens--> [engine in prefill worker] --KV blocks--> [engine in decode worker]
//!
//! Invariants: one owner (a task or thread) holds an `Engine` and its block pool; a sequence's
//! blocks return to the pool exactly once, when the sequence is released.

mod attention;
pub mod batch;
mod blocks;
pub mod config;
mod engine;
mod error;
pub mod kernels;
pub mod kv;
pub mod local_group;
mod model;
mod norm;
mod rope;
pub mod shard;
mod swiglu;
#[cfg(test)]
mod testing;
mod vmath;
mod weights;

// The text layer lives in its own crate so the coordinator can tokenize without the engine; the
// engine re-exports it under the paths its users already know.
pub use baton_text::{
    ChatMessage, ChatTemplate, FinishReason, GREEDY_TEMPERATURE, IncrementalDetokenizer,
    SampledToken, Sampler, SamplingLimits, SamplingParams, StopChecker, StopOutcome, Tokenizer,
    chat, detokenize, finish_reason_after, model_name, sampling, stop, tokenizer,
};
pub use config::{
    AttentionSpan, DeviceSetting, EngineConfig, Kernels, KvDType, ModelConfig, PrefixReuse, Role,
    WeightFormat, WeightPlan, WeightsSetting,
};
pub use engine::{
    Engine, Followers, LayerReady, LoadStats, ModelShape, PrefixStats, StepItem, StepOutput,
    read_model_shape,
};
pub use error::{Error, ErrorClass, Result};
pub use kv::{
    BlockHash, BlockId, BlockTable, Fingerprint, KvCache, KvChunk, KvSource, LayoutDescriptor,
    PoolMemory, PoolStats,
};
pub use shard::Shard;
pub use weights::Phase;

/// Identifies one sequence (one request's token stream) inside an engine.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SeqId(pub u64);

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}
