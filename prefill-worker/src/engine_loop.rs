//! The prefill worker's engine thread: the one owner of the engine and its block pool.
//!
//! service --Command (bounded)--> [engine thread: queue -> chunked prefill steps] --KvSegment-->
//!     per-handoff channel --> transport task --> decode worker
//!
//! Each step computes prompt chunks of several requests (`queue::plan_step`); after each layer
//! the blocks that step wrote leave for push handoffs while later layers compute. A finished
//! prompt's first token is sampled here. Push: the sequence is freed at once (its bytes are in
//! flight). Pull: the sequence stays pinned under a lease until the decode worker releases it or
//! the lease expires.
//!
//! Invariants: only this thread touches the engine; every sequence leaves the engine exactly once
//! (job finished or failed, lease released or expired).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use baton_engine::{Engine, KvChunk, SampledToken, Sampler, SamplingParams, SeqId};
use baton_kv_transfer::{HandoffId, KvSegment, LeaseKind, Leases, max_blocks_per_segment};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::queue::{self, Limits, Progress};

/// What a prefill job does with its KV.
#[derive(Debug)]
pub enum JobShape {
    /// Push: every layer's new blocks go to `segments` as soon as the layer is computed.
    Push { segments: mpsc::Sender<KvSegment> },
    /// Pull: the KV stays pinned for `ttl` (renewed while the decode worker reads).
    Pull { ttl: Duration },
}

/// One prompt to prefill.
#[derive(Debug)]
pub struct PrefillJob {
    pub handoff: HandoffId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub shape: JobShape,
}

/// What a finished prefill reports.
#[derive(Debug, Clone)]
pub struct Prefilled {
    pub first_token: SampledToken,
    /// When the last step of this prompt finished: transfer time after it is exposed.
    pub compute_done: Instant,
    /// Time from admission to the first step that computed this prompt.
    pub queued: Duration,
    /// Time from the first step to `compute_done`.
    pub compute: Duration,
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

enum Command {
    Prefill {
        job: PrefillJob,
        reply: oneshot::Sender<Result<Prefilled>>,
    },
    Pull {
        handoff: HandoffId,
        segments: mpsc::Sender<KvSegment>,
        reply: oneshot::Sender<Result<()>>,
    },
    Release {
        handoff: HandoffId,
        reply: oneshot::Sender<bool>,
    },
    /// The server has stopped: end the engine thread even if handles remain (connection tasks
    /// of a stopped server may outlive it).
    Stop,
    /// Drain deadline: fail every queued prompt, free every pull source.
    AbortAll,
}

/// What the engine thread publishes after each turn of its loop: for metrics, and for a drain
/// waiting until nothing is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub load: Load,
    pub stats: LoopStats,
    /// No prompt queued or computing, no pull source leased.
    pub idle: bool,
}

/// A cloneable handle to the engine thread. Commands go through a bounded channel: when it is
/// full the worker is overloaded and says so instead of queueing without bound.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Snapshot>,
}

impl EngineHandle {
    /// Queues a prompt and waits for its first token.
    pub async fn prefill(&self, job: PrefillJob) -> Result<Prefilled> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Prefill { job, reply })?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Sends a pull source's KV into `segments`; returns once every segment is queued.
    pub async fn pull(&self, handoff: HandoffId, segments: mpsc::Sender<KvSegment>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Pull {
            handoff,
            segments,
            reply,
        })?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Ends a pull lease. Returns whether it was live.
    pub async fn release(&self, handoff: HandoffId) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        // Releases free blocks: they must not be refused for overload.
        self.tx
            .send(Command::Release { handoff, reply })
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

    /// Resolves when nothing is queued, computing or leased (at once if nothing is).
    pub async fn wait_idle(&self) {
        let mut snapshot = self.snapshot.clone();
        // An error means the engine thread ended, which leaves nothing pinned either.
        let _ = snapshot.wait_for(|s| s.idle).await;
    }

    /// Ends the engine thread (after the server stopped), failing whatever is left.
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }

    /// Fails every queued prompt with [`Error::DrainDeadline`] and frees every pull source.
    pub async fn abort_all(&self) -> Result<()> {
        self.tx
            .send(Command::AbortAll)
            .await
            .map_err(|_| Error::Stopped)
    }

    /// The engine's load and counters as of its last turn.
    pub fn snapshot(&self) -> Snapshot {
        *self.snapshot.borrow()
    }

    /// Follows the snapshots (for a metrics collector).
    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    fn submit(&self, cmd: Command) -> Result<()> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                what: "prefill queue",
            },
            mpsc::error::TrySendError::Closed(_) => Error::Stopped,
        })
    }
}

/// Engine-thread settings.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Commands that may wait for the engine thread.
    pub queue_capacity: usize,
    /// Prompts admitted into the prefill queue at once.
    pub max_pending: usize,
    /// Longest lease a pull may ask for.
    pub max_lease_ttl: Duration,
}

/// Starts the engine thread. It stops when every handle is dropped.
pub fn spawn(
    engine: Engine,
    config: LoopConfig,
    rt: Handle,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let cfg = engine.config();
    let limits = Limits {
        chunk_tokens: cfg.prefill_chunk_tokens,
        max_batch_tokens: cfg.max_batch_tokens,
        block_size: cfg.block_size,
    };
    let (published, snapshot) = watch::channel(Snapshot::default());
    let mut state = Loop {
        stopped: false,
        published,
        leases: Leases::new(config.max_lease_ttl),
        engine,
        pending: Vec::new(),
        next_seq: 0,
        limits,
        max_pending: config.max_pending,
        stats: LoopStats::default(),
        rx,
        rt,
    };
    // The real state before anyone can read it: a load report taken before the thread's first
    // turn would otherwise say no block is free, and the coordinator, which sees the worker
    // healthy, would place nothing on it until its next poll.
    state.published.send_replace(state.snapshot());
    let join = std::thread::Builder::new()
        .name("prefill-engine".into())
        .spawn(move || state.run())?;
    Ok((EngineHandle { tx, snapshot }, join))
}

struct Active {
    seq: SeqId,
    job: PrefillJob,
    reply: oneshot::Sender<Result<Prefilled>>,
    admitted: Instant,
    started: Option<Instant>,
    /// Blocks below this have been sent (push): a recomputed chunk is not sent twice.
    sent_blocks: u32,
}

struct Loop {
    /// Set by `Stop`: the loop ends at its next turn.
    stopped: bool,
    published: watch::Sender<Snapshot>,
    engine: Engine,
    pending: Vec<Active>,
    leases: Leases<SeqId>,
    next_seq: u64,
    limits: Limits,
    max_pending: usize,
    stats: LoopStats,
    rx: mpsc::Receiver<Command>,
    rt: Handle,
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
            self.expire(Instant::now());
            self.cancel_abandoned();
            let now = self.snapshot();
            self.published
                .send_if_modified(|was| std::mem::replace(was, now) != now);
            let stepped = !self.pending.is_empty() && self.step();
            if !stepped && !self.wait() {
                return self.shutdown();
            }
        }
    }

    /// Blocks until a command arrives or the next lease falls due. False when every handle is
    /// gone.
    fn wait(&mut self) -> bool {
        let deadline = self.leases.next_deadline();
        let rx = &mut self.rx;
        let got = self.rt.block_on(async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), rx.recv()).await.ok(),
                None => Some(rx.recv().await),
            }
        });
        match got {
            Some(Some(cmd)) => {
                self.handle(cmd);
                true
            }
            Some(None) => false,
            None => true,
        }
    }

    fn shutdown(&mut self) {
        self.abort_all(|| Error::Stopped);
    }

    /// Fails every queued prompt with `error()` and frees every pull source.
    fn abort_all(&mut self, error: impl Fn() -> Error) {
        for a in self.pending.drain(..) {
            self.engine.release(a.seq);
            let _ = a.reply.send(Err(error()));
        }
        for (_, seq) in self.leases.drain() {
            self.engine.release(seq);
        }
    }

    /// Drops prompts whose caller stopped waiting (its deadline passed, or it went away): no
    /// step is spent on them and their blocks return to the pool.
    fn cancel_abandoned(&mut self) {
        let engine = &mut self.engine;
        self.pending.retain(|a| {
            if a.reply.is_closed() {
                tracing::debug!(handoff = %a.job.handoff, "caller gone; prefill cancelled");
                engine.release(a.seq);
                false
            } else {
                true
            }
        });
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            load: Load {
                pending: self.pending.len() as u32,
                free_blocks: self.engine.free_blocks() as u32,
                total_blocks: self.engine.total_blocks() as u32,
                leases: self.leases.len() as u32,
            },
            stats: self.stats,
            idle: self.pending.is_empty() && self.leases.is_empty(),
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Prefill { job, reply } => self.admit(job, reply),
            Command::Pull {
                handoff,
                segments,
                reply,
            } => {
                let _ = reply.send(self.pull(handoff, &segments));
            }
            Command::Release { handoff, reply } => {
                let released = self.leases.release(handoff);
                if let Some(seq) = released {
                    self.engine.release(seq);
                    self.stats.leases_released += 1;
                }
                let _ = reply.send(released.is_some());
            }
            Command::Stop => self.stopped = true,
            Command::AbortAll => {
                let (prompts, leases) = (self.pending.len(), self.leases.len());
                self.abort_all(|| Error::DrainDeadline);
                tracing::warn!(
                    prompts,
                    leases,
                    "drain deadline passed: prompts failed, pull sources freed"
                );
            }
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
        if self.leases.contains(job.handoff)
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
        self.pending.push(Active {
            seq,
            job,
            reply,
            admitted: Instant::now(),
            started: None,
            sent_blocks: 0,
        });
    }

    /// Runs one step. False when nothing could run (waiting on leases to free blocks).
    fn step(&mut self) -> bool {
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
        let items = queue::plan_step(&progress, self.limits, self.engine.free_blocks());
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
        let kv_heads = self.engine.descriptor().kv_heads.clone();
        // seq -> (handoff, channel, blocks already sent)
        let mut push: HashMap<SeqId, (HandoffId, mpsc::Sender<KvSegment>, u32)> = HashMap::new();
        for a in &mut self.pending {
            if !items.iter().any(|it| it.seq == a.seq) {
                continue;
            }
            a.started.get_or_insert(now);
            if let JobShape::Push { segments } = &a.job.shape {
                push.insert(a.seq, (a.job.handoff, segments.clone(), a.sent_blocks));
            }
        }
        let export: Vec<SeqId> = push.keys().copied().collect();
        let mut broken: Vec<SeqId> = Vec::new();
        let mut sink = |seq: SeqId, chunk: KvChunk| -> baton_engine::Result<()> {
            let Some((handoff, tx, sent)) = push.get(&seq) else {
                return Ok(());
            };
            if chunk.first_block + chunk.num_blocks <= *sent || broken.contains(&seq) {
                return Ok(());
            }
            let segment = KvSegment {
                handoff: *handoff,
                kv_heads: kv_heads.clone(),
                chunk,
            };
            // Waits while the transport is behind: back-pressure reaches the compute.
            if tx.blocking_send(segment).is_err() {
                broken.push(seq);
            }
            Ok(())
        };
        let result = self.engine.step_with_export(&items, &export, &mut sink);
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
        for seq in broken {
            self.fail(
                seq,
                Error::Transfer("the transport to the decode worker stopped taking kv".into()),
            );
        }
        for out in outputs {
            let Some(logits) = out.logits else { continue };
            let Some(pos) = self.pending.iter().position(|a| a.seq == out.seq) else {
                continue;
            };
            let a = self.pending.remove(pos);
            let first_token = Sampler::new(&a.job.params, &a.job.prompt).sample(&logits);
            let started = a.started.unwrap_or(now);
            let report = Prefilled {
                first_token,
                compute_done: done,
                queued: started.saturating_duration_since(a.admitted),
                compute: done.saturating_duration_since(started),
            };
            match a.job.shape {
                JobShape::Push { .. } => {
                    self.engine.release(a.seq);
                    let _ = a.reply.send(Ok(report));
                }
                JobShape::Pull { ttl } => {
                    match self
                        .leases
                        .grant(a.job.handoff, LeaseKind::PullSource, ttl, done, a.seq)
                    {
                        Ok(()) => {
                            let _ = a.reply.send(Ok(report));
                        }
                        Err(e) => {
                            self.engine.release(a.seq);
                            let _ = a.reply.send(Err(Error::InvalidRequest {
                                field: "ttl_ms",
                                reason: e.to_string(),
                            }));
                        }
                    }
                }
            }
        }
        true
    }

    fn fail(&mut self, seq: SeqId, error: Error) {
        if let Some(pos) = self.pending.iter().position(|a| a.seq == seq) {
            let a = self.pending.remove(pos);
            let _ = a.reply.send(Err(error));
        }
        self.engine.release(seq);
    }

    /// The decode worker's read of a pull source: every layer, every block.
    fn pull(&mut self, handoff: HandoffId, segments: &mpsc::Sender<KvSegment>) -> Result<()> {
        let seq = *self
            .leases
            .get(handoff)
            .ok_or(Error::UnknownHandoff(handoff))?;
        let layers = self.engine.model_config().num_layers;
        let blocks = self.engine.blocks_held(seq)?;
        let kv_heads = self.engine.descriptor().kv_heads.clone();
        let descriptor = self.engine.descriptor();
        let block_bytes = descriptor.bytes_per_token_half() * 2 * descriptor.block_size as usize;
        let run = max_blocks_per_segment(block_bytes);
        for layer in 0..layers {
            self.leases.renew(handoff, Instant::now());
            for first in (0..blocks).step_by(run) {
                let chunk = self
                    .engine
                    .export(seq, layer, first..(first + run).min(blocks))?;
                let segment = KvSegment {
                    handoff,
                    kv_heads: kv_heads.clone(),
                    chunk,
                };
                segments.blocking_send(segment).map_err(|_| {
                    Error::Transfer("the transport to the decode worker stopped taking kv".into())
                })?;
            }
        }
        self.leases.renew(handoff, Instant::now());
        Ok(())
    }

    fn expire(&mut self, now: Instant) {
        for (handoff, kind, seq) in self.leases.expire(now) {
            self.engine.release(seq);
            self.stats.leases_expired += 1;
            tracing::warn!(%handoff, kind = kind.as_str(), "lease expired; blocks freed");
        }
    }
}
