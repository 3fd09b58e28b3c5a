//! How a KV cache is laid out, as far as anyone outside the engine needs to know: which model
//! computed it, its element type, block size and shape, and which part of the model (layers,
//! kv heads) a shard holds. A receiver compares descriptors before it takes a single byte.

use std::ops::Range;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Hash of a model's architecture, weights and tokenizer: two engines whose fingerprints are
/// equal compute identical KV for identical tokens.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Index of a block in a worker's KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId(pub u32);

/// Element type of the KV cache blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvDType {
    F32,
    F16,
}

impl KvDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
}

impl std::str::FromStr for KvDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            other => Err(format!("unknown KV dtype {other:?} (expected f32 or f16)")),
        }
    }
}

/// What a receiver must know to map KV bytes onto its own cache, and to refuse bytes it cannot
/// vouch for. `layers` and `kv_heads` are the ranges this shard holds (pipeline stage, tensor
/// parallel rank); an unsharded engine holds all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutDescriptor {
    pub fingerprint: Fingerprint,
    pub dtype: KvDType,
    pub block_size: u32,
    pub num_layers: u32,
    pub layers: Range<u32>,
    pub num_kv_heads: u32,
    pub kv_heads: Range<u32>,
    pub head_dim: u32,
}

/// Why a receiver refuses KV of another layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kv layout mismatch: {reason} (expected fingerprint {expected}, got {got})")]
pub struct LayoutMismatch {
    pub expected: Fingerprint,
    pub got: Fingerprint,
    pub reason: String,
}

impl LayoutDescriptor {
    /// Blocks that hold `tokens` positions. A block size of 0 (a peer's malformed descriptor)
    /// counts as 1, so this never divides by zero.
    pub fn blocks_for(&self, tokens: u32) -> u32 {
        tokens.div_ceil(self.block_size.max(1))
    }

    /// Refuses a source layout whose bytes this one cannot take block for block: another model,
    /// element type, block size or head shape. Shard ranges may differ: the transfer plan maps
    /// them.
    pub fn check_compatible(&self, source: &LayoutDescriptor) -> Result<(), LayoutMismatch> {
        let mismatch = |reason: String| LayoutMismatch {
            expected: self.fingerprint,
            got: source.fingerprint,
            reason,
        };
        if self.fingerprint != source.fingerprint {
            return Err(mismatch("model fingerprints differ".into()));
        }
        if self.dtype != source.dtype {
            return Err(mismatch(format!(
                "dtype {} against {}",
                self.dtype.name(),
                source.dtype.name()
            )));
        }
        if self.block_size != source.block_size {
            return Err(mismatch(format!(
                "block size {} against {}",
                self.block_size, source.block_size
            )));
        }
        if self.num_layers != source.num_layers
            || self.num_kv_heads != source.num_kv_heads
            || self.head_dim != source.head_dim
        {
            return Err(mismatch(format!(
                "shape {}x{}x{} against {}x{}x{} (layers x kv heads x head dim)",
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                source.num_layers,
                source.num_kv_heads,
                source.head_dim
            )));
        }
        Ok(())
    }

    /// Bytes of K (or of V) for one token, one layer, over this descriptor's head range.
    pub fn bytes_per_token_half(&self) -> usize {
        (self.kv_heads.end - self.kv_heads.start) as usize
            * self.head_dim as usize
            * self.dtype.size()
    }
}

/// One layer's KV for a run of a sequence's blocks, in wire order: all K then all V, each
/// `(kv_heads, tokens, head_dim)` row-major, little-endian. `tokens` counts only the filled
/// slots: the last block of a sequence may be partly empty and its empty slots never travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvChunk {
    pub layer: u32,
    /// Index of the first block in the sequence's block table (not a pool block id).
    pub first_block: u32,
    pub num_blocks: u32,
    pub tokens: u32,
    pub data: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> LayoutDescriptor {
        LayoutDescriptor {
            fingerprint: Fingerprint([7; 32]),
            dtype: KvDType::F32,
            block_size: 16,
            num_layers: 30,
            layers: 0..30,
            num_kv_heads: 3,
            kv_heads: 0..3,
            head_dim: 64,
        }
    }

    #[test]
    fn receivers_refuse_another_model_dtype_block_size_or_shape() {
        let d = layout();
        assert_eq!(d.check_compatible(&d), Ok(()));
        let mut shard = d.clone();
        shard.kv_heads = 1..2;
        assert_eq!(
            d.check_compatible(&shard),
            Ok(()),
            "shards are the plan's job"
        );
        for (what, change) in [
            (
                "fingerprints",
                Box::new(|d: &mut LayoutDescriptor| d.fingerprint.0[0] = 1)
                    as Box<dyn Fn(&mut LayoutDescriptor)>,
            ),
            ("dtype", Box::new(|d| d.dtype = KvDType::F16)),
            ("block size", Box::new(|d| d.block_size = 32)),
            ("shape", Box::new(|d| d.head_dim = 128)),
        ] {
            let mut other = d.clone();
            change(&mut other);
            let e = d.check_compatible(&other).expect_err(what);
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn a_token_half_covers_the_shards_heads_only() {
        let mut d = layout();
        assert_eq!(d.bytes_per_token_half(), 3 * 64 * 4);
        d.kv_heads = 1..2;
        d.dtype = KvDType::F16;
        assert_eq!(d.bytes_per_token_half(), 64 * 2);
    }
}
