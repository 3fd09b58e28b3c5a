//! The prefill worker's settings: one typed struct, validated once at start. The same struct is
//! the `[prefill]` table of a config file (`baton.toml`); every key is optional and keeps the
//! default [`PrefillConfig::new`] gives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton_engine::{EngineConfig, Role};
use baton_kv_transfer::agent::KvConfig;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default = "PrefillConfig::unset")]
pub struct PrefillConfig {
    /// The engine (`[prefill.engine]`).
    #[serde(deserialize_with = "prefill_engine")]
    pub engine: EngineConfig,
    /// gRPC address (PrefillWorker, health, reflection); port 0 lets the OS choose. Default
    /// "127.0.0.1:50061".
    pub listen: SocketAddr,
    /// Name in logs, metrics and placements: ASCII letters, digits and `-_.@:`. Default: unset,
    /// `prefill-<host name>-<8 random hex digits>`, made at start.
    pub worker_id: Option<String>,
    /// Identifies this host: decode workers with the same id may be reached over shared
    /// memory. Default: /etc/machine-id, else the host name.
    pub host_id: String,
    /// The KV transfer agent (`[prefill.kv]`): its TCP listener (decode workers read pull
    /// sources through it) and, with `shm_socket`, its shared-memory socket.
    pub kv: KvConfig,
    /// Prompts queued or being prefilled at once; more is RESOURCE_EXHAUSTED. Default 64.
    pub max_pending: usize,
    /// Layers buffered between the engine and the transport per push handoff: the bound on
    /// what a slow decode worker makes this worker hold. Default 64.
    pub segment_queue: usize,
    /// Longest lease a pull handoff may ask for (a duration, at least 10 ms). Default 60s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_lease_ttl: Duration,
    /// Serve Prometheus `/metrics` on `metrics_listen`. Default true.
    pub metrics: bool,
    /// The `/metrics` address; port 0 lets the OS choose. Default "127.0.0.1:9061".
    pub metrics_listen: SocketAddr,
    /// On SIGTERM, how long queued prefills and leased pull sources may take to finish before they are failed and their blocks freed (a duration, at most 1 h). Default 30s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// How coordinators find this worker (`[prefill.discovery]`): `static` (their config lists
    /// it; nothing is announced), `mdns` or `etcd` (a signed advert under the cluster key).
    pub discovery: baton_discovery::DiscoveryConfig,
    /// Logs and traces (`[prefill.telemetry]`).
    pub telemetry: baton_telemetry::TelemetryConfig,
    /// Mutual TLS on this worker's gRPC port (`[<role>.tls]`: `ca`, `cert`, `key`, PEM files;
    /// `baton certs` writes a development set): only clients whose certificate the cluster CA
    /// signed are served. Default: unset, plaintext.
    pub tls: Option<baton_core::tls::TlsFiles>,
    /// Serve on a non-loopback address without `[prefill.tls]` or a cluster key anyway (warned
    /// on every start). Default false: such a worker refuses to start.
    pub insecure_remote: bool,
}

impl PrefillConfig {
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            listen: SocketAddr::from(([127, 0, 0, 1], 50061)),
            worker_id: None,
            host_id: baton_worker::default_host_id(),
            kv: KvConfig::default(),
            max_pending: 64,
            segment_queue: 64,
            max_lease_ttl: Duration::from_secs(60),
            metrics: true,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9061)),
            drain_timeout: Duration::from_secs(30),
            discovery: baton_discovery::DiscoveryConfig::default(),
            telemetry: baton_telemetry::TelemetryConfig::default(),
            tls: None,
            insecure_remote: false,
        }
    }

    /// The defaults of a config file's `[prefill]` table: no model chosen yet.
    fn unset() -> Self {
        Self::new(EngineConfig::new(PathBuf::new(), Role::Prefill))
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
        if let Err(e) = self.discovery.validate() {
            return Err(match e {
                baton_discovery::Error::InvalidConfig { field, reason } => invalid(field, &reason),
                other => invalid("discovery", &other.to_string()),
            });
        }
        if let Err(e) = self.telemetry.validate() {
            return Err(invalid("telemetry", &e.to_string()));
        }
        if let Some(id) = &self.worker_id
            && let Err(reason) = baton_core::WorkerId::parse(id)
        {
            return Err(invalid("worker_id", &reason));
        }
        self.kv.validate()?;
        Ok(())
    }
}

/// This worker's id: the configured one, or one made now from the role and host name.
pub(crate) fn worker_id(configured: Option<&str>) -> Result<baton_core::WorkerId> {
    use std::hash::{BuildHasher, Hasher};
    match configured {
        Some(id) => baton_core::WorkerId::parse(id).map_err(|reason| invalid("worker_id", &reason)),
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            Ok(baton_core::WorkerId::generate(
                "prefill",
                host.trim(),
                h.finish() as u32,
            ))
        }
    }
}

/// A configured engine table runs in the prefill role, whatever its own defaults say.
fn prefill_engine<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<EngineConfig, D::Error> {
    let mut engine = EngineConfig::deserialize(d)?;
    engine.role = Role::Prefill;
    Ok(engine)
}

fn invalid(field: &'static str, reason: &str) -> Error {
    Error::InvalidRequest {
        field,
        reason: reason.into(),
    }
}
