//! `Upstream` against a real HTTP server on 127.0.0.1: a well-formed stream cut at awkward
//! byte boundaries, the request the client sends, and each way an endpoint misbehaves.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_cloud::{
    Api, AuthHeader, EndpointConfig, Upstream, UpstreamError, UpstreamErrorKind, UpstreamEvent,
    UpstreamRequest, UpstreamStream, Usage,
};
use baton_core::ErrorClass;
use common::{
    MisbehavingUpstream, Mode, chat_stream_bytes, completions_stream_bytes, split_awkwardly,
};
use tempfile::TempDir;

const KEY: &str = "sk-test-6f1e2d3c4b5a69788796a5b4";

/// An endpoint on `server` with a key file holding [`KEY`] and one model.
fn endpoint(
    server: &MisbehavingUpstream,
    auth: AuthHeader,
) -> anyhow::Result<(EndpointConfig, TempDir)> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n"))?;
    let mut config = EndpointConfig::new("scripted", server.base_url());
    config.api_key_file = Some(key_file);
    config.auth_header = auth;
    config.models = BTreeMap::from([("llama".to_string(), "remote-llama-8b".to_string())]);
    config.input_usd_per_mtok = 0.05;
    config.output_usd_per_mtok = 0.08;
    config.max_concurrent = 2;
    // Generous, so a loaded machine fails no test; the timeout tests shorten their own.
    config.connect_timeout = Duration::from_secs(5);
    config.first_token_timeout = Duration::from_secs(5);
    config.idle_timeout = Duration::from_secs(5);
    config.validate(0)?;
    Ok((config, dir))
}

fn chat_request(upstream: &Upstream) -> anyhow::Result<UpstreamRequest> {
    let body = serde_json::json!({
        "model": "llama",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
    });
    Ok(UpstreamRequest {
        api: Api::Chat,
        body: body.as_object().cloned().context("an object")?,
        remote_model: upstream
            .remote_model("llama")
            .context("maps llama")?
            .to_string(),
        max_tokens: 32,
        request_id: "req-0042".into(),
    })
}

async fn send(upstream: &Upstream) -> anyhow::Result<Result<UpstreamStream, UpstreamError>> {
    let permit = upstream.try_acquire().context("a free slot")?;
    Ok(upstream.send(permit, chat_request(upstream)?).await)
}

/// Every event until the stream ends or fails.
async fn drain(stream: &mut UpstreamStream) -> (Vec<UpstreamEvent>, Option<UpstreamError>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

/// Sends one request to a server in `mode` and returns the error it ends in, whether at send
/// or mid-stream, with the events before it.
async fn failure(mode: Mode) -> anyhow::Result<(Vec<UpstreamEvent>, UpstreamError, Upstream)> {
    let server = MisbehavingUpstream::start(mode).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let (events, error) = match send(&upstream).await? {
        Err(e) => (Vec::new(), Some(e)),
        Ok(mut stream) => drain(&mut stream).await,
    };
    let error = error.context("the request should have failed")?;
    assert_no_key(&error);
    assert_eq!(upstream.in_flight(), 0, "a failed request frees its permit");
    Ok((events, error, upstream))
}

fn assert_no_key(error: &UpstreamError) {
    for text in [error.to_string(), format!("{error:?}")] {
        assert!(!text.contains(KEY), "the key leaked: {text}");
    }
}

fn delta(text: &str, finish_reason: Option<&str>) -> UpstreamEvent {
    UpstreamEvent::Delta {
        text: text.into(),
        finish_reason: finish_reason.map(str::to_string),
    }
}

#[tokio::test]
async fn scripted_stream_cut_at_awkward_bytes_decodes_to_deltas_finish_and_usage()
-> anyhow::Result<()> {
    let server =
        MisbehavingUpstream::start(Mode::Scripted(split_awkwardly(&chat_stream_bytes()))).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let mut stream = send(&upstream).await??;
    assert!(!stream.started());
    assert_eq!(upstream.in_flight(), 1);
    let (events, error) = drain(&mut stream).await;
    assert_eq!(error, None);
    assert_eq!(
        events,
        vec![
            delta("Hel", None),
            delta("lo, ", None),
            delta("wörld", None),
            delta("", Some("stop")),
            UpstreamEvent::Usage(Usage {
                prompt_tokens: 12,
                completion_tokens: 3,
                cached_tokens: 4,
            }),
        ]
    );
    assert!(stream.started());
    assert!(stream.next().await.is_none(), "the stream stays ended");
    assert_eq!(upstream.in_flight(), 0, "an ended stream frees its permit");
    Ok(())
}

#[tokio::test]
async fn request_carries_remote_model_streaming_fields_bearer_key_and_request_id()
-> anyhow::Result<()> {
    let mut server = MisbehavingUpstream::start(Mode::Scripted(vec![chat_stream_bytes()])).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let mut stream = send(&upstream).await??;
    drain(&mut stream).await;

    let request = server.request().await?;
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(
        request.body,
        serde_json::json!({
            "model": "remote-llama-8b",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.2,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 32,
        })
    );
    let header = |name: &str| request.headers.get(name).map(String::as_str);
    assert_eq!(
        header("authorization"),
        Some(format!("Bearer {KEY}").as_str())
    );
    assert_eq!(header("api-key"), None);
    assert_eq!(header("x-request-id"), Some("req-0042"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("accept"), Some("text/event-stream"));
    Ok(())
}

#[tokio::test]
async fn api_key_style_sends_the_key_in_an_api_key_header() -> anyhow::Result<()> {
    let mut server = MisbehavingUpstream::start(Mode::Scripted(vec![chat_stream_bytes()])).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::ApiKey)?;
    let upstream = Upstream::new(config)?;
    let mut stream = send(&upstream).await??;
    drain(&mut stream).await;
    let request = server.request().await?;
    assert_eq!(
        request.headers.get("api-key").map(String::as_str),
        Some(KEY)
    );
    assert_eq!(request.headers.get("authorization"), None);
    Ok(())
}

#[tokio::test]
async fn endpoint_without_a_key_sends_no_auth_header() -> anyhow::Result<()> {
    let mut server = MisbehavingUpstream::start(Mode::Scripted(vec![chat_stream_bytes()])).await?;
    let (mut config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    config.api_key_file = None;
    let upstream = Upstream::new(config)?;
    let mut stream = send(&upstream).await??;
    drain(&mut stream).await;
    let request = server.request().await?;
    assert_eq!(request.headers.get("authorization"), None);
    assert_eq!(request.headers.get("api-key"), None);
    Ok(())
}

#[tokio::test]
async fn completions_stream_reads_choice_text() -> anyhow::Result<()> {
    let mut server =
        MisbehavingUpstream::start(Mode::Scripted(split_awkwardly(&completions_stream_bytes())))
            .await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let permit = upstream.try_acquire().context("a free slot")?;
    let request = UpstreamRequest {
        api: Api::Completions,
        body: serde_json::json!({"prompt": "Once"})
            .as_object()
            .cloned()
            .context("an object")?,
        remote_model: "remote-llama-8b".into(),
        max_tokens: 2,
        request_id: "req-7".into(),
    };
    let mut stream = upstream.send(permit, request).await?;
    let (events, error) = drain(&mut stream).await;
    assert_eq!(error, None);
    assert_eq!(
        events,
        vec![
            delta("Once", None),
            delta(" upon", None),
            delta("", Some("length")),
            UpstreamEvent::Usage(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_tokens: 0,
            }),
        ]
    );
    assert_eq!(server.request().await?.path, "/v1/completions");
    Ok(())
}

#[tokio::test]
async fn rate_limit_is_retryable_and_carries_retry_after() -> anyhow::Result<()> {
    let (_, error, _) = failure(Mode::Refuse {
        status: 429,
        retry_after: Some(7),
        message: "slow down",
    })
    .await?;
    assert_eq!(
        error.kind,
        UpstreamErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert!(error.retryable());
    assert_eq!(error.class(), ErrorClass::Overloaded);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
    Ok(())
}

#[tokio::test]
async fn service_unavailable_is_retryable_with_the_endpoints_message() -> anyhow::Result<()> {
    let (_, error, _) = failure(Mode::Refuse {
        status: 503,
        retry_after: None,
        message: "the model is overloaded",
    })
    .await?;
    assert_eq!(
        error.kind,
        UpstreamErrorKind::Status {
            code: 503,
            message: "the model is overloaded".into()
        }
    );
    assert!(error.retryable());
    assert_eq!(error.class(), ErrorClass::Unavailable);
    Ok(())
}

#[tokio::test]
async fn bad_request_is_the_clients_fault_and_not_retried() -> anyhow::Result<()> {
    let (_, error, _) = failure(Mode::Refuse {
        status: 400,
        retry_after: None,
        message: "max_tokens is too large",
    })
    .await?;
    assert!(!error.retryable());
    assert_eq!(error.class(), ErrorClass::InvalidRequest);
    Ok(())
}

#[tokio::test]
async fn unauthorized_says_the_key_was_refused_and_scrubs_the_echoed_key() -> anyhow::Result<()> {
    let (_, error, _) = failure(Mode::Unauthorized).await?;
    let text = error.to_string();
    assert_eq!(
        text,
        "cloud endpoint scripted: status 401 (the endpoint refused the api key): \
         Incorrect API key provided: [redacted]."
    );
    assert_eq!(error.class(), ErrorClass::Unavailable);
    assert!(error.retryable(), "another endpoint's key may work");
    Ok(())
}

#[tokio::test]
async fn stream_cut_after_content_is_not_retryable() -> anyhow::Result<()> {
    let (events, error, _) = failure(Mode::DropMidStream).await?;
    assert_eq!(events, vec![delta("Hel", None), delta("lo", None)]);
    assert_eq!(
        error.kind,
        UpstreamErrorKind::StreamCut {
            after_content: true
        }
    );
    assert!(error.after_content);
    assert!(!error.retryable());
    Ok(())
}

#[tokio::test]
async fn stream_cut_before_content_is_retryable() -> anyhow::Result<()> {
    let (events, error, _) = failure(Mode::DropBeforeContent).await?;
    assert!(events.is_empty());
    assert_eq!(
        error.kind,
        UpstreamErrorKind::StreamCut {
            after_content: false
        }
    );
    assert!(error.retryable());
    assert_eq!(error.class(), ErrorClass::Unavailable);
    Ok(())
}

#[tokio::test]
async fn first_token_timeout_fires_when_the_endpoint_never_answers() -> anyhow::Result<()> {
    let mut server = MisbehavingUpstream::start(Mode::NeverAnswers).await?;
    let (mut config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    config.connect_timeout = Duration::from_millis(200);
    config.first_token_timeout = Duration::from_millis(200);
    let upstream = Upstream::new(config)?;
    let error = match send(&upstream).await? {
        Ok(_) => bail!("a server that never answers cannot stream"),
        Err(e) => e,
    };
    assert_eq!(
        error.kind,
        UpstreamErrorKind::Timeout {
            phase: "first token"
        }
    );
    assert!(error.retryable());
    assert_eq!(error.class(), ErrorClass::Unavailable);
    server.client_closed().await?;
    assert_eq!(upstream.in_flight(), 0);
    Ok(())
}

#[tokio::test]
async fn idle_timeout_fires_when_the_stream_stalls_after_content() -> anyhow::Result<()> {
    let mut server = MisbehavingUpstream::start(Mode::StallsAfterFirstChunk).await?;
    let (mut config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    config.idle_timeout = Duration::from_millis(200);
    let upstream = Upstream::new(config)?;
    let mut stream = send(&upstream).await??;
    let (events, error) = drain(&mut stream).await;
    assert_eq!(events, vec![delta("Hel", None)]);
    let error = error.context("a stalled stream times out")?;
    assert_eq!(error.kind, UpstreamErrorKind::Timeout { phase: "idle" });
    assert!(!error.retryable(), "content already reached the client");
    server.client_closed().await?;
    assert_eq!(upstream.in_flight(), 0);
    Ok(())
}

#[tokio::test]
async fn garbage_stream_is_a_retryable_protocol_error() -> anyhow::Result<()> {
    let (events, error, _) = failure(Mode::GarbageStream).await?;
    assert!(events.is_empty());
    assert!(
        matches!(error.kind, UpstreamErrorKind::Protocol(_)),
        "{error}"
    );
    assert!(error.retryable());
    assert_eq!(error.class(), ErrorClass::Unavailable);
    Ok(())
}

#[tokio::test]
async fn error_object_in_the_stream_is_a_protocol_error_without_the_key() -> anyhow::Result<()> {
    let (_, error, _) = failure(Mode::ErrorInStream).await?;
    assert_eq!(
        error.to_string(),
        "cloud endpoint scripted: protocol error: the endpoint sent an error: \
         internal failure handling key [redacted]"
    );
    assert!(error.retryable());
    Ok(())
}

#[tokio::test]
async fn connection_refused_is_a_retryable_connect_error() -> anyhow::Result<()> {
    // A port nothing listens on: bound, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut config = EndpointConfig::new("gone", format!("http://{addr}/v1"));
    config.models.insert("llama".into(), "remote".into());
    let upstream = Upstream::new(config)?;
    let error = match send(&upstream).await? {
        Ok(_) => bail!("nothing listens there"),
        Err(e) => e,
    };
    assert!(
        matches!(error.kind, UpstreamErrorKind::Connect(_)),
        "{error}"
    );
    assert!(error.retryable());
    assert_eq!(upstream.in_flight(), 0);
    Ok(())
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection_and_frees_the_permit() -> anyhow::Result<()> {
    let mut server = MisbehavingUpstream::start(Mode::StallsAfterFirstChunk).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let mut stream = send(&upstream).await??;
    let first = stream.next().await.context("a first event")??;
    assert_eq!(first, delta("Hel", None));
    assert_eq!(upstream.in_flight(), 1);
    drop(stream);
    server.client_closed().await?;
    assert_eq!(upstream.in_flight(), 0);
    Ok(())
}

#[tokio::test]
async fn try_acquire_returns_none_at_max_concurrent() -> anyhow::Result<()> {
    let server = MisbehavingUpstream::start(Mode::NeverAnswers).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let a = upstream.try_acquire().context("first slot")?;
    let b = upstream.try_acquire().context("second slot")?;
    assert_eq!(upstream.in_flight(), 2);
    assert!(upstream.try_acquire().is_none());
    drop(a);
    assert_eq!(upstream.in_flight(), 1);
    let shared = upstream.clone();
    assert!(shared.try_acquire().is_some(), "clones share the slots");
    drop(b);
    assert_eq!(upstream.in_flight(), 0);
    Ok(())
}

#[tokio::test]
async fn the_key_appears_in_no_error_nor_debug() -> anyhow::Result<()> {
    let modes = [
        Mode::Unauthorized,
        Mode::ErrorInStream,
        Mode::Refuse {
            status: 500,
            retry_after: None,
            message: "boom",
        },
        Mode::DropMidStream,
        Mode::GarbageStream,
    ];
    for mode in modes {
        // `failure` asserts the error's Display and Debug hold no key.
        let (_, _, upstream) = failure(mode).await?;
        let debug = format!("{upstream:?}");
        assert!(!debug.contains(KEY), "{debug}");
        let config = serde_json::to_string(upstream.config())?;
        assert!(!config.contains(KEY), "{config}");
    }
    let server = MisbehavingUpstream::start(Mode::StallsAfterFirstChunk).await?;
    let (config, _dir) = endpoint(&server, AuthHeader::Bearer)?;
    let upstream = Upstream::new(config)?;
    let stream = send(&upstream).await??;
    let debug = format!("{stream:?}");
    assert!(!debug.contains(KEY), "{debug}");
    Ok(())
}
