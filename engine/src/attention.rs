//! Paged attention for decode rows on CPU: one new token per sequence, reading K and V straight
//! from the block pool's storage through each sequence's slot list.
//!
//! Each (sequence, head) pair is computed by one task in a fixed order (scores, max, exp and sum,
//! weighted sum of V, all sequential over the context), so a sequence's result never depends on
//! which other sequences share the step, and no K/V is copied.

use rayon::prelude::*;

/// Shapes of one call.
pub(crate) struct DecodeShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Slots per kv head in the cache tensors (their middle dimension).
    pub cache_slots: usize,
}

/// `q`: `(heads, seqs, head_dim)`; `k`, `v`: `(kv_heads, cache_slots, head_dim)`; `slots[b]`:
/// the cache slots of sequence `b`'s context, in position order. Returns `(seqs, heads *
/// head_dim)`.
pub(crate) fn decode_attention(
    shape: &DecodeShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[Vec<u32>],
) -> Vec<f32> {
    let DecodeShape {
        heads,
        kv_heads,
        head_dim: d,
        cache_slots,
    } = *shape;
    let seqs = slots.len();
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; seqs * heads * d];
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
            let (b, h) = (idx / heads, idx % heads);
            let kvh = h / group;
            let qv = &q[(h * seqs + b) * d..][..d];
            let base = kvh * cache_slots;
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for &s in &slots[b] {
                let kr = &k[(base + s as usize) * d..][..d];
                let dot: f32 = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(dot);
                scores.push(dot);
            }
            let mut sum = 0f32;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            for (&p, &s) in scores.iter().zip(&slots[b]) {
                let w = p * inv;
                let vr = &v[(base + s as usize) * d..][..d];
                for (acc, x) in o.iter_mut().zip(vr) {
                    *acc += w * x;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward softmax(q k^T / sqrt(d)) v for one head of one sequence.
    fn reference(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>]) -> Vec<f32> {
        let d = q.len();
        let scores: Vec<f64> = ks
            .iter()
            .map(|k| {
                q.iter().zip(k).map(|(a, b)| (*a * *b) as f64).sum::<f64>() / (d as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d)
            .map(|j| (e.iter().zip(vs).map(|(p, v)| p * v[j] as f64).sum::<f64>() / sum) as f32)
            .collect()
    }

    #[test]
    fn matches_reference_and_ignores_batch_company() {
        let shape = DecodeShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            cache_slots: 40,
        };
        let n = shape.kv_heads * shape.cache_slots * shape.head_dim;
        let k: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
            .collect();
        let slots = vec![vec![3, 4, 5, 20, 21], vec![7, 8, 9, 10, 11, 12, 30, 31, 32]];
        let seqs = slots.len();
        let q: Vec<f32> = (0..shape.heads * seqs * shape.head_dim)
            .map(|i| ((i * 29 % 89) as f32 / 44.0) - 1.0)
            .collect();
        let out = decode_attention(&shape, &q, &k, &v, &slots);
        let d = shape.head_dim;
        for b in 0..seqs {
            for h in 0..shape.heads {
                let kvh = h / 2;
                let row = |t: &[f32], s: u32| {
                    t[(kvh * shape.cache_slots + s as usize) * d..][..d].to_vec()
                };
                let ks: Vec<Vec<f32>> = slots[b].iter().map(|&s| row(&k, s)).collect();
                let vs: Vec<Vec<f32>> = slots[b].iter().map(|&s| row(&v, s)).collect();
                let qv = &q[(h * seqs + b) * d..][..d];
                let want = reference(qv, &ks, &vs);
                let got = &out[(b * shape.heads + h) * d..][..d];
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "seq {b} head {h}: {g} vs {w}");
                }
            }
        }
        // Sequence 1 alone gives bit-identical output.
        let q1: Vec<f32> = (0..shape.heads)
            .flat_map(|h| q[(h * seqs + 1) * d..][..d].to_vec())
            .collect();
        let alone = decode_attention(&shape, &q1, &k, &v, &slots[1..]);
        assert_eq!(&alone[..], &out[shape.heads * d..]);
    }
}
