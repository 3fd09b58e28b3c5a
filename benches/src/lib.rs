//! baton's load generator: sends requests to a serving endpoint on a schedule and measures them
//! the way vLLM's `benchmark_serving` does (TTFT, TPOT, ITL, end-to-end latency, throughput,
//! goodput under SLOs).
//!
//! ```text
//! arrivals (offsets) + prompts (requests) --run--> Target (OpenAI SSE | baton gRPC)
//!     --Sample per request--> metrics (Summary) --> report (table, results.json) + charts (SVG)
//! ```
//!
//! It sits outside the serving path: `baton bench serve` (cli/src/bench_serve.rs) parses flags
//! and calls into this crate; anything that speaks OpenAI's `/v1/completions` can be measured,
//! so baton and its peers go through the same code. Schedules, prompt synthesis and metrics are
//! pure functions over a seeded RNG and recorded samples; only `client` and `run` do IO.
//!
//! Invariants: every request that is sent yields exactly one [`Sample`], failed or not, and a
//! failure is classified once, by the client, into an [`ErrorKind`].

pub mod arrivals;
#[cfg(feature = "charts")]
pub mod chart;
pub mod client;
pub mod conversations;
mod error;
pub mod metrics;
pub mod prompts;
pub mod report;
pub mod run;
pub mod sample;

pub use arrivals::{Arrivals, Bounds, Load, schedule};
pub use client::{GrpcTarget, OpenAiTarget, Target};
pub use conversations::{Conversations, run_conversations};
pub use error::{Error, Result};
pub use metrics::{Distribution, Slo, Summary, summarize};
pub use prompts::{LengthDist, RequestSpec, Synthetic, TokenCodec};
pub use run::{RunOptions, RunResult, run_load};
pub use sample::{ErrorKind, Measured, Recorder, RequestError, Sample, TokenCountSource};
