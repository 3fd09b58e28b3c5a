//! Telemetry for every baton process: human or JSON logs, traces that follow a request across
//! the coordinator, prefill worker and decode worker, and the Prometheus pieces the roles share.
//!
//! client --> coordinator --(traceparent in gRPC metadata)--> prefill worker, decode worker
//!   each process: tracing spans --> [this crate's subscriber] --> logs (stderr) and, when an
//!   OTLP endpoint is configured, OTLP/gRPC span export
//!
//! Invariants: a process installs one subscriber, once, before it serves; the W3C trace context
//! of an incoming call becomes the parent of the server span (`grpc_server_span`), and every
//! outgoing call carries the current span's context (`TraceContext` interceptor), so one client
//! request is one trace.

mod config;
mod error;
mod init;
mod metrics;
mod propagate;

pub use config::{LogFormat, ServiceName, TelemetryConfig};
pub use error::{Error, Result};
pub use init::{Telemetry, init};
pub use metrics::{
    MetricsServer, PoolGauges, PrefixCacheCounts, ProcessCollector, encode as encode_metrics,
    encode_counter, encode_gauge, encode_kv_links_failed, encode_pool, encode_prefix_cache,
    serve_metrics,
};
pub use propagate::{TraceContext, grpc_server_span, trace_id_of_current_span};
