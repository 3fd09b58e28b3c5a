//! One request's path through the cluster, shared by the gRPC and HTTP frontends.
//!
//! validate -> chat template -> tokenize -> admit (bounded) -> place
//!   disaggregated push: D.Reserve -> P.Prefill (KV pushed layer by layer) -> D.Decode
//!   disaggregated pull: P.Prefill (KV kept under lease) -> D.Decode (D reads, then releases)
//!   aggregated:         D.Decode(prompt)
//! -> incremental detokenization and stop strings -> StreamEvents
//!
//! Everything up to the first token happens before `generate` returns, so a failure there is an
//! error with a status, not a broken stream; a worker that fails it then is avoided and the
//! request placed again, once. Dropping the returned stream cancels the decode call, and the
//! decode worker frees the blocks.
//!
//! A decode worker that dies, leaves or fails mid-stream (`on_decode_failure = migrate`): the
//! stream is placed again on another decode worker with the tokens its client already has
//! (`DecodeRequest.generated_token_ids`). The prompt's KV comes again the usual way (the prefill
//! worker's prefix cache still holds it, so it moves rather than being recomputed), the new
//! decode worker replays the tokens as decode steps (the numbers the first one computed) and
//! streams from the next token; the client's stream never breaks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::RequestId;
use baton_proto::convert;
use baton_proto::v1::{self, DecodeRequest, DecodeResponse, PrefillRequest};
use baton_text::{
    ChatMessage, FinishReason, IncrementalDetokenizer, SampledToken, SamplingLimits,
    SamplingParams, StopChecker, finish_reason_after,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tonic::Streaming;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::config::{HandoffShape, OnDecodeFailure, TransportChoice};
use crate::error::{Error, ErrorClass, Result};
use crate::placement::{
    self, LinkCost, LocalState, Mode, NoTarget, PdMode, SpillReason, SpillRequest, Target, Unfit,
};
use crate::server::Inner;
use crate::workers::{Placed, PromptNames, Worker, WorkerId, WorkerRole};

/// What the client wants generated from.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Chat(Vec<ChatMessage>),
    Tokens(Vec<u32>),
}

/// A request as both frontends hand it over.
#[derive(Debug, Clone)]
pub struct GenerateInput {
    /// `None` or the served model's name.
    pub model: Option<String>,
    pub input: PromptInput,
    pub params: SamplingParams,
    pub pd_mode: PdMode,
    pub skip_special_tokens: bool,
    /// The client's time limit (gRPC `grpc-timeout`, HTTP `timeout`): placement, the workers'
    /// calls and the stream all end with DEADLINE_EXCEEDED / 504 when it passes, and the
    /// workers are told, so they stop too.
    pub timeout: Option<Duration>,
    /// The request's id, passed to every worker call and logged; one is made when unset.
    pub request_id: Option<RequestId>,
    /// Who sent it ([`crate::auth`]); held until the request ends, so a key's concurrency
    /// limit counts its streams.
    pub caller: Option<Arc<crate::auth::Caller>>,
    /// May the request spill to a cloud upstream; `None` takes `cloud.allow_by_default`.
    pub allow_cloud: Option<bool>,
    /// Most the request may cost on a cloud upstream, in US dollars.
    pub max_cost_usd: Option<f64>,
    /// The time to first token the client wants; a local cluster predicted to be slower sends
    /// the request to a cloud upstream when it may. `None` takes `cloud.ttft_target`.
    pub ttft_target: Option<Duration>,
}

/// Where a request ran and what its handoff moved.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub mode: Option<Mode>,
    pub prefill_worker: Option<String>,
    pub decode_worker: String,
    /// KV payload bytes the prefill worker sent.
    pub kv_bytes: u64,
    /// KV payload bytes the decode worker received and imported.
    pub kv_bytes_received: u64,
    pub transfer_seconds: f64,
    pub exposed_seconds: f64,
    /// "tcp" or "shm" when KV moved.
    pub transport: Option<&'static str>,
    /// "push" or "pull" when KV moved.
    pub shape: Option<&'static str>,
    /// Prompt tokens the computing worker's prefix cache supplied.
    pub cached_tokens: u32,
    /// How the workers were chosen ("kv" or "load").
    pub routing: Option<&'static str>,
    /// What placement expected, from the workers' KV events: prompt tokens cached on the
    /// chosen prefill worker (aggregated: on the decode worker) and on the chosen decode
    /// worker.
    pub expected_cached_tokens: u32,
    pub expected_decode_cached_tokens: u32,
    /// Prompt tokens (and their KV bytes) the decode worker's prefix cache held, so the
    /// handoff did not move them.
    pub kv_cached_tokens: u32,
    pub kv_cached_bytes: u64,
    /// Why it runs where it does ([`placement::Reason`]).
    pub reason: Option<&'static str>,
    /// What the decision weighed, when measured: seconds to move the KV the decode worker
    /// lacks over the pair's link, and seconds the decode worker would take to compute it.
    pub predicted_transfer_seconds: Option<f64>,
    pub predicted_prefill_seconds: Option<f64>,
    /// The cloud upstream that ran it (mode `cloud`).
    pub upstream: Option<String>,
    /// What it cost there, in US dollars, as settled in the budget ledger.
    pub cost_usd: f64,
    /// Decode workers the stream left mid-way (they failed), in order; `decode_worker` finished
    /// it.
    pub migrated_from: Vec<String>,
}

/// Token counts, OpenAI style.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Of the prompt's tokens, those a prefix cache supplied.
    pub cached_tokens: u32,
}

/// What a generation stream yields.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// New text (may be empty while a multi-byte character or a possible stop string is held
    /// back) and the tokens it came from.
    Delta {
        text: String,
        tokens: Vec<SampledToken>,
    },
    /// The last event.
    Finish {
        reason: FinishReason,
        usage: Usage,
        placement: Box<Placement>,
    },
}

/// A running generation. Dropping it cancels the request everywhere.
pub struct GenerateStream {
    rx: mpsc::Receiver<Result<StreamEvent>>,
}

impl GenerateStream {
    pub(crate) fn from_receiver(rx: mpsc::Receiver<Result<StreamEvent>>) -> Self {
        Self { rx }
    }

    /// The next event; `None` after the finish (or an error).
    pub async fn next(&mut self) -> Option<Result<StreamEvent>> {
        self.rx.recv().await
    }
}

/// The tokens a request's input stands for, after the chat template.
pub fn tokenize(inner: &Inner, input: &PromptInput) -> Result<Vec<u32>> {
    let tokens = match input {
        PromptInput::Text(text) => inner.tokenizer.encode(text, true)?,
        PromptInput::Chat(messages) => {
            if messages.is_empty() {
                return Err(Error::InvalidRequest {
                    field: "messages",
                    reason: "must hold at least one message".into(),
                });
            }
            let template = inner
                .tokenizer
                .chat_template()
                .ok_or(Error::InvalidRequest {
                    field: "messages",
                    reason: "the model has no chat template; send a prompt instead".into(),
                })?;
            let text = template.render(messages, true)?;
            // The template writes the special tokens itself.
            inner.tokenizer.encode(&text, false)?
        }
        PromptInput::Tokens(ids) => {
            let vocab = inner.tokenizer.vocab_size() as u32;
            if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                return Err(Error::InvalidRequest {
                    field: "prompt",
                    reason: format!("token id {bad} is outside the vocabulary of {vocab}"),
                });
            }
            ids.clone()
        }
    };
    if tokens.is_empty() {
        return Err(Error::InvalidRequest {
            field: "prompt",
            reason: "is empty".into(),
        });
    }
    Ok(tokens)
}

/// Validates, admits and places a request, runs it up to its first token, and returns the
/// stream of the rest.
///
/// The request is one trace: a `request` span with children for each stage (tokenize, admit,
/// place, reserve, prefill, decode, stream); calls to workers carry its context, so their spans
/// join it.
pub async fn generate(inner: Arc<Inner>, input: GenerateInput) -> Result<GenerateStream> {
    let span = tracing::info_span!(
        "request",
        request_id = Empty,
        prompt_tokens = Empty,
        mode = Empty,
        trace_id = Empty
    );
    if let Some(id) = span.in_scope(baton_telemetry::trace_id_of_current_span) {
        span.record("trace_id", id);
    }
    let deadline = input.timeout.map(|t| tokio::time::Instant::now() + t);
    crate::workers::DEADLINE
        .scope(deadline, generate_in_span(inner, input))
        .instrument(span)
        .await
}

async fn generate_in_span(inner: Arc<Inner>, mut input: GenerateInput) -> Result<GenerateStream> {
    let request = input
        .request_id
        .get_or_insert_with(|| RequestId::generate(rand::random()))
        .clone();
    tracing::Span::current().record("request_id", request.as_str());
    let routed = route(&inner, &input, &request);
    let routed = match routed {
        Ok(r) => r,
        Err(e) => {
            inner.metrics.request_refused(e.class());
            return Err(e);
        }
    };
    let Routed {
        local,
        spill,
        cloud_request,
        mut state,
    } = routed;
    let fitness = |inner: &Inner| match (&inner.cloud, &cloud_request) {
        (Some(cloud), Ok(r)) => cloud.fitness(r),
        _ => Vec::new(),
    };
    let decision = placement::spill::target(spill, state, || fitness(&inner));
    let (prompt, params, permit) = match (decision, local) {
        (Ok(Target::Local { kept }), Some((prompt, params, Some(permit)))) => {
            if let Some((reason, kept)) = kept {
                inner.metrics.spill_kept(reason, kept);
            }
            (prompt, params, permit)
        }
        (Ok(Target::Cloud { endpoint, reason }), local) => {
            let deadline = deadline_of(&input);
            let cloud_request =
                cloud_request.map_err(|_| Error::Internal("no cloud form".into()))?;
            inner.metrics.spilled(reason);
            let caller = input.caller.clone();
            return match crate::cloud::run(
                inner.clone(),
                cloud_request,
                endpoint,
                reason,
                deadline,
                caller,
            )
            .await
            {
                Ok(stream) => Ok(stream),
                // The upstreams failed before any text: a request the local cluster can still
                // run (it spilled only for its predicted wait) runs there, once.
                Err(crate::cloud::Failed::BeforeText(e)) => match local {
                    Some((prompt, params, Some(permit))) if reason == SpillReason::QueueWait => {
                        tracing::warn!(error = %e, "cloud upstreams failed before the first token; running locally");
                        run(inner, input, prompt, params, permit).await
                    }
                    _ => {
                        inner.metrics.request_refused(e.class());
                        Err(e)
                    }
                },
                Err(crate::cloud::Failed::Unfit(e)) => {
                    inner.metrics.request_refused(e.class());
                    Err(e)
                }
            };
        }
        (Ok(Target::Local { .. }), _) => {
            return Err(Error::Internal(
                "placement chose a local run it cannot start".into(),
            ));
        }
        (Err(none), _) => {
            let e = no_target(&inner, none, &spill, &cloud_request, &input);
            inner.metrics.request_refused(e.class());
            return Err(e);
        }
    };
    let failover = inner
        .cloud
        .as_ref()
        .is_some_and(|c| c.config.failover && spill.allowed && spill.local_only.is_none());
    let kept = failover.then(|| input.clone());
    match run(inner.clone(), input, prompt, params, permit).await {
        Ok(stream) => Ok(stream),
        Err(e) if failover && fails_over(&e) => {
            // The local attempt failed before its first token: the cloud may take it.
            state.failed = true;
            let Some(input) = kept else { return Err(e) };
            let Ok(Target::Cloud { endpoint, reason }) =
                placement::spill::target(spill, state, || fitness(&inner))
            else {
                return Err(e);
            };
            let Ok(cloud_request) = cloud_request else {
                return Err(e);
            };
            tracing::warn!(error = %e, "the local attempt failed before its first token; failing over to a cloud upstream");
            inner.metrics.spilled(reason);
            let deadline = deadline_of(&input);
            crate::cloud::run(
                inner,
                cloud_request,
                endpoint,
                reason,
                deadline,
                input.caller,
            )
            .await
            .map_err(|f| match f {
                crate::cloud::Failed::BeforeText(e) | crate::cloud::Failed::Unfit(e) => e,
            })
        }
        Err(e) => Err(e),
    }
}

/// Local failures a cloud upstream may still serve: a worker that failed or vanished, not a
/// bad request or the client's own deadline.
fn fails_over(e: &Error) -> bool {
    match e {
        Error::NoWorker { .. } | Error::KvFull { .. } => true,
        Error::PlacedAgainFailed { again, .. } => fails_over(again),
        Error::Worker { class, .. } => matches!(
            class,
            ErrorClass::Unavailable | ErrorClass::Overloaded | ErrorClass::Internal
        ),
        _ => false,
    }
}

/// Resolves when the client's deadline passes; never without one.
pub(crate) async fn expiry(deadline: Option<(tokio::time::Instant, Duration)>) {
    match deadline {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn deadline_of(input: &GenerateInput) -> Option<(tokio::time::Instant, Duration)> {
    let deadline = crate::workers::DEADLINE.try_with(|d| *d).ok().flatten();
    deadline.zip(input.timeout)
}

/// A request's options before the one placement decision: its local form (tokens, sampling
/// and an admission permit, when the local cluster serves the model), its cloud form (or the
/// field that keeps it local), and the local state the decision weighs.
struct Routed {
    local: Option<(Vec<u32>, SamplingParams, Option<OwnedSemaphorePermit>)>,
    spill: SpillRequest,
    cloud_request: std::result::Result<crate::cloud::CloudRequest, &'static str>,
    state: LocalState,
}

fn route(inner: &Arc<Inner>, input: &GenerateInput, request: &RequestId) -> Result<Routed> {
    let model = input
        .model
        .as_deref()
        .filter(|m| !m.is_empty())
        .unwrap_or(&inner.model_name);
    let serves_model = model == inner.model_name;
    let cloud = inner.cloud.as_ref();
    if !serves_model && !cloud.is_some_and(|c| c.serves(model)) {
        return Err(Error::UnknownModel(model.to_string()));
    }
    let max_cost = match input.max_cost_usd {
        None => None,
        Some(d) => Some(
            baton_budget::Usd::from_dollars(d).ok_or(Error::InvalidRequest {
                field: "max_cost_usd",
                reason: "must be a non-negative number of dollars".into(),
            })?,
        ),
    };
    if input.ttft_target.is_some_and(|t| t.is_zero()) {
        return Err(Error::InvalidRequest {
            field: "ttft_target",
            reason: "must be positive".into(),
        });
    }
    // The local form: tokens within the context. No local worker is a reason to spill, not
    // yet an error.
    let (local, worker_available, params) = if serves_model {
        match tracing::info_span!("tokenize").in_scope(|| check(inner, input)) {
            Ok((prompt, params)) => {
                tracing::Span::current().record("prompt_tokens", prompt.len());
                let permit = tracing::info_span!("admit")
                    .in_scope(|| inner.admission.clone().try_acquire_owned().ok());
                let available = inner.registry.decode().iter().any(|w| w.routable());
                (Some((prompt, params.clone(), permit)), available, params)
            }
            Err(Error::NoWorker { .. }) if cloud.is_some() => (None, false, cloud_params(input)?),
            Err(e) => return Err(e),
        }
    } else {
        (None, false, cloud_params(input)?)
    };
    let admission_full = local.as_ref().is_some_and(|(_, _, p)| p.is_none());
    if cloud.is_none() {
        if admission_full {
            return Err(Error::Overloaded {
                inflight: inner.config.max_inflight,
                retry_after: inner.config.retry_after,
            });
        }
        if !worker_available && serves_model && local.is_none() {
            return Err(Error::NoWorker { role: "decode" });
        }
    }
    // The upstream form is built only where an upstream could take it.
    let cloud_request = match cloud {
        Some(_) => crate::cloud::CloudRequest::new(
            model,
            &input.input,
            &params,
            max_cost,
            request.as_str(),
        ),
        None => Err("model"),
    };
    let config = cloud.map(|c| &c.config);
    let spill = SpillRequest {
        allowed: config.is_some_and(|c| input.allow_cloud.unwrap_or(c.allow_by_default)),
        local_only: cloud_request.as_ref().err().copied(),
        ttft_target: input.ttft_target.or(config.and_then(|c| c.ttft_target)),
    };
    // Only a request that may spill for its wait needs the prediction.
    let predicted_ttft = (spill.allowed && spill.ttft_target.is_some())
        .then(|| inner.queue_model().predict(Instant::now()))
        .flatten();
    Ok(Routed {
        state: LocalState {
            serves_model,
            worker_available: worker_available && local.is_some(),
            admission_full,
            failed: false,
            predicted_ttft,
        },
        local,
        spill,
        cloud_request,
    })
}

/// Sampling parameters of a request only an upstream can run: checked without a local
/// context length (the upstream enforces its own).
fn cloud_params(input: &GenerateInput) -> Result<SamplingParams> {
    let params = input.params.clone();
    params.validate(&SamplingLimits::with_room(1 << 20))?;
    if params.max_new_tokens == 0 {
        return Err(Error::InvalidRequest {
            field: "max_tokens",
            reason: "must be at least 1".into(),
        });
    }
    Ok(params)
}

/// The client's error when neither the local cluster nor an upstream can run the request.
fn no_target(
    inner: &Inner,
    none: NoTarget,
    spill: &SpillRequest,
    cloud_request: &std::result::Result<crate::cloud::CloudRequest, &'static str>,
    input: &GenerateInput,
) -> Error {
    let model = input.model.clone().unwrap_or_default();
    match (none.unfit, cloud_request) {
        (Some(Unfit::Budget), Ok(r)) => match inner.cloud.as_ref().and_then(|c| c.refusal(r)) {
            Some(refusal) => Error::BudgetSpent { refusal },
            None => Error::CloudBusy,
        },
        (Some(Unfit::Busy), _) => Error::CloudBusy,
        (Some(Unfit::OverMaxCost), Ok(r)) => Error::InvalidRequest {
            field: "max_cost_usd",
            reason: format!(
                "the request may cost up to {} on the cheapest cloud upstream, more than it allows",
                inner
                    .cloud
                    .as_ref()
                    .and_then(|c| c.cheapest_worst_case(r))
                    .unwrap_or_default()
            ),
        },
        _ => match none.reason {
            SpillReason::CloudOnlyModel => match spill.local_only {
                Some(field) => Error::InvalidRequest {
                    field,
                    reason: format!(
                        "cannot be sent to a cloud upstream, and only cloud upstreams serve {model:?}"
                    ),
                },
                None => Error::InvalidRequest {
                    field: "allow_cloud",
                    reason: format!(
                        "only cloud upstreams serve {model:?} and this request does not allow them"
                    ),
                },
            },
            SpillReason::LocalFull | SpillReason::QueueWait => Error::Overloaded {
                inflight: inner.config.max_inflight,
                retry_after: inner.config.retry_after,
            },
            SpillReason::NoLocalWorker | SpillReason::LocalFailed => {
                Error::NoWorker { role: "decode" }
            }
        },
    }
}

/// The request's tokens and validated sampling parameters, or the error naming the field.
fn check(inner: &Inner, input: &GenerateInput) -> Result<(Vec<u32>, SamplingParams)> {
    if let Some(model) = &input.model
        && !model.is_empty()
        && *model != inner.model_name
    {
        return Err(Error::UnknownModel(model.clone()));
    }
    let prompt = tokenize(inner, &input.input)?;
    let max_context = inner.max_context();
    if max_context == 0 {
        return Err(Error::NoWorker { role: "decode" });
    }
    if prompt.len() >= max_context {
        return Err(Error::InvalidRequest {
            field: "prompt",
            reason: format!(
                "{} tokens leave no room in the {max_context}-token context",
                prompt.len()
            ),
        });
    }
    let params = input.params.clone();
    params.validate(&SamplingLimits::with_room(max_context - prompt.len()))?;
    if params.max_new_tokens == 0 {
        return Err(Error::InvalidRequest {
            field: "max_tokens",
            reason: "must be at least 1".into(),
        });
    }
    Ok((prompt, params))
}

async fn run(
    inner: Arc<Inner>,
    input: GenerateInput,
    prompt: Vec<u32>,
    params: SamplingParams,
    permit: OwnedSemaphorePermit,
) -> Result<GenerateStream> {
    let started = Instant::now();
    inner.metrics.request_started();
    let waiting = Waiting::start(&inner, started);
    let deadline = crate::workers::DEADLINE.try_with(|d| *d).ok().flatten();
    let request = input
        .request_id
        .clone()
        .unwrap_or_else(|| RequestId::generate(rand::random()));
    let mut sampling = convert::sampling_to_proto(&params);
    // Every worker samples with a seed, one for the request's whole life: a decode worker that
    // recomputes a prompt after a failed handoff then samples the first token the prefill
    // worker sampled, and one that takes over a migrated stream draws what the first drew.
    sampling.seed.get_or_insert_with(rand::random::<u64>);
    let placing = Placing {
        request: request.clone(),
        prompt: prompt.clone(),
        params: params.clone(),
        sampling,
        pd_mode: input.pd_mode,
    };
    let starting = placing.start_replacing_once(&inner);
    let result = match (deadline, input.timeout) {
        (Some(deadline), Some(timeout)) => tokio::time::timeout_at(deadline, starting)
            .await
            .unwrap_or(Err(Error::DeadlineExceeded { timeout })),
        _ => starting.await,
    };
    let started_run = match result {
        Ok(s) => s,
        Err(e) => {
            inner.metrics.request_failed(e.class());
            return Err(e);
        }
    };
    let prompt_tokens = prompt.len() as u32;
    let (tx, rx) = mpsc::channel(32);
    let run = Run {
        inner: inner.clone(),
        detok: IncrementalDetokenizer::new(
            inner.tokenizer.clone(),
            &prompt[prompt.len().saturating_sub(8)..],
            input.skip_special_tokens,
        ),
        stops: StopChecker::new(&params.stop_strings),
        prompt_tokens,
        started,
        deadline: deadline.zip(input.timeout),
        tx,
        placing,
        generated: Vec::new(),
        waiting: Some(waiting),
        _caller: input.caller.clone(),
        _permit: permit,
    };
    tokio::spawn(
        run.stream(started_run)
            .instrument(tracing::info_span!("stream")),
    );
    Ok(GenerateStream { rx })
}

/// A request after its placement: the first token (when the prefill worker sampled it) and the
/// decode stream (absent when the first token already finished the request).
struct Started {
    /// The prefill worker's first token and its finish, decided once, where it arrived.
    first: Option<(SampledToken, Option<FinishReason>)>,
    decode: Option<DecodeStream>,
    placement: Placement,
    _placed: Vec<Placed>,
}

/// A decode worker's response stream, with the message read ahead while a push's `Prefill`
/// call was awaited (that wait also watches the stream, `disaggregated`).
struct DecodeStream {
    stream: Streaming<DecodeResponse>,
    ahead: Option<DecodeResponse>,
}

impl DecodeStream {
    fn new(stream: Streaming<DecodeResponse>) -> Self {
        Self {
            stream,
            ahead: None,
        }
    }

    /// The next message; cancel-safe, as `Streaming::message` is.
    async fn message(&mut self) -> std::result::Result<Option<DecodeResponse>, tonic::Status> {
        match self.ahead.take() {
            Some(m) => Ok(Some(m)),
            None => self.stream.message().await,
        }
    }
}

/// What placing a request (again) needs: it outlives the first placement, for migrations.
struct Placing {
    request: RequestId,
    prompt: Vec<u32>,
    params: SamplingParams,
    /// The proto form of `params`, its seed chosen.
    sampling: v1::SamplingParams,
    pd_mode: PdMode,
}

/// Where a placement starts from when it is not the request's first.
#[derive(Debug, Default)]
struct Resume<'a> {
    /// Tokens the client already has, the first one included.
    generated: &'a [u32],
    /// Workers that failed this request: not chosen again.
    avoid: &'a [WorkerId],
}

impl Placing {
    /// Places and starts the request; when a worker fails it before the first token (it died
    /// or vanished: UNAVAILABLE), places it once more without that worker.
    async fn start_replacing_once(&self, inner: &Arc<Inner>) -> Result<Started> {
        let mut culprit = None;
        let first = self.start(inner, &Resume::default(), &mut culprit).await;
        match (first, culprit) {
            (Err(e), Some(worker))
                if e.class() == ErrorClass::Unavailable && inner.config.max_migrations > 0 =>
            {
                tracing::warn!(%worker, error = %e, "a worker failed the request before its first token; placing it again without that worker");
                inner.metrics.replaced();
                let avoid = [worker];
                let resume = Resume {
                    generated: &[],
                    avoid: &avoid,
                };
                self.start(inner, &resume, &mut None)
                    .await
                    .map_err(|again| Error::PlacedAgainFailed {
                        failed: Box::new(e),
                        what: "placing the request again without that worker",
                        again: Box::new(again),
                    })
            }
            (result, _) => result,
        }
    }

    /// One placement: chooses the workers and starts the handoff. A worker whose call fails
    /// is named in `culprit`.
    async fn start(
        &self,
        inner: &Arc<Inner>,
        resume: &Resume<'_>,
        culprit: &mut Option<WorkerId>,
    ) -> Result<Started> {
        start(
            inner,
            &self.request,
            &self.prompt,
            &self.params,
            self.sampling.clone(),
            self.pd_mode,
            resume,
            culprit,
        )
        .await
    }
}

/// Marks the candidates of workers to avoid as unhealthy, so no choice falls on them.
fn avoid(workers: &[Arc<Worker>], candidates: &mut [placement::Candidate], ids: &[WorkerId]) {
    if ids.is_empty() {
        return;
    }
    for (w, c) in workers.iter().zip(candidates) {
        if ids.contains(&w.id()) {
            c.healthy = false;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start(
    inner: &Arc<Inner>,
    request: &RequestId,
    prompt: &[u32],
    params: &SamplingParams,
    sampling: v1::SamplingParams,
    pd_mode: PdMode,
    resume: &Resume<'_>,
    culprit: &mut Option<WorkerId>,
) -> Result<Started> {
    let registry = &inner.registry;
    let routing = inner.config.routing;
    let (mode, reason, link, prefill_choice, decode, decode_cached) = tracing::info_span!("place")
        .in_scope(|| {
            let mut names = PromptNames::default();
            let prompt_tokens = prompt.len() as u32;
            let (prefill_workers, mut prefills) = registry.prefill_candidates(prompt, &mut names);
            avoid(&prefill_workers, &mut prefills, resume.avoid);
            let prefill_idx = placement::choose_prefill(&prefills, prompt_tokens, routing);
            let needed = prompt.len().div_ceil(inner.block_size().max(1)) as u32 + 1;
            let (decode_workers, mut decodes) =
                registry.decode_candidates(needed, prompt, &mut names);
            avoid(&decode_workers, &mut decodes, resume.avoid);
            let decode_idx = placement::choose_decode(&decodes, routing).ok_or_else(|| {
                // Healthy workers whose load is known, without room: full, not gone.
                let full = decode_workers
                    .iter()
                    .zip(&decodes)
                    .any(|(w, c)| c.healthy && w.load().total_blocks > 0);
                if full {
                    Error::KvFull {
                        needed,
                        retry_after: inner.config.retry_after,
                    }
                } else {
                    Error::NoWorker { role: "decode" }
                }
            })?;
            let decode = decode_workers[decode_idx].clone();
            let decode_cached = decodes[decode_idx].cached_tokens;
            // What the decode worker lacks crosses the link, or it computes it itself.
            let lacking = prompt.len().saturating_sub(decode_cached as usize);
            let link = prefill_idx.map_or_else(LinkCost::default, |i| {
                registry.link_cost(&prefill_workers[i], &decode, lacking)
            });
            let (mode, reason) = placement::decide(
                pd_mode,
                prompt.len(),
                inner.config.min_disaggregated_tokens,
                prefill_idx.is_some(),
                link,
            )
            .map_err(|_| Error::NoWorker { role: "prefill" })?;
            tracing::debug!(
                mode = mode.as_str(),
                reason = reason.as_str(),
                predicted_transfer_s = ?link.transfer_s,
                predicted_prefill_s = ?link.prefill_s,
                lacking,
                "placed"
            );
            let prefill_choice =
                prefill_idx.map(|i| (prefill_workers[i].clone(), prefills[i].cached_tokens));
            Ok::<_, Error>((mode, reason, link, prefill_choice, decode, decode_cached))
        })?;
    tracing::Span::current().record("mode", mode.as_str());
    inner.metrics.decided(mode, reason);
    let expected = Placement {
        routing: Some(routing.as_str()),
        expected_decode_cached_tokens: decode_cached,
        reason: Some(reason.as_str()),
        predicted_transfer_seconds: link.transfer_s,
        predicted_prefill_seconds: link.prefill_s,
        ..Placement::default()
    };
    match (mode, prefill_choice) {
        (Mode::Disaggregated, Some((prefill, prefill_cached))) => {
            let expected = Placement {
                expected_cached_tokens: prefill_cached,
                ..expected
            };
            inner
                .metrics
                .placed(routing, Some(prefill_cached), decode_cached);
            disaggregated(
                inner, &prefill, &decode, request, prompt, params, sampling, expected, resume,
                culprit,
            )
            .await
        }
        _ => {
            inner.metrics.placed(routing, None, decode_cached);
            let placed = vec![decode.place(0)];
            let stream = call(
                &decode,
                tracing::info_span!("decode", worker = Empty),
                async {
                    decode
                        .decode_client()
                        .decode(DecodeRequest {
                            request_id: request.to_string(),
                            sampling: Some(sampling),
                            source: Some(v1::decode_request::Source::Prompt(v1::Prompt {
                                prompt_token_ids: prompt.to_vec(),
                            })),
                            generated_token_ids: resume.generated.to_vec(),
                        })
                        .await
                },
            )
            .await
            .inspect_err(|_| *culprit = Some(decode.id()))?;
            Ok(Started {
                first: None,
                decode: Some(DecodeStream::new(stream)),
                placement: Placement {
                    mode: Some(Mode::Aggregated),
                    decode_worker: decode.id().0,
                    expected_cached_tokens: decode_cached,
                    ..expected
                },
                _placed: placed,
            })
        }
    }
}

/// Awaits a worker call, classifying its failure and marking the worker unhealthy when it
/// looks gone.
async fn call<T>(
    worker: &Worker,
    stage: tracing::Span,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    stage.record("worker", worker.address.as_str());
    match f.instrument(stage).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => {
            let e = Error::from_status(&worker.address, &status);
            if e.class() == ErrorClass::Unavailable && status.code() == tonic::Code::Unavailable {
                worker.mark_unhealthy();
            }
            Err(e)
        }
    }
}

/// Awaits a call to `worker` unless the worker leaves the cluster first (it stopped answering
/// polls for `leave_after`: a hung or partitioned worker never answers, and its connection may
/// look open for minutes); then the call fails UNAVAILABLE, so the request is placed again.
async fn unless_lost<T>(
    worker: &Worker,
    call: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::select! {
        r = call => r,
        () = worker.lost() => Err(Error::Worker {
            worker: worker.id().0,
            class: ErrorClass::Unavailable,
            message: "the worker stopped answering (it left the cluster) before it answered".into(),
        }),
    }
}

/// The `Prefill` call of a disaggregated placement, failing UNAVAILABLE if the worker leaves the
/// cluster first ([`unless_lost`]). `prefilling` (the worker's count of the prompt's uncached
/// tokens) ends with the call; an answer feeds the worker's prefill-rate estimate.
async fn prefill_call(
    prefill: &Worker,
    prefilling: Placed,
    request: &RequestId,
    prompt: &[u32],
    sampling: &v1::SamplingParams,
    handoff: v1::prefill_request::Handoff,
) -> Result<v1::PrefillResponse> {
    let started = std::time::Instant::now();
    let answer = unless_lost(
        prefill,
        call(
            prefill,
            tracing::info_span!("prefill", worker = Empty),
            async {
                prefill
                    .prefill_client()
                    .prefill(PrefillRequest {
                        request_id: request.to_string(),
                        prompt_token_ids: prompt.to_vec(),
                        sampling: Some(sampling.clone()),
                        handoff: Some(handoff),
                    })
                    .await
            },
        ),
    )
    .await?;
    drop(prefilling);
    prefill.observe_prefill(
        prompt.len().saturating_sub(answer.cached_tokens as usize),
        started.elapsed(),
    );
    Ok(answer)
}

/// Awaits a push's `Prefill` call while watching the decode stream that holds the reservation:
/// when the decode worker gives up first (no KV arrived within the lease: a hung prefill worker
/// never answers the call), the call is dropped and fails UNAVAILABLE at once, blaming the
/// prefill worker, so the request is placed again instead of waiting for a worker that may
/// never answer. A stream that breaks for another reason fails the call as the decode
/// worker's error. A message the stream sends meanwhile is kept for the stream's reader.
async fn until_decode_gives_up<T>(
    call: impl std::future::Future<Output = Result<T>>,
    stream: &mut DecodeStream,
    prefill: &Worker,
    decode: &Worker,
    culprit: &mut Option<WorkerId>,
) -> Result<T> {
    tokio::pin!(call);
    loop {
        let message = tokio::select! {
            r = &mut call => return r,
            m = stream.stream.message(), if stream.ahead.is_none() => m,
        };
        let status = match message {
            Ok(Some(m)) => {
                stream.ahead = Some(m);
                continue;
            }
            Ok(None) => tonic::Status::unavailable("the decode stream ended"),
            Err(status) => status,
        };
        if baton_proto::status::kv_source_failed(&status) {
            *culprit = Some(prefill.id());
            return Err(Error::Worker {
                worker: prefill.id().0,
                class: ErrorClass::Unavailable,
                message: format!(
                    "the decode worker gave up waiting for this worker's KV before it answered: {}",
                    status.message()
                ),
            });
        }
        *culprit = Some(decode.id());
        return Err(Error::from_status(&decode.address, &status));
    }
}

/// Shared memory when asked for, or under `auto` when the prefill worker opened a shared-memory
/// link to this decode worker (both on one host); TCP otherwise.
fn transport_for(choice: TransportChoice, shm_linked: bool) -> v1::Transport {
    match choice {
        TransportChoice::Tcp => v1::Transport::Tcp,
        TransportChoice::Shm => v1::Transport::Shm,
        TransportChoice::Auto if shm_linked => v1::Transport::Shm,
        TransportChoice::Auto => v1::Transport::Tcp,
    }
}

#[allow(clippy::too_many_arguments)]
async fn disaggregated(
    inner: &Arc<Inner>,
    prefill: &Arc<Worker>,
    decode: &Arc<Worker>,
    request: &RequestId,
    prompt: &[u32],
    params: &SamplingParams,
    sampling: v1::SamplingParams,
    expected: Placement,
    resume: &Resume<'_>,
    culprit: &mut Option<WorkerId>,
) -> Result<Started> {
    // The prefill worker counts the prompt's uncached tokens until it answers; the decode
    // worker counts the request until it ends.
    let to_compute = prompt
        .len()
        .saturating_sub(expected.expected_cached_tokens as usize);
    let prefilling = prefill.place(to_compute as u64);
    let placed = vec![decode.place(0)];
    let handoff = inner.next_handoff();
    let ttl_ms = inner.config.lease_ttl.as_millis() as u32;
    let transport = transport_for(
        inner.config.transport,
        inner.registry.shm_linked(prefill, decode),
    );
    let eos = inner.tokenizer.eos_token_ids();
    let mut placement = Placement {
        mode: Some(Mode::Disaggregated),
        prefill_worker: Some(prefill.id().0),
        decode_worker: decode.id().0,
        transport: Some(match transport {
            v1::Transport::Shm => "shm",
            _ => "tcp",
        }),
        ..expected
    };
    match inner.config.handoff {
        HandoffShape::Push => {
            placement.shape = Some("push");
            // The decode stream owns the reservation: any way out of here (an error, a first
            // token that ends the request, the deadline) drops it, and the decode worker frees
            // the blocks. Its first message is the reserved blocks.
            let mut stream = call(
                decode,
                tracing::info_span!("decode", worker = Empty),
                async {
                    decode
                        .decode_client()
                        .decode(DecodeRequest {
                            request_id: request.to_string(),
                            sampling: Some(sampling.clone()),
                            source: Some(v1::decode_request::Source::Push(v1::PushSource {
                                handoff_id: handoff,
                                prompt_token_ids: prompt.to_vec(),
                                transport: transport as i32,
                                ttl_ms,
                            })),
                            generated_token_ids: resume.generated.to_vec(),
                        })
                        .await
                },
            )
            .await
            .inspect_err(|_| *culprit = Some(decode.id()))?;
            let reserved = stream
                .message()
                .instrument(tracing::info_span!("reserve"))
                .await;
            let reserved = match reserved {
                Ok(Some(DecodeResponse {
                    reserved: Some(blocks),
                    ..
                })) => crate::workers::reachable_blocks(blocks, &decode.address),
                Ok(_) => {
                    *culprit = Some(decode.id());
                    return Err(Error::Worker {
                        worker: decode.id().0,
                        class: ErrorClass::Unavailable,
                        message: "the decode stream did not start with its reserved blocks".into(),
                    });
                }
                Err(status) => {
                    *culprit = Some(decode.id());
                    return Err(Error::from_status(&decode.address, &status));
                }
            };
            let prefilled = prefill_call(
                prefill,
                prefilling,
                request,
                prompt,
                &sampling,
                v1::prefill_request::Handoff::Push(v1::PushTarget {
                    handoff_id: handoff,
                    destination: Some(reserved),
                    transport: transport as i32,
                    ttl_ms,
                }),
            );
            let mut stream = DecodeStream::new(stream);
            let prefilled = until_decode_gives_up(prefilled, &mut stream, prefill, decode, culprit)
                .await
                .inspect_err(|_| {
                    culprit.get_or_insert(prefill.id());
                })?;
            let first = first_token(&prefilled.first_token, resume)?;
            placement.cached_tokens = prefilled.cached_tokens;
            // The one place the first token's finish is decided; a finished request drops the
            // decode stream here, which frees the reservation.
            let first_finish = finish_reason_after(first.id, 1, params, eos);
            Ok(Started {
                decode: first_finish.is_none().then_some(stream),
                first: Some((first, first_finish)),
                placement,
                _placed: placed,
            })
        }
        HandoffShape::Pull => {
            placement.shape = Some("pull");
            // The pull source stays pinned on the prefill worker until the decode stream takes
            // it over; any other way out frees it.
            let source = Pinned::on(prefill, handoff);
            let prefilled = prefill_call(
                prefill,
                prefilling,
                request,
                prompt,
                &sampling,
                v1::prefill_request::Handoff::Pull(v1::PullLease {
                    handoff_id: handoff,
                    ttl_ms,
                }),
            )
            .await
            .inspect_err(|_| *culprit = Some(prefill.id()))?;
            let first = first_token(&prefilled.first_token, resume)?;
            placement.cached_tokens = prefilled.cached_tokens;
            // The one place the first token's finish is decided.
            let first_finish = finish_reason_after(first.id, 1, params, eos);
            if first_finish.is_some() {
                return Ok(Started {
                    first: Some((first, first_finish)),
                    decode: None,
                    placement,
                    _placed: placed,
                });
            }
            let stream = call(
                decode,
                tracing::info_span!("decode", worker = Empty),
                async {
                    decode
                        .decode_client()
                        .decode(DecodeRequest {
                            request_id: request.to_string(),
                            sampling: Some(sampling),
                            source: Some(v1::decode_request::Source::Pull(v1::PullSource {
                                handoff_id: handoff,
                                source: prefilled
                                    .source
                                    .map(|s| crate::workers::reachable_blocks(s, &prefill.address)),
                                prompt_token_ids: prompt.to_vec(),
                                transport: transport as i32,
                                ttl_ms,
                            })),
                            generated_token_ids: resume.generated.to_vec(),
                        })
                        .await
                },
            )
            .await
            .inspect_err(|_| *culprit = Some(decode.id()))?;
            source.taken_over();
            Ok(Started {
                first: Some((first, first_finish)),
                decode: Some(DecodeStream::new(stream)),
                placement,
                _placed: placed,
            })
        }
    }
}

/// The prefill worker's first token; for a migrated stream, it must be the one its client has
/// (the same seed on the same KV draws it again).
fn first_token(token: &Option<v1::SampledToken>, resume: &Resume<'_>) -> Result<SampledToken> {
    let token = token
        .as_ref()
        .map(convert::token_from_proto)
        .ok_or_else(|| Error::Internal("the prefill worker returned no first token".into()))?;
    match resume.generated.first() {
        Some(&had) if had != token.id => Err(Error::Internal(format!(
            "placed again, the prefill worker sampled first token {} where the stream has {had}",
            token.id
        ))),
        _ => Ok(token),
    }
}

/// A prefill worker's pull source while the coordinator sets the request up. Dropped before
/// [`Pinned::taken_over`], it frees the blocks at once rather than at the lease's expiry.
struct Pinned {
    worker: Arc<Worker>,
    handoff: u64,
    armed: bool,
}

impl Pinned {
    fn on(worker: &Arc<Worker>, handoff: u64) -> Self {
        Self {
            worker: worker.clone(),
            handoff,
            armed: true,
        }
    }

    /// The decode stream owns the blocks now.
    fn taken_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.armed {
            release(&self.worker, self.handoff);
        }
    }
}

/// Frees what a handoff pinned on `worker` in the background; its lease frees it anyway if
/// this call is lost.
fn release(worker: &Arc<Worker>, handoff: u64) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let worker = worker.clone();
    runtime.spawn(async move {
        let request = v1::ReleaseRequest {
            handoff_id: handoff,
        };
        let result = match worker.role {
            // A decode worker's reservation is its Decode stream's: dropping the stream frees it.
            WorkerRole::Decode => Ok(()),
            WorkerRole::Prefill => worker.prefill_client().release(request).await.map(drop),
        };
        if let Err(status) = result {
            tracing::debug!(worker = %worker.address, handoff, error = %status.message(), "release failed; the lease will expire");
        }
    });
}

/// The streaming half of a request.
struct Run {
    inner: Arc<Inner>,
    detok: IncrementalDetokenizer,
    stops: StopChecker,
    prompt_tokens: u32,
    started: Instant,
    /// When the client's time runs out, and the timeout it gave.
    deadline: Option<(tokio::time::Instant, Duration)>,
    tx: mpsc::Sender<Result<StreamEvent>>,
    /// How to place the request again when its decode worker fails.
    placing: Placing,
    /// Every token the client has been sent (or counted, for a stop token), in order: what a
    /// migrated stream replays.
    generated: Vec<u32>,
    /// Until the first token: counted as waiting in the queue model.
    waiting: Option<Waiting>,
    _caller: Option<Arc<crate::auth::Caller>>,
    _permit: OwnedSemaphorePermit,
}

/// How following one decode stream ended.
enum Followed {
    /// The request finished.
    Done(FinishReason),
    /// The client went away, or the request failed and the client was told.
    Over,
    /// The decode worker failed mid-stream (`cause` labels the metric): the request may go on
    /// on another one. Cause `kv_source`: the decode worker said its KV's source (the prefill
    /// worker) failed it, not itself.
    Broken { cause: &'static str, error: Error },
}

/// A local request between admission and its first token, as the queue model
/// ([`placement::QueueModel`]) counts it; dropped without a first token, it left the queue
/// unserved.
struct Waiting {
    inner: Arc<Inner>,
    admitted: Instant,
    ahead: u32,
    served: bool,
}

impl Waiting {
    fn start(inner: &Arc<Inner>, now: Instant) -> Self {
        let ahead = inner.queue_model().admitted();
        Self {
            inner: inner.clone(),
            admitted: now,
            ahead,
            served: false,
        }
    }

    fn served(mut self, now: Instant) {
        self.served = true;
        let ttft = now.saturating_duration_since(self.admitted);
        self.inner.queue_model().served(now, self.ahead, ttft);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.served {
            self.inner.queue_model().abandoned();
        }
    }
}

enum Step {
    Continue,
    Done(FinishReason),
}

impl Run {
    async fn stream(mut self, started: Started) {
        let Started {
            first,
            decode,
            mut placement,
            _placed: mut placed,
        } = started;
        let mut last_token_at: Option<Instant> = None;
        let mut outcome = None;
        let first_id = first.as_ref().map(|(t, _)| t.id);
        if let Some((first, finish)) = first {
            match self.token(first, finish, &mut last_token_at).await {
                Ok(Step::Done(reason)) => outcome = Some(reason),
                Ok(Step::Continue) => {}
                Err(()) => return,
            }
        }
        if outcome.is_none() {
            let Some(mut decode) = decode else {
                self.fail(Error::Internal("no decode stream".into())).await;
                return;
            };
            let mut avoided = Vec::new();
            loop {
                let followed = self
                    .follow(
                        &mut decode,
                        &mut placement,
                        &placed,
                        first_id,
                        &mut last_token_at,
                    )
                    .await;
                let (cause, error) = match followed {
                    Followed::Done(reason) => {
                        outcome = Some(reason);
                        break;
                    }
                    Followed::Over => return,
                    Followed::Broken { cause, error } => (cause, error),
                };
                if cause == "kv_source" {
                    // The decode worker is fine; the prefill worker that fed it is not.
                    if let Some(prefill) = &placement.prefill_worker {
                        avoided.push(WorkerId(prefill.clone()));
                    }
                } else if let Some(worker) = placed.first().map(|p| p.worker()) {
                    // The decode worker is the first placed.
                    if error.class() == ErrorClass::Unavailable {
                        worker.mark_unhealthy();
                    }
                    avoided.push(worker.id());
                }
                let Some(next) = self.migrate(cause, error, &avoided).await else {
                    return;
                };
                let Started {
                    decode: Some(next_decode),
                    placement: mut next_placement,
                    _placed: next_placed,
                    ..
                } = next
                else {
                    self.fail(Error::Internal(
                        "placed again, the request had no decode stream".into(),
                    ))
                    .await;
                    return;
                };
                // The client's usage counts the first placement's cache.
                next_placement.cached_tokens = placement.cached_tokens;
                next_placement.migrated_from = std::mem::take(&mut placement.migrated_from);
                next_placement
                    .migrated_from
                    .push(std::mem::take(&mut placement.decode_worker));
                placement = next_placement;
                decode = next_decode;
                placed = next_placed;
            }
        }
        let reason = outcome.unwrap_or(FinishReason::Length);
        let usage = Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated.len() as u32,
            cached_tokens: placement.cached_tokens,
        };
        self.inner
            .metrics
            .request_finished(self.started.elapsed(), reason, placement.mode);
        let _ = self
            .tx
            .send(Ok(StreamEvent::Finish {
                reason,
                usage,
                placement: Box::new(placement),
            }))
            .await;
    }

    /// Streams one decode worker's tokens to the client until the request finishes, the client
    /// goes away, or the worker fails.
    async fn follow(
        &mut self,
        decode: &mut DecodeStream,
        placement: &mut Placement,
        placed: &[Placed],
        first_id: Option<u32>,
        last_token_at: &mut Option<Instant>,
    ) -> Followed {
        // The decode worker is the first placed; if it leaves the cluster (or goes silent)
        // mid-stream, the stream does not wait on it.
        let lost = placed.first().map(|p| p.worker().lost());
        let lost = async move {
            match lost {
                Some(lost) => lost.await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lost);
        let deadline = self.deadline;
        let expired = expiry(deadline);
        tokio::pin!(expired);
        let worker = placement.decode_worker.clone();
        loop {
            let message = tokio::select! {
                () = self.tx.closed() => {
                    // The client went away: dropping `decode` cancels the call and the
                    // decode worker frees the blocks.
                    self.inner.metrics.request_cancelled();
                    return Followed::Over;
                }
                () = &mut expired => {
                    let timeout = deadline.map_or(Duration::ZERO, |(_, t)| t);
                    self.fail(Error::DeadlineExceeded { timeout }).await;
                    return Followed::Over;
                }
                () = &mut lost => {
                    return Followed::Broken {
                        cause: "worker_left",
                        error: Error::Worker {
                            worker,
                            class: ErrorClass::Unavailable,
                            message: "the decode worker left the cluster (or stopped answering) mid-stream".into(),
                        },
                    };
                }
                m = decode.message() => m,
            };
            let message = match message {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Followed::Broken {
                        cause: "stream_ended",
                        error: Error::Worker {
                            worker,
                            class: ErrorClass::Unavailable,
                            message: "the decode stream ended without a finish".into(),
                        },
                    };
                }
                Err(status) => {
                    let error = Error::from_status(&worker, &status);
                    if baton_proto::status::kv_source_failed(&status) {
                        return Followed::Broken {
                            cause: "kv_source",
                            error,
                        };
                    }
                    if matches!(
                        error.class(),
                        ErrorClass::Unavailable | ErrorClass::Internal
                    ) {
                        return Followed::Broken {
                            cause: "stream_broken",
                            error,
                        };
                    }
                    self.fail(error).await;
                    return Followed::Over;
                }
            };
            if let (Some(recomputed), Some(first)) = (&message.recomputed_first_token, first_id)
                && recomputed.token_id != first
            {
                // The client has the prefill worker's first token; a stream that goes on
                // from another one would not be one generation.
                self.fail(Error::Worker {
                    worker,
                    class: ErrorClass::Internal,
                    message: format!(
                        "the decode worker recomputed first token {} where the prefill worker sampled {first}",
                        recomputed.token_id
                    ),
                })
                .await;
                return Followed::Over;
            }
            if let Some(f) = &message.finish {
                self.record_finish(f, placement);
            }
            let finish = message
                .finish
                .as_ref()
                .map(|f| convert::finish_from_proto(f.reason));
            let n = message.tokens.len();
            for (i, t) in message.tokens.iter().enumerate() {
                let token_finish = if i + 1 == n { finish.flatten() } else { None };
                match self
                    .token(convert::token_from_proto(t), token_finish, last_token_at)
                    .await
                {
                    Ok(Step::Done(reason)) => return Followed::Done(reason),
                    Ok(Step::Continue) => {}
                    Err(()) => return Followed::Over,
                }
            }
            if finish.is_some() {
                // A finish the proto could not name (cancelled, error).
                self.fail(Error::Worker {
                    worker,
                    class: ErrorClass::Internal,
                    message: "the decode worker ended the stream with an error".into(),
                })
                .await;
                return Followed::Over;
            }
        }
    }

    /// What the decode worker's last message says about the handoff, into the placement.
    fn record_finish(&self, f: &v1::DecodeFinish, placement: &mut Placement) {
        if placement.prefill_worker.is_none() && placement.migrated_from.is_empty() {
            placement.cached_tokens = f.cached_tokens;
        }
        if let Some(kv) = &f.kv {
            placement.kv_bytes_received = kv.bytes;
            placement.kv_cached_tokens = kv.cached_tokens;
            placement.kv_cached_bytes = kv.cached_bytes;
            self.inner.metrics.kv_cached(kv.cached_bytes);
        }
        if let Some(source) = &f.source_kv {
            placement.kv_bytes = source.bytes;
            placement.transfer_seconds = source.transfer_seconds;
            placement.exposed_seconds = source.exposed_seconds;
            if let Some(prefill) = &placement.prefill_worker {
                let moved = f
                    .prompt_tokens
                    .saturating_sub(f.kv.as_ref().map_or(0, |k| k.cached_tokens));
                self.inner.registry.observe_transfer(
                    prefill,
                    &placement.decode_worker,
                    source.bytes,
                    moved,
                    source.transfer_seconds,
                    source.exposed_seconds,
                );
            }
            self.inner
                .metrics
                .kv_transferred(source.bytes, source.transfer_seconds);
        }
    }

    /// After the decode worker failed with `error`: places the request again, avoiding the
    /// decode workers that failed it, with the tokens the client has, or fails the stream
    /// (`on_decode_failure = fail`, `max_migrations` reached, or no placement). `None` when
    /// the stream is over.
    async fn migrate(
        &mut self,
        cause: &'static str,
        error: Error,
        avoided: &[WorkerId],
    ) -> Option<Started> {
        let inner = self.inner.clone();
        let config = &inner.config;
        if config.on_decode_failure == OnDecodeFailure::Fail {
            inner.metrics.migration(cause, "off");
            self.fail(error).await;
            return None;
        }
        let migrations = avoided.len() as u32;
        if migrations > config.max_migrations {
            inner.metrics.migration(cause, "over_limit");
            self.fail(error).await;
            return None;
        }
        tracing::warn!(
            error = %error,
            cause,
            generated = self.generated.len(),
            migration = migrations,
            "the decode worker failed mid-stream; continuing on another"
        );
        let resume = Resume {
            generated: &self.generated,
            avoid: avoided,
        };
        let at = self.deadline.map(|(at, _)| at);
        let mut culprit = None;
        let placing =
            crate::workers::DEADLINE.scope(at, self.placing.start(&inner, &resume, &mut culprit));
        let started = tokio::select! {
            r = placing => r,
            () = self.tx.closed() => {
                inner.metrics.request_cancelled();
                return None;
            }
            () = expiry(self.deadline) => Err(Error::DeadlineExceeded {
                timeout: self.deadline.map_or(Duration::ZERO, |(_, t)| t),
            }),
        };
        match started {
            Ok(started) => {
                inner.metrics.migration(cause, "resumed");
                tracing::info!(
                    decode_worker = started.placement.decode_worker,
                    "stream migrated"
                );
                Some(started)
            }
            Err(e) => {
                inner.metrics.migration(cause, "failed");
                self.fail(match e {
                    Error::DeadlineExceeded { .. } => e,
                    e => Error::PlacedAgainFailed {
                        failed: Box::new(error),
                        what: "continuing the stream on another decode worker",
                        again: Box::new(e),
                    },
                })
                .await;
                None
            }
        }
    }

    /// Streams one token's text. `Err` when the client is gone.
    async fn token(
        &mut self,
        token: SampledToken,
        finish: Option<FinishReason>,
        last: &mut Option<Instant>,
    ) -> Result<Step, ()> {
        let now = Instant::now();
        match last {
            None => {
                self.inner.metrics.first_token(now - self.started);
                if let Some(waiting) = self.waiting.take() {
                    waiting.served(now);
                }
            }
            Some(prev) => self.inner.metrics.inter_token(now - *prev),
        }
        *last = Some(now);
        self.generated.push(token.id);
        // A token that ends generation as a stop token is counted but its text is not sent.
        let mut text = String::new();
        if finish != Some(FinishReason::Stop) {
            match self.detok.push(token.id) {
                Ok(Some(delta)) => text = delta,
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "detokenizer failed on a token"),
            }
        }
        if finish.is_some()
            && let Ok(tail) = self.detok.finish()
        {
            text.push_str(&tail);
        }
        let outcome = self.stops.push(&text);
        let mut emit = outcome.emit;
        let stopped = outcome.stopped_by.is_some();
        if finish.is_some() && !stopped {
            emit.push_str(&self.stops.finish());
        }
        let event = StreamEvent::Delta {
            text: emit,
            tokens: vec![token],
        };
        if self.tx.send(Ok(event)).await.is_err() {
            self.inner.metrics.request_cancelled();
            return Err(());
        }
        if stopped {
            return Ok(Step::Done(FinishReason::Stop));
        }
        Ok(finish.map_or(Step::Continue, Step::Done))
    }

    async fn fail(&self, e: Error) {
        tracing::warn!(error = %e, "request failed mid-stream");
        self.inner.metrics.request_failed(e.class());
        let _ = self.tx.send(Err(e)).await;
    }
}
