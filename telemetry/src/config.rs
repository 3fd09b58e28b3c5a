//! Telemetry settings, the same for every role.

use std::str::FromStr;

use crate::error::{Error, Result};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per event (with the current span and its parents), for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "human" => Ok(Self::Human),
            "json" => Ok(Self::Json),
            other => Err(format!("{other:?} is not one of human, json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Human => "human",
            Self::Json => "json",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// `service.name` of this process's spans: `baton-coordinator`, `baton-prefill`,
    /// `baton-decode`.
    pub service_name: String,
    /// `service.instance.id`: which worker of a role (its worker id), when known.
    pub instance_id: Option<String>,
    pub log_format: LogFormat,
    /// `RUST_LOG`-style filter; default: `info` for servers.
    pub log_filter: String,
    /// OTLP/gRPC collector (`http://host:4317`); none exports no spans.
    pub otlp_endpoint: Option<String>,
}

impl TelemetryConfig {
    pub fn new(service_name: impl Into<String>) -> Self {
        Self {
            service_name: service_name.into(),
            instance_id: None,
            log_format: LogFormat::Human,
            log_filter: "info".into(),
            otlp_endpoint: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(Error::InvalidConfig {
                field: "otlp_endpoint",
                reason: format!("{endpoint:?} must start with http:// or https://"),
            });
        }
        if self.service_name.is_empty() {
            return Err(Error::InvalidConfig {
                field: "service_name",
                reason: "is empty".into(),
            });
        }
        Ok(())
    }
}
