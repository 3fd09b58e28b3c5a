//! The ledger through its public API: caps under concurrency, overruns, rollovers, drops,
//! cancels and the file lock. Time moves only through a `ManualClock`.

use std::sync::{Arc, Barrier};

use anyhow::{Context, Result, bail};
use baton_budget::{
    BudgetConfig, CapConfig, Error, Ledger, ManualClock, Period, ReserveError, Scope, Snapshot,
    Usd, WindowReport,
};
use jiff::{SignedDuration, Timestamp};

fn usd(dollars: f64) -> Usd {
    Usd::from_dollars(dollars).unwrap_or(Usd::ZERO)
}

fn at(s: &str) -> Result<Timestamp> {
    s.parse().with_context(|| format!("timestamp {s}"))
}

fn cap(period: Period, cap_usd: f64, endpoint: Option<&str>) -> CapConfig {
    CapConfig {
        period,
        cap_usd,
        endpoint: endpoint.map(str::to_string),
    }
}

fn config(dir: &tempfile::TempDir, caps: Vec<CapConfig>) -> BudgetConfig {
    BudgetConfig {
        ledger: dir.path().join("ledger.redb"),
        time_zone: "UTC".into(),
        caps,
    }
}

fn window<'a>(snapshot: &'a Snapshot, scope: &Scope, period: Period) -> Result<&'a WindowReport> {
    snapshot
        .windows
        .iter()
        .find(|w| &w.scope == scope && w.period == period)
        .with_context(|| format!("no {period} window for {scope}"))
}

#[test]
fn concurrent_reservations_never_exceed_the_day_cap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z")?));
    let ledger = Ledger::open(&config(&dir, vec![cap(Period::Day, 5.0, None)]), clock)?;
    let barrier = Arc::new(Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let (ledger, barrier) = (Arc::clone(&ledger), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                ledger.reserve("openai", usd(0.10), &format!("req-{i}"))
            })
        })
        .collect();
    let mut granted = Vec::new();
    for thread in threads {
        match thread.join() {
            Ok(Ok(reservation)) => granted.push(reservation),
            Ok(Err(ReserveError::Refused(refusal))) => {
                assert_eq!(refusal.scope, Scope::Global);
                assert_eq!(refusal.needed, usd(0.10));
                assert!(
                    refusal
                        .spent
                        .saturating_add(refusal.reserved)
                        .saturating_add(usd(0.10))
                        > refusal.cap
                );
            }
            Ok(Err(ReserveError::Storage(e))) => bail!("storage error: {e}"),
            Err(_) => bail!("a reserving thread panicked"),
        }
    }
    assert_eq!(granted.len(), 50);

    let day = window(&ledger.snapshot(), &Scope::Global, Period::Day)?.clone();
    assert_eq!(
        (day.reserved, day.spent, day.remaining, day.open),
        (usd(5.0), Usd::ZERO, Usd::ZERO, 50)
    );

    let kept = granted.split_off(25);
    for reservation in granted {
        let settlement = reservation.settle(usd(0.04))?;
        assert_eq!(
            (settlement.charged, settlement.overrun),
            (usd(0.04), Usd::ZERO)
        );
    }
    let snapshot = ledger.snapshot();
    let day = window(&snapshot, &Scope::Global, Period::Day)?;
    assert_eq!(day.spent, usd(1.0));
    assert_eq!(day.reserved, usd(2.5));
    assert_eq!(day.remaining, usd(1.5));
    assert_eq!((day.settled, day.open), (25, 25));
    assert_eq!(snapshot.open.len(), 25);
    assert_eq!(snapshot.endpoints.len(), 1);
    assert_eq!(
        (snapshot.endpoints[0].spent, snapshot.endpoints[0].settled),
        (usd(1.0), 25)
    );
    // What the settles freed is reservable again, and no more.
    let more: Vec<_> = (0..15)
        .map(|i| ledger.reserve("openai", usd(0.10), &format!("more-{i}")))
        .collect();
    assert_eq!(more.iter().filter(|r| r.is_ok()).count(), 15);
    assert!(matches!(
        ledger.reserve("openai", Usd::from_nanos(1), "one-more"),
        Err(ReserveError::Refused(_))
    ));
    drop(kept);
    Ok(())
}

#[test]
fn settle_above_amount_is_charged_in_full_and_counted_as_overrun() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z")?));
    let ledger = Ledger::open(
        &config(&dir, vec![cap(Period::Hour, 1.0, Some("openai"))]),
        clock,
    )?;
    let reservation = ledger.reserve("openai", usd(0.90), "req-1")?;
    let settlement = reservation.settle(usd(1.25))?;
    assert_eq!(
        (settlement.charged, settlement.overrun),
        (usd(1.25), usd(0.35))
    );

    let snapshot = ledger.snapshot();
    let hour = window(&snapshot, &Scope::Endpoint("openai".into()), Period::Hour)?;
    assert_eq!(
        (hour.spent, hour.overrun, hour.reserved, hour.remaining),
        (usd(1.25), usd(0.35), Usd::ZERO, Usd::ZERO)
    );
    assert_eq!(snapshot.endpoints[0].overrun, usd(0.35));
    // The overrun window admits nothing more, not even a free request.
    assert!(matches!(
        ledger.reserve("openai", Usd::ZERO, "req-2"),
        Err(ReserveError::Refused(_))
    ));
    Ok(())
}

#[test]
fn dropped_reservation_is_charged_its_full_amount() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z")?));
    let ledger = Ledger::open(&config(&dir, vec![cap(Period::Day, 5.0, None)]), clock)?;
    let reservation = ledger.reserve("openai", usd(0.75), "req-1")?;
    drop(reservation);
    let snapshot = ledger.snapshot();
    let day = window(&snapshot, &Scope::Global, Period::Day)?;
    assert_eq!(
        (day.spent, day.reserved, day.settled, day.open),
        (usd(0.75), Usd::ZERO, 1, 0)
    );
    assert!(snapshot.open.is_empty());
    Ok(())
}

#[test]
fn cancelled_reservation_costs_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z")?));
    let ledger = Ledger::open(&config(&dir, vec![cap(Period::Day, 1.0, None)]), clock)?;
    ledger.reserve("openai", usd(1.0), "req-1")?.cancel()?;
    let snapshot = ledger.snapshot();
    let day = window(&snapshot, &Scope::Global, Period::Day)?;
    assert_eq!(
        (day.spent, day.reserved, day.settled, day.remaining),
        (Usd::ZERO, Usd::ZERO, 0, usd(1.0))
    );
    assert!(snapshot.endpoints.is_empty());
    assert!(ledger.check("openai", usd(1.0)).is_ok());
    Ok(())
}

#[test]
fn reservation_in_flight_across_rollover_settles_into_its_old_window() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = config(
        &dir,
        vec![cap(Period::Hour, 1.0, None), cap(Period::Day, 10.0, None)],
    );
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:59:30Z")?));
    let ledger = Ledger::open(&config, clock.clone())?;
    let old = ledger.reserve("openai", usd(0.80), "req-old")?;
    assert!(
        ledger.check("openai", usd(0.30)).is_err(),
        "the hour is nearly spent"
    );

    clock.advance(SignedDuration::from_mins(1));
    let snapshot = ledger.snapshot();
    let hour = window(&snapshot, &Scope::Global, Period::Hour)?;
    assert_eq!(hour.start, at("2026-12-07T11:00:00Z")?);
    assert_eq!(
        (hour.spent, hour.reserved, hour.open),
        (Usd::ZERO, Usd::ZERO, 0),
        "the new hour starts empty"
    );
    let day = window(&snapshot, &Scope::Global, Period::Day)?;
    assert_eq!(
        day.reserved,
        usd(0.80),
        "the day still holds the old reservation"
    );

    let new = ledger.reserve("openai", usd(0.90), "req-new")?;
    old.settle(usd(0.50))?;
    let snapshot = ledger.snapshot();
    let hour = window(&snapshot, &Scope::Global, Period::Hour)?;
    assert_eq!(
        (hour.spent, hour.reserved),
        (Usd::ZERO, usd(0.90)),
        "the settle went to the old hour"
    );
    let day = window(&snapshot, &Scope::Global, Period::Day)?;
    assert_eq!((day.spent, day.reserved), (usd(0.50), usd(0.90)));
    new.settle(usd(0.90))?;
    drop(ledger);

    // The old hour's row holds the settle: a ledger opened inside that hour sees it.
    let past = Arc::new(ManualClock::new(at("2026-12-07T10:59:45Z")?));
    let reopened = Ledger::open(&config, past)?;
    let snapshot = reopened.snapshot();
    let hour = window(&snapshot, &Scope::Global, Period::Hour)?;
    assert_eq!(
        (hour.start, hour.spent, hour.settled),
        (at("2026-12-07T10:00:00Z")?, usd(0.50), 1)
    );
    Ok(())
}

#[test]
fn ledger_time_does_not_go_backwards_with_the_clock() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::new(at("2026-12-07T11:00:05Z")?));
    let ledger = Ledger::open(
        &config(&dir, vec![cap(Period::Hour, 1.0, None)]),
        clock.clone(),
    )?;
    ledger
        .reserve("openai", usd(1.0), "req-1")?
        .settle(usd(1.0))?;
    clock.set(at("2026-12-07T10:59:59Z")?);
    let snapshot = ledger.snapshot();
    assert_eq!(snapshot.now, at("2026-12-07T11:00:05Z")?);
    assert!(ledger.check("openai", Usd::from_nanos(1)).is_err());
    Ok(())
}

#[test]
fn settled_totals_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = config(
        &dir,
        vec![
            cap(Period::Month, 3.0, None),
            cap(Period::Day, 2.0, Some("openai")),
        ],
    );
    let now = at("2026-12-07T10:00:00Z")?;
    let ledger = Ledger::open(&config, Arc::new(ManualClock::new(now)))?;
    ledger
        .reserve("openai", usd(1.5), "req-1")?
        .settle(usd(1.2))?;
    ledger
        .reserve("other", usd(1.0), "req-2")?
        .settle(usd(1.0))?;
    let before = ledger.snapshot();
    drop(ledger);

    let ledger = Ledger::open(&config, Arc::new(ManualClock::new(now)))?;
    assert_eq!(ledger.snapshot(), before);
    let refusal = match ledger.reserve("openai", usd(0.9), "req-3") {
        Err(ReserveError::Refused(refusal)) => refusal,
        other => bail!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        (&refusal.scope, refusal.period),
        (&Scope::Global, Period::Month)
    );
    assert_eq!(refusal.resets_at, at("2027-01-01T00:00:00Z")?);
    assert_eq!(
        refusal.to_string(),
        "the cloud budget is spent: the month cap of $3.00 (global) has $0.80 left and this \
         request may cost $0.90; the window resets at 2027-01-01T00:00:00Z"
    );
    Ok(())
}

#[test]
fn second_open_of_the_same_file_is_refused_as_in_use() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = config(&dir, vec![cap(Period::Day, 1.0, None)]);
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z")?));
    let first = Ledger::open(&config, clock.clone())?;
    match Ledger::open(&config, clock.clone()) {
        Err(e @ Error::InUse { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("is in use by another process"),
                "{message}"
            );
            assert!(message.contains("ledger.redb"), "{message}");
        }
        other => bail!("expected InUse, got {other:?}"),
    }
    drop(first);
    assert!(
        Ledger::open(&config, clock).is_ok(),
        "the lock goes with the first ledger"
    );
    Ok(())
}

#[test]
fn open_rejects_an_invalid_config_before_touching_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = config(&dir, vec![cap(Period::Day, -1.0, None)]);
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:00:00Z")?));
    match Ledger::open(&config, clock) {
        Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "budget.caps[0].cap_usd"),
        other => bail!("expected InvalidConfig, got {other:?}"),
    }
    assert!(!config.ledger.exists());
    Ok(())
}
