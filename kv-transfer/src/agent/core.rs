//! The agent's shared state and the protocol logic every backend's links call into: what is
//! expected, offered, claimed and quarantined, and what each frame does to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::{HandoffId, WorkerId};
use tokio::sync::{mpsc, oneshot};

use super::auth::LinkKey;
use super::coverage::Coverage;
use super::stats::Stats;
use super::{Event, Expectation, Guard, KvConfig, KvRegion, Link, Source};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::memory::{PoolLayout, SeqBlocks, expected_ranges, layer_copies};
use crate::wire::{self, Hello, Kind, LandedRange, Notice, ReadRequest};

/// Events the owner has not read yet, at most.
const EVENT_CAPACITY: usize = 1024;

/// A handoff this receiver expects.
struct Inbound {
    coverage: Coverage,
    guard: Guard,
    /// The link that writes it, once known: the claimant of direct writes, the source a read
    /// was asked of, or the first link a write frame came on.
    writer: Option<u64>,
    /// Whether that writer copies straight into this process's memory.
    direct: bool,
    /// The source to tell [`Notice::Done`] once everything arrived (pull).
    read_from: Option<Arc<dyn Link>>,
    /// The sender's [`Notice::Complete`]: its byte count, transfer time and completion.
    completion: Option<(u64, u64, Vec<u8>)>,
    started: Instant,
}

/// Blocks of a given-up handoff that a peer may still write straight into, kept reserved until
/// it answers the cancel or its link closes.
struct Quarantined {
    _guard: Guard,
    link: u64,
}

/// A read being served (source side): its reader's link and a stop flag.
struct Serving {
    link: u64,
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    inbound: HashMap<HandoffId, Inbound>,
    quarantine: HashMap<HandoffId, Quarantined>,
    sources: HashMap<HandoffId, Source>,
    serving: HashMap<HandoffId, Serving>,
    /// Reads served completely: bytes written and time taken, until the reader says Done.
    served: HashMap<HandoffId, (u64, Duration)>,
    /// Direct writers' claims waiting for the receiver's answer, by (link, handoff).
    claims: HashMap<(u64, HandoffId), oneshot::Sender<bool>>,
    /// Every open link, accepted or dialed, by id.
    links: HashMap<u64, Arc<dyn Link>>,
    /// (link, handoff) of the latest writes this agent refused as naming no expected handoff
    /// and told the writer to stop (`cancel_unknown`), so each writer hears it once.
    cancelled_unknown: std::collections::VecDeque<(u64, HandoffId)>,
}

/// How many refused (link, handoff) pairs [`Core::cancel_unknown`] remembers.
const CANCELLED_UNKNOWN_KEPT: usize = 64;

/// One endpoint's dialed link.
#[derive(Default)]
struct Dialed {
    /// The last link dialed: live, closed, or none (never dialed, or every dial failed).
    link: Mutex<Option<Arc<dyn Link>>>,
    /// Held across a dial and its handshake, so concurrent connects to this endpoint share one
    /// link. A failed dial leaves no link behind and the next connect dials again.
    dialing: tokio::sync::Mutex<()>,
}

impl Dialed {
    fn live(&self) -> Option<Arc<dyn Link>> {
        self.link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|l| !l.is_closed())
    }
}

pub(crate) struct Core {
    pub(crate) id: WorkerId,
    pub(crate) memory: Arc<dyn KvRegion>,
    pub(crate) pool: PoolLayout,
    pub(crate) config: KvConfig,
    /// The cluster's link key: with one, every link proves it both ways at connect (`auth`).
    pub(crate) key: Option<LinkKey>,
    pub(crate) stats: Stats,
    events: mpsc::Sender<Event>,
    state: Mutex<State>,
    endpoints: Mutex<Vec<Endpoint>>,
    /// Links this agent dialed, by endpoint, reused by later handoffs. The map's lock is held
    /// only to find an endpoint's entry, never across a dial: a peer that accepts and never
    /// answers delays connects to itself, not to every other peer.
    dialed: Mutex<HashMap<Endpoint, Arc<Dialed>>>,
    next_link: AtomicU64,
    /// The runtime the agent's tasks run on: owners call in from plain threads.
    rt: tokio::runtime::Handle,
}

impl Core {
    pub(crate) fn new(
        id: WorkerId,
        memory: Arc<dyn KvRegion>,
        config: KvConfig,
        key: Option<LinkKey>,
    ) -> (Self, mpsc::Receiver<Event>) {
        let (events, rx) = mpsc::channel(EVENT_CAPACITY);
        let pool = memory.pool().clone();
        let core = Self {
            id,
            memory,
            pool,
            config,
            key,
            stats: Stats::default(),
            events,
            state: Mutex::new(State::default()),
            endpoints: Mutex::new(Vec::new()),
            dialed: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            rt: tokio::runtime::Handle::current(),
        };
        (core, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Each critical section leaves the maps consistent before anything can panic in it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn hello(&self) -> Hello {
        Hello {
            worker: self.id.clone(),
            pool: self.pool.clone(),
        }
    }

    pub(crate) fn link_id(&self) -> u64 {
        self.next_link.fetch_add(1, Ordering::Relaxed)
    }

    /// Refuses a peer whose pool this one cannot exchange blocks with.
    pub(crate) fn check_peer(&self, peer: &Hello) -> Result<()> {
        self.pool.layout.check_compatible(&peer.pool.layout)?;
        Ok(())
    }

    pub(crate) fn endpoints(&self) -> Vec<Endpoint> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Binds every configured backend's listener.
    pub(crate) async fn listen(self: &Arc<Self>) -> Result<()> {
        let mut endpoints = vec![super::tcp::listen(self.clone()).await?];
        if let Some(path) = self.config.shm_socket.clone() {
            endpoints.push(super::shm::listen(self.clone(), &path).await?);
        }
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = endpoints;
        Ok(())
    }

    /// Counts and logs a link that failed to open, dialed or accepted (refused at its
    /// authentication or hello, or broken before either finished).
    pub(crate) fn link_failed(&self, peer: &dyn std::fmt::Display, error: &Error) {
        self.stats.link_failed(error.reason());
        tracing::warn!(%peer, reason = error.reason().as_str(), error = %error, "kv link refused or failed to open");
    }

    /// Records a link a backend opened (dialed or accepted).
    pub(crate) fn register(&self, link: Arc<dyn Link>) {
        self.lock().links.insert(link.id(), link);
    }

    /// The open link to `endpoint`, dialed now if there is none.
    pub(crate) async fn connect(self: &Arc<Self>, endpoint: &Endpoint) -> Result<Arc<dyn Link>> {
        let entry = self
            .dialed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(endpoint.clone())
            .or_default()
            .clone();
        if let Some(link) = entry.live() {
            return Ok(link);
        }
        let _dialing = entry.dialing.lock().await;
        // A connect ahead of this one may have dialed while it waited.
        if let Some(link) = entry.live() {
            return Ok(link);
        }
        let dialed = match endpoint {
            Endpoint::Tcp(addr) => super::tcp::connect(self.clone(), *addr).await,
            Endpoint::Shm(path) => super::shm::connect(self.clone(), path).await,
        };
        let link: Arc<dyn Link> = dialed.inspect_err(|e| self.link_failed(endpoint, e))?;
        tracing::info!(%endpoint, peer = %link.remote().worker, "kv link open");
        *entry.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(link.clone());
        Ok(link)
    }

    /// Closes and forgets the link dialed to `endpoint`; whether a live one was open.
    pub(crate) async fn disconnect(&self, endpoint: &Endpoint, why: &str) -> bool {
        let entry = self
            .dialed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(endpoint);
        let Some(link) = entry.and_then(|e| e.live()) else {
            return false;
        };
        tracing::info!(%endpoint, peer = %link.remote().worker, why, "kv link closed");
        link.close(why).await;
        true
    }

    /// Whether a live dialed link to `endpoint` is open; never waits on a dial in progress.
    pub(crate) async fn is_connected(&self, endpoint: &Endpoint) -> bool {
        let entry = self
            .dialed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(endpoint)
            .cloned();
        entry.is_some_and(|e| e.live().is_some())
    }

    pub(crate) async fn emit(&self, event: Event) {
        if self.events.send(event).await.is_err() {
            tracing::debug!("kv agent event dropped: its owner is gone");
        }
    }

    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (s.inbound.len(), s.quarantine.len(), s.sources.len())
    }

    // ---- receiver ----

    pub(crate) fn expect(&self, handoff: HandoffId, e: Expectation) -> Result<()> {
        let d = &self.pool.layout;
        let invalid = |reason: String| Error::InvalidConfig {
            field: "expectation",
            reason,
        };
        if e.layers.is_empty() || e.layers.start < d.layers.start || e.layers.end > d.layers.end {
            return Err(invalid(format!(
                "layers {:?} outside this pool's {:?}",
                e.layers, d.layers
            )));
        }
        if e.heads.is_empty() || e.heads.start < d.kv_heads.start || e.heads.end > d.kv_heads.end {
            return Err(invalid(format!(
                "kv heads {:?} outside this pool's {:?}",
                e.heads, d.kv_heads
            )));
        }
        let needed = d.blocks_for(e.tokens) as usize;
        if e.tokens == 0 || e.blocks.len() < needed {
            return Err(invalid(format!(
                "{} blocks for {} tokens",
                e.blocks.len(),
                e.tokens
            )));
        }
        if let Some(b) = e.blocks.iter().find(|b| b.0 >= self.pool.num_blocks) {
            return Err(invalid(format!(
                "block {} outside the pool of {}",
                b.0, self.pool.num_blocks
            )));
        }
        let blocks = 0..needed as u32;
        let seq = SeqBlocks {
            pool: &self.pool,
            blocks: &e.blocks,
        };
        let expected = e
            .layers
            .clone()
            .map(|l| expected_ranges(l, &e.heads, &blocks, e.tokens, seq))
            .collect();
        let mut s = self.lock();
        if s.inbound.contains_key(&handoff) || s.quarantine.contains_key(&handoff) {
            return Err(Error::DuplicateHandoff(handoff));
        }
        s.inbound.insert(
            handoff,
            Inbound {
                coverage: Coverage::new(e.layers.clone(), expected),
                guard: e.guard,
                writer: None,
                direct: false,
                read_from: None,
                completion: None,
                started: Instant::now(),
            },
        );
        Ok(())
    }

    pub(crate) fn forget(self: &Arc<Self>, handoff: HandoffId) -> bool {
        let mut s = self.lock();
        let Some(inbound) = s.inbound.remove(&handoff) else {
            return false;
        };
        let link = inbound.writer.and_then(|id| s.links.get(&id).cloned());
        if let Some(link) = link {
            if inbound.direct && !link.is_closed() {
                s.quarantine.insert(
                    handoff,
                    Quarantined {
                        _guard: inbound.guard,
                        link: link.id(),
                    },
                );
            }
            drop(s);
            // The writer stops; a direct writer's answer ends the quarantine.
            let core = self.clone();
            self.rt
                .spawn(async move { core.notice(&link, handoff, &Notice::Cancel).await });
        }
        true
    }

    /// Sends a notice on a link, logging a failure (the link's closing handles the rest).
    pub(crate) async fn notice(&self, link: &Arc<dyn Link>, handoff: HandoffId, notice: &Notice) {
        let sent = match wire::frame(Kind::Notice, handoff, &notice.encode()) {
            Ok(frame) => link.send_frame(frame).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::debug!(%handoff, ?notice, error = %e, "kv notice not sent");
        }
    }

    pub(crate) async fn request_read(
        &self,
        link: &Arc<dyn Link>,
        handoff: HandoffId,
        request: ReadRequest,
    ) -> Result<()> {
        {
            let mut s = self.lock();
            let inbound = s
                .inbound
                .get_mut(&handoff)
                .ok_or(Error::UnknownHandoff(handoff))?;
            inbound.writer = Some(link.id());
            inbound.direct = link.peer_writes_direct();
            inbound.read_from = Some(link.clone());
        }
        let frame = wire::frame(Kind::Read, handoff, &request.encode())?;
        link.send_frame(frame).await
    }

    /// A write frame's header arrived on `link`: admitted (its bytes may go into the pool at
    /// `offset`, under the returned guard) or refused.
    pub(crate) fn admit_write(
        &self,
        link: u64,
        handoff: HandoffId,
        layer: u32,
        offset: u64,
        len: u64,
    ) -> Result<Guard> {
        let mut s = self.lock();
        let inbound = s
            .inbound
            .get_mut(&handoff)
            .ok_or(Error::UnknownHandoff(handoff))?;
        if inbound.direct {
            return Err(Error::SegmentRejected {
                handoff,
                reason: "a write frame for a handoff claimed by a direct writer".into(),
            });
        }
        if inbound.writer.is_some_and(|w| w != link) && inbound.read_from.is_some() {
            return Err(Error::SegmentRejected {
                handoff,
                reason: "a write from a link other than the source it was read from".into(),
            });
        }
        inbound
            .coverage
            .admit(layer, offset, len)
            .map_err(|r| Error::SegmentRejected {
                handoff,
                reason: r.to_string(),
            })?;
        inbound.writer.get_or_insert(link);
        Ok(inbound.guard.clone())
    }

    /// An admitted write's bytes are in the pool; `verified` says whether their crc32c matched.
    pub(crate) async fn write_landed(
        &self,
        handoff: HandoffId,
        layer: u32,
        len: u64,
        verified: std::result::Result<(), Error>,
    ) {
        self.stats.add_received(len as usize);
        if let Err(e) = verified {
            return self.fail(handoff, e).await;
        }
        let events = {
            let mut s = self.lock();
            let Some(inbound) = s.inbound.get_mut(&handoff) else {
                return;
            };
            let mut events = Vec::new();
            if inbound.coverage.land(layer, len) {
                events.push(Event::LayerLanded { handoff, layer });
            }
            events.extend(self.arrival(&mut s, handoff));
            events
        };
        for e in events {
            self.emit(e).await;
        }
    }

    /// Ends `handoff` as arrived if every byte and the completion are in; removes it then.
    fn arrival(&self, s: &mut State, handoff: HandoffId) -> Option<Event> {
        let inbound = s.inbound.get(&handoff)?;
        if !inbound.coverage.complete() || inbound.completion.is_none() {
            return None;
        }
        let inbound = s.inbound.remove(&handoff)?;
        let (sender_bytes, transfer_us, completion) = inbound.completion?;
        self.stats.handoff_completed();
        if let Some(source) = inbound.read_from {
            self.rt.spawn(async move {
                if let Ok(frame) = wire::frame(Kind::Notice, handoff, &Notice::Done.encode()) {
                    let _ = source.send_frame(frame).await;
                }
            });
        }
        let transfer = if transfer_us > 0 {
            Duration::from_micros(transfer_us)
        } else {
            inbound.started.elapsed()
        };
        Some(Event::Arrived {
            handoff,
            bytes: inbound.coverage.total_bytes(),
            sender_bytes,
            transfer,
            completion,
        })
    }

    /// Fails an expected handoff (counted once), telling its writer to stop.
    pub(crate) async fn fail(&self, handoff: HandoffId, error: Error) {
        self.stats.failure(error.reason());
        let link = {
            let mut s = self.lock();
            let Some(inbound) = s.inbound.remove(&handoff) else {
                return;
            };
            let link = inbound.writer.and_then(|id| s.links.get(&id).cloned());
            if let Some(l) = &link
                && inbound.direct
                && !l.is_closed()
            {
                s.quarantine.insert(
                    handoff,
                    Quarantined {
                        _guard: inbound.guard,
                        link: l.id(),
                    },
                );
            }
            link
        };
        self.stats.handoff_failed();
        tracing::warn!(%handoff, %error, "kv handoff failed");
        if let Some(link) = link {
            self.notice(&link, handoff, &Notice::Cancel).await;
        }
        self.emit(Event::Failed { handoff, error }).await;
    }

    /// Tells a writer to stop writing `handoff`, which this agent does not expect: a handoff
    /// that failed before any of its frames arrived (a lease that expired while the writer was
    /// stopped) has no known writer to cancel when it fails, so the writer learns it from its
    /// first refused frame; without this a resumed writer sent every layer into the void. Once
    /// per (link, handoff).
    pub(crate) async fn cancel_unknown(&self, link: &Arc<dyn Link>, handoff: HandoffId) {
        let first = {
            let mut s = self.lock();
            let key = (link.id(), handoff);
            let first = !s.cancelled_unknown.contains(&key);
            if first {
                if s.cancelled_unknown.len() == CANCELLED_UNKNOWN_KEPT {
                    s.cancelled_unknown.pop_front();
                }
                s.cancelled_unknown.push_back(key);
            }
            first
        };
        if first {
            tracing::debug!(%handoff, peer = %link.remote().worker, "writes for a handoff not expected here; telling the writer to stop");
            self.notice(link, handoff, &Notice::Cancel).await;
        }
    }

    /// A frame no live handoff owns, or that breaks the rules, was dropped.
    pub(crate) fn rejected(&self, handoff: Option<HandoffId>, error: &Error) {
        self.stats.failure(error.reason());
        self.stats.frame_rejected();
        tracing::debug!(?handoff, %error, "kv frame rejected");
    }

    // ---- notices ----

    pub(crate) async fn on_notice(
        self: &Arc<Self>,
        link: &Arc<dyn Link>,
        handoff: HandoffId,
        notice: Notice,
    ) {
        match notice {
            Notice::Keepalive => {
                let live = match self.lock().inbound.get_mut(&handoff) {
                    Some(inbound) => {
                        inbound.writer.get_or_insert(link.id());
                        true
                    }
                    None => false,
                };
                if live {
                    self.emit(Event::Keepalive { handoff }).await;
                }
            }
            Notice::Landed { layer, ranges } => self.on_landed(link, handoff, layer, ranges).await,
            Notice::Complete {
                bytes,
                transfer_us,
                completion,
            } => {
                let event = {
                    let mut s = self.lock();
                    match s.inbound.get_mut(&handoff) {
                        Some(inbound) => {
                            inbound.writer.get_or_insert(link.id());
                            inbound.completion = Some((bytes, transfer_us, completion));
                            self.arrival(&mut s, handoff)
                        }
                        None => None,
                    }
                };
                if let Some(e) = event {
                    self.emit(e).await;
                }
            }
            Notice::Abort { reason } => {
                if self.lock().inbound.contains_key(&handoff) {
                    self.fail(
                        handoff,
                        Error::PeerRefused {
                            code: crate::wire::CloseCode::Internal,
                            message: format!("the sender gave the handoff up: {reason}"),
                        },
                    )
                    .await;
                }
            }
            Notice::Begin => {
                let granted = {
                    let mut s = self.lock();
                    match s.inbound.get_mut(&handoff) {
                        Some(i) if i.writer.is_none() && link.peer_writes_direct() => {
                            i.writer = Some(link.id());
                            i.direct = true;
                            true
                        }
                        _ => false,
                    }
                };
                let answer = if granted { Notice::Go } else { Notice::Cancel };
                self.notice(link, handoff, &answer).await;
            }
            Notice::Go => {
                if let Some(tx) = self.lock().claims.remove(&(link.id(), handoff)) {
                    let _ = tx.send(true);
                }
            }
            Notice::Cancel => {
                let claim = self.lock().claims.remove(&(link.id(), handoff));
                if let Some(tx) = claim {
                    let _ = tx.send(false);
                    return;
                }
                let serving = self.lock().serving.remove(&handoff);
                if let Some(serving) = serving {
                    // The serving task answers Stopped once it has stopped writing.
                    serving.stop.store(true, Ordering::Release);
                    return;
                }
                self.emit(Event::Cancelled { handoff }).await;
            }
            Notice::Stopped => {
                let mut s = self.lock();
                if s.quarantine
                    .get(&handoff)
                    .is_some_and(|q| q.link == link.id())
                {
                    s.quarantine.remove(&handoff);
                }
            }
            Notice::Done => {
                let source = self.lock().sources.contains_key(&handoff);
                if source {
                    let (bytes, transfer) = self.take_served(handoff);
                    self.emit(Event::ReadDone {
                        handoff,
                        bytes,
                        transfer,
                    })
                    .await;
                }
            }
        }
    }

    /// Direct writes a peer made into this process's memory: each range is admitted and, where
    /// the writer checksummed it, its crc32c checked in place; nothing is copied.
    async fn on_landed(
        &self,
        link: &Arc<dyn Link>,
        handoff: HandoffId,
        layer: u32,
        ranges: Vec<LandedRange>,
    ) {
        let Some(region) = self.memory.host() else {
            return self
                .fail(
                    handoff,
                    Error::SegmentRejected {
                        handoff,
                        reason: "direct writes into a pool that is not host memory".into(),
                    },
                )
                .await;
        };
        let mut landed = 0;
        for r in &ranges {
            let admitted = {
                let mut s = self.lock();
                match s.inbound.get_mut(&handoff) {
                    Some(i) if i.direct && i.writer == Some(link.id()) => i
                        .coverage
                        .admit(layer, r.offset, r.len)
                        .map_err(|e| e.to_string()),
                    Some(_) => Err("direct writes from a link that did not claim it".into()),
                    None => return,
                }
            };
            if let Err(reason) = admitted {
                return self
                    .fail(handoff, Error::SegmentRejected { handoff, reason })
                    .await;
            }
            if let Some(expected) = r.crc {
                // SAFETY: the range was just admitted: inside this handoff's reserved blocks,
                // which its writer has finished (it sends Landed after the copy) and nobody
                // else touches.
                let crc = unsafe { region.bytes(r.offset, r.len as usize) }.map(crc32c::crc32c);
                if crc != Some(expected) {
                    return self
                        .fail(
                            handoff,
                            Error::PayloadCorrupt {
                                handoff,
                                expected,
                                computed: crc.unwrap_or(0),
                            },
                        )
                        .await;
                }
            }
            landed += r.len;
        }
        self.stats.frame_received();
        self.write_landed(handoff, layer, landed, Ok(())).await;
    }

    // ---- direct writers (sender side) ----

    pub(crate) async fn claim(&self, link: &Arc<dyn Link>, handoff: HandoffId) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().claims.insert((link.id(), handoff), tx);
        let frame = wire::frame(Kind::Notice, handoff, &Notice::Begin.encode())?;
        link.send_frame(frame).await?;
        let limit = self.config.handshake_timeout;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Error::UnknownHandoff(handoff)),
            Ok(Err(_)) => Err(Error::PeerClosed {
                during: "claiming a handoff",
                handoff: Some(handoff),
            }),
            Err(_) => {
                self.lock().claims.remove(&(link.id(), handoff));
                Err(Error::Timeout {
                    during: "claiming a handoff",
                    limit,
                })
            }
        }
    }

    // ---- sources (pull) ----

    pub(crate) fn offer(&self, handoff: HandoffId, source: Source) -> Result<()> {
        let needed = self.pool.layout.blocks_for(source.tokens) as usize;
        if source.tokens == 0 || source.blocks.len() < needed {
            return Err(Error::InvalidConfig {
                field: "source",
                reason: format!(
                    "{} blocks for {} tokens",
                    source.blocks.len(),
                    source.tokens
                ),
            });
        }
        let mut s = self.lock();
        if s.sources.contains_key(&handoff) {
            return Err(Error::DuplicateHandoff(handoff));
        }
        s.sources.insert(handoff, source);
        Ok(())
    }

    pub(crate) fn withdraw(&self, handoff: HandoffId) -> bool {
        let mut s = self.lock();
        s.served.remove(&handoff);
        if let Some(serving) = s.serving.remove(&handoff) {
            serving.stop.store(true, Ordering::Release);
        }
        s.sources.remove(&handoff).is_some()
    }

    /// A finished read's figures, recorded when its last byte was written.
    fn take_served(&self, handoff: HandoffId) -> (u64, Duration) {
        self.lock()
            .served
            .remove(&handoff)
            .unwrap_or((0, Duration::ZERO))
    }

    /// A reader's request: checked against the offer, then served by a task of its own (not
    /// the engine thread), which holds the source's guard while it reads.
    pub(crate) async fn on_read(
        self: &Arc<Self>,
        link: &Arc<dyn Link>,
        handoff: HandoffId,
        req: ReadRequest,
    ) {
        let checked = {
            let mut s = self.lock();
            let checked = match s.sources.get(&handoff) {
                None => Err(format!(
                    "no source {handoff} is offered (never, or its lease ended)"
                )),
                Some(src) => self.check_read(src, link.remote(), &req).map(|()| {
                    (
                        src.guard.clone(),
                        src.blocks.clone(),
                        src.completion.clone(),
                    )
                }),
            };
            if checked.is_ok() {
                let stop = Arc::new(AtomicBool::new(false));
                s.serving.insert(
                    handoff,
                    Serving {
                        link: link.id(),
                        stop: stop.clone(),
                    },
                );
                checked.map(|c| (c, stop))
            } else {
                checked.map(|c| (c, Arc::new(AtomicBool::new(false))))
            }
        };
        let ((guard, blocks, completion), stop) = match checked {
            Ok(c) => c,
            Err(reason) => {
                let error = Error::SegmentRejected {
                    handoff,
                    reason: reason.clone(),
                };
                self.rejected(Some(handoff), &error);
                self.notice(link, handoff, &Notice::Abort { reason }).await;
                return;
            }
        };
        self.emit(Event::ReadStarted { handoff }).await;
        let core = self.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let served = core.serve_read(&link, handoff, &req, &blocks, &stop).await;
            drop(guard);
            core.lock().serving.remove(&handoff);
            match served {
                Ok(bytes) if !stop.load(Ordering::Acquire) => {
                    core.lock()
                        .served
                        .insert(handoff, (bytes, started.elapsed()));
                    let complete = Notice::Complete {
                        bytes,
                        transfer_us: started.elapsed().as_micros() as u64,
                        completion,
                    };
                    core.notice(&link, handoff, &complete).await;
                }
                Ok(_) => core.notice(&link, handoff, &Notice::Stopped).await,
                Err(error) => {
                    core.notice(
                        &link,
                        handoff,
                        &Notice::Abort {
                            reason: error.to_string(),
                        },
                    )
                    .await;
                    core.emit(Event::ReadFailed { handoff, error }).await;
                }
            }
        });
    }

    fn check_read(
        &self,
        src: &Source,
        reader: &Hello,
        req: &ReadRequest,
    ) -> std::result::Result<(), String> {
        let mine = &self.pool.layout;
        let theirs = &reader.pool.layout;
        if req.source_blocks != src.blocks || req.tokens != src.tokens {
            return Err("the request names other blocks or tokens than the source holds".into());
        }
        if req.layers.is_empty()
            || req.layers.start < mine.layers.start.max(theirs.layers.start)
            || req.layers.end > mine.layers.end.min(theirs.layers.end)
        {
            return Err(format!(
                "layers {:?} are not held by both pools",
                req.layers
            ));
        }
        if req.heads.is_empty()
            || req.heads.start < mine.kv_heads.start.max(theirs.kv_heads.start)
            || req.heads.end > mine.kv_heads.end.min(theirs.kv_heads.end)
        {
            return Err(format!(
                "kv heads {:?} are not held by both pools",
                req.heads
            ));
        }
        let needed = mine.blocks_for(req.tokens) as usize;
        if req.first_block as usize >= needed {
            return Err(format!(
                "first block {} leaves nothing of {needed} blocks to read",
                req.first_block
            ));
        }
        if req.dest_blocks.len() < needed
            || req
                .dest_blocks
                .iter()
                .any(|b| b.0 >= reader.pool.num_blocks)
        {
            return Err("destination blocks missing or outside the reader's pool".into());
        }
        Ok(())
    }

    async fn serve_read(
        &self,
        link: &Arc<dyn Link>,
        handoff: HandoffId,
        req: &ReadRequest,
        blocks: &[baton_core::BlockId],
        stop: &AtomicBool,
    ) -> Result<u64> {
        let blocks_range = req.first_block..self.pool.layout.blocks_for(req.tokens);
        let src = SeqBlocks {
            pool: &self.pool,
            blocks,
        };
        let remote_pool = link.remote().pool.clone();
        let dst = SeqBlocks {
            pool: &remote_pool,
            blocks: &req.dest_blocks,
        };
        let mut bytes = 0;
        let mut copies = Vec::new();
        for layer in req.layers.clone() {
            if stop.load(Ordering::Acquire) || link.is_closed() {
                break;
            }
            copies.clear();
            layer_copies(
                layer,
                &req.heads,
                &blocks_range,
                req.tokens,
                src,
                dst,
                &mut copies,
            );
            bytes += copies.iter().map(|c| c.len).sum::<u64>();
            if link.direct() {
                let region = self.memory.host().ok_or_else(|| Error::InvalidConfig {
                    field: "kv pool",
                    reason: "direct copies need the pool in host memory".into(),
                })?;
                let ranges = link.copy_direct(region, &copies)?;
                let frame = wire::frame(
                    Kind::Notice,
                    handoff,
                    &Notice::Landed { layer, ranges }.encode(),
                )?;
                link.send_frame(frame).await?;
            } else if let Some(region) = self.memory.host() {
                // SAFETY: the source's blocks are pinned by the guard the caller holds; the
                // engine does not write a pinned sequence.
                let pieces: Vec<(u64, &[u8])> = copies
                    .iter()
                    .map(|c| unsafe { region.bytes(c.src, c.len as usize) }.map(|b| (c.dst, b)))
                    .collect::<Option<_>>()
                    .ok_or(Error::Io {
                        during: "reading the source's blocks",
                        source: std::io::Error::other("a copy lies outside the pool"),
                    })?;
                link.write_frames(handoff, layer, &pieces).await?;
            } else {
                let mut owned = Vec::with_capacity(copies.len());
                for c in &copies {
                    let mut buf = vec![0u8; c.len as usize];
                    self.memory.read(c.src, &mut buf)?;
                    owned.push((c.dst, buf));
                }
                let pieces: Vec<(u64, &[u8])> =
                    owned.iter().map(|(o, b)| (*o, b.as_slice())).collect();
                link.write_frames(handoff, layer, &pieces).await?;
            }
        }
        self.stats.add_sent(bytes as usize);
        Ok(bytes)
    }

    // ---- links ----

    /// A link closed: what it was writing fails, quarantines it held end, claims on it fail,
    /// reads it asked for stop.
    pub(crate) async fn link_closed(&self, id: u64) {
        let failed: Vec<HandoffId> = {
            let mut s = self.lock();
            s.links.remove(&id);
            s.quarantine.retain(|_, q| q.link != id);
            s.claims.retain(|(link, _), _| *link != id);
            for serving in s.serving.values() {
                if serving.link == id {
                    serving.stop.store(true, Ordering::Release);
                }
            }
            s.serving.retain(|_, v| v.link != id);
            s.inbound
                .iter()
                .filter(|(_, i)| i.writer == Some(id))
                .map(|(h, _)| *h)
                .collect()
        };
        for handoff in failed {
            self.fail(
                handoff,
                Error::PeerClosed {
                    during: "a kv handoff",
                    handoff: Some(handoff),
                },
            )
            .await;
        }
    }
}
