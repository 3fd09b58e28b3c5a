//! `baton`: one binary for every role: `up` (a whole local cluster), `coordinator`, `prefill`,
//! `decode`, `generate` (a client, or the engine in this process with `--local`), `bench`, and
//! `kv-demo` (the KV transfer between two processes, without a cluster).

mod bench;
mod bench_serve;
mod bench_transfer;
mod generate;
mod kv_demo;
mod model_path;
mod roles;
mod up;

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
    /// Start a local cluster: coordinator, prefill and decode workers as separate processes.
    Up(up::UpArgs),
    /// Run the coordinator (gRPC and OpenAI HTTP frontends).
    Coordinator(roles::CoordinatorArgs),
    /// Run a prefill worker.
    Prefill(roles::PrefillArgs),
    /// Run a decode worker.
    Decode(roles::DecodeArgs),
    /// Generate text from a prompt and stream it to the terminal.
    Generate(generate::GenerateArgs),
    /// Measure baton against baselines.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Move one prompt's KV from a prefill engine in this process to a decode engine in a child
    /// process over TCP and/or shared memory, and check the tokens against a single process.
    KvDemo(kv_demo::KvDemoArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Servers log their lifecycle; one-shot commands keep the terminal for their output.
    let default_level = match cli.command {
        Command::Generate(_) | Command::Bench(_) | Command::KvDemo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Up(args) => up::run(args),
        Command::Coordinator(args) => roles::coordinator(args),
        Command::Prefill(args) => roles::prefill(args),
        Command::Decode(args) => roles::decode(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::KvDemo(args) => kv_demo::run(args),
    }
}
