//! The OpenAI-compatible HTTP frontend (axum): `/v1/completions`, `/v1/chat/completions`
//! (streaming SSE ending in `data: [DONE]`, or one JSON body), `/v1/models`, and the operator
//! endpoints `/health`, `/ready`, `/metrics`.
//!
//! Bodies are parsed here rather than by axum's `Json` extractor so that every malformed body
//! gets the OpenAI error envelope with a message naming the field.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use baton_text::{ChatMessage, FinishReason, SampledToken, SamplingParams, chat::Role};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::error::{Error, ErrorClass, Result};
use crate::generate::{self, GenerateInput, GenerateStream, PromptInput, StreamEvent, Usage};
use crate::placement::PdMode;
use crate::server::Inner;

/// Serves the OpenAI frontend on `listener` until `shutdown` completes, then stops accepting
/// and waits for the open connections to finish what they are doing (a stream runs to its end).
///
/// Each connection gets `http_header_read_timeout` to send a request's headers: to start its
/// first request (whichever HTTP version) and, on HTTP/1.1, each next one after a response.
/// HTTP/2 connections are pinged when quiet and closed when the pings go unanswered. At most
/// `http_max_connections` are open; past that the loop stops accepting until one closes.
pub async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let header_read_timeout = inner.config.http_header_read_timeout;
    let max_connections = inner.config.http_max_connections;
    let counted = inner.clone();
    let app = router(inner);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper ignores `header_read_timeout` (what `axum::serve` did).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let builder = Arc::new(builder);

    // At the cap the loop stops accepting rather than accepting and closing: waiting
    // connections sit in the kernel's listen backlog (bounded by it; past it SYNs are dropped and
    // clients retry with back-off) and are served in turn as slots free, where a closed
    // connection would only send its client straight back to reconnect, each time costing an
    // accept and a close, with no request served.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    // Dropped when the loop ends: connections that have not begun a request close at once
    // instead of waiting out their header time-out (hyper's graceful shutdown waits for a
    // request head being read).
    let (stopping_tx, stopping) = tokio::sync::watch::channel(());
    let mut at_cap = CapWarning::default();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                counted.metrics.http_at_cap();
                at_cap.hit(max_connections);
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot
                        .map_err(|e| Error::Internal(format!("http connection slots: {e}")))?,
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: accepting again at once would spin.
                    tracing::error!(error = %e, "http accept failed; retrying in 1 s");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        // Each SSE chunk is a small write; without TCP_NODELAY Nagle's algorithm can hold it
        // until the client's delayed ACK (see `baton_proto::incoming`).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY on an HTTP connection");
        }
        let started = Arc::new(AtomicBool::new(false));
        let service =
            TowerToHyperService::new(app.clone().map_request(first_request(started.clone())));
        let watcher = graceful.watcher();
        let mut stopping = stopping.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let served = watcher.watch(builder.serve_connection(TokioIo::new(stream), service));
            // hyper's header time-out covers an HTTP/1 request once the connection knows it is
            // HTTP/1; this one also covers the bytes it reads to tell HTTP/1 from HTTP/2 (a
            // silent client, or one sending the HTTP/2 preface a byte at a time) and an HTTP/2
            // client that never sends a request.
            let deadline = async {
                tokio::select! {
                    () = tokio::time::sleep(header_read_timeout) => {}
                    _ = stopping.changed() => {}
                }
                if started.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                ended = served => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "http connection ended");
                    }
                }
                () = deadline => {
                    tracing::debug!(
                        %peer,
                        "http connection closed: no request within http_header_read_timeout, \
                         or before shutdown"
                    );
                }
            }
        });
    }
    drop(listener);
    drop(stopping_tx);
    graceful.shutdown().await;
    Ok(())
}

/// HTTP/2 connections quiet this long are pinged...
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and closed when the ping's acknowledgement takes longer than this.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Least time between two warnings that the HTTP frontend is at its connection cap.
const CAP_WARN_EVERY: Duration = Duration::from_secs(10);

/// A request mapping that notes that the connection has begun a request.
fn first_request<R>(started: Arc<AtomicBool>) -> impl FnMut(R) -> R + Clone {
    move |request| {
        started.store(true, Ordering::Relaxed);
        request
    }
}

/// Accept errors that concern one connection (it was gone before it was accepted), not the
/// listener; the loop goes on at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// The warning that the HTTP frontend is at its connection cap: at most one per
/// [`CAP_WARN_EVERY`], saying how often the cap was met since the last.
#[derive(Default)]
struct CapWarning {
    last: Option<std::time::Instant>,
    unreported: u64,
}

impl CapWarning {
    fn hit(&mut self, max_connections: usize) {
        self.unreported += 1;
        let now = std::time::Instant::now();
        if self.last.is_some_and(|last| now - last < CAP_WARN_EVERY) {
            return;
        }
        tracing::warn!(
            max_connections,
            times = self.unreported,
            "the HTTP frontend is at http_max_connections: new connections wait in the listen \
             backlog until one closes"
        );
        self.last = Some(now);
        self.unreported = 0;
    }
}

pub fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(inner)
}

/// HTTP status and OpenAI error type of an error class: the HTTP edge's half of the mapping
/// (`baton_proto::status` is the gRPC half).
fn http_status(class: ErrorClass) -> (u16, &'static str) {
    match class {
        ErrorClass::InvalidRequest => (400, "invalid_request_error"),
        ErrorClass::NotFound => (404, "not_found_error"),
        ErrorClass::Unauthenticated => (401, "authentication_error"),
        ErrorClass::Overloaded => (429, "rate_limit_exceeded"),
        ErrorClass::Unavailable => (503, "service_unavailable"),
        ErrorClass::Deadline => (504, "timeout"),
        ErrorClass::Cancelled => (499, "cancelled"),
        ErrorClass::BadModel | ErrorClass::Internal => (500, "internal_error"),
    }
}

/// The OpenAI error envelope for an error, with its status (and `Retry-After` on 429).
fn error_response(e: &Error) -> Response {
    let (status, kind) = http_status(e.class());
    let code = match e {
        Error::Unauthenticated { .. } => json!("invalid_api_key"),
        _ => Value::Null,
    };
    let body = json!({
        "error": {
            "message": e.to_string(),
            "type": kind,
            "param": e.param(),
            "code": code,
        }
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(after) = e.retry_after()
        && let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if e.class() == ErrorClass::Unauthenticated {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}

async fn ready(State(inner): State<Arc<Inner>>) -> Response {
    if inner.ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no healthy prefill and decode workers yet",
        )
            .into_response()
    }
}

async fn metrics(State(inner): State<Arc<Inner>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        inner.metrics.encode(),
    )
        .into_response()
}

/// The served model, then each model only cloud upstreams serve (`owned_by` names the first
/// upstream that serves it).
async fn models(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Err(e) = admit(&inner, &headers) {
        return refuse(&inner, e);
    }
    let mut data = vec![json!({
        "id": inner.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "baton",
        "max_model_len": inner.max_context(),
    })];
    let mut seen = std::collections::BTreeSet::from([inner.model_name.as_str()]);
    if let Some(cloud) = &inner.cloud {
        for (model, endpoint) in cloud.models() {
            if seen.insert(model) {
                data.push(json!({
                    "id": model,
                    "object": "model",
                    "created": 0,
                    "owned_by": format!("cloud:{endpoint}"),
                }));
            }
        }
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `stop` may be one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `prompt` may be a string, a list of one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields both endpoints share (OpenAI names, plus vLLM's extensions).
#[derive(Debug, Default, Deserialize)]
struct Sampling {
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopField>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: PromptField,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    logprobs: Option<u32>,
    echo: Option<bool>,
    /// baton extension: auto | force | off.
    pd_mode: Option<String>,
    /// baton extension: seconds the client will wait (or header `X-Request-Timeout`).
    timeout: Option<f64>,
    #[serde(flatten)]
    cloud: CloudFields,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ContentField {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessageField {
    role: String,
    content: Option<ContentField>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Vec<MessageField>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u32>,
    pd_mode: Option<String>,
    /// baton extension: seconds the client will wait (or header `X-Request-Timeout`).
    timeout: Option<f64>,
    #[serde(flatten)]
    cloud: CloudFields,
    #[serde(flatten)]
    sampling: Sampling,
}

/// baton extensions for cloud spill.
#[derive(Debug, Default, Deserialize)]
struct CloudFields {
    /// May the request spill to a cloud upstream (default: the coordinator's setting).
    allow_cloud: Option<bool>,
    /// Most it may cost there, in US dollars.
    max_cost_usd: Option<f64>,
    /// The time to first token the client wants, in seconds.
    ttft_target: Option<f64>,
}

impl CloudFields {
    fn ttft_target(&self) -> Result<Option<Duration>> {
        match self.ttft_target {
            None => Ok(None),
            Some(s) if s > 0.0 && s <= 86_400.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(_) => Err(invalid(
                "ttft_target",
                "must be more than 0 and at most 86400 seconds",
            )),
        }
    }
}

/// The client's time limit: the body's `timeout` field, else the `X-Request-Timeout` header,
/// in seconds.
fn timeout(body: Option<f64>, headers: &HeaderMap) -> Result<Option<Duration>> {
    let (field, seconds) = match body {
        Some(s) => ("timeout", s),
        None => match headers.get("x-request-timeout") {
            None => return Ok(None),
            Some(v) => (
                "X-Request-Timeout",
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .ok_or_else(|| invalid("X-Request-Timeout", "must be a number of seconds"))?,
            ),
        },
    };
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(invalid(
            field,
            "must be more than 0 and at most 86400 seconds",
        ));
    }
    Ok(Some(Duration::from_secs_f64(seconds)))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], known: Known) -> Result<T> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Error::InvalidRequest {
        field: "body",
        reason: format!("not a valid request: {e}"),
    })?;
    refuse_unknown(&value, known)?;
    serde_json::from_value(value).map_err(|e| Error::InvalidRequest {
        field: "body",
        reason: format!("not a valid request: {e}"),
    })
}

/// Which endpoint's fields a body may hold.
#[derive(Debug, Clone, Copy)]
enum Known {
    Completion,
    Chat,
}

/// Fields both endpoints read from the body's top level: sampling (OpenAI's, and vLLM's
/// extensions) and baton's own.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "n",
    "logprobs",
    "pd_mode",
    "timeout",
    "allow_cloud",
    "max_cost_usd",
    "ttft_target",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo"];
const CHAT_FIELDS: &[&str] = &["messages", "top_logprobs"];
const MESSAGE_FIELDS: &[&str] = &["role", "content"];
const CONTENT_PART_FIELDS: &[&str] = &["type", "text"];
const STREAM_OPTION_FIELDS: &[&str] = &["include_usage"];

/// Refuses, by its path (`tools`, `messages[0].tool_calls`), the first field of a body that no
/// part of baton implements: OpenAI's `tools`, `response_format`, `logit_bias`, `user`, ...
/// Accepting and ignoring them would let a client believe it got JSON mode or tool calls.
fn refuse_unknown(body: &Value, known: Known) -> Result<()> {
    let Some(fields) = body.as_object() else {
        return Ok(()); // not an object: the typed parse names the problem
    };
    let own = match known {
        Known::Completion => COMPLETION_FIELDS,
        Known::Chat => CHAT_FIELDS,
    };
    let unsupported = |field: String| Err(Error::UnsupportedField { field });
    for key in fields.keys() {
        if !COMMON_FIELDS.contains(&key.as_str()) && !own.contains(&key.as_str()) {
            return unsupported(key.clone());
        }
    }
    if let Some(options) = fields.get("stream_options").and_then(Value::as_object)
        && let Some(key) = options
            .keys()
            .find(|k| !STREAM_OPTION_FIELDS.contains(&k.as_str()))
    {
        return unsupported(format!("stream_options.{key}"));
    }
    let messages = fields.get("messages").and_then(Value::as_array);
    for (i, message) in messages.into_iter().flatten().enumerate() {
        let Some(message) = message.as_object() else {
            continue;
        };
        if let Some(key) = message
            .keys()
            .find(|k| !MESSAGE_FIELDS.contains(&k.as_str()))
        {
            return unsupported(format!("messages[{i}].{key}"));
        }
        let parts = message.get("content").and_then(Value::as_array);
        for (j, part) in parts.into_iter().flatten().enumerate() {
            if let Some(key) = part.as_object().and_then(|p| {
                p.keys()
                    .find(|k| !CONTENT_PART_FIELDS.contains(&k.as_str()))
            }) {
                return unsupported(format!("messages[{i}].content[{j}].{key}"));
            }
        }
    }
    Ok(())
}

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidRequest {
        field,
        reason: reason.into(),
    }
}

impl Sampling {
    fn params(&self, logprobs: Option<u32>) -> Result<SamplingParams> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n", "only 1 is supported"));
        }
        let d = SamplingParams::default();
        let top_k = match self.top_k {
            None | Some(0) | Some(-1) => None,
            Some(k) if k > 0 => {
                Some(u32::try_from(k).map_err(|_| invalid("top_k", "is too large"))?)
            }
            Some(_) => return Err(invalid("top_k", "must be -1, 0 or positive")),
        };
        Ok(SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: self.seed,
            max_new_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(d.max_new_tokens),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            stop_strings: match &self.stop {
                None => Vec::new(),
                Some(StopField::One(s)) => vec![s.clone()],
                Some(StopField::Many(v)) => v.clone(),
            },
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs,
        })
    }
}

fn pd_mode(value: Option<&str>) -> Result<PdMode> {
    match value {
        None | Some("auto") => Ok(PdMode::Auto),
        Some("force") => Ok(PdMode::Force),
        Some("off") => Ok(PdMode::Off),
        Some(other) => Err(invalid(
            "pd_mode",
            format!("{other:?} is not one of auto, force, off"),
        )),
    }
}

/// Which OpenAI object a stream produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    include_usage: bool,
    tokenizer: baton_text::Tokenizer,
}

/// A `/v1/completions` body and its headers as the request they ask for; the caller is the
/// handler's to set.
fn completion_request(
    body: &[u8],
    headers: &HeaderMap,
) -> Result<(CompletionRequest, GenerateInput)> {
    let req: CompletionRequest = parse(body, Known::Completion)?;
    if req.echo == Some(true) {
        return Err(invalid("echo", "is not supported"));
    }
    let input = match &req.prompt {
        PromptField::Text(t) => PromptInput::Text(t.clone()),
        PromptField::Texts(v) if v.len() == 1 => PromptInput::Text(v[0].clone()),
        PromptField::Texts(_) => {
            return Err(invalid(
                "prompt",
                "only one prompt per request is supported",
            ));
        }
        PromptField::Tokens(ids) => PromptInput::Tokens(ids.clone()),
    };
    let input = GenerateInput {
        request_id: None,
        model: req.model.clone(),
        input,
        params: req.sampling.params(req.logprobs)?,
        pd_mode: pd_mode(req.pd_mode.as_deref())?,
        skip_special_tokens: true,
        timeout: timeout(req.timeout, headers)?,
        caller: None,
        allow_cloud: req.cloud.allow_cloud,
        max_cost_usd: req.cloud.max_cost_usd,
        ttft_target: req.cloud.ttft_target()?,
    };
    Ok((req, input))
}

/// A `/v1/chat/completions` body and its headers as the request they ask for; the caller is
/// the handler's to set.
fn chat_request(body: &[u8], headers: &HeaderMap) -> Result<(ChatRequest, GenerateInput)> {
    let req: ChatRequest = parse(body, Known::Chat)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let role: Role = m.role.parse().map_err(Error::Text)?;
        let content = match &m.content {
            None => String::new(),
            Some(ContentField::Text(t)) => t.clone(),
            Some(ContentField::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(invalid(
                            "messages",
                            format!("content part type {:?} is not supported", p.kind),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or(""));
                }
                text
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    let logprobs = if req.logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else if req.top_logprobs.is_some() {
        return Err(invalid("top_logprobs", "requires logprobs: true"));
    } else {
        None
    };
    let input = GenerateInput {
        request_id: None,
        model: req.model.clone(),
        input: PromptInput::Chat(messages),
        params: req.sampling.params(logprobs)?,
        pd_mode: pd_mode(req.pd_mode.as_deref())?,
        skip_special_tokens: true,
        timeout: timeout(req.timeout, headers)?,
        caller: None,
        allow_cloud: req.cloud.allow_cloud,
        max_cost_usd: req.cloud.max_cost_usd,
        ttft_target: req.cloud.ttft_target()?,
    };
    Ok((req, input))
}

/// The two body decoders over raw bytes and an `X-Request-Timeout` value, public only for
/// the fuzz targets in `fuzz/` (as `baton_coordinator::fuzzing`); not part of the crate's API.
pub mod fuzzing {
    use axum::http::{HeaderMap, HeaderValue};

    use crate::error::Result;
    use crate::generate::GenerateInput;

    fn headers(request_timeout: Option<&[u8]>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = request_timeout.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.insert("x-request-timeout", value);
        }
        headers
    }

    /// A `/v1/completions` request.
    pub fn completion(body: &[u8], request_timeout: Option<&[u8]>) -> Result<GenerateInput> {
        super::completion_request(body, &headers(request_timeout)).map(|(_, input)| input)
    }

    /// A `/v1/chat/completions` request.
    pub fn chat(body: &[u8], request_timeout: Option<&[u8]>) -> Result<GenerateInput> {
        super::chat_request(body, &headers(request_timeout)).map(|(_, input)| input)
    }
}

async fn completions(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let caller = match admit(&inner, &headers) {
        Ok(c) => c,
        Err(e) => return refuse(&inner, e),
    };
    let (req, input) = match completion_request(&body, &headers) {
        Ok((req, input)) => (
            req,
            GenerateInput {
                caller: Some(caller),
                ..input
            },
        ),
        Err(e) => return refuse(&inner, e),
    };
    let reply = Reply {
        kind: Kind::Completion,
        id: format!("cmpl-{:016x}", rand::random::<u64>()),
        created: now(),
        model: reply_model(&inner, req.model.as_deref()),
        logprobs: req.logprobs.is_some(),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        tokenizer: inner.tokenizer.clone(),
    };
    respond(inner, input, req.stream, reply).await
}

async fn chat_completions(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match admit(&inner, &headers) {
        Ok(c) => c,
        Err(e) => return refuse(&inner, e),
    };
    let (req, input) = match chat_request(&body, &headers) {
        Ok((req, input)) => (
            req,
            GenerateInput {
                caller: Some(caller),
                ..input
            },
        ),
        Err(e) => return refuse(&inner, e),
    };
    let reply = Reply {
        kind: Kind::Chat,
        id: format!("chatcmpl-{:016x}", rand::random::<u64>()),
        created: now(),
        model: reply_model(&inner, req.model.as_deref()),
        logprobs: req.logprobs,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        tokenizer: inner.tokenizer.clone(),
    };
    respond(inner, input, req.stream, reply).await
}

/// The caller, from the `Authorization` header ([`crate::auth::Auth::admit`]).
fn admit(inner: &Inner, headers: &HeaderMap) -> Result<Arc<crate::auth::Caller>> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    inner
        .auth
        .admit(header, std::time::Instant::now())
        .map(Arc::new)
        .map_err(|(why, e)| {
            inner.metrics.auth_refused(why);
            e
        })
}

/// The model a reply names: the one asked for (a cloud-only model), else the served one.
fn reply_model(inner: &Inner, asked: Option<&str>) -> String {
    asked
        .filter(|m| !m.is_empty())
        .unwrap_or(&inner.model_name)
        .to_string()
}

fn refuse(inner: &Inner, e: Error) -> Response {
    inner.metrics.request_refused(e.class());
    error_response(&e)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn respond(inner: Arc<Inner>, input: GenerateInput, stream: bool, reply: Reply) -> Response {
    let generation = match generate::generate(inner.clone(), input).await {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    if stream {
        sse(generation, reply)
    } else {
        whole(generation, reply).await
    }
}

fn logprobs_json(
    kind: Kind,
    tokens: &[SampledToken],
    inner_tokenizer: &baton_text::Tokenizer,
) -> Value {
    let text = |id: u32| inner_tokenizer.decode(&[id], false).unwrap_or_default();
    match kind {
        Kind::Chat => json!({
            "content": tokens.iter().map(|t| json!({
                "token": text(t.id),
                "logprob": t.logprob,
                "bytes": text(t.id).into_bytes(),
                "top_logprobs": t.top_logprobs.iter().map(|(id, lp)| json!({
                    "token": text(*id),
                    "logprob": lp,
                    "bytes": text(*id).into_bytes(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()
        }),
        Kind::Completion => json!({
            "tokens": tokens.iter().map(|t| text(t.id)).collect::<Vec<_>>(),
            "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
            "top_logprobs": tokens.iter().map(|t| {
                t.top_logprobs.iter().map(|(id, lp)| (text(*id), json!(lp))).collect::<serde_json::Map<_, _>>()
            }).collect::<Vec<_>>(),
            "text_offset": Vec::<u32>::new(),
        }),
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_tokens },
    })
}

fn placement_json(p: &generate::Placement) -> Value {
    json!({
        "mode": p.mode.map(|m| m.as_str()),
        "prefill_worker": p.prefill_worker,
        "decode_worker": p.decode_worker,
        "kv_bytes": p.kv_bytes,
        "kv_bytes_received": p.kv_bytes_received,
        "kv_transfer_seconds": p.transfer_seconds,
        "kv_exposed_seconds": p.exposed_seconds,
        "transport": p.transport,
        "shape": p.shape,
        "routing": p.routing,
        "expected_cached_tokens": p.expected_cached_tokens,
        "expected_decode_cached_tokens": p.expected_decode_cached_tokens,
        "kv_cached_tokens": p.kv_cached_tokens,
        "kv_cached_bytes": p.kv_cached_bytes,
        "placement_reason": p.reason,
        "predicted_transfer_seconds": p.predicted_transfer_seconds,
        "predicted_prefill_seconds": p.predicted_prefill_seconds,
        "upstream": p.upstream,
        "cost_usd": p.cost_usd,
        "migrated_from": p.migrated_from,
    })
}

impl Reply {
    fn chunk(
        &self,
        text: &str,
        first: bool,
        logprobs: Option<Value>,
        finish: Option<FinishReason>,
    ) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({
                    "index": 0,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                })
            }
        };
        json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Completion => "text_completion",
                Kind::Chat => "chat.completion.chunk",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

/// Server-sent events; dropping the body (client gone) drops the generation and cancels it.
fn sse(generation: GenerateStream, reply: Reply) -> Response {
    struct St {
        generation: GenerateStream,
        reply: Reply,
        first: bool,
        done: bool,
        pending: std::collections::VecDeque<Event>,
    }
    let state = St {
        generation,
        reply,
        first: true,
        done: false,
        pending: std::collections::VecDeque::new(),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok::<Event, std::convert::Infallible>(ev), st));
            }
            if st.done {
                return None;
            }
            match st.generation.next().await {
                Some(Ok(StreamEvent::Delta { text, tokens })) => {
                    let logprobs = st
                        .reply
                        .logprobs
                        .then(|| logprobs_json(st.reply.kind, &tokens, &st.reply.tokenizer));
                    if text.is_empty() && !st.first && logprobs.is_none() {
                        continue;
                    }
                    let chunk = st.reply.chunk(&text, st.first, logprobs, None);
                    st.first = false;
                    st.pending
                        .push_back(Event::default().data(chunk.to_string()));
                }
                Some(Ok(StreamEvent::Finish {
                    reason,
                    usage,
                    placement,
                })) => {
                    let mut chunk = st.reply.chunk("", st.first, None, Some(reason));
                    chunk["baton"] = placement_json(&placement);
                    st.pending
                        .push_back(Event::default().data(chunk.to_string()));
                    if st.reply.include_usage {
                        let mut u = st.reply.chunk("", false, None, None);
                        u["choices"] = json!([]);
                        u["usage"] = usage_json(usage);
                        st.pending.push_back(Event::default().data(u.to_string()));
                    }
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Err(e)) => {
                    let (_, kind) = http_status(e.class());
                    let body = json!({"error": {"message": e.to_string(), "type": kind, "param": e.param(), "code": Value::Null}});
                    st.pending
                        .push_back(Event::default().data(body.to_string()));
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.done = true;
                }
                None => st.done = true,
            }
        }
    });
    Sse::new(stream).into_response()
}

/// One JSON body with the whole text.
async fn whole(mut generation: GenerateStream, reply: Reply) -> Response {
    let mut text = String::new();
    let mut tokens: Vec<SampledToken> = Vec::new();
    loop {
        match generation.next().await {
            Some(Ok(StreamEvent::Delta {
                text: t,
                tokens: ts,
            })) => {
                text.push_str(&t);
                tokens.extend(ts);
            }
            Some(Ok(StreamEvent::Finish {
                reason,
                usage,
                placement,
            })) => {
                let logprobs = reply
                    .logprobs
                    .then(|| logprobs_json(reply.kind, &tokens, &reply.tokenizer));
                let choice = match reply.kind {
                    Kind::Completion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": reason.as_str(),
                    }),
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs,
                        "finish_reason": reason.as_str(),
                    }),
                };
                return axum::Json(json!({
                    "id": reply.id,
                    "object": match reply.kind {
                        Kind::Completion => "text_completion",
                        Kind::Chat => "chat.completion",
                    },
                    "created": reply.created,
                    "model": reply.model,
                    "choices": [choice],
                    "usage": usage_json(usage),
                    "baton": placement_json(&placement),
                }))
                .into_response();
            }
            Some(Err(e)) => return error_response(&e),
            None => {
                return error_response(&Error::Internal(
                    "the generation ended without a finish".into(),
                ));
            }
        }
    }
}
