//! The ledger's accounting as a state that several coordinators share through a replicated log
//! (crate `baton-replica`): the [`Book`]'s decisions, applied without IO from commands that
//! carry their own time and caps, so every replica that applies the same commands in the same
//! order holds the same ledger. Durability is the log's: the replica persists this state with
//! the id of the last entry it applied.
//!
//! A reservation is decided when its command is applied, not when it is proposed: two
//! coordinators reserving the last dollar at once are ordered by the log, and the second is
//! refused.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::book::{Book, Cap, Charges, OpenEntry, Outcome, WindowRef};
use crate::config::CapConfig;
use crate::money::Usd;
use crate::report::{
    EndpointTotals, OpenReservation, Refusal, ReservationId, Settlement, Snapshot, WindowReport,
};

#[cfg(test)]
mod model_tests;

/// Why a shared reservation was not granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SharedRefusal {
    /// A cap has no room.
    #[error(transparent)]
    Refused(Refusal),
    /// The command's caps or zone cannot be used (a proposer with a broken config).
    #[error("invalid budget in the command: {0}")]
    Invalid(String),
}

/// How a shared reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Close {
    /// The upstream reported usage costing this much.
    Settled(Usd),
    /// Never sent: free.
    Cancelled,
    /// Ended without usage (a cut stream): charged in full.
    Dropped,
}

/// The shared ledger's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedBook {
    book: Book,
}

/// Caps and zone validated from a command.
fn limits(caps: &[CapConfig], time_zone: &str) -> Result<(Vec<Cap>, TimeZone), String> {
    let tz = TimeZone::get(time_zone).map_err(|e| format!("time zone {time_zone:?}: {e}"))?;
    let caps = caps
        .iter()
        .enumerate()
        .map(|(i, cap)| {
            Ok(Cap {
                scope: cap.scope(),
                period: cap.period,
                limit: cap
                    .cap()
                    .ok_or_else(|| format!("caps[{i}].cap_usd must be a positive amount"))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((caps, tz))
}

impl SharedBook {
    /// Reserves `amount` against the current window (at `now`) of every cap in `caps` covering
    /// `endpoint`, or refuses; windows that ended with nothing open are forgotten on the way.
    pub fn reserve(
        &mut self,
        caps: &[CapConfig],
        time_zone: &str,
        now: Timestamp,
        endpoint: &str,
        amount: Usd,
        request_id: &str,
    ) -> Result<ReservationId, SharedRefusal> {
        let (caps, tz) = limits(caps, time_zone).map_err(SharedRefusal::Invalid)?;
        let windows = self
            .book
            .admit(&caps, &tz, now, endpoint, amount)
            .map_err(SharedRefusal::Refused)?;
        let mut changes = self.book.changes();
        let id = self.book.plan_open(
            &mut changes,
            OpenEntry::granted(endpoint, amount, request_id, now, windows),
        );
        self.book.apply(changes, now);
        Ok(id)
    }

    /// Non-binding: would `amount` fit under every cap of `caps` covering `endpoint` at `now`?
    /// A later [`reserve`](SharedBook::reserve) may still be refused.
    pub fn check(
        &self,
        caps: &[CapConfig],
        time_zone: &str,
        now: Timestamp,
        endpoint: &str,
        amount: Usd,
    ) -> Result<(), SharedRefusal> {
        let (caps, tz) = limits(caps, time_zone).map_err(SharedRefusal::Invalid)?;
        self.book
            .admit(&caps, &tz, now, endpoint, amount)
            .map(drop)
            .map_err(SharedRefusal::Refused)
    }

    /// Closes reservation `id`; `None` if it is not open (closed already: a retried close).
    pub fn close(&mut self, now: Timestamp, id: ReservationId, how: Close) -> Option<Settlement> {
        let outcome = match how {
            Close::Settled(cost) => Outcome::Settled(cost),
            Close::Cancelled => Outcome::Cancelled,
            Close::Dropped => Outcome::Dropped,
        };
        let mut changes = self.book.changes();
        let settlement = self.book.plan_close(&mut changes, id, outcome)?;
        self.book.apply(changes, now);
        Some(settlement)
    }

    /// Every cap's window at `now`, lifetime totals per endpoint, and the open reservations,
    /// as `baton budget` and the metrics report them.
    pub fn snapshot(
        &self,
        caps: &[CapConfig],
        time_zone: &str,
        now: Timestamp,
    ) -> Result<Snapshot, String> {
        let (limits, tz) = limits(caps, time_zone)?;
        Ok(report(&self.book, &limits, &tz, now))
    }
}

/// The report of `book` at `now` under `limits` (in config order).
fn report(book: &Book, limits: &[Cap], tz: &TimeZone, now: Timestamp) -> Snapshot {
    let windows = limits
        .iter()
        .map(|cap| {
            let (start, end) = cap.period.window_at(now, tz);
            let totals = book.totals(&WindowRef {
                scope: cap.scope.clone(),
                period: cap.period,
                start,
                end,
            });
            WindowReport {
                scope: cap.scope.clone(),
                period: cap.period,
                start,
                end,
                cap: cap.limit,
                spent: totals.charges.spent,
                reserved: totals.reserved,
                remaining: cap.limit.saturating_sub(totals.used()),
                overrun: totals.charges.overrun,
                settled: totals.charges.settled,
                open: totals.open,
            }
        })
        .collect();
    let endpoints = book
        .endpoints()
        .iter()
        .map(|(name, c)| EndpointTotals {
            endpoint: name.clone(),
            spent: c.spent,
            overrun: c.overrun,
            settled: c.settled,
        })
        .collect();
    let open = book
        .open_reservations()
        .iter()
        .map(|(id, e)| OpenReservation {
            id: *id,
            endpoint: e.endpoint.clone(),
            amount: e.amount,
            request_id: e.request_id.clone(),
            created: e.created,
            // The book cannot tell: the replicated state knows each reservation's owner.
            from_previous_run: false,
        })
        .collect();
    Snapshot {
        now,
        windows,
        endpoints,
        open,
    }
}

/// The serialized form: the book's parts as lists (JSON maps need string
/// keys), from which the book is rebuilt.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Form {
    next_id: u64,
    open: Vec<(ReservationId, OpenEntry)>,
    windows: Vec<(WindowRef, Charges)>,
    endpoints: BTreeMap<String, Charges>,
}

impl Serialize for SharedBook {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (next_id, open, windows, endpoints) = self.book.parts();
        Form {
            next_id,
            open: open.iter().map(|(id, e)| (*id, e.clone())).collect(),
            windows,
            endpoints: endpoints.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedBook {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = Form::deserialize(d)?;
        Ok(SharedBook {
            book: Book::rebuild(
                f.next_id,
                f.open.into_iter().collect(),
                f.windows,
                f.endpoints,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::Period;

    fn caps(dollars: f64) -> Vec<CapConfig> {
        vec![CapConfig {
            period: Period::Day,
            cap_usd: dollars,
            endpoint: None,
        }]
    }

    fn usd(d: f64) -> Usd {
        Usd::from_dollars(d).unwrap_or(Usd::ZERO)
    }

    const NOW: &str = "2026-12-07T12:00:00Z";

    fn now() -> Timestamp {
        NOW.parse().unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn the_cap_holds_and_settling_frees_the_difference() {
        let mut b = SharedBook::default();
        let a = b.reserve(&caps(1.0), "UTC", now(), "up", usd(0.6), "r1");
        assert!(a.is_ok());
        let refused = b.reserve(&caps(1.0), "UTC", now(), "up", usd(0.6), "r2");
        assert!(matches!(refused, Err(SharedRefusal::Refused(_))));
        let id = a.unwrap_or(ReservationId(0));
        let s = b.close(now(), id, Close::Settled(usd(0.1)));
        assert_eq!(s.map(|s| s.charged), Some(usd(0.1)));
        assert_eq!(b.close(now(), id, Close::Dropped), None, "closed once");
        assert!(
            b.reserve(&caps(1.0), "UTC", now(), "up", usd(0.6), "r3")
                .is_ok()
        );
        let snap = b.snapshot(&caps(1.0), "UTC", now()).expect("valid caps");
        assert_eq!(snap.windows[0].spent, usd(0.1));
        assert_eq!(snap.windows[0].reserved, usd(0.6));
    }

    #[test]
    fn it_survives_serialization_exactly() {
        let mut b = SharedBook::default();
        for i in 0..5 {
            let _ = b.reserve(&caps(10.0), "UTC", now(), "up", usd(0.5), &format!("r{i}"));
        }
        let _ = b.close(now(), ReservationId(2), Close::Settled(usd(0.25)));
        let json = serde_json::to_string(&b).expect("serializes");
        let back: SharedBook = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, b);
    }

    #[test]
    fn a_fresh_book_round_trips_with_its_next_id() {
        let b = SharedBook::default();
        let json = serde_json::to_string(&b).expect("serializes");
        assert_eq!(
            serde_json::from_str::<SharedBook>(&json).expect("deserializes"),
            b
        );
    }

    #[test]
    fn a_broken_cap_in_a_command_is_refused_not_applied() {
        let mut b = SharedBook::default();
        let r = b.reserve(&caps(-1.0), "UTC", now(), "up", usd(0.1), "r");
        assert!(matches!(r, Err(SharedRefusal::Invalid(_))));
        let r = b.reserve(&caps(1.0), "Mars/Base", now(), "up", usd(0.1), "r");
        assert!(matches!(r, Err(SharedRefusal::Invalid(_))));
        assert_eq!(b, SharedBook::default());
    }
}
