//! A worker group whose ranks are threads of this process: each rank its own [`Engine`] over its
//! shard ([`crate::shard`]), its own one-thread rayon pool, and, for tensor parallelism, its
//! stage's shared-memory collective. The tests and the lab run groups this way; the same
//! operations, given to every rank in the same order, are what rank processes will carry over
//! their links.
//!
//! ```text
//! driver --op--> every rank of stage 0 ... stage S-1 (same items, same order: same block tables)
//!        step:   stage 0 embeds -> hidden -> stage 1 -> ... -> last stage's rank 0: logits
//! ```
//!
//! A rank's step runs in its own pool: ranks sharing one pool would queue a rank's step behind
//! ranks that wait in the all-reduce for it.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use baton_collective::{Collective, ShmGroup};
use baton_core::LayoutDescriptor;
use baton_kv_transfer::agent::KvRegion;
use baton_kv_transfer::memory::PoolLayout;

use crate::kv::BlockId;
use crate::{BlockTable, Engine, EngineConfig, Error, Result, SeqId, Shard, StepItem, StepOutput};

/// Values one all-reduce of the local collective carries; longer ones are split.
const COLLECTIVE_VALUES: usize = 1 << 20;
/// How long a rank waits in an all-reduce for the others before the group counts as broken.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// What a group's driver asks of every rank, in the same order on every rank: the operations
/// that keep the ranks' sequences and block tables identical. Carried over a channel to a
/// thread here, over a link to a rank process ([`RankState`] applies them either way).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum RankOp {
    Add(SeqId, Vec<u32>),
    Push(SeqId, u32),
    /// One step of the rank's stage; a later stage's carries the previous stage's hidden
    /// states (carried beside the operation on a link, not in it).
    Step(Vec<StepItem>, #[serde(skip)] Option<Vec<f32>>),
    Release(SeqId),
    Evict(SeqId),
    AttachCachedPrefix(SeqId),
    ReserveBlocks(SeqId, usize),
    /// Blocks for a sequence whose KV another group writes, held until [`RankOp::Adopt`].
    Reserve(SeqId, usize),
    Adopt(SeqId, Vec<u32>),
    Blocks(SeqId),
    Pool,
}

/// A rank's answer to a [`RankOp`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum RankReply {
    Done,
    /// A step's outputs, and before the last stage its hidden states (carried beside the
    /// reply on a link).
    Stepped(Vec<StepOutput>, #[serde(skip)] Option<Vec<f32>>),
    Blocks(Vec<BlockId>),
    /// Free and total blocks.
    Pool(usize, usize),
}

/// One rank's engine and the blocks it holds for sequences not yet adopted: what applies a
/// group's operations.
pub struct RankState {
    engine: Engine,
    reserved: Vec<(SeqId, BlockTable)>,
}

impl RankState {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            reserved: Vec::new(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn apply(&mut self, op: RankOp) -> Result<RankReply> {
        let engine = &mut self.engine;
        match op {
            RankOp::Add(id, tokens) => engine.add_sequence(id, tokens).map(|_| RankReply::Done),
            RankOp::Push(id, token) => engine.push_token(id, token).map(|_| RankReply::Done),
            RankOp::Step(items, hidden) => engine
                .step_stage(&items, hidden.as_deref())
                .map(|(out, h)| RankReply::Stepped(out, h)),
            RankOp::Release(id) => {
                engine.release(id);
                self.reserved.retain(|(s, _)| *s != id);
                Ok(RankReply::Done)
            }
            RankOp::Evict(id) => engine.evict(id).map(|_| RankReply::Done),
            RankOp::AttachCachedPrefix(id) => {
                engine.attach_cached_prefix(id).map(|_| RankReply::Done)
            }
            RankOp::ReserveBlocks(id, tokens) => {
                engine.reserve_blocks(id, tokens).map(|_| RankReply::Done)
            }
            RankOp::Reserve(id, tokens) => engine.reserve_table(tokens).map(|table| {
                let blocks = table.blocks().to_vec();
                self.reserved.push((id, table));
                RankReply::Blocks(blocks)
            }),
            RankOp::Adopt(id, tokens) => match self.reserved.iter().position(|(s, _)| *s == id) {
                Some(i) => {
                    let (_, table) = self.reserved.swap_remove(i);
                    engine.adopt(id, tokens, table).map(|_| RankReply::Done)
                }
                None => Err(Error::UnknownSequence(id)),
            },
            RankOp::Blocks(id) => engine.block_ids(id).map(|b| RankReply::Blocks(b.to_vec())),
            RankOp::Pool => Ok(RankReply::Pool(engine.free_blocks(), engine.total_blocks())),
        }
    }
}

/// What the driver knows of one rank.
pub struct LocalRank {
    tx: Option<Sender<(RankOp, Sender<Result<RankReply>>)>>,
    thread: Option<JoinHandle<()>>,
    descriptor: LayoutDescriptor,
    pool: PoolLayout,
    region: Arc<dyn KvRegion>,
}

impl LocalRank {
    /// Loads `config`'s shard on a new thread; `collective` is its stage's group, if any.
    fn start(
        config: EngineConfig,
        collective: Option<(PathBuf, usize, usize)>,
    ) -> Result<LocalRank> {
        let (tx, rx) = channel::<(RankOp, Sender<Result<RankReply>>)>();
        let (loaded_tx, loaded_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("baton-rank".into())
            .spawn(
                move || match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                    Ok(pool) => pool.install(|| serve(config, collective, rx, loaded_tx)),
                    Err(_) => drop(loaded_tx),
                },
            )
            .map_err(|_| Error::Internal("a rank's thread could not start"))?;
        let (descriptor, pool, region) = loaded_rx
            .recv()
            .map_err(|_| Error::Internal("a rank's thread ended before it loaded"))??;
        Ok(LocalRank {
            tx: Some(tx),
            thread: Some(thread),
            descriptor,
            pool,
            region,
        })
    }

    pub fn descriptor(&self) -> &LayoutDescriptor {
        &self.descriptor
    }

    /// Where this rank's KV pool holds each row.
    pub fn pool(&self) -> &PoolLayout {
        &self.pool
    }

    /// This rank's KV pool, as a transfer reads and writes it.
    pub fn region(&self) -> &Arc<dyn KvRegion> {
        &self.region
    }

    fn send(&self, op: RankOp) -> Result<Receiver<Result<RankReply>>> {
        let (tx, rx) = channel();
        self.tx
            .as_ref()
            .and_then(|t| t.send((op, tx)).ok())
            .ok_or(Error::Internal("a rank's thread is gone"))?;
        Ok(rx)
    }
}

fn wait(rx: Receiver<Result<RankReply>>) -> Result<RankReply> {
    rx.recv()
        .map_err(|_| Error::Internal("a rank's thread ended mid-operation"))?
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        // Closing the channel ends the rank's loop.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Loaded = (LayoutDescriptor, PoolLayout, Arc<dyn KvRegion>);

fn serve(
    config: EngineConfig,
    collective: Option<(PathBuf, usize, usize)>,
    rx: Receiver<(RankOp, Sender<Result<RankReply>>)>,
    loaded: Sender<Result<Loaded>>,
) {
    let open = || -> Result<Engine> {
        let group = match collective {
            Some((path, rank, world)) => Some(Arc::new(ShmGroup::open(
                &path,
                rank,
                world,
                COLLECTIVE_VALUES,
                COLLECTIVE_TIMEOUT,
            )?) as Arc<dyn Collective>),
            None => None,
        };
        Engine::load_rank(config, group)
    };
    let engine = match open() {
        Ok(e) => e,
        Err(e) => {
            let _ = loaded.send(Err(e));
            return;
        }
    };
    let _ = loaded.send(Ok((
        engine.descriptor().clone(),
        engine.pool_layout().clone(),
        engine.kv_region(),
    )));
    let mut state = RankState::new(engine);
    for (op, reply) in rx {
        let _ = reply.send(state.apply(op));
    }
}

/// A group of `stages.len()` pipeline stages of `tp` tensor-parallel ranks each.
pub struct LocalGroup {
    /// Stage-major: rank `r` of stage `s` is `ranks[s * tp + r]`.
    ranks: Vec<LocalRank>,
    tp: usize,
    segments: Vec<PathBuf>,
}

static GROUPS: AtomicU64 = AtomicU64::new(0);

impl LocalGroup {
    /// Loads every rank of the group, each with `base`'s settings and its shard: the stages'
    /// layer ranges in order, `tp` ranks each.
    pub fn start(base: &EngineConfig, tp: usize, stages: &[Range<usize>]) -> Result<LocalGroup> {
        if tp == 0 || stages.is_empty() {
            return Err(Error::invalid(
                "group",
                "a group needs at least one stage of at least one rank",
            ));
        }
        let n = GROUPS.fetch_add(1, Ordering::Relaxed);
        let mut group = LocalGroup {
            ranks: Vec::with_capacity(tp * stages.len()),
            tp,
            segments: Vec::new(),
        };
        for (s, layers) in stages.iter().enumerate() {
            // A segment per launch: a crashed group's file is never reused.
            let segment = std::env::temp_dir().join(format!(
                "baton-local-group-{}-{n}-stage{s}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&segment);
            group.segments.push(segment.clone());
            // The stage's ranks load at once (each may be slow to read its shard).
            let loading: Vec<_> = (0..tp)
                .map(|r| {
                    let mut config = base.clone();
                    config.shard = Shard {
                        tp_rank: r,
                        tp_size: tp,
                        layers: Some(layers.clone()),
                    };
                    let collective = (tp > 1).then(|| (segment.clone(), r, tp));
                    std::thread::spawn(move || LocalRank::start(config, collective))
                })
                .collect();
            for handle in loading {
                let rank = handle
                    .join()
                    .map_err(|_| Error::Internal("a rank panicked while loading"))??;
                group.ranks.push(rank);
            }
        }
        Ok(group)
    }

    /// Every rank, stage-major.
    pub fn ranks(&self) -> &[LocalRank] {
        &self.ranks
    }

    /// Every rank's layout, stage-major: the shards a transfer plan maps.
    pub fn descriptors(&self) -> Vec<LayoutDescriptor> {
        self.ranks.iter().map(|r| r.descriptor.clone()).collect()
    }

    /// Gives every rank `op` and waits for all of them.
    fn all(&self, op: impl Fn() -> RankOp) -> Result<Vec<RankReply>> {
        let pending = self
            .ranks
            .iter()
            .map(|r| r.send(op()))
            .collect::<Result<Vec<_>>>()?;
        pending.into_iter().map(wait).collect()
    }

    pub fn add_sequence(&self, id: SeqId, tokens: &[u32]) -> Result<()> {
        self.all(|| RankOp::Add(id, tokens.to_vec())).map(drop)
    }

    pub fn push_token(&self, id: SeqId, token: u32) -> Result<()> {
        self.all(|| RankOp::Push(id, token)).map(drop)
    }

    pub fn release(&self, id: SeqId) -> Result<()> {
        self.all(|| RankOp::Release(id)).map(drop)
    }

    /// Reserves blocks for `tokens` tokens of a sequence whose KV another group will write, on
    /// every rank; returns each rank's blocks (stage-major). [`LocalGroup::adopt`] makes the
    /// sequence of them.
    pub fn reserve(&self, id: SeqId, tokens: usize) -> Result<Vec<Vec<BlockId>>> {
        self.all(|| RankOp::Reserve(id, tokens))?
            .into_iter()
            .map(blocks)
            .collect()
    }

    /// Creates on every rank the sequence whose KV was written into its reserved blocks.
    pub fn adopt(&self, id: SeqId, tokens: &[u32]) -> Result<()> {
        self.all(|| RankOp::Adopt(id, tokens.to_vec())).map(drop)
    }

    /// A sequence's blocks on every rank (stage-major).
    pub fn block_ids(&self, id: SeqId) -> Result<Vec<Vec<BlockId>>> {
        self.all(|| RankOp::Blocks(id))?
            .into_iter()
            .map(blocks)
            .collect()
    }

    /// Free and total blocks of every rank's pool (stage-major).
    pub fn pools(&self) -> Result<Vec<(usize, usize)>> {
        self.all(|| RankOp::Pool)?
            .into_iter()
            .map(|r| match r {
                RankReply::Pool(free, total) => Ok((free, total)),
                _ => Err(Error::Internal("a rank answered another operation")),
            })
            .collect()
    }

    /// One step through every stage; returns the outputs of the last stage's rank 0, the one
    /// that computes logits.
    pub fn step(&self, items: &[StepItem]) -> Result<Vec<StepOutput>> {
        let mut hidden: Option<Vec<f32>> = None;
        let mut outputs = Vec::new();
        for stage in self.ranks.chunks(self.tp) {
            let pending = stage
                .iter()
                .map(|r| r.send(RankOp::Step(items.to_vec(), hidden.clone())))
                .collect::<Result<Vec<_>>>()?;
            let mut results = Vec::with_capacity(stage.len());
            for rx in pending {
                match wait(rx)? {
                    RankReply::Stepped(out, h) => results.push((out, h)),
                    _ => return Err(Error::Internal("a rank answered another operation")),
                }
            }
            // Every rank of a stage ends its layers with the same all-reduced bits.
            if results.iter().any(|(_, h)| h != &results[0].1) {
                return Err(Error::Internal(
                    "the tensor-parallel ranks of a stage computed different hidden states",
                ));
            }
            let (out, h) = results.swap_remove(0);
            hidden = h;
            outputs = out;
        }
        Ok(outputs)
    }
}

fn blocks(r: RankReply) -> Result<Vec<BlockId>> {
    match r {
        RankReply::Blocks(b) => Ok(b),
        _ => Err(Error::Internal("a rank answered another operation")),
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        self.ranks.clear();
        for s in &self.segments {
            let _ = std::fs::remove_file(s);
        }
    }
}
