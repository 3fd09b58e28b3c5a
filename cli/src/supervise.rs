//! What `baton up` decides about a child that dies, with no IO: [`Restarts`] says when to start
//! it again (exponential backoff) and when its deaths are a crash loop that stops the cluster;
//! [`LastWords`] keeps the error it reported on stderr. The clock and the lines are arguments,
//! so the tests drive both with made-up instants and text.
//!
//! up's loop --(started, died at)--> Restarts::died --Verdict--> restart after a backoff | stop
//!
//! Invariants: a child's deaths are counted from its first start, across restarts; the backoff
//! only grows while the child keeps dying quickly, and a run of [`STABLE_AFTER`] resets it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Longest wait between a child's death and its restart.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A child that ran this long was healthy: its next restart waits the first backoff again.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

/// What `up` does when a child dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDeath {
    /// Stop the cluster (`--no-restart`).
    Stop,
    /// Start it again, unless its deaths are a crash loop.
    Restart(RestartPolicy),
}

/// When a dead child starts again, and how many deaths `up` takes before it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Deaths of one child within `window` that make a crash loop; at least 1.
    pub limit: u32,
    pub window: Duration,
    /// Wait before a restart after a healthy run; doubles with each quick death.
    pub backoff: Duration,
    /// The most the doubling reaches.
    pub max_backoff: Duration,
    /// A run at least this long was healthy.
    pub stable_after: Duration,
}

impl RestartPolicy {
    /// `limit` deaths within `window` stop the cluster; restarts wait `backoff`, doubling up to
    /// [`MAX_BACKOFF`] (or `backoff`, when that is longer), reset by a run of [`STABLE_AFTER`].
    pub fn new(limit: u32, window: Duration, backoff: Duration) -> Self {
        Self {
            limit: limit.max(1),
            window,
            backoff,
            max_backoff: MAX_BACKOFF.max(backoff),
            stable_after: STABLE_AFTER,
        }
    }
}

/// What to do about one death.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start it again after `after`; this is its `number`th restart.
    Restart { number: u32, after: Duration },
    /// `--no-restart`: stop the cluster.
    NoRestart,
    /// It died `deaths` times within `window` (the policy's limit): stop the cluster.
    CrashLoop { deaths: u32, window: Duration },
}

/// One child's deaths and restarts.
#[derive(Debug, Default)]
pub struct Restarts {
    /// Its deaths within the policy's window, oldest first; fewer than the limit.
    deaths: VecDeque<Instant>,
    /// Restarts so far.
    count: u32,
    /// The wait before its next restart if it dies quickly again; `None`: the policy's first.
    next_backoff: Option<Duration>,
}

impl Restarts {
    /// Restarts decided so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The child, started at `started`, died at `now`.
    pub fn died(&mut self, on_death: &OnDeath, started: Instant, now: Instant) -> Verdict {
        let OnDeath::Restart(policy) = on_death else {
            return Verdict::NoRestart;
        };
        self.deaths
            .retain(|&t| now.saturating_duration_since(t) <= policy.window);
        self.deaths.push_back(now);
        let deaths = u32::try_from(self.deaths.len()).unwrap_or(u32::MAX);
        if deaths >= policy.limit {
            return Verdict::CrashLoop {
                deaths,
                window: policy.window,
            };
        }
        let stable = now.saturating_duration_since(started) >= policy.stable_after;
        let after = match self.next_backoff {
            Some(b) if !stable => b,
            _ => policy.backoff,
        };
        self.next_backoff = Some(after.saturating_mul(2).min(policy.max_backoff));
        self.count += 1;
        Verdict::Restart {
            number: self.count,
            after,
        }
    }
}

/// The most lines of one report kept (a long chain of causes, a multi-line panic message).
const MAX_REPORT_LINES: usize = 8;

/// What a child said on stderr before it died: the error `main` returned (`Error: ...` and the
/// causes anyhow lists under it, not its backtrace), or a panic's message. Log lines are not
/// kept: a killed worker's last log line says nothing about why it died.
#[derive(Debug, Default)]
pub struct LastWords {
    report: Vec<String>,
    reading: Option<Report>,
}

#[derive(Debug, Clone, Copy)]
enum Report {
    Error,
    Panic,
}

impl LastWords {
    /// One line of the child's stderr, in order.
    pub fn push(&mut self, line: &str) {
        if let Some(error) = line.strip_prefix("Error: ") {
            self.start(Report::Error, error);
            return;
        }
        if line.starts_with("thread '") && line.contains("panicked at") {
            self.start(Report::Panic, line);
            return;
        }
        let Some(report) = self.reading else { return };
        let line = line.trim();
        let ends = match report {
            // anyhow's `{:?}`: "Error: msg", a blank line, "Caused by:", indented causes
            // (numbered when there are several), then "Stack backtrace:" under RUST_BACKTRACE.
            Report::Error => line.starts_with("Stack backtrace:"),
            // The message, then "note: run with ..." or "stack backtrace:".
            Report::Panic => {
                line.is_empty() || line.starts_with("note:") || line.starts_with("stack backtrace:")
            }
        };
        if ends || self.report.len() >= MAX_REPORT_LINES {
            self.reading = None;
            return;
        }
        if line.is_empty() || line == "Caused by:" {
            return;
        }
        let cause = match line.split_once(": ") {
            Some((n, rest)) if n.parse::<u32>().is_ok() => rest,
            _ => line,
        };
        self.report.push(cause.to_string());
    }

    fn start(&mut self, report: Report, first: &str) {
        // "thread 'main' panicked at src/x.rs:10:5:" ends with the colon before its message.
        self.report = vec![first.trim().trim_end_matches(':').to_string()];
        self.reading = Some(report);
    }

    /// The last report on one line (causes joined with ": "), if the child made one.
    pub fn summary(&self) -> Option<String> {
        (!self.report.is_empty()).then(|| self.report.join(": "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Deaths of one child under `policy`, each `(ran for, then waited before the next start)`:
    /// the verdict of each, the child restarted after exactly the backoff it was given.
    fn run(policy: OnDeath, runs: &[Duration]) -> Vec<Verdict> {
        let mut restarts = Restarts::default();
        let mut started = Instant::now();
        let mut verdicts = Vec::new();
        for &ran in runs {
            let died = started + ran;
            let verdict = restarts.died(&policy, started, died);
            verdicts.push(verdict);
            match verdict {
                Verdict::Restart { after, .. } => started = died + after,
                _ => break,
            }
        }
        verdicts
    }

    fn restart(number: u32, after: Duration) -> Verdict {
        Verdict::Restart { number, after }
    }

    #[test]
    fn quick_deaths_double_the_backoff_up_to_its_cap() {
        let policy = OnDeath::Restart(RestartPolicy::new(100, ms(1000), ms(500)));
        let verdicts = run(policy, &[ms(10); 9]);
        assert_eq!(
            verdicts,
            vec![
                restart(1, ms(500)),
                restart(2, ms(1000)),
                restart(3, ms(2000)),
                restart(4, ms(4000)),
                restart(5, ms(8000)),
                restart(6, ms(16000)),
                restart(7, ms(30000)),
                restart(8, ms(30000)),
                restart(9, ms(30000)),
            ]
        );
    }

    #[test]
    fn a_run_past_stable_after_resets_the_backoff() {
        let policy = OnDeath::Restart(RestartPolicy::new(100, ms(1000), ms(500)));
        let long = STABLE_AFTER;
        let verdicts = run(
            policy,
            &[ms(10), ms(10), ms(10), long, ms(10), long - ms(1)],
        );
        assert_eq!(
            verdicts,
            vec![
                restart(1, ms(500)),
                restart(2, ms(1000)),
                restart(3, ms(2000)),
                restart(4, ms(500)),
                restart(5, ms(1000)),
                restart(6, ms(2000)),
            ]
        );
    }

    #[test]
    fn the_limit_of_deaths_within_the_window_is_a_crash_loop() {
        let window = Duration::from_secs(120);
        let policy = OnDeath::Restart(RestartPolicy::new(5, window, ms(500)));
        // 10 ms runs: five deaths in about 8 s.
        let verdicts = run(policy, &[ms(10); 6]);
        assert_eq!(
            verdicts,
            vec![
                restart(1, ms(500)),
                restart(2, ms(1000)),
                restart(3, ms(2000)),
                restart(4, ms(4000)),
                Verdict::CrashLoop { deaths: 5, window },
            ]
        );
    }

    #[test]
    fn deaths_older_than_the_window_do_not_count() {
        let window = Duration::from_secs(120);
        let policy = OnDeath::Restart(RestartPolicy::new(3, window, ms(500)));
        // Each run lasts a minute: the third death is 2 min and 1 s after the first.
        let verdicts = run(policy, &[STABLE_AFTER; 6]);
        assert!(
            verdicts
                .iter()
                .all(|v| matches!(v, Verdict::Restart { .. })),
            "{verdicts:?}"
        );
        // Two runs of 50 s: the third death is 101 s after the first.
        let verdicts = run(policy, &[ms(10), ms(50_000), ms(50_000)]);
        assert_eq!(verdicts[2], Verdict::CrashLoop { deaths: 3, window });
    }

    #[test]
    fn a_limit_of_one_or_no_restart_stops_at_the_first_death() {
        let window = Duration::from_secs(120);
        let limit_one = OnDeath::Restart(RestartPolicy::new(1, window, ms(500)));
        assert_eq!(
            run(limit_one, &[ms(10)]),
            vec![Verdict::CrashLoop { deaths: 1, window }]
        );
        assert_eq!(
            run(OnDeath::Stop, &[STABLE_AFTER]),
            vec![Verdict::NoRestart]
        );
    }

    fn words(lines: &str) -> Option<String> {
        let mut words = LastWords::default();
        for line in lines.lines() {
            words.push(line);
        }
        words.summary()
    }

    #[test]
    fn last_words_are_the_error_and_its_causes_without_the_backtrace() {
        let stderr = "\
2025-01-01T00:00:00Z  INFO coordinator: loading
Error: bind 127.0.0.1:4000

Caused by:
    Address already in use (os error 98)

Stack backtrace:
   0: anyhow::error::<impl anyhow::Error>::msg
             at /cargo/anyhow/src/error.rs:83:36
   1: baton::roles::coordinator";
        assert_eq!(
            words(stderr).as_deref(),
            Some("bind 127.0.0.1:4000: Address already in use (os error 98)")
        );
        let numbered =
            "Error: decode worker\n\nCaused by:\n    0: load the model\n    1: no such file";
        assert_eq!(
            words(numbered).as_deref(),
            Some("decode worker: load the model: no such file")
        );
    }

    #[test]
    fn last_words_are_a_panic_message() {
        let stderr = "\
thread 'main' panicked at cli/src/roles.rs:10:5:
the pool is empty
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace";
        assert_eq!(
            words(stderr).as_deref(),
            Some("thread 'main' panicked at cli/src/roles.rs:10:5: the pool is empty")
        );
    }

    #[test]
    fn log_lines_alone_are_no_last_words() {
        assert_eq!(
            words("  INFO decode worker serving\n  WARN slow step"),
            None
        );
    }
}
