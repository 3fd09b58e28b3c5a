//! baton's gRPC target: `baton.v1.Inference/Generate`, server-streaming, on one HTTP/2 channel
//! that every request shares (as a real client would).
//!
//! The prompt goes as raw text (`input.prompt`, no chat template), greedy, with `max_tokens`
//! and `ignore_eos` as asked. Each response message is a chunk: its `text` is the text,
//! `token_ids` count the output, and the message with `finish` ends the stream and carries the
//! usage.
//!
//! Failures: a status the server sent is `GrpcStatus { code }`; a transport error (one tonic
//! reports with an underlying source) is `Connect` before the stream starts and `StreamBroken`
//! after; a stream that ends without `finish` is `StreamBroken`.

use baton_proto::v1::{self, inference_client::InferenceClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::Target;
use crate::error::{Error, Result};
use crate::prompts::RequestSpec;
use crate::sample::{ErrorKind, Measured, Recorder, RequestError};

/// A baton coordinator's gRPC API.
#[derive(Debug, Clone)]
pub struct GrpcTarget {
    client: InferenceClient<Channel>,
    model: String,
    ignore_eos: bool,
    /// Sent as `authorization: Bearer` metadata.
    api_key: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl GrpcTarget {
    /// A target for `endpoint` (`host:port` or `http://host:port`) asking for `model` (empty: the
    /// served model). The connection is opened on first use, so a refused connection is a
    /// request's `Connect` error. Must be called inside a tokio runtime.
    pub fn new(endpoint: &str, model: String, ignore_eos: bool) -> Result<Self> {
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Channel::from_shared(uri)
            .map_err(|e| Error::Endpoint {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?
            .connect_lazy();
        Ok(Self {
            client: InferenceClient::new(channel),
            model,
            ignore_eos,
            api_key: None,
        })
    }

    /// Sends `key` as `authorization: Bearer` metadata on every call.
    pub fn with_api_key(mut self, key: Option<&str>) -> Result<Self> {
        self.api_key = match key {
            None => None,
            Some(k) => Some(format!("Bearer {k}").parse().map_err(|_| Error::Endpoint {
                endpoint: "grpc".into(),
                reason: "the API key must be printable ASCII".into(),
            })?),
        };
        Ok(self)
    }

    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = &self.api_key {
            request.metadata_mut().insert("authorization", key.clone());
        }
        request
    }

    /// The first model the coordinator's `Models` call lists.
    pub async fn served_model(&self) -> Result<String> {
        let fail = |reason: String| Error::Endpoint {
            endpoint: "grpc".into(),
            reason,
        };
        let mut client = self.client.clone();
        let call = client.models(self.authorized(v1::ModelsRequest {}));
        let response = tokio::time::timeout(std::time::Duration::from_secs(30), call)
            .await
            .map_err(|_| fail("Models did not answer within 30 s".into()))?
            .map_err(|s| fail(format!("Models: {}: {}", s.code(), s.message())))?;
        response
            .into_inner()
            .models
            .into_iter()
            .next()
            .map(|m| m.id)
            .ok_or_else(|| fail("Models lists no model".into()))
    }

    fn request(&self, request: &RequestSpec) -> v1::GenerateRequest {
        v1::GenerateRequest {
            model: self.model.clone(),
            input: Some(v1::generate_request::Input::Prompt(request.prompt.clone())),
            sampling: Some(v1::SamplingParams {
                temperature: Some(0.0),
                max_tokens: Some(request.max_tokens),
                ignore_eos: self.ignore_eos,
                ..v1::SamplingParams::default()
            }),
            pd_mode: v1::PdMode::Auto as i32,
            ..v1::GenerateRequest::default()
        }
    }

    async fn stream(
        &self,
        request: &RequestSpec,
        rec: &mut Recorder,
    ) -> std::result::Result<(), RequestError> {
        let mut client = self.client.clone();
        let mut stream = client
            .generate(self.authorized(self.request(request)))
            .await
            .map_err(|s| classify(&s, false))?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    let now = std::time::Instant::now();
                    rec.token_ids(m.token_ids.len() as u32);
                    rec.chunk(now, !m.text.is_empty(), true);
                    rec.text(&m.text);
                    if let Some(finish) = m.finish {
                        if let Some(u) = finish.usage {
                            rec.usage(Some(u.completion_tokens), Some(u.prompt_tokens));
                        }
                        if finish.reason == v1::FinishReason::Error as i32 {
                            return Err(RequestError::new(
                                ErrorKind::ServerError,
                                "the stream finished with reason ERROR",
                            ));
                        }
                        return Ok(());
                    }
                }
                Ok(None) => {
                    return Err(RequestError::new(
                        ErrorKind::StreamBroken,
                        "the stream ended without a finish",
                    ));
                }
                Err(s) => return Err(classify(&s, true)),
            }
        }
    }
}

/// A status the server sent, or a transport failure tonic wrapped as one.
fn classify(status: &tonic::Status, streaming: bool) -> RequestError {
    let transport = std::error::Error::source(status).is_some();
    let kind = match (transport, streaming) {
        (true, false) => ErrorKind::Connect,
        (true, true) => ErrorKind::StreamBroken,
        (false, _) => ErrorKind::GrpcStatus {
            code: status.code() as i32,
        },
    };
    let mut message = format!("{}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    RequestError::new(kind, message)
}

impl Target for GrpcTarget {
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
