//! A worker's KV transfer settings (`[prefill.kv]`, `[decode.kv]`): where its agent listens and
//! how its links behave.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The agent's endpoints and link settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KvConfig {
    /// Address KV connections over TCP are accepted on; port 0 lets the OS choose. Default
    /// "127.0.0.1:0".
    pub tcp_listen: SocketAddr,
    /// Streams one TCP connection opens; writes go round robin over them. Default 4.
    pub tcp_streams: usize,
    /// Socket send and receive buffer sizes, in bytes (`SO_SNDBUF`, `SO_RCVBUF`). Default:
    /// unset, the OS defaults.
    #[serde(rename = "socket_buffer_bytes")]
    #[schemars(rename = "socket_buffer_bytes")]
    pub socket_buffer: Option<u32>,
    /// Unix socket that peers on this host connect to for shared memory: a peer that writes
    /// into this worker's pool maps it and copies straight into it. A decode worker with this
    /// set allocates its pool as shareable memory. Default: unset, no shared memory.
    pub shm_socket: Option<PathBuf>,
    /// Largest write frame, in bytes; larger copies are split. At most `max_payload_bytes`.
    /// Default 4194304 (4 MiB).
    #[serde(rename = "max_write_bytes")]
    #[schemars(rename = "max_write_bytes")]
    pub max_write: u32,
    /// Largest frame payload accepted from a peer, in bytes. Default 67108864 (64 MiB).
    #[serde(rename = "max_payload_bytes")]
    #[schemars(rename = "max_payload_bytes")]
    pub max_payload: u32,
    /// Longest a connection may take to exchange hellos, and a direct writer to answer a
    /// claim (a duration: "5s", "500ms"). Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub handshake_timeout: Duration,
    /// Whether this worker computes the crc32c of every range it copies straight into a peer's
    /// pool over shared memory (in the same pass as the copy), for the peer to check in place.
    /// It guards against a peer's bugs, not a wire: it costs a sixth to a fifth of the copy's
    /// speed and a second pass over the bytes on the receiving worker's CPU. Only the writing
    /// side (the prefill worker, which also serves pulls) copies directly, so only
    /// `[prefill.kv]` takes it. TCP always checksums. Default false.
    pub shm_checksums: bool,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            tcp_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tcp_streams: 4,
            socket_buffer: None,
            shm_socket: None,
            max_write: 4 << 20,
            max_payload: 64 << 20,
            handshake_timeout: Duration::from_secs(5),
            shm_checksums: false,
        }
    }
}

impl KvConfig {
    /// Errors name the config key.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field, reason: &str| {
            Err(Error::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.tcp_streams == 0 || self.tcp_streams > 64 {
            return invalid("tcp_streams", "must be 1 to 64");
        }
        if self.max_write == 0 || self.max_write > self.max_payload {
            return invalid(
                "max_write_bytes",
                "must be positive and at most max_payload_bytes",
            );
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > Duration::from_secs(600) {
            return invalid(
                "handshake_timeout",
                "must be more than 0 and at most 10 min",
            );
        }
        if let Some(p) = &self.shm_socket
            && (!p.is_absolute() || p.as_os_str().len() > 100)
        {
            return invalid(
                "shm_socket",
                "must be an absolute path of at most 100 bytes (a Unix socket path)",
            );
        }
        Ok(())
    }

    pub(crate) fn limits(&self) -> crate::wire::Limits {
        crate::wire::Limits {
            max_payload: self.max_payload,
        }
    }
}
