//! OpenAI-compatible target: `POST {base}/v1/completions` with `stream: true` and
//! `stream_options.include_usage`, read as server-sent events.
//!
//! Request body: `model`, `prompt`, `max_tokens`, `temperature: 0`, `stream: true`,
//! `stream_options: {include_usage: true}`, and `ignore_eos: true` only when asked (a vLLM
//! extension that baton and llama.cpp's C++ server accept; OpenAI's own API would refuse it).
//! Keys of an extra body (`--extra-body`) are added last and win: a server without `ignore_eos`
//! (llama-cpp-python's) can be asked for full-length answers with a `logit_bias` on its
//! end-of-sequence tokens instead.
//! Each `data:` event is one JSON chunk: `choices[0].text` (or a chat `delta.content`) is text,
//! `choices[0].finish_reason` ends the answer, `usage.completion_tokens` counts the output, an
//! `error` object is a server error, and `[DONE]` ends the stream.
//!
//! HTTP/1.1 over hyper-util's pooled client (plain `http://` only: benchmarks run on a LAN).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Target;
use super::sse::SseDecoder;
use crate::error::{Error, Result};
use crate::prompts::RequestSpec;
use crate::sample::{ErrorKind, Measured, Recorder, RequestError};

/// Largest SSE line or event accepted: a chunk is a few hundred bytes; logprobs make it bigger.
const MAX_EVENT: usize = 1 << 20;
/// Most bytes of an error body kept for the message.
const MAX_ERROR_BODY: usize = 4 << 10;
/// Largest `/v1/models` body read.
const MAX_MODELS_BODY: usize = 1 << 20;

/// An OpenAI-compatible completions endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiTarget {
    client: Client<HttpConnector, Full<Bytes>>,
    completions: Uri,
    model: String,
    ignore_eos: bool,
    extra_body: serde_json::Map<String, Value>,
    /// Sent as `Authorization: Bearer`.
    api_key: Option<String>,
}

/// `{base}/v1/{path}` for an endpoint given as `http://host:port` or `http://host:port/v1`.
fn api_uri(endpoint: &str, path: &str) -> Result<Uri> {
    let bad = |reason: String| Error::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let uri: Uri = endpoint
        .parse()
        .map_err(|e| bad(format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(bad(format!(
                "scheme {other:?} is not supported (plain http only)"
            )));
        }
        None => return Err(bad("no scheme: write http://host:port".into())),
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("no host".into()))?
        .as_str();
    let base = uri.path().trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base);
    format!("http://{authority}{base}/v1/{path}")
        .parse()
        .map_err(|e| bad(format!("{e}")))
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    // Small writes of a streaming protocol must not wait for Nagle.
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

impl OpenAiTarget {
    /// A target for `endpoint` (`http://host:port`, optionally ending in `/v1`) asking for
    /// `model`; `ignore_eos` asks for exactly `max_tokens` tokens.
    pub fn new(endpoint: &str, model: String, ignore_eos: bool) -> Result<Self> {
        Ok(Self {
            client: client(),
            completions: api_uri(endpoint, "completions")?,
            model,
            ignore_eos,
            extra_body: serde_json::Map::new(),
            api_key: None,
        })
    }

    /// Sends `key` as `Authorization: Bearer` on every request.
    pub fn with_api_key(mut self, key: Option<String>) -> Self {
        self.api_key = key;
        self
    }

    /// Adds `extra` to every request body, over the keys the target sets itself.
    pub fn with_extra_body(mut self, extra: serde_json::Map<String, Value>) -> Self {
        self.extra_body = extra;
        self
    }

    /// The first model `GET {base}/v1/models` lists (asked with `api_key` when given).
    pub async fn served_model(endpoint: &str, api_key: Option<&str>) -> Result<String> {
        let uri = api_uri(endpoint, "models")?;
        let fail = |reason: String| Error::Endpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        let mut request = Request::get(uri);
        if let Some(key) = api_key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| fail(e.to_string()))?;
        let fetch = async {
            let response = client()
                .request(request)
                .await
                .map_err(|e| fail(format!("GET /v1/models: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_MODELS_BODY)
                .collect()
                .await
                .map_err(|e| fail(format!("GET /v1/models body: {e}")))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(fail(format!("GET /v1/models: status {status}")));
            }
            let v: Value =
                serde_json::from_slice(&body).map_err(|e| fail(format!("GET /v1/models: {e}")))?;
            v.pointer("/data/0/id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| fail("GET /v1/models lists no model".into()))
        };
        tokio::time::timeout(Duration::from_secs(30), fetch)
            .await
            .map_err(|_| fail("GET /v1/models did not answer within 30 s".into()))?
    }

    fn body(&self, request: &RequestSpec) -> Value {
        let mut body = json!({
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        for (key, value) in &self.extra_body {
            body[key] = value.clone();
        }
        body
    }

    /// Runs one request into `rec`; `Err` is the request's failure.
    async fn stream(
        &self,
        request: &RequestSpec,
        rec: &mut Recorder,
    ) -> std::result::Result<(), RequestError> {
        let body = Bytes::from(self.body(request).to_string());
        let mut retried = false;
        let response = loop {
            let mut http_request = Request::post(self.completions.clone())
                .header(CONTENT_TYPE, "application/json")
                .header(ACCEPT, "text/event-stream");
            if let Some(key) = &self.api_key {
                http_request = http_request.header(AUTHORIZATION, format!("Bearer {key}"));
            }
            let http_request = http_request
                .body(Full::new(body.clone()))
                .map_err(|e| RequestError::new(ErrorKind::Client, e.to_string()))?;
            match self.client.request(http_request).await {
                Ok(response) => break response,
                // A pooled keep-alive connection the server closed as the request went out
                // (llama.cpp's server closes some after a stream): no byte of an answer came,
                // so the request is sent again once, on a new connection, as HTTP clients do.
                Err(e) if !retried && closed_before_answer(&e) => retried = true,
                Err(e) => {
                    let kind = if e.is_connect() {
                        ErrorKind::Connect
                    } else {
                        ErrorKind::StreamBroken
                    };
                    return Err(RequestError::new(kind, error_chain(&e)));
                }
            }
        };
        let status = response.status();
        let mut body = response.into_body();
        if status != StatusCode::OK {
            // The message is a courtesy: a body that breaks or overflows leaves it short.
            let mut text = Vec::new();
            while text.len() < MAX_ERROR_BODY {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            text.extend_from_slice(&data);
                        }
                    }
                    _ => break,
                }
            }
            text.truncate(MAX_ERROR_BODY);
            return Err(RequestError::new(
                ErrorKind::HttpStatus {
                    status: status.as_u16(),
                },
                String::from_utf8_lossy(&text).trim().to_string(),
            ));
        }
        let mut sse = SseDecoder::new(MAX_EVENT);
        let mut state = StreamState::default();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| RequestError::new(ErrorKind::StreamBroken, error_chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = std::time::Instant::now();
            let events = sse
                .push(&data)
                .map_err(|e| RequestError::new(ErrorKind::BadResponse, e.to_string()))?;
            // After [DONE] the body is read to its end anyway, so the connection goes back to
            // the pool.
            if !state.done {
                for event in events {
                    state.event(&event, now, rec)?;
                }
            }
        }
        if !state.done
            && let Some(event) = sse.finish()
        {
            state.event(&event, std::time::Instant::now(), rec)?;
        }
        if state.done || state.finished {
            Ok(())
        } else if state.events == 0 {
            Err(RequestError::new(
                ErrorKind::BadResponse,
                "the response held no server-sent events",
            ))
        } else {
            Err(RequestError::new(
                ErrorKind::StreamBroken,
                "the stream ended without a finish reason or [DONE]",
            ))
        }
    }
}

/// What a stream has said so far.
#[derive(Debug, Default)]
struct StreamState {
    events: usize,
    finished: bool,
    done: bool,
}

impl StreamState {
    fn event(
        &mut self,
        data: &str,
        at: std::time::Instant,
        rec: &mut Recorder,
    ) -> std::result::Result<(), RequestError> {
        self.events += 1;
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            RequestError::new(
                ErrorKind::BadResponse,
                format!("event is not JSON ({e}): {}", snippet(data)),
            )
        })?;
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| err.to_string(), str::to_string);
            return Err(RequestError::new(ErrorKind::ServerError, message));
        }
        if let Some(choice) = v.pointer("/choices/0") {
            let text = choice
                .get("text")
                .or_else(|| choice.pointer("/delta/content"))
                .and_then(Value::as_str)
                .unwrap_or("");
            rec.chunk(at, !text.is_empty(), true);
            rec.text(text);
            if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                self.finished = true;
            }
        }
        if let Some(usage) = v.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| {
                usage
                    .get(key)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            rec.usage(count("completion_tokens"), count("prompt_tokens"));
        }
        Ok(())
    }
}

/// Whether a request failed because its pooled connection was closed before any response.
fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<hyper::Error>())
        .is_some_and(|h| h.is_incomplete_message() || h.is_canceled())
}

fn snippet(s: &str) -> String {
    s.chars().take(120).collect()
}

/// An error and its sources, joined (hyper's top-level messages are terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl Target for OpenAiTarget {
    async fn send(&self, request: &RequestSpec, deadline: Instant) -> Measured {
        let mut rec = Recorder::new(std::time::Instant::now());
        let error = match tokio::time::timeout_at(deadline, self.stream(request, &mut rec)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(RequestError::new(
                ErrorKind::Timeout,
                "no finish before the request timeout",
            )),
        };
        rec.finish(std::time::Instant::now(), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_or_without_v1_reach_the_same_api() {
        for e in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.0.0.1:8080/v1",
            "http://127.0.0.1:8080/v1/",
        ] {
            assert_eq!(
                api_uri(e, "completions").expect("uri").to_string(),
                "http://127.0.0.1:8080/v1/completions",
                "{e}"
            );
        }
        assert_eq!(
            api_uri("http://h:1/proxy/v1", "models")
                .expect("uri")
                .to_string(),
            "http://h:1/proxy/v1/models"
        );
        assert!(api_uri("https://h", "models").is_err());
        assert!(api_uri("127.0.0.1:8080", "models").is_err());
    }

    #[test]
    fn body_asks_for_a_greedy_stream_with_usage_and_ignore_eos_only_when_set() {
        let r = RequestSpec {
            prompt: "hi".into(),
            prompt_tokens: Some(1),
            max_tokens: 7,
        };
        let t = OpenAiTarget {
            client: client(),
            completions: api_uri("http://h:1", "completions").expect("uri"),
            model: "m".into(),
            ignore_eos: false,
            extra_body: serde_json::Map::new(),
            api_key: None,
        };
        let b = t.body(&r);
        assert_eq!(
            b,
            json!({"model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0.0,
                   "stream": true, "stream_options": {"include_usage": true}})
        );
        let t = OpenAiTarget {
            ignore_eos: true,
            ..t
        };
        assert_eq!(t.body(&r)["ignore_eos"], json!(true));
        let extra = json!({"logit_bias": {"2": -100}, "temperature": 0.5});
        let t = t.with_extra_body(extra.as_object().expect("object").clone());
        let b = t.body(&r);
        assert_eq!(b["logit_bias"], json!({"2": -100}));
        assert_eq!(b["temperature"], json!(0.5), "extra keys win");
        assert_eq!(b["max_tokens"], json!(7));
    }
}
