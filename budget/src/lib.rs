//! Cloud budget: hard dollar caps per calendar window on the requests the coordinator spills to
//! paid OpenAI-compatible endpoints, and the accounting that enforces them.
//!
//! ```text
//! placement --SharedBook::check--> may this endpoint take the request?
//! cloud path --Reserve command--> [raft log] --apply: SharedBook::reserve--> id | Refusal
//! upstream usage --Close command--> [raft log] --apply: SharedBook::close--> Settlement
//! SharedBook::snapshot --> Budget RPC, /metrics
//! ```
//!
//! The ledger is a [`SharedBook`]: plain state, changed only by commands that carry their own
//! time and caps, so every coordinator that applies the same commands in the same order (the
//! coordinators' raft log, crate `baton-replica`) holds the same ledger; durability and
//! ordering are the log's. A request's worst-case cost ([`Price::cost`] of the prompt bound and
//! `max_tokens`) is reserved before it is sent and settled from the usage the upstream reports.
//!
//! Invariants:
//! - For every current window, spent + reserved never exceeds the cap: a reservation is
//!   admitted against every cap covering its endpoint, or refused; only an overrun (a settle
//!   above its reservation, recorded and counted, never hidden) can push spent past it.
//! - A reservation is closed at most once (settled, cancelled at no cost, or dropped and
//!   charged in full); a second close is answered `None`.

mod book;
mod config;
mod error;
mod money;
mod price;
mod report;
mod shared;
mod window;

pub use config::{BudgetConfig, CapConfig};
pub use error::{Error, Result};
pub use money::Usd;
pub use price::{Price, PriceError};
pub use report::{
    EndpointTotals, OpenReservation, Refusal, ReservationId, Settlement, Snapshot, WindowReport,
};
pub use shared::{Close, SharedBook, SharedRefusal};
pub use window::{Period, Scope};
