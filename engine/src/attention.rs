//! Paged attention on CPU, reading K and V straight from the block pool's storage through each
//! query row's slot list: decode rows (one new token per sequence) and prefill rows (a chunk of a
//! prompt, each row over the context up to its own position).
//!
//! One task computes one (query row, kv head) pair and every query head sharing that kv head, so
//! each K and V row is read once per group of query heads. A query head's numbers are computed
//! in an order fixed by its own context alone (scores key by key, softmax, weighted sum of V in
//! context order), so a row's result never depends on which other rows share the step: not on
//! the other sequences of a decode batch, and not on how a prompt was cut into prefill chunks or
//! how much of it a prefix cache supplied. That is what makes a cached prefix give exactly a
//! recompute's outputs (engine/tests/prefix_cache.rs). A matrix multiply over the chunk (candle's
//! gemm) did not: its sums changed with the chunk's row count once contexts passed 512 keys.
//! No K/V is copied.
//!
//! The AVX2 path takes up to 3 query heads and 4 keys at a time: each score is an FMA dot product
//! over 8-value chunks, reduced by horizontal adds; the exponentials go through
//! [`crate::vmath::exp8`] 8 at a time; the weighted sum of V keeps 32 output values of each head
//! in registers across the whole context and scales by 1 / sum at the end. A sequence's K and V
//! rows are scattered over pool blocks, so both loops prefetch the rows they read next. Without
//! AVX2 a scalar loop computes the same quantities (rounded differently).

use half::f16;
use rayon::prelude::*;

use crate::kv::LayerRows;

/// An element type of the cache's K/V storage the kernel reads in place: f32 as it is, f16
/// widened on load (half the bytes per row, for decode steps bound by reading the context).
pub(crate) trait KvElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;

    /// 8 consecutive elements at `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements; the CPU must support AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable values (16 bytes) and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

/// Shapes of one call.
pub(crate) struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Rows between kv head `h`'s row of a position and head `h + 1`'s (the cache's block size).
    pub head_stride: usize,
}

/// `q`: `(heads, rows, head_dim)`; `k`, `v`: a layer's storage as rows of `head_dim` values;
/// `slots[b]`: the rows of kv head 0 for query row `b`'s context, in position order (kv head `h`
/// is `h * head_stride` rows further). Returns `(rows, heads * head_dim)`.
pub(crate) fn paged_attention<T: KvElem, S: AsRef<[u32]> + Sync>(
    shape: &AttentionShape,
    q: &[f32],
    k: LayerRows<'_, T>,
    v: LayerRows<'_, T>,
    slots: &[S],
) -> Vec<f32> {
    attend(shape, q, k, v, slots, simd_available(shape.head_dim))
}

/// Whether the AVX2 path runs for rows of `d` values.
fn simd_available(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::vmath::simd_available()
            && std::arch::is_x86_feature_detected!("f16c")
            && d.is_multiple_of(V_CHUNK)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// [`paged_attention`] on the AVX2 path or the scalar one.
fn attend<T: KvElem, S: AsRef<[u32]> + Sync>(
    shape: &AttentionShape,
    q: &[f32],
    k: LayerRows<'_, T>,
    v: LayerRows<'_, T>,
    slots: &[S],
    simd: bool,
) -> Vec<f32> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: d,
        head_stride,
    } = *shape;
    let seqs = slots.len();
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; seqs * heads * d];
    // Chunk (b, kvh): query heads kvh * group .. (kvh + 1) * group of query row b.
    out.par_chunks_mut(group * d).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (idx, o)| {
            let (b, kvh) = (idx / kv_heads, idx % kv_heads);
            let slots = slots[b].as_ref();
            let n = slots.len();
            let base = kvh * head_stride;
            let keys = HeadRows {
                data: k,
                base,
                d,
                slots,
            };
            let values = HeadRows {
                data: v,
                base,
                d,
                slots,
            };
            // The task's first window of K and V, once for all its query heads; the loops
            // roll it along.
            #[cfg(target_arch = "x86_64")]
            if simd {
                use std::arch::x86_64::_MM_HINT_T1;
                for t in 0..L2_AHEAD.min(n) {
                    prefetch_row::<T, _MM_HINT_T1>(&keys, t);
                    prefetch_row::<T, _MM_HINT_T1>(&values, t);
                }
            }
            // Query head kvh * group + j of query row b.
            let qv = |j: usize| &q[((kvh * group + j) * seqs + b) * d..][..d];
            // scores[j * n + t]: query head j of the group against context position t, then
            // its exponential.
            scores.clear();
            scores.resize(group * n, 0.0);
            let mut j = 0;
            while j < group {
                let hs = (group - j).min(MAX_HEADS);
                let dst = &mut scores[j * n..(j + hs) * n];
                let o = &mut o[j * d..(j + hs) * d];
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: `simd` holds only when AVX2 and FMA are available and d is a
                    // multiple of V_CHUNK.
                    unsafe {
                        match hs {
                            1 => head_set_avx::<T, 1>([qv(j)], &keys, &values, scale, dst, o),
                            2 => head_set_avx::<T, 2>(
                                [qv(j), qv(j + 1)],
                                &keys,
                                &values,
                                scale,
                                dst,
                                o,
                            ),
                            _ => head_set_avx::<T, 3>(
                                [qv(j), qv(j + 1), qv(j + 2)],
                                &keys,
                                &values,
                                scale,
                                dst,
                                o,
                            ),
                        }
                    }
                    j += hs;
                    continue;
                }
                for h in 0..hs {
                    head_scalar(
                        qv(j + h),
                        &keys,
                        &values,
                        scale,
                        &mut dst[h * n..][..n],
                        &mut o[h * d..][..d],
                    );
                }
                j += hs;
            }
        },
    );
    out
}

/// Query heads one AVX2 pass handles together (their accumulators fill the registers).
const MAX_HEADS: usize = 3;

/// Output values per head the AVX2 weighted sum keeps in registers at once (4 registers).
const V_CHUNK: usize = 32;

/// How many keys ahead the loops ask for K and V rows into L1 (the rows sit in scattered blocks).
const PREFETCH_AHEAD: usize = 8;

/// How many keys ahead the loops ask for K and V rows into L2 (16 KiB of f32 rows at head_dim
/// 64). A decode step's KV comes from DRAM (the step streams ~100 MB of weights between one
/// layer's attention and the next step's), and 8 rows ahead kept too few reads in flight: a
/// task now asks for the first window of both K and V when it starts and rolls the window along.
/// With it, the batch-8 step took 7% less time (10.04 -> 9.34 ms, medians of 10 alternated
/// rounds; BENCHMARKS.md, session 10).
const L2_AHEAD: usize = 64;

/// K or V rows of one kv head for one sequence's context.
struct HeadRows<'a, T> {
    /// The layer's K or V storage as rows of `d` values.
    data: LayerRows<'a, T>,
    /// Offset, in rows, of this kv head from head 0.
    base: usize,
    d: usize,
    /// The context's head-0 rows in position order.
    slots: &'a [u32],
}

impl<T> HeadRows<'_, T> {
    fn row(&self, head0_row: u32) -> &[T] {
        self.data.row(self.base + head0_row as usize)
    }

    /// The row of context position `t`.
    fn at(&self, t: usize) -> &[T] {
        self.row(self.slots[t])
    }
}

/// One query head without SIMD: `e` (the context's length) receives the exponentials, `o` the
/// head's output.
fn head_scalar<T: KvElem>(
    q: &[f32],
    keys: &HeadRows<'_, T>,
    values: &HeadRows<'_, T>,
    scale: f32,
    e: &mut [f32],
    o: &mut [f32],
) {
    for (t, e) in e.iter_mut().enumerate() {
        *e = q
            .iter()
            .zip(keys.at(t))
            .map(|(a, b)| a * b.to_f32())
            .sum::<f32>()
            * scale;
    }
    let max = e.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for x in e.iter_mut() {
        *x = crate::vmath::exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    o.fill(0.0);
    for (t, &w) in e.iter().enumerate() {
        for (acc, x) in o.iter_mut().zip(values.at(t)) {
            *acc += w * x.to_f32();
        }
    }
    for o in o.iter_mut() {
        *o *= inv;
    }
}

/// `MH` query heads of one kv head on AVX2: scores into `e` (`MH` rows of the context's length),
/// softmax in place, then the weighted sum of V into `o` (`MH` rows of `d`).
///
/// # Safety
/// The CPU must support AVX2 and FMA, and `keys.d` must be a multiple of [`V_CHUNK`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn head_set_avx<T: KvElem, const MH: usize>(
    q: [&[f32]; MH],
    keys: &HeadRows<'_, T>,
    values: &HeadRows<'_, T>,
    scale: f32,
    e: &mut [f32],
    o: &mut [f32],
) {
    let (d, n) = (keys.d, keys.slots.len());
    assert!(
        d.is_multiple_of(V_CHUNK)
            && e.len() == MH * n
            && o.len() == MH * d
            && q.iter().all(|q| q.len() == d)
    );
    if n == 0 {
        o.fill(0.0);
        return;
    }
    // SAFETY (all three): the features are enabled here, and the shapes were checked above.
    unsafe { scores_avx(q, keys, scale, e) };
    let mut inv = [0f32; MH];
    for (e, inv) in e.chunks_exact_mut(n).zip(&mut inv) {
        *inv = 1.0 / unsafe { softmax_numerators_avx(e) };
    }
    unsafe { weighted_values_avx(values, e, inv, o) };
}

/// Asks for row `t`'s cache lines, if the context has a row `t`: into L1 (`_MM_HINT_T0`) for the
/// rows the next passes read, into L2 (`_MM_HINT_T1`) for the window [`L2_AHEAD`] further on.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_row<T, const HINT: i32>(rows: &HeadRows<'_, T>, t: usize) {
    use std::arch::x86_64::*;
    if let Some(&slot) = rows.slots.get(t) {
        let row = rows.row(slot).as_ptr().cast::<u8>();
        for at in (0..std::mem::size_of_val(rows.row(slot))).step_by(64) {
            // SAFETY: `at` is inside the row; a prefetch never faults anyway.
            unsafe { _mm_prefetch::<HINT>(row.add(at).cast()) };
        }
    }
}

/// `e[j * n + t] = dot(q[j], key t) * scale` for every key, 4 keys per pass: each dot product is
/// a chain of FMAs over 8-value chunks, then horizontal adds, the same for every key wherever it
/// falls.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `keys.d` is a multiple of 8, each `q[j]` holds `d` values
/// and `e` holds `MH * n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx<T: KvElem, const MH: usize>(
    q: [&[f32]; MH],
    keys: &HeadRows<'_, T>,
    scale: f32,
    e: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, n) = (keys.d, keys.slots.len());
    for t in 0..PREFETCH_AHEAD {
        prefetch_row::<T, _MM_HINT_T0>(keys, t);
    }
    let mut t0 = 0;
    while t0 < n {
        for t in t0 + PREFETCH_AHEAD..t0 + PREFETCH_AHEAD + 4 {
            prefetch_row::<T, _MM_HINT_T0>(keys, t);
        }
        for t in t0 + L2_AHEAD..t0 + L2_AHEAD + 4 {
            prefetch_row::<T, _MM_HINT_T1>(keys, t);
        }
        let lanes = (n - t0).min(4);
        // Lanes past the last key repeat it; their results are dropped.
        let rows: [*const T; 4] = std::array::from_fn(|l| keys.at(t0 + l.min(lanes - 1)).as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 4]; MH];
        for c in (0..d).step_by(8) {
            for (acc, q) in acc.iter_mut().zip(&q) {
                // SAFETY: q and every row hold d values, c + 8 <= d.
                let qc = unsafe { _mm256_loadu_ps(q.as_ptr().add(c)) };
                for (acc, row) in acc.iter_mut().zip(&rows) {
                    *acc = _mm256_fmadd_ps(qc, unsafe { T::load8(row.add(c)) }, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            // Lane l of `h` ends up holding key l's full sum.
            let h = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_mul_ps(
                _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h)),
                _mm_set1_ps(scale),
            );
            let mut out = [0f32; 4];
            // SAFETY: `out` holds 4 f32, one unaligned 128-bit store.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
            e[j * n + t0..][..lanes].copy_from_slice(&out[..lanes]);
        }
        t0 += lanes;
    }
}

/// Replaces the scores `e` by `exp(e - max)` and returns their sum.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerators_avx(e: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    // The maximum is exact in any order.
    let max = e.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let maxv = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for chunk in e.chunks_mut(8) {
        let len = chunk.len();
        let mut buf = [max; 8];
        buf[..len].copy_from_slice(chunk);
        // SAFETY: `buf` holds 8 f32; the features are enabled here.
        let x = unsafe { crate::vmath::exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), maxv)) };
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), x) };
        chunk.copy_from_slice(&buf[..len]);
        // Padding lanes hold exp(0) = 1: zero them before they reach the sum.
        buf[len..].fill(0.0);
        sum = _mm256_add_ps(sum, unsafe { _mm256_loadu_ps(buf.as_ptr()) });
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

/// `o[j] = inv[j] * sum over t of e[j][t] * V[t]`, for each query head j: 32 values of every
/// head's output stay in registers across the context (one FMA per key, register and head),
/// scaled once at the end.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `values.d` is a multiple of [`V_CHUNK`], `e` holds `MH * n`
/// and `o` `MH * d` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_values_avx<T: KvElem, const MH: usize>(
    values: &HeadRows<'_, T>,
    e: &[f32],
    inv: [f32; MH],
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (d, n) = (values.d, values.slots.len());
    for c0 in (0..d).step_by(V_CHUNK) {
        let mut acc = [[_mm256_setzero_ps(); 4]; MH];
        if c0 == 0 {
            for t in 0..PREFETCH_AHEAD {
                prefetch_row::<T, _MM_HINT_T0>(values, t);
            }
        }
        for t in 0..n {
            // The first chunk's pass brings every row in; later passes find them cached.
            if c0 == 0 {
                prefetch_row::<T, _MM_HINT_T0>(values, t + PREFETCH_AHEAD);
                prefetch_row::<T, _MM_HINT_T1>(values, t + L2_AHEAD);
            }
            // SAFETY: the row holds d values and c0 + 32 <= d.
            let row = unsafe { values.at(t).as_ptr().add(c0) };
            for (j, acc) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(e[j * n + t]);
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: as above, 8 * r + 8 <= 32.
                    *acc = _mm256_fmadd_ps(w, unsafe { T::load8(row.add(8 * r)) }, *acc);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            let scale = _mm256_set1_ps(inv[j]);
            for (r, acc) in acc.iter().enumerate() {
                // SAFETY: o holds MH * d values; j * d + c0 + 8 * r + 8 <= (j + 1) * d.
                unsafe {
                    _mm256_storeu_ps(
                        o.as_mut_ptr().add(j * d + c0 + 8 * r),
                        _mm256_mul_ps(*acc, scale),
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward softmax(q k^T / sqrt(d)) v for one head of one sequence, in f64.
    fn reference(q: &[f32], ks: &[&[f32]], vs: &[&[f32]]) -> Vec<f32> {
        let d = q.len();
        let scores: Vec<f64> = ks
            .iter()
            .map(|k| {
                q.iter().zip(*k).map(|(a, b)| (*a * *b) as f64).sum::<f64>() / (d as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d)
            .map(|j| (e.iter().zip(vs).map(|(p, v)| p * v[j] as f64).sum::<f64>() / sum) as f32)
            .collect()
    }

    /// A cache of 64 rows per kv head (heads outermost, a valid `head_stride` layout) filled with
    /// a fixed pattern, sequences of the given context lengths on scattered rows, and their
    /// queries.
    struct Case {
        shape: AttentionShape,
        k: Vec<f32>,
        v: Vec<f32>,
        slots: Vec<Vec<u32>>,
        q: Vec<f32>,
    }

    fn case(heads: usize, kv_heads: usize, head_dim: usize, lens: &[usize]) -> Case {
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
            head_stride: 64,
        };
        let n = kv_heads * shape.head_stride * head_dim;
        let k = (0..n)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let v = (0..n)
            .map(|i| ((i * 53 % 97) as f32 / 48.0) - 1.0)
            .collect();
        let slots: Vec<Vec<u32>> = lens
            .iter()
            .map(|&len| {
                (0..len as u32)
                    .map(|t| (t * 13 + len as u32) % 64)
                    .collect()
            })
            .collect();
        let q = (0..heads * slots.len() * head_dim)
            .map(|i| ((i * 29 % 89) as f32 / 44.0) - 1.0)
            .collect();
        Case {
            shape,
            k,
            v,
            slots,
            q,
        }
    }

    fn paths() -> Vec<bool> {
        if crate::vmath::simd_available() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    /// The cache rounded to f16, as an f16 cache would hold it.
    fn halves(x: &[f32]) -> Vec<f16> {
        x.iter().map(|&x| f16::from_f32(x)).collect()
    }

    fn widened(x: &[f16]) -> Vec<f32> {
        x.iter().map(|x| x.to_f32()).collect()
    }

    /// Checks `out` (from a cache holding `k`, `v`) against the f64 reference.
    fn check(c: &Case, k: &[f32], v: &[f32], out: &[f32], what: &str) {
        let (heads, kv_heads, d) = (c.shape.heads, c.shape.kv_heads, c.shape.head_dim);
        let seqs = c.slots.len();
        for (b, slots) in c.slots.iter().enumerate() {
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let row = |t: &'_ [f32], s: u32| -> Vec<f32> {
                    t[(kvh * c.shape.head_stride + s as usize) * d..][..d].to_vec()
                };
                let ks: Vec<Vec<f32>> = slots.iter().map(|&s| row(k, s)).collect();
                let vs: Vec<Vec<f32>> = slots.iter().map(|&s| row(v, s)).collect();
                let ks: Vec<&[f32]> = ks.iter().map(Vec::as_slice).collect();
                let vs: Vec<&[f32]> = vs.iter().map(Vec::as_slice).collect();
                let want = reference(&c.q[(h * seqs + b) * d..][..d], &ks, &vs);
                let got = &out[(b * heads + h) * d..][..d];
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 2e-5,
                        "{what}, {heads}/{kv_heads} heads, d {d}, seq {b} head {h}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_path_and_cache_type_matches_the_reference() {
        // Group sizes 1, 3 (one AVX pass), 5 (3 + 2 heads), 4 (3 + 1); context lengths around
        // multiples of 4 and 8.
        for (heads, kv_heads, head_dim) in [(4, 4, 32), (9, 3, 64), (10, 2, 32), (8, 2, 64)] {
            let c = case(heads, kv_heads, head_dim, &[1, 3, 4, 5, 8, 9, 17, 40]);
            let (k16, v16) = (halves(&c.k), halves(&c.v));
            for simd in paths() {
                let out = attend(
                    &c.shape,
                    &c.q,
                    rows(&c.k, c.shape.head_dim),
                    rows(&c.v, c.shape.head_dim),
                    &c.slots,
                    simd,
                );
                check(&c, &c.k, &c.v, &out, &format!("f32, simd {simd}"));
                let out = attend(
                    &c.shape,
                    &c.q,
                    rows(&k16, c.shape.head_dim),
                    rows(&v16, c.shape.head_dim),
                    &c.slots,
                    simd,
                );
                check(
                    &c,
                    &widened(&k16),
                    &widened(&v16),
                    &out,
                    &format!("f16, simd {simd}"),
                );
            }
        }
    }

    fn rows<T>(data: &[T], d: usize) -> LayerRows<'_, T> {
        LayerRows::of_slice(data, d)
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn a_sequence_alone_and_in_a_batch_is_bit_identical() {
        let c = case(9, 3, 64, &[5, 17, 1, 40, 8]);
        let (heads, d) = (c.shape.heads, c.shape.head_dim);
        let seqs = c.slots.len();
        let (k16, v16) = (halves(&c.k), halves(&c.v));
        for simd in paths() {
            let batch = attend(
                &c.shape,
                &c.q,
                rows(&c.k, c.shape.head_dim),
                rows(&c.v, c.shape.head_dim),
                &c.slots,
                simd,
            );
            let batch16 = attend(
                &c.shape,
                &c.q,
                rows(&k16, c.shape.head_dim),
                rows(&v16, c.shape.head_dim),
                &c.slots,
                simd,
            );
            for b in 0..seqs {
                let q1: Vec<f32> = (0..heads)
                    .flat_map(|h| c.q[(h * seqs + b) * d..][..d].to_vec())
                    .collect();
                let own = &c.slots[b..=b];
                let alone = attend(
                    &c.shape,
                    &q1,
                    rows(&c.k, c.shape.head_dim),
                    rows(&c.v, c.shape.head_dim),
                    own,
                    simd,
                );
                let mine = &batch[b * heads * d..][..heads * d];
                assert_eq!(bits(&alone), bits(mine), "f32, simd {simd}, sequence {b}");
                let alone = attend(
                    &c.shape,
                    &q1,
                    rows(&k16, c.shape.head_dim),
                    rows(&v16, c.shape.head_dim),
                    own,
                    simd,
                );
                let mine = &batch16[b * heads * d..][..heads * d];
                assert_eq!(bits(&alone), bits(mine), "f16, simd {simd}, sequence {b}");
            }
        }
    }
}
