//! The prefill worker's side of a KV handoff, as pure state machines: a push job's sender and a
//! pull source's lease. No IO and no clock inside: the engine loop feeds them events with the
//! time and carries out the actions they return.
//!
//! ```text
//! push:  Sending --Tick past next_keepalive--> Sending (Keepalive; the receiver's lease renewed)
//!        Sending --Sampled--> Ended: Complete (the first token rides with the last layer)
//!        Sending --TransferFailed--> Ended: FailJob, Abort
//!        Sending --Stopped (the job is gone after the receiver's cancel)--> Ended: Stopped
//!        Sending --CallerGone--> Ended: Abort
//! pull:  Leased --ReadStarted--> Reading (lease renewed) --ReadDone--> Ended: Withdraw
//!        Leased | Reading --Released--> Ended: Withdraw
//!        Leased | Reading --Tick at or past the deadline--> Ended: Withdraw (expired)
//!        Reading --ReadFailed--> Leased (the reader may retry until the lease ends)
//! ```
//!
//! The pinned blocks are not the machines': the loop holds them and frees them by dropping
//! them when an action says the handoff is over.

use std::time::{Duration, Instant};

/// A push job's transfer, from admission to the first token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushState {
    /// The prompt waits or computes; layers go out as they are computed.
    Sending { next_keepalive: Instant },
    /// The first token went to the coordinator and to the decode worker, or the job failed.
    Ended,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    /// The sender's wake-up at [`Push::next_wakeup`] (or any time).
    Tick,
    /// The first token was sampled (and already answered to the coordinator by the engine
    /// thread); its completion follows the last layer's writes.
    Sampled,
    /// Writing to the decode worker failed.
    TransferFailed { reason: String },
    /// The decode worker gave the handoff up and the engine thread dropped the job: it writes
    /// nothing more for it.
    Stopped,
    /// The coordinator stopped waiting for the first token; the engine thread dropped the job.
    CallerGone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushAction {
    /// Tell the decode worker the prompt is still being worked on.
    Keepalive,
    /// Send the decode worker the completion (first token) after the last layer's writes.
    Complete,
    /// Fail the job with this error (if the coordinator still waits for it); its blocks go.
    FailJob { reason: String },
    /// Tell the decode worker nothing more will come.
    Abort { reason: String },
    /// Answer the decode worker's cancel: nothing more will be written.
    Stopped,
}

/// One push job's sender.
#[derive(Debug, Clone)]
pub struct Push {
    state: PushState,
    every: Duration,
}

impl Push {
    /// A job admitted at `now` whose receiver's lease lasts `ttl`: keepalives go out every third
    /// of it, so two may be lost before the lease ends.
    pub fn new(now: Instant, ttl: Duration) -> Self {
        let every = (ttl / 3).max(Duration::from_millis(1));
        Self {
            state: PushState::Sending {
                next_keepalive: now + every,
            },
            every,
        }
    }

    pub fn state(&self) -> PushState {
        self.state
    }

    /// When the loop must wake up for this job.
    pub fn next_wakeup(&self) -> Option<Instant> {
        match self.state {
            PushState::Sending { next_keepalive } => Some(next_keepalive),
            PushState::Ended => None,
        }
    }

    pub fn step(&mut self, now: Instant, event: PushEvent) -> Vec<PushAction> {
        let PushState::Sending { next_keepalive } = self.state else {
            return Vec::new();
        };
        match event {
            PushEvent::Tick if now >= next_keepalive => {
                self.state = PushState::Sending {
                    next_keepalive: now + self.every,
                };
                vec![PushAction::Keepalive]
            }
            PushEvent::Tick => Vec::new(),
            PushEvent::Sampled => {
                self.state = PushState::Ended;
                vec![PushAction::Complete]
            }
            PushEvent::TransferFailed { reason } => {
                self.state = PushState::Ended;
                vec![
                    PushAction::FailJob {
                        reason: reason.clone(),
                    },
                    PushAction::Abort { reason },
                ]
            }
            PushEvent::Stopped => {
                self.state = PushState::Ended;
                vec![PushAction::Stopped]
            }
            PushEvent::CallerGone => {
                self.state = PushState::Ended;
                vec![PushAction::Abort {
                    reason: "the coordinator stopped waiting".into(),
                }]
            }
        }
    }
}

/// A pull source's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Pinned, waiting for a reader.
    Leased { deadline: Instant },
    /// A reader is reading.
    Reading { deadline: Instant },
    /// Read, released or expired: the blocks go.
    Ended,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    ReadStarted,
    ReadDone,
    ReadFailed,
    /// The coordinator released it (no decode worker will read it).
    Released,
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceAction {
    /// Withdraw the offer and drop the pin: the blocks return to the pool once no reader holds
    /// them. `expired` says the lease ran out rather than ended.
    Withdraw { expired: bool },
}

/// One pull source.
#[derive(Debug, Clone)]
pub struct PullSource {
    state: SourceState,
    ttl: Duration,
}

impl PullSource {
    pub fn new(now: Instant, ttl: Duration) -> Self {
        Self {
            state: SourceState::Leased {
                deadline: now + ttl,
            },
            ttl,
        }
    }

    pub fn state(&self) -> SourceState {
        self.state
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            SourceState::Leased { deadline } | SourceState::Reading { deadline } => Some(deadline),
            SourceState::Ended => None,
        }
    }

    pub fn step(&mut self, now: Instant, event: SourceEvent) -> Vec<SourceAction> {
        let deadline = match self.state {
            SourceState::Leased { deadline } | SourceState::Reading { deadline } => deadline,
            SourceState::Ended => return Vec::new(),
        };
        match event {
            // This side renews its own lease while a reader reads.
            SourceEvent::ReadStarted => {
                self.state = SourceState::Reading {
                    deadline: deadline.max(now + self.ttl),
                };
                Vec::new()
            }
            SourceEvent::ReadFailed => {
                self.state = SourceState::Leased { deadline };
                Vec::new()
            }
            SourceEvent::ReadDone | SourceEvent::Released => {
                self.state = SourceState::Ended;
                vec![SourceAction::Withdraw { expired: false }]
            }
            SourceEvent::Tick if now >= deadline => {
                self.state = SourceState::Ended;
                vec![SourceAction::Withdraw { expired: true }]
            }
            SourceEvent::Tick => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(3000);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_push_keeps_the_receiver_alive_every_third_of_its_lease() {
        let t0 = Instant::now();
        let mut p = Push::new(t0, TTL);
        assert_eq!(p.next_wakeup(), Some(at(t0, 1000)));
        assert!(p.step(at(t0, 999), PushEvent::Tick).is_empty());
        assert_eq!(
            p.step(at(t0, 1000), PushEvent::Tick),
            vec![PushAction::Keepalive]
        );
        assert_eq!(p.next_wakeup(), Some(at(t0, 2000)));
        // A late wake-up sends one keepalive, not a burst.
        assert_eq!(
            p.step(at(t0, 5000), PushEvent::Tick),
            vec![PushAction::Keepalive]
        );
        assert_eq!(p.next_wakeup(), Some(at(t0, 6000)));
    }

    #[test]
    fn the_first_token_goes_with_the_completion_and_keepalives_stop() {
        let t0 = Instant::now();
        let mut p = Push::new(t0, TTL);
        assert_eq!(
            p.step(at(t0, 10), PushEvent::Sampled),
            vec![PushAction::Complete]
        );
        assert_eq!(p.state(), PushState::Ended);
        assert_eq!(p.next_wakeup(), None);
    }

    #[test]
    fn failures_answer_every_party_once() {
        let t0 = Instant::now();
        let mut p = Push::new(t0, TTL);
        let a = p.step(
            t0,
            PushEvent::TransferFailed {
                reason: "link".into(),
            },
        );
        assert!(matches!(&a[0], PushAction::FailJob { reason } if reason == "link"));
        assert!(matches!(&a[1], PushAction::Abort { .. }));
        assert!(
            p.step(t0, PushEvent::Sampled).is_empty(),
            "a late sample is ignored"
        );

        let mut p = Push::new(t0, TTL);
        assert_eq!(p.step(t0, PushEvent::Stopped), vec![PushAction::Stopped]);

        let mut p = Push::new(t0, TTL);
        assert!(matches!(
            p.step(t0, PushEvent::CallerGone)[..],
            [PushAction::Abort { .. }]
        ));
        assert!(
            p.step(at(t0, 9000), PushEvent::Tick).is_empty(),
            "no keepalive after the end"
        );
    }

    #[test]
    fn a_source_is_withdrawn_once_when_read_released_or_expired() {
        let t0 = Instant::now();
        let mut s = PullSource::new(t0, TTL);
        assert!(s.step(at(t0, 2000), SourceEvent::ReadStarted).is_empty());
        assert_eq!(s.deadline(), Some(at(t0, 5000)), "a read renews the lease");
        assert_eq!(
            s.step(at(t0, 2500), SourceEvent::ReadDone),
            vec![SourceAction::Withdraw { expired: false }]
        );
        assert!(s.step(at(t0, 2600), SourceEvent::Released).is_empty());
        assert!(s.step(at(t0, 9000), SourceEvent::Tick).is_empty());

        let mut s = PullSource::new(t0, TTL);
        assert_eq!(
            s.step(t0, SourceEvent::Released),
            vec![SourceAction::Withdraw { expired: false }]
        );

        let mut s = PullSource::new(t0, TTL);
        assert!(s.step(at(t0, 2999), SourceEvent::Tick).is_empty());
        assert_eq!(
            s.step(at(t0, 3000), SourceEvent::Tick),
            vec![SourceAction::Withdraw { expired: true }]
        );
    }

    #[test]
    fn a_failed_read_leaves_the_source_until_its_lease_ends() {
        let t0 = Instant::now();
        let mut s = PullSource::new(t0, TTL);
        s.step(at(t0, 1000), SourceEvent::ReadStarted);
        assert!(s.step(at(t0, 1500), SourceEvent::ReadFailed).is_empty());
        assert_eq!(
            s.state(),
            SourceState::Leased {
                deadline: at(t0, 4000)
            }
        );
        assert_eq!(
            s.step(at(t0, 4000), SourceEvent::Tick),
            vec![SourceAction::Withdraw { expired: true }]
        );
    }
}
