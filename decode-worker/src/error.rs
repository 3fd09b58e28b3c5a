//! The decode worker's errors, each with its class; `service.rs` maps them to gRPC status once.

use baton_kv_transfer::HandoffId;

pub use baton_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("overloaded: the {what} is full")]
    Overloaded { what: &'static str },
    #[error("no reservation for {0} (never made, released or expired)")]
    UnknownHandoff(HandoffId),
    #[error("kv handoff failed: {0}")]
    Handoff(String),
    #[error("kv transfer failed: {0}")]
    Transfer(String),
    #[error("cancelled")]
    Cancelled,
    #[error("kv transport: {0}")]
    Transport(#[from] baton_kv_transfer::Error),
    #[error("engine: {0}")]
    Engine(#[from] baton_engine::Error),
    /// This worker's parallel group could not form or broke.
    #[error("worker group: {0}")]
    Group(#[from] baton_group::Error),
    #[error("the engine thread has stopped")]
    Stopped,
    #[error("the decode worker is draining and takes no new work; retry on another worker")]
    Draining,
    #[error("the decode worker's drain deadline passed before this stream finished")]
    DrainDeadline,
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest { .. } => ErrorClass::InvalidRequest,
            Error::Overloaded { .. } => ErrorClass::Overloaded,
            // Only the coordinator names handoffs, so a reservation that is gone (expired while
            // its prefill waited, or released) is this cluster's failure, not its client's.
            Error::UnknownHandoff(_)
            | Error::Handoff(_)
            | Error::Transfer(_)
            | Error::Stopped
            | Error::Draining
            | Error::DrainDeadline => ErrorClass::Unavailable,
            Error::Cancelled => ErrorClass::Cancelled,
            Error::Group(e) => e.class(),
            Error::Transport(e) => e.class(),
            Error::Engine(e) => e.class(),
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
        let source_failed = matches!(e, Error::Handoff(_) | Error::Transfer(_));
        let status = baton_proto::status::status(e.class(), e.to_string(), None);
        if source_failed {
            baton_proto::status::mark_kv_source_failed(status)
        } else {
            status
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
