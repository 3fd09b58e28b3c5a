//! Which part of the model one rank of a tensor- and pipeline-parallel worker group holds
//! (issue 21), and how each tensor of the file is cut to it while loading.
//!
//! ```text
//! file tensor --Shard::plan--> Split --cut--> the rank's slice --> weights::build (local shapes)
//! ```
//!
//! Tensor parallel splits the usual way (Megatron's): q, k, v and gate, up by output rows
//! (column-parallel: each rank computes its heads and its part of the MLP), attention output and
//! down by input columns (row-parallel: each rank's product is a partial sum that the group's
//! all-reduce completes). Query heads are split in contiguous runs that keep every grouped-query
//! group with its kv head, so a rank's heads read only the kv heads it holds. Pipeline parallel
//! keeps a contiguous range of layers; the first stage holds the embedding, the last the final
//! norm and output head (its tensor-parallel rank 0 alone computes logits).
//!
//! Quantized rows are cut at block boundaries, byte for byte, so a rank multiplies exactly the
//! blocks the whole model does. A row-parallel slice that does not divide the type's block
//! (K-quants' 256 values against TP 3's 192-wide slices of SmolLM2's attention output) is
//! dequantized to f32 for that tensor, and the log says so.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::{Error, Result};

/// One rank's place in its group: its tensor-parallel rank and the layers of its pipeline
/// stage. Not configuration a user writes: the group launcher sets it for each rank process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// This rank's index among the tensor-parallel ranks of its stage, `0..tp_size`.
    pub tp_rank: usize,
    /// How many ranks split each layer's heads and MLP.
    pub tp_size: usize,
    /// The layers this rank's pipeline stage runs; `None` is every layer.
    pub layers: Option<Range<usize>>,
}

impl Default for Shard {
    fn default() -> Self {
        Self::whole()
    }
}

impl Shard {
    /// The whole model in one process.
    pub fn whole() -> Self {
        Self {
            tp_rank: 0,
            tp_size: 1,
            layers: None,
        }
    }

    /// Whether this is the whole model.
    pub fn is_whole(&self) -> bool {
        self.tp_size == 1 && self.layers.is_none()
    }

    /// The slices this shard holds of a model of shape `c`, or why it cannot be cut so, naming
    /// the setting.
    pub(crate) fn plan(&self, c: &ModelConfig) -> Result<ShardPlan> {
        let tp = self.tp_size;
        if tp == 0 {
            return Err(Error::invalid("shard.tp_size", "must be at least 1"));
        }
        if self.tp_rank >= tp {
            return Err(Error::invalid(
                "shard.tp_rank",
                format!("{} is not a rank of a group of {tp}", self.tp_rank),
            ));
        }
        for (what, n) in [
            ("query heads", c.num_heads),
            ("kv heads", c.num_kv_heads),
            ("MLP columns", c.intermediate_size),
        ] {
            if !n.is_multiple_of(tp) {
                return Err(Error::invalid(
                    "shard.tp_size",
                    format!("the model's {n} {what} do not split evenly over {tp} ranks"),
                ));
            }
        }
        let layers = self.layers.clone().unwrap_or(0..c.num_layers);
        if layers.is_empty() || layers.end > c.num_layers {
            return Err(Error::invalid(
                "shard.layers",
                format!(
                    "{layers:?} is not a non-empty range of the model's {} layers",
                    c.num_layers
                ),
            ));
        }
        let r = self.tp_rank;
        let part = |n: usize| n / tp * r..n / tp * (r + 1);
        Ok(ShardPlan {
            tp_rank: r,
            tp_size: tp,
            first: layers.start == 0,
            last: layers.end == c.num_layers,
            layers,
            heads: part(c.num_heads),
            kv_heads: part(c.num_kv_heads),
            ffn: part(c.intermediate_size),
            head_dim: c.head_dim,
        })
    }
}

/// A shard resolved against the model's shape: every range this rank holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardPlan {
    pub tp_rank: usize,
    pub tp_size: usize,
    pub layers: Range<usize>,
    /// Whether this stage embeds tokens (holds layer 0).
    pub first: bool,
    /// Whether this stage ends in the final norm (holds the last layer).
    pub last: bool,
    pub heads: Range<usize>,
    pub kv_heads: Range<usize>,
    /// This rank's columns of the MLP's intermediate width.
    pub ffn: Range<usize>,
    head_dim: usize,
}

/// What a rank keeps of one tensor of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Split {
    /// All of it.
    Keep,
    /// None of it: another stage's layer, or a part only another rank uses.
    Skip,
    /// These rows of its first dimension (a matrix's output rows, a vector's entries).
    Rows(Range<usize>),
    /// These columns of a matrix's second dimension (its input).
    Cols(Range<usize>),
}

/// The role of a tensor in the forward pass, as the loader names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Embedding,
    FinalNorm,
    LmHead,
    /// Per-layer norm weights (attention, MLP, q/k norms): every rank of the stage.
    Norm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    /// The attention output projection.
    O,
    OBias,
    Gate,
    Up,
    Down,
    DownBias,
}

impl ShardPlan {
    /// Whether this rank computes logits: the last stage's first tensor-parallel rank.
    pub fn computes_logits(&self) -> bool {
        self.last && self.tp_rank == 0
    }

    /// What to keep of tensor `part` of layer `layer` (`None` for the model's top-level
    /// tensors). `tied` says the output head reuses the embedding table.
    pub fn split(&self, part: Part, layer: Option<usize>, tied: bool) -> Split {
        if let Some(l) = layer
            && !self.layers.contains(&l)
        {
            return Split::Skip;
        }
        let hd = self.head_dim;
        let heads = self.heads.start * hd..self.heads.end * hd;
        let kv = self.kv_heads.start * hd..self.kv_heads.end * hd;
        let whole = self.tp_size == 1;
        let rows = |r: Range<usize>| if whole { Split::Keep } else { Split::Rows(r) };
        let cols = |r: Range<usize>| if whole { Split::Keep } else { Split::Cols(r) };
        let keep_if = |b: bool| if b { Split::Keep } else { Split::Skip };
        match part {
            Part::Embedding => keep_if(self.first || (tied && self.computes_logits())),
            Part::FinalNorm | Part::LmHead => keep_if(self.computes_logits()),
            Part::Norm => Split::Keep,
            Part::Q | Part::QBias => rows(heads),
            Part::K | Part::V | Part::KBias | Part::VBias => rows(kv),
            Part::O => cols(heads),
            Part::Gate | Part::Up => rows(self.ffn.clone()),
            Part::Down => cols(self.ffn.clone()),
            // A row-parallel product's bias is added once, by rank 0, before the all-reduce.
            Part::OBias | Part::DownBias => keep_if(self.tp_rank == 0),
        }
    }
}

/// Rows `rows` of a quantized tensor's first dimension: whole rows of blocks, copied as bytes.
pub(crate) fn quantized_rows(q: &QTensor, rows: &Range<usize>) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let row_bytes = row_bytes(q)?;
    let data = q.data()?;
    let bytes = data
        .get(rows.start * row_bytes..rows.end * row_bytes)
        .ok_or(Error::Internal("a shard's rows lie outside the tensor"))?;
    let mut shape = dims;
    shape[0] = rows.len();
    rebuild(bytes.to_vec(), q.dtype(), shape)
}

/// Columns `cols` of a quantized matrix's second dimension, when they begin and end on block
/// boundaries: each row's blocks in that range, copied as bytes. `None` when they do not.
pub(crate) fn quantized_cols(q: &QTensor, cols: &Range<usize>) -> Result<Option<QTensor>> {
    let dtype = q.dtype();
    let block = dtype.block_size();
    if !cols.start.is_multiple_of(block) || !cols.end.is_multiple_of(block) {
        return Ok(None);
    }
    let (n, _) = q.shape().dims2()?;
    let row_bytes = row_bytes(q)?;
    let from = cols.start / block * dtype.type_size();
    let to = cols.end / block * dtype.type_size();
    let data = q.data()?;
    let mut out = Vec::with_capacity(n * (to - from));
    for r in 0..n {
        out.extend_from_slice(&data[r * row_bytes + from..r * row_bytes + to]);
    }
    rebuild(out, dtype, vec![n, cols.len()]).map(Some)
}

/// Columns `cols` of a float matrix.
pub(crate) fn tensor_cols(t: &Tensor, cols: &Range<usize>) -> Result<Tensor> {
    Ok(t.narrow(1, cols.start, cols.len())?.contiguous()?)
}

/// Rows `rows` of a float tensor's first dimension.
pub(crate) fn tensor_rows(t: &Tensor, rows: &Range<usize>) -> Result<Tensor> {
    Ok(t.narrow(0, rows.start, rows.len())?.contiguous()?)
}

/// A quantized matrix's columns as f32, for a slice that cuts through its blocks.
pub(crate) fn dequantized_cols(
    name: &str,
    q: &Arc<QTensor>,
    cols: &Range<usize>,
    device: &Device,
) -> Result<Tensor> {
    tracing::warn!(
        tensor = name,
        dtype = ?q.dtype(),
        block = q.dtype().block_size(),
        columns = ?cols,
        "this tensor-parallel slice does not divide the quantization block: the tensor is dequantized to f32 on this rank (more memory, another kernel)"
    );
    let t = q.dequantize(device)?.to_dtype(DType::F32)?;
    tensor_cols(&t, cols)
}

fn row_bytes(q: &QTensor) -> Result<usize> {
    let dims = q.shape().dims();
    let per_row: usize = dims[1..].iter().product();
    let dtype = q.dtype();
    if dims.is_empty() || !per_row.is_multiple_of(dtype.block_size()) {
        return Err(Error::Internal(
            "a quantized tensor's rows are not whole blocks",
        ));
    }
    Ok(per_row / dtype.block_size() * dtype.type_size())
}

fn rebuild(bytes: Vec<u8>, dtype: GgmlDType, shape: Vec<usize>) -> Result<QTensor> {
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, shape)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Architecture, RopeStyle};

    fn smollm2() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            rope_style: RopeStyle::Halves,
            rope_scaling: None,
            max_position: 8192,
            qkv_bias: false,
            qk_norm: false,
        }
    }

    #[test]
    fn tp3_keeps_each_query_group_with_its_kv_head() {
        let c = smollm2();
        for r in 0..3 {
            let p = Shard {
                tp_rank: r,
                tp_size: 3,
                layers: None,
            }
            .plan(&c)
            .expect("plan");
            assert_eq!(p.heads, 3 * r..3 * r + 3);
            assert_eq!(p.kv_heads, r..r + 1);
            // Query head h reads kv head h / (9 / 3): every local head's kv head is local.
            assert!(p.heads.clone().all(|h| p.kv_heads.contains(&(h / 3))));
            assert_eq!(p.ffn, 512 * r..512 * (r + 1));
            assert_eq!(
                p.split(Part::O, Some(0), true),
                Split::Cols(192 * r..192 * (r + 1))
            );
            assert_eq!(
                p.split(Part::K, Some(29), true),
                Split::Rows(64 * r..64 * (r + 1))
            );
            // Tied head: rank 0 of the (only) stage keeps the table twice over; others embed.
            assert_eq!(p.split(Part::Embedding, None, true), Split::Keep);
            assert_eq!(
                p.split(Part::LmHead, None, true),
                if r == 0 { Split::Keep } else { Split::Skip }
            );
        }
    }

    #[test]
    fn pipeline_stages_hold_their_layers_and_ends() {
        let c = smollm2();
        let stage = |layers| {
            Shard {
                tp_rank: 0,
                tp_size: 1,
                layers: Some(layers),
            }
            .plan(&c)
            .expect("plan")
        };
        let (a, b) = (stage(0..15), stage(15..30));
        assert!(a.first && !a.last && !b.first && b.last);
        assert_eq!(a.split(Part::Q, Some(15), false), Split::Skip);
        assert_eq!(b.split(Part::Q, Some(15), false), Split::Keep);
        assert_eq!(a.split(Part::Embedding, None, true), Split::Keep);
        assert_eq!(a.split(Part::FinalNorm, None, true), Split::Skip);
        // The last stage of a tied model needs the table for its head only.
        assert_eq!(b.split(Part::Embedding, None, true), Split::Keep);
        assert_eq!(b.split(Part::Embedding, None, false), Split::Skip);
    }

    #[test]
    fn a_shard_that_cannot_be_cut_names_its_setting() {
        let c = smollm2();
        let err = |s: Shard| s.plan(&c).expect_err("refused").to_string();
        let tp = |n, r| Shard {
            tp_rank: r,
            tp_size: n,
            layers: None,
        };
        assert!(err(tp(2, 0)).contains("shard.tp_size"), "{}", err(tp(2, 0)));
        assert!(err(tp(2, 0)).contains("9 query heads"));
        assert!(err(tp(0, 0)).contains("shard.tp_size"));
        assert!(err(tp(3, 3)).contains("shard.tp_rank"));
        for bad in [5..5, 20..31] {
            let s = Shard {
                layers: Some(bad),
                ..Shard::whole()
            };
            assert!(err(s).contains("shard.layers"));
        }
    }

    #[test]
    fn quantized_slices_are_the_blocks_of_the_whole() {
        let device = Device::Cpu;
        let values: Vec<f32> = (0..8 * 128)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect();
        let t = Tensor::from_vec(values, (8, 128), &device).expect("t");
        let q = QTensor::quantize(&t, GgmlDType::Q4_1).expect("q");
        let whole = q.dequantize(&device).expect("dq");
        let rows = quantized_rows(&q, &(2..5)).expect("rows");
        assert_eq!(
            rows.dequantize(&device)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("v"),
            whole
                .narrow(0, 2, 3)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("v")
        );
        let cols = quantized_cols(&q, &(32..96))
            .expect("cols")
            .expect("aligned");
        assert_eq!(
            cols.dequantize(&device)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("v"),
            whole
                .narrow(1, 32, 64)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("v")
        );
        assert!(quantized_cols(&q, &(16..48)).expect("unaligned").is_none());
    }
}
