//! The coordinator's Prometheus metrics (names from the design, seconds for durations, bounded
//! label sets), served at `/metrics` in the text format.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use baton_text::FinishReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::ErrorClass;
use crate::placement::Mode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    /// stop | length | cancelled | invalid_request | overloaded | unavailable | ... (bounded)
    outcome: &'static str,
    /// aggregated | disaggregated | none
    mode: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// `process_*` (memory, CPU), read on each scrape.
    process: Registry,
    requests: Family<Outcome, Counter>,
    running: Gauge,
    waiting: Gauge,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    kv_usage: Gauge<f64, AtomicU64>,
    kv_bytes: Counter,
    kv_seconds: Histogram,
}

/// Latency buckets from 1 ms to about 65 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let requests = Family::<Outcome, Counter>::default();
        registry.register(
            "requests",
            "Requests that ended, by outcome (finish reason or error class) and placement",
            requests.clone(),
        );
        let running = Gauge::default();
        registry.register(
            "num_requests_running",
            "Requests admitted and not yet finished",
            running.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "num_requests_waiting",
            "Requests queued inside workers (running and waiting as the workers last reported, less those decoding)",
            waiting.clone(),
        );
        let ttft = Histogram::new(latency_buckets());
        registry.register(
            "time_to_first_token_seconds",
            "Time from admission to the first token streamed",
            ttft.clone(),
        );
        let itl = Histogram::new(latency_buckets());
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of a stream",
            itl.clone(),
        );
        let e2e = Histogram::new(latency_buckets());
        registry.register(
            "e2e_request_latency_seconds",
            "Time from admission to the last token",
            e2e.clone(),
        );
        let kv_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "kv_cache_usage_ratio",
            "Fraction of decode workers' KV blocks in use, at the last poll",
            kv_usage.clone(),
        );
        let kv_bytes = Counter::default();
        registry.register(
            "kv_transfer_bytes",
            "KV payload bytes moved from prefill to decode workers",
            kv_bytes.clone(),
        );
        let kv_seconds = Histogram::new(latency_buckets());
        registry.register(
            "kv_transfer_seconds",
            "Time from a handoff's first KV segment sent to its last",
            kv_seconds.clone(),
        );
        Self {
            registry,
            process: baton_telemetry::ProcessCollector::registry(),
            requests,
            running,
            waiting,
            ttft,
            itl,
            e2e,
            kv_usage,
            kv_bytes,
            kv_seconds,
        }
    }

    pub fn request_started(&self) {
        self.running.inc();
    }

    pub fn request_finished(&self, elapsed: Duration, reason: FinishReason, mode: Option<Mode>) {
        self.running.dec();
        self.e2e.observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&Outcome {
                outcome: reason.as_str(),
                mode: mode.map_or("none", Mode::as_str),
            })
            .inc();
    }

    pub fn request_failed(&self, class: ErrorClass) {
        self.running.dec();
        self.requests
            .get_or_create(&Outcome {
                outcome: class.as_str(),
                mode: "none",
            })
            .inc();
    }

    pub fn request_cancelled(&self) {
        self.request_failed(ErrorClass::Cancelled);
    }

    /// Counts a request refused before admission (it never ran).
    pub fn request_refused(&self, class: ErrorClass) {
        self.requests
            .get_or_create(&Outcome {
                outcome: class.as_str(),
                mode: "none",
            })
            .inc();
    }

    pub fn first_token(&self, ttft: Duration) {
        self.ttft.observe(ttft.as_secs_f64());
    }

    pub fn inter_token(&self, gap: Duration) {
        self.itl.observe(gap.as_secs_f64());
    }

    pub fn kv_transferred(&self, bytes: u64, seconds: f64) {
        self.kv_bytes.inc_by(bytes);
        self.kv_seconds.observe(seconds);
    }

    pub fn set_worker_state(&self, kv_usage: f64, waiting: i64) {
        self.kv_usage.set(kv_usage);
        self.waiting.set(waiting);
    }

    /// The Prometheus text exposition: these metrics and the process's.
    pub fn encode(&self) -> String {
        baton_telemetry::encode_metrics(&[&self.registry, &self.process])
    }
}
