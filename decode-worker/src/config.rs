//! The decode worker's settings: one typed struct, validated once at start. The same struct is
//! the `[decode]` table of a config file (`baton.toml`); every key is optional and keeps the
//! default [`DecodeConfig::new`] gives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use baton_engine::{EngineConfig, Role};
use baton_kv_transfer::agent::KvConfig;
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
    /// Name in logs, metrics and placements: ASCII letters, digits and `-_.@:`. Default: unset,
    /// `decode-<host name>-<8 random hex digits>`, made at start.
    pub worker_id: Option<String>,
    /// Identifies this host: prefill workers with the same id may use shared memory. Default:
    /// /etc/machine-id, else the host name.
    pub host_id: String,
    /// The KV transfer agent (`[decode.kv]`): its TCP listener and, with `shm_socket`, shared
    /// memory (the pool is then allocated as memory prefill workers on this host map).
    pub kv: KvConfig,
    /// Lease of a push reservation whose Decode call names none: the time the blocks stay
    /// reserved without a sign of the prefill worker (a duration). Default 10s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub default_lease_ttl: Duration,
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
    /// CPU priority below the default, as a Unix nice value (0 to 19; higher runs less), for a
    /// host whose cores this worker shares with prefill workers: they then get the cores first
    /// while a prompt computes, and decode steps take the rest (time to first token falls,
    /// time per output token rises a little). `baton up` sets 10 when it starts prefill
    /// workers too. Default 0 (unchanged).
    pub nice: u8,
    /// How coordinators find this worker (`[decode.discovery]`): `static` (their config lists
    /// it; nothing is announced), `mdns` or `etcd` (a signed advert under the cluster key).
    pub discovery: baton_discovery::DiscoveryConfig,
    /// Logs and traces (`[decode.telemetry]`).
    pub telemetry: baton_telemetry::TelemetryConfig,
    /// Mutual TLS on this worker's gRPC port (`[<role>.tls]`: `ca`, `cert`, `key`, PEM files;
    /// `baton certs` writes a development set): only clients whose certificate the cluster CA
    /// signed are served. Default: unset, plaintext.
    pub tls: Option<baton_core::tls::TlsFiles>,
    /// Serve on a non-loopback address without `[decode.tls]` or a cluster key anyway (warned
    /// on every start). Default false: such a worker refuses to start.
    pub insecure_remote: bool,
    /// This worker as a tensor- and pipeline-parallel group of rank processes
    /// (`[decode.group]`: `tp`, `pp`, ...): to coordinators still one worker. A group prefills
    /// and decodes its own requests (a cluster without prefill workers, `baton up --colocated`);
    /// it refuses KV handoffs for now.
    pub group: baton_group::GroupConfig,
}

impl DecodeConfig {
    pub fn new(engine: EngineConfig) -> Self {
        Self {
            engine,
            listen: SocketAddr::from(([127, 0, 0, 1], 50071)),
            worker_id: None,
            host_id: baton_worker::default_host_id(),
            kv: KvConfig::default(),
            default_lease_ttl: Duration::from_secs(10),
            max_streams: 256,
            max_lease_ttl: Duration::from_secs(60),
            kv_failure_policy: KvFailurePolicy::Fail,
            metrics: true,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9071)),
            drain_timeout: Duration::from_secs(30),
            nice: 0,
            discovery: baton_discovery::DiscoveryConfig::default(),
            telemetry: baton_telemetry::TelemetryConfig::default(),
            tls: None,
            insecure_remote: false,
            group: baton_group::GroupConfig::default(),
        }
    }

    /// The defaults of a config file's `[decode]` table: no model chosen yet.
    fn unset() -> Self {
        Self::new(EngineConfig::new(PathBuf::new(), Role::Decode))
    }

    pub fn validate(&self) -> Result<()> {
        self.engine.validate()?;
        self.group.validate()?;
        if self.max_streams == 0 {
            return Err(invalid("max_streams", "must be positive"));
        }
        if self.max_lease_ttl < Duration::from_millis(10) {
            return Err(invalid("max_lease_ttl", "must be at least 10 ms"));
        }
        if self.default_lease_ttl.is_zero() || self.default_lease_ttl > self.max_lease_ttl {
            return Err(invalid(
                "default_lease_ttl",
                "must be more than 0 and at most max_lease_ttl",
            ));
        }
        if let Some(id) = &self.worker_id
            && let Err(reason) = baton_core::WorkerId::parse(id)
        {
            return Err(invalid("worker_id", &reason));
        }
        self.kv.validate()?;
        if self.kv.shm_checksums {
            return Err(invalid(
                "kv.shm_checksums",
                "only the writing side checksums shared-memory copies: set it in [prefill.kv]",
            ));
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err(invalid("drain_timeout", "must be at most 1 h"));
        }
        if self.nice > 19 {
            return Err(invalid("nice", "must be 0 to 19"));
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

/// This worker's id: the configured one, or one made now from the role and host name.
pub(crate) fn worker_id(configured: Option<&str>) -> crate::Result<baton_core::WorkerId> {
    match configured {
        Some(id) => baton_core::WorkerId::parse(id).map_err(|reason| invalid("worker_id", &reason)),
        None => Ok(baton_core::WorkerId::generate(
            "decode",
            &host_name(),
            rand_u32(),
        )),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}
