//! Paged attention for decode rows on CPU: one new token per sequence, reading K and V straight
//! from the block pool's storage through each sequence's slot list.
//!
//! One task computes one (sequence, kv head) pair and every query head sharing that kv head, so
//! each K and V row is read once per group of query heads. Each query head's numbers are computed
//! in a fixed order (scores, max, exp and sum, weighted sum of V, all sequential over the
//! context), so a sequence's result never depends on which other sequences share the step, and
//! no K/V is copied.
//!
//! The AVX path computes 8 keys' scores at once with one key per lane: each lane multiplies and
//! adds in the same order as the scalar dot product (no FMA, sequential over `head_dim`), so both
//! paths give bit-identical scores. Its weighted sum of V keeps each head's output in registers
//! across the context, adding in the scalar loop's order. A sequence's K and V rows are scattered
//! over pool blocks, so both loops prefetch the rows they read next.

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
    let simd = simd_available() && d.is_multiple_of(8);
    let mut out = vec![0f32; seqs * heads * d];
    // Chunk (b, kvh): query heads kvh * group .. (kvh + 1) * group of sequence b.
    out.par_chunks_mut(group * d).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (idx, o)| {
            let (b, kvh) = (idx / kv_heads, idx % kv_heads);
            let slots = &slots[b];
            let n = slots.len();
            let base = kvh * cache_slots;
            // Query head kvh * group + j of sequence b.
            let qv = |j: usize| &q[((kvh * group + j) * seqs + b) * d..][..d];
            // scores[j * n + t]: query head j of the group against context position t.
            scores.clear();
            scores.resize(group * n, 0.0);
            let mut j = 0;
            while j < group {
                let hs = if simd { (group - j).min(4) } else { 1 };
                let keys = HeadRows {
                    data: k,
                    base,
                    d,
                    slots,
                };
                let dst = &mut scores[j * n..(j + hs) * n];
                match hs {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `simd` holds only when AVX is available and d is a multiple of 8.
                    h if simd => unsafe {
                        match h {
                            1 => scores_avx::<1>([qv(j)], &keys, scale, dst),
                            2 => scores_avx::<2>([qv(j), qv(j + 1)], &keys, scale, dst),
                            3 => scores_avx::<3>([qv(j), qv(j + 1), qv(j + 2)], &keys, scale, dst),
                            _ => scores_avx::<4>(
                                [qv(j), qv(j + 1), qv(j + 2), qv(j + 3)],
                                &keys,
                                scale,
                                dst,
                            ),
                        }
                    },
                    _ => {
                        for (t, &s) in slots.iter().enumerate() {
                            dst[t] = dot(qv(j), keys.row(s)) * scale;
                        }
                    }
                }
                j += hs;
            }
            // inv[j]: 1 / sum of query head j's exponentials.
            let mut inv = [0f32; MAX_GROUP];
            let many = group > MAX_GROUP;
            let mut inv_vec = if many { vec![0f32; group] } else { Vec::new() };
            let inv: &mut [f32] = if many {
                &mut inv_vec
            } else {
                &mut inv[..group]
            };
            for (scores, inv) in scores.chunks_mut(n.max(1)).zip(inv.iter_mut()) {
                // Running max in context order, as a sequential scan computes it.
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in scores.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                *inv = 1.0 / sum;
            }
            let values = HeadRows {
                data: v,
                base,
                d,
                slots,
            };
            #[cfg(target_arch = "x86_64")]
            if simd && d.is_multiple_of(V_CHUNK) {
                // SAFETY: `simd` holds only when AVX is available; d is checked by the callee.
                unsafe { weighted_values_avx(&values, scores, inv, o) };
                return;
            }
            for (t, &s) in slots.iter().enumerate() {
                let vr = values.row(s);
                for (j, o) in o.chunks_mut(d).enumerate() {
                    let w = scores[j * n + t] * inv[j];
                    for (acc, x) in o.iter_mut().zip(vr) {
                        *acc += w * x;
                    }
                }
            }
        },
    );
    out
}

/// Query heads per kv head handled without a heap allocation for their sums.
const MAX_GROUP: usize = 16;

/// K or V rows of one kv head, addressed by cache slot, for one sequence's context.
struct HeadRows<'a> {
    /// The layer's K or V storage, `(kv_heads, cache_slots, d)`.
    data: &'a [f32],
    /// First slot of the kv head in `data`.
    base: usize,
    d: usize,
    /// The context's slots in position order.
    slots: &'a [u32],
}

impl HeadRows<'_> {
    fn row(&self, slot: u32) -> &[f32] {
        &self.data[(self.base + slot as usize) * self.d..][..self.d]
    }
}

/// How many keys ahead the weighted sum asks for a V row (the rows sit in scattered blocks).
const PREFETCH_AHEAD: usize = 4;

/// Values of a head's output the AVX weighted sum keeps in registers at once (8 registers).
const V_CHUNK: usize = 64;

/// `o[j] += (scores[j][t] * inv[j]) * V[t]` over the context, for each query head j of the
/// group: the scalar loop's operations in its order per value (t ascending; multiply, then add),
/// with 64 values of `o[j]` held in registers across the whole context instead of loaded and
/// stored once per key.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn weighted_values_avx(values: &HeadRows<'_>, scores: &[f32], inv: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let (d, n) = (values.d, values.slots.len());
    assert!(d.is_multiple_of(V_CHUNK) && o.len() == inv.len() * d && scores.len() >= inv.len() * n);
    for (j, o) in o.chunks_exact_mut(d).enumerate() {
        for c0 in (0..d).step_by(V_CHUNK) {
            let o = &mut o[c0..c0 + V_CHUNK];
            // SAFETY: `o` holds V_CHUNK = 64 values: 8 unaligned 256-bit loads.
            let mut acc: [__m256; 8] =
                std::array::from_fn(|r| unsafe { _mm256_loadu_ps(o.as_ptr().add(8 * r)) });
            for (t, &s) in values.slots.iter().enumerate() {
                // The first head's pass brings the rows in; the others find them cached.
                if let Some(&ahead) = values.slots.get(t + PREFETCH_AHEAD).filter(|_| j == 0) {
                    let ahead = values.row(ahead)[c0..].as_ptr();
                    for at in (0..V_CHUNK).step_by(16) {
                        // SAFETY: `at < 64`, inside the chunk; a prefetch never faults anyway.
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.add(at).cast()) };
                    }
                }
                let w = _mm256_set1_ps(scores[j * n + t] * inv[j]);
                let row = &values.row(s)[c0..c0 + V_CHUNK];
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: `row` holds 64 values; 8 * r + 8 <= 64.
                    let x = unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * r)) };
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(w, x));
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: as the loads above.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * r), *acc) };
            }
        }
    }
}

/// The scalar dot product whose exact operation order the AVX path reproduces per lane.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum::<f32>()
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Scores of `MH` query heads against every key of `keys`, 8 keys per pass with one key per lane:
/// `dst[j * n + t] = dot(q[j], key t) * scale`, bit-identical to the scalar [`dot`].
///
/// # Safety
/// The CPU must support AVX, and `keys.d` must be a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn scores_avx<const MH: usize>(
    q: [&[f32]; MH],
    keys: &HeadRows<'_>,
    scale: f32,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, n) = (keys.d, keys.slots.len());
    assert!(d.is_multiple_of(8) && dst.len() == MH * n && q.iter().all(|q| q.len() == d));
    // The K rows of a sequence's context are scattered over blocks (pages) that the hardware
    // prefetcher does not cross: ask for the rows two passes ahead while this one computes.
    let prefetch = |from: usize, count: usize| {
        for &slot in keys.slots.iter().skip(from).take(count) {
            let row = keys.row(slot).as_ptr();
            for at in (0..d).step_by(16) {
                // SAFETY: `at < d`, inside the row; a prefetch never faults anyway.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.add(at).cast()) };
            }
        }
    };
    prefetch(0, 16);
    let mut t0 = 0;
    while t0 < n {
        prefetch(t0 + 16, 8);
        let lanes = (n - t0).min(8);
        // Lanes past the last key repeat it; their results are dropped.
        let rows: [*const f32; 8] =
            std::array::from_fn(|l| keys.row(keys.slots[t0 + l.min(lanes - 1)]).as_ptr());
        // -0.0 is the identity of f32 addition, as in `Iterator::sum`.
        let mut acc = [_mm256_set1_ps(-0.0); MH];
        for c in (0..d).step_by(8) {
            // SAFETY: each row holds d values (`HeadRows::row` slices them) and c + 8 <= d.
            unsafe { accumulate(&mut acc, &q, c, transpose8(&rows, c)) };
        }
        for (j, acc) in acc.iter().enumerate() {
            let mut s = [0f32; 8];
            // SAFETY: `s` holds 8 f32, one unaligned 256-bit store.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), _mm256_mul_ps(*acc, _mm256_set1_ps(scale))) };
            dst[j * n + t0..][..lanes].copy_from_slice(&s[..lanes]);
        }
        t0 += lanes;
    }
}

/// Values `c..c + 8` of 8 rows, transposed: lane l of register i is row l's value `c + i`.
///
/// # Safety
/// The CPU must support AVX, and each row must hold at least `c + 8` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8(rows: &[*const f32; 8], c: usize) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees c + 8 values per row.
    let r: [__m256; 8] = std::array::from_fn(|l| unsafe { _mm256_loadu_ps(rows[l].add(c)) });
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// `acc[j] += q[j][c + i] * col[i]` for i in 0..8, in that order, each a separate multiply and
/// add (rounded as the scalar `a * b` then `+`).
///
/// # Safety
/// The CPU must support AVX, and each `q[j]` must hold at least `c + 8` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn accumulate<const MH: usize>(
    acc: &mut [std::arch::x86_64::__m256; MH],
    q: &[&[f32]; MH],
    c: usize,
    col: [std::arch::x86_64::__m256; 8],
) {
    use std::arch::x86_64::*;
    for (acc, q) in acc.iter_mut().zip(q) {
        for (i, col) in col.iter().enumerate() {
            // SAFETY: the caller guarantees c + 8 values per query row.
            let qi = unsafe { *q.get_unchecked(c + i) };
            *acc = _mm256_add_ps(*acc, _mm256_mul_ps(_mm256_set1_ps(qi), *col));
        }
    }
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

    /// The kernel as it was before the AVX scores: one task per (sequence, head), scalar dots.
    fn per_head_scalar(
        shape: &DecodeShape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        slots: &[Vec<u32>],
    ) -> Vec<f32> {
        let (heads, d) = (shape.heads, shape.head_dim);
        let group = heads / shape.kv_heads;
        let seqs = slots.len();
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; seqs * heads * d];
        for (idx, o) in out.chunks_mut(d).enumerate() {
            let (b, h) = (idx / heads, idx % heads);
            let qv = &q[(h * seqs + b) * d..][..d];
            let base = (h / group) * shape.cache_slots;
            let mut scores = Vec::new();
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
        }
        out
    }

    #[test]
    fn grouped_heads_and_simd_scores_are_bit_identical_to_per_head_scalar() {
        // Group sizes 1, 3, 5 (4 + 1 heads per pass), context lengths around multiples of 8.
        for (heads, kv_heads, head_dim) in [(4, 4, 16), (9, 3, 64), (10, 2, 8), (6, 2, 12)] {
            let shape = DecodeShape {
                heads,
                kv_heads,
                head_dim,
                cache_slots: 64,
            };
            let n = kv_heads * shape.cache_slots * head_dim;
            let k: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
                .collect();
            let slots: Vec<Vec<u32>> = [1usize, 7, 8, 9, 17, 40]
                .iter()
                .map(|&len| {
                    (0..len as u32)
                        .map(|t| (t * 13 + len as u32) % 64)
                        .collect()
                })
                .collect();
            let q: Vec<f32> = (0..heads * slots.len() * head_dim)
                .map(|i| ((i * 29 % 89) as f32 / 11.0) - 4.0)
                .collect();
            let got = decode_attention(&shape, &q, &k, &v, &slots);
            let want = per_head_scalar(&shape, &q, &k, &v, &slots);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{heads} heads, {kv_heads} kv heads, d {head_dim}"
            );
        }
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
