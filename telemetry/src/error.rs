//! Telemetry errors: all of them stop start-up (a configured OTLP endpoint that cannot be used
//! is a configuration mistake, not something to run without silently).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid telemetry setting {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("otlp exporter: {0}")]
    Exporter(String),
    #[error("a tracing subscriber is already installed in this process")]
    AlreadyInstalled,
    #[error("metrics endpoint: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
