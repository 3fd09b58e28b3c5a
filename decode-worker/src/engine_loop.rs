//! The decode worker's engine thread: the one owner of the batcher, its engine and block pool,
//! and of every handoff landing here.
//!
//! ```text
//! service --Command (bounded)--> [engine thread] <--agent Event-- transfer agent (tcp, shm)
//!   push: reserve blocks, expect the handoff; the descriptor goes back to the coordinator
//!   pull: reserve blocks, expect the handoff, ask the source agent to write them
//!   each handoff: handoff::Handoff (pure) decides; this loop does what it says
//!   Arrived -> the blocks become a decoding sequence -> DecodeEvent --> response stream
//! ```
//!
//! Invariants: only this thread touches the engine; reserved blocks are held by a
//! [`Reservation`] shared with the agent, so they return to the pool when the last holder drops
//! it, never while a transport may still write them; a stream whose client went away is
//! cancelled before the next step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::{HandoffId, RequestId};
use baton_engine::batch::{Batcher, Event, GenerateRequest};
use baton_engine::{BlockTable, FinishReason, SampledToken, SamplingParams, SeqId};
use baton_kv_transfer::agent::{
    Agent, BlockDescriptor, Event as AgentEvent, Expectation, Guard, Transport,
};
use baton_kv_transfer::plan;
use baton_kv_transfer::wire::ReadRequest;
use baton_worker::Control;
use baton_worker::engine::{EngineEnds, EngineHandle, publish};
use prost::Message as _;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::KvFailurePolicy;
use crate::error::{Error, Result};
use crate::handoff::{Action, Event as HandoffEvent, Handoff};

/// Where a decode job's prompt KV comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Push: reserve blocks now; the prefill worker writes them.
    Push {
        handoff: HandoffId,
        prompt: Vec<u32>,
        ttl: Duration,
    },
    /// Pull: reserve blocks and read them from the prefill worker's pinned source.
    Pull {
        handoff: HandoffId,
        prompt: Vec<u32>,
        source: BlockDescriptor,
        transport: Transport,
        ttl: Duration,
    },
    /// Aggregated: this worker prefills the prompt too.
    Prompt { prompt: Vec<u32> },
}

/// What the transfer moved, as both ends counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Landed {
    /// KV bytes verified into this pool.
    pub bytes: u64,
    /// From reservation to the last byte.
    pub transfer: Duration,
    /// The sender's count of the bytes it sent.
    pub sender_bytes: u64,
    /// The sender's transfer time.
    pub sender_transfer: Duration,
    /// The sender's time from the end of its compute to its last byte.
    pub sender_exposed: Duration,
    /// Prompt tokens (whole blocks) this worker's prefix cache already held: they did not move.
    pub cached_tokens: u32,
    /// Their KV bytes: what the transfer would have moved without the cache.
    pub cached_bytes: u64,
}

/// What a decode stream receives.
#[derive(Debug)]
pub enum DecodeEvent {
    /// The handoff's KV landed and was verified.
    KvLanded(Landed),
    /// The handoff failed and the prompt was recomputed here (`kv_failure_policy =
    /// recompute`): the first token this worker sampled, which the stream does not repeat.
    Recomputed {
        first_token: SampledToken,
        reason: String,
        /// Set when that token also ended the generation (the coordinator normally ends such a
        /// request before any decode worker sees it).
        finish: Option<FinishReason>,
    },
    Token {
        token: SampledToken,
        finish: Option<FinishReason>,
        /// On an aggregated sequence's first token: prompt tokens the prefix cache supplied.
        cached: Option<u32>,
    },
    Failed(Error),
}

/// How a Decode call started.
#[derive(Debug)]
pub struct Started {
    /// The stream's key, for [`EngineHandle::cancel`].
    pub stream: SeqId,
    /// Push: the reserved blocks, for the coordinator to hand the prefill worker.
    pub reserved: Option<BlockDescriptor>,
}

/// The engine's load, for routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub running: u32,
    pub waiting: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    /// Handoffs whose blocks are reserved and landing.
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
    /// KV bytes (and prompt tokens) handoffs did not move because this worker's prefix cache
    /// held them.
    pub kv_bytes_cached: u64,
    pub kv_tokens_cached: u64,
    pub preemptions: u64,
    pub cancelled: u64,
    /// Streams migrated here from a decode worker that died, the tokens they replayed, and the
    /// replayed tokens this worker would have drawn differently.
    pub migrated_in: u64,
    pub replayed_tokens: u64,
    pub replay_divergences: u64,
}

/// What the engine thread publishes after each turn: for load reports, metrics and the drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub load: Load,
    pub stats: LoopStats,
    pub prefix: baton_telemetry::PrefixCacheCounts,
    /// No stream or reservation is left.
    pub idle: bool,
}

impl baton_worker::Snapshot for Snapshot {
    fn idle(&self) -> bool {
        self.idle
    }

    fn describe(&self) -> String {
        format!(
            "streams={} free_blocks={} total_blocks={} leases={}",
            self.load.running + self.load.waiting,
            self.load.free_blocks,
            self.load.total_blocks,
            self.load.leases
        )
    }
}

pub enum Command {
    Decode(Box<DecodeJob>),
    /// The stream's client went away.
    Cancel {
        stream: SeqId,
    },
    /// Stop, or the drain deadline (fail every stream and reservation, free their blocks).
    Control(Control),
}

impl From<Control> for Command {
    fn from(c: Control) -> Self {
        Command::Control(c)
    }
}

/// A Decode call for the engine thread.
pub struct DecodeJob {
    request: RequestId,
    source: Source,
    params: SamplingParams,
    /// Tokens the client already has from a decode worker that died (the first one included):
    /// replayed as decode steps before anything is streamed.
    replay: Vec<u32>,
    events: mpsc::Sender<DecodeEvent>,
    reply: oneshot::Sender<Result<Started>>,
}

/// Reserved blocks, shared between the engine thread and the transfer agent: they return to
/// the pool when the last holder drops its `Arc`, or become a sequence's when the engine
/// thread takes them.
#[derive(Debug)]
pub struct Reservation(Mutex<Option<BlockTable>>);

impl Reservation {
    fn take(&self) -> Option<BlockTable> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The service's handle to the engine thread.
#[derive(Clone)]
pub struct DecodeEngine {
    inner: EngineHandle<Command, Snapshot>,
}

impl DecodeEngine {
    /// Starts a decode stream; events arrive on the returned channel, whose capacity covers
    /// every event the job can produce, so the engine never waits on a slow client.
    pub async fn decode(
        &self,
        request: RequestId,
        source: Source,
        params: SamplingParams,
        replay: Vec<u32>,
    ) -> Result<(Started, mpsc::Receiver<DecodeEvent>)> {
        let (events, rx) = mpsc::channel(params.max_new_tokens as usize + 4);
        let (reply, done) = oneshot::channel();
        self.inner
            .submit(Command::Decode(Box::new(DecodeJob {
                request,
                source,
                params,
                replay,
                events,
                reply,
            })))
            .map_err(refused)?;
        let started = done.await.map_err(|_| Error::Stopped)??;
        Ok((started, rx))
    }

    /// The stream's client went away: its blocks go before the next step.
    pub async fn cancel(&self, stream: SeqId) {
        let _ = self.inner.send(Command::Cancel { stream }).await;
    }

    /// The load as of the engine thread's last turn, from its published snapshot: a load report
    /// never queues behind an engine step.
    pub fn load(&self) -> Result<(Load, LoopStats)> {
        let s = self.inner.current().map_err(refused)?;
        Ok((s.load, s.stats))
    }

    /// The generic handle: the drain's view of the engine thread.
    pub fn handle(&self) -> EngineHandle<Command, Snapshot> {
        self.inner.clone()
    }

    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.inner.snapshots()
    }
}

fn refused(r: baton_worker::Refused) -> Error {
    match r {
        baton_worker::Refused::Full => Error::Overloaded {
            what: "decode command queue",
        },
        baton_worker::Refused::Stopped => Error::Stopped,
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
    /// Where the engine's prefix-cache changes go after each turn, for load reports.
    pub kv_log: baton_worker::KvLog,
}

/// Starts the engine thread. It stops when every handle is dropped or on `Stop`.
pub fn spawn(
    batcher: Batcher,
    agent: Agent,
    agent_events: mpsc::Receiver<AgentEvent>,
    config: LoopConfig,
    rt: Handle,
) -> std::io::Result<(DecodeEngine, std::thread::JoinHandle<()>)> {
    let (feedback_tx, feedback) = mpsc::channel(config.max_streams.max(1) * 2);
    batcher.engine().record_kv_events();
    let mut state = Loop {
        stopped: false,
        batcher,
        agent,
        handoffs: HashMap::new(),
        streams: HashMap::new(),
        recomputing: HashMap::new(),
        next_seq: 0,
        config,
        stats: LoopStats::default(),
        feedback_tx,
        rt,
    };
    let (inner, ends) = EngineHandle::new(state.config.queue_capacity, state.snapshot());
    let join = std::thread::Builder::new()
        .name("decode-engine".into())
        .spawn(move || state.run(ends, agent_events, feedback))?;
    Ok((DecodeEngine { inner }, join))
}

/// A handoff whose KV is landing, and the job that waits for it.
struct Landing {
    machine: Handoff,
    request: RequestId,
    seq: SeqId,
    prompt: Vec<u32>,
    reservation: Arc<Reservation>,
    params: SamplingParams,
    /// The migrated stream's tokens so far; the first must be the one the sender sampled.
    replay: Vec<u32>,
    events: mpsc::Sender<DecodeEvent>,
    reserved_at: Instant,
    /// This worker reads the KV (pull): the read starts after the prefill ended, so all of
    /// it is exposed, whatever the source's completion says.
    pulled: bool,
    /// The prompt's first tokens this worker's prefix cache held, and their bytes.
    cached_tokens: u32,
    cached_bytes: u64,
}

/// Why the loop woke up.
enum Woken {
    Command(Command),
    Agent(AgentEvent),
    Feedback(Feedback),
    Timeout,
    Closed,
}

/// What tasks the loop started report back.
enum Feedback {
    /// Asking the source agent to write a pulled handoff failed.
    ReadFailed { handoff: HandoffId, reason: String },
}

struct Loop {
    stopped: bool,
    batcher: Batcher,
    agent: Agent,
    handoffs: HashMap<HandoffId, Landing>,
    /// Decoding (or recomputing) sequences and their streams.
    streams: HashMap<SeqId, mpsc::Sender<DecodeEvent>>,
    /// Sequences recomputed after a failed handoff, and why: their first token is not the
    /// stream's.
    recomputing: HashMap<SeqId, String>,
    next_seq: u64,
    config: LoopConfig,
    stats: LoopStats,
    feedback_tx: mpsc::Sender<Feedback>,
    rt: Handle,
}

impl Loop {
    fn run(
        &mut self,
        mut ends: EngineEnds<Command, Snapshot>,
        mut agent_events: mpsc::Receiver<AgentEvent>,
        mut feedback: mpsc::Receiver<Feedback>,
    ) {
        loop {
            if self.stopped {
                return self.shutdown();
            }
            loop {
                match ends.commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return self.shutdown(),
                }
            }
            while let Ok(e) = agent_events.try_recv() {
                self.on_agent(e);
            }
            while let Ok(f) = feedback.try_recv() {
                self.on_feedback(f);
            }
            self.tick(Instant::now());
            self.cancel_abandoned();
            self.publish(&ends.published);
            // A Stop taken from the queue above must not be followed by a wait for the next
            // command: none may ever come (a worker told to stop while it was starting).
            if self.stopped {
                return self.shutdown();
            }
            if self.batcher.is_idle() {
                match self.wait(&mut ends.commands, &mut agent_events, &mut feedback) {
                    Woken::Command(c) => self.handle(c),
                    Woken::Agent(e) => self.on_agent(e),
                    Woken::Feedback(f) => self.on_feedback(f),
                    Woken::Timeout => {}
                    Woken::Closed => return self.shutdown(),
                }
                continue;
            }
            self.step();
        }
    }

    fn wait(
        &self,
        commands: &mut mpsc::Receiver<Command>,
        agent_events: &mut mpsc::Receiver<AgentEvent>,
        feedback: &mut mpsc::Receiver<Feedback>,
    ) -> Woken {
        let deadline = self
            .handoffs
            .values()
            .filter_map(|l| l.machine.deadline())
            .min();
        self.rt.block_on(async {
            let sleep = baton_worker::sleep_until(deadline);
            tokio::select! {
                c = commands.recv() => c.map_or(Woken::Closed, Woken::Command),
                Some(e) = agent_events.recv() => Woken::Agent(e),
                Some(f) = feedback.recv() => Woken::Feedback(f),
                () = sleep => Woken::Timeout,
            }
        })
    }

    fn shutdown(&mut self) {
        self.abort_all(|| Error::Stopped);
    }

    /// Fails every stream with `error()` and gives up every handoff, freeing their blocks.
    fn abort_all(&mut self, error: impl Fn() -> Error) {
        for (seq, events) in self.streams.drain() {
            self.batcher.cancel(seq);
            let _ = events.try_send(DecodeEvent::Failed(error()));
        }
        for (handoff, landing) in self.handoffs.drain() {
            self.agent.forget(handoff);
            let _ = landing.events.try_send(DecodeEvent::Failed(error()));
        }
        self.recomputing.clear();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Decode(job) => {
                let DecodeJob {
                    request,
                    source,
                    params,
                    replay,
                    events,
                    reply,
                } = *job;
                let _ = reply.send(self.start(request, source, params, replay, events));
            }
            Command::Cancel { stream } => self.cancel(stream),
            Command::Control(Control::Stop) => self.stopped = true,
            Command::Control(Control::AbortAll) => {
                let (streams, handoffs) = (self.streams.len(), self.handoffs.len());
                self.abort_all(|| Error::DrainDeadline);
                tracing::warn!(
                    streams,
                    handoffs,
                    "drain deadline passed: streams failed, reservations freed"
                );
            }
        }
    }

    /// Ends a turn: the prefix cache's changes go to the KV log, then the snapshot out, so a
    /// load report that sees the turn's blocks also sees its events.
    fn publish(&self, published: &watch::Sender<Snapshot>) {
        let engine = self.batcher.engine();
        self.config.kv_log.record(engine.drain_kv_events());
        publish(published, self.snapshot());
    }

    fn snapshot(&self) -> Snapshot {
        let engine = self.batcher.engine();
        let mut stats = self.stats;
        let batcher = self.batcher.stats();
        stats.preemptions = batcher.preemptions;
        stats.replayed_tokens = batcher.replayed_tokens;
        stats.replay_divergences = batcher.replay_divergences;
        Snapshot {
            load: Load {
                running: self.batcher.num_running() as u32,
                waiting: (self.batcher.num_waiting() + self.handoffs.len()) as u32,
                free_blocks: engine.free_blocks() as u32,
                total_blocks: engine.total_blocks() as u32,
                leases: self.handoffs.len() as u32,
            },
            stats,
            prefix: prefix_counts(engine.prefix_stats()),
            idle: self.streams.is_empty() && self.handoffs.is_empty(),
        }
    }

    fn busy(&self) -> usize {
        self.streams.len() + self.handoffs.len()
    }

    fn next_seq(&mut self) -> SeqId {
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        seq
    }

    fn start(
        &mut self,
        request: RequestId,
        source: Source,
        params: SamplingParams,
        replay: Vec<u32>,
        events: mpsc::Sender<DecodeEvent>,
    ) -> Result<Started> {
        if self.busy() >= self.config.max_streams {
            return Err(Error::Overloaded {
                what: "decode worker's stream table",
            });
        }
        // Checked now, not when the KV lands, so a bad replay fails the call, not the stream.
        self.batcher.check_replay(&params, &replay)?;
        if !replay.is_empty() {
            self.stats.migrated_in += 1;
        }
        let seq = self.next_seq();
        match source {
            Source::Prompt { prompt } => {
                self.batcher.submit(GenerateRequest {
                    id: seq,
                    prompt,
                    params,
                })?;
                if !replay.is_empty()
                    && let Err(e) = self.batcher.replay(seq, replay)
                {
                    self.batcher.cancel(seq);
                    return Err(e.into());
                }
                self.streams.insert(seq, events);
                Ok(Started {
                    stream: seq,
                    reserved: None,
                })
            }
            Source::Push {
                handoff,
                prompt,
                ttl,
            } => {
                let reserved =
                    self.reserve(request, handoff, seq, prompt, ttl, params, replay, events)?;
                Ok(Started {
                    stream: seq,
                    reserved: Some(reserved),
                })
            }
            Source::Pull {
                handoff,
                prompt,
                source,
                transport,
                ttl,
            } => {
                let tokens = prompt.len() as u32;
                source.check(tokens).map_err(|e| Error::InvalidRequest {
                    field: "source",
                    reason: e.to_string(),
                })?;
                self.batcher
                    .engine()
                    .descriptor()
                    .check_compatible(&source.pool.layout)
                    .map_err(|e| Error::Transport(e.into()))?;
                let endpoint =
                    source
                        .endpoint(transport)
                        .cloned()
                        .ok_or(Error::InvalidRequest {
                            field: "transport",
                            reason: format!(
                                "the prefill worker offers no {} endpoint",
                                transport.as_str()
                            ),
                        })?;
                let local = self.batcher.engine().descriptor().clone();
                let blocks = local.blocks_for(tokens);
                let mine = self.reserve(
                    request.clone(),
                    handoff,
                    seq,
                    prompt,
                    ttl,
                    params,
                    replay,
                    events,
                )?;
                if let Some(landing) = self.handoffs.get_mut(&handoff) {
                    landing.pulled = true;
                }
                // Only the blocks this worker's prefix cache lacks are read.
                let first_block = mine.cached_tokens / local.block_size.max(1);
                // One read per copy of the plan: with equal layouts, one for everything.
                let planned = plan(
                    std::slice::from_ref(&source.pool.layout),
                    std::slice::from_ref(&local),
                    first_block..blocks,
                )
                .map_err(Error::Transport)?;
                let reads: Vec<ReadRequest> = planned
                    .to_destination(0)
                    .map(|pc| ReadRequest {
                        tokens,
                        layers: pc.layers.clone(),
                        heads: pc.kv_heads.clone(),
                        source_blocks: source.blocks.clone(),
                        dest_blocks: mine.blocks.clone(),
                        first_block,
                    })
                    .collect();
                // The reads run on the runtime, not this thread; a failure comes back as
                // feedback and fails the handoff like any transfer failure.
                let (agent, feedback) = (self.agent.clone(), self.feedback_tx.clone());
                self.rt.spawn(async move {
                    for read in reads {
                        if let Err(e) = agent.read(&endpoint, handoff, read).await {
                            let reason = format!("reading from the prefill worker failed: {e}");
                            let _ = feedback
                                .send(Feedback::ReadFailed { handoff, reason })
                                .await;
                            return;
                        }
                    }
                });
                tracing::debug!(%request, %handoff, "pull requested");
                Ok(Started {
                    stream: seq,
                    reserved: None,
                })
            }
        }
    }

    /// Reserves blocks for `prompt`, tells the agent to expect `handoff` into them, and starts
    /// the handoff's machine. Returns the blocks' descriptor.
    #[allow(clippy::too_many_arguments)]
    fn reserve(
        &mut self,
        request: RequestId,
        handoff: HandoffId,
        seq: SeqId,
        prompt: Vec<u32>,
        ttl: Duration,
        params: SamplingParams,
        replay: Vec<u32>,
        events: mpsc::Sender<DecodeEvent>,
    ) -> Result<BlockDescriptor> {
        if self.handoffs.contains_key(&handoff) {
            return Err(Error::InvalidRequest {
                field: "handoff_id",
                reason: format!("{handoff} is already landing here"),
            });
        }
        if ttl > self.config.max_lease_ttl || ttl < Duration::from_millis(1) {
            return Err(Error::InvalidRequest {
                field: "ttl_ms",
                reason: format!("{ttl:?} is outside 1 ms..={:?}", self.config.max_lease_ttl),
            });
        }
        let engine = self.batcher.engine_mut();
        if prompt.len() >= engine.max_context() {
            return Err(Error::InvalidRequest {
                field: "prompt_token_ids",
                reason: format!(
                    "{} tokens leave no room in the {}-token context",
                    prompt.len(),
                    engine.max_context()
                ),
            });
        }
        // The blocks of the prompt's longest cached prefix are held (a conversation's earlier
        // turns, imported before); the sender writes only the rest.
        let (table, cached) = engine.reserve_cached_table(&prompt).map_err(|e| match e {
            baton_engine::Error::KvCacheFull { .. } => Error::Overloaded {
                what: "decode worker's kv pool",
            },
            e => Error::Engine(e),
        })?;
        let cached_bytes =
            engine.kv_layer_bytes(cached) as u64 * engine.descriptor().layers.len() as u64;
        let blocks = table.blocks().to_vec();
        let layout = engine.descriptor().clone();
        let pool = engine.pool_layout().clone();
        let reservation = Arc::new(Reservation(Mutex::new(Some(table))));
        let guard: Guard = reservation.clone();
        // The cached blocks are shared and read-only: the agent admits writes to the rest only,
        // which it sees as a sequence of its own (whole blocks, so the rows line up).
        let cached_blocks = cached / layout.block_size.max(1) as usize;
        self.agent.expect(
            handoff,
            Expectation {
                tokens: (prompt.len() - cached) as u32,
                layers: layout.layers.clone(),
                heads: layout.kv_heads.clone(),
                blocks: blocks[cached_blocks..].to_vec(),
                guard,
            },
        )?;
        let now = Instant::now();
        let descriptor = BlockDescriptor {
            worker: self.agent.worker().clone(),
            endpoints: self.agent.endpoints(),
            pool,
            blocks,
            tokens: prompt.len() as u32,
            cached_tokens: cached as u32,
        };
        self.handoffs.insert(
            handoff,
            Landing {
                machine: Handoff::new(now, ttl, self.config.kv_failure_policy),
                request,
                seq,
                prompt,
                reservation,
                params,
                replay,
                events,
                reserved_at: now,
                pulled: false,
                cached_tokens: cached as u32,
                cached_bytes,
            },
        );
        Ok(descriptor)
    }

    fn on_agent(&mut self, event: AgentEvent) {
        let now = Instant::now();
        match event {
            AgentEvent::LayerLanded { handoff, .. } => {
                self.drive(handoff, now, HandoffEvent::LayerLanded, None)
            }
            AgentEvent::Keepalive { handoff } => {
                self.drive(handoff, now, HandoffEvent::Keepalive, None)
            }
            AgentEvent::Arrived {
                handoff,
                bytes,
                sender_bytes,
                transfer,
                completion,
            } => {
                let Some(landing) = self.handoffs.get(&handoff) else {
                    return;
                };
                let landed = Landed {
                    bytes,
                    transfer: landing.reserved_at.elapsed(),
                    sender_bytes,
                    sender_transfer: transfer,
                    sender_exposed: Duration::ZERO,
                    cached_tokens: landing.cached_tokens,
                    cached_bytes: landing.cached_bytes,
                };
                let pulled = landing.pulled;
                match baton_proto::v1::HandoffCompletion::decode(completion.as_slice()) {
                    Ok(c) => {
                        let landed = Landed {
                            sender_exposed: if pulled {
                                transfer
                            } else {
                                Duration::from_secs_f64(c.exposed_seconds.clamp(0.0, 86_400.0))
                            },
                            ..landed
                        };
                        self.drive(
                            handoff,
                            now,
                            HandoffEvent::Arrived {
                                first_token: c.first_token_id,
                            },
                            Some(landed),
                        );
                    }
                    Err(e) => self.drive(
                        handoff,
                        now,
                        HandoffEvent::Failed {
                            reason: format!("the prefill worker's completion is unreadable: {e}"),
                        },
                        None,
                    ),
                }
            }
            AgentEvent::Failed { handoff, error } => self.drive(
                handoff,
                now,
                HandoffEvent::Failed {
                    reason: error.to_string(),
                },
                None,
            ),
            // A decode worker neither sends nor offers sources.
            AgentEvent::Cancelled { .. }
            | AgentEvent::ReadStarted { .. }
            | AgentEvent::ReadDone { .. }
            | AgentEvent::ReadFailed { .. } => {}
        }
    }

    fn on_feedback(&mut self, f: Feedback) {
        match f {
            Feedback::ReadFailed { handoff, reason } => {
                // The agent may still expect it; nothing will write it now.
                self.agent.forget(handoff);
                self.drive(
                    handoff,
                    Instant::now(),
                    HandoffEvent::Failed { reason },
                    None,
                );
            }
        }
    }

    /// Feeds one event to a handoff's machine and carries out its actions.
    fn drive(
        &mut self,
        handoff: HandoffId,
        now: Instant,
        event: HandoffEvent,
        landed: Option<Landed>,
    ) {
        let Some(landing) = self.handoffs.get_mut(&handoff) else {
            return;
        };
        let actions = landing.machine.step(now, event);
        let ended = landing.machine.is_ended();
        for action in actions {
            self.act(handoff, action, landed);
        }
        if ended {
            self.handoffs.remove(&handoff);
        }
    }

    fn act(&mut self, handoff: HandoffId, action: Action, landed: Option<Landed>) {
        match action {
            Action::Forget => {
                self.agent.forget(handoff);
            }
            Action::Decode { first_token } => {
                let Some(landing) = self.handoffs.remove(&handoff) else {
                    return;
                };
                self.stats.handoffs_ok += 1;
                let landed = landed.unwrap_or_default();
                self.stats.kv_bytes_imported += landed.bytes;
                self.stats.kv_bytes_cached += landed.cached_bytes;
                self.stats.kv_tokens_cached += u64::from(landed.cached_tokens);
                let _ = landing.events.try_send(DecodeEvent::KvLanded(landed));
                let Some(table) = landing.reservation.take() else {
                    let _ = landing.events.try_send(DecodeEvent::Failed(Error::Internal(
                        "the reserved blocks were already taken".into(),
                    )));
                    return;
                };
                let (seq, events, request) = (landing.seq, landing.events, landing.request);
                let replay = landing.replay;
                let adopted = replayed_first(&replay, first_token)
                    .and_then(|()| {
                        self.batcher
                            .engine_mut()
                            .adopt(seq, landing.prompt, table)
                            .map_err(Error::from)
                    })
                    .and_then(|()| {
                        self.batcher
                            .resume_imported(seq, landing.params, first_token)
                            .map_err(Error::from)
                    })
                    .and_then(|()| match replay.get(1..) {
                        Some(rest) if !rest.is_empty() => {
                            self.batcher.replay(seq, rest.to_vec()).map_err(Error::from)
                        }
                        _ => Ok(()),
                    });
                match adopted {
                    Ok(()) => {
                        tracing::debug!(%request, %handoff, bytes = landed.bytes, "kv landed; decoding");
                        self.streams.insert(seq, events);
                    }
                    Err(e) => {
                        self.batcher.cancel(seq);
                        let _ = events.try_send(DecodeEvent::Failed(e));
                    }
                }
            }
            Action::FailStream { reason } => {
                let Some(landing) = self.handoffs.get(&handoff) else {
                    return;
                };
                self.stats.handoffs_failed += 1;
                if reason.contains("expired") {
                    self.stats.handoffs_expired += 1;
                }
                tracing::warn!(request = %landing.request, %handoff, %reason, "kv handoff failed; failing the stream");
                let _ = landing
                    .events
                    .try_send(DecodeEvent::Failed(Error::Handoff(reason)));
            }
            Action::Recompute { reason } => {
                let Some(landing) = self.handoffs.remove(&handoff) else {
                    return;
                };
                self.stats.handoffs_failed += 1;
                self.stats.handoffs_recomputed += 1;
                if reason.contains("expired") {
                    self.stats.handoffs_expired += 1;
                }
                tracing::warn!(request = %landing.request, %handoff, %reason, "kv handoff failed; recomputing the prompt on the decode worker");
                // The reserved blocks go back once the agent lets go of them too.
                drop(landing.reservation);
                let seq = landing.seq;
                let replay = landing.replay;
                let migrated = !replay.is_empty();
                let submitted = self
                    .batcher
                    .submit(GenerateRequest {
                        id: seq,
                        prompt: landing.prompt,
                        params: landing.params,
                    })
                    .and_then(|()| match migrated {
                        true => self.batcher.replay(seq, replay),
                        false => Ok(()),
                    })
                    .inspect_err(|_| {
                        self.batcher.cancel(seq);
                    });
                match submitted {
                    Ok(()) => {
                        // A migrated stream's first token is the client's, replayed: the
                        // stream goes on from the token after its replay.
                        if !migrated {
                            self.recomputing.insert(seq, reason);
                        }
                        self.streams.insert(seq, landing.events);
                    }
                    Err(e) => {
                        let _ = landing.events.try_send(DecodeEvent::Failed(e.into()));
                    }
                }
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        let due: Vec<HandoffId> = self
            .handoffs
            .iter()
            .filter(|(_, l)| l.machine.deadline().is_some_and(|d| d <= now))
            .map(|(h, _)| *h)
            .collect();
        for handoff in due {
            self.drive(handoff, now, HandoffEvent::Tick, None);
        }
    }

    fn cancel(&mut self, stream: SeqId) {
        if let Some(handoff) = self
            .handoffs
            .iter()
            .find(|(_, l)| l.seq == stream)
            .map(|(h, _)| *h)
        {
            self.stats.cancelled += 1;
            self.drive(handoff, Instant::now(), HandoffEvent::StreamClosed, None);
            return;
        }
        if self.streams.remove(&stream).is_some() {
            self.stats.cancelled += 1;
            self.batcher.cancel(stream);
            self.recomputing.remove(&stream);
            tracing::debug!(%stream, "client went away; stream cancelled and blocks freed");
        }
    }

    /// Streams whose client went away without a cancel reaching us (a backstop).
    fn cancel_abandoned(&mut self) {
        let gone: Vec<SeqId> = self
            .streams
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(seq, _)| *seq)
            .chain(
                self.handoffs
                    .values()
                    .filter(|l| l.events.is_closed())
                    .map(|l| l.seq),
            )
            .collect();
        for seq in gone {
            self.cancel(seq);
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
                Event::Token {
                    seq,
                    token,
                    finish,
                    cached,
                } => {
                    let Some(tx) = self.streams.get(&seq) else {
                        continue;
                    };
                    let event = if let Some(reason) = self.recomputing.remove(&seq) {
                        DecodeEvent::Recomputed {
                            first_token: token,
                            reason,
                            finish,
                        }
                    } else {
                        DecodeEvent::Token {
                            token,
                            finish,
                            cached,
                        }
                    };
                    if tx.try_send(event).is_err() {
                        self.batcher.cancel(seq);
                        self.streams.remove(&seq);
                        continue;
                    }
                    if finish.is_some() {
                        self.streams.remove(&seq);
                    }
                }
                Event::Failed { seq, error } => {
                    self.recomputing.remove(&seq);
                    if let Some(tx) = self.streams.remove(&seq) {
                        let _ = tx.try_send(DecodeEvent::Failed(Error::Internal(error)));
                    }
                }
            }
        }
    }
}

/// A migrated stream continues only from the first token its client has: the sender must have
/// sampled that one.
fn replayed_first(replay: &[u32], first_token: u32) -> Result<()> {
    match replay.first() {
        Some(&had) if had != first_token => Err(Error::Handoff(format!(
            "the prefill worker sampled first token {first_token} where the migrated stream has {had}"
        ))),
        _ => Ok(()),
    }
}

/// The engine's prefix-cache figures as the metrics page shows them.
fn prefix_counts(p: baton_engine::PrefixStats) -> baton_telemetry::PrefixCacheCounts {
    baton_telemetry::PrefixCacheCounts {
        prompt_tokens: p.prompt_tokens,
        hit_tokens: p.hit_tokens,
        cached_blocks: p.pool.named,
        idle_blocks: p.pool.idle,
        evictions: p.pool.evictions,
    }
}
