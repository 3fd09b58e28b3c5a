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
use crate::placement::{Mode, Routing};

mod cloud;

pub use cloud::LedgerCollector;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    /// stop | length | cancelled | invalid_request | overloaded | unavailable | ... (bounded)
    outcome: &'static str,
    /// aggregated | disaggregated | none
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
    /// prefill | decode
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    /// prefill | decode
    role: &'static str,
    /// routable | unhealthy | draining | refused | silent
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// aggregated | disaggregated
    mode: &'static str,
    /// pd_mode_off | pd_mode_force | no_prefill_worker | short_prompt | slow_link | disaggregate
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    /// unsigned | bad_signature | foreign_cluster | replayed | from_the_future | malformed
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoutingLabels {
    /// kv | load
    routing: &'static str,
    /// prefill | decode
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    /// worker_left | stream_broken | stream_ended | kv_source
    cause: &'static str,
    /// resumed | failed | over_limit | off
    outcome: &'static str,
}

pub struct Metrics {
    /// Behind a lock only for [`Metrics::register_events`], at start.
    registry: std::sync::Mutex<Registry>,
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
    kv_cached_bytes: Counter,
    placements: Family<RoutingLabels, Counter>,
    expected_cached: Family<RoutingLabels, Counter>,
    worker_cached_blocks: Family<WorkerLabels, Gauge>,
    workers: Family<StateLabels, Gauge>,
    adverts_refused: Family<RefusalLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    cloud: cloud::CloudMetrics,
    auth_refused: Family<RefusalLabels, Counter>,
    migrations: Family<MigrationLabels, Counter>,
    replaced: Counter,
    http_at_cap: Counter,
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
        let kv_cached_bytes = Counter::default();
        registry.register(
            "kv_transfer_bytes_cached",
            "KV bytes handoffs did not move because the decode worker's prefix cache held them",
            kv_cached_bytes.clone(),
        );
        let placements = Family::<RoutingLabels, Counter>::default();
        registry.register(
            "placements",
            "Workers chosen for requests, by routing policy and role",
            placements.clone(),
        );
        let expected_cached = Family::<RoutingLabels, Counter>::default();
        registry.register(
            "placement_expected_cached_tokens",
            "Prompt tokens the chosen workers had reported caching when they were chosen",
            expected_cached.clone(),
        );
        let worker_cached_blocks = Family::<WorkerLabels, Gauge>::default();
        registry.register(
            "worker_cached_blocks",
            "KV blocks each worker's prefix cache holds, from its KV events",
            worker_cached_blocks.clone(),
        );
        let workers = Family::<StateLabels, Gauge>::default();
        registry.register(
            "workers",
            "Workers the coordinator knows, by role and state (routable, unhealthy, draining, refused, silent)",
            workers.clone(),
        );
        let adverts_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "discovery_adverts_refused",
            "Worker adverts ignored: unsigned, wrongly signed, of another cluster, replayed, from the future or malformed",
            adverts_refused.clone(),
        );
        for reason in [
            "unsigned",
            "bad_signature",
            "foreign_cluster",
            "replayed",
            "from_the_future",
            "malformed",
        ] {
            let _ = adverts_refused.get_or_create(&RefusalLabels { reason });
        }
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "placement_decisions",
            "Requests by where they ran and why: pd_mode, a short prompt, no prefill worker, a link measured too slow for the KV, or disaggregated",
            decisions.clone(),
        );
        let _ = decisions.get_or_create(&DecisionLabels {
            mode: "disaggregated",
            reason: "disaggregate",
        });
        let cloud = cloud::CloudMetrics::default();
        cloud.register(&mut registry);
        let auth_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "auth_refused",
            "Client API calls turned away by API key: missing, unknown, over its rate or over its concurrency",
            auth_refused.clone(),
        );
        for reason in ["missing", "unknown", "rate", "concurrency"] {
            let _ = auth_refused.get_or_create(&RefusalLabels { reason });
        }
        let migrations = Family::<MigrationLabels, Counter>::default();
        registry.register(
            "stream_migrations",
            "Streams whose decode worker failed mid-stream, by cause (worker_left, stream_broken, stream_ended, kv_source: the prefill worker feeding it failed) and outcome (resumed on another placement, failed, over_limit, off)",
            migrations.clone(),
        );
        for cause in ["worker_left", "stream_broken", "stream_ended", "kv_source"] {
            let _ = migrations.get_or_create(&MigrationLabels {
                cause,
                outcome: "resumed",
            });
        }
        let replaced = Counter::default();
        registry.register(
            "requests_replaced",
            "Requests placed again after a worker failed them before their first token",
            replaced.clone(),
        );
        let http_at_cap = Counter::default();
        registry.register(
            "http_connection_cap_reached",
            "Times the OpenAI HTTP frontend had http_max_connections open and stopped accepting until one closed",
            http_at_cap.clone(),
        );
        Self {
            migrations,
            replaced,
            http_at_cap,
            auth_refused,
            cloud,
            decisions,
            workers,
            adverts_refused,
            registry: std::sync::Mutex::new(registry),
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
            kv_cached_bytes,
            placements,
            expected_cached,
            worker_cached_blocks,
        }
    }

    /// A request was placed: on a prefill worker expected to cache `prefill_cached` of its
    /// prompt's tokens (none when aggregated) and a decode worker expected to cache
    /// `decode_cached`.
    pub fn placed(&self, routing: Routing, prefill_cached: Option<u32>, decode_cached: u32) {
        let roles = prefill_cached
            .map(|c| ("prefill", c))
            .into_iter()
            .chain([("decode", decode_cached)]);
        for (role, cached) in roles {
            let labels = RoutingLabels {
                routing: routing.as_str(),
                role,
            };
            self.placements.get_or_create(&labels).inc();
            self.expected_cached
                .get_or_create(&labels)
                .inc_by(u64::from(cached));
        }
    }

    pub fn kv_cached(&self, bytes: u64) {
        self.kv_cached_bytes.inc_by(bytes);
    }

    /// Counts the known workers by role and state, and forgets the series of workers that
    /// left.
    pub fn set_workers(
        &self,
        workers: &[std::sync::Arc<crate::workers::Worker>],
        leave_after: Duration,
    ) {
        self.workers.clear();
        self.worker_cached_blocks.clear();
        for role in ["prefill", "decode"] {
            for state in ["routable", "unhealthy", "draining", "refused", "silent"] {
                self.workers
                    .get_or_create(&StateLabels { role, state })
                    .set(0);
            }
        }
        for w in workers {
            let state = crate::workers::state(w, leave_after);
            self.workers
                .get_or_create(&StateLabels {
                    role: w.role.as_str(),
                    state,
                })
                .inc();
        }
    }

    /// Registers the budget ledger's spend and windows, read on each scrape.
    pub fn register_ledger(&self, budget: std::sync::Arc<crate::budget::Budget>) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.register_collector(Box::new(LedgerCollector { budget }));
    }

    pub fn auth_refused(&self, why: crate::auth::Refused) {
        self.auth_refused
            .get_or_create(&RefusalLabels {
                reason: why.as_str(),
            })
            .inc();
    }

    pub fn spilled(&self, reason: crate::placement::SpillReason) {
        self.cloud.spilled(reason);
    }

    pub fn spill_kept(&self, reason: crate::placement::SpillReason, kept: crate::placement::Kept) {
        self.cloud.kept(reason, kept);
    }

    pub fn cloud_attempt(&self, endpoint: &str) {
        self.cloud.attempt(endpoint);
    }

    pub fn cloud_failed(&self, endpoint: &str, e: &baton_cloud::UpstreamError) {
        self.cloud.failed(endpoint, e);
    }

    pub fn cloud_finished(&self, endpoint: &str, outcome: &'static str) {
        self.cloud.finished(endpoint, outcome);
    }

    /// Registers the event plane's counters.
    pub fn register_events(&self, counters: &crate::workers::EventCounters) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut add =
            |name: &str, help: &str, c: &Counter| registry.register(name, help, c.clone());
        add(
            "events_received",
            "Event-plane messages from workers applied",
            &counters.received,
        );
        add(
            "events_refused",
            "Event-plane messages ignored: wrongly signed, unreadable, another worker's, too old or seen before",
            &counters.refused,
        );
        add(
            "events_gaps",
            "Event-plane messages that followed a gap in their worker's sequence numbers (dropped on the way)",
            &counters.gaps,
        );
        add(
            "events_resyncs",
            "Times a worker's KV events did not continue the coordinator's cursor and it asked the worker's Load instead",
            &counters.resyncs,
        );
        add(
            "events_silences",
            "Times a publishing worker said nothing for 1.5 s and was polled instead",
            &counters.silences,
        );
        add(
            "events_unreachable",
            "Times a worker's event publisher could not be subscribed to (its load is polled)",
            &counters.unreachable,
        );
        registry.register(
            "event_lag_seconds",
            "Time from an event-plane message's sending to its application (clocks of two hosts)",
            counters.lag.clone(),
        );
    }

    pub fn decided(&self, mode: Mode, reason: crate::placement::Reason) {
        self.decisions
            .get_or_create(&DecisionLabels {
                mode: mode.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn advert_refused(&self, reason: &'static str) {
        self.adverts_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    pub fn set_worker_cached_blocks(&self, worker: &str, role: &'static str, blocks: usize) {
        self.worker_cached_blocks
            .get_or_create(&WorkerLabels {
                worker: worker.to_string(),
                role,
            })
            .set(blocks as i64);
    }

    /// A stream's decode worker failed; what became of the stream.
    pub fn migration(&self, cause: &'static str, outcome: &'static str) {
        self.migrations
            .get_or_create(&MigrationLabels { cause, outcome })
            .inc();
    }

    /// A request was placed again after a worker failed it before its first token.
    pub fn replaced(&self) {
        self.replaced.inc();
    }

    /// The HTTP frontend reached its connection cap: new connections wait in the backlog.
    pub fn http_at_cap(&self) {
        self.http_at_cap.inc();
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
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        baton_telemetry::encode_metrics(&[&registry, &self.process])
    }
}
