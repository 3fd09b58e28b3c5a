//! The coordinator's settings: one typed struct, validated once at start. The same struct is
//! the `[coordinator]` table of a config file (`baton.toml`); every key is optional and keeps the
//! default [`CoordinatorConfig::new`] gives.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::placement::Routing;

/// How a disaggregated request's KV moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HandoffShape {
    /// The decode worker reserves blocks; the prefill worker writes each layer into them as it
    /// is computed (Mooncake-style). Hides the transfer behind the prefill.
    #[default]
    Push,
    /// The prefill worker keeps its blocks under a lease; the decode worker reads them when it
    /// takes the request, then releases the lease (NIXL-style).
    Pull,
}

impl FromStr for HandoffShape {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "push" => Ok(Self::Push),
            "pull" => Ok(Self::Pull),
            other => Err(format!("{other:?} is not one of push, pull")),
        }
    }
}

/// What a stream does when its decode worker dies, leaves the cluster or fails mid-stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnDecodeFailure {
    /// Continue on another decode worker: the prompt's KV comes again (the prefill worker's
    /// prefix cache holds it, so it is pulled or pushed, not recomputed), the tokens the client
    /// has are replayed there as decode steps, and the client's stream goes on from the next
    /// token, unbroken.
    #[default]
    Migrate,
    /// End the stream with UNAVAILABLE.
    Fail,
}

impl FromStr for OnDecodeFailure {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "migrate" => Ok(Self::Migrate),
            "fail" => Ok(Self::Fail),
            other => Err(format!("{other:?} is not one of migrate, fail")),
        }
    }
}

/// Which transport carries KV between a prefill and a decode worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// Shared memory when both workers report the same host id and the decode worker offers
    /// it, TCP otherwise.
    #[default]
    Auto,
    /// TCP always.
    Tcp,
    /// Shared memory always (workers on one host).
    Shm,
}

impl FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            other => Err(format!("{other:?} is not one of auto, tcp, shm")),
        }
    }
}

/// Longest `http_header_read_timeout`: a client slower than this at sending its headers is
/// not one to wait for.
const MAX_HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// Most `http_max_connections`: far above what one process's file descriptors allow, and far
/// below what tokio's semaphore refuses.
const MAX_HTTP_CONNECTIONS: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default = "CoordinatorConfig::unset")]
pub struct CoordinatorConfig {
    /// The model file or directory: the coordinator reads its tokenizer and chat template (no
    /// weights). Default: empty, meaning `$BATON_MODEL`, else the development model.
    pub model: PathBuf,
    /// The API's model name. Default: unset, the model file's stem.
    pub model_name: Option<String>,
    /// gRPC address (baton.v1.Inference, health, reflection). Default "127.0.0.1:50051".
    pub grpc_listen: SocketAddr,
    /// OpenAI-compatible HTTP address (also /health, /ready, /metrics). Default
    /// "127.0.0.1:8080".
    pub http_listen: SocketAddr,
    /// gRPC addresses (host:port) of prefill workers. Default: none (every request runs
    /// aggregated on a decode worker, unless discovery finds prefill workers).
    pub prefill_workers: Vec<String>,
    /// gRPC addresses (host:port) of decode workers; at least one under `static` discovery.
    /// Default: none.
    pub decode_workers: Vec<String>,
    /// How workers beyond the two lists are found (`[coordinator.discovery]`): `static` (the
    /// lists only), `mdns` (workers on the LAN announce themselves) or `etcd`.
    pub discovery: baton_discovery::DiscoveryConfig,
    /// The model every worker must serve, as its 64-hex-digit fingerprint (`baton status`
    /// and `/v1/models` show it). Default: unset, the first worker admitted sets it.
    pub model_fingerprint: Option<String>,
    /// How a disaggregated request's KV moves: `push` (the prefill worker writes each layer
    /// into blocks the decode worker reserved) or `pull` (the decode worker reads blocks the
    /// prefill worker keeps under a lease). Default `push`.
    pub handoff: HandoffShape,
    /// KV transport between workers: `auto` (shared memory on one host, else TCP), `tcp` or
    /// `shm`. Default `auto`.
    pub transport: TransportChoice,
    /// How prefill and decode workers are chosen: `kv` weighs the prompt prefix each worker
    /// reported caching against its load (a prefill worker then computes only the rest; a
    /// decode worker receives only the rest), `load` looks at load only. Default `kv`.
    pub routing: Routing,
    /// Prompts shorter than this many tokens run aggregated on a decode worker under
    /// `pd_mode = auto`: their prefill costs less than a handoff. Default 32.
    pub min_disaggregated_tokens: usize,
    /// Requests admitted at once (streaming or waiting); more get RESOURCE_EXHAUSTED / 429.
    /// Default 256.
    pub max_inflight: usize,
    /// Time an HTTP client has to send a request's headers, counted from the connection's
    /// accept (its first request) or the end of the previous response (a keep-alive connection
    /// waiting for its next one); past it the connection is closed. Bounds slow and silent
    /// clients (slowloris). A duration, 1 ms to 300 s. Default 10s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub http_header_read_timeout: Duration,
    /// Open HTTP connections at most (1 to 1048576); past it new connections wait in the
    /// listen backlog until one closes. Default 4096.
    pub http_max_connections: usize,
    /// Lease time of a handoff's pinned blocks, renewed while the transfer progresses (a
    /// duration: "10s", "500ms"; 10 ms to 60 s). Default 10s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease_ttl: Duration,
    /// How often worker load is polled (a duration, at least 10 ms); a worker that fails a
    /// poll is unhealthy until the next one succeeds. Default 250ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub load_poll_interval: Duration,
    /// How long a client is told to wait after a 429 (`Retry-After`, whole seconds; a
    /// duration). Default 1s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry_after: Duration,
    /// A stream whose decode worker dies or fails mid-stream: `migrate` (it continues on another
    /// decode worker, the client's tokens replayed there, one unbroken stream) or `fail`
    /// (UNAVAILABLE). Default `migrate`.
    pub on_decode_failure: OnDecodeFailure,
    /// Most migrations of one request (0 to 16); past them the stream fails. Also bounds the
    /// re-placements of a request whose prefill worker failed before its first token. Default 2.
    pub max_migrations: u32,
    /// Mutual TLS to the workers (`[coordinator.tls]`: `ca`, `cert`, `key`, PEM files; `baton
    /// certs` writes a development set): the coordinator presents its certificate and accepts
    /// a worker only with a certificate the cluster CA signed for its role. The workers need
    /// their `tls` too. Default: unset, plaintext.
    pub tls: Option<baton_core::tls::TlsFiles>,
    /// Logs and traces (`[coordinator.telemetry]`).
    pub telemetry: baton_telemetry::TelemetryConfig,
    /// Cloud upstreams and their dollar budget (`[coordinator.cloud]`).
    pub cloud: CloudConfig,
    /// API keys of the client APIs (`[coordinator.auth]`).
    pub auth: crate::auth::AuthConfig,
    /// The coordinators' raft group, which holds the cloud budget ledger and operators'
    /// decisions about workers (`[coordinator.replica]`). Default: this coordinator alone, a
    /// one-node group.
    pub replica: ReplicaSection,
}

impl CoordinatorConfig {
    /// The configured model fingerprint, read.
    pub fn model_fingerprint(&self) -> Result<Option<baton_core::Fingerprint>> {
        let Some(hex) = &self.model_fingerprint else {
            return Ok(None);
        };
        match baton_core::hex::decode32(hex) {
            Some(b) => Ok(Some(baton_core::Fingerprint(b))),
            None => Err(Error::InvalidConfig {
                field: "model_fingerprint".into(),
                reason: format!("{hex:?} is not 64 hex digits"),
            }),
        }
    }

    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            model_name: None,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            prefill_workers: Vec::new(),
            decode_workers: Vec::new(),
            discovery: baton_discovery::DiscoveryConfig::default(),
            model_fingerprint: None,
            handoff: HandoffShape::Push,
            transport: TransportChoice::Auto,
            routing: Routing::Kv,
            min_disaggregated_tokens: 32,
            max_inflight: 256,
            http_header_read_timeout: Duration::from_secs(10),
            http_max_connections: 4096,
            lease_ttl: Duration::from_secs(10),
            load_poll_interval: Duration::from_millis(250),
            retry_after: Duration::from_secs(1),
            on_decode_failure: OnDecodeFailure::Migrate,
            max_migrations: 2,
            tls: None,
            telemetry: baton_telemetry::TelemetryConfig::default(),
            cloud: CloudConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            replica: ReplicaSection::default(),
        }
    }

    /// The defaults of a config file's `[coordinator]` table: no model chosen yet.
    fn unset() -> Self {
        Self::new(PathBuf::new())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| {
            Err(Error::InvalidConfig {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.decode_workers.is_empty()
            && self.discovery.backend == baton_discovery::BackendKind::Static
        {
            return bad(
                "decode_workers",
                "at least one decode worker is required (or a discovery backend that finds them)",
            );
        }
        if let Err(e) = self.discovery.validate() {
            return match e {
                baton_discovery::Error::InvalidConfig { field, reason } => bad(field, &reason),
                other => bad("discovery", &other.to_string()),
            };
        }
        self.model_fingerprint()?;
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be positive");
        }
        if self.http_header_read_timeout < Duration::from_millis(1)
            || self.http_header_read_timeout > MAX_HTTP_HEADER_READ_TIMEOUT
        {
            return bad("http_header_read_timeout", "must be between 1 ms and 300 s");
        }
        if self.http_max_connections == 0 || self.http_max_connections > MAX_HTTP_CONNECTIONS {
            return bad("http_max_connections", "must be between 1 and 1048576");
        }
        if self.lease_ttl < Duration::from_millis(10) || self.lease_ttl > Duration::from_secs(60) {
            return bad("lease_ttl", "must be between 10 ms and 60 s");
        }
        if self.max_migrations > 16 {
            return bad("max_migrations", "must be at most 16");
        }
        if self.load_poll_interval < Duration::from_millis(10) {
            return bad("load_poll_interval", "must be at least 10 ms");
        }
        if let Err(e) = self.telemetry.validate() {
            return bad("telemetry", &e.to_string());
        }
        self.auth.validate(&[self.grpc_listen, self.http_listen])?;
        self.cloud
            .validate(!self.replica.data.as_os_str().is_empty())?;
        self.replica()?;
        Ok(())
    }

    /// The raft group this coordinator joins, validated. Its database is `replica.data`, else
    /// `cloud.budget.ledger`, else none: a lone coordinator without cloud endpoints keeps its
    /// state (operators' decisions about workers) in memory.
    pub fn replica(&self) -> Result<baton_replica::ReplicaConfig> {
        let r = &self.replica;
        let data = if r.data.as_os_str().is_empty() {
            self.cloud.budget.ledger.clone()
        } else {
            r.data.clone()
        };
        let mut config = baton_replica::ReplicaConfig::single(r.node_id, r.listen, data);
        if !r.members.is_empty() {
            config.members = (0u64..).zip(r.members.iter().cloned()).collect();
        }
        config.heartbeat = r.heartbeat;
        config.election_timeout = (r.election_timeout_min, r.election_timeout_max);
        config.propose_timeout = r.propose_timeout;
        config.snapshot_after = r.snapshot_after;
        config.log_kept_after_snapshot = r.log_kept_after_snapshot;
        config.tls = self.tls.clone();
        config.validate().map_err(|e| Error::InvalidConfig {
            field: e.field,
            reason: e.reason,
        })?;
        Ok(config)
    }
}

/// One coordinator's place in the coordinators' raft group (`[coordinator.replica]`), which
/// replicates the cloud budget ledger among them. Every coordinator of a group lists the same
/// `members`; each has its own `node_id` and database.
///
/// ```toml
/// [coordinator.replica]
/// node_id = 1
/// listen = "10.0.0.2:7400"
/// members = ["coord-0.baton:7400", "coord-1.baton:7400", "coord-2.baton:7400"]
/// data = "/var/lib/baton/coordinator.redb"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaSection {
    /// This coordinator's raft node id: its position in `members` (from 0), stable across
    /// restarts. Default 0.
    pub node_id: u64,
    /// Where this coordinator serves its peers (`baton.v1.Replica`); off loopback it needs
    /// `[coordinator.tls]`. Default "127.0.0.1:0" (a one-node group has no peers).
    pub listen: SocketAddr,
    /// Every member's `host:port` (where its peers reach it), in node id order: the first is
    /// node 0; this coordinator's is at `node_id`. Default: none, this coordinator alone.
    pub members: Vec<String>,
    /// The database file (redb) holding the raft log and the replicated state. Default:
    /// empty, `cloud.budget.ledger`; without that either, a lone coordinator keeps the state
    /// (operators' decisions about workers) in memory, and a group of several is refused.
    pub data: PathBuf,
    /// The leader's heartbeat period. Default 100ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time between this and
    /// `election_timeout_max` stands for election. Default 300ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub election_timeout_min: Duration,
    /// The election time-out's upper bound; also how long a follower keeps a lost leader's
    /// lease before it stands, so a leader is replaced about this much plus a random
    /// time-out after it dies. Default 600ms.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub election_timeout_max: Duration,
    /// How long a budget decision may wait for a leader (an election) before the request
    /// fails with UNAVAILABLE. Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub propose_timeout: Duration,
    /// Entries applied between two snapshots of the state (the log before one is dropped).
    /// Default 5000.
    pub snapshot_after: u64,
    /// Entries kept behind a snapshot for replicas that lag a little. Default 1000.
    pub log_kept_after_snapshot: u64,
}

impl Default for ReplicaSection {
    fn default() -> Self {
        let d = baton_replica::ReplicaConfig::single(
            0,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            PathBuf::new(),
        );
        ReplicaSection {
            node_id: d.node_id,
            listen: d.listen,
            members: Default::default(),
            data: PathBuf::new(),
            heartbeat: d.heartbeat,
            election_timeout_min: d.election_timeout.0,
            election_timeout_max: d.election_timeout.1,
            propose_timeout: d.propose_timeout,
            snapshot_after: d.snapshot_after,
            log_kept_after_snapshot: d.log_kept_after_snapshot,
        }
    }
}

/// Cloud upstreams a request may spill to, and the dollar budget that bounds them
/// (`[coordinator.cloud]`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// OpenAI-compatible endpoints, in the order they are tried
    /// (`[[coordinator.cloud.endpoints]]`). Default: none (nothing ever leaves the cluster).
    pub endpoints: Vec<baton_cloud::EndpointConfig>,
    /// The ledger file, its time zone and the caps (`[coordinator.cloud.budget]`); at least
    /// one cap when any endpoint is configured.
    pub budget: baton_budget::BudgetConfig,
    /// Whether a request that does not say (`allow_cloud`) may spill. Default true.
    pub allow_by_default: bool,
    /// Time to first token a request that gives none (`ttft_target`) should get (a duration):
    /// when the local cluster is predicted to take longer, the request spills. Default: unset,
    /// a request spills only when no local worker can take it, local admission is full, or the
    /// local attempt failed before its first token.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub ttft_target: Option<Duration>,
    /// Send a request whose local attempt failed before its first token to an upstream.
    /// Default true.
    pub failover: bool,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            budget: baton_budget::BudgetConfig::default(),
            allow_by_default: true,
            ttft_target: None,
            failover: true,
        }
    }
}

impl CloudConfig {
    /// Each bad value names its key under `cloud.`; `replica_data` says whether the ledger has
    /// a home in `replica.data` (then `budget.ledger` may be left empty).
    pub fn validate(&self, replica_data: bool) -> Result<()> {
        if self.endpoints.is_empty() {
            return Ok(());
        }
        let prefixed = |field: String, reason: String| Error::InvalidConfig {
            field: if field.starts_with("cloud.") {
                field
            } else {
                format!("cloud.{field}")
            },
            reason,
        };
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            endpoint.validate(i).map_err(|e| match e {
                baton_cloud::Error::InvalidConfig { field, reason } => prefixed(field, reason),
                other => prefixed(format!("endpoints[{i}]"), other.to_string()),
            })?;
            if let Some(j) = self.endpoints[..i]
                .iter()
                .position(|e| e.name == endpoint.name)
            {
                return Err(prefixed(
                    format!("endpoints[{i}].name"),
                    format!("{:?} is also the name of endpoints[{j}]", endpoint.name),
                ));
            }
        }
        let checked = if replica_data {
            if !self.budget.ledger.as_os_str().is_empty() {
                return Err(prefixed(
                    "budget.ledger".into(),
                    "the ledger is kept in the replicated state's database (replica.data); \
                     leave this unset"
                        .into(),
                ));
            }
            self.budget.validate_caps()
        } else {
            self.budget.validate()
        };
        checked.map_err(|baton_budget::Error::InvalidConfig { field, reason }| {
            prefixed(field, reason)
        })?;
        if self.budget.caps.is_empty() {
            return Err(prefixed(
                "budget.caps".into(),
                "at least one cap is required when cloud endpoints are configured (spend would \
                 be unbounded)"
                    .into(),
            ));
        }
        for (i, cap) in self.budget.caps.iter().enumerate() {
            if let Some(name) = &cap.endpoint
                && !self.endpoints.iter().any(|e| &e.name == name)
            {
                return Err(prefixed(
                    format!("budget.caps[{i}].endpoint"),
                    format!("{name:?} is not the name of a configured endpoint"),
                ));
            }
        }
        if self.ttft_target.is_some_and(|t| t.is_zero()) {
            return Err(prefixed("ttft_target".into(), "must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> CoordinatorConfig {
        let mut config = CoordinatorConfig::new("model.gguf");
        config.decode_workers = vec!["127.0.0.1:9".into()];
        config
    }

    /// The field a refused config names.
    fn refused(config: &CoordinatorConfig) -> String {
        match config.validate() {
            Err(Error::InvalidConfig { field, .. }) => field,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn http_limits_out_of_range_are_refused_naming_their_field() {
        valid().validate().expect("the defaults are valid");
        for timeout in [Duration::ZERO, Duration::from_secs(301)] {
            let mut config = valid();
            config.http_header_read_timeout = timeout;
            assert_eq!(refused(&config), "http_header_read_timeout", "{timeout:?}");
        }
        for max in [0, MAX_HTTP_CONNECTIONS + 1] {
            let mut config = valid();
            config.http_max_connections = max;
            assert_eq!(refused(&config), "http_max_connections", "{max}");
        }
        let mut config = valid();
        config.http_header_read_timeout = Duration::from_millis(1);
        config.http_max_connections = 1;
        config.validate().expect("the smallest limits are valid");
    }
}
