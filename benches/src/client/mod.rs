//! The two targets a benchmark can drive, behind one trait: any OpenAI-compatible server's
//! streaming `/v1/completions` ([`OpenAiTarget`]) and baton's gRPC `Generate`
//! ([`GrpcTarget`]). Each sends one request, times its chunks into a [`crate::Recorder`], and
//! classifies any failure into an [`crate::ErrorKind`] there, once.
//!
//! runner --RequestSpec, deadline--> Target::send --HTTP/SSE | gRPC stream--> server
//!     <--Measured (times, tokens, error)--

mod grpc;
mod openai;
pub mod sse;

use std::future::Future;

pub use grpc::GrpcTarget;
pub use openai::OpenAiTarget;

use crate::prompts::RequestSpec;
use crate::sample::Measured;

/// A serving endpoint that can be measured.
pub trait Target: Send + Sync + 'static {
    /// Sends `request`, streaming, and measures it. Never fails: a failure (including not
    /// finishing by `deadline`) is recorded in the result's `error`, with the timings seen so far.
    fn send(
        &self,
        request: &RequestSpec,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Measured> + Send;
}
