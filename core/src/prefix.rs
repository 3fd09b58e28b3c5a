//! The name of a full KV block: what the engine's prefix cache indexes, what a worker reports
//! it holds, and what the coordinator's KV-aware placement and discovery's KV events compare.
//!
//! tokens --block_hashes--> [h0, h1, ...] --engine index / worker report / KV event--> placement
//!
//! Block `i` of a sequence is named by BLAKE3 over (a domain tag, the model fingerprint, block
//! `i - 1`'s name, or nothing for the first block, and block `i`'s token ids as little-endian
//! u32), truncated to 128 bits. Chaining makes a name stand for the whole prefix up to the
//! block's end, so equal names mean equal prefixes (up to a 2^-64 birthday bound over any pool
//! this side of 2^32 blocks) and a lookup walks names in order until the first miss. Only full
//! blocks are named: a partial block's KV is still being written. Two workers name a block the
//! same only when their fingerprints and block sizes agree, which is also when their KV is
//! interchangeable.

use serde::{Deserialize, Serialize};

use crate::layout::Fingerprint;

/// The 128-bit name of a full block of tokens and everything before it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockHash(pub [u8; 16]);

impl BlockHash {
    /// The name of a block holding `tokens` after the block named `parent` (`None` for a
    /// sequence's first block), under model `fingerprint`.
    pub fn chain(fingerprint: &Fingerprint, parent: Option<&BlockHash>, tokens: &[u32]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"baton-block-v1");
        h.update(&fingerprint.0);
        match parent {
            Some(p) => {
                h.update(&[1]);
                h.update(&p.0);
            }
            None => {
                h.update(&[0]);
            }
        }
        h.update(&(tokens.len() as u32).to_le_bytes());
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        let mut out = [0; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Self(out)
    }
}

impl std::fmt::Display for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

/// Names of the full blocks of `tokens` in blocks of `block_size`, from `known` on: `known`
/// holds the names of the first `known.len()` blocks (computed earlier), and the result extends
/// it. A zero block size names nothing.
pub fn extend_block_hashes(
    fingerprint: &Fingerprint,
    block_size: usize,
    tokens: &[u32],
    known: &mut Vec<BlockHash>,
) {
    if block_size == 0 {
        return;
    }
    let full = tokens.len() / block_size;
    while known.len() < full {
        let i = known.len();
        let next = BlockHash::chain(
            fingerprint,
            known.last(),
            &tokens[i * block_size..(i + 1) * block_size],
        );
        known.push(next);
    }
}

/// Whole blocks of a `tokens`-token prompt a prefix cache may supply: every full block before
/// the one holding the last token, which is always computed (its logits sample the next token)
/// and so always moved in a handoff. The engine and the coordinator's placement share this rule.
pub fn reusable_blocks(tokens: usize, block_size: usize) -> usize {
    if block_size == 0 {
        return 0;
    }
    tokens.saturating_sub(1) / block_size
}

/// Names of every full block of `tokens`.
pub fn block_hashes(
    fingerprint: &Fingerprint,
    block_size: usize,
    tokens: &[u32],
) -> Vec<BlockHash> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_block_hashes(fingerprint, block_size, tokens, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: Fingerprint = Fingerprint([7; 32]);

    #[test]
    fn a_name_stands_for_the_whole_prefix() {
        let a = block_hashes(&FP, 4, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let b = block_hashes(&FP, 4, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(a.len(), 2, "the partial block is not named");
        assert_eq!(a, b);
        // Same second block, different first: different second name.
        let c = block_hashes(&FP, 4, &[0, 2, 3, 4, 5, 6, 7, 8]);
        assert_ne!(a[0], c[0]);
        assert_ne!(a[1], c[1]);
    }

    #[test]
    fn the_last_tokens_block_is_never_reusable() {
        assert_eq!(reusable_blocks(0, 16), 0);
        assert_eq!(reusable_blocks(16, 16), 0);
        assert_eq!(reusable_blocks(17, 16), 1);
        assert_eq!(reusable_blocks(300, 16), 18);
        assert_eq!(reusable_blocks(300, 0), 0);
    }

    #[test]
    fn model_and_block_size_are_part_of_the_name() {
        let tokens: Vec<u32> = (0..16).collect();
        let other = Fingerprint([8; 32]);
        assert_ne!(
            block_hashes(&FP, 8, &tokens),
            block_hashes(&other, 8, &tokens)
        );
        assert_ne!(
            block_hashes(&FP, 8, &tokens)[0],
            block_hashes(&FP, 16, &tokens)[0]
        );
    }

    #[test]
    fn extending_continues_where_it_stopped() {
        let tokens: Vec<u32> = (0..40).collect();
        let mut known = block_hashes(&FP, 8, &tokens[..17]);
        assert_eq!(known.len(), 2);
        extend_block_hashes(&FP, 8, &tokens, &mut known);
        assert_eq!(known, block_hashes(&FP, 8, &tokens));
        assert!(block_hashes(&FP, 0, &tokens).is_empty());
    }
}
