//! Coordinator: takes requests from gRPC and OpenAI HTTP clients, tokenizes them, admits them
//! within a bound, places each on a prefill and a decode worker (or a decode worker alone), runs
//! the KV handoff between them, and streams detokenized text back.
//!
//! client --gRPC Generate | POST /v1/chat/completions--> [coordinator]
//!     --Reserve/Prefill--> prefill worker --KV--> decode worker --tokens--> [coordinator] --> client
//!
//! Invariants: the coordinator holds no KV and loads no weights (it needs only the tokenizer);
//! admission is a semaphore, so overload is an immediate RESOURCE_EXHAUSTED / 429, never a
//! queue; a dropped client stream cancels its decode call, which frees the worker's blocks.

mod auth;
mod budget;
mod cloud;
mod config;
mod error;
mod generate;
mod grpc;
mod http;
mod metrics;
mod placement;
mod server;
mod workers;

pub use auth::{ApiKeyConfig, AuthConfig, key_digest};
pub use config::{CloudConfig, CoordinatorConfig, HandoffShape, ReplicaSection, TransportChoice};
pub use error::{Error, ErrorClass, Result};
pub use generate::{GenerateInput, Placement, PromptInput, StreamEvent, Usage};
pub use grpc::budget_to_proto;
pub use placement::{PdMode, Routing};
pub use server::{run, serve};

#[doc(hidden)]
pub use http::fuzzing;

/// The routing decisions, public only for the criterion benchmark `benches/routing.rs`; not part
/// of the crate's API.
#[doc(hidden)]
pub mod routing {
    pub use crate::placement::{
        Candidate, LinkCost, Mode, NoPlacement, Routing, choose_decode, choose_prefill, decide,
    };
}
