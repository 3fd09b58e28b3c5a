//! The text layer's one error type. Each variant knows its class, so the serving edge maps it
//! once without inspecting messages.

use std::path::PathBuf;

pub use baton_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid {format} file: {reason}")]
    CorruptFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("model file {path} is missing metadata key {key}")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("model file {path}: metadata key {key} is invalid: {reason}")]
    InvalidMetadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("model file {path} uses tokenizer model {model:?}, which baton does not support")]
    UnsupportedTokenizer { path: PathBuf, model: String },
    #[error("model file {path} uses pre-tokenizer {pre:?}, which baton does not support")]
    UnsupportedPreTokenizer { path: PathBuf, pre: String },
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    #[error("unknown chat role {role:?}, expected system, user, assistant or tool")]
    UnknownRole { role: String },
    #[error("chat template does not compile: {reason}")]
    ChatTemplateSyntax { reason: String },
    #[error("chat template rejected the conversation: {message}")]
    ChatTemplateRaised { message: String },
    #[error("chat template failed to render: {reason}")]
    ChatTemplateRender { reason: String },
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
}

impl Error {
    /// The class of this error, for the mapping at the serving edge.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest { .. }
            | Error::ChatTemplate(_)
            | Error::TokenOutOfRange { .. }
            | Error::UnknownRole { .. }
            | Error::ChatTemplateRaised { .. }
            | Error::ChatTemplateRender { .. } => ErrorClass::InvalidRequest,
            Error::Io { .. }
            | Error::CorruptFile { .. }
            | Error::MissingMetadata { .. }
            | Error::InvalidMetadata { .. }
            | Error::UnsupportedTokenizer { .. }
            | Error::UnsupportedPreTokenizer { .. }
            | Error::ChatTemplateSyntax { .. } => ErrorClass::BadModel,
            Error::Tokenizer(_) => ErrorClass::Internal,
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
