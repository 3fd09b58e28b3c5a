//! KV events: how a coordinator learns which cached blocks each worker holds, without asking
//! for the whole set every time. The worker's engine thread records every change to its set of
//! reusable blocks in a [`KvEventLog`]; a reader (the coordinator's load poll today, discovery's
//! event plane later) asks for the changes after its cursor and applies them to a [`KvIndex`].
//!
//! ```text
//! engine pool --Stored / Removed--> KvEventLog (worker) --since(epoch, cursor)--> KvEvents
//!     --KvIndex::apply--> the coordinator's view of that worker --cached_prefix--> placement
//! ```
//!
//! Each event has a sequence number, monotonically increasing per log. The log keeps the last
//! `capacity` events and the current set; a reader whose cursor fell out of the window (or
//! comes from another epoch: the worker restarted) gets the whole set instead, flagged `reset`.
//! So an index never misses a change, whatever the reader's pace, and a reply is bounded by the
//! window or by the pool's size. Pure data structures: no IO, no clock.

use std::collections::{HashSet, VecDeque};

use crate::prefix::BlockHash;

/// A change to the set of blocks a worker can reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvEvent {
    /// The block is cached and a request with this prefix can reuse it.
    Stored(BlockHash),
    /// The block was evicted (its memory went to new KV): a lookup now misses.
    Removed(BlockHash),
}

/// What a reader gets for its cursor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvEvents {
    /// The log's epoch: a reader that saw another one must start over.
    pub epoch: u64,
    /// The events are the whole current set (as `Stored`): drop everything known before.
    pub reset: bool,
    /// The cursor to ask with next time.
    pub next: u64,
    /// In the order they happened.
    pub events: Vec<KvEvent>,
}

/// A worker's record of changes to its reusable blocks: a bounded window of recent events and
/// the current set.
#[derive(Debug, Clone)]
pub struct KvEventLog {
    epoch: u64,
    /// Sequence number of the next event.
    next: u64,
    /// Events `next - window.len() .. next`.
    window: VecDeque<KvEvent>,
    capacity: usize,
    held: HashSet<BlockHash>,
}

impl KvEventLog {
    /// A log of epoch `epoch` (pick one at random per worker start) keeping the last
    /// `capacity` events (at least 1).
    pub fn new(epoch: u64, capacity: usize) -> Self {
        Self {
            epoch,
            next: 0,
            window: VecDeque::new(),
            capacity: capacity.max(1),
            held: HashSet::new(),
        }
    }

    /// Records changes in the order they happened. A change that changes nothing (a block
    /// stored twice, or removed while not held) is not recorded.
    pub fn record(&mut self, events: impl IntoIterator<Item = KvEvent>) {
        for event in events {
            let changed = match event {
                KvEvent::Stored(h) => self.held.insert(h),
                KvEvent::Removed(h) => self.held.remove(&h),
            };
            if !changed {
                continue;
            }
            if self.window.len() == self.capacity {
                self.window.pop_front();
            }
            self.window.push_back(event);
            self.next += 1;
        }
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The changes after `cursor` (the `next` of the reader's last reply) of epoch `epoch`, or
    /// the whole set when the reader is new, from another epoch, or too far behind.
    pub fn since(&self, epoch: u64, cursor: u64) -> KvEvents {
        let first = self.next - self.window.len() as u64;
        if epoch == self.epoch && (first..=self.next).contains(&cursor) {
            return KvEvents {
                epoch: self.epoch,
                reset: false,
                next: self.next,
                events: self
                    .window
                    .iter()
                    .skip((cursor - first) as usize)
                    .copied()
                    .collect(),
            };
        }
        let mut held: Vec<BlockHash> = self.held.iter().copied().collect();
        held.sort_unstable();
        KvEvents {
            epoch: self.epoch,
            reset: true,
            next: self.next,
            events: held.into_iter().map(KvEvent::Stored).collect(),
        }
    }
}

/// A reader's view of one worker's reusable blocks, kept current by its log's replies.
#[derive(Debug, Clone, Default)]
pub struct KvIndex {
    /// The epoch and cursor of the last reply applied; `None` before the first.
    cursor: Option<(u64, u64)>,
    held: HashSet<BlockHash>,
}

impl KvIndex {
    /// What to ask the log for: `(epoch, cursor)`. A new index asks with an epoch no log has
    /// in practice, so its first reply is the whole set.
    pub fn cursor(&self) -> (u64, u64) {
        self.cursor.unwrap_or((u64::MAX, 0))
    }

    /// Applies a reply of the log.
    pub fn apply(&mut self, reply: &KvEvents) {
        if reply.reset {
            self.held.clear();
        }
        for event in &reply.events {
            match event {
                KvEvent::Stored(h) => {
                    self.held.insert(*h);
                }
                KvEvent::Removed(h) => {
                    self.held.remove(h);
                }
            }
        }
        self.cursor = Some((reply.epoch, reply.next));
    }

    /// Applies a reply the worker pushed (its event plane) rather than one to this index's
    /// own cursor: a reset always applies; otherwise it must start at or before where this
    /// index stands (same epoch), and only the events past the cursor are applied (none, for
    /// a message a resync overtook). `false`: a gap (messages were dropped, or the
    /// worker restarted); the caller asks the worker with [`KvIndex::cursor`] instead.
    pub fn apply_pushed(&mut self, reply: &KvEvents) -> bool {
        if reply.reset {
            self.apply(reply);
            return true;
        }
        let Some((epoch, after)) = self.cursor else {
            return false;
        };
        let from = reply.next.saturating_sub(reply.events.len() as u64);
        if reply.epoch != epoch || from > after {
            return false;
        }
        if reply.next <= after {
            // All of it already applied (a resync overtook the messages in flight).
            return true;
        }
        let skip = (after - from) as usize;
        self.apply(&KvEvents {
            epoch: reply.epoch,
            reset: false,
            next: reply.next,
            events: reply.events[skip..].to_vec(),
        });
        true
    }

    /// Forgets everything (the worker went away); the next reply is the whole set.
    pub fn clear(&mut self) {
        self.held.clear();
        self.cursor = None;
    }

    /// How many of `hashes`, from the first, the worker holds.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.held.contains(h)).count()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.held.contains(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(i: u8) -> BlockHash {
        BlockHash([i; 16])
    }

    #[test]
    fn a_reader_gets_the_changes_after_its_cursor() {
        let mut log = KvEventLog::new(7, 16);
        let mut index = KvIndex::default();
        let (e, c) = index.cursor();
        let first = log.since(e, c);
        assert!(first.reset && first.events.is_empty());
        index.apply(&first);
        log.record([KvEvent::Stored(h(1)), KvEvent::Stored(h(2))]);
        let (e, c) = index.cursor();
        let reply = log.since(e, c);
        assert!(!reply.reset);
        assert_eq!(reply.events.len(), 2);
        index.apply(&reply);
        assert_eq!(index.cached_prefix(&[h(1), h(2), h(3)]), 2);
        log.record([KvEvent::Removed(h(1))]);
        let (e, c) = index.cursor();
        index.apply(&log.since(e, c));
        assert_eq!(
            index.cached_prefix(&[h(1), h(2)]),
            0,
            "a prefix needs its first block"
        );
        assert!(index.contains(&h(2)));
        let (e, c) = index.cursor();
        assert!(log.since(e, c).events.is_empty(), "nothing new");
    }

    #[test]
    fn no_op_changes_are_not_recorded() {
        let mut log = KvEventLog::new(1, 16);
        log.record([
            KvEvent::Removed(h(1)),
            KvEvent::Stored(h(2)),
            KvEvent::Stored(h(2)),
        ]);
        assert_eq!(log.since(1, 0).events, vec![KvEvent::Stored(h(2))]);
    }

    #[test]
    fn a_reader_too_far_behind_or_from_another_epoch_gets_the_whole_set() {
        let mut log = KvEventLog::new(3, 2);
        log.record((1..=5).map(|i| KvEvent::Stored(h(i))));
        let behind = log.since(3, 1);
        assert!(behind.reset);
        assert_eq!(behind.events.len(), 5);
        assert!(log.since(4, 5).reset, "another epoch: the worker restarted");
        assert!(
            log.since(3, 6).reset,
            "a cursor past the end is from another life"
        );
        assert!(!log.since(3, 3).reset, "3 and 4 are still in the window");
    }

    proptest! {
        /// Whatever the order of changes and polls, and however small the window, an index that
        /// applies every reply holds exactly the log's set.
        #[test]
        fn an_index_follows_its_log(
            ops in proptest::collection::vec((0u8..3, 0u8..12), 1..200),
            capacity in 1usize..8,
        ) {
            let mut log = KvEventLog::new(11, capacity);
            let mut index = KvIndex::default();
            let mut truth = HashSet::new();
            for (op, b) in ops {
                match op {
                    0 => {
                        log.record([KvEvent::Stored(h(b))]);
                        truth.insert(h(b));
                    }
                    1 => {
                        log.record([KvEvent::Removed(h(b))]);
                        truth.remove(&h(b));
                    }
                    _ => {
                        let (e, c) = index.cursor();
                        let reply = log.since(e, c);
                        prop_assert!(reply.events.len() <= capacity.max(log.len()));
                        index.apply(&reply);
                        prop_assert_eq!(&index.held, &truth);
                    }
                }
            }
            let (e, c) = index.cursor();
            index.apply(&log.since(e, c));
            prop_assert_eq!(&index.held, &truth);
        }

        /// The event plane: the worker pushes replies to its own cursor, some get lost; a
        /// reader applies what continues its cursor and asks with its own cursor on a gap,
        /// and always ends equal to the log's set.
        #[test]
        fn an_index_follows_pushed_replies_through_losses(
            ops in proptest::collection::vec((0u8..4, 0u8..12), 1..200),
            capacity in 1usize..8,
        ) {
            let mut log = KvEventLog::new(5, capacity);
            let mut index = KvIndex::default();
            let mut publisher = KvIndex::default();
            let mut truth = HashSet::new();
            for (op, b) in ops {
                match op {
                    0 => {
                        log.record([KvEvent::Stored(h(b))]);
                        truth.insert(h(b));
                    }
                    1 => {
                        log.record([KvEvent::Removed(h(b))]);
                        truth.remove(&h(b));
                    }
                    // Pushed, delivered (3) or lost (2).
                    _ => {
                        let (e, c) = publisher.cursor();
                        let pushed = log.since(e, c);
                        publisher.apply(&pushed);
                        if op == 3 && !index.apply_pushed(&pushed) {
                            let (e, c) = index.cursor();
                            index.apply(&log.since(e, c));
                        }
                        if op == 3 {
                            prop_assert_eq!(&index.held, &truth);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_pushed_reply_applies_only_past_the_cursor() {
        let mut log = KvEventLog::new(9, 16);
        let mut index = KvIndex::default();
        assert!(
            !index.apply_pushed(&log.since(9, 0)),
            "no cursor yet: ask first"
        );
        index.apply(&log.since(u64::MAX, 0));
        log.record([KvEvent::Stored(h(1)), KvEvent::Stored(h(2))]);
        let (e, c) = index.cursor();
        index.apply(&log.since(e, c));
        log.record([KvEvent::Removed(h(1))]);
        // The publisher's view started before this index's cursor: the overlap is skipped.
        assert!(index.apply_pushed(&log.since(9, 0)));
        assert!(!index.contains(&h(1)) && index.contains(&h(2)));
        log.record([KvEvent::Stored(h(3)), KvEvent::Stored(h(4))]);
        let ahead = log.since(9, 4);
        assert!(
            !index.apply_pushed(&ahead),
            "starts after the cursor: a gap"
        );
        assert!(
            index.apply_pushed(&log.since(8, 0)),
            "a reply to another epoch's cursor is the whole set: it always applies"
        );
        assert!(index.contains(&h(3)));
    }
}
