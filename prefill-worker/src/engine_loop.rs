//! The prefill worker's engine thread: the one owner of the engine and its block pool, and of
//! every pull source pinned here.
//!
//! ```text
//! service --Command (bounded)--> [engine thread: queue -> chunked prefill steps]
//!   push: after each layer, the blocks the step wrote go to the decode worker's reserved
//!         blocks: copied straight into its memory (shm) or as owned bytes to the job's sender
//!         task (tcp); the first token is answered at once, its completion follows the writes
//!   pull: the finished sequence is detached and offered to readers under a lease
//!         (handoff::PullSource decides when it ends); readers are served by the agent's tasks
//! agent --Event (reads started and done, cancels)--> engine thread
//! ```
//!
//! Invariants: only this thread touches the engine; a direct copy into another worker's memory
//! happens only on this thread, for a job it still holds, so once it drops a job nothing more
//! is written for it; pinned blocks return to the pool when the last holder (this thread's
//! source entry, a reader) drops them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::{HandoffId, RequestId};
use baton_engine::{BlockTable, Engine, LayerReady, SampledToken, Sampler, SamplingParams, SeqId};
use baton_kv_transfer::agent::{
    Agent, BlockDescriptor, Event as AgentEvent, KvRegion, Peer, Source,
};
use baton_kv_transfer::memory::{SeqBlocks, layer_copies};
use baton_kv_transfer::plan;
use baton_worker::Control;
use baton_worker::engine::{EngineEnds, EngineHandle, publish};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::handoff::{PullSource, SourceAction, SourceEvent};
use crate::queue::{self, Limits, Progress};
use crate::sender::Outgoing;

/// What a prefill job does with its KV.
pub enum JobShape {
    /// Push: every layer's new blocks go to `destination` (the decode worker's reserved
    /// blocks) over `peer` as soon as the layer is computed; `outgoing` feeds the job's sender
    /// task, which owns the rest of the handoff.
    Push {
        peer: Peer,
        destination: BlockDescriptor,
        outgoing: mpsc::Sender<Outgoing>,
    },
    /// Pull: the KV stays pinned for `ttl` (renewed while a reader reads).
    Pull { ttl: Duration },
}

/// One prompt to prefill.
pub struct PrefillJob {
    pub request: RequestId,
    pub handoff: HandoffId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub shape: JobShape,
}

/// What a finished prefill reports.
#[derive(Debug, Clone)]
pub struct Prefilled {
    pub first_token: SampledToken,
    /// Pull: the pinned blocks readers read.
    pub source: Option<BlockDescriptor>,
    /// Time from admission to the first step that computed this prompt.
    pub queued: Duration,
    /// Time from the first step to the end of the last.
    pub compute: Duration,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: u32,
}

/// The engine's load, for routing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Prompts being prefilled or waiting.
    pub pending: u32,
    pub free_blocks: u32,
    pub total_blocks: u32,
    /// Pull sources pinned under a lease.
    pub leases: u32,
}

/// Counters the engine thread keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoopStats {
    pub steps: u64,
    pub prefill_tokens: u64,
    pub preemptions: u64,
    pub leases_expired: u64,
    pub leases_released: u64,
}

/// What the engine thread publishes after each turn of its loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub load: Load,
    pub stats: LoopStats,
    pub prefix: baton_telemetry::PrefixCacheCounts,
    /// No prompt queued or computing, no pull source leased.
    pub idle: bool,
}

impl baton_worker::Snapshot for Snapshot {
    fn idle(&self) -> bool {
        self.idle
    }

    fn describe(&self) -> String {
        format!(
            "prompts={} free_blocks={} total_blocks={} leases={}",
            self.load.pending, self.load.free_blocks, self.load.total_blocks, self.load.leases
        )
    }
}

pub enum Command {
    Prefill {
        job: Box<PrefillJob>,
        reply: oneshot::Sender<Result<Prefilled>>,
    },
    /// The coordinator released a pull source nobody will read.
    Release {
        handoff: HandoffId,
        reply: oneshot::Sender<bool>,
    },
    /// A push job's sender task failed to write.
    SendFailed { handoff: HandoffId, reason: String },
    /// Stop, or the drain deadline (fail every queued prompt, free every pull source).
    Control(Control),
}

impl From<Control> for Command {
    fn from(c: Control) -> Self {
        Command::Control(c)
    }
}

/// The service's handle to the engine thread.
#[derive(Clone)]
pub struct PrefillEngine {
    inner: EngineHandle<Command, Snapshot>,
}

impl PrefillEngine {
    /// Queues a prompt and waits for its first token.
    pub async fn prefill(&self, job: PrefillJob) -> Result<Prefilled> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .submit(Command::Prefill {
                job: Box::new(job),
                reply,
            })
            .map_err(refused)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Ends a pull source's lease. Returns whether it was live.
    pub async fn release(&self, handoff: HandoffId) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        // Releases free blocks: they must not be refused for overload.
        self.inner
            .send(Command::Release { handoff, reply })
            .await
            .map_err(refused)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// A sender task's failure, for its job.
    pub async fn send_failed(&self, handoff: HandoffId, reason: String) {
        let _ = self
            .inner
            .send(Command::SendFailed { handoff, reason })
            .await;
    }

    /// The load as of the engine thread's last turn, from its published snapshot.
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
            what: "prefill queue",
        },
        baton_worker::Refused::Stopped => Error::Stopped,
    }
}

/// Engine-thread settings.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Commands that may wait for the engine thread.
    pub queue_capacity: usize,
    /// Prompts admitted into the prefill queue at once.
    pub max_pending: usize,
    /// Where the engine's prefix-cache changes go after each turn, for load reports.
    pub kv_log: baton_worker::KvLog,
    /// Longest lease a pull may ask for.
    pub max_lease_ttl: Duration,
}

/// Starts the engine thread. It stops when every handle is dropped or on `Stop`.
pub fn spawn(
    engine: Engine,
    agent: Agent,
    agent_events: mpsc::Receiver<AgentEvent>,
    config: LoopConfig,
    rt: Handle,
) -> std::io::Result<(PrefillEngine, std::thread::JoinHandle<()>)> {
    let cfg = engine.config();
    let limits = Limits {
        chunk_tokens: cfg.prefill_chunk_tokens,
        max_batch_tokens: cfg.max_batch_tokens,
        block_size: cfg.block_size,
    };
    let region = engine.kv_region();
    engine.record_kv_events();
    let mut state = Loop {
        stopped: false,
        engine,
        region,
        agent,
        pending: Vec::new(),
        sources: HashMap::new(),
        next_seq: 0,
        limits,
        max_pending: config.max_pending,
        max_lease_ttl: config.max_lease_ttl,
        kv_log: config.kv_log,
        stats: LoopStats::default(),
        answers: Vec::new(),
        rt,
    };
    let (inner, ends) = EngineHandle::new(config.queue_capacity, state.snapshot());
    let join = std::thread::Builder::new()
        .name("prefill-engine".into())
        .spawn(move || state.run(ends, agent_events))?;
    Ok((PrefillEngine { inner }, join))
}

struct Active {
    seq: SeqId,
    job: PrefillJob,
    reply: oneshot::Sender<Result<Prefilled>>,
    admitted: Instant,
    started: Option<Instant>,
    /// Blocks below this have been sent (push), or the decode worker held them already: a
    /// recomputed chunk is not sent twice, and a cached one not at all.
    sent_blocks: u32,
}

/// A pinned pull source: the sequence's blocks, held until the lease ends and no reader holds
/// them.
struct Pinned {
    machine: PullSource,
    request: RequestId,
    /// Shared with the agent's offer and every reader.
    _table: Arc<Mutex<BlockTable>>,
}

struct Loop {
    stopped: bool,
    engine: Engine,
    region: Arc<dyn KvRegion>,
    agent: Agent,
    pending: Vec<Active>,
    sources: HashMap<HandoffId, Pinned>,
    next_seq: u64,
    limits: Limits,
    max_pending: usize,
    max_lease_ttl: Duration,
    kv_log: baton_worker::KvLog,
    stats: LoopStats,
    rt: Handle,
    /// Finished prompts' answers, held until the snapshot that shows their effect (a pinned
    /// source, freed blocks) is published: a load report read after an answer sees it.
    answers: Vec<(oneshot::Sender<Result<Prefilled>>, Result<Prefilled>)>,
}

enum Woken {
    Command(Command),
    Agent(AgentEvent),
    Timeout,
    Closed,
}

impl Loop {
    fn run(
        &mut self,
        mut ends: EngineEnds<Command, Snapshot>,
        mut agent_events: mpsc::Receiver<AgentEvent>,
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
            self.tick(Instant::now());
            self.cancel_abandoned();
            self.publish(&ends.published);
            let stepped = !self.pending.is_empty() && self.step();
            if !self.answers.is_empty() {
                self.publish(&ends.published);
                for (reply, answer) in self.answers.drain(..) {
                    let _ = reply.send(answer);
                }
            }
            // A Stop taken from the queue above must not be followed by a wait for the next
            // command: none may ever come (a worker told to stop while it was starting).
            if self.stopped {
                return self.shutdown();
            }
            if !stepped {
                match self.wait(&mut ends.commands, &mut agent_events) {
                    Woken::Command(c) => self.handle(c),
                    Woken::Agent(e) => self.on_agent(e),
                    Woken::Timeout => {}
                    Woken::Closed => return self.shutdown(),
                }
            }
        }
    }

    /// Blocks until a command or an agent event arrives or the next lease falls due.
    fn wait(
        &self,
        commands: &mut mpsc::Receiver<Command>,
        agent_events: &mut mpsc::Receiver<AgentEvent>,
    ) -> Woken {
        let deadline = self
            .sources
            .values()
            .filter_map(|s| s.machine.deadline())
            .min();
        self.rt.block_on(async {
            let sleep = baton_worker::sleep_until(deadline);
            tokio::select! {
                c = commands.recv() => c.map_or(Woken::Closed, Woken::Command),
                Some(e) = agent_events.recv() => Woken::Agent(e),
                () = sleep => Woken::Timeout,
            }
        })
    }

    fn shutdown(&mut self) {
        self.abort_all(|| Error::Stopped);
    }

    /// Fails every queued prompt with `error()` and ends every pull source.
    fn abort_all(&mut self, error: impl Fn() -> Error) {
        let pending: Vec<Active> = self.pending.drain(..).collect();
        for a in pending {
            self.drop_job(a, error());
        }
        for (handoff, _) in self.sources.drain() {
            self.agent.withdraw(handoff);
        }
    }

    /// Ends a job that will not finish: its sequence goes, the coordinator hears `error`, and a
    /// push job's sender tells the decode worker nothing more will come.
    fn drop_job(&mut self, a: Active, error: Error) {
        self.engine.release(a.seq);
        if let JobShape::Push { outgoing, .. } = &a.job.shape {
            let _ = outgoing.try_send(Outgoing::Abort {
                reason: error.to_string(),
            });
        }
        let _ = a.reply.send(Err(error));
    }

    /// Drops prompts whose caller stopped waiting (its deadline passed, or it went away): no
    /// step is spent on them and their blocks return to the pool.
    fn cancel_abandoned(&mut self) {
        let gone: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, a)| a.reply.is_closed())
            .map(|(i, _)| i)
            .rev()
            .collect();
        for i in gone {
            let a = self.pending.remove(i);
            tracing::debug!(request = %a.job.request, handoff = %a.job.handoff, "caller gone; prefill cancelled");
            self.drop_job(a, Error::Cancelled);
        }
    }

    /// Ends a turn: the prefix cache's changes go to the KV log, then the snapshot out, so a
    /// load report that sees the turn's blocks also sees its events.
    fn publish(&self, published: &watch::Sender<Snapshot>) {
        self.kv_log.record(self.engine.drain_kv_events());
        publish(published, self.snapshot());
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            load: Load {
                pending: self.pending.len() as u32,
                free_blocks: self.engine.free_blocks() as u32,
                total_blocks: self.engine.total_blocks() as u32,
                leases: self.sources.len() as u32,
            },
            stats: self.stats,
            prefix: prefix_counts(self.engine.prefix_stats()),
            idle: self.pending.is_empty() && self.sources.is_empty(),
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Prefill { job, reply } => self.admit(*job, reply),
            Command::Release { handoff, reply } => {
                let live = self.drive_source(handoff, Instant::now(), SourceEvent::Released);
                if live {
                    self.stats.leases_released += 1;
                }
                let _ = reply.send(live);
            }
            Command::SendFailed { handoff, reason } => {
                if let Some(pos) = self.pending.iter().position(|a| a.job.handoff == handoff) {
                    let a = self.pending.remove(pos);
                    tracing::warn!(request = %a.job.request, %handoff, %reason, "kv push failed");
                    self.drop_job(a, Error::Transfer(reason));
                }
            }
            Command::Control(Control::Stop) => self.stopped = true,
            Command::Control(Control::AbortAll) => {
                let (prompts, leases) = (self.pending.len(), self.sources.len());
                self.abort_all(|| Error::DrainDeadline);
                tracing::warn!(
                    prompts,
                    leases,
                    "drain deadline passed: prompts failed, pull sources freed"
                );
            }
        }
    }

    fn on_agent(&mut self, event: AgentEvent) {
        let now = Instant::now();
        match event {
            AgentEvent::ReadStarted { handoff } => {
                self.drive_source(handoff, now, SourceEvent::ReadStarted);
            }
            AgentEvent::ReadDone {
                handoff,
                bytes,
                transfer,
            } => {
                if let Some(s) = self.sources.get(&handoff) {
                    tracing::debug!(request = %s.request, %handoff, bytes, transfer_s = transfer.as_secs_f64(), "pull source read");
                }
                self.drive_source(handoff, now, SourceEvent::ReadDone);
                self.stats.leases_released += 1;
            }
            AgentEvent::ReadFailed { handoff, error } => {
                tracing::warn!(%handoff, %error, "serving a pull read failed");
                self.drive_source(handoff, now, SourceEvent::ReadFailed);
            }
            AgentEvent::Cancelled { handoff } => {
                // The decode worker gave the push up: drop the job here first (this thread is
                // the only one that copies into its memory), then answer that nothing more
                // will be written.
                if let Some(pos) = self.pending.iter().position(|a| a.job.handoff == handoff) {
                    let a = self.pending.remove(pos);
                    if let JobShape::Push { outgoing, .. } = &a.job.shape {
                        let _ = outgoing.try_send(Outgoing::Stopped);
                    }
                    self.engine.release(a.seq);
                    let _ = a.reply.send(Err(Error::Transfer(
                        "the decode worker gave the handoff up".into(),
                    )));
                }
            }
            // A prefill worker expects nothing.
            AgentEvent::LayerLanded { .. }
            | AgentEvent::Keepalive { .. }
            | AgentEvent::Arrived { .. }
            | AgentEvent::Failed { .. } => {}
        }
    }

    /// Feeds a pull source's machine; true if the source was live.
    fn drive_source(&mut self, handoff: HandoffId, now: Instant, event: SourceEvent) -> bool {
        let Some(source) = self.sources.get_mut(&handoff) else {
            return false;
        };
        let actions = source.machine.step(now, event);
        if let Some(SourceAction::Withdraw { expired }) = actions.into_iter().next() {
            self.agent.withdraw(handoff);
            if expired {
                self.stats.leases_expired += 1;
                tracing::warn!(%handoff, "pull source lease expired; blocks freed");
            }
            // The blocks return once no reader holds them.
            self.sources.remove(&handoff);
        }
        true
    }

    fn tick(&mut self, now: Instant) {
        let due: Vec<HandoffId> = self
            .sources
            .iter()
            .filter(|(_, s)| s.machine.deadline().is_some_and(|d| d <= now))
            .map(|(h, _)| *h)
            .collect();
        for handoff in due {
            self.drive_source(handoff, now, SourceEvent::Tick);
        }
    }

    /// Checks a job and queues it; on refusal the reply carries the error.
    fn admit(&mut self, job: PrefillJob, reply: oneshot::Sender<Result<Prefilled>>) {
        let refuse = |reply: oneshot::Sender<Result<Prefilled>>, e: Error| {
            tracing::debug!(error = %e, "prefill refused");
            let _ = reply.send(Err(e));
        };
        if self.pending.len() >= self.max_pending {
            return refuse(
                reply,
                Error::Overloaded {
                    what: "prefill queue",
                },
            );
        }
        let needed = self.engine.blocks_for(job.prompt.len());
        if needed > self.engine.total_blocks() {
            return refuse(
                reply,
                Error::InvalidRequest {
                    field: "prompt",
                    reason: format!(
                        "its kv needs {needed} blocks; the prefill worker's pool has {}",
                        self.engine.total_blocks()
                    ),
                },
            );
        }
        if let JobShape::Pull { ttl } = job.shape
            && (ttl < Duration::from_millis(1) || ttl > self.max_lease_ttl)
        {
            return refuse(
                reply,
                Error::InvalidRequest {
                    field: "ttl_ms",
                    reason: format!("{ttl:?} is outside 1 ms..={:?}", self.max_lease_ttl),
                },
            );
        }
        if self.sources.contains_key(&job.handoff)
            || self.pending.iter().any(|a| a.job.handoff == job.handoff)
        {
            return refuse(
                reply,
                Error::InvalidRequest {
                    field: "handoff_id",
                    reason: format!("{} is already in use", job.handoff),
                },
            );
        }
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        if let Err(e) = self.engine.add_sequence(seq, job.prompt.clone()) {
            return refuse(reply, e.into());
        }
        // The decode worker's cached prefix is never written: it holds those blocks already.
        let sent_blocks = match &job.shape {
            JobShape::Push { destination, .. } => {
                destination.cached_tokens / self.limits.block_size as u32
            }
            JobShape::Pull { .. } => 0,
        };
        self.pending.push(Active {
            seq,
            job,
            reply,
            admitted: Instant::now(),
            started: None,
            sent_blocks,
        });
    }

    /// Where each pending prompt stands, in admission order.
    fn progress(&self) -> Vec<Progress> {
        let mut progress = Vec::with_capacity(self.pending.len());
        for a in &self.pending {
            let (Ok(computed), Ok(blocks_held)) =
                (self.engine.computed(a.seq), self.engine.blocks_held(a.seq))
            else {
                continue;
            };
            progress.push(Progress {
                seq: a.seq,
                computed,
                total: a.job.prompt.len(),
                blocks_held,
            });
        }
        progress
    }

    /// Runs one step. False when nothing could run (waiting on leases to free blocks).
    fn step(&mut self) -> bool {
        // Prompts that hold no blocks start from their longest cached prefix; those this step
        // does not take let go of it again, so a waiting prompt holds nothing.
        let mut attached = Vec::new();
        for a in &self.pending {
            if self.engine.attach_cached_prefix(a.seq).unwrap_or(0) > 0 {
                attached.push(a.seq);
            }
        }
        let mut progress = self.progress();
        let items = queue::plan_step(&progress, self.limits, self.engine.free_blocks());
        let unplanned: Vec<SeqId> = attached
            .into_iter()
            .filter(|seq| !items.iter().any(|it| it.seq == *seq))
            .collect();
        if !unplanned.is_empty() {
            for seq in unplanned {
                let _ = self.engine.evict(seq);
            }
            progress = self.progress();
        }
        if items.is_empty() {
            if let Some(victim) = queue::preemption_victim(&progress) {
                // Recomputed later from its first chunk; blocks already sent are not resent.
                if self.engine.evict(victim).is_ok() {
                    self.stats.preemptions += 1;
                    tracing::warn!(seq = %victim, "prefill kv pool full: preempting a prompt for recompute");
                    return true;
                }
            }
            return false;
        }
        let now = Instant::now();
        let local = self.engine.descriptor().clone();
        let src_pool = self.engine.pool_layout().clone();
        // seq -> (peer, destination, sender, blocks already sent)
        let mut push: HashMap<SeqId, (&Peer, &BlockDescriptor, &mpsc::Sender<Outgoing>, u32)> =
            HashMap::new();
        for a in &mut self.pending {
            if !items.iter().any(|it| it.seq == a.seq) {
                continue;
            }
            a.started.get_or_insert(now);
        }
        for a in &self.pending {
            if !items.iter().any(|it| it.seq == a.seq) {
                continue;
            }
            if let JobShape::Push {
                peer,
                destination,
                outgoing,
            } = &a.job.shape
            {
                push.insert(a.seq, (peer, destination, outgoing, a.sent_blocks));
            }
        }
        let export: Vec<SeqId> = push.keys().copied().collect();
        let mut broken: Vec<(SeqId, String)> = Vec::new();
        let region = self.region.clone();
        let mut sink = |_: &baton_engine::KvCache, ready: LayerReady| -> baton_engine::Result<()> {
            let Some((peer, dst, outgoing, sent)) = push.get(&ready.seq) else {
                return Ok(());
            };
            if broken.iter().any(|(s, _)| *s == ready.seq) {
                return Ok(());
            }
            // Everything not sent yet: blocks a cached prefix supplied go with this step's
            // first layers of the same index (their KV is final, and the decode worker lacks it).
            let first = *sent;
            if first >= ready.range.end as u32 {
                return Ok(());
            }
            // The plan says which (layers x kv heads) of this shard go to the destination's
            // shard; with equal layouts that is everything, once.
            let planned = match plan(
                std::slice::from_ref(&local),
                std::slice::from_ref(&dst.pool.layout),
                first..ready.range.end as u32,
            ) {
                Ok(p) => p,
                Err(e) => {
                    broken.push((ready.seq, e.to_string()));
                    return Ok(());
                }
            };
            let mut copies = Vec::new();
            for pc in planned.from_source(0) {
                if !pc.layers.contains(&ready.layer) {
                    continue;
                }
                layer_copies(
                    ready.layer,
                    &pc.kv_heads,
                    &pc.blocks,
                    ready.tokens as u32,
                    SeqBlocks {
                        pool: &src_pool,
                        blocks: &ready.blocks,
                    },
                    SeqBlocks {
                        pool: &dst.pool,
                        blocks: &dst.blocks,
                    },
                    &mut copies,
                );
            }
            if copies.is_empty() {
                return Ok(());
            }
            let item = if peer.direct() {
                // One copy, straight into the decode worker's memory, on this thread.
                match peer.write_direct(&copies) {
                    Ok(ranges) => Outgoing::Landed {
                        layer: ready.layer,
                        ranges,
                    },
                    Err(e) => {
                        broken.push((ready.seq, e.to_string()));
                        return Ok(());
                    }
                }
            } else {
                let mut pieces = Vec::with_capacity(copies.len());
                for c in &copies {
                    let mut bytes = vec![0u8; c.len as usize];
                    if let Err(e) = region.read(c.src, &mut bytes) {
                        broken.push((ready.seq, e.to_string()));
                        return Ok(());
                    }
                    pieces.push((c.dst, bytes));
                }
                Outgoing::Write {
                    layer: ready.layer,
                    pieces,
                }
            };
            // Waits while the transport is behind: back-pressure reaches the compute.
            if outgoing.blocking_send(item).is_err() {
                broken.push((ready.seq, "the job's sender stopped".into()));
            }
            Ok(())
        };
        let result = self.engine.step_with_layers(&items, &export, &mut sink);
        drop(push);
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "prefill step failed; failing its prompts");
                let msg = e.to_string();
                for it in &items {
                    self.fail(it.seq, Error::Internal(msg.clone()));
                }
                return true;
            }
        };
        let done = Instant::now();
        self.stats.steps += 1;
        let bs = self.limits.block_size;
        for it in &items {
            self.stats.prefill_tokens += it.tokens as u64;
            if let (Some(a), Ok(c)) = (
                self.pending.iter_mut().find(|a| a.seq == it.seq),
                self.engine.computed(it.seq),
            ) {
                a.sent_blocks = a.sent_blocks.max(c.div_ceil(bs) as u32);
            }
        }
        for (seq, reason) in broken {
            self.fail(seq, Error::Transfer(reason));
        }
        for out in outputs {
            let Some(logits) = out.logits else { continue };
            let Some(pos) = self.pending.iter().position(|a| a.seq == out.seq) else {
                continue;
            };
            let a = self.pending.remove(pos);
            self.finish(a, &logits, now, done);
        }
        true
    }

    /// A prompt's last chunk is done: sample its first token, answer the coordinator at once,
    /// and hand the KV on by its shape.
    fn finish(&mut self, a: Active, logits: &[f32], now: Instant, done: Instant) {
        let first_token = Sampler::new(&a.job.params, &a.job.prompt).sample(logits);
        let started = a.started.unwrap_or(now);
        let mut report = Prefilled {
            first_token: first_token.clone(),
            source: None,
            queued: started.saturating_duration_since(a.admitted),
            compute: done.saturating_duration_since(started),
            cached_tokens: self.engine.cached_tokens(a.seq).unwrap_or(0) as u32,
        };
        let completion = || {
            use prost::Message as _;
            baton_proto::v1::HandoffCompletion {
                first_token_id: first_token.id,
                exposed_seconds: 0.0,
            }
            .encode_to_vec()
        };
        match a.job.shape {
            JobShape::Push { outgoing, .. } => {
                // The sequence's last writes are queued; its blocks are no longer read.
                self.engine.release(a.seq);
                self.answers.push((a.reply, Ok(report)));
                let _ = outgoing.try_send(Outgoing::Complete {
                    first_token: first_token.id,
                    compute_done: done,
                });
            }
            JobShape::Pull { ttl } => {
                let (tokens, table) = match self.engine.detach(a.seq) {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = a.reply.send(Err(e.into()));
                        return;
                    }
                };
                let blocks = table.blocks().to_vec();
                let table = Arc::new(Mutex::new(table));
                let offered = self.agent.offer(
                    a.job.handoff,
                    Source {
                        tokens: tokens.len() as u32,
                        blocks: blocks.clone(),
                        completion: completion(),
                        guard: table.clone(),
                    },
                );
                if let Err(e) = offered {
                    let _ = a.reply.send(Err(e.into()));
                    return;
                }
                self.sources.insert(
                    a.job.handoff,
                    Pinned {
                        machine: PullSource::new(done, ttl),
                        request: a.job.request.clone(),
                        _table: table,
                    },
                );
                report.source = Some(BlockDescriptor {
                    worker: self.agent.worker().clone(),
                    endpoints: self.agent.endpoints(),
                    pool: self.engine.pool_layout().clone(),
                    blocks,
                    tokens: tokens.len() as u32,
                    cached_tokens: 0,
                });
                self.answers.push((a.reply, Ok(report)));
            }
        }
    }

    fn fail(&mut self, seq: SeqId, error: Error) {
        if let Some(pos) = self.pending.iter().position(|a| a.seq == seq) {
            let a = self.pending.remove(pos);
            self.drop_job(a, error);
        } else {
            self.engine.release(seq);
        }
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
