//! The ledger's accounting, with no IO: which windows a request counts in, whether it fits,
//! and what opening or closing reservations does to the totals. [`SharedBook`](crate::SharedBook)
//! plans each change here and applies it whole.
//!
//! Invariant (for windows still current): `spent + reserved <= cap`, except by overruns, since
//! [`Book::admit`] grants a reservation only where it fits and settling at or below the amount
//! moves money from `reserved` to `spent` without growing the sum.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::money::Usd;
use crate::report::{Refusal, ReservationId, Settlement};
use crate::window::{Period, Scope};

/// A validated cap: what the ledger enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cap {
    pub scope: Scope,
    pub period: Period,
    pub limit: Usd,
}

/// One calendar window of one scope and period. The end is kept, not recomputed, so a
/// reservation from a run with another time zone still knows when its windows end.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct WindowRef {
    pub scope: Scope,
    pub period: Period,
    pub start: Timestamp,
    pub end: Timestamp,
}

/// Money charged to a window or an endpoint by closed reservations: the persisted part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Charges {
    pub spent: Usd,
    pub overrun: Usd,
    /// Reservations closed with a charge.
    pub settled: u64,
}

impl Charges {
    fn charge(&mut self, charged: Usd, overrun: Usd) {
        self.spent = self.spent.saturating_add(charged);
        self.overrun = self.overrun.saturating_add(overrun);
        self.settled += 1;
    }
}

/// A window's totals. `reserved` and `open` are derived from the open reservations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowTotals {
    pub charges: Charges,
    pub reserved: Usd,
    pub open: u64,
}

impl WindowTotals {
    /// spent + reserved: what the cap is compared with.
    pub fn used(&self) -> Usd {
        self.charges.spent.saturating_add(self.reserved)
    }
}

/// An open reservation. Its JSON form is the `reservations` table's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OpenEntry {
    pub endpoint: String,
    pub amount: Usd,
    pub request_id: String,
    pub created: Timestamp,
    /// The current window of every cap that covered the endpoint when it was granted; its
    /// charge goes to exactly these.
    pub windows: Vec<WindowRef>,
}

impl OpenEntry {
    /// A reservation of `amount` for `request_id` on `endpoint`, granted at `now` in `windows`.
    pub fn granted(
        endpoint: &str,
        amount: Usd,
        request_id: &str,
        now: Timestamp,
        windows: Vec<WindowRef>,
    ) -> OpenEntry {
        OpenEntry {
            endpoint: endpoint.to_string(),
            amount,
            request_id: request_id.to_string(),
            created: now,
            windows,
        }
    }
}

/// How a reservation ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Settled with this actual cost.
    Settled(Usd),
    /// Never sent: released at no cost.
    Cancelled,
    /// Its owner dropped it unsettled (or died holding it): charged in full.
    Dropped,
}

/// One planned update, applied whole. Window and endpoint entries hold the new totals of
/// everything touched.
#[derive(Clone, Debug)]
pub(crate) struct Changes {
    pub opened: Vec<(ReservationId, OpenEntry)>,
    pub closed: Vec<ReservationId>,
    pub windows: BTreeMap<WindowRef, WindowTotals>,
    pub endpoints: BTreeMap<String, Charges>,
    pub next_id: u64,
}

/// The in-memory totals: windows that are current or still have open reservations, every
/// open reservation, and lifetime totals per endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Book {
    windows: BTreeMap<WindowRef, WindowTotals>,
    open: BTreeMap<ReservationId, OpenEntry>,
    endpoints: BTreeMap<String, Charges>,
    next_id: u64,
}

impl Book {
    /// Rebuilds the book from its serialized parts: keeps the windows current at `now` or
    /// referenced by an open reservation, and derives their reserved amounts.
    pub fn restore(
        next_id: u64,
        open: BTreeMap<ReservationId, OpenEntry>,
        windows: impl IntoIterator<Item = (WindowRef, Charges)>,
        endpoints: BTreeMap<String, Charges>,
        now: Timestamp,
    ) -> Book {
        let mut book = Book {
            windows: BTreeMap::new(),
            next_id: open
                .keys()
                .map(|id| id.0 + 1)
                .max()
                .unwrap_or(1)
                .max(next_id),
            open: BTreeMap::new(),
            endpoints,
        };
        let referenced: BTreeSet<&WindowRef> = open.values().flat_map(|e| &e.windows).collect();
        for (window, charges) in windows {
            if window.end > now || referenced.contains(&window) {
                book.windows.insert(
                    window,
                    WindowTotals {
                        charges,
                        ..WindowTotals::default()
                    },
                );
            }
        }
        for entry in open.values() {
            for window in &entry.windows {
                let totals = book.windows.entry(window.clone()).or_default();
                totals.reserved = totals.reserved.saturating_add(entry.amount);
                totals.open += 1;
            }
        }
        book.open = open;
        book
    }

    /// Rebuilds a book from [`Book::parts`] as it was: every window kept, reserved amounts
    /// derived from the open reservations.
    pub fn rebuild(
        next_id: u64,
        open: BTreeMap<ReservationId, OpenEntry>,
        windows: Vec<(WindowRef, Charges)>,
        endpoints: BTreeMap<String, Charges>,
    ) -> Book {
        // `restore` keeps what is current at its `now` or referenced: at the earliest instant,
        // every window is current. The next id is taken as it was (restore would round a fresh
        // book's 0 up to 1, and replicas must agree on every id).
        let mut book = Book::restore(next_id, open, windows, endpoints, Timestamp::MIN);
        book.next_id = next_id;
        book
    }

    /// What [`Book::rebuild`] needs: the next id, the open reservations, each window's charges
    /// and the lifetime totals per endpoint.
    #[allow(clippy::type_complexity)]
    pub fn parts(
        &self,
    ) -> (
        u64,
        &BTreeMap<ReservationId, OpenEntry>,
        Vec<(WindowRef, Charges)>,
        &BTreeMap<String, Charges>,
    ) {
        let windows = self
            .windows
            .iter()
            .map(|(w, t)| (w.clone(), t.charges))
            .collect();
        (self.next_id, &self.open, windows, &self.endpoints)
    }

    /// A window's totals (zero for one never charged).
    pub fn totals(&self, window: &WindowRef) -> WindowTotals {
        self.windows.get(window).copied().unwrap_or_default()
    }

    pub fn open_reservations(&self) -> &BTreeMap<ReservationId, OpenEntry> {
        &self.open
    }

    pub fn endpoints(&self) -> &BTreeMap<String, Charges> {
        &self.endpoints
    }

    /// The current window of every cap covering `endpoint`, in cap order, if `amount` fits
    /// under all of them; otherwise the refusal to report (see [`Refusal`]).
    pub fn admit(
        &self,
        caps: &[Cap],
        tz: &TimeZone,
        now: Timestamp,
        endpoint: &str,
        amount: Usd,
    ) -> Result<Vec<WindowRef>, Refusal> {
        let mut windows = Vec::new();
        let mut refusal: Option<Refusal> = None;
        for cap in caps.iter().filter(|cap| cap.scope.covers(endpoint)) {
            let (start, end) = cap.period.window_at(now, tz);
            let window = WindowRef {
                scope: cap.scope.clone(),
                period: cap.period,
                start,
                end,
            };
            let totals = self.totals(&window);
            if totals.used().saturating_add(amount) > cap.limit {
                let candidate = Refusal {
                    scope: cap.scope.clone(),
                    period: cap.period,
                    cap: cap.limit,
                    spent: totals.charges.spent,
                    reserved: totals.reserved,
                    needed: amount,
                    resets_at: end,
                };
                if refusal.as_ref().is_none_or(|r| candidate.outranks(r)) {
                    refusal = Some(candidate);
                }
            }
            windows.push(window);
        }
        match refusal {
            Some(refusal) => Err(refusal),
            None => Ok(windows),
        }
    }

    /// Starts planning an update.
    pub fn changes(&self) -> Changes {
        Changes {
            opened: Vec::new(),
            closed: Vec::new(),
            windows: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            next_id: self.next_id,
        }
    }

    fn window_in(&self, changes: &Changes, window: &WindowRef) -> WindowTotals {
        changes
            .windows
            .get(window)
            .copied()
            .unwrap_or_else(|| self.totals(window))
    }

    /// Plans a new reservation (already admitted) and returns its id.
    pub fn plan_open(&self, changes: &mut Changes, entry: OpenEntry) -> ReservationId {
        let id = ReservationId(changes.next_id);
        changes.next_id += 1;
        for window in &entry.windows {
            let mut totals = self.window_in(changes, window);
            totals.reserved = totals.reserved.saturating_add(entry.amount);
            totals.open += 1;
            changes.windows.insert(window.clone(), totals);
        }
        changes.opened.push((id, entry));
        id
    }

    /// Plans closing reservation `id`; `None` if it is not open (or already closed in
    /// `changes`).
    pub fn plan_close(
        &self,
        changes: &mut Changes,
        id: ReservationId,
        outcome: Outcome,
    ) -> Option<Settlement> {
        if changes.closed.contains(&id) {
            return None;
        }
        let entry = self.open.get(&id)?;
        let charge = match outcome {
            Outcome::Settled(actual) => Some(Settlement {
                charged: actual,
                overrun: actual.saturating_sub(entry.amount),
            }),
            Outcome::Cancelled => None,
            Outcome::Dropped => Some(Settlement {
                charged: entry.amount,
                overrun: Usd::ZERO,
            }),
        };
        for window in &entry.windows {
            let mut totals = self.window_in(changes, window);
            totals.reserved = totals.reserved.saturating_sub(entry.amount);
            totals.open = totals.open.saturating_sub(1);
            if let Some(s) = charge {
                totals.charges.charge(s.charged, s.overrun);
            }
            changes.windows.insert(window.clone(), totals);
        }
        if let Some(s) = charge {
            let mut lifetime = changes
                .endpoints
                .get(&entry.endpoint)
                .or_else(|| self.endpoints.get(&entry.endpoint))
                .copied()
                .unwrap_or_default();
            lifetime.charge(s.charged, s.overrun);
            changes.endpoints.insert(entry.endpoint.clone(), lifetime);
        }
        let settlement = charge.unwrap_or(Settlement {
            charged: Usd::ZERO,
            overrun: Usd::ZERO,
        });
        changes.closed.push(id);
        Some(settlement)
    }

    /// Applies planned changes, then forgets windows that ended with nothing open in them.
    pub fn apply(&mut self, changes: Changes, now: Timestamp) {
        for id in &changes.closed {
            self.open.remove(id);
        }
        self.open.extend(changes.opened);
        self.windows.extend(changes.windows);
        self.endpoints.extend(changes.endpoints);
        self.next_id = changes.next_id;
        self.windows.retain(|w, t| w.end > now || t.open > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn dollars(d: f64) -> Usd {
        Usd::from_dollars(d).unwrap_or(Usd::ZERO)
    }

    fn caps() -> Vec<Cap> {
        vec![
            Cap {
                scope: Scope::Global,
                period: Period::Hour,
                limit: dollars(1.0),
            },
            Cap {
                scope: Scope::Global,
                period: Period::Day,
                limit: dollars(2.0),
            },
            Cap {
                scope: Scope::Endpoint("a".into()),
                period: Period::Hour,
                limit: dollars(0.5),
            },
        ]
    }

    fn entry(endpoint: &str, amount: Usd, windows: Vec<WindowRef>) -> OpenEntry {
        OpenEntry {
            endpoint: endpoint.into(),
            amount,
            request_id: "r".into(),
            created: ts("2026-12-07T10:00:00Z"),
            windows,
        }
    }

    fn reserve(
        book: &mut Book,
        endpoint: &str,
        amount: Usd,
        now: Timestamp,
    ) -> Result<ReservationId, Refusal> {
        let windows = book.admit(&caps(), &TimeZone::UTC, now, endpoint, amount)?;
        let mut changes = book.changes();
        let id = book.plan_open(&mut changes, entry(endpoint, amount, windows));
        book.apply(changes, now);
        Ok(id)
    }

    #[test]
    fn admit_counts_global_and_own_endpoint_caps_only() {
        let book = Book::default();
        let now = ts("2026-12-07T10:30:00Z");
        let a = book.admit(&caps(), &TimeZone::UTC, now, "a", dollars(0.1));
        assert_eq!(a.map(|w| w.len()).ok(), Some(3));
        let b = book.admit(&caps(), &TimeZone::UTC, now, "b", dollars(0.1));
        assert_eq!(b.map(|w| w.len()).ok(), Some(2));
    }

    #[test]
    fn admit_refuses_at_the_cap_boundary_plus_one_nano() {
        let mut book = Book::default();
        let now = ts("2026-12-07T10:30:00Z");
        assert!(reserve(&mut book, "a", dollars(0.5), now).is_ok());
        let refusal = reserve(&mut book, "a", Usd::from_nanos(1), now).err();
        assert_eq!(refusal.map(|r| r.scope), Some(Scope::Endpoint("a".into())));
        // Another endpoint still fits under the global caps.
        assert!(reserve(&mut book, "b", dollars(0.5), now).is_ok());
        assert!(reserve(&mut book, "b", Usd::from_nanos(1), now).is_err());
    }

    #[test]
    fn refusal_prefers_the_window_that_resets_last() {
        let mut book = Book::default();
        let now = ts("2026-12-07T10:30:00Z");
        assert!(reserve(&mut book, "b", dollars(1.0), now).is_ok());
        // Hour (1.0 used) and endpoint hour refuse 0.6; the hour ones reset at 11:00.
        let r = book
            .admit(&caps(), &TimeZone::UTC, now, "a", dollars(0.6))
            .err();
        assert_eq!(r.as_ref().map(|r| r.period), Some(Period::Hour));
        assert_eq!(
            r.as_ref().map(|r| r.scope.clone()),
            Some(Scope::Endpoint("a".into()))
        );
        // A request above the day cap never fits: that is the one reported.
        let r = book
            .admit(&caps(), &TimeZone::UTC, now, "b", dollars(3.0))
            .err();
        assert_eq!(
            r.map(|r| (r.period, r.never_fits())),
            Some((Period::Day, true))
        );
    }

    #[test]
    fn settling_below_amount_frees_the_difference() {
        let mut book = Book::default();
        let now = ts("2026-12-07T10:30:00Z");
        let id = reserve(&mut book, "a", dollars(0.5), now).unwrap_or(ReservationId(0));
        let mut changes = book.changes();
        let s = book.plan_close(&mut changes, id, Outcome::Settled(dollars(0.2)));
        assert_eq!(s.map(|s| s.charged), Some(dollars(0.2)));
        // A second close of the same id in one update is refused.
        assert!(
            book.plan_close(&mut changes, id, Outcome::Cancelled)
                .is_none()
        );
        book.apply(changes, now);
        assert!(reserve(&mut book, "a", dollars(0.3), now).is_ok());
        assert!(reserve(&mut book, "a", Usd::from_nanos(1), now).is_err());
        assert_eq!(book.endpoints().get("a").map(|c| c.settled), Some(1));
    }

    #[test]
    fn ended_windows_are_forgotten_once_nothing_is_open_in_them() {
        let mut book = Book::default();
        let now = ts("2026-12-07T10:30:00Z");
        let id = reserve(&mut book, "b", dollars(0.5), now).unwrap_or(ReservationId(0));
        let later = ts("2026-12-07T11:30:00Z");
        let mut changes = book.changes();
        book.apply(changes.clone(), later);
        assert_eq!(
            book.windows.len(),
            2,
            "the old hour still holds an open reservation"
        );
        book.plan_close(&mut changes, id, Outcome::Dropped);
        book.apply(changes, later);
        assert_eq!(book.windows.len(), 1, "only the day remains current");
    }
}
