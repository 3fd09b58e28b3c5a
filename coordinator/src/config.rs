//! The coordinator's settings: one typed struct, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// How a disaggregated request's KV moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// Which transport carries KV between a prefill and a decode worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// Shared memory when both workers report the same host id and the decode worker offers
    /// it, TCP otherwise.
    #[default]
    Auto,
    Tcp,
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

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The model file or directory: the coordinator reads its tokenizer and chat template (no
    /// weights).
    pub model: PathBuf,
    /// The API's model name; defaults to the model file's stem.
    pub model_name: Option<String>,
    /// gRPC (baton.v1.Inference, health, reflection).
    pub grpc_listen: SocketAddr,
    /// OpenAI-compatible HTTP, /health, /ready, /metrics.
    pub http_listen: SocketAddr,
    /// gRPC addresses (host:port) of prefill workers.
    pub prefill_workers: Vec<String>,
    /// gRPC addresses (host:port) of decode workers.
    pub decode_workers: Vec<String>,
    pub handoff: HandoffShape,
    pub transport: TransportChoice,
    /// Prompts shorter than this run aggregated on a decode worker under `pd_mode = auto`: their
    /// prefill costs less than a handoff.
    pub min_disaggregated_tokens: usize,
    /// Requests admitted at once (streaming or waiting); more get RESOURCE_EXHAUSTED / 429.
    pub max_inflight: usize,
    /// Lease time for a handoff's pinned blocks (renewed while the transfer progresses).
    pub lease_ttl: Duration,
    /// How often worker load is polled; a worker that fails a poll is unhealthy until the next
    /// one succeeds.
    pub load_poll_interval: Duration,
    /// Seconds a client is told to wait after a 429 (`Retry-After`).
    pub retry_after: Duration,
}

impl CoordinatorConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            model_name: None,
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            prefill_workers: Vec::new(),
            decode_workers: Vec::new(),
            handoff: HandoffShape::Push,
            transport: TransportChoice::Auto,
            min_disaggregated_tokens: 32,
            max_inflight: 256,
            lease_ttl: Duration::from_secs(10),
            load_poll_interval: Duration::from_millis(500),
            retry_after: Duration::from_secs(1),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.decode_workers.is_empty() {
            return bad("decode_workers", "at least one decode worker is required");
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be positive");
        }
        if self.lease_ttl < Duration::from_millis(10) || self.lease_ttl > Duration::from_secs(60) {
            return bad("lease_ttl", "must be between 10 ms and 60 s");
        }
        if self.load_poll_interval < Duration::from_millis(10) {
            return bad("load_poll_interval", "must be at least 10 ms");
        }
        Ok(())
    }
}
