//! What turns a request into tokens and tokens back into text, shared by the coordinator and the
//! engine: the tokenizer, the chat template, the incremental detokenizer, sampling parameters and
//! the sampler, and stop conditions.
//!
//! client text --chat template, tokenizer--> token ids --engine--> sampled ids
//!     --detokenizer, stop strings--> text deltas --> client
//!
//! The coordinator uses this crate without the engine (it tokenizes, detokenizes and validates
//! requests); the engine uses it to sample. Nothing here touches tensors.

pub mod chat;
pub mod detokenize;
mod error;
pub mod sampling;
pub mod stop;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use detokenize::IncrementalDetokenizer;
pub use error::{Error, ErrorClass, Result};
pub use sampling::{GREEDY_TEMPERATURE, SampledToken, Sampler, SamplingLimits, SamplingParams};
pub use stop::{FinishReason, StopChecker, StopOutcome, finish_reason_after};
pub use tokenizer::Tokenizer;

/// The name a model is served under when none is configured: its file's (or directory's) stem,
/// e.g. `SmolLM2-135M-Instruct.Q4_1` for `.../SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn model_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}
