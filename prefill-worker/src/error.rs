//! The prefill worker's errors, each with its class; `service.rs` maps them to gRPC status once.

use baton_kv_transfer::HandoffId;

pub use baton_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("overloaded: the {what} is full")]
    Overloaded { what: &'static str },
    #[error("no live lease for {0}")]
    UnknownHandoff(HandoffId),
    #[error("kv transfer failed: {0}")]
    Transfer(String),
    #[error("kv transport: {0}")]
    Transport(#[from] baton_kv_transfer::Error),
    #[error("engine: {0}")]
    Engine(#[from] baton_engine::Error),
    #[error("the engine thread has stopped")]
    Stopped,
    #[error("the prefill worker is draining and takes no new work; retry on another worker")]
    Draining,
    #[error("the prefill worker's drain deadline passed before this prefill finished")]
    DrainDeadline,
    #[error("the caller stopped waiting")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest { .. } | Error::UnknownHandoff(_) => ErrorClass::InvalidRequest,
            Error::Overloaded { .. } => ErrorClass::Overloaded,
            Error::Transfer(_) | Error::Stopped | Error::Draining | Error::DrainDeadline => {
                ErrorClass::Unavailable
            }
            Error::Transport(e) => e.class(),
            Error::Engine(e) => e.class(),
            Error::Cancelled => ErrorClass::Cancelled,
            Error::Internal(_) => ErrorClass::Internal,
        }
    }
}

impl From<baton_proto::tls::TlsError> for Error {
    fn from(e: baton_proto::tls::TlsError) -> Self {
        Error::InvalidRequest {
            field: e.field,
            reason: e.reason,
        }
    }
}

impl From<baton_discovery::Error> for Error {
    fn from(e: baton_discovery::Error) -> Self {
        match e {
            baton_discovery::Error::InvalidConfig { field, reason } => {
                Error::InvalidRequest { field, reason }
            }
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        baton_proto::status::status(e.class(), e.to_string(), None)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
