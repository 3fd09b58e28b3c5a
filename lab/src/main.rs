//! `baton-lab`: the experiments behind BENCHMARKS.md, each measuring baton against a baseline
//! run in the same invocation. They live outside the serving binary (`baton`), which links
//! neither them nor the plotting they use; `baton bench serve` (the load generator) and `baton
//! kv-demo` stay there as user-facing commands.
//!
//! ```text
//! engine    the engine against llama.cpp (llama-cpp-python) on the same file and threads
//! transfer  the KV transports against raw TCP and memcpy on a real prompt's KV
//! handoff   TTFT disaggregated (tcp, shm x push, pull) against colocated, same two workers
//! overhead  the coordinator against calling a decode worker directly
//! disagg    pinned prefill/decode workers against a colocated worker under a mixed load
//! events    the event plane: messages one coordinator absorbs from N publishers, and its CPU
//! chaos     faults in a cluster of real processes (kills, stops, a coordinator restart, a
//!           flood of clients), each checked against what the cluster promises
//! groups    tensor- and pipeline-parallel groups: memory per rank, TTFT and TPOT per layout,
//!           KV moved between differently split groups, each against the whole model
//! replica   the coordinators' replicated state: a proposal's cost on three nodes against one,
//!           and the time a group is without a leader when it loses one
//! ```
//!
//! The cluster experiments start `baton` processes: the `baton` binary beside this one (build
//! both: `cargo build --release -p baton -p baton-lab`), or `$BATON_EXE`.

mod chaos;
mod cluster;
mod disagg;
mod engine;
mod events;
mod groups;
mod replica;
mod standin;
mod transfer;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "baton-lab",
    version,
    about = "baton's experiments, each against a baseline measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Engine throughput: prefill, single-stream and batched decode, load time, memory.
    Engine(engine::EngineArgs),
    /// KV transfer: baton's TCP and shared-memory transports against raw loopback TCP and memcpy
    /// on a real prompt's KV, and how much of a push transfer the prefill compute hides.
    Transfer(transfer::TransferArgs),
    /// What a KV handoff costs a request: TTFT disaggregated (tcp, shm x push, pull) against
    /// aggregated on the same two worker processes, per prompt length, with the transfer's
    /// time and its exposed (not overlapped) part.
    Handoff(cluster::HandoffArgs),
    /// What the coordinator adds to a request: pairs of the same request through the
    /// coordinator and straight to the decode worker, alternated; TTFT and end-to-end p50/p99.
    Overhead(cluster::OverheadArgs),
    /// The disaggregation experiment: pinned prefill and decode workers against a colocated
    /// worker under a mix of steady short-prompt streams and long prompts at a sweep of rates.
    Disagg(Box<disagg::DisaggArgs>),
    /// The event plane: messages and KV events per second one coordinator applies from N
    /// publishing workers at a sweep of offered rates, their lag, and the coordinator's CPU.
    Events(events::EventsArgs),
    /// Faults injected into a cluster of real processes: decode and prefill workers SIGKILLed or
    /// SIGSTOPped mid-stream, the coordinator killed and started again under load, 1,000
    /// clients at once, slow readers and slowloris; one result line per scenario (driven by
    /// `scripts/chaos.sh`).
    Chaos(Box<chaos::ChaosArgs>),
    /// The coordinators' replicated state (raft): sequential proposals on a one-node group
    /// against a three-node group (via the leader, via a follower), and failover trials: the
    /// leader stopped under a stream of proposals, time to the first one applied after.
    Replica(replica::ReplicaArgs),
    /// Tensor- and pipeline-parallel groups: resident memory per rank (each its own process),
    /// TTFT and TPOT of each layout against the whole model, and a prompt's KV moved between
    /// differently split groups by the transfer plan, bytes per rank and time against 1:1.
    Groups(groups::GroupsArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Engine(args) => engine::run(args),
        Command::Transfer(args) => transfer::run(args),
        Command::Handoff(args) => cluster::handoff(args),
        Command::Replica(args) => replica::run(args),
        Command::Groups(args) => groups::run(args),
        Command::Overhead(args) => cluster::overhead(args),
        Command::Disagg(args) => disagg::run(*args),
        Command::Events(args) => events::run(args),
        Command::Chaos(args) => chaos::run(*args),
    }
}
