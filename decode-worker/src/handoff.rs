//! The decode worker's side of one KV handoff, as a pure state machine: what to do when the
//! sender's bytes land, when it falls silent, when the transfer fails and when the coordinator
//! goes away. No IO and no clock inside: the engine loop feeds it events with the time and
//! carries out the actions it returns.
//!
//! ```text
//!            LayerLanded | Keepalive (lease renewed)
//!                 +---+
//!                 v   |
//!   reserve --> Landing --Arrived{first token}------------> Ended: Decode
//!                 |  \\--Failed{reason}-----------------------> Ended: by policy, FailStream | Recompute
//!                 |  \\--Tick at or past the deadline-------> Ended: Forget, then by policy
//!                 \\--StreamClosed (coordinator gone)-------> Ended: Forget
//! Ended + anything (late frames, a second failure) --> nothing
//! ```
//!
//! The reserved blocks are not the machine's: the engine loop holds them and frees them by
//! dropping them (or hands them to the decoding sequence on `Decode`).

use std::time::{Duration, Instant};

use crate::config::KvFailurePolicy;

/// Where the handoff stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Blocks reserved; the sender's bytes are arriving. The lease ends at `deadline` unless
    /// renewed by progress.
    Landing { deadline: Instant, layers: u32 },
    /// Decoding started, or the handoff was given up; it keeps nothing.
    Ended,
}

/// What happened to the handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every expected byte of one more layer landed and was verified.
    LayerLanded,
    /// The sender is still working (its prompt waits or computes).
    Keepalive,
    /// Everything landed and was verified, and the sender sent the first token it sampled.
    Arrived { first_token: u32 },
    /// The transfer failed: a corrupt or misplaced write, the sender gave up, its link broke.
    Failed { reason: String },
    /// The coordinator closed the stream: the request is cancelled or already finished.
    StreamClosed,
    /// The engine loop's wake-up at [`Handoff::deadline`] (or any time).
    Tick,
}

/// What the engine loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Decode from `first_token` on the landed KV; the reserved blocks become the sequence's.
    Decode { first_token: u32 },
    /// Recompute the prompt here and decode on (`kv_failure_policy = recompute`); the reserved
    /// blocks are freed.
    Recompute { reason: String },
    /// End the stream with this error (`kv_failure_policy = fail`); the blocks are freed.
    FailStream { reason: String },
    /// Stop expecting the handoff: the transfer agent lets the blocks go once no writer can
    /// touch them, and the loop drops its hold.
    Forget,
}

/// One handoff on the receiving side.
#[derive(Debug, Clone)]
pub struct Handoff {
    state: State,
    ttl: Duration,
    policy: KvFailurePolicy,
}

impl Handoff {
    /// A handoff whose blocks were reserved at `now`, under a lease of `ttl` renewed by progress.
    pub fn new(now: Instant, ttl: Duration, policy: KvFailurePolicy) -> Self {
        Self {
            state: State::Landing {
                deadline: now + ttl,
                layers: 0,
            },
            ttl,
            policy,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When the lease ends, while it is alive: the engine loop wakes up then with a `Tick`.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Landing { deadline, .. } => Some(deadline),
            State::Ended => None,
        }
    }

    pub fn is_ended(&self) -> bool {
        self.state == State::Ended
    }

    /// Applies one event at `now`.
    pub fn step(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let State::Landing { deadline, layers } = self.state else {
            return Vec::new();
        };
        let renewed = deadline.max(now + self.ttl);
        match event {
            Event::LayerLanded => {
                self.state = State::Landing {
                    deadline: renewed,
                    layers: layers + 1,
                };
                Vec::new()
            }
            Event::Keepalive => {
                self.state = State::Landing {
                    deadline: renewed,
                    layers,
                };
                Vec::new()
            }
            Event::Arrived { first_token } => {
                self.state = State::Ended;
                vec![Action::Decode { first_token }]
            }
            Event::Failed { reason } => {
                self.state = State::Ended;
                vec![self.by_policy(reason)]
            }
            Event::StreamClosed => {
                self.state = State::Ended;
                vec![Action::Forget]
            }
            Event::Tick if now >= deadline => {
                self.state = State::Ended;
                let reason = format!(
                    "no kv arrived for {:?} ({layers} layers had landed): the lease expired",
                    self.ttl
                );
                vec![Action::Forget, self.by_policy(reason)]
            }
            Event::Tick => Vec::new(),
        }
    }

    fn by_policy(&self, reason: String) -> Action {
        match self.policy {
            KvFailurePolicy::Fail => Action::FailStream { reason },
            KvFailurePolicy::Recompute => Action::Recompute { reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn landing(policy: KvFailurePolicy) -> (Instant, Handoff) {
        let t0 = Instant::now();
        (t0, Handoff::new(t0, TTL, policy))
    }

    #[test]
    fn arrival_starts_decoding_from_the_senders_first_token() {
        let (t0, mut h) = landing(KvFailurePolicy::Fail);
        assert_eq!(h.step(at(t0, 10), Event::LayerLanded), vec![]);
        assert_eq!(
            h.step(at(t0, 20), Event::Arrived { first_token: 42 }),
            vec![Action::Decode { first_token: 42 }]
        );
        assert!(h.is_ended());
        assert_eq!(h.deadline(), None);
    }

    #[test]
    fn progress_renews_the_lease_and_silence_expires_it() {
        let (t0, mut h) = landing(KvFailurePolicy::Fail);
        assert_eq!(h.deadline(), Some(at(t0, 3000)));
        assert!(h.step(at(t0, 2000), Event::Keepalive).is_empty());
        assert_eq!(h.deadline(), Some(at(t0, 5000)), "a keepalive renews");
        assert!(h.step(at(t0, 4000), Event::LayerLanded).is_empty());
        assert_eq!(h.deadline(), Some(at(t0, 7000)), "a landed layer renews");
        assert!(h.step(at(t0, 6999), Event::Tick).is_empty(), "not yet");
        let actions = h.step(at(t0, 7000), Event::Tick);
        assert_eq!(actions[0], Action::Forget);
        let Action::FailStream { reason } = &actions[1] else {
            panic!("{actions:?}");
        };
        assert!(
            reason.contains("expired") && reason.contains("1 layers"),
            "{reason}"
        );
        assert!(h.is_ended());
    }

    #[test]
    fn renewal_never_moves_the_deadline_back() {
        let (t0, mut h) = landing(KvFailurePolicy::Fail);
        assert!(h.step(t0, Event::Keepalive).is_empty());
        assert_eq!(h.deadline(), Some(at(t0, 3000)));
    }

    #[test]
    fn a_failed_transfer_fails_or_recomputes_by_policy() {
        for (policy, expected) in [
            (
                KvFailurePolicy::Fail,
                Action::FailStream {
                    reason: "crc".into(),
                },
            ),
            (
                KvFailurePolicy::Recompute,
                Action::Recompute {
                    reason: "crc".into(),
                },
            ),
        ] {
            let (t0, mut h) = landing(policy);
            assert_eq!(
                h.step(
                    at(t0, 5),
                    Event::Failed {
                        reason: "crc".into()
                    }
                ),
                vec![expected]
            );
        }
    }

    #[test]
    fn an_expired_lease_recomputes_under_the_recompute_policy() {
        let (t0, mut h) = landing(KvFailurePolicy::Recompute);
        let actions = h.step(at(t0, 3000), Event::Tick);
        assert_eq!(actions[0], Action::Forget);
        assert!(
            matches!(actions[1], Action::Recompute { .. }),
            "{actions:?}"
        );
    }

    #[test]
    fn a_closed_stream_forgets_the_handoff() {
        let (t0, mut h) = landing(KvFailurePolicy::Recompute);
        assert_eq!(h.step(t0, Event::StreamClosed), vec![Action::Forget]);
    }

    #[test]
    fn events_after_the_end_change_nothing() {
        let (t0, mut h) = landing(KvFailurePolicy::Fail);
        h.step(t0, Event::StreamClosed);
        for late in [
            Event::LayerLanded,
            Event::Keepalive,
            Event::Arrived { first_token: 1 },
            Event::Failed {
                reason: "late".into(),
            },
            Event::StreamClosed,
            Event::Tick,
        ] {
            assert!(h.step(at(t0, 99_000), late).is_empty());
            assert!(h.is_ended());
        }
    }
}
