//! A coordinator killed with SIGKILL mid-request: this test re-runs its own binary as the
//! "coordinator", which reserves and then kills itself, and checks what the next run of the
//! ledger knows. No destructor runs in the child, so nothing but the file carries over.

use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use baton_budget::{
    BudgetConfig, CapConfig, Ledger, ManualClock, Period, Scope, Snapshot, Usd, WindowReport,
};
use jiff::{SignedDuration, Timestamp};

const CHILD_LEDGER: &str = "BATON_BUDGET_TEST_CHILD_LEDGER";
const TEST_NAME: &str = "killed_coordinator_leaves_its_reservation_held_until_its_windows_end";

fn usd(dollars: f64) -> Usd {
    Usd::from_dollars(dollars).unwrap_or(Usd::ZERO)
}

fn at(s: &str) -> Result<Timestamp> {
    s.parse().with_context(|| format!("timestamp {s}"))
}

fn config(ledger: std::path::PathBuf) -> BudgetConfig {
    BudgetConfig {
        ledger,
        time_zone: "UTC".into(),
        caps: vec![
            CapConfig {
                period: Period::Hour,
                cap_usd: 1.0,
                endpoint: None,
            },
            CapConfig {
                period: Period::Day,
                cap_usd: 5.0,
                endpoint: None,
            },
        ],
    }
}

fn window(snapshot: &Snapshot, period: Period) -> Result<&WindowReport> {
    snapshot
        .windows
        .iter()
        .find(|w| w.scope == Scope::Global && w.period == period)
        .with_context(|| format!("no {period} window"))
}

/// Exit code of a child that could not kill itself and exited without cleanup instead.
const CHILD_EXITED: i32 = 86;

/// Runs [`child`] in a new process of this test binary and waits for it to die.
fn run_killed_child(ledger: &std::path::Path) -> Result<()> {
    let status = Command::new(std::env::current_exe()?)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_LEDGER, ledger)
        .stdout(std::process::Stdio::null())
        .status()?;
    #[cfg(unix)]
    let killed = std::os::unix::process::ExitStatusExt::signal(&status) == Some(9);
    #[cfg(not(unix))]
    let killed = false;
    if !killed && status.code() != Some(CHILD_EXITED) {
        bail!("the child coordinator failed before it was killed: {status}");
    }
    Ok(())
}

/// The "coordinator": one settled request, one in flight, then SIGKILL.
fn child(ledger: &str) -> Result<()> {
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:30:00Z")?));
    let ledger = Ledger::open(&config(ledger.into()), clock)?;
    ledger
        .reserve("openai", usd(0.40), "req-done")?
        .settle(usd(0.10))?;
    let _in_flight = ledger.reserve("openai", usd(0.60), "req-in-flight")?;
    let status = Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    // Where `kill` is missing, exiting skips destructors just the same.
    eprintln!("kill did not kill this process ({status:?}); exiting without cleanup");
    std::process::exit(CHILD_EXITED)
}

#[test]
fn killed_coordinator_leaves_its_reservation_held_until_its_windows_end() -> Result<()> {
    if let Ok(ledger) = std::env::var(CHILD_LEDGER) {
        return child(&ledger);
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger.redb");
    run_killed_child(&path)?;
    let config = config(path);

    // Restarted in the same hour: the in-flight reservation still holds its $0.60.
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:45:00Z")?));
    let ledger = Ledger::open(&config, clock.clone())?;
    let snapshot = ledger.snapshot();
    assert_eq!(snapshot.open.len(), 1);
    let leftover = &snapshot.open[0];
    assert_eq!(
        (
            leftover.request_id.as_str(),
            leftover.amount,
            leftover.from_previous_run
        ),
        ("req-in-flight", usd(0.60), true)
    );
    assert_eq!(leftover.created, at("2026-12-07T10:30:00Z")?);
    let hour = window(&snapshot, Period::Hour)?;
    assert_eq!(
        (hour.spent, hour.reserved, hour.remaining),
        (usd(0.10), usd(0.60), usd(0.30))
    );
    assert!(ledger.check("openai", usd(0.31)).is_err());
    let next = ledger.reserve("openai", usd(0.30), "req-next")?;
    assert!(
        next.id() > leftover.id,
        "ids carry on from the previous run"
    );
    next.settle(usd(0.30))?;

    // The hour ended but the day did not: the leftover is still held in the day.
    clock.set(at("2026-12-07T12:00:00Z")?);
    let snapshot = ledger.snapshot();
    assert_eq!(snapshot.open.len(), 1);
    assert_eq!(window(&snapshot, Period::Hour)?.reserved, Usd::ZERO);
    assert_eq!(window(&snapshot, Period::Day)?.reserved, usd(0.60));
    drop(ledger);

    // A restart the next day closes it as abandoned, charged in full.
    let clock = Arc::new(ManualClock::new(at("2026-12-08T00:00:00Z")?));
    let ledger = Ledger::open(&config, clock)?;
    let snapshot = ledger.snapshot();
    assert!(snapshot.open.is_empty());
    assert_eq!(snapshot.endpoints.len(), 1);
    let openai = &snapshot.endpoints[0];
    assert_eq!((openai.spent, openai.settled), (usd(0.10 + 0.30 + 0.60), 3));
    assert_eq!(
        window(&snapshot, Period::Day)?.spent,
        Usd::ZERO,
        "a new day"
    );
    drop(ledger);

    // Its charge went to the day it was made in.
    let clock = Arc::new(ManualClock::new(at("2026-12-07T23:00:00Z")?));
    let ledger = Ledger::open(&config, clock)?;
    let day = window(&ledger.snapshot(), Period::Day)?.clone();
    assert_eq!(
        (day.spent, day.reserved, day.settled),
        (usd(1.0), Usd::ZERO, 3)
    );
    Ok(())
}

#[test]
fn leftover_is_closed_by_a_running_ledger_once_its_windows_end() -> Result<()> {
    if std::env::var(CHILD_LEDGER).is_ok() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger.redb");
    run_killed_child(&path)?;
    let clock = Arc::new(ManualClock::new(at("2026-12-07T10:45:00Z")?));
    let ledger = Ledger::open(&config(path), clock.clone())?;
    assert_eq!(ledger.snapshot().open.len(), 1);
    clock.advance(SignedDuration::from_hours(24));
    // The next granted reservation sweeps the leftover in the same commit.
    ledger.reserve("openai", usd(0.01), "req-later")?.cancel()?;
    let snapshot = ledger.snapshot();
    assert!(snapshot.open.is_empty());
    assert_eq!(snapshot.endpoints[0].spent, usd(0.70));
    Ok(())
}
