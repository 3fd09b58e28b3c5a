//! The coordinator's errors. Each has one class, and the class alone decides the gRPC status
//! (`baton_proto::status`) and the HTTP status with the OpenAI error type (`http.rs`).

use std::time::Duration;

pub use baton_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    /// A request field nothing behind the coordinator implements: refused rather than ignored,
    /// so a client never believes it got what it asked for (JSON mode, tool calls).
    #[error("{field}: is not supported by this server")]
    UnsupportedField { field: String },
    #[error("unauthenticated: {reason}")]
    Unauthenticated { reason: String },
    /// A key's own limit (`requests_per_minute`, `max_concurrent`) turned the request away.
    #[error("API key {key:?} is over its {limit}; retry later")]
    KeyLimit {
        key: String,
        limit: &'static str,
        retry_after: Duration,
    },
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    #[error("the coordinator is at capacity ({inflight} requests in flight); retry later")]
    Overloaded {
        inflight: usize,
        retry_after: Duration,
    },
    #[error("the request's deadline passed ({timeout:?} after it arrived)")]
    DeadlineExceeded { timeout: Duration },
    #[error(
        "every decode worker's KV pool is too full for this request ({needed} blocks); retry later"
    )]
    KvFull { needed: u32, retry_after: Duration },
    #[error("no healthy {role} worker")]
    NoWorker { role: &'static str },
    #[error("{worker}: {message}")]
    Worker {
        worker: String,
        class: ErrorClass,
        message: String,
    },
    /// A worker failed the request (`failed`), and placing it again without that worker
    /// (`what`) failed too.
    #[error("{failed}; {what} failed: {again}")]
    PlacedAgainFailed {
        failed: Box<Error>,
        what: &'static str,
        again: Box<Error>,
    },
    /// No upstream's budget covers the request (and the local cluster cannot take it).
    #[error("{refusal}")]
    BudgetSpent { refusal: baton_budget::Refusal },
    /// The coordinators' raft group could not decide the request's reservation (no leader
    /// within the proposal time-out: an election that ran long, or no quorum); nothing was
    /// spent or sent.
    #[error("the cloud budget cannot be decided now: {0}")]
    BudgetUnavailable(String),
    /// Every upstream that could take the request is at its `max_concurrent`.
    #[error("the local cluster is at capacity and every cloud upstream is busy; retry later")]
    CloudBusy,
    #[error(transparent)]
    Upstream(baton_cloud::UpstreamError),
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    #[error(transparent)]
    Text(#[from] baton_text::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidRequest { .. } | Error::UnsupportedField { .. } => {
                ErrorClass::InvalidRequest
            }
            Error::UnknownModel(_) => ErrorClass::NotFound,
            Error::Unauthenticated { .. } => ErrorClass::Unauthenticated,
            Error::KeyLimit { .. } => ErrorClass::Overloaded,
            Error::Overloaded { .. } => ErrorClass::Overloaded,
            Error::NoWorker { .. } | Error::BudgetUnavailable(_) => ErrorClass::Unavailable,
            Error::DeadlineExceeded { .. } => ErrorClass::Deadline,
            Error::Worker { class, .. } => *class,
            Error::PlacedAgainFailed { again, .. } => again.class(),
            Error::BudgetSpent { .. } | Error::CloudBusy | Error::KvFull { .. } => {
                ErrorClass::Overloaded
            }
            Error::Upstream(e) => e.class(),
            Error::Text(e) => match e.class() {
                ErrorClass::InvalidRequest => ErrorClass::InvalidRequest,
                _ => ErrorClass::Internal,
            },
            Error::InvalidConfig { .. } | Error::Internal(_) => ErrorClass::Internal,
        }
    }

    /// The request field at fault, for the OpenAI envelope's `param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            Error::InvalidRequest { field, .. } => Some(field),
            Error::UnsupportedField { field } => Some(field),
            Error::UnknownModel(_) => Some("model"),
            Error::Text(baton_text::Error::InvalidRequest { field, .. }) => Some(field),
            Error::Text(baton_text::Error::UnknownRole { .. }) => Some("messages"),
            _ => None,
        }
    }

    /// A worker's gRPC status, classified by its code.
    pub fn from_status(worker: &str, status: &tonic::Status) -> Self {
        Error::Worker {
            worker: worker.to_string(),
            class: baton_proto::status::class_of(status),
            message: status.message().to_string(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Overloaded { retry_after, .. }
            | Error::KvFull { retry_after, .. }
            | Error::KeyLimit { retry_after, .. } => Some(*retry_after),
            Error::BudgetSpent { refusal } => {
                let left = refusal.resets_at.duration_since(jiff::Timestamp::now());
                Some(
                    Duration::try_from(left)
                        .unwrap_or(Duration::ZERO)
                        .max(Duration::from_secs(1)),
                )
            }
            Error::CloudBusy => Some(Duration::from_secs(1)),
            Error::Upstream(e) => e.retry_after(),
            _ => None,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        baton_proto::status::status(e.class(), e.to_string(), e.retry_after())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
