//! The decode worker's Prometheus metrics, read on each scrape from the engine thread's last
//! published snapshot (the engine thread owns every number; nothing here can skew it).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use baton_kv_transfer::agent::Agent;

use crate::engine_loop::Snapshot;

#[derive(Debug)]
struct DecodeCollector {
    snapshot: watch::Receiver<Snapshot>,
    draining: Arc<AtomicBool>,
    /// The KV agent, for its link counters.
    agent: Agent,
}

/// The page `/metrics` serves: `baton_*` worker metrics and `process_*`.
pub fn render(
    snapshot: watch::Receiver<Snapshot>,
    draining: Arc<AtomicBool>,
    agent: Agent,
) -> impl Fn() -> String {
    let mut registry = Registry::with_prefix("baton");
    registry.register_collector(Box::new(DecodeCollector {
        snapshot,
        draining,
        agent,
    }));
    let process = baton_telemetry::ProcessCollector::registry();
    move || baton_telemetry::encode_metrics(&[&registry, &process])
}

use baton_telemetry::{encode_counter as counter, encode_gauge as gauge};

impl Collector for DecodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = *self.snapshot.borrow();
        let (load, stats) = (s.load, s.stats);
        let e = &mut encoder;
        gauge(
            e,
            "num_requests_running",
            "Streams decoding now",
            i64::from(load.running),
        )?;
        gauge(
            e,
            "num_requests_waiting",
            "Streams waiting for a batch slot or for their KV to land",
            i64::from(load.waiting),
        )?;
        baton_telemetry::encode_pool(
            e,
            baton_telemetry::PoolGauges {
                free_blocks: load.free_blocks,
                total_blocks: load.total_blocks,
                leases: load.leases,
                leases_help: "Reservations pinned under a lease",
                draining: self.draining.load(Ordering::Relaxed),
            },
        )?;
        counter(
            e,
            "kv_handoffs_ok",
            "Handoffs whose KV landed and verified",
            stats.handoffs_ok,
        )?;
        counter(
            e,
            "kv_handoffs_failed",
            "Handoffs that failed (transfer error, checksum, abandoned pull)",
            stats.handoffs_failed,
        )?;
        counter(
            e,
            "kv_handoffs_expired",
            "Reservations whose lease expired before their KV landed",
            stats.handoffs_expired,
        )?;
        counter(
            e,
            "kv_handoffs_recomputed",
            "Failed handoffs whose prompt this worker recomputed (kv_failure_policy = recompute)",
            stats.handoffs_recomputed,
        )?;
        counter(
            e,
            "kv_transfer_bytes_received",
            "KV payload bytes received, verified and imported",
            stats.kv_bytes_imported,
        )?;
        counter(
            e,
            "kv_transfer_bytes_cached",
            "KV bytes handoffs did not move because this worker's prefix cache held them",
            stats.kv_bytes_cached,
        )?;
        counter(
            e,
            "kv_transfer_tokens_cached",
            "Prompt tokens handoffs did not move because this worker's prefix cache held them",
            stats.kv_tokens_cached,
        )?;
        baton_telemetry::encode_prefix_cache(e, s.prefix)?;
        baton_telemetry::encode_kv_links_failed(
            e,
            &self.agent.stats().snapshot().links_failed_by_reason(),
        )?;
        gauge(
            e,
            "kv_pool_shared",
            "1 while the KV pool is shared memory that prefill workers on this host map, 0 when private (never configured, or the fallback after shared memory was refused)",
            i64::from(self.agent.pool_shared()),
        )?;
        counter(
            e,
            "preemptions",
            "Sequences preempted for lack of KV blocks",
            stats.preemptions,
        )?;
        counter(
            e,
            "streams_cancelled",
            "Streams whose client went away",
            stats.cancelled,
        )?;
        counter(
            e,
            "streams_migrated_in",
            "Streams that continued here after their decode worker died (their tokens replayed)",
            stats.migrated_in,
        )?;
        counter(
            e,
            "replayed_tokens",
            "Tokens replayed as decode steps for migrated streams",
            stats.replayed_tokens,
        )?;
        counter(
            e,
            "replay_divergences",
            "Replayed tokens this worker's own draw chose differently (the client's token stands)",
            stats.replay_divergences,
        )?;
        Ok(())
    }
}
