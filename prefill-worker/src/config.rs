//! The prefill worker's settings: one typed struct, validated once at start.

use std::net::SocketAddr;
use std::time::Duration;

use baton_engine::EngineConfig;
use baton_kv_transfer::LinkConfig;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct PrefillConfig {
    pub engine: EngineConfig,
    /// gRPC address (PrefillWorker, health, reflection).
    pub listen: SocketAddr,
    /// Name in logs, metrics and placements; defaults to `prefill@<listen>`.
    pub worker_id: Option<String>,
    /// Identifies this host: decode workers with the same id may be reached over shared memory.
    pub host_id: String,
    /// Transport settings for connections to decode workers.
    pub link: LinkConfig,
    /// Prompts queued or being prefilled at once; more is RESOURCE_EXHAUSTED.
    pub max_pending: usize,
    /// KV segments buffered between the engine and the transport per handoff: the bound on
    /// what a slow decode worker makes this worker hold.
    pub segment_queue: usize,
    /// Longest lease a pull handoff may ask for.
    pub max_lease_ttl: Duration,
    /// Prometheus `/metrics` address (port 0 picks one); `None` serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM: how long queued prefills and leased pull sources may take to finish before
    /// they are failed and their blocks freed.
    pub drain_timeout: Duration,
}

impl PrefillConfig {
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            worker_id: None,
            host_id: String::new(),
            link: LinkConfig::default(),
            max_pending: 64,
            segment_queue: 64,
            max_lease_ttl: Duration::from_secs(60),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9061))),
            drain_timeout: Duration::from_secs(30),
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.engine.validate()?;
        if self.max_pending == 0 {
            return Err(invalid("max_pending", "must be positive"));
        }
        if self.segment_queue == 0 {
            return Err(invalid("segment_queue", "must be positive"));
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
