//! Local or cloud: the half of placement that decides whether a request leaves the local
//! cluster for a cloud upstream. A plain function over what the coordinator knows at that
//! moment (local capacity, the predicted time to first token, each upstream's free slots and
//! budget), so every rule is a unit test.
//!
//! request --target--> Local (then `decide` picks aggregated or disaggregated)
//!                   | Cloud(endpoint)
//!                   | NoTarget (the error the client gets)
//!
//! Local comes first. A request spills only for a reason ([`SpillReason`]), only when the
//! client and the configuration allow it, and only to an upstream that has a free slot and a
//! budget that covers the request's worst-case cost. When no upstream can take it, a request
//! the local cluster can still run stays local (queued) and one it cannot is refused with the
//! reason that kept it off the cloud.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Why a request left (or would have left) the local cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillReason {
    /// The model is served only by cloud upstreams.
    CloudOnlyModel,
    /// The local attempt failed before its first token.
    LocalFailed,
    /// No healthy local worker serves the model.
    NoLocalWorker,
    /// Local admission is full (`max_inflight` requests in flight).
    LocalFull,
    /// The predicted local time to first token is over the request's target.
    QueueWait,
}

impl SpillReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SpillReason::CloudOnlyModel => "cloud_only_model",
            SpillReason::LocalFailed => "local_failed",
            SpillReason::NoLocalWorker => "no_local_worker",
            SpillReason::LocalFull => "local_full",
            SpillReason::QueueWait => "queue_wait",
        }
    }
}

/// What the local cluster can do for the request right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalState {
    /// The model is served locally (else only upstreams serve it).
    pub serves_model: bool,
    /// A healthy local worker can take it.
    pub worker_available: bool,
    /// Local admission has no free slot.
    pub admission_full: bool,
    /// A local attempt already failed before its first token.
    pub failed: bool,
    /// The predicted local time to first token ([`QueueModel::predict`]), when measured.
    pub predicted_ttft: Option<Duration>,
}

impl LocalState {
    fn can_run(&self) -> bool {
        self.serves_model && self.worker_available && !self.admission_full && !self.failed
    }
}

/// What the request allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpillRequest {
    /// `allow_cloud`, or the configured default.
    pub allowed: bool,
    /// A request field no upstream takes (token ids, logprobs, top_k...): the request cannot
    /// be sent faithfully, so it never spills. Names the field.
    pub local_only: Option<&'static str>,
    /// The request's time-to-first-token target, or the configured one.
    pub ttft_target: Option<Duration>,
}

/// Why one upstream cannot take the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unfit {
    /// Does not serve the model.
    NotServed,
    /// Its worst-case cost is over the request's `max_cost_usd`.
    OverMaxCost,
    /// All of its `max_concurrent` slots are taken.
    Busy,
    /// A budget cap cannot cover the worst-case cost.
    Budget,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The local cluster. `kept` says why it stayed although it had a reason to spill.
    Local { kept: Option<(SpillReason, Kept)> },
    /// The cloud upstream at this index of the candidates.
    Cloud {
        endpoint: usize,
        reason: SpillReason,
    },
}

/// Why a request with a reason to spill stayed local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The client or the configuration does not allow it, or a field cannot be sent.
    NotAllowed,
    /// No upstream could take it (the most telling reason among them).
    Unfit(Unfit),
}

/// No target: the local cluster cannot run the request and no upstream may or can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoTarget {
    pub reason: SpillReason,
    /// Why no upstream took it: `None` when spilling was not allowed (or there are none).
    pub unfit: Option<Unfit>,
}

/// Local first; spill for a reason, when allowed, to the first upstream (in configured order)
/// that fits. `upstreams` says whether each could take the request; it is asked only when the
/// request has a reason to spill and may (it reads the budget ledger).
pub fn target(
    request: SpillRequest,
    local: LocalState,
    upstreams: impl FnOnce() -> Vec<Result<(), Unfit>>,
) -> Result<Target, NoTarget> {
    let reason = if !local.serves_model {
        SpillReason::CloudOnlyModel
    } else if local.failed {
        SpillReason::LocalFailed
    } else if !local.worker_available {
        SpillReason::NoLocalWorker
    } else if local.admission_full {
        SpillReason::LocalFull
    } else if matches!(
        (local.predicted_ttft, request.ttft_target),
        (Some(predicted), Some(target)) if predicted > target
    ) {
        SpillReason::QueueWait
    } else {
        return Ok(Target::Local { kept: None });
    };
    let keep_or_refuse = |kept: Kept, unfit: Option<Unfit>| {
        if local.can_run() {
            Ok(Target::Local {
                kept: Some((reason, kept)),
            })
        } else {
            Err(NoTarget { reason, unfit })
        }
    };
    if !request.allowed || request.local_only.is_some() {
        return keep_or_refuse(Kept::NotAllowed, None);
    }
    let upstreams = upstreams();
    if let Some(endpoint) = upstreams.iter().position(Result::is_ok) {
        return Ok(Target::Cloud { endpoint, reason });
    }
    // The most telling reason: a spent budget (it says when it resets) over a full upstream
    // over a cost cap over a model the upstream does not serve.
    match upstreams.iter().filter_map(|u| u.err()).max() {
        Some(unfit) => keep_or_refuse(Kept::Unfit(unfit), Some(unfit)),
        None => keep_or_refuse(Kept::NotAllowed, None),
    }
}

/// How long the local cluster takes to give a new request its first token, from what it did
/// lately: each recent first token's wait, against how many requests were waiting ahead of it
/// when it was admitted.
///
/// A least-squares line `ttft = base + per_ahead * ahead` over the last 30 s, evaluated at the
/// requests waiting now. A line, not a queue of one server: a worker batches the prompts it
/// has queued (chunked prefill), so each request ahead costs less than a request alone, and
/// the fit learns how much from the cluster's own first tokens. Where every sample had the
/// same number ahead (a steady trickle) the slope cannot be fitted and each request ahead is
/// taken to cost a whole solo wait: the conservative reading, used only until the queue varies.
#[derive(Debug, Clone, Default)]
pub struct QueueModel {
    waiting: u32,
    samples: VecDeque<Sample>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    ahead: u32,
    ttft: f64,
}

/// The measurements a prediction uses.
const QUEUE_WINDOW: Duration = Duration::from_secs(30);
/// At most this many recent first tokens are kept.
const QUEUE_SAMPLES: usize = 512;
/// First tokens needed before a prediction is made.
const QUEUE_MIN_SERVED: usize = 4;

impl QueueModel {
    /// A local request was admitted and waits for its first token; returns how many were
    /// waiting ahead of it (hand it back to [`QueueModel::served`]).
    pub fn admitted(&mut self) -> u32 {
        let ahead = self.waiting;
        self.waiting += 1;
        ahead
    }

    /// A waiting request got its first token `ttft` after it was admitted with `ahead` ahead.
    pub fn served(&mut self, now: Instant, ahead: u32, ttft: Duration) {
        self.waiting = self.waiting.saturating_sub(1);
        if self.samples.len() == QUEUE_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            at: now,
            ahead,
            ttft: ttft.as_secs_f64(),
        });
    }

    /// A waiting request left without a first token (failed, cancelled).
    pub fn abandoned(&mut self) {
        self.waiting = self.waiting.saturating_sub(1);
    }

    #[cfg(test)]
    pub fn waiting(&self) -> u32 {
        self.waiting
    }

    /// The predicted time to first token of a request admitted now; `None` until enough first
    /// tokens were measured lately.
    pub fn predict(&mut self, now: Instant) -> Option<Duration> {
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > QUEUE_WINDOW)
        {
            self.samples.pop_front();
        }
        if self.samples.len() < QUEUE_MIN_SERVED {
            return None;
        }
        let n = self.samples.len() as f64;
        let mean_x = self.samples.iter().map(|s| f64::from(s.ahead)).sum::<f64>() / n;
        let mean_y = self.samples.iter().map(|s| s.ttft).sum::<f64>() / n;
        let (sxx, sxy) = self.samples.iter().fold((0.0, 0.0), |(xx, xy), s| {
            let dx = f64::from(s.ahead) - mean_x;
            (xx + dx * dx, xy + dx * (s.ttft - mean_y))
        });
        let x = f64::from(self.waiting);
        let predicted = if sxx < 1e-9 {
            // No spread in the queue: each request ahead costs a solo wait.
            mean_y / (mean_x + 1.0) * (x + 1.0)
        } else {
            let slope = (sxy / sxx).max(0.0);
            let base = (mean_y - slope * mean_x).max(0.0);
            base + slope * x
        };
        Some(Duration::from_secs_f64(predicted.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalState {
        LocalState {
            serves_model: true,
            worker_available: true,
            admission_full: false,
            failed: false,
            predicted_ttft: None,
        }
    }

    fn allowed() -> SpillRequest {
        SpillRequest {
            allowed: true,
            local_only: None,
            ttft_target: Some(Duration::from_secs(1)),
        }
    }

    #[test]
    fn runs_locally_when_local_keeps_the_target() {
        let state = LocalState {
            predicted_ttft: Some(Duration::from_millis(900)),
            ..local()
        };
        assert_eq!(
            target(allowed(), state, || vec![Ok(())]),
            Ok(Target::Local { kept: None })
        );
        // Unmeasured is not slow.
        assert_eq!(
            target(allowed(), local(), || vec![Ok(())]),
            Ok(Target::Local { kept: None })
        );
    }

    #[test]
    fn spills_when_the_predicted_wait_breaks_the_target() {
        let state = LocalState {
            predicted_ttft: Some(Duration::from_millis(1500)),
            ..local()
        };
        assert_eq!(
            target(allowed(), state, || vec![Err(Unfit::Busy), Ok(())]),
            Ok(Target::Cloud {
                endpoint: 1,
                reason: SpillReason::QueueWait
            })
        );
        // Without a target there is nothing to break.
        let no_target = SpillRequest {
            ttft_target: None,
            ..allowed()
        };
        assert_eq!(
            target(no_target, state, || vec![Ok(())]),
            Ok(Target::Local { kept: None })
        );
    }

    #[test]
    fn a_slow_request_that_cannot_spill_stays_local() {
        let state = LocalState {
            predicted_ttft: Some(Duration::from_secs(5)),
            ..local()
        };
        assert_eq!(
            target(allowed(), state, || vec![
                Err(Unfit::Budget),
                Err(Unfit::Busy)
            ]),
            Ok(Target::Local {
                kept: Some((SpillReason::QueueWait, Kept::Unfit(Unfit::Budget)))
            })
        );
        let tokens = SpillRequest {
            local_only: Some("prompt"),
            ..allowed()
        };
        assert_eq!(
            target(tokens, state, || vec![Ok(())]),
            Ok(Target::Local {
                kept: Some((SpillReason::QueueWait, Kept::NotAllowed))
            })
        );
    }

    #[test]
    fn full_or_workerless_local_spills_or_refuses_with_the_reason() {
        let full = LocalState {
            admission_full: true,
            ..local()
        };
        assert_eq!(
            target(allowed(), full, || vec![Ok(())]),
            Ok(Target::Cloud {
                endpoint: 0,
                reason: SpillReason::LocalFull
            })
        );
        assert_eq!(
            target(allowed(), full, || vec![Err(Unfit::Budget)]),
            Err(NoTarget {
                reason: SpillReason::LocalFull,
                unfit: Some(Unfit::Budget)
            })
        );
        let none = LocalState {
            worker_available: false,
            ..local()
        };
        let refused = SpillRequest {
            allowed: false,
            ..allowed()
        };
        assert_eq!(
            target(refused, none, || vec![Ok(())]),
            Err(NoTarget {
                reason: SpillReason::NoLocalWorker,
                unfit: None
            })
        );
        assert_eq!(
            target(allowed(), none, Vec::new),
            Err(NoTarget {
                reason: SpillReason::NoLocalWorker,
                unfit: None
            })
        );
    }

    #[test]
    fn a_local_failure_fails_over_once() {
        let failed = LocalState {
            failed: true,
            ..local()
        };
        assert_eq!(
            target(allowed(), failed, || vec![Ok(())]),
            Ok(Target::Cloud {
                endpoint: 0,
                reason: SpillReason::LocalFailed
            })
        );
        assert_eq!(
            target(allowed(), failed, || vec![Err(Unfit::OverMaxCost)]),
            Err(NoTarget {
                reason: SpillReason::LocalFailed,
                unfit: Some(Unfit::OverMaxCost)
            })
        );
    }

    #[test]
    fn a_cloud_only_model_goes_to_the_cloud_or_nowhere() {
        let cloud_only = LocalState {
            serves_model: false,
            ..local()
        };
        assert_eq!(
            target(allowed(), cloud_only, || vec![
                Err(Unfit::NotServed),
                Ok(())
            ]),
            Ok(Target::Cloud {
                endpoint: 1,
                reason: SpillReason::CloudOnlyModel
            })
        );
        assert_eq!(
            target(allowed(), cloud_only, || vec![
                Err(Unfit::NotServed),
                Err(Unfit::Busy)
            ]),
            Err(NoTarget {
                reason: SpillReason::CloudOnlyModel,
                unfit: Some(Unfit::Busy)
            })
        );
    }

    #[test]
    fn queue_model_fits_the_wait_per_request_ahead() {
        let t0 = Instant::now();
        let mut q = QueueModel::default();
        // Batched prefill: 100 ms alone, 50 ms more per request ahead.
        for (i, ahead) in [0u32, 1, 2, 4, 0, 3].into_iter().enumerate() {
            let ttft = Duration::from_millis(100 + 50 * u64::from(ahead));
            q.served(t0 + Duration::from_secs(i as u64), ahead, ttft);
        }
        let now = t0 + Duration::from_secs(10);
        let p = q.predict(now).expect("measured");
        assert!((p.as_secs_f64() - 0.1).abs() < 1e-9, "{p:?}");
        for _ in 0..9 {
            q.admitted();
        }
        let p = q.predict(now).expect("measured");
        assert!((p.as_secs_f64() - 0.55).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn queue_model_without_queue_spread_takes_each_request_ahead_as_a_solo_wait() {
        let t0 = Instant::now();
        let mut q = QueueModel::default();
        for i in 0..4u64 {
            q.served(t0 + Duration::from_secs(i), 0, Duration::from_millis(100));
        }
        for _ in 0..9 {
            q.admitted();
        }
        let p = q.predict(t0 + Duration::from_secs(5)).expect("measured");
        assert!((p.as_secs_f64() - 1.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn queue_model_forgets_old_measurements() {
        let t0 = Instant::now();
        let mut q = QueueModel::default();
        assert_eq!(q.predict(t0), None);
        for i in 0..4u64 {
            let ahead = q.admitted();
            q.served(
                t0 + Duration::from_secs(i),
                ahead,
                Duration::from_millis(50),
            );
        }
        assert!(q.predict(t0 + Duration::from_secs(5)).is_some());
        assert_eq!(q.predict(t0 + Duration::from_secs(60)), None);
        q.admitted();
        q.abandoned();
        assert_eq!(q.waiting(), 0);
    }
}
