//! One request's record: when it was due and sent, what came back and when, and how it failed
//! if it did. Clients fill a [`Recorder`] as chunks arrive; the runner wraps what it measured
//! into a [`Sample`]; metrics read samples and nothing else.
//!
//! Timing rules (vLLM's `benchmark_serving`, with the differences stated):
//! - TTFT: from sending the request to the first chunk that carries text.
//! - ITL: the gaps between consecutive chunks that carry text (vLLM also counts chunks whose
//!   text is empty; baton sends one only when a character is split over tokens).
//! - E2E: from sending to the last chunk that carries a choice (text or finish reason), as
//!   vLLM's `latency`; for a failed request, the time until the failure.
//! - Output tokens: the server's `usage.completion_tokens` when it reports usage; else the token
//!   ids the gRPC stream listed; else the number of text chunks, which undercounts when a
//!   server puts several tokens in one chunk ([`TokenCountSource`] says which was used).

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Why a request failed, classified once, by the client that saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ErrorKind {
    /// The connection could not be made (refused, unreachable, reset before a response).
    Connect,
    /// The HTTP response had a status other than 200.
    HttpStatus { status: u16 },
    /// The gRPC call ended with a status other than OK (code as in `tonic::Code`).
    GrpcStatus { code: i32 },
    /// The request did not finish within its timeout.
    Timeout,
    /// The stream was cut before it finished (connection closed or broken mid-body).
    StreamBroken,
    /// The response could not be understood (not SSE, not JSON, an oversized event).
    BadResponse,
    /// The server reported an error inside a stream that had started (an `error` object).
    ServerError,
    /// The load generator itself failed on this request (a bug; the message says where).
    Client,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Connect => write!(f, "connect"),
            ErrorKind::HttpStatus { status } => write!(f, "http {status}"),
            ErrorKind::GrpcStatus { code } => {
                write!(f, "grpc {:?}", tonic::Code::from_i32(*code))
            }
            ErrorKind::Timeout => write!(f, "timeout"),
            ErrorKind::StreamBroken => write!(f, "stream broken"),
            ErrorKind::BadResponse => write!(f, "bad response"),
            ErrorKind::ServerError => write!(f, "server error"),
            ErrorKind::Client => write!(f, "client"),
        }
    }
}

/// A failed request's kind and the detail the client had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestError {
    /// The class counted in the summary.
    #[serde(flatten)]
    pub kind: ErrorKind,
    /// What the client saw (status body, parse error, transport error).
    pub message: String,
}

impl RequestError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Where a sample's output token count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenCountSource {
    /// The server's usage report.
    #[default]
    Usage,
    /// The token ids the stream carried (baton's gRPC API).
    TokenIds,
    /// The number of chunks with text: a lower bound when chunks carry several tokens.
    Chunks,
}

/// What a target measured for one request; times in seconds from sending it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Measured {
    /// Time to the first chunk with text; `None` if none came.
    pub ttft_s: Option<f64>,
    /// Time to the last chunk with a choice, or to the failure.
    pub e2e_s: f64,
    /// Gaps between consecutive chunks with text.
    pub itl_s: Vec<f64>,
    /// Tokens generated (see `output_tokens_from`).
    pub output_tokens: u32,
    /// Where `output_tokens` came from.
    pub output_tokens_from: TokenCountSource,
    /// Prompt tokens as the server counted them, when it said.
    pub server_prompt_tokens: Option<u32>,
    /// Set when the request failed.
    pub error: Option<RequestError>,
    /// The generated text (read by the multi-turn workload; not written to results).
    #[serde(skip)]
    pub text: String,
}

/// One request of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Position in the run's schedule.
    pub index: usize,
    /// When it was due, seconds from the start of the run.
    pub scheduled_s: f64,
    /// When it was sent (later than due when it waited for a concurrency slot).
    pub sent_s: f64,
    /// Prompt tokens by the local tokenizer, when prompts were built with one.
    pub prompt_tokens: Option<u32>,
    /// `max_tokens` asked for.
    pub max_tokens: u32,
    /// What the target measured.
    #[serde(flatten)]
    pub measured: Measured,
}

impl Sample {
    /// Finished without an error.
    pub fn ok(&self) -> bool {
        self.measured.error.is_none()
    }
}

/// Collects one request's chunk times as a client sees them.
#[derive(Debug)]
pub struct Recorder {
    sent: Instant,
    first_text: Option<Instant>,
    last_text: Option<Instant>,
    last_choice: Option<Instant>,
    itl_s: Vec<f64>,
    text_chunks: u32,
    token_ids: Option<u32>,
    usage_completion: Option<u32>,
    usage_prompt: Option<u32>,
    text: String,
}

impl Recorder {
    /// Starts timing a request sent at `sent`.
    pub fn new(sent: Instant) -> Self {
        Self {
            sent,
            first_text: None,
            last_text: None,
            last_choice: None,
            itl_s: Vec::new(),
            text_chunks: 0,
            token_ids: None,
            usage_completion: None,
            usage_prompt: None,
            text: String::new(),
        }
    }

    /// Generated text arrived (kept for the multi-turn workload, whose next prompt holds it).
    pub fn text(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// A chunk arrived at `at`: `has_text` if it carried text, `has_choice` if it carried a
    /// choice at all (text, or only a finish reason).
    pub fn chunk(&mut self, at: Instant, has_text: bool, has_choice: bool) {
        if has_text {
            match self.last_text {
                None => self.first_text = Some(at),
                Some(prev) => self
                    .itl_s
                    .push(at.saturating_duration_since(prev).as_secs_f64()),
            }
            self.last_text = Some(at);
            self.text_chunks += 1;
        }
        if has_text || has_choice {
            self.last_choice = Some(at);
        }
    }

    /// The stream listed `n` more generated token ids.
    pub fn token_ids(&mut self, n: u32) {
        *self.token_ids.get_or_insert(0) += n;
    }

    /// The server reported usage.
    pub fn usage(&mut self, completion_tokens: Option<u32>, prompt_tokens: Option<u32>) {
        self.usage_completion = completion_tokens.or(self.usage_completion);
        self.usage_prompt = prompt_tokens.or(self.usage_prompt);
    }

    /// The measurement of a request that ended at `now`, failed with `error` or not.
    pub fn finish(self, now: Instant, error: Option<RequestError>) -> Measured {
        let since = |t: Instant| t.saturating_duration_since(self.sent).as_secs_f64();
        let end = match (&error, self.last_choice) {
            (None, Some(t)) => t,
            _ => now,
        };
        let (output_tokens, output_tokens_from) = match (self.usage_completion, self.token_ids) {
            (Some(n), _) => (n, TokenCountSource::Usage),
            (None, Some(n)) => (n, TokenCountSource::TokenIds),
            (None, None) => (self.text_chunks, TokenCountSource::Chunks),
        };
        Measured {
            ttft_s: self.first_text.map(since),
            e2e_s: since(end),
            itl_s: self.itl_s,
            output_tokens,
            output_tokens_from,
            server_prompt_tokens: self.usage_prompt,
            error,
            text: self.text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn recorder_times_text_chunks_and_ends_at_the_last_choice() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut r = Recorder::new(t0);
        r.chunk(ms(5), false, true); // an empty first chunk is not the first token
        r.chunk(ms(100), true, true);
        r.chunk(ms(130), true, true);
        r.chunk(ms(190), true, true);
        r.chunk(ms(200), false, true); // finish reason only
        r.usage(Some(4), Some(12));
        let m = r.finish(ms(250), None);
        assert_eq!(m.ttft_s, Some(0.1));
        let itl: Vec<u64> = m.itl_s.iter().map(|s| (s * 1e3).round() as u64).collect();
        assert_eq!(itl, [30, 60]);
        assert!((m.e2e_s - 0.2).abs() < 1e-9);
        assert_eq!(
            (m.output_tokens, m.output_tokens_from),
            (4, TokenCountSource::Usage)
        );
        assert_eq!(m.server_prompt_tokens, Some(12));
    }

    #[test]
    fn recorder_falls_back_to_token_ids_then_chunks_and_a_failure_ends_now() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0);
        r.chunk(t0 + Duration::from_millis(10), true, true);
        r.chunk(t0 + Duration::from_millis(20), true, true);
        let m = r.finish(
            t0 + Duration::from_millis(70),
            Some(RequestError::new(ErrorKind::Timeout, "late")),
        );
        assert_eq!(
            (m.output_tokens, m.output_tokens_from),
            (2, TokenCountSource::Chunks)
        );
        assert!((m.e2e_s - 0.07).abs() < 1e-9);
        let mut r = Recorder::new(t0);
        r.token_ids(3);
        r.token_ids(2);
        let m = r.finish(t0, None);
        assert_eq!(
            (m.output_tokens, m.output_tokens_from),
            (5, TokenCountSource::TokenIds)
        );
    }

    #[test]
    fn error_kinds_serialize_flat_and_print_short() {
        let e = RequestError::new(ErrorKind::HttpStatus { status: 500 }, "boom");
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"kind": "http_status", "status": 500, "message": "boom"})
        );
        assert_eq!(
            ErrorKind::HttpStatus { status: 500 }.to_string(),
            "http 500"
        );
        assert_eq!(
            ErrorKind::GrpcStatus { code: 14 }.to_string(),
            "grpc Unavailable"
        );
    }
}
