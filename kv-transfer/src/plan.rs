//! The transfer plan: which bytes go from which prefill shard to which decode shard.
//!
//! A shard is one engine's part of the model's KV, given by its [`LayoutDescriptor`]: the layer
//! range of its pipeline stage and the kv-head range of its tensor-parallel rank. From the
//! source shards (prefill), the destination shards (decode) and a block range, [`plan`] lists the
//! copies `(source shard, layers, kv heads, blocks) -> (destination shard, same)`. Equal layouts,
//! different TP degrees (heads split or gathered), different PP stages (layer ranges routed to
//! their owner) and both at once are the same computation: intersect every source rectangle of
//! (layers x kv heads) with every destination rectangle.
//!
//! Pure code, no IO. Invariant (checked against a brute-force reference in the tests): for a plan
//! that is returned, every (layer, kv head, block) unit is copied exactly once, from the source
//! shard that holds it to the destination shard that needs it.
//!
//! How heads are split: [`split_range`] gives contiguous, balanced ranges in rank order, the
//! first `n % parts` ranks taking one more (10 heads over TP 4: 3, 3, 2, 2). The plan itself does
//! not assume this split: it accepts any set of rectangles that tiles the model exactly once.
//! Replicated kv heads (TP degree above the kv-head count, as vLLM does for GQA) do not tile and
//! are refused for now.

use std::ops::Range;

use baton_core::LayoutDescriptor;

use crate::error::{Error, Result, Side};
use crate::memory::{ByteCopy, SeqBlocks, layer_copies};

/// One copy of the plan. Ranges are global (model layer and kv-head indices, sequence block
/// indices); [`PlannedCopy::local_heads`] and [`PlannedCopy::local_layers`] give them relative
/// to a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCopy {
    /// Index of the source shard in the source set.
    pub source: usize,
    /// Index of the destination shard in the destination set.
    pub destination: usize,
    pub layers: Range<u32>,
    pub kv_heads: Range<u32>,
    pub blocks: Range<u32>,
}

impl PlannedCopy {
    /// This copy's kv heads as indices into `shard`'s own head range.
    pub fn local_heads(&self, shard: &LayoutDescriptor) -> Range<u32> {
        self.kv_heads.start - shard.kv_heads.start..self.kv_heads.end - shard.kv_heads.start
    }

    /// This copy's layers as indices into `shard`'s own layer range.
    pub fn local_layers(&self, shard: &LayoutDescriptor) -> Range<u32> {
        self.layers.start - shard.layers.start..self.layers.end - shard.layers.start
    }

    /// Number of (layer, kv head, block) units this copy moves.
    pub fn units(&self) -> u64 {
        self.layers.len() as u64 * self.kv_heads.len() as u64 * self.blocks.len() as u64
    }
}

/// The copies that move one sequence's KV from the source shards to the destination shards,
/// ordered by source shard, then destination shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferPlan {
    pub copies: Vec<PlannedCopy>,
}

impl TransferPlan {
    /// The copies a given source shard performs.
    pub fn from_source(&self, source: usize) -> impl Iterator<Item = &PlannedCopy> {
        self.copies.iter().filter(move |c| c.source == source)
    }

    /// The copies a given destination shard receives.
    pub fn to_destination(&self, destination: usize) -> impl Iterator<Item = &PlannedCopy> {
        self.copies
            .iter()
            .filter(move |c| c.destination == destination)
    }

    /// The plan as byte copies between pools, one list per planned copy (a source shard and a
    /// destination shard): every layer of its rectangle, of a sequence of `tokens` tokens whose
    /// blocks are `sources[s]` on source shard `s` and `destinations[d]` on destination `d`
    /// (indexed as the shards were given to [`plan`]). What one rank sends another, straight.
    pub fn byte_copies(
        &self,
        tokens: u32,
        sources: &[SeqBlocks<'_>],
        destinations: &[SeqBlocks<'_>],
    ) -> Vec<RankCopies> {
        self.copies
            .iter()
            .map(|pc| {
                let mut copies = Vec::new();
                for layer in pc.layers.clone() {
                    layer_copies(
                        layer,
                        &pc.kv_heads,
                        &pc.blocks,
                        tokens,
                        sources[pc.source],
                        destinations[pc.destination],
                        &mut copies,
                    );
                }
                RankCopies {
                    source: pc.source,
                    destination: pc.destination,
                    copies,
                }
            })
            .collect()
    }
}

/// What one source shard copies into one destination shard ([`TransferPlan::byte_copies`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankCopies {
    pub source: usize,
    pub destination: usize,
    pub copies: Vec<ByteCopy>,
}

impl RankCopies {
    /// Bytes these copies move.
    pub fn bytes(&self) -> u64 {
        self.copies.iter().map(|c| c.len).sum()
    }
}

/// Plans the copies of blocks `blocks` from `sources` to `destinations`.
///
/// Refuses sets that cannot be mapped: shards of another model, dtype, block size or shape, and
/// sets whose shards do not hold every (layer, kv head) pair exactly once.
pub fn plan(
    sources: &[LayoutDescriptor],
    destinations: &[LayoutDescriptor],
    blocks: Range<u32>,
) -> Result<TransferPlan> {
    if blocks.start > blocks.end {
        return Err(Error::InvalidBlocks { blocks });
    }
    check_tiling(Side::Source, sources)?;
    check_tiling(Side::Destination, destinations)?;
    destinations[0].check_compatible(&sources[0])?;

    let mut copies = Vec::new();
    if blocks.is_empty() {
        return Ok(TransferPlan { copies });
    }
    for (s, src) in sources.iter().enumerate() {
        for (d, dst) in destinations.iter().enumerate() {
            let layers = intersect(&src.layers, &dst.layers);
            let kv_heads = intersect(&src.kv_heads, &dst.kv_heads);
            if !layers.is_empty() && !kv_heads.is_empty() {
                copies.push(PlannedCopy {
                    source: s,
                    destination: d,
                    layers,
                    kv_heads,
                    blocks: blocks.clone(),
                });
            }
        }
    }
    Ok(TransferPlan { copies })
}

/// Part `rank` of `0..n` cut into `parts` contiguous, balanced ranges; the first `n % parts`
/// ranges are one longer. Used for both kv heads (TP) and layers (PP).
pub fn split_range(n: u32, parts: u32, rank: u32) -> Range<u32> {
    assert!(parts > 0 && rank < parts, "rank {rank} of {parts} parts");
    let base = n / parts;
    let extra = n % parts;
    let start = rank * base + rank.min(extra);
    let len = base + u32::from(rank < extra);
    start..start + len
}

fn intersect(a: &Range<u32>, b: &Range<u32>) -> Range<u32> {
    let start = a.start.max(b.start);
    let end = a.end.min(b.end);
    start..end.max(start)
}

/// Every shard of a set is the same model and shape, holds a non-empty in-range rectangle of
/// (layers x kv heads), and together they hold every pair exactly once.
fn check_tiling(side: Side, shards: &[LayoutDescriptor]) -> Result<()> {
    let first = shards.first().ok_or(Error::NoShards { side })?;
    for (i, shard) in shards.iter().enumerate() {
        first.check_compatible(shard)?;
        let invalid = |reason: String| Error::InvalidShard {
            side,
            shard: i,
            reason,
        };
        if shard.layers.is_empty() || shard.layers.end > shard.num_layers {
            return Err(invalid(format!(
                "layers {:?} is empty or outside 0..{}",
                shard.layers, shard.num_layers
            )));
        }
        if shard.kv_heads.is_empty() || shard.kv_heads.end > shard.num_kv_heads {
            return Err(invalid(format!(
                "kv heads {:?} is empty or outside 0..{}",
                shard.kv_heads, shard.num_kv_heads
            )));
        }
    }
    for (a, sa) in shards.iter().enumerate() {
        for (b, sb) in shards.iter().enumerate().skip(a + 1) {
            let layers = intersect(&sa.layers, &sb.layers);
            let kv_heads = intersect(&sa.kv_heads, &sb.kv_heads);
            if !layers.is_empty() && !kv_heads.is_empty() {
                return Err(Error::ShardsOverlap {
                    side,
                    a,
                    b,
                    layers,
                    kv_heads,
                });
            }
        }
    }
    // Disjoint rectangles inside the model cover it exactly when their areas add up.
    let total = u64::from(first.num_layers) * u64::from(first.num_kv_heads);
    let held: u64 = shards
        .iter()
        .map(|s| s.layers.len() as u64 * s.kv_heads.len() as u64)
        .sum();
    if held != total {
        return Err(Error::ShardsLeaveGap {
            side,
            missing: total - held,
            total,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{Fingerprint, KvDType};
    use proptest::prelude::*;

    fn shard(
        layers: Range<u32>,
        kv_heads: Range<u32>,
        num_layers: u32,
        num_heads: u32,
    ) -> LayoutDescriptor {
        LayoutDescriptor {
            fingerprint: Fingerprint([7; 32]),
            dtype: KvDType::F16,
            block_size: 16,
            num_layers,
            layers,
            num_kv_heads: num_heads,
            kv_heads,
            head_dim: 64,
        }
    }

    /// A PP x TP grid of shards with balanced splits, stage-major.
    fn grid(num_layers: u32, num_heads: u32, pp: u32, tp: u32) -> Vec<LayoutDescriptor> {
        let mut out = Vec::new();
        for stage in 0..pp {
            for rank in 0..tp {
                out.push(shard(
                    split_range(num_layers, pp, stage),
                    split_range(num_heads, tp, rank),
                    num_layers,
                    num_heads,
                ));
            }
        }
        out
    }

    fn copy(s: usize, d: usize, layers: Range<u32>, kv_heads: Range<u32>) -> PlannedCopy {
        PlannedCopy {
            source: s,
            destination: d,
            layers,
            kv_heads,
            blocks: 0..5,
        }
    }

    #[test]
    fn split_range_gives_extra_heads_to_low_ranks() {
        let parts: Vec<_> = (0..4).map(|r| split_range(10, 4, r)).collect();
        assert_eq!(parts, vec![0..3, 3..6, 6..8, 8..10]);
        assert_eq!(split_range(8, 1, 0), 0..8);
    }

    #[test]
    fn equal_layouts_copy_shard_to_shard() {
        let p = plan(&grid(4, 8, 1, 1), &grid(4, 8, 1, 1), 0..5).expect("plan");
        assert_eq!(p.copies, vec![copy(0, 0, 0..4, 0..8)]);
        let p = plan(&grid(4, 8, 2, 2), &grid(4, 8, 2, 2), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![
                copy(0, 0, 0..2, 0..4),
                copy(1, 1, 0..2, 4..8),
                copy(2, 2, 2..4, 0..4),
                copy(3, 3, 2..4, 4..8),
            ]
        );
    }

    #[test]
    fn tp_one_to_two_splits_heads() {
        let p = plan(&grid(4, 8, 1, 1), &grid(4, 8, 1, 2), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![copy(0, 0, 0..4, 0..4), copy(0, 1, 0..4, 4..8)]
        );
        let dst = grid(4, 8, 1, 2);
        assert_eq!(p.copies[1].local_heads(&dst[1]), 0..4);
    }

    #[test]
    fn tp_two_to_one_gathers_heads() {
        let p = plan(&grid(4, 8, 1, 2), &grid(4, 8, 1, 1), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![copy(0, 0, 0..4, 0..4), copy(1, 0, 0..4, 4..8)]
        );
    }

    #[test]
    fn tp_two_to_four_splits_each_source() {
        let p = plan(&grid(2, 8, 1, 2), &grid(2, 8, 1, 4), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![
                copy(0, 0, 0..2, 0..2),
                copy(0, 1, 0..2, 2..4),
                copy(1, 2, 0..2, 4..6),
                copy(1, 3, 0..2, 6..8),
            ]
        );
    }

    #[test]
    fn tp_three_to_two_with_uneven_heads() {
        // 8 heads: TP 3 holds 0..3, 3..6, 6..8; TP 2 holds 0..4, 4..8.
        let p = plan(&grid(2, 8, 1, 3), &grid(2, 8, 1, 2), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![
                copy(0, 0, 0..2, 0..3),
                copy(1, 0, 0..2, 3..4),
                copy(1, 1, 0..2, 4..6),
                copy(2, 1, 0..2, 6..8),
            ]
        );
        let src = grid(2, 8, 1, 3);
        assert_eq!(p.copies[2].local_heads(&src[1]), 1..3);
    }

    #[test]
    fn pp_two_to_one_routes_both_stages_to_one_engine() {
        let p = plan(&grid(6, 4, 2, 1), &grid(6, 4, 1, 1), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![copy(0, 0, 0..3, 0..4), copy(1, 0, 3..6, 0..4)]
        );
    }

    #[test]
    fn pp_one_to_two_routes_layers_to_their_stage() {
        let p = plan(&grid(5, 4, 1, 1), &grid(5, 4, 2, 1), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![copy(0, 0, 0..3, 0..4), copy(0, 1, 3..5, 0..4)]
        );
        let dst = grid(5, 4, 2, 1);
        assert_eq!(p.copies[1].local_layers(&dst[1]), 0..2);
    }

    #[test]
    fn tp_and_pp_at_once() {
        // Source PP 2 x TP 1, destination PP 1 x TP 2: each source stage feeds both ranks.
        let p = plan(&grid(4, 4, 2, 1), &grid(4, 4, 1, 2), 0..5).expect("plan");
        assert_eq!(
            p.copies,
            vec![
                copy(0, 0, 0..2, 0..2),
                copy(0, 1, 0..2, 2..4),
                copy(1, 0, 2..4, 0..2),
                copy(1, 1, 2..4, 2..4),
            ]
        );
    }

    #[test]
    fn empty_block_range_plans_nothing() {
        let p = plan(&grid(4, 8, 1, 1), &grid(4, 8, 1, 2), 3..3).expect("plan");
        assert!(p.copies.is_empty());
    }

    #[test]
    fn refuses_another_model() {
        let mut dst = grid(4, 8, 1, 1);
        dst[0].fingerprint = Fingerprint([8; 32]);
        let err = plan(&grid(4, 8, 1, 1), &dst, 0..5).expect_err("other model");
        assert!(matches!(err, Error::LayoutMismatch { .. }), "{err}");
    }

    #[test]
    fn refuses_different_block_size_dtype_or_head_dim() {
        let edits: [fn(&mut LayoutDescriptor); 3] = [
            |d| d.block_size = 32,
            |d| d.dtype = KvDType::F32,
            |d| d.head_dim = 128,
        ];
        for edit in edits {
            let mut dst = grid(4, 8, 1, 1);
            edit(&mut dst[0]);
            let err = plan(&grid(4, 8, 1, 1), &dst, 0..5).expect_err("incompatible");
            assert!(matches!(err, Error::LayoutMismatch { .. }), "{err}");
            // Inside one set, too.
            let mut src = grid(4, 8, 1, 2);
            edit(&mut src[1]);
            let err = plan(&src, &grid(4, 8, 1, 1), 0..5).expect_err("incompatible");
            assert!(matches!(err, Error::LayoutMismatch { .. }), "{err}");
        }
    }

    #[test]
    fn refuses_sets_that_do_not_tile() {
        let mut overlap = grid(4, 8, 1, 2);
        overlap[1].kv_heads = 3..8;
        let err = plan(&overlap, &grid(4, 8, 1, 1), 0..5).expect_err("overlap");
        assert!(
            matches!(
                err,
                Error::ShardsOverlap {
                    side: Side::Source,
                    a: 0,
                    b: 1,
                    ..
                }
            ),
            "{err}"
        );

        let mut gap = grid(4, 8, 2, 1);
        gap.pop();
        let err = plan(&grid(4, 8, 1, 1), &gap, 0..5).expect_err("gap");
        assert!(
            matches!(
                err,
                Error::ShardsLeaveGap {
                    side: Side::Destination,
                    missing: 16,
                    total: 32
                }
            ),
            "{err}"
        );

        let mut outside = grid(4, 8, 1, 1);
        outside[0].layers = 0..5;
        let err = plan(&outside, &grid(4, 8, 1, 1), 0..5).expect_err("outside");
        assert!(
            matches!(
                err,
                Error::InvalidShard {
                    side: Side::Source,
                    shard: 0,
                    ..
                }
            ),
            "{err}"
        );

        let err = plan(&[], &grid(4, 8, 1, 1), 0..5).expect_err("empty");
        assert!(
            matches!(err, Error::NoShards { side: Side::Source }),
            "{err}"
        );

        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..2;
        let err = plan(&grid(4, 8, 1, 1), &grid(4, 8, 1, 1), reversed).expect_err("reversed");
        assert!(matches!(err, Error::InvalidBlocks { .. }), "{err}");
    }

    /// Owner of `(layer, head)` in a set by brute force: `None` unless exactly one shard holds it.
    fn sole_owner(shards: &[LayoutDescriptor], layer: u32, head: u32) -> Option<usize> {
        let mut owners = shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.layers.contains(&layer) && s.kv_heads.contains(&head))
            .map(|(i, _)| i);
        let first = owners.next()?;
        owners.next().is_none().then_some(first)
    }

    /// A set tiles when every shard is inside the model and every pair has exactly one owner.
    fn tiles(shards: &[LayoutDescriptor], num_layers: u32, num_heads: u32) -> bool {
        !shards.is_empty()
            && shards.iter().all(|s| {
                !s.layers.is_empty()
                    && s.layers.end <= num_layers
                    && !s.kv_heads.is_empty()
                    && s.kv_heads.end <= num_heads
            })
            && (0..num_layers).all(|l| (0..num_heads).all(|h| sole_owner(shards, l, h).is_some()))
    }

    /// Cuts `0..n` at the positions whose bit is set in `mask`.
    fn cut(n: u32, mask: u32) -> Vec<Range<u32>> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..n {
            if mask & (1 << i) != 0 {
                out.push(start..i);
                start = i;
            }
        }
        out.push(start..n);
        out
    }

    /// PP stages cut arbitrarily, each stage's heads cut arbitrarily (not only balanced), then
    /// sometimes broken: a shard dropped, duplicated, grown or emptied.
    fn shard_set(num_layers: u32, num_heads: u32) -> impl Strategy<Value = Vec<LayoutDescriptor>> {
        (
            any::<u32>(),
            proptest::collection::vec(any::<u32>(), 8),
            0..10u8,
            any::<prop::sample::Index>(),
        )
            .prop_map(move |(layer_mask, head_masks, breakage, which)| {
                let mut set = Vec::new();
                for (stage, layers) in cut(num_layers, layer_mask).into_iter().enumerate() {
                    for heads in cut(num_heads, head_masks[stage % 8]) {
                        set.push(shard(layers.clone(), heads, num_layers, num_heads));
                    }
                }
                let i = which.index(set.len());
                match breakage {
                    0 => {
                        set.remove(i);
                    }
                    1 => set.push(set[i].clone()),
                    2 => set[i].kv_heads.end += 1,
                    3 => set[i].layers.start = set[i].layers.end,
                    _ => {}
                }
                set
            })
    }

    type Case = (
        u32,
        u32,
        Vec<LayoutDescriptor>,
        Vec<LayoutDescriptor>,
        Range<u32>,
    );

    fn case() -> impl Strategy<Value = Case> {
        (1..7u32, 1..9u32, 0..4u32, 0..4u32).prop_flat_map(|(nl, nh, b0, nb)| {
            (
                Just(nl),
                Just(nh),
                shard_set(nl, nh),
                shard_set(nl, nh),
                Just(b0..b0 + nb),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Against a brute-force walk of every (layer, head, block) unit: a plan exists exactly
        /// when both sets tile the model, and then it copies each unit once, from the shard that
        /// holds it to the shard that needs it.
        #[test]
        fn plan_matches_brute_force_reference((nl, nh, src, dst, blocks) in case()) {
            let valid = tiles(&src, nl, nh) && tiles(&dst, nl, nh);
            let result = plan(&src, &dst, blocks.clone());
            prop_assert_eq!(result.is_ok(), valid, "{:?}", result);
            let Ok(p) = result else { return Ok(()) };
            for c in &p.copies {
                prop_assert!(!c.layers.is_empty() && !c.kv_heads.is_empty());
            }
            let mut total = 0u64;
            for l in 0..nl {
                for h in 0..nh {
                    for b in blocks.clone() {
                        let covering: Vec<_> = p.copies.iter().filter(|c| {
                            c.layers.contains(&l) && c.kv_heads.contains(&h) && c.blocks.contains(&b)
                        }).collect();
                        prop_assert_eq!(covering.len(), 1, "unit ({}, {}, {})", l, h, b);
                        prop_assert_eq!(Some(covering[0].source), sole_owner(&src, l, h));
                        prop_assert_eq!(Some(covering[0].destination), sole_owner(&dst, l, h));
                        total += 1;
                    }
                }
            }
            prop_assert_eq!(p.copies.iter().map(PlannedCopy::units).sum::<u64>(), total);
        }
    }
}
