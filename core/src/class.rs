//! The classes of failure. Every crate's error type says which class each of its variants is;
//! the edges map a class to a gRPC code (`baton-proto`) and an HTTP status (the coordinator's
//! HTTP frontend), and nothing else inspects messages.

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The caller or a peer sent something invalid (400 / INVALID_ARGUMENT).
    InvalidRequest,
    /// What the caller named does not exist (404 / NOT_FOUND).
    NotFound,
    /// The caller did not say who it is, or is not someone this server knows (401 /
    /// UNAUTHENTICATED).
    Unauthenticated,
    /// A bounded queue or pool is full; retrying later may work (429 / RESOURCE_EXHAUSTED).
    Overloaded,
    /// A component is gone, draining or sent bytes we cannot use; retrying elsewhere may work
    /// (503 / UNAVAILABLE).
    Unavailable,
    /// A deadline passed (504 / DEADLINE_EXCEEDED).
    Deadline,
    /// The caller went away or asked to stop (499 / CANCELLED).
    Cancelled,
    /// A model file is unusable: a start-up failure, never a request's (500 / INTERNAL).
    BadModel,
    /// A bug or an unexpected local failure (500 / INTERNAL).
    Internal,
}

impl ErrorClass {
    /// Every class, for exhaustive tests of the mappings.
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::InvalidRequest,
        ErrorClass::NotFound,
        ErrorClass::Unauthenticated,
        ErrorClass::Overloaded,
        ErrorClass::Unavailable,
        ErrorClass::Deadline,
        ErrorClass::Cancelled,
        ErrorClass::BadModel,
        ErrorClass::Internal,
    ];

    /// As written in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Unauthenticated => "unauthenticated",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Deadline => "deadline",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::BadModel => "bad_model",
            ErrorClass::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
