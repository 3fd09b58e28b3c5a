//! The server around a worker role's gRPC service: health (`grpc.health.v1`), reflection, the
//! metrics endpoint, and the drain SIGTERM starts.
//!
//! Drain: health goes NOT_SERVING (the coordinator stops routing here at once) and the role
//! refuses new work (it reads [`Drain::draining`]); in-flight work runs on until idle or until
//! `drain_timeout`, past which the role aborts what is left and frees every block; then open
//! calls (health watches) get a moment and the server stops.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;

/// After a drain, how long open calls (health watches) get before the server stops.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// What the drain asks of a role.
pub trait Drain: Send + Sync + 'static {
    /// Resolves when nothing is queued, running, reserved or leased.
    fn wait_idle(&self) -> impl Future<Output = ()> + Send;
    /// Fails whatever is left (the drain deadline passed) and frees its blocks.
    fn abort_all(&self) -> impl Future<Output = ()> + Send;
    /// Ends the engine thread once the server has stopped.
    fn stop(&self) -> impl Future<Output = ()> + Send;
    /// One line about what is left, for the drain's log lines.
    fn describe(&self) -> String;
}

/// How a role is served.
pub struct ServeOptions {
    /// The role, in logs (`prefill`, `decode`).
    pub role: &'static str,
    /// The `baton.v1` service names reflection lists.
    pub reflected: &'static [&'static str],
    /// How long in-flight work may take after SIGTERM.
    pub drain_timeout: Duration,
    /// Set when the drain starts; the role refuses new work from then on.
    pub draining: Arc<AtomicBool>,
    /// Mutual TLS: the worker's identity, and only clients the cluster CA signed get in.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Serves `service` on `listener` (with health and reflection) until `shutdown` resolves, then
/// drains `engine` and stops.
pub async fn serve<S>(
    options: ServeOptions,
    listener: TcpListener,
    service: S,
    engine: impl Drain,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<S>().await;
    let reflection = baton_proto::reflection_service(options.reflected)
        .map_err(|e| format!("reflection: {e}"))?;
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let engine = Arc::new(engine);
    let draining = options.draining.clone();
    let drainer = engine.clone();
    let role = options.role;
    let deadline = options.drain_timeout;
    let drained = async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        health.set_not_serving::<S>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tracing::info!(
            role,
            left = %drainer.describe(),
            deadline_s = deadline.as_secs_f64(),
            "draining: new work refused, in-flight work finishing"
        );
        if tokio::time::timeout(deadline, drainer.wait_idle())
            .await
            .is_err()
        {
            drainer.abort_all().await;
            drainer.wait_idle().await;
        }
        tracing::info!(role, left = %drainer.describe(), "drained");
        let _ = drained_tx.send(());
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = options.tls {
        builder = builder.tls_config(tls).map_err(|e| format!("tls: {e}"))?;
    }
    let server = builder
        .trace_fn(baton_telemetry::grpc_server_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(baton_proto::incoming(listener), drained);
    // Once drained, calls still open are watches (the coordinator's health Watch never ends
    // by itself): they get a moment to see the server go, then the server stops regardless.
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = drained_rx => tokio::time::timeout(CLOSE_GRACE, server)
            .await
            .unwrap_or(Ok(())),
    };
    engine.stop().await;
    result.map_err(|e| format!("grpc server: {e}"))
}

/// Binds the metrics listener when metrics are on.
pub async fn bind_metrics(
    on: bool,
    at: std::net::SocketAddr,
) -> Result<Option<TcpListener>, String> {
    if !on {
        return Ok(None);
    }
    TcpListener::bind(at)
        .await
        .map(Some)
        .map_err(|e| format!("bind metrics {at}: {e}"))
}
