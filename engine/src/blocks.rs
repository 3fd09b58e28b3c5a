//! The KV block pool: which blocks are free, which tables hold which blocks, and the prefix
//! cache's index of named blocks that outlive the sequences that computed them.
//!
//! sequence --take / acquire_cached--> [pool: free | held (refs > 0) | idle (named, refs 0)]
//!          <--drop BlockTable---------
//!
//! A full block whose KV is final may be *named* ([`BlockHash`]): the index then finds it for a
//! later sequence with the same prefix, which holds it alongside the first (a reference count per
//! block). A named block nobody holds is *idle*: still cached, and evicted, least recently
//! released first, only when a table needs a block and none is free. Within one release the
//! sequence's later blocks count as older, so eviction eats a prefix from its tail and what is
//! left stays usable.
//!
//! Invariants: every block is in exactly one of free, held or idle; a held block is never
//! evicted or handed out again; only full blocks whose KV nobody writes any more are named (the
//! engine names them), so a shared block is read-only; one block per name.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use baton_core::{BlockHash, BlockId, KvEvent};

use crate::{Error, Result};

/// How a named block's KV was computed, as far as numerics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSource {
    /// By prefill steps, here or on a prefill worker it was imported from: the same bits a run
    /// without the cache computes for those tokens, whatever prompt it was part of (prefill
    /// attention spans a context padded to the chunk grid, `SeqInput::attend_to`).
    Prefill,
    /// With some token's KV from a decode step (decode weights and the paged decode kernel):
    /// close to, not bit-identical with, what a prefill of the same tokens computes.
    Decode,
}

#[derive(Debug, Clone, Copy)]
struct Name {
    hash: BlockHash,
    source: KvSource,
}

/// Counters and gauges of the pool, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks a table could take now: free plus idle.
    pub available: usize,
    /// Named blocks (held or idle): what the prefix cache can find.
    pub named: usize,
    /// Named blocks nobody holds.
    pub idle: usize,
    /// Idle blocks reclaimed for new KV since the pool was made.
    pub evictions: u64,
}

#[derive(Debug)]
struct PoolState {
    /// Neither held nor named: handed out first.
    free: Vec<BlockId>,
    /// Per block: how many tables hold it.
    refs: Vec<u32>,
    /// Per block: its name, when the index has it.
    names: Vec<Option<Name>>,
    /// Per idle block: its key in `idle`.
    idle_key: Vec<u64>,
    /// Idle blocks by release order, oldest first.
    idle: BTreeMap<u64, BlockId>,
    index: HashMap<BlockHash, BlockId>,
    clock: u64,
    evictions: u64,
    /// Changes to the index since the last drain, when someone drains them
    /// ([`BlockAllocator::record_events`]).
    events: Option<Vec<(KvEvent, KvSource)>>,
}

impl PoolState {
    fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    fn unname(&mut self, b: BlockId) {
        if let Some(name) = self.names[b.0 as usize].take() {
            self.index.remove(&name.hash);
            if let Some(events) = &mut self.events {
                events.push((KvEvent::Removed(name.hash), name.source));
            }
        }
    }

    fn take(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if self.available() < n {
            return Err(Error::KvCacheFull {
                needed: n,
                free: self.available(),
            });
        }
        let from_free = n.min(self.free.len());
        let at = self.free.len() - from_free;
        let mut out = self.free.split_off(at);
        while out.len() < n {
            let Some((_, b)) = self.idle.pop_first() else {
                unreachable!("available() counted the idle blocks");
            };
            self.unname(b);
            self.evictions += 1;
            out.push(b);
        }
        for b in &out {
            self.refs[b.0 as usize] = 1;
        }
        Ok(out)
    }

    /// Drops one reference to each block; the last reference sends a named block to the idle
    /// list and an unnamed one to the free list. Later blocks of a sequence go idle first, so
    /// they are evicted first.
    fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            let i = b.0 as usize;
            debug_assert!(self.refs[i] > 0, "{b:?} released while not held");
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] > 0 {
                continue;
            }
            if self.names[i].is_some() {
                self.clock += 1;
                self.idle_key[i] = self.clock;
                self.idle.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
    }

    fn hold(&mut self, b: BlockId) {
        let i = b.0 as usize;
        if self.refs[i] == 0 {
            self.idle.remove(&self.idle_key[i]);
        }
        self.refs[i] += 1;
    }

    fn lookup(&self, hash: &BlockHash, accept: impl Fn(KvSource) -> bool) -> Option<BlockId> {
        let b = *self.index.get(hash)?;
        let name = self.names[b.0 as usize]?;
        accept(name.source).then_some(b)
    }
}

/// Hands out blocks and keeps the prefix cache's index. Cheap to clone; every clone is the same
/// pool, shared (behind a mutex nobody holds for long) with the block tables, so that dropping a
/// table returns its blocks without going through the engine.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    inner: Arc<Mutex<PoolState>>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Popping from the end hands out low ids first, which keeps tests readable.
        let free = (0..num_blocks as u32).rev().map(BlockId).collect();
        Self {
            inner: Arc::new(Mutex::new(PoolState {
                free,
                refs: vec![0; num_blocks],
                names: vec![None; num_blocks],
                idle_key: vec![0; num_blocks],
                idle: BTreeMap::new(),
                index: HashMap::new(),
                clock: 0,
                evictions: 0,
                events: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Every critical section restores the invariants before it can panic (the only panics
        // are the debug assertion and the unreachable idle pop, both before any change), so a
        // poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks a table could take now: free ones, and idle cached ones it would evict.
    pub fn free_blocks(&self) -> usize {
        self.lock().available()
    }

    pub fn total_blocks(&self) -> usize {
        self.lock().refs.len()
    }

    pub fn stats(&self) -> PoolStats {
        let s = self.lock();
        PoolStats {
            available: s.available(),
            named: s.index.len(),
            idle: s.idle.len(),
            evictions: s.evictions,
        }
    }

    /// An empty table drawing from this pool.
    pub fn new_table(&self) -> BlockTable {
        BlockTable {
            blocks: Vec::new(),
            allocator: self.clone(),
        }
    }

    /// How many of `hashes`, from the first, name cached blocks whose source `accept` takes.
    pub fn cached_prefix(&self, hashes: &[BlockHash], accept: impl Fn(KvSource) -> bool) -> usize {
        let s = self.lock();
        hashes
            .iter()
            .take_while(|h| s.lookup(h, &accept).is_some())
            .count()
    }

    /// Names `block`, which a table holds and whose KV is final, so later sequences find it.
    /// A block already named keeps its name. When another block has the name, a prefill block
    /// replaces a decode one (the loser stays where it is, unnamed); otherwise the first wins.
    pub fn name(&self, block: BlockId, hash: BlockHash, source: KvSource) {
        let mut s = self.lock();
        let i = block.0 as usize;
        if s.names[i].is_some() || s.refs[i] == 0 {
            return;
        }
        if let Some(&other) = s.index.get(&hash) {
            let theirs = s.names[other.0 as usize].map(|n| n.source);
            if !(source == KvSource::Prefill && theirs == Some(KvSource::Decode)) {
                return;
            }
            s.unname(other);
            let o = other.0 as usize;
            if s.refs[o] == 0 {
                let key = s.idle_key[o];
                s.idle.remove(&key);
                s.free.push(other);
            }
        }
        s.index.insert(hash, block);
        s.names[i] = Some(Name { hash, source });
        if let Some(events) = &mut s.events {
            events.push((KvEvent::Stored(hash), source));
        }
    }

    /// From now on, keeps every change to the index (a block named, a name evicted) until
    /// [`BlockAllocator::drain_events`] takes them: for a worker that reports what it caches.
    /// Off by default, so a pool nobody drains does not grow a list.
    pub fn record_events(&self) {
        self.lock().events.get_or_insert_with(Vec::new);
    }

    /// The changes since the last drain, in order, each with the named block's source.
    pub fn drain_events(&self) -> Vec<(KvEvent, KvSource)> {
        self.lock()
            .events
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn take(&self, n: usize) -> Result<Vec<BlockId>> {
        self.lock().take(n)
    }

    fn give_back(&self, blocks: &mut Vec<BlockId>) {
        if blocks.is_empty() {
            return;
        }
        self.lock().release(blocks);
        blocks.clear();
    }
}

/// The blocks one sequence holds, in token order. Dropping the table releases them.
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

    /// Starts an empty table with the cached blocks named by `hashes`, from the first, up to the
    /// first miss or a block whose source `accept` refuses. Returns how many it holds.
    pub fn attach_cached(
        &mut self,
        hashes: &[BlockHash],
        accept: impl Fn(KvSource) -> bool,
    ) -> usize {
        if !self.blocks.is_empty() {
            return 0;
        }
        let mut s = self.allocator.lock();
        for h in hashes {
            let Some(b) = s.lookup(h, &accept) else { break };
            s.hold(b);
            self.blocks.push(b);
        }
        self.blocks.len()
    }

    /// Releases every block from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len < self.blocks.len() {
            let mut tail = self.blocks.split_off(len);
            self.allocator.give_back(&mut tail);
        }
    }

    /// Names the table's block `index`, whose KV is final ([`BlockAllocator::name`]).
    pub fn name(&self, index: usize, hash: BlockHash, source: KvSource) {
        if let Some(&b) = self.blocks.get(index) {
            self.allocator.name(b, hash, source);
        }
    }

    /// Releases every block now, leaving the table empty.
    pub fn clear(&mut self) {
        self.allocator.give_back(&mut self.blocks);
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(n: u8) -> BlockHash {
        BlockHash([n; 16])
    }

    fn any(_: KvSource) -> bool {
        true
    }

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
    fn named_blocks_outlive_their_table_and_are_shared() {
        let pool = BlockAllocator::new(4);
        let mut a = pool.new_table();
        a.ensure_capacity(48, 16).expect("fits");
        a.name(0, h(1), KvSource::Prefill);
        a.name(1, h(2), KvSource::Prefill);
        let first: Vec<BlockId> = a.blocks()[..2].to_vec();
        // Shared while the first table still holds them.
        let mut b = pool.new_table();
        assert_eq!(b.attach_cached(&[h(1), h(2), h(3)], any), 2);
        assert_eq!(b.blocks(), &first[..]);
        drop(a);
        // The unnamed third block is free; the named two are held by b.
        assert_eq!(pool.stats().idle, 0);
        assert_eq!(pool.free_blocks(), 2);
        drop(b);
        let stats = pool.stats();
        assert_eq!((stats.idle, stats.named, stats.available), (2, 2, 4));
        let mut c = pool.new_table();
        assert_eq!(c.attach_cached(&[h(1), h(2)], any), 2);
        assert_eq!(c.blocks(), &first[..]);
    }

    #[test]
    fn eviction_takes_idle_blocks_tail_first_and_never_held_ones() {
        let pool = BlockAllocator::new(4);
        let mut a = pool.new_table();
        a.ensure_capacity(64, 16).expect("fits");
        for i in 0..4 {
            a.name(i, h(i as u8 + 1), KvSource::Prefill);
        }
        drop(a);
        // Holding the first block keeps it from eviction.
        let mut keep = pool.new_table();
        assert_eq!(keep.attach_cached(&[h(1)], any), 1);
        let mut b = pool.new_table();
        b.ensure_capacity(16, 16)
            .expect("one idle block is reclaimed");
        let stats = pool.stats();
        assert_eq!(stats.evictions, 1);
        // The tail (h4) went first: the prefix h1..h3 still resolves.
        assert_eq!(pool.cached_prefix(&[h(1), h(2), h(3), h(4)], any), 3);
        b.ensure_capacity(48, 16).expect("two more");
        assert_eq!(pool.cached_prefix(&[h(1), h(2), h(3)], any), 1);
        let err = b
            .ensure_capacity(64, 16)
            .expect_err("the held block is not evicted");
        assert!(matches!(err, Error::KvCacheFull { needed: 1, free: 0 }));
    }

    #[test]
    fn a_prefill_block_replaces_a_decode_block_of_the_same_name() {
        let pool = BlockAllocator::new(4);
        let mut a = pool.new_table();
        a.ensure_capacity(16, 16).expect("fits");
        a.name(0, h(9), KvSource::Decode);
        let prefill_only = |s: KvSource| s != KvSource::Decode;
        assert_eq!(pool.cached_prefix(&[h(9)], prefill_only), 0);
        assert_eq!(pool.cached_prefix(&[h(9)], any), 1);
        drop(a);
        let mut b = pool.new_table();
        b.ensure_capacity(16, 16).expect("fits");
        let replacement = b.blocks()[0];
        b.name(0, h(9), KvSource::Prefill);
        // The decode block lost its name and went back to the free list.
        assert_eq!(pool.stats().idle, 0);
        assert_eq!(pool.stats().available, 3);
        let mut c = pool.new_table();
        assert_eq!(c.attach_cached(&[h(9)], prefill_only), 1);
        assert_eq!(c.blocks(), &[replacement]);
        // A second prefill block of the same name stays unnamed.
        let mut d = pool.new_table();
        d.ensure_capacity(16, 16).expect("fits");
        d.name(0, h(9), KvSource::Prefill);
        drop(d);
        assert_eq!(
            pool.stats().available,
            3,
            "the duplicate went back to the free list"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grow(usize, usize),
        Name(usize, u8),
        Attach(usize, u8),
        Clear(usize),
        Drop(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6usize, 0..200usize).prop_map(|(t, n)| Op::Grow(t, n)),
            (0..6usize, 0..6u8).prop_map(|(t, n)| Op::Name(t, n)),
            (0..6usize, 0..6u8).prop_map(|(t, n)| Op::Attach(t, n)),
            (0..6usize).prop_map(Op::Clear),
            (0..6usize).prop_map(Op::Drop),
        ]
    }

    proptest! {
        /// No block is lost, and none is handed out while held, whatever mix of growth, naming,
        /// sharing, clearing and dropping: every block is free, held or idle, and a block two
        /// tables hold is a named one.
        #[test]
        fn pool_accounting_holds(ops in proptest::collection::vec(op(), 1..120)) {
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
                    // Names the table's last block after a chain of its first ones.
                    Op::Name(i, n) => if let Some(t) = tables[i].as_ref()
                        && !t.is_empty()
                    {
                        t.name(t.len() - 1, h(n), KvSource::Prefill);
                    },
                    Op::Attach(i, n) => {
                        let t = tables[i].get_or_insert_with(|| pool.new_table());
                        let hashes: Vec<BlockHash> = (0..=n).map(h).collect();
                        t.attach_cached(&hashes, any);
                    }
                    Op::Clear(i) => if let Some(t) = tables[i].as_mut() { t.clear() },
                    Op::Drop(i) => tables[i] = None,
                }
                let mut held: Vec<BlockId> =
                    tables.iter().flatten().flat_map(|t| t.blocks().to_vec()).collect();
                held.sort();
                let shared: Vec<BlockId> =
                    held.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]).collect();
                held.dedup();
                let s = pool.lock();
                for b in &shared {
                    prop_assert!(s.names[b.0 as usize].is_some(), "{b:?} is shared unnamed");
                }
                for b in &held {
                    prop_assert!(!s.free.contains(b) && !s.idle.values().any(|x| x == b));
                }
                let idle_named = s.idle.values().all(|b| s.names[b.0 as usize].is_some());
                prop_assert!(idle_named);
                prop_assert_eq!(held.len() + s.free.len() + s.idle.len(), 32);
                prop_assert_eq!(s.index.len(), s.names.iter().flatten().count());
            }
            tables.clear();
            prop_assert_eq!(pool.free_blocks(), 32);
        }
    }
}
