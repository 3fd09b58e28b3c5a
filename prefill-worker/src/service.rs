//! The `baton.v1.PrefillWorker` gRPC service, and the worker around it: the engine thread, the
//! transfer agent, the shared server scaffold (health, reflection, metrics, drain).
//!
//! ```text
//! coordinator --Prefill(push to D's blocks)--> service: link to D's agent (claimed if direct)
//!     --> engine thread (layers out as computed) --> sender task --> decode worker
//!     <-- first token, as soon as it is sampled
//! coordinator --Prefill(pull)--> engine thread: pinned, offered --> first token + source
//!     decode agent --read--> this agent's task (not the engine thread) --> decode worker
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_core::{HandoffId, RequestId};
use baton_engine::{Engine, SamplingLimits};
use baton_kv_transfer::agent::{Agent, LinkKey};
use baton_proto::convert;
use baton_proto::v1::{
    self, ConnectRequest, ConnectResponse, DisconnectRequest, DisconnectResponse, InfoRequest,
    LoadReport, LoadRequest, PrefillRequest, PrefillResponse, ReleaseRequest, ReleaseResponse,
    WorkerInfo,
    prefill_request::Handoff,
    prefill_worker_server::{PrefillWorker, PrefillWorkerServer},
};
use baton_worker::ServeOptions;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::config::PrefillConfig;
use crate::engine_loop::{self, JobShape, LoopConfig, PrefillEngine, PrefillJob};
use crate::error::{Error, Result};
use crate::metrics::KvCounters;

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
    let metrics = baton_worker::serve::bind_metrics(config.metrics, config.metrics_listen)
        .await
        .map_err(Error::Internal)?;
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
    // Read now, so a bad certificate stops the worker before its model loads.
    let tls = config
        .tls
        .as_ref()
        .map(baton_proto::tls::server_config)
        .transpose()?;
    let worker_id = crate::config::worker_id(config.worker_id.as_deref())?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener address: {e}")))?;
    check_exposure(&config, addr)?;
    let engine_config = config.engine.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::load(engine_config))
        .await
        .map_err(|e| Error::Internal(format!("model load task: {e}")))??;
    // With a cluster key, KV links prove it at connect and refuse peers without it.
    let link_key = config
        .discovery
        .key()?
        .map(|k| LinkKey::new(k.kv_link_key()));
    let (agent, agent_events) = Agent::start(
        worker_id.clone(),
        engine.kv_region(),
        config.kv.clone(),
        link_key,
    )
    .await?;
    let mut info = WorkerInfo {
        worker_id: worker_id.to_string(),
        role: v1::WorkerRole::Prefill as i32,
        model_name: baton_engine::model_name(&config.engine.model),
        layout: Some(convert::descriptor_to_proto(engine.descriptor())),
        kv_endpoints: agent
            .endpoints()
            .iter()
            .map(|e| convert::endpoint_to_proto(e, &config.host_id))
            .collect(),
        max_context: engine.max_context() as u32,
        block_size: engine.block_size() as u32,
        total_blocks: engine.total_blocks() as u32,
        eos_token_ids: engine.tokenizer().eos_token_ids().to_vec(),
        event_port: 0,
        device: config.engine.device.to_string(),
    };
    let max_context = engine.max_context();
    tracing::info!(%worker_id, %addr, kv = ?agent.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>(), blocks = engine.total_blocks(), "prefill worker serving");
    let kv_log = baton_worker::KvLog::default();
    let (handle, join) = engine_loop::spawn(
        engine,
        agent.clone(),
        agent_events,
        LoopConfig {
            queue_capacity: config.max_pending * 2,
            max_pending: config.max_pending,
            max_lease_ttl: config.max_lease_ttl,
            kv_log: kv_log.clone(),
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
                crate::metrics::render(
                    handle.snapshots(),
                    kv_counters.clone(),
                    draining.clone(),
                    agent.clone(),
                ),
                move || !draining.load(Ordering::Relaxed),
            )
        })
        .transpose()
        .map_err(|e| Error::Internal(format!("metrics endpoint: {e}")))?;
    // The event plane (where a cluster key signs it) and the advert.
    let mut joined = {
        let engine = handle.clone();
        let draining = draining.clone();
        let kv_log = kv_log.clone();
        baton_worker::announce::join(
            &config.discovery,
            baton_discovery::Role::Prefill,
            &mut info,
            &config.host_id,
            addr,
            handle.snapshots(),
            move |request| load_report(&engine, &draining, &kv_log, request).ok(),
        )
        .await?
    };
    let shutdown = joined.leave_after(shutdown);
    let service = PrefillService {
        draining: draining.clone(),
        kv_log,
        kv_counters,
        engine: handle.clone(),
        agent,
        info,
        host_id: config.host_id.clone(),
        segment_queue: config.segment_queue,
        max_context,
    };
    let served = baton_worker::serve(
        ServeOptions {
            role: "prefill",
            reflected: &["baton.v1.PrefillWorker"],
            drain_timeout: config.drain_timeout,
            draining,
            tls,
        },
        listener,
        PrefillWorkerServer::new(service),
        handle.handle(),
        shutdown,
    )
    .await;
    // The service (and every engine handle) is dropped by now: the engine thread ends.
    let _ = tokio::task::spawn_blocking(move || join.join()).await;
    drop(metrics);
    served.map_err(Error::Internal)
}

pub struct PrefillService {
    /// What the engine's prefix cache stored and evicted, for load reports.
    kv_log: baton_worker::KvLog,
    /// Set when a drain starts: new prompts are refused from then on.
    draining: Arc<AtomicBool>,
    kv_counters: Arc<KvCounters>,
    engine: PrefillEngine,
    agent: Agent,
    info: WorkerInfo,
    host_id: String,
    segment_queue: usize,
    max_context: usize,
}

/// A ConnectPeer or DisconnectPeer request's (required) endpoint.
fn peer_endpoint(endpoint: Option<&v1::KvEndpoint>) -> Result<baton_kv_transfer::Endpoint> {
    let endpoint = endpoint.ok_or(Error::InvalidRequest {
        field: "endpoint",
        reason: "is required".into(),
    })?;
    convert::endpoint_from_proto(endpoint).map_err(invalid)
}

fn invalid(e: convert::ConvertError) -> Error {
    Error::InvalidRequest {
        field: e.field,
        reason: e.reason,
    }
}

/// The request id the coordinator sent, or one made here for a caller that sent none.
fn request_id(sent: &str) -> Result<RequestId> {
    if sent.is_empty() {
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        return Ok(RequestId::generate(random));
    }
    RequestId::parse(sent).map_err(|reason| Error::InvalidRequest {
        field: "request_id",
        reason,
    })
}

#[tonic::async_trait]
impl PrefillWorker for PrefillService {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<WorkerInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn load(&self, request: Request<LoadRequest>) -> Result<Response<LoadReport>, Status> {
        load_report(
            &self.engine,
            &self.draining,
            &self.kv_log,
            request.get_ref(),
        )
        .map(Response::new)
    }

    async fn connect_peer(
        &self,
        request: Request<ConnectRequest>,
    ) -> Result<Response<ConnectResponse>, Status> {
        let req = request.into_inner();
        let endpoint = peer_endpoint(req.endpoint.as_ref())?;
        let existed = self.agent.is_connected(&endpoint).await;
        let peer = self.agent.connect(&endpoint).await.map_err(Error::from)?;
        if let Some(d) = &req.destination {
            let d = convert::descriptor_from_proto(d).map_err(invalid)?;
            if d != peer.pool().layout {
                return Err(Error::InvalidRequest {
                    field: "destination",
                    reason: "differs from the layout the decode worker sent at handshake".into(),
                }
                .into());
            }
        }
        Ok(Response::new(ConnectResponse {
            already_connected: existed,
        }))
    }

    async fn disconnect_peer(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        let endpoint = peer_endpoint(request.get_ref().endpoint.as_ref())?;
        let was_connected = self
            .agent
            .disconnect(&endpoint, "the coordinator says the decode worker left")
            .await;
        Ok(Response::new(DisconnectResponse { was_connected }))
    }

    async fn prefill(
        &self,
        request: Request<PrefillRequest>,
    ) -> Result<Response<PrefillResponse>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Error::Draining.into());
        }
        let req = request.into_inner();
        let request = request_id(&req.request_id)?;
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
        let (handoff, shape, span) = match req.handoff {
            Some(Handoff::Push(target)) => {
                let handoff = HandoffId(target.handoff_id);
                let destination = convert::blocks_from_proto(target.destination.as_ref().ok_or(
                    Error::InvalidRequest {
                        field: "destination",
                        reason: "is required".into(),
                    },
                )?)
                .map_err(invalid)?;
                destination
                    .check(prompt.len() as u32)
                    .map_err(|e| Error::InvalidRequest {
                        field: "destination",
                        reason: e.to_string(),
                    })?;
                let transport = convert::transport_from_proto(target.transport).map_err(invalid)?;
                let endpoint =
                    destination
                        .endpoint(transport)
                        .cloned()
                        .ok_or(Error::InvalidRequest {
                            field: "transport",
                            reason: format!(
                                "the decode worker offers no {} endpoint",
                                transport.as_str()
                            ),
                        })?;
                let peer = self.agent.connect(&endpoint).await.map_err(Error::from)?;
                // Writing straight into the decode worker's memory needs its blocks claimed
                // first, so it knows whom to wait for if it gives them up.
                peer.begin(handoff).await.map_err(Error::from)?;
                let ttl = Duration::from_millis(u64::from(target.ttl_ms.max(1)));
                let (tx, rx) = mpsc::channel(self.segment_queue);
                tokio::spawn(
                    crate::sender::run(
                        peer.clone(),
                        handoff,
                        ttl,
                        rx,
                        self.engine.clone(),
                        self.kv_counters.clone(),
                    )
                    .instrument(tracing::info_span!("transfer", shape = "push", %handoff)),
                );
                let shape = JobShape::Push {
                    peer,
                    destination,
                    outgoing: tx,
                };
                (
                    handoff,
                    shape,
                    tracing::info_span!("prefill", %request, %handoff, shape = "push"),
                )
            }
            Some(Handoff::Pull(lease)) => {
                let handoff = HandoffId(lease.handoff_id);
                let ttl = Duration::from_millis(u64::from(lease.ttl_ms));
                (
                    handoff,
                    JobShape::Pull { ttl },
                    tracing::info_span!("prefill", %request, %handoff, shape = "pull"),
                )
            }
            None => {
                return Err(Error::InvalidRequest {
                    field: "handoff",
                    reason: "one of push or pull is required".into(),
                }
                .into());
            }
        };
        let done = self
            .engine
            .prefill(PrefillJob {
                request,
                handoff,
                prompt,
                params,
                shape,
            })
            .instrument(span)
            .await?;
        tracing::debug!(%handoff, queued = ?done.queued, compute = ?done.compute, total = ?started.elapsed(), "prefilled");
        Ok(Response::new(PrefillResponse {
            first_token: Some(convert::token_to_proto(&done.first_token)),
            source: done
                .source
                .as_ref()
                .map(|s| convert::blocks_to_proto(s, &self.host_id)),
            prefill_seconds: done.compute.as_secs_f64(),
            cached_tokens: done.cached_tokens,
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

/// The load report `Load` answers and the event plane publishes: the engine's last snapshot,
/// the drain, and the KV events after the asker's cursor.
fn load_report(
    engine: &PrefillEngine,
    draining: &AtomicBool,
    kv_log: &baton_worker::KvLog,
    request: &LoadRequest,
) -> Result<LoadReport, Status> {
    let (load, _) = engine.load()?;
    Ok(LoadReport {
        running: load.pending,
        waiting: 0,
        free_blocks: load.free_blocks,
        total_blocks: load.total_blocks,
        leases: load.leases,
        draining: draining.load(Ordering::Relaxed),
        kv_events: kv_log.answer(request),
    })
}

/// Refuses to serve beyond this host without security, or warns where `insecure_remote`
/// allows it ([`baton_worker::exposure`]).
fn check_exposure(config: &PrefillConfig, listen: std::net::SocketAddr) -> Result<()> {
    baton_worker::exposure::Exposure::of_worker(
        "prefill",
        listen,
        config.kv.tcp_listen,
        config.tls.is_some(),
        config.discovery.cluster_key_file.is_some(),
        config.insecure_remote,
    )
    .enforce()
    .map_err(|(field, reason)| Error::InvalidRequest { field, reason })
}
