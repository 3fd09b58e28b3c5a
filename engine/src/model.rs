//! The Llama-family forward pass over a paged KV cache.
//!
//! One call computes one engine step: any number of sequences, each contributing a run of new
//! tokens at its own position. Rows are grouped by phase: all decode rows share one matrix
//! multiply (that is what makes batched decode cheap), while each prefill chunk runs in its own
//! group, so a sequence's numbers never depend on which other sequences shared its step.
//!
//! Attention reads K and V from the cache through the sequence's block table; the new tokens'
//! K and V are written into their blocks first. After every layer a callback runs, so a caller
//! can export that layer's KV while the next layer computes.

use std::cell::OnceCell;
use std::sync::Arc;

use baton_collective::Collective;

use candle_core::{DType, Device, Tensor};

use crate::Result;
use crate::attention::{AttentionShape, paged_attention};
use crate::config::{Kernels, ModelConfig, RopeScaling, RopeStyle};
use crate::kv::{BlockTable, CpuKv, KvCache, RowRun};
use crate::rope::{Rotation, heads_major};
use crate::swiglu::swiglu;
use crate::weights::{LayerWeights, ModelWeights, Phase};

/// One sequence's share of a step.
pub(crate) struct SeqInput<'a> {
    pub table: &'a BlockTable,
    /// Position of `tokens[0]`; positions before it already hold KV.
    pub start: usize,
    pub tokens: &'a [u32],
    pub phase: Phase,
    /// Whether to compute next-token logits at the last of `tokens`.
    pub logits: bool,
    /// Context length the matmul attention path (candle's kernels: a CUDA device, `cpu_kernels
    /// = candle`) computes over, at least `start + tokens.len()`; positions past that are zero
    /// keys and values behind the causal mask. Padding prefill contexts
    /// (`prefill_attention_span`) keeps a row's bits from depending on where the prompt ends:
    /// the matrix multiply over the context sums its last partial group of products in another
    /// order. baton's CPU kernel ([`crate::attention`]) computes each row over its own context
    /// and ignores it.
    pub attend_to: usize,
}

pub(crate) struct Model {
    pub weights: ModelWeights,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Whether baton's CPU passes run (fused norm, rope and SwiGLU, paged decode attention) or
    /// candle's ops, as on a GPU.
    kernels: Kernels,
    /// The tensor-parallel ranks this one completes its row-parallel products with (attention
    /// output, MLP down); `None` for a rank that holds whole layers.
    collective: Option<Arc<dyn Collective>>,
}

/// What one step of this rank's stage produced.
pub(crate) struct Forward {
    /// Per input, the logits at its last token when it asked for them and this rank computes
    /// logits (the last stage's tensor-parallel rank 0).
    pub logits: Vec<Option<Vec<f32>>>,
    /// A stage before the last: the hidden states its last layer produced, `(rows, hidden)`
    /// row-major in the step's group order ([`Model::groups`]), for the next stage.
    pub hidden: Option<Vec<f32>>,
}

/// What one group's attention needs of the step beyond the layer, computed once per step: its
/// rows, their rotary rows, and the cache slots they write and read.
struct GroupStep<'a> {
    group: &'a Group,
    seqs: &'a [SeqInput<'a>],
    cos_sin: &'a (Tensor, Tensor),
    /// The same rotary rows as plain slices, for the fused CPU pass; `None` where candle's ops
    /// run (a GPU, or `cpu_kernels = candle`).
    rotation: Option<Rotation<'a>>,
    new_slots: &'a [RowRun],
    /// Each member's context as cache rows of kv head 0 ([`KvCache::head_rows`]) in position
    /// order, its new tokens' included: read in place by the paged decode kernel ...
    context: &'a [Vec<u32>],
    /// ... one slice of it per query row (the positions up to the row's own), the same for
    /// every layer ...
    row_contexts: &'a [&'a [u32]],
    /// ... and as tensors by the per-sequence path's gather, made the first time a layer takes
    /// that path: CPU decode groups never do, and at batch 8 their index tensors (kv heads x
    /// context rows each) were rebuilt every step for nothing.
    context_ids: &'a OnceCell<Vec<Tensor>>,
}

/// Rows of one matrix-multiply group: sequence indices and their row offsets.
struct Group {
    phase: Phase,
    members: Vec<(usize, usize)>,
    rows: usize,
}

impl Model {
    pub fn new(
        weights: ModelWeights,
        max_position: usize,
        kernels: Kernels,
        device: &Device,
        collective: Option<Arc<dyn Collective>>,
    ) -> Result<Self> {
        let tp = weights.shard.tp_size;
        let world = collective.as_ref().map_or(1, |c| c.world());
        if world != tp {
            return Err(crate::Error::invalid(
                "shard.tp_size",
                format!("{tp} ranks, but the group's collective has {world}"),
            ));
        }
        let (cos, sin) = rope_tables(&weights.config, max_position, device)?;
        Ok(Self {
            weights,
            cos,
            sin,
            device: device.clone(),
            kernels,
            collective,
        })
    }

    /// Query and kv heads this rank computes.
    fn local_heads(&self) -> (usize, usize) {
        let s = &self.weights.shard;
        (s.heads.len(), s.kv_heads.len())
    }

    /// The sum over the tensor-parallel group of each rank's partial product `y` (rank order,
    /// the same bits on every rank); `y` itself on a rank alone.
    fn all_reduce(&self, y: Tensor) -> Result<Tensor> {
        let Some(group) = &self.collective else {
            return Ok(y);
        };
        let dims = y.dims().to_vec();
        let mut values = y.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for chunk in values.chunks_mut(group.capacity().max(1)) {
            group.all_reduce_sum(chunk)?;
        }
        Ok(Tensor::from_vec(values, dims, y.device())?.to_dtype(y.dtype())?)
    }

    /// RMSNorm of `x`'s rows with weight `w` and the model's epsilon.
    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let eps = self.config().rms_norm_eps;
        match self.kernels {
            Kernels::Baton => crate::norm::rms_norm(x, w, eps as f32),
            Kernels::Candle => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32),
        }
    }

    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        match self.kernels {
            Kernels::Baton => swiglu(gate, up),
            Kernels::Candle => candle_nn::ops::silu(gate)? * up,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.weights.config
    }

    fn groups(seqs: &[SeqInput]) -> Vec<Group> {
        let mut decode = Group {
            phase: Phase::Decode,
            members: Vec::new(),
            rows: 0,
        };
        let mut groups = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            match s.phase {
                Phase::Decode => {
                    decode.members.push((i, decode.rows));
                    decode.rows += s.tokens.len();
                }
                Phase::Prefill => groups.push(Group {
                    phase: Phase::Prefill,
                    members: vec![(i, 0)],
                    rows: s.tokens.len(),
                }),
            }
        }
        if !decode.members.is_empty() {
            groups.insert(0, decode);
        }
        groups
    }

    /// Runs one step of this rank's layers. The first stage embeds the inputs' tokens; a later
    /// one starts from `hidden`, what the stage before it returned for the same inputs. Returns,
    /// per input, the logits at its last token when it asked for them (on the rank that
    /// computes logits), or this stage's hidden states for the next. `on_layer(l)` runs once
    /// local layer `l`'s KV of every input is in the cache.
    pub fn forward(
        &self,
        cache: &KvCache,
        seqs: &[SeqInput],
        hidden: Option<&[f32]>,
        on_layer: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Forward> {
        let groups = Self::groups(seqs);
        let width = self.config().hidden_size;
        let total_rows: usize = groups.iter().map(|g| g.rows).sum();
        match (&self.weights.embedding, hidden) {
            (Some(_), None) => {}
            (None, Some(h)) if h.len() == total_rows * width => {}
            (None, Some(h)) => {
                return Err(crate::Error::invalid(
                    "hidden",
                    format!(
                        "{} values for {total_rows} rows of {width}: not the previous stage's output for this step",
                        h.len()
                    ),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(crate::Error::invalid(
                    "hidden",
                    "the first pipeline stage embeds its tokens; it takes no hidden states",
                ));
            }
            (None, None) => {
                return Err(crate::Error::invalid(
                    "hidden",
                    "a later pipeline stage needs the previous stage's hidden states",
                ));
            }
        }
        let mut first_row = 0;
        let mut xs = Vec::with_capacity(groups.len());
        let mut cos_sin = Vec::with_capacity(groups.len());
        // Cache slots each group writes and reads, the same for every layer.
        let mut new_slots = Vec::with_capacity(groups.len());
        let mut context = Vec::with_capacity(groups.len());
        let context_ids: Vec<OnceCell<Vec<Tensor>>> =
            groups.iter().map(|_| OnceCell::new()).collect();
        for g in &groups {
            let mut ids = Vec::with_capacity(g.rows);
            let mut pos = Vec::with_capacity(g.rows);
            let mut runs = Vec::with_capacity(g.members.len());
            for &(i, row) in &g.members {
                let s = &seqs[i];
                ids.extend_from_slice(s.tokens);
                pos.extend((s.start..s.start + s.tokens.len()).map(|p| p as u32));
                cache.row_runs(s.table, s.start..s.start + s.tokens.len(), row, &mut runs)?;
            }
            new_slots.push(runs);
            let rows = g
                .members
                .iter()
                .map(|&(i, _)| cache.head_rows(seqs[i].table, seqs[i].start + seqs[i].tokens.len()))
                .collect::<Result<Vec<_>>>()?;
            context.push(rows);
            let x = match (&self.weights.embedding, hidden) {
                (Some(embedding), _) => {
                    embedding.forward(&Tensor::from_vec(ids, g.rows, &self.device)?)?
                }
                (None, Some(h)) => Tensor::from_slice(
                    &h[first_row * width..(first_row + g.rows) * width],
                    (g.rows, width),
                    &self.device,
                )?,
                (None, None) => return Err(crate::Error::Internal("no input for a stage")),
            };
            first_row += g.rows;
            xs.push(x);
            cos_sin.push(self.rope_rows(&pos)?);
        }
        // Read by the fused rope pass, which runs on f32 CPU tensors only.
        let rotation_rows = cos_sin
            .iter()
            .map(|(cos, sin)| {
                if self.kernels != Kernels::Baton || cos.dtype() != DType::F32 {
                    return Ok(None);
                }
                Ok(Some((
                    cos.flatten_all()?.to_vec1::<f32>()?,
                    sin.flatten_all()?.to_vec1::<f32>()?,
                )))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Row `t` of a member starting at `start` sees positions up to `start + t`.
        let row_contexts: Vec<Vec<&[u32]>> = groups
            .iter()
            .zip(&context)
            .map(|(g, context)| {
                g.members
                    .iter()
                    .zip(context)
                    .flat_map(|(&(i, _), rows)| {
                        let s = &seqs[i];
                        (0..s.tokens.len()).map(move |t| &rows[..s.start + t + 1])
                    })
                    .collect()
            })
            .collect();
        for (l, layer) in self.weights.layers.iter().enumerate() {
            for (gi, g) in groups.iter().enumerate() {
                let x = &xs[gi];
                let step = GroupStep {
                    group: g,
                    seqs,
                    cos_sin: &cos_sin[gi],
                    rotation: rotation_rows[gi].as_ref().map(|(cos, sin)| Rotation {
                        cos,
                        sin,
                        style: self.config().rope_style,
                    }),
                    new_slots: &new_slots[gi],
                    context: &context[gi],
                    row_contexts: &row_contexts[gi],
                    context_ids: &context_ids[gi],
                };
                let attn = self.attention(layer, l, x, &step, cache)?;
                let x = (x + self.all_reduce(layer.o.forward(&attn, g.phase)?)?)?;
                let h = self.rms_norm(&x, &layer.ffn_norm)?;
                let (gate, up) = match &layer.gate_up {
                    Some(s) if s.serves(g.phase) => {
                        let [gate, up] = s.forward(&h, [&layer.gate, &layer.up])?;
                        (gate, up)
                    }
                    _ => (
                        layer.gate.forward(&h, g.phase)?,
                        layer.up.forward(&h, g.phase)?,
                    ),
                };
                let down = layer.down.forward(&self.swiglu(&gate, &up)?, g.phase)?;
                let x = (&x + self.all_reduce(down)?)?;
                xs[gi] = x;
            }
            on_layer(l)?;
        }

        let mut out: Vec<Option<Vec<f32>>> = (0..seqs.len()).map(|_| None).collect();
        if !self.weights.shard.last {
            let mut hidden = Vec::with_capacity(total_rows * width);
            for x in &xs {
                hidden.extend(x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            }
            return Ok(Forward {
                logits: out,
                hidden: Some(hidden),
            });
        }
        let Some(head) = &self.weights.head else {
            // Another tensor-parallel rank of the last stage computes the logits.
            return Ok(Forward {
                logits: out,
                hidden: None,
            });
        };
        for (gi, g) in groups.iter().enumerate() {
            let wanted: Vec<(usize, usize)> = g
                .members
                .iter()
                .filter(|(i, _)| seqs[*i].logits)
                .map(|&(i, row)| (i, row + seqs[i].tokens.len() - 1))
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let rows = wanted
                .iter()
                .map(|&(_, r)| xs[gi].narrow(0, r, 1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let h = self.rms_norm(&Tensor::cat(&rows, 0)?, &head.norm)?;
            let logits = head.linear.forward(&h, g.phase)?;
            let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for ((i, _), l) in wanted.into_iter().zip(logits) {
                out[i] = Some(l);
            }
        }
        Ok(Forward {
            logits: out,
            hidden: None,
        })
    }

    /// cos and sin rows for the given positions, each `(rows, head_dim / 2)`.
    fn rope_rows(&self, pos: &[u32]) -> Result<(Tensor, Tensor)> {
        let contiguous = pos.windows(2).all(|w| w[1] == w[0] + 1);
        if contiguous && !pos.is_empty() {
            let start = pos[0] as usize;
            return Ok((
                self.cos.narrow(0, start, pos.len())?,
                self.sin.narrow(0, start, pos.len())?,
            ));
        }
        let idx = Tensor::from_slice(pos, pos.len(), &self.device)?;
        Ok((
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        ))
    }

    fn attention(
        &self,
        layer: &LayerWeights,
        l: usize,
        x: &Tensor,
        step: &GroupStep,
        cache: &KvCache,
    ) -> Result<Tensor> {
        let GroupStep {
            group: g,
            seqs,
            cos_sin: (cos, sin),
            ref rotation,
            new_slots,
            context,
            row_contexts,
            context_ids,
        } = *step;
        let c = self.config();
        let (n, hd) = (g.rows, c.head_dim);
        let (nh, nkv) = self.local_heads();
        let group = nh / nkv;
        let h = self.rms_norm(x, &layer.attn_norm)?;
        let (q, k, v) = match &layer.qkv {
            Some(s) if s.serves(g.phase) => {
                let [q, k, v] = s.forward(&h, [&layer.q, &layer.k, &layer.v])?;
                (q, k, v)
            }
            _ => (
                layer.q.forward(&h, g.phase)?,
                layer.k.forward(&h, g.phase)?,
                layer.v.forward(&h, g.phase)?,
            ),
        };
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (
                self.rms_norm(&q.reshape((n, nh, hd))?, qn)?
                    .reshape((n, nh * hd))?,
                self.rms_norm(&k.reshape((n, nkv, hd))?, kn)?
                    .reshape((n, nkv * hd))?,
            ),
            _ => (q, k),
        };
        // q: (heads, rows, head_dim); k, v: (kv_heads, rows, head_dim). One fused pass per tensor
        // with baton's CPU kernels, candle's transposes and rope otherwise.
        let fused = match rotation {
            Some(rot) => match (
                heads_major(&q, nh, hd, Some(rot))?,
                heads_major(&k, nkv, hd, Some(rot))?,
                heads_major(&v, nkv, hd, None)?,
            ) {
                (Some(q), Some(k), Some(v)) => Some((q, k, v)),
                _ => None,
            },
            None => None,
        };
        let (q, k, v) = match fused {
            Some(qkv) => qkv,
            None => {
                let heads_first = |x: Tensor, heads: usize| -> candle_core::Result<Tensor> {
                    x.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()
                };
                let q = self.rope(&heads_first(q, nh)?.unsqueeze(0)?, cos, sin)?;
                let k = self.rope(&heads_first(k, nkv)?.unsqueeze(0)?, cos, sin)?;
                (q.squeeze(0)?, k.squeeze(0)?, heads_first(v, nkv)?)
            }
        };

        let scale = (hd as f64).sqrt();
        cache.write_rows(l, new_slots, &k, &v)?;
        if let Some(out) = self.paged_attention(l, &q, g, row_contexts, cache)? {
            return Ok(out);
        }
        let mut outs = Vec::with_capacity(g.members.len());
        for (k, &(i, row)) in g.members.iter().enumerate() {
            let s = &seqs[i];
            let m = s.tokens.len();
            let ctx = s.start + m;
            let span = s.attend_to.max(ctx);
            // The index tensors only the tensor storage reads: built once per step, on the
            // first layer that asks.
            let (kc, vc) = cache.gather(l, &context[k], || {
                let ids = match context_ids.get() {
                    Some(ids) => ids,
                    None => {
                        let ids = context
                            .iter()
                            .map(|rows| cache.gather_index(rows, &self.device))
                            .collect::<Result<Vec<_>>>()?;
                        context_ids.get_or_init(|| ids)
                    }
                };
                Ok(ids[k].clone())
            })?;
            let (kc, vc) = if span > ctx {
                (
                    kc.pad_with_zeros(1, 0, span - ctx)?,
                    vc.pad_with_zeros(1, 0, span - ctx)?,
                )
            } else {
                (kc, vc)
            };
            // Query heads h = kv * group + j share kv head `kv`: fold them into rows.
            let qs = q
                .narrow(1, row, m)?
                .contiguous()?
                .reshape((nkv, group * m, hd))?;
            let att = (qs.matmul(&kc.t()?)? / scale)?;
            let att = if m > 1 || span > ctx {
                let mask = causal_mask(s.start, m, span, &self.device)?;
                att.reshape((nkv, group, m, span))?
                    .broadcast_add(&mask)?
                    .reshape((nkv, group * m, span))?
            } else {
                att
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att.matmul(&vc)?; // (kv_heads, group * m, head_dim)
            let o = o
                .reshape((nh, m, hd))?
                .transpose(0, 1)?
                .reshape((m, nh * hd))?;
            outs.push(o);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Every row of the group through the paged CPU kernel ([`crate::attention`]): K and V are
    /// read in place, and each (row, kv head) is computed over the context up to the row's own
    /// position alone, so neither batching nor how a prompt was split into chunks (or how much
    /// of it a prefix cache supplied) changes a result. `None` when candle's ops run or the
    /// cache is not f32 or f16 in CPU memory (the matmul path then runs).
    fn paged_attention(
        &self,
        l: usize,
        q: &Tensor,
        g: &Group,
        rows: &[&[u32]],
        cache: &KvCache,
    ) -> Result<Option<Tensor>> {
        let c = self.config();
        let (heads, kv_heads) = self.local_heads();
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: c.head_dim,
            head_stride: cache.head_stride(),
        };
        if self.kernels != Kernels::Baton {
            return Ok(None);
        }
        // q: (heads, rows, head_dim), the group's rows in member order.
        let qv = q.flatten_all()?.to_vec1::<f32>()?;
        let Some(out) = cache.with_cpu(l, |kv| match kv {
            CpuKv::F32(k, v) => paged_attention(&shape, &qv, k, v, rows),
            CpuKv::F16(k, v) => paged_attention(&shape, &qv, k, v, rows),
        }) else {
            return Ok(None);
        };
        Ok(Some(Tensor::from_vec(
            out,
            (g.rows, heads * c.head_dim),
            &self.device,
        )?))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.config().rope_style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(x, cos, sin)?,
        })
    }
}

/// `(m, ctx)`: query `i` (position `start + i`) sees keys up to its own position; `ctx` is at
/// least `start + m`.
fn causal_mask(start: usize, m: usize, ctx: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..m)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (m, ctx), device)
}

/// cos and sin of every position's rotation angles, each `(max_position, head_dim / 2)`.
fn rope_tables(
    c: &ModelConfig,
    max_position: usize,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = c.head_dim;
    // Computed in f32 exactly as the reference implementations do, so angles agree bit for bit.
    let mut inv_freq: Vec<f32> = (0..d)
        .step_by(2)
        .map(|i| 1f32 / c.rope_theta.powf(i as f32 / d as f32))
        .collect();
    match &c.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => inv_freq.iter_mut().for_each(|f| *f /= factor),
        Some(RopeScaling::FreqFactors(factors)) => {
            inv_freq.iter_mut().zip(factors).for_each(|(f, s)| *f /= s)
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) => {
            let old = *original_max_position as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen < high_wavelen {
                } else if wavelen > low_wavelen {
                    *f /= factor;
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    let half = inv_freq.len();
    let theta = Tensor::from_vec(inv_freq, (1, half), device)?;
    let pos = Tensor::arange(0, max_position as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_position, 1))?;
    let angles = pos.matmul(&theta)?;
    Ok((angles.cos()?, angles.sin()?))
}
