//! One cloud endpoint, as the coordinator's client: its concurrency slots, the streamed
//! request, and the decoding of the reply into [`UpstreamEvent`]s.
//!
//! coordinator --[Upstream::try_acquire, Upstream::send]--> POST {base_url}/chat/completions
//!   --SSE--> [UpstreamStream::next] --Delta.., Usage--> coordinator
//!
//! Every request streams (`"stream": true`, `"stream_options": {"include_usage": true}`), so
//! tokens pass through as they come and the endpoint reports what it billed.
//!
//! Invariants:
//! - A request holds a [`Permit`] from before it is sent until its stream ends or is dropped;
//!   at most `max_concurrent` are in flight.
//! - Dropping an [`UpstreamStream`] drops the HTTP response, which aborts the request
//!   (HTTP/1: the connection closes; HTTP/2: the stream is reset), so a client's cancel
//!   reaches the endpoint and stops its billing.
//! - No message holds the API key: what the endpoint sends back is scrubbed of it first.

use std::collections::VecDeque;
use std::sync::{Arc, Once};
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};

use crate::config::{AuthHeader, EndpointConfig, parse_base_url};
use crate::error::{Error, Result, UpstreamError, UpstreamErrorKind};
use crate::key::{ApiKey, Secret};
use crate::sse::SseDecoder;

/// How much of an error body is read for its message.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
/// How much of an endpoint's error message is kept.
const MAX_MESSAGE_CHARS: usize = 1000;
/// How much of a body left after `[DONE]` is read so an HTTP/1 connection can be reused.
const MAX_DRAIN_BYTES: usize = 64 * 1024;

/// Which OpenAI API a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST {base_url}/chat/completions`; text arrives in `choices[0].delta.content`.
    Chat,
    /// `POST {base_url}/completions`; text arrives in `choices[0].text`.
    Completions,
}

impl Api {
    /// The path after the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Completions => "/completions",
        }
    }
}

/// One request for an endpoint, as the coordinator built it.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Which API.
    pub api: Api,
    /// The OpenAI body (messages or prompt, sampling fields). `model`, `stream`,
    /// `stream_options.include_usage` and `max_tokens` are set here, over whatever it holds.
    pub body: Map<String, Value>,
    /// The endpoint's name for the model ([`Upstream::remote_model`]).
    pub remote_model: String,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Sent as `X-Request-Id`, so the endpoint's logs can be matched with ours.
    pub request_id: String,
}

/// What a stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEvent {
    /// `choices[0].delta.content` (chat) or `choices[0].text` (completions); empty when only
    /// the finish reason arrived.
    Delta {
        text: String,
        finish_reason: Option<String>,
    },
    /// What the endpoint reported it billed; yielded once, after the last delta, when the
    /// endpoint reported usage at all. Where an endpoint reports running totals, the last wins.
    Usage(Usage),
}

/// Token counts the endpoint reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `usage.prompt_tokens`: prompt tokens, cached ones included.
    pub prompt_tokens: u64,
    /// `usage.completion_tokens`.
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`: prompt tokens served from the endpoint's
    /// prompt cache; 0 when absent.
    pub cached_tokens: u64,
}

/// One of an endpoint's `max_concurrent` slots; freed when dropped.
#[derive(Debug)]
pub struct Permit {
    _slot: OwnedSemaphorePermit,
}

/// One cloud endpoint: its config, key, HTTP client and slots. Cheap to clone; clones share
/// the slots and the connection pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: EndpointConfig,
    /// The base URL without a trailing slash.
    base: String,
    key: ApiKey,
    client: reqwest::Client,
    slots: Arc<Semaphore>,
    max_concurrent: usize,
}

/// reqwest is built without a crypto provider (so the workspace carries one, ring); rustls
/// needs one installed before the first client. Another crate may have installed its own
/// first, which is as good.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // ring is the workspace's provider (aws-lc-rs needs a C toolchain with cmake to
        // build); rustls deprecates it only for its lack of post-quantum key exchange.
        #[allow(deprecated)]
        let _already_installed = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Upstream {
    /// Builds the endpoint's HTTP client (rustls, the platform's roots, `connect_timeout`, no
    /// redirects: a POST that redirects is a misconfigured base URL) and reads its key. Checks
    /// only what it needs; [`EndpointConfig::validate`] checks the rest.
    pub fn new(config: EndpointConfig) -> Result<Upstream> {
        install_crypto_provider();
        let base = parse_base_url(&config.base_url)
            .map_err(|reason| Error::InvalidConfig {
                field: format!("cloud.endpoints[{}].base_url", config.name),
                reason,
            })?
            .as_str()
            .trim_end_matches('/')
            .to_string();
        let key = ApiKey::new(&config)?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("baton/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Client(error_chain(&e)))?;
        // Semaphore::new panics above MAX_PERMITS; no endpoint takes that many anyway.
        let max_concurrent = config.max_concurrent.min(Semaphore::MAX_PERMITS);
        Ok(Upstream {
            inner: Arc::new(Inner {
                base,
                key,
                client,
                slots: Arc::new(Semaphore::new(max_concurrent)),
                max_concurrent,
                config,
            }),
        })
    }

    /// The endpoint's configured name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// The endpoint's config.
    pub fn config(&self) -> &EndpointConfig {
        &self.inner.config
    }

    /// The endpoint's name for served model `model`, or `None` when it does not serve it.
    pub fn remote_model(&self, model: &str) -> Option<&str> {
        self.inner.config.models.get(model).map(String::as_str)
    }

    /// Requests in flight now (permits held).
    pub fn in_flight(&self) -> usize {
        self.inner.max_concurrent - self.inner.slots.available_permits()
    }

    /// A concurrency slot, or `None` when `max_concurrent` requests are in flight.
    pub fn try_acquire(&self) -> Option<Permit> {
        Arc::clone(&self.inner.slots)
            .try_acquire_owned()
            .ok()
            .map(|slot| Permit { _slot: slot })
    }

    /// Sends the request and waits for the response headers, at most `connect_timeout +
    /// first_token_timeout`. A non-2xx status is an error: 429 [`UpstreamErrorKind::RateLimited`]
    /// with its retry delay, others [`UpstreamErrorKind::Status`] with the endpoint's message
    /// (from at most 64 KiB of body, scrubbed of the key). The stream keeps `permit`.
    pub async fn send(
        &self,
        permit: Permit,
        request: UpstreamRequest,
    ) -> std::result::Result<UpstreamStream, UpstreamError> {
        let inner = &*self.inner;
        let config = &inner.config;
        let fail = |kind| UpstreamError::new(&config.name, kind, false);
        let key = inner.key.current().map_err(|e| {
            let reason = match e {
                Error::Key { reason, .. } => reason,
                other => other.to_string(),
            };
            fail(UpstreamErrorKind::Connect(format!("api key: {reason}")))
        })?;

        let body = Value::Object(request_body(
            request.body,
            &request.remote_model,
            request.max_tokens,
        ));
        let mut builder = inner
            .client
            .post(format!("{}{}", inner.base, request.api.path()))
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body.to_string());
        match HeaderValue::from_str(&request.request_id) {
            Ok(id) => builder = builder.header("x-request-id", id),
            Err(_) => tracing::warn!(
                endpoint = %config.name,
                request_id = ?request.request_id,
                "request id cannot be a header value; sent without x-request-id"
            ),
        }
        if let Some(key) = &key {
            let (name, value) = auth_header(config.auth_header, key).ok_or_else(|| {
                fail(UpstreamErrorKind::Connect(
                    "api key: holds characters an http header cannot carry".into(),
                ))
            })?;
            builder = builder.header(name, value);
        }

        let first_token_deadline =
            Instant::now() + config.connect_timeout + config.first_token_timeout;
        let response = match timeout_at(first_token_deadline, builder.send()).await {
            Err(_elapsed) => {
                return Err(fail(UpstreamErrorKind::Timeout {
                    phase: "first token",
                }));
            }
            Ok(Err(e)) if e.is_connect() && e.is_timeout() => {
                return Err(fail(UpstreamErrorKind::Timeout { phase: "connect" }));
            }
            Ok(Err(e)) => {
                let reason = scrub(&error_chain(&e), key.as_ref());
                return Err(fail(UpstreamErrorKind::Connect(reason)));
            }
            Ok(Ok(response)) => response,
        };

        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = retry_after(response.headers());
            tracing::debug!(endpoint = %config.name, request_id = %request.request_id, ?retry_after, "cloud endpoint rate limited the request");
            return Err(fail(UpstreamErrorKind::RateLimited { retry_after }));
        }
        if !status.is_success() {
            let message = error_message(response, first_token_deadline, key.as_ref()).await;
            tracing::debug!(endpoint = %config.name, request_id = %request.request_id, status = status.as_u16(), %message, "cloud endpoint refused the request");
            return Err(fail(UpstreamErrorKind::Status {
                code: status.as_u16(),
                message,
            }));
        }
        let json_reply = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if json_reply {
            return Err(fail(UpstreamErrorKind::Protocol(
                "the endpoint answered with one json body, not an event stream".into(),
            )));
        }

        Ok(UpstreamStream {
            endpoint: config.name.clone(),
            api: request.api,
            response: Some(response),
            permit: Some(permit),
            decoder: SseDecoder::new(),
            pending: VecDeque::new(),
            key,
            first_token_deadline,
            idle_timeout: config.idle_timeout,
            started: false,
            finished: false,
            usage: None,
        })
    }
}

/// The coordinator's body with this crate's fields set over it.
fn request_body(
    mut body: Map<String, Value>,
    remote_model: &str,
    max_tokens: u32,
) -> Map<String, Value> {
    body.insert("model".into(), remote_model.into());
    body.insert("stream".into(), true.into());
    body.insert("max_tokens".into(), max_tokens.into());
    // Keep any other stream option the coordinator chose.
    let options = body
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    if let Value::Object(options) = options {
        options.insert("include_usage".into(), true.into());
    }
    body
}

/// The auth header carrying `key`, marked sensitive so hyper never logs it; `None` when the
/// key cannot be a header value (keys are checked when read, so only a bug gets here).
fn auth_header(style: AuthHeader, key: &Secret) -> Option<(HeaderName, HeaderValue)> {
    let (name, value) = match style {
        AuthHeader::Bearer => (
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {}", key.expose())),
        ),
        AuthHeader::ApiKey => (
            HeaderName::from_static("api-key"),
            HeaderValue::from_str(key.expose()),
        ),
    };
    let mut value = value.ok()?;
    value.set_sensitive(true);
    Some((name, value))
}

/// `retry-after-ms` (Azure, OpenAI) or `Retry-After` in seconds; an HTTP date is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |name: &str, scale: f64| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|v| Duration::try_from_secs_f64(v / scale).ok())
    };
    seconds("retry-after-ms", 1000.0).or_else(|| seconds("retry-after", 1.0))
}

/// The endpoint's error message from at most 64 KiB of body read before `deadline`: the
/// OpenAI envelope's `error.message` when there is one, else the text.
async fn error_message(
    mut response: reqwest::Response,
    deadline: Instant,
    key: Option<&Secret>,
) -> String {
    let mut body = Vec::new();
    let read = async {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ERROR_BODY_BYTES - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if chunk.len() >= room {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    let complete = timeout_at(deadline, read).await.unwrap_or(false);
    if !complete && let Some(key) = key {
        // A body cut short may end inside the key, where scrubbing cannot see it.
        body.truncate(body.len().saturating_sub(key.expose().len()));
    }
    let text = String::from_utf8_lossy(&body);
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| json_error_message(&v))
        .unwrap_or_else(|| text.trim().to_string());
    truncate_chars(&scrub(&message, key), MAX_MESSAGE_CHARS)
}

/// `error.message`, `error` (a string), `message` or `detail` of an error object.
fn json_error_message(v: &Value) -> Option<String> {
    let error = v.get("error");
    [
        error.and_then(|e| e.get("message")),
        error,
        v.get("message"),
        v.get("detail"),
    ]
    .into_iter()
    .flatten()
    .find_map(|m| m.as_str().map(str::to_string))
}

/// `text` with every occurrence of the key replaced by `[redacted]`.
pub(crate) fn scrub(text: &str, key: Option<&Secret>) -> String {
    match key {
        Some(key) if !key.expose().is_empty() => text.replace(key.expose(), "[redacted]"),
        _ => text.to_string(),
    }
}

fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// An error and its sources, one line: reqwest's own message names only the URL.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The reply of one request, decoded into events as its chunks arrive. Owns the request's
/// permit and its HTTP response: dropping it aborts the request and frees the permit.
pub struct UpstreamStream {
    endpoint: String,
    api: Api,
    /// `None` once the stream ended (done, cut or failed).
    response: Option<reqwest::Response>,
    /// Released with the response, when the stream ends.
    permit: Option<Permit>,
    decoder: SseDecoder,
    /// Decoded and not yet returned, in order; a terminal error comes last.
    pending: VecDeque<std::result::Result<UpstreamEvent, UpstreamError>>,
    /// For scrubbing what the endpoint sends back.
    key: Option<Secret>,
    first_token_deadline: Instant,
    idle_timeout: Duration,
    /// A non-empty content delta was decoded.
    started: bool,
    /// A finish reason was decoded.
    finished: bool,
    /// The last usage report, yielded when the stream ends.
    usage: Option<Usage>,
}

impl std::fmt::Debug for UpstreamStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamStream")
            .field("endpoint", &self.endpoint)
            .field("api", &self.api)
            .field("open", &self.response.is_some())
            .field("started", &self.started)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl UpstreamStream {
    /// The next event; `None` after `[DONE]`, or after a clean end of the body once a finish
    /// reason or usage arrived. Until the first content or finish, waits at most until
    /// `connect_timeout + first_token_timeout` after sending; after it, at most
    /// `idle_timeout` per chunk. An error ends the stream.
    pub async fn next(&mut self) -> Option<std::result::Result<UpstreamEvent, UpstreamError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            let response = self.response.as_mut()?;
            let (deadline, phase) = if self.started || self.finished {
                (Instant::now() + self.idle_timeout, "idle")
            } else {
                (self.first_token_deadline, "first token")
            };
            match timeout_at(deadline, response.chunk()).await {
                Err(_elapsed) => self.fail(UpstreamErrorKind::Timeout { phase }),
                Ok(Ok(Some(bytes))) => match self.decoder.push(&bytes) {
                    Ok(events) => {
                        for data in events {
                            if !self.take_event(&data) {
                                break;
                            }
                        }
                    }
                    Err(e) => self.fail(UpstreamErrorKind::Protocol(e.to_string())),
                },
                Ok(Ok(None)) => self.end_of_body(),
                Ok(Err(e)) => {
                    tracing::debug!(
                        endpoint = %self.endpoint,
                        error = %scrub(&error_chain(&e), self.key.as_ref()),
                        "cloud endpoint's body failed"
                    );
                    if self.usage.is_some() {
                        self.complete();
                    } else {
                        let after_content = self.started;
                        self.fail(UpstreamErrorKind::StreamCut { after_content });
                    }
                }
            }
        }
    }

    /// Whether any content delta has been decoded.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The endpoint's configured name.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Takes one event's data; false when it ended the stream.
    fn take_event(&mut self, data: &str) -> bool {
        if data.trim() == "[DONE]" {
            self.complete();
            return false;
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.fail(UpstreamErrorKind::Protocol(format!(
                    "an event is not a json chunk: {e}"
                )));
                return false;
            }
        };
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = json_error_message(&serde_json::json!({ "error": error }))
                .unwrap_or_else(|| error.to_string());
            let message = truncate_chars(&scrub(&message, self.key.as_ref()), MAX_MESSAGE_CHARS);
            self.fail(UpstreamErrorKind::Protocol(format!(
                "the endpoint sent an error: {message}"
            )));
            return false;
        }
        // Groq reports usage under `x_groq` where others use the top level.
        let usage = [chunk.get("usage"), chunk.pointer("/x_groq/usage")]
            .into_iter()
            .flatten()
            .find(|u| u.is_object());
        if let Some(usage) = usage {
            let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
            self.usage = Some(Usage {
                prompt_tokens: count("/prompt_tokens"),
                completion_tokens: count("/completion_tokens"),
                cached_tokens: count("/prompt_tokens_details/cached_tokens"),
            });
        }
        // With `n` > 1 choices interleave; the coordinator asks for one, index 0.
        let choice = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|choices| {
                choices
                    .iter()
                    .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
            });
        let Some(choice) = choice else {
            return true;
        };
        let text = match self.api {
            Api::Chat => choice.pointer("/delta/content"),
            Api::Completions => choice.get("text"),
        }
        .and_then(Value::as_str)
        .unwrap_or_default();
        let finish_reason = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_string);
        if text.is_empty() && finish_reason.is_none() {
            // A role-only opening chunk, or a tool-call fragment we do not relay.
            return true;
        }
        self.started |= !text.is_empty();
        self.finished |= finish_reason.is_some();
        self.pending.push_back(Ok(UpstreamEvent::Delta {
            text: text.to_string(),
            finish_reason,
        }));
        true
    }

    fn end_of_body(&mut self) {
        match self.decoder.finish() {
            Ok(Some(data)) => {
                if !self.take_event(&data) {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => return self.fail(UpstreamErrorKind::Protocol(e.to_string())),
        }
        if self.usage.is_some() || self.finished {
            self.complete();
        } else {
            let after_content = self.started;
            self.fail(UpstreamErrorKind::StreamCut { after_content });
        }
    }

    /// The stream ended well: the usage report is queued after the last delta and the
    /// permit freed. What is left of an HTTP/1 body (its last chunk) is read in the
    /// background, so the connection goes back to the pool instead of closing.
    fn complete(&mut self) {
        if let Some(usage) = self.usage.take() {
            self.pending.push_back(Ok(UpstreamEvent::Usage(usage)));
        }
        self.permit = None;
        let Some(mut response) = self.response.take() else {
            return;
        };
        if response.version() >= reqwest::Version::HTTP_2 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let idle_timeout = self.idle_timeout;
        runtime.spawn(async move {
            let drain = async {
                let mut read = 0;
                while let Ok(Some(chunk)) = response.chunk().await {
                    read += chunk.len();
                    if read > MAX_DRAIN_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(idle_timeout, drain).await;
        });
    }

    /// The stream failed: the error is queued last, the request aborted and the permit freed.
    fn fail(&mut self, kind: UpstreamErrorKind) {
        let error = UpstreamError::new(&self.endpoint, kind, self.started);
        self.pending.push_back(Err(error));
        self.response = None;
        self.permit = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_sets_streaming_fields_over_the_coordinators() {
        let mut body = Map::new();
        body.insert("model".into(), "served-name".into());
        body.insert("stream".into(), false.into());
        body.insert(
            "stream_options".into(),
            serde_json::json!({"continuous_usage_stats": true}),
        );
        body.insert("temperature".into(), 0.5.into());
        let body = Value::Object(request_body(body, "remote-name", 64));
        assert_eq!(
            body,
            serde_json::json!({
                "model": "remote-name",
                "stream": true,
                "stream_options": {"continuous_usage_stats": true, "include_usage": true},
                "temperature": 0.5,
                "max_tokens": 64,
            })
        );
    }

    #[test]
    fn retry_after_reads_milliseconds_then_seconds() -> anyhow::Result<()> {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("-3"));
        assert_eq!(retry_after(&h), None);
        Ok(())
    }

    #[test]
    fn error_messages_come_from_the_openai_envelope() {
        let v =
            serde_json::json!({"error": {"message": "bad model", "type": "invalid_request_error"}});
        assert_eq!(json_error_message(&v).as_deref(), Some("bad model"));
        let v = serde_json::json!({"error": "quota"});
        assert_eq!(json_error_message(&v).as_deref(), Some("quota"));
        let v = serde_json::json!({"detail": "not found"});
        assert_eq!(json_error_message(&v).as_deref(), Some("not found"));
    }

    #[test]
    fn scrub_removes_every_occurrence_of_the_key() {
        let key = Secret::new("sk-123");
        assert_eq!(
            scrub("bad key sk-123 (sk-123)", Some(&key)),
            "bad key [redacted] ([redacted])"
        );
        assert_eq!(scrub("no key", None), "no key");
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_chars("héllo", 2), "hé...");
        assert_eq!(truncate_chars("hé", 2), "hé");
    }
}
