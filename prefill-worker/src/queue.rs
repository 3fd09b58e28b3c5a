//! Which prompt chunks the next prefill step computes. Pure planning: the engine loop hands in
//! each pending prompt's progress and the free blocks, and gets back step items.
//!
//! Chunks end at fixed multiples of the chunk size from the prompt's start, whatever shares the
//! step, so a prompt's numbers (and the blocks each step exports) are the same alone or
//! batched. Prompts are served in arrival order: one whose chunk does not fit stops the plan, so
//! a long prompt is never starved by shorter ones behind it.

use baton_engine::{Phase, SeqId, StepItem};

/// A prompt the prefill worker is computing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub seq: SeqId,
    /// Prompt tokens whose KV is computed.
    pub computed: usize,
    /// Prompt length.
    pub total: usize,
    /// Blocks the sequence holds now.
    pub blocks_held: usize,
}

/// Step budget and geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub chunk_tokens: usize,
    pub max_batch_tokens: usize,
    pub block_size: usize,
}

/// The next step for `pending` (arrival order) with `free_blocks` in the pool.
pub fn plan_step(pending: &[Progress], limits: Limits, mut free_blocks: usize) -> Vec<StepItem> {
    let mut budget = limits.max_batch_tokens;
    let mut items = Vec::new();
    for p in pending {
        if p.computed >= p.total {
            continue;
        }
        let boundary = (p.computed / limits.chunk_tokens + 1) * limits.chunk_tokens;
        let n = boundary.min(p.total) - p.computed;
        let need = (p.computed + n)
            .div_ceil(limits.block_size)
            .saturating_sub(p.blocks_held);
        if n > budget || need > free_blocks {
            break;
        }
        budget -= n;
        free_blocks -= need;
        items.push(StepItem {
            seq: p.seq,
            tokens: n,
            phase: Phase::Prefill,
        });
    }
    items
}

/// When nothing fits, the prompt to evict so the ones ahead of it can go on: the newest that
/// holds blocks, unless only the oldest does (then freeing must come from elsewhere: leases).
pub fn preemption_victim(pending: &[Progress]) -> Option<SeqId> {
    let holders: Vec<&Progress> = pending.iter().filter(|p| p.blocks_held > 0).collect();
    match holders.as_slice() {
        [] | [_] => None,
        [.., last] => Some(last.seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        chunk_tokens: 64,
        max_batch_tokens: 128,
        block_size: 16,
    };

    fn fresh(seq: u64, total: usize) -> Progress {
        Progress {
            seq: SeqId(seq),
            computed: 0,
            total,
            blocks_held: 0,
        }
    }

    fn tokens(items: &[StepItem]) -> Vec<(u64, usize)> {
        items.iter().map(|i| (i.seq.0, i.tokens)).collect()
    }

    #[test]
    fn chunks_end_at_fixed_boundaries() {
        let mid = Progress {
            seq: SeqId(1),
            computed: 64,
            total: 150,
            blocks_held: 4,
        };
        assert_eq!(tokens(&plan_step(&[mid], LIMITS, 100)), vec![(1, 64)]);
        let last = Progress {
            computed: 128,
            blocks_held: 8,
            ..mid
        };
        assert_eq!(tokens(&plan_step(&[last], LIMITS, 100)), vec![(1, 22)]);
    }

    #[test]
    fn batch_budget_stops_in_arrival_order() {
        let pending = [fresh(1, 100), fresh(2, 10), fresh(3, 10)];
        assert_eq!(
            tokens(&plan_step(&pending, LIMITS, 100)),
            vec![(1, 64), (2, 10), (3, 10)]
        );
        let pending = [fresh(1, 100), fresh(2, 100), fresh(3, 10)];
        // The second chunk exhausts the budget; the short third waits rather than jumping ahead.
        assert_eq!(
            tokens(&plan_step(&pending, LIMITS, 100)),
            vec![(1, 64), (2, 64)]
        );
    }

    #[test]
    fn a_chunk_that_does_not_fit_the_pool_waits() {
        let pending = [fresh(1, 64), fresh(2, 16)];
        assert_eq!(
            tokens(&plan_step(&pending, LIMITS, 3)),
            Vec::<(u64, usize)>::new()
        );
        assert_eq!(tokens(&plan_step(&pending, LIMITS, 4)), vec![(1, 64)]);
        assert_eq!(
            tokens(&plan_step(&pending, LIMITS, 5)),
            vec![(1, 64), (2, 16)]
        );
    }

    #[test]
    fn victim_is_the_newest_holder_but_never_the_only_one() {
        let mut a = fresh(1, 200);
        a.blocks_held = 4;
        let mut b = fresh(2, 200);
        b.blocks_held = 4;
        let c = fresh(3, 200);
        assert_eq!(preemption_victim(&[a, b, c]), Some(SeqId(2)));
        assert_eq!(preemption_victim(&[a, c]), None);
        assert_eq!(preemption_victim(&[c]), None);
    }
}
