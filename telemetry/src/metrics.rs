//! Prometheus pieces every role shares: process metrics read from `/proc` on each scrape, the
//! text encoding of several registries into one page, and the workers' `/metrics` endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::Result;

/// `process_*` metrics, named as Prometheus' client libraries name them: resident and virtual
/// memory, CPU seconds, open file descriptors, start time. Linux only; elsewhere it reports
/// nothing rather than wrong numbers.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl ProcessCollector {
    /// A registry holding only the process metrics (no prefix).
    pub fn registry() -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry
    }
}

struct Sample {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: f64,
    open_fds: i64,
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc(5): utime is field 14, stime 15, starttime 22, vsize 23, rss 24 (1-based, counting
    // pid and comm), so 11, 12, 19, 20, 21 here.
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    let ticks = ticks as f64;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    Some(Sample {
        cpu_seconds: (num(11)? + num(12)?) as f64 / ticks,
        resident_bytes: num(21)? as i64 * page as i64,
        virtual_bytes: num(20)? as i64,
        start_time_seconds: boot as f64 + num(19)? as f64 / ticks,
        open_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = sample() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size, in bytes",
                s.virtual_bytes,
            ),
            ("process_open_fds", "Open file descriptors", s.open_fds),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let start = ConstGauge::new(s.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            None,
            start.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Writes one gauge with its descriptor, for collectors that read their numbers on scrape.
pub fn encode_gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result
where
    ConstGauge<N>: EncodeMetric,
{
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

/// Writes one counter (`name` gets its `_total` suffix from the encoder).
pub fn encode_counter<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result
where
    ConstCounter<N>: EncodeMetric,
{
    let c = ConstCounter::new(value);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Writes `kv_links_failed_total{reason}`: KV links that failed to open, dialed or accepted,
/// by reason (`unauthenticated`: a peer without the cluster key, or one that refused ours).
pub fn encode_kv_links_failed(
    encoder: &mut DescriptorEncoder,
    by_reason: &[(&'static str, u64)],
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(
        "kv_links_failed",
        "KV links that failed to open (dialed or accepted), by reason",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for &(reason, n) in by_reason {
        ConstCounter::new(n).encode(family.encode_family(&[("reason", reason)])?)?;
    }
    Ok(())
}

/// A worker's KV pool and drain state, as both worker roles report them.
#[derive(Debug, Clone, Copy)]
pub struct PoolGauges<'a> {
    pub free_blocks: u32,
    pub total_blocks: u32,
    pub leases: u32,
    /// What a lease pins on this role (pull sources, reservations).
    pub leases_help: &'a str,
    pub draining: bool,
}

/// Writes `kv_cache_usage_ratio`, `kv_blocks_free`, `kv_blocks_total`, `kv_leases` and
/// `draining`.
pub fn encode_pool(encoder: &mut DescriptorEncoder, pool: PoolGauges<'_>) -> std::fmt::Result {
    let usage = if pool.total_blocks == 0 {
        0.0
    } else {
        1.0 - f64::from(pool.free_blocks) / f64::from(pool.total_blocks)
    };
    encode_gauge(
        encoder,
        "kv_cache_usage_ratio",
        "Share of KV blocks in use, 0 to 1",
        usage,
    )?;
    encode_gauge(
        encoder,
        "kv_blocks_free",
        "KV blocks free in the pool",
        i64::from(pool.free_blocks),
    )?;
    encode_gauge(
        encoder,
        "kv_blocks_total",
        "KV blocks in the pool",
        i64::from(pool.total_blocks),
    )?;
    encode_gauge(
        encoder,
        "kv_leases",
        pool.leases_help,
        i64::from(pool.leases),
    )?;
    encode_gauge(
        encoder,
        "draining",
        "1 while the worker drains (takes no new work), else 0",
        i64::from(pool.draining),
    )
}

/// A worker's prefix cache, as both worker roles report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheCounts {
    /// Prompt tokens of sequences admitted.
    pub prompt_tokens: u64,
    /// Of those, tokens whose KV the cache supplied.
    pub hit_tokens: u64,
    /// Blocks the cache can find now (in use or idle).
    pub cached_blocks: usize,
    /// Cached blocks no sequence holds (reclaimed first when memory is needed).
    pub idle_blocks: usize,
    /// Idle blocks reclaimed for new KV.
    pub evictions: u64,
}

/// Writes `prefix_cache_hit_tokens`, `prefix_cache_miss_tokens`, `prefix_cache_blocks`,
/// `prefix_cache_idle_blocks` and `prefix_cache_evictions`.
pub fn encode_prefix_cache(
    encoder: &mut DescriptorEncoder,
    c: PrefixCacheCounts,
) -> std::fmt::Result {
    encode_counter(
        encoder,
        "prefix_cache_hit_tokens",
        "Prompt tokens whose KV the prefix cache supplied",
        c.hit_tokens,
    )?;
    encode_counter(
        encoder,
        "prefix_cache_miss_tokens",
        "Prompt tokens computed because the prefix cache did not hold them",
        c.prompt_tokens.saturating_sub(c.hit_tokens),
    )?;
    encode_gauge(
        encoder,
        "prefix_cache_blocks",
        "KV blocks the prefix cache can find (in use or idle)",
        c.cached_blocks as i64,
    )?;
    encode_gauge(
        encoder,
        "prefix_cache_idle_blocks",
        "Cached KV blocks no sequence holds, reclaimed least recently used first",
        c.idle_blocks as i64,
    )?;
    encode_counter(
        encoder,
        "prefix_cache_evictions",
        "Idle cached KV blocks reclaimed for new KV",
        c.evictions,
    )
}

/// Several registries as one text-format page (one `# EOF`).
pub fn encode(registries: &[&Registry]) -> String {
    let mut out = String::new();
    for r in registries {
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, r);
    }
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// A running `/metrics` endpoint; dropping it stops the endpoint.
pub struct MetricsServer {
    local_addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl MetricsServer {
    /// Serves the page `render` returns at `GET /metrics` on `listener`, with `GET /health`
    /// (liveness: 200 while the process serves) and `GET /ready` (200 while `ready()`, else
    /// 503) beside it.
    pub fn start(
        listener: TcpListener,
        render: impl Fn() -> String + Send + Sync + 'static,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Self> {
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_metrics(
            listener,
            Arc::new(render),
            Arc::new(ready),
            async move {
                let _ = stopped.await;
            },
        ));
        tracing::info!(%local_addr, "metrics at /metrics");
        Ok(Self {
            local_addr,
            _stop: stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Serves `GET /metrics` (the page `render` returns), `/health` and `/ready` on `listener`
/// until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/ready",
            axum::routing::get(move || {
                let ready = ready();
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "draining")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_are_read_from_proc() {
        let page = encode(&[&ProcessCollector::registry()]);
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                page.contains(&format!("\n{name} ")),
                "{name} missing:\n{page}"
            );
        }
        let rss: f64 = page
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .expect("rss value");
        assert!(rss > 1e6, "a test process holds more than 1 MB: {rss}");
        assert!(page.ends_with("# EOF\n"));
    }
}
