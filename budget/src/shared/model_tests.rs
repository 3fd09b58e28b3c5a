//! The shared ledger against a brute-force model: random reserves, settles, cancels, drops,
//! time moves across hour, day and month ends, and round trips through its serialized form (a
//! replica restarting from its snapshot). The model keeps every reservation ever made and sums
//! them per window on demand; after each step the ledger's snapshot must equal the model's,
//! and no current window may hold more than its cap.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use super::*;
use crate::report::{EndpointTotals, OpenReservation, WindowReport};
use crate::window::{Period, Scope};

const ENDPOINTS: [&str; 3] = ["a", "b", "c"];
const TIME_ZONE: &str = "America/New_York";

fn caps() -> Vec<CapConfig> {
    let cap = |period, cap_usd, endpoint: Option<&str>| CapConfig {
        period,
        cap_usd,
        endpoint: endpoint.map(str::to_string),
    };
    vec![
        cap(Period::Hour, 1.0, None),
        cap(Period::Day, 3.0, None),
        cap(Period::Hour, 0.4, Some("a")),
        cap(Period::Month, 2.0, Some("b")),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Reserve { endpoint: usize, nanos: u64 },
    Settle { pick: usize, percent: u64 },
    Cancel { pick: usize },
    Drop { pick: usize },
    Advance { secs: i64 },
    RoundTrip,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..ENDPOINTS.len(), 1u64..=600_000_000).prop_map(|(endpoint, nanos)| Op::Reserve { endpoint, nanos }),
        3 => (any::<usize>(), 0u64..=100).prop_map(|(pick, percent)| Op::Settle { pick, percent }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Drop { pick }),
        2 => (1i64..7_200).prop_map(|secs| Op::Advance { secs }),
        1 => (72_000i64..260_000).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::RoundTrip),
    ]
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Open,
    /// `charged` is `None` for a cancel.
    Closed {
        charged: Option<(Usd, Usd)>,
    },
}

#[derive(Clone, Debug)]
struct ModelReservation {
    id: u64,
    endpoint: String,
    amount: Usd,
    request_id: String,
    created: Timestamp,
    windows: Vec<(Scope, Period, Timestamp)>,
    state: State,
}

struct Model {
    caps: Vec<(Scope, Period, Usd)>,
    tz: TimeZone,
    now: Timestamp,
    next_id: u64,
    all: Vec<ModelReservation>,
}

#[derive(Default, Clone, Copy)]
struct Sums {
    spent: Usd,
    reserved: Usd,
    overrun: Usd,
    settled: u64,
    open: u64,
}

impl Model {
    fn sums(&self, window: &(Scope, Period, Timestamp)) -> Sums {
        let mut sums = Sums::default();
        for r in self.all.iter().filter(|r| r.windows.contains(window)) {
            match r.state {
                State::Open => {
                    sums.reserved = sums.reserved.saturating_add(r.amount);
                    sums.open += 1;
                }
                State::Closed {
                    charged: Some((charged, overrun)),
                } => {
                    sums.spent = sums.spent.saturating_add(charged);
                    sums.overrun = sums.overrun.saturating_add(overrun);
                    sums.settled += 1;
                }
                State::Closed { charged: None } => {}
            }
        }
        sums
    }

    fn current(&self, scope: &Scope, period: Period) -> (Scope, Period, Timestamp) {
        (
            scope.clone(),
            period,
            period.window_at(self.now, &self.tz).0,
        )
    }

    /// Whether `amount` fits for `endpoint`, and the windows it would count in.
    fn fits(&self, endpoint: &str, amount: Usd) -> (bool, Vec<(Scope, Period, Timestamp)>) {
        let mut fits = true;
        let mut windows = Vec::new();
        for (scope, period, cap) in self.caps.iter().filter(|c| c.0.covers(endpoint)) {
            let window = self.current(scope, *period);
            let sums = self.sums(&window);
            if sums
                .spent
                .saturating_add(sums.reserved)
                .saturating_add(amount)
                > *cap
            {
                fits = false;
            }
            windows.push(window);
        }
        (fits, windows)
    }

    fn close(&mut self, id: u64, charged: Option<Usd>) {
        if let Some(r) = self.all.iter_mut().find(|r| r.id == id) {
            r.state = State::Closed {
                charged: charged.map(|c| (c, c.saturating_sub(r.amount))),
            };
        }
    }

    fn snapshot(&self) -> Snapshot {
        let windows = self
            .caps
            .iter()
            .map(|(scope, period, cap)| {
                let (start, end) = period.window_at(self.now, &self.tz);
                let s = self.sums(&(scope.clone(), *period, start));
                WindowReport {
                    scope: scope.clone(),
                    period: *period,
                    start,
                    end,
                    cap: *cap,
                    spent: s.spent,
                    reserved: s.reserved,
                    remaining: cap.saturating_sub(s.spent.saturating_add(s.reserved)),
                    overrun: s.overrun,
                    settled: s.settled,
                    open: s.open,
                }
            })
            .collect();
        let mut endpoints: Vec<EndpointTotals> = Vec::new();
        for name in ENDPOINTS {
            let mut totals = EndpointTotals {
                endpoint: name.to_string(),
                spent: Usd::ZERO,
                overrun: Usd::ZERO,
                settled: 0,
            };
            for r in self.all.iter().filter(|r| r.endpoint == name) {
                if let State::Closed {
                    charged: Some((charged, overrun)),
                } = r.state
                {
                    totals.spent = totals.spent.saturating_add(charged);
                    totals.overrun = totals.overrun.saturating_add(overrun);
                    totals.settled += 1;
                }
            }
            if totals.settled > 0 {
                endpoints.push(totals);
            }
        }
        let open = self
            .all
            .iter()
            .filter_map(|r| match r.state {
                State::Open => Some(OpenReservation {
                    id: ReservationId(r.id),
                    endpoint: r.endpoint.clone(),
                    amount: r.amount,
                    request_id: r.request_id.clone(),
                    created: r.created,
                    from_previous_run: false,
                }),
                State::Closed { .. } => None,
            })
            .collect();
        Snapshot {
            now: self.now,
            windows,
            endpoints,
            open,
        }
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let caps = caps();
    let tz = TimeZone::get(TIME_ZONE).map_err(fail)?;
    // Late on the last evening of October in New York: the first hops cross an hour, the
    // month end and the fall-back day.
    let start: Timestamp = "2026-11-01T02:40:00Z".parse().map_err(fail)?;
    let mut model = Model {
        caps: caps
            .iter()
            .map(|c| (c.scope(), c.period, c.cap().unwrap_or(Usd::ZERO)))
            .collect(),
        tz,
        now: start,
        // A fresh shared book numbers its reservations from 0.
        next_id: 0,
        all: Vec::new(),
    };
    let mut book = SharedBook::default();
    let mut now = start;
    // Open reservations: (id, amount).
    let mut live: Vec<(u64, Usd)> = Vec::new();

    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Reserve { endpoint, nanos } => {
                let endpoint = ENDPOINTS[endpoint];
                let amount = Usd::from_nanos(nanos);
                let (fits, windows) = model.fits(endpoint, amount);
                prop_assert_eq!(
                    book.check(&caps, TIME_ZONE, now, endpoint, amount).is_ok(),
                    fits,
                    "check at step {}",
                    step
                );
                let request_id = format!("req-{step}");
                match book.reserve(&caps, TIME_ZONE, now, endpoint, amount, &request_id) {
                    Ok(id) => {
                        prop_assert!(fits, "granted what the model refuses at step {}", step);
                        prop_assert_eq!(id.get(), model.next_id);
                        model.all.push(ModelReservation {
                            id: model.next_id,
                            endpoint: endpoint.to_string(),
                            amount,
                            request_id,
                            created: model.now,
                            windows,
                            state: State::Open,
                        });
                        model.next_id += 1;
                        live.push((id.get(), amount));
                    }
                    Err(SharedRefusal::Refused(refusal)) => {
                        prop_assert!(!fits, "refused what fits at step {}: {}", step, refusal);
                        let window = model.current(&refusal.scope, refusal.period);
                        let sums = model.sums(&window);
                        prop_assert_eq!(refusal.spent, sums.spent);
                        prop_assert_eq!(refusal.reserved, sums.reserved);
                        prop_assert!(
                            sums.spent
                                .saturating_add(sums.reserved)
                                .saturating_add(amount)
                                > refusal.cap,
                            "the reported cap has room"
                        );
                    }
                    Err(SharedRefusal::Invalid(e)) => return Err(fail(e)),
                }
            }
            Op::Settle { pick, percent } => {
                if !live.is_empty() {
                    let (id, amount) = live.swap_remove(pick % live.len());
                    let actual = Usd::from_nanos(amount.nanos() * percent / 100);
                    let settlement = book
                        .close(now, ReservationId(id), Close::Settled(actual))
                        .ok_or_else(|| fail("not open"))?;
                    prop_assert_eq!(settlement.charged, actual);
                    prop_assert_eq!(settlement.overrun, Usd::ZERO);
                    model.close(id, Some(actual));
                }
            }
            Op::Cancel { pick } => {
                if !live.is_empty() {
                    let (id, _) = live.swap_remove(pick % live.len());
                    book.close(now, ReservationId(id), Close::Cancelled)
                        .ok_or_else(|| fail("not open"))?;
                    model.close(id, None);
                }
            }
            Op::Drop { pick } => {
                if !live.is_empty() {
                    let (id, amount) = live.swap_remove(pick % live.len());
                    let s = book
                        .close(now, ReservationId(id), Close::Dropped)
                        .ok_or_else(|| fail("not open"))?;
                    prop_assert_eq!(s.charged, amount);
                    model.close(id, Some(amount));
                }
            }
            Op::Advance { secs } => {
                now = now
                    .checked_add(SignedDuration::from_secs(secs))
                    .map_err(fail)?;
                model.now = now;
            }
            Op::RoundTrip => {
                let json = serde_json::to_string(&book).map_err(fail)?;
                let back: SharedBook = serde_json::from_str(&json).map_err(fail)?;
                prop_assert_eq!(&back, &book);
                book = back;
            }
        }

        let snapshot = book.snapshot(&caps, TIME_ZONE, now).map_err(fail)?;
        for w in &snapshot.windows {
            prop_assert!(
                w.spent.saturating_add(w.reserved) <= w.cap,
                "step {}: {} holds more than its cap",
                step,
                w
            );
        }
        prop_assert_eq!(&snapshot, &model.snapshot(), "step {}", step);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn shared_ledger_matches_brute_force_model_across_rollovers_and_round_trips(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        run(ops)?;
    }
}
