//! The `baton.v1.PrefillWorker` gRPC service and the server around it (health, reflection).
//!
//! coordinator --Prefill--> service --PrefillJob--> engine thread
//!     push: engine --KvSegment--> send task --Link--> decode worker, answered when both finish
//!     pull: engine keeps the KV under a lease; decode worker --Pull--> send task --> itself

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_engine::{Engine, LayoutDescriptor, SamplingLimits};
use baton_kv_transfer::{Endpoint, HandoffId, Link, Links, SendReport, send_all};
use baton_proto::convert;
use baton_proto::v1::{
    self, ConnectRequest, ConnectResponse, InfoRequest, LoadReport, LoadRequest, PrefillRequest,
    PrefillResponse, PullDescriptor, PullRequest, PullResponse, ReleaseRequest, ReleaseResponse,
    WorkerInfo,
    prefill_request::Handoff,
    prefill_worker_server::{PrefillWorker, PrefillWorkerServer},
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::config::PrefillConfig;
use crate::engine_loop::{self, EngineHandle, JobShape, LoopConfig, PrefillJob};
use crate::error::{Error, Result};
use crate::metrics::KvCounters;

/// After a drain, how long open calls (health watches) get before the server stops.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(config: PrefillConfig, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Internal(format!("bind {}: {e}", config.listen)))?;
    serve(config, listener, shutdown).await
}

/// Serves on an already bound listener (tests bind 127.0.0.1:0 and keep it); binds
/// `config.metrics_listen` itself when `config.metrics` is on.
pub async fn serve(
    config: PrefillConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let metrics = if config.metrics {
        let at = config.metrics_listen;
        Some(
            TcpListener::bind(at)
                .await
                .map_err(|e| Error::Internal(format!("bind metrics {at}: {e}")))?,
        )
    } else {
        None
    };
    serve_with_metrics(config, listener, metrics, shutdown).await
}

/// Serves gRPC on `listener` and, when given, `/metrics` on `metrics` (both already bound, so
/// a caller can announce ports the OS chose).
pub async fn serve_with_metrics(
    config: PrefillConfig,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener address: {e}")))?;
    let engine_config = config.engine.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::load(engine_config))
        .await
        .map_err(|e| Error::Internal(format!("model load task: {e}")))??;
    let worker_id = config
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("prefill@{addr}"));
    let info = WorkerInfo {
        worker_id: worker_id.clone(),
        role: v1::WorkerRole::Prefill as i32,
        model_name: baton_engine::model_name(&config.engine.model),
        layout: Some(convert::descriptor_to_proto(engine.descriptor())),
        kv_endpoints: Vec::new(),
        max_context: engine.max_context() as u32,
        block_size: engine.block_size() as u32,
        total_blocks: engine.total_blocks() as u32,
        eos_token_ids: engine.tokenizer().eos_token_ids().to_vec(),
    };
    let local = engine.descriptor().clone();
    let max_context = engine.max_context();
    // A push segment is one layer of one prefill chunk; it must fit a transport frame.
    let chunk_bytes = local.bytes_per_token_half() * 2 * config.engine.prefill_chunk_tokens;
    if chunk_bytes > baton_kv_transfer::MAX_SEGMENT_BYTES {
        return Err(Error::InvalidRequest {
            field: "prefill_chunk_tokens",
            reason: format!(
                "one layer of a {}-token chunk is {chunk_bytes} bytes of kv, more than a kv segment's {} bytes; lower it",
                config.engine.prefill_chunk_tokens,
                baton_kv_transfer::MAX_SEGMENT_BYTES
            ),
        });
    }
    tracing::info!(%worker_id, %addr, blocks = engine.total_blocks(), "prefill worker serving");
    let (handle, join) = engine_loop::spawn(
        engine,
        LoopConfig {
            queue_capacity: config.max_pending * 2,
            max_pending: config.max_pending,
            max_lease_ttl: config.max_lease_ttl,
        },
        tokio::runtime::Handle::current(),
    )
    .map_err(|e| Error::Internal(format!("start engine thread: {e}")))?;
    let draining = Arc::new(AtomicBool::new(false));
    let kv_counters = Arc::new(KvCounters::default());
    let metrics = metrics
        .map(|listener| {
            let draining = draining.clone();
            baton_telemetry::MetricsServer::start(
                listener,
                crate::metrics::render(handle.snapshots(), kv_counters.clone(), draining.clone()),
                move || !draining.load(Ordering::Relaxed),
            )
        })
        .transpose()
        .map_err(|e| Error::Internal(format!("metrics endpoint: {e}")))?;
    let service = PrefillService {
        draining: draining.clone(),
        kv_counters,
        engine: handle.clone(),
        links: Arc::new(Links::new(local.clone(), config.link.clone())),
        local,
        info,
        address: addr.to_string(),
        segment_queue: config.segment_queue,
        max_context,
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PrefillWorkerServer<PrefillService>>()
        .await;
    let reflection = baton_proto::reflection_service(&["baton.v1.PrefillWorker"])
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let drain_timeout = config.drain_timeout;
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let stopper = handle.clone();
    let drained = async move {
        shutdown.await;
        drain(&handle, &health, &draining, drain_timeout).await;
        let _ = drained_tx.send(());
    };
    let server = tonic::transport::Server::builder()
        .trace_fn(baton_telemetry::grpc_server_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(PrefillWorkerServer::new(service))
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
    stopper.stop().await;
    // The service (and every engine handle) is dropped by now: the engine thread ends.
    let _ = tokio::task::spawn_blocking(move || join.join()).await;
    drop(metrics);
    result.map_err(|e| Error::Internal(format!("grpc server: {e}")))
}

/// SIGTERM's path: report NOT_SERVING (the coordinator stops routing here at once), refuse new
/// prompts, let queued prefills finish and decode workers read their pull sources until
/// `deadline`, then fail the rest and free every block. The server stops once this returns.
async fn drain(
    engine: &EngineHandle,
    health: &tonic_health::server::HealthReporter,
    draining: &AtomicBool,
    deadline: Duration,
) {
    draining.store(true, Ordering::Relaxed);
    health
        .set_not_serving::<PrefillWorkerServer<PrefillService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let at_start = engine.snapshot().load;
    tracing::info!(
        prompts = at_start.pending,
        leases = at_start.leases,
        deadline_s = deadline.as_secs_f64(),
        "draining: new prompts refused, in-flight prefills and pull sources finishing"
    );
    if tokio::time::timeout(deadline, engine.wait_idle())
        .await
        .is_err()
    {
        let _ = engine.abort_all().await;
        engine.wait_idle().await;
    }
    let end = engine.snapshot().load;
    tracing::info!(
        free_blocks = end.free_blocks,
        total_blocks = end.total_blocks,
        leases = end.leases,
        "drained"
    );
}

pub struct PrefillService {
    /// Set when a drain starts: new prompts are refused from then on.
    draining: Arc<AtomicBool>,
    kv_counters: Arc<KvCounters>,
    engine: EngineHandle,
    links: Arc<Links>,
    local: LayoutDescriptor,
    info: WorkerInfo,
    address: String,
    segment_queue: usize,
    max_context: usize,
}

impl PrefillService {
    /// Opens (or reuses) the link to a decode worker and checks it holds the layout the
    /// coordinator says it does.
    async fn link(
        &self,
        endpoint: Option<&v1::KvEndpoint>,
        destination: Option<&v1::LayoutDescriptor>,
    ) -> Result<(Endpoint, Arc<Link>, bool)> {
        let endpoint = convert::endpoint_from_proto(endpoint.ok_or(Error::InvalidRequest {
            field: "endpoint",
            reason: "is required".into(),
        })?)
        .map_err(invalid)?;
        let (link, existed) = self.links.connect(&endpoint).await?;
        if let Some(d) = destination {
            let d = convert::descriptor_from_proto(d).map_err(invalid)?;
            if &d != link.peer() {
                return Err(Error::InvalidRequest {
                    field: "destination",
                    reason: "differs from the layout the decode worker sent at handshake".into(),
                });
            }
        }
        Ok((endpoint, link, existed))
    }

    /// Runs `produce` (which feeds segments into the channel it is given) beside a task that
    /// sends them over `link`; the transfer's report comes back with `produce`'s result.
    async fn transfer<T>(
        &self,
        endpoint: &Endpoint,
        link: Arc<Link>,
        produce: impl Future<Output = Result<T>>,
        rx: mpsc::Receiver<baton_kv_transfer::KvSegment>,
    ) -> Result<(T, SendReport)> {
        let sender_link = link.clone();
        let send = tokio::spawn(
            async move { send_all(&sender_link, rx).await }
                .instrument(tracing::info_span!("transfer", shape = "send", %endpoint)),
        );
        let produced = produce.await;
        let sent = send
            .await
            .map_err(|e| Error::Internal(format!("send task: {e}")))?;
        if let Err(e) = &sent {
            self.kv_counters.failed();
            self.links.drop_link(endpoint, &link).await;
            tracing::warn!(%endpoint, error = %e, "kv transfer failed");
        }
        match (produced, sent) {
            (Ok(v), Ok(report)) => Ok((v, report)),
            // The transport error is the cause when both failed.
            (_, Err(e)) => Err(e.into()),
            (Err(e), Ok(_)) => Err(e),
        }
    }
}

fn invalid(e: convert::ConvertError) -> Error {
    Error::InvalidRequest {
        field: e.field,
        reason: e.reason,
    }
}

/// The transfer's report for the coordinator; also counted in this worker's metrics.
fn kv_stats(
    counters: &KvCounters,
    report: &SendReport,
    compute_done: Option<Instant>,
    endpoint: &Endpoint,
    shape: v1::HandoffShape,
) -> v1::KvTransferStats {
    let transfer = report
        .first
        .map_or(Duration::ZERO, |f| report.done.saturating_duration_since(f));
    let exposed = compute_done.map_or(transfer, |c| report.done.saturating_duration_since(c));
    counters.sent(report.bytes, transfer, exposed);
    v1::KvTransferStats {
        bytes: report.bytes,
        segments: report.segments,
        transfer_seconds: transfer.as_secs_f64(),
        exposed_seconds: exposed.as_secs_f64(),
        transport: convert::endpoint_transport(endpoint) as i32,
        shape: shape as i32,
    }
}

#[tonic::async_trait]
impl PrefillWorker for PrefillService {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadReport>, Status> {
        let (load, _) = self.engine.load()?;
        Ok(Response::new(LoadReport {
            running: load.pending,
            waiting: 0,
            free_blocks: load.free_blocks,
            total_blocks: load.total_blocks,
            leases: load.leases,
            draining: self.draining.load(Ordering::Relaxed),
        }))
    }

    async fn connect_peer(
        &self,
        request: Request<ConnectRequest>,
    ) -> Result<Response<ConnectResponse>, Status> {
        let req = request.into_inner();
        let (_, _, existed) = self
            .link(req.endpoint.as_ref(), req.destination.as_ref())
            .await?;
        Ok(Response::new(ConnectResponse {
            already_connected: existed,
        }))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Error::Draining.into());
        }
        let req = request.into_inner();
        let prompt = req.prompt_token_ids;
        if prompt.is_empty() {
            return Err(Error::InvalidRequest {
                field: "prompt_token_ids",
                reason: "is empty".into(),
            }
            .into());
        }
        let params = convert::sampling_from_proto(req.sampling.as_ref());
        let limits = SamplingLimits::with_room(self.max_context.saturating_sub(prompt.len()));
        params
            .validate(&limits)
            .map_err(|e| Error::Engine(e.into()))?;
        let started = Instant::now();
        match req.handoff {
            Some(Handoff::Push(target)) => {
                let handoff = HandoffId(target.handoff_id);
                let (endpoint, link, _) = self
                    .link(target.endpoint.as_ref(), target.destination.as_ref())
                    .await?;
                let (tx, rx) = mpsc::channel(self.segment_queue);
                let job = PrefillJob {
                    handoff,
                    prompt,
                    params,
                    shape: JobShape::Push { segments: tx },
                };
                let compute = self
                    .engine
                    .prefill(job)
                    .instrument(tracing::info_span!("prefill", %handoff, shape = "push"));
                let (done, report) = self.transfer(&endpoint, link, compute, rx).await?;
                tracing::debug!(%handoff, queued = ?done.queued, compute = ?done.compute, total = ?started.elapsed(), "prefilled and pushed");
                Ok(Response::new(PrefillResponse {
                    first_token: Some(convert::token_to_proto(&done.first_token)),
                    kv: Some(kv_stats(
                        &self.kv_counters,
                        &report,
                        Some(done.compute_done),
                        &endpoint,
                        v1::HandoffShape::Push,
                    )),
                    pull: None,
                    prefill_seconds: done.compute.as_secs_f64(),
                }))
            }
            Some(Handoff::Pull(lease)) => {
                let handoff = HandoffId(lease.handoff_id);
                let ttl = Duration::from_millis(u64::from(lease.ttl_ms));
                let tokens = prompt.len() as u32;
                let job = PrefillJob {
                    handoff,
                    prompt,
                    params,
                    shape: JobShape::Pull { ttl },
                };
                let done = self
                    .engine
                    .prefill(job)
                    .instrument(tracing::info_span!("prefill", %handoff, shape = "pull"))
                    .await?;
                tracing::debug!(%handoff, queued = ?done.queued, compute = ?done.compute, "prefilled for pull");
                Ok(Response::new(PrefillResponse {
                    first_token: Some(convert::token_to_proto(&done.first_token)),
                    kv: None,
                    pull: Some(PullDescriptor {
                        handoff_id: handoff.0,
                        prefill_worker_address: self.address.clone(),
                        source: Some(convert::descriptor_to_proto(&self.local)),
                        tokens,
                        ttl_ms: lease.ttl_ms,
                    }),
                    prefill_seconds: done.compute.as_secs_f64(),
                }))
            }
            None => Err(Error::InvalidRequest {
                field: "handoff",
                reason: "one of push or pull is required".into(),
            }
            .into()),
        }
    }

    async fn pull(&self, request: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let req = request.into_inner();
        let handoff = HandoffId(req.handoff_id);
        let (endpoint, link, _) = self
            .link(req.destination.as_ref(), req.destination_layout.as_ref())
            .await?;
        let (tx, rx) = mpsc::channel(self.segment_queue);
        let ((), report) = self
            .transfer(&endpoint, link, self.engine.pull(handoff, tx), rx)
            .await?;
        Ok(Response::new(PullResponse {
            kv: Some(kv_stats(
                &self.kv_counters,
                &report,
                None,
                &endpoint,
                v1::HandoffShape::Pull,
            )),
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let released = self
            .engine
            .release(HandoffId(request.into_inner().handoff_id))
            .await?;
        Ok(Response::new(ReleaseResponse { released }))
    }
}
