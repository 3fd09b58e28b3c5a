//! Cloud budget: hard dollar caps per calendar window on the requests the coordinator spills to
//! paid OpenAI-compatible endpoints, and the durable ledger that enforces them.
//!
//! ```text
//! placement --check--> [budget ledger]           (may this endpoint take the request?)
//! cloud path --reserve--> [budget ledger] --Reservation--> upstream request
//! upstream usage --settle--> [budget ledger] --Snapshot--> /budget, metrics
//! ```
//!
//! Placement asks [`Ledger::check`] before choosing a cloud endpoint; the cloud path
//! [`reserve`](Ledger::reserve)s the request's worst-case cost ([`Price::cost`] of the prompt
//! and `max_tokens`) before sending, and settles the [`Reservation`] with the cost of the usage
//! the upstream reports.
//!
//! Invariants:
//! - For every current window, spent + reserved never exceeds the cap, under any concurrency;
//!   only an overrun (a settle above its reservation, recorded and counted, never hidden) can
//!   push spent past it.
//! - A reservation is on disk before `reserve` returns, and its settlement before `settle`
//!   returns; a coordinator killed mid-request restarts knowing what it spent and what was in
//!   flight. Leftover reservations stay held in their windows until those end, then are charged
//!   in full.
//! - A reservation is charged exactly once: settled, cancelled (free), or dropped (full
//!   amount); ownership frees, not calls.

mod book;
mod clock;
mod config;
mod error;
mod ledger;
mod money;
mod price;
mod report;
mod shared;
mod store;
mod window;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{BudgetConfig, CapConfig};
pub use error::{Error, Result};
pub use ledger::{Ledger, Reservation, ReserveError};
pub use money::Usd;
pub use price::{Price, PriceError};
pub use report::{
    EndpointTotals, OpenReservation, Refusal, ReservationId, Settlement, Snapshot, WindowReport,
};
pub use shared::{Close, SharedBook, SharedRefusal};
pub use window::{Period, Scope};
