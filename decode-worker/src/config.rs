//! The decode worker's settings: one typed struct, validated once at start. The same struct is
//! the `[decode]` table of a config file (`baton.toml`); every key is optional and keeps the
//! default [`DecodeConfig::new`] gives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use baton_engine::{EngineConfig, Role};
use baton_kv_transfer::{ShmConfig, TcpConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// What the decode worker does when a handoff's KV fails (transfer error, checksum mismatch,
/// expiry). Either way the failure is counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvFailurePolicy {
    /// The stream fails with UNAVAILABLE.
    #[default]
    Fail,
    /// The decode worker recomputes the prompt itself and the stream goes on.
    Recompute,
}

impl FromStr for KvFailurePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fail" => Ok(Self::Fail),
            "recompute" => Ok(Self::Recompute),
            other => Err(format!("{other:?} is not one of fail, recompute")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default = "DecodeConfig::unset")]
pub struct DecodeConfig {
    /// The engine (`[decode.engine]`).
    #[serde(deserialize_with = "decode_engine")]
    pub engine: EngineConfig,
    /// gRPC address (DecodeWorker, health, reflection); port 0 lets the OS choose. Default
    /// "127.0.0.1:50071".
    pub listen: SocketAddr,
    /// Name in logs, metrics and placements. Default: unset, `decode@<listen>`.
    pub worker_id: Option<String>,
    /// Address the TCP KV receiver listens on; port 0 lets the OS choose. Default
    /// "127.0.0.1:0".
    pub kv_tcp_listen: SocketAddr,
    /// Unix socket of the shared-memory KV receiver. Default: unset, shared memory off.
    pub kv_shm_socket: Option<PathBuf>,
    /// Identifies this host: prefill workers with the same id may use shared memory. Default:
    /// /etc/machine-id, else the host name.
    pub host_id: String,
    /// The TCP KV receiver (`[decode.tcp]`).
    pub tcp: TcpConfig,
    /// The shared-memory KV receiver (`[decode.shm]`).
    pub shm: ShmConfig,
    /// Most streams, decoding or waiting for their KV, at once. Default 256.
    pub max_streams: usize,
    /// Longest lease a reservation may ask for (a duration, at least 10 ms). Default 60s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_lease_ttl: Duration,
    /// What a stream whose KV transfer fails does: `fail` (UNAVAILABLE) or `recompute` (the
    /// decode worker prefills the prompt itself). Default `fail`.
    pub kv_failure_policy: KvFailurePolicy,
    /// Serve Prometheus `/metrics` on `metrics_listen`. Default true.
    pub metrics: bool,
    /// The `/metrics` address; port 0 lets the OS choose. Default "127.0.0.1:9071".
    pub metrics_listen: SocketAddr,
    /// On SIGTERM, how long in-flight streams may run before they are cancelled with an error and their blocks freed (a duration, at most 1 h). Default 30s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// Logs and traces (`[decode.telemetry]`).
    pub telemetry: baton_telemetry::TelemetryConfig,
}

impl DecodeConfig {
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            listen: SocketAddr::from(([127, 0, 0, 1], 50071)),
            worker_id: None,
            kv_tcp_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            kv_shm_socket: None,
            host_id: default_host_id(),
            tcp: TcpConfig::default(),
            shm: ShmConfig::default(),
            max_streams: 256,
            max_lease_ttl: Duration::from_secs(60),
            kv_failure_policy: KvFailurePolicy::Fail,
            metrics: true,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9071)),
            drain_timeout: Duration::from_secs(30),
            telemetry: baton_telemetry::TelemetryConfig::default(),
        }
    }

    /// The defaults of a config file's `[decode]` table: no model chosen yet.
    fn unset() -> Self {
        Self::new(EngineConfig::new(PathBuf::new(), Role::Decode))
    }

    pub fn validate(&self) -> Result<()> {
        self.engine.validate()?;
        if self.max_streams == 0 {
            return Err(invalid("max_streams", "must be positive"));
        }
        if self.max_lease_ttl < Duration::from_millis(10) {
            return Err(invalid("max_lease_ttl", "must be at least 10 ms"));
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err(invalid("drain_timeout", "must be at most 1 h"));
        }
        if let Err(e) = self.telemetry.validate() {
            return Err(invalid("telemetry", &e.to_string()));
        }
        Ok(())
    }
}

/// A configured engine table runs in the decode role, whatever its own defaults say.
fn decode_engine<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<EngineConfig, D::Error> {
    let mut engine = EngineConfig::deserialize(d)?;
    engine.role = Role::Decode;
    Ok(engine)
}

fn invalid(field: &'static str, reason: &str) -> Error {
    Error::InvalidRequest {
        field,
        reason: reason.into(),
    }
}

/// The machine's id (`/etc/machine-id`), else its host name: equal ids mean shared memory
/// between the two workers is possible.
pub fn default_host_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
