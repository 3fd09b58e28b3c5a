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
//! Invariants: a block is owned by at most one [`BlockTable`]; a table returns its blocks to the
//! pool exactly once, when it is dropped, whatever path (finish, cancel, failure) drops it.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor};

pub use baton_core::{BlockId, Fingerprint, KvChunk, LayoutDescriptor};

use crate::config::{Kernels, KvDType, ModelConfig, candle_dtype};
use crate::{Error, Result};

/// The free list. Shared (behind a mutex nobody holds for long) between the pool and the block
/// tables, so that dropping a table returns its blocks without going through the engine.
#[derive(Debug)]
struct FreeList {
    free: Vec<BlockId>,
    total: usize,
}

/// Hands out blocks. Cheap to clone; every clone is the same pool.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    inner: Arc<Mutex<FreeList>>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Popping from the end hands out low ids first, which keeps tests readable.
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        Self {
            inner: Arc::new(Mutex::new(FreeList {
                free,
                total: num_blocks,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeList> {
        // The critical sections only push and pop; a panic inside one cannot leave the list
        // half-updated, so a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn free_blocks(&self) -> usize {
        self.lock().free.len()
    }

    pub fn total_blocks(&self) -> usize {
        self.lock().total
    }

    /// An empty table drawing from this pool.
    pub fn new_table(&self) -> BlockTable {
        BlockTable {
            blocks: Vec::new(),
            allocator: self.clone(),
        }
    }

    fn take(&self, n: usize) -> Result<Vec<BlockId>> {
        let mut list = self.lock();
        if list.free.len() < n {
            return Err(Error::KvCacheFull {
                needed: n,
                free: list.free.len(),
            });
        }
        let at = list.free.len() - n;
        Ok(list.free.split_off(at))
    }

    fn give_back(&self, blocks: &mut Vec<BlockId>) {
        if blocks.is_empty() {
            return;
        }
        self.lock().free.append(blocks);
    }
}

/// The blocks one sequence owns, in token order. Dropping the table frees them.
#[derive(Debug)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    allocator: BlockAllocator,
}

impl BlockTable {
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Grows the table to hold `tokens` tokens; all or nothing.
    pub fn ensure_capacity(&mut self, tokens: usize, block_size: usize) -> Result<()> {
        let needed = tokens.div_ceil(block_size);
        if needed > self.blocks.len() {
            let mut more = self.allocator.take(needed - self.blocks.len())?;
            self.blocks.append(&mut more);
        }
        Ok(())
    }

    /// Returns every block to the pool now, leaving the table empty.
    pub fn clear(&mut self) {
        self.allocator.give_back(&mut self.blocks);
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
    }
}

/// `len` consecutive rows of a step's new K and V, from `row`, go to cache slots from `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowRun {
    pub slot: usize,
    pub row: usize,
    pub len: usize,
}

/// One layer's K and V storage in CPU memory, read in place by decode attention.
pub(crate) enum CpuKv<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [half::f16], &'a [half::f16]),
}

/// Row of a layer's storage, seen as `(rows, head_dim)`, that holds kv head `head` of cache slot
/// `slot`: storage is `(blocks, heads, block_size, head_dim)`.
fn storage_row(slot: usize, head: usize, heads: usize, block_size: usize) -> usize {
    (slot / block_size * heads + head) * block_size + slot % block_size
}

/// The in-place copy behind [`KvCache::write_rows`] with baton's kernels: `(kv_heads, rows,
/// head_dim)` source rows into a `(num_blocks, kv_heads, block_size, head_dim)` cache tensor of
/// the same dtype.
struct WriteRows<'a>(&'a [RowRun]);

impl InplaceOp2 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "baton-kv-write"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (blocks, heads, block_size, d) = dst_l.shape().dims4()?;
        let (src_heads, rows, src_d) = src_l.shape().dims3()?;
        if (src_heads, src_d) != (heads, d) {
            candle_core::bail!("kv write: rows {src_l:?} do not fit cache {dst_l:?}");
        }
        let (Some((d0, d1)), Some((s0, s1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("kv write: cache {dst_l:?} or rows {src_l:?} not contiguous");
        };
        let shape = CopyShape {
            blocks,
            heads,
            block_size,
            rows,
            d,
        };
        match (dst, src) {
            (CpuStorage::F32(dst), CpuStorage::F32(src)) => {
                copy_rows(&mut dst[d0..d1], &src[s0..s1], shape, self.0)
            }
            (CpuStorage::F16(dst), CpuStorage::F16(src)) => {
                copy_rows(&mut dst[d0..d1], &src[s0..s1], shape, self.0)
            }
            (CpuStorage::BF16(dst), CpuStorage::BF16(src)) => {
                copy_rows(&mut dst[d0..d1], &src[s0..s1], shape, self.0)
            }
            (dst, src) => candle_core::bail!(
                "kv write: rows of {:?} into a {:?} cache",
                src.dtype(),
                dst.dtype()
            ),
        }
    }
}

/// Dimensions of one [`copy_rows`]: the cache tensor is `(blocks, heads, block_size, d)`, the
/// new rows `(heads, rows, d)`.
#[derive(Clone, Copy)]
struct CopyShape {
    blocks: usize,
    heads: usize,
    block_size: usize,
    rows: usize,
    d: usize,
}

/// Copies each run's rows, head by head, from `src` into the cache storage `dst`; a run outside
/// either tensor or across a block's end is an error, checked before it is copied.
fn copy_rows<T: Copy>(
    dst: &mut [T],
    src: &[T],
    CopyShape {
        blocks,
        heads,
        block_size: bs,
        rows,
        d,
    }: CopyShape,
    runs: &[RowRun],
) -> candle_core::Result<()> {
    for run in runs {
        let (block, off) = (run.slot / bs, run.slot % bs);
        if block >= blocks || off + run.len > bs || run.row + run.len > rows {
            candle_core::bail!(
                "kv write: {run:?} outside {rows} rows or one of {blocks} blocks of {bs} slots"
            );
        }
        for h in 0..heads {
            dst[storage_row(run.slot, h, heads, bs) * d..][..run.len * d]
                .copy_from_slice(&src[(h * rows + run.row) * d..][..run.len * d]);
        }
    }
    Ok(())
}

/// [`WriteRows`] off the CPU: one `slice_set` per run and head into `store`, `(blocks, heads,
/// block_size, d)`, from `rows`, `(heads, rows, d)`. Runs must lie inside one block each, as
/// [`KvCache::row_runs`] makes them.
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

/// The KV tensors of every layer, and the pool that hands out their blocks.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    allocator: BlockAllocator,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: KvDType,
    /// Whether new rows are written by baton's in-place CPU copy or by candle's slice ops.
    kernels: Kernels,
}

impl KvCache {
    /// A pool of as many blocks as fit in `budget_bytes`.
    pub fn new(
        config: &ModelConfig,
        block_size: usize,
        dtype: KvDType,
        budget_bytes: usize,
        kernels: Kernels,
        device: &Device,
    ) -> Result<Self> {
        let block_bytes = config.num_layers * block_size * config.kv_bytes_per_token_layer(dtype);
        let num_blocks = budget_bytes / block_bytes;
        if num_blocks == 0 {
            return Err(Error::invalid(
                "kv_cache_bytes",
                format!("budget {budget_bytes} is below one block ({block_bytes} bytes)"),
            ));
        }
        // Rows of one layer's storage seen as `(rows, head_dim)` are addressed by u32.
        if num_blocks
            .checked_mul(block_size * config.num_kv_heads)
            .is_none_or(|rows| rows > u32::MAX as usize)
        {
            return Err(Error::invalid(
                "kv_cache_bytes",
                format!("budget {budget_bytes} holds {num_blocks} blocks, more than 2^32 rows"),
            ));
        }
        let shape = (num_blocks, config.num_kv_heads, block_size, config.head_dim);
        let mut k = Vec::with_capacity(config.num_layers);
        let mut v = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            k.push(Tensor::zeros(shape, candle_dtype(dtype), device)?);
            v.push(Tensor::zeros(shape, candle_dtype(dtype), device)?);
        }
        Ok(Self {
            k,
            v,
            allocator: BlockAllocator::new(num_blocks),
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            dtype,
            kernels,
        })
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_layers(&self) -> usize {
        self.k.len()
    }

    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Bytes of one layer's K plus V for `tokens` tokens.
    pub fn layer_bytes(&self, tokens: usize) -> usize {
        2 * tokens * self.num_kv_heads * self.head_dim * self.dtype.size()
    }

    /// Contiguous runs of slots covering token positions `positions` of a table:
    /// `(first slot, first position, length)`, at most one run per block.
    fn runs(
        &self,
        table: &BlockTable,
        positions: Range<usize>,
    ) -> Result<Vec<(usize, usize, usize)>> {
        let bs = self.block_size;
        if positions.end.div_ceil(bs) > table.len() {
            return Err(Error::KvImport(format!(
                "positions up to {} exceed the {} blocks reserved",
                positions.end,
                table.len()
            )));
        }
        let mut runs = Vec::new();
        let mut p = positions.start;
        while p < positions.end {
            let block = table.blocks()[p / bs].0 as usize;
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
        for (slot, pos, len) in self.runs(table, positions)? {
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
    /// one in-place copy per tensor with baton's kernels, whatever the number of sequences and
    /// blocks; candle's slice ops, one per run, otherwise.
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
        for (store, rows) in [(&self.k[layer], &k), (&self.v[layer], &v)] {
            // The copy has no GPU form, so a CPU store is checked too: `KvCache::new` is public
            // and takes the kernels and the device separately.
            if store.device().is_cpu() && self.kernels == Kernels::Baton {
                store.inplace_op2(rows, &WriteRows(runs))?;
            } else {
                write_rows_by_slices(store, rows, runs)?;
            }
        }
        Ok(())
    }

    /// For every position `0..len` of a table, the row holding kv head 0 of that position in a
    /// layer's storage seen as `(rows, head_dim)`; head `h` is [`KvCache::head_stride`]` * h` rows
    /// further.
    pub(crate) fn head_rows(&self, table: &BlockTable, len: usize) -> Result<Vec<u32>> {
        let (bs, heads) = (self.block_size, self.num_kv_heads);
        Ok(self
            .runs(table, 0..len)?
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

    /// Runs `f` on layer `layer`'s K and V storage, each `(num_blocks, kv_heads, block_size,
    /// head_dim)` and addressed as rows by [`KvCache::head_rows`], when the cache lives in CPU
    /// memory as f32 or f16; `None` otherwise.
    pub(crate) fn with_cpu<R>(&self, layer: usize, f: impl FnOnce(CpuKv<'_>) -> R) -> Option<R> {
        use candle_core::Storage;
        let (ks, kl) = self.k[layer].storage_and_layout();
        let (vs, vl) = self.v[layer].storage_and_layout();
        let n = kl.shape().elem_count();
        let (k0, v0) = (kl.start_offset(), vl.start_offset());
        match (&*ks, &*vs) {
            (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
                Some(f(CpuKv::F32(&k[k0..k0 + n], &v[v0..v0 + n])))
            }
            (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
                Some(f(CpuKv::F16(&k[k0..k0 + n], &v[v0..v0 + n])))
            }
            _ => None,
        }
    }

    /// K and V of the rows `index` ([`KvCache::gather_index`]) names, each `(kv_heads, positions,
    /// head_dim)` in f32.
    pub(crate) fn gather(&self, layer: usize, index: &Tensor) -> Result<(Tensor, Tensor)> {
        let shape = (
            self.num_kv_heads,
            index.dim(0)? / self.num_kv_heads,
            self.head_dim,
        );
        let rows = |store: &Tensor| -> Result<Tensor> {
            Ok(store
                .reshape(((), self.head_dim))?
                .index_select(index, 0)?
                .reshape(shape)?
                .to_dtype(candle_core::DType::F32)?)
        };
        Ok((rows(&self.k[layer])?, rows(&self.v[layer])?))
    }

    /// Exports one layer of blocks `blocks` (indices into the table) of a sequence whose first
    /// `seq_len` positions hold KV.
    pub fn export(
        &self,
        layer: usize,
        table: &BlockTable,
        seq_len: usize,
        blocks: Range<usize>,
    ) -> Result<KvChunk> {
        let bs = self.block_size;
        if layer >= self.k.len() || blocks.start > blocks.end || blocks.end > table.len() {
            return Err(Error::KvImport(format!(
                "export of layer {layer} blocks {blocks:?} outside {} layers x {} blocks",
                self.k.len(),
                table.len()
            )));
        }
        let positions = (blocks.start * bs).min(seq_len)..(blocks.end * bs).min(seq_len);
        let tokens = positions.len();
        let mut data = Vec::with_capacity(self.layer_bytes(tokens));
        for store in [&self.k[layer], &self.v[layer]] {
            let mut parts = Vec::new();
            for (slot, _, len) in self.runs(table, positions.clone())? {
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
        let bs = self.block_size;
        let layer = chunk.layer as usize;
        let first = chunk.first_block as usize;
        let end = first + chunk.num_blocks as usize;
        if layer >= self.k.len() {
            return Err(Error::KvImport(format!(
                "layer {layer} outside {} layers",
                self.k.len()
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
        let half = expected / 2;
        let shape = [self.num_kv_heads, positions.len(), self.head_dim];
        let device = self.k[layer].device();
        let k = Tensor::from_raw_buffer(
            &chunk.data[..half],
            candle_dtype(self.dtype),
            &shape,
            device,
        )?;
        let v = Tensor::from_raw_buffer(
            &chunk.data[half..],
            candle_dtype(self.dtype),
            &shape,
            device,
        )?;
        self.write(layer, table, positions.start, &k, &v)
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
    use proptest::prelude::*;

    #[test]
    fn dropping_a_table_returns_its_blocks() {
        let pool = BlockAllocator::new(8);
        let mut t = pool.new_table();
        t.ensure_capacity(33, 16).expect("room for 3 blocks");
        assert_eq!(t.len(), 3);
        assert_eq!(pool.free_blocks(), 5);
        drop(t);
        assert_eq!(pool.free_blocks(), 8);
    }

    #[test]
    fn allocation_is_all_or_nothing() {
        let pool = BlockAllocator::new(4);
        let mut a = pool.new_table();
        a.ensure_capacity(48, 16).expect("3 blocks fit");
        let mut b = pool.new_table();
        let err = b.ensure_capacity(32, 16).expect_err("2 blocks do not fit");
        assert!(matches!(err, Error::KvCacheFull { needed: 2, free: 1 }));
        assert_eq!(b.len(), 0);
        assert_eq!(pool.free_blocks(), 1);
    }

    #[test]
    fn rows_land_in_their_blocks_head_by_head() {
        // 2 blocks of 3 slots, 2 heads, d = 2; 3 new rows: rows 0..2 to slots 4..6 (the end of
        // block 1), row 2 to slot 0 (another sequence, or the next block).
        let (blocks, heads, bs, rows, d) = (2, 2, 3, 3, 2);
        let src: Vec<u32> = (0..(heads * rows * d) as u32).collect();
        let mut dst = vec![u32::MAX; blocks * heads * bs * d];
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
        let shape = CopyShape {
            blocks,
            heads,
            block_size: bs,
            rows,
            d,
        };
        copy_rows(&mut dst, &src, shape, &runs).expect("runs fit");
        let m = u32::MAX;
        #[rustfmt::skip]
        let want = vec![
            4, 5, m, m, m, m, // block 0, head 0: src row 2 | - | -
            10, 11, m, m, m, m, // block 0, head 1
            m, m, 0, 1, 2, 3, // block 1, head 0: - | src rows 0, 1
            m, m, 6, 7, 8, 9, // block 1, head 1
        ];
        assert_eq!(dst, want);
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
            assert!(copy_rows(&mut dst, &src, shape, &[outside]).is_err());
        }
        assert_eq!(dst, want, "a refused run writes nothing");
    }

    #[test]
    fn the_slice_path_for_other_devices_writes_what_the_cpu_copy_writes() -> Result<()> {
        let (blocks, heads, bs, rows, d) = (3, 2, 4, 5, 3);
        let src: Vec<f32> = (0..heads * rows * d).map(|x| x as f32).collect();
        let src = Tensor::from_vec(src, (heads, rows, d), &Device::Cpu)?;
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
        let by_copy = Tensor::zeros(
            (blocks, heads, bs, d),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        by_copy.inplace_op2(&src, &WriteRows(&runs))?;
        let by_slices = Tensor::zeros(
            (blocks, heads, bs, d),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        write_rows_by_slices(&by_slices, &src, &runs)?;
        let (a, b) = (
            by_copy.flatten_all()?.to_vec1::<f32>()?,
            by_slices.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != 0.0), "the runs wrote something");
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grow(usize, usize),
        Clear(usize),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6usize, 0..200usize).prop_map(|(t, n)| Op::Grow(t, n)),
            (0..6usize).prop_map(Op::Clear),
            (0..6usize).prop_map(Op::Drop),
        ]
    }

    proptest! {
        /// No block is lost or handed out twice, whatever mix of growth, clearing and dropping.
        #[test]
        fn pool_accounting_holds(ops in proptest::collection::vec(op(), 1..80)) {
            let pool = BlockAllocator::new(32);
            let mut tables: Vec<Option<BlockTable>> = (0..6).map(|_| None).collect();
            for op in ops {
                match op {
                    Op::Grow(i, n) => {
                        let t = tables[i].get_or_insert_with(|| pool.new_table());
                        let before = t.len();
                        if t.ensure_capacity(n, 16).is_err() {
                            prop_assert_eq!(t.len(), before);
                        }
                    }
                    Op::Clear(i) => if let Some(t) = tables[i].as_mut() { t.clear() },
                    Op::Drop(i) => tables[i] = None,
                }
                let mut owned: Vec<BlockId> =
                    tables.iter().flatten().flat_map(|t| t.blocks().to_vec()).collect();
                let n_owned = owned.len();
                owned.sort();
                owned.dedup();
                prop_assert_eq!(owned.len(), n_owned, "a block is owned twice");
                prop_assert_eq!(n_owned + pool.free_blocks(), 32);
            }
            tables.clear();
            prop_assert_eq!(pool.free_blocks(), 32);
        }
    }
}
