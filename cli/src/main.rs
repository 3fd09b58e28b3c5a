//! `baton`: one binary for every role: `up` (a whole local cluster), `coordinator`, `prefill`,
//! `decode`, `status` (the pool a coordinator sees), `budget` (the cloud spend), `worker`
//! (an operator's drain, refusal or restore of a worker), `generate` (a client, or the engine in this process with `--local`), `bench serve`
//! (the load generator), `kv-demo` (the KV transfer between two processes, without a cluster),
//! and `config` (the effective configuration of a role, and its JSON Schema). The experiments
//! (engine, transfer, handoff, overhead, disaggregation) are `baton-lab`'s.

use baton::{
    bench_serve, budget, certs, config, decide, generate, keys, kv_demo, rank, roles, status, up,
};
use baton_proto::v1::WorkerDecision;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "Disaggregated prefill/decode LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster: coordinator, prefill and decode workers as separate processes
    /// (with --colocated: the coordinator and workers that prefill and decode their own requests).
    Up(up::UpArgs),
    /// Run the coordinator (gRPC and OpenAI HTTP frontends).
    Coordinator(roles::CoordinatorArgs),
    /// Run a prefill worker.
    Prefill(roles::PrefillArgs),
    /// Run a decode worker.
    Decode(roles::DecodeArgs),
    /// One rank of a tensor- and pipeline-parallel worker group: loads its shard and serves
    /// the group's driver at --group-addr (the secret in $BATON_GROUP_SECRET).
    Rank(rank::RankCliArgs),
    /// Show the pool a coordinator sees: workers, their state, how they were found, KV and load.
    Status(status::StatusArgs),
    /// Show the cloud budget: each cap's window (spent, reserved, remaining), each upstream's
    /// spend, and reservations not yet settled.
    Budget(budget::BudgetArgs),
    /// An operator's decision about a worker, agreed by every coordinator: drain it, refuse
    /// it, or restore it.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// API keys for the client APIs.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Write a development certificate authority, a certificate per role (coordinator,
    /// prefill, decode) for mutual TLS between them, a cluster key for KV links and adverts,
    /// and tls.toml naming them all (`baton up --config DIR/tls.toml`).
    Certs(certs::CertsArgs),
    /// Generate text from a prompt and stream it to the terminal.
    Generate(generate::GenerateArgs),
    /// Load-test a running server.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Move one prompt's KV from a prefill engine in this process to a decode engine in a child
    /// process over TCP and/or shared memory, and check the tokens against a single process.
    KvDemo(kv_demo::KvDemoArgs),
    /// Show a role's effective configuration, or the configuration's JSON Schema.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Load generator: TTFT, TPOT, ITL, end-to-end latency, throughput and goodput of a running
    /// server (OpenAI-compatible /v1/completions or baton's gRPC API) under a request rate or a
    /// concurrency, as vLLM's benchmark_serving measures them.
    Serve(Box<bench_serve::ServeArgs>),
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// No coordinator places new requests on the worker; what it runs finishes.
    Drain(decide::DecideArgs),
    /// No coordinator places anything on the worker; `baton status` lists it as refused.
    Refuse(decide::DecideArgs),
    /// Lifts a drain or a refusal.
    Restore(decide::DecideArgs),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Make a new API key: prints the key on stdout and, on stderr, the
    /// `[[coordinator.auth.keys]]` table (its SHA-256) that admits it.
    New(keys::NewKeyArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a role's effective configuration (defaults < --config file < BATON_* env < --set)
    /// as TOML, secrets redacted; exits non-zero, naming the key, if it would not start.
    Print {
        #[arg(long, value_enum)]
        role: config::RoleName,
        #[command(flatten)]
        config: roles::ConfigArgs,
    },
    /// Print the JSON Schema of the config file, or of one role's table.
    Schema {
        #[arg(long, value_enum)]
        role: Option<config::RoleName>,
    },
}

fn config_command(cmd: ConfigCommand) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Print { role, config } => {
            roles::configure(&config.sources(Some(role), |_| {})?, role, true)?;
        }
        ConfigCommand::Schema { role } => {
            println!("{}", serde_json::to_string_pretty(&config::schema(role))?);
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The roles install their own telemetry (logs, span export) from their settings. Of the
    // rest, `up` logs its lifecycle and one-shot commands keep the terminal for their output.
    let one_shot = match cli.command {
        Command::Coordinator(_) | Command::Prefill(_) | Command::Decode(_) => None,
        Command::Up(_) => Some("info"),
        _ => Some("warn"),
    };
    if let Some(level) = one_shot {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
            )
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Up(args) => up::run(args),
        Command::Rank(args) => rank::run(args),
        Command::Coordinator(args) => roles::coordinator(args),
        Command::Prefill(args) => roles::prefill(args),
        Command::Decode(args) => roles::decode(args),
        Command::Status(args) => status::run(args),
        Command::Budget(args) => budget::run(args),
        Command::Worker(WorkerCommand::Drain(args)) => decide::run(WorkerDecision::Drain, args),
        Command::Worker(WorkerCommand::Refuse(args)) => decide::run(WorkerDecision::Refuse, args),
        Command::Worker(WorkerCommand::Restore(args)) => decide::run(WorkerDecision::Restore, args),
        Command::Keys(KeysCommand::New(args)) => keys::new_key(args),
        Command::Certs(args) => certs::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(BenchCommand::Serve(args)) => bench_serve::run(*args),
        Command::KvDemo(args) => kv_demo::run(args),
        Command::Config(cmd) => config_command(cmd),
    }
}
