//! Placement and routing decisions: plain functions over snapshots of worker state, no IO, so
//! they are tested directly.
//!
//! request --decide--> aggregated (decode worker alone) | disaggregated (prefill -> decode)
//! candidates --choose_prefill / choose_decode--> the worker to use
//!
//! A candidate carries its load and, for KV-aware routing, how much of the prompt's prefix the
//! worker reported caching (its KV events, applied to the coordinator's index of it): a prefill
//! worker saves computing those tokens, a decode worker saves receiving them. Conversations so
//! follow their cache without any session id from the client.

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
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Aggregated => "aggregated",
            Mode::Disaggregated => "disaggregated",
        }
    }
}

/// Why a request could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlacement {
    /// `pd_mode = force` and no prefill worker is healthy.
    NoPrefillWorker,
}

/// Disaggregate when asked to, or under `auto` when a prefill worker is healthy and the prompt
/// is long enough that its prefill outweighs a handoff.
pub fn decide(
    pd_mode: PdMode,
    prompt_tokens: usize,
    min_disaggregated_tokens: usize,
    prefill_available: bool,
) -> Result<Mode, NoPlacement> {
    match pd_mode {
        PdMode::Off => Ok(Mode::Aggregated),
        PdMode::Force if prefill_available => Ok(Mode::Disaggregated),
        PdMode::Force => Err(NoPlacement::NoPrefillWorker),
        PdMode::Auto if prefill_available && prompt_tokens >= min_disaggregated_tokens => {
            Ok(Mode::Disaggregated)
        }
        PdMode::Auto => Ok(Mode::Aggregated),
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
        assert_eq!(decide(PdMode::Auto, 100, 32, true), Ok(Mode::Disaggregated));
        assert_eq!(decide(PdMode::Auto, 10, 32, true), Ok(Mode::Aggregated));
        assert_eq!(decide(PdMode::Auto, 100, 32, false), Ok(Mode::Aggregated));
        assert_eq!(decide(PdMode::Off, 100, 32, true), Ok(Mode::Aggregated));
        assert_eq!(decide(PdMode::Force, 1, 32, true), Ok(Mode::Disaggregated));
        assert_eq!(
            decide(PdMode::Force, 1, 32, false),
            Err(NoPlacement::NoPrefillWorker)
        );
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
