//! The cloud path: a request placement sent to an upstream (`placement::spill`) is reserved in
//! the budget ledger, sent to the OpenAI-compatible endpoint, streamed back as the same
//! [`StreamEvent`]s a local request yields, and settled from the usage the endpoint reports.
//!
//! placement --Target::Cloud--> reserve worst case (ledger, durable) --> Upstream::send
//!     --SSE deltas--> StreamEvents --usage--> settle (the rest of the reservation released)
//!
//! Invariants: nothing is sent before the coordinators' raft group applied its reservation
//! (`crate::budget`); a reservation is settled, cancelled or (dropped) charged in full exactly
//! once (`crate::budget::Hold` owns that); an upstream failure before any text reached the client tries the next upstream once,
//! after that the stream fails; dropping the returned stream aborts the upstream call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_budget::{Price, Refusal, Usd};
use baton_cloud::{Api, Upstream, UpstreamError, UpstreamEvent, UpstreamRequest, UpstreamStream};
use baton_text::{FinishReason, SamplingParams};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::budget::{Budget, Hold, ReserveError};
use crate::config::CloudConfig;
use crate::error::{Error, Result};
use crate::generate::{GenerateStream, Placement, PromptInput, StreamEvent, Usage};
use crate::placement::{Mode, SpillReason, Unfit};
use crate::server::Inner;

/// The configured upstreams, their prices and the budget they are charged to.
pub struct Cloud {
    endpoints: Vec<Endpoint>,
    budget: Arc<Budget>,
    pub config: CloudConfig,
}

struct Endpoint {
    upstream: Upstream,
    price: Price,
}

/// A byte-level BPE turns each byte into at most one token; a chat template adds its markers
/// (role names, separators, special tokens) per message, which this bounds generously
/// (ChatML uses five), plus a few for the assistant turn it opens.
const TEMPLATE_TOKENS_PER_MESSAGE: u64 = 16;
const TEMPLATE_TOKENS: u64 = 16;

impl Cloud {
    /// The upstreams of `config` charged to `budget` (the coordinators' shared ledger).
    pub fn open(config: &CloudConfig, budget: Arc<Budget>) -> Result<Self> {
        let mut endpoints = Vec::with_capacity(config.endpoints.len());
        for (i, e) in config.endpoints.iter().enumerate() {
            let price = Price::per_million(
                e.input_usd_per_mtok,
                e.cached_input_price(),
                e.output_usd_per_mtok,
            )
            .map_err(|p| Error::InvalidConfig {
                field: format!("cloud.endpoints[{i}].{}", price_key(p.field)),
                reason: p.to_string(),
            })?;
            let upstream = Upstream::new(e.clone()).map_err(|err| match err {
                baton_cloud::Error::InvalidConfig { field, reason } => Error::InvalidConfig {
                    field: format!("cloud.{field}"),
                    reason,
                },
                other => Error::Internal(other.to_string()),
            })?;
            endpoints.push(Endpoint { upstream, price });
        }
        Ok(Self {
            endpoints,
            budget,
            config: config.clone(),
        })
    }

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// (served model name, endpoint name) for every model an upstream serves.
    pub fn models(&self) -> impl Iterator<Item = (&str, &str)> {
        self.endpoints.iter().flat_map(|e| {
            e.upstream
                .config()
                .models
                .keys()
                .map(|m| (m.as_str(), e.upstream.name()))
        })
    }

    pub fn serves(&self, model: &str) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.upstream.remote_model(model).is_some())
    }

    /// For placement: whether each upstream could take `request` now (a free slot, a budget
    /// that covers its worst case, within its `max_cost_usd`).
    pub fn fitness(&self, request: &CloudRequest) -> Vec<Result<(), Unfit>> {
        self.endpoints
            .iter()
            .map(|e| self.fits(e, request).map(drop).map_err(|(u, _)| u))
            .collect()
    }

    /// The most telling refusal among the upstreams, for the client's error message.
    pub fn refusal(&self, request: &CloudRequest) -> Option<Refusal> {
        self.endpoints
            .iter()
            .find_map(|e| self.fits(e, request).err().and_then(|(_, r)| r))
    }

    fn fits(&self, e: &Endpoint, request: &CloudRequest) -> Result<Usd, (Unfit, Option<Refusal>)> {
        if e.upstream.remote_model(&request.model).is_none() {
            return Err((Unfit::NotServed, None));
        }
        let worst = request.worst_case(&e.price);
        if request.max_cost.is_some_and(|max| worst > max) {
            return Err((Unfit::OverMaxCost, None));
        }
        if e.upstream.in_flight() >= e.upstream.config().max_concurrent {
            return Err((Unfit::Busy, None));
        }
        self.budget
            .check(e.upstream.name(), worst)
            .map_err(|r| (Unfit::Budget, Some(r)))?;
        Ok(worst)
    }

    /// The worst-case cost of `request` on the cheapest upstream that serves it, for the
    /// `max_cost_usd` error message.
    pub fn cheapest_worst_case(&self, request: &CloudRequest) -> Option<Usd> {
        self.endpoints
            .iter()
            .filter(|e| e.upstream.remote_model(&request.model).is_some())
            .map(|e| request.worst_case(&e.price))
            .min()
    }
}

fn price_key(field: &str) -> &'static str {
    match field {
        "cached_input" => "cached_input_usd_per_mtok",
        "output" => "output_usd_per_mtok",
        _ => "input_usd_per_mtok",
    }
}

/// A request as an upstream gets it: text (upstreams have their own tokenizers), OpenAI
/// sampling fields, and the bound on what it may cost.
#[derive(Debug, Clone)]
pub struct CloudRequest {
    /// The served model name the client asked for.
    pub model: String,
    pub api: Api,
    /// `messages` or `prompt`, and the sampling fields.
    pub body: Map<String, Value>,
    /// An upper bound on the prompt's tokens in any byte-level tokenizer.
    pub prompt_bound: u64,
    pub max_tokens: u32,
    pub max_cost: Option<Usd>,
    pub request_id: String,
}

impl CloudRequest {
    /// The upstream form of a request, or the field no upstream takes (then it never spills).
    pub fn new(
        model: &str,
        input: &PromptInput,
        params: &SamplingParams,
        max_cost: Option<Usd>,
        request_id: &str,
    ) -> std::result::Result<Self, &'static str> {
        if let Some(field) = local_only_field(input, params) {
            return Err(field);
        }
        let mut body = Map::new();
        let (api, prompt_bound) = match input {
            PromptInput::Text(text) => {
                body.insert("prompt".into(), json!(text));
                (Api::Completions, text.len() as u64 + TEMPLATE_TOKENS)
            }
            PromptInput::Chat(messages) => {
                body.insert(
                    "messages".into(),
                    Value::Array(
                        messages
                            .iter()
                            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                            .collect(),
                    ),
                );
                let bytes: u64 = messages
                    .iter()
                    .map(|m| (m.role.as_str().len() + m.content.len()) as u64)
                    .sum();
                let markers = TEMPLATE_TOKENS_PER_MESSAGE * messages.len() as u64;
                (Api::Chat, bytes + markers + TEMPLATE_TOKENS)
            }
            PromptInput::Tokens(_) => return Err("prompt"),
        };
        body.insert("temperature".into(), json!(params.temperature));
        if params.top_p < 1.0 {
            body.insert("top_p".into(), json!(params.top_p));
        }
        if params.presence_penalty != 0.0 {
            body.insert("presence_penalty".into(), json!(params.presence_penalty));
        }
        if params.frequency_penalty != 0.0 {
            body.insert("frequency_penalty".into(), json!(params.frequency_penalty));
        }
        if let Some(seed) = params.seed {
            body.insert("seed".into(), json!(seed));
        }
        if !params.stop_strings.is_empty() {
            body.insert("stop".into(), json!(params.stop_strings));
        }
        Ok(Self {
            model: model.to_string(),
            api,
            body,
            prompt_bound,
            max_tokens: params.max_new_tokens,
            max_cost,
            request_id: request_id.to_string(),
        })
    }

    /// Every prompt token at the uncached input price, plus `max_tokens` at the output price.
    pub fn worst_case(&self, price: &Price) -> Usd {
        price.cost(self.prompt_bound, 0, u64::from(self.max_tokens))
    }
}

/// The first field of a request that an OpenAI-compatible upstream cannot be trusted to
/// honour (it is not in OpenAI's API): such a request runs locally or not at all, never
/// differently on a cloud.
pub fn local_only_field(input: &PromptInput, params: &SamplingParams) -> Option<&'static str> {
    let d = SamplingParams::default();
    if matches!(input, PromptInput::Tokens(_)) {
        Some("prompt")
    } else if params.logprobs.is_some() {
        Some("logprobs")
    } else if params.top_k.is_some_and(|k| k > 0) {
        Some("top_k")
    } else if params.min_p != d.min_p {
        Some("min_p")
    } else if params.repetition_penalty != d.repetition_penalty {
        Some("repetition_penalty")
    } else if !params.stop_token_ids.is_empty() {
        Some("stop_token_ids")
    } else if params.ignore_eos {
        Some("ignore_eos")
    } else {
        None
    }
}

/// How a cloud attempt ended before its stream was handed over.
pub enum Failed {
    /// No upstream could be tried (the placement's snapshot went stale): the reason.
    Unfit(Error),
    /// Every upstream tried failed before any text; retrying locally is safe.
    BeforeText(Error),
}

/// Sends `request` to the upstream at `first` (and, if that fails before any text, the next
/// one that fits), waits for its first event, and returns the stream of the rest.
pub async fn run(
    inner: Arc<Inner>,
    request: CloudRequest,
    first: usize,
    reason: SpillReason,
    deadline: Option<(tokio::time::Instant, Duration)>,
    caller: Option<Arc<crate::auth::Caller>>,
) -> std::result::Result<GenerateStream, Failed> {
    let Some(cloud) = inner.cloud.as_ref() else {
        return Err(Failed::Unfit(Error::Internal("no cloud endpoints".into())));
    };
    let started = Instant::now();
    let order = std::iter::once(first).chain((0..cloud.endpoints.len()).filter(|&i| i != first));
    let mut tries = 0;
    let mut last_error = None;
    for i in order {
        if tries == 2 {
            break;
        }
        let endpoint = &cloud.endpoints[i];
        let worst = match cloud.fits(endpoint, &request) {
            Ok(worst) => worst,
            // The budget went to other requests since placement looked: say so, not "busy".
            Err((_, Some(refusal))) => {
                last_error.get_or_insert(Error::BudgetSpent { refusal });
                continue;
            }
            Err(_) => continue,
        };
        let Some(permit) = endpoint.upstream.try_acquire() else {
            continue;
        };
        tries += 1;
        let name = endpoint.upstream.name().to_string();
        let reservation = match cloud
            .budget
            .reserve(&name, worst, &request.request_id)
            .await
        {
            Ok(r) => r,
            Err(ReserveError::Refused(refusal)) => {
                // Another request (here or on another coordinator) took the budget since
                // placement looked.
                last_error = Some(Error::BudgetSpent { refusal });
                continue;
            }
            Err(ReserveError::Undecided(e)) => {
                // Nothing goes out that the ledger has not recorded.
                return Err(Failed::Unfit(Error::BudgetUnavailable(e)));
            }
        };
        inner.metrics.cloud_attempt(&name);
        let remote = endpoint
            .upstream
            .remote_model(&request.model)
            .unwrap_or_default()
            .to_string();
        let sent = endpoint.upstream.send(
            permit,
            UpstreamRequest {
                api: request.api,
                body: request.body.clone(),
                remote_model: remote,
                max_tokens: request.max_tokens,
                request_id: request.request_id.clone(),
            },
        );
        let opened = match deadline {
            Some((at, timeout)) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r.map_err(Some),
                Err(_) => {
                    drop(reservation);
                    return Err(Failed::Unfit(Error::DeadlineExceeded { timeout }));
                }
            },
            None => sent.await.map_err(Some),
        };
        let first_event = match opened {
            Ok(mut stream) => {
                let next = stream.next();
                let event = match deadline {
                    Some((at, timeout)) => match tokio::time::timeout_at(at, next).await {
                        Ok(e) => e,
                        Err(_) => {
                            drop(reservation);
                            return Err(Failed::Unfit(Error::DeadlineExceeded { timeout }));
                        }
                    },
                    None => next.await,
                };
                match event {
                    Some(Ok(event)) => Ok((stream, event)),
                    Some(Err(e)) => Err(Some(e)),
                    None => Err(None),
                }
            }
            Err(e) => Err(e),
        };
        match first_event {
            Ok((stream, event)) => {
                inner.metrics.request_started();
                let (tx, rx) = mpsc::channel(32);
                let streaming = Streaming {
                    inner: inner.clone(),
                    upstream: stream,
                    reservation: Some(reservation),
                    price: endpoint.price.clone(),
                    placement: Placement {
                        mode: Some(Mode::Cloud),
                        upstream: Some(name.clone()),
                        reason: Some(reason.as_str()),
                        ..Placement::default()
                    },
                    started,
                    deadline,
                    tx,
                    _caller: caller,
                };
                tokio::spawn(
                    streaming
                        .run(event)
                        .instrument(tracing::info_span!("cloud_stream", upstream = %name)),
                );
                return Ok(GenerateStream::from_receiver(rx));
            }
            Err(e) => {
                let e = e.unwrap_or_else(|| UpstreamError {
                    endpoint: name.clone(),
                    kind: baton_cloud::UpstreamErrorKind::StreamCut {
                        after_content: false,
                    },
                    after_content: false,
                });
                inner.metrics.cloud_failed(&name, &e);
                settle_failed(reservation, &e).await;
                tracing::warn!(upstream = %name, error = %e, "cloud upstream failed before its first token");
                let retry = e.retryable();
                last_error = Some(Error::Upstream(e));
                if !retry {
                    break;
                }
            }
        }
    }
    match last_error {
        Some(e @ Error::Upstream(_)) => Err(Failed::BeforeText(e)),
        Some(e) => Err(Failed::Unfit(e)),
        None => Err(Failed::Unfit(Error::CloudBusy)),
    }
}

/// An upstream answered with an error before producing anything: nothing was billed when it
/// refused outright (a status, a refused connection); when it may have started computing (a
/// timeout, a cut stream), the reservation is charged in full.
async fn settle_failed(reservation: Hold, e: &UpstreamError) {
    use baton_cloud::UpstreamErrorKind as K;
    let refused = matches!(
        e.kind,
        K::Connect(_) | K::RateLimited { .. } | K::Status { .. }
    );
    if refused {
        if let Err(e) = reservation.cancel().await {
            tracing::error!(error = %e, "the budget ledger could not release a reservation");
        }
    } else if let Err(e) = reservation.charge_in_full().await {
        tracing::error!(error = %e, "the budget ledger could not charge a reservation; this coordinator's next start charges it");
    }
}

/// The streaming half of a cloud request.
struct Streaming {
    inner: Arc<Inner>,
    upstream: UpstreamStream,
    reservation: Option<Hold>,
    price: Price,
    placement: Placement,
    started: Instant,
    deadline: Option<(tokio::time::Instant, Duration)>,
    tx: mpsc::Sender<Result<StreamEvent>>,
    /// Held to the end: the caller's concurrency counts its streams.
    _caller: Option<Arc<crate::auth::Caller>>,
}

impl Streaming {
    async fn run(mut self, first: UpstreamEvent) {
        let name = self.placement.upstream.clone().unwrap_or_default();
        let mut finish: Option<FinishReason> = None;
        let mut usage: Option<baton_cloud::Usage> = None;
        let mut deltas = 0u32;
        let mut last_at: Option<Instant> = None;
        let mut event = Some(first);
        let deadline = self.deadline;
        let expired = crate::generate::expiry(deadline);
        tokio::pin!(expired);
        loop {
            let next = match event.take() {
                Some(e) => Some(Ok(e)),
                None => tokio::select! {
                    () = self.tx.closed() => {
                        // The client went away: dropping the upstream stream aborts the call;
                        // the reservation, never settled, is charged in full.
                        self.inner.metrics.cloud_finished(&name, "cancelled");
                        self.inner.metrics.request_cancelled();
                        return;
                    }
                    () = &mut expired => {
                        let timeout = deadline.map_or(Duration::ZERO, |(_, t)| t);
                        self.fail(&name, Error::DeadlineExceeded { timeout }).await;
                        return;
                    }
                    e = self.upstream.next() => e,
                },
            };
            match next {
                None => break,
                Some(Ok(UpstreamEvent::Usage(u))) => usage = Some(u),
                Some(Ok(UpstreamEvent::Delta {
                    text,
                    finish_reason,
                })) => {
                    if !text.is_empty() {
                        deltas += 1;
                        let now = Instant::now();
                        match last_at {
                            None => self.inner.metrics.first_token(now - self.started),
                            Some(prev) => self.inner.metrics.inter_token(now - prev),
                        }
                        last_at = Some(now);
                        let delta = StreamEvent::Delta {
                            text,
                            tokens: Vec::new(),
                        };
                        if self.tx.send(Ok(delta)).await.is_err() {
                            self.inner.metrics.cloud_finished(&name, "cancelled");
                            self.inner.metrics.request_cancelled();
                            return;
                        }
                    }
                    if let Some(reason) = finish_reason {
                        finish = Some(match reason.as_str() {
                            "length" => FinishReason::Length,
                            _ => FinishReason::Stop,
                        });
                    }
                }
                Some(Err(e)) => {
                    self.inner.metrics.cloud_failed(&name, &e);
                    self.fail(&name, Error::Upstream(e)).await;
                    return;
                }
            }
        }
        let Some(reason) = finish else {
            self.fail(
                &name,
                Error::Upstream(UpstreamError {
                    endpoint: name.clone(),
                    kind: baton_cloud::UpstreamErrorKind::StreamCut {
                        after_content: deltas > 0,
                    },
                    after_content: deltas > 0,
                }),
            )
            .await;
            return;
        };
        let reported = usage.unwrap_or_else(|| {
            tracing::warn!(upstream = %name, "the upstream reported no usage; the request is charged its full reservation");
            baton_cloud::Usage {
                prompt_tokens: 0,
                completion_tokens: u64::from(deltas),
                cached_tokens: 0,
            }
        });
        let cost = match (usage, self.reservation.take()) {
            (Some(u), Some(reservation)) => {
                let cached = u.cached_tokens.min(u.prompt_tokens);
                let actual = self
                    .price
                    .cost(u.prompt_tokens - cached, cached, u.completion_tokens);
                match reservation.settle(actual).await {
                    Ok(s) => {
                        if s.overrun > Usd::ZERO {
                            tracing::warn!(upstream = %name, overrun = %s.overrun, "the upstream reported more usage than the request reserved");
                        }
                        s.charged
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the budget ledger could not settle a reservation; it stays reserved until this coordinator's next start charges it in full");
                        actual
                    }
                }
            }
            (None, Some(reservation)) => {
                let amount = reservation.amount();
                if let Err(e) = reservation.charge_in_full().await {
                    tracing::error!(error = %e, "the budget ledger could not charge a reservation; this coordinator's next start charges it");
                }
                amount
            }
            (_, None) => Usd::ZERO,
        };
        self.placement.cost_usd = cost.dollars();
        let usage = Usage {
            prompt_tokens: u32::try_from(reported.prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: u32::try_from(reported.completion_tokens).unwrap_or(u32::MAX),
            cached_tokens: u32::try_from(reported.cached_tokens).unwrap_or(u32::MAX),
        };
        self.inner.metrics.cloud_finished(&name, reason.as_str());
        self.inner
            .metrics
            .request_finished(self.started.elapsed(), reason, Some(Mode::Cloud));
        let _ = self
            .tx
            .send(Ok(StreamEvent::Finish {
                reason,
                usage,
                placement: Box::new(self.placement),
            }))
            .await;
    }

    async fn fail(&mut self, name: &str, e: Error) {
        tracing::warn!(upstream = %name, error = %e, "cloud request failed mid-stream");
        if let Some(reservation) = self.reservation.take() {
            // Cut before its usage arrived: charged its full reservation, recorded before
            // the client hears of the failure.
            if let Err(e) = reservation.charge_in_full().await {
                tracing::error!(error = %e, "the budget ledger could not charge a reservation; this coordinator's next start charges it");
            }
        }
        self.inner.metrics.cloud_finished(name, e.class().as_str());
        self.inner.metrics.request_failed(e.class());
        let _ = self.tx.send(Err(e)).await;
    }
}
