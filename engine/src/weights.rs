//! Loading a model's weights from GGUF or a Hugging Face safetensors directory into the form the
//! forward pass uses, one weight format per phase (prefill, decode).
//!
//! Every failure names the file and, where there is one, the tensor or metadata key.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::{
    Architecture, Kernels, ModelConfig, RopeScaling, RopeStyle, WeightFormat, WeightPlan,
};
use crate::kernels::QuantLinear;
use crate::shard::{self, Part, Shard, ShardPlan, Split};
use crate::{Error, Result};

/// Which phase a forward pass serves; selects the weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    Prefill,
    Decode,
}

/// How one weight matrix is multiplied: our AVX2 kernels for the quantized types they cover
/// (Q4_0, Q4_1, Q8_0 on CPU), candle's `QMatMul` for everything else (dense floats, K-quants,
/// CUDA, `cpu_kernels = candle`).
#[derive(Debug)]
enum Matmul {
    Candle(QMatMul),
    Kernel(QuantLinear),
    /// Output columns `cols` of a stacked kernel ([`Stacked`]): the matrix's blocks are held
    /// once, in the stack. The forward pass calls the stack itself; this view serves any other
    /// caller, at the cost of computing the whole stack.
    Columns {
        whole: Arc<QuantLinear>,
        cols: std::ops::Range<usize>,
    },
}

impl Matmul {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Matmul::Candle(m) => m.forward(x),
            Matmul::Kernel(k) => k.forward(x),
            Matmul::Columns { whole, cols } => {
                let y = whole.forward(x)?;
                y.narrow(y.rank() - 1, cols.start, cols.len())
            }
        }
    }
}

/// Matrices sharing their input (q, k, v; gate, up) stacked along the output into one kernel
/// call, so a step quantizes the input and splits the work over the threads once instead of once
/// per matrix. Each output row is the same dot product as in the separate matrices, so results
/// are bit-identical.
#[derive(Debug, Clone)]
pub(crate) struct Stacked {
    whole: Arc<QuantLinear>,
    /// Output width of each part, in order.
    widths: Vec<usize>,
    /// Whether prefill runs these quantized weights too (otherwise only decode does).
    prefill: bool,
}

impl Stacked {
    /// Whether `phase` multiplies through this stack.
    pub(crate) fn serves(&self, phase: Phase) -> bool {
        phase == Phase::Decode || self.prefill
    }

    /// `x` (rows, k) to one tensor per part, `(rows, width)`, with each part's bias added.
    pub(crate) fn forward<const N: usize>(
        &self,
        x: &Tensor,
        parts: [&Linear; N],
    ) -> candle_core::Result<[Tensor; N]> {
        if self.widths.len() != N {
            candle_core::bail!("stack of {} matrices used as {N}", self.widths.len());
        }
        let y = self.whole.forward(x)?;
        let last = y.rank() - 1;
        let mut start = 0;
        let mut out = Vec::with_capacity(N);
        for (part, &w) in parts.iter().zip(&self.widths) {
            out.push(part.add_bias(y.narrow(last, start, w)?)?);
            start += w;
        }
        out.try_into()
            .map_err(|_| candle_core::Error::Msg("stack outputs".into()))
    }
}

/// One linear layer, `y = x W^T (+ b)`, held once per distinct weight format of the plan.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    prefill: Arc<Matmul>,
    decode: Arc<Matmul>,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn forward(&self, x: &Tensor, phase: Phase) -> candle_core::Result<Tensor> {
        let w = match phase {
            Phase::Prefill => &self.prefill,
            Phase::Decode => &self.decode,
        };
        self.add_bias(w.forward(x)?)
    }

    fn add_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Weights of one decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// q, k and v in one kernel, where the kernels cover their type.
    pub qkv: Option<Stacked>,
    /// gate and up in one kernel, where the kernels cover their type.
    pub gate_up: Option<Stacked>,
}

/// The token embedding table, kept in the file's format and expanded row by row on lookup.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    pub(crate) fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Dense(t) => t.index_select(ids, 0),
        }
    }
}

/// The final norm and output head, on the rank that computes logits.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub norm: Tensor,
    pub linear: Linear,
}

/// Everything the forward pass reads (of this rank's shard: [`crate::shard`]), plus a digest of
/// the whole file's raw tensor bytes for the fingerprint, the same on every rank.
#[derive(Debug, Clone)]
pub(crate) struct ModelWeights {
    /// The whole model's shape; the shard says which part of it these weights are.
    pub config: ModelConfig,
    pub shard: ShardPlan,
    /// On the first pipeline stage.
    pub embedding: Option<Embedding>,
    /// The stage's layers, `shard.layers`, in order.
    pub layers: Vec<LayerWeights>,
    /// On the last stage's tensor-parallel rank 0.
    pub head: Option<Head>,
    pub weights_digest: [u8; 32],
}

/// Where a tensor comes from while loading: GGUF blocks or floats.
enum Raw {
    Q(Arc<QTensor>),
    F(Tensor),
}

struct Source {
    path: PathBuf,
    device: Device,
    plan: WeightPlan,
    /// Whether quantized matrices are repacked for baton's kernels or left to candle's `QMatMul`.
    kernels: Kernels,
    /// Converted once per format, shared between phases that use the same format.
    tensors: HashMap<String, Raw>,
}

impl Source {
    fn take(&mut self, name: &str) -> Result<Raw> {
        self.tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The GGUF blocks of a tensor not yet taken, if it is stored quantized.
    fn qtensor(&self, name: &str) -> Option<Arc<QTensor>> {
        match self.tensors.get(name)? {
            Raw::Q(q) => Some(q.clone()),
            Raw::F(_) => None,
        }
    }

    /// Stacks the GGUF blocks `raws` into one kernel when quantized weights run on baton's CPU
    /// kernels and they cover every part, and returns it with one view per part (its columns of
    /// the stack). The parts are then built from their views ([`Source::linear_from`]), so each
    /// matrix's blocks are repacked once, into the stack, and held there only.
    fn stack(&self, raws: &[Option<Arc<QTensor>>]) -> Option<(Stacked, Vec<Arc<Matmul>>)> {
        if self.plan.decode != WeightFormat::Quantized || self.kernels != Kernels::Baton {
            return None;
        }
        let qs: Vec<&QTensor> = raws.iter().map(|r| r.as_deref()).collect::<Option<_>>()?;
        let widths = qs
            .iter()
            .map(|q| q.shape().dims2().ok().map(|(n, _)| n))
            .collect::<Option<Vec<_>>>()?;
        let whole = Arc::new(QuantLinear::from_qtensors(&qs)?);
        let mut start = 0;
        let views = widths
            .iter()
            .map(|&w| {
                let view = Arc::new(Matmul::Columns {
                    whole: whole.clone(),
                    cols: start..start + w,
                });
                start += w;
                view
            })
            .collect();
        let stacked = Stacked {
            whole,
            widths,
            prefill: self.plan.prefill == WeightFormat::Quantized,
        };
        Some((stacked, views))
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn dims(raw: &Raw) -> Vec<usize> {
        match raw {
            Raw::Q(q) => q.shape().dims().to_vec(),
            Raw::F(t) => t.dims().to_vec(),
        }
    }

    fn check_shape(&self, name: &str, raw: &Raw, expected: &[usize]) -> Result<()> {
        let got = Self::dims(raw);
        if got != expected {
            return Err(Error::TensorShape {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                got,
            });
        }
        Ok(())
    }

    /// A float tensor (norm weights, biases), expanded to f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let raw = self.take(name)?;
        self.check_shape(name, &raw, &[len])?;
        let t = match raw {
            Raw::Q(q) => q.dequantize(&self.device)?,
            Raw::F(t) => t.to_dtype(DType::F32)?,
        };
        Ok(t)
    }

    fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        stacked: Option<Arc<Matmul>>,
    ) -> Result<Linear> {
        let raw = self.take(name)?;
        self.check_shape(name, &raw, &[rows, cols])?;
        self.linear_from(name, raw, None, stacked)
    }

    /// The layer for `raw` in each format of the plan; `stacked`, the matrix's view of a stack
    /// ([`Source::stack`]), stands for its quantized format.
    fn linear_from(
        &self,
        name: &str,
        raw: Raw,
        bias: Option<Tensor>,
        stacked: Option<Arc<Matmul>>,
    ) -> Result<Linear> {
        let mut built: Vec<(WeightFormat, Arc<Matmul>)> = Vec::with_capacity(2);
        for format in [self.plan.prefill, self.plan.decode] {
            if built.iter().any(|(f, _)| *f == format) {
                continue;
            }
            if let (Some(view), WeightFormat::Quantized) = (&stacked, format) {
                built.push((format, view.clone()));
                continue;
            }
            let mm = match (&raw, format) {
                (Raw::Q(q), WeightFormat::Quantized) => {
                    if !q.dtype().is_quantized_supported() {
                        return Err(Error::UnsupportedTensorType {
                            path: self.path.clone(),
                            tensor: name.to_string(),
                            dtype: format!("{:?}", q.dtype()),
                        });
                    }
                    let kernel = (self.kernels == Kernels::Baton)
                        .then(|| QuantLinear::from_qtensor(q))
                        .flatten();
                    match kernel {
                        Some(k) => Matmul::Kernel(k),
                        None => Matmul::Candle(QMatMul::from_arc(q.clone())?),
                    }
                }
                (Raw::Q(q), WeightFormat::F32) => {
                    Matmul::Candle(QMatMul::Tensor(q.dequantize(&self.device)?))
                }
                (Raw::Q(q), WeightFormat::F16) => {
                    Matmul::Candle(QMatMul::TensorF16(q.dequantize_f16(&self.device)?))
                }
                // Safetensors floats have no quantized form in the file: computed in f32.
                (Raw::F(t), WeightFormat::Quantized | WeightFormat::F32) => {
                    Matmul::Candle(QMatMul::Tensor(t.to_dtype(DType::F32)?))
                }
                (Raw::F(t), WeightFormat::F16) => {
                    Matmul::Candle(QMatMul::TensorF16(t.to_dtype(DType::F16)?))
                }
            };
            built.push((format, Arc::new(mm)));
        }
        let pick = |f: WeightFormat| {
            built
                .iter()
                .find(|(g, _)| *g == f)
                .map(|(_, m)| m.clone())
                .ok_or(Error::Internal("a weight format of the plan was not built"))
        };
        Ok(Linear {
            prefill: pick(self.plan.prefill)?,
            decode: pick(self.plan.decode)?,
            bias,
        })
    }
}

trait QuantSupport {
    fn is_quantized_supported(&self) -> bool;
}

impl QuantSupport for GgmlDType {
    /// The GGUF tensor types the engine accepts for matrices.
    fn is_quantized_supported(&self) -> bool {
        use GgmlDType::*;
        matches!(
            self,
            F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K
        )
    }
}

/// Names of a layer's tensors in each file format.
struct Names {
    attn_norm: String,
    q: String,
    k: String,
    v: String,
    o: String,
    q_norm: String,
    k_norm: String,
    ffn_norm: String,
    gate: String,
    up: String,
    down: String,
    bias_suffix: &'static str,
    weight_suffix: &'static str,
}

impl Names {
    fn gguf(i: usize) -> Self {
        let p = format!("blk.{i}");
        Self {
            attn_norm: format!("{p}.attn_norm"),
            q: format!("{p}.attn_q"),
            k: format!("{p}.attn_k"),
            v: format!("{p}.attn_v"),
            o: format!("{p}.attn_output"),
            q_norm: format!("{p}.attn_q_norm"),
            k_norm: format!("{p}.attn_k_norm"),
            ffn_norm: format!("{p}.ffn_norm"),
            gate: format!("{p}.ffn_gate"),
            up: format!("{p}.ffn_up"),
            down: format!("{p}.ffn_down"),
            bias_suffix: ".bias",
            weight_suffix: ".weight",
        }
    }

    fn hf(i: usize) -> Self {
        let p = format!("model.layers.{i}");
        Self {
            attn_norm: format!("{p}.input_layernorm"),
            q: format!("{p}.self_attn.q_proj"),
            k: format!("{p}.self_attn.k_proj"),
            v: format!("{p}.self_attn.v_proj"),
            o: format!("{p}.self_attn.o_proj"),
            q_norm: format!("{p}.self_attn.q_norm"),
            k_norm: format!("{p}.self_attn.k_norm"),
            ffn_norm: format!("{p}.post_attention_layernorm"),
            gate: format!("{p}.mlp.gate_proj"),
            up: format!("{p}.mlp.up_proj"),
            down: format!("{p}.mlp.down_proj"),
            bias_suffix: ".bias",
            weight_suffix: ".weight",
        }
    }
}

struct TopNames {
    /// What every layer's tensor names start with, before the layer's number.
    layers: &'static str,
    embedding: &'static str,
    final_norm: &'static str,
    lm_head: &'static str,
}

const GGUF_TOP: TopNames = TopNames {
    layers: "blk.",
    embedding: "token_embd.weight",
    final_norm: "output_norm.weight",
    lm_head: "output.weight",
};

const HF_TOP: TopNames = TopNames {
    layers: "model.layers.",
    embedding: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
};

/// The part of the forward pass a tensor of the file is, and its layer, where the shard has a
/// say; `None` for anything else (kept whole).
fn classify(
    name: &str,
    names: &dyn Fn(usize) -> Names,
    top: &TopNames,
) -> Option<(Part, Option<usize>)> {
    if name == top.embedding {
        return Some((Part::Embedding, None));
    }
    if name == top.final_norm {
        return Some((Part::FinalNorm, None));
    }
    if name == top.lm_head {
        return Some((Part::LmHead, None));
    }
    let rest = name.strip_prefix(top.layers)?;
    let layer: usize = rest.split('.').next()?.parse().ok()?;
    let n = names(layer);
    let (w, b) = (n.weight_suffix, n.bias_suffix);
    let table = [
        (&n.attn_norm, w, Part::Norm),
        (&n.ffn_norm, w, Part::Norm),
        (&n.q_norm, w, Part::Norm),
        (&n.k_norm, w, Part::Norm),
        (&n.q, w, Part::Q),
        (&n.k, w, Part::K),
        (&n.v, w, Part::V),
        (&n.q, b, Part::QBias),
        (&n.k, b, Part::KBias),
        (&n.v, b, Part::VBias),
        (&n.o, w, Part::O),
        (&n.o, b, Part::OBias),
        (&n.gate, w, Part::Gate),
        (&n.up, w, Part::Up),
        (&n.down, w, Part::Down),
        (&n.down, b, Part::DownBias),
    ];
    let part = table
        .iter()
        .find(|(base, suffix, _)| name.strip_prefix(base.as_str()) == Some(*suffix))
        .map(|(_, _, p)| *p)
        // Another tensor of a layer (one this loader does not read): the stage holding the
        // layer keeps it.
        .unwrap_or(Part::Norm);
    Some((part, Some(layer)))
}

/// This rank's part of tensor `name` ([`crate::shard`]); `None` when it keeps none of it.
fn cut(name: &str, raw: Raw, split: &Split, device: &Device) -> Result<Option<Raw>> {
    Ok(Some(match (split, raw) {
        (Split::Skip, _) => return Ok(None),
        (Split::Keep, raw) => raw,
        (Split::Rows(r), Raw::Q(q)) => Raw::Q(Arc::new(shard::quantized_rows(&q, r)?)),
        (Split::Rows(r), Raw::F(t)) => Raw::F(shard::tensor_rows(&t, r)?),
        (Split::Cols(c), Raw::Q(q)) => match shard::quantized_cols(&q, c)? {
            Some(sliced) => Raw::Q(Arc::new(sliced)),
            None => Raw::F(shard::dequantized_cols(name, &q, c, device)?),
        },
        (Split::Cols(c), Raw::F(t)) => Raw::F(shard::tensor_cols(&t, c)?),
    }))
}

fn build(
    mut src: Source,
    config: ModelConfig,
    shard: ShardPlan,
    names: impl Fn(usize) -> Names,
    top: &TopNames,
    weights_digest: [u8; 32],
) -> Result<ModelWeights> {
    let c = &config;
    // This rank's widths: its heads, its kv heads, its columns of the MLP.
    let q_out = shard.heads.len() * c.head_dim;
    let kv_out = shard.kv_heads.len() * c.head_dim;
    let ffn = shard.ffn.len();
    // Sized by what loads, not by the layer count the file claims: a corrupt count must end in
    // `MissingTensor` for the first absent layer, not in an allocation failure that aborts.
    let mut layers = Vec::new();
    for i in shard.layers.clone() {
        let n = names(i);
        let w = n.weight_suffix;
        let qkv_raw: Vec<_> = [&n.q, &n.k, &n.v]
            .iter()
            .map(|b| src.qtensor(&format!("{b}{w}")))
            .collect();
        let gate_up_raw: Vec<_> = [&n.gate, &n.up]
            .iter()
            .map(|b| src.qtensor(&format!("{b}{w}")))
            .collect();
        // Stacked first, so each part is built from its view of the stack.
        let (qkv, qkv_views) = src.stack(&qkv_raw).unzip();
        let (gate_up, gate_up_views) = src.stack(&gate_up_raw).unzip();
        let view = |views: &Option<Vec<Arc<Matmul>>>, i: usize| {
            views.as_ref().and_then(|v| v.get(i).cloned())
        };
        let mut proj = |base: &str, rows: usize, cols: usize, stacked| -> Result<Linear> {
            let bias_name = format!("{base}{}", n.bias_suffix);
            let bias = if c.qkv_bias && src.has(&bias_name) {
                Some(src.vector(&bias_name, rows)?)
            } else if c.qkv_bias && [&n.q, &n.k, &n.v].iter().any(|p| p.as_str() == base) {
                return Err(Error::MissingTensor {
                    path: src.path.clone(),
                    tensor: bias_name,
                });
            } else {
                None
            };
            let name = format!("{base}{w}");
            let raw = src.take(&name)?;
            src.check_shape(&name, &raw, &[rows, cols])?;
            src.linear_from(&name, raw, bias, stacked)
        };
        let q = proj(&n.q, q_out, c.hidden_size, view(&qkv_views, 0))?;
        let k = proj(&n.k, kv_out, c.hidden_size, view(&qkv_views, 1))?;
        let v = proj(&n.v, kv_out, c.hidden_size, view(&qkv_views, 2))?;
        let o = proj(&n.o, c.hidden_size, q_out, None)?;
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(src.vector(&format!("{}{w}", n.q_norm), c.head_dim)?),
                Some(src.vector(&format!("{}{w}", n.k_norm), c.head_dim)?),
            )
        } else {
            (None, None)
        };
        let gate = src.matrix(
            &format!("{}{w}", n.gate),
            ffn,
            c.hidden_size,
            view(&gate_up_views, 0),
        )?;
        let up = src.matrix(
            &format!("{}{w}", n.up),
            ffn,
            c.hidden_size,
            view(&gate_up_views, 1),
        )?;
        layers.push(LayerWeights {
            attn_norm: src.vector(&format!("{}{w}", n.attn_norm), c.hidden_size)?,
            q,
            k,
            v,
            o,
            q_norm,
            k_norm,
            ffn_norm: src.vector(&format!("{}{w}", n.ffn_norm), c.hidden_size)?,
            gate,
            up,
            down: src.matrix(&format!("{}{w}", n.down), c.hidden_size, ffn, None)?,
            qkv,
            gate_up,
        });
    }
    let emb_raw = if src.has(top.embedding) {
        let raw = src.take(top.embedding)?;
        src.check_shape(top.embedding, &raw, &[c.vocab_size, c.hidden_size])?;
        Some(raw)
    } else {
        None
    };
    let head = if shard.computes_logits() {
        let norm = src.vector(top.final_norm, c.hidden_size)?;
        // Untied models carry their own head; tied ones reuse the embedding table.
        let linear = if src.has(top.lm_head) {
            src.matrix(top.lm_head, c.vocab_size, c.hidden_size, None)?
        } else {
            let shared = match &emb_raw {
                Some(Raw::Q(q)) => Raw::Q(q.clone()),
                Some(Raw::F(t)) => Raw::F(t.clone()),
                None => {
                    return Err(Error::MissingTensor {
                        path: src.path.clone(),
                        tensor: top.embedding.to_string(),
                    });
                }
            };
            src.linear_from(top.embedding, shared, None, None)?
        };
        Some(Head { norm, linear })
    } else {
        None
    };
    let embedding = match emb_raw {
        _ if !shard.first => None,
        None => {
            return Err(Error::MissingTensor {
                path: src.path.clone(),
                tensor: top.embedding.to_string(),
            });
        }
        Some(Raw::Q(q)) if q.dtype() == GgmlDType::F32 => {
            Some(Embedding::Dense(q.dequantize(&src.device)?))
        }
        Some(Raw::Q(q)) => Some(Embedding::Quantized(q)),
        Some(Raw::F(t)) => Some(Embedding::Dense(t.to_dtype(DType::F32)?)),
    };
    Ok(ModelWeights {
        config,
        shard,
        embedding,
        layers,
        head,
        weights_digest,
    })
}

/// Loads a GGUF file: hyperparameters from its metadata, tensors as stored.
/// Returns the weights and the file's metadata (the tokenizer is built from it).
pub(crate) fn load_gguf(
    path: &Path,
    plan: WeightPlan,
    shard: &Shard,
    kernels: Kernels,
    device: &Device,
) -> Result<(ModelWeights, gguf_file::Content)> {
    let corrupt = |reason: String| Error::CorruptFile {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    };
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let content = read_gguf_header(&mut reader).map_err(corrupt)?;
    let config = gguf_config(path, &content.metadata, &content)?;
    let shard = shard.plan(&config)?;
    let tied = !content.tensor_infos.contains_key(GGUF_TOP.lm_head);

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut hasher = blake3::Hasher::new();
    let mut tensors = HashMap::with_capacity(names.len());
    for name in names {
        let info = &content.tensor_infos[name];
        let dtype = info.ggml_dtype;
        // candle reads every type but Q8_1 (an activation format, never weights); say so rather
        // than call the file corrupt.
        if !dtype.is_quantized_supported() {
            return Err(Error::UnsupportedTensorType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("{dtype:?}"),
            });
        }
        // candle sizes the read with unchecked arithmetic (a panic in debug builds, a wrong size
        // in release) and views an empty tensor's dangling byte pointer as `f32`s (an abort).
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n > 0);
        let bytes = elems.and_then(|n| (n / dtype.block_size()).checked_mul(dtype.type_size()));
        let Some(bytes) = bytes else {
            return Err(corrupt(format!(
                "tensor {name}: shape {:?} is empty or too large",
                info.shape.dims()
            )));
        };
        let split = classify(name, &Names::gguf, &GGUF_TOP)
            .map(|(part, layer)| shard.split(part, layer, tied))
            .unwrap_or(Split::Keep);
        if split == Split::Skip {
            // Another rank's tensor: its bytes still go into the digest (every rank's
            // fingerprint is the whole file's), streamed, never held.
            hasher.update(name.as_bytes());
            let at = content.tensor_data_offset.saturating_add(info.offset);
            reader
                .seek(SeekFrom::Start(at))
                .map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
            let copied = std::io::copy(&mut (&mut reader).take(bytes as u64), &mut hasher)
                .map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
            if copied != bytes as u64 {
                return Err(corrupt(format!("tensor {name}: the file ends inside it")));
            }
            continue;
        }
        let q = content
            .tensor(&mut reader, name, device)
            .map_err(|e| corrupt(format!("tensor {name}: {e}")))?;
        hasher.update(name.as_bytes());
        hasher.update(
            &q.data()
                .map_err(|e| corrupt(format!("tensor {name}: {e}")))?,
        );
        if let Some(raw) = cut(name, Raw::Q(Arc::new(q)), &split, device)? {
            tensors.insert(name.clone(), raw);
        }
    }
    let mut config = config;
    // llama.cpp stores Llama 3.1 frequency scaling as a tensor of per-frequency divisors.
    if let Some(Raw::Q(f)) = tensors.remove("rope_freqs.weight") {
        let factors = f.dequantize(&Device::Cpu)?.to_vec1::<f32>()?;
        if factors.len() != config.head_dim / 2 {
            return Err(Error::TensorShape {
                path: path.to_path_buf(),
                tensor: "rope_freqs.weight".into(),
                expected: vec![config.head_dim / 2],
                got: vec![factors.len()],
            });
        }
        config.rope_scaling = Some(RopeScaling::FreqFactors(factors));
    }
    let src = Source {
        path: path.to_path_buf(),
        device: device.clone(),
        plan,
        kernels,
        tensors,
    };
    let weights = build(
        src,
        config,
        shard,
        Names::gguf,
        &GGUF_TOP,
        *hasher.finalize().as_bytes(),
    )?;
    Ok((weights, content))
}

/// The shape of the model in a GGUF file, from its header alone (no tensor is read): what a
/// group launcher needs to split the layers before any rank loads.
pub(crate) fn gguf_model_config(path: &Path) -> Result<ModelConfig> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let content = read_gguf_header(&mut reader).map_err(|reason| Error::CorruptFile {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    })?;
    gguf_config(path, &content.metadata, &content)
}

/// Parses a GGUF header. candle's reader panics on some malformed headers (a
/// `general.alignment` of 0 divides by zero); a bad file must be an error, never a crash.
fn read_gguf_header(
    reader: &mut BufReader<File>,
) -> std::result::Result<gguf_file::Content, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(reader)
    })) {
        Ok(read) => read.map_err(|e| e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("malformed header ({what})"))
        }
    }
}

fn gguf_config(
    path: &Path,
    md: &HashMap<String, gguf_file::Value>,
    content: &gguf_file::Content,
) -> Result<ModelConfig> {
    let missing = |key: &str| Error::MissingMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
    };
    let invalid = |key: &str, reason: String| Error::InvalidMetadata {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    let arch_name = md
        .get("general.architecture")
        .ok_or_else(|| missing("general.architecture"))?
        .to_string()
        .map_err(|e| invalid("general.architecture", e.to_string()))?
        .clone();
    let architecture =
        Architecture::from_name(&arch_name).ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            architecture: arch_name.clone(),
        })?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let get_u = |k: &str| -> Result<Option<usize>> {
        let full = key(k);
        match md.get(&full) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map(|x| Some(x as usize))
                .map_err(|e| invalid(&full, e.to_string())),
        }
    };
    let req_u = |k: &str| get_u(k)?.ok_or_else(|| missing(&key(k)));
    let get_f = |k: &str| -> Result<Option<f32>> {
        let full = key(k);
        match md.get(&full) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(Some)
                .map_err(|e| invalid(&full, e.to_string())),
        }
    };
    let hidden_size = req_u("embedding_length")?;
    let num_heads = req_u("attention.head_count")?;
    let num_kv_heads = get_u("attention.head_count_kv")?.unwrap_or(num_heads);
    if num_heads == 0 {
        return Err(invalid(&key("attention.head_count"), "zero heads".into()));
    }
    let head_dim = get_u("attention.key_length")?.unwrap_or(hidden_size / num_heads);
    let rope_dim = get_u("rope.dimension_count")?.unwrap_or(head_dim);
    if rope_dim != head_dim {
        return Err(invalid(
            &key("rope.dimension_count"),
            format!("partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported"),
        ));
    }
    let vocab_size = match get_u("vocab_size")? {
        Some(v) => v,
        // A scalar `token_embd.weight` (a corrupt file) has no rows to count.
        None => match content
            .tensor_infos
            .get("token_embd.weight")
            .and_then(|info| info.shape.dims().first())
        {
            Some(&rows) => rows,
            None => return Err(missing(&key("vocab_size"))),
        },
    };
    let rope_scaling = match md.get(&key("rope.scaling.type")) {
        Some(v) => {
            let kind = v
                .to_string()
                .map_err(|e| invalid(&key("rope.scaling.type"), e.to_string()))?;
            match kind.as_str() {
                "none" => None,
                "linear" => Some(RopeScaling::Linear {
                    factor: get_f("rope.scaling.factor")?
                        .ok_or_else(|| missing(&key("rope.scaling.factor")))?,
                }),
                other => {
                    return Err(invalid(
                        &key("rope.scaling.type"),
                        format!("rope scaling {other:?} is not supported"),
                    ));
                }
            }
        }
        None => None,
    };
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: req_u("feed_forward_length")?,
        num_layers: req_u("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: get_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f64,
        rope_theta: get_f("rope.freq_base")?.unwrap_or(10_000.0),
        rope_style: match architecture {
            Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
            Architecture::Qwen2 | Architecture::Qwen3 => RopeStyle::Halves,
        },
        rope_scaling,
        max_position: get_u("context_length")?.unwrap_or(4096),
        qkv_bias: architecture == Architecture::Qwen2,
        qk_norm: architecture == Architecture::Qwen3,
    };
    config
        .validate()
        .map_err(|reason| invalid(&format!("{arch_name}.*"), reason))?;
    Ok(config)
}

/// The fields of a Hugging Face config.json the engine reads.
#[derive(serde::Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_position")]
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: Option<bool>,
}

fn default_theta() -> f32 {
    10_000.0
}

fn default_max_position() -> usize {
    4096
}

/// Loads a Hugging Face directory: config.json and every *.safetensors file in it.
/// A Hugging Face directory's config.json, and its path (for errors).
fn read_hf_config(dir: &Path) -> Result<(PathBuf, HfConfig)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| Error::CorruptFile {
        path: config_path.clone(),
        format: "config.json",
        reason: e.to_string(),
    })?;
    Ok((config_path, hf))
}

/// The shape a group launcher splits, from a Hugging Face directory's config.json alone.
pub(crate) fn hf_model_shape(dir: &Path) -> Result<crate::engine::ModelShape> {
    let (_, hf) = read_hf_config(dir)?;
    Ok(crate::engine::ModelShape {
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        intermediate_size: hf.intermediate_size,
    })
}

pub(crate) fn load_safetensors(
    dir: &Path,
    plan: WeightPlan,
    shard: &Shard,
    kernels: Kernels,
    device: &Device,
) -> Result<ModelWeights> {
    let (config_path, hf) = read_hf_config(dir)?;
    let arch_name = hf
        .architectures
        .first()
        .cloned()
        .or(hf.model_type.clone())
        .unwrap_or_default();
    let architecture =
        Architecture::from_name(&arch_name).ok_or_else(|| Error::UnknownArchitecture {
            path: config_path.clone(),
            architecture: arch_name.clone(),
        })?;
    let rope_scaling = match &hf.rope_scaling {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => hf_rope_scaling(&config_path, v)?,
    };
    let config = ModelConfig {
        architecture,
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        rms_norm_eps: hf.rms_norm_eps,
        rope_theta: hf.rope_theta,
        rope_style: RopeStyle::Halves,
        rope_scaling,
        max_position: hf.max_position_embeddings,
        qkv_bias: hf
            .attention_bias
            .unwrap_or(architecture == Architecture::Qwen2),
        qk_norm: architecture == Architecture::Qwen3,
    };
    config.validate().map_err(|reason| Error::InvalidMetadata {
        path: config_path.clone(),
        key: "config.json".into(),
        reason,
    })?;

    let shard = shard.plan(&config)?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::MissingTensor {
            path: dir.to_path_buf(),
            tensor: "*.safetensors (no weight files in the directory)".into(),
        });
    }
    let mut hasher = blake3::Hasher::new();
    let mut tensors = HashMap::new();
    for file in &files {
        let bytes = std::fs::read(file).map_err(|source| Error::Io {
            path: file.clone(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::CorruptFile {
            path: file.clone(),
            format: "safetensors",
            reason: e.to_string(),
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        for name in names {
            let view = st.tensor(&name).map_err(|e| Error::CorruptFile {
                path: file.clone(),
                format: "safetensors",
                reason: format!("tensor {name}: {e}"),
            })?;
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                other => {
                    return Err(Error::UnsupportedTensorType {
                        path: file.clone(),
                        tensor: name,
                        dtype: format!("{other:?}"),
                    });
                }
            };
            hasher.update(name.as_bytes());
            hasher.update(view.data());
            let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?;
            tensors.insert(name, Raw::F(t));
        }
    }
    // Whether the head is tied is known once every file is read; each tensor is then cut to
    // this rank's part (the files are read whole either way).
    let tied = !tensors.contains_key(HF_TOP.lm_head);
    let mut kept = HashMap::with_capacity(tensors.len());
    for (name, raw) in tensors {
        let split = classify(&name, &Names::hf, &HF_TOP)
            .map(|(part, layer)| shard.split(part, layer, tied))
            .unwrap_or(Split::Keep);
        if let Some(raw) = cut(&name, raw, &split, device)? {
            kept.insert(name, raw);
        }
    }
    let src = Source {
        path: dir.to_path_buf(),
        device: device.clone(),
        plan,
        kernels,
        tensors: kept,
    };

    build(
        src,
        config,
        shard,
        Names::hf,
        &HF_TOP,
        *hasher.finalize().as_bytes(),
    )
}

fn hf_rope_scaling(path: &Path, v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    let invalid = |reason: String| Error::InvalidMetadata {
        path: path.to_path_buf(),
        key: "rope_scaling".into(),
        reason,
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| invalid("missing rope_type".into()))?;
    let num = |k: &str| -> Result<f64> {
        v.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| invalid(format!("missing {k}")))
    };
    match kind {
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")? as f32,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position: num("original_max_position_embeddings")? as usize,
        })),
        "default" => Ok(None),
        other => Err(invalid(format!("rope scaling {other:?} is not supported"))),
    }
}
