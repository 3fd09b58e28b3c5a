//! The decode worker's errors, each with its class; `service.rs` maps them to gRPC status once.

use baton_kv_transfer::HandoffId;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidRequest,
    Overloaded,
    Unavailable,
    Cancelled,
    Internal,
}

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
            Error::Transport(e) => match e.class() {
                baton_kv_transfer::ErrorClass::InvalidRequest => ErrorClass::InvalidRequest,
                baton_kv_transfer::ErrorClass::Internal => ErrorClass::Internal,
                _ => ErrorClass::Unavailable,
            },
            Error::Engine(e) => match e.class() {
                baton_engine::ErrorClass::InvalidRequest => ErrorClass::InvalidRequest,
                baton_engine::ErrorClass::Overloaded => ErrorClass::Overloaded,
                baton_engine::ErrorClass::BadModel | baton_engine::ErrorClass::Internal => {
                    ErrorClass::Internal
                }
            },
            Error::Internal(_) => ErrorClass::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e.class() {
            ErrorClass::InvalidRequest => tonic::Status::invalid_argument(msg),
            ErrorClass::Overloaded => tonic::Status::resource_exhausted(msg),
            ErrorClass::Unavailable => tonic::Status::unavailable(msg),
            ErrorClass::Cancelled => tonic::Status::cancelled(msg),
            ErrorClass::Internal => tonic::Status::internal(msg),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
