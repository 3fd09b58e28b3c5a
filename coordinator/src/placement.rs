//! Placement and routing decisions: plain functions over snapshots of worker state, no IO, so
//! they are tested directly.
//!
//! request --decide--> aggregated (decode worker alone) | disaggregated (prefill -> decode)
//! candidates --choose_prefill / choose_decode--> the worker to use

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

/// What routing knows of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Candidate {
    pub healthy: bool,
    /// Requests the worker reported running and waiting at the last poll.
    pub queued: u32,
    /// Requests this coordinator placed there that are not finished (covers the time since the
    /// last poll).
    pub placed: u32,
    pub free_blocks: u32,
    /// Blocks a request placed here needs; a worker without that many free is skipped.
    pub needed_blocks: u32,
}

/// The prefill worker with the shortest queue; ties go to the lowest index.
pub fn choose_prefill(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy)
        .min_by_key(|(i, c)| (c.queued + c.placed, *i))
        .map(|(i, _)| i)
}

/// The decode worker with the most free blocks among those with room for the request, then the
/// smallest running batch; ties go to the lowest index.
pub fn choose_decode(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy && c.free_blocks >= c.needed_blocks)
        .min_by_key(|(i, c)| (std::cmp::Reverse(c.free_blocks), c.queued + c.placed, *i))
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
        }
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
    fn prefill_goes_to_the_shortest_healthy_queue() {
        let cs = [
            c(true, 3, 0, 0),
            c(false, 0, 0, 0),
            c(true, 1, 1, 0),
            c(true, 2, 0, 0),
        ];
        assert_eq!(choose_prefill(&cs), Some(2));
        assert_eq!(choose_prefill(&[c(false, 0, 0, 0)]), None);
    }

    #[test]
    fn decode_goes_to_the_most_free_blocks_with_room() {
        let cs = [
            c(true, 0, 0, 10),
            c(true, 0, 0, 50),
            c(false, 0, 0, 99),
            c(true, 0, 0, 3),
        ];
        assert_eq!(choose_decode(&cs), Some(1));
        let tie = [c(true, 5, 0, 50), c(true, 1, 1, 50)];
        assert_eq!(choose_decode(&tie), Some(1));
        assert_eq!(choose_decode(&[c(true, 0, 0, 3)]), None, "no room");
    }
}
