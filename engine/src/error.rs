//! The engine's one error type. Each variant knows its class, so the serving edge (gRPC status,
//! HTTP code) maps it once without inspecting messages.

use std::path::PathBuf;

pub use baton_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file {path} is not a valid {format} file: {reason}")]
    CorruptFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("model file {path} has no tensor {tensor}")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("tensor {tensor} in {path} has shape {got:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor {tensor} in {path} has unsupported type {dtype}")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("model file {path} is missing metadata key {key}")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("model file {path}: metadata key {key} is invalid: {reason}")]
    InvalidMetadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("model file {path} has architecture {architecture:?}, which baton does not support")]
    UnknownArchitecture { path: PathBuf, architecture: String },
    /// The tokenizer, chat template or sampling parameters (baton-text).
    #[error(transparent)]
    Text(#[from] baton_text::Error),
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("kv cache is full: need {needed} blocks, {free} free")]
    KvCacheFull { needed: usize, free: usize },
    #[error("unknown sequence {0}")]
    UnknownSequence(crate::SeqId),
    #[error(transparent)]
    KvLayoutMismatch(#[from] baton_core::LayoutMismatch),
    #[error("kv import rejected: {0}")]
    KvImport(String),
    /// The tensor-parallel group's collective failed: a rank died or hangs, and the group is
    /// broken (every later step fails too).
    #[error("tensor-parallel group: {0}")]
    Collective(#[from] baton_collective::Error),
    /// A rank of this engine's group failed an operation this engine applied: the ranks may
    /// disagree about sequences and blocks, so the group runs nothing more.
    #[error("the parallel group is broken: a rank failed an operation")]
    GroupBroken,
    /// A KV handoff asked of an engine that leads a parallel group: the request is fine, this
    /// worker cannot take it (another worker, or an aggregated placement, can).
    #[error(
        "{0}: a parallel group prefills and decodes its own requests; KV handoffs into or out of a group are not built yet"
    )]
    GroupHandoff(&'static str),
    #[error("tensor backend: {0}")]
    Backend(#[from] candle_core::Error),
    /// The engine's own invariant broke (a format its plan names was not built, a thread a step
    /// hands work to went away), not its input.
    #[error("engine internal: {0}")]
    Internal(&'static str),
}

impl Error {
    /// The class of this error, for the mapping at the serving edge.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest { .. } | Error::KvLayoutMismatch(_) | Error::KvImport(_) => {
                ErrorClass::InvalidRequest
            }
            Error::Text(e) => e.class(),
            Error::KvCacheFull { .. } => ErrorClass::Overloaded,
            Error::Io { .. }
            | Error::CorruptFile { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::UnsupportedTensorType { .. }
            | Error::MissingMetadata { .. }
            | Error::InvalidMetadata { .. }
            | Error::UnknownArchitecture { .. } => ErrorClass::BadModel,
            Error::Collective(_) | Error::GroupBroken | Error::GroupHandoff(_) => {
                ErrorClass::Unavailable
            }
            Error::UnknownSequence(_) | Error::Backend(_) | Error::Internal(_) => {
                ErrorClass::Internal
            }
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
