//! The decode worker's engine thread: the one owner of the batcher, its engine and block pool.
//!
//! service --Command (bounded)--> [engine thread] <--Delivery-- kv receivers (TCP, shm)
//!     [reservations under lease -> imports -> continuous batching] --DecodeEvent--> streams
//!
//! A handoff's life here: `Reserve` pins blocks under a lease and tells the receiver to expect
//! the handoff; verified segments are imported as they arrive (each renews the lease);
//! `Complete` finishes the import; `Decode` (which may come before or after) starts decoding
//! from the prefill worker's first token. A failed or expired handoff frees its blocks at once
//! and, by `kv_failure_policy`, fails its stream or recomputes the prompt here.
//!
//! Invariants: only this thread touches the engine; a sequence's blocks are freed exactly once
//! (finished, cancelled, failed, released or expired); a stream whose client went away is
//! cancelled before the next step.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_engine::batch::Batcher;
use baton_engine::batch::{Event, GenerateRequest};
use baton_engine::{FinishReason, SampledToken, SamplingParams, SeqId};
use baton_kv_transfer::{Delivery, Expectation, HandoffId, KvReceiver, LeaseKind, Leases};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::KvFailurePolicy;
use crate::error::{Error, Result};

/// Where a decode job's prompt KV comes from.
#[derive(Debug, Clone)]
pub enum DecodeSource {
    /// Imported under `handoff` (reserved earlier); the prefill worker sampled `first_token`.
    Imported {
        handoff: HandoffId,
        first_token: SampledToken,
    },
    /// Aggregated: this worker prefills the prompt too.
    Prompt { prompt: Vec<u32> },
}

/// What a decode stream receives.
#[derive(Debug)]
pub enum DecodeEvent {
    /// The imported KV landed and verified; `bytes` of KV payload were imported.
    KvLanded {
        bytes: u64,
        transfer: Duration,
    },
    /// The handoff failed and the prompt is being recomputed here (`kv_failure_policy =
    /// recompute`).
    Recomputing {
        reason: String,
    },
    Token {
        token: SampledToken,
        finish: Option<FinishReason>,
    },
    Failed(Error),
}

/// The engine's load, for routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub running: u32,
    pub waiting: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    pub leases: u32,
}

/// Counters the engine thread keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub handoffs_ok: u64,
    pub handoffs_failed: u64,
    pub handoffs_expired: u64,
    pub handoffs_recomputed: u64,
    pub kv_bytes_imported: u64,
    pub preemptions: u64,
    pub cancelled: u64,
}

enum Command {
    Reserve {
        handoff: HandoffId,
        prompt: Vec<u32>,
        ttl: Duration,
        receiver: usize,
        reply: oneshot::Sender<Result<u32>>,
    },
    Decode {
        source: DecodeSource,
        params: SamplingParams,
        events: mpsc::Sender<DecodeEvent>,
        reply: oneshot::Sender<Result<()>>,
    },
    Abandon {
        handoff: HandoffId,
        error: String,
    },
    Release {
        handoff: HandoffId,
        reply: oneshot::Sender<bool>,
    },
    Renew {
        handoff: HandoffId,
        reply: oneshot::Sender<bool>,
    },
    /// The server has stopped: end the engine thread even if handles remain (connection tasks
    /// of a stopped server may outlive it).
    Stop,
    /// Drain deadline: fail every stream and reservation, free their blocks.
    AbortAll,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
}

/// What the engine thread publishes after each turn of its loop: for metrics, and for a drain
/// waiting until nothing is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub load: Load,
    pub stats: LoopStats,
    /// No stream, reservation or lease is left.
    pub idle: bool,
}

impl EngineHandle {
    /// Pins blocks for `prompt` under a lease and expects `handoff` on receiver `receiver`.
    /// Returns the number of blocks reserved.
    pub async fn reserve(
        &self,
        handoff: HandoffId,
        prompt: Vec<u32>,
        ttl: Duration,
        receiver: usize,
    ) -> Result<u32> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Reserve {
            handoff,
            prompt,
            ttl,
            receiver,
            reply,
        })?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Starts a decode stream; events arrive on the returned channel, whose capacity covers
    /// every event the job can produce, so the engine never waits on a slow client.
    pub async fn decode(
        &self,
        source: DecodeSource,
        params: SamplingParams,
    ) -> Result<mpsc::Receiver<DecodeEvent>> {
        let (events, rx) = mpsc::channel(params.max_new_tokens as usize + 4);
        let (reply, done) = oneshot::channel();
        self.submit(Command::Decode {
            source,
            params,
            events,
            reply,
        })?;
        done.await.map_err(|_| Error::Stopped)??;
        Ok(rx)
    }

    /// Fails a handoff from outside (the pull read failed).
    pub async fn abandon(&self, handoff: HandoffId, error: String) -> Result<()> {
        self.tx
            .send(Command::Abandon { handoff, error })
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Drops a reservation that will not be decoded. Returns whether it was live.
    pub async fn release(&self, handoff: HandoffId) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Release { handoff, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Extends a reservation's lease by its TTL. Returns whether it was live.
    pub async fn renew(&self, handoff: HandoffId) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Renew { handoff, reply })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// The load as of the engine thread's last turn, from its published snapshot: a load report
    /// never queues behind an engine step (a long prefill chunk on a busy core would otherwise
    /// hold it for seconds and make the worker look dead to the coordinator's poll).
    pub fn load(&self) -> Result<(Load, LoopStats)> {
        if self.snapshot.has_changed().is_err() {
            return Err(Error::Stopped);
        }
        let now = *self.snapshot.borrow();
        Ok((now.load, now.stats))
    }

    /// Resolves when no stream, reservation or lease is left (at once if none is).
    pub async fn wait_idle(&self) {
        let mut snapshot = self.snapshot.clone();
        // An error means the engine thread ended, which leaves nothing running either.
        let _ = snapshot.wait_for(|s| s.idle).await;
    }

    /// The engine's load and counters as of its last turn.
    pub fn snapshot(&self) -> Snapshot {
        *self.snapshot.borrow()
    }

    /// Follows the snapshots (for a metrics collector).
    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    /// Ends the engine thread (after the server stopped), failing whatever is left.
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }

    /// Fails every stream with [`Error::DrainDeadline`] and frees every reservation.
    pub async fn abort_all(&self) -> Result<()> {
        self.tx
            .send(Command::AbortAll)
            .await
            .map_err(|_| Error::Stopped)
    }

    fn submit(&self, cmd: Command) -> Result<()> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                what: "decode command queue",
            },
            mpsc::error::TrySendError::Closed(_) => Error::Stopped,
        })
    }
}

/// Engine-thread settings.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub queue_capacity: usize,
    /// Most streams (decoding or waiting for their KV) at once.
    pub max_streams: usize,
    pub max_lease_ttl: Duration,
    pub kv_failure_policy: KvFailurePolicy,
}

/// Starts the engine thread. `receivers` are the KV receivers (index = `Reserve`'s `receiver`),
/// `deliveries` their merged output.
pub fn spawn(
    batcher: Batcher,
    receivers: Vec<Arc<dyn KvReceiver>>,
    deliveries: mpsc::Receiver<Delivery>,
    config: LoopConfig,
    rt: Handle,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let (published, snapshot) = watch::channel(Snapshot::default());
    let mut state = Loop {
        stopped: false,
        published,
        leases: Leases::new(config.max_lease_ttl),
        batcher,
        receivers,
        imports: HashMap::new(),
        streams: HashMap::new(),
        next_seq: 0,
        config,
        stats: LoopStats::default(),
        rx,
        deliveries,
        rt,
    };
    // The real state before anyone can read it: a load report taken before the thread's first
    // turn would otherwise say no block is free, and the coordinator, which sees the worker
    // healthy, would place nothing on it until its next poll.
    state.published.send_replace(state.snapshot());
    let join = std::thread::Builder::new()
        .name("decode-engine".into())
        .spawn(move || state.run())?;
    Ok((EngineHandle { tx, snapshot }, join))
}

/// A decode job waiting for its KV to land.
struct Parked {
    first_token: SampledToken,
    params: SamplingParams,
    events: mpsc::Sender<DecodeEvent>,
}

/// A handoff whose KV is arriving.
struct Import {
    seq: SeqId,
    receiver: usize,
    prompt: Vec<u32>,
    reserved: Instant,
    landed: bool,
    failed: Option<String>,
    bytes: u64,
    parked: Option<Parked>,
}

struct Loop {
    /// Set by `Stop`: the loop ends at its next turn.
    stopped: bool,
    published: watch::Sender<Snapshot>,
    batcher: Batcher,
    receivers: Vec<Arc<dyn KvReceiver>>,
    leases: Leases<()>,
    imports: HashMap<HandoffId, Import>,
    streams: HashMap<SeqId, mpsc::Sender<DecodeEvent>>,
    next_seq: u64,
    config: LoopConfig,
    stats: LoopStats,
    rx: mpsc::Receiver<Command>,
    deliveries: mpsc::Receiver<Delivery>,
    rt: Handle,
}

enum Woken {
    Command(Command),
    Delivery(Delivery),
    Timeout,
    Closed,
}

impl Loop {
    fn run(&mut self) {
        loop {
            if self.stopped {
                return self.shutdown();
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.shutdown(),
                }
            }
            while let Ok(d) = self.deliveries.try_recv() {
                self.deliver(d);
            }
            self.expire(Instant::now());
            self.cancel_abandoned_streams();
            let now = self.snapshot();
            self.published
                .send_if_modified(|was| std::mem::replace(was, now) != now);
            if self.batcher.is_idle() {
                match self.wait() {
                    Woken::Command(c) => self.handle(c),
                    Woken::Delivery(d) => self.deliver(d),
                    Woken::Timeout => {}
                    Woken::Closed => return self.shutdown(),
                }
                continue;
            }
            self.step();
        }
    }

    fn wait(&mut self) -> Woken {
        let deadline = self.leases.next_deadline();
        let (rx, deliveries) = (&mut self.rx, &mut self.deliveries);
        self.rt.block_on(async {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                c = rx.recv() => c.map_or(Woken::Closed, Woken::Command),
                Some(d) = deliveries.recv() => Woken::Delivery(d),
                () = sleep => Woken::Timeout,
            }
        })
    }

    fn shutdown(&mut self) {
        self.abort_all(|| Error::Stopped);
    }

    /// Fails every stream with `error()` and forgets every reservation, freeing their blocks.
    fn abort_all(&mut self, error: impl Fn() -> Error) {
        for (seq, events) in self.streams.drain() {
            self.batcher.cancel(seq);
            let _ = events.try_send(DecodeEvent::Failed(error()));
        }
        let handoffs: Vec<HandoffId> = self.imports.keys().copied().collect();
        for h in handoffs {
            if let Some(parked) = self.imports.get_mut(&h).and_then(|i| i.parked.take()) {
                let _ = parked.events.try_send(DecodeEvent::Failed(error()));
            }
            self.drop_import(h);
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Reserve {
                handoff,
                prompt,
                ttl,
                receiver,
                reply,
            } => {
                let _ = reply.send(self.reserve(handoff, prompt, ttl, receiver));
            }
            Command::Decode {
                source,
                params,
                events,
                reply,
            } => {
                let _ = reply.send(self.start(source, params, events));
            }
            Command::Abandon { handoff, error } => self.fail_import(handoff, error, false),
            Command::Release { handoff, reply } => {
                let live = self.imports.contains_key(&handoff);
                self.drop_import(handoff);
                let _ = reply.send(live);
            }
            Command::Renew { handoff, reply } => {
                let _ = reply.send(self.leases.renew(handoff, Instant::now()));
            }
            Command::Stop => self.stopped = true,
            Command::AbortAll => {
                let (streams, handoffs) = (self.streams.len(), self.imports.len());
                self.abort_all(|| Error::DrainDeadline);
                tracing::warn!(
                    streams,
                    handoffs,
                    "drain deadline passed: streams failed, reservations freed"
                );
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        let engine = self.batcher.engine();
        let mut stats = self.stats;
        stats.preemptions = self.batcher.stats().preemptions;
        Snapshot {
            load: Load {
                running: self.batcher.num_running() as u32,
                waiting: (self.batcher.num_waiting() + self.imports.len()) as u32,
                free_blocks: engine.free_blocks() as u32,
                total_blocks: engine.total_blocks() as u32,
                leases: self.leases.len() as u32,
            },
            stats,
            idle: self.streams.is_empty() && self.imports.is_empty() && self.leases.is_empty(),
        }
    }

    fn busy(&self) -> usize {
        self.streams.len() + self.imports.len()
    }

    fn reserve(
        &mut self,
        handoff: HandoffId,
        prompt: Vec<u32>,
        ttl: Duration,
        receiver: usize,
    ) -> Result<u32> {
        if self.busy() >= self.config.max_streams {
            return Err(Error::Overloaded {
                what: "decode worker's stream table",
            });
        }
        if self.imports.contains_key(&handoff) {
            return Err(Error::InvalidRequest {
                field: "handoff_id",
                reason: format!("{handoff} is already reserved"),
            });
        }
        let rx = self
            .receivers
            .get(receiver)
            .cloned()
            .ok_or(Error::InvalidRequest {
                field: "transport",
                reason: "this decode worker does not receive over that transport".into(),
            })?;
        let engine = self.batcher.engine_mut();
        let needed = engine.blocks_for(prompt.len());
        if needed > engine.free_blocks() {
            return Err(Error::Overloaded {
                what: "decode worker's kv pool",
            });
        }
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        engine.begin_import(seq, prompt.clone())?;
        let expectation = Expectation::whole_sequence(engine.descriptor(), prompt.len() as u32);
        let now = Instant::now();
        let undo = |engine: &mut baton_engine::Engine| {
            engine.release(seq);
        };
        if let Err(e) = self
            .leases
            .grant(handoff, LeaseKind::PushReservation, ttl, now, ())
        {
            undo(self.batcher.engine_mut());
            return Err(Error::InvalidRequest {
                field: "ttl_ms",
                reason: e.to_string(),
            });
        }
        if let Err(e) = rx.expect(handoff, expectation) {
            self.leases.release(handoff);
            undo(self.batcher.engine_mut());
            return Err(e.into());
        }
        self.imports.insert(
            handoff,
            Import {
                seq,
                receiver,
                prompt,
                reserved: now,
                landed: false,
                failed: None,
                bytes: 0,
                parked: None,
            },
        );
        Ok(needed as u32)
    }

    fn start(
        &mut self,
        source: DecodeSource,
        params: SamplingParams,
        events: mpsc::Sender<DecodeEvent>,
    ) -> Result<()> {
        match source {
            DecodeSource::Prompt { prompt } => {
                if self.busy() >= self.config.max_streams {
                    return Err(Error::Overloaded {
                        what: "decode worker's stream table",
                    });
                }
                let seq = SeqId(self.next_seq);
                self.next_seq += 1;
                self.batcher.submit(GenerateRequest {
                    id: seq,
                    prompt,
                    params,
                })?;
                self.streams.insert(seq, events);
                Ok(())
            }
            DecodeSource::Imported {
                handoff,
                first_token,
            } => {
                let import = self
                    .imports
                    .get_mut(&handoff)
                    .ok_or(Error::UnknownHandoff(handoff))?;
                if import.parked.is_some() {
                    return Err(Error::InvalidRequest {
                        field: "handoff_id",
                        reason: format!("{handoff} is already being decoded"),
                    });
                }
                import.parked = Some(Parked {
                    first_token,
                    params,
                    events,
                });
                if import.landed || import.failed.is_some() {
                    self.resume(handoff);
                }
                Ok(())
            }
        }
    }

    /// Moves a landed (or failed) import with a parked decode job into the batcher.
    fn resume(&mut self, handoff: HandoffId) {
        if self
            .imports
            .get(&handoff)
            .is_none_or(|i| i.parked.is_none())
        {
            return;
        }
        let Some(Import {
            seq,
            prompt,
            reserved,
            failed,
            bytes,
            parked: Some(parked),
            ..
        }) = self.imports.remove(&handoff)
        else {
            return;
        };
        // From here the stream owns the sequence; no lease pins it.
        self.leases.release(handoff);
        if let Some(reason) = failed {
            self.batcher.engine_mut().release(seq);
            match self.config.kv_failure_policy {
                KvFailurePolicy::Fail => {
                    let _ = parked
                        .events
                        .try_send(DecodeEvent::Failed(Error::Handoff(reason)));
                }
                KvFailurePolicy::Recompute => {
                    self.stats.handoffs_recomputed += 1;
                    tracing::warn!(%handoff, %reason, "kv handoff failed; recomputing the prompt on the decode worker");
                    let _ = parked.events.try_send(DecodeEvent::Recomputing { reason });
                    let result = self.batcher.submit_continuation(
                        seq,
                        prompt,
                        parked.params,
                        parked.first_token.id,
                    );
                    match result {
                        Ok(()) => {
                            self.streams.insert(seq, parked.events);
                        }
                        Err(e) => {
                            let _ = parked.events.try_send(DecodeEvent::Failed(e.into()));
                        }
                    }
                }
            }
            return;
        }
        let _ = parked.events.try_send(DecodeEvent::KvLanded {
            bytes,
            transfer: reserved.elapsed(),
        });
        match self
            .batcher
            .resume_imported(seq, parked.params, parked.first_token.id)
        {
            Ok(()) => {
                self.streams.insert(seq, parked.events);
            }
            Err(e) => {
                self.batcher.engine_mut().release(seq);
                let _ = parked.events.try_send(DecodeEvent::Failed(e.into()));
            }
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::Segment(seg) => {
                let Some(import) = self.imports.get_mut(&seg.handoff) else {
                    return;
                };
                if import.failed.is_some() {
                    return;
                }
                let (seq, receiver) = (import.seq, import.receiver);
                let len = seg.chunk.data.len() as u64;
                let imported = self.batcher.engine_mut().import(seq, &seg.chunk);
                // The bytes now live in the block pool; the receiver copies a later frame into
                // the buffer instead of faulting in a fresh one.
                if let Some(rx) = self.receivers.get(receiver) {
                    rx.recycle(seg.chunk.data);
                }
                match imported {
                    Ok(()) => {
                        if let Some(import) = self.imports.get_mut(&seg.handoff) {
                            import.bytes += len;
                        }
                        self.stats.kv_bytes_imported += len;
                        self.leases.renew(seg.handoff, Instant::now());
                    }
                    Err(e) => self.fail_import(seg.handoff, e.to_string(), true),
                }
            }
            Delivery::Complete(handoff) => {
                let Some(import) = self.imports.get_mut(&handoff) else {
                    return;
                };
                let seq = import.seq;
                match self.batcher.engine_mut().finish_import(seq) {
                    Ok(()) => {
                        self.stats.handoffs_ok += 1;
                        if let Some(import) = self.imports.get_mut(&handoff) {
                            import.landed = true;
                            if import.parked.is_some() {
                                self.resume(handoff);
                            }
                        }
                    }
                    Err(e) => self.fail_import(handoff, e.to_string(), true),
                }
            }
            Delivery::Failed { handoff, error } => {
                self.fail_import(handoff, error.to_string(), false);
            }
            Delivery::Rejected { handoff, error } => {
                tracing::warn!(?handoff, %error, "kv frame rejected");
            }
        }
    }

    /// Marks a handoff failed: its bytes are never decoded from. `cancel_receiver` stops the
    /// receiver expecting more of it (the receiver already did when it reported the failure).
    fn fail_import(&mut self, handoff: HandoffId, reason: String, cancel_receiver: bool) {
        let Some(import) = self.imports.get_mut(&handoff) else {
            return;
        };
        if import.failed.is_some() {
            return;
        }
        tracing::warn!(%handoff, %reason, "kv handoff failed");
        self.stats.handoffs_failed += 1;
        import.failed = Some(reason);
        import.landed = false;
        let (seq, receiver) = (import.seq, import.receiver);
        if cancel_receiver && let Some(rx) = self.receivers.get(receiver) {
            rx.cancel(handoff);
        }
        if self
            .imports
            .get(&handoff)
            .is_some_and(|i| i.parked.is_some())
        {
            self.resume(handoff);
        } else {
            // No stream yet: free the blocks now; the reservation stays known (without blocks)
            // until its lease ends, so a late Decode gets the failure rather than "unknown".
            self.batcher.engine_mut().release(seq);
        }
    }

    /// Forgets a handoff and frees whatever it holds.
    fn drop_import(&mut self, handoff: HandoffId) {
        self.leases.release(handoff);
        if let Some(import) = self.imports.remove(&handoff) {
            if let Some(rx) = self.receivers.get(import.receiver) {
                rx.cancel(handoff);
            }
            self.batcher.engine_mut().release(import.seq);
            if let Some(parked) = import.parked {
                let _ = parked
                    .events
                    .try_send(DecodeEvent::Failed(Error::Cancelled));
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        for (handoff, _, ()) in self.leases.expire(now) {
            let Some(import) = self.imports.get(&handoff) else {
                continue;
            };
            if import.failed.is_some() && import.parked.is_none() {
                // A failure nobody claimed: forget it.
                self.imports.remove(&handoff);
                continue;
            }
            self.stats.handoffs_expired += 1;
            tracing::warn!(%handoff, "kv reservation lease expired; blocks freed");
            if import.parked.is_some() {
                self.fail_import(
                    handoff,
                    format!("{handoff} expired before its kv landed"),
                    true,
                );
            } else {
                self.drop_import(handoff);
            }
        }
    }

    fn cancel_abandoned_streams(&mut self) {
        let gone: Vec<SeqId> = self
            .streams
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(seq, _)| *seq)
            .collect();
        for seq in gone {
            self.streams.remove(&seq);
            self.batcher.cancel(seq);
            self.stats.cancelled += 1;
            tracing::debug!(%seq, "client went away; stream cancelled and blocks freed");
        }
        let parked_gone: Vec<HandoffId> = self
            .imports
            .iter()
            .filter(|(_, i)| i.parked.as_ref().is_some_and(|p| p.events.is_closed()))
            .map(|(h, _)| *h)
            .collect();
        for h in parked_gone {
            self.stats.cancelled += 1;
            self.drop_import(h);
        }
    }

    fn step(&mut self) {
        let events = match self.batcher.step() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "decode step failed; failing every stream");
                let msg = e.to_string();
                for (seq, events) in self.streams.drain() {
                    self.batcher.cancel(seq);
                    let _ = events.try_send(DecodeEvent::Failed(Error::Internal(msg.clone())));
                }
                return;
            }
        };
        for ev in events {
            match ev {
                Event::Token { seq, token, finish } => {
                    let Some(tx) = self.streams.get(&seq) else {
                        continue;
                    };
                    if tx.try_send(DecodeEvent::Token { token, finish }).is_err() {
                        self.batcher.cancel(seq);
                        self.streams.remove(&seq);
                        continue;
                    }
                    if finish.is_some() {
                        self.streams.remove(&seq);
                    }
                }
                Event::Failed { seq, error } => {
                    if let Some(tx) = self.streams.remove(&seq) {
                        let _ = tx.try_send(DecodeEvent::Failed(Error::Internal(error)));
                    }
                }
            }
        }
    }
}
