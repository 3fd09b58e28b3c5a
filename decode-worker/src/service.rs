//! The `baton.v1.DecodeWorker` gRPC service, and the worker around it: the engine thread, the
//! transfer agent, the shared server scaffold (health, reflection, metrics, drain).
//!
//! ```text
//! coordinator --Decode(push)--> service --> engine thread: blocks reserved, expected
//!     <--first message: reserved blocks--   (the coordinator hands them to the prefill worker)
//! prefill agent --writes, completion--> agent --Event--> engine thread --> decoding
//! coordinator --Decode(pull)--> engine thread: reserve, expect, ask the prefill agent to write
//! engine thread --DecodeEvent--> stream task --DecodeResponse--> coordinator
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use baton_core::{HandoffId, RequestId};
use baton_engine::batch::Batcher;
use baton_engine::{PoolMemory, SamplingLimits};
use baton_kv_transfer::agent::{Agent, LinkKey};
use baton_proto::convert;
use baton_proto::v1::{
    self, DecodeFinish, DecodeRequest, DecodeResponse, DisconnectRequest, DisconnectResponse,
    InfoRequest, LoadReport, LoadRequest, WorkerInfo,
    decode_request::Source as ProtoSource,
    decode_worker_server::{DecodeWorker, DecodeWorkerServer},
};
use baton_worker::ServeOptions;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::config::DecodeConfig;
use crate::engine_loop::{self, DecodeEngine, DecodeEvent, Landed, LoopConfig, Source};
use crate::error::{Error, Result};

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
    let metrics = baton_worker::serve::bind_metrics(config.metrics, config.metrics_listen)
        .await
        .map_err(Error::Internal)?;
    serve_with_metrics(config, listener, metrics, shutdown).await
}

/// Serves gRPC on `listener` and, when given, `/metrics` on `metrics` (both already bound, so
/// a caller can announce ports the OS chose).
pub async fn serve_with_metrics(
    mut config: DecodeConfig,
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
    if config.nice > 0 {
        // Before the model loads, so its thread pools inherit the priority too.
        match baton_worker::priority::lower_priority(config.nice) {
            Ok(threads) => tracing::info!(
                nice = config.nice,
                threads,
                "running below default cpu priority"
            ),
            Err(e) => {
                tracing::warn!(nice = config.nice, error = %e, "could not lower cpu priority; running at the default")
            }
        }
    }
    let worker_id = crate::config::worker_id(config.worker_id.as_deref())?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener address: {e}")))?;
    check_exposure(&config, addr)?;
    // Prefill workers on this host copy straight into a pool they can map.
    if config.kv.shm_socket.is_some() {
        config.engine.pool_memory = PoolMemory::Shared;
    }
    let engine_config = config.engine.clone();
    let group = config.group.clone();
    let engine =
        tokio::task::spawn_blocking(move || baton_group::load_engine(engine_config, &group))
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
    let local = engine.descriptor().clone();
    let mut info = WorkerInfo {
        worker_id: worker_id.to_string(),
        role: v1::WorkerRole::Decode as i32,
        model_name: baton_engine::model_name(&config.engine.model),
        layout: Some(convert::descriptor_to_proto(&local)),
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
    let eos = engine.tokenizer().eos_token_ids().to_vec();
    tracing::info!(%worker_id, %addr, kv = ?agent.endpoints().iter().map(ToString::to_string).collect::<Vec<_>>(), blocks = engine.total_blocks(), "decode worker serving");
    let kv_log = baton_worker::KvLog::default();
    let (handle, join) = engine_loop::spawn(
        Batcher::new(engine, eos),
        agent.clone(),
        agent_events,
        LoopConfig {
            queue_capacity: config.max_streams * 2,
            max_streams: config.max_streams,
            max_lease_ttl: config.max_lease_ttl,
            kv_failure_policy: config.kv_failure_policy,
            kv_log: kv_log.clone(),
        },
        tokio::runtime::Handle::current(),
    )
    .map_err(|e| Error::Internal(format!("start engine thread: {e}")))?;
    let draining = Arc::new(AtomicBool::new(false));
    let metrics = metrics
        .map(|listener| {
            let draining = draining.clone();
            baton_telemetry::MetricsServer::start(
                listener,
                crate::metrics::render(handle.snapshots(), draining.clone(), agent.clone()),
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
            baton_discovery::Role::Decode,
            &mut info,
            &config.host_id,
            addr,
            handle.snapshots(),
            move |request| load_report(&engine, &draining, &kv_log, request).ok(),
        )
        .await?
    };
    let shutdown = joined.leave_after(shutdown);
    let service = DecodeService {
        draining: draining.clone(),
        kv_log,
        engine: handle.clone(),
        info,
        host_id: config.host_id.clone(),
        max_context,
        default_ttl: config.default_lease_ttl,
        agent: agent.clone(),
    };
    let served = baton_worker::serve(
        ServeOptions {
            role: "decode",
            reflected: &["baton.v1.DecodeWorker"],
            drain_timeout: config.drain_timeout,
            draining,
            tls,
        },
        listener,
        DecodeWorkerServer::new(service),
        handle.handle(),
        shutdown,
    )
    .await;
    let _ = tokio::task::spawn_blocking(move || join.join()).await;
    drop(metrics);
    served.map_err(Error::Internal)
}

pub struct DecodeService {
    /// What the engine's prefix cache stored and evicted, for load reports.
    kv_log: baton_worker::KvLog,
    /// Set when a drain starts: new work is refused from then on.
    draining: Arc<AtomicBool>,
    engine: DecodeEngine,
    info: WorkerInfo,
    host_id: String,
    max_context: usize,
    default_ttl: Duration,
    /// The KV agent, for links the coordinator says to close.
    agent: Agent,
}

impl DecodeService {
    fn ttl(&self, ttl_ms: u32) -> Duration {
        if ttl_ms == 0 {
            self.default_ttl
        } else {
            Duration::from_millis(u64::from(ttl_ms))
        }
    }

    fn validate_prompt(prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidRequest {
                field: "prompt_token_ids",
                reason: "is empty".into(),
            });
        }
        Ok(())
    }
}

/// A DisconnectPeer request's (required) endpoint.
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
        return Ok(RequestId::generate(rand_u64()));
    }
    RequestId::parse(sent).map_err(|reason| Error::InvalidRequest {
        field: "request_id",
        reason,
    })
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

type DecodeStream = ReceiverStream<Result<DecodeResponse, Status>>;

#[tonic::async_trait]
impl DecodeWorker for DecodeService {
    type DecodeStream = DecodeStream;

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

    async fn disconnect_peer(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DisconnectResponse>, Status> {
        let endpoint = peer_endpoint(request.get_ref().endpoint.as_ref())?;
        let was_connected = self
            .agent
            .disconnect(&endpoint, "the coordinator says the prefill worker left")
            .await;
        Ok(Response::new(DisconnectResponse { was_connected }))
    }

    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        // New work of every kind is refused while draining; what is already here finishes.
        if self.draining.load(Ordering::Relaxed) {
            return Err(Error::Draining.into());
        }
        let deadline =
            convert::grpc_timeout(request.metadata()).map(|t| (std::time::Instant::now() + t, t));
        let req = request.into_inner();
        let request = request_id(&req.request_id)?;
        let params = convert::sampling_from_proto(req.sampling.as_ref());
        let (source, prompt_tokens, shape) = match req.source {
            Some(ProtoSource::Push(p)) => {
                Self::validate_prompt(&p.prompt_token_ids)?;
                convert::transport_from_proto(p.transport).map_err(invalid)?;
                let n = p.prompt_token_ids.len();
                (
                    Source::Push {
                        handoff: HandoffId(p.handoff_id),
                        prompt: p.prompt_token_ids,
                        ttl: self.ttl(p.ttl_ms),
                    },
                    n,
                    Some(v1::HandoffShape::Push),
                )
            }
            Some(ProtoSource::Pull(p)) => {
                Self::validate_prompt(&p.prompt_token_ids)?;
                let source =
                    convert::blocks_from_proto(p.source.as_ref().ok_or(Error::InvalidRequest {
                        field: "source",
                        reason: "is required".into(),
                    })?)
                    .map_err(invalid)?;
                let transport = convert::transport_from_proto(p.transport).map_err(invalid)?;
                let n = p.prompt_token_ids.len();
                (
                    Source::Pull {
                        handoff: HandoffId(p.handoff_id),
                        prompt: p.prompt_token_ids,
                        source,
                        transport,
                        ttl: self.ttl(p.ttl_ms),
                    },
                    n,
                    Some(v1::HandoffShape::Pull),
                )
            }
            Some(ProtoSource::Prompt(p)) => {
                Self::validate_prompt(&p.prompt_token_ids)?;
                let n = p.prompt_token_ids.len();
                (
                    Source::Prompt {
                        prompt: p.prompt_token_ids,
                    },
                    n,
                    None,
                )
            }
            None => {
                return Err(Error::InvalidRequest {
                    field: "source",
                    reason: "one of push, pull or prompt is required".into(),
                }
                .into());
            }
        };
        let room = self.max_context.saturating_sub(prompt_tokens);
        params
            .validate(&SamplingLimits::with_room(room))
            .map_err(|e| Error::Engine(e.into()))?;
        let replay = req.generated_token_ids;
        // The client has these; the first of them is the prefill side's, as a new
        // disaggregated stream's first token is.
        let completion = (replay.len() as u32).max(u32::from(shape.is_some()));
        let span = tracing::info_span!("decode_stream", request = %request, disaggregated = shape.is_some());
        let (started, events) = self
            .engine
            .decode(request, source, params, replay)
            .instrument(span.clone())
            .await?;
        let (tx, rx) = mpsc::channel(16);
        if let Some(reserved) = &started.reserved {
            // The first message: the blocks the prefill worker writes into.
            let first = DecodeResponse {
                reserved: Some(convert::blocks_to_proto(reserved, &self.host_id)),
                ..Default::default()
            };
            let _ = tx.try_send(Ok(first));
        }
        let stream = StreamTask {
            engine: self.engine.clone(),
            stream: started.stream,
            events,
            tx,
            prompt_tokens: prompt_tokens as u32,
            completion,
            disaggregated: shape,
            deadline,
        };
        tokio::spawn(stream.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Turns engine events into response messages until the job ends or the client goes away
/// (then the engine is told to cancel, and frees the blocks before its next step).
struct StreamTask {
    engine: DecodeEngine,
    stream: baton_engine::SeqId,
    events: mpsc::Receiver<DecodeEvent>,
    tx: mpsc::Sender<Result<DecodeResponse, Status>>,
    prompt_tokens: u32,
    /// Tokens the client had before this stream's first message.
    completion: u32,
    /// The handoff's shape, for a disaggregated decode.
    disaggregated: Option<v1::HandoffShape>,
    deadline: Option<(std::time::Instant, Duration)>,
}

impl StreamTask {
    async fn run(mut self) {
        let mut completion = self.completion;
        let mut landed: Option<Landed> = None;
        let mut cached_tokens = 0;
        let deadline = self.deadline;
        let expired = baton_worker::sleep_until(deadline.map(|(at, _)| at));
        tokio::pin!(expired);
        loop {
            let event = tokio::select! {
                e = self.events.recv() => match e {
                    Some(e) => e,
                    None => return,
                },
                () = self.tx.closed() => {
                    self.engine.cancel(self.stream).await;
                    return;
                }
                () = &mut expired => {
                    let timeout = deadline.map_or(Duration::ZERO, |(_, t)| t);
                    let _ = self
                        .tx
                        .send(Err(Status::deadline_exceeded(format!(
                            "the call's deadline passed ({timeout:?} after it arrived)"
                        ))))
                        .await;
                    self.engine.cancel(self.stream).await;
                    return;
                }
            };
            let message = match event {
                DecodeEvent::KvLanded(l) => {
                    tracing::info!(
                        bytes = l.bytes,
                        transfer_s = l.transfer.as_secs_f64(),
                        "kv landed"
                    );
                    landed = Some(l);
                    continue;
                }
                DecodeEvent::Recomputed {
                    first_token,
                    reason,
                    finish,
                } => {
                    tracing::warn!(%reason, "stream continues on recomputed kv");
                    DecodeResponse {
                        recomputed_first_token: Some(convert::token_to_proto(&first_token)),
                        finish: finish.map(|r| self.finish(r, completion, landed)),
                        ..Default::default()
                    }
                }
                DecodeEvent::Token {
                    token,
                    finish,
                    cached,
                } => {
                    completion += 1;
                    cached_tokens = cached.unwrap_or(cached_tokens);
                    DecodeResponse {
                        tokens: vec![convert::token_to_proto(&token)],
                        finish: finish.map(|r| DecodeFinish {
                            cached_tokens,
                            ..self.finish(r, completion, landed)
                        }),
                        ..Default::default()
                    }
                }
                DecodeEvent::Failed(e) => {
                    let _ = self.tx.send(Err(e.into())).await;
                    return;
                }
            };
            let last = message.finish.is_some();
            if self.tx.send(Ok(message)).await.is_err() {
                self.engine.cancel(self.stream).await;
                return;
            }
            if last {
                return;
            }
        }
    }

    fn finish(
        &self,
        reason: baton_engine::FinishReason,
        completion: u32,
        landed: Option<Landed>,
    ) -> DecodeFinish {
        let shape = self.disaggregated.unwrap_or(v1::HandoffShape::Unspecified) as i32;
        let stats = |bytes: u64, transfer: Duration, exposed: Duration| v1::KvTransferStats {
            bytes,
            transfer_seconds: transfer.as_secs_f64(),
            exposed_seconds: exposed.as_secs_f64(),
            shape,
            ..Default::default()
        };
        DecodeFinish {
            reason: convert::finish_to_proto(reason) as i32,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: completion,
            kv: self.disaggregated.map(|_| {
                landed.map_or_else(v1::KvTransferStats::default, |l| v1::KvTransferStats {
                    cached_tokens: l.cached_tokens,
                    cached_bytes: l.cached_bytes,
                    ..stats(l.bytes, l.transfer, Duration::ZERO)
                })
            }),
            source_kv: landed.map(|l| stats(l.sender_bytes, l.sender_transfer, l.sender_exposed)),
            cached_tokens: 0,
        }
    }
}

/// The load report `Load` answers and the event plane publishes: the engine's last snapshot,
/// the drain, and the KV events after the asker's cursor.
fn load_report(
    engine: &DecodeEngine,
    draining: &AtomicBool,
    kv_log: &baton_worker::KvLog,
    request: &LoadRequest,
) -> Result<LoadReport, Status> {
    let (load, _) = engine.load()?;
    Ok(LoadReport {
        running: load.running,
        waiting: load.waiting,
        free_blocks: load.free_blocks,
        total_blocks: load.total_blocks,
        leases: load.leases,
        draining: draining.load(Ordering::Relaxed),
        kv_events: kv_log.answer(request),
    })
}

/// Refuses to serve beyond this host without security, or warns where `insecure_remote`
/// allows it ([`baton_worker::exposure`]).
fn check_exposure(config: &DecodeConfig, listen: std::net::SocketAddr) -> Result<()> {
    baton_worker::exposure::Exposure::of_worker(
        "decode",
        listen,
        config.kv.tcp_listen,
        config.tls.is_some(),
        config.discovery.cluster_key_file.is_some(),
        config.insecure_remote,
    )
    .enforce()
    .map_err(|(field, reason)| Error::InvalidRequest { field, reason })?;
    // The group's rank links prove a shared secret but carry no TLS yet: beyond this host they
    // need the same explicit consent as any other unsecured listener.
    let group = &config.group;
    if group.ranks() > 1 && !group.listen.ip().is_loopback() {
        if !config.insecure_remote {
            return Err(Error::InvalidRequest {
                field: "group.listen",
                reason: format!(
                    "{}: a group's rank links carry no TLS yet (the group's secret only); a non-loopback group address needs insecure_remote = true",
                    group.listen
                ),
            });
        }
        tracing::warn!(listen = %group.listen, "INSECURE: the group's rank links cross the network without TLS (insecure_remote = true)");
    }
    Ok(())
}
