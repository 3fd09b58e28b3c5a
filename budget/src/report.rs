//! What the ledger tells its callers: why a request was refused ([`Refusal`]), what a settle
//! charged ([`Settlement`]), and the state of every cap ([`Snapshot`]) for `/budget` and
//! metrics. Plain data, serializable.

use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::money::Usd;
use crate::window::{Period, Scope};

/// A reservation's number, unique in its ledger file for good (ids survive restarts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReservationId(pub u64);

impl ReservationId {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a request cannot be covered: one cap that refuses it. Where several refuse, the one
/// reported is the first of: a cap smaller than the request itself (it will never fit), then
/// the one whose window resets last (the earliest moment a retry can succeed), then the first
/// in config order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The refusing cap's scope.
    pub scope: Scope,
    /// The refusing cap's period.
    pub period: Period,
    /// The cap.
    pub cap: Usd,
    /// Settled in the current window (overruns included).
    pub spent: Usd,
    /// Held by open reservations in the current window.
    pub reserved: Usd,
    /// What this request would reserve.
    pub needed: Usd,
    /// When the current window ends and the cap starts again from zero.
    pub resets_at: Timestamp,
}

impl Refusal {
    /// What the window has left: cap - spent - reserved, or zero.
    pub fn left(&self) -> Usd {
        self.cap
            .saturating_sub(self.spent.saturating_add(self.reserved))
    }

    /// Whether the request costs more than the whole cap, so no reset will make it fit.
    pub fn never_fits(&self) -> bool {
        self.needed > self.cap
    }

    /// Whether `self` is the better refusal to report than `other` (see the type's doc).
    pub(crate) fn outranks(&self, other: &Refusal) -> bool {
        (self.never_fits(), self.resets_at) > (other.never_fits(), other.resets_at)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.never_fits() {
            write!(
                f,
                "the cloud budget cannot cover this request: it may cost {}, more than the whole {} cap of {} ({})",
                self.needed, self.period, self.cap, self.scope
            )
        } else {
            write!(
                f,
                "the cloud budget is spent: the {} cap of {} ({}) has {} left and this request may cost {}; the window resets at {}",
                self.period,
                self.cap,
                self.scope,
                self.left(),
                self.needed,
                self.resets_at
            )
        }
    }
}

impl std::error::Error for Refusal {}

/// What settling a reservation charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// Recorded as spent in each of the reservation's windows (the actual cost).
    pub charged: Usd,
    /// How far the actual cost passed the reservation (zero when it did not).
    pub overrun: Usd,
}

/// The ledger at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken (the ledger's clock).
    pub now: Timestamp,
    /// One per configured cap, in config order: its current window.
    pub windows: Vec<WindowReport>,
    /// Lifetime totals per endpoint that was ever charged, by name.
    pub endpoints: Vec<EndpointTotals>,
    /// Reservations not yet settled, by id.
    pub open: Vec<OpenReservation>,
}

/// One cap's current window. Amounts serialize as nanodollars; `Display` shows dollars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowReport {
    /// Whose spending the cap limits.
    pub scope: Scope,
    /// The cap's period.
    pub period: Period,
    /// Window start (inclusive).
    pub start: Timestamp,
    /// Window end (exclusive): when the cap resets.
    pub end: Timestamp,
    /// The cap.
    pub cap: Usd,
    /// Charged by settled, dropped and abandoned reservations (overruns included).
    pub spent: Usd,
    /// Held by open reservations.
    pub reserved: Usd,
    /// cap - spent - reserved, or zero.
    pub remaining: Usd,
    /// Actual costs above their reservations, summed (part of `spent`).
    pub overrun: Usd,
    /// Reservations closed with a charge (settled, dropped or abandoned; not cancelled).
    pub settled: u64,
    /// Reservations open in this window.
    pub open: u64,
}

impl fmt::Display for WindowReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cap of {} ({}): spent {}, reserved {}, remaining {}",
            self.period, self.cap, self.scope, self.spent, self.reserved, self.remaining
        )?;
        if self.overrun > Usd::ZERO {
            write!(f, " (overrun {})", self.overrun)?;
        }
        write!(f, "; resets at {}", self.end)
    }
}

/// One endpoint's spending since the ledger file was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointTotals {
    /// The endpoint's configured name.
    pub endpoint: String,
    /// Charged in total (overruns included).
    pub spent: Usd,
    /// Actual costs above their reservations, summed.
    pub overrun: Usd,
    /// Reservations closed with a charge.
    pub settled: u64,
}

/// A reservation not yet settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReservation {
    /// Its id.
    pub id: ReservationId,
    /// The endpoint it was made for.
    pub endpoint: String,
    /// The worst-case cost held against the caps.
    pub amount: Usd,
    /// The request it covers (the coordinator's request id).
    pub request_id: String,
    /// When it was granted.
    pub created: Timestamp,
    /// Left over from a run that ended without settling it; it is charged in full once every
    /// window it counts in has ended.
    pub from_previous_run: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(needed: u64) -> Refusal {
        Refusal {
            scope: Scope::Global,
            period: Period::Day,
            cap: Usd::from_nanos(5_000_000_000),
            spent: Usd::from_nanos(4_500_000_000),
            reserved: Usd::from_nanos(380_000_000),
            needed: Usd::from_nanos(needed),
            resets_at: Timestamp::from_second(1_796_688_000).unwrap_or(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn refusal_message_says_what_is_left_and_when_it_resets() {
        assert_eq!(
            refusal(300_000_000).to_string(),
            "the cloud budget is spent: the day cap of $5.00 (global) has $0.12 left and this \
             request may cost $0.30; the window resets at 2026-12-08T00:00:00Z"
        );
    }

    #[test]
    fn refusal_larger_than_the_cap_says_it_never_fits() {
        let r = refusal(9_000_000_000);
        assert!(r.never_fits());
        assert_eq!(
            r.to_string(),
            "the cloud budget cannot cover this request: it may cost $9.00, more than the whole \
             day cap of $5.00 (global)"
        );
    }
}
