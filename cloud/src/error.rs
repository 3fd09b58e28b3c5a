//! The crate's errors: [`Error`] for building an upstream (its config, its key, its HTTP
//! client), [`UpstreamError`] for one request sent to it. Each is classified here, once; the
//! coordinator turns the class into a status code at its edge.
//!
//! Invariant: no message built here or anywhere in this crate holds an API key. Bodies an
//! endpoint sends back are scrubbed of the key before they become a message (see
//! `upstream::scrub`).

use std::fmt;
use std::time::Duration;

use baton_core::ErrorClass;

/// Building an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config key is wrong; `field` names it as `cloud.endpoints[<index>].<field>`.
    #[error("invalid configuration: {field}: {reason}")]
    InvalidConfig { field: String, reason: String },
    /// The endpoint's API key could not be read from its environment variable or file. The
    /// reason names the variable or the path, never the contents.
    #[error("cloud endpoint {endpoint}: api key: {reason}")]
    Key { endpoint: String, reason: String },
    /// The HTTP client could not be built (TLS roots, crypto provider).
    #[error("cloud http client: {0}")]
    Client(String),
}

impl Error {
    /// The error's class: a config or client error is a start-up failure (internal); a key
    /// that cannot be read makes the endpoint unavailable until it can.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidConfig { .. } | Error::Client(_) => ErrorClass::Internal,
            Error::Key { .. } => ErrorClass::Unavailable,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One request to a cloud endpoint failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cloud endpoint {endpoint}: {kind}")]
pub struct UpstreamError {
    /// The endpoint's configured name.
    pub endpoint: String,
    /// What went wrong.
    pub kind: UpstreamErrorKind,
    /// Whether a content delta had been decoded (and so handed to the coordinator) before
    /// this error. After that the client has seen output and the request cannot move to
    /// another endpoint.
    pub after_content: bool,
}

/// What went wrong with one upstream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The request never reached the endpoint: DNS, connection refused, TLS, or the endpoint's
    /// API key could not be read when the request was about to be sent.
    Connect(String),
    /// A timeout fired: `"connect"` (`connect_timeout`), `"first token"` (no content or finish
    /// within `connect_timeout + first_token_timeout` of sending) or `"idle"` (a gap between
    /// chunks longer than `idle_timeout` after the first token).
    Timeout { phase: &'static str },
    /// 429: the endpoint's rate limit; `retry_after` from its `retry-after-ms` or
    /// `Retry-After` (seconds) header.
    RateLimited { retry_after: Option<Duration> },
    /// Any other non-2xx status, with the endpoint's error message (scrubbed of the key,
    /// at most 1000 characters).
    Status { code: u16, message: String },
    /// The body ended or failed before `[DONE]`, before a usage chunk and (for a clean end)
    /// before a finish reason.
    StreamCut { after_content: bool },
    /// Bytes we cannot use: an unparseable SSE event or JSON chunk, an error object inside
    /// the stream, an oversized event, a non-streamed reply.
    Protocol(String),
}

impl UpstreamErrorKind {
    /// A short fixed label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect(_) => "connect",
            UpstreamErrorKind::Timeout { .. } => "timeout",
            UpstreamErrorKind::RateLimited { .. } => "rate_limited",
            UpstreamErrorKind::Status { .. } => "status",
            UpstreamErrorKind::StreamCut { .. } => "stream_cut",
            UpstreamErrorKind::Protocol(_) => "protocol",
        }
    }
}

/// 401 and 403 mean the operator's key was refused, and 404 that the operator's model mapping
/// or base URL is wrong (the client's model name was already mapped): the endpoint is unusable
/// for this request, not the request itself.
fn endpoint_misconfigured(code: u16) -> bool {
    matches!(code, 401 | 403 | 404)
}

impl fmt::Display for UpstreamErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamErrorKind::Connect(reason) => write!(f, "cannot reach the endpoint: {reason}"),
            UpstreamErrorKind::Timeout { phase } => write!(f, "{phase} timeout"),
            UpstreamErrorKind::RateLimited { retry_after: None } => write!(f, "rate limited (429)"),
            UpstreamErrorKind::RateLimited {
                retry_after: Some(after),
            } => write!(f, "rate limited (429), retry after {after:?}"),
            UpstreamErrorKind::Status { code, message } => {
                let what = match code {
                    401 | 403 => " (the endpoint refused the api key)",
                    404 => " (check the endpoint's base_url and model mapping)",
                    _ => "",
                };
                if message.is_empty() {
                    write!(f, "status {code}{what}")
                } else {
                    write!(f, "status {code}{what}: {message}")
                }
            }
            UpstreamErrorKind::StreamCut { after_content } => {
                let when = if *after_content {
                    "after content"
                } else {
                    "before any content"
                };
                write!(
                    f,
                    "the stream was cut {when}, before [DONE] or a usage report"
                )
            }
            UpstreamErrorKind::Protocol(reason) => write!(f, "protocol error: {reason}"),
        }
    }
}

impl UpstreamError {
    pub(crate) fn new(endpoint: &str, kind: UpstreamErrorKind, after_content: bool) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            kind,
            after_content,
        }
    }

    /// Whether the coordinator may try another endpoint or a local worker. Never once content
    /// reached the client; before that, for everything that says the endpoint (not the
    /// request) is at fault: connect failures, timeouts, 429, 5xx, a refused key (401/403),
    /// a missing model (404), a cut or garbled stream. Any other 4xx is the request's fault
    /// and would fail anywhere.
    pub fn retryable(&self) -> bool {
        if self.after_content {
            return false;
        }
        match &self.kind {
            UpstreamErrorKind::Connect(_)
            | UpstreamErrorKind::Timeout { .. }
            | UpstreamErrorKind::RateLimited { .. }
            | UpstreamErrorKind::StreamCut { .. }
            | UpstreamErrorKind::Protocol(_) => true,
            UpstreamErrorKind::Status { code, .. } => {
                !(400..500).contains(code) || endpoint_misconfigured(*code)
            }
        }
    }

    /// The error's class. An upstream timeout is `Unavailable`, not `Deadline`: `Deadline` is
    /// the client's own deadline. A refused key or a missing model is the operator's problem,
    /// so `Unavailable`; other 4xx are the client's (`InvalidRequest`).
    pub fn class(&self) -> ErrorClass {
        match &self.kind {
            UpstreamErrorKind::RateLimited { .. } => ErrorClass::Overloaded,
            UpstreamErrorKind::Status { code, .. }
                if (400..500).contains(code) && !endpoint_misconfigured(*code) =>
            {
                ErrorClass::InvalidRequest
            }
            UpstreamErrorKind::Status { .. }
            | UpstreamErrorKind::Connect(_)
            | UpstreamErrorKind::Timeout { .. }
            | UpstreamErrorKind::StreamCut { .. }
            | UpstreamErrorKind::Protocol(_) => ErrorClass::Unavailable,
        }
    }

    /// How long the endpoint asked us to wait (429 only).
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind {
            UpstreamErrorKind::RateLimited { retry_after } => retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: UpstreamErrorKind, after_content: bool) -> UpstreamError {
        UpstreamError::new("groq", kind, after_content)
    }

    fn status(code: u16) -> UpstreamErrorKind {
        UpstreamErrorKind::Status {
            code,
            message: String::new(),
        }
    }

    #[test]
    fn client_errors_are_not_retried_but_endpoint_faults_are() {
        assert!(!err(status(400), false).retryable());
        assert!(!err(status(422), false).retryable());
        assert_eq!(err(status(400), false).class(), ErrorClass::InvalidRequest);
        for code in [401, 403, 404, 500, 502, 503] {
            assert!(err(status(code), false).retryable(), "{code}");
            assert_eq!(err(status(code), false).class(), ErrorClass::Unavailable);
        }
        let limited = err(
            UpstreamErrorKind::RateLimited {
                retry_after: Some(Duration::from_secs(3)),
            },
            false,
        );
        assert!(limited.retryable());
        assert_eq!(limited.class(), ErrorClass::Overloaded);
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn nothing_is_retried_after_content_reached_the_client() {
        let kinds = [
            UpstreamErrorKind::Connect("reset".into()),
            UpstreamErrorKind::Timeout { phase: "idle" },
            UpstreamErrorKind::StreamCut {
                after_content: true,
            },
            UpstreamErrorKind::Protocol("garbage".into()),
        ];
        for kind in kinds {
            assert!(err(kind.clone(), false).retryable(), "{kind}");
            assert!(!err(kind.clone(), true).retryable(), "{kind}");
            assert_eq!(err(kind, true).class(), ErrorClass::Unavailable);
        }
    }

    #[test]
    fn display_names_the_endpoint_in_lower_case() {
        let e = err(
            UpstreamErrorKind::Timeout {
                phase: "first token",
            },
            false,
        );
        assert_eq!(e.to_string(), "cloud endpoint groq: first token timeout");
        let e = err(status(401), false);
        assert_eq!(
            e.to_string(),
            "cloud endpoint groq: status 401 (the endpoint refused the api key)"
        );
    }
}
