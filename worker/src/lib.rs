//! What both worker roles (prefill, decode) share, written once:
//!
//! ```text
//! gRPC service --Command (bounded)--> [engine thread] --Snapshot (watch)--> load, metrics, drain
//! serve(): listener + role service + health + reflection + /metrics, SIGTERM -> drain -> stop
//! ```
//!
//! - [`announce`]: the signed advert a worker publishes through discovery (mDNS, etcd) and
//!   withdraws when it drains.
//! - [`events`]: the event plane's publisher (load and KV events, signed, over ZeroMQ).
//! - [`engine`]: the handle to a role's engine thread: a bounded command channel (full is
//!   overload, said at once) and the snapshot the thread publishes after each turn, which load
//!   reports, metrics and the drain read without waiting on a step.
//! - [`exposure`]: whether a worker may serve on the addresses it binds (security off only on
//!   loopback).
//! - [`kv_log`]: the log of what the worker's prefix cache stored and evicted, which its load
//!   reports answer a reader's cursor from.
//! - [`priority`]: lowering a worker's CPU priority on a host it shares with other roles.
//! - [`serve`]: the server around a role's gRPC service, its health and reflection, the metrics
//!   endpoint, and the drain that SIGTERM starts.
//!
//! Invariants: only the engine thread touches the engine; a drained worker holds no block.

pub mod announce;
pub mod engine;
pub mod events;
pub mod exposure;
pub mod kv_log;
pub mod priority;
pub mod serve;

pub use announce::{announce, default_host_id};
pub use engine::{Control, EngineHandle, Refused, Snapshot, sleep_until};
pub use kv_log::KvLog;
pub use serve::{Drain, ServeOptions, serve};
