//! W3C trace context across gRPC calls: outgoing calls carry the current span's `traceparent`
//! in their metadata, and a server's span for an incoming call takes it as its parent.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tonic::codegen::http;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// A tonic interceptor for clients: adds the current span's trace context to every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(request.metadata_mut()));
        });
        Ok(request)
    }
}

/// The span a server opens for each incoming call (tonic's `Server::trace_fn`), child of the
/// caller's span when the call carries a trace context.
pub fn grpc_server_span(request: &http::Request<()>) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(request.headers()))
    });
    let method = request.uri().path();
    let span = tracing::info_span!(
        target: "baton::grpc",
        "grpc",
        otel.name = method,
        otel.kind = "server",
        rpc.method = method,
    );
    // Without a span layer (no OTLP endpoint) there is nothing to parent, and that is fine.
    // (Tests of this run every check under one subscriber: tracing caches a callsite's
    // interest globally, so a test without a subscriber could disable it for the others.)
    let _ = span.set_parent(parent);
    span
}

/// The trace id of the current span, when spans are being recorded.
pub fn trace_id_of_current_span() -> Option<String> {
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tonic::service::Interceptor as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn server_span_continues_the_callers_trace_and_a_bare_call_starts_its_own() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let client = tracing::info_span!("client call");
            let outgoing = client.in_scope(|| {
                TraceContext
                    .call(tonic::Request::new(()))
                    .expect("interceptor never refuses")
            });
            let traceparent = outgoing
                .metadata()
                .get("traceparent")
                .expect("traceparent injected")
                .to_str()
                .expect("ascii")
                .to_string();
            let incoming = http::Request::builder()
                .uri("/baton.v1.DecodeWorker/Decode")
                .header("traceparent", &traceparent)
                .body(())
                .expect("request");
            let server = grpc_server_span(&incoming);
            let (client_trace, server_trace) = (
                client.in_scope(trace_id_of_current_span),
                server.in_scope(trace_id_of_current_span),
            );
            assert!(client_trace.is_some());
            assert_eq!(client_trace, server_trace);
            assert!(traceparent.contains(client_trace.as_deref().unwrap_or("none")));

            // A call without a trace context starts a trace of its own.
            let bare = http::Request::builder()
                .uri("/baton.v1.PrefillWorker/Prefill")
                .body(())
                .expect("request");
            let fresh = grpc_server_span(&bare).in_scope(trace_id_of_current_span);
            assert!(fresh.is_some());
            assert_ne!(fresh, client_trace);
        });
    }
}
