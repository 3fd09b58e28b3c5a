//! The KV transfer agent: one per worker, in the spirit of NIXL's. It registers the worker's KV
//! pool (its memory and geometry), listens on one endpoint per backend, opens connections to
//! peers, moves byte ranges between pools and carries the notices of a handoff.
//!
//! ```text
//! push:  prefill engine --Peer::write / write_direct (layer L's copies)--> decode agent
//!        decode agent: admit each range (Coverage) -> verify crc -> Event::LayerLanded
//!        prefill --Notice::Complete (the worker's opaque completion)--> decode: Event::Arrived
//! pull:  decode agent --Read(source blocks -> my blocks)--> prefill agent (a task, not the
//!        engine thread, reads the pinned blocks) --writes, Complete--> decode: Event::Arrived
//!        decode agent --Done--> prefill agent: Event::ReadDone (the owner ends the lease)
//! ```
//!
//! Backends (`tcp`, `shm`) implement [`Link`]: framed control messages, writes of owned or
//! borrowed bytes, and, where the peer's memory is mapped here, direct copies. A new backend
//! (RDMA, CUDA IPC) is a new module implementing it.
//!
//! Invariants: a byte reaches the pool only inside the reserved blocks of a live expected
//! handoff and at most once ([`coverage`]); bytes are used only after their crc32c is verified;
//! reserved blocks stay reserved (their guard alive) while any writer may still write them: an
//! in-process writer holds a guard clone, and a peer that writes straight into this process's
//! memory must acknowledge a cancel ([`Notice::Stopped`]) or lose its connection first.

pub mod auth;
mod config;
mod core;
pub(crate) mod coverage;
mod framed;
mod shm;
mod stats;
mod tcp;

/// The hello decoders of the backends, public only for the fuzz targets in `fuzz/`; not part
/// of the crate's API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::auth::decode_offer;
    pub use super::framed::split_hello;
    pub use super::shm::split_shm_hello;
}

use std::any::Any;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{BlockId, HandoffId, WorkerId};
use tokio::sync::mpsc;

pub use auth::LinkKey;
pub use config::KvConfig;

use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::memory::{ByteCopy, HostRegion, PoolLayout};
use crate::wire::{Hello, LandedRange, Notice, ReadRequest};
pub use stats::{Stats, StatsSnapshot};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Keeps reserved or pinned blocks out of the pool while it lives: the owner's block table (or
/// whatever frees the blocks when dropped), shared with every writer or reader of them.
pub type Guard = Arc<dyn Any + Send + Sync>;

/// A worker's KV pool as the agent sees it: its geometry, and its bytes.
pub trait KvRegion: Send + Sync {
    fn pool(&self) -> &PoolLayout;

    /// The pool's memory when it is host memory baton owns: transports read and write it in
    /// place.
    fn host(&self) -> Option<&HostRegion>;

    /// Copies bytes out of the pool, for memory that is not host memory (a GPU's, candle's
    /// tensors). The range lies in blocks the caller holds pinned.
    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Copies bytes into the pool, for memory that is not host memory. The range lies in blocks
    /// reserved for the caller's handoff.
    fn write(&self, offset: u64, src: &[u8]) -> Result<()>;
}

/// Host memory baton owns, as a [`KvRegion`].
pub struct HostPool {
    pub region: Arc<HostRegion>,
    pub pool: PoolLayout,
}

impl KvRegion for HostPool {
    fn pool(&self) -> &PoolLayout {
        &self.pool
    }

    fn host(&self) -> Option<&HostRegion> {
        Some(&self.region)
    }

    fn read(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: the caller holds the blocks pinned (the trait's contract).
        let src = unsafe { self.region.bytes(offset, dst.len()) }.ok_or_else(|| {
            Error::InvalidConfig {
                field: "offset",
                reason: format!("{offset}+{} outside the pool", dst.len()),
            }
        })?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the blocks are reserved for the caller's handoff (the trait's contract).
        let dst = unsafe { self.region.bytes_mut(offset, src.len()) }.ok_or_else(|| {
            Error::InvalidConfig {
                field: "offset",
                reason: format!("{offset}+{} outside the pool", src.len()),
            }
        })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

/// Which backend carries a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Shm,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
        }
    }
}

/// A sequence's blocks in a worker's pool, as another worker addresses them: who holds them,
/// how to reach its agent, the pool's geometry and the blocks in token order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub worker: WorkerId,
    pub endpoints: Vec<Endpoint>,
    pub pool: PoolLayout,
    pub blocks: Vec<BlockId>,
    pub tokens: u32,
    /// The first tokens (whole blocks) whose KV the blocks already hold: a receiver's cached
    /// prefix, which a writer skips. 0 for a source.
    pub cached_tokens: u32,
}

impl BlockDescriptor {
    /// The endpoint of `transport`, if the worker offers it.
    pub fn endpoint(&self, transport: Transport) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.transport() == transport)
    }

    /// Refuses a descriptor whose blocks cannot hold `tokens` or lie outside its pool.
    pub fn check(&self, tokens: u32) -> Result<()> {
        let needed = self.pool.layout.blocks_for(tokens) as usize;
        if self.tokens != tokens || self.blocks.len() < needed {
            return Err(Error::InvalidConfig {
                field: "blocks",
                reason: format!(
                    "{} blocks for {} tokens, expected {tokens} tokens in at least {needed}",
                    self.blocks.len(),
                    self.tokens
                ),
            });
        }
        let bs = self.pool.layout.block_size.max(1);
        if !self.cached_tokens.is_multiple_of(bs) || (tokens > 0 && self.cached_tokens >= tokens) {
            return Err(Error::InvalidConfig {
                field: "cached_tokens",
                reason: format!(
                    "{} is not a whole number of {bs}-token blocks below the {tokens} tokens",
                    self.cached_tokens
                ),
            });
        }
        if let Some(b) = self.blocks.iter().find(|b| b.0 >= self.pool.num_blocks) {
            return Err(Error::InvalidConfig {
                field: "blocks",
                reason: format!("block {} outside a pool of {}", b.0, self.pool.num_blocks),
            });
        }
        Ok(())
    }
}

/// What a receiver expects of one handoff: every filled row of `layers` x `heads` of a
/// sequence of `tokens` tokens, into `blocks` of its pool.
pub struct Expectation {
    pub tokens: u32,
    pub layers: Range<u32>,
    pub heads: Range<u32>,
    pub blocks: Vec<BlockId>,
    /// Keeps `blocks` reserved; the agent holds a clone until no writer can touch them.
    pub guard: Guard,
}

/// A pinned sequence a reader may read (pull shape).
pub struct Source {
    pub tokens: u32,
    pub blocks: Vec<BlockId>,
    /// The worker's opaque completion, sent to the reader with the last byte (the first token
    /// and its finish).
    pub completion: Vec<u8>,
    /// Keeps `blocks` pinned; readers hold clones while they read.
    pub guard: Guard,
}

/// What the agent tells its owner (the worker's engine loop).
#[derive(Debug)]
pub enum Event {
    /// Receiver: every expected byte of `layer` landed and was verified.
    LayerLanded { handoff: HandoffId, layer: u32 },
    /// Receiver: the sender is still working on the handoff (its prompt is queued or
    /// computing).
    Keepalive { handoff: HandoffId },
    /// Receiver: every expected byte landed and was verified, and the sender completed:
    /// `completion` is its opaque message. The agent no longer tracks the handoff.
    Arrived {
        handoff: HandoffId,
        bytes: u64,
        sender_bytes: u64,
        transfer: Duration,
        completion: Vec<u8>,
    },
    /// Receiver: the handoff failed (a corrupt or misplaced write, the sender aborted, its link
    /// broke). The agent no longer tracks it.
    Failed { handoff: HandoffId, error: Error },
    /// Sender: the receiver gave the handoff up; write nothing more and answer
    /// [`Notice::Stopped`].
    Cancelled { handoff: HandoffId },
    /// Source: a reader asked to read the source (pull); the owner renews its lease.
    ReadStarted { handoff: HandoffId },
    /// Source: a reader read the source and verified it (pull). The owner may end the lease.
    ReadDone {
        handoff: HandoffId,
        bytes: u64,
        transfer: Duration,
    },
    /// Source: serving a read failed; the source stays offered until its lease ends.
    ReadFailed { handoff: HandoffId, error: Error },
}

/// A connection to one peer's agent, over one backend.
pub(crate) trait Link: Send + Sync {
    /// Who the peer is and its pool, from its hello.
    fn remote(&self) -> &Hello;

    fn transport(&self) -> Transport;

    /// Whether this link copies straight into the peer's memory ([`Link::copy_direct`]).
    fn direct(&self) -> bool;

    /// Whether the peer may copy straight into this process's memory (this side passed it the
    /// pool's memfd): its writes then arrive as `Landed` notices, after a claim or a read.
    fn peer_writes_direct(&self) -> bool;

    /// Sends one control frame (hello, notice, read, close), whole.
    fn send_frame(&self, frame: Vec<u8>) -> BoxFuture<'_, Result<()>>;

    /// Sends write frames: each `(destination offset, bytes)` of `layer` of `handoff`, split
    /// into frames of at most the configured size.
    fn write_frames<'a>(
        &'a self,
        handoff: HandoffId,
        layer: u32,
        pieces: &'a [(u64, &'a [u8])],
    ) -> BoxFuture<'a, Result<()>>;

    /// Copies `copies` from `src` (this process's pool) straight into the peer's pool, each
    /// with its crc32c computed as it goes. Only where [`Link::direct`] holds.
    fn copy_direct(&self, src: &HostRegion, copies: &[ByteCopy]) -> Result<Vec<LandedRange>>;

    /// The link broke or was closed.
    fn is_closed(&self) -> bool;

    /// Closes the link from this side: a close frame saying `why`, then the write halves shut
    /// down. The peer's end of the socket closes in turn and this side's readers end, which
    /// fails the link's handoffs (`Core::link_closed`).
    fn close<'a>(&'a self, why: &'a str) -> BoxFuture<'a, ()>;

    /// This link's key among the agent's links.
    fn id(&self) -> u64;
}

/// A connection to a peer, for a sender or a reader.
#[derive(Clone)]
pub struct Peer {
    link: Arc<dyn Link>,
    core: Arc<core::Core>,
}

impl Peer {
    /// The peer's worker id.
    pub fn worker(&self) -> &WorkerId {
        &self.link.remote().worker
    }

    /// The peer's pool.
    pub fn pool(&self) -> &PoolLayout {
        &self.link.remote().pool
    }

    pub fn transport(&self) -> Transport {
        self.link.transport()
    }

    /// Whether writes copy straight into the peer's memory (then call [`Peer::begin`] before
    /// the first write of a handoff).
    pub fn direct(&self) -> bool {
        self.link.direct()
    }

    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// Claims `handoff`'s blocks on the peer before writing straight into its memory: resolves
    /// once the peer says they are still reserved for it (and will stay so until this side
    /// completes, aborts or answers a cancel). Refused when the peer no longer expects it.
    pub async fn begin(&self, handoff: HandoffId) -> Result<()> {
        if !self.link.direct() {
            return Ok(());
        }
        self.core.claim(&self.link, handoff).await
    }

    /// Sends `pieces` (destination offsets and owned bytes) of `layer` as write frames.
    pub async fn write(
        &self,
        handoff: HandoffId,
        layer: u32,
        pieces: &[(u64, Vec<u8>)],
    ) -> Result<u64> {
        let borrowed: Vec<(u64, &[u8])> = pieces.iter().map(|(o, b)| (*o, b.as_slice())).collect();
        self.link.write_frames(handoff, layer, &borrowed).await?;
        let bytes = pieces.iter().map(|(_, b)| b.len() as u64).sum();
        self.core.stats.add_sent(bytes as usize);
        Ok(bytes)
    }

    /// Copies `copies` of `layer` from this worker's pool straight into the peer's (after
    /// [`Peer::begin`]), on the calling thread; returns what the receiver must be told with
    /// [`Peer::landed`].
    pub fn write_direct(&self, copies: &[ByteCopy]) -> Result<Vec<LandedRange>> {
        let src = self
            .core
            .memory
            .host()
            .ok_or_else(|| Error::InvalidConfig {
                field: "kv pool",
                reason: "direct copies need the pool in host memory".into(),
            })?;
        let ranges = self.link.copy_direct(src, copies)?;
        self.core
            .stats
            .add_sent(ranges.iter().map(|r| r.len as usize).sum());
        Ok(ranges)
    }

    /// Tells the receiver which ranges of `layer` [`Peer::write_direct`] filled.
    pub async fn landed(
        &self,
        handoff: HandoffId,
        layer: u32,
        ranges: Vec<LandedRange>,
    ) -> Result<()> {
        self.notify(handoff, &Notice::Landed { layer, ranges })
            .await
    }

    /// Sends a notice about `handoff`.
    pub async fn notify(&self, handoff: HandoffId, notice: &Notice) -> Result<()> {
        let frame = crate::wire::frame(crate::wire::Kind::Notice, handoff, &notice.encode())?;
        self.link.send_frame(frame).await
    }
}

/// The agent of one worker. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    core: Arc<core::Core>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("worker", &self.core.id)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Registers `memory`, binds the configured endpoints and starts serving peers. Events
    /// arrive on the returned channel, which the owner must keep reading.
    ///
    /// With `key`, every link this agent opens or accepts proves the key both ways before its
    /// hello, and a peer without it is refused ([`auth`]); without, links are open (only
    /// while every listener is on loopback: the worker's config checks that).
    pub async fn start(
        worker: WorkerId,
        memory: Arc<dyn KvRegion>,
        config: KvConfig,
        key: Option<LinkKey>,
    ) -> Result<(Agent, mpsc::Receiver<Event>)> {
        config.validate()?;
        let (core, events) = core::Core::new(worker, memory, config, key);
        let core = Arc::new(core);
        core.listen().await?;
        Ok((Agent { core }, events))
    }

    pub fn worker(&self) -> &WorkerId {
        &self.core.id
    }

    /// This worker's pool geometry.
    pub fn pool(&self) -> &PoolLayout {
        &self.core.pool
    }

    /// Where peers reach this agent, one per backend.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.core.endpoints()
    }

    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// Whether this worker's pool is memory peers on this host can map (shared memory), as
    /// opposed to private memory they write through a socket.
    pub fn pool_shared(&self) -> bool {
        self.core.memory.host().is_some_and(|r| r.fd().is_some())
    }

    /// The connection to `endpoint`, opened and handshaken now if there is none open. Refused
    /// when the peer's layout cannot be mapped onto this pool's.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Peer> {
        let link = self.core.connect(endpoint).await?;
        Ok(Peer {
            link,
            core: self.core.clone(),
        })
    }

    /// Closes the link this agent dialed to `endpoint`, if one is open (its peer left the
    /// cluster). Returns whether one was. Handoffs on it fail; a later `connect` dials anew.
    pub async fn disconnect(&self, endpoint: &Endpoint, why: &str) -> bool {
        self.core.disconnect(endpoint, why).await
    }

    /// Whether a live link to `endpoint` is open (dialed by this agent).
    pub async fn is_connected(&self, endpoint: &Endpoint) -> bool {
        self.core.is_connected(endpoint).await
    }

    /// Receiver: admits writes of `handoff` as `expectation` describes; frames of handoffs not
    /// expected are rejected.
    pub fn expect(&self, handoff: HandoffId, expectation: Expectation) -> Result<()> {
        self.core.expect(handoff, expectation)
    }

    /// Receiver: gives `handoff` up. Its blocks' guard is dropped once no writer can touch them:
    /// at once, or after a peer writing straight into this memory answers the cancel (or its
    /// link closes). Returns whether it was expected.
    pub fn forget(&self, handoff: HandoffId) -> bool {
        self.core.forget(handoff)
    }

    /// Reader (pull): asks the source agent at `endpoint` to write its leased sequence into
    /// this pool. `handoff` must be expected already.
    pub async fn read(
        &self,
        endpoint: &Endpoint,
        handoff: HandoffId,
        request: ReadRequest,
    ) -> Result<()> {
        let link = self.core.connect(endpoint).await?;
        self.core.request_read(&link, handoff, request).await
    }

    /// Source (pull): offers a pinned sequence to readers.
    pub fn offer(&self, handoff: HandoffId, source: Source) -> Result<()> {
        self.core.offer(handoff, source)
    }

    /// Source: withdraws an offer (its lease ended); readers in progress keep their guard
    /// clone until they stop. Returns whether it was offered.
    pub fn withdraw(&self, handoff: HandoffId) -> bool {
        self.core.withdraw(handoff)
    }

    /// Handoffs expected, quarantined (waiting for a peer's stop) and offered, for snapshots.
    pub fn counts(&self) -> (usize, usize, usize) {
        self.core.counts()
    }
}
