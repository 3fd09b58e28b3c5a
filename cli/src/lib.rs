//! The `baton` binary's commands as a library: the binary (`main.rs`) parses flags and calls
//! them, and `baton-lab` (the experiments) reuses the cluster spawning, model lookup and load
//! generator plumbing instead of copying it.
//!
//! - [`up`]: a local cluster of role processes (`baton up`), and the spawning code behind it.
//! - [`supervise`]: what `up` decides about a child that dies (restart backoff, crash loop).
//! - [`roles`]: `baton coordinator | prefill | decode`, each from its layered config ([`config`]).
//! - [`status`]: `baton status`, the pool as a coordinator sees it.
//! - [`keys`]: `baton keys new`, an API key and the config table that admits it.
//! - [`certs`]: `baton certs`, a development CA and per-role certificates for mutual TLS, and
//!   the cluster key that KV links prove.
//! - [`budget`]: `baton budget`, the cloud budget's windows, spend and open reservations.
//! - [`generate`]: a client of the cluster, or the engine in this process (`--local`).
//! - [`bench_serve`]: `baton bench serve`, the load generator's flags over `baton-bench`.
//! - [`kv_demo`]: `baton kv-demo`, one prompt's KV moved between two processes.
//! - [`rank`]: `baton rank`, one rank process of a tensor- and pipeline-parallel group.
//! - [`model_path`]: where the model file is (flag, `$BATON_MODEL`, the development model).

pub mod api_key;
pub mod bench_serve;
pub mod budget;
pub mod certs;
pub mod config;
pub mod decide;
pub mod generate;
pub mod keys;
pub mod kv_demo;
pub mod model_path;
pub mod rank;
pub mod roles;
pub mod status;
pub mod supervise;
pub mod up;
