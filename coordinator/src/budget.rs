//! The cloud budget as the coordinators share it: the ledger lives in the replicated state
//! (crate `baton-replica`, one raft group of every coordinator; a single coordinator is a
//! one-node group running the same code), and this module is the cloud path's view of it.
//!
//! placement --check (this replica's applied state, no round trip)--> Target::Cloud
//! cloud path --reserve (a proposal, decided when the group applies it)--> [`Hold`] --> upstream
//! upstream usage --Hold::settle (a proposal)--> the ledger; a dropped Hold proposes Dropped
//!
//! Invariants: nothing is sent upstream before the group applied its reservation (the raft
//! log is on disk on a majority); a [`Hold`] is closed exactly once (settle, cancel, or drop,
//! which charges in full); reservations a coordinator held when it died are closed, charged
//! in full, when it starts again (`Command::Started`); while the group has no leader (an
//! election, or no quorum) reservations wait up to the proposal time-out and then fail, and
//! nothing is spent.

use std::sync::{Arc, Mutex};

use baton_budget::{
    BudgetConfig, Close, Refusal, ReservationId, Settlement, SharedRefusal, Snapshot, Usd,
};
use baton_replica::{Command, ProposeError, Replica, Response};
use jiff::Timestamp;

/// Why a reservation was not granted.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// A cap has no room.
    #[error(transparent)]
    Refused(Refusal),
    /// The group could not decide (no leader within the proposal time-out, or a broken
    /// budget); nothing was reserved.
    #[error("the replicated budget ledger could not decide: {0}")]
    Undecided(String),
}

/// The ledger's caps and zone, and the replica that holds it.
pub struct Budget {
    replica: Arc<Replica>,
    config: BudgetConfig,
    /// The latest time this coordinator stamped on a command: its clock stepped back is held
    /// here, so a window that ended is never reopened by it.
    last_now: Mutex<Timestamp>,
}

impl Budget {
    pub fn new(replica: Arc<Replica>, config: BudgetConfig) -> Arc<Budget> {
        Arc::new(Budget {
            replica,
            config,
            last_now: Mutex::new(Timestamp::UNIX_EPOCH),
        })
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    fn now(&self) -> Timestamp {
        let mut last = self.last_now.lock().unwrap_or_else(|p| p.into_inner());
        *last = (*last).max(Timestamp::now());
        *last
    }

    /// Non-binding, from the state applied here: would `amount` fit under every cap covering
    /// `endpoint` now? A later [`reserve`](Budget::reserve) may still be refused.
    pub fn check(&self, endpoint: &str, amount: Usd) -> Result<(), Refusal> {
        let now = self.now();
        let state = self.replica.state();
        let result = state.borrow().ledger.check(
            &self.config.caps,
            &self.config.time_zone,
            now,
            endpoint,
            amount,
        );
        match result {
            Ok(()) => Ok(()),
            Err(SharedRefusal::Refused(r)) => Err(r),
            // The caps were validated at start; a zone the system no longer knows would be
            // refused by `reserve` with its reason.
            Err(SharedRefusal::Invalid(_)) => Ok(()),
        }
    }

    /// Reserves `amount` for `request_id` on `endpoint`, decided by the group.
    pub async fn reserve(
        self: &Arc<Self>,
        endpoint: &str,
        amount: Usd,
        request_id: &str,
    ) -> Result<Hold, ReserveError> {
        let command = Command::Reserve {
            endpoint: endpoint.to_string(),
            amount,
            request_id: request_id.to_string(),
            at: self.now(),
            caps: self.config.caps.clone(),
            time_zone: self.config.time_zone.clone(),
        };
        match self.replica.propose(command).await {
            Ok(Response::Reserved(id)) => {
                tracing::debug!(%id, endpoint, %amount, request_id, "cloud budget reserved");
                Ok(Hold {
                    budget: Arc::clone(self),
                    id,
                    amount,
                    open: true,
                })
            }
            Ok(Response::Refused(SharedRefusal::Refused(r))) => Err(ReserveError::Refused(r)),
            Ok(Response::Refused(SharedRefusal::Invalid(e))) => Err(ReserveError::Undecided(e)),
            Ok(other) => Err(ReserveError::Undecided(format!(
                "unexpected answer {other:?}"
            ))),
            Err(e) => Err(ReserveError::Undecided(e.to_string())),
        }
    }

    async fn close(&self, id: ReservationId, how: Close) -> Result<Settlement, ProposeError> {
        let command = Command::Close {
            id,
            how,
            at: self.now(),
        };
        match self.replica.propose(command).await? {
            Response::Closed(s) => Ok(s),
            // Closed before: by this coordinator's earlier try whose answer was lost (the
            // retry keeps its id, so this is another path), or by a restart's cleanup.
            other => Err(ProposeError::Invalid(format!(
                "reservation {id} was not open ({other:?})"
            ))),
        }
    }

    /// Every cap's current window, lifetime totals per endpoint and the open reservations, as
    /// applied here.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.now();
        let state = self.replica.state();
        let snapshot =
            state
                .borrow()
                .ledger
                .snapshot(&self.config.caps, &self.config.time_zone, now);
        snapshot.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the budget's caps cannot be read");
            Snapshot {
                now,
                windows: Vec::new(),
                endpoints: Vec::new(),
                open: Vec::new(),
            }
        })
    }
}

/// One granted reservation's owner: exactly one of settle, cancel or drop closes it; ownership
/// frees, not calls.
pub struct Hold {
    budget: Arc<Budget>,
    id: ReservationId,
    amount: Usd,
    /// Cleared by settle and cancel so that drop closes nothing more.
    open: bool,
}

impl Hold {
    pub fn amount(&self) -> Usd {
        self.amount
    }

    /// The request ended costing `actual` (from the upstream's usage); above the amount it is
    /// charged in full and the excess counted as overrun.
    pub async fn settle(mut self, actual: Usd) -> Result<Settlement, ProposeError> {
        self.open = false;
        self.budget.close(self.id, Close::Settled(actual)).await
    }

    /// Ended without usage (a cut stream, an upstream that may have started computing):
    /// charged its full amount, recorded before this returns (what a drop does later).
    pub async fn charge_in_full(mut self) -> Result<Settlement, ProposeError> {
        self.open = false;
        let s = self.budget.close(self.id, Close::Dropped).await?;
        tracing::warn!(id = %self.id, charged = %s.charged, "cloud request ended without usage; charged its full reservation");
        Ok(s)
    }

    /// Never sent: released at zero cost.
    pub async fn cancel(mut self) -> Result<(), ProposeError> {
        self.open = false;
        self.budget.close(self.id, Close::Cancelled).await.map(drop)
    }
}

/// Not settled nor cancelled (a cut stream, a panic): charged its full amount by a proposal
/// sent from a task; without a runtime (a process exiting) the reservation stays open and this
/// coordinator's next start closes it, charged in full just the same.
impl Drop for Hold {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        let (budget, id, amount) = (Arc::clone(&self.budget), self.id, self.amount);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(%id, %amount, "a dropped cloud reservation cannot be charged now (no runtime); this coordinator's next start charges it");
            return;
        };
        runtime.spawn(async move {
            match budget.close(id, Close::Dropped).await {
                Ok(s) => tracing::warn!(%id, charged = %s.charged, "cloud reservation dropped without a settle (no usage reported); charged its full amount"),
                Err(e) => tracing::error!(%id, %amount, error = %e, "could not charge a dropped cloud reservation; this coordinator's next start charges it"),
            }
        });
    }
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("id", &self.id)
            .field("amount", &self.amount)
            .field("open", &self.open)
            .finish()
    }
}
