//! The `baton.v1.DecodeWorker` gRPC service and the server around it: KV receivers (TCP, and
//! shared memory when configured), the engine thread, health and reflection.
//!
//! coordinator --Reserve--> service --> engine thread (blocks pinned, handoff expected)
//! prefill worker --KV frames--> receiver --Delivery--> engine thread (imported, verified)
//! coordinator --Decode--> service --> engine thread --DecodeEvent--> response stream
//! pull shape: service --Pull, then Release--> prefill worker

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use baton_engine::batch::Batcher;
use baton_engine::{Engine, LayoutDescriptor, SamplingLimits};
use baton_kv_transfer::{Delivery, Endpoint, HandoffId, KvReceiver, ShmReceiver, TcpReceiver};
use baton_proto::convert;
use baton_proto::v1::{
    self, DecodeFinish, DecodeRequest, DecodeResponse, InfoRequest, LoadReport, LoadRequest,
    ReleaseRequest, ReleaseResponse, RenewRequest, RenewResponse, ReserveRequest, ReserveResponse,
    WorkerInfo,
    decode_request::Source,
    decode_worker_server::{DecodeWorker, DecodeWorkerServer},
    prefill_worker_client::PrefillWorkerClient,
};
use baton_telemetry::TraceContext;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::config::DecodeConfig;
use crate::engine_loop::{self, DecodeEvent, DecodeSource, EngineHandle, LoopConfig};
use crate::error::{Error, Result};

/// After a drain, how long open calls (health watches) get before the server stops.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(config: DecodeConfig, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Internal(format!("bind {}: {e}", config.listen)))?;
    serve(config, listener, shutdown).await
}

/// Serves on an already bound listener (tests bind 127.0.0.1:0 and keep it); binds
/// `config.metrics_listen` itself when `config.metrics` is on.
pub async fn serve(
    config: DecodeConfig,
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
    config: DecodeConfig,
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
    let local = engine.descriptor().clone();
    let worker_id = config
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("decode@{addr}"));

    // Receivers, in `Transport` order of the endpoints list; their deliveries merge into one
    // bounded channel the engine thread reads.
    let (tcp, tcp_rx) =
        TcpReceiver::bind(config.kv_tcp_listen, local.clone(), config.tcp.clone()).await?;
    let mut endpoints = vec![(v1::Transport::Tcp, Endpoint::Tcp(tcp.local_addr()))];
    let mut receivers: Vec<Arc<dyn KvReceiver>> = vec![Arc::new(tcp)];
    let (merged_tx, merged_rx) = mpsc::channel(config.tcp.delivery_capacity);
    tokio::spawn(forward(tcp_rx, merged_tx.clone()));
    if let Some(path) = &config.kv_shm_socket {
        let (shm, shm_rx) = ShmReceiver::bind(path, local.clone(), config.shm.clone()).await?;
        endpoints.push((v1::Transport::Shm, Endpoint::Shm(path.clone())));
        receivers.push(Arc::new(shm));
        tokio::spawn(forward(shm_rx, merged_tx.clone()));
    }
    drop(merged_tx);

    let info = WorkerInfo {
        worker_id: worker_id.clone(),
        role: v1::WorkerRole::Decode as i32,
        model_name: baton_engine::model_name(&config.engine.model),
        layout: Some(convert::descriptor_to_proto(&local)),
        kv_endpoints: endpoints
            .iter()
            .map(|(_, e)| convert::endpoint_to_proto(e, &config.host_id))
            .collect(),
        max_context: engine.max_context() as u32,
        block_size: engine.block_size() as u32,
        total_blocks: engine.total_blocks() as u32,
        eos_token_ids: engine.tokenizer().eos_token_ids().to_vec(),
    };
    let max_context = engine.max_context();
    let eos = engine.tokenizer().eos_token_ids().to_vec();
    tracing::info!(%worker_id, %addr, kv = ?endpoints.iter().map(|(_, e)| e.to_string()).collect::<Vec<_>>(), blocks = engine.total_blocks(), "decode worker serving");
    let draining = Arc::new(AtomicBool::new(false));
    let (handle, join) = engine_loop::spawn(
        Batcher::new(engine, eos),
        receivers,
        merged_rx,
        LoopConfig {
            queue_capacity: config.max_streams * 2,
            max_streams: config.max_streams,
            max_lease_ttl: config.max_lease_ttl,
            kv_failure_policy: config.kv_failure_policy,
        },
        tokio::runtime::Handle::current(),
    )
    .map_err(|e| Error::Internal(format!("start engine thread: {e}")))?;
    let metrics = metrics
        .map(|listener| {
            let draining = draining.clone();
            baton_telemetry::MetricsServer::start(
                listener,
                crate::metrics::render(handle.snapshots(), draining.clone()),
                move || !draining.load(Ordering::Relaxed),
            )
        })
        .transpose()
        .map_err(|e| Error::Internal(format!("metrics endpoint: {e}")))?;
    let service = DecodeService {
        draining: draining.clone(),
        engine: handle.clone(),
        endpoints,
        local,
        info,
        host_id: config.host_id.clone(),
        max_context,
        max_lease_ttl: config.max_lease_ttl,
        prefill_clients: Arc::new(Mutex::new(HashMap::new())),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<DecodeWorkerServer<DecodeService>>()
        .await;
    let reflection = baton_proto::reflection_service(&["baton.v1.DecodeWorker"])
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
        .add_service(DecodeWorkerServer::new(service))
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
    let _ = tokio::task::spawn_blocking(move || join.join()).await;
    drop(metrics);
    result.map_err(|e| Error::Internal(format!("grpc server: {e}")))
}

/// SIGTERM's path: report NOT_SERVING (the coordinator stops routing here at once), refuse new
/// work, let in-flight streams finish until `deadline`, then fail the rest and free every
/// block. The server stops once this returns.
async fn drain(
    engine: &EngineHandle,
    health: &tonic_health::server::HealthReporter,
    draining: &AtomicBool,
    deadline: Duration,
) {
    draining.store(true, Ordering::Relaxed);
    health
        .set_not_serving::<DecodeWorkerServer<DecodeService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let at_start = engine.snapshot().load;
    tracing::info!(
        streams = at_start.running + at_start.waiting,
        deadline_s = deadline.as_secs_f64(),
        "draining: new work refused, in-flight streams finishing"
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

async fn forward(mut from: mpsc::Receiver<Delivery>, to: mpsc::Sender<Delivery>) {
    while let Some(d) = from.recv().await {
        if to.send(d).await.is_err() {
            return;
        }
    }
}

type PrefillClient = PrefillWorkerClient<InterceptedService<Channel, TraceContext>>;

pub struct DecodeService {
    /// Set when a drain starts: new work is refused from then on.
    draining: Arc<AtomicBool>,
    engine: EngineHandle,
    /// Where this worker receives KV, by transport; the index is the engine's receiver index.
    endpoints: Vec<(v1::Transport, Endpoint)>,
    local: LayoutDescriptor,
    info: WorkerInfo,
    host_id: String,
    max_context: usize,
    max_lease_ttl: Duration,
    prefill_clients: Arc<Mutex<HashMap<String, PrefillClient>>>,
}

impl DecodeService {
    /// The receiver for `transport` (unspecified means TCP).
    fn receiver(&self, transport: i32) -> Result<(usize, &Endpoint)> {
        let wanted = match v1::Transport::try_from(transport) {
            Ok(v1::Transport::Unspecified) => v1::Transport::Tcp,
            Ok(t) => t,
            Err(_) => {
                return Err(Error::InvalidRequest {
                    field: "transport",
                    reason: format!("unknown value {transport}"),
                });
            }
        };
        self.endpoints
            .iter()
            .enumerate()
            .find(|(_, (t, _))| *t == wanted)
            .map(|(i, (_, e))| (i, e))
            .ok_or(Error::InvalidRequest {
                field: "transport",
                reason: format!(
                    "this decode worker does not receive over {}",
                    wanted.as_str_name()
                ),
            })
    }

    fn ttl(&self, ttl_ms: u32) -> Duration {
        if ttl_ms == 0 {
            Duration::from_secs(10).min(self.max_lease_ttl)
        } else {
            Duration::from_millis(u64::from(ttl_ms))
        }
    }

    /// New work (a reservation, a pull, an aggregated prompt) is refused while draining; a
    /// decode of KV already reserved here is in-flight work and goes on.
    fn admit_new_work(&self) -> Result<()> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Error::Draining);
        }
        Ok(())
    }

    fn validate_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest {
                field: "prompt_token_ids",
                reason: "is empty".into(),
            });
        }
        Ok(())
    }
}

async fn prefill_client(
    clients: &Mutex<HashMap<String, PrefillClient>>,
    address: &str,
) -> Result<PrefillClient> {
    let mut clients = clients.lock().await;
    if let Some(c) = clients.get(address) {
        return Ok(c.clone());
    }
    let channel = Channel::from_shared(format!("http://{address}"))
        .map_err(|e| Error::InvalidRequest {
            field: "prefill_worker_address",
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    let client = PrefillWorkerClient::with_interceptor(channel, TraceContext);
    clients.insert(address.to_string(), client.clone());
    Ok(client)
}

fn invalid(e: convert::ConvertError) -> Error {
    Error::InvalidRequest {
        field: e.field,
        reason: e.reason,
    }
}

type DecodeStream = ReceiverStream<Result<DecodeResponse, Status>>;

#[tonic::async_trait]
impl DecodeWorker for DecodeService {
    type DecodeStream = DecodeStream;

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadReport>, Status> {
        let (load, _) = self.engine.load()?;
        Ok(Response::new(LoadReport {
            running: load.running,
            waiting: load.waiting,
            free_blocks: load.free_blocks,
            total_blocks: load.total_blocks,
            leases: load.leases,
            draining: self.draining.load(Ordering::Relaxed),
        }))
    }

    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        self.admit_new_work()?;
        let req = request.into_inner();
        self.validate_prompt(&req.prompt_token_ids)?;
        let (index, endpoint) = self.receiver(req.transport)?;
        let blocks = self
            .engine
            .reserve(
                HandoffId(req.handoff_id),
                req.prompt_token_ids,
                self.ttl(req.ttl_ms),
                index,
            )
            .await?;
        Ok(Response::new(ReserveResponse {
            endpoint: Some(convert::endpoint_to_proto(endpoint, &self.host_id)),
            destination: Some(convert::descriptor_to_proto(&self.local)),
            blocks,
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

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let renewed = self
            .engine
            .renew(HandoffId(request.into_inner().handoff_id))
            .await?;
        Ok(Response::new(RenewResponse { renewed }))
    }

    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let deadline =
            convert::grpc_timeout(request.metadata()).map(|t| (tokio::time::Instant::now() + t, t));
        let req = request.into_inner();
        if !matches!(req.source, Some(Source::Pushed(_))) {
            self.admit_new_work()?;
        }
        let params = convert::sampling_from_proto(req.sampling.as_ref());
        let (source, prompt_tokens, pull) = match req.source {
            Some(Source::Pushed(p)) => {
                let first = p.first_token.as_ref().ok_or(Error::InvalidRequest {
                    field: "first_token",
                    reason: "is required".into(),
                })?;
                (
                    DecodeSource::Imported {
                        handoff: HandoffId(p.handoff_id),
                        first_token: convert::token_from_proto(first),
                    },
                    None,
                    None,
                )
            }
            Some(Source::Pulled(p)) => {
                let descriptor = p.descriptor.as_ref().ok_or(Error::InvalidRequest {
                    field: "descriptor",
                    reason: "is required".into(),
                })?;
                let first = p.first_token.as_ref().ok_or(Error::InvalidRequest {
                    field: "first_token",
                    reason: "is required".into(),
                })?;
                self.validate_prompt(&p.prompt_token_ids)?;
                if let Some(source) = &descriptor.source {
                    let source = convert::descriptor_from_proto(source).map_err(invalid)?;
                    self.local
                        .check_compatible(&source)
                        .map_err(|e| Error::Transport(e.into()))?;
                }
                let handoff = HandoffId(descriptor.handoff_id);
                let (index, endpoint) = self.receiver(p.transport)?;
                self.engine
                    .reserve(
                        handoff,
                        p.prompt_token_ids.clone(),
                        self.ttl(descriptor.ttl_ms),
                        index,
                    )
                    .await?;
                let pull = (
                    handoff,
                    descriptor.prefill_worker_address.clone(),
                    convert::endpoint_to_proto(endpoint, &self.host_id),
                );
                (
                    DecodeSource::Imported {
                        handoff,
                        first_token: convert::token_from_proto(first),
                    },
                    Some(p.prompt_token_ids.len()),
                    Some(pull),
                )
            }
            Some(Source::Prompt(p)) => {
                self.validate_prompt(&p.prompt_token_ids)?;
                let n = p.prompt_token_ids.len();
                (
                    DecodeSource::Prompt {
                        prompt: p.prompt_token_ids,
                    },
                    Some(n),
                    None,
                )
            }
            None => {
                return Err(Error::InvalidRequest {
                    field: "source",
                    reason: "one of pushed, pulled or prompt is required".into(),
                }
                .into());
            }
        };
        let room = prompt_tokens.map_or(self.max_context, |n| self.max_context.saturating_sub(n));
        if let Err(e) = params.validate(&SamplingLimits::with_room(room)) {
            if let Some((handoff, _, _)) = &pull {
                let _ = self.engine.release(*handoff).await;
            }
            return Err(Error::Engine(e.into()).into());
        }
        let imported = matches!(source, DecodeSource::Imported { .. });
        let events = match self.engine.decode(source, params).await {
            Ok(ev) => ev,
            Err(e) => {
                if let Some((handoff, _, _)) = &pull {
                    let _ = self.engine.release(*handoff).await;
                }
                return Err(e.into());
            }
        };
        let pull = match pull {
            Some((handoff, address, endpoint)) => {
                let client = prefill_client(&self.prefill_clients, &address).await?;
                let engine = self.engine.clone();
                let layout = convert::descriptor_to_proto(&self.local);
                // The read: the prefill worker sends its leased blocks to our receiver. Its
                // failure fails the handoff; the engine decides by policy what the stream sees.
                let mut reader = client.clone();
                let (report_tx, report_rx) = oneshot::channel();
                let span = tracing::info_span!("transfer", shape = "pull", %handoff);
                tokio::spawn(
                    async move {
                        let result = reader
                            .pull(v1::PullRequest {
                                handoff_id: handoff.0,
                                destination: Some(endpoint),
                                destination_layout: Some(layout),
                            })
                            .await;
                        match result {
                            Ok(response) => {
                                let _ = report_tx.send(response.into_inner().kv);
                            }
                            Err(status) => {
                                let _ = engine
                                    .abandon(
                                        handoff,
                                        format!(
                                            "pull from the prefill worker failed: {}",
                                            status.message()
                                        ),
                                    )
                                    .await;
                            }
                        }
                    }
                    .instrument(span),
                );
                Some((handoff, client, report_rx))
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(
            stream_events(events, tx, imported, prompt_tokens, pull, deadline)
                .instrument(tracing::info_span!("decode_stream", imported)),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Turns engine events into response messages until the job ends or the client goes away
/// (dropping `events` then tells the engine to cancel).
async fn stream_events(
    mut events: mpsc::Receiver<DecodeEvent>,
    tx: mpsc::Sender<Result<DecodeResponse, Status>>,
    imported: bool,
    prompt_tokens: Option<usize>,
    pull: Option<(
        HandoffId,
        PrefillClient,
        oneshot::Receiver<Option<v1::KvTransferStats>>,
    )>,
    deadline: Option<(tokio::time::Instant, Duration)>,
) {
    let (mut pull, mut source_report) = match pull {
        Some((h, c, r)) => (Some((h, c)), Some(r)),
        None => (None, None),
    };
    // The prefill worker sampled the first token of an imported sequence.
    let mut completion = u32::from(imported);
    let mut kv = v1::KvTransferStats::default();
    let expired = async move {
        match deadline {
            Some((at, _)) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    loop {
        let event = tokio::select! {
            e = events.recv() => match e {
                Some(e) => e,
                None => return,
            },
            () = &mut expired => {
                // Returning drops `events`: the engine cancels the stream and frees its blocks.
                let timeout = deadline.map_or(Duration::ZERO, |(_, t)| t);
                let _ = tx
                    .send(Err(Status::deadline_exceeded(format!(
                        "the call's deadline passed ({timeout:?} after it arrived)"
                    ))))
                    .await;
                return;
            }
        };
        let message = match event {
            DecodeEvent::KvLanded { bytes, transfer } => {
                kv.bytes = bytes;
                kv.transfer_seconds = transfer.as_secs_f64();
                tracing::info!(bytes, transfer_s = transfer.as_secs_f64(), "kv landed");
                if let Some((handoff, mut client)) = pull.take() {
                    // Verified and imported: the prefill worker may free its copy.
                    tokio::spawn(async move {
                        if let Err(status) = client
                            .release(v1::ReleaseRequest {
                                handoff_id: handoff.0,
                            })
                            .await
                        {
                            tracing::warn!(%handoff, error = %status.message(), "release of the pull source failed; its lease will expire");
                        }
                    });
                }
                continue;
            }
            DecodeEvent::Recomputing { reason } => {
                tracing::warn!(%reason, "stream continues on recomputed kv");
                continue;
            }
            DecodeEvent::Token { token, finish } => {
                completion += 1;
                // The pull read's answer (the prefill worker's byte count) races the KV it
                // announces; by the last token it is due, so wait for it briefly.
                let source_kv = match (&finish, source_report.take()) {
                    (Some(_), Some(rx)) => tokio::time::timeout(Duration::from_secs(5), rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .flatten(),
                    (None, rx) => {
                        source_report = rx;
                        None
                    }
                    (Some(_), None) => None,
                };
                DecodeResponse {
                    tokens: vec![convert::token_to_proto(&token)],
                    finish: finish.map(|reason| DecodeFinish {
                        reason: convert::finish_to_proto(reason) as i32,
                        prompt_tokens: prompt_tokens.unwrap_or(0) as u32,
                        completion_tokens: completion,
                        kv: Some(kv),
                        source_kv,
                    }),
                }
            }
            DecodeEvent::Failed(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        let last = message.finish.is_some();
        if tx.send(Ok(message)).await.is_err() || last {
            return;
        }
    }
}
