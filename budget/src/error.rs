//! The budget's errors: only configuration. A refused reservation is not among them: that is
//! [`Refusal`](crate::Refusal), an answer rather than a failure.

/// What is wrong with the budget's configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is bad; `field` is its full key, e.g. `budget.caps[1].cap_usd`.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
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
}
