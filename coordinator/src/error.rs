//! The coordinator's errors. Each has one class, and the class alone decides the gRPC status,
//! the HTTP status and the OpenAI error type: the mapping is written here, once.

use std::time::Duration;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidRequest,
    NotFound,
    Overloaded,
    Unavailable,
    Deadline,
    Cancelled,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    #[error("the coordinator is at capacity ({inflight} requests in flight); retry later")]
    Overloaded {
        inflight: usize,
        retry_after: Duration,
    },
    #[error("the request's deadline passed ({timeout:?} after it arrived)")]
    DeadlineExceeded { timeout: Duration },
    #[error("no healthy {role} worker")]
    NoWorker { role: &'static str },
    #[error("{worker}: {message}")]
    Worker {
        worker: String,
        class: ErrorClass,
        message: String,
    },
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error(transparent)]
    Text(#[from] baton_text::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Whether a call failed because tonic's client-side timer for its `grpc-timeout` fired.
fn timed_out(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| {
        e.downcast_ref::<tonic::TimeoutExpired>().is_some()
            || e.downcast_ref::<tonic::transport::Error>()
                .and_then(std::error::Error::source)
                .is_some_and(|e| e.downcast_ref::<tonic::TimeoutExpired>().is_some())
    })
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest { .. } => ErrorClass::InvalidRequest,
            Error::UnknownModel(_) => ErrorClass::NotFound,
            Error::Overloaded { .. } => ErrorClass::Overloaded,
            Error::NoWorker { .. } => ErrorClass::Unavailable,
            Error::DeadlineExceeded { .. } => ErrorClass::Deadline,
            Error::Worker { class, .. } => *class,
            Error::Text(e) => match e.class() {
                baton_text::ErrorClass::InvalidRequest => ErrorClass::InvalidRequest,
                _ => ErrorClass::Internal,
            },
            Error::InvalidConfig { .. } | Error::Internal(_) => ErrorClass::Internal,
        }
    }

    /// The request field at fault, for the OpenAI envelope's `param`.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { field, .. } => Some(field),
            Error::UnknownModel(_) => Some("model"),
            Error::Text(baton_text::Error::InvalidRequest { field, .. }) => Some(field),
            Error::Text(baton_text::Error::UnknownRole { .. }) => Some("messages"),
            _ => None,
        }
    }

    /// A worker's gRPC status, classified by its code.
    pub fn from_status(worker: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let class = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                ErrorClass::InvalidRequest
            }
            Code::ResourceExhausted => ErrorClass::Overloaded,
            Code::DeadlineExceeded => ErrorClass::Deadline,
            // tonic's own timer for the call's grpc-timeout (the request's deadline) reports
            // CANCELLED; it is the deadline that passed.
            Code::Cancelled if timed_out(status) => ErrorClass::Deadline,
            Code::Cancelled => ErrorClass::Cancelled,
            Code::NotFound => ErrorClass::NotFound,
            Code::Unavailable | Code::Aborted | Code::Unknown => ErrorClass::Unavailable,
            _ => ErrorClass::Internal,
        };
        Error::Worker {
            worker: worker.to_string(),
            class,
            message: status.message().to_string(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl ErrorClass {
    /// HTTP status and OpenAI error type.
    pub fn http(self) -> (u16, &'static str) {
        match self {
            ErrorClass::InvalidRequest => (400, "invalid_request_error"),
            ErrorClass::NotFound => (404, "not_found_error"),
            ErrorClass::Overloaded => (429, "rate_limit_exceeded"),
            ErrorClass::Unavailable => (503, "service_unavailable"),
            ErrorClass::Deadline => (504, "timeout"),
            ErrorClass::Cancelled => (499, "cancelled"),
            ErrorClass::Internal => (500, "internal_error"),
        }
    }

    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorClass::InvalidRequest => tonic::Code::InvalidArgument,
            ErrorClass::NotFound => tonic::Code::NotFound,
            ErrorClass::Overloaded => tonic::Code::ResourceExhausted,
            ErrorClass::Unavailable => tonic::Code::Unavailable,
            ErrorClass::Deadline => tonic::Code::DeadlineExceeded,
            ErrorClass::Cancelled => tonic::Code::Cancelled,
            ErrorClass::Internal => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let mut status = tonic::Status::new(e.class().grpc(), e.to_string());
        if let Some(after) = e.retry_after()
            && let Ok(v) = after.as_secs().max(1).to_string().parse()
        {
            status.metadata_mut().insert("retry-after", v);
        }
        status
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
