//! The discovery crate's errors, and why an advert was not admitted.

use baton_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid discovery setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("{backend} discovery: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidConfig { .. } => ErrorClass::InvalidRequest,
            Error::Backend { .. } => ErrorClass::Unavailable,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an advert was ignored. Each is logged once per source and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("unsigned")]
    Unsigned,
    #[error("signature does not verify under this cluster's key")]
    BadSignature,
    #[error("belongs to cluster {0:?}")]
    ForeignCluster(String),
    #[error("older than the advert already seen for this worker (a replay)")]
    Replayed,
    #[error("issued in the future (clock skew past the limit)")]
    FromTheFuture,
    #[error("malformed: {0}")]
    Malformed(String),
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::ForeignCluster(_) => "foreign_cluster",
            Refusal::Replayed => "replayed",
            Refusal::FromTheFuture => "from_the_future",
            Refusal::Malformed(_) => "malformed",
        }
    }
}
