//! The gRPC frontend: `baton.v1.Inference`, `grpc.health.v1` and reflection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use baton_proto::convert;
use baton_proto::v1::{
    self, ClusterStatusRequest, ClusterStatusResponse, GenerateRequest, GenerateResponse,
    ModelsRequest, ModelsResponse, TokenizeRequest, TokenizeResponse,
    inference_server::{Inference, InferenceServer},
};
use baton_text::{ChatMessage, chat::Role};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::generate::{self, GenerateInput, PromptInput, StreamEvent};
use crate::placement::PdMode;
use crate::server::Inner;

/// The gRPC health name of the client API; NOT_SERVING until the cluster is ready (a healthy
/// decode worker, and a healthy prefill worker when any is configured).
pub const INFERENCE_SERVICE: &str = "baton.v1.Inference";

/// Reports readiness through `grpc.health.v1`: the `baton.v1.Inference` entry and the server's
/// overall ("") entry follow `ready`.
pub async fn report_readiness(health: &tonic_health::server::HealthReporter, ready: bool) {
    use tonic_health::ServingStatus;
    let status = if ready {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status(INFERENCE_SERVICE, status).await;
    health.set_service_status("", status).await;
}

pub async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let reflection = baton_proto::reflection_service(&["baton.v1.Inference"])
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    tonic::transport::Server::builder()
        .trace_fn(baton_telemetry::grpc_server_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InferenceServer::new(InferenceService { inner }))
        .serve_with_incoming_shutdown(baton_proto::incoming(listener), shutdown)
        .await
        .map_err(|e| Error::Internal(format!("grpc server: {e}")))
}

pub struct InferenceService {
    inner: Arc<Inner>,
}

impl InferenceService {
    /// The caller, from the `authorization` metadata ([`crate::auth::Auth::admit`]).
    fn admit(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Arc<crate::auth::Caller>, Status> {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        self.inner
            .auth
            .admit(header, std::time::Instant::now())
            .map(Arc::new)
            .map_err(|(why, e)| {
                self.inner.metrics.auth_refused(why);
                e.into()
            })
    }
}

fn chat_messages(chat: v1::ChatMessages) -> Result<Vec<ChatMessage>> {
    chat.messages
        .into_iter()
        .map(|m| {
            let role: Role = m.role.parse()?;
            Ok(ChatMessage::new(role, m.content))
        })
        .collect()
}

fn pd_mode(value: i32) -> Result<PdMode> {
    match v1::PdMode::try_from(value) {
        Ok(v1::PdMode::Auto) => Ok(PdMode::Auto),
        Ok(v1::PdMode::Force) => Ok(PdMode::Force),
        Ok(v1::PdMode::Off) => Ok(PdMode::Off),
        Err(_) => Err(Error::InvalidRequest {
            field: "pd_mode",
            reason: format!("unknown value {value}"),
        }),
    }
}

/// The gRPC finish message for a stream's last event.
pub fn finish_to_proto(
    reason: baton_text::FinishReason,
    usage: generate::Usage,
    placement: &generate::Placement,
) -> v1::GenerateFinish {
    let kv = placement.shape.map(|shape| v1::KvTransferStats {
        bytes: placement.kv_bytes,
        segments: 0,
        transfer_seconds: placement.transfer_seconds,
        exposed_seconds: placement.exposed_seconds,
        transport: match placement.transport {
            Some("shm") => v1::Transport::Shm,
            _ => v1::Transport::Tcp,
        } as i32,
        shape: if shape == "pull" {
            v1::HandoffShape::Pull
        } else {
            v1::HandoffShape::Push
        } as i32,
        cached_tokens: placement.kv_cached_tokens,
        cached_bytes: placement.kv_cached_bytes,
    });
    v1::GenerateFinish {
        reason: convert::finish_to_proto(reason) as i32,
        usage: Some(v1::Usage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
            cached_tokens: usage.cached_tokens,
        }),
        placement: Some(v1::Placement {
            mode: placement.mode.map_or("", |m| m.as_str()).into(),
            prefill_worker: placement.prefill_worker.clone().unwrap_or_default(),
            decode_worker: placement.decode_worker.clone(),
            kv,
            upstream: placement.upstream.clone().unwrap_or_default(),
            cost_usd: placement.cost_usd,
            kv_bytes_received: placement.kv_bytes_received,
            routing: placement.routing.unwrap_or_default().into(),
            expected_cached_tokens: placement.expected_cached_tokens,
            expected_decode_cached_tokens: placement.expected_decode_cached_tokens,
            placement_reason: placement.reason.unwrap_or_default().into(),
            predicted_transfer_seconds: placement.predicted_transfer_seconds,
            predicted_prefill_seconds: placement.predicted_prefill_seconds,
            migrated_from: placement.migrated_from.clone(),
        }),
    }
}

type GenerateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let caller = self.admit(request.metadata())?;
        let timeout = convert::grpc_timeout(request.metadata());
        let req = request.into_inner();
        let input = match req.input {
            Some(v1::generate_request::Input::Prompt(p)) => PromptInput::Text(p),
            Some(v1::generate_request::Input::Chat(c)) => PromptInput::Chat(chat_messages(c)?),
            Some(v1::generate_request::Input::TokenIds(t)) => PromptInput::Tokens(t.ids),
            None => {
                return Err(Error::InvalidRequest {
                    field: "input",
                    reason: "one of prompt, chat or token_ids is required".into(),
                }
                .into());
            }
        };
        let want_logprobs = req.sampling.as_ref().is_some_and(|s| s.logprobs.is_some());
        // The client's id is echoed and passed to the workers; without one the coordinator
        // assigns one.
        let id = if req.request_id.is_empty() {
            baton_core::RequestId::generate(rand::random::<u64>())
        } else {
            baton_core::RequestId::parse(&req.request_id).map_err(|reason| {
                Error::InvalidRequest {
                    field: "request_id",
                    reason,
                }
            })?
        };
        let input = GenerateInput {
            model: Some(req.model),
            input,
            params: convert::sampling_from_proto(req.sampling.as_ref()),
            pd_mode: pd_mode(req.pd_mode)?,
            skip_special_tokens: req.skip_special_tokens.unwrap_or(true),
            timeout,
            request_id: Some(id.clone()),
            caller: Some(caller),
            allow_cloud: req.allow_cloud,
            max_cost_usd: req.max_cost_usd,
            ttft_target: match req.ttft_target_seconds {
                None => None,
                Some(s) if s > 0.0 && s <= 86_400.0 => Some(std::time::Duration::from_secs_f64(s)),
                Some(_) => {
                    return Err(Error::InvalidRequest {
                        field: "ttft_target_seconds",
                        reason: "must be more than 0 and at most 86400 seconds".into(),
                    }
                    .into());
                }
            },
        };
        let generation = generate::generate(self.inner.clone(), input).await?;
        let request_id = id.to_string();
        // Polled by the server as it writes the response, so a token crosses no extra task
        // here; dropping the body (the client gone) drops `generation`, which cancels the
        // request.
        let responses = futures::stream::unfold(generation, move |mut generation| {
            let request_id = request_id.clone();
            async move {
                let event = generation.next().await?;
                let message = match event {
                    Ok(StreamEvent::Delta { text, tokens }) => Ok(GenerateResponse {
                        request_id,
                        text,
                        token_ids: tokens.iter().map(|t| t.id).collect(),
                        logprobs: if want_logprobs {
                            tokens.iter().map(convert::token_to_proto).collect()
                        } else {
                            Vec::new()
                        },
                        finish: None,
                    }),
                    Ok(StreamEvent::Finish {
                        reason,
                        usage,
                        placement,
                    }) => Ok(GenerateResponse {
                        request_id,
                        text: String::new(),
                        token_ids: Vec::new(),
                        logprobs: Vec::new(),
                        finish: Some(finish_to_proto(reason, usage, &placement)),
                    }),
                    Err(e) => Err(Status::from(e)),
                };
                Some((message, generation))
            }
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn tokenize(
        &self,
        request: Request<TokenizeRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let _caller = self.admit(request.metadata())?;
        let req = request.into_inner();
        if !req.model.is_empty() && req.model != self.inner.model_name {
            return Err(Error::UnknownModel(req.model).into());
        }
        let ids = match req.input {
            Some(v1::tokenize_request::Input::Prompt(p)) => self
                .inner
                .tokenizer
                .encode(&p, req.add_special_tokens)
                .map_err(Error::from)?,
            Some(v1::tokenize_request::Input::Chat(c)) => {
                generate::tokenize(&self.inner, &PromptInput::Chat(chat_messages(c)?))?
            }
            None => {
                return Err(Error::InvalidRequest {
                    field: "input",
                    reason: "one of prompt or chat is required".into(),
                }
                .into());
            }
        };
        Ok(Response::new(TokenizeResponse {
            count: ids.len() as u32,
            token_ids: ids,
            max_context: self.inner.max_context() as u32,
        }))
    }

    async fn models(
        &self,
        request: Request<ModelsRequest>,
    ) -> Result<Response<ModelsResponse>, Status> {
        let _caller = self.admit(request.metadata())?;
        let fingerprint = self
            .inner
            .registry
            .decode()
            .iter()
            .filter(|w| w.refusal().is_none())
            .find_map(|w| w.info().and_then(|i| i.layout).map(|l| l.fingerprint))
            .unwrap_or_default();
        let mut models = vec![v1::ModelInfo {
            id: self.inner.model_name.clone(),
            max_context: self.inner.max_context() as u32,
            fingerprint,
            owned_by: "baton".into(),
        }];
        if let Some(cloud) = &self.inner.cloud {
            for (model, endpoint) in cloud.models() {
                if !models.iter().any(|m| m.id == model) {
                    models.push(v1::ModelInfo {
                        id: model.into(),
                        max_context: 0,
                        fingerprint: Vec::new(),
                        owned_by: format!("cloud:{endpoint}"),
                    });
                }
            }
        }
        Ok(Response::new(ModelsResponse { models }))
    }

    async fn decide_worker(
        &self,
        request: Request<v1::DecideWorkerRequest>,
    ) -> Result<Response<v1::DecideWorkerResponse>, Status> {
        let _caller = self.admit(request.metadata())?;
        let r = request.into_inner();
        let command = decision_command(&r).map_err(Status::from)?;
        let known = self
            .inner
            .registry
            .all()
            .iter()
            .any(|w| w.id().0 == r.worker_id);
        let changed = match self.inner.replica.propose(command).await {
            Ok(baton_replica::Response::Changed) => true,
            Ok(baton_replica::Response::Unchanged) => false,
            Ok(other) => {
                return Err(Status::internal(format!("unexpected answer {other:?}")));
            }
            Err(baton_replica::ProposeError::Invalid(e)) => {
                return Err(Status::invalid_argument(e));
            }
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        tracing::info!(worker = %r.worker_id, decision = r.decision().as_str_name(), reason = %r.reason, changed, known, "operator decision");
        Ok(Response::new(v1::DecideWorkerResponse { changed, known }))
    }

    async fn budget(
        &self,
        request: Request<v1::BudgetRequest>,
    ) -> Result<Response<v1::BudgetResponse>, Status> {
        let _caller = self.admit(request.metadata())?;
        let Some(cloud) = &self.inner.cloud else {
            return Ok(Response::new(v1::BudgetResponse::default()));
        };
        let budget = cloud.budget();
        let replica = budget.replica();
        let status = replica.status();
        let mut response = budget_to_proto(
            &budget.snapshot(),
            &cloud.config.budget,
            &replica.data().display().to_string(),
        );
        response.replica = Some(v1::ReplicaStatus {
            node_id: status.node_id,
            leader: status.leader,
            term: status.term,
            members: status.members,
            applied: status.applied.unwrap_or(0),
        });
        Ok(Response::new(response))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        let _caller = self.admit(request.metadata())?;
        let registry = &self.inner.registry;
        let leave_after = registry.leave_after();
        let workers = registry
            .all()
            .iter()
            .map(|w| v1::WorkerStatus {
                state: crate::workers::state(w, leave_after).into(),
                discovered_via: w.source.as_str().into(),
                refusal: w.refusal().unwrap_or_default(),
                host_id: w.host_id(),
                device: w.info().map(|i| i.device).unwrap_or_default(),
                worker_id: w.id().0,
                role: match w.role {
                    crate::workers::WorkerRole::Prefill => v1::WorkerRole::Prefill,
                    crate::workers::WorkerRole::Decode => v1::WorkerRole::Decode,
                } as i32,
                address: w.address.clone(),
                healthy: w.healthy(),
                load: Some(w.load()),
            })
            .collect::<Vec<_>>();
        let running = self.inner.config.max_inflight - self.inner.admission.available_permits();
        let waiting = workers
            .iter()
            .filter_map(|w| w.load.as_ref())
            .map(|l| l.waiting)
            .sum();
        Ok(Response::new(ClusterStatusResponse {
            links: registry.link_status(),
            workers,
            running_requests: running as u32,
            waiting_requests: waiting,
        }))
    }
}

/// The replicated command a `DecideWorker` request asks for; the field at fault otherwise.
fn decision_command(r: &v1::DecideWorkerRequest) -> Result<baton_replica::Command> {
    use v1::WorkerDecision as D;
    let invalid = |field, reason: &str| Error::InvalidRequest {
        field,
        reason: reason.to_string(),
    };
    if r.worker_id.is_empty() {
        return Err(invalid("worker_id", "must name a worker"));
    }
    if r.reason.len() > 1024 {
        return Err(invalid("reason", "longer than 1024 bytes"));
    }
    let at_unix_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
    let reason = if r.reason.is_empty() {
        "operator".to_string()
    } else {
        r.reason.clone()
    };
    let worker = r.worker_id.clone();
    let command = match D::try_from(r.decision) {
        Ok(D::Drain) => baton_replica::Command::Drain {
            worker,
            reason,
            at_unix_ms,
        },
        Ok(D::Refuse) => baton_replica::Command::Refuse {
            worker,
            reason,
            at_unix_ms,
        },
        Ok(D::Restore) => baton_replica::Command::Restore { worker },
        Ok(D::Unspecified) | Err(_) => {
            return Err(invalid("decision", "must be drain, refuse or restore"));
        }
    };
    command.validate().map_err(|e| invalid("worker_id", &e))?;
    Ok(command)
}

/// The ledger's snapshot as the `Budget` RPC reports it.
pub fn budget_to_proto(
    s: &baton_budget::Snapshot,
    config: &baton_budget::BudgetConfig,
    ledger: &str,
) -> v1::BudgetResponse {
    let scope = |s: &baton_budget::Scope| match s {
        baton_budget::Scope::Global => "global".to_string(),
        baton_budget::Scope::Endpoint(e) => format!("endpoint:{e}"),
    };
    v1::BudgetResponse {
        configured: true,
        time_zone: config.time_zone.clone(),
        ledger: ledger.to_string(),
        windows: s
            .windows
            .iter()
            .map(|w| v1::BudgetWindow {
                scope: scope(&w.scope),
                period: w.period.as_str().into(),
                start: w.start.to_string(),
                end: w.end.to_string(),
                cap_nanodollars: w.cap.nanos(),
                spent_nanodollars: w.spent.nanos(),
                reserved_nanodollars: w.reserved.nanos(),
                remaining_nanodollars: w.remaining.nanos(),
                overrun_nanodollars: w.overrun.nanos(),
                settled: w.settled,
                open: w.open,
            })
            .collect(),
        upstreams: s
            .endpoints
            .iter()
            .map(|e| v1::UpstreamSpend {
                endpoint: e.endpoint.clone(),
                spent_nanodollars: e.spent.nanos(),
                overrun_nanodollars: e.overrun.nanos(),
                settled: e.settled,
            })
            .collect(),
        open: s
            .open
            .iter()
            .map(|r| v1::OpenReservation {
                id: r.id.0,
                endpoint: r.endpoint.clone(),
                amount_nanodollars: r.amount.nanos(),
                request_id: r.request_id.clone(),
                created: r.created.to_string(),
                from_previous_run: r.from_previous_run,
            })
            .collect(),
        replica: None,
    }
}
