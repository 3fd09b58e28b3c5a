//! The durable ledger: the one place cloud spend is decided and recorded.
//!
//! One mutex guards the redb file and the in-memory [`Book`] together and is held from the cap
//! check through the fsynced commit, so two reservations can never both take the last dollar,
//! and the file records them in the order they were granted. Every change is planned on the
//! book, committed to the file, and only then applied to memory: if the commit fails, memory
//! still matches the file.
//!
//! The ledger's time never goes backwards: a wall clock stepped back is held at the latest
//! moment already seen, so a window that ended is never reopened.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::book::{Book, Cap, Changes, OpenEntry, Outcome, WindowRef};
use crate::clock::Clock;
use crate::config::{BudgetConfig, CapConfig};
use crate::error::{Error, Result};
use crate::money::Usd;
use crate::report::{
    EndpointTotals, OpenReservation, Refusal, ReservationId, Settlement, Snapshot, WindowReport,
};
use crate::store::Store;

#[cfg(test)]
mod model_tests;

/// Cloud spend against the configured caps, persisted. Shared as `Arc<Ledger>`; each granted
/// reservation is a [`Reservation`] that holds the ledger until it is settled.
pub struct Ledger {
    caps: Vec<CapConfig>,
    limits: Vec<Cap>,
    tz: TimeZone,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

/// What the mutex owns: the file and the totals that mirror it.
struct State {
    store: Store,
    book: Book,
    last_now: Timestamp,
}

/// Why [`Ledger::reserve`] did not grant a reservation.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// A cap has no room for the request.
    #[error(transparent)]
    Refused(Refusal),
    /// The ledger could not record the reservation; nothing was reserved.
    #[error(transparent)]
    Storage(Error),
}

impl Ledger {
    /// Opens (creating) the ledger file, loads windows and open reservations, and closes
    /// leftovers from a previous run whose windows have all ended, charging their full amount
    /// (the upstream may have billed them). Fails with [`Error::InUse`] if another process (or
    /// another `Ledger` here) has the file open.
    pub fn open(config: &BudgetConfig, clock: Arc<dyn Clock>) -> Result<Arc<Ledger>> {
        config.validate()?;
        let tz = config.time_zone()?;
        let limits = config
            .caps
            .iter()
            .enumerate()
            .map(|(i, cap)| {
                let limit = cap.cap().ok_or_else(|| {
                    Error::invalid_config(
                        format!("budget.caps[{i}].cap_usd"),
                        "must be a positive number of dollars",
                    )
                })?;
                Ok(Cap {
                    scope: cap.scope(),
                    period: cap.period,
                    limit,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let store = Store::open(&config.ledger)?;
        let now = clock.now();
        let mut book = store.load(now)?;
        let mut changes = book.changes();
        for id in book.expired_leftovers(now) {
            book.plan_close(&mut changes, id, Outcome::Abandoned);
        }
        if !changes.is_empty() {
            store.commit(&changes)?;
            log_closed(&changes);
        }
        book.apply(changes, now);
        tracing::info!(
            ledger = %config.ledger.display(),
            time_zone = %config.time_zone,
            caps = limits.len(),
            leftovers = book.open_reservations().len(),
            "budget ledger opened"
        );
        Ok(Arc::new(Ledger {
            caps: config.caps.clone(),
            limits,
            tz,
            path: config.ledger.clone(),
            clock,
            state: Mutex::new(State {
                store,
                book,
                last_now: now,
            }),
        }))
    }

    /// Non-binding: would `amount` fit under every cap covering `endpoint` right now? A later
    /// [`reserve`](Ledger::reserve) may still be refused.
    pub fn check(&self, endpoint: &str, amount: Usd) -> Result<(), Refusal> {
        let mut state = self.lock();
        let now = self.now(&mut state);
        state
            .book
            .admit(&self.limits, &self.tz, now, endpoint, amount)
            .map(drop)
    }

    /// Reserves `amount` (the request's worst-case cost) against the current window of every
    /// global cap and every cap of `endpoint`, or none of them; recorded durably before it
    /// returns. Leftovers from a previous run whose windows have ended are closed in the same
    /// commit.
    pub fn reserve(
        self: &Arc<Self>,
        endpoint: &str,
        amount: Usd,
        request_id: &str,
    ) -> Result<Reservation, ReserveError> {
        let mut state = self.lock();
        let now = self.now(&mut state);
        let windows = state
            .book
            .admit(&self.limits, &self.tz, now, endpoint, amount)
            .map_err(ReserveError::Refused)?;
        let mut changes = state.book.changes();
        for leftover in state.book.expired_leftovers(now) {
            state
                .book
                .plan_close(&mut changes, leftover, Outcome::Abandoned);
        }
        let id = state.book.plan_open(
            &mut changes,
            OpenEntry::granted(endpoint, amount, request_id, now, windows),
        );
        state
            .store
            .commit(&changes)
            .map_err(ReserveError::Storage)?;
        log_closed(&changes);
        state.book.apply(changes, now);
        drop(state);
        tracing::debug!(%id, endpoint, %amount, request_id, "cloud budget reserved");
        Ok(Reservation {
            ledger: Arc::clone(self),
            id,
            amount,
            open: true,
        })
    }

    /// Every cap's current window, lifetime totals per endpoint, and the open reservations.
    pub fn snapshot(&self) -> Snapshot {
        let mut state = self.lock();
        let now = self.now(&mut state);
        report(&state.book, &self.limits, &self.tz, now)
    }

    /// The configured caps, in config order (the order of [`Snapshot::windows`]).
    pub fn caps(&self) -> &[CapConfig] {
        &self.caps
    }

    /// The zone the windows are aligned in.
    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn close(&self, id: ReservationId, outcome: Outcome) -> Result<Settlement> {
        let mut state = self.lock();
        let now = self.now(&mut state);
        let mut changes = state.book.changes();
        let settlement = state
            .book
            .plan_close(&mut changes, id, outcome)
            .ok_or_else(|| Error::corrupt(format!("reservation {id}"), "is not open"))?;
        state.store.commit(&changes)?;
        log_closed(&changes);
        state.book.apply(changes, now);
        Ok(settlement)
    }

    /// A poisoned lock is taken anyway: memory changes only after a commit succeeds, so a
    /// panic elsewhere under the lock cannot have left the book and the file disagreeing.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self, state: &mut State) -> Timestamp {
        state.last_now = state.last_now.max(self.clock.now());
        state.last_now
    }
}

impl fmt::Debug for Ledger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

/// The report of `book` at `now` under `limits` (in config order), for the single ledger and
/// the shared one alike.
pub(crate) fn report(book: &Book, limits: &[Cap], tz: &TimeZone, now: Timestamp) -> Snapshot {
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
            from_previous_run: e.from_previous_run,
        })
        .collect();
    Snapshot {
        now,
        windows,
        endpoints,
        open,
    }
}

fn log_closed(changes: &Changes) {
    for closed in &changes.closed {
        let (id, e, s) = (closed.id, &closed.entry, closed.settlement);
        match closed.outcome {
            Outcome::Settled(_) if s.overrun > Usd::ZERO => tracing::warn!(
                %id, endpoint = %e.endpoint, request_id = %e.request_id,
                reserved = %e.amount, charged = %s.charged, overrun = %s.overrun,
                "cloud request cost more than its reservation; charged in full"
            ),
            Outcome::Settled(_) | Outcome::Cancelled => tracing::debug!(
                %id, endpoint = %e.endpoint, charged = %s.charged, "cloud budget settled"
            ),
            Outcome::Dropped => tracing::warn!(
                %id, endpoint = %e.endpoint, request_id = %e.request_id, charged = %s.charged,
                "cloud reservation dropped without a settle (no usage reported); charged its full amount"
            ),
            Outcome::Abandoned => tracing::warn!(
                %id, endpoint = %e.endpoint, request_id = %e.request_id, created = %e.created,
                charged = %s.charged,
                "cloud reservation left open by a previous run; its windows have ended, charged its full amount"
            ),
        }
    }
}

/// One reservation's owner. Exactly one of settle / cancel / drop charges it; ownership frees,
/// not calls.
///
/// Each of the three commits to the ledger file (an fsync) under the ledger's lock: from async
/// code, call them (and drop the reservation) on a blocking thread.
pub struct Reservation {
    ledger: Arc<Ledger>,
    id: ReservationId,
    amount: Usd,
    /// Cleared by settle and cancel so that drop charges nothing more.
    open: bool,
}

impl Reservation {
    /// Its id in the ledger.
    pub fn id(&self) -> ReservationId {
        self.id
    }

    /// The amount reserved.
    pub fn amount(&self) -> Usd {
        self.amount
    }

    /// The request ended with this real cost (from the upstream's reported usage). Above the
    /// amount: charged in full, the excess counted as overrun (and logged at warn).
    ///
    /// On a storage error the reservation stays open in the ledger (still held against the
    /// caps) and is charged in full once its windows end after a restart.
    pub fn settle(mut self, actual: Usd) -> Result<Settlement> {
        self.open = false;
        self.ledger.close(self.id, Outcome::Settled(actual))
    }

    /// The request was never sent (nothing can have been billed): releases it at zero cost.
    pub fn cancel(mut self) -> Result<()> {
        self.open = false;
        self.ledger.close(self.id, Outcome::Cancelled).map(drop)
    }

    /// Lets go without closing, as a killed process would (model tests of restarts).
    #[cfg(test)]
    pub(crate) fn forget_as_if_killed(mut self) {
        self.open = false;
    }
}

/// Not settled nor cancelled (a stream cut before its usage arrived, a panic): charged its full
/// amount, logged at warn; a storage failure is logged at error.
impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        if let Err(e) = self.ledger.close(self.id, Outcome::Dropped) {
            tracing::error!(
                id = %self.id, amount = %self.amount, error = %e,
                "could not charge a dropped cloud reservation; it stays open until a restart closes it"
            );
        }
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("id", &self.id)
            .field("amount", &self.amount)
            .field("open", &self.open)
            .finish()
    }
}
