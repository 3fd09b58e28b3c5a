//! Runs one offered load against a target: sends each request when the schedule says (and a
//! concurrency slot is free), awaits every one, and summarizes the samples. A sweep is
//! [`run_load`] once per load, one after another.
//!
//! ```text
//! schedule(arrivals, bounds, rng) --> dispatcher: sleep until due, take a slot, spawn
//!     spawned request: Target::send(deadline = sent + timeout) --> Sample
//! every task joined (a panicked one becomes a `Client` error sample) --> summarize --> RunResult
//! ```
//!
//! Invariants: every request sent produces exactly one sample; no request is sent at or after
//! the time limit; requests in flight when it passes are awaited within their own timeout, and
//! the run's duration ends when the last one finishes (vLLM's `benchmark_duration`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::arrivals::{Bounds, Load, schedule};
use crate::client::Target;
use crate::metrics::{Slo, Summary, summarize};
use crate::prompts::RequestSpec;
use crate::sample::{ErrorKind, Measured, RequestError, Sample};

/// What every run of a benchmark shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunOptions {
    /// Request count and time limit.
    pub bounds: Bounds,
    /// Longest a request may take, from sending to its finish.
    pub timeout: Duration,
    /// Objectives for goodput.
    pub slo: Slo,
    /// Seed of the arrival schedule (prompts have their own stream of the same seed).
    pub seed: u64,
    /// Draw a progress bar on stderr (shown only when stderr is a terminal).
    pub progress: bool,
}

/// One load's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The load's label, as in the table and the charts.
    pub label: String,
    /// The offered load.
    pub load: Load,
    /// Metrics over the samples.
    pub summary: Summary,
    /// Every request sent, in schedule order.
    pub samples: Vec<Sample>,
}

/// The RNG of a run's arrival schedule: stream 1 of the seed (prompts use stream 0).
pub fn arrival_rng(seed: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    rng
}

/// The RNG prompts are built from: stream 0 of the seed.
pub fn prompt_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn progress_bar(len: usize, label: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    // The stderr target draws nothing when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>16} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    bar
}

/// Sends `requests` (request `i` is `requests[i % len]`) at `load` and measures them.
pub async fn run_load<T: Target>(
    target: Arc<T>,
    requests: &[RequestSpec],
    load: &Load,
    options: &RunOptions,
) -> RunResult {
    let label = load.label();
    let offsets = if requests.is_empty() {
        Vec::new()
    } else {
        schedule(
            &load.arrivals,
            &options.bounds,
            &mut arrival_rng(options.seed),
        )
    };
    let planned = offsets.len();
    let bar = progress_bar(planned, &label, options.progress);
    let failures = Arc::new(AtomicUsize::new(0));
    let slots = load
        .max_concurrency
        .map(|n| Arc::new(Semaphore::new(n.get())));

    let start = Instant::now();
    let end = start + options.bounds.max_duration;
    let mut tasks = JoinSet::new();
    // What a panicked task's sample is rebuilt from.
    let mut sent_info: HashMap<tokio::task::Id, (usize, f64, f64)> = HashMap::new();
    for (index, offset) in offsets.iter().enumerate() {
        tokio::time::sleep_until(start + *offset).await;
        let permit = match &slots {
            Some(s) => match tokio::time::timeout_at(end, s.clone().acquire_owned()).await {
                Ok(Ok(permit)) => Some(permit),
                // The time limit passed while waiting for a slot (the semaphore is never closed).
                _ => break,
            },
            None => None,
        };
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        let spec = requests[index % requests.len()].clone();
        let scheduled_s = offset.as_secs_f64();
        let sent_s = sent.duration_since(start).as_secs_f64();
        let (target, bar, failures) = (target.clone(), bar.clone(), failures.clone());
        let deadline = sent + options.timeout;
        let handle = tasks.spawn(async move {
            let measured = target.send(&spec, deadline).await;
            drop(permit);
            if measured.error.is_some() {
                let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                bar.set_message(format!("{n} failed"));
            }
            bar.inc(1);
            Sample {
                index,
                scheduled_s,
                sent_s,
                prompt_tokens: spec.prompt_tokens,
                max_tokens: spec.max_tokens,
                measured,
            }
        });
        sent_info.insert(handle.id(), (index, scheduled_s, sent_s));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next_with_id().await {
        match joined {
            Ok((_, sample)) => samples.push(sample),
            Err(e) => {
                let (index, scheduled_s, sent_s) =
                    sent_info
                        .get(&e.id())
                        .copied()
                        .unwrap_or((usize::MAX, 0.0, 0.0));
                let spec = requests.get(index % requests.len().max(1));
                samples.push(Sample {
                    index,
                    scheduled_s,
                    sent_s,
                    prompt_tokens: spec.and_then(|s| s.prompt_tokens),
                    max_tokens: spec.map_or(0, |s| s.max_tokens),
                    measured: Measured {
                        error: Some(RequestError::new(
                            ErrorKind::Client,
                            format!("request task failed: {e}"),
                        )),
                        ..Measured::default()
                    },
                });
            }
        }
    }
    let duration = start.elapsed();
    bar.finish_and_clear();
    samples.sort_by_key(|s| s.index);
    let summary = summarize(&samples, planned, duration, &options.slo);
    RunResult {
        label,
        load: *load,
        summary,
        samples,
    }
}

/// Runs each load in turn (a sweep), same requests and seed for each.
pub async fn run_sweep<T: Target>(
    target: Arc<T>,
    requests: &[RequestSpec],
    loads: &[Load],
    options: &RunOptions,
) -> Vec<RunResult> {
    let mut out = Vec::with_capacity(loads.len());
    for load in loads {
        out.push(run_load(target.clone(), requests, load, options).await);
    }
    out
}
