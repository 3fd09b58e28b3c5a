//! The budget's errors. A refused reservation is not among them: that is
//! [`Refusal`](crate::Refusal), an answer rather than a failure.
//!
//! Classes, for the edge that maps them: `InvalidConfig` is a startup error the operator fixes;
//! `InUse` means a second coordinator pointed at the same ledger; `Storage` and `Corrupt` are
//! internal (the ledger cannot vouch for what was spent, so callers must not send paid requests).

use std::path::PathBuf;

/// What went wrong in the budget ledger or its configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is bad; `field` is its full key, e.g. `budget.caps[1].cap_usd`.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// Another process (or another [`Ledger`](crate::Ledger) in this one) holds the ledger file.
    #[error(
        "the budget ledger {} is in use by another process; one coordinator owns a ledger at a time",
        path.display()
    )]
    InUse { path: PathBuf },
    /// The embedded database failed; the text says which operation.
    #[error("budget ledger storage: {0}")]
    Storage(String),
    /// The ledger file holds something this build cannot read.
    #[error("the budget ledger is corrupt: {what}: {reason}")]
    Corrupt { what: String, reason: String },
}

/// The budget crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid_config(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A redb failure while doing `what` ("committing a reservation").
    pub(crate) fn storage(what: &str, err: impl Into<redb::Error>) -> Error {
        Error::Storage(format!("{what}: {}", err.into()))
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl ToString) -> Error {
        Error::Corrupt {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}
