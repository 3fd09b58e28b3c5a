//! An agent's transfer counters: plain atomics every task bumps, read with [`Stats::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::FailureReason;

/// Transfer counters, shared by an agent's tasks. Plain atomics; read with
/// [`Stats::snapshot`].
#[derive(Debug, Default)]
pub struct Stats {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    frames_received: AtomicU64,
    handoffs_completed: AtomicU64,
    handoffs_failed: AtomicU64,
    frames_rejected: AtomicU64,
    failures: [AtomicU64; FailureReason::ALL.len()],
    links_failed: [AtomicU64; FailureReason::ALL.len()],
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Frame bytes (header and payload) handed to the transport.
    pub bytes_sent: u64,
    /// Frame bytes read from the transport.
    pub bytes_received: u64,
    pub frames_received: u64,
    pub handoffs_completed: u64,
    pub handoffs_failed: u64,
    /// Frames dropped because no live handoff owns them.
    pub frames_rejected: u64,
    /// Failures of frames, handoffs or connections, by reason, in [`FailureReason::ALL`] order.
    pub failures: [u64; FailureReason::ALL.len()],
    /// Links that failed to open (dialed or accepted), by reason, in [`FailureReason::ALL`]
    /// order: `Unauthenticated` counts peers refused for the cluster key.
    pub links_failed: [u64; FailureReason::ALL.len()],
}

impl StatsSnapshot {
    pub fn failures(&self, reason: FailureReason) -> u64 {
        self.failures[reason.index()]
    }

    pub fn links_failed(&self, reason: FailureReason) -> u64 {
        self.links_failed[reason.index()]
    }

    /// [`Self::links_failed`] of every reason, labelled for metrics.
    pub fn links_failed_by_reason(&self) -> [(&'static str, u64); FailureReason::ALL.len()] {
        FailureReason::ALL.map(|r| (r.as_str(), self.links_failed(r)))
    }
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            frames_received: g(&self.frames_received),
            handoffs_completed: g(&self.handoffs_completed),
            handoffs_failed: g(&self.handoffs_failed),
            frames_rejected: g(&self.frames_rejected),
            failures: std::array::from_fn(|i| g(&self.failures[i])),
            links_failed: std::array::from_fn(|i| g(&self.links_failed[i])),
        }
    }

    pub(crate) fn add_sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_received(&self, bytes: usize) {
        self.bytes_received
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn frame_received(&self) {
        self.frames_received.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn handoff_completed(&self) {
        self.handoffs_completed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn handoff_failed(&self) {
        self.handoffs_failed.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn frame_rejected(&self) {
        self.frames_rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn link_failed(&self, reason: FailureReason) {
        self.links_failed[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn failure(&self, reason: FailureReason) {
        self.failures[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}
