//! The decode worker's settings: one typed struct, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use baton_engine::EngineConfig;
use baton_kv_transfer::{ShmConfig, TcpConfig};

use crate::error::{Error, Result};

/// What the decode worker does when a handoff's KV fails (transfer error, checksum mismatch,
/// expiry). Either way the failure is counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

#[derive(Debug, Clone)]
pub struct DecodeConfig {
    pub engine: EngineConfig,
    /// gRPC address (DecodeWorker, health, reflection).
    pub listen: SocketAddr,
    /// Name in logs, metrics and placements; defaults to `decode@<listen>`.
    pub worker_id: Option<String>,
    /// Address the TCP KV receiver listens on (port 0 picks one).
    pub kv_tcp_listen: SocketAddr,
    /// Unix socket of the shared-memory KV receiver; `None` turns shm off.
    pub kv_shm_socket: Option<PathBuf>,
    /// Identifies this host: prefill workers with the same id may use shared memory.
    pub host_id: String,
    pub tcp: TcpConfig,
    pub shm: ShmConfig,
    /// Most streams, decoding or waiting for their KV, at once.
    pub max_streams: usize,
    /// Longest lease a reservation may ask for.
    pub max_lease_ttl: Duration,
    pub kv_failure_policy: KvFailurePolicy,
    /// Prometheus `/metrics` address (port 0 picks one); `None` serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM: how long in-flight streams may run before they are cancelled with an error
    /// and their blocks freed.
    pub drain_timeout: Duration,
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
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9071))),
            drain_timeout: Duration::from_secs(30),
        }
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
        Ok(())
    }
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
