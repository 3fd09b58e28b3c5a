//! The prefill worker's Prometheus metrics: the engine thread's last published snapshot (queue,
//! blocks, leases) and the transfer counters the send tasks keep, read on each scrape.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use baton_telemetry::{encode_counter as counter, encode_gauge as gauge};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use baton_kv_transfer::agent::Agent;

use crate::engine_loop::Snapshot;

/// What the KV send tasks count; the service owns it and the collector reads it.
#[derive(Debug, Default)]
pub struct KvCounters {
    ok: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    transfer_us: AtomicU64,
    exposed_us: AtomicU64,
}

impl KvCounters {
    pub fn sent(&self, bytes: u64, transfer: Duration, exposed: Duration) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.transfer_us
            .fetch_add(transfer.as_micros() as u64, Ordering::Relaxed);
        self.exposed_us
            .fetch_add(exposed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct PrefillCollector {
    snapshot: watch::Receiver<Snapshot>,
    kv: Arc<KvCounters>,
    draining: Arc<AtomicBool>,
    /// The KV agent, for its link counters.
    agent: Agent,
}

/// The page `/metrics` serves: `baton_*` worker metrics and `process_*`.
pub fn render(
    snapshot: watch::Receiver<Snapshot>,
    kv: Arc<KvCounters>,
    draining: Arc<AtomicBool>,
    agent: Agent,
) -> impl Fn() -> String {
    let mut registry = Registry::with_prefix("baton");
    registry.register_collector(Box::new(PrefillCollector {
        snapshot,
        kv,
        draining,
        agent,
    }));
    let process = baton_telemetry::ProcessCollector::registry();
    move || baton_telemetry::encode_metrics(&[&registry, &process])
}

impl Collector for PrefillCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = *self.snapshot.borrow();
        let (load, stats) = (s.load, s.stats);
        let e = &mut encoder;
        gauge(
            e,
            "num_requests_waiting",
            "Prompts queued or being prefilled",
            i64::from(load.pending),
        )?;
        baton_telemetry::encode_pool(
            e,
            baton_telemetry::PoolGauges {
                free_blocks: load.free_blocks,
                total_blocks: load.total_blocks,
                leases: load.leases,
                leases_help: "Pull sources pinned under a lease",
                draining: self.draining.load(Ordering::Relaxed),
            },
        )?;
        baton_telemetry::encode_prefix_cache(e, s.prefix)?;
        baton_telemetry::encode_kv_links_failed(
            e,
            &self.agent.stats().snapshot().links_failed_by_reason(),
        )?;
        counter(e, "prefill_steps", "Engine steps run", stats.steps)?;
        counter(
            e,
            "prefill_tokens",
            "Prompt tokens prefilled",
            stats.prefill_tokens,
        )?;
        counter(
            e,
            "preemptions",
            "Prompts preempted for lack of KV blocks",
            stats.preemptions,
        )?;
        counter(
            e,
            "kv_leases_expired",
            "Pull sources freed because their lease expired",
            stats.leases_expired,
        )?;
        counter(
            e,
            "kv_leases_released",
            "Pull sources freed by the decode worker's release",
            stats.leases_released,
        )?;
        let kv = &self.kv;
        counter(
            e,
            "kv_handoffs_ok",
            "KV sends (push or pull) that completed",
            kv.ok.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "kv_handoffs_failed",
            "KV sends that failed",
            kv.failed.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "kv_transfer_bytes_sent",
            "KV payload bytes sent to decode workers",
            kv.bytes.load(Ordering::Relaxed),
        )?;
        counter(
            e,
            "kv_transfer_seconds",
            "Seconds from a handoff's first segment sent to its last acknowledged, summed",
            kv.transfer_us.load(Ordering::Relaxed) as f64 / 1e6,
        )?;
        counter(
            e,
            "kv_transfer_exposed_seconds",
            "Seconds of transfer after the prompt's compute ended (not hidden), summed",
            kv.exposed_us.load(Ordering::Relaxed) as f64 / 1e6,
        )?;
        Ok(())
    }
}
