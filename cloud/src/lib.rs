//! Cloud upstreams: the coordinator's client side of an OpenAI-compatible endpoint (Azure AI
//! Foundry, Groq, Together, another baton) it spills requests to when local capacity is short.
//!
//! coordinator (placement chose cloud) --[baton-cloud: Upstream::send]--> https endpoint
//!   --SSE--> UpstreamEvent --> coordinator's stream
//!
//! - [`config`]: [`EndpointConfig`], one `[[coordinator.cloud.endpoints]]` table.
//! - [`key`]: the endpoint's API key ([`ApiKey`]), from an environment variable or a file
//!   re-read when it changes, held as a [`Secret`] that prints `[redacted]`.
//! - [`upstream`]: [`Upstream`] with its concurrency [`Permit`]s, and the streamed request
//!   whose reply [`UpstreamStream`] decodes into [`UpstreamEvent`]s.
//! - [`sse`]: the incremental server-sent-events decoder under it.
//! - [`error`]: [`Error`] (building an upstream) and [`UpstreamError`] (one request), each
//!   classified once.
//!
//! This crate knows nothing of budgets or placement: the coordinator decides whether to send,
//! and the usage an endpoint reports goes back to it to account.
//!
//! Invariants: an API key never appears in any `Debug`, `Display`, error message, log field or
//! serialized config; dropping an [`UpstreamStream`] aborts its HTTP request and frees its
//! permit.

pub mod config;
pub mod error;
pub mod key;
pub mod sse;
pub mod upstream;

pub use config::{AuthHeader, EndpointConfig, validate_endpoints};
pub use error::{Error, Result, UpstreamError, UpstreamErrorKind};
pub use key::{ApiKey, Secret};
pub use sse::{SseDecoder, SseError};
pub use upstream::{Api, Permit, Upstream, UpstreamEvent, UpstreamRequest, UpstreamStream, Usage};
