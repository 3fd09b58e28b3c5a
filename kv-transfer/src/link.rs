//! Transport choice at run time: where a decode worker receives KV ([`Endpoint`]), a prefill
//! worker's connection to one ([`Link`]), and the connections a prefill worker keeps
//! ([`Links`]), opened when the coordinator introduces a peer rather than on its first request.
//!
//! prefill worker: Links --Link::send(KvSegment)--> Endpoint (TCP address | shm socket)
//!
//! A segment must fit one frame of the chosen transport (a shared-memory slot is 8 MiB by
//! default): senders split a layer's blocks into runs of at most [`MAX_SEGMENT_BYTES`], see
//! [`max_blocks_per_segment`].
//!     --> decode worker's receiver

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use baton_core::LayoutDescriptor;
use tokio::sync::{Mutex, mpsc};

use crate::error::Result;
use crate::frame::Shard;
use crate::shm::{ShmConfig, ShmSender};
use crate::tcp::{TcpConfig, TcpSender};
use crate::transport::{KvSegment, KvSender, Stats};

/// Where a decode worker receives KV.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Tcp(SocketAddr),
    /// The Unix socket of a shared-memory receiver on this host.
    Shm(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Shm(p) => write!(f, "shm://{}", p.display()),
        }
    }
}

/// A handshaken connection to one decode worker over one transport.
pub enum Link {
    Tcp(TcpSender),
    Shm(ShmSender),
}

impl Link {
    /// Opens and handshakes a connection; refused when the layouts cannot be mapped.
    pub async fn connect(
        endpoint: &Endpoint,
        local: LayoutDescriptor,
        config: &LinkConfig,
    ) -> Result<Self> {
        match endpoint {
            Endpoint::Tcp(addr) => Ok(Link::Tcp(
                TcpSender::connect(*addr, local, Shard::default(), config.tcp.clone()).await?,
            )),
            Endpoint::Shm(path) => Ok(Link::Shm(
                ShmSender::connect(path, local, Shard::default(), config.shm.clone()).await?,
            )),
        }
    }

    pub async fn send(&self, segment: &KvSegment) -> Result<()> {
        match self {
            Link::Tcp(s) => s.send(segment).await,
            Link::Shm(s) => s.send(segment).await,
        }
    }

    /// The decode worker's layout, learned at handshake.
    pub fn peer(&self) -> &LayoutDescriptor {
        match self {
            Link::Tcp(s) => s.peer(),
            Link::Shm(s) => s.peer(),
        }
    }

    pub fn stats(&self) -> &Stats {
        match self {
            Link::Tcp(s) => s.stats(),
            Link::Shm(s) => s.stats(),
        }
    }
}

/// Transport settings for the connections a prefill worker opens (`[prefill.link]`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// The TCP transport's sending side.
    pub tcp: TcpConfig,
    /// The shared-memory transport's sending side.
    pub shm: ShmConfig,
}

/// What one handoff's sending cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    /// KV payload bytes (the bytes the sequence's KV occupies), not counting frame headers.
    pub bytes: u64,
    pub segments: u64,
    /// When the first segment was handed to the transport.
    pub first: Option<Instant>,
    /// When the last one was.
    pub done: Instant,
}

/// Sends every segment `segments` yields over `link`, until the producer drops its end.
/// On a transport error the channel is closed, so the producer sees its next send fail.
pub async fn send_all(link: &Link, mut segments: mpsc::Receiver<KvSegment>) -> Result<SendReport> {
    let mut report = SendReport {
        bytes: 0,
        segments: 0,
        first: None,
        done: Instant::now(),
    };
    while let Some(segment) = segments.recv().await {
        report.first.get_or_insert_with(Instant::now);
        if let Err(e) = link.send(&segment).await {
            segments.close();
            return Err(e);
        }
        report.bytes += segment.chunk.data.len() as u64;
        report.segments += 1;
    }
    report.done = Instant::now();
    Ok(report)
}

/// The connections a prefill worker holds, one per decode worker endpoint.
pub struct Links {
    local: LayoutDescriptor,
    config: LinkConfig,
    open: Mutex<HashMap<Endpoint, Arc<Link>>>,
}

impl Links {
    pub fn new(local: LayoutDescriptor, config: LinkConfig) -> Self {
        Self {
            local,
            config,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The connection to `endpoint`, opened now if there is none. The flag says whether it was
    /// already open.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<(Arc<Link>, bool)> {
        let mut open = self.open.lock().await;
        if let Some(link) = open.get(endpoint) {
            return Ok((link.clone(), true));
        }
        let link = Arc::new(Link::connect(endpoint, self.local.clone(), &self.config).await?);
        tracing::info!(%endpoint, "kv link open");
        open.insert(endpoint.clone(), link.clone());
        Ok((link, false))
    }

    /// Forgets a connection that failed, so the next handoff to that peer opens a fresh one.
    pub async fn drop_link(&self, endpoint: &Endpoint, link: &Arc<Link>) {
        let mut open = self.open.lock().await;
        if open.get(endpoint).is_some_and(|l| Arc::ptr_eq(l, link)) {
            open.remove(endpoint);
            tracing::warn!(%endpoint, "kv link dropped after a transport error");
        }
    }
}

/// Payload bytes one segment may carry on any transport with default settings: a
/// shared-memory slot less the frame header, with room to spare.
pub const MAX_SEGMENT_BYTES: usize = 4 << 20;

/// How many blocks of one layer fit one segment, for a layout whose one block of one layer
/// (K and V) is `block_bytes`.
pub fn max_blocks_per_segment(block_bytes: usize) -> usize {
    (MAX_SEGMENT_BYTES / block_bytes.max(1)).max(1)
}
