//! Placement and routing decisions: plain functions over snapshots of worker state, no IO, so
//! they are tested directly.
//!
//! request --spill::target--> local | cloud upstream ([`spill`])
//! local --decide--> aggregated (decode worker alone) | disaggregated (prefill -> decode)
//! candidates --choose_prefill / choose_decode--> the worker to use
//!
//! A candidate carries its load and, for KV-aware routing, how much of the prompt's prefix the
//! worker reported caching (its KV events, applied to the coordinator's index of it): a prefill
//! worker saves computing those tokens, a decode worker saves receiving them. Conversations so
//! follow their cache without any session id from the client.

pub mod spill;

pub use spill::{Kept, LocalState, NoTarget, QueueModel, SpillReason, SpillRequest, Target, Unfit};

/// The client's wish, from `pd_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PdMode {
    /// The coordinator decides by prompt length and what is available.
    #[default]
    Auto,
    /// Disaggregate, or fail if no prefill worker is healthy.
    Force,
    /// Run prefill and decode on one decode worker.
    Off,
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Aggregated,
    Disaggregated,
    /// On a cloud upstream ([`spill::target`]).
    Cloud,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Aggregated => "aggregated",
            Mode::Disaggregated => "disaggregated",
            Mode::Cloud => "cloud",
        }
    }
}

/// Why a request could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlacement {
    /// `pd_mode = force` and no prefill worker is healthy.
    NoPrefillWorker,
}

/// Why a request runs where it does (the response's `baton.placement_reason`, a metric
/// label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `pd_mode = off`.
    Off,
    /// `pd_mode = force`.
    Forced,
    /// No healthy prefill worker.
    NoPrefillWorker,
    /// Shorter than `min_disaggregated_tokens`: its prefill costs less than a handoff.
    ShortPrompt,
    /// The pair's link, as measured, would move the KV slower than the decode worker computes
    /// it.
    SlowLink,
    /// Long enough, a prefill worker, and a link that keeps up (or not measured yet).
    Disaggregate,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Off => "pd_mode_off",
            Reason::Forced => "pd_mode_force",
            Reason::NoPrefillWorker => "no_prefill_worker",
            Reason::ShortPrompt => "short_prompt",
            Reason::SlowLink => "slow_link",
            Reason::Disaggregate => "disaggregate",
        }
    }
}

/// What the coordinator predicts for one request on one (prefill, decode) pair, from what it
/// measured: see [`LinkEstimate`] and [`PrefillRate`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkCost {
    /// Seconds to move the KV the decode worker lacks over the pair's link; `None` while the
    /// link has kept up with the prefill of every transfer seen (or none was seen lately).
    pub transfer_s: Option<f64>,
    /// Seconds the decode worker would take to compute what its cache lacks.
    pub prefill_s: Option<f64>,
}

/// How many times the decode worker's own prefill a transfer may be predicted to take before
/// the request runs aggregated: disaggregation also keeps a long prefill off the decode
/// worker's running batch, which is worth some waiting.
pub const LINK_SLACK: f64 = 1.5;

impl LinkCost {
    pub fn too_slow(&self) -> bool {
        matches!((self.transfer_s, self.prefill_s), (Some(t), Some(p)) if t > LINK_SLACK * p)
    }
}

/// Disaggregate when asked to, or under `auto` when a prefill worker is healthy, the prompt is
/// long enough that its prefill outweighs a handoff, and the pair's link moves its KV no
/// slower than the decode worker would compute it ([`LinkCost::too_slow`]).
pub fn decide(
    pd_mode: PdMode,
    prompt_tokens: usize,
    min_disaggregated_tokens: usize,
    prefill_available: bool,
    link: LinkCost,
) -> Result<(Mode, Reason), NoPlacement> {
    match pd_mode {
        PdMode::Off => Ok((Mode::Aggregated, Reason::Off)),
        PdMode::Force if prefill_available => Ok((Mode::Disaggregated, Reason::Forced)),
        PdMode::Force => Err(NoPlacement::NoPrefillWorker),
        PdMode::Auto if !prefill_available => Ok((Mode::Aggregated, Reason::NoPrefillWorker)),
        PdMode::Auto if prompt_tokens < min_disaggregated_tokens => {
            Ok((Mode::Aggregated, Reason::ShortPrompt))
        }
        PdMode::Auto if link.too_slow() => Ok((Mode::Aggregated, Reason::SlowLink)),
        PdMode::Auto => Ok((Mode::Disaggregated, Reason::Disaggregate)),
    }
}

/// Weight of a new sample in the running estimates.
const EWMA: f64 = 0.3;

/// A link estimate older than this is not used: one request then disaggregates and measures
/// it again (a link that was slow may not be any more).
pub const LINK_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

/// A (prefill, decode) pair's KV link as its transfers showed it.
///
/// A push transfer sends each layer as it is computed, so it lasts at least the prefill: its
/// bytes over its duration say how fast the link was only when the link, not the compute, set
/// the pace, which shows as time after the last layer was computed (`exposed`). Such
/// link-bound transfers (and pull transfers, which are all exposed) update the bandwidth; a
/// transfer the link kept up with says only that the link is at least that fast, and clears
/// a slower estimate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkEstimate {
    /// Bytes per second of link-bound transfers (EWMA), and when last seen.
    pub bytes_per_s: Option<(f64, std::time::Instant)>,
    /// KV bytes per prompt token (EWMA).
    pub bytes_per_token: Option<f64>,
}

impl LinkEstimate {
    /// One finished transfer: `bytes` for `tokens` prompt tokens in `transfer_s` seconds, of
    /// which `exposed_s` after the compute ended.
    pub fn observe(
        &mut self,
        bytes: u64,
        tokens: u32,
        transfer_s: f64,
        exposed_s: f64,
        now: std::time::Instant,
    ) {
        if bytes == 0 || tokens == 0 || transfer_s <= 0.0 {
            return;
        }
        let per_token = bytes as f64 / f64::from(tokens);
        self.bytes_per_token = Some(ewma(self.bytes_per_token, per_token));
        let rate = bytes as f64 / transfer_s;
        let link_bound = exposed_s > 0.005 && exposed_s > 0.1 * transfer_s;
        if link_bound {
            let old = self.bytes_per_s.map(|(r, _)| r);
            self.bytes_per_s = Some((ewma(old, rate), now));
        } else if self.bytes_per_s.is_some_and(|(r, _)| r < rate) {
            // The link kept up at this rate: it is no slower than that.
            self.bytes_per_s = None;
        }
    }

    /// Seconds to move `tokens` prompt tokens' KV, when a recent link-bound estimate exists.
    pub fn predict(&self, tokens: usize, now: std::time::Instant) -> Option<f64> {
        let (rate, at) = self.bytes_per_s?;
        if now.saturating_duration_since(at) > LINK_MEMORY || rate <= 0.0 {
            return None;
        }
        Some(tokens as f64 * self.bytes_per_token? / rate)
    }
}

/// A prefill worker's measured compute: seconds per prompt token (EWMA), from the time its
/// `Prefill` call took over the tokens it computed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PrefillRate {
    pub seconds_per_token: Option<f64>,
}

impl PrefillRate {
    pub fn observe(&mut self, tokens: usize, seconds: f64) {
        if tokens > 0 && seconds > 0.0 {
            self.seconds_per_token = Some(ewma(self.seconds_per_token, seconds / tokens as f64));
        }
    }

    pub fn predict(&self, tokens: usize) -> Option<f64> {
        Some(self.seconds_per_token? * tokens as f64)
    }
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(old) => old + EWMA * (sample - old),
        None => sample,
    }
}

/// How workers are chosen ([`choose_prefill`], [`choose_decode`]).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// Weigh the prompt's prefix each worker caches against its load.
    #[default]
    Kv,
    /// Load only: the shortest prefill queue, the decode worker with the most free blocks.
    Load,
}

impl Routing {
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::Kv => "kv",
            Routing::Load => "load",
        }
    }
}

/// How many more requests than the least loaded decode worker a decode worker may run and still
/// be chosen for the prompt prefix it caches: it saves moving those blocks, not compute, so it
/// wins only among workers that are about as busy.
pub const DECODE_LOAD_SLACK: u32 = 1;

/// What routing knows of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Candidate {
    pub healthy: bool,
    /// Requests the worker reported running and waiting at the last poll.
    pub queued: u32,
    /// Requests this coordinator placed there that are not finished (covers the time since the
    /// last poll).
    pub placed: u32,
    /// Prompt tokens of the prefills this coordinator placed there that have not answered,
    /// less what the worker was expected to have cached: work queued ahead of a new prompt.
    pub placed_tokens: u64,
    pub free_blocks: u32,
    /// Blocks a request placed here needs; a worker without that many free is skipped.
    pub needed_blocks: u32,
    /// Of the request's prompt, the tokens (whole blocks) whose KV the worker reported
    /// holding in its prefix cache.
    pub cached_tokens: u32,
    /// Blocks those tokens fill.
    pub cached_blocks: u32,
}

/// The prefill worker that would start computing the prompt soonest: the least
/// `prompt - cached + placed_tokens` (tokens to compute, its own and those queued ahead of it)
/// under [`Routing::Kv`]; the shortest queue under [`Routing::Load`]. Ties go to the shorter
/// queue, then the lowest index.
pub fn choose_prefill(
    candidates: &[Candidate],
    prompt_tokens: u32,
    routing: Routing,
) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy)
        .min_by_key(|(i, c)| {
            let work = match routing {
                Routing::Kv => {
                    u64::from(prompt_tokens.saturating_sub(c.cached_tokens)) + c.placed_tokens
                }
                Routing::Load => 0,
            };
            (work, c.queued + c.placed, *i)
        })
        .map(|(i, _)| i)
}

/// The decode worker for a request: among those with room for the blocks it lacks, under
/// [`Routing::Kv`] the one caching the longest prefix of the prompt among those within
/// [`DECODE_LOAD_SLACK`] requests of the least loaded, then the most free blocks, then the
/// smallest running batch; under [`Routing::Load`] the most free blocks, then the smallest
/// batch. Ties go to the lowest index.
pub fn choose_decode(candidates: &[Candidate], routing: Routing) -> Option<usize> {
    let room = |c: &Candidate| {
        let needed = match routing {
            Routing::Kv => c.needed_blocks.saturating_sub(c.cached_blocks),
            Routing::Load => c.needed_blocks,
        };
        c.healthy && c.free_blocks >= needed
    };
    let load = |c: &Candidate| c.queued + c.placed;
    let least = candidates.iter().filter(|c| room(c)).map(load).min()?;
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| room(c))
        .min_by_key(|(i, c)| {
            let cached = match routing {
                Routing::Kv if load(c) <= least + DECODE_LOAD_SLACK => c.cached_blocks,
                _ => 0,
            };
            (
                std::cmp::Reverse(cached),
                std::cmp::Reverse(c.free_blocks),
                load(c),
                *i,
            )
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(healthy: bool, queued: u32, placed: u32, free: u32) -> Candidate {
        Candidate {
            healthy,
            queued,
            placed,
            free_blocks: free,
            needed_blocks: 4,
            ..Candidate::default()
        }
    }

    fn cached(mut c: Candidate, blocks: u32) -> Candidate {
        c.cached_blocks = blocks;
        c.cached_tokens = blocks * 16;
        c
    }

    #[test]
    fn auto_disaggregates_long_prompts_only_when_a_prefill_worker_is_up() {
        let link = LinkCost::default();
        let mode = |m, n, p| decide(m, n, 32, p, link).map(|(mode, _)| mode);
        assert_eq!(mode(PdMode::Auto, 100, true), Ok(Mode::Disaggregated));
        assert_eq!(mode(PdMode::Auto, 10, true), Ok(Mode::Aggregated));
        assert_eq!(mode(PdMode::Auto, 100, false), Ok(Mode::Aggregated));
        assert_eq!(mode(PdMode::Off, 100, true), Ok(Mode::Aggregated));
        assert_eq!(mode(PdMode::Force, 1, true), Ok(Mode::Disaggregated));
        assert_eq!(
            decide(PdMode::Force, 1, 32, false, link),
            Err(NoPlacement::NoPrefillWorker)
        );
    }

    #[test]
    fn a_link_slower_than_the_decode_workers_prefill_runs_the_request_aggregated() {
        let slow = LinkCost {
            transfer_s: Some(4.0),
            prefill_s: Some(2.0),
        };
        assert_eq!(
            decide(PdMode::Auto, 1000, 32, true, slow),
            Ok((Mode::Aggregated, Reason::SlowLink))
        );
        let ok = LinkCost {
            transfer_s: Some(2.5),
            prefill_s: Some(2.0),
        };
        assert_eq!(
            decide(PdMode::Auto, 1000, 32, true, ok),
            Ok((Mode::Disaggregated, Reason::Disaggregate)),
            "within the slack: disaggregation keeps prefill off the decode batch"
        );
        assert_eq!(
            decide(PdMode::Force, 1000, 32, true, slow),
            Ok((Mode::Disaggregated, Reason::Forced)),
            "the client's force wins"
        );
        let unmeasured = LinkCost {
            transfer_s: None,
            prefill_s: Some(2.0),
        };
        assert!(
            !unmeasured.too_slow(),
            "not measured yet: disaggregate and learn"
        );
    }

    #[test]
    fn only_link_bound_transfers_say_how_fast_the_link_is() {
        let t0 = std::time::Instant::now();
        let mut link = LinkEstimate::default();
        // 10 MB over 2 s, all but 0.1 s of it hidden behind the prefill: compute-bound.
        link.observe(10_000_000, 1000, 2.0, 0.01, t0);
        assert_eq!(
            link.predict(1000, t0),
            None,
            "the link kept up; its speed is unknown"
        );
        assert_eq!(link.bytes_per_token, Some(10_000.0));
        // 10 MB over 8 s, 6 s after the compute ended: 1.25 MB/s.
        link.observe(10_000_000, 1000, 8.0, 6.0, t0);
        let predicted = link.predict(500, t0).expect("link-bound sample");
        assert!((predicted - 4.0).abs() < 1e-9, "{predicted}");
        // Forgotten after a while: measure again.
        assert_eq!(link.predict(500, t0 + LINK_MEMORY * 2), None);
        // A later transfer that kept up at a higher rate clears the slow estimate.
        link.observe(10_000_000, 1000, 2.0, 0.0, t0);
        assert_eq!(link.predict(500, t0), None);
        let mut rate = PrefillRate::default();
        assert_eq!(rate.predict(10), None);
        rate.observe(1000, 2.0);
        assert_eq!(rate.predict(500), Some(1.0));
    }

    #[test]
    fn prefill_goes_to_the_shortest_healthy_queue_without_cache_knowledge() {
        let cs = [
            c(true, 3, 0, 0),
            c(false, 0, 0, 0),
            c(true, 1, 1, 0),
            c(true, 2, 0, 0),
        ];
        for routing in [Routing::Kv, Routing::Load] {
            assert_eq!(choose_prefill(&cs, 100, routing), Some(2));
        }
        assert_eq!(choose_prefill(&[c(false, 0, 0, 0)], 100, Routing::Kv), None);
    }

    #[test]
    fn prefill_follows_its_cache_until_the_queue_ahead_costs_more() {
        let idle = c(true, 0, 0, 0);
        let warm = cached(c(true, 1, 1, 0), 30); // 480 of 500 tokens cached
        assert_eq!(choose_prefill(&[idle, warm], 500, Routing::Kv), Some(1));
        assert_eq!(choose_prefill(&[idle, warm], 500, Routing::Load), Some(0));
        // 480 cached tokens save less than the 600 queued ahead of them.
        let busy = Candidate {
            placed_tokens: 600,
            ..warm
        };
        assert_eq!(choose_prefill(&[idle, busy], 500, Routing::Kv), Some(0));
        // A cache never counts for more than the prompt.
        let over = cached(c(true, 0, 0, 0), 100);
        assert_eq!(choose_prefill(&[over, idle], 10, Routing::Kv), Some(0));
    }

    #[test]
    fn decode_goes_to_the_most_free_blocks_with_room() {
        let cs = [
            c(true, 0, 0, 10),
            c(true, 0, 0, 50),
            c(false, 0, 0, 99),
            c(true, 0, 0, 3),
        ];
        for routing in [Routing::Kv, Routing::Load] {
            assert_eq!(choose_decode(&cs, routing), Some(1));
            let tie = [c(true, 5, 0, 50), c(true, 1, 1, 50)];
            assert_eq!(choose_decode(&tie, routing), Some(1));
            assert_eq!(choose_decode(&[c(true, 0, 0, 3)], routing), None, "no room");
        }
    }

    #[test]
    fn decode_follows_its_cache_among_workers_about_as_busy() {
        let roomy = c(true, 0, 0, 90);
        let warm = cached(c(true, 1, 0, 20), 3);
        assert_eq!(choose_decode(&[roomy, warm], Routing::Kv), Some(1));
        assert_eq!(choose_decode(&[roomy, warm], Routing::Load), Some(0));
        let busier = cached(c(true, 1 + DECODE_LOAD_SLACK, 0, 20), 3);
        assert_eq!(
            choose_decode(&[roomy, busier], Routing::Kv),
            Some(0),
            "too busy for its cache to count"
        );
        // Cached blocks are room it does not need.
        let tight = cached(c(true, 0, 0, 1), 3);
        assert_eq!(choose_decode(&[tight], Routing::Kv), Some(0));
        assert_eq!(choose_decode(&[tight], Routing::Load), None);
    }
}
