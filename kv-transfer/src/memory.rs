//! Registered memory: the KV pool as bytes a transport may address, and the geometry that
//! turns (layer, K or V, block, kv head, slot) into an offset in it.
//!
//! ```text
//! engine KV pool = one HostRegion:  [layer 0 K][layer 0 V][layer 1 K] ... (layers this shard holds)
//! one layer's K (or V):             (num_blocks, kv_heads, block_size, head_dim), row-major
//! ```
//!
//! A block of one layer's K is one contiguous piece, and within it each kv head's rows are
//! contiguous, so a tensor-parallel head range of a full block is one contiguous copy.
//!
//! Aliasing contract: a region is shared between the engine thread, transport tasks and, for a
//! region another process maps (`HostRegion::shared`), that process. No code holds a reference
//! over bytes it does not own at that moment: the engine reads and writes only the rows of
//! blocks its sequences hold, and a transport writes only blocks reserved for the handoff it
//! serves (checked against the handoff's expectation before any byte is written) and reads only
//! blocks pinned for the handoff it sends. Block ownership is what keeps the byte ranges apart;
//! [`HostRegion::bytes`] and [`HostRegion::bytes_mut`] are `unsafe` because the compiler cannot
//! see it.

use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use baton_core::{BlockId, LayoutDescriptor};

/// Memory baton allocated (or mapped from a peer on this host) for a KV pool.
pub struct HostRegion {
    ptr: NonNull<u8>,
    len: usize,
    /// The memfd behind a region another process may map; `None` for private memory.
    fd: Option<OwnedFd>,
}

// SAFETY: the region is plain memory; who may touch which bytes is the aliasing contract above,
// upheld by the callers of the unsafe accessors, not by thread affinity.
unsafe impl Send for HostRegion {}
// SAFETY: as for Send: shared access goes through the unsafe accessors only.
unsafe impl Sync for HostRegion {}

impl std::fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegion")
            .field("len", &self.len)
            .field("shared", &self.fd.is_some())
            .finish()
    }
}

impl HostRegion {
    /// `len` zeroed bytes of private memory, with transparent huge pages asked for (the engine's
    /// attention reads the pool all over; fewer TLB misses where the kernel grants them).
    pub fn private(len: usize) -> io::Result<Self> {
        let len = len.max(1);
        // SAFETY: an anonymous private mapping of a fresh range; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: advice on the range just mapped; failure only means no huge pages.
        unsafe {
            libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)?,
            len,
            fd: None,
        })
    }

    /// `len` zeroed bytes in a memfd named `name`, which another process on this host can map
    /// ([`HostRegion::map`]) after receiving the descriptor ([`HostRegion::fd`]).
    pub fn shared(len: usize, name: &str) -> io::Result<Self> {
        let len = len.max(1);
        let cname = std::ffi::CString::new(name.replace('\0', "_"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
        // SAFETY: ftruncate on the descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let ptr = map_shared(fd.as_fd(), len)?;
        Ok(Self {
            ptr,
            len,
            fd: Some(fd),
        })
    }

    /// Maps a region another process shared with us. Refuses a descriptor whose file is
    /// shorter than `len` (touching the missing pages would raise SIGBUS).
    pub fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        // SAFETY: fstat fills a plain struct for a descriptor we own.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if len == 0 || (stat.st_size as u64) < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "shared region of {} bytes, expected {len}",
                    stat.st_size.max(0)
                ),
            ));
        }
        let ptr = map_shared(fd.as_fd(), len)?;
        Ok(Self {
            ptr,
            len,
            fd: Some(fd),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd another process maps, for a shared region.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// The region's first byte. Dereferencing it is subject to the aliasing contract.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Whether `offset..offset + len` lies inside the region.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }

    /// The bytes `offset..offset + len`; `None` outside the region.
    ///
    /// # Safety
    /// Nobody writes these bytes while the returned reference lives (they belong to blocks the
    /// caller holds pinned, or reads itself).
    pub unsafe fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        if !self.contains(offset, len as u64) {
            return None;
        }
        // SAFETY: inside the mapping (checked); exclusivity is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts(self.as_ptr().add(offset as usize), len) })
    }

    /// The bytes `offset..offset + len`, to write; `None` outside the region.
    ///
    /// # Safety
    /// Nobody else reads or writes these bytes while the returned reference lives (they belong
    /// to blocks the caller owns: reserved for its handoff, or its own sequence's rows).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: u64, len: usize) -> Option<&mut [u8]> {
        if !self.contains(offset, len as u64) {
            return None;
        }
        // SAFETY: inside the mapping (checked); exclusivity is the caller's promise.
        Some(unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(offset as usize), len) })
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped at construction; nothing borrows it past
        // the region's life (every accessor borrows `self`).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn map_shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a shared mapping of a file at least `len` long (the callers sized or checked
    // it); the result is checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)
}

/// K or V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Half {
    K,
    V,
}

impl Half {
    pub const BOTH: [Half; 2] = [Half::K, Half::V];

    fn index(self) -> u64 {
        match self {
            Half::K => 0,
            Half::V => 1,
        }
    }
}

/// Where every row of a KV pool lies in its region: the shard it holds and its block count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolLayout {
    /// The model part this pool holds (its layer and kv-head ranges).
    pub layout: LayoutDescriptor,
    pub num_blocks: u32,
}

impl PoolLayout {
    /// Bytes of one row: one token of one kv head.
    pub fn row_bytes(&self) -> u64 {
        u64::from(self.layout.head_dim) * self.layout.dtype.size() as u64
    }

    /// Kv heads this pool holds.
    pub fn heads(&self) -> u32 {
        self.layout.kv_heads.len() as u32
    }

    /// Layers this pool holds.
    pub fn layers(&self) -> u32 {
        self.layout.layers.len() as u32
    }

    /// Bytes of one block of one layer's K (or V).
    pub fn block_half_bytes(&self) -> u64 {
        u64::from(self.heads()) * u64::from(self.layout.block_size) * self.row_bytes()
    }

    /// Bytes of one layer's K (or V) storage.
    pub fn layer_half_bytes(&self) -> u64 {
        u64::from(self.num_blocks) * self.block_half_bytes()
    }

    /// Bytes of the whole region.
    pub fn region_bytes(&self) -> u64 {
        u64::from(self.layers()) * 2 * self.layer_half_bytes()
    }

    /// Where a layer's K or V storage starts; `layer` is a model layer index this pool holds.
    pub fn half_offset(&self, layer: u32, half: Half) -> u64 {
        let l = u64::from(layer - self.layout.layers.start);
        (l * 2 + half.index()) * self.layer_half_bytes()
    }

    /// Where the row of (`layer`, `half`, `block`, kv `head`, `slot`) starts; `layer` and
    /// `head` are model indices this pool holds, `slot` a token slot of the block.
    pub fn offset(&self, layer: u32, half: Half, block: BlockId, head: u32, slot: u32) -> u64 {
        let h = u64::from(head - self.layout.kv_heads.start);
        let bs = u64::from(self.layout.block_size);
        self.half_offset(layer, half)
            + u64::from(block.0) * self.block_half_bytes()
            + (h * bs + u64::from(slot)) * self.row_bytes()
    }
}

/// A sequence's blocks in one pool: `blocks[i]` holds token positions `i * block_size ..`.
#[derive(Debug, Clone, Copy)]
pub struct SeqBlocks<'a> {
    pub pool: &'a PoolLayout,
    pub blocks: &'a [BlockId],
}

/// One contiguous copy from a source region to a destination region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteCopy {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

impl ByteCopy {
    pub fn src_range(&self) -> Range<u64> {
        self.src..self.src + self.len
    }

    pub fn dst_range(&self) -> Range<u64> {
        self.dst..self.dst + self.len
    }
}

/// Appends `c`, merged into the previous copy when it continues it on both sides.
fn push_merged(out: &mut Vec<ByteCopy>, c: ByteCopy) {
    if let Some(last) = out.last_mut()
        && last.src + last.len == c.src
        && last.dst + last.len == c.dst
    {
        last.len += c.len;
        return;
    }
    out.push(c);
}

/// The byte copies that move one layer of the (layers x kv heads x blocks) rectangle `layers`,
/// `heads`, `blocks` (model layer and kv-head indices, sequence block indices) of a sequence of
/// `tokens` tokens from `src` to `dst`, appended to `out` with contiguous runs merged. Only
/// filled slots travel: a partly filled last block moves its filled rows head by head.
///
/// The caller checked that both pools hold the rectangle (the transfer plan's job) and that
/// both block lists cover `blocks`; a violation panics, as it is this process's bug.
pub fn layer_copies(
    layer: u32,
    heads: &Range<u32>,
    blocks: &Range<u32>,
    tokens: u32,
    src: SeqBlocks<'_>,
    dst: SeqBlocks<'_>,
    out: &mut Vec<ByteCopy>,
) {
    let bs = src.pool.layout.block_size;
    debug_assert_eq!(bs, dst.pool.layout.block_size);
    let row = src.pool.row_bytes();
    for half in Half::BOTH {
        for i in blocks.clone() {
            let first = i * bs;
            if first >= tokens {
                break;
            }
            let filled = (tokens - first).min(bs);
            let (sb, db) = (src.blocks[i as usize], dst.blocks[i as usize]);
            if filled == bs {
                // A full block: the head range is one contiguous piece on both sides.
                push_merged(
                    out,
                    ByteCopy {
                        src: src.pool.offset(layer, half, sb, heads.start, 0),
                        dst: dst.pool.offset(layer, half, db, heads.start, 0),
                        len: u64::from(heads.end - heads.start) * u64::from(bs) * row,
                    },
                );
            } else {
                for h in heads.clone() {
                    push_merged(
                        out,
                        ByteCopy {
                            src: src.pool.offset(layer, half, sb, h, 0),
                            dst: dst.pool.offset(layer, half, db, h, 0),
                            len: u64::from(filled) * row,
                        },
                    );
                }
            }
        }
    }
}

/// The destination byte ranges of [`layer_copies`] for the rectangle a destination expects,
/// merged: what a receiver admits writes into, and must see covered before the layer counts as
/// landed.
pub fn expected_ranges(
    layer: u32,
    heads: &Range<u32>,
    blocks: &Range<u32>,
    tokens: u32,
    dst: SeqBlocks<'_>,
) -> Vec<Range<u64>> {
    let mut copies = Vec::new();
    layer_copies(layer, heads, blocks, tokens, dst, dst, &mut copies);
    let mut ranges: Vec<Range<u64>> = copies.iter().map(ByteCopy::dst_range).collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{Fingerprint, KvDType};
    use proptest::prelude::*;

    fn layout(layers: Range<u32>, heads: Range<u32>) -> LayoutDescriptor {
        LayoutDescriptor {
            fingerprint: Fingerprint([1; 32]),
            dtype: KvDType::F16,
            block_size: 4,
            num_layers: 3,
            layers,
            num_kv_heads: 4,
            kv_heads: heads,
            head_dim: 2,
        }
    }

    #[test]
    fn offsets_follow_the_engines_storage_order() {
        let pool = PoolLayout {
            layout: layout(1..3, 2..4),
            num_blocks: 5,
        };
        assert_eq!(pool.row_bytes(), 4);
        assert_eq!(pool.block_half_bytes(), 2 * 4 * 4);
        assert_eq!(pool.layer_half_bytes(), 5 * 32);
        assert_eq!(pool.region_bytes(), 2 * 2 * 160);
        // Layer 2 is the pool's second: past layer 1's K and V.
        assert_eq!(pool.half_offset(2, Half::K), 2 * 160);
        assert_eq!(pool.half_offset(2, Half::V), 3 * 160);
        // Block 3, head 3 (the pool's second), slot 1.
        assert_eq!(
            pool.offset(2, Half::V, BlockId(3), 3, 1),
            3 * 160 + 3 * 32 + (4 + 1) * 4
        );
    }

    #[test]
    fn regions_are_zeroed_bounded_and_shareable() -> io::Result<()> {
        let private = HostRegion::private(4096)?;
        assert!(private.fd().is_none());
        assert!(private.contains(4000, 96) && !private.contains(4000, 97));
        assert!(!private.contains(u64::MAX, 2), "no overflow");
        // SAFETY: nobody else uses this region.
        unsafe {
            assert!(
                private
                    .bytes(0, 4096)
                    .is_some_and(|b| b.iter().all(|&x| x == 0))
            );
            assert!(private.bytes(1, 4096).is_none());
        }

        let a = HostRegion::shared(8192, "baton-test")?;
        let fd = a.fd().expect("shared").try_clone_to_owned()?;
        let b = HostRegion::map(fd, 8192)?;
        // SAFETY: this test is the only user of both mappings, one at a time.
        unsafe {
            a.bytes_mut(100, 3).expect("inside").copy_from_slice(b"kv!");
            assert_eq!(b.bytes(100, 3), Some(&b"kv!"[..]));
        }
        let short = a.fd().expect("shared").try_clone_to_owned()?;
        assert!(
            HostRegion::map(short, 8193).is_err(),
            "a short file is refused"
        );
        Ok(())
    }

    /// A label for the row of (layer, half, model head, token position).
    fn label(layer: u32, half: Half, head: u32, pos: u32) -> u8 {
        (layer * 131 + half.index() as u32 * 61 + head * 17 + pos * 7 + 1) as u8
    }

    /// A pool whose rows at the sequence's positions carry their labels.
    fn filled(pool: &PoolLayout, blocks: &[BlockId], tokens: u32) -> Vec<u8> {
        let mut mem = vec![0u8; pool.region_bytes() as usize];
        let bs = pool.layout.block_size;
        for layer in pool.layout.layers.clone() {
            for half in Half::BOTH {
                for head in pool.layout.kv_heads.clone() {
                    for pos in 0..tokens {
                        let o =
                            pool.offset(layer, half, blocks[(pos / bs) as usize], head, pos % bs);
                        let row = &mut mem[o as usize..(o + pool.row_bytes()) as usize];
                        row.fill(label(layer, half, head, pos));
                    }
                }
            }
        }
        mem
    }

    fn distinct_blocks(n: usize, pool_blocks: u32, seed: u64) -> Vec<BlockId> {
        let mut ids: Vec<u32> = (0..pool_blocks).collect();
        // A seeded shuffle: scattered blocks, with runs now and then.
        let mut s = seed | 1;
        for i in (1..ids.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ids.swap(i, (s % (i as u64 + 1)) as usize);
        }
        if seed.is_multiple_of(3) {
            ids.sort();
        }
        ids.into_iter().take(n).map(BlockId).collect()
    }

    proptest! {
        /// Every filled row of the rectangle lands at its place in the destination, with its
        /// own bytes, and nothing else is written; the expected ranges are exactly what landed.
        #[test]
        fn layer_copies_move_exactly_the_rectangles_rows(
            tokens in 1u32..30,
            src_heads in 0usize..3,
            dst_heads in 0usize..3,
            seed in any::<u64>(),
        ) {
            let splits = [0..4, 1..3, 2..4];
            let (sh, dh) = (splits[src_heads].clone(), splits[dst_heads].clone());
            let heads = sh.start.max(dh.start)..sh.end.min(dh.end);
            let src = PoolLayout { layout: layout(0..3, sh), num_blocks: 9 };
            let dst = PoolLayout { layout: layout(1..3, dh), num_blocks: 11 };
            let n = tokens.div_ceil(4) as usize;
            let sb = distinct_blocks(n, 9, seed);
            let db = distinct_blocks(n, 11, seed.rotate_left(17));
            let from = filled(&src, &sb, tokens);
            let mut to = vec![0u8; dst.region_bytes() as usize];
            let blocks = 0..n as u32;
            for layer in 1..3 {
                let mut copies = Vec::new();
                layer_copies(layer, &heads, &blocks, tokens,
                    SeqBlocks { pool: &src, blocks: &sb }, SeqBlocks { pool: &dst, blocks: &db },
                    &mut copies);
                let landed: u64 = copies.iter().map(|c| c.len).sum();
                prop_assert_eq!(landed, 2 * u64::from(tokens) * heads.len() as u64 * dst.row_bytes());
                for c in &copies {
                    to[c.dst as usize..(c.dst + c.len) as usize]
                        .copy_from_slice(&from[c.src as usize..(c.src + c.len) as usize]);
                }
                let expected = expected_ranges(layer, &heads, &blocks, tokens,
                    SeqBlocks { pool: &dst, blocks: &db });
                let covered: u64 = expected.iter().map(|r| r.end - r.start).sum();
                prop_assert_eq!(covered, landed);
                for c in &copies {
                    prop_assert!(expected.iter().any(|r| r.start <= c.dst && c.dst + c.len <= r.end));
                }
            }
            // Brute force: every row of the destination pool.
            for layer in 1..3 {
                for half in Half::BOTH {
                    for head in dst.layout.kv_heads.clone() {
                        for b in 0..11u32 {
                            for slot in 0..4 {
                                let o = dst.offset(layer, half, BlockId(b), head, slot) as usize;
                                let got = to[o];
                                let seq_index = db.iter().position(|x| x.0 == b);
                                let want = match seq_index {
                                    Some(i) if (i as u32) * 4 + slot < tokens && heads.contains(&head) =>
                                        label(layer, half, head, i as u32 * 4 + slot),
                                    _ => 0,
                                };
                                prop_assert_eq!(got, want, "layer {} {:?} head {} block {} slot {}", layer, half, head, b, slot);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn contiguous_blocks_merge_into_one_copy_per_half() {
        let pool = PoolLayout {
            layout: layout(0..3, 0..4),
            num_blocks: 8,
        };
        let blocks: Vec<BlockId> = (2..6).map(BlockId).collect();
        let mut copies = Vec::new();
        let seq = SeqBlocks {
            pool: &pool,
            blocks: &blocks,
        };
        layer_copies(1, &(0..4), &(0..4), 16, seq, seq, &mut copies);
        assert_eq!(
            copies.len(),
            2,
            "K and V, four full blocks each: {copies:?}"
        );
        assert_eq!(copies[0].len, 4 * pool.block_half_bytes());
    }
}
