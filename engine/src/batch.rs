//! Continuous batching: the loop that decides, step by step, which sequences the engine computes.
//!
//! requests --submit--> [Batcher: waiting -> prefilling (chunks) -> decoding] --events--> stream
//!
//! Every step carries one token for each decoding sequence plus whole prefill chunks of
//! admitted prompts, within `max_batch_tokens`. Sequences join and leave between steps.
//!
//! Invariants:
//! - prefill chunk boundaries are fixed multiples of `prefill_chunk_tokens` from the start of
//!   the prompt, whatever else shares the step (a chunk that does not fit waits a step rather
//!   than shrinking), so a sequence's numbers are the same alone or in any batch;
//! - a finished, cancelled or failed sequence leaves the engine in the same step, and its blocks
//!   with it.

use std::collections::VecDeque;

use crate::engine::{Engine, StepItem};
use crate::weights::Phase;
use crate::{Error, Result, SeqId};
use baton_text::{FinishReason, SampledToken, Sampler, SamplingParams, finish_reason_after};

/// A request to generate from a prompt.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// What a step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token; `finish` is set on the sequence's last one.
    Token {
        seq: SeqId,
        token: SampledToken,
        finish: Option<FinishReason>,
        /// On a sequence's first generated token: prompt tokens the prefix cache supplied.
        cached: Option<u32>,
    },
    /// The sequence was dropped without finishing (its KV could never fit, say).
    Failed { seq: SeqId, error: String },
}

struct Active {
    id: SeqId,
    params: SamplingParams,
    sampler: Sampler,
    generated: u32,
    /// Set once the prompt (and anything preempted) is computed and the sequence decodes.
    decoding: bool,
    /// Tokens the client already has, in order (a stream migrated from a worker that died):
    /// each of the sequence's next steps draws as usual, to keep the sampler where the original
    /// run had it, then takes the next of these instead and emits nothing.
    replay: VecDeque<u32>,
    /// The `generated` count of the sequence's own first token (1, or past its replay): the
    /// token that reports the prompt tokens the prefix cache supplied.
    first_own: u32,
}

/// Counters for metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatcherStats {
    pub steps: u64,
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub preemptions: u64,
    /// Tokens replayed for migrated streams, and how many of them the replay's own draw chose
    /// differently (each one a step whose logits differ from the original run's).
    pub replayed_tokens: u64,
    pub replay_divergences: u64,
}

pub struct Batcher {
    engine: Engine,
    eos: Vec<u32>,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    stats: BatcherStats,
}

impl Batcher {
    /// `eos` are the model's end-of-sequence ids (from its tokenizer).
    pub fn new(engine: Engine, eos: Vec<u32>) -> Self {
        Self {
            engine,
            eos,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: BatcherStats::default(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    pub fn stats(&self) -> BatcherStats {
        self.stats
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a request. The prompt is checked now; its blocks are taken when it is admitted.
    pub fn submit(&mut self, req: GenerateRequest) -> Result<()> {
        if self.contains(req.id) {
            return Err(Error::invalid(
                "id",
                format!("{} is already running", req.id),
            ));
        }
        let room = self.engine.max_context().saturating_sub(req.prompt.len());
        if req.params.max_new_tokens as usize > room {
            return Err(Error::invalid(
                "max_tokens",
                format!(
                    "{} new tokens after a {}-token prompt exceed the {}-token context",
                    req.params.max_new_tokens,
                    req.prompt.len(),
                    self.engine.max_context()
                ),
            ));
        }
        let sampler = Sampler::new(&req.params, &req.prompt);
        self.engine.add_sequence(req.id, req.prompt)?;
        self.waiting.push_back(Active {
            id: req.id,
            params: req.params,
            sampler,
            generated: 0,
            decoding: false,
            replay: VecDeque::new(),
            first_own: 1,
        });
        Ok(())
    }

    /// Continues a sequence whose prompt KV was imported into the engine
    /// ([`Engine::begin_import`] .. [`Engine::finish_import`]) and whose first token the prefill
    /// side sampled. Decoding starts on the next step.
    pub fn resume_imported(
        &mut self,
        id: SeqId,
        params: SamplingParams,
        first_token: u32,
    ) -> Result<()> {
        if self.contains(id) {
            return Err(Error::invalid("id", format!("{id} is already running")));
        }
        let prompt = self.engine.tokens(id)?.to_vec();
        if self.engine.computed(id)? != prompt.len() {
            return Err(Error::KvImport(format!("{id} has not finished importing")));
        }
        let sampler = Sampler::resume(&params, &prompt, &[first_token]);
        self.engine.push_token(id, first_token)?;
        self.running.push(Active {
            id,
            params,
            sampler,
            generated: 1,
            decoding: true,
            replay: VecDeque::new(),
            first_own: 1,
        });
        Ok(())
    }

    /// Continues a sequence whose prefill happened elsewhere but whose KV never arrived: the
    /// prompt and the prefill side's first token are recomputed here, and sampling goes on from
    /// the second token exactly as [`Batcher::resume_imported`] would have.
    pub fn submit_continuation(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        first_token: u32,
    ) -> Result<()> {
        if self.contains(id) {
            return Err(Error::invalid("id", format!("{id} is already running")));
        }
        let sampler = Sampler::resume(&params, &prompt, &[first_token]);
        let mut tokens = prompt;
        tokens.push(first_token);
        self.engine.add_sequence(id, tokens)?;
        self.waiting.push_back(Active {
            id,
            params,
            sampler,
            generated: 1,
            decoding: false,
            replay: VecDeque::new(),
            first_own: 1,
        });
        Ok(())
    }

    /// Whether `tokens` can be a new sequence's replay ([`check_replay`] with this model).
    pub fn check_replay(&self, params: &SamplingParams, tokens: &[u32]) -> Result<()> {
        let vocab = self.engine.model_config().vocab_size;
        check_replay(params, &self.eos, vocab, 0, tokens)
    }

    /// Makes a sequence just queued ([`Batcher::submit`], [`Batcher::resume_imported`],
    /// [`Batcher::submit_continuation`]) go on through `tokens`, which the client already has
    /// from a worker that died: its next steps compute them as the original run did (decode
    /// steps, one token each, on decode weights) and emit nothing; the first event is the token
    /// after them. A replayed token the sequence would have drawn differently is counted in
    /// [`BatcherStats::replay_divergences`] and logged with its logit margin, and replaced.
    pub fn replay(&mut self, id: SeqId, tokens: Vec<u32>) -> Result<()> {
        let eos = &self.eos;
        let vocab = self.engine.model_config().vocab_size;
        let Some(a) = self
            .running
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|a| a.id == id)
        else {
            return Err(Error::invalid("id", format!("{id} is not queued")));
        };
        if !a.replay.is_empty() || a.first_own != a.generated.max(1) {
            return Err(Error::invalid(
                "id",
                format!("{id} has already started generating"),
            ));
        }
        check_replay(&a.params, eos, vocab, a.generated, &tokens)?;
        a.first_own = a.generated + tokens.len() as u32 + 1;
        a.replay = tokens.into();
        Ok(())
    }

    fn contains(&self, id: SeqId) -> bool {
        self.running.iter().chain(&self.waiting).any(|a| a.id == id)
    }

    /// Drops a sequence wherever it is and frees its blocks. Returns whether it existed.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let before = self.running.len() + self.waiting.len();
        self.running.retain(|a| a.id != id);
        self.waiting.retain(|a| a.id != id);
        let found = self.running.len() + self.waiting.len() != before;
        self.engine.release(id) || found
    }

    /// Next prefill chunk of a not-yet-decoding sequence: up to the next multiple of the chunk
    /// size, so boundaries never depend on the batch.
    fn next_chunk(&self, id: SeqId) -> Result<usize> {
        let chunk = self.engine.config().prefill_chunk_tokens;
        let computed = self.engine.computed(id)?;
        let total = self.engine.tokens(id)?.len();
        let boundary = (computed / chunk + 1) * chunk;
        Ok(boundary.min(total) - computed)
    }

    /// Plans the next step: every decoding sequence, then prefill chunks in admission order.
    fn plan(&mut self) -> Result<Vec<StepItem>> {
        let cfg = self.engine.config();
        let (max_tokens, max_running) = (cfg.max_batch_tokens, cfg.max_running);
        let bs = self.engine.block_size();
        let mut items = Vec::new();
        let mut budget = max_tokens;
        let mut free = self.engine.free_blocks();
        let blocks_needed = |engine: &Engine, id: SeqId, n: usize| -> Result<usize> {
            let target = engine.computed(id)? + n;
            Ok(target.div_ceil(bs).saturating_sub(engine.blocks_held(id)?))
        };
        for a in &self.running {
            let n = if a.decoding {
                1
            } else {
                self.next_chunk(a.id)?
            };
            let need = blocks_needed(&self.engine, a.id, n)?;
            if n > budget || need > free {
                continue;
            }
            budget -= n;
            free -= need;
            items.push(StepItem {
                seq: a.id,
                tokens: n,
                phase: if a.decoding {
                    Phase::Decode
                } else {
                    Phase::Prefill
                },
            });
        }
        // Admit waiting sequences while their first chunk fits.
        while self.running.len() < max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let id = front.id;
            // Start from the longest cached prefix; blocks it takes off the idle list count
            // against this step's free blocks like new ones.
            let available = self.engine.free_blocks();
            let cached = self.engine.attach_cached_prefix(id)?;
            free = free.saturating_sub(available - self.engine.free_blocks());
            let n = self.next_chunk(id)?;
            let need = blocks_needed(&self.engine, id, n)?;
            if n > budget || need > free {
                if cached > 0 {
                    // A waiting sequence holds no blocks: the prefix stays cached (idle) and is
                    // found again next time.
                    self.engine.evict(id)?;
                }
                break;
            }
            budget -= n;
            free -= need;
            items.push(StepItem {
                seq: id,
                tokens: n,
                phase: Phase::Prefill,
            });
            if let Some(a) = self.waiting.pop_front() {
                self.running.push(a);
            }
        }
        Ok(items)
    }

    /// Frees the most recently admitted running sequence's blocks and queues it again at the
    /// front; its tokens so far are recomputed when it is readmitted.
    fn preempt_newest(&mut self) -> Result<bool> {
        let Some(victim) = self.running.pop() else {
            return Ok(false);
        };
        self.engine.evict(victim.id)?;
        self.stats.preemptions += 1;
        tracing::warn!(seq = %victim.id, "kv cache full: preempting a sequence for recompute");
        let mut victim = victim;
        victim.decoding = false;
        self.waiting.push_front(victim);
        Ok(true)
    }

    /// Runs one engine step and returns what it produced. A step with nothing to do returns no
    /// events.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let items = loop {
            let items = self.plan()?;
            if !items.is_empty() || self.running.is_empty() {
                break items;
            }
            // Nothing running fits in the free blocks: make room, or give up on a sequence
            // that cannot fit even in an empty pool.
            if self.running.len() == 1 && self.engine.free_blocks() == self.engine.total_blocks() {
                let a = self.running.remove(0);
                self.engine.release(a.id);
                events.push(Event::Failed {
                    seq: a.id,
                    error: "sequence does not fit in the kv cache".into(),
                });
                continue;
            }
            self.preempt_newest()?;
        };
        if items.is_empty() {
            return Ok(events);
        }
        let outputs = self.engine.step(&items)?;
        self.stats.steps += 1;
        for (item, out) in items.iter().zip(outputs) {
            match item.phase {
                Phase::Prefill => self.stats.prefill_tokens += item.tokens as u64,
                Phase::Decode => self.stats.decode_tokens += item.tokens as u64,
            }
            let Some(logits) = out.logits else { continue };
            let Some(pos) = self.running.iter().position(|a| a.id == item.seq) else {
                continue;
            };
            let a = &mut self.running[pos];
            // After a preemption the recomputed tokens include earlier generated ones: only the
            // logits at the true end of the sequence produce a new token.
            a.decoding = true;
            if let Some(replayed) = a.replay.pop_front() {
                let drawn = a.sampler.replay(&logits, replayed);
                a.generated += 1;
                self.stats.replayed_tokens += 1;
                if drawn.id != replayed {
                    self.stats.replay_divergences += 1;
                    let logit = |t: u32| logits.get(t as usize).copied().unwrap_or(f32::NAN);
                    tracing::warn!(
                        seq = %a.id,
                        position = a.generated,
                        replayed,
                        drawn = drawn.id,
                        margin = logit(drawn.id) - logit(replayed),
                        "a replayed token differs from this worker's draw; the client's token stands"
                    );
                }
                // `check_replay` made sure no replayed token ends the sequence.
                if self.engine.push_token(a.id, replayed).is_err() {
                    let id = a.id;
                    self.running.remove(pos);
                    self.engine.release(id);
                    events.push(Event::Failed {
                        seq: id,
                        error: "the replayed tokens overflow the context".into(),
                    });
                }
                continue;
            }
            let token = a.sampler.sample(&logits);
            a.generated += 1;
            let mut finish = finish_reason_after(token.id, a.generated, &a.params, &self.eos);
            let id = a.id;
            let cached = (a.generated == a.first_own)
                .then(|| self.engine.cached_tokens(id).unwrap_or(0) as u32);
            if finish.is_none() && self.engine.push_token(id, token.id).is_err() {
                // The context is full: the sequence ends here.
                finish = Some(FinishReason::Length);
            }
            if finish.is_some() {
                self.running.remove(pos);
                self.engine.release(id);
            }
            events.push(Event::Token {
                seq: id,
                token,
                finish,
                cached,
            });
        }
        Ok(events)
    }
}

/// Whether `tokens`, replayed after `generated` tokens of a sequence sampled with `params`,
/// are a generation that had not finished: none ends it (an end-of-sequence or stop token, or
/// the `max_tokens` count), and every id is in the vocabulary.
pub fn check_replay(
    params: &SamplingParams,
    eos: &[u32],
    vocab: usize,
    generated: u32,
    tokens: &[u32],
) -> Result<()> {
    for (i, &token) in tokens.iter().enumerate() {
        if token as usize >= vocab {
            return Err(Error::invalid(
                "generated_token_ids",
                format!("[{i}] = {token} is outside the {vocab}-token vocabulary"),
            ));
        }
        let count = generated + i as u32 + 1;
        if let Some(reason) = finish_reason_after(token, count, params, eos) {
            return Err(Error::invalid(
                "generated_token_ids",
                format!(
                    "[{i}] = {token} would have ended the generation ({reason:?}): nothing is left to continue"
                ),
            ));
        }
    }
    Ok(())
}
