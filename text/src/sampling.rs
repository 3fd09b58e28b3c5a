//! Sampling: turns one sequence's logits into its next token.
//!
//! decode worker (and prefill worker, for the first token):
//! model forward --logits--> [`Sampler::sample`] --token id + logprobs--> stop check, stream
//!
//! One [`Sampler`] per sequence; it owns the sequence's RNG and token history, so it belongs to
//! whoever owns the sequence (the batch loop) and needs no locking.
//!
//! Pipeline of [`Sampler::sample`], in order:
//!
//! 1. sanitize: NaN becomes -inf and +inf becomes `f32::MAX`, so nothing after this sees a NaN;
//!    the reported logprobs are the log-softmax of these raw logits (vLLM's default);
//! 2. penalties: repetition (prompt and output tokens), then presence and frequency (output
//!    tokens);
//! 3. greedy: if the temperature is below [`GREEDY_TEMPERATURE`], argmax, ties to the lowest id;
//! 4. temperature: logits divided by it (as a multiplication by its reciprocal);
//! 5. top-k, 6. top-p (renormalized over what top-k kept), 7. min-p;
//! 8. softmax over what is left and one draw.
//!
//! Candidates are ranked by penalized logit, descending, ties to the lowest id, everywhere (greedy,
//! top-k, top-p), so `top_k = 1` is exactly greedy.
//!
//! Reproducibility: a seeded sampler draws from `ChaCha8Rng::seed_from_u64(seed)`, exactly one
//! `u64` per non-greedy step and none per greedy step. The draw uses only IEEE arithmetic in a
//! fixed order and this module's own `exp`, never the platform's math library, so the same seed and
//! the same logits give the same tokens on every platform and in every run.
//!
//! Cost: a few vectorized passes over the vocabulary (sanitize, chunk maxima, one `exp` for the
//! logprob normalizer and one for the sampling weights). Top-k and top logprobs look only at the
//! 64-token chunks that can hold the winners (found from per-chunk maxima) and sort only those.
//! Top-p without top-k sorts a growing prefix, 64 tokens first, which covers the usual peaked
//! distribution; on a nearly flat one the nucleus is most of the vocabulary and the cost grows to
//! a sort of it (milliseconds at 150k tokens).
//!
//! Invariant: `sample` never panics, whatever the logits hold (NaN, infinities, empty).

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Temperatures below this sample greedily. Mirrors vLLM's `_SAMPLING_EPS`: dividing by a
/// temperature this small only turns the argmax into a one-hot distribution, slowly.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How one request wants its tokens chosen and when its generation ends.
///
/// Plain data as the client sent it, after the edge mapped the OpenAI names; call
/// [`SamplingParams::validate`] before using it. `Default` is greedy decoding of up to 16 tokens
/// (OpenAI's and vLLM's default `max_tokens`) with no penalties, stops or logprobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 (or anything below [`GREEDY_TEMPERATURE`]) is greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` or 0 is off.
    pub top_k: Option<u32>,
    /// Keep the smallest set of most likely tokens whose probability mass (after temperature,
    /// renormalized over what top-k kept) reaches `top_p`; 1.0 is off.
    pub top_p: f32,
    /// Drop tokens whose probability (after temperature) is below `min_p` times the most likely
    /// token's; 0 is off.
    pub min_p: f32,
    /// HF/CTRL repetition penalty over every distinct token of the prompt and the output so far:
    /// a positive logit is divided by it, a negative one multiplied. 1.0 is off. Counting the
    /// prompt mirrors Hugging Face and vLLM.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of every token the output already
    /// holds (the prompt does not count). 0 is off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted from a token's logit once per time the output already
    /// holds it (the prompt does not count). 0 is off.
    pub frequency_penalty: f32,
    /// Seed for this request's RNG; `None` seeds from OS entropy.
    pub seed: Option<u64>,
    /// Most tokens to generate (OpenAI `max_tokens`), counting the first one, which the prefill
    /// worker samples.
    pub max_new_tokens: u32,
    /// Token ids that end generation when sampled (checked even with `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation when the output text contains one; the text from the match
    /// on is not returned (OpenAI behaviour). See [`crate::StopChecker`].
    pub stop_strings: Vec<String>,
    /// Keep generating after the model's end-of-sequence token(s).
    pub ignore_eos: bool,
    /// Report logprobs: `Some(n)` returns the `n` most likely alternatives with each token,
    /// `Some(0)` only the chosen token's logprob. The chosen token's logprob is always computed.
    pub logprobs: Option<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_new_tokens: 16,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Server-side bounds that [`SamplingParams::validate`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplingLimits {
    /// Most tokens a request may generate: the context length minus the prompt length, or a
    /// smaller configured cap.
    pub max_new_tokens: u32,
    /// Most top-N alternatives a request may ask for per token.
    pub max_logprobs: u32,
    /// Most stop strings per request.
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes of UTF-8.
    pub max_stop_string_len: usize,
}

impl SamplingLimits {
    /// baton's defaults for a request whose prompt leaves `room` tokens of context: at most 20
    /// logprob alternatives (OpenAI's cap), 16 stop strings of at most 256 bytes.
    pub fn with_room(room: usize) -> Self {
        Self {
            max_new_tokens: u32::try_from(room).unwrap_or(u32::MAX),
            max_logprobs: 20,
            max_stop_strings: 16,
            max_stop_string_len: 256,
        }
    }
}

impl SamplingParams {
    /// Checks every field against its valid range and `limits`. The error names the field as
    /// the OpenAI API does (`temperature`, `top_p`, `max_tokens`, `stop`, ...).
    pub fn validate(&self, limits: &SamplingLimits) -> Result<()> {
        // Comparisons are written so that NaN fails them.
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("must be finite and >= 0, got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(Error::invalid(
                "min_p",
                format!("must be in [0, 1], got {}", self.min_p),
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::invalid(
                "repetition_penalty",
                format!("must be finite and > 0, got {}", self.repetition_penalty),
            ));
        }
        for (field, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(Error::invalid(
                    field,
                    format!("must be in [-2, 2], got {value}"),
                ));
            }
        }
        if self.max_new_tokens == 0 {
            return Err(Error::invalid("max_tokens", "must be at least 1"));
        }
        if self.max_new_tokens > limits.max_new_tokens {
            return Err(Error::invalid(
                "max_tokens",
                format!(
                    "{} exceeds the limit of {} for this model and prompt",
                    self.max_new_tokens, limits.max_new_tokens
                ),
            ));
        }
        if let Some(n) = self.logprobs
            && n > limits.max_logprobs
        {
            return Err(Error::invalid(
                "logprobs",
                format!("{n} exceeds the limit of {}", limits.max_logprobs),
            ));
        }
        if self.stop_strings.len() > limits.max_stop_strings {
            return Err(Error::invalid(
                "stop",
                format!(
                    "{} stop strings exceed the limit of {}",
                    self.stop_strings.len(),
                    limits.max_stop_strings
                ),
            ));
        }
        for stop in &self.stop_strings {
            if stop.is_empty() {
                return Err(Error::invalid("stop", "stop strings must not be empty"));
            }
            if stop.len() > limits.max_stop_string_len {
                return Err(Error::invalid(
                    "stop",
                    format!(
                        "a stop string of {} bytes exceeds the limit of {}",
                        stop.len(),
                        limits.max_stop_string_len
                    ),
                ));
            }
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE
    }
}

/// One sampled token and its logprobs.
///
/// Logprobs are the log-softmax of the model's raw logits, before penalties, temperature and
/// filtering (vLLM's default), so they describe the model, not the sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token.
    pub id: u32,
    /// Log-probability of `id` under the raw logits; -inf if no logit was finite.
    pub logprob: f32,
    /// The `logprobs` most likely tokens under the raw logits as `(id, logprob)`, most likely
    /// first, ties to the lowest id; empty when `logprobs` is `None` or 0.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Chooses the next token of one sequence; see the module docs for the pipeline.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Distinct tokens of the prompt and output; kept only when the repetition penalty is on.
    seen: HashSet<u32>,
    /// How often each token occurs in the output.
    output_counts: HashMap<u32, u32>,
    // Scratch buffers, reused across calls so that a step allocates nothing vocabulary-sized.
    /// Sanitized, then penalized logits, indexed by token id.
    logits: Vec<f32>,
    /// Maximum of each `CHUNK` of `logits`.
    maxima: Vec<f32>,
    /// exp of logits relative to their maximum, indexed by token id.
    weights: Vec<f32>,
    /// `(id, penalized logit)` of the tokens still in the running, when top-k or top-p is on.
    candidates: Vec<(u32, f32)>,
    /// For selecting among `maxima`.
    selection: Vec<f32>,
}

/// Which tokens the draw chooses among, after the filters.
enum Support {
    /// Every token; `Sampler::weights[id]` is token `id`'s weight.
    Vocabulary,
    /// `Sampler::candidates`, whose second field is now each one's weight.
    Candidates,
}

impl Sampler {
    /// A sampler for a sequence that has generated nothing yet.
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Sampler {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            // The thread RNG is seeded from OS entropy once per thread; no syscall per request.
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        let seen = if params.repetition_penalty == 1.0 {
            HashSet::new()
        } else {
            prompt.iter().copied().collect()
        };
        Sampler {
            params: params.clone(),
            rng,
            seen,
            output_counts: HashMap::new(),
            logits: Vec::new(),
            maxima: Vec::new(),
            weights: Vec::new(),
            candidates: Vec::new(),
            selection: Vec::new(),
        }
    }

    /// A sampler for a sequence whose first tokens, `generated`, were sampled elsewhere with the
    /// same params (the prefill worker samples the first token; the decode worker continues).
    /// It counts them for the penalties and, for a seeded sampler, advances the RNG past their
    /// draws, so the continuation equals what one sampler would have produced alone.
    pub fn resume(params: &SamplingParams, prompt: &[u32], generated: &[u32]) -> Sampler {
        let mut sampler = Sampler::new(params, prompt);
        for &token in generated {
            if !params.is_greedy() {
                sampler.rng.next_u64();
            }
            sampler.record(token);
        }
        sampler
    }

    /// Chooses the next token from `logits` (one per vocabulary id) and records it in the
    /// sequence's history. If no logit is finite (all NaN or -inf, or `logits` is empty), the
    /// model's output carries no choice: the result is id 0 with logprob -inf, deterministically.
    /// Params that [`SamplingParams::validate`] would reject do not make it panic either; they
    /// give unspecified tokens.
    pub fn sample(&mut self, logits: &[f32]) -> SampledToken {
        let token = self.choose(logits);
        self.record(token.id);
        token
    }

    /// Replays a token this sequence already produced elsewhere (a stream migrated from a
    /// worker that died): draws from `logits` exactly as [`Sampler::sample`] would, so the RNG
    /// and the penalties advance as they did there, but records `token` whatever the draw chose.
    /// Returns the draw, which equals `token` when the logits are the original ones.
    pub fn replay(&mut self, logits: &[f32], token: u32) -> SampledToken {
        let drawn = self.choose(logits);
        self.record(token);
        drawn
    }

    /// The choice [`Sampler::sample`] makes, without recording it.
    fn choose(&mut self, logits: &[f32]) -> SampledToken {
        self.logits.clear();
        self.logits.extend(logits.iter().map(|&x| sanitize(x)));
        chunk_maxima(&self.logits, &mut self.maxima);
        let norm = LogNormalizer::of(&self.logits, &self.maxima, &mut self.weights);
        let top_logprobs = match self.params.logprobs {
            Some(n) if n > 0 => {
                self.collect_best(n as usize);
                let best = self.candidates.iter();
                best.map(|&(id, x)| (id, logprob(x, norm))).collect()
            }
            _ => Vec::new(),
        };

        if self.apply_penalties() {
            chunk_maxima(&self.logits, &mut self.maxima);
        }
        let id = if self.params.is_greedy() {
            argmax(&self.logits, &self.maxima).unwrap_or(0)
        } else {
            // Drawn first, so every non-greedy step consumes exactly one u64 (see `resume`).
            let u = uniform(&mut self.rng);
            match self.filter() {
                None => 0,
                Some(Support::Vocabulary) => draw(&self.weights, |&w| w, u).map_or(0, |i| i as u32),
                Some(Support::Candidates) => {
                    let candidates = &self.candidates;
                    draw(candidates, |&(_, w)| w, u).map_or(0, |i| candidates[i].0)
                }
            }
        };

        let logprob = logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&x| logprob(sanitize(x), norm));
        SampledToken {
            id,
            logprob,
            top_logprobs,
        }
    }

    fn record(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
    }

    /// Applies the repetition, presence and frequency penalties to `self.logits` in place;
    /// whether any logit was touched. Ids outside the vocabulary are ignored; -inf stays -inf
    /// and finite stays finite.
    fn apply_penalties(&mut self) -> bool {
        let mut touched = false;
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for &id in &self.seen {
                if let Some(x) = self.logits.get_mut(id as usize) {
                    // HF RepetitionPenaltyLogitsProcessor; vLLM uses the same `> 0` split.
                    *x = penalize(*x, |x| if x > 0.0 { x / rp } else { x * rp });
                    touched = true;
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&id, &count) in &self.output_counts {
                if let Some(x) = self.logits.get_mut(id as usize) {
                    *x = penalize(*x, |x| x - presence - frequency * count as f32);
                    touched = true;
                }
            }
        }
        touched
    }

    /// Leaves the `n` best tokens of `self.logits` in `self.candidates`, in [`rank`] order.
    ///
    /// Only chunks whose maximum is among the `n` largest chunk maxima are looked at. Those `n`
    /// maxima are `n` distinct tokens at or above the n-th largest maximum, so the n-th best
    /// token is too, and so is every better token and the maximum of its chunk.
    fn collect_best(&mut self, n: usize) {
        let candidates = &mut self.candidates;
        candidates.clear();
        if n == 0 {
            return;
        }
        let threshold = if n < self.maxima.len() {
            self.selection.clear();
            self.selection.extend_from_slice(&self.maxima);
            let (_, nth, _) = self
                .selection
                .select_nth_unstable_by(n - 1, |a, b| b.total_cmp(a));
            *nth
        } else {
            f32::NEG_INFINITY
        };
        for (c, (chunk, &max)) in self.logits.chunks(CHUNK).zip(&self.maxima).enumerate() {
            if max >= threshold {
                let first = c * CHUNK;
                let ids = (first as u32)..;
                candidates.extend(ids.zip(chunk.iter().copied()));
            }
        }
        let n = n.min(candidates.len());
        if n < candidates.len() {
            candidates.select_nth_unstable_by(n - 1, rank);
            candidates.truncate(n);
        }
        candidates.sort_unstable_by(rank);
    }

    /// Temperature, top-k, top-p and min-p over the penalized `self.logits`: leaves the
    /// unnormalized probabilities of the surviving tokens where the returned [`Support`] says.
    /// `None` if no logit is finite.
    fn filter(&mut self) -> Option<Support> {
        let max = max_of(&self.maxima)?;
        let (temperature, top_p, min_p) = (
            self.params.temperature,
            self.params.top_p,
            self.params.min_p,
        );
        // Probability after temperature relative to the best token's: in [0, 1], exactly 1 for
        // the best, 0 for -inf. (x - max) * (1 / t) rather than / t: same order, no division.
        exp_shifted(&self.logits, max, 1.0 / temperature, &mut self.weights);

        let vocab = self.logits.len();
        let top_k = match self.params.top_k {
            Some(k) if k > 0 => (k as usize).min(vocab),
            _ => vocab,
        };
        if top_k == vocab && top_p >= 1.0 {
            if min_p > 0.0 {
                for w in self.weights.iter_mut() {
                    *w = if *w >= min_p { *w } else { 0.0 };
                }
            }
            return Some(Support::Vocabulary);
        }

        if top_p >= 1.0 {
            self.collect_best(top_k);
        } else if top_k < vocab {
            self.collect_best(top_k);
            let weights = &self.weights;
            let total = sum_by(&self.candidates, |&(id, _)| weights[id as usize]);
            let keep = nucleus_len(&self.candidates, weights, f64::from(top_p) * total);
            self.candidates.truncate(keep.unwrap_or(top_k));
        } else {
            let target = f64::from(top_p) * sum_by(&self.weights, |&w| w);
            // The nucleus is usually a few dozen tokens: sort more only when it is not.
            let mut n = 64;
            loop {
                self.collect_best(n);
                match nucleus_len(&self.candidates, &self.weights, target) {
                    Some(keep) => {
                        self.candidates.truncate(keep);
                        break;
                    }
                    None if n >= vocab => break,
                    None => n = n.saturating_mul(8),
                }
            }
        }

        for candidate in self.candidates.iter_mut() {
            let w = self.weights[candidate.0 as usize];
            // From here on the second field is the candidate's unnormalized probability.
            candidate.1 = if w >= min_p { w } else { 0.0 };
        }
        Some(Support::Candidates)
    }
}

/// Tokens per chunk of [`Sampler::maxima`].
const CHUNK: usize = 64;

/// The maximum of each `CHUNK` of `logits`, into `out`.
fn chunk_maxima(logits: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(logits.chunks(CHUNK).map(max_value));
}

fn max_value(values: &[f32]) -> f32 {
    values.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The largest of `maxima`; `None` if it is -inf (no finite logit).
fn max_of(maxima: &[f32]) -> Option<f32> {
    Some(max_value(maxima)).filter(|&max| max > f32::NEG_INFINITY)
}

/// How many of `candidates`, in [`rank`] order, it takes for their weights to reach `target`;
/// `None` if all of them do not.
fn nucleus_len(candidates: &[(u32, f32)], weights: &[f32], target: f64) -> Option<usize> {
    let mut mass = 0.0;
    candidates
        .iter()
        .position(|&(id, _)| {
            mass += f64::from(weights[id as usize]);
            mass >= target
        })
        .map(|i| i + 1)
}

/// Draws an index into `items` with probability proportional to `weight`, with `u` uniform in
/// [0, 1); `None` if no weight is positive. The running sum is kept per block of 64 (a fixed
/// order, so the same on every platform), and only the block the draw lands in is walked
/// token by token.
fn draw<T>(items: &[T], weight: impl Fn(&T) -> f32 + Copy, u: f64) -> Option<usize> {
    const BLOCK: usize = 64;
    let total = items
        .chunks(BLOCK)
        .fold(0.0, |sum, block| sum + sum_by(block, weight));
    let target = u * total;
    let mut before = 0.0;
    for (b, block) in items.chunks(BLOCK).enumerate() {
        let mass = sum_by(block, weight);
        if target < before + mass {
            let mut cumulative = before;
            let mut last_positive = None;
            for (i, item) in block.iter().enumerate() {
                let w = weight(item);
                cumulative += f64::from(w);
                if target < cumulative {
                    return Some(b * BLOCK + i);
                }
                if w > 0.0 {
                    last_positive = Some(b * BLOCK + i);
                }
            }
            // The token-by-token sum rounded below the block's sum.
            return last_positive;
        }
        before += mass;
    }
    // `u * total` rounded up to `total`.
    items.iter().rposition(|item| weight(item) > 0.0)
}

/// Candidate order: logit descending, then id ascending. Logits here are never NaN or -0.0, so
/// `total_cmp` agrees with `>`.
fn rank(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The lowest id among the largest logits; `None` if none is finite.
fn argmax(logits: &[f32], maxima: &[f32]) -> Option<u32> {
    let max = max_of(maxima)?;
    let chunk = maxima.iter().position(|&m| m == max)?;
    let offset = logits[chunk * CHUNK..].iter().position(|&x| x == max)?;
    Some((chunk * CHUNK + offset) as u32)
}

/// NaN becomes -inf (never chosen), +inf becomes the largest finite value (so subtracting the
/// maximum never gives NaN), -0.0 becomes 0.0 (so ranking by `total_cmp` agrees with `>`).
fn sanitize(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == f32::INFINITY {
        f32::MAX
    } else {
        x + 0.0
    }
}

/// Applies `penalty` to a sanitized logit: -inf (a NaN or masked token) stays -inf, and a
/// finite logit stays finite and not -0.0.
fn penalize(x: f32, penalty: impl Fn(f32) -> f32) -> f32 {
    if x == f32::NEG_INFINITY {
        x
    } else {
        penalty(x).clamp(-f32::MAX, f32::MAX) + 0.0
    }
}

/// The log-softmax normalizer of sanitized logits, kept as `max + ln(sum)` so that a logit
/// near `f32::MAX` does not swallow `ln(sum)`.
#[derive(Debug, Clone, Copy)]
struct LogNormalizer {
    max: f64,
    ln_sum: f64,
}

impl LogNormalizer {
    /// `None` if no logit is finite. `scratch` receives exp(logit - max).
    fn of(logits: &[f32], maxima: &[f32], scratch: &mut Vec<f32>) -> Option<LogNormalizer> {
        let max = max_of(maxima)?;
        exp_shifted(logits, max, 1.0, scratch);
        Some(LogNormalizer {
            max: f64::from(max),
            ln_sum: sum_by(scratch, |&w| w).ln(),
        })
    }

    fn logprob(self, x: f32) -> f32 {
        ((f64::from(x) - self.max) - self.ln_sum) as f32
    }
}

/// The logprob of sanitized logit `x`; -inf when no logit was finite.
fn logprob(x: f32, norm: Option<LogNormalizer>) -> f32 {
    norm.map_or(f32::NEG_INFINITY, |n| n.logprob(x))
}

/// Uniform in [0, 1) from the top 53 bits of one `u64`: exact and the same on every platform.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    (rng.next_u64() >> 11) as f64 * SCALE
}

/// Fills `out` with exp((x - max) * scale) for each logit `x`, where `max` is the largest.
fn exp_shifted(logits: &[f32], max: f32, scale: f32, out: &mut Vec<f32>) {
    out.clear();
    out.resize(logits.len(), 0.0);
    for (w, &x) in out.iter_mut().zip(logits) {
        *w = exp_nonpositive((x - max) * scale);
    }
}

/// Sum of `f(item)` in f64, in a fixed order (eight interleaved partial sums, combined
/// pairwise): the same bits on every platform, and vectorizable, which a left-to-right float sum
/// is not.
fn sum_by<T>(items: &[T], f: impl Fn(&T) -> f32) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0f64; LANES];
    let mut chunks = items.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, item) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(f(item));
        }
    }
    for (lane, item) in lanes.iter_mut().zip(chunks.remainder()) {
        *lane += f64::from(f(item));
    }
    let [a, b, c, d, e, g, h, i] = lanes;
    ((a + b) + (c + d)) + ((e + g) + (h + i))
}

/// exp(x) for x <= 0 from IEEE operations only, so every platform gets the same bits (the
/// platform's `expf` may differ in the last place, which could flip a draw). Cephes' `expf`:
/// Cody-Waite reduction by ln 2, then a degree-7 minimax polynomial; relative error about
/// 2e-7. Results below 2^-126 are 0. Branch-free, so loops over the vocabulary vectorize.
fn exp_nonpositive(x: f32) -> f32 {
    // ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -0.000_212_194_44;
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    const MIN: f32 = -87.0;
    let clamped = x.max(MIN);
    let shifted = clamped * std::f32::consts::LOG2_E + SHIFT;
    // n in [-126, 0], r in [-ln2/2, ln2/2].
    let n = shifted - SHIFT;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let poly = (((((0.000_198_756_91 * r + 0.001_398_199_9) * r + 0.008_333_452) * r
        + 0.041_665_796)
        * r
        + 0.166_666_66)
        * r
        + 0.5)
        * (r * r)
        + r
        + 1.0;
    // 2^n, built from its exponent bits: the low 9 bits of the shifted sum are n + 127.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < MIN { 0.0 } else { poly * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SamplingLimits {
        SamplingLimits {
            max_new_tokens: 100,
            max_logprobs: 20,
            max_stop_strings: 4,
            max_stop_string_len: 8,
        }
    }

    fn seeded(temperature: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Logits whose softmax is exactly `probs` (up to rounding).
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn softmax(logits: &[f32], temperature: f64) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = logits
            .iter()
            .map(|&x| ((x as f64 - max) / temperature).exp())
            .collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    /// Deterministic pseudo-random logits for tests (a small LCG, not the sampler's RNG).
    fn pseudo_logits(vocab: usize, mut state: u64) -> Vec<f32> {
        (0..vocab)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 20.0 - 10.0
            })
            .collect()
    }

    /// The ids `params` gives a positive probability for these logits.
    fn kept_ids(params: &SamplingParams, logits: &[f32]) -> Vec<u32> {
        let mut sampler = Sampler::new(params, &[]);
        sampler.logits = logits.to_vec();
        chunk_maxima(&sampler.logits, &mut sampler.maxima);
        let mut ids: Vec<u32> = match sampler.filter() {
            None => Vec::new(),
            Some(Support::Vocabulary) => (0..logits.len() as u32)
                .filter(|&id| sampler.weights[id as usize] > 0.0)
                .collect(),
            Some(Support::Candidates) => sampler
                .candidates
                .iter()
                .filter(|&&(_, w)| w > 0.0)
                .map(|&(id, _)| id)
                .collect(),
        };
        ids.sort_unstable();
        ids
    }

    fn penalized(sampler: &mut Sampler, logits: &[f32]) -> Vec<f32> {
        sampler.logits = logits.to_vec();
        sampler.apply_penalties();
        sampler.logits.clone()
    }

    fn draw_ids(params: &SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(params, &[]);
        (0..n).map(|_| sampler.sample(logits).id).collect()
    }

    #[test]
    fn greedy_picks_argmax_and_breaks_ties_to_lowest_id() {
        let mut sampler = Sampler::new(&SamplingParams::default(), &[]);
        assert_eq!(sampler.sample(&[0.1, 3.0, -2.0, 2.9]).id, 1);
        assert_eq!(sampler.sample(&[1.0, 5.0, 2.0, 5.0, 5.0]).id, 1);
        assert_eq!(sampler.sample(&[-0.0, 0.0]).id, 0);
    }

    #[test]
    fn temperature_below_epsilon_is_greedy() {
        let params = seeded(GREEDY_TEMPERATURE / 2.0, 7);
        let logits = [1.0, 1.5, 1.4999];
        assert!(draw_ids(&params, &logits, 50).iter().all(|&id| id == 1));
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let params = seeded(1.0, 42);
        let logits = pseudo_logits(1000, 1);
        assert_eq!(
            draw_ids(&params, &logits, 300),
            draw_ids(&params, &logits, 300)
        );
    }

    #[test]
    fn seeded_sampling_matches_golden_tokens() {
        // Pins the RNG stream, the uniform conversion and the exp, so a change that would give
        // users different tokens for the same seed fails here.
        let logits = logits_of(&[0.1, 0.2, 0.3, 0.4]);
        let ids = draw_ids(&seeded(1.0, 1234), &logits, 16);
        assert_eq!(ids, GOLDEN_SEED_1234);
    }

    // Computed independently of this crate, in Python: Bernstein's ChaCha with 8 rounds (64-bit
    // block counter, stream 0) keyed by rand_core's PCG32 `seed_from_u64`, the top-53-bit uniform,
    // and a cumulative walk over the softmax in id order.
    const GOLDEN_SEED_1234: [u32; 16] = [2, 3, 2, 2, 1, 2, 2, 1, 3, 1, 3, 2, 1, 0, 1, 3];

    #[test]
    fn different_seeds_give_different_tokens() {
        let logits = pseudo_logits(1000, 2);
        let a = draw_ids(&seeded(1.0, 1), &logits, 300);
        let b = draw_ids(&seeded(1.0, 2), &logits, 300);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 30, "{same} of 300 draws agree");
    }

    #[test]
    fn unseeded_samplers_differ() {
        let logits = pseudo_logits(1000, 3);
        let params = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::default()
        };
        assert_ne!(
            draw_ids(&params, &logits, 100),
            draw_ids(&params, &logits, 100)
        );
    }

    fn assert_frequencies_match(params: &SamplingParams, logits: &[f32], expected: &[f64]) {
        const DRAWS: usize = 20_000;
        let mut counts = vec![0usize; logits.len()];
        for id in draw_ids(params, logits, DRAWS) {
            counts[id as usize] += 1;
        }
        for (id, (&count, &p)) in counts.iter().zip(expected).enumerate() {
            let freq = count as f64 / DRAWS as f64;
            // Binomial standard deviation is at most 0.0036 here; allow about 4 of them.
            assert!(
                (freq - p).abs() < 0.015,
                "token {id}: frequency {freq}, expected {p} ({counts:?})"
            );
        }
    }

    #[test]
    fn temperature_one_frequencies_match_softmax() {
        let logits = [1.0, 2.0, 0.5, 2.5, -1.0];
        assert_frequencies_match(&seeded(1.0, 9), &logits, &softmax(&logits, 1.0));
    }

    #[test]
    fn temperature_sharpens_and_flattens_the_distribution() {
        let logits = [1.0, 2.0, 0.5, 2.5, -1.0];
        assert_frequencies_match(&seeded(0.5, 10), &logits, &softmax(&logits, 0.5));
        assert_frequencies_match(&seeded(2.0, 11), &logits, &softmax(&logits, 2.0));
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let params = SamplingParams {
            top_k: Some(1),
            ..seeded(1.5, 3)
        };
        let mut sampler = Sampler::new(&params, &[]);
        for step in 0..50 {
            let mut logits = pseudo_logits(5000, step);
            logits[4999] = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let first_max = logits.iter().position(|&x| x == max);
            assert_eq!(Some(sampler.sample(&logits).id as usize), first_max);
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest_logits() {
        let params = SamplingParams {
            top_k: Some(3),
            ..seeded(1.0, 0)
        };
        assert_eq!(
            kept_ids(&params, &[0.0, 5.0, 1.0, 4.0, 4.0, -3.0]),
            [1, 3, 4]
        );
        let zero_is_off = SamplingParams {
            top_k: Some(0),
            ..seeded(1.0, 0)
        };
        assert_eq!(kept_ids(&zero_is_off, &[0.0, 5.0, 1.0]), [0, 1, 2]);
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_the_mass() {
        let logits = logits_of(&[0.15, 0.5, 0.05, 0.3]);
        let kept = |top_p| {
            kept_ids(
                &SamplingParams {
                    top_p,
                    ..seeded(1.0, 0)
                },
                &logits,
            )
        };
        assert_eq!(kept(0.4), [1]);
        assert_eq!(kept(0.75), [1, 3]);
        assert_eq!(kept(0.9), [0, 1, 3]);
        assert_eq!(kept(0.99), [0, 1, 2, 3]);
    }

    #[test]
    fn top_p_renormalizes_after_top_k() {
        // After top_k = 2 the distribution is {1: 0.625, 3: 0.375}; top_p = 0.6 keeps only 1,
        // although 0.5 < 0.6 of the full distribution.
        let logits = logits_of(&[0.15, 0.5, 0.05, 0.3]);
        let params = SamplingParams {
            top_k: Some(2),
            top_p: 0.6,
            ..seeded(1.0, 0)
        };
        assert_eq!(kept_ids(&params, &logits), [1]);
    }

    #[test]
    fn top_p_over_a_large_flat_vocabulary_matches_a_full_sort() {
        let logits = pseudo_logits(50_000, 5);
        let params = SamplingParams {
            top_p: 0.9,
            ..seeded(3.0, 0)
        };
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| rank(&(a, logits[a as usize]), &(b, logits[b as usize])));
        let probs = softmax(&logits, 3.0);
        let mut mass = 0.0;
        let n = order
            .iter()
            .position(|&id| {
                mass += probs[id as usize];
                mass >= 0.9
            })
            .map_or(order.len(), |i| i + 1);
        let mut expected = order[..n].to_vec();
        expected.sort_unstable();
        assert!(
            n > 1000,
            "the nucleus should need more than one widening, got {n}"
        );
        assert_eq!(kept_ids(&params, &logits), expected);
    }

    #[test]
    fn min_p_cuts_tokens_below_fraction_of_the_max() {
        let logits = logits_of(&[0.15, 0.5, 0.05, 0.3]);
        let kept = |min_p| {
            kept_ids(
                &SamplingParams {
                    min_p,
                    ..seeded(1.0, 0)
                },
                &logits,
            )
        };
        // Thresholds 0.2 * 0.5 = 0.1, 0.5 * 0.5 = 0.25, 0.7 * 0.5 = 0.35.
        assert_eq!(kept(0.2), [0, 1, 3]);
        assert_eq!(kept(0.5), [1, 3]);
        assert_eq!(kept(0.7), [1]);
        assert_eq!(kept(1.0), [1]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        // Prompt holds 0 (twice) and 1; output holds 3. Token 2 was never seen.
        let mut sampler = Sampler::resume(&params, &[0, 1, 0], &[3]);
        let got = penalized(&mut sampler, &[3.0, -1.5, 4.0, 0.0]);
        assert_eq!(got, [1.5, -3.0, 4.0, 0.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract_per_output_token() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::default()
        };
        // The prompt's 2 does not count; the output holds 0 twice and 1 once.
        let mut sampler = Sampler::resume(&params, &[2], &[0, 1, 0]);
        let got = penalized(&mut sampler, &[1.0, 1.0, 1.0, 1.0]);
        assert_eq!(got, [1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25, 1.0, 1.0]);
    }

    #[test]
    fn sample_records_its_token_for_the_penalties() {
        let params = SamplingParams {
            frequency_penalty: 2.0,
            ..SamplingParams::default()
        };
        let mut sampler = Sampler::new(&params, &[]);
        let logits = [1.0, 0.5];
        assert_eq!(sampler.sample(&logits).id, 0);
        // 1.0 - 2.0 < 0.5: the penalty now moves greedy to token 1.
        assert_eq!(sampler.sample(&logits).id, 1);
    }

    #[test]
    fn resume_continues_the_same_random_stream() {
        let params = SamplingParams {
            presence_penalty: 0.3,
            ..seeded(1.0, 77)
        };
        let prompt = [5, 6, 7];
        let steps: Vec<Vec<f32>> = (0..8).map(|s| pseudo_logits(200, s)).collect();
        let mut alone = Sampler::new(&params, &prompt);
        let all: Vec<u32> = steps.iter().map(|l| alone.sample(l).id).collect();
        let mut resumed = Sampler::resume(&params, &prompt, &all[..3]);
        let rest: Vec<u32> = steps[3..].iter().map(|l| resumed.sample(l).id).collect();
        assert_eq!(rest, all[3..]);
    }

    #[test]
    fn replay_draws_what_the_original_drew_and_continues_the_same_stream() {
        let params = SamplingParams {
            presence_penalty: 0.3,
            repetition_penalty: 1.2,
            ..seeded(1.0, 78)
        };
        let prompt = [5, 6, 7];
        let steps: Vec<Vec<f32>> = (0..8).map(|s| pseudo_logits(200, s)).collect();
        let mut alone = Sampler::new(&params, &prompt);
        let all: Vec<u32> = steps.iter().map(|l| alone.sample(l).id).collect();
        let mut replayed = Sampler::new(&params, &prompt);
        for (l, &t) in steps[..4].iter().zip(&all) {
            assert_eq!(
                replayed.replay(l, t).id,
                t,
                "the same logits draw the same token"
            );
        }
        let rest: Vec<u32> = steps[4..].iter().map(|l| replayed.sample(l).id).collect();
        assert_eq!(rest, all[4..]);

        // Other logits draw something else, but the history records the forced token: the
        // continuation is the one that history gives.
        let mut forced = Sampler::new(&params, &prompt);
        let other = pseudo_logits(200, 99);
        let drawn = forced.replay(&other, all[0]);
        let mut reference = Sampler::resume(&params, &prompt, &all[..1]);
        assert_eq!(forced.sample(&steps[1]).id, reference.sample(&steps[1]).id);
        assert!(drawn.id < 200);
    }

    #[test]
    fn logprobs_are_log_softmax_of_raw_logits() {
        let logits = [1.0, 3.0, -0.5, 2.0, 3.0];
        let params = SamplingParams {
            repetition_penalty: 1.7,
            presence_penalty: 1.0,
            logprobs: Some(3),
            ..seeded(0.7, 5)
        };
        let mut sampler = Sampler::new(&params, &[1, 3]);
        let expected: Vec<f64> = softmax(&logits, 1.0).iter().map(|p| p.ln()).collect();
        for _ in 0..20 {
            let token = sampler.sample(&logits);
            let want = expected[token.id as usize];
            assert!((f64::from(token.logprob) - want).abs() < 1e-6);
            let ids: Vec<u32> = token.top_logprobs.iter().map(|&(id, _)| id).collect();
            assert_eq!(ids, [1, 4, 3]);
            for &(id, lp) in &token.top_logprobs {
                assert!((f64::from(lp) - expected[id as usize]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn logprobs_zero_reports_only_the_chosen_token() {
        let params = SamplingParams {
            logprobs: Some(0),
            ..SamplingParams::default()
        };
        let token = Sampler::new(&params, &[]).sample(&[0.0, 0.0]);
        assert_eq!(token.id, 0);
        assert!((token.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert!(token.top_logprobs.is_empty());
    }

    #[test]
    fn top_logprobs_longer_than_the_vocabulary_lists_every_token() {
        let params = SamplingParams {
            logprobs: Some(10),
            ..SamplingParams::default()
        };
        let token = Sampler::new(&params, &[]).sample(&[0.0, 2.0, 1.0]);
        let ids: Vec<u32> = token.top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 2, 0]);
    }

    #[test]
    fn nan_logits_are_never_chosen_and_do_not_panic() {
        let logits = [f32::NAN, 0.5, f32::NAN, 0.4];
        for params in [SamplingParams::default(), seeded(1.0, 3)] {
            let params = SamplingParams {
                logprobs: Some(4),
                top_p: 0.9,
                top_k: Some(3),
                ..params
            };
            for id in draw_ids(&params, &logits, 200) {
                assert!(id == 1 || id == 3);
            }
        }
    }

    #[test]
    fn no_finite_logit_gives_id_zero_with_logprob_minus_infinity() {
        let params = SamplingParams {
            logprobs: Some(2),
            min_p: 0.1,
            ..seeded(1.0, 3)
        };
        for logits in [
            vec![f32::NAN, f32::NAN, f32::NEG_INFINITY],
            vec![f32::NEG_INFINITY; 3],
            vec![],
        ] {
            for params in [SamplingParams::default(), params.clone()] {
                let token = Sampler::new(&params, &[1]).sample(&logits);
                assert_eq!(token.id, 0);
                assert_eq!(token.logprob, f32::NEG_INFINITY);
            }
        }
    }

    #[test]
    fn infinite_logits_win_and_share_the_draw() {
        let logits = [0.0, f32::INFINITY, 1.0, f32::INFINITY];
        let ids = draw_ids(&seeded(1.0, 4), &logits, 400);
        assert!(ids.iter().all(|&id| id == 1 || id == 3));
        assert!(ids.contains(&1) && ids.contains(&3));
        let token = Sampler::new(&SamplingParams::default(), &[]).sample(&logits);
        assert_eq!(token.id, 1);
        assert!((token.logprob - 0.5f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn penalties_on_extreme_logits_stay_finite() {
        let params = SamplingParams {
            repetition_penalty: 0.5,
            frequency_penalty: -2.0,
            ..seeded(1.0, 1)
        };
        let mut sampler = Sampler::resume(&params, &[0, 1], &[0, 1]);
        let got = penalized(&mut sampler, &[f32::MAX, -f32::MAX, 0.0]);
        assert!(got.iter().all(|x| x.is_finite()), "{got:?}");
    }

    /// The `n` best ids of `logits` by a full sort, in rank order.
    fn reference_best(logits: &[f32], n: usize) -> Vec<u32> {
        let mut all: Vec<(u32, f32)> = (0..logits.len() as u32)
            .map(|id| (id, sanitize(logits[id as usize])))
            .collect();
        all.sort_by(rank);
        all.iter().take(n).map(|&(id, _)| id).collect()
    }

    #[test]
    fn top_k_and_top_logprobs_over_a_large_vocabulary_match_a_full_sort() {
        // Coarse values give many ties across chunks.
        let logits: Vec<f32> = pseudo_logits(20_000, 8).iter().map(|x| x.round()).collect();
        for k in [1, 7, 50, 300, 5_000] {
            let params = SamplingParams {
                top_k: Some(k),
                logprobs: Some(k.min(20)),
                ..seeded(1.0, 0)
            };
            let mut expected = reference_best(&logits, k as usize);
            let token = Sampler::new(&params, &[]).sample(&logits);
            let best: Vec<u32> = token.top_logprobs.iter().map(|&(id, _)| id).collect();
            assert_eq!(best, expected[..best.len()]);
            expected.sort_unstable();
            assert_eq!(kept_ids(&params, &logits), expected);
        }
    }

    #[test]
    fn greedy_finds_the_first_maximum_in_a_later_chunk() {
        let mut logits = vec![0.0f32; 1000];
        logits[700] = 3.0;
        logits[900] = 3.0;
        let token = Sampler::new(&SamplingParams::default(), &[]).sample(&logits);
        assert_eq!(token.id, 700);
    }

    #[test]
    fn unvalidated_params_do_not_panic() {
        let logits = [f32::NEG_INFINITY, 1.0, f32::INFINITY, -3.0, f32::NAN];
        let with = |change: fn(&mut SamplingParams)| {
            let mut params = seeded(1.0, 1);
            change(&mut params);
            params
        };
        for params in [
            with(|p| p.temperature = f32::NAN),
            with(|p| p.temperature = -1.0),
            with(|p| p.temperature = f32::INFINITY),
            with(|p| p.top_p = f32::NAN),
            with(|p| p.top_p = -1.0),
            with(|p| p.min_p = f32::NAN),
            with(|p| p.min_p = 5.0),
            with(|p| p.top_k = Some(u32::MAX)),
            with(|p| p.repetition_penalty = f32::NAN),
            with(|p| p.frequency_penalty = f32::INFINITY),
            with(|p| p.logprobs = Some(u32::MAX)),
        ] {
            let token = Sampler::resume(&params, &[1, 2], &[1, 3]).sample(&logits);
            assert!((token.id as usize) < logits.len(), "{params:?}");
        }
    }

    #[test]
    fn portable_exp_matches_std_exp() {
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        let mut x = 0.0f32;
        while x > -87.0 {
            let (got, want) = (f64::from(exp_nonpositive(x)), f64::from(x).exp());
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
            x -= 0.000_713;
        }
    }

    #[test]
    fn lane_sum_matches_a_plain_sum() {
        let values: Vec<f32> = (0..1003).map(|i| (i % 17) as f32 * 0.25).collect();
        let plain: f64 = values.iter().map(|&v| f64::from(v)).sum();
        assert_eq!(sum_by(&values, |&v| v), plain);
        assert_eq!(sum_by(&values[..5], |&v| v), 2.5);
    }

    fn invalid_field(params: &SamplingParams) -> &'static str {
        match params.validate(&limits()) {
            Err(Error::InvalidRequest { field, .. }) => field,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn validation_accepts_defaults_and_typical_settings() {
        assert!(SamplingParams::default().validate(&limits()).is_ok());
        let typical = SamplingParams {
            temperature: 0.8,
            top_k: Some(40),
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            seed: Some(1),
            max_new_tokens: 100,
            stop_token_ids: vec![2],
            stop_strings: vec!["\n\n".into(), "12345678".into()],
            ignore_eos: true,
            logprobs: Some(20),
        };
        assert!(typical.validate(&limits()).is_ok());
    }

    #[test]
    fn validation_errors_name_the_field() {
        let with = |change: fn(&mut SamplingParams)| {
            let mut params = SamplingParams::default();
            change(&mut params);
            params
        };
        let cases = [
            (with(|p| p.temperature = -0.1), "temperature"),
            (with(|p| p.temperature = f32::NAN), "temperature"),
            (with(|p| p.temperature = f32::INFINITY), "temperature"),
            (with(|p| p.top_p = 0.0), "top_p"),
            (with(|p| p.top_p = 1.5), "top_p"),
            (with(|p| p.top_p = f32::NAN), "top_p"),
            (with(|p| p.min_p = -0.1), "min_p"),
            (with(|p| p.min_p = 1.1), "min_p"),
            (with(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (
                with(|p| p.repetition_penalty = f32::INFINITY),
                "repetition_penalty",
            ),
            (with(|p| p.presence_penalty = 2.5), "presence_penalty"),
            (with(|p| p.presence_penalty = f32::NAN), "presence_penalty"),
            (with(|p| p.frequency_penalty = -2.5), "frequency_penalty"),
            (with(|p| p.max_new_tokens = 0), "max_tokens"),
            (with(|p| p.max_new_tokens = 101), "max_tokens"),
            (with(|p| p.logprobs = Some(21)), "logprobs"),
            (with(|p| p.stop_strings = vec![String::new()]), "stop"),
            (with(|p| p.stop_strings = vec!["123456789".into()]), "stop"),
            (with(|p| p.stop_strings = vec!["a".into(); 5]), "stop"),
        ];
        for (params, field) in cases {
            assert_eq!(invalid_field(&params), field, "{params:?}");
        }
    }

    #[test]
    fn params_deserialize_with_defaults_for_missing_fields() -> serde_json::Result<()> {
        let params: SamplingParams = serde_json::from_str(r#"{"temperature": 0.7, "seed": 3}"#)?;
        assert_eq!(
            params,
            SamplingParams {
                temperature: 0.7,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
        Ok(())
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
        #[test]
        fn greedy_top_k_and_top_logprobs_agree_with_a_full_sort(
            logits in prop::collection::vec((-4i8..4).prop_map(f32::from), 1..400),
            k in 1u32..40,
        ) {
            let params = SamplingParams {
                top_k: Some(k),
                logprobs: Some(k),
                ..seeded(1.0, 0)
            };
            let mut expected = reference_best(&logits, k as usize);
            let greedy = Sampler::new(&SamplingParams::default(), &[]).sample(&logits);
            prop_assert_eq!(greedy.id, expected[0]);
            let token = Sampler::new(&params, &[]).sample(&logits);
            let best: Vec<u32> = token.top_logprobs.iter().map(|&(id, _)| id).collect();
            prop_assert_eq!(&best, &expected);
            expected.sort_unstable();
            prop_assert_eq!(kept_ids(&params, &logits), expected);
        }

            #[test]
            fn sample_returns_a_kept_finite_token_for_any_logits(
                logits in prop::collection::vec(
                    prop_oneof![
                        -50.0f32..50.0,
                        Just(f32::NAN),
                        Just(f32::NEG_INFINITY),
                        Just(f32::INFINITY),
                    ],
                    1..64,
                ),
                temperature in 0.0f32..3.0,
                top_k in 0u32..8,
                top_p in 0.01f32..=1.0,
                min_p in 0.0f32..=1.0,
                seed: u64,
            ) {
                let params = SamplingParams {
                    temperature,
                    top_k: Some(top_k),
                    top_p,
                    min_p,
                    repetition_penalty: 1.3,
                    presence_penalty: 0.5,
                    seed: Some(seed),
                    logprobs: Some(5),
                    ..SamplingParams::default()
                };
                let mut sampler = Sampler::new(&params, &[0, 1]);
                for _ in 0..4 {
                    let token = sampler.sample(&logits);
                    let any_finite = logits.iter().any(|x| !x.is_nan() && *x > f32::NEG_INFINITY);
                    if any_finite {
                        let x = logits[token.id as usize];
                        prop_assert!(!x.is_nan() && x > f32::NEG_INFINITY);
                    } else {
                        prop_assert_eq!(token.id, 0);
                    }
                    prop_assert!(token.top_logprobs.len() == 5.min(logits.len()));
                    prop_assert!(
                        token.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1)
                    );
                }
            }
        }
    }
}
