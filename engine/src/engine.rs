//! The engine: one model, one KV cache, and the sequences that live in it. A step computes a
//! batch of sequence slices; everything about *which* slices (scheduling, sampling, stopping)
//! lives above, in the batcher.
//!
//! One owner: an `Engine` is driven by a single task or thread. It is `Send`, not shared.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_text::Tokenizer;

use crate::config::{EngineConfig, KvDType, ModelConfig, WeightPlan};
use baton_kv_transfer::agent::KvRegion;
use baton_kv_transfer::memory::PoolLayout;

use crate::kv::{
    BlockHash, BlockId, BlockTable, Fingerprint, KvCache, KvChunk, KvSource, LayoutDescriptor,
    PoolStats,
};
use crate::model::{Model, SeqInput};
use crate::weights::{self, Phase};
use crate::{Error, Result, SeqId};
use baton_core::{KvEvent, block_hashes, extend_block_hashes, reusable_blocks};

/// A sequence's tokens and the KV computed for them so far.
#[derive(Debug)]
struct Sequence {
    /// Prompt plus generated tokens.
    tokens: Vec<u32>,
    /// How many leading tokens have KV in the cache.
    computed: usize,
    table: BlockTable,
    /// For a sequence whose KV is arriving from another engine: per layer, which blocks landed.
    importing: Option<Vec<Vec<bool>>>,
    /// Names of the sequence's first full blocks, as many as were needed so far
    /// ([`extend_block_hashes`]).
    names: Vec<BlockHash>,
    /// How many of `table`'s leading blocks were offered to the prefix cache's index.
    named: usize,
    /// Position of the first token whose KV a decode step computed: blocks from there on are
    /// [`KvSource::Decode`].
    first_decoded: Option<usize>,
    /// Tokens the prefix cache supplied for the sequence's first step (an attach a scheduler
    /// took back does not count).
    cached: Option<usize>,
}

impl Sequence {
    fn new(tokens: Vec<u32>, computed: usize, table: BlockTable) -> Self {
        Self {
            tokens,
            computed,
            table,
            importing: None,
            names: Vec::new(),
            named: 0,
            first_decoded: None,
            cached: None,
        }
    }

    /// Offers every full block computed so far and not yet offered to the prefix cache's index,
    /// as a decode block when a decode step wrote any of its tokens.
    fn name_full_blocks(&mut self, fingerprint: &Fingerprint, block_size: usize) {
        let full = (self.computed / block_size).min(self.table.len());
        if self.named >= full {
            return;
        }
        extend_block_hashes(
            fingerprint,
            block_size,
            &self.tokens[..full * block_size],
            &mut self.names,
        );
        for b in self.named..full {
            let source = match self.first_decoded {
                Some(d) if d < (b + 1) * block_size => KvSource::Decode,
                _ => KvSource::Prefill,
            };
            self.table.name(b, self.names[b], source);
        }
        self.named = full;
    }
}

/// What the prefix cache saved, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens of sequences admitted so far (counted once per sequence).
    pub prompt_tokens: u64,
    /// Of those, tokens whose KV came from the cache instead of being computed.
    pub hit_tokens: u64,
    /// The pool: cached and idle blocks, evictions.
    pub pool: PoolStats,
}

/// One sequence's share of a step: compute KV for its next `tokens` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepItem {
    pub seq: SeqId,
    pub tokens: usize,
    pub phase: Phase,
}

/// What a step returns for one item.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StepOutput {
    pub seq: SeqId,
    /// Next-token logits, present when the item reached the end of the sequence's tokens.
    pub logits: Option<Vec<f32>>,
}

/// One layer of a step's blocks for a sequence being exported ([`Engine::step_with_layers`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReady {
    pub seq: SeqId,
    pub layer: u32,
    /// The sequence's blocks in token order.
    pub blocks: Vec<BlockId>,
    /// Positions with KV once this step is done: the rows of `range` up to it are filled.
    pub tokens: usize,
    /// Indices into `blocks` of the blocks this step wrote.
    pub range: Range<usize>,
}

/// What loading cost, for `baton bench engine` and logs.
#[derive(Debug, Clone, Copy)]
pub struct LoadStats {
    pub elapsed: Duration,
}

/// The other ranks of a group whose rank 0 (the first stage's first tensor-parallel rank) is
/// this engine: every operation that changes sequences or blocks here is given to them too, in
/// the same order, and a step runs through all of them ([`crate::local_group::RankOp`]).
pub trait Followers: Send {
    /// Gives every other rank `op` (never a step) and waits for them.
    fn apply(&mut self, op: crate::local_group::RankOp) -> Result<()>;
    /// Starts `items`' step on the other ranks of this engine's stage, which meet this one in
    /// their all-reduces; does not wait.
    fn start_step(&mut self, items: &[StepItem]) -> Result<()>;
    /// Waits for this stage's other ranks, then runs the later stages from `hidden` (this
    /// stage's output) and returns the last stage's outputs; `None` with a single stage (this
    /// engine computed the logits).
    fn finish_step(
        &mut self,
        items: &[StepItem],
        hidden: Option<Vec<f32>>,
    ) -> Result<Option<Vec<StepOutput>>>;
}

pub struct Engine {
    model: Model,
    /// The group's other ranks, when this engine leads one.
    followers: Option<Box<dyn Followers>>,
    /// A follower failed an operation this engine applied: the ranks may disagree, so nothing
    /// more runs.
    broken: bool,
    tokenizer: Tokenizer,
    cache: KvCache,
    config: EngineConfig,
    plan: WeightPlan,
    descriptor: LayoutDescriptor,
    max_context: usize,
    seqs: HashMap<SeqId, Sequence>,
    load_stats: LoadStats,
    prefix: PrefixStats,
}

impl Engine {
    /// Loads the model named by the config and allocates the KV pool.
    pub fn load(config: EngineConfig) -> Result<Self> {
        Self::load_rank(config, None)
    }

    /// Loads the part of the model `config.shard` names, one rank of a worker group
    /// ([`crate::shard`]): a tensor-parallel rank completes its products with the others
    /// through `collective` (required when `shard.tp_size` > 1); a pipeline stage holds its
    /// layers and their KV only.
    pub fn load_rank(
        config: EngineConfig,
        collective: Option<Arc<dyn baton_collective::Collective>>,
    ) -> Result<Self> {
        config.validate()?;
        let started = Instant::now();
        let device = config.device.open()?;
        let plan = WeightPlan::resolve(config.weights, config.role);
        let kernels = config.device.kernels(config.cpu_kernels);
        let (weights, tokenizer) = if is_gguf(&config.model) {
            let (weights, content) =
                weights::load_gguf(&config.model, plan, &config.shard, kernels, &device)?;
            let tokenizer = Tokenizer::from_gguf(&config.model, &content.metadata)?;
            (weights, tokenizer)
        } else {
            let weights =
                weights::load_safetensors(&config.model, plan, &config.shard, kernels, &device)?;
            (weights, Tokenizer::from_hf_dir(&config.model)?)
        };
        let model_max = weights.config.max_position;
        let max_context = config.max_context.unwrap_or(model_max).min(model_max);
        let fingerprint = fingerprint(&weights.config, &weights.weights_digest, &tokenizer);
        let shard = weights.shard.clone();
        let model = Model::new(weights, max_context, kernels, &device, collective)?;
        let mc = model.config();
        let span = |r: &Range<usize>| r.start as u32..r.end as u32;
        let descriptor = LayoutDescriptor {
            fingerprint,
            dtype: config.kv_dtype,
            block_size: config.block_size as u32,
            num_layers: mc.num_layers as u32,
            layers: span(&shard.layers),
            num_kv_heads: mc.num_kv_heads as u32,
            kv_heads: span(&shard.kv_heads),
            head_dim: mc.head_dim as u32,
        };
        let cache = KvCache::new(
            mc,
            descriptor.clone(),
            config.kv_cache_bytes,
            kernels,
            config.pool_memory,
            &device,
        )?;
        let load_stats = LoadStats {
            elapsed: started.elapsed(),
        };
        tracing::info!(
            model = %config.model.display(),
            architecture = mc.architecture.name(),
            prefill_weights = ?plan.prefill,
            decode_weights = ?plan.decode,
            kernels = kernels.name(),
            layers = ?shard.layers,
            tp_rank = shard.tp_rank,
            tp_size = shard.tp_size,
            kv_blocks = cache.allocator().total_blocks(),
            fingerprint = %fingerprint,
            load_ms = load_stats.elapsed.as_millis() as u64,
            "engine loaded"
        );
        Ok(Self {
            model,
            followers: None,
            broken: false,
            tokenizer,
            cache,
            config,
            plan,
            descriptor,
            max_context,
            seqs: HashMap::new(),
            load_stats,
            prefix: PrefixStats::default(),
        })
    }

    /// Makes this engine the leader of its group: every later operation is given to `followers`
    /// too. The engine must be rank 0 (the first stage's first tensor-parallel rank), and no
    /// sequence may exist yet.
    pub fn lead(&mut self, followers: Box<dyn Followers>) -> Result<()> {
        let first = self.descriptor.layers.start == 0 && self.descriptor.kv_heads.start == 0;
        if !first || !self.seqs.is_empty() {
            return Err(Error::invalid(
                "group",
                "only rank 0 of a group, before any sequence, leads it",
            ));
        }
        self.followers = Some(followers);
        Ok(())
    }

    /// Whether this engine leads a group of other ranks.
    pub fn leads_group(&self) -> bool {
        self.followers.is_some()
    }

    /// Gives the group's other ranks an operation this engine just applied.
    fn mirror(&mut self, op: crate::local_group::RankOp) -> Result<()> {
        let Some(f) = self.followers.as_mut() else {
            return Ok(());
        };
        if self.broken {
            return Err(Error::GroupBroken);
        }
        f.apply(op).inspect_err(|_| self.broken = true)
    }

    /// Refuses what a group cannot do yet: KV into or out of it moves rank to rank, which the
    /// workers do not carry yet.
    fn single(&self, what: &'static str) -> Result<()> {
        if self.followers.is_some() {
            return Err(Error::GroupHandoff(what));
        }
        Ok(())
    }

    /// The model's tokenizer (cheap to clone).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn weight_plan(&self) -> WeightPlan {
        self.plan
    }

    pub fn descriptor(&self) -> &LayoutDescriptor {
        &self.descriptor
    }

    pub fn load_stats(&self) -> LoadStats {
        self.load_stats
    }

    /// Longest sequence (prompt plus generated tokens) this engine accepts.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn block_size(&self) -> usize {
        self.cache.block_size()
    }

    pub fn free_blocks(&self) -> usize {
        self.cache.allocator().free_blocks()
    }

    pub fn total_blocks(&self) -> usize {
        self.cache.allocator().total_blocks()
    }

    /// Blocks a sequence of `tokens` tokens occupies.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cache.block_size())
    }

    /// Bytes one layer's K plus V of `tokens` tokens occupies (what a transfer moves per layer).
    pub fn kv_layer_bytes(&self, tokens: usize) -> usize {
        self.cache.layer_bytes(tokens)
    }

    pub fn kv_dtype(&self) -> KvDType {
        self.cache.dtype()
    }

    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Registers a sequence; blocks are taken only as its tokens are computed.
    pub fn add_sequence(&mut self, id: SeqId, tokens: Vec<u32>) -> Result<()> {
        self.check_new(id, &tokens)?;
        let table = self.cache.allocator().new_table();
        let mirrored = self.followers.as_ref().map(|_| tokens.clone());
        self.seqs.insert(id, Sequence::new(tokens, 0, table));
        if let Some(tokens) = mirrored {
            self.mirror(crate::local_group::RankOp::Add(id, tokens))?;
        }
        Ok(())
    }

    /// Starts a registered sequence that holds no blocks yet from the longest prefix of its
    /// tokens the prefix cache holds (whole blocks, and never the last token, whose logits
    /// sample the next one). Returns the tokens it now has KV for; 0 with the cache off, or for
    /// a sequence that already holds blocks. A scheduler calls it when it admits the sequence,
    /// and [`Engine::evict`]s it again if the rest does not fit, so a waiting sequence holds no
    /// blocks.
    pub fn attach_cached_prefix(&mut self, id: SeqId) -> Result<usize> {
        let attached = self.attach_cached_prefix_here(id)?;
        self.mirror(crate::local_group::RankOp::AttachCachedPrefix(id))?;
        Ok(attached)
    }

    fn attach_cached_prefix_here(&mut self, id: SeqId) -> Result<usize> {
        let bs = self.cache.block_size();
        let fingerprint = self.descriptor.fingerprint;
        let (enabled, reuse) = (self.config.prefix_cache, self.config.prefix_reuse);
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        if !enabled || seq.computed > 0 || !seq.table.is_empty() || seq.importing.is_some() {
            return Ok(0);
        }
        let usable = reusable_blocks(seq.tokens.len(), bs);
        extend_block_hashes(&fingerprint, bs, &seq.tokens[..usable * bs], &mut seq.names);
        let found = seq
            .table
            .attach_cached(&seq.names[..usable], |s| reuse.accepts(s));
        let blocks = cached_blocks_for_exact_rows(
            seq.tokens.len(),
            bs,
            self.config.prefill_chunk_tokens,
            found,
        );
        // The blocks the rule drops stay cached.
        seq.table.truncate(blocks);
        seq.computed = blocks * bs;
        seq.named = blocks;
        Ok(seq.computed)
    }

    /// Tokens of a sequence's prompt the prefix cache supplied for its first step.
    pub fn cached_tokens(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.cached.unwrap_or(0))
    }

    /// What the prefix cache saved so far, and the pool's state.
    pub fn prefix_stats(&self) -> PrefixStats {
        PrefixStats {
            pool: self.cache.allocator().stats(),
            ..self.prefix
        }
    }

    fn check_new(&self, id: SeqId, tokens: &[u32]) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(Error::invalid("sequence", format!("{id} already exists")));
        }
        if tokens.is_empty() {
            return Err(Error::invalid("prompt", "is empty"));
        }
        if tokens.len() >= self.max_context {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{} tokens leave no room in the {}-token context",
                    tokens.len(),
                    self.max_context
                ),
            ));
        }
        let vocab = self.model.config().vocab_size as u32;
        if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
            return Err(Error::invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        Ok(())
    }

    /// Appends a generated token; its KV is computed by the next step that includes it.
    pub fn push_token(&mut self, id: SeqId, token: u32) -> Result<()> {
        let max = self.max_context;
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        if seq.tokens.len() >= max {
            return Err(Error::invalid(
                "max_tokens",
                "sequence reached the context length",
            ));
        }
        seq.tokens.push(token);
        self.mirror(crate::local_group::RankOp::Push(id, token))
    }

    pub fn tokens(&self, id: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(id)?.tokens)
    }

    /// Tokens whose KV is in the cache.
    pub fn computed(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.computed)
    }

    pub fn blocks_held(&self, id: SeqId) -> Result<usize> {
        Ok(self.seq(id)?.table.len())
    }

    fn seq(&self, id: SeqId) -> Result<&Sequence> {
        self.seqs.get(&id).ok_or(Error::UnknownSequence(id))
    }

    /// Drops a sequence and returns its blocks to the pool.
    pub fn release(&mut self, id: SeqId) -> bool {
        let found = self.seqs.remove(&id).is_some();
        if found && let Err(e) = self.mirror(crate::local_group::RankOp::Release(id)) {
            // The group is broken now (every later operation fails); the release itself
            // happened here.
            tracing::error!(error = %e, seq = %id, "a rank of the group failed a release");
        }
        found
    }

    /// Frees a sequence's KV but keeps its tokens, so a later step recomputes them (preemption).
    pub fn evict(&mut self, id: SeqId) -> Result<()> {
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        seq.table.clear();
        seq.computed = 0;
        seq.named = 0;
        seq.first_decoded = None;
        self.mirror(crate::local_group::RankOp::Evict(id))
    }

    /// Grows a sequence's block table to hold `tokens` tokens (all or nothing).
    pub fn reserve_blocks(&mut self, id: SeqId, tokens: usize) -> Result<()> {
        let bs = self.cache.block_size();
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        seq.table.ensure_capacity(tokens, bs)?;
        self.mirror(crate::local_group::RankOp::ReserveBlocks(id, tokens))
    }

    /// Runs one step. Every item's blocks are reserved first, all or nothing: on
    /// `KvCacheFull` nothing was computed and the caller may evict and retry.
    pub fn step(&mut self, items: &[StepItem]) -> Result<Vec<StepOutput>> {
        self.step_with_export(items, &[], &mut |_, _| Ok(()))
    }

    /// Like [`Engine::step`], and after each layer hands to `sink` that layer's KV of the blocks
    /// this step wrote for every sequence in `export`, as bytes, so it can travel while later
    /// layers compute. Prefill chunks are whole blocks (see `prefill_chunk_tokens`), so
    /// exporting every chunk of a prompt sends each block exactly once.
    pub fn step_with_export(
        &mut self,
        items: &[StepItem],
        export: &[SeqId],
        sink: &mut dyn FnMut(SeqId, KvChunk) -> Result<()>,
    ) -> Result<Vec<StepOutput>> {
        self.step_with_layers(items, export, &mut |cache, ready| {
            let chunk = cache.export(
                ready.layer as usize,
                &ready.blocks,
                ready.tokens,
                ready.range.clone(),
            )?;
            sink(ready.seq, chunk)
        })
    }

    /// Like [`Engine::step`], and after each layer tells `sink` which blocks of every sequence
    /// in `export` that layer filled in this step ([`LayerReady`]), so the caller can send them
    /// (reading the pool itself, or through `cache`) while later layers compute. The rows of a
    /// ready layer are final for this step: later layers write other storage.
    pub fn step_with_layers(
        &mut self,
        items: &[StepItem],
        export: &[SeqId],
        sink: &mut dyn FnMut(&KvCache, LayerReady) -> Result<()>,
    ) -> Result<Vec<StepOutput>> {
        Ok(self.run_step(items, export, None, sink)?.0)
    }

    /// One step of a pipeline stage ([`crate::shard`]): the first stage embeds the items'
    /// tokens (`hidden` is `None`), a later one starts from `hidden`, the previous stage's
    /// output for the same items. Returns the outputs (logits on the last stage's rank 0, none
    /// elsewhere) and, before the last stage, the hidden states the next stage takes. Every
    /// rank of a group is given the same items in the same order, so their block tables agree.
    pub fn step_stage(
        &mut self,
        items: &[StepItem],
        hidden: Option<&[f32]>,
    ) -> Result<(Vec<StepOutput>, Option<Vec<f32>>)> {
        self.run_step(items, &[], hidden, &mut |_, _| Ok(()))
    }

    fn run_step(
        &mut self,
        items: &[StepItem],
        export: &[SeqId],
        hidden: Option<&[f32]>,
        sink: &mut dyn FnMut(&KvCache, LayerReady) -> Result<()>,
    ) -> Result<(Vec<StepOutput>, Option<Vec<f32>>)> {
        if self.broken {
            return Err(Error::GroupBroken);
        }
        if !export.is_empty() {
            self.single("exporting a step's KV")?;
        }
        self.prepare(items)?;
        if let Some(f) = self.followers.as_mut() {
            // The stage's other ranks start now: they meet this one in the all-reduces.
            f.start_step(items).inspect_err(|_| self.broken = true)?;
        }
        let bs = self.cache.block_size();
        let mut inputs = Vec::with_capacity(items.len());
        for it in items {
            let seq = self.seq(it.seq)?;
            let end = seq.computed + it.tokens;
            // On the matmul attention path (candle's kernels) a prefill step attends over a
            // padded context (`prefill_attention_span`), so its numbers depend less on where
            // the prompt ends ([`SeqInput::attend_to`]); baton's CPU kernel needs no padding.
            let attend_to = match it.phase {
                Phase::Prefill => self
                    .config
                    .prefill_attention_span
                    .span(end, self.config.prefill_chunk_tokens),
                Phase::Decode => end,
            };
            inputs.push(SeqInput {
                table: &seq.table,
                start: seq.computed,
                tokens: &seq.tokens[seq.computed..end],
                phase: it.phase,
                logits: end == seq.tokens.len(),
                attend_to,
            });
        }
        // (sequence, its blocks, positions with KV after this step, blocks this step wrote)
        let exported: Vec<(SeqId, Vec<BlockId>, usize, Range<usize>)> = export
            .iter()
            .filter_map(|id| {
                let it = items.iter().find(|it| it.seq == *id)?;
                Some(self.seq(*id).map(|s| {
                    let len = s.computed + it.tokens;
                    (
                        *id,
                        s.table.blocks().to_vec(),
                        len,
                        s.computed / bs..len.div_ceil(bs),
                    )
                }))
            })
            .collect::<Result<_>>()?;
        let cache = &self.cache;
        let model = &self.model;
        let seq_inputs = &inputs;
        // A step is a few hundred small kernel and tensor calls, each split over rayon's
        // workers. Run from the caller's thread, every call hands work to a worker and waits for
        // it (and the caller competes with both workers for the cores); run on a worker, the
        // step's calls split by work stealing, and the caller is woken once per step.
        let forward = if exported.is_empty() {
            rayon::scope(|_| model.forward(cache, seq_inputs, hidden, &mut |_| Ok(())))
        } else {
            // The forward pass runs on a worker as above, and tells this thread each finished
            // layer: the sink belongs to the caller's thread (it need not be `Send`). Running
            // the whole step on the caller's thread instead made a 2048-token prefill that
            // exports 40% slower than one that does not (`baton-lab transfer`, 2026-11-24). A
            // slow sink no longer holds the pass back; at most this step's layers wait.
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<u32>();
            let mut forward = None;
            let mut sunk = Ok(());
            rayon::in_place_scope(|scope| {
                let forward = &mut forward;
                scope.spawn(move |_| {
                    *forward = Some(model.forward(cache, seq_inputs, hidden, &mut |l| {
                        // The caller stopped listening: its sink failed, and that error, not
                        // this one, is the step's.
                        if ready_tx.send(l as u32).is_err() {
                            return Err(Error::Internal("the export sink stopped"));
                        }
                        Ok(())
                    }));
                });
                // Ends when the forward pass drops its sender, finished or failed.
                'layers: for layer in ready_rx.iter() {
                    for (seq, blocks, tokens, range) in &exported {
                        let ready = LayerReady {
                            seq: *seq,
                            layer,
                            blocks: blocks.clone(),
                            tokens: *tokens,
                            range: range.clone(),
                        };
                        if let Err(e) = sink(cache, ready) {
                            sunk = Err(e);
                            break 'layers;
                        }
                    }
                }
                drop(ready_rx);
            });
            sunk?;
            // The scope ends only after the spawned pass has run (a panic there resumes here).
            forward.ok_or(Error::Internal("the forward pass did not run"))?
        };
        drop(inputs);
        // A leader whose own pass failed leaves its followers mid-step: the group is done.
        let forward = match forward {
            Ok(f) => f,
            Err(e) => {
                self.broken |= self.followers.is_some();
                return Err(e);
            }
        };
        let crate::model::Forward { logits, hidden } = forward;
        let (logits, hidden_out) = match self.followers.as_mut() {
            Some(f) => match f.finish_step(items, hidden) {
                // Later stages computed the logits; this rank's stage output went to them.
                Ok(Some(last)) if last.len() == items.len() => {
                    (last.into_iter().map(|o| o.logits).collect(), None)
                }
                Ok(Some(_)) => {
                    self.broken = true;
                    return Err(Error::Internal("the last stage answered another step"));
                }
                Ok(None) => (logits, None),
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            },
            None => (logits, hidden),
        };
        let mut out = Vec::with_capacity(items.len());
        let fingerprint = self.descriptor.fingerprint;
        let naming = self.config.prefix_cache;
        for (it, logits) in items.iter().zip(logits) {
            if let Some(seq) = self.seqs.get_mut(&it.seq) {
                if it.phase == Phase::Decode && seq.first_decoded.is_none() {
                    seq.first_decoded = Some(seq.computed);
                }
                seq.computed += it.tokens;
                if naming {
                    seq.name_full_blocks(&fingerprint, bs);
                }
            }
            out.push(StepOutput {
                seq: it.seq,
                logits,
            });
        }
        Ok((out, hidden_out))
    }

    fn prepare(&mut self, items: &[StepItem]) -> Result<()> {
        let bs = self.cache.block_size();
        let mut needed = 0;
        for (i, it) in items.iter().enumerate() {
            if items[..i].iter().any(|o| o.seq == it.seq) {
                return Err(Error::invalid("step", format!("{} appears twice", it.seq)));
            }
            let seq = self.seq(it.seq)?;
            if seq.importing.is_some() {
                return Err(Error::invalid(
                    "step",
                    format!("{} is still importing its KV", it.seq),
                ));
            }
            if it.tokens == 0 || seq.computed + it.tokens > seq.tokens.len() {
                return Err(Error::invalid(
                    "step",
                    format!(
                        "{} has {} uncomputed tokens, asked for {}",
                        it.seq,
                        seq.tokens.len() - seq.computed,
                        it.tokens
                    ),
                ));
            }
            needed += (seq.computed + it.tokens)
                .div_ceil(bs)
                .saturating_sub(seq.table.len());
        }
        let free = self.free_blocks();
        if needed > free {
            return Err(Error::KvCacheFull { needed, free });
        }
        for it in items {
            let seq = self
                .seqs
                .get_mut(&it.seq)
                .ok_or(Error::UnknownSequence(it.seq))?;
            let target = seq.computed + it.tokens;
            seq.table.ensure_capacity(target, bs)?;
            if seq.cached.is_none() {
                // The sequence's first step: what it starts from is what the cache saved it.
                seq.cached = Some(seq.computed);
                self.prefix.prompt_tokens += seq.tokens.len() as u64;
                self.prefix.hit_tokens += seq.computed as u64;
            }
        }
        Ok(())
    }

    /// Exports one layer of a sequence's computed KV, blocks `blocks` of its table.
    pub fn export(&self, id: SeqId, layer: usize, blocks: Range<usize>) -> Result<KvChunk> {
        self.single("exporting KV")?;
        let seq = self.seq(id)?;
        self.cache
            .export(layer, seq.table.blocks(), seq.computed, blocks)
    }

    /// The pool as a transfer agent registers it ([`KvCache::kv_region`]).
    pub fn kv_region(&self) -> Arc<dyn KvRegion> {
        self.cache.kv_region()
    }

    /// Where every row lies in the pool's memory.
    pub fn pool_layout(&self) -> &PoolLayout {
        self.cache.pool_layout()
    }

    /// A sequence's blocks, in token order.
    pub fn block_ids(&self, id: SeqId) -> Result<&[BlockId]> {
        Ok(self.seq(id)?.table.blocks())
    }

    /// Takes a sequence out of the engine, keeping its KV: the returned table holds its blocks
    /// (and frees them when dropped), for a caller that pins them while another worker reads
    /// them. Returns its tokens too.
    pub fn detach(&mut self, id: SeqId) -> Result<(Vec<u32>, BlockTable)> {
        self.single("detaching a sequence's KV")?;
        let seq = self.seqs.remove(&id).ok_or(Error::UnknownSequence(id))?;
        Ok((seq.tokens, seq.table))
    }

    /// Blocks for `tokens` tokens, all or nothing, owned by the returned table: for KV another
    /// worker writes before a sequence exists ([`Engine::adopt`]).
    pub fn reserve_table(&mut self, tokens: usize) -> Result<BlockTable> {
        self.single("reserving blocks for KV from another worker")?;
        let mut table = self.cache.allocator().new_table();
        table.ensure_capacity(tokens, self.cache.block_size())?;
        Ok(table)
    }

    /// Blocks for `tokens`, all or nothing, starting with the longest prefix of them the prefix
    /// cache holds (whole blocks, never the last token's: the sender always has something to
    /// write, and its completion to send). Returns the table and the tokens it already holds,
    /// for a receiver that has another worker write only the rest ([`Engine::adopt`]).
    pub fn reserve_cached_table(&mut self, tokens: &[u32]) -> Result<(BlockTable, usize)> {
        self.single("reserving blocks for KV from another worker")?;
        let bs = self.cache.block_size();
        let mut table = self.cache.allocator().new_table();
        let mut cached = 0;
        if self.config.prefix_cache {
            let usable = reusable_blocks(tokens.len(), bs);
            let names = block_hashes(&self.descriptor.fingerprint, bs, &tokens[..usable * bs]);
            let reuse = self.config.prefix_reuse;
            cached = table.attach_cached(&names, |s| reuse.accepts(s)) * bs;
        }
        // On failure the table drops, and the cached blocks it held go back to idle.
        table.ensure_capacity(tokens.len(), bs)?;
        Ok((table, cached))
    }

    /// From now on, keeps the changes to the set of cached blocks this engine's prefix cache
    /// may reuse, for [`Engine::drain_kv_events`]: a worker calls it once and drains after
    /// every step. Nothing is kept with the cache off.
    pub fn record_kv_events(&self) {
        if self.config.prefix_cache {
            self.cache.allocator().record_events();
        }
    }

    /// The changes since the last drain, in order: blocks named that `prefix_reuse` would
    /// reuse, and blocks evicted.
    pub fn drain_kv_events(&self) -> Vec<KvEvent> {
        let reuse = self.config.prefix_reuse;
        self.cache
            .allocator()
            .drain_events()
            .into_iter()
            .filter(|(e, source)| matches!(e, KvEvent::Removed(_)) || reuse.accepts(*source))
            .map(|(e, _)| e)
            .collect()
    }

    /// Creates a sequence whose KV for every one of `tokens` is already in `table` (written by
    /// another worker and verified); it can decode at once.
    pub fn adopt(&mut self, id: SeqId, tokens: Vec<u32>, table: BlockTable) -> Result<()> {
        self.single("adopting KV another worker wrote")?;
        self.check_new(id, &tokens)?;
        if table.len() < tokens.len().div_ceil(self.cache.block_size()) {
            return Err(Error::KvImport(format!(
                "{} blocks cannot hold {} tokens",
                table.len(),
                tokens.len()
            )));
        }
        let computed = tokens.len();
        let mut seq = Sequence::new(tokens, computed, table);
        if self.config.prefix_cache {
            // Verified KV a prefill worker computed.
            seq.name_full_blocks(&self.descriptor.fingerprint, self.cache.block_size());
        }
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Creates a sequence whose KV for all of `tokens` will arrive by [`Engine::import`]: its
    /// blocks are reserved now (all or nothing), so the sender can write into them.
    pub fn begin_import(&mut self, id: SeqId, tokens: Vec<u32>) -> Result<()> {
        self.single("importing KV")?;
        self.check_new(id, &tokens)?;
        let mut table = self.cache.allocator().new_table();
        table.ensure_capacity(tokens.len(), self.cache.block_size())?;
        let blocks = table.len();
        let mut seq = Sequence::new(tokens, 0, table);
        seq.importing = Some(vec![vec![false; blocks]; self.cache.num_layers()]);
        self.seqs.insert(id, seq);
        Ok(())
    }

    /// Writes a received chunk. The caller has checked the sender's descriptor against ours
    /// ([`LayoutDescriptor::check_compatible`]) when the connection was set up.
    pub fn import(&mut self, id: SeqId, chunk: &KvChunk) -> Result<()> {
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        let landed = seq
            .importing
            .as_mut()
            .ok_or_else(|| Error::KvImport(format!("{id} is not importing")))?;
        self.cache.import(&seq.table, seq.tokens.len(), chunk)?;
        let blocks = chunk.first_block as usize..(chunk.first_block + chunk.num_blocks) as usize;
        for b in blocks {
            landed[chunk.layer as usize][b] = true;
        }
        Ok(())
    }

    /// Completes an import once every layer of every block has landed; the sequence can then
    /// decode. Fails, changing nothing, while any is missing.
    pub fn finish_import(&mut self, id: SeqId) -> Result<()> {
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id))?;
        let Some(landed) = &seq.importing else {
            return Err(Error::KvImport(format!("{id} is not importing")));
        };
        if let Some((layer, blocks)) = landed
            .iter()
            .enumerate()
            .find(|(_, b)| b.iter().any(|x| !x))
        {
            let missing = blocks.iter().filter(|x| !**x).count();
            return Err(Error::KvImport(format!(
                "{id}: layer {layer} is missing {missing} blocks"
            )));
        }
        seq.importing = None;
        seq.computed = seq.tokens.len();
        if self.config.prefix_cache {
            seq.name_full_blocks(&self.descriptor.fingerprint, self.cache.block_size());
        }
        Ok(())
    }
}

/// Rows below which candle's CPU matmul (the gemm crate) sums a row in another order than it
/// does within a larger matrix: a 1- or 2-row prefill step computes different last bits for
/// the same tokens than the chunk they belong to does (3 and more were measured to match; 4
/// keeps a margin).
const MIN_EXACT_ROWS: usize = 4;

/// Of `found` cached blocks at the start of an `n`-token prompt, how many to use so the rest is
/// prefilled in steps whose row counts give the bits a run without the cache gives: from a
/// prefix on the chunk grid every chunk is the cache-off run's; from one inside a chunk, the
/// first step (to the next grid line or the prompt's end) must be at least [`MIN_EXACT_ROWS`]
/// rows.
fn cached_blocks_for_exact_rows(n: usize, block_size: usize, chunk: usize, found: usize) -> usize {
    let mut blocks = found;
    while blocks > 0 {
        let prefix = blocks * block_size;
        let first_step = (prefix / chunk + 1) * chunk;
        if prefix.is_multiple_of(chunk) || first_step.min(n) - prefix >= MIN_EXACT_ROWS {
            break;
        }
        blocks -= 1;
    }
    blocks
}

/// What a group launcher needs of a model before any rank loads it: how many layers to split
/// over stages, and the widths tensor parallelism divides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
}

/// The shape of the model at `path` (a GGUF file or a Hugging Face directory), read from its
/// header or config.json without loading weights.
pub fn read_model_shape(path: &Path) -> Result<ModelShape> {
    if is_gguf(path) {
        let c = weights::gguf_model_config(path)?;
        return Ok(ModelShape {
            num_layers: c.num_layers,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            intermediate_size: c.intermediate_size,
        });
    }
    weights::hf_model_shape(path)
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn fingerprint(
    config: &ModelConfig,
    weights_digest: &[u8; 32],
    tokenizer: &Tokenizer,
) -> Fingerprint {
    let mut h = blake3::Hasher::new();
    h.update(b"baton-model-v1");
    // Serializing a plain struct of numbers and enums is deterministic.
    h.update(serde_json::to_string(config).unwrap_or_default().as_bytes());
    h.update(weights_digest);
    tokenizer.digest(&mut h);
    Fingerprint(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::cached_blocks_for_exact_rows as rule;

    #[test]
    fn a_cached_prefix_never_leaves_a_step_of_one_to_three_rows() {
        // 16-token blocks, 32-token chunks.
        assert_eq!(
            rule(18, 16, 32, 1),
            0,
            "2 rows after the prefix: recompute the block"
        );
        assert_eq!(rule(19, 16, 32, 1), 0, "3 rows: inside the margin");
        assert_eq!(rule(20, 16, 32, 1), 1, "4 rows");
        assert_eq!(
            rule(33, 16, 32, 2),
            2,
            "on the grid: the cache-off run's chunks"
        );
        assert_eq!(rule(49, 16, 32, 3), 2, "1 row: back to the grid");
        assert_eq!(rule(300, 16, 32, 18), 18);
        assert_eq!(
            rule(2, 1, 32, 1),
            0,
            "tiny blocks: down to nothing if need be"
        );
        assert_eq!(rule(40, 16, 32, 0), 0);
    }
}
