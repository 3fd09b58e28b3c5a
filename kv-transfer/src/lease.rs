//! Leases: every pinned block set (the decode worker's reservation in push, the prefill worker's
//! kept KV in pull) has a time to live, renewed while its handoff makes progress, and ends
//! exactly once: released, or expired.
//!
//! coordinator --Reserve / Prefill(pull)--> worker: `Leases::grant` ... progress: `renew` ...
//!     completion or cancel: `release`; nothing heard within the TTL: `expire` returns it.
//!
//! Pure bookkeeping with the clock passed in, so the owner (the worker's engine thread) decides
//! what an expiry frees and tests drive time by hand. The value `T` is whatever the owner must
//! free; it leaves the table exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::frame::HandoffId;

/// Why a lease was granted; part of every log line and counter about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseKind {
    /// Decode worker blocks reserved for a push handoff.
    PushReservation,
    /// Prefill worker KV kept for a pull handoff.
    PullSource,
}

impl LeaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseKind::PushReservation => "push_reservation",
            LeaseKind::PullSource => "pull_source",
        }
    }
}

#[derive(Debug)]
struct Lease<T> {
    kind: LeaseKind,
    ttl: Duration,
    deadline: Instant,
    value: T,
}

/// The live leases of one worker, by handoff.
#[derive(Debug)]
pub struct Leases<T> {
    live: HashMap<HandoffId, Lease<T>>,
    max_ttl: Duration,
}

/// Why [`Leases::grant`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("handoff {0} already holds a lease")]
    Duplicate(HandoffId),
    #[error("lease ttl {ttl:?} is outside 1 ms..={max:?}")]
    BadTtl { ttl: Duration, max: Duration },
}

impl<T> Leases<T> {
    /// `max_ttl` bounds what a caller may ask for, so no request pins blocks for long.
    pub fn new(max_ttl: Duration) -> Self {
        Self {
            live: HashMap::new(),
            max_ttl,
        }
    }

    /// Pins `value` for `handoff` until `now + ttl` unless renewed.
    pub fn grant(
        &mut self,
        handoff: HandoffId,
        kind: LeaseKind,
        ttl: Duration,
        now: Instant,
        value: T,
    ) -> Result<(), LeaseError> {
        if ttl < Duration::from_millis(1) || ttl > self.max_ttl {
            return Err(LeaseError::BadTtl {
                ttl,
                max: self.max_ttl,
            });
        }
        if self.live.contains_key(&handoff) {
            return Err(LeaseError::Duplicate(handoff));
        }
        self.live.insert(
            handoff,
            Lease {
                kind,
                ttl,
                deadline: now + ttl,
                value,
            },
        );
        Ok(())
    }

    /// Pushes the deadline to `now + ttl`; the handoff showed progress. Returns whether it was
    /// live.
    pub fn renew(&mut self, handoff: HandoffId, now: Instant) -> bool {
        match self.live.get_mut(&handoff) {
            Some(l) => {
                l.deadline = l.deadline.max(now + l.ttl);
                true
            }
            None => false,
        }
    }

    /// Ends a lease (completed or cancelled) and hands back what it pinned.
    pub fn release(&mut self, handoff: HandoffId) -> Option<T> {
        self.live.remove(&handoff).map(|l| l.value)
    }

    pub fn get(&self, handoff: HandoffId) -> Option<&T> {
        self.live.get(&handoff).map(|l| &l.value)
    }

    pub fn get_mut(&mut self, handoff: HandoffId) -> Option<&mut T> {
        self.live.get_mut(&handoff).map(|l| &mut l.value)
    }

    pub fn contains(&self, handoff: HandoffId) -> bool {
        self.live.contains_key(&handoff)
    }

    /// Removes and returns every lease whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(HandoffId, LeaseKind, T)> {
        let due: Vec<HandoffId> = self
            .live
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(h, _)| *h)
            .collect();
        due.into_iter()
            .filter_map(|h| self.live.remove(&h).map(|l| (h, l.kind, l.value)))
            .collect()
    }

    /// The earliest deadline, for the owner's wake-up.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.live.values().map(|l| l.deadline).min()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Ends every lease (shutdown, drain past its deadline).
    pub fn drain(&mut self) -> Vec<(HandoffId, T)> {
        self.live.drain().map(|(h, l)| (h, l.value)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(2);

    fn leases() -> Leases<u32> {
        Leases::new(Duration::from_secs(60))
    }

    #[test]
    fn lease_expires_after_ttl_without_renewal() {
        let t0 = Instant::now();
        let mut l = leases();
        l.grant(HandoffId(1), LeaseKind::PullSource, TTL, t0, 7)
            .expect("grant");
        assert!(l.expire(t0 + TTL - Duration::from_millis(1)).is_empty());
        assert_eq!(
            l.expire(t0 + TTL),
            vec![(HandoffId(1), LeaseKind::PullSource, 7)]
        );
        assert!(l.is_empty());
        assert!(l.expire(t0 + TTL * 10).is_empty(), "expires exactly once");
    }

    #[test]
    fn renewal_moves_the_deadline() {
        let t0 = Instant::now();
        let mut l = leases();
        l.grant(HandoffId(1), LeaseKind::PushReservation, TTL, t0, 1)
            .expect("grant");
        assert!(l.renew(HandoffId(1), t0 + Duration::from_secs(1)));
        assert!(l.expire(t0 + TTL).is_empty());
        assert_eq!(l.next_deadline(), Some(t0 + Duration::from_secs(3)));
        assert_eq!(l.expire(t0 + Duration::from_secs(3)).len(), 1);
    }

    #[test]
    fn released_lease_never_expires() {
        let t0 = Instant::now();
        let mut l = leases();
        l.grant(HandoffId(1), LeaseKind::PullSource, TTL, t0, 5)
            .expect("grant");
        assert_eq!(l.release(HandoffId(1)), Some(5));
        assert_eq!(l.release(HandoffId(1)), None);
        assert!(!l.renew(HandoffId(1), t0));
        assert!(l.expire(t0 + TTL * 2).is_empty());
    }

    #[test]
    fn grant_refuses_duplicates_and_unbounded_ttls() {
        let t0 = Instant::now();
        let mut l = leases();
        l.grant(HandoffId(1), LeaseKind::PullSource, TTL, t0, 0)
            .expect("grant");
        assert_eq!(
            l.grant(HandoffId(1), LeaseKind::PullSource, TTL, t0, 0),
            Err(LeaseError::Duplicate(HandoffId(1)))
        );
        assert!(matches!(
            l.grant(
                HandoffId(2),
                LeaseKind::PullSource,
                Duration::from_secs(61),
                t0,
                0
            ),
            Err(LeaseError::BadTtl { .. })
        ));
        assert!(matches!(
            l.grant(HandoffId(3), LeaseKind::PullSource, Duration::ZERO, t0, 0),
            Err(LeaseError::BadTtl { .. })
        ));
    }
}
