//! Paged KV cache: a pool of fixed-size blocks, per-sequence block tables, and the layout
//! descriptor and byte format through which a sequence's KV leaves one engine and enters another.
//!
//! prefill engine --export(layer, blocks)--> KvChunk bytes --import--> decode engine
//!
//! Storage, per layer, is one K and one V tensor of shape `(num_blocks, kv_heads, block_size,
//! head_dim)`; token slot `s` of block `b` is slot `b * block_size + s`. A block is one contiguous
//! piece of every layer's storage, and within it each head's rows are contiguous, so a
//! tensor-parallel head range is a contiguous part of every block. Decode attention reads one
//! (sequence, kv head) pair's rows block by block: with heads outermost over the whole pool
//! (the layout before 2026-11-24) each block's rows were a lone 4 KiB island; blocks keep a
//! sequence's heads side by side, which this machine reads about 15-20% faster (BENCHMARKS.md).
//!
//! Blocks, their sharing and the prefix cache's index live in [`crate::blocks`]: a table returns
//! its blocks exactly once, when it is dropped, whatever path (finish, cancel, failure) drops it.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

use baton_kv_transfer::agent::{HostPool, KvRegion};
use baton_kv_transfer::memory::{Half, HostRegion, PoolLayout};
use candle_core::{Device, Tensor};

pub use crate::blocks::{BlockAllocator, BlockTable, KvSource, PoolStats};
pub use baton_core::{BlockHash, BlockId, Fingerprint, KvChunk, LayoutDescriptor};

use crate::config::{Kernels, KvDType, ModelConfig, candle_dtype};
use crate::{Error, Result};

/// `len` consecutive rows of a step's new K and V, from `row`, go to cache slots from `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowRun {
    pub slot: usize,
    pub row: usize,
    pub len: usize,
}

/// Rows of one layer's K or V storage in baton-owned memory, `d` values each, handed out a row
/// at a time: a reference never spans rows of blocks this engine does not hold at that moment
/// (blocks reserved for a handoff that a transport is filling), which is the region's
/// aliasing contract (`baton_kv_transfer::memory`).
pub(crate) struct LayerRows<'a, T> {
    ptr: *const T,
    rows: usize,
    d: usize,
    _region: PhantomData<&'a T>,
}

impl<T> Clone for LayerRows<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for LayerRows<'_, T> {}

// SAFETY: a view of plain values; reads from several threads are what decode attention does,
// and nothing writes the rows it hands out while the view lives (the engine thread is inside
// the step that made it).
unsafe impl<T: Sync> Sync for LayerRows<'_, T> {}
// SAFETY: as for Sync.
unsafe impl<T: Sync> Send for LayerRows<'_, T> {}

impl<'a, T> LayerRows<'a, T> {
    /// Rows over a slice (tests, and references built outside a pool).
    #[cfg(test)]
    pub(crate) fn of_slice(data: &'a [T], d: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rows: data.len() / d,
            d,
            _region: PhantomData,
        }
    }

    /// Row `i`; panics past the layer's end.
    #[inline]
    pub(crate) fn row(&self, i: usize) -> &'a [T] {
        assert!(i < self.rows, "row {i} of {}", self.rows);
        // SAFETY: inside the layer's storage (checked); the rows a step reads belong to its
        // sequences' blocks, which nothing else writes while the step runs.
        unsafe { std::slice::from_raw_parts(self.ptr.add(i * self.d), self.d) }
    }
}

/// One layer's K and V storage in CPU memory, read in place by decode attention.
pub(crate) enum CpuKv<'a> {
    F32(LayerRows<'a, f32>, LayerRows<'a, f32>),
    F16(LayerRows<'a, half::f16>, LayerRows<'a, half::f16>),
}

/// Row of a layer's storage, seen as `(rows, head_dim)`, that holds kv head `head` of cache slot
/// `slot`: storage is `(blocks, heads, block_size, head_dim)`.
fn storage_row(slot: usize, head: usize, heads: usize, block_size: usize) -> usize {
    (slot / block_size * heads + head) * block_size + slot % block_size
}

/// Where the KV lives.
enum Storage {
    /// baton-owned memory holding every layer's K and V in [`PoolLayout`] order: on the CPU with
    /// baton's kernels. Transports read and write it in place (it is the registered region).
    Host(Arc<HostRegion>),
    /// One candle tensor per layer for K and one for V, each `(blocks, kv_heads, block_size,
    /// head_dim)`: on a GPU, and on the CPU with `cpu_kernels = candle`, whose purpose is to run
    /// the GPU's code path.
    Tensors { k: Vec<Tensor>, v: Vec<Tensor> },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Host(r) => write!(f, "Host({r:?})"),
            Storage::Tensors { k, .. } => write!(f, "Tensors({} layers)", k.len()),
        }
    }
}

/// Whether a CPU pool's memory can be mapped by another process on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolMemory {
    /// Private memory (huge pages where the kernel grants them).
    #[default]
    Private,
    /// A memfd another process maps: a decode worker's pool that prefill workers on this host
    /// write into directly (the shared-memory transport's one copy).
    Shared,
}

/// A tensor's contiguous CPU values, or `None` (another device, dtype or layout).
fn cpu_values<T: candle_core::WithDType>(t: &Tensor, f: impl FnOnce(&[T])) -> Option<()> {
    use candle_core::Storage as S;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let S::Cpu(cpu) = &*storage else { return None };
    let values = T::cpu_storage_as_slice(cpu).ok()?;
    f(&values[start..end]);
    Some(())
}

/// [`KvCache::write_rows`] off the CPU: one `slice_set` per run and head into `store`,
/// `(blocks, heads, block_size, d)`, from `rows`, `(heads, rows, d)`. Runs must lie inside one
/// block each, as [`KvCache::row_runs`] makes them.
fn write_rows_by_slices(store: &Tensor, rows: &Tensor, runs: &[RowRun]) -> Result<()> {
    let (_, heads, bs, d) = store.dims4()?;
    // A reshape of the contiguous store shares its storage: writes land in the cache.
    let flat = store.reshape(((), d))?;
    for run in runs {
        if run.slot % bs + run.len > bs {
            return Err(Error::Internal("kv write: a run crosses a block's end"));
        }
        for h in 0..heads {
            let at = storage_row(run.slot, h, heads, bs);
            flat.slice_set(&rows.get(h)?.narrow(0, run.row, run.len)?, 0, at)?;
        }
    }
    Ok(())
}

/// Copies each run's rows, head by head, from `src` (`(heads, rows, head_dim)` of the pool's
/// element type) into layer `layer`'s K or V storage in `region`. A run outside the pool,
/// across a block's end or past the source rows panics: runs come from the engine's own block
/// tables.
fn copy_rows<T: Copy>(
    region: &HostRegion,
    pool: &PoolLayout,
    layer: u32,
    half: Half,
    src: &[T],
    runs: &[RowRun],
) {
    let heads = pool.heads() as usize;
    let bs = pool.layout.block_size as usize;
    let d = pool.layout.head_dim as usize;
    assert_eq!(
        std::mem::size_of::<T>(),
        pool.layout.dtype.size(),
        "kv write: element type"
    );
    let rows = src.len() / (heads * d);
    let base = pool.half_offset(layer, half);
    let row_bytes = d * std::mem::size_of::<T>();
    for run in runs {
        let (block, off) = (run.slot / bs, run.slot % bs);
        assert!(
            block < pool.num_blocks as usize && off + run.len <= bs && run.row + run.len <= rows,
            "kv write: {run:?} outside {rows} rows or one of {} blocks of {bs} slots",
            pool.num_blocks
        );
        for h in 0..heads {
            let at = base + (storage_row(run.slot, h, heads, bs) * row_bytes) as u64;
            // SAFETY: the rows of a block one of the engine's sequences holds, written by the
            // engine thread alone; `bytes_mut` checks they lie inside the region.
            let dst = unsafe { region.bytes_mut(at, run.len * row_bytes) }
                .expect("kv rows inside the pool");
            // SAFETY: `dst` holds `run.len * d` values of T (its size was checked above), and
            // T is f32 or f16: any bytes are a value.
            let dst: &mut [T] =
                unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), run.len * d) };
            dst.copy_from_slice(&src[(h * rows + run.row) * d..][..run.len * d]);
        }
    }
}

/// The pool's bytes for transports, when the KV lives in candle tensors (a GPU, or the CPU
/// with `cpu_kernels = candle`): byte ranges in the pool layout map to element ranges of one
/// layer's K or V tensor, read and written through candle's ops (which lock the tensor's
/// storage, so a transport task may call them while the engine thread steps). Slower than host
/// memory, and only direct copies between host pools are one copy.
pub struct TensorRegion {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pool: PoolLayout,
    dtype: KvDType,
}

impl TensorRegion {
    /// The pieces of `offset..offset + len`: (layer index, half, element offset, element
    /// count), split where one layer's K or V ends.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> baton_kv_transfer::Result<Vec<(usize, Half, usize, usize)>> {
        let bad = |reason: String| baton_kv_transfer::Error::InvalidConfig {
            field: "offset",
            reason,
        };
        let size = self.dtype.size() as u64;
        let half_bytes = self.pool.layer_half_bytes();
        if !offset.is_multiple_of(size)
            || !(len as u64).is_multiple_of(size)
            || offset + len as u64 > self.pool.region_bytes()
        {
            return Err(bad(format!(
                "{offset}+{len} is not whole elements inside the pool"
            )));
        }
        let mut out = Vec::new();
        let (mut at, end) = (offset, offset + len as u64);
        while at < end {
            let index = at / half_bytes;
            let within = at % half_bytes;
            let n = (half_bytes - within).min(end - at);
            let half = if index.is_multiple_of(2) {
                Half::K
            } else {
                Half::V
            };
            out.push((
                (index / 2) as usize,
                half,
                (within / size) as usize,
                (n / size) as usize,
            ));
            at += n;
        }
        Ok(out)
    }

    fn tensor(&self, layer: usize, half: Half) -> &Tensor {
        match half {
            Half::K => &self.k[layer],
            Half::V => &self.v[layer],
        }
    }
}

fn candle_io(e: candle_core::Error) -> baton_kv_transfer::Error {
    baton_kv_transfer::Error::Io {
        during: "copying kv through candle",
        source: std::io::Error::other(e.to_string()),
    }
}

impl KvRegion for TensorRegion {
    fn pool(&self) -> &PoolLayout {
        &self.pool
    }

    fn host(&self) -> Option<&HostRegion> {
        None
    }

    fn read(&self, offset: u64, dst: &mut [u8]) -> baton_kv_transfer::Result<()> {
        let mut at = 0;
        for (layer, half, first, n) in self.pieces(offset, dst.len())? {
            let flat = self.tensor(layer, half).flatten_all().map_err(candle_io)?;
            let part = flat.narrow(0, first, n).map_err(candle_io)?;
            let mut bytes = Vec::with_capacity(n * self.dtype.size());
            append_le_bytes(&part, self.dtype, &mut bytes).map_err(|e| {
                baton_kv_transfer::Error::Io {
                    during: "copying kv through candle",
                    source: std::io::Error::other(e.to_string()),
                }
            })?;
            dst[at..at + bytes.len()].copy_from_slice(&bytes);
            at += bytes.len();
        }
        Ok(())
    }

    fn write(&self, offset: u64, src: &[u8]) -> baton_kv_transfer::Result<()> {
        let mut at = 0;
        for (layer, half, first, n) in self.pieces(offset, src.len())? {
            let store = self.tensor(layer, half);
            let bytes = &src[at..at + n * self.dtype.size()];
            let piece =
                Tensor::from_raw_buffer(bytes, candle_dtype(self.dtype), &[n], store.device())
                    .map_err(candle_io)?;
            // A reshape of the contiguous store shares its storage: the write lands in the pool.
            let flat = store.reshape(((),)).map_err(candle_io)?;
            flat.slice_set(&piece, 0, first).map_err(candle_io)?;
            at += bytes.len();
        }
        Ok(())
    }
}

/// The KV of every layer, and the pool that hands out its blocks.
#[derive(Debug)]
pub struct KvCache {
    storage: Storage,
    pool: PoolLayout,
    allocator: BlockAllocator,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    num_layers: usize,
    dtype: KvDType,
}

impl KvCache {
    /// A pool of as many blocks as fit in `budget_bytes`, holding the KV of `layout`'s layers
    /// and kv heads: in baton-owned memory (`memory` says whether another process may map it)
    /// on the CPU with baton's kernels, in candle tensors otherwise.
    pub fn new(
        config: &ModelConfig,
        layout: LayoutDescriptor,
        budget_bytes: usize,
        kernels: Kernels,
        memory: PoolMemory,
        device: &Device,
    ) -> Result<Self> {
        let block_size = layout.block_size as usize;
        let dtype = layout.dtype;
        // A shard's pool holds its stage's layers and its kv heads only.
        let num_layers = layout.layers.len();
        let num_kv_heads = layout.kv_heads.len();
        let token_layer_bytes = 2 * num_kv_heads * config.head_dim * dtype.size();
        let block_bytes = num_layers * block_size * token_layer_bytes;
        let num_blocks = budget_bytes / block_bytes;
        if num_blocks == 0 {
            return Err(Error::invalid(
                "kv_cache_bytes",
                format!("budget {budget_bytes} is below one block ({block_bytes} bytes)"),
            ));
        }
        // Rows of one layer's storage seen as `(rows, head_dim)` are addressed by u32.
        if num_blocks
            .checked_mul(block_size * num_kv_heads)
            .is_none_or(|rows| rows > u32::MAX as usize)
        {
            return Err(Error::invalid(
                "kv_cache_bytes",
                format!("budget {budget_bytes} holds {num_blocks} blocks, more than 2^32 rows"),
            ));
        }
        let pool = PoolLayout {
            layout,
            num_blocks: num_blocks as u32,
        };
        let storage = if device.is_cpu() && kernels == Kernels::Baton {
            let len = usize::try_from(pool.region_bytes())
                .map_err(|_| Error::invalid("kv_cache_bytes", "larger than this address space"))?;
            let region = match memory {
                PoolMemory::Private => HostRegion::private(len),
                PoolMemory::Shared => HostRegion::shared(len, "baton-kv-pool").or_else(|e| {
                    // Shared memory refused (a memory limit, a sandbox without memfd): the pool
                    // still works as private memory; peers on this host then write through the
                    // shm socket, one copy more. Said loudly: the decode worker's
                    // `baton_kv_pool_shared` gauge reads 0.
                    tracing::warn!(
                        error = %e,
                        bytes = len,
                        "FALLBACK: the kv pool could not be allocated as shared memory; it is private memory, so prefill workers on this host write into it through the shm socket instead of mapping it"
                    );
                    HostRegion::private(len)
                }),
            }
            .map_err(|e| Error::KvImport(format!("allocating the {len}-byte kv pool: {e}")))?;
            Storage::Host(Arc::new(region))
        } else {
            let shape = (num_blocks, num_kv_heads, block_size, config.head_dim);
            let mut k = Vec::with_capacity(num_layers);
            let mut v = Vec::with_capacity(num_layers);
            for _ in 0..num_layers {
                k.push(Tensor::zeros(shape, candle_dtype(dtype), device)?);
                v.push(Tensor::zeros(shape, candle_dtype(dtype), device)?);
            }
            Storage::Tensors { k, v }
        };
        Ok(Self {
            storage,
            pool,
            allocator: BlockAllocator::new(num_blocks),
            block_size,
            num_kv_heads,
            head_dim: config.head_dim,
            num_layers,
            dtype,
        })
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// The model's number of this cache's local layer `layer` (a pipeline stage's cache holds
    /// layers from its first on), as the pool layout addresses it.
    fn pool_layer(&self, layer: usize) -> u32 {
        self.pool.layout.layers.start + layer as u32
    }

    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Where every row lies in the pool's memory.
    pub fn pool_layout(&self) -> &PoolLayout {
        &self.pool
    }

    /// The pool as a transfer agent registers it: host memory transports read and write in
    /// place, or candle's tensors through their ops.
    pub fn kv_region(&self) -> Arc<dyn KvRegion> {
        match &self.storage {
            Storage::Host(region) => Arc::new(HostPool {
                region: region.clone(),
                pool: self.pool.clone(),
            }),
            Storage::Tensors { k, v } => Arc::new(TensorRegion {
                k: k.clone(),
                v: v.clone(),
                pool: self.pool.clone(),
                dtype: self.dtype,
            }),
        }
    }

    /// The pool's memory, when baton owns it (CPU with baton's kernels): transports read and
    /// write its blocks in place.
    pub fn region(&self) -> Option<&Arc<HostRegion>> {
        match &self.storage {
            Storage::Host(r) => Some(r),
            Storage::Tensors { .. } => None,
        }
    }

    /// Bytes of one layer's K plus V for `tokens` tokens.
    pub fn layer_bytes(&self, tokens: usize) -> usize {
        2 * tokens * self.num_kv_heads * self.head_dim * self.dtype.size()
    }

    /// Contiguous runs of slots covering token positions `positions` of a table:
    /// `(first slot, first position, length)`, at most one run per block.
    fn runs(
        &self,
        blocks: &[BlockId],
        positions: Range<usize>,
    ) -> Result<Vec<(usize, usize, usize)>> {
        let bs = self.block_size;
        if positions.end.div_ceil(bs) > blocks.len() {
            return Err(Error::KvImport(format!(
                "positions up to {} exceed the {} blocks reserved",
                positions.end,
                blocks.len()
            )));
        }
        let mut runs = Vec::new();
        let mut p = positions.start;
        while p < positions.end {
            let block = blocks[p / bs].0 as usize;
            let off = p % bs;
            let len = (bs - off).min(positions.end - p);
            runs.push((block * bs + off, p, len));
            p += len;
        }
        Ok(runs)
    }

    /// Where rows `row..row + (positions.end - positions.start)` of a step's new K and V go:
    /// the runs of [`KvCache::runs`] for those positions, with each run's first row in place of
    /// its first position, appended to `out`.
    pub(crate) fn row_runs(
        &self,
        table: &BlockTable,
        positions: Range<usize>,
        row: usize,
        out: &mut Vec<RowRun>,
    ) -> Result<()> {
        let start = positions.start;
        for (slot, pos, len) in self.runs(table.blocks(), positions)? {
            out.push(RowRun {
                slot,
                row: row + pos - start,
                len,
            });
        }
        Ok(())
    }

    /// Writes K and V, each `(kv_heads, n, head_dim)`, for positions `start..start + n`.
    pub(crate) fn write(
        &self,
        layer: usize,
        table: &BlockTable,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let mut runs = Vec::new();
        self.row_runs(table, start..start + k.dim(1)?, 0, &mut runs)?;
        self.write_rows(layer, &runs, k, v)
    }

    /// Writes rows of K and V, each `(kv_heads, rows, head_dim)`, into the slots `runs` name:
    /// row by row into baton's memory, or one candle slice op per run.
    pub(crate) fn write_rows(
        &self,
        layer: usize,
        runs: &[RowRun],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (k, v) = (
            k.to_dtype(candle_dtype(self.dtype))?.contiguous()?,
            v.to_dtype(candle_dtype(self.dtype))?.contiguous()?,
        );
        match &self.storage {
            Storage::Host(region) => {
                for (half, rows) in [(Half::K, &k), (Half::V, &v)] {
                    let written = match self.dtype {
                        KvDType::F32 => cpu_values::<f32>(rows, |src| {
                            copy_rows(region, &self.pool, self.pool_layer(layer), half, src, runs)
                        }),
                        KvDType::F16 => cpu_values::<half::f16>(rows, |src| {
                            copy_rows(region, &self.pool, self.pool_layer(layer), half, src, runs)
                        }),
                    };
                    written.ok_or(Error::Internal("kv write: rows not in CPU memory"))?;
                }
                Ok(())
            }
            Storage::Tensors { k: ks, v: vs } => {
                write_rows_by_slices(&ks[layer], &k, runs)?;
                write_rows_by_slices(&vs[layer], &v, runs)
            }
        }
    }

    /// For every position `0..len` of a table, the row holding kv head 0 of that position in a
    /// layer's storage seen as `(rows, head_dim)`; head `h` is [`KvCache::head_stride`]` * h` rows
    /// further.
    pub(crate) fn head_rows(&self, table: &BlockTable, len: usize) -> Result<Vec<u32>> {
        let (bs, heads) = (self.block_size, self.num_kv_heads);
        Ok(self
            .runs(table.blocks(), 0..len)?
            .into_iter()
            .flat_map(|(slot, _, n)| {
                let first = storage_row(slot, 0, heads, bs);
                (first..first + n).map(|r| r as u32)
            })
            .collect())
    }

    /// Rows between one kv head's row of a position and the next head's.
    pub(crate) fn head_stride(&self) -> usize {
        self.block_size
    }

    /// The rows of every kv head, head-major, for positions whose head-0 rows are `head_rows`:
    /// the index [`KvCache::gather`] takes.
    pub(crate) fn gather_index(&self, head_rows: &[u32], device: &Device) -> Result<Tensor> {
        let stride = self.head_stride() as u32;
        let index: Vec<u32> = (0..self.num_kv_heads as u32)
            .flat_map(|h| head_rows.iter().map(move |&r| r + h * stride))
            .collect();
        let n = index.len();
        Ok(Tensor::from_vec(index, n, device)?)
    }

    /// Runs `f` on layer `layer`'s K and V storage, addressed as rows by [`KvCache::head_rows`],
    /// when the cache lives in baton's memory; `None` otherwise.
    pub(crate) fn with_cpu<R>(&self, layer: usize, f: impl FnOnce(CpuKv<'_>) -> R) -> Option<R> {
        let Storage::Host(region) = &self.storage else {
            return None;
        };
        let rows = self.pool.num_blocks as usize * self.num_kv_heads * self.block_size;
        let d = self.head_dim;
        let at = |half| {
            // SAFETY: the half's storage lies inside the region (the region is the pool's size).
            unsafe {
                region
                    .as_ptr()
                    .add(self.pool.half_offset(self.pool_layer(layer), half) as usize)
            }
        };
        Some(match self.dtype {
            KvDType::F32 => f(CpuKv::F32(
                LayerRows {
                    ptr: at(Half::K).cast(),
                    rows,
                    d,
                    _region: PhantomData,
                },
                LayerRows {
                    ptr: at(Half::V).cast(),
                    rows,
                    d,
                    _region: PhantomData,
                },
            )),
            KvDType::F16 => f(CpuKv::F16(
                LayerRows {
                    ptr: at(Half::K).cast(),
                    rows,
                    d,
                    _region: PhantomData,
                },
                LayerRows {
                    ptr: at(Half::V).cast(),
                    rows,
                    d,
                    _region: PhantomData,
                },
            )),
        })
    }

    /// K and V of the positions whose head-0 rows are `head_rows`, each `(kv_heads, positions,
    /// head_dim)` in f32. `index` is [`KvCache::gather_index`] of those rows, which only the
    /// tensor storage reads; it is asked for only then.
    pub(crate) fn gather(
        &self,
        layer: usize,
        head_rows: &[u32],
        index: impl FnOnce() -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let shape = (self.num_kv_heads, head_rows.len(), self.head_dim);
        match &self.storage {
            Storage::Host(_) => {
                let stride = self.head_stride();
                let gathered = self
                    .with_cpu(layer, |kv| {
                        let take = |rows: &dyn Fn(usize) -> Vec<f32>| -> Vec<f32> {
                            let mut out = Vec::with_capacity(shape.0 * shape.1 * shape.2);
                            for h in 0..self.num_kv_heads {
                                for &r in head_rows {
                                    out.extend(rows(r as usize + h * stride));
                                }
                            }
                            out
                        };
                        match kv {
                            CpuKv::F32(k, v) => {
                                (take(&|i| k.row(i).to_vec()), take(&|i| v.row(i).to_vec()))
                            }
                            CpuKv::F16(k, v) => (
                                take(&|i| k.row(i).iter().map(|x| x.to_f32()).collect()),
                                take(&|i| v.row(i).iter().map(|x| x.to_f32()).collect()),
                            ),
                        }
                    })
                    .ok_or(Error::Internal("host kv storage without its region"))?;
                let device = Device::Cpu;
                Ok((
                    Tensor::from_vec(gathered.0, shape, &device)?,
                    Tensor::from_vec(gathered.1, shape, &device)?,
                ))
            }
            Storage::Tensors { k, v } => {
                let index = index()?;
                let rows = |store: &Tensor| -> Result<Tensor> {
                    Ok(store
                        .reshape(((), self.head_dim))?
                        .index_select(&index, 0)?
                        .reshape(shape)?
                        .to_dtype(candle_core::DType::F32)?)
                };
                Ok((rows(&k[layer])?, rows(&v[layer])?))
            }
        }
    }

    /// Exports one layer of blocks `blocks` (indices into `table`, a sequence's blocks in token
    /// order) of a sequence whose first `seq_len` positions hold KV.
    pub fn export(
        &self,
        layer: usize,
        table: &[BlockId],
        seq_len: usize,
        blocks: Range<usize>,
    ) -> Result<KvChunk> {
        let bs = self.block_size;
        if layer >= self.num_layers || blocks.start > blocks.end || blocks.end > table.len() {
            return Err(Error::KvImport(format!(
                "export of layer {layer} blocks {blocks:?} outside {} layers x {} blocks",
                self.num_layers,
                table.len()
            )));
        }
        let positions = (blocks.start * bs).min(seq_len)..(blocks.end * bs).min(seq_len);
        let tokens = positions.len();
        let mut data = Vec::with_capacity(self.layer_bytes(tokens));
        let runs = self.runs(table, positions.clone())?;
        match &self.storage {
            Storage::Host(region) => {
                let row_bytes = self.pool.row_bytes() as usize;
                for half in Half::BOTH {
                    let base = self.pool.half_offset(self.pool_layer(layer), half);
                    // (kv_heads, tokens, head_dim): heads outermost, as the wire format says.
                    for h in 0..self.num_kv_heads {
                        for &(slot, _, len) in &runs {
                            let at = base
                                + (storage_row(slot, h, self.num_kv_heads, bs) * row_bytes) as u64;
                            // SAFETY: rows of blocks this table holds; the engine thread does
                            // not write them while it exports.
                            let rows = unsafe { region.bytes(at, len * row_bytes) }
                                .ok_or(Error::Internal("kv export outside the pool"))?;
                            data.extend_from_slice(rows);
                        }
                    }
                }
            }
            Storage::Tensors { k, v } => {
                for store in [&k[layer], &v[layer]] {
                    let mut parts = Vec::new();
                    for &(slot, _, len) in &runs {
                        // (kv_heads, len, head_dim) of one block.
                        let block = store.get(slot / bs)?;
                        parts.push(block.narrow(1, slot % bs, len)?);
                    }
                    if parts.is_empty() {
                        continue;
                    }
                    // (kv_heads, tokens, head_dim): heads outermost, as the wire format says.
                    let joined = Tensor::cat(&parts, 1)?;
                    append_le_bytes(&joined, self.dtype, &mut data)?;
                }
            }
        }
        Ok(KvChunk {
            layer: layer as u32,
            first_block: blocks.start as u32,
            num_blocks: blocks.len() as u32,
            tokens: tokens as u32,
            data,
        })
    }

    /// Writes an exported chunk into a table whose sequence will hold `seq_len` positions.
    /// Checks every size before touching the cache: a chunk that does not fit changes nothing.
    pub fn import(&self, table: &BlockTable, seq_len: usize, chunk: &KvChunk) -> Result<()> {
        let blocks = table.blocks();
        let bs = self.block_size;
        let layer = chunk.layer as usize;
        let first = chunk.first_block as usize;
        let end = first + chunk.num_blocks as usize;
        if layer >= self.num_layers {
            return Err(Error::KvImport(format!(
                "layer {layer} outside {} layers",
                self.num_layers
            )));
        }
        if end > table.len() || end > seq_len.div_ceil(bs) {
            return Err(Error::KvImport(format!(
                "blocks {first}..{end} outside the {} reserved for {seq_len} tokens",
                table.len()
            )));
        }
        let positions = (first * bs).min(seq_len)..(end * bs).min(seq_len);
        if chunk.tokens as usize != positions.len() {
            return Err(Error::KvImport(format!(
                "chunk carries {} tokens, blocks {first}..{end} hold {}",
                chunk.tokens,
                positions.len()
            )));
        }
        let expected = self.layer_bytes(positions.len());
        if chunk.data.len() != expected {
            return Err(Error::KvImport(format!(
                "chunk carries {} bytes, expected {expected}",
                chunk.data.len()
            )));
        }
        let half_len = expected / 2;
        match &self.storage {
            Storage::Host(region) => {
                let row_bytes = self.pool.row_bytes() as usize;
                let runs = self.runs(blocks, positions)?;
                for (half, data) in [
                    (Half::K, &chunk.data[..half_len]),
                    (Half::V, &chunk.data[half_len..]),
                ] {
                    let base = self.pool.half_offset(self.pool_layer(layer), half);
                    let mut from = data.chunks_exact(row_bytes);
                    for h in 0..self.num_kv_heads {
                        for &(slot, _, len) in &runs {
                            let at = base
                                + (storage_row(slot, h, self.num_kv_heads, bs) * row_bytes) as u64;
                            // SAFETY: rows of blocks this table holds, written by the engine
                            // thread alone.
                            let rows = unsafe { region.bytes_mut(at, len * row_bytes) }
                                .ok_or(Error::Internal("kv import outside the pool"))?;
                            for row in rows.chunks_exact_mut(row_bytes) {
                                row.copy_from_slice(
                                    from.next().ok_or(Error::Internal("kv import rows"))?,
                                );
                            }
                        }
                    }
                }
                Ok(())
            }
            Storage::Tensors { k, .. } => {
                let shape = [self.num_kv_heads, positions.len(), self.head_dim];
                let device = k[layer].device();
                let kt = Tensor::from_raw_buffer(
                    &chunk.data[..half_len],
                    candle_dtype(self.dtype),
                    &shape,
                    device,
                )?;
                let vt = Tensor::from_raw_buffer(
                    &chunk.data[half_len..],
                    candle_dtype(self.dtype),
                    &shape,
                    device,
                )?;
                self.write(layer, table, positions.start, &kt, &vt)
            }
        }
    }
}

fn append_le_bytes(t: &Tensor, dtype: KvDType, out: &mut Vec<u8>) -> Result<()> {
    let flat = t.flatten_all()?;
    match dtype {
        KvDType::F32 => {
            for x in flat.to_vec1::<f32>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        KvDType::F16 => {
            for x in flat.to_vec1::<half::f16>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: u32, heads: u32, bs: u32, d: u32) -> PoolLayout {
        PoolLayout {
            layout: LayoutDescriptor {
                fingerprint: Fingerprint([0; 32]),
                dtype: KvDType::F32,
                block_size: bs,
                num_layers: 2,
                layers: 0..2,
                num_kv_heads: heads,
                kv_heads: 0..heads,
                head_dim: d,
            },
            num_blocks: blocks,
        }
    }

    fn values(region: &HostRegion, at: u64, n: usize) -> Vec<f32> {
        // SAFETY: the test owns the region.
        let bytes = unsafe { region.bytes(at, n * 4) }.expect("inside");
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn rows_land_in_their_blocks_head_by_head() {
        // 2 blocks of 3 slots, 2 heads, d = 2; 3 new rows: rows 0..2 to slots 4..6 (the end of
        // block 1), row 2 to slot 0 (another sequence, or the next block). Layer 1's V.
        let (heads, rows, d) = (2, 3, 2);
        let p = pool(2, 2, 3, 2);
        let region = HostRegion::private(p.region_bytes() as usize).expect("region");
        let src: Vec<f32> = (1..=(heads * rows * d) as u32).map(|x| x as f32).collect();
        let runs = [
            RowRun {
                slot: 4,
                row: 0,
                len: 2,
            },
            RowRun {
                slot: 0,
                row: 2,
                len: 1,
            },
        ];
        copy_rows(&region, &p, 1, Half::V, &src, &runs);
        let m = 0.0;
        #[rustfmt::skip]
        let want = vec![
            5.0, 6.0, m, m, m, m, // block 0, head 0: src row 2 | - | -
            11.0, 12.0, m, m, m, m, // block 0, head 1
            m, m, 1.0, 2.0, 3.0, 4.0, // block 1, head 0: - | src rows 0, 1
            m, m, 7.0, 8.0, 9.0, 10.0, // block 1, head 1
        ];
        let layer_half = p.layer_half_bytes() as usize / 4;
        assert_eq!(values(&region, p.half_offset(1, Half::V), layer_half), want);
        for other in [(0, Half::K), (0, Half::V), (1, Half::K)] {
            let untouched = values(&region, p.half_offset(other.0, other.1), layer_half);
            assert!(untouched.iter().all(|&x| x == 0.0), "{other:?} untouched");
        }
    }

    #[test]
    fn a_run_outside_the_pool_panics_before_writing() {
        let p = pool(2, 2, 3, 2);
        let region = HostRegion::private(p.region_bytes() as usize).expect("region");
        let src = vec![1.0f32; 2 * 3 * 2];
        for outside in [
            // Across the end of block 1.
            RowRun {
                slot: 5,
                row: 0,
                len: 2,
            },
            // Past the last block.
            RowRun {
                slot: 6,
                row: 0,
                len: 1,
            },
            // Past the last source row.
            RowRun {
                slot: 0,
                row: 2,
                len: 2,
            },
        ] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                copy_rows(&region, &p, 0, Half::K, &src, &[outside])
            }));
            assert!(r.is_err(), "{outside:?}");
        }
        let all = values(&region, 0, p.region_bytes() as usize / 4);
        assert!(
            all.iter().all(|&x| x == 0.0),
            "a refused run writes nothing"
        );
    }

    #[test]
    fn the_slice_path_for_other_devices_writes_what_the_host_copy_writes() -> Result<()> {
        let (blocks, heads, bs, rows, d) = (3, 2, 4, 5, 3);
        let src: Vec<f32> = (0..heads * rows * d).map(|x| x as f32 + 1.0).collect();
        let runs = [
            RowRun {
                slot: 6,
                row: 0,
                len: 2,
            },
            RowRun {
                slot: 1,
                row: 2,
                len: 3,
            },
        ];
        let p = pool(blocks as u32, heads as u32, bs as u32, d as u32);
        let region = HostRegion::private(p.region_bytes() as usize).expect("region");
        copy_rows(&region, &p, 0, Half::K, &src, &runs);
        let by_copy = values(&region, 0, p.layer_half_bytes() as usize / 4);
        let src = Tensor::from_vec(src, (heads, rows, d), &Device::Cpu)?;
        let by_slices = Tensor::zeros(
            (blocks, heads, bs, d),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        write_rows_by_slices(&by_slices, &src, &runs)?;
        assert_eq!(by_copy, by_slices.flatten_all()?.to_vec1::<f32>()?);
        assert!(
            by_copy.iter().any(|&x| x != 0.0),
            "the runs wrote something"
        );
        Ok(())
    }
}
