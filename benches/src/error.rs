//! Errors that stop a benchmark before or after it runs (bad flags, unreadable dataset, an
//! endpoint that cannot be asked for its model, an unwritable report). Failures of single
//! requests are not errors of this kind: they are data, kept in each [`crate::Sample`].

use std::path::PathBuf;

/// What went wrong setting up or reporting a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value does not parse or is out of range.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidSpec {
        what: &'static str,
        value: String,
        reason: String,
    },
    /// A dataset line is not a prompt object.
    #[error("{}:{line}: {reason}", path.display())]
    Dataset {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer used to build synthetic prompts failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] baton_text::Error),
    /// The endpoint could not be used (bad address, or it did not answer a setup call).
    #[error("endpoint {endpoint}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// A chart could not be drawn or written.
    #[error("chart {}: {reason}", path.display())]
    Chart { path: PathBuf, reason: String },
    /// The report could not be serialized.
    #[error("report: {0}")]
    Json(#[from] serde_json::Error),
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Error::InvalidSpec {
            what,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
