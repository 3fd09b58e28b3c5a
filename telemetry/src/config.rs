//! Telemetry settings: the `telemetry` table of every role (`[decode.telemetry]`, ...).

use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per event (with the current span), for log shippers.
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `human` (one line per event) or `json` (one object per event) logs on stderr. Default
    /// `human`.
    pub log_format: LogFormat,
    /// Which events are logged, in `RUST_LOG` syntax (`RUST_LOG` itself wins when set). Default
    /// "info".
    pub log_filter: String,
    /// OTLP/gRPC collector that receives this process's spans, e.g. "http://127.0.0.1:4317".
    /// Default: unset, no spans leave the process.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_filter: "info".into(),
            otlp_endpoint: None,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(Error::InvalidConfig {
                field: "otlp_endpoint",
                reason: format!("{endpoint:?} must start with http:// or https://"),
            });
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_filter) {
            return Err(Error::InvalidConfig {
                field: "log_filter",
                reason: e.to_string(),
            });
        }
        Ok(())
    }
}

/// Which process the spans come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    /// `service.name`: `baton-coordinator`, `baton-prefill`, `baton-decode`.
    pub name: String,
    /// `service.instance.id`: which worker of its role, when known.
    pub instance: Option<String>,
}
