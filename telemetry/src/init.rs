//! The process's one tracing subscriber: a log layer (human or JSON, filtered by `RUST_LOG` or
//! the configured filter) and, when an OTLP endpoint is configured, a span layer exporting over
//! OTLP/gRPC in batches.

use std::io::IsTerminal as _;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, ServiceName, TelemetryConfig};
use crate::error::{Error, Result};

/// Keeps span export alive; dropping it (or [`Telemetry::shutdown`]) flushes the spans still
/// buffered, so a process that exits after its drain loses none.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans leave this process.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops span export.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("telemetry: span export shutdown: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The raft library logs every election step at info and every retry to a peer that is down
/// at error, each heartbeat; baton logs what matters of those itself (a leader change, a peer
/// lost and back, a proposal that found no leader, a fatal raft error through its API), so
/// the library is silenced unless a filter names it.
fn quiet_dependencies(filter: EnvFilter, configured: &str) -> EnvFilter {
    let named = std::env::var("RUST_LOG").unwrap_or_else(|_| configured.to_string());
    if named.contains("openraft") {
        return filter;
    }
    match "openraft=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// Installs the process's subscriber. Call once, before serving, outside any async runtime's
/// worker threads (span export runs on its own thread with its own small runtime).
pub fn init(config: &TelemetryConfig, service: &ServiceName) -> Result<Telemetry> {
    config.validate()?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_filter))
        .map_err(|e| Error::InvalidConfig {
            field: "log_filter",
            reason: e.to_string(),
        })?;
    let filter = quiet_dependencies(filter, &config.log_filter);
    let (human, json) = match config.log_format {
        LogFormat::Human => (
            Some(
                tracing_subscriber::fmt::layer()
                    // Colors for a terminal, plain text for a pipe or a file.
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            ),
        ),
    };
    let provider = config
        .otlp_endpoint
        .as_deref()
        .map(|endpoint| provider(service, endpoint))
        .transpose()?;
    // Spans are exported whatever the log filter says: an operator who quiets the logs still
    // wants the traces. baton's own spans are info level.
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("baton"))
            .with_filter(Targets::new().with_target("baton", tracing::Level::INFO))
    });
    Registry::default()
        .with(human)
        .with(json)
        .with(spans)
        .try_init()
        .map_err(|_| Error::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

fn provider(service: &ServiceName, endpoint: &str) -> Result<SdkTracerProvider> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| Error::Exporter(format!("start the export runtime: {e}")))?;
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Exporter(format!("{endpoint}: {e}")))?
    };
    let mut resource = Resource::builder().with_service_name(service.name.clone());
    if let Some(id) = &service.instance {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            id.clone(),
        ));
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnOwnRuntime {
            inner: exporter,
            runtime,
        })
        .with_resource(resource.build())
        .build())
}

/// The OTLP/gRPC exporter needs a tokio reactor, and the SDK's batch processor calls it from a
/// plain thread; this adapter runs each export on a runtime of its own, so export never
/// depends on (or blocks) the server's runtime.
#[derive(Debug)]
struct OnOwnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for OnOwnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        std::future::ready(self.runtime.block_on(self.inner.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
