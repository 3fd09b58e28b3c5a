//! A worker's KV event log (`baton_core::KvEventLog`), shared by its engine thread, which
//! records what the prefix cache stored and evicted after each turn, and its Load handler,
//! which answers a reader's cursor with the changes since (the coordinator's KV-aware
//! placement reads them; discovery's event plane will publish the same events).
//!
//! The engine thread is the only writer; a reader holds the lock for one copy of at most the
//! log's window, never across an await.

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use baton_core::{KvEvent, KvEventLog};
use baton_proto::convert;
use baton_proto::v1;

/// Events a reader too far behind would need beyond this get the whole set instead.
pub const WINDOW: usize = 8192;

#[derive(Debug, Clone)]
pub struct KvLog(Arc<Mutex<KvEventLog>>);

impl Default for KvLog {
    fn default() -> Self {
        Self::new(WINDOW)
    }
}

impl KvLog {
    /// A log with a fresh random epoch, so a reader of this worker's previous life starts over.
    pub fn new(window: usize) -> Self {
        let epoch = RandomState::new().hash_one(std::process::id());
        Self(Arc::new(Mutex::new(KvEventLog::new(epoch, window))))
    }

    /// Records an engine turn's changes (the engine thread, after each turn).
    pub fn record(&self, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(events);
    }

    /// The answer to a load request: the changes after its cursor, when it asked for them.
    pub fn answer(&self, req: &v1::LoadRequest) -> Option<v1::KvEvents> {
        if !req.kv_events {
            return None;
        }
        let events = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since(req.kv_events_epoch, req.kv_events_after);
        Some(convert::kv_events_to_proto(&events))
    }
}
