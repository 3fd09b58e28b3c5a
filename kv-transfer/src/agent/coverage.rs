//! Which bytes of an expected handoff have arrived: the receiver's admission check for every
//! write, before a byte of it touches the pool. Pure bookkeeping, no IO.
//!
//! Per layer, the expected byte ranges of the receiver's region (from
//! [`expected_ranges`](crate::memory::expected_ranges)) and the ranges admitted so far. A write is
//! admitted when it lies inside one expected range and overlaps nothing admitted before, so two
//! writes never fill the same bytes and nothing lands outside the reserved blocks. A layer has
//! landed when its admitted writes are verified and cover its expected bytes.

use std::collections::BTreeMap;
use std::ops::Range;

/// The arrival state of one handoff's expected bytes.
#[derive(Debug, Clone)]
pub(crate) struct Coverage {
    layers: Range<u32>,
    expected: Vec<Vec<Range<u64>>>,
    /// Per layer: admitted ranges, start -> end.
    admitted: Vec<BTreeMap<u64, u64>>,
    /// Per layer: expected bytes not yet verified.
    remaining: Vec<u64>,
    layers_left: u32,
    bytes: u64,
}

/// Why a write was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    Layer { layer: u32, layers: Range<u32> },
    Outside { layer: u32, range: Range<u64> },
    Twice { layer: u32, range: Range<u64> },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Layer { layer, layers } => write!(f, "layer {layer} outside {layers:?}"),
            Refusal::Outside { layer, range } => write!(
                f,
                "bytes {range:?} of layer {layer} lie outside the reserved blocks"
            ),
            Refusal::Twice { layer, range } => {
                write!(f, "bytes {range:?} of layer {layer} arrived twice")
            }
        }
    }
}

impl Coverage {
    /// `expected[i]`: the sorted, disjoint byte ranges of layer `layers.start + i`.
    pub(crate) fn new(layers: Range<u32>, expected: Vec<Vec<Range<u64>>>) -> Self {
        debug_assert_eq!(layers.len(), expected.len());
        let remaining: Vec<u64> = expected
            .iter()
            .map(|rs| rs.iter().map(|r| r.end - r.start).sum())
            .collect();
        let layers_left = remaining.iter().filter(|&&r| r > 0).count() as u32;
        let bytes = remaining.iter().sum();
        Self {
            admitted: vec![BTreeMap::new(); expected.len()],
            layers,
            expected,
            remaining,
            layers_left,
            bytes,
        }
    }

    /// Bytes the handoff moves in all.
    pub(crate) fn total_bytes(&self) -> u64 {
        self.bytes
    }

    /// Admits a write of `len` bytes at `offset` into `layer`.
    pub(crate) fn admit(&mut self, layer: u32, offset: u64, len: u64) -> Result<(), Refusal> {
        let range = offset..offset.saturating_add(len);
        if !self.layers.contains(&layer) {
            return Err(Refusal::Layer {
                layer,
                layers: self.layers.clone(),
            });
        }
        let l = (layer - self.layers.start) as usize;
        let inside = len > 0
            && self.expected[l]
                .iter()
                .any(|e| e.start <= range.start && range.end <= e.end);
        if !inside {
            return Err(Refusal::Outside { layer, range });
        }
        let admitted = &mut self.admitted[l];
        // The admitted range starting at or before this one's end, if any, is the only one
        // that can overlap from the left; one starting inside overlaps too.
        let overlaps = admitted
            .range(..range.end)
            .next_back()
            .is_some_and(|(_, &end)| end > range.start);
        if overlaps {
            return Err(Refusal::Twice { layer, range });
        }
        admitted.insert(range.start, range.end);
        Ok(())
    }

    /// An admitted write of `len` bytes into `layer` was verified. True when that completes the
    /// layer.
    pub(crate) fn land(&mut self, layer: u32, len: u64) -> bool {
        let l = (layer - self.layers.start) as usize;
        let before = self.remaining[l];
        self.remaining[l] = before.saturating_sub(len);
        if before > 0 && self.remaining[l] == 0 {
            self.layers_left -= 1;
            return true;
        }
        false
    }

    /// Every expected byte of every layer was verified.
    pub(crate) fn complete(&self) -> bool {
        self.layers_left == 0
    }

    /// Layers fully landed so far.
    #[cfg(test)]
    pub(crate) fn layers_landed(&self) -> u32 {
        self.expected.len() as u32 - self.layers_left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coverage() -> Coverage {
        // Layer 2: [0, 100) and [200, 250); layer 3: [1000, 1100).
        Coverage::new(2..4, vec![vec![0..100, 200..250], vec![1000..1100]])
    }

    #[test]
    fn writes_land_only_inside_the_reserved_ranges_and_once() {
        let mut c = coverage();
        assert_eq!(c.total_bytes(), 250);
        assert!(matches!(c.admit(1, 0, 10), Err(Refusal::Layer { .. })));
        assert!(matches!(c.admit(2, 90, 20), Err(Refusal::Outside { .. })));
        assert!(matches!(c.admit(2, 100, 10), Err(Refusal::Outside { .. })));
        assert!(matches!(c.admit(2, 0, 0), Err(Refusal::Outside { .. })));
        assert!(matches!(
            c.admit(2, u64::MAX, 10),
            Err(Refusal::Outside { .. })
        ));
        c.admit(2, 0, 60).expect("first part");
        assert!(matches!(c.admit(2, 59, 2), Err(Refusal::Twice { .. })));
        assert!(matches!(c.admit(2, 0, 1), Err(Refusal::Twice { .. })));
        c.admit(2, 60, 40).expect("adjacent part");
        assert!(!c.land(2, 60));
        assert!(!c.land(2, 40), "layer 2 still lacks [200, 250)");
        c.admit(2, 200, 50).expect("second range");
        assert!(c.land(2, 50), "layer 2 complete");
        assert_eq!(c.layers_landed(), 1);
        assert!(!c.complete());
        c.admit(3, 1000, 100).expect("layer 3");
        assert!(c.land(3, 100));
        assert!(c.complete());
    }

    #[test]
    fn a_layer_with_nothing_expected_counts_as_landed() {
        let c = Coverage::new(0..2, vec![vec![], vec![]]);
        assert!(c.complete());
    }
}
